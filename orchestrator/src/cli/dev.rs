//! `spate dev`: a burst on your machine, with nothing to install or configure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use spate_sim::{SimCluster, SimConfig};
use spate_sources::checkpoint::FileCheckpoints;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineOptions};
use crate::pipeline::load_str;

/// The pipeline `spate dev` runs: examples/thumbnails, its bucket pointed at the inbox.
const THUMBNAILS: &str = include_str!("../../../examples/thumbnails/pipeline.yaml");

/// Run a simulated cluster, a local bucket and the engine, and show the burst.
///
/// Starts the Kubernetes simulator with a virtual-kubelet node, watches DIR/inbox as the
/// bucket of the examples/thumbnails pipeline, and prints a line whenever the counts change:
/// events received, pods on the virtual node, Jobs finished. Drop image files into the inbox
/// and watch the pods burst and fall back to zero. `kubectl --kubeconfig DIR/kubeconfig` shows
/// the same cluster. Stop with Ctrl-C.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate dev\n  spate dev --dir /tmp/my-burst\n  # in another terminal:\n  for i in $(seq 200); do cp photo.jpg /tmp/spate-dev/inbox/photo-$i.jpg; done\n  kubectl --kubeconfig /tmp/spate-dev/kubeconfig get pods"
)]
pub struct DevArgs {
    /// Where the inbox, the kubeconfig and the state live.
    #[arg(long, value_name = "DIR", default_value = "/tmp/spate-dev")]
    pub dir: PathBuf,
    /// How long each simulated pod runs.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub pod_run_time: Duration,
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> anyhow::Result<ExitCode> {
    let inbox = args.dir.join("inbox");
    std::fs::create_dir_all(&inbox)
        .with_context(|| format!("cannot create {}", inbox.display()))?;
    let inbox = inbox.canonicalize()?;
    let mut config = SimConfig::default();
    config.node.run_time = args.pod_run_time;
    let cluster = SimCluster::start(config).await?;
    let kubeconfig = args.dir.join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig)?;

    let yaml = THUMBNAILS.replace(
        "file:///tmp/spate-dev/inbox",
        &format!("file://{}", inbox.display()),
    );
    let loaded = load_str(&yaml, "examples/thumbnails/pipeline.yaml").map_err(|diagnostics| {
        anyhow::anyhow!(
            "{}",
            diagnostics
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let state = args.dir.join("state");
    let engine = Engine::start(
        cluster.client(),
        loaded,
        EngineOptions {
            checkpoints: Arc::new(FileCheckpoints::new(state.join("checkpoints"))),
            state_dir: state,
            namespace_budget: None,
            webhooks: None,
            drain_timeout: Duration::from_secs(10),
        },
    )
    .await?;
    println!("spate dev: a simulated cluster with a virtual-kubelet node is running.");
    println!("  drop files into {}", inbox.display());
    println!(
        "  kubectl --kubeconfig {} get jobs,pods",
        kubeconfig.display()
    );
    println!("  Ctrl-C to stop");

    let stop = CancellationToken::new();
    let signals = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signals.cancel();
    });
    let Some(pipeline) = engine.pipelines.first().cloned() else {
        anyhow::bail!("the thumbnails pipeline did not start");
    };
    let mut last = None;
    let mut peak = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let stats = pipeline.stats.snapshot();
        let pods = pipeline.budget.in_use();
        peak = peak.max(pods);
        let line = (
            stats.received,
            pods,
            stats.succeeded,
            stats.failed,
            stats.dead_lettered,
        );
        if last != Some(line) {
            println!(
                "received {:>5}  pods pending or running {:>4} (peak {peak})  succeeded {:>5}  failed {:>3}  dead-lettered {:>3}",
                line.0, line.1, line.2, line.3, line.4
            );
            last = Some(line);
        }
    }
    engine.shutdown().await;
    cluster.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
