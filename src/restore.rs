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
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::compress;
use crate::error::{EngineError, ErrorKind};
use crate::format::{self, ChunkHash, IndexEntry, Manifest, PackId};
use crate::io::{self, AlignedBuf, DeviceInfo, WriteOp};
use crate::limits::{self, Budget};
use crate::progress::Progress;
use crate::repo::{Location, Repository, lock};

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
    info: DeviceInfo,
    /// Chunk indexes of each hash (one hash may fill several chunks).
    placements: HashMap<ChunkHash, Vec<u64>>,
    /// The bytes past the last whole logical block, written with a plain write at the end.
    tail: Mutex<Option<Vec<u8>>>,
    tail_offset: u64,
    abort: AtomicBool,
    failure: Mutex<Option<EngineError>>,
}

impl Shared<'_> {
    fn fail(&self, error: EngineError) {
        let _ = lock(&self.failure).get_or_insert(error);
        self.abort.store(true, Ordering::SeqCst);
    }
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
    let locations = repo.load_locations(&manifest.packs)?;
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
    let (opened, target_created) = prepare_target(manifest, options)?;
    if !opened.direct {
        warn(format!(
            "{}: O_DIRECT refused, writing through the page cache",
            options.target.display()
        ));
    }
    let info = io::probe(&opened.file)?;
    if info.size_bytes < manifest.volume_size_bytes {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!(
                "target {} has {} bytes, the backup needs {}",
                options.target.display(),
                info.size_bytes,
                manifest.volume_size_bytes
            ),
        ));
    }
    Progress::add(&progress.bytes_total, manifest.volume_size_bytes);
    let block = u64::from(info.logical_block_bytes);
    let tail_offset = manifest.volume_size_bytes / block * block;
    let shared = Shared {
        repo,
        manifest,
        progress,
        info,
        placements,
        tail: Mutex::new(None),
        tail_offset,
        abort: AtomicBool::new(false),
        failure: Mutex::new(None),
    };
    let jobs = plan_ranges(&locations, &shared.placements);
    let sparse = options.sparse || target_created;
    let (write_stats, hole_counts) =
        run_threads(&shared, &opened.file, options, jobs, sparse, cancel)?;
    write_tail(&shared, options, sparse)?;
    Ok(RestoreStats {
        volume_size_bytes: manifest.volume_size_bytes,
        bytes_downloaded: Progress::get(&progress.bytes_downloaded),
        data_chunk_count: manifest.chunks.iter().filter(|c| c.is_some()).count() as u64,
        zero_chunks_written: hole_counts.0,
        zero_chunks_skipped: hole_counts.1,
        target_created,
        engine: write_stats.engine.name(),
        direct: opened.direct,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Checks the target and opens it for writing, creating a missing file at the volume's size.
fn prepare_target(
    manifest: &Manifest,
    options: &RestoreOptions,
) -> Result<(io::OpenedFile, bool), EngineError> {
    let target = &options.target;
    let refused = |message: String| EngineError::new(ErrorKind::Refused, message);
    match std::fs::metadata(target) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let opened = io::open(target, true, true)?;
            opened.file.set_len(manifest.volume_size_bytes).map_err(|error| {
                EngineError::new(ErrorKind::Device, format!("sizing {}: {error}", target.display()))
            })?;
            Ok((opened, true))
        }
        Err(error) => {
            Err(EngineError::new(ErrorKind::Device, format!("{}: {error}", target.display())))
        }
        Ok(metadata) => {
            use std::os::unix::fs::FileTypeExt;
            let file_type = metadata.file_type();
            if file_type.is_file() {
                if metadata.len() > 0 && !options.force {
                    return Err(refused(format!(
                        "target {} already holds {} bytes; pass --force to overwrite it",
                        target.display(),
                        metadata.len()
                    )));
                }
                let opened = io::open(target, true, false)?;
                if metadata.len() < manifest.volume_size_bytes {
                    opened.file.set_len(manifest.volume_size_bytes).map_err(|error| {
                        EngineError::new(
                            ErrorKind::Device,
                            format!("sizing {}: {error}", target.display()),
                        )
                    })?;
                }
                // An empty file we extend reads as zeros, so holes need no writes.
                Ok((opened, metadata.len() == 0))
            } else if file_type.is_block_device() {
                if !options.force {
                    return Err(refused(format!(
                        "target {} is a block device; pass --force to overwrite it",
                        target.display()
                    )));
                }
                Ok((io::open(target, true, false)?, false))
            } else {
                Err(EngineError::new(
                    ErrorKind::Usage,
                    format!(
                        "target {} is neither a regular file nor a block device",
                        target.display()
                    ),
                ))
            }
        }
    }
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
    file: &std::fs::File,
    options: &RestoreOptions,
    jobs: Vec<RangeJob>,
    sparse: bool,
    cancel: &AtomicBool,
) -> Result<(io::WriteStats, (u64, u64)), EngineError> {
    let downloader_count = options.downloads_in_flight.max(1);
    let budget = Budget::new(shared.manifest.chunk_size_bytes, downloader_count, 1);
    let (free_tx, free_rx) = bounded::<AlignedBuf>(budget.chunk_buffer_count);
    for _ in 0..budget.chunk_buffer_count {
        free_tx.send(AlignedBuf::new(budget.chunk_buffer_bytes)).expect("pool has room");
    }
    let (ops_tx, ops_rx) = bounded::<WriteOp>(budget.chunk_buffer_count);
    let write_options =
        io::WriteOptions { engine: options.engine, queue_depth: options.queue_depth };
    let next_job = AtomicUsize::new(0);
    let (writer_result, hole_counts) = std::thread::scope(|scope| {
        // The writer owns the receiving end of the ops and the sending end of the pool, so that
        // if it stops, blocked downloaders see disconnected channels instead of waiting forever.
        let writer = scope.spawn(move || {
            let result = io::write_target(
                file,
                &shared.info,
                &write_options,
                &ops_rx,
                &free_tx,
                &shared.abort,
            );
            drop((ops_rx, free_tx));
            if result.is_err() {
                shared.abort.store(true, Ordering::SeqCst);
            }
            result
        });
        for _ in 0..downloader_count {
            let (ops_tx, free_rx) = (ops_tx.clone(), free_rx.clone());
            let (jobs, next_job) = (&jobs, &next_job);
            let _ = scope.spawn(move || {
                while !shared.abort.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next_job.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    if let Err(error) = fetch_range(shared, job, &free_rx, &ops_tx) {
                        shared.fail(error);
                    }
                }
            });
        }
        drop(free_rx);
        let hole_counts = queue_holes(shared, &ops_tx, sparse);
        drop(ops_tx);
        watch(shared, cancel, &writer);
        (writer.join().expect("writer thread does not panic"), hole_counts)
    });
    if let Some(error) = lock(&shared.failure).take() {
        return Err(error);
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(EngineError::new(
            ErrorKind::Cancelled,
            "restore cancelled; the target is incomplete",
        ));
    }
    let write_stats = writer_result?;
    Ok((write_stats, hole_counts))
}

