//! The Cinder-format data plane: `backup` (device → Cinder objects in a bucket), `restore` (a
//! Cinder backup chain → device) and `record` (the `cinder backup-import` record of a backup).
//! This is the only part of `cinder` that does I/O; it uses the pure core for every byte that
//! lands in the bucket, and `io` (the unsafe island) through its safe API.
//!
//! Backup threads (scoped): one reader (`io::read_source`, O_DIRECT, one object-size chunk per
//! buffer), `workers` hashers/compressors (SHA-256 of every block, the incremental diff, and
//! compression of each object, per chunk), the calling thread as sequencer (numbers objects in
//! volume order, as Cinder does, and queues them), and `uploads` uploaders (single PUT, or
//! multipart above `limits::PART_SIZE_BYTES`). A chunk's read buffer returns to the pool only
//! once the sequencer has queued its objects, so at most `workers + 2` chunks are between the
//! reader and the upload queue, and peak memory is about `(2 × (workers + 2) + 2 × uploads) ×
//! object size`. `_sha256file` and then `_metadata` are written after every data object is
//! stored: a backup without its `_metadata` is incomplete, and its objects are deleted on failure.
//!
//! Restore threads (scoped): `downloads` downloaders (GET, decompress, split into the ranges no
//! later object overwrites, `visible_ranges`), one writer (`io::write_target`, O_DIRECT), and
//! the calling thread relaying cancellation. Objects may complete in any order; because every
//! byte is written by exactly the object Cinder would have written it with last, the result is
//! Cinder's sequential result.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded};

use super::names::{data_object_name, metadata_name, object_prefix, sha256file_name};
use super::record::BackupRecord;
use super::restore::{ChainLink, RestoreWrite, plan_restore, required_len, visible_ranges};
use super::{
    Algorithm, CinderError, Extent, Geometry, Hash, Metadata, ObjectEntry, Sha256File, UtcTime,
    block_hashes, changed_extents, check_incremental, encode_with, md5_hex,
};
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, ReadChunk, WriteOp};
use crate::limits;
use crate::progress::Progress;
use crate::store::{ObjectStore, PartReceipt};

const GIB: u64 = 1 << 30;
/// Restore buffers: decompressed objects are cut into pieces of at most this size for the writer.
const RESTORE_PIECE_BYTES: usize = 4 << 20;
/// Most links followed through `parent_id` before a chain is declared cyclic.
const CHAIN_LINKS_MAX: usize = 10_000;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn integrity(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Integrity, message)
}

/// Cinder's `backup.size`: the volume size in whole GiB, at least 1.
pub fn size_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).max(1)
}

/// The current time as a [`UtcTime`].
pub fn now() -> UtcTime {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    UtcTime::from_unix(i64::try_from(since.as_secs()).unwrap_or(i64::MAX), since.subsec_micros())
}

/// A backup found in the bucket: its prefix and every key under it.
#[derive(Debug, Clone)]
pub struct Found {
    /// `service_metadata`.
    pub prefix: String,
    /// Keys under the prefix, as a `ListObjectsV2` with that prefix returns them.
    pub listing: Vec<String>,
}

/// The keys under `volume_<volume_id>/`.
fn list_volume(store: &dyn ObjectStore, volume_id: &str) -> Result<Vec<String>, EngineError> {
    Ok(store.list(&format!("volume_{volume_id}/"))?.into_iter().map(|o| o.key).collect())
}

/// Finds the complete backup `backup_id` (its `_metadata` exists) in a volume listing.
fn find_in(keys: &[String], volume_id: &str, backup_id: &str) -> Result<Found, EngineError> {
    let suffix = format!("_backup_{backup_id}_metadata");
    let hits: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.ends_with(&suffix) && k.rsplit('/').next().is_some_and(|last| last.starts_with("az_"))
        })
        .collect();
    let prefix = match hits.as_slice() {
        [one] => one[..one.len() - "_metadata".len()].to_owned(),
        [] => {
            return Err(EngineError::new(
                ErrorKind::NotFound,
                format!(
                    "no Cinder backup {backup_id} of volume {volume_id}: no \
                     volume_{volume_id}/*/az_*{suffix} object"
                ),
            ));
        }
        many => {
            return Err(integrity(format!(
                "several _metadata objects for backup {backup_id}: {many:?}"
            )));
        }
    };
    let listing = keys.iter().filter(|k| k.starts_with(&prefix)).cloned().collect();
    Ok(Found { prefix, listing })
}

