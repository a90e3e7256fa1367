//! The repository format, version 1: object keys, the envelope every small object is stored in,
//! pack records, and the config, index and manifest documents.
//!
//! This module is the only one that knows key names and byte layouts, and it does no I/O: it
//! turns values into bytes and verified bytes back into values, so it can be fuzzed and
//! benchmarked alone (the current time and fresh pack ids come from `native::fresh`). The layout
//! is a public, versioned contract, documented in `src/native/layout/FORMAT.md`; change it only
//! with a new format version.

pub mod crypt;
mod envelope;
pub mod gc;
pub mod liveness;
pub mod merged;
mod record;
mod time;

pub use crypt::Crypt;
pub use envelope::{ObjectKind, decode_object, encode_object};
pub use record::{
    Encoding, RECORD_HEADER_BYTES, RecordHeader, decode_record, decode_record_header,
    encode_record_header, scan_records,
};
pub use time::{Timestamp, civil_from_days};

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Classify, ErrorKind};

/// The format version of unencrypted repositories (encrypted ones are version 2,
/// `crypt::FORMAT_VERSION_SEALED`); this build reads and writes both.
pub const FORMAT_VERSION: u32 = 1;
/// Hashing scheme name recorded in the config.
pub const HASH_SCHEME: &str = "blake3-keyed";
/// Key of the repository config object.
pub const CONFIG_KEY: &str = "config";
/// Prefix of pack objects.
pub const PACKS_PREFIX: &str = "packs/";
/// Prefix of index objects (one per pack).
pub const INDEX_PREFIX: &str = "index/";
/// Prefix of manifests (one per backup).
pub const BACKUPS_PREFIX: &str = "backups/";
/// Prefix of backup catalogs (`catalog/<32 hex>`): summaries of many backups, for `list`.
pub const CATALOG_PREFIX: &str = "catalog/";

/// Errors decoding or validating stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The object is shorter than its header or its declared length.
    #[error("{what} is truncated: {detail}")]
    Truncated {
        /// The object or record.
        what: String,
        /// What was missing.
        detail: String,
    },
    /// A magic number, version or kind does not match.
    #[error("{what} has a bad header: {detail}")]
    BadHeader {
        /// The object or record.
        what: String,
        /// What did not match.
        detail: String,
    },
    /// A checksum or hash does not match the bytes.
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// The object or record.
        what: String,
        /// Which check failed.
        detail: String,
    },
    /// The document inside a valid envelope does not parse.
    #[error("{what} does not parse: {detail}")]
    Parse {
        /// The object.
        what: String,
        /// The parser's message.
        detail: String,
    },
    /// The repository was written by an unsupported format version.
    #[error(
        "repository format version {found} is not supported (this ferry reads versions 1 and 2)"
    )]
    Version {
        /// The version found.
        found: u32,
    },
}

impl Classify for FormatError {
    fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Version { .. } => ErrorKind::Usage,
            _ => ErrorKind::Integrity,
        }
    }
}

/// The identity of a chunk: keyed BLAKE3 of its uncompressed bytes, under the repository key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Option<ChunkHash> {
        let mut bytes = [0u8; 32];
        hex_decode(text, &mut bytes)?;
        Some(ChunkHash(bytes))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ChunkHash::from_hex(&text).ok_or_else(|| serde::de::Error::custom("bad chunk hash"))
    }
}

/// The name of a pack object: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// Lower-case hex, 32 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parses 32 hex characters.
    pub fn from_hex(text: &str) -> Option<PackId> {
        let mut bytes = [0u8; 16];
        hex_decode(text, &mut bytes)?;
        Some(PackId(bytes))
    }

    /// Key of the pack object: `packs/<first two hex>/<hex>`.
    pub fn pack_key(&self) -> String {
        let hex = self.to_hex();
        format!("{PACKS_PREFIX}{}/{hex}", &hex[..2])
    }

    /// Key of the pack's index object: `index/<hex>`.
    pub fn index_key(&self) -> String {
        format!("{INDEX_PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({})", self.to_hex())
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for PackId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PackId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        PackId::from_hex(&text).ok_or_else(|| serde::de::Error::custom("bad pack id"))
    }
}

/// The pack a `packs/<hh>/<hex>` key names (`None` for any other key).
pub fn pack_from_key(key: &str) -> Option<PackId> {
    let pack = PackId::from_hex(key.strip_prefix(PACKS_PREFIX)?.rsplit('/').next()?)?;
    (pack.pack_key() == key).then_some(pack)
}

