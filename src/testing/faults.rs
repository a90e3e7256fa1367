//! Fault tests of whole jobs, in-process, through `FaultyStore` over a `MemStore`: what a failed,
//! corrupted or cancelled job reports (its `ErrorKind`, the exit class) and what it leaves in
//! the store (no manifest or `_metadata`, no multipart upload, no lease, no object of a failed
//! Cinder backup), and that transient faults behind the retry layer change nothing.
//!
//! Faults are chosen by rule (the Nth call of an operation on some keys) or by seed; a failing
//! seeded test prints its seed, and `FERRY_FAULT_SEED=<seed>` replays it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::volume::{self, Content, Scratch};
use super::{Fault, FaultyStore, MemStore, Op, Rule, When};
use crate::cinder::backup::{BackupJob, BackupOutcome as CinderBackup};
use crate::cinder::restore::{RestoreJob, RestoreOutcome};
use crate::cinder::{Algorithm, Geometry};
use crate::error::{EngineError, ErrorKind};
use crate::io::Engine;
use crate::native::backup::{BackupOptions, BackupOutcome};
use crate::native::maintain;
use crate::native::repo::Repository;
use crate::native::restore::{RestoreOptions, RestoreStats};
use crate::progress::Progress;
use crate::store::{ObjectStore, RetryPolicy, Retrying};

const MIB: u64 = 1 << 20;
const VOLUME_ID: &str = "0000000a-0000-4000-8000-00000000000a";
const FULL_ID: &str = "0000000b-0000-4000-8000-00000000000b";
const INCREMENTAL_ID: &str = "0000000c-0000-4000-8000-00000000000c";

fn no_warnings(_: String) {}

/// What the names of a Cinder backup's data objects contain (`…_backup_<id>-00001`).
fn data_of(backup_id: &str) -> String {
    format!("{backup_id}-0000")
}

/// An image file of `content`, and its bytes.
fn image(scratch: &Scratch, content: Content, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = volume::sample(content, usize::try_from(size).expect("fits"), seed);
    let path = scratch.join("source.img");
    std::fs::write(&path, &data).expect("write the image");
    (path, data)
}

/// A native repository in `mem` with `chunk`-byte chunks, opened through `store`.
fn repository(mem: &MemStore, chunk: u32, store: impl ObjectStore + 'static) -> Repository {
    let _ = Repository::init(Box::new(mem.clone()), chunk).expect("init");
    Repository::open(Box::new(store)).expect("open")
}

fn native_backup(
    repo: &Repository,
    source: &Path,
    pack_bytes: u64,
    cancel: &AtomicBool,
) -> Result<BackupOutcome, EngineError> {
    let mut options = BackupOptions::new(source.to_path_buf());
    options.engine = Engine::Pread;
    options.worker_count = 2;
    options.parts_in_flight = 2;
    options.pack_size_bytes = pack_bytes;
    crate::native::backup::run(repo, &options, &Progress::default(), cancel, &no_warnings)
}

fn native_restore(
    repo: &Repository,
    backup_id: &str,
    target: &Path,
) -> Result<RestoreStats, EngineError> {
    let manifest = repo.load_manifest(backup_id)?;
    let mut options = RestoreOptions::new(target.to_path_buf());
    options.downloads_in_flight = 3;
    let cancel = AtomicBool::new(false);
    crate::native::restore::run(repo, &manifest, &options, &Progress::default(), &cancel, &|_| {})
}

fn cinder_job(
    source: &Path,
    backup_id: &str,
    object_bytes: u64,
    algorithm: Algorithm,
) -> BackupJob {
    BackupJob {
        engine: Engine::Uring,
        ..crate::testing::cinder_job(
            source,
            backup_id.into(),
            VOLUME_ID.into(),
            algorithm,
            Geometry::new(object_bytes, 32 << 10).expect("valid geometry"),
        )
    }
}

fn cinder_backup(
    store: &dyn ObjectStore,
    job: &BackupJob,
    cancel: &AtomicBool,
) -> Result<CinderBackup, EngineError> {
    crate::cinder::backup::backup(store, job, &Progress::default(), cancel, &no_warnings)
}

