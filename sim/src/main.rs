//! `spate-sim`: runs a simulated Kubernetes cluster until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use spate_sim::{Faults, SimCluster, SimConfig};
use tokio_util::sync::CancellationToken;

const EXAMPLES: &str = "Examples:
  # A cluster with one virtual-kubelet node, for kubectl:
  spate-sim --kubeconfig-out /tmp/sim.kubeconfig &
  kubectl --kubeconfig /tmp/sim.kubeconfig get nodes

  # Two regular nodes besides the virtual one, and 5% of API requests throttled:
  spate-sim --kubeconfig-out /tmp/sim.kubeconfig --regular-nodes 2 --throttle-rate 0.05

  # Switch faults and read request counts while it runs:
  echo '{\"dropWatchesAfterSeconds\": 10}' > faults.json
  kubectl --kubeconfig /tmp/sim.kubeconfig replace --raw /sim/faults -f faults.json
  kubectl --kubeconfig /tmp/sim.kubeconfig get --raw /sim/requests

  # Play the virtual-kubelet node of a real control plane (scripts/kube start):
  spate-sim node --kubeconfig \"$(scripts/kube kubeconfig)\" --name spate-virtual-0";

/// A Kubernetes API server, controllers and virtual-kubelet nodes on loopback.
///
/// Point kubectl or any client at the written kubeconfig:
/// `spate-sim --listen 127.0.0.1:6443 --kubeconfig-out /tmp/sim.kubeconfig`, then
/// `kubectl --kubeconfig /tmp/sim.kubeconfig get nodes`. Faults can also be switched at run
/// time with `PUT /sim/faults`; request counts are at `GET /sim/requests`.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of the HTTPS API server.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Where to write the kubeconfig (CA, server URL and bearer token).
    #[arg(long, required = true)]
    kubeconfig_out: Option<PathBuf>,
    /// Virtual-kubelet nodes (tainted, large capacity).
    #[arg(long, default_value_t = 1)]
    virtual_nodes: usize,
    /// Small regular nodes.
    #[arg(long, default_value_t = 0)]
    regular_nodes: usize,
    #[command(flatten)]
    pods: PodBehaviour,
    /// Fault: fixed latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fault: extra random latency, up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Fault: fraction (0..=1) of API requests answered 429 TooManyRequests.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Fault: Retry-After seconds sent with injected 429s.
    #[arg(long, default_value_t = 1)]
    retry_after_seconds: u64,
    /// Fault: fraction (0..=1) of API requests answered 500 or 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fault: end every watch this many seconds after it starts.
    #[arg(long)]
    drop_watches_after_seconds: Option<u64>,
    /// Changes kept per resource for watch resumption (older resumes get 410 Expired).
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_interval_seconds: u64,
}

/// How a node runs the pods bound to it.
#[derive(Debug, ClapArgs)]
struct PodBehaviour {
    /// Run containers' commands as local processes instead of simulating them.
    #[arg(long)]
    exec: bool,
    /// PATH of exec-mode containers (default: the simulator's own), e.g. where the worker
    /// binaries a pipeline runs are installed.
    #[arg(long, value_name = "DIRS", requires = "exec")]
    exec_path: Option<std::ffi::OsString>,
    /// Milliseconds from binding to Running for simulated pods.
    #[arg(long, default_value_t = 100)]
    start_latency_ms: u64,
    /// Milliseconds a simulated container runs.
    #[arg(long, default_value_t = 500)]
    run_time_ms: u64,
    /// Probability (0..=1) that a simulated container fails.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
}

impl PodBehaviour {
    fn node_config(&self, name: String) -> anyhow::Result<spate_sim::node::NodeConfig> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            anyhow::bail!("--failure-rate must be between 0 and 1");
        }
        Ok(spate_sim::node::NodeConfig {
            name,
            exec: self.exec,
            start_latency: Duration::from_millis(self.start_latency_ms),
            run_time: Duration::from_millis(self.run_time_ms),
            failure_rate: self.failure_rate,
            exec_path: self.exec_path.clone(),
            ..spate_sim::node::NodeConfig::default()
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Plays one virtual-kubelet node of an existing cluster (a real control plane without
    /// kubelets): registers the Node, renews its Lease and drives the pods bound to it.
    Node(NodeArgs),
}

#[derive(Debug, ClapArgs)]
struct NodeArgs {
    /// Kubeconfig of the cluster; its identity must be allowed to write Nodes, Leases in
    /// kube-node-lease, pods/status and Events (cluster-admin does).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Name of the Node.
    #[arg(long, default_value = "spate-virtual-0")]
    name: String,
    #[command(flatten)]
    pods: PodBehaviour,
}

impl Args {
    fn config(&self) -> anyhow::Result<SimConfig> {
        let faults = Faults {
            latency_ms: self.latency_ms,
            jitter_ms: self.jitter_ms,
            throttle_rate: self.throttle_rate,
            retry_after_seconds: self.retry_after_seconds,
            error_rate: self.error_rate,
            drop_watches_after_seconds: self.drop_watches_after_seconds,
            expire_next_watch: false,
        };
        faults.validate().map_err(anyhow::Error::msg)?;
        let defaults = SimConfig::default();
        Ok(SimConfig {
            listen: self.listen,
            virtual_nodes: self.virtual_nodes,
            regular_nodes: self.regular_nodes,
            exec: self.pods.exec,
            faults,
            node: self.pods.node_config(defaults.node.name.clone())?,
            watch_history: self.watch_history,
            bookmark_interval: Duration::from_secs(self.bookmark_interval_seconds.max(1)),
            ..defaults
        })
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    spate_sim::install_crypto_provider();
    let args = Args::parse();
    if let Some(Command::Node(node)) = &args.command {
        return run_node(node).await;
    }
    let kubeconfig_out = args
        .kubeconfig_out
        .clone()
        .context("--kubeconfig-out is required")?;
    let cluster = SimCluster::start(args.config()?).await?;
    cluster.write_kubeconfig(&kubeconfig_out)?;
    tracing::info!(url = cluster.url(), kubeconfig = %kubeconfig_out.display(), "cluster ready");
    shutdown_signal()
        .await
        .context("failed to wait for a signal")?;
    tracing::info!("shutting down");
    cluster.shutdown().await;
    Ok(())
}

async fn run_node(args: &NodeArgs) -> anyhow::Result<()> {
    let config = args.pods.node_config(args.name.clone())?;
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("failed to read {}", args.kubeconfig.display()))?;
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("failed to load {}", args.kubeconfig.display()))?;
    let client = kube::Client::try_from(client_config).context("failed to build a client")?;
    let shutdown = CancellationToken::new();
    let mut node = tokio::spawn(spate_sim::node::run(client, config, shutdown.clone()));
    tokio::select! {
        signal = shutdown_signal() => {
            signal.context("failed to wait for a signal")?;
            tracing::info!("shutting down");
            shutdown.cancel();
            node.await.context("the node agent panicked")?
        }
        stopped = &mut node => stopped.context("the node agent panicked")?,
    }
}
