//! ferry's own repository format, the sibling of `cinder`: [`layout`] is the pure, I/O-free part
//! (object keys, envelopes, pack records, config, index and manifest documents; `FORMAT.md` is
//! its specification), [`chunk`] and [`compress`] are the pure stage bodies (zero check, keyed
//! BLAKE3, zstd), [`fresh`] makes the two values the pure layout cannot (the current time and
//! random pack ids), [`repo`] opens a repository in a store, [`maintain`] keeps it (leases, upkeep,
//! repair), [`retention`] is the pure retention policy, [`lifecycle`] runs `forget` and `prune`
//! (two-phase garbage collection by the store's clock), [`consolidate`] merges per-pack indexes
//! into consolidated ones for prune, [`check`] proves the repository
//! consistent, and [`backup`], [`restore`] and [`verify`] are the jobs, built from the shared
//! `plane` scaffolding.

pub mod backup;
pub mod check;
pub mod chunk;
pub mod compress;
pub mod consolidate;
pub mod dedup;
pub mod fresh;
pub mod incremental;
pub mod keys;
pub mod layout;
pub mod lifecycle;
pub mod maintain;
pub mod repack;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod verify;

#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod listing_tests;
#[cfg(test)]
mod memstore;
