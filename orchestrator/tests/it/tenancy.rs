//! One controller serving two teams' namespaces, on the simulator with real RabbitMQ: a
//! Pipeline uses the Secrets of its own namespace, and of the controller's own authority only
//! what the operator granted its namespace. Everything else is refused in its status, naming
//! what it asked for.

use crate::common;

use std::sync::Arc;

use common::{
    AMQP, await_status, connect_amqp, controller_options, delete_queues, ids, install_crd, publish,
    ready_reason,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;
use spate::engine::controller;
use spate::engine::tenancy::{Grants, Tenancy};
use spate::pipeline::{Pipeline, PipelineStatus};
use spate_sim::{SimCluster, SimConfig};
use tokio_util::sync::CancellationToken;

/// Granted to team-a only, and set in no test process: a Pipeline that gets past the grant
/// fails on the variable being unset instead.
const GRANTED_ONLY_TO_TEAM_A: &str = "SPATE_TENANCY_TEST_BROKER_URL";

fn pipeline(namespace: &str, name: &str, source: serde_json::Value) -> Pipeline {
    serde_json::from_value(json!({
        "apiVersion": "spate.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": source,
            "fanout": {"maxParallelism": 10},
            "jobTemplate": {"spec": {"template": {"spec": {
                "containers": [{"name": "work", "image": "busybox"}]
            }}}}
        }
    }))
    .unwrap()
}

fn broker_secret(name: &str, url: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {"url": k8s_openapi::ByteString(url.as_bytes().to_vec())}
    }))
    .unwrap()
}

/// Waits until the Pipeline is not running, for a reason whose message says `says`.
async fn refused(client: &kube::Client, namespace: &str, name: &str, says: &[&str]) {
    let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), namespace);
    await_status(
        &pipelines,
        name,
        &format!("{namespace}/{name} refused, saying {says:?}"),
        |status: &PipelineStatus| {
            status.conditions.first().is_some_and(|condition| {
                condition.status == "False"
                    && says.iter().all(|text| condition.message.contains(text))
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_reaches_only_its_own_namespace_and_what_was_granted_to_it() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    assert!(
        std::env::var_os(GRANTED_ONLY_TO_TEAM_A).is_none(),
        "{GRANTED_ONLY_TO_TEAM_A} must not be set for this test"
    );
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    install_crd(&client).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for namespace in ["team-a", "team-b"] {
        let object: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        namespaces
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    // Each team has its broker Secret; only team-a has `team-a-broker`.
    let queue = format!("spate-tenancy-{}", std::process::id());
    for (namespace, name) in [
        ("team-a", "broker"),
        ("team-a", "team-a-broker"),
        ("team-b", "broker"),
    ] {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        secrets
            .create(&PostParams::default(), &broker_secret(name, AMQP))
            .await
            .unwrap();
    }

    let state = tempfile::tempdir().unwrap();
    let mut options = controller_options("replica-a", "default", state.path());
    options.namespace = None;
    let mut grants = Grants::default();
    grants
        .add_env_grant(&format!("{GRANTED_ONLY_TO_TEAM_A}=team-a"))
        .unwrap();
    options.engine.tenancy = Arc::new(Tenancy::Granted(grants));
    let stop = CancellationToken::new();
    let running = tokio::spawn(controller::run(client.clone(), options, stop.clone()));

    let amqp_from = |url: serde_json::Value| json!({"amqp": {"urlFrom": url, "queue": queue}});
    let created = [
        // The controller's environment, granted to team-a only.
        (
            "team-b",
            "borrows-env",
            amqp_from(json!({"env": GRANTED_ONLY_TO_TEAM_A})),
        ),
        (
            "team-a",
            "granted-env",
            amqp_from(json!({"env": GRANTED_ONLY_TO_TEAM_A})),
        ),
        // Any other variable of the controller, e.g. its home directory.
        ("team-a", "other-env", amqp_from(json!({"env": "HOME"}))),
        // The controller's filesystem and its cloud identity.
        (
            "team-b",
            "reads-folder",
            json!({"objectStore": {"url": "file:///etc"}}),
        ),
        (
            "team-b",
            "borrows-identity",
            json!({"objectStore": {"url": "s3://team-a-bucket", "endpoint": "http://127.0.0.1:9",
                                   "region": "us-east-1"}}),
        ),
        // Another namespace's Secret: a name is looked up in the Pipeline's own namespace.
        (
            "team-b",
            "reads-neighbour",
            amqp_from(json!({"secretKeyRef": {"name": "team-a-broker", "key": "url"}})),
        ),
        // Its own Secret: runs.
        (
            "team-b",
            "own-secret",
            amqp_from(json!({"secretKeyRef": {"name": "broker", "key": "url"}})),
        ),
    ];
    for (namespace, name, source) in created {
        let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), namespace);
        pipelines
            .create(&PostParams::default(), &pipeline(namespace, name, source))
            .await
            .unwrap();
    }

    refused(
        &client,
        "team-b",
        "borrows-env",
        &[
            &format!("environment variable {GRANTED_ONLY_TO_TEAM_A}"),
            "namespace team-b has not been granted it",
        ],
    )
    .await;
    // Past the grant, it fails only because the variable is not set here.
    refused(
        &client,
        "team-a",
        "granted-env",
        &[&format!(
            "environment variable {GRANTED_ONLY_TO_TEAM_A} is not set"
        )],
    )
    .await;
    refused(
        &client,
        "team-a",
        "other-env",
        &[
            "environment variable HOME",
            "namespace team-a has not been granted it",
        ],
    )
    .await;
    refused(
        &client,
        "team-b",
        "reads-folder",
        &["the local folder file:///etc", "has not been granted"],
    )
    .await;
    refused(
        &client,
        "team-b",
        "borrows-identity",
        &[
            "credential chain used for s3://team-a-bucket",
            "has not been granted",
        ],
    )
    .await;

    refused(
        &client,
        "team-b",
        "reads-neighbour",
        &["cannot read secret team-a-broker"],
    )
    .await;

    // The Pipeline reading its own namespace's Secret runs and takes its events.
    let team_b: Api<Pipeline> = Api::namespaced(client.clone(), "team-b");
    await_status(&team_b, "own-secret", "Running", |status| {
        ready_reason(status) == Some("Running")
    })
    .await;
    let connection = connect_amqp().await;
    publish(&connection, &queue, ids("t", 0, 5)).await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), "team-b");
    common::eventually("5 Jobs in team-b", 60, || async {
        let count = common::list_jobs_per_event(&jobs, "spate.dev/pipeline=own-secret")
            .await
            .len();
        (count == 5)
            .then_some(())
            .ok_or(format!("{count} events have Jobs"))
    })
    .await;

    stop.cancel();
    running.await.unwrap();
    delete_queues(&connection, &[&queue]).await;
    cluster.shutdown().await;
}

