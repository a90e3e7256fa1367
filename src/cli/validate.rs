//! Checks of a parsed command line that clap cannot express, made before any device or bucket is
//! touched: backup ids against their rule, `verify`'s ambiguous `--read-data N`, and a restore
//! target that is (or lies inside) the repository being read. Each refusal names the rule.
//!
//! Checks that need an open file (type, size, holes, another job's lock) belong to
//! `plane::source` and `plane::target`; this module looks at paths only.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Cli, Command};
use crate::error::{EngineError, ErrorKind};
use crate::native::layout;

/// The rule `layout::backup_id_valid` checks, for messages.
pub const BACKUP_ID_RULE: &str =
    "a backup id is 1 to 128 ASCII letters, digits, '-' and '_' (like 20261126T120000Z-1a2b3c4d)";

fn usage(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

/// Refuses a malformed backup id, stating the rule.
///
/// # Errors
/// `Usage`.
pub fn check_backup_id(backup_id: &str) -> Result<(), EngineError> {
    if layout::backup_id_valid(backup_id) {
        return Ok(());
    }
    Err(usage(format!("invalid backup id {backup_id:?}: {BACKUP_ID_RULE}")))
}

/// Command-line checks clap does not make.
///
/// # Errors
/// `Usage`, naming the rule.
pub fn check_command(cli: &Cli) -> Result<(), EngineError> {
    match &cli.command {
        Command::Backup(args) if args.cinder.format == super::cinder::Format::Native => {
            args.backup_id.as_deref().map_or(Ok(()), check_backup_id)
        }
        Command::Restore(args) if args.cinder.format == super::cinder::Format::Native => {
            check_backup_id(&args.backup_id)
        }
        Command::Show(args) | Command::Delete(args) => check_backup_id(&args.backup_id),
        Command::Verify(args) => {
            // `--read-data` takes its percentage only as `--read-data=N`: a bare `--read-data`
            // followed by a number would verify a backup named like the number.
            let bare_flag = std::env::args().any(|arg| arg == "--read-data");
            if bare_flag
                && let Some(number) = args
                    .backup_ids
                    .iter()
                    .find(|id| id.trim_end_matches('%').parse::<f64>().is_ok())
            {
                return Err(usage(format!(
                    "{number:?} follows --read-data but is taken as a backup id; write \
                     --read-data={number} for a sample of {number}%, or put the backup ids first"
                )));
            }
            args.backup_ids.iter().try_for_each(|id| check_backup_id(id))
        }
        _ => Ok(()),
    }
}

/// Refuses a restore target that is the repository being read, lies inside it, is a hard link
/// to one of its files, or is the block device its file system lives on: writing it would
/// destroy the data being restored. `--force` does not change this.
///
/// # Errors
/// `Refused`, naming both paths.
pub fn check_target_outside_repository(target: &Path, root: &Path) -> Result<(), EngineError> {
    let refused = |why: &str| {
        EngineError::new(
            ErrorKind::Refused,
            format!(
                "target {} {why} the repository {} being restored from; it is never \
                 overwritten, --force or not",
                target.display(),
                root.display()
            ),
        )
    };
    let Ok(root_canonical) = root.canonicalize() else { return Ok(()) };
    let Ok(root_metadata) = std::fs::metadata(&root_canonical) else { return Ok(()) };
    if let Some(canonical) = canonical_target(target)
        && canonical.starts_with(&root_canonical)
    {
        return Err(refused("is inside"));
    }
    let Ok(metadata) = std::fs::metadata(target) else { return Ok(()) };
    use std::os::unix::fs::FileTypeExt;
    if metadata.file_type().is_block_device() && metadata.rdev() == root_metadata.dev() {
        return Err(refused("holds the file system of"));
    }
    if metadata.file_type().is_file()
        && metadata.nlink() > 1
        && metadata.dev() == root_metadata.dev()
        && holds_inode(&root_canonical, metadata.ino())
    {
        return Err(refused("is a hard link to a file of"));
    }
    Ok(())
}

/// The canonical path of `target`, or of its parent joined with its name when it does not
/// exist yet (it would be created there).
fn canonical_target(target: &Path) -> Option<PathBuf> {
    if let Ok(canonical) = target.canonicalize() {
        return Some(canonical);
    }
    let name = target.file_name()?;
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    parent.canonicalize().ok().map(|parent| parent.join(name))
}

/// Whether a file under `dir` has inode `ino` (same file system assumed).
fn holds_inode(dir: &Path, ino: u64) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|entry| match entry.file_type() {
        Ok(kind) if kind.is_dir() => holds_inode(&entry.path(), ino),
        Ok(kind) if kind.is_file() => entry.metadata().is_ok_and(|m| m.ino() == ino),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_in_or_linked_into_the_repository_are_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-validate-{}", std::process::id()));
        let root = dir.join("repo");
        std::fs::create_dir_all(root.join("packs")).unwrap();
        std::fs::write(root.join("packs/p"), b"pack").unwrap();
        let refused = |target: &Path| check_target_outside_repository(target, &root).unwrap_err();
        assert_eq!(refused(&root.join("packs/p")).kind, ErrorKind::Refused);
        assert_eq!(refused(&root.join("packs/new")).kind, ErrorKind::Refused);
        assert_eq!(refused(&dir.join("repo/../repo/packs/p")).kind, ErrorKind::Refused);
        std::fs::hard_link(root.join("packs/p"), dir.join("link")).unwrap();
        assert!(refused(&dir.join("link")).message.contains("hard link"));
        std::os::unix::fs::symlink(root.join("packs/p"), dir.join("sym")).unwrap();
        assert_eq!(refused(&dir.join("sym")).kind, ErrorKind::Refused);
        std::fs::write(dir.join("other"), b"x").unwrap();
        assert!(check_target_outside_repository(&dir.join("other"), &root).is_ok());
        assert!(check_target_outside_repository(&dir.join("new"), &root).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backup_ids_state_the_rule() {
        assert!(check_backup_id("20261126T120000Z-1a2b3c4d").is_ok());
        let message = check_backup_id("../config").unwrap_err().message;
        assert!(message.contains("letters, digits"), "{message}");
    }
}
