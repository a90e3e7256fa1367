//! The format-independent half of changed-block incrementals (issue 14), shared by
//! `native::incremental` and `cinder::backup`: a change list (`ChangeList`: extents in bytes or
//! logical blocks, the sample size, where it came from), the chunks it touches, and the check
//! before a job trusts it: a random sample of the chunks it calls unchanged is re-read through
//! the ordinary reader and judged by the format (`same`: the native chunk hash, or Cinder's
//! block SHA-256s), a mismatch being a loud warning and a full read.
//!
//! What "the parent" is, and whether it can be used at all (same repository, volume size, chunk
//! or block size), is the format's business; the warning wording of every fallback is here, so
//! both formats say the same thing.

use std::sync::atomic::AtomicBool;

use crossbeam_channel::bounded;

use super::{JobControl, Source, buffer_pool, read_options, spawn_reader_of};
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, ReadChunk};

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

/// The source's changes since a parent backup, as a job is told them (a superset is fine).
#[derive(Debug, Clone)]
pub struct ChangeList {
    /// The changed extents.
    pub changed: Vec<Extent>,
    /// Their unit.
    pub unit: ExtentUnit,
    /// Unchanged chunks to re-read and compare with the parent before the pass; `None`: 1% of
    /// them, at least [`SAMPLE_COUNT_MIN`], at most [`SAMPLE_COUNT_DEFAULT_MAX`].
    pub sample_count: Option<usize>,
    /// Where the list came from (`lightbits diff ...`, `ranges file ...`), recorded with the
    /// backup.
    pub changes_from: String,
}

/// A change list checked against the source: what to read.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The chunks to read, strictly increasing: those the list touches, and those the format
    /// cannot carry from the parent.
    pub read: Vec<u64>,
    /// Chunks the list calls unchanged that the format could not carry (read again).
    pub uncarried: u64,
    /// Chunks re-read by the sampling check, strictly increasing.
    pub sampled: Vec<u64>,
    /// All chunks of the source.
    pub chunk_count: u64,
}

/// Warns that an incremental is not possible and the job reads the whole source.
pub fn fall_back(warn: &dyn Fn(String), why: &str) {
    warn(format!("incremental backup not possible, reading the whole source: {why}"));
}

/// How a job reads its source: the source, the engine and the chunk size.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    /// The opened source.
    pub source: &'a Source,
    /// The reader engine.
    pub engine: io::Engine,
    /// The job's chunk (native chunk, Cinder read chunk), the unit of a plan.
    pub chunk_bytes: usize,
}

/// Checks `changes` against the source as `reading` reads it: the chunks the list touches are
/// read, like those `carriable` refuses; of the rest, a random sample is re-read and each chunk
/// judged by `same(index, bytes)` against the parent (`parent` names it in warnings). Returns
/// the plan, or `None` after a loud warning when the sample shows the list wrong (the caller
/// reads the whole source), and the bytes the check read either way.
///
/// # Errors
/// Only a failure to read the sample from the source (or a cancel).
pub fn check(
    changes: &ChangeList,
    reading: Reading<'_>,
    parent: &str,
    carriable: impl Fn(u64) -> bool,
    same: impl FnMut(u64, &[u8]) -> bool,
    cancel: &AtomicBool,
    warn: &dyn Fn(String),
) -> Result<(Option<Checked>, u64), EngineError> {
    let checked = map(changes, reading, carriable);
    let Reading { source, engine, chunk_bytes } = reading;
    let (mismatches, sample_bytes) =
        read_sample(source, engine, chunk_bytes, &checked.sampled, same, cancel)?;
    let from = &changes.changes_from;
    let trusted = judge(&mismatches, checked.sampled.len(), parent, from, chunk_bytes, warn);
    Ok((trusted.then_some(checked), sample_bytes))
}

