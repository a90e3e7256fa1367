//! Opening devices and image files with `O_DIRECT`, and probing their size and the alignment
//! `O_DIRECT` transfers need.
//!
//! Block devices answer with `BLKGETSIZE64` and `BLKSSZGET`; regular files with their length and
//! `statx(STATX_DIOALIGN)`. This module does not read or write data and does not decide whether a
//! fallback to buffered I/O is acceptable: `open` reports it and the caller warns.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::IoError;

/// `BLKGETSIZE64` from `<linux/fs.h>`: `_IOR(0x12, 114, size_t)`, the device size in bytes.
const BLKGETSIZE64: u32 = 0x8008_1272;

/// Alignment assumed for a regular file whose filesystem does not report `STATX_DIOALIGN`
/// (kernels before 6.1, or filesystems without `O_DIRECT` support). 4096 satisfies every logical
/// block size in common use, at the cost of rounding the last request of an image up to 4 KiB.
pub(crate) const DEFAULT_FILE_ALIGN: u32 = 4096;

/// Size and `O_DIRECT` alignment of a source or target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Offsets and lengths of `O_DIRECT` transfers must be multiples of this (a power of two).
    pub logical_block_bytes: u32,
    /// True for a block device, false for a regular (image) file.
    pub is_block_device: bool,
}

/// An open source or target and whether `O_DIRECT` is in effect.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file.
    pub file: File,
    /// False when the filesystem refused `O_DIRECT` and the file was opened buffered.
    pub direct: bool,
}

/// Whether a regular file has any data extent (`lseek(SEEK_DATA)` from offset 0): false only when
/// the filesystem says the whole file is a hole, so it reads as zeros. A filesystem without
/// `SEEK_DATA` support reports the whole file as data, and any other error counts as data too:
/// the answer may be "holds data" when it does not, never the reverse.
pub fn holds_data(file: &File) -> bool {
    // SAFETY: lseek on a valid open descriptor; it only moves the file offset, which no caller
    // uses (every read and write names its offset).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
}

/// Probes the size and logical block size of an open block device or regular file.
///
/// Block device: `BLKGETSIZE64` and `BLKSSZGET`. Regular file: its length, and the
/// `stx_dio_offset_align` reported by `statx(STATX_DIOALIGN)` when the kernel and filesystem
/// provide it, else `DEFAULT_FILE_ALIGN` (4096).
pub fn probe(file: &File) -> Result<DeviceInfo, IoError> {
    let metadata = file.metadata().map_err(|source| IoError::Probe { step: "fstat", source })?;
    let file_type = metadata.file_type();
    if file_type.is_block_device() {
        Ok(DeviceInfo {
            size_bytes: block_device_size(file)?,
            logical_block_bytes: block_device_sector(file)?,
            is_block_device: true,
        })
    } else if file_type.is_file() {
        Ok(DeviceInfo {
            size_bytes: metadata.len(),
            logical_block_bytes: file_dio_align(file)?.unwrap_or(DEFAULT_FILE_ALIGN),
            is_block_device: false,
        })
    } else {
        Err(IoError::UnsupportedFileType)
    }
}

fn block_device_size(file: &File) -> Result<u64, IoError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points to `size`,
    // a live, writable u64 for the duration of the call; the fd is open (borrowed from `file`).
    let rc = unsafe {
        libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as libc::Ioctl, std::ptr::from_mut(&mut size))
    };
    if rc < 0 {
        return Err(IoError::Probe { step: "BLKGETSIZE64", source: io::Error::last_os_error() });
    }
    Ok(size)
}

fn block_device_sector(file: &File) -> Result<u32, IoError> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes exactly one int through the pointer, which points to `sector`, a
    // live, writable c_int for the duration of the call; the fd is open (borrowed from `file`).
    let rc =
        unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, std::ptr::from_mut(&mut sector)) };
    if rc < 0 {
        return Err(IoError::Probe { step: "BLKSSZGET", source: io::Error::last_os_error() });
    }
    u32::try_from(sector).ok().filter(|s| s.is_power_of_two()).ok_or_else(|| IoError::Probe {
        step: "BLKSSZGET",
        source: io::Error::other(format!("invalid logical block size {sector}")),
    })
}