/// Waits for the writer, relaying cancellation into the pipeline.
fn watch<T>(
    shared: &Shared<'_>,
    cancel: &AtomicBool,
    writer: &std::thread::ScopedJoinHandle<'_, T>,
) {
    while !writer.is_finished() {
        if cancel.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::SeqCst);
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
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
                    if shared.abort.load(Ordering::Relaxed) || ops_tx.send(op).is_err() {
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
    let bytes = shared.repo.store.get_range(&key, job.offset, job.length)?;
    Progress::add(&shared.progress.bytes_downloaded, bytes.len() as u64);
    let mut position = 0usize;
    for entry in &job.entries {
        let record_len = usize::try_from(entry.record_bytes()).expect("records fit memory");
        let record = &bytes[position..position + record_len];
        position += record_len;
        let what = format!("pack {key} record at offset {}", entry.offset);
        // The data's xxh3 is not checked here: the keyed BLAKE3 of the decoded chunk below is.
        let (header, stored) = format::decode_record_header(&what, record)?;
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
        compress::decompress(header.encoding, stored, raw_bytes, buf.as_mut_slice())
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
            *lock(&shared.tail) = Some(buf.as_slice()[aligned..].to_vec());
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

/// Writes the bytes past the last whole logical block with a plain write, then syncs.
fn write_tail(
    shared: &Shared<'_>,
    options: &RestoreOptions,
    sparse: bool,
) -> Result<(), EngineError> {
    let tail_len = shared.manifest.volume_size_bytes - shared.tail_offset;
    if tail_len == 0 {
        return Ok(());
    }
    let last_is_hole = shared.manifest.chunks.last().is_some_and(Option::is_none);
    let tail = match lock(&shared.tail).take() {
        Some(tail) => tail,
        None if last_is_hole && sparse => return Ok(()),
        None if last_is_hole => vec![0u8; usize::try_from(tail_len).expect("below one block")],
        None => panic!("the last chunk was restored but its tail was not kept"),
    };
    assert_eq!(tail.len() as u64, tail_len);
    let device_error = |error: std::io::Error| {
        EngineError::new(
            ErrorKind::Device,
            format!("writing the last {tail_len} bytes of {}: {error}", options.target.display()),
        )
    };
    let file =
        std::fs::OpenOptions::new().write(true).open(&options.target).map_err(device_error)?;
    file.write_all_at(&tail, shared.tail_offset).map_err(device_error)?;
    file.sync_all().map_err(device_error)
}
