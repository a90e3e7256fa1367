//! Tests of the parallel listing (`repo::list_split`) and of the listings built on it
//! (`Repository::list_backups`, `list_summaries`, `list_packs`), on the in-memory store.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::native::layout::{
    self, BackupCatalog, BackupSummary, Manifest, ObjectKind, PackId, SourceInfo, Timestamp,
};
use crate::native::memstore::{MemStore, Op};
use crate::native::repo::{Repository, list_split, lock};
use crate::store::ObjectStore;

/// A small deterministic generator (xorshift64*): the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below a usize")
    }

    /// A short key-like string over an alphabet that makes prefixes, `/` and collisions common.
    fn word(&mut self) -> String {
        const ALPHABET: &[u8] = b"ab0/~";
        let len = 1 + self.below(4);
        (0..len).map(|_| char::from(ALPHABET[self.below(ALPHABET.len())])).collect()
    }
}

fn keys(store: &Arc<MemStore>, prefix: &str) -> Vec<String> {
    store.list(prefix).unwrap().into_iter().map(|info| info.key).collect()
}

// Whatever the split points (random words: keys or not, under the prefix or not, unsorted,
// repeated, empty), the parallel listing is the plain listing: same keys, same order.
#[test]
fn list_split_is_the_plain_listing_whatever_the_split_points() {
    for seed in 1..=300_u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let store = MemStore::new(0);
        for _ in 0..rng.below(60) {
            let key = if rng.below(4) == 0 { rng.word() } else { format!("p/{}", rng.word()) };
            if !key.ends_with('/') && !key.contains("//") {
                store.put(&key, Bytes::new()).unwrap();
            }
        }
        let existing = keys(&store, "");
        let mut splits: Vec<String> = (0..rng.below(12))
            .map(|_| match rng.below(4) {
                // A key, which may be deleted below (a split point that no longer exists).
                0 if !existing.is_empty() => existing[rng.below(existing.len())].clone(),
                1 => format!("p/{}", rng.word()),
                2 => String::new(),
                _ => rng.word(),
            })
            .collect();
        if let Some(repeated) = splits.first().cloned() {
            splits.push(repeated);
        }
        for split in &splits {
            if rng.below(2) == 0 {
                store.delete(split).unwrap();
            }
        }
        // Keys written after the split points were chosen.
        for _ in 0..rng.below(10) {
            store.put(&format!("p/{}x", rng.word()), Bytes::new()).unwrap();
        }
        for prefix in ["", "p/"] {
            let split = list_split(&splits, |range| store.list_range(prefix, range)).unwrap();
            let split: Vec<String> = split.into_iter().map(|info| info.key).collect();
            assert_eq!(split, keys(&store, prefix), "seed {seed}, prefix {prefix:?}, {splits:?}");
        }
    }
}

