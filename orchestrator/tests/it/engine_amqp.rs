//! The engine end to end: messages on a real RabbitMQ queue burst into Jobs on the
//! simulator's virtual node, never above maxParallelism, every message acknowledged only once
//! its Job exists, and the cluster back to zero after the TTL.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    AMQP, Observer, PodCensus, connect_amqp, delete_queues, ids, job_template, messages_left,
    publish, start_engine, take_records,
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
    refused_by_the_provider("perEvent").await;
}

/// The items of an indexed Job that ran are reported succeeded; only those whose pods the
/// provider refused are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_indexed_job_with_refused_pods_dead_letters_only_the_items_that_did_not_run() {
    refused_by_the_provider("indexed").await;
}

/// 12 events, a provider that runs 5 pods at once and refuses the rest for good (like Azure
/// Container Instances over quota). perEvent: 5 Jobs run 30 s, 7 are ended after
/// `pendingTimeout` and their events dead-lettered with the provider's reason. indexed: one
/// Job of 12, whose 5 admitted pods succeed in 1 s; then the 7 refused items are
/// dead-lettered and the 5 reported succeeded.
async fn refused_by_the_provider(mode: &str) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let indexed = mode == "indexed";
    let mut config = SimConfig::default();
    config.node.max_pods_running = Some(5);
    config.node.run_time = Duration::from_secs(if indexed { 1 } else { 30 });
    let cluster = SimCluster::start(config).await.unwrap();
    let client = cluster.client();
    let queue = format!("spate-test-stuck-{mode}-{}", std::process::id());
    let dead = format!("{queue}-dead");
    let results = format!("{queue}-results");
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("msg", 0, 12)).await;
    let channel = connection.create_channel().await.unwrap();
    for declared in [&dead, &results] {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(
                ShortString::from(declared.as_str()),
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: stuck-{mode_name}
  namespace: default
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 20}}
  fanout: {{mode: {mode}, batchSize: 12, maxWait: 1s, maxParallelism: 12, maxJobsPerSecond: 1000, burst: 100}}
  retry: {{pendingTimeout: 2s}}
  ttlSecondsAfterFinished: 1
  sinks:
    results:
      - amqp: {{url: "{AMQP}", routingKey: {results}}}
    deadLetter:
      amqp: {{url: "{AMQP}", routingKey: {dead}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#,
        mode_name = mode.to_lowercase(),
    );
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;

    let dead_letters = take_records(&channel, &dead, 7).await;
    for record in &dead_letters {
        assert_eq!(record["outcome"], "deadLettered");
        let reason = record["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("pod Pending for more than 2s: ProviderFailed"),
            "{reason}"
        );
        assert!(record["event"]["id"].as_str().unwrap().starts_with("msg-"));
    }
    if indexed {
        let reported = take_records(&channel, &results, 12).await;
        let outcome_of = |outcome: &str| -> HashSet<String> {
            reported
                .iter()
                .filter(|record| record["outcome"] == outcome)
                .map(|record| record["event"]["id"].as_str().unwrap().to_string())
                .collect()
        };
        let dead_ids: HashSet<String> = dead_letters
            .iter()
            .map(|record| record["event"]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(outcome_of("succeeded").len(), 5, "{reported:?}");
        assert_eq!(outcome_of("failed"), dead_ids, "{reported:?}");
        assert!(outcome_of("succeeded").is_disjoint(&dead_ids));
    }
    // Given up means ended: the refused Jobs were reported and their TTL deleted them, so
    // they no longer hold the budget; in perEvent mode the 5 running ones are still there.
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), "default");
    let selector = format!("spate.dev/pipeline=stuck-{}", mode.to_lowercase());
    let expected_left = if indexed { 0 } else { 5 };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = jobs
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items
            .len();
        if left == expected_left {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{left} Jobs left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine.shutdown().await;
    delete_queues(&connection, &[&queue, &dead, &results]).await;
    cluster.shutdown().await;
}

