//! A repository's life over years: `forget` applies a retention policy (manifests only), and
//! `prune` reclaims the packs no manifest references, safely while backups from any host keep
//! running, on a store that offers only unique names, whole-object PUTs, listings and deletes.
//!
//! Prune works in two phases, on two runs (rustic's and Kopia's scheme, adapted; FORMAT.md,
//! "Garbage collection", states the rules as invariants G1-G7 and B1-B3):
//! - mark: list the manifests, then the packs and indexes; write the packs that no manifest
//!   references and that are at least the minimum pack age old into a new, uniquely named
//!   mark `gc/mark-<id>`; delete nothing;
//! - sweep, on a later run: a mark at least the grace period old, while no live backup lease
//!   predates it, is swept: the manifests (listed after the grace expired) are checked again,
//!   a pack any of them references is recovered, every other pack loses its index and then
//!   itself, and the mark is deleted last.
//!
//! Between the two, packs that are mostly dead are repacked (`native::repack`): their used
//! records are copied into new packs and the prune's mark condemns the old ones, which a
//! manifest may still list; liveness is then judged chunk by chunk (`layout::liveness`).
//!
//! Every time is the store's (`LastModified` of the prune's own lease, of marks, packs, leases);
//! nothing here reads this host's clock.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use crate::error::{EngineError, ErrorKind};
use crate::native::consolidate::{self, ConsolidateReport};
use crate::native::layout::gc::{self, Mark};
use crate::native::layout::liveness;
use crate::native::layout::{self, ChunkHash, ObjectKind, PackId, Timestamp};
use crate::native::maintain::{self, SeenLease, blocking_lease};
use crate::native::repack::{self, RepackReport};
use crate::native::repo::{LoadedMark, Repository};
use crate::native::retention::{self, Candidate, Decision, Policy};
use crate::store::DatedObject;

/// How `forget` groups backups before applying the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// By source (the manifest's source path; a Lightbits label without its clone suffix).
    Source,
    /// All backups of the repository form one group.
    Nothing,
}

/// What `forget` decided for one group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    /// The group's source (`null` with `--group-by none`).
    pub source: Option<String>,
    /// Backups kept, newest first, each with the rules that keep it.
    pub kept: Vec<Decision>,
    /// Backups removed (or, with `--dry-run`, to be removed), newest first.
    pub removed: Vec<Decision>,
}

/// What `forget` did.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    /// Nothing was removed: the report says what would be.
    pub dry_run: bool,
    /// One entry per group.
    pub groups: Vec<GroupReport>,
    /// Backups kept, over all groups.
    pub kept_count: usize,
    /// Backups removed, over all groups.
    pub removed_count: usize,
    /// Backups whose manifest cannot be read: never removed by a policy (`delete` them).
    pub unreadable: Vec<String>,
}

/// The group of a manifest's source path: a Lightbits label names the clone it read, which
/// differs for every backup of the same volume, so that part is dropped.
pub fn source_group(path: &str) -> &str {
    match path.strip_prefix("lightbits:").and_then(|_| path.find(" (clone ")) {
        Some(end) => &path[..end],
        None => path,
    }
}

/// `ferry forget`: applies `policy` to each group and deletes the manifests it does not keep.
/// Protected backups are always kept; a backup committed while this runs is not considered.
///
/// # Errors
/// `Usage` for an empty policy; store errors.
pub fn forget(
    repo: &Repository,
    policy: &Policy,
    group_by: GroupBy,
    dry_run: bool,
    warn: &dyn Fn(String),
) -> Result<ForgetReport, EngineError> {
    if policy.is_empty() {
        return Err(EngineError::new(
            ErrorKind::Usage,
            "refusing an empty policy, which would remove every backup: give at least one \
             --keep-* option",
        ));
    }
    let protected = repo.protected()?;
    let mut groups: BTreeMap<Option<String>, Vec<Candidate>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (id, manifest) in repo.load_all_manifests()? {
        match manifest {
            Ok(manifest) => {
                let key = match group_by {
                    GroupBy::Source => Some(source_group(&manifest.source.path).to_owned()),
                    GroupBy::Nothing => None,
                };
                groups.entry(key).or_default().push(Candidate {
                    protected: protected.contains(&id),
                    backup_id: id,
                    time: manifest.started_at,
                });
            }
            Err(error) => {
                warn(format!("backup {id} is not readable, left alone: {error}"));
                unreadable.push(id);
            }
        }
    }
    let mut report =
        ForgetReport { dry_run, groups: Vec::new(), kept_count: 0, removed_count: 0, unreadable };
    for (source, group) in groups {
        let (kept, removed): (Vec<Decision>, Vec<Decision>) =
            retention::apply(policy, &group).into_iter().partition(|decision| decision.keep);
        report.kept_count += kept.len();
        report.removed_count += removed.len();
        report.groups.push(GroupReport { source, kept, removed });
    }
    if dry_run {
        return Ok(report);
    }
    // Protected since the decision: still kept.
    let protected_now = repo.protected()?;
    for group in &mut report.groups {
        let (spared, removed): (Vec<Decision>, Vec<Decision>) = std::mem::take(&mut group.removed)
            .into_iter()
            .partition(|decision| protected_now.contains(&decision.backup_id));
        for mut decision in spared {
            decision.keep = true;
            decision.reasons = vec![retention::Rule::Protected];
            report.kept_count += 1;
            report.removed_count -= 1;
            group.kept.push(decision);
        }
        for decision in &removed {
            repo.store.delete(&layout::manifest_key(&decision.backup_id))?;
        }
        group.removed = removed;
    }
    Ok(report)
}

