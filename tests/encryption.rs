//! Encrypted repositories (format version 2) through the CLI: no plaintext reaches the store
//! (every stored object, and Garage's data and metadata directories), tampered, swapped,
//! truncated records and objects fail with exit 5 and leave the target alone, wrong or missing
//! passphrases have their own exit codes (10, 11), keys rotate without re-encrypting, and
//! unencrypted repositories stay version 1 byte for byte.

use std::path::{Path, PathBuf};

use crate::util::{Repo, Run, Scratch, assert_same, gen_image};

const MIB: u64 = 1 << 20;
const PASSPHRASE: &str = "correct horse battery staple";

fn with_pass(pass: &str) -> [(&str, &str); 1] {
    [("FERRY_PASSPHRASE", pass)]
}

fn run(repo: &Repo, args: &[&str]) -> Run {
    repo.ferry_env(args, &with_pass(PASSPHRASE))
}

/// A volume whose every chunk carries `marker`: text chunks (stored compressed) and
/// random-looking chunks with the marker written into them (stored raw).
fn marked_volume(path: &Path, marker: &str, size: u64) {
    gen_image(path, size, "random", 11);
    let mut bytes = std::fs::read(path).unwrap();
    let half = bytes.len() / 2;
    let text = format!("{marker} ").repeat(half / (marker.len() + 1) + 1);
    bytes[..half].copy_from_slice(&text.as_bytes()[..half]);
    for at in (half..bytes.len() - marker.len()).step_by(64 * 1024) {
        bytes[at..at + marker.len()].copy_from_slice(marker.as_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Every file under `dir` (recursively) that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_containing_since(dir, needle, std::time::UNIX_EPOCH)
}

/// `files_containing` among the files modified at or after `since`.
fn files_containing_since(dir: &Path, needle: &[u8], since: std::time::SystemTime) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|m| m >= since)
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|window| window == needle)
            {
                found.push(path);
            }
        }
    }
    found
}

/// A `--format cinder` backup of `source` (refused by encrypted repositories and key material).
fn cinder_backup_args(source: &str) -> [&str; 9] {
    [
        "backup",
        "--format",
        "cinder",
        "--source",
        source,
        "--cinder-backup-id",
        "00000000-0000-0000-0000-000000000001",
        "--cinder-volume-id",
        "00000000-0000-0000-0000-000000000002",
    ]
}

fn backup_id(result: &serde_json::Value) -> String {
    result["backup_id"].as_str().unwrap().to_string()
}

/// Backs up a marked volume twice (a second version with new chunks), runs the maintenance
/// commands that write marks and catalogs, restores, and returns the marker.
fn exercise(repo: &Repo, scratch: &Scratch) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let marker = format!("FERRY-PLAINTEXT-MARKER-{nanos}");
    // The marker is in the source's path too: manifests and catalogs record it.
    let source = scratch.join(&format!("{marker}.img"));
    marked_volume(&source, &marker, 6 * MIB);
    run(repo, &["init", "--encrypt", "--chunk-size", "1M", "--gc-grace", "10s"]).ok();
    let first = backup_id(&run(repo, &["backup", "--source", source.to_str().unwrap()]).ok());
    marked_volume(&source, &format!("{marker}-v2"), 6 * MIB);
    let second = backup_id(&run(repo, &["backup", "--source", source.to_str().unwrap()]).ok());
    run(repo, &["delete", &first]).ok();
    run(repo, &["prune"]).ok();
    run(repo, &["check"]).ok();
    run(repo, &["list"]).ok();
    run(repo, &["verify", &second, "--read-data"]).ok();
    let target = scratch.join("restored.img");
    run(repo, &["restore", &second, "--target", target.to_str().unwrap()]).ok();
    assert_same(&source, &target, 6 * MIB);
    marker
}

#[test]
fn no_plaintext_reaches_a_local_repository() {
    let scratch = Scratch::new("enc-plain-local");
    let root = scratch.join("repo");
    let repo = Repo::Local(root.clone());
    let marker = exercise(&repo, &scratch);
    assert!(root.join("keys").is_dir());
    let found = files_containing(&root, marker.as_bytes());
    assert!(found.is_empty(), "the marker is stored in plaintext: {found:?}");
    let found = files_containing(&root, PASSPHRASE.as_bytes());
    assert!(found.is_empty(), "the passphrase is stored: {found:?}");
    // Nor is the chunk-id key: the config holds none.
    let config = String::from_utf8_lossy(&std::fs::read(root.join("config")).unwrap()).into_owned();
    assert!(config.contains("\"format_version\":2"), "{config}");
    assert!(!config.contains("hash_key\":\"0") && config.contains("\"encryption\""), "{config}");
}

