//! One zlib stream (RFC 1950) from independently compressed segments, as pigz builds it, so a
//! 50 MiB Cinder object is compressed on every core and still decodes with one
//! `zlib.decompress`.
//!
//! A stream is `header ‖ segment 0 ‖ … ‖ segment n-1 ‖ Adler-32 (big-endian)`:
//! - [`deflate_segment`] (or [`compress_segment`], which adds the segment's [`adler32`]) turns
//!   one slice into raw deflate blocks that end on a byte boundary after a full flush, so the
//!   next segment starts a fresh deflate stream with no dependency on this one. Only the last
//!   segment sets BFINAL. A segment whose samples do not compress, or whose deflate output is
//!   not smaller, is written as stored blocks (at most 65,535 bytes each).
//! - [`adler32_combine`] joins the segments' checksums without rereading the data.
//! - [`zlib_header`], [`assemble`] and [`zlib_trailer`] put the pieces together.
//!
//! Segments are independent: segment `i` can be compressed on any thread into its own
//! [`Segment`], in any order; [`assemble`] copies each one once into the final body (or a caller
//! uploads header, segment bodies and trailer as they are). `cinder::backup` spreads an object's
//! segments over its workers; the tests' `encode_zlib_parallel` does it all with scoped threads.
//! Nothing here starts a thread, reads a clock or touches a device.
//!
//! Every segment starts with an empty window, which costs a little ratio at each boundary;
//! [`SEGMENT_BYTES`] is chosen by measurement (see the `measure` test).

use super::codec::Algorithm;
use super::error::CinderError;

/// Recommended uncompressed bytes per segment: 1 MiB (50 segments for a 50 MiB object).
pub const SEGMENT_BYTES: usize = 1 << 20;

/// Largest stored deflate block (RFC 1951: LEN is 16 bits).
const STORED_MAX: usize = 65_535;

/// The Adler-32 modulus (largest prime below 2^16).
const BASE: u32 = 65_521;

/// Bytes per sample of the incompressibility check.
const SAMPLE_BYTES: usize = 8 << 10;

/// Segments shorter than this are compressed and compared, not sampled.
const SAMPLE_MIN_SEGMENT: usize = 16 * SAMPLE_BYTES;

/// A segment is judged (sampled, then compressed or stored) in pieces of this many bytes, so a
/// segment that is half text and half random data stores its random half without compressing
/// it. Each piece after the first starts a fresh compressor (after a full flush), which costs
/// nothing measurable at the levels ferry uses: the deflate window is only 32 KiB.
const PIECE_BYTES: usize = 32 * SAMPLE_BYTES;

/// How [`deflate_segment`] wrote a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Compressed deflate blocks (fixed or dynamic Huffman).
    Compressed,
    /// Stored blocks: the segment did not compress (or the level is 0).
    Stored,
}

/// One compressed segment, ready for [`assemble`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Raw deflate blocks ending on a byte boundary; BFINAL only if this was the last segment.
    pub deflate: Vec<u8>,
    /// Adler-32 of the segment's uncompressed bytes.
    pub adler: u32,
    /// Uncompressed length.
    pub len: u64,
    /// How the segment was written.
    pub kind: SegmentKind,
}

/// The 2-byte zlib header zlib writes for `level` (clamped to 0..=9): `78 01` for 0-1,
/// `78 5e` for 2-5, `78 9c` for 6, `78 da` for 7-9 (32 KiB window, FLEVEL from the level).
pub fn zlib_header(level: u32) -> [u8; 2] {
    let flevel: u8 = match level.min(9) {
        0 | 1 => 0,
        2..=5 => 1,
        6 => 2,
        _ => 3,
    };
    let cmf = 0x78u8;
    let flg = flevel << 6;
    // FCHECK makes CMF * 256 + FLG a multiple of 31.
    let check = (31 - (u16::from(cmf) * 256 + u16::from(flg)) % 31) % 31;
    [cmf, flg | u8::try_from(check).expect("a residue mod 31 fits a byte")]
}

/// The 4-byte zlib trailer: the Adler-32 of all uncompressed bytes, big-endian.
pub fn zlib_trailer(adler: u32) -> [u8; 4] {
    adler.to_be_bytes()
}

/// The Adler-32 of empty input, where a running checksum starts.
pub const ADLER32_INIT: u32 = 1;

