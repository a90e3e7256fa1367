//! Garbage collection against concurrent writers, on an in-memory store whose server clock the
//! test moves (`memstore`): each race is one exact interleaving, run by a hook at the store
//! operation where the other job must step in. After each, every committed backup restores
//! byte-identically and `check` finds nothing wrong.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::io::Engine;
use crate::native::backup::{self, BackupOptions};
use crate::native::dedup::DedupView;
use crate::native::keys::KeySource;
use crate::native::layout::crypt::{Cipher, Secret};
use crate::native::layout::gc::GcTiming;
use crate::native::layout::{self, Manifest, PackId};
use crate::native::lifecycle::{self, GroupBy, PruneOptions, PruneReport};
use crate::native::memstore::{MemStore, Op, crashed};
use crate::native::repo::{NewEncryption, Repository, lock};
use crate::native::restore::{self, RestoreOptions};
use crate::native::retention::{Keep, Policy};
use crate::native::{check, maintain};
use crate::progress::Progress;
use crate::store::ObjectStore;

const CHUNK: usize = 64 * 1024;
const GRACE_SECS: u64 = GcTiming::DEFAULT.grace_secs;
const MIN_PACK_AGE_SECS: u64 = GcTiming::DEFAULT.min_pack_age_secs;
/// 2026-11-26T12:00:00Z: far from this host's clock in either direction is fine.
const T0: u64 = 1_795_694_400;

struct World {
    store: Arc<MemStore>,
    repo: Repository,
    dir: PathBuf,
    warnings: Arc<Mutex<Vec<String>>>,
    /// The passphrase of an encrypted repository.
    passphrase: Option<Vec<u8>>,
}

impl World {
    fn new(name: &str, now: u64) -> World {
        World::with_encryption(name, now, None)
    }

