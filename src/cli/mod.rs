//! The `ferry` command line: parses arguments into options, validates them before touching any
//! device or bucket, runs one job, renders events (`output`), and maps the outcome to a
//! documented exit code. The orchestrator contract (JSON Lines events, exit codes) lives here.

pub mod cinder;
pub mod config;
pub mod events;
mod input;
pub mod keys;
pub mod lightbits;
pub mod location;
pub mod maintain;
pub mod output;
pub mod secrets;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::error::{EngineError, ErrorKind};
use crate::io::Engine;
use crate::limits;
use crate::native::backup::{self, BackupOptions};
use crate::native::incremental::Incremental;
use crate::native::keys::KeySource;
use crate::native::layout::crypt::{Cipher, Secret};
use crate::native::layout::gc::GcTiming;
use crate::native::repo::{NewEncryption, Repository};
use crate::native::restore::{self, RestoreOptions};
use crate::native::verify;
use crate::plane::changes::{self, ChangeList, ExtentUnit};
use crate::progress::Progress;
use config::StoreArgs;
use events::{BackedUp, Done, ListEntry, Listed, Shown, Start};
use output::{ExitCode, Output};

/// ferry: back up block devices and image files to S3 or a directory, and restore them.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, max_term_width = 100)]
pub struct Cli {
    /// Write a JSON Lines event stream to stdout (start, progress, warning, result or error).
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// Repository: s3://BUCKET[/PREFIX], or a directory (also FERRY_REPO). Only init creates
    /// one; every other command needs it to exist.
    #[arg(long, global = true, help_heading = "Global options", value_name = "REPO")]
    pub repo: Option<String>,
    /// TOML config file with [s3] settings and credentials (also FERRY_CONFIG).
    #[arg(long, global = true, help_heading = "Global options", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// S3 endpoint URL (also AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL).
    #[arg(long, global = true, help_heading = "Global options", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (also AWS_REGION).
    #[arg(long, global = true, help_heading = "Global options", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Do not verify the S3 endpoint's TLS certificate (like backup_s3_verify_ssl = False).
    #[arg(long, global = true, help_heading = "Global options")]
    pub s3_no_verify_tls: bool,
    /// I/O engine for the source or target device of backup and restore (default uring; also
    /// FERRY_IO_ENGINE); other commands do no device I/O and ignore it.
    #[arg(long, global = true, help_heading = "Global options", value_enum)]
    pub io_engine: Option<EngineArg>,
    /// Key file of an encrypted repository (also FERRY_KEY_FILE; `ferry key generate-file`
    /// makes one): opens it with its key-file keys, or with `init --encrypt` wraps its first
    /// key. Not together with a passphrase (FERRY_PASSPHRASE, FERRY_PASSPHRASE_FILE).
    #[arg(long, global = true, help_heading = "Global options", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// `--io-engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// io_uring with O_DIRECT, falling back to pread when io_uring is unavailable.
    Uring,
    /// pread/pwrite with O_DIRECT.
    Pread,
}

/// The commands.
// Parsed once per process: the size of the largest variant (backup's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository.
    #[command(override_usage = "ferry --repo REPO [GLOBAL OPTIONS] init [--chunk-size SIZE]")]
    Init(InitArgs),
    /// Back up a block device or image file.
    #[command(override_usage = "ferry --repo REPO [GLOBAL OPTIONS] backup \
                                (--source PATH [--source PATH ...] | --lightbits-volume \
                                NAME_OR_UUID) [OPTIONS]")]
    Backup(BackupArgs),
    /// Restore a backup to a block device or file.
    #[command(override_usage = "ferry --repo REPO [GLOBAL OPTIONS] restore BACKUP_ID \
                                (--target PATH | --lightbits-volume NAME_OR_UUID) [OPTIONS]")]
    Restore(RestoreArgs),
    /// List backups.
    List,
    /// Show one backup's manifest summary.
    Show(IdArgs),
    /// Delete a backup's manifest (`prune` reclaims its packs); refused for a protected backup.
    Delete(IdArgs),
    /// Remove the backups a retention policy does not keep (manifests only; `prune` reclaims
    /// the space): rules OR-ed per source on UTC calendar periods.
    Forget(maintain::ForgetArgs),
    /// Reclaim the packs no backup references, safely while backups run (two phases: condemn
    /// now, delete at least 24 h later by the store's clock).
    Prune(maintain::PruneArgs),
    /// Check the repository's consistency: every index points into an existing pack, every
    /// backup resolves; report condemned packs still referenced.
    Check,
    /// Protect backups from every retention policy and from `delete`.
    Protect(maintain::ProtectArgs),
    /// Remove the protection of backups.
    Unprotect(maintain::ProtectArgs),
    /// Check backups without restoring them: every pack and chunk present with the right size;
    /// with --read-data, download and re-hash all or a sample of the chunks.
    #[command(override_usage = "ferry --repo REPO [GLOBAL OPTIONS] verify (BACKUP_ID ... | \
                                --all) [--read-data[=PERCENT]] [OPTIONS]")]
    Verify(VerifyArgs),
    /// Manage the keys (passphrases and key files) of an encrypted repository: list, add,
    /// remove, passwd, generate-file.
    Key(keys::KeyArgs),
    /// Abort multipart uploads left by interrupted backups, remove their leases, and rebuild
    /// lost pack indexes from the packs' records (never deletes a pack).
    Repair,
    /// Print the base64 record `cinder backup-import` takes for a Cinder-format backup.
    CinderRecord(cinder::RecordArgs),
    /// Undo what interrupted Lightbits jobs left on the cluster (clones, snapshots, ACL entries,
    /// attachments), as recorded in the local journal.
    Reclaim,
}

