//! A repository: an object store plus its verified config. Opens and initialises repositories,
//! loads pack indexes in parallel, and reads, lists and deletes manifests.
//!
//! It does not run backups or restores; those take a `Repository` and do their own work.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::error::{EngineError, ErrorKind};
use crate::native::chunk::ChunkHasher;
use crate::native::layout::gc::{self, Mark};
use crate::native::layout::{
    self, BACKUPS_PREFIX, CONFIG_KEY, ChunkHash, FORMAT_VERSION, HASH_SCHEME, INDEX_PREFIX,
    IndexEntry, Manifest, ObjectKind, PACKS_PREFIX, PackId, PackIndex, RepoConfig, Timestamp,
};
use crate::store::{DatedObject, ObjectStore, StoreError};

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
        Repository::init_with(store, chunk_size_bytes, gc::GcTiming::DEFAULT)
    }

    /// `init` with garbage-collection rules of its own (`ferry init --gc-grace`), recorded in
    /// the config so that every host obeys them.
    ///
    /// # Errors
    /// As `init`.
    pub fn init_with(
        store: Box<dyn ObjectStore>,
        chunk_size_bytes: u32,
        gc_timing: gc::GcTiming,
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
            gc_grace_secs: Some(gc_timing.grace_secs),
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

    /// The store's clock now (Unix seconds): writes a uniquely named probe object, reads its
    /// `LastModified` and deletes it. Garbage collection measures every age with this clock,
    /// never with this host's.
    ///
    /// # Errors
    /// Store errors, or a store that keeps no modification times.
    pub fn store_now(&self) -> Result<u64, EngineError> {
        let key = gc::clock_key(PackId::random());
        self.store.put(&key, Bytes::new())?;
        let time = self.written_at(&key);
        let _ = self.store.delete(&key);
        time
    }

    /// When the store says `key` was written.
    ///
    /// # Errors
    /// `Internal` when the object just written is not listed, store errors otherwise.
    pub fn written_at(&self, key: &str) -> Result<u64, EngineError> {
        let listed = self.store.list_dated(key)?;
        match listed.iter().find(|object| object.key == key) {
            Some(object) => Ok(object.modified_unix),
            None => Err(EngineError::new(
                ErrorKind::Store,
                format!("{key} was written but {} does not list it", self.store.describe()),
            )),
        }
    }

    /// Every mark in the repository, with its time by the store's clock. A mark that cannot be
    /// read is returned in `unreadable`: no prune sweeps it, so its packs are never deleted.
    ///
    /// # Errors
    /// Store errors.
    pub fn load_marks(&self) -> Result<Marks, EngineError> {
        let listing: Vec<DatedObject> = self
            .store
            .list_dated(gc::GC_PREFIX)?
            .into_iter()
            .filter(|object| gc::is_mark_key(&object.key))
            .collect();
        let loaded = parallel_map(&listing, INDEX_FETCHES_IN_FLIGHT, |object| {
            let bytes = match self.store.get(&object.key) {
                Ok(bytes) => bytes,
                // Swept since the listing.
                Err(StoreError::NotFound { .. }) => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            let decoded = layout::decode_document::<Mark>(ObjectKind::Mark, &object.key, &bytes)
                .and_then(|mark| mark.validate(&object.key).map(|()| mark));
            Ok(Some(decoded.map_err(|error| (object.key.clone(), error.to_string()))))
        })?;
        let mut marks = Marks::default();
        for (object, loaded) in listing.iter().zip(loaded) {
            match loaded {
                None => {}
                Some(Ok(mark)) => {
                    marks.packs.extend(mark.packs.iter().copied());
                    marks.marks.push(LoadedMark {
                        key: object.key.clone(),
                        written_at: object.modified_unix,
                        mark,
                    });
                }
                Some(Err(problem)) => marks.unreadable.push(problem),
            }
        }
        Ok(marks)
    }

    /// Every pack object with its size and time, by id (an object under `packs/` whose key
    /// names no pack is not one: it is neither used nor deleted).
    ///
    /// # Errors
    /// Store errors.
    pub fn list_packs(&self) -> Result<HashMap<PackId, DatedObject>, EngineError> {
        Ok(self
            .store
            .list_dated(PACKS_PREFIX)?
            .into_iter()
            .filter_map(|object| Some((layout::pack_from_key(&object.key)?, object)))
            .collect())
    }

    /// What a backup may deduplicate against: the chunks of every pack that is indexed, present
    /// with its indexed size and not condemned by a mark. Lists the marks first, then the
    /// packs, then the indexes (one listing each), so a pack a prune deletes meanwhile is missing
    /// from one of them, or condemned by a mark already listed.
    ///
    /// # Errors
    /// Store errors (a damaged index or mark is reported in the view, not an error).
    pub fn load_dedup_view(&self) -> Result<DedupView, EngineError> {
        let marks = self.load_marks()?;
        let packs = self.list_packs()?;
        let indexed: Vec<PackId> = self
            .store
            .list(INDEX_PREFIX)?
            .iter()
            .filter_map(|object| layout::index_pack_from_key(&object.key))
            .collect();
        let mut view = DedupView { marked: marks.packs, ..DedupView::default() };
        view.problems.extend(
            marks.unreadable.into_iter().map(|(key, detail)| {
                format!("{key}: {detail} (its packs are kept; dedup continues)")
            }),
        );
        // A damaged index is reported and skipped; a store error fails the backup (a retried
        // failure is not damage, and skipping would store its chunks again for nothing).
        let loaded =
            parallel_map(&indexed, INDEX_FETCHES_IN_FLIGHT, |pack| match self.load_index(pack) {
                Ok(index) => Ok(Ok(index)),
                Err(error) if error.kind == ErrorKind::Integrity => Ok(Err(error.message)),
                Err(error) => Err(error),
            })?;
        for (pack, loaded) in indexed.iter().zip(loaded) {
            let index = match loaded {
                Ok(index) => index,
                Err(message) => {
                    view.problems.push(format!("{message} (its chunks are stored again)"));
                    continue;
                }
            };
            let usable = match packs.get(pack) {
                None => {
                    view.missing_packs += 1;
                    view.missing_chunks += index.entries.len();
                    false
                }
                Some(object) if object.size_bytes != index.pack_size_bytes => {
                    view.problems.push(format!(
                        "pack {} has {} bytes, its index says {} (its chunks are stored again)",
                        object.key, object.size_bytes, index.pack_size_bytes
                    ));
                    false
                }
                Some(_) => !view.marked.contains(pack),
            };
            if usable {
                for entry in &index.entries {
                    let _ = view.chunks.insert(entry.hash, *pack);
                }
            }
        }
        Ok(view)
    }

    /// Reads and verifies one pack's index.
    ///
    /// # Errors
    /// `Integrity` when it is missing, corrupt or describes another pack; store errors.
    pub fn load_index(&self, pack: &PackId) -> Result<PackIndex, EngineError> {
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

    /// Deletes a backup's manifest (the packs stay until `prune` reclaims them).
    ///
    /// # Errors
    /// `NotFound` when the backup does not exist, `Refused` when it is protected, store errors
    /// otherwise.
    pub fn delete_backup(&self, backup_id: &str) -> Result<(), EngineError> {
        match self.load_manifest(backup_id) {
            // A damaged manifest can be deleted: nothing else removes it.
            Ok(_) => {}
            Err(error) if error.kind == ErrorKind::Integrity => {}
            Err(error) => return Err(error),
        }
        if self.protected()?.contains(backup_id) {
            return Err(EngineError::new(
                ErrorKind::Refused,
                format!("backup {backup_id} is protected (`ferry unprotect {backup_id}` first)"),
            ));
        }
        self.store.delete(&layout::manifest_key(backup_id))?;
        Ok(())
    }

    /// Every manifest in the repository; one that cannot be read is returned with its error
    /// instead (damage to one backup does not stop a pass over the others).
    ///
    /// # Errors
    /// Store errors listing the manifests.
    pub fn load_all_manifests(&self) -> Result<Vec<LoadedManifest>, EngineError> {
        let ids = self.list_backups()?;
        let loaded = parallel_map(&ids, INDEX_FETCHES_IN_FLIGHT, |id| {
            Ok(match self.load_manifest(id) {
                // Deleted since the listing: gone, not damaged.
                Err(error) if error.kind == ErrorKind::NotFound => None,
                other => Some(other),
            })
        })?;
        Ok(ids.into_iter().zip(loaded).filter_map(|(id, loaded)| Some((id, loaded?))).collect())
    }

    /// Ids of the protected backups (`protected/<backup-id>` objects).
    ///
    /// # Errors
    /// Store errors.
    pub fn protected(&self) -> Result<HashSet<String>, EngineError> {
        Ok(self
            .store
            .list(gc::PROTECTED_PREFIX)?
            .iter()
            .filter_map(|object| gc::protected_backup(&object.key).map(str::to_owned))
            .collect())
    }

    /// Protects (or, with `protect` false, unprotects) an existing backup from every retention
    /// policy and from `delete`.
    ///
    /// # Errors
    /// `Usage` for a malformed id, `NotFound` when the backup does not exist (protecting), store
    /// errors.
    pub fn set_protected(&self, backup_id: &str, protect: bool) -> Result<(), EngineError> {
        if protect {
            let _ = self.load_manifest(backup_id)?;
            let body = serde_json::json!({"protected_at_client": Timestamp::now()});
            self.store.put(&gc::protected_key(backup_id), Bytes::from(body.to_string()))?;
        } else {
            if !layout::backup_id_valid(backup_id) {
                return Err(EngineError::new(
                    ErrorKind::Usage,
                    format!("invalid backup id {backup_id:?}"),
                ));
            }
            self.store.delete(&gc::protected_key(backup_id))?;
        }
        Ok(())
    }
}

/// A backup id and its manifest, or why it cannot be read.
pub type LoadedManifest = (String, Result<Manifest, EngineError>);

/// A mark and its time by the store's clock.
#[derive(Debug, Clone)]
pub struct LoadedMark {
    /// Its key, `gc/mark-…`.
    pub key: String,
    /// Its `LastModified`.
    pub written_at: u64,
    /// What it condemns.
    pub mark: Mark,
}

/// The marks of a repository.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    /// Every readable mark.
    pub marks: Vec<LoadedMark>,
    /// Every pack a readable mark condemns.
    pub packs: HashSet<PackId>,
    /// Marks that cannot be read: (key, problem).
    pub unreadable: Vec<(String, String)>,
}

/// What a backup may deduplicate against (`Repository::load_dedup_view`).
#[derive(Debug, Clone, Default)]
pub struct DedupView {
    /// Chunk to a pack that holds it and is usable.
    pub chunks: HashMap<ChunkHash, PackId>,
    /// Packs condemned by a mark: never deduplicated into.
    pub marked: HashSet<PackId>,
    /// Indexed packs that are missing.
    pub missing_packs: usize,
    /// Index entries of missing packs.
    pub missing_chunks: usize,
    /// Damaged indexes, marks or packs, for warnings.
    pub problems: Vec<String>,
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
