//! The io_uring driver shared by the read and write paths: ring setup with fio's flag fallback,
//! and an in-flight table that owns every buffer handed to the kernel until its completion has
//! been reaped.
//!
//! `Driver` is the only place that pushes submission entries. Its `Drop` reaps whatever is still
//! in flight (and, if the ring itself fails, leaks the buffers rather than free memory the kernel
//! may still write), so an early return or a panic can never release a buffer under the kernel.
//! It does not interpret completions: the read and write loops decide what a result means.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};

use super::plan::{Alignment, Span};
use super::{AlignedBuf, Engine, IoError};

/// Largest queue depth used (requests in flight per ring).
pub(crate) const MAX_QUEUE_DEPTH: usize = 4096;

/// Builds a ring of `entries` with `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN`, dropping
/// `DEFER_TASKRUN | SINGLE_ISSUER` and then `COOP_TASKRUN` when the kernel answers `EINVAL`
/// (the order fio uses). The ring must be driven by the thread that created it.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    let is_einval = |error: &io::Error| error.raw_os_error() == Some(libc::EINVAL);
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(entries)
    {
        Err(error) if is_einval(&error) => {}
        result => return result,
    }
    match IoUring::builder().setup_coop_taskrun().build(entries) {
        Err(error) if is_einval(&error) => {}
        result => return result,
    }
    IoUring::builder().build(entries)
}

/// Sets up a ring for `queue_depth` requests when `engine` is `Uring`. Returns None (use the
/// `pread` engine) when `engine` is `Pread` or when setup fails with `EPERM` (seccomp,
/// `kernel.io_uring_disabled`), `ENOSYS` (no io_uring) or `ENOMEM` (locked-memory limit).
pub(crate) fn open_ring(engine: Engine, queue_depth: usize) -> Result<Option<IoUring>, IoError> {
    if engine == Engine::Pread {
        return Ok(None);
    }
    let entries = u32::try_from(queue_depth.clamp(1, MAX_QUEUE_DEPTH))
        .expect("queue depth is clamped to a small number");
    match build_ring(entries) {
        Ok(ring) => Ok(Some(ring)),
        Err(error)
            if matches!(error.raw_os_error(), Some(libc::EPERM | libc::ENOSYS | libc::ENOMEM)) =>
        {
            Ok(None)
        }
        Err(source) => Err(IoError::RingSetup { source }),
    }
}

/// Vector-backed slab: stable integer keys for values, reused after removal.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Option<T>>,
    vacant: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { entries: Vec::new(), vacant: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// Stores `value` and returns its key.
    pub(crate) fn insert(&mut self, value: T) -> usize {
        self.len += 1;
        if let Some(key) = self.vacant.pop() {
            self.entries[key] = Some(value);
            key
        } else {
            self.entries.push(Some(value));
            self.entries.len() - 1
        }
    }

    /// Removes and returns the value under `key`.
    pub(crate) fn remove(&mut self, key: usize) -> Option<T> {
        let value = self.entries.get_mut(key)?.take()?;
        self.vacant.push(key);
        self.len -= 1;
        Some(value)
    }

    /// The value under `key`.
    pub(crate) fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.entries.get_mut(key)?.as_mut()
    }

    /// Number of stored values.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A slot of the in-flight table: the owner of one buffer (or of none, for requests that write
/// from the driver's shared zero buffer) plus whatever the caller tracks about it.
pub(crate) trait SlotBuffer {
    /// The buffer requests of this slot transfer into or from; None means the zero buffer.
    fn buffer(&mut self) -> Option<&mut AlignedBuf>;
}

/// Direction of every request of a driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `IORING_OP_READ` into the slot's buffer.
    Read,
    /// `IORING_OP_WRITE` from the slot's buffer (or the zero buffer).
    Write,
}

/// One request: which slot's buffer it uses, the byte range, and how many consecutive attempts
/// made no progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// Key of the owning slot.
    pub slot: usize,
    /// Device range and buffer offset.
    pub span: Span,
    /// Consecutive completions without progress.
    pub retries: u32,
}

/// A ring plus the table of everything the kernel may be touching.
pub(crate) struct Driver<S: SlotBuffer> {
    ring: IoUring,
    fd: RawFd,
    direction: Direction,
    align: Alignment,
    /// Buffer owners; a slot must not be removed while one of its requests is in flight.
    pub slots: Slab<S>,
    requests: Slab<Request>,
    zero: Option<AlignedBuf>,
    in_flight: usize,
    submitted: u64,
}

impl<S: SlotBuffer> Driver<S> {
    /// Wraps `ring` for requests in `direction` on `file`. `zero` is the shared source for
    /// slots without a buffer (write path only). `file` must outlive the driver.
    pub(crate) fn new(
        ring: IoUring,
        file: &File,
        direction: Direction,
        align: Alignment,
        zero: Option<AlignedBuf>,
    ) -> Self {
        Driver {
            ring,
            fd: file.as_raw_fd(),
            direction,
            align,
            slots: Slab::default(),
            requests: Slab::default(),
            zero,
            in_flight: 0,
            submitted: 0,
        }
    }

