//! `spate run` as the in-cluster controller, on the simulator with real RabbitMQ: Pipelines
//! created, paused, resumed, made invalid and deleted through the API; one that cannot start
//! yet started once it can; one whose source stops for good said so and started again once
//! it can; two replicas with one leader and a fail-over.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    AMQP, await_status, connect_amqp, controller_options, delete_queues, eventually, ids,
    install_crd, publish, ready_reason,
};
use k8s_openapi::api::batch::v1::Job;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use spate::engine::controller::{self, ControllerOptions};
use spate::pipeline::{Pipeline, PipelineStatus};
use spate_sim::{SimCluster, SimConfig};
use tokio_util::sync::CancellationToken;

fn pipeline(name: &str, queue: &str) -> Pipeline {
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 20}}
  fanout: {{maxParallelism: 100, maxJobsPerSecond: 500, burst: 100}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    spate::pipeline::load_str(&yaml, "p.yaml")
        .unwrap()
        .remove(0)
        .pipeline
}

fn options(identity: &str, state: &std::path::Path) -> ControllerOptions {
    controller_options(identity, "default", state)
}

/// The simulator with the CRD installed, and one controller replica running on it.
struct OneReplica {
    cluster: SimCluster,
    state: tempfile::TempDir,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
}

impl OneReplica {
    async fn start() -> OneReplica {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
        install_crd(&cluster.client()).await;
        let state = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let running = tokio::spawn(controller::run(
            cluster.client(),
            options("replica-a", state.path()),
            stop.clone(),
        ));
        OneReplica {
            cluster,
            state,
            stop,
            running,
        }
    }
}

async fn status_of(pipelines: &Api<Pipeline>, name: &str) -> PipelineStatus {
    pipelines
        .get_status(name)
        .await
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Waits (up to a minute) until `events` events have a Job owned by `owner_uid`, each exactly one.
async fn one_job_per_event(jobs: &Api<Job>, owner_uid: &str, events: usize, what: &str) {
    eventually(what, 60, || async {
        let owners = owned_jobs(jobs, owner_uid).await;
        (owners.len() == events && owners.values().all(|n| *n == 1))
            .then_some(())
            .ok_or(format!("{} events have Jobs: {owners:?}", owners.len()))
    })
    .await;
}

/// Event id → Jobs carrying it, for Jobs owned by `owner_uid`.
async fn owned_jobs(jobs: &Api<Job>, owner_uid: &str) -> BTreeMap<String, usize> {
    let list = jobs.list(&ListParams::default()).await.unwrap();
    let owned = list.items.iter().filter(|job| {
        job.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|owner| owner.uid == owner_uid && owner.kind == "Pipeline")
    });
    common::jobs_per_event(owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelines_are_run_paused_validated_and_deleted_through_the_api() {
    let OneReplica {
        cluster,
        state,
        stop,
        running,
    } = OneReplica::start().await;
    let queue = format!("spate-controller-{}", std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("c", 0, 30)).await;

    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), "default");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let created = pipelines
        .create(&PostParams::default(), &pipeline("orders", &queue))
        .await
        .unwrap();
    let uid = created.meta().uid.clone().unwrap();

    one_job_per_event(&jobs, &uid, 30, "30 Jobs owned by the Pipeline").await;
    eventually("status counts and Ready", 30, || async {
        let status = status_of(&pipelines, "orders").await;
        let ready = status
            .conditions
            .first()
            .map(|c| (c.status.clone(), c.reason.clone()));
        (status.received == 30
            && status.source.as_deref() == Some("amqp")
            && ready == Some(("True".to_string(), "Running".to_string())))
        .then_some(())
        .ok_or(format!("{status:?}"))
    })
    .await;

    // Paused with the CLI: new messages wait in the queue.
    let kubeconfig = state.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let spate = |verb: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
            .args([verb, "orders", "-n", "default", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    spate("pause");
    eventually("Paused condition", 30, || async {
        let status = status_of(&pipelines, "orders").await;
        (status.conditions.first().map(|c| c.reason.as_str()) == Some("Paused"))
            .then_some(())
            .ok_or(format!("{status:?}"))
    })
    .await;
    publish(&connection, &queue, ids("c", 30, 10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        owned_jobs(&jobs, &uid).await.len(),
        30,
        "a paused pipeline took events"
    );

    // Resumed with the CLI: they get their Jobs.
    spate("resume");
    one_job_per_event(&jobs, &uid, 40, "40 Jobs after resume").await;

    // An invalid change is reported, field and all, and nothing runs.
    let invalid = serde_json::json!({"spec": {"fanout": {"batchSize": 0}}});
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(&invalid))
        .await
        .unwrap();
    eventually("Invalid condition naming the field", 30, || async {
        let status = status_of(&pipelines, "orders").await;
        let invalid = status.conditions.first().is_some_and(|condition| {
            condition.reason == "Invalid" && condition.message.contains("spec.fanout.batchSize")
        });
        let reported = status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("spec.fanout.batchSize"));
        (invalid && reported)
            .then_some(())
            .ok_or(format!("{status:?}"))
    })
    .await;

    // Fixed: running again, and the error it no longer has is gone from its status.
    let fixed = serde_json::json!({"spec": {"fanout": {"batchSize": null}}});
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(&fixed))
        .await
        .unwrap();
    eventually("Running again, lastError cleared", 30, || async {
        let status = status_of(&pipelines, "orders").await;
        let running = status
            .conditions
            .first()
            .is_some_and(|condition| condition.reason == "Running");
        (running && status.last_error.is_none())
            .then_some(())
            .ok_or(format!("{status:?}"))
    })
    .await;

    // Deleted: its Jobs are garbage-collected through their owner reference.
    pipelines
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Jobs gone with their Pipeline", 60, || async {
        let left = owned_jobs(&jobs, &uid).await.len();
        (left == 0)
            .then_some(())
            .ok_or(format!("{left} events still have Jobs"))
    })
    .await;

    stop.cancel();
    running.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_that_cannot_start_yet_starts_once_it_can() {
    let OneReplica {
        cluster,
        // Held to the end: the controller keeps its state there.
        state: _state,
        stop,
        running,
    } = OneReplica::start().await;
    let queue = format!("spate-controller-late-secret-{}", std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("s", 0, 10)).await;

    // The broker's URL is in a Secret that does not exist yet.
    let mut waiting = pipeline("late", &queue);
    waiting.spec.source = serde_json::from_value(serde_json::json!({
        "amqp": {"urlFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}, "queue": queue}
    }))
    .unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), "default");
    let created = pipelines
        .create(&PostParams::default(), &waiting)
        .await
        .unwrap();
    let uid = created.meta().uid.clone().unwrap();
    await_status(
        &pipelines,
        "late",
        "StartFailed naming the Secret",
        |status| {
            status
                .conditions
                .first()
                .is_some_and(|c| c.reason == "StartFailed" && c.message.contains("broker"))
        },
    )
    .await;

    // The Secret arrives: without any change to the Pipeline, it starts and takes its events.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cluster.client(), "default");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "broker"},
        "data": {"url": k8s_openapi::ByteString(AMQP.as_bytes().to_vec())}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    one_job_per_event(&jobs, &uid, 10, "10 Jobs once the Secret exists").await;
    await_status(&pipelines, "late", "Running", |status| {
        ready_reason(status) == Some("Running") && status.last_error.is_none()
    })
    .await;

    stop.cancel();
    running.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// The engine starts (sources connect in the background), then the source finds its queue
