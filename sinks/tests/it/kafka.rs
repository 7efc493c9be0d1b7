//! The Kafka sink against tansu on 127.0.0.1:9092 (`scripts/kafka start`): each record is one
//! Kafka record, read back with a consumer; an unreachable cluster fails at start-up with its
//! address.

use crate::kafka_broker as kafka;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kafka::{BROKER, create_topic, ensure_broker, read, unique};
use serde_json::json;
use spate_sinks::kafka::{KafkaSink, build};
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext, SinkError};
use spate_sources::secret::EnvSecrets;

fn context() -> SinkContext {
    SinkContext {
        pipeline: PipelineRef {
            namespace: "tests".to_string(),
            name: "kafka-sink".to_string(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    }
}

fn record(i: usize, outcome: Outcome) -> Record {
    Record {
        pipeline: "tests/kafka-sink".to_string(),
        outcome,
        event: json!({"id": format!("upload-{i}")}),
        job: Some(format!("job-{i}")),
        reason: (outcome == Outcome::DeadLettered).then(|| "no such image".to_string()),
        at: "2026-11-23T11:00:00Z".to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_is_one_kafka_record_keyed_by_its_event() {
    ensure_broker();
    let topic = unique("sink");
    create_topic(BROKER, &topic, 2).await;
    let config: KafkaSink =
        serde_json::from_value(json!({"brokers": [BROKER], "topic": topic})).unwrap();
    let sink = build(&config, &context()).await.unwrap();
    let mut records: Vec<Record> = (0..20).map(|i| record(i, Outcome::Succeeded)).collect();
    records.push(record(20, Outcome::DeadLettered));
    sink.deliver(&records).await.unwrap();

    let read = read(BROKER, &topic, 21, Duration::from_secs(30));
    let keys: BTreeSet<String> = read.iter().filter_map(|r| r.key.clone()).collect();
    let expected: BTreeSet<String> = (0..21).map(|i| format!("upload-{i}")).collect();
    assert_eq!(keys, expected);
    let dead = read
        .iter()
        .find(|r| r.key.as_deref() == Some("upload-20"))
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&dead.value).unwrap();
    assert_eq!(value["reason"], "no such image");
    assert!(
        dead.headers
            .contains(&("spate.outcome".to_string(), "deadLettered".to_string()))
    );
    assert!(
        dead.headers
            .contains(&("spate.pipeline".to_string(), "tests/kafka-sink".to_string()))
    );
}

#[tokio::test]
async fn an_unreachable_cluster_fails_at_start_up_with_its_address() {
    // Nothing listens on port 1 of loopback.
    let config: KafkaSink = serde_json::from_value(
        json!({"brokers": ["127.0.0.1:1"], "topic": "results", "timeout": "2s"}),
    )
    .unwrap();
    match build(&config, &context()).await {
        Err(SinkError::Connect { address, .. }) => assert_eq!(address, "127.0.0.1:1"),
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("a sink with no reachable broker was built"),
    }
}
