//! `LocalStore`: an object store in a local directory, the "embedded default" repository.
//!
//! Every object is a file under the root directory; a key's `/` separators become
//! subdirectories. Writes are atomic and durable: the bytes go to a temporary file in the target
//! directory (named `.ferry-tmp-<hex>`), which is fsynced, renamed over the key and followed by
//! an fsync of the directory, so a reader sees either the old or the new object, never a torn
//! one. Multipart uploads keep their parts under `<root>/.multipart/<upload-id>/` (with the target
//! key in a `key` file) until completion concatenates them into the object.
//!
//! This module deliberately does not lock anything (concurrent writers of one key race, the last
//! rename wins, as on S3), does not follow symlinks in listings, does not clean up empty
//! directories after deletes, and does not garbage-collect temporary files left by a crash
//! (they never appear in listings).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId,
};

/// Directory under the root that holds multipart uploads in progress.
const MULTIPART_DIR: &str = ".multipart";
/// Name prefix of temporary files; never part of a valid key, never listed.
const TEMP_PREFIX: &str = ".ferry-tmp-";
/// File in an upload directory that records the target key.
const UPLOAD_KEY_FILE: &str = "key";
/// Highest part number S3 allows; kept here so both stores accept the same input.
const MAX_PART_NUMBER: u32 = 10_000;

/// An object store in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens the store rooted at `root`, creating the directory (and its parents) if missing.
    ///
    /// # Errors
    /// `StoreError::Config` when `root` is empty or cannot be created, or is not a directory.
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalStore, StoreError> {
        let root = root.into();
        if root.as_os_str().is_empty() {
            return Err(StoreError::Config("local repository path is empty".to_owned()));
        }
        fs::create_dir_all(&root).map_err(|error| {
            StoreError::Config(format!(
                "cannot create repository directory {}: {error}",
                root.display()
            ))
        })?;
        let metadata = fs::metadata(&root).map_err(|error| {
            StoreError::Config(format!(
                "cannot access repository directory {}: {error}",
                root.display()
            ))
        })?;
        if !metadata.is_dir() {
            return Err(StoreError::Config(format!(
                "repository path {} is not a directory",
                root.display()
            )));
        }
        Ok(LocalStore { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `key`, after validating it.
    fn object_path(&self, operation: &'static str, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(operation, key)?;
        Ok(self.root.join(key))
    }

    /// The directory of an upload, after validating the id.
    fn upload_dir(
        &self,
        operation: &'static str,
        key: &str,
        upload_id: &UploadId,
    ) -> Result<PathBuf, StoreError> {
        let id = &upload_id.0;
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(failed(operation, key, format!("invalid upload id {id:?}")));
        }
        Ok(self.root.join(MULTIPART_DIR).join(id))
    }

    /// Opens an existing upload directory and checks that it belongs to `key`.
    fn existing_upload(
        &self,
        operation: &'static str,
        key: &str,
        upload_id: &UploadId,
    ) -> Result<PathBuf, StoreError> {
        validate_key(operation, key)?;
        let dir = self.upload_dir(operation, key, upload_id)?;
        let key_path = dir.join(UPLOAD_KEY_FILE);
        let recorded = match fs::read_to_string(&key_path) {
            Ok(recorded) => recorded,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(failed(operation, key, format!("no such upload {}", upload_id.0)));
            }
            Err(error) => return Err(io_failed(operation, key, &key_path, &error)),
        };
        if recorded != key {
            return Err(failed(
                operation,
                key,
                format!("upload {} belongs to key {recorded:?}", upload_id.0),
            ));
        }
        Ok(dir)
    }
}

