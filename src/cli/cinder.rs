//! `--format cinder`: `ferry backup` and `ferry restore` in OpenStack Cinder's S3 backup layout,
//! and `ferry cinder-record`. Parses the Cinder flags and the `[cinder]` config table (Cinder's
//! own option names and defaults), opens the bucket, and runs `cinder::backup`, `cinder::restore` or `cinder::bucket::record`.
//!
//! The bucket is the repository: `--repo s3://BUCKET` (no prefix: Cinder's keys start at the
//! bucket root), else `FERRY_REPO`, else `backup_s3_store_bucket` (default `volumebackups`).
//! No `ferry init` is needed: a Cinder bucket holds no ferry repository.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use super::config::{self, ConfigFile, StoreArgs};
use super::events::{Done, FormatName, Start};
use super::output::Output;
use super::{Cli, Command, engine, lightbits, store_args, with_progress};
use crate::cinder::{self, Algorithm, Geometry};
use crate::error::{EngineError, ErrorKind};
use crate::limits;
use crate::progress::Progress;
use crate::store::ObjectStore;

/// `--format` of `backup` and `restore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// ferry's own deduplicating repository.
    #[default]
    Native,
    /// OpenStack Cinder's S3 backup driver layout (cinder-backup can restore it).
    Cinder,
}

/// The Cinder flags of `ferry backup`.
#[derive(Debug, Args)]
pub struct BackupFlags {
    /// Backup layout: ferry's repository, or Cinder's S3 driver layout.
    #[arg(long, value_enum, default_value = "native")]
    pub format: Format,
    /// Cinder backup UUID (--format cinder).
    #[arg(long, value_name = "UUID")]
    pub cinder_backup_id: Option<String>,
    /// Cinder volume UUID (--format cinder).
    #[arg(long, value_name = "UUID")]
    pub cinder_volume_id: Option<String>,
    /// Make an incremental on top of this Cinder backup (--format cinder).
    #[arg(long, value_name = "UUID")]
    pub incremental_parent: Option<String>,
    /// Compression: zlib, gzip, bz2, bzip2, zstd, none (default backup_compression_algorithm,
    /// else zlib) (--format cinder).
    #[arg(long, value_name = "NAME")]
    pub compression: Option<String>,
    /// Largest uncompressed object (default backup_s3_object_size, else 52428800).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub cinder_object_size: Option<u64>,
    /// SHA-256 block size for incrementals (default backup_s3_block_size, else 32768).
    #[arg(long, value_name = "BYTES", allow_hyphen_values = true)]
    pub cinder_block_size: Option<u64>,
    /// Upload requests (single PUTs or 16 MiB parts) in flight (--format cinder; default 4).
    #[arg(long, value_name = "N", value_parser = super::parse_in_flight, allow_hyphen_values = true)]
    pub cinder_uploads: Option<usize>,
    /// zlib level for `zlib`/`gzip` objects, 1-9 (--format cinder; default 1). Cinder
    /// compresses at 6; level 1 is several times faster for a somewhat larger object, and Cinder
    /// decodes every level the same.
    #[arg(long, value_name = "LEVEL", value_parser = clap::value_parser!(u32).range(1..=9),
          allow_hyphen_values = true)]
    pub zlib_level: Option<u32>,
    /// The backup's `display_name`, written into `_metadata` and `_sha256file` (--format cinder).
    #[arg(long, value_name = "TEXT")]
    pub cinder_backup_name: Option<String>,
    /// The backup's `display_description` (--format cinder).
    #[arg(long, value_name = "TEXT")]
    pub cinder_backup_description: Option<String>,
    /// File holding the JSON text Cinder stores as `volume_meta` in `_metadata` (what
    /// `BackupMetadataAPI.get` returns); without it `volume_meta` is null (--format cinder).
    #[arg(long, value_name = "PATH")]
    pub cinder_volume_meta_file: Option<std::path::PathBuf>,
}

/// The Cinder flags of `ferry restore`.
#[derive(Debug, Args)]
pub struct RestoreFlags {
    /// Backup layout: ferry's repository, or Cinder's S3 driver layout.
    #[arg(long, value_enum, default_value = "native")]
    pub format: Format,
    /// The Cinder volume UUID the backup was taken of (--format cinder).
    #[arg(long, value_name = "UUID")]
    pub cinder_volume_id: Option<String>,
}

