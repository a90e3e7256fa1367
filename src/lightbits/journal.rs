//! The crash-safe local journal of cluster and host resources ferry creates or changes, and
//! [`reclaim`], which undoes whatever a killed run left behind.
//!
//! Rule: a record naming a resource is durable (temp file, fsync, rename, fsync of the directory)
//! *before* the resource is created, updated with its UUID once it exists, and removed only after
//! the resource is gone or restored. A record therefore over-approximates what exists; reclaim
//! tolerates "already gone". Records of a process that is still running are left alone.
//!
//! This module does not decide the order of a job's steps; `flow` does.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::attach::{self, Attachment};
use super::client::{Client, Deletion};
use super::model::{Acl, UpdateAcl};
use super::{LightbitsError, Result};

/// The process that wrote a record: pid, its start time in clock ticks since boot, and the boot
/// id, so that a recycled pid or a reboot is not mistaken for the writer still running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

impl Owner {
    /// The current process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner { pid, start_ticks: process_start_ticks(pid).unwrap_or(0), boot_id: boot_id() }
    }

    /// True when the writing process is still running (same boot, same pid, same start time).
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id() && process_start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// Whether the resource exists yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// About to be created or changed: it may or may not exist.
    Intended,
    /// Created or changed.
    Done,
}

/// A resource ferry creates or changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A temporary snapshot (`ferry-snap-<job>`).
    Snapshot {
        /// Its name.
        name: String,
        /// Its UUID once known.
        uuid: Option<String>,
    },
    /// A temporary clone volume (`ferry-clone-<job>`).
    Clone {
        /// Its name.
        name: String,
        /// Its UUID once known.
        uuid: Option<String>,
    },
    /// This host's NQN added to an existing volume's ACL; undo restores the recorded ACLs.
    Acl {
        /// The volume.
        volume_uuid: String,
        /// Its name (for reports).
        volume_name: String,
        /// The NQN added.
        host_nqn: String,
        /// The ACL before ferry changed it.
        original_acl: Acl,
        /// The IP ACL before ferry changed it.
        original_ip_acl: Option<Acl>,
    },
    /// A backup's snapshot kept as the next backup's diff base (`--lightbits-keep-base`):
    /// written once the backup has committed, so it is never reclaimed; the next backup of the
    /// volume deletes it once that one has committed.
    Base {
        /// The snapshot's name (`ferry-snap-<backup id>`).
        name: String,
        /// The snapshot's UUID.
        uuid: String,
        /// The volume it is a snapshot of.
        volume_uuid: String,
        /// The backup that read it (the next incremental's parent).
        backup_id: String,
    },
    /// The host-side attach of a volume.
    Attachment {
        /// The volume.
        volume_uuid: String,
        /// What was (or is about to be) done.
        attachment: Attachment,
    },
}

impl Resource {
    /// Short kind name, also the record id suffix.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Snapshot { .. } => "snapshot",
            Resource::Clone { .. } => "clone",
            Resource::Acl { .. } => "acl",
            Resource::Base { .. } => "base",
            Resource::Attachment { .. } => "attachment",
        }
    }

    /// The name an operator recognises.
    pub fn label(&self) -> String {
        match self {
            Resource::Snapshot { name, .. }
            | Resource::Clone { name, .. }
            | Resource::Base { name, .. } => name.clone(),
            Resource::Acl { volume_name, host_nqn, .. } => format!("{volume_name} acl {host_nqn}"),
            Resource::Attachment { volume_uuid, .. } => volume_uuid.clone(),
        }
    }

    /// Undo order: detach first, then ACLs, then clones, then snapshots.
    pub(crate) fn undo_rank(&self) -> u8 {
        match self {
            Resource::Attachment { .. } => 0,
            Resource::Acl { .. } => 1,
            Resource::Clone { .. } => 2,
            Resource::Snapshot { .. } => 3,
            Resource::Base { .. } => 4,
        }
    }
}

