//! Bad, hostile and careless input never loses data: every row is an input (arguments,
//! environment, config file), the exit code it must give, words its message must contain (and
//! secrets it must not), and the promise that nothing changed: every file under the scratch
//! directory (source, targets, the repository's objects, stray directories a typo could create)
//! is byte-identical afterwards and `ferry list` lists the same backups.
//!
//! Rows that need a damaged repository, a running job, a signal or a loop device have their own
//! tests below, built from the same pieces.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{LoopDevice, Run, Scratch, gen_image};

const MIB: u64 = 1024 * 1024;

/// A secret that rows put in config files and the environment; no output may contain it.
const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY";

/// One bad input and what it must give.
struct Row {
    /// What the row tries.
    name: &'static str,
    /// Arguments after `ferry --json`; `{repo}`, `{src}`, `{tgt}`, `{id}`, `{cfg}`, `{dir}`,
    /// `{fifo}`, `{pack}` and `{scratch}` are replaced.
    args: &'static [&'static str],
    /// Extra environment.
    env: &'static [(&'static str, &'static str)],
    /// Config file text written to `{cfg}`, when the row needs one.
    config: Option<&'static str>,
    /// Expected exit code.
    code: i32,
    /// Words the error message must contain.
    words: &'static [&'static str],
}

const fn row(
    name: &'static str,
    args: &'static [&'static str],
    code: i32,
    words: &'static [&'static str],
) -> Row {
    Row { name, args, env: &[], config: None, code, words }
}

const fn with_config(
    name: &'static str,
    config: &'static str,
    args: &'static [&'static str],
    code: i32,
    words: &'static [&'static str],
) -> Row {
    Row { name, args, env: &[], config: Some(config), code, words }
}

const fn with_env(
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    args: &'static [&'static str],
    code: i32,
    words: &'static [&'static str],
) -> Row {
    Row { name, args, env, config: None, code, words }
}

/// Credentials for rows that reach S3 argument checks (never a server).
const CREDS: &[(&str, &str)] =
    &[("AWS_ACCESS_KEY_ID", "GKbadinput"), ("AWS_SECRET_ACCESS_KEY", SECRET)];