/// Finds backup `backup_id` of volume `volume_id`.
///
/// # Errors
/// `NotFound` when it has no `_metadata`; store errors.
pub fn find_backup(
    store: &dyn ObjectStore,
    volume_id: &str,
    backup_id: &str,
) -> Result<Found, EngineError> {
    find_in(&list_volume(store, volume_id)?, volume_id, backup_id)
}

fn get_document(store: &dyn ObjectStore, key: &str) -> Result<Bytes, EngineError> {
    store.get(key).map_err(|error| EngineError::from(error).context(format!("reading {key}")))
}

/// Reads and parses a backup's `_metadata`.
///
/// # Errors
/// Store errors; `Integrity` when it does not parse.
pub fn load_metadata(store: &dyn ObjectStore, prefix: &str) -> Result<Metadata, EngineError> {
    let key = metadata_name(prefix);
    Metadata::parse(&get_document(store, &key)?)
        .map_err(|error| EngineError::from(error).context(&key))
}

/// Reads and parses a backup's `_sha256file`.
///
/// # Errors
/// Store errors; `Integrity` when it does not parse.
pub fn load_sha256file(store: &dyn ObjectStore, prefix: &str) -> Result<Sha256File, EngineError> {
    let key = sha256file_name(prefix);
    Sha256File::parse(&get_document(store, &key)?)
        .map_err(|error| EngineError::from(error).context(&key))
}

// ------------------------------------------------------------------------------------------------
// Backup
// ------------------------------------------------------------------------------------------------

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
    /// `volume_meta`: the JSON text Cinder's `BackupMetadataAPI.get` makes of the volume's row.
    pub volume_meta: Option<String>,
    /// Hash/compress workers.
    pub workers: usize,
    /// Objects uploading at once.
    pub uploads: usize,
    /// zlib level for `zlib`/`gzip` (Cinder's is 6).
    pub zlib_level: u32,
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
    /// Reader engine that ran.
    pub io_engine: &'static str,
    /// Whether the source was read with O_DIRECT.
    pub direct_io: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// One data object, compressed, before it has a number.
struct Piece {
    extent: Extent,
    compression: Algorithm,
    md5: String,
    body: Bytes,
}

/// A processed chunk on its way to the sequencer, with its read buffer.
struct Processed {
    chunk_index: u64,
    hashes: Vec<Hash>,
    pieces: Vec<Piece>,
    buf: AlignedBuf,
}

struct Upload {
    key: String,
    body: Bytes,
}

struct Shared<'a> {
    store: &'a dyn ObjectStore,
    progress: &'a Progress,
    abort: AtomicBool,
    failure: Mutex<Option<EngineError>>,
    /// Data objects stored so far (deleted if the backup fails).
    stored: Mutex<Vec<String>>,
}

