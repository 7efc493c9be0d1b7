//! Talking to the test broker (tansu on 127.0.0.1:9092, started by `scripts/kafka start`):
//! topics, records and committed offsets. Shared by the source, sink and engine tests
//! (`#[path]`-included), so each test reads the broker the same way.

#![allow(dead_code)] // each including test uses part of it

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

pub const BROKER: &str = "127.0.0.1:9092";
const TIMEOUT: Duration = Duration::from_secs(15);

/// Starts the broker unless it answers (building it first on a machine without it).
pub fn ensure_broker() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka");
    let status = Command::new(script)
        .arg("start")
        .status()
        .expect("run scripts/kafka");
    assert!(status.success(), "scripts/kafka start failed");
}

/// A name unique to this test process, e.g. `spate-burst-12345`.
pub fn unique(name: &str) -> String {
    format!("spate-{name}-{}", std::process::id())
}

fn config(broker: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker);
    config
}

/// Creates `topic` with `partitions` partitions (an existing one is left as it is).
pub async fn create_topic(broker: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config(broker).create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await
        .expect("create topics");
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => panic!("creating topic {name}: {code}"),
        }
    }
}

/// One record per batch: tansu 0.6 answers a fetch that starts inside a stored batch with
/// nothing, forever, so a consumer resuming from a committed offset in the middle of a batch
/// would stall. Kafka serves such fetches; single-record batches keep the tests about Spate.
pub fn producer(broker: &str) -> FutureProducer {
    config(broker)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap()
}

/// Produces `count` records `{"n": i}` spread over the partitions by key; returns the event
/// ids they become (`topic:partition:offset`).
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    from: usize,
    count: usize,
) -> Vec<String> {
    let sends = (from..from + count).map(|n| {
        let key = format!("key-{n}");
        let payload = format!(r#"{{"n":{n}}}"#);
        async move {
            let delivered = producer
                .send(FutureRecord::to(topic).key(&key).payload(&payload), TIMEOUT)
                .await
                .map_err(|(err, _)| err)
                .expect("produce");
            format!("{topic}:{}:{}", delivered.partition, delivered.offset)
        }
    });
    let ids = futures::future::join_all(sends).await;
    producer.flush(TIMEOUT).unwrap();
    ids
}

/// The group's committed offset of each partition (`-1` for none), by partition.
pub fn committed(broker: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = config(broker).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(list, TIMEOUT)
        .expect("committed offsets");
    (0..partitions)
        .map(|partition| {
            match committed
                .find_partition(topic, partition)
                .map(|element| element.offset())
            {
                Some(Offset::Offset(offset)) => offset,
                _ => -1,
            }
        })
        .collect()
}

/// The high watermark (next offset) of each partition.
pub fn high_watermarks(broker: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = config(broker).create().unwrap();
    (0..partitions)
        .map(|partition| {
            consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .expect("watermarks")
                .1
        })
        .collect()
}

/// A record read back, for the dead-letter and sink checks.
#[derive(Debug)]
pub struct ReadRecord {
    pub key: Option<String>,
    pub value: String,
    pub headers: Vec<(String, String)>,
}

/// Reads `count` records of `topic` from the beginning (without a group), or fails after
/// `within`.
pub fn read(broker: &str, topic: &str, count: usize, within: Duration) -> Vec<ReadRecord> {
    let consumer: BaseConsumer = config(broker)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = std::time::Instant::now() + within;
    let mut records = Vec::new();
    while records.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {count} records of {topic}",
            records.len()
        );
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        records.push(ReadRecord {
            key: message.key().map(text),
            value: message.payload().map(text).unwrap_or_default(),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| (h.key.to_string(), h.value.map(text).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    records
}

/// A broker of one test's own, on `port`, keeping its topics in a bucket of the moto S3
/// server (`scripts/s3-server`), so they outlive a restart of the broker. Stopped on drop.
pub struct DurableBroker {
    port: u16,
    bucket: String,
}

impl DurableBroker {
    pub async fn start(port: u16, bucket: &str) -> DurableBroker {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(root.join("scripts/s3-server"))
            .arg("start")
            .status()
            .expect("run scripts/s3-server");
        assert!(status.success(), "scripts/s3-server start failed");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let created = reqwest::Client::new()
            .put(format!("http://127.0.0.1:9090/{bucket}"))
            .send()
            .await
            .expect("create the broker's bucket");
        assert!(created.status().is_success(), "{created:?}");
        let broker = DurableBroker {
            port,
            bucket: bucket.to_string(),
        };
        broker.script("start");
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn restart(&self) {
        self.script("restart");
    }

    fn script(&self, verb: &str) {
        let status =
            Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka"))
                .arg(verb)
                .env("SPATE_KAFKA_PORT", self.port.to_string())
                .env("SPATE_KAFKA_STORAGE", format!("s3://{}/", self.bucket))
                .env(
                    "SPATE_KAFKA_STATE_DIR",
                    format!("/tmp/spate-kafka-{}", self.port),
                )
                .env("AWS_ENDPOINT", "http://127.0.0.1:9090")
                .env("AWS_ALLOW_HTTP", "true")
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .status()
                .expect("run scripts/kafka");
        assert!(status.success(), "scripts/kafka {verb} failed");
    }
}

impl Drop for DurableBroker {
    fn drop(&mut self) {
        self.script("stop");
    }
}
