//! Client-side encryption of the repository format, version 2: the keys derived from a
//! repository's master secret, the sealing of pack records and envelope payloads, and the key
//! objects (`keys/<id>`) that wrap the master secret under a passphrase or a key file.
//!
//! Pure like the rest of `layout`: no I/O. Random nonces come from the function the caller gives
//! `RepoKeys::derive` (`native::fresh::random_nonce`), salts and ids from the caller; Argon2id is
//! computation. A key file arrives here as bytes (`KeyFile::parse`); reading and writing it is
//! the CLI's. The layout is documented in FORMAT.md ("Encryption").
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
/// Prefix of a key object's associated data, followed by its `key_format` in decimal (so a
/// passphrase key object's is `ferry key object 1`, as before key files existed).
const KEY_AAD_PREFIX: &[u8] = b"ferry key object ";

/// The AEAD of an encrypted repository, chosen at `init` (AEGIS-256X2 when the CPU has AES
/// instructions, ChaCha20-Poly1305 otherwise) and recorded in the config and each key object.
/// AES-256-GCM, the choice before AEGIS-256X2 was measured (perf/results/crypto-aead.md), is
/// still read and written for the repositories that chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256-GCM (ring).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (ring).
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
    /// AEGIS-256X2 (draft-irtf-cfrg-aegis-aead; the `aegis` crate's libaegis), 256-bit key,
    /// 128-bit tag. Its 256-bit nonce is the stored 96 random bits followed by zeros.
    #[serde(rename = "aegis-256x2")]
    Aegis256X2,
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
        if hardware_aes { Cipher::Aegis256X2 } else { Cipher::Chacha20Poly1305 }
    }

    /// Its name in the config, key objects and `init --cipher`.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::Chacha20Poly1305 => "chacha20-poly1305",
            Cipher::Aegis256X2 => "aegis-256x2",
        }
    }

    /// Every cipher this build reads and writes.
    pub const ALL: [Cipher; 3] = [Cipher::Aegis256X2, Cipher::Aes256Gcm, Cipher::Chacha20Poly1305];

    fn key(self, bytes: &[u8; 32]) -> SealKey {
        let ring = |algorithm| {
            SealKey::Ring(LessSafeKey::new(UnboundKey::new(algorithm, bytes).expect("32 bytes")))
        };
        match self {
            Cipher::Aes256Gcm => ring(&aead::AES_256_GCM),
            Cipher::Chacha20Poly1305 => ring(&aead::CHACHA20_POLY1305),
            Cipher::Aegis256X2 => SealKey::Aegis256X2(*bytes),
        }
    }
}

/// A key of one of the ciphers, ready to seal and open.
#[expect(
    clippy::large_enum_variant,
    reason = "made on the stack once per record and dropped; boxing would allocate per record"
)]
enum SealKey {
    Ring(LessSafeKey),
    Aegis256X2([u8; 32]),
}

type Aegis = aegis::aegis256x2::Aegis256X2<TAG_BYTES>;

/// AEGIS-256X2's nonce from a stored one: the 96 random bits, then zeros (AEGIS needs the
/// nonce unique under the key, not uniform; 96 random bits keep the bound AES-GCM has).
fn aegis_nonce(nonce: [u8; NONCE_BYTES]) -> [u8; 32] {
    let mut wide = [0u8; 32];
    wide[..NONCE_BYTES].copy_from_slice(&nonce);
    wide
}

