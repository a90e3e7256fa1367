//! The two control-plane flows of a job, each returning a guard that owns what it created:
//!
//! - backup: snapshot → wait Available → clone (ACL = this host) → wait Available → delete the
//!   snapshot → attach → device ([`prepare_backup_source`] → [`AttachedClone`]);
//! - restore: check the ACL → record it → add this host → attach → device
//!   ([`prepare_restore_target`] → [`AttachedVolume`]).
//!
//! Every step is journalled before it is taken and is idempotent, so a rerun of the same job id
//! reuses what exists. `finish` undoes everything in reverse order and clears the journal; `Drop`
//! of an unfinished guard tries the same, and whatever it cannot undo stays in the journal for
//! `reclaim`. The data plane sees only [`AttachedClone::device_path`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::attach::{self, AttachOptions, Target};
use super::client::Client;
use super::journal::{self, Journal, Record, Resource, VolumeLock};
use super::model::{ACL_ALLOW_ANY, Acl, CreateVolume, Snapshot, UpdateAcl, Volume};
use super::{CLONE_PREFIX, LightbitsError, Result, SNAPSHOT_PREFIX, resource_name};

/// Everything the flows need: the API client, the journal and the host-side settings.
#[derive(Debug)]
pub struct Control {
    /// The cluster API client (may carry ferry's cancel flag; cleanup never does).
    pub client: Client,
    /// The journal of what ferry created.
    pub journal: Journal,
    /// Host-side settings.
    pub attach: AttachOptions,
    /// This host's IPs: the IP ACL of clones, and added to a restore target's IP ACL. Empty:
    /// clones get `["ALLOW_ANY"]` and a target's IP ACL is left alone.
    pub host_ips: Vec<String>,
    /// Replica count of clones when the source volume does not report one.
    pub clone_replica_count_default: String,
    /// Warnings from cleanups (a connection left up), for the caller to report.
    warnings: Mutex<Vec<String>>,
}

impl Control {
    /// A control context with the defaults: no host IPs, 3 replicas (Cinder's default).
    pub fn new(client: Client, journal: Journal, attach: AttachOptions) -> Control {
        Control {
            client,
            journal,
            attach,
            host_ips: Vec::new(),
            clone_replica_count_default: "3".to_owned(),
            warnings: Mutex::new(Vec::new()),
        }
    }

    /// The warnings collected since the last call (cleanups that left something up on purpose).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut *self.warnings.lock().expect("warnings lock is never poisoned"))
    }

    fn warn(&self, warning: String) {
        self.warnings.lock().expect("warnings lock is never poisoned").push(warning);
    }

    fn project(&self) -> &str {
        &self.client.options().project
    }

    fn target(&self, volume_uuid: &str) -> Result<Target> {
        Ok(Target {
            volume_uuid: volume_uuid.to_owned(),
            subsys_nqn: self.client.cluster_info()?.subsystem_nqn,
            endpoints: self.client.nvme_endpoints()?,
        })
    }
}

/// The resources a guard holds, undone in journal undo order.
///
/// Fields drop in declaration order: the volume lock is released last, after `Drop` has run the
/// cleanup.
#[derive(Debug)]
struct Held<'a> {
    control: &'a Control,
    records: Vec<Record>,
    device: Option<PathBuf>,
    finished: bool,
    volume_lock: Option<VolumeLock>,
}

