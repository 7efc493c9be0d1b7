//! Node agents: a virtual-kubelet node (and small regular nodes) driven through the API.
//!
//! [`run`] is one kubelet: it registers a Node ([`registration`]), renews its Lease, serves
//! container logs over HTTP on loopback ([`logs`], the port is the Node's
//! `daemonEndpoints.kubeletEndpoint`, which the API server proxies `kubectl logs` to), and
//! drives the pods bound to it through their lifecycle ([`pods`]): simulated with a start
//! latency, run time and failure rate, or by running each container's command as a local
//! process ([`exec`]). A virtual node can enforce provider quotas ([`quota`]) the way a
//! serverless back-end behind virtual-kubelet does. Everything goes through a
//! [`kube::Client`], so the agent also runs against a real cluster.

mod exec;
mod logs;
mod pods;
mod quota;
mod registration;
mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

pub use exec::ConfigError;
pub use pods::{FAIL_ANNOTATION, RUN_SECONDS_ANNOTATION, START_SECONDS_ANNOTATION};
pub use registration::VIRTUAL_KUBELET_TAINT;

/// How a node behaves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name, e.g. `spate-virtual-0`.
    pub name: String,
    /// `true` for a virtual-kubelet node (tainted), `false` for a small regular node.
    pub virtual_kubelet: bool,
    /// Run each container's command as a local process instead of simulating it.
    pub exec: bool,
    /// `PATH` of exec-mode containers, standing in for the images a node has pulled;
    /// `None` gives them the simulator's own `PATH`.
    pub exec_path: Option<std::ffi::OsString>,
    /// Time from binding to `Running` for a simulated pod (`sim.spate.dev/start-seconds`).
    pub start_latency: Duration,
    /// Time a simulated container runs (`sim.spate.dev/run-seconds`).
    pub run_time: Duration,
    /// Probability in `[0, 1]` that a simulated container exits 1 (`sim.spate.dev/fail`).
    pub failure_rate: f64,
    /// Resources the node advertises; `None` picks the defaults of its kind.
    pub capacity: Option<NodeCapacity>,
    /// Provider quota: pods running at once; beyond it a pod fails with `ProviderFailed`.
    pub max_pods_running: Option<usize>,
    /// Provider quota: container group starts allowed per [`NodeConfig::per`].
    pub max_starts: Option<usize>,
    /// The window of [`NodeConfig::max_starts`].
    pub per: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: "spate-virtual-0".to_owned(),
            virtual_kubelet: true,
            exec: false,
            exec_path: None,
            start_latency: Duration::from_millis(100),
            run_time: Duration::from_millis(500),
            failure_rate: 0.0,
            capacity: None,
            max_pods_running: None,
            max_starts: None,
            per: Duration::from_secs(60),
        }
    }
}

/// Allocatable resources of a node, in Kubernetes quantity notation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    /// e.g. `10k` for a virtual node, `4` for a regular one.
    pub cpu: String,
    /// e.g. `100Ti`.
    pub memory: String,
    /// Maximum number of pods bound at once.
    pub pods: String,
}

/// Registers the node, heartbeats its Lease and drives its pods until `shutdown` is cancelled.
pub async fn run(
    client: kube::Client,
    config: NodeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Several simulated clusters may share a process (tests), and nodes share names.
    let root = std::env::temp_dir().join(format!(
        "spate-sim-{}-{}-{:08x}",
        config.name,
        std::process::id(),
        rand::random::<u32>()
    ));
    tokio::fs::create_dir_all(&root)
        .await
        .with_context(|| format!("creating the node's directory {}", root.display()))?;
    let logs = Arc::new(logs::LogStore::new(root.join("pods")));
    let listener = tokio::net::TcpListener::bind((registration::HOST_IP, 0))
        .await
        .context("binding the node's log server")?;
    let log_port = listener
        .local_addr()
        .context("reading the log server's address")?
        .port();
    let server = axum::serve(listener, logs::router(logs.clone()))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    tracing::debug!(node = %config.name, log_port, "registering node");
    let node_uid = registration::register(&client, &config, log_port)
        .await
        .with_context(|| format!("registering node {}", config.name))?;
    tracing::info!(node = %config.name, virtual_kubelet = config.virtual_kubelet, exec = config.exec, log_port, "node registered");
    let agent = Arc::new(pods::PodAgent::new(client.clone(), config.clone(), logs));
    tokio::join!(
        registration::heartbeat(client, config, node_uid, log_port, shutdown.clone()),
        agent.run(shutdown),
    );
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "log server failed"),
        Err(error) => tracing::warn!(%error, "log server task failed"),
    }
    if let Err(error) = tokio::fs::remove_dir_all(&root).await {
        tracing::debug!(dir = %root.display(), %error, "could not remove the node's directory");
    }
    Ok(())
}
