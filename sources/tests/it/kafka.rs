//! The Kafka source against a real Kafka-compatible broker: tansu on 127.0.0.1:9092
//! (`scripts/kafka start` builds and starts it). Each test has topics and a group of its own.

use crate::kafka_broker as kafka;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kafka::{
    BROKER, DurableBroker, committed, create_topic, ensure_broker, high_watermarks, produce,
    producer, read, unique,
};
use rand::seq::SliceRandom;
use serde_json::json;
use spate_sources::backlog::Backlog;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::kafka::{KafkaSource, build};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

struct Running {
    deliveries: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), spate_sources::SourceError>>,
    backlog: Backlog,
}

impl Drop for Running {
    // A failing test must not hang on the consumer thread, which runs until cancelled.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Running {
    async fn next(&mut self) -> Delivery {
        timeout(WAIT, self.deliveries.recv())
            .await
            .expect("a delivery within 30s")
            .expect("the source is running")
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        timeout(WAIT, &mut self.task)
            .await
            .expect("the source stops within 30s")
            .unwrap()
            .unwrap();
    }
}

fn source(topic: &str, group: &str, extra: serde_json::Value) -> KafkaSource {
    source_at(BROKER, topic, group, extra)
}

fn source_at(broker: &str, topic: &str, group: &str, extra: serde_json::Value) -> KafkaSource {
    let mut config = json!({
        "brokers": [broker], "topic": topic, "group": group,
        "commitInterval": "200ms", "rebalanceDrain": "5s",
        "properties": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    serde_json::from_value(config).unwrap()
}

async fn start(config: &KafkaSource, channel: usize) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let backlog = Backlog::default();
    let cx = SourceContext {
        pipeline: format!("tests/{}", config.group),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: backlog.clone(),
    };
    let source = build(config, &cx).await.unwrap();
    let (tx, deliveries) = mpsc::channel(channel);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));
    Running {
        deliveries,
        shutdown,
        task,
        backlog,
    }
}

