//! `spate watch PIPELINE`: a live view of a pipeline's burst, from the Kubernetes API alone.
//!
//! Everything shown comes from the cluster, never from the engine's memory, so the same view
//! works against `spate dev`'s simulator, a `spate run -f` on a laptop and the in-cluster
//! controller: watchers on the pipeline's Jobs and pods (`spate.dev/pipeline=<name>`, which
//! `render` puts on both the Job and its pod template), a watcher on Nodes (to tell virtual
//! from regular placement), and the Pipeline resource's status, polled, when there is one.
//!
//! [`model`] holds the pure state and counting; `lines` prints one line (or JSON object) per
//! change; `tui` is the ratatui terminal UI. [`watch`] is the async entry `spate dev` calls
//! in-process.

mod lines;
pub mod model;
mod tui;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ClusterArgs;
use crate::engine::controller::PAUSED_ANNOTATION;
use crate::pipeline::Pipeline;
use crate::render::PIPELINE_LABEL;
use model::{Model, PipelineInfo, PipelineView};

/// How often the Pipeline resource's status is read.
const PIPELINE_POLL: Duration = Duration::from_secs(1);

/// Watch a pipeline's burst live: events, Jobs, pods, placement, failures and logs.
///
/// Shows, from the Kubernetes API only (so it works against any cluster): the Pipeline
/// resource's status when there is one (events received, queued, dead-lettered, ready or
/// paused); the pipeline's Jobs (active, succeeded, failed) and pods (pending, running,
/// succeeded, failed); where the pods run (per node, virtual-kubelet or regular); a chart of
/// pods pending or running over time; the event and Job creation rates; and recent failures
/// with their reasons.
///
/// On a terminal it is a full-screen UI: ↑/↓ or j/k select a Job, Enter shows its pods and
/// follows the selected pod's logs, Esc goes back, q or Ctrl-C quits. Without a terminal (or
/// with `--output plain`) it prints one line per change, at most one per `--interval`;
/// `--output json` prints the same as one JSON object per line. Pipelines run from files
/// (`spate run -f`) have no Pipeline resource: the view then shows Jobs and pods only.
///
/// Docs: docs/watch.md (every panel and field).
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples:\n  spate watch thumbnails                          # the terminal UI\n  spate watch thumbnails -n media --context prod\n  spate watch thumbnails -o plain                 # a line per change\n  spate watch thumbnails -o json | jq -c '{pods_running, jobs_succeeded}'\n  timeout 10m spate watch thumbnails -o plain --until-idle   # CI: wait for the burst to end\n  spate watch thumbnails --kubeconfig /tmp/spate-dev/kubeconfig   # spate dev's cluster\n\nKeys: ↑/↓ or j/k select a Job · Enter its pods and logs · Esc back · q or Ctrl-C quit\n\nA plain line (wrapped here):\n  12:00:01 received=200 queued=40 lag=120 dead-lettered=0 state=ready\n    | jobs active=50 succeeded=110 failed=0 | pods pending=3 running=47 succeeded=110 failed=0\n    | virtual=50 regular=0 unscheduled=0 | jobs/s=4.0 events/s=4.0\n\nExit status: 0; with --until-idle, 130 when interrupted before the pipeline went idle."
)]
pub struct WatchArgs {
    /// The pipeline's name: its Pipeline resource, and the `spate.dev/pipeline` label on its
    /// Jobs and pods.
    #[arg(value_name = "PIPELINE")]
    pub pipeline: String,
    /// `tui`: the full-screen view. `plain`: a line per change. `json`: a JSON object per
    /// change. `auto`: `tui` when stdout is a terminal, else `plain`.
    #[arg(short, long, value_enum, default_value_t = WatchOutput::Auto, value_name = "FORMAT")]
    pub output: WatchOutput,
    /// At most one line per interval (plain and json), and only when something changed.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Exit 0 once the burst is over: at least one Job was seen, no Job is active, no pod is
    /// pending or running and the Pipeline (if any) has no queued events and no source lag,
    /// for `--idle-for`.
    #[arg(long)]
    pub until_idle: bool,
    /// How long the pipeline must stay idle for `--until-idle`.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub idle_for: Duration,
}

/// How the view is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum WatchOutput {
    /// `tui` on a terminal, else `plain`.
    #[default]
    Auto,
    /// The full-screen terminal UI.
    Tui,
    /// One line per change.
    Plain,
    /// One JSON object per change.
    Json,
}

