//! The end-to-end set written once and run twice, on the simulator and on a real Kubernetes
//! v1.28.7 control plane (`scripts/kube`, with spate-sim's node agent as its virtual-kubelet
//! node), asserting the same counts on both: what the simulator lets pass, the real API
//! server, Job controller, TTL controller and scheduler must let pass too.

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::{Kind, TestCluster};
use common::{
    AMQP, Observer, await_jobs, await_status, connect_amqp, delete_queues, ids, messages_left,
    publish, ready_reason, spawn_spate_run, take_records,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};

fn write_pipeline(
    dir: &Path,
    name: &str,
    queue: &str,
    fanout: &str,
    ttl: u32,
) -> std::path::PathBuf {
    let pipeline = dir.join("pipeline.yaml");
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
  fanout: {fanout}
  retry: {{maxAttempts: 20, initialBackoff: 50ms, maxBackoff: 1s}}
  ttlSecondsAfterFinished: {ttl}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )
    .unwrap();
    pipeline
}

/// `spate run -f` SIGKILLed once a quarter of a burst has Jobs, then restarted: every event
/// ends in exactly one Job (indexed: in exactly one Job's index), none is lost, the queue is
/// empty.
async fn sigkill_mid_burst(kind: Kind, mode: &str) {
    let events = 400;
    let name = format!("crash-{}", mode.to_lowercase());
    let cluster = TestCluster::start(kind, &format!("real-cluster-{name}")).await;
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("spate-rc-{name}-{kind:?}-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;
    publish(&connection, &queue, ids("m", 0, events)).await;
    let fanout = format!(
        "{{mode: {mode}, batchSize: 20, maxWait: 200ms, maxParallelism: 1000, maxJobsPerSecond: 2000, burst: 500}}"
    );
    let pipeline = write_pipeline(dir.path(), &name, &queue, &fanout, 600);
    let jobs = cluster.jobs();
    let selector = format!("spate.dev/pipeline={name}");
    let state = dir.path().join("state");

    let mut first = spawn_spate_run(&pipeline, cluster.kubeconfig(), &state);
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
    let at_kill = common::list_jobs_per_event(&jobs, &selector).await.len();

    let mut second = spawn_spate_run(&pipeline, cluster.kubeconfig(), &state);
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
    // SIGTERM, not SIGKILL: with the consumer alive the queue counts only unsent messages, so
    // an acknowledgement still on its way would come back as a message left after a kill.
    // A graceful stop sends those acknowledgements first.
    let signalled = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = second.wait();
        (second, status)
    })
    .await
    .unwrap();
    assert!(exited.1.unwrap().success(), "{kind:?}: spate run failed");
    let job_count = jobs
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .len();
    eprintln!(
        "{kind:?} {mode}: {} events with a Job ({at_kill} at the kill), {job_count} Jobs, {} messages left",
        owners.len(),
        messages_left(&connection, &queue).await
    );

    let twice: Vec<_> = owners.iter().filter(|(_, count)| **count != 1).collect();
    assert!(twice.is_empty(), "{kind:?}: events in two Jobs: {twice:?}");
    let mut expected: Vec<String> = ids("m", 0, events).collect();
    expected.sort();
    assert_eq!(owners.keys().cloned().collect::<Vec<_>>(), expected);
    if mode == "perEvent" {
        assert_eq!(job_count, events, "{kind:?}: one Job per event");
    }
    assert_eq!(messages_left(&connection, &queue).await, 0);
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// A burst whose Jobs finish and, with a TTL of a second, are removed by the TTL controller
/// (and their pods by the garbage collector): back to zero.
async fn ttl_back_to_zero(kind: Kind) {
    let events = 60;
    let name = "ttl-zero";
    let cluster = TestCluster::start(kind, "real-cluster-ttl").await;
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("spate-rc-ttl-{kind:?}-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;
    let observer = Observer::start(&cluster.client(), name);
    // The rate is raised above the default (0.33/s after a burst of 20), which alone made
    // this test take two minutes of waiting for its own rate limit.
    let pipeline = write_pipeline(
        dir.path(),
        name,
        &queue,
        "{maxParallelism: 30, maxJobsPerSecond: 100, burst: 30}",
        1,
    );
    // Published first: publishing declares the queue, which the source expects to exist.
    publish(&connection, &queue, ids("t", 0, events)).await;
    let mut spate = spawn_spate_run(&pipeline, cluster.kubeconfig(), &dir.path().join("state"));
    let expected: HashSet<String> = ids("t", 0, events).collect();
    observer.expect_one_complete_job_per_event(&expected).await;
    observer.expect_back_to_zero().await;
    spate.kill().unwrap();
    spate.wait().unwrap();
    let census = observer.finish();
    eprintln!(
        "{kind:?} ttl: {events} events, one complete Job each, back to zero; pods in flight peak {}, per node {:?}",
        census.peak, census.node_peak
    );
    assert!(census.peak > 0, "{kind:?}: no pod was ever seen running");
    assert_eq!(
        census.node_peak.keys().collect::<Vec<_>>(),
        vec![cluster.node()],
        "{kind:?}: every pod on the virtual node"
    );
    assert_eq!(messages_left(&connection, &queue).await, 0);
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// Pods that never start (the node agent holds them in ContainerCreating for an hour): after
/// `pendingTimeout` Spate ends each Job through `activeDeadlineSeconds`, the Job controller
/// fails it and deletes its pod, every event is dead-lettered with the pod's reason, and the
/// TTL takes the cluster back to zero.
async fn pods_that_never_start_are_ended(kind: Kind) {
    let events = 20;
    let name = "never-start";
    let cluster = TestCluster::start(kind, "real-cluster-never-start").await;
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("spate-rc-never-start-{kind:?}-{}", std::process::id());
    let dead = format!("{queue}-dead");
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue, &dead]).await;
    publish(&connection, &queue, ids("n", 0, events)).await;
    publish(&connection, &dead, std::iter::empty()).await;
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
  fanout: {{maxParallelism: 50}}
  retry: {{pendingTimeout: 2s}}
  ttlSecondsAfterFinished: 1
  sinks:
    deadLetter:
      amqp: {{url: "{AMQP}", routingKey: {dead}}}
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/start-seconds: "3600"
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )
    .unwrap();
    let observer = Observer::start(&cluster.client(), name);
    let mut spate = spawn_spate_run(&pipeline, cluster.kubeconfig(), &dir.path().join("state"));
    let channel = connection.create_channel().await.unwrap();
    let letters = take_records(&channel, &dead, events).await;
    let mut dead_ids: Vec<String> = letters
        .iter()
        .map(|record| {
            let reason = record["reason"].as_str().unwrap_or_default();
            assert!(
                reason.starts_with("pod Pending for more than 2s"),
                "{kind:?}: {record}"
            );
            record["event"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    dead_ids.sort();
    let mut expected: Vec<String> = ids("n", 0, events).collect();
    expected.sort();
    assert_eq!(
        dead_ids, expected,
        "{kind:?}: each event dead-lettered once"
    );
    observer.expect_back_to_zero().await;
    spate.kill().unwrap();
    spate.wait().unwrap();
    observer.finish();
    assert_eq!(messages_left(&connection, &queue).await, 0);
    delete_queues(&connection, &[&queue, &dead]).await;
    cluster.shutdown().await;
}

/// A Pipeline resource run by the controller (in this process, holding its Lease in the
/// test's namespace): one Job per event, its status written through the status subresource,
/// paused (no more Jobs, the events wait in the queue) and resumed.
async fn pipeline_resource_paused_and_resumed(kind: Kind) {
    use spate::engine::controller::{self, PAUSED_ANNOTATION};
    use spate::pipeline::Pipeline;
    let name = "resource";
    let cluster = TestCluster::start(kind, "real-cluster-controller").await;
    common::install_crd(&cluster.client()).await;
    let namespace = cluster.namespace().to_string();
    let queue = format!("spate-rc-controller-{kind:?}-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;
    publish(&connection, &queue, ids("c", 0, 30)).await;
    let state = tempfile::tempdir().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(controller::run(
        cluster.client(),
        common::controller_options("replica-a", &namespace, state.path()),
        stop.clone(),
    ));
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: {namespace}
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 50}}
  fanout: {{maxParallelism: 50, maxJobsPerSecond: 500, burst: 100}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    let resource = spate::pipeline::load_str(&yaml, "p.yaml")
        .unwrap()
        .remove(0)
        .pipeline;
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), &namespace);
    pipelines
        .create(&PostParams::default(), &resource)
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: cannot create the Pipeline: {e}"));
    let jobs = cluster.jobs();
    let selector = format!("spate.dev/pipeline={name}");
    let no_check = || async { Ok(()) };
    await_jobs(&jobs, &selector, 30, Duration::from_millis(200), no_check).await;
    await_status(
        &pipelines,
        name,
        "the status counts 30 events, Running",
        |status| status.received == 30 && ready_reason(status) == Some("Running"),
    )
    .await;

    let pause = |value: serde_json::Value| serde_json::json!({"metadata": {"annotations": {PAUSED_ANNOTATION: value}}});
    pipelines
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(pause("true".into())),
        )
        .await
        .unwrap();
    await_status(&pipelines, name, "Paused", |status| {
        ready_reason(status) == Some("Paused")
    })
    .await;
    publish(&connection, &queue, ids("d", 0, 10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_paused = common::list_jobs_per_event(&jobs, &selector).await;
    assert_eq!(while_paused.len(), 30, "{kind:?}: Jobs made while paused");
    assert_eq!(messages_left(&connection, &queue).await, 10, "{kind:?}");

    pipelines
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(pause(serde_json::Value::Null)),
        )
        .await
        .unwrap();
    let owners = await_jobs(&jobs, &selector, 40, Duration::from_millis(200), || async {
        match messages_left(&connection, &queue).await {
            0 => Ok(()),
            left => Err(format!("{left} still in the queue")),
        }
    })
    .await;
    assert!(
        owners.values().all(|count| *count == 1),
        "{kind:?}: an event in two Jobs: {owners:?}"
    );
    await_status(&pipelines, name, "Running again", |status| {
        ready_reason(status) == Some("Running")
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// Two `spate run` controller replicas on one Lease: the leader makes the Jobs of a Pipeline
/// resource, then is SIGKILLed mid-burst (no Lease released, no drain, its broker connection
/// cut); the standby takes the Lease once it expires and makes the rest, the messages the
/// dead leader held redelivered. Every event ends in exactly one Job.
async fn leader_fail_over(kind: Kind) {
    use k8s_openapi::api::coordination::v1::Lease;
    use spate::pipeline::Pipeline;
    let name = "fail-over";
    let cluster = TestCluster::start(kind, "real-cluster-fail-over").await;
    common::install_crd(&cluster.client()).await;
    let namespace = cluster.namespace().to_string();
    let queue = format!("spate-rc-fail-over-{kind:?}-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;
    publish(&connection, &queue, ids("before", 0, 40)).await;
    let leases: Api<Lease> = Api::namespaced(cluster.client(), &namespace);
    let holder = || async {
        leases
            .get_opt("spate-controller")
            .await
            .ok()
            .flatten()
            .and_then(|lease| lease.spec?.holder_identity)
    };
    let state = tempfile::tempdir().unwrap();
    let replica = |identity: &str| {
        common::spawn_spate_controller(
            cluster.kubeconfig(),
            &state.path().join(identity),
            &[
                "--metrics-listen",
                "127.0.0.1:0",
                "--webhook-listen",
                "127.0.0.1:0",
                "--identity",
                identity,
                "--lease-duration",
                "3s",
                "-n",
                &namespace,
            ],
        )
    };
    let mut leader = replica("replica-a");
    common::eventually("replica-a holds the Lease", 30, || async {
        match holder().await.as_deref() {
            Some("replica-a") => Ok(()),
            other => Err(format!("held by {other:?}")),
        }
    })
    .await;
    let mut standby = replica("replica-b");
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: {namespace}
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 20}}
  fanout: {{maxParallelism: 100, maxJobsPerSecond: 20, burst: 10}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    let resource = spate::pipeline::load_str(&yaml, "p.yaml")
        .unwrap()
        .remove(0)
        .pipeline;
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), &namespace);
    pipelines
        .create(&PostParams::default(), &resource)
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: cannot create the Pipeline: {e}"));
    let jobs = cluster.jobs();
    let selector = format!("spate.dev/pipeline={name}");
    // Killed mid-burst: at 20 events a second, some of the 40 are still to come.
    common::eventually("the leader's first Jobs", 30, || async {
        let made = common::list_jobs_per_event(&jobs, &selector).await.len();
        (made >= 10).then_some(()).ok_or(format!("{made} Jobs"))
    })
    .await;
    leader.kill().unwrap();
    leader.wait().unwrap();
    let made_by_leader = common::list_jobs_per_event(&jobs, &selector).await.len();
    publish(&connection, &queue, ids("after", 0, 40)).await;

    let owners = await_jobs(&jobs, &selector, 80, Duration::from_millis(200), || async {
        match messages_left(&connection, &queue).await {
            0 => Ok(()),
            left => Err(format!("{left} still in the queue")),
        }
    })
    .await;
    assert!(
        made_by_leader < 40,
        "{kind:?}: the leader made every Job before it died; the fail-over proves nothing"
    );
    assert_eq!(holder().await.as_deref(), Some("replica-b"), "{kind:?}");
    let expected: HashSet<String> = ids("before", 0, 40).chain(ids("after", 0, 40)).collect();
    assert_eq!(
        owners.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "{kind:?}: the events with Jobs"
    );
    assert!(
        owners.values().all(|count| *count == 1),
        "{kind:?}: an event in two Jobs: {owners:?}"
    );
    standby.kill().unwrap();
    standby.wait().unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

const TOO_LONG: &str = "metadata.annotations: Too long: must have at most 262144 bytes";

fn config_map(name: &str, value_bytes: usize) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": {"a": "x".repeat(value_bytes)}}
    }))
    .unwrap()
}

