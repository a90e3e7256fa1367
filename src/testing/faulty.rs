//! `FaultyStore`, a wrapper of any `ObjectStore` that injects faults by rule: fail the Nth call of
//! an operation (optionally only on keys containing a string), or each call with a seeded
//! probability; with a transient or permanent error, an unreachable store, a truncated or
//! corrupted GET body, a response lost after the operation took effect, or a flag raised (to
//! cancel a job at an exact point).
//!
//! Deterministic: every rule counts the calls that match it, and fires on the Nth of them (`Nth`,
//! `From`), or decides from a hash of the seed, the rule and that count (`Chance`). So one seed
//! always injects the same faults at the same positions in each rule's sequence of calls; which
//! request holds a position among requests made concurrently follows thread scheduling (object
//! keys, holding random pack ids and timestamps, are deliberately not part of the decision).
//! Every fault injected is logged (`injected`), and seeded tests print their seed when they
//! fail.
//!
//! It does not delay requests or model timeouts: no wall-clock time in the simulated path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::plane::lock;
use crate::store::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId,
};

/// An operation of `ObjectStore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `put`.
    Put,
    /// `get`.
    Get,
    /// `get_range`.
    GetRange,
    /// `list`.
    List,
    /// `delete`.
    Delete,
    /// `multipart_begin`.
    Begin,
    /// `multipart_put_part`.
    PutPart,
    /// `multipart_complete`.
    Complete,
    /// `multipart_abort`.
    Abort,
    /// `multipart_list`.
    ListUploads,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "PutObject",
            Op::Get | Op::GetRange => "GetObject",
            Op::List => "ListObjectsV2",
            Op::Delete => "DeleteObject",
            Op::Begin => "CreateMultipartUpload",
            Op::PutPart => "UploadPart",
            Op::Complete => "CompleteMultipartUpload",
            Op::Abort => "AbortMultipartUpload",
            Op::ListUploads => "ListMultipartUploads",
        }
    }
}

/// What happens to a call a rule picks.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fails without effect, as a 503 SlowDown would: `Failed { transient: true }`.
    Transient,
    /// Fails without effect, as a 500 that is not retried would: `Failed { transient: false }`.
    Permanent,
    /// Fails without effect, as a refused connection would: `Unreachable`.
    Unreachable,
    /// The operation takes effect, then its response is lost: `Unreachable` returned anyway.
    LoseResponse,
    /// GET only: the body ends early (`get` returns fewer bytes; `get_range` returns
    /// `ShortRead`, as `S3Store` does when a ranged body is short).
    Truncate,
    /// GET only: one byte of the body is flipped (at a position chosen from the seed).
    Corrupt,
    /// The flag is raised, then the operation runs normally (to cancel a job at this call).
    Raise(Arc<AtomicBool>),
}

/// Which calls of a rule's operation fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// The Nth matching call (1-based), once.
    Nth(u64),
    /// Every matching call from the Nth on.
    From(u64),
    /// Each matching call with this probability in parts per thousand, decided by the seed.
    Chance(u32),
}

/// One fault rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The operation it applies to.
    pub op: Op,
    /// Only calls whose key contains this (empty: every key).
    pub key_contains: String,
    /// Which matching calls.
    pub when: When,
    /// What happens to them.
    pub fault: Fault,
}

impl Rule {
    /// A rule for every key.
    pub fn new(op: Op, when: When, fault: Fault) -> Rule {
        Rule { op, key_contains: String::new(), when, fault }
    }

    /// Restricts the rule to keys containing `part`.
    #[must_use]
    pub fn on_keys(mut self, part: &str) -> Rule {
        self.key_contains = part.to_owned();
        self
    }
}

/// A fault that was injected: which rule, which call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// Position of the rule in the store's rules.
    pub rule: usize,
    /// The operation.
    pub op: Op,
    /// The key.
    pub key: String,
    /// The fault, by name.
    pub fault: &'static str,
}

