//! The process's one webhook HTTP server: a table of registered paths, each bound to one
//! webhook source, served by a single axum fallback handler so paths can come and go while
//! the server runs (pipelines are added and removed at run time).
//!
//! A request is answered `202 Accepted` only once its Job exists (or, with `respond:
//! onReceipt`, once its delivery is in the engine's channel). When the channel stays full
//! longer than the hand-off bound the caller gets `503` with `Retry-After`, so backpressure
//! reaches the caller instead of piling up in memory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::auth::{self, Authenticator, Refusal};
use crate::{Ack, Delivery, Event, Settle, SourceError};

/// How long a caller may take to send its body; a client that stalls mid-body holds only its
/// own connection, and only this long.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for room in a full engine channel before answering 503.
const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller may take to send its request line and headers.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed `accept` (typically too many open files), wait this long before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Idempotency keys longer than this are refused: they become Job-name material and log text.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// Timeouts of the webhook server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookServerConfig {
    /// Longest time a caller may take to send its request line and headers (the connection
    /// is closed after that).
    pub header_timeout: Duration,
    /// Longest time a caller may take to send its whole body (408 after that).
    pub body_timeout: Duration,
    /// Longest wait for room in the engine's channel before answering 503.
    pub handoff_timeout: Duration,
}

impl Default for WebhookServerConfig {
    fn default() -> Self {
        WebhookServerConfig {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            handoff_timeout: DEFAULT_HANDOFF_TIMEOUT,
        }
    }
}

/// The process's shared webhook server, where each webhook source registers its path.
///
/// Cheap to clone: clones share the listener and the path table.
#[derive(Clone)]
pub struct WebhookServer {
    inner: Arc<Inner>,
}

struct Inner {
    local_addr: SocketAddr,
    config: WebhookServerConfig,
    listener: Mutex<Option<TcpListener>>,
    routes: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Set on a controller replica that does not hold the leader Lease: it runs no
    /// pipelines, so a path it does not know may well be served by the leader.
    standby: AtomicBool,
    /// How many [`Starting`] guards live: pipelines being started, whose paths may not be
    /// registered yet.
    starting: AtomicUsize,
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer")
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// One registered path: how to authenticate callers and where their events go.
pub(super) struct Endpoint {
    pub(super) path: String,
    pub(super) pipeline: String,
    pub(super) auth: Authenticator,
    pub(super) max_body_bytes: usize,
    pub(super) respond: Answer,
    /// Set while the source runs; until then (and after) callers get 503.
    pub(super) out: Mutex<Option<mpsc::Sender<Delivery>>>,
}

/// When a caller gets its answer (see the `webhook` module's delivery guarantee).
pub(super) enum Answer {
    /// Once the engine has settled the event: its Job exists, or it was dead-lettered.
    AfterJob { timeout: Duration },
    /// As soon as the event is in the engine's channel.
    OnReceipt,
}

/// Returned by [`WebhookServer::starting`]; dropping it lets unknown paths be `404` again.
#[must_use = "unknown paths are answered 404 again as soon as this is dropped"]
pub struct Starting {
    inner: Arc<Inner>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        self.inner.starting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps a path registered; dropping it frees the path.
pub(super) struct Registration {
    server: WebhookServer,
    endpoint: Arc<Endpoint>,
}

impl Registration {
    pub(super) fn attach(&self, out: mpsc::Sender<Delivery>) {
        *lock(&self.endpoint.out) = Some(out);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut routes = lock(&self.server.inner.routes);
        if routes
            .get(&self.endpoint.path)
            .is_some_and(|current| Arc::ptr_eq(current, &self.endpoint))
        {
            routes.remove(&self.endpoint.path);
        }
    }
}

// A poisoned lock only means another request panicked while holding it; the table itself is
// always left consistent (single inserts and removes), so keep serving.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl WebhookServer {
    /// Binds the listening socket with default timeouts; call [`WebhookServer::serve`] to
    /// start answering.
    pub async fn bind(addr: SocketAddr) -> Result<WebhookServer, SourceError> {
        Self::bind_with(addr, WebhookServerConfig::default()).await
    }