/// `ferry verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Backups to verify.
    #[arg(required_unless_present = "all")]
    pub backup_ids: Vec<String>,
    /// Verify every backup in the repository.
    #[arg(long, conflicts_with = "backup_ids")]
    pub all: bool,
    /// Also download and re-hash chunks: all of them, or PERCENT of them chosen at random.
    #[arg(long, value_name = "PERCENT", num_args = 0..=1, default_missing_value = "100",
          require_equals = true, value_parser = parse_percent)]
    pub read_data: Option<f64>,
    /// Seed of the --read-data sample (default: random; reported in the result).
    #[arg(long, allow_hyphen_values = true)]
    pub seed: Option<u64>,
    /// Ranged GETs in flight.
    #[arg(long, default_value_t = limits::DOWNLOADS_IN_FLIGHT_DEFAULT, value_parser = parse_count,
          allow_hyphen_values = true)]
    pub downloads_in_flight: usize,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 100.0 => Ok(value),
        _ => Err(format!("{text:?} is not a percentage above 0 and at most 100")),
    }
}

/// `ferry init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Chunk size in bytes (power of two, 64 KiB to 64 MiB); suffixes K, M accepted.
    #[arg(long, default_value = "4M", value_parser = parse_size, allow_hyphen_values = true)]
    pub chunk_size: u32,
    /// Garbage collection's grace period, recorded in the repository so every host obeys it:
    /// `prune` deletes a condemned pack only this long after condemning it, and every other
    /// time rule derives from it (FORMAT.md). From 10s to 366d; units s, m, h, d (e.g. 90s,
    /// 36h, 1d12h).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_gc_grace,
          allow_hyphen_values = true)]
    pub gc_grace: GcTiming,
    /// Encrypt the repository (format version 2): its first key is the key file --key-file or
    /// FERRY_KEY_FILE names, else a passphrase from FERRY_PASSPHRASE, FERRY_PASSPHRASE_FILE or
    /// a prompt, never the command line.
    #[arg(long)]
    pub encrypt: bool,
    /// The AEAD of an encrypted repository: aegis-256x2 (the default on a CPU with AES
    /// instructions), aes-256-gcm or chacha20-poly1305 (the default without them).
    #[arg(long, value_name = "NAME", requires = "encrypt", value_parser = parse_cipher)]
    pub cipher: Option<Cipher>,
}

fn parse_cipher(text: &str) -> Result<Cipher, String> {
    Cipher::ALL
        .into_iter()
        .find(|cipher| cipher.name() == text)
        .ok_or_else(|| "one of aegis-256x2, aes-256-gcm, chacha20-poly1305".to_string())
}

/// `ferry backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Block device or image file to back up; repeat it to back up several at once (one
    /// reader each, shared dedup, one backup per source).
    #[arg(long, required_unless_present = "lightbits_volume", conflicts_with = "lightbits_volume")]
    pub source: Vec<PathBuf>,
    /// `--lightbits-volume`.
    #[command(flatten)]
    pub lightbits: lightbits::VolumeArgs,
    /// Backup id (default: start time plus random suffix); only with a single source.
    #[arg(long)]
    pub backup_id: Option<String>,
    /// zstd compression level (1 is the measured sweet spot; -7..=19).
    #[arg(long, default_value_t = crate::native::compress::LEVEL_DEFAULT, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compression_level: i32,
    /// Pack parts uploading concurrently (1-32).
    #[arg(long, default_value_t = limits::PARTS_IN_FLIGHT_DEFAULT, value_parser = parse_in_flight,
          allow_hyphen_values = true)]
    pub parts_in_flight: usize,
    /// Worker threads: hashing and compression (default: one per CPU; 1-64).
    #[arg(long, value_parser = parse_workers, allow_hyphen_values = true)]
    pub workers: Option<usize>,
    /// Close pack objects at this size (1M to 4G; suffixes K, M, G).
    #[arg(long, default_value = "128M", value_parser = parse_pack_size, allow_hyphen_values = true)]
    pub pack_size: u64,
    /// Read at most this many MB/s (10^6 bytes) from the sources together, to spare a
    /// production volume.
    #[arg(long, value_name = "MB_PER_S", value_parser = parse_rate, allow_hyphen_values = true)]
    pub limit_read: Option<u64>,
    /// Upload at most this many MB/s (10^6 bytes) to the object store.
    #[arg(long, value_name = "MB_PER_S", value_parser = parse_rate, allow_hyphen_values = true)]
    pub limit_upload: Option<u64>,
    /// Keep this backup's snapshot of the `--lightbits-volume` as the next backup's diff base,
    /// so that the next backup reads only the chunks that changed (deleted once that one has
    /// committed).
    #[arg(long)]
    pub lightbits_keep_base: bool,
    /// An incremental backup of a single `--source`: read only the chunks the changed ranges in
    /// FILE touch (`rbd diff --format json` shape: byte offset and length), taking every other
    /// chunk from the backup `--changed-since` names (`--incremental-parent` with
    /// `--format cinder`).
    #[arg(long, value_name = "FILE", conflicts_with = "lightbits_volume")]
    pub changed_ranges: Option<PathBuf>,
    /// The backup the `--changed-ranges` are changes since (its parent; `--format cinder` names
    /// it with `--incremental-parent`).
    #[arg(long, value_name = "BACKUP_ID")]
    pub changed_since: Option<String>,
    /// Unchanged chunks an incremental backup re-reads and compares with its parent before it
    /// trusts the change list (default: 1% of them, at least 8, at most 1024).
    #[arg(long, value_name = "COUNT", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub sample_unchanged: Option<u32>,
    /// `--format cinder` and its flags.
    #[command(flatten)]
    pub cinder: cinder::BackupFlags,
}

/// Parses a rate in MB/s (decimal allowed) into bytes per second.
fn parse_rate(text: &str) -> Result<u64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate >= 0.1 && rate.is_finite() => Ok((rate * 1e6) as u64),
        _ => Err(format!("{text:?} is not a rate in MB/s (at least 0.1)")),
    }
}

