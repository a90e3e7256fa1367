//! The key objects of an encrypted repository (`keys/<16 hex>`): writing one, opening the
//! repository with a passphrase or a key file, and the key commands (`ferry key
//! list|add|remove|passwd`) that rotate keys without re-encrypting any data (every key object
//! wraps the same master secret). The byte layout is `layout::crypt`'s; this module does the
//! store I/O. Reading secrets from the environment, files and terminals is the CLI's.

use bytes::Bytes;
use serde::Serialize;

use crate::error::{EngineError, ErrorKind};
use crate::native::fresh;
use crate::native::layout::crypt::{self, Cipher, Kek, KeyKind, KeyObject, RepoKeys, Secret};
use crate::native::layout::{self, Timestamp};
use crate::store::{ObjectStore, StoreError};

/// What the user named to give key material, for messages.
const HOW_TO_GIVE: &str = "a passphrase in FERRY_PASSPHRASE or FERRY_PASSPHRASE_FILE (or on a \
                           terminal when asked), or a key file with --key-file or FERRY_KEY_FILE";

/// Where the secret that opens (or wraps a new key of) an encrypted repository comes from.
#[derive(Debug)]
pub enum KeySource {
    /// None given (an unencrypted repository needs none).
    None,
    /// A passphrase from the environment or a file, or a key file.
    Given(Secret),
    /// A passphrase asked on the terminal, only when it is needed.
    Prompt(fn(&str) -> Result<Vec<u8>, EngineError>),
}

impl KeySource {
    /// The secret: given, or a passphrase asked with `prompt`; `missing` is the message when
    /// none is given and there is no terminal.
    fn resolve(&self, prompt: &str, missing: &str) -> Result<Secret, EngineError> {
        match self {
            KeySource::Given(secret) => Ok(secret.clone()),
            KeySource::Prompt(ask) => Ok(Secret::Passphrase(ask(prompt)?)),
            KeySource::None => Err(EngineError::new(ErrorKind::KeyNeeded, missing)),
        }
    }

