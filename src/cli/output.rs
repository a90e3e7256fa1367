//! Everything `ferry` writes to stdout, and the exit codes. With `--json`, stdout is a JSON Lines
//! stream of `events::Event`s whose last line is a `result` or an `error` event; without it, a
//! progress line on a terminal (stderr) and a human summary. Logs and warnings always go to
//! stderr.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use super::events::{Body, Counters, Done, Event, Failure, Finished, Start};
use crate::error::{EngineError, ErrorKind};
use crate::progress::Progress;

/// Process exit codes: stable, documented in README.md, one per failure class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The command succeeded.
    Ok = 0,
    /// A bug in ferry (broken invariant).
    Internal = 1,
    /// Invalid arguments or configuration.
    Usage = 2,
    /// The source or target device failed.
    Device = 3,
    /// The object store failed (unreachable, credentials refused, S3 errors).
    Store = 4,
    /// Stored data failed verification.
    Integrity = 5,
    /// Cancelled by SIGINT/SIGTERM.
    Cancelled = 6,
    /// The repository or backup does not exist.
    NotFound = 7,
    /// Refused to protect data (target too small, target holds data without --force, ...).
    Refused = 8,
    /// The storage cluster (Lightbits) control API failed.
    Cluster = 9,
    /// An encrypted repository's key objects refuse the passphrase given (or none is readable).
    KeyRefused = 10,
    /// Key material missing (an encrypted repository, no passphrase) or misplaced (a
    /// passphrase for an unencrypted repository).
    KeyNeeded = 11,
}

impl ExitCode {
    /// The exit code for an error class.
    pub fn from_kind(kind: ErrorKind) -> ExitCode {
        match kind {
            ErrorKind::Internal => ExitCode::Internal,
            ErrorKind::Usage => ExitCode::Usage,
            ErrorKind::Device => ExitCode::Device,
            ErrorKind::Store => ExitCode::Store,
            ErrorKind::Integrity => ExitCode::Integrity,
            ErrorKind::Cancelled => ExitCode::Cancelled,
            ErrorKind::NotFound => ExitCode::NotFound,
            ErrorKind::Refused => ExitCode::Refused,
            ErrorKind::Cluster => ExitCode::Cluster,
            ErrorKind::KeyRefused => ExitCode::KeyRefused,
            ErrorKind::KeyNeeded => ExitCode::KeyNeeded,
        }
    }
}

/// Writes events to stdout (JSON) or a human rendering.
#[derive(Debug)]
pub struct Output {
    json: bool,
    progress_line: bool,
    started: Instant,
    command: &'static str,
    lock: Mutex<()>,
}

impl Output {
    /// An output for `command`; `json` selects JSON Lines.
    pub fn new(json: bool, command: &'static str) -> Output {
        Output {
            json,
            progress_line: !json && std::io::stderr().is_terminal(),
            started: Instant::now(),
            command,
            lock: Mutex::new(()),
        }
    }

    /// Whether events go out as JSON Lines.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// True when a progress line is drawn on a terminal.
    pub fn live(&self) -> bool {
        self.progress_line
    }

    fn emit(&self, body: Body<'_>) {
        let line = serde_json::to_string(&Event { body, command: self.command })
            .expect("events serialise");
        let _guard = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (orchestrator went away) is not an error of the job.
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }

    /// The `start` event.
    pub fn start(&self, start: Start) {
        if self.json {
            self.emit(Body::Start(&start));
        }
    }

    /// A `warning` event (JSON) or a line on stderr.
    pub fn warning(&self, message: &str) {
        let message = &super::secrets::scrub(message);
        if self.json {
            self.emit(Body::Warning { message });
        } else {
            self.clear_line();
            eprintln!("ferry: warning: {message}");
        }
    }

    /// A `progress` event, or a redrawn progress line on a terminal.
    pub fn progress(&self, progress: &Progress) {
        let elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let total = Progress::get(&progress.bytes_total);
        let done = Progress::get(&progress.bytes_read).max(Progress::get(&progress.bytes_restored));
        if self.json {
            self.emit(Body::Progress(Counters {
                elapsed_ms,
                bytes_total: total,
                bytes_read: Progress::get(&progress.bytes_read),
                bytes_new: Progress::get(&progress.bytes_new),
                bytes_uploaded: Progress::get(&progress.bytes_uploaded),
                bytes_downloaded: Progress::get(&progress.bytes_downloaded),
                bytes_restored: Progress::get(&progress.bytes_restored),
            }));
        } else if self.progress_line && total > 0 {
            let percent = done.min(total) * 100 / total;
            let width = 30u64;
            let filled = usize::try_from(percent * width / 100).unwrap_or(0);
            let rate = done as f64 / 1e6 / self.started.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\r[{}{}] {percent:>3}% {:.1}/{:.1} GB {rate:.0} MB/s up {:.1} MB ",
                "#".repeat(filled),
                " ".repeat(30 - filled),
                done as f64 / 1e9,
                total as f64 / 1e9,
                Progress::get(&progress.bytes_uploaded) as f64 / 1e6
            );
        }
    }

    fn clear_line(&self) {
        if self.progress_line {
            eprint!("\r{}\r", " ".repeat(100));
        }
    }

    /// The final `result` event, or `summary` printed for people.
    pub fn result(&self, done: Done, summary: &str) {
        if self.json {
            self.emit(Body::Result(Finished { exit_code: ExitCode::Ok as u8, done: &done }));
        } else {
            self.clear_line();
            if !summary.is_empty() {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{summary}");
            }
        }
    }

    /// The final `error` event (JSON) or an error line on stderr; returns the exit code.
    pub fn error(&self, error: &EngineError) -> ExitCode {
        let code = ExitCode::from_kind(error.kind);
        let message = super::secrets::scrub(&error.message);
        if self.json {
            self.emit(Body::Error(Failure {
                kind: error.kind,
                exit_code: code as u8,
                message: &message,
                details: error.details.as_ref(),
            }));
        } else {
            self.clear_line();
        }
        eprintln!("ferry: error: {message}");
        code
    }

    /// Ends the process at once with `error` as the final event: the event is written while
    /// holding the output lock, which is never released, so no other thread can print after it.
    pub fn exit_now(&self, error: &EngineError) -> ! {
        let code = ExitCode::from_kind(error.kind);
        let message = super::secrets::scrub(&error.message);
        let body = Body::Error(Failure {
            kind: error.kind,
            exit_code: code as u8,
            message: &message,
            details: error.details.as_ref(),
        });
        let line = serde_json::to_string(&Event { body, command: self.command })
            .expect("events serialise");
        let guard = self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.json {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        } else {
            self.clear_line();
        }
        eprintln!("ferry: error: {message}");
        std::mem::forget(guard);
        std::process::exit(i32::from(code as u8))
    }
}