impl Shared<'_> {
    fn fail(&self, error: EngineError) {
        let _ = lock(&self.failure).get_or_insert(error);
        self.abort.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// Backs up `job.source` into `store` (rooted at the bucket) in Cinder's layout.
///
/// # Errors
/// `Usage` for geometry O_DIRECT cannot read, `Refused` when the backup id exists or Cinder would
/// refuse the incremental, `NotFound` for a missing parent, `Device`, `Store`, `Cancelled`.
pub fn backup(
    store: &dyn ObjectStore,
    job: &BackupJob,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<BackupOutcome, EngineError> {
    let started = Instant::now();
    let started_at = now();
    let opened = io::open(&job.source, false, false)
        .map_err(|e| EngineError::from(e).context(job.source.display()))?;
    if !opened.direct {
        warn(format!("{}: O_DIRECT refused, reading through the page cache", job.source.display()));
    }
    let info = io::probe(&opened.file)?;
    let object_size = usize::try_from(job.geometry.object_size())
        .map_err(|_| EngineError::new(ErrorKind::Usage, "object size does not fit memory"))?;
    let granule = (info.logical_block_bytes as usize).max(io::BUF_ALIGN);
    if !object_size.is_multiple_of(granule) {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "backup_s3_object_size {object_size} must be a multiple of {granule} for O_DIRECT \
                 reads of {}",
                job.source.display()
            ),
        ));
    }
    let keys = list_volume(store, &job.volume_id)?;
    if find_in(&keys, &job.volume_id, &job.backup_id).is_ok() {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!("Cinder backup {} of volume {} already exists", job.backup_id, job.volume_id),
        ));
    }
    let parent = match &job.parent_id {
        None => None,
        Some(parent_id) => {
            let found = find_in(&keys, &job.volume_id, parent_id)
                .map_err(|e| e.context("incremental parent"))?;
            let sha = load_sha256file(store, &found.prefix)?;
            let parent_gib = size_gib(sha.sha256s.len() as u64 * sha.chunk_size);
            check_incremental(&sha, job.geometry, size_gib(info.size_bytes), parent_gib)?;
            Some(sha.sha256s)
        }
    };
    let prefix = object_prefix(&job.volume_id, &job.backup_id, &job.availability_zone, &started_at);
    Progress::add(&progress.bytes_total, info.size_bytes);
    let shared = Shared {
        store,
        progress,
        abort: AtomicBool::new(false),
        failure: Mutex::new(None),
        stored: Mutex::new(Vec::new()),
    };
    let result = run_backup(&shared, job, &opened.file, &info, parent.as_deref(), &prefix, cancel);
    let (engine, hashes, objects) = match result {
        Ok(done) => done,
        Err(error) => {
            cleanup(&shared);
            return Err(error);
        }
    };
    let created_at = started_at.python_str();
    let mut sha = Sha256File::new(&job.backup_id, &job.volume_id, &created_at);
    sha.backup_name = job.name.clone();
    sha.backup_description = job.description.clone();
    sha.chunk_size = job.geometry.block_size();
    sha.sha256s = hashes;
    let mut metadata = Metadata::new(&job.backup_id, &job.volume_id, &created_at);
    metadata.backup_name = job.name.clone();
    metadata.backup_description = job.description.clone();
    metadata.parent_id = job.parent_id.clone();
    metadata.volume_meta = job.volume_meta.clone();
    metadata.objects = objects;
    let documents = [
        (sha256file_name(&prefix), Bytes::from(sha.to_json())),
        (metadata_name(&prefix), Bytes::from(metadata.to_json())),
    ];
    for (key, body) in documents {
        let length = body.len() as u64;
        if let Err(error) = store.put(&key, body) {
            cleanup(&shared);
            let _ = store.delete(&sha256file_name(&prefix));
            return Err(EngineError::from(error).context(format!("writing {key}")));
        }
        Progress::add(&progress.bytes_uploaded, length);
    }
    Ok(BackupOutcome {
        prefix,
        object_count: metadata.objects.len() as u64,
        volume_size_bytes: info.size_bytes,
        data_bytes: metadata.data_bytes(),
        bytes_uploaded: Progress::get(&progress.bytes_uploaded),
        raw_object_count: metadata.objects.iter().filter(|o| o.compression == "none").count()
            as u64,
        parent_id: job.parent_id.clone(),
        io_engine: engine.name(),
        direct_io: opened.direct,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Deletes the data objects a failed backup stored (Cinder deletes a failed backup's objects).
fn cleanup(shared: &Shared<'_>) {
    for key in lock(&shared.stored).iter() {
        let _ = shared.store.delete(key);
    }
}

type BackupParts = (io::Engine, Vec<Hash>, Vec<ObjectEntry>);

fn run_backup(
    shared: &Shared<'_>,
    job: &BackupJob,
    file: &std::fs::File,
    info: &io::DeviceInfo,
    parent: Option<&[Hash]>,
    prefix: &str,
    cancel: &AtomicBool,
) -> Result<BackupParts, EngineError> {
    let object_size = job.geometry.object_size() as usize;
    let workers = job.workers.max(1);
    let buffers = workers + 2;
    let (free_tx, free_rx) = bounded::<AlignedBuf>(buffers);
    for _ in 0..buffers {
        free_tx.send(AlignedBuf::new(object_size)).expect("pool has room");
    }
    let (chunk_tx, chunk_rx) = bounded::<ReadChunk>(buffers);
    let (done_tx, done_rx) = bounded::<Processed>(buffers);
    let (upload_tx, upload_rx) = bounded::<Upload>(job.uploads.max(1));
    let shape = io::read_shape(file, info, object_size);
    let read_options = io::ReadOptions {
        engine: job.engine,
        chunk_size_bytes: object_size,
        request_size_bytes: shape.request_size_bytes,
        queue_depth: shape.queue_depth,
    };
    let chunk_count = info.size_bytes.div_ceil(object_size as u64);
    let (engine, sequenced) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let result =
                io::read_source(file, info, &read_options, &free_rx, &chunk_tx, &shared.abort);
            drop(chunk_tx);
            match result {
                Ok(stats) => Some(stats.engine),
                Err(error) => {
                    shared.fail(EngineError::from(error).context(job.source.display()));
                    None
                }
            }
        });
        for _ in 0..workers {
            let (chunk_rx, done_tx) = (chunk_rx.clone(), done_tx.clone());
            let _ = scope.spawn(move || {
                while let Ok(chunk) = chunk_rx.recv() {
                    if shared.stopped() {
                        break;
                    }
                    match process_chunk(job, parent, chunk) {
                        Ok(done) => {
                            Progress::add(&shared.progress.bytes_read, done.buf.len() as u64);
                            if done_tx.send(done).is_err() {
                                break;
                            }
                        }
                        Err(error) => {
                            shared.fail(error);
                            break;
                        }
                    }
                }
            });
        }
        drop((chunk_rx, done_tx));
        for _ in 0..job.uploads.max(1) {
            let upload_rx = upload_rx.clone();
            let _ = scope.spawn(move || upload_objects(shared, &upload_rx));
        }
        drop(upload_rx);
        let sequenced = sequence(shared, prefix, &done_rx, &free_tx, &upload_tx, cancel);
        drop((done_rx, free_tx, upload_tx));
        if sequenced.is_none() {
            shared.abort.store(true, Ordering::SeqCst);
        }
        (reader.join().expect("reader thread does not panic"), sequenced)
    });
    if let Some(error) = lock(&shared.failure).take() {
        return Err(error);
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(EngineError::new(ErrorKind::Cancelled, "backup cancelled; nothing committed"));
    }
    let (Some(engine), Some((next_chunk, hashes, objects))) = (engine, sequenced) else {
        return Err(EngineError::new(ErrorKind::Internal, "backup pipeline stopped early"));
    };
    assert_eq!(next_chunk, chunk_count, "every chunk sequenced");
    assert_eq!(hashes.len() as u64, job.geometry.blocks_in(info.size_bytes));
    Ok((engine, hashes, objects))
}

