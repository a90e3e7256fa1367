//! The io_uring driver shared by the read and write paths: ring setup with fio's flag fallback,
//! registration of the file and of buffers (a sparse fixed-buffer table filled on first use), and
//! an in-flight table that owns every buffer handed to the kernel until its completion has been
//! reaped.
//!
//! `Driver` is the only place that pushes submission entries. Its `Drop` reaps whatever is still
//! in flight (and, if the ring itself fails, leaks the buffers rather than free memory the kernel
//! may still write), so an early return or a panic can never release a buffer under the kernel.
//! It does not interpret completions: the read and write loops decide what a result means.
//!
//! Registered buffers: the caller's buffers are not known at ring setup, so the driver registers
//! a sparse table of `FIXED_TABLE_ENTRIES` and installs each buffer (keyed by its
//! `AlignedBuf::id`, never by address alone: a new allocation may reuse a freed address, and a
//! stale registration would point at the old pages) into a free entry the first time it is
//! submitted; recycled pool buffers hit the table afterwards. When the table is full, the least
//! recently used entry with no request in flight is replaced. Any registration failure (`ENOMEM`
//! from `RLIMIT_MEMLOCK`, `EINVAL`/`EOPNOTSUPP` on old kernels) turns registration off for the
//! rest of the transfer and requests use plain `Read`/`Write`.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};

use super::plan::{Alignment, Span};
use super::{AlignedBuf, Engine, IoError, Registration};

/// Entries of the sparse registered-buffer table. A sparse entry costs the kernel nothing until
/// a buffer is installed; the pipeline's buffer pool is smaller than this, so after warm-up every
/// request hits the table. Bounds the memory a ring keeps pinned to this many buffers.
pub(crate) const FIXED_TABLE_ENTRIES: u32 = 64;

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

/// Where a buffer stands in the fixed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FixedChoice {
    /// Already installed at this index.
    Hit(u16),
    /// Install at this index (vacant, or an idle entry to replace).
    Install(u16),
    /// Every entry is busy with requests in flight: submit unregistered.
    Full,
}

#[derive(Debug, Clone, Copy)]
struct FixedEntry {
    id: u64,
    /// Requests in flight that use this entry.
    users: usize,
    last_use: u64,
}

/// Bookkeeping of the sparse fixed-buffer table (pure, no system calls).
#[derive(Debug)]
pub(crate) struct FixedTable {
    by_id: HashMap<u64, u16>,
    entries: Vec<Option<FixedEntry>>,
    tick: u64,
}

impl FixedTable {
    pub(crate) fn new(entries: u32) -> FixedTable {
        assert!(entries > 0 && entries <= u32::from(u16::MAX) + 1, "fixed table size {entries}");
        FixedTable { by_id: HashMap::new(), entries: vec![None; entries as usize], tick: 0 }
    }

    /// Where buffer `id` goes: its entry, a vacant entry, the least recently used idle entry, or
    /// nowhere.
    pub(crate) fn choose(&self, id: u64) -> FixedChoice {
        if let Some(&index) = self.by_id.get(&id) {
            return FixedChoice::Hit(index);
        }
        let mut best: Option<(usize, u64)> = None;
        for (index, entry) in self.entries.iter().enumerate() {
            match entry {
                None => return FixedChoice::Install(to_index(index)),
                Some(entry) if entry.users == 0 => {
                    if best.is_none_or(|(_, last)| entry.last_use < last) {
                        best = Some((index, entry.last_use));
                    }
                }
                Some(_) => {}
            }
        }
        best.map_or(FixedChoice::Full, |(index, _)| FixedChoice::Install(to_index(index)))
    }

    /// Records that buffer `id` now occupies `index` (after the kernel accepted it).
    ///
    /// # Panics
    /// If the entry is busy: replacing a buffer under requests in flight is a bug.
    pub(crate) fn install(&mut self, index: u16, id: u64) {
        let entry = &mut self.entries[usize::from(index)];
        if let Some(old) = entry.take() {
            assert_eq!(old.users, 0, "replaced a fixed buffer with requests in flight");
            let _ = self.by_id.remove(&old.id);
        }
        self.tick += 1;
        *entry = Some(FixedEntry { id, users: 0, last_use: self.tick });
        let _ = self.by_id.insert(id, index);
    }

