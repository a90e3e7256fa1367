//! Repository upkeep: leases that say which jobs are running, and repair of what a killed job
//! leaves behind (multipart uploads never completed or aborted, packs whose index is lost).
//!
//! A job that writes packs (and every prune) holds a `Lease`: the object `locks/<id>` names its
//! host (hostname and boot id), process id and process start time. Its `LastModified`, by the
//! store's clock, is when the job started. It is deleted when the job ends; after a kill -9 it
//! stays, and later jobs recognise it as dead: same host and that process is gone (or is
//! another process with the same pid), or another host and older than
//! the repository's foreign-lease age (`gc::GcTiming`) by the store's clock. A multipart upload under `packs/` is
//! abandoned when no other live lease exists, or when it was initiated before every live lease
//! was written; `abort_abandoned_uploads` aborts those at the start of each prune and repair, and
//! of each backup that finds a dead lease (`UploadSweep`).
//!
//! `repair` never deletes a pack: a pack without an index is either being written (its index
//! follows), condemned by a mark (prune deletes it), or lost its index; the index of a pack
//! that a manifest references, or that is older than the minimum pack age, is rebuilt from
//! the pack's self-describing records.

use std::collections::HashSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::native::layout::gc::{self, CLOCK_PREFIX};
use crate::native::layout::{self, ObjectKind, PACKS_PREFIX, PackId, PackIndex};
use crate::native::repo::Repository;
use crate::store::{ObjectStore, StoreError};

/// Where leases live.
pub const LOCKS_PREFIX: &str = "locks/";
/// Bytes read per ranged GET when rebuilding an index from a pack's records.
const SCAN_WINDOW_BYTES: u64 = 16 << 20;

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// What the job is, e.g. `backup`.
    pub job: String,
    /// The host's name, for people.
    pub hostname: String,
    /// The host's boot id (`/proc/sys/kernel/random/boot_id`): a reboot ends every lease.
    pub boot_id: String,
    /// Process id of the job.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub process_start: u64,
    /// Unix seconds when the lease was taken.
    pub started_unix: u64,
}

