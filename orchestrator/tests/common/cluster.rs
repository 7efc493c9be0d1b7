//! The cluster an end-to-end test runs against: the simulator, or a real Kubernetes
//! control plane (`scripts/kube`) with spate-sim's node agent playing its virtual-kubelet node.
//!
//! The real control plane is started once per machine (the script is idempotent) and shared
//! by every test of the run; each test gets a namespace of its own, so tests never see each
//! other's Jobs. The node agent runs once per test process on a runtime of its own, because a
//! test's runtime ends with the test. Its name, `spate-virtual-N`, is held by a file lock for
//! the life of the process: a test binary running beside another gets another node, and one
//! that finds a lock free knows the Node's previous agent is gone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use spate_sim::{SimCluster, SimConfig};
use tokio_util::sync::CancellationToken;

/// Which cluster a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `spate_sim::SimCluster`, in this process.
    Sim,
    /// The control plane of `scripts/kube start`.
    Real,
}

enum Backend {
    Sim(Box<SimCluster>),
    Real { admin: kube::Client },
}

/// A cluster and the namespace a test owns on it.
pub struct TestCluster {
    client: kube::Client,
    namespace: String,
    kubeconfig: PathBuf,
    node: String,
    backend: Backend,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts (or joins) the cluster of `kind` for the test `test`.
    pub async fn start(kind: Kind, test: &str) -> TestCluster {
        match kind {
            Kind::Sim => TestCluster::sim(SimConfig::default()).await,
            Kind::Real => TestCluster::real(test).await,
        }
    }

    /// A simulated cluster of its own; the test's namespace is `default`.
    pub async fn sim(config: SimConfig) -> TestCluster {
        spate_sim::install_crypto_provider();
        let cluster = SimCluster::start(config).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig).unwrap();
        TestCluster {
            client: cluster.client(),
            namespace: "default".to_owned(),
            kubeconfig,
            node: "spate-virtual-0".to_owned(),
            backend: Backend::Sim(Box::new(cluster)),
            _dir: dir,
        }
    }

    /// The shared real control plane, in a fresh namespace named after `test`.
    pub async fn real(test: &str) -> TestCluster {
        spate_sim::install_crypto_provider();
        let shared = tokio::task::spawn_blocking(|| REAL.get_or_init(start_real).clone())
            .await
            .unwrap()
            .unwrap_or_else(|error| panic!("{error}"));
        let admin = client(shared.admin.clone(), None).await;
        await_node_ready(&admin, &shared.node).await;
        let namespace = create_namespace(&admin, test).await;
        let mut kubeconfig = shared.admin.clone();
        for context in &mut kubeconfig.contexts {
            if let Some(context) = context.context.as_mut() {
                context.namespace = Some(namespace.clone());
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig).unwrap()).unwrap();
        TestCluster {
            client: client(kubeconfig, Some(&namespace)).await,
            namespace,
            kubeconfig: path,
            node: shared.node.clone(),
            backend: Backend::Real { admin },
            _dir: dir,
        }
    }

    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::Sim(_) => Kind::Sim,
            Backend::Real { .. } => Kind::Real,
        }
    }

    /// A client whose default namespace is the test's.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig whose context's namespace is the test's, for `spate run --kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The virtual-kubelet node pods of this test land on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The test's Jobs.
    pub fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The simulator, for its fault switches and request counters.
    pub fn sim_cluster(&self) -> Option<&SimCluster> {
        match &self.backend {
            Backend::Sim(cluster) => Some(cluster),
            Backend::Real { .. } => None,
        }
    }

    /// Stops the simulator, or deletes the test's namespace on the real control plane (the
    /// control plane and its node stay up for the other tests).
    pub async fn shutdown(self) {
        match self.backend {
            Backend::Sim(cluster) => cluster.shutdown().await,
            Backend::Real { admin } => {
                let namespaces: Api<Namespace> = Api::all(admin);
                let _ = namespaces
                    .delete(&self.namespace, &DeleteParams::background())
                    .await;
            }
        }
    }
}

/// What the tests of one process share on the real control plane.
#[derive(Clone)]
struct Shared {
    admin: Kubeconfig,
    node: String,
}

