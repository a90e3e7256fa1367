//! Object layout of a backup: one object per object-size chunk for a full backup; for an
//! incremental, one object per run of blocks whose hash differs from the parent's, cut at chunk
//! boundaries, exactly as `ChunkedBackupDriver.backup` walks the volume.

use super::error::CinderError;
use super::sha256file::{Hash, Sha256File};
use super::{DEFAULT_BLOCK_SIZE, DEFAULT_OBJECT_SIZE};

/// `backup_s3_object_size` and `backup_s3_block_size`, checked the way Cinder checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    object_size: u64,
    block_size: u64,
}

impl Default for Geometry {
    fn default() -> Geometry {
        Geometry { object_size: DEFAULT_OBJECT_SIZE, block_size: DEFAULT_BLOCK_SIZE }
    }
}

impl Geometry {
    /// Object (chunk) size and hash block size.
    ///
    /// # Errors
    /// [`CinderError::ZeroSize`] for a zero size; [`CinderError::ObjectSizeNotBlockMultiple`] when
    /// the block size does not divide the object size (Cinder refuses every backup then).
    pub fn new(object_size: u64, block_size: u64) -> Result<Geometry, CinderError> {
        if object_size == 0 {
            return Err(CinderError::ZeroSize { what: "backup_s3_object_size" });
        }
        if block_size == 0 {
            return Err(CinderError::ZeroSize { what: "backup_s3_block_size" });
        }
        if !object_size.is_multiple_of(block_size) {
            return Err(CinderError::ObjectSizeNotBlockMultiple { object_size, block_size });
        }
        Ok(Geometry { object_size, block_size })
    }

    /// The object size: the read size and the largest uncompressed object.
    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    /// The hash block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of hashes `len` bytes of volume produce (the last block may be partial).
    pub fn blocks_in(&self, len: u64) -> u64 {
        len.div_ceil(self.block_size)
    }

    /// The chunks Cinder reads, `(offset, length)`: `object_size` each, the last one shorter.
    pub fn chunks(&self, volume_len: u64) -> impl Iterator<Item = Extent> + use<> {
        let object_size = self.object_size;
        (0..volume_len.div_ceil(object_size)).map(move |i| {
            let offset = i * object_size;
            Extent { offset, length: object_size.min(volume_len - offset) }
        })
    }
}

/// A byte range of the volume: one data object's uncompressed content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    /// Volume byte offset.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The objects of a full backup, in order: one per chunk.
pub fn full_layout(volume_len: u64, geometry: Geometry) -> Vec<Extent> {
    geometry.chunks(volume_len).collect()
}

/// Cinder's preconditions for an incremental: same hash block size as the parent, and a volume
/// not bigger (in GiB, the unit of `backup.size`) than the parent backup.
///
/// # Errors
/// [`CinderError::ParentBlockSize`] or [`CinderError::VolumeGrew`], as Cinder refuses.
pub fn check_incremental(
    parent: &Sha256File,
    geometry: Geometry,
    size_gib: u64,
    parent_size_gib: u64,
) -> Result<(), CinderError> {
    if parent.chunk_size != geometry.block_size {
        return Err(CinderError::ParentBlockSize {
            parent: parent.chunk_size,
            current: geometry.block_size,
        });
    }
    if size_gib > parent_size_gib {
        return Err(CinderError::VolumeGrew { size_gib, parent_gib: parent_size_gib });
    }
    Ok(())
}

