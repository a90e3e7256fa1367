//! `AlignedBuf`: a zero-initialised heap buffer whose address and capacity are multiples of
//! `BUF_ALIGN`, as `O_DIRECT` requires, with a separate count of valid bytes.
//!
//! Buffers of `MAP_BYTES_MIN` or more are anonymous mappings: the kernel's zero pages, touched
//! only when first used. The allocator's aligned `alloc_zeroed` writes every byte, which costs
//! ~4 ms per 4 MiB buffer up front, ~0.1 s for a job's pool, most of it wasted on buffers an
//! incremental backup or a small restore never fills.
//!
//! The buffer never reallocates, so its address stays fixed while the kernel reads or writes it.
//! Every buffer carries a process-unique `id`, so io_uring registration can tell a recycled buffer
//! from a new allocation that happens to reuse a freed address. It does not pool or register
//! itself: pooling is the caller's free-buffer channel, registration is done by the ring driver.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BUF_ALIGN;

/// Buffers at least this large are anonymous mappings, smaller ones come from the allocator.
const MAP_BYTES_MIN: usize = 256 * 1024;

/// Heap buffer aligned to `BUF_ALIGN`, zero-initialised, capacity a multiple of `BUF_ALIGN`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    /// Process-unique identity of this allocation (never reused).
    id: u64,
}

/// A zeroed, `BUF_ALIGN`-aligned allocation of `layout.size()` bytes: an anonymous mapping
/// (page-aligned, and pages are multiples of `BUF_ALIGN`) from `MAP_BYTES_MIN` on.
fn allocate(layout: Layout) -> NonNull<u8> {
    if layout.size() >= MAP_BYTES_MIN {
        // SAFETY: a fresh private anonymous mapping of a non-zero length, no address hint and
        // no file: it aliases nothing, and `release` unmaps it with the same length.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            alloc::handle_alloc_error(layout);
        }
        return NonNull::new(raw.cast::<u8>()).unwrap_or_else(|| alloc::handle_alloc_error(layout));
    }
    // SAFETY: `layout` has a non-zero size (asserted by the caller), the only requirement of
    // `alloc_zeroed`.
    let raw = unsafe { alloc::alloc_zeroed(layout) };
    NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

