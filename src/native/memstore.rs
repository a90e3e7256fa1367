//! Test support for the garbage-collection race tests: an in-memory object store with a server
//! clock the test controls and a hook run before every operation (to interleave another job at
//! an exact point, or to make every operation from some point on fail, as a crash would).
//!
//! It lives here, not in a shared `testing` module, to stay out of the way of the crate-wide
//! test doubles; objects behave as on S3: whole-object PUTs, `LastModified` from the server
//! clock (a multipart object's is its upload's initiation, as on S3), sorted listings.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::native::repo::lock;
use crate::store::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId, sorted_range,
};

/// An operation, as the hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
    Multipart,
}

/// Runs before an operation on `key`; an error fails the operation.
pub type Hook = Arc<dyn Fn(Op, &str) -> Result<(), StoreError> + Send + Sync>;

#[derive(Default)]
struct State {
    objects: BTreeMap<String, (Bytes, u64)>,
    uploads: BTreeMap<String, (String, BTreeMap<u32, Bytes>, u64)>,
    next_upload: u64,
}

/// The store.
pub struct MemStore {
    state: Mutex<State>,
    clock: AtomicU64,
    hook: Mutex<Option<Hook>>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemStore")
    }
}

thread_local! {
    /// Set while a hook runs: what the hook does through the store does not run hooks again.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

impl MemStore {
    /// An empty store whose clock reads `now` (Unix seconds).
    pub fn new(now: u64) -> Arc<MemStore> {
        Arc::new(MemStore {
            state: Mutex::new(State::default()),
            clock: AtomicU64::new(now),
            hook: Mutex::new(None),
        })
    }

    /// The server clock.
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// Moves the server clock forward.
    pub fn advance(&self, secs: u64) {
        let _ = self.clock.fetch_add(secs, Ordering::SeqCst);
    }

    /// Installs (or removes) the hook.
    pub fn set_hook(&self, hook: Option<Hook>) {
        *lock(&self.hook) = hook;
    }

    /// Keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        lock(&self.state).objects.keys().filter(|key| key.starts_with(prefix)).cloned().collect()
    }

    /// Total bytes under `prefix`.
    pub fn bytes(&self, prefix: &str) -> u64 {
        let state = lock(&self.state);
        state
            .objects
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(_, (data, _))| data.len() as u64)
            .sum()
    }

    /// Sets the `LastModified` of `key` (to age an object in a test).
    pub fn set_modified(&self, key: &str, modified: u64) {
        lock(&self.state).objects.get_mut(key).expect("object exists").1 = modified;
    }

    fn before(&self, op: Op, key: &str) -> Result<(), StoreError> {
        if IN_HOOK.with(Cell::get) {
            return Ok(());
        }
        let Some(hook) = lock(&self.hook).clone() else { return Ok(()) };
        IN_HOOK.with(|flag| flag.set(true));
        let result = hook(op, key);
        IN_HOOK.with(|flag| flag.set(false));
        result
    }
}

/// A failure as a crashed process would see it (the operation never happened).
pub fn crashed(key: &str) -> StoreError {
    StoreError::Failed {
        operation: "crash",
        key: key.into(),
        detail: "crashed".into(),
        transient: false,
    }
}

impl ObjectStore for Arc<MemStore> {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.before(Op::Put, key)?;
        let now = self.now();
        let _ = lock(&self.state).objects.insert(key.to_owned(), (data, now));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.before(Op::Get, key)?;
        let state = lock(&self.state);
        let (data, _) = state.objects.get(key).ok_or(StoreError::NotFound { key: key.into() })?;
        Ok(data.clone())
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        let data = self.get(key)?;
        let end = offset + length;
        if end > data.len() as u64 {
            let got = (data.len() as u64).saturating_sub(offset);
            return Err(StoreError::ShortRead { key: key.into(), offset, wanted: length, got });
        }
        Ok(data.slice(offset as usize..end as usize))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_range(prefix, KeyRange::ALL)
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.list_dated_range(prefix, KeyRange::ALL)
    }

    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        let dated = self.list_dated_range(prefix, range)?;
        Ok(dated.into_iter().map(|o| ObjectInfo { key: o.key, size_bytes: o.size_bytes }).collect())
    }

    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        self.before(Op::List, prefix)?;
        let state = lock(&self.state);
        Ok(sorted_range(&state.objects, prefix, range)
            .map(|(key, (data, modified))| DatedObject {
                key: key.clone(),
                size_bytes: data.len() as u64,
                modified_unix: *modified,
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.before(Op::Delete, key)?;
        let _ = lock(&self.state).objects.remove(key);
        Ok(())
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        self.before(Op::Multipart, key)?;
        let now = self.now();
        let mut state = lock(&self.state);
        state.next_upload += 1;
        let id = format!("{:032x}", state.next_upload);
        let _ = state.uploads.insert(id.clone(), (key.to_owned(), BTreeMap::new(), now));
        Ok(UploadId(id))
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        self.before(Op::Multipart, key)?;
        let mut state = lock(&self.state);
        let upload =
            state.uploads.get_mut(&upload_id.0).ok_or(StoreError::NotFound { key: key.into() })?;
        let _ = upload.1.insert(part_number, data);
        Ok(PartReceipt { part_number, etag: format!("e{part_number}"), checksum_crc32c: None })
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        self.before(Op::Multipart, key)?;
        let mut state = lock(&self.state);
        let (_, stored, initiated) =
            state.uploads.remove(&upload_id.0).ok_or(StoreError::NotFound { key: key.into() })?;
        let mut data = Vec::new();
        for part in parts {
            data.extend_from_slice(&stored[&part.part_number]);
        }
        let _ = state.objects.insert(key.to_owned(), (Bytes::from(data), initiated));
        Ok(())
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        self.before(Op::Multipart, key)?;
        let _ = lock(&self.state).uploads.remove(&upload_id.0);
        Ok(())
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.before(Op::List, prefix)?;
        let state = lock(&self.state);
        Ok(state
            .uploads
            .iter()
            .filter(|(_, (key, _, _))| key.starts_with(prefix))
            .map(|(id, (key, _, initiated))| PendingUpload {
                key: key.clone(),
                upload_id: UploadId(id.clone()),
                initiated_unix: Some(*initiated),
            })
            .collect())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::MemStore;

    #[test]
    fn list_range_keeps_its_bounds() {
        crate::store::range_check::check(&MemStore::new(1_000));
    }
}