    fn with_encryption(name: &str, now: u64, passphrase: Option<&[u8]>) -> World {
        let store = MemStore::new(now);
        let encryption = passphrase.map(|passphrase| NewEncryption {
            cipher: Cipher::for_this_cpu(),
            secret: Secret::Passphrase(passphrase.to_vec()),
        });
        let repo = Repository::init_with(
            Box::new(Arc::clone(&store)),
            CHUNK as u32,
            GcTiming::DEFAULT,
            encryption,
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!("ferry-gc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let passphrase = passphrase.map(<[u8]>::to_vec);
        World { store, repo, dir, warnings: Arc::default(), passphrase }
    }

    /// Another handle on the same repository (another job).
    fn other(&self) -> Repository {
        let passphrase = match &self.passphrase {
            Some(passphrase) => KeySource::Given(Secret::Passphrase(passphrase.clone())),
            None => KeySource::None,
        };
        Repository::open_with(Box::new(Arc::clone(&self.store)), &passphrase).unwrap()
    }

    /// A volume of `chunks` random chunks.
    fn volume(&self, name: &str, seed: u64, chunks: usize) -> PathBuf {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data: Vec<u8> = (0..chunks * CHUNK)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let path = self.dir.join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    fn backup(&self, source: &Path) -> Manifest {
        let mut options = BackupOptions::new(source.to_path_buf());
        options.engine = Engine::Pread;
        options.worker_count = 1;
        options.parts_in_flight = 1;
        // One read in flight: chunks reach packs in volume order, so pack layouts (and the
        // space figure) repeat from run to run.
        options.queue_depth = Some(1);
        options.pack_size_bytes = 4 * CHUNK as u64;
        let warnings = Arc::clone(&self.warnings);
        let warn = move |message: String| lock(&warnings).push(message);
        let outcome =
            backup::run(&self.repo, &options, &Progress::default(), &AtomicBool::new(false), &warn);
        outcome.unwrap().manifest
    }

    fn restores(&self, manifest: &Manifest, source: &Path) {
        let target = self.dir.join(format!("{}.restored", manifest.backup_id));
        let mut options = RestoreOptions::new(target.clone());
        options.engine = Engine::Pread;
        options.force = true;
        let manifest = self.repo.load_manifest(&manifest.backup_id).unwrap();
        let _ = restore::run(
            &self.repo,
            &manifest,
            &options,
            &Progress::default(),
            &AtomicBool::new(false),
            &|_| {},
        )
        .unwrap();
        assert!(
            std::fs::read(&target).unwrap() == std::fs::read(source).unwrap(),
            "restore differs"
        );
        std::fs::remove_file(target).unwrap();
    }

    fn prune(&self) -> PruneReport {
        lifecycle::prune(&self.other(), &PruneOptions::default(), &|_| {}).unwrap()
    }

    fn consistent(&self) {
        let report = check::run(&self.repo).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    fn forget(&self, backup_id: &str) {
        self.repo.delete_backup(backup_id).unwrap();
    }

    /// Rewrites a manifest's start time (the policy's notion of when it was taken).
    fn date(&self, manifest: &Manifest, time: u64) {
        let mut dated = self.repo.load_manifest(&manifest.backup_id).unwrap();
        dated.started_at = layout::Timestamp(time);
        let encoded =
            layout::encode_document(&layout::Crypt::Plain, layout::ObjectKind::Manifest, &dated);
        self.store.put(&layout::manifest_key(&dated.backup_id), encoded.into()).unwrap();
    }

    fn packs_exist(&self, packs: &[PackId]) -> usize {
        packs.iter().filter(|pack| !self.store.keys(&pack.pack_key()).is_empty()).count()
    }

    fn warned(&self, words: &str) -> bool {
        lock(&self.warnings).iter().any(|warning| warning.contains(words))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A hook that runs `action` once, at the first `op` on a key starting with `prefix`.
fn once(
    op: Op,
    prefix: &'static str,
    action: impl Fn() + Send + Sync + 'static,
) -> crate::native::memstore::Hook {
    let fired = AtomicBool::new(false);
    Arc::new(move |seen, key: &str| {
        if seen == op && key.starts_with(prefix) && !fired.swap(true, Ordering::SeqCst) {
            action();
        }
        Ok(())
    })
}

/// A hook that fails the `crash_at`th write (PUT, DELETE, multipart call) and every operation
/// after it: a process killed at that point.
fn crash_at_write(crash_at: usize) -> crate::native::memstore::Hook {
    let writes = AtomicUsize::new(0);
    Arc::new(move |op, key: &str| {
        let write = matches!(op, Op::Put | Op::Delete | Op::Multipart);
        if write && writes.fetch_add(1, Ordering::SeqCst) + 1 >= crash_at {
            return Err(crashed(key));
        }
        // Dead after the crash: nothing more reaches the store.
        if writes.load(Ordering::SeqCst) >= crash_at { Err(crashed(key)) } else { Ok(()) }
    })
}

/// A backup A whose packs no manifest references any more, old enough to be condemned.
fn orphaned(world: &World, source: &Path) -> Manifest {
    let first = world.backup(source);
    world.forget(&first.backup_id);
    world.store.advance(MIN_PACK_AGE_SECS + 1);
    first
}

// (a) A backup loads the index, a prune condemns the packs it deduplicates into, the backup
// commits; the sweep recovers them. A backup started after the mark stores its chunks again.
#[test]
fn a_backup_that_loaded_the_index_before_a_mark_commits_after_it() {
    loaded_before_the_mark(true);
    loaded_before_the_mark(false);
}

/// With `copies`, a later backup stores the chunks again and the sweep deletes the condemned
/// packs (the later backup's packs serve the earlier one); without, the sweep recovers them.
fn loaded_before_the_mark(copies: bool) {
    let world = World::new(if copies { "a-copies" } else { "a" }, T0);
    let source = world.volume("v", 1, 12);
    let first = orphaned(&world, &source);
    let other = world.other();
    let marked = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&marked);
    // The backup's last store-clock reading before it commits: after its dedup decisions.
    world.store.set_hook(Some(once(Op::Put, "clock/", move || {
        let report = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
        count.store(report.marked.unwrap().packs, Ordering::SeqCst);
    })));
    let second = world.backup(&source);
    world.store.set_hook(None);
    assert_eq!(marked.load(Ordering::SeqCst), first.packs.len());
    assert_eq!(second.stats.new_chunk_count, 0, "deduplicated before the mark");
    assert_eq!(second.packs, first.packs);
    let third = world.backup(&source);
    assert_eq!(third.stats.new_chunk_count, 12, "never dedups into a condemned pack");
    assert!(third.packs.iter().all(|pack| !first.packs.contains(pack)));
    let report = check::run(&world.repo).unwrap();
    assert_eq!(report.marked_referenced.len(), first.packs.len());
    assert!(report.problems.is_empty());
    if !copies {
        // As if the third backup had been forgotten and its packs swept.
        world.forget(&third.backup_id);
        for pack in &third.packs {
            world.store.delete(&pack.index_key()).unwrap();
            world.store.delete(&pack.pack_key()).unwrap();
        }
    }
    world.store.advance(GRACE_SECS);
    let swept = world.prune();
    assert_eq!(swept.swept.len(), 1);
    let (recovered, deleted) = if copies { (0, first.packs.len()) } else { (first.packs.len(), 0) };
    assert_eq!(swept.swept[0].recovered_packs.len(), recovered);
    assert_eq!(swept.swept[0].deleted_packs, deleted);
    assert_eq!(world.packs_exist(&first.packs), recovered);
    world.restores(&second, &source);
    if copies {
        world.restores(&third, &source);
    }
    world.consistent();
}

/// Runs a backup that is paused, just before it commits, while a prune condemns the packs it
/// deduplicated into and the grace passes; `lose_lease` makes its lease disappear (as if its
/// host had been judged dead) so that the sweep goes ahead.
fn paused_past_the_grace(lose_lease: bool) {
    let world = World::new(if lose_lease { "b" } else { "c" }, T0);
    let source = world.volume("v", 2, 12);
    let first = orphaned(&world, &source);
    let other = world.other();
    let store = Arc::clone(&world.store);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    world.store.set_hook(Some(once(Op::Put, "clock/", move || {
        let mut seen = lock(&seen);
        seen.push(lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap());
        store.advance(GRACE_SECS + 1);
        if lose_lease {
            for key in store.keys("locks/") {
                store.delete(&key).unwrap();
            }
        }
        seen.push(lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap());
    })));
    let second = world.backup(&source);
    world.store.set_hook(None);
    let reports = lock(&reports);
    assert_eq!(reports[0].marked.as_ref().unwrap().packs, first.packs.len());
    if lose_lease {
        assert_eq!(reports[1].swept[0].deleted_packs, first.packs.len());
        assert_eq!(world.packs_exist(&first.packs), 0);
    } else {
        assert!(reports[1].swept.is_empty());
        assert!(reports[1].waiting[0].reason.contains("predates the mark"), "{:?}", reports[1]);
        assert_eq!(world.packs_exist(&first.packs), first.packs.len());
    }
    // Either way the backup saw its packs gone or condemned, read the source again and stored
    // everything anew.
    assert!(world.warned("reading the source again"));
    assert_eq!(second.stats.new_chunk_count, 12);
    assert!(second.packs.iter().all(|pack| !first.packs.contains(pack)));
    world.restores(&second, &source);
    world.consistent();
    let last = world.prune();
    if !lose_lease {
        assert_eq!(last.swept[0].deleted_packs, first.packs.len());
    }
    assert_eq!(world.packs_exist(&first.packs), 0);
    world.restores(&second, &source);
    world.consistent();
}

// (b) A backup paused past the grace whose lease is gone: the sweep deletes the packs it
// deduplicated into, and the backup re-validates before committing and stores them again.
#[test]
fn a_backup_paused_past_the_grace_revalidates() {
    paused_past_the_grace(true);
}

// (c) The same with the backup's lease live: the sweep waits for it.
#[test]
fn a_live_lease_older_than_the_mark_postpones_the_sweep() {
    paused_past_the_grace(false);
}

// (d) A pack uploaded whose index is not written yet: prune and repair leave it alone while it
// is young; once old it may be condemned, but not deleted while its backup runs, and the backup
// stores its chunks again if it was condemned.
#[test]
fn a_pack_without_its_index_yet_survives_prune_and_repair() {
    let world = World::new("d", T0);
    let source = world.volume("v", 3, 12);
    let other = world.other();
    let store = Arc::clone(&world.store);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    world.store.set_hook(Some(once(Op::Put, "index/", move || {
        let mut seen = lock(&seen);
        let young = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
        assert!(young.young_unreferenced_packs >= 1 && young.marked.is_none(), "{young:?}");
        let repair = maintain::repair(&other, &|_| {}).unwrap();
        assert!(repair.rebuilt_indexes.is_empty() && !repair.unindexed_packs_left.is_empty());
        store.advance(MIN_PACK_AGE_SECS + 1);
        let marking = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
        assert!(marking.marked.is_some(), "an old unreferenced pack is condemned");
        let repair = maintain::repair(&other, &|_| {}).unwrap();
        assert!(repair.rebuilt_indexes.is_empty(), "a condemned pack's index is not rebuilt");
        store.advance(GRACE_SECS);
        let sweep = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
        assert!(sweep.swept.is_empty() && sweep.waiting.len() == 1, "{sweep:?}");
        seen.push(marking.marked.unwrap().packs);
    })));
    let manifest = world.backup(&source);
    world.store.set_hook(None);
    assert!(lock(&reports)[0] >= 1);
    assert!(world.warned("reading the source again"));
    world.restores(&manifest, &source);
    world.consistent();
    let swept = world.prune();
    assert!(swept.swept[0].deleted_packs >= 1);
    world.restores(&manifest, &source);
    world.consistent();
}

/// The repository of the crash test: backup A kept, backup B's packs condemned and past their
/// grace, backup C just forgotten (old enough to be condemned).
fn crash_setup() -> (World, PathBuf, Manifest, Vec<PackId>) {
    let world = World::new("e", T0);
    let (va, vb, vc) = (world.volume("a", 5, 8), world.volume("b", 6, 8), world.volume("c", 7, 8));
    let a = world.backup(&va);
    let b = world.backup(&vb);
    let c = world.backup(&vc);
    world.forget(&b.backup_id);
    world.store.advance(MIN_PACK_AGE_SECS + 1);
    assert!(world.prune().marked.is_some());
    world.store.advance(GRACE_SECS);
    world.forget(&c.backup_id);
    let mut doomed = b.packs.clone();
    doomed.extend(&c.packs);
    (world, va, a, doomed)
}

// (e) A prune that crashes after any of its steps leaves a consistent repository, and prunes
// run again converge: exactly the unreferenced packs are gone.
#[test]
fn a_prune_crashing_after_any_step_converges() {
    for crash_at in 1.. {
        let (world, va, a, doomed) = crash_setup();
        world.store.set_hook(Some(crash_at_write(crash_at)));
        let crashed_run = lifecycle::prune(&world.other(), &PruneOptions::default(), &|_| {});
        world.store.set_hook(None);
        world.consistent();
        world.restores(&a, &va);
        let _ = world.prune();
        world.store.advance(GRACE_SECS);
        let _ = world.prune();
        assert_eq!(world.packs_exist(&doomed), 0, "crash at write {crash_at}");
        assert_eq!(world.packs_exist(&a.packs), a.packs.len());
        assert!(world.store.keys("gc/").is_empty());
        assert!(world.repo.find_indexes(&a.packs).unwrap().iter().all(Result::is_ok));
        world.restores(&a, &va);
        world.consistent();
        if crashed_run.is_ok() {
            assert!(crash_at > 5, "the sweep has several steps");
            break;
        }
    }
}

// (f) The host's clock plays no part: with the store's clock hours ahead of or behind this
// host's, a mark is swept exactly when the store's clock says the grace has passed.
#[test]
fn a_client_clock_hours_off_changes_nothing() {
    let host_now = layout::Timestamp::now().0;
    for store_now in [host_now - 6 * 3600, host_now + 6 * 3600, T0] {
        let world = World::new("f", store_now);
        let source = world.volume("v", 8, 4);
        let first = orphaned(&world, &source);
        assert!(world.prune().marked.is_some());
        world.store.advance(GRACE_SECS - 1);
        let early = world.prune();
        assert!(early.swept.is_empty() && early.waiting[0].reason.contains("grace"));
        assert_eq!(world.packs_exist(&first.packs), first.packs.len());
        world.store.advance(1);
        assert_eq!(world.prune().swept[0].deleted_packs, first.packs.len());
        assert_eq!(world.packs_exist(&first.packs), 0);
        world.consistent();
    }
}

// (h) Two prunes at once, in the sweep and in the mark phase: deletes are idempotent and marks
// have unique names, so the outcome is that of one prune.
#[test]
fn two_prunes_at_once() {
    let world = World::new("h", T0);
    let (va, vb) = (world.volume("a", 9, 8), world.volume("b", 10, 8));
    let a = world.backup(&va);
    let b = world.backup(&vb);
    world.forget(&b.backup_id);
    world.store.advance(MIN_PACK_AGE_SECS + 1);
    // Both mark: two marks condemn the same packs.
    let other = world.other();
    world.store.set_hook(Some(once(Op::Put, "gc/mark-", move || {
        assert!(
            lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap().marked.is_some()
        );
    })));
    assert!(world.prune().marked.is_some());
    assert_eq!(world.store.keys("gc/").len(), 2);
    world.store.advance(GRACE_SECS);
    // Both sweep: the second runs in the middle of the first's deletes.
    let other = world.other();
    world.store.set_hook(Some(once(Op::Delete, "index/", move || {
        let _ = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
    })));
    let _ = world.prune();
    world.store.set_hook(None);
    assert_eq!(world.packs_exist(&b.packs), 0);
    assert!(world.store.keys("gc/").is_empty());
    world.restores(&a, &va);
    world.consistent();
}

// A backup never references a chunk whose pack it has not seen exist with its indexed size: a
// missing or truncated pack's chunks are stored again, with a warning.
#[test]
fn backups_store_again_what_a_missing_or_truncated_pack_held() {
    let world = World::new("missing", T0);
    let source = world.volume("v", 11, 12);
    let first = world.backup(&source);
    let lost = first.packs[0].pack_key();
    world.store.delete(&lost).unwrap();
    let truncated = first.packs[1].pack_key();
    let bytes = world.store.get(&truncated).unwrap();
    world.store.put(&truncated, bytes.slice(..bytes.len() - 1)).unwrap();
    let second = world.backup(&source);
    assert!(world.warned("2 indexed pack(s) are missing or not of their indexed size"));
    assert_eq!(second.stats.new_chunk_count, 8, "two packs of 4 chunks stored again");
    assert!(!second.packs.contains(&first.packs[0]) && !second.packs.contains(&first.packs[1]));
    world.restores(&second, &source);
    // The first backup is damaged, and check says where.
    let report = check::run(&world.repo).unwrap();
    assert!(!report.problems.is_empty());
    for problem in &report.problems {
        let lost_or_truncated = [&first.packs[0], &first.packs[1]]
            .iter()
            .any(|pack| problem.object.contains(&pack.to_hex()));
        assert!(lost_or_truncated, "{problem:?}");
    }
}

// Repair rebuilds a lost index from the pack's records, byte for byte, and deletes no pack,
// referenced or not.
#[test]
fn repair_rebuilds_a_lost_index_and_deletes_nothing() {
    let world = World::new("repair", T0);
    let source = world.volume("v", 12, 12);
    let first = world.backup(&source);
    let orphan = world.backup(&world.volume("w", 13, 4));
    world.forget(&orphan.backup_id);
    let index_key = first.packs[0].index_key();
    let original = world.store.get(&index_key).unwrap();
    world.store.delete(&index_key).unwrap();
    world.store.delete(&orphan.packs[0].index_key()).unwrap();
    let packs_before = world.store.keys("packs/");
    let report = maintain::repair(&world.repo, &|_| {}).unwrap();
    assert_eq!(report.rebuilt_indexes, [first.packs[0].pack_key()]);
    // The orphan is young and referenced by nothing: a running backup may be writing its index.
    assert_eq!(report.unindexed_packs_left, [orphan.packs[0].pack_key()]);
    assert_eq!(world.store.get(&index_key).unwrap(), original);
    assert_eq!(world.store.keys("packs/"), packs_before);
    world.restores(&first, &source);
    world.store.advance(MIN_PACK_AGE_SECS);
    let report = maintain::repair(&world.repo, &|_| {}).unwrap();
    assert_eq!(report.rebuilt_indexes, [orphan.packs[0].pack_key()]);
    assert_eq!(world.store.keys("packs/"), packs_before);
    world.consistent();
}

// Protection: a protected backup survives every policy and `delete`.
#[test]
fn protected_backups_survive_forget_and_delete() {
    let world = World::new("protect", T0);
    let source = world.volume("v", 14, 2);
    let old = world.backup(&source);
    let new = world.backup(&source);
    // Taken an hour apart (both ran within the same second of this host's clock).
    world.date(&old, T0);
    world.date(&new, T0 + 3600);
    world.repo.set_protected(&old.backup_id, true).unwrap();
    let error = world.repo.delete_backup(&old.backup_id).unwrap_err();
    assert_eq!(error.kind, crate::error::ErrorKind::Refused);
    let policy = Policy { last: Keep::Count(1), ..Policy::default() };
    let report = lifecycle::forget(&world.repo, &policy, GroupBy::Source, false, &|_| {}).unwrap();
    assert_eq!(report.removed_count, 0);
    assert_eq!(world.repo.list_backups().unwrap().len(), 2);
    world.repo.set_protected(&old.backup_id, false).unwrap();
    let report = lifecycle::forget(&world.repo, &policy, GroupBy::Source, true, &|_| {}).unwrap();
    assert_eq!((report.removed_count, report.dry_run), (1, true));
    assert_eq!(world.repo.list_backups().unwrap().len(), 2, "a dry run removes nothing");
    let report = lifecycle::forget(&world.repo, &policy, GroupBy::Source, false, &|_| {}).unwrap();
    assert_eq!(report.groups[0].removed[0].backup_id, old.backup_id);
    assert_eq!(world.repo.list_backups().unwrap(), std::slice::from_ref(&new.backup_id));
    let empty = lifecycle::forget(&world.repo, &Policy::default(), GroupBy::Source, false, &|_| {});
    assert_eq!(empty.unwrap_err().kind, crate::error::ErrorKind::Usage);
}

// 30 simulated days of daily backups of a volume that changes a little every day, with forget
// (7 daily, 4 weekly) and prune after each: the repository stays close to its live data.
#[test]
fn thirty_days_of_daily_backups_stay_near_live_data() {
    let world = World::new("30days", T0);
    let chunks = 32;
    let source = world.volume("v", 15, chunks);
    let policy = Policy { daily: Keep::Count(7), weekly: Keep::Count(4), ..Policy::default() };
    let mut data = std::fs::read(&source).unwrap();
    let mut ratios = Vec::new();
    let (mut repacked, mut copied) = (0, 0);
    for day in 0..30u64 {
        // Two chunks rewritten a day (6% of the volume).
        for n in 0..2 {
            let chunk = usize::try_from((day * 7 + n * 13) % chunks as u64).unwrap();
            let fresh = world.volume("fresh", 1000 + day * 2 + n, 1);
            data[chunk * CHUNK..(chunk + 1) * CHUNK]
                .copy_from_slice(&std::fs::read(fresh).unwrap());
        }
        std::fs::write(&source, &data).unwrap();
        let manifest = world.backup(&source);
        // Backups are dated by this host's clock; the simulation dates them by day.
        world.date(&manifest, T0 + day * 86_400);
        let _ = lifecycle::forget(&world.repo, &policy, GroupBy::Source, false, &|_| {}).unwrap();
        let report = world.prune();
        repacked += report.repack.sources.len();
        copied += report.repack.copied_bytes;
        world.store.advance(86_400);
        let live = live_bytes(&world);
        let stored = world.store.bytes("packs/");
        ratios.push(stored as f64 / live as f64);
    }
    world.consistent();
    let report = check::run(&world.repo).unwrap();
    let last = *ratios.last().unwrap();
    let kept = world.repo.list_backups().unwrap().len();
    eprintln!(
        "30-day space: {kept} backups kept; stored/live by day {ratios:.3?}; day 30: {last:.3} \
         ({} of {} stored bytes in packs no backup needs, awaiting their sweep); {repacked} \
         pack(s) repacked, {copied} bytes copied",
        report.unreferenced_bytes, report.pack_bytes
    );
    // Without repacking this was 1.286 on day 30: dead chunks inside packs that still hold
    // live ones. Repacking (default threshold) copies the live ones out.
    assert!(repacked > 0 && copied > 0);
    assert!(last <= 1.2, "day 30: {last:.3}");
    // Days 23-29 (daily), and the newest of the weeks before (days 17 and 10; day 24 is a
    // daily one already): ISO weeks from Thursday 2026-11-26.
    assert_eq!(kept, 9);
}

/// Bytes of the records the kept backups reference (each distinct chunk once).
fn live_bytes(world: &World) -> u64 {
    let mut chunks = std::collections::HashMap::new();
    for id in world.repo.list_backups().unwrap() {
        let manifest = world.repo.load_manifest(&id).unwrap();
        let locations = world.repo.locate(&manifest).unwrap();
        for hash in manifest.chunks.iter().flatten() {
            let _ = chunks.insert(*hash, locations[hash].entry.record_bytes());
        }
    }
    chunks.values().sum()
}

// A grace chosen at init is in the config, so a job that opens the repository (another host)
// obeys it: a prune sweeps a mark exactly that long after it, not 24 h later.
#[test]
fn the_grace_chosen_at_init_is_what_every_prune_obeys() {
    let store = MemStore::new(T0);
    let timing = GcTiming::for_grace(60).unwrap();
    let _ =
        Repository::init_with(Box::new(Arc::clone(&store)), CHUNK as u32, timing, None).unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-gc-grace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = Repository::open(Box::new(Arc::clone(&store))).unwrap();
    let world = World { repo, store, dir, warnings: Arc::default(), passphrase: None };
    assert_eq!(world.repo.config.gc(), timing);
    let source = world.volume("v", 9, 4);
    let first = world.backup(&source);
    world.forget(&first.backup_id);
    world.store.advance(timing.min_pack_age_secs + 1);
    assert_eq!(world.prune().marked.unwrap().packs, first.packs.len());
    world.store.advance(timing.grace_secs - 1);
    assert_eq!(world.prune().waiting.len(), 1, "inside the grace");
    world.store.advance(1);
    let swept = world.prune();
    assert_eq!(swept.swept[0].deleted_packs, first.packs.len());
    assert_eq!(world.packs_exist(&first.packs), 0);
    world.consistent();
}

/// GETs of objects under `prefix` while `f` runs.
fn gets_under(world: &World, prefix: &'static str, f: impl FnOnce()) -> usize {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    world.store.set_hook(Some(Arc::new(move |op, key: &str| {
        if op == Op::Get && key.starts_with(prefix) {
            let _ = counter.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })));
    f();
    world.store.set_hook(None);
    count.load(Ordering::SeqCst)
}

/// GETs of `index/` objects while `f` runs.
fn index_reads(world: &World, f: impl FnOnce()) -> usize {
    gets_under(world, "index/", f)
}

// Prune consolidates the per-pack indexes: a backup then starts by reading one consolidated
// index plus the per-pack indexes written since; the superseded per-pack indexes go only after
// the grace; restore, verify, check and repair read both kinds; a consolidated index whose
// packs are mostly swept is rewritten.
#[test]
fn consolidated_indexes_replace_per_pack_indexes() {
    let world = World::new("merge", T0);
    let volumes: Vec<PathBuf> =
        (0..4).map(|n| world.volume(&format!("v{n}"), 100 + n, 12)).collect();
    let manifests: Vec<Manifest> = volumes.iter().map(|v| world.backup(v)).collect();
    let pack_count = world.store.keys("index/").len();
    assert_eq!(pack_count, 12);
    assert_eq!(index_reads(&world, || drop(DedupView::load(&world.repo, 1).unwrap())), pack_count);
    let first = world.prune();
    assert_eq!(first.consolidation.merged_packs, pack_count);
    assert_eq!(first.consolidation.written.len(), 1);
    assert_eq!(world.store.keys("index/").len(), pack_count + 1, "nothing deleted in the grace");
    let view = index_reads(&world, || {
        let view = DedupView::load(&world.repo, 1).unwrap();
        assert_eq!(view.chunks.usable_chunk_count(), 48);
        assert!(view.problems.is_empty(), "{:?}", view.problems);
    });
    assert_eq!(view, 1, "one consolidated index, no per-pack index");
    // A new backup adds per-pack indexes; the next start reads those and the consolidated one.
    let fresh = world.volume("fresh", 200, 4);
    let newer = world.backup(&fresh);
    assert_eq!(index_reads(&world, || drop(DedupView::load(&world.repo, 1).unwrap())), 2);
    let again = world.backup(&volumes[0]);
    assert_eq!(again.stats.new_chunk_count, 0, "dedups through it");
    world.consistent();
    // After the grace, a prune deletes the superseded per-pack indexes (and consolidates the
    // newer pack, merging the small consolidated index with it).
    world.store.advance(GRACE_SECS);
    let second = world.prune();
    assert_eq!(second.consolidation.deleted_superseded, pack_count);
    assert_eq!(second.consolidation.rewritten.len(), 1);
    world.store.advance(GRACE_SECS);
    let third = world.prune();
    assert_eq!(third.consolidation.deleted_superseded, 2, "the newer pack's and the old merged");
    assert_eq!(world.store.keys("index/").len(), 1);
    for (manifest, volume) in manifests.iter().zip(&volumes) {
        world.restores(manifest, volume);
    }
    world.restores(&newer, &fresh);
    world.consistent();
    let options = crate::native::verify::VerifyOptions {
        read_data_percent: Some(100.0),
        downloads_in_flight: 2,
        seed: 1,
    };
    let verified = crate::native::verify::run(
        &world.repo,
        &manifests[1],
        &options,
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(verified.problems.is_empty(), "{:?}", verified.problems);
    // Half the packs swept: the consolidated index is rewritten without them.
    world.forget(&manifests[0].backup_id);
    world.forget(&manifests[1].backup_id);
    world.forget(&again.backup_id);
    let _ = world.prune();
    world.store.advance(GRACE_SECS);
    let sweep = world.prune();
    assert_eq!(sweep.swept[0].deleted_packs, 6);
    assert_eq!(check::run(&world.repo).unwrap().dead_consolidated_packs, 6);
    // The next prune sees them gone from its pack listing.
    let rewrite = world.prune();
    assert_eq!(rewrite.consolidation.rewritten.len(), 1, "{:?}", rewrite.consolidation);
    world.store.advance(GRACE_SECS);
    let _ = world.prune();
    let report = check::run(&world.repo).unwrap();
    assert_eq!((report.dead_consolidated_packs, report.consolidated_indexes), (0, 1));
    world.restores(&manifests[2], &volumes[2]);
    // The consolidated index lost: repair rebuilds every pack's own index from its records.
    let merged = world.store.keys("index/merged/");
    world.store.delete(&merged[0]).unwrap();
    let repaired = maintain::repair(&world.repo, &|_| {}).unwrap();
    assert_eq!(repaired.rebuilt_indexes.len(), 7);
    world.restores(&manifests[3], &volumes[3]);
    world.restores(&newer, &fresh);
    world.consistent();
}

// A backup that listed `index/` before a consolidation reads per-pack indexes the
// consolidation supersedes: they stay while its lease is live, however long the grace.
#[test]
fn a_backup_that_listed_before_consolidation_finds_its_indexes() {
    let world = World::new("merge-race", T0);
    let source = world.volume("v", 300, 12);
    let _ = world.backup(&source);
    let other = world.other();
    let store = Arc::clone(&world.store);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&reports);
    world.store.set_hook(Some(once(Op::Get, "index/", move || {
        let mut seen = lock(&seen);
        seen.push(lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap());
        store.advance(GRACE_SECS + 1);
        seen.push(lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap());
    })));
    let second = world.backup(&source);
    world.store.set_hook(None);
    let reports = lock(&reports);
    assert_eq!(reports[0].consolidation.written.len(), 1);
    assert_eq!(reports[1].consolidation.deleted_superseded, 0);
    assert_eq!(reports[1].consolidation.waiting, 1, "the backup's lease predates it");
    assert_eq!(second.stats.new_chunk_count, 0, "every per-pack index it listed was there");
    assert!(lock(&world.warnings).is_empty(), "{:?}", lock(&world.warnings));
    let last = world.prune();
    assert_eq!(last.consolidation.deleted_superseded, 3);
    world.restores(&second, &source);
    world.consistent();
}

// A consolidating prune that crashes after any write converges when run again: one
// consolidated index holds every pack, the superseded per-pack indexes go after the grace.
#[test]
fn a_consolidating_prune_crashing_after_any_step_converges() {
    for crash_at in 1.. {
        let world = World::new("merge-crash", T0);
        let volumes: Vec<PathBuf> =
            (0..3).map(|n| world.volume(&format!("v{n}"), 400 + n, 8)).collect();
        let manifests: Vec<Manifest> = volumes.iter().map(|v| world.backup(v)).collect();
        let _ = world.prune();
        world.store.advance(GRACE_SECS);
        let _ = world.backup(&world.volume("w", 410, 4));
        world.store.set_hook(Some(crash_at_write(crash_at)));
        let crashed_run = lifecycle::prune(&world.other(), &PruneOptions::default(), &|_| {});
        world.store.set_hook(None);
        world.consistent();
        for (manifest, volume) in manifests.iter().zip(&volumes) {
            world.restores(manifest, volume);
        }
        let _ = world.prune();
        world.store.advance(GRACE_SECS);
        let _ = world.prune();
        world.store.advance(GRACE_SECS);
        let _ = world.prune();
        assert_eq!(world.store.keys("index/"), world.store.keys("index/merged/"), "at {crash_at}");
        assert_eq!(world.store.keys("index/merged/").len(), 1, "crash at write {crash_at}");
        assert_eq!(DedupView::load(&world.repo, 1).unwrap().chunks.usable_chunk_count(), 28);
        for (manifest, volume) in manifests.iter().zip(&volumes) {
            world.restores(manifest, volume);
        }
        world.consistent();
        if crashed_run.is_ok() {
            assert!(crash_at > 3, "the prune has several writes");
            break;
        }
    }
}

/// GETs of manifests while `f` runs.
fn manifest_reads(world: &World, f: impl FnOnce()) -> usize {
    gets_under(world, "backups/", f)
}

// `list` reads the catalog prune writes and only the manifests committed since; a forgotten
// backup is not shown, whatever the catalog says.
#[test]
fn list_reads_the_catalog_and_new_manifests_only() {
    let world = World::new("catalog", T0);
    let source = world.volume("v", 500, 2);
    let backups: Vec<Manifest> = (0..3).map(|_| world.backup(&source)).collect();
    let ids = |world: &World| -> Vec<String> {
        world
            .repo
            .list_summaries()
            .unwrap()
            .into_iter()
            .map(|(id, s)| s.map(|_| id).unwrap())
            .collect()
    };
    assert_eq!(manifest_reads(&world, || drop(ids(&world))), 3);
    assert!(world.prune().consolidation.catalog.is_some());
    assert_eq!(manifest_reads(&world, || drop(ids(&world))), 0);
    let newer = world.backup(&source);
    world.forget(&backups[0].backup_id);
    assert_eq!(manifest_reads(&world, || assert_eq!(ids(&world).len(), 3)), 1);
    let listed = world.repo.list_summaries().unwrap();
    let shown = listed.iter().find(|(id, _)| *id == newer.backup_id).unwrap();
    assert_eq!(shown.1.as_ref().unwrap(), &layout::BackupSummary::of(&newer));
    assert!(world.prune().consolidation.catalog.is_some());
    assert!(world.prune().consolidation.catalog.is_none(), "nothing changed");
    assert_eq!(world.store.keys("catalog/").len(), 1);
}

/// Volumes `v` (12 chunks) and `w` (the first 6 chunks of `v`, then 6 of its own), and the
/// packs of a backup of `v` (4 chunks each: P1 = v1-4, P2 = v5-8, P3 = v9-12) once that backup
/// is forgotten and a backup of `w` keeps P1 whole and half of P2.
fn half_dead(world: &World) -> (PathBuf, PathBuf, Manifest, Manifest) {
    let v = world.volume("v", 20, 12);
    let mut data = std::fs::read(&v).unwrap()[..6 * CHUNK].to_vec();
    data.extend(std::fs::read(world.volume("x", 21, 6)).unwrap());
    let w = world.dir.join("w");
    std::fs::write(&w, data).unwrap();
    let a = world.backup(&v);
    assert_eq!(a.packs.len(), 3);
    let b = world.backup(&w);
    assert_eq!(b.stats.dedup_chunk_count, 6);
    world.forget(&a.backup_id);
    world.store.advance(MIN_PACK_AGE_SECS + 1);
    (v, w, a, b)
}

/// The pack of `manifest` holding the chunk at `chunk`.
fn pack_of(world: &World, manifest: &Manifest, chunk: usize) -> PackId {
    world.repo.locate(manifest).unwrap()[&manifest.chunks[chunk].unwrap()].pack
}

// Repacking: a pack half dead has its used records copied into a new pack and is condemned;
// the sweep deletes it, and the backup that lists it restores through the copy.
#[test]
fn repack_copies_used_records_and_the_sweep_deletes_the_sources() {
    repack_and_sweep(&World::new("repack", T0), 64);
}

// In an encrypted repository, sealed records move verbatim (their associated data names the
// chunk, not the pack or offset) and the copies' index is sealed like any other.
#[test]
fn repack_moves_sealed_records_in_an_encrypted_repository() {
    let world = World::with_encryption("repack-sealed", T0, Some(b"correct horse battery"));
    repack_and_sweep(&world, 64 + 28);
    let index = world.store.get(&report_written_any(&world).index_key()).unwrap();
    assert!(
        layout::decode_document::<layout::PackIndex>(
            &layout::Crypt::Plain,
            layout::ObjectKind::Index,
            "index",
            &index
        )
        .is_err(),
        "the copy's index is sealed"
    );
}

fn repack_and_sweep(world: &World, record_overhead: u64) {
    let (_, w, a, b) = half_dead(world);
    let p2 = pack_of(world, &a, 4);
    let p3 = pack_of(world, &a, 8);
    let report = world.prune();
    assert_eq!(report.repack.sources, [p2]);
    assert_eq!(report.repack.written.len(), 1);
    assert_eq!(report.repack.copied_bytes, 2 * (record_overhead + CHUNK as u64), "two raw records");
    let mut condemned = vec![p2, p3];
    condemned.sort_unstable();
    let mark = world.store.keys("gc/mark-");
    let loaded = world.repo.load_marks().unwrap();
    assert_eq!((mark.len(), &loaded.marks[0].mark.packs), (1, &condemned));
    world.restores(&b, &w);
    world.consistent();
    world.store.advance(GRACE_SECS);
    let report = world.prune();
    assert_eq!(report.swept[0].deleted_packs, 2);
    assert!(report.swept[0].recovered_packs.is_empty());
    assert_eq!(world.packs_exist(&[p2, p3]), 0);
    assert_eq!(world.packs_exist(&report.repack.written), 0, "nothing more to repack");
    // `b` still lists P2; its chunks 5 and 6 are found in the copy.
    assert!(b.packs.contains(&p2));
    assert_eq!(pack_of(world, &b, 4), report_written(world, &b));
    world.restores(&b, &w);
    world.consistent();
    let check = check::run(&world.repo).unwrap();
    assert_eq!(check.unreferenced_packs, 0);
    assert_eq!(check.pack_bytes, live_bytes(world), "nothing dead is left");
    let dry = lifecycle::prune(
        &world.other(),
        &PruneOptions { dry_run: true, ..PruneOptions::default() },
        &|_| {},
    )
    .unwrap();
    assert!(dry.repack.sources.is_empty() && dry.marked.is_none());
}

// A backup that loaded the index before a repack's mark deduplicates chunks the repack did
// not copy (they were dead then) into the repacked pack and commits after the mark: the sweep
// recovers the pack, and both backups restore.
#[test]
fn a_backup_that_dedups_into_a_pack_being_repacked_keeps_it() {
    let world = World::new("repack-race", T0);
    let (v, w, a, b) = half_dead(&world);
    let (p2, p3) = (pack_of(&world, &a, 4), pack_of(&world, &a, 8));
    let other = world.other();
    let repacked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&repacked);
    world.store.set_hook(Some(once(Op::Put, "clock/", move || {
        let report = lifecycle::prune(&other, &PruneOptions::default(), &|_| {}).unwrap();
        *lock(&seen) = report.repack.sources;
    })));
    let c = world.backup(&v);
    world.store.set_hook(None);
    assert_eq!(*lock(&repacked), [p2]);
    assert_eq!(c.stats.new_chunk_count, 0, "deduplicated before the mark");
    assert_eq!(c.packs, a.packs);
    world.store.advance(GRACE_SECS);
    let report = world.prune();
    let mut recovered = report.swept[0].recovered_packs.clone();
    recovered.sort_unstable();
    let mut expected = vec![p2, p3];
    expected.sort_unstable();
    assert_eq!(recovered, expected, "P2 and P3 hold chunks of `c` no copy holds");
    assert_eq!(report.swept[0].deleted_packs, 0);
    world.restores(&b, &w);
    world.restores(&c, &v);
    world.consistent();
}

// A repacking prune that crashes after any of its writes leaves a consistent repository, and
// prunes run again converge: the half-dead pack is replaced by one copy, and nothing dead or
// duplicated is left once the marks are swept.
#[test]
fn a_repacking_prune_crashing_after_any_step_converges() {
    for crash_at in 1.. {
        let world = World::new("repack-crash", T0);
        let (_, w, a, b) = half_dead(&world);
        world.store.set_hook(Some(crash_at_write(crash_at)));
        let crashed_run = lifecycle::prune(&world.other(), &PruneOptions::default(), &|_| {});
        world.store.set_hook(None);
        world.consistent();
        world.restores(&b, &w);
        for _ in 0..3 {
            let _ = world.prune();
            world.store.advance(GRACE_SECS);
        }
        let _ = world.prune();
        assert!(world.store.keys("gc/").is_empty(), "crash at write {crash_at}");
        assert_eq!(world.packs_exist(&a.packs), 1, "only P1 is left of the first backup");
        let check = check::run(&world.repo).unwrap();
        assert_eq!(check.pack_bytes, live_bytes(&world), "crash at write {crash_at}");
        world.restores(&b, &w);
        world.consistent();
        if crashed_run.is_ok() {
            assert!(crash_at > 3, "repack writes a pack, its index and a mark");
            break;
        }
    }
}

/// The pack a repack wrote that holds `manifest`'s fifth chunk (the only pack not listed by it).
fn report_written(world: &World, manifest: &Manifest) -> PackId {
    let hash = manifest.chunks[4].unwrap();
    let holders: Vec<PackId> = world
        .store
        .keys("packs/")
        .iter()
        .filter_map(|key| layout::pack_from_key(key))
        .filter(|pack| {
            world
                .repo
                .load_index(pack)
                .is_ok_and(|index| index.entries.iter().any(|e| e.hash == hash))
        })
        .collect();
    assert_eq!(holders.len(), 1);
    assert!(!manifest.packs.contains(&holders[0]));
    holders[0]
}

/// The one pack a repack wrote (the only pack no manifest lists).
fn report_written_any(world: &World) -> PackId {
    let listed: Vec<PackId> = world
        .repo
        .list_backups()
        .unwrap()
        .iter()
        .flat_map(|id| world.repo.load_manifest(id).unwrap().packs)
        .collect();
    let unlisted: Vec<PackId> = world
        .store
        .keys("packs/")
        .iter()
        .filter_map(|key| layout::pack_from_key(key))
        .filter(|pack| !listed.contains(pack))
        .collect();
    assert_eq!(unlisted.len(), 1);
    unlisted[0]
}
