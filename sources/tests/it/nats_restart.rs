//! A JetStream source surviving a nats-server crash and restart.
//!
//! The test runs its own nats-server (the machine's, on 4222, is shared with other tests) on a
//! free port with a store in a temporary directory, kills it mid-stream and starts it again
//! on the same port and store.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::nats::{JetStreamConsumer, NatsSource, build};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::ports::free_port;

const MESSAGES: u64 = 100;

async fn start_server(port: u16, store: &Path) -> Child {
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server installed (run scripts/services)");
    let up = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    timeout(Duration::from_secs(10), up)
        .await
        .expect("nats-server listens within 10s");
    child
}

async fn publish(url: &str, subject: &str, range: std::ops::Range<u64>) {
    let context = jetstream::new(async_nats::connect(url).await.unwrap());
    for n in range {
        context
            .publish(subject.to_string(), format!(r#"{{"n":{n}}}"#).into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

/// Takes one delivery, checks its id, counts it per message number and acks it.
async fn receive(rx: &mut mpsc::Receiver<Delivery>, deliveries: &mut BTreeMap<u64, u32>) {
    let delivery = timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a delivery within 30s")
        .expect("the source is running");
    let n = delivery.event.fields()["data"]["n"].as_u64().unwrap();
    assert_eq!(
        delivery.event.id(),
        format!("RESTART:{}", n + 1),
        "stream:sequence"
    );
    *deliveries.entry(n).or_default() += 1;
    delivery.ack.ack().await.unwrap();
}

#[tokio::test]
async fn a_server_restart_mid_stream_loses_nothing() {
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = start_server(port, store.path()).await;

    let context = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    context
        .create_stream(stream::Config {
            name: "RESTART".to_string(),
            subjects: vec!["restart.>".to_string()],
            ..stream::Config::default()
        })
        .await
        .unwrap();
    publish(&url, "restart.jpg", 0..MESSAGES / 2).await;

    let config = NatsSource {
        url: url.clone(),
        subject: "restart.>".to_string(),
        jetstream: Some(JetStreamConsumer {
            stream: "RESTART".to_string(),
            durable: "spate".to_string(),
            ack_wait: "2s".to_string(),
            max_deliver: -1,
        }),
    };
    let cx = SourceContext {
        pipeline: "tests/nats-restart".to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(store.path())),
        state_dir: store.path().to_path_buf(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel::<Delivery>(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));

    let mut deliveries: BTreeMap<u64, u32> = BTreeMap::new();
    for _ in 0..20 {
        receive(&mut rx, &mut deliveries).await;
    }

    server.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _server = start_server(port, store.path()).await;
    publish(&url, "restart.png", MESSAGES / 2..MESSAGES).await;

    while (deliveries.len() as u64) < MESSAGES {
        receive(&mut rx, &mut deliveries).await;
    }
    // Acks made after the restart hold: nothing comes back once ackWait has passed.
    let late = timeout(Duration::from_secs(3), rx.recv()).await;
    shutdown.cancel();
    timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        late.is_err(),
        "a delivery after everything was acknowledged"
    );
    assert_eq!(deliveries.len() as u64, MESSAGES, "every message delivered");
    // A killed server may forget acks it had not written to disk yet, so messages from before
    // the crash may come twice (same id, same Job); nothing published after it does.
    for (n, count) in &deliveries {
        assert!(*count <= 2, "message {n} delivered {count} times");
        if *n >= MESSAGES / 2 {
            assert_eq!(*count, 1, "message {n} was published after the restart");
        }
    }
}
