//! ferry's cinder-backup driver (`scripts/cinder/ferry_cinder`, `FerryBackupDriver`) judged by
//! Cinder's own code: `scripts/cinder/driver_harness.py` loads it by class path as cinder
//! 29.0.0's backup manager does and runs the manager's real `continue_backup` and
//! `restore_backup` around it (only the database, message bus, attachment and key manager
//! are fakes), against the test Garage. Backups made through the driver restore through it and
//! through Cinder's stock S3 driver, stock backups restore through it, a cancel leaves nothing,
//! and ferry's failures become the Cinder exceptions the manager expects.
//!
//! Needs `FERRY_CINDER_PY` and Garage, like tests/cinder.rs; skipped with a message otherwise.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::cinder::{MIB, OBJECT_SIZE, bucket, cinder_backup, cinder_py, cinder_restore, harness};
use crate::cinder::{boto, mutate, uuid};
use crate::util::fault_proxy::{FaultConfig, FaultKind, FaultProxy};
use crate::util::{Scratch, assert_same, gen_image};

const DRIVER: &str = "ferry_cinder.driver.FerryBackupDriver";
const STOCK: &str = "cinder.backup.drivers.s3.S3BackupDriver";

/// Runs `driver_harness.py ARGS` with ferry as the driver's binary; returns its JSON.
fn driver(py: &str, args: &[&str], envs: &[(&str, &str)]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cinder/driver_harness.py");
    let mut command = Command::new(py);
    let _ = command.arg(script).args(args).env("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"));
    if std::env::var_os("FERRY_TEST_S3_REGION").is_none() {
        let _ = command.env("FERRY_TEST_S3_REGION", "garage");
    }
    for (key, value) in envs {
        let _ = command.env(key, value);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "driver_harness {args:?}: {stderr}");
    let value: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("driver_harness {args:?} printed no JSON ({e}): {stderr}"));
    if std::env::var_os("FERRY_TEST_VERBOSE").is_some() {
        eprintln!("driver_harness {args:?}: {value:#}\n{stderr}");
    }
    value
}

fn backup_args<'a>(image: &'a Path, backup: &'a str, volume: &'a str) -> Vec<&'a str> {
    vec![
        "backup",
        "--driver",
        DRIVER,
        "--image",
        image.to_str().unwrap(),
        "--backup-id",
        backup,
        "--volume-id",
        volume,
    ]
}

