//! The API server: HTTPS on loopback, speaking the Kubernetes REST/JSON protocol.
//!
//! Requests flow `http` (TLS, authentication, fault injection, accounting, body decoding,
//! including kubectl's `protobuf`) → `routes` (path → target) → the verbs: `reads` (get,
//! list), `objects` (writes), `deletion`, `watch`, `logs` (proxied to nodes) → `store`
//! (objects, resourceVersions, change history and watch fan-out). `admission`, `patch`,
//! `fields` (server-side apply) and `conversion` hold the pure object logic; `registry`
//! knows which resources are served, built-in or custom; `discovery`, `openapi` and `table`
//! answer what kubectl asks about them. `tls`, `faults` and `accounting` are the
//! simulator's own concerns.

mod accounting;
mod admission;
mod conversion;
mod deletion;
mod discovery;
mod error;
mod faults;
mod fields;
mod http;
mod logs;
mod objects;
mod openapi;
mod patch;
mod protobuf;
mod reads;
mod registry;
mod routes;
mod selectors;
mod store;
mod table;
mod tls;
mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use accounting::{RequestCount, RequestCounts, RequestKey};
pub use error::ApiError;
pub use faults::{Faults, FaultsHandle};
pub use tls::{IssuedCertificate, TlsError};

use accounting::Accounting;
use registry::Registry;
use store::Store;
use tls::ClusterTls;

/// The user the generated kubeconfig authenticates as.
pub const ADMIN_USER: &str = "spate-sim-admin";

/// How the API server is set up.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Faults active from the start.
    pub faults: Faults,
    /// Changes kept per resource for watch resumption.
    pub watch_history: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            faults: Faults::default(),
            watch_history: 10_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// The API server failed to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material could not be created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The fault settings are invalid.
    #[error("invalid faults: {0}")]
    Faults(String),
}

/// Everything request handlers share.
pub(crate) struct ServerState {
    store: Store,
    registry: Registry,
    tls: ClusterTls,
    tokens: parking_lot::RwLock<HashMap<String, String>>,
    faults: FaultsHandle,
    accounting: Accounting,
    bookmark_interval: Duration,
    shutdown: CancellationToken,
    address: SocketAddr,
}

/// A running API server.
pub struct ApiServer {
    state: Arc<ServerState>,
    token: String,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("address", &self.state.address)
            .finish_non_exhaustive()
    }
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

impl ApiServer {
    /// Generates TLS material, seeds the built-in namespaces and starts serving.
    pub async fn start(config: ApiServerConfig) -> Result<Self, StartError> {
        config.faults.validate().map_err(StartError::Faults)?;
        let tls = ClusterTls::generate()?;
        let server_config = Arc::new(tls.server_config()?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let address = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let token = random_token();
        let state = Arc::new(ServerState {
            store: Store::new(config.watch_history),
            registry: Registry::with_builtins(),
            tls,
            tokens: parking_lot::RwLock::new(HashMap::from([(
                token.clone(),
                ADMIN_USER.to_owned(),
            )])),
            faults: FaultsHandle::new(config.faults),
            accounting: Accounting::default(),
            bookmark_interval: config.bookmark_interval,
            shutdown: CancellationToken::new(),
            address,
        });
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            objects::seed_namespace(&state, namespace);
        }
        let task = tokio::spawn(http::serve(state.clone(), listener, server_config));
        tracing::info!(%address, "API server listening");
        Ok(Self { state, token, task })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.state.address)
    }

    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        self.state.address
    }

    /// The admin bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Adds a bearer token authenticating as `user`, for tests that need several identities.
    pub fn add_token(&self, user: &str) -> String {
        let token = random_token();
        self.state
            .tokens
            .write()
            .insert(token.clone(), user.to_owned());
        token
    }

    /// Issues a client certificate (signed by the cluster CA) authenticating as `user`.
    pub fn issue_client_certificate(&self, user: &str) -> Result<IssuedCertificate, TlsError> {
        self.state.tls.issue_client_certificate(user)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.state.tls.ca_pem()
    }

    /// Run-time fault switches.
    pub fn faults(&self) -> FaultsHandle {
        self.state.faults.clone()
    }

    /// A snapshot of the request counters.
    pub fn requests(&self) -> RequestCounts {
        self.state.accounting.snapshot()
    }

    /// Zeroes the request counters.
    pub fn reset_requests(&self) {
        self.state.accounting.reset();
    }

    /// A kubeconfig (as JSON, which is valid YAML) authenticating with the admin token.
    pub fn kubeconfig_json(&self) -> Value {
        let ca = data_encoding::BASE64.encode(self.ca_pem().as_bytes());
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "spate-sim", "cluster": {"server": self.url(), "certificate-authority-data": ca}}],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [{"name": "spate-sim", "context": {"cluster": "spate-sim", "user": ADMIN_USER, "namespace": "default"}}],
            "current-context": "spate-sim",
            "preferences": {},
        })
    }

    /// Stops accepting connections and ends every watch.
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "API server task failed");
        }
    }
}
