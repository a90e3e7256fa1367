//! Choosing the read request size and queue depth from measurements (see the table in the doc of
//! `DEFAULT_READ_REQUEST_BYTES`), capped by what the device accepts in one request
//! (`/sys/dev/block/M:m/queue/max_sectors_kb`) and by the chunk size. It does not measure at run
//! time.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use super::{BUF_ALIGN, DeviceInfo};

/// Default size of one read request: 512 KiB.
///
/// Measured with `read_source` (io_uring, registered buffers, 4 MiB chunks, 1 GiB, three runs;
/// the same sweep is `bench read DEVICE --request-size N --queue-depth N`) on Linux 6.18, 2 vCPU with other builds running (load 2–3.5,
/// so ±30 %): a loop device (`--direct-io=on`) over an ext4 file on a virtio disk (512-byte
/// blocks) and over a tmpfs file (4096-byte blocks). Virtio, first (cold) run: 512 KiB × 16
/// 1.65 GB/s and 1 MiB × 8 1.53 GB/s were the fastest, at ≈ 0.02 CPU-s/GiB; 128 KiB needed depth
/// 32; 1 MiB × 32 fell to 0.76 GB/s. Warm runs were flat at ≈ 0.8–1.1 GB/s for every shape (the
/// loop worker is the limit). tmpfs: 512 KiB × 4–8 and 1 MiB × 4 reached 4.3–5.2 GB/s at
/// 0.015–0.024 CPU-s/GiB; depth 16–32 was 20–30 % slower. Unregistered buffers cost 0.09–0.2
/// CPU-s/GiB (5–10× more), `pread` 0.06–0.14.
pub const DEFAULT_READ_REQUEST_BYTES: usize = 512 << 10;

/// Bytes in flight the queue depth aims for (8 MiB: 512 KiB × 16, 1 MiB × 8).
pub const TARGET_IN_FLIGHT_BYTES: usize = 8 << 20;

/// Smallest queue depth chosen: below 4 the virtio-backed device lost half its bandwidth.
pub const MIN_RECOMMENDED_QUEUE_DEPTH: usize = 4;

/// Largest queue depth chosen (fio's bandwidth jobs use 32; more only adds queueing).
pub const MAX_RECOMMENDED_QUEUE_DEPTH: usize = 32;

/// A request size and queue depth for `ReadOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadShape {
    /// For `ReadOptions::request_size_bytes`.
    pub request_size_bytes: usize,
    /// For `ReadOptions::queue_depth`.
    pub queue_depth: usize,
}

/// The recommended request size and queue depth for reading `file` in chunks of
/// `chunk_size_bytes`: `DEFAULT_READ_REQUEST_BYTES`, capped by the device's `max_sectors_kb`
/// (block devices, when sysfs tells) and by the chunk size, halved until it divides the chunk
/// (never below `max(logical block, BUF_ALIGN)`); the depth keeps `TARGET_IN_FLIGHT_BYTES` in
/// flight, clamped to `[MIN_RECOMMENDED_QUEUE_DEPTH, MAX_RECOMMENDED_QUEUE_DEPTH]`.
pub fn read_shape(file: &File, info: &DeviceInfo, chunk_size_bytes: usize) -> ReadShape {
    let max_request = if info.is_block_device { max_sectors_bytes(file) } else { None };
    shape_for(max_request, info.logical_block_bytes as usize, chunk_size_bytes)
}

/// The pure part of `read_shape`.
pub(crate) fn shape_for(
    max_request: Option<usize>,
    logical_block: usize,
    chunk_size: usize,
) -> ReadShape {
    let granule = logical_block.max(BUF_ALIGN);
    let mut request = DEFAULT_READ_REQUEST_BYTES.min(max_request.unwrap_or(usize::MAX));
    request = request.min(chunk_size.max(granule));
    request = (request / granule).max(1) * granule;
    while request > granule && !chunk_size.is_multiple_of(request) {
        request = ((request / 2) / granule).max(1) * granule;
    }
    let queue_depth = (TARGET_IN_FLIGHT_BYTES / request)
        .clamp(MIN_RECOMMENDED_QUEUE_DEPTH, MAX_RECOMMENDED_QUEUE_DEPTH);
    ReadShape { request_size_bytes: request, queue_depth }
}

/// `queue/max_sectors_kb` of the block device `file`, in bytes.
fn max_sectors_bytes(file: &File) -> Option<usize> {
    let rdev = file.metadata().ok()?.rdev();
    let path =
        format!("/sys/dev/block/{}:{}/queue/max_sectors_kb", libc::major(rdev), libc::minor(rdev));
    let kib: usize = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    (kib > 0).then_some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;

    #[test]
    fn default_shape_for_4_mib_chunks() {
        let shape = shape_for(None, 512, 4 * MIB);
        assert_eq!(shape, ReadShape { request_size_bytes: 512 * KIB, queue_depth: 16 });
    }

    #[test]
    fn capped_by_device_and_chunk() {
        // max_sectors_kb = 128: 128 KiB requests, depth clamped to 32
        let shape = shape_for(Some(128 * KIB), 512, 4 * MIB);
        assert_eq!(shape, ReadShape { request_size_bytes: 128 * KIB, queue_depth: 32 });
        // odd max_sectors_kb = 1280 KiB with a 4 KiB device: the default still fits
        let shape = shape_for(Some(1280 * KIB), 4096, 4 * MIB);
        assert_eq!(shape.request_size_bytes, 512 * KIB);
        // small chunk: one request per chunk
        let shape = shape_for(None, 512, 64 * KIB);
        assert_eq!(shape, ReadShape { request_size_bytes: 64 * KIB, queue_depth: 32 });
        // chunk not a multiple of 512 KiB: halve until the request divides it
        let shape = shape_for(None, 512, 768 * KIB);
        assert_eq!(shape.request_size_bytes, 256 * KIB);
        // never below the granule
        let shape = shape_for(Some(512), 512, 4 * MIB);
        assert_eq!(shape.request_size_bytes, BUF_ALIGN);
        assert_eq!(shape.queue_depth, MAX_RECOMMENDED_QUEUE_DEPTH);
    }

    #[test]
    fn loop_device_reports_max_sectors() {
        let file = File::open("/dev/loop0");
        if let Ok(file) = file
            && let Ok(info) = crate::io::probe(&file)
        {
            let shape = read_shape(&file, &info, 4 * MIB);
            assert!(shape.request_size_bytes <= DEFAULT_READ_REQUEST_BYTES);
            assert!(shape.request_size_bytes.is_multiple_of(BUF_ALIGN));
            assert!(max_sectors_bytes(&file).is_some_and(|max| max >= 4096));
        }
    }
}
