//! Compression as Cinder's `ChunkedBackupDriver` does it: the names it writes, the libraries and
//! levels behind them, the "store raw when it does not shrink" rule, and decompression that
//! accepts everything `_get_compressor` accepts.
//!
//! Formats on the wire (what Cinder's Python reads and writes):
//! - `zlib` and `gzip`: `zlib.compress(data)`, an RFC 1950 zlib stream at level 6 (header
//!   `78 9c`); "gzip" is only a name, never the gzip format.
//! - `bz2` and `bzip2`: `bz2.compress(data)`, one bzip2 stream at level 9 (`BZh9`).
//! - `zstd`: python-zstd's `compress(data)`, one frame at level 3 with the content size in
//!   the header (python-zstd sizes its output buffer from it).

use std::borrow::Cow;
use std::fmt;
use std::io::Read as _;

use super::error::CinderError;

/// zlib level of Python's `zlib.compress(data)` (`Z_DEFAULT_COMPRESSION` is level 6).
pub const ZLIB_LEVEL: u32 = 6;
/// bzip2 block size of Python's `bz2.compress(data)` (`compresslevel=9`).
pub const BZ2_LEVEL: u32 = 9;
/// zstd level of python-zstd's `compress(data)` (its default, 3).
pub const ZSTD_LEVEL: i32 = 3;

/// A value of `backup_compression_algorithm`, or of an object's `compression` field, keeping the
/// exact spelling: Cinder writes the configured name lower-cased, so `gzip` and `bzip2` appear in
/// metadata as themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// `none`, `off`, `no` (written as `none`): stored raw.
    None,
    /// `zlib`.
    Zlib,
    /// `gzip`: a zlib stream under another name.
    Gzip,
    /// `bz2`.
    Bz2,
    /// `bzip2`: bz2 under another name.
    Bzip2,
    /// `zstd`.
    Zstd,
}

/// The format family an [`Algorithm`] stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Raw bytes.
    Raw,
    /// RFC 1950 zlib stream.
    Zlib,
    /// bzip2 stream(s).
    Bzip2,
    /// zstd frame(s).
    Zstd,
}

impl Algorithm {
    /// Parses a name as `_get_compressor` does: case-insensitive; `none`, `off` and `no` mean raw.
    ///
    /// # Errors
    /// [`CinderError::UnsupportedCompression`] for any other name (Cinder raises `ValueError`).
    pub fn from_name(name: &str) -> Result<Algorithm, CinderError> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "none" | "off" | "no" => Algorithm::None,
            "zlib" => Algorithm::Zlib,
            "gzip" => Algorithm::Gzip,
            "bz2" => Algorithm::Bz2,
            "bzip2" => Algorithm::Bzip2,
            "zstd" => Algorithm::Zstd,
            _ => return Err(CinderError::UnsupportedCompression { name: name.to_owned() }),
        })
    }

    /// The name Cinder writes in an object's `compression` for data this algorithm compressed.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::None => "none",
            Algorithm::Zlib => "zlib",
            Algorithm::Gzip => "gzip",
            Algorithm::Bz2 => "bz2",
            Algorithm::Bzip2 => "bzip2",
            Algorithm::Zstd => "zstd",
        }
    }

    /// The on-wire format.
    pub fn codec(self) -> Codec {
        match self {
            Algorithm::None => Codec::Raw,
            Algorithm::Zlib | Algorithm::Gzip => Codec::Zlib,
            Algorithm::Bz2 | Algorithm::Bzip2 => Codec::Bzip2,
            Algorithm::Zstd => Codec::Zstd,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One data object's body as Cinder would store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded<'a> {
    /// What goes in the object's `compression`: the configured algorithm, or
    /// [`Algorithm::None`] when compression did not shrink the data.
    pub compression: Algorithm,
    /// The object body: compressed bytes, or the raw input itself.
    pub body: Cow<'a, [u8]>,
}

/// `_prepare_output_data`: compresses `raw` with `algorithm` and keeps the raw bytes (named
/// `none`) when the result is not strictly smaller.
///
/// # Errors
/// [`CinderError::Compress`] if a library fails on the in-memory buffer.
pub fn encode(algorithm: Algorithm, raw: &[u8]) -> Result<Encoded<'_>, CinderError> {
    encode_with(algorithm, raw, ZLIB_LEVEL, false)
}

/// Bytes per sample of `looks_incompressible` (and of the Cinder backup job's own sampling of
/// objects spread over several read buffers).
pub const SAMPLE_BYTES: usize = 16 << 10;

/// Whether zlib at level 1 cannot shrink `sample` below 97%: it is random-like.
pub fn sample_incompressible(sample: &[u8]) -> bool {
    let mut c = flate2::Compress::new(flate2::Compression::new(1), true);
    let mut out = Vec::with_capacity(sample.len() + 1024);
    match c.compress_vec(sample, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => out.len() * 100 >= sample.len() * 97,
        _ => false,
    }
}

/// Three samples (start, middle, end) that zlib at level 1 cannot shrink below 97%: the object
/// is random-like, and compressing it whole would only confirm that.
fn looks_incompressible(raw: &[u8]) -> bool {
    if raw.len() < SAMPLE_BYTES * 8 {
        return false;
    }
    [0, raw.len() / 2, raw.len() - SAMPLE_BYTES]
        .iter()
        .all(|&start| sample_incompressible(&raw[start..start + SAMPLE_BYTES]))
}

/// `encode` with ferry's speed choices: `zlib_level` for zlib/gzip (Cinder uses 6; every level
/// decodes the same), and with `skip_incompressible` an object whose samples do not compress is
/// stored raw (`none`) without a full pass; Cinder would compress it and, as it does not shrink,
/// store it raw too.
///
/// # Errors
/// [`CinderError::Compress`] if a library fails on the in-memory buffer.
pub fn encode_with(
    algorithm: Algorithm,
    raw: &[u8],
    zlib_level: u32,
    skip_incompressible: bool,
) -> Result<Encoded<'_>, CinderError> {
    if algorithm.codec() == Codec::Raw || (skip_incompressible && looks_incompressible(raw)) {
        return Ok(Encoded { compression: Algorithm::None, body: Cow::Borrowed(raw) });
    }
    let compressed = compress_level(algorithm, raw, zlib_level)?;
    if compressed.len() >= raw.len() {
        return Ok(Encoded { compression: Algorithm::None, body: Cow::Borrowed(raw) });
    }
    Ok(Encoded { compression: algorithm, body: Cow::Owned(compressed) })
}

