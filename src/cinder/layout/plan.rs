//! Restore planning: the writes `ChunkedBackupDriver.restore` applies for a chain of backups, and
//! the checks `_restore_v1` makes before reading any object.

use std::collections::BTreeMap;

use super::DRIVER_VERSION;
use super::codec::Algorithm;
use super::error::CinderError;
use super::incremental::Extent;
use super::metadata::Metadata;
use super::names::{metadata_name, sha256file_name};

/// Piece size of Cinder's sparse restore (`_write_nonzero`): all-zero 1 MiB pieces, counted from
/// the object's offset, are skipped instead of written.
pub const SPARSE_PIECE_BYTES: u64 = 1 << 20;

/// One backup of a chain: its `_metadata`, its prefix (`service_metadata`) and the keys a
/// `ListObjectsV2` with that prefix returned.
#[derive(Debug, Clone, Copy)]
pub struct ChainLink<'a> {
    /// The backup's object prefix.
    pub prefix: &'a str,
    /// The parsed `_metadata`.
    pub metadata: &'a Metadata,
    /// Every key under `prefix` in the bucket.
    pub listing: &'a [String],
}

/// One object write of a restore, in the order Cinder applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreWrite {
    /// Position of the backup in the chain (0 = the full backup).
    pub link: usize,
    /// Object key.
    pub object_name: String,
    /// Volume offset and uncompressed length.
    pub extent: Extent,
    /// How the object body is stored.
    pub compression: Algorithm,
    /// Whether Cinder skips all-zero [`SPARSE_PIECE_BYTES`] pieces of this object (only for the
    /// full backup of a chain restored into a new volume, which reads as zeros).
    pub skip_zero_pieces: bool,
}