/// One journal record (one file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `<job id>.<kind>`: the file stem.
    pub id: String,
    /// The backup or restore job.
    pub job_id: String,
    /// The LightOS project of the resource.
    pub project: String,
    /// Who wrote it.
    pub owner: Owner,
    /// When it was first written (seconds since the epoch).
    pub created_unix_s: u64,
    /// Whether the resource exists yet.
    pub stage: Stage,
    /// The resource.
    pub resource: Resource,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// `$XDG_STATE_HOME/ferry/lightbits`, else `$HOME/.local/state/ferry/lightbits`, else
    /// `/var/lib/ferry/lightbits`.
    pub fn default_dir() -> PathBuf {
        if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|value| !value.is_empty()) {
            return PathBuf::from(state).join("ferry/lightbits");
        }
        if let Some(home) = std::env::var_os("HOME").filter(|value| !value.is_empty()) {
            return PathBuf::from(home).join(".local/state/ferry/lightbits");
        }
        PathBuf::from("/var/lib/ferry/lightbits")
    }

    /// Opens (creating) the journal directory.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Journal> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| LightbitsError::LocalIo {
            operation: "create journal directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Journal { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes (or replaces) a record durably.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`].
    pub fn write(&self, record: &Record) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).expect("records serialize without fail");
        attach::write_atomically(&self.path(&record.id), &json)
    }

    /// Records the intent to create `resource` for `job_id` and returns the record. Written and
    /// synced before this returns, so the caller may create the resource next.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`].
    pub fn intend(&self, job_id: &str, project: &str, resource: Resource) -> Result<Record> {
        let record = Record {
            id: format!("{job_id}.{}", resource.kind()),
            job_id: job_id.to_owned(),
            project: project.to_owned(),
            owner: Owner::current(),
            created_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            stage: Stage::Intended,
            resource,
        };
        self.write(&record)?;
        Ok(record)
    }

    /// Marks a record done, with the resource as it now is (for example with its UUID).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`].
    pub fn done(&self, record: &mut Record, resource: Resource) -> Result<()> {
        record.stage = Stage::Done;
        record.resource = resource;
        self.write(record)
    }

    /// Removes a record (missing is fine).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`].
    pub fn remove(&self, id: &str) -> Result<()> {
        let _existed = attach::remove_file_idempotent(&self.path(id))?;
        let dir = &self.dir;
        fs::File::open(dir).and_then(|dir_file| dir_file.sync_all()).map_err(|source| {
            LightbitsError::LocalIo { operation: "fsync", path: dir.clone(), source }
        })
    }

    /// Reads one record by id.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`] or [`LightbitsError::Protocol`] for an unparsable record.
    pub fn get(&self, id: &str) -> Result<Option<Record>> {
        let path = self.path(id);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|error| LightbitsError::Protocol {
                    operation: format!("read journal record {}", path.display()),
                    message: error.to_string(),
                })
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LightbitsError::LocalIo { operation: "read", path, source }),
        }
    }

    /// All records, in undo order. Temp files of interrupted writes are ignored (the rename never
    /// happened, so the previous version, if any, is the record).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::LocalIo`]; a record that does not parse.
    pub fn list(&self) -> Result<Vec<Record>> {
        let entries = fs::read_dir(&self.dir).map_err(|source| LightbitsError::LocalIo {
            operation: "list",
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                remove_dead_temp(&entry.path(), &name);
                continue;
            }
            if let Some(id) = name.strip_suffix(".json")
                && let Some(record) = self.get(id)?
            {
                records.push(record);
            }
        }
        records
            .sort_by(|a, b| (a.resource.undo_rank(), &a.id).cmp(&(b.resource.undo_rank(), &b.id)));
        Ok(records)
    }
}

/// How often [`Journal::lock_volume`] retries when the lock file it locked was replaced meanwhile
/// (each retry means another job released the lock in between; a handful is plenty).
const LOCK_ATTEMPTS_MAX: u32 = 16;

/// An exclusive, host-wide claim on one volume for one job: `flock` on `<journal>/<volume
/// uuid>.lock`, released by the kernel when the process ends (even by kill -9), and the file
/// removed on drop.
#[derive(Debug)]
pub struct VolumeLock {
    file: fs::File,
    path: PathBuf,
}

impl Drop for VolumeLock {
    fn drop(&mut self) {
        // Unlink while still holding the lock: a job that opened this file meanwhile finds, once
        // it gets the lock, that the path no longer names it, and starts over.
        let _ignored = fs::remove_file(&self.path);
        let _unlocked = self.file.unlock();
    }
}

