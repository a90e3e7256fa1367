//! The Lightbits side of the command line: the `[lightbits]` config table, `--lightbits-volume`
//! on `backup` and `restore`, and `ferry reclaim`.
//!
//! Each job with `--lightbits-volume` first reclaims what killed runs left behind (their journal
//! records), then obtains a device from `lightbits::flow`, hands only the device path to the data
//! plane, and always runs the guard's cleanup before it returns, whether the job succeeded, failed
//! or was cancelled. This module does not read or write volume data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::Cli;
use super::events::{self, Done, Start};
use super::output::Output;
use crate::error::{EngineError, ErrorKind};
use crate::lightbits::attach::{AttachMode, AttachOptions};
use crate::lightbits::client::{Client, ClientOptions, Scheme, TokenSource};
use crate::lightbits::flow::{self, Control};
use crate::lightbits::journal::{self, Journal, Outcome, ReclaimReport};
use crate::native::layout::{self, PackId};
use crate::plane::changes::{ChangeList, Extent, ExtentUnit};

/// `--lightbits-volume`, shared by `backup` and `restore`.
#[derive(Debug, Clone, Args)]
pub struct VolumeArgs {
    /// Lightbits volume (name or UUID) to back up from a point-in-time clone, or to restore into;
    /// needs a [lightbits] table in the config file.
    #[arg(long, value_name = "NAME_OR_UUID")]
    pub lightbits_volume: Option<String>,
}

/// The `[lightbits]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LightbitsSection {
    /// API addresses (`host`, `host:port`, `[v6]:port`; `http://` only for the simulator), tried
    /// in turn.
    #[serde(default)]
    pub api_addresses: Vec<String>,
    /// Project (default `default`).
    pub project: Option<String>,
    /// A file holding the API token (JWT).
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the API token.
    pub token_env: Option<String>,
    /// Verify the API's TLS certificate (default true).
    pub verify_tls: Option<bool>,
    /// PEM CA bundle to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// This host's NQN (default: the content of `hostnqn_file`).
    pub hostnqn: Option<String>,
    /// Where the host NQN is read from (default `/etc/nvme/hostnqn`).
    pub hostnqn_file: Option<PathBuf>,
    /// This host's IPs for the clone's IP ACL (default: `ALLOW_ANY`).
    pub host_ips: Option<Vec<String>>,
    /// `discovery-file` (default; the discovery-client daemon connects) or `nvme-connect`.
    pub attach_mode: Option<String>,
    /// discovery-client's directory (default `/etc/discovery-client/discovery.d`).
    pub discovery_dir: Option<PathBuf>,
    /// Where `nvme-uuid.<uuid>` links appear (default `/dev/disk/by-id`).
    pub by_id_dir: Option<PathBuf>,
    /// Root of sysfs (default `/sys`).
    pub sysfs_root: Option<PathBuf>,
    /// The `nvme` binary (default `nvme`).
    pub nvme_binary: Option<PathBuf>,
    /// `--ctrl-loss-tmo` for `nvme connect`.
    pub ctrl_loss_tmo: Option<i32>,
    /// Journal of the cluster resources ferry creates (default
    /// `$XDG_STATE_HOME/ferry/lightbits`, `~/.local/state/ferry/lightbits`).
    pub journal_dir: Option<PathBuf>,
    /// Timeout of one HTTP request (default 30 s).
    pub request_timeout_secs: Option<f64>,
    /// Deadline of one API call across retries and failover (default 100 s).
    pub operation_timeout_secs: Option<f64>,
    /// Deadline of one wait for a state, such as a clone becoming Available (default 100 s).
    pub wait_timeout_secs: Option<f64>,
    /// Polling interval of those waits (default 1 s).
    pub poll_interval_secs: Option<f64>,
    /// How long to wait for the block device to appear (default 60 s).
    pub device_timeout_secs: Option<f64>,
    /// Rounds over all API addresses on 5xx or transport errors (default 5).
    pub attempts_max: Option<u32>,
}

