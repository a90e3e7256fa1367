//! Compression policy for chunks: zstd at a fixed level, kept raw when compression would not
//! shrink the chunk. Incompressible chunks are recognised from three small samples before any
//! full pass, so random data costs a few percent of a zstd pass instead of a whole one.
//! Pure, no I/O: a `Compressor` is owned by one worker thread and reuses its zstd context.

use crate::native::layout::{Crypt, Encoding, RecordHeader};

/// Default zstd level: 1. Compression is the data plane's CPU bottleneck (see perf/README.md);
/// level 3 costs about twice the CPU for some 15% better ratio on block data.
pub const LEVEL_DEFAULT: i32 = 1;
/// Bytes per sample when probing compressibility.
const SAMPLE_BYTES: usize = 16 << 10;
/// A sample that compresses to more than this fraction (in 1/1000) counts as incompressible.
const SAMPLE_RATIO_MAX_PERMILLE: usize = 970;

/// A reusable zstd compressor for one thread.
pub struct Compressor {
    level: i32,
    inner: zstd::bulk::Compressor<'static>,
    sample_out: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor").field("level", &self.level).finish()
    }
}

impl Compressor {
    /// A compressor at `level`.
    ///
    /// # Panics
    /// If zstd cannot allocate a context, which is not recoverable.
    pub fn new(level: i32) -> Compressor {
        let inner = zstd::bulk::Compressor::new(level).expect("zstd context");
        Compressor { level, inner, sample_out: Vec::with_capacity(SAMPLE_BYTES * 2) }
    }

