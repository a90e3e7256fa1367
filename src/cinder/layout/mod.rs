//! The layout of Cinder's chunked/S3 backup format, pure and I/O-free: what `cinder-backup`'s
//! `S3BackupDriver` (cinder 29.0.0, `chunkeddriver.py` and `drivers/s3.py`) writes and reads.
//!
//! Brief overview:
//! - [`names`]: the object prefix (`service_metadata`) and the names under it.
//! - [`Geometry`], [`full_layout`], [`changed_extents`], [`incremental_layout`]: which byte ranges
//!   become data objects, for full backups and for incrementals diffed against the parent's
//!   `_sha256file` block by block.
//! - [`codec`]: compression names, libraries, levels, the raw fallback, decompression.
//! - [`zlib_segments`]: one zlib stream from segments compressed independently (on any thread),
//!   joined with a combined Adler-32, as pigz does.
//! - [`Metadata`] / [`ObjectEntry`] and [`Sha256File`] with [`block_hashes`]: the two JSON
//!   documents, serialised byte for byte as Python's `json.dumps(..., sort_keys=True, indent=2)`
//!   and parsed tolerantly.
//! - [`plan_restore`]: the ordered writes of a restore chain and Cinder's listing check.
//! - [`BackupRecord`]: the base64 record `cinder backup-import` takes.
//!
//! A backup is: data objects `<prefix>-00001…` (each [`codec::encode`]d), then
//! `<prefix>_sha256file`, then `<prefix>_metadata` last.
//!
//! Nothing here reads the clock, the network or a device (times come in as [`UtcTime`]); the jobs
//! in `cinder::backup` and `cinder::restore` drive it against an `ObjectStore` and a device.

pub mod codec;
mod error;
pub mod incremental;
pub mod metadata;
pub mod names;
pub mod plan;
pub mod pyjson;
pub mod record;
pub mod sha256file;
mod time;
pub mod zlib_segments;

#[cfg(test)]
mod tests;

pub use codec::{Algorithm, Codec, Encoded, decompress, encode, encode_with};
pub use error::CinderError;
pub use incremental::{
    Extent, Geometry, changed_extents, check_incremental, full_layout, incremental_layout,
};
pub use metadata::{Metadata, ObjectEntry, md5_hex};
pub use plan::{ChainLink, RestoreWrite, check_listing, plan_restore, visible_ranges};
pub use record::{BackupRecord, decode_record};
pub use sha256file::{Hash, Sha256File, block_hashes};
pub use time::UtcTime;

/// `ChunkedBackupDriver.DRIVER_VERSION`, the `version` of both documents; the only key of
/// `DRIVER_VERSION_MAPPING`, so the only version Cinder restores.
pub const DRIVER_VERSION: &str = "1.0.0";
/// Default `backup_s3_object_size`: 50 MiB.
pub const DEFAULT_OBJECT_SIZE: u64 = 52_428_800;
/// Default `backup_s3_block_size`: 32 KiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 32_768;
/// Default `backup_s3_store_bucket`.
pub const DEFAULT_BUCKET: &str = "volumebackups";
