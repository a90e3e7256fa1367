//! Object stores behind one blocking trait: S3 (through aws-sdk-s3) and a local directory.
//!
//! The trait is synchronous on purpose: the data plane runs on plain OS threads (readers,
//! compressors, an uploader pool, a downloader pool), and concurrency comes from how many of those
//! threads call the store at once. The S3 implementation owns a small tokio runtime and blocks on
//! it; nothing outside this module sees async code. Keys are relative to the repository root
//! (the store adds its bucket prefix or directory). This module knows nothing of the repository
//! format: it moves opaque bytes.

use std::fmt;

use bytes::Bytes;

use crate::error::{Classify, ErrorKind, Status};

mod insecure_tls;
pub mod local;
pub mod retry;
pub mod s3;

pub use local::LocalStore;
pub use retry::{RetryPolicy, Retrying};
pub use s3::{S3Options, S3Store};

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root.
    pub key: String,
    /// Stored size in bytes.
    pub size_bytes: u64,
}

/// One object in a dated listing (`ObjectStore::list_dated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatedObject {
    /// Key relative to the repository root.
    pub key: String,
    /// Stored size in bytes.
    pub size_bytes: u64,
    /// When the store says the object was written (Unix seconds, S3 `LastModified`, a file's
    /// mtime): the store's clock, not this host's. Garbage collection measures every age with it.
    pub modified_unix: u64,
}

/// An in-progress multipart upload, as returned by `ObjectStore::multipart_begin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadId(pub String);

/// What the store returned for one uploaded part; handed back to `multipart_complete`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartReceipt {
    /// 1-based part number, as in S3.
    pub part_number: u32,
    /// The ETag the store returned for the part.
    pub etag: String,
    /// The part's CRC32C as sent (base64), when the store checks one; handed back on completion.
    pub checksum_crc32c: Option<String>,
}

/// An in-progress multipart upload found by `ObjectStore::multipart_list` (abandoned uploads are
/// aborted by repair tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// Key relative to the repository root.
    pub key: String,
    /// The upload id.
    pub upload_id: UploadId,
    /// When the upload was started (Unix seconds), when the store says.
    pub initiated_unix: Option<u64>,
}

/// A blocking object store. Every method may be called from many threads at once.
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Stores `data` under `key`, replacing any existing object atomically.
    ///
    /// # Errors
    /// `StoreError` on any failure; nothing partial is visible under `key`.
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;

    /// Reads the whole object.
    ///
    /// # Errors
    /// `StoreError::NotFound` when the key does not exist, other variants on failure.
    fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Reads `length` bytes at `offset`. Returns exactly `length` bytes or an error.
    ///
    /// # Errors
    /// `StoreError::NotFound`, `StoreError::ShortRead` when the object is shorter, others.
    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError>;

    /// Lists every object whose key starts with `prefix`, sorted by key.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;

    /// Lists like `list`, with each object's modification time by the store's clock.
    ///
    /// # Errors
    /// `StoreError` on failure; `StoreError::Config` from a store that keeps no such time (the
    /// default), which garbage collection then refuses to run on.
    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        Err(StoreError::Config(format!(
            "{} does not report modification times (needed by prune to list {prefix})",
            self.describe()
        )))
    }

    /// Deletes `key`. Deleting a missing key succeeds.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Starts a multipart upload to `key`. The object becomes visible only on completion.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError>;

    /// Uploads part `part_number` (1-based). Re-uploading the same number replaces it.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError>;

    /// Completes the upload from `parts` (sorted by part number), making the object visible.
    ///
    /// # Errors
    /// `StoreError` on failure; the upload may then be aborted.
    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError>;

    /// Aborts the upload and frees its parts. Aborting an unknown upload succeeds.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError>;

    /// Lists multipart uploads in progress under `prefix`.
    ///
    /// # Errors
    /// `StoreError` on failure.
    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError>;

    /// Transient failures retried so far by this store (0 for stores that do not retry).
    fn retry_count(&self) -> u64 {
        0
    }

    /// A short description for logs and events, e.g. `s3://bucket/prefix at http://...` or a path.
    /// Never contains credentials.
    fn describe(&self) -> String;
}

/// Failures of an object store, with the key and operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object not found: {key}")]
    NotFound {
        /// Key relative to the repository root.
        key: String,
    },
    /// The object is shorter than the requested range.
    #[error("short read of {key} at offset {offset}: wanted {wanted} bytes, got {got}")]
    ShortRead {
        /// Key relative to the repository root.
        key: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        wanted: u64,
        /// Returned length.
        got: u64,
    },
    /// The store refused the credentials or the access (HTTP 401/403, bad signature).
    #[error("access denied by {endpoint} during {operation} of {key}: {detail}")]
    AccessDenied {
        /// Endpoint or path of the store.
        endpoint: String,
        /// Operation name, e.g. `PutObject`.
        operation: &'static str,
        /// Key relative to the repository root.
        key: String,
        /// What the store said.
        detail: String,
    },
    /// The store could not be reached or did not answer in time.
    #[error("object store {endpoint} unreachable during {operation} of {key}: {detail}")]
    Unreachable {
        /// Endpoint or path of the store.
        endpoint: String,
        /// Operation name.
        operation: &'static str,
        /// Key relative to the repository root.
        key: String,
        /// Connection error or timeout text.
        detail: String,
    },
    /// Any other failure of an operation; `transient` says whether a retry may help
    /// (throttling, 5xx) or not (other 4xx, local I/O errors).
    #[error("{operation} of {key} failed: {detail}")]
    Failed {
        /// Operation name.
        operation: &'static str,
        /// Key relative to the repository root.
        key: String,
        /// What failed.
        detail: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// The store configuration is invalid (missing credentials, bad endpoint URL, bad path).
    #[error("invalid object store configuration: {0}")]
    Config(String),
}

impl Classify for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::ShortRead { .. } => ErrorKind::Integrity,
            StoreError::Config(_) => ErrorKind::Usage,
            StoreError::AccessDenied { .. }
            | StoreError::Unreachable { .. }
            | StoreError::Failed { .. } => ErrorKind::Store,
        }
    }

    fn status(&self) -> Status {
        match self {
            StoreError::Unreachable { .. } => Status::Transient,
            StoreError::Failed { transient: true, .. } => Status::Transient,
            _ => Status::Permanent,
        }
    }
}
