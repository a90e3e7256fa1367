//! Finding and reading Cinder backups in a bucket: the listing of a volume, a backup's prefix,
//! its two documents, its chain through `parent_id`, and its `cinder backup-import` record.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;

use super::layout::names::{metadata_name, sha256file_name};
use super::layout::record::BackupRecord;
use super::{Metadata, Sha256File, UtcTime};
use crate::error::{EngineError, ErrorKind};
use crate::store::ObjectStore;

const GIB: u64 = 1 << 30;
/// Most links followed through `parent_id` before a chain is declared cyclic.
const CHAIN_LINKS_MAX: usize = 10_000;

pub(super) fn integrity(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Integrity, message)
}

/// Cinder's `backup.size`: the volume size in whole GiB, at least 1.
pub fn size_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).max(1)
}

/// The current time as a [`UtcTime`].
pub fn now() -> UtcTime {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    UtcTime::from_unix(i64::try_from(since.as_secs()).unwrap_or(i64::MAX), since.subsec_micros())
}

/// A backup found in the bucket: its prefix and every key under it.
#[derive(Debug, Clone)]
pub struct Found {
    /// `service_metadata`.
    pub prefix: String,
    /// Keys under the prefix, as a `ListObjectsV2` with that prefix returns them.
    pub listing: Vec<String>,
}

/// The keys under `volume_<volume_id>/`.
pub(super) fn list_volume(
    store: &dyn ObjectStore,
    volume_id: &str,
) -> Result<Vec<String>, EngineError> {
    Ok(store.list(&format!("volume_{volume_id}/"))?.into_iter().map(|o| o.key).collect())
}

/// Finds the complete backup `backup_id` (its `_metadata` exists) in a volume listing.
pub(super) fn find_in(
    keys: &[String],
    volume_id: &str,
    backup_id: &str,
) -> Result<Found, EngineError> {
    let suffix = format!("_backup_{backup_id}_metadata");
    let hits: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.ends_with(&suffix) && k.rsplit('/').next().is_some_and(|last| last.starts_with("az_"))
        })
        .collect();
    let prefix = match hits.as_slice() {
        [one] => one[..one.len() - "_metadata".len()].to_owned(),
        [] => {
            return Err(EngineError::new(
                ErrorKind::NotFound,
                format!(
                    "no Cinder backup {backup_id} of volume {volume_id}: no \
                     volume_{volume_id}/*/az_*{suffix} object"
                ),
            ));
        }
        many => {
            return Err(integrity(format!(
                "several _metadata objects for backup {backup_id}: {many:?}"
            )));
        }
    };
    let listing = keys.iter().filter(|k| k.starts_with(&prefix)).cloned().collect();
    Ok(Found { prefix, listing })
}

/// Finds backup `backup_id` of volume `volume_id`.
///
/// # Errors
/// `NotFound` when it has no `_metadata`; store errors.
pub fn find_backup(
    store: &dyn ObjectStore,
    volume_id: &str,
    backup_id: &str,
) -> Result<Found, EngineError> {
    find_in(&list_volume(store, volume_id)?, volume_id, backup_id)
}

fn get_document(store: &dyn ObjectStore, key: &str) -> Result<Bytes, EngineError> {
    store.get(key).map_err(|error| EngineError::from(error).context(format!("reading {key}")))
}

/// Reads and parses a backup's `_metadata`.
///
/// # Errors
/// Store errors; `Integrity` when it does not parse.
pub fn load_metadata(store: &dyn ObjectStore, prefix: &str) -> Result<Metadata, EngineError> {
    let key = metadata_name(prefix);
    Metadata::parse(&get_document(store, &key)?)
        .map_err(|error| EngineError::from(error).context(&key))
}

/// Reads and parses a backup's `_sha256file`.
///
/// # Errors
/// Store errors; `Integrity` when it does not parse.
pub fn load_sha256file(store: &dyn ObjectStore, prefix: &str) -> Result<Sha256File, EngineError> {
    let key = sha256file_name(prefix);
    Sha256File::parse(&get_document(store, &key)?)
        .map_err(|error| EngineError::from(error).context(&key))
}

/// A backup of a chain, loaded.
#[derive(Debug)]
pub struct Loaded {
    /// Where it is.
    pub found: Found,
    /// Its `_metadata`.
    pub metadata: Metadata,
}

