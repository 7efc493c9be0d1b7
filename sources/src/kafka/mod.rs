//! Kafka: a consumer group whose offsets are committed by Spate, per partition, only up to the
//! first record whose Job does not exist yet.
//!
//! Delivery guarantee: at-least-once. Jobs are created out of order, so a partition's
//! committed offset is a contiguous watermark (`offsets.rs`): every record below it has its
//! Job. A crash, a rebalance or a broker restart can deliver a record again, and its id
//! `<topic>:<partition>:<offset>` makes the copies one Job. This module holds the
//! configuration; `consumer.rs` the runtime, `record.rs` the mapping from record to event.

mod consumer;
mod offsets;
mod record;

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::check::{Problems, required_duration};
use crate::{Source, SourceContext, SourceError};

pub use offsets::Offsets;
pub use record::to_event;

/// librdkafka settings Spate sets itself: a pipeline setting them would break the delivery
/// guarantee (auto-commit) or contradict a field of its own.
const OWNED_PROPERTIES: [&str; 8] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "statistics.interval.ms",
    "enable.idempotence",
    "acks",
];

/// Connection security librdkafka was built without here: no OpenSSL (TLS, SCRAM) or Cyrus
/// SASL is compiled into Spate, so the only protocol is `plaintext`.
const SECURITY_PREFIXES: [&str; 3] = ["security.", "ssl.", "sasl."];

/// A Kafka topic read through a consumer group. Offsets are committed only once every record
/// below them has its Job.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSource {
    /// Bootstrap brokers as `host:port`, e.g. `["kafka-0.kafka:9092"]`.
    pub brokers: Vec<String>,
    /// The topic to read.
    pub topic: String,
    /// The consumer group; every Spate replica of the pipeline joins it, and Kafka splits the
    /// topic's partitions between them.
    pub group: String,
    /// Where a group with no committed offset starts: `earliest` (every record still in the
    /// topic) or `latest` (only records produced from now on).
    #[serde(default)]
    pub start_from: StartFrom,
    /// Hand-backs of one record (the engine could not create its Job and could not
    /// dead-letter it either) before it goes to `deadLetterTopic` with the reason.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Where records handed back more than `maxDeliveries` times go. Default:
    /// `<topic>.dead-letter`. (Records whose Job template fails go to the pipeline's
    /// dead-letter sink, which can be a `kafka` sink.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// How often the watermark of each partition is committed, e.g. `1s`.
    #[serde(default = "default_commit_interval")]
    pub commit_interval: String,
    /// When a rebalance takes partitions away, how long to wait for the Jobs of their records
    /// already handed to the engine before committing and letting go; records still without
    /// a Job then are read again by the new owner (and find their Job if it was created).
    #[serde(default = "default_rebalance_drain")]
    pub rebalance_drain: String,
    /// Further librdkafka consumer settings (`session.timeout.ms`, `fetch.max.bytes`, ...).
    /// Settings Spate owns (`group.id`, auto-commit, ...) and security settings are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// Where a new consumer group starts reading.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

fn default_max_deliveries() -> u32 {
    5
}

fn default_commit_interval() -> String {
    "1s".to_string()
}

fn default_rebalance_drain() -> String {
    "10s".to_string()
}

impl KafkaSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        check_brokers(&format!("{path}.brokers"), &self.brokers, problems);
        check_topic(&format!("{path}.topic"), &self.topic, problems);
        if self.group.trim().is_empty() {
            problems.push(format!("{path}.group"), "must name a consumer group");
        }
        if let Some(dead) = &self.dead_letter_topic {
            check_topic(&format!("{path}.deadLetterTopic"), dead, problems);
            if *dead == self.topic {
                problems.push(
                    format!("{path}.deadLetterTopic"),
                    "must differ from topic: dead letters would be read again",
                );
            }
        }
        problems.at_least(
            &format!("{path}.maxDeliveries"),
            u64::from(self.max_deliveries),
            1,
            "every record is delivered once",
        );
        problems.duration(&format!("{path}.commitInterval"), &self.commit_interval);
        problems.duration(&format!("{path}.rebalanceDrain"), &self.rebalance_drain);
        check_properties(&format!("{path}.properties"), &self.properties, problems);
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        json!({
            "id": format!("{}:0:42", self.topic),
            "topic": self.topic,
            "partition": 0,
            "offset": 42,
            "key": "a.jpg",
            "headers": {},
            "timestamp": "2024-01-01T00:00:00Z",
            "data": {}
        })
    }

    fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", self.topic))
    }
}

/// `host:port` entries, at least one.
pub fn check_brokers(path: &str, brokers: &[String], problems: &mut Problems) {
    if brokers.is_empty() {
        problems.push(
            path,
            "must list at least one broker as host:port, e.g. kafka:9092",
        );
    }
    for (index, broker) in brokers.iter().enumerate() {
        let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        }) && !broker.contains("://")
            && !broker.contains(',')
            && !broker.chars().any(char::is_whitespace);
        if !valid {
            problems.push(
                format!("{path}[{index}]"),
                format!("`{broker}` is not host:port (e.g. kafka-0.kafka:9092)"),
            );
        }
    }
}

