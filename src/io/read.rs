//! `read_source`: reads a whole source, chunk by chunk, into buffers taken from the caller's
//! free-buffer channel and sends each filled chunk downstream, with io_uring (several requests in
//! flight across chunks) or `pread` on up to `MAX_PREAD_THREADS` scoped helper threads (one
//! request in flight per thread).
//!
//! Chunks may be sent out of order; each is sent exactly once. The reader never returns while a
//! request is in flight. It does not inspect chunk contents and does not retry failed requests
//! beyond resubmitting short, `-EAGAIN` and `-EINTR` completions.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError};

use super::device::{DeviceInfo, is_direct};
use super::plan::{
    Alignment, ChunkPlan, MAX_RETRIES, Progress, ReadPlan, SyncStop, after_transfer, transfer_sync,
};
use super::uring::{Direction, Driver, RegistrationStats, Request, SlotBuffer, open_ring};
use super::{AlignedBuf, Engine, IoError, Registration};

/// How often a blocked channel operation re-checks the cancel flag.
pub(crate) const CANCEL_POLL: Duration = Duration::from_millis(20);

/// How `read_source` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOptions {
    /// Requested engine; `Uring` falls back to `Pread` when io_uring cannot be set up.
    pub engine: Engine,
    /// Chunk size in bytes (a multiple of `max(logical block, BUF_ALIGN)` for `O_DIRECT`).
    pub chunk_size_bytes: usize,
    /// Size of one read request (a multiple of `max(logical block, BUF_ALIGN)` for `O_DIRECT`).
    pub request_size_bytes: usize,
    /// Requests in flight at most (at least 1); the `pread` engine uses
    /// `min(queue_depth, 4)` threads.
    pub queue_depth: usize,
}

/// One chunk of the source. `buf.len()` is the number of valid bytes: `chunk_size_bytes`, or less
/// for the last chunk when the size is not a multiple of the chunk size.
#[derive(Debug)]
pub struct ReadChunk {
    /// `offset / chunk_size_bytes`.
    pub chunk_index: u64,
    /// Device offset of the first byte.
    pub offset: u64,
    /// The chunk's bytes.
    pub buf: AlignedBuf,
}

/// What a completed `read_source` did.
#[derive(Debug, Clone)]
pub struct ReadStats {
    /// The engine that actually ran (after any fallback).
    pub engine: Engine,
    /// Valid bytes delivered in chunks (the source size).
    pub bytes_read: u64,
    /// Read requests issued, resubmissions included.
    pub requests: u64,
    /// Requests that used a registered (fixed) buffer; 0 with `pread`, with
    /// `Registration::Off`, or when the kernel refused registration.
    pub fixed_buffer_requests: u64,
    /// True when every request used a registered buffer (and there was at least one).
    pub registered_buffers: bool,
    /// True when the file was registered with the ring and requests used `types::Fixed(0)`.
    pub registered_file: bool,
}

impl ReadStats {
    fn new(engine: Engine, bytes_read: u64, requests: u64, reg: RegistrationStats) -> ReadStats {
        ReadStats {
            engine,
            bytes_read,
            requests,
            fixed_buffer_requests: reg.fixed_buffer_requests,
            registered_buffers: requests > 0 && reg.fixed_buffer_requests == requests,
            registered_file: reg.file,
        }
    }
}

/// Reads the whole source `[0, info.size_bytes)` on the calling thread (the `pread` engine with
/// `queue_depth > 1` adds up to `MAX_PREAD_THREADS` scoped helper threads, joined before return).
///
/// For every chunk it takes a free buffer from `free` (blocking; capacity at least
/// `chunk_size_bytes`), fills it, and sends a `ReadChunk` on `out`. Chunks may be sent out of
/// order, each exactly once. If `cancel` becomes true it stops promptly and returns
/// `IoError::Cancelled`; if `free` or `out` is disconnected it returns `IoError::Disconnected`
/// (or `Cancelled` when the cancel flag is also set). In-flight requests are always reaped before
/// returning. `Engine::Uring` falls back to `pread` when ring setup fails with `EPERM`, `ENOSYS`
/// or `ENOMEM`; the stats name the engine that ran. Registration follows
/// `Registration::from_env()` (on unless `FERRY_IO_NO_REGISTER=1`).
pub fn read_source(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    free: &Receiver<AlignedBuf>,
    out: &Sender<ReadChunk>,
    cancel: &AtomicBool,
) -> Result<ReadStats, IoError> {
    read_source_with(file, info, options, Registration::from_env(), free, out, cancel)
}

/// `read_source` with an explicit choice of buffer/file registration for the io_uring engine.
pub fn read_source_with(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    registration: Registration,
    free: &Receiver<AlignedBuf>,
    out: &Sender<ReadChunk>,
    cancel: &AtomicBool,
) -> Result<ReadStats, IoError> {
    read_chunks_with(file, info, options, None, registration, free, out, cancel)
}

