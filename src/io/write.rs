//! `write_target`: writes data buffers and zero ranges received from the restore pipeline to the
//! target, with io_uring (several requests in flight) or sequential `pwrite`, returns every data
//! buffer to the free channel once written, and flushes the target with `fdatasync` at the end.
//!
//! `Zero` ops use `BLKZEROOUT` on block devices and `fallocate(FALLOC_FL_ZERO_RANGE)` on regular
//! files, synchronously on the writer thread once the ring has drained (so no write is in flight
//! while a range is zeroed), and fall back to writing from a zero buffer when the kernel or the
//! filesystem refuses.
//!
//! Operations must not overlap: requests in flight complete in any order. This module does not
//! verify or decompress data, does not skip writes of zero ranges on targets that already read as
//! zero, and does not resize the target (beyond what writing or zeroing past its end does).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::device::{DeviceInfo, is_direct};
use super::plan::{
    Alignment, MAX_RETRIES, Progress, SyncStop, after_transfer, check_write, transfer_sync,
    write_spans,
};
use super::read::CANCEL_POLL;
use super::uring::{
    Direction, Driver, MAX_QUEUE_DEPTH, RegistrationStats, Request, SlotBuffer, open_ring,
};
use super::{AlignedBuf, Engine, IoError, MAX_WRITE_REQUEST_BYTES, Registration};

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
    /// Make `length` bytes at `offset` (both block-aligned) read as zero: `BLKZEROOUT` on a block
    /// device, `fallocate(FALLOC_FL_ZERO_RANGE)` on a regular file, else written from an internal
    /// zero buffer.
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
    /// Requests that used a registered (fixed) buffer; 0 with `pwrite`, with
    /// `Registration::Off`, or when the kernel refused registration.
    pub fixed_buffer_requests: u64,
    /// True when every request used a registered buffer (and there was at least one).
    pub registered_buffers: bool,
    /// True when the file was registered with the ring and requests used `types::Fixed(0)`.
    pub registered_file: bool,
    /// Bytes of `Zero` ops zeroed with the `BLKZEROOUT` ioctl (block devices).
    pub zeroed_blkzeroout_bytes: u64,
    /// Bytes of `Zero` ops zeroed with `fallocate(FALLOC_FL_ZERO_RANGE)` (regular files).
    pub zeroed_fallocate_bytes: u64,
    /// Bytes of `Zero` ops written from the zero buffer (the fallback; included in `requests`).
    pub zeroed_written_bytes: u64,
}

impl WriteStats {
    fn new(
        engine: Engine,
        bytes_written: u64,
        requests: u64,
        reg: RegistrationStats,
        zeroer: &Zeroer<'_>,
    ) -> Self {
        WriteStats {
            engine,
            bytes_written,
            requests,
            fixed_buffer_requests: reg.fixed_buffer_requests,
            registered_buffers: requests > 0 && reg.fixed_buffer_requests == requests,
            registered_file: reg.file,
            zeroed_blkzeroout_bytes: zeroer.blkzeroout_bytes,
            zeroed_fallocate_bytes: zeroer.fallocate_bytes,
            zeroed_written_bytes: zeroer.written_bytes,
        }
    }
}

/// `BLKZEROOUT` from `<linux/fs.h>`: `_IO(0x12, 127)`, zero a byte range `[start, len]` of a
/// block device (the kernel uses `WRITE_ZEROES`/discard where the device offers it and writes
/// zero pages otherwise).
const BLKZEROOUT: u32 = 0x127f;

/// How `Zero` ops are carried out, and how many bytes each method zeroed.
#[derive(Debug)]
struct Zeroer<'a> {
    file: &'a File,
    /// None once the fast method was refused: every later op writes zeros.
    method: Option<ZeroMethod>,
    /// `BLKZEROOUT` ranges must be multiples of this (the logical block size).
    block: u64,
    blkzeroout_bytes: u64,
    fallocate_bytes: u64,
    written_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMethod {
    BlkZeroOut,
    Fallocate,
}

