//! The source side of a backup: a checked open (regular file or block device only, so a FIFO or
//! a directory is refused before `open` can block on it), O_DIRECT with a logged fallback, the
//! probe, one pinned reader thread per source, and the `--limit-read` pacer.

use std::path::{Path, PathBuf};
use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::{Receiver, Sender, bounded};

use super::JobControl;
use crate::error::{EngineError, ErrorKind};
use crate::io::{self, AlignedBuf, ReadChunk};
use crate::throttle::Throttle;

/// An opened, probed source.
#[derive(Debug)]
pub struct Source {
    /// The path it was opened at.
    pub path: PathBuf,
    /// The open file and whether O_DIRECT is in effect.
    pub opened: io::OpenedFile,
    /// Its size and alignment.
    pub info: io::DeviceInfo,
}

impl Source {
    /// Warns when the source is larger now than when the backup started: the backup holds its
    /// first size only (a block device resized, an image file still being written).
    pub fn warn_if_grown(&self, warn: &dyn Fn(String)) {
        if let Ok(now) = io::probe(&self.opened.file)
            && now.size_bytes > self.info.size_bytes
        {
            warn(format!(
                "source {} grew from {} to {} bytes during the backup; the backup holds the first \
                 {} bytes only",
                self.path.display(),
                self.info.size_bytes,
                now.size_bytes,
                self.info.size_bytes
            ));
        }
    }
}

/// Checks that `path` is a regular file or a block device, opens it read-only with O_DIRECT
/// (through the page cache, with a warning, where O_DIRECT is refused) and probes it.
///
/// # Errors
/// `Usage` for a path that is neither a regular file nor a block device; `Refused` while a ferry
/// restore writes it; `Device` when it cannot be opened or probed. Every message names the path.
pub fn open_source(path: &Path, warn: &dyn Fn(String)) -> Result<Source, EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|error| EngineError::new(ErrorKind::Device, format!("source {shown}: {error}")))?;
    let file_type = metadata.file_type();
    if !(file_type.is_file() || file_type.is_block_device()) {
        let kind = if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!("source {shown} is {kind}; ferry reads block devices and regular image files"),
        ));
    }
    let opened = io::open(path, false, false)
        .map_err(|error| EngineError::from(error).context(format!("source {shown}")))?;
    // A shared lock for the job's length: a ferry restore takes an exclusive one on its target,
    // so neither can overwrite what the other is reading (a lock another program holds is none
    // of ours: advisory locks bind only processes that ask).
    if let Err(std::fs::TryLockError::WouldBlock) = opened.file.try_lock_shared() {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!("source {shown} is being written by a running ferry restore"),
        ));
    }
    if !opened.direct {
        warn(format!("{shown}: O_DIRECT refused, reading through the page cache"));
    }
    let info = io::probe(&opened.file)
        .map_err(|error| EngineError::from(error).context(format!("source {shown}")))?;
    Ok(Source { path: path.to_path_buf(), opened, info })
}

/// The read options for `source` in `chunk_bytes` chunks: request size and depth measured per
/// device kind (`io::read_shape`), unless the caller chose a depth.
pub fn read_options(
    source: &Source,
    engine: io::Engine,
    chunk_bytes: usize,
    queue_depth: Option<usize>,
) -> io::ReadOptions {
    let shape = io::read_shape(&source.opened.file, &source.info, chunk_bytes);
    io::ReadOptions {
        engine,
        chunk_size_bytes: chunk_bytes,
        request_size_bytes: shape.request_size_bytes,
        queue_depth: queue_depth.unwrap_or(shape.queue_depth),
    }
}

/// Spawns the reader of `source`: one thread, pinned to a CPU (readers spread round-robin), its
/// own ring, filling buffers from `free_rx` and sending chunks on `chunk_tx` (closed when it
/// ends). Returns the engine that ran, or `None` after recording its failure in `control`.
pub fn spawn_reader<'scope>(
    scope: &'scope Scope<'scope, '_>,
    source: &'scope Source,
    options: io::ReadOptions,
    free_rx: Receiver<AlignedBuf>,
    chunk_tx: Sender<ReadChunk>,
    control: &'scope JobControl,
) -> ScopedJoinHandle<'scope, Option<io::Engine>> {
    spawn_reader_of(scope, source, options, None, free_rx, chunk_tx, control)
}

/// [`spawn_reader`] reading only the chunks `chunks` lists when it is given (an incremental
/// backup: `io::read_source_chunks`).
pub fn spawn_reader_of<'scope>(
    scope: &'scope Scope<'scope, '_>,
    source: &'scope Source,
    options: io::ReadOptions,
    chunks: Option<&'scope [u64]>,
    free_rx: Receiver<AlignedBuf>,
    chunk_tx: Sender<ReadChunk>,
    control: &'scope JobControl,
) -> ScopedJoinHandle<'scope, Option<io::Engine>> {
    scope.spawn(move || {
        let _ = io::pin_current_thread(None);
        let (file, info, flag) = (&source.opened.file, &source.info, control.flag());
        let result = match chunks {
            Some(chunks) => {
                io::read_source_chunks(file, info, &options, chunks, &free_rx, &chunk_tx, flag)
            }
            None => io::read_source(file, info, &options, &free_rx, &chunk_tx, flag),
        };
        drop(chunk_tx);
        match result {
            Ok(stats) => Some(stats.engine),
            Err(error) => {
                let context = format!("source {}", source.path.display());
                control.fail(EngineError::from(error).context(context));
                None
            }
        }
    })
}

/// `--limit-read`: with a rate, a pacer thread hands free buffers to the readers at that many
/// bytes per second (no burst), so every read request waits its turn instead of the pool filling
/// at full speed; without one, the pool itself.
pub fn pace_reads<'scope>(
    scope: &'scope Scope<'scope, '_>,
    free_rx: &Receiver<AlignedBuf>,
    rate_bytes_per_sec: Option<u64>,
    chunk_bytes: u64,
    control: &'scope JobControl,
) -> Receiver<AlignedBuf> {
    let Some(rate) = rate_bytes_per_sec else { return free_rx.clone() };
    let (paced_tx, paced_rx) = bounded::<AlignedBuf>(1);
    let free_rx = free_rx.clone();
    let _ = scope.spawn(move || {
        let limit = Throttle::new(rate, 0);
        while let Ok(buf) = free_rx.recv() {
            limit.take(chunk_bytes, control.flag());
            if control.stopped() || paced_tx.send(buf).is_err() {
                break;
            }
        }
    });
    paced_rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_file_or_block_device_naming_it() {
        let dir = std::env::temp_dir().join(format!("ferry-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let error = open_source(&dir, &|_| {}).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Usage);
        assert!(error.message.contains("is a directory"), "{}", error.message);
        assert!(error.message.contains(&dir.display().to_string()));
        let error = open_source(Path::new("/dev/null"), &|_| {}).unwrap_err();
        assert!(error.message.contains("character device"), "{}", error.message);
        let missing = dir.join("missing");
        let error = open_source(&missing, &|_| {}).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Device);
        assert!(error.message.contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