/// Garage's data and metadata directories: from `FERRY_TEST_GARAGE_DIR`, else next to the CA
/// bundle `scripts/test.sh` writes into the same directory.
fn garage_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FERRY_TEST_GARAGE_DIR").map(PathBuf::from).or_else(|| {
        let bundle = PathBuf::from(std::env::var_os("FERRY_TEST_S3_CA_BUNDLE")?);
        Some(bundle.parent()?.to_path_buf())
    })?;
    dir.join("garage.toml").is_file().then_some(dir)
}

#[test]
fn no_plaintext_reaches_garage() {
    let Some(repo) = Repo::garage("enc-plain") else { return };
    let scratch = Scratch::new("enc-plain-garage");
    // Garage writes every block this test stores into a new file: search those (its data
    // directory holds every other test's too), and all of its metadata (small objects are
    // stored inline there).
    let start = std::time::SystemTime::now() - std::time::Duration::from_secs(2);
    let marker = exercise(&repo, &scratch);
    let Some(dir) = garage_dir() else {
        assert!(
            std::env::var("FERRY_TEST_REQUIRE_S3").is_err(),
            "Garage's directory is unknown: set FERRY_TEST_GARAGE_DIR"
        );
        return;
    };
    // Garage must store blocks as given for the search to mean anything.
    let config = std::fs::read_to_string(dir.join("garage.toml")).unwrap();
    assert!(config.contains("compression_level = \"none\""), "{config}");
    // The search must be able to find a plaintext marker: an unencrypted repository's is there.
    let plain = Repo::garage("enc-plain-control").unwrap();
    plain.init("1M");
    let control = format!("{marker}-CONTROL");
    let source = scratch.join("control.img");
    marked_volume(&source, &control, 2 * MIB);
    plain.backup(&source, "pread");
    for (sub, since) in [("data", start), ("meta", std::time::UNIX_EPOCH)] {
        let found = files_containing_since(&dir.join(sub), marker.as_bytes(), since);
        // The control marker contains the marker: skip files that hold only the control.
        let leaked: Vec<_> = found
            .into_iter()
            .filter(|path| {
                let bytes = std::fs::read(path).unwrap();
                let hits = bytes.windows(marker.len()).filter(|w| *w == marker.as_bytes()).count();
                let controls =
                    bytes.windows(control.len()).filter(|w| *w == control.as_bytes()).count();
                hits > controls
            })
            .collect();
        assert!(leaked.is_empty(), "the marker is in Garage's {sub}: {leaked:?}");
    }
    assert!(
        !files_containing_since(&dir.join("data"), control.as_bytes(), start).is_empty(),
        "the search does not find an unencrypted repository's plaintext"
    );
}

