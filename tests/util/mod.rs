//! Test support: scratch directories, sample images, loop devices, repositories (local and
//! Garage), and running the built binaries.

#![allow(dead_code)]

pub mod fault_proxy;
pub mod host;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A scratch directory under target/, removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tmp-tests")
            .join(format!("{name}-{}-{unique}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes a sample image with the bench binary's generator.
pub fn gen_image(path: &Path, size: u64, mix: &str, seed: u64) {
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["gen-image", path.to_str().unwrap(), "--size", &size.to_string(), "--mix", mix])
        .args(["--seed", &seed.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::metadata(path).unwrap().len(), size);
}

/// Asserts two files (or devices) have identical contents over `length` bytes.
pub fn assert_same(a: &Path, b: &Path, length: u64) {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).unwrap();
    let mut fb = std::fs::File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < length {
        let n = usize::try_from((length - offset).min(1 << 20)).unwrap();
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let at = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap();
            panic!("{} and {} differ at byte {}", a.display(), b.display(), offset + at as u64);
        }
        offset += n as u64;
    }
}

/// Where a test repository lives.
#[derive(Clone, Debug)]
pub enum Repo {
    Local(PathBuf),
    S3 { url: String, endpoint: String, config: Option<PathBuf> },
}

impl Repo {
    /// A Garage repository's key prefix and a store handle on it (credentials from the
    /// environment, as the ferry processes get them).
    ///
    /// # Panics
    /// For a local repository.
    pub fn s3_store(&self) -> (String, ferry::store::S3Store) {
        use ferry::store::{S3Options, S3Store};
        let Repo::S3 { url, endpoint, .. } = self else { panic!("not a Garage repository") };
        let (bucket, prefix) = url.strip_prefix("s3://").unwrap().split_once('/').unwrap();
        let mut options = S3Options::new(
            bucket,
            prefix,
            "garage",
            std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
            std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(),
        );
        options.endpoint_url = Some(endpoint.clone());
        (prefix.to_owned(), S3Store::new(options).unwrap())
    }

    /// A fresh Garage repository under a unique prefix, or None (skipped) without Garage.
    pub fn garage(test: &str) -> Option<Repo> {
        let Ok(endpoint) = std::env::var("FERRY_TEST_S3_ENDPOINT") else {
            assert!(
                std::env::var("FERRY_TEST_REQUIRE_S3").is_err(),
                "FERRY_TEST_REQUIRE_S3 is set but FERRY_TEST_S3_ENDPOINT is not"
            );
            eprintln!("skipped {test}: FERRY_TEST_S3_ENDPOINT not set (run scripts/test.sh)");
            return None;
        };
        let bucket = std::env::var("FERRY_TEST_S3_BUCKET").unwrap_or_else(|_| "ferry-test".into());
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let url = format!("s3://{bucket}/tests/{test}-{}-{unique}-{nanos}", std::process::id());
        Some(Repo::S3 { url, endpoint, config: None })
    }

    pub fn args(&self) -> Vec<String> {
        match self {
            Repo::Local(path) => vec!["--repo".into(), path.display().to_string()],
            Repo::S3 { url, endpoint, config } => {
                let mut args = vec![
                    "--repo".into(),
                    url.clone(),
                    "--s3-endpoint".into(),
                    endpoint.clone(),
                    "--s3-region".into(),
                    "garage".into(),
                ];
                if let Some(config) = config {
                    args.extend(["--config".into(), config.display().to_string()]);
                }
                args
            }
        }
    }

    /// Runs `ferry --json <repo args> <args>` and returns the parsed run.
    pub fn ferry(&self, args: &[&str]) -> Run {
        self.ferry_env(args, &[])
    }

    pub fn ferry_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        let _ = command.arg("--json").args(self.args()).args(args);
        for (key, value) in envs {
            let _ = command.env(key, value);
        }
        Run::from(command.output().unwrap())
    }

    /// Starts `ferry --json ... backup --workers 1 --source SOURCE` and returns the child with
    /// its stdout lines, for tests that act on a backup while it runs.
    pub fn spawn_backup(
        &self,
        source: &Path,
    ) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStdout>>) {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("--json")
            .args(self.args())
            .args(["backup", "--workers", "1", "--source", source.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    }

    pub fn init(&self, chunk_size: &str) {
        self.ferry(&["init", "--chunk-size", chunk_size]).ok();
    }

    /// Backs up `source`; returns the result event.
    pub fn backup(&self, source: &Path, engine: &str) -> Value {
        self.ferry(&["--io-engine", engine, "backup", "--source", source.to_str().unwrap()]).ok()
    }

    /// Restores `backup_id` onto `target` with extra flags; returns the run.
    pub fn restore(&self, backup_id: &str, target: &Path, engine: &str, flags: &[&str]) -> Run {
        let mut args =
            vec!["--io-engine", engine, "restore", backup_id, "--target", target.to_str().unwrap()];
        args.extend_from_slice(flags);
        self.ferry(&args)
    }
}

/// A finished `ferry --json` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(output: Output) -> Run {
        let stdout = String::from_utf8(output.stdout).unwrap();
        let events = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("stdout line {line:?} is not JSON: {e}"))
            })
            .collect();
        Run {
            code: output.status.code().unwrap_or(-1),
            events,
            stderr: String::from_utf8_lossy(&output.stderr).into(),
        }
    }
}

impl Run {
    /// The messages of its `warning` events.
    pub fn warnings(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|event| event["event"] == "warning")
            .map(|event| event["message"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The last event, which must be `result` or `error`.
    pub fn last(&self) -> &Value {
        let last =
            self.events.last().unwrap_or_else(|| panic!("no events; stderr: {}", self.stderr));
        let kind = last["event"].as_str().unwrap();
        assert!(kind == "result" || kind == "error", "last event is {kind}");
        last
    }

    /// Asserts success and returns the result event.
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "ferry failed: {}\nevents: {:?}", self.stderr, self.events);
        assert_eq!(self.last()["event"], "result");
        self.last().clone()
    }

    /// Asserts failure with `code` and returns the error message.
    pub fn fails(&self, code: i32) -> String {
        assert_eq!(
            self.code, code,
            "expected exit {code}; stderr: {}\nevents: {:?}",
            self.stderr, self.events
        );
        let last = self.last();
        assert_eq!(last["event"], "error");
        assert_eq!(last["exit_code"], code);
        last["message"].as_str().unwrap().to_string()
    }
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` with direct I/O and `block_size` logical blocks; None (skipped) when
    /// loop devices are unavailable and not required.
    pub fn attach(file: &Path, block_size: u32) -> Option<LoopDevice> {
        let output = Command::new("losetup")
            .args(["--direct-io=on", "-b", &block_size.to_string(), "-f", "--show"])
            .arg(file)
            .output();
        match output {
            Ok(output) if output.status.success() => {
                let path = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
                Some(LoopDevice { path })
            }
            other => {
                assert!(
                    std::env::var("FERRY_TEST_REQUIRE_LOOP").is_err(),
                    "losetup failed: {other:?}"
                );
                eprintln!("skipped: losetup unavailable: {other:?}");
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The packs a `prune` result says its sweeps deleted.
pub fn deleted_packs(prune: &serde_json::Value) -> u64 {
    prune["prune"]["swept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|swept| swept["deleted_packs"].as_u64().unwrap())
        .sum()
}