/// `ferry cinder-record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The Cinder backup UUID.
    pub backup_id: String,
    /// The Cinder volume UUID it was taken of.
    #[arg(long, value_name = "UUID")]
    pub cinder_volume_id: String,
}

/// The `[cinder]` table of the config file: cinder.conf's `[DEFAULT]` backup options under their
/// own names. Options ferry has no use for are accepted so a cinder.conf excerpt pastes in.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CinderSection {
    /// S3 endpoint URL.
    pub backup_s3_endpoint_url: Option<String>,
    /// Access key id.
    pub backup_s3_store_access_key: Option<String>,
    /// Secret access key.
    pub backup_s3_store_secret_key: Option<String>,
    /// Bucket (default `volumebackups`).
    pub backup_s3_store_bucket: Option<String>,
    /// Largest uncompressed object (default 52428800).
    pub backup_s3_object_size: Option<u64>,
    /// SHA-256 block size (default 32768).
    pub backup_s3_block_size: Option<u64>,
    /// Accepted, ignored (ferry reports progress its own way).
    pub backup_s3_enable_progress_timer: Option<bool>,
    /// Refused when set: ferry does not use an HTTP proxy.
    pub backup_s3_http_proxy: Option<String>,
    /// Refused when set: ferry does not use an HTTPS proxy.
    pub backup_s3_https_proxy: Option<String>,
    /// Per-request timeout in seconds (default 60).
    pub backup_s3_timeout: Option<f64>,
    /// Accepted, ignored (concurrency is --cinder-uploads / --downloads-in-flight).
    pub backup_s3_max_pool_connections: Option<u64>,
    /// Retries after the first attempt (default 4).
    pub backup_s3_retry_max_attempts: Option<u32>,
    /// Accepted, ignored (ferry's retry layer backs off with jitter).
    pub backup_s3_retry_mode: Option<String>,
    /// Verify TLS certificates (default true).
    pub backup_s3_verify_ssl: Option<bool>,
    /// CA bundle to trust.
    pub backup_s3_ca_cert_file: Option<std::path::PathBuf>,
    /// Accepted, ignored (the SDK checksums every request).
    pub backup_s3_md5_validation: Option<bool>,
    /// Refused when set: SSE-C is not supported.
    pub backup_s3_sse_customer_key: Option<String>,
    /// Refused when set: SSE-C is not supported.
    pub backup_s3_sse_customer_algorithm: Option<String>,
    /// Compression (default `zlib`).
    pub backup_compression_algorithm: Option<String>,
    /// Accepted, ignored (ferry never creates buckets).
    pub backup_create_containers: Option<bool>,
    /// Accepted, ignored.
    pub backup_timer_interval: Option<u64>,
    /// Accepted, ignored.
    pub backup_object_number_per_notification: Option<u64>,
    /// Accepted, ignored (`volume_meta` is the caller's: `--cinder-volume-meta-file`).
    pub backup_metadata_version: Option<u64>,
    /// Availability zone in the object prefix (default `nova`).
    pub storage_availability_zone: Option<String>,
}

