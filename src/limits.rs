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

/// Most chunk workers (`--workers`): past the core count they only add threads, and the budget
/// below stops growing at `WORKER_BUFFERS_MAX` buffers anyway.
pub const WORKERS_MAX: usize = 64;
/// Most parts or downloads in flight (`--parts-in-flight`, `--cinder-uploads`,
/// `--downloads-in-flight`).
pub const IN_FLIGHT_MAX: usize = 32;
/// Chunk buffers a native job holds at most, whatever its worker count.
const WORKER_BUFFERS_MAX: usize = 32;
/// A job whose budget exceeds this is refused before it starts (with non-default chunk, object or
/// part settings); at the defaults every job stays near a quarter of it.
pub const MEMORY_BUDGET_BYTES_MAX: usize = 1 << 30;
/// Read buffers of a Cinder-format backup beyond one object: read-ahead into the next object.
const CINDER_READ_AHEAD_BYTES: usize = 16 << 20;
/// Object bodies a Cinder-format restore downloads at once, in bytes: the number of objects in
/// flight is this over the object size (at least one).
const CINDER_DOWNLOAD_BYTES: usize = 128 << 20;
/// Decoded pieces a Cinder-format restore has between its decoders and its writer.
const CINDER_RESTORE_PIECES: usize = 16;

/// The memory budget of one job, computed once from its actual settings, reported in its `start`
/// event, and what every pool and queue of the job is sized from: peak data-plane memory is
/// `total_bytes()`, whatever the volume size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    /// Aligned buffers of the reader (backup) or writer (restore) pool.
    pub chunk_buffer_count: usize,
    /// Size of one of them.
    pub chunk_buffer_bytes: usize,
    /// Compressed chunks (native) or compressed segments (Cinder) queued between stages.
    pub compressed_queue_count: usize,
    /// Bytes of one queued compressed item at most.
    pub compressed_item_bytes: usize,
    /// Bytes of upload bodies (pack parts, Cinder objects) that may exist at once.
    pub part_bytes_max: usize,
    /// Bytes of download bodies (ranged GETs, Cinder objects) that may exist at once.
    pub download_bytes_max: usize,
    /// Uploads or downloads running at once, after the budget's clamp.
    pub transfers_in_flight: usize,
    /// The sum: the data plane's peak memory.
    pub total_bytes: usize,
}

impl Budget {
    fn finish(mut self) -> Budget {
        self.total_bytes = self.chunk_buffer_count * self.chunk_buffer_bytes
            + self.compressed_queue_count * self.compressed_item_bytes
            + self.part_bytes_max
            + self.download_bytes_max;
        assert!(self.chunk_buffer_count >= 2);
        assert!(self.transfers_in_flight >= 1);
        self
    }

    /// Refuses a budget above `MEMORY_BUDGET_BYTES_MAX`, naming the settings that make it.
    ///
    /// # Errors
    /// A message for a `Usage` error.
    pub fn check(&self, settings: &str) -> Result<(), String> {
        if self.total_bytes <= MEMORY_BUDGET_BYTES_MAX {
            return Ok(());
        }
        Err(format!(
            "{settings} would need {} MiB of buffers, more than the {} MiB limit; use smaller \
             values",
            self.total_bytes >> 20,
            MEMORY_BUDGET_BYTES_MAX >> 20
        ))
    }

    /// A native backup of `source_count` sources in `chunk_size_bytes` chunks with `worker_count`
    /// workers and `parts_in_flight` uploads.
    pub fn native_backup(
        chunk_size_bytes: u32,
        worker_count: usize,
        parts_in_flight: usize,
        source_count: usize,
    ) -> Budget {
        let chunk_buffer_bytes = (chunk_size_bytes as usize).next_multiple_of(4096);
        // The reader needs enough buffers to keep its queue full while every worker holds one, and
        // read-ahead to overlap zstd-bound stretches of a volume with device-bound ones (runs of
        // text between zeros): 24 × 4 MiB measured 0.86 × the wall time of 8 on a mixed image.
        // More workers than buffers only wait, so the count stops growing; large chunks get fewer.
        let by_workers = (worker_count * 2 + 4).clamp(24, WORKER_BUFFERS_MAX);
        let by_bytes = ((128 << 20) / chunk_buffer_bytes).max(4);
        // Every extra reader gets buffers of its own to keep its queue busy.
        let chunk_buffer_count = by_workers.min(by_bytes) + 2 * source_count.saturating_sub(1);
        let compressed_queue_count =
            (worker_count * 2).clamp(2, 8).min(((32 << 20) / chunk_buffer_bytes).max(2));
        Budget {
            chunk_buffer_count,
            chunk_buffer_bytes,
            compressed_queue_count,
            compressed_item_bytes: chunk_buffer_bytes,
            // One part being filled, one queued, and the in-flight ones.
            part_bytes_max: PART_SIZE_BYTES * (parts_in_flight + 2),
            download_bytes_max: 0,
            transfers_in_flight: parts_in_flight.max(1),
            total_bytes: 0,
        }
        .finish()
    }

