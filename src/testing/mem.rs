//! `MemStore`, an in-memory `ObjectStore` with S3's semantics, and `Clock`, the settable clock
//! that stamps its objects and multipart uploads.
//!
//! What it keeps of S3: a PUT replaces an object atomically; a ranged GET returns exactly the
//! range or `ShortRead`; listings are sorted by key; a multipart upload is invisible until it
//! completes; re-uploading a part number replaces the part (and its ETag); completion takes the
//! listed parts in strictly increasing part order, each matching the ETag of the part as stored,
//! every part but the last at least `MIN_PART_BYTES`, and discards parts it does not list;
//! abort frees the parts; uploads in progress are listed with their start time. What it does not
//! model: eventual consistency, versioning, object metadata beyond size and modification time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use md5::{Digest as _, Md5};

use crate::plane::lock;
use crate::store::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId, sorted_range,
};

/// S3's smallest part, except for the last part of an upload (`EntityTooSmall` otherwise).
pub const MIN_PART_BYTES: usize = 5 << 20;
/// S3's largest part number.
pub const MAX_PART_NUMBER: u32 = 10_000;

/// A clock shared by a store and its test: follows the system clock until `set`, then stands
/// still except when `advance`d. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None` while following the system clock; else the time since the Unix epoch.
    fixed: Arc<Mutex<Option<Duration>>>,
}

impl Clock {
    /// A clock that follows the system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock standing at `since_epoch`.
    pub fn at(since_epoch: Duration) -> Clock {
        Clock { fixed: Arc::new(Mutex::new(Some(since_epoch))) }
    }

    /// The time since the Unix epoch.
    pub fn now(&self) -> Duration {
        lock(&self.fixed).unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
        })
    }

    /// Whole seconds since the Unix epoch.
    pub fn now_unix(&self) -> u64 {
        self.now().as_secs()
    }

    /// Stops the clock at `since_epoch`.
    pub fn set(&self, since_epoch: Duration) {
        *lock(&self.fixed) = Some(since_epoch);
    }

    /// Moves the clock forward by `by` (stopping it at the current time first if it followed
    /// the system clock).
    pub fn advance(&self, by: Duration) {
        let mut fixed = lock(&self.fixed);
        let now = fixed.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
        });
        *fixed = Some(now + by);
    }
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemObject {
    /// Its bytes.
    pub data: Bytes,
    /// Its ETag: the MD5 of a single PUT, `md5(part md5s)-N` for a multipart upload, as in S3.
    pub etag: String,
    /// When it was stored (the clock's time at the PUT or completion).
    pub modified: Duration,
}

/// One multipart upload in progress.
#[derive(Debug, Clone)]
struct Upload {
    key: String,
    initiated: Duration,
    /// Part number to (bytes, etag).
    parts: BTreeMap<u32, (Bytes, String)>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, MemObject>,
    /// Upload id to upload.
    uploads: BTreeMap<String, Upload>,
}

/// How often each operation was called (successful or not), for assertions.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// `put`.
    pub put: AtomicU64,
    /// `get`.
    pub get: AtomicU64,
    /// `get_range`.
    pub get_range: AtomicU64,
    /// `list`.
    pub list: AtomicU64,
    /// `delete`.
    pub delete: AtomicU64,
    /// `multipart_begin`.
    pub multipart_begin: AtomicU64,
    /// `multipart_put_part`.
    pub multipart_put_part: AtomicU64,
    /// `multipart_complete`.
    pub multipart_complete: AtomicU64,
    /// `multipart_abort`.
    pub multipart_abort: AtomicU64,
    /// `multipart_list`.
    pub multipart_list: AtomicU64,
}

fn count(counter: &AtomicU64) {
    let _ = counter.fetch_add(1, Ordering::Relaxed);
}

/// An in-memory object store. Clones share the same objects, uploads, counters and clock, so a
/// test can hand one clone to a job (as `Box<dyn ObjectStore>`) and inspect another.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
    clock: Clock,
    calls: Arc<CallCounts>,
    next_upload: Arc<AtomicU64>,
}