/// A mark swept by this prune.
#[derive(Debug, Clone, Serialize)]
pub struct SweptMark {
    /// The mark's key.
    pub mark: String,
    /// When it was written (store clock).
    pub marked_at: Timestamp,
    /// Packs deleted (index first, then pack).
    pub deleted_packs: usize,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Packs a manifest references again: kept, no longer condemned.
    pub recovered_packs: Vec<PackId>,
}

/// A mark left for a later prune.
#[derive(Debug, Clone, Serialize)]
pub struct WaitingMark {
    /// The mark's key.
    pub mark: String,
    /// When it was written (store clock).
    pub marked_at: Timestamp,
    /// Packs it condemns.
    pub packs: usize,
    /// Why it is not swept yet.
    pub reason: String,
}

/// The mark written by this prune.
#[derive(Debug, Clone, Serialize)]
pub struct NewMark {
    /// Its key (`null` with `--dry-run`: not written).
    pub mark: Option<String>,
    /// Packs it condemns.
    pub packs: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// What `prune` did.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Nothing was deleted or written: the report says what would be.
    pub dry_run: bool,
    /// The store's clock when this prune started.
    pub store_time: Timestamp,
    /// Marks swept.
    pub swept: Vec<SweptMark>,
    /// Marks not swept yet, and why.
    pub waiting: Vec<WaitingMark>,
    /// The mark written (unreferenced packs condemned), if any.
    pub marked: Option<NewMark>,
    /// Packs some manifest references.
    pub live_packs: usize,
    /// Their bytes.
    pub live_bytes: u64,
    /// Unreferenced packs too young to condemn (a running backup may reference them).
    pub young_unreferenced_packs: usize,
    /// Multipart uploads of dead jobs aborted, and dead leases removed.
    pub upkeep: maintain::RepairReport,
    /// Packs repacked: their used records copied, the packs condemned by this prune's mark.
    pub repack: RepackReport,
    /// Per-pack indexes merged into consolidated ones, and superseded indexes deleted.
    pub consolidation: ConsolidateReport,
}

/// How `prune` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneOptions {
    /// Write and delete nothing; report what would be done.
    pub dry_run: bool,
    /// Repack packs at least this many percent dead (100: never).
    pub repack_waste_percent: u8,
}

impl Default for PruneOptions {
    fn default() -> PruneOptions {
        PruneOptions { dry_run: false, repack_waste_percent: repack::WASTE_PERCENT_DEFAULT }
    }
}

