//! Files a user names as input (a config file, a change list, Cinder volume metadata, a key or
//! passphrase file), read one way: a regular file or a pipe (`<(rbd diff ...)`, `/dev/stdin`),
//! never a directory or a device (a device could block, have effects, or never end), and at most
//! a stated number of bytes, so a wrong path (a disk image, `/dev/zero`) is a clear refusal
//! (exit 2) instead of a process that fills memory. Secret files are warned about when other
//! users may read or replace them.

use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;

use super::output::Output;
use crate::error::{EngineError, ErrorKind};

fn usage(message: String) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

/// How many bytes `max_bytes` is, for messages.
fn shown_size(max_bytes: u64) -> String {
    match max_bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Reads the file at `path` (`what` names it in messages, e.g. `--changed-ranges`): a regular
/// file or a pipe of at most `max_bytes` bytes.
///
/// # Errors
/// `Usage`, naming `what` and the path, when it cannot be read, is another kind of file, or
/// holds more than `max_bytes` bytes (`too_large` says what to do instead). Messages never quote
/// the contents.
pub fn read_bounded(
    path: &Path,
    what: &str,
    max_bytes: u64,
    too_large: &str,
) -> Result<Vec<u8>, EngineError> {
    let shown = path.display();
    let cannot = |error: std::io::Error| usage(format!("{what}: cannot read {shown}: {error}"));
    // Checked before opening: opening a device could block or have effects.
    let kind = std::fs::metadata(path).map_err(cannot)?.file_type();
    if !kind.is_file() && !kind.is_fifo() {
        return Err(usage(format!("{what}: {shown} is neither a regular file nor a pipe")));
    }
    let mut bytes = Vec::new();
    let file = std::fs::File::open(path).map_err(cannot)?;
    let _ = file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(cannot)?;
    if bytes.len() as u64 > max_bytes {
        let limit = shown_size(max_bytes);
        return Err(usage(format!("{what}: {shown} holds more than {limit}; {too_large}")));
    }
    Ok(bytes)
}

/// [`read_bounded`], as UTF-8 text.
///
/// # Errors
/// `read_bounded`'s, and `Usage` for bytes that are not UTF-8.
pub fn read_bounded_text(
    path: &Path,
    what: &str,
    max_bytes: u64,
    too_large: &str,
) -> Result<String, EngineError> {
    let bytes = read_bounded(path, what, max_bytes, too_large)?;
    String::from_utf8(bytes)
        .map_err(|_| usage(format!("{what}: {} is not UTF-8 text", path.display())))
}

/// Warns on `output` when the regular file at `path` (a `kind` named by `what`), holding a
/// secret, may be read or written by users other than its owner (`consequence`: what such a
/// user could do), as ssh refuses such a private key. Ferry still uses it, so that a mode never
/// stops a job.
pub fn warn_if_shared(path: &Path, what: &str, kind: &str, consequence: &str, output: &Output) {
    let Ok(metadata) = std::fs::metadata(path) else { return };
    let mode = metadata.permissions().mode() & 0o777;
    if metadata.file_type().is_file() && mode & 0o077 != 0 {
        let shown = path.display();
        output.warning(&format!(
            "{what}: {kind} {shown} has mode {mode:o}, so other users may read or replace it, \
             and {consequence}: `chmod 600 {shown}`"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A file within the bound is read whole; one byte more is refused, naming the bound and the
    /// advice; a directory and a device are refused unread; bytes that are not UTF-8 are
    /// refused as text.
    #[test]
    fn reads_within_bounds_and_refuses_the_rest() {
        let dir = scratch("bounds");
        let file = dir.join("f");
        std::fs::write(&file, vec![b'x'; 1024]).unwrap();
        assert_eq!(read_bounded(&file, "--x", 1024, "advice").unwrap().len(), 1024);
        let error = read_bounded(&file, "--x", 1023, "use less").unwrap_err();
        assert_eq!(error.kind, ErrorKind::Usage);
        assert!(error.message.contains("more than 1023 bytes; use less"), "{}", error.message);
        assert!(error.message.starts_with("--x: "), "{}", error.message);
        std::fs::write(&file, vec![b'x'; 2048]).unwrap();
        let error = read_bounded(&file, "--x", 1024, "advice").unwrap_err();
        assert!(error.message.contains("more than 1 KiB"), "{}", error.message);
        let error = read_bounded(&dir, "--x", 1024, "advice").unwrap_err();
        assert!(error.message.contains("neither a regular file nor a pipe"), "{}", error.message);
        let error = read_bounded(Path::new("/dev/zero"), "--x", 1 << 20, "a").unwrap_err();
        assert!(error.message.contains("neither a regular file nor a pipe"), "{}", error.message);
        let error = read_bounded(&dir.join("missing"), "--x", 1024, "a").unwrap_err();
        assert!(error.message.contains("cannot read"), "{}", error.message);
        std::fs::write(&file, [0xff, 0xfe, b'a']).unwrap();
        let error = read_bounded_text(&file, "--x", 1024, "advice").unwrap_err();
        assert!(error.message.contains("not UTF-8"), "{}", error.message);
        assert!(!error.message.contains('\u{fffd}'), "{}", error.message);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