/// Restores `backup` through `driver_harness.py` (the manager's `restore_backup`).
fn driver_restore(py: &str, backup: &str, volume: &str, target: &Path, extra: &[&str]) -> Value {
    let restore_volume = uuid();
    let mut args = vec![
        "restore",
        "--driver",
        DRIVER,
        "--backup-id",
        backup,
        "--src-volume-id",
        volume,
        "--volume-id",
        &restore_volume,
        "--target",
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    driver(py, &args, &[])
}

/// No secret on ferry's command line; its config file was private and is gone.
fn check_ferry_runs(out: &Value, sparse: Option<bool>) {
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
    let access = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
    let runs = out["ferry_runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "one ferry run: {out:#}");
    for run in runs {
        let argv: Vec<&str> =
            run["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(argv.iter().all(|a| !a.contains(&secret) && !a.contains(&access)), "{argv:?}");
        assert_eq!(run["config_mode"], "0o600", "{run}");
        assert!(!Path::new(run["config_path"].as_str().unwrap()).exists(), "config left behind");
        if let Some(sparse) = sparse {
            assert_eq!(argv.contains(&"--sparse"), sparse, "{argv:?}");
        }
    }
}

/// A backup the manager finished: the record's fields are set as the S3 driver sets them.
fn check_backup_ok(out: &Value, backup: &str, volume: &str, parent: Option<&str>) -> u64 {
    assert!(out["exception"].is_null(), "backup failed: {out:#}");
    assert_eq!(out["status"], "available", "{out:#}");
    assert_eq!(out["service"], DRIVER);
    assert_eq!(out["container"], bucket().as_str());
    let prefix = out["service_metadata"].as_str().unwrap();
    assert!(prefix.starts_with(&format!("volume_{volume}/")), "{prefix}");
    assert!(prefix.ends_with(&format!("_backup_{backup}")), "{prefix}");
    assert_eq!(out["parent_id"].as_str(), parent);
    assert_eq!(out["export"]["backup_service"], DRIVER);
    assert!(out["export"]["backup_url"].as_str().is_some_and(|u| !u.is_empty()));
    check_ferry_runs(out, None);
    out["object_count"].as_u64().unwrap()
}

fn check_restore_ok(out: &Value) {
    assert!(out["exception"].is_null(), "restore failed: {out:#}");
    assert_eq!(out["backup_status"], "available");
    assert_eq!(out["volume_status"], "available");
}

/// Keys and multipart uploads under `volume_<volume>/` in the test bucket.
fn leftovers(py: &str, volume: &str) -> (usize, usize) {
    let script = r#"
vol = sys.argv[1]
prefix = 'volume_%s/' % vol
keys = [o['Key'] for p in s3.get_paginator('list_objects_v2').paginate(Bucket=B, Prefix=prefix) for o in p.get('Contents', [])]
uploads = s3.list_multipart_uploads(Bucket=B, Prefix=prefix).get('Uploads', [])
print(len(keys), len(uploads))
"#;
    let out = boto(py, script, &[volume]);
    let mut counts = out.split_whitespace().map(|n| n.parse::<usize>().unwrap());
    (counts.next().unwrap(), counts.next().unwrap())
}

/// Full and incremental backups through the driver restore byte-identically through it (into
/// an existing volume holding other data, and into a new one, sparse) and through Cinder's
/// stock S3 driver; the volume's metadata goes into `_metadata` and comes back on restore.
#[test]
fn driver_round_trips_through_driver_and_stock() {
    let Some(py) = cinder_py("driver_round_trips_through_driver_and_stock") else { return };
    let dir = Scratch::new("cinder-driver-rt");
    let size = 24 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 51);
    let (volume, full) = (uuid(), uuid());
    let mut args = backup_args(&image, &full, &volume);
    args.extend([
        "--object-size",
        OBJECT_SIZE,
        "--name",
        "nightly",
        "--description",
        "before upgrade",
        "--volume-name",
        "db-volume",
    ]);
    let out = driver(&py, &args, &[]);
    let full_objects = check_backup_ok(&out, &full, &volume, None);
    assert_eq!(full_objects, size / 4 / MIB, "{out:#}");

    let record = harness(&py, &["record", "--backup-id", &full]);
    assert_eq!(record["metadata"]["backup_name"], "nightly");
    assert_eq!(record["metadata"]["backup_description"], "before upgrade");
    let volume_meta: Value =
        serde_json::from_str(record["metadata"]["volume_meta"].as_str().unwrap()).unwrap();
    assert_eq!(volume_meta["volume-base-metadata"]["display_name"], "db-volume");

    // Into an existing volume that holds other data.
    let existing = dir.join("existing.img");
    gen_image(&existing, size, "random", 52);
    let out = driver_restore(&py, &full, &volume, &existing, &[]);
    check_restore_ok(&out);
    check_ferry_runs(&out, Some(false));
    // The volume metadata was put back (display_name of a `restore_backup_*` volume).
    assert!(out["db_calls"].to_string().contains("volume_update"), "{out:#}");
    assert_same(&image, &existing, size);
    let stock = dir.join("stock.img");
    cinder_restore(&py, &full, &stock, size);
    assert_same(&image, &stock, size);

    mutate(&image, 5);
    let inc = uuid();
    let mut args = backup_args(&image, &inc, &volume);
    args.extend(["--object-size", OBJECT_SIZE, "--parent-id", &full, "--compression", "zstd"]);
    let out = driver(&py, &args, &[]);
    let _ = check_backup_ok(&out, &inc, &volume, Some(&full));
    // An incremental: only the changed blocks are stored.
    let record = harness(&py, &["record", "--backup-id", &inc]);
    let stored: u64 = record["metadata"]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o.as_object().unwrap().values())
        .map(|entry| entry["length"].as_u64().unwrap())
        .sum();
    assert!(stored > 0 && stored < size / 4, "the incremental stores {stored} bytes");

    // Into a new volume (reads as zeros): ferry gets --sparse.
    let new = dir.join("new.img");
    std::fs::File::create(&new).unwrap().set_len(size).unwrap();
    let out = driver_restore(&py, &inc, &volume, &new, &["--volume-is-new"]);
    check_restore_ok(&out);
    check_ferry_runs(&out, Some(true));
    assert_same(&image, &new, size);
    cinder_restore(&py, &inc, &stock, size);
    assert_same(&image, &stock, size);
}

/// The service's start-up check passes with ferry and the stock S3 options, and refuses what
/// ferry cannot do (an HTTPS proxy) with the option named.
#[test]
fn driver_setup_check() {
    let Some(py) = cinder_py("driver_setup_check") else { return };
    let out = driver(&py, &["check", "--driver", DRIVER], &[]);
    assert!(out["exception"].is_null(), "{out:#}");
    let out =
        driver(&py, &["check", "--driver", DRIVER, "--https-proxy", "http://proxy:3128"], &[]);
    assert_eq!(out["exception"]["class"], "InvalidConfigurationValue", "{out:#}");
    assert!(out["exception"]["message"].as_str().unwrap().contains("backup_s3_https_proxy"));
    let out = driver(&py, &["check", "--driver", DRIVER], &[("FERRY_BIN", "/nonexistent/ferry")]);
    assert_eq!(out["exception"]["class"], "BackupDriverException", "{out:#}");
    assert!(out["exception"]["message"].as_str().unwrap().contains("/nonexistent/ferry"));
}

/// Backups made by Cinder's stock driver restore through ferry's, once their `service` names
/// it (README: switching drivers); before, Cinder's manager refuses them, as it refuses any
/// backup made by another driver.
#[test]
fn stock_backups_restore_through_driver() {
    let Some(py) = cinder_py("stock_backups_restore_through_driver") else { return };
    let dir = Scratch::new("cinder-driver-stock");
    let size = 16 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 61);
    let (volume, full, inc) = (uuid(), uuid(), uuid());
    let _ = cinder_backup(&py, &image, &full, &volume, "zlib", None);
    mutate(&image, 6);
    let _ = cinder_backup(&py, &image, &inc, &volume, "bz2", Some(&full));

    let target = dir.join("out.img");
    gen_image(&target, size, "random", 62);
    let out = driver_restore(&py, &inc, &volume, &target, &["--service", STOCK]);
    assert_eq!(out["exception"]["class"], "InvalidBackup", "{out:#}");
    assert!(out["exception"]["message"].as_str().unwrap().contains(STOCK), "{out:#}");
    assert_eq!(out["ferry_runs"].as_array().unwrap().len(), 0);

    let out = driver_restore(&py, &inc, &volume, &target, &[]);
    check_restore_ok(&out);
    assert_same(&image, &target, size);
}

/// Progress notifications arrive during a multi-object backup, with rising percentages, and
/// 100 at the end, as the chunked driver sends them; under eventlet, as a stock cinder-backup
/// 29.0.0 runs (monkey-patched threads, pipes and subprocesses).
#[test]
fn driver_progress_notifications() {
    let Some(py) = cinder_py("driver_progress_notifications") else { return };
    let dir = Scratch::new("cinder-driver-progress");
    let size = 64 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "text", 71);
    let (volume, backup) = (uuid(), uuid());
    let mut args = backup_args(&image, &backup, &volume);
    // bz2 at level 9 takes seconds here, long enough for ferry's once-a-second progress.
    args.extend(["--object-size", OBJECT_SIZE, "--compression", "bz2", "--notify-every", "1"]);
    args.insert(0, "--eventlet");
    let out = driver(&py, &args, &[]);
    let _ = check_backup_ok(&out, &backup, &volume, None);
    assert_eq!(out["eventlet"], true);
    let percents: Vec<f64> = out["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["event"] == "createprogress")
        .map(|n| n["percent"].as_f64().unwrap())
        .collect();
    assert!(percents.len() >= 3, "{percents:?}");
    assert_eq!(*percents.last().unwrap(), 100.0, "{percents:?}");
    assert!(percents[0] < 100.0 && percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
    let restored = dir.join("out.img");
    cinder_restore(&py, &backup, &restored, size);
    assert_same(&image, &restored, size);
}

/// Cinder's cancel (the backup turns `deleting` while it runs) stops ferry with SIGTERM; no
/// object and no multipart upload of the backup stays in the bucket, and the manager reports
/// the backup aborted, not failed.
#[test]
fn driver_cancel_mid_backup_leaves_nothing() {
    let Some(py) = cinder_py("driver_cancel_mid_backup_leaves_nothing") else { return };
    let dir = Scratch::new("cinder-driver-cancel");
    let size = 384 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 81);
    let (volume, backup) = (uuid(), uuid());
    let mut args = backup_args(&image, &backup, &volume);
    // 32 MiB objects: the incompressible ones go up as multipart uploads.
    args.extend([
        "--object-size",
        "33554432",
        "--compression",
        "bz2",
        "--notify-every",
        "1",
        "--cancel-after-notifications",
        "1",
    ]);
    let out = driver(&py, &args, &[]);
    assert!(out["exception"].is_null(), "a cancel is not a failure: {out:#}");
    assert_eq!(out["status"], "deleting", "{out:#}");
    // The first notification turned the backup `deleting`; ferry was stopped before the next.
    let progress: Vec<&Value> = out["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["event"] == "createprogress")
        .collect();
    assert_eq!(progress.len(), 1, "{out:#}");
    assert!(progress[0]["percent"].as_f64().unwrap() < 100.0, "{out:#}");
    check_ferry_runs(&out, None);
    assert_eq!(leftovers(&py, &volume), (0, 0), "objects or uploads left after a cancel");
}

/// The store failing every upload (ferry exit 4) becomes the S3 driver's
/// `S3ConnectionFailure`; the manager leaves the backup in `error` and nothing in the bucket.
#[test]
fn driver_store_failure_is_cinder_error() {
    let Some(py) = cinder_py("driver_store_failure_is_cinder_error") else { return };
    let endpoint = std::env::var("FERRY_TEST_S3_ENDPOINT").unwrap();
    let Ok(upstream) =
        endpoint.trim_start_matches("http://").trim_end_matches('/').parse::<SocketAddr>()
    else {
        eprintln!("skipped driver_store_failure_is_cinder_error: {endpoint} is not http://ip:port");
        return;
    };
    let config = FaultConfig::new(91)
        .with_rate(1.0)
        .with_kinds([FaultKind::InternalError500])
        .only_methods(["PUT", "POST"])
        .only_paths_containing(["_backup_"]);
    let proxy = FaultProxy::start(upstream, config).unwrap();
    let dir = Scratch::new("cinder-driver-store");
    let size = 16 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "mixed", 92);
    let (volume, backup) = (uuid(), uuid());
    let mut args = backup_args(&image, &backup, &volume);
    args.extend(["--object-size", OBJECT_SIZE]);
    let out = driver(&py, &args, &[("FERRY_TEST_S3_ENDPOINT", &proxy.url())]);
    assert_eq!(out["exception"]["class"], "S3ConnectionFailure", "{out:#}");
    assert_eq!(out["status"], "error", "{out:#}");
    let reason = out["fail_reason"].as_str().unwrap();
    assert!(reason.contains("ferry exit 4"), "{reason}");
    assert!(proxy.stats().faults > 0, "{:?}", proxy.stats());
    assert_eq!(leftovers(&py, &volume), (0, 0), "objects or uploads left after a failure");
}

/// A corrupt object (ferry exit 5) fails the restore with `InvalidBackup`; the manager puts the
/// backup back to `available` and the volume in `error_restoring`, as for any restore failure.
#[test]
fn driver_corrupt_object_is_invalid_backup() {
    let Some(py) = cinder_py("driver_corrupt_object_is_invalid_backup") else { return };
    let dir = Scratch::new("cinder-driver-corrupt");
    let size = 16 * MIB;
    let image = dir.join("vol.img");
    gen_image(&image, size, "text", 93);
    let (volume, backup) = (uuid(), uuid());
    let mut args = backup_args(&image, &backup, &volume);
    args.extend(["--object-size", OBJECT_SIZE]);
    let out = driver(&py, &args, &[]);
    let _ = check_backup_ok(&out, &backup, &volume, None);
    let script = r#"
import json
prefix = sys.argv[1]
meta = json.loads(s3.get_object(Bucket=B, Key=prefix + '_metadata')['Body'].read())
name, entry = [(k, v) for o in meta['objects'] for k, v in o.items() if v['compression'] == 'zlib'][1]
s3.put_object(Bucket=B, Key=name, Body=b'this is not a zlib stream' * 100)
print(name)
"#;
    let corrupted = boto(&py, script, &[out["service_metadata"].as_str().unwrap()]);
    let target = dir.join("out.img");
    std::fs::File::create(&target).unwrap().set_len(size).unwrap();
    let out = driver_restore(&py, &backup, &volume, &target, &[]);
    assert_eq!(out["exception"]["class"], "InvalidBackup", "{out:#}");
    assert!(out["exception"]["message"].as_str().unwrap().contains(corrupted.trim()), "{out:#}");
    assert_eq!(out["backup_status"], "available");
    assert_eq!(out["volume_status"], "error_restoring");
}
