//! The engine end to end with the other at-least-once sources: 500 uploads to a real S3
//! server (moto, `scripts/s3-server`) and 500 messages on a NATS JetStream stream become 500
//! processed items on the simulator's virtual node, within the budget, back to zero after.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use common::{Observer, job_template, start_engine};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use spate_sim::{SimCluster, SimConfig};

const S3: &str = "http://127.0.0.1:9090";

async fn s3_server() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
    let status = tokio::process::Command::new(script)
        .arg("start")
        .status()
        .await
        .expect("run scripts/s3-server");
    assert!(status.success(), "scripts/s3-server start failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_uploads_become_five_hundred_items() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    s3_server().await;
    let bucket = format!("spate-engine-{}", std::process::id());
    let http = reqwest::Client::new();
    assert!(
        http.put(format!("{S3}/{bucket}"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let keys: Vec<String> = (0..500)
        .map(|i| format!("uploads/photo {i:03}.jpg"))
        .collect();
    futures::stream::iter(keys.iter())
        .for_each_concurrent(32, |key| {
            let (http, bucket) = (http.clone(), bucket.clone());
            async move {
                let url = format!("{S3}/{bucket}/{}", key.replace(' ', "%20"));
                let response = http
                    .put(url)
                    .body(format!("image {key}"))
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success());
            }
        })
        .await;

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    // The bucket's keys come from a Secret, as they would in a cluster.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let data = BTreeMap::from([
        ("id".to_string(), ByteString(b"test".to_vec())),
        ("secret".to_string(), ByteString(b"test".to_vec())),
    ]);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("bucket-keys".to_string()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let name = "uploads";
    let observer = Observer::start(&client, name);
    let state = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    objectStore:
      url: s3://{bucket}
      prefix: uploads/
      suffix: .jpg
      endpoint: {S3}
      region: us-east-1
      pollInterval: 500ms
      credentials:
        accessKeyId: {{secretKeyRef: {{name: bucket-keys, key: id}}}}
        secretAccessKey: {{secretKeyRef: {{name: bucket-keys, key: secret}}}}
  fanout: {{maxParallelism: 25, maxJobsPerSecond: 1000, burst: 100}}
  ttlSecondsAfterFinished: 1
{template}"#,
        template = job_template(0.2),
    );
    let engine = start_engine(&client, &yaml, state.path()).await;
    // Object events are named by bucket, key and ETag; collect the ids the Jobs carry and
    // check they are exactly one per uploaded key.
    let expected_keys: HashSet<String> = keys.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let ids = loop {
        let ids = observer.event_ids();
        if ids.len() >= keys.len() {
            break ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 500 uploads have a Job",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    observer.expect_one_complete_job_per_event(&ids).await;
    let keys_run: HashSet<String> = observer.event_keys();
    assert_eq!(keys_run, expected_keys, "every upload, exactly as named");
    observer.expect_back_to_zero().await;
    engine.shutdown().await;
    let census = observer.finish();
    assert!(census.peak > 0 && census.peak <= 25, "peak {}", census.peak);
    assert!(census.on_virtual_only());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_jetstream_messages_become_indexed_jobs() {
    jetstream_burst("indexed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_jetstream_messages_become_one_job_each() {
    jetstream_burst("perEvent").await;
}

async fn jetstream_burst(mode: &str) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let nats = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("NATS on 127.0.0.1:4222 (scripts/services starts it)");
    let jetstream = async_nats::jetstream::new(nats);
    let tag = format!("{}_{}", std::process::id(), mode.to_lowercase());
    let stream = format!("SPATE_ENGINE_{tag}");
    let subject = format!("spate.engine.{tag}.uploaded");
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..500 {
        jetstream
            .publish(subject.clone(), format!("{{\"n\":{i}}}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let name = format!("jetstream-{}", mode.to_lowercase());
    let observer = Observer::start(&client, &name);
    let state = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    nats:
      url: nats://127.0.0.1:4222
      subject: {subject}
      jetstream: {{stream: {stream}, durable: spate-engine, ackWait: 30s}}
  fanout: {{mode: {mode}, batchSize: 50, maxWait: 500ms, maxParallelism: 40, maxJobsPerSecond: 1000, burst: 100}}
  ttlSecondsAfterFinished: 1
{template}"#,
        template = job_template(0.2),
    );
    let engine = start_engine(&client, &yaml, state.path()).await;
    let expected: HashSet<String> = (1..=500)
        .map(|sequence| format!("{stream}:{sequence}"))
        .collect();
    observer.expect_one_complete_job_per_event(&expected).await;
    observer.expect_back_to_zero().await;
    engine.shutdown().await;
    let census = observer.finish();
    assert!(census.peak > 0 && census.peak <= 40, "peak {}", census.peak);
    // Every message was acknowledged: the durable consumer has nothing pending.
    assert_eq!(unsettled(&jetstream, &stream).await, (0, 0));
    jetstream.delete_stream(&stream).await.unwrap();
    cluster.shutdown().await;
}

/// What the durable consumer `spate-engine` of `stream` holds: (delivered and not settled,
/// not delivered yet).
async fn unsettled(jetstream: &async_nats::jetstream::Context, stream: &str) -> (usize, u64) {
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer("spate-engine")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// Also: a pipeline whose source fails for good stops alone, not the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_calls_become_jobs_through_spate_run() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: hooks
spec:
  source:
    webhook:
      path: /hooks/checks
      auth: {{bearer: {{token: {{env: SPATE_TEST_WEBHOOK_TOKEN}}}}}}
  fanout: {{maxParallelism: 50, maxJobsPerSecond: 1000, burst: 100}}
{template}
---
# Refused by RabbitMQ for good: this pipeline stops, the webhook one above keeps running.
apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: refused
spec:
  source:
    amqp: {{url: "amqp://nobody:wrong@127.0.0.1:5672/%2f", queue: spate-refused}}
{template}"#,
            template = job_template(0.2)
        ),
    )
    .unwrap();
    let port = crate::common::free_port();
    let mut spate = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["run", "--metrics-listen", "127.0.0.1:0", "--webhook-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("-f")
        .arg(&pipeline)
        .env("SPATE_TEST_WEBHOOK_TOKEN", "s3cret")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(common::KillOnDrop)
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/hooks/checks");
    let http = reqwest::Client::new();
    let post = |key: String, token: &'static str| {
        http.post(&url)
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .header("content-type", "application/json")
            .body(r#"{"target": "https://example.test"}"#)
            .send()
    };
    // The server comes up with the engine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while post("call-0".to_string(), "s3cret")
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 202
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "webhook server never answered 202"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 1..20 {
        assert_eq!(
            post(format!("call-{i}"), "s3cret").await.unwrap().status(),
            202
        );
    }
    // A retry of the same call maps to the same Job; a wrong token gets nothing.
    assert_eq!(
        post("call-3".to_string(), "s3cret").await.unwrap().status(),
        202
    );
    assert_eq!(
        post("call-x".to_string(), "wrong").await.unwrap().status(),
        401
    );

    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(cluster.client(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = jobs
            .list(&kube::api::ListParams::default().labels("spate.dev/pipeline=hooks"))
            .await
            .unwrap();
        let owners = common::jobs_per_event(&list.items);
        if owners.len() == 20 {
            assert!(owners.values().all(|n| *n == 1), "{owners:?}");
            assert!(
                owners.keys().all(|id| id.starts_with("call-")),
                "{owners:?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 20 calls have a Job",
            owners.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The refused pipeline's source has long given up; the process still serves the other.
    assert!(
        spate.try_wait().unwrap().is_none(),
        "spate run exited when one of its pipelines failed"
    );
    let _ = spate.kill();
    let _ = spate.wait();
    cluster.shutdown().await;
}

/// An S3 notification that cannot be read reaches the dead-letter sink whole, with the
/// reason, and is then terminated at its transport; the readable one beside it becomes a Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_s3_notification_is_dead_lettered_whole() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    s3_server().await;
    let nats = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("NATS on 127.0.0.1:4222 (scripts/services starts it)");
    let jetstream = async_nats::jetstream::new(nats.clone());
    let tag = std::process::id();
    let stream = format!("SPATE_ENGINE_NOTIFICATIONS_{tag}");
    let subject = format!("spate.engine.{tag}.notifications");
    let dead_letters = format!("spate.engine.{tag}.dead-letters");
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut dead_letter_feed = nats.subscribe(dead_letters.clone()).await.unwrap();
    let created = serde_json::json!({"Records": [{
        "eventName": "ObjectCreated:Put",
        "eventTime": "2026-05-01T10:00:00.000Z",
        "s3": {"bucket": {"name": "photos"},
               "object": {"key": "in/a.jpg", "size": 42, "eTag": "aaa"}}
    }]});
    for body in [created.to_string(), "not a notification".to_string()] {
        jetstream
            .publish(subject.clone(), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let state = tempfile::tempdir().unwrap();
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: notified
  namespace: default
spec:
  source:
    objectStore:
      url: s3://photos
      endpoint: {S3}
      region: us-east-1
      mode: notifications
      notifications:
        nats:
          url: nats://127.0.0.1:4222
          subject: {subject}
          jetstream: {{stream: {stream}, durable: spate-engine, ackWait: 30s}}
  sinks:
    deadLetter: {{nats: {{url: "nats://127.0.0.1:4222", subject: {dead_letters}}}}}
  fanout: {{maxParallelism: 10, maxJobsPerSecond: 1000, burst: 100}}
{template}"#,
        template = job_template(0.2),
    );
    let engine = start_engine(&client, &yaml, state.path()).await;

    let letter = tokio::time::timeout(Duration::from_secs(30), dead_letter_feed.next())
        .await
        .expect("a dead letter within 30 s")
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(record["outcome"], "deadLettered", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .starts_with("not an S3 event notification"),
        "{record}"
    );
    assert_eq!(record["event"]["data"], "not a notification", "{record}");

    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::default_namespaced(client.clone());
    let listed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let listed = jobs
                .list(&kube::api::ListParams::default().labels("spate.dev/pipeline=notified"))
                .await
                .unwrap();
            if !listed.items.is_empty() {
                break listed;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("a Job within 30 s");
    assert_eq!(
        listed.items.len(),
        1,
        "one Job, for the readable notification"
    );
    // Both messages are settled: the Job's acknowledged, the dead letter's terminated. Acks
    // are sent without waiting for the server, so this is looked at until it holds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while unsettled(&jetstream, &stream).await != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "unsettled (ack pending, pending): {:?}",
            unsettled(&jetstream, &stream).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine.shutdown().await;
    jetstream.delete_stream(&stream).await.unwrap();
    cluster.shutdown().await;
}
