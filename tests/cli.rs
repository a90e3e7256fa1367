//! The orchestrator contract: exit codes per failure class, JSON Lines events (start first,
//! result or error last), refusals that protect data, and clear errors when the store fails.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Repo, Scratch, gen_image};

const MIB: u64 = 1024 * 1024;

#[test]
fn json_events_start_first_and_end_with_result() {
    let scratch = Scratch::new("json-events");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    let source = scratch.join("a.img");
    gen_image(&source, 2 * MIB, "mixed", 1);
    let run = repo.ferry(&["backup", "--source", source.to_str().unwrap()]);
    let result = run.ok();
    assert_eq!(run.events[0]["event"], "start");
    assert_eq!(run.events[0]["command"], "backup");
    assert_eq!(result["command"], "backup");
    assert_eq!(result["exit_code"], 0);
    for key in ["backup_id", "volume_size_bytes", "bytes_uploaded", "stats", "io_engine"] {
        assert!(!result[key].is_null(), "result lacks {key}: {result}");
    }
    let id = result["backup_id"].as_str().unwrap();
    let listed = repo.ferry(&["list"]).ok();
    assert_eq!(listed["backups"][0]["backup_id"], id);
    let shown = repo.ferry(&["show", id]).ok();
    assert_eq!(shown["backup"]["volume_size_bytes"], 2 * MIB);
    repo.ferry(&["delete", id]).ok();
    assert_eq!(repo.ferry(&["list"]).ok()["backups"].as_array().unwrap().len(), 0);
    assert!(repo.ferry(&["show", id]).fails(7).contains("does not exist"));
}

#[test]
fn usage_errors_have_their_own_codes() {
    let scratch = Scratch::new("usage");
    let repo = Repo::Local(scratch.join("repo"));
    // No repository yet: not found.
    let source = scratch.join("a.img");
    gen_image(&source, MIB, "text", 1);
    let message = repo.ferry(&["backup", "--source", source.to_str().unwrap()]).fails(7);
    assert!(message.contains("ferry init"), "{message}");
    repo.init("256K");
    // Initialising twice is refused.
    repo.ferry(&["init"]).fails(8);
    // A missing source device.
    let message = repo.ferry(&["backup", "--source", "/nonexistent/device"]).fails(3);
    assert!(message.contains("/nonexistent/device"), "{message}");
    // Bad arguments are rejected by the parser with exit code 2.
    let status =
        Command::new(env!("CARGO_BIN_EXE_ferry")).args(["backup", "--bogus"]).output().unwrap();
    assert_eq!(status.status.code(), Some(2));
    // A malformed backup id.
    repo.ferry(&["show", "../config"]).fails(2);
    // No repository given at all.
    let run = crate::util::Run::from(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--json", "list"])
            .env_remove("FERRY_REPO")
            .output()
            .unwrap(),
    );
    assert!(run.fails(2).contains("--repo"));
}

#[test]
fn restore_refuses_a_target_smaller_than_the_backup() {
    let scratch = Scratch::new("small-target");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    let source = scratch.join("a.img");
    gen_image(&source, 4 * MIB, "random", 1);
    let id = repo.backup(&source, "uring")["backup_id"].as_str().unwrap().to_string();
    // A block device smaller than the volume: refused, untouched.
    let small = scratch.join("small.img");
    gen_image(&small, MIB, "text", 2);
    let before = std::fs::read(&small).unwrap();
    if let Some(device) = crate::util::LoopDevice::attach(&small, 512) {
        let message = repo.restore(&id, &device.path, "uring", &["--force"]).fails(8);
        assert!(message.contains("needs"), "{message}");
    }
    // A regular file holding data without --force: refused, untouched.
    repo.restore(&id, &small, "uring", &[]).fails(8);
    assert_eq!(std::fs::read(&small).unwrap(), before);
}

/// Flips one byte inside the first pack object and checks that restore fails with an integrity
/// error naming the pack, without a panic.
fn corrupt_pack_is_detected(repo: &Repo, scratch: &Scratch, flip: impl Fn(&str)) {
    let source = scratch.join("a.img");
    gen_image(&source, 3 * MIB, "text", 5);
    let id = repo.backup(&source, "uring")["backup_id"].as_str().unwrap().to_string();
    repo.ferry(&["verify", &id, "--read-data"]).ok();
    flip(&id);
    let target = scratch.join("restored.img");
    let message = repo.restore(&id, &target, "uring", &[]).fails(5);
    assert!(message.contains("packs/"), "message names the pack: {message}");
    assert!(message.contains("corrupt") || message.contains("mismatch"), "{message}");
    // verify: sizes are intact, so only reading the data finds the flipped byte, and the
    // JSON result lists the pack as the bad object.
    repo.ferry(&["verify", &id]).ok();
    let run = repo.ferry(&["verify", &id, "--read-data"]);
    let message = run.fails(5);
    assert!(message.contains("packs/"), "message names the pack: {message}");
    let problems = run.last()["verified"][0]["problems"].as_array().unwrap().clone();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0]["object"].as_str().unwrap().starts_with("packs/"), "{problems:?}");
}

#[test]
fn corrupt_pack_in_local_repository_is_detected() {
    let scratch = Scratch::new("corrupt-local");
    let root = scratch.join("repo");
    let repo = Repo::Local(root.clone());
    repo.init("256K");
    corrupt_pack_is_detected(&repo, &scratch, |_| {
        let pack_dir =
            std::fs::read_dir(root.join("packs")).unwrap().next().unwrap().unwrap().path();
        let pack = std::fs::read_dir(pack_dir).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&pack).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&pack, bytes).unwrap();
    });
}