/// The files of a local repository under `prefix` (sorted).
fn objects(root: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.join(prefix)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

const RECORD_HEADER: usize = 64;

/// An encrypted repository (256 KiB chunks) with two backups of 1 MiB of random data, one pack
/// each: (its root, first backup id, second backup id).
fn two_backups(scratch: &Scratch) -> (PathBuf, String, String) {
    let pristine = scratch.join("pristine");
    let repo = Repo::Local(pristine.clone());
    run(&repo, &["init", "--encrypt", "--chunk-size", "256K"]).ok();
    // Random chunks are stored raw: every record has the same length, so two can be swapped.
    let source = scratch.join("a.img");
    gen_image(&source, MIB, "random", 3);
    let first = backup_id(&run(&repo, &["backup", "--source", source.to_str().unwrap()]).ok());
    let other = scratch.join("b.img");
    gen_image(&other, MIB, "random", 4);
    let second = backup_id(&run(&repo, &["backup", "--source", other.to_str().unwrap()]).ok());
    (pristine, first, second)
}

type Tamper = Box<dyn Fn(&Path)>;
type Change = Box<dyn Fn(&mut Vec<u8>)>;

/// A change of the object at `path` (under `pristine`), to apply to a copy of the repository.
fn edit_object(pristine: &Path, path: &Path, change: Change) -> Tamper {
    let relative = path.strip_prefix(pristine).unwrap().to_path_buf();
    Box::new(move |root: &Path| {
        let path = root.join(&relative);
        let mut bytes = std::fs::read(&path).unwrap();
        change(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
    })
}

#[test]
fn tampering_is_an_integrity_error_and_leaves_the_target_alone() {
    let scratch = Scratch::new("enc-tamper");
    let (pristine, first, second) = two_backups(&scratch);
    let packs = objects(&pristine, "packs");
    assert_eq!(packs.len(), 2);
    let record = RECORD_HEADER + 256 * 1024 + 28;
    assert_eq!(std::fs::metadata(&packs[0]).unwrap().len(), 4 * record as u64);
    let edit = |path: PathBuf, change: Change| edit_object(&pristine, &path, change);
    // A byte 20 from the end flipped: inside the sealed payload of an envelope.
    let flip_near_end = |path: PathBuf| {
        edit(
            path,
            Box::new(|b| {
                let at = b.len() - 20;
                b[at] ^= 1;
            }),
        )
    };
    let manifest = pristine.join("backups").join(&first);
    let index = objects(&pristine, "index")[0].clone();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "a flipped ciphertext byte",
            edit(packs[0].clone(), Box::new(|b| b[RECORD_HEADER + 1000] ^= 1)),
            "authentication failed",
        ),
        (
            "a flipped tag byte",
            edit(packs[0].clone(), Box::new(move |b| b[record - 1] ^= 1)),
            "authentication failed",
        ),
        (
            "two records swapped",
            edit(
                packs[0].clone(),
                Box::new(move |b| {
                    let (one, two) = b.split_at_mut(record);
                    one.swap_with_slice(&mut two[..record]);
                }),
            ),
            "does not match its index entry",
        ),
        (
            "two records' sealed bytes swapped under their headers",
            edit(
                packs[0].clone(),
                Box::new(move |b| {
                    let (one, two) = b.split_at_mut(record);
                    one[RECORD_HEADER..].swap_with_slice(&mut two[RECORD_HEADER..record]);
                }),
            ),
            "authentication failed",
        ),
        ("a truncated pack", edit(packs[0].clone(), Box::new(|b| b.truncate(b.len() - 100))), ""),
        ("a flipped index byte", flip_near_end(index.clone()), "index"),
        ("a flipped manifest byte", flip_near_end(manifest.clone()), "manifest"),
        (
            "a truncated manifest",
            edit(manifest.clone(), Box::new(|b| b.truncate(b.len() / 2))),
            "manifest",
        ),
    ];
    for (what, tamper, expected) in cases {
        let root = scratch.join("tampered");
        let _ = std::fs::remove_dir_all(&root);
        copy_dir(&pristine, &root);
        tamper(&root);
        let repo = Repo::Local(root.clone());
        // Which backup a pack serves depends on the order the packs sort in (pack ids are
        // random): try both, each into a target of its own.
        let outcomes: Vec<(Run, PathBuf)> = [&first, &second]
            .iter()
            .map(|id| {
                let target = scratch.join(&format!("target-{id}.img"));
                let _ = std::fs::remove_file(&target);
                (run(&repo, &["restore", id, "--target", target.to_str().unwrap()]), target)
            })
            .filter(|(run, _)| run.code != 0)
            .collect();
        assert_eq!(outcomes.len(), 1, "{what}: exactly one backup fails");
        let (failed, target) = &outcomes[0];
        let message = failed.fails(5);
        assert!(message.contains(expected), "{what}: {message}");
        let written = std::fs::read(target).unwrap_or_default();
        assert!(
            written.is_empty() || written.len() as u64 == MIB,
            "{what}: target of {} bytes",
            written.len()
        );
        for id in [&first, &second] {
            let _ = std::fs::remove_file(scratch.join(&format!("target-{id}.img")));
        }
    }
}