fn usage(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

fn seconds(value: Option<f64>, name: &str, default: Duration) -> Result<Duration, EngineError> {
    match value {
        None => Ok(default),
        Some(secs) if secs.is_finite() && secs > 0.0 => Ok(Duration::from_secs_f64(secs)),
        Some(secs) => Err(usage(format!("[lightbits] {name} = {secs} must be above 0"))),
    }
}

fn section(cli: &Cli) -> Result<LightbitsSection, EngineError> {
    let path = cli.config.clone().or_else(|| {
        std::env::var_os("FERRY_CONFIG").filter(|value| !value.is_empty()).map(PathBuf::from)
    });
    let config = super::config::load_config_file(path.as_deref())?;
    match config.lightbits {
        Some(section) if !section.api_addresses.is_empty() => Ok(section),
        _ => Err(usage(
            "--lightbits-volume and reclaim need a [lightbits] table with api_addresses in the \
             config file (--config or FERRY_CONFIG)",
        )),
    }
}

fn client_options(section: &LightbitsSection) -> Result<ClientOptions, EngineError> {
    let defaults = ClientOptions::default();
    let mut scheme = Scheme::Https;
    let mut addresses = Vec::new();
    for address in &section.api_addresses {
        if let Some(rest) = address.strip_prefix("http://") {
            scheme = Scheme::Http;
            addresses.push(rest.trim_end_matches('/').to_owned());
        } else {
            let rest = address.strip_prefix("https://").unwrap_or(address);
            addresses.push(rest.trim_end_matches('/').to_owned());
        }
    }
    if scheme == Scheme::Http && section.api_addresses.iter().any(|a| !a.starts_with("http://")) {
        return Err(usage("[lightbits] api_addresses mix http:// and https://"));
    }
    let token = match (&section.token_file, &section.token_env) {
        (Some(_), Some(_)) => return Err(usage("[lightbits] has both token_file and token_env")),
        (Some(file), None) => TokenSource::File(file.clone()),
        (None, Some(name)) => TokenSource::Env(name.clone()),
        (None, None) => TokenSource::None,
    };
    Ok(ClientOptions {
        addresses,
        project: section.project.clone().unwrap_or(defaults.project.clone()),
        token,
        scheme,
        verify_tls: section.verify_tls.unwrap_or(true),
        ca_file: section.ca_file.clone(),
        request_timeout: seconds(
            section.request_timeout_secs,
            "request_timeout_secs",
            defaults.request_timeout,
        )?,
        operation_timeout: seconds(
            section.operation_timeout_secs,
            "operation_timeout_secs",
            defaults.operation_timeout,
        )?,
        wait_timeout: seconds(
            section.wait_timeout_secs,
            "wait_timeout_secs",
            defaults.wait_timeout,
        )?,
        poll_interval: seconds(
            section.poll_interval_secs,
            "poll_interval_secs",
            defaults.poll_interval,
        )?,
        attempts_max: section.attempts_max.unwrap_or(defaults.attempts_max).max(1),
        ..defaults
    })
}

fn attach_options(section: &LightbitsSection) -> Result<AttachOptions, EngineError> {
    let defaults = AttachOptions::default();
    let mode = match section.attach_mode.as_deref() {
        None | Some("discovery-file") => AttachMode::DiscoveryClient,
        Some("nvme-connect") => AttachMode::NvmeConnect,
        Some(other) => {
            return Err(usage(format!(
                "[lightbits] attach_mode {other:?} is neither \"discovery-file\" nor \"nvme-connect\""
            )));
        }
    };
    let poll = seconds(section.poll_interval_secs, "poll_interval_secs", Duration::from_secs(1))?;
    Ok(AttachOptions {
        mode,
        host_nqn: section.hostnqn.clone(),
        host_nqn_path: section.hostnqn_file.clone().unwrap_or(defaults.host_nqn_path.clone()),
        discovery_dir: section.discovery_dir.clone().unwrap_or(defaults.discovery_dir.clone()),
        nvme_binary: section.nvme_binary.clone().unwrap_or(defaults.nvme_binary.clone()),
        ctrl_loss_tmo: section.ctrl_loss_tmo,
        by_id_dir: section.by_id_dir.clone().unwrap_or(defaults.by_id_dir.clone()),
        sysfs_root: section.sysfs_root.clone().unwrap_or(defaults.sysfs_root.clone()),
        device_timeout: seconds(
            section.device_timeout_secs,
            "device_timeout_secs",
            defaults.device_timeout,
        )?,
        device_poll_interval: poll.min(defaults.device_poll_interval),
        ..defaults
    })
}

/// The control context the config describes; waits stop when `cancel` is set.
fn control(cli: &Cli, cancel: Option<&Arc<AtomicBool>>) -> Result<Control, EngineError> {
    let section = section(cli)?;
    let mut client = Client::new(client_options(&section)?)?;
    if let Some(cancel) = cancel {
        client = client.with_cancel(Arc::clone(cancel));
    }
    let journal = Journal::open(section.journal_dir.clone().unwrap_or_else(Journal::default_dir))?;
    let mut control = Control::new(client, journal, attach_options(&section)?);
    control.host_ips = section.host_ips.clone().unwrap_or_default();
    Ok(control)
}

fn reclaim_text(report: &ReclaimReport) -> String {
    if report.items.is_empty() {
        return "nothing to reclaim".to_owned();
    }
    let lines: Vec<String> = report
        .items
        .iter()
        .map(|item| {
            let outcome = serde_json::to_value(item.outcome)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default();
            let error = item.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            let note = item.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            format!("{} {} (job {}): {outcome}{error}{note}", item.kind, item.name, item.job_id)
        })
        .collect();
    lines.join("\n")
}

/// Reports the control layer's warnings (a connection left up on purpose, and why).
fn report_warnings(control: &Control, output: &Output) {
    for warning in control.take_warnings() {
        output.warning(&warning);
    }
}

/// Undoes what runs that are no longer alive left behind; failures become warnings, because
/// what fails stays journalled for the next attempt.
fn reclaim_dead(control: &Control, output: &Output) -> Result<(), EngineError> {
    let report =
        journal::reclaim(&control.journal, &control.client, &control.attach.sysfs_root, false)?;
    for item in &report.items {
        match item.outcome {
            Outcome::SkippedLive | Outcome::KeptBase => {}
            Outcome::Failed => output.warning(&format!(
                "reclaim of {} {} left by job {} failed (kept for the next run): {}",
                item.kind,
                item.name,
                item.job_id,
                item.error.as_deref().unwrap_or("unknown error")
            )),
            _ => output.warning(&format!(
                "reclaimed {} {} left by interrupted job {}",
                item.kind, item.name, item.job_id
            )),
        }
        if let Some(note) = &item.note {
            output.warning(note);
        }
    }
    Ok(())
}

/// `ferry reclaim`: undoes every journalled resource whose job is no longer running.
///
/// # Errors
/// `Usage` without a `[lightbits]` table; `Cluster` when something could not be undone (the
/// report is in the error's details).
pub fn run_reclaim(cli: &Cli, output: &Output) -> Result<(), EngineError> {
    let control = control(cli, None)?;
    output.start(Start::Reclaim { journal: control.journal.dir().display().to_string() });
    let report =
        journal::reclaim(&control.journal, &control.client, &control.attach.sysfs_root, false)?;
    for note in report.items.iter().filter_map(|item| item.note.as_deref()) {
        output.warning(note);
    }
    let text = reclaim_text(&report);
    if report.is_clean() {
        output.result(Done::Reclaim { reclaim: report }, &text);
        return Ok(());
    }
    Err(EngineError::new(ErrorKind::Cluster, format!("reclaim incomplete: {text}"))
        .with_details(events::details(&Done::Reclaim { reclaim: report })))
}

/// Combines a job's outcome with its cleanup's: a job error wins (the cleanup failure becomes a
/// warning); a clean job whose cleanup failed is a cluster error naming what is left journalled.
fn settle<T>(
    result: Result<T, EngineError>,
    cleanup: crate::lightbits::Result<()>,
    what: &str,
    output: &Output,
) -> Result<T, EngineError> {
    match (result, cleanup) {
        (result, Ok(())) => result,
        (Err(error), Err(cleanup)) => {
            output.warning(&format!(
                "cleanup after the failed {what} failed (journalled; `ferry reclaim` retries): {}",
                crate::error::chain(&cleanup)
            ));
            Err(error)
        }
        (Ok(_), Err(cleanup)) => Err(EngineError::from(cleanup).context(format!(
            "{what} succeeded, but cleanup failed (journalled; `ferry reclaim` retries)"
        ))),
    }
}

/// How a Lightbits backup uses snapshot diffs (issue 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bases {
    /// Diff against the volume's kept base when there is one, delete that base once the backup
    /// has committed, keep none.
    Use,
    /// As `Use`, and keep this backup's snapshot as the next run's base (`--lightbits-keep-base`).
    UseAndKeep,
}

