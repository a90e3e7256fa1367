//! The data-plane scaffolding both repository formats' jobs are built from (`native::backup`,
//! `native::restore`, `cinder::backup`, `cinder::restore`): job control (first failure wins, one
//! abort flag, the cancel relay at one poll interval), buffer pools sized from a `limits::Budget`,
//! the source side (checked open, O_DIRECT with a logged fallback, probe, one pinned reader per
//! source behind the `--limit-read` pacer), the target side (checks, one pinned writer, the bytes
//! outside whole logical blocks, fsync), a parallel fetch loop, and object upload (single PUT or
//! multipart, aborted on failure).
//!
//! It is not a stage framework: the stage bodies (native: zero check, keyed BLAKE3, dedup, zstd,
//! packer, index, manifest; Cinder: SHA-256 blocks, incremental diff, codec, sequencer,
//! `_sha256file`, `_metadata`, chain restore) stay in their format's job, as plain code.

pub mod changes;
mod control;
mod fetch;
mod source;
mod target;
mod upload;

pub use control::{JobControl, POLL_INTERVAL, lock};
pub use fetch::fetch_parallel;
pub use source::{Source, open_source, pace_reads, read_options, spawn_reader, spawn_reader_of};
pub use target::{Edges, Target, prepare_target, spawn_writer};
pub use upload::{OpenUploads, PooledObject, UploadJob, Uploader};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::io::AlignedBuf;

/// A pool of `count` aligned buffers of `bytes` each, allocated once: the sending end returns a
/// buffer, the receiving end takes one.
pub fn buffer_pool(count: usize, bytes: usize) -> (Sender<AlignedBuf>, Receiver<AlignedBuf>) {
    assert!(count >= 1, "a pool holds at least one buffer");
    let (free_tx, free_rx) = bounded::<AlignedBuf>(count);
    for _ in 0..count {
        free_tx.send(AlignedBuf::new(bytes)).expect("pool has room");
    }
    (free_tx, free_rx)
}
