//! `spate dev`: a burst on your machine, with nothing to install or configure.
//!
//! It is `spate run` in controller mode against a simulated cluster: the Pipeline CRD is
//! installed, examples/thumbnails is applied as a Pipeline resource, and the same controller
//! a real cluster runs picks it up. Nothing here is special to the simulator except starting
//! it; the live view is `spate watch`, reading the cluster like any other client.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use spate_sim::{SimCluster, SimConfig};
use spate_sources::checkpoint::FileCheckpoints;
use tokio_util::sync::CancellationToken;

use super::watch::{self, WatchOptions, WatchOutput};
use crate::engine::EngineOptions;
use crate::engine::controller::{self, ControllerOptions};
use crate::engine::leader::LeaseConfig;
use crate::engine::tenancy::Tenancy;
use crate::pipeline::{Pipeline, load_str};

/// The pipeline `spate dev` runs: examples/thumbnails, pointed at the dev folders.
const THUMBNAILS: &str = include_str!("../../../examples/thumbnails/pipeline.yaml");
const EXAMPLE_INBOX: &str = "file:///tmp/spate-dev/inbox";
const EXAMPLE_OUTPUT: &str = "/tmp/spate-dev/thumbnails";
/// The example worker the thumbnails pipeline runs in each pod.
const WORKER: &str = "spate-thumbnailer";
const NAMESPACE: &str = "default";

/// Run a simulated cluster, a local bucket and the engine, and watch the burst.
///
/// Starts the Kubernetes simulator with a virtual-kubelet node, installs the Pipeline CRD,
/// applies examples/thumbnails with DIR/inbox as its bucket, and runs the Spate controller
/// against it. Each image dropped into the inbox becomes a Job whose pod runs the example
/// worker (spate-thumbnailer) on the virtual node and writes a thumbnail to DIR/thumbnails.
/// `spate watch` shows the pods bursting up to maxParallelism and falling back to zero.
///
/// The worker is looked up on PATH, then next to the spate binary. Without it, pods are
/// simulated: they run for --pod-run-time and make no thumbnails.
///
/// `kubectl --kubeconfig DIR/kubeconfig` talks to the same cluster. Stop with q or Ctrl-C.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  scripts/dev                       (builds spate and the worker, then runs this)\n  spate dev --dir /tmp/my-burst\n  spate dev --output plain          (a line per change instead of the terminal UI)\n\n  # in another terminal:\n  for i in $(seq 200); do cp photo.jpg /tmp/spate-dev/inbox/photo-$i.jpg; done\n  ls /tmp/spate-dev/thumbnails\n  kubectl --kubeconfig /tmp/spate-dev/kubeconfig get jobs,pods"
)]
pub struct DevArgs {
    /// Where the inbox, the thumbnails, the kubeconfig and the state live.
    #[arg(long, value_name = "DIR", default_value = "/tmp/spate-dev")]
    pub dir: PathBuf,
    /// The example worker (default: spate-thumbnailer on PATH, then next to spate).
    #[arg(long, value_name = "FILE")]
    pub worker: Option<PathBuf>,
    /// How long each simulated pod runs, when the worker is not installed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub pod_run_time: Duration,
    /// How the burst is shown: the terminal UI, or a line per change (the default when
    /// stdout is not a terminal).
    #[arg(short, long, value_enum)]
    pub output: Option<WatchOutput>,
}

