//! The consolidated index: many packs' index entries in one immutable object
//! `index/merged/<32 hex>`, written by `ferry prune` so that a backup starts by reading a few
//! large objects instead of one per pack. Pure: bytes in, verified values out.
//!
//! Payload (inside the envelope, kind 5, zstd), little-endian:
//! `u32 pack_count`, `u32 supersedes_count`, `supersedes_count × 16` bytes of merged-index ids
//! this one replaces, then per pack `16 id, u64 pack_size_bytes, u32 entry_count`, then every
//! pack's entries in pack order, each `32 hash, u64 offset, u32 stored_bytes, u32 raw_bytes`.
//! Binary, not JSON: a chunk costs 48 bytes here against about 150 as JSON hex.

use super::{ChunkHash, FormatError, IndexEntry, PackId, PackIndex};

/// Prefix of consolidated indexes, inside `index/` so that one listing gives both kinds (a
/// build that predates them ignores these keys: they name no pack).
pub const MERGED_PREFIX: &str = "index/merged/";
/// Packs per consolidated index at most (about 25 MiB at 32 chunks per pack).
pub const MERGED_PACKS_MAX: usize = 16_384;
const PACK_BYTES: usize = 16 + 8 + 4;
const ENTRY_BYTES: usize = 32 + 8 + 4 + 4;

/// A consolidated index: the per-pack indexes of `packs`, copied verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedIndex {
    /// Consolidated indexes this one replaces (every pack of theirs that still existed when it
    /// was written is in `packs`, or in another consolidated index).
    pub supersedes: Vec<PackId>,
    /// The packs, sorted by id and distinct, each with its entries in offset order.
    pub packs: Vec<PackIndex>,
}

/// Key of the consolidated index named `id`.
pub fn merged_key(id: PackId) -> String {
    format!("{MERGED_PREFIX}{}", id.to_hex())
}

/// The id a consolidated index key names (`None` for any other key).
pub fn merged_from_key(key: &str) -> Option<PackId> {
    PackId::from_hex(key.strip_prefix(MERGED_PREFIX)?)
}

