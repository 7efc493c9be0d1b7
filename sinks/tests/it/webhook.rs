//! The webhook sink against a real receiver on loopback: transient refusals are retried
//! (honouring `Retry-After`), permanent ones stop at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use spate_sinks::webhook::WebhookSink;
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};

const TOKEN: &str = "sink-token-789";

struct FixedSecrets;

impl SecretResolver for FixedSecrets {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            match value {
                SecretValue::Env(name) if name == "TOKEN" => Ok(TOKEN.to_string()),
                SecretValue::Env(name) => Err(SecretError::MissingEnv(name.clone())),
                SecretValue::SecretKeyRef(reference) => Err(SecretError::MissingKey {
                    name: reference.name.clone(),
                    key: reference.key.clone(),
                }),
            }
        })
    }
}

/// What the receiver saw, and the answers it gives in turn (then 200).
#[derive(Default)]
struct Receiver {
    answers: Mutex<Vec<(StatusCode, Option<&'static str>)>>,
    seen: Mutex<Vec<(HeaderMap, Value)>>,
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> (StatusCode, HeaderMap) {
    receiver.seen.lock().unwrap().push((headers, body));
    let mut answers = receiver.answers.lock().unwrap();
    let (status, retry_after) = if answers.is_empty() {
        (StatusCode::OK, None)
    } else {
        answers.remove(0)
    };
    let mut response_headers = HeaderMap::new();
    if let Some(seconds) = retry_after {
        response_headers.insert("retry-after", seconds.parse().unwrap());
    }
    (status, response_headers)
}

async fn start_receiver(
    answers: Vec<(StatusCode, Option<&'static str>)>,
) -> (SocketAddr, Arc<Receiver>) {
    let receiver = Arc::new(Receiver {
        answers: Mutex::new(answers),
        seen: Mutex::default(),
    });
    let app = Router::new()
        .route("/results", post(receive))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, receiver)
}

async fn sink(addr: SocketAddr, max_attempts: u32) -> Box<dyn spate_sinks::Sink> {
    let config = WebhookSink {
        url: format!("http://{addr}/results"),
        bearer_token: Some(SecretValue::Env("TOKEN".into())),
        max_attempts,
    };
    let cx = SinkContext {
        pipeline: PipelineRef {
            namespace: "media".into(),
            name: "thumbnails".into(),
            uid: None,
        },
        secrets: Arc::new(FixedSecrets),
        kube: None,
    };
    spate_sinks::webhook::build(&config, &cx).await.unwrap()
}

fn record() -> Record {
    Record {
        pipeline: "media/thumbnails".into(),
        outcome: Outcome::Succeeded,
        event: json!({"id": "photos/a.jpg", "key": "a.jpg"}),
        job: Some("thumbnails-1a2b".into()),
        reason: None,
        at: "2026-03-01T12:00:00Z".into(),
    }
}

#[tokio::test]
async fn a_busy_receiver_is_retried_until_it_takes_the_record() {
    let (addr, receiver) = start_receiver(vec![
        (StatusCode::SERVICE_UNAVAILABLE, Some("1")),
        (StatusCode::SERVICE_UNAVAILABLE, None),
    ])
    .await;
    let sink = sink(addr, 5).await;
    let started = Instant::now();
    sink.deliver(&[record()]).await.unwrap();
    // The first refusal asked for a one-second pause.
    assert!(started.elapsed() >= Duration::from_secs(1));
    let seen = receiver.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    let (headers, body) = &seen[2];
    assert_eq!(headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(
        headers["idempotency-key"],
        "media/thumbnails/photos/a.jpg/succeeded"
    );
    assert_eq!(body["event"]["key"], "a.jpg");
    assert_eq!(body["outcome"], "succeeded");
    assert_eq!(body["job"], "thumbnails-1a2b");
}

#[tokio::test]
async fn a_refused_record_is_not_retried() {
    let (addr, receiver) = start_receiver(vec![(StatusCode::BAD_REQUEST, None)]).await;
    let sink = sink(addr, 5).await;
    let error = sink.deliver(&[record()]).await.unwrap_err().to_string();
    assert!(error.contains("400"), "{error}");
    assert_eq!(receiver.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn retries_stop_at_max_attempts() {
    let (addr, receiver) = start_receiver(vec![(StatusCode::BAD_GATEWAY, None); 5]).await;
    let sink = sink(addr, 3).await;
    let error = sink.deliver(&[record()]).await.unwrap_err().to_string();
    assert!(error.contains("3 attempts"), "{error}");
    assert_eq!(receiver.seen.lock().unwrap().len(), 3);
}