/// `read_source`, but only the chunks whose indexes `chunks` lists (strictly increasing, each
/// below the source's chunk count), as an incremental backup reads: every other chunk is left
/// unread and unsent. `bytes_read` counts the listed chunks only.
///
/// # Errors
/// As `read_source`; `InvalidOptions` for a list that is not strictly increasing or names a
/// chunk past the end.
pub fn read_source_chunks(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    chunks: &[u64],
    free: &Receiver<AlignedBuf>,
    out: &Sender<ReadChunk>,
    cancel: &AtomicBool,
) -> Result<ReadStats, IoError> {
    let registration = Registration::from_env();
    read_chunks_with(file, info, options, Some(chunks), registration, free, out, cancel)
}

/// Which chunks a read covers, in the order they are started.
#[derive(Debug, Clone, Copy)]
enum Order<'a> {
    /// Every chunk, `0..count`.
    All(u64),
    /// These chunks (strictly increasing).
    Listed(&'a [u64]),
}

impl Order<'_> {
    fn len(&self) -> u64 {
        match self {
            Order::All(count) => *count,
            Order::Listed(chunks) => chunks.len() as u64,
        }
    }

    /// The chunk index started at `position` (`position < len()`).
    fn chunk(&self, position: u64) -> u64 {
        match self {
            Order::All(_) => position,
            Order::Listed(chunks) => {
                chunks[usize::try_from(position).expect("a listed position fits usize")]
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn read_chunks_with(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
    chunks: Option<&[u64]>,
    registration: Registration,
    free: &Receiver<AlignedBuf>,
    out: &Sender<ReadChunk>,
    cancel: &AtomicBool,
) -> Result<ReadStats, IoError> {
    if options.queue_depth == 0 {
        return Err(IoError::InvalidOptions("queue depth must be at least 1".to_string()));
    }
    let align = Alignment::new(info.logical_block_bytes, is_direct(file)?)?;
    let plan = ReadPlan::new(
        info.size_bytes,
        options.chunk_size_bytes,
        options.request_size_bytes,
        align,
    )?;
    let order = match chunks {
        None => Order::All(plan.chunk_count()),
        Some(chunks) => {
            let increasing = chunks.windows(2).all(|pair| pair[0] < pair[1]);
            if !increasing || chunks.last().is_some_and(|&last| last >= plan.chunk_count()) {
                return Err(IoError::InvalidOptions(format!(
                    "chunk list must be strictly increasing and below {}",
                    plan.chunk_count()
                )));
            }
            Order::Listed(chunks)
        }
    };
    let ends = Ends { free, out, cancel, halt: None };
    match open_ring(options.engine, options.queue_depth)? {
        Some(ring) => {
            let driver = Driver::new(ring, file, Direction::Read, align, None, registration);
            read_uring(driver, &plan, order, options.queue_depth, &ends)
        }
        None => read_pread(file, &plan, order, options.queue_depth, &ends),
    }
}

/// The reader's channel ends and cancel flag.
#[derive(Clone, Copy)]
struct Ends<'a> {
    free: &'a Receiver<AlignedBuf>,
    out: &'a Sender<ReadChunk>,
    cancel: &'a AtomicBool,
    /// Raised when a sibling `pread` thread failed: stop quietly (its error is reported).
    halt: Option<&'a AtomicBool>,
}

impl Ends<'_> {
    /// `Cancelled` when the flag is set (a cancelled pipeline also disconnects channels).
    fn stopped(&self) -> IoError {
        if self.cancelled() { IoError::Cancelled } else { IoError::Disconnected }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn halted(&self) -> bool {
        self.halt.is_some_and(|halt| halt.load(Ordering::Relaxed))
    }

    /// `Cancelled` when the cancel flag (or the sibling halt flag) is raised.
    fn check_cancel(&self) -> Result<(), IoError> {
        if self.cancelled() || self.halted() { Err(IoError::Cancelled) } else { Ok(()) }
    }

    /// Blocks for a free buffer with at least `capacity` bytes, polling the cancel flag.
    fn take_buffer(&self, capacity: usize) -> Result<AlignedBuf, IoError> {
        loop {
            self.check_cancel()?;
            match self.free.recv_timeout(CANCEL_POLL) {
                Ok(buf) => return checked_capacity(buf, capacity),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(self.stopped()),
            }
        }
    }

    /// A free buffer if one is ready now.
    fn try_take_buffer(&self, capacity: usize) -> Result<Option<AlignedBuf>, IoError> {
        match self.free.try_recv() {
            Ok(buf) => checked_capacity(buf, capacity).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(self.stopped()),
        }
    }

    /// Sends a chunk downstream, polling the cancel flag while the channel is full.
    fn send(&self, mut chunk: ReadChunk) -> Result<(), IoError> {
        loop {
            self.check_cancel()?;
            match self.out.send_timeout(chunk, CANCEL_POLL) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(back)) => chunk = back,
                Err(SendTimeoutError::Disconnected(_)) => return Err(self.stopped()),
            }
        }
    }
}

