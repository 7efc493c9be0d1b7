//! Webhooks: a path per pipeline on the process's shared HTTP server, bearer-token or
//! HMAC-SHA256 authentication, a body size limit, and `202 Accepted` only once the event's
//! Job exists.
//!
//! Delivery guarantee (`respond: afterJob`, the default): the caller's answer is the event's
//! acknowledgement, so it waits for the Job. `202` means the Job is in the cluster, and a crash
//! of Spate at any moment before it leaves the caller without a `202`: a caller that retries
//! anything else loses nothing. Its retry must send the same `Idempotency-Key` (or
//! `X-Request-Id`) to map to the same Job rather than a second one; with `hmac.timestamp`, the
//! signature itself is the event id when no key is sent. `422` means the event was
//! dead-lettered (retrying cannot help), `504` that the Job was not confirmed within
//! `responseTimeout` (Spate may still create it: retry with the same key). Every other answer
//! (`401`, `400`, `413`, `408`, `503` with `Retry-After`) means Spate does not have the event.
//! `409` (timestamped HMAC only) means this exact signed request was already accepted, or is
//! being handled right now.
//!
//! `respond: onReceipt` answers `202` as soon as the event is in the engine's channel, in
//! memory: faster for the caller, but a crash between that `202` and the Job loses the event.
//!
//! Replay protection is opt-in per path (`hmac.timestamp`), because it changes what callers
//! sign: turning it on by default would make every existing caller's body-only signature fail
//! with 401 on upgrade. Without it, a captured signed request can be replayed, and only the
//! caller's `Idempotency-Key` (when it sends one) keeps a replay from becoming a second Job.
//! With it, replays are refused with `409` by the process that accepted the original; after a
//! restart, or on another replica, a replay carries the same signature, so the same event id,
//! and maps to the Job that already exists.

mod auth;
mod server;

use std::sync::Mutex;

use futures::future::BoxFuture;
use http::HeaderName;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::check::{Problems, parse_duration, required_duration};
use crate::secret::SecretValue;
use crate::{Delivery, Source, SourceContext, SourceError};
use auth::{Authenticator, MAX_SEEN_SIGNATURES, TimestampRule};
use server::{Endpoint, Registration};
pub use server::{Starting, WebhookServer, WebhookServerConfig};

/// HTTP requests to a path on Spate's webhook server. Authentication is required: choose
/// `none` explicitly to go without.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSource {
    /// The path, e.g. `/hooks/thumbnails`.
    pub path: String,
    pub auth: WebhookAuth,
    /// Larger bodies are refused with 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// When the caller gets its `202`: `afterJob` (the default) once the event's Job exists,
    /// or `onReceipt` as soon as the engine holds the event in memory (a crash before its Job
    /// exists then loses it).
    #[serde(default)]
    pub respond: Respond,
    /// With `respond: afterJob`, how long a caller waits for its Job before getting `504`,
    /// e.g. `10s`; at most `5m`.
    #[serde(default = "default_response_timeout")]
    pub response_timeout: String,
}

/// When a webhook caller is answered.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Respond {
    /// Once the event's Job exists: `202` means the work survives a crash of Spate.
    #[default]
    AfterJob,
    /// As soon as the engine holds the event in memory.
    OnReceipt,
}

fn default_response_timeout() -> String {
    "10s".to_string()
}

/// A caller held longer than this would usually have given up already (many senders, GitHub's
/// among them, wait 10 s), and every waiting caller holds a connection.
const MAX_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

/// How a webhook caller proves who it is.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WebhookAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(BearerAuth),
    /// An HMAC-SHA256, hex, in a header (GitHub style `sha256=<hex>` accepted): of the body,
    /// or with `timestamp`, of `"<timestamp>.<body>"`, which also refuses replays.
    Hmac(HmacAuth),
    /// No authentication. Only for trusted networks.
    None(NoAuth),
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BearerAuth {
    pub token: SecretValue,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HmacAuth {
    pub secret: SecretValue,
    /// The header carrying the signature.
    #[serde(default = "default_signature_header")]
    pub header: String,
    /// Timestamped signatures with replay protection. Without it the signature covers the body
    /// only, and a captured request can be replayed (the caller's `Idempotency-Key` is then the
    /// only defence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<HmacTimestamp>,
}

fn default_signature_header() -> String {
    "X-Spate-Signature".to_string()
}

/// The caller sends the current unix time in seconds in `header` and signs
/// `"<timestamp>.<raw body>"`. Requests more than `tolerance` from Spate's clock get 401; a
/// second request with the same signature within the window gets 409.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HmacTimestamp {
    /// The header carrying the timestamp, in unix seconds.
    #[serde(default = "default_timestamp_header")]
    pub header: String,
    /// How far a timestamp may be from Spate's clock, either way, e.g. `5m`; at most `1h`.
    #[serde(default = "default_tolerance")]
    pub tolerance: String,
}

