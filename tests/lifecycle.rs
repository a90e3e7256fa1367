//! The repository lifecycle through the CLI: forget (retention, protection, dry run, refusal of
//! an empty policy), prune (mark, grace, sweep), check, and repair of a lost index, against a
//! local repository and Garage. A local repository's store clock is its files' mtimes, so the
//! test ages objects with `touch`; on Garage nothing can be aged, so only the first phase runs.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::util::{Repo, Scratch, assert_same, deleted_packs, gen_image};

const MIB: u64 = 1024 * 1024;

/// Sets the mtime of every file under `dir` to `secs` ago (the local store's clock).
fn age(dir: &Path, secs: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let status = std::process::Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-exec", "touch", "-m", "-d"])
        .arg(format!("@{}", now - secs))
        .args(["{}", "+"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn ids(result: &Value, list: &str) -> Vec<String> {
    result["forget"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group[list].as_array().unwrap().iter())
        .map(|decision| decision["backup_id"].as_str().unwrap().to_owned())
        .collect()
}

fn lifecycle(repo: &Repo, scratch: &Scratch, local: Option<&Path>) {
    repo.init("64K");
    let volume = scratch.join("volume.img");
    let other = scratch.join("other.img");
    gen_image(&volume, 2 * MIB, "random", 1);
    gen_image(&other, MIB, "mixed", 2);
    let old = repo.backup(&volume, "pread")["backup_id"].as_str().unwrap().to_owned();
    // Backups are dated to the second: the next one of the same volume is newer.
    std::thread::sleep(Duration::from_millis(1100));
    gen_image(&volume, 2 * MIB, "random", 3);
    let new = repo.backup(&volume, "pread")["backup_id"].as_str().unwrap().to_owned();
    let kept_other = repo.backup(&other, "pread")["backup_id"].as_str().unwrap().to_owned();

    let message = repo.ferry(&["forget"]).fails(2);
    assert!(message.contains("empty policy"), "{message}");
    let dry = repo.ferry(&["forget", "--keep-last", "1", "--dry-run"]).ok();
    assert_eq!(dry["forget"]["dry_run"], true);
    assert_eq!(ids(&dry, "removed"), std::slice::from_ref(&old));
    assert_eq!(dry["forget"]["groups"].as_array().unwrap().len(), 2, "one group per source");
    assert_eq!(repo.ferry(&["list"]).ok()["backups"].as_array().unwrap().len(), 3);

    repo.ferry(&["protect", &old]).ok();
    let spared = repo.ferry(&["forget", "--keep-last", "1"]).ok();
    assert_eq!(spared["forget"]["removed_count"], 0);
    let message = repo.ferry(&["delete", &old]).fails(8);
    assert!(message.contains("protected"), "{message}");
    repo.ferry(&["unprotect", &old]).ok();
    let forgot = repo.ferry(&["forget", "--keep-last", "1"]).ok();
    assert_eq!(ids(&forgot, "removed"), std::slice::from_ref(&old));
    let mut kept = ids(&forgot, "kept");
    kept.sort();
    let mut want = vec![new.clone(), kept_other.clone()];
    want.sort();
    assert_eq!(kept, want);
    let reasons = &forgot["forget"]["groups"][0]["kept"][0]["reasons"];
    assert!(reasons.as_array().unwrap().contains(&"last".into()), "{reasons}");

    // The forgotten backup's packs are young: nothing is condemned yet.
    let young = repo.ferry(&["prune"]).ok();
    assert!(young["prune"]["marked"].is_null(), "{young}");
    assert!(young["prune"]["young_unreferenced_packs"].as_u64().unwrap() >= 1);
    let checked = repo.ferry(&["check"]).ok();
    assert!(checked["check"]["unreferenced_packs"].as_u64().unwrap() >= 1);
    assert_eq!(checked["check"]["backups"], 2);
    let Some(dir) = local else { return };

    age(&dir.join("packs"), 2 * 3600);
    age(&dir.join("index"), 2 * 3600);
    let marking = repo.ferry(&["prune"]).ok();
    let condemned = marking["prune"]["marked"]["packs"].as_u64().unwrap();
    assert!(condemned >= 1, "{marking}");
    let waiting = repo.ferry(&["prune"]).ok();
    let reason = waiting["prune"]["waiting"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("grace"), "{reason}");
    age(&dir.join("gc"), 25 * 3600);
    let swept = repo.ferry(&["prune"]).ok();
    assert_eq!(swept["prune"]["swept"][0]["deleted_packs"], condemned, "{swept}");
    let checked = repo.ferry(&["check"]).ok();
    assert_eq!(checked["check"]["unreferenced_packs"], 0);
    let target = scratch.join("new.restored");
    repo.restore(&new, &target, "pread", &[]).ok();
    assert_same(&volume, &target, 2 * MIB);

    // A lost index (its own and the consolidated copy prune made): check fails naming it,
    // repair rebuilds it from the pack, nothing is lost.
    let index = std::fs::read_dir(dir.join("index"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.is_file())
        .unwrap();
    let original = std::fs::read(&index).unwrap();
    std::fs::remove_file(&index).unwrap();
    std::fs::remove_dir_all(dir.join("index/merged")).unwrap();
    let message = repo.ferry(&["check"]).fails(5);
    assert!(message.contains("index is missing"), "{message}");
    let repaired = repo.ferry(&["repair"]).ok();
    assert_eq!(repaired["repair"]["rebuilt_indexes"].as_array().unwrap().len(), 1);
    assert_eq!(std::fs::read(&index).unwrap(), original);
    repo.ferry(&["check"]).ok();

    // Lost packs: the next backup stores their chunks again, with a warning.
    for pack in walk(&dir.join("packs")) {
        std::fs::remove_file(&pack).unwrap();
    }
    let again =
        repo.ferry(&["--io-engine", "pread", "backup", "--source", volume.to_str().unwrap()]);
    let result = again.ok();
    let warned = again.events.iter().any(|event| {
        event["event"] == "warning" && event["message"].as_str().unwrap().contains("missing")
    });
    assert!(warned, "{:?}", again.events);
    assert_eq!(result["stats"]["dedup_chunk_count"], 0, "{result}");
    let target = scratch.join("again.restored");
    repo.restore(result["backup_id"].as_str().unwrap(), &target, "pread", &[]).ok();
    assert_same(&volume, &target, 2 * MIB);
    let message = repo.ferry(&["check"]).fails(5);
    assert!(message.contains("is missing"), "{message}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn lifecycle_in_a_local_repository() {
    let scratch = Scratch::new("lifecycle");
    let dir = scratch.join("repo");
    lifecycle(&Repo::Local(dir.clone()), &scratch, Some(&dir));
}

#[test]
fn lifecycle_on_garage() {
    let Some(repo) = Repo::garage("lifecycle") else { return };
    let scratch = Scratch::new("garage-lifecycle");
    lifecycle(&repo, &scratch, None);
}

// Repacking on Garage: a pack half of whose chunks only a forgotten backup used is repacked
// (its used chunks copied, the pack condemned) by a prune that runs while another backup runs;
// a grace later the sweep deletes it, and the backup that lists it restores through the copy.
#[test]
fn repack_on_garage() {
    let Some(repo) = Repo::garage("repack") else { return };
    let scratch = Scratch::new("garage-repack");
    repo.ferry(&["init", "--chunk-size", "1M", "--gc-grace", "10s"]).ok();
    let (v, w, x) = (scratch.join("v.img"), scratch.join("w.img"), scratch.join("x.img"));
    gen_image(&v, 12 * MIB, "random", 7);
    gen_image(&x, 6 * MIB, "random", 8);
    let mut shared = std::fs::read(&v).unwrap()[..6 * MIB as usize].to_vec();
    shared.extend(std::fs::read(&x).unwrap());
    std::fs::write(&w, shared).unwrap();
    let backup = |source: &Path| {
        let args = ["--io-engine", "pread", "backup", "--source", source.to_str().unwrap()];
        // One worker: chunks reach the packer in order, so which chunks share a pack is known.
        let result =
            repo.ferry(&[&args[..], &["--pack-size", "4M", "--workers", "1"]].concat()).ok();
        result["backup_id"].as_str().unwrap().to_owned()
    };
    let first = backup(&v);
    let kept = backup(&w);
    repo.ferry(&["delete", &first]).ok();
    // Older than the minimum pack age (a 24th of the grace, at least 1 s).
    std::thread::sleep(Duration::from_secs(2));
    let (repacked, during) = std::thread::scope(|scope| {
        let running = scope.spawn(|| backup(&x));
        let prune = repo.ferry(&["prune"]).ok();
        (prune, running.join().unwrap())
    });
    let sources = repacked["prune"]["repack"]["sources"].as_array().unwrap().len();
    assert_eq!(sources, 1, "the pack of chunks 5-8 of v: {repacked}");
    assert_eq!(repacked["prune"]["repack"]["written"].as_array().unwrap().len(), 1);
    assert_eq!(repacked["prune"]["repack"]["copied_bytes"].as_u64().unwrap() / MIB, 2);
    std::thread::sleep(Duration::from_secs(12));
    let swept = repo.ferry(&["prune"]).ok();
    assert!(deleted_packs(&swept) >= 2, "the repacked pack and the dead one: {swept}");
    let checked = repo.ferry(&["check"]).ok();
    assert!(checked["check"]["problems"].as_array().unwrap().is_empty(), "{checked}");
    assert_eq!(checked["check"]["unreferenced_packs"], 0, "{checked}");
    for (id, source) in [(&kept, &w), (&during, &x)] {
        let target = scratch.join(&format!("{id}.restored"));
        repo.restore(id, &target, "pread", &[]).ok();
        assert_same(source, &target, std::fs::metadata(source).unwrap().len());
    }
    let verified = repo.ferry(&["verify", &kept, "--read-data"]).ok();
    assert!(verified["verified"][0]["problems"].as_array().unwrap().is_empty(), "{verified}");
}