/// Hashes a chunk, plans its objects (the whole chunk, or its changed runs) and compresses them.
fn process_chunk(
    job: &BackupJob,
    parent: Option<&[Hash]>,
    chunk: ReadChunk,
) -> Result<Processed, EngineError> {
    let data = chunk.buf.as_slice();
    let hashes = block_hashes(data, job.geometry.block_size() as usize);
    let whole = Extent { offset: chunk.offset, length: data.len() as u64 };
    let extents = match parent {
        None => vec![whole],
        Some(parent) => changed_extents(parent, whole, &hashes, job.geometry)?,
    };
    let mut pieces = Vec::with_capacity(extents.len());
    for extent in extents {
        let start = (extent.offset - chunk.offset) as usize;
        let raw = &data[start..start + extent.length as usize];
        let encoded = encode_with(job.algorithm, raw, job.zlib_level, true)?;
        let body = match encoded.body {
            std::borrow::Cow::Borrowed(raw) => Bytes::copy_from_slice(raw),
            std::borrow::Cow::Owned(compressed) => Bytes::from(compressed),
        };
        pieces.push(Piece { extent, compression: encoded.compression, md5: md5_hex(raw), body });
    }
    Ok(Processed { chunk_index: chunk.chunk_index, hashes, pieces, buf: chunk.buf })
}

type Sequenced = (u64, Vec<Hash>, Vec<ObjectEntry>);

/// Puts processed chunks back in volume order, numbers their objects `-00001`… as Cinder does,
/// queues the uploads, and returns each read buffer to the pool once its objects are queued.
fn sequence(
    shared: &Shared<'_>,
    prefix: &str,
    done_rx: &Receiver<Processed>,
    free_tx: &Sender<AlignedBuf>,
    upload_tx: &Sender<Upload>,
    cancel: &AtomicBool,
) -> Option<Sequenced> {
    let mut pending: BTreeMap<u64, Processed> = BTreeMap::new();
    let mut next_chunk = 0u64;
    let mut hashes: Vec<Hash> = Vec::new();
    let mut objects: Vec<ObjectEntry> = Vec::new();
    loop {
        if cancel.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::SeqCst);
            return None;
        }
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(done) => {
                let _ = pending.insert(done.chunk_index, done);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        while let Some(done) = pending.remove(&next_chunk) {
            next_chunk += 1;
            hashes.extend_from_slice(&done.hashes);
            for piece in done.pieces {
                let key = data_object_name(prefix, objects.len() as u64 + 1);
                Progress::add(&shared.progress.bytes_new, piece.extent.length);
                objects.push(ObjectEntry {
                    name: key.clone(),
                    offset: piece.extent.offset,
                    length: piece.extent.length,
                    compression: piece.compression.name().to_owned(),
                    md5: piece.md5,
                });
                if shared.stopped() || upload_tx.send(Upload { key, body: piece.body }).is_err() {
                    return None;
                }
            }
            let _ = free_tx.send(done.buf);
        }
    }
    (!shared.stopped() && pending.is_empty()).then_some((next_chunk, hashes, objects))
}

