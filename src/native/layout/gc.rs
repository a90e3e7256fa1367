//! Garbage collection's part of the format: the time rules every writer and every prune obey,
//! the keys of marks, protections and clock probes, and the mark document. Pure: no I/O, no
//! clock. `FORMAT.md` ("Garbage collection") states the same rules as invariants.
//!
//! Every time below is the object store's (an object's `LastModified`), never a host's clock.

use serde::{Deserialize, Serialize};

use super::{FormatError, PackId, backup_id_valid};

/// Prefix of marks: `gc/mark-<32 hex>`.
pub const GC_PREFIX: &str = "gc/";
const MARK_PREFIX: &str = "gc/mark-";
/// Prefix of clock probes: `clock/<32 hex>`, written and deleted at once to read the store's
/// clock (the probe's `LastModified`).
pub const CLOCK_PREFIX: &str = "clock/";
/// Prefix of protections: `protected/<backup-id>` keeps a backup from every retention policy.
pub const PROTECTED_PREFIX: &str = "protected/";

/// The grace period of a repository whose config names none (made before it was a setting), and
/// the default of `ferry init --gc-grace`: rustic uses 23 h, Kopia and Proxmox Backup Server 24 h.
pub const GRACE_SECS_DEFAULT: u64 = 24 * 3600;
/// The shortest grace a repository may choose. Store times are whole seconds, stamped at a
/// request's start; below this the margins would be as coarse as the clock. Meant for tests that
/// must see space come back; a repository in use wants hours.
pub const GRACE_SECS_MIN: u64 = 10;
/// The longest grace a repository may choose (a year): packs of forgotten backups come back
/// after two prunes at least this far apart.
pub const GRACE_SECS_MAX: u64 = 366 * 24 * 3600;
/// No visibility margin is shorter than this: a `LastModified` is truncated to the second, and
/// two times compared may each be off by one.
const MARGIN_SECS_MIN: u64 = 2;
/// A lease from another host counts as live at least this long, whatever the grace: a job on
/// another host is presumed dead only after it, so its multipart uploads are not aborted and its
/// lease keeps a sweep waiting while it may still run.
const LEASE_FOREIGN_MAX_AGE_SECS_MIN: u64 = 24 * 3600;

/// The time rules of one repository, all derived from its grace period (the config's
/// `gc_grace_secs`), so every host that opens the repository obeys the same ones. With the
/// default grace of 24 h: `MAX_BACKUP` 20 h, margin 30 min, minimum pack age 1 h, foreign lease
/// 24 h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcTiming {
    /// A pack condemned by a mark is deleted only once the mark is at least this old.
    pub grace_secs: u64,
    /// A backup that has run longer than this when it is about to commit re-validates every pack
    /// its manifests reference (and stores again what is missing or condemned) before committing.
    pub max_backup_secs: u64,
    /// How much earlier than its visibility an object's `LastModified` may be (S3 stamps the
    /// start of a request), plus the time from a backup's last store-clock reading to its
    /// manifest being visible.
    pub margin_secs: u64,
    /// An unreferenced pack younger than this is not condemned: a running backup may be about to
    /// reference it (a pack is uploaded before its index and long before its manifest).
    pub min_pack_age_secs: u64,
    /// A lease from another host counts as live for this long after it was written (by the
    /// store's clock): no heartbeat crosses hosts.
    pub lease_foreign_max_age_secs: u64,
}

impl GcTiming {
    /// The rules of a repository with the default grace (and of one whose config names none).
    pub const DEFAULT: GcTiming = GcTiming::derive(GRACE_SECS_DEFAULT);

    /// The rules for `grace_secs`: margin 1/48 of the grace (at least 2 s), `MAX_BACKUP` the
    /// grace less two margins and an eighth, minimum pack age 1/24 of the grace (at least 1 s).
    const fn derive(grace_secs: u64) -> GcTiming {
        let margin_secs = max(grace_secs / 48, MARGIN_SECS_MIN);
        GcTiming {
            grace_secs,
            max_backup_secs: grace_secs.saturating_sub(2 * margin_secs + grace_secs / 8),
            margin_secs,
            min_pack_age_secs: max(grace_secs / 24, 1),
            lease_foreign_max_age_secs: max(grace_secs, LEASE_FOREIGN_MAX_AGE_SECS_MIN),
        }
    }