#[test]
fn objects_swapped_for_others_are_refused() {
    let scratch = Scratch::new("enc-swap");
    let (pristine, first, second) = two_backups(&scratch);
    // A manifest replaced by another backup's: refused, it names the other backup.
    let root = scratch.join("swapped-manifest");
    copy_dir(&pristine, &root);
    std::fs::copy(root.join("backups").join(&second), root.join("backups").join(&first)).unwrap();
    let target = scratch.join("target.img");
    let _ = std::fs::remove_file(&target);
    let message =
        run(&Repo::Local(root.clone()), &["restore", &first, "--target", target.to_str().unwrap()])
            .fails(5);
    assert!(message.contains("belongs to backup"), "{message}");
    assert!(!target.exists());
    // An index replaced by another pack's: refused.
    let root = scratch.join("swapped-index");
    copy_dir(&pristine, &root);
    let indexes = objects(&root, "index");
    std::fs::copy(&indexes[1], &indexes[0]).unwrap();
    let runs: Vec<Run> = [&first, &second]
        .iter()
        .map(|id| {
            run(
                &Repo::Local(root.clone()),
                &["restore", id, "--target", target.to_str().unwrap(), "--force"],
            )
        })
        .collect();
    assert!(
        runs.iter().any(|run| run.code == 5 && run.stderr.contains("describes pack")),
        "{runs:?}"
    );
}

#[test]
fn passphrase_problems_have_their_own_exit_codes() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new("enc-keys");
    let root = scratch.join("repo");
    let repo = Repo::Local(root.clone());
    // No passphrase for init --encrypt (stdin is no terminal): exit 11, nothing created.
    repo.ferry(&["init", "--encrypt"]).fails(11);
    assert!(!root.join("config").exists());
    run(&repo, &["init", "--encrypt"]).ok();
    let source = scratch.join("a.img");
    gen_image(&source, MIB, "text", 1);
    let id = backup_id(&run(&repo, &["backup", "--source", source.to_str().unwrap()]).ok());
    let target = scratch.join("out.img");
    let restore = ["restore", id.as_str(), "--target", target.to_str().unwrap()];
    // Wrong passphrase: exit 10, and the message does not quote it.
    let wrong = repo.ferry_env(&restore, &with_pass("not the passphrase at all"));
    let message = wrong.fails(10);
    assert!(message.contains("wrong passphrase"), "{message}");
    assert!(!wrong.stderr.contains("not the passphrase at all"), "{}", wrong.stderr);
    assert!(!target.exists());
    // None: exit 11.
    assert!(repo.ferry(&restore).fails(11).contains("FERRY_PASSPHRASE"));
    assert!(!target.exists());
    // From a file (its first line); one others may read is a warning (the job still runs).
    let file = scratch.join("pass.txt");
    std::fs::write(&file, format!("{PASSPHRASE}\n")).unwrap();
    let from_file = [("FERRY_PASSPHRASE_FILE", file.to_str().unwrap())];
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let shared = repo.ferry_env(&restore, &from_file);
    let _ = shared.ok();
    let warned = shared.warnings().join("\n");
    assert!(warned.contains("passphrase file") && warned.contains("mode 640"), "{warned}");
    assert!(!format!("{shared:?}").contains(PASSPHRASE), "{shared:?}");
    assert_same(&source, &target, MIB);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let private = repo.ferry_env(&["list"], &from_file);
    let _ = private.ok();
    assert!(private.warnings().is_empty(), "{:?}", private.warnings());
    // A passphrase "file" that is a device or far too large: exit 2, unread.
    let device = repo.ferry_env(&["list"], &[("FERRY_PASSPHRASE_FILE", "/dev/zero")]);
    assert!(device.fails(2).contains("neither a regular file nor a pipe"), "{device:?}");
    let huge = scratch.join("huge.txt");
    std::fs::File::create(&huge).unwrap().set_len(1 << 30).unwrap();
    let large = repo.ferry_env(&["list"], &[("FERRY_PASSPHRASE_FILE", huge.to_str().unwrap())]);
    assert!(large.fails(2).contains("holds more than 64 KiB"), "{large:?}");
    // Key objects gone: exit 10.
    let keys = objects(&root, "keys");
    let saved: Vec<_> = keys.iter().map(|k| (k.clone(), std::fs::read(k).unwrap())).collect();
    for key in &keys {
        std::fs::remove_file(key).unwrap();
    }
    assert!(run(&repo, &["list"]).fails(10).contains("no readable key"));
    for (key, bytes) in saved {
        std::fs::write(key, bytes).unwrap();
    }
    // A passphrase for an unencrypted repository: exit 11 (a config swapped for an
    // unencrypted one is noticed), nothing written.
    let plain = Repo::Local(scratch.join("plain"));
    plain.init("1M");
    run(&plain, &["backup", "--source", source.to_str().unwrap()]).fails(11);
    assert!(
        !scratch.join("plain/backups").exists()
            || objects(&scratch.join("plain"), "backups").is_empty()
    );
    // Cinder's format has no encryption: refused before anything.
    let run_cinder = run(&repo, &cinder_backup_args(source.to_str().unwrap()));
    let message = run_cinder.fails(2);
    assert!(message.contains("FERRY_PASSPHRASE") && message.contains("cinder"), "{message}");
}

