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

/// A pack condemned by a mark is deleted only once the mark is at least this old.
pub const GRACE_SECS: u64 = 24 * 3600;
/// A backup that has run longer than this when it is about to commit re-validates every pack
/// its manifests reference (and stores again what is missing or condemned) before committing.
pub const MAX_BACKUP_SECS: u64 = 20 * 3600;
/// How much earlier than its visibility an object's `LastModified` may be (S3 stamps the start
/// of a request), plus the time from a backup's last store-clock reading to its manifest being
/// visible.
pub const VISIBILITY_MARGIN_SECS: u64 = 30 * 60;
/// An unreferenced pack younger than this is not condemned: a running backup may be about to
/// reference it (a pack is uploaded before its index and long before its manifest).
pub const MIN_PACK_AGE_SECS: u64 = 3600;
/// A lease from another host counts as live for this long after it was written (by the store's
/// clock): no heartbeat crosses hosts.
pub const LEASE_FOREIGN_MAX_AGE_SECS: u64 = 24 * 3600;

// A backup that did not see a mark started before it was written (minus the margin); it commits
// within MAX_BACKUP_SECS of its start or re-validates, and the mark's packs are deleted only
// GRACE_SECS after the mark: so a backup's manifest is always listed by the sweep that could
// delete a pack it references.
const _: () = assert!(MAX_BACKUP_SECS + 2 * VISIBILITY_MARGIN_SECS < GRACE_SECS);

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
/// the mark is `GRACE_SECS` old, then deletes the mark. Written once under a unique name, never
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

/// Whether a mark written at `mark_time` may be swept at `now` (both by the store's clock).
pub fn mark_expired(mark_time: u64, now: u64) -> bool {
    now >= mark_time.saturating_add(GRACE_SECS)
}

/// Whether a job whose lease was written at `lease_time` may have missed a mark written at
/// `mark_time` (it listed the marks before the mark was visible): then the mark is not swept
/// while that job may still be running.
pub fn lease_predates_mark(lease_time: u64, mark_time: u64) -> bool {
    lease_time < mark_time.saturating_add(VISIBILITY_MARGIN_SECS)
}

/// Whether a backup that started at `start` (its lease's time) must re-validate at `now`.
pub fn backup_must_revalidate(start: u64, now: u64) -> bool {
    now.saturating_sub(start) > MAX_BACKUP_SECS
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
        assert!(!mark_expired(1000, 1000 + GRACE_SECS - 1));
        assert!(mark_expired(1000, 1000 + GRACE_SECS));
        assert!(lease_predates_mark(1000 + VISIBILITY_MARGIN_SECS - 1, 1000));
        assert!(!lease_predates_mark(1000 + VISIBILITY_MARGIN_SECS, 1000));
        assert!(!backup_must_revalidate(5, 5 + MAX_BACKUP_SECS));
        assert!(backup_must_revalidate(5, 6 + MAX_BACKUP_SECS));
        let mark = Mark {
            packs: vec![PackId([2; 16]), PackId([1; 16])],
            pack_bytes: 0,
            written_by: String::new(),
        };
        assert!(mark.validate("m").is_err());
    }
}
