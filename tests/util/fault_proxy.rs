//! A fault-injecting HTTP/1.1 proxy for tests against a real S3 server (Garage).
//!
//! [`FaultProxy`] listens on `127.0.0.1:0` and relays HTTP/1.1 traffic to an upstream
//! server. It parses every request head and the body boundaries (Content-Length or
//! chunked, on both directions), so faults are chosen per *request*, not per connection.
//! Decisions come from a deterministic PRNG keyed by the seed and the request's index
//! (in arrival order at this proxy), so sequential request streams replay exactly when
//! rerun with the same `FERRY_FAULT_SEED`.
//!
//! Standard library only. Without `SO_LINGER` (unstable in std) a "reset" is an abrupt
//! close: the kernel sends an RST when unread data is left in the receive queue (the
//! usual case mid-request-body), a FIN otherwise — either way the client sees a
//! truncated message.
//!
//! Limits: no pipelining, no upgrades (101 closes), no TLS. A keep-alive upstream
//! connection is checked before reuse and a bodyless request is retried once on a
//! fresh connection if the reused one fails; a request body is streamed, never
//! buffered, so it is not replayed. When the upstream answers before taking the whole
//! body (e.g. an auth error) the answer is relayed and the client connection closed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Largest request or response head accepted, in bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Upper bound of the cut point when a body's length is not known in advance (chunked).
const UNKNOWN_LEN_CUT: u64 = 1024 * 1024;
/// How long to wait for an upstream `100 Continue` (or early answer) before going on.
const EXPECT_WAIT: Duration = Duration::from_secs(1);

/// One kind of fault the proxy can inject into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Forward the head and part of the request body upstream, then close both sockets
    /// abruptly. A request without a body is cut before anything reaches upstream.
    ResetMidRequestBody,
    /// Forward the whole request, relay the response head and part of its body, then
    /// close both sockets abruptly (upstream did execute the request).
    ResetMidResponseBody,
    /// Do not forward; answer `503 Slow Down` with an S3 `SlowDown` XML error.
    SlowDown503,
    /// Forward nothing, hold the connection silently for `duration`, then close it.
    Stall {
        /// How long to hold the connection before closing it.
        duration: Duration,
    },
    /// Do not forward; answer `500 Internal Server Error` with an S3 `InternalError`.
    InternalError500,
}

/// What to inject and how often. Build with [`FaultConfig::new`] or
/// [`FaultConfig::from_env_or`] and the `with_*` methods; print it on test failure.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Seed of the decision PRNG.
    pub seed: u64,
    /// Probability in `[0, 1]` that an eligible request gets a fault.
    pub rate: f64,
    /// Kinds to choose from (uniformly); empty means no faults.
    pub kinds: Vec<FaultKind>,
    /// If non-empty, only requests with one of these methods are eligible.
    pub methods: Vec<String>,
    /// If non-empty, only requests whose target (path and query) contains one of these.
    pub path_contains: Vec<String>,
    /// Stop injecting after this many faults.
    pub max_faults: Option<u64>,
}

impl FaultConfig {
    /// Rate 0.05, kinds: both resets, `SlowDown503` and `InternalError500` (add a
    /// [`FaultKind::Stall`] with a test-specific duration via [`FaultConfig::with_kinds`]).
    pub fn new(seed: u64) -> Self {
        FaultConfig {
            seed,
            rate: 0.05,
            kinds: vec![
                FaultKind::ResetMidRequestBody,
                FaultKind::ResetMidResponseBody,
                FaultKind::SlowDown503,
                FaultKind::InternalError500,
            ],
            methods: Vec::new(),
            path_contains: Vec::new(),
            max_faults: None,
        }
    }

    /// Like [`FaultConfig::new`], with the seed from `FERRY_FAULT_SEED` (decimal or
    /// `0x` hex) if set and valid, else `seed_default`.
    pub fn from_env_or(seed_default: u64) -> Self {
        let seed = std::env::var("FERRY_FAULT_SEED")
            .ok()
            .and_then(|s| parse_seed(s.trim()))
            .unwrap_or(seed_default);
        Self::new(seed)
    }

    /// Sets the fault probability.
    pub fn with_rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    /// Sets the kinds to choose from.
    pub fn with_kinds(mut self, kinds: impl IntoIterator<Item = FaultKind>) -> Self {
        self.kinds = kinds.into_iter().collect();
        self
    }

