//! `--format cinder` judged by Cinder's own code: `scripts/cinder/harness.py` drives the real
//! `cinder.backup.drivers.s3.S3BackupDriver` (cinder 29.0.0) against the test Garage. Cinder
//! restores what ferry writes and ferry restores what Cinder writes, byte for byte, for every
//! compression and for incremental chains; the documents match Cinder's bytes.
//!
//! Needs `FERRY_CINDER_PY` (the venv python `scripts/cinder/setup.sh` prints) and Garage; skipped
//! with a message otherwise, unless `FERRY_TEST_REQUIRE_CINDER=1` (set by scripts/test.sh).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

use crate::util::{Run, Scratch, assert_same, gen_image};

static COUNTER: AtomicU32 = AtomicU32::new(0);
pub(crate) const OBJECT_SIZE: &str = "4194304";
pub(crate) const MIB: u64 = 1 << 20;

/// The venv python, or None (skipped) without Cinder or Garage.
pub(crate) fn cinder_py(test: &str) -> Option<String> {
    let py = std::env::var("FERRY_CINDER_PY").ok().filter(|p| !p.is_empty());
    let s3 = std::env::var("FERRY_TEST_S3_ENDPOINT").ok();
    if py.is_none() || s3.is_none() {
        assert!(
            std::env::var("FERRY_TEST_REQUIRE_CINDER").is_err(),
            "FERRY_TEST_REQUIRE_CINDER is set but FERRY_CINDER_PY or FERRY_TEST_S3_ENDPOINT is not"
        );
        eprintln!(
            "skipped {test}: needs FERRY_CINDER_PY (scripts/cinder/setup.sh) and Garage \
             (run scripts/test.sh)"
        );
        return None;
    }
    py
}

pub(crate) fn uuid() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n & 0xffff,
        (nanos >> 12) & 0xfff,
        nanos & 0xfff,
        nanos >> 16 & 0xffff_ffff_ffff
    )
}

pub(crate) fn bucket() -> String {
    std::env::var("FERRY_TEST_S3_BUCKET").unwrap_or_else(|_| "ferry-test".into())
}

/// Runs `ferry --json --repo s3://BUCKET ... ARGS`.
fn ferry(args: &[&str]) -> Run {
    ferry_env(args, &[])
}

fn ferry_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let endpoint = std::env::var("FERRY_TEST_S3_ENDPOINT").unwrap_or_default();
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--json", "--repo", &format!("s3://{}", bucket()), "--s3-endpoint", &endpoint])
        .args(["--s3-region", "garage"])
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    Run::from(output)
}

fn ferry_ok(args: &[&str]) -> Run {
    let run = ferry(args);
    assert_eq!(run.code, 0, "ferry {args:?}: {}", run.stderr);
    run
}

