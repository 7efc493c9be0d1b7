//! Produces records to a Kafka topic through an idempotent producer, one Kafka record per
//! Spate record: its JSON as the value, the event id as the key (so one event's results stay
//! in one partition, in order), and `spate.pipeline` / `spate.outcome` headers.
//!
//! At-least-once: `deliver` returns once the broker has acknowledged every record of the
//! batch (`acks=all`). The idempotent producer keeps librdkafka's own retries from writing a
//! record twice; a batch that fails as a whole (the broker down longer than `timeout`) is
//! retried by the engine, and may then repeat records already written.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use spate_sources::check::{Problems, parse_duration};
use spate_sources::kafka::{check_brokers, check_properties, check_topic, client_config};

use crate::{Outcome, Record, Sink, SinkContext, SinkError};

/// How long start-up waits for the brokers to describe the topic.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Produce each record to a Kafka topic.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSink {
    /// Bootstrap brokers as `host:port`.
    pub brokers: Vec<String>,
    /// The topic to produce to.
    pub topic: String,
    /// How long one batch may take, librdkafka's retries included, before `deliver` fails,
    /// e.g. `30s`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Further librdkafka producer settings (`compression.type`, `linger.ms`, ...). Settings
    /// Spate owns (idempotence, acks) and security settings are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

fn default_timeout() -> String {
    "30s".to_string()
}

impl KafkaSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        check_brokers(&format!("{path}.brokers"), &self.brokers, problems);
        check_topic(&format!("{path}.topic"), &self.topic, problems);
        problems.duration(&format!("{path}.timeout"), &self.timeout);
        check_properties(&format!("{path}.properties"), &self.properties, problems);
    }
}

/// Creates the producer and asks the brokers about the topic, so an unreachable cluster
/// fails the pipeline at start-up with its address rather than at its first result.
pub fn build(
    config: &KafkaSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let pipeline = format!("{}/{}", cx.pipeline.namespace, cx.pipeline.name);
    Box::pin(async move {
        // Validated with the pipeline: a duration longer than zero.
        let timeout = parse_duration(&config.timeout);
        let address = config.brokers.join(",");
        let producer: FutureProducer =
            client_config(&config.brokers, &pipeline, &config.properties)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("message.timeout.ms", timeout.as_millis().to_string())
                .create()
                .map_err(|err| {
                    SinkError::Config(format!("kafka: cannot configure the producer: {err}"))
                })?;
        let probe = producer.clone();
        let topic = config.topic.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
        })
        .await
        .map_err(|err| SinkError::Connect {
            address: address.clone(),
            reason: err.to_string(),
        })?
        .map_err(|err| SinkError::Connect {
            address: address.clone(),
            reason: err.to_string(),
        })?;
        Ok(Box::new(KafkaProducer {
            producer,
            topic: config.topic,
            pipeline,
            timeout,
        }) as Box<dyn Sink>)
    })
}

struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
    pipeline: String,
    timeout: Duration,
}

impl Sink for KafkaProducer {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let payloads = crate::encode(records, "kafka")?;
            let sends = records.iter().zip(&payloads).map(|(record, payload)| {
                let key = record
                    .event
                    .get("id")
                    .and_then(|id| id.as_str())
                    .unwrap_or_default()
                    .to_string();
                let headers = OwnedHeaders::new_with_capacity(2)
                    .insert(Header {
                        key: "spate.pipeline",
                        value: Some(self.pipeline.as_str()),
                    })
                    .insert(Header {
                        key: "spate.outcome",
                        value: Some(outcome_name(record.outcome)),
                    });
                async move {
                    let out = FutureRecord::to(&self.topic)
                        .key(key.as_str())
                        .payload(payload.as_slice())
                        .headers(headers);
                    self.producer
                        .send(out, self.timeout)
                        .await
                        .map(|_| ())
                        .map_err(|(err, _)| err)
                }
            });
            let failures: Vec<String> = futures::future::join_all(sends)
                .await
                .into_iter()
                .filter_map(|sent| sent.err().map(|err| err.to_string()))
                .collect();
            match failures.first() {
                None => Ok(()),
                Some(first) => Err(SinkError::Delivery {
                    kind: "kafka",
                    reason: format!(
                        "{} of {} records not acknowledged by topic {}: {first}",
                        failures.len(),
                        records.len(),
                        self.topic
                    ),
                }),
            }
        })
    }
}

fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::DeadLettered => "deadLettered",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_mistakes() {
        let sink: KafkaSink =
            serde_json::from_value(json!({"brokers": ["127.0.0.1:9092"], "topic": "results"}))
                .unwrap();
        assert_eq!(sink.timeout, "30s");
        let mut problems = Problems::new();
        sink.validate("sink.kafka", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let sink: KafkaSink = serde_json::from_value(json!({
            "brokers": ["kafka"], "topic": "a b", "timeout": "0s",
            "properties": {"acks": "1"}
        }))
        .unwrap();
        let mut problems = Problems::new();
        sink.validate("s", &mut problems);
        let fields: Vec<String> = problems.into_vec().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            ["s.brokers[0]", "s.topic", "s.timeout", "s.properties.acks"]
        );
    }
}
