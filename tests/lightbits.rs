//! `--lightbits-volume` and `ferry reclaim` against the project's Lightbits simulator
//! (`scripts/lightbits-sim.py`), which serves the REST API and attaches volumes as loop devices
//! when ferry writes a discovery-client file. Needs root (losetup); skipped with a message
//! otherwise, unless `FERRY_TEST_REQUIRE_LOOP` is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Run, Scratch, gen_image};

const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:ferry-test-host";
const VOLUME_BYTES: u64 = 16 << 20;
const BLOCK_BYTES: u64 = 4096;

/// A running simulator with its directories, and a ferry config pointing at it.
struct Sim {
    child: Child,
    scratch: Scratch,
    base: String,
    agent: ureq::Agent,
}

impl Drop for Sim {
    fn drop(&mut self) {
        // SIGTERM lets the simulator detach its loop devices.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn root_with_loop() -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    let ok = String::from_utf8_lossy(&uid).trim() == "0" && Path::new("/dev/loop-control").exists();
    if !ok {
        assert!(
            std::env::var("FERRY_TEST_REQUIRE_LOOP").is_err(),
            "FERRY_TEST_REQUIRE_LOOP is set but this is not root with loop devices"
        );
        eprintln!("skipped: the Lightbits simulator needs root and loop devices");
    }
    ok
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift) for write number `seed`.
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn sha256_file(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

impl Sim {
    fn start(tag: &str) -> Option<Sim> {
        if !root_with_loop() {
            return None;
        }
        let scratch = Scratch::new(&format!("lightbits-{tag}"));
        for dir in [
            "state",
            "discovery",
            "by-id",
            "sys/class/block",
            "sys/class/nvme",
            "journal",
            "repo-dir",
        ] {
            std::fs::create_dir_all(scratch.join(dir)).unwrap();
        }
        std::fs::write(scratch.join("token"), "sim-token\n").unwrap();
        std::fs::write(scratch.join("wrong-token"), "not-the-token\n").unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lightbits-sim.py");
        let log = std::fs::File::create(scratch.join("sim.log")).unwrap();
        let child = Command::new("python3")
            .arg(script)
            .args(["--port", "0", "--create-delay", "0.2", "--delete-delay", "0.2"])
            .arg("--port-file")
            .arg(scratch.join("port"))
            .arg("--token-file")
            .arg(scratch.join("token"))
            .arg("--state-dir")
            .arg(scratch.join("state"))
            .arg("--discovery-dir")
            .arg(scratch.join("discovery"))
            .arg("--by-id-dir")
            .arg(scratch.join("by-id"))
            .arg("--sysfs-dir")
            .arg(scratch.join("sys/class/block"))
            .arg("--nvme-class-dir")
            .arg(scratch.join("sys/class/nvme"))
            .args(["--api-nodes", "2"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(scratch.join("port")) {
                break text.trim().to_owned();
            }
            assert!(started.elapsed() < Duration::from_secs(20), "simulator did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        let sim = Sim { child, scratch, base: format!("127.0.0.1:{port}"), agent };
        sim.write_config("config.toml", &format!("http://{}", sim.base), "token", "");
        Some(sim)
    }

    /// Writes a ferry config with a local repository and a `[lightbits]` table.
    fn write_config(&self, name: &str, api: &str, token: &str, extra: &str) -> PathBuf {
        self.write_config_apis(name, &[api.to_owned()], token, extra)
    }

    /// Writes a ferry config with several API addresses, tried in this order.
    fn write_config_apis(&self, name: &str, apis: &[String], token: &str, extra: &str) -> PathBuf {
        let path = self.scratch.join(name);
        let text = format!(
            "repository = {repo:?}\n[lightbits]\napi_addresses = {apis:?}\nproject = \"default\"\n\
             token_file = {token:?}\nhostnqn = {HOST_NQN:?}\ndiscovery_dir = {discovery:?}\n\
             by_id_dir = {by_id:?}\nsysfs_root = {sys:?}\njournal_dir = {journal:?}\n\
             poll_interval_secs = 0.1\nwait_timeout_secs = 5\ndevice_timeout_secs = 10\n\
             request_timeout_secs = 5\noperation_timeout_secs = 10\nattempts_max = 3\n{extra}",
            repo = self.scratch.join("repo-dir").display().to_string(),
            token = self.scratch.join(token).display().to_string(),
            discovery = self.scratch.join("discovery").display().to_string(),
            by_id = self.scratch.join("by-id").display().to_string(),
            sys = self.scratch.join("sys").display().to_string(),
            journal = self.scratch.join("journal").display().to_string(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command(&self, config: &str, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command.arg("--json").arg("--config").arg(self.scratch.join(config)).args(args);
        self.fake_nvme_env(&mut command);
        command
    }

    /// The environment of tests/util/fake-nvme.py (inherited through ferry).
    fn fake_nvme_env(&self, command: &mut Command) {
        command
            .env("FAKE_NVME_LOG", self.scratch.join("nvme.log"))
            .env("FAKE_NVME_DISCOVERY_DIR", self.scratch.join("discovery"))
            .env("FAKE_NVME_SYSFS", self.scratch.join("sys"));
    }

    /// Runs the fake `nvme` as an operator would.
    fn nvme(&self, args: &[&str]) {
        let mut command = Command::new(fake_nvme());
        self.fake_nvme_env(&mut command);
        let output = command.args(args).output().unwrap();
        assert!(output.status.success(), "nvme {args:?}: {output:?}");
    }

    /// The argv of every fake `nvme` call so far, and forgets them.
    fn take_nvme_calls(&self) -> Vec<Vec<String>> {
        let path = self.scratch.join("nvme.log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// A REST API call with the simulator's valid token (what another cluster user does).
    fn api(&self, method: &str, path: &str, body: Option<Value>, if_match: Option<&str>) -> Value {
        let token = std::fs::read_to_string(self.scratch.join("token")).unwrap();
        let url = format!("http://{}{path}", self.base);
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(url)
            .header("Authorization", format!("Bearer {}", token.trim()));
        if let Some(etag) = if_match {
            request = request.header("If-Match", etag);
        }
        let request = request.body(body.map(|b| b.to_string()).unwrap_or_default()).unwrap();
        let mut response = self.agent.run(request).unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        assert!(response.status().is_success(), "{method} {path}: {}: {text}", response.status());
        serde_json::from_str(&text).unwrap()
    }

    /// Sets a volume's ACL through the REST API, as Cinder's driver does (GET, PUT If-Match).
    fn set_acl(&self, uuid: &str, acl: &[&str]) {
        let path = format!("/api/v2/projects/default/volumes/{uuid}");
        let volume = self.api("GET", &path, None, None);
        let etag = volume["ETag"].as_str().unwrap().to_owned();
        let body = json!({"acl": {"values": acl}, "IPAcl": volume["IPAcl"]});
        let _ = self.api("PUT", &path, Some(body), Some(&etag));
    }

    /// The namespaces (directory names) the fake NVMe controllers expose.
    fn namespaces(&self) -> Vec<String> {
        entries(&self.scratch.join("sys/class/nvme"))
            .iter()
            .flat_map(|controller| {
                entries(&self.scratch.join("sys/class/nvme").join(controller))
                    .into_iter()
                    .filter(|name| name.contains('n') && name.starts_with("nvme"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The port of each of the simulator's API nodes.
    fn api_ports(&self) -> Vec<u64> {
        self.state()["apiNodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|node| node["port"].as_u64().unwrap())
            .collect()
    }

    /// Spawns a ferry command with its output captured.
    fn spawn(&self, config: &str, args: &[&str]) -> Child {
        self.command(config, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Waits until `ready` holds, while `child` is still running.
    fn wait_until(&self, child: &mut Child, what: &str, ready: &dyn Fn(&Sim) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(self) {
            assert!(Instant::now() < deadline, "{what}: never reached");
            assert!(child.try_wait().unwrap().is_none(), "{what}: ferry ended too early");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn attached(&self) -> bool {
        !self.state()["attachments"].as_array().unwrap().is_empty()
    }

    fn requests(&self) -> Vec<Value> {
        self.call("GET", "/sim/requests", None)["requests"].as_array().unwrap().clone()
    }

    fn ferry_with(&self, config: &str, args: &[&str]) -> Run {
        Run::from(self.command(config, args).output().unwrap())
    }

    fn ferry(&self, args: &[&str]) -> Run {
        self.ferry_with("config.toml", args)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://{}{path}", self.base);
        let request = ureq::http::Request::builder().method(method).uri(url);
        let request = request.body(body.map(|b| b.to_string()).unwrap_or_default()).unwrap();
        let mut response = self.agent.run(request).unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        assert!(response.status().is_success(), "{method} {path}: {}: {text}", response.status());
        serde_json::from_str(&text).unwrap()
    }

    fn state(&self) -> Value {
        self.call("GET", "/sim/state", None)
    }

    /// Creates an Available volume holding `content` (a file), with `acl`; returns its UUID.
    fn volume(&self, name: &str, content: &Path, acl: &[&str]) -> String {
        let body = json!({"project": "default", "name": name,
                          "from_file": content.display().to_string(), "acl": acl});
        self.call("POST", "/sim/volumes", Some(body))["UUID"].as_str().unwrap().to_string()
    }

    fn volume_json(&self, uuid: &str) -> Value {
        self.state()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["UUID"] == uuid)
            .cloned()
            .unwrap_or_else(|| panic!("volume {uuid} gone"))
    }

    fn fault(&self, rule: Value) {
        let _ = self.call("POST", "/sim/faults", Some(rule));
    }

    fn clear_faults(&self) {
        let _ = self.call("DELETE", "/sim/faults", None);
    }

    fn journal_entries(&self) -> Vec<String> {
        entries(&self.scratch.join("journal"))
    }

    /// Asserts the cluster and this host hold nothing of ferry's: no clone, no snapshot, no
    /// attachment, no discovery file, no journal record, and the volumes' ACLs as given.
    fn assert_clean(&self, acls: &[(&str, Value)], context: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = self.state();
            let clones: Vec<&Value> = state["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["name"].as_str().unwrap().starts_with("ferry-"))
                .collect();
            let snapshots = state["snapshots"].as_array().unwrap();
            let attachments = state["attachments"].as_array().unwrap();
            let discovery = entries(&self.scratch.join("discovery"));
            let journal = self.journal_entries();
            let acls_ok = acls.iter().all(|(uuid, acl)| {
                let volume = self.volume_json(uuid);
                volume["acl"]["values"] == *acl
            });
            let clean = clones.is_empty()
                && snapshots.is_empty()
                && attachments.is_empty()
                && discovery.is_empty()
                && journal.is_empty()
                && acls_ok;
            if clean {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: left behind: clones {clones:?}, snapshots {snapshots:?}, \
                 attachments {attachments:?}, discovery files {discovery:?}, journal {journal:?}, \
                 acls ok {acls_ok}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn fake_nvme() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/util/fake-nvme.py")
}

/// Replaces a token file atomically, as a credential rotation would.
fn write_token(path: &Path, token: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, format!("{token}\n")).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|read| read.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A sample volume file of `VOLUME_BYTES`.
fn sample(sim: &Sim, name: &str, seed: u64) -> PathBuf {
    let path = sim.scratch.join(name);
    gen_image(&path, VOLUME_BYTES, "random", seed);
    path
}

/// Backup of an in-use volume while a writer keeps writing through the simulator: the backup
/// equals the volume after exactly some prefix of the writes (the snapshot's point in time),
/// and nothing is left behind. Then a restore straight into another existing volume, read back
/// through the simulator, with its ACL restored exactly.
#[test]
fn lightbits_backup_in_use_then_restore_into_volume() {
    let Some(sim) = Sim::start("in-use") else { return };
    let initial = sample(&sim, "initial.img", 1);
    let source = sim.volume("vol-a", &initial, &["nqn.2014-08.org.nvmexpress:uuid:app-host"]);
    let source_acl = json!(["nqn.2014-08.org.nvmexpress:uuid:app-host"]);
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();

    let stop = Arc::new(AtomicBool::new(false));
    let writes_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (stop, writes_done) = (Arc::clone(&stop), Arc::clone(&writes_done));
        let (base, agent) = (sim.base.clone(), sim.agent.clone());
        let source = source.clone();
        std::thread::spawn(move || {
            let mut writes = Vec::new();
            let blocks = VOLUME_BYTES / BLOCK_BYTES;
            let mut index = 0u64;
            while !stop.load(Ordering::Relaxed) || writes.len() < 5 {
                index += 1;
                let offset = (index * 37 % blocks) * BLOCK_BYTES;
                let data = pattern(index, BLOCK_BYTES as usize);
                let body = json!({"offset": offset, "data_b64": base64(&data)}).to_string();
                let url = format!("http://{base}/sim/volumes/{source}/write");
                let mut response = agent.post(&url).send(body).unwrap();
                let answer: Value =
                    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
                assert_eq!(answer["seq"], index);
                writes.push((offset, data));
                writes_done.store(index, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            writes
        })
    };
    while writes_done.load(Ordering::Relaxed) < 5 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = sim.ferry(&["backup", "--lightbits-volume", "vol-a"]).ok();
    let after_backup = writes_done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes.len() as u64 > after_backup, "the writer kept writing after the backup");
    let backup_id = result["backup_id"].as_str().unwrap().to_string();
    let label = result["source"].as_str().unwrap();
    assert!(label.starts_with("lightbits:default/vol-a (clone "), "source label {label}");
    sim.assert_clean(&[(&source, source_acl.clone())], "after the backup");

    // The restored image must be the initial content plus exactly a prefix of the writes.
    let restored = sim.scratch.join("restored.img");
    let restored_str = restored.to_str().unwrap();
    sim.ferry(&["restore", &backup_id, "--target", restored_str]).ok();
    let image = std::fs::read(&restored).unwrap();
    let mut expected = std::fs::read(&initial).unwrap();
    let mut prefixes = Vec::new();
    for count in 0..=writes.len() {
        if count > 0 {
            let (offset, data) = &writes[count - 1];
            let offset = usize::try_from(*offset).unwrap();
            expected[offset..offset + data.len()].copy_from_slice(data);
        }
        if expected == image {
            prefixes.push(count);
        }
    }
    assert_eq!(prefixes.len(), 1, "image matches prefixes {prefixes:?} of {}", writes.len());
    assert!(prefixes[0] >= 5, "the writes before the backup are in it: {prefixes:?}");
    assert!(prefixes[0] <= after_backup as usize, "no write after the backup is in it");

    // Restore straight into an existing volume that holds other data and is attached nowhere.
    let other = sample(&sim, "other.img", 2);
    let target = sim.volume("vol-b", &other, &[]);
    let target_before = sim.volume_json(&target);
    let run = sim.ferry(&["restore", &backup_id, "--lightbits-volume", "vol-b"]);
    let message = run.fails(8);
    assert!(message.contains("--force"), "{message}");
    sim.assert_clean(&[(&target, target_before["acl"]["values"].clone())], "refused restore");
    sim.ferry(&["restore", &backup_id, "--lightbits-volume", &target, "--force"]).ok();
    let digest = sim.call("GET", &format!("/sim/volumes/{target}/sha256"), None);
    assert_eq!(digest["sha256"], sha256_file(&restored), "the volume holds the backup");
    let target_after = sim.volume_json(&target);
    assert_eq!(target_after["acl"], target_before["acl"]);
    assert_eq!(target_after["IPAcl"], target_before["IPAcl"]);
    sim.assert_clean(&[(&target, target_before["acl"]["values"].clone())], "after the restore");
}

/// Injected failures at every step of the backup flow: each run ends with the expected exit
/// code and leaves no clone, snapshot, ACL entry, attachment, discovery file or journal record;
/// where cleanup itself is made to fail, `ferry reclaim` finishes it once the fault is gone.
#[test]
fn lightbits_injected_failures_leave_nothing() {
    let Some(sim) = Sim::start("faults") else { return };
    let content = sample(&sim, "content.img", 3);
    let source = sim.volume("vol-f", &content, &[]);
    let acl = sim.volume_json(&source)["acl"]["values"].clone();
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let clone_post = |extra: Value| {
        let mut rule = json!({"method": "POST", "path": "/volumes", "clone": true});
        rule.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        rule
    };
    // (rule, exit code, whether cleanup is expected to need a reclaim)
    let cases = [
        (json!({"method": "POST", "path": "/snapshots", "status": 500, "count": -1}), 9, false),
        (json!({"method": "POST", "path": "/snapshots", "status": 503, "count": -1}), 9, false),
        (json!({"method": "POST", "path": "/snapshots", "status": 503, "count": 1}), 0, false),
        (json!({"kind": "fail", "method": "POST", "path": "/snapshots"}), 9, false),
        (clone_post(json!({"status": 500, "count": -1})), 9, false),
        (clone_post(json!({"status": 503, "count": -1})), 9, false),
        (clone_post(json!({"status": 503, "count": 2})), 0, false),
        (clone_post(json!({"kind": "error_after", "status": 500})), 0, false),
        (clone_post(json!({"kind": "stuck"})), 9, false),
        (clone_post(json!({"kind": "fail"})), 9, false),
        (json!({"method": "DELETE", "path": "/volumes/", "status": 500}), 0, false),
        (json!({"method": "DELETE", "path": "/snapshots/", "status": 500}), 0, false),
        (json!({"method": "DELETE", "path": "/snapshots/", "status": 500, "count": -1}), 9, true),
        (json!({"method": "DELETE", "path": "/volumes/", "status": 503, "count": -1}), 9, true),
    ];
    for (rule, code, needs_reclaim) in cases {
        let context = rule.to_string();
        sim.fault(rule);
        let run = sim.ferry(&["backup", "--lightbits-volume", "vol-f"]);
        if code == 0 {
            run.ok();
        } else {
            let message = run.fails(code);
            assert!(!message.is_empty(), "{context}");
        }
        sim.clear_faults();
        if needs_reclaim {
            assert!(!sim.journal_entries().is_empty(), "{context}: the leftover is journalled");
            let report = sim.ferry(&["reclaim"]).ok();
            assert!(!report["reclaim"]["items"].as_array().unwrap().is_empty(), "{context}");
        }
        sim.assert_clean(&[(&source, acl.clone())], &context);
    }
}

/// Starts `ferry backup --lightbits-volume` (read-limited so that it lasts), kills it with
/// SIGKILL once `ready` holds, then checks that `recover` (a reclaim, or the next backup) leaves
/// the cluster as it was.
fn kill_at(sim: &Sim, source: &str, what: &str, ready: &dyn Fn(&Sim) -> bool, reclaim: bool) {
    let acl = sim.volume_json(source)["acl"]["values"].clone();
    let mut child = sim
        .command("config.toml", &["backup", "--lightbits-volume", "vol-k", "--limit-read", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(sim) {
        assert!(Instant::now() < deadline, "{what}: never reached");
        assert!(child.try_wait().unwrap().is_none(), "{what}: ferry ended before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(!sim.journal_entries().is_empty(), "{what}: the killed run left journal records");
    if reclaim {
        let report = sim.ferry(&["reclaim"]).ok();
        assert!(!report["reclaim"]["items"].as_array().unwrap().is_empty(), "{what}");
    } else {
        let run = sim.ferry(&["backup", "--lightbits-volume", "vol-k"]);
        run.ok();
        let reclaimed = run.events.iter().any(|event| {
            event["event"] == "warning" && event["message"].as_str().unwrap().contains("reclaimed")
        });
        assert!(reclaimed, "{what}: the next backup reclaimed first: {:?}", run.events);
    }
    sim.assert_clean(&[(source, acl)], what);
}

/// kill -9 of ferry at each step of a backup: once the snapshot exists, once the clone exists,
/// once the clone is attached, and mid-data; then `ferry reclaim` (or the next backup) leaves
/// the cluster as it was. Also kill -9 of a restore into a volume: the reclaim restores its ACL.
#[test]
fn lightbits_kill9_then_reclaim() {
    let Some(sim) = Sim::start("kill") else { return };
    let content = sample(&sim, "content.img", 4);
    let source = sim.volume("vol-k", &content, &[]);
    let source_acl = sim.volume_json(&source)["acl"]["values"].clone();
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let has = |key: &'static str| move |sim: &Sim| !sim.state()[key].as_array().unwrap().is_empty();
    let clone_exists = |sim: &Sim| {
        sim.state()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"].as_str().unwrap().starts_with("ferry-clone-"))
    };
    let mid_data = |sim: &Sim| {
        // The read limit of 2 MB/s puts the reader well inside the 16 MiB volume after 1 s.
        !sim.state()["attachments"].as_array().unwrap().is_empty() && {
            std::thread::sleep(Duration::from_secs(1));
            true
        }
    };
    kill_at(&sim, &source, "snapshot exists", &has("snapshots"), true);
    kill_at(&sim, &source, "clone exists", &clone_exists, true);
    kill_at(&sim, &source, "attached", &has("attachments"), true);
    kill_at(&sim, &source, "mid-data", &mid_data, false);

    // A restore killed while the target is attached: reclaim restores the ACL exactly.
    let backups = sim.ferry(&["list"]).ok();
    let backup_id = backups["backups"][0]["backup_id"].as_str().unwrap().to_string();
    let target = sim.volume("vol-r", &content, &[]);
    let target_acl = sim.volume_json(&target)["acl"]["values"].clone();
    let mut child = sim
        .command("config.toml", &["restore", &backup_id, "--lightbits-volume", "vol-r", "--force"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.volume_json(&target)["acl"]["values"] == target_acl {
        assert!(Instant::now() < deadline, "the restore never changed the ACL");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    let _ = child.wait();
    sim.ferry(&["reclaim"]).ok();
    sim.assert_clean(&[(&source, source_acl), (&target, target_acl)], "killed restore");
}

/// Wrong token, unknown volume, a volume attached elsewhere without --force, and an unreachable
/// cluster: each a clear message and its exit code, and nothing left behind.
#[test]
fn lightbits_errors_have_clear_messages_and_codes() {
    let Some(sim) = Sim::start("errors") else { return };
    let content = sample(&sim, "content.img", 5);
    let other_host = "nqn.2014-08.org.nvmexpress:uuid:other-host";
    let source = sim.volume("vol-e", &content, &[other_host]);
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let backup = sim.ferry(&["backup", "--lightbits-volume", "vol-e"]).ok();
    let backup_id = backup["backup_id"].as_str().unwrap();

    let api = format!("http://{}", sim.base);
    sim.write_config("wrong-token.toml", &api, "wrong-token", "");
    let message =
        sim.ferry_with("wrong-token.toml", &["backup", "--lightbits-volume", "vol-e"]).fails(9);
    assert!(message.contains("refused the token"), "{message}");
    assert!(!message.contains("not-the-token"), "the token is never shown: {message}");

    let message = sim.ferry(&["backup", "--lightbits-volume", "no-such-volume"]).fails(7);
    assert!(message.contains("no-such-volume") && message.contains("not found"), "{message}");

    let message = sim.ferry(&["restore", backup_id, "--lightbits-volume", "vol-e"]).fails(8);
    assert!(message.contains("attached elsewhere") && message.contains("--force"), "{message}");

    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    sim.write_config("unreachable.toml", &format!("http://{closed_port}"), "token", "");
    let message =
        sim.ferry_with("unreachable.toml", &["backup", "--lightbits-volume", "vol-e"]).fails(9);
    assert!(message.contains("no lightbits api address answered"), "{message}");
    let message = sim.ferry_with("unreachable.toml", &["reclaim"]);
    message.ok();

    let message = sim.ferry(&["backup", "--source", "/dev/null", "--lightbits-volume", "x"]);
    assert_eq!(message.code, 2);
    sim.assert_clean(&[(&source, json!([other_host]))], "after the errors");
}

/// SIGTERM while the clone is attached and being read: ferry stops the data plane, then its
/// guards detach, delete the clone and clear the journal before it exits with code 6.
#[test]
fn lightbits_sigterm_cleans_up_before_exit_6() {
    let Some(sim) = Sim::start("sigterm") else { return };
    let content = sample(&sim, "content.img", 6);
    let source = sim.volume("vol-t", &content, &[]);
    let acl = sim.volume_json(&source)["acl"]["values"].clone();
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let child = sim
        .command("config.toml", &["backup", "--lightbits-volume", "vol-t", "--limit-read", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.state()["attachments"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let run = Run::from(child.wait_with_output().unwrap());
    let message = run.fails(6);
    assert!(message.contains("cancel"), "{message}");
    sim.assert_clean(&[(&source, acl)], "after SIGTERM");
}

/// `--format cinder` with `--lightbits-volume`: the same clone lifecycle as a native backup (an
/// in-use volume's point-in-time clone, nothing left behind), Cinder's own driver restores the
/// backup byte-identically, ferry restores it straight into another volume, and a kill -9
/// mid-data leaves no `_metadata` and nothing on the cluster once `reclaim` runs.
#[test]
fn lightbits_cinder_format_backup_restore_and_kill() {
    let Some(py) = crate::cinder::cinder_py("lightbits_cinder_format_backup_restore_and_kill")
    else {
        return;
    };
    let Some(sim) = Sim::start("cinder") else { return };
    let endpoint = std::env::var("FERRY_TEST_S3_ENDPOINT").unwrap();
    let bucket = std::env::var("FERRY_TEST_S3_BUCKET").unwrap_or_else(|_| "ferry-test".into());
    let repo = format!("s3://{bucket}");
    let s3 = ["--repo", &repo, "--s3-endpoint", &endpoint, "--s3-region", "garage"];
    let content = sample(&sim, "content.img", 9);
    let source = sim.volume("vol-c", &content, &["nqn.2014-08.org.nvmexpress:uuid:app-host"]);
    let source_acl = sim.volume_json(&source)["acl"]["values"].clone();
    let (backup, volume) = (crate::cinder::uuid(), crate::cinder::uuid());
    let cinder = ["--format", "cinder", "--cinder-object-size", "4194304"];
    let mut args: Vec<&str> = s3.to_vec();
    args.extend(["backup", "--lightbits-volume", "vol-c", "--cinder-backup-id", &backup]);
    args.extend(["--cinder-volume-id", &volume]);
    args.extend(cinder);
    let result = sim.ferry(&args).ok();
    assert!(result["source"].as_str().unwrap().starts_with("lightbits:default/vol-c (clone "));
    sim.assert_clean(&[(&source, source_acl.clone())], "after the cinder-format backup");

    // Cinder's own driver restores it byte-identically.
    let by_cinder = sim.scratch.join("by-cinder.img");
    crate::cinder::cinder_restore(&py, &backup, &by_cinder, VOLUME_BYTES);
    assert_eq!(sha256_file(&by_cinder), sha256_file(&content));

    // ferry restores it straight into another existing volume.
    let other = sample(&sim, "other.img", 10);
    let target = sim.volume("vol-t", &other, &[]);
    let target_acl = sim.volume_json(&target)["acl"]["values"].clone();
    let mut args: Vec<&str> = s3.to_vec();
    args.extend(["restore", "--format", "cinder", &backup, "--cinder-volume-id", &volume]);
    args.extend(["--lightbits-volume", "vol-t", "--force"]);
    sim.ferry(&args).ok();
    let digest = sim.call("GET", &format!("/sim/volumes/{target}/sha256"), None);
    assert_eq!(digest["sha256"], sha256_file(&content), "the volume holds the backup");
    sim.assert_clean(&[(&source, source_acl.clone()), (&target, target_acl)], "after restore");

    // kill -9 mid-data: reclaim leaves the cluster as it was, and the backup is not visible.
    let killed = crate::cinder::uuid();
    let mut args: Vec<&str> = s3.to_vec();
    args.extend(["backup", "--lightbits-volume", "vol-c", "--cinder-backup-id", &killed]);
    args.extend(["--cinder-volume-id", &volume, "--limit-read", "2"]);
    args.extend(cinder);
    let mut command = sim.command("config.toml", &args);
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sim.state()["attachments"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the cinder-format backup never attached");
        assert!(child.try_wait().unwrap().is_none(), "ferry ended before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    child.kill().unwrap();
    let _ = child.wait();
    sim.ferry(&["reclaim"]).ok();
    sim.assert_clean(&[(&source, source_acl)], "killed cinder-format backup");
    let script = "vol, bid = sys.argv[1:3]\n\
        keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, \
        Prefix='volume_%s/' % vol) for o in p.get('Contents', [])]\n\
        print(len([k for k in keys if bid in k and k.endswith('_metadata')]))\n";
    assert_eq!(crate::cinder::boto(&py, script, &[&volume, &killed]).trim(), "0");
}

/// `attach_mode = "nvme-connect"` on a host where the cluster's one subsystem carries other
/// volumes too. While a backup reads its clone, another user attaches a second volume to this
/// host: the backup's detach sees that volume's namespace on the controller, issues no
/// `nvme disconnect`, warns, and its own namespace goes away with its clone's ACL entry. With no
/// other namespace, the next backup disconnects as before.
#[test]
fn lightbits_nvme_connect_never_drops_other_volumes() {
    let Some(sim) = Sim::start("nvme") else { return };
    let content = sample(&sim, "content.img", 7);
    let source = sim.volume("vol-n", &content, &[]);
    let acl = sim.volume_json(&source)["acl"]["values"].clone();
    let app_host = "nqn.2014-08.org.nvmexpress:uuid:app-host";
    let other = sim.volume("vol-other", &content, &[app_host]);
    let other_nsid = sim.volume_json(&other)["nsid"].as_u64().unwrap();
    let subsys_nqn = sim.state()["cluster"]["subsystemNQN"].as_str().unwrap().to_owned();
    let api = format!("http://{}", sim.base);
    let extra = format!("attach_mode = \"nvme-connect\"\nnvme_binary = {:?}\n", fake_nvme());
    sim.write_config("nvme.toml", &api, "token", &extra);
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();

    let mut child =
        sim.spawn("nvme.toml", &["backup", "--lightbits-volume", "vol-n", "--limit-read", "2"]);
    sim.wait_until(&mut child, "clone attached", &|sim| {
        sim.attached() && !sim.namespaces().is_empty()
    });
    let clone_namespace = sim.namespaces();
    assert_eq!(clone_namespace.len(), 1, "{clone_namespace:?}");
    // Nova (or Cinder) attaches another volume of the same cluster to this host.
    sim.set_acl(&other, &[app_host, HOST_NQN]);
    let other_namespace = format!("nvme0n{other_nsid}");
    sim.wait_until(&mut child, "the other namespace", &|sim| {
        sim.namespaces().contains(&other_namespace)
    });
    let run = Run::from(child.wait_with_output().unwrap());
    run.ok();
    let calls = sim.take_nvme_calls();
    assert!(calls.iter().all(|argv| argv[0] == "connect"), "no disconnect: {calls:?}");
    assert_eq!(calls.len(), 3, "one connect per node: {calls:?}");
    let warned = run.warnings();
    assert!(
        warned.iter().any(|w| w.contains("left the NVMe connection") && w.contains(&other)),
        "{warned:?}"
    );
    // The backup's own namespace went with its clone; the other volume is still there.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.namespaces() != [other_namespace.clone()] {
        assert!(Instant::now() < deadline, "namespaces {:?}", sim.namespaces());
        std::thread::sleep(Duration::from_millis(20));
    }
    let attachments = sim.state()["attachments"].clone();
    assert_eq!(attachments.as_array().unwrap().len(), 1, "{attachments}");
    assert_eq!(attachments[0]["volumeUUID"], other);
    assert!(sim.journal_entries().is_empty(), "{:?}", sim.journal_entries());

    // The other user detaches; the operator drops the idle connection.
    sim.set_acl(&other, &[app_host]);
    sim.nvme(&["disconnect", "-n", &subsys_nqn]);
    let _ = sim.take_nvme_calls();
    sim.assert_clean(
        &[(&source, acl.clone()), (&other, json!([app_host]))],
        "after the shared detach",
    );

    // Nothing else on the subsystem: ferry connects and disconnects as before.
    let run = sim.ferry_with("nvme.toml", &["backup", "--lightbits-volume", "vol-n"]);
    run.ok();
    assert!(run.warnings().is_empty(), "{:?}", run.events);
    let calls = sim.take_nvme_calls();
    let disconnects: Vec<&Vec<String>> =
        calls.iter().filter(|argv| argv[0] == "disconnect").collect();
    assert_eq!(disconnects, [&vec!["disconnect".to_owned(), "-n".to_owned(), subsys_nqn.clone()]]);
    assert_eq!(calls.last().unwrap()[0], "disconnect", "{calls:?}");
    assert!(sim.namespaces().is_empty());
    sim.assert_clean(
        &[(&source, acl.clone()), (&other, json!([app_host]))],
        "after the second backup",
    );
}

/// The token rotates while a backup reads its clone: the next API call gets 401, ferry re-reads
/// the token file, and the job finishes and cleans up. Then the token is revoked mid-backup with
/// no replacement: exit 9, the token never shown, the leftovers journalled; once a valid token
/// is back, `ferry reclaim` leaves nothing.
#[test]
fn lightbits_token_rotated_then_revoked_mid_backup() {
    let Some(sim) = Sim::start("token") else { return };
    let content = sample(&sim, "content.img", 8);
    let source = sim.volume("vol-t", &content, &[]);
    let acl = sim.volume_json(&source)["acl"]["values"].clone();
    let api = format!("http://{}", sim.base);
    write_token(&sim.scratch.join("ferry-token"), "sim-token");
    sim.write_config("rotating.toml", &api, "ferry-token", "");
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let backup_args = ["backup", "--lightbits-volume", "vol-t", "--limit-read", "2"];

    let mut child = sim.spawn("rotating.toml", &backup_args);
    sim.wait_until(&mut child, "clone attached", &|sim| sim.attached());
    write_token(&sim.scratch.join("token"), "rotated-token-1");
    write_token(&sim.scratch.join("ferry-token"), "rotated-token-1");
    let run = Run::from(child.wait_with_output().unwrap());
    run.ok();
    let refused = sim.requests().iter().filter(|r| r["status"] == 401).count();
    assert!(refused >= 1, "the old token was refused once, then the new one used");
    sim.assert_clean(&[(&source, acl.clone())], "after the rotation");

    let mut child = sim.spawn("rotating.toml", &backup_args);
    sim.wait_until(&mut child, "clone attached", &|sim| sim.attached());
    write_token(&sim.scratch.join("token"), "rotated-token-2");
    let run = Run::from(child.wait_with_output().unwrap());
    let message = run.fails(9);
    assert!(message.contains("refused the token"), "{message}");
    let shown = format!("{:?} {}", run.events, run.stderr);
    assert!(!shown.contains("rotated-token"), "a token was shown: {shown}");
    assert!(!sim.journal_entries().is_empty(), "the clone it could not delete is journalled");
    let reclaim = sim.ferry_with("rotating.toml", &["reclaim"]);
    assert_eq!(reclaim.code, 9, "still no valid token: {:?}", reclaim.events);
    write_token(&sim.scratch.join("ferry-token"), "rotated-token-2");
    let report = sim.ferry_with("rotating.toml", &["reclaim"]).ok();
    assert!(!report["reclaim"]["items"].as_array().unwrap().is_empty());
    sim.assert_clean(&[(&source, acl)], "after the revocation and reclaim");
}

/// Two API addresses; the one ferry uses stops answering mid-job. A backup whose first address
/// hangs once the clone is attached finishes through the second and deletes its clone; a restore
/// whose ACL change is the last request the first address takes (the reply lost, the node down
/// from then on) restores through the second and puts the ACL back.
#[test]
fn lightbits_api_node_lost_mid_backup_and_restore() {
    let Some(sim) = Sim::start("nodes") else { return };
    let content = sample(&sim, "content.img", 9);
    let source = sim.volume("vol-s", &content, &[]);
    let acl = sim.volume_json(&source)["acl"]["values"].clone();
    let ports = sim.api_ports();
    let apis = [format!("http://127.0.0.1:{}", ports[1]), format!("http://127.0.0.1:{}", ports[0])];
    sim.write_config_apis("nodes.toml", &apis, "token", "");
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();

    let mut child =
        sim.spawn("nodes.toml", &["backup", "--lightbits-volume", "vol-s", "--limit-read", "2"]);
    sim.wait_until(&mut child, "clone attached", &|sim| sim.attached());
    let served_by_1 = sim.requests().iter().filter(|r| r["node"] == 1).count();
    assert!(served_by_1 > 0, "ferry used the first address until now");
    let _ = sim.call("POST", "/sim/api-nodes/1", Some(json!({"state": "hang"})));
    let run = Run::from(child.wait_with_output().unwrap());
    let result = run.ok();
    let requests = sim.requests();
    let clone_delete = requests
        .iter()
        .find(|r| {
            r["method"] == "DELETE"
                && r["status"] == 200
                && r["target"].as_str().unwrap().contains("/volumes/")
        })
        .expect("the clone was deleted");
    assert_eq!(clone_delete["node"], 0, "{clone_delete}");
    sim.assert_clean(&[(&source, acl.clone())], "after the backup");
    // A hung request is logged (unanswered) once the node lets go of it.
    let _ = sim.call("POST", "/sim/api-nodes/1", Some(json!({"state": "up"})));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sim.requests().iter().any(|r| r["node"] == 1 && r["status"] == 0) {
        assert!(Instant::now() < deadline, "node 1 hung a request: {:?}", sim.requests());
        std::thread::sleep(Duration::from_millis(20));
    }

    let backup_id = result["backup_id"].as_str().unwrap().to_owned();
    let target = sim.volume("vol-target", &sample(&sim, "other.img", 10), &[]);
    let acl_put = format!("/volumes/{target}$");
    sim.fault(json!({"kind": "down", "method": "PUT", "path": acl_put}));
    sim.ferry_with(
        "nodes.toml",
        &["restore", &backup_id, "--lightbits-volume", "vol-target", "--force"],
    )
    .ok();
    let nodes = sim.state()["apiNodes"].clone();
    assert_eq!(nodes[1]["state"], "down", "the fault took node 1 down: {nodes}");
    let puts: Vec<Value> = sim
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "PUT" && r["target"].as_str().unwrap().ends_with(&target))
        .collect();
    assert_eq!(puts[0]["node"], 1, "{puts:?}");
    assert_eq!(puts[0]["status"], 0, "the ACL change's reply was lost: {puts:?}");
    assert!(puts[1..].iter().all(|r| r["node"] == 0), "{puts:?}");
    let digest = sim.call("GET", &format!("/sim/volumes/{target}/sha256"), None);
    assert_eq!(digest["sha256"], sha256_file(&content), "the volume holds the backup");
    sim.assert_clean(&[(&source, acl.clone()), (&target, acl)], "after the restore");
}

/// Two jobs on one volume at once: while a backup reads its clone, a second backup and a restore
/// into the same volume are refused with exit 8 naming the job that holds it; a backup of another
/// volume runs; once the first ends, the volume is free again.
#[test]
fn lightbits_two_jobs_on_one_volume() {
    let Some(sim) = Sim::start("two-jobs") else { return };
    let content = sample(&sim, "content.img", 11);
    let busy = sim.volume("vol-busy", &content, &[]);
    let free = sim.volume("vol-free", &content, &[]);
    let acl = sim.volume_json(&busy)["acl"]["values"].clone();
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let mut child = sim
        .spawn("config.toml", &["backup", "--lightbits-volume", "vol-busy", "--limit-read", "2"]);
    sim.wait_until(&mut child, "clone attached", &|sim| sim.attached());

    let message = sim.ferry(&["backup", "--lightbits-volume", "vol-busy"]).fails(8);
    assert!(
        message.contains("in use by another ferry job") && message.contains("pid"),
        "{message}"
    );
    let other = sim.ferry(&["backup", "--lightbits-volume", "vol-free"]).ok();
    let backup_id = other["backup_id"].as_str().unwrap().to_owned();
    let message =
        sim.ferry(&["restore", &backup_id, "--lightbits-volume", &busy, "--force"]).fails(8);
    assert!(message.contains("in use by another ferry job"), "{message}");
    assert!(child.try_wait().unwrap().is_none(), "the first backup is still running");
    Run::from(child.wait_with_output().unwrap()).ok();

    sim.ferry(&["backup", "--lightbits-volume", "vol-busy"]).ok();
    sim.assert_clean(&[(&busy, acl.clone()), (&free, acl)], "after both jobs");
}

/// Writes `data` at `offset` of volume `uuid` through the simulator and into `mirror`.
fn write_volume(sim: &Sim, uuid: &str, mirror: &mut [u8], offset: u64, data: &[u8]) {
    let body = json!({"offset": offset, "data_b64": base64(data)});
    let _ = sim.call("POST", &format!("/sim/volumes/{uuid}/write"), Some(body));
    let start = usize::try_from(offset).unwrap();
    mirror[start..start + data.len()].copy_from_slice(data);
}

/// The ferry snapshots the simulator holds, by name.
fn ferry_snapshots(sim: &Sim) -> Vec<String> {
    let mut names: Vec<String> = sim.state()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|snapshot| snapshot["name"].as_str().unwrap().to_owned())
        .filter(|name| name.starts_with("ferry-snap-"))
        .collect();
    names.sort();
    names
}

/// Restores `backup_id` to a file and compares it with `expected`.
fn assert_restores(sim: &Sim, backup_id: &str, expected: &[u8]) {
    let target = sim.scratch.join(&format!("{backup_id}.restored"));
    sim.ferry(&["restore", backup_id, "--target", target.to_str().unwrap()]).ok();
    assert!(std::fs::read(&target).unwrap() == expected, "backup {backup_id} restores wrong");
    std::fs::remove_file(&target).unwrap();
}

/// A `--lightbits-keep-base` backup that must fall back to a full read, saying `why`.
fn full_read_because(sim: &Sim, why: &str) -> Value {
    let run = sim.ferry(&["backup", "--lightbits-volume", "vol-i", "--lightbits-keep-base"]);
    let result = run.ok();
    let said = run.warnings().join("\n");
    assert!(said.contains(why) && said.contains("reading the whole"), "{why}: {said}");
    assert!(result.get("base").is_none(), "{why}: {result}");
    assert_eq!(result["stats"]["bytes_read"], result["volume_size_bytes"], "{why}");
    result
}

/// Snapshot diffs as the source of incrementals: a backup keeps its snapshot as the next run's
/// base; after scattered small writes, one large region and a write at the last LBA, the next
/// backup reads only the touched chunks (the job's byte counter), every backup of the chain
/// restores byte-identical, and exactly one base is left. A lying diff is caught by the
/// sampling check; every fallback (API unsupported, base gone, resized, parent missing, parent
/// of another volume) is a warning and a full read that succeeds; kill -9 between "snapshot
/// kept" and the commit, then reclaim and the next run, leave exactly one base.
#[test]
fn lightbits_incremental_chain_fallbacks_and_kill() {
    let Some(sim) = Sim::start("incremental") else { return };
    let content = sample(&sim, "content.img", 9);
    let uuid = sim.volume("vol-i", &content, &[]);
    let mut mirror = std::fs::read(&content).unwrap();
    sim.ferry(&["init", "--chunk-size", "64K"]).ok();
    let chunk = 64 * 1024u64;
    let keep = ["backup", "--lightbits-volume", "vol-i", "--lightbits-keep-base"];

    let full = sim.ferry(&keep).ok();
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    assert!(full.get("base").is_none());
    assert_eq!(ferry_snapshots(&sim), [format!("ferry-snap-{full_id}")]);
    assert_eq!(sim.journal_entries(), [format!("{full_id}.base.json")]);
    let at_full = mirror.clone();

    // Scattered small writes, one large region, and a write at the last LBA.
    let mut touched = std::collections::BTreeSet::new();
    for i in 0..12u64 {
        let offset = (i * 1_234_567) % (VOLUME_BYTES - 4096) / 512 * 512;
        write_volume(&sim, &uuid, &mut mirror, offset, &pattern(100 + i, 512));
        let _ = touched.insert(offset / chunk);
    }
    write_volume(&sim, &uuid, &mut mirror, 5 << 20, &pattern(200, 1 << 20));
    touched.extend((5 << 20) / chunk..(6 << 20) / chunk);
    write_volume(&sim, &uuid, &mut mirror, VOLUME_BYTES - 512, &pattern(201, 512));
    let _ = touched.insert((VOLUME_BYTES - 1) / chunk);
    let run = sim.ferry(&keep);
    let second = run.ok();
    assert!(run.warnings().is_empty(), "{:?}", run.warnings());
    let second_id = second["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(second["base"]["parent_backup_id"], full_id.as_str());
    assert_eq!(second["base"]["chunks_read"], touched.len(), "{second}");
    let sampled = second["base"]["chunks_sampled"].as_u64().unwrap();
    assert_eq!(second["stats"]["bytes_read"], (touched.len() as u64 + sampled) * chunk);
    assert_eq!(ferry_snapshots(&sim), [format!("ferry-snap-{second_id}")]);
    assert_eq!(sim.journal_entries(), [format!("{second_id}.base.json")]);
    let at_second = mirror.clone();
    assert_restores(&sim, &full_id, &at_full);
    assert_restores(&sim, &second_id, &at_second);

    // A diff that leaves out a written range: caught by sampling every unchanged chunk.
    let _ = sim.call("POST", "/sim/diff", Some(json!({"hide": [[2048, 2048]]})));
    write_volume(&sim, &uuid, &mut mirror, 2048 * 512, &pattern(300, 512));
    let run = sim.ferry(&[&keep[..], &["--sample-unchanged", "100000"]].concat());
    let lied = run.ok();
    let said = run.warnings().join("\n");
    assert!(said.contains("CHANGE LIST IS WRONG"), "{said}");
    assert!(lied.get("base").is_none(), "{lied}");
    assert_restores(&sim, lied["backup_id"].as_str().unwrap(), &mirror);
    let _ = sim.call("POST", "/sim/diff", Some(json!({"hide": []})));

    // Every fallback, once each.
    let _ = sim.call("POST", "/sim/diff", Some(json!({"unsupported": 501})));
    full_read_because(&sim, "does not serve the changed-blocks diff (HTTP 501");
    let _ = sim.call("POST", "/sim/diff", Some(json!({"unsupported": 404})));
    full_read_because(&sim, "does not serve the changed-blocks diff (HTTP 404");
    let _ = sim.call("POST", "/sim/diff", Some(json!({"unsupported": null})));
    let base_uuid = sim.state()["snapshots"][0]["UUID"].as_str().unwrap().to_owned();
    let _ =
        sim.api("DELETE", &format!("/api/v2/projects/default/snapshots/{base_uuid}"), None, None);
    while !ferry_snapshots(&sim).is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    full_read_because(&sim, "is gone");
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let etag = sim.api("GET", &path, None, None)["ETag"].as_str().unwrap().to_owned();
    let grown = VOLUME_BYTES + (1 << 20);
    let _ = sim.api("PUT", &path, Some(json!({"size": grown.to_string()})), Some(&etag));
    mirror.resize(usize::try_from(grown).unwrap(), 0);
    full_read_because(&sim, "the volume was resized");
    let base_record = sim.journal_entries()[0].clone();
    let parent_id = base_record.trim_end_matches(".base.json").to_owned();
    std::fs::remove_file(sim.scratch.join("repo-dir/backups").join(&parent_id)).unwrap();
    full_read_because(&sim, &format!("parent backup {parent_id}"));
    let other_content = sample(&sim, "other.img", 10);
    let _other = sim.volume("vol-o", &other_content, &[]);
    let other = sim.ferry(&["backup", "--lightbits-volume", "vol-o"]).ok();
    let record_path = sim.scratch.join("journal").join(&sim.journal_entries()[0]);
    let mut record: Value =
        serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    record["resource"]["backup_id"] = other["backup_id"].clone();
    std::fs::write(&record_path, record.to_string()).unwrap();
    let last_full = full_read_because(&sim, "is of another source");
    assert_eq!(ferry_snapshots(&sim).len(), 1, "one base after every fallback");
    assert_restores(&sim, last_full["backup_id"].as_str().unwrap(), &mirror);

    // kill -9 between "snapshot kept" and the commit: reclaim leaves exactly the old base.
    let old_base = ferry_snapshots(&sim);
    write_volume(&sim, &uuid, &mut mirror, 3 << 20, &pattern(400, 4096));
    kill_during_diff(&sim, &keep);
    sim.ferry(&["reclaim"]).ok();
    assert_eq!(ferry_snapshots(&sim), old_base, "reclaim keeps exactly the committed base");
    let run = sim.ferry(&keep);
    let next = run.ok();
    assert_eq!(next["base"]["chunks_read"], 1, "{next}");
    assert_eq!(ferry_snapshots(&sim).len(), 1);
    assert_ne!(ferry_snapshots(&sim), old_base);
    assert_restores(&sim, next["backup_id"].as_str().unwrap(), &mirror);
    assert_restores(&sim, &second_id, &at_second);
}

/// Runs ferry with `args` (a `--lightbits-keep-base` backup that has a base), the diff call
/// (after the attach, before the data plane) answering only after 4 s, and kills it (SIGKILL)
/// once that call has arrived: between "snapshot kept" and the commit.
fn kill_during_diff(sim: &Sim, args: &[&str]) {
    sim.fault(json!({"kind": "delay", "seconds": 4, "method": "GET", "path": "snapshots/diff"}));
    let mut child = sim.spawn("config.toml", args);
    sim.wait_until(&mut child, "the diff call with two snapshots", &|sim: &Sim| {
        // The fault is used up when the diff request arrives.
        let faults = sim.call("GET", "/sim/faults", None);
        let taken = faults["faults"].as_array().unwrap().iter().all(|f| f["count"] == 0);
        ferry_snapshots(sim).len() == 2 && taken
    });
    child.kill().unwrap();
    let _ = child.wait();
    sim.clear_faults();
}

/// Cinder-format backups of the simulator's `vol-ci` into the test bucket, all of one Cinder
/// volume, with 256 KiB objects (so 256 KiB read chunks).
struct CinderChain<'a> {
    sim: &'a Sim,
    py: String,
    s3: [String; 6],
    volume: String,
}

impl<'a> CinderChain<'a> {
    fn new(sim: &'a Sim, py: String) -> CinderChain<'a> {
        let endpoint = std::env::var("FERRY_TEST_S3_ENDPOINT").unwrap();
        let repo = format!("s3://{}", crate::cinder::bucket());
        let s3 = ["--repo", &repo, "--s3-endpoint", &endpoint, "--s3-region", "garage"];
        CinderChain { sim, py, s3: s3.map(str::to_owned), volume: crate::cinder::uuid() }
    }

    /// The arguments of a `--lightbits-keep-base` backup `id`.
    fn args<'s>(&'s self, id: &'s str, extra: &[&'s str]) -> Vec<&'s str> {
        let mut args: Vec<&str> = self.s3.iter().map(String::as_str).collect();
        args.extend(["backup", "--lightbits-volume", "vol-ci", "--lightbits-keep-base"]);
        args.extend(["--format", "cinder", "--cinder-backup-id", id]);
        args.extend(["--cinder-volume-id", &self.volume, "--cinder-object-size", "262144"]);
        args.extend(extra);
        args
    }

    /// A `--lightbits-keep-base` backup `id`.
    fn backup(&self, id: &str, extra: &[&str]) -> Run {
        self.sim.ferry(&self.args(id, extra))
    }

    /// Cinder's own driver and ferry both restore `id` to `expected`.
    fn restores(&self, id: &str, expected: &[u8], context: &str) {
        let by_cinder = self.sim.scratch.join("by-cinder.img");
        crate::cinder::cinder_restore(&self.py, id, &by_cinder, expected.len() as u64);
        assert!(std::fs::read(&by_cinder).unwrap() == expected, "Cinder restores {context} wrong");
        let by_ferry = self.sim.scratch.join("by-ferry.img");
        let mut args: Vec<&str> = self.s3.iter().map(String::as_str).collect();
        args.extend(["restore", "--format", "cinder", id, "--cinder-volume-id", &self.volume]);
        args.extend(["--target", by_ferry.to_str().unwrap()]);
        self.sim.ferry(&args).ok();
        assert!(std::fs::read(&by_ferry).unwrap() == expected, "ferry restores {context} wrong");
        std::fs::remove_file(&by_ferry).unwrap();
    }
}

/// `--format cinder` incrementals from Lightbits snapshot diffs (issue 14 item 2): a full backup
/// keeps its snapshot as the base; after scattered small writes, one large region and a write at
/// the last LBA, the next backup is a Cinder incremental of the first that reads only the touched
/// read chunks (the job's byte counter); a third builds on the second. Cinder's own driver and
/// ferry restore every backup of the chain byte-identical to the volume at its time. A lying
/// diff is caught by the sampling check (a full-read incremental); a cluster without the diff
/// call (404, 501) and a base snapshot deleted behind ferry's back are each a warning and a
/// full-read incremental; a base whose backup is missing and a grown volume are each a warning
/// and a full backup; one base is left after each. kill -9 between "snapshot kept" and the
/// commit, then `reclaim`: exactly the committed base is left, and the next backup is still an
/// incremental of the committed backup that reads only what changed.
#[test]
fn lightbits_cinder_incremental_chain_lie_and_fallback() {
    let Some(py) = crate::cinder::cinder_py("lightbits_cinder_incremental_chain_lie_and_fallback")
    else {
        return;
    };
    let Some(sim) = Sim::start("cinder-inc") else { return };
    let content = sample(&sim, "content.img", 19);
    let uuid = sim.volume("vol-ci", &content, &[]);
    let mut mirror = std::fs::read(&content).unwrap();
    let chain = CinderChain::new(&sim, py);
    let chunk = 256 * 1024u64;
    let backup = |id: &str, extra: &[&str]| chain.backup(id, extra);
    let restores = |id: &str, expected: &[u8], context: &str| chain.restores(id, expected, context);
    let ids: Vec<String> = (0..9).map(|_| crate::cinder::uuid()).collect();

    let run = backup(&ids[0], &[]);
    let full = run.ok();
    assert!(run.warnings().is_empty(), "{:?}", run.warnings());
    assert!(full["stats"]["parent_id"].is_null() && full["stats"]["base"].is_null(), "{full}");
    assert_eq!(full["stats"]["bytes_read"], VOLUME_BYTES);
    assert_eq!(ferry_snapshots(&sim), [format!("ferry-snap-{}", ids[0])]);
    let mut states = vec![mirror.clone()];

    // Scattered small writes, one large region, and a write at the last LBA; then a few more.
    let rounds: [Vec<(u64, usize)>; 2] = [
        (0..12u64)
            .map(|i| ((i * 1_234_567) % (VOLUME_BYTES - 4096) / 512 * 512, 512))
            .chain([(5 << 20, 1 << 20), (VOLUME_BYTES - 512, 512)])
            .collect(),
        vec![(3 << 20, 4096), (11 << 20, 512), (VOLUME_BYTES - 512, 512)],
    ];
    for (round, writes) in rounds.iter().enumerate() {
        let mut touched = std::collections::BTreeSet::new();
        for (i, &(offset, length)) in writes.iter().enumerate() {
            let data = pattern(100 * round as u64 + i as u64, length);
            write_volume(&sim, &uuid, &mut mirror, offset, &data);
            touched.extend(offset / chunk..=(offset + length as u64 - 1) / chunk);
        }
        let run = backup(&ids[round + 1], &[]);
        let result = run.ok();
        assert!(run.warnings().is_empty(), "{:?}", run.warnings());
        let stats = &result["stats"];
        assert_eq!(stats["parent_id"], ids[round].as_str(), "{result}");
        assert_eq!(stats["base"]["parent_backup_id"], ids[round].as_str());
        assert_eq!(stats["base"]["chunks_read"], touched.len(), "{result}");
        let sampled = stats["base"]["chunks_sampled"].as_u64().unwrap();
        assert_eq!(stats["bytes_read"], (touched.len() as u64 + sampled) * chunk, "{result}");
        assert_eq!(ferry_snapshots(&sim), [format!("ferry-snap-{}", ids[round + 1])]);
        states.push(mirror.clone());
    }
    for (id, state) in ids.iter().zip(&states) {
        restores(id, state, &format!("backup {id}"));
    }

    // A diff that leaves out a written range: caught by sampling every unchanged chunk.
    let _ = sim.call("POST", "/sim/diff", Some(json!({"hide": [[2048, 2048]]})));
    write_volume(&sim, &uuid, &mut mirror, 2048 * 512, &pattern(300, 512));
    let run = backup(&ids[3], &["--sample-unchanged", "100000"]);
    let lied = run.ok();
    let said = run.warnings().join("\n");
    assert!(said.contains("CHANGE LIST IS WRONG"), "{said}");
    assert!(lied["stats"]["base"].is_null(), "{lied}");
    assert_eq!(lied["stats"]["parent_id"], ids[2].as_str(), "a full-read incremental");
    assert_eq!(lied["stats"]["bytes_read"], 2 * VOLUME_BYTES, "every chunk sampled, then read");
    let _ = sim.call("POST", "/sim/diff", Some(json!({"hide": []})));
    restores(&ids[3], &mirror, "the lied-to incremental");

    // No diff call on the cluster (404 or 501), then a base snapshot deleted behind ferry's
    // back: each a warning and a full-read incremental of the base's backup.
    for (index, unsupported) in [(4, Some(404)), (5, Some(501)), (6, None)] {
        let why = match unsupported {
            Some(status) => {
                let _ = sim.call("POST", "/sim/diff", Some(json!({"unsupported": status})));
                format!("does not serve the changed-blocks diff (HTTP {status}")
            }
            None => {
                let base_uuid = sim.state()["snapshots"][0]["UUID"].as_str().unwrap().to_owned();
                let path = format!("/api/v2/projects/default/snapshots/{base_uuid}");
                let _ = sim.api("DELETE", &path, None, None);
                while !ferry_snapshots(&sim).is_empty() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                "is gone".to_owned()
            }
        };
        let offset = (6 << 20) + index as u64 * 4096;
        write_volume(&sim, &uuid, &mut mirror, offset, &pattern(350, 4096));
        let fallen = cinder_full_read(&chain, &ids[index], &why, &mirror);
        let _ = sim.call("POST", "/sim/diff", Some(json!({"unsupported": null})));
        assert_eq!(fallen["stats"]["parent_id"], ids[index - 1].as_str(), "{why}: {fallen}");
    }

    // The base's backup is missing: a warning and a full backup.
    let record_path = sim.scratch.join("journal").join(&sim.journal_entries()[0]);
    let mut record: Value =
        serde_json::from_str(&std::fs::read_to_string(&record_path).unwrap()).unwrap();
    let gone = crate::cinder::uuid();
    record["resource"]["backup_id"] = json!(gone);
    std::fs::write(&record_path, record.to_string()).unwrap();
    write_volume(&sim, &uuid, &mut mirror, 7 << 20, &pattern(400, 4096));
    let fallen = cinder_full_read(&chain, &ids[7], &format!("parent backup {gone}"), &mirror);
    assert!(fallen["stats"]["parent_id"].is_null(), "{fallen}");

    cinder_kill_then_incremental(&chain, &uuid, &mut mirror, &ids[7]);

    // The volume grew: a warning and a full backup of the new size (Cinder would refuse an
    // incremental whose parent lacks blocks).
    let path = format!("/api/v2/projects/default/volumes/{uuid}");
    let etag = sim.api("GET", &path, None, None)["ETag"].as_str().unwrap().to_owned();
    let grown = VOLUME_BYTES + (1 << 20);
    let _ = sim.api("PUT", &path, Some(json!({"size": grown.to_string()})), Some(&etag));
    mirror.resize(usize::try_from(grown).unwrap(), 0);
    let resized = cinder_full_read(&chain, &ids[8], "the volume was resized", &mirror);
    assert!(resized["stats"]["parent_id"].is_null(), "{resized}");
}

/// A Cinder-format `--lightbits-keep-base` backup `id` that must read the whole volume (now
/// `expected`), saying `why`: no base used, its snapshot kept as the one base, and both Cinder's
/// driver and ferry restore it to `expected`.
fn cinder_full_read(chain: &CinderChain<'_>, id: &str, why: &str, expected: &[u8]) -> Value {
    let run = chain.backup(id, &[]);
    let result = run.ok();
    let said = run.warnings().join("\n");
    assert!(said.contains(why) && said.contains("reading the whole"), "{why}: {said}");
    assert!(result["stats"]["base"].is_null(), "{why}: {result}");
    assert_eq!(result["stats"]["bytes_read"], expected.len() as u64, "{why}");
    assert_eq!(ferry_snapshots(chain.sim), [format!("ferry-snap-{id}")], "{why}");
    chain.restores(id, expected, &format!("the backup after: {why}"));
    result
}

/// kill -9 between "snapshot kept" and the commit of a Cinder-format incremental: nothing of it
/// is in the bucket (the data plane had not started), reclaim keeps exactly the committed base,
/// and the next backup is an incremental of `parent`, the last committed one, that reads the
/// one changed read chunk.
fn cinder_kill_then_incremental(
    chain: &CinderChain<'_>,
    uuid: &str,
    mirror: &mut [u8],
    parent: &str,
) {
    let sim = chain.sim;
    let old_base = ferry_snapshots(sim);
    write_volume(sim, uuid, mirror, 9 << 20, &pattern(500, 4096));
    let killed = crate::cinder::uuid();
    kill_during_diff(sim, &chain.args(&killed, &[]));
    sim.ferry(&["reclaim"]).ok();
    assert_eq!(ferry_snapshots(sim), old_base, "reclaim keeps exactly the committed base");
    let next = crate::cinder::uuid();
    let run = chain.backup(&next, &[]);
    let after_kill = run.ok();
    assert!(run.warnings().is_empty(), "{:?}", run.warnings());
    assert_eq!(after_kill["stats"]["parent_id"], parent, "{after_kill}");
    assert_eq!(after_kill["stats"]["base"]["chunks_read"], 1, "{after_kill}");
    assert_eq!(ferry_snapshots(sim), [format!("ferry-snap-{next}")]);
    chain.restores(&next, mirror, "the incremental after a killed one");
}
