//! `S3Store`: the object store on S3 or an S3-compatible server (Garage, Ceph RGW, MinIO),
//! through aws-sdk-s3 behind the blocking `ObjectStore` trait.
//!
//! The store owns a small tokio runtime (2 worker threads named `ferry-s3`) and one SDK client;
//! every trait method blocks the calling OS thread on that runtime, so parallelism comes from how
//! many threads call at once (the HTTP pool opens one connection per request in flight and keeps
//! up to 64 idle ones). The client is configured for S3-compatible servers: checksums only when an
//! operation requires them (servers such as Garage reject the SDK's default trailer checksums),
//! path-style addressing by default, in-memory bodies, unsigned payloads with a CRC32C per PUT
//! and per part (the server rejects a damaged body; Garage 2.5.0 and AWS both check it), connect
//! and per-attempt timeouts, stalled-stream protection. Keys are `prefix/key` in the bucket.
//!
//! This module deliberately does not: retry (one SDK attempt per call; `store::Retrying` retries
//! what `map_error` classifies as transient), stream bodies (parts are `Bytes` in memory), verify object
//! content (ferry objects carry their own checksums), read credentials from the environment (the
//! caller passes them in `S3Options`), or disable TLS certificate verification (see
//! `S3Options::verify_tls`).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use bytes::Bytes;

use super::{
    DatedObject, KeyRange, ObjectInfo, ObjectStore, PartReceipt, PendingUpload, StoreError,
    UploadId,
};

/// Largest response body buffer allocated up front from the `Content-Length` a server sends.
const PREALLOCATE_MAX: usize = 256 << 20;

/// Highest part number S3 accepts.
const MAX_PART_NUMBER: u32 = 10_000;
/// Idle connections kept per host; at least the number of requests ferry keeps in flight.
const POOL_MAX_IDLE_PER_HOST: usize = 64;
/// Idle pooled connections are closed after this long, before servers drop them on their side.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A transfer that moves no bytes for this long is aborted (stalled-stream protection).
const STALL_GRACE_PERIOD: Duration = Duration::from_secs(20);

/// How to reach a bucket.
#[derive(Clone)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:39000`; `None` resolves the AWS endpoint for
    /// `region`.
    pub endpoint_url: Option<String>,
    /// Region name; must equal the server's configured region (`garage` for Garage).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket: `""` or `a/b` (leading and trailing `/` are ignored);
    /// objects are stored as `prefix/key`.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted style; most
    /// S3-compatible servers need it.
    pub path_style: bool,
    /// Verify the server's TLS certificate. `false` (accept any certificate) is not supported yet
    /// and makes `S3Store::new` fail for https endpoints; use `ca_bundle` for private CAs.
    pub verify_tls: bool,
    /// Extra PEM CA certificates to trust, in addition to the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key; never printed by `Debug`.
    pub secret_access_key: String,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one attempt of one request; size it for the largest part at the slowest
    /// acceptable throughput.
    pub operation_timeout: Duration,
    /// Attempts per request inside the SDK, the first included. 1 by default: ferry retries
    /// in `store::Retrying`, which classifies every failure and bounds attempts and time.
    pub max_attempts: u32,
}

impl S3Options {
    /// Options with ferry's defaults: no explicit endpoint, path-style addressing, TLS
    /// verification on, 3 s connect timeout, 60 s per attempt, 1 attempt (retries are
    /// `store::Retrying`'s).
    pub fn new(
        bucket: impl Into<String>,
        prefix: impl Into<String>,
        region: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        S3Options {
            endpoint_url: None,
            region: region.into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            path_style: true,
            verify_tls: true,
            ca_bundle: None,
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(60),
            max_attempts: 1,
        }
    }

    /// The endpoint as shown in messages.
    fn endpoint_label(&self) -> String {
        match &self.endpoint_url {
            Some(url) => url.clone(),
            None => format!("aws s3 endpoint of region {}", self.region),
        }
    }

    /// Whether requests go over TLS.
    fn uses_tls(&self) -> bool {
        match &self.endpoint_url {
            Some(url) => !url.to_ascii_lowercase().starts_with("http://"),
            None => true,
        }
    }
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint_url", &self.endpoint_url)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("verify_tls", &self.verify_tls)
            .field("ca_bundle", &self.ca_bundle)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// An object store in an S3 bucket. See the module documentation.
pub struct S3Store {
    // Field order matters: the client (and its connection pool) drops before the runtime.
    client: aws_sdk_s3::Client,
    runtime: tokio::runtime::Runtime,
    bucket: String,
    /// `""` or `prefix/`, prepended to every key.
    key_base: String,
    endpoint: String,
    operation_timeout: Duration,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("location", &self.describe()).finish_non_exhaustive()
    }
}

/// Whether a 404 answer means "the object does not exist" (reads) or something else went wrong
/// (e.g. `NoSuchUpload` on a part upload).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    IsNotFound,
    IsFailure,
}