impl SealKey {
    /// Seals `buf` in place and appends nonce and tag.
    fn seal(&self, nonce: [u8; NONCE_BYTES], aad: &[u8], buf: &mut Vec<u8>) {
        let tag: [u8; TAG_BYTES] = match self {
            SealKey::Ring(key) => key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    buf,
                )
                .expect("sealing in memory cannot fail below the AEAD's length limit")
                .as_ref()
                .try_into()
                .expect("16-byte tag"),
            SealKey::Aegis256X2(key) => {
                Aegis::new(key, &aegis_nonce(nonce)).encrypt_in_place(buf, aad)
            }
        };
        buf.extend_from_slice(&nonce);
        buf.extend_from_slice(&tag);
    }

    /// Opens `sealed` (ciphertext, nonce, tag) into `out`, exactly the ciphertext's length.
    fn open(&self, aad: &[u8], sealed: &[u8], out: &mut [u8]) -> Result<(), String> {
        let Some(length) = sealed.len().checked_sub(SEAL_OVERHEAD) else {
            return Err(format!("{} sealed bytes, shorter than nonce and tag", sealed.len()));
        };
        if out.len() != length {
            return Err(format!("{length} bytes of ciphertext where {} were expected", out.len()));
        }
        let nonce: [u8; NONCE_BYTES] = sealed[length..length + NONCE_BYTES].try_into().expect("12");
        let tag: [u8; TAG_BYTES] = sealed[length + NONCE_BYTES..].try_into().expect("16");
        let opened = match self {
            // ring opens in place only: one copy into the destination, then decryption there.
            SealKey::Ring(key) => {
                out.copy_from_slice(&sealed[..length]);
                key.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    Tag::from(tag),
                    out,
                    0..,
                )
                .is_ok()
            }
            // libaegis decrypts from the sealed bytes straight into the destination, no copy.
            SealKey::Aegis256X2(key) => {
                let aegis = Aegis::new(key, &aegis_nonce(nonce));
                let mut decryptor = aegis.decryptor(aad, out);
                decryptor.update(&sealed[..length]).is_ok() && decryptor.finalize(&tag).is_ok()
            }
        };
        if opened {
            Ok(())
        } else {
            // Nothing of a forged or damaged payload is left for a caller to use by mistake.
            out.fill(0);
            Err("authentication failed (tampered, or sealed for another chunk)".to_string())
        }
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
    object_key: SealKey,
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

    fn record_subkey(&self, hash: &[u8; 32]) -> SealKey {
        self.cipher.key(blake3::keyed_hash(&self.record_key, hash).as_bytes())
    }

    /// Seals the stored bytes of a record in place: `buf` becomes ciphertext, nonce, tag.
    /// `aad` is `record_aad` of the record's header fields.
    pub fn seal_record(&self, hash: &[u8; 32], aad: &[u8], buf: &mut Vec<u8>) {
        self.record_subkey(hash).seal((self.nonce)(), aad, buf);
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
        self.record_subkey(hash).open(aad, sealed, out)
    }

    /// Seals an envelope payload in place (`aad`: the envelope header).
    pub fn seal_object(&self, aad: &[u8], buf: &mut Vec<u8>) {
        self.object_key.seal((self.nonce)(), aad, buf);
    }

    /// Opens a sealed envelope payload.
    ///
    /// # Errors
    /// A message when the payload is too short or does not authenticate.
    pub fn open_object(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; sealed.len().saturating_sub(SEAL_OVERHEAD)];
        self.object_key.open(aad, sealed, &mut out)?;
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

/// Bytes of key material in a key file.
pub const KEY_FILE_BYTES: usize = 32;

/// The key material of a key file: 32 random bytes. On disk a key file is exactly 64 hex digits
/// (either case), optionally followed by one newline (`\n`); anything else is refused, so a
/// passphrase file, an empty file or a truncated copy is never taken for a key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile([u8; KEY_FILE_BYTES]);

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyFile(<redacted>)")
    }
}

impl KeyFile {
    /// The key material `bytes` (from a random source).
    pub fn from_bytes(bytes: [u8; KEY_FILE_BYTES]) -> KeyFile {
        KeyFile(bytes)
    }

    /// Parses a key file's contents.
    ///
    /// # Errors
    /// A message stating the rule and what is wrong, never quoting the contents.
    pub fn parse(text: &[u8]) -> Result<KeyFile, String> {
        const RULE: &str = "a key file holds exactly 64 hex digits (256 random bits), optionally \
                            followed by one newline (`ferry key generate-file` writes one)";
        let digits = text.strip_suffix(b"\n").unwrap_or(text);
        if digits.len() != 2 * KEY_FILE_BYTES {
            return Err(format!("{RULE}; this one holds {} bytes", text.len()));
        }
        if let Some(at) = digits.iter().position(|b| !b.is_ascii_hexdigit()) {
            return Err(format!("{RULE}; byte {at} of this one is not a hex digit"));
        }
        let text = std::str::from_utf8(digits).expect("hex digits are ASCII").to_ascii_lowercase();
        hex_bytes::<KEY_FILE_BYTES>(&text).map(KeyFile).ok_or_else(|| RULE.to_string())
    }

