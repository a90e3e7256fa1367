//! Client tests against a tiny in-process HTTP server with canned answers shaped like the
//! reference's.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::lightbits::model::{Acl, UpdateAcl};

/// One request the fake server saw.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

type Handler = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

/// A one-connection-at-a-time HTTP/1.1 server answering with `handler`; `Connection: close`.
pub(crate) struct FakeServer {
    pub(crate) address: String,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeServer {
    pub(crate) fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_thread = Arc::clone(&seen);
        let handler: Arc<Handler> = Arc::new(handler);
        let _thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or_default().to_owned();
                let target = parts.next().unwrap_or_default().to_owned();
                let mut headers = Vec::new();
                loop {
                    let mut header = String::new();
                    let _read = reader.read_line(&mut header).unwrap();
                    let header = header.trim_end();
                    if header.is_empty() {
                        break;
                    }
                    if let Some((key, value)) = header.split_once(':') {
                        headers.push((key.trim().to_owned(), value.trim().to_owned()));
                    }
                }
                let length: usize = headers
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, value)| value.parse().unwrap());
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request =
                    Seen { method, target, headers, body: String::from_utf8(body).unwrap() };
                let (status, body) = handler(&request);
                seen_thread.lock().unwrap().push(request);
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _written = stream.write_all(response.as_bytes());
            }
        });
        FakeServer { address, seen }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A port nothing listens on.
pub(crate) fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

pub(crate) const TOKEN: &str = "eyJhbGciOi.secret-token.sig";

pub(crate) fn options(addresses: Vec<String>) -> ClientOptions {
    ClientOptions {
        addresses,
        project: "proj".to_owned(),
        token: TokenSource::Env("LBCTL_TEST_TOKEN".to_owned()),
        scheme: Scheme::Http,
        request_timeout: Duration::from_secs(5),
        operation_timeout: Duration::from_secs(10),
        wait_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(20),
        retry_delay_initial: Duration::from_millis(5),
        retry_delay_max: Duration::from_millis(20),
        attempts_max: 3,
        ..ClientOptions::default()
    }
}

