//! The webhook source over real HTTP on loopback: authentication, limits, idempotency,
//! backpressure, and when the caller gets its answer, as a caller sees them. The test plays
//! the engine: it settles each delivery as the engine would once the Job exists (or not).
//!
//! Tests of what happens before the hand-off use `respond: onReceipt`, so the test need not
//! settle every delivery; the `afterJob` tests (the default) come last.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::webhook::{
    BearerAuth, HmacAuth, NoAuth, Respond, WebhookAuth, WebhookServer, WebhookServerConfig,
    WebhookSource,
};
use spate_sources::{Delivery, SourceContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "hook-token-123";
const HMAC_SECRET: &str = "hmac-secret-456";

/// Resolves `env` names to fixed values, without touching the process environment.
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
    _state: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let server = WebhookServer::bind_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            WebhookServerConfig {
                header_timeout: Duration::from_secs(1),
                body_timeout: Duration::from_secs(1),
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
            _state: tempfile::tempdir().unwrap(),
        }
    }

    fn context(&self, pipeline: &str) -> SourceContext {
        SourceContext {
            pipeline: pipeline.to_string(),
            secrets: Arc::new(FixedSecrets),
            checkpoints: Arc::new(FileCheckpoints::new(self._state.path())),
            state_dir: self._state.path().to_path_buf(),
            webhooks: Some(self.server.clone()),
            backlog: Default::default(),
        }
    }

    /// Builds and runs a webhook source; returns the engine's end of its channel.
    async fn source(
        &self,
        pipeline: &str,
        config: WebhookSource,
        capacity: usize,
    ) -> mpsc::Receiver<Delivery> {
        let source = spate_sources::webhook::build(&config, &self.context(pipeline))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(source.run(tx, self.shutdown.child_token()));
        // `run` attaches the channel as it starts; give it a moment to be scheduled.
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
        max_body_bytes: 1024,
        respond: Respond::OnReceipt,
        response_timeout: "10s".into(),
    }
}

fn hmac(path: &str) -> WebhookSource {
    WebhookSource {
        path: path.to_string(),
        auth: WebhookAuth::Hmac(HmacAuth {
            secret: SecretValue::Env("HMAC".into()),
            header: "X-Hub-Signature-256".into(),
            timestamp: None,
        }),
        max_body_bytes: 1024,
        respond: Respond::OnReceipt,
        response_timeout: "10s".into(),
    }
}

fn sign(body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!(
        "sha256={}",
        data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
    )
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 POST, written by hand so tests control every byte the server sees.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers within 10s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a delivery within 5s")
        .expect("the source is running")
}