/// Compresses `raw` exactly as Cinder's library call for `algorithm` would (no raw fallback; see
/// [`encode`]). Raw returns a copy.
///
/// # Errors
/// [`CinderError::Compress`] if a library fails on the in-memory buffer.
pub fn compress(algorithm: Algorithm, raw: &[u8]) -> Result<Vec<u8>, CinderError> {
    compress_level(algorithm, raw, ZLIB_LEVEL)
}

/// `compress` with a zlib level of the caller's choice (zlib and gzip only).
///
/// # Errors
/// [`CinderError::Compress`] if a library fails on the in-memory buffer.
pub fn compress_level(
    algorithm: Algorithm,
    raw: &[u8],
    zlib_level: u32,
) -> Result<Vec<u8>, CinderError> {
    let fail = |reason: String| CinderError::Compress { algorithm, reason };
    match algorithm.codec() {
        Codec::Raw => Ok(raw.to_vec()),
        Codec::Zlib => {
            let mut c = flate2::Compress::new(flate2::Compression::new(zlib_level.min(9)), true);
            // compressBound of zlib: always enough for one Finish call.
            let bound = raw.len() + (raw.len() >> 12) + (raw.len() >> 14) + (raw.len() >> 25) + 64;
            let mut out = Vec::with_capacity(bound);
            match c.compress_vec(raw, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(out),
                Ok(status) => Err(fail(format!("stream not finished ({status:?})"))),
                Err(e) => Err(fail(e.to_string())),
            }
        }
        Codec::Bzip2 => {
            let mut out = Vec::with_capacity(raw.len() / 2 + 1024);
            let mut enc = bzip2::read::BzEncoder::new(raw, bzip2::Compression::new(BZ2_LEVEL));
            let _ = enc.read_to_end(&mut out).map_err(|e| fail(e.to_string()))?;
            Ok(out)
        }
        Codec::Zstd => {
            // One-shot ZSTD_compressCCtx: a single frame with Frame_Content_Size set.
            zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|e| fail(e.to_string()))
        }
    }
}

