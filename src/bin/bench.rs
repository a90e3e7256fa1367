//! The `bench` binary: generates sample volumes and measures the data plane's stages.
//!
//! Subcommands print one JSON object per run on stdout:
//! - `gen-image PATH --size BYTES --mix mixed|random|text|zeros|sparse`: writes a sample volume
//!   (mixed = 40% zeros, 30% text, 30% random, in runs of 1-16 MiB);
//! - `hash FILE`, `compress FILE`: one stage over a file's chunks, in memory;
//! - `pipeline FILE`: a whole backup into a null store that discards, so the engine alone is
//!   measured (reader, zero detection, hash, dedup, zstd, packing).

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use ferry::backup::{self, BackupOptions};
use ferry::chunk::ChunkHasher;
use ferry::compress::Compressor;
use ferry::progress::Progress;
use ferry::repo::Repository;
use ferry::store::{ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError, UploadId};
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else { bail!(usage()) };
    let flag = |name: &str| {
        args.iter().position(|a| a == name).and_then(|p| args.get(p + 1)).map(String::as_str)
    };
    let positional = args.get(1).filter(|a| !a.starts_with("--")).map(PathBuf::from);
    let path = || positional.clone().context(usage());
    match command.as_str() {
        "gen-image" => {
            let size = parse_bytes(flag("--size").unwrap_or("256M"))?;
            let mix = flag("--mix").unwrap_or("mixed");
            let seed = flag("--seed").map_or(Ok(1), str::parse::<u64>)?;
            gen_image(&path()?, size, mix, seed)
        }
        "hash" => stage(&path()?, "hash"),
        "compress" => stage(&path()?, "compress"),
        "pipeline" => pipeline(&path()?, flag("--io-engine").unwrap_or("uring")),
        _ => bail!(usage()),
    }
}

fn usage() -> String {
    "usage: bench gen-image PATH [--size 2G] [--mix mixed|random|text|zeros|sparse] [--seed N]\n       \
     bench hash FILE | bench compress FILE | bench pipeline FILE [--io-engine uring|pread]"
        .to_string()
}

fn parse_bytes(text: &str) -> Result<u64> {
    let (digits, shift) = match text.chars().last() {
        Some('K') => (&text[..text.len() - 1], 10),
        Some('M') => (&text[..text.len() - 1], 20),
        Some('G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    Ok(digits.parse::<u64>().with_context(|| format!("bad size {text:?}"))? << shift)
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

fn gen_image(path: &std::path::Path, size: u64, mix: &str, seed: u64) -> Result<()> {
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
            0 => out.fill(0),
            1 => fill_text(&mut rng, out),
            _ => rng.fill(out),
        }
        file.write_all(out)?;
        counts[kind] += run;
        written += run;
    }
    file.flush()?;
    file.get_ref().sync_all()?;
    println!(
        "{}",
        json!({"bench": "gen-image", "path": path.display().to_string(), "size_bytes": size, "mix": mix,
               "zero_bytes": counts[0], "text_bytes": counts[1], "random_bytes": counts[2],
               "seconds": started.elapsed().as_secs_f64()})
    );
    Ok(())
}

fn stage(path: &std::path::Path, name: &str) -> Result<()> {
    let data = std::fs::read(path)?;
    let hasher = ChunkHasher::new([7; 32]);
    let mut compressor = Compressor::new(ferry::compress::LEVEL_DEFAULT);
    let mut out = Vec::new();
    let mut stored = 0u64;
    let started = Instant::now();
    for chunk in data.chunks(ferry::limits::CHUNK_SIZE_BYTES_DEFAULT as usize) {
        if name == "hash" {
            let _ = std::hint::black_box(hasher.hash(chunk));
        } else {
            let _ = compressor.compress(chunk, &mut out);
            stored += out.len() as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"bench": name, "bytes": data.len(), "seconds": seconds,
               "mb_per_s": data.len() as f64 / 1e6 / seconds, "stored_bytes": stored})
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
        Ok(PartReceipt { part_number, etag: String::new() })
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

fn pipeline(path: &std::path::Path, engine: &str) -> Result<()> {
    let repo = Repository::init(Box::new(NullStore), ferry::limits::CHUNK_SIZE_BYTES_DEFAULT)?;
    let mut options = BackupOptions::new(path.to_path_buf());
    options.engine =
        if engine == "pread" { ferry::io::Engine::Pread } else { ferry::io::Engine::Uring };
    let progress = Progress::default();
    let cancel = AtomicBool::new(false);
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let outcome = backup::run(&repo, &options, &progress, &cancel, &|w| eprintln!("warning: {w}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let size = outcome.manifest.volume_size_bytes;
    println!(
        "{}",
        json!({"bench": "pipeline", "path": path.display().to_string(), "bytes": size, "seconds": seconds,
               "mb_per_s": size as f64 / 1e6 / seconds, "cpu_seconds": cpu,
               "cpu_seconds_per_gib": cpu / (size as f64 / f64::from(1u32 << 30)),
               "io_engine": outcome.engine.name(), "stats": outcome.manifest.stats})
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
