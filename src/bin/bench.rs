//! The `bench` binary: generates sample volumes and measures the data plane's stages.
//!
//! Every measuring subcommand prints one JSON object per run on stdout with `bench`, `config`
//! (the flags in effect), `bytes`, `seconds`, `mb_per_s`, `cpu_seconds` (user + system of the
//! whole process, from `/proc/self/stat`, 10 ms resolution), `cpu_seconds_per_gib` and
//! `latency_us` (`what` the latency measures, `count`, `p50`, `p99`, `p99_9`, `max`, from an
//! HDR histogram in microseconds; `null` where there is no per-operation latency):
//! - `gen-image PATH --size BYTES --mix mixed|random|text|zeros|sparse [--sparse-file]`: writes
//!   a sample volume (mixed = 40% zeros, 30% text, 30% random, in runs of 1-16 MiB);
//!   `--sparse-file` seeks over zero runs instead of writing them, so the file has holes;
//! - `read DEVICE`: `io::read_source` into a consumer thread that discards and recycles the
//!   buffers; latency = time between consecutive chunk arrivals at the consumer;
//! - `hash FILE`, `compress FILE`: one stage over a file's chunks, in memory; latency per chunk;
//! - `pipeline FILE`: a whole backup into a null store that discards, so the engine alone is
//!   measured (reader, zero detection, hash, dedup, zstd, packing);
//! - `upload --size 1G`: one multipart upload of in-memory random parts to the S3 bucket named
//!   by `FERRY_TEST_S3_*` and `AWS_*`; latency per part; the object is deleted afterwards;
//! - `restore FILE --target PATH`: backs FILE up into a local repository, then times only the
//!   restore onto the target, which is overwritten.
//!
//! Arguments are parsed with clap, as `ferry` parses its own: `bench --help` and
//! `bench SUBCOMMAND --help` describe every flag; a usage error is one line on stderr with exit
//! 2, a failed run one line with exit 1, never a panic or a backtrace.

#![allow(clippy::print_stdout)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use crossbeam_channel::bounded;
use ferry::io::{self, AlignedBuf, Engine};
use ferry::native::backup::{self, BackupOptions};
use ferry::native::chunk::ChunkHasher;
use ferry::native::compress::Compressor;
use ferry::native::repo::Repository;
use ferry::native::restore::{self, RestoreOptions};
use ferry::progress::Progress;
use ferry::store::{
    LocalStore, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, S3Options, S3Store,
    StoreError, UploadId,
};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// bench: generate sample volumes and measure ferry's data-plane stages (one JSON object per
/// run on stdout).
#[derive(Debug, Parser)]
#[command(name = "bench", version, max_term_width = 100)]
struct Cli {
    /// The measurement.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Write a sample volume (mixed: 40% zeros, 30% text, 30% random, in runs of 1-16 MiB).
    GenImage {
        /// The file to write.
        path: PathBuf,
        /// Its size; suffixes K, M, G.
        #[arg(long, default_value = "256M", value_parser = parse_bytes)]
        size: u64,
        /// What it holds.
        #[arg(long, default_value = "mixed",
              value_parser = ["mixed", "random", "text", "zeros", "sparse"])]
        mix: String,
        /// Seed of the generator: the same seed gives the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seek over zero runs instead of writing them, so the file has holes.
        #[arg(long)]
        sparse_file: bool,
    },
    /// Read a device or file with `io::read_source` into a consumer that discards: the reader
    /// alone, as fio measures a device.
    Read(ReadArgs),
    /// Hash a file's chunks in memory (keyed BLAKE3).
    Hash(StageArgs),
    /// Compress a file's chunks in memory (zstd).
    Compress(StageArgs),
    /// A whole backup into a null store, so the engine alone is measured.
    Pipeline(PipelineArgs),
    /// The CPU the Cinder format itself costs on a file, one stage at a time on one thread: MD5
    /// of every object, SHA-256 of every non-zero block, zlib segments of every non-zero slice
    /// (one JSON line each).
    CinderFloor(FloorArgs),
    /// One multipart upload of in-memory random parts to the bucket named by FERRY_TEST_S3_*
    /// and AWS_* (deleted afterwards).
    Upload(UploadArgs),
    /// Back FILE up into a local repository, then time only the restore onto --target.
    Restore(RestoreArgs),
    /// Generate a synthetic repository at scale: index objects (consolidated, plus per-pack
    /// ones as if written since the last consolidation), pack objects of the indexed size
    /// (zeros: nothing reads their records) and manifests, written directly.
    SynthRepo(SynthArgs),
}