/// `stx_dio_offset_align` of a regular file, or None when not reported (old kernel, or a
/// filesystem without `O_DIRECT` support).
fn file_dio_align(file: &File) -> Result<Option<u32>, IoError> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated empty string and AT_EMPTY_PATH makes statx
    // describe the open fd itself; `stx` points to a writable, correctly sized statx buffer that
    // outlives the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOSYS) => Ok(None),
            _ => Err(IoError::Probe { step: "statx", source: error }),
        };
    }
    // SAFETY: statx succeeded, so the kernel filled the struct; it was zero-initialised before, so
    // every field (including those the kernel left alone) holds a valid integer.
    let stx = unsafe { stx.assume_init() };
    let align = stx.stx_dio_offset_align;
    if stx.stx_mask & libc::STATX_DIOALIGN != 0 && align != 0 && align.is_power_of_two() {
        Ok(Some(align))
    } else {
        Ok(None)
    }
}

/// Whether `O_DIRECT` is set on the open file description (`fcntl(F_GETFL)`).
pub(crate) fn is_direct(file: &File) -> Result<bool, IoError> {
    // SAFETY: F_GETFL takes no argument and only reads the status flags of the open fd borrowed
    // from `file`.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(IoError::Probe { step: "fcntl(F_GETFL)", source: io::Error::last_os_error() });
    }
    Ok(flags & libc::O_DIRECT != 0)
}

/// Opens `path` with `O_DIRECT`: read-only, or read-write when `write`. With `create` (which needs
/// `write`), a missing regular file is created with mode 0o600. If the filesystem refuses
/// `O_DIRECT` (`EINVAL` on open), the file is opened without it and `direct` is false.
pub fn open(path: &Path, write: bool, create: bool) -> Result<OpenedFile, IoError> {
    let attempt = |flags: libc::c_int| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .create(create)
            .mode(0o600)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(path)
    };
    let error = match attempt(libc::O_DIRECT) {
        Ok(file) => return Ok(OpenedFile { file, direct: true }),
        Err(error) => error,
    };
    if error.raw_os_error() == Some(libc::EINVAL)
        && let Ok(file) = attempt(0)
    {
        return Ok(OpenedFile { file, direct: false });
    }
    Err(IoError::Open { path: path.to_path_buf(), source: error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tests::TempDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_creates_file_with_mode_0600_and_o_direct() {
        let dir = TempDir::new("open-create");
        let path = dir.path().join("image");
        let opened = open(&path, true, true).expect("create image");
        // ext4 (the test filesystem) supports O_DIRECT
        assert!(opened.direct);
        assert!(is_direct(&opened.file).expect("fcntl"));
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let info = probe(&opened.file).expect("probe");
        assert_eq!(info.size_bytes, 0);
        assert!(!info.is_block_device);
        assert!(info.logical_block_bytes.is_power_of_two());
        assert!(info.logical_block_bytes >= 512 && info.logical_block_bytes <= 4096);
    }

    #[test]
    fn probe_regular_file_reports_length() {
        let dir = TempDir::new("probe-file");
        let path = dir.path().join("image");
        std::fs::write(&path, vec![1u8; 12345]).expect("write image");
        let opened = open(&path, false, false).expect("open image");
        assert_eq!(probe(&opened.file).expect("probe").size_bytes, 12345);
    }

    #[test]
    fn open_falls_back_when_o_direct_is_refused() {
        // procfs refuses O_DIRECT with EINVAL
        let opened = open(Path::new("/proc/version"), false, false).expect("open /proc/version");
        assert!(!opened.direct);
        assert!(!is_direct(&opened.file).expect("fcntl"));
        let mut text = String::new();
        let _ = io::Read::read_to_string(&mut &opened.file, &mut text).expect("read");
        assert!(text.starts_with("Linux"), "{text}");
    }

    #[test]
    fn buffered_open_is_not_direct() {
        let dir = TempDir::new("open-buffered");
        let path = dir.path().join("image");
        std::fs::write(&path, b"x").expect("write image");
        let file = File::open(&path).expect("open");
        assert!(!is_direct(&file).expect("fcntl"));
    }

    #[test]
    fn open_missing_file_names_path() {
        let dir = TempDir::new("open-missing");
        let path = dir.path().join("missing");
        let error = open(&path, false, false).expect_err("missing file");
        assert!(
            matches!(&error, IoError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(error.to_string().contains("missing"), "{error}");
    }

    #[test]
    fn probe_rejects_character_device() {
        let file = File::open("/dev/null").expect("open /dev/null");
        assert!(matches!(probe(&file), Err(IoError::UnsupportedFileType)));
    }
}