#[test]
fn keys_rotate_without_reencrypting() {
    let scratch = Scratch::new("enc-rotate");
    let root = scratch.join("repo");
    let repo = Repo::Local(root.clone());
    run(&repo, &["init", "--encrypt"]).ok();
    let source = scratch.join("a.img");
    gen_image(&source, 2 * MIB, "mixed", 2);
    let id = backup_id(&run(&repo, &["backup", "--source", source.to_str().unwrap()]).ok());
    let packs_before: Vec<_> =
        objects(&root, "packs").iter().map(|p| std::fs::read(p).unwrap()).collect();
    let listed = run(&repo, &["key", "list"]).ok();
    let old = listed["keys"][0]["key_id"].as_str().unwrap().to_string();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["kdf_memory_kib"], 65536);
    // The last key cannot go.
    run(&repo, &["key", "remove", &old]).fails(8);
    let new_pass = "a new and longer passphrase";
    let added = repo
        .ferry_env(
            &["key", "add"],
            &[("FERRY_PASSPHRASE", PASSPHRASE), ("FERRY_NEW_PASSPHRASE", new_pass)],
        )
        .ok();
    let new = added["key_id"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    // Remove the old key, opening with the new passphrase.
    repo.ferry_env(&["key", "remove", &old], &with_pass(new_pass)).ok();
    let listed = repo.ferry_env(&["key", "list"], &with_pass(new_pass)).ok();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["key_id"], new.as_str());
    assert_eq!(listed["keys"][0]["current"], true);
    // The old passphrase opens nothing; the new one restores.
    let target = scratch.join("out.img");
    let restore = ["restore", id.as_str(), "--target", target.to_str().unwrap()];
    repo.ferry_env(&restore, &with_pass(PASSPHRASE)).fails(10);
    repo.ferry_env(&restore, &with_pass(new_pass)).ok();
    assert_same(&source, &target, 2 * MIB);
    // passwd: the key that opened it is replaced.
    let third = "the third passphrase of this test";
    let changed = repo
        .ferry_env(
            &["key", "passwd"],
            &[("FERRY_PASSPHRASE", new_pass), ("FERRY_NEW_PASSPHRASE", third)],
        )
        .ok();
    assert_ne!(changed["key_id"], new.as_str());
    repo.ferry_env(&["list"], &with_pass(new_pass)).fails(10);
    repo.ferry_env(&["list"], &with_pass(third)).ok();
    // No data object was rewritten.
    let packs_after: Vec<_> =
        objects(&root, "packs").iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(packs_before, packs_after);
    // Key commands on an unencrypted repository: usage.
    let plain = Repo::Local(scratch.join("plain"));
    plain.init("1M");
    plain.ferry(&["key", "list"]).fails(2);
}

#[test]
fn unencrypted_repositories_stay_version_1() {
    let scratch = Scratch::new("enc-v1");
    let root = scratch.join("repo");
    let repo = Repo::Local(root.clone());
    repo.init("256K");
    let source = scratch.join("a.img");
    gen_image(&source, MIB, "mixed", 9);
    let id = backup_id(&repo.backup(&source, "pread"));
    assert!(!root.join("keys").exists());
    let config = String::from_utf8_lossy(&std::fs::read(root.join("config")).unwrap()).into_owned();
    assert!(
        config.contains("\"format_version\":1") && config.contains("\"hash_key\":\""),
        "{config}"
    );
    assert!(!config.contains("encryption"), "{config}");
    for object in objects(&root, "index")
        .iter()
        .chain(&objects(&root, "backups"))
        .chain([&root.join("config")])
    {
        let bytes = std::fs::read(object).unwrap();
        assert_eq!(&bytes[..10], b"FERRYOBJ\x01\x00", "{}", object.display());
    }
    for pack in objects(&root, "packs") {
        let bytes = std::fs::read(pack).unwrap();
        assert_eq!(&bytes[..4], b"FRCK");
        assert!(bytes[4] < 2, "an unencrypted record's encoding byte is 0 or 1");
    }
    let target = scratch.join("out.img");
    repo.restore(&id, &target, "pread", &[]).ok();
    assert_same(&source, &target, MIB);
}

