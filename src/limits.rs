//! Named limits and the memory budget of one job, derived from its options and asserted at
//! startup. Every queue and buffer pool in the data plane is sized from here, so peak memory is a
//! fixed number that does not grow with the volume.

/// Default chunk size: 4 MiB. Large enough that per-chunk costs (hash setup, index entries,
/// pack records) are negligible and zstd sees enough context; small enough that a partly
/// changed volume re-uploads little. A 1 TiB volume has 262,144 chunks.
pub const CHUNK_SIZE_BYTES_DEFAULT: u32 = 4 << 20;
/// Smallest chunk size accepted: one O_DIRECT-friendly 64 KiB unit.
pub const CHUNK_SIZE_BYTES_MIN: u32 = 64 << 10;
/// Largest chunk size accepted.
pub const CHUNK_SIZE_BYTES_MAX: u32 = 64 << 20;

/// Part size of pack multipart uploads: 16 MiB (AWS guidance is 8-16 MiB; fewer, larger parts
/// cost Garage less per byte).
pub const PART_SIZE_BYTES: usize = 16 << 20;
/// A pack is closed once it holds this many bytes: 128 MiB, eight parts. Packs of tens to
/// hundreds of MiB keep object count and request cost low at TiB scale.
pub const PACK_SIZE_BYTES_TARGET: usize = 128 << 20;
/// Parts in flight to the object store. `perf/upload-sweep.sh 1G` against Garage on this
/// 2-core machine (perf/results/upload-sweep-20261126-1459.md): 16 MiB × 2/4/6/8/12 in flight
/// gave 228/240/221/227/196 MB/s, so 4 is as fast as any and needs the least memory (8 MiB
/// parts were no faster; 32 MiB parts were 20% slower and cost twice the client CPU).
pub const PARTS_IN_FLIGHT_DEFAULT: usize = 4;
/// Ranged GETs in flight during restore.
pub const DOWNLOADS_IN_FLIGHT_DEFAULT: usize = 6;
/// Largest ranged GET issued by restore (several pack records are coalesced into one GET).
pub const DOWNLOAD_RANGE_BYTES_MAX: u64 = 16 << 20;
/// io_uring write requests in flight during restore. Reads choose their request size and depth
/// per device with `io::read_shape` (measurements in its module docs).
pub const QUEUE_DEPTH_DEFAULT: usize = 16;

const _: () = assert!(PART_SIZE_BYTES >= 5 << 20, "S3 rejects non-final parts under 5 MiB");
const _: () = assert!(PACK_SIZE_BYTES_TARGET.is_multiple_of(PART_SIZE_BYTES));
const _: () = assert!(
    PACK_SIZE_BYTES_TARGET / PART_SIZE_BYTES + 2 <= 10_000,
    "a pack must fit S3's 10,000-part limit"
);
const _: () = assert!(CHUNK_SIZE_BYTES_DEFAULT as usize <= PART_SIZE_BYTES);

/// The memory budget of one backup or restore, computed once from its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Chunk buffers the reader (backup) or writer (restore) may hold at once.
    pub chunk_buffer_count: usize,
    /// Size of one chunk buffer.
    pub chunk_buffer_bytes: usize,
    /// Bytes of part buffers that may exist at once (being filled, queued, in flight).
    pub part_bytes_max: usize,
    /// Compressed chunks queued between the compressors and the packer.
    pub compressed_queue_count: usize,
}

impl Budget {
    /// The budget for a job with `chunk_size_bytes` chunks, `worker_count` compressors and
    /// `parts_in_flight` uploads.
    pub fn new(chunk_size_bytes: u32, worker_count: usize, parts_in_flight: usize) -> Budget {
        let chunk_buffer_bytes = (chunk_size_bytes as usize).next_multiple_of(4096);
        // The reader needs enough buffers to keep its queue full while every worker holds one, and
        // read-ahead to overlap zstd-bound stretches of a volume with device-bound ones (runs of
        // text between zeros): 24 × 4 MiB measured 0.86 × the wall time of 8 on a mixed image.
        let chunk_buffer_count = (worker_count * 2 + 4).max(24);
        let budget = Budget {
            chunk_buffer_count,
            chunk_buffer_bytes,
            // One part being filled, one queued, and the in-flight ones.
            part_bytes_max: PART_SIZE_BYTES * (parts_in_flight + 2),
            compressed_queue_count: worker_count * 2,
        };
        assert!(budget.chunk_buffer_count >= 2);
        assert!(budget.part_bytes_max >= PART_SIZE_BYTES);
        budget
    }

    /// The total bytes this budget allows the data plane to hold: chunk buffers, compressed
    /// chunks in the queue (each at most one chunk plus a small bound), and part buffers.
    pub fn total_bytes(&self) -> usize {
        self.chunk_buffer_count * self.chunk_buffer_bytes
            + self.compressed_queue_count * self.chunk_buffer_bytes
            + self.part_bytes_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The default budget must stay well under the 512 MiB peak RSS promised in README.
    #[test]
    fn default_budget_fits_512_mib() {
        let budget = Budget::new(CHUNK_SIZE_BYTES_DEFAULT, 2, PARTS_IN_FLIGHT_DEFAULT);
        assert!(budget.total_bytes() < 384 << 20, "{budget:?} = {}", budget.total_bytes());
        assert!(budget.total_bytes() > 64 << 20);
    }
}
