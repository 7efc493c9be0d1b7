//! The AMQP sink after the broker dropped its connection (`rabbitmqctl
//! close_all_connections`). In its own test binary: it cuts every client of the broker, and
//! cargo runs test binaries one after another.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use spate_sinks::amqp::{AmqpSink, build};
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::secret::EnvSecrets;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn record(id: &str) -> Record {
    Record {
        pipeline: "tests/amqp-sink".to_string(),
        outcome: Outcome::Failed,
        event: json!({"id": id}),
        job: None,
        reason: Some("exit code 1".to_string()),
        at: "2026-11-23T11:00:00Z".to_string(),
    }
}

#[tokio::test]
async fn deliver_reconnects_after_the_broker_closed_the_connection() {
    let queue = format!("spate-test-sink-reconnect-{}", std::process::id());
    let config = AmqpSink {
        url: Some(URL.to_string()),
        url_from: None,
        exchange: String::new(),
        routing_key: queue.clone(),
    };
    let cx = SinkContext {
        pipeline: PipelineRef {
            namespace: "tests".to_string(),
            name: "amqp-sink".to_string(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    };
    {
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/services)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let sink = build(&config, &cx).await.unwrap();
    sink.deliver(&[record("before")]).await.unwrap();

    let status = tokio::process::Command::new("rabbitmqctl")
        .args(["close_all_connections", "spate sink reconnect test"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::time::timeout(Duration::from_secs(20), sink.deliver(&[record("after")]))
        .await
        .expect("deliver is bounded")
        .expect("deliver reconnects");

    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut ids = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let record: Record = serde_json::from_slice(&message.delivery.data).unwrap();
        ids.push(record.event["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids, ["before", "after"]);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}