/// Every cipher `init --cipher` offers backs up and restores, and is the one the config records
/// (repositories made with AES-256-GCM, the default before AEGIS-256X2, keep working); the
/// default on this CPU is one of them; `--cipher` without `--encrypt`, or an unknown name, is a
/// usage error that creates nothing.
#[test]
fn every_cipher_round_trips() {
    let scratch = Scratch::new("enc-ciphers");
    let source = scratch.join("a.img");
    gen_image(&source, 3 * MIB, "mixed", 12);
    let source_arg = source.to_str().unwrap();
    for cipher in ["aegis-256x2", "aes-256-gcm", "chacha20-poly1305", ""] {
        let root = scratch.join(&format!("repo-{cipher}"));
        let repo = Repo::Local(root.clone());
        let mut init = vec!["init", "--encrypt", "--chunk-size", "1M"];
        if !cipher.is_empty() {
            init.extend(["--cipher", cipher]);
        }
        run(&repo, &init).ok();
        let config =
            String::from_utf8_lossy(&std::fs::read(root.join("config")).unwrap()).into_owned();
        let recorded = ["aegis-256x2", "aes-256-gcm", "chacha20-poly1305"]
            .into_iter()
            .filter(|name| config.contains(&format!("\"cipher\":\"{name}\"")))
            .collect::<Vec<_>>();
        if cipher.is_empty() {
            assert_eq!(recorded.len(), 1, "{config}");
        } else {
            assert_eq!(recorded, [cipher], "{config}");
        }
        let id = backup_id(&run(&repo, &["backup", "--source", source_arg]).ok());
        let target = scratch.join("out.img");
        run(&repo, &["restore", &id, "--target", target.to_str().unwrap()]).ok();
        assert_same(&source, &target, 3 * MIB);
        std::fs::remove_file(&target).unwrap();
    }
    for bad in
        [&["init", "--cipher", "aes-256-gcm"][..], &["init", "--encrypt", "--cipher", "rot13"]]
    {
        let repo = Repo::Local(scratch.join("refused"));
        let _ = run(&repo, bad).fails(2);
        assert!(!scratch.join("refused").exists());
    }
}

/// Runs ferry with only the key file `--key-file` names.
fn with_key_file(repo: &Repo, key_file: &Path, args: &[&str]) -> Run {
    let mut all = vec!["--key-file", key_file.to_str().unwrap()];
    all.extend_from_slice(args);
    repo.ferry(&all)
}

/// Asserts that no event or message of `run` holds the material of any of `key_files`.
fn prints_no_key_material(run: &Run, key_files: &[&Path]) {
    let printed = format!("{}{:?}", run.stderr, run.events).to_ascii_lowercase();
    for key_file in key_files {
        let material = std::fs::read_to_string(key_file).unwrap();
        let material = material.trim();
        assert_eq!(material.len(), 64);
        assert!(!printed.contains(material), "key material printed: {printed}");
        // Nor half of it.
        assert!(!printed.contains(&material[..32]) && !printed.contains(&material[32..]));
    }
}

