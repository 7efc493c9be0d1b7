//! The engine end to end with a Redis stream on 127.0.0.1:6379 (started with
//! `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no`):
//! 1,000 entries become exactly 1,000 Jobs, also when `spate run -f` is killed with SIGKILL
//! mid-burst and restarted, and nothing is left pending in the consumer group; run by the
//! in-cluster controller, the Pipeline's status shows the stream's lag falling to zero.
//!
//! Redis is driven with `redis-cli` (installed with redis-server), each test on a stream of
//! its own that it deletes.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Observer, await_jobs, install_crd, job_template, list_jobs_per_event, redis_cli,
    spawn_spate_run, start_engine,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use spate::engine::EngineOptions;
use spate::engine::controller::{self, ControllerOptions, PAUSED_ANNOTATION};
use spate::engine::leader::LeaseConfig;
use spate::pipeline::{Pipeline, PipelineStatus};
use spate_sim::{SimCluster, SimConfig};
use spate_sources::checkpoint::FileCheckpoints;
use tokio_util::sync::CancellationToken;

const URL: &str = "redis://127.0.0.1:6379";

/// Adds `count` entries `n=<i>` to a fresh `stream`; the event ids they become.
fn add_entries(stream: &str, count: usize) -> HashSet<String> {
    redis_cli(&[format!("DEL {stream}")]);
    let commands: Vec<String> = (0..count)
        .map(|n| format!("XADD {stream} * n {n}"))
        .collect();
    let ids: HashSet<String> = redis_cli(&commands)
        .into_iter()
        .map(|id| format!("{stream}:{id}"))
        .collect();
    assert_eq!(ids.len(), count);
    ids
}

/// Entries delivered to some consumer of `group` and not acknowledged.
fn pending(stream: &str, group: &str) -> u64 {
    let lines = redis_cli(&[format!("XPENDING {stream} {group}")]);
    lines
        .first()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("XPENDING answered {lines:?}"))
}

