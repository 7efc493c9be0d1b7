//! The webhook server under abuse, over real HTTP on loopback: bad credentials, replays
//! (refused with timestamped signatures), oversized and never-ending bodies, and floods of bad
//! callers. A good caller must keep being
//! served throughout, and no refused request may become an event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::webhook::{
    BearerAuth, HmacAuth, HmacTimestamp, Respond, WebhookAuth, WebhookServer, WebhookServerConfig,
    WebhookSource,
};
use spate_sources::{Delivery, SourceContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "abuse-token-7f3a9c";
const HMAC_SECRET: &str = "abuse-hmac-2b8e41";
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BODY: u64 = 1024;

struct FixedSecrets;

impl SecretResolver for FixedSecrets {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            match value {
                SecretValue::Env(name) if name == "TOKEN" => Ok(TOKEN.to_string()),
                SecretValue::Env(name) if name == "HMAC" => Ok(HMAC_SECRET.to_string()),
                SecretValue::Env(name) => Err(SecretError::MissingEnv(name.clone())),
                SecretValue::SecretKeyRef(reference) => Err(SecretError::MissingKey {
                    name: reference.name.clone(),
                    key: reference.key.clone(),
                }),
            }
        })
    }
}

struct Harness {
    server: WebhookServer,
    shutdown: CancellationToken,
    state: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let server = WebhookServer::bind_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            WebhookServerConfig {
                header_timeout: Duration::from_secs(1),
                body_timeout: BODY_TIMEOUT,
                handoff_timeout: Duration::from_millis(300),
            },
        )
        .await
        .unwrap();
        let shutdown = CancellationToken::new();
        let serving = server.clone();
        let token = shutdown.clone();
        tokio::spawn(async move { serving.serve(token).await });
        Harness {
            server,
            shutdown,
            state: tempfile::tempdir().unwrap(),
        }
    }

    async fn source(&self, pipeline: &str, config: WebhookSource) -> mpsc::Receiver<Delivery> {
        let context = SourceContext {
            pipeline: pipeline.to_string(),
            secrets: Arc::new(FixedSecrets),
            checkpoints: Arc::new(FileCheckpoints::new(self.state.path())),
            state_dir: self.state.path().to_path_buf(),
            webhooks: Some(self.server.clone()),
            backlog: Default::default(),
        };
        let source = spate_sources::webhook::build(&config, &context)
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(10_000);
        tokio::spawn(source.run(tx, self.shutdown.child_token()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        rx
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn bearer(path: &str) -> WebhookSource {
    WebhookSource {
        path: path.to_string(),
        auth: WebhookAuth::Bearer(BearerAuth {
            token: SecretValue::Env("TOKEN".into()),
        }),
        max_body_bytes: MAX_BODY,
        respond: Respond::OnReceipt,
        response_timeout: "10s".into(),
    }
}

fn hmac(path: &str) -> WebhookSource {
    WebhookSource {
        path: path.to_string(),
        auth: WebhookAuth::Hmac(HmacAuth {
            secret: SecretValue::Env("HMAC".into()),
            header: "X-Signature".into(),
            timestamp: None,
        }),
        max_body_bytes: MAX_BODY,
        respond: Respond::OnReceipt,
        response_timeout: "10s".into(),
    }
}

/// HMAC with a timestamp: `X-Spate-Timestamp`, 5 minutes either way.
fn timestamped(path: &str) -> WebhookSource {
    WebhookSource {
        path: path.to_string(),
        auth: WebhookAuth::Hmac(HmacAuth {
            secret: SecretValue::Env("HMAC".into()),
            header: "X-Signature".into(),
            timestamp: Some(HmacTimestamp::default()),
        }),
        max_body_bytes: MAX_BODY,
        respond: Respond::OnReceipt,
        response_timeout: "10s".into(),
    }
}

const TOLERANCE_SECS: u64 = 300;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A timestamped signature: of `"<timestamp>.<body>"`.
fn sign_at(timestamp: &str, body: &str) -> String {
    sign(&format!("{timestamp}.{body}"))
}

fn sign_with(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!(
        "sha256={}",
        data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
    )
}

fn sign(body: &str) -> String {
    sign_with(HMAC_SECRET, body)
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

fn request(path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(request(path, headers, body).as_bytes())
        .await
        .unwrap();
    read_answer(&mut stream, Duration::from_secs(10))
        .await
        .expect("the server answers within 10s")
}

/// Reads a whole answer (the server closes after it); `None` if it takes longer than `within`.
async fn read_answer(stream: &mut TcpStream, within: Duration) -> Option<Answer> {
    let mut raw = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    })
}

fn no_event(rx: &mut mpsc::Receiver<Delivery>, what: &str) {
    if let Ok(delivery) = rx.try_recv() {
        panic!("{what} made an event: {}", delivery.event.to_json());
    }
}

/// A case: its name, the path called, and the headers sent.
type Case = (&'static str, &'static str, Vec<(&'static str, String)>);

/// A refused case: its name, the headers sent, and what the error message says.
type Refused = (&'static str, Vec<(&'static str, String)>, &'static str);

#[tokio::test]
async fn bad_credentials_are_refused_with_401_and_make_no_event() {
    let harness = Harness::start().await;
    let mut bearer_rx = harness
        .source("abuse/bearer", bearer("/hooks/bearer"))
        .await;
    let mut hmac_rx = harness.source("abuse/hmac", hmac("/hooks/hmac")).await;
    let body = r#"{"deploy": "main"}"#;
    let good_token = format!("Bearer {TOKEN}");
    let cases: Vec<Case> = vec![
        ("no credentials", "/hooks/bearer", vec![]),
        (
            "a wrong bearer token",
            "/hooks/bearer",
            vec![("Authorization", "Bearer wrong".into())],
        ),
        (
            "the token with a byte missing",
            "/hooks/bearer",
            vec![("Authorization", good_token[..good_token.len() - 1].into())],
        ),
        (
            "the token with a byte more",
            "/hooks/bearer",
            vec![("Authorization", format!("{good_token}x"))],
        ),
        (
            "an empty bearer token",
            "/hooks/bearer",
            vec![("Authorization", "Bearer ".into())],
        ),
        (
            "the token under another scheme",
            "/hooks/bearer",
            vec![("Authorization", format!("Basic {TOKEN}"))],
        ),
        (
            "the token without a scheme",
            "/hooks/bearer",
            vec![("Authorization", TOKEN.into())],
        ),
        (
            "the token in another header",
            "/hooks/bearer",
            vec![("X-Api-Key", TOKEN.into())],
        ),
        ("no signature", "/hooks/hmac", vec![]),
        (
            "a signature made with another secret",
            "/hooks/hmac",
            vec![("X-Signature", sign_with("guessed", body))],
        ),
        (
            "a signature of another body",
            "/hooks/hmac",
            vec![("X-Signature", sign(r#"{"deploy": "prod"}"#))],
        ),
        (
            "a signature that is not hex",
            "/hooks/hmac",
            vec![("X-Signature", "sha256=zzzz".into())],
        ),
        (
            "an empty signature",
            "/hooks/hmac",
            vec![("X-Signature", "sha256=".into())],
        ),
        (
            "a truncated signature",
            "/hooks/hmac",
            vec![("X-Signature", sign(body)[..20].to_string())],
        ),
        (
            "a bearer token where a signature is expected",
            "/hooks/hmac",
            vec![("Authorization", good_token.clone())],
        ),
    ];
    let mut failures = Vec::new();
    for (name, path, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let answer = post(harness.addr(), path, &headers, body).await;
        if answer.status != 401 || !answer.body["error"].is_string() {
            failures.push(format!("{name}: {answer:?}"));
        }
        if answer.body.to_string().contains(TOKEN) || answer.body.to_string().contains(HMAC_SECRET)
        {
            failures.push(format!("{name}: the answer shows the secret"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    no_event(&mut bearer_rx, "a refused bearer call");
    no_event(&mut hmac_rx, "a refused signed call");

    // The right credentials still work on both paths.
    let ok = post(
        harness.addr(),
        "/hooks/bearer",
        &[("Authorization", &good_token)],
        body,
    )
    .await;
    assert_eq!(ok.status, 202, "{ok:?}");
    let signed = post(
        harness.addr(),
        "/hooks/hmac",
        &[("X-Signature", &sign(body))],
        body,
    )
    .await;
    assert_eq!(signed.status, 202, "{signed:?}");
}

/// A wrong token is refused from the headers alone: a caller announcing a huge body is not
/// read at all.
#[tokio::test]
async fn a_wrong_token_is_refused_before_the_body_is_read() {
    let harness = Harness::start().await;
    let mut rx = harness.source("abuse/early", bearer("/hooks/early")).await;
    let mut stream = TcpStream::connect(harness.addr()).await.unwrap();
    let head = "POST /hooks/early HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: Bearer wrong\r\nContent-Length: 104857600\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer without the body being sent");
    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(started.elapsed() < BODY_TIMEOUT, "{:?}", started.elapsed());
    no_event(&mut rx, "a refused call");
}

/// Replay in body-only mode (`hmac` without `timestamp`, kept for existing callers): the
/// signature has no timestamp, so the server cannot refuse a replay. A replayed request with
/// the caller's `Idempotency-Key` is the same event, so it maps to the same Job name and runs
/// once; a replayed signed request *without* a key is a new event. This test pins that
/// behaviour, which docs/pipeline.md and docs/reliability.md state.
#[tokio::test]
async fn without_a_timestamp_a_replay_is_the_same_event_only_with_an_idempotency_key() {
    let harness = Harness::start().await;
    let mut rx = harness.source("abuse/replay", hmac("/hooks/replay")).await;
    let body = r#"{"release": "v1.2.3"}"#;
    let signature = sign(body);
    let keyed = [
        ("X-Signature", signature.as_str()),
        ("Idempotency-Key", "rel-123"),
    ];
    let first = post(harness.addr(), "/hooks/replay", &keyed, body).await;
    let replay = post(harness.addr(), "/hooks/replay", &keyed, body).await;
    assert_eq!((first.status, replay.status), (202, 202));
    let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
    assert_eq!(a.event.id(), "rel-123");
    assert_eq!(
        b.event.id(),
        "rel-123",
        "a replay with the key is the same event"
    );

    // Without a key the body-only signature cannot tell a replay from a new call.
    let unkeyed = [("X-Signature", signature.as_str())];
    let first = post(harness.addr(), "/hooks/replay", &unkeyed, body).await;
    let replay = post(harness.addr(), "/hooks/replay", &unkeyed, body).await;
    assert_eq!((first.status, replay.status), (202, 202));
    let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
    assert_ne!(
        a.event.id(),
        b.event.id(),
        "body-only mode refuses replays now: update this test and the docs"
    );

    // A replayed key with a tampered body is refused: the signature covers the body only,
    // but the body cannot be changed without the secret.
    let tampered = post(
        harness.addr(),
        "/hooks/replay",
        &keyed,
        r#"{"release": "v6.6.6"}"#,
    )
    .await;
    assert_eq!(tampered.status, 401);
    no_event(&mut rx, "a tampered replay");
}

/// With `timestamp`, a signed request is accepted once: its replay gets 409, and a request
/// signed outside the tolerance, without a timestamp, or with a timestamp it was not signed
/// with gets 401. None of them becomes an event.
#[tokio::test]
async fn with_a_timestamp_a_replay_and_a_stale_or_unsigned_timestamp_are_refused() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("abuse/timestamped", timestamped("/hooks/timestamped"))
        .await;
    let addr = harness.addr();
    let path = "/hooks/timestamped";
    let body = r#"{"release": "v1.2.3"}"#;
    let now = unix_now().to_string();
    let signature = sign_at(&now, body);
    let fresh = [
        ("X-Signature", signature.as_str()),
        ("X-Spate-Timestamp", now.as_str()),
    ];

    // A fresh, correctly signed request is accepted, and becomes one event.
    let first = post(addr, path, &fresh, body).await;
    assert_eq!(first.status, 202, "{first:?}");
    let event = rx.recv().await.unwrap().event;
    assert_eq!(event.fields()["data"]["release"], "v1.2.3");
    assert_eq!(event.fields()["headers"]["x-spate-timestamp"], now.as_str());
    assert!(event.fields()["headers"].get("x-signature").is_none());

    // The same request again, as sent or with unsigned headers changed, is a replay: 409.
    let replay = post(addr, path, &fresh, body).await;
    assert_eq!(replay.status, 409, "{replay:?}");
    assert!(
        replay.body["error"].as_str().unwrap().starts_with("replay"),
        "{replay:?}"
    );
    let upper = signature.to_uppercase().replace("SHA256=", "");
    let disguised = [
        ("X-Signature", upper.as_str()),
        ("X-Spate-Timestamp", now.as_str()),
        ("Idempotency-Key", "another-key"),
    ];
    let replay = post(addr, path, &disguised, body).await;
    assert_eq!(replay.status, 409, "a re-encoded replay: {replay:?}");

    let past = (unix_now() - TOLERANCE_SECS - 60).to_string();
    let future = (unix_now() + TOLERANCE_SECS + 60).to_string();
    let earlier = (now.parse::<u64>().unwrap() - 1).to_string();
    let refused: Vec<Refused> = vec![
        (
            "a timestamp older than the tolerance, validly signed",
            vec![
                ("X-Signature", sign_at(&past, body)),
                ("X-Spate-Timestamp", past.clone()),
            ],
            "in the past",
        ),
        (
            "a timestamp further ahead than the tolerance, validly signed",
            vec![
                ("X-Signature", sign_at(&future, body)),
                ("X-Spate-Timestamp", future.clone()),
            ],
            "in the future",
        ),
        (
            "no timestamp header, the body signed alone",
            vec![("X-Signature", sign(body))],
            "missing x-spate-timestamp header",
        ),
        (
            "no timestamp header, a timestamped signature",
            vec![("X-Signature", signature.clone())],
            "missing x-spate-timestamp header",
        ),
        (
            "a timestamp that is not unix seconds",
            vec![
                ("X-Signature", sign_at("yesterday", body)),
                ("X-Spate-Timestamp", "yesterday".into()),
            ],
            "unix seconds",
        ),
        (
            "a timestamp in milliseconds",
            vec![
                ("X-Signature", sign_at(&format!("{now}000"), body)),
                ("X-Spate-Timestamp", format!("{now}000")),
            ],
            "unix seconds",
        ),
        (
            "the timestamp changed without re-signing",
            vec![
                ("X-Signature", signature.clone()),
                ("X-Spate-Timestamp", earlier.clone()),
            ],
            "wrong signature",
        ),
        (
            "the body signed alone, with a timestamp header",
            vec![
                ("X-Signature", sign(body)),
                ("X-Spate-Timestamp", now.clone()),
            ],
            "wrong signature",
        ),
        (
            "the body changed under a replayed signature",
            vec![
                ("X-Signature", signature.clone()),
                ("X-Spate-Timestamp", now.clone()),
            ],
            "wrong signature",
        ),
    ];
    let mut failures = Vec::new();
    for (name, headers, reason) in &refused {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let sent = if name.starts_with("the body changed") {
            r#"{"release": "v6.6.6"}"#
        } else {
            body
        };
        let answer = post(addr, path, &headers, sent).await;
        let error = answer.body["error"].as_str().unwrap_or_default();
        if answer.status != 401 || !error.contains(reason) {
            failures.push(format!("{name}: {answer:?}"));
        }
        if answer.body.to_string().contains(HMAC_SECRET) {
            failures.push(format!("{name}: the answer shows the secret"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    no_event(&mut rx, "a refused timestamped call");

    // A new request (another timestamp, even with the same body) is accepted.
    let later = (now.parse::<u64>().unwrap() + 1).to_string();
    let again = post(
        addr,
        path,
        &[
            ("X-Signature", &sign_at(&later, body)),
            ("X-Spate-Timestamp", &later),
        ],
        body,
    )
    .await;
    assert_eq!(again.status, 202, "{again:?}");
    assert_eq!(
        rx.recv().await.unwrap().event.fields()["data"]["release"],
        "v1.2.3"
    );

    // A signed request Spate refuses for another reason (here a body that is not JSON) is
    // not remembered: sent again it is refused for that reason, not as a replay.
    let broken = "{\"release\": ";
    let signed_broken = sign_at(&now, broken);
    let headers = [
        ("X-Signature", signed_broken.as_str()),
        ("X-Spate-Timestamp", now.as_str()),
    ];
    for attempt in 0..2 {
        let answer = post(addr, path, &headers, broken).await;
        assert_eq!(answer.status, 400, "attempt {attempt}: {answer:?}");
    }

    // A stale timestamp is refused from the headers alone, before a huge body is read.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nX-Signature: {}\r\nX-Spate-Timestamp: {past}\r\nContent-Length: 104857600\r\n\r\n",
        sign_at(&past, body)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer without the body being sent");
    assert_eq!(answer.status, 401, "{answer:?}");
    no_event(&mut rx, "a refused timestamped call");
}

/// The seen-signature set lives in one process; what keeps a replay sent to a restarted
/// Spate, or to the other replica, from becoming a second Job is the event id: without an
/// `Idempotency-Key`, it is derived from the signature, so the replay names the same Job.
#[tokio::test]
async fn with_a_timestamp_a_replay_to_another_process_is_the_same_event() {
    let (first, second) = (Harness::start().await, Harness::start().await);
    let path = "/hooks/timestamped";
    let mut from_first = first.source("abuse/restarted", timestamped(path)).await;
    let mut from_second = second.source("abuse/restarted", timestamped(path)).await;
    let body = r#"{"release": "v2.0.0"}"#;
    let now = unix_now().to_string();
    let signature = sign_at(&now, body);
    let signed = [
        ("X-Signature", signature.as_str()),
        ("X-Spate-Timestamp", now.as_str()),
    ];
    let original = post(first.addr(), path, &signed, body).await;
    let replayed = post(second.addr(), path, &signed, body).await;
    assert_eq!((original.status, replayed.status), (202, 202));
    let id = from_first.recv().await.unwrap().event.id().to_string();
    assert!(id.starts_with("hmac-"), "{id}");
    assert_eq!(from_second.recv().await.unwrap().event.id(), id);
    assert_eq!(original.body["id"], id.as_str());

    // A new request with the same body is signed at another second: another event.
    let later = (now.parse::<u64>().unwrap() + 1).to_string();
    let signature = sign_at(&later, body);
    let next = [
        ("X-Signature", signature.as_str()),
        ("X-Spate-Timestamp", later.as_str()),
    ];
    assert_eq!(post(first.addr(), path, &next, body).await.status, 202);
    assert_ne!(from_first.recv().await.unwrap().event.id(), id);
}

#[tokio::test]
async fn oversized_bodies_get_413_without_being_read() {
    let harness = Harness::start().await;
    let mut rx = harness.source("abuse/big", bearer("/hooks/big")).await;
    let auth = format!("Bearer {TOKEN}");

    // Declared too large: refused from the header, before any of the body arrives.
    let mut declared = TcpStream::connect(harness.addr()).await.unwrap();
    let head = format!(
        "POST /hooks/big HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Length: 10737418240\r\n\r\n"
    );
    declared.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let answer = read_answer(&mut declared, Duration::from_secs(5))
        .await
        .expect("413 without the body");
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(started.elapsed() < BODY_TIMEOUT);

    // Chunked, with no length: the server stops at the limit and answers 413 while the
    // caller is still sending.
    let mut chunked = TcpStream::connect(harness.addr()).await.unwrap();
    let head = format!(
        "POST /hooks/big HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    chunked.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 512, "a".repeat(512));
    for _ in 0..(2 * MAX_BODY as usize / 512 + 1) {
        chunked.write_all(chunk.as_bytes()).await.unwrap();
    }
    // The body never ends (no final 0-length chunk): only the limit can end it.
    let answer = read_answer(&mut chunked, Duration::from_secs(5))
        .await
        .expect("413 while the body is still arriving");
    assert_eq!(answer.status, 413, "{answer:?}");

    // A body just at the limit is fine.
    let exact = format!(r#"{{"a": "{}"}}"#, "b".repeat(MAX_BODY as usize - 9));
    assert_eq!(exact.len() as u64, MAX_BODY);
    let ok = post(
        harness.addr(),
        "/hooks/big",
        &[("Authorization", &auth)],
        &exact,
    )
    .await;
    assert_eq!(ok.status, 202, "{ok:?}");
    let delivery = rx.recv().await.unwrap();
    assert_eq!(
        delivery.event.fields()["data"]["a"].as_str().unwrap().len(),
        MAX_BODY as usize - 9
    );
    no_event(&mut rx, "an oversized call");
}

/// Slow clients (slowloris): many connections that never finish their body or their headers.
/// Each is cut off after its timeout, and meanwhile good callers are answered at once.
#[tokio::test]
async fn slow_clients_are_timed_out_and_do_not_block_others() {
    let harness = Harness::start().await;
    let mut rx = harness.source("abuse/slow", bearer("/hooks/slow")).await;
    let auth = format!("Bearer {TOKEN}");
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut stream = TcpStream::connect(harness.addr()).await.unwrap();
        let head = if i % 2 == 0 {
            // The body never completes.
            format!(
                "POST /hooks/slow HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Length: 1000\r\n\r\n{{\"partial\":"
            )
        } else {
            // The headers never complete.
            "POST /hooks/slow HTTP/1.1\r\nHost: spate\r\nX-Slow: 1\r\n".to_string()
        };
        stream.write_all(head.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let started = Instant::now();
    for i in 0..10 {
        let begun = Instant::now();
        let answer = post(
            harness.addr(),
            "/hooks/slow",
            &[
                ("Authorization", &auth),
                ("Idempotency-Key", &format!("good-{i}")),
            ],
            "{}",
        )
        .await;
        assert_eq!(answer.status, 202, "{answer:?}");
        assert!(
            begun.elapsed() < Duration::from_millis(500),
            "a good call waited {:?} behind slow ones",
            begun.elapsed()
        );
    }
    for i in 0..10 {
        assert_eq!(rx.recv().await.unwrap().event.id(), format!("good-{i}"));
    }
    // Every stalled connection is answered (408 for a stalled body) or closed, within the
    // timeouts, not held forever.
    let mut timed_out = 0;
    for (i, mut stream) in stalled.into_iter().enumerate() {
        let mut raw = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .is_ok();
        assert!(closed, "stalled connection {i} is still open");
        if String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 25, "each stalled body gets 408");
    assert!(started.elapsed() < Duration::from_secs(8));
    no_event(&mut rx, "a stalled call");
}

/// A flood of bad requests (wrong tokens, broken JSON, oversized bodies, garbage bytes) from
/// many connections at once does not stop good requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_requests_does_not_stop_good_ones() {
    let harness = Harness::start().await;
    let mut rx = harness.source("abuse/flood", bearer("/hooks/flood")).await;
    let addr = harness.addr();
    let auth = format!("Bearer {TOKEN}");
    let stop = CancellationToken::new();
    let mut flooders = Vec::new();
    for worker in 0..32 {
        let stop = stop.clone();
        let auth = auth.clone();
        flooders.push(tokio::spawn(async move {
            let mut sent = 0u32;
            let mut unexpected = Vec::new();
            while !stop.is_cancelled() {
                let (raw, expected) = match (worker + sent) % 5 {
                    0 => (
                        request("/hooks/flood", &[("Authorization", "Bearer nope")], "{}"),
                        Some(401),
                    ),
                    1 => (request("/hooks/flood", &[], "{}"), Some(401)),
                    2 => (
                        request("/hooks/flood", &[("Authorization", &auth)], "{\"a\": "),
                        Some(400),
                    ),
                    3 => (
                        request(
                            "/hooks/flood",
                            &[("Authorization", "Bearer nope")],
                            &"x".repeat(4096),
                        ),
                        Some(401),
                    ),
                    _ => ("\u{0}\u{1}GARBAGE \r\n\r\n".repeat(10), None),
                };
                let Ok(mut stream) = TcpStream::connect(addr).await else {
                    continue;
                };
                if stream.write_all(raw.as_bytes()).await.is_err() {
                    continue;
                }
                let answer = read_answer(&mut stream, Duration::from_secs(10)).await;
                if let Some(expected) = expected
                    && answer.as_ref().map(|a| a.status) != Some(expected)
                {
                    unexpected.push(format!("{expected}: {answer:?}"));
                }
                sent += 1;
            }
            (sent, unexpected)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let begun = Instant::now();
        let answer = post(
            addr,
            "/hooks/flood",
            &[
                ("Authorization", &auth),
                ("Idempotency-Key", &format!("good-{i}")),
            ],
            "{\"n\": 1}",
        )
        .await;
        assert_eq!(
            answer.status, 202,
            "good call {i} during the flood: {answer:?}"
        );
        slowest = slowest.max(begun.elapsed());
    }
    stop.cancel();
    let mut bad = 0;
    for flooder in flooders {
        let (sent, unexpected) = flooder.await.unwrap();
        assert!(unexpected.is_empty(), "{unexpected:?}");
        bad += sent;
    }
    assert!(bad >= 100, "only {bad} bad requests were sent");
    assert!(
        slowest < Duration::from_secs(2),
        "a good call took {slowest:?}"
    );
    let mut good = Vec::new();
    while let Ok(delivery) = rx.try_recv() {
        good.push(delivery.event.id().to_string());
    }
    let expected: Vec<String> = (0..20).map(|i| format!("good-{i}")).collect();
    assert_eq!(good, expected, "only the good calls became events");
}