impl<'a> Held<'a> {
    fn new(control: &'a Control) -> Held<'a> {
        Held { control, records: Vec::new(), device: None, finished: false, volume_lock: None }
    }

    /// Claims the volume for this job on this host (one job per volume at a time).
    fn lock(&mut self, volume: &Volume, job_id: &str) -> Result<()> {
        self.volume_lock =
            Some(self.control.journal.lock_volume(&volume.uuid, &volume.name, job_id)?);
        Ok(())
    }

    /// Undoes one resource: only the resource's own volume counts as ferry's namespace, so a
    /// connection that also carries anything else (another user's volume, another ferry job's
    /// clone) is left up, with a warning.
    fn undo(&self, client: &Client, resource: &Resource) -> Result<()> {
        let ours = BTreeSet::new();
        let undone = journal::undo(client, &self.control.attach.sysfs_root, &ours, resource)?;
        if let Some(note) = undone.note {
            self.control.warn(note);
        }
        Ok(())
    }

    /// Journals the intent, then keeps the record so an error from here on is undone.
    fn intend(&mut self, job_id: &str, resource: Resource) -> Result<usize> {
        let record = self.control.journal.intend(job_id, self.control.project(), resource)?;
        self.records.push(record);
        Ok(self.records.len() - 1)
    }

    fn done(&mut self, index: usize, resource: Resource) -> Result<()> {
        self.control.journal.done(&mut self.records[index], resource)
    }

    /// Undoes one held record now (for the snapshot, deleted as soon as the clone exists).
    fn release(&mut self, index: usize) -> Result<()> {
        let client = self.control.client.uncancellable();
        let record = &self.records[index];
        self.undo(&client, &record.resource)?;
        self.control.journal.remove(&record.id)?;
        let _record = self.records.remove(index);
        Ok(())
    }

    /// Flushes the device, then undoes every record (detach, ACL, clone, snapshot), removing each
    /// record once undone. Keeps going after a failure and returns the first one.
    fn cleanup(&mut self) -> Result<()> {
        self.finished = true;
        let mut first_error = None;
        if let Some(device) = self.device.take()
            && let Err(error) = attach::flush_device(&device)
        {
            first_error = Some(error);
        }
        let client = self.control.client.uncancellable();
        let mut records = std::mem::take(&mut self.records);
        records.sort_by_key(|record| record.resource.undo_rank());
        for record in records {
            let undone = self
                .undo(&client, &record.resource)
                .and_then(|()| self.control.journal.remove(&record.id));
            if let Err(error) = undone {
                let _first = first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Journals and performs the host-side attach of `volume_uuid`, then waits for its device.
    fn attach(&mut self, job_id: &str, volume_uuid: &str, host_nqn: &str) -> Result<PathBuf> {
        let target = self.control.target(volume_uuid)?;
        let attachment = attach::plan_attachment(&self.control.attach, &target)?;
        let resource = Resource::Attachment {
            volume_uuid: volume_uuid.to_owned(),
            attachment: attachment.clone(),
        };
        let index = self.intend(job_id, resource.clone())?;
        attach::attach(&self.control.attach, &target, host_nqn, &attachment)?;
        self.done(index, resource)?;
        let device = attach::wait_device(&self.control.attach, volume_uuid)?;
        self.device = Some(device.clone());
        Ok(device)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: what fails stays in the journal for `reclaim`.
            let _ignored = self.cleanup();
        }
    }
}

/// A clone of a volume's point-in-time snapshot, attached to this host. Detached and deleted by
/// [`AttachedClone::finish`] (or, best effort, on drop).
#[derive(Debug)]
pub struct AttachedClone<'a> {
    held: Held<'a>,
    source: Volume,
    clone: Volume,
    device: PathBuf,
    /// The snapshot the clone was made from, while it is kept (journalled as a snapshot of this
    /// job until [`AttachedClone::finish_keeping_base`]), with its record id.
    snapshot: Option<(Snapshot, String)>,
}

impl AttachedClone<'_> {
    /// The local block device of the clone: what the data plane reads.
    pub fn device_path(&self) -> &Path {
        &self.device
    }

    /// The volume that was backed up.
    pub fn source(&self) -> &Volume {
        &self.source
    }

    /// The clone volume.
    pub fn clone_volume(&self) -> &Volume {
        &self.clone
    }

    /// Flushes and detaches the device, removes the clone (its ACL first) and waits until it is
    /// gone, deletes the kept snapshot if any, and clears the journal.
    ///
    /// # Errors
    ///
    /// The first failure; what could not be undone stays in the journal.
    pub fn finish(mut self) -> Result<()> {
        self.held.cleanup()
    }

    /// The snapshot the clone was made from, while it is kept.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref().map(|(snapshot, _)| snapshot)
    }