#[test]
fn corrupt_pack_in_garage_is_detected() {
    let Some(repo) = Repo::garage("corrupt") else { return };
    let scratch = Scratch::new("corrupt-garage");
    repo.init("256K");
    let (_, store) = repo.s3_store();
    corrupt_pack_is_detected(&repo, &scratch, |_| {
        use ferry::store::ObjectStore;
        let pack = store.list("packs/").unwrap().into_iter().next().unwrap();
        let mut bytes = store.get(&pack.key).unwrap().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        store.put(&pack.key, bytes.into()).unwrap();
    });
}

#[test]
fn unreachable_store_and_wrong_keys_fail_clearly() {
    let Some(repo) = Repo::garage("bad-store") else { return };
    repo.init("256K");
    // Wrong secret key: the store refuses, exit code 4, message says access was denied.
    let started = Instant::now();
    let run =
        repo.ferry_env(&["list"], &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0123456789")]);
    let message = run.fails(4);
    assert!(
        message.to_lowercase().contains("access denied") || message.contains("403"),
        "{message}"
    );
    // Nothing listening: exit code 4, in bounded time, no panic.
    let Repo::S3 { url, .. } = repo else { unreachable!() };
    let dead = Repo::S3 { url, endpoint: "http://127.0.0.1:1".into(), config: None };
    let run = dead.ferry(&["list"]);
    let message = run.fails(4);
    assert!(message.contains("unreachable"), "{message}");
    assert!(!run.stderr.contains("panicked"));
    assert!(started.elapsed() < Duration::from_secs(120));
}

/// SIGINT during a backup: exit code 6, an error event last, and no backup visible.
#[test]
fn sigint_cancels_a_backup_without_a_manifest() {
    let scratch = Scratch::new("cancel");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("1M");
    let source = scratch.join("big.img");
    gen_image(&source, 768 * MIB, "text", 9);
    let (mut child, mut lines) = repo.spawn_backup(&source);
    let mut events = Vec::new();
    // Wait for the start event: the signal handlers are installed and the job is starting; a
    // 768 MiB backup takes seconds, so the signal lands while it runs.
    for line in lines.by_ref() {
        let event: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let kind = event["event"].as_str().unwrap().to_string();
        events.push(event);
        if kind == "start" || kind == "result" {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    for line in lines {
        events.push(serde_json::from_str(&line.unwrap()).unwrap());
    }
    let status = child.wait().unwrap();
    let last = events.last().unwrap();
    assert_eq!(status.code(), Some(6), "events: {events:?}");
    assert_eq!(last["event"], "error");
    assert_eq!(last["kind"], "cancelled");
    assert_eq!(repo.ferry(&["list"]).ok()["backups"].as_array().unwrap().len(), 0);
    // Multipart uploads in flight were aborted, not left behind.
    let pending = std::fs::read_dir(scratch.join("repo/.multipart")).map_or(0, Iterator::count);
    assert_eq!(pending, 0, "multipart uploads left behind");
}

/// Over https with a certificate from an untrusted CA: refused by default (exit 4), accepted with
/// `--s3-no-verify-tls` (the opt-out of Cinder's `backup_s3_verify_ssl = False`).
#[test]
fn tls_verification_is_on_by_default_with_an_opt_out() {
    let Some(Repo::S3 { url, .. }) = Repo::garage("tls") else { return };
    let Ok(endpoint) = std::env::var("FERRY_TEST_S3_TLS_ENDPOINT") else {
        assert!(std::env::var("FERRY_TEST_REQUIRE_S3").is_err(), "TLS endpoint missing");
        return;
    };
    let repo = Repo::S3 { url, endpoint, config: None };
    let message = repo.ferry(&["init"]).fails(4);
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    repo.ferry(&["--s3-no-verify-tls", "init"]).ok();
    let scratch = Scratch::new("tls");
    let source = scratch.join("a.img");
    gen_image(&source, 3 * MIB, "mixed", 4);
    let id = repo
        .ferry(&["--s3-no-verify-tls", "backup", "--source", source.to_str().unwrap()])
        .ok()["backup_id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = scratch.join("b.img");
    repo.ferry(&["--s3-no-verify-tls", "restore", &id, "--target", target.to_str().unwrap()]).ok();
    crate::util::assert_same(&source, &target, 3 * MIB);
}

/// A source that fails mid-read (here: an image file truncated while it is being read) ends
/// the backup with a device error (exit 3) naming the failed read, and no backup is visible.
#[test]
fn source_failing_mid_read_leaves_no_backup() {
    let scratch = Scratch::new("failing-source");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("1M");
    let source = scratch.join("shrinking.img");
    gen_image(&source, 512 * MIB, "text", 13);
    let (mut child, mut lines) = repo.spawn_backup(&source);
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "start");
    std::thread::sleep(Duration::from_millis(100));
    std::fs::OpenOptions::new().write(true).open(&source).unwrap().set_len(MIB).unwrap();
    let events: Vec<serde_json::Value> =
        lines.map(|line| serde_json::from_str(&line.unwrap()).unwrap()).collect();
    let status = child.wait().unwrap();
    let last = events.last().unwrap();
    assert_eq!(status.code(), Some(3), "events: {events:?}");
    assert_eq!(last["kind"], "device");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("read") && message.contains("shrinking.img"), "{message}");
    assert_eq!(repo.ferry(&["list"]).ok()["backups"].as_array().unwrap().len(), 0);
}
