//! RabbitMQ (AMQP 0-9-1) queues: manual acks after the Job exists, prefetch as
//! backpressure, poison messages to the queue's dead-letter exchange, reconnection.
//!
//! Delivery guarantee: at-least-once. A message may be delivered more than once (after a
//! reconnect, a `retry`, a crash before the ack), and its stable id makes the copies one Job. This module holds the configuration; `consumer.rs` the runtime, `message.rs` the
//! mapping from message to event. `backoff` and `payload` are shared with the NATS source and
//! the messaging sinks.

mod consumer;
mod message;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::check::{AMQP_SCHEMES, Problems};
use crate::secret::SecretValue;
use crate::{Source, SourceContext, SourceError};

/// The URL suggested when a pipeline names none.
pub const AMQP_EXAMPLE: &str = "amqp://127.0.0.1:5672/%2f";

/// A RabbitMQ queue. Messages are acknowledged only once their Job exists.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AmqpSource {
    /// `amqp://host:5672/vhost` (or `amqps://`). Put credentials in `urlFrom` instead of here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The whole URL, credentials included, from a Secret or the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The queue to consume.
    pub queue: String,
    /// Unacknowledged messages the broker hands Spate at once (AMQP QoS). This is what holds
    /// back a burst when the parallelism budget is full.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

fn default_prefetch() -> u16 {
    64
}

impl AmqpSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url_or_secret(
            path,
            self.url.as_deref(),
            self.url_from.is_some(),
            &AMQP_SCHEMES,
            AMQP_EXAMPLE,
        );
        if self.queue.trim().is_empty() {
            problems.push(format!("{path}.queue"), "must name a queue");
        }
        if self.prefetch == 0 {
            problems.push(
                format!("{path}.prefetch"),
                "must be at least 1: with 0 the broker would push without limit",
            );
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        json!({"id": "sample-0001", "subject": self.queue, "routingKey": self.queue, "exchange": "", "headers": {}, "data": {}})
    }
}

/// Resolves the URL and returns the source; connecting happens in [`Source::run`], which
/// retries, so a broker that is briefly down at start-up does not fail the pipeline.
pub fn build(
    config: &AmqpSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let url = resolve_url(&config.url, &config.url_from, &cx).await?;
        Ok(Box::new(consumer::AmqpConsumer {
            url,
            queue: config.queue,
            prefetch: config.prefetch,
            pipeline: cx.pipeline,
        }) as Box<dyn Source>)
    })
}

async fn resolve_url(
    url: &Option<String>,
    from: &Option<SecretValue>,
    cx: &SourceContext,
) -> Result<String, SourceError> {
    match (url, from) {
        (_, Some(secret)) => Ok(cx.secrets.resolve(secret).await?),
        (Some(url), None) => Ok(url.clone()),
        (None, None) => Err(SourceError::Config(
            "amqp source: set url or urlFrom".to_string(),
        )),
    }
}
