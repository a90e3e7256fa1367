//! The dedup view of a backup: which pack holds a chunk the backup is about to store, read
//! lazily so that a backup's start costs O(index objects) requests and bytes independent of
//! the repository's size.
//!
//! At start it lists the marks and `index/`, reads the head of every consolidated index
//! (its packs and where its 256 hash buckets lie) and the per-pack indexes no consolidated index
//! holds (those written since the last consolidation). A lookup of a chunk loads, once, the
//! bucket of its first byte from every consolidated index (one ranged read each, in parallel).
//! A pack a lookup would return is checked to exist with its indexed size once, at its first
//! use (FORMAT.md, B1-B2): a backup never lists every pack.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{EngineError, ErrorKind};
use crate::native::layout::merged::{self, HeadRead, MERGED_BUCKETS, MergedHead, MergedIndex};
use crate::native::layout::{ChunkHash, PackId, PackIndex};
use crate::native::repo::{Repository, lock, parallel_map};
use crate::store::{DatedObject, StoreError};

/// Heads (and small consolidated indexes, read whole) fetched at once.
const HEADS_IN_FLIGHT: usize = 4;
/// Buckets of one hash range fetched at once, one per consolidated index.
const BUCKETS_IN_FLIGHT: usize = 8;
/// Per-pack indexes fetched at once.
const INDEXES_IN_FLIGHT: usize = 8;
/// A consolidated index up to this size is read whole at start (one request instead of a
/// head now and up to 256 bucket reads later).
const READ_WHOLE_BYTES_MAX: u64 = 1 << 20;
/// A backup expected to look up at least this many chunks reads consolidated indexes whole at
/// start: it would load (nearly) every bucket anyway, and one read per index beats 256.
const READ_WHOLE_LOOKUPS: u64 = 2 * MERGED_BUCKETS as u64;
/// The first read of a head: enough for the head of a full consolidated index (16,384 packs
/// take about 470 KB), so that one request usually suffices.
const HEAD_FIRST_READ_BYTES: u64 = 1 << 20;

/// Bytes of memory per chunk of a loaded bucket: the 32-byte hash and a 4-byte pack ordinal.
pub const BYTES_PER_CHUNK: usize = std::mem::size_of::<(ChunkHash, u32)>();

/// What a backup may deduplicate against (`DedupView::load`).
#[derive(Debug)]
pub struct DedupView<'r> {
    /// Chunk to a pack that holds it and is usable, loaded as looked up.
    pub chunks: ChunkIndex<'r>,
    /// Damaged indexes or marks found at start, for warnings.
    pub problems: Vec<String>,
}

/// A pack the view knows.
#[derive(Debug, Clone, Copy)]
struct KnownPack {
    pack: PackId,
    size_bytes: u64,
    /// Known from its own index, not a consolidated one: its absence is worth a warning
    /// (a consolidated index's entries of swept packs are merely dead, FORMAT.md C4).
    own_index: bool,
}

/// A consolidated index whose buckets are read on demand.
#[derive(Debug)]
struct LazyIndex {
    key: String,
    head: MergedHead,
    /// Ordinal of its first pack in `ChunkIndex::packs`.
    first_pack: u32,
}

/// Which packs hold which chunks, loaded a hash bucket at a time; see the module comment.
/// Memory: `BYTES_PER_CHUNK` per chunk of the buckets loaded (a bucket is 1/256 of the
/// repository's chunks; a backup of more than about 2,000 distinct chunks loads them all),
/// plus 32 bytes per pack and the heads.
#[derive(Debug)]
pub struct ChunkIndex<'r> {
    repo: &'r Repository,
    packs: Vec<KnownPack>,
    lazy: Vec<LazyIndex>,
    /// Entries read at start (per-pack indexes, small or version-1 consolidated ones), by
    /// bucket; moved into `buckets` when their bucket loads.
    eager: Vec<Mutex<Vec<(ChunkHash, u32)>>>,
    /// Loaded buckets: every (hash, pack ordinal), sorted.
    buckets: Vec<OnceLock<Vec<(ChunkHash, u32)>>>,
    /// Packs never deduplicated into: condemned by a mark, or found gone by a revalidation.
    excluded: HashSet<PackId>,
    /// Whether each pack a lookup reached exists with its indexed size, by ordinal.
    exists: Mutex<HashMap<u32, Arc<OnceLock<bool>>>>,
    /// The first store error of a lazy read: the backup fails with it before committing.
    failure: Mutex<Option<EngineError>>,
    /// Damage found by lazy reads, for warnings.
    late_problems: Mutex<Vec<String>>,
    /// Packs known from their own index found missing.
    missing_own: AtomicUsize,
    /// Requests and bytes of lazy bucket reads.
    bucket_reads: AtomicU64,
    bucket_bytes: AtomicU64,
}