/// Parses a pack size: from 1 MiB to 4 GiB.
fn parse_pack_size(text: &str) -> Result<u64, String> {
    match parse_bytes(text)? {
        bytes if ((1 << 20)..=(4 << 30)).contains(&bytes) => Ok(bytes),
        _ => Err(format!("pack size {text} must be from 1M to 4G")),
    }
}

/// `ferry restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup to restore.
    pub backup_id: String,
    /// Block device or file to write (a missing file is created).
    #[arg(long, required_unless_present = "lightbits_volume", conflicts_with = "lightbits_volume")]
    pub target: Option<PathBuf>,
    /// `--lightbits-volume`.
    #[command(flatten)]
    pub lightbits: lightbits::VolumeArgs,
    /// Overwrite a target that already holds data (a block device always needs it). A larger
    /// regular file keeps its bytes past the backup's end, with a warning. Never overrides the
    /// refusal of a target inside the repository, a mounted device, or one another ferry job
    /// reads or writes.
    #[arg(long)]
    pub force: bool,
    /// Skip writing zero chunks on a block device known to read as zeros (a new or empty file
    /// needs no flag). Refused (exit 2) onto a regular file holding data: its old bytes would
    /// stay where the backup has zeros.
    #[arg(long)]
    pub sparse: bool,
    /// GETs in flight (1-32; a Cinder-format restore clamps it to its memory budget).
    #[arg(long, default_value_t = limits::DOWNLOADS_IN_FLIGHT_DEFAULT, value_parser = parse_in_flight,
          allow_hyphen_values = true)]
    pub downloads_in_flight: usize,
    /// `--format cinder` and its flags.
    #[command(flatten)]
    pub cinder: cinder::RestoreFlags,
}

/// A command taking one backup id.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The backup id.
    pub backup_id: String,
}

fn parse_count(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to 256")),
    }
}

/// `--workers`: 1 to `limits::WORKERS_MAX` (past the core count workers only add threads, and
/// the memory budget stops growing with them).
fn parse_workers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=limits::WORKERS_MAX).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to {}", limits::WORKERS_MAX)),
    }
}

/// Uploads or downloads in flight: 1 to `limits::IN_FLIGHT_MAX`; each holds a buffer of up to
/// 16 MiB (more only costs memory: the store is the limit).
fn parse_in_flight(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=limits::IN_FLIGHT_MAX).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to {}", limits::IN_FLIGHT_MAX)),
    }
}

/// One worker per CPU, at most `limits::WORKERS_MAX`.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).min(limits::WORKERS_MAX)
}

/// Flags of `backup` and `restore` that only one `--format` reads: (clap id, flag). Given with
/// the other format they are refused (exit 2), never silently ignored.
const BACKUP_NATIVE_ONLY: &[(&str, &str)] = &[
    ("backup_id", "--backup-id"),
    ("compression_level", "--compression-level"),
    ("pack_size", "--pack-size"),
    ("parts_in_flight", "--parts-in-flight"),
    // A Cinder incremental names its parent with --incremental-parent, ranges or not.
    ("changed_since", "--changed-since"),
];
const BACKUP_CINDER_ONLY: &[(&str, &str)] = &[
    ("cinder_backup_id", "--cinder-backup-id"),
    ("cinder_volume_id", "--cinder-volume-id"),
    ("incremental_parent", "--incremental-parent"),
    ("compression", "--compression"),
    ("cinder_object_size", "--cinder-object-size"),
    ("cinder_block_size", "--cinder-block-size"),
    ("cinder_uploads", "--cinder-uploads"),
    ("zlib_level", "--zlib-level"),
    ("cinder_backup_name", "--cinder-backup-name"),
    ("cinder_backup_description", "--cinder-backup-description"),
    ("cinder_volume_meta_file", "--cinder-volume-meta-file"),
];
const RESTORE_CINDER_ONLY: &[(&str, &str)] = &[("cinder_volume_id", "--cinder-volume-id")];

/// Flags as (clap id, spelling).
type FlagNames = &'static [(&'static str, &'static str)];