// Keys written and deleted while the ranges are listed: every key present throughout is listed
// exactly once, no key twice, nothing that never existed, in key order.
#[test]
fn list_split_under_concurrent_writes() {
    for seed in 1..=50_u64 {
        let mut rng = Rng(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let store = MemStore::new(0);
        let steady: BTreeSet<String> = (0..200).map(|n| format!("k/{n:04}")).collect();
        for key in &steady {
            store.put(key, Bytes::new()).unwrap();
        }
        let churn: Vec<String> = (0..200).map(|n| format!("k/{n:04}-{}", rng.word())).collect();
        let written: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let weak = Arc::downgrade(&store);
        let (hook_churn, hook_written) = (churn.clone(), Arc::clone(&written));
        let calls = AtomicUsize::new(0);
        store.set_hook(Some(Arc::new(move |op, _key: &str| {
            if op == Op::List {
                // Before each range listing: write some keys, delete others (all outside
                // `steady`), anywhere in the key space.
                let call = calls.fetch_add(1, Ordering::SeqCst);
                let store = weak.upgrade().expect("the test holds the store");
                for (n, key) in hook_churn.iter().enumerate() {
                    if (n + call).is_multiple_of(7) {
                        store.put(key, Bytes::new())?;
                        let _ = lock(&hook_written).insert(key.clone());
                    } else if (n + call).is_multiple_of(5) {
                        store.delete(key)?;
                    }
                }
            }
            Ok(())
        })));
        let mut splits: Vec<String> =
            (0..1 + rng.below(20)).map(|_| format!("k/{:04}", rng.below(220))).collect();
        splits.push("k/0100-a".into());
        let listed: Vec<String> = list_split(&splits, |range| store.list_range("k/", range))
            .unwrap()
            .into_iter()
            .map(|info| info.key)
            .collect();
        store.set_hook(None);
        assert!(
            listed.windows(2).all(|pair| pair[0] < pair[1]),
            "seed {seed}: sorted, no key twice"
        );
        let listed: BTreeSet<String> = listed.into_iter().collect();
        assert!(steady.is_subset(&listed), "seed {seed}: every key present throughout is listed");
        let written = lock(&written);
        assert!(
            listed.iter().all(|key| steady.contains(key) || written.contains(key)),
            "seed {seed}: only keys that existed"
        );
    }
}

/// A manifest of an empty volume (valid, nothing to read), committed under `id`.
fn put_manifest(repo: &Repository, id: &str) {
    let manifest = Manifest {
        format_version: layout::FORMAT_VERSION,
        backup_id: id.to_owned(),
        repository_id: repo.config.repository_id.clone(),
        source: SourceInfo {
            path: format!("/dev/{id}"),
            kind: "file".into(),
            logical_block_bytes: 512,
        },
        volume_size_bytes: 0,
        chunk_size_bytes: repo.config.chunk_size_bytes,
        started_at: Timestamp(1_000),
        completed_at: Timestamp(2_000),
        packs: Vec::new(),
        chunks: Vec::new(),
        stats: layout::BackupStats::default(),
        base: None,
    };
    let bytes = layout::encode_document(&repo.crypt, ObjectKind::Manifest, &manifest);
    repo.store.put(&layout::manifest_key(id), Bytes::from(bytes)).unwrap();
}

// With a catalog of 2,000 backups, `backups/` is listed as 3 ranges (one request each on S3),
// and the result is still exactly the listed manifests: those committed after the catalog (before,
// between and after its ids) are shown from their manifests, those forgotten (split points among
// them) are not shown, whatever the catalog says.
#[test]
fn list_splits_backups_at_the_catalog() {
    let store = MemStore::new(0);
    let repo = Repository::init(Box::new(Arc::clone(&store)), 1 << 16).unwrap();
    let catalogued: Vec<String> = (0..2_000).map(|n| format!("2026{n:05}")).collect();
    let summary = |id: &str| BackupSummary {
        backup_id: id.to_owned(),
        source: "catalogued".into(),
        volume_size_bytes: 0,
        completed_at: Timestamp(2_000),
    };
    let catalog = BackupCatalog { backups: catalogued.iter().map(|id| summary(id)).collect() };
    let bytes = layout::encode_document(&repo.crypt, ObjectKind::Catalog, &catalog);
    store.put(&layout::catalog_key(PackId::random()), Bytes::from(bytes)).unwrap();
    // Placeholders: a catalogued backup's manifest is listed, never read.
    for id in &catalogued {
        store.put(&layout::manifest_key(id), Bytes::from_static(b"unread")).unwrap();
    }
    // Forgotten since the catalog, among them the ids the listing is split at (666 and 1333).
    let forgotten = ["202600000", "202600666", "202601333", "202601999"];
    for id in forgotten {
        store.delete(&layout::manifest_key(id)).unwrap();
    }
    // Committed since: before the first id, between ids, on both sides of a split point, last.
    let newer = ["1999", "202600666a", "202601000a", "202601332z", "202601333_", "2027"];
    for id in newer {
        put_manifest(&repo, id);
    }
    let lists = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&lists);
    store.set_hook(Some(Arc::new(move |op, key: &str| {
        if op == Op::List && key == layout::BACKUPS_PREFIX {
            let _ = counter.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })));
    let listed = repo.list_summaries().unwrap();
    assert_eq!(lists.load(Ordering::SeqCst), 3, "2,000 catalogued ids: 3 ranges of about 667");
    let mut expected: Vec<String> = catalogued
        .iter()
        .filter(|id| !forgotten.contains(&id.as_str()))
        .cloned()
        .chain(newer.iter().map(|id| (*id).to_owned()))
        .collect();
    expected.sort();
    let ids: Vec<&String> = listed.iter().map(|(id, _)| id).collect();
    assert_eq!(ids, expected.iter().collect::<Vec<_>>());
    for (id, summary) in &listed {
        let summary = summary.as_ref().unwrap();
        let from_catalog = summary.source == "catalogued";
        assert_eq!(from_catalog, !newer.contains(&id.as_str()), "{id}");
    }
    // `list_backups` (no catalog read) lists the same ids, as one range.
    lists.store(0, Ordering::SeqCst);
    assert_eq!(repo.list_backups().unwrap(), expected);
    assert_eq!(lists.load(Ordering::SeqCst), 1);
}

// `list_packs` lists `packs/` as 16 ranges and keeps exactly the well-formed pack keys.
#[test]
fn list_packs_in_ranges_keeps_well_formed_packs() {
    let store = MemStore::new(0);
    let repo = Repository::init(Box::new(Arc::clone(&store)), 1 << 16).unwrap();
    let mut packs: Vec<PackId> = (0..500).map(|_| PackId::random()).collect();
    // Packs at the range boundaries.
    for first in [0x00, 0x0f, 0x10, 0x7f, 0x80, 0xf0, 0xff] {
        let mut bytes = [0x5a_u8; 16];
        bytes[0] = first;
        packs.push(PackId(bytes));
    }
    for pack in &packs {
        store.put(&pack.pack_key(), Bytes::from_static(b"pack")).unwrap();
    }
    let hex = PackId([0xab; 16]).to_hex();
    for junk in [
        "packs/10".to_owned(),
        "packs/zz/x".to_owned(),
        format!("packs/{hex}"),
        format!("packs/ff/{hex}"),
        format!("packs/{}/{}", &hex[..2], hex.to_uppercase()),
    ] {
        store.put(&junk, Bytes::from_static(b"junk")).unwrap();
    }
    let lists = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&lists);
    store.set_hook(Some(Arc::new(move |op, _key: &str| {
        if op == Op::List {
            let _ = counter.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    })));
    let listed = repo.list_packs().unwrap();
    assert_eq!(lists.load(Ordering::SeqCst), 16);
    let expected: BTreeSet<PackId> = packs.iter().copied().collect();
    let got: BTreeSet<PackId> = listed.keys().copied().collect();
    assert!(got == expected, "missing {:?}, extra {:?}", &expected - &got, &got - &expected);
    for (pack, object) in &listed {
        assert_eq!(object.key, pack.pack_key());
        assert_eq!(object.size_bytes, 4);
    }
}
