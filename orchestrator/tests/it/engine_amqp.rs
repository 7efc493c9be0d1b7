//! The engine end to end: messages on a real RabbitMQ queue burst into Jobs on the
//! simulator's virtual node, never above maxParallelism, every message acknowledged only once
//! its Job exists, and the cluster back to zero after the TTL.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    AMQP, Observer, PodCensus, connect_amqp, delete_queues, ids, job_template, messages_left,
    publish, start_engine,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use spate_sim::{SimCluster, SimConfig};

fn pipeline_yaml(
    name: &str,
    queue: &str,
    mode: &str,
    parallelism: u32,
    placement: &str,
    run_seconds: f64,
) -> String {
    let results = format!("{queue}-results");
    format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    amqp:
      url: {AMQP}
      queue: {queue}
      prefetch: 50
  fanout:
    mode: {mode}
    batchSize: 25
    maxWait: 500ms
    maxParallelism: {parallelism}
    maxJobsPerSecond: 1000
    burst: 200
  ttlSecondsAfterFinished: 1
  placement:
    mode: {placement}
  sinks:
    results:
      - amqp: {{url: "{AMQP}", routingKey: {results}}}
{template}"#,
        template = job_template(run_seconds),
    )
}

struct Burst {
    name: &'static str,
    mode: &'static str,
    events: usize,
    parallelism: u32,
    placement: &'static str,
    regular_nodes: usize,
    /// How long each pod runs.
    run_seconds: f64,
}

async fn burst(burst: Burst) -> PodCensus {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig {
        regular_nodes: burst.regular_nodes,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let client = cluster.client();
    let queue = format!("spate-test-{}-{}", burst.name, std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("msg", 0, burst.events)).await;
    let results = format!("{queue}-results");
    let results_channel = connection.create_channel().await.unwrap();
    results_channel
        .queue_declare(
            ShortString::from(results.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let observer = Observer::start(&client, burst.name);
    let state = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml(
        burst.name,
        &queue,
        burst.mode,
        burst.parallelism,
        burst.placement,
        burst.run_seconds,
    );
    let engine = start_engine(&client, &yaml, state.path()).await;

    let expected: HashSet<String> = ids("msg", 0, burst.events).collect();
    observer.expect_one_complete_job_per_event(&expected).await;
    observer.expect_back_to_zero().await;
    engine.shutdown().await;
    let census = observer.finish();
    assert!(census.peak > 0);
    assert!(
        census.peak <= burst.parallelism as usize,
        "{} pods at once, above maxParallelism {}",
        census.peak,
        burst.parallelism
    );
    // Every message was acknowledged: the queue is empty once the consumer is gone.
    assert_eq!(
        messages_left(&connection, &queue).await,
        0,
        "messages left unacknowledged"
    );
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
    census
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_messages_burst_per_event_within_the_budget_and_return_to_zero() {
    let census = burst(Burst {
        name: "amqp-per-event",
        mode: "perEvent",
        events: 500,
        parallelism: 20,
        placement: "virtual",
        regular_nodes: 1,
        run_seconds: 0.2,
    })
    .await;
    assert!(census.on_virtual_only(), "{:?}", census.node_peak);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_messages_burst_as_indexed_jobs() {
    let census = burst(Burst {
        name: "amqp-indexed",
        mode: "indexed",
        events: 500,
        parallelism: 30,
        placement: "virtual",
        regular_nodes: 0,
        run_seconds: 0.2,
    })
    .await;
    assert!(census.on_virtual_only(), "{:?}", census.node_peak);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_placement_fills_regular_nodes_first_and_overflows_to_the_virtual_node() {
    let census = burst(Burst {
        name: "amqp-burst-placement",
        mode: "perEvent",
        events: 150,
        parallelism: 60,
        placement: "burst",
        regular_nodes: 2,
        // Long enough that nodes really fill, whatever the scheduler's cache lag on a busy
        // machine.
        run_seconds: 2.0,
    })
    .await;
    let virtual_peak = census
        .node_peak
        .get("spate-virtual-0")
        .copied()
        .unwrap_or(0);
    // Two regular nodes of 20 pods each were filled first (a watcher can miss the instant a
    // node held its 20th pod, hence 18): without the preference, least-allocated scoring
    // would send nearly every pod to the far larger virtual node.
    for node in ["spate-node-0", "spate-node-1"] {
        let peak = census.node_peak.get(node).copied().unwrap_or(0);
        assert!(
            peak >= 18,
            "{node} held at most {peak}: {:?}",
            census.node_peak
        );
    }
    assert!(
        virtual_peak > 0,
        "nothing overflowed: {:?}",
        census.node_peak
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_the_provider_refuses_are_given_up_and_dead_lettered_with_its_reason() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = SimConfig::default();
    // Like Azure Container Instances over quota: beyond 5 pods at once, refused for good.
    config.node.max_pods_running = Some(5);
    config.node.run_time = Duration::from_secs(30);
    let cluster = SimCluster::start(config).await.unwrap();
    let client = cluster.client();
    let queue = format!("spate-test-stuck-{}", std::process::id());
    let dead = format!("{queue}-dead");
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("msg", 0, 12)).await;
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            ShortString::from(dead.as_str()),
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();

    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: stuck
  namespace: default
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 20}}
  fanout: {{maxParallelism: 12, maxJobsPerSecond: 1000, burst: 100}}
  retry: {{pendingTimeout: 2s}}
  sinks:
    deadLetter:
      amqp: {{url: "{AMQP}", routingKey: {dead}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;

    // 5 run, 7 are refused: those 7 reach the dead-letter queue with the provider's reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut records = Vec::new();
    while records.len() < 7 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} dead letters: {records:?}",
            records.len()
        );
        match channel
            .basic_get(
                ShortString::from(dead.as_str()),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(message) => records
                .push(serde_json::from_slice::<serde_json::Value>(&message.delivery.data).unwrap()),
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    for record in &records {
        assert_eq!(record["outcome"], "deadLettered");
        let reason = record["reason"].as_str().unwrap();
        assert!(reason.contains("ProviderFailed"), "{reason}");
        assert!(record["event"]["id"].as_str().unwrap().starts_with("msg-"));
    }
    // Given up means gone: their Jobs no longer hold the budget.
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = jobs
            .list(&kube::api::ListParams::default().labels("spate.dev/pipeline=stuck"))
            .await
            .unwrap()
            .items
            .len();
        if left == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} Jobs left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine.shutdown().await;
    delete_queues(&connection, &[&queue, &dead]).await;
    cluster.shutdown().await;
}