impl S3Store {
    /// Builds the runtime and the client. Makes no request.
    ///
    /// # Errors
    /// `StoreError::Config` for an empty bucket, region or credentials, a malformed endpoint or
    /// prefix, an unreadable or invalid `ca_bundle`, `verify_tls = false` on a TLS endpoint, or
    /// when the runtime cannot start.
    pub fn new(options: S3Options) -> Result<S3Store, StoreError> {
        let prefix = validate_options(&options)?;
        let http_client = build_http_client(&options)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-s3")
            .enable_all()
            .build()
            .map_err(|error| StoreError::Config(format!("cannot start the s3 runtime: {error}")))?;

        let credentials = Credentials::new(
            options.access_key_id.clone(),
            options.secret_access_key.clone(),
            None,
            None,
            "ferry-options",
        );
        let retry = RetryConfig::standard()
            .with_max_attempts(options.max_attempts)
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(20));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(options.connect_timeout)
            .operation_attempt_timeout(options.operation_timeout)
            .build();
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(options.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(options.path_style)
            // S3-compatible servers choke on the SDK's default (since 2025) request checksums,
            // and ferry verifies its own objects on restore.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(retry)
            .timeout_config(timeouts)
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled().grace_period(STALL_GRACE_PERIOD).build(),
            )
            .http_client(http_client);
        if let Some(url) = &options.endpoint_url {
            builder = builder.endpoint_url(url.clone());
        }
        let client = {
            let _guard = runtime.enter();
            aws_sdk_s3::Client::from_conf(builder.build())
        };