/// Annotations may total 262144 bytes, keys included; one more is `422 Invalid` on create and
/// on update, with the real server's message. The Pipeline CRD stays under it, so the plain
/// (client-side) `kubectl apply -f` a user types first, whose last-applied annotation holds
/// the whole CRD, works as well as `--server-side`.
async fn annotations_over_256_kib(kind: Kind) {
    let cluster = TestCluster::start(kind, "real-cluster-annotations").await;
    let config_maps: Api<ConfigMap> = Api::default_namespaced(cluster.client());
    let post = PostParams::default();
    let mut fits = config_maps
        .create(&post, &config_map("fits", 262_143))
        .await
        .unwrap_or_else(|e| panic!("{kind:?}: 262144 bytes of annotations refused: {e}"));
    let over = config_maps
        .create(&post, &config_map("over", 262_144))
        .await
        .expect_err("262145 bytes of annotations accepted");
    let kube::Error::Api(over) = over else {
        panic!("{kind:?}: not an API error: {over}");
    };
    assert_eq!(
        (over.code, over.reason.as_str(), over.message.as_str()),
        (
            422,
            "Invalid",
            &*format!("ConfigMap \"over\" is invalid: {TOO_LONG}")
        ),
        "{kind:?}"
    );
    fits.metadata
        .annotations
        .get_or_insert_default()
        .insert("b".into(), "y".into());
    let grown = config_maps
        .replace("fits", &post, &fits)
        .await
        .expect_err("an update to 262146 bytes of annotations accepted");
    let kube::Error::Api(grown) = grown else {
        panic!("{kind:?}: not an API error: {grown}");
    };
    assert_eq!(
        (grown.code, grown.message.as_str()),
        (422, &*format!("ConfigMap \"fits\" is invalid: {TOO_LONG}")),
        "{kind:?}"
    );

    let crd = Command::new(env!("CARGO_BIN_EXE_spate"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(crd.status.success());
    let kubeconfig = cluster.kubeconfig().to_owned();
    let (client_side, server_side) = tokio::task::spawn_blocking(move || {
        let apply = |extra: &[&str]| {
            let mut child = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("apply")
                .args(extra)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("kubectl on PATH (scripts/test installs it)");
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&crd.stdout).unwrap();
            child.wait_with_output().unwrap()
        };
        (apply(&[]), apply(&["--server-side"]))
    })
    .await
    .unwrap();
    assert!(
        client_side.status.success(),
        "{kind:?}: client-side kubectl apply of the CRD: {}",
        String::from_utf8_lossy(&client_side.stderr)
    );
    assert!(
        server_side.status.success(),
        "{kind:?}: server-side kubectl apply of the CRD: {}",
        String::from_utf8_lossy(&server_side.stderr)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_per_event_on_sim() {
    sigkill_mid_burst(Kind::Sim, "perEvent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_per_event_on_real() {
    sigkill_mid_burst(Kind::Real, "perEvent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_indexed_on_sim() {
    sigkill_mid_burst(Kind::Sim, "indexed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_burst_indexed_on_real() {
    sigkill_mid_burst(Kind::Real, "indexed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_back_to_zero_on_sim() {
    ttl_back_to_zero(Kind::Sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_back_to_zero_on_real() {
    ttl_back_to_zero(Kind::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_over_256_kib_on_sim() {
    annotations_over_256_kib(Kind::Sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_over_256_kib_on_real() {
    annotations_over_256_kib(Kind::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_that_never_start_are_ended_on_sim() {
    pods_that_never_start_are_ended(Kind::Sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_that_never_start_are_ended_on_real() {
    pods_that_never_start_are_ended(Kind::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_resource_paused_and_resumed_on_sim() {
    pipeline_resource_paused_and_resumed(Kind::Sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipeline_resource_paused_and_resumed_on_real() {
    pipeline_resource_paused_and_resumed(Kind::Real).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_fail_over_on_sim() {
    leader_fail_over(Kind::Sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_fail_over_on_real() {
    leader_fail_over(Kind::Real).await;
}
