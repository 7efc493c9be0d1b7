//! The objectStore source while its S3 server stops answering: moto (`scripts/s3-server`) is
//! frozen with SIGSTOP in the middle of polling, for longer than a poll interval and the
//! client's patience, then thawed with SIGCONT. moto keeps its buckets in memory, so a frozen
//! server is the outage a test can bring back from with the data intact.
//!
//! A file of its own: cargo runs test binaries one after another, so freezing the shared
//! server stalls no other test.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::object_store::store::{self, Bucket, BucketConfig};
use spate_sources::object_store::{ObjectStoreCredentials, ObjectStoreMode, ObjectStoreSource};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::{Delivery, SourceContext};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const ENDPOINT: &str = "http://127.0.0.1:9090";

/// moto accepts any key.
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

async fn upload(bucket: &Bucket, keys: impl IntoIterator<Item = String>) {
    for key in keys {
        bucket
            .store()
            .put(
                &Path::parse(&key).unwrap(),
                PutPayload::from(key.clone().into_bytes()),
            )
            .await
            .unwrap_or_else(|e| panic!("upload {key}: {e}"));
    }
}

/// The pid of the moto server `scripts/s3-server` started.
fn moto_pid() -> String {
    std::fs::read_to_string("/tmp/spate-s3/moto.pid")
        .expect("scripts/s3-server writes /tmp/spate-s3/moto.pid")
        .trim()
        .to_string()
}

fn signal(name: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Thaws the server even when the test fails, so later tests find it answering.
struct Frozen(String);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("CONT", &self.0);
    }
}

async fn receive(deliveries: &mut mpsc::Receiver<Delivery>, seen: &mut Vec<String>, until: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < until {
        let delivery = tokio::time::timeout_at(deadline, deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {until} objects delivered", seen.len()))
            .expect("the source keeps running through the outage");
        seen.push(delivery.event.fields()["key"].as_str().unwrap().to_string());
        delivery.ack.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_a_frozen_s3_server_and_loses_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
    let status = std::process::Command::new(script)
        .arg("start")
        .status()
        .unwrap();
    assert!(status.success(), "scripts/s3-server start failed");
    let name = format!("spate-outage-{}", std::process::id());
    let created = reqwest::Client::new()
        .put(format!("{ENDPOINT}/{name}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
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
    let before: Vec<String> = (0..40).map(|i| format!("in/before-{i:03}.bin")).collect();
    upload(&bucket, before.clone()).await;

    let state = tempfile::tempdir().unwrap();
    let config = ObjectStoreSource {
        url: format!("s3://{name}"),
        prefix: Some("in/".to_string()),
        suffix: None,
        glob: None,
        endpoint: Some(ENDPOINT.to_string()),
        region: Some("us-east-1".to_string()),
        credentials: Some(credentials()),
        mode: ObjectStoreMode::Poll,
        poll_interval: "200ms".to_string(),
        notifications: None,
        presign_expiry: None,
    };
    let cx = SourceContext {
        pipeline: "default/outage".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(state.path())),
        state_dir: state.path().to_path_buf(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = spate_sources::object_store::build(&config, &cx)
        .await
        .unwrap();
    let (out, mut deliveries) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(source.run(out, shutdown.clone()));

    let mut seen = Vec::new();
    receive(&mut deliveries, &mut seen, 40).await;

    // Frozen for many poll intervals: listings in flight hang, later ones cannot connect.
    let frozen = Frozen(moto_pid());
    signal("STOP", &frozen.0);
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(frozen);

    let after: Vec<String> = (0..40).map(|i| format!("in/after-{i:03}.bin")).collect();
    upload(&bucket, after.clone()).await;
    receive(&mut deliveries, &mut seen, 80).await;
    // A few more polls: nothing acknowledged comes back.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(2), deliveries.recv()).await {
        panic!("delivered again: {}", extra.event.to_json());
    }

    let expected: BTreeSet<String> = before.into_iter().chain(after).collect();
    let delivered: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        delivered, expected,
        "every object before and after the outage"
    );
    assert_eq!(seen.len(), expected.len(), "no object delivered twice");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