/// `bench synth-repo`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("where").required(true).args(["repo", "s3_prefix"]))]
struct SynthArgs {
    /// A local directory to create the repository in (must not exist or be empty).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// A prefix in the bucket named by FERRY_TEST_S3_* (must hold nothing).
    #[arg(long)]
    s3_prefix: Option<String>,
    /// Packs in the repository.
    #[arg(long)]
    packs: u64,
    /// Chunks per pack (a 128 MiB pack of 4 MiB chunks holds 32).
    #[arg(long, default_value_t = 32)]
    chunks_per_pack: u32,
    /// Of the packs, how many have only their own index (written since the last consolidation).
    #[arg(long, default_value_t = 64)]
    unconsolidated: u64,
    /// Backups (manifests) to write.
    #[arg(long, default_value_t = 0)]
    backups: u64,
    /// Chunks per backup (its volume is this many chunks).
    #[arg(long, default_value_t = 256)]
    backup_chunks: u32,
    /// Objects written at once.
    #[arg(long, default_value_t = 16)]
    threads: usize,
}

/// `--io-engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// io_uring with O_DIRECT.
    #[value(alias = "io_uring")]
    Uring,
    /// pread/pwrite with O_DIRECT.
    Pread,
}

impl EngineArg {
    fn engine(self) -> Engine {
        match self {
            EngineArg::Uring => Engine::Uring,
            EngineArg::Pread => Engine::Pread,
        }
    }
}

/// `bench read`.
#[derive(Debug, Args)]
struct ReadArgs {
    /// The device or file.
    device: PathBuf,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "uring")]
    io_engine: EngineArg,
    /// Bytes per read request; suffixes K, M, G.
    #[arg(long, default_value = "1M", value_parser = parse_bytes)]
    request_size: u64,
    /// Bytes per chunk handed to the consumer (a multiple of 4 KiB).
    #[arg(long, default_value = "4M", value_parser = parse_chunk_size)]
    chunk_size: u64,
    /// Read requests in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: u16,
}

/// `bench hash`, `bench compress`.
#[derive(Debug, Args)]
struct StageArgs {
    /// The file whose chunks are measured.
    file: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = ferry::native::compress::LEVEL_DEFAULT,
          allow_negative_numbers = true)]
    level: i32,
}

/// `bench cinder-floor`.
#[derive(Debug, Args)]
struct FloorArgs {
    /// The file whose Cinder-format cost is measured.
    file: PathBuf,
    /// Bytes per Cinder object (Cinder's `backup_s3_object_size`); suffixes K, M, G.
    #[arg(long, default_value = "52428800", value_parser = parse_positive_bytes)]
    object_size: u64,
    /// Bytes per SHA-256 block (Cinder's `backup_s3_sha_block_size_bytes`).
    #[arg(long, default_value = "32768", value_parser = parse_positive_bytes)]
    block_size: u64,
    /// Bytes per zlib segment (ferry's read chunk for these sizes).
    #[arg(long, default_value = "3276800", value_parser = parse_positive_bytes)]
    segment_size: u64,
    /// zlib level (ferry's default for Cinder-format backups).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    level: u32,
}

/// `bench pipeline`.
#[derive(Debug, Args)]
struct PipelineArgs {
    /// The device or file to back up.
    file: PathBuf,
    /// I/O engine.
    #[arg(long, value_enum, default_value = "uring")]
    io_engine: EngineArg,
    /// Read requests in flight (default: tuned per device).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: Option<u16>,
    /// zstd level.
    #[arg(long, default_value_t = ferry::native::compress::LEVEL_DEFAULT,
          allow_negative_numbers = true)]
    level: i32,
}

/// `bench upload`.
#[derive(Debug, Args)]
struct UploadArgs {
    /// Bytes uploaded; suffixes K, M, G.
    #[arg(long, default_value = "1G", value_parser = parse_positive_bytes)]
    size: u64,
    /// Bytes per part.
    #[arg(long, default_value = "16M", value_parser = parse_positive_bytes)]
    part_size: u64,
    /// Parts uploading at once.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(1..))]
    parts_in_flight: u16,
}

/// `bench restore`.
#[derive(Debug, Args)]
struct RestoreArgs {
    /// The device or file backed up first.
    file: PathBuf,
    /// Where to restore it (overwritten).
    #[arg(long)]
    target: PathBuf,
    /// Repository directory to keep (default: a temporary one, removed afterwards).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// I/O engine of the writer.
    #[arg(long, value_enum, default_value = "uring")]
    io_engine: EngineArg,
    /// Write requests in flight (default: ferry's).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    queue_depth: Option<u16>,
    /// Ranged GETs in flight (default: ferry's).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    downloads_in_flight: Option<u16>,
}

