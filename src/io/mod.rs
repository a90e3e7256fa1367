//! Device I/O: opening sources and targets with `O_DIRECT`, probing their size and logical block
//! size, and moving whole devices through aligned buffers with io_uring (or `pread`/`pwrite` when
//! io_uring is unavailable). `read_source` fills chunks for the backup pipeline; `write_target`
//! writes data and zero ranges for a restore and flushes the target at the end.
//!
//! This is the only module of the crate allowed to use `unsafe`: aligned allocation, the raw
//! `ioctl`/`statx`/`fcntl` calls, and handing buffers to the kernel. Every buffer given to the
//! kernel is owned by an in-flight table until its completion has been reaped, and no function
//! returns while a request is still in flight. This module deliberately knows nothing about
//! chunk hashing, zero detection or compression. The caller dedicates one thread per device (and
//! may pin it with `pin_current_thread`); the only threads spawned here are the scoped helper
//! threads of the `pread` fallback, which end before `read_source` returns.
//!
//! io_uring transfers register the file and the buffers (see `Registration`); setting the
//! environment variable `FERRY_IO_NO_REGISTER=1` turns registration off for `read_source` and
//! `write_target`, and `read_source_with`/`write_target_with` choose it per call.

mod buf;
mod device;
mod plan;
mod read;
mod sched;
mod tune;
mod uring;
mod write;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::error::{Classify, ErrorKind};

pub use buf::AlignedBuf;
pub use device::{DeviceInfo, OpenedFile, holds_data, open, probe};
pub use read::{
    ReadChunk, ReadOptions, ReadStats, read_source, read_source_chunks, read_source_with,
};
pub use tune::{
    DEFAULT_READ_REQUEST_BYTES, MAX_RECOMMENDED_QUEUE_DEPTH, MIN_RECOMMENDED_QUEUE_DEPTH,
    ReadShape, TARGET_IN_FLIGHT_BYTES, read_shape,
};
pub use write::{WriteOp, WriteOptions, WriteStats, write_target, write_target_with};

/// Alignment, in bytes, of every buffer address and of every buffer capacity.
pub const BUF_ALIGN: usize = 4096;

/// Largest single write request `write_target` submits (1 MiB): bigger requests are split by the
/// block layer, which is where stray `-EAGAIN` completions come from.
pub const MAX_WRITE_REQUEST_BYTES: usize = 1 << 20;

/// The I/O engine that moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One io_uring per calling thread, with several requests in flight.
    Uring,
    /// Blocking `pread` (up to 4 scoped helper threads, one request each, for `queue_depth > 1`)
    /// and sequential `pwrite` on the calling thread.
    Pread,
}

impl Engine {
    /// The engine's name for logs and metrics: `io_uring` or `pread`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "io_uring",
            Engine::Pread => "pread",
        }
    }
}

/// Environment variable that, set to `1`, makes `read_source` and `write_target` skip buffer and
/// file registration (plain `Read`/`Write` requests), for comparisons and tests.
pub const NO_REGISTER_ENV: &str = "FERRY_IO_NO_REGISTER";

/// Whether io_uring requests use registered (fixed) buffers and a registered file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Register the file and every buffer on first use (`ReadFixed`/`WriteFixed`,
    /// `types::Fixed(0)`); whatever the kernel refuses (`RLIMIT_MEMLOCK`, old kernel) falls back
    /// to plain requests, and the stats say what was used.
    Auto,
    /// Never register: plain `Read`/`Write` on the raw fd.
    Off,
}

impl Registration {
    /// `Off` when `FERRY_IO_NO_REGISTER` is `1`, else `Auto`.
    pub fn from_env() -> Registration {
        match std::env::var_os(NO_REGISTER_ENV) {
            Some(value) if value == "1" => Registration::Off,
            _ => Registration::Auto,
        }
    }
}

/// Pins the calling thread to one CPU with `sched_setaffinity` and returns true on success.
///
/// `Some(cpu)` pins to that CPU (which the cpuset must allow). `None` picks the allowed CPU (from the thread's current
/// affinity mask) with the fewest threads pinned by earlier `None` calls in this process, lowest
/// number first: the first reader goes to the first allowed CPU, the second to the next one, and
/// so on round-robin, so several device readers spread over the cores. Returns false (and leaves
/// the affinity unchanged) when the CPU does not exist, the cpuset does not allow it, or the call
/// fails. Meant for the caller's dedicated reader/writer thread; nothing in this module calls it.
pub fn pin_current_thread(cpu: Option<usize>) -> bool {
    sched::pin_current_thread(cpu)
}

/// True when an io_uring can be set up here. The probe (one `io_uring_setup`) runs once per
/// process; any failure (typically `EPERM` under a container seccomp profile or
/// `kernel.io_uring_disabled`, or `ENOSYS` on old kernels) answers false.
pub fn uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| io_uring::IoUring::new(2).is_ok())
}

/// A failed device I/O step, with the context needed to tell which one.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// Opening the device or image file failed.
    #[error("open {}", path.display())]
    Open {
        /// The path that could not be opened.
        path: PathBuf,
        /// The error from `open(2)`.
        source: std::io::Error,
    },
    /// Reading the size, block size or flags of an open file failed.
    #[error("probe device: {step}")]
    Probe {
        /// The call that failed (`BLKGETSIZE64`, `statx`, ...).
        step: &'static str,
        /// The error it returned.
        source: std::io::Error,
    },
    /// The file is neither a block device nor a regular file.
    #[error("unsupported file type: not a block device or regular file")]
    UnsupportedFileType,
    /// The options or the device geometry cannot be used (for example a chunk size that is not a
    /// multiple of the logical block size on an `O_DIRECT` file).
    #[error("invalid i/o options: {0}")]
    InvalidOptions(String),
    /// A read request failed, hit an unexpected end of file or made no progress.
    #[error("read {length} bytes at offset {offset}")]
    Read {
        /// Device offset of the failed request.
        offset: u64,
        /// Length of the failed request.
        length: u64,
        /// The error the kernel returned.
        source: std::io::Error,
    },
    /// A write request failed or made no progress.
    #[error("write {length} bytes at offset {offset}")]
    Write {
        /// Device offset of the failed request.
        offset: u64,
        /// Length of the failed request.
        length: u64,
        /// The error the kernel returned.
        source: std::io::Error,
    },
    /// The final `fdatasync` of the target failed, so the written data may not be durable.
    #[error("flush target")]
    Flush {
        /// The error from `fdatasync(2)`.
        source: std::io::Error,
    },
    /// `io_uring_setup` failed with an error other than the ones that select the fallback.
    #[error("set up io_uring")]
    RingSetup {
        /// The error from `io_uring_setup(2)`.
        source: std::io::Error,
    },
    /// `io_uring_enter` failed while submitting or waiting for completions.
    #[error("io_uring submit and wait")]
    RingEnter {
        /// The error from `io_uring_enter(2)`.
        source: std::io::Error,
    },
    /// The cancel flag was raised.
    #[error("i/o cancelled")]
    Cancelled,
    /// A pipeline channel was closed by the other side before the transfer finished.
    #[error("i/o pipeline channel disconnected")]
    Disconnected,
}

impl Classify for IoError {
    fn kind(&self) -> ErrorKind {
        match self {
            IoError::Cancelled => ErrorKind::Cancelled,
            IoError::Disconnected => ErrorKind::Internal,
            IoError::InvalidOptions(_) => ErrorKind::Usage,
            _ => ErrorKind::Device,
        }
    }
}