/// The rows run against one shared fixture (each leaves it unchanged, which is checked).
const ROWS: &[Row] = &[
    // 1. No secret in any message, whatever the TOML parser says about the line holding it.
    with_config(
        "secret: unquoted value",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 3", "secret_access_key"],
    ),
    with_config(
        "secret: unterminated string",
        "[s3]\nsecret_access_key = \"wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY\nregion = \"x\"\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 2"],
    ),
    with_config(
        "secret: misspelled key",
        "[s3]\nsecret_acess_key = \"wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY\"\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 2", "unknown key", "secret_acess_key"],
    ),
    with_config(
        "secret: numeric value",
        "[s3]\nsecret_access_key = 4711471147114711\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 2"],
    ),
    with_config(
        "secret: cinder key with a missing '='",
        "[cinder]\nbackup_s3_store_secret_key \"wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY\"\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 2"],
    ),
    with_config(
        "secret: lightbits token inline",
        "[lightbits]\napi_addresses = [\"127.0.0.1:1\"]\ntoken = \"wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEY\"\n",
        &["--config", "{cfg}", "reclaim"],
        2,
        &["line 3", "token"],
    ),
    with_config(
        "config: a plain typo names key and line",
        "[s3]\nregoin = \"garage\"\n",
        &["--repo", "{repo}", "--config", "{cfg}", "list"],
        2,
        &["line 2", "regoin"],
    ),
    with_env(
        "secret: refused endpoint with the secret in the environment",
        CREDS,
        &["--repo", "s3://bucket/p", "--s3-endpoint", "http://127.0.0.1:1", "list"],
        4,
        &["127.0.0.1:1"],
    ),
    with_env(
        "secret: endpoint carrying credentials",
        CREDS,
        &["--repo", "s3://bucket/p", "--s3-endpoint", "http://gk:Pa55w0rdXYZ@127.0.0.1:1", "list"],
        2,
        &["credentials"],
    ),
    // 4, 12. Sources that are not a file or block device: refused before open, naming the path.
    row("source: FIFO", &["backup", "--source", "{fifo}"], 2, &["{fifo}", "FIFO"]),
    row("source: directory", &["backup", "--source", "{dir}"], 2, &["{dir}", "directory"]),
    row("source: character device", &["backup", "--source", "/dev/null"], 2, &["/dev/null"]),
    row("source: missing", &["backup", "--source", "{scratch}/nope.img"], 3, &["nope.img"]),
    // 5. The repository being read is never a restore target, --force or not.
    row(
        "restore onto a pack of the repository",
        &["restore", "{id}", "--target", "{pack}", "--force"],
        8,
        &["inside", "repository"],
    ),
    row(
        "restore onto a new file inside the repository",
        &["restore", "{id}", "--target", "{repo}/packs/new.img", "--force"],
        8,
        &["inside"],
    ),
    row(
        "restore onto a hard link to a pack",
        &["restore", "{id}", "--target", "{scratch}/pack-link", "--force"],
        8,
        &["hard link"],
    ),
    row(
        "restore onto a symlink to a pack",
        &["restore", "{id}", "--target", "{scratch}/pack-symlink", "--force"],
        8,
        &["inside"],
    ),
    // 6. --sparse onto a file holding data would leave old bytes where the backup has zeros.
    row(
        "restore --sparse --force onto data",
        &["restore", "{id}", "--target", "{tgt}", "--sparse", "--force"],
        2,
        &["--sparse", "{tgt}"],
    ),
    row(
        "restore onto data without --force",
        &["restore", "{id}", "--target", "{tgt}"],
        8,
        &["--force"],
    ),
    row(
        "restore onto a directory",
        &["restore", "{id}", "--target", "{dir}", "--force"],
        2,
        &["{dir}"],
    ),
    // 7. A repository that starts like S3 but is not s3://BUCKET[/PREFIX]; bucket names checked
    // locally. The scratch snapshot proves no directory ./s3:... was created.
    with_env("repo: s3:/bkt/pfx", CREDS, &["--repo", "s3:/bkt/pfx", "list"], 2, &["s3://"]),
    with_env(
        "repo: s3:bkt backup",
        CREDS,
        &["--repo", "s3:bkt", "backup", "--source", "{src}"],
        2,
        &["s3://"],
    ),
    with_env("repo: S3:// upper case", CREDS, &["--repo", "S3://bkt/p", "list"], 2, &["s3://"]),
    with_env("repo: upper-case bucket", CREDS, &["--repo", "s3://Bkt/p", "list"], 2, &["bucket"]),
    with_env("repo: short bucket", CREDS, &["--repo", "s3://ab", "list"], 2, &["3 to 63"]),
    with_env("repo: underscore bucket", CREDS, &["--repo", "s3://my_bkt", "list"], 2, &["bucket"]),
    with_env("repo: IP bucket", CREDS, &["--repo", "s3://10.0.0.1/p", "list"], 2, &["IP"]),
    with_env(
        "repo: empty prefix segment",
        CREDS,
        &["--repo", "s3://bkt/a//b", "list"],
        2,
        &["segment"],
    ),
    row("repo: other scheme", &["--repo", "gs://bkt/p", "list"], 2, &["gs://"]),
    with_env(
        "repo: cinder bucket name checked",
        CREDS,
        &["--repo", "s3://Bad_Bucket", "cinder-record", "x", "--cinder-volume-id", "v"],
        2,
        &["bucket"],
    ),
    // 8. Argument-parsing errors end with an `error` event under --json (checked for every row).
    row("args: unknown subcommand", &["bogus"], 2, &["bogus"]),
    row("args: restore without --target", &["restore", "{id}"], 2, &["--target"]),
    row("args: unknown flag", &["backup", "--source", "{src}", "--bogus"], 2, &["--bogus"]),
    // 11. Only init creates a repository; --repo at a regular file says so.
    row(
        "repo: mistyped dir, list",
        &["--repo", "{scratch}/typo", "list"],
        7,
        &["typo", "ferry init"],
    ),
    row("repo: mistyped dir, show", &["--repo", "{scratch}/typo", "show", "{id}"], 7, &["typo"]),
    row(
        "repo: mistyped dir, backup",
        &["--repo", "{scratch}/typo", "backup", "--source", "{src}"],
        7,
        &["typo"],
    ),
    row("repo: a regular file", &["--repo", "{src}", "list"], 2, &["not a directory"]),
    row("init: at a regular file", &["--repo", "{src}", "init"], 2, &["not a directory"]),
    // 21. init into a non-empty directory that is not a repository; init twice.
    row("init: non-empty directory", &["--repo", "{dir}", "init"], 8, &["not empty"]),
    row("init: twice", &["init"], 8, &["already exists"]),
    // 16. `--read-data 50` is ambiguous.
    row("verify: --read-data 50", &["verify", "{id}", "--read-data", "50"], 2, &["--read-data=50"]),
    row("verify: percentage 0", &["verify", "{id}", "--read-data=0"], 2, &["percentage"]),
    // 17. Endpoints are checked locally.
    with_env(
        "endpoint: port out of range",
        CREDS,
        &["--repo", "s3://bkt/p", "--s3-endpoint", "http://127.0.0.1:99999", "list"],
        2,
        &["port"],
    ),
    with_env(
        "endpoint: a path",
        CREDS,
        &["--repo", "s3://bkt/p", "--s3-endpoint", "http://127.0.0.1:3900/bkt", "list"],
        2,
        &["path"],
    ),
    with_env(
        "endpoint: a query",
        CREDS,
        &["--repo", "s3://bkt/p", "--s3-endpoint", "http://127.0.0.1:3900?x=1", "list"],
        2,
        &["query"],
    ),
    with_env(
        "endpoint: no scheme",
        CREDS,
        &["--repo", "s3://bkt/p", "--s3-endpoint", "127.0.0.1:3900", "list"],
        2,
        &["http://"],
    ),
    with_env(
        "endpoint: from the environment",
        &[
            ("AWS_ACCESS_KEY_ID", "GKbadinput"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_ENDPOINT_URL", "http://h:0"),
        ],
        &["--repo", "s3://bkt/p", "list"],
        2,
        &["port"],
    ),
    // 18. Each retry setting bounds what it says; 0 attempts is no setting.
    with_config(
        "s3: max_attempts = 0",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = \"x1234567\"\nmax_attempts = 0\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        2,
        &["max_attempts"],
    ),
    with_config(
        "s3: max_attempts = 1 bounds a refused connection",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = \"x1234567\"\nmax_attempts = 1\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        4,
        &["after 1 attempts"],
    ),
    with_config(
        "s3: max_attempts = 2 bounds a refused connection",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = \"x1234567\"\nmax_attempts = 2\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        4,
        &["after 2 attempts"],
    ),
    with_env(
        "s3: a store that never answered gets 3 attempts by default",
        CREDS,
        &["--repo", "s3://bkt/p", "--s3-endpoint", "http://127.0.0.1:1", "list"],
        4,
        &["after 3 attempts"],
    ),
    with_config(
        "s3: retry_max_secs = 0 allows no retry",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = \"x1234567\"\nretry_max_secs = 0\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        4,
        &["after 1 attempts"],
    ),
    with_config(
        "s3: request_timeout_secs = 0",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key = \"x1234567\"\nrequest_timeout_secs = 0\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        2,
        &["timeout"],
    ),
    with_config(
        "secret file: a FIFO is refused, not read",
        "[s3]\naccess_key_id = \"GK1\"\nsecret_access_key_file = \"{fifo}\"\n",
        &[
            "--repo",
            "s3://bkt/p",
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--config",
            "{cfg}",
            "list",
        ],
        2,
        &["fifo", "regular file"],
    ),
    row("config: missing file", &["--config", "{scratch}/none.toml", "list"], 2, &["none.toml"]),
    row("config: a directory", &["--config", "{dir}", "list"], 2, &["config file"]),
    row("config: a device", &["--config", "/dev/zero", "list"], 2, &["config file", "neither"]),
    row(
        "changed ranges: a device",
        &[
            "backup",
            "--source",
            "{src}",
            "--changed-ranges",
            "/dev/zero",
            "--changed-since",
            "{id}",
        ],
        2,
        &["--changed-ranges", "neither a regular file nor a pipe"],
    ),
    row(
        "changed ranges: a disk image",
        &["backup", "--source", "{src}", "--changed-ranges", "{src}", "--changed-since", "{id}"],
        2,
        &["--changed-ranges", "src.img"],
    ),
    row("repo: empty", &["--repo", "", "list"], 2, &["empty"]),
    with_env(
        "repo: FERRY_REPO typo",
        &[("FERRY_REPO", "s3:/bkt")],
        &["--repo", "s3:/x", "list"],
        2,
        &["s3://"],
    ),
    row(
        "source: given twice",
        &["backup", "--source", "{src}", "--source", "{src}"],
        2,
        &["src.img"],
    ),
    // 19. Limits checked and explained at parse time.
    row(
        "workers: 256",
        &["backup", "--source", "{src}", "--workers", "256"],
        2,
        &["--workers", "64"],
    ),
    row("workers: 0", &["backup", "--source", "{src}", "--workers", "0"], 2, &["--workers"]),
    row(
        "parts in flight: 33",
        &["backup", "--source", "{src}", "--parts-in-flight", "33"],
        2,
        &["--parts-in-flight"],
    ),
    row(
        "downloads in flight: 0",
        &["restore", "{id}", "--target", "{scratch}/new.img", "--downloads-in-flight", "0"],
        2,
        &["--downloads-in-flight"],
    ),
    // 20. Negative numbers name their option; the environment names its variable.
    row(
        "init: --chunk-size -4M",
        &["--repo", "{scratch}/new-repo", "init", "--chunk-size", "-4M"],
        2,
        &["--chunk-size"],
    ),
    row(
        "init: --chunk-size 3M",
        &["--repo", "{scratch}/new-repo", "init", "--chunk-size", "3M"],
        2,
        &["power of two"],
    ),
    // A grace below the minimum would let a prune delete packs a running backup still needs.
    row(
        "init: --gc-grace 9s",
        &["--repo", "{scratch}/new-repo", "init", "--gc-grace", "9s"],
        2,
        &["--gc-grace 9s", "outside 10 s"],
    ),
    row(
        "init: --gc-grace 1h1h",
        &["--repo", "{scratch}/new-repo", "init", "--gc-grace", "1h1h"],
        2,
        &["not a duration"],
    ),
    row("workers: -1", &["backup", "--source", "{src}", "--workers", "-1"], 2, &["--workers"]),
    row(
        "limit-read: -5",
        &["backup", "--source", "{src}", "--limit-read", "-5"],
        2,
        &["--limit-read"],
    ),
    with_env(
        "FERRY_IO_ENGINE=bogus",
        &[("FERRY_IO_ENGINE", "bogus")],
        &["backup", "--source", "{src}"],
        2,
        &["FERRY_IO_ENGINE"],
    ),
    row("--io-engine bogus", &["--io-engine", "bogus", "list"], 2, &["--io-engine"]),
    // 21. Backup ids: the rule is stated.
    row("backup id: path", &["show", "../config"], 2, &["letters, digits"]),
    row(
        "backup id: slash on backup",
        &["backup", "--source", "{src}", "--backup-id", "a/b"],
        2,
        &["letters, digits"],
    ),
    row("backup id: unknown", &["show", "20990101T000000Z-00000000"], 7, &["does not exist"]),
    row("delete: unknown", &["delete", "20990101T000000Z-00000000"], 7, &["does not exist"]),
    // 22. Key files: missing, not a file, too big, malformed, given with a passphrase, or where
    // they do not apply; an existing file is never overwritten by a new key.
    row("key file: missing", &["--key-file", "{scratch}/no.key", "list"], 2, &["cannot read"]),
    row("key file: a directory", &["--key-file", "{dir}", "list"], 2, &["nor a pipe"]),
    row("key file: a disk image", &["--key-file", "{src}", "list"], 2, &["more than 1 KiB"]),
    with_env(
        "FERRY_KEY_FILE: a text file",
        &[("FERRY_KEY_FILE", "dir/notes.txt")],
        &["list"],
        2,
        &["FERRY_KEY_FILE", "64 hex digits"],
    ),
    with_env(
        "key file and passphrase",
        &[("FERRY_KEY_FILE", "dir/notes.txt"), ("FERRY_PASSPHRASE", "a passphrase here")],
        &["list"],
        2,
        &["both a key file", "FERRY_PASSPHRASE"],
    ),
    row(
        "key file: init without --encrypt",
        &["--repo", "{scratch}/new", "--key-file", "{src}", "init"],
        2,
        &["--key-file", "--encrypt"],
    ),
    row("key generate-file: existing", &["key", "generate-file", "{src}"], 8, &["overwritten"]),
];

