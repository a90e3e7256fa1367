//! The Cinder-format restore job: a backup chain → device, built from the shared `plane`
//! scaffolding like `native::restore`.
//!
//! Threads (scoped): `plane` fetchers (GET an object, decode it as a stream into pieces, verify,
//! queue the writes of the ranges no later object overwrites, `visible_ranges`), one pinned
//! writer (O_DIRECT), and the calling thread relaying cancellation. Objects may complete in any
//! order; because every byte is written by exactly the object Cinder would have written it with
//! last, the result is Cinder's sequential result.
//!
//! Nothing is written that has not verified. Every block a restore writes is checked against the
//! restored backup's `_sha256file` (SHA-256 per block, the volume's final state, so it covers
//! every link of a chain) before it is written: stronger than the per-object MD5 in `_metadata`
//! and, with SHA-NI, cheaper. Where the `_sha256file` cannot vouch for an object (missing, of
//! another size, or ranges not on its block boundaries), the object is decoded whole and its MD5
//! checked against `_metadata` before any of its bytes are written. Decoded lengths must match.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::bucket::{integrity, load_chain, load_sha256file};
use super::layout::plan::required_len;
use super::{
    Algorithm, ChainLink, CinderError, Codec, Extent, Hash, RestoreWrite, plan_restore,
    visible_ranges,
};
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, WriteOp};
use crate::limits::{self, Budget};
use crate::plane::{self, Edges, JobControl, Target};
use crate::progress::Progress;
use crate::store::ObjectStore;

/// Decoded pieces handed to the writer: at most this size.
const PIECE_BYTES: usize = 4 << 20;

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
    /// Skip all-zero pieces: the target is known to read as zeros (`--sparse`).
    pub sparse: bool,
    /// Writer engine.
    pub engine: io::Engine,
    /// Objects downloading at once (clamped by the budget).
    pub downloads: usize,
}

/// What a finished restore reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreOutcome {
    /// Backup ids of the chain, base first.
    pub chain: Vec<String>,
    /// Bytes the backup covers.
    pub volume_size_bytes: u64,
    /// Objects downloaded (objects wholly overwritten by later links are skipped).
    pub objects_downloaded: u64,
    /// Objects checked block by block against `_sha256file`.
    pub objects_verified_sha256: u64,
    /// Objects checked whole against their `_metadata` MD5.
    pub objects_verified_md5: u64,
    /// Bytes downloaded.
    pub bytes_downloaded: u64,
    /// Whether the target file was created.
    pub target_created: bool,
    /// Whether the target was written with O_DIRECT.
    pub direct_io: bool,
    /// Writer engine that ran.
    pub io_engine: &'static str,
    /// Each link's `volume_meta` (Cinder's volume metadata, a JSON string), base first: Cinder
    /// puts each back on the volume in this order.
    pub chain_volume_meta: Vec<Option<String>>,
    /// Wall time.
    pub duration_ms: u64,
}

/// How an object is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Every written block against `_sha256file`.
    Blocks,
    /// The whole object against its `_metadata` MD5, before any byte is written.
    Md5,
}

struct Object<'a> {
    write: &'a RestoreWrite,
    ranges: &'a [Extent],
    md5: &'a str,
    check: Check,
}

struct Shared<'a> {
    store: &'a dyn ObjectStore,
    progress: &'a Progress,
    info: io::DeviceInfo,
    control: JobControl,
    /// The volume's final block hashes and their block size.
    blocks: Option<(&'a [Hash], u64)>,
    zero_block_hash: Hash,
    /// Skip all-zero pieces: the target reads as zeros.
    skip_zero: bool,
    edges: Edges,
    downloaded: AtomicUsize,
}

/// The memory budget of `job` restoring objects of at most `object_bytes`.
pub fn budget(job: &RestoreJob, object_bytes: u64) -> Budget {
    Budget::cinder_restore(
        usize::try_from(object_bytes).unwrap_or(usize::MAX / 2),
        job.downloads.max(1),
        PIECE_BYTES,
    )
}