    /// Binds the listening socket with the given timeouts.
    pub async fn bind_with(
        addr: SocketAddr,
        config: WebhookServerConfig,
    ) -> Result<WebhookServer, SourceError> {
        let connect_error = |error: std::io::Error| SourceError::Connect {
            address: addr.to_string(),
            reason: error.to_string(),
        };
        let listener = TcpListener::bind(addr).await.map_err(connect_error)?;
        let local_addr = listener.local_addr().map_err(connect_error)?;
        Ok(WebhookServer {
            inner: Arc::new(Inner {
                local_addr,
                config,
                listener: Mutex::new(Some(listener)),
                routes: Mutex::new(HashMap::new()),
                standby: AtomicBool::new(false),
                starting: AtomicUsize::new(0),
            }),
        })
    }

    /// Marks this replica as standing by (not the leader) or leading. A standby answers a
    /// path it does not serve with `503` and `Retry-After`, so a caller honouring the
    /// contract retries (and the Service sends the retry on, to the leader) instead of taking
    /// the `404` for a wrong path and dropping its event.
    pub fn set_standby(&self, standby: bool) {
        self.inner.standby.store(standby, Ordering::Relaxed);
    }

    /// Holds off `404`s while pipelines start: until the guard is dropped, a path no pipeline
    /// has registered is answered `503` with `Retry-After`, because the pipeline serving it
    /// may be about to. Without it, a caller retrying across a restart of `spate` (or of one
    /// Pipeline) could reach the listener before its path is back, take the `404` for a
    /// wrong path, and drop its event.
    pub fn starting(&self) -> Starting {
        self.inner.starting.fetch_add(1, Ordering::SeqCst);
        Starting {
            inner: self.inner.clone(),
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Answers requests until `shutdown` is cancelled, then lets requests in flight finish
    /// (each is bounded by the body, hand-off and response timeouts). Serves once per server.
    pub async fn serve(&self, shutdown: CancellationToken) -> Result<(), SourceError> {
        let listener = lock(&self.inner.listener).take().ok_or_else(|| {
            SourceError::Config(format!(
                "the webhook server on {} is already serving",
                self.inner.local_addr
            ))
        })?;
        let router = Router::new()
            .fallback(handle)
            .with_state(self.inner.clone());
        tracing::info!(address = %self.inner.local_addr, "webhook server listening");
        // An explicit accept loop rather than `axum::serve`: hyper only enforces a header read
        // timeout with a timer, which `axum::serve` does not set, and a caller trickling its
        // headers must not hold a connection forever.
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "webhook server cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(router.clone());
            let (shutdown, header_timeout) = (shutdown.clone(), self.inner.config.header_timeout);
            connections.spawn(async move {
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = served {
                    tracing::debug!(%error, "webhook connection ended with an error");
                }
            });
        }
        // Requests in flight finish: each is bounded by the header, body, hand-off and
        // response timeouts.
        connections.close();
        connections.wait().await;
        Ok(())
    }

    /// Claims `endpoint.path`; a path serves exactly one pipeline.
    pub(super) fn register(&self, endpoint: Endpoint) -> Result<Registration, SourceError> {
        let mut routes = lock(&self.inner.routes);
        if let Some(existing) = routes.get(&endpoint.path) {
            return Err(SourceError::Config(format!(
                "webhook path `{}` is already used by pipeline {}; each pipeline needs its own path",
                endpoint.path, existing.pipeline
            )));
        }
        let endpoint = Arc::new(endpoint);
        routes.insert(endpoint.path.clone(), endpoint.clone());
        Ok(Registration {
            server: self.clone(),
            endpoint,
        })
    }
}

/// A refusal, as JSON: `{"error": "..."}`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let endpoint = lock(&inner.routes).get(&path).cloned();
    let Some(endpoint) = endpoint else {
        if inner.standby.load(Ordering::Relaxed) {
            return busy(
                &inner,
                "this replica is not the leader and serves no pipeline; try again",
            );
        }
        if inner.starting.load(Ordering::SeqCst) > 0 {
            return busy(&inner, "pipelines are starting; try again");
        }
        return refuse(StatusCode::NOT_FOUND, format!("no webhook at {path}"));
    };
    if request.method() != Method::POST {
        let mut response = refuse(StatusCode::METHOD_NOT_ALLOWED, "webhooks accept POST only");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    let response = accept(&inner, &endpoint, request).await;
    tracing::debug!(
        pipeline = %endpoint.pipeline,
        path = %endpoint.path,
        status = response.status().as_u16(),
        "webhook request"
    );
    response
}

async fn accept(inner: &Inner, endpoint: &Endpoint, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Refuse before reading anything when the caller cannot be right whatever the body says
    // (including a timestamp outside the window).
    if let Err(refusal) = endpoint
        .auth
        .check_headers(&parts.headers, auth::unix_now())
    {
        return refused(refusal);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > endpoint.max_body_bytes as u64) {
        return too_large(endpoint);
    }
    let collected = tokio::time::timeout(
        inner.config.body_timeout,
        Limited::new(body, endpoint.max_body_bytes).collect(),
    )
    .await;
    let body = match collected {
        Err(_elapsed) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {}s",
                    inner.config.body_timeout.as_secs_f64()
                ),
            );
        }
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            return too_large(endpoint);
        }
        Ok(Err(error)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {error}"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // With a timestamped signature, `seen` marks it as seen while this request is handled;
    // it stays marked only if the request is accepted, so a caller can retry any refusal.
    let seen = match endpoint
        .auth
        .check_body(&parts.headers, &body, auth::unix_now())
    {
        Ok(seen) => seen,
        Err(refusal) => return refused(refusal),
    };
    let data: Value = match serde_json::from_slice(&body) {
        Ok(data) => data,
        Err(error) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {error}"),
            );
        }
    };
    let id = match event_id(&parts.headers) {
        Ok(Some(key)) => key,
        // A replay after a restart, or to another replica, carries the same signature, so
        // it maps to the Job that already exists rather than a second one.
        Ok(None) => seen
            .as_ref()
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), auth::Seen::event_id),
        Err(refusal) => return refuse(StatusCode::BAD_REQUEST, refusal),
    };
    let mut fields = Map::new();
    fields.insert("subject".into(), Value::String(endpoint.path.clone()));
    fields.insert("path".into(), Value::String(endpoint.path.clone()));
    fields.insert(
        "headers".into(),
        visible_headers(&parts.headers, &endpoint.auth),
    );
    fields.insert("data".into(), data);
    let event = match Event::new(id.clone(), fields) {
        Ok(event) => event,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let (caller, settled) = match endpoint.respond {
        Answer::AfterJob { timeout } => {
            let (caller, settled) = oneshot::channel();
            (Some(caller), Some((settled, timeout)))
        }
        Answer::OnReceipt => (None, None),
    };
    let delivery = Delivery {
        refusal: None,
        event,
        ack: Ack::new(Accepted {
            pipeline: endpoint.pipeline.clone(),
            id: id.clone(),
            caller,
        }),
    };
    let out = lock(&endpoint.out).clone();
    let Some(out) = out else {
        return busy(inner, "the pipeline is not running");
    };
    match tokio::time::timeout(inner.config.handoff_timeout, out.send(delivery)).await {
        Ok(Ok(())) => {}
        Ok(Err(_closed)) => return busy(inner, "the pipeline is stopping"),
        Err(_elapsed) => {
            tracing::warn!(
                pipeline = %endpoint.pipeline,
                path = %endpoint.path,
                "webhook refused with 503: the engine did not take the event in time"
            );
            return busy(inner, "the pipeline is busy; retry later");
        }
    }
    let Some((settled, timeout)) = settled else {
        return accepted(seen, &id);
    };
    answer_once_settled(inner, endpoint, seen, &id, settled, timeout).await
}