pub fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DevArgs) -> anyhow::Result<ExitCode> {
    let inbox = make_dir(&args.dir.join("inbox"))?;
    let thumbnails = make_dir(&args.dir.join("thumbnails"))?;
    let worker = match &args.worker {
        Some(path) if path.is_file() => Some(path.canonicalize()?),
        Some(path) => anyhow::bail!("--worker {}: no such file", path.display()),
        None => find_worker(),
    };

    let mut config = SimConfig::default();
    config.node.run_time = args.pod_run_time;
    if let Some(worker) = &worker {
        config.exec = true;
        config.node.exec_path = Some(exec_path(worker)?);
    }
    let cluster = SimCluster::start(config).await?;
    let kubeconfig = args.dir.join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig)?;
    let client = cluster.client();

    install_crd(&client).await?;
    let pipeline = thumbnails_pipeline(&inbox, &thumbnails)?;
    let name = pipeline.name_any();
    Api::<Pipeline>::namespaced(client.clone(), NAMESPACE)
        .patch(
            &name,
            &PatchParams::apply("spate").force(),
            &Patch::Apply(&pipeline),
        )
        .await
        .context("applying the thumbnails Pipeline")?;

    let stop = CancellationToken::new();
    let state = args.dir.join("state");
    let options = ControllerOptions {
        namespace: Some(NAMESPACE.to_string()),
        engine: EngineOptions {
            // Kept in DIR, not in the cluster: the simulator starts empty each time, and files
            // already in the inbox should not all run again.
            checkpoints: Arc::new(FileCheckpoints::new(state.join("checkpoints"))),
            state_dir: state,
            namespace_budget: None,
            webhooks: None,
            drain_timeout: Duration::from_secs(10),
            // The simulator on this machine, run by the person who wrote the pipelines.
            tenancy: Arc::new(Tenancy::SingleTenant),
        },
        lease: LeaseConfig {
            namespace: NAMESPACE.to_string(),
            name: "spate-controller".to_string(),
            identity: format!("spate-dev-{}", std::process::id()),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        },
        status_interval: Duration::from_millis(500),
        pod_security: crate::pod_security::Policy::default(),
    };
    let controller = tokio::spawn(controller::run(client.clone(), options, stop.clone()));

    println!("spate dev: a simulated cluster with a virtual-kubelet node is running.");
    println!("  drop files into {}", inbox.display());
    match &worker {
        Some(worker) => println!(
            "  thumbnails appear in {} (made by {})",
            thumbnails.display(),
            worker.display()
        ),
        None => println!(
            "  {WORKER} not found: pods are simulated and make no thumbnails \
             (build it: cargo build -p spate-thumbnailer, or run scripts/dev)"
        ),
    }
    println!(
        "  kubectl --kubeconfig {} get pipelines,jobs,pods",
        kubeconfig.display()
    );
    println!("  logs in {}", args.dir.join("spate.log").display());
    println!("  q or Ctrl-C to stop");

    let signals = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        signals.cancel();
    });
    let watched = watch::watch(
        client,
        NAMESPACE,
        &name,
        WatchOptions {
            hint: Some(format!("· drop images into {}", inbox.display())),
            ..WatchOptions::for_output(args.output)
        },
        stop.clone(),
    )
    .await;
    stop.cancel();
    let _ = controller.await;
    cluster.shutdown().await;
    watched?;
    Ok(ExitCode::SUCCESS)
}

fn make_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// The worker on PATH, else beside this executable (where cargo builds both).
fn find_worker() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let beside_spate = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    on_path
        .into_iter()
        .chain(beside_spate)
        .map(|dir| dir.join(WORKER))
        .find(|candidate| candidate.is_file())
}

/// The node's PATH: the worker's folder first, then the usual one.
fn exec_path(worker: &Path) -> anyhow::Result<OsString> {
    let folder = worker
        .parent()
        .context("the worker has no parent folder")?
        .to_path_buf();
    let rest = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let dirs = std::iter::once(folder).chain(std::env::split_paths(&rest));
    Ok(std::env::join_paths(dirs)?)
}

async fn install_crd(client: &kube::Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crate::pipeline::crd::definition();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("spate").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("installing the Pipeline CRD")?;
    // Served once discovery knows it.
    let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), NAMESPACE);
    for _ in 0..100 {
        if pipelines
            .list(&ListParams::default().limit(1))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the Pipeline CRD was installed but is not served")
}

/// examples/thumbnails with its bucket and output pointed at the dev folders.
fn thumbnails_pipeline(inbox: &Path, thumbnails: &Path) -> anyhow::Result<Pipeline> {
    let yaml = THUMBNAILS
        .replace(EXAMPLE_INBOX, &format!("file://{}", inbox.display()))
        .replace(EXAMPLE_OUTPUT, &thumbnails.display().to_string());
    let mut loaded =
        load_str(&yaml, "examples/thumbnails/pipeline.yaml").map_err(|diagnostics| {
            anyhow::anyhow!(
                "{}",
                diagnostics
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?;
    let mut pipeline = loaded
        .pop()
        .context("examples/thumbnails holds no pipeline")?
        .pipeline;
    pipeline.metadata.namespace = Some(NAMESPACE.to_string());
    Ok(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_pointed_at_the_dev_folders() {
        let pipeline =
            thumbnails_pipeline(Path::new("/d/inbox"), Path::new("/d/thumbnails")).unwrap();
        let spec = serde_json::to_string(&pipeline.spec).unwrap();
        assert!(spec.contains("file:///d/inbox"), "{spec}");
        assert!(spec.contains("/d/thumbnails"), "{spec}");
        assert!(!spec.contains("/tmp/spate-dev"), "{spec}");
    }

    #[test]
    fn the_workers_folder_comes_first_on_the_node_path() {
        let path = exec_path(Path::new("/opt/worker/bin/spate-thumbnailer")).unwrap();
        let first = std::env::split_paths(&path).next();
        assert_eq!(first, Some(PathBuf::from("/opt/worker/bin")));
    }
}