/// `_restore_v1`'s consistency check: the keys under `prefix`, less `<prefix>_metadata` and
/// `<prefix>_sha256file`, must be exactly the metadata's object names (as sorted lists, so a
/// duplicate counts). Keys in `listing` not starting with `prefix` are ignored.
///
/// # Errors
/// [`CinderError::ObjectListMismatch`] naming up to ten missing and ten unexpected keys.
pub fn check_listing(
    prefix: &str,
    metadata: &Metadata,
    listing: &[String],
) -> Result<(), CinderError> {
    let pruned = [metadata_name(prefix), sha256file_name(prefix)];
    let mut actual: Vec<&str> = listing
        .iter()
        .map(String::as_str)
        .filter(|k| k.starts_with(prefix) && !pruned.iter().any(|p| p == k))
        .collect();
    let mut expected: Vec<&str> = metadata.objects.iter().map(|o| o.name.as_str()).collect();
    actual.sort_unstable();
    expected.sort_unstable();
    if actual == expected {
        return Ok(());
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for k in &expected {
        *counts.entry(k).or_default() += 1;
    }
    for k in &actual {
        *counts.entry(k).or_default() -= 1;
    }
    let pick = |positive: bool| -> Vec<String> {
        counts
            .iter()
            .filter(|&(_, &c)| if positive { c > 0 } else { c < 0 })
            .take(10)
            .map(|(k, _)| (*k).to_owned())
            .collect()
    };
    Err(CinderError::ObjectListMismatch {
        prefix: prefix.to_owned(),
        missing: pick(true),
        unexpected: pick(false),
    })
}

/// The writes restoring `chain` (full backup first, the requested backup last), in Cinder's order:
/// backup by backup, each backup's objects in metadata order; later writes overwrite earlier ones.
///
/// Checks, before any data is read, what Cinder checks: the requested backup's `version` has a
/// restore function (Cinder looks only at the requested backup's version and restores every
/// link with that function), each link's object listing ([`check_listing`]), and every object's
/// compression name. ferry checks one more thing Cinder gets from its database: when a
/// metadata `parent_id` is present it must name the previous link (and the base must have none).
///
/// # Errors
/// [`CinderError::EmptyChain`], [`CinderError::UnsupportedVersion`],
/// [`CinderError::ChainBroken`], [`CinderError::ObjectListMismatch`],
/// [`CinderError::UnsupportedCompression`].
pub fn plan_restore(
    chain: &[ChainLink<'_>],
    volume_is_new: bool,
) -> Result<Vec<RestoreWrite>, CinderError> {
    let requested = chain.last().ok_or(CinderError::EmptyChain)?;
    if requested.metadata.version != DRIVER_VERSION {
        return Err(CinderError::UnsupportedVersion {
            backup_id: requested.metadata.backup_id.clone(),
            version: requested.metadata.version.clone(),
        });
    }
    let mut writes = Vec::new();
    for (index, link) in chain.iter().enumerate() {
        let expected = index.checked_sub(1).map(|p| chain[p].metadata.backup_id.clone());
        let found = link.metadata.parent_id.clone();
        let linked = match (&expected, &found) {
            (None, found) => found.is_none(),
            (Some(_), None) => true,
            (Some(e), Some(f)) => e == f,
        };
        if !linked {
            return Err(CinderError::ChainBroken { index, expected, found });
        }
        check_listing(link.prefix, link.metadata, link.listing)?;
        for object in &link.metadata.objects {
            writes.push(RestoreWrite {
                link: index,
                object_name: object.name.clone(),
                extent: Extent { offset: object.offset, length: object.length },
                compression: object.algorithm()?,
                skip_zero_pieces: volume_is_new && index == 0,
            });
        }
    }
    Ok(writes)
}

/// The bytes a target volume needs: the end of the furthest write.
pub fn required_len(writes: &[RestoreWrite]) -> u64 {
    writes.iter().map(|w| w.extent.end()).max().unwrap_or(0)
}

/// For each write, the sub-ranges no later write overwrites, so the writes can be applied in any
/// order (in parallel) with the result of applying them in order. Ranges are sorted; a write
/// that is entirely overwritten gets none and need not be downloaded.
pub fn visible_ranges(writes: &[RestoreWrite]) -> Vec<Vec<Extent>> {
    // Covered intervals of the later writes seen so far: start -> end, disjoint, merged.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = vec![Vec::new(); writes.len()];
    for (i, w) in writes.iter().enumerate().rev() {
        let (start, end) = (w.extent.offset, w.extent.end());
        if start == end {
            continue;
        }
        let mut visible = Vec::new();
        let mut cursor = start;
        let first = covered.range(..=start).next_back().map(|(&s, _)| s).unwrap_or(start);
        for (&s, &e) in covered.range(first..end) {
            if e <= cursor {
                continue;
            }
            if s > cursor {
                visible.push(Extent { offset: cursor, length: s - cursor });
            }
            cursor = cursor.max(e);
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            visible.push(Extent { offset: cursor, length: end - cursor });
        }
        out[i] = visible;
        // Merge [start, end) into covered.
        let mut new_start = start;
        let mut new_end = end;
        let touching: Vec<u64> = covered
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, _)| s)
            .collect();
        for s in touching {
            if let Some(e) = covered.remove(&s) {
                new_start = new_start.min(s);
                new_end = new_end.max(e);
            }
        }
        let _ = covered.insert(new_start, new_end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cinder::layout::metadata::ObjectEntry;

    fn meta(id: &str, parent: Option<&str>, objects: &[(&str, u64, u64, &str)]) -> Metadata {
        let mut m = Metadata::new(id, "vol", "2025-03-01 12:00:05+00:00");
        m.parent_id = parent.map(str::to_owned);
        m.objects = objects
            .iter()
            .map(|&(n, offset, length, c)| ObjectEntry {
                name: n.to_owned(),
                offset,
                length,
                compression: c.to_owned(),
                md5: String::new(),
            })
            .collect();
        m
    }

    fn listing(prefix: &str, names: &[&str]) -> Vec<String> {
        let mut l: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        l.push(metadata_name(prefix));
        l.push(sha256file_name(prefix));
        l
    }

    /// A two-link chain plans base objects first with sparse skipping only on the base, and
    /// accepts every alias and case of compression names.
    #[test]
    fn chain_order_and_flags() {
        let base = meta("b0", None, &[("p0-00001", 0, 100, "ZLIB"), ("p0-00002", 100, 50, "none")]);
        let inc = meta("b1", Some("b0"), &[("p1-00001", 20, 10, "bzip2")]);
        let l0 = listing("p0", &["p0-00002", "p0-00001"]);
        let l1 = listing("p1", &["p1-00001"]);
        let chain = [
            ChainLink { prefix: "p0", metadata: &base, listing: &l0 },
            ChainLink { prefix: "p1", metadata: &inc, listing: &l1 },
        ];
        let w = plan_restore(&chain, true).unwrap();
        let names: Vec<_> = w.iter().map(|w| w.object_name.as_str()).collect();
        assert_eq!(names, ["p0-00001", "p0-00002", "p1-00001"]);
        assert_eq!(w[0].compression, Algorithm::Zlib);
        assert_eq!(w[2].compression, Algorithm::Bzip2);
        assert!(w[0].skip_zero_pieces && w[1].skip_zero_pieces && !w[2].skip_zero_pieces);
        assert!(plan_restore(&chain, false).unwrap().iter().all(|w| !w.skip_zero_pieces));
        assert_eq!(required_len(&w), 150);
        let v = visible_ranges(&w);
        assert_eq!(v[0], [Extent { offset: 0, length: 20 }, Extent { offset: 30, length: 70 }]);
        assert_eq!(v[1], [Extent { offset: 100, length: 50 }]);
        assert_eq!(v[2], [Extent { offset: 20, length: 10 }]);
    }

    /// Missing objects, extra objects and duplicates are refused as Cinder refuses them; keys of
    /// other prefixes are ignored.
    #[test]
    fn listing_checks() {
        let m = meta("b0", None, &[("p-00001", 0, 1, "none"), ("p-00002", 1, 1, "none")]);
        let ok = listing("p", &["p-00001", "p-00002"]);
        check_listing("p", &m, &ok).unwrap();
        let mut other = ok.clone();
        other.push("q-00001".into());
        check_listing("p", &m, &other).unwrap();
        let missing = listing("p", &["p-00001"]);
        match check_listing("p", &m, &missing).unwrap_err() {
            CinderError::ObjectListMismatch { missing, unexpected, .. } => {
                assert_eq!(missing, ["p-00002"]);
                assert!(unexpected.is_empty());
            }
            e => panic!("{e}"),
        }
        let extra = listing("p", &["p-00001", "p-00002", "p-00003"]);
        match check_listing("p", &m, &extra).unwrap_err() {
            CinderError::ObjectListMismatch { unexpected, .. } => {
                assert_eq!(unexpected, ["p-00003"])
            }
            e => panic!("{e}"),
        }
    }

    /// Versions, broken chains, empty chains and unknown compressions are refused up front.
    #[test]
    fn refusals() {
        let l = listing("p", &[]);
        let mut m = meta("b0", None, &[]);
        m.version = "2.0.0".into();
        let chain = [ChainLink { prefix: "p", metadata: &m, listing: &l }];
        assert!(matches!(plan_restore(&chain, false), Err(CinderError::UnsupportedVersion { .. })));
        assert!(matches!(plan_restore(&[], false), Err(CinderError::EmptyChain)));
        let base = meta("b0", None, &[]);
        let inc = meta("b1", Some("zz"), &[]);
        let chain = [
            ChainLink { prefix: "p", metadata: &base, listing: &l },
            ChainLink { prefix: "p", metadata: &inc, listing: &l },
        ];
        assert!(matches!(
            plan_restore(&chain, false),
            Err(CinderError::ChainBroken { index: 1, .. })
        ));
        let bad = meta("b0", None, &[("p-00001", 0, 1, "lz4")]);
        let l = listing("p", &["p-00001"]);
        let chain = [ChainLink { prefix: "p", metadata: &bad, listing: &l }];
        assert!(matches!(
            plan_restore(&chain, false),
            Err(CinderError::UnsupportedCompression { .. })
        ));
    }

    /// visible_ranges agrees with painting the writes in order on a small random volume.
    #[test]
    fn visible_ranges_match_painting() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for _ in 0..200 {
            let n = 1 + next(12) as usize;
            let writes: Vec<RestoreWrite> = (0..n)
                .map(|i| RestoreWrite {
                    link: 0,
                    object_name: i.to_string(),
                    extent: Extent { offset: next(100), length: next(40) },
                    compression: Algorithm::None,
                    skip_zero_pieces: false,
                })
                .collect();
            let mut painted = [usize::MAX; 140];
            for (i, w) in writes.iter().enumerate() {
                for b in w.extent.offset..w.extent.end() {
                    painted[b as usize] = i;
                }
            }
            let mut from_visible = [usize::MAX; 140];
            for (i, ranges) in visible_ranges(&writes).iter().enumerate() {
                for r in ranges {
                    for b in r.offset..r.end() {
                        assert_eq!(from_visible[b as usize], usize::MAX, "overlap");
                        from_visible[b as usize] = i;
                    }
                }
            }
            assert_eq!(painted, from_visible);
        }
    }
}