/// Runs the Cinder harness and returns its JSON.
pub(crate) fn harness(py: &str, args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cinder/harness.py");
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    assert!(out.status.success(), "harness {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs a Python snippet with boto3 against the test bucket; `args` follow the script.
pub(crate) fn boto(py: &str, script: &str, args: &[&str]) -> String {
    let prelude = "import os, sys, boto3\n\
        s3 = boto3.client('s3', endpoint_url=os.environ['FERRY_TEST_S3_ENDPOINT'], \
        region_name=os.environ.get('FERRY_TEST_S3_REGION', 'garage'))\n\
        B = os.environ.get('FERRY_TEST_S3_BUCKET', 'ferry-test')\n";
    let out =
        Command::new(py).arg("-c").arg(format!("{prelude}{script}")).args(args).output().unwrap();
    assert!(out.status.success(), "boto: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ferry_backup(image: &Path, backup: &str, volume: &str, compression: &str, parent: Option<&str>) {
    let mut args = vec![
        "backup",
        "--format",
        "cinder",
        "--source",
        image.to_str().unwrap(),
        "--cinder-backup-id",
        backup,
        "--cinder-volume-id",
        volume,
        "--compression",
        compression,
        "--cinder-object-size",
        OBJECT_SIZE,
    ];
    if let Some(parent) = parent {
        args.extend(["--incremental-parent", parent]);
    }
    let _ = ferry_ok(&args);
}

/// Restores with ferry; the start event's memory budget is the one of this backup's objects.
fn ferry_restore(backup: &str, volume: &str, target: &Path) {
    let run = ferry_ok(&[
        "restore",
        "--format",
        "cinder",
        backup,
        "--cinder-volume-id",
        volume,
        "--target",
        target.to_str().unwrap(),
    ]);
    let start = run.events.iter().find(|e| e["event"] == "start").expect("a start event");
    let budget = &start["budget"];
    let per_download = budget["download_bytes_max"].as_u64().unwrap()
        / budget["transfers_in_flight"].as_u64().unwrap();
    let object: u64 = OBJECT_SIZE.parse().unwrap();
    assert!(
        (object..2 * object).contains(&per_download),
        "budget {budget} is not sized for {object}-byte objects"
    );
}

pub(crate) fn cinder_backup(
    py: &str,
    image: &Path,
    backup: &str,
    volume: &str,
    compression: &str,
    parent: Option<&str>,
) -> Value {
    let mut args = vec![
        "backup",
        "--image",
        image.to_str().unwrap(),
        "--backup-id",
        backup,
        "--volume-id",
        volume,
        "--compression",
        compression,
        "--object-size",
        OBJECT_SIZE,
    ];
    if let Some(parent) = parent {
        args.extend(["--parent-id", parent]);
    }
    harness(py, &args)
}

/// Cinder restores `backup` into a file of `size` bytes (Cinder opens the target `r+b`).
pub(crate) fn cinder_restore(py: &str, backup: &str, target: &Path, size: u64) {
    let file = std::fs::File::create(target).unwrap();
    file.set_len(size).unwrap();
    let _ = harness(
        py,
        &[
            "restore",
            "--backup-id",
            backup,
            "--volume-id",
            &uuid(),
            "--target",
            target.to_str().unwrap(),
        ],
    );
}

/// Overwrites a few ranges of `image` (random bytes, text, zeros) to make an incremental.
pub(crate) fn mutate(image: &Path, seed: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let len = file.metadata().unwrap().len();
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for round in 0..6u64 {
        let offset = next() % (len - 200_000);
        let length = 1 + next() % 150_000;
        let bytes: Vec<u8> = match round % 3 {
            0 => (0..length).map(|_| next() as u8).collect(),
            1 => b"changed text ".iter().copied().cycle().take(length as usize).collect(),
            _ => vec![0u8; length as usize],
        };
        file.write_all_at(&bytes, offset).unwrap();
    }
}

/// Every compression name Cinder writes, with an image size per name (bz2 is slow: small).
const EVERY_COMPRESSION: [(&str, u64); 6] = [
    ("zlib", 24 * MIB),
    ("gzip", 12 * MIB),
    ("bz2", 6 * MIB),
    ("bzip2", 6 * MIB),
    ("zstd", 24 * MIB),
    ("none", 12 * MIB),
];

/// Cinder restores ferry's full backups, whatever the compression.
#[test]
fn cinder_restores_ferry_full_every_compression() {
    let Some(py) = cinder_py("cinder_restores_ferry_full_every_compression") else { return };
    let dir = Scratch::new("cinder-ferry-full");
    for (compression, size) in EVERY_COMPRESSION {
        let image = dir.join(&format!("{compression}.img"));
        gen_image(&image, size, "mixed", size + 7);
        let (backup, volume) = (uuid(), uuid());
        ferry_backup(&image, &backup, &volume, compression, None);
        let target = dir.join(&format!("{compression}.out"));
        cinder_restore(&py, &backup, &target, size);
        assert_same(&image, &target, size);
    }
}

/// Cinder restores ferry's full + incremental + incremental chain; ferry's record is Cinder's.
#[test]
fn cinder_restores_ferry_incremental_chain() {
    let Some(py) = cinder_py("cinder_restores_ferry_incremental_chain") else { return };
    let dir = Scratch::new("cinder-ferry-inc");
    let size = 24 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 11);
    let volume = uuid();
    let ids = [uuid(), uuid(), uuid()];
    ferry_backup(&image, &ids[0], &volume, "zlib", None);
    mutate(&image, 1);
    ferry_backup(&image, &ids[1], &volume, "zstd", Some(&ids[0]));
    mutate(&image, 2);
    ferry_backup(&image, &ids[2], &volume, "zlib", Some(&ids[1]));
    let target = dir.join("out.img");
    cinder_restore(&py, &ids[2], &target, size);
    assert_same(&image, &target, size);

    // The backup-import record: the fields Cinder's importer needs match Cinder's own export.
    let run = ferry_ok(&["cinder-record", &ids[2], "--cinder-volume-id", &volume]);
    let ours = &run.ok()["record"];
    // The harness reports Cinder's own `encode_record` output in `record_b64`.
    let exported = harness(&py, &["record", "--backup-id", &ids[2]]);
    let encoded = exported["record"]["record_b64"].as_str().unwrap().to_string();
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
    for key in ["id", "container", "service_metadata", "object_count", "parent_id", "size"] {
        assert_eq!(ours[key], theirs[key], "record field {key}: {ours} vs {theirs}");
    }
}

/// ferry restores Cinder's full backups, whatever the compression.
#[test]
fn ferry_restores_cinder_full_every_compression() {
    let Some(py) = cinder_py("ferry_restores_cinder_full_every_compression") else { return };
    let dir = Scratch::new("ferry-cinder-full");
    for (compression, size) in EVERY_COMPRESSION {
        let image = dir.join(&format!("{compression}.img"));
        gen_image(&image, size, "mixed", size + 3);
        let (backup, volume) = (uuid(), uuid());
        let _ = cinder_backup(&py, &image, &backup, &volume, compression, None);
        let target = dir.join(&format!("{compression}.out"));
        ferry_restore(&backup, &volume, &target);
        assert_same(&image, &target, size);
    }
}

/// ferry restores Cinder's full + incremental + incremental chain, in parallel.
#[test]
fn ferry_restores_cinder_incremental_chain() {
    let Some(py) = cinder_py("ferry_restores_cinder_incremental_chain") else { return };
    let dir = Scratch::new("ferry-cinder-inc");
    let size = 24 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 21);
    let volume = uuid();
    let ids = [uuid(), uuid(), uuid()];
    let _ = cinder_backup(&py, &image, &ids[0], &volume, "zlib", None);
    mutate(&image, 3);
    let _ = cinder_backup(&py, &image, &ids[1], &volume, "zstd", Some(&ids[0]));
    mutate(&image, 4);
    let _ = cinder_backup(&py, &image, &ids[2], &volume, "bz2", Some(&ids[1]));
    let target = dir.join("out.img");
    ferry_restore(&ids[2], &volume, &target);
    assert_same(&image, &target, size);
}

/// For the same image, ferry's `_sha256file` and `_metadata` are Cinder's bytes, up to the ids,
/// times and prefix that differ between two backups (and `volume_meta`, which ferry writes null).
#[test]
fn documents_match_cinder_bytes() {
    let Some(py) = cinder_py("documents_match_cinder_bytes") else { return };
    let dir = Scratch::new("cinder-docs");
    let size = 12 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 31);
    let (ferry_id, cinder_id, volume) = (uuid(), uuid(), uuid());
    ferry_backup(&image, &ferry_id, &volume, "zlib", None);
    let _ = cinder_backup(&py, &image, &cinder_id, &volume, "zlib", None);
    let script = r#"
import json
ours_id, theirs_id, vol = sys.argv[1:4]
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix='volume_%s/' % vol) for o in p.get('Contents', [])]
def prefix(bid):
    [k] = [k for k in keys if k.endswith('_backup_%s_metadata' % bid)]
    return k[:-len('_metadata')]