    /// Restricts faults to requests with one of these methods (e.g. `["PUT"]`).
    pub fn only_methods<S: Into<String>>(mut self, methods: impl IntoIterator<Item = S>) -> Self {
        self.methods = methods.into_iter().map(Into::into).collect();
        self
    }

    /// Restricts faults to requests whose target contains one of these strings.
    pub fn only_paths_containing<S: Into<String>>(
        mut self,
        parts: impl IntoIterator<Item = S>,
    ) -> Self {
        self.path_contains = parts.into_iter().map(Into::into).collect();
        self
    }

    /// Caps the number of injected faults.
    pub fn with_max_faults(mut self, max: u64) -> Self {
        self.max_faults = Some(max);
        self
    }
}

impl fmt::Display for FaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FERRY_FAULT_SEED={} rate={} kinds={:?}", self.seed, self.rate, self.kinds)?;
        if !self.methods.is_empty() {
            write!(f, " methods={:?}", self.methods)?;
        }
        if !self.path_contains.is_empty() {
            write!(f, " paths~{:?}", self.path_contains)?;
        }
        if let Some(max) = self.max_faults {
            write!(f, " max_faults={max}")?;
        }
        Ok(())
    }
}

fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Client connections accepted.
    pub connections: u64,
    /// Request heads received from clients.
    pub requests: u64,
    /// Faults injected, all kinds.
    pub faults: u64,
    /// [`FaultKind::ResetMidRequestBody`] injected.
    pub reset_mid_request_body: u64,
    /// [`FaultKind::ResetMidResponseBody`] injected.
    pub reset_mid_response_body: u64,
    /// [`FaultKind::SlowDown503`] injected.
    pub slow_down_503: u64,
    /// [`FaultKind::Stall`] injected.
    pub stall: u64,
    /// [`FaultKind::InternalError500`] injected.
    pub internal_error_500: u64,
    /// Request-body payload bytes forwarded upstream (chunk framing excluded).
    pub request_body_bytes: u64,
}

/// One injected fault, for failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault {
    /// Index of the request at this proxy (0-based, arrival order).
    pub index: u64,
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// The fault.
    pub kind: FaultKind,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    faults: AtomicU64,
    per_kind: [AtomicU64; 5],
    request_body_bytes: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    config: FaultConfig,
    upstream: SocketAddr,
    rate_bits: AtomicU64,
    paused: AtomicBool,
    stop: AtomicBool,
    next_index: AtomicU64,
    next_socket: AtomicU64,
    counters: Counters,
    sockets: Mutex<HashMap<u64, TcpStream>>,
    log: Mutex<Vec<InjectedFault>>,
}