impl<'r> DedupView<'r> {
    /// The view of `repo` now: lists the marks, then `index/` (FORMAT.md B1), reads the heads
    /// of the consolidated indexes and the per-pack indexes none of them holds.
    ///
    /// # Errors
    /// Store errors (a damaged index or mark is reported in `problems`, not an error).
    pub fn load(repo: &'r Repository, lookups_expected: u64) -> Result<DedupView<'r>, EngineError> {
        let marks = repo.load_marks()?;
        let listing = repo.list_indexes()?;
        let mut problems: Vec<String> = marks
            .unreadable
            .into_iter()
            .map(|(key, detail)| format!("{key}: {detail} (its packs are kept; dedup continues)"))
            .collect();
        let read_whole = lookups_expected >= READ_WHOLE_LOOKUPS;
        let eager = Eager {
            packs: Mutex::new(Vec::new()),
            buckets: (0..MERGED_BUCKETS).map(|_| Mutex::new(Vec::new())).collect(),
        };
        // A damaged index is reported and skipped; a store error fails the backup (a retried
        // failure is not damage, and skipping would store its chunks again for nothing).
        let opened =
            parallel_map(&listing.merged, HEADS_IN_FLIGHT, |(_, object)| {
                match open_merged(repo, object, read_whole) {
                    Ok(Opened::Whole(merged)) => {
                        eager.add(&merged.packs, false);
                        Ok(Opened::Added(merged.packs.iter().map(|pack| pack.pack).collect()))
                    }
                    Ok(opened) => Ok(opened),
                    Err(error) if error.kind == ErrorKind::Integrity => Ok(Opened::Damaged(
                        format!("{} (its chunks are stored again)", error.message),
                    )),
                    Err(error) => Err(error),
                }
            })?;
        let mut added = HashSet::new();
        let mut heads = Vec::new();
        for ((_, object), opened) in listing.merged.iter().zip(opened) {
            match opened {
                Opened::Gone => {}
                Opened::Damaged(problem) => problems.push(problem),
                Opened::Whole(_) => unreachable!("added above"),
                Opened::Added(packs) => added.extend(packs),
                Opened::Head(head) => heads.push((object.key.clone(), head)),
            }
        }
        // A head's packs are sorted: a per-pack index is looked up in each (no set of every
        // pack is built).
        let covered = |pack: &PackId| {
            added.contains(pack)
                || heads.iter().any(|(_, head): &(String, MergedHead)| {
                    head.packs.binary_search_by_key(pack, |known| known.pack).is_ok()
                })
        };
        let uncovered: Vec<PackId> =
            listing.per_pack.keys().filter(|pack| !covered(pack)).copied().collect();
        let loaded =
            parallel_map(&uncovered, INDEXES_IN_FLIGHT, |pack| match repo.load_index(pack) {
                Ok(loaded) => {
                    eager.add(std::slice::from_ref(&loaded), true);
                    Ok(None)
                }
                Err(error) if error.kind == ErrorKind::Integrity => {
                    Ok(Some(format!("{} (its chunks are stored again)", error.message)))
                }
                Err(error) => Err(error),
            })?;
        problems.extend(loaded.into_iter().flatten());
        let mut packs = eager.packs.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut lazy = Vec::with_capacity(heads.len());
        for (key, head) in heads {
            let first_pack = u32::try_from(packs.len()).expect("under 2^32 packs");
            packs.extend(head.packs.iter().map(|pack| KnownPack {
                pack: pack.pack,
                size_bytes: pack.pack_size_bytes,
                own_index: false,
            }));
            lazy.push(LazyIndex { key, head, first_pack });
        }
        let chunks = ChunkIndex {
            repo,
            packs,
            lazy,
            eager: eager.buckets,
            buckets: (0..MERGED_BUCKETS).map(|_| OnceLock::new()).collect(),
            excluded: marks.packs,
            exists: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
            late_problems: Mutex::new(Vec::new()),
            missing_own: AtomicUsize::new(0),
            bucket_reads: AtomicU64::new(0),
            bucket_bytes: AtomicU64::new(0),
        };
        Ok(DedupView { chunks, problems })
    }
}

/// Entries read at start, gathered from parallel reads.
struct Eager {
    packs: Mutex<Vec<KnownPack>>,
    buckets: Vec<Mutex<Vec<(ChunkHash, u32)>>>,
}

impl Eager {
    /// Adds the entries of `packs` (from their own indexes when `own_index`).
    fn add(&self, packs: &[PackIndex], own_index: bool) {
        let mut by_bucket: Vec<Vec<(ChunkHash, u32)>> = vec![Vec::new(); MERGED_BUCKETS];
        {
            let mut known = lock(&self.packs);
            for pack in packs {
                let ordinal = u32::try_from(known.len()).expect("under 2^32 packs");
                known.push(KnownPack {
                    pack: pack.pack,
                    size_bytes: pack.pack_size_bytes,
                    own_index,
                });
                for entry in &pack.entries {
                    by_bucket[usize::from(entry.hash.0[0])].push((entry.hash, ordinal));
                }
            }
        }
        for (bucket, entries) in self.buckets.iter().zip(by_bucket) {
            lock(bucket).extend(entries);
        }
    }
}

/// A consolidated index as the view opens it.
enum Opened {
    /// Deleted since the listing (superseded; its successor was listed too).
    Gone,
    /// Damaged: reported, its chunks are not deduplicated into.
    Damaged(String),
    /// Read whole (small, or version 1, or all of it needed).
    Whole(MergedIndex),
    /// Read whole and added to the entries read at start: its packs.
    Added(Vec<PackId>),
    /// Version 2: its head; buckets later.
    Head(MergedHead),
}

/// Reads `object`, a consolidated index: whole when `read_whole`, small or of version 1, else
/// its head.
fn open_merged(
    repo: &Repository,
    object: &DatedObject,
    read_whole: bool,
) -> Result<Opened, EngineError> {
    let Some(id) = merged::merged_from_key(&object.key) else { return Ok(Opened::Gone) };
    let whole = |repo: &Repository| Ok(repo.load_merged(id)?.map_or(Opened::Gone, Opened::Whole));
    if read_whole || object.size_bytes <= READ_WHOLE_BYTES_MAX {
        return whole(repo);
    }
    let mut length = HEAD_FIRST_READ_BYTES.min(object.size_bytes);
    loop {
        let prefix = match repo.store.get_range(&object.key, 0, length) {
            Ok(prefix) => prefix,
            Err(StoreError::NotFound { .. }) => return Ok(Opened::Gone),
            Err(error) => return Err(error.into()),
        };
        match MergedHead::decode(&repo.crypt, &object.key, &prefix)? {
            HeadRead::Head(head) => return Ok(Opened::Head(head)),
            HeadRead::Version1 => return whole(repo),
            HeadRead::NeedBytes(needed) if needed > length && needed <= object.size_bytes => {
                length = needed;
            }
            HeadRead::NeedBytes(needed) => {
                return Err(EngineError::new(
                    ErrorKind::Integrity,
                    format!(
                        "{}: its head needs {needed} bytes of an object of {}",
                        object.key, object.size_bytes
                    ),
                ));
            }
        }
    }
}

impl ChunkIndex<'_> {
    /// A pack that holds `hash`, exists with its indexed size and is not excluded, if the
    /// repository has one. May read a bucket of every consolidated index and check a pack's
    /// existence (once each per backup); a store error doing so is kept for `take_failure` and the
    /// chunk treated as unknown (stored again).
    pub fn get(&self, hash: &ChunkHash) -> Option<PackId> {
        let bucket = self.bucket(usize::from(hash.0[0]));
        let start = bucket.partition_point(|(probe, _)| probe < hash);
        bucket[start..]
            .iter()
            .take_while(|(probe, _)| probe == hash)
            .map(|(_, ordinal)| *ordinal)
            .find(|ordinal| self.usable(*ordinal))
            .map(|ordinal| self.packs[ordinal as usize].pack)
    }

