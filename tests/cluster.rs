//! Many hosts, one repository, a distributed store: a 3-node Garage cluster (replication factor
//! 3, `scripts/garage.sh cluster-start`) and ferry processes that the lease logic sees as
//! different hosts (`util::host`: own hostname, boot id and pid namespace).
//!
//! - Three hosts back up overlapping images while a fourth job runs `forget` and `prune` in a
//!   loop, with a grace of 10 s: every committed backup restores byte-identically while prunes
//!   run, packs are deleted, and at the end every unreferenced pack is gone and `check` is clean.
//! - A node killed mid-backup and another mid-prune: both complete (writes need 2 of 3 nodes).
//!   Two nodes killed mid-backup: exit 4 with a store error, nothing committed; once the nodes
//!   are back the same backup succeeds.
//!
//! Needs `FERRY_TEST_CLUSTER_ENDPOINT` and its companions (`DIR/cluster-env`); without them the
//! tests log that they were skipped, unless `FERRY_TEST_REQUIRE_CLUSTER=1` (set by
//! `scripts/test.sh`) makes that a failure. The two tests take turns: one kills nodes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::util::fault_proxy::{FaultConfig, FaultKind, FaultProxy};
use crate::util::host::Host;
use crate::util::{Repo, Run, Scratch, assert_same, deleted_packs};

const MIB: u64 = 1 << 20;
/// The repositories' garbage-collection grace (the minimum), so that space comes back in tests.
const GRACE_SECS: u64 = 10;

/// One test at a time uses the cluster: the node-loss test stops nodes.
static CLUSTER: Mutex<()> = Mutex::new(());

/// The cluster from `DIR/cluster-env`.
struct Cluster {
    endpoint: String,
    bucket: String,
    dir: PathBuf,
    access_key_id: String,
    secret_access_key: String,
}

impl Cluster {
    fn from_env(test: &str) -> Option<Cluster> {
        let var = |name: &str| std::env::var(name).ok();
        let Some(endpoint) = var("FERRY_TEST_CLUSTER_ENDPOINT") else {
            assert!(
                var("FERRY_TEST_REQUIRE_CLUSTER").is_none(),
                "FERRY_TEST_REQUIRE_CLUSTER is set but FERRY_TEST_CLUSTER_ENDPOINT is not"
            );
            eprintln!("skipped {test}: FERRY_TEST_CLUSTER_ENDPOINT not set (run scripts/test.sh)");
            return None;
        };
        Some(Cluster {
            endpoint,
            bucket: var("FERRY_TEST_CLUSTER_BUCKET").unwrap_or_else(|| "ferry-test".into()),
            dir: var("FERRY_TEST_CLUSTER_DIR").expect("FERRY_TEST_CLUSTER_DIR").into(),
            access_key_id: var("FERRY_TEST_CLUSTER_ACCESS_KEY_ID").expect("access key id"),
            secret_access_key: var("FERRY_TEST_CLUSTER_SECRET_ACCESS_KEY").expect("secret"),
        })
    }

    /// A fresh repository location under a unique prefix, reached through `endpoint`.
    fn repo(&self, test: &str, endpoint: &str, config: Option<PathBuf>) -> Repo {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let url = format!("s3://{}/cluster/{test}-{}-{nanos}", self.bucket, std::process::id());
        Repo::S3 { url, endpoint: endpoint.to_owned(), config }
    }

    /// The same repository through another endpoint, or with another config file.
    fn via(repo: &Repo, endpoint: &str, config: Option<PathBuf>) -> Repo {
        let Repo::S3 { url, .. } = repo else { unreachable!("cluster repositories are S3") };
        Repo::S3 { url: url.clone(), endpoint: endpoint.to_owned(), config }
    }