        Ok(S3Store {
            client,
            runtime,
            bucket: options.bucket.clone(),
            key_base: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            endpoint: options.endpoint_label(),
            operation_timeout: options.operation_timeout,
        })
    }

    /// The bucket key of a repository key.
    fn full_key(&self, operation: &'static str, key: &str) -> Result<String, StoreError> {
        if key.is_empty() || key.starts_with('/') {
            return Err(StoreError::Failed {
                operation,
                key: key.to_owned(),
                detail: "invalid key: empty or absolute".to_owned(),
                transient: false,
            });
        }
        Ok(format!("{}{key}", self.key_base))
    }

    /// The repository key of a bucket key, or `None` when it lies outside the prefix.
    fn relative_key<'k>(&self, full: &'k str) -> Option<&'k str> {
        full.strip_prefix(self.key_base.as_str())
    }

    /// Runs `future` on the store's runtime, blocking the calling thread.
    fn run<T>(
        &self,
        operation: &'static str,
        key: &str,
        future: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            // block_on would panic: the trait is meant for plain OS threads.
            return Err(StoreError::Failed {
                operation,
                key: key.to_owned(),
                detail: "s3 store called from inside an async runtime".to_owned(),
                transient: false,
            });
        }
        self.runtime.block_on(future)
    }

    /// Maps an SDK error to a `StoreError`, keeping the S3 code, message and request id.
    fn map_error<E>(
        &self,
        operation: &'static str,
        key: &str,
        missing: Missing,
        error: &SdkError<E>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let key_owned = key.to_owned();
        let unreachable = |detail: String| StoreError::Unreachable {
            endpoint: self.endpoint.clone(),
            operation,
            key: key_owned.clone(),
            detail,
        };
        let failed = |detail: String, transient: bool| StoreError::Failed {
            operation,
            key: key_owned.clone(),
            detail,
            transient,
        };
        match error {
            SdkError::ServiceError(context) => {
                let status = context.raw().status().as_u16();
                let code = context.err().code().unwrap_or("");
                let message = context.err().message().unwrap_or("");
                let mut detail = format!("http {status}");
                if !code.is_empty() {
                    detail.push(' ');
                    detail.push_str(code);
                }
                if !message.is_empty() {
                    detail.push_str(": ");
                    detail.push_str(message);
                }
                if let Some(request_id) = error.request_id() {
                    detail.push_str(&format!(" (request id {request_id})"));
                }
                match (status, code) {
                    (_, "NoSuchBucket") => failed(
                        format!(
                            "bucket {} does not exist at {}: {detail}",
                            self.bucket, self.endpoint
                        ),
                        false,
                    ),
                    (401 | 403, _)
                    | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                        StoreError::AccessDenied {
                            endpoint: self.endpoint.clone(),
                            operation,
                            key: key_owned.clone(),
                            detail,
                        }
                    }
                    (404, _) | (_, "NoSuchKey" | "NotFound") if missing == Missing::IsNotFound => {
                        StoreError::NotFound { key: key_owned.clone() }
                    }
                    (429 | 500..=599, _)
                    | (
                        _,
                        "SlowDown"
                        | "ServiceUnavailable"
                        | "InternalError"
                        | "RequestTimeout"
                        | "Throttling"
                        | "ThrottlingException"
                        // The body's CRC32C did not match: damaged on the way, resent from memory.
                        | "BadDigest"
                        | "InvalidDigest",
                    ) => failed(detail, true),
                    _ => failed(detail, false),
                }
            }
            SdkError::DispatchFailure(failure) if failure.is_user() => {
                failed(format!("request could not be sent: {}", crate::error::chain(error)), false)
            }
            SdkError::TimeoutError(_) => unreachable(format!(
                "no answer within the attempt timeout ({})",
                crate::error::chain(error)
            )),
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
                unreachable(crate::error::chain(error))
            }
            _ => failed(crate::error::chain(error), false),
        }
    }

    /// Reads a whole response body, within the per-attempt timeout.
    async fn collect_body(
        &self,
        operation: &'static str,
        key: &str,
        mut body: ByteStream,
        expected_len: Option<u64>,
    ) -> Result<Bytes, StoreError> {
        // Appended segment by segment into one buffer of the announced size, each segment freed
        // as it is copied: the body is held once, not as segments plus a contiguous copy. The
        // announcement is the server's word: trusted only up to PREALLOCATE_MAX.
        let capacity =
            expected_len.and_then(|n| usize::try_from(n).ok()).unwrap_or(0).min(PREALLOCATE_MAX);
        let read = async {
            let mut data = bytes::BytesMut::with_capacity(capacity);
            while let Some(segment) = body.next().await {
                data.extend_from_slice(&segment?);
            }
            Ok::<_, aws_sdk_s3::primitives::ByteStreamError>(data.freeze())
        };
        match tokio::time::timeout(self.operation_timeout, read).await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(error)) => Err(StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                operation,
                key: key.to_owned(),
                detail: format!(
                    "reading the response body failed: {}",
                    crate::error::chain(&error)
                ),
            }),
            Err(_) => Err(StoreError::Unreachable {
                endpoint: self.endpoint.clone(),
                operation,
                key: key.to_owned(),
                detail: format!(
                    "reading the response body took longer than {:?}",
                    self.operation_timeout
                ),
            }),
        }
    }

    /// Checks that the object exists (for zero-length ranges, which S3 cannot express).
    async fn head(
        &self,
        operation: &'static str,
        key: &str,
        full: &str,
    ) -> Result<u64, StoreError> {
        let output = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|error| self.map_error(operation, key, Missing::IsNotFound, &error))?;
        Ok(output.content_length().and_then(|size| u64::try_from(size).ok()).unwrap_or(0))
    }

    async fn get_range_async(
        &self,
        key: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, StoreError> {
        const OP: &str = "GetObject";
        let full = self.full_key(OP, key)?;
        let short =
            |got: u64| StoreError::ShortRead { key: key.to_owned(), offset, wanted: length, got };
        if length == 0 {
            let size = self.head(OP, key, &full).await?;
            return if size >= offset { Ok(Bytes::new()) } else { Err(short(0)) };
        }
        let Some(last) = offset.checked_add(length - 1) else {
            return Err(short(0));
        };
        let result = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes={offset}-{last}"))
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            // Range starts at or beyond the end of the object.
            Err(SdkError::ServiceError(context))
                if context.raw().status().as_u16() == 416
                    || context.err().code() == Some("InvalidRange") =>
            {
                return Err(short(0));
            }
            Err(error) => return Err(self.map_error(OP, key, Missing::IsNotFound, &error)),
        };
        let ranged = output.content_range().is_some();
        let announced = output.content_length().and_then(|size| u64::try_from(size).ok());
        let data = self.collect_body(OP, key, output.body, announced).await?;
        let got = data.len() as u64;
        if got == length {
            return Ok(data);
        }
        if got < length {
            return Err(short(got));
        }
        // More than asked: a server that ignored the Range header and sent the whole object.
        if !ranged && got > last {
            // Both bounds are below `got`, which is a usize.
            return Ok(data.slice(offset as usize..=last as usize));
        }
        Err(StoreError::Failed {
            operation: OP,
            key: key.to_owned(),
            detail: format!("server returned {got} bytes for a range of {length}"),
            transient: false,
        })
    }

    /// Lists the keys of `range` under `prefix`; each object with its `LastModified` (Unix
    /// seconds), `None` when the store sent none. The first request starts after
    /// `range.start_after` (S3 `StartAfter`); paging stops at the first page that reaches
    /// `range.end`.
    async fn list_async(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<(ObjectInfo, Option<u64>)>, StoreError> {
        const OP: &str = "ListObjectsV2";
        let full_prefix = format!("{}{prefix}", self.key_base);
        // S3 takes `StartAfter` as a full key.
        let start_after = (!range.start_after.is_empty())
            .then(|| format!("{}{}", self.key_base, range.start_after));
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        let mut first = true;
        loop {
            let output = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_start_after(if first { start_after.clone() } else { None })
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|error| self.map_error(OP, prefix, Missing::IsFailure, &error))?;
            first = false;
            let mut past_end = false;
            for object in output.contents() {
                let Some(key) = object.key().and_then(|full| self.relative_key(full)) else {
                    continue;
                };
                past_end |= range.is_past(key);
                let size_bytes =
                    object.size().and_then(|size| u64::try_from(size).ok()).unwrap_or(0);
                let modified =
                    object.last_modified().and_then(|time| u64::try_from(time.secs()).ok());
                found.push((ObjectInfo { key: key.to_owned(), size_bytes }, modified));
            }
            match output.next_continuation_token() {
                Some(next)
                    if output.is_truncated() == Some(true) && !next.is_empty() && !past_end =>
                {
                    token = Some(next.to_owned());
                }
                _ => break,
            }
        }
        // Filtered here, not trusted to the server: a store that ignores `StartAfter` still
        // lists the range exactly.
        found.retain(|(info, _)| range.contains(&info.key));
        found.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        found.dedup_by(|a, b| a.0.key == b.0.key);
        Ok(found)
    }

    async fn multipart_list_async(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        const OP: &str = "ListMultipartUploads";
        let full_prefix = format!("{}{prefix}", self.key_base);
        let mut uploads = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_id_marker: Option<String> = None;
        loop {
            let output = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await
                .map_err(|error| self.map_error(OP, prefix, Missing::IsFailure, &error))?;
            for upload in output.uploads() {
                let (Some(full), Some(id)) = (upload.key(), upload.upload_id()) else { continue };
                let Some(key) = self.relative_key(full) else { continue };
                let initiated_unix =
                    upload.initiated().and_then(|time| u64::try_from(time.secs()).ok());
                uploads.push(PendingUpload {
                    key: key.to_owned(),
                    upload_id: UploadId(id.to_owned()),
                    initiated_unix,
                });
            }
            if output.is_truncated() != Some(true) {
                break;
            }
            let next_key = output.next_key_marker().filter(|marker| !marker.is_empty());
            let next_id = output.next_upload_id_marker().filter(|marker| !marker.is_empty());
            if next_key.is_none() && next_id.is_none() {
                break;
            }
            key_marker = next_key.map(str::to_owned);
            upload_id_marker = next_id.map(str::to_owned);
        }
        uploads.sort_by(|a, b| (&a.key, &a.upload_id.0).cmp(&(&b.key, &b.upload_id.0)));
        uploads.dedup();
        Ok(uploads)
    }
}

