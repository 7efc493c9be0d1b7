//! The AMQP sink against the RabbitMQ on 127.0.0.1:5672 (`scripts/services` starts it).

use std::sync::Arc;

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::json;
use spate_sinks::amqp::{AmqpSink, build};
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::secret::EnvSecrets;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn context() -> SinkContext {
    SinkContext {
        pipeline: PipelineRef {
            namespace: "tests".to_string(),
            name: "amqp-sink".to_string(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    }
}

fn records(count: usize) -> Vec<Record> {
    (0..count)
        .map(|i| Record {
            pipeline: "tests/amqp-sink".to_string(),
            outcome: Outcome::Succeeded,
            event: json!({"id": format!("upload-{i}"), "data": {"key": format!("{i}.jpg")}}),
            job: Some(format!("thumbnail-{i}")),
            reason: None,
            at: "2026-11-23T11:00:00Z".to_string(),
        })
        .collect()
}

async fn channel() -> (Connection, Channel) {
    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/services)");
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

#[tokio::test]
async fn confirmed_records_are_in_the_queue_as_json() {
    let queue = format!("spate-test-sink-{}", std::process::id());
    let (_connection, channel) = channel().await;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let config = AmqpSink {
        url: Some(URL.to_string()),
        url_from: None,
        exchange: String::new(),
        routing_key: queue.clone(),
    };
    let sink = build(&config, &context()).await.unwrap();
    let sent = records(3);
    sink.deliver(&sent).await.unwrap();

    // Confirmed means stored: the messages are there as soon as deliver returns.
    for record in &sent {
        let message = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a confirmed record");
        let received: Record = serde_json::from_slice(&message.delivery.data).unwrap();
        assert_eq!(&received, record);
        assert_eq!(message.delivery.properties.delivery_mode(), &Some(2));
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_record_no_queue_would_receive_is_an_error_not_a_silent_drop() {
    let config = AmqpSink {
        url: Some(URL.to_string()),
        url_from: None,
        exchange: String::new(),
        routing_key: format!("spate-test-no-such-queue-{}", std::process::id()),
    };
    let sink = build(&config, &context()).await.unwrap();
    let err = sink.deliver(&records(1)).await.unwrap_err();
    assert!(err.to_string().contains("no queue is bound"), "{err}");
}

#[tokio::test]
async fn a_wrong_password_fails_at_build() {
    let config = AmqpSink {
        url: Some("amqp://guest:wrong@127.0.0.1:5672/%2f".to_string()),
        url_from: None,
        exchange: String::new(),
        routing_key: "anything".to_string(),
    };
    let err = match build(&config, &context()).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(err) => err.to_string(),
    };
    assert!(!err.contains("wrong"), "no password in {err}");
}
