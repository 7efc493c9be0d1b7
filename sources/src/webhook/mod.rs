//! Webhooks: a path per pipeline on the process's shared HTTP server, bearer-token or
//! HMAC-SHA256 authentication, a body size limit, and `202 Accepted` only once the event is
//! handed to the engine.
//!
//! Delivery guarantee: `202` means "Spate has it" — the event is in the engine's channel, in
//! memory. HTTP has no way to settle later with a caller that already has its answer, so the
//! event's [`crate::Ack`] only logs; a crash between `202` and the Job's creation loses the
//! event. Callers that need more send an `Idempotency-Key` (or `X-Request-Id`) and retry on
//! any non-`202`: the key is the event id, so a retried call maps to the same Job instead of
//! a second one. Every other answer (`401`, `400`, `413`, `408`, `503` with `Retry-After`)
//! means Spate does not have the event.

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

use crate::check::Problems;
use crate::secret::SecretValue;
use crate::{Delivery, Source, SourceContext, SourceError};
use auth::Authenticator;
use server::{Endpoint, Registration};
pub use server::{WebhookServer, WebhookServerConfig};

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
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

/// How a webhook caller proves who it is.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WebhookAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(BearerAuth),
    /// An HMAC-SHA256 of the body, hex, in a header (GitHub style `sha256=<hex>` accepted).
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
}

fn default_signature_header() -> String {
    "X-Spate-Signature".to_string()
}

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
        if let WebhookAuth::Hmac(hmac) = &self.auth
            && hmac.header.trim().is_empty()
        {
            problems.push(format!("{path}.auth.hmac.header"), "must name a header");
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
                header: HeaderName::try_from(hmac.header.trim()).map_err(|_| {
                    SourceError::Config(format!(
                        "webhook auth.hmac.header `{}` is not a header name",
                        hmac.header
                    ))
                })?,
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
            out: Mutex::new(None),
        })?;
        Ok(Box::new(WebhookRunner { registration }) as Box<dyn Source>)
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