impl ObjectStore for S3Store {
    fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        const OP: &str = "PutObject";
        let full = self.full_key(OP, key)?;
        self.run(OP, key, async {
            let _ = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .checksum_crc32_c(crc32c_base64(&data))
                .body(ByteStream::from(data))
                .customize()
                // Unsigned payload: SigV4 would otherwise hash every body with SHA-256 on both
                // sides (about 1 CPU-second per GiB each). Ferry objects carry their own checksums
                // and are verified on restore, so the payload hash adds cost, not safety.
                .disable_payload_signing()
                .send()
                .await
                .map_err(|error| self.map_error(OP, key, Missing::IsFailure, &error))?;
            Ok(())
        })
    }

    fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        const OP: &str = "GetObject";
        let full = self.full_key(OP, key)?;
        self.run(OP, key, async {
            let output = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|error| self.map_error(OP, key, Missing::IsNotFound, &error))?;
            let expected = output.content_length().and_then(|size| u64::try_from(size).ok());
            let data = self.collect_body(OP, key, output.body, expected).await?;
            match expected {
                Some(expected) if expected != data.len() as u64 => Err(StoreError::ShortRead {
                    key: key.to_owned(),
                    offset: 0,
                    wanted: expected,
                    got: data.len() as u64,
                }),
                _ => Ok(data),
            }
        })
    }

    fn get_range(&self, key: &str, offset: u64, length: u64) -> Result<Bytes, StoreError> {
        self.run("GetObject", key, self.get_range_async(key, offset, length))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.list_range(prefix, KeyRange::ALL)
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<DatedObject>, StoreError> {
        self.list_dated_range(prefix, KeyRange::ALL)
    }

    fn list_range(&self, prefix: &str, range: KeyRange<'_>) -> Result<Vec<ObjectInfo>, StoreError> {
        let listed = self.run("ListObjectsV2", prefix, self.list_async(prefix, range))?;
        Ok(listed.into_iter().map(|(info, _)| info).collect())
    }

    fn list_dated_range(
        &self,
        prefix: &str,
        range: KeyRange<'_>,
    ) -> Result<Vec<DatedObject>, StoreError> {
        const OP: &str = "ListObjectsV2";
        let listed = self.run(OP, prefix, self.list_async(prefix, range))?;
        listed
            .into_iter()
            .map(|(info, modified)| match modified {
                Some(modified_unix) => {
                    Ok(DatedObject { key: info.key, size_bytes: info.size_bytes, modified_unix })
                }
                // An age cannot be guessed: a missing time must not make an object look old.
                None => Err(StoreError::Failed {
                    operation: OP,
                    key: info.key,
                    detail: "the listing gives no LastModified".into(),
                    transient: false,
                }),
            })
            .collect()
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        const OP: &str = "DeleteObject";
        let full = self.full_key(OP, key)?;
        self.run(OP, key, async {
            match self.client.delete_object().bucket(&self.bucket).key(&full).send().await {
                Ok(_) => Ok(()),
                // S3 answers 204 for a missing key; some servers answer 404.
                Err(SdkError::ServiceError(context))
                    if context.raw().status().as_u16() == 404
                        && context.err().code() != Some("NoSuchBucket") =>
                {
                    Ok(())
                }
                Err(error) => Err(self.map_error(OP, key, Missing::IsFailure, &error)),
            }
        })
    }

    fn multipart_begin(&self, key: &str) -> Result<UploadId, StoreError> {
        const OP: &str = "CreateMultipartUpload";
        let full = self.full_key(OP, key)?;
        self.run(OP, key, async {
            let output = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                .send()
                .await
                .map_err(|error| self.map_error(OP, key, Missing::IsFailure, &error))?;
            match output.upload_id() {
                Some(id) if !id.is_empty() => Ok(UploadId(id.to_owned())),
                _ => Err(StoreError::Failed {
                    operation: OP,
                    key: key.to_owned(),
                    detail: "server returned no upload id".to_owned(),
                    transient: false,
                }),
            }
        })
    }

    fn multipart_put_part(
        &self,
        key: &str,
        upload_id: &UploadId,
        part_number: u32,
        data: Bytes,
    ) -> Result<PartReceipt, StoreError> {
        const OP: &str = "UploadPart";
        let full = self.full_key(OP, key)?;
        let number = part_number_i32(OP, key, part_number)?;
        let checksum = crc32c_base64(&data);
        self.run(OP, key, async {
            let output = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id.0)
                .part_number(number)
                .checksum_crc32_c(&checksum)
                .body(ByteStream::from(data))
                .customize()
                // See `put`: ferry verifies its own data, the SigV4 payload hash is pure cost.
                .disable_payload_signing()
                .send()
                .await
                .map_err(|error| self.map_error(OP, key, Missing::IsFailure, &error))?;
            match output.e_tag() {
                Some(etag) if !etag.is_empty() => Ok(PartReceipt {
                    part_number,
                    etag: etag.to_owned(),
                    checksum_crc32c: Some(checksum.clone()),
                }),
                _ => Err(StoreError::Failed {
                    operation: OP,
                    key: key.to_owned(),
                    detail: format!("server returned no etag for part {part_number}"),
                    transient: false,
                }),
            }
        })
    }

    fn multipart_complete(
        &self,
        key: &str,
        upload_id: &UploadId,
        parts: &[PartReceipt],
    ) -> Result<(), StoreError> {
        const OP: &str = "CompleteMultipartUpload";
        let full = self.full_key(OP, key)?;
        let mut completed = Vec::with_capacity(parts.len());
        for part in parts {
            // Create declared CRC32C, so each part's checksum goes back with its ETag.
            completed.push(
                CompletedPart::builder()
                    .part_number(part_number_i32(OP, key, part.part_number)?)
                    .e_tag(&part.etag)
                    .set_checksum_crc32_c(part.checksum_crc32c.clone())
                    .build(),
            );
        }
        let upload = CompletedMultipartUpload::builder().set_parts(Some(completed)).build();
        self.run(OP, key, async {
            let _ = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id.0)
                .multipart_upload(upload)
                .send()
                .await
                .map_err(|error| self.map_error(OP, key, Missing::IsFailure, &error))?;
            Ok(())
        })
    }

    fn multipart_abort(&self, key: &str, upload_id: &UploadId) -> Result<(), StoreError> {
        const OP: &str = "AbortMultipartUpload";
        let full = self.full_key(OP, key)?;
        self.run(OP, key, async {
            let result = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id.0)
                .send()
                .await;
            match result {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(context))
                    if context.err().code() == Some("NoSuchUpload")
                        || (context.raw().status().as_u16() == 404
                            && context.err().code() != Some("NoSuchBucket")) =>
                {
                    Ok(())
                }
                Err(error) => Err(self.map_error(OP, key, Missing::IsFailure, &error)),
            }
        })
    }

    fn multipart_list(&self, prefix: &str) -> Result<Vec<PendingUpload>, StoreError> {
        self.run("ListMultipartUploads", prefix, self.multipart_list_async(prefix))
    }

    fn describe(&self) -> String {
        let base = self.key_base.trim_end_matches('/');
        let location = if base.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{base}", self.bucket)
        };
        format!("{location} at {}", self.endpoint)
    }
}

