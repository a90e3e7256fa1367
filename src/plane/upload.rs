//! Object upload: the register of multipart uploads a job has open, aborted when the job fails
//! (`OpenUploads`), and the uploader pool both backups use (`Uploader`), which uploads objects as
//! single PUTs or as multipart parts of many objects at once and completes each object when its
//! last part lands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{JobControl, lock};
use crate::error::EngineError;
use crate::progress::Progress;
use crate::store::{ObjectStore, PartReceipt, UploadId};
use crate::throttle::Throttle;

/// The multipart uploads a job has begun and not completed, keyed by object key.
#[derive(Debug, Default)]
pub struct OpenUploads {
    open: std::sync::Mutex<HashMap<String, UploadId>>,
}

impl OpenUploads {
    /// Begins a multipart upload of `key` and registers it.
    ///
    /// # Errors
    /// Store errors.
    pub fn begin(&self, store: &dyn ObjectStore, key: &str) -> Result<UploadId, EngineError> {
        let upload_id = store.multipart_begin(key)?;
        let _ = lock(&self.open).insert(key.to_owned(), upload_id.clone());
        Ok(upload_id)
    }

    /// Completes the upload of `key` from `receipts` (sorted by part number) and forgets it.
    ///
    /// # Errors
    /// Store errors (the upload stays registered, to be aborted).
    pub fn complete(
        &self,
        store: &dyn ObjectStore,
        key: &str,
        upload_id: &UploadId,
        receipts: &[PartReceipt],
    ) -> Result<(), EngineError> {
        for (position, receipt) in receipts.iter().enumerate() {
            assert_eq!(receipt.part_number as usize, position + 1, "parts are numbered 1..=n");
        }
        store.multipart_complete(key, upload_id, receipts)?;
        let _ = lock(&self.open).remove(key);
        Ok(())
    }

    /// Aborts every registered upload (best effort: a failed abort leaves an upload for the next
    /// run's upkeep to find).
    pub fn abort_all(&self, store: &dyn ObjectStore) {
        for (key, upload_id) in lock(&self.open).drain() {
            let _ = store.multipart_abort(&key, &upload_id);
        }
    }
}

/// An object being uploaded by the pool: a single PUT, or a multipart upload whose parts are
/// uploaded by any uploader; `tag` is what the job needs once it is stored.
#[derive(Debug)]
pub struct PooledObject<T> {
    /// The object key.
    pub key: String,
    /// Set for a multipart upload.
    upload_id: Option<UploadId>,
    state: Mutex<PartState>,
    /// The job's own data about the object.
    pub tag: T,
}

#[derive(Debug, Default)]
struct PartState {
    receipts: Vec<PartReceipt>,
    /// Set when the producer has queued the last part.
    part_count: Option<u32>,
    finalized: bool,
}

impl<T> PooledObject<T> {
    /// If every part is uploaded and the object is closed, marks it finalized and returns the
    /// receipts in part order. Exactly one caller gets `Some`.
    fn take_if_complete(&self, state: &mut PartState) -> Option<Vec<PartReceipt>> {
        let part_count = state.part_count?;
        if state.finalized || state.receipts.len() != part_count as usize {
            return None;
        }
        state.finalized = true;
        let mut receipts = std::mem::take(&mut state.receipts);
        receipts.sort_by_key(|receipt| receipt.part_number);
        Some(receipts)
    }
}

/// One request for the pool.
#[derive(Debug)]
pub enum UploadJob<T> {
    /// The whole object in one PUT.
    Put {
        /// The object.
        object: Arc<PooledObject<T>>,
        /// Its bytes.
        data: Bytes,
    },
    /// One part of a multipart object.
    Part {
        /// The object.
        object: Arc<PooledObject<T>>,
        /// 1-based.
        part_number: u32,
        /// Its bytes.
        data: Bytes,
    },
}

/// The shared state of a job's uploader pool: store, throttle, open multipart uploads.
#[derive(Debug)]
pub struct Uploader<'a> {
    store: &'a dyn ObjectStore,
    control: &'a JobControl,
    progress: &'a Progress,
    limit: Option<Throttle>,
    open: OpenUploads,
    /// Where the buffers of uploaded requests go back to, when nothing else holds them: fresh
    /// 16 MiB buffers would cost a page fault per 4 KiB (a third of the pipeline's CPU in
    /// `perf record`).
    spares: Option<crossbeam_channel::Sender<Vec<u8>>>,
}