def get(k):
    return s3.get_object(Bucket=B, Key=k)['Body'].read()
po, pt = prefix(ours_id), prefix(theirs_id)
sha_o, sha_t = get(po + '_sha256file'), get(pt + '_sha256file')
t = json.loads(sha_t); o = json.loads(sha_o)
t['backup_id'] = o['backup_id']; t['created_at'] = o['created_at']
assert json.dumps(t, sort_keys=True, indent=2).encode() == sha_o, 'sha256file differs'
# The reserialisation is the identity on Cinder's own bytes.
assert json.dumps(json.loads(sha_t), sort_keys=True, indent=2).encode() == sha_t
meta_o, meta_t = get(po + '_metadata'), get(pt + '_metadata')
t = json.loads(meta_t); o = json.loads(meta_o)
t['backup_id'] = o['backup_id']; t['created_at'] = o['created_at']; t['volume_meta'] = None
t['objects'] = [{k.replace(pt, po): v for k, v in e.items()} for e in t['objects']]
assert json.dumps(t, sort_keys=True, indent=2).encode() == meta_o, 'metadata differs'
print(len(o['objects']))
"#;
    let objects = boto(&py, script, &[&ferry_id, &cinder_id, &volume]);
    assert_eq!(objects.trim(), "3");
}

/// A data object missing from the bucket fails the restore as an integrity error naming it.
#[test]
fn cinder_missing_object_is_integrity_error() {
    let Some(py) = cinder_py("cinder_missing_object_is_integrity_error") else { return };
    let dir = Scratch::new("cinder-missing");
    let size = 12 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 41);
    let (backup, volume) = (uuid(), uuid());
    ferry_backup(&image, &backup, &volume, "zstd", None);
    let script = r#"
