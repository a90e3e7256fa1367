//! The `bench` binary's command line: parsed like `ferry`'s (clap), `--help` for the binary and
//! each subcommand, one-line usage errors with exit 2, one-line failures with exit 1, no panic and
//! no backtrace.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_describes_the_binary_and_every_subcommand() {
    let out = bench(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    for sub in ["gen-image", "read", "hash", "compress", "pipeline", "upload", "restore"] {
        assert!(help.contains(sub), "{sub} missing from bench --help:\n{help}");
        let out = bench(&[sub, "--help"]);
        assert_eq!(out.status.code(), Some(0), "bench {sub} --help: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("Usage: bench"), "bench {sub} --help");
    }
    assert!(text(&bench(&["restore", "--help"]).stdout).contains("--downloads-in-flight"));
}

#[test]
fn usage_errors_are_one_line_with_exit_2() {
    for args in [
        &[][..],
        &["no-such-command"],
        &["read"],
        &["gen-image", "/tmp/x", "--size", "12Q"],
        &["gen-image", "/tmp/x", "--mix", "plaid"],
        &["read", "/dev/null", "--chunk-size", "1000"],
        &["read", "/dev/null", "--io-engine", "aio"],
        &["restore", "/tmp/x"],
        &["upload", "--parts-in-flight", "0"],
        &["pipeline", "/tmp/x", "--unknown"],
    ] {
        let out = bench(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "bench {args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "bench {args:?}: {stderr}");
        assert!(stderr.starts_with("bench: error: "), "bench {args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "bench {args:?} wrote to stdout");
    }
    let missing = text(&bench(&["read"]).stderr);
    assert!(missing.contains("<DEVICE>"), "the error names what is missing: {missing}");
}

#[test]
fn a_failed_run_is_one_line_with_exit_1_and_a_run_is_json() {
    let out = bench(&["gen-image", "/nonexistent-dir/x.img", "--size", "1M"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("backtrace") && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("/nonexistent-dir/x.img"), "{stderr}");

    let path = std::env::temp_dir().join(format!("ferry-bench-cli-{}.img", std::process::id()));
    let out = bench(&["gen-image", path.to_str().unwrap(), "--size", "1M", "--mix", "text"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(line["bench"], "gen-image");
    assert_eq!(line["size_bytes"], 1 << 20);
}
