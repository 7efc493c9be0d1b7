//! A Kubernetes API simulator with virtual-kubelet nodes, in the spirit of KWOK.
//!
//! Spate cannot assume a real control plane on the machines it is built and tested on, so this
//! crate carries one: an HTTPS API server on loopback speaking the real Kubernetes REST/JSON
//! protocol ([`apiserver`]), the controllers a cluster runs for the resources Spate uses
//! ([`controllers`]: Jobs, scheduling, garbage collection, TTL clean-up), and node agents
//! ([`node`]) that register virtual-kubelet nodes and drive the pods bound to them.
//!
//! The controllers and node agents talk to the API server only through a [`kube::Client`], as
//! their real counterparts do, so the node agent also runs against a real cluster. Nothing in
//! the product imports this crate: only tests, benchmarks and `spate dev` do.
//!
//! [`SimCluster`] starts the whole thing in-process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cluster = spate_sim::SimCluster::start(spate_sim::SimConfig::default()).await?;
//! let client = cluster.client();
//! let version = client.apiserver_version().await?;
//! assert_eq!(version.major, "1");
//! cluster.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod apiserver;
pub mod controllers;
pub mod node;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use apiserver::{Faults, FaultsHandle, RequestCount, RequestCounts, RequestKey};

/// How a simulated cluster is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// API server address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Virtual-kubelet nodes (tainted, effectively unlimited capacity).
    pub virtual_nodes: usize,
    /// Small regular nodes.
    pub regular_nodes: usize,
    /// Run containers' commands as local processes instead of simulating them.
    pub exec: bool,
    /// Faults active from the start.
    pub faults: Faults,
    /// Behaviour shared by every node; names and kinds are set per node.
    pub node: node::NodeConfig,
    /// Controller tuning.
    pub controllers: controllers::ControllersConfig,
    /// Changes kept per resource for watch resumption.
    pub watch_history: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        let api = apiserver::ApiServerConfig::default();
        Self {
            listen: api.listen,
            virtual_nodes: 1,
            regular_nodes: 0,
            exec: false,
            faults: Faults::default(),
            node: node::NodeConfig::default(),
            controllers: controllers::ControllersConfig::default(),
            watch_history: api.watch_history,
            bookmark_interval: api.bookmark_interval,
        }
    }
}

/// Installs the `ring` rustls provider process-wide. kube panics on its first TLS connection
/// when no provider is installed and several are compiled in, so this runs before any TLS.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running simulated cluster: API server, controllers and nodes.
pub struct SimCluster {
    server: apiserver::ApiServer,
    client: kube::Client,
    kubeconfig: Kubeconfig,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for SimCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCluster")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

fn node_configs(config: &SimConfig) -> Vec<node::NodeConfig> {
    let virtual_nodes = (0..config.virtual_nodes).map(|i| node::NodeConfig {
        name: format!("spate-virtual-{i}"),
        virtual_kubelet: true,
        exec: config.exec,
        ..config.node.clone()
    });
    let regular_nodes = (0..config.regular_nodes).map(|i| node::NodeConfig {
        name: format!("spate-node-{i}"),
        virtual_kubelet: false,
        exec: config.exec,
        ..config.node.clone()
    });
    virtual_nodes.chain(regular_nodes).collect()
}

impl SimCluster {
    /// Starts the API server, then the controllers and nodes; returns once the API answers.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimCluster> {
        install_crypto_provider();
        let server = apiserver::ApiServer::start(apiserver::ApiServerConfig {
            listen: config.listen,
            faults: config.faults.clone(),
            watch_history: config.watch_history,
            bookmark_interval: config.bookmark_interval,
        })
        .await
        .context("failed to start the API server")?;
        let kubeconfig: Kubeconfig = serde_json::from_value(server.kubeconfig_json())
            .context("failed to build the kubeconfig")?;
        let client_config =
            kube::Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default())
                .await
                .context("failed to load the generated kubeconfig")?;
        let client = kube::Client::try_from(client_config).context("failed to build a client")?;
        client
            .apiserver_version()
            .await
            .context("the API server does not answer")?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let (controllers_client, controllers_config, token) =
            (client.clone(), config.controllers.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(error) =
                controllers::run(controllers_client, controllers_config, token).await
            {
                tracing::error!(error = format!("{error:#}"), "controllers stopped");
            }
        });
        for node_config in node_configs(&config) {
            let (node_client, token) = (client.clone(), shutdown.clone());
            tasks.spawn(async move {
                let name = node_config.name.clone();
                if let Err(error) = node::run(node_client, node_config, token).await {
                    tracing::error!(
                        node = name,
                        error = format!("{error:#}"),
                        "node agent stopped"
                    );
                }
            });
        }
        Ok(SimCluster {
            server,
            client,
            kubeconfig,
            shutdown,
            tasks,
        })
    }

    /// A client configured from the cluster's kubeconfig (CA and bearer token).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The kubeconfig users and tools should use.
    pub fn kubeconfig(&self) -> Kubeconfig {
        self.kubeconfig.clone()
    }

    /// Writes the kubeconfig to `path` (JSON, which kubectl reads as YAML).
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.server.kubeconfig_json())?;
        std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The admin bearer token.
    pub fn token(&self) -> &str {
        self.server.token()
    }

    /// The API server itself, for extra identities and certificates.
    pub fn api_server(&self) -> &apiserver::ApiServer {
        &self.server
    }

    /// Run-time fault switches.
    pub fn faults(&self) -> FaultsHandle {
        self.server.faults()
    }

    /// A snapshot of the request counters (also served at `GET /sim/requests`).
    pub fn requests(&self) -> RequestCounts {
        self.server.requests()
    }

    /// Zeroes the request counters (also `DELETE /sim/requests`).
    pub fn reset_requests(&self) {
        self.server.reset_requests();
    }

    /// Stops nodes and controllers, then the API server.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.server.shutdown().await;
    }
}