/// `ferry prune`: sweeps the marks whose grace has passed, then marks what no manifest
/// references. Safe to run while backups, forgets and other prunes run, from any host.
///
/// # Errors
/// `Integrity` when a manifest cannot be read (what it references is unknown, so nothing is
/// condemned or deleted); store errors.
pub fn prune(
    repo: &Repository,
    options: &PruneOptions,
    warn: &dyn Fn(String),
) -> Result<PruneReport, EngineError> {
    let dry_run = options.dry_run;
    let lease = maintain::take_lease(repo, "prune")?;
    // G5: the one clock: when the store wrote this prune's lease. Everything listed below is
    // listed after this instant.
    let now = lease.written_at();
    let upkeep = if dry_run {
        maintain::RepairReport::default()
    } else {
        maintain::abort_abandoned_uploads(repo, &lease, maintain::UploadSweep::Always)?
    };
    let leases = maintain::other_leases(repo, &lease, now)?;
    // Marks, then manifests, then packs and indexes (the order of G2).
    let marks = repo.load_marks()?;
    for (key, problem) in &marks.unreadable {
        warn(format!("mark {key} is not readable, its packs are kept: {problem}"));
    }
    let mut manifests = Vec::new();
    let mut summaries = Vec::new();
    for (id, manifest) in repo.load_all_manifests()? {
        let manifest = manifest.map_err(|error| {
            EngineError::new(
                ErrorKind::Integrity,
                format!(
                    "backup {id} is not readable, so what it references is unknown; nothing \
                     was condemned or deleted (delete or restore that manifest first): {error}"
                ),
            )
        })?;
        summaries.push(layout::BackupSummary::of(&manifest));
        manifests.push((id, manifest));
    }
    let packs = repo.list_packs()?;
    let indexes: HashMap<PackId, u64> = repo
        .store
        .list_dated(layout::INDEX_PREFIX)?
        .into_iter()
        .filter_map(|object| {
            Some((layout::index_pack_from_key(&object.key)?, object.modified_unix))
        })
        .collect();
    // G2 with repacking: which packs the manifests need, chunk by chunk where a manifest lists
    // a condemned or gone pack (`layout::liveness`).
    let present_indexes = repo.load_present_indexes(&packs)?;
    let needed = liveness::needed(
        manifests.iter().map(|(id, manifest)| (id.as_str(), manifest)),
        &present_indexes,
        &marks.packs,
    );
    let live = needed.packs;
    let mut report = PruneReport {
        dry_run,
        store_time: Timestamp(now),
        swept: Vec::new(),
        waiting: Vec::new(),
        marked: None,
        live_packs: 0,
        live_bytes: 0,
        young_unreferenced_packs: 0,
        upkeep,
        repack: RepackReport::default(),
        consolidation: ConsolidateReport::default(),
    };
    for (pack, object) in &packs {
        if live.contains(pack) {
            report.live_packs += 1;
            report.live_bytes += object.size_bytes;
        }
    }

    // Phase 2, then phase 1 (a pack swept now is not condemned again).
    let view = View { repo, now, dry_run, live: &live, packs: &packs, leases: &leases };
    let (gone, still_marked) = sweep(&view, &marks.marks, &mut report)?;
    // Repack before marking: the copies exist before the mark condemns their sources.
    let referenced: HashSet<ChunkHash> = manifests
        .iter()
        .flat_map(|(_, manifest)| manifest.chunks.iter().flatten().copied())
        .collect();
    let excluded: HashSet<PackId> = marks.packs.union(&gone).copied().collect();
    let pool = repack::Pool {
        packs: &packs,
        indexes: &present_indexes,
        needed: &live,
        excluded: &excluded,
        referenced: &referenced,
    };
    let candidates = repack::select(repo, now, &pool, options.repack_waste_percent);
    report.repack =
        repack::run(repo, &candidates, &referenced, options.repack_waste_percent, dry_run, warn)?;
    drop(candidates);
    drop(present_indexes);
    let repacked = report.repack.sources.clone();
    condemn(&view, &indexes, &gone, &still_marked, &repacked, &mut report)?;
    report.consolidation =
        consolidate::run(repo, now, dry_run, &packs, &marks.packs, &leases, warn)?;
    report.consolidation.catalog = consolidate::refresh_catalog(repo, summaries, dry_run)?;
    drop(lease);
    Ok(report)
}

/// What both phases of one prune look at.
struct View<'a> {
    repo: &'a Repository,
    now: u64,
    dry_run: bool,
    live: &'a HashSet<PackId>,
    packs: &'a HashMap<PackId, DatedObject>,
    leases: &'a [SeenLease],
}