#[tokio::test]
async fn an_authenticated_call_becomes_an_event_once_the_engine_has_it() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("media/thumbs", bearer("/hooks/thumbs"), 8)
        .await;
    let answer = post(
        harness.addr(),
        "/hooks/thumbs",
        &[
            ("Authorization", &format!("Bearer {TOKEN}")),
            ("X-Upload-Source", "camera-7"),
        ],
        r#"{"image": "a.jpg", "sizes": [64, 128]}"#,
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let delivery = next(&mut rx).await;
    let event = delivery.event.to_json();
    assert_eq!(answer.body["id"], event["id"]);
    assert_eq!(event["subject"], "/hooks/thumbs");
    assert_eq!(event["path"], "/hooks/thumbs");
    assert_eq!(event["data"], json!({"image": "a.jpg", "sizes": [64, 128]}));
    assert_eq!(event["headers"]["x-upload-source"], "camera-7");
    assert!(event["headers"].get("authorization").is_none());
    assert!(
        !event.to_string().contains(TOKEN),
        "the token leaked: {event}"
    );
    delivery.ack.ack().await.unwrap();
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_with_401() {
    let harness = Harness::start().await;
    let mut rx = harness.source("media/a", bearer("/hooks/a"), 8).await;
    let wrong = post(
        harness.addr(),
        "/hooks/a",
        &[("Authorization", "Bearer nope")],
        "{}",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body["error"].is_string(), "{}", wrong.body);
    let missing = post(harness.addr(), "/hooks/a", &[], "{}").await;
    assert_eq!(missing.status, 401);
    assert!(rx.try_recv().is_err(), "a refused call made an event");
}

#[tokio::test]
async fn hmac_signatures_are_checked_over_the_raw_body() {
    let harness = Harness::start().await;
    let mut rx = harness.source("ci/builds", hmac("/hooks/github"), 8).await;
    let body = r#"{"ref": "refs/heads/main"}"#;
    let forged = post(
        harness.addr(),
        "/hooks/github",
        &[("X-Hub-Signature-256", &sign(r#"{"ref": "other"}"#))],
        body,
    )
    .await;
    assert_eq!(forged.status, 401);
    let signed = post(
        harness.addr(),
        "/hooks/github",
        &[("X-Hub-Signature-256", &sign(body))],
        body,
    )
    .await;
    assert_eq!(signed.status, 202, "{}", signed.body);
    let event = next(&mut rx).await.event.to_json();
    assert_eq!(event["data"]["ref"], "refs/heads/main");
    assert!(event["headers"].get("x-hub-signature-256").is_none());
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_refused() {
    let harness = Harness::start().await;
    let open = WebhookSource {
        auth: WebhookAuth::None(NoAuth {}),
        ..bearer("/hooks/open")
    };
    let _rx = harness.source("media/open", open, 8).await;
    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(2000));
    let too_large = post(harness.addr(), "/hooks/open", &[], &big).await;
    assert_eq!(too_large.status, 413);
    let bad = post(harness.addr(), "/hooks/open", &[], r#"{"a": "#).await;
    assert_eq!(bad.status, 400);
    let error = bad.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("not valid JSON"), "{error}");
    let unknown = post(harness.addr(), "/hooks/nowhere", &[], "{}").await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn a_retried_call_with_the_same_idempotency_key_is_the_same_event() {
    let harness = Harness::start().await;
    let mut rx = harness.source("media/b", bearer("/hooks/b"), 8).await;
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Idempotency-Key", "order-42"),
    ];
    let first = post(harness.addr(), "/hooks/b", &headers, "{}").await;
    let second = post(harness.addr(), "/hooks/b", &headers, "{}").await;
    assert_eq!((first.status, second.status), (202, 202));
    assert_eq!(first.body["id"], "order-42");
    assert_eq!(second.body["id"], "order-42");
    assert_eq!(next(&mut rx).await.event.id(), "order-42");
    assert_eq!(next(&mut rx).await.event.id(), "order-42");
    let request_id = post(
        harness.addr(),
        "/hooks/b",
        &[("Authorization", auth.as_str()), ("X-Request-Id", "req-9")],
        "{}",
    )
    .await;
    assert_eq!(request_id.body["id"], "req-9");
}

#[tokio::test]
async fn a_full_engine_channel_answers_503_after_the_bound() {
    let harness = Harness::start().await;
    let _rx = harness.source("media/c", bearer("/hooks/c"), 1).await;
    let auth = format!("Bearer {TOKEN}");
    let first = post(
        harness.addr(),
        "/hooks/c",
        &[("Authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(first.status, 202);
    let started = Instant::now();
    let second = post(
        harness.addr(),
        "/hooks/c",
        &[("Authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(second.status, 503);
    assert!(second.header("retry-after").is_some());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_stalled_body_holds_only_its_own_connection() {
    let harness = Harness::start().await;
    let mut rx = harness.source("media/d", bearer("/hooks/d"), 8).await;
    let auth = format!("Bearer {TOKEN}");
    let mut stalled = TcpStream::connect(harness.addr()).await.unwrap();
    let head = format!(
        "POST /hooks/d HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n{{\"partial\":"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();

    let started = Instant::now();
    let other = post(
        harness.addr(),
        "/hooks/d",
        &[("Authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(other.status, 202);
    assert!(started.elapsed() < Duration::from_millis(500));
    next(&mut rx).await;

    let stalled_answer = read_answer(stalled).await;
    assert_eq!(stalled_answer.status, 408);
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn a_path_serves_one_pipeline_and_is_freed_when_it_stops() {
    let harness = Harness::start().await;
    let first = spate_sources::webhook::build(&bearer("/hooks/e"), &harness.context("ns/one"))
        .await
        .unwrap();
    let clash =
        spate_sources::webhook::build(&bearer("/hooks/e"), &harness.context("ns/two")).await;
    let error = clash.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("/hooks/e") && error.contains("ns/one"),
        "{error}"
    );
    let (tx, _rx) = mpsc::channel(1);
    let stop = CancellationToken::new();
    let running = tokio::spawn(first.run(tx, stop.clone()));
    stop.cancel();
    running.await.unwrap().unwrap();
    let gone = post(
        harness.addr(),
        "/hooks/e",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "{}",
    )
    .await;
    assert_eq!(gone.status, 404);
    assert!(
        spate_sources::webhook::build(&bearer("/hooks/e"), &harness.context("ns/two"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_unknown_path_is_503_while_pipelines_start_or_the_replica_stands_by_then_404() {
    let harness = Harness::start().await;
    let call = || post(harness.addr(), "/hooks/later", &[], "{}");
    let starting = harness.server.starting();
    let second = harness.server.starting();
    let answer = call().await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(answer.header("Retry-After").is_some());
    assert!(answer.body["error"].as_str().unwrap().contains("starting"));
    drop(starting);
    assert_eq!(call().await.status, 503, "one start still under way");
    drop(second);
    assert_eq!(call().await.status, 404);

    harness.server.set_standby(true);
    let answer = call().await;
    assert_eq!(answer.status, 503);
    assert!(
        answer.body["error"]
            .as_str()
            .unwrap()
            .contains("not the leader")
    );
    harness.server.set_standby(false);
    assert_eq!(call().await.status, 404);
}

#[tokio::test]
async fn a_caller_that_never_finishes_its_headers_is_cut_off() {
    let harness = Harness::start().await;
    let _rx = harness.source("media/f", bearer("/hooks/f"), 8).await;
    let mut stalled = TcpStream::connect(harness.addr()).await.unwrap();
    stalled
        .write_all(b"POST /hooks/f HTTP/1.1\r\nHost: spate\r\n")
        .await
        .unwrap();
    let other = post(
        harness.addr(),
        "/hooks/f",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "{}",
    )
    .await;
    assert_eq!(other.status, 202);
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_server_stops_on_shutdown_and_serves_only_once() {
    let server = WebhookServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let serving = server.clone();
    let token = shutdown.clone();
    let running = tokio::spawn(async move { serving.serve(token).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server.serve(CancellationToken::new()).await.is_err());
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), running).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))));
    assert!(TcpStream::connect(server.local_addr()).await.is_err());
}

/// The default answer mode, with a short timeout for the 504 test.
fn after_job(path: &str, timeout: &str) -> WebhookSource {
    WebhookSource {
        respond: Respond::AfterJob,
        response_timeout: timeout.to_string(),
        ..bearer(path)
    }
}

/// Posts in the background, since with `afterJob` the answer waits for the test to settle.
fn post_later(addr: SocketAddr, path: &'static str, key: &'static str) -> JoinHandle<Answer> {
    tokio::spawn(async move {
        let auth = format!("Bearer {TOKEN}");
        post(
            addr,
            path,
            &[("Authorization", &auth), ("Idempotency-Key", key)],
            r#"{"image": "a.jpg"}"#,
        )
        .await
    })
}

async fn still_waiting(answer: &JoinHandle<Answer>) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !answer.is_finished(),
        "the caller was answered before the engine settled its event"
    );
}

#[tokio::test]
async fn after_job_the_202_waits_until_the_job_exists() {
    let harness = Harness::start().await;
    assert_eq!(
        serde_json::from_value::<WebhookSource>(json!({
            "path": "/x", "auth": {"none": {}}
        }))
        .unwrap()
        .respond,
        Respond::AfterJob,
        "afterJob is the default"
    );
    let mut rx = harness
        .source("media/g", after_job("/hooks/g", "10s"), 8)
        .await;
    let answer = post_later(harness.addr(), "/hooks/g", "upload-1");
    let delivery = next(&mut rx).await;
    assert_eq!(delivery.event.id(), "upload-1");
    still_waiting(&answer).await;
    delivery.ack.ack().await.unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.body["id"], "upload-1");
}

#[tokio::test]
async fn after_job_a_dead_lettered_event_is_answered_422_with_the_reason() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("media/h", after_job("/hooks/h", "10s"), 8)
        .await;
    let answer = post_later(harness.addr(), "/hooks/h", "upload-2");
    let delivery = next(&mut rx).await;
    still_waiting(&answer).await;
    let reason = "template: `data.size` is missing".to_string();
    delivery.ack.reject(reason.clone()).await.unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert_eq!(answer.body["error"], reason.as_str());
    assert_eq!(answer.body["deadLettered"], true);
    assert_eq!(answer.body["id"], "upload-2");
}

#[tokio::test]
async fn after_job_an_event_handed_back_or_dropped_is_answered_503_so_the_caller_retries() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("media/i", after_job("/hooks/i", "10s"), 8)
        .await;
    let handed_back = post_later(harness.addr(), "/hooks/i", "upload-3");
    next(&mut rx).await.ack.retry().await.unwrap();
    let handed_back = handed_back.await.unwrap();
    assert_eq!(handed_back.status, 503, "{}", handed_back.body);
    assert!(handed_back.header("retry-after").is_some());

    // The engine stopping (or crashing inside the process) drops the delivery unsettled.
    let dropped = post_later(harness.addr(), "/hooks/i", "upload-4");
    drop(next(&mut rx).await);
    let dropped = dropped.await.unwrap();
    assert_eq!(dropped.status, 503, "{}", dropped.body);
    let error = dropped.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("retry"), "{error}");
}

#[tokio::test]
async fn after_job_a_job_not_confirmed_in_time_is_answered_504_and_still_created() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("media/j", after_job("/hooks/j", "400ms"), 8)
        .await;
    let started = Instant::now();
    let answer = post_later(harness.addr(), "/hooks/j", "upload-5");
    let delivery = next(&mut rx).await;
    let answer = answer.await.unwrap();
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(answer.body["id"], "upload-5");
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("Idempotency-Key"), "{error}");
    // The engine may still create the Job: settling after the caller has gone is not an error.
    delivery.ack.ack().await.unwrap();
}

#[tokio::test]
async fn after_job_a_shutdown_drains_the_callers_waiting_for_their_jobs() {
    let harness = Harness::start().await;
    let mut rx = harness
        .source("media/k", after_job("/hooks/k", "10s"), 8)
        .await;
    let answer = post_later(harness.addr(), "/hooks/k", "upload-6");
    let delivery = next(&mut rx).await;
    // The server stops taking requests but lets this one finish: the engine's drain creates
    // the Jobs in flight, and their callers get their 202.
    harness.shutdown.cancel();
    still_waiting(&answer).await;
    delivery.ack.ack().await.unwrap();
    assert_eq!(answer.await.unwrap().status, 202);
}
