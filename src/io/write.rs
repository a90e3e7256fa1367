//! `write_target`: writes data buffers and zero ranges received from the restore pipeline to the
//! target, with io_uring (several requests in flight) or sequential `pwrite`, returns every data
//! buffer to the free channel once written, and flushes the target with `fdatasync` at the end.
//!
//! Operations must not overlap: requests in flight complete in any order. This module does not
//! verify or decompress data, does not skip writes of zero ranges on targets that already read as
//! zero, and does not resize the target.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::device::{DeviceInfo, is_direct};
use super::plan::{
    Alignment, MAX_RETRIES, Progress, SyncStop, after_transfer, check_write, transfer_sync,
    write_spans,
};
use super::read::CANCEL_POLL;
use super::uring::{Direction, Driver, MAX_QUEUE_DEPTH, Request, SlotBuffer, open_ring};
use super::{AlignedBuf, Engine, IoError, MAX_WRITE_REQUEST_BYTES};

/// How `write_target` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Requested engine; `Uring` falls back to `Pread` when io_uring cannot be set up.
    pub engine: Engine,
    /// Requests in flight at most (io_uring only; at least 1).
    pub queue_depth: usize,
}

/// One thing to write.
#[derive(Debug)]
pub enum WriteOp {
    /// Write `buf.as_slice()` at `offset`. `offset` and `buf.len()` are multiples of
    /// `info.logical_block_bytes` (the caller pads the last chunk); after the write the buffer is
    /// sent back on `free`.
    Data {
        /// Device offset.
        offset: u64,
        /// The bytes to write (`buf.len()` of them).
        buf: AlignedBuf,
    },
    /// Write `length` zero bytes at `offset` (both block-aligned) from an internal zero buffer.
    Zero {
        /// Device offset.
        offset: u64,
        /// Number of zero bytes.
        length: u64,
    },
}

/// What a completed `write_target` did.
#[derive(Debug, Clone)]
pub struct WriteStats {
    /// The engine that actually ran (after any fallback).
    pub engine: Engine,
    /// Bytes written, data and zeros.
    pub bytes_written: u64,
    /// Write requests issued, resubmissions included.
    pub requests: u64,
}

/// Writes every op received on `ops` until the channel is closed and drained, with up to
/// `queue_depth` requests in flight, splitting ops into requests of at most
/// `MAX_WRITE_REQUEST_BYTES`. Every `Data` buffer is sent back on `free` after its write completes
/// (send errors are ignored). Once `ops` is closed and every write completed, issues one
/// `fdatasync` and returns. When `cancel` becomes true, reaps the requests in flight and returns
/// `IoError::Cancelled`. A misaligned op fails with `IoError::InvalidOptions`.
pub fn write_target(
    file: &File,
    info: &DeviceInfo,
    options: &WriteOptions,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
) -> Result<WriteStats, IoError> {
    if options.queue_depth == 0 {
        return Err(IoError::InvalidOptions("queue depth must be at least 1".to_string()));
    }
    let align = Alignment::new(info.logical_block_bytes, is_direct(file)?)?;
    let zero = AlignedBuf::new(MAX_WRITE_REQUEST_BYTES);
    let stats = match open_ring(options.engine, options.queue_depth)? {
        Some(ring) => {
            let driver = Driver::new(ring, file, Direction::Write, align, Some(zero));
            let queue_depth = options.queue_depth.min(MAX_QUEUE_DEPTH);
            write_uring(driver, align, queue_depth, ops, free, cancel)?
        }
        None => write_pwrite(file, align, zero, ops, free, cancel)?,
    };
    file.sync_data().map_err(|source| IoError::Flush { source })?;
    Ok(stats)
}

/// An op as the write loops see it: range plus the data buffer (None for zeros).
struct Planned {
    offset: u64,
    length: u64,
    buf: Option<AlignedBuf>,
}

/// Validates `op`; on failure the data buffer goes back to `free` before the error is returned.
fn plan_op(op: WriteOp, align: &Alignment, free: &Sender<AlignedBuf>) -> Result<Planned, IoError> {
    let planned = match op {
        WriteOp::Data { offset, buf } => {
            Planned { offset, length: buf.len() as u64, buf: Some(buf) }
        }
        WriteOp::Zero { offset, length } => Planned { offset, length, buf: None },
    };
    if let Err(error) = check_write(planned.offset, planned.length, align) {
        if let Some(buf) = planned.buf {
            let _ = free.send(buf);
        }
        return Err(error);
    }
    Ok(planned)
}

