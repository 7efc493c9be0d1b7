//! Webhook callers across a SIGKILL of `spate run`: with `respond: afterJob` (the default) a
//! `202` is given only once the event's Job exists, so every call answered `202` before the
//! kill has its Job, and callers that retry anything else with the same `Idempotency-Key`
//! end, after the restart, with exactly one Job per call. A caller reaching `spate run` while it
//! starts is told to retry (`503`), never that its path does not exist (`404`).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SpateRun, list_jobs_per_event, post_until_accepted, spawn_spate_run_with_args};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use spate_sim::{Faults, SimCluster, SimConfig};

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
    let port = crate::common::free_port();
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

/// A caller that reaches `spate run` while it starts, its bearer token still being read from
/// a slow API server, is answered `503` (retry) and never `404` (which tells a caller the
/// path does not exist, so it drops its event), and its retry gets its Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_while_spate_starts_is_answered_503_never_404() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), "default");
    let token = Secret {
        metadata: ObjectMeta {
            name: Some("start-up-token".into()),
            ..Default::default()
        },
        string_data: Some([("token".to_string(), "t0ken".to_string())].into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &token)
        .await
        .unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: start-up
spec:
  source:
    webhook:
      path: /hooks/start-up
      auth: {bearer: {token: {secretKeyRef: {name: start-up-token, key: token}}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: work, image: busybox}]
"#,
    )
    .unwrap();
    // Every API call of the start-up, the Secret's read among them, takes this long.
    cluster.faults().set(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let port = crate::common::free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/start-up");
    let mut spate = spawn_spate(&pipeline, &kubeconfig, &dir.path().join("state"), port);
    let http = reqwest::Client::new();
    let mut answers = BTreeMap::<u16, usize>::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = http
            .post(&url)
            .bearer_auth("t0ken")
            .header("Idempotency-Key", "the-one-call")
            .body("{}")
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        if let Ok(answer) = answer {
            let status = answer.status().as_u16();
            *answers.entry(status).or_default() += 1;
            if status == 202 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 202 within 60 s; answers {answers:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.faults().set(Faults::default());
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    let owners = list_jobs_per_event(&jobs, "spate.dev/pipeline=start-up").await;
    spate.kill().unwrap();
    spate.wait().unwrap();
    assert!(
        answers.keys().all(|status| [202, 503].contains(status)),
        "answers while starting: {answers:?}"
    );
    assert!(
        answers.contains_key(&503),
        "no call reached the server before its path was served; the test proves nothing: \
         {answers:?}"
    );
    assert_eq!(owners.len(), 1, "{owners:?}");
    cluster.shutdown().await;
}
