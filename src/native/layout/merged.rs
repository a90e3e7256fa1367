//! The consolidated index: many packs' index entries in one immutable object
//! `index/merged/<32 hex>`, written by `ferry prune` so that a backup starts by reading a few
//! objects instead of one per pack. Pure: bytes in, verified values out.
//!
//! Two layouts (FORMAT.md, "Consolidated index"). Version 2, written now: a 16-byte frame
//! (magic, length of the head), the head (an envelope of kind 5: the packs and where each of
//! `MERGED_BUCKETS` hash buckets lies), then the buckets (envelopes of kind 7, entries sorted by
//! hash), so that a reader can fetch the head and then only the buckets of the hashes it looks
//! up. Version 1, still read: one envelope of kind 5 with every pack's entries in pack order.
//! Binary, not JSON: a chunk costs 52 bytes here against about 150 as JSON hex.

use twox_hash::XxHash3_128;

use super::{
    ChunkHash, Crypt, FormatError, IndexEntry, ObjectKind, PackId, PackIndex, decode_object,
    encode_object,
};

/// Prefix of consolidated indexes, inside `index/` so that one listing gives both kinds (a
/// build that predates them ignores these keys: they name no pack).
pub const MERGED_PREFIX: &str = "index/merged/";
/// Packs per consolidated index at most (about 27 MiB at 32 chunks per pack).
pub const MERGED_PACKS_MAX: usize = 16_384;
/// Hash buckets of a version-2 consolidated index: bucket `b` holds the entries whose hash
/// starts with byte `b`.
pub const MERGED_BUCKETS: usize = 256;
/// First bytes of a version-2 consolidated index.
const MAGIC_V2: &[u8; 8] = b"FERRYMX2";
/// The frame: magic (8) and the head's length in bytes (8).
pub const FRAME_BYTES: u64 = 16;
const PACK_BYTES: usize = 16 + 8 + 4;
const BUCKET_REF_BYTES: usize = 4 + 4 + 16;
const V1_ENTRY_BYTES: usize = 32 + 8 + 4 + 4;
const BUCKET_ENTRY_BYTES: usize = 32 + 4 + 8 + 4 + 4;

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

/// A pack of a consolidated index's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadPack {
    /// The pack.
    pub pack: PackId,
    /// Its size, as its index says.
    pub pack_size_bytes: u64,
    /// Its entries in the buckets.
    pub entry_count: u32,
}

/// Where one bucket of a version-2 consolidated index lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BucketRef {
    offset: u64,
    stored_bytes: u32,
    entry_count: u32,
    checksum: u128,
}

/// The head of a version-2 consolidated index: its packs and where its buckets lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedHead {
    /// As `MergedIndex::supersedes`.
    pub supersedes: Vec<PackId>,
    /// The packs, sorted by id and distinct; an entry names its pack by position here.
    pub packs: Vec<HeadPack>,
    buckets: Vec<BucketRef>,
}

/// An entry of a bucket: a chunk, the position of its pack in the head, and its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketEntry {
    /// Position of the pack in `MergedHead::packs`.
    pub pack: u32,
    /// The record.
    pub entry: IndexEntry,
}

/// What the first bytes of a consolidated index show.
#[derive(Debug)]
pub enum HeadRead {
    /// A version-2 head, verified.
    Head(MergedHead),
    /// The head is longer: read this many bytes from the start and ask again.
    NeedBytes(u64),
    /// A version-1 object: it has no head, read it whole.
    Version1,
}