/// Parses the arguments (usage errors: one line on stderr, exit 2; `--help`: exit 0), runs the
/// subcommand, and reports a failure on one line with exit 1.
fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            let _ = error.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            // clap's first paragraph (the error and what it names), on one line.
            let rendered = error.render().to_string();
            let first = rendered.split("\n\n").next().unwrap_or("bad arguments");
            let message = first.split_whitespace().collect::<Vec<_>>().join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("bench: error: {message} (see bench --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::GenImage { path, size, mix, seed, sparse_file } => {
            gen_image(&path, size, &mix, seed, sparse_file)
        }
        Command::Read(args) => read(&args),
        Command::Hash(args) => stage(&args.file, "hash", args.level),
        Command::Compress(args) => stage(&args.file, "compress", args.level),
        Command::CinderFloor(args) => cinder_floor(&args),
        Command::Pipeline(args) => pipeline(&args),
        Command::Upload(args) => upload(&args),
        Command::Restore(args) => restore_bench(&args),
        Command::SynthRepo(args) => synth_repo(&args),
    }
}

/// A byte count: digits with an optional K, M or G suffix (binary).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.chars().last() {
        Some('K') => (&text[..text.len() - 1], 10),
        Some('M') => (&text[..text.len() - 1], 20),
        Some('G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = digits.parse::<u64>().map_err(|_| format!("{text:?} is not a size"))?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_positive_bytes(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        0 => Err("must be positive".to_string()),
        bytes => Ok(bytes),
    }
}

fn parse_chunk_size(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        bytes if bytes > 0 && bytes.is_multiple_of(io::BUF_ALIGN as u64) => Ok(bytes),
        _ => Err(format!("{text} is not a non-zero multiple of {}", io::BUF_ALIGN)),
    }
}

