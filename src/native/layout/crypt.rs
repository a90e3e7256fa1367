//! Client-side encryption of the repository format, version 2: the keys derived from a
//! repository's master secret, the sealing of pack records and envelope payloads, and the key
//! objects (`keys/<id>`) that wrap the master secret under a passphrase.
//!
//! Pure like the rest of `layout`: no I/O. Random nonces come from the function the caller gives
//! `RepoKeys::derive` (`native::fresh::random_nonce`), salts and ids from the caller; Argon2id is
//! computation. The layout is documented in FORMAT.md ("Encryption").
//!
//! - The master secret (32 random bytes) never leaves memory unwrapped. From it BLAKE3
//!   `derive_key` gives the chunk-id key (keyed BLAKE3 names chunks, as in version 1, so dedup
//!   works inside the repository), the record key and the object key.
//! - A record is sealed with a per-chunk subkey (keyed BLAKE3 of the chunk id under the record
//!   key) and a random 96-bit nonce; its associated data is the chunk id, the format version,
//!   the encoding byte and the raw length. Neither the pack nor the offset is bound: repacking
//!   copies records verbatim, and a record moved elsewhere is caught because the authenticated
//!   index names another chunk (or another offset) than the header found there, and a header
//!   rewritten to match changes the associated data, so the tag fails.
//! - An envelope payload is sealed with the object key and a random nonce; its associated data
//!   is the envelope header (magic, version, kind, encoding, decoded length).

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::{ChunkHash, Encoding, FORMAT_VERSION, RecordHeader, to_hex};

/// The format version of an encrypted repository.
pub const FORMAT_VERSION_SEALED: u32 = 2;
/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 12;
/// Bytes of an authentication tag.
pub const TAG_BYTES: usize = 16;
/// Bytes a sealed payload has beyond its plaintext: nonce and tag, after the ciphertext.
pub const SEAL_OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
/// Prefix of key objects.
pub const KEYS_PREFIX: &str = "keys/";
/// Argon2id memory cost by default: 64 MiB.
pub const KDF_MEMORY_KIB_DEFAULT: u32 = 64 << 10;
/// Argon2id passes by default (about 0.2 s on one core of the reference host, perf/results).
pub const KDF_ITERATIONS_DEFAULT: u32 = 3;
/// The least memory cost accepted from a key object (a forged cheap key object is refused).
const KDF_MEMORY_KIB_MIN: u32 = 64 << 10;
/// The most memory cost accepted from a key object (a forged one must not exhaust memory).
const KDF_MEMORY_KIB_MAX: u32 = 4 << 20;
/// The most passes accepted from a key object.
const KDF_ITERATIONS_MAX: u32 = 64;

const CONTEXT_ID: &str = "ferry 2026-11 chunk id key";
const CONTEXT_RECORD: &str = "ferry 2026-11 record key";
const CONTEXT_OBJECT: &str = "ferry 2026-11 object key";
const KEY_AAD_PREFIX: &[u8] = b"ferry key object 1";

/// The AEAD of an encrypted repository, chosen at `init` (AES-256-GCM when the CPU has AES
/// instructions, ChaCha20-Poly1305 otherwise) and recorded in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256-GCM.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
}

impl Cipher {
    /// The faster AEAD on this CPU: AES-256-GCM with AES and carry-less multiply instructions.
    pub fn for_this_cpu() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        let hardware_aes = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq");
        #[cfg(target_arch = "aarch64")]
        let hardware_aes = std::arch::is_aarch64_feature_detected!("aes");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let hardware_aes = false;
        if hardware_aes { Cipher::Aes256Gcm } else { Cipher::Chacha20Poly1305 }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn key(self, bytes: &[u8; 32]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(self.algorithm(), bytes).expect("32-byte key"))
    }
}

/// The config's description of an encrypted repository (`encryption`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// The AEAD of records and objects.
    pub cipher: Cipher,
    /// How keys derive from the master secret: `blake3-derive-key`.
    pub key_derivation: String,
}

/// Name of the key derivation recorded in the config.
pub const KEY_DERIVATION: &str = "blake3-derive-key";

/// The 32-byte master secret of an encrypted repository.
#[derive(Clone)]
pub struct MasterSecret(pub [u8; 32]);

impl std::fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterSecret(<redacted>)")
    }
}