/// A repository whose first key is a key file: generate it (mode 0600, never overwritten),
/// `init --encrypt --key-file`, back up and restore byte-identical (the key file from
/// `FERRY_KEY_FILE`), a wrong, missing or malformed key file or one given with a passphrase
/// refused with its exit code and nothing written to the target; add a passphrase key, remove
/// the key-file key, restore with the passphrase; add a key file while opened with the
/// passphrase; `key passwd` refused with a key file.
fn key_file_lifecycle(repo: &Repo, scratch: &Scratch) {
    use std::os::unix::fs::PermissionsExt;
    let key_file = scratch.join("repo.key");
    let generated = repo.ferry(&["key", "generate-file", key_file.to_str().unwrap()]);
    assert_eq!(generated.ok()["path"], key_file.to_str().unwrap());
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let material = std::fs::read(&key_file).unwrap();
    assert_eq!(material.len(), 65);
    // Never over an existing file (exit 8): the file is unchanged.
    repo.ferry(&["key", "generate-file", key_file.to_str().unwrap()]).fails(8);
    assert_eq!(std::fs::read(&key_file).unwrap(), material);
    prints_no_key_material(&generated, &[&key_file]);
    let init = with_key_file(repo, &key_file, &["init", "--encrypt", "--chunk-size", "256K"]);
    init.ok();
    prints_no_key_material(&init, &[&key_file]);
    let source = scratch.join("a.img");
    gen_image(&source, 2 * MIB, "mixed", 5);
    let backup = with_key_file(repo, &key_file, &["backup", "--source", source.to_str().unwrap()]);
    let id = backup_id(&backup.ok());
    let target = scratch.join("out.img");
    let restore = ["restore", id.as_str(), "--target", target.to_str().unwrap()];
    repo.ferry_env(&restore, &[("FERRY_KEY_FILE", key_file.to_str().unwrap())]).ok();
    assert_same(&source, &target, 2 * MIB);
    std::fs::remove_file(&target).unwrap();
    assert!(backup.warnings().is_empty(), "{:?}", backup.warnings());
    // A key file others may read is a warning (the job still runs); 0600 again, none.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open_to_all = with_key_file(repo, &key_file, &["list"]);
    let _ = open_to_all.ok();
    let warned = open_to_all.warnings().join("\n");
    assert!(warned.contains("mode 644") && warned.contains("chmod 600"), "{warned}");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let listed = with_key_file(repo, &key_file, &["key", "list"]).ok();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["kind"], "key-file");
    assert_eq!(listed["keys"][0]["current"], true);
    assert!(listed["keys"][0].get("kdf_memory_kib").is_none(), "{listed}");
    let file_key = listed["keys"][0]["key_id"].as_str().unwrap().to_string();
    // Wrong key file: exit 10 (like a wrong passphrase), nothing written, no material printed.
    let other = scratch.join("other.key");
    repo.ferry(&["key", "generate-file", other.to_str().unwrap()]).ok();
    let wrong = with_key_file(repo, &other, &restore);
    assert!(wrong.fails(10).contains("wrong key file"), "{}", wrong.stderr);
    assert!(!target.exists());
    prints_no_key_material(&wrong, &[&key_file, &other]);
    // A missing, a malformed, an oversized key file: exit 2, nothing written.
    let malformed = scratch.join("malformed.key");
    std::fs::write(&malformed, &material[..40]).unwrap();
    for (path, expected) in [
        (scratch.join("missing.key"), "cannot read"),
        (malformed.clone(), "64 hex digits"),
        (source.clone(), "not a key file"),
    ] {
        let run = with_key_file(repo, &path, &restore);
        assert!(run.fails(2).contains(expected), "{}: {}", path.display(), run.stderr);
        assert!(!target.exists());
    }
    let malformed_run = with_key_file(repo, &malformed, &restore);
    assert!(!malformed_run.stderr.contains(std::str::from_utf8(&material[..40]).unwrap()));
    // A key file and a passphrase at once: ambiguous, exit 2.
    let both =
        repo.ferry_env(&["--key-file", key_file.to_str().unwrap(), "list"], &with_pass(PASSPHRASE));
    assert!(both.fails(2).contains("both a key file"), "{}", both.stderr);
    // A passphrase opens nothing yet (no passphrase key): exit 10, naming the key file keys.
    let refused = run(repo, &["list"]).fails(10);
    assert!(refused.contains("key file"), "{refused}");
    // key passwd with a key file: refused (exit 2) before anything is written.
    let passwd = repo.ferry_env(
        &["--key-file", key_file.to_str().unwrap(), "key", "passwd"],
        &[("FERRY_NEW_PASSPHRASE", PASSPHRASE)],
    );
    assert!(passwd.fails(2).contains("key add --new-key-file"), "{}", passwd.stderr);
    assert_eq!(with_key_file(repo, &key_file, &["key", "list"]).ok()["keys"], listed["keys"]);
    // Add a passphrase key while opened with the key file, remove the key-file key while
    // opened with the passphrase, restore with the passphrase.
    let added = repo.ferry_env(
        &["--key-file", key_file.to_str().unwrap(), "key", "add"],
        &[("FERRY_NEW_PASSPHRASE", PASSPHRASE)],
    );
    let pass_key = added.ok()["key_id"].as_str().unwrap().to_string();
    run(repo, &["key", "remove", &file_key]).ok();
    with_key_file(repo, &key_file, &restore).fails(10);
    assert!(!target.exists());
    run(repo, &restore).ok();
    assert_same(&source, &target, 2 * MIB);
    // And back: a key file added while opened with the passphrase opens the repository; the
    // passphrase key can go.
    let added = run(repo, &["key", "add", "--new-key-file", other.to_str().unwrap()]).ok();
    let other_key = added["key_id"].as_str().unwrap().to_string();
    with_key_file(repo, &other, &["key", "remove", &pass_key]).ok();
    let listed = with_key_file(repo, &other, &["key", "list"]).ok();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["key_id"], other_key.as_str());
    assert_eq!(listed["keys"][0]["kind"], "key-file");
    with_key_file(repo, &other, &["verify", &id, "--read-data"]).ok();
    // A key file for an unencrypted repository: exit 11, nothing written.
    let plain = Repo::Local(scratch.join("plain"));
    plain.init("1M");
    let run = with_key_file(&plain, &other, &["backup", "--source", source.to_str().unwrap()]);
    assert!(run.fails(11).contains("key file was given"), "{}", run.stderr);
    let packs = scratch.join("plain/packs");
    assert!(!packs.exists() || objects(&scratch.join("plain"), "packs").is_empty());
}

