//! `CinderError`: every way reading, writing or planning a Cinder-format backup can fail.

use super::codec::Algorithm;

/// A failure of the Cinder-format core: bad geometry, unparsable documents, unsupported
/// compression, refused incrementals and restores.
///
/// Messages name the rule Cinder applies (and, where Cinder refuses the same input, say so) so an
/// operator can tell a ferry bug from a backup Cinder would refuse too.
#[derive(Debug, thiserror::Error)]
pub enum CinderError {
    /// The object size (`backup_s3_object_size`) or block size (`backup_s3_block_size`) is zero.
    #[error("{what} must be positive, got 0")]
    ZeroSize {
        /// Which setting was zero.
        what: &'static str,
    },
    /// Cinder refuses a backup whose object size is not a multiple of the hash block size.
    #[error(
        "object size {object_size} is not a multiple of block size {block_size} \
         (Cinder: \"Chunk size is not multiple of block size for creating hash\")"
    )]
    ObjectSizeNotBlockMultiple {
        /// `backup_s3_object_size`.
        object_size: u64,
        /// `backup_s3_block_size`.
        block_size: u64,
    },
    /// The parent's `_sha256file` was made with another block size; Cinder asks for a full backup.
    #[error(
        "hash block size changed since the parent backup: parent {parent}, now {current}; \
         do a full backup"
    )]
    ParentBlockSize {
        /// The parent's `chunk_size`.
        parent: u64,
        /// The current block size.
        current: u64,
    },
    /// The volume is bigger (in GiB) than the parent backup; Cinder asks for a full backup.
    #[error(
        "volume size increased since the parent backup ({parent_gib} GiB -> {size_gib} GiB); \
         do a full backup"
    )]
    VolumeGrew {
        /// The backup's size in GiB.
        size_gib: u64,
        /// The parent's size in GiB.
        parent_gib: u64,
    },
    /// The current volume has a block the parent's hash list does not cover (Cinder would fail
    /// with an `IndexError` here).
    #[error(
        "block {index} has no hash in the parent's _sha256file ({parent_len} hashes); \
         the volume is larger than the parent"
    )]
    ParentTooShort {
        /// Global index of the block.
        index: u64,
        /// Number of hashes the parent has.
        parent_len: u64,
    },
    /// The number of block hashes does not match the data length they are said to cover.
    #[error(
        "{actual} block hashes given for {len} bytes in blocks of {block_size}; expected {expected}"
    )]
    HashCount {
        /// Bytes covered.
        len: u64,
        /// Block size.
        block_size: u64,
        /// Hashes needed.
        expected: u64,
        /// Hashes given.
        actual: u64,
    },
    /// A chunk handed to the incremental planner does not start on an object-size boundary.
    #[error("chunk at offset {offset} (length {len}) is not an object-size chunk of {object_size}")]
    ChunkMisaligned {
        /// Chunk offset in the volume.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Object size.
        object_size: u64,
    },
    /// A compression name Cinder does not know (Cinder: "unsupported compression algorithm").
    #[error("unsupported compression algorithm: {name:?}")]
    UnsupportedCompression {
        /// The name as found.
        name: String,
    },
    /// A compressor failed on an in-memory buffer.
    #[error("{algorithm} compression failed: {reason}")]
    Compress {
        /// The algorithm.
        algorithm: Algorithm,
        /// What the library said.
        reason: String,
    },
    /// A stored object does not decompress.
    #[error("{algorithm} decompression failed: {reason}")]
    Decompress {
        /// The algorithm named in the metadata.
        algorithm: Algorithm,
        /// What the library said.
        reason: String,
    },
    /// An object decompressed to another length than its metadata `length`.
    #[error("object decompressed to {actual} bytes but its metadata says {expected}")]
    LengthMismatch {
        /// `length` from the metadata.
        expected: u64,
        /// Bytes after decompression.
        actual: u64,
    },
    /// A `_metadata` or `_sha256file` document (or a backup record) is not the JSON expected.
    #[error("{document} does not parse: {source}")]
    Json {
        /// Which document.
        document: &'static str,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A `_metadata` document parses but an entry breaks Cinder's shape.
    #[error("_metadata objects[{index}]: {reason}")]
    ObjectEntry {
        /// Position in `objects`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A `sha256s` entry is not 64 hex digits.
    #[error("_sha256file sha256s[{index}] is not 64 hex digits")]
    BadHash {
        /// Position in `sha256s`.
        index: usize,
    },
    /// The metadata `version` has no restore function in Cinder's `DRIVER_VERSION_MAPPING`.
    #[error("no support to restore backup version {version:?} (backup {backup_id})")]
    UnsupportedVersion {
        /// The backup's id.
        backup_id: String,
        /// The version found.
        version: String,
    },
    /// The objects under a backup's prefix differ from the metadata's object list; Cinder aborts
    /// the restore with the same complaint.
    #[error(
        "actual object list does not match object list stored in metadata for prefix {prefix}: \
         missing {missing:?}, unexpected {unexpected:?}"
    )]
    ObjectListMismatch {
        /// The backup's prefix (`service_metadata`).
        prefix: String,
        /// Names in the metadata but not in the bucket (at most the first 10).
        missing: Vec<String>,
        /// Names in the bucket but not in the metadata (at most the first 10).
        unexpected: Vec<String>,
    },
    /// A restore was asked for with no backups.
    #[error("restore chain is empty")]
    EmptyChain,
    /// The chain handed to the restore planner is not linked base-first.
    #[error("restore chain broken at position {index}: parent_id {found:?}, expected {expected:?}")]
    ChainBroken {
        /// Position in the chain (0 = base).
        index: usize,
        /// The parent id the previous link implies (`None` for the base).
        expected: Option<String>,
        /// The `parent_id` in this backup's metadata.
        found: Option<String>,
    },
    /// A backup record is not valid base64.
    #[error("backup record is not base64: {0}")]
    RecordBase64(#[from] base64::DecodeError),
    /// A backup record lacks a field `cinder backup-import` requires.
    #[error("backup record lacks required field {0:?}")]
    RecordField(&'static str),
}

impl crate::error::Classify for CinderError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            CinderError::ZeroSize { .. }
            | CinderError::ObjectSizeNotBlockMultiple { .. }
            | CinderError::UnsupportedCompression { .. }
            | CinderError::RecordBase64(_)
            | CinderError::RecordField(_) => ErrorKind::Usage,
            CinderError::ParentBlockSize { .. }
            | CinderError::VolumeGrew { .. }
            | CinderError::ParentTooShort { .. } => ErrorKind::Refused,
            CinderError::HashCount { .. }
            | CinderError::ChunkMisaligned { .. }
            | CinderError::Compress { .. } => ErrorKind::Internal,
            CinderError::EmptyChain => ErrorKind::NotFound,
            CinderError::Decompress { .. }
            | CinderError::LengthMismatch { .. }
            | CinderError::Json { .. }
            | CinderError::ObjectEntry { .. }
            | CinderError::BadHash { .. }
            | CinderError::UnsupportedVersion { .. }
            | CinderError::ObjectListMismatch { .. }
            | CinderError::ChainBroken { .. } => ErrorKind::Integrity,
        }
    }
}
