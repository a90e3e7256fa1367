//! Backup → restore round trips must be byte-identical through every store, engine, content
//! kind and size, from files and loop devices, onto files and loop devices.

use crate::util::{LoopDevice, Repo, Scratch, assert_same, gen_image};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Backs up `size` bytes of `mix` and restores them to a new file with `engine`; checks bytes.
fn round_trip(repo: &Repo, scratch: &Scratch, mix: &str, size: u64, engine: &str) {
    let source = scratch.join(&format!("{mix}-{size}.img"));
    gen_image(&source, size, mix, size ^ 0x5eed);
    let result = repo.backup(&source, engine);
    assert_eq!(result["volume_size_bytes"], size);
    let id = result["backup_id"].as_str().unwrap();
    let target = scratch.join(&format!("{mix}-{size}-{engine}.restored"));
    let _ = repo.restore(id, &target, engine, &[]).ok();
    assert_eq!(std::fs::metadata(&target).unwrap().len(), size);
    assert_same(&source, &target, size);
}

fn all_kinds(repo: &Repo, scratch: &Scratch) {
    // 3 chunks + an odd tail, so the last chunk is short and ends inside a 512-byte block.
    let odd = 3 * 256 * KIB + 12_345;
    for (mix, size) in
        [("random", odd), ("text", odd), ("zeros", odd), ("mixed", 9 * MIB + 4096 + 512)]
    {
        for engine in ["uring", "pread"] {
            round_trip(repo, scratch, mix, size, engine);
        }
    }
    // Larger than one part (16 MiB) of new data: the pack goes through S3 multipart.
    round_trip(repo, scratch, "random", 40 * MIB + 777, "uring");
}

#[test]
fn round_trips_through_a_local_repository() {
    let scratch = Scratch::new("local-round-trips");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    all_kinds(&repo, &scratch);
}

#[test]
fn round_trips_through_garage() {
    let Some(repo) = Repo::garage("round-trips") else { return };
    let scratch = Scratch::new("garage-round-trips");
    repo.init("256K");
    all_kinds(&repo, &scratch);
}

/// A second backup of the same volume uploads no chunk data; a similar volume uploads only
/// its changed chunks.
fn second_backup_uploads_nearly_nothing(repo: &Repo, scratch: &Scratch) {
    let source = scratch.join("volume.img");
    gen_image(&source, 24 * MIB, "mixed", 3);
    let first = repo.backup(&source, "uring");
    assert!(first["stats"]["new_chunk_count"].as_u64().unwrap() > 0);
    let second = repo.backup(&source, "uring");
    assert_eq!(second["stats"]["new_chunk_count"], 0, "{second}");
    assert_eq!(second["stats"]["pack_count"], 0);
    // Only the manifest is uploaded: a few KiB.
    assert!(second["bytes_uploaded"].as_u64().unwrap() < 64 * KIB, "{second}");
    // Change one 4 KiB block: exactly one chunk is new.
    let data = std::fs::read(&source).unwrap();
    let mut changed = data.clone();
    changed[5 * MIB as usize + 100] ^= 0xff;
    std::fs::write(&source, &changed).unwrap();
    let third = repo.backup(&source, "uring");
    assert_eq!(third["stats"]["new_chunk_count"], 1, "{third}");
    let target = scratch.join("third.restored");
    repo.restore(third["backup_id"].as_str().unwrap(), &target, "uring", &[]).ok();
    assert_same(&source, &target, 24 * MIB);
    // The first backup still restores the original bytes.
    std::fs::write(&source, &data).unwrap();
    let target = scratch.join("first.restored");
    repo.restore(first["backup_id"].as_str().unwrap(), &target, "uring", &[]).ok();
    assert_same(&source, &target, 24 * MIB);
}

#[test]
fn second_backup_is_incremental_local() {
    let scratch = Scratch::new("local-incremental");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("1M");
    second_backup_uploads_nearly_nothing(&repo, &scratch);
}

#[test]
fn second_backup_is_incremental_garage() {
    let Some(repo) = Repo::garage("incremental") else { return };
    let scratch = Scratch::new("garage-incremental");
    repo.init("1M");
    second_backup_uploads_nearly_nothing(&repo, &scratch);
}