impl ObjectStore for LocalStore {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        const OP: &str = "put";
        let path = self.object_path(OP, key)?;
        write_atomic(OP, key, &self.root, &path, &[&data])
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        const OP: &str = "get";
        let path = self.object_path(OP, key)?;
        match fs::read(&path) {
            Ok(data) => Ok(Bytes::from(data)),
            Err(error) => Err(io_error(OP, key, &path, &error)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        const OP: &str = "get_range";
        let path = self.object_path(OP, key)?;
        let mut file = File::open(&path).map_err(|error| io_error(OP, key, &path, &error))?;
        let wanted = usize::try_from(length)
            .map_err(|_| failed(OP, key, format!("range length {length} too large")))?;
        // Read into spare capacity: a zero-filled buffer would cost a memset of every range.
        let mut buffer = Vec::with_capacity(wanted);
        let _ =
            file.seek(SeekFrom::Start(offset)).map_err(|error| io_error(OP, key, &path, &error))?;
        let filled = (&mut file)
            .take(length)
            .read_to_end(&mut buffer)
            .map_err(|error| io_error(OP, key, &path, &error))?;
        if filled < wanted {
            return Err(StoreError::ShortRead {
                key: key.to_owned(),
                offset,
                wanted: length,
                got: filled as u64,
            });
        }
        Ok(Bytes::from(buffer))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_range(prefix, KeyRange::ALL)
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.list_dated_range(prefix, KeyRange::ALL)
    }

    /// Walks only the directories that can hold a key of `prefix` in `range`.
    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        const OP: &str = "list";
        // Start the walk at the deepest directory the prefix names, when it is a plain path.
        let (start_rel, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start_rel = if validate_key(OP, start_rel).is_ok() { start_rel } else { "" };
        let mut found = Vec::new();
        let start =
            if start_rel.is_empty() { self.root.clone() } else { self.root.join(start_rel) };
        let within = Within { prefix, range };
        walk(OP, &within, &start, start_rel, start_rel.is_empty(), &mut found)?;
        found.retain(|info| within.holds(&info.key));
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// The modification time is the file's mtime: the clock of the host that holds the
    /// directory, which is this store's server clock.
    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        const OP: &str = "list";
        let mut dated = Vec::new();
        for info in self.list_range(prefix, range)? {
            let path = self.object_path(OP, &info.key)?;
            let modified = match fs::metadata(&path).and_then(|meta| meta.modified()) {
                Ok(modified) => modified,
                // Deleted since the listing.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io_failed(OP, &info.key, &path, &error)),
            };
            let modified_unix = modified
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| failed(OP, &info.key, "modification time before 1970".into()))?
                .as_secs();
            dated.push(DatedObject { key: info.key, size_bytes: info.size_bytes, modified_unix });
        }
        Ok(dated)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        const OP: &str = "delete";
        let path = self.object_path(OP, key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io_failed(OP, key, &path, &error)),
        }
        let parent = path.parent().unwrap_or(&self.root);
        sync_dir(parent).map_err(|error| io_failed(OP, key, parent, &error))
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        const OP: &str = "multipart_begin";
        validate_key(OP, key)?;
        let area = self.root.join(MULTIPART_DIR);
        ensure_dir(&self.root, &area).map_err(|error| io_failed(OP, key, &area, &error))?;
        let upload_id = UploadId(random_hex(OP, key, 16)?);
        let dir = self.upload_dir(OP, key, &upload_id)?;
        fs::create_dir(&dir).map_err(|error| io_failed(OP, key, &dir, &error))?;
        sync_dir(&area).map_err(|error| io_failed(OP, key, &area, &error))?;
        let key_path = dir.join(UPLOAD_KEY_FILE);
        write_atomic(OP, key, &dir, &key_path, &[key.as_bytes()])?;
        Ok(upload_id)
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        const OP: &str = "multipart_put_part";
        check_part_number(OP, key, part_number)?;
        let dir = self.existing_upload(OP, key, upload_id)?;
        let etag = etag_of(&data);
        let part_path = dir.join(part_file_name(part_number, &etag));
        write_atomic(OP, key, &dir, &part_path, &[&data])?;
        // A part uploaded again replaces the earlier one (whose receipt is then stale).
        let stored =
            part_etags(&dir, part_number).map_err(|error| io_failed(OP, key, &dir, &error))?;
        for old in stored.iter().filter(|old| **old != etag) {
            let _ = fs::remove_file(dir.join(part_file_name(part_number, old)));
        }
        Ok(PartReceipt { part_number, etag, checksum_crc32c: None })
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        const OP: &str = "multipart_complete";
        let dir = self.existing_upload(OP, key, upload_id)?;
        if parts.is_empty() {
            return Err(failed(OP, key, "no parts to complete the upload with".to_owned()));
        }
        let mut paths = Vec::with_capacity(parts.len());
        let mut previous = 0_u32;
        for receipt in parts {
            check_part_number(OP, key, receipt.part_number)?;
            if receipt.part_number <= previous {
                return Err(failed(
                    OP,
                    key,
                    format!("part numbers not strictly increasing at part {}", receipt.part_number),
                ));
            }
            previous = receipt.part_number;
            // The part's file is named by the etag it was stored with (as S3 keeps each part's
            // ETag), so a stale receipt finds no file and nothing is read to compare.
            // Only hex names a file: a receipt's etag never becomes a path of its own.
            let hex =
                !receipt.etag.is_empty() && receipt.etag.bytes().all(|b| b.is_ascii_hexdigit());
            let part_path = dir.join(part_file_name(receipt.part_number, &receipt.etag));
            if !hex || !part_path.is_file() {
                let stored = part_etags(&dir, receipt.part_number)
                    .map_err(|error| io_failed(OP, key, &dir, &error))?;
                let why = if !stored.is_empty() {
                    format!("part {} does not match its etag {}", receipt.part_number, receipt.etag)
                } else {
                    format!("part {} was never uploaded", receipt.part_number)
                };
                return Err(failed(OP, key, why));
            }
            paths.push(part_path);
        }
        let path = self.object_path(OP, key)?;
        // Copied file to file (copy_file_range), never through this process's memory.
        write_atomic_with(OP, key, &self.root, &path, |file| {
            for part in &paths {
                let _ = io::copy(&mut fs::File::open(part)?, file)?;
            }
            Ok(())
        })?;
        fs::remove_dir_all(&dir).map_err(|error| io_failed(OP, key, &dir, &error))
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        const OP: &str = "multipart_abort";
        validate_key(OP, key)?;
        let dir = self.upload_dir(OP, key, upload_id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_failed(OP, key, &dir, &error)),
        }
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        const OP: &str = "multipart_list";
        let area = self.root.join(MULTIPART_DIR);
        let entries = match fs::read_dir(&area) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_failed(OP, prefix, &area, &error)),
        };
        let mut uploads = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| io_failed(OP, prefix, &area, &error))?;
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else { continue };
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let key_path = entry.path().join(UPLOAD_KEY_FILE);
            let key = match fs::read_to_string(&key_path) {
                Ok(key) => key,
                // Being created or removed right now.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io_failed(OP, prefix, &key_path, &error)),
            };
            if key.starts_with(prefix) {
                let initiated_unix = fs::metadata(&key_path)
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|elapsed| elapsed.as_secs());
                uploads.push(PendingUpload { key, upload_id: UploadId(id), initiated_unix });
            }
        }
        uploads.sort_by(|a, b| (&a.key, &a.upload_id.0).cmp(&(&b.key, &b.upload_id.0)));
        Ok(uploads)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Checks that `key` is a relative path of non-empty, non-special segments that cannot escape