/// Kafka's own rule: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic(path: &str, topic: &str, problems: &mut Problems) {
    let legal = topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if topic.is_empty() || topic.len() > 249 || !legal || topic == "." || topic == ".." {
        problems.push(
            path,
            format!(
                "`{topic}` is not a Kafka topic name: 1 to 249 characters of letters, digits, `.`, `_` and `-`"
            ),
        );
    }
}

/// Extra librdkafka settings: none that Spate owns, none it cannot honour.
pub fn check_properties(
    path: &str,
    properties: &BTreeMap<String, String>,
    problems: &mut Problems,
) {
    for name in properties.keys() {
        if OWNED_PROPERTIES.contains(&name.as_str()) {
            problems.push(
                format!("{path}.{name}"),
                "is set by Spate (from the source's own fields, or to keep its delivery guarantee)",
            );
        } else if SECURITY_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            problems.push(
                format!("{path}.{name}"),
                "TLS and SASL are not built into this Spate: reach Kafka over plaintext (a mesh or a sidecar can add mTLS)",
            );
        }
    }
}

/// The librdkafka settings every Spate client shares: brokers, a client id naming the
/// pipeline, the pipeline's extra properties, and logs routed to `tracing`.
pub fn client_config(
    brokers: &[String],
    pipeline: &str,
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers.join(","))
        .set("client.id", format!("spate:{pipeline}"))
        // librdkafka drops log lines below this level before they reach `tracing`; it would
        // otherwise follow the `log` crate's level, which nothing in Spate sets.
        .set_log_level(
            if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
                RDKafkaLogLevel::Debug
            } else {
                RDKafkaLogLevel::Warning
            },
        );
    for (name, value) in properties {
        config.set(name, value);
    }
    config
}

/// Builds the source; connecting happens in [`Source::run`], which retries, so a broker that
/// is briefly down at start-up does not fail the pipeline.
pub fn build(
    config: &KafkaSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let duration = |field, text| required_duration("kafka", field, text);
        Ok(Box::new(consumer::KafkaConsumer {
            dead_letter_topic: config.dead_letter_topic(),
            commit_interval: duration("commitInterval", &config.commit_interval)?,
            rebalance_drain: duration("rebalanceDrain", &config.rebalance_drain)?,
            config,
            pipeline: cx.pipeline,
            backlog: cx.backlog,
        }) as Box<dyn Source>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KafkaSource {
        serde_json::from_value(json!({
            "brokers": ["127.0.0.1:9092"], "topic": "uploads", "group": "thumbnails"
        }))
        .unwrap()
    }

    #[test]
    fn defaults_are_documented_ones() {
        let config = config();
        assert_eq!(config.start_from, StartFrom::Earliest);
        assert_eq!(config.max_deliveries, 5);
        assert_eq!(config.commit_interval, "1s");
        assert_eq!(config.rebalance_drain, "10s");
        assert_eq!(config.dead_letter_topic(), "uploads.dead-letter");
        let mut problems = Problems::new();
        config.validate("source.kafka", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn mistakes_are_reported_at_their_fields() {
        let mut config = config();
        config.brokers = vec![
            "kafka:9092".into(),
            "tcp://kafka:9092".into(),
            "kafka".into(),
            "kafka:0".into(),
        ];
        config.topic = "up loads".into();
        config.group = " ".into();
        config.dead_letter_topic = Some("up loads".into());
        config.max_deliveries = 0;
        config.commit_interval = "often".into();
        config.properties = BTreeMap::from([
            ("enable.auto.commit".to_string(), "true".to_string()),
            ("security.protocol".to_string(), "ssl".to_string()),
            ("fetch.max.bytes".to_string(), "1048576".to_string()),
        ]);
        let mut problems = Problems::new();
        config.validate("p", &mut problems);
        let fields: Vec<String> = problems.into_vec().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "p.brokers[1]",
                "p.brokers[2]",
                "p.brokers[3]",
                "p.topic",
                "p.group",
                "p.deadLetterTopic",
                "p.deadLetterTopic",
                "p.maxDeliveries",
                "p.commitInterval",
                "p.properties.enable.auto.commit",
                "p.properties.security.protocol",
            ]
        );
        let mut problems = Problems::new();
        check_brokers("b", &[], &mut problems);
        assert_eq!(problems.into_vec().len(), 1);
    }

    #[test]
    fn topic_names_follow_kafkas_rule() {
        for good in ["a", "uploads.v2", "a_b-c", &"x".repeat(249)] {
            let mut problems = Problems::new();
            check_topic("t", good, &mut problems);
            assert!(problems.is_empty(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "ü", "$share", &"x".repeat(250)] {
            let mut problems = Problems::new();
            check_topic("t", bad, &mut problems);
            assert!(!problems.is_empty(), "{bad}");
        }
    }
}