/// Loop devices with 512- and 4096-byte logical blocks, as source and as target, both engines.
#[test]
fn loop_devices_as_source_and_target() {
    let Some(repo) = Repo::garage("loop") else { return };
    let scratch = Scratch::new("loop-devices");
    repo.init("1M");
    for block_size in [512u32, 4096] {
        let size = 20 * MIB + 8192;
        let backing = scratch.join(&format!("source-{block_size}.img"));
        gen_image(&backing, size, "mixed", u64::from(block_size));
        let Some(source) = LoopDevice::attach(&backing, block_size) else { return };
        for engine in ["uring", "pread"] {
            let result = repo.backup(&source.path, engine);
            assert_eq!(result["volume_size_bytes"], size);
            assert_eq!(result["io_engine"], if engine == "uring" { "io_uring" } else { "pread" });
            let id = result["backup_id"].as_str().unwrap().to_string();
            // Target: a loop device full of garbage, larger than the volume.
            let target_file = scratch.join(&format!("target-{block_size}-{engine}.img"));
            gen_image(&target_file, size + MIB, "random", 99);
            let Some(target) = LoopDevice::attach(&target_file, block_size) else { return };
            let refused = repo.restore(&id, &target.path, engine, &[]);
            let message = refused.fails(8);
            assert!(message.contains("--force"), "{message}");
            repo.restore(&id, &target.path, engine, &["--force"]).ok();
            assert_same(&backing, &target.path, size);
        }
    }
}

/// A regular file full of garbage is overwritten exactly (holes zeroed) with --force.
#[test]
fn restore_over_garbage_zeroes_holes() {
    let scratch = Scratch::new("garbage");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    let source = scratch.join("sparse.img");
    gen_image(&source, 8 * MIB + 1000, "sparse", 11);
    let id = repo.backup(&source, "uring")["backup_id"].as_str().unwrap().to_string();
    let target = scratch.join("garbage.img");
    gen_image(&target, 8 * MIB + 1000, "random", 12);
    assert!(repo.restore(&id, &target, "uring", &[]).fails(8).contains("--force"));
    let result = repo.restore(&id, &target, "uring", &["--force"]).ok();
    assert!(result["stats"]["zero_chunks_written"].as_u64().unwrap() > 0);
    assert_same(&source, &target, 8 * MIB + 1000);
    // --sparse on a fresh file skips holes and still restores exactly.
    let fresh = scratch.join("fresh.img");
    let result = repo.restore(&id, &fresh, "pread", &["--sparse"]).ok();
    assert_eq!(result["stats"]["zero_chunks_written"], 0);
    assert_same(&source, &fresh, 8 * MIB + 1000);
}

/// Several sources in one run: one backup each, shared dedup (a chunk present in two sources is
/// stored once), and every source restores byte-identically.
#[test]
fn several_sources_in_one_run() {
    let scratch = Scratch::new("multi-source");
    let repo = Repo::Local(scratch.join("repo"));
    repo.init("256K");
    let a = scratch.join("a.img");
    let b = scratch.join("b.img");
    gen_image(&a, 6 * MIB + 4096, "mixed", 21);
    gen_image(&b, 5 * MIB, "random", 22);
    // The first MiB of b repeats a's first MiB: those chunks are stored once.
    let mut b_bytes = std::fs::read(&b).unwrap();
    b_bytes[..MIB as usize].copy_from_slice(&std::fs::read(&a).unwrap()[..MIB as usize]);
    std::fs::write(&b, &b_bytes).unwrap();
    let args = ["backup", "--source", a.to_str().unwrap(), "--source", b.to_str().unwrap()];
    let result = repo.ferry(&args).ok();
    let backups = result["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    let stored: u64 = backups.iter().map(|b| b["stats"]["new_chunk_count"].as_u64().unwrap()).sum();
    let deduped: u64 =
        backups.iter().map(|b| b["stats"]["dedup_chunk_count"].as_u64().unwrap()).sum();
    assert!(deduped >= 4, "the shared MiB (4 chunks of 256 KiB) is stored once: {result}");
    assert!(stored > 0);
    for (backup, source) in backups.iter().zip([&a, &b]) {
        assert_eq!(backup["source"], source.to_str().unwrap());
        let target = scratch.join(&format!("{}.restored", backup["backup_id"].as_str().unwrap()));
        repo.restore(backup["backup_id"].as_str().unwrap(), &target, "uring", &[]).ok();
        let size = std::fs::metadata(source).unwrap().len();
        assert_same(source, &target, size);
    }
    // A backup id cannot name several backups.
    let mut with_id = args.to_vec();
    with_id.extend(["--backup-id", "x"]);
    repo.ferry(&with_id).fails(2);
}
