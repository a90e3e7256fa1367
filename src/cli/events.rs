//! The JSON Lines events of `ferry --json`, defined once as types (ripgrep's `jsont.rs` is the
//! model); `output` is what writes them, and the only writer of stdout.
//!
//! Every line is an [`Event`]: `{"event": KIND, ...fields, "command": COMMAND}`. KIND is
//! `start` (once, before any work: the job's settings and its memory `budget`), `progress`
//! (about once a second: [`Counters`]), `warning` (`message`), and, last, either `result`
//! (`exit_code` 0 and the command's [`Done`] payload) or `error` (`kind`, `exit_code`, `message`,
//! and the failure's details: what `verify` or `reclaim` found, the same payload their `result`
//! would carry). The `start` fields of each command are a [`Start`] variant.
//! README.md describes the contract; changing a field here changes it.

use serde::Serialize;
use serde_json::Value;

use crate::cinder::backup::BackupOutcome as CinderBackupOutcome;
use crate::cinder::restore::RestoreOutcome as CinderRestoreOutcome;
use crate::error::ErrorKind;
use crate::lightbits::journal::ReclaimReport;
use crate::limits::Budget;
use crate::native::check::CheckReport;
use crate::native::layout::{BackupStats, SourceInfo};
use crate::native::lifecycle::{ForgetReport, PruneReport};
use crate::native::maintain::RepairReport;
use crate::native::restore::RestoreStats;
use crate::native::verify::VerifyReport;

/// One line of the stream.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    /// The event's kind (`"event"`) and fields.
    #[serde(flatten)]
    pub body: Body<'a>,
    /// The command that emits it: `backup`, `restore`, `list`, ...
    pub command: &'a str,
}

/// The kinds of events, tagged by `"event"`.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Body<'a> {
    /// The job's settings, before any work.
    Start(&'a Start),
    /// Counters, about once a second.
    Progress(Counters),
    /// Something the operator should know; the job goes on.
    Warning {
        /// What happened.
        message: &'a str,
    },
    /// The command succeeded: the last line.
    Result(Finished<'a>),
    /// The command failed: the last line.
    Error(Failure<'a>),
}

/// The `progress` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Since the command started.
    pub elapsed_ms: u64,
    /// Bytes of the volume(s) the job moves.
    pub bytes_total: u64,
    /// Bytes read from the source(s).
    pub bytes_read: u64,
    /// Bytes of chunks not yet in the repository.
    pub bytes_new: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes downloaded.
    pub bytes_downloaded: u64,
    /// Bytes written to the target.
    pub bytes_restored: u64,
}

/// The `result` event: `exit_code` 0 and the command's payload.
#[derive(Debug, Serialize)]
pub struct Finished<'a> {
    /// Always 0.
    pub exit_code: u8,
    /// What the command did.
    #[serde(flatten)]
    pub done: &'a Done,
}

/// The `error` event.
#[derive(Debug, Serialize)]
pub struct Failure<'a> {
    /// The failure class.
    pub kind: ErrorKind,
    /// The process exit code it maps to.
    pub exit_code: u8,
    /// The whole message.
    pub message: &'a str,
    /// A command's findings (`verified`, `reclaim`), built with [`details`].
    #[serde(flatten)]
    pub details: Option<&'a Value>,
}

/// The `format` field of Cinder-format events (`"format": "cinder"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatName {
    /// OpenStack Cinder's S3 backup layout.
    Cinder,
}

/// The `start` fields of each command.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Start {
    /// `init`, `repair`: the repository.
    Repository {
        /// The store's description (`s3://…` or a directory).
        repository: String,
    },
    /// `verify`.
    Verify {
        /// The store's description.
        repository: String,
        /// The backups to verify.
        backup_ids: Vec<String>,
    },
    /// A native `backup`.
    Backup {
        /// The store's description.
        repository: String,
        /// The first source (its label for a Lightbits volume).
        source: String,
        /// Every source.
        sources: Vec<String>,
        /// The job's memory budget.
        budget: Budget,
    },
    /// A native `restore`.
    Restore {
        /// The store's description.
        repository: String,
        /// The backup restored.
        backup_id: String,
        /// The target path.
        target: String,
        /// The job's memory budget.
        budget: Budget,
    },
    /// A Cinder-format `backup`.
    CinderBackup {
        /// The store's description.
        repository: String,
        /// `cinder`.
        format: FormatName,
        /// The bucket.
        bucket: String,
        /// The source (its label for a Lightbits volume).
        source: String,
        /// The Cinder backup UUID.
        backup_id: String,
        /// The Cinder volume UUID.
        volume_id: String,
        /// The parent backup of an incremental, or null.
        parent_id: Option<String>,
        /// The compression name.
        compression: &'static str,
        /// The largest uncompressed object.
        object_size_bytes: u64,
        /// The job's memory budget.
        budget: Budget,
    },
    /// A Cinder-format `restore`.
    CinderRestore {
        /// The store's description.
        repository: String,
        /// `cinder`.
        format: FormatName,
        /// The bucket.
        bucket: String,
        /// The Cinder backup UUID.
        backup_id: String,
        /// The Cinder volume UUID.
        volume_id: String,
        /// The target path.
        target: String,
        /// The job's memory budget.
        budget: Budget,
    },
    /// `reclaim`.
    Reclaim {
        /// The journal directory.
        journal: String,
    },
}