impl Bases {
    /// What a backup does with bases: use them, and keep its own with `--lightbits-keep-base`.
    pub fn of(keep_base: bool) -> Bases {
        if keep_base { Bases::UseAndKeep } else { Bases::Use }
    }
}

/// What the volume's kept base gave: the backup that read it and, when the diff could be had,
/// the changed LBA ranges since.
#[derive(Debug, Clone)]
pub struct Hint {
    /// The backup that read the base snapshot.
    pub parent_backup_id: String,
    /// Changed extents in LBAs (the attached device's logical blocks); `None` when the diff
    /// could not be had (a warning said why): a Cinder-format backup still makes a full-read
    /// incremental of the parent, a native one has nothing to take from it.
    pub changed: Option<Vec<Extent>>,
    /// What it came from, for the manifest.
    pub changes_from: String,
    /// The source label the parent must carry: `lightbits:<project>/<volume> `.
    pub label_prefix: String,
}

impl Hint {
    /// The change list, in the attached device's logical blocks, if the diff could be had.
    pub fn changes(&self, sample_count: Option<usize>) -> Option<ChangeList> {
        Some(ChangeList {
            changed: self.changed.clone()?,
            unit: ExtentUnit::LogicalBlocks,
            sample_count,
            changes_from: self.changes_from.clone(),
        })
    }
}