impl Default for HmacTimestamp {
    fn default() -> Self {
        HmacTimestamp {
            header: default_timestamp_header(),
            tolerance: default_tolerance(),
        }
    }
}

fn default_timestamp_header() -> String {
    "X-Spate-Timestamp".to_string()
}

fn default_tolerance() -> String {
    "5m".to_string()
}

/// Longer windows would keep every signature in memory for longer (up to twice the tolerance)
/// and accept stale requests.
const MAX_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(3600);

/// An explicit opt-out of webhook authentication.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoAuth {}

impl WebhookSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let valid = self.path.starts_with('/')
            && !self.path.contains("..")
            && !self.path.contains(['?', '#', ' ']);
        if !valid {
            problems.push(
                format!("{path}.path"),
                format!(
                    "`{}` must be an absolute path such as `/hooks/thumbnails`, without `..`, `?` or `#`",
                    self.path
                ),
            );
        }
        if self.max_body_bytes == 0 {
            problems.push(format!("{path}.maxBodyBytes"), "must be at least 1");
        }
        let timeout_path = format!("{path}.responseTimeout");
        if let Some(timeout) = problems.duration(&timeout_path, &self.response_timeout)
            && timeout > MAX_RESPONSE_TIMEOUT
        {
            problems.push(
                timeout_path,
                format!("`{}` must be at most 5m", self.response_timeout),
            );
        }
        if let WebhookAuth::Hmac(hmac) = &self.auth {
            if hmac.header.trim().is_empty() {
                problems.push(format!("{path}.auth.hmac.header"), "must name a header");
            }
            if let Some(timestamp) = &hmac.timestamp {
                let at = format!("{path}.auth.hmac.timestamp");
                if timestamp.header.trim().is_empty() {
                    problems.push(format!("{at}.header"), "must name a header");
                } else if timestamp
                    .header
                    .trim()
                    .eq_ignore_ascii_case(hmac.header.trim())
                {
                    problems.push(
                        format!("{at}.header"),
                        "must differ from the signature header",
                    );
                }
                let tolerance_path = format!("{at}.tolerance");
                if let Some(tolerance) = problems.duration(&tolerance_path, &timestamp.tolerance)
                    && (tolerance.as_secs() == 0 || tolerance > MAX_TOLERANCE)
                {
                    problems.push(
                        tolerance_path,
                        format!(
                            "`{}` must be between 1s and 1h (timestamps are whole seconds)",
                            timestamp.tolerance
                        ),
                    );
                }
            }
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        json!({"id": "sample-0001", "subject": self.path, "headers": {}, "data": {}})
    }
}

/// Registers the source's path on the process's webhook server; the source hands requests
/// to the engine while it runs and frees the path when it stops.
pub fn build(
    config: &WebhookSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let server = cx.webhooks.clone().ok_or_else(|| {
            SourceError::Config(
                "webhook sources need the webhook server; start Spate with it enabled".to_string(),
            )
        })?;
        let auth = match &config.auth {
            WebhookAuth::Bearer(bearer) => Authenticator::Bearer {
                token: cx.secrets.resolve(&bearer.token).await?.into_bytes(),
            },
            WebhookAuth::Hmac(hmac) => Authenticator::Hmac {
                secret: cx.secrets.resolve(&hmac.secret).await?.into_bytes(),
                header: header_name(&hmac.header, "header")?,
                timestamp: match &hmac.timestamp {
                    Some(timestamp) => Some(TimestampRule::new(
                        header_name(&timestamp.header, "timestamp.header")?,
                        parse_duration(&timestamp.tolerance).as_secs(),
                        MAX_SEEN_SIGNATURES,
                    )),
                    None => {
                        tracing::warn!(
                            pipeline = %cx.pipeline,
                            path = %config.path,
                            "webhook HMAC signatures cover the body only, so a captured request can be replayed; set auth.hmac.timestamp to refuse replays"
                        );
                        None
                    }
                },
            },
            WebhookAuth::None(_) => Authenticator::None,
        };
        if matches!(&auth, Authenticator::Bearer { token } if token.is_empty()) {
            return Err(SourceError::Config(
                "the webhook bearer token is empty".to_string(),
            ));
        }
        let registration = server.register(Endpoint {
            path: config.path.clone(),
            pipeline: cx.pipeline.clone(),
            auth,
            max_body_bytes: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
            respond: match config.respond {
                Respond::AfterJob => server::Answer::AfterJob {
                    timeout: required_duration(
                        "webhook",
                        "responseTimeout",
                        &config.response_timeout,
                    )?,
                },
                Respond::OnReceipt => server::Answer::OnReceipt,
            },
            out: Mutex::new(None),
        })?;
        Ok(Box::new(WebhookRunner { registration }) as Box<dyn Source>)
    })
}