/// Blocks for the next op, polling the cancel flag; None once the channel is closed and empty.
fn next_op(ops: &Receiver<WriteOp>, cancel: &AtomicBool) -> Result<Option<WriteOp>, IoError> {
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(IoError::Cancelled);
        }
        match ops.recv_timeout(CANCEL_POLL) {
            Ok(op) => return Ok(Some(op)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

fn write_error(offset: u64, length: usize, source: io::Error) -> IoError {
    IoError::Write { offset, length: length as u64, source }
}

fn no_progress(offset: u64, length: usize) -> IoError {
    write_error(
        offset,
        length,
        io::Error::other(format!("no progress after {MAX_RETRIES} attempts")),
    )
}

fn wrote_zero(offset: u64, length: usize) -> IoError {
    write_error(offset, length, io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes"))
}

/// An op whose requests are being written.
struct WriteSlot {
    buf: Option<AlignedBuf>,
    length: u64,
    /// Requests of this op not yet complete.
    outstanding: usize,
}

impl SlotBuffer for WriteSlot {
    fn buffer(&mut self) -> Option<&mut AlignedBuf> {
        self.buf.as_mut()
    }
}

fn write_uring(
    mut driver: Driver<WriteSlot>,
    align: Alignment,
    queue_depth: usize,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
) -> Result<WriteStats, IoError> {
    let mut pending: VecDeque<Request> = VecDeque::new();
    let mut done = Vec::with_capacity(queue_depth);
    let mut closed = false;
    let mut bytes_written = 0u64;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(IoError::Cancelled);
        }
        while driver.in_flight() < queue_depth {
            if let Some(request) = pending.pop_front() {
                driver.push(request)?;
                continue;
            }
            if closed {
                break;
            }
            let op = if driver.in_flight() == 0 {
                match next_op(ops, cancel)? {
                    Some(op) => op,
                    None => {
                        closed = true;
                        break;
                    }
                }
            } else {
                match ops.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            };
            let Planned { offset, length, buf } = plan_op(op, &align, free)?;
            if length == 0 {
                if let Some(buf) = buf {
                    let _ = free.send(buf);
                }
                continue;
            }
            let spans: Vec<_> =
                write_spans(offset, length, MAX_WRITE_REQUEST_BYTES, buf.is_none()).collect();
            let slot = driver.slots.insert(WriteSlot { buf, length, outstanding: spans.len() });
            pending.extend(spans.into_iter().map(|span| Request { slot, span, retries: 0 }));
        }
        if driver.in_flight() == 0 {
            // the queue only stays empty once ops is closed and every op was written
            debug_assert!(closed && pending.is_empty() && driver.slots.len() == 0);
            break;
        }
        driver.wait(&mut done)?;
        for (request, res) in done.drain(..) {
            let span = request.span;
            if res < 0 {
                let errno = -res;
                if errno != libc::EAGAIN && errno != libc::EINTR {
                    return Err(write_error(
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
            match after_transfer(span, res as usize, align.granule) {
                Progress::Done => {
                    let slot = driver.slots.get_mut(request.slot).expect("slot of a live request");
                    slot.outstanding -= 1;
                    if slot.outstanding == 0 {
                        let slot =
                            driver.slots.remove(request.slot).expect("slot of a live request");
                        bytes_written += slot.length;
                        if let Some(buf) = slot.buf {
                            let _ = free.send(buf);
                        }
                    }
                }
                Progress::Resubmit(rest) => {
                    let retries = if rest == span { request.retries + 1 } else { 0 };
                    if retries > MAX_RETRIES {
                        return Err(no_progress(span.file_offset, span.len));
                    }
                    pending.push_front(Request { slot: request.slot, span: rest, retries });
                }
                Progress::Eof => return Err(wrote_zero(span.file_offset, span.len)),
            }
        }
    }
    Ok(WriteStats { engine: Engine::Uring, bytes_written, requests: driver.submitted() })
}

fn write_pwrite(
    file: &File,
    align: Alignment,
    mut zero: AlignedBuf,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
) -> Result<WriteStats, IoError> {
    zero.set_len(zero.capacity());
    let mut bytes_written = 0u64;
    let mut requests = 0u64;
    while let Some(op) = next_op(ops, cancel)? {
        let Planned { offset, length, buf } = plan_op(op, &align, free)?;
        for span in write_spans(offset, length, MAX_WRITE_REQUEST_BYTES, buf.is_none()) {
            let cancelled = || cancel.load(Ordering::Relaxed);
            transfer_sync(span, align.granule, &mut requests, &cancelled, |span| {
                let source = buf.as_ref().unwrap_or(&zero).as_slice();
                let bytes = &source[span.buf_offset..span.buf_offset + span.len];
                align.assert_request(span.file_offset, span.len, bytes.as_ptr());
                file.write_at(bytes, span.file_offset)
            })
            .map_err(|stop| match stop {
                SyncStop::Cancelled => IoError::Cancelled,
                SyncStop::NoProgress(span) => no_progress(span.file_offset, span.len),
                SyncStop::Eof(span) => wrote_zero(span.file_offset, span.len),
                SyncStop::Failed(span, error) => write_error(span.file_offset, span.len, error),
            })?;
        }
        bytes_written += length;
        if let Some(buf) = buf {
            let _ = free.send(buf);
        }
    }
    Ok(WriteStats { engine: Engine::Pread, bytes_written, requests })
}