/// Polls `check` every 100ms until it holds, or fails with `what` after 30s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "not within 30s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_records_become_a_thousand_events_and_every_offset_is_committed() {
    ensure_broker();
    let topic = unique("thousand");
    let group = unique("thousand-group");
    create_topic(BROKER, &topic, 4).await;
    let expected: HashSet<String> = produce(&producer(BROKER), &topic, 0, 1000)
        .await
        .into_iter()
        .collect();
    assert_eq!(expected.len(), 1000);

    let mut running = start(&source(&topic, &group, json!({})), 64).await;
    let mut seen = HashSet::new();
    let mut held = Vec::new();
    while seen.len() < 1000 {
        let delivery = running.next().await;
        assert_eq!(delivery.event.fields()["topic"], topic.as_str());
        assert!(delivery.event.fields()["data"]["n"].is_u64());
        seen.insert(delivery.event.id().to_string());
        held.push(delivery);
        // Jobs are created out of order: acknowledge batches shuffled.
        if held.len() == 50 {
            held.shuffle(&mut rand::rng());
            for delivery in held.drain(..) {
                delivery.ack.ack().await.unwrap();
            }
        }
    }
    assert_eq!(seen, expected);
    let highs = high_watermarks(BROKER, &topic, 4);
    eventually("every partition committed up to its high watermark", || {
        committed(BROKER, &group, &topic, 4) == highs
    })
    .await;
    eventually("the backlog is zero", || running.backlog.get() == Some(0)).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_record_holds_the_watermark_and_is_read_again_after_a_restart() {
    ensure_broker();
    let topic = unique("watermark");
    let group = unique("watermark-group");
    create_topic(BROKER, &topic, 1).await;
    produce(&producer(BROKER), &topic, 0, 10).await;
    let config = source(&topic, &group, json!({}));

    let mut running = start(&config, 16).await;
    let mut unacked = None;
    for _ in 0..10 {
        let delivery = running.next().await;
        if delivery.event.fields()["offset"] == 3 {
            unacked = Some(delivery);
        } else {
            delivery.ack.ack().await.unwrap();
        }
    }
    eventually("offsets below the open record are committed", || {
        committed(BROKER, &group, &topic, 1) == [3]
    })
    .await;
    // Many commit intervals later it has not moved past the record without its Job.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(committed(BROKER, &group, &topic, 1), [3]);
    eventually("the backlog counts from the open record", || {
        running.backlog.get() == Some(7)
    })
    .await;
    // A crash: the record is never settled.
    drop(unacked);
    running.stop().await;

    let mut restarted = start(&config, 16).await;
    let mut again = Vec::new();
    for _ in 3..10 {
        let delivery = restarted.next().await;
        again.push(delivery.event.fields()["offset"].as_i64().unwrap());
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(
        again,
        (3..10).collect::<Vec<_>>(),
        "read again from the watermark"
    );
    eventually("committed to the end", || {
        committed(BROKER, &group, &topic, 1) == [10]
    })
    .await;
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_consumer_joining_mid_burst_takes_partitions_and_nothing_is_lost() {
    ensure_broker();
    let topic = unique("rebalance");
    let group = unique("rebalance-group");
    create_topic(BROKER, &topic, 4).await;
    let expected: HashSet<String> = produce(&producer(BROKER), &topic, 0, 1000)
        .await
        .into_iter()
        .collect();
    let config = source(&topic, &group, json!({}));

    // Each consumer acknowledges what it gets after a delay, like Job creation, a few at a
    // time: about 80 records a second, so the burst outlasts the second consumer's join and
    // the rebalance that follows (seconds: it waits for the first one's next heartbeat).
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, String)>();
    let drive =
        |mut running: Running, consumer: usize, seen: mpsc::UnboundedSender<(usize, String)>| {
            let shutdown = running.shutdown.clone();
            let in_flight = Arc::new(tokio::sync::Semaphore::new(4));
            let driver = tokio::spawn(async move {
                while let Some(delivery) = running.deliveries.recv().await {
                    let seen = seen.clone();
                    let permit = in_flight.clone().acquire_owned().await.unwrap();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let id = delivery.event.id().to_string();
                        delivery.ack.ack().await.unwrap();
                        let _ = seen.send((consumer, id));
                        drop(permit);
                    });
                }
                (&mut running.task).await.unwrap().unwrap();
            });
            (shutdown, driver)
        };
    let first = drive(start(&config, 8).await, 1, seen_tx.clone());
    let mut per_event: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_consumer = [0usize; 3];
    let mut second = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while per_event.len() < expected.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((consumer, id))) = timeout(remaining, seen_rx.recv()).await else {
            panic!("{} of {} records seen", per_event.len(), expected.len());
        };
        *per_event.entry(id).or_default() += 1;
        per_consumer[consumer] += 1;
        if second.is_none() && per_event.len() >= 200 {
            second = Some(drive(start(&config, 8).await, 2, seen_tx.clone()));
        }
    }
    let seen: HashSet<String> = per_event.keys().cloned().collect();
    assert_eq!(seen, expected, "every record delivered");
    assert!(
        per_consumer[2] > 0,
        "the second consumer got partitions: {per_consumer:?}"
    );
    let highs = high_watermarks(BROKER, &topic, 4);
    eventually("every partition committed up to its high watermark", || {
        committed(BROKER, &group, &topic, 4) == highs
    })
    .await;
    // Redeliveries across the rebalance are allowed (one Job each, by id); say how many.
    let repeated = per_event.values().filter(|count| **count > 1).count();
    println!("rebalance: {per_consumer:?} records per consumer, {repeated} delivered twice");
    for (shutdown, driver) in [first, second.unwrap()] {
        shutdown.cancel();
        timeout(WAIT, driver).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_handed_back_too_often_goes_to_the_dead_letter_topic() {
    ensure_broker();
    let topic = unique("poison");
    let group = unique("poison-group");
    let dead = format!("{topic}.dead-letter");
    create_topic(BROKER, &topic, 1).await;
    create_topic(BROKER, &dead, 1).await;
    produce(&producer(BROKER), &topic, 0, 2).await;
    let mut running = start(&source(&topic, &group, json!({"maxDeliveries": 2})), 4).await;

    let mut handed_back = 0;
    loop {
        let delivery = running.next().await;
        if delivery.event.fields()["offset"] == 0 {
            handed_back += 1;
            delivery.ack.retry().await.unwrap();
        } else {
            delivery.ack.ack().await.unwrap();
        }
        if handed_back == 2 {
            break;
        }
    }
    let records = read(BROKER, &dead, 1, WAIT);
    let headers: BTreeMap<_, _> = records[0].headers.iter().cloned().collect();
    assert_eq!(records[0].value, r#"{"n":0}"#);
    assert_eq!(records[0].key.as_deref(), Some("key-0"));
    assert!(
        headers["spate.reason"].contains("maxDeliveries 2"),
        "{headers:?}"
    );
    assert_eq!(headers["spate.topic"], topic);
    assert_eq!(headers["spate.offset"], "0");
    eventually(
        "the dead-lettered record no longer holds the watermark",
        || committed(BROKER, &group, &topic, 1) == [2],
    )
    .await;
    assert!(
        running.deliveries.try_recv().is_err(),
        "a dead-lettered record is not delivered again"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_stream_loses_nothing() {
    ensure_broker();
    let broker = DurableBroker::start(9093, &unique("tansu-durable")).await;
    let address = broker.address();
    let topic = unique("restart");
    let group = unique("restart-group");
    create_topic(&address, &topic, 2).await;
    let mut expected: HashSet<String> = produce(&producer(&address), &topic, 0, 300)
        .await
        .into_iter()
        .collect();
    let mut running = start(&source_at(&address, &topic, &group, json!({})), 16).await;
    let mut seen = HashSet::new();
    while seen.len() < 150 {
        let delivery = running.next().await;
        seen.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }

    broker.restart();
    expected.extend(produce(&producer(&address), &topic, 300, 300).await);
    assert_eq!(expected.len(), 600);
    while seen.len() < expected.len() {
        let delivery = running.next().await;
        seen.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(
        seen, expected,
        "every record before and after the restart delivered"
    );
    // One past the last record of each partition, from the offsets the producer was given:
    // after a restart on S3 storage, tansu 0.6 reports high watermarks below the offsets it
    // handed out, so they cannot be the reference here.
    let mut ends = [0i64; 2];
    for id in &expected {
        let mut parts = id.rsplit(':');
        let offset: i64 = parts.next().unwrap().parse().unwrap();
        let partition: usize = parts.next().unwrap().parse().unwrap();
        ends[partition] = ends[partition].max(offset + 1);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let committed = committed(&address, &group, &topic, 2);
        if committed == ends {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, every record below {ends:?} acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
}