/// An indexed Job created while the budget had one pod free gets the rest of its
/// parallelism once the Job before it finishes, instead of running its items one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_indexed_job_started_narrow_is_widened_when_pods_come_free() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = SimConfig::default();
    config.node.run_time = Duration::from_secs(3);
    let cluster = SimCluster::start(config).await.unwrap();
    let client = cluster.client();
    let queue = format!("spate-test-widen-{}", std::process::id());
    let connection = connect_amqp().await;
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: widen
  namespace: default
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 20}}
  fanout: {{mode: indexed, batchSize: 8, maxWait: 300ms, maxParallelism: 4, maxJobsPerSecond: 1000, burst: 100}}
  ttlSecondsAfterFinished: 1
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    let observer = Observer::start(&client, "widen");
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;
    let jobs: kube::Api<k8s_openapi::api::batch::v1::Job> =
        kube::Api::namespaced(client.clone(), "default");
    let list = kube::api::ListParams::default().labels("spate.dev/pipeline=widen");

    // The first Job takes 3 of the 4 pods for 3 s; the second, of 8 items, starts with 1.
    publish(&connection, &queue, ids("first", 0, 3)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while jobs.list(&list).await.unwrap().items.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no first Job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish(&connection, &queue, ids("second", 0, 8)).await;

    let completions_of = |job: &k8s_openapi::api::batch::v1::Job| {
        job.spec.as_ref().and_then(|spec| spec.completions)
    };
    let mut started_with = None;
    let mut widest = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let second = jobs
            .list(&list)
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|job| completions_of(job) == Some(8));
        if let Some(second) = second {
            let parallelism = second
                .spec
                .as_ref()
                .and_then(|spec| spec.parallelism)
                .unwrap_or(0);
            started_with.get_or_insert(parallelism);
            widest = widest.max(parallelism);
            let done = second.status.as_ref().and_then(|status| status.succeeded) == Some(8);
            if done || widest == 4 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "second Job: started with {started_with:?}, widest {widest}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(started_with, Some(1), "the second Job started narrow");
    assert_eq!(widest, 4, "the second Job was widened to the whole budget");

    let expected: HashSet<String> = ids("first", 0, 3).chain(ids("second", 0, 8)).collect();
    observer.expect_one_complete_job_per_event(&expected).await;
    observer.expect_back_to_zero().await;
    engine.shutdown().await;
    let census = observer.finish();
    assert!(census.peak <= 4, "peak {} over maxParallelism", census.peak);
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// A drain cut short, as a controller that loses the leader Lease cuts one: with every create
/// hanging on a slow API server, `shutdown_unless` returns once its token fires instead of
/// waiting for the creates (or the drain timeout), and every message goes back to the queue
/// unacknowledged, for the next leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_stops_at_once_and_leaves_every_message_in_the_queue() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let queue = format!("spate-test-cut-drain-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;
    let state = tempfile::tempdir().unwrap();
    let yaml = pipeline_yaml("cut-drain", &queue, "perEvent", 100, "virtual", 0.1);
    let engine = start_engine(&cluster.client(), &yaml, state.path()).await;
    let hang = Duration::from_secs(8);
    cluster.faults().set(spate_sim::Faults {
        latency_ms: hang.as_millis() as u64,
        ..Default::default()
    });
    publish(&connection, &queue, ids("held", 0, 20)).await;
    // Taken from the queue (unacknowledged), their creates waiting on the API server.
    common::eventually("the messages taken", 10, || async {
        match messages_left(&connection, &queue).await {
            0 => Ok(()),
            left => Err(format!("{left} not taken yet")),
        }
    })
    .await;

    let lease_lost = tokio_util::sync::CancellationToken::new();
    let lose = lease_lost.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        lose.cancel();
    });
    let began = std::time::Instant::now();
    engine.shutdown_unless(&lease_lost).await;
    let took = began.elapsed();
    assert!(
        took < hang / 2,
        "the drain went on for {took:?} after the token fired (creates hang {hang:?})"
    );
    cluster.faults().set(spate_sim::Faults::default());
    common::eventually("every message back in the queue", 10, || async {
        match messages_left(&connection, &queue).await {
            20 => Ok(()),
            left => Err(format!("{left} of 20 in the queue")),
        }
    })
    .await;
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}
