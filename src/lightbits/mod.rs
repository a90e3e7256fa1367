//! The Lightbits (LightOS) control layer: obtain a local block device for a cluster volume before a
//! job starts, and leave nothing behind after it ends.
//!
//! Brief overview:
//! - [`client::Client`] speaks the cluster's REST API v2 (failover over several API addresses,
//!   bounded retries, `If-Match` updates, 1 s polling with the reference's state sets).
//! - [`attach`] is the host side: the discovery-client file or `nvme connect`, then the device found
//!   by the volume UUID.
//! - [`journal::Journal`] records every resource ferry is about to create, before it creates it, so
//!   that [`journal::reclaim`] can undo a run that was killed.
//! - [`flow`] strings these together: [`flow::prepare_backup_source`] (snapshot → clone → attach)
//!   and [`flow::prepare_restore_target`] (ACL → attach), each returning a guard whose `finish`
//!   undoes exactly what was done.
//!
//! This module deliberately does not read or write volume data: the data plane only ever receives
//! a device path.

pub mod attach;
pub mod client;
pub mod flow;
pub mod journal;
pub mod model;

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Classify, ErrorKind, Status};

/// Everything that can fail in the Lightbits control layer.
///
/// Variants name the failed step and carry the context an operator needs (operation, volume,
/// path); they never carry the token.
#[derive(Debug, thiserror::Error)]
pub enum LightbitsError {
    /// The configuration is unusable (what is wrong is in the message).
    #[error("lightbits configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The API token could not be read from its file or environment variable.
    #[error("lightbits token from {origin}: {message}")]
    Token {
        /// `file <path>` or `env <NAME>` (never the token itself).
        origin: String,
        /// Why it could not be read.
        message: String,
    },
    /// The host NQN could not be read.
    #[error("host nqn from {path}: {source}")]
    HostNqn {
        /// The file that was read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The cluster refused the token (HTTP 401).
    #[error("{operation}: the cluster refused the token (HTTP 401)")]
    Unauthorized {
        /// The API operation.
        operation: String,
    },
    /// The token is valid but not allowed to do this (HTTP 403).
    #[error("{operation}: forbidden for this token (HTTP 403)")]
    Forbidden {
        /// The API operation.
        operation: String,
    },
    /// No volume with this name or UUID exists in the project.
    #[error("lightbits volume {volume} not found in project {project}")]
    VolumeNotFound {
        /// The name or UUID asked for.
        volume: String,
        /// The project searched.
        project: String,
    },
    /// The cluster reported a name conflict that re-reading by name could not resolve.
    #[error("{operation}: {name} already exists and could not be read back (HTTP 409)")]
    Conflict {
        /// The API operation.
        operation: String,
        /// The conflicting name.
        name: String,
    },
    /// No API address answered.
    #[error("{operation}: no lightbits api address answered ({addresses}): {last_error}")]
    Unreachable {
        /// The API operation.
        operation: String,
        /// The addresses tried, comma-separated.
        addresses: String,
        /// The last transport error.
        last_error: String,
    },
    /// The cluster answered with an unexpected HTTP status.
    #[error("{operation}: http {status}: {body}")]
    Http {
        /// The API operation.
        operation: String,
        /// The HTTP status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The cluster answered with a body that does not parse.
    #[error("{operation}: unexpected response: {message}")]
    Protocol {
        /// The API operation.
        operation: String,
        /// What did not parse.
        message: String,
    },
    /// A wait (for a state, a deletion, an ACL, a device) ran out of time.
    #[error("timed out after {waited:?} waiting for {what} (last seen: {last_seen})")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        waited: Duration,
        /// The last state or answer seen.
        last_seen: String,
    },
    /// A volume or snapshot reached a state it cannot succeed from.
    #[error("{what} reached state {state}")]
    Failed {
        /// The resource (kind and name).
        what: String,
        /// The state it reached.
        state: String,
    },
    /// The restore target is attached to other hosts and `--force` was not given.
    #[error("volume {volume} is attached elsewhere (acl {acl:?}); use --force to restore into it")]
    AttachedElsewhere {
        /// The volume name.
        volume: String,
        /// Its current ACL values.
        acl: Vec<String>,
    },
    /// Another ferry job on this host is using the volume (backing it up or restoring into it).
    #[error(
        "lightbits volume {volume} is in use by another ferry job on this host ({holder}); \
         refused: one job per volume at a time, run it again once that job has finished"
    )]
    Busy {
        /// The volume name.
        volume: String,
        /// Who holds it (job id and pid), as the holder wrote it.
        holder: String,
    },
    /// The block device of a volume did not appear.
    #[error("no block device for volume {uuid} after {waited:?} (looked in {looked_in})")]
    DeviceNotFound {
        /// The volume UUID.
        uuid: String,
        /// How long it waited.
        waited: Duration,
        /// Where it looked.
        looked_in: String,
    },
    /// A helper command (`nvme`, `blockdev`) could not run or failed.
    #[error("{command}: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        message: String,
    },
    /// A local file operation failed (discovery file, device flush, journal).
    #[error("{operation} {path}: {source}")]
    LocalIo {
        /// What was being done.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The cluster does not serve the changed-blocks call (HTTP 404 or 501: an older LightOS,
    /// or a snapshot gone meanwhile).
    #[error("the cluster does not serve the changed-blocks diff (HTTP {status}: {body})")]
    DiffUnavailable {
        /// 404 or 501.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The job was cancelled while waiting.
    #[error("cancelled while {operation}")]
    Cancelled {
        /// What was in progress.
        operation: String,
    },
}

impl Classify for LightbitsError {
    fn kind(&self) -> ErrorKind {
        match self {
            LightbitsError::Config { .. }
            | LightbitsError::Token { .. }
            | LightbitsError::HostNqn { .. } => ErrorKind::Usage,
            LightbitsError::VolumeNotFound { .. } => ErrorKind::NotFound,
            LightbitsError::AttachedElsewhere { .. } | LightbitsError::Busy { .. } => {
                ErrorKind::Refused
            }
            LightbitsError::DeviceNotFound { .. } | LightbitsError::Command { .. } => {
                ErrorKind::Device
            }
            LightbitsError::Cancelled { .. } => ErrorKind::Cancelled,
            LightbitsError::Unauthorized { .. }
            | LightbitsError::Forbidden { .. }
            | LightbitsError::Conflict { .. }
            | LightbitsError::Unreachable { .. }
            | LightbitsError::Http { .. }
            | LightbitsError::DiffUnavailable { .. }
            | LightbitsError::Protocol { .. }
            | LightbitsError::Timeout { .. }
            | LightbitsError::Failed { .. }
            | LightbitsError::LocalIo { .. } => ErrorKind::Cluster,
        }
    }

    fn status(&self) -> Status {
        match self {
            LightbitsError::Unreachable { .. } | LightbitsError::Timeout { .. } => {
                Status::Transient
            }
            LightbitsError::Http { status, .. } if *status >= 500 => Status::Transient,
            _ => Status::Permanent,
        }
    }
}

/// Result of this module.
pub type Result<T, E = LightbitsError> = std::result::Result<T, E>;

/// Longest resource name ferry creates. GUESS: the reference gives no limit; 63 is the common
/// DNS-label bound, and Cinder's own names (`volume-<uuid>`, 43 characters) fit well inside it.
pub const NAME_LENGTH_MAX: usize = 63;

/// Prefix of the temporary snapshot of a backup.
pub const SNAPSHOT_PREFIX: &str = "ferry-snap-";

/// Prefix of the temporary clone volume of a backup.
pub const CLONE_PREFIX: &str = "ferry-clone-";

/// The name of a resource ferry creates for `job_id`: `<prefix><job_id>`, recognisable and unique
/// per job.
///
/// Only ASCII letters, digits, `-` and `_` are used (Cinder's names `volume-<id>` and
/// `for_clone_<id>` show the cluster accepts those). A job id too long for [`NAME_LENGTH_MAX`] is
/// shortened and suffixed with 16 hex digits of its FNV-1a hash, so distinct ids keep distinct
/// names.
///
/// # Errors
///
/// [`LightbitsError::Config`] if `job_id` is empty or has other characters.
pub fn resource_name(prefix: &str, job_id: &str) -> Result<String> {
    let valid = !job_id.is_empty()
        && job_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if !valid {
        return Err(LightbitsError::Config {
            message: format!("job id {job_id:?} must be non-empty ASCII letters, digits, - or _"),
        });
    }
    let name = format!("{prefix}{job_id}");
    if name.len() <= NAME_LENGTH_MAX {
        return Ok(name);
    }
    let hash = job_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    });
    let keep = NAME_LENGTH_MAX - prefix.len() - 17;
    Ok(format!("{prefix}{}-{hash:016x}", &job_id[..keep]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names carry the job id, stay within the length bound, and long ids stay distinct.
    #[test]
    fn resource_names() {
        assert_eq!(
            resource_name(CLONE_PREFIX, "20260101T000000Z-ab").unwrap(),
            "ferry-clone-20260101T000000Z-ab"
        );
        let long_a = "a".repeat(128);
        let long_b = format!("{}b", "a".repeat(127));
        let name_a = resource_name(SNAPSHOT_PREFIX, &long_a).unwrap();
        let name_b = resource_name(SNAPSHOT_PREFIX, &long_b).unwrap();
        assert_eq!(name_a.len(), NAME_LENGTH_MAX);
        assert!(name_a.starts_with("ferry-snap-aaaa"));
        assert_ne!(name_a, name_b);
        assert!(resource_name(CLONE_PREFIX, "a/b").is_err());
        assert!(resource_name(CLONE_PREFIX, "").is_err());
    }

    /// The proposed exit categories: unknown volume → not found, attached elsewhere → refused,
    /// unreachable → transient cluster failure.
    #[test]
    fn classification() {
        let not_found = LightbitsError::VolumeNotFound { volume: "v".into(), project: "p".into() };
        assert_eq!(not_found.kind(), ErrorKind::NotFound);
        let elsewhere = LightbitsError::AttachedElsewhere { volume: "v".into(), acl: vec![] };
        assert_eq!(elsewhere.kind(), ErrorKind::Refused);
        let unreachable = LightbitsError::Unreachable {
            operation: "x".into(),
            addresses: "a".into(),
            last_error: "e".into(),
        };
        assert_eq!(unreachable.kind(), ErrorKind::Cluster);
        assert_eq!(unreachable.status(), Status::Transient);
    }
}