vol, bid = sys.argv[1:3]
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix='volume_%s/' % vol) for o in p.get('Contents', [])]
[k] = [k for k in keys if k.endswith('_backup_%s-00002' % bid)]
s3.delete_object(Bucket=B, Key=k)
print(k)
"#;
    let deleted = boto(&py, script, &[&volume, &backup]);
    let target = dir.join("out.img");
    let run = ferry(&[
        "restore",
        "--format",
        "cinder",
        &backup,
        "--cinder-volume-id",
        &volume,
        "--target",
        target.to_str().unwrap(),
    ]);
    let message = run.fails(5);
    assert!(message.contains(deleted.trim()), "{message}");
}

/// An unknown compression name is a usage error (exit 2) before anything is read or written.
#[test]
fn cinder_bad_compression_is_usage_error() {
    let dir = Scratch::new("cinder-bad-compression");
    let image = dir.join("vol.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let run = ferry(&[
        "backup",
        "--format",
        "cinder",
        "--source",
        image.to_str().unwrap(),
        "--cinder-backup-id",
        &uuid(),
        "--cinder-volume-id",
        &uuid(),
        "--compression",
        "lz4",
    ]);
    assert!(run.fails(2).contains("lz4"));
    let run = ferry(&["backup", "--source", image.to_str().unwrap(), "--compression", "zlib"]);
    assert!(run.fails(2).contains("--format cinder"));
}

/// A Cinder restore checks every object before writing its bytes: a `none` object with one byte
/// changed (Cinder itself would write it as it is) is refused with exit 5 naming the object, and
/// the target file the restore created is removed.
#[test]
fn cinder_restore_refuses_corrupted_objects() {
    let Some(py) = cinder_py("cinder_restore_refuses_corrupted_objects") else { return };
    let dir = Scratch::new("cinder-corrupt");
    let size = 12 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "random", 43);
    let script = r#"
vol, bid, suffix = sys.argv[1:4]
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix='volume_%s/' % vol) for o in p.get('Contents', [])]
[k] = [k for k in keys if k.endswith('_backup_%s-%s' % (bid, suffix))]
body = bytearray(s3.get_object(Bucket=B, Key=k)['Body'].read())
body[len(body) // 2] ^= 0x40
s3.put_object(Bucket=B, Key=k, Body=bytes(body))
print(k)
"#;
    for (compression, suffix) in [("none", "00002"), ("zlib", "00003")] {
        let (backup, volume) = (uuid(), uuid());
        ferry_backup(&image, &backup, &volume, compression, None);
        let corrupted = boto(&py, script, &[&volume, &backup, suffix]);
        let target = dir.join(&format!("out-{compression}.img"));
        let run = ferry(&[
            "restore",
            "--format",
            "cinder",
            &backup,
            "--cinder-volume-id",
            &volume,
            "--target",
            target.to_str().unwrap(),
        ]);
        let message = run.fails(5);
        assert!(message.contains(corrupted.trim()), "{compression}: {message}");
        assert!(!target.exists(), "{compression}: the file the failed restore created is removed");
    }
}

