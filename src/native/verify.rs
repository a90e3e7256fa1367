//! `ferry verify`: checks a backup without restoring it.
//!
//! Always: every pack the manifest names exists, has an index, and has the size its index
//! records; every chunk the manifest references is in one of those indexes, inside its pack.
//! With `read_data_percent`: downloads all (100) or a random sample of the backup's distinct
//! chunks with coalesced ranged GETs and checks each record as a restore would (header and data
//! checksums, decompression to the right length, keyed BLAKE3 of the result).
//! Problems are collected, not fatal: the report names every bad object.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::error::{EngineError, ErrorKind};
use crate::limits;
use crate::native::compress;
use crate::native::layout::{self, ChunkHash, IndexEntry, Manifest, PackId};
use crate::native::repo::{Repository, lock, parallel_map};
use crate::progress::Progress;

/// How much to check.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Percentage (0 < p ≤ 100) of distinct chunks to download and re-hash; `None`: none.
    pub read_data_percent: Option<f64>,
    /// Ranged GETs in flight.
    pub downloads_in_flight: usize,
    /// Seed of the sample (reported, so a run can be repeated).
    pub seed: u64,
}

/// One thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct Problem {
    /// The object concerned (`packs/…`, `index/…`).
    pub object: String,
    /// What is wrong.
    pub detail: String,
}

/// What a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The backup verified.
    pub backup_id: String,
    /// Packs the manifest references.
    pub pack_count: usize,
    /// Distinct chunks the manifest references.
    pub chunk_count: usize,
    /// Distinct chunks downloaded and re-hashed.
    pub chunks_read: usize,
    /// Bytes downloaded.
    pub bytes_read: u64,
    /// Seed of the sample, when data was read.
    pub seed: Option<u64>,
    /// Everything found wrong (empty: the backup is sound as far as checked).
    pub problems: Vec<Problem>,
}

/// Verifies `manifest`'s backup in `repo`.
///
/// # Errors
/// Store errors that stop the check itself (listing fails, store unreachable); problems with
/// the backup's objects are in the report instead.
pub fn run(
    repo: &Repository,
    manifest: &Manifest,
    options: &VerifyOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<VerifyReport, EngineError> {
    let problems = Mutex::new(BTreeSet::new());
    let report = |object: String, detail: String| {
        let _ = lock(&problems).insert(Problem { object, detail });
    };
    let listed = repo.list_packs()?;
    // Each pack's own index, or its consolidated one when that is gone.
    let found = repo.find_indexes(&manifest.packs)?;
    let mut indexes = Vec::with_capacity(found.len());
    // A pack of the backup that is gone or unindexed is a problem only when some chunk of the
    // backup is held by no other pack (a repack copies a pack's used records before a prune
    // sweeps it).
    let mut unusable = Vec::new();
    for (pack, index) in manifest.packs.iter().zip(found) {
        let pack_key = pack.pack_key();
        let Some(size) = listed.get(pack).map(|object| object.size_bytes) else {
            unusable.push((pack_key, "pack is missing".to_owned()));
            continue;
        };
        let index = match index {
            Ok(index) => index,
            Err(error) => {
                unusable.push((pack.index_key(), error.message));
                continue;
            }
        };
        if index.pack_size_bytes != size {
            let detail = format!("pack has {size} bytes, its index says {}", index.pack_size_bytes);
            report(pack_key.clone(), detail);
        }
        for entry in &index.entries {
            if entry.offset + entry.record_bytes() > size {
                let detail =
                    format!("record of chunk {} at {} runs past the end", entry.hash, entry.offset);
                report(pack_key.clone(), detail);
            }
        }
        indexes.push(index);
    }
    let mut locations: HashMap<ChunkHash, (PackId, IndexEntry)> = HashMap::new();
    for index in indexes {
        for entry in index.entries {
            let _ = locations.insert(entry.hash, (index.pack, entry));
        }
    }
    let referenced: BTreeSet<ChunkHash> = manifest.chunks.iter().flatten().copied().collect();
    let missing: HashSet<ChunkHash> =
        referenced.iter().filter(|hash| !locations.contains_key(*hash)).copied().collect();
    if !missing.is_empty() {
        for (hash, location) in repo.locate_elsewhere(&missing)? {
            let _ = locations.insert(hash, (location.pack, location.entry));
        }
    }
    let unresolved: Vec<&ChunkHash> =
        referenced.iter().filter(|hash| !locations.contains_key(*hash)).collect();
    if !unresolved.is_empty() {
        for (object, detail) in unusable {
            report(object, detail);
        }
    }
    for hash in unresolved {
        let object = layout::manifest_key(&manifest.backup_id);
        report(object, format!("chunk {hash} is in no index of the backup's packs"));
    }

    let mut chunks_read = 0;
    let mut bytes_read = 0;
    if let Some(percent) = options.read_data_percent {
        let mut sample = choose_sample(&referenced, &locations, percent, options.seed);
        sample.sort_by_key(|(pack, entry)| (*pack, entry.offset));
        chunks_read = sample.len();
        let jobs = coalesce(&sample);
        let totals = parallel_map(&jobs, options.downloads_in_flight.max(1), |job| {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::new(ErrorKind::Cancelled, "verify cancelled"));
            }
            Ok(check_range(repo, job, progress, &report))
        })?;
        bytes_read = totals.iter().sum();
    }
    let problems = problems.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(VerifyReport {
        backup_id: manifest.backup_id.clone(),
        pack_count: manifest.packs.len(),
        chunk_count: referenced.len(),
        chunks_read,
        bytes_read,
        seed: options.read_data_percent.map(|_| options.seed),
        problems: problems.into_iter().collect(),
    })
}

