//! Where passphrases come from (never argv): `FERRY_PASSPHRASE`, else the file named by
//! `FERRY_PASSPHRASE_FILE` (its first line), else a prompt when stdin is a terminal. A new
//! passphrase (`ferry key add|passwd`) comes from `FERRY_NEW_PASSPHRASE` /
//! `FERRY_NEW_PASSPHRASE_FILE` or a prompt the same way. Every passphrase is registered with
//! `secrets` so that no message can print it.
//!
//! Also the `ferry key` commands' arguments and their runner.

use std::io::IsTerminal;

use clap::{Args, Subcommand};

use crate::error::{EngineError, ErrorKind};
use crate::native::keys::{self, Passphrase};
use crate::native::repo::Repository;

use super::events::Done;
use super::output::Output;
use super::secrets;

/// `ferry key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// What to do with the repository's keys.
    #[command(subcommand)]
    pub action: KeyAction,
}

/// `ferry key list|add|remove|passwd`.
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// List the key objects.
    List,
    /// Add a key object for a new passphrase (FERRY_NEW_PASSPHRASE or _FILE, or a prompt).
    Add,
    /// Remove a key object (refused for the last one).
    Remove {
        /// The key id (`ferry key list`).
        key_id: String,
    },
    /// Change the passphrase of the key that opens the repository (add new, remove old).
    Passwd,
}

/// The environment variables that carry passphrases.
pub const PASSPHRASE_ENV: [&str; 2] = ["FERRY_PASSPHRASE", "FERRY_PASSPHRASE_FILE"];

fn from_env(value: &str, file: &str) -> Result<Option<Vec<u8>>, EngineError> {
    if let Ok(text) = std::env::var(value) {
        secrets::register(&text);
        return Ok(Some(text.into_bytes()));
    }
    let Ok(path) = std::env::var(file) else { return Ok(None) };
    let text = std::fs::read_to_string(&path).map_err(|error| {
        EngineError::new(ErrorKind::Usage, format!("{file}: cannot read {path}: {error}"))
    })?;
    let line = text.lines().next().unwrap_or_default().to_string();
    secrets::register(&line);
    Ok(Some(line.into_bytes()))
}

fn prompt(text: &str) -> Result<Vec<u8>, EngineError> {
    let answer = rpassword::prompt_password(text).map_err(|error| {
        EngineError::new(ErrorKind::KeyNeeded, format!("cannot read a passphrase: {error}"))
    })?;
    secrets::register(&answer);
    Ok(answer.into_bytes())
}

fn source(value: &str, file: &str) -> Result<Passphrase, EngineError> {
    Ok(match from_env(value, file)? {
        Some(bytes) => Passphrase::Given(bytes),
        None if std::io::stdin().is_terminal() => Passphrase::Prompt(prompt),
        None => Passphrase::None,
    })
}

/// The passphrase that opens (or, for `init --encrypt`, creates) a repository.
///
/// # Errors
/// `Usage` when `FERRY_PASSPHRASE_FILE` cannot be read.
pub fn passphrase() -> Result<Passphrase, EngineError> {
    source(PASSPHRASE_ENV[0], PASSPHRASE_ENV[1])
}

/// Whether a passphrase is given in the environment.
pub fn passphrase_in_env() -> bool {
    PASSPHRASE_ENV.iter().any(|name| std::env::var_os(name).is_some())
}

/// Runs `ferry key …` on an opened repository.
///
/// # Errors
/// As the `native::keys` functions.
pub fn run(repo: &Repository, args: &KeyArgs, output: &Output) -> Result<(), EngineError> {
    let new_passphrase = || source("FERRY_NEW_PASSPHRASE", "FERRY_NEW_PASSPHRASE_FILE");
    let ring = repo.key_ring()?;
    match &args.action {
        KeyAction::List => {
            let listed = keys::list(&ring)?;
            let lines: Vec<String> = listed
                .iter()
                .map(|key| {
                    format!(
                        "{}  created {}  argon2id m={} KiB t={}{}",
                        key.key_id,
                        key.created_at,
                        key.kdf_memory_kib,
                        key.kdf_iterations,
                        if key.current { "  (opened this command)" } else { "" }
                    )
                })
                .collect();
            output.result(Done::Keys { keys: listed }, &lines.join("\n"));
        }
        KeyAction::Add => {
            let id = keys::add(&ring, &new_passphrase()?)?;
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
    }
    Ok(())
}
