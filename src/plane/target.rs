//! The target side of a restore: checks before anything is written (type, size, `--force`), one
//! pinned writer thread with its own ring (holes as `WriteOp::Zero`), the bytes outside whole
//! logical blocks written with plain writes at the end, and the final sync.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::{Receiver, Sender};

use super::{JobControl, lock};
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, WriteOp};

/// A checked, opened, probed target.
#[derive(Debug)]
pub struct Target {
    /// The path it was opened at.
    pub path: PathBuf,
    /// The open file and whether O_DIRECT is in effect.
    pub opened: io::OpenedFile,
    /// Its size and alignment.
    pub info: io::DeviceInfo,
    /// Whether this restore created the file.
    pub created: bool,
    /// Whether it reads as zeros (created, or an empty file extended), so holes need no writes.
    pub reads_as_zeros: bool,
}

impl Target {
    /// Removes the file if this restore created it: a failed restore leaves no file that looks
    /// like a volume behind.
    pub fn discard_if_created(&self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Whether holes may be skipped: the target reads as zeros, or `--sparse` says a block device
    /// does. `--sparse` onto a regular file that holds data is refused: ferry knows it does not
    /// read as zeros, and skipping holes would leave old data where the backup has zeros.
    ///
    /// # Errors
    /// `Usage` for `--sparse` onto a regular file holding data.
    pub fn skip_holes(&self, sparse_requested: bool) -> Result<bool, EngineError> {
        if sparse_requested && !self.reads_as_zeros && !self.info.is_block_device {
            self.discard_if_created();
            return Err(EngineError::new(
                ErrorKind::Usage,
                format!(
                    "--sparse skips zero chunks, but target {} holds data that would stay where \
                     the backup has zeros; drop --sparse",
                    self.path.display()
                ),
            ));
        }
        Ok(sparse_requested || self.reads_as_zeros)
    }
}

fn device_error(path: &Path, step: &str, error: &std::io::Error) -> EngineError {
    EngineError::new(ErrorKind::Device, format!("{step} target {}: {error}", path.display()))
}

/// Refuses a read-only block device (`Device`), and a block device the system holds (mounted, part of a RAID or device-mapper table,
/// or opened exclusively by another program): `O_EXCL` on a block device fails with `EBUSY`
/// then, and writing under a mounted file system would corrupt it.
fn check_not_busy(path: &Path) -> Result<(), EngineError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // A read-only device accepts an open for writing and fails every write: say so first.
    if let Ok(metadata) = std::fs::metadata(path) {
        let dev = metadata.rdev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let flag = format!("/sys/dev/block/{major}:{minor}/ro");
        if std::fs::read_to_string(&flag).is_ok_and(|text| text.trim() == "1") {
            return Err(EngineError::new(
                ErrorKind::Device,
                format!("target {} is a read-only block device ({flag} is 1)", path.display()),
            ));
        }
    }
    match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_EXCL).open(path) {
        Err(error) if error.raw_os_error() == Some(libc::EBUSY) => Err(EngineError::new(
            ErrorKind::Refused,
            format!(
                "target {} is in use by the system (mounted, or held by another program): \
                 {error}; unmount or release it first",
                path.display()
            ),
        )),
        Err(error) => Err(device_error(path, "opening", &error)),
        Ok(_) => Ok(()),
    }
}

