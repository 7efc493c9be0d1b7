//! Redis Streams: a consumer group read with `XREADGROUP`, entries acknowledged (`XACK`) only
//! once their Job exists, entries stuck on a dead consumer reclaimed with `XAUTOCLAIM`, and
//! entries delivered more than `maxDeliveries` times dead-lettered to a stream.
//!
//! Delivery guarantee: at-least-once. An entry may be delivered more than once (after a
//! reconnect, a reclaim, a crash before the `XACK`), and its id `<stream>:<entry id>` makes
//! the copies one Job. This module holds the configuration; `consumer.rs` the runtime,
//! `entry.rs` the mapping from entry to event.

mod consumer;
mod entry;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::check::{Problems, required_duration};
use crate::secret::SecretValue;
use crate::{Source, SourceContext, SourceError};

pub use entry::to_event;

/// URL schemes of Redis: plain TCP and TLS.
pub const REDIS_SCHEMES: [&str; 2] = ["redis", "rediss"];
/// The URL suggested when a pipeline names none.
pub const REDIS_EXAMPLE: &str = "redis://127.0.0.1:6379";

/// A Redis stream read through a consumer group. Entries are acknowledged (`XACK`) only once
/// their Job exists.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisStreamsSource {
    /// `redis://host:6379/0` (or `rediss://` for TLS). Put credentials in `urlFrom` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The whole URL, credentials included (`redis://user:password@host:6379/0`), from a
    /// Secret or the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The stream's key.
    pub stream: String,
    /// The consumer group; every Spate replica of the pipeline reads through the same group,
    /// so each entry goes to one of them.
    pub group: String,
    /// This reader's name in the group. Default: `<hostname>-<pid>`. A fixed name lets a
    /// restarted reader re-read its own unacknowledged entries at once instead of waiting for
    /// `claimIdle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Create the group (and the stream) when missing, reading from the stream's first entry
    /// (`XGROUP CREATE <stream> <group> 0 MKSTREAM`). With `false` a missing group is an error.
    #[serde(default = "default_true")]
    pub create_group: bool,
    /// The most entries one `XREADGROUP` asks for (`COUNT`); fewer when the engine has less
    /// room.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// How long one `XREADGROUP` waits on an idle stream (`BLOCK`), e.g. `5s`.
    #[serde(default = "default_block")]
    pub block: String,
    /// Entries pending (delivered, not acknowledged) longer than this on any consumer of the
    /// group, e.g. one that crashed, are taken over with `XAUTOCLAIM` and delivered again.
    /// Must exceed the time to create a Job under load.
    #[serde(default = "default_claim_idle")]
    pub claim_idle: String,
    /// Deliveries of an entry before it is dead-lettered: an entry about to be delivered more
    /// often is added to `deadLetterStream` with the reason, then acknowledged.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u64,
    /// Where entries delivered more than `maxDeliveries` times go. Default:
    /// `<stream>:dead-letter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_stream: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_batch() -> u32 {
    100
}

fn default_block() -> String {
    "5s".to_string()
}

fn default_claim_idle() -> String {
    "60s".to_string()
}

fn default_max_deliveries() -> u64 {
    5
}

impl RedisStreamsSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url_or_secret(
            path,
            self.url.as_deref(),
            self.url_from.is_some(),
            &REDIS_SCHEMES,
            REDIS_EXAMPLE,
        );
        for (field, value) in [("stream", &self.stream), ("group", &self.group)] {
            if value.trim().is_empty() {
                problems.push(format!("{path}.{field}"), format!("must name a {field}"));
            }
        }
        if let Some(consumer) = &self.consumer
            && consumer.trim().is_empty()
        {
            problems.push(
                format!("{path}.consumer"),
                "must not be empty (leave it out for <hostname>-<pid>)",
            );
        }
        if let Some(dead) = &self.dead_letter_stream {
            if dead.trim().is_empty() {
                problems.push(format!("{path}.deadLetterStream"), "must name a stream");
            } else if *dead == self.stream {
                problems.push(
                    format!("{path}.deadLetterStream"),
                    "must differ from stream: dead letters would be read again",
                );
            }
        }
        if self.batch == 0 {
            problems.push(
                format!("{path}.batch"),
                "must be at least 1 (the COUNT of each XREADGROUP)",
            );
        }
        problems.duration(&format!("{path}.block"), &self.block);
        problems.duration(&format!("{path}.claimIdle"), &self.claim_idle);
        if self.max_deliveries == 0 {
            problems.push(
                format!("{path}.maxDeliveries"),
                "must be at least 1: every entry is delivered once",
            );
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        json!({
            "id": format!("{}:1700000000000-0", self.stream),
            "stream": self.stream,
            "entryId": "1700000000000-0",
            "fields": {"data": "{}"},
            "data": {}
        })
    }

    fn dead_letter_stream(&self) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{}:dead-letter", self.stream))
    }
}

