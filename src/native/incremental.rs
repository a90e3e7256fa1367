//! The input of a native incremental backup (issue 14): a parent backup and a change list
//! since it (`plane::changes::ChangeList`: a Lightbits snapshot diff, or an `rbd diff --format
//! json` file), turned into "read only these chunks" for `native::backup`, after checking that
//! the hint can be trusted.
//!
//! Never trust a hint blindly: a parent from another repository, of another size or chunk size
//! is refused here; the sampling check (a random sample of the chunks the list calls unchanged
//! re-read and compared with the parent's hashes, as Benji does with `rbd diff` hints) is
//! `plane::changes`, shared with Cinder-format incrementals: `native::backup` reads the sample
//! beside the first pass and judges it before anything of that pass is used (a wrong list makes
//! that pass's manifest worthless, not its stored chunks, and the next pass reads everything).
//! Each refusal is a warning and a full read, which still succeeds. A superset of the changed
//! extents is always a correct hint.
//!
//! This module does not talk to a storage cluster (the change list is handed in), and it does
//! not decide where a change list comes from.

use std::sync::atomic::AtomicBool;

use crate::error::EngineError;
use crate::io;
use crate::native::chunk;
use crate::native::dedup::ChunkIndex;
use crate::native::layout::{BaseInfo, ChunkHash, Manifest};
use crate::native::repo::Repository;
use crate::plane::{self, changes};

/// What an incremental backup is told: the parent and the changes since it.
#[derive(Debug, Clone)]
pub struct Incremental {
    /// The parent backup's manifest: the chunks the change list does not touch are taken from
    /// it.
    pub parent: Manifest,
    /// The source's changes since the parent.
    pub changes: changes::ChangeList,
}

/// An incremental read: the chunks to read and what the manifest records, trusted once its
/// sample (`sample`, read by [`Plan::read_sample`] beside the pass) matches the parent.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The chunks to read, strictly increasing.
    pub chunks: Vec<u64>,
    /// The parent's chunk table (entries of unread chunks are taken from it).
    pub parent_chunks: Vec<Option<ChunkHash>>,
    /// The chunks the list calls unchanged to re-read and compare with the parent's.
    pub sample: Vec<u64>,
    /// What the manifest records.
    pub base: BaseInfo,
}

/// What reading a plan's sample found.
#[derive(Debug, Clone, Default)]
pub struct SampleResult {
    /// Sampled chunks that differ from the parent's.
    pub mismatches: Vec<u64>,
    /// Bytes read.
    pub bytes: u64,
}

impl Plan {
    /// Re-reads the sample and compares each chunk with the parent's entry (by the repository's
    /// keyed hash, a parent zero chunk by being all zeros). Safe to run beside the pass: it has a
    /// reader and buffers of its own.
    ///
    /// # Errors
    /// A failure to read the source, or a cancel.
    pub fn read_sample(
        &self,
        repo: &Repository,
        source: &plane::Source,
        engine: io::Engine,
        cancel: &AtomicBool,
    ) -> Result<SampleResult, EngineError> {
        let entry = |index: u64| self.parent_chunks[usize::try_from(index).expect("index fits")];
        let same = |index: u64, data: &[u8]| match entry(index) {
            None => chunk::is_zero(data),
            Some(hash) => !chunk::is_zero(data) && repo.hasher.hash(data) == hash,
        };
        let chunk_bytes = repo.config.chunk_size_bytes as usize;
        let (mismatches, bytes) =
            changes::read_sample(source, engine, chunk_bytes, &self.sample, same, cancel)?;
        Ok(SampleResult { mismatches, bytes })
    }

    /// Whether `found` lets the plan be trusted; a loud warning and `false` when not.
    pub fn trusted(&self, found: &SampleResult, repo: &Repository, warn: &dyn Fn(String)) -> bool {
        let chunk_bytes = repo.config.chunk_size_bytes as usize;
        let (parent, from) = (&self.base.parent_backup_id, &self.base.changes_from);
        changes::judge(&found.mismatches, self.sample.len(), parent, from, chunk_bytes, warn)
    }

    /// The chunk indexes the pass does not read, with the parent's entry for each.
    pub fn carried(&self) -> impl Iterator<Item = (usize, Option<ChunkHash>)> + '_ {
        let mut read = self.chunks.iter().peekable();
        self.parent_chunks.iter().enumerate().filter_map(move |(index, entry)| {
            if read.peek().is_some_and(|&&next| next == index as u64) {
                let _ = read.next();
                return None;
            }
            Some((index, *entry))
        })
    }
}

/// Checks `incremental` against `repo` and `source` and, when it holds, returns what to read
/// and the sample to check beside the pass ([`Plan::read_sample`], [`Plan::trusted`]); `None`
/// after a warning when the backup must read the whole source instead. Reads nothing. `known`
/// is the repository's dedup view: a parent chunk not in it (its pack missing or condemned) is
/// read again rather than referenced.
pub fn plan(
    repo: &Repository,
    incremental: &Incremental,
    source: &plane::Source,
    engine: io::Engine,
    known: &ChunkIndex<'_>,
    warn: &dyn Fn(String),
) -> Option<Plan> {
    let parent = &incremental.parent;
    let fallback = |why: String| {
        changes::fall_back(warn, &why);
        None
    };
    if parent.repository_id != repo.config.repository_id {
        return fallback(format!(
            "parent backup {} belongs to another repository",
            parent.backup_id
        ));
    }
    if parent.chunk_size_bytes != repo.config.chunk_size_bytes {
        return fallback(format!("parent backup {} has another chunk size", parent.backup_id));
    }
    let size_bytes = source.info.size_bytes;
    if parent.volume_size_bytes != size_bytes {
        return fallback(format!(
            "the volume was resized: {} bytes now, {} in parent backup {}",
            size_bytes, parent.volume_size_bytes, parent.backup_id
        ));
    }
    let entry = |index: u64| parent.chunks[usize::try_from(index).expect("index fits")];
    // A parent chunk whose pack is gone or condemned cannot be referenced: read it again.
    let carriable = |index: u64| entry(index).is_none_or(|hash| known.get(&hash).is_some());
    let reading =
        changes::Reading { source, engine, chunk_bytes: repo.config.chunk_size_bytes as usize };
    let checked = changes::map(&incremental.changes, reading, carriable);
    if checked.uncarried > 0 {
        warn(format!(
            "{} chunk(s) of parent backup {} are not in a usable pack: reading them again",
            checked.uncarried, parent.backup_id
        ));
    }
    assert_eq!(checked.chunk_count, parent.chunks.len() as u64, "sizes were compared");
    let base = BaseInfo {
        parent_backup_id: parent.backup_id.clone(),
        changes_from: incremental.changes.changes_from.clone(),
        chunks_read: checked.read.len() as u64,
        chunks_sampled: checked.sampled.len() as u64,
        chunks_carried: checked.chunk_count - checked.read.len() as u64,
    };
    let (chunks, sample) = (checked.read, checked.sampled);
    Some(Plan { chunks, parent_chunks: parent.chunks.clone(), sample, base })
}
