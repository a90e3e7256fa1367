//! OpenStack Cinder's S3 backup format (cinder 29.0.0 `ChunkedBackupDriver` + `S3BackupDriver`),
//! the sibling of `native`: [`layout`] is the pure, I/O-free part (names, documents, codec,
//! incremental diff, restore planning, import record), [`bucket`] finds and reads backups in a
//! bucket, and [`backup`] and [`restore`] are the jobs, built from the shared `plane` scaffolding.

pub mod backup;
pub mod bucket;
pub mod layout;
pub mod restore;

pub use layout::*;