/// the root or collide with the store's internal files.
fn validate_key(operation: &'static str, key: &str) -> Result<(), StoreError> {
    let problem = if key.is_empty() {
        Some("empty key")
    } else if key.starts_with('/') {
        Some("absolute key")
    } else if key.contains('\0') {
        Some("key contains a NUL byte")
    } else if key.split('/').any(str::is_empty) {
        Some("empty path segment")
    } else if key.split('/').any(|segment| segment == "." || segment == "..") {
        Some("'.' or '..' segment")
    } else if key.split('/').any(|segment| segment.starts_with(TEMP_PREFIX)) {
        Some("segment uses the reserved temporary-file prefix")
    } else if key.split('/').next() == Some(MULTIPART_DIR) {
        Some("key lies in the reserved multipart area")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(failed(operation, key, format!("invalid key: {problem}"))),
        None => Ok(()),
    }
}

fn check_part_number(
    operation: &'static str,
    key: &str,
    part_number: u32,
) -> Result<(), StoreError> {
    if part_number == 0 || part_number > MAX_PART_NUMBER {
        return Err(failed(
            operation,
            key,
            format!("part number {part_number} outside 1..={MAX_PART_NUMBER}"),
        ));
    }
    Ok(())
}

/// What the file of part `part_number` is named with, before its etag.
fn part_file_prefix(part_number: u32) -> String {
    format!("part-{part_number:05}.")
}

