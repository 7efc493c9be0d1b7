//! The Redis Streams source against the redis-server on 127.0.0.1:6379 (started with
//! `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no`).
//!
//! Every test uses its own stream, group and pipeline name (hence its own connection names),
//! named after the test and the process, and deletes its keys at the end. Killing
//! connections only ever targets the source's own, found by name in `CLIENT LIST`: Redis is
//! shared with the other tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::json;
use spate_sources::backlog::Backlog;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::redis_streams::{RedisStreamsSource, build};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "redis://127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(10);

async fn connection() -> MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis-server on 127.0.0.1:6379")
}

/// A stream and group of its own for one test, deleted by [`TestStream::delete`].
struct TestStream {
    redis: MultiplexedConnection,
    test: String,
    stream: String,
    group: String,
}

impl TestStream {
    async fn new(test: &str) -> TestStream {
        let stream = format!("spate-test:{test}:{}", std::process::id());
        let mut redis = connection().await;
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .arg(format!("{stream}:dead-letter"))
            .query_async(&mut redis)
            .await
            .unwrap();
        TestStream {
            redis,
            test: test.to_string(),
            stream,
            group: "spate".to_string(),
        }
    }

    fn pipeline(&self) -> String {
        format!("tests/redis-{}-{}", self.test, std::process::id())
    }

    fn source(&self, claim_idle: &str) -> RedisStreamsSource {
        serde_json::from_value(json!({
            "url": URL, "stream": self.stream, "group": self.group,
            "consumer": "spate-1", "claimIdle": claim_idle, "block": "200ms",
        }))
        .unwrap()
    }

    async fn add(&self, fields: &[(&str, &str)]) -> String {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream).arg("*");
        for (name, value) in fields {
            cmd.arg(*name).arg(*value);
        }
        cmd.query_async(&mut self.redis.clone()).await.unwrap()
    }

    async fn add_many(&self, count: usize) {
        for chunk in (0..count).collect::<Vec<_>>().chunks(200) {
            let mut pipe = redis::pipe();
            for n in chunk {
                pipe.cmd("XADD")
                    .arg(&self.stream)
                    .arg("*")
                    .arg("data")
                    .arg(format!(r#"{{"n":{n}}}"#))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut self.redis.clone()).await.unwrap();
        }
    }

    /// Entries delivered to some consumer of the group and not acknowledged.
    async fn pending(&self) -> u64 {
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(&self.stream)
            .arg(&self.group)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        match reply {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                other => panic!("XPENDING count {other:?}"),
            },
            other => panic!("XPENDING {other:?}"),
        }
    }

    async fn wait_pending(&self, expected: u64) {
        let settled = async {
            while self.pending().await != expected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if timeout(WAIT, settled).await.is_err() {
            panic!(
                "pending stayed at {} instead of {expected}",
                self.pending().await
            );
        }
    }

    /// Kills the source's connections (named `spate:<pipeline>`), not anyone else's.
    async fn kill_source_connections(&self) -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
        let name = format!("name=spate:{}", self.pipeline());
        let ids: Vec<String> = list
            .lines()
            .filter(|line| line.split(' ').any(|field| field == name))
            .filter_map(|line| line.strip_prefix("id=")?.split(' ').next())
            .map(str::to_string)
            .collect();
        for id in &ids {
            let _: redis::Value = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut self.redis.clone())
                .await
                .unwrap();
        }
        ids.len()
    }

    async fn delete(self) {
        let _: () = redis::cmd("DEL")
            .arg(&self.stream)
            .arg(format!("{}:dead-letter", self.stream))
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
    }
}

struct Running {
    rx: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
    /// What the source reports it still holds, as the engine reads it.
    backlog: Backlog,
}

