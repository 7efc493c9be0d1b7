//! Result and dead-letter sinks for Spate.
//!
//! When a Job finishes, the tracker reports each of its items to the pipeline's result sinks;
//! items that could not be processed go to the dead-letter sink with the reason. Each kind is
//! one module (configuration, `validate()`, runtime); adding one is a module plus a variant
//! of [`SinkConfig`]. Any sink can serve as the dead-letter sink.

pub mod amqp;
pub mod kafka;
pub mod kubernetes_event;
pub mod nats;
pub mod object_store;
pub mod redis_streams;
pub mod webhook;

use std::sync::Arc;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spate_sources::check::Problems;
use spate_sources::secret::SecretResolver;

/// Exactly one sink kind.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SinkConfig {
    /// Publish to a NATS subject (with a JetStream ack when asked).
    Nats(nats::NatsSink),
    /// Publish to a RabbitMQ exchange with publisher confirms.
    Amqp(amqp::AmqpSink),
    /// A JSON-lines results manifest per batch, written to a bucket.
    ObjectStore(object_store::ObjectStoreSink),
    /// POST each record, retried with backoff.
    Webhook(webhook::WebhookSink),
    /// A Kubernetes Event on the Pipeline.
    KubernetesEvent(kubernetes_event::KubernetesEventSink),
    /// Append each record to a Redis stream (`XADD`).
    RedisStreams(redis_streams::RedisStreamsSink),
    /// Produce each record to a Kafka topic (idempotent producer, `acks=all`).
    Kafka(kafka::KafkaSink),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Nats(_) => "nats",
            SinkConfig::Amqp(_) => "amqp",
            SinkConfig::ObjectStore(_) => "objectStore",
            SinkConfig::Webhook(_) => "webhook",
            SinkConfig::KubernetesEvent(_) => "kubernetesEvent",
            SinkConfig::RedisStreams(_) => "redisStreams",
            SinkConfig::Kafka(_) => "kafka",
        }
    }

    /// Checks what the schema cannot express; `path` is where this sink sits in the file.
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let path = format!("{path}.{}", self.kind());
        match self {
            SinkConfig::Nats(config) => config.validate(&path, problems),
            SinkConfig::Amqp(config) => config.validate(&path, problems),
            SinkConfig::ObjectStore(config) => config.validate(&path, problems),
            SinkConfig::Webhook(config) => config.validate(&path, problems),
            SinkConfig::KubernetesEvent(_) => {}
            SinkConfig::RedisStreams(config) => config.validate(&path, problems),
            SinkConfig::Kafka(config) => config.validate(&path, problems),
        }
    }

    /// Connects the sink.
    pub fn build(&self, cx: &SinkContext) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
        match self {
            SinkConfig::Nats(config) => nats::build(config, cx),
            SinkConfig::Amqp(config) => amqp::build(config, cx),
            SinkConfig::ObjectStore(config) => object_store::build(config, cx),
            SinkConfig::Webhook(config) => webhook::build(config, cx),
            SinkConfig::KubernetesEvent(config) => kubernetes_event::build(config, cx),
            SinkConfig::RedisStreams(config) => redis_streams::build(config, cx),
            SinkConfig::Kafka(config) => kafka::build(config, cx),
        }
    }
}

/// How an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Succeeded,
    Failed,
    /// Could not be processed at all (bad event, template error, retries exhausted).
    DeadLettered,
}

/// One item's result, as every sink writes it (one JSON object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// `namespace/name` of the pipeline.
    pub pipeline: String,
    pub outcome: Outcome,
    /// The original event, exactly as the source delivered it.
    pub event: Value,
    /// The Job that ran it, if one was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Why it failed or was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339 time the outcome was known.
    pub at: String,
}

/// Each record as the JSON document sinks send, one per record.
pub(crate) fn encode(records: &[Record], kind: &'static str) -> Result<Vec<Vec<u8>>, SinkError> {
    records
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| SinkError::Delivery {
            kind,
            reason: format!("cannot serialise a record: {err}"),
        })
}

/// A connected sink.
pub trait Sink: Send + Sync {
    /// Delivers records durably (broker confirm, HTTP 2xx, object written) before returning.
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>>;
}

/// The pipeline a sink reports for, as the Kubernetes Event sink needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// What a sink gets from the process that runs it.
#[derive(Clone)]
pub struct SinkContext {
    pub pipeline: PipelineRef,
    pub secrets: Arc<dyn SecretResolver>,
    /// The cluster, for the Kubernetes Event sink.
    pub kube: Option<kube::Client>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] spate_sources::secret::SecretError),
    #[error("{kind} sink: {reason}")]
    Delivery { kind: &'static str, reason: String },
}
