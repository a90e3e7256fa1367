//! Test doubles and helpers for in-process tests of the data plane, compiled for tests and with
//! the `testing` feature only: `MemStore` (an in-memory `ObjectStore` with S3's semantics, stamped
//! by a settable `Clock`), `FaultyStore` (seeded, deterministic fault injection around any
//! store), and sample volumes (`volume`: contents, scratch directories, loop devices).
//!
//! The tests here run whole jobs in-process: `roundtrip` backs up and restores across I/O
//! engines, both repository formats, chunk and object sizes, source kinds and contents;
//! `faults` checks what failed, corrupted and cancelled jobs leave behind; `changes` checks
//! Cinder-format incrementals made from change lists against the full-read ones. The binary-level tests
//! against Garage and Cinder's own driver stay in `tests/`.
//!
//! Nothing here is used by the engine itself.

pub mod faulty;
pub mod mem;
pub mod volume;

#[cfg(test)]
mod changes;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod roundtrip;

pub use faulty::{Fault, FaultyStore, Injected, Op, Rule, When};

/// A Cinder-format backup job of `source` with the settings the in-process tests share (two
/// workers and uploads, zlib level 1, no parent, no change list, no limits); tests override
/// fields with struct update syntax.
#[cfg(test)]
pub(crate) fn cinder_job(
    source: &std::path::Path,
    backup_id: String,
    volume_id: String,
    algorithm: crate::cinder::layout::Algorithm,
    geometry: crate::cinder::layout::Geometry,
) -> crate::cinder::backup::BackupJob {
    crate::cinder::backup::BackupJob {
        source: source.to_path_buf(),
        engine: crate::io::Engine::Pread,
        backup_id,
        volume_id,
        parent_id: None,
        parent_is_hint: false,
        changes: None,
        algorithm,
        geometry,
        availability_zone: "nova".into(),
        name: None,
        description: None,
        volume_meta: None,
        workers: 2,
        uploads: 2,
        zlib_level: 1,
        limit_read_bytes_per_sec: None,
        limit_upload_bytes_per_sec: None,
    }
}
pub use mem::{Clock, MemObject, MemStore};
pub use volume::{Content, LoopDevice, Scratch};
