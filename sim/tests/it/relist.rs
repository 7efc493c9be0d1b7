//! Controllers keep up when their watches expire: with a tiny watch history and watches
//! dropped every second, every resumption is a `410 Gone` and a relist, and a burst of Jobs
//! still runs to completion. (The scheduler once lost the pods queued from a relist.)

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use spate_sim::{Faults, SimCluster, SimConfig};

fn job(index: usize) -> Job {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("relist-{index}")},
        "spec": {"template": {
            "metadata": {"annotations": {"sim.spate.dev/run-seconds": "0.2"}},
            "spec": {
                "restartPolicy": "Never",
                "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "work", "image": "busybox"}]
            }
        }}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_completes_while_every_watch_expires_and_relists() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig {
        watch_history: 20,
        faults: Faults {
            drop_watches_after_seconds: Some(1),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");
    futures::stream::iter(0..1000)
        .for_each_concurrent(16, |index| {
            let jobs = jobs.clone();
            async move {
                jobs.create(&PostParams::default(), &job(index))
                    .await
                    .unwrap();
            }
        })
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let complete = jobs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|job| {
                job.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Complete" && c.status == "True")
                    })
            })
            .count();
        if complete == 1000 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
            let mut phases = std::collections::BTreeMap::<String, usize>::new();
            for pod in pods.list(&ListParams::default()).await.unwrap() {
                let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
                let bound = pod.spec.and_then(|s| s.node_name).is_some();
                *phases.entry(format!("{phase} bound={bound}")).or_default() += 1;
            }
            panic!(
                "{complete} of 1000 Jobs complete: work was lost across relists; pods: {phases:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cluster.shutdown().await;
}
