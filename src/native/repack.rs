//! Repacking, a step of `ferry prune` (FORMAT.md, "Repacking"): the used records of packs that
//! are mostly dead are copied, verbatim and verified, into new packs, after which the prune's
//! mark condemns the old packs. The two-phase sweep then deletes them a grace later, unless a
//! backup needs one of their chunks that no copy holds (`layout::liveness`).
//!
//! A record is copied as it is stored (header and stored bytes), so nothing is decompressed
//! or re-encoded; its header checksum, its stored bytes' xxh3-64 and its agreement with the
//! index are checked first, and a pack with a record that fails is left as it is.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use serde::Serialize;

use crate::error::EngineError;
use crate::limits::{PACK_SIZE_BYTES_TARGET, PART_SIZE_BYTES};
use crate::native::layout::liveness;
use crate::native::layout::{self, ChunkHash, IndexEntry, ObjectKind, PackId, PackIndex};
use crate::native::repo::Repository;
use crate::plane::OpenUploads;
use crate::store::DatedObject;

/// Default `--repack-waste`: a pack at least this many percent of whose bytes no backup uses
/// is repacked.
pub const WASTE_PERCENT_DEFAULT: u8 = 10;

/// Bytes read per ranged GET when copying records.
const READ_WINDOW_BYTES: u64 = 16 << 20;

/// What repacking did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepackReport {
    /// The threshold: packs at least this many percent dead were repacked (100: off).
    pub waste_percent: u8,
    /// Packs whose used records were copied; this prune's mark condemns them.
    pub sources: Vec<PackId>,
    /// Their bytes.
    pub source_bytes: u64,
    /// Bytes of used records copied into new packs.
    pub copied_bytes: u64,
    /// Packs written (empty with `--dry-run`).
    pub written: Vec<PackId>,
    /// Packs left as they are because a record did not verify: (pack key, problem).
    pub damaged: Vec<(String, String)>,
}

/// A pack worth repacking.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// Its index.
    pub index: &'a PackIndex,
    /// Its bytes.
    pub size_bytes: u64,
    /// Bytes of its records some backup references.
    pub used_bytes: u64,
}

/// What repacking chooses from.
#[derive(Debug)]
pub struct Pool<'a> {
    /// The pack listing.
    pub packs: &'a HashMap<PackId, DatedObject>,
    /// The readable indexes of the packs that exist.
    pub indexes: &'a HashMap<PackId, PackIndex>,
    /// The packs the backups need (`layout::liveness`).
    pub needed: &'a HashSet<PackId>,
    /// Packs condemned or swept: never repacked.
    pub excluded: &'a HashSet<PackId>,
    /// Every chunk some backup references.
    pub referenced: &'a HashSet<ChunkHash>,
}

/// The packs to repack: present, indexed, needed, not condemned (nor excluded), at least the
/// minimum pack age old (a young pack may be one a backup is still filling in), and at least
/// `waste_percent` dead; most wasteful first.
pub fn select<'a>(
    repo: &Repository,
    now: u64,
    pool: &Pool<'a>,
    waste_percent: u8,
) -> Vec<Candidate<'a>> {
    let Pool { packs, indexes, needed, excluded, referenced } = *pool;
    if waste_percent >= 100 {
        return Vec::new();
    }
    let mut selected: Vec<Candidate<'a>> = indexes
        .values()
        .filter(|index| needed.contains(&index.pack) && !excluded.contains(&index.pack))
        .filter_map(|index| {
            let object = packs.get(&index.pack)?;
            if now.saturating_sub(object.modified_unix) < repo.config.gc().min_pack_age_secs {
                return None;
            }
            let used_bytes = liveness::used_bytes(index, referenced);
            let waste = object.size_bytes.saturating_sub(used_bytes);
            (used_bytes > 0
                && u128::from(waste) * 100
                    >= u128::from(object.size_bytes) * u128::from(waste_percent))
            .then_some(Candidate { index, size_bytes: object.size_bytes, used_bytes })
        })
        .collect();
    selected.sort_by(|a, b| {
        let waste = |c: &Candidate<'_>| u128::from(c.size_bytes - c.used_bytes.min(c.size_bytes));
        (waste(b) * u128::from(a.size_bytes.max(1)))
            .cmp(&(waste(a) * u128::from(b.size_bytes.max(1))))
            .then(a.index.pack.cmp(&b.index.pack))
    });
    selected
}