/// True when `path` still names the open `file` (same device and inode).
fn still_named(file: &fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// A lock file name for `volume_uuid`: its letters, digits and `-` (a cluster UUID is only those).
fn lock_file_name(volume_uuid: &str) -> String {
    let safe: String = volume_uuid
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    format!("{safe}.lock")
}

impl Journal {
    /// Claims `volume_uuid` for `job_id`, or refuses with [`LightbitsError::Busy`] (naming the
    /// holder) when another job on this host holds it.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Busy`]; [`LightbitsError::LocalIo`].
    pub fn lock_volume(
        &self,
        volume_uuid: &str,
        volume_name: &str,
        job_id: &str,
    ) -> Result<VolumeLock> {
        use std::io::{Read, Seek, Write};
        let path = self.dir.join(lock_file_name(volume_uuid));
        let io = |operation: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| LightbitsError::LocalIo { operation, path, source }
        };
        for _ in 0..LOCK_ATTEMPTS_MAX {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io("open lock", &path))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _read = file.read_to_string(&mut holder);
                    return Err(LightbitsError::Busy {
                        volume: volume_name.to_owned(),
                        holder: holder.trim().to_owned(),
                    });
                }
                Err(fs::TryLockError::Error(source)) => {
                    return Err(LightbitsError::LocalIo { operation: "lock", path, source });
                }
            }
            if !still_named(&file, &path) {
                continue;
            }
            let holder = format!("job {job_id}, pid {}", std::process::id());
            file.set_len(0).map_err(io("truncate lock", &path))?;
            file.rewind().map_err(io("rewind lock", &path))?;
            file.write_all(holder.as_bytes()).map_err(io("write lock", &path))?;
            return Ok(VolumeLock { file, path });
        }
        Err(LightbitsError::LocalIo {
            operation: "lock (the lock file kept being replaced)",
            path,
            source: std::io::Error::new(std::io::ErrorKind::WouldBlock, "contended"),
        })
    }

    /// Removes lock files no process holds (left by a killed job; the kernel released the lock).
    pub fn remove_stale_locks(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "lock") {
                continue;
            }
            let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_ok() && still_named(&file, &path) {
                let _ignored = fs::remove_file(&path);
            }
        }
    }
}

/// Removes `.<record>.tmp-<pid>`, the temp file of a write that a killed process never renamed,
/// once that process is gone (best effort: it is never read, so a leftover is only clutter).
fn remove_dead_temp(path: &Path, name: &str) {
    let Some((_, pid)) = name.rsplit_once(".tmp-") else { return };
    let Ok(pid) = pid.parse::<u32>() else { return };
    if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
        let _ignored = fs::remove_file(path);
    }
}

/// What reclaim did with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A snapshot or clone was deleted (and is gone).
    Deleted,
    /// It did not exist (any more).
    AlreadyGone,
    /// An ACL was restored to its recorded value.
    Restored,
    /// A discovery file was removed or a subsystem disconnected.
    Detached,
    /// The NVMe connection ferry made was left up because it also carries namespaces that are
    /// not ferry's (named in the item's `note`); the record is done with.
    LeftConnected,
    /// Its writer is still running; left alone.
    SkippedLive,
    /// A committed backup's snapshot kept as the next backup's diff base; left alone (the next
    /// backup of the volume deletes it once it has committed).
    KeptBase,
    /// Undo failed; the record is kept for the next reclaim.
    Failed,
}