    /// Requests pushed and not yet reaped.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Requests pushed so far, resubmissions included.
    pub(crate) fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Queues `request` (submitted to the kernel by the next `wait`).
    ///
    /// # Panics
    /// If the slot does not exist, the span does not fit its buffer, or the request is not aligned
    /// for `O_DIRECT`: all guaranteed by the planning code.
    pub(crate) fn push(&mut self, request: Request) -> Result<(), IoError> {
        let span = request.span;
        let slot = self.slots.get_mut(request.slot).expect("request refers to a live slot");
        let buffer = match slot.buffer() {
            Some(buffer) => buffer,
            None => self.zero.as_mut().expect("a zero buffer exists for slots without a buffer"),
        };
        assert!(
            span.buf_offset + span.len <= buffer.capacity(),
            "request of {} bytes at buffer offset {} exceeds capacity {}",
            span.len,
            span.buf_offset,
            buffer.capacity()
        );
        let addr = buffer.as_mut_ptr().wrapping_add(span.buf_offset);
        self.align.assert_request(span.file_offset, span.len, addr);
        let len = u32::try_from(span.len).expect("request sizes are capped at 1 GiB");
        let fd = types::Fd(self.fd);
        let entry = match self.direction {
            Direction::Read => opcode::Read::new(fd, addr, len).offset(span.file_offset).build(),
            Direction::Write => {
                opcode::Write::new(fd, addr.cast_const(), len).offset(span.file_offset).build()
            }
        };
        let key = self.requests.insert(request);
        let entry = entry.user_data(key as u64);
        for attempt in 0..2 {
            // SAFETY: the entry points at `len` bytes inside a buffer owned by `self.slots` (or by
            // `self.zero`), checked above to fit its capacity; the request is recorded in
            // `self.requests` and its slot is only removed after every request of that slot has
            // been reaped, and `Drop` reaps (or leaks) before freeing, so the memory stays valid
            // until the kernel posts the completion. The fd is borrowed from a `File` that
            // outlives the driver.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                self.submitted += 1;
                return Ok(());
            }
            if attempt == 0 {
                // the submission queue is full (cannot happen while in_flight < entries): make
                // room by submitting what is queued
                if let Err(source) = self.ring.submit() {
                    let _ = self.requests.remove(key);
                    return Err(IoError::RingEnter { source });
                }
            }
        }
        let _ = self.requests.remove(key);
        Err(IoError::RingEnter { source: io::Error::other("submission queue stays full") })
    }

    /// Submits everything queued, waits for at least one completion (unless interrupted), and
    /// appends every reaped request with its result to `done`.
    pub(crate) fn wait(&mut self, done: &mut Vec<(Request, i32)>) -> Result<(), IoError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            // a signal (the caller re-checks its cancel flag) or a momentary lack of resources:
            // reap what is there and let the caller come back
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(source) => return Err(IoError::RingEnter { source }),
        }
        for cqe in self.ring.completion() {
            let key = usize::try_from(cqe.user_data()).expect("user_data holds a slab key");
            let request = self.requests.remove(key).expect("completion for a recorded request");
            self.in_flight -= 1;
            done.push((request, cqe.result()));
        }
        Ok(())
    }

    /// Reaps every request still in flight, discarding the results.
    pub(crate) fn drain(&mut self) -> Result<(), IoError> {
        let mut done = Vec::new();
        while self.in_flight > 0 {
            self.wait(&mut done)?;
            done.clear();
        }
        Ok(())
    }
}

impl<S: SlotBuffer> Drop for Driver<S> {
    fn drop(&mut self) {
        if self.in_flight > 0 && self.drain().is_err() {
            // the ring failed while the kernel may still own buffers: leak them rather than let
            // the kernel write into freed memory
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.zero.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_keys() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        let b = slab.insert("b");
        assert_ne!(a, b);
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.len(), 1);
        let c = slab.insert("c");
        assert_eq!(c, a);
        assert_eq!(slab.get_mut(c).map(|v| *v), Some("c"));
        assert_eq!(slab.get_mut(99), None);
        assert_eq!(slab.remove(99), None);
    }

    #[test]
    fn pread_engine_needs_no_ring() {
        assert!(open_ring(Engine::Pread, 8).expect("no setup").is_none());
    }

    #[test]
    fn ring_setup_matches_availability() {
        let ring = open_ring(Engine::Uring, 8).expect("setup succeeds or falls back");
        assert_eq!(ring.is_some(), crate::io::uring_available());
        if let Some(ring) = ring {
            assert!(ring.params().sq_entries() >= 8);
        }
    }
}