    /// The kind of key object this source can open (a prompt asks for a passphrase).
    fn kind(&self) -> Option<KeyKind> {
        match self {
            KeySource::Given(secret) => Some(secret.kind()),
            KeySource::Prompt(_) => Some(KeyKind::Passphrase),
            KeySource::None => None,
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
    /// What opens it: `passphrase` or `key-file`.
    pub kind: KeyKind,
    /// Argon2id memory cost, KiB (passphrase keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kdf_memory_kib: Option<u32>,
    /// Argon2id passes (passphrase keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kdf_iterations: Option<u32>,
    /// Whether it opened the repository for this command.
    pub current: bool,
}

/// Wraps `keys`' master secret under `secret` in a new key object; returns its id.
///
/// # Errors
/// `Usage` for an empty passphrase, store errors.
pub fn write_key_object(
    store: &dyn ObjectStore,
    repository_id: &str,
    keys: &RepoKeys,
    secret: &Secret,
) -> Result<String, EngineError> {
    if matches!(secret, Secret::Passphrase(passphrase) if passphrase.is_empty()) {
        return Err(EngineError::new(ErrorKind::Usage, "the passphrase is empty"));
    }
    let id = layout::to_hex(&fresh::random_bytes::<8>());
    let object = KeyObject::wrap(
        keys.master(),
        secret,
        fresh::random_bytes(),
        (keys.cipher(), fresh::random_nonce()),
        (repository_id, &id),
        Timestamp::now(),
    )
    .map_err(|detail| EngineError::new(ErrorKind::Internal, detail))?;
    let json = serde_json::to_vec_pretty(&object).expect("key objects serialize");
    store.put(&crypt::key_object_key(&id), Bytes::from(json))?;
    Ok(id)
}

/// Key objects this build understands, by id, with their kind; and the problems of the others
/// (unparsable, or of a key format this build does not know: a newer build's).
struct LoadedKeys {
    objects: Vec<(String, KeyKind, KeyObject)>,
    problems: Vec<String>,
}

impl LoadedKeys {
    fn of_kind(&self, kind: KeyKind) -> impl Iterator<Item = &(String, KeyKind, KeyObject)> {
        self.objects.iter().filter(move |(_, object_kind, _)| *object_kind == kind)
    }

    fn kind_of(&self, id: &str) -> Option<KeyKind> {
        self.objects.iter().find(|(known, _, _)| known == id).map(|(_, kind, _)| *kind)
    }
}

/// Every key object, parsed, by id; an unreadable one is skipped with its problem.
fn load_key_objects(store: &dyn ObjectStore) -> Result<LoadedKeys, EngineError> {
    let mut loaded = LoadedKeys { objects: Vec::new(), problems: Vec::new() };
    for listed in store.list(crypt::KEYS_PREFIX)? {
        let Some(id) = crypt::key_id_from_key(&listed.key) else { continue };
        let bytes = match store.get(&listed.key) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => continue,
            Err(error) => return Err(error.into()),
        };
        let parsed = serde_json::from_slice::<KeyObject>(&bytes).map_err(|e| e.to_string());
        match parsed.and_then(|object| Ok((object.kind()?, object))) {
            Ok((kind, object)) => loaded.objects.push((id.to_string(), kind, object)),
            Err(problem) => loaded.problems.push(format!("{}: {problem}", listed.key)),
        }
    }
    Ok(loaded)
}

/// Opens an encrypted repository: tries the secret `source` gives on every key object of its
/// kind (a passphrase on passphrase keys, a key file on key-file keys).
///
/// # Errors
/// `KeyNeeded` without a secret (or with only a terminal to ask a passphrase on when every key
/// is a key file), `KeyRefused` when no key object opens with it, store errors.
pub fn unlock(
    store: &dyn ObjectStore,
    repository_id: &str,
    cipher: Cipher,
    source: &KeySource,
) -> Result<(RepoKeys, String), EngineError> {
    let loaded = load_key_objects(store)?;
    if loaded.objects.is_empty() {
        return Err(EngineError::new(
            ErrorKind::KeyRefused,
            format!(
                "the repository at {} is encrypted but holds no readable key object under \
                 keys/{}",
                store.describe(),
                if loaded.problems.is_empty() {
                    String::new()
                } else {
                    format!(": {:?}", loaded.problems)
                }
            ),
        ));
    }
    let count = |kind| loaded.of_kind(kind).count();
    let (passphrases, key_files) = (count(KeyKind::Passphrase), count(KeyKind::KeyFile));
    let missing = format!("the repository is encrypted: give {HOW_TO_GIVE}");
    let kind = match source.kind() {
        None => return Err(EngineError::new(ErrorKind::KeyNeeded, missing)),
        Some(kind) => kind,
    };
    if let (KeySource::Prompt(_), 0) = (source, passphrases) {
        return Err(EngineError::new(
            ErrorKind::KeyNeeded,
            format!(
                "the repository at {} is opened by key files only ({key_files} key objects): \
                 give one with --key-file or FERRY_KEY_FILE",
                store.describe()
            ),
        ));
    }
    let (tried, others) = if kind == KeyKind::Passphrase {
        (passphrases, key_files)
    } else {
        (key_files, passphrases)
    };
    let other = if kind == KeyKind::Passphrase { KeyKind::KeyFile } else { KeyKind::Passphrase };
    if tried == 0 {
        let give = match other {
            KeyKind::KeyFile => "give a key file with --key-file or FERRY_KEY_FILE",
            KeyKind::Passphrase => "give a passphrase in FERRY_PASSPHRASE or FERRY_PASSPHRASE_FILE",
        };
        let message = format!(
            "no key object of the repository at {} opens with a {}: its {others} key objects are \
             {} keys ({give})",
            store.describe(),
            kind.name(),
            other.name()
        );
        return Err(refused(message, &loaded.problems));
    }
    let secret = source.resolve("repository passphrase: ", &missing)?;
    let mut problems = loaded.problems.clone();
    for (id, _, object) in loaded.of_kind(kind) {
        match object.unwrap_master(&secret, repository_id, id) {
            Ok(Some(master)) => {
                return Ok((RepoKeys::derive(cipher, master, fresh::random_nonce), id.clone()));
            }
            Ok(None) => {}
            Err(problem) => problems.push(format!("keys/{id}: {problem}")),
        }
    }
    let wrong = if kind == KeyKind::Passphrase { "wrong passphrase" } else { "wrong key file" };
    let mut message = format!(
        "{wrong}: none of the {tried} {} keys of the repository at {} opens with it",
        kind.name(),
        store.describe()
    );
    if others > 0 {
        message.push_str(&format!(" (not tried: {others} {} keys)", other.name()));
    }
    Err(refused(message, &problems))
}

/// `KeyRefused` with `message` and the key objects that could not be tried.
fn refused(mut message: String, problems: &[String]) -> EngineError {
    if !problems.is_empty() {
        message.push_str(&format!(" ({})", problems.join("; ")));
    }
    EngineError::new(ErrorKind::KeyRefused, message)
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

/// The key objects of an encrypted repository (those this build understands).
///
/// # Errors
/// Store errors.
pub fn list(ring: &KeyRing<'_>) -> Result<Vec<KeyInfo>, EngineError> {
    let loaded = load_key_objects(ring.store)?;
    let mut keys: Vec<KeyInfo> = loaded
        .objects
        .into_iter()
        .map(|(id, kind, object)| {
            let argon2 = match object.kek() {
                Ok(Kek::Passphrase(kdf)) => Some((kdf.memory_kib, kdf.iterations)),
                _ => None,
            };
            KeyInfo {
                current: ring.opened_with == id,
                key_id: id,
                created_at: object.created_at.0,
                kind,
                kdf_memory_kib: argon2.map(|(memory, _)| memory),
                kdf_iterations: argon2.map(|(_, iterations)| iterations),
            }
        })
        .collect();
    keys.sort_by(|a, b| (a.created_at, &a.key_id).cmp(&(b.created_at, &b.key_id)));
    Ok(keys)
}

/// Adds a key object wrapping the master secret under the secret `new` gives (a passphrase or
/// a key file); returns its id.
///
/// # Errors
/// `KeyNeeded` when `new` gives none, `Usage` for an empty passphrase, store errors.
pub fn add(ring: &KeyRing<'_>, new: &KeySource) -> Result<String, EngineError> {
    let secret = new.resolve(
        "new passphrase: ",
        "key add needs the new key: a passphrase in FERRY_NEW_PASSPHRASE or \
         FERRY_NEW_PASSPHRASE_FILE (or on a terminal when asked), or --new-key-file PATH",
    )?;
    write_key_object(ring.store, ring.repository_id, ring.keys, &secret)
}

/// Removes the key object `id`, of either kind. Refuses to remove the last one (the data would
/// be lost).
///
/// # Errors
/// `NotFound` for an unknown id, `Refused` for the last key, store errors.
pub fn remove(ring: &KeyRing<'_>, id: &str) -> Result<(), EngineError> {
    let loaded = load_key_objects(ring.store)?;
    if loaded.kind_of(id).is_none() {
        return Err(EngineError::new(
            ErrorKind::NotFound,
            format!("no key object {id} in the repository at {}", ring.store.describe()),
        ));
    }
    if loaded.objects.len() == 1 {
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

/// Changes the passphrase of the passphrase key that opened the repository: writes a key
/// object under the new passphrase, then removes the old one. Returns the new id. Refused for
/// a repository opened with a key file, before anything is written.
///
/// # Errors
/// `Usage` when the repository was opened with a key file; as `add` and `remove`.
pub fn passwd(ring: &KeyRing<'_>, passphrase: &KeySource) -> Result<String, EngineError> {
    let opened_kind = load_key_objects(ring.store)?.kind_of(ring.opened_with);
    if opened_kind != Some(KeyKind::Passphrase) {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "key passwd changes a passphrase, but key {} that opened the repository is a key \
                 file: to replace a key file, `key add --new-key-file NEW` and then `key remove \
                 {}`",
                ring.opened_with, ring.opened_with
            ),
        ));
    }
    let new = add(ring, passphrase)?;
    remove(ring, ring.opened_with)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::native::layout::crypt::{KeyFile, MasterSecret};
    use crate::native::memstore::MemStore;

    fn passphrase(text: &str) -> KeySource {
        KeySource::Given(Secret::Passphrase(text.as_bytes().to_vec()))
    }

    fn key_file(byte: u8) -> KeySource {
        KeySource::Given(Secret::KeyFile(KeyFile::from_bytes([byte; 32])))
    }

    fn repo_keys() -> RepoKeys {
        RepoKeys::derive(Cipher::Aes256Gcm, MasterSecret([8; 32]), fresh::random_nonce)
    }

    fn unlocks(store: &Arc<MemStore>, source: &KeySource) -> Result<String, EngineError> {
        unlock(store, "repo", Cipher::Aes256Gcm, source).map(|(keys, id)| {
            assert_eq!(keys.id_key(), repo_keys().id_key());
            id
        })
    }

    fn write(store: &Arc<MemStore>, source: &KeySource) -> String {
        let KeySource::Given(secret) = source else { unreachable!() };
        write_key_object(store, "repo", &repo_keys(), secret).unwrap()
    }

    // A repository with a passphrase key and a key-file key opens with either, each trying
    // only its own kind; a wrong one of each kind is refused (exit 10) naming the kind.
    #[test]
    fn both_kinds_open_one_repository() {
        let store = MemStore::new(0);
        let by_pass = write(&store, &passphrase("correct horse"));
        let by_file = write(&store, &key_file(1));
        assert_eq!(unlocks(&store, &passphrase("correct horse")).unwrap(), by_pass);
        assert_eq!(unlocks(&store, &key_file(1)).unwrap(), by_file);
        let wrong = unlocks(&store, &key_file(2)).unwrap_err();
        assert_eq!(wrong.kind, ErrorKind::KeyRefused);
        assert!(wrong.message.contains("wrong key file: none of the 1 key file keys"), "{wrong:?}");
        assert!(wrong.message.contains("not tried: 1 passphrase keys"), "{wrong:?}");
        let wrong = unlocks(&store, &passphrase("not it")).unwrap_err();
        assert!(wrong.message.contains("wrong passphrase: none of the 1 passphrase"), "{wrong:?}");
        // A kind the repository has no key of: refused, saying which kind it has.
        let only_pass = MemStore::new(0);
        let _ = write(&only_pass, &passphrase("correct horse"));
        let refused = unlocks(&only_pass, &key_file(1)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::KeyRefused);
        assert!(refused.message.contains("its 1 key objects are passphrase keys"), "{refused:?}");
        let none = unlocks(&store, &KeySource::None).unwrap_err();
        assert_eq!(none.kind, ErrorKind::KeyNeeded);
        assert!(none.message.contains("FERRY_KEY_FILE"), "{none:?}");
        // Listing shows each kind; removing the key-file key leaves the passphrase one.
        let ring = KeyRing {
            store: &store,
            repository_id: "repo",
            keys: &repo_keys(),
            opened_with: &by_file,
        };
        let listed = list(&ring).unwrap();
        let kinds: Vec<_> = listed.iter().map(|key| (key.kind, key.kdf_memory_kib)).collect();
        assert!(kinds.contains(&(KeyKind::KeyFile, None)), "{listed:?}");
        assert!(kinds.contains(&(KeyKind::Passphrase, Some(65536))), "{listed:?}");
        // passwd is refused when a key file opened the repository, before anything is written.
        let refused = passwd(&ring, &passphrase("another one")).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::Usage);
        assert!(refused.message.contains("key add --new-key-file"), "{refused:?}");
        assert_eq!(store.keys(crypt::KEYS_PREFIX).len(), 2);
        remove(&ring, &by_file).unwrap();
        assert_eq!(unlocks(&store, &key_file(1)).unwrap_err().kind, ErrorKind::KeyRefused);
        assert_eq!(unlocks(&store, &passphrase("correct horse")).unwrap(), by_pass);
        assert_eq!(remove(&ring, &by_pass).unwrap_err().kind, ErrorKind::Refused);
    }

    // A repository opened by key files only does not prompt for a passphrase; a key object of
    // an unknown format (a newer build's) is skipped and named in the refusal.
    #[test]
    fn key_file_only_repositories_and_unknown_formats() {
        fn ask(_: &str) -> Result<Vec<u8>, EngineError> {
            panic!("must not prompt")
        }
        let store = MemStore::new(0);
        let _ = write(&store, &key_file(1));
        let needed = unlocks(&store, &KeySource::Prompt(ask)).unwrap_err();
        assert_eq!(needed.kind, ErrorKind::KeyNeeded);
        assert!(needed.message.contains("key files only"), "{needed:?}");
        let newer = r#"{"key_format":3,"repository_id":"repo","created_at":0,
            "cipher":"aes-256-gcm","wrapped":""}"#;
        store.put("keys/00000000000000ff", Bytes::from(newer)).unwrap();
        let refused = unlocks(&store, &key_file(2)).unwrap_err();
        assert!(refused.message.contains("unknown key format 3"), "{refused:?}");
        let _ = unlocks(&store, &key_file(1)).unwrap();
    }
}