/// A Pipeline with `pod` as its pod spec, taking a tick a second.
fn ticking(namespace: &str, name: &str, pod: serde_json::Value) -> Pipeline {
    serde_json::from_value(json!({
        "apiVersion": "spate.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"cron": {"schedule": "* * * * * *", "missedRuns": "skip"}},
            "fanout": {"maxParallelism": 2},
            "jobTemplate": {"spec": {"template": {"spec": pod}}}
        }
    }))
    .unwrap()
}

/// The pods a Pipeline may make are the operator's to decide: `restricted` everywhere but
/// where a namespace was given another level. A privileged container, the node's files, its
/// network or root are each refused in the status, naming the field and the level; the same
/// root pod runs in the namespace relaxed to `baseline`, and a pod that says nothing gets the
/// restricted settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pipeline_makes_only_the_pods_its_namespaces_level_allows() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    install_crd(&client).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for namespace in ["team-a", "build-farm"] {
        let object: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
        namespaces
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let mut options = controller_options("replica-a", "default", state.path());
    options.namespace = None;
    options
        .pod_security
        .add_namespace_flag("build-farm=baseline")
        .unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(controller::run(client.clone(), options, stop.clone()));

    let work = |security: serde_json::Value| json!([{"name": "work", "image": "busybox", "securityContext": security}]);
    let root = json!({"securityContext": {"runAsUser": 0}, "containers": work(json!({}))});
    let created = [
        (
            "team-a",
            "privileged",
            json!({"containers": work(json!({"privileged": true}))}),
        ),
        (
            "team-a",
            "host-files",
            json!({"volumes": [{"name": "node", "hostPath": {"path": "/"}}],
                   "containers": work(json!({}))}),
        ),
        (
            "build-farm",
            "host-network",
            json!({"hostNetwork": true, "containers": work(json!({}))}),
        ),
        ("team-a", "root", root.clone()),
        ("build-farm", "root", root),
        (
            "team-a",
            "plain",
            json!({"containers": [{"name": "work", "image": "busybox"}]}),
        ),
    ];
    for (namespace, name, pod) in created {
        let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), namespace);
        pipelines
            .create(&PostParams::default(), &ticking(namespace, name, pod))
            .await
            .unwrap();
    }
    let field = "spec.jobTemplate.spec.template.spec";
    for (namespace, name, says) in [
        (
            "team-a",
            "privileged",
            format!(
                "{field}.containers[0].securityContext.privileged: a privileged container is not allowed under the `restricted` pod security level"
            ),
        ),
        (
            "team-a",
            "host-files",
            format!("{field}.volumes[0].hostPath: a hostPath volume mounts the node's files"),
        ),
        (
            "build-farm",
            "host-network",
            format!(
                "{field}.hostNetwork: must not be true under the `baseline` pod security level"
            ),
        ),
        (
            "team-a",
            "root",
            format!(
                "{field}.securityContext.runAsUser: must not be 0 (root) under the `restricted` pod security level"
            ),
        ),
    ] {
        refused(&client, namespace, name, &[&says]).await;
    }

    for (namespace, name) in [("build-farm", "root"), ("team-a", "plain")] {
        let jobs: Api<k8s_openapi::api::batch::v1::Job> =
            Api::namespaced(client.clone(), namespace);
        let selector = format!("spate.dev/pipeline={name}");
        common::eventually(&format!("a Job of {namespace}/{name}"), 30, || async {
            let count = common::list_jobs_per_event(&jobs, &selector).await.len();
            (count > 0).then_some(()).ok_or("no Job yet".to_string())
        })
        .await;
    }
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), "team-a");
    let plain = jobs
        .list(&kube::api::ListParams::default().labels("spate.dev/pipeline=plain"))
        .await
        .unwrap()
        .items
        .remove(0);
    let pod = plain.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let own = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(own.allow_privilege_escalation, Some(false));

    stop.cancel();
    running.await.unwrap();
    cluster.shutdown().await;
}