/// This process, as a lease names it.
fn this_process(job: &str) -> LeaseInfo {
    let pid = std::process::id();
    LeaseInfo {
        job: job.to_owned(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_default(),
        boot_id: boot_id(),
        pid,
        process_start: process_start(pid).unwrap_or(0),
        started_unix: layout::Timestamp::now().0,
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat` (after the parenthesised command, which may hold spaces).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_command = &stat[stat.rfind(')')? + 1..];
    after_command.split_whitespace().nth(19)?.parse().ok()
}

impl LeaseInfo {
    /// Whether the job that took this lease may still be running, `age_secs` after the lease
    /// was written (by the store's clock), in a repository whose rules are `gc_timing`.
    pub fn is_live(&self, age_secs: u64, gc_timing: &gc::GcTiming) -> bool {
        if !self.boot_id.is_empty() && self.boot_id == boot_id() {
            return process_start(self.pid) == Some(self.process_start);
        }
        age_secs < gc_timing.lease_foreign_max_age_secs
    }
}

/// A held lease; deleted on drop (best effort: a lease left behind is recognised as dead).
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn ObjectStore,
    key: String,
    written_at: u64,
}

impl Lease<'_> {
    /// The lease's object key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// When the store says the lease was written: the job's start by the store's clock.
    pub fn written_at(&self) -> u64 {
        self.written_at
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let _ = self.store.delete(&self.key);
    }
}

/// Takes a lease for `job` in `repo`.
///
/// # Errors
/// Store errors, or a store that keeps no modification times.
pub fn take_lease<'a>(repo: &'a Repository, job: &str) -> Result<Lease<'a>, EngineError> {
    let info = this_process(job);
    let key = format!("{LOCKS_PREFIX}{}-{}-{}", info.started_unix, info.pid, random_suffix());
    let body = serde_json::to_vec(&info).expect("a lease serialises");
    repo.store.put(&key, Bytes::from(body))?;
    let mut lease = Lease { store: repo.store.as_ref(), key, written_at: 0 };
    lease.written_at = repo.written_at(&lease.key)?;
    Ok(lease)
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Another job's lease, as seen at `now` by the store's clock.
#[derive(Debug, Clone)]
pub struct SeenLease {
    /// Its key.
    pub key: String,
    /// Who holds it (`None`: unreadable, left alone and counted as live).
    pub info: Option<LeaseInfo>,
    /// When it was written, by the store's clock.
    pub written_at: u64,
    /// Whether its job may still be running.
    pub live: bool,
}

/// The other leases in the repository, judged at `now` (the store's clock).
///
/// # Errors
/// Store errors.
pub fn other_leases(
    repo: &Repository,
    own: &Lease<'_>,
    now: u64,
) -> Result<Vec<SeenLease>, EngineError> {
    let mut seen = Vec::new();
    for object in repo.store.list_dated(LOCKS_PREFIX)? {
        if object.key == own.key {
            continue;
        }
        let info = match repo.store.get(&object.key) {
            Ok(bytes) => serde_json::from_slice::<LeaseInfo>(&bytes).ok(),
            // Deleted between list and get: its job just ended.
            Err(StoreError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        };
        let age = now.saturating_sub(object.modified_unix);
        // An unreadable lease is not ours to interpret: it counts as live.
        let live = info.as_ref().is_none_or(|info| info.is_live(age, &repo.config.gc()));
        seen.push(SeenLease { key: object.key, info, written_at: object.modified_unix, live });
    }
    Ok(seen)
}

/// A live lease of a job other than a prune that may have listed `index/` or the marks before
/// an object written at `time` was visible (FORMAT.md, G3 and C3).
pub fn blocking_lease<'a>(
    repo: &Repository,
    leases: &'a [SeenLease],
    time: u64,
) -> Option<&'a SeenLease> {
    leases.iter().find(|lease| {
        let prune = lease.info.as_ref().is_some_and(|info| info.job == "prune");
        lease.live && !prune && repo.config.gc().lease_predates_mark(lease.written_at, time)
    })
}

/// What an upkeep pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Multipart uploads aborted (keys).
    pub aborted_uploads: Vec<String>,
    /// Multipart uploads left alone because a live job may own them.
    pub kept_uploads: usize,
    /// Leases of dead jobs removed.
    pub removed_leases: usize,
    /// Live jobs seen (other than this one).
    pub live_jobs: usize,
    /// Indexes rebuilt from their pack's records (pack keys).
    pub rebuilt_indexes: Vec<String>,
    /// Packs without an index left alone: younger than the minimum age and referenced by no
    /// manifest (a running backup writes their index next), or condemned by a mark.
    pub unindexed_packs_left: Vec<String>,
    /// Packs whose records are damaged: (pack key, what was found). Their index covers the
    /// records before the damage.
    pub damaged_packs: Vec<(String, String)>,
    /// Manifests that reference a pack which is missing: (backup id, pack key). Nothing can
    /// rebuild those; `ferry check` reports them too.
    pub missing_referenced_packs: Vec<(String, String)>,
}

/// When upkeep lists the multipart uploads under `packs/` (a listing that costs O(objects
/// under `packs/`) on some stores: 2.6 s at 100,000 packs on Garage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadSweep {
    /// Every time (prune, repair).
    Always,
    /// Only when a dead lease is found (backups): a killed job leaves its lease, and upkeep
    /// deletes a dead lease only after aborting the uploads; an upload left by another failure
    /// (an abort that failed as the job ended) waits for the next prune.
    IfADeadLease,
}

/// Aborts multipart uploads no live job can own and removes dead leases, judged by the store's
/// clock at `own`'s writing.
///
/// # Errors
/// Store errors.
pub fn abort_abandoned_uploads(
    repo: &Repository,
    own: &Lease<'_>,
    sweep: UploadSweep,
) -> Result<RepairReport, EngineError> {
    let leases = other_leases(repo, own, own.written_at())?;
    let oldest_live = leases.iter().filter(|lease| lease.live).map(|lease| lease.written_at).min();
    let mut report = RepairReport {
        live_jobs: leases.iter().filter(|lease| lease.live).count(),
        ..Default::default()
    };
    let dead = leases.iter().any(|lease| !lease.live);
    let uploads = if sweep == UploadSweep::Always || dead {
        repo.store.multipart_list(PACKS_PREFIX)?
    } else {
        Vec::new()
    };
    for upload in uploads {
        let abandoned = match (oldest_live, upload.initiated_unix) {
            (None, _) => true,
            (Some(oldest), Some(initiated)) => initiated + repo.config.gc().margin_secs < oldest,
            (Some(_), None) => false,
        };
        if abandoned {
            repo.store.multipart_abort(&upload.key, &upload.upload_id)?;
            report.aborted_uploads.push(upload.key);
        } else {
            report.kept_uploads += 1;
        }
    }
    for lease in leases.iter().filter(|lease| !lease.live) {
        repo.store.delete(&lease.key)?;
        report.removed_leases += 1;
    }
    Ok(report)
}

/// `ferry repair`: abandoned uploads and dead leases as above; then every pack without an
/// index that a manifest references, or that is older than the minimum pack age and not
/// condemned, gets its index rebuilt from its records. Nothing is deleted but abandoned
/// uploads, dead leases and stale clock probes.
///
/// # Errors
/// Store errors.
pub fn repair(repo: &Repository, warn: &dyn Fn(String)) -> Result<RepairReport, EngineError> {
    let lease = take_lease(repo, "repair")?;
    let now = lease.written_at();
    let mut report = abort_abandoned_uploads(repo, &lease, UploadSweep::Always)?;
    // Marks first: a pack condemned later cannot be swept before this pass ends (grace).
    let marks = repo.load_marks()?;
    let mut referenced: HashSet<PackId> = HashSet::new();
    for (id, manifest) in repo.load_all_manifests()? {
        match manifest {
            Ok(manifest) => referenced.extend(manifest.packs.iter().copied()),
            Err(error) => warn(format!("backup {id} is not readable: {error}")),
        }
    }
    let packs = repo.list_packs()?;
    // Indexed: by its own index object, or by a readable consolidated index (whose copy of
    // the pack's index is the same bytes' worth: a pack never changes).
    let listing = repo.list_indexes()?;
    let mut indexed: HashSet<PackId> = listing.per_pack.keys().copied().collect();
    for (id, object) in &listing.merged {
        match repo.load_merged(*id) {
            Ok(Some(merged)) => indexed.extend(merged.packs.iter().map(|index| index.pack)),
            Ok(None) => {}
            Err(error) => warn(format!("{}: {error} (its packs' indexes are rebuilt)", object.key)),
        }
    }
    let mut unindexed: Vec<_> = packs.iter().filter(|(pack, _)| !indexed.contains(pack)).collect();
    unindexed.sort_by_key(|(pack, _)| **pack);
    for (pack, object) in unindexed {
        let old = now.saturating_sub(object.modified_unix) >= repo.config.gc().min_pack_age_secs;
        if marks.packs.contains(pack) || !(referenced.contains(pack) || old) {
            report.unindexed_packs_left.push(object.key.clone());
            continue;
        }
        let (index, damage) = rebuild_index(repo, *pack, object.size_bytes)?;
        if let Some(damage) = damage {
            report.damaged_packs.push((object.key.clone(), damage));
        }
        let encoded = layout::encode_document(&repo.crypt, ObjectKind::Index, &index);
        repo.store.put(&pack.index_key(), Bytes::from(encoded))?;
        report.rebuilt_indexes.push(object.key.clone());
    }
    for (id, manifest) in repo.load_all_manifests()? {
        let Ok(manifest) = manifest else { continue };
        for pack in &manifest.packs {
            if !packs.contains_key(pack) {
                report.missing_referenced_packs.push((id.clone(), pack.pack_key()));
            }
        }
    }
    for object in repo.store.list_dated(CLOCK_PREFIX)? {
        if now.saturating_sub(object.modified_unix) >= repo.config.gc().min_pack_age_secs {
            repo.store.delete(&object.key)?;
        }
    }
    Ok(report)
}

/// Rebuilds a pack's index by reading its records front to back (ranged GETs of at most
/// `SCAN_WINDOW_BYTES`, or one record when a record is larger). Returns the index of every
/// record that verifies, and what stopped the scan early, if anything.
///
/// # Errors
/// Store errors.
pub fn rebuild_index(
    repo: &Repository,
    pack: PackId,
    size_bytes: u64,
) -> Result<(PackIndex, Option<String>), EngineError> {
    let key = pack.pack_key();
    let mut entries = Vec::new();
    let mut offset = 0u64;
    let mut window = SCAN_WINDOW_BYTES;
    let mut damage = None;
    // zstd never grows a chunk past this (an incompressible chunk is stored raw).
    let record_max = 2 * (u64::from(crate::limits::CHUNK_SIZE_BYTES_MAX) + 64);
    while offset < size_bytes {
        let remaining = size_bytes - offset;
        let length = window.min(remaining);
        let bytes = repo.store.get_range(&key, offset, length)?;
        match layout::scan_records(&key, &bytes, offset) {
            Err(error) => {
                damage = Some(error.to_string());
                break;
            }
            Ok((found, used)) if used > 0 => {
                entries.extend(found);
                offset += used as u64;
                window = SCAN_WINDOW_BYTES;
            }
            // A record longer than the window: read more at once.
            Ok(_) if length < remaining && window < record_max => window *= 2,
            Ok(_) => {
                damage = Some(format!(
                    "the {remaining} bytes at offset {offset} are not a complete record"
                ));
                break;
            }
        }
    }
    // An index describes the whole object: restore and verify compare sizes.
    Ok((PackIndex { pack, pack_size_bytes: size_bytes, entries }, damage))
}

#[cfg(test)]
mod tests {
    use super::*;

    // This process's lease is live; one naming a dead pid, or a reused pid, is not; another
    // host's lease lives for a day by the store's clock.
    #[test]
    fn liveness_follows_the_process() {
        let me = this_process("test");
        let timing = gc::GcTiming::DEFAULT;
        assert!(me.process_start > 0, "reads /proc/self/stat");
        assert!(me.is_live(u64::MAX, &timing));
        let reused = LeaseInfo { process_start: me.process_start + 1, ..me.clone() };
        assert!(!reused.is_live(0, &timing));
        let gone = LeaseInfo { pid: u32::MAX - 1, ..me.clone() };
        assert!(!gone.is_live(0, &timing));
        let foreign = LeaseInfo { boot_id: "other-host".into(), ..me.clone() };
        assert!(foreign.is_live(timing.lease_foreign_max_age_secs - 1, &timing));
        assert!(!foreign.is_live(timing.lease_foreign_max_age_secs, &timing));
    }

    // A backup's upkeep lists (and aborts) uploads only when it finds a dead lease; prune's
    // and repair's every time.
    #[test]
    fn a_backup_sweeps_uploads_only_after_a_kill() {
        use std::sync::Arc;

        use crate::native::memstore::MemStore;
        let store = MemStore::new(1_795_694_400);
        let repo = Repository::init_with(
            Box::new(Arc::clone(&store)),
            1 << 20,
            gc::GcTiming::DEFAULT,
            None,
        )
        .unwrap();
        let pending = |store: &Arc<MemStore>| store.multipart_list(PACKS_PREFIX).unwrap().len();
        let key = PackId([7; 16]).pack_key();
        let _ = store.multipart_begin(&key).unwrap();
        let own = take_lease(&repo, "backup").unwrap();
        let report = abort_abandoned_uploads(&repo, &own, UploadSweep::IfADeadLease).unwrap();
        assert!(report.aborted_uploads.is_empty());
        assert_eq!(pending(&store), 1, "no job was killed: left for prune");
        let killed = LeaseInfo { pid: u32::MAX - 1, ..this_process("backup") };
        let body = Bytes::from(serde_json::to_vec(&killed).unwrap());
        store.put(&format!("{LOCKS_PREFIX}killed"), body).unwrap();
        let report = abort_abandoned_uploads(&repo, &own, UploadSweep::IfADeadLease).unwrap();
        assert_eq!((report.aborted_uploads.len(), report.removed_leases), (1, 1));
        assert_eq!(pending(&store), 0);
        let _ = store.multipart_begin(&key).unwrap();
        let report = abort_abandoned_uploads(&repo, &own, UploadSweep::Always).unwrap();
        assert_eq!(report.aborted_uploads.len(), 1);
        assert_eq!(pending(&store), 0);
    }
}
