//! Event sources for Spate.
//!
//! A source turns something happening outside the cluster (an object landing in a bucket, a
//! message on a queue, a cron tick, a webhook call) into [`Event`]s, delivered with an
//! [`Ack`] that the engine settles only once the event's Job exists.
//!
//! Each kind is one module holding its configuration (serde + JSON schema, documented
//! fields and defaults), its `validate()`, its sample event and its runtime. Adding a kind is
//! one module plus one variant of [`SourceConfig`].

pub mod amqp;
pub mod backlog;
pub mod backoff;
pub mod check;
pub mod checkpoint;
pub mod cron;
mod event;
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod object_store;
pub mod payload;
pub mod redact;
pub mod redis_streams;
pub mod secret;
mod source;
pub mod webhook;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use event::{Event, EventError};
pub use source::{Ack, Delivery, Settle, Source, SourceContext, SourceError};

use check::Problems;

/// Exactly one event source.
// One value per pipeline, read at start-up: boxing variants would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SourceConfig {
    /// Objects in a bucket: S3 and S3-compatible stores, GCS, Azure Blob, a local folder.
    ObjectStore(object_store::ObjectStoreSource),
    /// Messages on a RabbitMQ (AMQP 0-9-1) queue.
    Amqp(amqp::AmqpSource),
    /// Messages on a NATS subject, optionally through a JetStream durable consumer.
    Nats(nats::NatsSource),
    /// Messages on an MQTT topic filter, through a persistent session (QoS 1: at-least-once).
    Mqtt(mqtt::MqttSource),
    /// Ticks of a cron schedule.
    Cron(cron::CronSource),
    /// HTTP requests to a path on Spate's webhook server.
    Webhook(webhook::WebhookSource),
    /// Entries of a Redis stream, read through a consumer group (at-least-once).
    RedisStreams(redis_streams::RedisStreamsSource),
    /// Records of a Kafka topic, read through a consumer group (at-least-once).
    Kafka(kafka::KafkaSource),
}

impl SourceConfig {
    /// The kind's name as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::ObjectStore(_) => "objectStore",
            SourceConfig::Amqp(_) => "amqp",
            SourceConfig::Nats(_) => "nats",
            SourceConfig::Mqtt(_) => "mqtt",
            SourceConfig::Cron(_) => "cron",
            SourceConfig::Webhook(_) => "webhook",
            SourceConfig::RedisStreams(_) => "redisStreams",
            SourceConfig::Kafka(_) => "kafka",
        }
    }

    /// Checks what the schema cannot express; `path` is where this source sits in the file.
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let path = format!("{path}.{}", self.kind());
        match self {
            SourceConfig::ObjectStore(config) => config.validate(&path, problems),
            SourceConfig::Amqp(config) => config.validate(&path, problems),
            SourceConfig::Nats(config) => config.validate(&path, problems),
            SourceConfig::Mqtt(config) => config.validate(&path, problems),
            SourceConfig::Cron(config) => config.validate(&path, problems),
            SourceConfig::Webhook(config) => config.validate(&path, problems),
            SourceConfig::RedisStreams(config) => config.validate(&path, problems),
            SourceConfig::Kafka(config) => config.validate(&path, problems),
        }
    }

    /// An event as this source will produce it, to check templates before any event arrives.
    pub fn sample_event(&self) -> Value {
        match self {
            SourceConfig::ObjectStore(config) => config.sample_event(),
            SourceConfig::Amqp(config) => config.sample_event(),
            SourceConfig::Nats(config) => config.sample_event(),
            SourceConfig::Mqtt(config) => config.sample_event(),
            SourceConfig::Cron(config) => config.sample_event(),
            SourceConfig::Webhook(config) => config.sample_event(),
            SourceConfig::RedisStreams(config) => config.sample_event(),
            SourceConfig::Kafka(config) => config.sample_event(),
        }
    }

    /// Connects the source.
    pub fn build(
        &self,
        cx: &SourceContext,
    ) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
        match self {
            SourceConfig::ObjectStore(config) => object_store::build(config, cx),
            SourceConfig::Amqp(config) => amqp::build(config, cx),
            SourceConfig::Nats(config) => nats::build(config, cx),
            SourceConfig::Mqtt(config) => mqtt::build(config, cx),
            SourceConfig::Cron(config) => cron::build(config, cx),
            SourceConfig::Webhook(config) => webhook::build(config, cx),
            SourceConfig::RedisStreams(config) => redis_streams::build(config, cx),
            SourceConfig::Kafka(config) => kafka::build(config, cx),
        }
    }
}