    /// Deletes the kept snapshot now (it was kept only to be diffed).
    ///
    /// # Errors
    ///
    /// The delete's failure (the record stays for `finish` or `reclaim`).
    pub fn release_snapshot(&mut self) -> Result<()> {
        let Some((_, record_id)) = self.snapshot.take() else { return Ok(()) };
        match self.held.records.iter().position(|record| record.id == record_id) {
            Some(index) => self.held.release(index),
            None => Ok(()),
        }
    }

    /// Like [`AttachedClone::finish`], but the kept snapshot becomes the volume's diff base:
    /// its record is rewritten as a [`Resource::Base`] of `backup_id` (the backup that read it,
    /// which must have committed), which `reclaim` leaves alone. Without a kept snapshot, the
    /// same as `finish`.
    ///
    /// # Errors
    ///
    /// The journal's or the cleanup's first failure.
    pub fn finish_keeping_base(mut self, backup_id: &str) -> Result<()> {
        if let Some((snapshot, record_id)) = self.snapshot.take()
            && let Some(index) = self.held.records.iter().position(|record| record.id == record_id)
        {
            let journal = &self.held.control.journal;
            let base = Resource::Base {
                name: snapshot.name.clone(),
                uuid: snapshot.uuid.clone(),
                volume_uuid: self.source.uuid.clone(),
                backup_id: backup_id.to_owned(),
            };
            let mut record =
                journal.intend(backup_id, self.held.control.project(), base.clone())?;
            journal.done(&mut record, base)?;
            let snapshot_record = self.held.records.remove(index);
            journal.remove(&snapshot_record.id)?;
        }
        self.held.cleanup()
    }
}

/// A kept diff base of a volume: its journal record and what it names.
#[derive(Debug, Clone)]
pub struct Base {
    /// The record id.
    pub record_id: String,
    /// The snapshot's name.
    pub name: String,
    /// The snapshot's UUID.
    pub uuid: String,
    /// The backup that read it.
    pub backup_id: String,
    /// When the record was written (seconds since the epoch).
    pub created_unix_s: u64,
}

/// The diff bases journalled for `volume_uuid`, newest first.
///
/// # Errors
///
/// The journal's.
pub fn bases(journal: &Journal, volume_uuid: &str) -> Result<Vec<Base>> {
    let mut bases: Vec<Base> = journal
        .list()?
        .into_iter()
        .filter_map(|record| match record.resource {
            Resource::Base { name, uuid, volume_uuid: of, backup_id } if of == volume_uuid => {
                Some(Base {
                    record_id: record.id,
                    name,
                    uuid,
                    backup_id,
                    created_unix_s: record.created_unix_s,
                })
            }
            _ => None,
        })
        .collect();
    bases.sort_by(|a, b| (b.created_unix_s, &b.record_id).cmp(&(a.created_unix_s, &a.record_id)));
    Ok(bases)
}

/// Deletes the diff bases of `volume_uuid` except the record `keep` (after a backup that
/// superseded them committed); returns what could not be deleted (it stays journalled and is
/// tried again by the next backup of the volume).
///
/// # Errors
///
/// Only when the journal cannot be listed.
pub fn drop_bases(control: &Control, volume_uuid: &str, keep: Option<&str>) -> Result<Vec<String>> {
    let client = control.client.uncancellable();
    let mut failures = Vec::new();
    for base in bases(&control.journal, volume_uuid)? {
        if Some(base.record_id.as_str()) == keep {
            continue;
        }
        let Some(record) = control.journal.get(&base.record_id)? else { continue };
        let ours = BTreeSet::new();
        let undone = journal::undo(&client, &control.attach.sysfs_root, &ours, &record.resource)
            .and_then(|_| control.journal.remove(&record.id));
        if let Err(error) = undone {
            failures.push(format!(
                "old diff base {} of backup {} not deleted (kept for the next run): {}",
                base.name,
                base.backup_id,
                crate::error::chain(&error)
            ));
        }
    }
    Ok(failures)
}