/// The pack an `index/<hex>` key names (`None` for any other key).
pub fn index_pack_from_key(key: &str) -> Option<PackId> {
    PackId::from_hex(key.strip_prefix(INDEX_PREFIX)?)
}

/// Key of a backup's manifest.
pub fn manifest_key(backup_id: &str) -> String {
    format!("{BACKUPS_PREFIX}{backup_id}")
}

/// True when `backup_id` is a well-formed id (so that it is safe inside a key).
pub fn backup_id_valid(backup_id: &str) -> bool {
    !backup_id.is_empty()
        && backup_id.len() <= 128
        && backup_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The repository config: written once by `ferry init`, read by every job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Format version of the repository.
    pub format_version: u32,
    /// Random id of this repository.
    pub repository_id: String,
    /// Fixed chunk size in bytes.
    pub chunk_size_bytes: u32,
    /// Chunk hashing scheme, `blake3-keyed`.
    pub hash_scheme: String,
    /// The per-repository BLAKE3 key (64 hex characters). It makes chunk ids unpredictable
    /// to anyone without repository access, so one tenant cannot craft collisions against
    /// another tenant's data; it is not an encryption key.
    pub hash_key: String,
    /// Compression applied to chunks: `zstd`.
    pub compression: String,
    /// When the repository was created.
    pub created_at: Timestamp,
    /// Garbage collection's grace period in seconds, chosen at `ferry init` (`gc::GcTiming`
    /// derives every other time rule from it). Absent in repositories made before it was a
    /// setting: those use `gc::GRACE_SECS_DEFAULT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_grace_secs: Option<u64>,
    /// Present in encrypted repositories (format version 2) only, whose `hash_key` is empty:
    /// the chunk-id key derives from the master secret in `keys/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crypt::EncryptionConfig>,
}

impl RepoConfig {
    /// The hash key as bytes.
    ///
    /// # Errors
    /// `FormatError::Parse` when the stored key is not 64 hex characters.
    pub fn hash_key_bytes(&self) -> Result<[u8; 32], FormatError> {
        let mut key = [0u8; 32];
        hex_decode(&self.hash_key, &mut key).ok_or_else(|| FormatError::Parse {
            what: "repository config".into(),
            detail: "hash_key is not 64 hex characters".into(),
        })?;
        Ok(key)
    }

    /// Checks the fields a reader depends on.
    ///
    /// # Errors
    /// `FormatError::Version` or `FormatError::Parse` when this build cannot use the repository.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |detail: String| FormatError::Parse { what: "repository config".into(), detail };
        match (self.format_version, &self.encryption) {
            (FORMAT_VERSION, None) => {
                let _ = self.hash_key_bytes()?;
            }
            (crypt::FORMAT_VERSION_SEALED, Some(encryption)) => {
                if !self.hash_key.is_empty() {
                    return Err(bad("an encrypted repository's config holds a hash key".into()));
                }
                if encryption.key_derivation != crypt::KEY_DERIVATION {
                    return Err(bad(format!(
                        "unknown key derivation {:?}",
                        encryption.key_derivation
                    )));
                }
            }
            (FORMAT_VERSION | crypt::FORMAT_VERSION_SEALED, _) => {
                return Err(bad("encryption does not match the format version".into()));
            }
            (found, _) => return Err(FormatError::Version { found }),
        }
        if self.hash_scheme != HASH_SCHEME {
            return Err(bad(format!("unknown hash scheme {:?}", self.hash_scheme)));
        }
        if self.compression != "zstd" {
            return Err(bad(format!("unknown compression {:?}", self.compression)));
        }
        if !self.chunk_size_bytes.is_power_of_two() || self.chunk_size_bytes < 4096 {
            return Err(bad(format!("chunk size {} is not a power of two", self.chunk_size_bytes)));
        }
        if let Some(grace) = self.gc_grace_secs {
            let _ = gc::GcTiming::for_grace(grace).map_err(bad)?;
        }
        Ok(())
    }

    /// The repository's garbage-collection time rules.
    ///
    /// # Panics
    /// When the grace is out of range: `validate` refuses such a config before any job uses it.
    pub fn gc(&self) -> gc::GcTiming {
        match self.gc_grace_secs {
            Some(grace) => gc::GcTiming::for_grace(grace).expect("validate checked the grace"),
            None => gc::GcTiming::DEFAULT,
        }
    }
}