/// The etags part `part_number` has files for in upload directory `dir`.
fn part_etags(dir: &Path, part_number: u32) -> io::Result<Vec<String>> {
    let prefix = part_file_prefix(part_number);
    let mut etags = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(etag) = entry?.file_name().to_str().and_then(|name| name.strip_prefix(&prefix))
        {
            etags.push(etag.to_owned());
        }
    }
    Ok(etags)
}

/// The file of part `part_number` stored with `etag`.
fn part_file_name(part_number: u32, etag: &str) -> String {
    format!("{}{etag}", part_file_prefix(part_number))
}

/// The ETag of a part: its xxh3-128, so completion can detect a receipt that does not match the
/// stored part.
fn etag_of(data: &[u8]) -> String {
    format!("{:032x}", twox_hash::XxHash3_128::oneshot(data))
}

fn random_hex(operation: &'static str, key: &str, bytes: usize) -> Result<String, StoreError> {
    let mut raw = vec![0_u8; bytes];
    getrandom::fill(&mut raw)
        .map_err(|error| failed(operation, key, format!("cannot get random bytes: {error}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the concatenation of `chunks` to `path` atomically: temporary file in the same
/// directory, fsync, rename, fsync of the directory. Creates missing parent directories (below
/// `root`) durably.
fn write_atomic(
    operation: &'static str,
    key: &str,
    root: &Path,
    path: &Path,
    chunks: &[&[u8]],
) -> Result<(), StoreError> {
    write_atomic_with(operation, key, root, path, |file| {
        chunks.iter().try_for_each(|chunk| file.write_all(chunk))
    })
}

/// `write_atomic` of what `fill` writes into the temporary file.
fn write_atomic_with(
    operation: &'static str,
    key: &str,
    root: &Path,
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(root);
    ensure_dir(root, dir).map_err(|error| io_failed(operation, key, dir, &error))?;
    let temp = dir.join(format!("{TEMP_PREFIX}{}", random_hex(operation, key, 8)?));
    let result = (|| -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&temp)?;
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if let Err(error) = result {
        let _ = fs::remove_file(&temp);
        return Err(io_failed(operation, key, path, &error));
    }
    sync_dir(dir).map_err(|error| io_failed(operation, key, dir, &error))
}

/// Creates `dir` and any missing ancestors below `root`, fsyncing each parent that gained an
/// entry so the new directories survive a crash.
fn ensure_dir(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != root
        && parent.starts_with(root)
    {
        ensure_dir(root, parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another thread created it first.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(error) => return Err(error),
    }
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Recursively collects regular files under `dir` whose key is `rel/...`.
/// What a listing keeps: keys under `prefix`, in `range`.
struct Within<'a> {
    prefix: &'a str,
    range: KeyRange<'a>,
}

impl Within<'_> {
    fn holds(&self, key: &str) -> bool {
        key.starts_with(self.prefix) && self.range.contains(key)
    }

    /// Whether the directory `dir` (a key prefix without its `/`) may hold a key this listing
    /// keeps. Its keys all start with `dir/`: they sort after `dir/` itself and before
    /// `dir0` (`0` follows `/`).
    fn may_hold_under(&self, dir: &str) -> bool {
        let below = format!("{dir}/");
        // Every key under `dir` is <= start_after only if start_after is past them all.
        let all_before =
            self.range.start_after > below.as_str() && !self.range.start_after.starts_with(&below);
        let all_after = self.range.end.is_some_and(|end| end <= below.as_str());
        let under_prefix = below.starts_with(self.prefix) || self.prefix.starts_with(&below);
        under_prefix && !all_before && !all_after
    }
}

fn walk(
    operation: &'static str,
    within: &Within<'_>,
    dir: &Path,
    rel: &str,
    at_root: bool,
    found: &mut Vec<ObjectInfo>,
) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // The directory vanished, or the prefix names no directory.
        Err(error)
            if error.kind() == io::ErrorKind::NotFound
                || error.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            return Ok(());
        }
        Err(error) => return Err(io_failed(operation, within.prefix, dir, &error)),
    };
    for entry in entries {
        let entry = entry.map_err(|error| io_failed(operation, within.prefix, dir, &error))?;
        let name = entry.file_name();
        // Names that are not UTF-8 cannot have been written through this store.
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) || (at_root && name == MULTIPART_DIR) {
            continue;
        }
        let key = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
        let file_type = match entry.file_type() {
            Ok(file_type) => file_type,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io_failed(operation, within.prefix, &entry.path(), &error)),
        };
        if file_type.is_dir() {
            // Prune subtrees that cannot contain a match.
            if within.may_hold_under(&key) {
                walk(operation, within, &entry.path(), &key, false, found)?;
            }
        } else if file_type.is_file() && within.holds(&key) {
            match entry.metadata() {
                Ok(metadata) => found.push(ObjectInfo { key, size_bytes: metadata.len() }),
                // Deleted while we listed.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(io_failed(operation, within.prefix, &entry.path(), &error));
                }
            }
        }
    }
    Ok(())
}