    /// The rules for a grace of `grace_secs`, checked: a backup that did not see a mark started
    /// before it was written (minus the margin); it commits within `max_backup_secs` of its start
    /// or re-validates, and the mark's packs are deleted only `grace_secs` after the mark; so a
    /// backup's manifest is always listed by the sweep that could delete a pack it references,
    /// which needs `MAX_BACKUP + 2 x margin < GRACE`.
    ///
    /// # Errors
    /// A message naming the rule when the grace is outside `GRACE_SECS_MIN..=GRACE_SECS_MAX` or
    /// its derived rules break that inequality.
    pub fn for_grace(grace_secs: u64) -> Result<GcTiming, String> {
        if !(GRACE_SECS_MIN..=GRACE_SECS_MAX).contains(&grace_secs) {
            return Err(format!(
                "a garbage-collection grace of {grace_secs} s is outside {GRACE_SECS_MIN} s to \
                 {GRACE_SECS_MAX} s (the default is {GRACE_SECS_DEFAULT} s)"
            ));
        }
        let timing = GcTiming::derive(grace_secs);
        if timing.max_backup_secs == 0
            || timing.max_backup_secs + 2 * timing.margin_secs >= timing.grace_secs
        {
            return Err(format!(
                "a garbage-collection grace of {grace_secs} s breaks MAX_BACKUP + 2 x margin < \
                 GRACE ({} + 2 x {} >= {grace_secs})",
                timing.max_backup_secs, timing.margin_secs
            ));
        }
        Ok(timing)
    }

    /// Whether a mark written at `mark_time` may be swept at `now` (both by the store's clock).
    pub fn mark_expired(&self, mark_time: u64, now: u64) -> bool {
        now >= mark_time.saturating_add(self.grace_secs)
    }

    /// Whether a job whose lease was written at `lease_time` may have missed a mark written at
    /// `mark_time` (it listed the marks before the mark was visible): then the mark is not swept
    /// while that job may still be running.
    pub fn lease_predates_mark(&self, lease_time: u64, mark_time: u64) -> bool {
        lease_time < mark_time.saturating_add(self.margin_secs)
    }

    /// Whether a backup that started at `start` (its lease's time) must re-validate at `now`.
    pub fn backup_must_revalidate(&self, start: u64, now: u64) -> bool {
        now.saturating_sub(start) > self.max_backup_secs
    }
}

const fn max(a: u64, b: u64) -> u64 {
    if a > b { a } else { b }
}

// The default rules are the ones this format section started with, and they obey the rule.
const _: () = {
    let timing = GcTiming::DEFAULT;
    assert!(timing.grace_secs == 24 * 3600);
    assert!(timing.max_backup_secs == 20 * 3600);
    assert!(timing.margin_secs == 30 * 60);
    assert!(timing.min_pack_age_secs == 3600);
    assert!(timing.lease_foreign_max_age_secs == 24 * 3600);
    assert!(timing.max_backup_secs + 2 * timing.margin_secs < timing.grace_secs);
};

/// Key of a mark named by a fresh random `id` (unique: marks are never overwritten).
pub fn mark_key(id: PackId) -> String {
    format!("{MARK_PREFIX}{}", id.to_hex())
}

/// Whether `key` names a mark.
pub fn is_mark_key(key: &str) -> bool {
    key.strip_prefix(MARK_PREFIX).and_then(PackId::from_hex).is_some()
}

/// Key of a clock probe named by a fresh random `id`.
pub fn clock_key(id: PackId) -> String {
    format!("{CLOCK_PREFIX}{}", id.to_hex())
}

/// Key of a backup's protection.
pub fn protected_key(backup_id: &str) -> String {
    assert!(backup_id_valid(backup_id), "backup ids are checked before they reach a key");
    format!("{PROTECTED_PREFIX}{backup_id}")
}