fn part_number_i32(
    operation: &'static str,
    key: &str,
    part_number: u32,
) -> Result<i32, StoreError> {
    if part_number == 0 || part_number > MAX_PART_NUMBER {
        return Err(StoreError::Failed {
            operation,
            key: key.to_owned(),
            detail: format!("part number {part_number} outside 1..={MAX_PART_NUMBER}"),
            transient: false,
        });
    }
    i32::try_from(part_number).map_err(|_| StoreError::Failed {
        operation,
        key: key.to_owned(),
        detail: format!("part number {part_number} out of range"),
        transient: false,
    })
}

/// Checks the options and returns the normalised prefix (no leading or trailing `/`).
fn validate_options(options: &S3Options) -> Result<String, StoreError> {
    let config = |message: String| Err(StoreError::Config(message));
    if options.bucket.is_empty() {
        return config("s3 bucket name is empty".to_owned());
    }
    if options.bucket.contains('/') {
        return config(format!("s3 bucket name {:?} contains '/'", options.bucket));
    }
    if options.region.is_empty() {
        return config("s3 region is empty".to_owned());
    }
    if options.access_key_id.is_empty() || options.secret_access_key.is_empty() {
        return config(
            "s3 credentials are missing (access key id or secret access key)".to_owned(),
        );
    }
    if options.max_attempts == 0 {
        return config("s3 max_attempts must be at least 1".to_owned());
    }
    if options.connect_timeout.is_zero() || options.operation_timeout.is_zero() {
        return config("s3 timeouts must be greater than zero".to_owned());
    }
    if let Some(url) = &options.endpoint_url {
        let lower = url.to_ascii_lowercase();
        let rest = lower.strip_prefix("http://").or_else(|| lower.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !host.starts_with('/') => {}
            _ => {
                return config(format!(
                    "s3 endpoint url {url:?} must be http://host[:port] or https://host[:port]"
                ));
            }
        }
        if url.contains('@') {
            return config("s3 endpoint url must not contain credentials".to_owned());
        }
    }
    let prefix = options.prefix.trim_matches('/');
    if !prefix.is_empty() && prefix.split('/').any(str::is_empty) {
        return config(format!("s3 prefix {:?} has an empty path segment", options.prefix));
    }
    Ok(prefix.to_owned())
}

/// Builds the HTTP client: rustls (ring) with the system roots plus `ca_bundle`. The pool opens
/// one connection per request in flight (hyper sets no upper bound on open connections) and keeps
/// up to `POOL_MAX_IDLE_PER_HOST` of them idle for reuse.
fn build_http_client(
    options: &S3Options,
) -> Result<aws_sdk_s3::config::SharedHttpClient, StoreError> {
    let trust_store = if options.uses_tls() {
        if !options.verify_tls {
            // DANGER: accepts any certificate, as the operator asked (verify_tls = false).
            // aws-smithy-http-client has no hook for a custom verifier (aws-sdk-rust#1175), so
            // this is a hand-built hyper client (src/store/insecure_tls.rs).
            return Ok(aws_sdk_s3::config::SharedHttpClient::new(
                super::insecure_tls::InsecureHttpClient::new(
                    POOL_IDLE_TIMEOUT,
                    POOL_MAX_IDLE_PER_HOST,
                ),
            ));
        }
        let mut store = TrustStore::default();
        if let Some(path) = &options.ca_bundle {
            store = store.with_pem_certificate(read_ca_bundle(path)?);
        }
        store
    } else {
        // Plain http: no certificate is ever checked, so do not load the system roots.
        TrustStore::empty()
    };
    let context = TlsContext::builder()
        .with_trust_store(trust_store)
        .build()
        .map_err(|error| StoreError::Config(format!("invalid tls settings: {error}")))?;
    Ok(aws_smithy_http_client::Builder::new()
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(context)
        .build_https())
}

