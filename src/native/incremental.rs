//! The input of an incremental backup (issue 14): a parent backup and a list of the source's
//! changed extents since it (a Lightbits snapshot diff, or an `rbd diff --format json` file),
//! turned into "read only these chunks" for `native::backup`, after checking that the hint can
//! be trusted.
//!
//! Never trust a hint blindly: a parent from another repository, of another size or chunk size
//! is refused, and before the pass a random sample of the chunks the list calls unchanged is
//! re-read and compared with the parent's hashes (as Benji does with `rbd diff` hints). Each
//! refusal is a warning and `None`: the caller reads the whole source instead, and still
//! succeeds. A superset of the changed extents is always a correct hint.
//!
//! This module does not talk to a storage cluster (the change list is handed in), and it does
//! not decide where a change list comes from.

use std::sync::atomic::AtomicBool;

use crossbeam_channel::bounded;

use crate::error::{EngineError, ErrorKind};
use crate::io::{self, ReadChunk};
use crate::native::chunk;
use crate::native::fresh;
use crate::native::layout::{BaseInfo, ChunkHash, Manifest, chunk_count};
use crate::native::repo::{ChunkMap, Repository};
use crate::plane::{self, JobControl};

/// Fewest unchanged chunks re-read by default (or all of them, when there are fewer).
pub const SAMPLE_COUNT_MIN: usize = 8;

/// Most unchanged chunks re-read by default: 1% of the unchanged chunks up to this bound.
pub const SAMPLE_COUNT_DEFAULT_MAX: usize = 1024;

/// A changed extent of the source, in `ExtentUnit`s: `[start, start + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First unit.
    pub start: u64,
    /// Units.
    pub length: u64,
}

/// The unit of an [`Extent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentUnit {
    /// Bytes (`rbd diff`).
    Bytes,
    /// Logical blocks of the source device (a Lightbits LBA: reference B.8 names the volume's
    /// block size, which the attached device reports as its logical block size).
    LogicalBlocks,
}

/// What an incremental backup is told: the parent and the changes since it.
#[derive(Debug, Clone)]
pub struct Incremental {
    /// The parent backup's manifest: the chunks the change list does not touch are taken from
    /// it.
    pub parent: Manifest,
    /// The source's changed extents since the parent (a superset is fine).
    pub changed: Vec<Extent>,
    /// The unit of `changed`.
    pub unit: ExtentUnit,
    /// Unchanged chunks to re-read and compare with the parent before the pass; `None`: 1% of
    /// them, at least [`SAMPLE_COUNT_MIN`], at most [`SAMPLE_COUNT_DEFAULT_MAX`].
    pub sample_count: Option<usize>,
    /// Where the change list came from, recorded in the manifest.
    pub changes_from: String,
}

/// A checked incremental read: the chunks to read and what the manifest records.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The chunks to read, strictly increasing.
    pub chunks: Vec<u64>,
    /// The parent's chunk table (entries of unread chunks are taken from it).
    pub parent_chunks: Vec<Option<ChunkHash>>,
    /// Bytes the sampling check read.
    pub sample_bytes: u64,
    /// What the manifest records.
    pub base: BaseInfo,
}

