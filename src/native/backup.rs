//! One backup job: source device → chunks → zero detection and keyed hash → dedup against the
//! repository index → parallel zstd → pack assembly → concurrent multipart uploads → index objects
//! → manifest, written last.
//!
//! Threads (all scoped to `run`): one reader (owns the device and its io_uring), `worker_count`
//! chunk workers (zero check, hash, dedup claim, compress), one packer (lays records into parts and
//! packs), `parts_in_flight` uploaders (one part request each), and the calling thread, which
//! collects chunk results, samples progress and relays cancellation. Every channel is bounded, and
//! the buffer pool is allocated once, so memory is `limits::Budget`, whatever the volume size.
//! This module never talks to a storage cluster: it takes a device path and a repository.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};

use crate::error::{EngineError, ErrorKind};
use crate::io::{self, ReadChunk};
use crate::limits::{self, Budget};
use crate::native::chunk;
use crate::native::compress::Compressor;
use crate::native::dedup::{ChunkIndex, DedupView};
use crate::native::incremental::{self, Incremental};
use crate::native::layout::{
    self, BackupStats, ChunkHash, Encoding, IndexEntry, Manifest, ObjectKind, PackId, PackIndex,
    RECORD_HEADER_BYTES, SourceInfo,
};
use crate::native::maintain;
use crate::native::repo::Repository;
use crate::plane::{self, JobControl, PooledObject, UploadJob, Uploader, lock};
use crate::progress::Progress;

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The device or image file to read.
    pub source: PathBuf,
    /// The I/O engine for the reader.
    pub engine: io::Engine,
    /// zstd level.
    pub compression_level: i32,
    /// Chunk worker threads.
    pub worker_count: usize,
    /// Pack parts uploading at once.
    pub parts_in_flight: usize,
    /// Read requests in flight on the device (default: measured per device, `io::read_shape`).
    pub queue_depth: Option<usize>,
    /// Backup id to use instead of a generated one.
    pub backup_id: Option<String>,
    /// Pack objects are closed once they hold this many bytes.
    pub pack_size_bytes: u64,
    /// Limit on the bytes read per second from the sources together.
    pub limit_read_bytes_per_sec: Option<u64>,
    /// Limit on the bytes uploaded per second.
    pub limit_upload_bytes_per_sec: Option<u64>,
    /// What the manifest names as the source instead of the device path (for example
    /// `lightbits:<project>/<volume> (clone <uuid>)`); only with a single source.
    pub source_label: Option<String>,
    /// Read only the chunks a change list touches, taking the others from a parent backup
    /// (`native::incremental`); only with a single source. A hint that cannot be trusted is a
    /// warning and a full read.
    pub incremental: Option<Incremental>,
}

impl BackupOptions {
    /// Defaults for `source`: io_uring, level 1, one worker per CPU.
    pub fn new(source: PathBuf) -> BackupOptions {
        BackupOptions {
            source,
            engine: io::Engine::Uring,
            compression_level: crate::native::compress::LEVEL_DEFAULT,
            worker_count: std::thread::available_parallelism().map_or(2, |n| n.get()),
            parts_in_flight: limits::PARTS_IN_FLIGHT_DEFAULT,
            queue_depth: None,
            backup_id: None,
            pack_size_bytes: limits::PACK_SIZE_BYTES_TARGET as u64,
            limit_read_bytes_per_sec: None,
            limit_upload_bytes_per_sec: None,
            source_label: None,
            incremental: None,
        }
    }
}

/// What a finished backup reports besides its manifest.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// The manifest written.
    pub manifest: Manifest,
    /// The engine that actually read the source.
    pub engine: io::Engine,
    /// Whether the source was read with O_DIRECT.
    pub direct: bool,
}

/// A compressed chunk on its way to the packer.
struct Compressed {
    hash: ChunkHash,
    raw_bytes: u32,
    encoding: Encoding,
    data: Vec<u8>,
}

/// What the threads report to the collecting thread.
enum Report {
    /// A chunk of source `source` was processed; `stored` is its stored size when it is new.
    Chunk {
        source: usize,
        chunk_index: u64,
        length: u64,
        hash: Option<ChunkHash>,
        stored: Option<u64>,
    },
    /// A pack and its index are stored.
    Pack { pack: PackId, hashes: Vec<ChunkHash> },
}

/// What the job needs once a pack is stored: its index, set when the packer closes it.
type PackTag = Mutex<Option<(PackId, u64, Vec<IndexEntry>)>>;

