//! Chunk identity: all-zero detection (before any hashing, so holes cost one pass at memory
//! speed) and the keyed BLAKE3 hash that names every stored chunk. Pure functions, no I/O.

use crate::native::layout::ChunkHash;

/// Names chunks with keyed BLAKE3 under the repository's secret key.
#[derive(Clone)]
pub struct ChunkHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkHasher { key: <redacted> }")
    }
}

impl ChunkHasher {
    /// A hasher for a repository key.
    pub fn new(key: [u8; 32]) -> ChunkHasher {
        ChunkHasher { key }
    }

    /// The keyed BLAKE3 hash of `data`.
    pub fn hash(&self, data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::keyed_hash(&self.key, data).as_bytes())
    }
}

/// True when every byte of `data` is zero.
///
/// ORs each 4 KiB block into one byte: the compiler vectorises the inner loop, and a non-zero
/// block ends the scan early, so data chunks cost a few bytes of scanning and zero chunks run at
/// memory bandwidth (see `benches/stages.rs`, `is_zero`).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(|block| block.iter().fold(0u8, |acc, &byte| acc | byte) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_finds_a_single_bit() {
        let mut data = vec![0u8; 1 << 20];
        assert!(is_zero(&data));
        assert!(is_zero(&[]));
        for position in [0, 4095, 4096, 524_287, (1 << 20) - 1] {
            data[position] = 0x10;
            assert!(!is_zero(&data), "bit at {position}");
            data[position] = 0;
        }
    }

    // The key changes the hash: two repositories never share chunk names.
    #[test]
    fn hash_depends_on_key() {
        let data = b"the same chunk";
        let one = ChunkHasher::new([1; 32]).hash(data);
        let two = ChunkHasher::new([2; 32]).hash(data);
        assert_ne!(one, two);
        assert_eq!(one, ChunkHasher::new([1; 32]).hash(data));
    }
}