/// The running proxy. Dropping it stops the listener and closes all its connections.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` relaying to `upstream` with `config`.
    pub fn start(upstream: SocketAddr, config: FaultConfig) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            rate_bits: AtomicU64::new(config.rate.to_bits()),
            config,
            upstream,
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_index: AtomicU64::new(0),
            next_socket: AtomicU64::new(0),
            counters: Counters::default(),
            sockets: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("fault-proxy-accept".into())
            .spawn(move || accept_loop(&listener, &sh))?;
        Ok(FaultProxy { addr, shared, listener: Some(handle) })
    }

    /// The address clients should connect to (use as the S3 endpoint).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, handy as an S3 endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The configuration (its `Display` names the seed to rerun with).
    pub fn config(&self) -> &FaultConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        FaultStats {
            connections: get(&c.connections),
            requests: get(&c.requests),
            faults: get(&c.faults),
            reset_mid_request_body: get(&c.per_kind[0]),
            reset_mid_response_body: get(&c.per_kind[1]),
            slow_down_503: get(&c.per_kind[2]),
            stall: get(&c.per_kind[3]),
            internal_error_500: get(&c.per_kind[4]),
            request_body_bytes: get(&c.request_body_bytes),
        }
    }

    /// Request-body bytes forwarded upstream so far (updated as they flow; kill trigger).
    pub fn upload_bytes(&self) -> u64 {
        self.shared.counters.request_body_bytes.load(Ordering::SeqCst)
    }

    /// Polls until [`FaultProxy::upload_bytes`] reaches `threshold`; false on timeout.
    pub fn wait_upload_bytes(&self, threshold: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.upload_bytes() < threshold {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The faults injected so far, in decision order.
    pub fn injected(&self) -> Vec<InjectedFault> {
        lock(&self.shared.log).clone()
    }

    /// Changes the fault probability at runtime (also resumes if paused).
    pub fn set_rate(&self, rate: f64) {
        self.shared.rate_bits.store(rate.to_bits(), Ordering::SeqCst);
        self.shared.paused.store(false, Ordering::SeqCst);
    }

    /// Turns faults off until [`FaultProxy::resume`] or [`FaultProxy::set_rate`].
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
    }

    /// Turns faults back on at the current rate.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; failure only means the listener is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(handle) = self.listener.take() {
            let _ = handle.join();
        }
        for (_, s) in lock(&self.shared.sockets).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let _ = shared.counters.connections.fetch_add(1, Ordering::SeqCst);
        let sh = Arc::clone(shared);
        let spawned = thread::Builder::new().name("fault-proxy-conn".into()).spawn(move || {
            // Errors end the connection; that is all a proxy can do with them.
            let _ = serve(client, &sh);
        });
        if spawned.is_err() {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A socket registered with the proxy so that dropping the proxy can shut it down.
struct Tracked {
    stream: TcpStream,
    id: u64,
    shared: Arc<Shared>,
}

impl Tracked {
    fn new(stream: TcpStream, shared: &Arc<Shared>) -> io::Result<Tracked> {
        let id = shared.next_socket.fetch_add(1, Ordering::SeqCst);
        let clone = stream.try_clone()?;
        let mut sockets = lock(&shared.sockets);
        if shared.stop.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
        } else {
            let _ = sockets.insert(id, clone);
        }
        Ok(Tracked { stream, id, shared: Arc::clone(shared) })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let _ = lock(&self.shared.sockets).remove(&self.id);
    }
}

struct Upstream {
    reader: BufReader<TcpStream>,
    writer: Tracked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    raw: Vec<u8>,
    start: [String; 3],
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
    fn wants_close(&self, version: &str) -> bool {
        self.has_token("connection", "close")
            || (version.eq_ignore_ascii_case("HTTP/1.0")
                && !self.has_token("connection", "keep-alive"))
    }
    fn body(&self, no_body: bool) -> io::Result<Body> {
        if no_body {
            Ok(Body::Length(0))
        } else if self.has_token("transfer-encoding", "chunked") {
            Ok(Body::Chunked)
        } else if let Some(v) = self.header("content-length") {
            v.trim().parse().map(Body::Length).map_err(|_| bad("bad content-length"))
        } else {
            Ok(Body::UntilClose)
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one message head; `None` on a clean EOF before its first byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = r.by_ref().take((MAX_HEAD + 1 - before) as u64).read_until(b'\n', &mut raw)?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if raw.len() > MAX_HEAD {
            return Err(bad("head too large"));
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                raw.clear(); // tolerate stray CRLF between messages
                continue;
            }
            break;
        }
    }
    let text = std::str::from_utf8(&raw).map_err(|_| bad("non-UTF-8 head"))?;
    let mut lines = text.lines();
    let mut parts = lines.next().unwrap_or_default().splitn(3, ' ').map(str::to_string);
    let mut next = || parts.next().unwrap_or_default();
    let start = [next(), next(), next()];
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head { raw, start, headers }))
}

/// Copies exactly `n` bytes from `r` to `w`, adding each written byte to `counter`.
fn copy_n(
    r: &mut impl BufRead,
    w: &mut impl Write,
    mut n: u64,
    counter: Option<&AtomicU64>,
) -> io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        w.write_all(&buf[..take])?;
        r.consume(take);
        n -= take as u64;
        if let Some(c) = counter {
            let _ = c.fetch_add(take as u64, Ordering::SeqCst);
        }
    }
    Ok(())
}

fn copy_line(r: &mut impl BufRead, w: &mut impl Write) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let _ = r.by_ref().take(MAX_HEAD as u64).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\n") {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    w.write_all(&line)?;
    Ok(line)
}

