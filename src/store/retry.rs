//! `Retrying`: an `ObjectStore` decorator that retries transient failures with capped
//! exponential backoff and jitter, bounded in attempts and in time.
//!
//! Every store error is classified by `Classify::status` where it is made (throttling, 5xx,
//! timeouts, resets: transient; other 4xx, bad credentials, missing objects: permanent); this
//! layer only decides how often and how long to try again. Every operation ferry issues is safe to
//! repeat: PUTs write whole objects, a part number re-uploaded replaces the part, DELETE of a
//! missing object succeeds. The two that can lose their answer are special-cased: a
//! CompleteMultipartUpload whose response was lost answers "no such upload" on the retry, and the
//! object is then checked to exist; an abort of an upload that is already gone is success.
//! A CreateMultipartUpload whose answer was lost leaves an upload nobody knows; `repo::repair`
//! finds and aborts those.
//!
//! While nothing has ever answered (a wrong endpoint, a server that is down), connection failures
//! get only `unreached_attempts` tries, so a misconfiguration fails in about a second instead
//! of after the full retry budget.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId,
};
use crate::error::{Classify, Status};

/// How often and how long to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_attempts: u32,
    /// No new attempt starts after this much time since the first one.
    pub max_elapsed: Duration,
    /// Delay before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Cap on one delay.
    pub max_backoff: Duration,
    /// Attempts while the store has never answered and the failure is a connection failure.
    pub unreached_attempts: u32,
}

impl Default for RetryPolicy {
    /// 10 attempts within 5 minutes, 250 ms doubling to at most 15 s, jittered; 3 attempts
    /// against a store that never answered.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(15),
            unreached_attempts: 3,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based): exponential, capped, with "equal jitter"
    /// (uniform in the upper half), so that parallel uploaders hit by one 503 spread out.
    pub fn backoff(&self, retry: u32, random: u64) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let full = self.initial_backoff.saturating_mul(1 << exponent).min(self.max_backoff);
        let half = full / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_nanos(random % jitter_nanos)
    }
}

/// Counters of what the retry layer did.
#[derive(Debug, Default)]
pub struct RetryStats {
    /// Attempts that failed transiently and were tried again.
    pub retries: AtomicU64,
    /// Operations that failed after their last attempt.
    pub gave_up: AtomicU64,
}

/// The decorator. Cheap to call; holds no locks across an attempt.
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
    answered: AtomicBool,
    stats: RetryStats,
    seed: AtomicU64,
}

