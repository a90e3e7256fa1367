//! Job control: the first failure wins, one abort flag stops every thread, and the calling thread
//! relays the caller's cancel flag into it at one poll interval.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::error::{EngineError, ErrorKind};

/// How often a job's calling thread checks the caller's cancel flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Locks `mutex`, ignoring poisoning (a panicking thread aborts the process: `panic = "abort"`).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The abort flag and first failure of one job, shared by all its threads.
#[derive(Debug, Default)]
pub struct JobControl {
    /// Set on the first failure or on cancellation; every thread stops soon after.
    abort: AtomicBool,
    failure: Mutex<Option<EngineError>>,
}

impl JobControl {
    /// A job that has not failed.
    pub fn new() -> JobControl {
        JobControl::default()
    }

    /// Records `error` unless an earlier failure is recorded, and stops the job.
    pub fn fail(&self, error: EngineError) {
        let _ = lock(&self.failure).get_or_insert(error);
        self.stop();
    }

    /// Stops the job without a failure (cancellation, or a stage that ended early).
    pub fn stop(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }

    /// Whether the job is stopping.
    pub fn stopped(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// The flag the `io` reader and writer poll.
    pub fn flag(&self) -> &AtomicBool {
        &self.abort
    }

    /// Stops the job if `cancel` is set; returns whether it is.
    pub fn relay(&self, cancel: &AtomicBool) -> bool {
        let cancelled = cancel.load(Ordering::Relaxed);
        if cancelled {
            self.stop();
        }
        cancelled
    }

    /// Receives from `rx`, relaying `cancel` every `POLL_INTERVAL` while waiting. `None` once the
    /// channel is closed and empty.
    pub fn recv_relaying<T>(&self, rx: &Receiver<T>, cancel: &AtomicBool) -> Option<T> {
        loop {
            let _ = self.relay(cancel);
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(item) => return Some(item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits until `finished()` holds, relaying `cancel` every `POLL_INTERVAL`.
    pub fn watch(&self, cancel: &AtomicBool, finished: impl Fn() -> bool) {
        while !finished() {
            let _ = self.relay(cancel);
            std::thread::park_timeout(POLL_INTERVAL);
        }
    }

    /// The job's outcome once its threads have ended: the first failure, else `Cancelled` when
    /// `cancel` is set (`what` says what the cancelled job left), else any stop without a
    /// recorded failure is an internal error.
    ///
    /// # Errors
    /// As described.
    pub fn outcome(&self, cancel: &AtomicBool, what: &str) -> Result<(), EngineError> {
        let failure = lock(&self.failure).take();
        let cancelled = cancel.load(Ordering::SeqCst);
        match failure {
            Some(error) if error.kind != ErrorKind::Cancelled || !cancelled => Err(error),
            _ if cancelled => Err(EngineError::new(ErrorKind::Cancelled, what.to_owned())),
            Some(error) => Err(error),
            None if self.stopped() => {
                Err(EngineError::new(ErrorKind::Internal, "a pipeline stage stopped early"))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_failure_wins_and_cancel_is_reported() {
        let control = JobControl::new();
        let cancel = AtomicBool::new(false);
        assert!(control.outcome(&cancel, "x").is_ok());
        control.fail(EngineError::new(ErrorKind::Store, "first"));
        control.fail(EngineError::new(ErrorKind::Device, "second"));
        assert!(control.stopped());
        let error = control.outcome(&cancel, "x").unwrap_err();
        assert_eq!((error.kind, error.message.as_str()), (ErrorKind::Store, "first"));

        let control = JobControl::new();
        cancel.store(true, Ordering::SeqCst);
        assert!(control.relay(&cancel));
        assert!(control.stopped());
        assert_eq!(control.outcome(&cancel, "gone").unwrap_err().kind, ErrorKind::Cancelled);

        let control = JobControl::new();
        control.stop();
        let idle = AtomicBool::new(false);
        assert_eq!(control.outcome(&idle, "x").unwrap_err().kind, ErrorKind::Internal);
    }
}