/// The keys of an encrypted repository, derived from its master secret.
pub struct RepoKeys {
    cipher: Cipher,
    master: MasterSecret,
    id_key: [u8; 32],
    record_key: [u8; 32],
    object_key: LessSafeKey,
    nonce: fn() -> [u8; NONCE_BYTES],
}

impl std::fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKeys({:?}, <redacted>)", self.cipher)
    }
}

impl RepoKeys {
    /// Derives the keys of `master` for `cipher`; `nonce` gives a fresh random nonce per call.
    pub fn derive(
        cipher: Cipher,
        master: MasterSecret,
        nonce: fn() -> [u8; NONCE_BYTES],
    ) -> RepoKeys {
        RepoKeys {
            nonce,
            cipher,
            id_key: blake3::derive_key(CONTEXT_ID, &master.0),
            record_key: blake3::derive_key(CONTEXT_RECORD, &master.0),
            object_key: cipher.key(&blake3::derive_key(CONTEXT_OBJECT, &master.0)),
            master,
        }
    }

    /// The key that names chunks (keyed BLAKE3).
    pub fn id_key(&self) -> [u8; 32] {
        self.id_key
    }

    /// The master secret (to wrap it in another key object).
    pub fn master(&self) -> &MasterSecret {
        &self.master
    }

    /// The AEAD.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    fn record_subkey(&self, hash: &[u8; 32]) -> LessSafeKey {
        self.cipher.key(blake3::keyed_hash(&self.record_key, hash).as_bytes())
    }

    /// Seals the stored bytes of a record in place: `buf` becomes ciphertext, nonce, tag.
    /// `aad` is `record_aad` of the record's header fields.
    pub fn seal_record(&self, hash: &[u8; 32], aad: &[u8], buf: &mut Vec<u8>) {
        seal_with(&self.record_subkey(hash), (self.nonce)(), aad, buf);
    }

    /// Opens a sealed record's stored bytes (ciphertext, nonce, tag) into `out`, which must be
    /// exactly the ciphertext's length.
    ///
    /// # Errors
    /// A message when the record is too short or does not authenticate.
    pub fn open_record(
        &self,
        hash: &[u8; 32],
        aad: &[u8],
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        open_into(&self.record_subkey(hash), aad, sealed, out)
    }

    /// Seals an envelope payload in place (`aad`: the envelope header).
    pub fn seal_object(&self, aad: &[u8], buf: &mut Vec<u8>) {
        seal_with(&self.object_key, (self.nonce)(), aad, buf);
    }

    /// Opens a sealed envelope payload.
    ///
    /// # Errors
    /// A message when the payload is too short or does not authenticate.
    pub fn open_object(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; sealed.len().saturating_sub(SEAL_OVERHEAD)];
        open_into(&self.object_key, aad, sealed, &mut out)?;
        Ok(out)
    }
}

/// Associated data of a sealed record: chunk id, format version, encoding byte, raw length.
pub fn record_aad(hash: &[u8; 32], encoding_byte: u8, raw_bytes: u32) -> [u8; 39] {
    let mut aad = [0u8; 39];
    aad[..32].copy_from_slice(hash);
    aad[32..34]
        .copy_from_slice(&u16::try_from(FORMAT_VERSION_SEALED).expect("small").to_le_bytes());
    aad[34] = encoding_byte;
    aad[35..39].copy_from_slice(&raw_bytes.to_le_bytes());
    aad
}

fn seal_with(key: &LessSafeKey, nonce: [u8; NONCE_BYTES], aad: &[u8], buf: &mut Vec<u8>) {
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
        .expect("sealing in memory cannot fail below the AEAD's length limit");
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(tag.as_ref());
}

fn open_into(key: &LessSafeKey, aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Result<(), String> {
    let Some(length) = sealed.len().checked_sub(SEAL_OVERHEAD) else {
        return Err(format!("{} sealed bytes, shorter than nonce and tag", sealed.len()));
    };
    if out.len() != length {
        return Err(format!("{length} bytes of ciphertext where {} were expected", out.len()));
    }
    let nonce: [u8; NONCE_BYTES] = sealed[length..length + NONCE_BYTES].try_into().expect("12");
    let tag: [u8; TAG_BYTES] = sealed[length + NONCE_BYTES..].try_into().expect("16");
    // One copy into the destination, then decryption in place there (ring opens in place).
    out.copy_from_slice(&sealed[..length]);
    key.open_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        Tag::from(tag),
        out,
        0..,
    )
    .map(|_| ())
    .map_err(|_| "authentication failed (tampered, or sealed for another chunk)".to_string())
}