/// State shared by every thread of one backup.
struct Shared<'a> {
    store: &'a dyn crate::store::ObjectStore,
    /// How records and indexes are sealed (the repository's).
    crypt: &'a layout::Crypt,
    progress: &'a Progress,
    control: &'a JobControl,
    /// Chunks of the repository this run may deduplicate against (read only, compact).
    known: &'a ChunkIndex<'a>,
    /// Chunks of this run: `Some(pack)` when stored, `None` when claimed by this backup.
    dedup: Mutex<HashMap<ChunkHash, Option<PackId>>>,
    /// Part buffers whose upload finished, for the packer to fill again.
    part_spares: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    /// Packs close at this size.
    pack_size_bytes: u64,
    /// The uploader pool's shared state (`--limit-upload`, open multipart uploads).
    uploader: Uploader<'a>,
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        self.control.stopped()
    }

    /// An empty part buffer, recycled when one is available.
    fn new_part(&self) -> Vec<u8> {
        match self.part_spares.1.try_recv() {
            Ok(mut part) => {
                part.clear();
                part
            }
            Err(_) => Vec::with_capacity(part_capacity()),
        }
    }
}

/// The memory budget of a backup of `source_count` sources with `options` into a repository of
/// `chunk_size_bytes` chunks.
pub fn budget(options: &BackupOptions, chunk_size_bytes: u32, source_count: usize) -> Budget {
    Budget::native_backup(
        chunk_size_bytes,
        options.worker_count.max(1),
        options.parts_in_flight.max(1),
        source_count.max(1),
    )
}

