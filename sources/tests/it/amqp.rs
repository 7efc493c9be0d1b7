//! The AMQP source against the RabbitMQ on 127.0.0.1:5672 (`scripts/services` starts it).
//!
//! Every test uses its own queue, named after the test and the process, and deletes it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use spate_sources::amqp::{AmqpSource, build};
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::secret::{EnvSecrets, SecretError, SecretKeyRef, SecretResolver, SecretValue};
use spate_sources::{Delivery, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WAIT: Duration = Duration::from_secs(10);

fn queue_name(test: &str) -> String {
    format!("spate-test-{test}-{}", std::process::id())
}

fn context() -> SourceContext {
    SourceContext {
        pipeline: "tests/amqp".to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    }
}

struct Broker {
    _connection: Connection,
    channel: Channel,
}

impl Broker {
    async fn connect() -> Broker {
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/services)");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Broker {
            _connection: connection,
            channel,
        }
    }

    async fn declare(&self, queue: &str, arguments: FieldTable) {
        self.channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
    }

    async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Messages ready in the queue (not counting those delivered and unacknowledged).
    async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    async fn delete(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

struct Running {
    rx: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    async fn start(queue: &str, prefetch: u16, capacity: usize) -> Running {
        let config = AmqpSource {
            url: Some(URL.to_string()),
            url_from: None,
            queue: queue.to_string(),
            prefetch,
        };
        let source = build(&config, &context()).await.unwrap();
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
async fn every_message_becomes_one_delivery_with_a_stable_id_and_is_acked() {
    let broker = Broker::connect().await;
    let queue = queue_name("deliveries");
    broker.declare(&queue, FieldTable::default()).await;
    for i in 0..10 {
        let properties = BasicProperties::default().with_message_id(format!("upload-{i}").into());
        broker
            .publish(&queue, format!(r#"{{"n":{i}}}"#).as_bytes(), properties)
            .await;
    }
    for i in 0..10 {
        broker
            .publish(
                &queue,
                format!("plain {i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let mut headers = FieldTable::default();
    headers.insert("tenant".into(), AMQPValue::LongString("acme".into()));
    broker
        .publish(
            &queue,
            &[0xff, 0xfe],
            BasicProperties::default().with_headers(headers),
        )
        .await;

    let mut source = Running::start(&queue, 8, 4).await;
    let mut ids = BTreeSet::new();
    let mut events = Vec::new();
    for _ in 0..21 {
        let delivery = source.next().await;
        ids.insert(delivery.event.id().to_string());
        events.push(delivery.event.to_json());
        delivery.ack.ack().await.unwrap();
    }
    source.nothing_for(Duration::from_millis(300)).await;
    source.stop().await;

    assert_eq!(ids.len(), 21, "21 distinct ids");
    for i in 0..10 {
        assert!(ids.contains(&format!("upload-{i}")));
    }
    assert_eq!(events[3]["data"], json!({"n": 3}));
    assert_eq!(events[3]["subject"], json!(queue));
    assert_eq!(events[3]["routingKey"], json!(queue));
    assert_eq!(events[3]["exchange"], json!(""));
    assert_eq!(events[12]["data"], json!("plain 2"));
    assert_eq!(events[20]["headers"], json!({"tenant": "acme"}));
    assert_eq!(events[20]["data"], json!("//4="));
    assert_eq!(events[20]["dataEncoding"], json!("base64"));
    assert_eq!(broker.ready(&queue).await, 0, "all acknowledged");
    broker.delete(&queue).await;
}

#[tokio::test]
async fn a_full_engine_leaves_the_rest_on_the_broker() {
    let broker = Broker::connect().await;
    let queue = queue_name("backpressure");
    broker.declare(&queue, FieldTable::default()).await;
    for i in 0..40 {
        broker
            .publish(
                &queue,
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    // Prefetch 5, channel capacity 2, and nobody reading: the broker may hand out 5.
    let mut source = Running::start(&queue, 5, 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        broker.ready(&queue).await,
        35,
        "only the prefetch window left the queue"
    );
    assert_eq!(source.rx.len(), 2, "the channel holds what fits, no more");

    // Once the engine reads and acknowledges, everything flows.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let delivery = source.next().await;
        seen.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(seen.len(), 40);
    source.stop().await;
    assert_eq!(broker.ready(&queue).await, 0);
    broker.delete(&queue).await;
}

#[tokio::test]
async fn retry_redelivers_the_same_event() {
    let broker = Broker::connect().await;
    let queue = queue_name("retry");
    broker.declare(&queue, FieldTable::default()).await;
    broker
        .publish(&queue, b"again", BasicProperties::default())
        .await;

    let mut source = Running::start(&queue, 4, 4).await;
    let first = source.next().await;
    let id = first.event.id().to_string();
    first.ack.retry().await.unwrap();
    let second = source.next().await;
    assert_eq!(second.event.id(), id, "a redelivery names the same Job");
    second.ack.ack().await.unwrap();
    source.nothing_for(Duration::from_millis(300)).await;
    source.stop().await;
    assert_eq!(broker.ready(&queue).await, 0);
    broker.delete(&queue).await;
}

#[tokio::test]
async fn reject_goes_to_the_queues_dead_letter_exchange_and_never_comes_back() {
    let broker = Broker::connect().await;
    let queue = queue_name("reject");
    let dead_letters = format!("{queue}-dlx");
    broker
        .channel
        .exchange_declare(
            dead_letters.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker.declare(&dead_letters, FieldTable::default()).await;
    broker
        .channel
        .queue_bind(
            dead_letters.as_str().into(),
            dead_letters.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dead_letters.as_str().into()),
    );
    broker.declare(&queue, arguments).await;
    broker
        .publish(&queue, b"poison", BasicProperties::default())
        .await;

    let mut source = Running::start(&queue, 4, 4).await;
    let poison = source.next().await;
    poison
        .ack
        .reject("cannot render".to_string())
        .await
        .unwrap();
    source.nothing_for(Duration::from_millis(500)).await;
    source.stop().await;

    let dead = broker
        .channel
        .basic_get(
            dead_letters.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the rejected message is in the dead-letter queue");
    assert_eq!(dead.delivery.data, b"poison");
    assert_eq!(broker.ready(&queue).await, 0);
    broker.delete(&queue).await;
    broker.delete(&dead_letters).await;
}

#[tokio::test]
async fn a_missing_queue_at_start_up_is_an_error_not_a_retry_loop() {
    let mut source = Running::start(&queue_name("missing"), 4, 4).await;
    let result = timeout(WAIT, &mut source.task).await.unwrap().unwrap();
    let err = result.expect_err("no such queue");
    assert!(
        err.to_string().contains("NOT_FOUND") || err.to_string().contains("no queue"),
        "{err}"
    );
}

#[tokio::test]
async fn refused_credentials_are_an_error() {
    let config = AmqpSource {
        url: Some("amqp://guest:wrong@127.0.0.1:5672/%2f".to_string()),
        url_from: None,
        queue: queue_name("credentials"),
        prefetch: 4,
    };
    let source = build(&config, &context()).await.unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let result = timeout(WAIT, source.run(tx, CancellationToken::new()))
        .await
        .expect("gives up instead of retrying forever");
    let err = result.expect_err("wrong password");
    assert!(!err.to_string().contains("wrong"), "no password in {err}");
}

#[tokio::test]
async fn a_deleted_queue_is_consumed_again_once_it_is_back() {
    let broker = Broker::connect().await;
    let queue = queue_name("recreated");
    broker.declare(&queue, FieldTable::default()).await;
    broker
        .publish(&queue, b"before", BasicProperties::default())
        .await;
    let mut source = Running::start(&queue, 4, 4).await;
    let before = source.next().await;
    before.ack.ack().await.unwrap();

    // The broker cancels the consumer; the source keeps trying until the queue is back.
    broker.delete(&queue).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.declare(&queue, FieldTable::default()).await;
    broker
        .publish(&queue, b"after", BasicProperties::default())
        .await;
    let after = source.next().await;
    assert_eq!(after.event.fields()["data"], json!("after"));
    after.ack.ack().await.unwrap();
    assert!(!source.task.is_finished());
    source.stop().await;
    broker.delete(&queue).await;
}

/// Counts deliveries per id; used to check nothing is delivered twice without cause.
#[tokio::test]
async fn acknowledged_messages_are_not_delivered_again() {
    let broker = Broker::connect().await;
    let queue = queue_name("once");
    broker.declare(&queue, FieldTable::default()).await;
    for i in 0..50 {
        broker
            .publish(
                &queue,
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
    }
    let mut source = Running::start(&queue, 10, 4).await;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..50 {
        let delivery = source.next().await;
        *counts.entry(delivery.event.id().to_string()).or_default() += 1;
        delivery.ack.ack().await.unwrap();
    }
    source.nothing_for(Duration::from_millis(500)).await;
    source.stop().await;
    assert_eq!(counts.len(), 50);
    assert!(counts.values().all(|n| *n == 1));
    broker.delete(&queue).await;
}

/// A resolver holding one secret, as a Kubernetes Secret would.
struct OneSecret(String);

impl SecretResolver for OneSecret {
    fn resolve<'a>(&'a self, value: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async move {
            match value {
                SecretValue::SecretKeyRef(reference) if reference.key == "url" => {
                    Ok(self.0.clone())
                }
                _ => Err(SecretError::MissingEnv(format!("{value:?}"))),
            }
        })
    }
}

#[tokio::test]
async fn url_from_is_read_through_the_secret_resolver() {
    let broker = Broker::connect().await;
    let queue = queue_name("secret");
    broker.declare(&queue, FieldTable::default()).await;
    broker
        .publish(&queue, b"via secret", BasicProperties::default())
        .await;
    let config = AmqpSource {
        url: None,
        url_from: Some(SecretValue::SecretKeyRef(SecretKeyRef {
            name: "rabbit".to_string(),
            key: "url".to_string(),
        })),
        queue: queue.clone(),
        prefetch: 4,
    };
    let cx = SourceContext {
        secrets: Arc::new(OneSecret(URL.to_string())),
        ..context()
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));
    let delivery = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
    assert_eq!(delivery.event.fields()["data"], json!("via secret"));
    delivery.ack.ack().await.unwrap();
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();

    let missing = AmqpSource {
        url_from: Some(SecretValue::Env("SPATE_TEST_NO_SUCH_VARIABLE".to_string())),
        ..config
    };
    assert!(matches!(
        build(&missing, &cx).await,
        Err(SourceError::Secret(_))
    ));
    broker.delete(&queue).await;
}