/// The backup id a protection key names.
pub fn protected_backup(key: &str) -> Option<&str> {
    key.strip_prefix(PROTECTED_PREFIX).filter(|id| backup_id_valid(id))
}

/// A mark: packs that no manifest referenced when a prune listed the manifests. Its
/// `LastModified` is the mark time; a later prune deletes those packs still unreferenced once
/// the mark is a grace period old, then deletes the mark. Written once under a unique name, never
/// modified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The condemned packs, sorted.
    pub packs: Vec<PackId>,
    /// Their size in bytes, by the listing.
    pub pack_bytes: u64,
    /// Who wrote it, for people (`prune@<hostname>`).
    pub written_by: String,
}

impl Mark {
    /// Checks the mark's own consistency.
    ///
    /// # Errors
    /// `FormatError::Corrupt` when the packs are not sorted and distinct.
    pub fn validate(&self, what: &str) -> Result<(), FormatError> {
        if self.packs.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(FormatError::Corrupt {
                what: what.to_string(),
                detail: "packs are not sorted and distinct".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let key = mark_key(PackId([7; 16]));
        assert!(is_mark_key(&key));
        assert!(!is_mark_key("gc/mark-zz"));
        assert!(!is_mark_key(&clock_key(PackId([7; 16]))));
        assert_eq!(protected_backup(&protected_key("b-1")), Some("b-1"));
        assert_eq!(protected_backup("protected/../x"), None);
    }

    // The rules at their boundaries: a mark is swept exactly GRACE after it was written, and a
    // lease written up to the margin after a mark counts as having possibly missed it.
    #[test]
    fn time_rules_at_their_boundaries() {
        let timing = GcTiming::DEFAULT;
        let grace = timing.grace_secs;
        assert!(!timing.mark_expired(1000, 1000 + grace - 1));
        assert!(timing.mark_expired(1000, 1000 + grace));
        assert!(timing.lease_predates_mark(1000 + timing.margin_secs - 1, 1000));
        assert!(!timing.lease_predates_mark(1000 + timing.margin_secs, 1000));
        assert!(!timing.backup_must_revalidate(5, 5 + timing.max_backup_secs));
        assert!(timing.backup_must_revalidate(5, 6 + timing.max_backup_secs));
        let mark = Mark {
            packs: vec![PackId([2; 16]), PackId([1; 16])],
            pack_bytes: 0,
            written_by: String::new(),
        };
        assert!(mark.validate("m").is_err());
    }

    // Every grace a repository may choose gives rules that obey MAX_BACKUP + 2 x margin < GRACE
    // with a positive MAX_BACKUP; a grace outside the range is refused with its reason.
    #[test]
    fn every_allowed_grace_obeys_the_rule() {
        let graces =
            (GRACE_SECS_MIN..10_000).chain([GRACE_SECS_DEFAULT, 7 * 86_400, GRACE_SECS_MAX]);
        for grace in graces {
            let timing = GcTiming::for_grace(grace).unwrap();
            assert!(timing.max_backup_secs > 0, "{timing:?}");
            assert!(timing.max_backup_secs + 2 * timing.margin_secs < grace, "{timing:?}");
            assert!(timing.min_pack_age_secs >= 1, "{timing:?}");
            assert!(timing.lease_foreign_max_age_secs >= grace, "{timing:?}");
        }
        assert_eq!(GcTiming::for_grace(GRACE_SECS_DEFAULT), Ok(GcTiming::DEFAULT));
        let short = GcTiming::for_grace(GRACE_SECS_MIN - 1).unwrap_err();
        assert!(short.contains("outside"), "{short}");
        assert!(GcTiming::for_grace(GRACE_SECS_MAX + 1).is_err());
        let ten = GcTiming::for_grace(10).unwrap();
        assert_eq!((ten.max_backup_secs, ten.margin_secs, ten.min_pack_age_secs), (5, 2, 1));
    }
}