fn checked_capacity(buf: AlignedBuf, capacity: usize) -> Result<AlignedBuf, IoError> {
    if buf.capacity() < capacity {
        return Err(IoError::InvalidOptions(format!(
            "free buffer of {} bytes is smaller than the chunk size {capacity}",
            buf.capacity()
        )));
    }
    Ok(buf)
}

fn read_error(offset: u64, length: usize, source: io::Error) -> IoError {
    IoError::Read { offset, length: length as u64, source }
}

fn unexpected_eof(offset: u64, length: usize) -> IoError {
    read_error(
        offset,
        length,
        io::Error::new(io::ErrorKind::UnexpectedEof, "source ended before its probed size"),
    )
}

fn no_progress(offset: u64, length: usize) -> IoError {
    read_error(
        offset,
        length,
        io::Error::other(format!("no progress after {MAX_RETRIES} attempts")),
    )
}

/// A chunk whose requests are being read.
struct ReadSlot {
    chunk: ChunkPlan,
    buf: AlignedBuf,
    /// Requests of this chunk not yet complete (queued, in flight or awaiting resubmission).
    outstanding: usize,
}

impl SlotBuffer for ReadSlot {
    fn buffer(&mut self) -> Option<&mut AlignedBuf> {
        Some(&mut self.buf)
    }
}

fn read_uring(
    mut driver: Driver<ReadSlot>,
    plan: &ReadPlan,
    order: Order<'_>,
    queue_depth: usize,
    ends: &Ends<'_>,
) -> Result<ReadStats, IoError> {
    let queue_depth = queue_depth.min(super::uring::MAX_QUEUE_DEPTH);
    let chunk_count = order.len();
    let granule = plan.alignment().granule;
    let mut next_chunk = 0u64;
    let mut bytes_read = 0u64;
    let mut pending: VecDeque<Request> = VecDeque::new();
    let mut done = Vec::with_capacity(queue_depth);
    loop {
        ends.check_cancel()?;
        // fill the queue: resubmissions and remaining requests of started chunks first, then new
        // chunks while free buffers are at hand (block for one only when nothing is in flight)
        while driver.in_flight() < queue_depth {
            if let Some(request) = pending.pop_front() {
                driver.push(request)?;
                continue;
            }
            if next_chunk == chunk_count {
                break;
            }
            let buf = if driver.in_flight() == 0 {
                ends.take_buffer(plan.chunk_size())?
            } else {
                match ends.try_take_buffer(plan.chunk_size())? {
                    Some(buf) => buf,
                    None => break,
                }
            };
            let chunk = plan.chunk(order.chunk(next_chunk));
            next_chunk += 1;
            let spans: Vec<_> = plan.spans(&chunk).collect();
            let slot = driver.slots.insert(ReadSlot { chunk, buf, outstanding: spans.len() });
            pending.extend(spans.into_iter().map(|span| Request { slot, span, retries: 0 }));
        }
        if driver.in_flight() == 0 {
            debug_assert!(pending.is_empty() && driver.slots.len() == 0);
            break;
        }
        driver.wait(&mut done)?;
        for (request, res) in done.drain(..) {
            let span = request.span;
            if res < 0 {
                let errno = -res;
                if errno != libc::EAGAIN && errno != libc::EINTR {
                    return Err(read_error(
                        span.file_offset,
                        span.len,
                        io::Error::from_raw_os_error(errno),
                    ));
                }
                if request.retries >= MAX_RETRIES {
                    return Err(no_progress(span.file_offset, span.len));
                }
                pending.push_front(Request { retries: request.retries + 1, ..request });
                continue;
            }
            match after_transfer(span, res as usize, granule) {
                Progress::Done => {
                    let slot = driver.slots.get_mut(request.slot).expect("slot of a live request");
                    slot.outstanding -= 1;
                    if slot.outstanding == 0 {
                        let ReadSlot { chunk, mut buf, .. } =
                            driver.slots.remove(request.slot).expect("slot of a live request");
                        buf.set_len(chunk.valid);
                        bytes_read += chunk.valid as u64;
                        ends.send(ReadChunk {
                            chunk_index: chunk.index,
                            offset: chunk.offset,
                            buf,
                        })?;
                    }
                }
                Progress::Resubmit(rest) => {
                    let retries = if rest == span { request.retries + 1 } else { 0 };
                    if retries > MAX_RETRIES {
                        return Err(no_progress(span.file_offset, span.len));
                    }
                    pending.push_front(Request { slot: request.slot, span: rest, retries });
                }
                Progress::Eof => return Err(unexpected_eof(span.file_offset, span.len)),
            }
        }
    }
    Ok(ReadStats::new(Engine::Uring, bytes_read, driver.submitted(), driver.registration()))
}

