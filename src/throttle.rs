//! `Throttle`: a byte-rate limit shared by threads (a token bucket in its GCRA form: one
//! timestamp, no refill thread). Each `take(n)` books `n / rate` seconds of the link; a caller
//! sleeps only for the part of its booking that runs past the allowed burst, so a steady stream
//! of requests is spaced evenly instead of bursting and then stalling.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest single sleep, so a cancelled job notices promptly.
const SLEEP_SLICE: Duration = Duration::from_millis(100);

/// A shared byte-rate limit.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_second: f64,
    burst: Duration,
    /// When the link is booked until ("theoretical arrival time").
    booked_until: Mutex<Option<Instant>>,
}

impl Throttle {
    /// A limit of `bytes_per_second`, letting through up to `burst_bytes` at once.
    ///
    /// # Panics
    /// If `bytes_per_second` is zero.
    pub fn new(bytes_per_second: u64, burst_bytes: u64) -> Throttle {
        assert!(bytes_per_second > 0, "a rate limit needs a positive rate");
        let rate = bytes_per_second as f64;
        Throttle {
            bytes_per_second: rate,
            burst: Duration::from_secs_f64(burst_bytes as f64 / rate),
            booked_until: Mutex::new(None),
        }
    }

    /// The configured rate.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second as u64
    }

    /// Books `bytes` and waits until they may pass (or `cancel` is set).
    pub fn take(&self, bytes: u64, cancel: &AtomicBool) {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second);
        let release = {
            let mut booked = self.booked_until.lock().unwrap_or_else(|e| e.into_inner());
            let start = booked.map_or(now, |until| until.max(now));
            *booked = Some(start + cost);
            // It may go once no more than `burst` of earlier bookings lies ahead of it.
            start.checked_sub(self.burst).map_or(now, |release| release.max(now))
        };
        while !cancel.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= release {
                break;
            }
            std::thread::sleep((release - now).min(SLEEP_SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A stream of takes runs at the configured rate, whatever the chunking, within 10%.
    #[test]
    fn paces_to_the_rate() {
        let throttle = Throttle::new(40 << 20, 1 << 20);
        let cancel = AtomicBool::new(false);
        let started = Instant::now();
        for _ in 0..20 {
            throttle.take(1 << 20, &cancel);
        }
        // 20 MiB at 40 MiB/s: 0.5 s, less the first MiB of burst.
        let elapsed = started.elapsed().as_secs_f64();
        assert!((0.42..1.5).contains(&elapsed), "took {elapsed} s");
    }

    // Threads share the limit: four takers together get the rate, not four times it.
    #[test]
    fn threads_share_the_rate() {
        let throttle = Throttle::new(40 << 20, 1 << 20);
        let cancel = AtomicBool::new(false);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let _ = scope.spawn(|| {
                    for _ in 0..5 {
                        throttle.take(1 << 20, &cancel);
                    }
                });
            }
        });
        let elapsed = started.elapsed().as_secs_f64();
        assert!((0.42..1.5).contains(&elapsed), "took {elapsed} s");
    }

    // Cancelling ends the wait.
    #[test]
    fn cancel_ends_the_wait() {
        let throttle = Throttle::new(1 << 20, 0);
        let cancel = AtomicBool::new(true);
        let started = Instant::now();
        throttle.take(100 << 20, &cancel);
        throttle.take(100 << 20, &cancel);
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
