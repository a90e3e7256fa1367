//! Index consolidation, run by `ferry prune` after its sweep and mark: the per-pack indexes
//! written since the last consolidation are merged into consolidated indexes
//! (`index/merged/<id>`, at most `MERGED_PACKS_MAX` packs each), so that a backup starts by
//! reading a few large objects plus the per-pack indexes written since, not one object per pack.
//! Consolidated indexes that are small or mostly dead (their packs swept) are rewritten into
//! new ones that name them in `supersedes`.
//!
//! Nothing a concurrent job may still need is removed (FORMAT.md, "Consolidated indexes",
//! C1-C5): a superseded object (a per-pack index of a pack a consolidated index holds, or a
//! consolidated index another one supersedes) is deleted only by a later prune, once its
//! successor is `gc::GRACE_SECS` old by the store's clock and no live lease of another job
//! predates the successor: the same time rules as packs (G1, G3). Interrupted, it converges:
//! every write is a new object under a unique name, every delete is idempotent, and readers
//! take the union of both kinds.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use crate::error::{EngineError, ErrorKind};
use crate::native::layout::merged::{self, MERGED_PACKS_MAX, MergedIndex};
use crate::native::layout::{self, ObjectKind, PackId, PackIndex};
use crate::native::maintain::{SeenLease, blocking_lease};
use crate::native::repo::Repository;
use crate::store::DatedObject;

/// A consolidated index is rewritten when at least this share of its packs is gone
/// (numerator, denominator): 1/4.
const DEAD_SHARE: (usize, usize) = (1, 4);
/// A consolidated index with fewer packs than this is small: small ones are merged together.
const SMALL_PACKS: usize = MERGED_PACKS_MAX / 4;
/// Packs carried over from rewritten consolidated indexes in one prune, at most (bounds the
/// memory of a prune; the rest waits for the next).
const REWRITE_PACKS_MAX: usize = 4 * MERGED_PACKS_MAX;

/// What consolidation did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsolidateReport {
    /// Consolidated indexes written (keys; empty with `--dry-run`).
    pub written: Vec<String>,
    /// Per-pack indexes merged into them.
    pub merged_packs: usize,
    /// Consolidated indexes rewritten into the new ones (small or mostly dead).
    pub rewritten: Vec<String>,
    /// Superseded objects deleted (per-pack and consolidated indexes whose successor passed
    /// the grace).
    pub deleted_superseded: usize,
    /// Consolidated indexes whose superseded objects wait: in their grace, or a lease
    /// predates them.
    pub waiting: usize,
    /// The backup catalog written for `list` (`null`: the existing one is current).
    pub catalog: Option<String>,
}

/// A consolidated index as consolidation sees it: its packs, not their entries.
struct Summary {
    id: PackId,
    key: String,
    written_at: u64,
    packs: Vec<PackId>,
    supersedes: Vec<PackId>,
    dead: usize,
}

