//! One restore job: manifest → pack indexes → parallel ranged GETs of pack records → verify →
//! decompress → verify the chunk hash → O_DIRECT writes at the chunk's offsets, holes written as
//! zeros or skipped.
//!
//! Threads (scoped to `run`): `downloads_in_flight` downloaders (GET, verify, decompress into a
//! pooled aligned buffer), one writer (owns the target and its io_uring), and the calling thread,
//! which queues hole writes, samples progress and relays cancellation. Nothing is written before
//! the target is checked and every chunk of the manifest is located in an index; no chunk is
//! written before its record checksum and its keyed hash verify.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, WriteOp};
use crate::limits::{self, Budget};
use crate::native::compress;
use crate::native::layout::{self, ChunkHash, IndexEntry, Manifest, PackId};
use crate::native::repo::{Location, Repository};
use crate::plane::{self, Edges, JobControl, Target};
use crate::progress::Progress;
use crate::store::StoreError;

/// Where and how to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Device or file to write. A missing file is created.
    pub target: PathBuf,
    /// I/O engine of the writer.
    pub engine: io::Engine,
    /// Overwrite a target that already holds data.
    pub force: bool,
    /// Skip holes: the target is known to read as zeros.
    pub sparse: bool,
    /// Ranged GETs at once.
    pub downloads_in_flight: usize,
    /// Write requests in flight.
    pub queue_depth: usize,
}

impl RestoreOptions {
    /// Defaults for `target`.
    pub fn new(target: PathBuf) -> RestoreOptions {
        RestoreOptions {
            target,
            engine: io::Engine::Uring,
            force: false,
            sparse: false,
            downloads_in_flight: limits::DOWNLOADS_IN_FLIGHT_DEFAULT,
            queue_depth: limits::QUEUE_DEPTH_DEFAULT,
        }
    }
}

/// What a finished restore reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreStats {
    /// Bytes of the volume restored.
    pub volume_size_bytes: u64,
    /// Bytes downloaded from the store.
    pub bytes_downloaded: u64,
    /// Chunks written from stored data.
    pub data_chunk_count: u64,
    /// Holes written as zeros.
    pub zero_chunks_written: u64,
    /// Holes skipped (sparse target).
    pub zero_chunks_skipped: u64,
    /// Whether the target file was created by this restore.
    pub target_created: bool,
    /// Engine that wrote the target.
    pub engine: &'static str,
    /// Whether the target was written with O_DIRECT.
    pub direct: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// One ranged GET: consecutive records of one pack.
#[derive(Debug)]
struct RangeJob {
    pack: PackId,
    offset: u64,
    length: u64,
    entries: Vec<IndexEntry>,
}

struct Shared<'a> {
    repo: &'a Repository,
    manifest: &'a Manifest,
    progress: &'a Progress,
    /// Chunk indexes of each hash (one hash may fill several chunks).
    placements: HashMap<ChunkHash, Vec<u64>>,
    /// The bytes past the last whole logical block, written with a plain write at the end.
    edges: Edges,
    tail_offset: u64,
    control: JobControl,
}

/// The memory budget of a restore with `options` of a backup in `chunk_size_bytes` chunks.
pub fn budget(options: &RestoreOptions, chunk_size_bytes: u32) -> Budget {
    Budget::native_restore(chunk_size_bytes, options.downloads_in_flight.max(1))
}