impl MergedIndex {
    /// The whole object (version 2) under `crypt`.
    ///
    /// # Panics
    /// When the packs are not sorted and distinct or more than `MERGED_PACKS_MAX`: a writer's
    /// bug.
    pub fn encode(&self, crypt: &Crypt) -> Vec<u8> {
        assert!(self.packs.len() <= MERGED_PACKS_MAX, "too many packs in one merged index");
        assert!(self.packs.windows(2).all(|w| w[0].pack < w[1].pack), "packs sorted, distinct");
        let mut buckets: Vec<Vec<(ChunkHash, u32, IndexEntry)>> = vec![Vec::new(); MERGED_BUCKETS];
        for (ordinal, pack) in self.packs.iter().enumerate() {
            let ordinal = u32::try_from(ordinal).expect("at most MERGED_PACKS_MAX");
            for entry in &pack.entries {
                buckets[usize::from(entry.hash.0[0])].push((entry.hash, ordinal, *entry));
            }
        }
        let mut encoded_buckets = Vec::with_capacity(MERGED_BUCKETS);
        for bucket in &mut buckets {
            bucket.sort_unstable_by_key(|entry| (entry.0, entry.1));
            let mut payload = Vec::with_capacity(bucket.len() * BUCKET_ENTRY_BYTES);
            for (hash, ordinal, entry) in bucket.iter() {
                payload.extend_from_slice(&hash.0);
                payload.extend_from_slice(&ordinal.to_le_bytes());
                payload.extend_from_slice(&entry.offset.to_le_bytes());
                payload.extend_from_slice(&entry.stored_bytes.to_le_bytes());
                payload.extend_from_slice(&entry.raw_bytes.to_le_bytes());
            }
            encoded_buckets.push(encode_object(crypt, ObjectKind::MergedBucket, &payload));
        }
        let mut head = Vec::with_capacity(
            12 + 16 * self.supersedes.len()
                + PACK_BYTES * self.packs.len()
                + BUCKET_REF_BYTES * MERGED_BUCKETS,
        );
        head.extend_from_slice(&u32::try_from(self.packs.len()).expect("small").to_le_bytes());
        head.extend_from_slice(&u32::try_from(self.supersedes.len()).expect("small").to_le_bytes());
        head.extend_from_slice(&u32::try_from(MERGED_BUCKETS).expect("small").to_le_bytes());
        for id in &self.supersedes {
            head.extend_from_slice(&id.0);
        }
        for pack in &self.packs {
            head.extend_from_slice(&pack.pack.0);
            head.extend_from_slice(&pack.pack_size_bytes.to_le_bytes());
            let count = u32::try_from(pack.entries.len()).expect("entries per pack fit u32");
            head.extend_from_slice(&count.to_le_bytes());
        }
        for (bucket, encoded) in buckets.iter().zip(&encoded_buckets) {
            let count = u32::try_from(bucket.len()).expect("entries fit u32");
            head.extend_from_slice(&count.to_le_bytes());
            let stored = u32::try_from(encoded.len()).expect("a bucket is below 4 GiB");
            head.extend_from_slice(&stored.to_le_bytes());
            head.extend_from_slice(&XxHash3_128::oneshot(encoded).to_le_bytes());
        }
        let head = encode_object(crypt, ObjectKind::MergedIndex, &head);
        let total: usize = encoded_buckets.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(FRAME_BYTES as usize + head.len() + total);
        out.extend_from_slice(MAGIC_V2);
        out.extend_from_slice(&(head.len() as u64).to_le_bytes());
        out.extend_from_slice(&head);
        for encoded in encoded_buckets {
            out.extend_from_slice(&encoded);
        }
        out
    }

    /// Reads and checks a whole consolidated index of either version: every bucket in place
    /// and verified, each pack's entries as many as the head says, in offset order and inside
    /// the pack.
    ///
    /// # Errors
    /// `FormatError` for anything that does not verify.
    pub fn decode(crypt: &Crypt, what: &str, bytes: &[u8]) -> Result<MergedIndex, FormatError> {
        let head = match MergedHead::decode(crypt, what, bytes)? {
            HeadRead::Head(head) => head,
            HeadRead::Version1 => {
                let payload = decode_object(crypt, ObjectKind::MergedIndex, what, bytes)?;
                return MergedIndex::from_v1_bytes(what, &payload);
            }
            HeadRead::NeedBytes(needed) => {
                return Err(FormatError::Truncated {
                    what: what.to_string(),
                    detail: format!("{} bytes, the head needs {needed}", bytes.len()),
                });
            }
        };
        let end = head.buckets.last().map_or(0, |last| last.offset + u64::from(last.stored_bytes));
        if end != bytes.len() as u64 {
            return Err(corrupt(what, format!("{} bytes, the head says {end}", bytes.len())));
        }
        let mut packs: Vec<PackIndex> = head
            .packs
            .iter()
            .map(|pack| PackIndex {
                pack: pack.pack,
                pack_size_bytes: pack.pack_size_bytes,
                entries: Vec::with_capacity(pack.entry_count as usize),
            })
            .collect();
        for bucket in 0..head.buckets.len() {
            let (offset, length) = head.bucket_range(bucket);
            let range = usize::try_from(offset).expect("in memory")
                ..usize::try_from(offset + length).expect("in memory");
            for found in head.decode_bucket(crypt, what, bucket, &bytes[range])? {
                packs[found.pack as usize].entries.push(found.entry);
            }
        }
        for (pack, declared) in packs.iter_mut().zip(&head.packs) {
            if pack.entries.len() != declared.entry_count as usize {
                return Err(corrupt(
                    what,
                    format!(
                        "pack {} has {} entries in the buckets, the head says {}",
                        pack.pack,
                        pack.entries.len(),
                        declared.entry_count
                    ),
                ));
            }
            pack.entries.sort_unstable_by_key(|entry| entry.offset);
            check_offsets(what, pack)?;
        }
        Ok(MergedIndex { supersedes: head.supersedes, packs })
    }