/// An uploader: one object at a time, single PUT or multipart.
fn upload_objects(shared: &Shared<'_>, upload_rx: &Receiver<Upload>) {
    while let Ok(upload) = upload_rx.recv() {
        if shared.stopped() {
            break;
        }
        let length = upload.body.len() as u64;
        if let Err(error) = put_object(shared, &upload.key, upload.body) {
            shared.fail(error.context(format!("uploading {}", upload.key)));
            break;
        }
        lock(&shared.stored).push(upload.key);
        Progress::add(&shared.progress.bytes_uploaded, length);
    }
}

fn put_object(shared: &Shared<'_>, key: &str, body: Bytes) -> Result<(), EngineError> {
    let store = shared.store;
    if body.len() <= limits::PART_SIZE_BYTES {
        return Ok(store.put(key, body)?);
    }
    let upload_id = store.multipart_begin(key)?;
    let mut receipts: Vec<PartReceipt> = Vec::new();
    let mut result = Ok(());
    for (index, start) in (0..body.len()).step_by(limits::PART_SIZE_BYTES).enumerate() {
        if shared.stopped() {
            result = Err(EngineError::new(ErrorKind::Cancelled, "stopped"));
            break;
        }
        let end = (start + limits::PART_SIZE_BYTES).min(body.len());
        let part_number = u32::try_from(index + 1).expect("parts of one object fit u32");
        match store.multipart_put_part(key, &upload_id, part_number, body.slice(start..end)) {
            Ok(receipt) => receipts.push(receipt),
            Err(error) => {
                result = Err(error.into());
                break;
            }
        }
    }
    if result.is_ok() {
        result = store.multipart_complete(key, &upload_id, &receipts).map_err(EngineError::from);
    }
    if result.is_err() {
        let _ = store.multipart_abort(key, &upload_id);
    }
    result
}

// ------------------------------------------------------------------------------------------------
// Restore
// ------------------------------------------------------------------------------------------------

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreJob {
    /// The backup to restore (the last link of its chain).
    pub backup_id: String,
    /// The volume it was taken of (its objects live under `volume_<id>/`).
    pub volume_id: String,
    /// Device or file to write; a missing file is created.
    pub target: PathBuf,
    /// Overwrite a target holding data.
    pub force: bool,
    /// Writer engine.
    pub engine: io::Engine,
    /// Objects downloading at once.
    pub downloads: usize,
}

/// What a finished restore reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreOutcome {
    /// Backup ids of the chain, base first.
    pub chain: Vec<String>,
    /// Each link's `volume_meta`, base first: Cinder puts each back on the volume in this order.
    pub chain_volume_meta: Vec<Option<String>>,
    /// Bytes the backup covers.
    pub volume_size_bytes: u64,
    /// Objects downloaded (objects wholly overwritten by later links are skipped).
    pub objects_downloaded: u64,
    /// Bytes downloaded.
    pub bytes_downloaded: u64,
    /// Whether the target file was created.
    pub target_created: bool,
    /// Whether the target was written with O_DIRECT.
    pub direct_io: bool,
    /// Writer engine that ran.
    pub io_engine: &'static str,
    /// Wall time.
    pub duration_ms: u64,
}

/// A backup of a chain, loaded.
#[derive(Debug)]
pub struct Loaded {
    /// Where it is.
    pub found: Found,
    /// Its `_metadata`.
    pub metadata: Metadata,
}

/// Loads backup `backup_id` and its ancestors through `parent_id`, base first.
///
/// # Errors
/// `NotFound` for a missing link, `Integrity` for a cycle or an unparsable `_metadata`.
pub fn load_chain(
    store: &dyn ObjectStore,
    volume_id: &str,
    backup_id: &str,
) -> Result<Vec<Loaded>, EngineError> {
    let keys = list_volume(store, volume_id)?;
    let mut chain = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = Some(backup_id.to_owned());
    while let Some(id) = next {
        if !seen.insert(id.clone()) || chain.len() >= CHAIN_LINKS_MAX {
            return Err(integrity(format!("parent_id links of backup {backup_id} form a cycle")));
        }
        let found = find_in(&keys, volume_id, &id)?;
        let metadata = load_metadata(store, &found.prefix)?;
        next = metadata.parent_id.clone();
        chain.push(Loaded { found, metadata });
    }
    chain.reverse();
    Ok(chain)
}