/// An `ObjectStore` that injects faults into calls to `inner`.
#[derive(Debug)]
pub struct FaultyStore<S> {
    inner: S,
    seed: u64,
    rules: Vec<Rule>,
    /// Calls matched so far, per rule.
    matched: Vec<AtomicU64>,
    injected: Mutex<Vec<Injected>>,
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash step.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl<S: ObjectStore> FaultyStore<S> {
    /// Wraps `inner` with no rules; `seed` drives every random choice.
    pub fn new(inner: S, seed: u64) -> FaultyStore<S> {
        FaultyStore {
            inner,
            seed,
            rules: Vec::new(),
            matched: Vec::new(),
            injected: Mutex::new(Vec::new()),
        }
    }

    /// Adds a rule. Each rule counts the calls it matches; when several fire on one call, the
    /// first added wins.
    #[must_use]
    pub fn with(mut self, rule: Rule) -> FaultyStore<S> {
        self.rules.push(rule);
        self.matched.push(AtomicU64::new(0));
        self
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Every fault injected so far, in order.
    pub fn injected(&self) -> Vec<Injected> {
        lock(&self.injected).clone()
    }

    /// The fault for this call, if a rule fires.
    fn pick(&self, op: Op, key: &str) -> Option<Fault> {
        // Every rule counts every call it matches, whether or not an earlier rule fires on it.
        let mut chosen: Option<(usize, Fault)> = None;
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.op != op || !key.contains(rule.key_contains.as_str()) {
                continue;
            }
            let seen = self.matched[index].fetch_add(1, Ordering::SeqCst) + 1;
            let fires = match rule.when {
                When::Nth(n) => seen == n,
                When::From(n) => seen >= n,
                When::Chance(per_mille) => {
                    mix(mix(self.seed ^ mix(index as u64)) ^ seen) % 1000 < u64::from(per_mille)
                }
            };
            if fires && chosen.is_none() {
                chosen = Some((index, rule.fault.clone()));
            }
        }
        let (rule, fault) = chosen?;
        let name = match &fault {
            Fault::Transient => "transient",
            Fault::Permanent => "permanent",
            Fault::Unreachable => "unreachable",
            Fault::LoseResponse => "lose-response",
            Fault::Truncate => "truncate",
            Fault::Corrupt => "corrupt",
            Fault::Raise(_) => "raise",
        };
        lock(&self.injected).push(Injected { rule, op, key: key.to_owned(), fault: name });
        Some(fault)
    }

    /// Runs `call` under the fault chosen for it.
    fn run<T>(
        &self,
        op: Op,
        key: &str,
        call: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.apply(self.pick(op, key), op, key, call)
    }

    /// Runs `call` under `fault` (body faults are left to `run_get`).
    fn apply<T>(
        &self,
        fault: Option<Fault>,
        op: Op,
        key: &str,
        call: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let injected = |detail: &str, transient: bool| StoreError::Failed {
            operation: op.name(),
            key: key.to_owned(),
            detail: format!("injected fault (seed {}): {detail}", self.seed),
            transient,
        };
        let lost = || StoreError::Unreachable {
            endpoint: "faulty".to_owned(),
            operation: op.name(),
            key: key.to_owned(),
            detail: format!("injected fault (seed {}): response lost", self.seed),
        };
        match fault {
            None | Some(Fault::Truncate | Fault::Corrupt) => call(),
            Some(Fault::Transient) => Err(injected("503 SlowDown", true)),
            Some(Fault::Permanent) => Err(injected("500 InternalError", false)),
            Some(Fault::Unreachable) => Err(lost()),
            Some(Fault::LoseResponse) => {
                let _ = call();
                Err(lost())
            }
            Some(Fault::Raise(flag)) => {
                flag.store(true, Ordering::SeqCst);
                call()
            }
        }
    }

    /// A GET under the fault chosen for it, with body faults applied.
    fn run_get(
        &self,
        op: Op,
        key: &str,
        range: (u64, u64),
        call: impl FnOnce() -> Result<Bytes, StoreError>,
    ) -> Result<Bytes, StoreError> {
        let fault = self.pick(op, key);
        let body = match fault {
            Some(Fault::Truncate) => {
                let body = call()?;
                if op == Op::GetRange {
                    return Err(StoreError::ShortRead {
                        key: key.to_owned(),
                        offset: range.0,
                        wanted: range.1,
                        got: (body.len() as u64).saturating_sub(1).min(range.1 / 2),
                    });
                }
                let keep = body.len() - body.len().min(1 + body.len() / 3);
                body.slice(..keep)
            }
            Some(Fault::Corrupt) => {
                let body = call()?;
                if body.is_empty() {
                    return Ok(body);
                }
                let mut data = body.to_vec();
                let at =
                    usize::try_from(mix(self.seed ^ mix(data.len() as u64)) % data.len() as u64)
                        .expect("below the body's length");
                data[at] ^= 0x5a;
                Bytes::from(data)
            }
            other => return self.apply(other, op, key, call),
        };
        Ok(body)
    }
}

impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.run(Op::Put, key, || self.inner.put(key, data))
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run_get(Op::Get, key, (0, 0), || self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        self.run_get(Op::GetRange, key, (offset, length), || {
            self.inner.get_range(key, offset, length)
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.run(Op::List, prefix, || self.inner.list(prefix))
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.run(Op::List, prefix, || self.inner.list_dated(prefix))
    }

    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        self.run(Op::List, prefix, || self.inner.list_range(prefix, range))
    }

    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        self.run(Op::List, prefix, || self.inner.list_dated_range(prefix, range))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(Op::Delete, key, || self.inner.delete(key))
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        self.run(Op::Begin, key, || self.inner.multipart_begin(key))
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        self.run(Op::PutPart, key, || {
            self.inner.multipart_put_part(key, upload_id, part_number, data)
        })
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        self.run(Op::Complete, key, || self.inner.multipart_complete(key, upload_id, parts))
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        self.run(Op::Abort, key, || self.inner.multipart_abort(key, upload_id))
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.run(Op::ListUploads, prefix, || self.inner.multipart_list(prefix))
    }