fn text_of(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Number(number) => Some(number.to_string()),
        serde_json::Value::Bool(flag) => Some(if *flag { "True" } else { "False" }.to_owned()),
        _ => None,
    }
}

/// The create request of a clone of `source` from snapshot `snapshot_name`, visible to this host
/// only.
fn clone_request(
    control: &Control,
    source: &Volume,
    name: &str,
    snapshot_name: &str,
    host_nqn: &str,
) -> Result<CreateVolume> {
    let size = text_of(source.size.as_ref()).ok_or_else(|| LightbitsError::Protocol {
        operation: "read source volume".to_owned(),
        message: format!("volume {} has no size", source.name),
    })?;
    let ip_acl = if control.host_ips.is_empty() {
        vec![ACL_ALLOW_ANY.to_owned()]
    } else {
        control.host_ips.clone()
    };
    Ok(CreateVolume {
        name: name.to_owned(),
        size,
        replica_count: text_of(source.replica_count.as_ref())
            .unwrap_or_else(|| control.clone_replica_count_default.clone()),
        compression: text_of(source.compression.as_ref()).unwrap_or_else(|| "False".to_owned()),
        acl: Acl::of(vec![host_nqn.to_owned()]),
        ip_acl: Acl::of(ip_acl),
        source_snapshot_uuid: None,
        source_snapshot_name: Some(snapshot_name.to_owned()),
        qos_policy_uuid: None,
    })
}

/// Backup source: a crash-consistent, point-in-time clone of `volume` (name or UUID) attached to
/// this host, named `ferry-snap-<backup_id>` / `ferry-clone-<backup_id>`. With `keep_snapshot`
/// the snapshot is not deleted once the clone exists (it is diffed, or kept as the next
/// backup's base); it stays journalled as this job's until `finish_keeping_base`.
///
/// # Errors
///
/// Any step's error, after undoing the steps taken (what cannot be undone stays journalled).
pub fn prepare_backup_source<'a>(
    control: &'a Control,
    volume: &str,
    backup_id: &str,
    keep_snapshot: bool,
) -> Result<AttachedClone<'a>> {
    let client = &control.client;
    let snapshot_name = resource_name(SNAPSHOT_PREFIX, backup_id)?;
    let clone_name = resource_name(CLONE_PREFIX, backup_id)?;
    let host_nqn = control.attach.host_nqn()?;
    let source = client.resolve_volume(volume)?;
    let mut held = Held::new(control);
    held.lock(&source, backup_id)?;

    let snapshot_index =
        held.intend(backup_id, Resource::Snapshot { name: snapshot_name.clone(), uuid: None })?;
    let snapshot = client.create_snapshot(&snapshot_name, &source)?;
    held.done(
        snapshot_index,
        Resource::Snapshot { name: snapshot_name.clone(), uuid: Some(snapshot.uuid.clone()) },
    )?;
    let snapshot = client.wait_snapshot_available(&snapshot.uuid)?;

    let request = clone_request(control, &source, &clone_name, &snapshot_name, &host_nqn)?;
    let clone_index =
        held.intend(backup_id, Resource::Clone { name: clone_name.clone(), uuid: None })?;
    let clone = client.create_volume(&request)?;
    held.done(
        clone_index,
        Resource::Clone { name: clone_name.clone(), uuid: Some(clone.uuid.clone()) },
    )?;
    let clone = client.wait_volume_available(&clone.uuid)?;
    if !clone.acl.contains(&host_nqn) {
        // A clone reused from an interrupted run whose ACL was already cleared.
        client.update_volume_acl(&clone.uuid, |volume| UpdateAcl {
            acl: volume.acl.with_host(&host_nqn),
            ip_acl: volume.ip_acl.clone(),
        })?;
        let _clone = client.wait_volume_acl(&clone.uuid, &host_nqn, true)?;
    }

    let kept = if keep_snapshot {
        Some((snapshot, held.records[snapshot_index].id.clone()))
    } else {
        held.release(snapshot_index)?;
        None
    };
    let device = held.attach(backup_id, &clone.uuid, &host_nqn)?;
    Ok(AttachedClone { held, source, clone, device, snapshot: kept })
}

