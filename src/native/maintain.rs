//! Repository upkeep: leases that say which jobs are running, and repair of what a killed job
//! leaves behind (multipart uploads never completed or aborted, packs without an index).
//!
//! A job that writes packs holds a `Lease`: the object `locks/<id>` names its host (hostname and
//! boot id), process id and process start time, and when it started. It is deleted when the job
//! ends; after a kill -9 it stays, and the next job recognises it as dead: same host and that
//! process is gone (or is another process with the same pid), or another host and older than
//! `LEASE_FOREIGN_MAX_AGE`. A multipart upload under `packs/` is abandoned when no other live
//! lease exists, or when it started before every live lease did; `abort_abandoned_uploads` aborts
//! those at the start of each backup, and `repair` does the same on demand and also deletes
//! packs that no index describes (only when no other job is running: a pack is uploaded before
//! its index).

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, ErrorKind};
use crate::native::layout::{self, INDEX_PREFIX, PACKS_PREFIX, PackId};
use crate::native::repo::Repository;
use crate::store::{ObjectStore, StoreError};

/// Where leases live.
pub const LOCKS_PREFIX: &str = "locks/";
/// A lease from another host counts as live for this long (no heartbeat crosses hosts).
pub const LEASE_FOREIGN_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Clock skew allowed between the store's upload timestamps and a lease's start time.
const CLOCK_SKEW: Duration = Duration::from_secs(120);

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
    /// Whether the job that took this lease may still be running.
    pub fn is_live(&self) -> bool {
        if !self.boot_id.is_empty() && self.boot_id == boot_id() {
            return process_start(self.pid) == Some(self.process_start);
        }
        let age = layout::Timestamp::now().0.saturating_sub(self.started_unix);
        age < LEASE_FOREIGN_MAX_AGE.as_secs()
    }
}

/// A held lease; deleted on drop (best effort: a lease left behind is recognised as dead).
#[derive(Debug)]
pub struct Lease<'a> {
    store: &'a dyn ObjectStore,
    key: String,
}

impl Lease<'_> {
    /// The lease's object key.
    pub fn key(&self) -> &str {
        &self.key
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
/// Store errors.
pub fn take_lease<'a>(repo: &'a Repository, job: &str) -> Result<Lease<'a>, EngineError> {
    let info = this_process(job);
    let key = format!("{LOCKS_PREFIX}{}-{}-{}", info.started_unix, info.pid, random_suffix());
    let body = serde_json::to_vec(&info).expect("a lease serialises");
    repo.store.put(&key, Bytes::from(body))?;
    Ok(Lease { store: repo.store.as_ref(), key })
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The other leases in the repository, split into live and dead (key, info).
fn other_leases(
    repo: &Repository,
    own: &Lease<'_>,
) -> Result<(Vec<LeaseInfo>, Vec<String>), EngineError> {
    let mut live = Vec::new();
    let mut dead = Vec::new();
    for object in repo.store.list(LOCKS_PREFIX)? {
        if object.key == own.key {
            continue;
        }
        let info = match repo.store.get(&object.key) {
            Ok(bytes) => serde_json::from_slice::<LeaseInfo>(&bytes).ok(),
            // Deleted between list and get: its job just ended.
            Err(StoreError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        };
        match info {
            Some(info) if info.is_live() => live.push(info),
            // Dead, or unreadable (not ours to interpret): an unreadable lease is left alone.
            Some(_) => dead.push(object.key),
            None => {}
        }
    }
    Ok((live, dead))
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
    /// Packs without an index deleted (keys).
    pub deleted_orphan_packs: Vec<String>,
    /// Bytes those packs held.
    pub orphan_bytes: u64,
    /// Whether orphan packs were looked for (only when no other job runs).
    pub orphans_checked: bool,
}

/// Aborts multipart uploads no live job can own and removes dead leases.
///
/// # Errors
/// Store errors.
pub fn abort_abandoned_uploads(
    repo: &Repository,
    own: &Lease<'_>,
) -> Result<RepairReport, EngineError> {
    let (live, dead) = other_leases(repo, own)?;
    let oldest_live = live.iter().map(|lease| lease.started_unix).min();
    let mut report =
        RepairReport { live_jobs: live.len(), removed_leases: dead.len(), ..Default::default() };
    for upload in repo.store.multipart_list(PACKS_PREFIX)? {
        let abandoned = match (oldest_live, upload.initiated_unix) {
            (None, _) => true,
            (Some(oldest), Some(initiated)) => initiated + CLOCK_SKEW.as_secs() < oldest,
            (Some(_), None) => false,
        };
        if abandoned {
            repo.store.multipart_abort(&upload.key, &upload.upload_id)?;
            report.aborted_uploads.push(upload.key);
        } else {
            report.kept_uploads += 1;
        }
    }
    for key in dead {
        repo.store.delete(&key)?;
    }
    Ok(report)
}

/// `ferry repair`: abandoned uploads and dead leases as above; then, when no other job runs,
/// packs that no index describes (a pack whose index never got written is unreachable: backups
/// reference chunks through indexes).
///
/// # Errors
/// Store errors.
pub fn repair(repo: &Repository) -> Result<RepairReport, EngineError> {
    let lease = take_lease(repo, "repair")?;
    let mut report = abort_abandoned_uploads(repo, &lease)?;
    if report.live_jobs > 0 {
        return Ok(report);
    }
    report.orphans_checked = true;
    // Packs first, indexes second: an index is written right after its pack, so a pack that
    // completes while we list is seen with its index.
    let packs = repo.store.list(PACKS_PREFIX)?;
    let indexed: std::collections::HashSet<PackId> = repo
        .store
        .list(INDEX_PREFIX)?
        .iter()
        .filter_map(|object| object.key.strip_prefix(INDEX_PREFIX))
        .filter_map(PackId::from_hex)
        .collect();
    for object in packs {
        let pack = object
            .key
            .strip_prefix(PACKS_PREFIX)
            .and_then(|rest| rest.rsplit('/').next())
            .and_then(PackId::from_hex)
            .filter(|pack| pack.pack_key() == object.key);
        match pack {
            Some(pack) if !indexed.contains(&pack) => {
                repo.store.delete(&object.key)?;
                report.orphan_bytes += object.size_bytes;
                report.deleted_orphan_packs.push(object.key);
            }
            Some(_) => {}
            None => {
                return Err(EngineError::new(
                    ErrorKind::Integrity,
                    format!("unexpected object {} under {PACKS_PREFIX}", object.key),
                ));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    // This process's lease is live; one naming a dead pid, or a reused pid, is not.
    #[test]
    fn liveness_follows_the_process() {
        let me = this_process("test");
        assert!(me.process_start > 0, "reads /proc/self/stat");
        assert!(me.is_live());
        let reused = LeaseInfo { process_start: me.process_start + 1, ..me.clone() };
        assert!(!reused.is_live());
        let gone = LeaseInfo { pid: u32::MAX - 1, ..me.clone() };
        assert!(!gone.is_live());
        let foreign_recent = LeaseInfo { boot_id: "other-host".into(), ..me.clone() };
        assert!(foreign_recent.is_live());
        let foreign_old = LeaseInfo { started_unix: 0, ..foreign_recent };
        assert!(!foreign_old.is_live());
    }
}
