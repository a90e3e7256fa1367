//! Integration tests: the built `ferry` binary against real parts — image files, loop devices

#![allow(unused_results, clippy::unwrap_used)]
//! (`losetup --direct-io=on`), a local directory repository and a real Garage S3 server.
//!
//! Garage tests need `FERRY_TEST_S3_ENDPOINT` (set by `scripts/test.sh`, which starts Garage);
//! without it they log that they were skipped, unless `FERRY_TEST_REQUIRE_S3=1` makes that a
//! failure. Loop-device tests need root; `FERRY_TEST_REQUIRE_LOOP=1` makes their absence a failure.
//! Cluster tests need `FERRY_TEST_CLUSTER_ENDPOINT` (a 3-node Garage, `scripts/garage.sh
//! cluster-start`) and namespaces; `FERRY_TEST_REQUIRE_CLUSTER=1` makes their absence a failure.

mod util;

// ARCHITECTURE.md's invariants on the source tree: dependency order, unsafe, stdout, pure layouts.
mod architecture;
// Bad, hostile and careless input: a table of refusals, each proven to change nothing.
mod bad_input;
// Round trips through each store, each engine, each content kind, files and loop devices.
mod backup_restore;
// The bench binary's command line: --help, one-line usage errors with exit 2.
mod bench;
// --format cinder, judged by Cinder's own S3 backup driver (scripts/cinder/harness.py).
mod cinder;
// The cinder-backup driver (scripts/cinder/ferry_cinder) run by Cinder's backup manager code.
mod cinder_driver;
// Many hosts (own hostname, boot id, pid namespace) on a 3-node Garage: concurrent backups with
// forget and prune, a node lost mid-backup and mid-prune, two nodes lost.
mod cluster;
// The command-line contract: exit codes, JSON events, refusals, failures of the store.
mod cli;
// Encrypted repositories: no plaintext in the store, tampering, passphrases, key rotation.
mod encryption;
// S3 faults injected by a proxy, kill -9 mid-backup and mid-restore, rate limits.
mod faults;
// Incremental backups from a change list file (--changed-ranges): reads, chain, lies, fallbacks.
mod incremental;
// forget, prune, check, protect and repair through the CLI, locally and on Garage.
mod lifecycle;
// Key-range listings of S3Store on Garage, and `list` split at a prune's catalog.
mod listing;
// --lightbits-volume and reclaim against scripts/lightbits-sim.py: in-use backups, restores into
// volumes, injected failures, kill -9, clear errors.
mod lightbits;