impl<'a> Uploader<'a> {
    /// An uploader into `store`; `limit_bytes_per_sec` is `--limit-upload`.
    pub fn new(
        store: &'a dyn ObjectStore,
        control: &'a JobControl,
        progress: &'a Progress,
        limit_bytes_per_sec: Option<u64>,
    ) -> Uploader<'a> {
        Uploader {
            store,
            control,
            progress,
            // No burst: each request starts when the previous bookings have run out, so uploads
            // are spaced evenly at the limit.
            limit: limit_bytes_per_sec.map(|rate| Throttle::new(rate, 0)),
            open: OpenUploads::default(),
            spares: None,
        }
    }

    /// Sends the buffers of uploaded requests to `spares` for reuse.
    #[must_use]
    pub fn recycling_into(mut self, spares: crossbeam_channel::Sender<Vec<u8>>) -> Self {
        self.spares = Some(spares);
        self
    }

    fn recycle(&self, data: Bytes) {
        if let Some(spares) = &self.spares
            && let Ok(unique) = data.try_into_mut()
        {
            let _ = spares.try_send(unique.into());
        }
    }

    /// A single-PUT object.
    pub fn single<T>(&self, key: String, tag: T) -> Arc<PooledObject<T>> {
        Arc::new(PooledObject { key, upload_id: None, state: Mutex::default(), tag })
    }

    /// Begins a multipart object.
    ///
    /// # Errors
    /// Store errors.
    pub fn begin<T>(&self, key: String, tag: T) -> Result<Arc<PooledObject<T>>, EngineError> {
        let upload_id = self.open.begin(self.store, &key)?;
        Ok(Arc::new(PooledObject { key, upload_id: Some(upload_id), state: Mutex::default(), tag }))
    }

    /// Records that `part_count` parts of `object` are queued; returns the receipts when they are
    /// all uploaded already, for the caller to `complete`.
    pub fn close<T>(&self, object: &PooledObject<T>, part_count: u32) -> Option<Vec<PartReceipt>> {
        let mut state = lock(&object.state);
        state.part_count = Some(part_count);
        object.take_if_complete(&mut state)
    }

    /// Completes a multipart object from its receipts.
    ///
    /// # Errors
    /// Store errors.
    pub fn complete<T>(
        &self,
        object: &PooledObject<T>,
        receipts: &[PartReceipt],
    ) -> Result<(), EngineError> {
        let upload_id = object.upload_id.as_ref().expect("multipart object");
        self.open.complete(self.store, &object.key, upload_id, receipts)
    }

    /// Runs one request; returns the object when this request stored the last of it.
    fn run<T>(&self, job: UploadJob<T>) -> Result<Option<Arc<PooledObject<T>>>, EngineError> {
        let (object, part_number, data) = match job {
            UploadJob::Put { object, data } => (object, None, data),
            UploadJob::Part { object, part_number, data } => (object, Some(part_number), data),
        };
        let length = data.len() as u64;
        if let Some(limit) = &self.limit {
            limit.take(length, self.control.flag());
        }
        let context = |error: crate::store::StoreError| {
            EngineError::from(error).context(format!("uploading {}", object.key))
        };
        let Some(part_number) = part_number else {
            self.store.put(&object.key, data.clone()).map_err(context)?;
            self.recycle(data);
            Progress::add(&self.progress.bytes_uploaded, length);
            return Ok(Some(object));
        };
        let upload_id = object.upload_id.as_ref().expect("parts belong to multipart objects");
        let receipt = self
            .store
            .multipart_put_part(&object.key, upload_id, part_number, data.clone())
            .map_err(context)?;
        self.recycle(data);
        Progress::add(&self.progress.bytes_uploaded, length);
        let ready = {
            let mut state = lock(&object.state);
            state.receipts.push(receipt);
            object.take_if_complete(&mut state)
        };
        match ready {
            Some(receipts) => {
                self.complete(&object, &receipts)?;
                Ok(Some(object))
            }
            None => Ok(None),
        }
    }

    /// An uploader thread's loop: runs requests from `jobs` until it closes or the job stops;
    /// `stored` runs for every object once all of it is stored. The first failure stops the job.
    pub fn work<T>(
        &self,
        jobs: &crossbeam_channel::Receiver<UploadJob<T>>,
        stored: &dyn Fn(&PooledObject<T>) -> Result<(), EngineError>,
    ) {
        while let Ok(job) = jobs.recv() {
            if self.control.stopped() {
                break;
            }
            match self.run(job).and_then(|done| done.map_or(Ok(()), |object| stored(&object))) {
                Ok(()) => {}
                Err(error) => {
                    self.control.fail(error);
                    break;
                }
            }
        }
    }

    /// Aborts every multipart upload the job has open (after a failure or cancellation).
    pub fn abort_open(&self) {
        self.open.abort_all(self.store);
    }
}
