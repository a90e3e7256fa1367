//! The envelope of every small object (config, index, manifest): a fixed header with a magic
//! number, format version, object kind, encoding, decoded length and an xxh3-128 checksum of the
//! stored payload, followed by the payload (zstd-compressed JSON, or raw JSON for the config).
//! Decoding verifies all of it before returning a byte.
//!
//! In an encrypted repository (format version 2) every payload but the config's is sealed after
//! compression (`crypt.rs`), under the envelope header as associated data; the checksum covers
//! the sealed bytes.

use twox_hash::XxHash3_128;

use super::crypt::{Crypt, FORMAT_VERSION_SEALED};
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
    /// One hash bucket of a consolidated index (`merged.rs`).
    MergedBucket = 7,
}

/// Wraps `payload` in an envelope of `crypt`'s format version, compressing it unless it is the
/// config (kept readable), and sealing it when `crypt` is sealed (never the config).
///
/// # Panics
/// If in-memory zstd compression fails, which is a bug.
pub fn encode_object(crypt: &Crypt, kind: ObjectKind, payload: &[u8]) -> Vec<u8> {
    let (encoding, mut stored) = if kind == ObjectKind::Config {
        (ENCODING_RAW, payload.to_vec())
    } else {
        let compressed = zstd::bulk::compress(payload, ZSTD_LEVEL).expect("zstd in memory");
        (ENCODING_ZSTD, compressed)
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + stored.len() + 28);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u16::try_from(crypt.format_version()).expect("small").to_le_bytes());
    out.push(kind as u8);
    out.push(encoding);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    if let (Crypt::Sealed(keys), false) = (crypt, kind == ObjectKind::Config) {
        keys.seal_object(&out[..20], &mut stored);
    }
    out.extend_from_slice(&XxHash3_128::oneshot(&stored).to_le_bytes());
    out.extend_from_slice(&stored);
    out
}

/// Verifies the envelope of `bytes` (named `what` in errors) and returns the decoded payload.
/// Its version must be `crypt`'s (a config may be of either version: it says which it is).
///
/// # Errors
/// `FormatError` on a short object, a wrong magic, version or kind, a checksum mismatch, a
/// sealed payload that does not authenticate, or a payload that does not decompress to its
/// declared length.
pub fn decode_object(
    crypt: &Crypt,
    kind: ObjectKind,
    what: &str,
    bytes: &[u8],
) -> Result<Vec<u8>, FormatError> {
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
    let version = u32::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let config_version = kind == ObjectKind::Config
        && (version == FORMAT_VERSION || version == FORMAT_VERSION_SEALED);
    if version != crypt.format_version() && !config_version {
        if version == FORMAT_VERSION || version == FORMAT_VERSION_SEALED {
            return Err(err_header(format!(
                "format version {version} in a repository of version {}",
                crypt.format_version()
            )));
        }
        return Err(FormatError::Version { found: version });
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
    let opened;
    let stored = match (crypt, kind) {
        (Crypt::Sealed(keys), kind) if kind != ObjectKind::Config => {
            opened = keys
                .open_object(&bytes[..20], stored)
                .map_err(|detail| FormatError::Corrupt { what: what.to_string(), detail })?;
            &opened[..]
        }
        _ => stored,
    };
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

    use crate::native::layout::crypt::{Cipher, MasterSecret, RepoKeys};

    fn sealed() -> Crypt {
        fn nonce() -> [u8; 12] {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
            let mut nonce = [0u8; 12];
            let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            nonce[..8].copy_from_slice(&next.to_le_bytes());
            nonce
        }
        Crypt::Sealed(std::sync::Arc::new(RepoKeys::derive(
            Cipher::Aes256Gcm,
            MasterSecret([1; 32]),
            nonce,
        )))
    }

    // Every single-byte corruption of an object is detected, never silently accepted, sealed
    // or not; a sealed object hides its payload and opens under its own keys only.
    #[test]
    fn any_flipped_byte_is_detected() {
        let payload = br#"{"hello":"world","n":[1,2,3,4,5,6,7,8,9,10]}"#.repeat(10);
        for crypt in [Crypt::Plain, sealed()] {
            let object = encode_object(&crypt, ObjectKind::Manifest, &payload);
            assert_eq!(decode_object(&crypt, ObjectKind::Manifest, "m", &object).unwrap(), payload);
            for position in 0..object.len() {
                let mut bad = object.clone();
                bad[position] ^= 0x01;
                let decoded = decode_object(&crypt, ObjectKind::Manifest, "m", &bad);
                assert!(decoded.is_err(), "byte {position}");
            }
            assert!(decode_object(&crypt, ObjectKind::Index, "m", &object).is_err());
            assert!(decode_object(&crypt, ObjectKind::Manifest, "m", &object[..20]).is_err());
        }
        let object = encode_object(&sealed(), ObjectKind::Manifest, &payload);
        assert_eq!(u16::from_le_bytes([object[8], object[9]]), 2);
        assert!(decode_object(&Crypt::Plain, ObjectKind::Manifest, "m", &object).is_err());
        let plain = encode_object(&Crypt::Plain, ObjectKind::Manifest, &payload);
        assert!(decode_object(&sealed(), ObjectKind::Manifest, "m", &plain).is_err());
        let other = Crypt::Sealed(std::sync::Arc::new(RepoKeys::derive(
            Cipher::Aes256Gcm,
            MasterSecret([2; 32]),
            || [0; 12],
        )));
        assert!(decode_object(&other, ObjectKind::Manifest, "m", &object).is_err());
    }

    #[test]
    fn config_stays_readable() {
        for crypt in [Crypt::Plain, sealed()] {
            let object = encode_object(&crypt, ObjectKind::Config, b"{\"a\":1}");
            assert!(object.ends_with(b"{\"a\":1}"));
            let decoded = decode_object(&Crypt::Plain, ObjectKind::Config, "c", &object);
            assert_eq!(decoded.unwrap(), b"{\"a\":1}");
        }
    }
}