    /// Never deduplicates into `packs` again (a revalidation found them gone or condemned).
    pub fn exclude(&mut self, packs: impl IntoIterator<Item = PackId>) {
        self.excluded.extend(packs);
    }

    /// Packs condemned by the marks the view saw, or excluded since.
    pub fn excluded(&self) -> &HashSet<PackId> {
        &self.excluded
    }

    /// The first store error a lookup met, once: a backup fails with it rather than commit.
    pub fn take_failure(&self) -> Option<EngineError> {
        lock(&self.failure).take()
    }

    /// Warnings found since the last call: damaged buckets, packs indexed by their own index
    /// but missing.
    pub fn take_problems(&self) -> Vec<String> {
        let mut problems = std::mem::take(&mut *lock(&self.late_problems));
        let missing = self.missing_own.swap(0, Ordering::Relaxed);
        if missing > 0 {
            problems.push(format!(
                "{missing} indexed pack(s) are missing or not of their indexed size: chunks \
                 found only there are stored again"
            ));
        }
        problems
    }

    /// Bucket reads so far: (requests, bytes).
    pub fn bucket_reads(&self) -> (u64, u64) {
        (self.bucket_reads.load(Ordering::Relaxed), self.bucket_bytes.load(Ordering::Relaxed))
    }

    /// Bytes of memory the loaded buckets hold.
    pub fn memory_bytes(&self) -> usize {
        let loaded: usize = self.buckets.iter().filter_map(OnceLock::get).map(Vec::capacity).sum();
        let eager: usize = self.eager.iter().map(|bucket| lock(bucket).capacity()).sum();
        (loaded + eager) * BYTES_PER_CHUNK + self.packs.capacity() * size_of::<KnownPack>()
    }