/// Most helper threads the `pread` engine uses (each has one request in flight).
pub(crate) const MAX_PREAD_THREADS: usize = 4;

/// State shared by the `pread` helper threads.
struct PreadShared<'a> {
    file: &'a File,
    plan: &'a ReadPlan,
    order: Order<'a>,
    /// Next position in `order`; the lock is held while waiting for a free buffer, so chunks are claimed
    /// in the order buffers arrive, as with a single thread.
    next: Mutex<u64>,
    /// Raised by the first thread that fails, so the others stop.
    halt: AtomicBool,
    /// The first failure.
    error: Mutex<Option<IoError>>,
    bytes_read: AtomicU64,
    requests: AtomicU64,
}

/// The `pread` engine: `min(queue_depth, MAX_PREAD_THREADS, chunks)` threads (the calling thread
/// alone when that is 1), each reading whole chunks with one blocking request at a time.
fn read_pread(
    file: &File,
    plan: &ReadPlan,
    order: Order<'_>,
    queue_depth: usize,
    ends: &Ends<'_>,
) -> Result<ReadStats, IoError> {
    let chunk_count = usize::try_from(order.len()).unwrap_or(usize::MAX);
    let threads = queue_depth.min(MAX_PREAD_THREADS).min(chunk_count).max(1);
    let shared = PreadShared {
        file,
        plan,
        order,
        next: Mutex::new(0),
        halt: AtomicBool::new(false),
        error: Mutex::new(None),
        bytes_read: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    };
    let worker = |shared: &PreadShared<'_>| {
        let ends = Ends { halt: Some(&shared.halt), ..*ends };
        if let Err(error) = pread_chunks(shared, &ends) {
            let mut first = shared.error.lock().unwrap_or_else(|poison| poison.into_inner());
            if first.is_none() {
                *first = Some(error);
            }
            drop(first);
            shared.halt.store(true, Ordering::Relaxed);
        }
    };
    if threads == 1 {
        worker(&shared);
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let _ = scope.spawn(|| worker(&shared));
            }
        });
    }
    let PreadShared { error, bytes_read, requests, .. } = shared;
    if let Some(error) = error.into_inner().unwrap_or_else(|poison| poison.into_inner()) {
        return Err(error);
    }
    Ok(ReadStats::new(
        Engine::Pread,
        bytes_read.into_inner(),
        requests.into_inner(),
        RegistrationStats::default(),
    ))
}

/// One `pread` helper: claims chunks until none is left, reads and sends each.
fn pread_chunks(shared: &PreadShared<'_>, ends: &Ends<'_>) -> Result<(), IoError> {
    let plan = shared.plan;
    let align = plan.alignment();
    loop {
        let (index, mut buf) = {
            let mut next = shared.next.lock().unwrap_or_else(|poison| poison.into_inner());
            if *next == shared.order.len() {
                return Ok(());
            }
            let buf = ends.take_buffer(plan.chunk_size())?;
            let index = shared.order.chunk(*next);
            *next += 1;
            (index, buf)
        };
        let chunk = plan.chunk(index);
        let mut requests = 0u64;
        for span in plan.spans(&chunk) {
            let cancelled = || ends.cancelled() || ends.halted();
            let result = transfer_sync(span, align.granule, &mut requests, &cancelled, |span| {
                let target = &mut buf.as_mut_slice()[span.buf_offset..span.buf_offset + span.len];
                align.assert_request(span.file_offset, span.len, target.as_ptr());
                shared.file.read_at(target, span.file_offset)
            });
            let _ = shared.requests.fetch_add(requests, Ordering::Relaxed);
            requests = 0;
            result.map_err(|stop| match stop {
                SyncStop::Cancelled => IoError::Cancelled,
                SyncStop::NoProgress(span) => no_progress(span.file_offset, span.len),
                SyncStop::Eof(span) => unexpected_eof(span.file_offset, span.len),
                SyncStop::Failed(span, error) => read_error(span.file_offset, span.len, error),
            })?;
        }
        buf.set_len(chunk.valid);
        let _ = shared.bytes_read.fetch_add(chunk.valid as u64, Ordering::Relaxed);
        ends.send(ReadChunk { chunk_index: chunk.index, offset: chunk.offset, buf })?;
    }
}