/// Consolidates `repo`'s indexes at `now` (the store's clock). `packs` is the pack listing taken
/// after the prune's lease, `marked` the packs its marks condemn (not consolidated: they are
/// about to go), `leases` the other jobs' leases.
///
/// # Errors
/// Store errors.
pub fn run(
    repo: &Repository,
    now: u64,
    dry_run: bool,
    packs: &HashMap<PackId, DatedObject>,
    marked: &HashSet<PackId>,
    leases: &[SeenLease],
    warn: &dyn Fn(String),
) -> Result<ConsolidateReport, EngineError> {
    let mut report = ConsolidateReport::default();
    let listing = repo.list_indexes()?;
    let mut summaries = Vec::with_capacity(listing.merged.len());
    for (id, object) in &listing.merged {
        match repo.load_merged(*id) {
            Ok(Some(merged)) => summaries.push(Summary {
                id: *id,
                key: object.key.clone(),
                written_at: object.modified_unix,
                dead: merged.packs.iter().filter(|index| !packs.contains_key(&index.pack)).count(),
                packs: merged.packs.into_iter().map(|index| index.pack).collect(),
                supersedes: merged.supersedes,
            }),
            Ok(None) => {}
            // Left alone: it supersedes nothing and nothing supersedes it; the per-pack
            // indexes of its packs that remain are consolidated again, `repair` rebuilds those
            // that do not.
            Err(error) if error.kind == ErrorKind::Integrity => {
                warn(format!("{}: {error} (left alone)", object.key));
            }
            Err(error) => return Err(error),
        }
    }

    // C3: delete what a consolidated index old enough supersedes.
    let deleted = delete_superseded_all(
        repo,
        &summaries,
        &listing.per_pack,
        now,
        dry_run,
        leases,
        &mut report,
    )?;

    // Which consolidated indexes are current (no other one supersedes them), and what they
    // cover.
    let retired: HashSet<PackId> =
        summaries.iter().flat_map(|summary| summary.supersedes.iter().copied()).collect();
    let covered: HashSet<PackId> =
        summaries.iter().flat_map(|summary| summary.packs.iter().copied()).collect();
    let current: Vec<&Summary> = summaries
        .iter()
        .filter(|summary| !retired.contains(&summary.id) && !deleted.contains(&summary.id))
        .collect();
    let mut uncovered: Vec<PackId> = listing
        .per_pack
        .keys()
        .filter(|pack| {
            !covered.contains(pack) && packs.contains_key(pack) && !marked.contains(pack)
        })
        .copied()
        .collect();
    uncovered.sort_unstable();
    let mut rewrite: Vec<&Summary> = Vec::new();
    let mut carried = 0;
    let small = current.iter().filter(|summary| summary.packs.len() < SMALL_PACKS).count();
    for summary in &current {
        let mostly_dead = summary.dead * DEAD_SHARE.1 >= summary.packs.len() * DEAD_SHARE.0;
        // One small consolidated index alone is not rewritten: nothing would be gained.
        let merge_small = summary.packs.len() < SMALL_PACKS && (small > 1 || !uncovered.is_empty());
        if (mostly_dead || merge_small) && carried < REWRITE_PACKS_MAX {
            carried += summary.packs.len() - summary.dead;
            rewrite.push(summary);
        }
    }
    if uncovered.is_empty() && rewrite.is_empty() {
        return Ok(report);
    }
    // Packs of the rewritten ones that another current consolidated index also holds stay
    // there (no copy twice).
    let rewritten: HashSet<PackId> = rewrite.iter().map(|summary| summary.id).collect();
    let held_elsewhere: HashSet<PackId> = current
        .iter()
        .filter(|summary| !rewritten.contains(&summary.id))
        .flat_map(|summary| summary.packs.iter().copied())
        .collect();
    report.rewritten = rewrite.iter().map(|summary| summary.key.clone()).collect();
    report.merged_packs = uncovered.len();

    let mut writer = Writer { repo, dry_run, pending: Vec::new(), report: &mut report };
    for batch in uncovered.chunks(MERGED_PACKS_MAX) {
        let loaded = crate::native::repo::parallel_map(batch, 8, |pack| {
            match repo.load_index(pack) {
                Ok(index) => Ok(Some(index)),
                // Swept or damaged since the listing: not consolidated (`repair` and `check`
                // deal with a damaged one).
                Err(error) if error.kind == ErrorKind::Integrity => Ok(None),
                Err(error) => Err(error),
            }
        })?;
        for index in loaded.into_iter().flatten() {
            writer.push(index, &[])?;
        }
    }
    for summary in &rewrite {
        let Some(merged) = repo.load_merged(summary.id)? else { continue };
        for index in merged.packs {
            if packs.contains_key(&index.pack) && !held_elsewhere.contains(&index.pack) {
                writer.push(index, &[])?;
            }
        }
    }
    // C1: the object written last names the rewritten ones; every pack of theirs that still
    // exists is in it or in one written before it.
    let supersedes: Vec<PackId> = rewrite.iter().map(|summary| summary.id).collect();
    writer.flush(&supersedes)?;
    Ok(report)
}

/// C3 for every consolidated index: deletes what those old enough supersede; returns the
/// consolidated indexes deleted.
fn delete_superseded_all(
    repo: &Repository,
    summaries: &[Summary],
    per_pack: &HashMap<PackId, DatedObject>,
    now: u64,
    dry_run: bool,
    leases: &[SeenLease],
    report: &mut ConsolidateReport,
) -> Result<HashSet<PackId>, EngineError> {
    let listed: HashSet<PackId> = summaries.iter().map(|summary| summary.id).collect();
    let mut deleted: HashSet<PackId> = HashSet::new();
    for summary in summaries {
        let superseded_per_pack = summary.packs.iter().filter(|pack| per_pack.contains_key(pack));
        let superseded_merged = summary.supersedes.iter().filter(|id| listed.contains(id));
        let pending = superseded_per_pack.clone().count() + superseded_merged.clone().count();
        if pending == 0 {
            continue;
        }
        if !repo.config.gc().mark_expired(summary.written_at, now)
            || blocking_lease(repo, leases, summary.written_at).is_some()
        {
            report.waiting += 1;
            continue;
        }
        if dry_run {
            report.deleted_superseded += pending;
            continue;
        }
        for pack in superseded_per_pack {
            delete_superseded(repo, summary, &pack.index_key(), now, leases)?;
            report.deleted_superseded += 1;
        }
        for id in superseded_merged {
            delete_superseded(repo, summary, &merged::merged_key(*id), now, leases)?;
            let _ = deleted.insert(*id);
            report.deleted_superseded += 1;
        }
    }

    Ok(deleted)
}