    fn retry_count(&self) -> u64 {
        self.inner.retry_count()
    }

    fn describe(&self) -> String {
        format!("{} (faults, seed {})", self.inner.describe(), self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemStore;

    #[test]
    fn range_listings_are_list_calls() {
        let store = FaultyStore::new(MemStore::new(), 4)
            .with(Rule::new(Op::List, When::Nth(2), Fault::Permanent).on_keys("b/"));
        store.put("b/1", Bytes::new()).unwrap();
        let range = KeyRange { start_after: "a", end: Some("c") };
        assert_eq!(store.list_range("b/", range).unwrap().len(), 1);
        assert!(store.list_dated_range("b/", range).is_err());
        assert_eq!(store.list_dated_range("b/", range).unwrap().len(), 1);
        assert_eq!(store.injected().len(), 1);
    }

    fn put_many(store: &dyn ObjectStore, count: usize) -> Vec<bool> {
        (0..count).map(|i| store.put(&format!("k{i}"), Bytes::from_static(b"x")).is_ok()).collect()
    }

    // Nth fires once on exactly the Nth matching call, From on every call from it, key filters
    // restrict the count; errors carry the right retry class and failed calls have no effect.
    #[test]
    fn rules_fire_where_they_say() {
        let mem = MemStore::new();
        let store = FaultyStore::new(mem.clone(), 1)
            .with(Rule::new(Op::Put, When::Nth(2), Fault::Transient))
            .with(Rule::new(Op::Put, When::From(1), Fault::Permanent).on_keys("k5"));
        assert_eq!(put_many(&store, 7), [true, false, true, true, true, false, true]);
        assert_eq!(mem.keys(), ["k0", "k2", "k3", "k4", "k6"]);
        let injected = store.injected();
        assert_eq!(injected.len(), 2);
        assert_eq!((injected[0].rule, injected[0].key.as_str()), (0, "k1"));
        assert_eq!((injected[1].rule, injected[1].fault), (1, "permanent"));

        use crate::error::{Classify as _, Status};
        let store = FaultyStore::new(mem.clone(), 1)
            .with(Rule::new(Op::Delete, When::Nth(1), Fault::Transient))
            .with(Rule::new(Op::Delete, When::Nth(2), Fault::Permanent))
            .with(Rule::new(Op::Delete, When::Nth(3), Fault::Unreachable));
        assert_eq!(store.delete("k0").unwrap_err().status(), Status::Transient);
        assert_eq!(store.delete("k0").unwrap_err().status(), Status::Permanent);
        assert_eq!(store.delete("k0").unwrap_err().status(), Status::Transient);
        assert!(mem.object("k0").is_some(), "failed deletes did nothing");
        store.delete("k0").unwrap();
        assert!(mem.object("k0").is_none());
    }

    // A lost response reports failure after the operation took effect; Raise sets the flag and
    // lets the call through.
    #[test]
    fn lost_responses_take_effect_and_raise_lets_through() {
        let mem = MemStore::new();
        let flag = Arc::new(AtomicBool::new(false));
        let store = FaultyStore::new(mem.clone(), 2)
            .with(Rule::new(Op::Put, When::Nth(1), Fault::LoseResponse))
            .with(Rule::new(Op::Put, When::Nth(2), Fault::Raise(Arc::clone(&flag))));
        assert!(store.put("a", Bytes::from_static(b"1")).is_err());
        assert_eq!(mem.get("a").unwrap(), Bytes::from_static(b"1"));
        assert!(!flag.load(Ordering::SeqCst));
        store.put("b", Bytes::from_static(b"2")).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(mem.keys(), ["a", "b"]);
    }

    // Body faults: a truncated GET is shorter, a truncated ranged GET is a short read, a
    // corrupted body differs in exactly one byte, at a position the seed fixes.
    #[test]
    fn body_faults_damage_reads() {
        let mem = MemStore::new();
        let data: Vec<u8> = (0..=255).collect();
        mem.insert("o", data.clone());
        let store = FaultyStore::new(mem.clone(), 3)
            .with(Rule::new(Op::Get, When::Nth(1), Fault::Truncate))
            .with(Rule::new(Op::GetRange, When::Nth(1), Fault::Truncate))
            .with(Rule::new(Op::Get, When::From(2), Fault::Corrupt));
        let short = store.get("o").unwrap();
        assert!(short.len() < data.len() && data.starts_with(&short));
        assert!(matches!(store.get_range("o", 10, 20), Err(StoreError::ShortRead { .. })));
        assert_eq!(store.get_range("o", 10, 20).unwrap(), Bytes::from(data[10..30].to_vec()));
        let corrupt = store.get("o").unwrap();
        let differing: Vec<usize> = (0..data.len()).filter(|&i| corrupt[i] != data[i]).collect();
        assert_eq!(differing.len(), 1);
        assert_eq!(store.get("o").unwrap(), corrupt, "the same seed damages the same byte");
        assert_eq!(mem.get("o").unwrap(), Bytes::from(data), "the stored object is intact");
    }

    // Chance rules: the same seed injects at the same positions of the call sequence, another
    // seed elsewhere, at about the rate asked for.
    #[test]
    fn chance_is_seeded() {
        let pattern = |seed: u64| {
            let store = FaultyStore::new(MemStore::new(), seed).with(Rule::new(
                Op::Put,
                When::Chance(200),
                Fault::Transient,
            ));
            put_many(&store, 1000)
        };
        let (one, again, other) = (pattern(7), pattern(7), pattern(8));
        assert_eq!(one, again);
        assert_ne!(one, other);
        let failures = one.iter().filter(|ok| !**ok).count();
        assert!((150..250).contains(&failures), "{failures} failures in 1000 at 20%");
    }
}