    /// Parses and checks a version-1 payload: exact length, packs sorted and distinct, each
    /// pack's entries in offset order and inside the pack.
    ///
    /// # Errors
    /// `FormatError::Truncated` or `Corrupt`.
    pub fn from_v1_bytes(what: &str, bytes: &[u8]) -> Result<MergedIndex, FormatError> {
        let mut reader = Reader { bytes, position: 0, what };
        let pack_count = reader.u32()? as usize;
        let supersedes_count = reader.u32()? as usize;
        let mut supersedes = Vec::with_capacity(supersedes_count.min(bytes.len() / 16));
        for _ in 0..supersedes_count {
            supersedes.push(PackId(reader.array()?));
        }
        if pack_count > MERGED_PACKS_MAX {
            return Err(corrupt(what, format!("{pack_count} packs, at most {MERGED_PACKS_MAX}")));
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
            if count > bytes.len() / V1_ENTRY_BYTES {
                return Err(corrupt(what, format!("pack {} claims {count} entries", pack.pack)));
            }
            pack.entries.reserve_exact(count);
            for _ in 0..count {
                pack.entries.push(IndexEntry {
                    hash: ChunkHash(reader.array()?),
                    offset: reader.u64()?,
                    stored_bytes: reader.u32()?,
                    raw_bytes: reader.u32()?,
                });
            }
            check_offsets(what, pack)?;
        }
        if reader.position != bytes.len() {
            return Err(corrupt(
                what,
                format!("{} bytes after the last entry", bytes.len() - reader.position),
            ));
        }
        if packs.windows(2).any(|w| w[0].pack >= w[1].pack) {
            return Err(corrupt(what, "packs are not sorted and distinct".into()));
        }
        Ok(MergedIndex { supersedes, packs })
    }

    /// The version-1 payload (wrapped with `encode_object(ObjectKind::MergedIndex, …)`), which
    /// this build reads but no longer writes; kept for the tests of that reading.
    #[cfg(test)]
    pub fn to_v1_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(self.packs.len()).expect("small").to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.supersedes.len()).expect("small").to_le_bytes());
        for id in &self.supersedes {
            out.extend_from_slice(&id.0);
        }
        for pack in &self.packs {
            out.extend_from_slice(&pack.pack.0);
            out.extend_from_slice(&pack.pack_size_bytes.to_le_bytes());
            out.extend_from_slice(&(pack.entries.len() as u32).to_le_bytes());
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
}

fn corrupt(what: &str, detail: String) -> FormatError {
    FormatError::Corrupt { what: what.to_string(), detail }
}

/// A pack's entries are in offset order, do not overlap and lie inside the pack.
fn check_offsets(what: &str, pack: &PackIndex) -> Result<(), FormatError> {
    let mut end = 0;
    for entry in &pack.entries {
        if entry.offset < end || entry.offset + entry.record_bytes() > pack.pack_size_bytes {
            return Err(corrupt(
                what,
                format!(
                    "pack {}: entry at {} overlaps or runs past the pack",
                    pack.pack, entry.offset
                ),
            ));
        }
        end = entry.offset + entry.record_bytes();
    }
    Ok(())
}