fn cinder_restore(
    store: &dyn ObjectStore,
    backup_id: &str,
    target: &Path,
) -> Result<RestoreOutcome, EngineError> {
    let job = RestoreJob {
        backup_id: backup_id.into(),
        volume_id: VOLUME_ID.into(),
        target: target.to_path_buf(),
        force: false,
        sparse: false,
        engine: Engine::Uring,
        downloads: 3,
    };
    let cancel = AtomicBool::new(false);
    crate::cinder::restore::restore(
        store,
        &job,
        &Progress::default(),
        &cancel,
        &no_warnings,
        &|_| {},
    )
}

/// The error of `result`, which must have failed with `kind`.
fn failed_with<T: std::fmt::Debug>(
    result: Result<T, EngineError>,
    kind: ErrorKind,
    what: &str,
) -> EngineError {
    match result {
        Err(error) if error.kind == kind => error,
        Err(error) => panic!("{what}: expected {kind:?}, got {:?}: {}", error.kind, error.message),
        Ok(done) => panic!("{what}: expected {kind:?}, but it succeeded: {done:?}"),
    }
}

/// No manifest, no multipart upload, no lease: nothing of the failed native backup is visible.
fn assert_no_native_backup(mem: &MemStore, what: &str) {
    assert_eq!(mem.keys_under("backups/"), Vec::<String>::new(), "{what}: manifest written");
    assert_eq!(mem.pending_uploads(), [], "{what}: multipart uploads left open");
    assert_eq!(mem.keys_under("locks/"), Vec::<String>::new(), "{what}: lease left");
}

/// Nothing of the volume's backups in the bucket, and no multipart upload.
fn assert_no_cinder_objects(mem: &MemStore, what: &str) {
    let left = mem.keys_under(&format!("volume_{VOLUME_ID}/"));
    assert_eq!(left, Vec::<String>::new(), "{what}: objects of the failed backup left");
    assert_eq!(mem.pending_uploads(), [], "{what}: multipart uploads left open");
}