/// The answer of a `respond: afterJob` caller: what the engine made of its event, or `504`.
async fn answer_once_settled(
    inner: &Inner,
    endpoint: &Endpoint,
    seen: Option<auth::Seen<'_>>,
    id: &str,
    settled: oneshot::Receiver<Settled>,
    timeout: Duration,
) -> Response {
    match tokio::time::timeout(timeout, settled).await {
        Ok(Ok(Settled::JobExists)) => accepted(seen, id),
        Ok(Ok(Settled::DeadLettered(reason))) => {
            // Sending it again would only dead-letter it again.
            if let Some(seen) = seen {
                seen.keep();
            }
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"id": id, "error": reason, "deadLettered": true})),
            )
                .into_response()
        }
        Ok(Ok(Settled::Retry)) => busy(inner, "the event's Job could not be created now; retry"),
        Ok(Err(_dropped)) => busy(
            inner,
            "the pipeline stopped before the event's Job was created; retry",
        ),
        Err(_elapsed) => {
            // Spate still holds the event and may create its Job: a replay is refused as one.
            if let Some(seen) = seen {
                seen.keep();
            }
            tracing::warn!(
                pipeline = %endpoint.pipeline,
                path = %endpoint.path,
                event = %id,
                "webhook answered 504: its Job was not confirmed within {}s",
                timeout.as_secs_f64()
            );
            (
                StatusCode::GATEWAY_TIMEOUT,
                axum::Json(json!({
                    "id": id,
                    "error": format!(
                        "the Job was not confirmed within {}s; Spate may still create it: retry with the same Idempotency-Key to reach the same Job",
                        timeout.as_secs_f64()
                    ),
                })),
            )
                .into_response()
        }
    }
}