impl<S: fmt::Debug> fmt::Debug for Retrying<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrying")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S: ObjectStore> Retrying<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: RetryPolicy) -> Retrying<S> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |elapsed| elapsed.as_nanos() as u64);
        Retrying {
            inner,
            policy,
            answered: AtomicBool::new(false),
            stats: RetryStats::default(),
            seed: AtomicU64::new(seed),
        }
    }

    /// What the layer did so far.
    pub fn stats(&self) -> &RetryStats {
        &self.stats
    }

    /// splitmix64 over a shared counter: jitter needs no quality, only spread between threads.
    fn random(&self) -> u64 {
        let mut z = self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the policy is spent.
    /// `attempt` gets the number of earlier transient failures.
    fn call<T>(
        &self,
        mut attempt: impl FnMut(u32) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut failures = 0u32;
        loop {
            let error = match attempt(failures) {
                Ok(value) => {
                    self.answered.store(true, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(error) => error,
            };
            let unreached = matches!(error, StoreError::Unreachable { .. })
                && !self.answered.load(Ordering::Relaxed);
            if !matches!(error, StoreError::Unreachable { .. }) {
                // Any HTTP answer, even an error, shows the store is there.
                self.answered.store(true, Ordering::Relaxed);
            }
            failures += 1;
            let limit =
                if unreached { self.policy.unreached_attempts } else { self.policy.max_attempts };
            let delay = self.policy.backoff(failures, self.random());
            let spent = failures >= limit || started.elapsed() + delay > self.policy.max_elapsed;
            if error.status() != Status::Transient || spent {
                if error.status() == Status::Transient {
                    let _ = self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                    return Err(gave_up(error, failures, started.elapsed()));
                }
                return Err(error);
            }
            let _ = self.stats.retries.fetch_add(1, Ordering::Relaxed);
            // For people watching stderr; the count also goes into the job's result.
            eprintln!(
                "ferry: retrying in {} ms (attempt {} of {limit}): {error}",
                delay.as_millis(),
                failures + 1
            );
            std::thread::sleep(delay);
        }
    }
}

/// Says in the error how hard we tried.
fn gave_up(error: StoreError, attempts: u32, elapsed: Duration) -> StoreError {
    let note = format!(" (gave up after {attempts} attempts in {:.1} s)", elapsed.as_secs_f64());
    match error {
        StoreError::Unreachable { endpoint, operation, key, detail } => {
            StoreError::Unreachable { endpoint, operation, key, detail: detail + &note }
        }
        StoreError::Failed { operation, key, detail, transient } => {
            StoreError::Failed { operation, key, detail: detail + &note, transient }
        }
        other => other,
    }
}

/// Whether an error says the multipart upload does not exist (any more).
fn is_no_such_upload(error: &StoreError) -> bool {
    match error {
        StoreError::NotFound { .. } => true,
        StoreError::Failed { detail, .. } => detail.contains("NoSuchUpload"),
        _ => false,
    }
}

impl<S: ObjectStore> ObjectStore for Retrying<S> {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.call(|_| self.inner.put(key, data.clone()))
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.call(|_| self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        self.call(|_| self.inner.get_range(key, offset, length))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.call(|_| self.inner.list(prefix))
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.call(|_| self.inner.list_dated(prefix))
    }

    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        self.call(|_| self.inner.list_range(prefix, range))
    }

    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        self.call(|_| self.inner.list_dated_range(prefix, range))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.call(|failures| match self.inner.delete(key) {
            Err(StoreError::NotFound { .. }) if failures > 0 => Ok(()),
            other => other,
        })
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        self.call(|_| self.inner.multipart_begin(key))
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        self.call(|_| self.inner.multipart_put_part(key, upload_id, part_number, data.clone()))
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        self.call(|failures| match self.inner.multipart_complete(key, upload_id, parts) {
            // An earlier attempt may have completed the upload and lost the answer.
            Err(error) if failures > 0 && is_no_such_upload(&error) => {
                let listed = self.inner.list(key)?;
                if listed.iter().any(|object| object.key == key) { Ok(()) } else { Err(error) }
            }
            other => other,
        })
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        self.call(|_| match self.inner.multipart_abort(key, upload_id) {
            Err(error) if is_no_such_upload(&error) => Ok(()),
            other => other,
        })
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.call(|_| self.inner.multipart_list(prefix))
    }

    fn retry_count(&self) -> u64 {
        self.stats.retries.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A store whose `get` answers from a script of results.
    #[derive(Debug, Default)]
    struct Scripted {
        gets: Mutex<Vec<Result<Bytes, StoreError>>>,
        calls: AtomicU64,
    }

    fn transient() -> StoreError {
        StoreError::Failed {
            operation: "GetObject",
            key: "k".into(),
            detail: "http 503 SlowDown".into(),
            transient: true,
        }
    }

    fn refused() -> StoreError {
        StoreError::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            operation: "GetObject",
            key: "k".into(),
            detail: "connection refused".into(),
        }
    }

    impl ObjectStore for Scripted {
        fn put(&self, _: &str, _: Bytes) -> Result<(), StoreError> {
            unreachable!()
        }
        fn get(&self, _: &str) -> Result<Bytes, StoreError> {
            let _ = self.calls.fetch_add(1, Ordering::Relaxed);
            self.gets.lock().unwrap().remove(0)
        }
        fn get_range(&self, _: &str, _: u64, _: u64) -> Result<Bytes, StoreError> {
            unreachable!()
        }
        fn list(&self, _: &str) -> Result<Vec<ObjectInfo>, StoreError> {
            unreachable!()
        }
        fn delete(&self, _: &str) -> Result<(), StoreError> {
            unreachable!()
        }
        fn multipart_begin(&self, _: &str) -> Result<UploadId, StoreError> {
            unreachable!()
        }
        fn multipart_put_part(
            &self,
            _: &str,
            _: &UploadId,
            _: u32,
            _: Bytes,
        ) -> Result<PartReceipt, StoreError> {
            unreachable!()
        }
        fn multipart_complete(
            &self,
            _: &str,
            _: &UploadId,
            _: &[PartReceipt],
        ) -> Result<(), StoreError> {
            unreachable!()
        }
        fn multipart_abort(&self, _: &str, _: &UploadId) -> Result<(), StoreError> {
            unreachable!()
        }
        fn multipart_list(&self, _: &str) -> Result<Vec<PendingUpload>, StoreError> {
            unreachable!()
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            max_elapsed: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            unreached_attempts: 2,
        }
    }

    // Range listings go through the retries, to the inner store's own range listing.
    #[test]
    fn range_listings_are_retried() {
        use crate::testing::{Fault, FaultyStore, Op, Rule, When};
        let faulty = FaultyStore::new(crate::testing::MemStore::new(), 5)
            .with(Rule::new(Op::List, When::Nth(1), Fault::Transient))
            .with(Rule::new(Op::List, When::Nth(3), Fault::Transient));
        let store = Retrying::new(faulty, fast());
        crate::store::range_check::check(&store);
        assert_eq!(store.retry_count(), 2);
    }

    // Transient failures are retried until success; permanent ones are not retried.
    #[test]
    fn retries_transient_until_success_and_stops_on_permanent() {
        let script = vec![Err(transient()), Err(transient()), Ok(Bytes::from_static(b"x"))];
        let store =
            Retrying::new(Scripted { gets: Mutex::new(script), ..Default::default() }, fast());
        assert_eq!(store.get("k").unwrap(), Bytes::from_static(b"x"));
        assert_eq!(store.inner.calls.load(Ordering::Relaxed), 3);
        assert_eq!(store.stats().retries.load(Ordering::Relaxed), 2);

        let script = vec![Err(StoreError::NotFound { key: "k".into() }), Ok(Bytes::new())];
        let store =
            Retrying::new(Scripted { gets: Mutex::new(script), ..Default::default() }, fast());
        assert!(matches!(store.get("k"), Err(StoreError::NotFound { .. })));
        assert_eq!(store.inner.calls.load(Ordering::Relaxed), 1);
    }

    // The attempt bound holds and the error says it gave up.
    #[test]
    fn gives_up_after_max_attempts() {
        let script = (0..10).map(|_| Err(transient())).collect();
        let store =
            Retrying::new(Scripted { gets: Mutex::new(script), ..Default::default() }, fast());
        let error = store.get("k").unwrap_err();
        assert_eq!(store.inner.calls.load(Ordering::Relaxed), 4);
        assert!(error.to_string().contains("gave up after 4 attempts"), "{error}");
    }

    // A store that never answered gets few attempts; once it has answered, the full budget.
    #[test]
    fn unreached_store_fails_fast() {
        let script = (0..10).map(|_| Err(refused())).collect();
        let store =
            Retrying::new(Scripted { gets: Mutex::new(script), ..Default::default() }, fast());
        let _ = store.get("k").unwrap_err();
        assert_eq!(store.inner.calls.load(Ordering::Relaxed), 2);

        let mut script: Vec<_> = vec![Ok(Bytes::new())];
        script.extend((0..10).map(|_| Err(refused())));
        let store =
            Retrying::new(Scripted { gets: Mutex::new(script), ..Default::default() }, fast());
        let _ = store.get("k").unwrap();
        let _ = store.get("k").unwrap_err();
        assert_eq!(store.inner.calls.load(Ordering::Relaxed), 1 + 4);
    }

    // Backoff doubles, is capped, and stays within [half, full].
    #[test]
    fn backoff_is_capped_exponential_with_jitter() {
        let policy = RetryPolicy::default();
        for random in [0, 1, u64::MAX / 3, u64::MAX] {
            let first = policy.backoff(1, random);
            assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(250));
            let late = policy.backoff(30, random);
            assert!(late >= Duration::from_millis(7500) && late <= Duration::from_secs(15));
        }
    }
}
