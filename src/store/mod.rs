//! Object stores behind one blocking trait: S3 (through aws-sdk-s3) and a local directory.
//!
//! The trait is synchronous on purpose: the data plane runs on plain OS threads (readers,
//! compressors, an uploader pool, a downloader pool), and concurrency comes from how many of those
//! threads call the store at once. The S3 implementation owns a small tokio runtime and blocks on
//! it; nothing outside this module sees async code. Keys are relative to the repository root
//! (the store adds its bucket prefix or directory). This module knows nothing of the repository
//! format: it moves opaque bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

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

/// The keys of a listing after `start_after` and before `end` (both excluded): S3 ListObjectsV2's
/// `StartAfter`, and a point where paging stops. `KeyRange::ALL` is every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange<'a> {
    /// Only keys strictly greater than this one; `""` is no bound (no key is empty).
    pub start_after: &'a str,
    /// Only keys strictly less than this one, when given.
    pub end: Option<&'a str>,
}

impl KeyRange<'_> {
    /// Every key.
    pub const ALL: KeyRange<'static> = KeyRange { start_after: "", end: None };

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &str) -> bool {
        key > self.start_after && self.end.is_none_or(|end| key < end)
    }

    /// Whether `key` lies at or past the end (every later key of a sorted listing does too).
    pub fn is_past(&self, key: &str) -> bool {
        self.end.is_some_and(|end| key >= end)
    }
}

/// The entries of a map sorted by key whose keys lie under `prefix` and in `range`, in key order:
/// a listing of an in-memory store, visiting only those entries.
pub fn sorted_range<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
    range: KeyRange<'a>,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    let from = if range.start_after < prefix {
        Bound::Included(prefix)
    } else {
        Bound::Excluded(range.start_after)
    };
    map.range::<str, _>((from, Bound::Unbounded))
        .take_while(move |(key, _)| key.starts_with(prefix) && !range.is_past(key))
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

    /// Lists like `list`, only the keys in `range`. The default filters `list`; stores that can
    /// skip the rest (S3's `StartAfter`, a sorted map) override it.
    ///
    /// # Errors
    /// As `list`.
    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut listed = self.list(prefix)?;
        listed.retain(|object| range.contains(&object.key));
        Ok(listed)
    }

    /// Lists like `list_dated`, only the keys in `range` (the default filters `list_dated`).
    ///
    /// # Errors
    /// As `list_dated`.
    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        let mut listed = self.list_dated(prefix)?;
        listed.retain(|object| range.contains(&object.key));
        Ok(listed)
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

/// A check every store's range listing passes, run on each store by its tests.
#[cfg(test)]
pub(crate) mod range_check {
    use bytes::Bytes;

    use super::{KeyRange, ObjectStore};

    /// Keys the check writes: files at several depths, keys that are prefixes of others, and
    /// directories (`b/3`) that are not keys.
    pub(crate) const KEYS: [&str; 9] =
        ["a", "b/1", "b/10", "b/2", "b/3/x", "b/3/y", "b/3/z/w", "bb", "c/d/e"];

    fn keys(store: &dyn ObjectStore, prefix: &str, range: KeyRange<'_>) -> Vec<String> {
        let plain: Vec<String> =
            store.list_range(prefix, range).unwrap().into_iter().map(|info| info.key).collect();
        let dated: Vec<String> = store
            .list_dated_range(prefix, range)
            .unwrap()
            .into_iter()
            .map(|object| object.key)
            .collect();
        assert_eq!(plain, dated, "list_range and list_dated_range of {prefix:?} {range:?}");
        plain
    }

    /// Writes `KEYS` into the empty `store` and checks `list_range` and `list_dated_range`:
    /// both bounds excluded, bounds that are no key, below, inside or past the prefix, a prefix
    /// without keys, and every (start_after, end) pair from a set of bounds against `list`
    /// filtered.
    pub(crate) fn check(store: &dyn ObjectStore) {
        for key in KEYS {
            store.put(key, Bytes::from(key.as_bytes().to_vec())).unwrap();
        }
        let range = |start_after, end| KeyRange { start_after, end };
        assert_eq!(keys(store, "", KeyRange::ALL), KEYS);
        // key == start_after and key == end are both left out.
        assert_eq!(keys(store, "b/", range("b/10", Some("b/3/y"))), ["b/2", "b/3/x"]);
        assert_eq!(keys(store, "b/", range("b/1", Some("b/2"))), ["b/10"]);
        assert_eq!(keys(store, "b/", range("b/1", Some("b/10"))), Vec::<String>::new());
        // Bounds that name directories, not keys: nothing under them is skipped or kept wrongly.
        assert_eq!(keys(store, "b/", range("b/3", None)), ["b/3/x", "b/3/y", "b/3/z/w"]);
        assert_eq!(keys(store, "b/", range("b/3/", None)), ["b/3/x", "b/3/y", "b/3/z/w"]);
        assert_eq!(keys(store, "b/", range("b/3/z", None)), ["b/3/z/w"]);
        assert_eq!(keys(store, "b/", range("", Some("b/3"))), ["b/1", "b/10", "b/2"]);
        assert_eq!(
            keys(store, "b/", range("", Some("b/3/z"))),
            ["b/1", "b/10", "b/2", "b/3/x", "b/3/y"]
        );
        // Bounds below and past the prefix.
        assert_eq!(keys(store, "b/", range("a", None)), KEYS[1..7]);
        assert_eq!(keys(store, "b/", range("bb", None)), Vec::<String>::new());
        assert_eq!(keys(store, "b/", range("", Some("b/"))), Vec::<String>::new());
        assert_eq!(keys(store, "b/", range("", Some("c"))), KEYS[1..7]);
        // A prefix without keys.
        assert_eq!(keys(store, "zzz/", KeyRange::ALL), Vec::<String>::new());
        assert_eq!(keys(store, "a/", range("", Some("z"))), Vec::<String>::new());
        // Every pair of bounds, against the whole listing filtered.
        let mut bounds: Vec<String> = vec![String::new(), "\0".into(), "~".into()];
        for key in KEYS {
            for cut in 1..=key.len() {
                bounds.push(key[..cut].to_owned());
                bounds.push(format!("{}\0", &key[..cut]));
            }
        }
        for prefix in ["", "b", "b/", "b/3/"] {
            let all: Vec<String> =
                store.list(prefix).unwrap().into_iter().map(|info| info.key).collect();
            for start_after in &bounds {
                for end in bounds.iter().map(|end| Some(end.as_str())).chain([None]) {
                    let range = KeyRange { start_after, end };
                    let expected: Vec<String> =
                        all.iter().filter(|key| range.contains(key)).cloned().collect();
                    assert_eq!(keys(store, prefix, range), expected, "{prefix:?} {range:?}");
                }
            }
        }
    }
}