/// Relays a body. With `cut = Some(c)` at most `c` payload bytes are relayed and the
/// body is never completed (the end of a chunked body is withheld).
fn relay_body(
    r: &mut impl BufRead,
    w: &mut impl Write,
    body: Body,
    cut: Option<u64>,
    counter: Option<&AtomicU64>,
) -> io::Result<()> {
    let mut left = cut.unwrap_or(u64::MAX);
    match body {
        Body::Length(n) => {
            copy_n(r, w, if cut.is_some() { left.min(n.saturating_sub(1)) } else { n }, counter)
        }
        Body::UntilClose => {
            let mut r = r.take(left);
            let copied = io::copy(&mut r, w)?;
            if let Some(c) = counter {
                let _ = c.fetch_add(copied, Ordering::SeqCst);
            }
            Ok(())
        }
        Body::Chunked => loop {
            let mut line = Vec::new();
            let _ = r.by_ref().take(4096).read_until(b'\n', &mut line)?;
            let text = std::str::from_utf8(&line).map_err(|_| bad("bad chunk size"))?;
            let hex = text.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                if cut.is_some() {
                    return Ok(());
                }
                w.write_all(&line)?;
                while copy_line(r, w)?.trim_ascii() != b"" {}
                return Ok(());
            }
            w.write_all(&line)?;
            let take = size.min(left);
            copy_n(r, w, take, counter)?;
            left -= take;
            if take < size || (cut.is_some() && left == 0) {
                return Ok(());
            }
            let _ = copy_line(r, w)?;
        },
    }
}