/// Runs one backup of `options.source` into `repo` and commits its manifest.
///
/// `cancel` is polled; when it becomes true the backup stops, aborts its multipart uploads and
/// returns a `Cancelled` error without writing a manifest. `warn` receives warnings.
///
/// # Errors
/// `Device` for source failures, `Store` for object-store failures, `Cancelled`, `Refused` when
/// the requested backup id exists, `Usage` for an empty source.
pub fn run(
    repo: &Repository,
    options: &BackupOptions,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<BackupOutcome, EngineError> {
    let sources = [options.source.clone()];
    let mut outcomes = run_many(repo, options, &sources, progress, cancel, warn)?;
    Ok(outcomes.pop().expect("one outcome per source"))
}

/// One source of a run: its device and what the pipeline learned about it.
struct Source {
    source: plane::Source,
    backup_id: String,
}

/// What the collector gathered for one source.
struct Collected {
    table: Vec<Option<ChunkHash>>,
    seen: Vec<bool>,
    stats: BackupStats,
}

/// Backs up every path in `sources` at once (one reader thread each, shared workers, packer,
/// uploaders and dedup) and commits one manifest per source, in order, once all of them are
/// complete. The run is all or nothing until the commit: a failure of any source writes no
/// manifest. `options.source` is ignored; `options.backup_id` is only allowed for one source.
///
/// # Errors
/// As `run`; `Usage` for a backup id given with several sources or a source given twice.
pub fn run_many(
    repo: &Repository,
    options: &BackupOptions,
    sources: &[PathBuf],
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<Vec<BackupOutcome>, EngineError> {
    let started = Instant::now();
    let started_at = layout::Timestamp::now();
    let sources = open_sources(repo, options, sources, started_at, progress, warn)?;
    let chunk_size_bytes = repo.config.chunk_size_bytes;
    let budget = budget(options, chunk_size_bytes, sources.len());
    budget
        .check("--parts-in-flight and the repository's chunk size")
        .map_err(|message| EngineError::new(ErrorKind::Usage, message))?;
    let lease = lease_and_upkeep(repo, warn)?;
    // Dedup only into packs seen to exist with their indexed size and not condemned by a mark
    // (FORMAT.md, garbage collection, B1-B2).
    let mut known = dedup_view(repo, &sources, warn)?;
    let mut carried: HashMap<ChunkHash, PackId> = HashMap::new();
    let mut epoch = lease.written_at();
    let mut plan = plan_incremental(repo, options, &sources, &known, warn)?;
    // The plan's sample is read beside its first pass (taking `unchecked`), and judged before
    // anything of that pass is used.
    let mut unchecked = plan.is_some();
    let mut hint_bytes = 0u64;
    let (manifests, engines) = loop {
        let sample = plan.as_ref().filter(|_| std::mem::take(&mut unchecked));
        let (pass, sampled) = beside_sample(repo, &sources, options.engine, sample, cancel, || {
            run_pass(
                repo,
                options,
                &sources,
                &known,
                carried,
                plan.as_ref(),
                &budget,
                progress,
                cancel,
            )
        });
        if let Some(found) = sampled.transpose()? {
            hint_bytes += found.bytes;
            if !plan.as_ref().is_some_and(|plan| plan.trusted(&found, repo, warn)) {
                // What the pass read is stored, and stays usable: the full read dedups into it.
                let (collected, _, stored) = pass?;
                hint_bytes += collected.iter().map(|c| c.stats.bytes_read).sum::<u64>();
                (plan, carried) = (None, stored);
                continue;
            }
        }
        let (collected, engines, stored) = pass?;
        let mut manifests = build_manifests(
            repo, options, &sources, collected, &known, &stored, started, started_at,
        )?;
        for problem in known.take_problems() {
            warn(problem);
        }
        if let Some(error) = known.take_failure() {
            return Err(error.context("looking up chunks in the repository's index"));
        }
        if let [manifest] = &mut manifests[..] {
            // What checking the change list read counts as read, whether it was trusted or not
            // (and so does a pass on a change list the check then refused).
            manifest.stats.bytes_read += hint_bytes;
            manifest.base = plan.as_ref().map(|plan| plan.base.clone());
        }
        for pack in manifests.iter().flat_map(|manifest| &manifest.packs) {
            // B2: a pack condemned by a mark this pass saw is never referenced.
            assert!(!known.excluded().contains(pack), "manifest references condemned pack {pack}");
        }
        // B3: a pass whose dedup decisions may be older than the grace allows re-validates.
        let now = repo.store_now()?;
        if !repo.config.gc().backup_must_revalidate(epoch, now) {
            break (manifests, engines);
        }
        let marks = repo.load_marks()?;
        let packs = repo.list_packs()?;
        let lost: BTreeSet<PackId> = manifests
            .iter()
            .flat_map(|manifest| manifest.packs.iter().copied())
            .filter(|pack| !packs.contains_key(pack) || marks.packs.contains(pack))
            .collect();
        if lost.is_empty() {
            break (manifests, engines);
        }
        warn(format!(
            "the backup ran {} s by the store's clock; {} pack(s) it references are gone or \
             condemned since: reading the source again to store their chunks again",
            now.saturating_sub(epoch),
            lost.len()
        ));
        epoch = now;
        if plan.take().is_some() {
            warn(
                "the parent backup's packs may be gone: the next pass reads the whole source"
                    .into(),
            );
        }
        known.exclude(marks.packs.into_iter().chain(lost));
        carried = stored.into_iter().filter(|(_, pack)| !known.excluded().contains(pack)).collect();
    };
    if cancel.load(Ordering::SeqCst) {
        return Err(EngineError::new(ErrorKind::Cancelled, "backup cancelled before commit"));
    }
    for source in &sources {
        source.source.warn_if_grown(warn);
    }
    let mut outcomes = Vec::with_capacity(manifests.len());
    for ((manifest, source), engine) in manifests.into_iter().zip(&sources).zip(engines) {
        // The commit point: everything the manifest references is durable.
        let encoded = layout::encode_document(&repo.crypt, ObjectKind::Manifest, &manifest);
        Progress::add(&progress.bytes_uploaded, encoded.len() as u64);
        repo.store.put(&layout::manifest_key(&manifest.backup_id), Bytes::from(encoded))?;
        outcomes.push(BackupOutcome { manifest, engine, direct: source.source.opened.direct });
    }
    Ok(outcomes)
}

/// Takes the backup's lease (it tells later jobs this one is running) and runs the upkeep that
/// aborts the uploads a killed job left.
fn lease_and_upkeep<'r>(
    repo: &'r Repository,
    warn: &dyn Fn(String),
) -> Result<maintain::Lease<'r>, EngineError> {
    let lease = maintain::take_lease(repo, "backup")?;
    let upkeep =
        maintain::abort_abandoned_uploads(repo, &lease, maintain::UploadSweep::IfADeadLease)?;
    if !upkeep.aborted_uploads.is_empty() {
        warn(format!(
            "aborted {} multipart upload(s) left by an interrupted backup",
            upkeep.aborted_uploads.len()
        ));
    }
    Ok(lease)
}