/// xorshift64*: fast, deterministic, good enough to be incompressible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for block in out.chunks_mut(8) {
            let value = self.next().to_le_bytes();
            block.copy_from_slice(&value[..block.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "volume",
    "block",
    "backup",
    "restore",
    "snapshot",
    "clone",
    "cluster",
    "replica",
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "data",
    "storage",
    "object",
    "bucket",
    "chunk",
    "manifest",
    "pack",
    "index",
    "error",
    "INFO",
    "WARN",
    "2026-11-26T10:00:00Z",
    "nvme",
    "tcp",
    "lightbits",
    "ferry",
];

fn fill_text(rng: &mut Rng, out: &mut [u8]) {
    let mut position = 0;
    while position < out.len() {
        let value = rng.next();
        let word = WORDS[(value % WORDS.len() as u64) as usize].as_bytes();
        let separator: &[u8] = if value >> 60 == 0 { b".\n" } else { b" " };
        for &byte in word.iter().chain(separator) {
            if position == out.len() {
                break;
            }
            out[position] = byte;
            position += 1;
        }
    }
}

fn gen_image(path: &Path, size: u64, mix: &str, seed: u64, sparse_file: bool) -> Result<()> {
    let started = Instant::now();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut file = std::io::BufWriter::with_capacity(
        8 << 20,
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut buffer = vec![0u8; 16 << 20];
    let mut written = 0u64;
    let mut counts = [0u64; 3];
    while written < size {
        let run = ((rng.next() % 16 + 1) << 20).min(size - written);
        let roll = rng.next() % 100;
        let kind = match mix {
            "mixed" => usize::from(roll >= 40) + usize::from(roll >= 70),
            "sparse" => {
                if roll < 95 {
                    0
                } else {
                    1 + usize::from(roll >= 98)
                }
            }
            "random" => 2,
            "text" => 1,
            "zeros" => 0,
            other => bail!("unknown mix {other:?}"),
        };
        let out = &mut buffer[..usize::try_from(run)?];
        match kind {
            0 if sparse_file => {
                // A hole: the file reads as zeros there without a byte written.
                let _ = file.seek(SeekFrom::Current(i64::try_from(run)?))?;
            }
            0 => {
                out.fill(0);
                file.write_all(out)?;
            }
            1 => {
                fill_text(&mut rng, out);
                file.write_all(out)?;
            }
            _ => {
                rng.fill(out);
                file.write_all(out)?;
            }
        }
        counts[kind] += run;
        written += run;
    }
    file.flush()?;
    // A trailing hole needs the length set; a file of data already has it.
    file.get_ref().set_len(size)?;
    file.get_ref().sync_all()?;
    println!(
        "{}",
        json!({"bench": "gen-image", "path": path.display().to_string(), "size_bytes": size, "mix": mix,
               "sparse_file": sparse_file,
               "zero_bytes": counts[0], "text_bytes": counts[1], "random_bytes": counts[2],
               "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// Latencies of one kind of operation, in microseconds.
struct Latency {
    what: &'static str,
    histogram: Histogram<u64>,
}

impl Latency {
    fn new(what: &'static str) -> Result<Latency> {
        // 1 µs to 1 hour, 3 significant digits.
        let histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|error| anyhow!("histogram: {error}"))?;
        Ok(Latency { what, histogram })
    }

    fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1);
        self.histogram.saturating_record(micros);
    }

    fn merge(&mut self, other: &Latency) -> Result<()> {
        self.histogram.add(&other.histogram).map_err(|error| anyhow!("histogram: {error}"))
    }

    fn to_json(&self) -> Value {
        let h = &self.histogram;
        json!({"what": self.what, "count": h.len(), "p50": h.value_at_quantile(0.5),
               "p99": h.value_at_quantile(0.99), "p99_9": h.value_at_quantile(0.999),
               "max": h.max()})
    }
}

/// Prints the one JSON line of a run: the common fields, then `extra`'s fields.
fn report(
    name: &str,
    config: Value,
    bytes: u64,
    seconds: f64,
    cpu: f64,
    latency: Option<&Latency>,
    extra: Value,
) {
    let mut line = json!({"bench": name, "config": config, "bytes": bytes, "seconds": seconds,
        "mb_per_s": bytes as f64 / 1e6 / seconds, "cpu_seconds": cpu,
        "cpu_seconds_per_gib": cpu / (bytes as f64 / f64::from(1u32 << 30)),
        "latency_us": latency.map(Latency::to_json)});
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    println!("{line}");
}

fn stage(path: &Path, name: &str, level: i32) -> Result<()> {
    let data = std::fs::read(path)?;
    let hasher = ChunkHasher::new([7; 32]);
    let mut compressor = Compressor::new(level);
    let mut out = Vec::new();
    let mut stored = 0u64;
    let mut latency = Latency::new("per chunk")?;
    let chunk_size = ferry::limits::CHUNK_SIZE_BYTES_DEFAULT as usize;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for chunk in data.chunks(chunk_size) {
        let chunk_started = Instant::now();
        if name == "hash" {
            let _ = std::hint::black_box(hasher.hash(chunk));
        } else {
            let _ = compressor.compress(chunk, &mut out);
            stored += out.len() as u64;
        }
        latency.record(chunk_started.elapsed());
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    report(
        name,
        json!({"path": path.display().to_string(), "chunk_size": chunk_size, "level": level}),
        data.len() as u64,
        seconds,
        cpu,
        Some(&latency),
        json!({"stored_bytes": stored}),
    );
    Ok(())
}

/// Times `pass` over `data` on this thread and reports it as bench `name`.
fn timed_pass(
    name: &str,
    config: &Value,
    data: &[u8],
    pass: impl FnOnce() -> Result<Value>,
) -> Result<()> {
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let extra = pass()?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    report(name, config.clone(), data.len() as u64, seconds, cpu, None, extra);
    Ok(())
}

fn cinder_floor(args: &FloorArgs) -> Result<()> {
    use ferry::cinder::layout::zlib_segments;
    use md5::Digest as _;
    let data = std::fs::read(&args.file)?;
    let size = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
    let (object, block, segment) =
        (size(args.object_size), size(args.block_size), size(args.segment_size));
    let config = json!({"path": args.file.display().to_string(), "object_size": object,
        "block_size": block, "segment_size": segment, "level": args.level});
    timed_pass("cinder-md5", &config, &data, || {
        let mut objects = 0u64;
        for o in data.chunks(object) {
            let _ = std::hint::black_box(md5::Md5::digest(o));
            objects += 1;
        }
        Ok(json!({"objects": objects}))
    })?;
    timed_pass("cinder-sha256", &config, &data, || {
        let mut hashed = 0u64;
        for b in data.chunks(block) {
            if !ferry::native::chunk::is_zero(b) {
                let _ = std::hint::black_box(sha2::Sha256::digest(b));
                hashed += 1;
            }
        }
        Ok(json!({"blocks_hashed": hashed}))
    })?;
    timed_pass("cinder-zlib", &config, &data, || {
        let mut stored = 0u64;
        for o in data.chunks(object) {
            let slices: Vec<&[u8]> = o.chunks(segment).collect();
            for (i, slice) in slices.iter().enumerate() {
                // Zero slices are encoded once per length by the job; not counted.
                if !ferry::native::chunk::is_zero(slice) {
                    let last = i + 1 == slices.len();
                    let encoded = zlib_segments::compress_segment(slice, args.level, last)?;
                    stored += encoded.deflate.len() as u64;
                }
            }
        }
        Ok(json!({"stored_bytes": stored}))
    })
}

/// `read_source` into a consumer that discards: the reader alone, as fio measures a device.
fn read(args: &ReadArgs) -> Result<()> {
    let path = args.device.as_path();
    let engine = args.io_engine.engine();
    let request_size = usize::try_from(args.request_size)?;
    let chunk_size = usize::try_from(args.chunk_size)?;
    let queue_depth = usize::from(args.queue_depth);
    let opened = io::open(path, false, false)?;
    let info = io::probe(&opened.file)?;
    let options = io::ReadOptions {
        engine,
        chunk_size_bytes: chunk_size,
        request_size_bytes: request_size,
        queue_depth,
    };
    // Enough buffers to keep `queue_depth` requests in flight while the consumer holds two.
    let buffer_count = (queue_depth * request_size).div_ceil(chunk_size).max(1) + 2;
    let (free_tx, free_rx) = bounded::<AlignedBuf>(buffer_count);
    for _ in 0..buffer_count {
        free_tx.send(AlignedBuf::new(chunk_size))?;
    }
    let (out_tx, out_rx) = bounded::<io::ReadChunk>(buffer_count);
    let cancel = AtomicBool::new(false);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let (stats, consumed) = std::thread::scope(|scope| {
        let consumer = scope.spawn(move || -> Result<(Latency, u64)> {
            let mut latency = Latency::new("between chunk arrivals at the consumer")?;
            let mut last = Instant::now();
            let mut bytes = 0u64;
            for chunk in &out_rx {
                let now = Instant::now();
                latency.record(now - last);
                last = now;
                bytes += chunk.buf.len() as u64;
                let _ = std::hint::black_box(chunk.buf.as_slice().first());
                let _ = free_tx.send(chunk.buf);
            }
            Ok((latency, bytes))
        });
        let out_tx = out_tx;
        let stats = io::read_source(&opened.file, &info, &options, &free_rx, &out_tx, &cancel);
        drop(out_tx);
        (stats, consumer.join())
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let stats = stats?;
    let (latency, bytes) = consumed.map_err(|_| anyhow!("consumer thread panicked"))??;
    report(
        "read",
        json!({"path": path.display().to_string(), "io_engine": engine.name(),
               "request_size": request_size, "queue_depth": queue_depth,
               "chunk_size": chunk_size, "buffers": buffer_count}),
        bytes,
        seconds,
        cpu,
        Some(&latency),
        json!({"io_engine": stats.engine.name(), "direct": opened.direct,
               "requests": stats.requests, "block_device": info.is_block_device}),
    );
    Ok(())
}

/// A store that keeps nothing: `pipeline` measures the engine without an object store.
#[derive(Debug)]
struct NullStore;

impl ObjectStore for NullStore {
    fn put(&self, _key: &str, _data: Bytes) -> Result<(), StoreError> {
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        Err(StoreError::NotFound { key: key.to_string() })
    }
    fn get_range(&self, key: &str, _offset: u64, _length: u64) -> Result<Bytes, StoreError> {
        Err(StoreError::NotFound { key: key.to_string() })
    }
    fn list(&self, _prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(Vec::new())
    }
    fn delete(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn multipart_begin(&self, _key: &str) -> Result<UploadId, StoreError> {
        Ok(UploadId("null".into()))
    }
    fn multipart_put_part(
        &self,
        _key: &str,
        _id: &UploadId,
        part_number: u32,
        _data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        Ok(PartReceipt { part_number, etag: String::new(), checksum_crc32c: None })
    }
    fn multipart_complete(
        &self,
        _key: &str,
        _id: &UploadId,
        _parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        Ok(())
    }
    fn multipart_abort(&self, _key: &str, _id: &UploadId) -> Result<(), StoreError> {
        Ok(())
    }
    fn multipart_list(&self, _prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        Ok(Vec::new())
    }
    fn describe(&self) -> String {
        "null store".to_string()
    }
}

fn pipeline(args: &PipelineArgs) -> Result<()> {
    let path = args.file.as_path();
    let repo = Repository::init(Box::new(NullStore), ferry::limits::CHUNK_SIZE_BYTES_DEFAULT)?;
    let mut options = BackupOptions::new(path.to_path_buf());
    options.engine = args.io_engine.engine();
    options.compression_level = args.level;
    options.queue_depth = args.queue_depth.map(usize::from);
    let progress = Progress::default();
    let cancel = AtomicBool::new(false);
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let outcome = backup::run(&repo, &options, &progress, &cancel, &|w| eprintln!("warning: {w}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let size = outcome.manifest.volume_size_bytes;
    report(
        "pipeline",
        json!({"path": path.display().to_string(), "io_engine": options.engine.name(),
               "queue_depth": options.queue_depth, "workers": options.worker_count,
               "level": options.compression_level}),
        size,
        seconds,
        cpu,
        None,
        json!({"path": path.display().to_string(), "io_engine": outcome.engine.name(),
               "direct": outcome.direct, "stats": outcome.manifest.stats}),
    );
    Ok(())
}

/// The S3 bucket of the test environment: `FERRY_TEST_S3_ENDPOINT`, `FERRY_TEST_S3_BUCKET`,
/// `FERRY_TEST_S3_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
fn test_s3_store() -> Result<S3Store> {
    test_s3_store_at("")
}

/// The same, under `prefix`.
fn test_s3_store_at(prefix: &str) -> Result<S3Store> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let mut options = S3Options::new(
        var("FERRY_TEST_S3_BUCKET")?,
        prefix,
        std::env::var("FERRY_TEST_S3_REGION").unwrap_or_else(|_| "garage".to_string()),
        var("AWS_ACCESS_KEY_ID")?,
        var("AWS_SECRET_ACCESS_KEY")?,
    );
    options.endpoint_url = std::env::var("FERRY_TEST_S3_ENDPOINT").ok();
    Ok(S3Store::new(options)?)
}

/// One multipart upload of `--size` bytes of random parts, `--parts-in-flight` at once.
fn upload(args: &UploadArgs) -> Result<()> {
    let (size, part_size) = (args.size, args.part_size);
    let in_flight = usize::from(args.parts_in_flight);
    let part_count = u32::try_from(size.div_ceil(part_size))?;
    let store = test_s3_store()?;
    // A few random parts, reused round-robin, each copy stamped with its part number.
    let mut rng = Rng(0x5EED_0000 ^ u64::from(std::process::id()));
    let samples: Vec<Bytes> = (0..in_flight + 1)
        .map(|_| {
            let mut part = vec![0u8; usize::try_from(part_size).unwrap_or(usize::MAX)];
            rng.fill(&mut part);
            Bytes::from(part)
        })
        .collect();
    let key = format!(
        "bench-upload/{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis()
    );
    let next = AtomicU32::new(1);
    let receipts = Mutex::new(Vec::new());
    let latency = Mutex::new(Latency::new("per part upload")?);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let upload_id = store.multipart_begin(&key)?;
    let outcome: Result<()> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..in_flight)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut mine = Latency::new("per part upload")?;
                    loop {
                        let number = next.fetch_add(1, Ordering::Relaxed);
                        if number > part_count {
                            break;
                        }
                        let offset = u64::from(number - 1) * part_size;
                        let length = usize::try_from(part_size.min(size - offset))?;
                        // Garage stores blocks by content hash and skips ones it has: stamp
                        // the part number into every 64 KiB so each part is new data.
                        let mut data = samples[number as usize % samples.len()][..length].to_vec();
                        for block in data.chunks_mut(64 << 10).filter(|b| b.len() >= 4) {
                            block[..4].copy_from_slice(&number.to_le_bytes());
                        }
                        let data = Bytes::from(data);
                        let part_started = Instant::now();
                        let receipt = store.multipart_put_part(&key, &upload_id, number, data)?;
                        mine.record(part_started.elapsed());
                        ferry::native::repo::lock(&receipts).push(receipt);
                    }
                    ferry::native::repo::lock(&latency).merge(&mine)
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow!("upload thread panicked"))??;
        }
        Ok(())
    });
    let mut receipts = receipts.into_inner().map_err(|_| anyhow!("poisoned"))?;
    receipts.sort_by_key(|r| r.part_number);
    let completed =
        outcome.and_then(|()| Ok(store.multipart_complete(&key, &upload_id, &receipts)?));
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    if let Err(error) = completed {
        let _ = store.multipart_abort(&key, &upload_id);
        return Err(error);
    }
    store.delete(&key)?;
    let latency = latency.into_inner().map_err(|_| anyhow!("poisoned"))?;
    report(
        "upload",
        json!({"size": size, "part_size": part_size, "parts_in_flight": in_flight}),
        size,
        seconds,
        cpu,
        Some(&latency),
        json!({"parts": part_count, "store": store.describe()}),
    );
    Ok(())
}

/// Backs FILE up into a local repository, then times the restore onto `--target` alone.
fn restore_bench(args: &RestoreArgs) -> Result<()> {
    let (path, target) = (args.file.as_path(), args.target.as_path());
    let (repo_dir, temporary) = match &args.repo {
        Some(dir) => (dir.clone(), false),
        None => {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("ferry-bench-restore-{}-{nanos}", std::process::id()));
            (dir, true)
        }
    };
    let result = restore_timed(path, target, &repo_dir, args);
    if temporary {
        let _ = std::fs::remove_dir_all(&repo_dir);
    }
    result
}

fn restore_timed(path: &Path, target: &Path, repo_dir: &Path, args: &RestoreArgs) -> Result<()> {
    std::fs::create_dir_all(repo_dir)?;
    let chunk_size = ferry::limits::CHUNK_SIZE_BYTES_DEFAULT;
    // An existing repository is reused (the backup then uploads only what is new).
    let repo = match Repository::open(Box::new(LocalStore::new(repo_dir)?)) {
        Ok(repo) => repo,
        Err(_) => Repository::init(Box::new(LocalStore::new(repo_dir)?), chunk_size)?,
    };
    let backup_started = Instant::now();
    let outcome = backup::run(
        &repo,
        &BackupOptions::new(path.to_path_buf()),
        &Progress::default(),
        &AtomicBool::new(false),
        &|w| eprintln!("warning: {w}"),
    )?;
    let backup_seconds = backup_started.elapsed().as_secs_f64();
    let mut options = RestoreOptions::new(target.to_path_buf());
    options.engine = args.io_engine.engine();
    options.force = true;
    options.queue_depth = args.queue_depth.map_or(options.queue_depth, usize::from);
    options.downloads_in_flight =
        args.downloads_in_flight.map_or(options.downloads_in_flight, usize::from);
    let progress = Progress::default();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let stats = restore::run(
        &repo,
        &outcome.manifest,
        &options,
        &progress,
        &AtomicBool::new(false),
        &|w| eprintln!("warning: {w}"),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    report(
        "restore",
        json!({"path": path.display().to_string(), "target": target.display().to_string(),
               "repo": repo_dir.display().to_string(), "io_engine": options.engine.name(),
               "queue_depth": options.queue_depth,
               "downloads_in_flight": options.downloads_in_flight, "force": true}),
        stats.volume_size_bytes,
        seconds,
        cpu,
        None,
        json!({"backup_seconds": backup_seconds, "stats": stats}),
    );
    Ok(())
}

/// User plus system CPU seconds of this process, from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; after the ')' they are at 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Where `synth-repo` writes: a local directory (files written directly, without the local
/// store's fsyncs, which would take hours for a million packs) or an S3 prefix.
enum SynthTarget {
    Local(PathBuf),
    S3(S3Store),
}

impl SynthTarget {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        match self {
            SynthTarget::Local(root) => {
                let path = root.join(key);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, data)?;
            }
            SynthTarget::S3(store) => store.put(key, Bytes::copy_from_slice(data))?,
        }
        Ok(())
    }
}

/// `bench synth-repo`: see `SynthArgs`.
fn synth_repo(args: &SynthArgs) -> Result<()> {
    use ferry::native::layout::merged::{MERGED_PACKS_MAX, MergedIndex, merged_key};
    use ferry::native::layout::{self, ObjectKind, PackId, PackIndex};
    const CHUNK: u32 = 4 << 20;
    if args.unconsolidated > args.packs || args.chunks_per_pack == 0 || args.backup_chunks == 0 {
        bail!(
            "--unconsolidated must not exceed --packs; --chunks-per-pack and --backup-chunks must be at least 1"
        );
    }
    let (store, target): (Box<dyn ObjectStore>, SynthTarget) = match (&args.repo, &args.s3_prefix) {
        (Some(path), None) => (Box::new(LocalStore::new(path)?), SynthTarget::Local(path.clone())),
        (None, Some(prefix)) => {
            (Box::new(test_s3_store_at(prefix)?), SynthTarget::S3(test_s3_store_at(prefix)?))
        }
        _ => bail!("give exactly one of --repo and --s3-prefix"),
    };
    let started = Instant::now();
    let repo = Repository::init(store, CHUNK)?;
    let repository_id = repo.config.repository_id.clone();
    let mut rng = Rng(0x5EED_5EED);
    let chunks = args.chunks_per_pack;
    let pack_size = SYNTH_RECORD * u64::from(chunks);
    let zeros = vec![0u8; usize::try_from(pack_size)?];
    let put_all = |objects: &[(String, Vec<u8>)]| put_all(&target, args.threads, objects);
    // A sample of packs for the manifests to reference.
    let mut sample: Vec<PackIndex> = Vec::new();
    let mut written_packs = 0u64;
    let mut index_objects = 0u64;
    let consolidated = args.packs - args.unconsolidated;
    while written_packs < args.packs {
        let in_merged = written_packs < consolidated;
        let batch_size = if in_merged {
            (consolidated - written_packs).min(MERGED_PACKS_MAX as u64)
        } else {
            (args.packs - written_packs).min(MERGED_PACKS_MAX as u64)
        };
        let mut batch: Vec<PackIndex> =
            (0..batch_size).map(|_| synth_pack(&mut rng, chunks)).collect();
        batch.sort_unstable_by_key(|index| index.pack);
        let mut objects: Vec<(String, Vec<u8>)> = match &target {
            // Sparse files of the pack's size: nothing reads their records.
            SynthTarget::Local(root) => {
                for index in &batch {
                    let path = root.join(index.pack.pack_key());
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::File::create(&path)?.set_len(pack_size)?;
                }
                Vec::new()
            }
            SynthTarget::S3(_) => {
                batch.iter().map(|index| (index.pack.pack_key(), zeros.clone())).collect()
            }
        };
        if in_merged {
            let merged = MergedIndex { supersedes: Vec::new(), packs: batch };
            objects.push((merged_key(PackId::random()), merged.encode(&layout::Crypt::Plain)));
            index_objects += 1;
            batch = merged.packs;
        } else {
            for index in &batch {
                objects.push((
                    index.pack.index_key(),
                    layout::encode_document(&layout::Crypt::Plain, ObjectKind::Index, index),
                ));
                index_objects += 1;
            }
        }
        put_all(&objects)?;
        written_packs += batch_size;
        if sample.len() < 4096 {
            sample.extend(batch.into_iter().take(4096 - sample.len()));
        }
    }
    synth_manifests(args, &repository_id, &sample, &mut rng, &put_all)?;
    report(
        "synth-repo",
        json!({"packs": args.packs, "chunks_per_pack": chunks, "unconsolidated": args.unconsolidated,
               "backups": args.backups, "backup_chunks": args.backup_chunks}),
        args.packs * pack_size,
        started.elapsed().as_secs_f64(),
        cpu_seconds(),
        None,
        json!({"index_objects": index_objects, "chunks": args.packs * u64::from(chunks),
               "store": repo.store.describe()}),
    );
    Ok(())
}

/// Objects to write: key and bytes.
type Objects = [(String, Vec<u8>)];

/// Bytes of a synthetic record: a header and one stored byte.
const SYNTH_RECORD: u64 = 64 + 1;

/// A synthetic pack's index: `chunks` random hashes, records of `SYNTH_RECORD` bytes.
fn synth_pack(rng: &mut Rng, chunks: u32) -> ferry::native::layout::PackIndex {
    use ferry::native::layout::{ChunkHash, IndexEntry, PackId, PackIndex};
    let mut id = [0u8; 16];
    rng.fill(&mut id);
    let entries = (0..u64::from(chunks))
        .map(|n| {
            let mut hash = [0u8; 32];
            rng.fill(&mut hash);
            IndexEntry {
                hash: ChunkHash(hash),
                offset: n * SYNTH_RECORD,
                stored_bytes: 1,
                raw_bytes: 4 << 20,
            }
        })
        .collect();
    PackIndex { pack: PackId(id), pack_size_bytes: SYNTH_RECORD * u64::from(chunks), entries }
}

/// Writes `objects` to `target`, `threads` at once.
fn put_all(target: &SynthTarget, threads: usize, objects: &[(String, Vec<u8>)]) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let position = next.fetch_add(1, Ordering::Relaxed);
                        let Some((key, data)) = objects.get(position) else { return Ok(()) };
                        target.put(key, data)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow!("writer thread panicked"))??;
        }
        Ok(())
    })
}