fn header_name(text: &str, field: &str) -> Result<HeaderName, SourceError> {
    HeaderName::try_from(text.trim()).map_err(|_| {
        SourceError::Config(format!(
            "webhook auth.hmac.{field} `{text}` is not a header name"
        ))
    })
}

/// A registered webhook path, waiting to be run.
struct WebhookRunner {
    registration: Registration,
}

impl Source for WebhookRunner {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            self.registration.attach(out);
            shutdown.cancelled().await;
            // Dropping the registration frees the path: later calls get 404.
            drop(self.registration);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(source: &WebhookSource) -> Vec<(String, String)> {
        let mut problems = Problems::new();
        source.validate("spec.source.webhook", &mut problems);
        problems.into_vec()
    }

    fn parse(value: Value) -> WebhookSource {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn hmac_without_timestamp_still_reads_and_stays_body_only() {
        let source = parse(json!({
            "path": "/hooks/a",
            "auth": {"hmac": {"secret": {"env": "S"}, "header": "X-Sig"}},
        }));
        let WebhookAuth::Hmac(hmac) = &source.auth else {
            panic!("{source:?}")
        };
        assert_eq!(hmac.timestamp, None);
        assert!(problems(&source).is_empty());
        // Written back, it has no `timestamp` key, so the stored resource does not change.
        let written = serde_json::to_value(&source).unwrap();
        assert!(
            written["auth"]["hmac"].get("timestamp").is_none(),
            "{written}"
        );
    }

    #[test]
    fn callers_are_answered_after_their_job_by_default_within_bounds() {
        let source = parse(json!({"path": "/hooks/a", "auth": {"none": {}}}));
        assert_eq!(source.respond, Respond::AfterJob);
        assert_eq!(source.response_timeout, "10s");
        assert!(problems(&source).is_empty());
        let on_receipt = parse(json!({
            "path": "/hooks/a", "auth": {"none": {}}, "respond": "onReceipt",
        }));
        assert_eq!(on_receipt.respond, Respond::OnReceipt);
        for (timeout, complaint) in [
            ("6m", "at most 5m"),
            ("0s", "longer than zero"),
            ("soon", "not a duration"),
        ] {
            let source = parse(json!({
                "path": "/hooks/a", "auth": {"none": {}}, "responseTimeout": timeout,
            }));
            let found = problems(&source);
            assert!(
                found.iter().any(
                    |(path, message)| path == "spec.source.webhook.responseTimeout"
                        && message.contains(complaint)
                ),
                "{timeout}: {found:?}"
            );
        }
    }

    #[test]
    fn an_empty_timestamp_takes_the_defaults() {
        let source = parse(json!({
            "path": "/hooks/a",
            "auth": {"hmac": {"secret": {"env": "S"}, "timestamp": {}}},
        }));
        let WebhookAuth::Hmac(hmac) = &source.auth else {
            panic!("{source:?}")
        };
        assert_eq!(hmac.timestamp, Some(HmacTimestamp::default()));
        assert_eq!(hmac.timestamp.as_ref().unwrap().header, "X-Spate-Timestamp");
        assert_eq!(hmac.timestamp.as_ref().unwrap().tolerance, "5m");
        assert!(problems(&source).is_empty());
        assert!(
            serde_json::from_value::<WebhookSource>(json!({
                "path": "/hooks/a",
                "auth": {"hmac": {"secret": {"env": "S"}, "timestamp": {"window": "5m"}}},
            }))
            .is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn timestamp_fields_are_validated() {
        let with = |header: &str, tolerance: &str| {
            problems(&parse(json!({
                "path": "/hooks/a",
                "auth": {"hmac": {
                    "secret": {"env": "S"},
                    "header": "X-Sig",
                    "timestamp": {"header": header, "tolerance": tolerance},
                }},
            })))
        };
        assert!(with("X-Ts", "30s").is_empty());
        assert!(with("X-Ts", "1h").is_empty());
        let at = "spec.source.webhook.auth.hmac.timestamp";
        for (header, tolerance, field) in [
            (" ", "5m", "header"),
            ("x-sig", "5m", "header"),
            ("X-Ts", "0s", "tolerance"),
            ("X-Ts", "500ms", "tolerance"),
            ("X-Ts", "2h", "tolerance"),
            ("X-Ts", "five minutes", "tolerance"),
        ] {
            let found = with(header, tolerance);
            assert_eq!(found.len(), 1, "{header:?} {tolerance:?}: {found:?}");
            assert_eq!(found[0].0, format!("{at}.{field}"), "{found:?}");
        }
    }
}