impl MergedIndex {
    /// The payload bytes (wrap them with `encode_object(ObjectKind::MergedIndex, …)`).
    ///
    /// # Panics
    /// When the packs are not sorted and distinct or more than `MERGED_PACKS_MAX`: a writer's
    /// bug.
    pub fn to_bytes(&self) -> Vec<u8> {
        assert!(self.packs.len() <= MERGED_PACKS_MAX, "too many packs in one merged index");
        assert!(self.packs.windows(2).all(|w| w[0].pack < w[1].pack), "packs sorted, distinct");
        let entries: usize = self.packs.iter().map(|pack| pack.entries.len()).sum();
        let mut out = Vec::with_capacity(
            8 + 16 * self.supersedes.len() + PACK_BYTES * self.packs.len() + ENTRY_BYTES * entries,
        );
        out.extend_from_slice(&u32::try_from(self.packs.len()).expect("small").to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.supersedes.len()).expect("small").to_le_bytes());
        for id in &self.supersedes {
            out.extend_from_slice(&id.0);
        }
        for pack in &self.packs {
            out.extend_from_slice(&pack.pack.0);
            out.extend_from_slice(&pack.pack_size_bytes.to_le_bytes());
            let count = u32::try_from(pack.entries.len()).expect("entries per pack fit u32");
            out.extend_from_slice(&count.to_le_bytes());
        }
        for pack in &self.packs {
            for entry in &pack.entries {
                out.extend_from_slice(&entry.hash.0);
                out.extend_from_slice(&entry.offset.to_le_bytes());
                out.extend_from_slice(&entry.stored_bytes.to_le_bytes());
                out.extend_from_slice(&entry.raw_bytes.to_le_bytes());
            }
        }
        out
    }

    /// Parses and checks a payload: exact length, packs sorted and distinct, each pack's
    /// entries in offset order and inside the pack.
    ///
    /// # Errors
    /// `FormatError::Truncated` or `Corrupt`.
    pub fn from_bytes(what: &str, bytes: &[u8]) -> Result<MergedIndex, FormatError> {
        let corrupt = |detail: String| FormatError::Corrupt { what: what.to_string(), detail };
        let mut reader = Reader { bytes, position: 0, what };
        let pack_count = reader.u32()? as usize;
        let supersedes_count = reader.u32()? as usize;
        let mut supersedes = Vec::with_capacity(supersedes_count.min(bytes.len() / 16));
        for _ in 0..supersedes_count {
            supersedes.push(PackId(reader.array()?));
        }
        if pack_count > MERGED_PACKS_MAX {
            return Err(corrupt(format!("{pack_count} packs, at most {MERGED_PACKS_MAX}")));
        }
        let mut packs = Vec::with_capacity(pack_count);
        let mut counts = Vec::with_capacity(pack_count);
        for _ in 0..pack_count {
            let pack = PackId(reader.array()?);
            let pack_size_bytes = reader.u64()?;
            counts.push(reader.u32()? as usize);
            packs.push(PackIndex { pack, pack_size_bytes, entries: Vec::new() });
        }
        for (pack, count) in packs.iter_mut().zip(counts) {
            if count > bytes.len() / ENTRY_BYTES {
                return Err(corrupt(format!("pack {} claims {count} entries", pack.pack)));
            }
            pack.entries.reserve_exact(count);
            let mut end = 0;
            for _ in 0..count {
                let entry = IndexEntry {
                    hash: ChunkHash(reader.array()?),
                    offset: reader.u64()?,
                    stored_bytes: reader.u32()?,
                    raw_bytes: reader.u32()?,
                };
                if entry.offset < end || entry.offset + entry.record_bytes() > pack.pack_size_bytes
                {
                    return Err(corrupt(format!(
                        "pack {}: entry at {} overlaps or runs past the pack",
                        pack.pack, entry.offset
                    )));
                }
                end = entry.offset + entry.record_bytes();
                pack.entries.push(entry);
            }
        }
        if reader.position != bytes.len() {
            return Err(corrupt(format!(
                "{} bytes after the last entry",
                bytes.len() - reader.position
            )));
        }
        if packs.windows(2).any(|w| w[0].pack >= w[1].pack) {
            return Err(corrupt("packs are not sorted and distinct".into()));
        }
        Ok(MergedIndex { supersedes, packs })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    what: &'a str,
}

impl Reader<'_> {
    fn take(&mut self, count: usize) -> Result<&[u8], FormatError> {
        let end = self.position + count;
        if end > self.bytes.len() {
            return Err(FormatError::Truncated {
                what: self.what.to_string(),
                detail: format!("{} bytes, needs at least {end}", self.bytes.len()),
            });
        }
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MergedIndex {
        let entry = |n: u8, offset: u64| IndexEntry {
            hash: ChunkHash([n; 32]),
            offset,
            stored_bytes: 100,
            raw_bytes: 200,
        };
        MergedIndex {
            supersedes: vec![PackId([9; 16])],
            packs: vec![
                PackIndex {
                    pack: PackId([1; 16]),
                    pack_size_bytes: 328,
                    entries: vec![entry(1, 0), entry(2, 164)],
                },
                PackIndex {
                    pack: PackId([2; 16]),
                    pack_size_bytes: 164,
                    entries: vec![entry(3, 0)],
                },
            ],
        }
    }

    // Round trip, and every truncation or overlapping entry is refused.
    #[test]
    fn round_trips_and_refuses_damage() {
        let merged = sample();
        let bytes = merged.to_bytes();
        assert_eq!(MergedIndex::from_bytes("m", &bytes).unwrap(), merged);
        for cut in 0..bytes.len() {
            assert!(MergedIndex::from_bytes("m", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut overlapping = merged.clone();
        overlapping.packs[0].entries[1].offset = 10;
        assert!(MergedIndex::from_bytes("m", &overlapping.to_bytes()).is_err());
        assert_eq!(merged_from_key(&merged_key(PackId([3; 16]))), Some(PackId([3; 16])));
        assert_eq!(super::super::index_pack_from_key(&merged_key(PackId([3; 16]))), None);
    }
}