/// missing: the status says so, and the Pipeline runs once the queue exists, unedited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_whose_source_stops_for_good_says_so_and_runs_once_it_can() {
    let OneReplica {
        cluster,
        state: _state,
        stop,
        running,
    } = OneReplica::start().await;
    let queue = format!("spate-controller-missing-queue-{}", std::process::id());
    let connection = connect_amqp().await;
    delete_queues(&connection, &[&queue]).await;

    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), "default");
    let created = pipelines
        .create(&PostParams::default(), &pipeline("missing", &queue))
        .await
        .unwrap();
    let uid = created.meta().uid.clone().unwrap();
    await_status(
        &pipelines,
        "missing",
        "SourceFailed naming the queue",
        |status| {
            status.conditions.first().is_some_and(|c| {
                c.status == "False" && c.reason == "SourceFailed" && c.message.contains(&queue)
            })
        },
    )
    .await;

    // The queue is created and filled: the Pipeline takes its events without an edit.
    publish(&connection, &queue, ids("q", 0, 10)).await;
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    one_job_per_event(&jobs, &uid, 10, "10 Jobs once the queue exists").await;
    await_status(&pipelines, "missing", "Running", |status| {
        ready_reason(status) == Some("Running") && status.last_error.is_none()
    })
    .await;

    stop.cancel();
    running.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_run_each_pipeline_once_and_fail_over() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    install_crd(&cluster.client()).await;
    let state_a = tempfile::tempdir().unwrap();
    let state_b = tempfile::tempdir().unwrap();
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let replica_a = tokio::spawn(controller::run(
        cluster.client(),
        options("replica-a", state_a.path()),
        stop_a.clone(),
    ));
    // Let A win the lease before B starts, so the test knows whom to kill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replica_b = tokio::spawn(controller::run(
        cluster.client(),
        options("replica-b", state_b.path()),
        stop_b.clone(),
    ));

    let queue = format!("spate-leader-{}", std::process::id());
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("c", 0, 20)).await;
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client(), "default");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let uid = pipelines
        .create(&PostParams::default(), &pipeline("ledger", &queue))
        .await
        .unwrap()
        .meta()
        .uid
        .clone()
        .unwrap();
    eventually("20 Jobs", 60, || async {
        let owners = owned_jobs(&jobs, &uid).await;
        (owners.len() == 20)
            .then_some(())
            .ok_or(format!("{}", owners.len()))
    })
    .await;

    // The leader dies; the other takes over and the work continues, once per event.
    stop_a.cancel();
    replica_a.await.unwrap();
    publish(&connection, &queue, ids("c", 20, 20)).await;
    one_job_per_event(&jobs, &uid, 40, "40 Jobs after fail-over").await;
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client(), "default");
    let holder = lease
        .get("spate-controller")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("replica-b"));

    stop_b.cancel();
    replica_b.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// A holder whose clock is an hour behind writes `renewTime`s an hour old while it renews
