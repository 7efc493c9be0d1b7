//! `spate logs`: the logs of a pipeline's pods, each line prefixed with its Job and pod, like
//! `kubectl logs -l ... --prefix`.

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::ClusterArgs;
use super::get::{owning_job, selector};
use super::table::{Cluster, runtime};
use crate::pipeline::Pipeline;

/// Tries to open a started container's log stream, and the pause between tries.
const LOG_OPEN_ATTEMPTS: u32 = 20;
const LOG_OPEN_PAUSE: Duration = Duration::from_millis(250);

/// Print the logs of a pipeline's pods, each line prefixed `[job/pod]`.
///
/// Every pod of every Job the pipeline created (or of one Job with --job), oldest first, as
/// `kubectl logs -l spate.dev/pipeline=NAME --prefix` would; `[job/pod/container]` for pods
/// with several containers.
///
/// With -f, keeps streaming, and picks up the pods of new Jobs as they start, until Ctrl-C;
/// which pods it follows is said on stderr. Pods of finished Jobs stay for the pipeline's
/// `ttlSecondsAfterFinished` (60s by default), so older logs may be gone.
///
/// Exit codes: 0 logs printed (also none, when the pipeline has no pods now); 1 pipeline not
/// found (neither a Pipeline nor Jobs of that name in the namespace), a log could not be read,
/// or the cluster is unreachable.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate logs thumbnails\n  \
    spate logs thumbnails -f                 (and new pods as they start; Ctrl-C to stop)\n  \
    spate logs thumbnails --job thumbnails-3xk2d9q4mabc7zpe\n  \
    spate logs thumbnails --tail 20 --since 10m\n  \
    spate logs render-frames -n media -c work --timestamps")]
pub struct LogsArgs {
    /// The pipeline's name.
    pub pipeline: String,
    /// Only the pods of this Job.
    #[arg(long, value_name = "NAME")]
    pub job: Option<String>,
    /// Keep streaming, and follow new pods as they start.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of each container.
    #[arg(long, value_name = "N")]
    pub tail: Option<i64>,
    /// Only lines newer than this, e.g. 30s, 5m, 1h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only this container of each pod (default: all).
    #[arg(short = 'c', long, value_name = "NAME")]
    pub container: Option<String>,
    /// Start each line with its RFC 3339 time.
    #[arg(long)]
    pub timestamps: bool,
}

pub fn run(args: LogsArgs, flags: &ClusterArgs) -> anyhow::Result<ExitCode> {
    if args.tail.is_some_and(|n| n < 0) {
        bail!("--tail must be 0 or more lines");
    }
    runtime()?.block_on(async {
        let cluster = Cluster::connect(flags).await?;
        if args.follow {
            follow(&cluster, &args).await
        } else {
            once(&cluster, &args).await
        }
    })
}

impl LogsArgs {
    fn params(&self, follow: bool) -> LogParams {
        LogParams {
            follow,
            tail_lines: self.tail,
            since_seconds: self.since.map(|d| d.as_secs().max(1) as i64),
            timestamps: self.timestamps,
            ..LogParams::default()
        }
    }

    fn wants(&self, pod: &Pod) -> bool {
        match &self.job {
            Some(job) => owning_job(pod).as_deref() == Some(job.as_str()),
            None => true,
        }
    }

    /// The containers to read, with the prefix their lines get.
    fn containers(&self, pod: &Pod) -> Vec<(String, String)> {
        let names: Vec<String> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        let job = owning_job(pod).unwrap_or_else(|| "-".to_string());
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let several = names.len() > 1 && self.container.is_none();
        names
            .into_iter()
            .filter(|name| self.container.as_ref().is_none_or(|wanted| wanted == name))
            .map(|name| {
                let prefix = if several {
                    format!("[{job}/{pod_name}/{name}]")
                } else {
                    format!("[{job}/{pod_name}]")
                };
                (name, prefix)
            })
            .collect()
    }
}

/// Whether a container has started, so that it has a log to read.
fn started(pod: &Pod, container: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.iter().find(|c| c.name == container))
        .and_then(|c| c.state.as_ref())
        .is_some_and(|state| state.running.is_some() || state.terminated.is_some())
}

async fn pods(cluster: &Cluster, args: &LogsArgs) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut pods: Vec<Pod> = api
        .list(&ListParams::default().labels(&selector(Some(&args.pipeline))))
        .await
        .map_err(|e| cluster.error(e))?
        .items
        .into_iter()
        .filter(|pod| args.wants(pod))
        .collect();
    pods.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
    });
    Ok(pods)
}

/// Whether the pipeline exists: as a Pipeline resource, or through Jobs it created (a
/// pipeline run from a file with `spate run -f` is only known by its Jobs).
async fn pipeline_known(cluster: &Cluster, args: &LogsArgs) -> anyhow::Result<bool> {
    let pipelines: Api<Pipeline> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match pipelines.get_opt(&args.pipeline).await {
        Ok(Some(_)) => return Ok(true),
        Ok(None) => {}
        // No CRD: pipelines can still run from files.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return Err(cluster.error(error)),
    }
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let found = jobs
        .list_metadata(
            &ListParams::default()
                .labels(&selector(Some(&args.pipeline)))
                .limit(1),
        )
        .await
        .map_err(|e| cluster.error(e))?;
    Ok(!found.items.is_empty())
}

