//! The AWS-native notification path end to end, on moto (`scripts/s3-server`): a bucket
//! configured to notify an SQS queue, objects uploaded, and the objectStore source reading
//! the queue in notifications mode.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::json;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::object_store::store::{self, BucketConfig};
use spate_sources::object_store::{
    NotificationTransport, ObjectId, ObjectStoreCredentials, ObjectStoreMode, ObjectStoreSource,
    SqsQueue, build,
};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::{Delivery, SourceContext};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const ENDPOINT: &str = "http://127.0.0.1:9090";
/// moto's account.
const ACCOUNT: &str = "123456789012";

async fn s3_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
    let status = tokio::process::Command::new(script)
        .arg("start")
        .status()
        .await
        .expect("run scripts/s3-server");
    assert!(status.success(), "scripts/s3-server start failed");
}

/// moto accepts any key; these stand for the user's.
struct TestKeys;

impl SecretResolver for TestKeys {
    fn resolve<'a>(&'a self, _: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async { Ok("test".to_string()) })
    }
}

fn credentials() -> ObjectStoreCredentials {
    ObjectStoreCredentials {
        access_key_id: SecretValue::Env("AWS_ACCESS_KEY_ID".into()),
        secret_access_key: SecretValue::Env("AWS_SECRET_ACCESS_KEY".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_uploaded_to_a_bucket_arrive_through_sqs_with_their_polling_ids() {
    s3_server().await;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("spate-sqs-{}-{nanos}", std::process::id());
    let http = reqwest::Client::new();
    let created = http.put(format!("{ENDPOINT}/{name}")).send().await.unwrap();
    assert!(created.status().is_success(), "{created:?}");

    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(ENDPOINT)
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
                    .build_https(),
            )
            .build(),
    );
    let queue_url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let notification = format!(
        "<NotificationConfiguration><QueueConfiguration><Id>spate</Id>\
         <Queue>arn:aws:sqs:us-east-1:{ACCOUNT}:{name}</Queue>\
         <Event>s3:ObjectCreated:*</Event></QueueConfiguration></NotificationConfiguration>"
    );
    let configured = http
        .put(format!("{ENDPOINT}/{name}?notification"))
        .body(notification)
        .send()
        .await
        .unwrap();
    assert!(configured.status().is_success(), "{configured:?}");

    let bucket = store::open(
        BucketConfig {
            url: &format!("s3://{name}"),
            endpoint: Some(ENDPOINT),
            region: Some("us-east-1"),
            credentials: Some(&credentials()),
        },
        &TestKeys,
    )
    .await
    .unwrap();
    let mut expected = BTreeMap::new();
    for key in ["in/a b+c.jpg", "in/café 100%.jpg", "in/notes.txt"] {
        let put = bucket
            .store()
            .put(
                &Path::parse(key).unwrap(),
                PutPayload::from(key.as_bytes().to_vec()),
            )
            .await
            .unwrap();
        let etag = put.e_tag.unwrap();
        expected.insert(
            key.to_string(),
            ObjectId::new(&name, key, &etag).to_string(),
        );
    }
    expected.remove("in/notes.txt");

    let config = ObjectStoreSource {
        url: format!("s3://{name}"),
        prefix: None,
        suffix: Some(".jpg".to_string()),
        glob: None,
        endpoint: Some(ENDPOINT.to_string()),
        region: Some("us-east-1".to_string()),
        credentials: Some(credentials()),
        mode: ObjectStoreMode::Notifications,
        poll_interval: "10s".to_string(),
        notifications: Some(NotificationTransport::Sqs(SqsQueue {
            queue_url: queue_url.clone(),
            region: None,
            endpoint: None,
        })),
        presign_expiry: None,
    };
    let cx = SourceContext {
        pipeline: "tests/sqs".to_string(),
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

    let mut received = BTreeMap::new();
    for _ in 0..expected.len() {
        let delivery: Delivery = timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("an event within 20s")
            .expect("the source is running");
        let event = delivery.event.to_json();
        assert_eq!(event["bucket"], json!(name));
        assert_eq!(
            event["url"],
            json!(format!("s3://{name}/{}", event["key"].as_str().unwrap()))
        );
        received.insert(
            event["key"].as_str().unwrap().to_string(),
            delivery.event.id().to_string(),
        );
        delivery.ack.ack().await.unwrap();
    }
    assert_eq!(
        received, expected,
        "decoded keys, and the ids polling gives"
    );
    if let Ok(Some(delivery)) = timeout(Duration::from_secs(1), rx.recv()).await {
        panic!("unexpected event {}", delivery.event.to_json());
    }
    shutdown.cancel();
    timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // Acked messages (and the `.txt` one, which had nothing for this source) are deleted.
    let left = sqs
        .receive_message()
        .queue_url(&queue_url)
        .wait_time_seconds(1)
        .send()
        .await
        .unwrap();
    assert!(left.messages.unwrap_or_default().is_empty());
}
