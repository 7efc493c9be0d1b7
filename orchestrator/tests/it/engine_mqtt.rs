//! The engine end to end with an MQTT source on the Mosquitto at 127.0.0.1:1883: 1,000
//! messages become exactly 1,000 Jobs, also when `spate run -f` is killed with SIGKILL in the
//! middle of the burst and restarted (the persistent session redelivers what was not
//! acknowledged, and the content ids make the copies one Job each).
//!
//! Publishing and session set-up use `mosquitto_pub`/`mosquitto_sub` (package
//! mosquitto-clients). Mosquitto queues at most 1,000 QoS 1 messages per offline client by
//! default (`max_queued_messages`): the sessions here are consuming while the burst is
//! published, so the queue stays below that.

use crate::common;

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Observer, await_jobs, ids, job_template, list_jobs_per_event, spawn_spate_run, start_engine,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use spate_sim::{SimCluster, SimConfig};

const MQTT: &str = "mqtt://127.0.0.1:1883";

/// Creates (`persistent`) or wipes the broker's session of `client_id` subscribed to `topic`.
fn session(client_id: &str, topic: &str, persistent: bool) {
    let mut command = Command::new("mosquitto_sub");
    command.args([
        "-h",
        "127.0.0.1",
        "-p",
        "1883",
        "-q",
        "1",
        "-i",
        client_id,
        "-t",
        topic,
        "-E",
    ]);
    if persistent {
        command.arg("-c");
    }
    let status = command
        .status()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    assert!(status.success());
}

/// Publishes `{"id": ID}` for each id, QoS 1.
fn publish(topic: &str, ids: impl Iterator<Item = String>) {
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    let mut stdin = child.stdin.take().unwrap();
    for id in ids {
        writeln!(stdin, "{}", serde_json::json!({ "id": id })).unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_messages_become_a_thousand_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events = 1000;
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let topic = format!("spate-e2e/mqtt-burst-{}", std::process::id());
    let client_id = format!("spate-e2e-burst-{}", std::process::id());
    session(&client_id, &topic, true);
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: mqtt-burst
  namespace: default
spec:
  source:
    mqtt: {{url: "{MQTT}", topic: "{topic}", clientId: {client_id}}}
  fanout: {{maxParallelism: 200, maxJobsPerSecond: 2000, burst: 500}}
  ttlSecondsAfterFinished: 600
{template}"#,
        template = job_template(0.1)
    );
    let observer = Observer::start(&client, "mqtt-burst");
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;
    publish(&topic, ids("msg", 0, events));
    let expected: HashSet<String> = ids("msg", 0, events).collect();
    observer.expect_one_complete_job_per_event(&expected).await;
    engine.shutdown().await;
    observer.finish();
    // Every message was acknowledged: the persistent session has nothing left to deliver.
    assert_eq!(left_in_session(&client_id, &topic), 0);
    session(&client_id, &topic, false);
    cluster.shutdown().await;
}

/// Messages the broker still holds for the session (delivered to a throwaway consumer, which
/// acknowledges them).
fn left_in_session(client_id: &str, topic: &str) -> usize {
    let output = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-c",
            "-i",
            client_id,
            "-t",
            topic,
            "-W",
            "2",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_loses_nothing_and_runs_nothing_twice() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events = 1000;
    let name = "mqtt-crash";
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let topic = format!("spate-e2e/mqtt-crash-{}", std::process::id());
    let client_id = format!("spate-e2e-crash-{}", std::process::id());
    session(&client_id, &topic, true);
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
    mqtt: {{url: "{MQTT}", topic: "{topic}", clientId: {client_id}}}
  fanout: {{maxParallelism: 1000, maxJobsPerSecond: 300, burst: 50}}
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
    let topic_for_publish = topic.clone();
    let publisher = std::thread::spawn(move || publish(&topic_for_publish, ids("m", 0, events)));
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
    publisher.join().unwrap();
    let covered_at_kill = list_jobs_per_event(&jobs, &selector).await.len();
    assert!(
        covered_at_kill < events,
        "the burst finished before the kill"
    );

    let mut second = spawn_spate_run(&pipeline, &kubeconfig, &dir.path().join("state"));
    let owners = await_jobs(
        &jobs,
        &selector,
        events,
        Duration::from_millis(200),
        || async { Ok(()) },
    )
    .await;
    // A graceful stop sends the last PUBACKs.
    let signalled = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let status = tokio::task::spawn_blocking(move || {
        let status = second.wait();
        drop(second);
        status
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "spate exited with {status}");

    assert!(
        owners.values().all(|count| *count == 1),
        "an event has two Jobs"
    );
    let mut expected: Vec<String> = ids("m", 0, events).collect();
    expected.sort();
    assert_eq!(owners.keys().cloned().collect::<Vec<_>>(), expected);
    // Redelivered copies after the restart found their Jobs: still one per id.
    assert_eq!(list_jobs_per_event(&jobs, &selector).await.len(), events);
    assert_eq!(
        left_in_session(&client_id, &topic),
        0,
        "unacknowledged messages left"
    );
    session(&client_id, &topic, false);
    cluster.shutdown().await;
}