/// Argon2id parameters of a key object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// `argon2id`.
    pub algorithm: String,
    /// Argon2 version (19 = 0x13).
    pub version: u32,
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
    /// 32 random bytes, hex.
    pub salt: String,
}

impl KdfParams {
    /// Defaults (64 MiB, 3 passes, 1 lane) with `salt` (32 random bytes).
    pub fn with_salt(salt: [u8; 32]) -> KdfParams {
        KdfParams {
            algorithm: "argon2id".into(),
            version: 19,
            memory_kib: KDF_MEMORY_KIB_DEFAULT,
            iterations: KDF_ITERATIONS_DEFAULT,
            parallelism: 1,
            salt: to_hex(&salt),
        }
    }

    /// The key-encryption key of `passphrase`.
    ///
    /// # Errors
    /// A message when the parameters are not ones this build accepts.
    pub fn derive_kek(&self, passphrase: &[u8]) -> Result<[u8; 32], String> {
        if self.algorithm != "argon2id" || self.version != 19 {
            return Err(format!("unknown key derivation {} v{}", self.algorithm, self.version));
        }
        if !(KDF_MEMORY_KIB_MIN..=KDF_MEMORY_KIB_MAX).contains(&self.memory_kib)
            || !(1..=KDF_ITERATIONS_MAX).contains(&self.iterations)
            || !(1..=16).contains(&self.parallelism)
        {
            return Err(format!(
                "Argon2id parameters out of range (m {} KiB, t {}, p {})",
                self.memory_kib, self.iterations, self.parallelism
            ));
        }
        let salt = hex_bytes::<32>(&self.salt).ok_or("the salt is not 64 hex characters")?;
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|error| format!("Argon2id parameters: {error}"))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = [0u8; 32];
        argon
            .hash_password_into(passphrase, &salt, &mut kek)
            .map_err(|error| format!("Argon2id: {error}"))?;
        Ok(kek)
    }
}

/// A key object (`keys/<16 hex>`, plain JSON): the master secret wrapped under a key derived
/// from a passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyObject {
    /// 1.
    pub key_format: u32,
    /// The repository it opens (bound into the wrapping's associated data).
    pub repository_id: String,
    /// Unix seconds.
    pub created_at: super::Timestamp,
    /// How the key-encryption key derives from the passphrase.
    pub kdf: KdfParams,
    /// The AEAD wrapping the master secret.
    pub cipher: Cipher,
    /// The master secret sealed under the key-encryption key: ciphertext, nonce, tag (hex).
    pub wrapped: String,
}

/// Key of a key object.
pub fn key_object_key(id: &str) -> String {
    format!("{KEYS_PREFIX}{id}")
}