/// Resolves `url` or `urlFrom`; shared with the Redis sink.
pub async fn resolve_url(
    url: &Option<String>,
    from: &Option<SecretValue>,
    secrets: &dyn crate::secret::SecretResolver,
) -> Result<String, SourceError> {
    match (url, from) {
        (_, Some(secret)) => Ok(secrets.resolve(secret).await?),
        (Some(url), None) => Ok(url.clone()),
        (None, None) => Err(SourceError::Config(
            "redisStreams: set url or urlFrom".to_string(),
        )),
    }
}

/// `<hostname>-<pid>`: unique per process on a host, stable for a pod's container restarts
/// when the process is PID 1.
pub fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|host| host.trim().to_string())
                .filter(|host| !host.is_empty())
        })
        .unwrap_or_else(|| "spate".to_string());
    format!("{host}-{}", std::process::id())
}

/// Resolves the URL and returns the source; connecting happens in [`Source::run`], which
/// retries, so a server that is briefly down at start-up does not fail the pipeline.
pub fn build(
    config: &RedisStreamsSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let url = resolve_url(&config.url, &config.url_from, cx.secrets.as_ref()).await?;
        let client = redis::Client::open(url.as_str()).map_err(|err| {
            SourceError::Config(format!(
                "redisStreams: url {}: {err}",
                crate::redact::url(&url)
            ))
        })?;
        let duration = |field, text| required_duration("redisStreams", field, text);
        let block = duration("block", &config.block)?;
        let claim_idle = duration("claimIdle", &config.claim_idle)?;
        Ok(Box::new(consumer::StreamConsumer {
            client,
            address: crate::redact::url(&url),
            dead_letter_stream: config.dead_letter_stream(),
            consumer: config.consumer.unwrap_or_else(default_consumer_name),
            stream: config.stream,
            group: config.group,
            create_group: config.create_group,
            batch: config.batch.max(1) as usize,
            block,
            claim_idle,
            max_deliveries: config.max_deliveries.max(1),
            pipeline: cx.pipeline,
            backlog: cx.backlog,
        }) as Box<dyn Source>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RedisStreamsSource {
        serde_json::from_value(
            json!({"url": "redis://127.0.0.1:6379", "stream": "s", "group": "g"}),
        )
        .unwrap()
    }

    #[test]
    fn defaults_are_documented_ones() {
        let config = config();
        assert!(config.create_group);
        assert_eq!(config.batch, 100);
        assert_eq!(config.block, "5s");
        assert_eq!(config.claim_idle, "60s");
        assert_eq!(config.max_deliveries, 5);
        assert_eq!(config.dead_letter_stream(), "s:dead-letter");
        let mut problems = Problems::new();
        config.validate("source.redisStreams", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn mistakes_are_reported_at_their_fields() {
        let mut config = config();
        config.url = Some("http://127.0.0.1:6379".to_string());
        config.stream = " ".to_string();
        config.batch = 0;
        config.block = "soon".to_string();
        config.max_deliveries = 0;
        let mut problems = Problems::new();
        config.validate("p", &mut problems);
        let fields: Vec<String> = problems.into_vec().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["p.url", "p.stream", "p.batch", "p.block", "p.maxDeliveries"]
        );
    }
}