impl std::fmt::Debug for CinderSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CinderSection")
            .field("backup_s3_endpoint_url", &self.backup_s3_endpoint_url)
            .field("backup_s3_store_bucket", &self.backup_s3_store_bucket)
            .field(
                "backup_s3_store_secret_key",
                &self.backup_s3_store_secret_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn usage(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

/// Handles the command when it is Cinder's: `Some(result)` for `--format cinder` and
/// `cinder-record`, `None` for everything else.
pub(super) fn dispatch(
    cli: &Cli,
    output: &Output,
    cancel: &Arc<AtomicBool>,
) -> Option<Result<(), EngineError>> {
    match &cli.command {
        Command::Backup(args) if args.cinder.format == Format::Cinder => {
            Some(run_backup(cli, args, output, cancel))
        }
        Command::Restore(args) if args.cinder.format == Format::Cinder => {
            Some(run_restore(cli, args, output, cancel))
        }
        Command::CinderRecord(args) => Some(run_record(cli, args, output)),
        _ => None,
    }
}

/// Opens the bucket: the config file's `[cinder]` options fill what `[s3]` leaves unset.
fn open_bucket(cli: &Cli) -> Result<(Box<dyn ObjectStore>, String, ConfigFile), EngineError> {
    let mut args: StoreArgs = store_args(cli);
    let mut config = config::load_config_file(config::config_path(&args).as_deref())?;
    let c = &config.cinder;
    if c.backup_s3_sse_customer_key.is_some() || c.backup_s3_sse_customer_algorithm.is_some() {
        return Err(usage("backup_s3_sse_customer_key/algorithm (SSE-C) is not supported"));
    }
    if c.backup_s3_http_proxy.as_deref().is_some_and(|p| !p.is_empty())
        || c.backup_s3_https_proxy.as_deref().is_some_and(|p| !p.is_empty())
    {
        return Err(usage("backup_s3_http_proxy/backup_s3_https_proxy are not supported"));
    }
    let location = args
        .repo
        .clone()
        .or_else(|| std::env::var("FERRY_REPO").ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| {
            let bucket =
                c.backup_s3_store_bucket.clone().unwrap_or_else(|| cinder::DEFAULT_BUCKET.into());
            format!("s3://{bucket}")
        });
    let bucket = match super::location::parse(&location)? {
        super::location::Location::S3 { bucket, prefix } if prefix.is_empty() => bucket,
        super::location::Location::S3 { .. } => {
            return Err(usage(format!(
                "--format cinder writes at the bucket root as Cinder does: --repo s3://BUCKET, \
                 not {location:?}"
            )));
        }
        super::location::Location::Local(_) => {
            return Err(usage(format!(
                "--format cinder needs an S3 bucket: --repo s3://BUCKET, not {location:?}"
            )));
        }
    };
    let s3 = &mut config.s3;
    s3.endpoint_url = s3.endpoint_url.take().or(c.backup_s3_endpoint_url.clone());
    s3.access_key_id = s3.access_key_id.take().or(c.backup_s3_store_access_key.clone());
    s3.secret_access_key = s3.secret_access_key.take().or(c.backup_s3_store_secret_key.clone());
    s3.verify_tls = s3.verify_tls.or(c.backup_s3_verify_ssl);
    s3.ca_bundle = s3.ca_bundle.take().or(c.backup_s3_ca_cert_file.clone());
    s3.request_timeout_secs =
        s3.request_timeout_secs.or(c.backup_s3_timeout.map(|t| t.ceil().max(1.0) as u64));
    s3.max_attempts = s3.max_attempts.or(c.backup_s3_retry_max_attempts.map(|r| r + 1));
    args.repo = Some(format!("s3://{bucket}"));
    config.repository = None;
    Ok((config::open_store_with(&args, &config)?, bucket, config))
}

fn required<'a>(value: &'a Option<String>, flag: &str) -> Result<&'a str, EngineError> {
    value.as_deref().ok_or_else(|| usage(format!("--format cinder needs {flag}")))
}

/// The compression and the object and block sizes: the flags, else the `[cinder]` table, else
/// Cinder's defaults.
fn layout_settings(
    flags: &BackupFlags,
    c: &CinderSection,
) -> Result<(Algorithm, Geometry), EngineError> {
    let name = flags
        .compression
        .clone()
        .or(c.backup_compression_algorithm.clone())
        .unwrap_or_else(|| "zlib".into());
    let algorithm = Algorithm::from_name(&name)?;
    let geometry = Geometry::new(
        flags.cinder_object_size.or(c.backup_s3_object_size).unwrap_or(cinder::DEFAULT_OBJECT_SIZE),
        flags.cinder_block_size.or(c.backup_s3_block_size).unwrap_or(cinder::DEFAULT_BLOCK_SIZE),
    )?;
    Ok((algorithm, geometry))
}