impl Plan {
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

/// The chunks `changed` touches, for a volume of `size_bytes` in `chunk_size_bytes` chunks
/// (`unit_bytes` per extent unit), strictly increasing; extents past the end are clipped.
pub fn touched_chunks(
    changed: &[Extent],
    unit_bytes: u64,
    size_bytes: u64,
    chunk_size_bytes: u32,
) -> Vec<u64> {
    let chunk_bytes = u64::from(chunk_size_bytes.max(1));
    let count = chunk_count(size_bytes, chunk_size_bytes);
    let mut touched = vec![false; usize::try_from(count).expect("chunk table fits memory")];
    for extent in changed.iter().filter(|extent| extent.length > 0) {
        let start = extent.start.saturating_mul(unit_bytes);
        let end = extent.start.saturating_add(extent.length).saturating_mul(unit_bytes);
        if start >= size_bytes {
            continue;
        }
        let last = end.min(size_bytes).saturating_sub(1) / chunk_bytes;
        for index in start / chunk_bytes..=last {
            touched[usize::try_from(index).expect("index fits")] = true;
        }
    }
    (0..count).filter(|&index| touched[usize::try_from(index).expect("fits")]).collect()
}

/// Picks `count` distinct items of `from` (all of them when it has fewer), reproducibly from
/// `seed` (a partial Fisher-Yates shuffle driven by xorshift64*), returned sorted.
pub fn sample(from: &[u64], count: usize, seed: u64) -> Vec<u64> {
    let mut pool = from.to_vec();
    let count = count.min(pool.len());
    let mut state = seed | 1;
    for position in 0..count {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let random = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (pool.len() - position) as u64;
        let pick = position + usize::try_from(random % span).expect("below the pool length");
        pool.swap(position, pick);
    }
    pool.truncate(count);
    pool.sort_unstable();
    pool
}

/// The default sample size for `carried_count` unchanged chunks.
pub fn default_sample_count(carried_count: usize) -> usize {
    (carried_count / 100).clamp(SAMPLE_COUNT_MIN, SAMPLE_COUNT_DEFAULT_MAX)
}

/// Checks `incremental` against `repo` and `source` and, when it holds, returns what to read;
/// `None` after a warning when the backup must read the whole source instead. Also returns the
/// bytes the check read from the source, either way. `known` is the
/// repository's dedup view: a parent chunk not in it (its pack missing or condemned) is read
/// again rather than referenced.
///
/// # Errors
/// Only a failure to read the sample from the source (or a cancel); every reason not to trust
/// the hint is a warning and `Ok(None)`.
pub fn plan(
    repo: &Repository,
    incremental: &Incremental,
    source: &plane::Source,
    engine: io::Engine,
    known: &ChunkMap,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<(Option<Plan>, u64), EngineError> {
    let parent = &incremental.parent;
    let fallback = |why: String| {
        warn(format!("incremental backup not possible, reading the whole source: {why}"));
        Ok((None, 0))
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
    let unit_bytes = match incremental.unit {
        ExtentUnit::Bytes => 1,
        ExtentUnit::LogicalBlocks => u64::from(source.info.logical_block_bytes.max(1)),
    };
    let chunk_size_bytes = repo.config.chunk_size_bytes;
    let mut chunks = touched_chunks(&incremental.changed, unit_bytes, size_bytes, chunk_size_bytes);
    let changed_count = chunks.len();
    // A parent chunk whose pack is gone or condemned cannot be referenced: read it again.
    let mut unavailable = 0usize;
    let mut carried = Vec::new();
    let mut next = chunks.iter().peekable();
    for (index, entry) in parent.chunks.iter().enumerate() {
        let index = index as u64;
        if next.peek().is_some_and(|&&touched| touched == index) {
            let _ = next.next();
            continue;
        }
        match entry {
            Some(hash) if known.get(hash).is_none() => unavailable += 1,
            _ => carried.push(index),
        }
    }
    if unavailable > 0 {
        warn(format!(
            "{unavailable} chunk(s) of parent backup {} are not in a usable pack: reading them \
             again",
            parent.backup_id
        ));
        let carried_set: std::collections::BTreeSet<u64> = carried.iter().copied().collect();
        chunks = (0..parent.chunks.len() as u64).filter(|i| !carried_set.contains(i)).collect();
    }
    let sample_count =
        incremental.sample_count.unwrap_or_else(|| default_sample_count(carried.len()));
    let sampled = sample(&carried, sample_count, fresh::random_seed());
    let (mismatches, sample_bytes) = check_sample(repo, source, engine, parent, &sampled, cancel)?;
    if let Some(&first) = mismatches.first() {
        warn(format!(
            "CHANGE LIST IS WRONG: {} of {} sampled chunk(s) it called unchanged differ from \
             parent backup {} (first: chunk {first} at byte {}); the change list ({}) is not \
             trusted",
            mismatches.len(),
            sampled.len(),
            parent.backup_id,
            first * u64::from(chunk_size_bytes),
            incremental.changes_from
        ));
        let _none = fallback("the sampling check failed".to_owned());
        return Ok((None, sample_bytes));
    }
    let base = BaseInfo {
        parent_backup_id: parent.backup_id.clone(),
        changes_from: incremental.changes_from.clone(),
        chunks_read: chunks.len() as u64,
        chunks_sampled: sampled.len() as u64,
        chunks_carried: parent.chunks.len() as u64 - chunks.len() as u64,
    };
    assert!(chunks.len() >= changed_count, "every touched chunk is read");
    Ok((
        Some(Plan { chunks, parent_chunks: parent.chunks.clone(), sample_bytes, base }),
        sample_bytes,
    ))
}

/// Re-reads `sampled` chunks of `source` and returns those whose content differs from the
/// parent's entry (a hash, or zeros for `None`), and the bytes read.
fn check_sample(
    repo: &Repository,
    source: &plane::Source,
    engine: io::Engine,
    parent: &Manifest,
    sampled: &[u64],
    cancel: &AtomicBool,
) -> Result<(Vec<u64>, u64), EngineError> {
    if sampled.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let chunk_bytes = repo.config.chunk_size_bytes as usize;
    let control = JobControl::new();
    let (free_tx, free_rx) = plane::buffer_pool(4, chunk_bytes);
    let (chunk_tx, chunk_rx) = bounded::<ReadChunk>(4);
    let read_options = plane::read_options(source, engine, chunk_bytes, None);
    let mut mismatches = Vec::new();
    let mut bytes_read = 0u64;
    std::thread::scope(|scope| {
        let reader = plane::spawn_reader_of(
            scope,
            source,
            read_options,
            Some(sampled),
            free_rx,
            chunk_tx,
            &control,
        );
        while let Some(chunk) = control.recv_relaying(&chunk_rx, cancel) {
            let data = chunk.buf.as_slice();
            bytes_read += data.len() as u64;
            let index = usize::try_from(chunk.chunk_index).expect("index fits");
            let same = match parent.chunks[index] {
                None => chunk::is_zero(data),
                Some(hash) => !chunk::is_zero(data) && repo.hasher.hash(data) == hash,
            };
            if !same {
                mismatches.push(chunk.chunk_index);
            }
            let _ = free_tx.send(chunk.buf);
        }
        let _engine = reader.join().expect("reader thread does not panic");
    });
    control.outcome(cancel, "backup cancelled while checking the change list")?;
    mismatches.sort_unstable();
    Ok((mismatches, bytes_read))
}

/// Parses a change list in the shape of `rbd diff --format json`: a JSON array of
/// `{"offset": N, "length": N, "exists": "true"|"false"|bool}` in bytes (numbers or digit
/// strings). Both `exists` values are changes (`false` is a discard: the data changed to
/// zeros), so `exists` is only checked for shape.
///
/// # Errors
/// `Usage`, naming the entry, for anything else.
pub fn parse_ranges_json(text: &str) -> Result<Vec<Extent>, EngineError> {
    let usage = |message: String| EngineError::new(ErrorKind::Usage, message);
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|error| usage(format!("changed ranges are not JSON: {error}")))?;
    let entries = value.as_array().ok_or_else(|| {
        usage("changed ranges must be a JSON array (rbd diff --format json)".into())
    })?;
    let number = |entry: &serde_json::Value, key: &str, position: usize| {
        let field = entry.get(key);
        field
            .and_then(serde_json::Value::as_u64)
            .or_else(|| field.and_then(|v| v.as_str()).and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| usage(format!("changed range {position}: {key} is not a byte count")))
    };
    let mut extents = Vec::with_capacity(entries.len());
    for (position, entry) in entries.iter().enumerate() {
        let start = number(entry, "offset", position)?;
        let length = number(entry, "length", position)?;
        if start.checked_add(length).is_none() {
            return Err(usage(format!("changed range {position}: offset + length overflows")));
        }
        match entry.get("exists") {
            None | Some(serde_json::Value::Bool(_)) => {}
            Some(serde_json::Value::String(text)) if text == "true" || text == "false" => {}
            Some(other) => {
                return Err(usage(format!(
                    "changed range {position}: exists is {other}, not true or false"
                )));
            }
        }
        extents.push(Extent { start, length });
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extents map to every chunk they touch, clipped at the end; empty extents touch nothing.
    #[test]
    fn touched_chunks_cover_extents() {
        let extents = [
            Extent { start: 0, length: 1 },
            Extent { start: 4095, length: 2 },
            Extent { start: 10 * 4096, length: 0 },
            Extent { start: 9000, length: 1 << 40 },
        ];
        assert_eq!(touched_chunks(&extents, 1, 4 * 4096 + 100, 4096), [0, 1, 2, 3, 4]);
        assert_eq!(touched_chunks(&extents[..2], 1, 40960, 4096), [0, 1]);
        let blocks = [Extent { start: 8, length: 8 }];
        assert_eq!(touched_chunks(&blocks, 512, 40960, 4096), [1]);
        assert!(touched_chunks(&[Extent { start: 1 << 20, length: 1 }], 1, 4096, 4096).is_empty());
    }

    /// A sample is distinct, sorted, of the asked size (or everything), and reproducible.
    #[test]
    fn samples_are_distinct_and_bounded() {
        let from: Vec<u64> = (0..1000).map(|i| i * 3).collect();
        let picked = sample(&from, 50, 7);
        assert_eq!(picked.len(), 50);
        assert!(picked.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(picked.iter().all(|item| from.contains(item)));
        assert_eq!(picked, sample(&from, 50, 7));
        assert_ne!(picked, sample(&from, 50, 8));
        assert_eq!(sample(&from[..5], 50, 1), &from[..5]);
        assert_eq!(default_sample_count(10), SAMPLE_COUNT_MIN);
        assert_eq!(default_sample_count(5000), 50);
        assert_eq!(default_sample_count(10_000_000), SAMPLE_COUNT_DEFAULT_MAX);
    }

    /// `rbd diff --format json` output parses (numbers or strings, both `exists` values), and
    /// anything else is refused with the entry named.
    #[test]
    fn parses_rbd_diff_json() {
        let text = r#"[{"offset":0,"length":4194304,"exists":"true"},
                       {"offset":"8388608","length":"512","exists":"false"},
                       {"offset":1,"length":2,"exists":true}]"#;
        let extents = parse_ranges_json(text).unwrap();
        assert_eq!(extents[1], Extent { start: 8_388_608, length: 512 });
        assert_eq!(extents.len(), 3);
        for bad in [
            "{}",
            "[{\"offset\":1}]",
            "[{\"offset\":-1,\"length\":1}]",
            "[{\"offset\":1,\"length\":1,\"exists\":\"maybe\"}]",
            "not json",
        ] {
            let error = parse_ranges_json(bad).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Usage, "{bad}");
        }
    }
}