/// every half second: the Lease is alive, and a candidate must not take it. Once the holder
/// stops renewing, the candidate takes it after the Lease's duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_renewed_by_a_holder_with_a_slow_clock_is_not_taken() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "default");
    let an_hour_ago = || MicroTime(jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1));
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "spate-controller"},
        "spec": {"holderIdentity": "slow-clock", "leaseDurationSeconds": 3,
                 "renewTime": an_hour_ago(), "acquireTime": an_hour_ago()}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let holder_stops = CancellationToken::new();
    let holder = tokio::spawn({
        let (leases, stops) = (leases.clone(), holder_stops.clone());
        async move {
            while !stops.is_cancelled() {
                let mut lease = leases.get("spate-controller").await.unwrap();
                lease.spec.as_mut().unwrap().renew_time = Some(an_hour_ago());
                leases
                    .replace("spate-controller", &PostParams::default(), &lease)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let state = tempfile::tempdir().unwrap();
    let candidate = options("replica-b", state.path()).lease;
    let shutdown = CancellationToken::new();
    let acquiring = tokio::spawn(spate::engine::leader::acquire(
        cluster.client(),
        candidate,
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        !acquiring.is_finished(),
        "the candidate took a Lease that was being renewed"
    );

    holder_stops.cancel();
    holder.await.unwrap();
    let stopped = tokio::time::Instant::now();
    let leading = tokio::time::timeout(Duration::from_secs(15), acquiring)
        .await
        .expect("the candidate takes the Lease once nobody renews it")
        .unwrap()
        .expect("leading");
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "taken {:?} after the last renewal, before the Lease's 3 s",
        stopped.elapsed()
    );
    let taken = leases.get("spate-controller").await.unwrap();
    assert_eq!(
        taken.spec.unwrap().holder_identity.as_deref(),
        Some("replica-b")
    );
    leading.cancel();
    shutdown.cancel();
    cluster.shutdown().await;
}

/// A replica waiting for the Lease answers every webhook path with 503 and Retry-After, which
/// a caller retries (the Service sends the retry to the leader); once it leads, a path no
/// pipeline serves is a 404 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_replica_tells_webhook_callers_to_retry() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    install_crd(&cluster.client()).await;
    // Another replica holds the Lease and renews it.
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "default");
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "spate-controller"},
        "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 3,
                 "renewTime": MicroTime(jiff::Timestamp::now())}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let holder_stops = CancellationToken::new();
    let holder = tokio::spawn({
        let (leases, stops) = (leases.clone(), holder_stops.clone());
        async move {
            while !stops.is_cancelled() {
                let mut lease = leases.get("spate-controller").await.unwrap();
                lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(jiff::Timestamp::now()));
                leases
                    .replace("spate-controller", &PostParams::default(), &lease)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });

    let webhooks = spate_sources::webhook::WebhookServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = webhooks.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn({
        let (serving, stop) = (webhooks.clone(), stop.clone());
        async move { serving.serve(stop).await }
    });
    let state = tempfile::tempdir().unwrap();
    let mut options = options("replica-b", state.path());
    options.engine.webhooks = Some(webhooks);
    let running = tokio::spawn(controller::run(cluster.client(), options, stop.clone()));
    let http = reqwest::Client::new();
    let call = || async {
        let answer = http
            .post(format!("http://{address}/hooks/orders"))
            .body("{}")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let retry_after = answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok::<_, String>((answer.status().as_u16(), retry_after))
    };
    eventually("503 from the standby", 10, || async {
        match call().await? {
            (503, Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    holder_stops.cancel();
    holder.await.unwrap();
    eventually("404 once it leads", 20, || async {
        match call().await? {
            (404, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    cluster.shutdown().await;
}
