//! The NATS sink against the nats-server with JetStream on 127.0.0.1:4222
//! (`scripts/services` starts it).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use serde_json::json;
use spate_sinks::nats::{NatsSink, build};
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::secret::EnvSecrets;
use tokio::time::timeout;

const URL: &str = "nats://127.0.0.1:4222";

fn context() -> SinkContext {
    SinkContext {
        pipeline: PipelineRef {
            namespace: "tests".to_string(),
            name: "nats-sink".to_string(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    }
}

fn records(count: usize) -> Vec<Record> {
    (0..count)
        .map(|i| Record {
            pipeline: "tests/nats-sink".to_string(),
            outcome: Outcome::DeadLettered,
            event: json!({"id": format!("upload-{i}")}),
            job: None,
            reason: Some("template error".to_string()),
            at: "2026-11-23T11:00:00Z".to_string(),
        })
        .collect()
}

async fn client() -> async_nats::Client {
    async_nats::connect(URL)
        .await
        .expect("nats-server on 127.0.0.1:4222 (run scripts/services)")
}

#[tokio::test]
async fn core_publishes_reach_a_subscriber() {
    let subject = format!("spate.test.{}.sink.core", std::process::id());
    let subscriber_client = client().await;
    let mut subscriber = subscriber_client.subscribe(subject.clone()).await.unwrap();
    subscriber_client.flush().await.unwrap();

    let config = NatsSink {
        url: URL.to_string(),
        subject: subject.clone(),
        jetstream: false,
    };
    let sink = build(&config, &context()).await.unwrap();
    let sent = records(2);
    sink.deliver(&sent).await.unwrap();
    for record in &sent {
        let message = timeout(Duration::from_secs(5), subscriber.next())
            .await
            .expect("a record within 5s")
            .unwrap();
        let received: Record = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(&received, record);
    }
}

#[tokio::test]
async fn jetstream_publishes_are_stored_once_even_when_sent_again() {
    let context_js = jetstream::new(client().await);
    let name = format!("SPATE_SINK_{}", std::process::id());
    let subject = format!("spate.test.{}.sink.js", std::process::id());
    context_js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..stream::Config::default()
        })
        .await
        .unwrap();
    let config = NatsSink {
        url: URL.to_string(),
        subject: subject.clone(),
        jetstream: true,
    };
    let sink = build(&config, &context()).await.unwrap();
    let sent = records(3);
    sink.deliver(&sent).await.unwrap();
    // A retry after a lost acknowledgement publishes the same records again.
    sink.deliver(&sent).await.unwrap();

    let mut stored = context_js.get_stream(&name).await.unwrap();
    assert_eq!(stored.info().await.unwrap().state.messages, 3);
    for (sequence, record) in (1..).zip(&sent) {
        let message = stored.get_raw_message(sequence).await.unwrap();
        let received: Record = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(&received, record);
    }
    context_js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn jetstream_without_a_stream_fails_after_bounded_retries() {
    let config = NatsSink {
        url: URL.to_string(),
        subject: format!("spate.test.{}.sink.nostream", std::process::id()),
        jetstream: true,
    };
    let sink = build(&config, &context()).await.unwrap();
    let err = timeout(Duration::from_secs(30), sink.deliver(&records(1)))
        .await
        .expect("bounded")
        .unwrap_err();
    assert!(err.to_string().contains("failed 5 times"), "{err}");
}