struct RestoreShared<'a> {
    store: &'a dyn ObjectStore,
    progress: &'a Progress,
    info: io::DeviceInfo,
    /// Skip all-zero pieces: the target reads as zeros.
    zero_target: bool,
    /// Bytes outside whole logical blocks, written with plain `pwrite` at the end.
    edges: Mutex<Vec<(u64, Vec<u8>)>>,
    downloaded: AtomicUsize,
    abort: AtomicBool,
    failure: Mutex<Option<EngineError>>,
}

impl RestoreShared<'_> {
    fn fail(&self, error: EngineError) {
        let _ = lock(&self.failure).get_or_insert(error);
        self.abort.store(true, Ordering::SeqCst);
    }
}

/// Restores Cinder backup `job.backup_id` (its whole chain) onto `job.target`.
///
/// # Errors
/// `NotFound`, `Integrity` (listing mismatch, missing or corrupt object), `Refused` (target holds
/// data without `force`, or is too small), `Device`, `Store`, `Cancelled`.
pub fn restore(
    store: &dyn ObjectStore,
    job: &RestoreJob,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<RestoreOutcome, EngineError> {
    let started = Instant::now();
    let chain = load_chain(store, &job.volume_id, &job.backup_id)?;
    let links: Vec<ChainLink<'_>> = chain
        .iter()
        .map(|l| ChainLink {
            prefix: &l.found.prefix,
            metadata: &l.metadata,
            listing: &l.found.listing,
        })
        .collect();
    let writes = plan_restore(&links, false).map_err(|error| match error {
        // An unknown name in a stored document is bad data, not a bad argument.
        CinderError::UnsupportedCompression { .. } => integrity(error.to_string()),
        other => EngineError::from(other),
    })?;
    let needed = required_len(&writes);
    let (opened, target_created) = prepare_target(&job.target, needed, job.force)?;
    if !opened.direct {
        warn(format!("{}: O_DIRECT refused, writing through the page cache", job.target.display()));
    }
    let info = io::probe(&opened.file)?;
    if info.size_bytes < needed {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!(
                "target {} has {} bytes, the backup needs {needed}",
                job.target.display(),
                info.size_bytes
            ),
        ));
    }
    Progress::add(&progress.bytes_total, needed);
    let visible = visible_ranges(&writes);
    let jobs: Vec<(&RestoreWrite, &Vec<Extent>)> =
        writes.iter().zip(&visible).filter(|(_, v)| !v.is_empty()).collect();
    let shared = RestoreShared {
        store,
        progress,
        info,
        zero_target: target_created,
        edges: Mutex::new(Vec::new()),
        downloaded: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
        failure: Mutex::new(None),
    };
    let stats = run_restore(&shared, &opened.file, job, &jobs, cancel)?;
    write_edges(&shared, &job.target)?;
    Ok(RestoreOutcome {
        chain: chain.iter().map(|l| l.metadata.backup_id.clone()).collect(),
        chain_volume_meta: chain.iter().map(|l| l.metadata.volume_meta.clone()).collect(),
        volume_size_bytes: needed,
        objects_downloaded: shared.downloaded.load(Ordering::Relaxed) as u64,
        bytes_downloaded: Progress::get(&progress.bytes_downloaded),
        target_created,
        direct_io: opened.direct,
        io_engine: stats.engine.name(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Checks the target and opens it; a missing file is created at `needed` bytes, a shorter
/// regular file is extended. Returns whether the target reads as zeros (created or was empty).
fn prepare_target(
    target: &std::path::Path,
    needed: u64,
    force: bool,
) -> Result<(io::OpenedFile, bool), EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let device = |error: std::io::Error| {
        EngineError::new(ErrorKind::Device, format!("{}: {error}", target.display()))
    };
    let refused = |message: String| EngineError::new(ErrorKind::Refused, message);
    let (opened, zero) = match std::fs::metadata(target) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            (io::open(target, true, true)?, true)
        }
        Err(error) => return Err(device(error)),
        Ok(meta) if meta.file_type().is_file() => {
            if meta.len() > 0 && !force {
                return Err(refused(format!(
                    "target {} already holds {} bytes; pass --force to overwrite it",
                    target.display(),
                    meta.len()
                )));
            }
            (io::open(target, true, false)?, meta.len() == 0)
        }
        Ok(meta) if meta.file_type().is_block_device() => {
            if !force {
                return Err(refused(format!(
                    "target {} is a block device; pass --force to overwrite it",
                    target.display()
                )));
            }
            (io::open(target, true, false)?, false)
        }
        Ok(_) => {
            return Err(EngineError::new(
                ErrorKind::Usage,
                format!("target {} is neither a regular file nor a block device", target.display()),
            ));
        }
    };
    let meta = opened.file.metadata().map_err(device)?;
    if meta.file_type().is_file() && meta.len() < needed {
        opened.file.set_len(needed).map_err(device)?;
    }
    Ok((opened, zero))
}