/// Restores `manifest` from `repo` onto `options.target`.
///
/// # Errors
/// `Refused` for a target that is too small or holds data without `force`, `Integrity` when a
/// chunk is missing or does not verify, `Device`, `Store`, `Cancelled`.
pub fn run(
    repo: &Repository,
    manifest: &Manifest,
    options: &RestoreOptions,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<RestoreStats, EngineError> {
    let started = Instant::now();
    manifest.validate()?;
    let locations = repo.locate(manifest)?;
    let mut placements: HashMap<ChunkHash, Vec<u64>> = HashMap::new();
    for (chunk_index, hash) in manifest.chunks.iter().enumerate() {
        if let Some(hash) = hash {
            if !locations.contains_key(hash) {
                return Err(EngineError::new(
                    ErrorKind::Integrity,
                    format!(
                        "backup {} references chunk {hash}, which no index of its packs holds",
                        manifest.backup_id
                    ),
                ));
            }
            placements.entry(*hash).or_default().push(chunk_index as u64);
        }
    }
    check_packs_present(repo, manifest, &locations)?;
    let budget = budget(options, manifest.chunk_size_bytes);
    budget
        .check("--downloads-in-flight and the backup's chunk size")
        .map_err(|message| EngineError::new(ErrorKind::Usage, message))?;
    let target =
        plane::prepare_target(&options.target, manifest.volume_size_bytes, options.force, warn)?;
    let result = restore_onto(
        repo, manifest, options, &target, placements, &locations, &budget, progress, cancel,
    );
    if result.is_err() {
        target.discard_if_created();
    }
    let (engine, hole_counts) = result?;
    Ok(RestoreStats {
        volume_size_bytes: manifest.volume_size_bytes,
        bytes_downloaded: Progress::get(&progress.bytes_downloaded),
        data_chunk_count: manifest.chunks.iter().filter(|c| c.is_some()).count() as u64,
        zero_chunks_written: hole_counts.0,
        zero_chunks_skipped: hole_counts.1,
        target_created: target.created,
        engine: engine.name(),
        direct: target.opened.direct,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Checks, with one listing and before the target is touched, that every pack the backup reads
/// exists and is long enough for every record read from it: a missing or truncated pack is
/// lost data (integrity), found before a byte is written.
fn check_packs_present(
    repo: &Repository,
    manifest: &Manifest,
    locations: &HashMap<ChunkHash, Location>,
) -> Result<(), EngineError> {
    let sizes: HashMap<String, u64> = repo
        .store
        .list(layout::PACKS_PREFIX)?
        .into_iter()
        .map(|object| (object.key, object.size_bytes))
        .collect();
    let mut needed: HashMap<PackId, u64> = HashMap::new();
    for location in manifest.chunks.iter().flatten().filter_map(|hash| locations.get(hash)) {
        let end = location.entry.offset + location.entry.record_bytes();
        let slot = needed.entry(location.pack).or_default();
        *slot = (*slot).max(end);
    }
    for (pack, end) in needed {
        let key = pack.pack_key();
        let problem = match sizes.get(&key) {
            None => "is missing".to_owned(),
            Some(&size) if size < end => format!("has {size} bytes, its records need {end}"),
            Some(_) => continue,
        };
        return Err(EngineError::new(
            ErrorKind::Integrity,
            format!(
                "pack {key}, referenced by backup {}, {problem}; nothing was written",
                manifest.backup_id
            ),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore_onto(
    repo: &Repository,
    manifest: &Manifest,
    options: &RestoreOptions,
    target: &Target,
    placements: HashMap<ChunkHash, Vec<u64>>,
    locations: &HashMap<ChunkHash, Location>,
    budget: &Budget,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<(io::Engine, (u64, u64)), EngineError> {
    Progress::add(&progress.bytes_total, manifest.volume_size_bytes);
    let block = u64::from(target.info.logical_block_bytes);
    let tail_offset = manifest.volume_size_bytes / block * block;
    let shared = Shared {
        repo,
        manifest,
        progress,
        placements,
        edges: Edges::default(),
        tail_offset,
        control: JobControl::new(),
    };
    let jobs = plan_ranges(locations, &shared.placements);
    let sparse = target.skip_holes(options.sparse)?;
    let (write_stats, hole_counts) =
        run_threads(&shared, target, options, budget, jobs, sparse, cancel)?;
    let last_is_hole = manifest.chunks.last().is_some_and(Option::is_none);
    let tail_len = manifest.volume_size_bytes - tail_offset;
    if tail_len > 0 && last_is_hole && !sparse {
        shared
            .edges
            .push(tail_offset, vec![0u8; usize::try_from(tail_len).expect("below one block")]);
    }
    shared.edges.write(&target.path)?;
    Ok((write_stats.engine, hole_counts))
}

/// Groups the needed records into ranged GETs: records adjacent in a pack share one GET of up to
/// `DOWNLOAD_RANGE_BYTES_MAX`.
fn plan_ranges(
    locations: &HashMap<ChunkHash, Location>,
    placements: &HashMap<ChunkHash, Vec<u64>>,
) -> Vec<RangeJob> {
    let mut needed: Vec<Location> = placements.keys().map(|hash| locations[hash]).collect();
    needed.sort_by_key(|location| (location.pack, location.entry.offset));
    let mut jobs: Vec<RangeJob> = Vec::new();
    for location in needed {
        let entry = location.entry;
        if let Some(job) = jobs.last_mut() {
            let adjacent = job.pack == location.pack && job.offset + job.length == entry.offset;
            if adjacent && job.length + entry.record_bytes() <= limits::DOWNLOAD_RANGE_BYTES_MAX {
                job.length += entry.record_bytes();
                job.entries.push(entry);
                continue;
            }
        }
        jobs.push(RangeJob {
            pack: location.pack,
            offset: entry.offset,
            length: entry.record_bytes(),
            entries: vec![entry],
        });
    }
    jobs
}

fn run_threads(
    shared: &Shared<'_>,
    target: &Target,
    options: &RestoreOptions,
    budget: &Budget,
    jobs: Vec<RangeJob>,
    sparse: bool,
    cancel: &AtomicBool,
) -> Result<(io::WriteStats, (u64, u64)), EngineError> {
    let control = &shared.control;
    let (free_tx, free_rx) =
        plane::buffer_pool(budget.chunk_buffer_count, budget.chunk_buffer_bytes);
    let (ops_tx, ops_rx) = bounded::<WriteOp>(budget.chunk_buffer_count);
    let write_options =
        io::WriteOptions { engine: options.engine, queue_depth: options.queue_depth };
    let (written, hole_counts) = std::thread::scope(|scope| {
        let writer = plane::spawn_writer(scope, target, write_options, ops_rx, free_tx, control);
        let jobs = &jobs;
        plane::fetch_parallel(
            scope,
            budget.transfers_in_flight,
            jobs,
            control,
            || (free_rx.clone(), ops_tx.clone()),
            |(free_rx, ops_tx), job| fetch_range(shared, job, free_rx, ops_tx),
        );
        drop(free_rx);
        let hole_counts = queue_holes(shared, &ops_tx, sparse);
        drop(ops_tx);
        control.watch(cancel, || writer.is_finished());
        (writer.join().expect("writer thread does not panic"), hole_counts)
    });
    control.outcome(cancel, "restore cancelled; the target is incomplete")?;
    let written = written.expect("a writer that did not fail reports what it wrote");
    Ok((written, hole_counts))
}

/// Queues zero writes for runs of holes (unless the target reads as zeros already).
/// Returns (holes written, holes skipped).
fn queue_holes(shared: &Shared<'_>, ops_tx: &Sender<WriteOp>, sparse: bool) -> (u64, u64) {
    let chunk = u64::from(shared.manifest.chunk_size_bytes);
    let holes = shared.manifest.chunks.iter().filter(|c| c.is_none()).count() as u64;
    if sparse {
        Progress::add(&shared.progress.bytes_restored, holes * chunk);
        return (0, holes);
    }
    let mut run_start: Option<u64> = None;
    let end = shared.manifest.chunks.len() as u64;
    for chunk_index in 0..=end {
        let hole = chunk_index < end && shared.manifest.chunks[chunk_index as usize].is_none();
        match (hole, run_start) {
            (true, None) => run_start = Some(chunk_index),
            (false, Some(start)) => {
                run_start = None;
                let offset = start * chunk;
                let stop = (chunk_index * chunk).min(shared.tail_offset);
                if stop > offset {
                    let op = WriteOp::Zero { offset, length: stop - offset };
                    if shared.control.stopped() || ops_tx.send(op).is_err() {
                        return (0, 0);
                    }
                    Progress::add(&shared.progress.bytes_restored, stop - offset);
                }
            }
            _ => {}
        }
    }
    (holes, 0)
}

/// One downloader step: GET a range, verify and decompress each record, queue its writes.
fn fetch_range(
    shared: &Shared<'_>,
    job: &RangeJob,
    free_rx: &Receiver<AlignedBuf>,
    ops_tx: &Sender<WriteOp>,
) -> Result<(), EngineError> {
    let key = job.pack.pack_key();
    // The backup references this pack: its absence is lost data (integrity), not a missing
    // backup (not found).
    let bytes =
        shared.repo.store.get_range(&key, job.offset, job.length).map_err(|error| match error {
            StoreError::NotFound { .. } => EngineError::new(
                ErrorKind::Integrity,
                format!("pack {key}, referenced by this backup, is missing"),
            ),
            other => other.into(),
        })?;
    Progress::add(&shared.progress.bytes_downloaded, bytes.len() as u64);
    let mut position = 0usize;
    let mut scratch = Vec::new();
    for entry in &job.entries {
        let record_len = usize::try_from(entry.record_bytes()).expect("records fit memory");
        let record = &bytes[position..position + record_len];
        position += record_len;
        let what = format!("pack {key} record at offset {}", entry.offset);
        // The data's xxh3 is not checked here: the keyed BLAKE3 of the decoded chunk below is.
        let (header, stored) = layout::decode_record_header(&what, record)?;
        let integrity =
            |detail: String| EngineError::new(ErrorKind::Integrity, format!("{what}: {detail}"));
        if header.hash != entry.hash || header.raw_bytes != entry.raw_bytes {
            return Err(integrity("record does not match its index entry".into()));
        }
        let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
        let raw_bytes = entry.raw_bytes as usize;
        if raw_bytes > buf.capacity() {
            return Err(integrity(format!("{raw_bytes}-byte chunk exceeds the chunk size")));
        }
        let out = &mut buf.as_mut_slice()[..raw_bytes];
        compress::decode_record_data(&shared.repo.crypt, &header, stored, out, &mut scratch)
            .map_err(|detail| integrity(format!("corrupt: {detail}")))?;
        // Pair assertion: the hash taken before upload must match the bytes about to be written.
        if shared.repo.hasher.hash(&buf.as_mut_slice()[..raw_bytes]) != entry.hash {
            return Err(integrity(format!("corrupt: chunk does not hash to {}", entry.hash)));
        }
        buf.set_len(raw_bytes);
        queue_chunk_writes(shared, &entry.hash, buf, free_rx, ops_tx)?;
    }
    Ok(())
}

/// Queues the write of a verified chunk at every index that holds it.
fn queue_chunk_writes(
    shared: &Shared<'_>,
    hash: &ChunkHash,
    buf: AlignedBuf,
    free_rx: &Receiver<AlignedBuf>,
    ops_tx: &Sender<WriteOp>,
) -> Result<(), EngineError> {
    let chunk = u64::from(shared.manifest.chunk_size_bytes);
    let indexes = &shared.placements[hash];
    let mut source = Some(buf);
    for (position, &chunk_index) in indexes.iter().enumerate() {
        let last = position + 1 == indexes.len();
        let mut buf = if last {
            source.take().expect("source buffer is used last")
        } else {
            let Ok(mut copy) = free_rx.recv() else { return Ok(()) };
            let data = source.as_ref().expect("source kept until last").as_slice();
            copy.as_mut_slice()[..data.len()].copy_from_slice(data);
            copy.set_len(data.len());
            copy
        };
        let offset = chunk_index * chunk;
        let length = buf.len() as u64;
        Progress::add(&shared.progress.bytes_restored, length);
        if offset + length > shared.tail_offset {
            // The volume ends inside a logical block: keep the bytes past the last whole block
            // for a plain write, and O_DIRECT-write the aligned part.
            let aligned = usize::try_from(shared.tail_offset.saturating_sub(offset)).expect("fits");
            shared.edges.push(offset + aligned as u64, buf.as_slice()[aligned..].to_vec());
            buf.set_len(aligned);
            if aligned == 0 {
                continue;
            }
        }
        if ops_tx.send(WriteOp::Data { offset, buf }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}
