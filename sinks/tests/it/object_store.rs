//! The objectStore sink against a real S3 server (moto, started by `scripts/s3-server`) and a
//! local folder: a batch of results becomes one JSON-lines manifest that reads back as sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use futures::future::BoxFuture;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde_json::json;
use spate_sinks::object_store::ObjectStoreSink;
use spate_sinks::{Outcome, PipelineRef, Record, Sink, SinkConfig, SinkContext};
use spate_sources::object_store::ObjectStoreCredentials;
use spate_sources::object_store::store::{self, Bucket, BucketConfig};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use tokio::sync::OnceCell;

const ENDPOINT: &str = "http://127.0.0.1:9090";

/// Starts the S3 server once for the whole file; the script is a no-op when it already runs.
async fn s3_server() {
    static STARTED: OnceCell<()> = OnceCell::const_new();
    STARTED
        .get_or_init(|| async {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
            let status = tokio::process::Command::new(script)
                .arg("start")
                .status()
                .await
                .expect("run scripts/s3-server");
            assert!(status.success(), "scripts/s3-server start failed");
        })
        .await;
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

async fn new_bucket(test: &str) -> String {
    s3_server().await;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("spate-sink-{test}-{}-{nanos}", std::process::id());
    let response = reqwest::Client::new()
        .put(format!("{ENDPOINT}/{name}"))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "create bucket: {response:?}"
    );
    name
}

fn context() -> SinkContext {
    SinkContext {
        pipeline: PipelineRef {
            namespace: "default".into(),
            name: "thumbs".into(),
            uid: None,
        },
        secrets: Arc::new(TestKeys),
        kube: None,
    }
}

fn records() -> Vec<Record> {
    vec![
        Record {
            pipeline: "default/thumbs".into(),
            outcome: Outcome::Succeeded,
            event: json!({"id": "a1", "key": "in/a b.jpg", "size": 3}),
            job: Some("thumbs-a1".into()),
            reason: None,
            at: "2026-05-01T10:00:01Z".into(),
        },
        Record {
            pipeline: "default/thumbs".into(),
            outcome: Outcome::DeadLettered,
            event: json!({"id": "b2", "key": "in/日本.jpg"}),
            job: None,
            reason: Some("template error: missing field".into()),
            at: "2026-05-01T10:00:02Z".into(),
        },
    ]
}

/// Every manifest under `prefix`, read back as records.
async fn manifests(bucket: &Bucket, prefix: &str) -> Vec<(String, Vec<Record>)> {
    let listed: Vec<_> = bucket
        .store()
        .list(Some(&Path::from(prefix)))
        .try_collect()
        .await
        .unwrap();
    let mut manifests = Vec::new();
    for meta in listed {
        let body = bucket
            .store()
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let records = std::str::from_utf8(&body)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        manifests.push((meta.location.to_string(), records));
    }
    manifests
}

#[tokio::test]
async fn a_batch_becomes_one_manifest_that_a_retry_overwrites() {
    let name = new_bucket("manifest").await;
    let config = SinkConfig::ObjectStore(ObjectStoreSink {
        url: format!("s3://{name}"),
        prefix: Some("results/".into()),
        endpoint: Some(ENDPOINT.into()),
        region: Some("us-east-1".into()),
        credentials: Some(credentials()),
    });
    let sink: Box<dyn Sink> = config.build(&context()).await.unwrap();
    let records = records();
    sink.deliver(&records).await.unwrap();
    // The engine retries a delivery it did not see succeed: same batch, same manifest.
    sink.deliver(&records).await.unwrap();

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
    let written = manifests(&bucket, "results").await;
    assert_eq!(written.len(), 1, "{written:?}");
    let (key, read) = &written[0];
    assert!(key.starts_with("results/2026/05/01/100001-"), "{key}");
    assert!(key.ends_with(".jsonl"), "{key}");
    assert_eq!(read, &records);

    sink.deliver(&records[1..]).await.unwrap();
    assert_eq!(manifests(&bucket, "results").await.len(), 2);
    sink.deliver(&[]).await.unwrap();
    assert_eq!(
        manifests(&bucket, "results").await.len(),
        2,
        "nothing to write"
    );
}

#[tokio::test]
async fn a_local_folder_receives_manifests_too() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("results");
    let url = format!("file://{}", folder.to_str().unwrap());
    let config = SinkConfig::ObjectStore(ObjectStoreSink {
        url: url.clone(),
        prefix: None,
        endpoint: None,
        region: None,
        credentials: None,
    });
    let sink = config.build(&context()).await.unwrap();
    sink.deliver(&records()).await.unwrap();
    let bucket = store::open(
        BucketConfig {
            url: &url,
            endpoint: None,
            region: None,
            credentials: None,
        },
        &TestKeys,
    )
    .await
    .unwrap();
    let written = manifests(&bucket, "2026").await;
    assert_eq!(written.len(), 1);
    assert_eq!(written[0].1, records());
}