    /// `scripts/garage.sh node-stop|node-start DIR N`.
    fn node(&self, action: &str, node: u32) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage.sh");
        let output =
            Command::new(script).arg(action).arg(&self.dir).arg(node.to_string()).output().unwrap();
        assert!(
            output.status.success(),
            "garage.sh {action} {node}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `ferry --json <repo> <args>` on `host`, as a child process.
    fn spawn(&self, host: &Host, repo: &Repo, args: &[&str]) -> Child {
        host.command(Path::new(env!("CARGO_BIN_EXE_ferry")))
            .arg("--json")
            .args(repo.args())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &self.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_access_key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ferry --json <repo> <args>` on `host`, to the end.
    fn ferry(&self, host: &Host, repo: &Repo, args: &[&str]) -> Run {
        Run::from(self.spawn(host, repo, args).wait_with_output().unwrap())
    }
}

/// Starts every node again when a test ends, passed or not, so the next finds three.
struct NodesBack<'a>(&'a Cluster);

impl Drop for NodesBack<'_> {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage.sh");
        for node in 1..=3 {
            let _ = Command::new(&script)
                .arg("node-start")
                .arg(&self.0.dir)
                .arg(node.to_string())
                .output();
        }
    }
}

/// Hosts 1..=count, or None (skipped) when namespaces cannot be made and are not required.
fn hosts(count: u32, dir: &Path) -> Option<Vec<Host>> {
    let mut hosts = Vec::new();
    for number in 1..=count {
        match Host::start(number, dir) {
            Ok(host) => hosts.push(host),
            Err(error) => {
                assert!(std::env::var("FERRY_TEST_REQUIRE_CLUSTER").is_err(), "{error}");
                eprintln!("skipped: {error}");
                return None;
            }
        }
    }
    let mut boot_ids: Vec<&str> = hosts.iter().map(|host| host.boot_id.as_str()).collect();
    boot_ids.sort_unstable();
    boot_ids.dedup();
    assert_eq!(boot_ids.len(), hosts.len(), "every host has its own boot id");
    Some(hosts)
}

/// 1 MiB of pseudo-random bytes from `seed` (xorshift64).
fn random_chunk(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..MIB / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

/// The image host `host` backs up in round `round`: 16 MiB, of which 11 chunks are the same on
/// every host and in every round, one is a hole, and a quarter is new each round.
fn overlapping_image(path: &Path, host: u64, round: u64) {
    let mut bytes = Vec::with_capacity(16 * MIB as usize);
    for chunk in 0..16u64 {
        if chunk == 15 {
            bytes.extend(std::iter::repeat_n(0u8, MIB as usize));
        } else if (chunk + round + host).is_multiple_of(4) {
            bytes.extend(random_chunk(1_000_000 + host * 10_000 + round * 100 + chunk));
        } else {
            bytes.extend(random_chunk(chunk));
        }
    }
    std::fs::write(path, bytes).unwrap();
}

fn backup_id(result: &Value) -> String {
    result["backup_id"].as_str().unwrap().to_owned()
}

/// Restores `backup` on `host` into a new file and compares it with `image`.
fn restores(cluster: &Cluster, host: &Host, repo: &Repo, backup: &str, image: &Path) {
    let target = image.with_extension(format!("restored-{backup}"));
    let target_text = target.to_str().unwrap();
    cluster.ferry(host, repo, &["restore", backup, "--target", target_text]).ok();
    assert_same(image, &target, std::fs::metadata(image).unwrap().len());
    std::fs::remove_file(&target).unwrap();
}

// Three hosts back up overlapping images, three rounds each, restoring each backup right after
// it commits, while host 1 also runs forget (keep the last 2 per source) and prune in a loop.
// Every restore is byte-identical, prunes delete packs while backups run, and after the last
// backup two prunes a grace apart leave no unreferenced pack and a clean `check`.
#[test]
fn three_hosts_back_up_while_forget_and_prune_run() {
    let _turn = CLUSTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(cluster) = Cluster::from_env("three_hosts") else { return };
    let scratch = Scratch::new("cluster-hosts");
    let Some(hosts) = hosts(3, &scratch.path) else { return };
    let repo = cluster.repo("three-hosts", &cluster.endpoint, None);
    let grace = format!("{GRACE_SECS}s");
    cluster.ferry(&hosts[0], &repo, &["init", "--chunk-size", "1M", "--gc-grace", &grace]).ok();

    let backing_up = AtomicBool::new(true);
    let (deleted, newest) = std::thread::scope(|scope| {
        let maintainer = scope.spawn(|| {
            let mut deleted = 0;
            while backing_up.load(Ordering::SeqCst) {
                cluster.ferry(&hosts[0], &repo, &["forget", "--keep-last", "2"]).ok();
                deleted += deleted_packs(&cluster.ferry(&hosts[0], &repo, &["prune"]).ok());
                std::thread::sleep(Duration::from_millis(500));
            }
            deleted
        });
        let workers: Vec<_> = hosts
            .iter()
            .enumerate()
            .map(|(index, host)| {
                let (cluster, repo, scratch) = (&cluster, &repo, &scratch);
                scope.spawn(move || {
                    let source = scratch.join(&format!("host{index}.img"));
                    let mut newest = String::new();
                    for round in 0..3 {
                        overlapping_image(&source, index as u64, round);
                        let args = ["backup", "--source", source.to_str().unwrap()];
                        // 1 MiB packs hold one chunk each: a forgotten chunk is a whole pack.
                        let result = cluster
                            .ferry(host, repo, &[&args[..], &["--pack-size", "1M"]].concat())
                            .ok();
                        // keep-last 2: this backup is not forgotten before the next one exists.
                        newest = backup_id(&result);
                        restores(cluster, host, repo, &newest, &source);
                    }
                    newest
                })
            })
            .collect();
        let newest: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        backing_up.store(false, Ordering::SeqCst);
        (maintainer.join().unwrap(), newest)
    });

    // Converge: everything unreferenced is condemned (older than the 1 s minimum age), then
    // swept a grace later; no job runs any more, so no lease holds a sweep back.
    cluster.ferry(&hosts[1], &repo, &["forget", "--keep-last", "2"]).ok();
    std::thread::sleep(Duration::from_secs(2));
    let marked = cluster.ferry(&hosts[1], &repo, &["prune"]).ok();
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 2));
    let swept = cluster.ferry(&hosts[2], &repo, &["prune"]).ok();
    let total_deleted = deleted + deleted_packs(&marked) + deleted_packs(&swept);
    // At least the packs of the chunks only round 0 had (forgotten: keep-last 2 of 3 rounds),
    // 4 + 3 + 4 over the three hosts; copies two hosts stored at once come on top.
    assert!(total_deleted >= 11, "{total_deleted} packs reclaimed: {marked}\n{swept}");
    assert!(swept["prune"]["waiting"].as_array().unwrap().is_empty(), "{swept}");
    let checked = cluster.ferry(&hosts[0], &repo, &["check"]).ok();
    assert!(checked["check"]["problems"].as_array().unwrap().is_empty(), "{checked}");
    assert_eq!(checked["check"]["unreferenced_packs"], 0, "{checked}");
    assert_eq!(checked["check"]["backups"], 6, "the last 2 of each of 3 hosts: {checked}");
    // The survivors still restore after the last sweep: the newest round of each host.
    for (index, (host, newest)) in hosts.iter().zip(&newest).enumerate() {
        let source = scratch.join(&format!("host{index}.img"));
        restores(&cluster, host, &repo, newest, &source);
    }
    eprintln!("three hosts: {total_deleted} packs deleted by prunes");
}

/// Starts a backup of `image` on `host` through `proxy`, uploading at most 8 MB/s, and stops
/// `nodes` once 8 MiB more have gone through the proxy, asserting that the backup is still
/// running then; returns the finished run.
fn backup_losing_nodes(
    cluster: &Cluster,
    host: &Host,
    repo: &Repo,
    proxy: &FaultProxy,
    image: &Path,
    nodes: &[u32],
) -> Run {
    let start = proxy.upload_bytes();
    let args = ["backup", "--source", image.to_str().unwrap(), "--limit-upload", "8"];
    let mut child = cluster.spawn(host, repo, &args);
    assert!(
        proxy.wait_upload_bytes(start + 8 * MIB, Duration::from_secs(120)),
        "the backup never uploaded 8 MiB"
    );
    for node in nodes {
        cluster.node("node-stop", *node);
    }
    assert!(child.try_wait().unwrap().is_none(), "the backup ended before the nodes were lost");
    Run::from(child.wait_with_output().unwrap())
}

// A node killed mid-backup, then another mid-prune (during the sweep's first delete): both
// complete. Two nodes killed mid-backup: exit 4 naming the store's error, no panic, nothing
// committed; once they are back the same backup succeeds and restores byte-identically.
#[test]
fn a_lost_node_is_survived_and_two_are_a_clean_error() {
    let _turn = CLUSTER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(cluster) = Cluster::from_env("node_loss") else { return };
    let _nodes_back = NodesBack(&cluster);
    let scratch = Scratch::new("cluster-nodes");
    let Some(hosts) = hosts(2, &scratch.path) else { return };
    let started = std::time::Instant::now();
    let phase =
        |what: &str| eprintln!("node loss: {what} at {:.1} s", started.elapsed().as_secs_f64());
    let upstream = cluster.endpoint.trim_start_matches("http://").parse().unwrap();
    let counting = FaultProxy::start(upstream, FaultConfig::new(1).with_rate(0.0)).unwrap();
    // Holds the sweep's first index delete for 3 s (then drops it: ferry retries).
    let stalling = FaultConfig::new(2)
        .with_kinds([FaultKind::Stall { duration: Duration::from_secs(3) }])
        .only_methods(["DELETE"])
        .only_paths_containing(["/index/"])
        .with_rate(1.0)
        .with_max_faults(1);
    let stalling = FaultProxy::start(upstream, stalling).unwrap();
    let repo = cluster.repo("node-loss", &counting.url(), None);
    let grace = format!("{GRACE_SECS}s");
    cluster.ferry(&hosts[0], &repo, &["init", "--chunk-size", "1M", "--gc-grace", &grace]).ok();
    let first = scratch.join("first.img");
    let bytes: Vec<u8> = (0..48).flat_map(|chunk| random_chunk(500 + chunk)).collect();
    std::fs::write(&first, bytes).unwrap();

    // One node lost mid-backup.
    let run = backup_losing_nodes(&cluster, &hosts[0], &repo, &counting, &first, &[3]);
    let id = backup_id(&run.ok());
    restores(&cluster, &hosts[1], &repo, &id, &first);
    phase("backup and restore with node 3 lost");
    cluster.node("node-start", 3);

    // One node lost mid-prune: the backup is deleted, its packs condemned, and swept a grace
    // later by a prune that loses node 3 while its first delete is held.
    cluster.ferry(&hosts[1], &repo, &["delete", &id]).ok();
    std::thread::sleep(Duration::from_secs(2));
    let marked = cluster.ferry(&hosts[1], &repo, &["prune"]).ok();
    let condemned = marked["prune"]["marked"]["packs"].as_u64().unwrap();
    assert!(condemned >= 1, "{marked}");
    std::thread::sleep(Duration::from_secs(GRACE_SECS + 2));
    let via_stall = Cluster::via(&repo, &stalling.url(), None);
    let mut prune = cluster.spawn(&hosts[1], &via_stall, &["prune"]);
    while stalling.injected().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.node("node-stop", 3);
    assert!(prune.try_wait().unwrap().is_none(), "the prune ended before the node was lost");
    let swept = Run::from(prune.wait_with_output().unwrap()).ok();
    phase("prune with node 3 lost");
    assert_eq!(deleted_packs(&swept), condemned, "{swept}");
    // Checked before node 3 is back: see `settled_check`.
    let checked = cluster.ferry(&hosts[0], &repo, &["check"]).ok();
    assert_eq!(checked["check"]["unreferenced_packs"], 0, "{checked}");
    assert_eq!(checked["check"]["packs"], 0, "{checked}");
    cluster.node("node-start", 3);

    // Two nodes lost mid-backup: a clean store error, nothing committed. Three attempts per
    // request, and 10 s per attempt: Garage 2.5 leaves a part upload that was mid-body when the
    // nodes died unanswered (ferry's per-attempt timeout, 60 s by default, ends it) and answers
    // new requests with 503 at once; so the failure comes in seconds, not minutes.
    let config = scratch.join("few-retries.toml");
    std::fs::write(&config, "[s3]\nmax_attempts = 3\nrequest_timeout_secs = 10\n").unwrap();
    let impatient = Cluster::via(&repo, &counting.url(), Some(config));
    let second = scratch.join("second.img");
    let bytes: Vec<u8> = (0..48).flat_map(|chunk| random_chunk(900 + chunk)).collect();
    std::fs::write(&second, bytes).unwrap();
    let run = backup_losing_nodes(&cluster, &hosts[1], &impatient, &counting, &second, &[2, 3]);
    let message = run.fails(4);
    assert_eq!(run.last()["kind"], "store", "{message}");
    assert!(message.contains("quorum") || message.contains("503"), "{message}");
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    phase("backup failed with nodes 2 and 3 lost");
    cluster.node("node-start", 2);
    cluster.node("node-start", 3);
    phase("nodes 2 and 3 back");
    let listed = cluster.ferry(&hosts[0], &repo, &["list"]).ok();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0, "nothing committed: {listed}");

    // Back to three nodes: the same backup, from the same host, succeeds.
    let result =
        cluster.ferry(&hosts[1], &repo, &["backup", "--source", second.to_str().unwrap()]).ok();
    restores(&cluster, &hosts[0], &repo, &backup_id(&result), &second);
    phase("rerun restored");
    let checked = settled_check(&cluster, &hosts[0], &repo);
    assert_eq!(checked["check"]["backups"], 1, "{checked}");
    assert_eq!(checked["check"]["unreferenced_packs"], 0, "{checked}");
}

/// `check` until it is clean, at most 30 times 2 s apart. A Garage node that was down while
/// objects were deleted lists them again after it rejoins ("ghosts": GET answers 404), until
/// its tables are synchronised: Garage filters deleted entries on each node before merging the
/// quorum's answers. Ghosts only add to a listing, never hide an object, so ferry stays safe
/// (a listed index or manifest that answers 404 is skipped), but `check` reports them.
fn settled_check(cluster: &Cluster, host: &Host, repo: &Repo) -> Value {
    for attempt in 1..=30 {
        let run = cluster.ferry(host, repo, &["check"]);
        if run.code == 0 {
            eprintln!("check clean at attempt {attempt}");
            return run.ok();
        }
        assert_eq!(run.code, 5, "{:?}", run.events);
        std::thread::sleep(Duration::from_secs(2));
    }
    cluster.ferry(host, repo, &["check"]).ok()
}