/// Refuses a flag the chosen format does not read.
fn check_format_flags(cli: &Cli, matches: &clap::ArgMatches) -> Result<(), EngineError> {
    let (sub, cinder, native_only, cinder_only): (_, bool, FlagNames, FlagNames) =
        match (&cli.command, matches.subcommand()) {
            (Command::Backup(args), Some((_, sub))) => (
                sub,
                args.cinder.format == cinder::Format::Cinder,
                BACKUP_NATIVE_ONLY,
                BACKUP_CINDER_ONLY,
            ),
            (Command::Restore(args), Some((_, sub))) => {
                (sub, args.cinder.format == cinder::Format::Cinder, &[], RESTORE_CINDER_ONLY)
            }
            _ => return Ok(()),
        };
    let given = |id: &str| {
        matches!(
            sub.value_source(id),
            Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
        )
    };
    let key_material = keys::key_material_given(cli.key_file.as_deref());
    if cinder && !key_material.is_empty() {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "{} does not apply to --format cinder: Cinder's format has no encryption \
                 (use --format native with an encrypted repository)",
                key_material.join(" / ")
            ),
        ));
    }
    let (refused, format) = if cinder { (native_only, "cinder") } else { (cinder_only, "native") };
    match refused.iter().find(|(id, _)| given(id)) {
        Some((_, flag)) => Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "{flag} does not apply to --format {format}{}",
                match (cinder, *flag) {
                    (true, "--changed-since") => "; name the parent with --incremental-parent",
                    (true, _) => "",
                    (false, _) => "; it needs --format cinder",
                }
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses (exit 2) `--key-file` on a command it does not apply to: one that opens no
/// repository (`reclaim`, `key generate-file`, whose key file is its argument), `cinder-record`
/// (Cinder's format has no encryption; `backup`/`restore --format cinder` are refused by
/// `check_format_flags`), and `init` without `--encrypt`. Key material from the environment
/// (`FERRY_KEY_FILE`, `FERRY_PASSPHRASE`, `FERRY_PASSPHRASE_FILE`) is refused by `init` without
/// `--encrypt` too: whoever sets it expects an encrypted repository, and opening an
/// unencrypted one with it is refused as well (exit 11).
fn check_key_file_flag(cli: &Cli) -> Result<(), EngineError> {
    if let Command::Init(args) = &cli.command
        && !args.encrypt
    {
        let given = keys::key_material_given(cli.key_file.as_deref());
        if !given.is_empty() {
            return Err(EngineError::new(
                ErrorKind::Usage,
                format!(
                    "{} does not apply: init creates an unencrypted repository without \
                     --encrypt (add --encrypt, or unset it)",
                    given.join(" / ")
                ),
            ));
        }
    }
    if cli.key_file.is_none() {
        return Ok(());
    }
    let refused = match &cli.command {
        Command::Reclaim => "reclaim opens no repository",
        Command::CinderRecord(_) => "Cinder's format has no encryption",
        Command::Key(keys::KeyArgs { action: keys::KeyAction::GenerateFile { .. } }) => {
            "key generate-file writes the key file its argument names"
        }
        _ => return Ok(()),
    };
    Err(EngineError::new(ErrorKind::Usage, format!("--key-file does not apply: {refused}")))
}

/// Refuses (exit 2, before any repository or device is touched) the incremental flags of
/// `backup` given without what they need.
fn check_incremental_flags(cli: &Cli) -> Result<(), EngineError> {
    let Command::Backup(args) = &cli.command else { return Ok(()) };
    let usage = |message: &str| Err(EngineError::new(ErrorKind::Usage, message.to_owned()));
    if args.cinder.format == cinder::Format::Cinder {
        if args.changed_ranges.is_some() && args.cinder.incremental_parent.is_none() {
            return usage(
                "--changed-ranges with --format cinder needs --incremental-parent (the backup \
                 the ranges are changes since)",
            );
        }
    } else if args.changed_ranges.is_some() != args.changed_since.is_some() {
        return usage("--changed-ranges and --changed-since go together");
    }
    if args.lightbits_keep_base && args.lightbits.lightbits_volume.is_none() {
        return usage("--lightbits-keep-base needs --lightbits-volume");
    }
    if args.sample_unchanged.is_some()
        && args.changed_ranges.is_none()
        && args.lightbits.lightbits_volume.is_none()
    {
        return usage(
            "--sample-unchanged applies to incremental backups: --lightbits-volume or \
             --changed-ranges",
        );
    }
    Ok(())
}

/// Parses a byte count: digits with an optional K, M or G suffix (binary; `B`/`iB` allowed).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim().trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match trimmed.chars().last() {
        Some('K' | 'k') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M' | 'm') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G' | 'g') => (&trimmed[..trimmed.len() - 1], 30),
        _ => (trimmed, 0),
    };
    let value = digits.parse::<u64>().map_err(|_| format!("{text:?} is not a size"))?;
    value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a chunk size like `4194304`, `4M`, `4MiB`, `512K`: a power of two from 64K to 64M.
fn parse_size(text: &str) -> Result<u32, String> {
    let value = u32::try_from(parse_bytes(text)?).unwrap_or(0);
    if !value.is_power_of_two()
        || !(limits::CHUNK_SIZE_BYTES_MIN..=limits::CHUNK_SIZE_BYTES_MAX).contains(&value)
    {
        return Err(format!("chunk size {text} must be a power of two from 64K to 64M"));
    }
    Ok(value)
}

/// Parses a `--gc-grace` duration like `24h`, `90s`, `1d12h` (units `d h m s`, each at most once,
/// largest first) and checks the rules it gives (`GcTiming::for_grace`).
fn parse_gc_grace(text: &str) -> Result<GcTiming, String> {
    let bad = || format!("{text:?} is not a duration like 24h, 90s or 1d12h (units d, h, m, s)");
    let mut secs: u64 = 0;
    let mut digits = String::new();
    let mut units_left = "dhms";
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let position = units_left.find(c).ok_or_else(bad)?;
        units_left = &units_left[position + 1..];
        let unit: u64 = match c {
            'd' => 86_400,
            'h' => 3600,
            'm' => 60,
            _ => 1,
        };
        let value: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        secs = value.checked_mul(unit).and_then(|add| secs.checked_add(add)).ok_or_else(bad)?;
    }
    if !digits.is_empty() || text.is_empty() {
        return Err(bad());
    }
    GcTiming::for_grace(secs).map_err(|rule| format!("--gc-grace {text}: {rule}"))
}

/// Command names, as `Output` labels events.
const COMMAND_NAMES: &[&str] = &[
    "init",
    "backup",
    "restore",
    "list",
    "show",
    "delete",
    "verify",
    "repair",
    "cinder-record",
    "reclaim",
];