/// `synth-repo`'s manifests: daily backups of 100 volumes from 2026-01-01 on, each of
/// `--backup-chunks` chunks drawn from `sample`'s packs.
fn synth_manifests(
    args: &SynthArgs,
    repository_id: &str,
    sample: &[ferry::native::layout::PackIndex],
    rng: &mut Rng,
    put_all: &dyn Fn(&Objects) -> Result<()>,
) -> Result<()> {
    use ferry::native::layout::{self, Manifest, ObjectKind, SourceInfo};
    const CHUNK: u32 = 4 << 20;
    let chunks = args.chunks_per_pack;
    let repository_id = repository_id.to_owned();
    let mut manifests = Vec::new();
    let base = 1_767_225_600u64;
    for n in 0..args.backups {
        let time = base + (n / 100) * 86_400 + (n % 100) * 60;
        let mut packs = std::collections::BTreeSet::new();
        let hashes = (0..args.backup_chunks)
            .map(|_| {
                let pack = &sample[usize::try_from(rng.next() % sample.len() as u64).unwrap_or(0)];
                let _ = packs.insert(pack.pack);
                Some(
                    pack.entries[usize::try_from(rng.next() % u64::from(chunks)).unwrap_or(0)].hash,
                )
            })
            .collect();
        let started_at = layout::Timestamp(time);
        let backup_id = format!("{}-{:08x}", started_at.compact(), n);
        let manifest = Manifest {
            format_version: layout::FORMAT_VERSION,
            backup_id: backup_id.clone(),
            repository_id: repository_id.clone(),
            source: SourceInfo {
                path: format!("/dev/synth/volume-{:03}", n % 100),
                kind: "block_device".into(),
                logical_block_bytes: 512,
            },
            volume_size_bytes: u64::from(args.backup_chunks) * u64::from(CHUNK),
            chunk_size_bytes: CHUNK,
            started_at,
            completed_at: layout::Timestamp(time + 600),
            packs: packs.into_iter().collect(),
            chunks: hashes,
            stats: layout::BackupStats::default(),
            base: None,
        };
        manifests.push((
            layout::manifest_key(&backup_id),
            layout::encode_document(&layout::Crypt::Plain, ObjectKind::Manifest, &manifest),
        ));
        if manifests.len() == 1024 {
            put_all(&manifests)?;
            manifests.clear();
        }
    }
    put_all(&manifests)
}