/// Checks `path` and opens it for writing `needed` bytes: a missing file is created at that size;
/// a regular file holding data, or a block device, needs `force`; a shorter regular file is
/// extended; anything else is refused. Nothing is written here.
///
/// # Errors
/// `Refused` for data without `force` or a device smaller than `needed`; `Usage` for a path that
/// is neither a regular file nor a block device; `Device` when it cannot be opened or sized.
pub fn prepare_target(
    path: &Path,
    needed: u64,
    force: bool,
    warn: &dyn Fn(String),
) -> Result<Target, EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let refused = |message: String| EngineError::new(ErrorKind::Refused, message);
    let open = |create: bool| {
        io::open(path, true, create)
            .map_err(|error| EngineError::from(error).context(format!("target {shown}")))
    };
    let (opened, created, reads_as_zeros) = match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => (open(true)?, true, true),
        Err(error) => return Err(device_error(path, "checking", &error)),
        Ok(metadata) if metadata.file_type().is_file() => {
            let length = metadata.len();
            if length > 0 && !force {
                return Err(refused(format!(
                    "target {shown} already holds {length} bytes; pass --force to overwrite it"
                )));
            }
            if length > needed {
                warn(format!(
                    "target {shown} is {length} bytes; the backup covers the first {needed}, the \
                     rest is left as it is"
                ));
            }
            let opened = open(false)?;
            let reads_as_zeros = length == 0 || !io::holds_data(&opened.file);
            (opened, false, reads_as_zeros)
        }
        Ok(metadata) if metadata.file_type().is_block_device() => {
            if !force {
                return Err(refused(format!(
                    "target {shown} is a block device; pass --force to overwrite it"
                )));
            }
            check_not_busy(path)?;
            (open(false)?, false, false)
        }
        Ok(_) => {
            return Err(EngineError::new(
                ErrorKind::Usage,
                format!("target {shown} is neither a regular file nor a block device"),
            ));
        }
    };
    // An exclusive lock for the job's length: a running ferry backup holds a shared one on its
    // source, and another restore an exclusive one on its target.
    if let Err(std::fs::TryLockError::WouldBlock) = opened.file.try_lock() {
        return Err(refused(format!(
            "target {shown} is in use by another ferry job (a backup reading it or a restore \
             writing it); it is never overwritten, --force or not"
        )));
    }
    let metadata = opened.file.metadata().map_err(|e| device_error(path, "checking", &e))?;
    if metadata.file_type().is_file() && metadata.len() < needed {
        opened.file.set_len(needed).map_err(|e| device_error(path, "sizing", &e))?;
    }
    let info = io::probe(&opened.file)
        .map_err(|error| EngineError::from(error).context(format!("target {shown}")))?;
    let target = Target { path: path.to_path_buf(), opened, info, created, reads_as_zeros };
    if info.size_bytes < needed {
        target.discard_if_created();
        return Err(refused(format!(
            "target {shown} has {} bytes, the backup needs {needed}",
            info.size_bytes
        )));
    }
    if !target.opened.direct {
        warn(format!("{shown}: O_DIRECT refused, writing through the page cache"));
    }
    Ok(target)
}

/// Spawns the writer of `target`: one pinned thread with its own ring, writing ops from `ops_rx`
/// and returning buffers on `free_tx`. Both channel ends are dropped when it ends, so blocked
/// producers see a disconnected channel instead of waiting forever. Returns what it wrote, or
/// `None` after recording its failure in `control` (or stopping it, when cancelled).
pub fn spawn_writer<'scope>(
    scope: &'scope Scope<'scope, '_>,
    target: &'scope Target,
    options: io::WriteOptions,
    ops_rx: Receiver<WriteOp>,
    free_tx: Sender<AlignedBuf>,
    control: &'scope JobControl,
) -> ScopedJoinHandle<'scope, Option<io::WriteStats>> {
    scope.spawn(move || {
        let _ = io::pin_current_thread(None);
        let result = io::write_target(
            &target.opened.file,
            &target.info,
            &options,
            &ops_rx,
            &free_tx,
            control.flag(),
        );
        drop((ops_rx, free_tx));
        match result {
            Ok(stats) => Some(stats),
            Err(io::IoError::Cancelled) => {
                control.stop();
                None
            }
            Err(error) => {
                let context = format!("target {}", target.path.display());
                control.fail(EngineError::from(error).context(context));
                None
            }
        }
    })
}

