//! POSTs each record to a URL, retried with exponential backoff and jitter.
//!
//! Delivery guarantee: a record is delivered when the receiver answered 2xx. Failures that
//! another attempt can fix (connection errors, timeouts, 408, 429, 5xx) are retried up to
//! `maxAttempts`, waiting at least what `Retry-After` asks; any other answer is permanent.
//! Records of one call go out in order and the call stops at the first record that fails,
//! so the caller's retry may send the earlier ones again: receivers deduplicate on the
//! `Idempotency-Key` header (pipeline, event id and outcome).

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use spate_sources::check::HTTP_SCHEMES;
use spate_sources::check::Problems;
use spate_sources::secret::SecretValue;

use crate::{Record, Sink, SinkContext, SinkError};

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookSink {
    /// `http://` or `https://` URL to POST to.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SecretValue>,
    /// Attempts per record before giving up.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_attempts() -> u32 {
    5
}

impl WebhookSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url(&format!("{path}.url"), &self.url, &HTTP_SCHEMES);
        if self.max_attempts == 0 {
            problems.push(format!("{path}.maxAttempts"), "must be at least 1");
        }
    }
}

/// One attempt may take this long, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// The first backoff; each later one doubles, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A receiver asking for a longer pause than this gets this: a sink must not stall for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Connects the sink: resolves the token and prepares an HTTP(S) client.
pub fn build(
    config: &WebhookSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let url: Uri = config
            .url
            .parse()
            .map_err(|error| SinkError::Config(format!("webhook url `{}`: {error}", config.url)))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(SinkError::Config(format!(
                "webhook url `{}` must be http:// or https:// with a host",
                config.url
            )));
        }
        let authorization = match &config.bearer_token {
            Some(token) => {
                let token = cx.secrets.resolve(token).await?;
                let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    SinkError::Config("the webhook bearer token is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        // Reading the system's CA bundle is file I/O: keep it off the async workers.
        let connector = tokio::task::spawn_blocking(|| {
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
                .map(|builder| builder.https_or_http().enable_http1().build())
        })
        .await
        .map_err(|error| SinkError::Config(format!("cannot load CA certificates: {error}")))?
        .map_err(|error| SinkError::Config(format!("cannot load CA certificates: {error}")))?;
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Box::new(WebhookDelivery {
            url,
            authorization,
            max_attempts: config.max_attempts.max(1),
            client,
        }) as Box<dyn Sink>)
    })
}

struct WebhookDelivery {
    url: Uri,
    authorization: Option<HeaderValue>,
    max_attempts: u32,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// What one attempt ended with.
enum Attempt {
    Delivered,
    /// Worth another try, after at least the receiver's `Retry-After` if it gave one.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Permanent(String),
}

impl Sink for WebhookDelivery {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            for record in records {
                self.deliver_one(record).await?;
            }
            Ok(())
        })
    }
}

impl WebhookDelivery {
    async fn deliver_one(&self, record: &Record) -> Result<(), SinkError> {
        let body =
            Bytes::from(
                serde_json::to_vec(record).map_err(|error| SinkError::Delivery {
                    kind: "webhook",
                    reason: format!("cannot encode the record: {error}"),
                })?,
            );
        let key = idempotency_key(record);
        let mut attempt = 1;
        loop {
            let (reason, retry_after) = match self.attempt(&body, &key).await {
                Attempt::Delivered => return Ok(()),
                Attempt::Permanent(reason) => {
                    return Err(SinkError::Delivery {
                        kind: "webhook",
                        reason,
                    });
                }
                Attempt::Retry {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            if attempt >= self.max_attempts {
                return Err(SinkError::Delivery {
                    kind: "webhook",
                    reason: format!("{reason} (gave up after {attempt} attempts)"),
                });
            }
            let pause = backoff(attempt, retry_after);
            tracing::warn!(
                host = self.url.host().unwrap_or_default(),
                attempt,
                max_attempts = self.max_attempts,
                pause_ms = pause.as_millis() as u64,
                %reason,
                "webhook sink retrying"
            );
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, body: &Bytes, key: &str) -> Attempt {
        let mut request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key);
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        let request = match request.body(Full::new(body.clone())) {
            Ok(request) => request,
            Err(error) => return Attempt::Permanent(format!("cannot build the request: {error}")),
        };
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read the body so the connection can be reused; its content is not needed.
            let _ = response.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after))
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Err(_elapsed) => Attempt::Retry {
                reason: format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
                retry_after: None,
            },
            Ok(Err(error)) => Attempt::Retry {
                reason: format!("request failed: {error}"),
                retry_after: None,
            },
            Ok(Ok((status, retry_after))) => classify(status, retry_after),
        }
    }
}

fn classify(status: StatusCode, retry_after: Option<Duration>) -> Attempt {
    if status.is_success() {
        Attempt::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Attempt::Retry {
            reason: format!("the receiver answered {status}"),
            retry_after,
        }
    } else {
        Attempt::Permanent(format!("the receiver answered {status}"))
    }
}

/// Full jitter over an exponential ceiling, but never shorter than the receiver asked for.
fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        .min(MAX_BACKOFF);
    let jittered = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
    match retry_after {
        Some(asked) => asked.min(MAX_RETRY_AFTER).max(jittered),
        None => jittered,
    }
}

fn idempotency_key(record: &Record) -> String {
    let event = record
        .event
        .get("id")
        .and_then(|id| id.as_str())
        .unwrap_or_default();
    let outcome = match record.outcome {
        crate::Outcome::Succeeded => "succeeded",
        crate::Outcome::Failed => "failed",
        crate::Outcome::DeadLettered => "deadLettered",
    };
    // Header values must be visible ASCII; ids from sources usually are, but not always.
    format!("{}/{event}/{outcome}", record.pipeline)
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_answers_are_retried() {
        assert!(matches!(classify(StatusCode::OK, None), Attempt::Delivered));
        assert!(matches!(
            classify(StatusCode::ACCEPTED, None),
            Attempt::Delivered
        ));
        for status in [408, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                matches!(classify(status, None), Attempt::Retry { .. }),
                "{status}"
            );
        }
        for status in [301, 400, 401, 404, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                matches!(classify(status, None), Attempt::Permanent(_)),
                "{status}"
            );
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        for attempt in 1..40 {
            let pause = backoff(attempt, None);
            assert!(pause <= MAX_BACKOFF, "{attempt}: {pause:?}");
        }
        assert!(backoff(1, None) <= FIRST_BACKOFF);
        assert!(backoff(5, None) >= FIRST_BACKOFF * 4);
        assert!(backoff(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        assert_eq!(
            backoff(1, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }
}
