//! The NATS source against the nats-server with JetStream on 127.0.0.1:4222
//! (`scripts/services` starts it).
//!
//! Every test uses its own subjects and stream, named after the test and the process, and
//! deletes its stream.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use serde_json::json;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::nats::{JetStreamConsumer, NatsSource, build};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "nats://127.0.0.1:4222";
const WAIT: Duration = Duration::from_secs(10);

fn context() -> SourceContext {
    SourceContext {
        pipeline: "tests/nats".to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    }
}

async fn client() -> async_nats::Client {
    async_nats::connect(URL)
        .await
        .expect("nats-server on 127.0.0.1:4222 (run scripts/services)")
}

/// A stream of its own for one test, deleted by [`TestStream::delete`].
struct TestStream {
    context: jetstream::Context,
    name: String,
    subject: String,
}

impl TestStream {
    async fn create(test: &str) -> TestStream {
        let context = jetstream::new(client().await);
        let name = format!("SPATE_{test}_{}", std::process::id());
        let subject = format!("spate.test.{}.{test}", std::process::id());
        context
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{subject}.>")],
                ..stream::Config::default()
            })
            .await
            .unwrap();
        TestStream {
            context,
            name,
            subject,
        }
    }

    async fn publish(&self, suffix: &str, body: &str) {
        self.context
            .publish(
                format!("{}.{suffix}", self.subject),
                body.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    fn source(&self, ack_wait: &str) -> NatsSource {
        NatsSource {
            url: URL.to_string(),
            subject: format!("{}.>", self.subject),
            jetstream: Some(JetStreamConsumer {
                stream: self.name.clone(),
                durable: format!("{}_spate", self.name),
                ack_wait: ack_wait.to_string(),
                max_deliver: 5,
            }),
        }
    }

    /// Delivered to Spate and not acknowledged yet.
    async fn ack_pending(&self) -> usize {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .context
            .get_consumer_from_stream(format!("{}_spate", self.name), &self.name)
            .await
            .unwrap();
        consumer.info().await.unwrap().num_ack_pending
    }

    async fn delete(self) {
        self.context.delete_stream(&self.name).await.unwrap();
    }
}

struct Running {
    rx: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    async fn start(config: &NatsSource, capacity: usize) -> Running {
        let source = build(config, &context()).await.unwrap();
        let (tx, rx) = mpsc::channel(capacity);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Running { rx, shutdown, task }
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
async fn a_core_subject_delivers_what_is_published_while_subscribed() {
    let subject = format!("spate.test.{}.core", std::process::id());
    let config = NatsSource {
        url: URL.to_string(),
        subject: format!("{subject}.>"),
        jetstream: None,
    };
    let mut source = Running::start(&config, 16).await;
    let publisher = client().await;
    // Core NATS delivers only to existing subscriptions: wait for the source's.
    let subscribed = async {
        loop {
            publisher
                .publish(format!("{subject}.probe"), "probe".into())
                .await
                .unwrap();
            if let Ok(Some(_)) = timeout(Duration::from_millis(200), source.rx.recv()).await {
                return;
            }
        }
    };
    timeout(WAIT, subscribed)
        .await
        .expect("the source subscribes");
    while timeout(Duration::from_millis(200), source.rx.recv())
        .await
        .is_ok()
    {}

    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "upload-1");
    headers.insert("tenant", "acme");
    publisher
        .publish_with_headers(
            format!("{subject}.jpg"),
            headers,
            r#"{"key":"a.jpg"}"#.into(),
        )
        .await
        .unwrap();
    publisher
        .publish(format!("{subject}.txt"), "plain".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    let first = source.next().await;
    assert_eq!(first.event.id(), "upload-1");
    assert_eq!(
        first.event.to_json(),
        json!({"id": "upload-1", "subject": format!("{subject}.jpg"),
               "headers": {"Nats-Msg-Id": "upload-1", "tenant": "acme"}, "data": {"key": "a.jpg"}})
    );
    first.ack.ack().await.unwrap();
    let second = source.next().await;
    assert_eq!(second.event.fields()["data"], json!("plain"));
    assert!(!second.event.id().is_empty());
    second.ack.ack().await.unwrap();
    source.stop().await;
}

#[tokio::test]
async fn jetstream_messages_are_named_by_stream_sequence_and_acked() {
    let stream = TestStream::create("ack").await;
    for i in 0..5 {
        stream.publish("jpg", &format!(r#"{{"n":{i}}}"#)).await;
    }
    let mut source = Running::start(&stream.source("1s"), 8).await;
    let mut ids = Vec::new();
    for i in 0..5u64 {
        let delivery = source.next().await;
        assert_eq!(delivery.event.fields()["data"], json!({"n": i}));
        assert_eq!(delivery.event.fields()["stream"], json!(stream.name));
        assert_eq!(delivery.event.fields()["sequence"], json!(i + 1));
        assert_eq!(
            delivery.event.fields()["subject"],
            json!(format!("{}.jpg", stream.subject))
        );
        ids.push(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(
        ids,
        (1..=5)
            .map(|seq| format!("{}:{seq}", stream.name))
            .collect::<Vec<_>>()
    );
    // Acknowledged messages do not come back after ackWait.
    source.nothing_for(Duration::from_millis(2500)).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn an_unacknowledged_jetstream_message_comes_back_after_ack_wait() {
    let stream = TestStream::create("redeliver").await;
    stream.publish("jpg", "slow").await;
    let mut source = Running::start(&stream.source("1s"), 8).await;
    let first = source.next().await;
    let id = first.event.id().to_string();
    // The engine crashed before the Job existed: nothing settles the delivery.
    drop(first);
    let started = tokio::time::Instant::now();
    let again = source.next().await;
    assert_eq!(again.event.id(), id, "the redelivery names the same Job");
    assert!(started.elapsed() >= Duration::from_millis(500));
    again.ack.ack().await.unwrap();
    source.nothing_for(Duration::from_millis(1500)).await;
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn retry_naks_and_reject_terminates_for_good() {
    let stream = TestStream::create("settle").await;
    stream.publish("a", "retry me").await;
    stream.publish("b", "poison").await;
    let mut source = Running::start(&stream.source("1s"), 8).await;

    let mut pending = Vec::new();
    for _ in 0..2 {
        pending.push(source.next().await);
    }
    let (retry, poison): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .partition(|d| d.event.fields()["data"] == json!("retry me"));
    let retry = retry.into_iter().next().unwrap();
    let poison = poison.into_iter().next().unwrap();
    let retry_id = retry.event.id().to_string();
    poison
        .ack
        .reject("cannot render".to_string())
        .await
        .unwrap();
    retry.ack.retry().await.unwrap();

    let again = source.next().await;
    assert_eq!(again.event.id(), retry_id);
    again.ack.ack().await.unwrap();
    // Well past ackWait: the terminated message never returns.
    source.nothing_for(Duration::from_millis(2500)).await;
    source.stop().await;
    assert_eq!(stream.ack_pending().await, 0);
    stream.delete().await;
}

#[tokio::test]
async fn a_message_delivered_more_than_max_deliver_times_reaches_the_engine_refused() {
    let stream = TestStream::create("maxdeliver").await;
    // The durable as an earlier Spate left it: the server itself stops at maxDeliver, and
    // would never deliver the message again, nor tell anyone.
    stream
        .context
        .get_stream(&stream.name)
        .await
        .unwrap()
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(format!("{}_spate", stream.name)),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 2,
            filter_subject: format!("{}.>", stream.subject),
            ..Default::default()
        })
        .await
        .unwrap();
    stream.publish("jpg", "cannot get a Job").await;
    let mut config = stream.source("1s");
    config.jetstream.as_mut().unwrap().max_deliver = 2;
    let mut source = Running::start(&config, 8).await;

    for _ in 0..2 {
        let delivery = source.next().await;
        assert_eq!(delivery.refusal, None);
        // Its Job could not be created: handed back.
        delivery.ack.retry().await.unwrap();
    }
    let third = source.next().await;
    let reason = third
        .refusal
        .clone()
        .expect("the third delivery is refused");
    assert!(
        reason.contains("delivered 3 times, more than maxDeliver (2)"),
        "{reason}"
    );
    // The engine dead-lettered it.
    third.ack.reject(reason).await.unwrap();
    source.nothing_for(Duration::from_millis(2500)).await;
    source.stop().await;
    assert_eq!(stream.ack_pending().await, 0);
    stream.delete().await;
}

#[tokio::test]
async fn a_full_engine_stops_the_pulls() {
    let stream = TestStream::create("backpressure").await;
    for i in 0..20 {
        stream.publish("jpg", &i.to_string()).await;
    }
    let mut source = Running::start(&stream.source("30s"), 2).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(source.rx.len(), 2);
    assert_eq!(
        stream.ack_pending().await,
        2,
        "only what fits in the engine's channel left the stream"
    );
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let delivery = source.next().await;
        seen.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(seen.len(), 20);
    source.stop().await;
    stream.delete().await;
}

#[tokio::test]
async fn a_missing_stream_at_start_up_is_an_error() {
    let config = NatsSource {
        url: URL.to_string(),
        subject: "spate.test.nowhere".to_string(),
        jetstream: Some(JetStreamConsumer {
            stream: format!("SPATE_MISSING_{}", std::process::id()),
            durable: "spate".to_string(),
            ack_wait: "1s".to_string(),
            max_deliver: 5,
        }),
    };
    let source = build(&config, &context()).await.unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let result = timeout(WAIT, source.run(tx, CancellationToken::new()))
        .await
        .expect("gives up instead of retrying forever");
    let err = result.expect_err("no such stream");
    assert!(err.to_string().contains("SPATE_MISSING"), "{err}");
}

/// A nats-server of its own on a free loopback port, requiring `args` (`--user`/`--pass`,
/// `--auth`); killed on drop.
struct AuthServer {
    child: std::process::Child,
    port: u16,
}

impl AuthServer {
    async fn start(args: &[&str]) -> AuthServer {
        let port = crate::ports::free_port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH (scripts/services installs it)");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        AuthServer { child, port }
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client library ignores credentials written in the URL; the source hands them over
/// itself: `user:password@` and a `token@` both authenticate.
#[tokio::test]
async fn credentials_in_the_url_authenticate() {
    let with_password = AuthServer::start(&["--user", "spate", "--pass", "p@ss:word"]).await;
    let with_token = AuthServer::start(&["--auth", "s3cr3t-token"]).await;
    for (url, publisher) in [
        (
            format!(
                "nats://spate:p%40ss%3Aword@127.0.0.1:{}",
                with_password.port
            ),
            async_nats::ConnectOptions::with_user_and_password("spate".into(), "p@ss:word".into()),
        ),
        (
            format!("nats://s3cr3t-token@127.0.0.1:{}", with_token.port),
            async_nats::ConnectOptions::with_token("s3cr3t-token".into()),
        ),
    ] {
        let port = url.rsplit(':').next().unwrap().to_string();
        let config = NatsSource {
            url,
            subject: "spate.auth.>".to_string(),
            jetstream: None,
        };
        let mut source = Running::start(&config, 16).await;
        let publisher = publisher
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
        // Core NATS delivers only to existing subscriptions: publish until one arrives.
        let delivered = async {
            loop {
                publisher
                    .publish("spate.auth.probe", "probe".into())
                    .await
                    .unwrap();
                if let Ok(Some(delivery)) =
                    timeout(Duration::from_millis(200), source.rx.recv()).await
                {
                    return delivery;
                }
            }
        };
        let delivery = timeout(WAIT, delivered)
            .await
            .unwrap_or_else(|_| panic!("no delivery through the server on port {port}"));
        assert_eq!(delivery.event.fields()["data"], json!("probe"));
        source.stop().await;
    }
}