/// The objects an incremental backup writes for one chunk: `chunk` is one of
/// [`Geometry::chunks`], `hashes` its block hashes (see [`super::block_hashes`]), `parent` the
/// parent's `sha256s`. A block is changed when its hash differs from the parent's hash at the same
/// global index; each maximal run of changed blocks becomes one extent, ending at the next
/// unchanged block or at the chunk's end (so a partial last block is included whole).
///
/// Chunks are independent, so a parallel pipeline may call this per chunk in any order and number
/// the objects afterwards in offset order.
///
/// # Errors
/// [`CinderError::ChunkMisaligned`] for a range that is not a chunk, [`CinderError::HashCount`]
/// when `hashes` does not cover it, [`CinderError::ParentTooShort`] when a block has no parent
/// hash (Cinder fails with `IndexError`).
pub fn changed_extents(
    parent: &[Hash],
    chunk: Extent,
    hashes: &[Hash],
    geometry: Geometry,
) -> Result<Vec<Extent>, CinderError> {
    let bs = geometry.block_size;
    if !chunk.offset.is_multiple_of(geometry.object_size)
        || chunk.length == 0
        || chunk.length > geometry.object_size
    {
        return Err(CinderError::ChunkMisaligned {
            offset: chunk.offset,
            len: chunk.length,
            object_size: geometry.object_size,
        });
    }
    let expected = geometry.blocks_in(chunk.length);
    if hashes.len() as u64 != expected {
        return Err(CinderError::HashCount {
            len: chunk.length,
            block_size: bs,
            expected,
            actual: hashes.len() as u64,
        });
    }
    let first = chunk.offset / bs;
    let mut extents = Vec::new();
    let mut run_start: Option<u64> = None;
    for (idx, hash) in (0u64..).zip(hashes) {
        let global = first + idx;
        let parent_hash = usize::try_from(global).ok().and_then(|g| parent.get(g)).ok_or(
            CinderError::ParentTooShort { index: global, parent_len: parent.len() as u64 },
        )?;
        match (hash != parent_hash, run_start) {
            (true, None) => run_start = Some(idx * bs),
            (false, Some(start)) => {
                extents.push(Extent { offset: chunk.offset + start, length: idx * bs - start });
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        extents.push(Extent { offset: chunk.offset + start, length: chunk.length - start });
    }
    Ok(extents)
}

/// The objects of an incremental backup of a `volume_len`-byte volume whose block hashes are
/// `current`, against the parent's `sha256s`: [`changed_extents`] of every chunk, in order.
///
/// # Errors
/// As [`changed_extents`]; [`CinderError::HashCount`] when `current` does not cover the volume.
pub fn incremental_layout(
    parent: &[Hash],
    current: &[Hash],
    volume_len: u64,
    geometry: Geometry,
) -> Result<Vec<Extent>, CinderError> {
    let expected = geometry.blocks_in(volume_len);
    if current.len() as u64 != expected {
        return Err(CinderError::HashCount {
            len: volume_len,
            block_size: geometry.block_size,
            expected,
            actual: current.len() as u64,
        });
    }
    let per_chunk =
        usize::try_from(geometry.object_size / geometry.block_size).unwrap_or(usize::MAX);
    let mut extents = Vec::new();
    for (chunk, hashes) in geometry.chunks(volume_len).zip(current.chunks(per_chunk)) {
        extents.extend(changed_extents(parent, chunk, hashes, geometry)?);
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cinder::layout::sha256file::block_hashes;

    /// A line-by-line port of the loop in `ChunkedBackupDriver.backup` (extent_off, shaindex)
    /// over real data, the oracle for the planner.
    fn cinder_loop(parent: &[Hash], data: &[u8], object_size: usize, bs: usize) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut shaindex = 0usize;
        let mut data_offset = 0usize;
        while data_offset < data.len() {
            let chunk = &data[data_offset..(data_offset + object_size).min(data.len())];
            let shalist = block_hashes(chunk, bs);
            let mut extent_off: Option<usize> = None;
            for (idx, sha) in shalist.iter().enumerate() {
                if *sha != parent[shaindex] {
                    if extent_off.is_none() {
                        extent_off = Some(idx * bs);
                    }
                } else if let Some(off) = extent_off.take() {
                    let end = idx * bs;
                    out.push(Extent {
                        offset: (data_offset + off) as u64,
                        length: (end - off) as u64,
                    });
                }
                shaindex += 1;
            }
            if let Some(off) = extent_off {
                out.push(Extent {
                    offset: (data_offset + off) as u64,
                    length: (chunk.len() - off) as u64,
                });
            }
            data_offset += chunk.len();
        }
        out
    }

    /// Full layouts cut the volume into object-size chunks with a short last one.
    #[test]
    fn full() {
        let g = Geometry::new(100, 10).unwrap();
        assert_eq!(
            full_layout(250, g),
            [
                Extent { offset: 0, length: 100 },
                Extent { offset: 100, length: 100 },
                Extent { offset: 200, length: 50 }
            ]
        );
        assert!(full_layout(0, g).is_empty());
        assert_eq!(Geometry::default().object_size(), 52_428_800);
    }

    /// Random changes over random sizes (partial last blocks and chunks, a shrunken volume)
    /// plan exactly the extents Cinder's loop produces; runs never cross a chunk boundary.
    #[test]
    fn matches_cinder_loop() {
        let mut s = 0x1234_5678_9abc_def1_u64;
        let mut next = |m: u64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % m
        };
        for _ in 0..300 {
            let bs = 1 + next(8) as usize;
            let object_size = bs * (1 + next(6) as usize);
            let parent_len = next(200) as usize;
            let parent_data: Vec<u8> = (0..parent_len).map(|_| next(3) as u8).collect();
            let mut data = parent_data.clone();
            data.truncate(parent_len - next(parent_len as u64 / 4 + 1) as usize);
            for _ in 0..next(10) {
                if !data.is_empty() {
                    let i = next(data.len() as u64) as usize;
                    data[i] = data[i].wrapping_add(1 + next(2) as u8);
                }
            }
            let g = Geometry::new(object_size as u64, bs as u64).unwrap();
            let parent = block_hashes(&parent_data, bs);
            let current = block_hashes(&data, bs);
            let plan = incremental_layout(&parent, &current, data.len() as u64, g).unwrap();
            assert_eq!(plan, cinder_loop(&parent, &data, object_size, bs));
            for e in &plan {
                assert!(e.length > 0 && e.length <= object_size as u64);
                assert_eq!(e.offset / object_size as u64, (e.end() - 1) / object_size as u64);
            }
        }
    }

    /// Unchanged data uploads nothing; a fully changed volume uploads one object per chunk.
    #[test]
    fn extremes() {
        let g = Geometry::new(64, 16).unwrap();
        let a = vec![1u8; 200];
        let b = vec![2u8; 200];
        let pa = block_hashes(&a, 16);
        assert!(incremental_layout(&pa, &pa, 200, g).unwrap().is_empty());
        let pb = block_hashes(&b, 16);
        assert_eq!(incremental_layout(&pa, &pb, 200, g).unwrap(), full_layout(200, g));
    }

    /// Cinder's refusals: geometry, block-size change, growth (in GiB and beyond the parent's
    /// hashes), and hash lists that do not cover the data.
    #[test]
    fn refusals() {
        assert!(matches!(
            Geometry::new(100, 30),
            Err(CinderError::ObjectSizeNotBlockMultiple { .. })
        ));
        assert!(matches!(Geometry::new(0, 1), Err(CinderError::ZeroSize { .. })));
        assert!(matches!(Geometry::new(1, 0), Err(CinderError::ZeroSize { .. })));
        let g = Geometry::new(64, 16).unwrap();
        let mut parent = Sha256File::new("p", "v", "");
        parent.chunk_size = 16;
        check_incremental(&parent, g, 1, 1).unwrap();
        assert!(matches!(check_incremental(&parent, g, 2, 1), Err(CinderError::VolumeGrew { .. })));
        parent.chunk_size = 32;
        assert!(matches!(
            check_incremental(&parent, g, 1, 1),
            Err(CinderError::ParentBlockSize { parent: 32, current: 16 })
        ));
        let short = block_hashes(&[0u8; 32], 16);
        let long = block_hashes(&[1u8; 48], 16);
        assert!(matches!(
            incremental_layout(&short, &long, 48, g),
            Err(CinderError::ParentTooShort { index: 2, parent_len: 2 })
        ));
        assert!(matches!(
            incremental_layout(&short, &long, 64, g),
            Err(CinderError::HashCount { .. })
        ));
        let chunk = Extent { offset: 10, length: 16 };
        assert!(matches!(
            changed_extents(&short, chunk, &short[..1], g),
            Err(CinderError::ChunkMisaligned { .. })
        ));
    }
}
