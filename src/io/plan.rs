//! Pure request bookkeeping shared by both engines: validating options against the device
//! geometry, cutting the device into chunks and chunks (or write operations) into requests, and
//! deciding what a completion of `res` bytes means (done, resubmit the remainder, or end of file).
//!
//! Everything here is safe arithmetic without system calls, so it is unit tested exhaustively;
//! it deliberately owns no buffers and performs no I/O.

use super::{BUF_ALIGN, IoError};

/// Largest single request accepted (the SQE length field is 32 bits; 1 GiB is far beyond any
/// useful request size).
pub(crate) const MAX_REQUEST_BYTES: usize = 1 << 30;

/// How many consecutive completions without progress (`-EAGAIN`, `-EINTR`, or a short count that
/// does not advance by a whole alignment unit) a request may have before it fails.
pub(crate) const MAX_RETRIES: u32 = 1000;

/// One request: a byte range of the device and where in the buffer it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    /// Device offset.
    pub file_offset: u64,
    /// Offset into the buffer.
    pub buf_offset: usize,
    /// Bytes requested from the kernel (for a read, possibly rounded up past the end of file).
    pub len: usize,
    /// Bytes that must be transferred for the request to be complete (`want <= len`).
    pub want: usize,
}

/// What a completion of `res > 0` or `res == 0` bytes means for a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Every wanted byte was transferred.
    Done,
    /// A short transfer: submit the remainder (which may equal the span when the short count is
    /// smaller than one alignment unit; the caller counts that as a retry).
    Resubmit(Span),
    /// Zero bytes transferred before the wanted end: end of file for a read, no progress for a
    /// write.
    Eof,
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value.div_ceil(align) * align
}

/// Rounds `value` down to a multiple of `align` (a power of two).
pub(crate) fn align_down(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value & !(align - 1)
}

/// The outcome of a completion that transferred `res` bytes of `span`. Short transfers advance by
/// whole multiples of `granule`, so a resubmitted `O_DIRECT` request keeps its offset, length and
/// buffer address aligned (bytes past the last whole granule are simply transferred again).
pub(crate) fn after_transfer(span: Span, res: usize, granule: usize) -> Progress {
    if res >= span.want {
        return Progress::Done;
    }
    if res == 0 {
        return Progress::Eof;
    }
    let advance = align_down(res as u64, granule as u64) as usize;
    Progress::Resubmit(Span {
        file_offset: span.file_offset + advance as u64,
        buf_offset: span.buf_offset + advance,
        len: span.len - advance,
        want: span.want - advance,
    })
}

/// Why a blocking span transfer stopped early.
#[derive(Debug)]
pub(crate) enum SyncStop {
    /// The cancel check answered true.
    Cancelled,
    /// `MAX_RETRIES` attempts in a row made no progress.
    NoProgress(Span),
    /// Zero bytes transferred before the wanted end.
    Eof(Span),
    /// The system call failed.
    Failed(Span, std::io::Error),
}

/// Moves one span with blocking calls (the `pread`/`pwrite` engine): `transfer` performs one call
/// for a span and returns the byte count; short counts are resubmitted as `after_transfer` says,
/// `EINTR`/`EAGAIN` are retried, and `requests` counts every call.
pub(crate) fn transfer_sync(
    first: Span,
    granule: usize,
    requests: &mut u64,
    cancelled: &dyn Fn() -> bool,
    mut transfer: impl FnMut(Span) -> std::io::Result<usize>,
) -> Result<(), SyncStop> {
    let mut span = first;
    let mut retries = 0u32;
    loop {
        if cancelled() {
            return Err(SyncStop::Cancelled);
        }
        *requests += 1;
        match transfer(span) {
            Ok(res) => match after_transfer(span, res, granule) {
                Progress::Done => return Ok(()),
                Progress::Resubmit(rest) => {
                    retries = if rest == span { retries + 1 } else { 0 };
                    span = rest;
                }
                Progress::Eof => return Err(SyncStop::Eof(span)),
            },
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                retries += 1;
            }
            Err(error) => return Err(SyncStop::Failed(span, error)),
        }
        if retries > MAX_RETRIES {
            return Err(SyncStop::NoProgress(span));
        }
    }
}

/// Alignment rules for one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Alignment {
    /// Whether the fd has `O_DIRECT` (only then are the rules enforced).
    pub direct: bool,
    /// Device offsets and lengths must be multiples of this (1 when not direct).
    pub block: u64,
    /// Short transfers advance by multiples of this: `max(block, BUF_ALIGN)` when direct, so
    /// offsets, lengths and buffer addresses all stay aligned (1 when not direct).
    pub granule: usize,
}

