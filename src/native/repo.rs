//! A repository: an object store plus its verified config. Opens and initialises repositories,
//! loads pack indexes in parallel, and reads, lists and deletes manifests.
//!
//! It does not run backups or restores; those take a `Repository` and do their own work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::error::{EngineError, ErrorKind};
use crate::native::chunk::ChunkHasher;
use crate::native::layout::{
    self, BACKUPS_PREFIX, CONFIG_KEY, ChunkHash, FORMAT_VERSION, HASH_SCHEME, INDEX_PREFIX,
    IndexEntry, Manifest, ObjectKind, PackId, PackIndex, RepoConfig,
};
use crate::store::{ObjectStore, StoreError};

/// Index objects fetched at once when loading a repository's index.
const INDEX_FETCHES_IN_FLIGHT: usize = 8;

/// An opened repository.
#[derive(Debug)]
pub struct Repository {
    /// Where its objects live.
    pub store: Box<dyn ObjectStore>,
    /// Its verified config.
    pub config: RepoConfig,
    /// Names chunks under the repository key.
    pub hasher: ChunkHasher,
}

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The pack holding it.
    pub pack: PackId,
    /// Its record in the pack.
    pub entry: IndexEntry,
}

impl Repository {
    /// Creates a new repository in `store` with a fresh random key.
    ///
    /// # Errors
    /// `Refused` when the store already holds a repository or any other object, store errors
    /// otherwise.
    pub fn init(
        store: Box<dyn ObjectStore>,
        chunk_size_bytes: u32,
    ) -> Result<Repository, EngineError> {
        match store.get(CONFIG_KEY) {
            Ok(_) => {
                return Err(EngineError::new(
                    ErrorKind::Refused,
                    format!("a repository already exists at {}", store.describe()),
                ));
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        // A repository is created only where nothing is: its objects never mix with others.
        if let Some(object) = store.list("")?.first() {
            return Err(EngineError::new(
                ErrorKind::Refused,
                format!(
                    "{} is not empty (it holds {}) and holds no ferry repository; `ferry init` \
                     needs a new or empty location",
                    store.describe(),
                    object.key
                ),
            ));
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|error| {
            EngineError::new(ErrorKind::Internal, format!("random source failed: {error}"))
        })?;
        let repository_id = PackId::random().to_hex();
        let config = RepoConfig {
            format_version: FORMAT_VERSION,
            repository_id,
            chunk_size_bytes,
            hash_scheme: HASH_SCHEME.to_string(),
            hash_key: layout::to_hex(&key),
            compression: "zstd".to_string(),
            created_at: layout::Timestamp::now(),
        };
        config.validate()?;
        store.put(CONFIG_KEY, Bytes::from(layout::encode_document(ObjectKind::Config, &config)))?;
        Ok(Repository { store, hasher: ChunkHasher::new(key), config })
    }

    /// Opens the repository in `store`.
    ///
    /// # Errors
    /// `NotFound` when there is no repository, `Integrity` when its config is corrupt, store
    /// errors otherwise.
    pub fn open(store: Box<dyn ObjectStore>) -> Result<Repository, EngineError> {
        let bytes = match store.get(CONFIG_KEY) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => {
                return Err(EngineError::new(
                    ErrorKind::NotFound,
                    format!("no repository at {} (create one with `ferry init`)", store.describe()),
                ));
            }
            Err(error) => return Err(error.into()),
        };
        let config: RepoConfig =
            layout::decode_document(ObjectKind::Config, "repository config", &bytes)?;
        config.validate()?;
        let hasher = ChunkHasher::new(config.hash_key_bytes()?);
        Ok(Repository { store, config, hasher })
    }

    /// Loads the index of every pack in the repository: chunk hash to pack. A damaged index
    /// object (corrupt, or describing another pack) is reported through `warn` and skipped: its
    /// chunks are not deduplicated against, so a new backup stores them again instead of failing.
    ///
    /// # Errors
    /// Store errors.
    pub fn load_all_indexes(
        &self,
        warn: &dyn Fn(String),
    ) -> Result<HashMap<ChunkHash, PackId>, EngineError> {
        let listing = self.store.list(INDEX_PREFIX)?;
        let packs: Vec<PackId> = listing
            .iter()
            .filter_map(|object| object.key.strip_prefix(INDEX_PREFIX))
            .filter_map(PackId::from_hex)
            .collect();
        let loaded =
            parallel_map(&packs, INDEX_FETCHES_IN_FLIGHT, |pack| match self.load_index(pack) {
                Ok(index) => Ok(Ok(index)),
                Err(error) if error.kind == ErrorKind::Integrity => Ok(Err(error)),
                Err(error) => Err(error),
            })?;
        let mut map = HashMap::new();
        for result in loaded {
            match result {
                Ok(index) => {
                    for entry in &index.entries {
                        let _ = map.insert(entry.hash, index.pack);
                    }
                }
                Err(error) => warn(format!(
                    "{}; the chunks of its pack are not deduplicated against and are stored again",
                    error.message
                )),
            }
        }
        Ok(map)
    }

    /// Loads the indexes of `packs` in parallel and returns each chunk's location.
    ///
    /// # Errors
    /// `Integrity` when an index is missing or corrupt, store errors otherwise.
    pub fn load_locations(
        &self,
        packs: &[PackId],
    ) -> Result<HashMap<ChunkHash, Location>, EngineError> {
        let mut map = HashMap::new();
        for index in self.load_indexes(packs)? {
            for entry in index.entries {
                let _ = map.insert(entry.hash, Location { pack: index.pack, entry });
            }
        }
        Ok(map)
    }

    fn load_indexes(&self, packs: &[PackId]) -> Result<Vec<PackIndex>, EngineError> {
        parallel_map(packs, INDEX_FETCHES_IN_FLIGHT, |pack| self.load_index(pack))
    }

    fn load_index(&self, pack: &PackId) -> Result<PackIndex, EngineError> {
        let key = pack.index_key();
        let bytes = self.store.get(&key).map_err(|error| match error {
            StoreError::NotFound { .. } => EngineError::new(
                ErrorKind::Integrity,
                format!("index object {key} is missing from {}", self.store.describe()),
            ),
            other => other.into(),
        })?;
        let index: PackIndex = layout::decode_document(ObjectKind::Index, &key, &bytes)?;
        if index.pack != *pack {
            return Err(EngineError::new(
                ErrorKind::Integrity,
                format!("index object {key} describes pack {}", index.pack),
            ));
        }
        Ok(index)
    }

    /// Ids of every backup, sorted (ids start with their UTC start time).
    ///
    /// # Errors
    /// Store errors.
    pub fn list_backups(&self) -> Result<Vec<String>, EngineError> {
        let listing = self.store.list(BACKUPS_PREFIX)?;
        Ok(listing
            .into_iter()
            .filter_map(|object| object.key.strip_prefix(BACKUPS_PREFIX).map(str::to_string))
            .filter(|id| layout::backup_id_valid(id))
            .collect())
    }

    /// Reads and verifies a backup's manifest.
    ///
    /// # Errors
    /// `Usage` for a malformed id, `NotFound` when the backup does not exist, `Integrity` when
    /// the manifest does not verify, store errors otherwise.
    pub fn load_manifest(&self, backup_id: &str) -> Result<Manifest, EngineError> {
        if !layout::backup_id_valid(backup_id) {
            return Err(EngineError::new(
                ErrorKind::Usage,
                format!(
                    "invalid backup id {backup_id:?}: a backup id is 1 to 128 ASCII letters, \
                     digits, '-' and '_'"
                ),
            ));
        }
        let key = layout::manifest_key(backup_id);
        let bytes = self.store.get(&key).map_err(|error| match error {
            StoreError::NotFound { .. } => EngineError::new(
                ErrorKind::NotFound,
                format!("backup {backup_id} does not exist in {}", self.store.describe()),
            ),
            other => other.into(),
        })?;
        let manifest: Manifest =
            layout::decode_document(ObjectKind::Manifest, &format!("manifest {key}"), &bytes)?;
        manifest.validate()?;
        if manifest.backup_id != backup_id || manifest.repository_id != self.config.repository_id {
            return Err(EngineError::new(
                ErrorKind::Integrity,
                format!(
                    "manifest {key} belongs to backup {} of repository {}",
                    manifest.backup_id, manifest.repository_id
                ),
            ));
        }
        Ok(manifest)
    }

    /// Deletes a backup's manifest (the packs stay until a later space-reclaiming pass).
    ///
    /// # Errors
    /// `NotFound` when the backup does not exist, store errors otherwise.
    pub fn delete_backup(&self, backup_id: &str) -> Result<(), EngineError> {
        match self.load_manifest(backup_id) {
            // A damaged manifest can be deleted: nothing else removes it.
            Ok(_) => {}
            Err(error) if error.kind == ErrorKind::Integrity => {}
            Err(error) => return Err(error),
        }
        self.store.delete(&layout::manifest_key(backup_id))?;
        Ok(())
    }
}

/// Applies `f` to every item with up to `threads` calls at once; returns results in item order
/// or the first error.
///
/// # Errors
/// The first error any call returned.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R, EngineError> + Sync,
) -> Result<Vec<R>, EngineError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    let failure: Mutex<Option<EngineError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            let _ = scope.spawn(|| {
                loop {
                    let position = next.fetch_add(1, Ordering::Relaxed);
                    if position >= items.len() || lock(&failure).is_some() {
                        return;
                    }
                    match f(&items[position]) {
                        Ok(value) => lock(&results)[position] = Some(value),
                        Err(error) => {
                            let _ = lock(&failure).get_or_insert(error);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(error);
    }
    let results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(results.into_iter().map(|value| value.expect("every item was processed")).collect())
}

/// Locks a mutex, ignoring poisoning (a panic aborts the process in release builds anyway).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