/// Decompresses an object body named `algorithm`, the way Cinder's restore reads it: zlib decodes
/// one stream and ignores trailing bytes (`zlib.decompress`), bzip2 decodes concatenated streams
/// and ignores trailing bytes that are not a stream (`bz2.decompress`), zstd decodes concatenated
/// frames. With `expected_len` (the metadata `length`) the result must have that length.
///
/// # Errors
/// [`CinderError::Decompress`] on corrupt or truncated data, [`CinderError::LengthMismatch`] when
/// the length differs from `expected_len`.
pub fn decompress(
    algorithm: Algorithm,
    body: &[u8],
    expected_len: Option<u64>,
) -> Result<Vec<u8>, CinderError> {
    let fail = |reason: String| CinderError::Decompress { algorithm, reason };
    let hint = expected_len.and_then(|l| usize::try_from(l).ok());
    let out = match algorithm.codec() {
        Codec::Raw => body.to_vec(),
        Codec::Zlib => inflate_zlib(body, hint).map_err(fail)?,
        Codec::Bzip2 => bunzip2(body, hint).map_err(fail)?,
        Codec::Zstd => match hint {
            // Known size: one allocation, and a frame that claims more fails here.
            Some(n) => zstd::bulk::decompress(body, n).map_err(|e| fail(e.to_string()))?,
            None => zstd::stream::decode_all(body).map_err(|e| fail(e.to_string()))?,
        },
    };
    if let Some(expected) = expected_len
        && out.len() as u64 != expected
    {
        return Err(CinderError::LengthMismatch { expected, actual: out.len() as u64 });
    }
    Ok(out)
}

/// One zlib stream; bytes after its end are ignored, as `zlib.decompress` does.
fn inflate_zlib(body: &[u8], hint: Option<usize>) -> Result<Vec<u8>, String> {
    let mut d = flate2::Decompress::new(true);
    let mut out = Vec::with_capacity(hint.unwrap_or(body.len().saturating_mul(4)).max(64));
    loop {
        let consumed = usize::try_from(d.total_in()).map_err(|e| e.to_string())?;
        let input = body.get(consumed..).unwrap_or(&[]);
        let before = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|e| e.to_string())?;
        match status {
            flate2::Status::StreamEnd => return Ok(out),
            _ if out.len() == out.capacity() => out.reserve(out.capacity().max(64)),
            _ if (d.total_in(), d.total_out()) == before => {
                return Err("incomplete or truncated stream".to_owned());
            }
            _ => {}
        }
    }
}