fn mix(seed: u64, index: u64, stream: u64) -> u64 {
    let mut z = seed
        ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

fn kind_slot(kind: FaultKind) -> usize {
    match kind {
        FaultKind::ResetMidRequestBody => 0,
        FaultKind::ResetMidResponseBody => 1,
        FaultKind::SlowDown503 => 2,
        FaultKind::Stall { .. } => 3,
        FaultKind::InternalError500 => 4,
    }
}

impl Shared {
    /// Decides the fault of request `index`; returns it with a random word for cut points.
    fn decide(&self, index: u64, method: &str, target: &str) -> Option<(FaultKind, u64)> {
        let cfg = &self.config;
        if self.paused.load(Ordering::SeqCst)
            || cfg.kinds.is_empty()
            || (!cfg.methods.is_empty()
                && !cfg.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            || (!cfg.path_contains.is_empty()
                && !cfg.path_contains.iter().any(|p| target.contains(p.as_str())))
        {
            return None;
        }
        let unit = (mix(cfg.seed, index, 1) >> 11) as f64 / (1u64 << 53) as f64;
        if unit >= f64::from_bits(self.rate_bits.load(Ordering::SeqCst)) {
            return None;
        }
        let faults = &self.counters.faults;
        let max = cfg.max_faults.unwrap_or(u64::MAX);
        let _ = faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| (f < max).then_some(f + 1))
            .ok()?;
        let pick = mix(cfg.seed, index, 2) % cfg.kinds.len() as u64;
        let kind = cfg.kinds[usize::try_from(pick).unwrap_or(0)];
        let _ = self.counters.per_kind[kind_slot(kind)].fetch_add(1, Ordering::SeqCst);
        lock(&self.log).push(InjectedFault {
            index,
            method: method.into(),
            target: target.into(),
            kind,
        });
        Some((kind, mix(cfg.seed, index, 3)))
    }

    fn connect_upstream(self: &Arc<Self>) -> io::Result<Upstream> {
        let s = TcpStream::connect_timeout(&self.upstream, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        Ok(Upstream {
            reader: BufReader::with_capacity(64 * 1024, s.try_clone()?),
            writer: Tracked::new(s, self)?,
        })
    }

    /// Sleeps `d` or until the proxy stops.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    }
}

/// Picks a cut point strictly inside a body of `body` bytes (`random % UNKNOWN_LEN_CUT`
/// when the length is unknown).
fn cut_point(body: Body, random: u64) -> u64 {
    match body {
        Body::Length(0) => 0,
        Body::Length(n) => random % n,
        Body::Chunked | Body::UntilClose => random % UNKNOWN_LEN_CUT,
    }
}

fn s3_error(kind: FaultKind, target: &str, index: u64, head_only: bool, close: bool) -> Vec<u8> {
    let (status, code, message) = match kind {
        FaultKind::SlowDown503 => ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
        _ => (
            "500 Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let resource = target.split('?').next().unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message>\
         <Resource>{resource}</Resource><RequestId>ferry-fault-{index}</RequestId></Error>"
    );
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         x-amz-request-id: ferry-fault-{index}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

impl Upstream {
    /// False if the peer closed (or sent unsolicited bytes on) this idle connection.
    fn alive(&self) -> bool {
        let s = &self.writer.stream;
        if !self.reader.buffer().is_empty() || s.set_nonblocking(true).is_err() {
            return false;
        }
        let idle = matches!(s.peek(&mut [0]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).is_ok() && idle
    }
}

/// Waits up to `t` for `r` to have bytes (or EOF) to read, without consuming any.
fn wait_readable(r: &BufReader<TcpStream>, t: Duration) -> bool {
    let s = r.get_ref();
    if !r.buffer().is_empty() {
        return true;
    }
    let ready = s.set_read_timeout(Some(t)).is_ok() && s.peek(&mut [0]).is_ok();
    s.set_read_timeout(None).is_ok() && ready
}

fn connect_or_502(shared: &Arc<Shared>, client: &mut Tracked) -> io::Result<Upstream> {
    shared.connect_upstream().inspect_err(|_| {
        let msg = "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = client.stream.write_all(msg.as_bytes());
    })
}

/// Writes the request head; for a bodyless request also reads the response head
/// (so a stale keep-alive connection is detected while the request can still be retried).
fn send_head(
    up: &mut Upstream,
    raw: &[u8],
    body: Body,
    client: &mut Tracked,
    expect: bool,
) -> io::Result<Option<Head>> {
    up.writer.stream.write_all(raw)?;
    if body != Body::Length(0) {
        return Ok(None);
    }
    read_response(&mut up.reader, client, expect).map(Some)
}

/// Reads the final response head, relaying interim 1xx heads unless we sent our own 100.
fn read_response(r: &mut impl BufRead, client: &mut Tracked, expect: bool) -> io::Result<Head> {
    loop {
        let resp = read_head(r)?.ok_or(io::ErrorKind::UnexpectedEof)?;
        let status: u16 = resp.start[1].parse().map_err(|_| bad("bad status"))?;
        if !(100..200).contains(&status) || status == 101 {
            return Ok(resp);
        }
        if !expect {
            client.stream.write_all(&resp.raw)?;
        }
    }
}

/// What `serve` does after `answer_fault`.
enum Next {
    /// Forward the request upstream.
    Forward,
    /// The request was answered: read the next one.
    Request,
    /// Close the client connection.
    Close,
}

/// Applies a fault that is answered without forwarding: a 503 or 500 (draining the body, or
/// closing when it was never sent because of `Expect`), a stall, or a reset of a bodyless
/// request.
fn answer_fault(
    fault: Option<(FaultKind, u64)>,
    req: &Head,
    req_body: Body,
    index: u64,
    close: &mut bool,
    client_r: &mut BufReader<TcpStream>,
    client_w: &mut Tracked,
) -> io::Result<Next> {
    let [method, target, _] = &req.start;
    let expect = req.has_token("expect", "100-continue") && req_body != Body::Length(0);
    match fault {
        Some((kind @ (FaultKind::SlowDown503 | FaultKind::InternalError500), _)) => {
            // With Expect the body was never sent: answer and close instead of draining.
            if expect {
                *close = true;
            } else {
                relay_body(client_r, &mut io::sink(), req_body, None, None)?;
            }
            let is_head = method.eq_ignore_ascii_case("HEAD");
            let resp = s3_error(kind, target, index, is_head, *close);
            client_w.stream.write_all(&resp)?;
            Ok(if *close { Next::Close } else { Next::Request })
        }
        Some((FaultKind::Stall { duration }, _)) => {
            client_w.shared.sleep(duration);
            Ok(Next::Close)
        }
        Some((FaultKind::ResetMidRequestBody, _)) if req_body == Body::Length(0) => Ok(Next::Close),
        _ => Ok(Next::Forward),
    }
}

/// Sends the request head upstream, on the previous connection if it still looks open (retried
/// once on a fresh one if that fails before any body byte was taken from the client), and
/// handles `Expect: 100-continue`. Returns the connection and the upstream's early final
/// answer, if any.
fn forward_head(
    shared: &Arc<Shared>,
    upstream: Option<Upstream>,
    req: &Head,
    req_body: Body,
    client_w: &mut Tracked,
    expect: bool,
) -> io::Result<(Upstream, Option<Head>)> {
    let mut reused = upstream.as_ref().is_some_and(Upstream::alive);
    let mut up = match upstream.filter(|_| reused) {
        Some(up) => up,
        None => connect_or_502(shared, client_w)?,
    };
    let mut early = loop {
        match send_head(&mut up, &req.raw, req_body, client_w, expect) {
            Ok(early) => break early,
            Err(_) if reused => {
                reused = false;
                up = connect_or_502(shared, client_w)?;
            }
            Err(e) => return Err(e),
        }
    };
    if expect {
        // Wait briefly for the upstream's 100 (or its early final answer), else
        // answer 100 ourselves; later 1xx heads are skipped by `read_response`.
        match wait_readable(&up.reader, EXPECT_WAIT).then(|| read_head(&mut up.reader)) {
            Some(head) => {
                let head = head?.ok_or(io::ErrorKind::UnexpectedEof)?;
                if head.start[1].starts_with('1') {
                    client_w.stream.write_all(&head.raw)?;
                } else {
                    early = Some(head);
                }
            }
            None => client_w.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?,
        }
    }
    Ok((up, early))
}

fn serve(client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut client_r = BufReader::with_capacity(64 * 1024, client.try_clone()?);
    let mut client_w = Tracked::new(client, shared)?;
    let mut upstream: Option<Upstream> = None;
    let counter = &shared.counters.request_body_bytes;
    loop {
        let Some(req) = read_head(&mut client_r)? else { return Ok(()) };
        let [method, target, version] = req.start.clone();
        let index = shared.next_index.fetch_add(1, Ordering::SeqCst);
        let _ = shared.counters.requests.fetch_add(1, Ordering::SeqCst);
        let is_head = method.eq_ignore_ascii_case("HEAD");
        let req_body = match req.body(false)? {
            Body::UntilClose => Body::Length(0), // requests without framing have no body
            b => b,
        };
        let expect = req.has_token("expect", "100-continue") && req_body != Body::Length(0);
        let mut close = req.wants_close(&version);
        let fault = shared.decide(index, &method, &target);

        match answer_fault(fault, &req, req_body, index, &mut close, &mut client_r, &mut client_w)?
        {
            Next::Forward => {}
            Next::Request => continue,
            Next::Close => return Ok(()),
        }
        let (up, early) =
            forward_head(shared, upstream.take(), &req, req_body, &mut client_w, expect)?;
        let Upstream { mut reader, mut writer } = up;
        // A final answer before the whole request body was taken: relay it, then close.
        let mut linger = early.is_some() && req_body != Body::Length(0);
        let resp = match early {
            Some(resp) => resp,
            None => {
                let ws = &mut writer.stream;
                if let Some((FaultKind::ResetMidRequestBody, random)) = fault {
                    let cut = Some(cut_point(req_body, random));
                    return relay_body(&mut client_r, ws, req_body, cut, Some(counter));
                }
                if let Err(e) = relay_body(&mut client_r, ws, req_body, None, Some(counter)) {
                    // Upstream may have rejected the request early (e.g. auth) and closed.
                    if !wait_readable(&reader, EXPECT_WAIT) {
                        return Err(e);
                    }
                    linger = true;
                }
                read_response(&mut reader, &mut client_w, expect)?
            }
        };
        close |= linger;
        let status: u16 = resp.start[1].parse().unwrap_or(0);
        let no_body = is_head || status == 204 || status == 304 || (100..200).contains(&status);
        let resp_body = resp.body(no_body)?;
        close |= resp.wants_close(&resp.start[0]) || resp_body == Body::UntilClose || status == 101;
        let cut = match fault {
            Some((FaultKind::ResetMidResponseBody, _)) if resp_body == Body::Length(0) => {
                return Ok(());
            }
            Some((FaultKind::ResetMidResponseBody, random)) => Some(cut_point(resp_body, random)),
            _ => None,
        };
        client_w.stream.write_all(&resp.raw)?;
        relay_body(&mut reader, &mut client_w.stream, resp_body, cut, None)?;
        if cut.is_some() {
            return Ok(());
        }
        if linger {
            // Let the client read the answer before unread body bytes turn close into RST.
            client_w.stream.shutdown(Shutdown::Write)?;
            client_w.stream.set_read_timeout(Some(EXPECT_WAIT))?;
            let _ = io::copy(&mut (&mut client_r).take(64 << 20), &mut io::sink());
        }
        if close {
            return Ok(());
        }
        upstream = Some(Upstream { reader, writer });
    }
}
