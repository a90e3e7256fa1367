//! Listings against Garage: key ranges of `S3Store` (`StartAfter`, paging stopped at the end),
//! the parallel listing of split ranges, and `ferry list` after a prune, whose catalog splits
//! the listing of `backups/`: backups committed since are shown, forgotten ones are not.

use std::process::Command;

use ferry::native::repo::list_split;
use ferry::store::{KeyRange, ObjectStore};

use crate::util::{Repo, Scratch, gen_image};

fn keys(listed: Vec<ferry::store::ObjectInfo>) -> Vec<String> {
    listed.into_iter().map(|info| info.key).collect()
}

#[test]
fn garage_lists_key_ranges() {
    let Some(repo) = Repo::garage("ranges") else { return };
    let (_, store) = repo.s3_store();
    // 1,010 keys: more than one LIST page.
    let all: Vec<String> = (0..1010).map(|n| format!("r/{n:04}")).collect();
    std::thread::scope(|scope| {
        for part in all.chunks(127) {
            let store = &store;
            let _ = scope.spawn(move || {
                for key in part {
                    store.put(key, bytes::Bytes::new()).unwrap();
                }
            });
        }
    });
    store.put("s", bytes::Bytes::new()).unwrap();
    let range = |start_after, end| KeyRange { start_after, end };
    assert_eq!(keys(store.list_range("r/", KeyRange::ALL).unwrap()), all);
    // Both bounds excluded.
    assert_eq!(keys(store.list_range("r/", range("r/0010", Some("r/0013"))).unwrap()), all[11..13]);
    // Across the first page, and from the middle to the end (several pages from StartAfter).
    assert_eq!(
        keys(store.list_range("r/", range("r/0995", Some("r/1005"))).unwrap()),
        all[996..1005]
    );
    assert_eq!(keys(store.list_range("r/", range("r/0005", None)).unwrap()), all[6..]);
    // Bounds that are no key, below or past the prefix; a prefix without keys.
    assert_eq!(
        keys(store.list_range("r/", range("r/0999z", Some("r/1001/"))).unwrap()),
        all[1000..1002]
    );
    assert_eq!(keys(store.list_range("r/", range("a", Some("r/0002"))).unwrap()), all[..2]);
    assert!(store.list_range("r/", range("r/1009", None)).unwrap().is_empty());
    assert!(store.list_range("r/", range("", Some("r/"))).unwrap().is_empty());
    assert!(store.list_range("q/", KeyRange::ALL).unwrap().is_empty());
    let dated = store.list_dated_range("r/", range("r/0500", Some("r/0502"))).unwrap();
    assert_eq!(dated.iter().map(|object| object.key.as_str()).collect::<Vec<_>>(), ["r/0501"]);
    // Split anywhere (keys, no keys, repeated, unsorted), listed in parallel: the plain listing.
    let splits: Vec<String> =
        ["r/0700", "r/0100x", "", "r/0100x", "r/0999", "r/", "s", "zzz", "r/0001"]
            .map(str::to_owned)
            .to_vec();
    let split = list_split(&splits, |range| store.list_range("r/", range)).unwrap();
    assert_eq!(keys(split), all);
    for key in store.list("").unwrap() {
        store.delete(&key.key).unwrap();
    }
}

/// The ids `ferry list` shows, in its order.
fn listed_ids(repo: &Repo) -> Vec<String> {
    repo.ferry(&["list"]).ok()["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|backup| backup["backup_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn garage_list_after_prune_shows_newer_backups_and_not_forgotten_ones() {
    let Some(repo) = Repo::garage("list-split") else { return };
    let scratch = Scratch::new("list-split");
    let (prefix, store) = repo.s3_store();
    // 900 synthetic backups (4 MiB chunks): a catalog of 900 ids splits `backups/` in 2 ranges,
    // at the 451st id.
    let synth = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["synth-repo", "--s3-prefix", &prefix, "--packs", "16", "--unconsolidated", "16"])
        .args(["--chunks-per-pack", "1", "--backups", "900", "--backup-chunks", "1"])
        .output()
        .unwrap();
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let synthetic = listed_ids(&repo);
    assert_eq!(synthetic.len(), 900);
    repo.ferry(&["prune"]).ok();
    assert_eq!(store.list("catalog/").unwrap().len(), 1, "prune wrote the catalog");
    assert_eq!(listed_ids(&repo), synthetic);

    // Forgotten since: the first backup and the one the listing is split at.
    let split = synthetic[450].clone();
    for id in [&synthetic[0], &split] {
        repo.ferry(&["delete", id]).ok();
    }
    // Committed since: just before and just after the split point, and one with a new id.
    let source = scratch.join("volume.img");
    gen_image(&source, 4 << 20, "random", 7);
    let source = source.to_str().unwrap();
    let before = format!("{}z", synthetic[449]);
    let after = format!("{split}a");
    for id in [&before, &after] {
        repo.ferry(&["backup", "--backup-id", id, "--source", source]).ok();
    }
    let fresh =
        repo.ferry(&["backup", "--source", source]).ok()["backup_id"].as_str().unwrap().to_owned();

    let mut expected: Vec<String> = synthetic
        .iter()
        .filter(|id| **id != synthetic[0] && **id != split)
        .cloned()
        .chain([before, after, fresh])
        .collect();
    expected.sort();
    let listed = listed_ids(&repo);
    assert_eq!(listed, expected);
    // The backups that exist are the manifests listed.
    let manifests: Vec<String> = keys(store.list("backups/").unwrap())
        .into_iter()
        .map(|key| key.strip_prefix("backups/").unwrap().to_owned())
        .collect();
    assert_eq!(listed, manifests);
    for key in store.list("").unwrap() {
        store.delete(&key.key).unwrap();
    }
}