static REAL: OnceLock<Result<Arc<Shared>, String>> = OnceLock::new();

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `scripts/kube start`, then the node agent on a thread of its own.
fn start_real() -> Result<Arc<Shared>, String> {
    let script = repo_root().join("scripts/kube");
    let started = std::process::Command::new(&script)
        .arg("start")
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    if !started.status.success() {
        // Its message says where it looked for the binaries.
        return Err(format!(
            "{} start failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&started.stderr)
        ));
    }
    eprint!("{}", String::from_utf8_lossy(&started.stderr));
    let printed = std::process::Command::new(&script)
        .arg("kubeconfig")
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&printed.stdout).trim());
    let admin = Kubeconfig::read_from(&path)
        .map_err(|e| format!("could not read the kubeconfig {}: {e}", path.display()))?;
    let state = path
        .parent()
        .ok_or_else(|| format!("{} has no directory", path.display()))?;
    let (index, lock) = node_lock(state)?;
    let node = format!("spate-virtual-{index}");
    let (agent_kubeconfig, agent_node, state) = (admin.clone(), node.clone(), state.to_owned());
    std::thread::Builder::new()
        .name(node.clone())
        .spawn(move || {
            // Held for the life of the process: the lock is what says this node is tended.
            let _lock = lock;
            // One thread, so the agent's tasks all log through this thread's subscriber.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // What the real server refuses the agent shows as its warnings: keep them visible.
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("spate_sim=warn")
                .with_writer(std::io::stderr)
                .finish();
            let _logging = tracing::subscriber::set_default(subscriber);
            runtime.block_on(async move {
                let client = client(agent_kubeconfig, None).await;
                remove_abandoned_nodes(&client, &state, &agent_node).await;
                let config = spate_sim::node::NodeConfig {
                    name: agent_node,
                    ..spate_sim::node::NodeConfig::default()
                };
                if let Err(error) =
                    spate_sim::node::run(client, config, CancellationToken::new()).await
                {
                    eprintln!("the virtual node agent stopped: {error:#}");
                }
            });
        })
        .map_err(|e| format!("could not start the node agent's thread: {e}"))?;
    Ok(Arc::new(Shared { admin, node }))
}

/// The lowest node index whose lock file this process can take, and the held lock.
fn node_lock(state: &Path) -> Result<(usize, File), String> {
    for index in 0..64 {
        let path = state.join(format!("node-{index}.lock"));
        let file =
            File::create(&path).map_err(|e| format!("could not open {}: {e}", path.display()))?;
        if file.try_lock().is_ok() {
            return Ok((index, file));
        }
    }
    Err(format!(
        "64 test processes hold nodes in {}",
        state.display()
    ))
}

/// Deletes the virtual nodes no live process tends (their lock is free), so the scheduler
/// does not place pods where no agent will run them.
async fn remove_abandoned_nodes(client: &kube::Client, state: &Path, own: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let Ok(list) = nodes
        .list(&ListParams::default().labels("type=virtual-kubelet"))
        .await
    else {
        return;
    };
    for node in list.items {
        let name = node.metadata.name.unwrap_or_default();
        let Some(index) = name.strip_prefix("spate-virtual-") else {
            continue;
        };
        if name == own {
            continue;
        }
        let Ok(file) = File::create(state.join(format!("node-{index}.lock"))) else {
            continue;
        };
        if file.try_lock().is_ok() {
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
    }
}

async fn client(kubeconfig: Kubeconfig, namespace: Option<&str>) -> kube::Client {
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    if let Some(namespace) = namespace {
        config.default_namespace = namespace.to_owned();
    }
    kube::Client::try_from(config).unwrap()
}

/// Waits until the node reports Ready and carries no taint but the virtual-kubelet one (the
/// node lifecycle controller taints a new node `not-ready` until it has seen it Ready).
async fn await_node_ready(admin: &kube::Client, name: &str) {
    let nodes: Api<Node> = Api::all(admin.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let node = nodes.get_opt(name).await.ok().flatten();
        let ready = node.as_ref().is_some_and(|node| {
            let status = node.status.as_ref();
            let conditions = status.and_then(|s| s.conditions.as_ref());
            let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                && taints.is_none_or(|t| {
                    t.iter()
                        .all(|t| t.key == spate_sim::node::VIRTUAL_KUBELET_TAINT)
                })
        });
        if ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {name} not Ready and untainted within 90s: {:?}",
            node.map(|n| (
                n.spec.and_then(|s| s.taints),
                n.status.and_then(|s| s.conditions)
            ))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates `test-XXXXXX` and waits for its `default` ServiceAccount, without which the
/// ServiceAccount admission plugin refuses every pod.
async fn create_namespace(admin: &kube::Client, test: &str) -> String {
    let prefix: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    let name = format!(
        "{}-{:06x}",
        prefix.trim_matches('-'),
        rand::random::<u32>() & 0xff_ffff
    );
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &name);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while accounts.get_opt("default").await.ok().flatten().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "namespace {name} has no default ServiceAccount after 60s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    name
}