/// Runs the command line and returns the process exit code.
pub fn run() -> u8 {
    use clap::{CommandFactory as _, FromArgMatches as _};
    secrets::register_env(&["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]);
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return parse_failure(&error),
    };
    let name = match &cli.command {
        Command::Init(_) => "init",
        Command::Backup(_) => "backup",
        Command::Restore(_) => "restore",
        Command::List => "list",
        Command::Show(_) => "show",
        Command::Delete(_) => "delete",
        Command::Verify(_) => "verify",
        Command::CinderRecord(_) => "cinder-record",
        Command::Reclaim => "reclaim",
        other => maintain::name(other).expect("every command has a name"),
    };
    let output = Output::new(cli.json, name);
    let cancel = Arc::new(AtomicBool::new(false));
    let checked = check_format_flags(&cli, &matches)
        .and_then(|()| check_incremental_flags(&cli))
        .and_then(|()| check_key_file_flag(&cli))
        .and_then(|()| check_environment(&cli))
        .and_then(|()| validate::check_command(&cli));
    let result =
        checked.and_then(|()| with_signals(&output, &cancel, || dispatch(&cli, &output, &cancel)));
    match result {
        Ok(()) => ExitCode::Ok as u8,
        Err(error) => output.error(&error) as u8,
    }
}

/// Runs `job` with SIGINT and SIGTERM handled: the first sets `cancel` (the job stops, aborts its
/// uploads and cleans up, and its error becomes `cancelled`), a second ends the process at once;
/// either way the exit code is 6 and the last event is an `error`.
fn with_signals(
    output: &Output,
    cancel: &Arc<AtomicBool>,
    job: impl FnOnce() -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return Err(EngineError::new(ErrorKind::Internal, "cannot install signal handlers"));
    };
    let handle = signals.handle();
    let received = std::sync::atomic::AtomicI32::new(0);
    let result = std::thread::scope(|scope| {
        let _ = scope.spawn(|| {
            for signal in signals.forever() {
                received.store(signal, Ordering::SeqCst);
                if cancel.swap(true, Ordering::SeqCst) {
                    output.exit_now(&EngineError::new(
                        ErrorKind::Cancelled,
                        format!(
                            "cancelled by a second signal ({}): stopped at once; uploads left \
                             behind are aborted by the next backup or `ferry repair`",
                            signal_name(signal)
                        ),
                    ));
                }
                eprintln!(
                    "ferry: {} received: cancelling (a second signal stops at once)",
                    signal_name(signal)
                );
            }
        });
        let result = job();
        handle.close();
        result
    });
    let signal = received.load(Ordering::SeqCst);
    match result {
        // After a signal, a failure is the cancel, whatever cut the job short (a store call, a
        // device closed, a check that saw the flag): the exit code is always 6.
        Err(error) if signal != 0 => Err(EngineError::new(
            ErrorKind::Cancelled,
            format!("cancelled by {}: {}", signal_name(signal), error.message),
        )),
        other => other,
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT",
        signal_hook::consts::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Reports an argument-parsing failure. With `--json` (anywhere before a `--`), the failure is
/// an `error` event like any other, and `--help`/`--version` a `result` event carrying the text
/// (printed on stderr too), so every `--json` run ends with one of the two.
fn parse_failure(error: &clap::Error) -> u8 {
    let args: Vec<String> = std::env::args().skip(1).take_while(|arg| arg != "--").collect();
    let json = args.iter().any(|arg| arg == "--json");
    let code = if error.use_stderr() { ExitCode::Usage as u8 } else { 0 };
    if !json {
        let _ = error.print();
        return code;
    }
    let command = args
        .iter()
        .find_map(|arg| COMMAND_NAMES.iter().find(|name| **name == arg.as_str()))
        .copied()
        .unwrap_or("ferry");
    let output = Output::new(true, command);
    let text = error.render().to_string();
    if !error.use_stderr() {
        eprint!("{text}");
        output.result(Done::Help { help: text }, "");
        return code;
    }
    let message = text.trim().trim_start_matches("error: ").to_owned();
    output.error(&EngineError::new(ErrorKind::Usage, message)) as u8
}

/// Checks settings taken from the environment, naming the variable (clap would name the flag).
fn check_environment(cli: &Cli) -> Result<(), EngineError> {
    if cli.io_engine.is_none()
        && let Some(value) = std::env::var_os("FERRY_IO_ENGINE").filter(|v| !v.is_empty())
        && value.to_str().and_then(|text| EngineArg::from_str(text, true).ok()).is_none()
    {
        return Err(EngineError::new(
            ErrorKind::Usage,
            format!(
                "FERRY_IO_ENGINE={} is not an I/O engine: uring or pread (or unset it)",
                value.to_string_lossy()
            ),
        ));
    }
    Ok(())
}

fn store_args(cli: &Cli) -> StoreArgs {
    StoreArgs {
        repo: cli.repo.clone(),
        config: cli.config.clone(),
        s3_endpoint: cli.s3_endpoint.clone(),
        s3_region: cli.s3_region.clone(),
        s3_no_verify_tls: cli.s3_no_verify_tls,
        create: matches!(cli.command, Command::Init(_)),
    }
}

/// `--io-engine`, else `FERRY_IO_ENGINE` (checked by `check_environment`), else io_uring.
fn engine(cli: &Cli) -> Engine {
    let from_env = || {
        std::env::var("FERRY_IO_ENGINE").ok().and_then(|text| EngineArg::from_str(&text, true).ok())
    };
    match cli.io_engine.or_else(from_env).unwrap_or(EngineArg::Uring) {
        EngineArg::Uring => Engine::Uring,
        EngineArg::Pread => Engine::Pread,
    }
}

fn dispatch(cli: &Cli, output: &Output, cancel: &Arc<AtomicBool>) -> Result<(), EngineError> {
    if let Some(result) = cinder::dispatch(cli, output, cancel) {
        return result;
    }
    if let Command::Reclaim = &cli.command {
        return lightbits::run_reclaim(cli, output);
    }
    if let Command::Key(keys::KeyArgs { action: keys::KeyAction::GenerateFile { path } }) =
        &cli.command
    {
        return keys::generate_file(path, output);
    }
    if let Some(result) = maintain::dispatch(cli, output, cancel) {
        return result;
    }
    // The key of a new encrypted repository first: a missing or bad one leaves nothing behind
    // (opening the store for `init` creates a local repository's directory).
    let encryption = match &cli.command {
        Command::Init(args) if args.encrypt => Some(new_encryption(cli, args.cipher, output)?),
        _ => None,
    };
    let store = config::open_store(&store_args(cli))?;
    let describe = store.describe();
    let open =
        |store| Repository::open_with(store, &keys::key_source(cli.key_file.as_deref(), output)?);
    match &cli.command {
        Command::Init(args) => {
            output.start(Start::Repository { repository: describe.clone() });
            let repo = Repository::init_with(store, args.chunk_size, args.gc_grace, encryption)?;
            output.result(
                Done::Init {
                    repository: describe.clone(),
                    repository_id: repo.config.repository_id.clone(),
                    chunk_size_bytes: repo.config.chunk_size_bytes,
                    gc_grace_secs: repo.config.gc().grace_secs,
                },
                &format!("initialised repository {} at {describe}", repo.config.repository_id),
            );
            Ok(())
        }
        Command::Backup(args) => run_backup(cli, args, open(store)?, output, cancel),
        Command::Restore(args) => run_restore(cli, args, open(store)?, output, cancel),
        Command::List => {
            let repo = open(store)?;
            let mut backups = Vec::new();
            let mut lines = Vec::new();
            // Summaries from the catalog prune keeps, and the manifests committed since (8 read
            // at once); a backup deleted since the listing is left out.
            for (id, summary) in repo.list_summaries()? {
                // A damaged manifest is listed as damaged; the rest of the listing goes on.
                let summary = match summary {
                    Ok(summary) => summary,
                    Err(error) if error.kind == ErrorKind::Integrity => {
                        output.warning(&format!("backup {id} is damaged: {}", error.message));
                        lines.push(format!("{id}  DAMAGED: {}", error.message));
                        backups.push(ListEntry::Damaged { backup_id: id, damaged: error.message });
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                lines.push(format!(
                    "{id}  {}  {} bytes  {}",
                    summary.completed_at, summary.volume_size_bytes, summary.source
                ));
                backups.push(ListEntry::Backup(Listed {
                    backup_id: id,
                    completed_at: summary.completed_at.to_string(),
                    volume_size_bytes: summary.volume_size_bytes,
                    source: summary.source,
                }));
            }
            output.result(Done::List { backups }, &lines.join("\n"));
            Ok(())
        }
        Command::Show(args) => {
            let repo = open(store)?;
            let manifest = repo.load_manifest(&args.backup_id)?;
            let backup = Shown {
                backup_id: manifest.backup_id,
                source: manifest.source,
                volume_size_bytes: manifest.volume_size_bytes,
                chunk_size_bytes: manifest.chunk_size_bytes,
                started_at: manifest.started_at.to_string(),
                completed_at: manifest.completed_at.to_string(),
                pack_count: manifest.packs.len(),
                stats: manifest.stats,
            };
            let text = serde_json::to_string_pretty(&backup).unwrap_or_default();
            output.result(Done::Show { backup }, &text);
            Ok(())
        }
        Command::Delete(args) => {
            let repo = open(store)?;
            repo.delete_backup(&args.backup_id)?;
            output.result(
                Done::Delete { backup_id: args.backup_id.clone() },
                &format!("deleted backup {}", args.backup_id),
            );
            Ok(())
        }
        Command::Verify(args) => run_verify(args, &open(store)?, output, cancel),
        Command::Reclaim => unreachable!("handled before the store is opened"),
        Command::CinderRecord(_) => unreachable!("handled by cinder::dispatch"),
        _ => unreachable!("handled by maintain::dispatch"),
    }
}

/// The encryption of `init --encrypt`: the key file, or the passphrase (asked twice on a
/// terminal), and the AEAD asked for, else the one this CPU runs fastest.
fn new_encryption(
    cli: &Cli,
    cipher: Option<Cipher>,
    output: &Output,
) -> Result<NewEncryption, EngineError> {
    let secret = match keys::key_source(cli.key_file.as_deref(), output)? {
        KeySource::Given(secret) => secret,
        KeySource::Prompt(ask) => {
            let first = ask("new repository passphrase: ")?;
            if ask("repeat the passphrase: ")? != first {
                return Err(EngineError::new(ErrorKind::KeyNeeded, "the passphrases differ"));
            }
            Secret::Passphrase(first)
        }
        KeySource::None => {
            return Err(EngineError::new(
                ErrorKind::KeyNeeded,
                "init --encrypt needs a passphrase (FERRY_PASSPHRASE or FERRY_PASSPHRASE_FILE, or \
                 run on a terminal to be asked) or a key file (--key-file or FERRY_KEY_FILE; \
                 `ferry key generate-file` makes one)",
            ));
        }
    };
    Ok(NewEncryption { cipher: cipher.unwrap_or_else(Cipher::for_this_cpu), secret })
}

fn run_verify(
    args: &VerifyArgs,
    repo: &Repository,
    output: &Output,
    cancel: &AtomicBool,
) -> Result<(), EngineError> {
    let ids = if args.all { repo.list_backups()? } else { args.backup_ids.clone() };
    output.start(Start::Verify { repository: repo.store.describe(), backup_ids: ids.clone() });
    let options = verify::VerifyOptions {
        read_data_percent: args.read_data,
        downloads_in_flight: args.downloads_in_flight,
        seed: args.seed.unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).expect("the OS has randomness");
            u64::from_le_bytes(bytes)
        }),
    };
    let progress = Progress::default();
    let mut reports = Vec::new();
    let mut lines = Vec::new();
    for id in &ids {
        // A damaged manifest is a problem of its backup; the other backups are still verified.
        let manifest = match repo.load_manifest(id) {
            Ok(manifest) => manifest,
            Err(error) if error.kind == ErrorKind::Integrity => {
                let object = crate::native::layout::manifest_key(id);
                lines.push(format!("{id}: damaged manifest\n  {object}: {}", error.message));
                reports.push(verify::VerifyReport {
                    backup_id: id.clone(),
                    pack_count: 0,
                    chunk_count: 0,
                    chunks_read: 0,
                    bytes_read: 0,
                    seed: None,
                    problems: vec![verify::Problem { object, detail: error.message }],
                });
                continue;
            }
            Err(error) => return Err(error),
        };
        let report = with_progress(output, &progress, || {
            verify::run(repo, &manifest, &options, &progress, cancel)
        })?;
        lines.push(format!(
            "{id}: {} packs, {} chunks, {} read ({} bytes): {}",
            report.pack_count,
            report.chunk_count,
            report.chunks_read,
            report.bytes_read,
            if report.problems.is_empty() {
                "ok".to_string()
            } else {
                format!("{} problem(s)", report.problems.len())
            }
        ));
        for problem in &report.problems {
            lines.push(format!("  {}: {}", problem.object, problem.detail));
        }
        reports.push(report);
    }
    let problems: Vec<&verify::Problem> = reports.iter().flat_map(|r| &r.problems).collect();
    if problems.is_empty() {
        output.result(Done::Verify { verified: reports }, &lines.join("\n"));
        return Ok(());
    }
    let error = EngineError::new(
        ErrorKind::Integrity,
        format!(
            "{} problem(s) found: {}",
            problems.len(),
            problems
                .iter()
                .map(|p| format!("{}: {}", p.object, p.detail))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    if !output.is_json() {
        eprintln!("{}", lines.join("\n"));
    }
    Err(error.with_details(events::details(&Done::Verify { verified: reports })))
}

/// Runs `job` while a reporter thread emits progress; returns the job's result.
fn with_progress<T>(output: &Output, progress: &Progress, job: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reporter = scope.spawn(|| {
            let mut ticks = 0u32;
            loop {
                std::thread::park_timeout(Duration::from_millis(200));
                if done.load(Ordering::Acquire) {
                    break;
                }
                ticks += 1;
                // JSON events once a second; a terminal's progress line five times a second.
                if ticks.is_multiple_of(5) || output.live() {
                    output.progress(progress);
                }
            }
        });
        let result = job();
        done.store(true, Ordering::Release);
        // Woken now, not at its next tick: the command ends when the job does (a reporter
        // left to sleep added up to 200 ms to every command's wall time).
        reporter.thread().unpark();
        result
    })
}

fn run_backup(
    cli: &Cli,
    args: &BackupArgs,
    repo: Repository,
    output: &Output,
    cancel: &Arc<AtomicBool>,
) -> Result<(), EngineError> {
    let mut options = BackupOptions::new(args.source.first().cloned().unwrap_or_default());
    options.engine = engine(cli);
    options.compression_level = args.compression_level;
    options.parts_in_flight = args.parts_in_flight;
    options.worker_count = args.workers.unwrap_or_else(default_workers);
    options.backup_id = args.backup_id.clone();
    options.pack_size_bytes = args.pack_size;
    options.limit_read_bytes_per_sec = args.limit_read;
    options.limit_upload_bytes_per_sec = args.limit_upload;
    let sample_count = args.sample_unchanged.map(|count| count as usize);
    let (result, summary) = match &args.lightbits.lightbits_volume {
        Some(volume) => {
            let backup_id = options.backup_id.clone().unwrap_or_else(lightbits::new_backup_id);
            let bases = lightbits::Bases::of(args.lightbits_keep_base);
            lightbits::backup(
                cli,
                volume,
                &backup_id,
                bases,
                output,
                cancel,
                |device, label, hint| {
                    options.backup_id = Some(backup_id.clone());
                    options.incremental = hint.and_then(|hint| {
                        // Without the diff a native backup reads everything anyway (and
                        // dedups against the whole repository): no parent to load.
                        let changes = hint.changes(sample_count)?;
                        let prefix = hint.label_prefix.clone();
                        let parent =
                            incremental_parent(&repo, &hint.parent_backup_id, output, |path| {
                                path.starts_with(&prefix)
                            })?;
                        Some(Incremental { parent, changes })
                    });
                    options.source_label = Some(label);
                    run_backup_job(&repo, &options, &[device.to_path_buf()], output, cancel)
                },
            )?
        }
        None => {
            if let (Some(file), Some(parent_id)) = (&args.changed_ranges, &args.changed_since) {
                options.incremental =
                    ranges_incremental(&repo, &args.source, file, parent_id, sample_count, output)?;
            }
            run_backup_job(&repo, &options, &args.source, output, cancel)?
        }
    };
    output.result(result, &summary);
    Ok(())
}

/// The parent of an incremental backup, or `None` after a warning (the backup reads the whole
/// source): a parent that is missing, unreadable, or not a backup of this source
/// (`same_source` judges its recorded source).
fn incremental_parent(
    repo: &Repository,
    parent_id: &str,
    output: &Output,
    same_source: impl Fn(&str) -> bool,
) -> Option<crate::native::layout::Manifest> {
    let fallback = |why: String| {
        output
            .warning(&format!("incremental backup not possible, reading the whole source: {why}"));
        None
    };
    match repo.load_manifest(parent_id) {
        Ok(parent) if same_source(&parent.source.path) => Some(parent),
        Ok(parent) => fallback(format!(
            "parent backup {parent_id} is of another source ({})",
            parent.source.path
        )),
        Err(error) => fallback(format!("parent backup {parent_id}: {}", error.message)),
    }
}

/// `--changed-ranges FILE --changed-since ID` for a single `--source`: the change list read
/// from the file (a bad file is refused, exit 2); a parent that cannot be used is a warning and
/// a full read.
fn ranges_incremental(
    repo: &Repository,
    sources: &[PathBuf],
    file: &Path,
    parent_id: &str,
    sample_count: Option<usize>,
    output: &Output,
) -> Result<Option<Incremental>, EngineError> {
    let [source] = sources else {
        return Err(EngineError::new(ErrorKind::Usage, "--changed-ranges takes a single --source"));
    };
    let changes = read_ranges(file, sample_count)?;
    let shown = source.display().to_string();
    let Some(parent) = incremental_parent(repo, parent_id, output, |path| path == shown) else {
        return Ok(None);
    };
    Ok(Some(Incremental { parent, changes }))
}

/// The largest `--changed-ranges` file: about 1.4 million `rbd diff` entries, every 4 MiB
/// object of a 5 TiB volume (a 1% change of a 500 TiB one).
const CHANGED_RANGES_BYTES_MAX: u64 = 64 << 20;

/// The change list of `--changed-ranges FILE` (a bad file is refused, exit 2).
fn read_ranges(file: &Path, sample_count: Option<usize>) -> Result<ChangeList, EngineError> {
    let text = input::read_bounded_text(
        file,
        "--changed-ranges",
        CHANGED_RANGES_BYTES_MAX,
        "with that many changes a full read costs little more: back up without --changed-ranges",
    )?;
    let changed = changes::parse_ranges_json(&text)
        .map_err(|error| error.context(format!("--changed-ranges {}", file.display())))?;
    Ok(ChangeList {
        changed,
        unit: ExtentUnit::Bytes,
        sample_count,
        changes_from: format!("ranges file {}", file.display()),
    })
}

fn run_backup_job(
    repo: &Repository,
    options: &BackupOptions,
    paths: &[PathBuf],
    output: &Output,
    cancel: &AtomicBool,
) -> Result<lightbits::JobReport, EngineError> {
    let mut sources: Vec<String> = paths.iter().map(|s| s.display().to_string()).collect();
    if let Some(label) = &options.source_label {
        sources = vec![label.clone()];
    }
    let budget = backup::budget(options, repo.config.chunk_size_bytes, paths.len());
    output.start(Start::Backup {
        repository: repo.store.describe(),
        source: sources[0].clone(),
        sources,
        budget,
    });
    let progress = Progress::default();
    let warn = |message: String| output.warning(&message);
    let outcomes = with_progress(output, &progress, || {
        backup::run_many(repo, options, paths, &progress, cancel, &warn)
    })?;
    let mut lines = Vec::new();
    let mut backups = Vec::new();
    for outcome in &outcomes {
        let manifest = &outcome.manifest;
        let stats = &manifest.stats;
        lines.push(format!(
            "backup {} of {} ({} bytes) in {:.1} s: {} chunks, {} zero, {} already stored, {} new ({} bytes stored)",
            manifest.backup_id,
            manifest.source.path,
            manifest.volume_size_bytes,
            stats.duration_ms as f64 / 1000.0,
            stats.chunk_count,
            stats.zero_chunk_count,
            stats.dedup_chunk_count,
            stats.new_chunk_count,
            stats.new_stored_bytes,
        ));
        backups.push(BackedUp {
            backup_id: manifest.backup_id.clone(),
            source: manifest.source.path.clone(),
            volume_size_bytes: manifest.volume_size_bytes,
            io_engine: outcome.engine.name(),
            direct_io: outcome.direct,
            stats: stats.clone(),
            base: manifest.base.clone(),
        });
    }
    let result = Done::Backup {
        bytes_uploaded: Progress::get(&progress.bytes_uploaded),
        retries: repo.store.retry_count(),
        single: if let [single] = &backups[..] { Some(single.clone()) } else { None },
        backups,
    };
    Ok((result, lines.join("\n")))
}

fn run_restore(
    cli: &Cli,
    args: &RestoreArgs,
    repo: Repository,
    output: &Output,
    cancel: &Arc<AtomicBool>,
) -> Result<(), EngineError> {
    if let (Some(target), Some(root)) = (&args.target, config::local_root(&store_args(cli))) {
        validate::check_target_outside_repository(target, &root)?;
    }
    let manifest = repo.load_manifest(&args.backup_id)?;
    let mut options = RestoreOptions::new(args.target.clone().unwrap_or_default());
    options.engine = engine(cli);
    options.force = args.force;
    options.sparse = args.sparse;
    options.downloads_in_flight = args.downloads_in_flight;
    let (result, summary) = match &args.lightbits.lightbits_volume {
        Some(volume) => lightbits::restore(cli, volume, args.force, output, cancel, |device| {
            options.target = device.to_path_buf();
            run_restore_job(&repo, &manifest, &options, output, cancel)
        })?,
        None => run_restore_job(&repo, &manifest, &options, output, cancel)?,
    };
    output.result(result, &summary);
    Ok(())
}

fn run_restore_job(
    repo: &Repository,
    manifest: &crate::native::layout::Manifest,
    options: &RestoreOptions,
    output: &Output,
    cancel: &AtomicBool,
) -> Result<lightbits::JobReport, EngineError> {
    output.start(Start::Restore {
        repository: repo.store.describe(),
        backup_id: manifest.backup_id.clone(),
        target: options.target.display().to_string(),
        budget: restore::budget(options, manifest.chunk_size_bytes),
    });
    let progress = Progress::default();
    let warn = |message: String| output.warning(&message);
    let stats = with_progress(output, &progress, || {
        restore::run(repo, manifest, options, &progress, cancel, &warn)
    })?;
    let summary = format!(
        "restored backup {} to {} ({} bytes) in {:.1} s, {} bytes downloaded",
        manifest.backup_id,
        options.target.display(),
        stats.volume_size_bytes,
        stats.duration_ms as f64 / 1000.0,
        stats.bytes_downloaded
    );
    let retries = repo.store.retry_count();
    Ok((Done::Restore { backup_id: manifest.backup_id.clone(), stats, retries }, summary))
}