/// The `result` fields of each command.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Done {
    /// `init`.
    Init {
        /// The store's description.
        repository: String,
        /// The new repository's id.
        repository_id: String,
        /// Its chunk size.
        chunk_size_bytes: u32,
        /// Its garbage-collection grace period.
        gc_grace_secs: u64,
    },
    /// `--help` or `--version` under `--json`: the text clap prints.
    Help {
        /// The text.
        help: String,
    },
    /// `list`.
    List {
        /// Every backup, oldest first.
        backups: Vec<ListEntry>,
    },
    /// `show`.
    Show {
        /// The manifest summary.
        backup: Shown,
    },
    /// `delete`.
    Delete {
        /// The backup deleted.
        backup_id: String,
    },
    /// `repair`.
    Repair {
        /// What it did.
        repair: RepairReport,
    },
    /// `forget`.
    Forget {
        /// What was kept and removed, and why.
        forget: ForgetReport,
    },
    /// `prune`.
    Prune {
        /// What was swept, condemned and left waiting.
        prune: PruneReport,
    },
    /// `check` (and the details of its `error`).
    Check {
        /// What was found.
        check: CheckReport,
    },
    /// `key list`.
    Keys {
        /// The key objects.
        keys: Vec<crate::native::keys::KeyInfo>,
    },
    /// `key add` and `key passwd`: the new key object.
    KeyAdded {
        /// Its id.
        key_id: String,
    },
    /// `key generate-file`.
    KeyFileWritten {
        /// Where it was written.
        path: String,
    },
    /// `key remove`.
    KeyRemoved {
        /// Its id.
        key_id: String,
    },
    /// `protect` and `unprotect`.
    Protection {
        /// The backups.
        backup_ids: Vec<String>,
        /// Whether they are now protected.
        protected: bool,
    },
    /// `verify` (and the details of its `error`).
    Verify {
        /// One report per backup.
        verified: Vec<VerifyReport>,
    },
    /// A native `backup`.
    Backup {
        /// Bytes uploaded, all sources together.
        bytes_uploaded: u64,
        /// Store requests retried.
        retries: u64,
        /// One entry per source.
        backups: Vec<BackedUp>,
        /// With a single source, its entry's fields also at the top level, as the simplest
        /// contract.
        #[serde(flatten)]
        single: Option<BackedUp>,
    },
    /// A native `restore`.
    Restore {
        /// The backup restored.
        backup_id: String,
        /// What it took.
        stats: RestoreStats,
        /// Store requests retried.
        retries: u64,
    },
    /// A Cinder-format `backup`.
    CinderBackup {
        /// The Cinder backup UUID.
        backup_id: String,
        /// The Cinder volume UUID.
        volume_id: String,
        /// The bucket.
        bucket: String,
        /// `cinder`.
        format: FormatName,
        /// The compression name.
        compression: &'static str,
        /// The source (its label for a Lightbits volume).
        source: String,
        /// What it wrote.
        stats: CinderBackupOutcome,
    },
    /// A Cinder-format `restore`.
    CinderRestore {
        /// The Cinder backup UUID.
        backup_id: String,
        /// `cinder`.
        format: FormatName,
        /// The restored backup's `volume_meta`.
        volume_meta: Option<String>,
        /// What it took.
        stats: CinderRestoreOutcome,
    },
    /// `cinder-record`.
    CinderRecord {
        /// The Cinder backup UUID.
        backup_id: String,
        /// The record's `backup_service`.
        backup_service: &'static str,
        /// The base64 record `cinder backup-import` takes.
        backup_url: String,
        /// The record, decoded.
        record: Value,
    },
    /// `reclaim` (and the details of its `error`).
    Reclaim {
        /// Each item and its outcome.
        reclaim: ReclaimReport,
    },
}

