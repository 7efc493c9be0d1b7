//! The objectStore source in notifications mode, with S3 event notifications arriving on the
//! RabbitMQ at 127.0.0.1:5672 and the NATS server at 127.0.0.1:4222 (`scripts/services` starts
//! them) and on Spate's webhook server, as MinIO or Ceph publish them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use spate_sources::amqp::AmqpSource;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::nats::NatsSource;
use spate_sources::object_store::{
    NotificationTransport, ObjectStoreCredentials, ObjectStoreMode, ObjectStoreSource, build,
};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::webhook::{NoAuth, Respond, WebhookAuth, WebhookServer, WebhookSource};
use spate_sources::{Delivery, SourceContext};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS_URL: &str = "nats://127.0.0.1:4222";
const WAIT: Duration = Duration::from_secs(10);

/// Stands for the user's keys: signing is local, nothing checks them here.
struct TestKeys;

impl SecretResolver for TestKeys {
    fn resolve<'a>(&'a self, _: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async { Ok("test".to_string()) })
    }
}

fn record(event_name: &str, bucket: &str, encoded_key: &str, etag: &str) -> Value {
    json!({
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventTime": "2026-05-01T10:00:00.000Z",
        "eventName": event_name,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": encoded_key, "size": 42, "eTag": etag}
        }
    })
}

async fn publish(channel: &Channel, queue: &str, body: &[u8]) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
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

async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    timeout(WAIT, rx.recv())
        .await
        .expect("a delivery within 10s")
        .expect("the source is running")
}

