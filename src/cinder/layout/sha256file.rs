//! The `_sha256file` object: the SHA-256 of every `chunk_size` block of the whole volume, the
//! index an incremental backup diffs against.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::error::CinderError;
use super::pyjson;
use super::{DEFAULT_BLOCK_SIZE, DRIVER_VERSION};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// SHA-256 of each consecutive `block_size` slice of `data` (the last may be shorter), as
/// `_calculate_sha` computes them. Slices start at `data`'s first byte, so a caller hashing in
/// parallel splits `data` at multiples of `block_size` and concatenates the results in order.
/// `sha2` picks the SHA-NI backend at run time when the CPU has it.
///
/// # Panics
/// If `block_size` is zero (a caller bug; [`super::Geometry`] never holds zero).
pub fn block_hashes(data: &[u8], block_size: usize) -> Vec<Hash> {
    assert!(block_size > 0, "block size must be positive");
    data.chunks(block_size).map(|block| Sha256::digest(block).into()).collect()
}

/// Lower-case hex, as Python's `hexdigest()`.
pub fn hex(hash: &Hash) -> String {
    let mut out = [0u8; 64];
    write_hex(hash, &mut out);
    out.iter().map(|&b| char::from(b)).collect()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(hash: &Hash, out: &mut [u8; 64]) {
    for (i, b) in hash.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// Parses 64 hex digits (either case) into a digest.
pub fn parse_hex(s: &str) -> Option<Hash> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// The `_sha256file` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sha256File {
    /// `"1.0.0"`.
    pub version: String,
    /// Backup UUID.
    pub backup_id: String,
    /// Source volume UUID.
    pub volume_id: String,
    /// `display_name` of the backup.
    pub backup_name: Option<String>,
    /// `display_description` of the backup.
    pub backup_description: Option<String>,
    /// `str(created_at)`, see [`super::UtcTime::python_str`].
    pub created_at: String,
    /// The hash block size (`backup_s3_block_size`), not the object size.
    pub chunk_size: u64,
    /// One digest per block of the whole volume, in order.
    pub sha256s: Vec<Hash>,
}

impl Sha256File {
    /// A document with Cinder's version and default block size and no hashes yet.
    pub fn new(backup_id: &str, volume_id: &str, created_at: &str) -> Sha256File {
        Sha256File {
            version: DRIVER_VERSION.to_owned(),
            backup_id: backup_id.to_owned(),
            volume_id: volume_id.to_owned(),
            backup_name: None,
            backup_description: None,
            created_at: created_at.to_owned(),
            chunk_size: DEFAULT_BLOCK_SIZE,
            sha256s: Vec::new(),
        }
    }

    /// The object body, byte for byte what `json.dumps(sha256file, sort_keys=True, indent=2)`
    /// writes. Written directly (72 bytes per hash) rather than through a value tree, since a
    /// 1 TiB volume has 33 million hashes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut head = String::new();
        head.push_str("{\n  \"backup_description\": ");
        push_opt(&mut head, self.backup_description.as_deref());
        head.push_str(",\n  \"backup_id\": ");
        pyjson::write_str(&mut head, &self.backup_id);
        head.push_str(",\n  \"backup_name\": ");
        push_opt(&mut head, self.backup_name.as_deref());
        head.push_str(&format!(",\n  \"chunk_size\": {},\n  \"created_at\": ", self.chunk_size));
        pyjson::write_str(&mut head, &self.created_at);
        head.push_str(",\n  \"sha256s\": ");
        let mut tail = String::from(",\n  \"version\": ");
        pyjson::write_str(&mut tail, &self.version);
        tail.push_str(",\n  \"volume_id\": ");
        pyjson::write_str(&mut tail, &self.volume_id);
        tail.push_str("\n}");

        let mut out = Vec::with_capacity(head.len() + tail.len() + 8 + self.sha256s.len() * 72);
        out.extend_from_slice(head.as_bytes());
        if self.sha256s.is_empty() {
            out.extend_from_slice(b"[]");
        } else {
            out.push(b'[');
            let mut entry =
                *b",\n    \"0000000000000000000000000000000000000000000000000000000000000000\"";
            let mut hex = [0u8; 64];
            for (i, h) in self.sha256s.iter().enumerate() {
                write_hex(h, &mut hex);
                entry[7..71].copy_from_slice(&hex);
                out.extend_from_slice(if i == 0 { &entry[1..] } else { &entry[..] });
            }
            out.extend_from_slice(b"\n  ]");
        }
        out.extend_from_slice(tail.as_bytes());
        out
    }

    /// Parses a `_sha256file` body. Tolerant of missing informational fields; `chunk_size` and
    /// `sha256s` are required because an incremental cannot be planned without them.
    ///
    /// # Errors
    /// [`CinderError::Json`] if it is not such a document, [`CinderError::BadHash`] for an entry
    /// that is not 64 hex digits.
    pub fn parse(body: &[u8]) -> Result<Sha256File, CinderError> {
        let raw: RawSha256File = serde_json::from_slice(body)
            .map_err(|source| CinderError::Json { document: "_sha256file", source })?;
        let mut sha256s = Vec::with_capacity(raw.sha256s.len());
        for (index, s) in raw.sha256s.iter().enumerate() {
            sha256s.push(parse_hex(s).ok_or(CinderError::BadHash { index })?);
        }
        Ok(Sha256File {
            version: raw.version.unwrap_or_else(|| DRIVER_VERSION.to_owned()),
            backup_id: raw.backup_id.unwrap_or_default(),
            volume_id: raw.volume_id.unwrap_or_default(),
            backup_name: raw.backup_name,
            backup_description: raw.backup_description,
            created_at: raw.created_at.unwrap_or_default(),
            chunk_size: raw.chunk_size,
            sha256s,
        })
    }
}