/// The id of a key object's key (`None` for another key).
pub fn key_id_from_key(key: &str) -> Option<&str> {
    let id = key.strip_prefix(KEYS_PREFIX)?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

fn key_aad(repository_id: &str, id: &str) -> Vec<u8> {
    let mut aad = KEY_AAD_PREFIX.to_vec();
    aad.extend_from_slice(repository_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(id.as_bytes());
    aad
}

impl KeyObject {
    /// Wraps `master` under `passphrase` with `kdf` and a fresh `nonce`, for the key object
    /// `id` of `repository_id`.
    ///
    /// # Errors
    /// A message when the KDF parameters are refused.
    pub fn wrap(
        master: &MasterSecret,
        passphrase: &[u8],
        kdf: KdfParams,
        (cipher, nonce): (Cipher, [u8; NONCE_BYTES]),
        (repository_id, id): (&str, &str),
        created_at: super::Timestamp,
    ) -> Result<KeyObject, String> {
        let kek = kdf.derive_kek(passphrase)?;
        let mut buf = master.0.to_vec();
        seal_with(&cipher.key(&kek), nonce, &key_aad(repository_id, id), &mut buf);
        Ok(KeyObject {
            key_format: 1,
            repository_id: repository_id.to_string(),
            created_at,
            kdf,
            cipher,
            wrapped: to_hex(&buf),
        })
    }

    /// The master secret, if `passphrase` opens this key object `id`.
    ///
    /// # Errors
    /// `Ok(None)` for a wrong passphrase; `Err` when the object is malformed.
    pub fn unwrap_master(
        &self,
        passphrase: &[u8],
        repository_id: &str,
        id: &str,
    ) -> Result<Option<MasterSecret>, String> {
        if self.key_format != 1 {
            return Err(format!("unknown key format {}", self.key_format));
        }
        let wrapped = hex_bytes::<{ 32 + SEAL_OVERHEAD }>(&self.wrapped)
            .ok_or("the wrapped secret is not 120 hex characters")?;
        let kek = self.kdf.derive_kek(passphrase)?;
        let mut master = [0u8; 32];
        match open_into(&self.cipher.key(&kek), &key_aad(repository_id, id), &wrapped, &mut master)
        {
            Ok(()) => Ok(Some(MasterSecret(master))),
            Err(_) => Ok(None),
        }
    }
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    super::hex_decode(text, &mut out)?;
    Some(out)
}

/// Bit of a record's encoding byte that says its stored bytes are sealed.
pub const SEALED_FLAG: u8 = 0x80;

/// How a repository's objects and records are protected: not at all (format version 1), or
/// sealed under its keys (format version 2).
#[derive(Debug, Clone)]
pub enum Crypt {
    /// Version 1: plaintext, byte for byte as before encryption existed.
    Plain,
    /// Version 2: records and envelope payloads sealed.
    Sealed(Arc<RepoKeys>),
}

impl Crypt {
    /// The format version of the repository's objects.
    pub fn format_version(&self) -> u32 {
        match self {
            Crypt::Plain => FORMAT_VERSION,
            Crypt::Sealed(_) => FORMAT_VERSION_SEALED,
        }
    }

    /// Whether records and objects are sealed.
    pub fn is_sealed(&self) -> bool {
        matches!(self, Crypt::Sealed(_))
    }

    /// Seals a record's stored bytes in place (nothing for a plain repository).
    pub fn seal_record(
        &self,
        hash: &ChunkHash,
        encoding: Encoding,
        raw_bytes: u32,
        buf: &mut Vec<u8>,
    ) {
        if let Crypt::Sealed(keys) = self {
            let aad = record_aad(&hash.0, encoding as u8 | SEALED_FLAG, raw_bytes);
            keys.seal_record(&hash.0, &aad, buf);
        }
    }

    /// The encoded (possibly compressed) bytes of a verified record: `stored` itself for a plain
    /// repository, else opened into `scratch` (or straight into `out` for a raw chunk, which
    /// then needs no decoding: returns `None`).
    ///
    /// # Errors
    /// A message when the record's sealing does not match the repository's, or it does not
    /// authenticate.
    pub fn open_record<'a>(
        &self,
        header: &RecordHeader,
        stored: &'a [u8],
        out: &mut [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>, String> {
        match self {
            Crypt::Plain if header.sealed => {
                Err("an encrypted record in an unencrypted repository".into())
            }
            Crypt::Plain => Ok(Some(stored)),
            Crypt::Sealed(_) if !header.sealed => {
                Err("an unencrypted record in an encrypted repository".into())
            }
            Crypt::Sealed(keys) => {
                let aad = record_aad(&header.hash.0, header.encoding_byte(), header.raw_bytes);
                let length = stored.len().saturating_sub(SEAL_OVERHEAD);
                if header.encoding == Encoding::Raw {
                    let raw = usize::try_from(header.raw_bytes).expect("fits");
                    if length != raw || out.len() < raw {
                        return Err(format!("raw chunk of {length} bytes, expected {raw}"));
                    }
                    keys.open_record(&header.hash.0, &aad, stored, &mut out[..raw])?;
                    return Ok(None);
                }
                scratch.resize(length, 0);
                keys.open_record(&header.hash.0, &aad, stored, scratch)?;
                Ok(Some(scratch))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter_nonce() -> [u8; NONCE_BYTES] {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..8].copy_from_slice(
            &NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes(),
        );
        nonce
    }

    fn keys(cipher: Cipher) -> RepoKeys {
        RepoKeys::derive(cipher, MasterSecret([3; 32]), counter_nonce)
    }

    // A record opens only with its own chunk id and header fields; any flipped byte fails.
    #[test]
    fn records_bind_chunk_id_and_header() {
        for cipher in [Cipher::Aes256Gcm, Cipher::Chacha20Poly1305] {
            let keys = keys(cipher);
            let (a, b) = ([1u8; 32], [2u8; 32]);
            let plain = b"secret volume bytes ".repeat(50);
            let mut sealed = plain.clone();
            keys.seal_record(&a, &record_aad(&a, 0x80, 1000), &mut sealed);
            assert_eq!(sealed.len(), plain.len() + SEAL_OVERHEAD);
            assert!(!sealed.windows(6).any(|w| w == b"secret"));
            let mut out = vec![0u8; plain.len()];
            keys.open_record(&a, &record_aad(&a, 0x80, 1000), &sealed, &mut out).unwrap();
            assert_eq!(out, plain);
            assert!(keys.open_record(&b, &record_aad(&b, 0x80, 1000), &sealed, &mut out).is_err());
            assert!(keys.open_record(&a, &record_aad(&a, 0x81, 1000), &sealed, &mut out).is_err());
            assert!(keys.open_record(&a, &record_aad(&a, 0x80, 999), &sealed, &mut out).is_err());
            for position in (0..sealed.len()).step_by(97).chain([sealed.len() - 1]) {
                let mut bad = sealed.clone();
                bad[position] ^= 1;
                let aad = record_aad(&a, 0x80, 1000);
                assert!(keys.open_record(&a, &aad, &bad, &mut out).is_err(), "{position}");
            }
            let other = RepoKeys::derive(cipher, MasterSecret([4; 32]), counter_nonce);
            assert!(other.open_record(&a, &record_aad(&a, 0x80, 1000), &sealed, &mut out).is_err());
            let mut short = vec![0u8; 0];
            assert!(keys.open_record(&a, &[], &sealed[..10], &mut short).is_err());
        }
    }

    // Two seals of the same bytes differ (random nonces), and both open.
    #[test]
    fn nonces_are_fresh() {
        let keys = keys(Cipher::Aes256Gcm);
        let (mut one, mut two) = (b"same".to_vec(), b"same".to_vec());
        keys.seal_object(b"h", &mut one);
        keys.seal_object(b"h", &mut two);
        assert_ne!(one, two);
        assert_eq!(keys.open_object(b"h", &one).unwrap(), b"same");
        assert!(keys.open_object(b"other header", &one).is_err());
    }

    // The derived keys differ from each other and from the master; the id key is stable.
    #[test]
    fn derived_keys_are_distinct_and_stable() {
        let keys = keys(Cipher::Aes256Gcm);
        assert_ne!(keys.id_key(), [3; 32]);
        assert_ne!(keys.id_key(), keys.record_key);
        let again =
            RepoKeys::derive(Cipher::Chacha20Poly1305, MasterSecret([3; 32]), counter_nonce);
        assert_eq!(keys.id_key(), again.id_key());
    }

    // A key object opens with its passphrase only, for its repository and id only.
    #[test]
    fn key_objects_wrap_and_unwrap() {
        let master = MasterSecret([9; 32]);
        let kdf = KdfParams::with_salt([5; 32]);
        let object = KeyObject::wrap(
            &master,
            b"correct horse",
            kdf,
            (Cipher::Chacha20Poly1305, counter_nonce()),
            ("repo", "0123456789abcdef"),
            super::super::Timestamp(0),
        )
        .unwrap();
        let json = serde_json::to_string(&object).unwrap();
        assert!(!json.contains(&to_hex(&master.0)));
        let back: KeyObject = serde_json::from_str(&json).unwrap();
        let opened = back.unwrap_master(b"correct horse", "repo", "0123456789abcdef").unwrap();
        assert_eq!(opened.unwrap().0, master.0);
        assert!(back.unwrap_master(b"wrong", "repo", "0123456789abcdef").unwrap().is_none());
        assert!(
            back.unwrap_master(b"correct horse", "other", "0123456789abcdef").unwrap().is_none()
        );
        let mut cheap = back.clone();
        cheap.kdf.memory_kib = 8;
        assert!(cheap.unwrap_master(b"correct horse", "repo", "0123456789abcdef").is_err());
    }

    #[test]
    fn key_ids_parse() {
        assert_eq!(key_id_from_key("keys/0123456789abcdef"), Some("0123456789abcdef"));
        assert_eq!(key_id_from_key("keys/../config"), None);
    }
}
