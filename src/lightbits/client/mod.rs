//! Blocking client of the Lightbits REST API v2 (reference B.1–B.5).
//!
//! Every request goes to one of several API addresses: a transport error or a 5xx moves on to the
//! next address, and a full round of failures backs off and starts again, bounded by an attempt
//! count and the operation deadline. Creates are idempotent (look up by name first; 409 → read
//! back), deletes treat 404 as success, ACL updates carry `If-Match` and re-read on 412.
//!
//! This module does not decide *what* to create; `flow` does. The token is never logged, never in
//! `Debug` output and never in an error message.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::model::{
    ChangedBlocksPage, ClusterInfo, CreateSnapshot, CreateVolume, Endpoint, LbaRange, NodeList,
    Snapshot, SnapshotState, UpdateAcl, Volume, VolumeState,
};
use super::{LightbitsError, Result};

/// Where the API token (JWT) comes from. Never from the command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TokenSource {
    /// No token: a cluster with multi-tenancy disabled (reference B.1).
    #[default]
    None,
    /// A file holding the token (surrounding whitespace is ignored).
    File(PathBuf),
    /// An environment variable holding the token.
    Env(String),
}

/// A secret string whose `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl TokenSource {
    /// Reads the token.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Token`] if the file or variable is missing, unreadable or empty; the
    /// message names the source, never the content.
    pub fn read(&self) -> Result<Option<Secret>> {
        let (origin, text) = match self {
            TokenSource::None => return Ok(None),
            TokenSource::File(path) => {
                let origin = format!("file {}", path.display());
                match std::fs::read_to_string(path) {
                    Ok(text) => (origin, text),
                    Err(error) => {
                        return Err(LightbitsError::Token { origin, message: error.to_string() });
                    }
                }
            }
            TokenSource::Env(name) => {
                let origin = format!("env {name}");
                match std::env::var(name) {
                    Ok(text) => (origin, text),
                    Err(error) => {
                        return Err(LightbitsError::Token { origin, message: error.to_string() });
                    }
                }
            }
        };
        let token = text.trim();
        if token.is_empty() {
            return Err(LightbitsError::Token { origin, message: "empty".to_owned() });
        }
        Ok(Some(Secret(token.to_owned())))
    }
}

/// URL scheme. The reference's driver always uses HTTPS; plain HTTP exists for the simulator and
/// tests only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// `https://` (default).
    #[default]
    Https,
    /// `http://` (simulator and tests).
    Http,
}

/// Client settings: plain data.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// API addresses: `host`, `host:port`, `[v6]:port` or a bare IPv6 (port 443 when absent).
    pub addresses: Vec<String>,
    /// LightOS project (`default` unless configured).
    pub project: String,
    /// Where the token comes from.
    pub token: TokenSource,
    /// HTTPS (default) or HTTP.
    pub scheme: Scheme,
    /// Verify the server certificate (default true; Cinder's default is false).
    pub verify_tls: bool,
    /// PEM file of CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Timeout of one HTTP request (Cinder: `lightos_api_service_timeout`, 30 s).
    pub request_timeout: Duration,
    /// Deadline of one API operation across retries and failover.
    pub operation_timeout: Duration,
    /// Deadline of one wait for a state (Cinder: `logical_op_timeout`, 100 s).
    pub wait_timeout: Duration,
    /// Polling interval of the waits (reference: 1 s).
    pub poll_interval: Duration,
    /// Rounds over all addresses before giving up on 5xx / transport errors.
    pub attempts_max: u32,
    /// First backoff between rounds; doubled each round up to `retry_delay_max`.
    pub retry_delay_initial: Duration,
    /// Longest backoff between rounds.
    pub retry_delay_max: Duration,
    /// Re-reads after `412 Precondition Failed` on an `If-Match` update.
    pub etag_retries_max: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            addresses: Vec::new(),
            project: "default".to_owned(),
            token: TokenSource::None,
            scheme: Scheme::Https,
            verify_tls: true,
            ca_file: None,
            request_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(100),
            wait_timeout: Duration::from_secs(100),
            poll_interval: Duration::from_secs(1),
            attempts_max: 5,
            retry_delay_initial: Duration::from_millis(250),
            retry_delay_max: Duration::from_secs(4),
            etag_retries_max: 10,
        }
    }
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Deletion {
    /// The resource existed and the cluster accepted the delete.
    Deleted,
    /// The resource was already gone (404).
    AlreadyGone,
}