/// bzip2 streams back to back; like `bz2.decompress`, data after at least one complete stream
/// that is not itself a stream is ignored, and a stream cut short is an error.
fn bunzip2(body: &[u8], hint: Option<usize>) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(hint.unwrap_or(body.len().saturating_mul(4)).max(64));
    let mut rest = body;
    let mut streams = 0usize;
    while !rest.is_empty() {
        let mut d = bzip2::Decompress::new(false);
        let mark = out.len();
        let mut ended = false;
        loop {
            let consumed = usize::try_from(d.total_in()).map_err(|e| e.to_string())?;
            let input = rest.get(consumed..).unwrap_or(&[]);
            let before = (d.total_in(), d.total_out());
            match d.decompress_vec(input, &mut out) {
                Ok(bzip2::Status::StreamEnd) => {
                    ended = true;
                    break;
                }
                Ok(_) if out.len() == out.capacity() => out.reserve(out.capacity().max(64)),
                Ok(_) if (d.total_in(), d.total_out()) == before => break,
                Ok(_) => {}
                Err(_) if streams > 0 => {
                    out.truncate(mark);
                    return Ok(out);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if !ended {
            return Err("compressed data ended before the end-of-stream marker".to_owned());
        }
        streams += 1;
        let consumed = usize::try_from(d.total_in()).map_err(|e| e.to_string())?;
        rest = rest.get(consumed..).unwrap_or(&[]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        let words = ["volume ", "backup ", "cinder ", "ferry ", "block\n", "0123 "];
        let mut out = Vec::with_capacity(n + 8);
        let mut i = 0usize;
        while out.len() < n {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(n);
        out
    }

    fn random(n: usize) -> Vec<u8> {
        let mut s = 0x2545_f491_4f6c_dd1d_u64;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s.to_le_bytes()[3]
            })
            .collect()
    }

    /// Every name Cinder accepts parses case-insensitively and keeps its spelling when written.
    #[test]
    fn names() {
        for (n, a, w) in [
            ("none", Algorithm::None, "none"),
            ("OFF", Algorithm::None, "none"),
            ("No", Algorithm::None, "none"),
            ("zlib", Algorithm::Zlib, "zlib"),
            ("GZIP", Algorithm::Gzip, "gzip"),
            ("bz2", Algorithm::Bz2, "bz2"),
            ("bzip2", Algorithm::Bzip2, "bzip2"),
            ("Zstd", Algorithm::Zstd, "zstd"),
        ] {
            let got = Algorithm::from_name(n).unwrap();
            assert_eq!(got, a);
            assert_eq!(got.name(), w);
        }
        assert!(matches!(
            Algorithm::from_name("lz4"),
            Err(CinderError::UnsupportedCompression { .. })
        ));
        assert_eq!(Algorithm::Gzip.codec(), Codec::Zlib);
        assert_eq!(Algorithm::Bzip2.codec(), Codec::Bzip2);
    }

    /// Each algorithm round-trips, has the stream header Cinder's Python expects, and falls back
    /// to raw (`none`) on incompressible data.
    #[test]
    fn encode_round_trip_and_headers() {
        let t = text(300_000);
        let r = random(100_000);
        for a in
            [Algorithm::Zlib, Algorithm::Gzip, Algorithm::Bz2, Algorithm::Bzip2, Algorithm::Zstd]
        {
            let e = encode(a, &t).unwrap();
            assert_eq!(e.compression, a);
            assert!(e.body.len() < t.len());
            match a.codec() {
                Codec::Zlib => assert_eq!(&e.body[..2], &[0x78, 0x9c]),
                Codec::Bzip2 => assert_eq!(&e.body[..4], b"BZh9"),
                Codec::Zstd => assert_eq!(
                    zstd::zstd_safe::get_frame_content_size(&e.body).unwrap(),
                    Some(t.len() as u64)
                ),
                Codec::Raw => unreachable!(),
            }
            assert_eq!(decompress(a, &e.body, Some(t.len() as u64)).unwrap(), t);
            assert_eq!(decompress(a, &e.body, None).unwrap(), t);
            let e = encode(a, &r).unwrap();
            assert_eq!(e.compression, Algorithm::None);
            assert_eq!(&*e.body, &r[..]);
        }
        let e = encode(Algorithm::None, &t).unwrap();
        assert_eq!((e.compression, &*e.body), (Algorithm::None, &t[..]));
        assert_eq!(encode(Algorithm::Zlib, b"").unwrap().compression, Algorithm::None);
    }

    /// Decompression follows Python's edge behaviour: zlib ignores trailing bytes and fails on a
    /// cut stream; bz2 reads concatenated streams and ignores trailing garbage; zstd reads
    /// concatenated frames; a wrong length is reported.
    #[test]
    fn decompress_edges() {
        let t = text(200_000);
        let mut z = compress(Algorithm::Zlib, &t).unwrap();
        let cut = z[..z.len() - 3].to_vec();
        assert!(matches!(
            decompress(Algorithm::Zlib, &cut, None),
            Err(CinderError::Decompress { .. })
        ));
        z.extend_from_slice(b"junk");
        assert_eq!(decompress(Algorithm::Gzip, &z, None).unwrap(), t);

        let mut b = compress(Algorithm::Bz2, &t[..1000]).unwrap();
        b.extend(compress(Algorithm::Bz2, &t[1000..]).unwrap());
        assert_eq!(decompress(Algorithm::Bzip2, &b, None).unwrap(), t);
        b.extend_from_slice(b"junk");
        assert_eq!(decompress(Algorithm::Bz2, &b, None).unwrap(), t);
        let cut = compress(Algorithm::Bz2, &t).unwrap();
        assert!(decompress(Algorithm::Bz2, &cut[..cut.len() - 10], None).is_err());
        assert!(decompress(Algorithm::Bz2, b"junk", None).is_err());

        let mut f = compress(Algorithm::Zstd, &t[..5000]).unwrap();
        f.extend(compress(Algorithm::Zstd, &t[5000..]).unwrap());
        assert_eq!(decompress(Algorithm::Zstd, &f, None).unwrap(), t);
        assert_eq!(decompress(Algorithm::Zstd, &f, Some(t.len() as u64)).unwrap(), t);

        assert!(matches!(
            decompress(Algorithm::None, b"abc", Some(4)),
            Err(CinderError::LengthMismatch { expected: 4, actual: 3 })
        ));
        let z = compress(Algorithm::Zlib, &t).unwrap();
        assert!(matches!(
            decompress(Algorithm::Zlib, &z, Some(5)),
            Err(CinderError::LengthMismatch { .. })
        ));
    }

    // Random objects are recognised from samples and stored raw; text is compressed at the
    // chosen level and decodes to the original.
    #[test]
    fn encode_with_skips_random_and_compresses_text() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let encoded = encode_with(Algorithm::Zlib, &random, 1, true).unwrap();
        assert_eq!(encoded.compression, Algorithm::None);
        let text = b"the quick brown fox jumps over the lazy volume ".repeat(1 << 15);
        let encoded = encode_with(Algorithm::Gzip, &text, 1, true).unwrap();
        assert_eq!(encoded.compression, Algorithm::Gzip);
        let back = decompress(Algorithm::Gzip, &encoded.body, Some(text.len() as u64)).unwrap();
        assert_eq!(back, text);
    }
}