fn key_of(delivery: &Delivery) -> String {
    delivery.event.fields()["key"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn each_created_object_of_a_notification_is_an_event_and_the_message_waits_for_all() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (run scripts/services)");
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queue = format!("spate-test-s3-notifications-{}", std::process::id());
    // A queue left behind by a failed run disappears on its own a minute later.
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();

    let uploads = json!({"Records": [
        record("s3:ObjectCreated:Put", "photos", "in/a+b%2B.jpg", "aaa"),
        record("s3:ObjectRemoved:Delete", "photos", "in/gone.jpg", "ggg"),
        record("s3:ObjectCreated:CompleteMultipartUpload", "photos", "in/caf%C3%A9.jpg", "ccc"),
        record("s3:ObjectCreated:Put", "other-bucket", "in/x.jpg", "xxx"),
        record("s3:ObjectCreated:Put", "photos", "in/readme.txt", "ttt"),
    ]});
    publish(&channel, &queue, uploads.to_string().as_bytes()).await;
    publish(&channel, &queue, b"not a notification").await;
    // A key S3 allows but no presigned URL can be made for.
    publish(
        &channel,
        &queue,
        json!({"Records": [record("s3:ObjectCreated:Put", "photos", "in/a//b.jpg", "bbb")]})
            .to_string()
            .as_bytes(),
    )
    .await;
    publish(
        &channel,
        &queue,
        json!({"Records": [{"eventName": "ObjectCreated:Put"}]})
            .to_string()
            .as_bytes(),
    )
    .await;

    let config = ObjectStoreSource {
        url: "s3://photos".to_string(),
        prefix: Some("in/".to_string()),
        suffix: Some(".jpg".to_string()),
        glob: None,
        endpoint: Some("http://127.0.0.1:9090".to_string()),
        region: Some("us-east-1".to_string()),
        // Presigning signs with these; without keys the AWS chain would go looking for
        // instance credentials.
        credentials: Some(ObjectStoreCredentials {
            access_key_id: SecretValue::Env("AWS_ACCESS_KEY_ID".into()),
            secret_access_key: SecretValue::Env("AWS_SECRET_ACCESS_KEY".into()),
        }),
        mode: ObjectStoreMode::Notifications,
        poll_interval: "10s".to_string(),
        notifications: Some(NotificationTransport::Amqp(AmqpSource {
            url: Some(URL.to_string()),
            url_from: None,
            queue: queue.clone(),
            prefetch: 8,
        })),
        presign_expiry: Some("15m".to_string()),
    };
    let cx = SourceContext {
        pipeline: "tests/s3-notifications".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));

    // Two created `.jpg` objects of this bucket: removals, other buckets and other suffixes
    // are not events. The three messages that cannot become events reach the engine whole,
    // refused with the reason, for the dead-letter sink.
    let mut first: BTreeMap<String, Delivery> = BTreeMap::new();
    let mut refused = Vec::new();
    for _ in 0..5 {
        let delivery = next(&mut rx).await;
        match &delivery.refusal {
            Some(reason) => refused.push((reason.clone(), delivery)),
            None => {
                first.insert(key_of(&delivery), delivery);
            }
        }
    }
    let reasons: Vec<&str> = refused.iter().map(|(reason, _)| reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].starts_with("not an S3 event notification"),
        "{reasons:?}"
    );
    assert_eq!(
        refused[0].1.event.fields()["data"],
        json!("not a notification")
    );
    assert!(
        reasons[1].starts_with("cannot presign `in/a//b.jpg`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].starts_with("not an S3 event notification"),
        "{reasons:?}"
    );
    // The engine dead-lettered them: rejected, they never come back.
    for (reason, delivery) in refused {
        delivery.ack.reject(reason).await.unwrap();
    }
    let keys: Vec<&str> = first.keys().map(String::as_str).collect();
    assert_eq!(keys, ["in/a b+.jpg", "in/café.jpg"]);
    let a = first["in/a b+.jpg"].event.to_json();
    assert_eq!(a["bucket"], json!("photos"));
    assert_eq!(a["url"], json!("s3://photos/in/a b+.jpg"));
    assert_eq!(a["etag"], json!("\"aaa\""));
    assert_eq!(a["size"], json!(42));
    assert_eq!(a["lastModified"], json!("2026-05-01T10:00:00.000Z"));
    assert!(
        a["presignedUrl"]
            .as_str()
            .unwrap()
            .contains("X-Amz-Signature=")
    );
    let ids: Vec<String> = first.values().map(|d| d.event.id().to_string()).collect();

    // One event retried: the whole message comes back, with the same ids.
    let mut first = first.into_values();
    first.next().unwrap().ack.retry().await.unwrap();
    first.next().unwrap().ack.ack().await.unwrap();
    let mut again = vec![next(&mut rx).await, next(&mut rx).await];
    again.sort_by_key(key_of);
    let again_ids: Vec<String> = again.iter().map(|d| d.event.id().to_string()).collect();
    assert_eq!(again_ids, ids);
    for delivery in again {
        delivery.ack.ack().await.unwrap();
    }
    if let Ok(Some(delivery)) = timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("unexpected delivery {}", delivery.event.to_json());
    }
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();

    assert_eq!(ready(&channel, &queue).await, 0, "everything settled");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn notifications_on_a_nats_subject_become_object_events() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let subject = format!("spate.test.s3.{}", std::process::id());
    let config = ObjectStoreSource {
        url: "s3://photos".to_string(),
        prefix: None,
        suffix: None,
        glob: Some("in/**/*.{jpg,png}".to_string()),
        endpoint: Some("http://127.0.0.1:9090".to_string()),
        region: Some("us-east-1".to_string()),
        credentials: None,
        mode: ObjectStoreMode::Notifications,
        poll_interval: "10s".to_string(),
        notifications: Some(NotificationTransport::Nats(NatsSource {
            url: NATS_URL.to_string(),
            subject: subject.clone(),
            jetstream: None,
        })),
        presign_expiry: None,
    };
    let cx = SourceContext {
        pipeline: "tests/s3-notifications-nats".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));

    let client = async_nats::connect(NATS_URL)
        .await
        .expect("nats-server on 127.0.0.1:4222 (run scripts/services)");
    let document = json!({"Records": [
        record("ObjectCreated:Put", "photos", "in/2026/x+y.png", "ppp"),
        record("ObjectCreated:Put", "photos", "in/x.gif", "ggg"),
    ]})
    .to_string();
    // A core subscription only sees what is published after it exists: publish until the
    // source has subscribed.
    let delivery = timeout(WAIT, async {
        loop {
            client
                .publish(subject.clone(), document.clone().into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            if let Ok(Some(delivery)) = timeout(Duration::from_millis(200), rx.recv()).await {
                break delivery;
            }
        }
    })
    .await
    .expect("an event within 10s");
    assert_eq!(delivery.event.fields()["key"], json!("in/2026/x y.png"));
    delivery.ack.ack().await.unwrap();
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn notifications_posted_to_a_webhook_become_object_events() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = WebhookServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let stop_server = CancellationToken::new();
    let serving = server.clone();
    let token = stop_server.clone();
    tokio::spawn(async move { serving.serve(token).await });

    let config = ObjectStoreSource {
        url: "s3://photos".to_string(),
        prefix: Some("in/".to_string()),
        suffix: None,
        glob: None,
        endpoint: Some("http://127.0.0.1:9090".to_string()),
        region: Some("us-east-1".to_string()),
        credentials: None,
        mode: ObjectStoreMode::Notifications,
        poll_interval: "10s".to_string(),
        notifications: Some(NotificationTransport::Webhook(WebhookSource {
            path: "/hooks/minio".to_string(),
            auth: WebhookAuth::None(NoAuth {}),
            max_body_bytes: 64 * 1024,
            respond: Respond::AfterJob,
            response_timeout: "10s".into(),
        })),
        presign_expiry: None,
    };
    let cx = SourceContext {
        pipeline: "tests/s3-notifications-webhook".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: Some(server.clone()),
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));

    let document = json!({"Records": [
        record("s3:ObjectCreated:Put", "photos", "in/r%C3%A9sum%C3%A9+final.pdf", "ddd"),
        record("s3:ObjectCreated:Put", "photos", "out/skip.pdf", "sss"),
    ]});
    let url = format!("http://{}/hooks/minio", server.local_addr());
    // The caller is answered once every object in the notification has its Job, so it posts
    // from a task while the test plays the engine.
    let posting = tokio::spawn(async move {
        let http = reqwest::Client::new();
        // The source attaches to its path as it starts running: post until it is there.
        for _ in 0..50 {
            let response = http
                .post(&url)
                .header("content-type", "application/json")
                .body(document.to_string())
                .send()
                .await
                .unwrap();
            if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return response.status();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the webhook never took the notification");
    });
    let delivery = next(&mut rx).await;
    assert_eq!(delivery.event.fields()["key"], json!("in/résumé final.pdf"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !posting.is_finished(),
        "the caller was answered before the object's Job existed"
    );
    delivery.ack.ack().await.unwrap();
    let status = timeout(WAIT, posting).await.unwrap().unwrap();
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    if let Ok(Some(delivery)) = timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected delivery {}", delivery.event.to_json());
    }
    shutdown.cancel();
    timeout(WAIT, task).await.unwrap().unwrap().unwrap();
    stop_server.cancel();
}

#[tokio::test]
async fn a_transport_that_cannot_start_stops_the_source_with_its_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ObjectStoreSource {
        url: "s3://photos".to_string(),
        prefix: None,
        suffix: None,
        glob: None,
        endpoint: None,
        region: Some("us-east-1".to_string()),
        credentials: None,
        mode: ObjectStoreMode::Notifications,
        poll_interval: "10s".to_string(),
        notifications: Some(NotificationTransport::Amqp(AmqpSource {
            url: Some(URL.to_string()),
            url_from: None,
            queue: format!("spate-test-no-such-queue-{}", std::process::id()),
            prefetch: 8,
        })),
        presign_expiry: None,
    };
    let cx = SourceContext {
        pipeline: "tests/s3-notifications-missing".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = build(&config, &cx).await.unwrap();
    let (tx, _rx) = mpsc::channel(4);
    let result = timeout(WAIT, source.run(tx, CancellationToken::new()))
        .await
        .expect("the source stops by itself");
    let error = result.unwrap_err().to_string();
    assert!(error.contains("no-such-queue"), "{error}");
}