/// One chunk stored in a pack, as listed by the pack's index object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The chunk's hash.
    pub hash: ChunkHash,
    /// Offset of the record header within the pack.
    pub offset: u64,
    /// Bytes stored after the record header.
    pub stored_bytes: u32,
    /// Uncompressed bytes.
    pub raw_bytes: u32,
}

impl IndexEntry {
    /// Bytes of the whole record: header plus stored data.
    pub fn record_bytes(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + u64::from(self.stored_bytes)
    }
}

/// The index object of one pack: where each chunk of the pack is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    /// The pack described.
    pub pack: PackId,
    /// Size of the pack object in bytes.
    pub pack_size_bytes: u64,
    /// Every record of the pack, in offset order.
    pub entries: Vec<IndexEntry>,
}

/// What a backup read from, for people and orchestrators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Path of the device or image file.
    pub path: String,
    /// `block_device` or `file`.
    pub kind: String,
    /// Logical block size of the source.
    pub logical_block_bytes: u32,
}

/// Statistics of one backup run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks in the volume.
    pub chunk_count: u64,
    /// All-zero chunks (holes, not stored).
    pub zero_chunk_count: u64,
    /// Chunks already in the repository (or earlier in this backup).
    pub dedup_chunk_count: u64,
    /// Chunks stored by this backup.
    pub new_chunk_count: u64,
    /// Uncompressed bytes of the new chunks.
    pub new_raw_bytes: u64,
    /// Bytes of the new chunks as stored (compressed, with record headers).
    pub new_stored_bytes: u64,
    /// Pack objects written by this backup.
    pub pack_count: u64,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
}

/// The manifest of one backup. It is the commit point: a backup exists if and only if its
/// manifest exists, and it is written after every pack and index it references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format_version: u32,
    /// The backup id (also the key suffix).
    pub backup_id: String,
    /// The repository this backup belongs to.
    pub repository_id: String,
    /// Where it was read from.
    pub source: SourceInfo,
    /// Size of the volume in bytes.
    pub volume_size_bytes: u64,
    /// Chunk size in bytes (the repository's).
    pub chunk_size_bytes: u32,
    /// When the backup started.
    pub started_at: Timestamp,
    /// When the backup completed (manifest written).
    pub completed_at: Timestamp,
    /// Every pack holding a chunk of this backup, sorted; restore loads only these indexes.
    pub packs: Vec<PackId>,
    /// One entry per chunk, in volume order: the chunk's hash, or `null` for an all-zero chunk.
    pub chunks: Vec<Option<ChunkHash>>,
    /// Statistics of the run.
    pub stats: BackupStats,
    /// What an incremental backup was based on; absent for a full read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseInfo>,
}

/// What an incremental backup was based on: the parent backup whose chunks it took for the
/// chunks the change list called unchanged, and what it read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// The parent backup's id.
    pub parent_backup_id: String,
    /// Where the change list came from (for example `lightbits diff <snapshot> against
    /// <base snapshot>`, or `ranges file <path>`).
    pub changes_from: String,
    /// Chunks read because the change list touched them (or the parent's chunk was not
    /// available for dedup).
    pub chunks_read: u64,
    /// Chunks the change list called unchanged, re-read and checked against the parent.
    pub chunks_sampled: u64,
    /// Chunks taken from the parent without reading them.
    pub chunks_carried: u64,
}

impl Manifest {
    /// Checks that the chunk list covers the volume exactly.
    ///
    /// # Errors
    /// `FormatError::Corrupt` when the chunk count does not match the volume size.
    pub fn validate(&self) -> Result<(), FormatError> {
        let expected = chunk_count(self.volume_size_bytes, self.chunk_size_bytes);
        if self.chunks.len() as u64 != expected || self.chunk_size_bytes == 0 {
            return Err(FormatError::Corrupt {
                what: format!("manifest {}", self.backup_id),
                detail: format!(
                    "{} chunk entries for a {}-byte volume of {}-byte chunks (expected {expected})",
                    self.chunks.len(),
                    self.volume_size_bytes,
                    self.chunk_size_bytes
                ),
            });
        }
        Ok(())
    }
}

/// What `list` shows of a backup, without its chunk list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// The backup id.
    pub backup_id: String,
    /// The manifest's source path.
    pub source: String,
    /// Size of the volume in bytes.
    pub volume_size_bytes: u64,
    /// When the backup completed.
    pub completed_at: Timestamp,
}