    /// Bucket `bucket`, loading it on first use.
    fn bucket(&self, bucket: usize) -> &[(ChunkHash, u32)] {
        self.buckets[bucket].get_or_init(|| {
            let mut entries = std::mem::take(&mut *lock(&self.eager[bucket]));
            match self.read_bucket(bucket) {
                Ok(read) => entries.extend(read),
                Err(error) => {
                    let _ = lock(&self.failure).get_or_insert(error);
                }
            }
            entries.sort_unstable();
            entries.dedup();
            entries.shrink_to_fit();
            entries
        })
    }

    /// Bucket `bucket` of every consolidated index read lazily: one ranged read each. A
    /// damaged bucket is a warning (its chunks are stored again); an index deleted since the
    /// listing was superseded, its packs in an index listed with it.
    fn read_bucket(&self, bucket: usize) -> Result<Vec<(ChunkHash, u32)>, EngineError> {
        let lazy: Vec<&LazyIndex> =
            self.lazy.iter().filter(|lazy| lazy.head.bucket_entries(bucket) > 0).collect();
        if lazy.is_empty() {
            // No thread for nothing: the common case of a small or wholly read index.
            return Ok(Vec::new());
        }
        let read = parallel_map(&lazy, BUCKETS_IN_FLIGHT, |lazy| {
            let (offset, length) = lazy.head.bucket_range(bucket);
            let bytes = match self.repo.store.get_range(&lazy.key, offset, length) {
                Ok(bytes) => bytes,
                Err(StoreError::NotFound { .. }) => return Ok(Vec::new()),
                Err(error) => return Err(error.into()),
            };
            let _ = self.bucket_reads.fetch_add(1, Ordering::Relaxed);
            let _ = self.bucket_bytes.fetch_add(length, Ordering::Relaxed);
            match lazy.head.decode_bucket(&self.repo.crypt, &lazy.key, bucket, &bytes) {
                Ok(found) => Ok(found
                    .into_iter()
                    .map(|found| (found.entry.hash, lazy.first_pack + found.pack))
                    .collect()),
                Err(error) => {
                    lock(&self.late_problems)
                        .push(format!("{error} (its chunks are stored again)"));
                    Ok(Vec::new())
                }
            }
        })?;
        Ok(read.into_iter().flatten().collect())
    }

