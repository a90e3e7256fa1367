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
use crate::native::fresh;
use crate::native::keys;
use crate::native::layout::crypt::{self, Cipher, Crypt, MasterSecret, RepoKeys};
use crate::native::layout::gc::{self, Mark};
use crate::native::layout::merged::{self, MergedIndex};
use crate::native::layout::{
    self, BACKUPS_PREFIX, BackupSummary, CATALOG_PREFIX, CONFIG_KEY, ChunkHash, FORMAT_VERSION,
    HASH_SCHEME, INDEX_PREFIX, IndexEntry, Manifest, ObjectKind, PACKS_PREFIX, PackId, PackIndex,
    RepoConfig, Timestamp,
};
use crate::store::{DatedObject, KeyRange, ObjectStore, StoreError};

/// Index objects fetched at once when loading a repository's index.
const INDEX_FETCHES_IN_FLIGHT: usize = 8;
/// Consolidated indexes fetched at once (each up to `MERGED_PACKS_MAX` packs).
const MERGED_FETCHES_IN_FLIGHT: usize = 2;
/// Range listings in flight at once (`list_split`). Also the number of ranges `packs/` is
/// listed in: with as many ranges as requests in flight, a listing of P pages takes about
/// P / 16 rounds, and a small repository one round.
const LIST_RANGES_IN_FLIGHT: usize = 16;
/// Backup ids per range when `backups/` is listed split at a catalog's ids: below a LIST page
/// (1,000 keys), so that a range is one request even with some backups committed since.
const BACKUPS_PER_RANGE: usize = 800;

/// An opened repository.
#[derive(Debug)]
pub struct Repository {
    /// Where its objects live.
    pub store: Box<dyn ObjectStore>,
    /// Its verified config.
    pub config: RepoConfig,
    /// Names chunks under the repository key.
    pub hasher: ChunkHasher,
    /// How records and objects are sealed: `Plain` (version 1) or under the keys `keys/`
    /// wraps (version 2).
    pub crypt: Crypt,
    /// The key object that opened an encrypted repository.
    pub key_id: Option<String>,
}