// A part upload that fails (permanently, transiently without retries, or unreachable) fails the
// native backup with a store error and leaves no manifest, no open multipart upload, no lease
// and no pack; the repository then takes a good backup.
#[test]
fn native_failed_part_upload_leaves_nothing() {
    let scratch = Scratch::new("fault-native-part");
    let (source, data) = image(&scratch, Content::Random, 40 * MIB + 513, 1);
    for fault in [Fault::Permanent, Fault::Transient, Fault::Unreachable] {
        let mem = MemStore::new();
        let what = format!("native, part 2 fails with {fault:?}");
        let faulty =
            FaultyStore::new(mem.clone(), 1).with(Rule::new(Op::PutPart, When::Nth(2), fault));
        let repo = repository(&mem, 1 << 20, faulty);
        let cancel = AtomicBool::new(false);
        let _ =
            failed_with(native_backup(&repo, &source, 64 * MIB, &cancel), ErrorKind::Store, &what);
        assert_no_native_backup(&mem, &what);
        assert_eq!(mem.keys_under("packs/"), Vec::<String>::new(), "{what}: pack stored");
        assert!(mem.calls().multipart_abort.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }
    let mem = MemStore::new();
    let repo = repository(&mem, 1 << 20, mem.clone());
    let cancel = AtomicBool::new(false);
    let outcome = native_backup(&repo, &source, 64 * MIB, &cancel).expect("a good backup");
    let target = scratch.join("restored.img");
    let _ = native_restore(&repo, &outcome.manifest.backup_id, &target).expect("restore");
    assert_eq!(volume::first_difference(&std::fs::read(&target).expect("read"), &data), None);
}

// A pack stored whose completion response is lost fails the backup (it cannot know the pack is
// there), writes no manifest, and leaves a pack without an index: `repair` deletes no pack, and
// rebuilds its index once it is older than a running backup could leave it (prune then reclaims
// it as an unreferenced pack).
#[test]
fn native_lost_completion_leaves_an_orphan_for_repair() {
    let scratch = Scratch::new("fault-native-lost");
    let (source, _) = image(&scratch, Content::Random, 20 * MIB, 2);
    let mem = MemStore::new();
    let faulty = FaultyStore::new(mem.clone(), 2).with(Rule::new(
        Op::Complete,
        When::Nth(1),
        Fault::LoseResponse,
    ));
    let repo = repository(&mem, 1 << 20, faulty);
    let cancel = AtomicBool::new(false);
    let _ = failed_with(native_backup(&repo, &source, 64 * MIB, &cancel), ErrorKind::Store, "lost");
    assert_no_native_backup(&mem, "lost completion");
    assert_eq!(mem.keys_under("packs/").len(), 1, "the completed pack is stored");
    assert_eq!(mem.keys_under("index/"), Vec::<String>::new(), "no index for it");
    let report = maintain::repair(&repo, &|_| {}).expect("repair");
    assert_eq!(report.unindexed_packs_left.len(), 1, "young: {report:?}");
    assert_eq!(mem.keys_under("packs/").len(), 1, "repair deletes no pack");
    mem.clock().advance(std::time::Duration::from_secs(
        crate::native::layout::gc::GcTiming::DEFAULT.min_pack_age_secs,
    ));
    let report = maintain::repair(&repo, &|_| {}).expect("repair");
    assert_eq!(report.rebuilt_indexes.len(), 1, "old: {report:?}");
    assert_eq!(mem.keys_under("index/").len(), 1);
}

// Corrupted or truncated GET bodies (pack ranges, index, manifest, config) make native restores
// fail with an integrity error, and a restore that created its target removes it; a corrupt
// index read once is read again and the restore succeeds, byte-identical.
#[test]
fn native_corrupt_reads_are_integrity_errors() {
    let scratch = Scratch::new("fault-native-corrupt");
    let (source, _) = image(&scratch, Content::Mixed, 3 * MIB + 77, 3);
    let mem = MemStore::new();
    let repo = repository(&mem, 64 << 10, mem.clone());
    let cancel = AtomicBool::new(false);
    let backup_id = native_backup(&repo, &source, MIB, &cancel).expect("backup").manifest.backup_id;
    let rules = [
        Rule::new(Op::GetRange, When::Nth(1), Fault::Corrupt).on_keys("packs/"),
        Rule::new(Op::GetRange, When::Nth(1), Fault::Corrupt).on_keys("packs/"),
        Rule::new(Op::GetRange, When::Nth(1), Fault::Corrupt).on_keys("packs/"),
        Rule::new(Op::GetRange, When::Nth(1), Fault::Truncate).on_keys("packs/"),
        // An index that reads corrupt every time (a corrupt read that a second read gets
        // right is healed: restore looks for a chunk its pack's index does not give it in
        // every index of the repository, and verifies every chunk it writes anyway).
        Rule::new(Op::Get, When::From(1), Fault::Corrupt).on_keys("index/"),
        Rule::new(Op::Get, When::From(1), Fault::Truncate).on_keys("index/"),
        Rule::new(Op::Get, When::Nth(1), Fault::Corrupt).on_keys("backups/"),
        Rule::new(Op::Get, When::Nth(1), Fault::Truncate).on_keys("backups/"),
    ];
    for (seed, rule) in (10..).zip(rules) {
        let what = format!("{rule:?}, seed {seed}");
        let faulty = FaultyStore::new(mem.clone(), seed).with(rule);
        let repo = Repository::open(Box::new(faulty)).expect("open");
        let target = scratch.join(&format!("restored-{seed}.img"));
        let error =
            failed_with(native_restore(&repo, &backup_id, &target), ErrorKind::Integrity, &what);
        assert!(!target.exists(), "{what}: the created target is left: {}", error.message);
    }
    let faulty = FaultyStore::new(mem.clone(), 9)
        .with(Rule::new(Op::Get, When::Nth(1), Fault::Corrupt).on_keys("index/"));
    let repo = Repository::open(Box::new(faulty)).expect("open");
    let target = scratch.join("restored-healed.img");
    let _ = native_restore(&repo, &backup_id, &target)
        .expect("a corrupt index read once is read again");
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&source).unwrap());
    for fault in [Fault::Corrupt, Fault::Truncate] {
        let faulty = FaultyStore::new(mem.clone(), 5)
            .with(Rule::new(Op::Get, When::Nth(1), fault.clone()).on_keys("config"));
        let error = Repository::open(Box::new(faulty)).expect_err("a corrupt config");
        assert_eq!(error.kind, ErrorKind::Integrity, "{fault:?}: {}", error.message);
    }
}

