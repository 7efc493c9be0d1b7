//! RabbitMQ restarting under a running AMQP source (`rabbitmqctl stop_app` / `start_app`).
//!
//! In its own test binary because it takes the broker away from everything else: cargo runs
//! test binaries one after another. The queue is durable and the messages persistent, as they
//! must be to survive a broker restart.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use spate_sources::SourceContext;
use spate_sources::amqp::{AmqpSource, build};
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::secret::EnvSecrets;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MESSAGES: u64 = 200;
const PREFETCH: u16 = 20;
const CAPACITY: usize = 10;

async fn channel() -> (Connection, Channel) {
    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/services)");
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

async fn rabbitmqctl(command: &str) {
    let status = timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .arg(command)
            .status(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {command} within 60s"))
    .unwrap_or_else(|err| panic!("rabbitmqctl {command}: {err}"));
    assert!(status.success(), "rabbitmqctl {command}: {status}");
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing_and_repeats_only_what_was_in_flight() {
    let queue = format!("spate-test-restart-{}", std::process::id());
    {
        let (_connection, channel) = channel().await;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for n in 0..MESSAGES {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!(r#"{{"n":{n}}}"#).as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
    }

    let config = AmqpSource {
        url: Some(URL.to_string()),
        url_from: None,
        queue: queue.clone(),
        prefetch: PREFETCH,
    };
    let cx = SourceContext {
        pipeline: "tests/amqp-restart".to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel(CAPACITY);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));

    // Deliveries per message number, and the id each one carried.
    let mut deliveries: BTreeMap<u64, u32> = BTreeMap::new();
    let mut ids: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let mut acked_before_restart = BTreeSet::new();
    let mut receive = async |rx: &mut mpsc::Receiver<_>| -> u64 {
        let delivery: spate_sources::Delivery = timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a delivery within 30s")
            .expect("the source is running");
        let n = delivery.event.fields()["data"]["n"].as_u64().unwrap();
        *deliveries.entry(n).or_default() += 1;
        ids.entry(n)
            .or_default()
            .insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
        n
    };

    for _ in 0..60 {
        acked_before_restart.insert(receive(&mut rx).await);
    }
    // The source is mid-stream: its channel and prefetch window are full of unacknowledged
    // deliveries when the broker goes away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    rabbitmqctl("stop_app").await;
    rabbitmqctl("start_app").await;

    let mut seen: BTreeSet<u64> = acked_before_restart.clone();
    while (seen.len() as u64) < MESSAGES {
        seen.insert(receive(&mut rx).await);
    }
    // Nothing else is left to come.
    let extra = timeout(Duration::from_secs(1), rx.recv()).await;
    shutdown.cancel();
    timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    assert!(extra.is_err(), "no delivery after all were acknowledged");
    assert_eq!(deliveries.len() as u64, MESSAGES, "every message delivered");
    for n in &acked_before_restart {
        assert_eq!(
            deliveries[n], 1,
            "message {n} was acknowledged before the restart"
        );
    }
    let repeated: Vec<_> = deliveries.iter().filter(|(_, count)| **count > 1).collect();
    assert!(
        !repeated.is_empty(),
        "the deliveries in flight at the restart come again: the restart happened mid-stream"
    );
    assert!(
        repeated.len() <= usize::from(PREFETCH) + CAPACITY,
        "only in-flight messages are redelivered: {repeated:?}"
    );
    assert!(repeated.iter().all(|(_, count)| **count == 2));
    assert!(
        ids.values().all(|ids| ids.len() == 1),
        "a redelivered message keeps its id"
    );

    let (_connection, channel) = channel().await;
    let remaining = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(remaining, 0, "every message acknowledged");
}
