//! Pack records: the unit a pack object is made of. Each record is a 64-byte header followed by
//! the chunk's stored bytes (zstd frame or raw). The header repeats the chunk hash and lengths
//! the index holds, carries an xxh3-64 checksum of the stored bytes, and checksums itself, so a
//! ranged GET of one record can be verified on its own before anything is decompressed.
//!
//! Header layout (little-endian): magic `FRCK` (4), encoding (1), reserved zero (3),
//! raw length (4), stored length (4), keyed BLAKE3 hash (32), xxh3-64 of stored bytes (8),
//! xxh3-64 of the preceding 56 header bytes (8).

use twox_hash::XxHash3_64;

use super::{ChunkHash, FormatError, crypt::SEALED_FLAG};

/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 4] = b"FRCK";

/// How a chunk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Stored as is (compression did not shrink it).
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// A verified record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// How the stored bytes are encoded.
    pub encoding: Encoding,
    /// Whether the stored bytes are sealed (format version 2, `crypt.rs`).
    pub sealed: bool,
    /// Uncompressed length.
    pub raw_bytes: u32,
    /// Stored length (after the header).
    pub stored_bytes: u32,
    /// Keyed BLAKE3 of the uncompressed bytes.
    pub hash: ChunkHash,
    /// xxh3-64 of the stored bytes.
    pub data_checksum: u64,
}

impl RecordHeader {
    /// The encoding byte: the encoding, with `SEALED_FLAG` when sealed.
    pub fn encoding_byte(&self) -> u8 {
        self.encoding as u8 | if self.sealed { SEALED_FLAG } else { 0 }
    }
}

/// Builds the header for `stored` bytes of a chunk (`sealed`: sealed by `Crypt::seal_record`).
pub fn encode_record_header(
    hash: &ChunkHash,
    (encoding, sealed): (Encoding, bool),
    raw_bytes: u32,
    stored: &[u8],
) -> [u8; RECORD_HEADER_BYTES] {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[0..4].copy_from_slice(MAGIC);
    header[4] = encoding as u8 | if sealed { SEALED_FLAG } else { 0 };
    header[8..12].copy_from_slice(&raw_bytes.to_le_bytes());
    let stored_bytes = u32::try_from(stored.len()).expect("a chunk is far below 4 GiB");
    header[12..16].copy_from_slice(&stored_bytes.to_le_bytes());
    header[16..48].copy_from_slice(&hash.0);
    header[48..56].copy_from_slice(&XxHash3_64::oneshot(stored).to_le_bytes());
    let header_checksum = XxHash3_64::oneshot(&header[..56]);
    header[56..64].copy_from_slice(&header_checksum.to_le_bytes());
    header
}

/// Verifies one record (`bytes` = header + stored data, exactly) and returns its header and
/// stored bytes. `what` names the record in errors (pack key and offset).
///
/// # Errors
/// `FormatError` when the header or the data checksum does not verify.
pub fn decode_record<'a>(
    what: &str,
    bytes: &'a [u8],
) -> Result<(RecordHeader, &'a [u8]), FormatError> {
    let (header, data) = decode_record_header(what, bytes)?;
    let actual = XxHash3_64::oneshot(data);
    if actual != header.data_checksum {
        return Err(FormatError::Corrupt {
            what: what.to_string(),
            detail: format!(
                "xxh3-64 mismatch: header {:016x}, data {actual:016x}",
                header.data_checksum
            ),
        });
    }
    Ok((header, data))
}

/// `decode_record` without the xxh3 of the stored data, for a caller that verifies the decoded
/// chunk against its keyed BLAKE3 name anyway (restore): that check is strictly stronger, and
/// skipping the weaker one saves a pass over every byte.
///
/// # Errors
/// `FormatError` when the header does not verify or the length is wrong.
pub fn decode_record_header<'a>(
    what: &str,
    bytes: &'a [u8],
) -> Result<(RecordHeader, &'a [u8]), FormatError> {
    let corrupt = |detail: String| FormatError::Corrupt { what: what.to_string(), detail };
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(FormatError::Truncated {
            what: what.to_string(),
            detail: format!("{} bytes, a record header needs {RECORD_HEADER_BYTES}", bytes.len()),
        });
    }
    let header = &bytes[..RECORD_HEADER_BYTES];
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if &header[0..4] != MAGIC {
        return Err(corrupt("record magic mismatch".into()));
    }
    if XxHash3_64::oneshot(&header[..56]) != u64_at(56) {
        return Err(corrupt("record header checksum mismatch".into()));
    }
    let encoding = match header[4] & !SEALED_FLAG {
        0 => Encoding::Raw,
        1 => Encoding::Zstd,
        other => return Err(corrupt(format!("unknown record encoding {other}"))),
    };
    let stored_bytes = u32_at(12);
    let data = &bytes[RECORD_HEADER_BYTES..];
    if data.len() as u64 != u64::from(stored_bytes) {
        return Err(FormatError::Truncated {
            what: what.to_string(),
            detail: format!("{} stored bytes, header says {stored_bytes}", data.len()),
        });
    }
    let data_checksum = u64_at(48);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&header[16..48]);
    let record = RecordHeader {
        encoding,
        sealed: header[4] & SEALED_FLAG != 0,
        raw_bytes: u32_at(8),
        stored_bytes,
        hash: ChunkHash(hash),
        data_checksum,
    };
    Ok((record, data))
}