/// The shared scene: a local repository with one backup, its source, a target holding data, a
/// directory, a FIFO, and links to a pack.
struct Fixture {
    scratch: Scratch,
    repo: PathBuf,
    id: String,
    pack: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let scratch = Scratch::new(name);
        let repo = scratch.join("repo");
        let source = scratch.join("src.img");
        gen_image(&source, 2 * MIB, "mixed", 1);
        gen_image(&scratch.join("tgt.img"), 2 * MIB, "random", 2);
        std::fs::create_dir(scratch.join("dir")).unwrap();
        std::fs::write(scratch.join("dir/notes.txt"), b"not a repository").unwrap();
        let status = Command::new("mkfifo").arg(scratch.join("fifo")).status().unwrap();
        assert!(status.success());
        let mut fixture = Fixture { scratch, repo, id: String::new(), pack: PathBuf::new() };
        fixture.ferry(&["init", "--chunk-size", "256K"], &[]).ok();
        let result = fixture.ferry(&["backup", "--source", "{src}"], &[]).ok();
        fixture.id = result["backup_id"].as_str().unwrap().to_owned();
        fixture.pack = find_file(&fixture.repo.join("packs"));
        std::fs::hard_link(&fixture.pack, fixture.scratch.join("pack-link")).unwrap();
        std::os::unix::fs::symlink(&fixture.pack, fixture.scratch.join("pack-symlink")).unwrap();
        fixture
    }

    fn expand(&self, text: &str) -> String {
        let path = |name: &str| self.scratch.join(name).display().to_string();
        text.replace("{repo}", &self.repo.display().to_string())
            .replace("{src}", &path("src.img"))
            .replace("{tgt}", &path("tgt.img"))
            .replace("{dir}", &path("dir"))
            .replace("{fifo}", &path("fifo"))
            .replace("{cfg}", &self.config_path().display().to_string())
            .replace("{pack}", &self.pack.display().to_string())
            .replace("{id}", &self.id)
            .replace("{scratch}", &self.scratch.path.display().to_string())
    }

    /// Config files live beside the scratch directory, so writing one is no change inside it.
    fn config_path(&self) -> PathBuf {
        self.scratch.path.with_extension("toml")
    }

    /// Runs `ferry --json [--repo REPO] ARGS` in the scratch directory with a clean environment
    /// (no FERRY_*, AWS_* or config from the caller).
    fn ferry(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        let _ = command.current_dir(&self.scratch.path).arg("--json");
        if !args.contains(&"--repo") {
            let _ = command.args(["--repo", &self.repo.display().to_string()]);
        }
        let _ = command.args(args.iter().map(|arg| self.expand(arg)));
        for (key, _) in std::env::vars() {
            if key.starts_with("FERRY_") || key.starts_with("AWS_") {
                let _ = command.env_remove(key);
            }
        }
        for (key, value) in env {
            let _ = command.env(key, value);
        }
        Run::from(command.output().unwrap())
    }

    /// Every file under the scratch directory (path → kind, size, content hash) and the listed
    /// backups.
    fn snapshot(&self) -> (BTreeMap<String, String>, Vec<String>) {
        let mut files = BTreeMap::new();
        walk(&self.scratch.path, &self.scratch.path, &mut files);
        let listed = self.ferry(&["list"], &[]).ok()["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|backup| backup.to_string())
            .collect();
        (files, listed)
    }

    /// Runs `row` and checks its exit code, its final event, its message and that nothing
    /// changed; returns the run.
    fn check(&self, row: &Row) -> Run {
        if let Some(config) = row.config {
            std::fs::write(self.config_path(), self.expand(config)).unwrap();
        }
        let before = self.snapshot();
        let run = self.ferry(row.args, row.env);
        let name = row.name;
        assert_eq!(run.code, row.code, "{name}: exit code; stderr: {}", run.stderr);
        let message = run.fails(row.code);
        for word in row.words {
            let word = self.expand(word);
            assert!(message.contains(&word), "{name}: message lacks {word:?}: {message}");
        }
        let stdout: Vec<String> = run.events.iter().map(ToString::to_string).collect();
        for text in [&stdout.join("\n"), &run.stderr] {
            assert!(!text.contains(SECRET), "{name}: a secret leaked: {text}");
            assert!(!text.contains("Pa55w0rdXYZ"), "{name}: a password leaked: {text}");
        }
        assert_eq!(self.snapshot(), before, "{name}: something changed");
        run
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.config_path());
    }
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap().display().to_string();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            files.insert(relative, "dir".into());
            walk(root, &path, files);
        } else if kind.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            files.insert(relative, format!("{} bytes, {:x}", bytes.len(), hasher.finish()));
        } else {
            files.insert(relative, format!("{kind:?}"));
        }
    }
}