fn accepted(seen: Option<auth::Seen<'_>>, id: &str) -> Response {
    if let Some(seen) = seen {
        seen.keep();
    }
    (StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response()
}

fn refused(refusal: Refusal) -> Response {
    let mut response = refuse(refusal.status, refusal.message);
    if let Some(seconds) = refusal.retry_after
        && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

fn too_large(endpoint: &Endpoint) -> Response {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than {} bytes", endpoint.max_body_bytes),
    )
}

fn busy(inner: &Inner, message: &str) -> Response {
    let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, message);
    let seconds = inner.config.handoff_timeout.as_secs().max(1);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// The caller's own request identity when it gave one, so its retries map to the same Job.
fn event_id(headers: &HeaderMap) -> Result<Option<String>, String> {
    for name in ["idempotency-key", "x-request-id"] {
        let Some(value) = headers.get(name) else {
            continue;
        };
        let key = value
            .to_str()
            .map_err(|_| format!("the {name} header must be visible ASCII"))?
            .trim();
        if key.is_empty() {
            continue;
        }
        if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(format!(
                "the {name} header is longer than {MAX_IDEMPOTENCY_KEY_LEN} characters"
            ));
        }
        return Ok(Some(key.to_string()));
    }
    Ok(None)
}

/// Headers as templates see them: lower-case names, credentials removed.
fn visible_headers(headers: &HeaderMap, auth: &Authenticator) -> Value {
    let mut visible = Map::new();
    for name in headers.keys() {
        let name_text = name.as_str();
        if matches!(
            name_text,
            "authorization" | "proxy-authorization" | "cookie"
        ) || auth.is_credential_header(name)
        {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        if !values.is_empty() {
            visible.insert(name_text.to_string(), Value::String(values.join(", ")));
        }
    }
    Value::Object(visible)
}

/// How the engine settled an event, for the caller waiting on its answer.
enum Settled {
    JobExists,
    Retry,
    DeadLettered(String),
}

/// Settles a webhook event: tells its caller when one is waiting (`respond: afterJob`), and
/// logs what nobody is left to hear (`onReceipt`, or a caller already answered `504`).
struct Accepted {
    pipeline: String,
    id: String,
    caller: Option<oneshot::Sender<Settled>>,
}

impl Accepted {
    /// Whether a waiting caller was told.
    fn tell(&mut self, settled: Settled) -> bool {
        self.caller
            .take()
            .is_some_and(|caller| caller.send(settled).is_ok())
    }
}

impl Settle for Accepted {
    fn ack(mut self: Box<Self>) -> futures::future::BoxFuture<'static, Result<(), SourceError>> {
        if self.caller.is_some() && !self.tell(Settled::JobExists) {
            tracing::info!(
                pipeline = %self.pipeline,
                event = %self.id,
                "webhook event's Job created after its caller was answered"
            );
        }
        Box::pin(async { Ok(()) })
    }

    fn retry(mut self: Box<Self>) -> futures::future::BoxFuture<'static, Result<(), SourceError>> {
        if !self.tell(Settled::Retry) {
            tracing::warn!(
                pipeline = %self.pipeline,
                event = %self.id,
                "webhook event could not be handled and cannot be redelivered: its caller was already answered"
            );
        }
        Box::pin(async { Ok(()) })
    }

    fn reject(
        mut self: Box<Self>,
        reason: String,
    ) -> futures::future::BoxFuture<'static, Result<(), SourceError>> {
        tracing::warn!(
            pipeline = %self.pipeline,
            event = %self.id,
            %reason,
            "webhook event rejected"
        );
        self.tell(Settled::DeadLettered(reason));
        Box::pin(async { Ok(()) })
    }
}