/// Scans the complete records at the start of `bytes`, which begin at `offset` in the pack named
/// `what`, verifying each one in full; returns their index entries and the bytes they span. A
/// record cut off by the end of `bytes` ends the scan (the caller reads on from there).
///
/// # Errors
/// `FormatError` at the first record that does not verify: the pack cannot be trusted past it.
pub fn scan_records(
    what: &str,
    bytes: &[u8],
    offset: u64,
) -> Result<(Vec<super::IndexEntry>, usize), FormatError> {
    let mut entries = Vec::new();
    let mut position = 0usize;
    while bytes.len() - position >= RECORD_HEADER_BYTES {
        let at = offset + position as u64;
        let header = &bytes[position..position + RECORD_HEADER_BYTES];
        let stored_bytes = peek_stored_bytes(&format!("{what} at offset {at}"), header)?;
        let end = position + RECORD_HEADER_BYTES + stored_bytes as usize;
        if end > bytes.len() {
            break;
        }
        let (record, _) = decode_record(&format!("{what} at offset {at}"), &bytes[position..end])?;
        entries.push(super::IndexEntry {
            hash: record.hash,
            offset: at,
            stored_bytes: record.stored_bytes,
            raw_bytes: record.raw_bytes,
        });
        position = end;
    }
    Ok((entries, position))
}

/// The stored length a record header announces, after checking its magic and checksum.
fn peek_stored_bytes(what: &str, header: &[u8]) -> Result<u32, FormatError> {
    let corrupt =
        |detail: &str| FormatError::Corrupt { what: what.to_string(), detail: detail.into() };
    if &header[0..4] != MAGIC {
        return Err(corrupt("record magic mismatch"));
    }
    let checksum = u64::from_le_bytes(header[56..64].try_into().expect("8 bytes"));
    if XxHash3_64::oneshot(&header[..56]) != checksum {
        return Err(corrupt("record header checksum mismatch"));
    }
    Ok(u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The checksums are part of the on-disk format: pin XXH3 against known answers (computed
    // with the reference-compatible xxhash-rust 0.8.21), for short inputs and for the long-input
    // path that runs on SIMD (AVX2 or SSE2, picked at run time).
    #[test]
    fn xxh3_matches_known_answers() {
        let data: Vec<u8> =
            (0..(1u32 << 20) + 7).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let cases: [(usize, u64, u128); 4] = [
            (0, 0x2d06_8005_38d3_94c2, 0x99aa_06d3_0147_98d8_6001_c324_468d_497f),
            (100, 0xad1e_77ff_670a_2548, 0x0938_6db4_4501_f7e4_aced_ade9_575c_6f25),
            (4096, 0x84d9_e7ce_664c_8217, 0x0c26_3f43_5125_4510_84d9_e7ce_664c_8217),
            (data.len(), 0xa80b_ea05_3044_86e6, 0x8119_ab39_9ae5_fb2c_a80b_ea05_3044_86e6),
        ];
        for (len, xxh3_64, xxh3_128) in cases {
            assert_eq!(XxHash3_64::oneshot(&data[..len]), xxh3_64, "xxh3-64 of {len} bytes");
            let wide = twox_hash::XxHash3_128::oneshot(&data[..len]);
            assert_eq!(wide, xxh3_128, "xxh3-128 of {len} bytes");
        }
    }

    // A record round-trips, and any flipped byte in header or data is reported.
    #[test]
    fn record_detects_every_flipped_byte() {
        let hash = ChunkHash([7; 32]);
        let data = b"some stored bytes of a chunk".to_vec();
        let mut record = encode_record_header(&hash, (Encoding::Zstd, false), 4096, &data).to_vec();
        record.extend_from_slice(&data);
        let (header, stored) = decode_record("r", &record).unwrap();
        assert_eq!(header.hash, hash);
        assert_eq!(header.raw_bytes, 4096);
        assert_eq!(header.encoding, Encoding::Zstd);
        assert_eq!(stored, &data[..]);
        for position in 0..record.len() {
            let mut bad = record.clone();
            bad[position] ^= 0x80;
            assert!(decode_record("r", &bad).is_err(), "byte {position}");
        }
        assert!(decode_record("r", &record[..record.len() - 1]).is_err());
    }

    // The records of a pack rebuild exactly the entries its writer indexed; a cut-off record
    // ends the scan, a damaged one stops it with an error naming its offset.
    #[test]
    fn scanning_rebuilds_the_index() {
        let mut pack = Vec::new();
        let mut expected = Vec::new();
        for (n, length) in [10usize, 3000, 1].into_iter().enumerate() {
            let data = vec![n as u8; length];
            let hash = ChunkHash([n as u8; 32]);
            let offset = pack.len() as u64;
            pack.extend_from_slice(&encode_record_header(
                &hash,
                (Encoding::Raw, false),
                4096,
                &data,
            ));
            pack.extend_from_slice(&data);
            expected.push(crate::native::layout::IndexEntry {
                hash,
                offset,
                stored_bytes: length as u32,
                raw_bytes: 4096,
            });
        }
        let (entries, used) = scan_records("p", &pack, 0).unwrap();
        assert_eq!((entries, used), (expected.clone(), pack.len()));
        let (entries, used) = scan_records("p", &pack[..pack.len() - 1], 0).unwrap();
        assert_eq!((entries.len(), used as u64), (2, expected[2].offset));
        let (entries, _) = scan_records("p", &pack[74..], 74).unwrap();
        assert_eq!(entries, expected[1..]);
        let mut bad = pack.clone();
        bad[74 + 64 + 5] ^= 1;
        let error = scan_records("p", &bad, 0).unwrap_err().to_string();
        assert!(error.contains("offset 74"), "{error}");
    }
}