/// Copies the used records of `candidates` into new packs (each record once), writing each
/// new pack's index after it; returns the sources whose every used record was copied. With
/// `dry_run`, reads and writes nothing.
///
/// # Errors
/// Store errors (what was written is an unreferenced pack a later prune condemns; no source is
/// condemned).
pub fn run(
    repo: &Repository,
    candidates: &[Candidate<'_>],
    referenced: &HashSet<ChunkHash>,
    waste_percent: u8,
    dry_run: bool,
    warn: &dyn Fn(String),
) -> Result<RepackReport, EngineError> {
    let mut report = RepackReport { waste_percent, ..RepackReport::default() };
    let mut copied: HashSet<ChunkHash> = HashSet::new();
    let mut writer = Writer::new(repo);
    for candidate in candidates {
        let index = candidate.index;
        let used: Vec<&IndexEntry> = index
            .entries
            .iter()
            .filter(|entry| referenced.contains(&entry.hash) && !copied.contains(&entry.hash))
            .collect();
        if !dry_run && let Err(problem) = copy_records(repo, index.pack, &used, &mut writer)? {
            warn(format!("{}: {problem} (not repacked)", index.pack.pack_key()));
            report.damaged.push((index.pack.pack_key(), problem));
            continue;
        }
        copied.extend(used.iter().map(|entry| entry.hash));
        report.copied_bytes += used.iter().map(|entry| entry.record_bytes()).sum::<u64>();
        report.sources.push(index.pack);
        report.source_bytes += candidate.size_bytes;
    }
    if !dry_run {
        writer.flush()?;
        report.written = writer.written;
    }
    report.sources.sort_unstable();
    Ok(report)
}

/// Reads and verifies `used` records of `pack` and hands them to `writer`; `Ok(Err(problem))`
/// when a record does not verify (the pack is left alone).
fn copy_records(
    repo: &Repository,
    pack: PackId,
    used: &[&IndexEntry],
    writer: &mut Writer<'_>,
) -> Result<Result<(), String>, EngineError> {
    let key = pack.pack_key();
    let mut position = 0;
    while position < used.len() {
        // A run of records that lie back to back, up to the read window.
        let start = used[position].offset;
        let mut end = position + 1;
        let mut run_end = start + used[position].record_bytes();
        while end < used.len()
            && used[end].offset == run_end
            && run_end - start + used[end].record_bytes() <= READ_WINDOW_BYTES
        {
            run_end += used[end].record_bytes();
            end += 1;
        }
        let bytes = repo.store.get_range(&key, start, run_end - start)?;
        if bytes.len() as u64 != run_end - start {
            return Ok(Err(format!(
                "short read at {start}: {} of {} bytes",
                bytes.len(),
                run_end - start
            )));
        }
        for entry in &used[position..end] {
            let at = usize::try_from(entry.offset - start).expect("inside the window");
            let record = &bytes[at..at + usize::try_from(entry.record_bytes()).expect("small")];
            let what = format!("{key} at {}", entry.offset);
            let header = match layout::decode_record(&what, record) {
                Ok((header, _)) => header,
                Err(error) => return Ok(Err(error.to_string())),
            };
            if header.hash != entry.hash
                || header.stored_bytes != entry.stored_bytes
                || header.raw_bytes != entry.raw_bytes
            {
                return Ok(Err(format!(
                    "the record at {} is not what its index says",
                    entry.offset
                )));
            }
            writer.push(**entry, record)?;
        }
        position = end;
    }
    Ok(Ok(()))
}

/// Builds new packs from copied records.
struct Writer<'a> {
    repo: &'a Repository,
    buffer: Vec<u8>,
    entries: Vec<IndexEntry>,
    written: Vec<PackId>,
}

impl<'a> Writer<'a> {
    fn new(repo: &'a Repository) -> Writer<'a> {
        Writer { repo, buffer: Vec::new(), entries: Vec::new(), written: Vec::new() }
    }

    fn push(&mut self, entry: IndexEntry, record: &[u8]) -> Result<(), EngineError> {
        if !self.buffer.is_empty() && self.buffer.len() + record.len() > PACK_SIZE_BYTES_TARGET {
            self.flush()?;
        }
        self.entries.push(IndexEntry { offset: self.buffer.len() as u64, ..entry });
        self.buffer.extend_from_slice(record);
        Ok(())
    }

    /// Writes the pack being built, then its index (the order every pack is written in).
    fn flush(&mut self) -> Result<(), EngineError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let pack = PackId::random();
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let size = data.len() as u64;
        upload(self.repo, &pack.pack_key(), data)?;
        let index =
            PackIndex { pack, pack_size_bytes: size, entries: std::mem::take(&mut self.entries) };
        let encoded = layout::encode_document(&self.repo.crypt, ObjectKind::Index, &index);
        self.repo.store.put(&pack.index_key(), Bytes::from(encoded))?;
        self.written.push(pack);
        Ok(())
    }
}

/// Uploads a whole pack: one PUT up to a part's size, multipart above (as backups do); a
/// failed multipart upload is aborted.
fn upload(repo: &Repository, key: &str, data: Bytes) -> Result<(), EngineError> {
    if data.len() <= PART_SIZE_BYTES {
        repo.store.put(key, data)?;
        return Ok(());
    }
    let open = OpenUploads::default();
    let result = (|| {
        let upload_id = open.begin(repo.store.as_ref(), key)?;
        let mut receipts = Vec::new();
        for (number, start) in (0..data.len()).step_by(PART_SIZE_BYTES).enumerate() {
            let part = data.slice(start..(start + PART_SIZE_BYTES).min(data.len()));
            let number = u32::try_from(number + 1).expect("few parts");
            receipts.push(repo.store.multipart_put_part(key, &upload_id, number, part)?);
        }
        open.complete(repo.store.as_ref(), key, &upload_id, &receipts)
    })();
    if result.is_err() {
        open.abort_all(repo.store.as_ref());
    }
    result.map_err(|error: EngineError| error.context(format!("repack {key}")))
}