fn not_found(cluster: &Cluster, args: &LogsArgs) -> anyhow::Error {
    anyhow::anyhow!(
        "pipeline \"{}\" not found in namespace \"{}\": no Pipeline of that name and no Jobs \
         labelled {}",
        args.pipeline,
        cluster.namespace,
        selector(Some(&args.pipeline))
    )
}

async fn once(cluster: &Cluster, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let pods = pods(cluster, args).await?;
    if pods.is_empty() {
        if !pipeline_known(cluster, args).await? {
            return Err(not_found(cluster, args));
        }
        match &args.job {
            Some(job) => eprintln!(
                "No pods of Job {job} in namespace {} (finished Jobs are removed after the \
                 pipeline's ttlSecondsAfterFinished)",
                cluster.namespace
            ),
            None => eprintln!(
                "No pods of pipeline {} in namespace {} now",
                args.pipeline, cluster.namespace
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let params = args.params(false);
    let mut code = ExitCode::SUCCESS;
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let containers = args.containers(pod);
        if containers.is_empty()
            && let Some(wanted) = &args.container
        {
            eprintln!("spate: pod {name} has no container {wanted}");
            code = ExitCode::FAILURE;
        }
        for (container, prefix) in containers {
            if !started(pod, &container) {
                eprintln!("spate: {prefix} has not started yet: no logs");
                continue;
            }
            let params = LogParams {
                container: Some(container.clone()),
                ..params.clone()
            };
            match read_log(&api, &name, &params).await {
                Ok(text) => {
                    let mut out = std::io::stdout().lock();
                    for line in text.lines() {
                        writeln!(out, "{prefix} {line}")?;
                    }
                }
                Err(error) => {
                    eprintln!(
                        "spate: {prefix}: cannot read the log: {}",
                        cluster.error(error)
                    );
                    code = ExitCode::FAILURE;
                }
            }
        }
    }
    Ok(code)
}

/// A container's log; one reported started may not have written it yet, so try a while.
async fn read_log(api: &Api<Pod>, pod: &str, params: &LogParams) -> kube::Result<String> {
    let mut attempt = 0;
    loop {
        match api.logs(pod, params).await {
            Err(kube::Error::Api(status))
                if attempt < LOG_OPEN_ATTEMPTS && matches!(status.code, 400 | 404) =>
            {
                attempt += 1;
                tokio::time::sleep(LOG_OPEN_PAUSE).await;
            }
            other => return other,
        }
    }
}

async fn follow(cluster: &Cluster, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let known = pipeline_known(cluster, args).await?;
    let existing = pods(cluster, args).await?;
    if !known && existing.is_empty() {
        eprintln!(
            "spate: warning: {}; waiting for pods labelled {} anyway",
            not_found(cluster, args),
            selector(Some(&args.pipeline))
        );
    } else if existing.is_empty() {
        eprintln!(
            "spate: no pods of pipeline {} yet; waiting for them (Ctrl-C to stop)",
            args.pipeline
        );
    }
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let (lines_tx, mut lines) = mpsc::channel::<String>(1024);
    let mut following = HashSet::new();
    let config = watcher::Config::default().labels(&selector(Some(&args.pipeline)));
    let changes = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects();
    let mut changes = std::pin::pin!(changes);
    let interrupt = tokio::signal::ctrl_c();
    let mut interrupt = std::pin::pin!(interrupt);
    loop {
        tokio::select! {
            _ = &mut interrupt => break,
            line = lines.recv() => {
                if let Some(line) = line {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
            }
            change = changes.next() => match change {
                Some(Ok(pod)) if args.wants(&pod) => {
                    start_streams(&api, args, &pod, &mut following, &lines_tx);
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    eprintln!("spate: watching pods failed, retrying: {error}");
                }
                None => break,
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts streaming each started container of `pod` not followed yet.
fn start_streams(
    api: &Api<Pod>,
    args: &LogsArgs,
    pod: &Pod,
    following: &mut HashSet<(String, String)>,
    lines: &mpsc::Sender<String>,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    for (container, prefix) in args.containers(pod) {
        if !started(pod, &container) || !following.insert((uid.clone(), container.clone())) {
            continue;
        }
        eprintln!("spate: following {prefix}");
        let params = LogParams {
            container: Some(container),
            ..args.params(true)
        };
        let (api, name, lines) = (api.clone(), name.clone(), lines.clone());
        tokio::spawn(async move {
            // A container reported started may not have written its log yet: try a while.
            let mut attempt = 0;
            let stream = loop {
                match api.log_stream(&name, &params).await {
                    Ok(stream) => break stream,
                    Err(kube::Error::Api(status))
                        if attempt < LOG_OPEN_ATTEMPTS && matches!(status.code, 400 | 404) =>
                    {
                        attempt += 1;
                        tokio::time::sleep(LOG_OPEN_PAUSE).await;
                    }
                    Err(error) => {
                        eprintln!("spate: {prefix}: cannot read the log: {error}");
                        return;
                    }
                }
            };
            let mut stream = std::pin::pin!(stream.lines());
            loop {
                match stream.try_next().await {
                    Ok(Some(line)) => {
                        if lines.send(format!("{prefix} {line}")).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        eprintln!("spate: {prefix}: log stream ended: {error}");
                        return;
                    }
                }
            }
        });
    }
}