fn find_file(dir: &Path) -> PathBuf {
    let entry = std::fs::read_dir(dir).unwrap().next();
    let path = entry.unwrap_or_else(|| panic!("no file under {}", dir.display())).unwrap().path();
    if path.is_dir() { find_file(&path) } else { path }
}

#[test]
fn every_bad_input_is_refused_and_changes_nothing() {
    let fixture = Fixture::new("bad-input");
    for row in ROWS {
        let _ = fixture.check(row);
    }
}

/// README's exit-code table documents every code the rows assert, with the JSON `kind` name of
/// each failure class.
#[test]
fn readme_exit_codes_match_the_suite() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: BTreeMap<i32, String> = readme
        .lines()
        .skip_while(|line| !line.starts_with("## Exit codes"))
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            Some((cells.get(1)?.parse().ok()?, cells.get(2)?.to_string()))
        })
        .collect();
    let expected = [
        (2, "usage"),
        (3, "device"),
        (4, "object store"),
        (5, "integrity"),
        (6, "cancelled"),
        (7, "not found"),
        (8, "refused"),
    ];
    for (code, meaning) in expected {
        let documented = table.get(&code).unwrap_or_else(|| panic!("README lacks exit {code}"));
        assert!(documented.to_lowercase().contains(meaning), "exit {code}: {documented}");
    }
    for row in ROWS {
        assert!(table.contains_key(&row.code), "{}: exit {} undocumented", row.name, row.code);
    }
}

