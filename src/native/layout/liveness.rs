//! Which packs a repository needs, once packs can be repacked (FORMAT.md, "Liveness" and
//! "Repacking"): pure rules over manifests, the indexes of the packs that exist, and the packs
//! condemned by marks. No I/O.
//!
//! A manifest lists the packs its backup wrote or deduplicated into. A pack it lists that no
//! mark condemns is needed, as before repacking existed. A pack it lists that a mark condemns
//! (or that is gone) is needed only for the chunks of the backup that no other existing,
//! uncondemned pack holds: a repack copies the used records of a pack into new packs before a
//! mark condemns it, so those copies serve the old manifests, and they are needed in turn.

use std::collections::{HashMap, HashSet};

use super::{ChunkHash, Manifest, PackId, PackIndex};

/// What `needed` found.
#[derive(Debug, Clone, Default)]
pub struct Needed {
    /// Packs that must be kept: listed by a manifest and not condemned, without a readable
    /// index, or holding a chunk some manifest needs that no better pack holds.
    pub packs: HashSet<PackId>,
    /// Backups with chunks that no index of an existing pack holds, and how many.
    pub unresolved: Vec<(String, usize)>,
}

/// The packs `manifests` need. `indexes` are the readable indexes of the packs that exist;
/// `condemned` the packs readable marks condemn.
///
/// Per manifest `M` and chunk `h` of it, when some pack `M` lists and no mark condemns holds
/// `h`, that pack serves it. Otherwise (its pack is condemned, gone or a repack copied it) the
/// uncondemned pack holding `h` with the lowest id is needed, and when there is none, every pack
/// holding it (condemned or not: a condemned pack still needed is recovered, never swept). A
/// manifest with a chunk no index holds keeps every pack it lists, since which one holds it is
/// unknown.
///
/// Why any such choice is safe: a sweep deletes a condemned pack only when, by a listing taken
/// after the mark's grace, each chunk a manifest needs from it has an uncondemned holder; that
/// holder can only be deleted by the sweep of a later mark, which judges it again and finds it
/// the last holder.
pub fn needed<'a>(
    manifests: impl IntoIterator<Item = (&'a str, &'a Manifest)>,
    indexes: &HashMap<PackId, PackIndex>,
    condemned: &HashSet<PackId>,
) -> Needed {
    let mut result = Needed::default();
    let mut deferred: Vec<(&str, &Manifest)> = Vec::new();
    for (id, manifest) in manifests {
        let mut simple = true;
        for pack in &manifest.packs {
            let indexed = indexes.contains_key(pack);
            if !condemned.contains(pack) || !indexed {
                let _ = result.packs.insert(*pack);
            }
            if condemned.contains(pack) || !indexed {
                simple = false;
            }
        }
        if !simple {
            deferred.push((id, manifest));
        }
    }
    if deferred.is_empty() {
        return result;
    }
    // The rare path (a manifest lists a condemned, gone or unindexed pack): which packs hold
    // the chunks of those manifests, from every index.
    let wanted: HashSet<ChunkHash> = deferred
        .iter()
        .flat_map(|(_, manifest)| manifest.chunks.iter().flatten().copied())
        .collect();
    let mut holders: HashMap<ChunkHash, Vec<PackId>> = HashMap::new();
    let mut sorted: Vec<&PackIndex> = indexes.values().collect();
    sorted.sort_unstable_by_key(|index| index.pack);
    for index in sorted {
        for entry in &index.entries {
            if wanted.contains(&entry.hash) {
                let packs = holders.entry(entry.hash).or_default();
                if packs.last() != Some(&index.pack) {
                    packs.push(index.pack);
                }
            }
        }
    }
    for (id, manifest) in deferred {
        let mut unresolved = 0;
        for hash in manifest.chunks.iter().flatten() {
            let Some(packs) = holders.get(hash) else {
                unresolved += 1;
                continue;
            };
            let served = packs.iter().any(|pack| {
                !condemned.contains(pack) && manifest.packs.binary_search(pack).is_ok()
            });
            if served {
                continue;
            }
            // `packs` is in id order: the first uncondemned holder serves the chunk, so a
            // second copy (a repack that crashed before its mark, two prunes repacking the same
            // pack) is condemned in turn.
            match packs.iter().find(|pack| !condemned.contains(pack)) {
                Some(pack) => {
                    let _ = result.packs.insert(*pack);
                }
                None => result.packs.extend(packs.iter().copied()),
            }
        }
        if unresolved > 0 {
            result.packs.extend(manifest.packs.iter().copied());
            result.unresolved.push((id.to_owned(), unresolved));
        }
    }
    result
}

