//! `spate run`: the engine, for pipelines given as files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use spate_sources::SourceConfig;
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::object_store::NotificationTransport;
use spate_sources::webhook::WebhookServer;
use tokio_util::sync::CancellationToken;

use super::ClusterArgs;
use crate::engine::checkpoints::ConfigMapCheckpoints;
use crate::engine::controller::{self, ControllerOptions};
use crate::engine::leader::LeaseConfig;
use crate::engine::tenancy::{Grants, Tenancy};
use crate::engine::{Engine, EngineOptions, http};
use crate::pipeline::load::load_file_with;
use crate::pod_security::{Level, Policy};

/// Run the engine: take events from each pipeline's source and create their Jobs.
///
/// With -f, pipelines come from files. Without, Spate runs as the in-cluster controller: it
/// watches Pipeline resources (in -n NAMESPACE, or all namespaces), runs each while this
/// replica holds the leader Lease, and writes their status. Either way it runs until SIGTERM
/// or Ctrl-C, then stops taking events, finishes the Job creations in flight, acknowledges
/// their events and exits.
///
/// In controller mode a Pipeline uses Secrets of its own namespace; the controller's own
/// environment variables, cloud identity and folders only where --grant-env or
/// --trust-namespace gives them to its namespace.
///
/// Every pod a pipeline makes must meet a Kubernetes Pod Security Standard: `restricted`
/// unless --pod-security or, for one namespace, --pod-security-namespace says otherwise.
/// A pipeline whose template breaks it does not start (the field and line say why); a pod a
/// placeholder renders into breaking it is dead-lettered.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate run -f examples/amqp-work-queue/pipeline.yaml\n  spate run -f a.yaml -f b.yaml --kubeconfig ~/.kube/config --max-pods 200\n  spate run -f pipeline.yaml --metrics-listen 127.0.0.1:9464\n  spate run --grant-env SPATE_AMQP_URL=team-a,team-b --trust-namespace spate-system\n  spate run --pod-security-namespace build-farm=baseline"
)]
pub struct RunArgs {
    /// Pipeline files; without any, watch Pipeline resources in the cluster.
    #[arg(short = 'f', long = "filename", value_name = "FILE", num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Controller mode: namespace of the leader-election Lease (default: $POD_NAMESPACE,
    /// else -n, else `default`).
    #[arg(long, value_name = "NAME", env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Controller mode: this replica's identity in the Lease (default: $POD_NAME, else
    /// host name and process id).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub identity: Option<String>,
    /// Controller mode: how long the leader Lease holds without renewal before another
    /// replica may take it over (the leader renews it every third of this). Whole seconds,
    /// at least 3s.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_lease_duration)]
    pub lease_duration: Duration,
    /// Where sources keep checkpoints and local state.
    #[arg(long, value_name = "DIR", default_value = ".spate/state")]
    pub state_dir: PathBuf,
    /// Pods at once across all pipelines of this process.
    #[arg(long, value_name = "N")]
    pub max_pods: Option<u32>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Address of the webhook server, started when a pipeline takes webhooks.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8088")]
    pub webhook_listen: SocketAddr,
    /// How long shutdown waits for Job creations in flight.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Controller mode: let Pipelines of these namespaces name this environment variable of
    /// the controller with `{env: NAME}` (`NAME=*` for every namespace). Repeatable. Without
    /// a grant a Pipeline reads credentials only from Secrets of its own namespace.
    #[arg(long, value_name = "NAME=NAMESPACE[,NAMESPACE...]")]
    pub grant_env: Vec<String>,
    /// Controller mode: a namespace whose Pipelines may use everything the controller
    /// process has: every environment variable, the cloud identity object stores fall back to
    /// without keys, its local folders. For the operator's own namespace. Repeatable.
    #[arg(long, value_name = "NAMESPACE")]
    pub trust_namespace: Vec<String>,
    #[command(flatten)]
    pub pod_security: PodSecurityArgs,
}

/// The pod security levels a run enforces, as flags.
#[derive(Debug, Args)]
pub struct PodSecurityArgs {
    /// The Pod Security Standard every pipeline's pods must meet: `restricted` (non-root, no
    /// privilege escalation, capabilities dropped, no host access), `baseline` (no host
    /// namespaces, privileged containers, hostPath or host ports) or `privileged` (anything).
    #[arg(
        long = "pod-security",
        value_name = "LEVEL",
        value_enum,
        default_value_t
    )]
    pub level: Level,
    /// Another level for the pipelines of one namespace, e.g. `build-farm=baseline`.
    /// Repeatable.
    #[arg(long = "pod-security-namespace", value_name = "NAMESPACE=LEVEL")]
    pub namespaces: Vec<String>,
}

impl PodSecurityArgs {
    pub fn policy(&self) -> anyhow::Result<Policy> {
        let mut policy = Policy {
            default: self.level,
            ..Policy::default()
        };
        for flag in &self.namespaces {
            policy
                .add_namespace_flag(flag)
                .map_err(|error| anyhow::anyhow!("--pod-security-namespace {error}"))?;
        }
        Ok(policy)
    }
}

pub fn run(args: RunArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args, cluster))
}

