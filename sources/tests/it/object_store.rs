//! The objectStore source against a real S3 server (moto, started by `scripts/s3-server`) and
//! a real local folder: what a user sees when objects land in a bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;
use spate_sources::checkpoint::{CheckpointStore, FileCheckpoints};
use spate_sources::object_store::store::{self, Bucket, BucketConfig};
use spate_sources::object_store::{
    ObjectStoreCredentials, ObjectStoreMode, ObjectStoreSource, created_objects,
};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::{Delivery, SourceContext};
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;

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

/// A new, empty bucket with a name no other test uses.
async fn new_bucket(test: &str) -> String {
    s3_server().await;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("spate-{test}-{}-{nanos}", std::process::id());
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

fn source(url: String) -> ObjectStoreSource {
    ObjectStoreSource {
        url,
        prefix: None,
        suffix: None,
        glob: None,
        endpoint: Some(ENDPOINT.to_string()),
        region: Some("us-east-1".to_string()),
        credentials: Some(credentials()),
        mode: ObjectStoreMode::Poll,
        poll_interval: "200ms".to_string(),
        notifications: None,
        presign_expiry: None,
    }
}

async fn open(bucket: &str) -> Bucket {
    store::open(
        BucketConfig {
            url: &format!("s3://{bucket}"),
            endpoint: Some(ENDPOINT),
            region: Some("us-east-1"),
            credentials: Some(&credentials()),
        },
        &TestKeys,
    )
    .await
    .unwrap()
}

/// Uploads `objects` 32 at a time.
async fn upload(bucket: &Bucket, objects: Vec<(String, Vec<u8>)>) {
    futures::stream::iter(objects)
        .map(|(key, body)| async move {
            let path = Path::parse(&key).unwrap();
            bucket
                .store()
                .put(&path, PutPayload::from(body))
                .await
                .unwrap_or_else(|e| panic!("upload {key}: {e}"));
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

struct Running {
    deliveries: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Takes exactly `n` deliveries, failing if they do not come within `within`.
    async fn take(&mut self, n: usize, within: Duration) -> Vec<Delivery> {
        let mut taken = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + within;
        while taken.len() < n {
            match tokio::time::timeout_at(deadline, self.deliveries.recv()).await {
                Ok(Some(delivery)) => taken.push(delivery),
                Ok(None) => panic!("the source stopped after {} deliveries", taken.len()),
                Err(_) => panic!("only {} of {n} deliveries came in {within:?}", taken.len()),
            }
        }
        taken
    }

    /// Asserts nothing more arrives for `quiet` (several poll intervals).
    async fn assert_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(delivery)) = tokio::time::timeout(quiet, self.deliveries.recv()).await {
            panic!("unexpected event {}", delivery.event.to_json());
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

async fn start(config: &ObjectStoreSource, checkpoints: Arc<dyn CheckpointStore>) -> Running {
    let cx = SourceContext {
        pipeline: "default/thumbs".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints,
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = spate_sources::object_store::build(config, &cx)
        .await
        .unwrap_or_else(|e| panic!("build: {e}"));
    let (out, deliveries) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        source.run(out, stop).await.expect("source run");
    });
    Running {
        deliveries,
        shutdown,
        task,
    }
}

fn key_of(delivery: &Delivery) -> String {
    delivery.event.fields()["key"].as_str().unwrap().to_string()
}

async fn ack_all(deliveries: Vec<Delivery>) {
    futures::future::join_all(deliveries.into_iter().map(|d| d.ack.ack()))
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .unwrap();
}

/// Ten thousand objects under `bulk/`, uploaded once for the whole file: moto takes ~400
/// uploads a second, so one copy per test would not fit the file's minute. Tests only read
/// it, each with its own checkpoint; one that adds objects adds them outside `bulk/`.
async fn bulk_bucket() -> &'static str {
    static BULK: OnceCell<String> = OnceCell::const_new();
    BULK.get_or_init(|| async {
        let name = new_bucket("bulk").await;
        upload(&open(&name).await, numbered(10_000, "bulk/")).await;
        name
    })
    .await
}

fn numbered(n: usize, prefix: &str) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{prefix}{i:05}.dat"), i.to_string().into_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_objects_are_listed_through_pagination_once_each() {
    let name = bulk_bucket().await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = Arc::new(FileCheckpoints::new(dir.path()));
    let mut config = source(format!("s3://{name}"));
    config.prefix = Some("bulk/".to_string());

    let mut running = start(&config, checkpoints).await;
    let deliveries = running.take(10_000, Duration::from_secs(60)).await;
    let keys: BTreeSet<String> = deliveries.iter().map(key_of).collect();
    let ids: BTreeSet<String> = deliveries
        .iter()
        .map(|d| d.event.id().to_string())
        .collect();
    assert_eq!(keys.len(), 10_000, "every key once");
    assert_eq!(ids.len(), 10_000, "every object its own id");
    let first = deliveries[0].event.fields();
    assert_eq!(first["bucket"], json!(name));
    assert_eq!(
        first["url"],
        json!(format!("s3://{name}/{}", first["key"].as_str().unwrap()))
    );
    assert!(first["etag"].as_str().unwrap().starts_with('"'));
    assert!(first["lastModified"].as_str().unwrap().ends_with('Z'));
    ack_all(deliveries).await;
    running.assert_quiet(Duration::from_secs(2)).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_emits_only_unacked_and_new_objects_of_a_large_bucket() {
    let name = bulk_bucket().await;
    let bucket = open(name).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(FileCheckpoints::new(dir.path()));
    let config = source(format!("s3://{name}"));

    let mut first = start(&config, checkpoints.clone()).await;
    let deliveries = first.take(10_000, Duration::from_secs(60)).await;
    let (mut acked, mut dropped) = (Vec::new(), Vec::new());
    for (i, delivery) in deliveries.into_iter().enumerate() {
        if i % 2 == 0 {
            acked.push(delivery);
        } else {
            dropped.push(delivery);
        }
    }
    let unacked: BTreeSet<String> = dropped.iter().map(key_of).collect();
    ack_all(acked).await;
    first.stop().await;
    // The process dies with half its events unsettled.
    drop(dropped);
    upload(&bucket, numbered(3, "restart-new/")).await;

    let mut second = start(&config, checkpoints).await;
    let again = second.take(5_003, Duration::from_secs(60)).await;
    let keys: BTreeSet<String> = again.iter().map(key_of).collect();
    let new: BTreeSet<String> = numbered(3, "restart-new/")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let expected: BTreeSet<String> = unacked.union(&new).cloned().collect();
    assert_eq!(keys, expected);
    ack_all(again).await;
    second.assert_quiet(Duration::from_secs(1)).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwritten_object_is_a_new_event_and_retry_and_reject_behave() {
    let name = new_bucket("overwrite").await;
    let bucket = open(&name).await;
    upload(
        &bucket,
        vec![
            ("photo.jpg".into(), b"v1".to_vec()),
            ("again.jpg".into(), b"a".to_vec()),
            ("broken.jpg".into(), b"b".to_vec()),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut running = start(
        &source(format!("s3://{name}")),
        Arc::new(FileCheckpoints::new(dir.path())),
    )
    .await;
    let mut first: BTreeMap<String, Delivery> = running
        .take(3, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|d| (key_of(&d), d))
        .collect();
    let v1 = first.remove("photo.jpg").unwrap();
    let v1_id = v1.event.id().to_string();
    let v1_etag = v1.event.fields()["etag"].clone();
    v1.ack.ack().await.unwrap();
    let retried = first.remove("again.jpg").unwrap();
    let retried_id = retried.event.id().to_string();
    retried.ack.retry().await.unwrap();
    first
        .remove("broken.jpg")
        .unwrap()
        .ack
        .reject("template error".into())
        .await
        .unwrap();

    // The retried object comes back with the same id: it maps to the same Job.
    let back = running.take(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(back.event.id(), retried_id);
    back.ack.ack().await.unwrap();

    upload(&bucket, vec![("photo.jpg".into(), b"v2".to_vec())]).await;
    let v2 = running.take(1, Duration::from_secs(5)).await.remove(0);
    assert_eq!(key_of(&v2), "photo.jpg");
    assert_ne!(v2.event.id(), v1_id);
    assert_ne!(v2.event.fields()["etag"], v1_etag);
    v2.ack.ack().await.unwrap();
    running.assert_quiet(Duration::from_secs(1)).await;
    running.stop().await;
}

/// How S3 writes a key into an event notification: form-encoded, `+` for a space.
fn notification_key(key: &str) -> String {
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'*')
        .remove(b' ');
    utf8_percent_encode(key, KEEP).to_string().replace(' ', "+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_keys_round_trip_through_listings_and_notifications() {
    let name = new_bucket("keys").await;
    let bucket = open(&name).await;
    let keys = [
        "with space/a b.txt",
        "unicode/café 日本語.txt",
        "plus/a+b.txt",
        "percent/100%.txt",
        "percent/a%20b.txt",
        "mixed/x + y %2B z.txt",
    ];
    upload(
        &bucket,
        keys.iter()
            .map(|k| (k.to_string(), k.as_bytes().to_vec()))
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut running = start(
        &source(format!("s3://{name}")),
        Arc::new(FileCheckpoints::new(dir.path())),
    )
    .await;
    let deliveries = running.take(keys.len(), Duration::from_secs(10)).await;
    let listed: BTreeMap<String, &Delivery> = deliveries.iter().map(|d| (key_of(d), d)).collect();
    let uploaded: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
    assert_eq!(listed.keys().cloned().collect::<BTreeSet<_>>(), uploaded);

    for key in keys {
        let polled = listed[key].event.fields();
        let etag = polled["etag"].as_str().unwrap().trim_matches('"');
        let record = json!({"Records": [{
            "eventName": "ObjectCreated:Put",
            "eventTime": "2026-01-01T00:00:00.000Z",
            "s3": {
                "bucket": {"name": name},
                "object": {"key": notification_key(key), "size": key.len(), "eTag": etag}
            }
        }]});
        let notified = created_objects(&record).unwrap().remove(0);
        assert_eq!(notified.key, key, "encoded as {}", notification_key(key));
        assert_eq!(notified.id().to_string(), polled["id"].as_str().unwrap());
    }
    ack_all(deliveries).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suffix_and_glob_filters_pick_the_objects() {
    let name = new_bucket("filters").await;
    let bucket = open(&name).await;
    let all = [
        "in/a.jpg",
        "in/b.png",
        "in/c.gif",
        "in/sub/d.jpg",
        "in/sub/e.png",
        "out/f.jpg",
    ];
    upload(
        &bucket,
        all.iter().map(|k| (k.to_string(), b"x".to_vec())).collect(),
    )
    .await;
    let cases = [
        (
            Some("in/"),
            Some(".jpg"),
            None,
            vec!["in/a.jpg", "in/sub/d.jpg"],
        ),
        (
            None,
            None,
            Some("in/*.{jpg,png}"),
            vec!["in/a.jpg", "in/b.png"],
        ),
        (
            None,
            None,
            Some("**/*.{jpg,png}"),
            vec![
                "in/a.jpg",
                "in/b.png",
                "in/sub/d.jpg",
                "in/sub/e.png",
                "out/f.jpg",
            ],
        ),
        (
            Some("in/s"),
            Some(".png"),
            Some("in/**"),
            vec!["in/sub/e.png"],
        ),
    ];
    for (prefix, suffix, glob, expected) in cases {
        let mut config = source(format!("s3://{name}"));
        config.prefix = prefix.map(str::to_string);
        config.suffix = suffix.map(str::to_string);
        config.glob = glob.map(str::to_string);
        let dir = tempfile::tempdir().unwrap();
        let mut running = start(&config, Arc::new(FileCheckpoints::new(dir.path()))).await;
        let deliveries = running.take(expected.len(), Duration::from_secs(10)).await;
        let keys: BTreeSet<String> = deliveries.iter().map(key_of).collect();
        let expected: BTreeSet<String> = expected.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            keys, expected,
            "prefix {prefix:?} suffix {suffix:?} glob {glob:?}"
        );
        ack_all(deliveries).await;
        running.assert_quiet(Duration::from_millis(600)).await;
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presigned_url_fetches_the_object_without_credentials() {
    let name = new_bucket("presign").await;
    let bucket = open(&name).await;
    upload(
        &bucket,
        vec![("in/photo 1.jpg".into(), b"JPEGDATA".to_vec())],
    )
    .await;
    let mut config = source(format!("s3://{name}"));
    config.presign_expiry = Some("10m".to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut running = start(&config, Arc::new(FileCheckpoints::new(dir.path()))).await;
    let delivery = running.take(1, Duration::from_secs(10)).await.remove(0);
    let url = delivery.event.fields()["presignedUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let response = reqwest::get(&url).await.unwrap();
    assert!(response.status().is_success(), "{response:?}");
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"JPEGDATA");
    delivery.ack.ack().await.unwrap();
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_folder_is_a_bucket() {
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().to_str().unwrap().to_string();
    tokio::fs::create_dir_all(folder.path().join("in/deep"))
        .await
        .unwrap();
    tokio::fs::write(folder.path().join("in/a.jpg"), b"a")
        .await
        .unwrap();
    tokio::fs::write(folder.path().join("in/deep/b.jpg"), b"bb")
        .await
        .unwrap();
    tokio::fs::write(folder.path().join("in/c.txt"), b"c")
        .await
        .unwrap();
    let mut config = source(format!("file://{root}"));
    config.endpoint = None;
    config.region = None;
    config.credentials = None;
    config.suffix = Some(".jpg".to_string());
    config.presign_expiry = Some("1h".to_string());
    let dir = tempfile::tempdir().unwrap();
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(FileCheckpoints::new(dir.path()));

    let mut running = start(&config, checkpoints.clone()).await;
    let deliveries = running.take(2, Duration::from_secs(10)).await;
    let by_key: BTreeMap<String, &Delivery> = deliveries.iter().map(|d| (key_of(d), d)).collect();
    let b = by_key["in/deep/b.jpg"].event.fields();
    assert_eq!(b["bucket"], json!(root));
    assert_eq!(b["size"], json!(2));
    assert_eq!(b["url"], json!(format!("file://{root}/in/deep/b.jpg")));
    assert!(
        b.get("presignedUrl").is_none(),
        "a folder has no URLs to sign"
    );
    ack_all(deliveries).await;
    running.stop().await;

    tokio::fs::write(folder.path().join("in/d.jpg"), b"d")
        .await
        .unwrap();
    let mut again = start(&config, checkpoints).await;
    let new = again.take(1, Duration::from_secs(10)).await;
    assert_eq!(key_of(&new[0]), "in/d.jpg");
    ack_all(new).await;
    again.assert_quiet(Duration::from_millis(600)).await;
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_marker_is_not_an_object() {
    let name = new_bucket("markers").await;
    // What a console's "create folder" writes: an empty object whose key ends in `/`.
    let marker = reqwest::Client::new()
        .put(format!("{ENDPOINT}/{name}/photos/"))
        .send()
        .await
        .unwrap();
    assert!(marker.status().is_success(), "{marker:?}");
    let bucket = open(&name).await;
    upload(
        &bucket,
        vec![
            ("photos/a.jpg".into(), b"a".to_vec()),
            ("photos-empty.txt".into(), Vec::new()),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut running = start(
        &source(format!("s3://{name}")),
        Arc::new(FileCheckpoints::new(dir.path())),
    )
    .await;
    let deliveries = running.take(2, Duration::from_secs(10)).await;
    let keys: BTreeSet<String> = deliveries.iter().map(key_of).collect();
    let expected: BTreeSet<String> = ["photos/a.jpg", "photos-empty.txt"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(keys, expected, "an empty object is still an object");
    ack_all(deliveries).await;
    running.assert_quiet(Duration::from_millis(600)).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_stops_the_source_with_an_error() {
    s3_server().await;
    let cx = SourceContext {
        pipeline: "default/thumbs".to_string(),
        secrets: Arc::new(TestKeys),
        checkpoints: Arc::new(FileCheckpoints::new(std::env::temp_dir())),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let config = source("s3://spate-no-such-bucket".to_string());
    let source = spate_sources::object_store::build(&config, &cx)
        .await
        .unwrap();
    let (out, _deliveries) = mpsc::channel(4);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        source.run(out, CancellationToken::new()),
    )
    .await
    .expect("the source gives up at once");
    let error = result.unwrap_err().to_string();
    assert!(error.contains("NoSuchBucket"), "{error}");
}
