//! ferry: a data-plane engine that moves block volumes between fast flash and object storage.
//!
//! # Brief overview
//!
//! A backup reads a device with O_DIRECT (`io`), cuts it into fixed-size chunks, skips all-zero
//! chunks, names every other chunk by its keyed BLAKE3 hash (`chunk`), skips chunks the repository
//! already holds (`repo`), zstd-compresses the rest in parallel (`compress`), appends them to pack
//! objects uploaded with S3 multipart (`store`), and commits the backup by writing its manifest
//! last (`format`, `backup`). A restore reads the manifest, fetches the packs it needs with
//! parallel ranged GETs, verifies every chunk, and writes it back with O_DIRECT (`restore`).
//!
//! `cli` is the command-line front end; `src/bin/bench.rs` measures the stages.

#![deny(unsafe_code)]

pub mod cinder;
pub mod cli;
pub mod error;
#[allow(unsafe_code)]
pub mod io;
pub mod lightbits;
pub mod limits;
pub mod native;
pub mod plane;
pub mod progress;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod throttle;