/// Bytes per row of [`adler32`]: 32 columns summed side by side (the loop vectorises).
const ADLER_ROW: usize = 32;

/// Bytes per [`adler32`] reduction: over 2,048 rows, a column's weighted sum stays below
/// 255 * 2048^2 / 2 < 2^32.
const ADLER_CHUNK: usize = ADLER_ROW * 2048;

/// Continues the Adler-32 `adler` over `data` (start from [`ADLER32_INIT`]).
pub fn adler32(adler: u32, data: &[u8]) -> u32 {
    let mut a = u64::from(adler & 0xffff);
    let mut b = u64::from(adler >> 16);
    for chunk in data.chunks(ADLER_CHUNK) {
        let (rows, tail) = chunk.as_chunks::<ADLER_ROW>();
        // Byte j of n = rows * 32 adds x_j to a and (n - j) * x_j to b. By column l:
        // s[l] = sum of the column, p[l] = sum over rows of the column's sum in earlier rows, so
        // sum (n - j) * x_j = 32 * sum p[l] + sum (32 - l) * s[l].
        let mut s = [0u32; ADLER_ROW];
        let mut p = [0u32; ADLER_ROW];
        for row in rows {
            for l in 0..ADLER_ROW {
                p[l] += s[l];
                s[l] += u32::from(row[l]);
            }
        }
        let width = ADLER_ROW as u64;
        let sum: u64 = s.iter().map(|&v| u64::from(v)).sum();
        let weighted: u64 = (0..ADLER_ROW)
            .map(|l| width * u64::from(p[l]) + (width - l as u64) * u64::from(s[l]))
            .sum();
        b += (rows.len() as u64 * width) * a + weighted;
        a += sum;
        for &x in tail {
            a += u64::from(x);
            b += a;
        }
        a %= u64::from(BASE);
        b %= u64::from(BASE);
    }
    u32::try_from((b << 16) | a).expect("both halves are below 2^16")
}

/// zlib's `adler32_combine`: the Adler-32 of `A ‖ B` from `adler_a` = Adler-32 of A,
/// `adler_b` = Adler-32 of B and `len_b` = B's length.
pub fn adler32_combine(adler_a: u32, adler_b: u32, len_b: u64) -> u32 {
    let base = u64::from(BASE);
    let rem = len_b % base;
    let (a1, b1) = (u64::from(adler_a & 0xffff), u64::from(adler_a >> 16));
    let (a2, b2) = (u64::from(adler_b & 0xffff), u64::from(adler_b >> 16));
    // A ‖ B: a = a1 + a2 - 1 and b = b1 + b2 + len_b * (a1 - 1), modulo BASE.
    let a = (a1 + a2 + base - 1) % base;
    let b = (b1 + b2 + rem * a1 + base - rem) % base;
    u32::try_from((b << 16) | a).expect("both halves are below 2^16")
}

/// Bytes `len` input bytes take as stored blocks (5 bytes of header per block of up to 65,535);
/// an empty last segment still needs one (empty) block, an empty other segment none.
pub fn stored_len(len: usize, last: bool) -> usize {
    let blocks = len.div_ceil(STORED_MAX).max(usize::from(last));
    len + 5 * blocks
}

/// Upper bound of what [`deflate_segment`] appends for `len` input bytes.
pub fn segment_bound(len: usize) -> usize {
    // zlib's deflateBound plus a full flush's empty stored block; never above the compressed
    // output that is kept only when smaller than `stored_len`.
    stored_len(len, true).max(len + (len >> 12) + (len >> 14) + (len >> 25) + 64)
}