/// Writes consolidated indexes of at most `MERGED_PACKS_MAX` packs.
struct Writer<'a> {
    repo: &'a Repository,
    dry_run: bool,
    pending: Vec<PackIndex>,
    report: &'a mut ConsolidateReport,
}

impl Writer<'_> {
    fn push(&mut self, index: PackIndex, supersedes: &[PackId]) -> Result<(), EngineError> {
        self.pending.push(index);
        if self.pending.len() == MERGED_PACKS_MAX {
            self.flush(supersedes)?;
        }
        Ok(())
    }

    fn flush(&mut self, supersedes: &[PackId]) -> Result<(), EngineError> {
        if self.pending.is_empty() && supersedes.is_empty() {
            return Ok(());
        }
        let mut packs = std::mem::take(&mut self.pending);
        packs.sort_unstable_by_key(|index| index.pack);
        packs.dedup_by_key(|index| index.pack);
        if self.dry_run {
            return Ok(());
        }
        let merged = MergedIndex { supersedes: supersedes.to_vec(), packs };
        let key = merged::merged_key(PackId::random());
        self.repo.store.put(&key, Bytes::from(merged.encode(&self.repo.crypt)))?;
        self.report.written.push(key);
        Ok(())
    }
}

/// Deletes `key`, which `successor` supersedes, after checking the rules that allow it (C3).
fn delete_superseded(
    repo: &Repository,
    successor: &Summary,
    key: &str,
    now: u64,
    leases: &[SeenLease],
) -> Result<(), EngineError> {
    assert!(
        repo.config.gc().mark_expired(successor.written_at, now),
        "C3: {key} deleted inside the grace"
    );
    assert!(
        blocking_lease(repo, leases, successor.written_at).is_none(),
        "C3: a lease predates it"
    );
    let covered = layout::index_pack_from_key(key)
        .is_some_and(|pack| successor.packs.binary_search(&pack).is_ok())
        || merged::merged_from_key(key).is_some_and(|id| successor.supersedes.contains(&id));
    assert!(covered, "C3: {key} is not superseded by {}", successor.key);
    repo.store.delete(key)?;
    Ok(())
}

/// Writes a catalog of `summaries` (every readable backup a prune saw) when the catalogs do
/// not already hold exactly those backups, then deletes the older catalogs (a `list` that
/// misses one reads the manifests instead). Returns the catalog written, if any.
///
/// # Errors
/// Store errors.
pub fn refresh_catalog(
    repo: &Repository,
    mut summaries: Vec<layout::BackupSummary>,
    dry_run: bool,
) -> Result<Option<String>, EngineError> {
    summaries.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
    let old: Vec<String> = repo
        .store
        .list(layout::CATALOG_PREFIX)?
        .into_iter()
        .filter(|object| layout::catalog_from_key(&object.key).is_some())
        .map(|object| object.key)
        .collect();
    if let [only] = &old[..]
        && let Ok(bytes) = repo.store.get(only)
        && let Ok(catalog) = layout::decode_document::<layout::BackupCatalog>(
            &repo.crypt,
            ObjectKind::Catalog,
            only,
            &bytes,
        )
        && catalog.backups == summaries
    {
        return Ok(None);
    }
    if dry_run {
        return Ok(None);
    }
    let key = layout::catalog_key(PackId::random());
    let catalog = layout::BackupCatalog { backups: summaries };
    let encoded = layout::encode_document(&repo.crypt, ObjectKind::Catalog, &catalog);
    repo.store.put(&key, Bytes::from(encoded))?;
    for old in old {
        repo.store.delete(&old)?;
    }
    Ok(Some(key))
}
