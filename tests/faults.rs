//! The real world between ferry and Garage: the project's fault-injecting proxy
//! (`util::fault_proxy`) resets connections mid-body, answers 503 SlowDown and 500, and stalls
//! longer than the request timeout; and backups are killed with SIGKILL mid-upload.
//! Every failure prints the proxy's seed: rerun with `FERRY_FAULT_SEED=<seed>`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::fault_proxy::{FaultConfig, FaultKind, FaultProxy};
use crate::util::{Repo, Scratch, assert_same, gen_image};

const MIB: u64 = 1024 * 1024;

/// A Garage repository reached through a new fault proxy, with a short request timeout so
/// that stalls cost seconds, not minutes.
fn proxied_repo(test: &str, scratch: &Scratch, config: FaultConfig) -> Option<(Repo, FaultProxy)> {
    let Repo::S3 { url, endpoint, .. } = Repo::garage(test)? else { unreachable!() };
    let upstream: SocketAddr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("the test Garage listens on an ip:port");
    let proxy = FaultProxy::start(upstream, config).unwrap();
    let config_path = scratch.join("ferry.toml");
    std::fs::write(
        &config_path,
        "[s3]\nrequest_timeout_secs = 2\nmax_attempts = 12\nretry_max_secs = 120\n",
    )
    .unwrap();
    let repo = Repo::S3 { url, endpoint: proxy.url(), config: Some(config_path) };
    Some((repo, proxy))
}

fn every_kind() -> Vec<FaultKind> {
    vec![
        FaultKind::ResetMidRequestBody,
        FaultKind::ResetMidResponseBody,
        FaultKind::SlowDown503,
        FaultKind::InternalError500,
        FaultKind::Stall { duration: Duration::from_secs(4) },
    ]
}

/// Backs up, restores, compares and verifies; returns the retries both runs reported.
fn backup_and_restore(repo: &Repo, scratch: &Scratch, source: &Path, size: u64, what: &str) -> u64 {
    let run = repo.ferry(&["backup", "--source", source.to_str().unwrap(), "--pack-size", "20M"]);
    let result = run.ok();
    let id = result["backup_id"].as_str().unwrap().to_string();
    let target = scratch.join(&format!("{id}.restored"));
    let restored = repo.restore(&id, &target, "uring", &[]).ok();
    assert_same(source, &target, size);
    repo.ferry(&["verify", &id, "--read-data"]).ok();
    let retries = result["retries"].as_u64().unwrap() + restored["retries"].as_u64().unwrap();
    eprintln!("{what}: backup {id} restored byte-identically after {retries} retries");
    retries
}

/// Faults on 5% of requests (then a storm of 25%): backups of random and mixed images
/// complete, restore byte-identically, and verify.
#[test]
fn backups_survive_injected_faults() {
    let scratch = Scratch::new("faults");
    let seed = FaultConfig::from_env_or(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    )
    .seed;
    let config = FaultConfig::new(seed).with_rate(0.05).with_kinds(every_kind());
    let Some((repo, proxy)) = proxied_repo("faults", &scratch, config.clone()) else { return };
    eprintln!("fault proxy: {config}");
    proxy.pause();
    repo.init("1M");
    proxy.resume();
    let size = 40 * MIB + 12_345;
    let mut retries = 0;
    for (mix, seed) in [("random", 11), ("mixed", 12)] {
        let source = scratch.join(&format!("{mix}.img"));
        gen_image(&source, size, mix, seed);
        let what = format!("{mix} at 5% [{config}]");
        retries += backup_and_restore(&repo, &scratch, &source, size, &what);
    }
    proxy.set_rate(0.25);
    let source = scratch.join("storm.img");
    gen_image(&source, size, "mixed", 13);
    let what = format!("mixed at 25% [{config}]");
    retries += backup_and_restore(&repo, &scratch, &source, size, &what);
    let stats = proxy.stats();
    eprintln!("fault proxy stats: {stats:?}; retries reported: {retries}");
    assert!(stats.faults > 0, "the proxy injected no fault [{config}]: {stats:?}");
    // Faults during verify runs are retried too but not reported in a result field.
    assert!(retries > 0, "faults were injected but no backup or restore retried [{config}]");
}