    /// Whether pack `ordinal` may be deduplicated into: not excluded, and present with its
    /// indexed size (checked once, at its first use).
    fn usable(&self, ordinal: u32) -> bool {
        let known = self.packs[ordinal as usize];
        if self.excluded.contains(&known.pack) {
            return false;
        }
        let once = Arc::clone(lock(&self.exists).entry(ordinal).or_default());
        *once.get_or_init(|| match self.repo.pack_exists(&known.pack, known.size_bytes) {
            Ok(true) => true,
            Ok(false) => {
                if known.own_index {
                    let _ = self.missing_own.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            Err(error) => {
                let _ = lock(&self.failure).get_or_insert(error);
                false
            }
        })
    }
}

#[cfg(test)]
impl ChunkIndex<'_> {
    /// Distinct chunks with a usable pack, loading every bucket.
    pub fn usable_chunk_count(&self) -> usize {
        let mut count = 0;
        for bucket in 0..MERGED_BUCKETS {
            let entries = self.bucket(bucket);
            let mut hashes: Vec<ChunkHash> = entries.iter().map(|(hash, _)| *hash).collect();
            hashes.dedup();
            count += hashes.iter().filter(|hash| self.get(hash).is_some()).count();
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::native::layout::gc::GcTiming;
    use crate::native::layout::{IndexEntry, ObjectKind, RECORD_HEADER_BYTES, encode_document};
    use crate::native::memstore::{MemStore, Op, crashed};
    use crate::store::ObjectStore;

    const ENTRIES: usize = 64;

    fn hash(seed: u64, n: usize) -> ChunkHash {
        let mut input = seed.to_le_bytes().to_vec();
        input.extend_from_slice(&n.to_le_bytes());
        ChunkHash(*blake3::hash(&input).as_bytes())
    }

    fn pack_index(pack: PackId, seed: u64) -> PackIndex {
        let record = RECORD_HEADER_BYTES as u64 + 1;
        let entries = (0..ENTRIES)
            .map(|n| IndexEntry {
                hash: hash(seed, n),
                offset: n as u64 * record,
                stored_bytes: 1,
                raw_bytes: 1,
            })
            .collect();
        PackIndex { pack, pack_size_bytes: ENTRIES as u64 * record, entries }
    }

    fn put_pack(store: &Arc<MemStore>, index: &PackIndex) {
        let size = usize::try_from(index.pack_size_bytes).unwrap();
        store.put(&index.pack.pack_key(), Bytes::from(vec![0; size])).unwrap();
    }

    fn count_gets(store: &Arc<MemStore>, prefix: &'static str) -> Arc<AtomicUsize> {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&count);
        store.set_hook(Some(Arc::new(move |op, key: &str| {
            if op == Op::Get && key.starts_with(prefix) {
                let _ = counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })));
        count
    }

    // A backup's start reads the head of a large consolidated index and the per-pack indexes
    // none holds, no bucket; a lookup reads one bucket once; a chunk whose first holder is
    // missing is found in the next; an excluded pack is never returned; a missing pack known
    // from its own index is a warning, one known from a consolidated index (swept) is not; a
    // store error is kept for the commit to fail with.
    #[test]
    fn a_start_reads_heads_and_a_lookup_reads_one_bucket() {
        let store = MemStore::new(1_000_000);
        let repo =
            Repository::init_with(Box::new(Arc::clone(&store)), 1 << 20, GcTiming::DEFAULT, None)
                .unwrap();
        let mut packs: Vec<PackIndex> = (0..600).map(|n| pack_index(PackId::random(), n)).collect();
        packs.sort_by_key(|index| index.pack);
        // The first pack is missing (swept) and shares a chunk with the last.
        let shared = packs[0].entries[0];
        let last = packs.last_mut().unwrap();
        last.entries[0].hash = shared.hash;
        for index in &packs[1..] {
            put_pack(&store, index);
        }
        let merged = MergedIndex { supersedes: Vec::new(), packs: packs.clone() };
        let encoded = merged.encode(&repo.crypt);
        assert!(encoded.len() as u64 > READ_WHOLE_BYTES_MAX, "{} bytes", encoded.len());
        store.put(&merged::merged_key(PackId::random()), Bytes::from(encoded)).unwrap();
        let own = pack_index(PackId::random(), 1000);
        put_pack(&store, &own);
        let gone_own = pack_index(PackId::random(), 1001);
        for index in [&own, &gone_own] {
            let document = encode_document(&repo.crypt, ObjectKind::Index, index);
            store.put(&index.pack.index_key(), Bytes::from(document)).unwrap();
        }

        let gets = count_gets(&store, "index/");
        let mut view = DedupView::load(&repo, 1).unwrap();
        assert!(view.problems.is_empty(), "{:?}", view.problems);
        assert_eq!(gets.load(Ordering::SeqCst), 3, "one head, two per-pack indexes");
        let index = &view.chunks;
        assert_eq!(index.bucket_reads(), (0, 0));
        let probe = packs[7].entries[3].hash;
        assert_eq!(index.get(&probe), Some(packs[7].pack));
        assert_eq!(index.bucket_reads().0, 1);
        let full = 601 * ENTRIES * BYTES_PER_CHUNK;
        assert!(index.memory_bytes() < full / 20, "{} of {full}", index.memory_bytes());
        // Another chunk of the same bucket: no read.
        // (Not from the missing first pack, nor the chunk it shares with the last.)
        let same_bucket = packs[1..]
            .iter()
            .flat_map(|pack| pack.entries.iter().map(move |entry| (pack.pack, entry.hash)))
            .find(|(_, other)| {
                other.0[0] == probe.0[0] && *other != probe && *other != shared.hash
            });
        if let Some((pack, other)) = same_bucket {
            assert_eq!(index.get(&other), Some(pack));
            assert_eq!(index.bucket_reads().0, 1);
        }
        assert_eq!(index.get(&shared.hash), Some(packs[599].pack), "the next holder");
        assert_eq!(index.get(&packs[0].entries[1].hash), None, "its pack is swept");
        assert_eq!(index.get(&own.entries[5].hash), Some(own.pack));
        assert_eq!(index.get(&hash(5000, 0)), None);
        assert!(index.take_problems().is_empty(), "a swept pack is not a problem");
        assert_eq!(index.get(&gone_own.entries[0].hash), None);
        assert_eq!(index.take_problems().len(), 1, "a pack its own index names is missing");
        assert!(index.take_failure().is_none());

        view.chunks.exclude([packs[599].pack]);
        assert_eq!(view.chunks.get(&shared.hash), None, "excluded");

        // A store error while reading a bucket: the chunk is unknown and the error kept.
        let view = DedupView::load(&repo, 1).unwrap();
        store.set_hook(Some(Arc::new(|op, key: &str| {
            if op == Op::Get && key.starts_with("index/merged/") {
                return Err(crashed(key));
            }
            Ok(())
        })));
        assert_eq!(view.chunks.get(&probe), None);
        assert!(view.chunks.take_failure().is_some());
        store.set_hook(None);
    }
}