/// Reads a PEM CA bundle and checks that it holds at least one usable certificate (the HTTP
/// client panics on invalid PEM later, so it must be validated here).
fn read_ca_bundle(path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = std::fs::read(path).map_err(|error| {
        StoreError::Config(format!("cannot read ca bundle {}: {error}", path.display()))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| {
            StoreError::Config(format!("invalid pem in ca bundle {}: {error}", path.display()))
        })?;
        roots.add(cert).map_err(|error| {
            StoreError::Config(format!("unusable certificate in {}: {error}", path.display()))
        })?;
    }
    if roots.is_empty() {
        return Err(StoreError::Config(format!(
            "ca bundle {} holds no certificate",
            path.display()
        )));
    }
    Ok(pem)
}

/// The CRC32C of a request body, base64 as S3's `x-amz-checksum-crc32c` wants it: the server
/// checks every PUT and part against it (hardware CRC, ~20 GB/s; unlike Content-MD5, which would
/// cost about 1.5 CPU-seconds per GiB).
fn crc32c_base64(data: &[u8]) -> String {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32;
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    /// Options for the Garage (or other S3) test server from the environment written by
    /// `scripts/garage.sh start`, with a fresh prefix per test.
    fn test_options(test: &str) -> Option<S3Options> {
        let Ok(endpoint) = std::env::var("FERRY_TEST_S3_ENDPOINT") else {
            println!("skipped: FERRY_TEST_S3_ENDPOINT not set");
            return None;
        };
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let mut options = S3Options::new(
            var("FERRY_TEST_S3_BUCKET"),
            format!("ferry-tests/{}-{nanos}/{test}", std::process::id()),
            std::env::var("FERRY_TEST_S3_REGION").unwrap_or_else(|_| "garage".to_owned()),
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
        );
        options.endpoint_url = Some(endpoint);
        options.operation_timeout = Duration::from_secs(30);
        Some(options)
    }

    /// A store through the retrying wrapper every job uses, for the tests that send many
    /// requests at once: under the test command's load Garage can answer one of them with a
    /// transient 503 ("database is locked"), which is not what those tests are about.
    fn retrying(options: S3Options) -> crate::store::retry::Retrying<S3Store> {
        let policy = crate::store::retry::RetryPolicy::default();
        crate::store::retry::Retrying::new(S3Store::new(options).unwrap(), policy)
    }

    fn pattern(len: usize, seed: u8) -> Bytes {
        Bytes::from(
            (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn debug_redacts_the_secret() {
        let options = S3Options::new("b", "p", "garage", "GKabc", "very-secret-value");
        let text = format!("{options:?}");
        assert!(!text.contains("very-secret-value"), "{text}");
        assert!(text.contains("<redacted>"));
        let mut options = options;
        options.endpoint_url = Some("http://127.0.0.1:1".to_owned());
        let store = S3Store::new(options).unwrap();
        let text = format!("{store:?}");
        assert!(!text.contains("very-secret-value"), "{text}");
        assert_eq!(store.describe(), "s3://b/p at http://127.0.0.1:1");
    }

    #[test]
    fn options_are_validated() {
        let base = || {
            let mut options = S3Options::new("b", "/a/b/", "garage", "ak", "sk");
            options.endpoint_url = Some("http://127.0.0.1:1".to_owned());
            options
        };
        let store = S3Store::new(base()).unwrap();
        assert_eq!(store.describe(), "s3://b/a/b at http://127.0.0.1:1");
        assert_eq!(store.full_key("x", "k/1").unwrap(), "a/b/k/1");
        assert!(store.full_key("x", "").is_err());

        let mut no_prefix = base();
        no_prefix.prefix = String::new();
        let store = S3Store::new(no_prefix).unwrap();
        assert_eq!(store.describe(), "s3://b at http://127.0.0.1:1");
        assert_eq!(store.full_key("x", "k").unwrap(), "k");

        type Change = Box<dyn Fn(&mut S3Options)>;
        let cases: Vec<Change> = vec![
            Box::new(|o| o.bucket.clear()),
            Box::new(|o| o.region.clear()),
            Box::new(|o| o.secret_access_key.clear()),
            Box::new(|o| o.max_attempts = 0),
            Box::new(|o| o.prefix = "a//b".to_owned()),
            Box::new(|o| o.endpoint_url = Some("127.0.0.1:39000".to_owned())),
            Box::new(|o| o.endpoint_url = Some("http://".to_owned())),
            Box::new(|o| o.endpoint_url = Some("https://u:p@host".to_owned())),
            Box::new(|o| {
                o.endpoint_url = Some("https://s3.example.com".to_owned());
                o.ca_bundle = Some(PathBuf::from("/nonexistent/ca.pem"));
            }),
            Box::new(|o| {
                o.endpoint_url = Some("https://s3.example.com".to_owned());
                o.ca_bundle = Some(PathBuf::from(file!()));
            }),
        ];
        for (index, change) in cases.iter().enumerate() {
            let mut options = base();
            change(&mut options);
            let result = S3Store::new(options);
            assert!(matches!(result, Err(StoreError::Config(_))), "case {index}: {result:?}");
        }
        // verify_tls = false is irrelevant over plain http.
        let mut plain = base();
        plain.verify_tls = false;
        assert!(S3Store::new(plain).is_ok());
        // https with the system roots builds.
        let mut https = base();
        https.endpoint_url = Some("https://s3.example.com".to_owned());
        assert!(S3Store::new(https).is_ok());
    }

    #[test]
    fn nothing_listening_is_unreachable_quickly() {
        let mut options = S3Options::new("b", "p", "garage", "ak", "sk");
        options.endpoint_url = Some("http://127.0.0.1:1".to_owned());
        options.connect_timeout = Duration::from_secs(1);
        options.operation_timeout = Duration::from_secs(5);
        options.max_attempts = 2;
        let store = S3Store::new(options).unwrap();
        let started = Instant::now();
        let error = store.put("k", Bytes::from_static(b"x")).unwrap_err();
        println!("{error} (after {:?})", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
        match &error {
            StoreError::Unreachable { endpoint, operation, key, detail } => {
                assert_eq!(endpoint, "http://127.0.0.1:1");
                assert_eq!(*operation, "PutObject");
                assert_eq!(key, "k");
                assert!(detail.to_lowercase().contains("refused"), "{detail}");
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert_eq!(crate::error::Classify::status(&error), crate::error::Status::Transient);
        assert!(matches!(store.get("k"), Err(StoreError::Unreachable { .. })));
        assert!(matches!(store.list(""), Err(StoreError::Unreachable { .. })));
    }

    #[test]
    fn silent_server_times_out_as_unreachable() {
        // Accepts TCP connections (the kernel completes the handshake) but never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut options = S3Options::new("b", "p", "garage", "ak", "sk");
        options.endpoint_url = Some(format!("http://{}", listener.local_addr().unwrap()));
        options.operation_timeout = Duration::from_millis(500);
        options.max_attempts = 2;
        let store = S3Store::new(options).unwrap();
        let started = Instant::now();
        let error = store.get("k").unwrap_err();
        println!("{error} (after {:?})", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        assert!(matches!(error, StoreError::Unreachable { operation: "GetObject", .. }), "{error}");
        drop(listener);
    }

    #[test]
    fn called_inside_a_runtime_fails_instead_of_panicking() {
        let mut options = S3Options::new("b", "p", "garage", "ak", "sk");
        options.endpoint_url = Some("http://127.0.0.1:1".to_owned());
        let store = S3Store::new(options).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let result = runtime.block_on(async { store.get("k") });
        assert!(matches!(result, Err(StoreError::Failed { transient: false, .. })), "{result:?}");
        drop(runtime);
    }

    #[test]
    fn garage_objects() {
        let Some(options) = test_options("objects") else { return };
        let store = S3Store::new(options).unwrap();
        let data = pattern(100_000, 7);
        store.put("a/obj", data.clone()).unwrap();
        assert_eq!(store.get("a/obj").unwrap(), data);
        assert_eq!(store.get_range("a/obj", 1000, 500).unwrap(), data.slice(1000..1500));
        assert_eq!(store.get_range("a/obj", 99_999, 1).unwrap(), data.slice(99_999..));
        assert_eq!(store.get_range("a/obj", 5, 0).unwrap().len(), 0);
        match store.get_range("a/obj", 99_990, 20) {
            Err(StoreError::ShortRead { wanted: 20, got: 10, .. }) => {}
            other => panic!("expected short read, got {other:?}"),
        }
        match store.get_range("a/obj", 200_000, 20) {
            Err(StoreError::ShortRead { got: 0, .. }) => {}
            other => panic!("expected short read, got {other:?}"),
        }
        assert!(matches!(store.get("missing"), Err(StoreError::NotFound { .. })));
        assert!(matches!(store.get_range("missing", 0, 10), Err(StoreError::NotFound { .. })));
        assert!(matches!(store.get_range("missing", 0, 0), Err(StoreError::NotFound { .. })));

        // Replace, empty object.
        store.put("a/obj", Bytes::from_static(b"v2")).unwrap();
        assert_eq!(store.get("a/obj").unwrap(), Bytes::from_static(b"v2"));
        store.put("empty", Bytes::new()).unwrap();
        assert_eq!(store.get("empty").unwrap().len(), 0);

        // Listing with pagination (more than 1000 keys would be slow; Garage pages at 1000, so
        // use enough keys to be meaningful and check order and relativity).
        for i in 0..25 {
            store.put(&format!("l/{i:03}"), Bytes::from(vec![0_u8; i])).unwrap();
        }
        let listed = store.list("l/").unwrap();
        assert_eq!(listed.len(), 25);
        assert_eq!(listed[0], ObjectInfo { key: "l/000".into(), size_bytes: 0 });
        assert_eq!(listed[24], ObjectInfo { key: "l/024".into(), size_bytes: 24 });
        let all: Vec<String> = store.list("").unwrap().into_iter().map(|info| info.key).collect();
        assert_eq!(all.len(), 27);
        assert_eq!(&all[..2], ["a/obj", "empty"]);
        assert!(store.list("zzz").unwrap().is_empty());

        // Delete, twice.
        store.delete("a/obj").unwrap();
        store.delete("a/obj").unwrap();
        assert!(matches!(store.get("a/obj"), Err(StoreError::NotFound { .. })));
        for info in store.list("").unwrap() {
            store.delete(&info.key).unwrap();
        }
        assert!(store.list("").unwrap().is_empty());
    }

    #[test]
    fn garage_list_paginates() {
        let Some(options) = test_options("paginate") else { return };
        let store = Arc::new(retrying(options));
        // Garage returns at most 1000 keys per page.
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in (t..1010).step_by(8) {
                        store.put(&format!("k/{i:05}"), Bytes::new()).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let listed = store.list("k/").unwrap();
        assert_eq!(listed.len(), 1010);
        assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
        for info in listed {
            store.delete(&info.key).unwrap();
        }
    }

    #[test]
    fn garage_multipart() {
        let Some(options) = test_options("multipart") else { return };
        let store = Arc::new(retrying(options));
        let upload = store.multipart_begin("packs/p1").unwrap();
        let other = store.multipart_begin("index/i1").unwrap();
        let pending = store.multipart_list("packs/").unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].key.as_str(), &pending[0].upload_id), ("packs/p1", &upload));
        assert!(pending[0].initiated_unix.is_some(), "Garage reports when an upload started");
        assert_eq!(store.multipart_list("").unwrap().len(), 2);

        // 16 parts of 1 MiB from 16 threads at once.
        let part_size = 1 << 20;
        let threads: Vec<_> = (1..=16_u32)
            .map(|number| {
                let store = Arc::clone(&store);
                let upload = upload.clone();
                std::thread::spawn(move || {
                    let data = pattern(part_size, number as u8);
                    store.multipart_put_part("packs/p1", &upload, number, data).unwrap()
                })
            })
            .collect();
        let mut receipts: Vec<PartReceipt> =
            threads.into_iter().map(|thread| thread.join().unwrap()).collect();
        receipts.sort_by_key(|receipt| receipt.part_number);
        // Re-uploading a part replaces it.
        receipts[0] =
            store.multipart_put_part("packs/p1", &upload, 1, pattern(part_size, 99)).unwrap();
        assert!(matches!(store.get("packs/p1"), Err(StoreError::NotFound { .. })));
        store.multipart_complete("packs/p1", &upload, &receipts).unwrap();

        let object = store.get("packs/p1").unwrap();
        assert_eq!(object.len(), 16 * part_size);
        assert_eq!(object.slice(..part_size), pattern(part_size, 99));
        assert_eq!(object.slice(15 * part_size..), pattern(part_size, 16));
        let range = store.get_range("packs/p1", (part_size - 10) as u64, 20).unwrap();
        assert_eq!(range, object.slice(part_size - 10..part_size + 10));
        assert_eq!(store.multipart_list("packs/").unwrap(), []);

        // Abort, twice; parts of an aborted upload are refused.
        store.multipart_abort("index/i1", &other).unwrap();
        store.multipart_abort("index/i1", &other).unwrap();
        assert!(store.multipart_put_part("index/i1", &other, 1, Bytes::new()).is_err());
        store.multipart_abort("index/i1", &UploadId("no-such-upload".into())).unwrap();
        assert!(store.multipart_list("").unwrap().is_empty());
        assert!(store.multipart_put_part("k", &other, 0, Bytes::new()).is_err());
        store.delete("packs/p1").unwrap();
    }

    /// Needs an https endpoint in front of the test server whose certificate is signed by the CA
    /// in `FERRY_TEST_S3_CA_BUNDLE` (not in the system roots).
    #[test]
    fn garage_over_tls_with_ca_bundle() {
        let Some(mut options) = test_options("tls") else { return };
        let (Ok(endpoint), Ok(ca)) =
            (std::env::var("FERRY_TEST_S3_TLS_ENDPOINT"), std::env::var("FERRY_TEST_S3_CA_BUNDLE"))
        else {
            assert!(
                std::env::var("FERRY_TEST_REQUIRE_S3").is_err(),
                "FERRY_TEST_REQUIRE_S3 is set but the TLS endpoint is not (scripts/test.sh sets it)"
            );
            println!("skipped: FERRY_TEST_S3_TLS_ENDPOINT or FERRY_TEST_S3_CA_BUNDLE not set");
            return;
        };
        options.endpoint_url = Some(endpoint);
        options.max_attempts = 1;
        // Without the CA the certificate is refused.
        let untrusted = S3Store::new(options.clone()).unwrap();
        let error = untrusted.put("k", Bytes::from_static(b"x")).unwrap_err();
        println!("{error}");
        assert!(matches!(error, StoreError::Unreachable { .. }), "{error}");
        // verify_tls = false accepts the untrusted certificate (like backup_s3_verify_ssl = False).
        let mut insecure = options.clone();
        insecure.verify_tls = false;
        let store = S3Store::new(insecure).unwrap();
        store.put("insecure", pattern(70_000, 4)).unwrap();
        assert_eq!(store.get("insecure").unwrap(), pattern(70_000, 4));
        assert_eq!(
            store.get_range("insecure", 1000, 10).unwrap(),
            pattern(70_000, 4).slice(1000..1010)
        );
        store.delete("insecure").unwrap();
        options.ca_bundle = Some(PathBuf::from(ca));
        let store = S3Store::new(options).unwrap();
        store.put("k", pattern(70_000, 3)).unwrap();
        assert_eq!(store.get("k").unwrap(), pattern(70_000, 3));
        store.delete("k").unwrap();
    }

    #[test]
    fn garage_wrong_secret_is_access_denied() {
        let Some(mut options) = test_options("denied") else { return };
        options.secret_access_key = "definitely-not-the-secret-key".to_owned();
        let store = S3Store::new(options).unwrap();
        let error = store.put("k", Bytes::from_static(b"x")).unwrap_err();
        println!("{error}");
        match &error {
            StoreError::AccessDenied { operation: "PutObject", detail, .. } => {
                assert!(!detail.contains("definitely-not-the-secret-key"));
            }
            other => panic!("expected access denied, got {other:?}"),
        }
        assert!(matches!(store.get("k"), Err(StoreError::AccessDenied { .. })));
        assert!(matches!(store.list(""), Err(StoreError::AccessDenied { .. })));
    }

    #[test]
    fn garage_missing_bucket_is_permanent_failure() {
        let Some(mut options) = test_options("nobucket") else { return };
        options.bucket = "ferry-no-such-bucket".to_owned();
        let store = S3Store::new(options).unwrap();
        let result = store.put("k", Bytes::from_static(b"x"));
        if let Err(error) = &result {
            println!("{error}");
        }
        match result {
            Err(StoreError::Failed { transient: false, detail, .. }) => {
                assert!(detail.contains("ferry-no-such-bucket"), "{detail}");
            }
            // Garage may refuse a key access to an unknown bucket instead.
            Err(StoreError::AccessDenied { .. }) => {}
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }
}