fn run_backup(
    cli: &Cli,
    args: &super::BackupArgs,
    output: &Output,
    cancel: &Arc<AtomicBool>,
) -> Result<(), EngineError> {
    let flags = &args.cinder;
    let backup_id = required(&flags.cinder_backup_id, "--cinder-backup-id UUID")?;
    let volume_id = required(&flags.cinder_volume_id, "--cinder-volume-id UUID")?;
    let source = match (args.source.as_slice(), &args.lightbits.lightbits_volume) {
        ([source], None) => source.clone(),
        ([], Some(_)) => std::path::PathBuf::new(),
        _ => return Err(usage("--format cinder backs up one --source at a time")),
    };
    // Validate everything before opening the bucket.
    let pre = config::load_config_file(config::config_path(&store_args(cli)).as_deref())?;
    let (algorithm, geometry) = layout_settings(flags, &pre.cinder)?;
    let volume_meta = flags.cinder_volume_meta_file.as_deref().map(read_volume_meta).transpose()?;
    let sample_count = args.sample_unchanged.map(|count| count as usize);
    let changes = args.changed_ranges.as_deref();
    let changes = changes.map(|file| super::read_ranges(file, sample_count)).transpose()?;
    let (store, bucket, config) = open_bucket(cli)?;
    let mut job = cinder::backup::BackupJob {
        source,
        engine: engine(cli),
        backup_id: backup_id.to_owned(),
        volume_id: volume_id.to_owned(),
        parent_id: flags.incremental_parent.clone(),
        parent_is_hint: false,
        changes,
        algorithm,
        geometry,
        availability_zone: config
            .cinder
            .storage_availability_zone
            .clone()
            .unwrap_or_else(|| cinder::names::DEFAULT_AVAILABILITY_ZONE.into()),
        name: flags.cinder_backup_name.clone(),
        description: flags.cinder_backup_description.clone(),
        volume_meta,
        zlib_level: flags.zlib_level.unwrap_or(1),
        workers: args.workers.unwrap_or_else(super::default_workers),
        uploads: flags.cinder_uploads.unwrap_or(limits::PARTS_IN_FLIGHT_DEFAULT),
        limit_read_bytes_per_sec: args.limit_read,
        limit_upload_bytes_per_sec: args.limit_upload,
    };
    let run = |job: &cinder::backup::BackupJob, label: &str| {
        let read_chunk =
            cinder::backup::read_chunk_bytes(job.geometry, crate::io::BUF_ALIGN).unwrap_or(0);
        let budget = cinder::backup::budget(job, read_chunk.max(1));
        output.start(Start::CinderBackup {
            repository: store.describe(),
            format: FormatName::Cinder,
            bucket: bucket.clone(),
            source: label.to_owned(),
            backup_id: backup_id.to_owned(),
            volume_id: volume_id.to_owned(),
            parent_id: job.parent_id.clone(),
            compression: algorithm.name(),
            object_size_bytes: geometry.object_size(),
            budget,
        });
        let progress = Progress::default();
        let warn = |message: String| output.warning(&message);
        with_progress(output, &progress, || {
            cinder::backup::backup(store.as_ref(), job, &progress, cancel, &warn)
        })
    };
    let (outcome, label) = match &args.lightbits.lightbits_volume {
        Some(volume) => {
            let bases = lightbits::Bases::of(args.lightbits_keep_base);
            lightbits::backup(
                cli,
                volume,
                backup_id,
                bases,
                output,
                cancel,
                |device, label, hint| {
                    job.source = device.to_path_buf();
                    apply_hint(&mut job, hint, sample_count, output);
                    run(&job, &label).map(|outcome| (outcome, label))
                },
            )?
        }
        None => (run(&job, &job.source.display().to_string())?, job.source.display().to_string()),
    };
    let summary = format!(
        "cinder backup {backup_id} of {label} ({} bytes) in {:.1} s: {} objects under {} in bucket {bucket}",
        outcome.volume_size_bytes,
        outcome.duration_ms as f64 / 1000.0,
        outcome.object_count,
        outcome.prefix
    );
    output.result(
        Done::CinderBackup {
            backup_id: backup_id.to_owned(),
            volume_id: volume_id.to_owned(),
            bucket,
            format: FormatName::Cinder,
            compression: algorithm.name(),
            source: label,
            stats: outcome,
        },
        &summary,
    );
    Ok(())
}

/// A Lightbits base for a Cinder-format backup: its backup becomes the parent (a parent that
/// cannot be used is then a warning and a full backup), and its diff, when the cluster gave one,
/// the change list; without the diff, the backup is a full-read incremental of that parent.
/// `--incremental-parent` naming another backup makes the base unused, with a warning. The base
/// ties to the parent by the Cinder backup id it was kept for; the parent must be a backup of
/// this `--cinder-volume-id`, or it is not found.
fn apply_hint(
    job: &mut cinder::backup::BackupJob,
    hint: Option<lightbits::Hint>,
    sample_count: Option<usize>,
    output: &Output,
) {
    let Some(hint) = hint else { return };
    match &job.parent_id {
        Some(parent) if *parent != hint.parent_backup_id => {
            output.warning(&format!(
                "incremental backup not possible, reading the whole source: the diff base is of \
                 backup {}, not of --incremental-parent {parent}",
                hint.parent_backup_id
            ));
        }
        Some(_) => job.changes = hint.changes(sample_count),
        None => {
            job.parent_id = Some(hint.parent_backup_id.clone());
            job.parent_is_hint = true;
            job.changes = hint.changes(sample_count);
        }
    }
}

