//! Error classification shared by every module: the failure class (`ErrorKind`), whether a retry
//! can help (`Status`), and the one top-level error type, `EngineError`.
//!
//! Module errors (`IoError`, `StoreError`, `FormatError`, ...) stay typed and carry their context;
//! they convert into `EngineError` at the job boundary. This module does not decide exit codes:
//! `cli` maps `ErrorKind` to the documented process exit code.

use std::fmt;

/// The class of a failure, which is what an orchestrator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A broken invariant inside ferry: a bug.
    Internal,
    /// Bad arguments, configuration or input that the operator must fix.
    Usage,
    /// The source or target device (or image file) failed: open, read, write, size.
    Device,
    /// The object store failed: unreachable, refused credentials, S3 errors.
    Store,
    /// Stored data does not match its checksum or hash, or does not parse.
    Integrity,
    /// The job was cancelled by SIGINT or SIGTERM.
    Cancelled,
    /// The repository or backup named does not exist.
    NotFound,
    /// The job was refused to protect data: target too small, target holds data without
    /// `--force`, repository already initialised.
    Refused,
    /// The storage cluster's control API failed: unreachable, token refused, a resource stuck or
    /// failed, a local journal of cluster resources that cannot be written.
    Cluster,
    /// No key object of an encrypted repository opens with the passphrase or key file given (a
    /// wrong one, or `keys/` gone or unreadable).
    KeyRefused,
    /// An encrypted repository and no passphrase (`FERRY_PASSPHRASE`, `FERRY_PASSPHRASE_FILE`,
    /// or a terminal to prompt on) nor key file (`--key-file`, `FERRY_KEY_FILE`), or one given
    /// for a repository that is not encrypted.
    KeyNeeded,
}

/// Whether repeating the failed operation can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Retrying cannot help.
    Permanent,
    /// A retry (after backoff) may succeed: throttling, 5xx, timeouts, resets.
    Transient,
}

/// The error every job returns: a failure class plus a human-readable chain of context.
#[derive(Debug)]
pub struct EngineError {
    /// What class of failure this is.
    pub kind: ErrorKind,
    /// The full message, outermost context first.
    pub message: String,
    /// Structured details for the JSON `error` event (for example what `verify` found).
    pub details: Option<serde_json::Value>,
}

impl EngineError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        EngineError { kind, message: message.into(), details: None }
    }

    /// Attaches structured details (a JSON object merged into the `error` event).
    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Prefixes the message with `context` (for example the backup id or the device path).
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EngineError {}

/// Implemented by every module error so that `EngineError` and the retry loops can classify it
/// without matching on another module's variants.
pub trait Classify: std::error::Error {
    /// The failure class.
    fn kind(&self) -> ErrorKind;
    /// Whether a retry may help.
    fn status(&self) -> Status {
        Status::Permanent
    }
}

/// Renders an error with its whole `source()` chain, `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

impl<E: Classify> From<E> for EngineError {
    fn from(error: E) -> Self {
        EngineError { kind: error.kind(), message: chain(&error), details: None }
    }
}
