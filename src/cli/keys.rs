//! Where the secrets of encrypted repositories come from (never argv): a key file named by
//! `--key-file` or `FERRY_KEY_FILE`, or a passphrase from `FERRY_PASSPHRASE`, else the file
//! named by `FERRY_PASSPHRASE_FILE` (its first line), else a prompt when stdin is a terminal.
//! A key file and a passphrase together are refused as ambiguous. A new key (`ferry key
//! add|passwd`) is a passphrase from `FERRY_NEW_PASSPHRASE` / `FERRY_NEW_PASSPHRASE_FILE` or a
//! prompt the same way, or (`key add --new-key-file`) a key file. Every secret is registered
//! with `secrets` so that no message can print it.
//!
//! Also the `ferry key` commands' arguments and their runner, and `key generate-file`, which
//! writes a new key file (mode 0600, never over an existing file). The key file format is
//! `layout::crypt::KeyFile`'s.

use std::io::{IsTerminal, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::error::{EngineError, ErrorKind};
use crate::native::fresh;
use crate::native::keys::{self, KeySource};
use crate::native::layout::crypt::{KeyFile, Secret};
use crate::native::repo::Repository;

use super::events::Done;
use super::output::Output;
use super::{input, secrets};

/// `ferry key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// What to do with the repository's keys.
    #[command(subcommand)]
    pub action: KeyAction,
}

/// `ferry key list|add|remove|passwd|generate-file`.
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// List the key objects (passphrase or key-file keys).
    List,
    /// Add a key object: for a new passphrase (FERRY_NEW_PASSPHRASE or _FILE, or a prompt), or
    /// for a key file (--new-key-file).
    Add {
        /// The key file the new key object opens with (make one with `key generate-file`).
        #[arg(long, value_name = "PATH")]
        new_key_file: Option<PathBuf>,
    },
    /// Remove a key object, of either kind (refused for the last one).
    Remove {
        /// The key id (`ferry key list`).
        key_id: String,
    },
    /// Change the passphrase of the passphrase key that opens the repository (add new, remove
    /// old); refused for a key file.
    Passwd,
    /// Write a new key file (64 random hex digits, mode 0600; never over an existing file).
    /// Needs no repository.
    GenerateFile {
        /// Where to write it.
        path: PathBuf,
    },
}

/// The environment variables that carry passphrases.
pub const PASSPHRASE_ENV: [&str; 2] = ["FERRY_PASSPHRASE", "FERRY_PASSPHRASE_FILE"];
/// The environment variable naming a key file.
pub const KEY_FILE_ENV: &str = "FERRY_KEY_FILE";
/// The environment variables that carry a new passphrase (`key add|passwd`).
const NEW_PASSPHRASE_ENV: [&str; 2] = ["FERRY_NEW_PASSPHRASE", "FERRY_NEW_PASSPHRASE_FILE"];
/// A key file is 65 bytes; a larger file (a disk image named by mistake) is refused unread.
const KEY_FILE_BYTES_MAX: u64 = 1024;

fn usage(message: String) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

/// A passphrase file holds one line; a larger file (a disk image named by mistake) is refused.
const PASSPHRASE_FILE_BYTES_MAX: u64 = 64 * 1024;

fn from_env(value: &str, file: &str, output: &Output) -> Result<Option<Vec<u8>>, EngineError> {
    if let Ok(text) = std::env::var(value) {
        secrets::register(&text);
        return Ok(Some(text.into_bytes()));
    }
    let Some(path) = std::env::var_os(file) else { return Ok(None) };
    let path = PathBuf::from(path);
    let advice = "a passphrase file holds the passphrase on its first line";
    let text = input::read_bounded_text(&path, file, PASSPHRASE_FILE_BYTES_MAX, advice)?;
    let line = text.lines().next().unwrap_or_default().to_string();
    secrets::register(&line);
    let consequence = "whoever reads it can decrypt the repository";
    input::warn_if_shared(&path, file, "passphrase file", consequence, output);
    Ok(Some(line.into_bytes()))
}

