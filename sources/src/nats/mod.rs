//! NATS subjects: core subscriptions (at-most-once) or JetStream durable pull consumers
//! (at-least-once: ack after the Job exists, redelivery after ackWait, maxDeliver).
//!
//! This module holds the configuration; `consumer.rs` the runtime and both delivery
//! guarantees in detail, `message.rs` the mapping from message to event and its id.

mod consumer;
mod message;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::check::Problems;
use crate::check::{NATS_SCHEMES, check_subject};
use crate::{Source, SourceContext, SourceError};

/// A NATS subject; with `jetstream`, a durable pull consumer (at-least-once), otherwise a core
/// subscription (at-most-once: messages published while Spate is down are lost).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSource {
    /// `nats://host:4222` (or `tls://`).
    pub url: String,
    /// The subject, wildcards allowed (`uploads.>`).
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<JetStreamConsumer>,
}

/// A JetStream durable pull consumer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JetStreamConsumer {
    /// The stream holding the subject.
    pub stream: String,
    /// The durable consumer's name; it keeps its position across restarts.
    pub durable: String,
    /// How long a message may stay unacknowledged before redelivery, e.g. `30s`.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: String,
    /// Deliveries of a message without its Job being created; the next one goes to the
    /// dead-letter sink with the reason. `-1`: no limit.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
}

fn default_ack_wait() -> String {
    "30s".to_string()
}

fn default_max_deliver() -> i64 {
    5
}

impl NatsSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url(&format!("{path}.url"), &self.url, &NATS_SCHEMES);
        check_subject(problems, &format!("{path}.subject"), &self.subject, true);
        if let Some(jetstream) = &self.jetstream {
            for (field, name) in [
                ("stream", &jetstream.stream),
                ("durable", &jetstream.durable),
            ] {
                let invalid = name.is_empty()
                    || name
                        .chars()
                        .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
                if invalid {
                    problems.push(
                        format!("{path}.jetstream.{field}"),
                        format!(
                            "`{name}` is not a valid {field} name (no spaces, `.`, `*`, `>`, `/`)"
                        ),
                    );
                }
            }
            problems.duration(&format!("{path}.jetstream.ackWait"), &jetstream.ack_wait);
            if jetstream.max_deliver == 0 || jetstream.max_deliver < -1 {
                problems.push(
                    format!("{path}.jetstream.maxDeliver"),
                    "must be at least 1 (or -1 for unlimited)",
                );
            }
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        match &self.jetstream {
            None => {
                json!({"id": "sample-0001", "subject": self.subject, "headers": {}, "data": {}})
            }
            Some(jetstream) => json!({
                "id": format!("{}:1", jetstream.stream), "subject": self.subject,
                "stream": jetstream.stream, "sequence": 1, "headers": {}, "data": {}
            }),
        }
    }
}

/// Takes the credentials out of a NATS URL and hands them to the client as options: the
/// client logs the URL it dials (at debug level), so it must never hold them. `user:password@`
/// becomes a user and password, a lone `token@` a token, both percent-decoded.
pub fn without_credentials(
    url: &str,
    options: async_nats::ConnectOptions,
) -> (String, async_nats::ConnectOptions) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), options);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return (url.to_string(), options);
    };
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let options = match rest[..at].split_once(':') {
        Some((user, password)) => options.user_and_password(decode(user), decode(password)),
        None => options.token(decode(&rest[..at])),
    };
    (format!("{scheme}://{}", &rest[at + 1..]), options)
}

/// Returns the source; connecting happens in [`Source::run`], which retries, so a server
/// that is briefly down at start-up does not fail the pipeline.
pub fn build(
    config: &NatsSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let pipeline = cx.pipeline.clone();
    Box::pin(async move {
        let jetstream = match config.jetstream {
            None => None,
            Some(jetstream) => Some(consumer::JetStreamSettings {
                ack_wait: humantime::parse_duration(&jetstream.ack_wait).map_err(|err| {
                    SourceError::Config(format!(
                        "nats source: ackWait `{}`: {err}",
                        jetstream.ack_wait
                    ))
                })?,
                stream: jetstream.stream,
                durable: jetstream.durable,
                max_deliver: jetstream.max_deliver,
            }),
        };
        Ok(Box::new(consumer::NatsConsumer {
            url: config.url,
            subject: config.subject,
            jetstream,
            pipeline,
        }) as Box<dyn Source>)
    })
}