impl Running {
    async fn start(stream: &TestStream, config: &RedisStreamsSource, capacity: usize) -> Running {
        let backlog = Backlog::default();
        let cx = SourceContext {
            pipeline: stream.pipeline(),
            secrets: Arc::new(EnvSecrets),
            checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
            state_dir: std::env::temp_dir(),
            webhooks: None,
            backlog: backlog.clone(),
        };
        let source = build(config, &cx).await.unwrap();
        let (tx, rx) = mpsc::channel(capacity);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Running {
            rx,
            shutdown,
            task,
            backlog,
        }
    }

    /// Waits (up to [`WAIT`]) for the source to report `expected`; it reads every 2s.
    async fn wait_backlog(&self, expected: Option<u64>) {
        let reached = async {
            while self.backlog.get() != expected {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if timeout(WAIT, reached).await.is_err() {
            panic!(
                "the backlog stayed at {:?} instead of {expected:?}",
                self.backlog.get()
            );
        }
    }

    async fn next(&mut self) -> Delivery {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("a delivery within 10s")
            .expect("the source is running")
    }

    async fn nothing_for(&mut self, quiet: Duration) {
        if let Ok(Some(delivery)) = timeout(quiet, self.rx.recv()).await {
            panic!("unexpected delivery {:?}", delivery.event.to_json());
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = timeout(WAIT, self.task).await.unwrap().unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}

#[tokio::test]
async fn entries_become_events_acknowledged_only_when_settled() {
    let stream = TestStream::new("settle").await;
    let first = stream
        .add(&[("data", r#"{"key":"a.jpg"}"#), ("tenant", "acme")])
        .await;
    let second = stream.add(&[("key", "b.jpg")]).await;
    let mut source = Running::start(&stream, &stream.source("60s"), 16).await;

    let one = source.next().await;
    assert_eq!(
        one.event.to_json(),
        json!({"id": format!("{}:{first}", stream.stream), "stream": stream.stream,
               "entryId": first, "data": {"key": "a.jpg"},
               "fields": {"data": r#"{"key":"a.jpg"}"#, "tenant": "acme"}})
    );
    let two = source.next().await;
    assert_eq!(two.event.id(), format!("{}:{second}", stream.stream));
    assert_eq!(two.event.fields()["data"], json!({"key": "b.jpg"}));
    // Both handed over, neither settled: both still pending in the group.
    assert_eq!(stream.pending().await, 2);

    one.ack.ack().await.unwrap();
    stream.wait_pending(1).await;
    source.nothing_for(Duration::from_millis(500)).await;
    // The unsettled entry outlives the source: still pending, never acknowledged.
    drop(two);
    source.stop().await;
    assert_eq!(stream.pending().await, 1);

    // A new reader with the same consumer name re-reads its own pending entry first.
    let mut again = Running::start(&stream, &stream.source("60s"), 16).await;
    let redelivered = again.next().await;
    assert_eq!(
        redelivered.event.id(),
        format!("{}:{second}", stream.stream)
    );
    redelivered.ack.ack().await.unwrap();
    stream.wait_pending(0).await;
    again.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn a_thousand_entries_are_a_thousand_events_each_once() {
    let stream = TestStream::new("thousand").await;
    stream.add_many(1000).await;
    let mut source = Running::start(&stream, &stream.source("60s"), 64).await;
    let mut seen = BTreeSet::new();
    for _ in 0..1000 {
        let delivery = source.next().await;
        let n = delivery.event.fields()["data"]["n"].as_u64().unwrap();
        assert!(seen.insert(n), "entry {n} delivered twice");
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(seen, (0..1000).collect());
    source.nothing_for(Duration::from_secs(1)).await;
    stream.wait_pending(0).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn entries_of_a_crashed_consumer_are_reclaimed_after_claim_idle() {
    let stream = TestStream::new("reclaim").await;
    let mut redis = stream.redis.clone();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream.stream)
        .arg(&stream.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis)
        .await
        .unwrap();
    let id = stream.add(&[("data", r#"{"n":1}"#)]).await;
    // Another replica reads it and dies without acknowledging it.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&stream.group)
        .arg("crashed-replica")
        .arg("STREAMS")
        .arg(&stream.stream)
        .arg(">")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(stream.pending().await, 1);

    let started = std::time::Instant::now();
    let mut source = Running::start(&stream, &stream.source("1s"), 16).await;
    let delivery = source.next().await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "reclaimed only once idle for claimIdle"
    );
    assert_eq!(delivery.event.id(), format!("{}:{id}", stream.stream));
    delivery.ack.ack().await.unwrap();
    stream.wait_pending(0).await;
    source.nothing_for(Duration::from_millis(1500)).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn an_entry_the_engine_holds_past_claim_idle_keeps_its_delivery_count() {
    let stream = TestStream::new("held").await;
    let id = stream.add(&[("data", r#"{"n":1}"#)]).await;
    let mut config = stream.source("300ms");
    config.max_deliveries = 1;
    let mut source = Running::start(&stream, &config, 16).await;
    let delivery = source.next().await;
    // Held (backpressure, a slow create) through several XAUTOCLAIM rounds of its own
    // consumer: claiming what this process holds must not count as delivering it again, or a
    // restart would dead-letter it as "delivered N times" without its Job ever made.
    source.nothing_for(Duration::from_millis(2_000)).await;
    let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&stream.stream)
        .arg(&stream.group)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut stream.redis.clone())
        .await
        .unwrap();
    assert_eq!(reply.len(), 1, "{reply:?}");
    assert_eq!(reply[0].0, id);
    assert_eq!(reply[0].3, 1, "delivered once: {reply:?}");
    delivery.ack.ack().await.unwrap();
    stream.wait_pending(0).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn an_entry_delivered_more_than_max_deliveries_is_dead_lettered() {
    let stream = TestStream::new("poison").await;
    let id = stream.add(&[("data", r#"{"n":1}"#)]).await;
    let mut config = stream.source("60s");
    config.max_deliveries = 3;
    let mut source = Running::start(&stream, &config, 16).await;
    for _ in 0..3 {
        let delivery = source.next().await;
        assert_eq!(delivery.event.id(), format!("{}:{id}", stream.stream));
        delivery.ack.retry().await.unwrap();
    }
    // The fourth delivery would exceed maxDeliveries: dead-lettered and acknowledged instead.
    source.nothing_for(Duration::from_secs(1)).await;
    stream.wait_pending(0).await;
    let dead: Vec<(String, BTreeMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{}:dead-letter", stream.stream))
        .arg("-")
        .arg("+")
        .query_async(&mut stream.redis.clone())
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields = &dead[0].1;
    assert_eq!(fields["entryId"], id);
    assert_eq!(fields["stream"], stream.stream);
    assert_eq!(fields["deliveries"], "4");
    assert!(fields["reason"].contains("maxDeliveries (3)"), "{fields:?}");
    let event: serde_json::Value = serde_json::from_str(&fields["event"]).unwrap();
    assert_eq!(event["data"], json!({"n": 1}));
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn killed_connections_lose_nothing() {
    const ENTRIES: u64 = 300;
    let stream = TestStream::new("kill").await;
    stream.add_many(ENTRIES as usize).await;
    let mut source = Running::start(&stream, &stream.source("2s"), 16).await;
    let mut deliveries: BTreeMap<u64, u32> = BTreeMap::new();
    let mut held = Vec::new();
    let mut kills = 0;
    while deliveries.len() < ENTRIES as usize {
        let delivery = timeout(Duration::from_secs(30), source.rx.recv())
            .await
            .expect("a delivery within 30s")
            .unwrap();
        let n = delivery.event.fields()["data"]["n"].as_u64().unwrap();
        *deliveries.entry(n).or_default() += 1;
        // Kill twice mid-stream, holding a few deliveries unsettled across the first kill:
        // their acks must go through the new connection.
        if deliveries.len() == 100 || deliveries.len() == 200 {
            if deliveries.len() == 100 {
                held.push(delivery);
            } else {
                delivery.ack.ack().await.unwrap();
            }
            let killed = stream.kill_source_connections().await;
            assert!(killed >= 1, "the source's connections are named");
            kills += 1;
            continue;
        }
        if deliveries.len() < 100 && held.len() < 5 && n % 7 == 0 {
            held.push(delivery);
            continue;
        }
        delivery.ack.ack().await.unwrap();
        if deliveries.len() == 150 {
            for delivery in held.drain(..) {
                delivery.ack.ack().await.unwrap();
            }
        }
    }
    assert_eq!(kills, 2);
    assert!(held.is_empty());
    assert_eq!(
        deliveries.keys().copied().collect::<Vec<_>>(),
        (0..ENTRIES).collect::<Vec<_>>()
    );
    // Redeliveries are allowed (at-least-once), but everything ends acknowledged.
    stream.wait_pending(0).await;
    while let Ok(Some(extra)) = timeout(Duration::from_millis(500), source.rx.recv()).await {
        extra.ack.ack().await.unwrap();
    }
    stream.wait_pending(0).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn the_backlog_counts_entries_not_delivered_or_not_acknowledged() {
    const ENTRIES: u64 = 20;
    let stream = TestStream::new("backlog").await;
    // A small channel the test does not read yet: most entries stay undelivered.
    let mut source = Running::start(&stream, &stream.source("60s"), 4).await;
    source.wait_backlog(Some(0)).await;

    stream.add_many(ENTRIES as usize).await;
    source.wait_backlog(Some(ENTRIES)).await;
    assert!(
        stream.pending().await < ENTRIES,
        "undelivered entries are part of the backlog, not only pending ones"
    );

    // Every entry delivered and held unacknowledged: still all of them.
    let mut held = Vec::new();
    for _ in 0..ENTRIES {
        held.push(source.next().await);
    }
    stream.wait_pending(ENTRIES).await;
    source.wait_backlog(Some(ENTRIES)).await;
    // Each acknowledgement takes one off.
    for delivery in held.drain(..5) {
        delivery.ack.ack().await.unwrap();
    }
    source.wait_backlog(Some(ENTRIES - 5)).await;
    for delivery in held.drain(..) {
        delivery.ack.ack().await.unwrap();
    }
    source.wait_backlog(Some(0)).await;

    // A stopped source no longer measures: its last reading is not left behind.
    let backlog = source.backlog.clone();
    source.stop().await;
    assert_eq!(backlog.get(), None);
    stream.delete().await;
}

#[tokio::test]
async fn a_backlog_redis_cannot_count_is_unknown_rather_than_understated() {
    let stream = TestStream::new("backlog-xdel").await;
    let mut source = Running::start(&stream, &stream.source("60s"), 2).await;
    source.wait_backlog(Some(0)).await;
    // The test does not read yet: two entries wait in the channel, three stay unread.
    stream.add_many(5).await;
    source.wait_backlog(Some(5)).await;

    // An entry deleted ahead of the group: Redis can no longer count the unread ones, and the
    // two pending entries alone would pass for the whole backlog.
    let deleted = stream.add(&[("data", "{}")]).await;
    stream.add(&[("data", "{}")]).await;
    let _: u64 = redis::cmd("XDEL")
        .arg(&stream.stream)
        .arg(&deleted)
        .query_async(&mut stream.redis.clone())
        .await
        .unwrap();
    source.wait_backlog(None).await;

    // Once the group has read past the deleted entry, Redis counts again.
    for _ in 0..6 {
        source.next().await.ack.ack().await.unwrap();
    }
    source.wait_backlog(Some(0)).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn a_missing_group_without_create_group_is_a_configuration_error() {
    let stream = TestStream::new("nogroup").await;
    stream.add(&[("k", "v")]).await;
    let mut config = stream.source("60s");
    config.create_group = false;
    let mut source = Running::start(&stream, &config, 4).await;
    source.nothing_for(Duration::from_millis(200)).await;
    let result = timeout(WAIT, source.task).await.unwrap().unwrap();
    let err = result.expect_err("NOGROUP is permanent at start-up");
    assert!(err.to_string().contains("NOGROUP"), "{err}");
    stream.delete().await;
}