impl MergedHead {
    /// Reads the head from the first bytes of a consolidated index (`prefix`, at least
    /// `FRAME_BYTES` of them or the whole object), verifying it.
    ///
    /// # Errors
    /// `FormatError` when the frame or the head does not verify.
    pub fn decode(crypt: &Crypt, what: &str, prefix: &[u8]) -> Result<HeadRead, FormatError> {
        if prefix.len() < MAGIC_V2.len() || &prefix[..MAGIC_V2.len()] != MAGIC_V2 {
            return Ok(HeadRead::Version1);
        }
        if prefix.len() < FRAME_BYTES as usize {
            return Ok(HeadRead::NeedBytes(FRAME_BYTES));
        }
        let head_bytes = u64::from_le_bytes(prefix[8..16].try_into().expect("8 bytes"));
        // A head of MERGED_PACKS_MAX packs is under 1 MiB; a wild length must not allocate.
        if head_bytes > 64 << 20 {
            return Err(corrupt(what, format!("head of {head_bytes} bytes")));
        }
        let end = FRAME_BYTES + head_bytes;
        if (prefix.len() as u64) < end {
            return Ok(HeadRead::NeedBytes(end));
        }
        let payload = decode_object(
            crypt,
            ObjectKind::MergedIndex,
            what,
            &prefix[FRAME_BYTES as usize..usize::try_from(end).expect("checked above")],
        )?;
        let mut reader = Reader { bytes: &payload, position: 0, what };
        let pack_count = reader.u32()? as usize;
        let supersedes_count = reader.u32()? as usize;
        let bucket_count = reader.u32()? as usize;
        if pack_count > MERGED_PACKS_MAX || bucket_count != MERGED_BUCKETS {
            return Err(corrupt(what, format!("{pack_count} packs in {bucket_count} buckets")));
        }
        let mut supersedes = Vec::with_capacity(supersedes_count.min(payload.len() / 16));
        for _ in 0..supersedes_count {
            supersedes.push(PackId(reader.array()?));
        }
        let mut packs = Vec::with_capacity(pack_count);
        for _ in 0..pack_count {
            packs.push(HeadPack {
                pack: PackId(reader.array()?),
                pack_size_bytes: reader.u64()?,
                entry_count: reader.u32()?,
            });
        }
        if packs.windows(2).any(|w| w[0].pack >= w[1].pack) {
            return Err(corrupt(what, "packs are not sorted and distinct".into()));
        }
        let mut buckets = Vec::with_capacity(bucket_count);
        let mut offset = end;
        let mut entries: u64 = 0;
        for _ in 0..bucket_count {
            let entry_count = reader.u32()?;
            let stored_bytes = reader.u32()?;
            let checksum = u128::from_le_bytes(reader.array()?);
            buckets.push(BucketRef { offset, stored_bytes, entry_count, checksum });
            offset += u64::from(stored_bytes);
            entries += u64::from(entry_count);
        }
        if reader.position != payload.len() {
            return Err(corrupt(what, "bytes after the last bucket".into()));
        }
        let declared: u64 = packs.iter().map(|pack| u64::from(pack.entry_count)).sum();
        if declared != entries {
            return Err(corrupt(
                what,
                format!("{declared} entries in the packs, {entries} in the buckets"),
            ));
        }
        Ok(HeadRead::Head(MergedHead { supersedes, packs, buckets }))
    }

    /// Where bucket `bucket` lies in the object: (offset, length).
    ///
    /// # Panics
    /// When `bucket` is not below `MERGED_BUCKETS`.
    pub fn bucket_range(&self, bucket: usize) -> (u64, u64) {
        let found = &self.buckets[bucket];
        (found.offset, u64::from(found.stored_bytes))
    }

    /// Entries in bucket `bucket`.
    ///
    /// # Panics
    /// When `bucket` is not below `MERGED_BUCKETS`.
    pub fn bucket_entries(&self, bucket: usize) -> u32 {
        self.buckets[bucket].entry_count
    }