/// Phase 2: sweeps the marks whose grace has passed and that no job's lease holds back;
/// returns the packs deleted and the packs still condemned by marks left waiting.
fn sweep(
    view: &View<'_>,
    marks: &[LoadedMark],
    report: &mut PruneReport,
) -> Result<(HashSet<PackId>, HashSet<PackId>), EngineError> {
    let View { repo, now, dry_run, live, packs, leases } = *view;
    let mut gone: HashSet<PackId> = HashSet::new();
    let mut still_marked: HashSet<PackId> = HashSet::new();
    let mut sorted: Vec<&LoadedMark> = marks.iter().collect();
    sorted.sort_by(|a, b| (a.written_at, &a.key).cmp(&(b.written_at, &b.key)));
    for mark in sorted {
        let waiting = |reason: String| WaitingMark {
            mark: mark.key.clone(),
            marked_at: Timestamp(mark.written_at),
            packs: mark.mark.packs.len(),
            reason,
        };
        if !repo.config.gc().mark_expired(mark.written_at, now) {
            let until = Timestamp(mark.written_at + repo.config.gc().grace_secs);
            report.waiting.push(waiting(format!("in its grace period until {until}")));
            still_marked.extend(mark.mark.packs.iter().copied());
            continue;
        }
        if let Some(blocker) = blocking_lease(repo, leases, mark.written_at) {
            report.waiting.push(waiting(format!(
                "job lease {} ({}) predates the mark and may still be running",
                blocker.key,
                blocker.info.as_ref().map_or("unreadable".into(), |info| format!(
                    "{} on {}, pid {}",
                    info.job, info.hostname, info.pid
                )),
            )));
            still_marked.extend(mark.mark.packs.iter().copied());
            continue;
        }
        let mut swept = SweptMark {
            mark: mark.key.clone(),
            marked_at: Timestamp(mark.written_at),
            deleted_packs: 0,
            deleted_bytes: 0,
            recovered_packs: Vec::new(),
        };
        for pack in &mark.mark.packs {
            if live.contains(pack) {
                swept.recovered_packs.push(*pack);
                continue;
            }
            if !dry_run {
                sweep_pack(repo, mark, *pack, now, live, leases)?;
            }
            if let Some(object) = packs.get(pack) {
                swept.deleted_packs += 1;
                swept.deleted_bytes += object.size_bytes;
            }
            let _ = gone.insert(*pack);
        }
        if !dry_run {
            // G4: the mark goes last, so an interrupted sweep is finished by the next prune.
            repo.store.delete(&mark.key)?;
        }
        report.swept.push(swept);
    }
    Ok((gone, still_marked))
}

/// Phase 1: condemns what no manifest references, is old enough and is not condemned yet.
fn condemn(
    view: &View<'_>,
    indexes: &HashMap<PackId, u64>,
    gone: &HashSet<PackId>,
    still_marked: &HashSet<PackId>,
    repacked: &[PackId],
    report: &mut PruneReport,
) -> Result<(), EngineError> {
    let View { repo, now, dry_run, live, packs, .. } = *view;
    // Repacked packs are needed until their copies are (a sweep judges that again).
    let mut condemned: Vec<PackId> = repacked.to_vec();
    let mut bytes = report.repack.source_bytes;
    let candidates = packs
        .iter()
        .map(|(pack, object)| (*pack, object.modified_unix, object.size_bytes))
        // An index whose pack is gone (a sweep interrupted between the two deletes).
        .chain(
            indexes
                .iter()
                .filter(|(pack, _)| !packs.contains_key(pack))
                .map(|(pack, written)| (*pack, *written, 0)),
        );
    for (pack, written, size) in candidates {
        if live.contains(&pack) || gone.contains(&pack) || still_marked.contains(&pack) {
            continue;
        }
        if now.saturating_sub(written) < repo.config.gc().min_pack_age_secs {
            report.young_unreferenced_packs += 1;
            continue;
        }
        condemned.push(pack);
        bytes += size;
    }
    condemned.sort_unstable();
    if !condemned.is_empty() {
        let count = condemned.len();
        let key = (!dry_run).then(|| gc::mark_key(PackId::random()));
        if let Some(key) = &key {
            let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let mark = Mark {
                packs: condemned,
                pack_bytes: bytes,
                written_by: format!("prune@{}", hostname.trim()),
            };
            let encoded = layout::encode_document(&repo.crypt, ObjectKind::Mark, &mark);
            repo.store.put(key, Bytes::from(encoded))?;
        }
        report.marked = Some(NewMark { mark: key, packs: count, bytes });
    }
    Ok(())
}

/// Deletes one condemned pack: its index first, then the pack (G4), after checking the rules
/// that allow it (G1-G3).
fn sweep_pack(
    repo: &Repository,
    mark: &LoadedMark,
    pack: PackId,
    now: u64,
    live: &HashSet<PackId>,
    leases: &[SeenLease],
) -> Result<(), EngineError> {
    assert!(repo.config.gc().mark_expired(mark.written_at, now), "G1: {pack} swept in its grace");
    assert!(!live.contains(&pack), "G2: {pack} is referenced by a manifest");
    assert!(
        blocking_lease(repo, leases, mark.written_at).is_none(),
        "G3: a lease predates the mark"
    );
    assert!(mark.mark.packs.binary_search(&pack).is_ok(), "only condemned packs are swept");
    repo.store.delete(&pack.index_key())?;
    repo.store.delete(&pack.pack_key())?;
    Ok(())
}