fn run_restore(
    cli: &Cli,
    args: &super::RestoreArgs,
    output: &Output,
    cancel: &Arc<AtomicBool>,
) -> Result<(), EngineError> {
    let volume_id = required(&args.cinder.cinder_volume_id, "--cinder-volume-id UUID")?;
    let (store, bucket, _) = open_bucket(cli)?;
    let mut job = cinder::restore::RestoreJob {
        backup_id: args.backup_id.clone(),
        volume_id: volume_id.to_owned(),
        target: args.target.clone().unwrap_or_default(),
        force: args.force,
        sparse: args.sparse,
        engine: engine(cli),
        downloads: args.downloads_in_flight,
    };
    let run = |job: &cinder::restore::RestoreJob| {
        let start = |budget: &limits::Budget| {
            output.start(Start::CinderRestore {
                repository: store.describe(),
                format: FormatName::Cinder,
                bucket: bucket.clone(),
                backup_id: job.backup_id.clone(),
                volume_id: volume_id.to_owned(),
                target: job.target.display().to_string(),
                budget: *budget,
            });
        };
        let progress = Progress::default();
        let warn = |message: String| output.warning(&message);
        with_progress(output, &progress, || {
            cinder::restore::restore(store.as_ref(), job, &progress, cancel, &warn, &start)
        })
    };
    let outcome = match &args.lightbits.lightbits_volume {
        Some(volume) => lightbits::restore(cli, volume, args.force, output, cancel, |device| {
            job.target = device.to_path_buf();
            run(&job)
        })?,
        None => run(&job)?,
    };
    let summary = format!(
        "restored cinder backup {} (chain {}) to {} ({} bytes) in {:.1} s, {} bytes downloaded",
        job.backup_id,
        outcome.chain.join(" -> "),
        job.target.display(),
        outcome.volume_size_bytes,
        outcome.duration_ms as f64 / 1000.0,
        outcome.bytes_downloaded
    );
    // The requested backup's `volume_meta`, for a caller that puts it back on the volume.
    let volume_meta = outcome.chain_volume_meta.last().cloned().flatten();
    output.result(
        Done::CinderRestore {
            backup_id: job.backup_id.clone(),
            format: FormatName::Cinder,
            volume_meta,
            stats: outcome,
        },
        &summary,
    );
    Ok(())
}

/// The largest `--cinder-volume-meta-file` read.
const VOLUME_META_BYTES_MAX: u64 = 16 << 20;

/// Reads `--cinder-volume-meta-file`: JSON text, stored as the string it is (Cinder's
/// `volume_meta` is double-encoded JSON).
fn read_volume_meta(path: &std::path::Path) -> Result<String, EngineError> {
    // Cinder keeps it in one database row and in `_metadata`: a few KiB.
    let advice = "Cinder's volume metadata is a small JSON document";
    let text = super::input::read_bounded_text(
        path,
        "--cinder-volume-meta-file",
        VOLUME_META_BYTES_MAX,
        advice,
    )?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    if let Err(error) = serde_json::from_str::<serde_json::Value>(&text) {
        return Err(usage(format!(
            "--cinder-volume-meta-file {}: not JSON ({error})",
            path.display()
        )));
    }
    Ok(text)
}

fn run_record(cli: &Cli, args: &RecordArgs, output: &Output) -> Result<(), EngineError> {
    let (store, bucket, _) = open_bucket(cli)?;
    let record =
        cinder::bucket::record(store.as_ref(), &bucket, &args.cinder_volume_id, &args.backup_id)?;
    let encoded = record.encode();
    let decoded: serde_json::Value =
        serde_json::from_slice(&record.to_json()).unwrap_or(serde_json::Value::Null);
    output.result(
        Done::CinderRecord {
            backup_id: args.backup_id.clone(),
            backup_service: cinder::record::S3_BACKUP_SERVICE,
            backup_url: encoded.clone(),
            record: decoded,
        },
        &encoded,
    );
    Ok(())
}