/// Every flag of `backup` and `restore` either applies to the chosen format or is refused with
/// exit 2 naming it: nothing is silently ignored. Applicable flags get past validation (the
/// missing source then fails the run with exit 3, or the missing backup with exit 7).
#[test]
fn every_flag_applies_or_is_refused() {
    let dir = Scratch::new("cinder-flags");
    let missing = dir.join("missing.img");
    let missing = missing.to_str().unwrap();
    let (cid, vid) = (uuid(), uuid());
    // (flag and value, applies to native, applies to cinder)
    let backup_flags: &[(&[&str], bool, bool)] = &[
        (&["--workers", "3"], true, true),
        (&["--limit-read", "500"], true, true),
        (&["--limit-upload", "500"], true, true),
        (&["--backup-id", "b-1"], true, false),
        (&["--compression-level", "3"], true, false),
        (&["--pack-size", "64M"], true, false),
        (&["--parts-in-flight", "2"], true, false),
        (&["--incremental-parent", "0000"], false, true),
        (&["--compression", "zstd"], false, true),
        (&["--cinder-object-size", "4194304"], false, true),
        (&["--cinder-block-size", "65536"], false, true),
        (&["--cinder-uploads", "2"], false, true),
        (&["--zlib-level", "6"], false, true),
    ];
    for (flag, native, cinder) in backup_flags {
        for (format, applies) in [("native", *native), ("cinder", *cinder)] {
            let mut args = vec!["backup", "--format", format, "--source", missing];
            if format == "cinder" {
                args.extend(["--cinder-backup-id", &cid, "--cinder-volume-id", &vid]);
            }
            args.extend(flag.iter());
            let run = ferry(&args);
            if applies {
                assert_ne!(run.code, 2, "{format} {flag:?} was refused: {}", run.stderr);
            } else {
                let message = run.fails(2);
                assert!(message.contains(flag[0]), "{format} {flag:?}: {message}");
            }
        }
    }
    incremental_flags_apply_to_both_formats(&dir, missing, &cid, &vid);
    let restore_flags: &[(&[&str], bool, bool)] = &[
        (&["--force"], true, true),
        (&["--sparse"], true, true),
        (&["--downloads-in-flight", "2"], true, true),
    ];
    let target = dir.join("target.img");
    for (flag, native, cinder) in restore_flags {
        for (format, applies) in [("native", *native), ("cinder", *cinder)] {
            let mut args = vec!["restore", "--format", format, "no-such-backup"];
            args.extend(["--target", target.to_str().unwrap()]);
            if format == "cinder" {
                args.extend(["--cinder-volume-id", &vid]);
            }
            args.extend(flag.iter());
            let run = ferry(&args);
            assert_eq!(applies, run.code != 2, "{format} {flag:?}: {}", run.stderr);
        }
    }
    let run =
        ferry(&["restore", "b", "--target", target.to_str().unwrap(), "--cinder-volume-id", &vid]);
    assert!(run.fails(2).contains("--cinder-volume-id"));
    assert!(!target.exists());
    // Encryption (a passphrase in the environment, a key file named by the environment or
    // --key-file) applies to the native format only: Cinder's has none of its own.
    let file = dir.join("passphrase");
    std::fs::write(&file, "a passphrase\n").unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let key_file = key_file.to_str().unwrap();
    for (name, value) in [
        ("FERRY_PASSPHRASE", "a passphrase"),
        ("FERRY_PASSPHRASE_FILE", file.to_str().unwrap()),
        ("FERRY_KEY_FILE", key_file),
        ("--key-file", key_file),
    ] {
        let cinder = ["--format", "cinder", "--cinder-volume-id", vid.as_str()];
        for (format, flags) in [("native", &[][..]), ("cinder", &cinder[..])] {
            let mut args = vec!["restore", "no-such-backup", "--target", target.to_str().unwrap()];
            args.extend(flags);
            let run = if name.starts_with("--") {
                args.extend([name, value]);
                ferry(&args)
            } else {
                ferry_env(&args, &[(name, value)])
            };
            if format == "cinder" {
                assert!(run.fails(2).contains(name), "{format} {name}: {}", run.stderr);
            } else {
                assert_ne!(run.code, 2, "{format} {name}: {}", run.stderr);
            }
        }
    }
}

/// Writes `data` at `offset` of `image` and returns the `rbd diff --format json` entry of it.
fn write_at(image: &Path, offset: u64, data: &[u8]) -> Value {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    file.write_all_at(data, offset).unwrap();
    serde_json::json!({"offset": offset, "length": data.len(), "exists": "true"})
}