/// One entry of `list`: a backup, or one whose manifest is damaged.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ListEntry {
    /// A backup whose manifest verified.
    Backup(Listed),
    /// A backup whose manifest did not verify.
    Damaged {
        /// Its id.
        backup_id: String,
        /// What is wrong with its manifest.
        damaged: String,
    },
}

/// One backup of `list`.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// Its id.
    pub backup_id: String,
    /// When it completed (RFC 3339).
    pub completed_at: String,
    /// The volume's size.
    pub volume_size_bytes: u64,
    /// What it read from.
    pub source: String,
}

/// The manifest summary of `show`.
#[derive(Debug, Serialize)]
pub struct Shown {
    /// Its id.
    pub backup_id: String,
    /// What it read from.
    pub source: SourceInfo,
    /// The volume's size.
    pub volume_size_bytes: u64,
    /// The repository's chunk size.
    pub chunk_size_bytes: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it completed (RFC 3339).
    pub completed_at: String,
    /// Packs it references.
    pub pack_count: usize,
    /// What the backup run did.
    pub stats: BackupStats,
}

/// One source's backup of a native `backup`.
#[derive(Debug, Clone, Serialize)]
pub struct BackedUp {
    /// Its id.
    pub backup_id: String,
    /// What it read from.
    pub source: String,
    /// The volume's size.
    pub volume_size_bytes: u64,
    /// The engine that read it.
    pub io_engine: &'static str,
    /// Whether it was read with O_DIRECT.
    pub direct_io: bool,
    /// What the run did.
    pub stats: BackupStats,
    /// An incremental backup's parent and what it read (absent for a full read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<crate::native::layout::BaseInfo>,
}

/// `done` as the details of an `error` event (a JSON object merged into it).
///
/// # Panics
/// If a payload does not serialise, which would be a bug in these types.
pub fn details(done: &Done) -> Value {
    serde_json::to_value(done).expect("event payloads serialise")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line(body: Body<'_>) -> Value {
        serde_json::to_value(Event { body, command: "backup" }).unwrap()
    }

    #[test]
    fn events_are_flat_objects_tagged_by_event() {
        let start = Start::Reclaim { journal: "/j".into() };
        assert_eq!(
            line(Body::Start(&start)),
            json!({"event": "start", "command": "backup", "journal": "/j"})
        );
        assert_eq!(
            line(Body::Warning { message: "m" }),
            json!({"event": "warning", "command": "backup", "message": "m"})
        );
        let done = Done::Delete { backup_id: "b".into() };
        assert_eq!(
            line(Body::Result(Finished { exit_code: 0, done: &done })),
            json!({"event": "result", "command": "backup", "exit_code": 0, "backup_id": "b"})
        );
        let details = details(&Done::Verify { verified: Vec::new() });
        let failure = Failure {
            kind: ErrorKind::Integrity,
            exit_code: 5,
            message: "bad",
            details: Some(&details),
        };
        assert_eq!(
            line(Body::Error(failure)),
            json!({"event": "error", "command": "backup", "kind": "integrity", "exit_code": 5,
                   "message": "bad", "verified": []})
        );
        let plain = Failure { kind: ErrorKind::Usage, exit_code: 2, message: "x", details: None };
        assert_eq!(line(Body::Error(plain)).as_object().unwrap().len(), 5);
    }

    #[test]
    fn a_single_backup_repeats_its_fields_at_the_top_level() {
        let one = BackedUp {
            backup_id: "b".into(),
            source: "/dev/x".into(),
            volume_size_bytes: 1,
            io_engine: "pread",
            direct_io: true,
            stats: BackupStats::default(),
            base: None,
        };
        let done = Done::Backup {
            bytes_uploaded: 2,
            retries: 0,
            backups: vec![one.clone()],
            single: Some(one),
        };
        let value = serde_json::to_value(&done).unwrap();
        assert_eq!(value["backup_id"], "b");
        assert_eq!(value["backups"][0]["io_engine"], "pread");
        assert_eq!(value["format"], Value::Null);
        let cinder = Start::CinderRestore {
            repository: "s3://b".into(),
            format: FormatName::Cinder,
            bucket: "b".into(),
            backup_id: "i".into(),
            volume_id: "v".into(),
            target: "/t".into(),
            budget: Budget::native_restore(4 << 20, 1),
        };
        let value = serde_json::to_value(&cinder).unwrap();
        assert_eq!(value["format"], "cinder");
        assert!(value["budget"]["total_bytes"].as_u64().unwrap() > 0);
    }
}