/// The located chunks `--read-data=PERCENT` reads: each with probability PERCENT/100 from a
/// xorshift stream seeded by `seed`, and at least one: a percentage asks for data to be read,
/// and below one chunk's worth it would otherwise read nothing.
fn choose_sample(
    referenced: &BTreeSet<ChunkHash>,
    locations: &HashMap<ChunkHash, (PackId, IndexEntry)>,
    percent: f64,
    seed: u64,
) -> Vec<(PackId, IndexEntry)> {
    let mut rng = seed | 1;
    let threshold = (percent.clamp(0.0, 100.0) / 100.0 * u64::MAX as f64) as u64;
    let located: Vec<(PackId, IndexEntry)> =
        referenced.iter().filter_map(|hash| locations.get(hash).copied()).collect();
    let mut sample: Vec<(PackId, IndexEntry)> = located
        .iter()
        .copied()
        .filter(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            percent >= 100.0 || rng <= threshold
        })
        .collect();
    if sample.is_empty() && !located.is_empty() {
        sample.push(located[(rng % located.len() as u64) as usize]);
    }
    sample
}

/// Records adjacent in one pack, read with one GET.
#[derive(Debug)]
struct Range {
    pack: PackId,
    offset: u64,
    length: u64,
    entries: Vec<IndexEntry>,
}

fn coalesce(sorted: &[(PackId, IndexEntry)]) -> Vec<Range> {
    let mut ranges: Vec<Range> = Vec::new();
    for &(pack, entry) in sorted {
        if let Some(range) = ranges.last_mut() {
            let adjacent = range.pack == pack && range.offset + range.length == entry.offset;
            if adjacent && range.length + entry.record_bytes() <= limits::DOWNLOAD_RANGE_BYTES_MAX {
                range.length += entry.record_bytes();
                range.entries.push(entry);
                continue;
            }
        }
        ranges.push(Range {
            pack,
            offset: entry.offset,
            length: entry.record_bytes(),
            entries: vec![entry],
        });
    }
    ranges
}

/// Downloads one range and checks each record in it; returns the bytes read.
fn check_range(
    repo: &Repository,
    range: &Range,
    progress: &Progress,
    report: &(dyn Fn(String, String) + Sync),
) -> u64 {
    let key = range.pack.pack_key();
    let bytes = match repo.store.get_range(&key, range.offset, range.length) {
        Ok(bytes) => bytes,
        Err(error) => {
            report(key, format!("reading {} bytes at {}: {error}", range.length, range.offset));
            return 0;
        }
    };
    Progress::add(&progress.bytes_downloaded, bytes.len() as u64);
    let mut raw = Vec::new();
    let mut scratch = Vec::new();
    let mut position = 0usize;
    for entry in &range.entries {
        let length = usize::try_from(entry.record_bytes()).expect("records fit memory");
        let record = &bytes[position..position + length];
        position += length;
        let what = format!("record of chunk {} at offset {}", entry.hash, entry.offset);
        let checked = layout::decode_record(&what, record)
            .map_err(|error| error.to_string())
            .and_then(|(header, stored)| {
                if header.hash != entry.hash || header.raw_bytes != entry.raw_bytes {
                    return Err(format!("{what}: does not match its index entry"));
                }
                raw.resize(entry.raw_bytes as usize, 0);
                compress::decode_record_data(&repo.crypt, &header, stored, &mut raw, &mut scratch)
                    .map_err(|detail| format!("{what}: {detail}"))?;
                if repo.hasher.hash(&raw) != entry.hash {
                    return Err(format!("{what}: data does not hash to its name"));
                }
                Ok(())
            });
        if let Err(detail) = checked {
            report(key.clone(), detail);
        }
    }
    bytes.len() as u64
}