impl Alignment {
    /// Rules for a file with logical block size `logical_block_bytes`, opened with or without
    /// `O_DIRECT`.
    pub(crate) fn new(logical_block_bytes: u32, direct: bool) -> Result<Alignment, IoError> {
        if !logical_block_bytes.is_power_of_two() {
            return Err(IoError::InvalidOptions(format!(
                "logical block size {logical_block_bytes} is not a power of two"
            )));
        }
        Ok(if direct {
            let block = u64::from(logical_block_bytes);
            Alignment { direct, block, granule: (logical_block_bytes as usize).max(BUF_ALIGN) }
        } else {
            Alignment { direct, block: 1, granule: 1 }
        })
    }

    /// Panics unless a request is aligned for `O_DIRECT`; a no-op for buffered files. Called at
    /// every submission: the planning code guarantees alignment, so a failure is a bug here.
    pub(crate) fn assert_request(&self, offset: u64, len: usize, addr: *const u8) {
        if self.direct {
            assert!(
                offset.is_multiple_of(self.block) && (len as u64).is_multiple_of(self.block),
                "unaligned O_DIRECT request: offset {offset}, length {len}, block {}",
                self.block
            );
            assert!(
                (addr as usize).is_multiple_of(BUF_ALIGN),
                "unaligned O_DIRECT buffer address {addr:p} (need {BUF_ALIGN})"
            );
        }
    }
}

/// One chunk of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    /// `offset / chunk_size`.
    pub index: u64,
    /// Device offset of the first byte.
    pub offset: u64,
    /// Bytes of the device in this chunk.
    pub valid: usize,
    /// Bytes to request: `valid` rounded up to the block size (only differs for the last chunk
    /// of an `O_DIRECT` file whose size is not a block multiple).
    pub io_len: usize,
}

/// How a source of known size is cut into chunks and requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    size: u64,
    chunk_size: usize,
    request_size: usize,
    align: Alignment,
}

impl ReadPlan {
    /// Validates the sizes against the alignment rules.
    pub(crate) fn new(
        size: u64,
        chunk_size: usize,
        request_size: usize,
        align: Alignment,
    ) -> Result<ReadPlan, IoError> {
        if chunk_size == 0 || request_size == 0 {
            return Err(IoError::InvalidOptions(format!(
                "chunk size {chunk_size} and request size {request_size} must be non-zero"
            )));
        }
        if request_size > MAX_REQUEST_BYTES {
            return Err(IoError::InvalidOptions(format!(
                "request size {request_size} exceeds {MAX_REQUEST_BYTES}"
            )));
        }
        if align.direct
            && (!chunk_size.is_multiple_of(align.granule)
                || !request_size.is_multiple_of(align.granule))
        {
            return Err(IoError::InvalidOptions(format!(
                "chunk size {chunk_size} and request size {request_size} must be multiples of {} \
                 for O_DIRECT",
                align.granule
            )));
        }
        Ok(ReadPlan { size, chunk_size, request_size, align })
    }

    /// Number of chunks covering the source.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    /// The chunk with index `index` (`index < chunk_count()`).
    pub(crate) fn chunk(&self, index: u64) -> ChunkPlan {
        let offset = index * self.chunk_size as u64;
        debug_assert!(offset < self.size);
        let valid = (self.size - offset).min(self.chunk_size as u64) as usize;
        let io_len = align_up(valid as u64, self.align.block) as usize;
        ChunkPlan { index, offset, valid, io_len }
    }

    /// Buffer capacity a chunk needs (its size; `io_len` never exceeds it).
    pub(crate) fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The alignment rules the plan was validated against.
    pub(crate) fn alignment(&self) -> Alignment {
        self.align
    }

    /// The requests that fill `chunk`, in order.
    pub(crate) fn spans(&self, chunk: &ChunkPlan) -> impl Iterator<Item = Span> + use<> {
        let ChunkPlan { offset, valid, io_len, .. } = *chunk;
        let request_size = self.request_size;
        (0..io_len).step_by(request_size).map(move |start| {
            let len = request_size.min(io_len - start);
            Span {
                file_offset: offset + start as u64,
                buf_offset: start,
                len,
                want: len.min(valid - start),
            }
        })
    }
}

/// Splits a write of `length` bytes at `offset` into requests of at most `max_request` bytes.
/// Data writes take consecutive parts of the buffer; zero writes (`zero`) all reuse offset 0 of
/// the shared zero buffer, which is `max_request` bytes long.
pub(crate) fn write_spans(
    offset: u64,
    length: u64,
    max_request: usize,
    zero: bool,
) -> impl Iterator<Item = Span> {
    (0..length).step_by(max_request).map(move |start| {
        let len = (length - start).min(max_request as u64) as usize;
        let buf_offset = if zero { 0 } else { start as usize };
        Span { file_offset: offset + start, buf_offset, len, want: len }
    })
}

