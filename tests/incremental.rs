//! Incremental backups from a change list in a file (`--changed-ranges`, the shape of
//! `rbd diff --format json`): only the touched chunks are read, every backup of the chain
//! restores byte-identical, a list that lies is caught by the sampling check, and every reason
//! not to trust a list is a warning and a full read that still succeeds.

use std::path::Path;

use serde_json::{Value, json};

use crate::util::{Repo, Run, Scratch, assert_same, gen_image};

const CHUNK: u64 = 256 * 1024;
const SIZE: u64 = 32 * CHUNK;

/// Writes `data` at `offset` of `path` and returns the byte range it changed.
fn overwrite(path: &Path, offset: u64, data: &[u8]) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
    (offset, data.len() as u64)
}

fn ranges_file(scratch: &Scratch, name: &str, ranges: &[(u64, u64)]) -> String {
    let entries: Vec<Value> = ranges
        .iter()
        .enumerate()
        .map(|(i, (offset, length))| {
            // Both encodings rbd has used: numbers and strings, "exists" as a string or a bool.
            if i % 2 == 0 {
                json!({"offset": offset, "length": length, "exists": "true"})
            } else {
                json!({"offset": offset.to_string(), "length": length.to_string(), "exists": true})
            }
        })
        .collect();
    let path = scratch.join(name);
    std::fs::write(&path, serde_json::to_string(&entries).unwrap()).unwrap();
    path.display().to_string()
}

fn backup(repo: &Repo, source: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["backup", "--source", source.to_str().unwrap()];
    args.extend_from_slice(extra);
    repo.ferry(&args)
}

fn restores_to(repo: &Repo, scratch: &Scratch, backup_id: &str, expected: &Path) {
    let target = scratch.join(&format!("{backup_id}.restored"));
    repo.restore(backup_id, &target, "uring", &[]).ok();
    assert_same(expected, &target, SIZE);
}

fn chain_from_ranges_file(repo: &Repo, scratch: &Scratch) {
    let source = scratch.join("volume.img");
    gen_image(&source, SIZE, "mixed", 14);
    let full = backup(repo, &source, &[]).ok();
    let full_id = full["backup_id"].as_str().unwrap().to_owned();
    std::fs::copy(&source, scratch.join("at-full.img")).unwrap();

    // Scattered small writes, one large region, and a write at the last byte.
    let changes = [
        overwrite(&source, 3 * CHUNK + 100, &[0xa5; 17]),
        overwrite(&source, 9 * CHUNK + CHUNK - 1, &[1, 2]),
        overwrite(&source, 14 * CHUNK + 4096, &vec![0x5a; (3 * CHUNK) as usize]),
        overwrite(&source, SIZE - 1, &[0xee]),
    ];
    let touched = [3u64, 9, 10, 14, 15, 16, 17, 31];
    let list = ranges_file(scratch, "changes.json", &changes);
    let run = backup(repo, &source, &["--changed-ranges", &list, "--changed-since", &full_id]);
    let second = run.ok();
    assert!(run.warnings().is_empty(), "{:?}", run.warnings());
    let base = &second["base"];
    assert_eq!(base["parent_backup_id"], full_id.as_str());
    assert_eq!(base["chunks_read"], touched.len());
    let sampled = base["chunks_sampled"].as_u64().unwrap();
    assert_eq!(sampled, 8, "the default sample: at least 8 of the unchanged chunks");
    assert_eq!(base["chunks_carried"], 32 - touched.len() as u64);
    // The job's own counter: only the touched chunks and the sample were read.
    assert_eq!(second["stats"]["bytes_read"], (touched.len() as u64 + sampled) * CHUNK);
    // Chunks 15 and 16 now hold the same 0x5a bytes: one of them dedups.
    assert_eq!(second["stats"]["new_chunk_count"], touched.len() - 1);
    let second_id = second["backup_id"].as_str().unwrap().to_owned();
    std::fs::copy(&source, scratch.join("at-second.img")).unwrap();

    // A third link of the chain, based on the incremental one.
    let changes = [overwrite(&source, 20 * CHUNK, &[7; 4096])];
    let list = ranges_file(scratch, "changes-3.json", &changes);
    let third =
        backup(repo, &source, &["--changed-ranges", &list, "--changed-since", &second_id]).ok();
    assert_eq!(third["base"]["chunks_read"], 1);
    let third_id = third["backup_id"].as_str().unwrap().to_owned();

    restores_to(repo, scratch, &full_id, &scratch.join("at-full.img"));
    restores_to(repo, scratch, &second_id, &scratch.join("at-second.img"));
    restores_to(repo, scratch, &third_id, &source);

    // A list that leaves out a written range, with every unchanged chunk sampled: caught, loud
    // warning, full read, and the backup is still right.
    let written = overwrite(&source, 25 * CHUNK + 10, &[9; 10]);
    let lie = ranges_file(scratch, "lie.json", &[(0, 1)]);
    let run = backup(
        repo,
        &source,
        &["--changed-ranges", &lie, "--changed-since", &third_id, "--sample-unchanged", "1000"],
    );
    let lied = run.ok();
    let said = run.warnings().join("\n");
    assert!(said.contains("CHANGE LIST IS WRONG") && said.contains("chunk 25"), "{said}");
    assert!(said.contains("reading the whole source"), "{said}");
    assert!(lied.get("base").is_none(), "{lied}");
    // The sample is read beside a pass over the one chunk the list touches; then everything.
    assert_eq!(lied["stats"]["bytes_read"], SIZE + 32 * CHUNK, "the sample and chunk 0, then all");
    assert_eq!(written.0, 25 * CHUNK + 10);
    restores_to(repo, scratch, lied["backup_id"].as_str().unwrap(), &source);
}