/// One HTTP answer.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
    etag: Option<String>,
}

/// The outcome of one polling step.
enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// The REST client. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    bases: Arc<Vec<String>>,
    /// The token in use, shared by every clone of this client (cleanup's included), replaced by
    /// a fresh read of the token source when the cluster answers 401.
    token: Arc<Mutex<Option<Secret>>>,
    options: Arc<ClientOptions>,
    preferred: Arc<AtomicUsize>,
    cancel: Option<Arc<AtomicBool>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("bases", &self.bases)
            .field("project", &self.options.project)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// `host[:port]` → `scheme://host:port` (IPv6 bracketed).
fn base_url(scheme: Scheme, address: &str) -> Result<String> {
    let scheme_text = match scheme {
        Scheme::Https => "https",
        Scheme::Http => "http",
    };
    let address = address.trim();
    let host_port = if address.starts_with('[') {
        if address.ends_with(']') { format!("{address}:443") } else { address.to_owned() }
    } else if address.matches(':').count() > 1 {
        format!("[{address}]:443")
    } else if address.contains(':') {
        address.to_owned()
    } else {
        format!("{address}:443")
    };
    if address.is_empty() || address.contains('/') {
        return Err(LightbitsError::Config { message: format!("bad api address {address:?}") });
    }
    Ok(format!("{scheme_text}://{host_port}"))
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode_query(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn tls_config(options: &ClientOptions) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
    let roots: Vec<Certificate<'static>> = if !options.verify_tls {
        Vec::new()
    } else if let Some(ca_file) = &options.ca_file {
        let pem = std::fs::read(ca_file).map_err(|error| LightbitsError::Config {
            message: format!("ca file {}: {error}", ca_file.display()),
        })?;
        let mut certificates = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(certificate)) => certificates.push(certificate),
                Ok(_) => {}
                Err(error) => {
                    return Err(LightbitsError::Config {
                        message: format!("ca file {}: {error}", ca_file.display()),
                    });
                }
            }
        }
        if certificates.is_empty() {
            return Err(LightbitsError::Config {
                message: format!("ca file {}: no certificate", ca_file.display()),
            });
        }
        certificates
    } else {
        let native = rustls_native_certs::load_native_certs();
        native.certs.iter().map(|der| Certificate::from_der(der.as_ref()).to_owned()).collect()
    };
    Ok(TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .disable_verification(!options.verify_tls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

impl Client {
    /// Builds a client: reads the token, the CA file, and prepares the connection pool.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Config`] for no or malformed addresses, an empty project or a bad CA
    /// file; [`LightbitsError::Token`] when the token cannot be read.
    pub fn new(options: ClientOptions) -> Result<Client> {
        if options.addresses.is_empty() {
            return Err(LightbitsError::Config { message: "no api address".to_owned() });
        }
        if options.project.is_empty() || options.project.contains(['/', '?', '#']) {
            return Err(LightbitsError::Config {
                message: format!("bad project name {:?}", options.project),
            });
        }
        let bases = options
            .addresses
            .iter()
            .map(|address| base_url(options.scheme, address))
            .collect::<Result<Vec<_>>>()?;
        let token = options.token.read()?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(options.request_timeout))
            .max_redirects(0)
            .tls_config(tls_config(&options)?)
            .build();
        Ok(Client {
            agent: ureq::Agent::new_with_config(config),
            bases: Arc::new(bases),
            token: Arc::new(Mutex::new(token)),
            options: Arc::new(options),
            preferred: Arc::new(AtomicUsize::new(0)),
            cancel: None,
        })
    }

    /// This client, with waits and backoffs that stop with [`LightbitsError::Cancelled`] once
    /// `cancel` is set (ferry's SIGINT/SIGTERM flag).
    #[must_use]
    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Client {
        self.cancel = Some(cancel);
        self
    }

    /// This client without a cancel flag: cleanup must run to the end after a cancel.
    #[must_use]
    pub fn uncancellable(&self) -> Client {
        Client { cancel: None, ..self.clone() }
    }

    /// The settings this client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    fn check_cancel(&self, operation: &str) -> Result<()> {
        match &self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => {
                Err(LightbitsError::Cancelled { operation: operation.to_owned() })
            }
            _ => Ok(()),
        }
    }

    /// Sleeps `delay` (cut short at `deadline`), in slices so that a cancel is seen within 100 ms.
    fn pause(&self, delay: Duration, deadline: Instant, operation: &str) -> Result<()> {
        let until = (Instant::now() + delay).min(deadline);
        loop {
            self.check_cancel(operation)?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
        }
    }

    fn send_once(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        if_match: Option<&str>,
    ) -> std::result::Result<Reply, ureq::Error> {
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("Accept", "application/json");
        if let Some(token) = &*self.token.lock().expect("token lock is never poisoned") {
            builder = builder.header("Authorization", format!("Bearer {}", token.0));
        }
        if let Some(etag) = if_match {
            builder = builder.header("If-Match", etag);
        }
        let response = match body {
            Some(body) => {
                let request = builder
                    .header("Content-Type", "application/json")
                    .body(body.as_bytes().to_vec())
                    .map_err(ureq::Error::from)?;
                self.agent.run(request)?
            }
            None => self.agent.run(builder.body(()).map_err(ureq::Error::from)?)?,
        };
        let status = response.status().as_u16();
        let etag = response
            .headers()
            .get("etag")
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim_matches('"').to_owned());
        let body = response.into_body().read_to_string()?;
        Ok(Reply { status, body, etag })
    }

    /// Re-reads the token source and reports whether it now holds a different token than the
    /// one in use (a rotated token). An unreadable source keeps the token in use.
    fn refresh_token(&self) -> bool {
        let Ok(fresh) = self.options.token.read() else { return false };
        let mut current = self.token.lock().expect("token lock is never poisoned");
        if *current == fresh {
            return false;
        }
        *current = fresh;
        true
    }

    /// Sends one request (see [`Client::request_with_failover`]); a 401 re-reads the token
    /// source and, when it holds a new token (rotated since it was read), sends it once more.
    fn request(
        &self,
        operation: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        if_match: Option<&str>,
    ) -> Result<Reply> {
        let reply = self.request_with_failover(operation, method, path, body, if_match)?;
        if reply.status == 401 && self.refresh_token() {
            return self.request_with_failover(operation, method, path, body, if_match);
        }
        Ok(reply)
    }

    /// Sends one request with failover and bounded, backed-off retries on transport errors and
    /// 5xx. Any other answer (including 4xx) is returned to the caller.
    fn request_with_failover(
        &self,
        operation: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        if_match: Option<&str>,
    ) -> Result<Reply> {
        let deadline = Instant::now() + self.options.operation_timeout;
        let mut delay = self.options.retry_delay_initial;
        let mut last_error = None;
        let count = self.bases.len();
        for attempt in 0..self.options.attempts_max.max(1) {
            if attempt > 0 {
                if Instant::now() >= deadline {
                    break;
                }
                self.pause(delay, deadline, operation)?;
                delay = (delay * 2).min(self.options.retry_delay_max);
            }
            let start = self.preferred.load(Ordering::Relaxed);
            for step in 0..count {
                self.check_cancel(operation)?;
                let index = (start + step) % count;
                let base = &self.bases[index];
                match self.send_once(base, method, path, body, if_match) {
                    // 501 Not Implemented is an answer, not a fault: retrying cannot change it.
                    Ok(reply) if reply.status >= 500 && reply.status != 501 => {
                        last_error = Some(http_error(operation, &reply));
                    }
                    Ok(reply) => {
                        self.preferred.store(index, Ordering::Relaxed);
                        return Ok(reply);
                    }
                    Err(error) => {
                        last_error = Some(LightbitsError::Unreachable {
                            operation: operation.to_owned(),
                            addresses: self.bases.join(", "),
                            last_error: format!("{base}: {error}"),
                        });
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| LightbitsError::Unreachable {
            operation: operation.to_owned(),
            addresses: self.bases.join(", "),
            last_error: "operation deadline passed before the first attempt".to_owned(),
        }))
    }

    fn project_path(&self, rest: &str) -> String {
        format!("/api/v2/projects/{}/{rest}", self.options.project)
    }

    /// GET returning `None` on 404.
    fn get_json<T: DeserializeOwned>(
        &self,
        operation: &str,
        path: &str,
    ) -> Result<Option<(T, Reply)>> {
        let reply = self.request(operation, "GET", path, None, None)?;
        match reply.status {
            200 => Ok(Some((parse(operation, &reply.body)?, reply))),
            404 => Ok(None),
            _ => Err(status_error(operation, &reply)),
        }
    }

    /// `GET /api/v2/clusterinfo`: the cluster UUID and its subsystem NQN.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn cluster_info(&self) -> Result<ClusterInfo> {
        let operation = "get cluster info";
        match self.get_json(operation, "/api/v2/clusterinfo")? {
            Some((info, _)) => Ok(info),
            None => Err(LightbitsError::Http {
                operation: operation.to_owned(),
                status: 404,
                body: String::new(),
            }),
        }
    }

    /// `GET /api/v2/nodes`, as the NVMe/TCP endpoints of the nodes (unparsable ones skipped).
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors, or no node with an endpoint.
    pub fn nvme_endpoints(&self) -> Result<Vec<Endpoint>> {
        let operation = "list nodes";
        let nodes: NodeList = match self.get_json(operation, "/api/v2/nodes")? {
            Some((nodes, _)) => nodes,
            None => NodeList { nodes: Vec::new() },
        };
        let endpoints: Vec<Endpoint> =
            nodes.nodes.iter().filter_map(|node| Endpoint::parse(&node.nvme_endpoint)).collect();
        if endpoints.is_empty() {
            return Err(LightbitsError::Protocol {
                operation: operation.to_owned(),
                message: "no node has an nvmeEndpoint".to_owned(),
            });
        }
        Ok(endpoints)
    }

    /// `GET .../volumes/{uuid}`; `None` if it does not exist. The ETag falls back to the
    /// response header when the body has none.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn get_volume(&self, uuid: &str) -> Result<Option<Volume>> {
        let path = self.project_path(&format!("volumes/{}", encode_query(uuid)));
        Ok(self.get_json::<Volume>("get volume", &path)?.map(|(mut volume, reply)| {
            if volume.etag.is_empty() {
                volume.etag = reply.etag.unwrap_or_default();
            }
            volume
        }))
    }

    /// `GET .../volumes/?name={name}`; `None` if no volume has that name. Accepts both answer
    /// shapes of the reference: one volume object, or `{"volumes": [...]}`.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn find_volume(&self, name: &str) -> Result<Option<Volume>> {
        let operation = "find volume by name";
        let path = self.project_path(&format!("volumes/?name={}", encode_query(name)));
        let Some((value, _)) = self.get_json::<serde_json::Value>(operation, &path)? else {
            return Ok(None);
        };
        pick_by_name(operation, value, "volumes", name)
    }

    /// A volume by UUID or, failing that, by name.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::VolumeNotFound`] when neither finds it.
    pub fn resolve_volume(&self, name_or_uuid: &str) -> Result<Volume> {
        if looks_like_uuid(name_or_uuid)
            && let Some(volume) = self.get_volume(name_or_uuid)?
        {
            return Ok(volume);
        }
        self.find_volume(name_or_uuid)?.ok_or_else(|| LightbitsError::VolumeNotFound {
            volume: name_or_uuid.to_owned(),
            project: self.options.project.clone(),
        })
    }

    /// Creates a volume, idempotently: a volume that already has this name is returned as is,
    /// and a 409 is answered by reading the volume back by name.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors; [`LightbitsError::Conflict`] if a 409 cannot be
    /// resolved.
    pub fn create_volume(&self, request: &CreateVolume) -> Result<Volume> {
        let operation = "create volume";
        if let Some(volume) = self.find_volume(&request.name)? {
            return Ok(volume);
        }
        let body = to_json(request);
        let reply =
            self.request(operation, "POST", &self.project_path("volumes"), Some(&body), None)?;
        match reply.status {
            200..=202 => match serde_json::from_str::<Volume>(&reply.body) {
                Ok(volume) => Ok(volume),
                Err(_) => {
                    self.find_volume(&request.name)?.ok_or_else(|| LightbitsError::Protocol {
                        operation: operation.to_owned(),
                        message: "created volume not found by name".to_owned(),
                    })
                }
            },
            409 => self.find_volume(&request.name)?.ok_or_else(|| LightbitsError::Conflict {
                operation: operation.to_owned(),
                name: request.name.clone(),
            }),
            _ => Err(status_error(operation, &reply)),
        }
    }

    /// Updates a volume's ACLs with `If-Match: <ETag>`: reads the volume, asks `edit` for the new
    /// ACLs, and writes them; a 412 (someone else changed it) re-reads and asks again. Returns
    /// without writing when `edit` asks for what is already there.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::VolumeNotFound`]; transport, authentication and HTTP errors; HTTP 412
    /// after `etag_retries_max` re-reads.
    pub fn update_volume_acl(&self, uuid: &str, edit: impl Fn(&Volume) -> UpdateAcl) -> Result<()> {
        let operation = "update volume acl";
        let path = self.project_path(&format!("volumes/{}", encode_query(uuid)));
        let mut last_reply = None;
        for _ in 0..=self.options.etag_retries_max {
            let volume = self.get_volume(uuid)?.ok_or_else(|| LightbitsError::VolumeNotFound {
                volume: uuid.to_owned(),
                project: self.options.project.clone(),
            })?;
            let update = edit(&volume);
            let ip_acl_same = update.ip_acl.is_none() || update.ip_acl == volume.ip_acl;
            if update.acl == volume.acl && ip_acl_same {
                return Ok(());
            }
            let body = to_json(&update);
            let etag = (!volume.etag.is_empty()).then_some(volume.etag.as_str());
            let reply = self.request(operation, "PUT", &path, Some(&body), etag)?;
            match reply.status {
                200..=204 => return Ok(()),
                412 => last_reply = Some(reply),
                404 => {
                    return Err(LightbitsError::VolumeNotFound {
                        volume: uuid.to_owned(),
                        project: self.options.project.clone(),
                    });
                }
                _ => return Err(status_error(operation, &reply)),
            }
        }
        Err(last_reply.map_or_else(
            || LightbitsError::Protocol {
                operation: operation.to_owned(),
                message: "no attempt".into(),
            },
            |reply| status_error(operation, &reply),
        ))
    }

    /// Deletes a volume; 404 is [`Deletion::AlreadyGone`]. Does not wait.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn delete_volume(&self, uuid: &str) -> Result<Deletion> {
        let path = self.project_path(&format!("volumes/{}", encode_query(uuid)));
        self.delete("delete volume", &path)
    }

    fn delete(&self, operation: &str, path: &str) -> Result<Deletion> {
        let reply = self.request(operation, "DELETE", path, None, None)?;
        match reply.status {
            200..=204 => Ok(Deletion::Deleted),
            404 => Ok(Deletion::AlreadyGone),
            _ => Err(status_error(operation, &reply)),
        }
    }

    /// `GET .../snapshots/{uuid}`; `None` if it does not exist.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn get_snapshot(&self, uuid: &str) -> Result<Option<Snapshot>> {
        let path = self.project_path(&format!("snapshots/{}", encode_query(uuid)));
        Ok(self.get_json::<Snapshot>("get snapshot", &path)?.map(|(snapshot, _)| snapshot))
    }

    /// `GET .../snapshots/?Name={name}` (capital `N`, as the driver sends it).
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn find_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        let operation = "find snapshot by name";
        let path = self.project_path(&format!("snapshots/?Name={}", encode_query(name)));
        let Some((value, _)) = self.get_json::<serde_json::Value>(operation, &path)? else {
            return Ok(None);
        };
        pick_by_name(operation, value, "snapshots", name)
    }

    /// Creates a snapshot of `volume`, idempotently (existing name reused, 409 read back).
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors; [`LightbitsError::Conflict`] if the name is
    /// taken by a snapshot of another volume.
    pub fn create_snapshot(&self, name: &str, volume: &Volume) -> Result<Snapshot> {
        let operation = "create snapshot";
        let conflict =
            || LightbitsError::Conflict { operation: operation.to_owned(), name: name.to_owned() };
        let ours = |snapshot: Snapshot| match &snapshot.source_volume_uuid {
            Some(source) if *source != volume.uuid => Err(conflict()),
            _ => Ok(snapshot),
        };
        if let Some(snapshot) = self.find_snapshot(name)? {
            return ours(snapshot);
        }
        let body = to_json(&CreateSnapshot {
            name: name.to_owned(),
            source_volume_uuid: None,
            source_volume_name: Some(volume.name.clone()),
        });
        let reply =
            self.request(operation, "POST", &self.project_path("snapshots"), Some(&body), None)?;
        match reply.status {
            200..=202 => match serde_json::from_str::<Snapshot>(&reply.body) {
                Ok(snapshot) => Ok(snapshot),
                Err(_) => self.find_snapshot(name)?.ok_or_else(conflict),
            },
            409 => ours(self.find_snapshot(name)?.ok_or_else(conflict)?),
            _ => Err(status_error(operation, &reply)),
        }
    }

    /// Deletes a snapshot; 404 is [`Deletion::AlreadyGone`]. Does not wait.
    ///
    /// # Errors
    ///
    /// Transport, authentication and HTTP errors.
    pub fn delete_snapshot(&self, uuid: &str) -> Result<Deletion> {
        let path = self.project_path(&format!("snapshots/{}", encode_query(uuid)));
        self.delete("delete snapshot", &path)
    }

    /// `GET .../snapshots/diff/{snapshot_uuid}?baseSnapshotUUID=..&offsetLBA=..` (reference
    /// B.8), every page: the LBA ranges of `snapshot_uuid` that differ from `base_uuid`, in the
    /// order the cluster gave them. Pages until `nextOffsetLBA` is 0; an offset that does not
    /// advance, or more than `pages_max` pages, is a protocol error (never an endless loop).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::DiffUnavailable`] for 404 and 501 (a cluster without the call, or a
    /// snapshot that is gone: the caller checks the snapshots first); HTTP 400 (identical
    /// snapshots, not on one chain, offset beyond the size) as [`LightbitsError::Http`];
    /// transport, authentication and parse errors.
    pub fn changed_blocks(
        &self,
        snapshot_uuid: &str,
        base_uuid: &str,
        pages_max: usize,
    ) -> Result<Vec<LbaRange>> {
        let operation = "list changed blocks";
        let mut ranges = Vec::new();
        let mut offset_lba = 0u64;
        for _ in 0..pages_max.max(1) {
            let path = self.project_path(&format!(
                "snapshots/diff/{}?baseSnapshotUUID={}&offsetLBA={offset_lba}",
                encode_query(snapshot_uuid),
                encode_query(base_uuid)
            ));
            let reply = self.request(operation, "GET", &path, None, None)?;
            let page: ChangedBlocksPage = match reply.status {
                200 => parse(operation, &reply.body)?,
                404 | 501 => {
                    return Err(LightbitsError::DiffUnavailable {
                        status: reply.status,
                        body: body_excerpt(&reply.body),
                    });
                }
                _ => return Err(status_error(operation, &reply)),
            };
            ranges.extend(page.lba_ranges);
            if page.next_offset_lba == 0 {
                return Ok(ranges);
            }
            if page.next_offset_lba <= offset_lba {
                return Err(LightbitsError::Protocol {
                    operation: operation.to_owned(),
                    message: format!(
                        "nextOffsetLBA {} does not advance past {offset_lba}",
                        page.next_offset_lba
                    ),
                });
            }
            offset_lba = page.next_offset_lba;
        }
        Err(LightbitsError::Protocol {
            operation: operation.to_owned(),
            message: format!("more than {pages_max} pages"),
        })
    }

    /// Polls every `poll_interval` until `step` is ready, a hard error, or `wait_timeout`.
    /// Transient errors (unreachable, 5xx) count as "not yet".
    fn poll<T>(&self, what: &str, mut step: impl FnMut() -> Result<Poll<T>>) -> Result<T> {
        let started = Instant::now();
        let deadline = started + self.options.wait_timeout;
        loop {
            let last_seen = match step() {
                Ok(Poll::Ready(value)) => return Ok(value),
                Ok(Poll::Pending(last_seen)) => last_seen,
                Err(error)
                    if crate::error::Classify::status(&error)
                        == crate::error::Status::Transient =>
                {
                    error.to_string()
                }
                Err(error) => return Err(error),
            };
            if Instant::now() >= deadline {
                return Err(LightbitsError::Timeout {
                    what: what.to_owned(),
                    waited: started.elapsed(),
                    last_seen,
                });
            }
            self.pause(self.options.poll_interval, deadline, what)?;
        }
    }

    /// Waits until the volume is Available (or Migrating). A 404 keeps waiting (reference B.3).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Failed`] when it settles in another state; [`LightbitsError::Timeout`].
    pub fn wait_volume_available(&self, uuid: &str) -> Result<Volume> {
        let what = format!("volume {uuid} to become Available");
        self.poll(&what, || match self.get_volume(uuid)? {
            None => Ok(Poll::Pending("404".to_owned())),
            Some(volume) if !volume.state.is_settled() => {
                Ok(Poll::Pending(format!("{:?}", volume.state)))
            }
            Some(volume) if volume.state.is_usable() => Ok(Poll::Ready(volume)),
            Some(volume) => Err(LightbitsError::Failed {
                what: format!("volume {} ({uuid})", volume.name),
                state: format!("{:?}", volume.state),
            }),
        })
    }

    /// Waits until the snapshot is Available.
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Failed`] when it settles in another state; [`LightbitsError::Timeout`].
    pub fn wait_snapshot_available(&self, uuid: &str) -> Result<Snapshot> {
        let what = format!("snapshot {uuid} to become Available");
        self.poll(&what, || match self.get_snapshot(uuid)? {
            None => Ok(Poll::Pending("404".to_owned())),
            Some(snapshot) if !snapshot.state.is_settled() => {
                Ok(Poll::Pending(format!("{:?}", snapshot.state)))
            }
            Some(snapshot) if snapshot.state == SnapshotState::Available => {
                Ok(Poll::Ready(snapshot))
            }
            Some(snapshot) => Err(LightbitsError::Failed {
                what: format!("snapshot {} ({uuid})", snapshot.name),
                state: format!("{:?}", snapshot.state),
            }),
        })
    }

    /// Waits until the volume is gone: 404 or `Deleted` (stricter than the driver, which also
    /// accepts `Deleting`, so that "nothing left behind" holds when ferry exits).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Failed`] on `Failed`; [`LightbitsError::Timeout`].
    pub fn wait_volume_gone(&self, uuid: &str) -> Result<()> {
        let what = format!("volume {uuid} to be deleted");
        self.poll(&what, || match self.get_volume(uuid)? {
            None => Ok(Poll::Ready(())),
            Some(volume) if volume.state == VolumeState::Deleted => Ok(Poll::Ready(())),
            Some(volume) if volume.state == VolumeState::Failed => Err(LightbitsError::Failed {
                what: format!("deleting volume {} ({uuid})", volume.name),
                state: "Failed".to_owned(),
            }),
            Some(volume) => Ok(Poll::Pending(format!("{:?}", volume.state))),
        })
    }

    /// Waits until the snapshot is gone (404 or `Deleted`).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::Failed`] on `Failed`; [`LightbitsError::Timeout`].
    pub fn wait_snapshot_gone(&self, uuid: &str) -> Result<()> {
        let what = format!("snapshot {uuid} to be deleted");
        self.poll(&what, || match self.get_snapshot(uuid)? {
            None => Ok(Poll::Ready(())),
            Some(snapshot) if snapshot.state == SnapshotState::Deleted => Ok(Poll::Ready(())),
            Some(snapshot) if snapshot.state == SnapshotState::Failed => {
                Err(LightbitsError::Failed {
                    what: format!("deleting snapshot {} ({uuid})", snapshot.name),
                    state: "Failed".to_owned(),
                })
            }
            Some(snapshot) => Ok(Poll::Pending(format!("{:?}", snapshot.state))),
        })
    }

    /// Waits until `host_nqn`'s membership in the volume's ACL is `present` and the volume is
    /// settled (the driver's "ACL settled" wait).
    ///
    /// # Errors
    ///
    /// [`LightbitsError::VolumeNotFound`]; [`LightbitsError::Timeout`].
    pub fn wait_volume_acl(&self, uuid: &str, host_nqn: &str, present: bool) -> Result<Volume> {
        let what =
            format!("acl of volume {uuid} to {} {host_nqn}", if present { "list" } else { "drop" });
        self.poll(&what, || match self.get_volume(uuid)? {
            None => Err(LightbitsError::VolumeNotFound {
                volume: uuid.to_owned(),
                project: self.options.project.clone(),
            }),
            Some(volume)
                if volume.acl.contains(host_nqn) == present && volume.state.is_settled() =>
            {
                Ok(Poll::Ready(volume))
            }
            Some(volume) => {
                Ok(Poll::Pending(format!("{:?} {:?}", volume.state, volume.acl.values)))
            }
        })
    }
}