fn run_restore(
    shared: &RestoreShared<'_>,
    file: &std::fs::File,
    job: &RestoreJob,
    jobs: &[(&RestoreWrite, &Vec<Extent>)],
    cancel: &AtomicBool,
) -> Result<io::WriteStats, EngineError> {
    let downloads = job.downloads.max(1);
    let buffers = downloads * 2 + 4;
    let (free_tx, free_rx) = bounded::<AlignedBuf>(buffers);
    for _ in 0..buffers {
        free_tx.send(AlignedBuf::new(RESTORE_PIECE_BYTES)).expect("pool has room");
    }
    let (ops_tx, ops_rx) = bounded::<WriteOp>(buffers);
    let write_options =
        io::WriteOptions { engine: job.engine, queue_depth: limits::QUEUE_DEPTH_DEFAULT };
    let next = AtomicUsize::new(0);
    let written = std::thread::scope(|scope| {
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
        for _ in 0..downloads {
            let (ops_tx, free_rx, next) = (ops_tx.clone(), free_rx.clone(), &next);
            let _ = scope.spawn(move || {
                while !shared.abort.load(Ordering::Relaxed) {
                    let Some((write, ranges)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                    else {
                        break;
                    };
                    if let Err(error) = fetch_object(shared, write, ranges, &free_rx, &ops_tx) {
                        shared.fail(error);
                    }
                }
            });
        }
        drop((ops_tx, free_rx));
        while !writer.is_finished() {
            if cancel.load(Ordering::Relaxed) {
                shared.abort.store(true, Ordering::SeqCst);
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        writer.join().expect("writer thread does not panic")
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
    Ok(written?)
}

/// GETs one object, decompresses it, and queues the writes of its visible ranges.
fn fetch_object(
    shared: &RestoreShared<'_>,
    write: &RestoreWrite,
    ranges: &[Extent],
    free_rx: &Receiver<AlignedBuf>,
    ops_tx: &Sender<WriteOp>,
) -> Result<(), EngineError> {
    let name = &write.object_name;
    let body = shared.store.get(name).map_err(|error| match error {
        crate::store::StoreError::NotFound { .. } => {
            integrity(format!("object {name} listed in the backup's _metadata is missing"))
        }
        other => EngineError::from(other).context(format!("reading {name}")),
    })?;
    Progress::add(&shared.progress.bytes_downloaded, body.len() as u64);
    let _ = shared.downloaded.fetch_add(1, Ordering::Relaxed);
    let data = super::decompress(write.compression, &body, Some(write.extent.length))
        .map_err(|error| EngineError::from(error).context(format!("object {name}")))?;
    drop(body);
    let block = u64::from(shared.info.logical_block_bytes).max(1);
    for range in ranges {
        let base = write.extent.offset;
        let bytes = |from: u64, to: u64| &data[(from - base) as usize..(to - base) as usize];
        let (start, end) = (range.offset, range.end());
        let inner_start = start.next_multiple_of(block).min(end);
        let inner_end = (end / block * block).max(inner_start);
        for (from, to) in [(start, inner_start), (inner_end, end)] {
            if from < to {
                lock(&shared.edges).push((from, bytes(from, to).to_vec()));
            }
        }
        let mut offset = inner_start;
        while offset < inner_end {
            let piece_end = (offset + RESTORE_PIECE_BYTES as u64).min(inner_end);
            let piece = bytes(offset, piece_end);
            Progress::add(&shared.progress.bytes_restored, piece.len() as u64);
            if shared.zero_target && piece.iter().all(|&b| b == 0) {
                offset = piece_end;
                continue;
            }
            let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
            buf.as_mut_slice()[..piece.len()].copy_from_slice(piece);
            buf.set_len(piece.len());
            if ops_tx.send(WriteOp::Data { offset, buf }).is_err() {
                return Ok(());
            }
            offset = piece_end;
        }
        Progress::add(&shared.progress.bytes_restored, (end - start) - (inner_end - inner_start));
    }
    Ok(())
}

/// Writes the bytes outside whole logical blocks with plain writes, then syncs.
fn write_edges(shared: &RestoreShared<'_>, target: &std::path::Path) -> Result<(), EngineError> {
    let edges = std::mem::take(&mut *lock(&shared.edges));
    if edges.is_empty() {
        return Ok(());
    }
    let device = |error: std::io::Error| {
        EngineError::new(ErrorKind::Device, format!("writing {}: {error}", target.display()))
    };
    let file = std::fs::OpenOptions::new().write(true).open(target).map_err(device)?;
    for (offset, bytes) in edges {
        file.write_all_at(&bytes, offset).map_err(device)?;
    }
    file.sync_all().map_err(device)
}

// ------------------------------------------------------------------------------------------------
// Record
// ------------------------------------------------------------------------------------------------

/// The `cinder backup-import` record of backup `backup_id` in `bucket`.
///
/// # Errors
/// `NotFound`, `Integrity`, store errors.
pub fn record(
    store: &dyn ObjectStore,
    bucket: &str,
    volume_id: &str,
    backup_id: &str,
) -> Result<BackupRecord, EngineError> {
    let found = find_backup(store, volume_id, backup_id)?;
    let metadata = load_metadata(store, &found.prefix)?;
    let sha = load_sha256file(store, &found.prefix)?;
    // `volume_<vol>/<stamp>/az_<az>_backup_<id>`.
    let mut parts = found.prefix.split('/');
    let (_, stamp, last) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let az = last
        .strip_prefix("az_")
        .and_then(|rest| rest.strip_suffix(&format!("_backup_{backup_id}")))
        .map(str::to_owned);
    let created = parse_stamp(stamp);
    Ok(BackupRecord {
        id: backup_id.to_owned(),
        volume_id: Some(if metadata.volume_id.is_empty() {
            volume_id.to_owned()
        } else {
            metadata.volume_id.clone()
        }),
        container: bucket.to_owned(),
        parent_id: metadata.parent_id.clone(),
        size_gib: size_gib(sha.sha256s.len() as u64 * sha.chunk_size),
        display_name: metadata.backup_name.clone(),
        display_description: metadata.backup_description.clone(),
        service_metadata: found.prefix.clone(),
        object_count: metadata.objects.len() as u64,
        availability_zone: az,
        created_at: created,
        data_timestamp: created,
    })
}

/// Parses a prefix's `%Y%m%d%H%M%S` stamp.
fn parse_stamp(stamp: &str) -> Option<UtcTime> {
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |range: std::ops::Range<usize>| stamp[range].parse::<u32>().ok();
    Some(UtcTime {
        year: i32::try_from(n(0..4)?).ok()?,
        month: u8::try_from(n(4..6)?).ok()?,
        day: u8::try_from(n(6..8)?).ok()?,
        hour: u8::try_from(n(8..10)?).ok()?,
        minute: u8::try_from(n(10..12)?).ok()?,
        second: u8::try_from(n(12..14)?).ok()?,
        micros: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding a backup matches only `az_*_backup_<id>_metadata` and keeps the keys of its prefix.
    #[test]
    fn find_and_stamp() {
        let keys: Vec<String> = [
            "volume_v/20250301120007/az_nova_backup_b1-00001",
            "volume_v/20250301120007/az_nova_backup_b1_metadata",
            "volume_v/20250301120007/az_nova_backup_b1_sha256file",
            "volume_v/20250301130007/az_nova_backup_b10_metadata",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let found = find_in(&keys, "v", "b1").unwrap();
        assert_eq!(found.prefix, "volume_v/20250301120007/az_nova_backup_b1");
        assert_eq!(found.listing.len(), 3);
        assert_eq!(find_in(&keys, "v", "b2").unwrap_err().kind, ErrorKind::NotFound);
        let t = parse_stamp("20250301120007").unwrap();
        assert_eq!(t.prefix_stamp(), "20250301120007");
        assert!(parse_stamp("2025").is_none());
        assert_eq!(size_gib(0), 1);
        assert_eq!(size_gib(GIB + 1), 2);
    }
}
