//! The Redis Streams sink against the redis-server on 127.0.0.1:6379 (started with
//! `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no`).
//! Each test uses its own stream, named after the test and the process, and deletes it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;
use spate_sinks::redis_streams::{RedisStreamsSink, build};
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::check::Problems;
use spate_sources::secret::EnvSecrets;

const URL: &str = "redis://127.0.0.1:6379";

fn context() -> SinkContext {
    SinkContext {
        pipeline: PipelineRef {
            namespace: "tests".to_string(),
            name: "redis-sink".to_string(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    }
}

fn records(range: std::ops::Range<usize>) -> Vec<Record> {
    range
        .map(|i| Record {
            pipeline: "tests/redis-sink".to_string(),
            outcome: Outcome::Succeeded,
            event: json!({"id": format!("upload-{i}")}),
            job: Some(format!("job-{i}")),
            reason: None,
            at: "2026-11-23T11:00:00Z".to_string(),
        })
        .collect()
}

async fn connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis-server on 127.0.0.1:6379")
}

type Entries = Vec<(String, BTreeMap<String, String>)>;

#[tokio::test]
async fn each_record_is_one_entry_read_back_with_xrange() {
    let stream = format!("spate-test:sink:{}", std::process::id());
    let mut redis = connection().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    let config = RedisStreamsSink {
        url: Some(URL.to_string()),
        url_from: None,
        stream: stream.clone(),
        max_len: None,
    };
    let sink = build(&config, &context()).await.unwrap();
    let sent = records(0..3);
    sink.deliver(&sent).await.unwrap();
    sink.deliver(&records(3..5)).await.unwrap();

    let entries: Entries = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(entries.len(), 5);
    let first: Record = serde_json::from_str(&entries[0].1["data"]).unwrap();
    assert_eq!(first, sent[0]);
    let last: serde_json::Value = serde_json::from_str(&entries[4].1["data"]).unwrap();
    assert_eq!(last["event"]["id"], "upload-4");
    assert_eq!(last["outcome"], "succeeded");
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test]
async fn max_len_trims_the_stream_approximately() {
    let stream = format!("spate-test:sink-trim:{}", std::process::id());
    let mut redis = connection().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    let config = RedisStreamsSink {
        url: Some(URL.to_string()),
        url_from: None,
        stream: stream.clone(),
        max_len: Some(10),
    };
    let sink = build(&config, &context()).await.unwrap();
    for chunk in 0..10 {
        sink.deliver(&records(chunk * 100..chunk * 100 + 100))
            .await
            .unwrap();
    }
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    // `~` trims whole macro nodes (100 entries by default): far below 1,000, not exactly 10.
    assert!((10..=200).contains(&len), "{len} entries left");
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test]
async fn validation_names_the_fields() {
    let config = RedisStreamsSink {
        url: Some("http://127.0.0.1:6379".to_string()),
        url_from: None,
        stream: String::new(),
        max_len: Some(0),
    };
    let mut problems = Problems::new();
    config.validate("results[0].redisStreams", &mut problems);
    let fields: Vec<String> = problems.into_vec().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        [
            "results[0].redisStreams.url",
            "results[0].redisStreams.stream",
            "results[0].redisStreams.maxLen"
        ]
    );
}