pub(crate) fn client(addresses: Vec<String>) -> Client {
    // One file per client: tests run in parallel, and a file being rewritten reads as empty.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token_file =
        std::env::temp_dir().join(format!("ferry-lightbits-token-{}-{unique}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    Client::new(ClientOptions { token: TokenSource::File(token_file), ..options(addresses) })
        .unwrap()
}

fn volume_json(uuid: &str, name: &str, state: &str, etag: &str, acl: &[&str]) -> String {
    serde_json::json!({"UUID": uuid, "name": name, "state": state, "ETag": etag,
        "acl": {"values": acl}, "IPAcl": {"values": ["ALLOW_ANY"]}, "size": "1048576"})
    .to_string()
}

/// The token is sent as a bearer header but never appears in Debug output or error messages.
#[test]
fn token_is_sent_but_never_shown() {
    let server = FakeServer::start(|_| (401, r#"{"message":"invalid token"}"#.to_owned()));
    let client = client(vec![server.address.clone()]);
    let debug = format!("{client:?} {:?}", client.options());
    assert!(!debug.contains(TOKEN), "{debug}");
    assert!(debug.contains("<redacted>"));
    assert_eq!(format!("{:?}", Secret(TOKEN.to_owned())), "<redacted>");
    let error = client.get_volume("u1").unwrap_err();
    assert!(matches!(error, LightbitsError::Unauthorized { .. }), "{error:?}");
    assert!(!format!("{error} {error:?}").contains(TOKEN));
    let seen = server.seen();
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {TOKEN}").as_str()));
    assert_eq!(seen[0].target, "/api/v2/projects/proj/volumes/u1");
}

/// A 401 re-reads the token file: a rotated token is used from then on, by every clone of the
/// client (cleanup's uncancellable one too); an unchanged token gives `Unauthorized` after one
/// request, without a retry loop.
#[test]
fn rotated_token_is_picked_up_on_401() {
    let valid = Arc::new(Mutex::new(TOKEN.to_owned()));
    let valid_server = Arc::clone(&valid);
    let server = FakeServer::start(move |request| {
        let expected = format!("Bearer {}", valid_server.lock().unwrap());
        if request.header("authorization") == Some(expected.as_str()) {
            (200, volume_json("u1", "v", "Available", "1", &[]))
        } else {
            (401, r#"{"message":"invalid token"}"#.to_owned())
        }
    });
    let token_file =
        std::env::temp_dir().join(format!("ferry-lightbits-rotate-{}", std::process::id()));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let client = Client::new(ClientOptions {
        token: TokenSource::File(token_file.clone()),
        ..options(vec![server.address.clone()])
    })
    .unwrap();
    assert!(client.get_volume("u1").unwrap().is_some());

    *valid.lock().unwrap() = "rotated.token.sig".to_owned();
    let error = client.get_volume("u1").unwrap_err();
    assert!(matches!(error, LightbitsError::Unauthorized { .. }), "{error:?}");
    assert_eq!(server.seen().len(), 2, "one 401 and no retry while the file is unchanged");

    std::fs::write(&token_file, "rotated.token.sig\n").unwrap();
    let cleanup = client.uncancellable();
    assert!(cleanup.get_volume("u1").unwrap().is_some(), "the rotated token is read on 401");
    assert!(client.get_volume("u1").unwrap().is_some(), "and shared with every clone");
    let seen = server.seen();
    assert_eq!(seen.len(), 5, "401, then the new token, then the new token at once");
    assert_eq!(seen[4].header("authorization"), Some("Bearer rotated.token.sig"));
    std::fs::remove_file(&token_file).unwrap();
    let error = client.get_volume("u1");
    assert!(error.is_ok(), "a missing file keeps the token in use: {error:?}");
    assert!(!format!("{client:?}").contains("rotated"));
}

/// A dead address and a 503 are both skipped; the next address answers.
#[test]
fn failover_to_next_address() {
    let unhealthy = FakeServer::start(|_| (503, "{}".to_owned()));
    let healthy = FakeServer::start(|_| (200, volume_json("u1", "v", "Available", "1", &[])));
    let client = client(vec![dead_address(), unhealthy.address.clone(), healthy.address.clone()]);
    let volume = client.get_volume("u1").unwrap().unwrap();
    assert_eq!(volume.uuid, "u1");
    assert_eq!(unhealthy.seen().len(), 1);
    // The healthy address is now preferred: the next request goes straight to it.
    let _volume = client.get_volume("u1").unwrap();
    assert_eq!(unhealthy.seen().len(), 1);
    assert_eq!(healthy.seen().len(), 2);
}

/// Retries are bounded: a cluster that always answers 500 yields a transient Http error after
/// `attempts_max` rounds; an unreachable one an Unreachable error.
#[test]
fn retries_are_bounded() {
    let server = FakeServer::start(|_| (500, "{}".to_owned()));
    let client = client(vec![server.address.clone()]);
    let error = client.get_volume("u1").unwrap_err();
    assert!(matches!(error, LightbitsError::Http { status: 500, .. }), "{error:?}");
    assert_eq!(crate::error::Classify::status(&error), crate::error::Status::Transient);
    assert_eq!(server.seen().len(), 3);
    let unreachable = super::tests::client(vec![dead_address()]);
    let error = unreachable.cluster_info().unwrap_err();
    assert!(matches!(error, LightbitsError::Unreachable { .. }), "{error:?}");
    assert_eq!(crate::error::Classify::kind(&error), crate::error::ErrorKind::Cluster);
}

/// An ACL update carries If-Match with the ETag read; a 412 re-reads and retries with the new one.
#[test]
fn etag_retry_on_412() {
    let etags = Arc::new(Mutex::new(VecDeque::from(["1", "2"])));
    let puts = Arc::new(Mutex::new(0));
    let server = FakeServer::start(move |request| match request.method.as_str() {
        "GET" => {
            let etag = etags.lock().unwrap().front().copied().unwrap();
            (200, volume_json("u1", "v", "Available", etag, &["ALLOW_NONE"]))
        }
        "PUT" => {
            *puts.lock().unwrap() += 1;
            if request.header("if-match") == Some("1") {
                let _old = etags.lock().unwrap().pop_front();
                (412, "{}".to_owned())
            } else {
                (200, "{}".to_owned())
            }
        }
        _ => (400, "{}".to_owned()),
    });
    let client = client(vec![server.address.clone()]);
    client
        .update_volume_acl("u1", |volume| UpdateAcl {
            acl: volume.acl.with_host("nqn.me"),
            ip_acl: volume.ip_acl.clone(),
        })
        .unwrap();
    let puts: Vec<Seen> = server.seen().into_iter().filter(|seen| seen.method == "PUT").collect();
    assert_eq!(puts.len(), 2);
    assert_eq!(puts[0].header("if-match"), Some("1"));
    assert_eq!(puts[1].header("if-match"), Some("2"));
    let body: serde_json::Value = serde_json::from_str(&puts[1].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"acl": {"values": ["nqn.me"]}, "IPAcl": {"values": ["ALLOW_ANY"]}})
    );
}

/// 404 is "absent" for reads, "not found" for resolve, "already gone" for deletes; a 409 on create
/// reads the existing resource back by name (idempotency).
#[test]
fn not_found_conflict_and_gone() {
    let created = Arc::new(Mutex::new(false));
    let server = FakeServer::start(move |request| {
        let mut created = created.lock().unwrap();
        match (request.method.as_str(), request.target.as_str()) {
            ("GET", "/api/v2/projects/proj/volumes/?name=ferry-clone-j1") if *created => {
                (200, volume_json("u9", "ferry-clone-j1", "Creating", "1", &["nqn.me"]))
            }
            ("POST", "/api/v2/projects/proj/volumes") => {
                *created = true;
                (409, r#"{"code":6}"#.to_owned())
            }
            ("DELETE", _) => (404, "{}".to_owned()),
            _ => (404, "{}".to_owned()),
        }
    });
    let client = client(vec![server.address.clone()]);
    assert!(client.get_volume("u1").unwrap().is_none());
    let error = client.resolve_volume("no-such-volume").unwrap_err();
    assert!(matches!(error, LightbitsError::VolumeNotFound { .. }));
    assert_eq!(crate::error::Classify::kind(&error), crate::error::ErrorKind::NotFound);
    assert_eq!(client.delete_volume("u1").unwrap(), Deletion::AlreadyGone);
    let request = CreateVolume {
        name: "ferry-clone-j1".into(),
        size: "1048576".into(),
        replica_count: "3".into(),
        compression: "False".into(),
        acl: Acl::of(vec!["nqn.me".into()]),
        ip_acl: Acl::of(vec!["ALLOW_ANY".into()]),
        source_snapshot_uuid: None,
        source_snapshot_name: Some("ferry-snap-j1".into()),
        qos_policy_uuid: None,
    };
    let volume = client.create_volume(&request).unwrap();
    assert_eq!(volume.uuid, "u9");
    let post = server.seen().into_iter().find(|seen| seen.method == "POST").unwrap();
    let body: serde_json::Value = serde_json::from_str(&post.body).unwrap();
    assert_eq!(body["sourceSnapshotName"], "ferry-snap-j1");
    assert_eq!(body["sourceSnapshotUUID"], serde_json::Value::Null);
    assert_eq!(body["replicaCount"], "3");
    assert!(body.get("qosPolicyUUID").is_none());
}

/// Polling stops on Available, fails on Failed, and a wait for deletion ends on 404.
#[test]
fn polling_state_sets() {
    let states =
        Arc::new(Mutex::new(VecDeque::from(["Creating", "Updating", "Available", "Failed"])));
    let server = FakeServer::start(move |request| {
        if request.method == "GET" && request.target.ends_with("/gone") {
            return (404, "{}".to_owned());
        }
        let state = states.lock().unwrap().pop_front().unwrap_or("Deleting");
        (200, volume_json("u1", "v", state, "1", &[]))
    });
    let client = client(vec![server.address.clone()]);
    assert_eq!(client.wait_volume_available("u1").unwrap().state, VolumeState::Available);
    let error = client.wait_volume_available("u1").unwrap_err();
    assert!(matches!(error, LightbitsError::Failed { .. }), "{error:?}");
    client.wait_volume_gone("gone").unwrap();
    let client = Client::new(ClientOptions {
        wait_timeout: Duration::from_millis(60),
        ..options(vec![server.address.clone()])
    });
    // No token in the environment: a clear Token error naming the variable, not a panic.
    assert!(matches!(client, Err(LightbitsError::Token { .. })));
}

/// Address forms: bare host, host:port, bracketed and bare IPv6.
#[test]
fn base_urls() {
    assert_eq!(base_url(Scheme::Https, "10.0.0.1").unwrap(), "https://10.0.0.1:443");
    assert_eq!(base_url(Scheme::Https, "10.0.0.1:8443").unwrap(), "https://10.0.0.1:8443");
    assert_eq!(base_url(Scheme::Https, "fe80::1").unwrap(), "https://[fe80::1]:443");
    assert_eq!(base_url(Scheme::Http, "[fe80::1]:80").unwrap(), "http://[fe80::1]:80");
    assert!(base_url(Scheme::Https, "a/b").is_err());
    assert_eq!(encode_query("a b/é"), "a%20b%2F%C3%A9");
    assert!(looks_like_uuid("0f6c3c2e-1111-2222-3333-444455556666"));
    assert!(!looks_like_uuid("volume-1"));
}

/// The diff call pages with `offsetLBA` until `nextOffsetLBA` is 0, accepting both encodings of
/// 64-bit numbers; 404 and 501 are "not available", 400 is an HTTP error, and an offset that
/// does not advance is refused instead of looping.
#[test]
fn changed_blocks_pages_and_errors() {
    let server = FakeServer::start(|request| {
        let target = request.target.as_str();
        if target.contains("diff/old-cluster") {
            return (501, r#"{"code":12,"message":"not implemented"}"#.into());
        }
        if target.contains("diff/gone") {
            return (404, r#"{"code":5,"message":"not found"}"#.into());
        }
        if target.contains("diff/same") {
            return (400, r#"{"code":3,"message":"identical"}"#.into());
        }
        if target.contains("diff/stuck") {
            return (200, r#"{"nextOffsetLBA":"64","lbaRanges":[]}"#.into());
        }
        assert!(target.contains("baseSnapshotUUID=base-1"), "{target}");
        if target.ends_with("offsetLBA=0") {
            (200, r#"{"nextOffsetLBA":"128","lbaRanges":[{"lbaStart":"0","lbaEnd":"7","dataBitMap":"/w=="}]}"#.into())
        } else if target.ends_with("offsetLBA=128") {
            (200, r#"{"nextOffsetLBA":0,"lbaRanges":[{"lbaStart":130,"lbaEnd":"131"}]}"#.into())
        } else {
            (500, "{}".into())
        }
    });
    let client = client(vec![server.address.clone()]);
    let ranges = client.changed_blocks("snap-2", "base-1", 100).unwrap();
    assert_eq!(
        ranges.iter().map(|range| (range.lba_start, range.lba_end)).collect::<Vec<_>>(),
        [(0, 7), (130, 131)]
    );
    let seen = server.seen();
    assert!(seen[0].target.starts_with("/api/v2/projects/proj/snapshots/diff/snap-2?"));
    for (uuid, status) in [("old-cluster", 501), ("gone", 404)] {
        match client.changed_blocks(uuid, "base-1", 100).unwrap_err() {
            LightbitsError::DiffUnavailable { status: got, .. } => assert_eq!(got, status),
            other => panic!("{uuid}: {other:?}"),
        }
    }
    let error = client.changed_blocks("same", "base-1", 100).unwrap_err();
    assert!(matches!(error, LightbitsError::Http { status: 400, .. }), "{error:?}");
    let error = client.changed_blocks("stuck", "base-1", 100).unwrap_err();
    assert!(error.to_string().contains("does not advance"), "{error}");
}