/// 8, 21: with --json, --help is a `result` event (stdout stays JSON); `backup --help` puts the
/// global options under their own heading and states what is required.
#[test]
fn help_is_json_under_json_and_separates_global_options() {
    let run = Run::from(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["--json", "backup", "--help"])
            .output()
            .unwrap(),
    );
    let result = run.ok();
    let help = result["help"].as_str().unwrap();
    let (command, global) = help.split_once("Global options:").expect("a global heading");
    assert!(command.contains("--source") && !command.contains("--s3-endpoint"), "{help}");
    assert!(global.contains("--repo") && global.contains("--io-engine"), "{help}");
    assert!(help.contains("backup (--source PATH"), "{help}");
    let restore = Command::new(env!("CARGO_BIN_EXE_ferry")).args(["restore", "--help"]).output();
    let restore = String::from_utf8(restore.unwrap().stdout).unwrap();
    assert!(restore.contains("restore BACKUP_ID (--target PATH"), "{restore}");
    assert!(restore.contains("Refused (exit 2)"), "{restore}");
}

/// 9: one damaged manifest and one damaged index are contained: list reports the damaged backup
/// and lists the rest, verify --all reports it (exit 5) after verifying the others, a new backup
/// succeeds (storing the chunks of the damaged index again), and delete removes the damaged one.
#[test]
fn one_damaged_object_is_contained() {
    let fixture = Fixture::new("bad-input-damage");
    let second = fixture.ferry(&["backup", "--source", "{tgt}"], &[]).ok();
    let second = second["backup_id"].as_str().unwrap().to_owned();
    let manifest = fixture.repo.join("backups").join(&fixture.id);
    let mut bytes = std::fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&manifest, &bytes).unwrap();
    let listed = fixture.ferry(&["list"], &[]).ok();
    let backups = listed["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{listed}");
    let damaged = backups.iter().find(|b| b["backup_id"] == fixture.id.as_str()).unwrap();
    assert!(damaged["damaged"].is_string(), "{listed}");
    let run = fixture.ferry(&["verify", "--all"], &[]);
    assert!(run.fails(5).contains(&fixture.id));
    let verified = run.last()["verified"].as_array().unwrap().clone();
    assert_eq!(verified.len(), 2);
    let sound = verified.iter().find(|v| v["backup_id"] == second.as_str()).unwrap();
    assert_eq!(sound["problems"].as_array().unwrap().len(), 0, "{sound}");
    // A damaged index no longer blocks new backups.
    let index = find_file(&fixture.repo.join("index"));
    std::fs::write(&index, b"garbage").unwrap();
    let run = fixture.ferry(&["backup", "--source", "{src}"], &[]);
    let result = run.ok();
    assert!(
        run.events
            .iter()
            .any(|e| e["event"] == "warning"
                && e["message"].as_str().unwrap().contains("stored again")),
        "{:?}",
        run.events
    );
    let third = result["backup_id"].as_str().unwrap();
    fixture.ferry(&["verify", third, "--read-data"], &[]).ok();
    fixture.ferry(&["delete", &fixture.id], &[]).ok();
    assert!(!manifest.exists());
    fixture.ferry(&["restore", third, "--target", "{scratch}/third.img"], &[]).ok();
    crate::util::assert_same(
        &fixture.scratch.join("src.img"),
        &fixture.scratch.join("third.img"),
        2 * MIB,
    );
}

