//! Live counters of a running job, shared between the data-plane threads (which add to them) and
//! the front end (which samples them for progress events). Relaxed atomics: the numbers are for
//! display and totals are taken after the threads have joined.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one backup or restore.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the job must read (backup) or write (restore) in total.
    pub bytes_total: AtomicU64,
    /// Bytes read from the source device.
    pub bytes_read: AtomicU64,
    /// Uncompressed bytes of chunks the repository did not have.
    pub bytes_new: AtomicU64,
    /// Bytes uploaded to the object store (pack parts and small objects).
    pub bytes_uploaded: AtomicU64,
    /// Bytes downloaded from the object store.
    pub bytes_downloaded: AtomicU64,
    /// Bytes of the volume restored (data and holes).
    pub bytes_restored: AtomicU64,
}

impl Progress {
    /// Adds `bytes` to `counter`.
    pub fn add(counter: &AtomicU64, bytes: u64) {
        let _ = counter.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
