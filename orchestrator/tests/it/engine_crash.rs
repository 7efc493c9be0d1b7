//! `spate run` killed with SIGKILL in the middle of a 1,000-message burst and restarted:
//! every event ends with exactly one Job and every message is acknowledged, also while the
//! API server injects 429s and 5xx and drops watches.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{
    AMQP, await_jobs, connect_amqp, delete_queues, ids, list_jobs_per_event, messages_left,
    publish, spawn_spate_run, spawn_spate_run_with_metrics,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use spate_sim::{Faults, SimCluster, SimConfig};

async fn crash_and_recover(name: &str, mode: &str, faults: Faults) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events = 1000;
    let cluster = SimCluster::start(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let queue = format!("spate-crash-{name}-{}", std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("m", 0, events)).await;
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 100}}
  fanout: {{mode: {mode}, batchSize: 20, maxWait: 200ms, maxParallelism: 1000, maxJobsPerSecond: 2000, burst: 500}}
  retry: {{maxAttempts: 20, initialBackoff: 50ms, maxBackoff: 1s}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let selector = format!("spate.dev/pipeline={name}");

    let mut first = spawn_spate_run(&pipeline, &kubeconfig, &dir.path().join("state"));
    // Kill it once part of the burst has Jobs, with creates and acks surely in flight.
    await_jobs(
        &jobs,
        &selector,
        events / 4,
        Duration::from_millis(50),
        || async { Ok(()) },
    )
    .await;
    first.kill().unwrap();
    first.wait().unwrap();

    let mut second = spawn_spate_run(&pipeline, &kubeconfig, &dir.path().join("state"));
    let owners = await_jobs(
        &jobs,
        &selector,
        events,
        Duration::from_millis(200),
        || async {
            match messages_left(&connection, &queue).await {
                0 => Ok(()),
                left => Err(format!("every event has a Job, {left} still in the queue")),
            }
        },
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    assert!(
        owners.values().all(|count| *count == 1),
        "an event has two Jobs"
    );
    let expected: Vec<String> = {
        let mut ids: Vec<String> = (0..events).map(|i| format!("m-{i}")).collect();
        ids.sort();
        ids
    };
    assert_eq!(owners.keys().cloned().collect::<Vec<_>>(), expected);
    // Nothing unacknowledged is left: with the consumer gone, every message would be Ready.
    assert_eq!(messages_left(&connection, &queue).await, 0);
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_per_event_loses_nothing_and_runs_nothing_twice() {
    crash_and_recover("crash-per-event", "perEvent", Faults::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_indexed_loses_nothing_and_runs_nothing_twice() {
    crash_and_recover("crash-indexed", "indexed", Faults::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_under_api_faults() {
    let faults = Faults {
        throttle_rate: 0.05,
        error_rate: 0.05,
        drop_watches_after_seconds: Some(2),
        ..Faults::default()
    };
    crash_and_recover("crash-faults", "perEvent", faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_creates_in_flight_and_acknowledges_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events = 600;
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let queue = format!("spate-sigterm-{}", std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("m", 0, events)).await;
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: sigterm
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 100}}
  fanout: {{maxParallelism: 1000, maxJobsPerSecond: 200, burst: 10}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let port = crate::common::free_port();
    let mut spate = spawn_spate_run_with_metrics(
        &pipeline,
        &kubeconfig,
        &dir.path().join("state"),
        &format!("127.0.0.1:{port}"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while list_jobs_per_event(&jobs, "spate.dev/pipeline=sigterm")
        .await
        .len()
        < 100
    {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // While it runs: healthy, ready (its Job watch has listed), counting in Prometheus form.
    assert!(http_get(port, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(http_get(port, "/readyz").await.starts_with("HTTP/1.1 200"));
    let metrics = http_get(port, "/metrics").await;
    for series in [
        "spate_events_received_total{pipeline=\"default/sigterm\"}",
        "spate_jobs_created_total{pipeline=\"default/sigterm\"}",
        "spate_event_to_job_seconds_bucket{",
        "spate_job_create_seconds_count{",
        "spate_pods_in_budget{",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    let signalled = Command::new("kill")
        .args(["-TERM", &spate.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::task::spawn_blocking(move || spate.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "spate exited with {status}");

    // Consumer gone: unacknowledged messages are Ready again. Each message either has its Job
    // (and was acknowledged) or is back in the queue; none is both, none is neither.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let owners = list_jobs_per_event(&jobs, "spate.dev/pipeline=sigterm").await;
    assert!(owners.values().all(|count| *count == 1));
    let left = messages_left(&connection, &queue).await as usize;
    assert!(
        owners.len() < events,
        "the burst finished before SIGTERM; the test proves nothing"
    );
    assert_eq!(
        owners.len() + left,
        events,
        "{} Jobs + {left} messages left",
        owners.len()
    );
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