/// SIGKILL at 20 random points of a backup (by bytes uploaded). After each: every backup in the
/// repository verifies, the rerun completes and reuses what was fully uploaded, and its
/// restore is byte-identical. Multipart uploads the killed runs left are aborted.
#[test]
fn kill_9_at_random_points_leaves_a_consistent_repository() {
    let scratch = Scratch::new("kill9");
    let seed = FaultConfig::from_env_or(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
    )
    .seed;
    let config = FaultConfig::new(seed).with_rate(0.0);
    let Some((repo, proxy)) = proxied_repo("kill9", &scratch, config) else { return };
    eprintln!("kill -9 test: FERRY_FAULT_SEED={seed}");
    repo.init("1M");
    let size = 64 * MIB;
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut reused = 0u64;
    let mut aborted_warnings = 0;
    for round in 0..20u64 {
        let source = scratch.join("volume.img");
        gen_image(&source, size, "random", seed.wrapping_add(round));
        let kill_after = next() % size;
        let start = proxy.upload_bytes();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("--json")
            .args(repo.args())
            // Two parts in flight: packs complete one after another, so kills land between and
            // inside them.
            .args(["backup", "--source", source.to_str().unwrap(), "--pack-size", "20M"])
            .args(["--parts-in-flight", "2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while proxy.upload_bytes() < start + kill_after
            && child.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap_or_default();
        let status = child.wait().unwrap();
        let what = format!("round {round}, killed after {kill_after} bytes (seed {seed})");
        let verify = repo.ferry(&["verify", "--all"]);
        assert_eq!(verify.code, 0, "{what}: verify failed: {}", verify.stderr);
        let run =
            repo.ferry(&["backup", "--source", source.to_str().unwrap(), "--pack-size", "20M"]);
        assert_eq!(run.code, 0, "{what}: rerun failed: {}", run.stderr);
        aborted_warnings += run
            .events
            .iter()
            .filter(|event| {
                event["event"] == "warning"
                    && event["message"].as_str().unwrap_or("").contains("aborted")
            })
            .count();
        let result = run.last();
        reused += result["stats"]["dedup_chunk_count"].as_u64().unwrap();
        let id = result["backup_id"].as_str().unwrap().to_string();
        let target = scratch.join("restored.img");
        let _ = std::fs::remove_file(&target);
        repo.restore(&id, &target, "uring", &[]).ok();
        assert_same(&source, &target, size);
        eprintln!(
            "{what}: exit {status}, rerun reused {} chunks, {aborted_warnings} abort warnings so far",
            result["stats"]["dedup_chunk_count"]
        );
    }
    // Some kills landed after whole packs were stored and their chunks were reused; some
    // landed inside a multipart upload, which the next run aborted.
    assert!(reused > 0, "no rerun reused anything (seed {seed})");
    assert!(aborted_warnings > 0, "no rerun aborted an abandoned upload (seed {seed})");
    let pending = repo.ferry(&["repair"]).ok();
    assert_eq!(pending["repair"]["aborted_uploads"].as_array().unwrap().len(), 0, "{pending}");
}

/// A restore killed mid-way can be rerun onto the same target.
#[test]
fn killed_restore_can_be_rerun() {
    let scratch = Scratch::new("kill9-restore");
    let config = FaultConfig::new(1).with_rate(0.0);
    let Some((repo, proxy)) = proxied_repo("kill9-restore", &scratch, config) else { return };
    repo.init("1M");
    let size = 48 * MIB;
    let source = scratch.join("volume.img");
    gen_image(&source, size, "random", 77);
    let id = repo.backup(&source, "uring")["backup_id"].as_str().unwrap().to_string();
    let target = scratch.join("restored.img");
    let stats_before = proxy.stats();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--json")
        .args(repo.args())
        .args(["restore", &id, "--target", target.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.stats().requests < stats_before.requests + 4
        && child.try_wait().unwrap().is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap_or_default();
    let _ = child.wait().unwrap();
    // The target holds a partial restore (or all of it): rerunning needs --force.
    repo.restore(&id, &target, "uring", &["--force"]).ok();
    assert_same(&source, &target, size);
}

/// --limit-read and --limit-upload hold the rate (a lower bound on the duration only).
#[test]
fn rate_limits_hold() {
    let scratch = Scratch::new("limits");
    let root = scratch.join("repo");
    let repo = Repo::Local(root);
    repo.init("1M");
    let source = scratch.join("a.img");
    gen_image(&source, 24 * MIB, "random", 5);
    let started = Instant::now();
    repo.ferry(&["backup", "--source", source.to_str().unwrap(), "--limit-read", "16"]).ok();
    let read_seconds = started.elapsed().as_secs_f64();
    // 25.2 MB at 16 MB/s: at least 1.5 s (the first chunk passes at once).
    assert!(read_seconds > 1.4, "read limit not applied: {read_seconds} s");
    gen_image(&source, 24 * MIB, "random", 6);
    let started = Instant::now();
    repo.ferry(&[
        "backup",
        "--source",
        source.to_str().unwrap(),
        "--limit-upload",
        "16",
        "--pack-size",
        "4M",
    ])
    .ok();
    let upload_seconds = started.elapsed().as_secs_f64();
    assert!(upload_seconds > 1.2, "upload limit not applied: {upload_seconds} s");
}
