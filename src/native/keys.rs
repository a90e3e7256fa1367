//! The key objects of an encrypted repository (`keys/<16 hex>`): writing one, opening the
//! repository with a passphrase, and the key commands (`ferry key list|add|remove|passwd`) that
//! rotate passphrases without re-encrypting any data (every key object wraps the same master
//! secret). The byte layout is `layout::crypt`'s; this module does the store I/O.

use bytes::Bytes;
use serde::Serialize;

use crate::error::{EngineError, ErrorKind};
use crate::native::fresh;
use crate::native::layout::crypt::{self, Cipher, KdfParams, KeyObject, RepoKeys};
use crate::native::layout::{self, Timestamp};
use crate::store::{ObjectStore, StoreError};

/// Where the passphrase of an encrypted repository comes from.
#[derive(Debug)]
pub enum Passphrase {
    /// None given (an unencrypted repository needs none).
    None,
    /// From the environment or a file.
    Given(Vec<u8>),
    /// Asked on the terminal, only when the repository turns out to be encrypted.
    Prompt(fn(&str) -> Result<Vec<u8>, EngineError>),
}

impl Passphrase {
    fn resolve(&self, prompt: &str) -> Result<Vec<u8>, EngineError> {
        match self {
            Passphrase::Given(bytes) => Ok(bytes.clone()),
            Passphrase::Prompt(ask) => ask(prompt),
            Passphrase::None => Err(EngineError::new(
                ErrorKind::KeyNeeded,
                "the repository is encrypted: give its passphrase in FERRY_PASSPHRASE or \
                 FERRY_PASSPHRASE_FILE (or run on a terminal to be asked)",
            )),
        }
    }
}

/// A key object as `ferry key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Its id (`keys/<id>`).
    pub key_id: String,
    /// When it was written (Unix seconds, as recorded in it).
    pub created_at: u64,
    /// Argon2id memory cost, KiB.
    pub kdf_memory_kib: u32,
    /// Argon2id passes.
    pub kdf_iterations: u32,
    /// Whether it opened the repository for this command.
    pub current: bool,
}

/// Wraps `keys`' master secret under `passphrase` in a new key object; returns its id.
///
/// # Errors
/// `Usage` for an empty passphrase, store errors.
pub fn write_key_object(
    store: &dyn ObjectStore,
    repository_id: &str,
    keys: &RepoKeys,
    passphrase: &[u8],
) -> Result<String, EngineError> {
    if passphrase.is_empty() {
        return Err(EngineError::new(ErrorKind::Usage, "the passphrase is empty"));
    }
    let id = layout::to_hex(&fresh::random_bytes::<8>());
    let object = KeyObject::wrap(
        keys.master(),
        passphrase,
        KdfParams::with_salt(fresh::random_bytes()),
        (keys.cipher(), fresh::random_nonce()),
        (repository_id, &id),
        Timestamp::now(),
    )
    .map_err(|detail| EngineError::new(ErrorKind::Internal, detail))?;
    let json = serde_json::to_vec_pretty(&object).expect("key objects serialize");
    store.put(&crypt::key_object_key(&id), Bytes::from(json))?;
    Ok(id)
}

/// Key objects by id, and the problems of those that do not parse.
type LoadedKeys = (Vec<(String, KeyObject)>, Vec<String>);

/// Every key object, parsed, by id; an unreadable one is skipped with its problem.
fn load_key_objects(store: &dyn ObjectStore) -> Result<LoadedKeys, EngineError> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for listed in store.list(crypt::KEYS_PREFIX)? {
        let Some(id) = crypt::key_id_from_key(&listed.key) else { continue };
        let bytes = match store.get(&listed.key) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        };
        match serde_json::from_slice::<KeyObject>(&bytes) {
            Ok(object) => objects.push((id.to_string(), object)),
            Err(error) => problems.push(format!("{}: {error}", listed.key)),
        }
    }
    Ok((objects, problems))
}