/// Bytes of `index`'s records whose chunk some backup references (`referenced`): what a repack
/// of the pack would copy. A chunk held by two packs counts in both, so a pack's waste is never
/// overstated.
pub fn used_bytes(index: &PackIndex, referenced: &HashSet<ChunkHash>) -> u64 {
    index
        .entries
        .iter()
        .filter(|entry| referenced.contains(&entry.hash))
        .map(|entry| entry.record_bytes())
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::native::layout::IndexEntry;

    fn hash(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    fn pack(n: u8) -> PackId {
        PackId([n; 16])
    }

    fn index(p: u8, chunks: &[u8]) -> (PackId, PackIndex) {
        let entries = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| IndexEntry {
                hash: hash(*c),
                offset: i as u64 * 100,
                stored_bytes: 36,
                raw_bytes: 36,
            })
            .collect();
        (pack(p), PackIndex { pack: pack(p), pack_size_bytes: chunks.len() as u64 * 100, entries })
    }

    fn manifest(packs: &[u8], chunks: &[u8]) -> Manifest {
        let json = serde_json::json!({
            "format_version": 1, "backup_id": "b", "repository_id": "r",
            "source": {"path": "/v", "kind": "file", "logical_block_bytes": 512},
            "volume_size_bytes": chunks.len() * 4096, "chunk_size_bytes": 4096,
            "started_at": 0, "completed_at": 0,
            "packs": packs.iter().map(|p| pack(*p)).collect::<Vec<_>>(),
            "chunks": chunks.iter().map(|c| hash(*c)).collect::<Vec<_>>(),
            "stats": {"bytes_read": 0, "chunk_count": 0, "zero_chunk_count": 0,
                "dedup_chunk_count": 0, "new_chunk_count": 0, "new_raw_bytes": 0,
                "new_stored_bytes": 0, "pack_count": 0, "duration_ms": 0},
        });
        serde_json::from_value(json).unwrap()
    }

    fn set(packs: &[u8]) -> HashSet<PackId> {
        packs.iter().map(|p| pack(*p)).collect()
    }

    #[test]
    fn listed_uncondemned_packs_are_needed_as_before() {
        let indexes: HashMap<_, _> = [index(1, &[1, 2]), index(2, &[3])].into_iter().collect();
        let m = manifest(&[1, 2], &[1, 3]);
        let found = needed([("m", &m)], &indexes, &HashSet::new());
        assert_eq!(found.packs, set(&[1, 2]));
        assert!(found.unresolved.is_empty());
    }

    #[test]
    fn a_repacked_pack_is_replaced_by_its_copy() {
        // Pack 1 held chunks 1 and 2; chunk 2 was dead, so repack copied chunk 1 into pack 3
        // and a mark condemned pack 1.
        let indexes: HashMap<_, _> =
            [index(1, &[1, 2]), index(3, &[1]), index(4, &[9])].into_iter().collect();
        let m = manifest(&[1], &[1]);
        let found = needed([("m", &m)], &indexes, &set(&[1]));
        assert_eq!(found.packs, set(&[3]), "the copy is needed, the condemned source is not");
        // The copy is condemned too: both are kept (recovered), since one must hold chunk 1.
        let found = needed([("m", &m)], &indexes, &set(&[1, 3]));
        assert_eq!(found.packs, set(&[1, 3]));
    }

    #[test]
    fn a_chunk_only_the_condemned_pack_holds_recovers_it() {
        // A backup that loaded the index before the repack's mark deduplicated chunk 2, which
        // was dead then and not copied.
        let indexes: HashMap<_, _> = [index(1, &[1, 2]), index(3, &[1])].into_iter().collect();
        let m = manifest(&[1], &[1, 2]);
        let found = needed([("m", &m)], &indexes, &set(&[1]));
        assert_eq!(found.packs, set(&[1, 3]));
    }

    #[test]
    fn a_gone_pack_is_served_by_any_holder_and_unknown_chunks_keep_everything() {
        // Pack 1 was swept after its repack: the manifest still lists it.
        let indexes: HashMap<_, _> = [index(3, &[1]), index(5, &[1])].into_iter().collect();
        let m = manifest(&[1, 2], &[1, 7]);
        let found = needed([("m", &m)], &indexes, &set(&[5]));
        // Pack 2 lists no index: kept, and chunk 7 (no index holds it) keeps every listed pack.
        assert_eq!(found.packs, set(&[1, 2, 3]));
        assert_eq!(found.unresolved, vec![("m".to_owned(), 1)]);
    }

    #[test]
    fn of_two_copies_the_first_serves_and_the_other_is_not_needed() {
        let indexes: HashMap<_, _> =
            [index(1, &[1]), index(3, &[1]), index(4, &[1])].into_iter().collect();
        let m = manifest(&[1], &[1]);
        assert_eq!(needed([("m", &m)], &indexes, &set(&[1])).packs, set(&[3]));
        assert_eq!(needed([("m", &m)], &indexes, &set(&[1, 3])).packs, set(&[4]));
    }

    #[test]
    fn used_bytes_counts_referenced_records() {
        let (_, pack_index) = index(1, &[1, 2, 3]);
        let referenced: HashSet<ChunkHash> = [hash(1), hash(3)].into_iter().collect();
        assert_eq!(used_bytes(&pack_index, &referenced), 2 * (64 + 36));
    }
}