impl<'a> Zeroer<'a> {
    fn new(file: &'a File, info: &DeviceInfo) -> Zeroer<'a> {
        let method =
            if info.is_block_device { ZeroMethod::BlkZeroOut } else { ZeroMethod::Fallocate };
        Zeroer {
            file,
            method: Some(method),
            block: u64::from(info.logical_block_bytes.max(1)),
            blkzeroout_bytes: 0,
            fallocate_bytes: 0,
            written_bytes: 0,
        }
    }

    /// True when `[offset, offset + length)` should be zeroed by `zero_now` rather than written.
    fn fast(&self, offset: u64, length: u64) -> bool {
        match self.method {
            Some(ZeroMethod::BlkZeroOut) => {
                offset.is_multiple_of(self.block) && length.is_multiple_of(self.block)
            }
            Some(ZeroMethod::Fallocate) => true,
            None => false,
        }
    }

    /// Zeroes the range with the fast method, synchronously. Ok(false) when the kernel or
    /// filesystem does not support it (`EOPNOTSUPP`, `EINVAL`, `ENOTTY`, `ENOSYS`): the method is
    /// then turned off and the caller writes zeros instead.
    fn zero_now(&mut self, offset: u64, length: u64) -> Result<bool, IoError> {
        let Some(method) = self.method else { return Ok(false) };
        if !self.fast(offset, length) {
            return Ok(false);
        }
        let result = match method {
            ZeroMethod::BlkZeroOut => blkzeroout(self.file, offset, length),
            ZeroMethod::Fallocate => fallocate_zero(self.file, offset, length),
        };
        match result {
            Ok(()) => {
                match method {
                    ZeroMethod::BlkZeroOut => self.blkzeroout_bytes += length,
                    ZeroMethod::Fallocate => self.fallocate_bytes += length,
                }
                Ok(true)
            }
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
                ) =>
            {
                self.method = None;
                Ok(false)
            }
            Err(source) => Err(IoError::Write { offset, length, source }),
        }
    }
}

fn blkzeroout(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, length];
    // SAFETY: BLKZEROOUT reads exactly two u64 (start, length) through the pointer, which points
    // to `range`, live for the duration of the call; the fd is open (borrowed from `file`). No
    // data request to this range is in flight (ops never overlap, and the ring is drained first).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT as libc::Ioctl, range.as_ptr()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn fallocate_zero(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
    else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate takes only integers and the fd borrowed from `file`, which is open.
        let rc = unsafe {
            libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, offset, length)
        };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Writes every op received on `ops` until the channel is closed and drained, with up to
/// `queue_depth` requests in flight, splitting ops into requests of at most
/// `MAX_WRITE_REQUEST_BYTES`. Every `Data` buffer is sent back on `free` after its write completes
/// (send errors are ignored). Once `ops` is closed and every write completed, issues one
/// `fdatasync` and returns. When `cancel` becomes true, reaps the requests in flight and returns
/// `IoError::Cancelled`. A misaligned op fails with `IoError::InvalidOptions`. Registration
/// follows `Registration::from_env()` (on unless `FERRY_IO_NO_REGISTER=1`).
pub fn write_target(
    file: &File,
    info: &DeviceInfo,
    options: &WriteOptions,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
) -> Result<WriteStats, IoError> {
    write_target_with(file, info, options, Registration::from_env(), ops, free, cancel)
}