fn prompt(text: &str) -> Result<Vec<u8>, EngineError> {
    let answer = rpassword::prompt_password(text).map_err(|error| {
        EngineError::new(ErrorKind::KeyNeeded, format!("cannot read a passphrase: {error}"))
    })?;
    secrets::register(&answer);
    Ok(answer.into_bytes())
}

fn passphrase_source(value: &str, file: &str, output: &Output) -> Result<KeySource, EngineError> {
    Ok(match from_env(value, file, output)? {
        Some(bytes) => KeySource::Given(Secret::Passphrase(bytes)),
        None if std::io::stdin().is_terminal() => KeySource::Prompt(prompt),
        None => KeySource::None,
    })
}

/// Reads and parses the key file at `path` (`what` names where the path came from): a regular
/// file or a pipe (`--key-file <(vault read ...)`), at most `KEY_FILE_BYTES_MAX` bytes of it.
/// Its contents are registered for scrubbing. A regular file other users may read or write is
/// a warning on `output` (as ssh refuses such a private key; ferry still uses it, so a job is
/// not stopped by a mode).
///
/// # Errors
/// `Usage` when it cannot be read, is another kind of file (a directory, a device), or is not
/// a key file (the message states the rule and never quotes the contents).
pub fn read_key_file(path: &Path, what: &str, output: &Output) -> Result<KeyFile, EngineError> {
    let shown = path.display();
    let too_large = "it is not a key file (64 hex digits)";
    let text = input::read_bounded(path, what, KEY_FILE_BYTES_MAX, too_large)?;
    let consequence = "whoever reads it can decrypt the repository";
    input::warn_if_shared(path, what, "key file", consequence, output);
    secrets::register(String::from_utf8_lossy(&text).trim());
    let key_file = KeyFile::parse(&text)
        .map_err(|rule| usage(format!("{what}: {shown} is not a key file: {rule}")))?;
    secrets::register(key_file.encode().trim_end());
    Ok(key_file)
}

/// The key file given: `--key-file` (`flag`), else `FERRY_KEY_FILE` (unless empty), with the
/// name of where it came from.
fn key_file_given(flag: Option<&Path>) -> Option<(PathBuf, &'static str)> {
    if let Some(path) = flag {
        return Some((path.to_path_buf(), "--key-file"));
    }
    let path = std::env::var_os(KEY_FILE_ENV).filter(|path| !path.is_empty())?;
    Some((PathBuf::from(path), KEY_FILE_ENV))
}

/// The names of the key material given, among `--key-file` (`flag`), `FERRY_KEY_FILE`,
/// `FERRY_PASSPHRASE` and `FERRY_PASSPHRASE_FILE`.
pub fn key_material_given(flag: Option<&Path>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> =
        key_file_given(flag).map(|(_, name)| name).into_iter().collect();
    names.extend(PASSPHRASE_ENV.iter().filter(|name| std::env::var_os(name).is_some()));
    names
}

/// The secret that opens (or, for `init --encrypt`, wraps the first key of) a repository: the
/// key file `flag` or `FERRY_KEY_FILE` names, else a passphrase. Both at once are refused.
///
/// # Errors
/// `Usage` when a key file and a passphrase are both given, or a key file or
/// `FERRY_PASSPHRASE_FILE` cannot be read or parsed.
pub fn key_source(flag: Option<&Path>, output: &Output) -> Result<KeySource, EngineError> {
    let Some((path, what)) = key_file_given(flag) else {
        return passphrase_source(PASSPHRASE_ENV[0], PASSPHRASE_ENV[1], output);
    };
    if let Some(passphrase) = PASSPHRASE_ENV.iter().find(|name| std::env::var_os(name).is_some()) {
        return Err(usage(format!(
            "both a key file ({what}) and a passphrase ({passphrase}) are given: give one (a key \
             file opens only key-file keys, a passphrase only passphrase keys)"
        )));
    }
    Ok(KeySource::Given(Secret::KeyFile(read_key_file(&path, what, output)?)))
}