impl WatchOutput {
    /// `Auto` decided by whether stdout is a terminal.
    pub fn resolve(self) -> WatchOutput {
        match self {
            WatchOutput::Auto if std::io::stdout().is_terminal() => WatchOutput::Tui,
            WatchOutput::Auto => WatchOutput::Plain,
            other => other,
        }
    }
}

/// What [`watch`] does besides watching.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub output: WatchOutput,
    /// Plain and json: at most one line per interval.
    pub interval: Duration,
    /// Return once the pipeline is idle (see [`WatchArgs::until_idle`]).
    pub until_idle: bool,
    pub idle_for: Duration,
    /// A line for the terminal UI's footer, e.g. where `spate dev` wants files dropped.
    pub hint: Option<String>,
}

impl WatchOptions {
    /// The defaults, shown as `output` says (`None`: the terminal UI on a terminal, else
    /// plain lines).
    pub fn for_output(output: Option<WatchOutput>) -> WatchOptions {
        WatchOptions {
            output: output.unwrap_or_default(),
            ..WatchOptions::default()
        }
    }
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            output: WatchOutput::Auto,
            interval: Duration::from_millis(500),
            until_idle: false,
            idle_for: Duration::from_secs(3),
            hint: None,
        }
    }
}

/// Why [`watch`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// `until_idle` was set and the pipeline went idle.
    Idle,
    /// The user quit the terminal UI (q, Ctrl-C), or stdout was closed.
    Quit,
    /// The shutdown token was cancelled.
    Cancelled,
}

pub fn run(args: WatchArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = cluster.client().await?;
        let namespace = cluster
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            signals.cancel();
        });
        let options = WatchOptions {
            output: args.output,
            interval: args.interval,
            until_idle: args.until_idle,
            idle_for: args.idle_for,
            hint: None,
        };
        let end = watch(client, &namespace, &args.pipeline, options, shutdown).await?;
        Ok(match end {
            WatchEnd::Idle | WatchEnd::Quit => ExitCode::SUCCESS,
            // Interrupted before the burst was over: a script waiting for idle must not
            // take it for success.
            WatchEnd::Cancelled if args.until_idle => ExitCode::from(130),
            WatchEnd::Cancelled => ExitCode::SUCCESS,
        })
    })
}

/// Watches `pipeline` in `namespace` and shows it as `options.output` says, until
/// `shutdown` is cancelled, the user quits the terminal UI, or (with `until_idle`) the
/// pipeline is idle. The terminal is restored before it returns (and on panic).
///
/// In the terminal UI, Ctrl-C arrives as a key (the terminal is in raw mode), not as a signal:
/// it ends the view with [`WatchEnd::Quit`].
pub async fn watch(
    client: kube::Client,
    namespace: &str,
    pipeline: &str,
    options: WatchOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<WatchEnd> {
    let model = Arc::new(Mutex::new(Model::new(namespace, pipeline, Instant::now())));
    let stop = shutdown.child_token();
    let selector = format!(
        "{PIPELINE_LABEL}={}",
        crate::naming::sanitize_label_value(pipeline)
    );
    let mut tasks = JoinSet::new();
    tasks.spawn(follow::<Job>(
        Api::namespaced(client.clone(), namespace),
        watcher::Config::default().labels(&selector),
        model.clone(),
        stop.clone(),
    ));
    tasks.spawn(follow::<Pod>(
        Api::namespaced(client.clone(), namespace),
        watcher::Config::default().labels(&selector),
        model.clone(),
        stop.clone(),
    ));
    tasks.spawn(follow::<Node>(
        Api::all(client.clone()),
        watcher::Config::default(),
        model.clone(),
        stop.clone(),
    ));
    tasks.spawn(poll_pipeline(
        client.clone(),
        namespace.to_string(),
        pipeline.to_string(),
        model.clone(),
        stop.clone(),
    ));
    let result = match options.output.resolve() {
        WatchOutput::Tui => tui::run(client, namespace, &model, &options, &stop).await,
        WatchOutput::Json => lines::run(&model, &options, lines::Format::Json, &stop).await,
        _ => lines::run(&model, &options, lines::Format::Plain, &stop).await,
    };
    stop.cancel();
    tasks.shutdown().await;
    result
}

/// How each watched kind goes into the model.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug {
    const WHAT: &'static str;
    fn apply(model: &mut Model, object: &Self, now: Instant);
    fn delete(model: &mut Model, name: &str);
    fn relist(model: &mut Model, objects: &[Self], now: Instant);
}