impl BackupSummary {
    /// The summary of `manifest`.
    pub fn of(manifest: &Manifest) -> BackupSummary {
        BackupSummary {
            backup_id: manifest.backup_id.clone(),
            source: manifest.source.path.clone(),
            volume_size_bytes: manifest.volume_size_bytes,
            completed_at: manifest.completed_at,
        }
    }
}

/// A catalog: the summaries of the backups a prune saw, so that `list` reads one object
/// instead of every manifest. Informative only: a backup exists if and only if its manifest
/// does, so readers show only summaries whose manifest is listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCatalog {
    /// The summaries, sorted by backup id.
    pub backups: Vec<BackupSummary>,
}

/// Key of the catalog named `id`.
pub fn catalog_key(id: PackId) -> String {
    format!("{CATALOG_PREFIX}{}", id.to_hex())
}

/// The id a catalog key names.
pub fn catalog_from_key(key: &str) -> Option<PackId> {
    PackId::from_hex(key.strip_prefix(CATALOG_PREFIX)?)
}

/// Number of chunks covering `size_bytes` (the last may be short).
pub fn chunk_count(size_bytes: u64, chunk_size_bytes: u32) -> u64 {
    size_bytes.div_ceil(u64::from(chunk_size_bytes.max(1)))
}

/// Serializes a document into an enveloped object.
///
/// # Panics
/// If serde_json fails on these plain structs, which is a bug.
pub fn encode_document<T: Serialize>(crypt: &Crypt, kind: ObjectKind, document: &T) -> Vec<u8> {
    let json = serde_json::to_vec(document).expect("documents serialize");
    encode_object(crypt, kind, &json)
}

/// Verifies an enveloped object and parses the document inside.
///
/// # Errors
/// `FormatError` when the envelope does not verify or the document does not parse.
pub fn decode_document<T: for<'de> Deserialize<'de>>(
    crypt: &Crypt,
    kind: ObjectKind,
    what: &str,
    bytes: &[u8],
) -> Result<T, FormatError> {
    let payload = decode_object(crypt, kind, what, bytes)?;
    serde_json::from_slice(&payload)
        .map_err(|error| FormatError::Parse { what: what.to_string(), detail: error.to_string() })
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

pub(crate) fn hex_decode(text: &str, out: &mut [u8]) -> Option<()> {
    let digits = text.as_bytes();
    if digits.len() != out.len() * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hex round-trips and rejects malformed text, so ids in keys and JSON cannot be misread.
    #[test]
    fn ids_round_trip_through_hex() {
        let pack = PackId::random();
        assert_eq!(PackId::from_hex(&pack.to_hex()), Some(pack));
        assert!(pack.pack_key().starts_with("packs/"));
        let hash = ChunkHash([0xab; 32]);
        assert_eq!(ChunkHash::from_hex(&hash.to_hex().to_uppercase()), Some(hash));
        assert_eq!(ChunkHash::from_hex("zz"), None);
        assert_eq!(PackId::from_hex(&"g".repeat(32)), None);
    }

    // A manifest whose chunk list does not cover the volume is rejected.
    #[test]
    fn manifest_validate_checks_coverage() {
        let mut manifest = Manifest {
            format_version: 1,
            backup_id: "b".into(),
            repository_id: "r".into(),
            source: SourceInfo {
                path: "/dev/x".into(),
                kind: "file".into(),
                logical_block_bytes: 512,
            },
            volume_size_bytes: 10_000,
            chunk_size_bytes: 4096,
            started_at: Timestamp(0),
            completed_at: Timestamp(0),
            packs: vec![],
            chunks: vec![None; 3],
            stats: BackupStats::default(),
            base: None,
        };
        manifest.validate().unwrap();
        let _ = manifest.chunks.pop();
        assert!(manifest.validate().is_err());
        let bytes = encode_document(&Crypt::Plain, ObjectKind::Manifest, &manifest);
        let back: Manifest =
            decode_document(&Crypt::Plain, ObjectKind::Manifest, "m", &bytes).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn backup_ids_are_key_safe() {
        assert!(backup_id_valid("20261126T120000Z-0a1b2c3d"));
        assert!(!backup_id_valid("../config"));
        assert!(!backup_id_valid(""));
        assert!(!backup_id_valid("a/b"));
    }
}