/// The first half of [`check`], which reads nothing: the plan `changes` gives for the source as
/// `reading` reads it, with the chunks to sample (re-read and compare with the parent before the
/// plan is trusted: [`read_sample`], then [`judge`]).
pub fn map(changes: &ChangeList, reading: Reading<'_>, carriable: impl Fn(u64) -> bool) -> Checked {
    let Reading { source, chunk_bytes, .. } = reading;
    let size_bytes = source.info.size_bytes;
    let unit_bytes = match changes.unit {
        ExtentUnit::Bytes => 1,
        ExtentUnit::LogicalBlocks => u64::from(source.info.logical_block_bytes.max(1)),
    };
    let chunk_count = size_bytes.div_ceil(chunk_bytes as u64);
    let touched = touched_chunks(&changes.changed, unit_bytes, size_bytes, chunk_bytes as u64);
    let mut read = Vec::with_capacity(touched.len());
    let mut carried = Vec::new();
    let mut uncarried = 0u64;
    let mut next = touched.iter().peekable();
    for index in 0..chunk_count {
        if next.peek().is_some_and(|&&t| t == index) {
            let _ = next.next();
            read.push(index);
        } else if carriable(index) {
            carried.push(index);
        } else {
            uncarried += 1;
            read.push(index);
        }
    }
    let count = changes.sample_count.unwrap_or_else(|| default_sample_count(carried.len()));
    let sampled = sample(&carried, count, random_seed());
    Checked { read, uncarried, sampled, chunk_count }
}

/// The verdict on a sample of `sampled_count` chunks of which `mismatches` differ from parent
/// backup `parent` (the list came from `changes_from`): trusted, or a loud warning and a full
/// read.
pub fn judge(
    mismatches: &[u64],
    sampled_count: usize,
    parent: &str,
    changes_from: &str,
    chunk_bytes: usize,
    warn: &dyn Fn(String),
) -> bool {
    let Some(&first) = mismatches.first() else { return true };
    warn(format!(
        "CHANGE LIST IS WRONG: {} of {sampled_count} sampled chunk(s) it called unchanged differ \
         from parent backup {parent} (first: chunk {first} at byte {}); the change list \
         ({changes_from}) is not trusted",
        mismatches.len(),
        first * chunk_bytes as u64,
    ));
    fall_back(warn, "the sampling check failed");
    false
}

/// The chunks `changed` touches, for a volume of `size_bytes` in `chunk_bytes` chunks
/// (`unit_bytes` per extent unit), strictly increasing; extents past the end are clipped.
pub fn touched_chunks(
    changed: &[Extent],
    unit_bytes: u64,
    size_bytes: u64,
    chunk_bytes: u64,
) -> Vec<u64> {
    let chunk_bytes = chunk_bytes.max(1);
    let count = size_bytes.div_ceil(chunk_bytes);
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

/// A fresh seed for a random sample, from the OS.
///
/// # Panics
/// If the operating system's random source fails, which is not recoverable.
pub fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source must work");
    u64::from_le_bytes(bytes)
}

/// Re-reads `sampled` chunks of `source` (through a pool of 4 buffers of its own, so it can run
/// beside a job's pass) and returns those `same` rejects, and the bytes read.
pub fn read_sample(
    source: &Source,
    engine: io::Engine,
    chunk_bytes: usize,
    sampled: &[u64],
    mut same: impl FnMut(u64, &[u8]) -> bool,
    cancel: &AtomicBool,
) -> Result<(Vec<u64>, u64), EngineError> {
    if sampled.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let control = JobControl::new();
    let (free_tx, free_rx) = buffer_pool(4, chunk_bytes);
    let (chunk_tx, chunk_rx) = bounded::<ReadChunk>(4);
    let options = read_options(source, engine, chunk_bytes, None);
    let mut mismatches = Vec::new();
    let mut bytes_read = 0u64;
    std::thread::scope(|scope| {
        let reader =
            spawn_reader_of(scope, source, options, Some(sampled), free_rx, chunk_tx, &control);
        while let Some(chunk) = control.recv_relaying(&chunk_rx, cancel) {
            let data = chunk.buf.as_slice();
            bytes_read += data.len() as u64;
            if !same(chunk.chunk_index, data) {
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