fn md5_hex(data: &[u8]) -> String {
    Md5::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn failed(operation: &'static str, key: &str, detail: String) -> StoreError {
    StoreError::Failed { operation, key: key.to_owned(), detail, transient: false }
}

impl MemStore {
    /// An empty store on the system clock.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// An empty store stamping objects and uploads with `clock`.
    pub fn with_clock(clock: Clock) -> MemStore {
        MemStore { clock, ..MemStore::default() }
    }

    /// The store's clock (shared with its clones).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// How often each operation was called.
    pub fn calls(&self) -> &CallCounts {
        &self.calls
    }

    /// The object at `key`, read without counting a call.
    pub fn object(&self, key: &str) -> Option<MemObject> {
        lock(&self.state).objects.get(key).cloned()
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        lock(&self.state).objects.keys().cloned().collect()
    }

    /// Every key under `prefix`, sorted.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        self.keys().into_iter().filter(|key| key.starts_with(prefix)).collect()
    }

    /// Stores `data` at `key` without counting a call (to set up or tamper with a test's bucket).
    pub fn insert(&self, key: &str, data: impl Into<Bytes>) {
        let data = data.into();
        let object = MemObject { etag: md5_hex(&data), data, modified: self.clock.now() };
        let _ = lock(&self.state).objects.insert(key.to_owned(), object);
    }

    /// Replaces the bytes at `key` with `change(bytes)`, keeping its time; returns false when
    /// there is no such object.
    pub fn modify(&self, key: &str, change: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut state = lock(&self.state);
        let Some(object) = state.objects.get_mut(key) else { return false };
        let mut data = object.data.to_vec();
        change(&mut data);
        object.data = Bytes::from(data);
        true
    }

    /// Multipart uploads in progress (every key), sorted by key then id.
    pub fn pending_uploads(&self) -> Vec<PendingUpload> {
        let state = lock(&self.state);
        let mut pending: Vec<PendingUpload> = state
            .uploads
            .iter()
            .map(|(id, upload)| PendingUpload {
                key: upload.key.clone(),
                upload_id: UploadId(id.clone()),
                initiated_unix: Some(upload.initiated.as_secs()),
            })
            .collect();
        pending.sort_by(|a, b| (&a.key, &a.upload_id.0).cmp(&(&b.key, &b.upload_id.0)));
        pending
    }

    /// Total bytes of stored objects.
    pub fn stored_bytes(&self) -> u64 {
        lock(&self.state).objects.values().map(|o| o.data.len() as u64).sum()
    }

    fn upload_of<'s>(
        state: &'s mut State,
        operation: &'static str,
        key: &str,
        upload_id: &UploadId,
    ) -> Result<&'s mut Upload, StoreError> {
        match state.uploads.get_mut(&upload_id.0) {
            Some(upload) if upload.key == key => Ok(upload),
            _ => Err(failed(operation, key, format!("NoSuchUpload: {}", upload_id.0))),
        }
    }
}