// A failing upload of a Cinder backup (a multipart part, a single PUT, `_sha256file`,
// `_metadata`) fails it with a store error and deletes every object it stored: no
// `_metadata`, no data object, no open multipart upload.
#[test]
fn cinder_failed_upload_deletes_the_backup() {
    let scratch = Scratch::new("fault-cinder-upload");
    let (large, _) = image(&scratch, Content::Random, 40 * MIB + 513, 4);
    let small_path = scratch.join("small.img");
    std::fs::write(&small_path, volume::sample(Content::Text, 10 * MIB as usize, 5))
        .expect("write");
    let cases = [
        (&large, 18 * MIB, Rule::new(Op::PutPart, When::Nth(3), Fault::Permanent)),
        (&large, 18 * MIB, Rule::new(Op::Complete, When::Nth(1), Fault::Transient)),
        (&small_path, MIB, Rule::new(Op::Put, When::Nth(4), Fault::Permanent)),
        (
            &small_path,
            MIB,
            Rule::new(Op::Put, When::Nth(1), Fault::Unreachable).on_keys("_sha256file"),
        ),
        (&small_path, MIB, Rule::new(Op::Put, When::Nth(1), Fault::Permanent).on_keys("_metadata")),
    ];
    for (source, object_bytes, rule) in cases {
        let what = format!("{rule:?}");
        let mem = MemStore::new();
        let faulty = FaultyStore::new(mem.clone(), 4).with(rule);
        let job = cinder_job(source, FULL_ID, object_bytes, Algorithm::Zlib);
        let cancel = AtomicBool::new(false);
        let _ = failed_with(cinder_backup(&faulty, &job, &cancel), ErrorKind::Store, &what);
        assert_eq!(faulty.injected().len(), 1, "{what}: the fault fired");
        assert_no_cinder_objects(&mem, &what);
    }
}

// A data object stored whose PUT response is lost fails the Cinder backup; the object is still
// deleted with the rest of the failed backup.
#[test]
fn cinder_lost_put_response_deletes_the_object() {
    let scratch = Scratch::new("fault-cinder-lost");
    let (source, _) = image(&scratch, Content::Text, 6 * MIB, 6);
    let mem = MemStore::new();
    let faulty = FaultyStore::new(mem.clone(), 6)
        .with(Rule::new(Op::Put, When::Nth(2), Fault::LoseResponse).on_keys(&data_of(FULL_ID)));
    let job = cinder_job(&source, FULL_ID, MIB, Algorithm::Zlib);
    let cancel = AtomicBool::new(false);
    let _ = failed_with(cinder_backup(&faulty, &job, &cancel), ErrorKind::Store, "lost PUT");
    assert_no_cinder_objects(&mem, "lost PUT response");
}

/// Backs up `data` (full, then an incremental after changing it) in Cinder's format into `mem`.
fn cinder_chain(scratch: &Scratch, mem: &MemStore, algorithm: Algorithm, content: Content) {
    let (source, mut data) = image(scratch, content, 4 * MIB + 100, 7);
    let cancel = AtomicBool::new(false);
    let _ = cinder_backup(mem, &cinder_job(&source, FULL_ID, MIB, algorithm), &cancel)
        .expect("full backup");
    data[MIB as usize..MIB as usize + 40_000].fill(0x42);
    std::fs::write(&source, &data).expect("change the image");
    let mut job = cinder_job(&source, INCREMENTAL_ID, MIB, algorithm);
    job.parent_id = Some(FULL_ID.into());
    let _ = cinder_backup(mem, &job, &cancel).expect("incremental backup");
}