/// Frees what `allocate(layout)` returned.
///
/// # Safety
/// `ptr` must come from `allocate` with this `layout` and not have been released.
unsafe fn release(ptr: NonNull<u8>, layout: Layout) {
    if layout.size() >= MAP_BYTES_MIN {
        // SAFETY: per the contract, a mapping of exactly this length made by `allocate`.
        let unmapped = unsafe { libc::munmap(ptr.as_ptr().cast(), layout.size()) };
        debug_assert_eq!(unmapped, 0, "munmap of an AlignedBuf failed");
    } else {
        // SAFETY: per the contract, from `alloc_zeroed` with this layout, freed once.
        unsafe { alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); the raw pointer is never
// shared with another `AlignedBuf`, so moving the owner to another thread is sound.
unsafe impl Send for AlignedBuf {}

// SAFETY: through `&AlignedBuf` only `as_slice` (shared read) and the getters are reachable; every
// mutation needs `&mut AlignedBuf`, so shared references across threads cannot race.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `capacity_bytes` with `len() == 0`.
    ///
    /// # Panics
    /// If `capacity_bytes` is 0 or not a multiple of `BUF_ALIGN`.
    pub fn new(capacity_bytes: usize) -> AlignedBuf {
        assert!(
            capacity_bytes > 0 && capacity_bytes.is_multiple_of(BUF_ALIGN),
            "buffer capacity {capacity_bytes} must be a non-zero multiple of {BUF_ALIGN}"
        );
        let layout = Layout::from_size_align(capacity_bytes, BUF_ALIGN)
            .expect("capacity is a multiple of a power-of-two alignment and fits isize");
        let ptr = allocate(layout);
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        AlignedBuf { ptr, capacity: capacity_bytes, len: 0, id }
    }

    /// Size of the allocation in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of valid bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is valid.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the number of valid bytes.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "length {len} exceeds buffer capacity {}", self.capacity);
        self.len = len;
    }

    /// The valid bytes, `[0, len)`.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity` initialised (zeroed at allocation) bytes owned by
        // `self`, `len <= capacity` is an invariant of `set_len`, and `&self` excludes mutation for
        // the lifetime of the slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole buffer, `[0, capacity)`, to fill before calling `set_len`.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `capacity` initialised bytes owned by `self`, and `&mut self`
        // makes this the only reference to them for the lifetime of the slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// Start of the allocation, for handing the buffer to the kernel. Taking the pointer creates
    /// no reference to the contents, so it may be called again while earlier requests on other
    /// parts of the buffer are still in flight.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Process-unique identity of the allocation: two buffers never share an id, even when one
    /// reuses the address of a freed one.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: `ptr` was returned by `allocate` with this same layout and is released only
        // here, once.
        unsafe { release(self.ptr, layout) };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffer_is_aligned_zeroed_and_empty() {
        let mut buf = AlignedBuf::new(3 * BUF_ALIGN);
        assert_eq!(buf.capacity(), 3 * BUF_ALIGN);
        assert_eq!(buf.len(), 0);
        assert!(buf.is_empty());
        assert!(buf.as_slice().is_empty());
        assert_eq!(buf.as_mut_ptr() as usize % BUF_ALIGN, 0);
        let whole = buf.as_mut_slice();
        assert_eq!(whole.len(), 3 * BUF_ALIGN);
        assert!(whole.iter().all(|&b| b == 0));
    }

    /// A mapped buffer (from `MAP_BYTES_MIN`) is as aligned and zeroed as an allocated one,
    /// writable to its last byte, and buffers freed and made again do not share ids.
    #[test]
    fn mapped_buffer_is_aligned_zeroed_and_writable() {
        let mut ids = std::collections::HashSet::new();
        for round in 0..4 {
            let capacity = MAP_BYTES_MIN + round * BUF_ALIGN;
            let mut buf = AlignedBuf::new(capacity);
            assert!(ids.insert(buf.id()));
            assert_eq!(buf.as_mut_ptr() as usize % BUF_ALIGN, 0);
            let whole = buf.as_mut_slice();
            assert!(whole.iter().all(|&b| b == 0));
            whole[capacity - 1] = 0xa5;
            whole[0] = 0x5a;
            buf.set_len(capacity);
            assert_eq!((buf.as_slice()[0], buf.as_slice()[capacity - 1]), (0x5a, 0xa5));
        }
    }

    #[test]
    fn set_len_exposes_written_bytes() {
        let mut buf = AlignedBuf::new(BUF_ALIGN);
        buf.as_mut_slice()[..5].copy_from_slice(b"ferry");
        buf.set_len(5);
        assert_eq!(buf.as_slice(), b"ferry");
        assert!(!buf.is_empty());
        buf.set_len(BUF_ALIGN);
        assert_eq!(buf.as_slice().len(), BUF_ALIGN);
    }

    #[test]
    fn buffer_moves_between_threads() {
        let mut buf = AlignedBuf::new(BUF_ALIGN);
        buf.as_mut_slice()[0] = 7;
        buf.set_len(1);
        let back = std::thread::spawn(move || buf).join().expect("thread returns the buffer");
        assert_eq!(back.as_slice(), &[7]);
    }

    #[test]
    fn ids_are_unique() {
        let a = AlignedBuf::new(BUF_ALIGN);
        let b = AlignedBuf::new(BUF_ALIGN);
        assert_ne!(a.id(), b.id());
        let id = a.id();
        let moved = std::thread::spawn(move || a).join().expect("thread returns the buffer");
        assert_eq!(moved.id(), id);
    }

    #[test]
    fn debug_prints_sizes_not_contents() {
        let mut buf = AlignedBuf::new(BUF_ALIGN);
        buf.set_len(10);
        assert_eq!(format!("{buf:?}"), "AlignedBuf { capacity: 4096, len: 10 }");
    }

    #[test]
    #[should_panic(expected = "must be a non-zero multiple")]
    fn zero_capacity_panics() {
        let _ = AlignedBuf::new(0);
    }

    #[test]
    #[should_panic(expected = "must be a non-zero multiple")]
    fn unaligned_capacity_panics() {
        let _ = AlignedBuf::new(BUF_ALIGN + 512);
    }

    #[test]
    #[should_panic(expected = "exceeds buffer capacity")]
    fn set_len_beyond_capacity_panics() {
        AlignedBuf::new(BUF_ALIGN).set_len(BUF_ALIGN + 1);
    }
}
