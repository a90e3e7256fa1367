//! Resolves where the repository lives and how to reach it: `--repo`/`FERRY_REPO`, the optional
//! TOML config file (`--config`/`FERRY_CONFIG`), and the standard AWS environment variables.
//! Credentials come only from the environment or the config file (or a file it names), never
//! from the command line, and they are never logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::location::{self, LocalState, Location};
use super::secrets;
use crate::error::{EngineError, ErrorKind};
use crate::store::{LocalStore, ObjectStore, RetryPolicy, Retrying, S3Options, S3Store};

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Default repository (`s3://bucket/prefix` or a directory).
    pub repository: Option<String>,
    /// S3 settings.
    #[serde(default)]
    pub s3: S3Section,
    /// Cinder's `backup_s3_*` options, under their cinder.conf names (`--format cinder`).
    #[serde(default)]
    pub cinder: super::cinder::CinderSection,
    /// Lightbits cluster settings (`--lightbits-volume`, `reclaim`).
    pub lightbits: Option<super::lightbits::LightbitsSection>,
}

/// The `[s3]` table of the config file.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    /// Endpoint URL, e.g. `http://127.0.0.1:39000`.
    pub endpoint_url: Option<String>,
    /// Region (Garage: its `s3_region`, usually `garage`).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// A file holding the secret access key.
    pub secret_access_key_file: Option<PathBuf>,
    /// Verify TLS certificates (default true), like Cinder's `backup_s3_verify_ssl`.
    pub verify_tls: Option<bool>,
    /// Path-style addressing (default true; Garage needs it without DNS setup).
    pub path_style: Option<bool>,
    /// Extra CA bundle (PEM) to trust.
    pub ca_bundle: Option<PathBuf>,
    /// Per-attempt request timeout in seconds (default 60).
    pub request_timeout_secs: Option<u64>,
    /// Attempts per request, the first included (default 10).
    pub max_attempts: Option<u32>,
    /// No retry starts later than this many seconds after a request's first attempt
    /// (default 300).
    pub retry_max_secs: Option<u64>,
}

