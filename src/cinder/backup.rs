//! The Cinder-format backup job: device → data objects in Cinder's layout → `_sha256file` →
//! `_metadata`, last. Built from the shared `plane` scaffolding, like `native::backup`.
//!
//! Threads (scoped): one pinned reader (O_DIRECT, behind the `--limit-read` pacer) filling
//! `read chunk` buffers (a divisor of the object size, at most 4 MiB); `workers` workers that
//! take two kinds of work, preferring the second: SHA-256 of every block of a chunk read, and the
//! encoding tasks of an object (zlib segments, one per chunk-slice, compressed independently and
//! joined into one zlib stream with a combined Adler-32, so one 50 MiB object is compressed on
//! every core; or one whole-object task for bz2/zstd; and the MD5 of the object's raw bytes); the
//! calling thread as sequencer (collects an object's chunks in volume order, plans its objects —
//! the whole object, or its changed runs for an incremental — numbers them as Cinder does, and
//! queues their encoding, then their upload); and the `plane` uploader pool (single PUT, or
//! multipart parts of one or several objects at once). Memory is the job's `Budget`: one object
//! of read chunks plus read-ahead, its encoded segments, and two object bodies.
//!
//! `_sha256file` then `_metadata` are written after every data object is stored: a backup without
//! its `_metadata` is incomplete, and its objects are deleted (and multipart uploads aborted) on
//! failure or cancellation.
//!
//! An incremental with a change list (`BackupJob::changes`: a Lightbits snapshot diff or
//! `--changed-ranges`) reads only the read chunks the list touches (after the sampling check of
//! `plane::changes`, judged by the parent's `_sha256file`); the sequencer takes every other
//! chunk's block hashes from the parent's `_sha256file`, so the new one is complete, and such a
//! chunk has no changed blocks, so it uploads nothing (Cinder writes no object for it either).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Select, Sender, bounded};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::bucket::{find_in, list_volume, load_sha256file, now, size_gib};
use super::layout::names::{data_object_name, metadata_name, object_prefix, sha256file_name};
use super::layout::zlib_segments::{self, Segment};
use super::{
    Algorithm, Codec, Extent, Geometry, Hash, Metadata, ObjectEntry, Sha256File, changed_extents,
    check_incremental, encode_with,
};
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, ReadChunk};
use crate::limits::Budget;
use crate::native::layout::BaseInfo;
use crate::plane::changes::{self, ChangeList};
use crate::plane::{self, JobControl, PooledObject, UploadJob, Uploader, lock};
use crate::progress::Progress;

/// Largest read chunk: the unit of SHA-256 work and of zlib segments.
const READ_CHUNK_BYTES_MAX: usize = 4 << 20;

/// What to back up, and how.
#[derive(Debug, Clone)]
pub struct BackupJob {
    /// Device or image file.
    pub source: PathBuf,
    /// Reader engine.
    pub engine: io::Engine,
    /// The backup's UUID.
    pub backup_id: String,
    /// The volume's UUID.
    pub volume_id: String,
    /// Parent backup UUID: makes this an incremental.
    pub parent_id: Option<String>,
    /// Where `parent_id` came from: `true` when from a hint (a Lightbits diff base) rather than
    /// the user, so that a parent that cannot be used (missing, another block size, a volume
    /// that grew) is a warning and a full backup instead of an error.
    pub parent_is_hint: bool,
    /// The source's changes since `parent_id` (a Lightbits diff, `--changed-ranges`): only the
    /// read chunks they touch are read. A list that cannot be trusted is a warning and a full
    /// read; without a usable parent it is not used.
    pub changes: Option<ChangeList>,
    /// `backup_compression_algorithm`.
    pub algorithm: Algorithm,
    /// `backup_s3_object_size` and `backup_s3_block_size`.
    pub geometry: Geometry,
    /// `storage_availability_zone`, part of the prefix.
    pub availability_zone: String,
    /// `display_name`.
    pub name: Option<String>,
    /// `display_description`.
    pub description: Option<String>,
    /// The volume's metadata as Cinder stores it in `volume_meta` (a JSON string), if known.
    pub volume_meta: Option<String>,
    /// Hash/compress workers.
    pub workers: usize,
    /// Upload requests (single PUTs or parts) in flight.
    pub uploads: usize,
    /// zlib level for `zlib`/`gzip` (Cinder's is 6).
    pub zlib_level: u32,
    /// `--limit-read`, bytes per second.
    pub limit_read_bytes_per_sec: Option<u64>,
    /// `--limit-upload`, bytes per second.
    pub limit_upload_bytes_per_sec: Option<u64>,
}

/// What a finished backup reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupOutcome {
    /// The backup's prefix (`service_metadata`).
    pub prefix: String,
    /// Data objects written (`object_count`).
    pub object_count: u64,
    /// Bytes of the source.
    pub volume_size_bytes: u64,
    /// Uncompressed bytes in data objects.
    pub data_bytes: u64,
    /// Bytes uploaded (data objects, `_sha256file`, `_metadata`).
    pub bytes_uploaded: u64,
    /// Objects stored raw (`none`) because compression did not shrink them.
    pub raw_object_count: u64,
    /// The backup's parent, for an incremental.
    pub parent_id: Option<String>,
    /// Bytes read from the source (the sampling check included).
    pub bytes_read: u64,
    /// The read chunk: the unit of reading, and of a change list's plan.
    pub read_chunk_bytes: u64,
    /// What a change list made of this incremental, when it was trusted (its read chunks).
    pub base: Option<BaseInfo>,
    /// Reader engine that ran.
    pub io_engine: &'static str,
    /// Whether the source was read with O_DIRECT.
    pub direct_io: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// The read chunk for `object_size` on a device with O_DIRECT granule `granule`: the largest
