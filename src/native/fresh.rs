//! The two values the pure `layout` cannot make itself, because they are not functions of its
//! inputs: the current time (`Timestamp::now`) and fresh random ids (`PackId::random`, also the
//! random part of backup ids, lease keys and restore job ids), and the nonces, salts and secrets
//! of encryption.

use std::time::{SystemTime, UNIX_EPOCH};

use super::layout::{PackId, Timestamp};

impl Timestamp {
    /// The current time, whole seconds.
    pub fn now() -> Timestamp {
        let seconds =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Timestamp(seconds)
    }
}

impl PackId {
    /// A fresh random id.
    ///
    /// # Panics
    /// If the operating system's random source fails, which is not recoverable.
    pub fn random() -> PackId {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS random source must work");
        PackId(bytes)
    }
}

/// `N` fresh random bytes (master secrets, salts, key ids).
///
/// # Panics
/// If the operating system's random source fails, which is not recoverable.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source must work");
    bytes
}

/// A fresh random 96-bit nonce: what `layout::crypt::RepoKeys` seals each record and object with.
pub fn random_nonce() -> [u8; 12] {
    random_bytes()
}
