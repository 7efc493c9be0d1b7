//! The MQTT source against the Mosquitto on 127.0.0.1:1883 (anonymous allowed).
//!
//! Every test uses its own topics and client ids, named after the test and the process, and
//! wipes the persistent sessions it made.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use spate_sources::check::Problems;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::mqtt::{MqttSource, build};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "mqtt://127.0.0.1:1883";
const WAIT: Duration = Duration::from_secs(10);

fn name(test: &str) -> String {
    format!("spate-test-{test}-{}", std::process::id())
}

fn context() -> SourceContext {
    SourceContext {
        pipeline: "tests/mqtt".to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    }
}

fn config(topic: &str, client_id: &str) -> MqttSource {
    MqttSource {
        url: Some(URL.to_string()),
        url_from: None,
        topic: topic.to_string(),
        client_id: Some(client_id.to_string()),
        qos: 1,
        clean_session: false,
        keep_alive: "30s".to_string(),
        username: None,
        password_from: None,
    }
}

/// Publishes each payload with QoS 1 and waits for the broker's PUBACKs.
async fn publish(topic_payloads: &[(String, Vec<u8>)]) {
    let id = format!("spate-test-publisher-{}", uuid::Uuid::new_v4());
    let mut options = MqttOptions::new(id, "127.0.0.1", 1883);
    options.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let owned = topic_payloads.to_vec();
    let total = owned.len();
    let sender = client.clone();
    tokio::spawn(async move {
        for (topic, payload) in owned {
            sender
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    timeout(WAIT * 3, async {
        while acked < total {
            match eventloop.poll().await.expect("Mosquitto on 127.0.0.1:1883") {
                Event::Incoming(Packet::PubAck(_)) => acked += 1,
                Event::Outgoing(Outgoing::Disconnect) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("PUBACKs for every publish");
    client.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(1), eventloop.poll()).await;
}

async fn publish_to(topic: &str, payloads: impl IntoIterator<Item = Vec<u8>>) {
    let messages: Vec<(String, Vec<u8>)> = payloads
        .into_iter()
        .map(|p| (topic.to_string(), p))
        .collect();
    publish(&messages).await;
}

/// Ends the broker's persistent session of `client_id` (a clean connect drops it).
async fn forget_session(client_id: &str) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", 1883);
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let _ = timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(Packet::ConnAck(_))) | Err(_) = eventloop.poll().await {
                break;
            }
        }
    })
    .await;
    let _ = client.disconnect().await;
    let _ = timeout(Duration::from_secs(1), eventloop.poll()).await;
}

struct Running {
    rx: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    async fn start(config: &MqttSource) -> Running {
        let source = build(config, &context()).await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(tx, shutdown.clone()));
        Running { rx, shutdown, task }
    }

    /// Starts and waits until the subscription is in place (a probe message comes through).
    async fn start_subscribed(config: &MqttSource, probe_topic: &str) -> Running {
        let mut running = Running::start(config).await;
        let probe = format!(r#"{{"id":"probe-{}"}}"#, uuid::Uuid::new_v4());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            publish_to(probe_topic, [probe.clone().into_bytes()]).await;
            if let Ok(Some(delivery)) = timeout(Duration::from_millis(500), running.rx.recv()).await
            {
                delivery.ack.ack().await.unwrap();
                // Later copies of the probe, if any, are acknowledged as they come.
                running.drain_probes().await;
                return running;
            }
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        }
    }

    async fn drain_probes(&mut self) {
        while let Ok(Some(delivery)) = timeout(Duration::from_millis(300), self.rx.recv()).await {
            assert!(
                delivery.event.id().starts_with("probe-"),
                "{:?}",
                delivery.event.to_json()
            );
            delivery.ack.ack().await.unwrap();
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
        drop(self.rx);
        let result = timeout(WAIT, self.task).await.unwrap().unwrap();
        assert!(result.is_ok(), "{result:?}");
    }
}

#[tokio::test]
async fn every_message_becomes_one_delivery_with_a_stable_id_and_is_acked() {
    let topic = name("deliveries");
    let client = name("deliveries-client");
    let mut source = Running::start_subscribed(&config(&topic, &client), &topic).await;
    let mut payloads: Vec<Vec<u8>> = (0..10)
        .map(|i| format!(r#"{{"id":"upload-{i}","n":{i}}}"#).into_bytes())
        .collect();
    payloads.push(b"plain text".to_vec());
    payloads.push(vec![0xff, 0xfe]);
    publish_to(&topic, payloads).await;

    let mut events = BTreeMap::new();
    for _ in 0..12 {
        let delivery = source.next().await;
        events.insert(delivery.event.id().to_string(), delivery.event.to_json());
        delivery.ack.ack().await.unwrap();
    }
    source.nothing_for(Duration::from_millis(300)).await;
    source.stop().await;
    assert_eq!(events.len(), 12);
    assert_eq!(
        events["upload-3"],
        json!({"id": "upload-3", "topic": topic, "subject": topic, "retain": false,
               "data": {"id": "upload-3", "n": 3}})
    );
    let others: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(id, _)| !id.starts_with("upload-"))
        .map(|(_, event)| event)
        .collect();
    assert_eq!(others.len(), 2);
    assert!(others.iter().any(|e| e["data"] == "plain text"));
    assert!(
        others
            .iter()
            .any(|e| e["data"] == "//4=" && e["dataEncoding"] == "base64")
    );

    // All were acknowledged: the session holds nothing to redeliver.
    let mut again = Running::start(&config(&topic, &client)).await;
    again.nothing_for(Duration::from_secs(1)).await;
    again.stop().await;
    forget_session(&client).await;
}

#[tokio::test]
async fn unsettled_messages_are_redelivered_to_the_persistent_session() {
    let topic = name("unsettled");
    let client = name("unsettled-client");
    let mut source = Running::start_subscribed(&config(&topic, &client), &topic).await;
    publish_to(
        &topic,
        (0..3).map(|i| format!(r#"{{"id":"m-{i}"}}"#).into_bytes()),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let delivery = source.next().await;
        if delivery.event.id() == "m-1" {
            delivery.ack.ack().await.unwrap();
        } else {
            held.push(delivery);
        }
    }
    // The engine never settles the other two (as if it crashed before their Jobs existed).
    drop(held);
    source.stop().await;

    let mut again = Running::start(&config(&topic, &client)).await;
    let mut ids = BTreeSet::new();
    for _ in 0..2 {
        let delivery = again.next().await;
        ids.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    again.nothing_for(Duration::from_millis(500)).await;
    again.stop().await;
    assert_eq!(ids, BTreeSet::from(["m-0".to_string(), "m-2".to_string()]));

    // Now everything is acknowledged.
    let mut third = Running::start(&config(&topic, &client)).await;
    third.nothing_for(Duration::from_secs(1)).await;
    third.stop().await;
    forget_session(&client).await;
}

#[tokio::test]
async fn retry_hands_the_same_event_again() {
    let topic = name("retry");
    let client = name("retry-client");
    let mut source = Running::start_subscribed(&config(&topic, &client), &topic).await;
    publish_to(&topic, [br#"{"id":"again"}"#.to_vec()]).await;
    let first = source.next().await;
    assert_eq!(first.event.id(), "again");
    first.ack.retry().await.unwrap();
    let second = source.next().await;
    assert_eq!(second.event.id(), "again");
    second.ack.ack().await.unwrap();
    source.nothing_for(Duration::from_millis(1500)).await;
    source.stop().await;
    forget_session(&client).await;
}

#[tokio::test]
async fn wildcards_select_topics() {
    let base = name("wildcard");
    let client = name("wildcard-client");
    let filter = format!("{base}/+/jpg");
    let mut source =
        Running::start_subscribed(&config(&filter, &client), &format!("{base}/probe/jpg")).await;
    let messages: Vec<(String, Vec<u8>)> = [
        ("a/jpg", "1"),
        ("b/png", "2"),
        ("c/jpg", "3"),
        ("d/e/jpg", "4"),
    ]
    .iter()
    .map(|(t, p)| (format!("{base}/{t}"), p.as_bytes().to_vec()))
    .collect();
    publish(&messages).await;
    let mut topics = BTreeSet::new();
    for _ in 0..2 {
        let delivery = source.next().await;
        topics.insert(
            delivery.event.fields()["topic"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        delivery.ack.ack().await.unwrap();
    }
    source.nothing_for(Duration::from_millis(500)).await;
    source.stop().await;
    assert_eq!(
        topics,
        BTreeSet::from([format!("{base}/a/jpg"), format!("{base}/c/jpg")])
    );
    forget_session(&client).await;
}

#[tokio::test]
async fn messages_published_while_stopped_arrive_after_a_restart() {
    let topic = name("offline");
    let client = name("offline-client");
    let source = Running::start_subscribed(&config(&topic, &client), &topic).await;
    source.stop().await;
    publish_to(
        &topic,
        (0..5).map(|i| format!(r#"{{"id":"offline-{i}"}}"#).into_bytes()),
    )
    .await;
    let mut again = Running::start(&config(&topic, &client)).await;
    let mut ids = BTreeSet::new();
    for _ in 0..5 {
        let delivery = again.next().await;
        ids.insert(delivery.event.id().to_string());
        delivery.ack.ack().await.unwrap();
    }
    again.nothing_for(Duration::from_millis(500)).await;
    again.stop().await;
    assert_eq!(
        ids,
        (0..5)
            .map(|i| format!("offline-{i}"))
            .collect::<BTreeSet<_>>()
    );
    forget_session(&client).await;
}

#[tokio::test]
async fn a_clean_session_does_not_keep_messages() {
    let topic = name("clean");
    let client = name("clean-client");
    let mut clean = config(&topic, &client);
    clean.clean_session = true;
    let source = Running::start_subscribed(&clean, &topic).await;
    source.stop().await;
    publish_to(&topic, [b"lost".to_vec()]).await;
    let mut again = Running::start(&clean).await;
    again.nothing_for(Duration::from_secs(1)).await;
    again.stop().await;
}

#[tokio::test]
async fn a_shared_subscription_splits_messages_without_duplicates() {
    let topic = name("shared");
    let group = name("group");
    let filter = format!("$share/{group}/{topic}");
    let clients = [name("shared-a"), name("shared-b")];
    let mut a = Running::start(&config(&filter, &clients[0])).await;
    let mut b = Running::start(&config(&filter, &clients[1])).await;
    // Both subscribed: wait until each has seen a probe.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut a_ready, mut b_ready) = (false, false);
    while !(a_ready && b_ready) {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        publish_to(
            &topic,
            [format!(r#"{{"id":"probe-{}"}}"#, uuid::Uuid::new_v4()).into_bytes()],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(d) = a.rx.try_recv() {
            a_ready = true;
            d.ack.ack().await.unwrap();
        }
        while let Ok(d) = b.rx.try_recv() {
            b_ready = true;
            d.ack.ack().await.unwrap();
        }
    }
    a.drain_probes().await;
    b.drain_probes().await;

    let total = 100;
    publish_to(
        &topic,
        (0..total).map(|i| format!(r#"{{"id":"s-{i}"}}"#).into_bytes()),
    )
    .await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_source = [0usize; 2];
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while seen.values().sum::<usize>() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {total}",
            seen.len()
        );
        tokio::select! {
            Some(d) = a.rx.recv() => {
                per_source[0] += 1;
                *seen.entry(d.event.id().to_string()).or_default() += 1;
                d.ack.ack().await.unwrap();
            }
            Some(d) = b.rx.recv() => {
                per_source[1] += 1;
                *seen.entry(d.event.id().to_string()).or_default() += 1;
                d.ack.ack().await.unwrap();
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    a.nothing_for(Duration::from_millis(300)).await;
    b.nothing_for(Duration::from_millis(300)).await;
    a.stop().await;
    b.stop().await;
    assert_eq!(seen.len(), total, "every message once");
    assert!(seen.values().all(|n| *n == 1), "no duplicates");
    assert!(
        per_source[0] > 0 && per_source[1] > 0,
        "both consumers got a share: {per_source:?}"
    );
    for client in &clients {
        forget_session(client).await;
    }
}

#[tokio::test]
async fn qos_0_needs_no_acknowledgement() {
    let topic = name("qos0");
    let client = name("qos0-client");
    let mut at_most_once = config(&topic, &client);
    at_most_once.qos = 0;
    let mut source = Running::start_subscribed(&at_most_once, &topic).await;
    publish_to(&topic, [br#"{"id":"q0"}"#.to_vec()]).await;
    let delivery = source.next().await;
    assert_eq!(delivery.event.id(), "q0");
    drop(delivery);
    source.stop().await;
    let mut again = Running::start(&at_most_once).await;
    again.nothing_for(Duration::from_secs(1)).await;
    again.stop().await;
    forget_session(&client).await;
}

#[tokio::test]
async fn build_refuses_an_invalid_filter() {
    // `validate` reports it with its field; a source built without validation refuses it too.
    let bad = config("a/#/b", &name("bad-client"));
    let error = build(&bad, &context()).await.err().expect("refused");
    assert!(error.to_string().contains("topic"), "{error}");
}

#[tokio::test]
async fn payloads_of_any_shape_become_events() {
    let topic = name("payloads");
    let client = name("payloads-client");
    let mut source = Running::start_subscribed(&config(&topic, &client), &topic).await;
    let payloads: Vec<Vec<u8>> = vec![
        br#"{"id": 7, "n": 1}"#.to_vec(),
        b"{not json".to_vec(),
        vec![0x00, 0x9f],
        Vec::new(),
        br#"["a", "b"]"#.to_vec(),
    ];
    publish_to(&topic, payloads.clone()).await;
    let mut datas = Vec::new();
    for _ in 0..payloads.len() {
        let delivery = source.next().await;
        assert_eq!(delivery.event.id().len(), 64, "content-derived id");
        datas.push(delivery.event.fields()["data"].clone());
        delivery.ack.ack().await.unwrap();
    }
    source.stop().await;
    for expected in [
        json!({"id": 7, "n": 1}),
        json!("{not json"),
        json!("AJ8="),
        json!(""),
        json!(["a", "b"]),
    ] {
        assert!(datas.contains(&expected), "{expected} in {datas:?}");
    }
    forget_session(&client).await;
}

#[test]
fn validation_names_the_field() {
    let check = |source: MqttSource| {
        let mut problems = Problems::new();
        source.validate("spec.source.mqtt", &mut problems);
        problems
            .into_vec()
            .into_iter()
            .map(|(path, _)| path)
            .collect::<Vec<_>>()
    };
    assert!(check(config("uploads/#", "c")).is_empty());
    assert!(check(config("$share/workers/uploads/+", "c")).is_empty());
    assert_eq!(
        check(config("uploads/#/x", "c")),
        ["spec.source.mqtt.topic"]
    );
    assert_eq!(check(config("$share/g", "c")), ["spec.source.mqtt.topic"]);
    assert_eq!(check(config("", "c")), ["spec.source.mqtt.topic"]);
    assert_eq!(check(config("a", "")), ["spec.source.mqtt.clientId"]);
    let mut qos2 = config("a", "c");
    qos2.qos = 2;
    assert_eq!(check(qos2), ["spec.source.mqtt.qos"]);
    let mut tls = config("a", "c");
    tls.url = Some("mqtts://broker:8883".to_string());
    assert_eq!(check(tls), ["spec.source.mqtt.url"]);
    let mut no_url = config("a", "c");
    no_url.url = None;
    assert_eq!(check(no_url), ["spec.source.mqtt.url"]);
    let mut keep_alive = config("a", "c");
    keep_alive.keep_alive = "soon".to_string();
    assert_eq!(check(keep_alive), ["spec.source.mqtt.keepAlive"]);
    let mut password = config("a", "c");
    password.password_from = Some(spate_sources::secret::SecretValue::Env("P".to_string()));
    assert_eq!(check(password), ["spec.source.mqtt.username"]);
}