    /// A request using `index` was submitted.
    pub(crate) fn acquire(&mut self, index: u16) {
        self.tick += 1;
        let entry = self.entries[usize::from(index)].as_mut().expect("acquire an installed entry");
        entry.users += 1;
        entry.last_use = self.tick;
    }

    /// A request using `index` completed (or was never submitted).
    pub(crate) fn release(&mut self, index: u16) {
        let entry = self.entries[usize::from(index)].as_mut().expect("release an installed entry");
        assert!(entry.users > 0, "fixed entry {index} released more often than acquired");
        entry.users -= 1;
    }
}

fn to_index(index: usize) -> u16 {
    u16::try_from(index).expect("fixed table has at most 65536 entries")
}

/// What the ring registered, for the stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RegistrationStats {
    /// The file is registered and requests use `types::Fixed(0)`.
    pub file: bool,
    /// Requests submitted with `ReadFixed`/`WriteFixed`.
    pub fixed_buffer_requests: u64,
    /// Buffers installed in the fixed table (registrations, replacements included).
    pub buffers_registered: u64,
}

/// Builds the submission entry for one request; a macro because the crate's fd trait is sealed
/// and `types::Fd`/`types::Fixed` are different types.
macro_rules! rw_entry {
    ($fd:expr, $direction:expr, $addr:expr, $len:expr, $offset:expr, $fixed:expr) => {
        match ($direction, $fixed) {
            (Direction::Read, None) => opcode::Read::new($fd, $addr, $len).offset($offset).build(),
            (Direction::Read, Some(index)) => {
                opcode::ReadFixed::new($fd, $addr, $len, index).offset($offset).build()
            }
            (Direction::Write, None) => {
                opcode::Write::new($fd, $addr.cast_const(), $len).offset($offset).build()
            }
            (Direction::Write, Some(index)) => {
                opcode::WriteFixed::new($fd, $addr.cast_const(), $len, index)
                    .offset($offset)
                    .build()
            }
        }
    };
}

/// A ring plus the table of everything the kernel may be touching.
///
/// Fields drop in declaration order: the ring (with its registrations) is unmapped before the
/// slots and the zero buffer are freed, and `Drop` has reaped every request before that.
pub(crate) struct Driver<S: SlotBuffer> {
    ring: IoUring,
    fd: RawFd,
    direction: Direction,
    align: Alignment,
    /// Buffer owners; a slot must not be removed while one of its requests is in flight.
    pub slots: Slab<S>,
    /// Requests in flight, with the fixed-table entry each one uses.
    requests: Slab<(Request, Option<u16>)>,
    zero: Option<AlignedBuf>,
    /// The sparse fixed-buffer table, None when buffers are not registered.
    fixed: Option<FixedTable>,
    registration: RegistrationStats,
    in_flight: usize,
    submitted: u64,
}