async fn wait_nothing_pending(stream: &str, group: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = pending(stream, group);
        if left == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} entries still pending"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_entries_become_exactly_a_thousand_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let stream = format!("spate-engine-redis-{}", std::process::id());
    let expected = add_entries(&stream, 1000);
    let name = "redis-burst";
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
    redisStreams:
      url: {URL}
      stream: {stream}
      group: spate
      batch: 100
  fanout:
    mode: perEvent
    maxParallelism: 200
    maxJobsPerSecond: 1000
    burst: 200
  ttlSecondsAfterFinished: 1
{template}"#,
        template = job_template(0.1),
    );
    let engine = start_engine(&client, &yaml, state.path()).await;
    observer.expect_one_complete_job_per_event(&expected).await;
    wait_nothing_pending(&stream, "spate").await;
    engine.shutdown().await;
    observer.finish();
    redis_cli(&[format!("DEL {stream}")]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_then_restart_gives_one_job_per_entry_and_nothing_pending() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events = 1000;
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let stream = format!("spate-crash-redis-{}", std::process::id());
    let expected = add_entries(&stream, events);
    let name = "crash-redis";
    let pipeline = dir.path().join("pipeline.yaml");
    // The default consumer name (<hostname>-<pid>) changes with the restart: what the killed
    // process held is reclaimed from its dead consumer after claimIdle.
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
spec:
  source:
    redisStreams: {{url: "{URL}", stream: {stream}, group: spate, claimIdle: 2s}}
  fanout: {{mode: perEvent, maxParallelism: 1000, maxJobsPerSecond: 2000, burst: 500}}
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
    assert!(
        list_jobs_per_event(&jobs, &selector).await.len() < events,
        "the burst finished before the kill; the test proves nothing"
    );

    let mut second = spawn_spate_run(&pipeline, &kubeconfig, &dir.path().join("state"));
    let owners = await_jobs(
        &jobs,
        &selector,
        events,
        Duration::from_millis(200),
        || async {
            match pending(&stream, "spate") {
                0 => Ok(()),
                left => Err(format!("every entry has a Job, {left} still pending")),
            }
        },
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    assert!(
        owners.values().all(|count| *count == 1),
        "an entry has two Jobs"
    );
    assert_eq!(owners.keys().cloned().collect::<HashSet<_>>(), expected);
    assert_eq!(pending(&stream, "spate"), 0);
    redis_cli(&[format!("DEL {stream}")]);
    cluster.shutdown().await;
}

/// Polls the Pipeline's status until `done` holds; the statuses seen on the way.
async fn status_until(
    pipelines: &Api<Pipeline>,
    name: &str,
    seconds: u64,
    mut done: impl FnMut(&PipelineStatus) -> bool,
) -> Vec<PipelineStatus> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut seen = Vec::new();
    loop {
        let status = pipelines
            .get_status(name)
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let finished = done(&status);
        seen.push(status);
        if finished {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {seconds}s the status is {:?}",
            seen.last()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_status_shows_the_streams_lag_until_the_burst_is_taken() {
    const ENTRIES: usize = 100;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    install_crd(&cluster.client()).await;
    let state = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(controller::run(
        cluster.client(),
        ControllerOptions {
            namespace: Some("default".to_string()),
            engine: EngineOptions {
                state_dir: state.path().to_path_buf(),
                checkpoints: Arc::new(FileCheckpoints::new(state.path())),
                namespace_budget: None,
                webhooks: None,
                drain_timeout: Duration::from_secs(5),
                tenancy: Arc::new(spate::engine::tenancy::Tenancy::SingleTenant),
            },
            lease: LeaseConfig {
                namespace: "default".to_string(),
                name: "spate-controller".to_string(),
                identity: "replica-a".to_string(),
                duration: Duration::from_secs(3),
                renew: Duration::from_millis(500),
            },
            status_interval: Duration::from_millis(300),
            pod_security: spate::pod_security::Policy::default(),
        },
        stop.clone(),
    ));
    let stream = format!("spate-lag-redis-{}", std::process::id());
    let expected = add_entries(&stream, ENTRIES);
    let name = "redis-lag";
    // Five pods of half a second at a time: the burst takes about ten seconds, several
    // backlog readings.
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    redisStreams: {{url: "{URL}", stream: {stream}, group: spate}}
  fanout: {{mode: perEvent, maxParallelism: 5, maxJobsPerSecond: 1000, burst: 100}}
  ttlSecondsAfterFinished: 600
{template}"#,
        template = job_template(0.5),
    );
    let pipeline = spate::pipeline::load_str(&yaml, "p.yaml")
        .unwrap()
        .remove(0)
        .pipeline;
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), "default");
    pipelines
        .create(&PostParams::default(), &pipeline)
        .await
        .unwrap();

    let during = status_until(&pipelines, name, 60, |status| {
        status.source_lag.is_some_and(|lag| lag > 0)
    })
    .await;
    let lag = during.last().unwrap().source_lag.unwrap();
    assert!(lag <= ENTRIES as i64, "more lag than entries: {lag}");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let selector = format!("spate.dev/pipeline={name}");
    let created = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .len();
    assert!(
        created < ENTRIES,
        "the burst was over before a lag was seen; the test proves nothing"
    );

    let after = status_until(&pipelines, name, 120, |status| {
        status.source_lag == Some(0) && status.received == ENTRIES as i64
    })
    .await;
    assert!(
        after.iter().all(|status| status.source_lag.is_some()),
        "the lag stayed known while the source was connected: {after:?}"
    );
    let owners = list_jobs_per_event(&jobs, &selector).await;
    assert_eq!(owners.keys().cloned().collect::<HashSet<_>>(), expected);
    assert_eq!(pending(&stream, "spate"), 0);

    // Paused, nothing measures the stream: the lag leaves the status instead of staying at
    // its last reading.
    let pause = serde_json::json!({"metadata": {"annotations": {PAUSED_ANNOTATION: "true"}}});
    pipelines
        .patch(name, &PatchParams::default(), &Patch::Merge(&pause))
        .await
        .unwrap();
    status_until(&pipelines, name, 30, |status| {
        let paused = status
            .conditions
            .first()
            .is_some_and(|condition| condition.reason == "Paused");
        paused && status.source_lag.is_none()
    })
    .await;

    stop.cancel();
    running.await.unwrap();
    redis_cli(&[format!("DEL {stream}")]);
    cluster.shutdown().await;
}