/// `write_target` with an explicit choice of buffer/file registration for the io_uring engine.
pub fn write_target_with(
    file: &File,
    info: &DeviceInfo,
    options: &WriteOptions,
    registration: Registration,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
) -> Result<WriteStats, IoError> {
    if options.queue_depth == 0 {
        return Err(IoError::InvalidOptions("queue depth must be at least 1".to_string()));
    }
    let align = Alignment::new(info.logical_block_bytes, is_direct(file)?)?;
    let zero = AlignedBuf::new(MAX_WRITE_REQUEST_BYTES);
    let zeroer = Zeroer::new(file, info);
    let stats = match open_ring(options.engine, options.queue_depth)? {
        Some(ring) => {
            let driver = Driver::new(ring, file, Direction::Write, align, Some(zero), registration);
            let queue_depth = options.queue_depth.min(MAX_QUEUE_DEPTH);
            write_uring(driver, align, queue_depth, ops, free, cancel, zeroer)?
        }
        None => write_pwrite(align, zero, ops, free, cancel, zeroer)?,
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

/// Queues the requests of a data write, or of a zero range written from the zero buffer.
fn queue_write(
    driver: &mut Driver<WriteSlot>,
    pending: &mut VecDeque<Request>,
    zeroer: &mut Zeroer<'_>,
    offset: u64,
    length: u64,
    buf: Option<AlignedBuf>,
) {
    if buf.is_none() {
        zeroer.written_bytes += length;
    }
    let spans: Vec<_> =
        write_spans(offset, length, MAX_WRITE_REQUEST_BYTES, buf.is_none()).collect();
    let slot = driver.slots.insert(WriteSlot { buf, length, outstanding: spans.len() });
    pending.extend(spans.into_iter().map(|span| Request { slot, span, retries: 0 }));
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
    mut zeroer: Zeroer<'_>,
) -> Result<WriteStats, IoError> {
    let mut pending: VecDeque<Request> = VecDeque::new();
    let mut done = Vec::with_capacity(queue_depth);
    let mut closed = false;
    let mut bytes_written = 0u64;
    // a zero range for the fast method, waiting for the ring to drain: `fallocate` waits for
    // the file's direct I/O in flight, whose completion may need this thread to reap it
    let mut held: Option<(u64, u64)> = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(IoError::Cancelled);
        }
        while driver.in_flight() < queue_depth {
            if let Some(request) = pending.pop_front() {
                driver.push(request)?;
                continue;
            }
            if closed || held.is_some() {
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
            if buf.is_none() && zeroer.fast(offset, length) {
                held = Some((offset, length));
                break;
            }
            queue_write(&mut driver, &mut pending, &mut zeroer, offset, length, buf);
        }
        if driver.in_flight() == 0
            && let Some((offset, length)) = held.take()
        {
            // nothing in flight (so nothing queued either): zero synchronously, in op order
            if zeroer.zero_now(offset, length)? {
                bytes_written += length;
            } else {
                queue_write(&mut driver, &mut pending, &mut zeroer, offset, length, None);
            }
            continue;
        }
        if driver.in_flight() == 0 {
            // the queue only stays empty once ops is closed and every op was written
            debug_assert!(closed && pending.is_empty() && driver.slots.len() == 0);
            break;
        }
        driver.wait(&mut done)?;
        for (request, res) in done.drain(..) {
            bytes_written +=
                complete_write(&mut driver, &mut pending, free, align.granule, request, res)?;
        }
    }
    let (requests, registration) = (driver.submitted(), driver.registration());
    Ok(WriteStats::new(Engine::Uring, bytes_written, requests, registration, &zeroer))
}

/// Handles the completion `res` of one write request: a retry or the rest of a short write goes
/// back to the front of `pending`; the op's last request frees its slot and buffer. Returns the
/// bytes of the op it completed, or 0.
fn complete_write(
    driver: &mut Driver<WriteSlot>,
    pending: &mut VecDeque<Request>,
    free: &Sender<AlignedBuf>,
    granule: usize,
    request: Request,
    res: i32,
) -> Result<u64, IoError> {
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
        return Ok(0);
    }
    match after_transfer(span, res as usize, granule) {
        Progress::Done => {
            let slot = driver.slots.get_mut(request.slot).expect("slot of a live request");
            slot.outstanding -= 1;
            if slot.outstanding > 0 {
                return Ok(0);
            }
            let slot = driver.slots.remove(request.slot).expect("slot of a live request");
            if let Some(buf) = slot.buf {
                let _ = free.send(buf);
            }
            Ok(slot.length)
        }
        Progress::Resubmit(rest) => {
            let retries = if rest == span { request.retries + 1 } else { 0 };
            if retries > MAX_RETRIES {
                return Err(no_progress(span.file_offset, span.len));
            }
            pending.push_front(Request { slot: request.slot, span: rest, retries });
            Ok(0)
        }
        Progress::Eof => Err(wrote_zero(span.file_offset, span.len)),
    }
}

fn write_pwrite(
    align: Alignment,
    mut zero: AlignedBuf,
    ops: &Receiver<WriteOp>,
    free: &Sender<AlignedBuf>,
    cancel: &AtomicBool,
    mut zeroer: Zeroer<'_>,
) -> Result<WriteStats, IoError> {
    zero.set_len(zero.capacity());
    let file = zeroer.file;
    let mut bytes_written = 0u64;
    let mut requests = 0u64;
    while let Some(op) = next_op(ops, cancel)? {
        let Planned { offset, length, buf } = plan_op(op, &align, free)?;
        if buf.is_none() && length > 0 {
            if zeroer.zero_now(offset, length)? {
                bytes_written += length;
                continue;
            }
            zeroer.written_bytes += length;
        }
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
    let registration = RegistrationStats::default();
    Ok(WriteStats::new(Engine::Pread, bytes_written, requests, registration, &zeroer))
}
