//! Webhook callers across a SIGKILL of `spate run`: with `respond: afterJob` (the default) a
//! `202` is given only once the event's Job exists, so every call answered `202` before the
//! kill has its Job, and callers that retry anything else with the same `Idempotency-Key`
//! end, after the restart, with exactly one Job per call.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SpateRun, list_jobs_per_event, post_until_accepted, spawn_spate_run_with_args};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use spate_sim::{SimCluster, SimConfig};

const CALLS: usize = 400;
const CALLERS: usize = 16;

fn spawn_spate(pipeline: &Path, kubeconfig: &Path, state: &Path, webhooks: u16) -> SpateRun {
    let webhooks = format!("127.0.0.1:{webhooks}");
    spawn_spate_run_with_args(
        pipeline,
        kubeconfig,
        state,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--webhook-listen",
            &webhooks,
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_callers_wait_loses_no_call_that_got_202_and_makes_no_second_job() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    // A modest creation rate keeps calls waiting for their Jobs when the kill comes.
    std::fs::write(
        &pipeline,
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: hook-crash
spec:
  source:
    webhook: {path: /hooks/reports, auth: {none: {}}}
  fanout: {maxParallelism: 1000, maxJobsPerSecond: 100, burst: 10}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: work, image: busybox}]
"#,
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = dir.path().join("state");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let selector = "spate.dev/pipeline=hook-crash";

    let mut spate = spawn_spate(&pipeline, &kubeconfig, &state, port);
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/hooks/reports");
    let callers = {
        let accepted = accepted.clone();
        tokio::spawn(
            futures::stream::iter(0..CALLS).for_each_concurrent(CALLERS, move |i| {
                let (http, url, accepted) = (http.clone(), url.clone(), accepted.clone());
                async move {
                    let key = format!("report-{i}");
                    post_until_accepted(&http, &url, &key).await;
                    accepted.lock().unwrap().insert(key);
                }
            }),
        )
    };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < CALLS / 3 {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    spate.kill().unwrap();
    spate.wait().unwrap();

    // Answers already on their way may still arrive; each is a promise that the Job exists.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let promised = accepted.lock().unwrap().clone();
    let owners = list_jobs_per_event(&jobs, selector).await;
    let missing: Vec<&String> = promised
        .iter()
        .filter(|key| !owners.contains_key(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "answered 202 without a Job: {missing:?}"
    );
    assert!(
        promised.len() < CALLS,
        "every call was answered before the kill; the test proves nothing"
    );

    let mut spate = spawn_spate(&pipeline, &kubeconfig, &state, port);
    tokio::time::timeout(Duration::from_secs(150), callers)
        .await
        .expect("every caller answered 202 after the restart")
        .unwrap();
    let owners = list_jobs_per_event(&jobs, selector).await;
    spate.kill().unwrap();
    spate.wait().unwrap();

    assert_eq!(accepted.lock().unwrap().len(), CALLS);
    let expected: BTreeSet<String> = (0..CALLS).map(|i| format!("report-{i}")).collect();
    assert_eq!(owners.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let twice: Vec<_> = owners.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "calls with two Jobs: {twice:?}");
    cluster.shutdown().await;
}
