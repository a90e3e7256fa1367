//! Criterion micro-benchmarks of the pure stages, on 4 MiB chunks:
//! - `is_zero` on an all-zero chunk (the worst case: a full scan);
//! - `hash`: keyed BLAKE3;
//! - `compress`: zstd level 1 on text-like and on random data (the raw-detection path);
//! - `manifest_encode`: a 1 TiB volume's manifest (262,144 chunk entries) to an envelope.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::native::chunk::{ChunkHasher, is_zero};
use ferry::native::compress::Compressor;
use ferry::native::layout::{
    self, BackupStats, ChunkHash, Manifest, ObjectKind, SourceInfo, Timestamp,
};

const CHUNK: usize = 4 << 20;

fn random(len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

fn text(len: usize) -> Vec<u8> {
    let words =
        ["volume ", "block ", "backup ", "the ", "of ", "snapshot ", "2026-11-26 ", "INFO\n"];
    let mut out = Vec::with_capacity(len + 16);
    let mut state = 7u64;
    while out.len() < len {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        out.extend_from_slice(words[(state >> 61) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn stages(c: &mut Criterion) {
    let zeros = vec![0u8; CHUNK];
    let random = random(CHUNK);
    let text = text(CHUNK);
    let mut group = c.benchmark_group("chunk");
    let _ = group.throughput(Throughput::Bytes(CHUNK as u64)).sample_size(20);
    let _ = group.bench_function("is_zero", |b| b.iter(|| is_zero(black_box(&zeros))));
    let hasher = ChunkHasher::new([1; 32]);
    let _ = group.bench_function("hash", |b| b.iter(|| hasher.hash(black_box(&random))));
    let mut compressor = Compressor::new(1);
    let mut out = Vec::new();
    let _ = group.bench_function("compress_text", |b| {
        b.iter(|| compressor.compress(black_box(&text), &mut out))
    });
    let _ = group.bench_function("compress_random", |b| {
        b.iter(|| compressor.compress(black_box(&random), &mut out))
    });
    group.finish();

    let chunk_count = 262_144u64;
    let manifest = Manifest {
        format_version: 1,
        backup_id: "20261126T120000Z-00000000".into(),
        repository_id: "0".repeat(32),
        source: SourceInfo {
            path: "/dev/nvme0n1".into(),
            kind: "block_device".into(),
            logical_block_bytes: 4096,
        },
        volume_size_bytes: chunk_count * CHUNK as u64,
        chunk_size_bytes: CHUNK as u32,
        started_at: Timestamp(0),
        completed_at: Timestamp(0),
        packs: vec![],
        chunks: (0..chunk_count)
            .map(|i| (i % 3 != 0).then(|| hasher.hash(&i.to_le_bytes())))
            .collect::<Vec<Option<ChunkHash>>>(),
        stats: BackupStats::default(),
        base: None,
    };
    let mut group = c.benchmark_group("format");
    let _ = group.sample_size(10);
    let _ = group.bench_function("manifest_encode_1tib", |b| {
        b.iter(|| {
            layout::encode_document(
                &layout::Crypt::Plain,
                ObjectKind::Manifest,
                black_box(&manifest),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