impl Watched for Job {
    const WHAT: &'static str = "Jobs";
    fn apply(model: &mut Model, object: &Self, now: Instant) {
        model.apply_job(object, now);
    }
    fn delete(model: &mut Model, name: &str) {
        model.delete_job(name);
    }
    fn relist(model: &mut Model, objects: &[Self], now: Instant) {
        model.relist_jobs(objects, now);
    }
}

impl Watched for Pod {
    const WHAT: &'static str = "pods";
    fn apply(model: &mut Model, object: &Self, _now: Instant) {
        model.apply_pod(object);
    }
    fn delete(model: &mut Model, name: &str) {
        model.delete_pod(name);
    }
    fn relist(model: &mut Model, objects: &[Self], _now: Instant) {
        model.relist_pods(objects);
    }
}

impl Watched for Node {
    const WHAT: &'static str = "Nodes (placement falls back to each pod's node selector)";
    fn apply(model: &mut Model, object: &Self, _now: Instant) {
        model.apply_node(object);
    }
    fn delete(model: &mut Model, name: &str) {
        model.delete_node(name);
    }
    fn relist(model: &mut Model, objects: &[Self], _now: Instant) {
        model.relist_nodes(objects);
    }
}

/// Feeds one watcher into the model until `stop`. A (re-)list is applied whole when it is
/// complete, so objects deleted while the watch was away are noticed.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    model: Arc<Mutex<Model>>,
    stop: CancellationToken,
) where
    K: Watched + Send + Sync + 'static,
{
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut listing: Vec<K> = Vec::new();
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let now = Instant::now();
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(object)) => listing.push(object),
            Ok(watcher::Event::InitDone) => {
                K::relist(&mut model.lock(), &std::mem::take(&mut listing), now);
            }
            Ok(watcher::Event::Apply(object)) => K::apply(&mut model.lock(), &object, now),
            Ok(watcher::Event::Delete(object)) => K::delete(&mut model.lock(), &object.name_any()),
            Err(error) => model
                .lock()
                .note(format!("cannot watch {}: {error}", K::WHAT)),
        }
    }
}

/// Reads the Pipeline resource every [`PIPELINE_POLL`]. Read as untyped JSON, so a Pipeline
/// written by a newer Spate (fields this binary does not know) still shows its status.
async fn poll_pipeline(
    client: kube::Client,
    namespace: String,
    name: String,
    model: Arc<Mutex<Model>>,
    stop: CancellationToken,
) {
    let resource = ApiResource::erase::<Pipeline>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &resource);
    loop {
        let view = match api.get_opt(&name).await {
            Ok(Some(object)) => {
                let paused = object
                    .annotations()
                    .get(PAUSED_ANNOTATION)
                    .is_some_and(|v| v == "true");
                Some(PipelineView::Found(PipelineInfo::from_parts(
                    object.data.get("status"),
                    paused,
                )))
            }
            Ok(None) => Some(PipelineView::Missing),
            Err(error) => {
                let mut model = model.lock();
                model.note(format!("cannot read Pipeline {name}: {error}"));
                // Without an answer yet, show Jobs and pods; after one, keep the last status.
                (model.pipeline == PipelineView::Unknown).then_some(PipelineView::Missing)
            }
        };
        if let Some(view) = view {
            model.lock().set_pipeline(view, Instant::now());
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PIPELINE_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        watch: WatchArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from(["watch", "thumbnails"]).unwrap();
        assert_eq!(cli.watch.pipeline, "thumbnails");
        assert_eq!(cli.watch.output, WatchOutput::Auto);
        assert_eq!(cli.watch.interval, Duration::from_millis(500));
        assert_eq!(cli.watch.idle_for, Duration::from_secs(3));
        assert!(!cli.watch.until_idle);
        let cli = Cli::try_parse_from([
            "watch",
            "p",
            "-o",
            "json",
            "--interval",
            "2s",
            "--until-idle",
            "--idle-for",
            "10s",
        ])
        .unwrap();
        assert_eq!(cli.watch.output, WatchOutput::Json);
        assert_eq!(cli.watch.interval, Duration::from_secs(2));
        assert!(cli.watch.until_idle);
        assert_eq!(cli.watch.idle_for, Duration::from_secs(10));
        assert!(Cli::try_parse_from(["watch"]).is_err());
        assert!(Cli::try_parse_from(["watch", "p", "-o", "yaml"]).is_err());
    }
}