fn push_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => pyjson::write_str(out, s),
        None => out.push_str("null"),
    }
}

#[derive(Deserialize)]
struct RawSha256File<'a> {
    version: Option<String>,
    backup_id: Option<String>,
    volume_id: Option<String>,
    backup_name: Option<String>,
    backup_description: Option<String>,
    created_at: Option<String>,
    chunk_size: u64,
    #[serde(borrow)]
    sha256s: Vec<std::borrow::Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cinder::layout::pyjson::Py;

    /// Digests and hex match known SHA-256 values; the last block may be partial.
    #[test]
    fn hashes() {
        let h = block_hashes(b"abc", 32_768);
        assert_eq!(hex(&h[0]), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let data = vec![7u8; 32_768 * 2 + 5];
        let h = block_hashes(&data, 32_768);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], h[1]);
        assert_eq!(h[2], block_hashes(&[7u8; 5], 32_768)[0]);
        assert!(block_hashes(&[], 32_768).is_empty());
        assert_eq!(parse_hex(&hex(&h[2]).to_uppercase()), Some(h[2]));
        assert_eq!(parse_hex("zz"), None);
    }

    fn via_tree(f: &Sha256File) -> Vec<u8> {
        let opt = |s: &Option<String>| s.clone().map_or(Py::Null, Py::Str);
        pyjson::dumps_sorted_indent2(&Py::Dict(vec![
            ("version".into(), Py::Str(f.version.clone())),
            ("backup_id".into(), Py::Str(f.backup_id.clone())),
            ("volume_id".into(), Py::Str(f.volume_id.clone())),
            ("backup_name".into(), opt(&f.backup_name)),
            ("backup_description".into(), opt(&f.backup_description)),
            ("created_at".into(), Py::Str(f.created_at.clone())),
            ("chunk_size".into(), Py::UInt(f.chunk_size)),
            ("sha256s".into(), Py::List(f.sha256s.iter().map(|h| Py::Str(hex(h))).collect())),
        ]))
    }

    /// The direct writer produces the same bytes as the generic json.dumps writer (empty and
    /// non-empty lists, names with escapes), and parses back to the same document.
    #[test]
    fn json_round_trip() {
        let mut f = Sha256File::new("b", "v", "2025-03-01 12:00:05+00:00");
        assert_eq!(f.to_json(), via_tree(&f));
        assert_eq!(Sha256File::parse(&f.to_json()).unwrap(), f);
        f.backup_name = Some("n\u{e9}\"x".into());
        f.backup_description = Some("d".into());
        f.sha256s = block_hashes(&[1u8; 100_000], 32_768);
        assert_eq!(f.to_json(), via_tree(&f));
        assert_eq!(Sha256File::parse(&f.to_json()).unwrap(), f);
    }

    /// Parsing refuses a document without chunk_size and an entry that is not a digest.
    #[test]
    fn parse_refusals() {
        assert!(matches!(Sha256File::parse(br#"{"sha256s": []}"#), Err(CinderError::Json { .. })));
        assert!(matches!(
            Sha256File::parse(br#"{"chunk_size": 1, "sha256s": ["ab"]}"#),
            Err(CinderError::BadHash { index: 0 })
        ));
    }
}