/// divisor of the object size that is a multiple of the granule and of the SHA-256 block, and
/// at most `READ_CHUNK_BYTES_MAX` (or that unit itself when it is larger).
///
/// # Errors
/// `Usage` when the object size is not a multiple of the granule and the block.
pub fn read_chunk_bytes(geometry: Geometry, granule: usize) -> Result<usize, EngineError> {
    let object_size = usize::try_from(geometry.object_size())
        .map_err(|_| EngineError::new(ErrorKind::Usage, "object size does not fit memory"))?;
    let block = geometry.block_size() as usize;
    let unit = lcm(granule.max(1), block.max(1));
    if !object_size.is_multiple_of(unit) {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "backup_s3_object_size {object_size} must be a multiple of {unit} (the SHA-256 \
                 block and the O_DIRECT alignment of the source)"
            ),
        ));
    }
    let units = object_size / unit;
    let best = (1..=units)
        .filter(|k| units.is_multiple_of(*k) && k * unit <= READ_CHUNK_BYTES_MAX)
        .max()
        .unwrap_or(1);
    Ok(best * unit)
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// The memory budget of `job` reading `read_chunk` bytes at a time.
pub fn budget(job: &BackupJob, read_chunk: usize) -> Budget {
    Budget::cinder_backup(job.geometry.object_size() as usize, read_chunk, job.uploads.max(1))
}

/// A chunk read, shared by the tasks that use it; its buffer goes back to the pool when the last
/// of them drops it.
struct Held {
    chunk: Option<ReadChunk>,
    free_tx: Sender<AlignedBuf>,
}

impl Held {
    fn data(&self) -> &[u8] {
        self.chunk.as_ref().expect("held until dropped").buf.as_slice()
    }
    fn offset(&self) -> u64 {
        self.chunk.as_ref().expect("held until dropped").offset
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            let _ = self.free_tx.send(chunk.buf);
        }
    }
}

/// A slice of one held chunk.
#[derive(Clone)]
struct Slice {
    held: Arc<Held>,
    range: std::ops::Range<usize>,
}

impl Slice {
    fn bytes(&self) -> &[u8] {
        &self.held.data()[self.range.clone()]
    }
}

/// The bytes of `slices`, in order, in one buffer.
fn concat(slices: &[Slice]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(slices.iter().map(|s| s.range.len()).sum());
    for slice in slices {
        raw.extend_from_slice(slice.bytes());
    }
    raw
}

/// A chunk whose blocks are hashed, on its way to the sequencer; or a chunk a change list
/// leaves unread, with the parent's hashes and no bytes.
struct Hashed {
    chunk_index: u64,
    held: Option<Arc<Held>>,
    hashes: Vec<Hash>,
}

/// Work for the pool besides hashing.
enum Task {
    /// One zlib segment of object `object` (segment `index` of its slices).
    Segment { object: u64, index: usize, slice: Slice, last: bool },
    /// A whole object's body with a non-segmented codec.
    Whole { object: u64, slices: Vec<Slice> },
    /// The MD5 of an object's raw bytes.
    Md5 { object: u64, slices: Vec<Slice> },
}

/// What a task produced.
enum Done {
    Hashed(Hashed),
    Segment { object: u64, index: usize, segment: Segment },
    Whole { object: u64, body: Option<Vec<u8>> },
    Md5 { object: u64, md5: String },
}

/// An object being encoded.
struct Pending {
    slices: Vec<Slice>,
    /// Encoding the codec would use (`None` once samples say the object does not compress).
    compression: Algorithm,
    segments: Vec<Option<Segment>>,
    segments_left: usize,
    whole: Option<Option<Vec<u8>>>,
    md5: Option<String>,
}

impl Pending {
    fn ready(&self) -> bool {
        let encoded = match self.compression.codec() {
            Codec::Raw => true,
            Codec::Zlib => self.segments_left == 0,
            Codec::Bzip2 | Codec::Zstd => self.whole.is_some(),
        };
        encoded && self.md5.is_some()
    }
}

/// A byte budget for object bodies alive at once (queued or uploading).
#[derive(Debug)]
struct BodyGate {
    free: Mutex<usize>,
    changed: Condvar,
}

impl BodyGate {
    fn take(&self, bytes: usize, control: &JobControl) -> bool {
        let mut free = lock(&self.free);
        while *free < bytes && !control.stopped() {
            free = self
                .changed
                .wait_timeout(free, plane::POLL_INTERVAL)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        if control.stopped() {
            return false;
        }
        *free -= bytes;
        true
    }
    fn give(&self, bytes: usize) {
        *lock(&self.free) += bytes;
        self.changed.notify_all();
    }
}

/// What the uploader pool needs about an object: its body size, to give back to the gate.
type BodyTag = usize;

struct Shared<'a> {
    job: &'a BackupJob,
    progress: &'a Progress,
    control: &'a JobControl,
    uploader: Uploader<'a>,
    gate: BodyGate,
    /// Data objects stored so far (deleted if the backup fails).
    stored: Mutex<Vec<String>>,
    zero_block_hash: Hash,
    /// zlib segments of all-zero slices, by (length, last): runs of zeros are common in volumes,
    /// and their segment is the same every time.
    zero_segments: Mutex<HashMap<(usize, bool), Segment>>,
}