impl ObjectStore for MemStore {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        count(&self.calls.put);
        self.insert(key, data);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        count(&self.calls.get);
        lock(&self.state)
            .objects
            .get(key)
            .map(|object| object.data.clone())
            .ok_or_else(|| StoreError::NotFound { key: key.to_owned() })
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        count(&self.calls.get_range);
        let data = lock(&self.state)
            .objects
            .get(key)
            .map(|object| object.data.clone())
            .ok_or_else(|| StoreError::NotFound { key: key.to_owned() })?;
        let size = data.len() as u64;
        let end = offset.saturating_add(length);
        if end > size {
            let got = size.saturating_sub(offset).min(length);
            return Err(StoreError::ShortRead { key: key.to_owned(), offset, wanted: length, got });
        }
        let (from, to) = (
            usize::try_from(offset).expect("within a stored object"),
            usize::try_from(end).expect("within a stored object"),
        );
        Ok(data.slice(from..to))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_range(prefix, KeyRange::ALL)
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.list_dated_range(prefix, KeyRange::ALL)
    }

    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        Ok(self
            .list_dated_range(prefix, range)?
            .into_iter()
            .map(|object| ObjectInfo { key: object.key, size_bytes: object.size_bytes })
            .collect())
    }

    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        count(&self.calls.list);
        let state = lock(&self.state);
        Ok(sorted_range(&state.objects, prefix, range)
            .map(|(key, object)| DatedObject {
                key: key.clone(),
                size_bytes: object.data.len() as u64,
                modified_unix: object.modified.as_secs(),
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        count(&self.calls.delete);
        let _ = lock(&self.state).objects.remove(key);
        Ok(())
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        count(&self.calls.multipart_begin);
        let number = self.next_upload.fetch_add(1, Ordering::Relaxed);
        let id = format!("mem-upload-{number:06}");
        let upload =
            Upload { key: key.to_owned(), initiated: self.clock.now(), parts: BTreeMap::new() };
        let _ = lock(&self.state).uploads.insert(id.clone(), upload);
        Ok(UploadId(id))
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        const OP: &str = "UploadPart";
        count(&self.calls.multipart_put_part);
        if part_number == 0 || part_number > MAX_PART_NUMBER {
            return Err(failed(OP, key, format!("InvalidArgument: part number {part_number}")));
        }
        let etag = md5_hex(&data);
        let mut state = lock(&self.state);
        let upload = MemStore::upload_of(&mut state, OP, key, upload_id)?;
        let _ = upload.parts.insert(part_number, (data, etag.clone()));
        Ok(PartReceipt { part_number, etag, checksum_crc32c: None })
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        const OP: &str = "CompleteMultipartUpload";
        count(&self.calls.multipart_complete);
        let mut state = lock(&self.state);
        let upload = MemStore::upload_of(&mut state, OP, key, upload_id)?;
        if parts.is_empty() {
            return Err(failed(OP, key, "MalformedXML: no parts".into()));
        }
        if parts.windows(2).any(|pair| pair[0].part_number >= pair[1].part_number) {
            return Err(failed(OP, key, "InvalidPartOrder".into()));
        }
        let mut body = BytesMut::new();
        let mut etags = Vec::with_capacity(parts.len() * 16);
        for (position, receipt) in parts.iter().enumerate() {
            let Some((data, etag)) = upload.parts.get(&receipt.part_number) else {
                return Err(failed(
                    OP,
                    key,
                    format!("InvalidPart: part {} was never uploaded", receipt.part_number),
                ));
            };
            if *etag != receipt.etag {
                return Err(failed(
                    OP,
                    key,
                    format!("InvalidPart: part {} has ETag {etag}", receipt.part_number),
                ));
            }
            if position + 1 < parts.len() && data.len() < MIN_PART_BYTES {
                return Err(failed(
                    OP,
                    key,
                    format!("EntityTooSmall: part {} is {} bytes", receipt.part_number, data.len()),
                ));
            }
            body.extend_from_slice(data);
            etags.extend(Md5::digest(data));
        }
        let etag = format!("{}-{}", md5_hex(&etags), parts.len());
        let _ = state.uploads.remove(&upload_id.0);
        let object = MemObject { data: body.freeze(), etag, modified: self.clock.now() };
        let _ = state.objects.insert(key.to_owned(), object);
        Ok(())
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        count(&self.calls.multipart_abort);
        let mut state = lock(&self.state);
        if state.uploads.get(&upload_id.0).is_some_and(|upload| upload.key == key) {
            let _ = state.uploads.remove(&upload_id.0);
        }
        Ok(())
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        count(&self.calls.multipart_list);
        Ok(self.pending_uploads().into_iter().filter(|u| u.key.starts_with(prefix)).collect())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_range_keeps_its_bounds() {
        crate::store::range_check::check(&MemStore::new());
    }

    fn part(fill: u8, len: usize) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    // Objects: put replaces, ranged reads are exact or short, listings are sorted and filtered,
    // deleting a missing key succeeds, and the clock stamps modification times.
    #[test]
    fn objects_behave_like_s3() {
        let clock = Clock::at(Duration::from_secs(1_000));
        let store = MemStore::with_clock(clock.clone());
        store.put("b/2", Bytes::from_static(b"two")).unwrap();
        store.put("a/1", Bytes::from_static(b"one")).unwrap();
        clock.advance(Duration::from_secs(5));
        store.put("b/1", Bytes::from_static(b"first")).unwrap();
        store.put("b/1", Bytes::from_static(b"replaced")).unwrap();
        assert_eq!(store.get("b/1").unwrap(), Bytes::from_static(b"replaced"));
        assert_eq!(store.object("a/1").unwrap().modified, Duration::from_secs(1_000));
        assert_eq!(store.object("b/1").unwrap().modified, Duration::from_secs(1_005));
        assert_eq!(store.object("a/1").unwrap().etag, md5_hex(b"one"));
        let listed: Vec<_> = store.list("b/").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(listed, ["b/1", "b/2"]);
        assert_eq!(store.list("").unwrap().len(), 3);
        assert_eq!(store.list("b/1").unwrap()[0].size_bytes, 8);
        assert_eq!(store.get_range("b/1", 2, 3).unwrap(), Bytes::from_static(b"pla"));
        assert_eq!(store.get_range("b/1", 8, 0).unwrap().len(), 0);
        assert!(matches!(
            store.get_range("b/1", 6, 5),
            Err(StoreError::ShortRead { offset: 6, wanted: 5, got: 2, .. })
        ));
        assert!(matches!(store.get_range("b/1", 50, 1), Err(StoreError::ShortRead { got: 0, .. })));
        assert!(matches!(store.get("nope"), Err(StoreError::NotFound { .. })));
        store.delete("b/1").unwrap();
        store.delete("b/1").unwrap();
        assert_eq!(store.keys(), ["a/1", "b/2"]);
        assert_eq!(store.calls().put.load(Ordering::Relaxed), 4);
    }

    // Multipart: invisible until complete, parts replace, complete concatenates in part order and
    // checks ETags and part sizes, unlisted parts are dropped, abort frees, pending uploads list
    // with their start time.
    #[test]
    fn multipart_behaves_like_s3() {
        let clock = Clock::at(Duration::from_secs(77));
        let store = MemStore::with_clock(clock.clone());
        let id = store.multipart_begin("packs/x").unwrap();
        clock.advance(Duration::from_secs(3));
        let other = store.multipart_begin("index/y").unwrap();
        let pending = store.multipart_list("packs/").unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].upload_id.clone(), pending[0].initiated_unix),
            (id.clone(), Some(77))
        );
        assert_eq!(store.multipart_list("").unwrap().len(), 2);

        let r2 = store.multipart_put_part("packs/x", &id, 2, part(2, 10)).unwrap();
        let stale = store.multipart_put_part("packs/x", &id, 1, part(9, MIN_PART_BYTES)).unwrap();
        let r1 = store.multipart_put_part("packs/x", &id, 1, part(1, MIN_PART_BYTES)).unwrap();
        let r3 = store.multipart_put_part("packs/x", &id, 3, part(3, 7)).unwrap();
        assert_ne!(stale.etag, r1.etag);
        assert!(store.get("packs/x").is_err(), "invisible before completion");
        let error = store.multipart_complete("packs/x", &id, &[stale, r2.clone()]).unwrap_err();
        assert!(error.to_string().contains("InvalidPart"), "{error}");
        let error =
            store.multipart_complete("packs/x", &id, &[r2.clone(), r1.clone()]).unwrap_err();
        assert!(error.to_string().contains("InvalidPartOrder"), "{error}");
        let error = store.multipart_complete("packs/x", &id, &[r2.clone(), r3]).unwrap_err();
        assert!(error.to_string().contains("EntityTooSmall"), "{error}");
        assert!(
            store.multipart_complete("packs/y", &id, std::slice::from_ref(&r1)).is_err(),
            "wrong key"
        );
        store.multipart_complete("packs/x", &id, &[r1, r2]).unwrap();
        let object = store.object("packs/x").unwrap();
        assert_eq!(object.data.len(), MIN_PART_BYTES + 10);
        assert!(object.data[..MIN_PART_BYTES].iter().all(|&b| b == 1));
        assert!(object.data[MIN_PART_BYTES..].iter().all(|&b| b == 2));
        assert!(object.etag.ends_with("-2"));
        assert_eq!(object.modified, Duration::from_secs(80));
        assert_eq!(store.multipart_list("packs/").unwrap(), []);
        assert!(store.multipart_put_part("packs/x", &id, 4, part(4, 1)).is_err(), "upload gone");

        store.multipart_abort("index/y", &other).unwrap();
        store.multipart_abort("index/y", &other).unwrap();
        assert_eq!(store.pending_uploads(), []);
        assert_eq!(store.keys(), ["packs/x"]);
    }
}
