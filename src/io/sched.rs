//! Thread pinning with `sched_setaffinity`/`sched_getaffinity`, for the caller's dedicated device
//! threads. It does not choose which thread to pin and does not change scheduling priority.

use std::sync::Mutex;

/// CPUs of the calling thread's affinity mask, ascending; empty if the call fails.
pub(crate) fn current_affinity() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zero is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size passed is that of `set`, a live, writable
    // cpu_set_t the kernel fills for the duration of the call.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu < CPU_SETSIZE`, so CPU_ISSET reads a bit inside `set`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Threads pinned by `pin_current_thread(None)` so far, per CPU number.
static AUTO_PINNED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The CPU of `allowed` with the fewest automatic pins (lowest CPU first on ties).
pub(crate) fn least_pinned(allowed: &[usize], pinned: &[usize]) -> Option<usize> {
    allowed.iter().copied().min_by_key(|&cpu| (pinned.get(cpu).copied().unwrap_or(0), cpu))
}

pub(crate) fn pin_current_thread(cpu: Option<usize>) -> bool {
    let target = match cpu {
        Some(cpu) => cpu,
        None => {
            let allowed = current_affinity();
            let mut pinned = AUTO_PINNED.lock().unwrap_or_else(|poison| poison.into_inner());
            let Some(cpu) = least_pinned(&allowed, &pinned) else { return false };
            if !set_affinity(cpu) {
                return false;
            }
            if pinned.len() <= cpu {
                pinned.resize(cpu + 1, 0);
            }
            pinned[cpu] += 1;
            return true;
        }
    };
    set_affinity(target)
}

fn set_affinity(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zero is a valid (empty) value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` (checked above), so CPU_SET writes a bit inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a live cpu_set_t of the size passed, only read
    // by the kernel.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_to_each_allowed_cpu_is_reported_by_getaffinity() {
        std::thread::spawn(|| {
            let allowed = current_affinity();
            assert!(!allowed.is_empty(), "the thread may run somewhere");
            for &cpu in &allowed {
                assert!(crate::io::pin_current_thread(Some(cpu)), "pin to {cpu}");
                assert_eq!(current_affinity(), vec![cpu]);
            }
            // a CPU that does not exist is refused and nothing changes
            let last = *allowed.last().expect("non-empty");
            assert!(!crate::io::pin_current_thread(Some(libc::CPU_SETSIZE as usize - 1)));
            assert!(!crate::io::pin_current_thread(Some(usize::MAX)));
            assert_eq!(current_affinity(), vec![last]);
        })
        .join()
        .expect("pinning thread");
    }

    #[test]
    fn automatic_pin_picks_exactly_one_allowed_cpu() {
        std::thread::spawn(|| {
            let allowed = current_affinity();
            assert!(crate::io::pin_current_thread(None));
            let now = current_affinity();
            assert_eq!(now.len(), 1, "{now:?}");
            assert!(allowed.contains(&now[0]));
        })
        .join()
        .expect("pinning thread");
    }

    #[test]
    fn least_pinned_spreads_round_robin() {
        assert_eq!(least_pinned(&[0, 1], &[]), Some(0));
        assert_eq!(least_pinned(&[0, 1], &[1]), Some(1));
        assert_eq!(least_pinned(&[0, 1], &[1, 1]), Some(0));
        assert_eq!(least_pinned(&[2, 3], &[0, 0, 5, 1]), Some(3));
        assert_eq!(least_pinned(&[], &[]), None);
    }
}
