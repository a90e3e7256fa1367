//! End-to-end tests of `read_source` and `write_target` with both engines, on regular files and on
//! loop devices with 512- and 4096-byte logical blocks, plus cancellation and error paths.
//!
//! Temporary files live under `target/tmp-io-tests` (not `/tmp`, which may be tmpfs). Loop device
//! tests need root (`/dev/loop-control` writable); without it they print a notice and return.
//! These tests do not measure performance.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::*;
use crate::error::Classify;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// A directory under `target/tmp-io-tests`, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tmp-io-tests")
            .join(format!("{name}-{}-{unique}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An attached loop device, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `backing` with direct I/O and the given logical block size, or None when loop
    /// devices cannot be managed here (not root).
    fn attach(backing: &Path, block: u32) -> Option<LoopDevice> {
        if File::options().write(true).open("/dev/loop-control").is_err() {
            eprintln!("skipped: loop devices need root (/dev/loop-control not writable)");
            return None;
        }
        let output = Command::new("losetup")
            .args(["--direct-io=on", "-b", &block.to_string(), "-f", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup");
        assert!(
            output.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = String::from_utf8(output.stdout).expect("utf-8 device path");
        Some(LoopDevice(PathBuf::from(path.trim())))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Deterministic bytes that differ by position and seed (catches shifted, repeated or swapped
/// blocks).
fn pattern(seed: u64, start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64)
        .map(|i| {
            let mut x = (i ^ seed.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 29;
            (x >> 32) as u8 | 1 // never zero, so zero writes are visible
        })
        .collect()
}

fn engines() -> [Engine; 2] {
    [Engine::Uring, Engine::Pread]
}

fn expected_engine(requested: Engine) -> Engine {
    if requested == Engine::Uring && uring_available() { Engine::Uring } else { Engine::Pread }
}

/// Every way of reading or writing: io_uring with and without registration, and `pread`.
fn modes() -> [(Engine, Registration); 3] {
    [
        (Engine::Uring, Registration::Auto),
        (Engine::Uring, Registration::Off),
        (Engine::Pread, Registration::Auto),
    ]
}

/// Checks what the stats say about registration against what was asked for.
fn check_registration(
    (engine, registration): (Engine, Registration),
    requests: u64,
    fixed_buffer_requests: u64,
    registered_buffers: bool,
    registered_file: bool,
) {
    if expected_engine(engine) == Engine::Uring && registration == Registration::Auto {
        // root has CAP_IPC_LOCK and the kernel is recent: registration must succeed here
        assert!(registered_file, "file registered");
        assert!(registered_buffers, "all requests fixed");
        assert_eq!(fixed_buffer_requests, requests);
    } else {
        assert!(!registered_file, "no file registration for {engine:?}/{registration:?}");
        assert!(!registered_buffers);
        assert_eq!(fixed_buffer_requests, 0);
    }
}

fn check_read_registration(mode: (Engine, Registration), stats: &ReadStats) {
    assert_eq!(stats.engine, expected_engine(mode.0));
    check_registration(
        mode,
        stats.requests,
        stats.fixed_buffer_requests,
        stats.registered_buffers,
        stats.registered_file,
    );
}

fn check_write_registration(mode: (Engine, Registration), stats: &WriteStats) {
    assert_eq!(stats.engine, expected_engine(mode.0));
    check_registration(
        mode,
        stats.requests,
        stats.fixed_buffer_requests,
        stats.registered_buffers,
        stats.registered_file,
    );
}

fn read_options(engine: Engine, chunk: usize, request: usize, depth: usize) -> ReadOptions {
    ReadOptions { engine, chunk_size_bytes: chunk, request_size_bytes: request, queue_depth: depth }
}

/// Runs `read_source` on a thread with `buffers` free buffers, checks every chunk's index, offset
/// and length as it arrives (each exactly once), and returns the stats and the reassembled image.
fn read_all(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    buffers: usize,
) -> (ReadStats, Vec<u8>) {
    read_all_with(file, info, options, Registration::Auto, buffers, false)
}

/// `read_all` with a registration choice; with `fresh`, the consumer drops every chunk's buffer
/// and puts a newly allocated one into the pool (a new allocation may reuse a freed address).
fn read_all_with(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    registration: Registration,
    buffers: usize,
    fresh: bool,
) -> (ReadStats, Vec<u8>) {
    let chunk_size = options.chunk_size_bytes;
    let (free_tx, free_rx) = unbounded();
    for _ in 0..buffers {
        free_tx.send(AlignedBuf::new(chunk_size)).expect("fill free channel");
    }
    let (out_tx, out_rx) = bounded::<ReadChunk>(1);
    let cancel = AtomicBool::new(false);
    let size = usize::try_from(info.size_bytes).expect("test images fit in memory");
    let mut image = vec![0u8; size];
    let mut seen = vec![false; size.div_ceil(chunk_size)];
    let stats = thread::scope(|scope| {
        let cancel = &cancel;
        let reader = scope.spawn(move || {
            let out_tx = out_tx;
            read_source_with(file, info, options, registration, &free_rx, &out_tx, cancel)
        });
        for chunk in &out_rx {
            let index = usize::try_from(chunk.chunk_index).expect("small index");
            assert_eq!(chunk.offset, chunk.chunk_index * chunk_size as u64);
            assert!(!seen[index], "chunk {index} delivered twice");
            seen[index] = true;
            let offset = chunk.offset as usize;
            let valid = chunk_size.min(size - offset);
            assert_eq!(chunk.buf.len(), valid, "valid length of chunk {index}");
            image[offset..offset + valid].copy_from_slice(chunk.buf.as_slice());
            // the reader may already have returned (and dropped its end) after the last chunk
            if fresh {
                drop(chunk.buf);
                let _ = free_tx.send(AlignedBuf::new(chunk_size));
            } else {
                let _ = free_tx.send(chunk.buf);
            }
        }
        reader.join().expect("reader thread").expect("read_source succeeds")
    });
    assert!(seen.iter().all(|&s| s), "every chunk delivered");
    (stats, image)
}

/// Runs `write_target` with `ops`, checks that every data buffer came back on `free`.
fn write_all(
    file: &File,
    info: &DeviceInfo,
    engine: Engine,
    depth: usize,
    ops: Vec<WriteOp>,
) -> WriteStats {
    write_all_with(file, info, (engine, Registration::Auto), depth, ops)
}

fn write_all_with(
    file: &File,
    info: &DeviceInfo,
    (engine, registration): (Engine, Registration),
    depth: usize,
    ops: Vec<WriteOp>,
) -> WriteStats {
    let data_ops = ops.iter().filter(|op| matches!(op, WriteOp::Data { .. })).count();
    let (ops_tx, ops_rx) = bounded(2);
    let (free_tx, free_rx) = unbounded();
    let cancel = AtomicBool::new(false);
    let options = WriteOptions { engine, queue_depth: depth };
    let stats = thread::scope(|scope| {
        let writer = scope.spawn(|| {
            write_target_with(file, info, &options, registration, &ops_rx, &free_tx, &cancel)
        });
        for op in ops {
            ops_tx.send(op).expect("writer receives ops");
        }
        drop(ops_tx);
        writer.join().expect("writer thread").expect("write_target succeeds")
    });
    drop(free_tx);
    assert_eq!(free_rx.iter().count(), data_ops, "every data buffer returned");
    stats
}

/// Bytes of data and of zero ranges in `ops`.
fn op_bytes(ops: &[WriteOp]) -> (u64, u64) {
    let mut data = 0;
    let mut zeros = 0;
    for op in ops {
        match op {
            WriteOp::Data { buf, .. } => data += buf.len() as u64,
            WriteOp::Zero { length, .. } => zeros += *length,
        }
    }
    (data, zeros)
}

/// A data op carrying `bytes` (padded buffer capacity, `len() == bytes.len()`).
fn data_op(offset: u64, bytes: &[u8]) -> WriteOp {
    let mut buf = AlignedBuf::new(bytes.len().div_ceil(BUF_ALIGN).max(1) * BUF_ALIGN);
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    buf.set_len(bytes.len());
    WriteOp::Data { offset, buf }
}

/// Builds ops over `[0, size)`: data (pattern `seed`) and zero ranges alternating, starting with
/// data, or with zeros when `swap`; `[3.5 MiB + 4 blocks, 4 MiB)` and `[4 MiB + 5 blocks, 5 MiB)`
/// stay untouched. Applies them to
/// `expected` and returns them. All offsets and lengths are multiples of `block`.
fn mixed_ops(expected: &mut [u8], block: usize, seed: u64, swap: bool) -> Vec<WriteOp> {
    let size = expected.len();
    let ranges = [
        (0, 2 * MIB + 3 * block),                   // larger than one 1 MiB request
        (2 * MIB + 3 * block, 3 * MIB / 2 + block), // two requests, the last one short
        (4 * MIB, 5 * block),                       // small
        (5 * MIB, size - 5 * MIB),                  // up to the (partial) end
    ];
    ranges
        .iter()
        .enumerate()
        .map(|(i, &(offset, length))| {
            assert!(offset + length <= size && offset % block == 0 && length % block == 0);
            if (i % 2 == 1) != swap {
                expected[offset..offset + length].fill(0);
                WriteOp::Zero { offset: offset as u64, length: length as u64 }
            } else {
                let bytes = pattern(seed, offset as u64, length);
                expected[offset..offset + length].copy_from_slice(&bytes);
                data_op(offset as u64, &bytes)
            }
        })
        .collect()
}

#[test]
fn registration_defaults_to_auto_without_the_env_variable() {
    match std::env::var_os(NO_REGISTER_ENV) {
        None => assert_eq!(Registration::from_env(), Registration::Auto),
        Some(value) if value == "1" => assert_eq!(Registration::from_env(), Registration::Off),
        Some(_) => assert_eq!(Registration::from_env(), Registration::Auto),
    }
}

#[test]
fn engine_names() {
    assert_eq!(Engine::Uring.name(), "io_uring");
    assert_eq!(Engine::Pread.name(), "pread");
}

#[test]
fn errors_classify() {
    use crate::error::{ErrorKind, Status};
    assert_eq!(IoError::Cancelled.kind(), ErrorKind::Cancelled);
    assert_eq!(IoError::Disconnected.kind(), ErrorKind::Internal);
    assert_eq!(IoError::InvalidOptions("x".into()).kind(), ErrorKind::Usage);
    let read = IoError::Read { offset: 4096, length: 512, source: std::io::Error::other("boom") };
    assert_eq!(read.kind(), ErrorKind::Device);
    assert_eq!(read.status(), Status::Permanent);
    assert_eq!(read.to_string(), "read 512 bytes at offset 4096");
    assert_eq!(crate::error::chain(&read), "read 512 bytes at offset 4096: boom");
}

#[test]
fn regular_file_round_trip_both_engines() {
    let dir = TempDir::new("read-file");
    let path = dir.path().join("image");
    // (chunk, request, depth, buffers): several requests per chunk, fewer buffers than chunks,
    // a single buffer (the reader must block for it), and a request larger than the chunk
    let configs = [
        (MIB, 256 * KIB, 8, 3),
        (4 * MIB, MIB, 16, 6),
        (MIB, 128 * KIB, 4, 1),
        (256 * KIB, MIB, 2, 2),
    ];
    for (chunk, request, depth, buffers) in configs {
        let size = 3 * chunk + 12345;
        let source = pattern(1, 0, size);
        std::fs::write(&path, &source).expect("write image");
        let opened = open(&path, false, false).expect("open image");
        assert!(opened.direct, "ext4 supports O_DIRECT");
        let info = probe(&opened.file).expect("probe");
        assert_eq!(info.size_bytes, size as u64);
        for mode in modes() {
            let engine = mode.0;
            let options = read_options(engine, chunk, request, depth);
            let (stats, image) =
                read_all_with(&opened.file, &info, &options, mode.1, buffers, false);
            check_read_registration(mode, &stats);
            assert_eq!(stats.bytes_read, size as u64);
            let min_requests = 3 * chunk.div_ceil(request) as u64 + 1;
            assert!(stats.requests >= min_requests, "{} < {min_requests}", stats.requests);
            assert!(
                image == source,
                "image differs ({engine:?}, chunk {chunk}, request {request})"
            );
        }
    }
}

#[test]
fn buffered_file_accepts_unaligned_sizes() {
    let dir = TempDir::new("read-buffered");
    let path = dir.path().join("image");
    let size = 10 * 10_000 + 777;
    let source = pattern(3, 0, size);
    std::fs::write(&path, &source).expect("write image");
    let file = File::open(&path).expect("open buffered");
    let info = probe(&file).expect("probe");
    for engine in engines() {
        // chunk and request sizes that O_DIRECT would refuse; buffers are page multiples
        let options = read_options(engine, 10_000, 3_000, 4);
        let (free_tx, free_rx) = unbounded();
        for _ in 0..3 {
            free_tx.send(AlignedBuf::new(3 * BUF_ALIGN)).expect("fill");
        }
        let (out_tx, out_rx) = unbounded();
        let cancel = AtomicBool::new(false);
        let mut image = vec![0u8; size];
        let stats = thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let out_tx = out_tx;
                read_source(&file, &info, &options, &free_rx, &out_tx, &cancel)
            });
            for chunk in &out_rx {
                let offset = chunk.offset as usize;
                image[offset..offset + chunk.buf.len()].copy_from_slice(chunk.buf.as_slice());
                let _ = free_tx.send(chunk.buf);
            }
            reader.join().expect("reader").expect("read succeeds")
        });
        assert_eq!(stats.bytes_read, size as u64);
        assert!(image == source, "buffered image differs ({engine:?})");
    }
}

#[test]
fn source_shorter_than_probed_size_is_unexpected_eof() {
    let dir = TempDir::new("read-eof");
    let path = dir.path().join("image");
    std::fs::write(&path, pattern(4, 0, MIB + 4096)).expect("write image");
    let opened = open(&path, false, false).expect("open");
    let mut info = probe(&opened.file).expect("probe");
    info.size_bytes += 3 * MIB as u64;
    for engine in engines() {
        let (free_tx, free_rx) = unbounded();
        for _ in 0..4 {
            free_tx.send(AlignedBuf::new(MIB)).expect("fill");
        }
        let (out_tx, _out_rx) = unbounded();
        let cancel = AtomicBool::new(false);
        let result = read_source(
            &opened.file,
            &info,
            &read_options(engine, MIB, 256 * KIB, 8),
            &free_rx,
            &out_tx,
            &cancel,
        );
        match result {
            Err(IoError::Read { offset, source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{engine:?}");
                assert!(offset >= MIB as u64 + 4096, "eof reported at {offset}");
            }
            other => panic!("expected unexpected-eof read error, got {other:?}"),
        }
    }
}

/// Starts a reader over a 16 MiB file and returns its channel ends and result handle inputs.
fn reader_fixture(dir: &TempDir) -> (File, DeviceInfo) {
    let path = dir.path().join("image");
    std::fs::write(&path, pattern(5, 0, 16 * MIB)).expect("write image");
    let opened = open(&path, false, false).expect("open");
    let info = probe(&opened.file).expect("probe");
    (opened.file, info)
}

fn filled_free(count: usize, capacity: usize) -> (Sender<AlignedBuf>, Receiver<AlignedBuf>) {
    let (tx, rx) = unbounded();
    for _ in 0..count {
        tx.send(AlignedBuf::new(capacity)).expect("fill");
    }
    (tx, rx)
}

#[test]
fn read_cancel_stops_the_reader() {
    let dir = TempDir::new("read-cancel");
    let (file, info) = reader_fixture(&dir);
    for engine in engines() {
        let options = read_options(engine, MIB, 256 * KIB, 8);
        // cancelled before the start
        let (_free_tx, free_rx) = filled_free(4, MIB);
        let (out_tx, _out_rx) = unbounded();
        let cancel = AtomicBool::new(true);
        let result = read_source(&file, &info, &options, &free_rx, &out_tx, &cancel);
        assert!(matches!(result, Err(IoError::Cancelled)), "{result:?}");

        // cancelled by the consumer after the first chunk, while the reader waits for buffers
        let (_free_tx, free_rx) = filled_free(2, MIB);
        let (out_tx, out_rx) = unbounded();
        let cancel = AtomicBool::new(false);
        let result = thread::scope(|scope| {
            let reader =
                scope.spawn(|| read_source(&file, &info, &options, &free_rx, &out_tx, &cancel));
            let first = out_rx.recv().expect("first chunk");
            assert_eq!(first.buf.len(), MIB);
            cancel.store(true, Ordering::Relaxed);
            reader.join().expect("reader thread")
        });
        assert!(matches!(result, Err(IoError::Cancelled)), "{result:?}");
        assert!(out_rx.len() <= 2, "at most the two buffers were sent");
    }
}

#[test]
fn read_disconnected_channels() {
    let dir = TempDir::new("read-disconnect");
    let (file, info) = reader_fixture(&dir);
    let cancel = AtomicBool::new(false);
    for engine in engines() {
        let options = read_options(engine, MIB, 256 * KIB, 8);
        // consumer gone
        let (_free_tx, free_rx) = filled_free(4, MIB);
        let (out_tx, out_rx) = bounded(1);
        drop(out_rx);
        let result = read_source(&file, &info, &options, &free_rx, &out_tx, &cancel);
        assert!(matches!(result, Err(IoError::Disconnected)), "{result:?}");
        // buffer pool gone after two buffers
        let (free_tx, free_rx) = filled_free(2, MIB);
        drop(free_tx);
        let (out_tx, out_rx) = unbounded();
        let result = read_source(&file, &info, &options, &free_rx, &out_tx, &cancel);
        assert!(matches!(result, Err(IoError::Disconnected)), "{result:?}");
        // the reader stops as soon as it sees the closed pool: io_uring may not even finish the
        // chunks it started, pread delivers the two it had buffers for
        assert!(out_rx.len() <= 2, "{} chunks delivered", out_rx.len());
    }
}

#[test]
fn read_rejects_bad_options_and_small_buffers() {
    let dir = TempDir::new("read-options");
    let (file, info) = reader_fixture(&dir);
    let cancel = AtomicBool::new(false);
    let (out_tx, _out_rx) = unbounded();
    for engine in engines() {
        let (_free_tx, free_rx) = filled_free(1, MIB / 2);
        let result = read_source(
            &file,
            &info,
            &read_options(engine, MIB, MIB, 4),
            &free_rx,
            &out_tx,
            &cancel,
        );
        assert!(matches!(result, Err(IoError::InvalidOptions(_))), "small buffer: {result:?}");
        let (_free_tx, free_rx) = filled_free(1, MIB);
        let unaligned = read_options(engine, MIB - 512, 64 * KIB, 4);
        let result = read_source(&file, &info, &unaligned, &free_rx, &out_tx, &cancel);
        assert!(matches!(result, Err(IoError::InvalidOptions(_))), "unaligned chunk: {result:?}");
        let zero_depth = read_options(engine, MIB, MIB, 0);
        let result = read_source(&file, &info, &zero_depth, &free_rx, &out_tx, &cancel);
        assert!(matches!(result, Err(IoError::InvalidOptions(_))), "zero depth: {result:?}");
    }
}

#[test]
fn empty_source_sends_nothing() {
    let dir = TempDir::new("read-empty");
    let path = dir.path().join("image");
    std::fs::write(&path, b"").expect("write image");
    let opened = open(&path, false, false).expect("open");
    let info = probe(&opened.file).expect("probe");
    for engine in engines() {
        let (stats, image) = read_all(&opened.file, &info, &read_options(engine, MIB, MIB, 4), 1);
        assert_eq!(stats.bytes_read, 0);
        assert!(image.is_empty());
    }
}

#[test]
fn write_then_read_back_regular_file() {
    let dir = TempDir::new("write-file");
    for engine in engines() {
        let path = dir.path().join(format!("target-{}", engine.name()));
        let opened = open(&path, true, true).expect("create target");
        assert!(opened.direct);
        let block = probe(&opened.file).expect("probe").logical_block_bytes as usize;
        let size = 6 * MIB + 8 * BUF_ALIGN;
        // the target starts with the old contents so untouched ranges can be checked
        let mut expected = pattern(7, 0, size);
        std::fs::write(&path, &expected).expect("old contents");
        let info = DeviceInfo {
            size_bytes: size as u64,
            logical_block_bytes: block as u32,
            is_block_device: false,
        };
        let ops = mixed_ops(&mut expected, block.max(BUF_ALIGN), 2, false);
        let (data, zeros) = op_bytes(&ops);
        let touched = data + zeros;
        assert!(zeros > 0 && data > 0);
        assert!(touched < size as u64 - MIB as u64, "some ranges stay untouched");
        let stats = write_all(&opened.file, &info, engine, 8, ops);
        assert_eq!(stats.engine, expected_engine(engine));
        assert_eq!(stats.bytes_written, touched);
        // 2 MiB + 3 blocks and 5 blocks of data: at least 4 requests; zeros need none
        assert!(stats.requests >= 4, "{} requests", stats.requests);
        assert_eq!(stats.requests, 4, "no request for zeros");
        assert_eq!(stats.zeroed_fallocate_bytes, zeros, "ext4 zeroes with fallocate");
        assert_eq!(stats.zeroed_blkzeroout_bytes, 0);
        assert_eq!(stats.zeroed_written_bytes, 0);
        let written = std::fs::read(&path).expect("read back");
        assert_eq!(written.len(), size);
        assert!(written == expected, "target differs ({engine:?})");
        // and through read_source
        let (_, image) = read_all(&opened.file, &info, &read_options(engine, MIB, 256 * KIB, 8), 2);
        assert!(image == expected, "read_source of target differs ({engine:?})");
    }
}

#[test]
fn write_into_new_file_grows_it() {
    let dir = TempDir::new("write-new");
    for engine in engines() {
        let path = dir.path().join(format!("new-{}", engine.name()));
        let opened = open(&path, true, true).expect("create target");
        let info = probe(&opened.file).expect("probe");
        assert_eq!(info.size_bytes, 0);
        let bytes = pattern(8, 0, 3 * MIB);
        let ops =
            vec![data_op(0, &bytes), WriteOp::Zero { offset: 3 * MIB as u64, length: MIB as u64 }];
        let stats = write_all(&opened.file, &info, engine, 4, ops);
        assert_eq!(stats.bytes_written, 4 * MIB as u64);
        let written = std::fs::read(&path).expect("read back");
        assert_eq!(written.len(), 4 * MIB);
        assert!(written[..3 * MIB] == bytes[..]);
        assert!(written[3 * MIB..].iter().all(|&b| b == 0));
    }
}

#[test]
fn write_errors_and_cancel() {
    let dir = TempDir::new("write-errors");
    let path = dir.path().join("target");
    std::fs::write(&path, vec![0u8; MIB]).expect("create target");
    let read_only = open(&path, false, false).expect("open read-only");
    let info = probe(&read_only.file).expect("probe");
    for engine in engines() {
        let options = WriteOptions { engine, queue_depth: 4 };
        // writing through a read-only fd fails with the request's offset
        let (ops_tx, ops_rx) = unbounded();
        let (free_tx, _free_rx) = unbounded();
        ops_tx.send(data_op(8192, &pattern(9, 0, 4096))).expect("send op");
        drop(ops_tx);
        let cancel = AtomicBool::new(false);
        match write_target(&read_only.file, &info, &options, &ops_rx, &free_tx, &cancel) {
            Err(IoError::Write { offset, length, source }) => {
                assert_eq!((offset, length), (8192, 4096));
                assert_eq!(source.raw_os_error(), Some(libc::EBADF), "{engine:?}");
            }
            other => panic!("expected write error, got {other:?}"),
        }

        // a misaligned op is refused and its buffer comes back
        let writable = open(&path, true, false).expect("open read-write");
        let (ops_tx, ops_rx) = unbounded();
        let (free_tx, free_rx) = unbounded();
        ops_tx.send(data_op(100, &pattern(9, 0, 4096))).expect("send op");
        let result = write_target(&writable.file, &info, &options, &ops_rx, &free_tx, &cancel);
        assert!(matches!(result, Err(IoError::InvalidOptions(_))), "{result:?}");
        assert_eq!(free_rx.len(), 1, "refused buffer returned");

        // cancel while waiting for ops (channel still open)
        let cancel = AtomicBool::new(false);
        let result = thread::scope(|scope| {
            let writer = scope.spawn(|| {
                write_target(&writable.file, &info, &options, &ops_rx, &free_tx, &cancel)
            });
            ops_tx.send(WriteOp::Zero { offset: 0, length: 4096 }).expect("send op");
            thread::sleep(std::time::Duration::from_millis(50));
            cancel.store(true, Ordering::Relaxed);
            writer.join().expect("writer thread")
        });
        assert!(matches!(result, Err(IoError::Cancelled)), "{result:?}");
    }
}

/// Round trip through a loop device with `block`-byte logical blocks: probe, read the pattern
/// back with both engines, write mixed data and zero ops with both engines, read back, and check
/// the backing file after detaching.
fn loop_device_round_trip(block: u32) {
    let dir = TempDir::new(&format!("loop-{block}"));
    let backing = dir.path().join("backing");
    // 3 chunks of 2 MiB plus a partial chunk of 25 blocks
    let chunk = 2 * MIB;
    let size = 3 * chunk + 25 * block as usize;
    std::fs::write(&backing, pattern(10, 0, size)).expect("write backing file");
    let Some(device) = LoopDevice::attach(&backing, block) else { return };
    let mut expected = pattern(10, 0, size);
    {
        let opened = open(&device.0, true, false).expect("open loop device");
        assert!(opened.direct);
        let info = probe(&opened.file).expect("probe loop device");
        assert_eq!(
            info,
            DeviceInfo {
                size_bytes: size as u64,
                logical_block_bytes: block,
                is_block_device: true
            }
        );
        for mode in modes() {
            let options = read_options(mode.0, chunk, 512 * KIB, 8);
            let (stats, image) = read_all_with(&opened.file, &info, &options, mode.1, 3, false);
            check_read_registration(mode, &stats);
            assert_eq!(stats.bytes_read, size as u64);
            assert!(image == expected, "loop device image differs ({mode:?})");
        }
        for (round, mode) in modes().into_iter().enumerate() {
            // odd rounds swap data and zero ranges and send the ops in reverse order, so every
            // touched byte changes in every round
            let swap = round % 2 == 1;
            let mut ops = mixed_ops(&mut expected, block as usize, 20 + round as u64, swap);
            if swap {
                ops.reverse();
            }
            let (data, zeros) = op_bytes(&ops);
            let stats = write_all_with(&opened.file, &info, mode, 8, ops);
            check_write_registration(mode, &stats);
            assert_eq!(stats.bytes_written, data + zeros);
            assert_eq!(stats.zeroed_blkzeroout_bytes, zeros, "block device zeroes with ioctl");
            assert_eq!(stats.zeroed_fallocate_bytes, 0);
            assert_eq!(stats.zeroed_written_bytes, 0);
            assert!(stats.requests >= data.div_ceil(MIB as u64));
            for read_engine in engines() {
                let (_, image) =
                    read_all(&opened.file, &info, &read_options(read_engine, chunk, MIB, 4), 2);
                assert!(
                    image == expected,
                    "loop device after write differs ({mode:?}/{read_engine:?})"
                );
            }
        }
    }
    drop(device);
    let backing_bytes = std::fs::read(&backing).expect("read backing file");
    assert!(backing_bytes == expected, "backing file differs after detach");
}

#[test]
fn loop_device_512_round_trip() {
    loop_device_round_trip(512);
}

#[test]
fn loop_device_4096_round_trip() {
    loop_device_round_trip(4096);
}

#[test]
fn registered_reads_survive_buffers_replaced_by_new_allocations() {
    // more buffers than the fixed table has entries, each chunk's buffer freed and replaced by a
    // new allocation: entries are reused and evicted, and a new buffer at a freed address must not
    // hit the stale registration of the old one
    let dir = TempDir::new("read-fresh");
    let path = dir.path().join("image");
    let chunk = 64 * KIB;
    let size = 300 * chunk + 4096;
    let source = pattern(11, 0, size);
    std::fs::write(&path, &source).expect("write image");
    let opened = open(&path, false, false).expect("open image");
    let info = probe(&opened.file).expect("probe");
    let table = uring::FIXED_TABLE_ENTRIES as usize;
    for (buffers, fresh) in [(table + 6, false), (4, true), (table + 6, true)] {
        let mode = (Engine::Uring, Registration::Auto);
        let options = read_options(Engine::Uring, chunk, 16 * KIB, 16);
        let (stats, image) = read_all_with(&opened.file, &info, &options, mode.1, buffers, fresh);
        assert_eq!(stats.bytes_read, size as u64);
        assert!(image == source, "image differs (buffers {buffers}, fresh {fresh})");
        if expected_engine(Engine::Uring) == Engine::Uring {
            assert!(stats.registered_file);
            assert!(stats.fixed_buffer_requests > 0, "registered buffers were used");
        }
    }
}

#[test]
fn pread_with_depth_reads_every_chunk_once_in_any_order() {
    // 4 helper threads, more chunks than buffers, request size not dividing the file size
    let dir = TempDir::new("read-pread-depth");
    let path = dir.path().join("image");
    let size = 37 * 256 * KIB + 3 * 4096 + 100;
    let source = pattern(12, 0, size);
    std::fs::write(&path, &source).expect("write image");
    let opened = open(&path, false, false).expect("open image");
    let info = probe(&opened.file).expect("probe");
    for (depth, buffers) in [(4, 3), (16, 8), (2, 1)] {
        let options = read_options(Engine::Pread, 256 * KIB, 96 * KIB, depth);
        let (stats, image) = read_all(&opened.file, &info, &options, buffers);
        assert_eq!(stats.engine, Engine::Pread);
        assert_eq!(stats.bytes_read, size as u64);
        assert!(stats.requests >= 112, "{} requests", stats.requests);
        assert!(image == source, "pread image differs (depth {depth})");
    }
}

#[test]
fn zero_ops_fall_back_to_writes_when_fast_zeroing_is_unsupported() {
    // tmpfs supports neither O_DIRECT nor FALLOC_FL_ZERO_RANGE (EOPNOTSUPP): zeros are written
    let dir = Path::new("/dev/shm");
    if !dir.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let path = dir.join(format!("ferry-io-zero-{}", std::process::id()));
    let size = 3 * MIB;
    std::fs::write(&path, pattern(13, 0, size)).expect("write tmpfs file");
    for engine in engines() {
        let opened = open(&path, true, false).expect("open tmpfs file");
        let info = probe(&opened.file).expect("probe");
        let ops = vec![
            WriteOp::Zero { offset: 4096, length: MIB as u64 + 8192 },
            WriteOp::Zero { offset: 2 * MIB as u64, length: 4096 },
        ];
        let stats = write_all(&opened.file, &info, engine, 4, ops);
        let written = std::fs::read(&path).expect("read back");
        let zeroed = |range: std::ops::Range<usize>| written[range].iter().all(|&b| b == 0);
        assert!(zeroed(4096..MIB + 12288) && zeroed(2 * MIB..2 * MIB + 4096));
        assert!(written[..4096].iter().all(|&b| b != 0), "bytes before the range kept");
        assert!(written[2 * MIB + 4096..].iter().all(|&b| b != 0), "bytes after kept");
        assert_eq!(stats.bytes_written, MIB as u64 + 12288);
        assert_eq!(stats.zeroed_written_bytes, MIB as u64 + 12288, "{engine:?}");
        assert_eq!(stats.zeroed_fallocate_bytes, 0);
        assert_eq!(stats.zeroed_blkzeroout_bytes, 0);
    }
    let _ = std::fs::remove_file(&path);
}

/// Drops `CAP_IPC_LOCK` from the calling thread's effective capabilities (threads it spawns
/// inherit that); false when the kernel refused.
fn drop_ipc_lock_for_this_thread() -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: version 3 capget reads `header` and writes two `Data` records, both live and
    // writable for the call; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    data[0].effective &= !(1 << CAP_IPC_LOCK);
    // SAFETY: version 3 capset reads `header` and two `Data` records, live for the call; it only
    // changes the calling thread's capabilities.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    rc == 0
}

#[test]
fn registration_refused_by_memlock_limit_falls_back_to_plain_requests() {
    if !uring_available() {
        eprintln!("skipped: no io_uring");
        return;
    }
    let mut limit = std::mem::MaybeUninit::<libc::rlimit>::zeroed();
    // SAFETY: RLIMIT_MEMLOCK with a pointer to a live, writable rlimit the kernel fills.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, limit.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrlimit");
    // SAFETY: getrlimit succeeded, so the struct is filled (and was zeroed before).
    let limit = unsafe { limit.assume_init() }.rlim_cur;
    let chunk = 4 * MIB;
    let buffers = 6;
    if limit == libc::RLIM_INFINITY || limit >= (buffers * chunk) as u64 {
        eprintln!("skipped: RLIMIT_MEMLOCK {limit} would allow every registration");
        return;
    }
    let dir = TempDir::new("read-memlock");
    let path = dir.path().join("image");
    let size = 12 * chunk + 8192;
    let source = pattern(14, 0, size);
    std::fs::write(&path, &source).expect("write image");
    let opened = open(&path, false, false).expect("open image");
    let info = probe(&opened.file).expect("probe");
    let stats = thread::scope(|scope| {
        scope
            .spawn(|| {
                if !drop_ipc_lock_for_this_thread() {
                    return None;
                }
                let options = read_options(Engine::Uring, chunk, MIB, 16);
                let (stats, image) = read_all_with(
                    &opened.file,
                    &info,
                    &options,
                    Registration::Auto,
                    buffers,
                    false,
                );
                assert!(image == source, "image differs after registration fallback");
                Some(stats)
            })
            .join()
            .expect("reader thread")
    });
    let Some(stats) = stats else {
        eprintln!("skipped: could not drop CAP_IPC_LOCK");
        return;
    };
    assert_eq!(stats.engine, Engine::Uring);
    assert_eq!(stats.bytes_read, size as u64);
    assert!(stats.registered_file, "file registration needs no locked memory");
    assert!(!stats.registered_buffers, "the memlock limit refused some buffers");
    assert!(stats.fixed_buffer_requests < stats.requests, "{stats:?}");
    eprintln!("memlock fallback: {stats:?}");
}