#[test]
fn incremental_from_ranges_file_local() {
    let scratch = Scratch::new("incremental-ranges");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    chain_from_ranges_file(&repo, &scratch);
}

#[test]
fn incremental_from_ranges_file_garage() {
    let Some(repo) = Repo::garage("incremental-ranges") else { return };
    let scratch = Scratch::new("garage-incremental-ranges");
    repo.init("256K");
    chain_from_ranges_file(&repo, &scratch);
}

/// Every reason not to trust a change list is a warning and a full read that succeeds: the
/// parent is missing, of another source, or of another size; a list that is not a list, or
/// flags without the rest, are refused (exit 2).
#[test]
fn incremental_fallbacks_and_refusals() {
    let scratch = Scratch::new("incremental-fallbacks");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    let source = scratch.join("volume.img");
    gen_image(&source, SIZE, "random", 5);
    let other = scratch.join("other.img");
    gen_image(&other, SIZE, "random", 6);
    let parent = backup(&repo, &source, &[]).ok()["backup_id"].as_str().unwrap().to_owned();
    let of_other = backup(&repo, &other, &[]).ok()["backup_id"].as_str().unwrap().to_owned();
    let list = ranges_file(&scratch, "one.json", &[(0, 1)]);
    let full_read = |since: &str, path: &Path, expect: &str| {
        let run = backup(&repo, path, &["--changed-ranges", &list, "--changed-since", since]);
        let result = run.ok();
        let said = run.warnings().join("\n");
        assert!(said.contains(expect) && said.contains("reading the whole source"), "{said}");
        assert!(result.get("base").is_none(), "{result}");
        assert_eq!(result["stats"]["bytes_read"], result["volume_size_bytes"]);
    };
    full_read("20000101T000000Z-00000000", &source, "parent backup 20000101T000000Z-00000000");
    full_read(&of_other, &source, "is of another source");
    let file = std::fs::OpenOptions::new().write(true).open(&source).unwrap();
    file.set_len(SIZE + CHUNK).unwrap();
    full_read(&parent, &source, "the volume was resized");
    file.set_len(SIZE - CHUNK).unwrap();
    full_read(&parent, &source, "the volume was resized");

    let bad = scratch.join("bad.json");
    std::fs::write(&bad, r#"[{"offset": 1}]"#).unwrap();
    let bad = bad.display().to_string();
    let run = backup(&repo, &source, &["--changed-ranges", &bad, "--changed-since", &parent]);
    assert!(run.fails(2).contains("length"), "{:?}", run.events);
    backup(&repo, &source, &["--changed-ranges", &list]).fails(2);
    // Refused before the repository is opened: exit 2 even where there is none.
    let nowhere = Repo::Local(scratch.join("no-repository"));
    backup(&nowhere, &source, &["--changed-since", &parent]).fails(2);
    backup(&repo, &source, &["--sample-unchanged", "3"]).fails(2);
    backup(&repo, &source, &["--lightbits-keep-base"]).fails(2);
    // --format cinder names the parent with --incremental-parent (tests/cinder.rs runs it).
    let run = backup(
        &repo,
        &source,
        &["--changed-ranges", &list, "--changed-since", &parent, "--format", "cinder"],
    );
    assert!(run.fails(2).contains("--incremental-parent"), "{:?}", run.events);
    let run = backup(&repo, &source, &["--changed-ranges", &list, "--format", "cinder"]);
    assert!(run.fails(2).contains("needs --incremental-parent"), "{:?}", run.events);
}