/// Most diff pages read before giving up (10,000 ranges each: far beyond any volume).
const DIFF_PAGES_MAX: usize = 100_000;

/// The diff of the new snapshot against the volume's newest kept base; without the changes
/// after a warning when it cannot be had; `None` without a base (not a warning).
fn diff_hint(
    control: &Control,
    attached: &flow::AttachedClone<'_>,
    base: Option<&flow::Base>,
    output: &Output,
) -> Option<Hint> {
    let (base, snapshot) = (base?, attached.snapshot()?);
    let mut hint = Hint {
        parent_backup_id: base.backup_id.clone(),
        changed: None,
        changes_from: format!("lightbits diff {} against {}", snapshot.name, base.name),
        label_prefix: format!(
            "lightbits:{}/{} ",
            control.client.options().project,
            attached.source().name
        ),
    };
    let fallback = |why: String| {
        output
            .warning(&format!("incremental backup not possible, reading the whole volume: {why}"));
    };
    match control.client.get_snapshot(&base.uuid) {
        Ok(Some(_)) => {}
        Ok(None) => {
            fallback(format!("base snapshot {} is gone", base.name));
            return Some(hint);
        }
        Err(error) => {
            fallback(format!("base snapshot {}: {error}", base.name));
            return Some(hint);
        }
    }
    match control.client.changed_blocks(&snapshot.uuid, &base.uuid, DIFF_PAGES_MAX) {
        Ok(ranges) => {
            let changed = ranges.iter().map(|range| Extent {
                start: range.lba_start,
                // `lbaEnd` taken as inclusive: a superset under either reading (reference B.8).
                length: range.lba_end.saturating_sub(range.lba_start).saturating_add(1),
            });
            hint.changed = Some(changed.collect());
        }
        Err(error) => fallback(format!("snapshot diff: {}", crate::error::chain(&error))),
    }
    Some(hint)
}