impl std::fmt::Debug for S3Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Section")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Command-line settings that affect the store.
#[derive(Debug, Default, Clone)]
pub struct StoreArgs {
    /// `--repo`.
    pub repo: Option<String>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--s3-endpoint`.
    pub s3_endpoint: Option<String>,
    /// `--s3-region`.
    pub s3_region: Option<String>,
    /// `--s3-no-verify-tls`.
    pub s3_no_verify_tls: bool,
    /// The command creates the repository (`init`): a missing local directory is created.
    /// Every other command opens an existing one and creates nothing.
    pub create: bool,
}

fn usage(message: impl Into<String>) -> EngineError {
    EngineError::new(ErrorKind::Usage, message)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// The largest config file read.
const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;

/// Reads the config file, if one is named.
///
/// # Errors
/// `Usage` when the named file cannot be read or parsed.
pub fn load_config_file(path: Option<&Path>) -> Result<ConfigFile, EngineError> {
    let Some(path) = path else { return Ok(ConfigFile::default()) };
    let advice = "a ferry config file is a few lines of TOML";
    let text = super::input::read_bounded_text(path, "config file", CONFIG_FILE_BYTES_MAX, advice)?;
    // Secrets are known before the parser sees the text, so no message can quote one.
    secrets::register_config_text(&text);
    let config: ConfigFile = toml::from_str(&text)
        .map_err(|error| usage(secrets::config_parse_error(path, &text, &error)))?;
    register_config_secrets(&config);
    Ok(config)
}

/// A secret file holds a few lines at most.
const SECRET_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Reads a file holding a secret: a regular file of at most 64 KiB (a FIFO would block, a device
/// would never end), trimmed; the secret is registered before anything can print it.
///
/// # Errors
/// `Usage`, naming the file.
pub fn read_secret_file(file: &Path) -> Result<String, EngineError> {
    let shown = file.display();
    let metadata =
        std::fs::metadata(file).map_err(|error| usage(format!("secret file {shown}: {error}")))?;
    if !metadata.is_file() || metadata.len() > SECRET_FILE_BYTES_MAX {
        return Err(usage(format!(
            "secret file {shown} is not a regular file of at most {SECRET_FILE_BYTES_MAX} bytes"
        )));
    }
    let secret = std::fs::read_to_string(file)
        .map_err(|error| usage(format!("secret file {shown}: {error}")))?;
    secrets::register(&secret);
    Ok(secret.trim().to_owned())
}

/// Registers every secret the config names, in its own value or behind a file or variable.
fn register_config_secrets(config: &ConfigFile) {
    let values = [&config.s3.secret_access_key, &config.cinder.backup_s3_store_secret_key];
    for value in values.into_iter().flatten() {
        secrets::register(value);
    }
    let files = [Some(&config.s3.secret_access_key_file)]
        .into_iter()
        .chain([config.lightbits.as_ref().map(|section| &section.token_file)]);
    for file in files.flatten().flatten() {
        // Only registered here: a file that cannot be read is reported where it is used.
        let _ = read_secret_file(file);
    }
    if let Some(name) = config.lightbits.as_ref().and_then(|section| section.token_env.as_ref()) {
        secrets::register_env(&[name]);
    }
}

/// Opens the object store the arguments name.
///
/// # Errors
/// `Usage` for a missing or malformed repository location or missing credentials; store errors.
pub fn open_store(args: &StoreArgs) -> Result<Box<dyn ObjectStore>, EngineError> {
    open_store_with(args, &load_config_file(config_path(args).as_deref())?)
}

/// The config file `--config` or `FERRY_CONFIG` names.
pub fn config_path(args: &StoreArgs) -> Option<PathBuf> {
    args.config.clone().or_else(|| env("FERRY_CONFIG").map(PathBuf::from))
}

/// The repository argument: `--repo`, else `FERRY_REPO`, else the config file's `repository`.
fn resolve_location(args: &StoreArgs, config: &ConfigFile) -> Result<String, EngineError> {
    args.repo.clone().or_else(|| env("FERRY_REPO")).or(config.repository.clone()).ok_or_else(|| {
        usage(
            "no repository given: pass --repo s3://BUCKET/PREFIX or --repo DIR (or set FERRY_REPO)",
        )
    })
}

/// The directory of the local repository the arguments name; `None` for an S3 repository or
/// when the arguments do not name a valid one (opening the store reports that).
pub fn local_root(args: &StoreArgs) -> Option<PathBuf> {
    let config = load_config_file(config_path(args).as_deref()).ok()?;
    match location::parse(&resolve_location(args, &config).ok()?).ok()? {
        Location::Local(path) => Some(path),
        Location::S3 { .. } => None,
    }
}

/// `open_store` with the config file already loaded.
///
/// # Errors
/// As `open_store`.
pub fn open_store_with(
    args: &StoreArgs,
    config: &ConfigFile,
) -> Result<Box<dyn ObjectStore>, EngineError> {
    let location = resolve_location(args, config)?;
    let mut policy = RetryPolicy::default();
    if let Some(attempts) = config.s3.max_attempts {
        if attempts == 0 {
            return Err(usage(
                "[s3] max_attempts = 0: it counts attempts, the first included, so \
                              it is at least 1",
            ));
        }
        policy.max_attempts = attempts;
        // A store that never answered gets at most the default few attempts, never more than
        // max_attempts allows.
        policy.unreached_attempts = policy.unreached_attempts.min(attempts);
    }
    if let Some(seconds) = config.s3.retry_max_secs {
        policy.max_elapsed = Duration::from_secs(seconds);
    }
    match location::parse(&location)? {
        Location::S3 { bucket, prefix } => {
            Ok(Box::new(Retrying::new(open_s3(&bucket, &prefix, args, &config.s3)?, policy)))
        }
        Location::Local(path) => {
            let shown = path.display();
            match (location::local_directory(&path)?, args.create) {
                (LocalState::Missing, false) => Err(EngineError::new(
                    ErrorKind::NotFound,
                    format!(
                        "no repository at {shown}: the directory does not exist (create one \
                             with `ferry init`)"
                    ),
                )),
                (LocalState::Other, true) => Err(EngineError::new(
                    ErrorKind::Refused,
                    format!(
                        "{shown} is not empty and holds no ferry repository; `ferry init` \
                             needs a new or empty directory"
                    ),
                )),
                _ => Ok(Box::new(Retrying::new(LocalStore::new(path)?, policy))),
            }
        }
    }
}

fn open_s3(
    bucket: &str,
    prefix: &str,
    args: &StoreArgs,
    section: &S3Section,
) -> Result<S3Store, EngineError> {
    let access_key_id = env("AWS_ACCESS_KEY_ID").or(section.access_key_id.clone());
    let secret = match (
        env("AWS_SECRET_ACCESS_KEY"),
        &section.secret_access_key,
        &section.secret_access_key_file,
    ) {
        (Some(secret), _, _) => Some(secret),
        (None, Some(secret), _) => Some(secret.clone()),
        (None, None, Some(file)) => Some(read_secret_file(file)?),
        (None, None, None) => None,
    };
    if let Some(secret) = &secret {
        secrets::register(secret);
    }
    let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret) else {
        return Err(usage(
            "S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
             access_key_id and secret_access_key (or secret_access_key_file) in the config file",
        ));
    };
    let region = args
        .s3_region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or(section.region.clone())
        .unwrap_or_else(|| "us-east-1".to_string());
    let mut options = S3Options::new(
        bucket.to_string(),
        prefix.to_string(),
        region,
        access_key_id,
        secret_access_key,
    );
    options.endpoint_url = args
        .s3_endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or(section.endpoint_url.clone());
    if let Some(url) = &options.endpoint_url {
        location::check_endpoint(url)?;
    }
    options.verify_tls = !args.s3_no_verify_tls && section.verify_tls.unwrap_or(true);
    options.path_style = section.path_style.unwrap_or(true);
    options.ca_bundle = section.ca_bundle.clone();
    if let Some(seconds) = section.request_timeout_secs {
        options.operation_timeout = Duration::from_secs(seconds);
    }
    Ok(S3Store::new(options)?)
}