/// Bytes outside whole logical blocks (the unaligned tail of a volume, the edges of a range),
/// collected while the O_DIRECT writer runs and written with plain writes after it.
#[derive(Debug, Default)]
pub struct Edges {
    pieces: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Edges {
    /// Splits `[offset, offset + bytes.len())` at logical-block boundaries of `block` bytes: keeps
    /// the unaligned head and tail here and returns the aligned middle as `(offset, range)` of
    /// `bytes` (empty when there is none).
    pub fn split(&self, offset: u64, bytes: &[u8], block: u64) -> (u64, std::ops::Range<usize>) {
        let end = offset + bytes.len() as u64;
        let inner_start = offset.next_multiple_of(block).min(end);
        let inner_end = (end / block * block).max(inner_start);
        for (from, to) in [(offset, inner_start), (inner_end, end)] {
            if from < to {
                self.push(from, bytes[(from - offset) as usize..(to - offset) as usize].to_vec());
            }
        }
        (inner_start, (inner_start - offset) as usize..(inner_end - offset) as usize)
    }

    /// Keeps `bytes` for `offset`.
    pub fn push(&self, offset: u64, bytes: Vec<u8>) {
        lock(&self.pieces).push((offset, bytes));
    }

    /// Writes the kept bytes with plain writes and syncs the target (the writer has synced what it
    /// wrote); nothing to do when none were kept.
    ///
    /// # Errors
    /// `Device`, naming the target and the cause.
    pub fn write(&self, target: &Path) -> Result<(), EngineError> {
        let pieces = std::mem::take(&mut *lock(&self.pieces));
        if pieces.is_empty() {
            return Ok(());
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|e| device_error(target, "opening", &e))?;
        for (offset, bytes) in pieces {
            file.write_all_at(&bytes, offset).map_err(|e| device_error(target, "writing", &e))?;
        }
        file.sync_all().map_err(|e| device_error(target, "syncing", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_keep_unaligned_ends() {
        let edges = Edges::default();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (offset, middle) = edges.split(1000, &bytes, 4096);
        assert_eq!(offset, 4096);
        assert_eq!(middle, 3096..7192);
        let kept = lock(&edges.pieces).clone();
        assert_eq!(kept[0], (1000, bytes[..3096].to_vec()));
        assert_eq!(kept[1], (8192, bytes[7192..].to_vec()));
        let edges = Edges::default();
        let (_, middle) = edges.split(8192, &bytes[..100], 4096);
        assert!(middle.is_empty());
        assert_eq!(lock(&edges.pieces).len(), 1);
    }

    #[test]
    fn refuses_data_without_force_and_creates_missing_files() {
        let dir = std::env::temp_dir().join(format!("ferry-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        std::fs::write(&path, b"data").unwrap();
        let error = prepare_target(&path, 8192, false, &|_| {}).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Refused);
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let fresh = dir.join("fresh");
        let target = prepare_target(&fresh, 8192, false, &|_| {}).unwrap();
        assert!(target.created && target.reads_as_zeros);
        assert_eq!(std::fs::metadata(&fresh).unwrap().len(), 8192);
        target.discard_if_created();
        assert!(!fresh.exists());
        let error = prepare_target(&dir, 1, true, &|_| {}).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Usage);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file that is one hole reads as zeros, so `--sparse` is accepted onto it; one data byte
    /// anywhere and `--sparse` is refused (a filesystem without `SEEK_DATA` refuses both, which is
    /// the safe side, so the first half only runs where holes are reported).
    #[test]
    fn sparse_onto_a_hole_file_only() {
        let dir = std::env::temp_dir().join(format!("ferry-target-holes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let target = prepare_target(&path, 1 << 20, true, &|_| {}).unwrap();
        let reports_holes = !io::holds_data(&target.opened.file);
        assert_eq!(target.reads_as_zeros, reports_holes);
        if reports_holes {
            assert!(target.skip_holes(true).unwrap());
        }
        drop(target);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"x", 700_000)
            .unwrap();
        let target = prepare_target(&path, 1 << 20, true, &|_| {}).unwrap();
        assert!(!target.reads_as_zeros);
        assert_eq!(target.skip_holes(true).unwrap_err().kind, ErrorKind::Usage);
        assert!(!target.skip_holes(false).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
