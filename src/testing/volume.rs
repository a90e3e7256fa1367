//! Volumes for in-process tests: sample contents (zeros, text, random, mixed) generated from a
//! seed, scratch directories under `target/`, and loop devices over image files (root only).
//!
//! Scratch files live under `target/tmp-testing`, not `/tmp`, which may be a tmpfs without
//! O_DIRECT.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a sample volume holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zero bytes (every chunk a hole).
    Zeros,
    /// Printable text that compresses well, repeating with variations.
    Text,
    /// Incompressible pseudo-random bytes.
    Random,
    /// 64 KiB stretches of zeros, text and random bytes in turn (40/30/30 by count).
    Mixed,
}

impl Content {
    /// Every kind.
    pub const ALL: [Content; 4] = [Content::Zeros, Content::Text, Content::Random, Content::Mixed];
}

/// A seeded xorshift generator: fast, reproducible, good enough for sample data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "an empty range has no numbers");
        self.next_u64() % bound
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for piece in out.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            piece.copy_from_slice(&bytes[..piece.len()]);
        }
    }
}

const WORDS: [&str; 12] = [
    "volume", "backup", "restore", "chunk", "pack", "manifest", "flash", "object", "bucket",
    "cinder", "ferry", "block",
];

fn fill_text(rng: &mut Rng, out: &mut [u8]) {
    let mut position = 0;
    while position < out.len() {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
        let separator: &[u8] = if rng.below(9) == 0 { b".\n" } else { b" " };
        for &byte in word.iter().chain(separator) {
            if position == out.len() {
                return;
            }
            out[position] = byte;
            position += 1;
        }
    }
}

/// `length` bytes of `content` from `seed`.
pub fn sample(content: Content, length: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; length];
    let mut rng = Rng::new(seed);
    match content {
        Content::Zeros => {}
        Content::Text => fill_text(&mut rng, &mut data),
        Content::Random => rng.fill(&mut data),
        Content::Mixed => {
            for stretch in data.chunks_mut(64 << 10) {
                match rng.below(10) {
                    0..=3 => {}
                    4..=6 => fill_text(&mut rng, stretch),
                    _ => rng.fill(stretch),
                }
            }
        }
    }
    data
}

/// A directory under `target/tmp-testing`, removed on drop.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty directory named after `name`.
    ///
    /// # Panics
    /// When it cannot be created.
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tmp-testing")
            .join(format!("{name}-{}-{unique}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a scratch directory");
        Scratch(path)
    }

    /// A path in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device over an image file (`losetup --direct-io=on`), detached on drop.
#[derive(Debug)]
pub struct LoopDevice(PathBuf);

impl LoopDevice {
    /// Attaches `backing` with `block`-byte logical blocks, or prints why not and returns `None`
    /// when loop devices cannot be managed here (not root, no `losetup`).
    ///
    /// # Panics
    /// When `losetup` runs as root and fails.
    pub fn attach(backing: &Path, block: u32) -> Option<LoopDevice> {
        if File::options().write(true).open("/dev/loop-control").is_err() {
            eprintln!("skipped: loop devices need root (/dev/loop-control not writable)");
            return None;
        }
        let output = match Command::new("losetup")
            .args(["--direct-io=on", "-b", &block.to_string(), "-f", "--show"])
            .arg(backing)
            .output()
        {
            Ok(output) => output,
            Err(error) => {
                eprintln!("skipped: losetup cannot run: {error}");
                return None;
            }
        };
        assert!(
            output.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = String::from_utf8(output.stdout).expect("losetup prints a device path");
        Some(LoopDevice(PathBuf::from(path.trim())))
    }

    /// The device path, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Reads the first `length` bytes of `path` (a file or a device).
///
/// # Panics
/// When it cannot be read.
pub fn read_prefix(path: &Path, length: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut data = vec![0u8; length];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut data))
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    data
}

/// The first offset where `a` and `b` differ, or `None` when they are equal.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