fn failed(operation: &'static str, key: &str, detail: String) -> StoreError {
    StoreError::Failed { operation, key: key.to_owned(), detail, transient: false }
}

/// Maps an I/O error on a read path: a missing file is `NotFound`, anything else `Failed`.
fn io_error(operation: &'static str, key: &str, path: &Path, error: &io::Error) -> StoreError {
    if error.kind() == io::ErrorKind::NotFound {
        StoreError::NotFound { key: key.to_owned() }
    } else {
        io_failed(operation, key, path, error)
    }
}

fn io_failed(operation: &'static str, key: &str, path: &Path, error: &io::Error) -> StoreError {
    failed(operation, key, format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root(name: &str) -> PathBuf {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/tmp-store-tests")
            .join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        root
    }

    fn keys(infos: &[ObjectInfo]) -> Vec<&str> {
        infos.iter().map(|info| info.key.as_str()).collect()
    }

    #[test]
    fn new_creates_root_and_describes_it() {
        let root = temp_root("new").join("a/b");
        let store = LocalStore::new(&root).unwrap();
        assert!(root.is_dir());
        assert_eq!(store.describe(), root.display().to_string());
        assert!(matches!(LocalStore::new(""), Err(StoreError::Config(_))));
        let file = root.join("plain-file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(LocalStore::new(&file), Err(StoreError::Config(_))));
    }

    #[test]
    fn put_get_replace_delete() {
        let store = LocalStore::new(temp_root("put")).unwrap();
        store.put("a/b/c.bin", Bytes::from_static(b"hello")).unwrap();
        assert_eq!(store.get("a/b/c.bin").unwrap(), Bytes::from_static(b"hello"));
        store.put("a/b/c.bin", Bytes::from_static(b"replaced")).unwrap();
        assert_eq!(store.get("a/b/c.bin").unwrap(), Bytes::from_static(b"replaced"));
        store.put("empty", Bytes::new()).unwrap();
        assert_eq!(store.get("empty").unwrap().len(), 0);
        store.delete("a/b/c.bin").unwrap();
        assert!(matches!(store.get("a/b/c.bin"), Err(StoreError::NotFound { .. })));
        store.delete("a/b/c.bin").unwrap();
        store.delete("never/existed").unwrap();
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(store.root().join("a/b")).unwrap().collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn get_range_and_short_read() {
        let store = LocalStore::new(temp_root("range")).unwrap();
        let data: Vec<u8> = (0..=255).collect();
        store.put("obj", Bytes::from(data.clone())).unwrap();
        assert_eq!(store.get_range("obj", 10, 5).unwrap(), Bytes::from(data[10..15].to_vec()));
        assert_eq!(store.get_range("obj", 0, 256).unwrap().len(), 256);
        assert_eq!(store.get_range("obj", 256, 0).unwrap().len(), 0);
        match store.get_range("obj", 250, 10) {
            Err(StoreError::ShortRead { offset: 250, wanted: 10, got: 6, .. }) => {}
            other => panic!("expected short read, got {other:?}"),
        }
        match store.get_range("obj", 1000, 1) {
            Err(StoreError::ShortRead { got: 0, .. }) => {}
            other => panic!("expected short read, got {other:?}"),
        }
        assert!(matches!(store.get_range("missing", 0, 1), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn list_is_sorted_relative_and_filtered() {
        let store = LocalStore::new(temp_root("list")).unwrap();
        for key in ["b/2", "a", "b/1", "c/d/e", "bb", "b/10"] {
            store.put(key, Bytes::from(key.as_bytes().to_vec())).unwrap();
        }
        let upload = store.multipart_begin("b/pending").unwrap();
        fs::write(store.root().join("b").join(format!("{TEMP_PREFIX}junk")), b"x").unwrap();
        let all = store.list("").unwrap();
        assert_eq!(keys(&all), ["a", "b/1", "b/10", "b/2", "bb", "c/d/e"]);
        assert_eq!(all[5].size_bytes, 5);
        assert_eq!(keys(&store.list("b").unwrap()), ["b/1", "b/10", "b/2", "bb"]);
        assert_eq!(keys(&store.list("b/").unwrap()), ["b/1", "b/10", "b/2"]);
        assert_eq!(keys(&store.list("b/1").unwrap()), ["b/1", "b/10"]);
        assert_eq!(keys(&store.list("c/d/").unwrap()), ["c/d/e"]);
        assert!(store.list("zzz/").unwrap().is_empty());
        assert!(store.list("a/").unwrap().is_empty());
        store.multipart_abort("b/pending", &upload).unwrap();
    }

    #[test]
    fn list_range_walks_only_what_it_keeps() {
        crate::store::range_check::check(&LocalStore::new(temp_root("range")).unwrap());
    }

    #[test]
    fn multipart_complete_abort_and_list() {
        let store = LocalStore::new(temp_root("multipart")).unwrap();
        let id = store.multipart_begin("packs/p1").unwrap();
        let second = store.multipart_begin("packs/p2").unwrap();
        let other = store.multipart_begin("index/i1").unwrap();
        let listed = store.multipart_list("packs/").unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!((listed[0].key.as_str(), &listed[0].upload_id), ("packs/p1", &id));
        assert!(listed[0].initiated_unix.is_some());
        assert_eq!(store.multipart_list("").unwrap().len(), 3);

        let r2 =
            store.multipart_put_part("packs/p1", &id, 2, Bytes::from_static(b"world")).unwrap();
        let r1 =
            store.multipart_put_part("packs/p1", &id, 1, Bytes::from_static(b"hullo ")).unwrap();
        // Re-uploading a part replaces it.
        let r1b =
            store.multipart_put_part("packs/p1", &id, 1, Bytes::from_static(b"hello ")).unwrap();
        assert_ne!(r1.etag, r1b.etag);
        // The object is invisible until completion.
        assert!(matches!(store.get("packs/p1"), Err(StoreError::NotFound { .. })));
        // A stale receipt is refused, and so is a receipt of a part never uploaded.
        let stale = store.multipart_complete("packs/p1", &id, &[r1.clone(), r2.clone()]);
        assert!(stale.unwrap_err().to_string().contains("does not match its etag"));
        let mut r3 = r2.clone();
        r3.part_number = 3;
        let missing = store.multipart_complete("packs/p1", &id, &[r1b.clone(), r2.clone(), r3]);
        assert!(missing.unwrap_err().to_string().contains("part 3 was never uploaded"));
        // Wrong key for the upload.
        assert!(store.multipart_put_part("packs/p2", &id, 1, Bytes::new()).is_err());
        store.multipart_complete("packs/p1", &id, &[r1b, r2]).unwrap();
        assert_eq!(store.get("packs/p1").unwrap(), Bytes::from_static(b"hello world"));
        assert_eq!(keys(&store.list("").unwrap()), ["packs/p1"]);

        // Abort frees the upload; aborting twice or an unknown id succeeds.
        let _ = store.multipart_put_part("packs/p2", &second, 1, Bytes::from_static(b"x")).unwrap();
        store.multipart_abort("packs/p2", &second).unwrap();
        store.multipart_abort("packs/p2", &second).unwrap();
        assert!(store.multipart_put_part("packs/p2", &second, 1, Bytes::new()).is_err());
        assert_eq!(store.multipart_list("").unwrap().len(), 1);
        store.multipart_abort("index/i1", &other).unwrap();
        assert!(store.multipart_list("").unwrap().is_empty());
        assert!(matches!(store.get("packs/p2"), Err(StoreError::NotFound { .. })));

        // Bad inputs.
        let id = store.multipart_begin("k").unwrap();
        assert!(store.multipart_put_part("k", &id, 0, Bytes::new()).is_err());
        assert!(store.multipart_put_part("k", &id, 10_001, Bytes::new()).is_err());
        assert!(store.multipart_complete("k", &id, &[]).is_err());
        let part = store.multipart_put_part("k", &id, 1, Bytes::from_static(b"a")).unwrap();
        assert!(store.multipart_complete("k", &id, &[part.clone(), part.clone()]).is_err());
        let missing =
            PartReceipt { part_number: 3, etag: part.etag.clone(), checksum_crc32c: None };
        assert!(store.multipart_complete("k", &id, &[part, missing]).is_err());
        let evil = UploadId("../../etc".into());
        assert!(store.multipart_abort("k", &evil).is_err());
        assert!(store.multipart_put_part("k", &evil, 1, Bytes::new()).is_err());
        store.multipart_abort("k", &id).unwrap();
    }

    #[test]
    fn bad_keys_are_refused() {
        let store = LocalStore::new(temp_root("badkeys")).unwrap();
        for key in [
            "",
            "/etc/passwd",
            "../escape",
            "a/../../b",
            "a//b",
            "a/",
            "./a",
            ".multipart/x",
            "a/.ferry-tmp-1",
            "nul\0byte",
        ] {
            let result = store.put(key, Bytes::from_static(b"x"));
            assert!(
                matches!(result, Err(StoreError::Failed { transient: false, .. })),
                "{key:?} accepted: {result:?}"
            );
            assert!(store.get(key).is_err());
            assert!(store.delete(key).is_err());
            assert!(store.multipart_begin(key).is_err());
        }
        // Dots inside names are fine.
        store.put("a/.hidden/b..c", Bytes::from_static(b"x")).unwrap();
        assert_eq!(keys(&store.list("").unwrap()), ["a/.hidden/b..c"]);
    }

    #[test]
    fn concurrent_puts_to_one_directory() {
        let store = std::sync::Arc::new(LocalStore::new(temp_root("concurrent")).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..20 {
                        let key = format!("d/e/{t}-{i}");
                        store.put(&key, Bytes::from(key.clone().into_bytes())).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(store.list("d/").unwrap().len(), 160);
    }
}