/// The `_sha256file` hashes and the `_metadata` objects (offset, length, md5) of backups of
/// `volume`, one line per backup: what makes two backups the same up to names and times.
fn documents(py: &str, volume: &str, ids: &[&str]) -> Vec<String> {
    let script = r#"
import json
vol = sys.argv[1]
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix='volume_%s/' % vol) for o in p.get('Contents', [])]
for bid in sys.argv[2:]:
    [k] = [k for k in keys if k.endswith('_backup_%s_metadata' % bid)]
    p = k[:-len('_metadata')]
    get = lambda k: json.loads(s3.get_object(Bucket=B, Key=k)['Body'].read())
    sha, meta = get(p + '_sha256file'), get(p + '_metadata')
    objects = [(v['offset'], v['length'], v['md5']) for e in meta['objects'] for v in e.values()]
    print(json.dumps([sha['chunk_size'], sha['sha256s'], objects, meta['parent_id'] is not None]))
"#;
    let mut args = vec![volume];
    args.extend(ids);
    boto(py, script, &args).lines().map(str::to_owned).collect()
}

/// `--changed-ranges FILE` with `--format cinder` (the parent named by `--incremental-parent`):
/// the incremental reads only the read chunks the ranges touch (and the sample), and its
/// `_sha256file` and objects are exactly those of the full-read incremental of the same image
/// (every unread block's hash is the parent's); Cinder's own driver and ferry restore it
/// byte-identically. A range list that leaves out a write is caught by the sampling check: a
/// loud warning, a full-read incremental, a backup that still restores right.
#[test]
fn cinder_changed_ranges_read_only_touched_chunks() {
    let Some(py) = cinder_py("cinder_changed_ranges_read_only_touched_chunks") else { return };
    let dir = Scratch::new("cinder-ranges");
    let size = 24 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 41);
    let volume = uuid();
    let ids = [uuid(), uuid(), uuid(), uuid()];
    let backup = |id: &str, extra: &[&str]| {
        let mut args = vec!["backup", "--format", "cinder", "--source", image.to_str().unwrap()];
        args.extend(["--cinder-backup-id", id, "--cinder-volume-id", &volume]);
        args.extend(["--cinder-object-size", "1048576"]);
        args.extend(extra);
        ferry(&args)
    };
    let full = backup(&ids[0], &[]).ok();
    assert_eq!(full["stats"]["bytes_read"], size);

    // Scattered small writes, a 2 MiB region across read chunks, the last byte: 6 of 24 chunks.
    let ranges = [
        write_at(&image, 5, b"small write"),
        write_at(&image, 7 * MIB + 4096, &[0u8; 512]),
        write_at(&image, 9 * MIB + 100, &vec![0x5a; 2 * MIB as usize]),
        write_at(&image, size - 1, b"!"),
    ];
    let touched = 6;
    let file = dir.join("ranges.json");
    std::fs::write(&file, serde_json::to_string(&ranges).unwrap()).unwrap();
    let file = file.to_str().unwrap();
    let run = backup(&ids[1], &["--changed-ranges", file, "--incremental-parent", &ids[0]]);
    let hinted = run.ok();
    let warned: Vec<&Value> = run.events.iter().filter(|e| e["event"] == "warning").collect();
    assert!(warned.is_empty(), "{warned:?}");
    let stats = &hinted["stats"];
    assert_eq!(stats["parent_id"], ids[0].as_str());
    assert_eq!(stats["read_chunk_bytes"], MIB);
    assert_eq!(stats["base"]["chunks_read"], touched, "{stats}");
    assert_eq!(stats["base"]["chunks_carried"], 24 - touched);
    let sampled = stats["base"]["chunks_sampled"].as_u64().unwrap();
    assert_eq!(sampled, 8, "the default sample: at least 8");
    assert_eq!(stats["bytes_read"], (touched + sampled) * MIB, "{stats}");
    // The same incremental by reading everything: the same documents.
    let read_all = backup(&ids[2], &["--incremental-parent", &ids[0]]).ok();
    assert_eq!(read_all["stats"]["bytes_read"], size);
    let docs = documents(&py, &volume, &[&ids[1], &ids[2]]);
    assert_eq!(docs[0], docs[1], "a ranges incremental is the full-read incremental");
    let target = dir.join("by-cinder.out");
    cinder_restore(&py, &ids[1], &target, size);
    assert_same(&image, &target, size);
    let target = dir.join("by-ferry.out");
    let mut args = vec!["restore", "--format", "cinder", &ids[1], "--cinder-volume-id", &volume];
    args.extend(["--target", target.to_str().unwrap()]);
    let _ = ferry_ok(&args);
    assert_same(&image, &target, size);

    // A list that leaves out a write: caught, a full read, still right.
    let _ = write_at(&image, 20 * MIB, b"not in the list");
    std::fs::write(dir.join("ranges.json"), "[]").unwrap();
    let extra = ["--changed-ranges", file, "--incremental-parent", &ids[1]];
    let run = backup(&ids[3], &[&extra[..], &["--sample-unchanged", "1000"]].concat());
    let lied = run.ok();
    let said: Vec<&str> = run
        .events
        .iter()
        .filter(|e| e["event"] == "warning")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(said.iter().any(|m| m.contains("CHANGE LIST IS WRONG")), "{said:?}");
    assert!(said.iter().any(|m| m.contains("reading the whole source")), "{said:?}");
    assert!(lied["stats"]["base"].is_null(), "{lied}");
    assert_eq!(lied["stats"]["parent_id"], ids[1].as_str());
    assert_eq!(lied["stats"]["bytes_read"], 2 * size, "every chunk sampled, then all read");
    let target = dir.join("lied.out");
    cinder_restore(&py, &ids[3], &target, size);
    assert_same(&image, &target, size);
}