/// An existing volume attached to this host as a restore target. [`AttachedVolume::finish`]
/// detaches it and restores its ACL exactly as it was.
#[derive(Debug)]
pub struct AttachedVolume<'a> {
    held: Held<'a>,
    volume: Volume,
    device: PathBuf,
}

impl AttachedVolume<'_> {
    /// The local block device of the volume: what the data plane writes.
    pub fn device_path(&self) -> &Path {
        &self.device
    }

    /// The volume.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Flushes and detaches the device, restores the ACLs recorded before the attach, and clears
    /// the journal.
    ///
    /// # Errors
    ///
    /// The first failure; what could not be undone stays in the journal.
    pub fn finish(mut self) -> Result<()> {
        self.held.cleanup()
    }
}

/// Restore target: `volume` (name or UUID) attached to this host.
///
/// Refused ([`LightbitsError::AttachedElsewhere`]) unless `force` when its ACL lets any other host
/// in (another NQN or `ALLOW_ANY`), or already lists this host without a journal record of ours
/// (attached here by someone else, perhaps mounted). The ACLs as found are journalled before they
/// are changed; a rerun of the same `job_id` restores those, not the ones it changed.
///
/// # Errors
///
/// Any step's error, after undoing the steps taken.
pub fn prepare_restore_target<'a>(
    control: &'a Control,
    volume: &str,
    job_id: &str,
    force: bool,
) -> Result<AttachedVolume<'a>> {
    let client = &control.client;
    let _valid = resource_name("", job_id)?;
    let host_nqn = control.attach.host_nqn()?;
    let found = client.resolve_volume(volume)?;
    let mut held = Held::new(control);
    held.lock(&found, job_id)?;
    let earlier =
        control.journal.get(&format!("{job_id}.acl"))?.and_then(|record| match record.resource {
            Resource::Acl { volume_uuid, original_acl, original_ip_acl, .. }
                if volume_uuid == found.uuid =>
            {
                Some((original_acl, original_ip_acl))
            }
            _ => None,
        });
    let ours_already = earlier.is_some();
    let (original_acl, original_ip_acl) =
        earlier.unwrap_or_else(|| (found.acl.clone(), found.ip_acl.clone()));
    let elsewhere = !original_acl.others(&host_nqn).is_empty()
        || (!ours_already && original_acl.contains(&host_nqn));
    if elsewhere && !force {
        return Err(LightbitsError::AttachedElsewhere {
            volume: found.name.clone(),
            acl: original_acl.values,
        });
    }

    let resource = Resource::Acl {
        volume_uuid: found.uuid.clone(),
        volume_name: found.name.clone(),
        host_nqn: host_nqn.clone(),
        original_acl,
        original_ip_acl,
    };
    let acl_index = held.intend(job_id, resource.clone())?;
    let host_ips = control.host_ips.clone();
    client.update_volume_acl(&found.uuid, |volume| UpdateAcl {
        acl: volume.acl.with_host(&host_nqn),
        ip_acl: volume.ip_acl.as_ref().map(|ip_acl| {
            host_ips.iter().fold(ip_acl.clone(), |ip_acl, ip| {
                if ip_acl.contains(ACL_ALLOW_ANY) { ip_acl } else { ip_acl.with_host(ip) }
            })
        }),
    })?;
    held.done(acl_index, resource)?;
    let volume = client.wait_volume_acl(&found.uuid, &host_nqn, true)?;
    if !volume.state.is_usable() {
        let _volume = client.wait_volume_available(&found.uuid)?;
    }
    let device = held.attach(job_id, &found.uuid, &host_nqn)?;
    Ok(AttachedVolume { held, volume, device })
}
