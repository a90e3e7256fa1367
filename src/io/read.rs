//! `read_source`: reads a whole source, chunk by chunk, into buffers taken from the caller's
//! free-buffer channel and sends each filled chunk downstream, with io_uring (several requests in
//! flight across chunks) or sequential `pread`.
//!
//! Chunks may be sent out of order; each is sent exactly once. The reader never returns while a
//! request is in flight. It does not inspect chunk contents and does not retry failed requests
//! beyond resubmitting short, `-EAGAIN` and `-EINTR` completions.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError};

use super::device::{DeviceInfo, is_direct};
use super::plan::{
    Alignment, ChunkPlan, MAX_RETRIES, Progress, ReadPlan, SyncStop, after_transfer, transfer_sync,
};
use super::uring::{Direction, Driver, Request, SlotBuffer, open_ring};
use super::{AlignedBuf, Engine, IoError};

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
    /// Requests in flight at most (io_uring only; at least 1).
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
}

/// Reads the whole source `[0, info.size_bytes)` on the calling thread.
///
/// For every chunk it takes a free buffer from `free` (blocking; capacity at least
/// `chunk_size_bytes`), fills it, and sends a `ReadChunk` on `out`. Chunks may be sent out of
/// order, each exactly once. If `cancel` becomes true it stops promptly and returns
/// `IoError::Cancelled`; if `free` or `out` is disconnected it returns `IoError::Disconnected`
/// (or `Cancelled` when the cancel flag is also set). In-flight requests are always reaped before
/// returning. `Engine::Uring` falls back to `pread` when ring setup fails with `EPERM`, `ENOSYS`
/// or `ENOMEM`; the stats name the engine that ran.
pub fn read_source(
    file: &File,
    info: &DeviceInfo,
    options: &ReadOptions,
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
    let ends = Ends { free, out, cancel };
    match open_ring(options.engine, options.queue_depth)? {
        Some(ring) => {
            let driver = Driver::new(ring, file, Direction::Read, align, None);
            read_uring(driver, &plan, options.queue_depth, &ends)
        }
        None => read_pread(file, &plan, &ends),
    }
}

/// The reader's channel ends and cancel flag.
struct Ends<'a> {
    free: &'a Receiver<AlignedBuf>,
    out: &'a Sender<ReadChunk>,
    cancel: &'a AtomicBool,
}

impl Ends<'_> {
    /// `Cancelled` when the flag is set (a cancelled pipeline also disconnects channels).
    fn stopped(&self) -> IoError {
        if self.cancelled() { IoError::Cancelled } else { IoError::Disconnected }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn check_cancel(&self) -> Result<(), IoError> {
        if self.cancelled() { Err(IoError::Cancelled) } else { Ok(()) }
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
    queue_depth: usize,
    ends: &Ends<'_>,
) -> Result<ReadStats, IoError> {
    let queue_depth = queue_depth.min(super::uring::MAX_QUEUE_DEPTH);
    let chunk_count = plan.chunk_count();
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
            let chunk = plan.chunk(next_chunk);
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
    Ok(ReadStats { engine: Engine::Uring, bytes_read, requests: driver.submitted() })
}

fn read_pread(file: &File, plan: &ReadPlan, ends: &Ends<'_>) -> Result<ReadStats, IoError> {
    let align = plan.alignment();
    let mut bytes_read = 0u64;
    let mut requests = 0u64;
    for index in 0..plan.chunk_count() {
        let mut buf = ends.take_buffer(plan.chunk_size())?;
        let chunk = plan.chunk(index);
        for span in plan.spans(&chunk) {
            let cancelled = || ends.cancelled();
            transfer_sync(span, align.granule, &mut requests, &cancelled, |span| {
                let target = &mut buf.as_mut_slice()[span.buf_offset..span.buf_offset + span.len];
                align.assert_request(span.file_offset, span.len, target.as_ptr());
                file.read_at(target, span.file_offset)
            })
            .map_err(|stop| match stop {
                SyncStop::Cancelled => IoError::Cancelled,
                SyncStop::NoProgress(span) => no_progress(span.file_offset, span.len),
                SyncStop::Eof(span) => unexpected_eof(span.file_offset, span.len),
                SyncStop::Failed(span, error) => read_error(span.file_offset, span.len, error),
            })?;
        }
        buf.set_len(chunk.valid);
        bytes_read += chunk.valid as u64;
        ends.send(ReadChunk { chunk_index: chunk.index, offset: chunk.offset, buf })?;
    }
    Ok(ReadStats { engine: Engine::Pread, bytes_read, requests })
}