/// Checks a write operation's range against the alignment rules. The device size is not checked:
/// a restore into a new image file grows it, and a block device reports `ENOSPC` itself.
pub(crate) fn check_write(offset: u64, length: u64, align: &Alignment) -> Result<(), IoError> {
    if !offset.is_multiple_of(align.block) || !length.is_multiple_of(align.block) {
        return Err(IoError::InvalidOptions(format!(
            "write of {length} bytes at offset {offset} is not aligned to {} bytes",
            align.block
        )));
    }
    if offset.checked_add(length).is_none() {
        return Err(IoError::InvalidOptions(format!(
            "write of {length} bytes at offset {offset} overflows the device offset"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn direct(block: u32) -> Alignment {
        Alignment::new(block, true).expect("valid block size")
    }

    #[test]
    fn align_math() {
        assert_eq!(align_up(0, 512), 0);
        assert_eq!(align_up(1, 512), 512);
        assert_eq!(align_up(512, 512), 512);
        assert_eq!(align_up(12345, 4096), 16384);
        assert_eq!(align_down(12345, 4096), 12288);
        assert_eq!(align_down(4095, 4096), 0);
        assert_eq!(align_down(7, 1), 7);
    }

    #[test]
    fn alignment_granule_is_at_least_buf_align_when_direct() {
        assert_eq!(direct(512), Alignment { direct: true, block: 512, granule: 4096 });
        assert_eq!(direct(4096).granule, 4096);
        assert_eq!(direct(65536).granule, 65536);
        let buffered = Alignment::new(512, false).expect("valid");
        assert_eq!(buffered, Alignment { direct: false, block: 1, granule: 1 });
        assert!(Alignment::new(1000, true).is_err());
        assert!(Alignment::new(0, false).is_err());
    }

    #[test]
    fn chunks_cover_the_source_and_the_last_is_rounded_up() {
        let size = 3 * 4 * MIB as u64 + 12345;
        let plan = ReadPlan::new(size, 4 * MIB, MIB, direct(4096)).expect("valid plan");
        assert_eq!(plan.chunk_count(), 4);
        let first = plan.chunk(0);
        assert_eq!(first, ChunkPlan { index: 0, offset: 0, valid: 4 * MIB, io_len: 4 * MIB });
        let last = plan.chunk(3);
        assert_eq!(last.offset, 12 * MIB as u64);
        assert_eq!(last.valid, 12345);
        assert_eq!(last.io_len, 16384);
        let total: u64 = (0..4).map(|i| plan.chunk(i).valid as u64).sum();
        assert_eq!(total, size);
    }

    #[test]
    fn buffered_last_chunk_is_not_rounded() {
        let plan =
            ReadPlan::new(MIB as u64 + 7, MIB, MIB, Alignment::new(4096, false).expect("ok"))
                .expect("valid plan");
        assert_eq!(plan.chunk(1).io_len, 7);
        assert_eq!(plan.chunk(1).valid, 7);
    }

    #[test]
    fn exact_multiple_has_no_partial_chunk() {
        let plan = ReadPlan::new(8 * MIB as u64, 4 * MIB, MIB, direct(512)).expect("valid");
        assert_eq!(plan.chunk_count(), 2);
        assert_eq!(plan.chunk(1).valid, 4 * MIB);
        let empty = ReadPlan::new(0, 4 * MIB, MIB, direct(512)).expect("valid");
        assert_eq!(empty.chunk_count(), 0);
    }

    #[test]
    fn spans_split_a_chunk_into_requests() {
        let plan = ReadPlan::new(100 * MIB as u64, 4 * MIB, MIB, direct(512)).expect("valid");
        let spans: Vec<Span> = plan.spans(&plan.chunk(2)).collect();
        assert_eq!(spans.len(), 4);
        for (i, span) in spans.iter().enumerate() {
            assert_eq!(span.file_offset, (8 + i as u64) * MIB as u64);
            assert_eq!(span.buf_offset, i * MIB);
            assert_eq!((span.len, span.want), (MIB, MIB));
        }
    }

    #[test]
    fn last_chunk_spans_want_only_valid_bytes() {
        // 1 MiB chunk, 256 KiB requests, 300000 valid bytes in the last chunk
        let size = MIB as u64 + 300_000;
        let plan = ReadPlan::new(size, MIB, 256 * 1024, direct(4096)).expect("valid");
        let spans: Vec<Span> = plan.spans(&plan.chunk(1)).collect();
        assert_eq!(spans.len(), 2);
        assert_eq!(
            spans[0],
            Span { file_offset: MIB as u64, buf_offset: 0, len: 262_144, want: 262_144 }
        );
        assert_eq!(
            spans[1],
            Span {
                file_offset: MIB as u64 + 262_144,
                buf_offset: 262_144,
                len: 40_960,
                want: 37_856
            }
        );
        assert_eq!(spans.iter().map(|s| s.want).sum::<usize>(), 300_000);
        for span in &spans {
            assert_eq!(span.file_offset % 4096, 0);
            assert_eq!(span.len % 4096, 0);
            assert!(span.buf_offset + span.len <= MIB);
        }
    }

    #[test]
    fn request_larger_than_chunk_gives_one_span() {
        let plan = ReadPlan::new(10 * MIB as u64, MIB, 4 * MIB, direct(512)).expect("valid");
        let spans: Vec<Span> = plan.spans(&plan.chunk(3)).collect();
        assert_eq!(
            spans,
            vec![Span { file_offset: 3 * MIB as u64, buf_offset: 0, len: MIB, want: MIB }]
        );
    }

    #[test]
    fn plan_rejects_unaligned_or_zero_sizes() {
        assert!(ReadPlan::new(1, 0, MIB, direct(512)).is_err());
        assert!(ReadPlan::new(1, MIB, 0, direct(512)).is_err());
        assert!(ReadPlan::new(1, MIB + 512, MIB, direct(512)).is_err());
        assert!(ReadPlan::new(1, MIB, 6144, direct(512)).is_err());
        assert!(
            ReadPlan::new(1, 2 * MAX_REQUEST_BYTES, 2 * MAX_REQUEST_BYTES, direct(512)).is_err()
        );
        // buffered files accept any sizes
        let buffered = Alignment::new(4096, false).expect("ok");
        assert!(ReadPlan::new(1, 1000, 300, buffered).is_ok());
    }

    #[test]
    fn completion_outcomes() {
        let span = Span { file_offset: 8192, buf_offset: 8192, len: 16384, want: 12345 };
        assert_eq!(after_transfer(span, 12345, 4096), Progress::Done);
        assert_eq!(after_transfer(span, 16384, 4096), Progress::Done);
        assert_eq!(after_transfer(span, 0, 4096), Progress::Eof);
        assert_eq!(
            after_transfer(span, 9000, 4096),
            Progress::Resubmit(Span {
                file_offset: 16384,
                buf_offset: 16384,
                len: 8192,
                want: 4153
            })
        );
        // less than one granule: resubmit the whole span
        assert_eq!(after_transfer(span, 100, 4096), Progress::Resubmit(span));
        // buffered: advance by exactly res
        assert_eq!(
            after_transfer(span, 100, 1),
            Progress::Resubmit(Span {
                file_offset: 8292,
                buf_offset: 8292,
                len: 16284,
                want: 12245
            })
        );
    }

    #[test]
    fn write_spans_split_data_and_reuse_zero_buffer() {
        let data: Vec<Span> = write_spans(4096, 2 * MIB as u64 + 512, MIB, false).collect();
        assert_eq!(data.len(), 3);
        assert_eq!(
            data[1],
            Span { file_offset: 4096 + MIB as u64, buf_offset: MIB, len: MIB, want: MIB }
        );
        assert_eq!(
            data[2],
            Span { file_offset: 4096 + 2 * MIB as u64, buf_offset: 2 * MIB, len: 512, want: 512 }
        );
        let zero: Vec<Span> = write_spans(0, 3 * MIB as u64, MIB, true).collect();
        assert_eq!(zero.len(), 3);
        assert!(zero.iter().all(|s| s.buf_offset == 0 && s.len == MIB));
        assert_eq!(zero[2].file_offset, 2 * MIB as u64);
        assert_eq!(write_spans(0, 0, MIB, true).count(), 0);
    }

    #[test]
    fn write_checks() {
        let align = direct(512);
        assert!(check_write(512, 1024, &align).is_ok());
        assert!(check_write(100, 512, &align).is_err());
        assert!(check_write(0, 100, &align).is_err());
        assert!(check_write(u64::MAX - 511, 1024, &align).is_err());
        let buffered = Alignment::new(512, false).expect("ok");
        assert!(check_write(3, 5, &buffered).is_ok());
    }

    #[test]
    #[should_panic(expected = "unaligned O_DIRECT request")]
    fn assert_request_catches_unaligned_offset() {
        direct(512).assert_request(100, 512, std::ptr::null());
    }

    #[test]
    #[should_panic(expected = "unaligned O_DIRECT buffer address")]
    fn assert_request_catches_unaligned_address() {
        direct(512).assert_request(512, 512, 512 as *const u8);
    }

    #[test]
    fn assert_request_ignores_buffered_files() {
        Alignment::new(512, false).expect("ok").assert_request(3, 5, 7 as *const u8);
    }
}