impl<S: SlotBuffer> Driver<S> {
    /// Wraps `ring` for requests in `direction` on `file`. `zero` is the shared source for
    /// slots without a buffer (write path only). `file` must outlive the driver. With
    /// `Registration::Auto` it registers `file` and a sparse buffer table, silently doing without
    /// whichever the kernel refuses.
    pub(crate) fn new(
        ring: IoUring,
        file: &File,
        direction: Direction,
        align: Alignment,
        zero: Option<AlignedBuf>,
        registration: Registration,
    ) -> Self {
        let fd = file.as_raw_fd();
        let mut stats = RegistrationStats::default();
        let mut fixed = None;
        if registration == Registration::Auto {
            stats.file = ring.submitter().register_files(&[fd]).is_ok();
            if ring.submitter().register_buffers_sparse(FIXED_TABLE_ENTRIES).is_ok() {
                fixed = Some(FixedTable::new(FIXED_TABLE_ENTRIES));
            }
        }
        Driver {
            ring,
            fd,
            direction,
            align,
            slots: Slab::default(),
            requests: Slab::default(),
            zero,
            fixed,
            registration: stats,
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

    /// What was registered and how many requests used registered buffers.
    pub(crate) fn registration(&self) -> RegistrationStats {
        self.registration
    }

    /// The fixed-table entry to use for `buffer`, installing it on first use; None (plain
    /// request) when buffers are not registered, the table is busy, or the kernel refuses, in
    /// which case registration is turned off for good.
    fn fixed_index(
        ring: &IoUring,
        fixed: &mut Option<FixedTable>,
        stats: &mut RegistrationStats,
        buffer: &mut AlignedBuf,
    ) -> Option<u16> {
        let table = fixed.as_mut()?;
        let index = match table.choose(buffer.id()) {
            FixedChoice::Hit(index) => index,
            FixedChoice::Full => return None,
            FixedChoice::Install(index) => {
                let iovec = libc::iovec {
                    iov_base: buffer.as_mut_ptr().cast(),
                    iov_len: buffer.capacity(),
                };
                // SAFETY: the iovec describes exactly the live allocation of `buffer` (address
                // and capacity). The kernel pins those pages and holds its own references, so the
                // entry stays valid memory even after the buffer is freed; a stale entry is never
                // used because entries are keyed by the buffer's unique id, and `choose` only
                // offers an entry for replacement when no request in flight uses it.
                let result = unsafe {
                    ring.submitter().register_buffers_update(u32::from(index), &[iovec], None)
                };
                if result.is_err() {
                    *fixed = None;
                    return None;
                }
                table.install(index, buffer.id());
                stats.buffers_registered += 1;
                index
            }
        };
        table.acquire(index);
        Some(index)
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
        let fixed = Self::fixed_index(&self.ring, &mut self.fixed, &mut self.registration, buffer);
        let offset = span.file_offset;
        let entry = if self.registration.file {
            rw_entry!(types::Fixed(0), self.direction, addr, len, offset, fixed)
        } else {
            rw_entry!(types::Fd(self.fd), self.direction, addr, len, offset, fixed)
        };
        let key = self.requests.insert((request, fixed));
        let entry = entry.user_data(key as u64);
        for attempt in 0..2 {
            // SAFETY: the entry points at `len` bytes inside a buffer owned by `self.slots` (or by
            // `self.zero`), checked above to fit its capacity (and, for a fixed request, inside
            // the registered entry `fixed`, which holds this very buffer); the request is recorded
            // in `self.requests` and its slot is only removed after every request of that slot
            // has been reaped, and `Drop` reaps (or leaks) before freeing, so the memory stays
            // valid until the kernel posts the completion. The fd (raw or registered at index 0)
            // is borrowed from a `File` that outlives the driver.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                self.submitted += 1;
                if fixed.is_some() {
                    self.registration.fixed_buffer_requests += 1;
                }
                return Ok(());
            }
            if attempt == 0 {
                // the submission queue is full (cannot happen while in_flight < entries): make
                // room by submitting what is queued
                if let Err(source) = self.ring.submit() {
                    self.forget_request(key);
                    return Err(IoError::RingEnter { source });
                }
            }
        }
        self.forget_request(key);
        Err(IoError::RingEnter { source: io::Error::other("submission queue stays full") })
    }

    /// Drops the record of a request that was never submitted.
    fn forget_request(&mut self, key: usize) {
        if let Some((_, Some(index))) = self.requests.remove(key)
            && let Some(table) = self.fixed.as_mut()
        {
            table.release(index);
        }
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
            let (request, fixed) =
                self.requests.remove(key).expect("completion for a recorded request");
            if let (Some(index), Some(table)) = (fixed, self.fixed.as_mut()) {
                table.release(index);
            }
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
    fn fixed_table_hits_installs_and_evicts_idle_entries() {
        let mut table = FixedTable::new(2);
        assert_eq!(table.choose(10), FixedChoice::Install(0));
        table.install(0, 10);
        assert_eq!(table.choose(10), FixedChoice::Hit(0));
        table.acquire(0);
        assert_eq!(table.choose(11), FixedChoice::Install(1));
        table.install(1, 11);
        table.acquire(1);
        // both busy: a third buffer goes unregistered
        assert_eq!(table.choose(12), FixedChoice::Full);
        table.release(1);
        assert_eq!(table.choose(12), FixedChoice::Install(1));
        table.release(0);
        // both idle: entry 0 was used least recently
        assert_eq!(table.choose(12), FixedChoice::Install(0));
        table.install(0, 12);
        assert_eq!(table.choose(10), FixedChoice::Install(1), "evicted id no longer hits");
        assert_eq!(table.choose(12), FixedChoice::Hit(0));
        assert_eq!(table.choose(11), FixedChoice::Hit(1));
    }

    #[test]
    #[should_panic(expected = "requests in flight")]
    fn fixed_table_refuses_to_replace_a_busy_entry() {
        let mut table = FixedTable::new(1);
        table.install(0, 1);
        table.acquire(0);
        table.install(0, 2);
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