/// Loads backup `backup_id` and its ancestors through `parent_id`, base first.
///
/// # Errors
/// `NotFound` for a missing link, `Integrity` for a cycle or an unparsable `_metadata`.
pub fn load_chain(
    store: &dyn ObjectStore,
    volume_id: &str,
    backup_id: &str,
) -> Result<Vec<Loaded>, EngineError> {
    let keys = list_volume(store, volume_id)?;
    let mut chain = Vec::new();
    let mut seen = BTreeSet::new();
    let mut next = Some(backup_id.to_owned());
    while let Some(id) = next {
        if !seen.insert(id.clone()) || chain.len() >= CHAIN_LINKS_MAX {
            return Err(integrity(format!("parent_id links of backup {backup_id} form a cycle")));
        }
        let found = find_in(&keys, volume_id, &id)?;
        let metadata = load_metadata(store, &found.prefix)?;
        next = metadata.parent_id.clone();
        chain.push(Loaded { found, metadata });
    }
    chain.reverse();
    Ok(chain)
}

/// The `cinder backup-import` record of backup `backup_id` in `bucket`.
///
/// # Errors
/// `NotFound`, `Integrity`, store errors.
pub fn record(
    store: &dyn ObjectStore,
    bucket: &str,
    volume_id: &str,
    backup_id: &str,
) -> Result<BackupRecord, EngineError> {
    let found = find_backup(store, volume_id, backup_id)?;
    let metadata = load_metadata(store, &found.prefix)?;
    let sha = load_sha256file(store, &found.prefix)?;
    // `volume_<vol>/<stamp>/az_<az>_backup_<id>`.
    let mut parts = found.prefix.split('/');
    let (_, stamp, last) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let az = last
        .strip_prefix("az_")
        .and_then(|rest| rest.strip_suffix(&format!("_backup_{backup_id}")))
        .map(str::to_owned);
    let created = parse_stamp(stamp);
    Ok(BackupRecord {
        id: backup_id.to_owned(),
        volume_id: Some(if metadata.volume_id.is_empty() {
            volume_id.to_owned()
        } else {
            metadata.volume_id.clone()
        }),
        container: bucket.to_owned(),
        parent_id: metadata.parent_id.clone(),
        size_gib: size_gib(sha.sha256s.len() as u64 * sha.chunk_size),
        display_name: metadata.backup_name.clone(),
        display_description: metadata.backup_description.clone(),
        service_metadata: found.prefix.clone(),
        object_count: metadata.objects.len() as u64,
        availability_zone: az,
        created_at: created,
        data_timestamp: created,
    })
}

/// Parses a prefix's `%Y%m%d%H%M%S` stamp.
fn parse_stamp(stamp: &str) -> Option<UtcTime> {
    if stamp.len() != 14 || !stamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |range: std::ops::Range<usize>| stamp[range].parse::<u32>().ok();
    Some(UtcTime {
        year: i32::try_from(n(0..4)?).ok()?,
        month: u8::try_from(n(4..6)?).ok()?,
        day: u8::try_from(n(6..8)?).ok()?,
        hour: u8::try_from(n(8..10)?).ok()?,
        minute: u8::try_from(n(10..12)?).ok()?,
        second: u8::try_from(n(12..14)?).ok()?,
        micros: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding a backup matches only `az_*_backup_<id>_metadata` and keeps the keys of its prefix.
    #[test]
    fn find_and_stamp() {
        let keys: Vec<String> = [
            "volume_v/20250301120007/az_nova_backup_b1-00001",
            "volume_v/20250301120007/az_nova_backup_b1_metadata",
            "volume_v/20250301120007/az_nova_backup_b1_sha256file",
            "volume_v/20250301130007/az_nova_backup_b10_metadata",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let found = find_in(&keys, "v", "b1").unwrap();
        assert_eq!(found.prefix, "volume_v/20250301120007/az_nova_backup_b1");
        assert_eq!(found.listing.len(), 3);
        assert_eq!(find_in(&keys, "v", "b2").unwrap_err().kind, ErrorKind::NotFound);
        let t = parse_stamp("20250301120007").unwrap();
        assert_eq!(t.prefix_stamp(), "20250301120007");
        assert!(parse_stamp("2025").is_none());
        assert_eq!(size_gib(0), 1);
        assert_eq!(size_gib(GIB + 1), 2);
    }
}
