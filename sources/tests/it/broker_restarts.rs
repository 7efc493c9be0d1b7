//! Redis and Mosquitto restarted in the middle of a stream, each a private broker of this
//! file's own on its own port, with persistence on: the machine's shared brokers keep nothing
//! on disk, so restarting them would lose every other test's streams and sessions.
//!
//! Each test reads part of a stream, restarts the broker (clean shutdown, same data
//! directory), publishes more, and checks that every message arrives and nothing stays
//! unacknowledged.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A broker process, killed when the test ends however it ends.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Broker {
    /// Asks the broker to stop cleanly (SIGTERM: both write their data on the way out).
    fn stop(mut self) {
        let pid = self.0.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + WAIT;
        while self.0.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the broker did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn wait_listening(port: u16) {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Running {
    deliveries: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    fn start(source: Box<dyn Source>) -> Running {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (tx, deliveries) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Running {
            deliveries,
            shutdown,
            task,
        }
    }

    /// Takes and acknowledges deliveries until `seen` holds `until` distinct ids.
    async fn take_until(&mut self, seen: &mut BTreeSet<String>, until: usize) {
        let deadline = Instant::now() + WAIT;
        while seen.len() < until {
            let delivery = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.deliveries.recv(),
            )
            .await
            .unwrap_or_else(|_| panic!("{} of {until} messages arrived", seen.len()))
            .expect("the source keeps running through the restart");
            seen.insert(delivery.event.id().to_string());
            delivery.ack.ack().await.unwrap();
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        drop(self.deliveries);
        timeout(WAIT, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn context(pipeline: &str) -> SourceContext {
    SourceContext {
        pipeline: pipeline.to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    }
}

const REDIS_PORT: u16 = 6391;

/// redis-server appending every write to its log before answering, so a clean stop and
/// start gives back every entry and the group's pending list.
async fn start_redis(dir: &Path) -> Broker {
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &REDIS_PORT.to_string()])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/services installs it)");
    wait_listening(REDIS_PORT).await;
    Broker(child)
}

async fn xadd(from: usize, count: usize) {
    let mut redis = redis::Client::open(format!("redis://127.0.0.1:{REDIS_PORT}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for n in from..from + count {
        pipe.cmd("XADD")
            .arg("uploads")
            .arg("*")
            .arg("n")
            .arg(n)
            .ignore();
    }
    pipe.query_async::<()>(&mut redis).await.unwrap();
}

async fn redis_pending() -> u64 {
    let mut redis = redis::Client::open(format!("redis://127.0.0.1:{REDIS_PORT}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg("uploads")
        .arg("spate")
        .query_async(&mut redis)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(count)) => *count as u64,
            other => panic!("XPENDING count {other:?}"),
        },
        other => panic!("XPENDING answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(dir.path()).await;
    xadd(0, 200).await;
    let config = serde_json::from_value(json!({
        "url": format!("redis://127.0.0.1:{REDIS_PORT}"), "stream": "uploads", "group": "spate",
        "consumer": "spate-1", "block": "200ms", "claimIdle": "2s",
    }))
    .unwrap();
    let source = spate_sources::redis_streams::build(&config, &context("tests/redis-restart"))
        .await
        .unwrap();
    let mut running = Running::start(source);
    let mut seen = BTreeSet::new();
    running.take_until(&mut seen, 100).await;

    redis.stop();
    let redis = start_redis(dir.path()).await;
    xadd(200, 200).await;
    running.take_until(&mut seen, 400).await;
    assert_eq!(
        seen.len(),
        400,
        "every entry, before and after the restart, once"
    );
    let deadline = Instant::now() + WAIT;
    while redis_pending().await > 0 {
        assert!(
            Instant::now() < deadline,
            "entries left pending after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
    drop(redis);
}

const MQTT_PORT: u16 = 1891;

/// Mosquitto saving its sessions and queued messages in `dir` (written on a clean stop).
async fn start_mosquitto(dir: &Path) -> Broker {
    let config = dir.join("mosquitto.conf");
    std::fs::write(
        &config,
        format!(
            "listener {MQTT_PORT} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nautosave_interval 1\nuser {}\n",
            dir.display(),
            current_user(),
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (scripts/services installs it)");
    wait_listening(MQTT_PORT).await;
    Broker(child)
}

/// Started as root, Mosquitto drops to the user `mosquitto`, which cannot write the test's
/// private directory; it stays the user running the test instead.
fn current_user() -> String {
    let output = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Publishes `{"id": "m-<n>"}` for each n at QoS 1 with mosquitto_pub, which waits for the
/// broker's acknowledgements.
fn mqtt_publish(topic: &str, from: usize, count: usize) {
    let lines: String = (from..from + count)
        .map(|n| format!("{{\"id\":\"m-{n}\"}}\n"))
        .collect();
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
        .args(["-q", "1", "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (scripts/services installs mosquitto-clients)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), lines.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_restarted_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = start_mosquitto(dir.path()).await;
    let topic = "uploads/done";
    let config = serde_json::from_value(json!({
        "url": format!("mqtt://127.0.0.1:{MQTT_PORT}"), "topic": topic,
        "clientId": "spate-restart", "keepAlive": "2s",
    }))
    .unwrap();
    let source = spate_sources::mqtt::build(&config, &context("tests/mqtt-restart"))
        .await
        .unwrap();
    let mut running = Running::start(source);
    // The persistent session exists once the subscription is in place: probe until one
    // message comes through.
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while seen.is_empty() {
        assert!(Instant::now() < deadline, "never subscribed");
        mqtt_publish(topic, 0, 1);
        if let Ok(Some(delivery)) =
            timeout(Duration::from_millis(500), running.deliveries.recv()).await
        {
            seen.insert(delivery.event.id().to_string());
            delivery.ack.ack().await.unwrap();
        }
    }
    mqtt_publish(topic, 1, 99);
    running.take_until(&mut seen, 50).await;

    mosquitto.stop();
    // Published while the broker is down would fail; published after it is back, while
    // Spate reconnects, the messages wait in the restored session.
    let mosquitto = start_mosquitto(dir.path()).await;
    mqtt_publish(topic, 100, 100);
    running.take_until(&mut seen, 200).await;
    let expected: BTreeSet<String> = (0..200).map(|n| format!("m-{n}")).collect();
    assert_eq!(
        seen, expected,
        "every message, before and after the restart"
    );
    running.stop().await;
    drop(mosquitto);
}