/// Backs up `job.source` into `store` (rooted at the bucket) in Cinder's layout.
///
/// # Errors
/// `Usage` for geometry O_DIRECT cannot read or a budget past the limit, `Refused` when the
/// backup id exists or Cinder would refuse the incremental, `NotFound` for a missing parent,
/// `Device`, `Store`, `Cancelled`.
pub fn backup(
    store: &dyn crate::store::ObjectStore,
    job: &BackupJob,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<BackupOutcome, EngineError> {
    let started = Instant::now();
    let started_at = now();
    let source = plane::open_source(&job.source, warn)?;
    let granule = (source.info.logical_block_bytes as usize).max(io::BUF_ALIGN);
    let read_chunk = read_chunk_bytes(job.geometry, granule)?;
    let budget = budget(job, read_chunk);
    budget
        .check("--cinder-object-size")
        .map_err(|message| EngineError::new(ErrorKind::Usage, message))?;
    let keys = list_volume(store, &job.volume_id)?;
    if find_in(&keys, &job.volume_id, &job.backup_id).is_ok() {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!("Cinder backup {} of volume {} already exists", job.backup_id, job.volume_id),
        ));
    }
    let (parent_id, parent) = resolve_parent(store, job, &keys, &source, warn)?;
    let (plan, sample_bytes) = match (&parent_id, &parent, &job.changes) {
        (Some(parent_id), Some(parent), Some(changes)) => {
            let hint = Hint { parent_id, parent, changes };
            plan_reads(job, &hint, &source, read_chunk, cancel, warn)?
        }
        _ => (None, 0),
    };
    Progress::add(&progress.bytes_read, sample_bytes);
    let prefix = object_prefix(&job.volume_id, &job.backup_id, &job.availability_zone, &started_at);
    Progress::add(&progress.bytes_total, source.info.size_bytes);
    let control = JobControl::new();
    let shared = Shared {
        job,
        progress,
        control: &control,
        uploader: Uploader::new(store, &control, progress, job.limit_upload_bytes_per_sec),
        gate: BodyGate { free: Mutex::new(budget.part_bytes_max), changed: Condvar::new() },
        stored: Mutex::new(Vec::new()),
        zero_block_hash: Sha256::digest(vec![0u8; job.geometry.block_size() as usize]).into(),
        zero_segments: Mutex::new(HashMap::new()),
    };
    let inputs = Inputs { parent: parent.as_deref(), plan: plan.as_ref(), prefix: &prefix };
    let result = run_pipeline(&shared, &source, &budget, read_chunk, &inputs, cancel);
    let (engine, hashes, objects) = match result {
        Ok(done) => done,
        Err(error) => {
            cleanup(store, &shared, &prefix);
            return Err(error);
        }
    };
    source.warn_if_grown(warn);
    let created_at = started_at.python_str();
    let mut sha = Sha256File::new(&job.backup_id, &job.volume_id, &created_at);
    sha.backup_name = job.name.clone();
    sha.backup_description = job.description.clone();
    sha.chunk_size = job.geometry.block_size();
    sha.sha256s = hashes;
    let mut metadata = Metadata::new(&job.backup_id, &job.volume_id, &created_at);
    metadata.backup_name = job.name.clone();
    metadata.backup_description = job.description.clone();
    metadata.parent_id = parent_id.clone();
    metadata.volume_meta = job.volume_meta.clone();
    metadata.objects = objects;
    let documents = [
        (sha256file_name(&prefix), Bytes::from(sha.to_json())),
        (metadata_name(&prefix), Bytes::from(metadata.to_json())),
    ];
    for (key, body) in documents {
        let length = body.len() as u64;
        if let Err(error) = store.put(&key, body) {
            cleanup(store, &shared, &prefix);
            return Err(EngineError::from(error).context(format!("writing {key}")));
        }
        Progress::add(&progress.bytes_uploaded, length);
    }
    Ok(BackupOutcome {
        prefix,
        object_count: metadata.objects.len() as u64,
        volume_size_bytes: source.info.size_bytes,
        data_bytes: metadata.data_bytes(),
        bytes_uploaded: Progress::get(&progress.bytes_uploaded),
        raw_object_count: metadata.objects.iter().filter(|o| o.compression == "none").count()
            as u64,
        parent_id,
        bytes_read: Progress::get(&progress.bytes_read),
        read_chunk_bytes: read_chunk as u64,
        base: plan.map(|plan| plan.base),
        io_engine: engine.name(),
        direct_io: source.opened.direct,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// The parent an incremental is made on and its block hashes, or none: a parent that came from
/// a hint (`parent_is_hint`) and cannot be used is a warning and a full backup; one the user
/// named is an error, as in Cinder.
fn resolve_parent(
    store: &dyn crate::store::ObjectStore,
    job: &BackupJob,
    keys: &[String],
    source: &plane::Source,
    warn: &dyn Fn(String),
) -> Result<(Option<String>, Option<Vec<Hash>>), EngineError> {
    Ok(match &job.parent_id {
        None => (None, None),
        Some(parent_id) => match load_parent(store, job, keys, parent_id, source) {
            // Cinder's own check lets a volume grow within its GiB, then fails on the blocks
            // the parent lacks; a parent the user did not name is not worth that failure.
            Ok(hashes)
                if job.parent_is_hint
                    && (hashes.len() as u64) < job.geometry.blocks_in(source.info.size_bytes) =>
            {
                let why = format!(
                    "the volume was resized: {} bytes now, larger than parent backup {parent_id}; \
                     a full backup",
                    source.info.size_bytes
                );
                changes::fall_back(warn, &why);
                (None, None)
            }
            Ok(hashes) => (Some(parent_id.clone()), Some(hashes)),
            Err(error) if job.parent_is_hint => {
                let why = format!("parent backup {parent_id}: {}; a full backup", error.message);
                changes::fall_back(warn, &why);
                (None, None)
            }
            Err(error) => return Err(error),
        },
    })
}

/// The parent's block hashes, after Cinder's checks of an incremental.
fn load_parent(
    store: &dyn crate::store::ObjectStore,
    job: &BackupJob,
    keys: &[String],
    parent_id: &str,
    source: &plane::Source,
) -> Result<Vec<Hash>, EngineError> {
    let found =
        find_in(keys, &job.volume_id, parent_id).map_err(|e| e.context("incremental parent"))?;
    let sha = load_sha256file(store, &found.prefix)?;
    let parent_gib = size_gib(sha.sha256s.len() as u64 * sha.chunk_size);
    check_incremental(&sha, job.geometry, size_gib(source.info.size_bytes), parent_gib)?;
    Ok(sha.sha256s)
}

/// A change list and the parent it is relative to.
struct Hint<'a> {
    parent_id: &'a str,
    parent: &'a [Hash],
    changes: &'a ChangeList,
}

/// What a trusted change list reads: read chunks, strictly increasing.
#[derive(Debug)]
struct ReadPlan {
    chunks: Vec<u64>,
    base: BaseInfo,
}

/// Checks `hint` against the source (the volume's size, then the sampling check of
/// `plane::changes`, judged by the parent's block hashes) and returns the read chunks to read,
/// or `None` after a warning: a full-read incremental. Also returns the bytes the check read.
fn plan_reads(
    job: &BackupJob,
    hint: &Hint<'_>,
    source: &plane::Source,
    read_chunk: usize,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<(Option<ReadPlan>, u64), EngineError> {
    let size_bytes = source.info.size_bytes;
    let (block, parent) = (job.geometry.block_size(), hint.parent);
    if parent.len() as u64 != job.geometry.blocks_in(size_bytes) {
        let why = format!(
            "the volume was resized: {size_bytes} bytes now, {} blocks of {block} bytes in \
             parent backup {}",
            parent.len(),
            hint.parent_id
        );
        changes::fall_back(warn, &why);
        return Ok((None, 0));
    }
    let blocks_per_chunk = read_chunk / block as usize;
    let zero: Hash = Sha256::digest(vec![0u8; block as usize]).into();
    let same = |index: u64, data: &[u8]| {
        let first = usize::try_from(index).expect("index fits") * blocks_per_chunk;
        data.chunks(block as usize)
            .zip(&parent[first..])
            .all(|(bytes, hash)| block_hash(bytes, block as usize, &zero) == *hash)
    };
    let reading = changes::Reading { source, engine: job.engine, chunk_bytes: read_chunk };
    let (checked, sample_bytes) =
        changes::check(hint.changes, reading, hint.parent_id, |_| true, same, cancel, warn)?;
    let Some(checked) = checked else { return Ok((None, sample_bytes)) };
    let base = BaseInfo {
        parent_backup_id: hint.parent_id.to_owned(),
        changes_from: hint.changes.changes_from.clone(),
        chunks_read: checked.read.len() as u64,
        chunks_sampled: checked.sampled.len() as u64,
        chunks_carried: checked.chunk_count - checked.read.len() as u64,
    };
    Ok((Some(ReadPlan { chunks: checked.read, base }), sample_bytes))
}

/// Deletes the objects a failed backup stored and aborts its open uploads (Cinder deletes a
/// failed backup's objects). Besides the objects the job knows it stored, everything listed
/// under the backup's prefix goes: a PUT or completion whose response was lost stored its object
/// without the job knowing (and `_sha256file`, or `_metadata` itself, may be there).
fn cleanup(store: &dyn crate::store::ObjectStore, shared: &Shared<'_>, prefix: &str) {
    shared.uploader.abort_open();
    let mut keys: std::collections::BTreeSet<String> =
        lock(&shared.stored).iter().cloned().collect();
    // Best effort, like the deletes: a store that cannot list leaves what it stored unknown.
    // Only this backup's names: another backup id may start with this one's.
    let ours = |key: &str| {
        key.strip_prefix(prefix).is_some_and(|rest| {
            rest == "_sha256file"
                || rest == "_metadata"
                || rest
                    .strip_prefix('-')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    if let Ok(listed) = store.list(prefix) {
        keys.extend(listed.into_iter().map(|object| object.key).filter(|key| ours(key)));
    }
    for key in keys {
        let _ = store.delete(&key);
    }
}

type BackupParts = (io::Engine, Vec<Hash>, Vec<ObjectEntry>);

/// What the pipeline builds on: the parent's block hashes (an incremental), the read chunks a
/// trusted change list reads, and the backup's prefix.
struct Inputs<'a> {
    parent: Option<&'a [Hash]>,
    plan: Option<&'a ReadPlan>,
    prefix: &'a str,
}

fn run_pipeline(
    shared: &Shared<'_>,
    source: &plane::Source,
    budget: &Budget,
    read_chunk: usize,
    inputs: &Inputs<'_>,
    cancel: &AtomicBool,
) -> Result<BackupParts, EngineError> {
    let control = shared.control;
    let job = shared.job;
    let (free_tx, free_rx) =
        plane::buffer_pool(budget.chunk_buffer_count, budget.chunk_buffer_bytes);
    let (chunk_tx, chunk_rx) = bounded::<ReadChunk>(budget.chunk_buffer_count);
    // Unbounded, yet bounded by the pool: every task and every result holds a read chunk (or
    // what was made from one), so they never outnumber the pool's buffers times their tasks;
    // neither side ever blocks on the other, so the sequencer and the workers cannot deadlock.
    let (task_tx, task_rx) = crossbeam_channel::unbounded::<Task>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let (upload_tx, upload_rx) = bounded::<UploadJob<BodyTag>>(1);
    let read_options = plane::read_options(source, job.engine, read_chunk, None);
    let (engine, sequenced) = std::thread::scope(|scope| {
        let read_rx = plane::pace_reads(
            scope,
            &free_rx,
            job.limit_read_bytes_per_sec,
            read_chunk as u64,
            control,
        );
        let chunks = inputs.plan.map(|plan| plan.chunks.as_slice());
        let reader =
            plane::spawn_reader_of(scope, source, read_options, chunks, read_rx, chunk_tx, control);
        drop(free_rx);
        for _ in 0..job.workers.max(1) {
            let (chunk_rx, task_rx, done_tx, free_tx) =
                (chunk_rx.clone(), task_rx.clone(), done_tx.clone(), free_tx.clone());
            let _ = scope.spawn(move || work(shared, &chunk_rx, &task_rx, &done_tx, &free_tx));
        }
        drop((chunk_rx, task_rx, done_tx, free_tx));
        for _ in 0..budget.transfers_in_flight {
            let upload_rx = upload_rx.clone();
            let _ = scope.spawn(move || {
                let stored = |object: &PooledObject<BodyTag>| {
                    lock(&shared.stored).push(object.key.clone());
                    shared.gate.give(object.tag);
                    Ok(())
                };
                shared.uploader.work(&upload_rx, &stored);
            });
        }
        drop(upload_rx);
        let mut sequencer = Sequencer::new(shared, source.info.size_bytes, read_chunk, inputs);
        let sequenced = sequencer.run(&done_rx, &task_tx, &upload_tx, cancel);
        drop((task_tx, upload_tx));
        if sequenced.is_none() {
            control.stop();
        }
        // Drain so that workers blocked on a full result channel can end.
        while done_rx.recv().is_ok() {}
        (reader.join().expect("reader thread does not panic"), sequenced)
    });
    control.outcome(cancel, "backup cancelled; nothing committed")?;
    let (Some(engine), Some((hashes, objects))) = (engine, sequenced) else {
        return Err(EngineError::new(ErrorKind::Internal, "backup pipeline stopped early"));
    };
    assert_eq!(hashes.len() as u64, job.geometry.blocks_in(source.info.size_bytes));
    Ok((engine, hashes, objects))
}

/// A worker: encoding tasks first (they free memory), else hashing of chunks read.
fn work(
    shared: &Shared<'_>,
    chunk_rx: &Receiver<ReadChunk>,
    task_rx: &Receiver<Task>,
    done_tx: &Sender<Done>,
    free_tx: &Sender<AlignedBuf>,
) {
    let mut chunks_open = true;
    let mut tasks_open = true;
    while (chunks_open || tasks_open) && !shared.control.stopped() {
        let done = if let Ok(task) = task_rx.try_recv() {
            run_task(shared, task)
        } else {
            let mut select = Select::new();
            let tasks = tasks_open.then(|| select.recv(task_rx));
            let chunks = chunks_open.then(|| select.recv(chunk_rx));
            let operation = select.select();
            let index = operation.index();
            if Some(index) == tasks {
                match operation.recv(task_rx) {
                    Ok(task) => run_task(shared, task),
                    Err(_) => {
                        tasks_open = false;
                        continue;
                    }
                }
            } else {
                debug_assert_eq!(Some(index), chunks);
                match operation.recv(chunk_rx) {
                    Ok(chunk) => Ok(hash_chunk(shared, chunk, free_tx)),
                    Err(_) => {
                        chunks_open = false;
                        continue;
                    }
                }
            }
        };
        match done {
            Ok(done) => {
                if done_tx.send(done).is_err() {
                    break;
                }
            }
            Err(error) => {
                shared.control.fail(error);
                break;
            }
        }
    }
}

fn hash_chunk(shared: &Shared<'_>, chunk: ReadChunk, free_tx: &Sender<AlignedBuf>) -> Done {
    let block = shared.job.geometry.block_size() as usize;
    let data = chunk.buf.as_slice();
    Progress::add(&shared.progress.bytes_read, data.len() as u64);
    let hashes =
        data.chunks(block).map(|b| block_hash(b, block, &shared.zero_block_hash)).collect();
    let chunk_index = chunk.chunk_index;
    let held = Some(Arc::new(Held { chunk: Some(chunk), free_tx: free_tx.clone() }));
    Done::Hashed(Hashed { chunk_index, held, hashes })
}

/// The SHA-256 of one block of `block` bytes (or the volume's shorter last one); a whole zero
/// block's is `zero` (computed once).
fn block_hash(bytes: &[u8], block: usize, zero: &Hash) -> Hash {
    if bytes.len() == block && crate::native::chunk::is_zero(bytes) {
        *zero
    } else {
        Sha256::digest(bytes).into()
    }
}

fn run_task(shared: &Shared<'_>, task: Task) -> Result<Done, EngineError> {
    let job = shared.job;
    match task {
        Task::Segment { object, index, slice, last } => {
            let bytes = slice.bytes();
            let segment = if crate::native::chunk::is_zero(bytes) {
                let key = (bytes.len(), last);
                let cached = lock(&shared.zero_segments).get(&key).cloned();
                match cached {
                    Some(segment) => segment,
                    None => {
                        let segment = zlib_segments::compress_segment(bytes, job.zlib_level, last)?;
                        let _ = lock(&shared.zero_segments).insert(key, segment.clone());
                        segment
                    }
                }
            } else {
                zlib_segments::compress_segment(bytes, job.zlib_level, last)?
            };
            Ok(Done::Segment { object, index, segment })
        }
        Task::Md5 { object, slices } => {
            let mut md5 = Md5::new();
            for slice in &slices {
                md5.update(slice.bytes());
            }
            let digest = md5.finalize();
            Ok(Done::Md5 { object, md5: digest.iter().map(|b| format!("{b:02x}")).collect() })
        }
        Task::Whole { object, slices } => {
            let raw = concat(&slices);
            let encoded = encode_with(job.algorithm, &raw, job.zlib_level, false)?;
            let body = (encoded.compression != Algorithm::None).then(|| encoded.body.into_owned());
            Ok(Done::Whole { object, body })
        }
    }
}

/// The calling thread's state: chunks waiting for their object, objects being encoded, the
/// results so far.
struct Sequencer<'s, 'a> {
    shared: &'s Shared<'a>,
    volume_size: u64,
    read_chunk: u64,
    chunks_per_object: u64,
    chunk_count: u64,
    parent: Option<&'s [Hash]>,
    /// The read chunks read, when a change list says which (the others are the parent's).
    read: Option<&'s [u64]>,
    prefix: &'s str,
    waiting: BTreeMap<u64, Hashed>,
    next_chunk: u64,
    pending: HashMap<u64, Pending>,
    next_upload: u64,
    hashes: Vec<Hash>,
    objects: Vec<ObjectEntry>,
}

impl<'s, 'a> Sequencer<'s, 'a> {
    fn new(
        shared: &'s Shared<'a>,
        volume_size: u64,
        read_chunk: usize,
        inputs: &Inputs<'s>,
    ) -> Self {
        Sequencer {
            shared,
            volume_size,
            read_chunk: read_chunk as u64,
            chunks_per_object: shared.job.geometry.object_size() / read_chunk as u64,
            chunk_count: volume_size.div_ceil(read_chunk as u64),
            parent: inputs.parent,
            read: inputs.plan.map(|plan| plan.chunks.as_slice()),
            prefix: inputs.prefix,
            waiting: BTreeMap::new(),
            next_chunk: 0,
            pending: HashMap::new(),
            next_upload: 0,
            hashes: Vec::new(),
            objects: Vec::new(),
        }
    }

    fn run(
        &mut self,
        done_rx: &Receiver<Done>,
        task_tx: &Sender<Task>,
        upload_tx: &Sender<UploadJob<BodyTag>>,
        cancel: &AtomicBool,
    ) -> Option<(Vec<Hash>, Vec<ObjectEntry>)> {
        let control = self.shared.control;
        // Objects made only of chunks a change list leaves unread have nothing to wait for.
        if let Err(error) = self.plan_ready_objects(task_tx) {
            control.fail(error);
            return None;
        }
        while self.next_chunk < self.chunk_count || self.next_upload < self.objects.len() as u64 {
            let done = control.recv_relaying(done_rx, cancel)?;
            if control.stopped() {
                return None;
            }
            let step = match done {
                Done::Hashed(hashed) => {
                    let _ = self.waiting.insert(hashed.chunk_index, hashed);
                    self.plan_ready_objects(task_tx)
                }
                Done::Segment { object, index, segment } => {
                    let pending = self.pending.get_mut(&object).expect("pending object");
                    pending.segments[index] = Some(segment);
                    pending.segments_left -= 1;
                    Ok(())
                }
                Done::Whole { object, body } => {
                    self.pending.get_mut(&object).expect("pending object").whole = Some(body);
                    Ok(())
                }
                Done::Md5 { object, md5 } => {
                    self.pending.get_mut(&object).expect("pending object").md5 = Some(md5);
                    Ok(())
                }
            };
            if let Err(error) = step.and_then(|()| self.upload_ready(upload_tx)) {
                control.fail(error);
                return None;
            }
        }
        if control.stopped() {
            return None;
        }
        Some((std::mem::take(&mut self.hashes), std::mem::take(&mut self.objects)))
    }

    /// Plans every object whose chunks have all been hashed, in volume order.
    fn plan_ready_objects(&mut self, task_tx: &Sender<Task>) -> Result<(), EngineError> {
        loop {
            let first = self.next_chunk;
            if first >= self.chunk_count {
                return Ok(());
            }
            let last = (first + self.chunks_per_object).min(self.chunk_count);
            if !(first..last).all(|i| self.waiting.contains_key(&i) || self.carried(i)) {
                return Ok(());
            }
            let chunks: Vec<Hashed> = (first..last).map(|i| self.take_chunk(i)).collect();
            self.next_chunk = last;
            self.plan_object(chunks, task_tx)?;
        }
    }

    /// Whether a change list leaves read chunk `index` unread.
    fn carried(&self, index: u64) -> bool {
        self.read.is_some_and(|read| read.binary_search(&index).is_err())
    }

    /// Read chunk `index`: hashed by a worker, or the parent's hashes for a chunk left unread.
    fn take_chunk(&mut self, index: u64) -> Hashed {
        if let Some(hashed) = self.waiting.remove(&index) {
            return hashed;
        }
        assert!(self.carried(index), "read chunk {index} planned before it was hashed");
        let parent = self.parent.expect("a change list has a parent");
        let blocks_per_chunk = self.read_chunk / self.shared.job.geometry.block_size();
        let first = usize::try_from(index * blocks_per_chunk).expect("fits");
        let last = (first + blocks_per_chunk as usize).min(parent.len());
        Hashed { chunk_index: index, held: None, hashes: parent[first..last].to_vec() }
    }

    fn plan_object(
        &mut self,
        chunks: Vec<Hashed>,
        task_tx: &Sender<Task>,
    ) -> Result<(), EngineError> {
        let job = self.shared.job;
        let start = chunks[0].chunk_index * self.read_chunk;
        let end = (start + job.geometry.object_size()).min(self.volume_size);
        let hashes: Vec<Hash> = chunks.iter().flat_map(|c| c.hashes.iter().copied()).collect();
        let whole = Extent { offset: start, length: end - start };
        let extents = match self.parent {
            None => vec![whole],
            Some(parent) => changed_extents(parent, whole, &hashes, job.geometry)?,
        };
        self.hashes.extend_from_slice(&hashes);
        for extent in extents {
            let slices: Vec<Slice> = chunks
                .iter()
                .filter_map(|c| {
                    let held = c.held.as_ref()?;
                    let (c_start, c_len) = (held.offset(), held.data().len() as u64);
                    let from = extent.offset.max(c_start);
                    let to = extent.end().min(c_start + c_len);
                    (from < to).then(|| Slice {
                        held: Arc::clone(held),
                        range: (from - c_start) as usize..(to - c_start) as usize,
                    })
                })
                .collect();
            // A chunk left unread has the parent's hashes: no changed block, so no extent.
            let covered: usize = slices.iter().map(|slice| slice.range.len()).sum();
            assert_eq!(covered as u64, extent.length, "an object is made of read bytes only");
            self.queue_object(extent, slices, task_tx)?;
        }
        Ok(())
    }

    /// Numbers an object (Cinder numbers them in volume order) and queues its encoding.
    fn queue_object(
        &mut self,
        extent: Extent,
        slices: Vec<Slice>,
        task_tx: &Sender<Task>,
    ) -> Result<(), EngineError> {
        let job = self.shared.job;
        let number = self.objects.len() as u64;
        let name = data_object_name(self.prefix, number + 1);
        let compression = if job.algorithm.codec() != Codec::Raw && looks_incompressible(&slices) {
            Algorithm::None
        } else {
            job.algorithm
        };
        self.objects.push(ObjectEntry {
            name,
            offset: extent.offset,
            length: extent.length,
            compression: String::new(),
            md5: String::new(),
        });
        Progress::add(&self.shared.progress.bytes_new, extent.length);
        let segment_count = if compression.codec() == Codec::Zlib { slices.len() } else { 0 };
        let _ = self.pending.insert(
            number,
            Pending {
                slices: slices.clone(),
                compression,
                segments: vec![None; segment_count],
                segments_left: segment_count,
                whole: None,
                md5: None,
            },
        );
        let gone = || EngineError::new(ErrorKind::Internal, "backup workers exited early");
        task_tx.send(Task::Md5 { object: number, slices: slices.clone() }).map_err(|_| gone())?;
        match compression.codec() {
            Codec::Raw => {}
            Codec::Zlib => {
                let count = slices.len();
                for (index, slice) in slices.into_iter().enumerate() {
                    let task =
                        Task::Segment { object: number, index, slice, last: index + 1 == count };
                    task_tx.send(task).map_err(|_| gone())?;
                }
            }
            Codec::Bzip2 | Codec::Zstd => {
                task_tx.send(Task::Whole { object: number, slices }).map_err(|_| gone())?;
            }
        }
        Ok(())
    }

    /// Uploads encoded objects in number order.
    fn upload_ready(&mut self, upload_tx: &Sender<UploadJob<BodyTag>>) -> Result<(), EngineError> {
        while self.pending.get(&self.next_upload).is_some_and(Pending::ready) {
            let pending = self.pending.remove(&self.next_upload).expect("ready");
            let number = self.next_upload;
            self.next_upload += 1;
            let (compression, body) =
                self.body(pending.compression, pending.segments, pending.whole, &pending.slices);
            drop(pending.slices);
            let entry = &mut self.objects[number as usize];
            entry.compression = compression.name().to_owned();
            entry.md5 = pending.md5.expect("ready");
            let key = entry.name.clone();
            self.upload(key, body, upload_tx)?;
        }
        Ok(())
    }

    /// The object's body: the zlib segments joined, the whole-object encoding, or the raw bytes
    /// when compression did not shrink it (Cinder's rule).
    fn body(
        &self,
        compression: Algorithm,
        segments: Vec<Option<Segment>>,
        whole: Option<Option<Vec<u8>>>,
        slices: &[Slice],
    ) -> (Algorithm, Vec<u8>) {
        let raw_len: usize = slices.iter().map(|s| s.range.len()).sum();
        let encoded = match compression.codec() {
            Codec::Raw => None,
            Codec::Zlib => {
                let segments: Vec<Segment> =
                    segments.into_iter().map(|s| s.expect("done")).collect();
                let compressed: usize = segments.iter().map(|s| s.deflate.len()).sum::<usize>() + 6;
                (compressed < raw_len)
                    .then(|| zlib_segments::assemble(self.shared.job.zlib_level, &segments))
            }
            Codec::Bzip2 | Codec::Zstd => whole.expect("done"),
        };
        match encoded {
            Some(body) => (compression, body),
            None => (Algorithm::None, concat(slices)),
        }
    }

    fn upload(
        &self,
        key: String,
        body: Vec<u8>,
        upload_tx: &Sender<UploadJob<BodyTag>>,
    ) -> Result<(), EngineError> {
        let shared = self.shared;
        let length = body.len();
        if !shared.gate.take(length, shared.control) {
            return Err(EngineError::new(ErrorKind::Cancelled, "stopped"));
        }
        let body = Bytes::from(body);
        let gone = || EngineError::new(ErrorKind::Internal, "uploaders exited early");
        let part = crate::limits::PART_SIZE_BYTES;
        if length <= part {
            let object = shared.uploader.single(key, length);
            return upload_tx.send(UploadJob::Put { object, data: body }).map_err(|_| gone());
        }
        let object = shared.uploader.begin(key, length)?;
        let mut count = 0u32;
        for start in (0..length).step_by(part) {
            count += 1;
            let data = body.slice(start..(start + part).min(length));
            let job = UploadJob::Part { object: Arc::clone(&object), part_number: count, data };
            upload_tx.send(job).map_err(|_| gone())?;
        }
        if let Some(receipts) = shared.uploader.close(&object, count) {
            shared.uploader.complete(&object, &receipts)?;
            lock(&shared.stored).push(object.key.clone());
            shared.gate.give(length);
        }
        Ok(())
    }
}

/// Three samples (start, middle, end of the object) that zlib at level 1 cannot shrink below
/// 97% (`codec::sample_incompressible`, on an object spread over several read buffers): the
/// object is random-like and is stored raw (`none`) without a full pass, as Cinder would store it
/// after finding that compression does not shrink it.
fn looks_incompressible(slices: &[Slice]) -> bool {
    use super::layout::codec::{SAMPLE_BYTES, sample_incompressible};
    let total: usize = slices.iter().map(|s| s.range.len()).sum();
    if total < SAMPLE_BYTES * 8 || slices.is_empty() {
        return false;
    }
    let picks = [&slices[0], &slices[slices.len() / 2], &slices[slices.len() - 1]];
    picks.iter().all(|slice| {
        let bytes = slice.bytes();
        if bytes.len() < SAMPLE_BYTES {
            return false;
        }
        sample_incompressible(&bytes[bytes.len() / 2 - SAMPLE_BYTES / 2..][..SAMPLE_BYTES])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_chunk_divides_the_object_and_the_blocks() {
        let geometry = Geometry::new(52_428_800, 32_768).unwrap();
        // 1600 units of 32 KiB: the largest divisor with at most 4 MiB is 100 units.
        assert_eq!(read_chunk_bytes(geometry, 4096).unwrap(), 3_276_800);
        let geometry = Geometry::new(8 << 20, 32_768).unwrap();
        assert_eq!(read_chunk_bytes(geometry, 4096).unwrap(), 4 << 20);
        let geometry = Geometry::new(3 * 32_768, 32_768).unwrap();
        assert_eq!(read_chunk_bytes(geometry, 4096).unwrap(), 3 * 32_768);
        // An object smaller than the device's O_DIRECT granule cannot be read object by object.
        let geometry = Geometry::new(32_768, 32_768).unwrap();
        assert!(read_chunk_bytes(geometry, 65_536).is_err());
    }
}