/// Encryption of a new repository (`ferry init --encrypt`).
#[derive(Debug)]
pub struct NewEncryption {
    /// Its AEAD.
    pub cipher: Cipher,
    /// The secret of its first key object: a passphrase or a key file.
    pub secret: crypt::Secret,
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
        Repository::init_with(store, chunk_size_bytes, gc::GcTiming::DEFAULT, None)
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
        encryption: Option<NewEncryption>,
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
        let key: [u8; 32] = fresh::random_bytes();
        let repository_id = PackId::random().to_hex();
        let mut config = RepoConfig {
            format_version: FORMAT_VERSION,
            repository_id,
            chunk_size_bytes,
            hash_scheme: HASH_SCHEME.to_string(),
            hash_key: layout::to_hex(&key),
            compression: "zstd".to_string(),
            created_at: layout::Timestamp::now(),
            gc_grace_secs: Some(gc_timing.grace_secs),
            encryption: None,
        };
        let (crypt, key_id) = match encryption {
            None => (Crypt::Plain, None),
            Some(encryption) => {
                config.format_version = crypt::FORMAT_VERSION_SEALED;
                config.hash_key = String::new();
                config.encryption = Some(crypt::EncryptionConfig {
                    cipher: encryption.cipher,
                    key_derivation: crypt::KEY_DERIVATION.to_string(),
                });
                let keys =
                    RepoKeys::derive(encryption.cipher, MasterSecret(key), fresh::random_nonce);
                // The key object first: a config without one would be a repository nobody
                // can open (`init` refuses a location holding anything, so a retry starts over
                // after removing it).
                let id = keys::write_key_object(
                    store.as_ref(),
                    &config.repository_id,
                    &keys,
                    &encryption.secret,
                )?;
                (Crypt::Sealed(std::sync::Arc::new(keys)), Some(id))
            }
        };
        config.validate()?;
        let hasher = ChunkHasher::new(match &crypt {
            Crypt::Plain => key,
            Crypt::Sealed(keys) => keys.id_key(),
        });
        let encoded = layout::encode_document(&crypt, ObjectKind::Config, &config);
        store.put(CONFIG_KEY, Bytes::from(encoded))?;
        Ok(Repository { store, hasher, config, crypt, key_id })
    }

    /// Opens the unencrypted repository in `store` (`open_with` for an encrypted one).
    ///
    /// # Errors
    /// As `open_with`.
    pub fn open(store: Box<dyn ObjectStore>) -> Result<Repository, EngineError> {
        Repository::open_with(store, &keys::KeySource::None)
    }

    /// Opens the repository in `store`; an encrypted one with the passphrase or key file `key`.
    ///
    /// # Errors
    /// `NotFound` when there is no repository, `Integrity` when its config is corrupt,
    /// `KeyRefused` when no key object opens with the key, `KeyNeeded` when it is encrypted
    /// and no key is given, or one is given for an unencrypted repository;
    /// store errors otherwise.
    pub fn open_with(
        store: Box<dyn ObjectStore>,
        key: &keys::KeySource,
    ) -> Result<Repository, EngineError> {
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
        let config: RepoConfig = layout::decode_document(
            &Crypt::Plain,
            ObjectKind::Config,
            "repository config",
            &bytes,
        )?;
        config.validate()?;
        match &config.encryption {
            None => {
                if let keys::KeySource::Given(secret) = key {
                    // A write-access attacker could replace an encrypted repository's config
                    // with an unencrypted one: a caller that expects encryption is told.
                    return Err(EngineError::new(
                        ErrorKind::KeyNeeded,
                        format!(
                            "a {} was given but the repository at {} is not encrypted",
                            secret.kind().name(),
                            store.describe()
                        ),
                    ));
                }
                let hasher = ChunkHasher::new(config.hash_key_bytes()?);
                Ok(Repository { store, config, hasher, crypt: Crypt::Plain, key_id: None })
            }
            Some(encryption) => {
                let (keys, key_id) =
                    keys::unlock(store.as_ref(), &config.repository_id, encryption.cipher, key)?;
                let hasher = ChunkHasher::new(keys.id_key());
                let crypt = Crypt::Sealed(std::sync::Arc::new(keys));
                Ok(Repository { store, config, hasher, crypt, key_id: Some(key_id) })
            }
        }
    }

    /// The keys of an encrypted repository, for the key commands.
    ///
    /// # Errors
    /// `Usage` for an unencrypted repository.
    pub fn key_ring(&self) -> Result<keys::KeyRing<'_>, EngineError> {
        match (&self.crypt, &self.key_id) {
            (Crypt::Sealed(keys), Some(id)) => Ok(keys::KeyRing {
                store: self.store.as_ref(),
                repository_id: &self.config.repository_id,
                keys,
                opened_with: id,
            }),
            _ => Err(EngineError::new(
                ErrorKind::Usage,
                format!(
                    "the repository at {} is not encrypted: it has no keys",
                    self.store.describe()
                ),
            )),
        }
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
            let decoded =
                layout::decode_document::<Mark>(&self.crypt, ObjectKind::Mark, &object.key, &bytes)
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
        // Pack ids are random, so ranges between the two-hex directories hold about as many
        // packs each: `packs/` is listed as ranges cut at packs/10, packs/20, ..., packs/f0.
        let splits: Vec<String> = (1..LIST_RANGES_IN_FLIGHT)
            .map(|k| format!("{PACKS_PREFIX}{:02x}", k * 256 / LIST_RANGES_IN_FLIGHT))
            .collect();
        let listing =
            list_split(&splits, |range| self.store.list_dated_range(PACKS_PREFIX, range))?;
        Ok(listing
            .into_iter()
            .filter_map(|object| Some((layout::pack_from_key(&object.key)?, object)))
            .collect())
    }

    /// What `index/` holds: per-pack indexes by pack, and consolidated indexes.
    ///
    /// # Errors
    /// Store errors.
    pub fn list_indexes(&self) -> Result<IndexListing, EngineError> {
        let mut listing = IndexListing::default();
        for object in self.store.list_dated(INDEX_PREFIX)? {
            if let Some(pack) = layout::index_pack_from_key(&object.key) {
                let _ = listing.per_pack.insert(pack, object);
            } else if let Some(id) = merged::merged_from_key(&object.key) {
                listing.merged.push((id, object));
            }
        }
        Ok(listing)
    }

    /// Reads and verifies a consolidated index; `None` when it is gone (superseded and deleted
    /// since it was listed: its successor is older than the grace, so any listing taken after
    /// this one shows it).
    ///
    /// # Errors
    /// `Integrity` when it does not verify; store errors.
    pub fn load_merged(&self, id: PackId) -> Result<Option<MergedIndex>, EngineError> {
        let key = merged::merged_key(id);
        let bytes = match self.store.get(&key) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        Ok(Some(MergedIndex::decode(&self.crypt, &key, &bytes)?))
    }

    /// Calls `visit` with every readable index `listing` shows: every consolidated index's
    /// packs (`true`), then the own index of each pack none of them holds (`false`). A pack
    /// may be visited more than once (held by two consolidated indexes). Returns the damaged
    /// indexes as problems; a store error stops the visit.
    ///
    /// # Errors
    /// Store errors.
    pub fn visit_indexes(
        &self,
        listing: &IndexListing,
        visit: impl Fn(&PackIndex, bool) + Sync,
    ) -> Result<Vec<String>, EngineError> {
        let problems = Mutex::new(Vec::new());
        let covered = Mutex::new(HashSet::new());
        // Two at a time: each is up to 25 MiB decoded, and what the caller builds must stay
        // small.
        let _ = parallel_map(&listing.merged, MERGED_FETCHES_IN_FLIGHT, |(id, _)| {
            match self.load_merged(*id) {
                Ok(Some(merged)) => {
                    for index in &merged.packs {
                        visit(index, true);
                    }
                    lock(&covered).extend(merged.packs.iter().map(|index| index.pack));
                }
                Ok(None) => {}
                Err(error) if error.kind == ErrorKind::Integrity => lock(&problems)
                    .push(format!("{} (its packs' own indexes are read instead)", error.message)),
                Err(error) => return Err(error),
            }
            Ok(())
        })?;
        let uncovered: Vec<PackId> = {
            let covered = lock(&covered);
            listing.per_pack.keys().filter(|pack| !covered.contains(*pack)).copied().collect()
        };
        let _ = parallel_map(&uncovered, INDEX_FETCHES_IN_FLIGHT, |pack| {
            match self.load_index(pack) {
                Ok(index) => visit(&index, false),
                Err(error) if error.kind == ErrorKind::Integrity => {
                    lock(&problems).push(format!("{} (its chunks are stored again)", error.message))
                }
                Err(error) => return Err(error),
            }
            Ok(())
        })?;
        Ok(problems.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The readable index of every pack in `packs` (a listing) whose size is what its index
    /// says: what prune and the fallback of `locate` resolve chunks through.
    ///
    /// # Errors
    /// Store errors.
    pub fn load_present_indexes(
        &self,
        packs: &HashMap<PackId, DatedObject>,
    ) -> Result<HashMap<PackId, PackIndex>, EngineError> {
        let listing = self.list_indexes()?;
        let found = Mutex::new(HashMap::new());
        let _ = self.visit_indexes(&listing, |index, _| {
            if packs
                .get(&index.pack)
                .is_some_and(|object| object.size_bytes == index.pack_size_bytes)
            {
                let _ = lock(&found).entry(index.pack).or_insert_with(|| index.clone());
            }
        })?;
        Ok(found.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Reads and verifies one pack's own index.
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
        let index: PackIndex =
            layout::decode_document(&self.crypt, ObjectKind::Index, &key, &bytes)?;
        if index.pack != *pack {
            return Err(EngineError::new(
                ErrorKind::Integrity,
                format!("index object {key} describes pack {}", index.pack),
            ));
        }
        Ok(index)
    }

    /// The index of each of `packs`, from its own index object or, when that is missing or
    /// damaged, from a consolidated index (read only then). A pack found in neither keeps the
    /// error of its own index.
    ///
    /// # Errors
    /// Store errors.
    pub fn find_indexes(
        &self,
        packs: &[PackId],
    ) -> Result<Vec<Result<PackIndex, EngineError>>, EngineError> {
        Ok(self
            .find_indexes_sourced(packs)?
            .into_iter()
            .map(|found| found.map(|(index, _)| index))
            .collect())
    }

    /// `find_indexes`, saying of each index found whether it is the pack's own (`true`) or a
    /// consolidated index's copy: a sweep deletes a pack's own index before the pack, so a
    /// pack with its own index exists, while one found only in a consolidated index may be
    /// gone (consolidated indexes are not rewritten when a pack is swept).
    fn find_indexes_sourced(&self, packs: &[PackId]) -> Result<Vec<FoundIndex>, EngineError> {
        let mut found =
            parallel_map(packs, INDEX_FETCHES_IN_FLIGHT, |pack| match self.load_index(pack) {
                Err(error) if error.kind == ErrorKind::Integrity => Ok(Err(error)),
                other => other.map(|index| Ok((index, true))),
            })?;
        // A consolidated index deleted between our listing and our read was superseded by one
        // older than the grace: the next listing has it. Three listings settle any race.
        for _ in 0..3 {
            let wanted: HashMap<PackId, usize> = packs
                .iter()
                .zip(&found)
                .enumerate()
                .filter(|(_, (_, found))| found.is_err())
                .map(|(position, (pack, _))| (*pack, position))
                .collect();
            if wanted.is_empty() {
                break;
            }
            let listing = self.list_indexes()?;
            let results = Mutex::new(Vec::new());
            let vanished = AtomicUsize::new(0);
            let _ = parallel_map(&listing.merged, INDEX_FETCHES_IN_FLIGHT, |(id, _)| {
                match self.load_merged(*id) {
                    Ok(Some(merged)) => lock(&results).extend(
                        merged.packs.into_iter().filter(|index| wanted.contains_key(&index.pack)),
                    ),
                    Ok(None) => {
                        let _ = vanished.fetch_add(1, Ordering::Relaxed);
                    }
                    // A damaged consolidated index: the packs it alone held stay unresolved.
                    Err(error) if error.kind == ErrorKind::Integrity => {}
                    Err(error) => return Err(error),
                }
                Ok(())
            })?;
            for index in results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
                let position = wanted[&index.pack];
                found[position] = Ok((index, false));
            }
            if vanished.load(Ordering::Relaxed) == 0 {
                break;
            }
        }
        Ok(found)
    }

    /// Whether the object of `pack` exists with `size_bytes` (one listing request).
    ///
    /// # Errors
    /// Store errors.
    pub fn pack_exists(&self, pack: &PackId, size_bytes: u64) -> Result<bool, EngineError> {
        let key = pack.pack_key();
        Ok(self
            .store
            .list(&key)?
            .iter()
            .any(|object| object.key == key && object.size_bytes == size_bytes))
    }

    /// Where each chunk of `manifest` is: through the indexes of the packs it lists, and, for
    /// chunks none of those holds any more (their pack was repacked and swept), through every
    /// index of the repository (the copies a repack wrote). A pack known only from a
    /// consolidated index is checked to exist first.
    ///
    /// # Errors
    /// `Integrity` naming the first chunk no existing pack holds (with what is wrong with the
    /// backup's own packs); store errors.
    pub fn locate(&self, manifest: &Manifest) -> Result<HashMap<ChunkHash, Location>, EngineError> {
        let found = self.find_indexes_sourced(&manifest.packs)?;
        let exists = parallel_map(&found, INDEX_FETCHES_IN_FLIGHT, |found| match found {
            Ok((index, false)) => self.pack_exists(&index.pack, index.pack_size_bytes),
            Ok((_, true)) => Ok(true),
            Err(_) => Ok(false),
        })?;
        let mut map = HashMap::new();
        let mut problems = Vec::new();
        for ((pack, found), exists) in manifest.packs.iter().zip(found).zip(exists) {
            match found {
                Ok((index, _)) if exists => {
                    for entry in index.entries {
                        let _ = map.insert(entry.hash, Location { pack: index.pack, entry });
                    }
                }
                Ok(_) => problems.push(format!("pack {} is missing", pack.pack_key())),
                Err(error) => problems.push(error.message),
            }
        }
        let mut missing: HashSet<ChunkHash> = manifest
            .chunks
            .iter()
            .flatten()
            .filter(|hash| !map.contains_key(*hash))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(map);
        }
        let found = self.locate_elsewhere(&missing)?;
        missing.retain(|hash| !found.contains_key(hash));
        map.extend(found);
        match missing.iter().next() {
            None => Ok(map),
            Some(hash) => Err(EngineError::new(
                ErrorKind::Integrity,
                format!(
                    "backup {} references chunk {hash} (and {} more), which no existing pack \
                     holds{}",
                    manifest.backup_id,
                    missing.len() - 1,
                    if problems.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", problems.join("; "))
                    }
                ),
            )),
        }
    }

    /// Where the `missing` chunks are held, by every index of the repository, in packs that
    /// exist with their indexed size (the copies a repack wrote of a pack since swept). Reads
    /// only those chunks' entries (a repository's index can be far larger than one backup) and
    /// checks each candidate pack with one listing request.
    ///
    /// # Errors
    /// Store errors.
    pub fn locate_elsewhere(
        &self,
        missing: &HashSet<ChunkHash>,
    ) -> Result<HashMap<ChunkHash, Location>, EngineError> {
        let listing = self.list_indexes()?;
        let candidates: Mutex<Vec<(PackId, u64, IndexEntry)>> = Mutex::new(Vec::new());
        let _ = self.visit_indexes(&listing, |index, _| {
            let found: Vec<_> = index
                .entries
                .iter()
                .filter(|entry| missing.contains(&entry.hash))
                .map(|entry| (index.pack, index.pack_size_bytes, *entry))
                .collect();
            lock(&candidates).extend(found);
        })?;
        let mut candidates =
            candidates.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        candidates.sort_unstable_by_key(|(pack, _, entry)| (*pack, entry.offset));
        let mut packs: Vec<(PackId, u64)> =
            candidates.iter().map(|(pack, size, _)| (*pack, *size)).collect();
        packs.dedup();
        let exists = parallel_map(&packs, INDEX_FETCHES_IN_FLIGHT, |(pack, size)| {
            self.pack_exists(pack, *size)
        })?;
        let present: HashSet<PackId> = packs
            .iter()
            .zip(exists)
            .filter(|(_, exists)| *exists)
            .map(|((pack, _), _)| *pack)
            .collect();
        let mut found = HashMap::new();
        for (pack, _, entry) in candidates {
            if present.contains(&pack) {
                let _ = found.entry(entry.hash).or_insert(Location { pack, entry });
            }
        }
        Ok(found)
    }

    /// A summary of every backup: from the catalogs a prune wrote, and from the manifests of
    /// the backups no catalog holds (those committed since the last prune). A summary whose
    /// manifest is not listed is not shown (forgotten since). One that cannot be read comes
    /// with its error.
    ///
    /// # Errors
    /// Store errors.
    pub fn list_summaries(&self) -> Result<Vec<LoadedSummary>, EngineError> {
        let mut known: HashMap<String, BackupSummary> = HashMap::new();
        for object in self.store.list(CATALOG_PREFIX)? {
            if layout::catalog_from_key(&object.key).is_none() {
                continue;
            }
            let bytes = match self.store.get(&object.key) {
                Ok(bytes) => bytes,
                // Replaced since the listing: the manifests say the same.
                Err(StoreError::NotFound { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            // A damaged catalog is informative only: the manifests say the same.
            let Ok(catalog) = layout::decode_document::<layout::BackupCatalog>(
                &self.crypt,
                ObjectKind::Catalog,
                &object.key,
                &bytes,
            ) else {
                continue;
            };
            for summary in catalog.backups {
                let _ = known.insert(summary.backup_id.clone(), summary);
            }
        }
        // Listed after the catalogs were read: a backup exists if and only if its manifest is
        // listed, whatever the catalogs say; their ids only say where to split the listing.
        let mut catalogued: Vec<&str> = known.keys().map(String::as_str).collect();
        catalogued.sort_unstable();
        let ids = self.list_backups_split_at(&catalogued)?;
        let missing: Vec<String> =
            ids.iter().filter(|id| !known.contains_key(*id)).cloned().collect();
        let loaded = parallel_map(&missing, INDEX_FETCHES_IN_FLIGHT, |id| {
            Ok(match self.load_manifest(id) {
                Err(error) if error.kind == ErrorKind::NotFound => None,
                other => Some(other.map(|manifest| BackupSummary::of(&manifest))),
            })
        })?;
        let mut fresh: HashMap<String, Result<BackupSummary, EngineError>> = missing
            .into_iter()
            .zip(loaded)
            .filter_map(|(id, loaded)| Some((id, loaded?)))
            .collect();
        Ok(ids
            .into_iter()
            .filter_map(|id| {
                let summary = known.remove(&id).map(Ok).or_else(|| fresh.remove(&id))?;
                Some((id, summary))
            })
            .collect())
    }

    /// Ids of every backup, sorted (ids start with their UTC start time).
    ///
    /// # Errors
    /// Store errors.
    pub fn list_backups(&self) -> Result<Vec<String>, EngineError> {
        self.list_backups_split_at(&[])
    }

    /// `list_backups`, listed as parallel ranges of about `BACKUPS_PER_RANGE` ids of `known`
    /// (sorted ids some earlier listing saw, e.g. a catalog's): one request per range instead
    /// of one page after another. Any ids give the same result, only slower or faster.
    ///
    /// # Errors
    /// Store errors.
    fn list_backups_split_at(&self, known: &[&str]) -> Result<Vec<String>, EngineError> {
        let ranges = known.len().div_ceil(BACKUPS_PER_RANGE).max(1);
        let splits: Vec<String> =
            (1..ranges).map(|k| layout::manifest_key(known[k * known.len() / ranges])).collect();
        let listing = list_split(&splits, |range| self.store.list_range(BACKUPS_PREFIX, range))?;
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
        let manifest: Manifest = layout::decode_document(
            &self.crypt,
            ObjectKind::Manifest,
            &format!("manifest {key}"),
            &bytes,
        )?;
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

/// An index found for a pack and whether it is the pack's own, or why none was.
type FoundIndex = Result<(PackIndex, bool), EngineError>;

/// A backup id and its manifest, or why it cannot be read.
pub type LoadedManifest = (String, Result<Manifest, EngineError>);

/// A backup id and its summary, or why it cannot be read.
pub type LoadedSummary = (String, Result<BackupSummary, EngineError>);

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
/// What `index/` holds (`Repository::list_indexes`).
#[derive(Debug, Clone, Default)]
pub struct IndexListing {
    /// Per-pack index objects `index/<pack>`, by pack.
    pub per_pack: HashMap<PackId, DatedObject>,
    /// Consolidated indexes `index/merged/<id>`.
    pub merged: Vec<(PackId, DatedObject)>,
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

/// Lists a sorted key space in parallel: as the ranges the split points cut it into,
/// (-inf, s1], (s1, s2], ..., (sn, +inf) once sorted and deduplicated, each listed by
/// `list_range`, `LIST_RANGES_IN_FLIGHT` at once, the results concatenated in key order.
///
/// Correct whatever the split points, which need not be keys, or sorted, or still exist: the
/// ranges tile the key space, so every key lies in exactly one, and a key present throughout is
/// listed exactly once (as by one paged listing, whose pages are not one snapshot either).
///
/// # Errors
/// The first store error of a range.
pub fn list_split<T: Send>(
    splits: &[String],
    list_range: impl Fn(KeyRange<'_>) -> Result<Vec<T>, StoreError> + Sync,
) -> Result<Vec<T>, EngineError> {
    let mut splits: Vec<&str> = splits.iter().map(String::as_str).collect();
    splits.sort_unstable();
    splits.dedup();
    // Range k: after splits[k - 1] (from the start for k = 0), through splits[k]: its end is the
    // least key after splits[k], the split point with a NUL appended.
    let bounds: Vec<(&str, Option<String>)> = (0..=splits.len())
        .map(|k| {
            let start_after = if k == 0 { "" } else { splits[k - 1] };
            (start_after, splits.get(k).map(|split| format!("{split}\0")))
        })
        .collect();
    let listed = parallel_map(&bounds, LIST_RANGES_IN_FLIGHT, |(start_after, end)| {
        Ok(list_range(KeyRange { start_after, end: end.as_deref() })?)
    })?;
    Ok(listed.into_iter().flatten().collect())
}

/// Locks a mutex, ignoring poisoning (a panic aborts the process in release builds anyway).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