/// 10: a pack the backup references but the repository lost is integrity (exit 5), found before
/// anything is written: a new file is not left behind, a file holding data is unchanged.
#[test]
fn a_lost_pack_is_integrity_and_nothing_is_written() {
    let fixture = Fixture::new("bad-input-lost-pack");
    let pack = fixture.pack.clone();
    let saved = std::fs::read(&pack).unwrap();
    std::fs::remove_file(&pack).unwrap();
    let rows = [
        row(
            "lost pack, new target",
            &["restore", "{id}", "--target", "{scratch}/new.img"],
            5,
            &["missing"],
        ),
        row(
            "lost pack, --force onto data",
            &["restore", "{id}", "--target", "{tgt}", "--force"],
            5,
            &["missing"],
        ),
    ];
    for row in &rows {
        let _ = fixture.check(row);
    }
    // A truncated pack, likewise.
    std::fs::write(&pack, &saved[..saved.len() / 2]).unwrap();
    let _ = fixture.check(&row(
        "truncated pack",
        &["restore", "{id}", "--target", "{tgt}", "--force"],
        5,
        &["bytes"],
    ));
}

/// 16: a percentage below one chunk still reads one chunk.
#[test]
fn a_tiny_read_data_sample_reads_a_chunk() {
    let fixture = Fixture::new("bad-input-sample");
    let result = fixture.ferry(&["verify", "{id}", "--read-data=0.0001"], &[]).ok();
    assert!(result["verified"][0]["chunks_read"].as_u64().unwrap() >= 1, "{result}");
}