/// True for the 8-4-4-4-12 hex form.
pub fn looks_like_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(group, length)| {
            group.len() == length && group.bytes().all(|byte| byte.is_ascii_hexdigit())
        })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("model types serialize without fail")
}

fn parse<T: DeserializeOwned>(operation: &str, body: &str) -> Result<T> {
    serde_json::from_str(body).map_err(|error| LightbitsError::Protocol {
        operation: operation.to_owned(),
        message: error.to_string(),
    })
}

/// Picks the entry named `name` from either one object or `{"<list_key>": [...]}`.
fn pick_by_name<T: DeserializeOwned>(
    operation: &str,
    value: serde_json::Value,
    list_key: &str,
    name: &str,
) -> Result<Option<T>> {
    let candidates = match value {
        serde_json::Value::Object(mut map) if map.contains_key(list_key) => {
            match map.remove(list_key) {
                Some(serde_json::Value::Array(items)) => items,
                _ => Vec::new(),
            }
        }
        other => vec![other],
    };
    for candidate in candidates {
        let candidate_name = candidate.get("name").and_then(|name| name.as_str()).unwrap_or(name);
        if candidate_name == name {
            return parse(operation, &candidate.to_string()).map(Some);
        }
    }
    Ok(None)
}

fn body_excerpt(body: &str) -> String {
    body.chars().take(200).collect()
}

fn http_error(operation: &str, reply: &Reply) -> LightbitsError {
    LightbitsError::Http {
        operation: operation.to_owned(),
        status: reply.status,
        body: body_excerpt(&reply.body),
    }
}

/// Maps a non-success status to its typed error.
fn status_error(operation: &str, reply: &Reply) -> LightbitsError {
    match reply.status {
        401 => LightbitsError::Unauthorized { operation: operation.to_owned() },
        403 => LightbitsError::Forbidden { operation: operation.to_owned() },
        _ => http_error(operation, reply),
    }
}

#[cfg(test)]
pub(crate) mod tests;