/// `key generate-file PATH`: writes 32 random bytes as a key file, mode 0600, refusing an
/// existing file; synced (with its directory) before it is reported.
///
/// # Errors
/// `Refused` when the file exists, `Usage` when it cannot be written.
pub fn generate_file(path: &Path, output: &Output) -> Result<(), EngineError> {
    let shown = path.display();
    let cannot = |error: std::io::Error| usage(format!("cannot write key file {shown}: {error}"));
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(
            |error| match error.kind() {
                std::io::ErrorKind::AlreadyExists => EngineError::new(
                    ErrorKind::Refused,
                    format!("{shown} exists: a key file is never overwritten (it may be a key)"),
                ),
                _ => cannot(error),
            },
        )?;
    let key_file = KeyFile::from_bytes(fresh::random_bytes());
    let text = key_file.encode();
    secrets::register(text.trim_end());
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(cannot)?;
    let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty());
    std::fs::File::open(parent.unwrap_or(Path::new(".")))
        .and_then(|dir| dir.sync_all())
        .map_err(cannot)?;
    output.result(
        Done::KeyFileWritten { path: shown.to_string() },
        &format!("wrote key file {shown}: back it up apart from the repository"),
    );
    Ok(())
}

/// Runs `ferry key …` on an opened repository (`generate-file` needs none: `generate_file`).
///
/// # Errors
/// As the `native::keys` functions.
pub fn run(repo: &Repository, args: &KeyArgs, output: &Output) -> Result<(), EngineError> {
    let new_passphrase = || passphrase_source(NEW_PASSPHRASE_ENV[0], NEW_PASSPHRASE_ENV[1], output);
    let ring = repo.key_ring()?;
    match &args.action {
        KeyAction::List => {
            let listed = keys::list(&ring)?;
            let lines: Vec<String> = listed
                .iter()
                .map(|key| {
                    let kind = match (key.kdf_memory_kib, key.kdf_iterations) {
                        (Some(memory), Some(passes)) => {
                            format!("passphrase (argon2id m={memory} KiB t={passes})")
                        }
                        _ => "key file".to_string(),
                    };
                    format!(
                        "{}  created {}  {kind}{}",
                        key.key_id,
                        key.created_at,
                        if key.current { "  (opened this command)" } else { "" }
                    )
                })
                .collect();
            output.result(Done::Keys { keys: listed }, &lines.join("\n"));
        }
        KeyAction::Add { new_key_file } => {
            let new = match new_key_file {
                Some(path) => {
                    if let Some(name) =
                        NEW_PASSPHRASE_ENV.iter().find(|name| std::env::var_os(name).is_some())
                    {
                        return Err(usage(format!(
                            "both --new-key-file and {name} are given: a key object has one \
                             secret (add them one at a time)"
                        )));
                    }
                    KeySource::Given(Secret::KeyFile(read_key_file(
                        path,
                        "--new-key-file",
                        output,
                    )?))
                }
                None => new_passphrase()?,
            };
            let id = keys::add(&ring, &new)?;
            output.result(Done::KeyAdded { key_id: id.clone() }, &format!("added key {id}"));
        }
        KeyAction::Remove { key_id } => {
            keys::remove(&ring, key_id)?;
            output.result(
                Done::KeyRemoved { key_id: key_id.clone() },
                &format!("removed key {key_id}"),
            );
        }
        KeyAction::Passwd => {
            let id = keys::passwd(&ring, &new_passphrase()?)?;
            output.result(
                Done::KeyAdded { key_id: id.clone() },
                &format!("changed the passphrase: key {id} replaces the key that opened it"),
            );
        }
        KeyAction::GenerateFile { .. } => unreachable!("dispatched before a repository opens"),
    }
    Ok(())
}
