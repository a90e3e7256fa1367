//! The envelope of every small object (config, index, manifest): a fixed header with a magic
//! number, format version, object kind, encoding, decoded length and an xxh3-128 checksum of the
//! stored payload, followed by the payload (zstd-compressed JSON, or raw JSON for the config).
//! Decoding verifies all of it before returning a byte.

use twox_hash::XxHash3_128;

use super::{FORMAT_VERSION, FormatError};

const MAGIC: &[u8; 8] = b"FERRYOBJ";
/// Header: magic 8, version 2, kind 1, encoding 1, decoded length 8, checksum 16.
const HEADER_BYTES: usize = 36;
const ENCODING_RAW: u8 = 0;
const ENCODING_ZSTD: u8 = 1;
/// Small objects compress well (hex hashes, JSON) and are written rarely: level 3.
const ZSTD_LEVEL: i32 = 3;
/// A decoded object larger than this is refused (a corrupt length must not allocate wildly).
const DECODED_BYTES_MAX: u64 = 1 << 30;

/// Which document an object holds; a mismatch is an integrity error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The repository config.
    Config = 1,
    /// A pack's index.
    Index = 2,
    /// A backup's manifest.
    Manifest = 3,
    /// A garbage-collection mark: packs condemned by `prune`.
    Mark = 4,
    /// A consolidated index: many packs' index entries (`merged.rs`).
    MergedIndex = 5,
    /// A catalog: summaries of many backups, for `list` (`BackupCatalog`).
    Catalog = 6,
}

/// Wraps `payload` in an envelope, compressing it unless it is the config (kept readable).
///
/// # Panics
/// If in-memory zstd compression fails, which is a bug.
pub fn encode_object(kind: ObjectKind, payload: &[u8]) -> Vec<u8> {
    let (encoding, stored) = if kind == ObjectKind::Config {
        (ENCODING_RAW, payload.to_vec())
    } else {
        let compressed = zstd::bulk::compress(payload, ZSTD_LEVEL).expect("zstd in memory");
        (ENCODING_ZSTD, compressed)
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + stored.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u16::try_from(FORMAT_VERSION).expect("small").to_le_bytes());
    out.push(kind as u8);
    out.push(encoding);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&XxHash3_128::oneshot(&stored).to_le_bytes());
    out.extend_from_slice(&stored);
    out
}

/// Verifies the envelope of `bytes` (named `what` in errors) and returns the decoded payload.
///
/// # Errors
/// `FormatError` on a short object, a wrong magic, version or kind, a checksum mismatch, or a
/// payload that does not decompress to its declared length.
pub fn decode_object(kind: ObjectKind, what: &str, bytes: &[u8]) -> Result<Vec<u8>, FormatError> {
    let err_header = |detail: String| FormatError::BadHeader { what: what.to_string(), detail };
    if bytes.len() < HEADER_BYTES {
        return Err(FormatError::Truncated {
            what: what.to_string(),
            detail: format!("{} bytes, header needs {HEADER_BYTES}", bytes.len()),
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(err_header("not a ferry object (bad magic)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if u32::from(version) != FORMAT_VERSION {
        return Err(FormatError::Version { found: u32::from(version) });
    }
    if bytes[10] != kind as u8 {
        return Err(err_header(format!("kind {} where {kind:?} was expected", bytes[10])));
    }
    let encoding = bytes[11];
    let decoded_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let checksum = u128::from_le_bytes(bytes[20..36].try_into().expect("16 bytes"));
    let stored = &bytes[HEADER_BYTES..];
    let actual = XxHash3_128::oneshot(stored);
    if actual != checksum {
        return Err(FormatError::Corrupt {
            what: what.to_string(),
            detail: format!(
                "xxh3-128 checksum mismatch: header {checksum:032x}, data {actual:032x}"
            ),
        });
    }
    if decoded_len > DECODED_BYTES_MAX {
        return Err(err_header(format!("declared length {decoded_len} is implausible")));
    }
    let payload = match encoding {
        ENCODING_RAW => stored.to_vec(),
        ENCODING_ZSTD => zstd::bulk::decompress(stored, decoded_len as usize).map_err(|error| {
            FormatError::Corrupt { what: what.to_string(), detail: format!("zstd: {error}") }
        })?,
        other => return Err(err_header(format!("unknown encoding {other}"))),
    };
    if payload.len() as u64 != decoded_len {
        return Err(FormatError::Corrupt {
            what: what.to_string(),
            detail: format!("decoded {} bytes, header says {decoded_len}", payload.len()),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every single-byte corruption of an object is detected, never silently accepted.
    #[test]
    fn any_flipped_byte_is_detected() {
        let payload = br#"{"hello":"world","n":[1,2,3,4,5,6,7,8,9,10]}"#.repeat(10);
        let object = encode_object(ObjectKind::Manifest, &payload);
        assert_eq!(decode_object(ObjectKind::Manifest, "m", &object).unwrap(), payload);
        for position in 0..object.len() {
            let mut bad = object.clone();
            bad[position] ^= 0x01;
            assert!(decode_object(ObjectKind::Manifest, "m", &bad).is_err(), "byte {position}");
        }
        assert!(decode_object(ObjectKind::Index, "m", &object).is_err());
        assert!(decode_object(ObjectKind::Manifest, "m", &object[..20]).is_err());
    }

    #[test]
    fn config_stays_readable() {
        let object = encode_object(ObjectKind::Config, b"{\"a\":1}");
        assert!(object.ends_with(b"{\"a\":1}"));
        assert_eq!(decode_object(ObjectKind::Config, "c", &object).unwrap(), b"{\"a\":1}");
    }
}