/// Opens an encrypted repository: tries `passphrase` on every key object.
///
/// # Errors
/// `KeyNeeded` without a passphrase, `KeyRefused` when no key object opens with it, store
/// errors.
pub fn unlock(
    store: &dyn ObjectStore,
    repository_id: &str,
    cipher: Cipher,
    passphrase: &Passphrase,
) -> Result<(RepoKeys, String), EngineError> {
    let (objects, mut problems) = load_key_objects(store)?;
    if objects.is_empty() {
        return Err(EngineError::new(
            ErrorKind::KeyRefused,
            format!(
                "the repository at {} is encrypted but holds no readable key object under \
                 keys/{}",
                store.describe(),
                if problems.is_empty() { String::new() } else { format!(": {problems:?}") }
            ),
        ));
    }
    let passphrase = passphrase.resolve("repository passphrase: ")?;
    for (id, object) in &objects {
        match object.unwrap_master(&passphrase, repository_id, id) {
            Ok(Some(master)) => {
                return Ok((RepoKeys::derive(cipher, master, fresh::random_nonce), id.clone()));
            }
            Ok(None) => {}
            Err(problem) => problems.push(format!("keys/{id}: {problem}")),
        }
    }
    let mut message = format!(
        "wrong passphrase: none of the {} key objects of the repository at {} opens with it",
        objects.len(),
        store.describe()
    );
    if !problems.is_empty() {
        message.push_str(&format!(" ({})", problems.join("; ")));
    }
    Err(EngineError::new(ErrorKind::KeyRefused, message))
}

/// An opened encrypted repository's keys, for the key commands (`Repository::key_ring`).
#[derive(Debug)]
pub struct KeyRing<'a> {
    /// Its store.
    pub store: &'a dyn ObjectStore,
    /// Its id.
    pub repository_id: &'a str,
    /// Its keys.
    pub keys: &'a RepoKeys,
    /// The key object that opened it.
    pub opened_with: &'a str,
}

/// The key objects of an encrypted repository.
///
/// # Errors
/// Store errors.
pub fn list(ring: &KeyRing<'_>) -> Result<Vec<KeyInfo>, EngineError> {
    let (objects, _) = load_key_objects(ring.store)?;
    let mut keys: Vec<KeyInfo> = objects
        .into_iter()
        .map(|(id, object)| KeyInfo {
            current: ring.opened_with == id,
            key_id: id,
            created_at: object.created_at.0,
            kdf_memory_kib: object.kdf.memory_kib,
            kdf_iterations: object.kdf.iterations,
        })
        .collect();
    keys.sort_by(|a, b| (a.created_at, &a.key_id).cmp(&(b.created_at, &b.key_id)));
    Ok(keys)
}

/// Adds a key object wrapping the master secret under `passphrase`; returns its id.
///
/// # Errors
/// `Usage` for an empty passphrase, store errors.
pub fn add(ring: &KeyRing<'_>, passphrase: &Passphrase) -> Result<String, EngineError> {
    let passphrase = passphrase.resolve("new passphrase: ")?;
    write_key_object(ring.store, ring.repository_id, ring.keys, &passphrase)
}

/// Removes the key object `id`. Refuses to remove the last one (the data would be lost).
///
/// # Errors
/// `NotFound` for an unknown id, `Refused` for the last
/// key, store errors.
pub fn remove(ring: &KeyRing<'_>, id: &str) -> Result<(), EngineError> {
    let (objects, _) = load_key_objects(ring.store)?;
    if !objects.iter().any(|(known, _)| known == id) {
        return Err(EngineError::new(
            ErrorKind::NotFound,
            format!("no key object {id} in the repository at {}", ring.store.describe()),
        ));
    }
    if objects.len() == 1 {
        return Err(EngineError::new(
            ErrorKind::Refused,
            format!(
                "key {id} is the repository's last key: without a key the data is gone (add \
                 another first)"
            ),
        ));
    }
    ring.store.delete(&crypt::key_object_key(id))?;
    Ok(())
}

/// Changes the passphrase of the key that opened the repository: writes a key object under
/// the new passphrase, then removes the old one. Returns the new id.
///
/// # Errors
/// As `add` and `remove`.
pub fn passwd(ring: &KeyRing<'_>, passphrase: &Passphrase) -> Result<String, EngineError> {
    let new = add(ring, passphrase)?;
    remove(ring, ring.opened_with)?;
    Ok(new)
}