// Corrupted or truncated Cinder objects make the restore fail with an integrity error before the
// bad bytes are written, naming the object: compressed objects, objects stored raw (`none`,
// checked block by block against `_sha256file`), the same without a `_sha256file` (checked
// whole against `_metadata`'s MD5), and an object of the parent when restoring an incremental.
#[test]
fn cinder_corrupt_reads_are_integrity_errors() {
    let scratch = Scratch::new("fault-cinder-corrupt");
    for (algorithm, content) in
        [(Algorithm::Zlib, Content::Text), (Algorithm::None, Content::Random)]
    {
        let mem = MemStore::new();
        cinder_chain(&scratch, &mem, algorithm, content);
        let objects = mem.keys_under(&format!("volume_{VOLUME_ID}/"));
        let full_prefix = objects
            .iter()
            .find(|key| key.ends_with(&format!("{FULL_ID}_metadata")))
            .expect("the full backup's _metadata")
            .trim_end_matches("_metadata")
            .to_owned();
        let cases = [
            (
                FULL_ID,
                Rule::new(Op::Get, When::Nth(2), Fault::Corrupt).on_keys(&data_of(FULL_ID)),
                "block",
            ),
            (
                FULL_ID,
                Rule::new(Op::Get, When::Nth(1), Fault::Truncate).on_keys(&data_of(FULL_ID)),
                "",
            ),
            (
                INCREMENTAL_ID,
                Rule::new(Op::Get, When::From(1), Fault::Corrupt).on_keys(&data_of(FULL_ID)),
                "block",
            ),
        ];
        for (seed, (backup_id, rule, says)) in (20..).zip(cases) {
            let what = format!("{algorithm:?} {backup_id} {rule:?}");
            let faulty = FaultyStore::new(mem.clone(), seed).with(rule);
            let target = scratch.join(&format!("restored-{seed}.img"));
            let error = failed_with(
                cinder_restore(&faulty, backup_id, &target),
                ErrorKind::Integrity,
                &what,
            );
            let names = error.message.contains(&data_of(FULL_ID));
            assert!(names, "{what}: names no object: {}", error.message);
            if algorithm == Algorithm::None {
                assert!(error.message.contains(says), "{what}: {}", error.message);
            }
            assert!(!target.exists(), "{what}: the created target is left");
        }
        // Without `_sha256file`, objects are checked whole against their `_metadata` MD5.
        let sha_key = format!("{full_prefix}_sha256file");
        let sha = mem.object(&sha_key).expect("the full backup's _sha256file");
        mem.delete(&sha_key).expect("delete");
        let faulty = FaultyStore::new(mem.clone(), 30)
            .with(Rule::new(Op::Get, When::Nth(1), Fault::Corrupt).on_keys(&data_of(FULL_ID)));
        let target = scratch.join("restored-md5.img");
        let error =
            failed_with(cinder_restore(&faulty, FULL_ID, &target), ErrorKind::Integrity, "md5");
        if algorithm == Algorithm::None {
            assert!(error.message.contains("MD5"), "{}", error.message);
        }
        assert!(!target.exists());
        mem.insert(&sha_key, sha.data);
    }
}

// A Cinder `none` object tampered with in the bucket (not in transit) is caught as well, by the
// restore's block check, before any of its bytes are written.
#[test]
fn cinder_tampered_raw_object_is_caught() {
    let scratch = Scratch::new("fault-cinder-tampered");
    let mem = MemStore::new();
    cinder_chain(&scratch, &mem, Algorithm::None, Content::Mixed);
    let object = mem
        .keys_under(&format!("volume_{VOLUME_ID}/"))
        .into_iter()
        .find(|key| key.contains(FULL_ID) && key.ends_with("-00003"))
        .expect("object 3 of the full backup");
    assert!(mem.modify(&object, |data| data[12_345] ^= 1));
    let target = scratch.join("restored.img");
    let error = failed_with(
        cinder_restore(&mem, INCREMENTAL_ID, &target),
        ErrorKind::Integrity,
        "tampered",
    );
    assert!(error.message.contains(&object), "{}", error.message);
}

// Cancellation mid-backup (raised at an exact upload) ends both formats' backups as `Cancelled`
// with nothing visible: no manifest or `_metadata`, no object of the Cinder backup, no open
// multipart upload, no lease.
#[test]
fn cancellation_mid_backup_leaves_nothing() {
    let scratch = Scratch::new("fault-cancel");
    let (large, _) = image(&scratch, Content::Random, 40 * MIB + 513, 8);
    for (op, nth) in [(Op::PutPart, 2), (Op::Put, 1)] {
        let what = format!("native, cancelled at {op:?} {nth}");
        let mem = MemStore::new();
        let cancel = Arc::new(AtomicBool::new(false));
        let rule = Rule::new(op, When::Nth(nth), Fault::Raise(Arc::clone(&cancel)));
        let keys = if op == Op::Put { "packs/" } else { "" };
        let faulty = FaultyStore::new(mem.clone(), 8).with(rule.on_keys(keys));
        let repo = repository(&mem, 1 << 20, faulty);
        let pack = if op == Op::Put { 2 * MIB } else { 64 * MIB };
        let _ =
            failed_with(native_backup(&repo, &large, pack, &cancel), ErrorKind::Cancelled, &what);
        assert_no_native_backup(&mem, &what);
    }
    for (op, nth, object_bytes) in [(Op::PutPart, 1, 18 * MIB), (Op::Put, 2, MIB)] {
        let what = format!("cinder, cancelled at {op:?} {nth}");
        let mem = MemStore::new();
        let cancel = Arc::new(AtomicBool::new(false));
        let rule = Rule::new(op, When::Nth(nth), Fault::Raise(Arc::clone(&cancel)));
        let faulty = FaultyStore::new(mem.clone(), 9).with(rule);
        let job = cinder_job(&large, FULL_ID, object_bytes, Algorithm::Zlib);
        let _ = failed_with(cinder_backup(&faulty, &job, &cancel), ErrorKind::Cancelled, &what);
        assert_no_cinder_objects(&mem, &what);
    }
}