async fn run_async(args: RunArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    if args.files.is_empty() {
        return run_controller(args, cluster).await;
    }
    let policy = args.pod_security.policy()?;
    let mut pipelines = Vec::new();
    let mut failed = false;
    for file in &args.files {
        match load_file_with(file, &policy) {
            Ok(loaded) => pipelines.extend(loaded),
            Err(diagnostics) => {
                failed = true;
                diagnostics.iter().for_each(|d| eprintln!("{d}"));
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    let client = cluster.client().await?;
    // `-n`, else the kubeconfig context's namespace, as for every other verb.
    let namespace = cluster
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    for loaded in &mut pipelines {
        if loaded.pipeline.metadata.namespace.is_none() {
            loaded.pipeline.metadata.namespace = Some(namespace.clone());
        }
    }
    let stop = CancellationToken::new();
    let mut starting = None;
    let webhooks = if pipelines
        .iter()
        .any(|p| takes_webhooks(&p.pipeline.spec.source))
    {
        let server = WebhookServer::bind(args.webhook_listen).await?;
        // Serving before the engine has registered the paths holds the port and answers
        // callers 503 (retry) rather than refusing them, until the paths are there.
        starting = Some(server.starting());
        let serving = server.clone();
        let until = stop.clone();
        tokio::spawn(async move {
            if let Err(error) = serving.serve(until).await {
                tracing::error!(%error, "webhook server stopped");
            }
        });
        eprintln!("spate: webhooks on http://{}", server.local_addr());
        Some(server)
    } else {
        None
    };
    let options = EngineOptions {
        checkpoints: Arc::new(FileCheckpoints::new(args.state_dir.join("checkpoints"))),
        state_dir: args.state_dir.clone(),
        namespace_budget: args.max_pods.map(crate::engine::budget::Budget::new),
        webhooks,
        drain_timeout: args.drain_timeout,
        tenancy: Arc::new(Tenancy::SingleTenant),
    };
    let count = pipelines.len();
    let mut engine = Engine::start(client, pipelines, options).await?;
    drop(starting);
    let address = http::serve(args.metrics_listen, engine.synced.clone(), stop.clone()).await?;
    tracing::info!(pipelines = count, metrics = %address, "running");
    eprintln!("spate: running {count} pipeline(s); metrics on http://{address}/metrics");
    let signals = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    let stopped = engine.wait(stop.clone()).await;
    stop.cancel();
    engine.shutdown().await;
    if stopped {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("spate: every pipeline's source has stopped; the log above says why");
        Ok(ExitCode::FAILURE)
    }
}

async fn run_controller(args: RunArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let pod_security = args.pod_security.policy()?;
    let mut grants = Grants {
        trusted: args.trust_namespace.iter().cloned().collect(),
        ..Grants::default()
    };
    for flag in &args.grant_env {
        grants
            .add_env_grant(flag)
            .map_err(|error| anyhow::anyhow!("--grant-env {error}"))?;
    }
    let client = cluster.client().await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| cluster.namespace.clone())
        .unwrap_or_else(|| "default".to_string());
    let stop = CancellationToken::new();
    // Pipelines come and go, so the webhook server always runs in controller mode.
    let webhooks = WebhookServer::bind(args.webhook_listen).await?;
    let serving = webhooks.clone();
    let until = stop.clone();
    tokio::spawn(async move {
        if let Err(error) = serving.serve(until).await {
            tracing::error!(%error, "webhook server stopped");
        }
    });
    let options = ControllerOptions {
        namespace: cluster.namespace.clone(),
        engine: EngineOptions {
            // In a cluster the pod's disk does not outlive it; ConfigMaps do.
            checkpoints: Arc::new(ConfigMapCheckpoints::new(client.clone(), &lease_namespace)),
            state_dir: args.state_dir.clone(),
            namespace_budget: args.max_pods.map(crate::engine::budget::Budget::new),
            webhooks: Some(webhooks),
            drain_timeout: args.drain_timeout,
            tenancy: Arc::new(Tenancy::Granted(grants)),
        },
        lease: LeaseConfig {
            namespace: lease_namespace.clone(),
            name: "spate-controller".to_string(),
            identity,
            duration: args.lease_duration,
            renew: args.lease_duration / 3,
        },
        status_interval: Duration::from_secs(2),
        pod_security,
    };
    // A replica that is not the leader is live and ready: it is doing its job by waiting.
    let (ready, _) = tokio::sync::watch::channel(true);
    let address = http::serve(args.metrics_listen, vec![ready.subscribe()], stop.clone()).await?;
    eprintln!("spate: controller running; metrics on http://{address}/metrics");
    let signals = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    controller::run(client, options, stop).await;
    Ok(ExitCode::SUCCESS)
}

fn parse_lease_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|error| error.to_string())?;
    if duration < Duration::from_secs(3) {
        return Err("must be at least 3s: the leader renews the Lease every third of it".into());
    }
    // The Lease stores whole seconds: with a fraction more, this leader would go on leading
    // after the others may take over.
    if duration.subsec_nanos() != 0 {
        return Err("must be whole seconds: a Lease holds its duration in seconds".into());
    }
    Ok(duration)
}

/// Whether a source receives HTTP requests on the webhook server.
fn takes_webhooks(source: &SourceConfig) -> bool {
    match source {
        SourceConfig::Webhook(_) => true,
        SourceConfig::ObjectStore(store) => {
            matches!(store.notifications, Some(NotificationTransport::Webhook(_)))
        }
        _ => false,
    }
}

async fn wait_for_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_lasts_whole_seconds_from_three() {
        assert_eq!(parse_lease_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_lease_duration("3s"), Ok(Duration::from_secs(3)));
        assert!(
            parse_lease_duration("2s")
                .unwrap_err()
                .contains("at least 3s")
        );
        assert!(
            parse_lease_duration("4500ms")
                .unwrap_err()
                .contains("whole seconds")
        );
        assert!(parse_lease_duration("soon").is_err());
    }
}
