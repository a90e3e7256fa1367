//! The parallel fetch loop of restores: `count` threads take the next job in order until the
//! list is done or the job stops; the first failure stops them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::Scope;

use super::JobControl;
use crate::error::EngineError;

/// Spawns `count` fetchers on `scope` that run `fetch` on every job of `jobs` (each once, roughly
/// in order). `make` builds each fetcher's private state (its channel ends, say) once.
pub fn fetch_parallel<'scope, J, S>(
    scope: &'scope Scope<'scope, '_>,
    count: usize,
    jobs: &'scope [J],
    control: &'scope JobControl,
    make: impl Fn() -> S,
    fetch: impl Fn(&mut S, &J) -> Result<(), EngineError> + Send + Copy + 'scope,
) where
    J: Sync,
    S: Send + 'scope,
{
    let next = Arc::new(AtomicUsize::new(0));
    for _ in 0..count.max(1) {
        let mut state = make();
        let next = Arc::clone(&next);
        let _ = scope.spawn(move || {
            while !control.stopped() {
                let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                if let Err(error) = fetch(&mut state, job) {
                    control.fail(error);
                }
            }
        });
    }
}