/// The dedup view for a run over `sources` (FORMAT.md, garbage collection, B1-B2), its
/// problems warned: lazily loaded unless the run looks up enough chunks to need all of it.
fn dedup_view<'r>(
    repo: &'r Repository,
    sources: &[Source],
    warn: &dyn Fn(String),
) -> Result<ChunkIndex<'r>, EngineError> {
    let chunk_bytes = u64::from(repo.config.chunk_size_bytes);
    let lookups: u64 =
        sources.iter().map(|source| source.source.info.size_bytes.div_ceil(chunk_bytes)).sum();
    let view = DedupView::load(repo, lookups)?;
    for problem in &view.problems {
        warn(problem.clone());
    }
    Ok(view.chunks)
}

/// The checked incremental read of `options.incremental`, or `None` (a full read) when there is
/// none or it cannot be trusted (`native::incremental::plan` warns why).
fn plan_incremental(
    repo: &Repository,
    options: &BackupOptions,
    sources: &[Source],
    known: &ChunkIndex<'_>,
    warn: &dyn Fn(String),
) -> Result<Option<incremental::Plan>, EngineError> {
    let Some(hint) = &options.incremental else { return Ok(None) };
    let [source] = sources else {
        return Err(EngineError::new(
            ErrorKind::Usage,
            "an incremental backup reads one source; it cannot be used with several",
        ));
    };
    Ok(incremental::plan(repo, hint, &source.source, options.engine, known, warn))
}

/// Runs `pass` with `sample`'s sample (the first pass of a plan) read beside it on a thread of
/// its own; returns both results.
fn beside_sample<T>(
    repo: &Repository,
    sources: &[Source],
    engine: io::Engine,
    sample: Option<&incremental::Plan>,
    cancel: &AtomicBool,
    pass: impl FnOnce() -> T,
) -> (T, Option<Result<incremental::SampleResult, EngineError>>) {
    std::thread::scope(|scope| {
        let checker = sample.map(|sample| {
            let source = &sources[0].source;
            scope.spawn(move || sample.read_sample(repo, source, engine, cancel))
        });
        let pass = pass();
        (pass, checker.map(|checker| checker.join().expect("the sample reader does not panic")))
    })
}

/// What one pass gathered, the engines that read, and where each chunk the run stored (or
/// carried from an earlier pass) is.
type PassOutput = (Vec<Collected>, Vec<io::Engine>, HashMap<ChunkHash, PackId>);

