//! How much the simulator sustains on this machine: Job creates per second through the API
//! (TLS, bearer token, real JSON), and pods in flight on the virtual node.
//!
//! It creates `SPATE_SIM_BENCH_JOBS` (default 10,000) one-pod Jobs from 64 concurrent
//! clients, pods running 10 minutes so they accumulate, then waits until the controllers have
//! made, scheduled and started them all, and reports both rates.
//!
//! Run: `cargo bench -p spate-sim --bench throughput`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use spate_sim::{SimCluster, SimConfig};

fn job(index: usize) -> anyhow::Result<Job> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("bench-{index}")},
        "spec": {"template": {
            "metadata": {"annotations": {"sim.spate.dev/run-seconds": "600"}},
            "spec": {
                "restartPolicy": "Never",
                "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
                "nodeSelector": {"type": "virtual-kubelet"},
                "containers": [{"name": "work", "image": "busybox"}]
            }
        }}
    }))?)
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Warnings from the controllers and nodes say why a run stalls; RUST_LOG widens it.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let jobs: usize = std::env::var("SPATE_SIM_BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cluster = SimCluster::start(SimConfig::default()).await?;
        let api: Api<Job> = Api::namespaced(cluster.client(), "default");
        let started = Instant::now();
        let created = futures::stream::iter(0..jobs)
            .map(|index| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &job(index)?)
                        .await
                        .map_err(anyhow::Error::from)
                }
            })
            .buffer_unordered(64)
            .filter(|result| futures::future::ready(result.is_ok()))
            .count()
            .await;
        let create_time = started.elapsed();
        anyhow::ensure!(
            created == jobs,
            "only {created} of {jobs} Jobs were created"
        );
        println!(
            "created {jobs} Jobs in {:.2} s: {:.0} creates/s",
            create_time.as_secs_f64(),
            jobs as f64 / create_time.as_secs_f64()
        );

        let pods: Api<Pod> = Api::namespaced(cluster.client(), "default");
        let deadline = Instant::now() + Duration::from_secs(900);
        let (running, all_running) = loop {
            let list = pods
                .list(&ListParams::default().fields("status.phase=Running"))
                .await?;
            let running = list.items.len();
            if running >= jobs {
                break (running, started.elapsed());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{running} of {jobs} pods running after 15 minutes"
            );
            eprintln!(
                "{running} of {jobs} pods Running after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        println!();
        println!(
            "| Jobs | create time | creates/s | pods Running at once | time until all Running |"
        );
        println!("|---:|---:|---:|---:|---:|");
        println!(
            "| {jobs} | {:.2} s | {:.0} | {running} | {:.1} s |",
            create_time.as_secs_f64(),
            jobs as f64 / create_time.as_secs_f64(),
            all_running.as_secs_f64()
        );
        cluster.shutdown().await;
        Ok(())
    })
}