/// The seeds to run: `FERRY_FAULT_SEED` alone when set, else a few fixed ones.
fn seeds() -> Vec<u64> {
    match std::env::var("FERRY_FAULT_SEED") {
        Ok(seed) => vec![seed.parse().expect("FERRY_FAULT_SEED is a number")],
        Err(_) => vec![101, 202, 303],
    }
}

/// Transient faults on every operation (and lost responses of idempotent ones), each call with
/// probability `per_mille`.
fn flaky(mem: &MemStore, seed: u64, per_mille: u32) -> Retrying<FaultyStore<MemStore>> {
    let mut faulty = FaultyStore::new(mem.clone(), seed);
    for op in [
        Op::Put,
        Op::Get,
        Op::GetRange,
        Op::List,
        Op::Delete,
        Op::Begin,
        Op::PutPart,
        Op::Complete,
        Op::Abort,
        Op::ListUploads,
    ] {
        faulty = faulty.with(Rule::new(op, When::Chance(per_mille), Fault::Transient));
    }
    for op in [Op::Put, Op::PutPart, Op::Delete] {
        faulty = faulty.with(Rule::new(op, When::Chance(per_mille), Fault::LoseResponse));
    }
    let policy = RetryPolicy {
        max_attempts: 12,
        max_elapsed: Duration::from_secs(60),
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        unreached_attempts: 12,
    };
    Retrying::new(faulty, policy)
}

// Transient faults and lost responses on every operation, behind the retry layer, change
// nothing: both formats back up and restore byte for byte, and the faults did fire.
#[test]
fn transient_faults_are_retried() {
    let scratch = Scratch::new("fault-flaky");
    let (source, data) = image(&scratch, Content::Mixed, 20 * MIB + 4097, 11);
    for seed in seeds() {
        eprintln!("transient_faults_are_retried: seed {seed} (FERRY_FAULT_SEED={seed} replays it)");
        let mem = MemStore::new();
        let repo = repository(&mem, 1 << 20, flaky(&mem, seed, 150));
        let cancel = AtomicBool::new(false);
        let outcome = native_backup(&repo, &source, 18 * MIB, &cancel)
            .unwrap_or_else(|e| panic!("seed {seed}: native backup: {}", e.message));
        let target = scratch.join(&format!("native-{seed}.img"));
        let _ = native_restore(&repo, &outcome.manifest.backup_id, &target)
            .unwrap_or_else(|e| panic!("seed {seed}: native restore: {}", e.message));
        let restored = std::fs::read(&target).expect("read");
        assert_eq!(volume::first_difference(&restored, &data), None, "seed {seed}: native");
        assert!(repo.store.retry_count() > 0, "seed {seed}: no fault fired");

        let store = flaky(&mem, seed, 150);
        let job = cinder_job(&source, FULL_ID, 18 * MIB, Algorithm::Zlib);
        let _ = cinder_backup(&store, &job, &cancel)
            .unwrap_or_else(|e| panic!("seed {seed}: cinder backup: {}", e.message));
        let target = scratch.join(&format!("cinder-{seed}.img"));
        let _ = cinder_restore(&store, FULL_ID, &target)
            .unwrap_or_else(|e| panic!("seed {seed}: cinder restore: {}", e.message));
        let restored = std::fs::read(&target).expect("read");
        assert_eq!(volume::first_difference(&restored, &data), None, "seed {seed}: cinder");
        assert!(store.retry_count() > 0, "seed {seed}: no fault fired");
        assert_eq!(mem.pending_uploads(), [], "seed {seed}: multipart uploads left");
    }
}