    /// A native restore of `chunk_size_bytes` chunks with `downloads_in_flight` ranged GETs.
    pub fn native_restore(chunk_size_bytes: u32, downloads_in_flight: usize) -> Budget {
        let chunk_buffer_bytes = (chunk_size_bytes as usize).next_multiple_of(4096);
        let by_bytes = ((128 << 20) / chunk_buffer_bytes).max(4);
        Budget {
            chunk_buffer_count: (downloads_in_flight * 2 + 4)
                .clamp(24, WORKER_BUFFERS_MAX)
                .min(by_bytes),
            chunk_buffer_bytes,
            compressed_queue_count: 0,
            compressed_item_bytes: 0,
            part_bytes_max: 0,
            download_bytes_max: downloads_in_flight * DOWNLOAD_RANGE_BYTES_MAX as usize,
            transfers_in_flight: downloads_in_flight.max(1),
            total_bytes: 0,
        }
        .finish()
    }

    /// A Cinder-format backup reading `read_chunk_bytes` at a time into objects of
    /// `object_size_bytes` (uncompressed), uploading with `uploads` parts in flight: one object
    /// being compressed plus read-ahead, its compressed segments, and two object bodies (one
    /// uploading, one queued).
    pub fn cinder_backup(
        object_size_bytes: usize,
        read_chunk_bytes: usize,
        uploads: usize,
    ) -> Budget {
        let body_max = object_size_bytes + object_size_bytes / 64 + 4096;
        let chunks_per_object = object_size_bytes.div_ceil(read_chunk_bytes);
        Budget {
            chunk_buffer_count: chunks_per_object
                + (CINDER_READ_AHEAD_BYTES / read_chunk_bytes).max(2),
            chunk_buffer_bytes: read_chunk_bytes,
            compressed_queue_count: chunks_per_object,
            compressed_item_bytes: read_chunk_bytes + read_chunk_bytes / 64 + 64,
            part_bytes_max: 2 * body_max,
            download_bytes_max: 0,
            transfers_in_flight: uploads.max(1),
            total_bytes: 0,
        }
        .finish()
    }

    /// A Cinder-format restore of objects of `object_size_bytes` (uncompressed) with at most
    /// `downloads` GETs at once, decoding into `piece_bytes` pieces.
    pub fn cinder_restore(
        object_size_bytes: usize,
        downloads: usize,
        piece_bytes: usize,
    ) -> Budget {
        let body_max = object_size_bytes + object_size_bytes / 64 + 4096;
        let in_flight = downloads.clamp(1, (CINDER_DOWNLOAD_BYTES / body_max).max(1));
        Budget {
            chunk_buffer_count: CINDER_RESTORE_PIECES.max(2 * in_flight + 2),
            chunk_buffer_bytes: piece_bytes,
            compressed_queue_count: 0,
            compressed_item_bytes: 0,
            part_bytes_max: 0,
            download_bytes_max: in_flight * body_max,
            transfers_in_flight: in_flight,
            total_bytes: 0,
        }
        .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the defaults, with any worker count up to the limit, every job's data plane stays
    /// within 256 MiB (the 320 MiB RSS target leaves the rest to code, runtime and tables), and
    /// the budget is what makes it so: it does not grow with workers past the clamp.
    #[test]
    fn budgets_at_defaults_are_bounded_whatever_the_worker_count() {
        const LIMIT: usize = 256 << 20;
        for workers in [1, 2, 8, 32, WORKERS_MAX] {
            let budget = Budget::native_backup(
                CHUNK_SIZE_BYTES_DEFAULT,
                workers,
                PARTS_IN_FLIGHT_DEFAULT,
                1,
            );
            assert!(budget.total_bytes <= LIMIT, "{workers}: {budget:?}");
        }
        let many = Budget::native_backup(
            CHUNK_SIZE_BYTES_DEFAULT,
            WORKERS_MAX,
            PARTS_IN_FLIGHT_DEFAULT,
            1,
        );
        let two = Budget::native_backup(CHUNK_SIZE_BYTES_DEFAULT, 2, PARTS_IN_FLIGHT_DEFAULT, 1);
        assert!(many.total_bytes <= two.total_bytes + (64 << 20));
        let restore = Budget::native_restore(CHUNK_SIZE_BYTES_DEFAULT, DOWNLOADS_IN_FLIGHT_DEFAULT);
        assert!(restore.total_bytes <= LIMIT, "{restore:?}");
        let cinder = Budget::cinder_backup(52_428_800, 2 << 20, 4);
        assert!(cinder.total_bytes <= LIMIT, "{cinder:?}");
        let cinder = Budget::cinder_restore(52_428_800, DOWNLOADS_IN_FLIGHT_DEFAULT, 4 << 20);
        assert!(cinder.total_bytes <= LIMIT, "{cinder:?}");
        assert!(cinder.transfers_in_flight < DOWNLOADS_IN_FLIGHT_DEFAULT, "{cinder:?}");
        for budget in [many, two, restore, cinder] {
            assert!(budget.check("defaults").is_ok());
        }
    }

    #[test]
    fn oversized_settings_are_refused_by_name() {
        let budget = Budget::cinder_backup(1 << 30, 4 << 20, 4);
        let message = budget.check("--cinder-object-size 1073741824").unwrap_err();
        assert!(message.contains("--cinder-object-size"), "{message}");
        let sources = Budget::native_backup(CHUNK_SIZE_BYTES_MAX, WORKERS_MAX, IN_FLIGHT_MAX, 8);
        assert!(sources.check("x").is_err(), "{sources:?}");
    }
}