/// One pass of the pipeline over every source, deduplicating against `known` and `carried`
/// (chunks an earlier pass stored); returns what the collector gathered, the engines, and
/// where every chunk this pass stored or carried is.
#[allow(clippy::too_many_arguments)]
fn run_pass(
    repo: &Repository,
    options: &BackupOptions,
    sources: &[Source],
    known: &ChunkIndex<'_>,
    carried: HashMap<ChunkHash, PackId>,
    plan: Option<&incremental::Plan>,
    budget: &Budget,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<PassOutput, EngineError> {
    let control = JobControl::new();
    let part_spares = bounded(options.parts_in_flight + 2);
    let uploader =
        Uploader::new(repo.store.as_ref(), &control, progress, options.limit_upload_bytes_per_sec)
            .recycling_into(part_spares.0.clone());
    let shared = Shared {
        store: repo.store.as_ref(),
        crypt: &repo.crypt,
        progress,
        control: &control,
        known,
        dedup: Mutex::new(carried.into_iter().map(|(hash, pack)| (hash, Some(pack))).collect()),
        part_spares,
        pack_size_bytes: options.pack_size_bytes.max(1),
        uploader,
    };
    let (collected, engines) = run_pipeline(repo, options, sources, plan, &shared, budget, cancel)?;
    let dedup = shared.dedup.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    // After a successful pass every claimed chunk is in a stored pack.
    let stored = dedup.into_iter().filter_map(|(hash, pack)| Some((hash, pack?))).collect();
    Ok((collected, engines, stored))
}

/// The manifests of a finished pass, one per source.
#[allow(clippy::too_many_arguments)]
fn build_manifests(
    repo: &Repository,
    options: &BackupOptions,
    sources: &[Source],
    collected: Vec<Collected>,
    known: &ChunkIndex<'_>,
    stored: &HashMap<ChunkHash, PackId>,
    started: Instant,
    started_at: layout::Timestamp,
) -> Result<Vec<Manifest>, EngineError> {
    let chunk_size_bytes = repo.config.chunk_size_bytes;
    let mut manifests = Vec::with_capacity(sources.len());
    for (source, collected) in sources.iter().zip(collected) {
        let mut packs = BTreeSet::new();
        for hash in collected.table.iter().flatten() {
            let pack = stored.get(hash).copied().or_else(|| known.get(hash));
            let _ = packs.insert(pack.expect("every chunk of a finished backup is in a pack"));
        }
        let mut manifest = Manifest {
            format_version: layout::FORMAT_VERSION,
            backup_id: source.backup_id.clone(),
            repository_id: repo.config.repository_id.clone(),
            source: SourceInfo {
                path: options
                    .source_label
                    .clone()
                    .unwrap_or_else(|| source.source.path.display().to_string()),
                kind: if source.source.info.is_block_device { "block_device" } else { "file" }
                    .into(),
                logical_block_bytes: source.source.info.logical_block_bytes,
            },
            volume_size_bytes: source.source.info.size_bytes,
            chunk_size_bytes,
            started_at,
            completed_at: layout::Timestamp::now(),
            packs: packs.into_iter().collect(),
            chunks: collected.table,
            stats: collected.stats,
            base: None,
        };
        manifest.stats.duration_ms =
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        manifest.validate()?;
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// Opens and probes every source before any work starts, and names its backup.
fn open_sources(
    repo: &Repository,
    options: &BackupOptions,
    paths: &[PathBuf],
    started_at: layout::Timestamp,
    progress: &Progress,
    warn: &dyn Fn(String),
) -> Result<Vec<Source>, EngineError> {
    let usage = |message: String| EngineError::new(ErrorKind::Usage, message);
    if paths.is_empty() {
        return Err(usage("no source to back up".into()));
    }
    if (options.backup_id.is_some() || options.source_label.is_some()) && paths.len() > 1 {
        return Err(usage(
            "--backup-id names one backup; it cannot be used with several sources".into(),
        ));
    }
    let mut sources = Vec::with_capacity(paths.len());
    for (position, path) in paths.iter().enumerate() {
        if paths[..position].contains(path) {
            return Err(usage(format!("source {} is given twice", path.display())));
        }
        let source = plane::open_source(path, warn)?;
        if source.info.size_bytes == 0 {
            return Err(usage(format!("source {} has size 0", path.display())));
        }
        Progress::add(&progress.bytes_total, source.info.size_bytes);
        let backup_id = match &options.backup_id {
            Some(id) => checked_new_id(repo, id)?,
            None => format!("{}-{}", started_at.compact(), &PackId::random().to_hex()[..8]),
        };
        sources.push(Source { source, backup_id });
    }
    Ok(sources)
}

fn checked_new_id(repo: &Repository, id: &str) -> Result<String, EngineError> {
    if !layout::backup_id_valid(id) {
        return Err(EngineError::new(ErrorKind::Usage, format!("invalid backup id {id:?}")));
    }
    match repo.load_manifest(id) {
        Err(error) if error.kind == ErrorKind::NotFound => Ok(id.to_string()),
        Err(error) => Err(error),
        Ok(_) => Err(EngineError::new(ErrorKind::Refused, format!("backup {id} already exists"))),
    }
}

fn run_pipeline(
    repo: &Repository,
    options: &BackupOptions,
    sources: &[Source],
    plan: Option<&incremental::Plan>,
    shared: &Shared<'_>,
    budget: &Budget,
    cancel: &AtomicBool,
) -> Result<(Vec<Collected>, Vec<io::Engine>), EngineError> {
    let control = shared.control;
    let (free_tx, free_rx) =
        plane::buffer_pool(budget.chunk_buffer_count, budget.chunk_buffer_bytes);
    let (chunk_txs, chunk_rxs): (Vec<_>, Vec<_>) =
        sources.iter().map(|_| bounded::<ReadChunk>(budget.chunk_buffer_count)).unzip();
    let (compressed_tx, compressed_rx) = bounded::<Compressed>(budget.compressed_queue_count);
    let (spare_tx, spare_rx) = bounded::<Vec<u8>>(budget.compressed_queue_count);
    let (part_tx, part_rx) = bounded::<UploadJob<PackTag>>(1);
    let (report_tx, report_rx) = bounded::<Report>(1024);
    let chunk_size_bytes = repo.config.chunk_size_bytes as usize;
    let (collected, engines) = std::thread::scope(|scope| {
        let read_rx = plane::pace_reads(
            scope,
            &free_rx,
            options.limit_read_bytes_per_sec,
            chunk_size_bytes as u64,
            control,
        );
        let mut readers = Vec::with_capacity(sources.len());
        for (source, chunk_tx) in sources.iter().zip(chunk_txs) {
            let read_options = plane::read_options(
                &source.source,
                options.engine,
                chunk_size_bytes,
                options.queue_depth,
            );
            readers.push(plane::spawn_reader_of(
                scope,
                &source.source,
                read_options,
                plan.map(|plan| plan.chunks.as_slice()),
                read_rx.clone(),
                chunk_tx,
                control,
            ));
        }
        for _ in 0..options.worker_count.max(1) {
            let (chunk_rxs, free_tx) = (chunk_rxs.clone(), free_tx.clone());
            let (compressed_tx, spare_rx, report_tx) =
                (compressed_tx.clone(), spare_rx.clone(), report_tx.clone());
            let level = options.compression_level;
            let _ = scope.spawn(move || {
                let outputs = WorkerOutputs { free_tx, compressed_tx, spare_rx, report_tx };
                work_chunks(repo, shared, level, &chunk_rxs, &outputs);
            });
        }
        drop((chunk_rxs, free_tx, free_rx, read_rx, compressed_tx, spare_rx));
        for _ in 0..budget.transfers_in_flight {
            let (part_rx, report_tx) = (part_rx.clone(), report_tx.clone());
            let _ = scope.spawn(move || {
                let stored = |pack: &PooledObject<PackTag>| {
                    let (id, size, entries) = lock(&pack.tag).take().expect("closed pack");
                    store_index(shared, id, size, entries, &report_tx)
                };
                shared.uploader.work(&part_rx, &stored);
            });
        }
        drop(part_rx);
        let packer_report_tx = report_tx.clone();
        let _ = scope.spawn(move || {
            if let Err(error) =
                pack_chunks(shared, &compressed_rx, &spare_tx, &part_tx, &packer_report_tx)
            {
                control.fail(error);
            }
        });
        drop(report_tx);
        let chunk_size = repo.config.chunk_size_bytes;
        let collected = collect_reports(shared, &report_rx, sources, plan, chunk_size, cancel);
        let engines: Vec<Option<io::Engine>> =
            readers.into_iter().map(|r| r.join().expect("reader thread does not panic")).collect();
        (collected, engines)
    });
    settle(shared, cancel, collected, engines)
}

/// Turns the pipeline's outputs into a result, aborting open uploads on failure.
fn settle(
    shared: &Shared<'_>,
    cancel: &AtomicBool,
    collected: Vec<Collected>,
    engines: Vec<Option<io::Engine>>,
) -> Result<(Vec<Collected>, Vec<io::Engine>), EngineError> {
    if let Err(error) = shared.control.outcome(cancel, "backup cancelled; no manifest written") {
        shared.uploader.abort_open();
        return Err(error);
    }
    for source in &collected {
        assert!(source.seen.iter().all(|&s| s), "every chunk of every source was processed");
    }
    let engines = engines.into_iter().map(|e| e.expect("a successful reader reports its engine"));
    Ok((collected, engines.collect()))
}

/// The calling thread's loop: records every chunk's result, the packs stored, and relays
/// cancellation to the pipeline.
fn collect_reports(
    shared: &Shared<'_>,
    report_rx: &Receiver<Report>,
    sources: &[Source],
    plan: Option<&incremental::Plan>,
    chunk_size: u32,
    cancel: &AtomicBool,
) -> Vec<Collected> {
    let mut collected: Vec<Collected> = sources
        .iter()
        .map(|source| {
            let chunk_count = layout::chunk_count(source.source.info.size_bytes, chunk_size);
            let count = usize::try_from(chunk_count).expect("chunk table fits memory");
            let stats = BackupStats { chunk_count, ..BackupStats::default() };
            Collected { table: vec![None; count], seen: vec![false; count], stats }
        })
        .collect();
    if let (Some(plan), [entry]) = (plan, &mut collected[..]) {
        // An incremental read: the chunks it does not read are the parent's.
        for (index, hash) in plan.carried() {
            entry.seen[index] = true;
            entry.table[index] = hash;
            match hash {
                None => entry.stats.zero_chunk_count += 1,
                Some(_) => entry.stats.dedup_chunk_count += 1,
            }
        }
    }
    let mut pack_count = 0;
    while let Some(report) = shared.control.recv_relaying(report_rx, cancel) {
        match report {
            Report::Chunk { source, chunk_index, length, hash, stored } => {
                let entry = &mut collected[source];
                let position = usize::try_from(chunk_index).expect("index fits");
                assert!(
                    !entry.seen[position],
                    "chunk {chunk_index} of source {source} reported twice"
                );
                entry.seen[position] = true;
                entry.table[position] = hash;
                entry.stats.bytes_read += length;
                match (hash, stored) {
                    (None, _) => entry.stats.zero_chunk_count += 1,
                    (Some(_), Some(stored)) => {
                        entry.stats.new_chunk_count += 1;
                        entry.stats.new_raw_bytes += length;
                        entry.stats.new_stored_bytes += stored;
                    }
                    (Some(_), None) => entry.stats.dedup_chunk_count += 1,
                }
            }
            Report::Pack { pack, hashes } => {
                let mut dedup = lock(&shared.dedup);
                for hash in hashes {
                    let _ = dedup.insert(hash, Some(pack));
                }
                pack_count += 1;
            }
        }
    }
    for entry in &mut collected {
        entry.stats.pack_count = pack_count;
    }
    collected
}

/// Where a chunk worker sends its results.
struct WorkerOutputs {
    free_tx: Sender<io::AlignedBuf>,
    compressed_tx: Sender<Compressed>,
    spare_rx: Receiver<Vec<u8>>,
    report_tx: Sender<Report>,
}

/// A chunk worker: takes chunks from any source's reader, then zero check, hash, dedup claim,
/// compression and, in an encrypted repository, sealing.
fn work_chunks(
    repo: &Repository,
    shared: &Shared<'_>,
    compression_level: i32,
    chunk_rxs: &[Receiver<ReadChunk>],
    outputs: &WorkerOutputs,
) {
    let mut compressor = Compressor::new(compression_level);
    let mut select = crossbeam_channel::Select::new();
    for chunk_rx in chunk_rxs {
        let _ = select.recv(chunk_rx);
    }
    let mut open_count = chunk_rxs.len();
    while open_count > 0 && !shared.stopped() {
        let operation = select.select();
        let source = operation.index();
        let Ok(chunk) = operation.recv(&chunk_rxs[source]) else {
            select.remove(source);
            open_count -= 1;
            continue;
        };
        let data = chunk.buf.as_slice();
        let length = data.len() as u64;
        Progress::add(&shared.progress.bytes_read, length);
        let (hash, stored) = if chunk::is_zero(data) {
            (None, None)
        } else {
            let hash = repo.hasher.hash(data);
            let new = shared.known.get(&hash).is_none()
                && match lock(&shared.dedup).entry(hash) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        let _ = slot.insert(None);
                        true
                    }
                };
            let mut stored = None;
            if new {
                let mut out = outputs.spare_rx.try_recv().unwrap_or_default();
                let encoding = compressor.compress(data, &mut out);
                let raw_bytes = u32::try_from(data.len()).expect("chunks are below 4 GiB");
                // Sealed here, in the parallel workers, not in the serial packer.
                repo.crypt.seal_record(&hash, encoding, raw_bytes, &mut out);
                Progress::add(&shared.progress.bytes_new, length);
                stored = Some((RECORD_HEADER_BYTES + out.len()) as u64);
                let compressed = Compressed { hash, raw_bytes, encoding, data: out };
                if outputs.compressed_tx.send(compressed).is_err() {
                    break;
                }
            }
            (Some(hash), stored)
        };
        let report = Report::Chunk { source, chunk_index: chunk.chunk_index, length, hash, stored };
        let _ = outputs.free_tx.send(chunk.buf);
        if outputs.report_tx.send(report).is_err() {
            break;
        }
    }
}

/// The pack being filled by the packer.
struct OpenPack {
    pack: PackId,
    upload: Option<std::sync::Arc<PooledObject<PackTag>>>,
    part: Vec<u8>,
    part_count: u32,
    size_bytes: u64,
    entries: Vec<IndexEntry>,
}

impl OpenPack {
    fn new(shared: &Shared<'_>) -> OpenPack {
        OpenPack {
            pack: PackId::random(),
            upload: None,
            part: shared.new_part(),
            part_count: 0,
            size_bytes: 0,
            entries: Vec::new(),
        }
    }
}

fn part_capacity() -> usize {
    limits::PART_SIZE_BYTES + limits::CHUNK_SIZE_BYTES_MAX as usize + RECORD_HEADER_BYTES
}

fn uploaders_gone() -> EngineError {
    EngineError::new(ErrorKind::Internal, "uploaders exited early")
}

/// The packer: appends records to parts, parts to packs, and hands full parts to the uploaders.
fn pack_chunks(
    shared: &Shared<'_>,
    compressed_rx: &Receiver<Compressed>,
    spare_tx: &Sender<Vec<u8>>,
    part_tx: &Sender<UploadJob<PackTag>>,
    report_tx: &Sender<Report>,
) -> Result<(), EngineError> {
    let mut open: Option<OpenPack> = None;
    while let Ok(chunk) = compressed_rx.recv() {
        if shared.stopped() {
            return Ok(());
        }
        let pack = open.get_or_insert_with(|| OpenPack::new(shared));
        let header = layout::encode_record_header(
            &chunk.hash,
            (chunk.encoding, shared.crypt.is_sealed()),
            chunk.raw_bytes,
            &chunk.data,
        );
        let stored_bytes = u32::try_from(chunk.data.len()).expect("chunks are below 4 GiB");
        pack.entries.push(IndexEntry {
            hash: chunk.hash,
            offset: pack.size_bytes,
            stored_bytes,
            raw_bytes: chunk.raw_bytes,
        });
        pack.part.extend_from_slice(&header);
        pack.part.extend_from_slice(&chunk.data);
        pack.size_bytes += (RECORD_HEADER_BYTES + chunk.data.len()) as u64;
        let _ = spare_tx.try_send(chunk.data);
        if pack.part.len() >= limits::PART_SIZE_BYTES {
            flush_part(shared, pack, part_tx)?;
        }
        if pack.size_bytes >= shared.pack_size_bytes {
            close_pack(shared, open.take().expect("open"), part_tx, report_tx)?;
        }
    }
    if let Some(pack) = open.take()
        && !shared.stopped()
    {
        close_pack(shared, pack, part_tx, report_tx)?;
    }
    Ok(())
}

fn flush_part(
    shared: &Shared<'_>,
    pack: &mut OpenPack,
    part_tx: &Sender<UploadJob<PackTag>>,
) -> Result<(), EngineError> {
    let object = match &pack.upload {
        Some(object) => std::sync::Arc::clone(object),
        None => {
            let object = shared.uploader.begin(pack.pack.pack_key(), Mutex::new(None))?;
            pack.upload = Some(std::sync::Arc::clone(&object));
            object
        }
    };
    pack.part_count += 1;
    let data = Bytes::from(std::mem::replace(&mut pack.part, shared.new_part()));
    let job = UploadJob::Part { object, part_number: pack.part_count, data };
    part_tx.send(job).map_err(|_| uploaders_gone())
}

fn close_pack(
    shared: &Shared<'_>,
    mut pack: OpenPack,
    part_tx: &Sender<UploadJob<PackTag>>,
    report_tx: &Sender<Report>,
) -> Result<(), EngineError> {
    let tag = (pack.pack, pack.size_bytes, std::mem::take(&mut pack.entries));
    if pack.upload.is_none() {
        // A pack that fits one part is a single PUT: one request instead of three.
        let object = shared.uploader.single(pack.pack.pack_key(), Mutex::new(Some(tag)));
        let data = Bytes::from(std::mem::take(&mut pack.part));
        return part_tx.send(UploadJob::Put { object, data }).map_err(|_| uploaders_gone());
    }
    if !pack.part.is_empty() {
        flush_part(shared, &mut pack, part_tx)?;
    }
    let _ = shared.part_spares.0.try_send(std::mem::take(&mut pack.part));
    let object = pack.upload.take().expect("multipart pack");
    *lock(&object.tag) = Some(tag);
    match shared.uploader.close(&object, pack.part_count) {
        Some(receipts) => {
            shared.uploader.complete(&object, &receipts)?;
            let (id, size, entries) = lock(&object.tag).take().expect("closed pack");
            store_index(shared, id, size, entries, report_tx)
        }
        None => Ok(()),
    }
}

/// Writes a pack's index object (after the pack itself is durable) and reports the pack.
fn store_index(
    shared: &Shared<'_>,
    pack: PackId,
    pack_size_bytes: u64,
    entries: Vec<IndexEntry>,
    report_tx: &Sender<Report>,
) -> Result<(), EngineError> {
    let hashes = entries.iter().map(|entry| entry.hash).collect();
    let index = PackIndex { pack, pack_size_bytes, entries };
    let encoded = Bytes::from(layout::encode_document(shared.crypt, ObjectKind::Index, &index));
    Progress::add(&shared.progress.bytes_uploaded, encoded.len() as u64);
    shared.store.put(&pack.index_key(), encoded)?;
    let _ = report_tx.send(Report::Pack { pack, hashes });
    Ok(())
}