/// 13, 14: a source that grows during the backup, and --force onto a larger file, are warned
/// about.
#[test]
fn growth_and_a_longer_target_are_warned_about() {
    let fixture = Fixture::new("bad-input-warnings");
    let growing = fixture.scratch.join("growing.img");
    gen_image(&growing, 4 * MIB, "random", 7);
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--json", "--repo", fixture.repo.to_str().unwrap(), "backup", "--limit-read", "2"])
        .arg("--source")
        .arg(&growing)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let file = std::fs::OpenOptions::new().append(true).open(&growing).unwrap();
    file.set_len(8 * MIB).unwrap();
    let run = Run::from(child.wait_with_output().unwrap());
    let result = run.ok();
    assert_eq!(result["volume_size_bytes"], 4 * MIB);
    assert!(
        run.events.iter().any(|e| e["event"] == "warning"
            && e["message"].as_str().unwrap().contains("grew from 4194304 to 8388608")),
        "{:?}",
        run.events
    );
    let longer = fixture.scratch.join("longer.img");
    gen_image(&longer, 3 * MIB, "random", 8);
    let run =
        fixture.ferry(&["restore", "{id}", "--target", longer.to_str().unwrap(), "--force"], &[]);
    run.ok();
    assert!(
        run.events
            .iter()
            .any(|e| e["event"] == "warning"
                && e["message"].as_str().unwrap().contains("left as it is")),
        "{:?}",
        run.events
    );
}

/// Starts `ferry --json backup` of `source` read at 1 MB/s and waits for its start event.
fn slow_backup(fixture: &Fixture, source: &Path) -> std::process::Child {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--json", "--repo", fixture.repo.to_str().unwrap(), "backup", "--limit-read", "1"])
        .arg("--source")
        .arg(source)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.as_mut().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"start\""), "{first}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child
}

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill").args(["-s", name, &child.id().to_string()]).status();
    assert!(status.unwrap().success());
}

/// Collects the rest of a child's JSON events and its exit code.
fn finish(mut child: std::process::Child) -> Run {
    let mut stdout = String::new();
    let _ = std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout);
    let mut output = child.wait_with_output().unwrap();
    output.stdout = stdout.into_bytes();
    Run::from(output)
}

