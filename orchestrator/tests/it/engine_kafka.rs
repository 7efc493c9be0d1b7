//! The engine end to end with a Kafka topic on tansu (127.0.0.1:9092, `scripts/kafka start`):
//! 1,000 records become exactly 1,000 Jobs and every partition is committed to its end, also
//! when `spate run -f` is killed with SIGKILL mid-burst and restarted; records whose Job
//! template fails reach a dead-letter topic through the Kafka sink, with the reason.

use crate::common;
use crate::kafka_broker as kafka;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    Observer, await_jobs, job_template, list_jobs_per_event, spawn_spate_run, start_engine,
};
use k8s_openapi::api::batch::v1::Job;
use kafka::{
    BROKER, committed, create_topic, ensure_broker, high_watermarks, produce, producer, read,
    unique,
};
use kube::api::Api;
use spate_sim::{SimCluster, SimConfig};
use tokio::time::Instant;

const PARTITIONS: i32 = 4;

async fn wait_committed_to_the_end(group: &str, topic: &str) {
    let highs = high_watermarks(BROKER, topic, PARTITIONS);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = committed(BROKER, group, topic, PARTITIONS);
        if committed == highs {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed:?}, high watermarks {highs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_records_become_exactly_a_thousand_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ensure_broker();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let topic = unique("engine");
    let group = unique("engine-group");
    create_topic(BROKER, &topic, PARTITIONS).await;
    let expected: HashSet<String> = produce(&producer(BROKER), &topic, 0, 1000)
        .await
        .into_iter()
        .collect();
    let name = "kafka-burst";
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
    kafka:
      brokers: ["{broker}"]
      topic: {topic}
      group: {group}
      commitInterval: 200ms
  fanout:
    mode: perEvent
    maxParallelism: 200
    maxJobsPerSecond: 1000
    burst: 200
  ttlSecondsAfterFinished: 1
{template}"#,
        broker = kafka::BROKER,
        template = job_template(0.1),
    );
    let engine = start_engine(&client, &yaml, state.path()).await;
    observer.expect_one_complete_job_per_event(&expected).await;
    wait_committed_to_the_end(&group, &topic).await;
    engine.shutdown().await;
    observer.finish();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_then_restart_gives_one_job_per_record_and_commits_everything() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ensure_broker();
    let events = 1000;
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let topic = unique("crash");
    let group = unique("crash-group");
    create_topic(BROKER, &topic, PARTITIONS).await;
    let expected: HashSet<String> = produce(&producer(BROKER), &topic, 0, events)
        .await
        .into_iter()
        .collect();
    let name = "crash-kafka";
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
    kafka:
      brokers: ["{broker}"]
      topic: {topic}
      group: {group}
      commitInterval: 200ms
      properties: {{session.timeout.ms: "6000", heartbeat.interval.ms: "500"}}
  fanout: {{mode: perEvent, maxParallelism: 1000, maxJobsPerSecond: 2000, burst: 500}}
  retry: {{maxAttempts: 20, initialBackoff: 50ms, maxBackoff: 1s}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#,
            broker = kafka::BROKER,
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

    // The restarted member joins once the killed one's session (6s) has expired, and resumes
    // from the committed watermarks. Joining earlier is what Kafka handles (it rebalances again
    // when the dead member's session ends) but tansu 0.6 does not: a CI run saw the restarted
    // member assigned `partitions=[]` beside the dead one, and no rebalance in the next 60s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut second = spawn_spate_run(&pipeline, &kubeconfig, &dir.path().join("state"));
    let owners = await_jobs(
        &jobs,
        &selector,
        events,
        Duration::from_millis(200),
        || async { Ok(()) },
    )
    .await;
    wait_committed_to_the_end(&group, &topic).await;
    second.kill().unwrap();
    second.wait().unwrap();

    assert!(
        owners.values().all(|count| *count == 1),
        "a record has two Jobs"
    );
    assert_eq!(owners.keys().cloned().collect::<HashSet<_>>(), expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_whose_template_fails_reach_the_dead_letter_topic_with_the_reason() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    ensure_broker();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let topic = unique("poison-engine");
    let dead = unique("poison-engine-dead");
    let group = unique("poison-engine-group");
    create_topic(BROKER, &topic, 1).await;
    create_topic(BROKER, &dead, 1).await;
    let name = "kafka-poison";
    let state = tempfile::tempdir().unwrap();
    // Every record is `{"n": i}`: the template asks for `event.data.image`, which none has.
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    kafka: {{brokers: ["{broker}"], topic: {topic}, group: {group}, commitInterval: 200ms}}
  fanout: {{mode: perEvent, maxParallelism: 10}}
  sinks:
    deadLetter:
      kafka: {{brokers: ["{broker}"], topic: {dead}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: work
              image: busybox
              args: ["{{{{ event.data.image }}}}"]
"#,
        broker = kafka::BROKER,
    );
    let engine = start_engine(&client, &yaml, state.path()).await;
    let ids = produce(&producer(BROKER), &topic, 0, 3).await;
    let records = read(BROKER, &dead, 3, Duration::from_secs(60));
    for record in &records {
        let dead_letter: serde_json::Value = serde_json::from_str(&record.value).unwrap();
        assert_eq!(dead_letter["outcome"], "deadLettered");
        assert!(
            dead_letter["reason"].as_str().unwrap().contains("image"),
            "the reason names the missing field: {dead_letter}"
        );
        assert!(ids.contains(&record.key.clone().unwrap()));
        assert!(
            record
                .headers
                .contains(&("spate.outcome".to_string(), "deadLettered".to_string()))
        );
    }
    let highs = high_watermarks(BROKER, &topic, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed(BROKER, &group, &topic, 1) != highs {
        assert!(
            Instant::now() < deadline,
            "dead-lettered records are committed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    engine.shutdown().await;
    cluster.shutdown().await;
}