/// A backup of `volume` through a point-in-time clone: reclaims dead records, prepares the
/// clone, runs `job` on its device (with the label a manifest records as its source, and the
/// snapshot diff against the volume's kept base when `bases` allows one), and always cleans
/// up. Once the job has succeeded (its backup committed), the volume's older bases are deleted
/// and, with [`Bases::UseAndKeep`], this backup's snapshot becomes the next base.
///
/// # Errors
/// The prepare's, the job's or the cleanup's error.
pub fn backup<T>(
    cli: &Cli,
    volume: &str,
    backup_id: &str,
    bases: Bases,
    output: &Output,
    cancel: &Arc<AtomicBool>,
    job: impl FnOnce(&Path, String, Option<Hint>) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    if !layout::backup_id_valid(backup_id) {
        return Err(usage(format!("invalid backup id {backup_id:?}")));
    }
    let control = control(cli, Some(cancel))?;
    reclaim_dead(&control, output)?;
    let context = |error: crate::lightbits::LightbitsError| {
        EngineError::from(error).context(format!("lightbits volume {volume}"))
    };
    let source = control.client.resolve_volume(volume).map_err(context)?;
    let base = flow::bases(&control.journal, &source.uuid).map_err(context)?.into_iter().next();
    let keep_snapshot = bases == Bases::UseAndKeep || base.is_some();
    let prepared = flow::prepare_backup_source(&control, volume, backup_id, keep_snapshot);
    report_warnings(&control, output);
    let mut attached = prepared.map_err(context)?;
    let label = format!(
        "lightbits:{}/{} (clone {})",
        control.client.options().project,
        attached.source().name,
        attached.clone_volume().uuid
    );
    let hint = diff_hint(&control, &attached, base.as_ref(), output);
    if bases != Bases::UseAndKeep
        && let Err(error) = attached.release_snapshot()
    {
        output.warning(&format!("snapshot kept for the diff not deleted yet: {error}"));
    }
    let device = attached.device_path().to_path_buf();
    let source_uuid = attached.source().uuid.clone();
    let result = job(&device, label, hint);
    let cleanup = match (&result, bases) {
        (Ok(_), Bases::UseAndKeep) => attached.finish_keeping_base(backup_id),
        _ => attached.finish(),
    };
    if result.is_ok() {
        let keep = (bases == Bases::UseAndKeep).then(|| format!("{backup_id}.base"));
        match flow::drop_bases(&control, &source_uuid, keep.as_deref()) {
            Ok(failures) => failures.iter().for_each(|failure| output.warning(failure)),
            Err(error) => output.warning(&format!("old diff bases not deleted: {error}")),
        }
    }
    report_warnings(&control, output);
    settle(result, cleanup, &format!("backup {backup_id}"), output)
}

/// A new native backup id: the start time and a random suffix.
pub fn new_backup_id() -> String {
    format!("{}-{}", layout::Timestamp::now().compact(), &PackId::random().to_hex()[..8])
}

/// A restore into the existing `volume`: reclaims dead records, checks and extends its ACL,
/// attaches it, runs `job` on its device, and always detaches and restores the ACL.
///
/// # Errors
/// The prepare's (exit 8 when attached elsewhere without `force`), the job's or the cleanup's.
pub fn restore<T>(
    cli: &Cli,
    volume: &str,
    force: bool,
    output: &Output,
    cancel: &Arc<AtomicBool>,
    job: impl FnOnce(&Path) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    let control = control(cli, Some(cancel))?;
    reclaim_dead(&control, output)?;
    let job_id = format!("restore-{}", &PackId::random().to_hex()[..12]);
    let prepared = flow::prepare_restore_target(&control, volume, &job_id, force);
    report_warnings(&control, output);
    let attached = prepared
        .map_err(|error| EngineError::from(error).context(format!("lightbits volume {volume}")))?;
    let result = job(attached.device_path());
    let cleanup = attached.finish();
    report_warnings(&control, output);
    settle(result, cleanup, &format!("restore into {volume}"), output)
}

/// The `result` fields of a finished job, and its human summary.
pub type JobReport = (Done, String);