    /// The contents of the key file: 64 lower-case hex digits and a newline.
    pub fn encode(&self) -> String {
        format!("{}\n", to_hex(&self.0))
    }
}

/// The secret that wraps a key object: a passphrase (stretched with Argon2id) or a key file.
#[derive(Clone)]
pub enum Secret {
    /// A passphrase.
    Passphrase(Vec<u8>),
    /// A key file's material.
    KeyFile(KeyFile),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Passphrase(_) => "Secret::Passphrase(<redacted>)",
            Secret::KeyFile(_) => "Secret::KeyFile(<redacted>)",
        })
    }
}

impl Secret {
    /// The kind of key object this secret wraps and opens.
    pub fn kind(&self) -> KeyKind {
        match self {
            Secret::Passphrase(_) => KeyKind::Passphrase,
            Secret::KeyFile(_) => KeyKind::KeyFile,
        }
    }
}

/// What kind of secret a key object's key-encryption key derives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyKind {
    /// A passphrase, through Argon2id (`key_format` 1, `kdf`).
    #[serde(rename = "passphrase")]
    Passphrase,
    /// A key file, through BLAKE3 `derive_key` (`key_format` 2, `key_file`).
    #[serde(rename = "key-file")]
    KeyFile,
}

impl KeyKind {
    /// How messages name it.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Passphrase => "passphrase",
            KeyKind::KeyFile => "key file",
        }
    }
}

/// The key-encryption key derivation of a key-file key object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFileKdf {
    /// `blake3-derive-key`.
    pub derivation: String,
    /// 32 random bytes, hex.
    pub salt: String,
}

/// Name of the key-file KEK derivation.
const KEY_FILE_DERIVATION: &str = "blake3-derive-key";
/// BLAKE3 `derive_key` context of a key file's key-encryption key.
const CONTEXT_KEY_FILE_KEK: &str = "ferry 2026-11 key file key-encryption key";

impl KeyFileKdf {
    /// BLAKE3 `derive_key` with `salt` (32 random bytes).
    pub fn with_salt(salt: [u8; 32]) -> KeyFileKdf {
        KeyFileKdf { derivation: KEY_FILE_DERIVATION.into(), salt: to_hex(&salt) }
    }

    /// The key-encryption key of `key_file`: BLAKE3 `derive_key` of the key material and the
    /// salt. No stretching: the material is 256 random bits, beyond any guessing (FORMAT.md).
    ///
    /// # Errors
    /// A message for a derivation this build does not know or a malformed salt.
    pub fn derive_kek(&self, key_file: &KeyFile) -> Result<[u8; 32], String> {
        if self.derivation != KEY_FILE_DERIVATION {
            return Err(format!("unknown key file derivation {}", self.derivation));
        }
        let salt = hex_bytes::<32>(&self.salt).ok_or("the salt is not 64 hex characters")?;
        let mut input = [0u8; KEY_FILE_BYTES + 32];
        input[..KEY_FILE_BYTES].copy_from_slice(&key_file.0);
        input[KEY_FILE_BYTES..].copy_from_slice(&salt);
        Ok(blake3::derive_key(CONTEXT_KEY_FILE_KEK, &input))
    }
}

/// `key_format` of a passphrase key object (the only kind before key files existed).
const KEY_FORMAT_PASSPHRASE: u32 = 1;
/// `key_format` of a key-file key object.
const KEY_FORMAT_KEY_FILE: u32 = 2;