/// A row of the incremental flags' table: the flag, the rest of its arguments for each format,
/// and whether it applies to each.
struct IncrementalFlag<'a> {
    flag: &'a str,
    native: &'a [&'a str],
    cinder: &'a [&'a str],
    applies: (bool, bool),
}

/// The incremental flags apply to both formats, each naming the parent its own way
/// (`--changed-since` native, `--incremental-parent` cinder); `--lightbits-keep-base` gets past
/// the format check and fails later (no repository, no [lightbits] table), never as a flag that
/// does not apply.
fn incremental_flags_apply_to_both_formats(dir: &Scratch, missing: &str, cid: &str, vid: &str) {
    let ranges = dir.join("ranges.json");
    std::fs::write(&ranges, "[]").unwrap();
    let r = ranges.to_str().unwrap();
    let rows = [
        IncrementalFlag {
            flag: "--changed-ranges",
            native: &["--changed-ranges", r, "--changed-since", "b-0"],
            cinder: &["--changed-ranges", r, "--incremental-parent", "0"],
            applies: (true, true),
        },
        IncrementalFlag {
            flag: "--sample-unchanged",
            native: &["--sample-unchanged", "5", "--changed-ranges", r, "--changed-since", "b-0"],
            cinder: &[
                "--sample-unchanged",
                "5",
                "--changed-ranges",
                r,
                "--incremental-parent",
                "0",
            ],
            applies: (true, true),
        },
        IncrementalFlag {
            flag: "--changed-since",
            native: &["--changed-since", "b-0", "--changed-ranges", r],
            cinder: &["--changed-since", "0", "--changed-ranges", r],
            applies: (true, false),
        },
        IncrementalFlag {
            flag: "--changed-ranges",
            native: &["--changed-ranges", r],
            cinder: &["--changed-ranges", r],
            applies: (false, false),
        },
        IncrementalFlag {
            flag: "--lightbits-keep-base",
            native: &["--lightbits-keep-base", "--lightbits-volume", "v"],
            cinder: &["--lightbits-keep-base", "--lightbits-volume", "v"],
            applies: (true, true),
        },
    ];
    for row in rows {
        let flag = row.flag;
        for (format, extra, applies) in
            [("native", row.native, row.applies.0), ("cinder", row.cinder, row.applies.1)]
        {
            let mut args = vec!["backup", "--format", format];
            if flag != "--lightbits-keep-base" {
                args.extend(["--source", missing]);
            }
            if format == "cinder" {
                args.extend(["--cinder-backup-id", cid, "--cinder-volume-id", vid]);
            }
            args.extend(extra);
            let run = ferry(&args);
            if applies && flag == "--lightbits-keep-base" {
                let message = run.events.last().map(|e| e["message"].to_string());
                let message = message.unwrap_or_default();
                assert!(!message.contains("does not apply"), "{format} {flag}: {message}");
                assert_ne!(run.code, 0, "{format} {flag}");
            } else if applies {
                assert_ne!(run.code, 2, "{format} {flag} was refused: {}", run.stderr);
            } else {
                let message = run.fails(2);
                assert!(message.contains(flag), "{format} {flag}: {message}");
            }
        }
    }
}
