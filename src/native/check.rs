//! `ferry check`: proves the repository's own consistency without reading pack data.
//!
//! Every index decodes, names its pack, and points into a pack that exists with the indexed
//! size; every manifest decodes, every pack it lists exists and is indexed, and every chunk it
//! references is in one of those indexes. Packs condemned by a mark that a manifest references
//! are reported (a sweep recovers them; they are expected when a backup deduplicated into a pack
//! just before it was marked), as are packs without an index and what `prune` could reclaim.
//! Listings are taken in the order that concurrent backups and prunes cannot make look wrong:
//! marks, manifests, packs, indexes.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::error::EngineError;
use crate::native::layout::{self, PackId, PackIndex, Timestamp, liveness};
use crate::native::repo::{Repository, parallel_map};
use crate::native::verify::Problem;
use crate::store::DatedObject;

/// A pack a manifest references that a mark condemns.
#[derive(Debug, Clone, Serialize)]
pub struct MarkedReferenced {
    /// The pack.
    pub pack: PackId,
    /// The mark.
    pub mark: String,
    /// When the mark was written (store clock).
    pub marked_at: Timestamp,
    /// A backup that references it.
    pub backup_id: String,
}

/// What `check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Backups (manifests) checked.
    pub backups: usize,
    /// Pack objects.
    pub packs: usize,
    /// Their bytes.
    pub pack_bytes: u64,
    /// Packs indexed (by their own index object or a consolidated one).
    pub indexes: usize,
    /// Consolidated index objects.
    pub consolidated_indexes: usize,
    /// Packs listed in a consolidated index that are gone (swept since: dead entries, which the
    /// next consolidation drops).
    pub dead_consolidated_packs: usize,
    /// Marks.
    pub marks: usize,
    /// Packs no manifest references (what prune reclaims over two runs).
    pub unreferenced_packs: usize,
    /// Their bytes.
    pub unreferenced_bytes: u64,
    /// Packs without an index (an interrupted backup's, or a lost index: `ferry repair`).
    pub unindexed_packs: Vec<String>,
    /// Referenced packs that a mark condemns.
    pub marked_referenced: Vec<MarkedReferenced>,
    /// Everything wrong (empty: consistent).
    pub problems: Vec<Problem>,
}

/// Checks `repo`.
///
/// # Errors
/// Store errors that stop the check itself; damage is reported in `problems`.
pub fn run(repo: &Repository) -> Result<CheckReport, EngineError> {
    let mut problems = BTreeSet::new();
    let mut problem = |object: String, detail: String| {
        let _ = problems.insert(Problem { object, detail });
    };
    let marks = repo.load_marks()?;
    for (key, detail) in &marks.unreadable {
        problem(key.clone(), detail.clone());
    }
    let manifests = repo.load_all_manifests()?;
    let packs = repo.list_packs()?;
    let (indexes, dead) = check_indexes(repo, &packs, &mut problem)?;
    let mark_of: HashMap<PackId, (&str, u64)> = marks
        .marks
        .iter()
        .flat_map(|mark| {
            mark.mark.packs.iter().map(|pack| (*pack, (mark.key.as_str(), mark.written_at)))
        })
        .collect();
    let readable: Vec<(&str, &layout::Manifest)> = manifests
        .iter()
        .filter_map(|(id, manifest)| Some((id.as_str(), manifest.as_ref().ok()?)))
        .collect();
    // What the backups need: the packs they list, or, for a pack condemned or gone after a
    // repack, the packs that hold its chunks now.
    let needed = liveness::needed(readable.iter().copied(), &indexes, &marks.packs);
    let unresolved: HashMap<&str, usize> =
        needed.unresolved.iter().map(|(id, count)| (id.as_str(), *count)).collect();
    let mut listed: HashSet<PackId> = HashSet::new();
    let mut marked_referenced = Vec::new();
    for (id, manifest) in &manifests {
        if let Err(error) = manifest {
            problem(layout::manifest_key(id), error.message.clone());
        }
    }
    for (id, manifest) in &readable {
        for pack in &manifest.packs {
            if listed.insert(*pack)
                && let Some((mark, marked_at)) = mark_of.get(pack)
            {
                marked_referenced.push(MarkedReferenced {
                    pack: *pack,
                    mark: (*mark).to_owned(),
                    marked_at: Timestamp(*marked_at),
                    backup_id: (*id).to_owned(),
                });
            }
        }
        // A pack the backup lists that is gone or unindexed matters only when some chunk of
        // the backup is held by no existing pack.
        let Some(count) = unresolved.get(id) else { continue };
        for pack in &manifest.packs {
            match (packs.contains_key(pack), indexes.contains_key(pack)) {
                (false, _) => {
                    problem(pack.pack_key(), format!("backup {id} references it and it is missing"))
                }
                (true, false) => problem(
                    pack.index_key(),
                    format!(
                        "backup {id} references pack {pack}, whose index is missing (`ferry repair` rebuilds it)"
                    ),
                ),
                (true, true) => {}
            }
        }
        problem(
            layout::manifest_key(id),
            format!("{count} chunk reference(s) are in no index of an existing pack"),
        );
    }
    let backups = readable.len();
    let mut unindexed_packs: Vec<String> = packs
        .iter()
        .filter(|(pack, _)| !indexes.contains_key(pack))
        .map(|(_, object)| object.key.clone())
        .collect();
    unindexed_packs.sort();
    let unreferenced: Vec<u64> = packs
        .iter()
        .filter(|(pack, _)| !needed.packs.contains(pack))
        .map(|(_, object)| object.size_bytes)
        .collect();
    Ok(CheckReport {
        backups,
        packs: packs.len(),
        pack_bytes: packs.values().map(|object| object.size_bytes).sum(),
        indexes: indexes.len(),
        consolidated_indexes: dead.0,
        dead_consolidated_packs: dead.1,
        marks: marks.marks.len(),
        unreferenced_packs: unreferenced.len(),
        unreferenced_bytes: unreferenced.iter().sum(),
        unindexed_packs,
        marked_referenced,
        problems: problems.into_iter().collect(),
    })
}