/// One line of the reclaim report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReclaimItem {
    /// The record id.
    pub record_id: String,
    /// The job that created the resource.
    pub job_id: String,
    /// `snapshot`, `clone`, `acl` or `attachment`.
    pub kind: &'static str,
    /// What an operator recognises (name, or volume and NQN).
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What an operator should know about an undo that succeeded (a connection left up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What reclaim did (serialisable for `ferry reclaim --json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReclaimReport {
    /// One item per record found.
    pub items: Vec<ReclaimItem>,
}

impl ReclaimReport {
    /// True when nothing failed (live records and kept bases do not count as failures).
    pub fn is_clean(&self) -> bool {
        self.items.iter().all(|item| item.outcome != Outcome::Failed)
    }
}

/// What undoing one resource did, with a note for the operator when there is something to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undone {
    /// What happened.
    pub outcome: Outcome,
    /// A warning (a connection left up, and why).
    pub note: Option<String>,
}

impl From<Outcome> for Undone {
    fn from(outcome: Outcome) -> Undone {
        Undone { outcome, note: None }
    }
}

/// Undoes one resource. Idempotent. `ours` lists the namespaces (volume UUIDs) whose access
/// ferry removes in this cleanup: an NVMe connection ferry made is disconnected only when its
/// controller exposes nothing else (see [`attach::detach`]); the attachment's own volume always
/// counts as ours.
///
/// # Errors
///
/// Whatever the cluster or the host answered.
pub fn undo(
    client: &Client,
    sysfs_root: &Path,
    ours: &BTreeSet<String>,
    resource: &Resource,
) -> Result<Undone> {
    match resource {
        Resource::Attachment { attachment, volume_uuid } => {
            let mut ours = ours.clone();
            let _inserted = ours.insert(volume_uuid.clone());
            let detached = attach::detach(attachment, sysfs_root, &ours)?;
            let note = detached.warning();
            let outcome = if note.is_some() { Outcome::LeftConnected } else { Outcome::Detached };
            Ok(Undone { outcome, note })
        }
        Resource::Acl { volume_uuid, host_nqn, original_acl, original_ip_acl, .. } => {
            let restore = UpdateAcl { acl: original_acl.clone(), ip_acl: original_ip_acl.clone() };
            match client.update_volume_acl(volume_uuid, |_| restore.clone()) {
                Ok(()) => {}
                Err(LightbitsError::VolumeNotFound { .. }) => {
                    return Ok(Outcome::AlreadyGone.into());
                }
                Err(error) => return Err(error),
            }
            let _volume =
                client.wait_volume_acl(volume_uuid, host_nqn, original_acl.contains(host_nqn))?;
            Ok(Outcome::Restored.into())
        }
        Resource::Clone { name, uuid } => {
            let uuid = match uuid {
                Some(uuid) => Some(uuid.clone()),
                None => client.find_volume(name)?.map(|volume| volume.uuid),
            };
            let Some(uuid) = uuid else { return Ok(Outcome::AlreadyGone.into()) };
            // Take this host off the clone first, as the driver's terminate_connection does; the
            // delete below revokes access anyway, so a failure here is not fatal.
            let _acl_cleared = client.update_volume_acl(&uuid, |volume| UpdateAcl {
                acl: Acl::of(Vec::new()),
                ip_acl: volume.ip_acl.clone(),
            });
            let deletion = client.delete_volume(&uuid)?;
            client.wait_volume_gone(&uuid)?;
            Ok(if deletion == Deletion::Deleted { Outcome::Deleted } else { Outcome::AlreadyGone }
                .into())
        }
        Resource::Base { uuid, .. } => {
            let deletion = client.delete_snapshot(uuid)?;
            client.wait_snapshot_gone(uuid)?;
            Ok(if deletion == Deletion::Deleted { Outcome::Deleted } else { Outcome::AlreadyGone }
                .into())
        }
        Resource::Snapshot { name, uuid } => {
            let uuid = match uuid {
                Some(uuid) => Some(uuid.clone()),
                None => client.find_snapshot(name)?.map(|snapshot| snapshot.uuid),
            };
            let Some(uuid) = uuid else { return Ok(Outcome::AlreadyGone.into()) };
            let deletion = client.delete_snapshot(&uuid)?;
            client.wait_snapshot_gone(&uuid)?;
            Ok(if deletion == Deletion::Deleted { Outcome::Deleted } else { Outcome::AlreadyGone }
                .into())
        }
    }
}

/// Undoes every outstanding record whose writer is no longer running (all of them with
/// `include_live`), removing each record once its resource is gone or restored. Safe to run again
/// at any time: every step tolerates "already gone".
///
/// # Errors
///
/// Only when the journal cannot be listed; per-record failures are in the report.
pub fn reclaim(
    journal: &Journal,
    client: &Client,
    sysfs_root: &Path,
    include_live: bool,
) -> Result<ReclaimReport> {
    let client = client.uncancellable();
    let mut report = ReclaimReport::default();
    let records = journal.list()?;
    let reclaimable = |record: &Record| include_live || !record.owner.is_alive();
    // The clones of the jobs reclaimed here are deleted below, so their namespaces go too.
    let ours: BTreeSet<String> = records
        .iter()
        .filter(|record| reclaimable(record))
        .filter_map(|record| match &record.resource {
            Resource::Clone { uuid: Some(uuid), .. } => Some(uuid.clone()),
            _ => None,
        })
        .collect();
    for record in records {
        let mut item = ReclaimItem {
            record_id: record.id.clone(),
            job_id: record.job_id.clone(),
            kind: record.resource.kind(),
            name: record.resource.label(),
            outcome: Outcome::Failed,
            error: None,
            note: None,
        };
        if matches!(record.resource, Resource::Base { .. }) {
            item.outcome = Outcome::KeptBase;
        } else if !reclaimable(&record) {
            item.outcome = Outcome::SkippedLive;
        } else if record.project != client.options().project {
            item.error = Some(format!(
                "record is for project {}, the client for {}",
                record.project,
                client.options().project
            ));
        } else {
            match undo(&client, sysfs_root, &ours, &record.resource).and_then(|undone| {
                journal.remove(&record.id)?;
                Ok(undone)
            }) {
                Ok(undone) => (item.outcome, item.note) = (undone.outcome, undone.note),
                Err(error) => item.error = Some(crate::error::chain(&error)),
            }
        }
        report.items.push(item);
    }
    journal.remove_stale_locks();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::lightbits::attach::AttachOptions;
    use crate::lightbits::client::tests::{FakeServer, client};
    use crate::lightbits::flow::{Control, prepare_backup_source};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lbctl-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn dead_owner() -> Owner {
        Owner { pid: u32::MAX, start_ticks: 1, boot_id: "gone".into() }
    }

    /// The snapshot's intent record is durable before the create request reaches the cluster, and
    /// a failed create leaves neither record nor resource.
    #[test]
    fn intent_is_recorded_before_create() {
        let journal = Journal::open(temp_dir("intent")).unwrap();
        let journal_dir = journal.dir().to_path_buf();
        let seen_at_post = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&seen_at_post);
        let server = FakeServer::start(move |request| {
            match (request.method.as_str(), request.target.as_str()) {
                ("GET", "/api/v2/projects/proj/volumes/src-vol") => (404, "{}".into()),
                ("GET", target) if target.contains("volumes/?name=src-vol") => (
                    200,
                    r#"{"UUID":"u-src","name":"src-vol","state":"Available","ETag":"1","acl":{"values":["ALLOW_NONE"]},"size":"1048576"}"#.into(),
                ),
                ("POST", "/api/v2/projects/proj/snapshots") => {
                    let record = fs::read_to_string(journal_dir.join("job1.snapshot.json")).ok();
                    *seen.lock().unwrap() = record;
                    (400, r#"{"message":"source volume busy"}"#.into())
                }
                _ => (404, "{}".into()),
            }
        });
        let attach = AttachOptions { host_nqn: Some("nqn.me".into()), ..AttachOptions::default() };
        let control = Control::new(client(vec![server.address.clone()]), journal.clone(), attach);
        let error = prepare_backup_source(&control, "src-vol", "job1", false).unwrap_err();
        assert!(matches!(error, LightbitsError::Http { status: 400, .. }), "{error:?}");
        let record: Record =
            serde_json::from_str(seen_at_post.lock().unwrap().as_deref().unwrap()).unwrap();
        assert_eq!(record.stage, Stage::Intended);
        assert_eq!(
            record.resource,
            Resource::Snapshot { name: "ferry-snap-job1".into(), uuid: None }
        );
        assert!(journal.list().unwrap().is_empty(), "the failed step was cleaned up");
        fs::remove_dir_all(journal.dir()).unwrap();
    }

    /// Reclaim undoes every kind of record, keeps a record whose undo failed, finishes it on the
    /// next run, and a further run finds nothing: it is idempotent.
    #[test]
    fn reclaim_is_idempotent() {
        let root = temp_dir("reclaim");
        let journal = Journal::open(root.join("journal")).unwrap();
        let discovery_file = root.join("u-clone.conf");
        fs::write(&discovery_file, "# test\n").unwrap();
        let deletes = Arc::new(Mutex::new(Vec::<String>::new()));
        let acl = Arc::new(Mutex::new(vec!["nqn.other".to_owned(), "nqn.me".to_owned()]));
        let (deletes_server, acl_server) = (Arc::clone(&deletes), Arc::clone(&acl));
        let server = FakeServer::start(move |request| {
            let mut deletes = deletes_server.lock().unwrap();
            let target = request.target.as_str();
            match request.method.as_str() {
                "DELETE"
                    if target.ends_with("snapshots/s1") && !deletes.iter().any(|t| t == target) =>
                {
                    deletes.push(target.to_owned());
                    (400, r#"{"message":"try again"}"#.into())
                }
                "DELETE" => {
                    let gone = deletes.iter().filter(|t| *t == target).count() >= 1
                        && !target.ends_with("snapshots/s1");
                    deletes.push(target.to_owned());
                    if gone { (404, "{}".into()) } else { (200, "{}".into()) }
                }
                "GET" if target.ends_with("volumes/u-target") => {
                    let values = acl_server.lock().unwrap().clone();
                    (200, serde_json::json!({"UUID": "u-target", "name": "t", "state": "Available", "ETag": "5",
                        "acl": {"values": values}}).to_string())
                }
                "PUT" if target.ends_with("volumes/u-target") => {
                    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
                    *acl_server.lock().unwrap() =
                        serde_json::from_value(body["acl"]["values"].clone()).unwrap();
                    (200, "{}".into())
                }
                _ => (404, "{}".into()),
            }
        });
        let client = client(vec![server.address.clone()]);
        let resources = [
            Resource::Snapshot { name: "ferry-snap-j".into(), uuid: Some("s1".into()) },
            Resource::Clone { name: "ferry-clone-j".into(), uuid: Some("u-clone".into()) },
            Resource::Acl {
                volume_uuid: "u-target".into(),
                volume_name: "t".into(),
                host_nqn: "nqn.me".into(),
                original_acl: Acl { values: vec!["nqn.other".into()] },
                original_ip_acl: None,
            },
            Resource::Attachment {
                volume_uuid: "u-clone".into(),
                attachment: Attachment::DiscoveryFile {
                    path: discovery_file.clone(),
                    created: true,
                },
            },
        ];
        for resource in resources {
            let mut record = journal.intend("j", "proj", resource.clone()).unwrap();
            record.owner = dead_owner();
            journal.done(&mut record, resource).unwrap();
        }
        let mut live = journal
            .intend("live", "proj", Resource::Clone { name: "ferry-clone-live".into(), uuid: None })
            .unwrap();
        journal
            .done(&mut live, Resource::Clone { name: "ferry-clone-live".into(), uuid: None })
            .unwrap();

        let first = reclaim(&journal, &client, &root, false).unwrap();
        let outcomes: Vec<(&str, Outcome)> =
            first.items.iter().map(|item| (item.kind, item.outcome)).collect();
        assert_eq!(
            outcomes,
            [
                ("attachment", Outcome::Detached),
                ("acl", Outcome::Restored),
                ("clone", Outcome::Deleted),
                ("clone", Outcome::SkippedLive),
                ("snapshot", Outcome::Failed),
            ]
        );
        assert!(!first.is_clean());
        assert!(!discovery_file.exists());
        assert_eq!(*acl.lock().unwrap(), vec!["nqn.other"]);
        let json = serde_json::to_value(&first).unwrap();
        assert_eq!(json["items"][4]["outcome"], "failed");

        let second = reclaim(&journal, &client, &root, false).unwrap();
        assert_eq!(second.items.len(), 2);
        assert_eq!(second.items[1].outcome, Outcome::Deleted);
        assert!(second.is_clean());
        let third = reclaim(&journal, &client, &root, false).unwrap();
        assert_eq!(third.items.len(), 1, "only the live record remains");
        journal.remove(&live.id).unwrap();
        assert!(reclaim(&journal, &client, &root, false).unwrap().items.is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