#[test]
fn key_files_open_a_local_repository() {
    let scratch = Scratch::new("enc-keyfile-local");
    key_file_lifecycle(&Repo::Local(scratch.join("repo")), &scratch);
}

#[test]
fn key_files_open_a_garage_repository() {
    let Some(repo) = Repo::garage("enc-keyfile") else { return };
    let scratch = Scratch::new("enc-keyfile-garage");
    key_file_lifecycle(&repo, &scratch);
}

/// The flags and variables of key files apply where a repository is opened or created and are
/// refused (exit 2) elsewhere: `--format cinder`, `init` without `--encrypt`, `reclaim`,
/// `key generate-file`.
#[test]
fn key_file_flag_applies_or_is_refused() {
    let scratch = Scratch::new("enc-keyfile-flags");
    let key_file = scratch.join("k");
    let repo = Repo::Local(scratch.join("repo"));
    repo.ferry(&["key", "generate-file", key_file.to_str().unwrap()]).ok();
    let k = key_file.to_str().unwrap();
    let source = scratch.join("a.img");
    gen_image(&source, MIB, "random", 1);
    let cinder = cinder_backup_args(source.to_str().unwrap());
    let mut flagged = vec!["--key-file", k];
    flagged.extend(cinder);
    assert!(repo.ferry(&flagged).fails(2).contains("--key-file does not apply to --format cinder"));
    let message = repo.ferry_env(&cinder, &[("FERRY_KEY_FILE", k)]).fails(2);
    assert!(message.contains("FERRY_KEY_FILE") && message.contains("cinder"), "{message}");
    for (args, expected) in [
        (&["--key-file", k, "init"][..], "--encrypt"),
        (&["--key-file", k, "reclaim"][..], "reclaim"),
        (&["--key-file", k, "key", "generate-file", "x"][..], "generate-file"),
    ] {
        let message = repo.ferry(args).fails(2);
        assert!(message.contains("--key-file") && message.contains(expected), "{message}");
    }
    // Key material in the environment makes no unencrypted repository either.
    for variable in ["FERRY_KEY_FILE", "FERRY_PASSPHRASE"] {
        let message = repo.ferry_env(&["init"], &[(variable, k)]).fails(2);
        assert!(message.contains(variable) && message.contains("--encrypt"), "{message}");
    }
    assert!(!scratch.join("repo").exists() && !scratch.join("x").exists());
    // Where it applies: init --encrypt takes it, and key add takes --new-key-file.
    with_key_file(&repo, &key_file, &["init", "--encrypt"]).ok();
    with_key_file(&repo, &key_file, &["key", "add", "--new-key-file", k]).ok();
    // --new-key-file and a new passphrase at once: one secret per key object.
    let both = repo.ferry_env(
        &["--key-file", k, "key", "add", "--new-key-file", k],
        &[("FERRY_NEW_PASSPHRASE", PASSPHRASE)],
    );
    assert!(both.fails(2).contains("--new-key-file"), "{}", both.stderr);
}