/// Readable indexes by pack, and (consolidated index objects, their dead packs).
type CheckedIndexes = (HashMap<PackId, PackIndex>, (usize, usize));

/// Loads every index, own and consolidated, and checks it against the packs listed before it;
/// returns the readable ones by pack, and (consolidated objects, their dead packs).
fn check_indexes(
    repo: &Repository,
    packs: &HashMap<PackId, DatedObject>,
    problem: &mut impl FnMut(String, String),
) -> Result<CheckedIndexes, EngineError> {
    let listing = repo.list_indexes()?;
    let index_keys: Vec<PackId> = listing.per_pack.keys().copied().collect();
    let loaded = parallel_map(&index_keys, 8, |pack| Ok(repo.load_index(pack)))?;
    let mut indexes = HashMap::new();
    for (pack, loaded) in index_keys.iter().zip(loaded) {
        let index = match loaded {
            Ok(index) => index,
            Err(error) => {
                // Deleted since the listing (a sweep) is not damage.
                if repo.store.list(&pack.index_key())?.is_empty() {
                    continue;
                }
                problem(pack.index_key(), error.message);
                continue;
            }
        };
        if check_against_pack(repo, &pack.index_key(), &index, packs, problem)? == Some(true) {
            let _ = indexes.insert(*pack, index);
        }
    }
    let mut dead = 0;
    for (id, object) in &listing.merged {
        let merged = match repo.load_merged(*id) {
            Ok(Some(merged)) => merged,
            // Superseded and deleted since the listing.
            Ok(None) => continue,
            Err(error) => {
                problem(object.key.clone(), error.message);
                continue;
            }
        };
        for index in merged.packs {
            match check_against_pack(repo, &object.key, &index, packs, problem)? {
                None => dead += 1,
                Some(false) => {}
                Some(true) => match indexes.get(&index.pack) {
                    Some(own) if *own != index => problem(
                        object.key.clone(),
                        format!("its entries for pack {} differ from another index", index.pack),
                    ),
                    Some(_) => {}
                    None => {
                        let _ = indexes.insert(index.pack, index);
                    }
                },
            }
        }
    }
    Ok((indexes, (listing.merged.len(), dead)))
}

/// Checks one pack's index (found in `key`) against the pack: `None` when the pack is gone
/// and `key` is a consolidated index (a dead entry), `Some(usable)` otherwise.
fn check_against_pack(
    repo: &Repository,
    key: &str,
    index: &PackIndex,
    packs: &HashMap<PackId, DatedObject>,
    problem: &mut impl FnMut(String, String),
) -> Result<Option<bool>, EngineError> {
    let pack = &index.pack;
    let consolidated = key != pack.index_key();
    let size = match packs.get(pack) {
        Some(object) => object.size_bytes,
        // A backup writes the pack, then its index: look again before calling it lost.
        None => match repo.store.list(&pack.pack_key())?.first() {
            Some(object) if object.key == pack.pack_key() => object.size_bytes,
            _ if consolidated => return Ok(None),
            _ => {
                problem(key.to_owned(), format!("its pack {} is missing", pack.pack_key()));
                return Ok(Some(false));
            }
        },
    };
    if index.pack_size_bytes != size {
        let detail = format!("pack has {size} bytes, its index says {}", index.pack_size_bytes);
        problem(pack.pack_key(), detail);
    }
    if let Some(entry) = index.entries.iter().find(|e| e.offset + e.record_bytes() > size) {
        let detail =
            format!("record of chunk {} at {} runs past the end", entry.hash, entry.offset);
        problem(pack.pack_key(), detail);
    }
    Ok(Some(true))
}