/// A key object (`keys/<16 hex>`, plain JSON): the master secret wrapped under a key derived
/// from a passphrase (`key_format` 1, `kdf`) or from a key file (`key_format` 2, `key_file`).
/// A passphrase key object is byte for byte what builds before key files wrote; a key-file one
/// has no `kdf`, so those builds do not parse it and skip it with the parse error as the
/// problem (FORMAT.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyObject {
    /// 1 (passphrase) or 2 (key file).
    pub key_format: u32,
    /// The repository it opens (bound into the wrapping's associated data).
    pub repository_id: String,
    /// Unix seconds.
    pub created_at: super::Timestamp,
    /// How the key-encryption key derives from the passphrase (passphrase keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// How the key-encryption key derives from the key file (key-file keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<KeyFileKdf>,
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

/// Associated data of a key object's wrapping: `ferry key object <key_format>` ‖ repository id ‖
/// 0x00 ‖ key id (so the kinds are separated too).
fn key_aad(key_format: u32, repository_id: &str, id: &str) -> Vec<u8> {
    let mut aad = KEY_AAD_PREFIX.to_vec();
    aad.extend_from_slice(key_format.to_string().as_bytes());
    aad.extend_from_slice(repository_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(id.as_bytes());
    aad
}

/// A key object's key derivation, by kind.
#[derive(Debug, Clone, Copy)]
pub enum Kek<'a> {
    /// Argon2id of a passphrase.
    Passphrase(&'a KdfParams),
    /// BLAKE3 of a key file.
    KeyFile(&'a KeyFileKdf),
}

impl KeyObject {
    /// Wraps `master` under `secret` with a key-encryption key salted with `salt` (Argon2id
    /// with the default parameters for a passphrase) and a fresh `nonce`, for the key object
    /// `id` of `repository_id`.
    ///
    /// # Errors
    /// A message when the KDF parameters are refused.
    pub fn wrap(
        master: &MasterSecret,
        secret: &Secret,
        salt: [u8; 32],
        (cipher, nonce): (Cipher, [u8; NONCE_BYTES]),
        (repository_id, id): (&str, &str),
        created_at: super::Timestamp,
    ) -> Result<KeyObject, String> {
        let mut object = KeyObject {
            key_format: KEY_FORMAT_PASSPHRASE,
            repository_id: repository_id.to_string(),
            created_at,
            kdf: None,
            key_file: None,
            cipher,
            wrapped: String::new(),
        };
        let kek = match secret {
            Secret::Passphrase(passphrase) => {
                let kdf = KdfParams::with_salt(salt);
                let kek = kdf.derive_kek(passphrase)?;
                object.kdf = Some(kdf);
                kek
            }
            Secret::KeyFile(key_file) => {
                let kdf = KeyFileKdf::with_salt(salt);
                let kek = kdf.derive_kek(key_file)?;
                object.key_format = KEY_FORMAT_KEY_FILE;
                object.key_file = Some(kdf);
                kek
            }
        };
        let mut buf = master.0.to_vec();
        let aad = key_aad(object.key_format, repository_id, id);
        cipher.key(&kek).seal(nonce, &aad, &mut buf);
        object.wrapped = to_hex(&buf);
        Ok(object)
    }

    /// Its key derivation.
    ///
    /// # Errors
    /// A message for a `key_format` this build does not know (a newer build's key object), or
    /// derivation fields that do not match it.
    pub fn kek(&self) -> Result<Kek<'_>, String> {
        match (self.key_format, &self.kdf, &self.key_file) {
            (KEY_FORMAT_PASSPHRASE, Some(kdf), None) => Ok(Kek::Passphrase(kdf)),
            (KEY_FORMAT_KEY_FILE, None, Some(key_file)) => Ok(Kek::KeyFile(key_file)),
            (KEY_FORMAT_PASSPHRASE | KEY_FORMAT_KEY_FILE, _, _) => Err(format!(
                "key format {} needs exactly its own key derivation (`kdf` for 1, `key_file` \
                 for 2)",
                self.key_format
            )),
            (other, _, _) => Err(format!("unknown key format {other} (written by a newer ferry?)")),
        }
    }

    /// The kind of secret that opens it.
    ///
    /// # Errors
    /// As `kek`.
    pub fn kind(&self) -> Result<KeyKind, String> {
        Ok(match self.kek()? {
            Kek::Passphrase(_) => KeyKind::Passphrase,
            Kek::KeyFile(_) => KeyKind::KeyFile,
        })
    }

    /// The master secret, if `secret` opens this key object `id`.
    ///
    /// # Errors
    /// `Ok(None)` for a wrong secret (or one of the other kind); `Err` when the object is
    /// malformed.
    pub fn unwrap_master(
        &self,
        secret: &Secret,
        repository_id: &str,
        id: &str,
    ) -> Result<Option<MasterSecret>, String> {
        let kek = match (self.kek()?, secret) {
            (Kek::Passphrase(kdf), Secret::Passphrase(passphrase)) => kdf.derive_kek(passphrase)?,
            (Kek::KeyFile(kdf), Secret::KeyFile(key_file)) => kdf.derive_kek(key_file)?,
            _ => return Ok(None),
        };
        let wrapped = hex_bytes::<{ 32 + SEAL_OVERHEAD }>(&self.wrapped)
            .ok_or("the wrapped secret is not 120 hex characters")?;
        let mut master = [0u8; 32];
        let aad = key_aad(self.key_format, repository_id, id);
        match self.cipher.key(&kek).open(&aad, &wrapped, &mut master) {
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
        for cipher in Cipher::ALL {
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
            assert!(out.iter().all(|&byte| byte == 0), "a failed open leaves nothing readable");
            for another in Cipher::ALL.into_iter().filter(|&another| another != cipher) {
                let keys = RepoKeys::derive(another, MasterSecret([3; 32]), counter_nonce);
                let aad = record_aad(&a, 0x80, 1000);
                assert!(keys.open_record(&a, &aad, &sealed, &mut out).is_err(), "{another:?}");
            }
            let name = serde_json::to_string(&cipher).unwrap();
            assert_eq!(name, format!("\"{}\"", cipher.name()));
            let mut short = vec![0u8; 0];
            assert!(keys.open_record(&a, &[], &sealed[..10], &mut short).is_err());
        }
    }

    // Two seals of the same bytes differ (random nonces), and both open.
    #[test]
    fn nonces_are_fresh() {
        for cipher in Cipher::ALL {
            let keys = keys(cipher);
            let (mut one, mut two) = (b"same".to_vec(), b"same".to_vec());
            keys.seal_object(b"h", &mut one);
            keys.seal_object(b"h", &mut two);
            assert_ne!(one, two);
            assert_eq!(keys.open_object(b"h", &one).unwrap(), b"same");
            assert!(keys.open_object(b"other header", &one).is_err());
        }
    }

    // What an AEGIS-256X2 seal writes is fixed by the format: these bytes were written by the
    // build that introduced it, and every later build must open them (and seal the same).
    #[test]
    fn aegis_sealing_is_stable() {
        let key = Cipher::Aegis256X2.key(&[7; 32]);
        let mut buf = b"ferry record".to_vec();
        key.seal([9; NONCE_BYTES], b"aad", &mut buf);
        assert_eq!(to_hex(&buf), AEGIS_SEALED);
        let mut out = [0u8; 12];
        key.open(b"aad", &buf, &mut out).unwrap();
        assert_eq!(&out, b"ferry record");
    }

    const AEGIS_SEALED: &str =
        "fa5a3583912724a0715ac876090909090909090909090909ba4698bd558695f6e1656966cd71a5fa";

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

    const ID: &str = "0123456789abcdef";

    fn wrapped(master: &MasterSecret, secret: &Secret) -> KeyObject {
        KeyObject::wrap(
            master,
            secret,
            [5; 32],
            (Cipher::Chacha20Poly1305, counter_nonce()),
            ("repo", ID),
            super::super::Timestamp(0),
        )
        .unwrap()
    }

    fn passphrase(text: &str) -> Secret {
        Secret::Passphrase(text.as_bytes().to_vec())
    }

    // A key object opens with its passphrase only, for its repository and id only.
    #[test]
    fn key_objects_wrap_and_unwrap() {
        let master = MasterSecret([9; 32]);
        let object = wrapped(&master, &passphrase("correct horse"));
        let json = serde_json::to_string(&object).unwrap();
        assert!(!json.contains(&to_hex(&master.0)));
        let back: KeyObject = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kind(), Ok(KeyKind::Passphrase));
        let opened = back.unwrap_master(&passphrase("correct horse"), "repo", ID).unwrap();
        assert_eq!(opened.unwrap().0, master.0);
        assert!(back.unwrap_master(&passphrase("wrong"), "repo", ID).unwrap().is_none());
        assert!(back.unwrap_master(&passphrase("correct horse"), "other", ID).unwrap().is_none());
        let mut cheap = back.clone();
        cheap.kdf.as_mut().unwrap().memory_kib = 8;
        assert!(cheap.unwrap_master(&passphrase("correct horse"), "repo", ID).is_err());
    }

    /// A key object as builds before key files parsed it (`kdf` required, `key_format` 1 only).
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct KeyObjectBeforeKeyFiles {
        key_format: u32,
        repository_id: String,
        created_at: super::super::Timestamp,
        kdf: KdfParams,
        cipher: Cipher,
        wrapped: String,
    }

    // A passphrase key object is what builds before key files wrote and read (same fields, same
    // associated data `ferry key object 1` ‖ repository ‖ 0 ‖ id), so they still open it; a
    // key-file key object does not parse for them (no `kdf`), so they skip it with that problem
    // instead of misreading it.
    #[test]
    fn older_builds_read_passphrase_keys_and_skip_key_file_keys() {
        let master = MasterSecret([7; 32]);
        let object = wrapped(&master, &passphrase("correct horse"));
        let json = serde_json::to_string(&object).unwrap();
        assert!(!json.contains("key_file"), "{json}");
        let old: KeyObjectBeforeKeyFiles = serde_json::from_str(&json).unwrap();
        assert_eq!(old.key_format, 1);
        let kek = old.kdf.derive_kek(b"correct horse").unwrap();
        let mut old_aad = b"ferry key object 1repo".to_vec();
        old_aad.push(0);
        old_aad.extend_from_slice(ID.as_bytes());
        let sealed = hex_bytes::<{ 32 + SEAL_OVERHEAD }>(&old.wrapped).unwrap();
        let mut out = [0u8; 32];
        old.cipher.key(&kek).open(&old_aad, &sealed, &mut out).unwrap();
        assert_eq!(out, master.0);
        let key_file = wrapped(&master, &Secret::KeyFile(KeyFile::from_bytes([1; 32])));
        let json = serde_json::to_string(&key_file).unwrap();
        let error = serde_json::from_str::<KeyObjectBeforeKeyFiles>(&json).unwrap_err();
        assert!(error.to_string().contains("missing field `kdf`"), "{error}");
    }

    // Key files: exactly 64 hex digits and at most one newline; anything else is refused with
    // the rule, never with the contents.
    #[test]
    fn key_files_parse_strictly() {
        let material = [0xabu8; 32];
        let text = KeyFile::from_bytes(material).encode();
        assert_eq!(text.len(), 65);
        assert_eq!(KeyFile::parse(text.as_bytes()), Ok(KeyFile::from_bytes(material)));
        assert_eq!(KeyFile::parse(text.trim_end().as_bytes()), Ok(KeyFile::from_bytes(material)));
        let upper = text.to_ascii_uppercase();
        assert_eq!(KeyFile::parse(upper.as_bytes()), Ok(KeyFile::from_bytes(material)));
        let digits = text.trim_end();
        for bad in [
            String::new(),
            "\n".to_string(),
            digits[..63].to_string(),
            format!("{digits}a"),
            format!("{digits}\r\n"),
            format!("{digits}\n\n"),
            format!(" {}", &digits[1..]),
            format!("{}g", &digits[..63]),
            format!("{digits}{digits}"),
            "correct horse battery staple".to_string(),
        ] {
            let error = KeyFile::parse(bad.as_bytes()).unwrap_err();
            assert!(error.contains("64 hex digits"), "{bad:?}: {error}");
            assert!(bad.len() < 8 || !error.contains(bad.trim()), "{error}");
        }
        // 32 raw bytes are not a key file either.
        assert!(KeyFile::parse(&material).is_err());
        assert_eq!(format!("{:?}", KeyFile::from_bytes(material)), "KeyFile(<redacted>)");
    }

    // A key-file key object opens with its key file only: not another file, not a passphrase
    // spelling the file's digits, not for another repository or id; the KEK depends on the salt.
    #[test]
    fn key_file_keys_wrap_and_unwrap() {
        let master = MasterSecret([9; 32]);
        let file = KeyFile::from_bytes([0x42; 32]);
        let object = wrapped(&master, &Secret::KeyFile(file.clone()));
        let json = serde_json::to_string(&object).unwrap();
        assert!(json.contains("\"key_format\":2") && !json.contains("\"kdf\""), "{json}");
        assert!(!json.contains(&to_hex(&[0x42; 32])) && !json.contains(&to_hex(&master.0)));
        let back: KeyObject = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kind(), Ok(KeyKind::KeyFile));
        let secret = Secret::KeyFile(file.clone());
        assert_eq!(back.unwrap_master(&secret, "repo", ID).unwrap().unwrap().0, master.0);
        let other = Secret::KeyFile(KeyFile::from_bytes([0x43; 32]));
        assert!(back.unwrap_master(&other, "repo", ID).unwrap().is_none());
        let spelled = passphrase(file.encode().trim_end());
        assert!(back.unwrap_master(&spelled, "repo", ID).unwrap().is_none());
        assert!(back.unwrap_master(&secret, "other", ID).unwrap().is_none());
        assert!(back.unwrap_master(&secret, "repo", "fedcba9876543210").unwrap().is_none());
        // A key file does not open a passphrase key object.
        let by_passphrase = wrapped(&master, &passphrase("correct horse"));
        assert!(by_passphrase.unwrap_master(&secret, "repo", ID).unwrap().is_none());
        // The KEK is salted and stable.
        let kdf = back.key_file.clone().unwrap();
        assert_eq!(kdf.derive_kek(&file), kdf.derive_kek(&file));
        assert_ne!(kdf.derive_kek(&file), KeyFileKdf::with_salt([6; 32]).derive_kek(&file));
        let mut unknown = kdf.clone();
        unknown.derivation = "sha3".into();
        assert!(unknown.derive_kek(&file).unwrap_err().contains("unknown key file derivation"));
    }

    // Both kinds wrap one master secret side by side; a key object whose kind fields disagree
    // with its format, or of a format this build does not know, is an error, not a wrong key.
    #[test]
    fn both_kinds_wrap_one_master_and_mismatches_are_errors() {
        let master = MasterSecret([11; 32]);
        let file = Secret::KeyFile(KeyFile::from_bytes([0x11; 32]));
        let by_file = wrapped(&master, &file);
        let by_passphrase = wrapped(&master, &passphrase("correct horse"));
        let from_file = by_file.unwrap_master(&file, "repo", ID).unwrap().unwrap();
        let from_pass =
            by_passphrase.unwrap_master(&passphrase("correct horse"), "repo", ID).unwrap().unwrap();
        assert_eq!(from_file.0, from_pass.0);
        let mut relabelled = by_file.clone();
        relabelled.key_format = 1;
        assert!(relabelled.unwrap_master(&file, "repo", ID).unwrap_err().contains("key format 1"));
        let mut both = by_passphrase.clone();
        both.key_file = by_file.key_file.clone();
        assert!(both.kind().is_err());
        let mut newer = by_file.clone();
        newer.key_format = 3;
        let error = newer.unwrap_master(&file, "repo", ID).unwrap_err();
        assert!(error.contains("unknown key format 3"), "{error}");
    }

    #[test]
    fn key_ids_parse() {
        assert_eq!(key_id_from_key("keys/0123456789abcdef"), Some("0123456789abcdef"));
        assert_eq!(key_id_from_key("keys/../config"), None);
    }
}