    /// Encodes `raw` into `out` (cleared first) and says how it is stored.
    ///
    /// # Panics
    /// If zstd fails on an in-memory buffer large enough for its bound, which is a bug.
    pub fn compress(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Encoding {
        out.clear();
        if raw.len() >= SAMPLE_BYTES * 8 && self.looks_incompressible(raw) {
            out.extend_from_slice(raw);
            return Encoding::Raw;
        }
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let written =
            self.inner.compress_to_buffer(raw, out).expect("zstd with a bound-sized buffer");
        if written >= raw.len() {
            out.clear();
            out.extend_from_slice(raw);
            return Encoding::Raw;
        }
        Encoding::Zstd
    }

    /// Compresses a sample from the start, middle and end; incompressible only if all are.
    fn looks_incompressible(&mut self, raw: &[u8]) -> bool {
        let starts = [0, raw.len() / 2, raw.len() - SAMPLE_BYTES];
        starts.iter().all(|&start| {
            let sample = &raw[start..start + SAMPLE_BYTES];
            self.sample_out.clear();
            self.sample_out.reserve(zstd::zstd_safe::compress_bound(SAMPLE_BYTES));
            let written = self
                .inner
                .compress_to_buffer(sample, &mut self.sample_out)
                .expect("zstd with a bound-sized buffer");
            written * 1000 > SAMPLE_BYTES * SAMPLE_RATIO_MAX_PERMILLE
        })
    }
}

/// Decodes a stored chunk into `out` (exactly `raw_bytes` long).
///
/// # Errors
/// A message when the zstd frame is invalid or decodes to another length.
pub fn decompress(
    encoding: Encoding,
    stored: &[u8],
    raw_bytes: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let out = &mut out[..raw_bytes];
    match encoding {
        Encoding::Raw => {
            if stored.len() != raw_bytes {
                return Err(format!("raw chunk of {} bytes, expected {raw_bytes}", stored.len()));
            }
            out.copy_from_slice(stored);
        }
        Encoding::Zstd => {
            let written = zstd::bulk::decompress_to_buffer(stored, out)
                .map_err(|error| format!("zstd: {error}"))?;
            if written != raw_bytes {
                return Err(format!("zstd frame decoded to {written} bytes, expected {raw_bytes}"));
            }
        }
    }
    Ok(())
}

/// Opens (in an encrypted repository) and decodes a verified record's stored bytes into `out`
/// (exactly `header.raw_bytes` long). `scratch` holds an opened compressed chunk; a raw one is
/// opened straight into `out`.
///
/// # Errors
/// A message when the record does not authenticate or does not decode.
pub fn decode_record_data(
    crypt: &Crypt,
    header: &RecordHeader,
    stored: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let raw_bytes = usize::try_from(header.raw_bytes).expect("fits");
    match crypt.open_record(header, stored, out, scratch)? {
        Some(encoded) => decompress(header.encoding, encoded, raw_bytes, out),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    // Text compresses, random data is stored raw, and both decode to the original.
    #[test]
    fn chooses_encoding_by_content() {
        let mut compressor = Compressor::new(LEVEL_DEFAULT);
        let text = b"lorem ipsum dolor sit amet ".repeat(40_000);
        let random = random_bytes(1 << 20, 42);
        let mut out = Vec::new();
        for (raw, expected) in [(&text[..], Encoding::Zstd), (&random[..], Encoding::Raw)] {
            let encoding = compressor.compress(raw, &mut out);
            assert_eq!(encoding, expected);
            let mut back = vec![0u8; raw.len()];
            decompress(encoding, &out, raw.len(), &mut back).unwrap();
            assert_eq!(back, raw);
        }
        assert!(out.len() == random.len());
    }

    // Random data with a compressible middle still gets compressed (the samples disagree).
    #[test]
    fn partly_compressible_chunk_is_compressed() {
        let mut compressor = Compressor::new(LEVEL_DEFAULT);
        let mut raw = random_bytes(1 << 20, 7);
        raw[300_000..800_000].fill(b'a');
        let mut out = Vec::new();
        assert_eq!(compressor.compress(&raw, &mut out), Encoding::Zstd);
        assert!(out.len() < raw.len() / 2 + 100_000);
    }

    // A sealed record copied verbatim to another offset of another pack (what repacking does)
    // still opens: neither the pack nor the offset is bound. A record whose header is rewritten
    // to name another chunk (to match an index entry) does not.
    #[test]
    fn sealed_records_move_verbatim_but_not_under_another_name() {
        use crate::native::layout::crypt::{Cipher, MasterSecret, RepoKeys};
        use crate::native::layout::{self, ChunkHash};
        let crypt = Crypt::Sealed(std::sync::Arc::new(RepoKeys::derive(
            Cipher::for_this_cpu(),
            MasterSecret([8; 32]),
            crate::native::fresh::random_nonce,
        )));
        let mut compressor = Compressor::new(LEVEL_DEFAULT);
        let raw = b"block device contents ".repeat(3000);
        let hash = ChunkHash([6; 32]);
        let raw_bytes = u32::try_from(raw.len()).unwrap();
        let mut stored = Vec::new();
        let encoding = compressor.compress(&raw, &mut stored);
        crypt.seal_record(&hash, encoding, raw_bytes, &mut stored);
        let mut record =
            layout::encode_record_header(&hash, (encoding, true), raw_bytes, &stored).to_vec();
        record.extend_from_slice(&stored);
        let (mut out, mut scratch) = (vec![0u8; raw.len()], Vec::new());
        for padding in [0usize, 77, 4096] {
            let mut pack = vec![0xeeu8; padding];
            pack.extend_from_slice(&record);
            let (header, data) = layout::decode_record("moved", &pack[padding..]).unwrap();
            decode_record_data(&crypt, &header, data, &mut out, &mut scratch).unwrap();
            assert_eq!(out, raw);
        }
        let other = ChunkHash([7; 32]);
        let mut renamed =
            layout::encode_record_header(&other, (encoding, true), raw_bytes, &stored).to_vec();
        renamed.extend_from_slice(&stored);
        let (header, data) = layout::decode_record("renamed", &renamed).unwrap();
        let error = decode_record_data(&crypt, &header, data, &mut out, &mut scratch).unwrap_err();
        assert!(error.contains("authentication failed"), "{error}");
        // An unsealed record in an encrypted repository is refused, and the other way round.
        let (header, data) = layout::decode_record("moved", &record).unwrap();
        assert!(decode_record_data(&Crypt::Plain, &header, data, &mut out, &mut scratch).is_err());
    }

    #[test]
    fn corrupt_frame_is_an_error() {
        let mut out = vec![0u8; 100];
        assert!(decompress(Encoding::Zstd, b"not zstd", 100, &mut out).is_err());
        assert!(decompress(Encoding::Raw, b"short", 100, &mut out).is_err());
    }
}