/// 4: every SIGINT or SIGTERM gives exit 6 and a final `error` event, a second one at once; no
/// backup appears.
#[test]
fn every_signal_gives_the_cancel_code_and_an_error_event() {
    let fixture = Fixture::new("bad-input-signals");
    let big = fixture.scratch.join("big.img");
    gen_image(&big, 32 * MIB, "random", 9);
    for signals in [&["TERM"][..], &["INT"], &["INT", "INT"], &["TERM", "INT"]] {
        let before = fixture.snapshot().1;
        let child = slow_backup(&fixture, &big);
        for name in signals {
            signal(&child, name);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let run = finish(child);
        assert!(run.fails(6).contains("cancelled"), "{signals:?}: {:?}", run.events);
        assert_eq!(run.last()["kind"], "cancelled");
        assert_eq!(fixture.snapshot().1, before, "{signals:?}: a backup appeared");
    }
}

/// 5: a restore never writes the source of a running backup, --force or not.
#[test]
fn restore_onto_the_source_of_a_running_backup_is_refused() {
    let fixture = Fixture::new("bad-input-busy-source");
    let big = fixture.scratch.join("big.img");
    gen_image(&big, 16 * MIB, "random", 10);
    let child = slow_backup(&fixture, &big);
    let before = std::fs::read(&big).unwrap();
    let run =
        fixture.ferry(&["restore", "{id}", "--target", big.to_str().unwrap(), "--force"], &[]);
    assert!(run.fails(8).contains("another ferry job"), "{:?}", run.events);
    assert!(std::fs::read(&big).unwrap() == before, "the source was written");
    signal(&child, "TERM");
    let _ = finish(child);
}

/// 15: block-device targets: a read-only device and a mounted one are refused before a byte is
/// written, naming the device and the cause.
#[test]
fn read_only_and_mounted_devices_name_device_and_cause() {
    let fixture = Fixture::new("bad-input-devices");
    let image = fixture.scratch.path.with_extension("dev.img");
    gen_image(&image, 8 * MIB, "text", 11);
    // Read-only loop device.
    let output = Command::new("losetup").args(["-r", "-f", "--show"]).arg(&image).output();
    let Some(output) = output.ok().filter(|o| o.status.success()) else {
        assert!(std::env::var("FERRY_TEST_REQUIRE_LOOP").is_err(), "losetup failed");
        eprintln!("skipped: losetup unavailable");
        return;
    };
    let device =
        LoopDevice { path: PathBuf::from(String::from_utf8(output.stdout).unwrap().trim()) };
    let shown = device.path.display().to_string();
    let args = ["restore", &fixture.id, "--target", &shown, "--force"];
    let message = fixture.ferry(&args, &[]).fails(3);
    assert!(message.contains(&shown) && message.contains("read-only"), "{message}");
    drop(device);
    // A mounted file system's device.
    let status = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).status().unwrap();
    assert!(status.success());
    let Some(device) = LoopDevice::attach(&image, 512) else { return };
    let mount_point = fixture.scratch.path.with_extension("mnt");
    std::fs::create_dir_all(&mount_point).unwrap();
    let status = Command::new("mount").arg(&device.path).arg(&mount_point).status().unwrap();
    assert!(status.success());
    let shown = device.path.display().to_string();
    let args = ["restore", &fixture.id, "--target", &shown, "--force"];
    let message = fixture.ferry(&args, &[]).fails(8);
    let _ = Command::new("umount").arg(&mount_point).status();
    let _ = std::fs::remove_dir(&mount_point);
    drop(device);
    assert!(message.contains(&shown) && message.contains("in use"), "{message}");
    let _ = std::fs::remove_file(&image);
}

/// 1, 21 against a real S3 store: a refused secret never appears in a message, and init into a
/// prefix that holds objects but no repository is refused, leaving the objects alone.
#[test]
fn s3_refusals_leak_nothing_and_mix_nothing() {
    let Some(repo) = crate::util::Repo::garage("bad-input") else { return };
    let bad_secret = "Wr0ngSecretValueForBadInputSuite0123456";
    let run = repo.ferry_env(&["init"], &[("AWS_SECRET_ACCESS_KEY", bad_secret)]);
    let message = run.fails(4);
    let stdout: Vec<String> = run.events.iter().map(ToString::to_string).collect();
    assert!(
        !stdout.join("\n").contains(bad_secret) && !run.stderr.contains(bad_secret),
        "{message}"
    );
    repo.init("256K");
    let crate::util::Repo::S3 { url, endpoint, config } = &repo else { unreachable!() };
    // The repository's own prefix, one level up, holds objects (this repository) but no config.
    let parent = crate::util::Repo::S3 {
        url: url.rsplit_once('/').unwrap().0.to_owned(),
        endpoint: endpoint.clone(),
        config: config.clone(),
    };
    let message = parent.ferry(&["init"]).fails(8);
    assert!(message.contains("not empty"), "{message}");
    let listed = repo.ferry(&["list"]).ok();
    assert_eq!(listed["backups"].as_array().unwrap().len(), 0);
}