    /// Verifies and parses bucket `bucket` (`bytes`: exactly its range): the checksum the head
    /// records, its envelope, every hash in the bucket and in order, every pack position in
    /// the head and every record inside its pack.
    ///
    /// # Errors
    /// `FormatError` for anything that does not verify.
    ///
    /// # Panics
    /// When `bucket` is not below `MERGED_BUCKETS`.
    pub fn decode_bucket(
        &self,
        crypt: &Crypt,
        what: &str,
        bucket: usize,
        bytes: &[u8],
    ) -> Result<Vec<BucketEntry>, FormatError> {
        let found = &self.buckets[bucket];
        let what = format!("{what} bucket {bucket}");
        if bytes.len() as u64 != u64::from(found.stored_bytes)
            || XxHash3_128::oneshot(bytes) != found.checksum
        {
            return Err(corrupt(&what, "does not match the checksum in the head".into()));
        }
        let payload = decode_object(crypt, ObjectKind::MergedBucket, &what, bytes)?;
        if payload.len() != found.entry_count as usize * BUCKET_ENTRY_BYTES {
            return Err(corrupt(
                &what,
                format!("{} bytes for {} entries", payload.len(), found.entry_count),
            ));
        }
        let mut reader = Reader { bytes: &payload, position: 0, what: &what };
        let mut entries: Vec<BucketEntry> = Vec::with_capacity(found.entry_count as usize);
        for _ in 0..found.entry_count {
            let hash = ChunkHash(reader.array()?);
            let pack = reader.u32()?;
            let entry = IndexEntry {
                hash,
                offset: reader.u64()?,
                stored_bytes: reader.u32()?,
                raw_bytes: reader.u32()?,
            };
            let Some(head_pack) = self.packs.get(pack as usize) else {
                return Err(corrupt(&what, format!("names pack {pack} of {}", self.packs.len())));
            };
            if usize::from(hash.0[0]) != bucket {
                return Err(corrupt(&what, format!("holds chunk {hash}")));
            }
            if entries.last().is_some_and(|last| (last.entry.hash, last.pack) >= (hash, pack)) {
                return Err(corrupt(&what, "entries are not sorted and distinct".into()));
            }
            if entry.offset + entry.record_bytes() > head_pack.pack_size_bytes {
                return Err(corrupt(
                    &what,
                    format!("entry at {} runs past pack {}", entry.offset, head_pack.pack),
                ));
            }
            entries.push(BucketEntry { pack, entry });
        }
        Ok(entries)
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

    fn crypts() -> [Crypt; 2] {
        use super::super::crypt::{Cipher, MasterSecret, RepoKeys};
        let keys = RepoKeys::derive(
            Cipher::for_this_cpu(),
            MasterSecret([8; 32]),
            crate::native::fresh::random_nonce,
        );
        [Crypt::Plain, Crypt::Sealed(std::sync::Arc::new(keys))]
    }

    // Round trip of both versions, plain and sealed; every truncation, flipped byte and
    // overlapping entry is refused.
    #[test]
    fn round_trips_and_refuses_damage() {
        let merged = sample();
        for crypt in crypts() {
            let bytes = merged.encode(&crypt);
            assert_eq!(MergedIndex::decode(&crypt, "m", &bytes).unwrap(), merged);
            for cut in 0..bytes.len() {
                assert!(MergedIndex::decode(&crypt, "m", &bytes[..cut]).is_err(), "cut at {cut}");
            }
            for flip in 0..bytes.len() {
                let mut flipped = bytes.clone();
                flipped[flip] ^= 0x10;
                assert!(MergedIndex::decode(&crypt, "m", &flipped).is_err(), "flip at {flip}");
            }
            let v1 = encode_object(&crypt, ObjectKind::MergedIndex, &merged.to_v1_bytes());
            assert_eq!(MergedIndex::decode(&crypt, "m", &v1).unwrap(), merged);
            let mut overlapping = merged.clone();
            overlapping.packs[0].entries[1].offset = 10;
            assert!(MergedIndex::decode(&crypt, "m", &overlapping.encode(&crypt)).is_err());
            let v1 = encode_object(&crypt, ObjectKind::MergedIndex, &overlapping.to_v1_bytes());
            assert!(MergedIndex::decode(&crypt, "m", &v1).is_err());
        }
        assert_eq!(merged_from_key(&merged_key(PackId([3; 16]))), Some(PackId([3; 16])));
        assert_eq!(super::super::index_pack_from_key(&merged_key(PackId([3; 16]))), None);
    }

    // A reader that fetches the head then one bucket finds exactly the entries of that
    // bucket's hashes; a short prefix asks for the head's length; a bucket is refused in
    // another bucket's place.
    #[test]
    fn the_head_then_one_bucket_finds_the_chunks_of_that_bucket() {
        let merged = sample();
        for crypt in crypts() {
            let bytes = merged.encode(&crypt);
            let HeadRead::NeedBytes(needed) =
                MergedHead::decode(&crypt, "m", &bytes[..20]).unwrap()
            else {
                panic!("a short prefix is not a head");
            };
            let head = match MergedHead::decode(&crypt, "m", &bytes[..needed as usize]).unwrap() {
                HeadRead::Head(head) => head,
                other => panic!("{other:?}"),
            };
            assert_eq!(head.packs.len(), 2);
            assert_eq!(head.supersedes, merged.supersedes);
            let read = |bucket: usize| {
                let (offset, length) = head.bucket_range(bucket);
                head.decode_bucket(
                    &crypt,
                    "m",
                    bucket,
                    &bytes[offset as usize..][..length as usize],
                )
            };
            let found = read(2).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].pack, 0);
            assert_eq!(found[0].entry, merged.packs[0].entries[1]);
            assert!(read(7).unwrap().is_empty());
            let (offset, length) = head.bucket_range(3);
            let swapped = &bytes[offset as usize..][..length as usize];
            assert!(head.decode_bucket(&crypt, "m", 1, swapped).is_err());
            let v1 = encode_object(&crypt, ObjectKind::MergedIndex, &merged.to_v1_bytes());
            assert!(matches!(MergedHead::decode(&crypt, "m", &v1), Ok(HeadRead::Version1)));
        }
    }
}
