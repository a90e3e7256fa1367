//! Change-list incrementals in Cinder's format, in-process on a `MemStore`: an incremental that
//! reads only what a change list touches is the full-read incremental of the same volume (same
//! `_sha256file`, same objects), down to a partial last block; an empty list reads nothing and
//! writes no object; a list that leaves out a write is caught by the sampling check.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use super::MemStore;
use super::volume::{self, Content, Scratch};
use crate::cinder::backup::{BackupJob, BackupOutcome};
use crate::cinder::restore::RestoreJob;
use crate::cinder::{Algorithm, Geometry};
use crate::io::Engine;
use crate::plane::changes::{ChangeList, Extent, ExtentUnit};
use crate::progress::Progress;
use crate::store::ObjectStore;

const MIB: u64 = 1 << 20;
const VOLUME_ID: &str = "0000000a-0000-4000-8000-0000000000c1";

fn id(n: u64) -> String {
    format!("0000000b-0000-4000-8000-{n:012x}")
}

fn job(source: &Path, n: u64, parent: Option<u64>, changes: Option<ChangeList>) -> BackupJob {
    BackupJob {
        parent_id: parent.map(id),
        changes,
        ..crate::testing::cinder_job(
            source,
            id(n),
            VOLUME_ID.into(),
            Algorithm::Zlib,
            Geometry::new(MIB, 32 << 10).expect("valid geometry"),
        )
    }
}

fn changes(extents: &[(u64, u64)], sample_count: Option<usize>) -> Option<ChangeList> {
    Some(ChangeList {
        changed: extents.iter().map(|&(start, length)| Extent { start, length }).collect(),
        unit: ExtentUnit::Bytes,
        sample_count,
        changes_from: "test".into(),
    })
}

/// Runs a backup, returning its outcome and its warnings.
fn backup(mem: &MemStore, job: &BackupJob) -> (BackupOutcome, Vec<String>) {
    let warnings = Mutex::new(Vec::new());
    let warn = |message: String| warnings.lock().expect("not poisoned").push(message);
    let cancel = AtomicBool::new(false);
    let outcome = crate::cinder::backup::backup(mem, job, &Progress::default(), &cancel, &warn)
        .expect("backup");
    (outcome, warnings.into_inner().expect("not poisoned"))
}

/// The `_sha256file` hashes and the objects' (offset, length, md5) of backup `n`.
fn documents(mem: &MemStore, n: u64) -> (serde_json::Value, Vec<serde_json::Value>) {
    let keys = mem.keys_under(&format!("volume_{VOLUME_ID}/"));
    let find = |suffix: &str| {
        let key = keys.iter().find(|k| k.ends_with(&format!("_backup_{}{suffix}", id(n))));
        let body = mem.get(key.expect("document present")).expect("readable");
        serde_json::from_slice::<serde_json::Value>(&body).expect("JSON")
    };
    let objects = find("_metadata")["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .flat_map(|entry| entry.as_object().expect("one object").values())
        .map(|o| serde_json::json!([o["offset"], o["length"], o["md5"]]))
        .collect();
    (find("_sha256file")["sha256s"].clone(), objects)
}

fn restores(mem: &MemStore, scratch: &Scratch, n: u64, expected: &[u8]) {
    let target = scratch.join(&format!("restored-{n}.img"));
    let job = RestoreJob {
        backup_id: id(n),
        volume_id: VOLUME_ID.into(),
        target: target.clone(),
        force: false,
        sparse: false,
        engine: Engine::Pread,
        downloads: 2,
    };
    let cancel = AtomicBool::new(false);
    let progress = Progress::default();
    let store: &dyn ObjectStore = mem;
    let _ = crate::cinder::restore::restore(store, &job, &progress, &cancel, &|_| {}, &|_| {})
        .expect("restore");
    assert!(std::fs::read(&target).expect("restored") == expected, "backup {n} restores wrong");
}

#[test]
fn cinder_change_lists_make_the_full_read_incremental() {
    let scratch = Scratch::new("cinder-changes");
    let size = 4 * MIB + 100;
    let mut data = volume::sample(Content::Mixed, usize::try_from(size).expect("fits"), 3);
    let source = scratch.join("source.img");
    std::fs::write(&source, &data).expect("write");
    let mem = MemStore::new();
    let _ = backup(&mem, &job(&source, 1, None, None));

    // Read chunks (1 MiB: the object) 1 and 4, the latter the 100-byte tail: a partial block.
    data[MIB as usize + 5..MIB as usize + 40_005].fill(0x42);
    data[usize::try_from(size - 50).expect("fits")..].fill(7);
    std::fs::write(&source, &data).expect("write");
    let listed = changes(&[(MIB + 5, 40_000), (size - 50, 50)], None);
    let (hinted, warned) = backup(&mem, &job(&source, 2, Some(1), listed));
    assert!(warned.is_empty(), "{warned:?}");
    let base = hinted.base.clone().expect("the list was trusted");
    assert_eq!((base.chunks_read, base.chunks_carried, base.chunks_sampled), (2, 3, 3));
    assert_eq!(hinted.bytes_read, (MIB + 100) + 3 * MIB, "read 1 and 4, sampled 0, 2, 3");
    let (read_all, _) = backup(&mem, &job(&source, 3, Some(1), None));
    assert_eq!(read_all.bytes_read, size);
    assert_eq!(documents(&mem, 2), documents(&mem, 3), "the full-read incremental's documents");
    assert_eq!(hinted.object_count, 2);
    restores(&mem, &scratch, 2, &data);

    // Nothing changed: nothing read, no object, the parent's hashes.
    let (empty, warned) = backup(&mem, &job(&source, 4, Some(2), changes(&[], Some(0))));
    assert!(warned.is_empty(), "{warned:?}");
    assert_eq!((empty.bytes_read, empty.object_count), (0, 0));
    assert_eq!(documents(&mem, 4).0, documents(&mem, 2).0);
    restores(&mem, &scratch, 4, &data);

    // A list that leaves out a write: the sample (every chunk) catches it; a full read.
    data[3 * MIB as usize] ^= 1;
    std::fs::write(&source, &data).expect("write");
    let (lied, warned) = backup(&mem, &job(&source, 5, Some(4), changes(&[], None)));
    assert!(warned.iter().any(|w| w.contains("CHANGE LIST IS WRONG")), "{warned:?}");
    assert!(lied.base.is_none());
    assert_eq!(lied.parent_id, Some(id(4)));
    assert_eq!(lied.bytes_read, 2 * size, "every chunk sampled, then every chunk read");
    assert_eq!(lied.object_count, 1);
    restores(&mem, &scratch, 5, &data);

    // A volume grown within its GiB, with a parent that came from a hint (a Lightbits base):
    // Cinder's check lets it through and would then fail; a warning and a full backup instead.
    data.extend(volume::sample(Content::Mixed, usize::try_from(MIB).expect("fits"), 4));
    std::fs::write(&source, &data).expect("write");
    let mut grown = job(&source, 6, Some(5), changes(&[(size, MIB)], None));
    grown.parent_is_hint = true;
    let (full, warned) = backup(&mem, &grown);
    assert!(warned.iter().any(|w| w.contains("the volume was resized")), "{warned:?}");
    assert_eq!((full.parent_id, full.bytes_read), (None, size + MIB));
    restores(&mem, &scratch, 6, &data);
}