/// Restores Cinder backup `job.backup_id` (its whole chain) onto `job.target`. `start` is called
/// once the chain is planned, with the memory budget computed from its largest object, before the
/// target is touched.
///
/// # Errors
/// `NotFound`, `Integrity` (listing mismatch, missing, corrupt or unverifiable object), `Refused`
/// (target holds data without `force`, or is too small), `Usage`, `Device`, `Store`,
/// `Cancelled`.
pub fn restore(
    store: &dyn ObjectStore,
    job: &RestoreJob,
    progress: &Progress,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
    start: &dyn Fn(&Budget),
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
    let last = chain.last().expect("a chain has its backup");
    let sha = match load_sha256file(store, &last.found.prefix) {
        Ok(sha) => Some(sha),
        Err(error) if error.kind == ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let blocks = sha
        .as_ref()
        .filter(|s| s.chunk_size > 0 && s.sha256s.len() as u64 == needed.div_ceil(s.chunk_size))
        .map(|s| (s.sha256s.as_slice(), s.chunk_size));
    if blocks.is_none() {
        warn(format!(
            "{}_sha256file does not cover the volume; objects are checked whole against their \
             _metadata MD5",
            last.found.prefix
        ));
    }
    let md5s: HashMap<&str, &str> = chain
        .iter()
        .flat_map(|l| l.metadata.objects.iter().map(|o| (o.name.as_str(), o.md5.as_str())))
        .collect();
    let visible = visible_ranges(&writes);
    let objects: Vec<Object<'_>> = writes
        .iter()
        .zip(&visible)
        .filter(|(_, ranges)| !ranges.is_empty())
        .map(|(write, ranges)| Object {
            write,
            ranges,
            md5: md5s.get(write.object_name.as_str()).copied().unwrap_or(""),
            check: match blocks {
                Some((_, bs)) if ranges.iter().all(|r| on_blocks(r, bs, needed)) => Check::Blocks,
                _ => Check::Md5,
            },
        })
        .collect();
    let largest = writes.iter().map(|w| w.extent.length).max().unwrap_or(0);
    let budget = budget(job, largest);
    budget
        .check("--downloads-in-flight and the backup's object size")
        .map_err(|message| EngineError::new(ErrorKind::Usage, message))?;
    start(&budget);
    let target = plane::prepare_target(&job.target, needed, job.force, warn)?;
    let result = (|| -> Result<(io::Engine, u64), EngineError> {
        let skip_zero = target.skip_holes(job.sparse)?;
        Progress::add(&progress.bytes_total, needed);
        let shared = Shared {
            store,
            progress,
            info: target.info,
            control: JobControl::new(),
            blocks,
            zero_block_hash: blocks
                .map(|(_, bs)| Sha256::digest(vec![0u8; bs as usize]).into())
                .unwrap_or_default(),
            skip_zero,
            edges: Edges::default(),
            downloaded: AtomicUsize::new(0),
        };
        let engine = run_threads(&shared, &target, job, &budget, &objects, cancel)?;
        shared.edges.write(&target.path)?;
        Ok((engine, shared.downloaded.load(Ordering::Relaxed) as u64))
    })();
    if result.is_err() {
        target.discard_if_created();
    }
    let (engine, objects_downloaded) = result?;
    let by = |check| objects.iter().filter(|o| o.check == check).count() as u64;
    Ok(RestoreOutcome {
        chain: chain.iter().map(|l| l.metadata.backup_id.clone()).collect(),
        volume_size_bytes: needed,
        objects_downloaded,
        objects_verified_sha256: by(Check::Blocks),
        objects_verified_md5: by(Check::Md5),
        bytes_downloaded: Progress::get(&progress.bytes_downloaded),
        target_created: target.created,
        direct_io: target.opened.direct,
        io_engine: engine.name(),
        chain_volume_meta: chain.iter().map(|l| l.metadata.volume_meta.clone()).collect(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Whether `range` starts on a block and ends on one (or at the volume's end).
fn on_blocks(range: &Extent, block: u64, volume: u64) -> bool {
    range.offset.is_multiple_of(block)
        && (range.end().is_multiple_of(block) || range.end() == volume)
}

fn run_threads(
    shared: &Shared<'_>,
    target: &Target,
    job: &RestoreJob,
    budget: &Budget,
    objects: &[Object<'_>],
    cancel: &AtomicBool,
) -> Result<io::Engine, EngineError> {
    let control = &shared.control;
    let (free_tx, free_rx) =
        plane::buffer_pool(budget.chunk_buffer_count, budget.chunk_buffer_bytes);
    let (ops_tx, ops_rx) = bounded::<WriteOp>(budget.chunk_buffer_count);
    let write_options =
        io::WriteOptions { engine: job.engine, queue_depth: limits::QUEUE_DEPTH_DEFAULT };
    let written = std::thread::scope(|scope| {
        let writer = plane::spawn_writer(scope, target, write_options, ops_rx, free_tx, control);
        plane::fetch_parallel(
            scope,
            budget.transfers_in_flight,
            objects,
            control,
            || (free_rx.clone(), ops_tx.clone()),
            |(free_rx, ops_tx), object| fetch_object(shared, object, free_rx, ops_tx),
        );
        drop((ops_tx, free_rx));
        control.watch(cancel, || writer.is_finished());
        writer.join().expect("writer thread does not panic")
    });
    control.outcome(cancel, "restore cancelled; the target is incomplete")?;
    Ok(written.expect("a writer that did not fail reports what it wrote").engine)
}

/// A decoder of one object body as a stream of bytes.
fn decoder<'b>(
    compression: Algorithm,
    body: &'b [u8],
    length: u64,
) -> Result<Box<dyn std::io::Read + 'b>, CinderError> {
    Ok(match compression.codec() {
        Codec::Raw => Box::new(body),
        Codec::Zlib => Box::new(flate2::read::ZlibDecoder::new(body)),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(body).map_err(|e| {
            CinderError::Decompress { algorithm: compression, reason: e.to_string() }
        })?),
        // bzip2's "ignore what follows a complete stream" rule lives in `decompress`: decode whole.
        Codec::Bzip2 => {
            Box::new(std::io::Cursor::new(super::decompress(compression, body, Some(length))?))
        }
    })
}

/// GETs one object, decodes it piece by piece, verifies, and queues the writes of its visible
/// ranges.
fn fetch_object(
    shared: &Shared<'_>,
    object: &Object<'_>,
    free_rx: &Receiver<AlignedBuf>,
    ops_tx: &Sender<WriteOp>,
) -> Result<(), EngineError> {
    let write = object.write;
    let name = &write.object_name;
    let body = shared.store.get(name).map_err(|error| match error {
        crate::store::StoreError::NotFound { .. } => {
            integrity(format!("object {name} listed in the backup's _metadata is missing"))
        }
        other => EngineError::from(other).context(format!("reading {name}")),
    })?;
    Progress::add(&shared.progress.bytes_downloaded, body.len() as u64);
    let _ = shared.downloaded.fetch_add(1, Ordering::Relaxed);
    let corrupt = |detail: String| integrity(format!("object {name}: {detail}"));
    let length = write.extent.length;
    let mut reader =
        decoder(write.compression, &body, length).map_err(|e| corrupt(e.to_string()))?;
    if object.check == Check::Md5 {
        let mut data = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        let _ = reader
            .by_ref()
            .take(length + 1)
            .read_to_end(&mut data)
            .map_err(|e| corrupt(format!("does not decode: {e}")))?;
        if data.len() as u64 != length {
            return Err(corrupt(format!(
                "decodes to {} bytes, _metadata says {length}",
                data.len()
            )));
        }
        let digest: String = Md5::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
        if object.md5.is_empty() || digest != object.md5.to_ascii_lowercase() {
            return Err(corrupt(format!(
                "MD5 {digest} does not match _metadata's {:?}",
                object.md5
            )));
        }
        return queue_ranges(shared, object, 0, &data, free_rx, ops_tx);
    }
    let block = shared.blocks.map_or(PIECE_BYTES as u64, |(_, bs)| bs);
    let piece_bytes = usize::try_from((PIECE_BYTES as u64 / block).max(1) * block).expect("fits");
    let mut piece = vec![0u8; piece_bytes];
    let mut at = 0u64;
    while at < length && !shared.control.stopped() {
        let want = usize::try_from((length - at).min(piece_bytes as u64)).expect("fits");
        let got = fill(&mut reader, &mut piece[..want])
            .map_err(|e| corrupt(format!("does not decode: {e}")))?;
        if got < want {
            return Err(corrupt(format!(
                "decodes to {} bytes, _metadata says {length}",
                at + got as u64
            )));
        }
        verify_blocks(shared, object, at, &piece[..want]).map_err(corrupt)?;
        queue_ranges(shared, object, at, &piece[..want], free_rx, ops_tx)?;
        at += want as u64;
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn fill(reader: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Checks every block of `bytes` (the object's bytes from `at`) that a visible range will write
/// against the volume's block hashes.
fn verify_blocks(
    shared: &Shared<'_>,
    object: &Object<'_>,
    at: u64,
    bytes: &[u8],
) -> Result<(), String> {
    let (hashes, block) = shared.blocks.expect("block checks need block hashes");
    let base = object.write.extent.offset + at;
    let end = base + bytes.len() as u64;
    for range in object.ranges {
        let (from, to) = (range.offset.max(base), range.end().min(end));
        let mut offset = from;
        while offset < to {
            let stop = (offset / block + 1) * block;
            let slice = &bytes[(offset - base) as usize..(stop.min(end) - base) as usize];
            let index = usize::try_from(offset / block).expect("fits");
            let expected = &hashes[index];
            let same = if *expected == shared.zero_block_hash && slice.len() as u64 == block {
                crate::native::chunk::is_zero(slice)
            } else {
                <[u8; 32]>::from(Sha256::digest(slice)) == *expected
            };
            if !same {
                return Err(format!(
                    "block {index} (volume offset {offset}) does not match the backup's _sha256file"
                ));
            }
            offset = stop;
        }
    }
    Ok(())
}

/// Queues the writes of the parts of `bytes` (the object's bytes from `at`) that visible ranges
/// cover: whole logical blocks through the O_DIRECT writer, the rest as edges.
fn queue_ranges(
    shared: &Shared<'_>,
    object: &Object<'_>,
    at: u64,
    bytes: &[u8],
    free_rx: &Receiver<AlignedBuf>,
    ops_tx: &Sender<WriteOp>,
) -> Result<(), EngineError> {
    let base = object.write.extent.offset + at;
    let end = base + bytes.len() as u64;
    let block = u64::from(shared.info.logical_block_bytes).max(1);
    for range in object.ranges {
        let (from, to) = (range.offset.max(base), range.end().min(end));
        if from >= to {
            continue;
        }
        let data = &bytes[(from - base) as usize..(to - base) as usize];
        Progress::add(&shared.progress.bytes_restored, data.len() as u64);
        let (offset, middle) = shared.edges.split(from, data, block);
        let mut position = 0usize;
        let middle = &data[middle];
        while position < middle.len() {
            let piece = &middle[position..(position + PIECE_BYTES).min(middle.len())];
            let piece_offset = offset + position as u64;
            position += piece.len();
            if shared.skip_zero && crate::native::chunk::is_zero(piece) {
                continue;
            }
            let Ok(mut buf) = free_rx.recv() else { return Ok(()) };
            buf.as_mut_slice()[..piece.len()].copy_from_slice(piece);
            buf.set_len(piece.len());
            if ops_tx.send(WriteOp::Data { offset: piece_offset, buf }).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}