/// Appends `data` to `out` as stored deflate blocks (BFINAL on the last block if `last`).
fn push_stored(data: &[u8], last: bool, out: &mut Vec<u8>) {
    out.reserve(stored_len(data.len(), last));
    if data.is_empty() {
        if last {
            out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
        }
        return;
    }
    let blocks = data.len().div_ceil(STORED_MAX);
    for (i, block) in data.chunks(STORED_MAX).enumerate() {
        let len = u16::try_from(block.len()).expect("a stored block is at most 65,535 bytes");
        out.push(u8::from(last && i + 1 == blocks));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
}

/// Three samples (start, middle, end) that level-1 deflate cannot shrink below 97%: the segment
/// is random-like, and compressing it would only confirm that.
fn looks_incompressible(data: &[u8]) -> bool {
    if data.len() < SAMPLE_MIN_SEGMENT {
        return false;
    }
    let mut c = flate2::Compress::new(flate2::Compression::new(1), false);
    // Room for the expansion: zlib-rs at level 1 writes fixed-Huffman blocks, about 6% more than
    // random input, so a buffer of deflateBound would stop it short of the end.
    let mut out = Vec::with_capacity(2 * SAMPLE_BYTES);
    [0, data.len() / 2, data.len() - SAMPLE_BYTES].iter().all(|&start| {
        c.reset();
        out.clear();
        let sample = &data[start..start + SAMPLE_BYTES];
        match c.compress_vec(sample, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => out.len() * 100 >= SAMPLE_BYTES * 97,
            _ => false,
        }
    })
}

/// Appends one segment of a zlib stream to `out`: `data` as raw deflate at `level` (clamped to
/// 0..=9), ending on a byte boundary, BFINAL set on its final block only if `last`. A non-last
/// segment ends with a full flush (an empty stored block), so the next segment may start a
/// fresh compressor. The segment is judged in pieces of `PIECE_BYTES`: a piece is written as
/// stored blocks when the level is 0, when samples of a piece of 128 KiB or more do not
/// compress, or when its compressed blocks are not smaller. An empty non-last segment appends
/// nothing.
///
/// # Errors
/// [`CinderError::Compress`] if the deflate library fails on the in-memory buffer (a bug).
pub fn deflate_segment(
    data: &[u8],
    level: u32,
    last: bool,
    out: &mut Vec<u8>,
) -> Result<SegmentKind, CinderError> {
    let level = level.min(9);
    if level == 0 || (data.is_empty() && !last) {
        push_stored(data, last, out);
        return Ok(SegmentKind::Stored);
    }
    // Whole pieces; the last one takes the remainder, so no piece is too short to sample.
    let pieces = (data.len() / PIECE_BYTES).max(1);
    let mut compressor = None;
    let mut kind = SegmentKind::Stored;
    for i in 0..pieces {
        let end = if i + 1 == pieces { data.len() } else { (i + 1) * PIECE_BYTES };
        let piece = &data[i * PIECE_BYTES..end];
        let piece_last = last && i + 1 == pieces;
        if deflate_piece(&mut compressor, piece, level, piece_last, out)? == SegmentKind::Compressed
        {
            kind = SegmentKind::Compressed;
        }
    }
    Ok(kind)
}

/// One piece of [`deflate_segment`]: stored when its samples do not compress or its compressed
/// blocks are not smaller, else compressed by `compressor` (created on first use, reset for
/// each piece) and ended by a full flush (or the final block when `last`).
fn deflate_piece(
    compressor: &mut Option<flate2::Compress>,
    data: &[u8],
    level: u32,
    last: bool,
    out: &mut Vec<u8>,
) -> Result<SegmentKind, CinderError> {
    if looks_incompressible(data) {
        push_stored(data, last, out);
        return Ok(SegmentKind::Stored);
    }
    let fail = |reason: String| CinderError::Compress { algorithm: Algorithm::Zlib, reason };
    let start = out.len();
    out.reserve(segment_bound(data.len()));
    let c = compressor
        .get_or_insert_with(|| flate2::Compress::new(flate2::Compression::new(level), false));
    c.reset();
    let flush = if last { flate2::FlushCompress::Finish } else { flate2::FlushCompress::Full };
    loop {
        let consumed = usize::try_from(c.total_in()).map_err(|e| fail(e.to_string()))?;
        let status =
            c.compress_vec(&data[consumed..], out, flush).map_err(|e| fail(e.to_string()))?;
        let all_in = c.total_in() == data.len() as u64;
        // Finish is done at StreamEnd; a full flush is done once all input is in and the
        // output was not filled (zlib's rule: avail_out != 0 after the call).
        let done = match status {
            flate2::Status::StreamEnd => true,
            _ => !last && all_in && out.len() < out.capacity(),
        };
        if done {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    if out.len() - start >= stored_len(data.len(), last) {
        out.truncate(start);
        push_stored(data, last, out);
        return Ok(SegmentKind::Stored);
    }
    Ok(SegmentKind::Compressed)
}

/// [`deflate_segment`] into a new, right-sized buffer, with the segment's Adler-32 and length.
///
/// # Errors
/// [`CinderError::Compress`] if the deflate library fails on the in-memory buffer (a bug).
pub fn compress_segment(data: &[u8], level: u32, last: bool) -> Result<Segment, CinderError> {
    let mut deflate = Vec::with_capacity(segment_bound(data.len()));
    let kind = deflate_segment(data, level, last, &mut deflate)?;
    Ok(Segment { deflate, adler: adler32(ADLER32_INIT, data), len: data.len() as u64, kind })
}

/// The Adler-32 of the segments' uncompressed bytes, in order.
pub fn combined_adler(segments: &[Segment]) -> u32 {
    segments.iter().fold(ADLER32_INIT, |acc, s| adler32_combine(acc, s.adler, s.len))
}

/// The zlib stream of `segments` (in order; the last one compressed with `last`): header for
/// `level`, each segment's deflate bytes copied once, big-endian combined Adler-32.
///
/// # Panics
/// If `segments` is empty (a stream needs at least the last segment's final block).
pub fn assemble(level: u32, segments: &[Segment]) -> Vec<u8> {
    assert!(!segments.is_empty(), "a zlib stream needs at least one segment");
    let body: usize = segments.iter().map(|s| s.deflate.len()).sum();
    let mut out = Vec::with_capacity(2 + body + 4);
    out.extend_from_slice(&zlib_header(level));
    for s in segments {
        out.extend_from_slice(&s.deflate);
    }
    out.extend_from_slice(&zlib_trailer(combined_adler(segments)));
    out
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// `data` as one zlib stream at `level`, compressed in segments of `segment_bytes` (at least 1)
    /// on `threads` scoped threads (1 or 0: on the caller's thread). Decodes like
    /// `zlib.compress(data, level)`, not byte-identical to it.
    fn encode_zlib_parallel(
        data: &[u8],
        level: u32,
        segment_bytes: usize,
        threads: usize,
    ) -> Result<Vec<u8>, CinderError> {
        let segment_bytes = segment_bytes.max(1);
        let count = data.len().div_ceil(segment_bytes).max(1);
        let job = |i: usize| {
            let start = (i * segment_bytes).min(data.len());
            let end = (start + segment_bytes).min(data.len());
            compress_segment(&data[start..end], level, i + 1 == count)
        };
        let threads = threads.clamp(1, count);
        let segments: Vec<Segment> = if threads == 1 {
            (0..count).map(job).collect::<Result<_, _>>()?
        } else {
            let next = AtomicUsize::new(0);
            let worker = || {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, CinderError>(done);
                    }
                    done.push((i, job(i)?));
                }
            };
            let mut indexed: Vec<(usize, Segment)> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
                let mut all = Vec::with_capacity(count);
                for h in handles {
                    all.extend(h.join().expect("a segment worker panicked")?);
                }
                Ok::<_, CinderError>(all)
            })?;
            indexed.sort_unstable_by_key(|&(i, _)| i);
            indexed.into_iter().map(|(_, s)| s).collect()
        };
        Ok(assemble(level, &segments))
    }

    /// xorshift64: deterministic test bytes.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| (self.next() >> 24) as u8).collect()
        }
    }

    const WORDS: [&str; 16] = [
        "volume",
        "block",
        "backup",
        "snapshot",
        "cinder",
        "the",
        "of",
        "and",
        "object",
        "bucket",
        "chunk",
        "INFO",
        "WARN",
        "2026-11-26T10:00:00Z",
        "nvme",
        "ferry",
    ];

    /// Words and separators, like `bench gen-image --mix text`.
    fn text(rng: &mut Rng, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 32);
        while out.len() < n {
            let v = rng.next();
            out.extend_from_slice(WORDS[(v % 16) as usize].as_bytes());
            out.extend_from_slice(if v >> 60 == 0 { b".\n" } else { b" " });
        }
        out.truncate(n);
        out
    }

    /// 40% zeros, 30% text, 30% random in runs of `min_run..=max_run` bytes, as `bench
    /// gen-image --mix mixed` (which uses runs of 1-16 MiB).
    fn mixed(seed: u64, n: usize, min_run: usize, max_run: usize) -> Vec<u8> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let run =
                (min_run + rng.below((max_run - min_run + 1) as u64) as usize).min(n - out.len());
            match rng.below(100) {
                0..40 => out.resize(out.len() + run, 0),
                40..70 => out.extend(text(&mut rng, run)),
                _ => out.extend(rng.bytes(run)),
            }
        }
        out
    }

    fn adler_reference(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + u32::from(x)) % BASE;
            b = (b + a) % BASE;
        }
        (b << 16) | a
    }

    fn inflate(stream: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let _ = flate2::read::ZlibDecoder::new(stream).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Python's `zlib.decompress` on each stream, in one process: true when every stream
    /// decodes to its data, false (with a message) when python3 is absent.
    fn python_decodes(cases: &[(Vec<u8>, &[u8])], expect_ok: bool) -> bool {
        if Command::new("python3").arg("-c").arg("import zlib").status().is_err() {
            eprintln!("skipped: python3 not available");
            return false;
        }
        let path = std::env::temp_dir().join(format!(
            "ferry-zlib-segments-{}-{}",
            std::process::id(),
            cases.len()
        ));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for (stream, data) in cases {
            file.write_all(&(stream.len() as u64).to_le_bytes()).unwrap();
            file.write_all(stream).unwrap();
            file.write_all(&(data.len() as u64).to_le_bytes()).unwrap();
            file.write_all(data).unwrap();
        }
        file.flush().unwrap();
        drop(file);
        let script = r"
import struct, sys, zlib
buf = open(sys.argv[1], 'rb').read()
pos = ok = bad = 0
while pos < len(buf):
    (n,) = struct.unpack_from('<Q', buf, pos); stream = buf[pos + 8:pos + 8 + n]; pos += 8 + n
    (n,) = struct.unpack_from('<Q', buf, pos); data = buf[pos + 8:pos + 8 + n]; pos += 8 + n
    try:
        good = zlib.decompress(stream) == data
    except zlib.error:
        good = False
    ok += good; bad += not good
print(ok, bad)
";
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(out.status.success(), "python3 failed");
        let counts = String::from_utf8(out.stdout).unwrap();
        let expected =
            if expect_ok { format!("{} 0", cases.len()) } else { format!("0 {}", cases.len()) };
        assert_eq!(counts.trim(), expected, "python's zlib.decompress: ok bad");
        true
    }

    #[test]
    fn adler32_matches_reference() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let data = rng.bytes(3 * ADLER_CHUNK + 1000);
        let ones = vec![0xffu8; 3 * ADLER_CHUNK + 17];
        for len in [
            0,
            1,
            15,
            16,
            17,
            31,
            32,
            33,
            5552,
            ADLER_CHUNK - 1,
            ADLER_CHUNK,
            ADLER_CHUNK + 1,
            150_001,
        ] {
            assert_eq!(adler32(ADLER32_INIT, &data[..len]), adler_reference(&data[..len]), "{len}");
            assert_eq!(adler32(ADLER32_INIT, &ones[..len]), adler_reference(&ones[..len]), "{len}");
        }
        assert_eq!(adler32(ADLER32_INIT, &data), adler_reference(&data));
        assert_eq!(adler32(ADLER32_INIT, &ones), adler_reference(&ones));
        // Known value: zlib.adler32(b"Wikipedia") == 0x11E60398.
        assert_eq!(adler32(ADLER32_INIT, b"Wikipedia"), 0x11E6_0398);
        // Continuing a running checksum equals one pass.
        let (x, y) = data.split_at(77_777);
        assert_eq!(adler32(adler32(ADLER32_INIT, x), y), adler_reference(&data));
    }

    #[test]
    fn adler32_combine_matches_concatenation() {
        let mut rng = Rng(0x0bad_cafe_f00d_d00d);
        // Longer than 65521 * 4, so len_b spans several multiples of the modulus.
        let data = rng.bytes(65_521 * 4 + 4_321);
        let whole = adler_reference(&data);
        let mut splits: Vec<usize> =
            (0..300).map(|_| rng.below(data.len() as u64 + 1) as usize).collect();
        splits.extend([0, 1, data.len() - 1, data.len()]);
        // len_b exactly k * 65521 and k * 65521 +- 1.
        for k in 1..=4 {
            splits.extend([data.len() - 65_521 * k, data.len() - 65_521 * k + 1]);
            splits.push(data.len() - 65_521 * k - 1);
        }
        for at in splits {
            let (a, b) = data.split_at(at);
            let combined = adler32_combine(adler_reference(a), adler_reference(b), b.len() as u64);
            assert_eq!(combined, whole, "split at {at}");
        }
        // len_b = 0 leaves the first checksum as it is.
        let a = adler_reference(&data[..1000]);
        assert_eq!(adler32_combine(a, ADLER32_INIT, 0), a);
        // Huge lengths (zeros: a = 1, b = n mod BASE) are associative with one combine.
        let zeros = |n: u64| u32::try_from(((n % 65_521) << 16) | 1).unwrap();
        for n in [65_521u64 * 65_536, 5 << 30, u64::from(u32::MAX) + 12_345] {
            let two = adler32_combine(adler32_combine(whole, zeros(n), n), zeros(n + 7), n + 7);
            assert_eq!(two, adler32_combine(whole, zeros(2 * n + 7), 2 * n + 7), "{n}");
            assert_eq!(zeros(1000), adler_reference(&[0; 1000]));
        }
    }

    #[test]
    fn header_is_what_zlib_writes() {
        for level in 0..=9 {
            let mut c = flate2::Compress::new(flate2::Compression::new(level), true);
            let mut out = Vec::with_capacity(64);
            let _ = c.compress_vec(b"x", &mut out, flate2::FlushCompress::Finish).unwrap();
            assert_eq!(zlib_header(level), [out[0], out[1]], "level {level}");
        }
        assert_eq!(zlib_header(1), [0x78, 0x01]);
        assert_eq!(zlib_header(2), [0x78, 0x5e]);
        assert_eq!(zlib_header(6), [0x78, 0x9c]);
        assert_eq!(zlib_header(9), [0x78, 0xda]);
    }

    /// Every input × segment size × level decodes with flate2 and with Python's
    /// `zlib.decompress`.
    #[test]
    fn round_trips() {
        let mut rng = Rng(42);
        let inputs: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("one byte", vec![0x5a]),
            ("zeros", vec![0; 300_001]),
            ("random", rng.bytes(400_003)),
            ("text", text(&mut rng, 333_333)),
            ("mixed", mixed(7, 1_000_000, 1_000, 150_000)),
        ];
        let mut cases: Vec<(Vec<u8>, &[u8])> = Vec::new();
        for (name, data) in &inputs {
            for segment_bytes in [1, 7, 4096, 65_535, 65_536, 100_000, 1 << 20, usize::MAX] {
                // One byte per segment: only the small inputs, and only some levels.
                if segment_bytes < 4096 && data.len() > 20_000 {
                    continue;
                }
                for level in 0..=9 {
                    if data.len() > 20_000 && segment_bytes != 100_000 && level % 4 != 1 {
                        continue;
                    }
                    let stream = encode_zlib_parallel(data, level, segment_bytes, 2).unwrap();
                    assert_eq!(stream[..2], zlib_header(level));
                    let back = inflate(&stream).unwrap_or_else(|e| {
                        panic!("{name} segment {segment_bytes} level {level}: {e}")
                    });
                    assert!(back == *data, "{name} segment {segment_bytes} level {level}");
                    let cinder = super::super::codec::decompress(
                        Algorithm::Zlib,
                        &stream,
                        Some(data.len() as u64),
                    )
                    .unwrap();
                    assert!(cinder == *data);
                    cases.push((stream, data));
                }
            }
        }
        // Short texts at 1 byte per segment: every boundary is a full flush.
        let small = text(&mut rng, 3_000);
        for level in 1..=9 {
            let stream = encode_zlib_parallel(&small, level, 1, 2).unwrap();
            assert_eq!(inflate(&stream).unwrap(), small);
            cases.push((stream, &small));
        }
        let _ = python_decodes(&cases, true);
    }

    #[test]
    fn segments_assemble_in_any_order() {
        let data = mixed(3, 2_000_000, 10_000, 300_000);
        let chunks: Vec<&[u8]> = data.chunks(250_000).collect();
        // Compress back to front, as workers might finish.
        let mut segments: Vec<Option<Segment>> = vec![None; chunks.len()];
        for i in (0..chunks.len()).rev() {
            segments[i] = Some(compress_segment(chunks[i], 1, i + 1 == chunks.len()).unwrap());
        }
        let segments: Vec<Segment> = segments.into_iter().map(Option::unwrap).collect();
        assert_eq!(combined_adler(&segments), adler32(ADLER32_INIT, &data));
        let stream = assemble(1, &segments);
        assert_eq!(inflate(&stream).unwrap(), data);
        assert_eq!(stream, encode_zlib_parallel(&data, 1, 250_000, 1).unwrap());
        assert_eq!(stream, encode_zlib_parallel(&data, 1, 250_000, 3).unwrap());
    }

    /// A segment that is half text, half random: the text is compressed and the random half
    /// stored (not run through deflate, which would grow it by about 6%), and it decodes.
    #[test]
    fn a_mixed_segment_stores_its_random_pieces() {
        let mut rng = Rng(11);
        let words = text(&mut rng, 4 * PIECE_BYTES);
        let random = rng.bytes(4 * PIECE_BYTES);
        let data = [words.as_slice(), random.as_slice()].concat();
        let text_alone = compress_segment(&words, 1, false).unwrap().deflate.len();
        let s = compress_segment(&data, 1, true).unwrap();
        assert_eq!(s.kind, SegmentKind::Compressed);
        assert!(
            s.deflate.len() <= text_alone + stored_len(random.len(), true) + 64,
            "{} bytes: the random half was not stored",
            s.deflate.len()
        );
        let stream = assemble(1, std::slice::from_ref(&s));
        assert_eq!(inflate(&stream).unwrap(), data);
    }

    #[test]
    fn random_segments_are_stored_and_text_compressed() {
        let mut rng = Rng(9);
        let random = rng.bytes(SAMPLE_MIN_SEGMENT * 2 + 3);
        let s = compress_segment(&random, 1, false).unwrap();
        assert_eq!(s.kind, SegmentKind::Stored);
        assert_eq!(s.deflate.len(), stored_len(random.len(), false));
        // Small random segments: compressed, compared, then stored.
        let s = compress_segment(&random[..5_000], 6, true).unwrap();
        assert_eq!(s.kind, SegmentKind::Stored);
        assert_eq!(s.deflate.len(), 5_005);
        assert_eq!(s.deflate[0], 0x01, "BFINAL on the last stored block");
        let words = text(&mut rng, 500_000);
        let s = compress_segment(&words, 1, false).unwrap();
        assert_eq!(s.kind, SegmentKind::Compressed);
        assert!(s.deflate.len() < words.len() / 2);
        // A full flush ends with an empty stored block: 00 00 ff ff after the header bits.
        assert_eq!(s.deflate[s.deflate.len() - 4..], [0x00, 0x00, 0xff, 0xff]);
        // Segments of one stored block each, compressed and compared (too short to sample).
        let stream = encode_zlib_parallel(&random[..4 * 65_535], 1, 65_535, 2).unwrap();
        assert_eq!(stream.len(), 2 + stored_len(4 * 65_535, true) + 4);
        let empty = encode_zlib_parallel(&[], 1, 1 << 20, 2).unwrap();
        // An empty fixed-Huffman final block, as zlib.compress(b"", 1) writes it.
        assert_eq!(empty, [0x78, 0x01, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
        let empty = encode_zlib_parallel(&[], 0, 1 << 20, 2).unwrap();
        assert_eq!(empty, [0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01]);
    }

    #[test]
    fn corruption_fails_to_decode() {
        let data = mixed(11, 600_000, 5_000, 100_000);
        let stream = encode_zlib_parallel(&data, 1, 100_000, 2).unwrap();
        let mut rng = Rng(5);
        let mut bad = Vec::new();
        for _ in 0..20 {
            let mut s = stream.clone();
            let at = 2 + rng.below(s.len() as u64 - 2) as usize;
            s[at] ^= 1 << rng.below(8);
            bad.push(s);
        }
        let mut trailer = stream.clone();
        *trailer.last_mut().unwrap() ^= 0x80;
        bad.push(trailer);
        bad.push(stream[..stream.len() - 1].to_vec());
        for s in &bad {
            assert!(!inflate(s).is_ok_and(|out| out == data), "corruption went unnoticed");
        }
        let cases: Vec<(Vec<u8>, &[u8])> = bad.into_iter().map(|s| (s, &data[..])).collect();
        let _ = python_decodes(&cases, false);
    }

    /// This process's user + system CPU seconds (all threads), from /proc/self/stat.
    fn cpu_secs() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Best wall seconds of `runs`, the result of the last run, CPU seconds per run.
    fn best_secs(runs: usize, mut f: impl FnMut() -> usize) -> (f64, usize, f64) {
        let mut best = f64::MAX;
        let mut size = 0;
        let cpu = cpu_secs();
        for _ in 0..runs {
            let t = Instant::now();
            size = std::hint::black_box(f());
            best = best.min(t.elapsed().as_secs_f64());
        }
        (best, size, (cpu_secs() - cpu) / runs as f64)
    }

    /// Throughput and size of one stream vs segments, printed (`cargo test --release --lib
    /// cinder::zlib_segments::tests::measure -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure() {
        let mib = |secs: f64, n: usize| n as f64 / secs / f64::from(1 << 20);
        let n = 50 << 20;
        let level = 1;
        for (name, data) in [
            ("mixed runs 1-16 MiB", mixed(1, n, 1 << 20, 16 << 20)),
            ("mixed runs 4-256 KiB", mixed(2, n, 4 << 10, 256 << 10)),
            ("text", text(&mut Rng(3), n)),
        ] {
            let (secs, single, cpu) = best_secs(3, || {
                super::super::codec::compress_level(Algorithm::Zlib, &data, level).unwrap().len()
            });
            println!(
                "{name}: single stream level {level}: {single} bytes ({:.2}%), {:.0} MiB/s, \
                 {:.0} MiB per CPU second",
                100.0 * single as f64 / n as f64,
                mib(secs, n),
                mib(cpu, n)
            );
            for segment in [256 << 10, 1 << 20, 4 << 20] {
                for threads in [1, 2] {
                    let (secs, size, cpu) = best_secs(3, || {
                        encode_zlib_parallel(&data, level, segment, threads).unwrap().len()
                    });
                    println!(
                        "  segments {:>4} KiB x {threads} threads: {size} bytes ({:+.3}% vs single), {:.0} MiB/s, {:.0} MiB per CPU second",
                        segment >> 10,
                        100.0 * (size as f64 - single as f64) / single as f64,
                        mib(secs, n),
                        mib(cpu, n)
                    );
                }
            }
            // What priming each segment with the preceding 32 KiB would win back (not used).
            for segment in [256 << 10, 1 << 20] {
                let mut primed = 0;
                let mut out = Vec::new();
                for (i, chunk) in data.chunks(segment).enumerate() {
                    let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
                    let start = i * segment;
                    let _ = c.set_dictionary(&data[start.saturating_sub(32 << 10)..start]).unwrap();
                    out.clear();
                    out.reserve(segment_bound(chunk.len()));
                    let _ = c.compress_vec(chunk, &mut out, flate2::FlushCompress::Finish).unwrap();
                    primed += out.len().min(stored_len(chunk.len(), true));
                }
                println!(
                    "  primed with 32 KiB, segments {} KiB: {primed} deflate bytes",
                    segment >> 10
                );
            }
        }
        let mut rng = Rng(4);
        let random = rng.bytes(1 << 20);
        let words = text(&mut rng, 1 << 20);
        let deflate = |data: &[u8]| {
            let mut c = flate2::Compress::new(flate2::Compression::new(1), false);
            let mut out = Vec::with_capacity(segment_bound(data.len()));
            let _ = c.compress_vec(data, &mut out, flate2::FlushCompress::Finish).unwrap();
            out.len()
        };
        let (secs, _, _) = best_secs(5, || deflate(&random));
        println!(
            "1 MiB random, level-1 deflate (compress and compare): {:.0} MiB/s",
            mib(secs, 1 << 20)
        );
        let (secs, _, _) = best_secs(5, || deflate(&words));
        println!("1 MiB text, level-1 deflate: {:.0} MiB/s", mib(secs, 1 << 20));
        let (secs, _, _) = best_secs(5, || usize::from(looks_incompressible(&random)));
        println!("1 MiB random, 3 samples: {:.0} MiB/s", mib(secs, 1 << 20));
        let (secs, _, _) =
            best_secs(5, || compress_segment(&random, 1, false).unwrap().deflate.len());
        println!(
            "1 MiB random, compress_segment (samples, stored, adler): {:.0} MiB/s",
            mib(secs, 1 << 20)
        );
        let big = rng.bytes(n);
        let (secs, _, _) = best_secs(3, || adler32(ADLER32_INIT, &big) as usize);
        println!("adler32: {:.0} MiB/s", mib(secs, n));
    }
}
