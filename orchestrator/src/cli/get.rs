//! `spate get`: list Pipelines and the Jobs Spate created, as `kubectl get` does.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::table::{Cluster, Table, age, cut, print_objects, runtime};
use super::{ClusterArgs, OutputFormat};
use crate::engine::controller::PAUSED_ANNOTATION;
use crate::naming::sanitize_label_value;
use crate::pipeline::Pipeline;
use crate::render::{EVENT_IDS_ANNOTATION, PIPELINE_LABEL};

/// List Pipelines, or the Jobs Spate created for them.
///
/// Without -o, a table like `kubectl get`'s; `-o wide` adds columns; `-o yaml|json` prints the
/// objects (one object when a NAME is given, else a `List`).
///
/// Pipelines: NAME, SOURCE, MODE, RUNNING, SUCCEEDED, FAILED, AGE; wide adds RECEIVED, QUEUED,
/// LAG (messages the source still holds), DEAD-LETTERED, PAUSED, READY and LAST ERROR. Jobs
/// (those labelled `spate.dev/pipeline`): NAME, PIPELINE, COMPLETIONS, STATUS, AGE; wide adds
/// EVENTS (the ids of the events each Job serves) and NODES (where its pods run).
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate get pipelines\n  \
    spate get pl thumbnails -o yaml\n  \
    spate get pipelines -A -o wide\n  \
    spate get jobs -p thumbnails\n  \
    spate get jobs -o wide -n media\n  \
    spate get jobs -o json | jq '.items[].metadata.name'")]
pub struct GetArgs {
    /// What to list: `pipelines` (also `pipeline`, `pl`) or `jobs` (also `job`).
    #[arg(value_enum)]
    pub resource: Resource,
    /// Only this one.
    pub name: Option<String>,
    /// Jobs: only those of this pipeline.
    #[arg(short = 'p', long, value_name = "PIPELINE")]
    pub pipeline: Option<String>,
    /// List across all namespaces (adds a NAMESPACE column).
    #[arg(short = 'A', long, conflicts_with = "name")]
    pub all_namespaces: bool,
    /// Output format: a table by default; `wide`, `yaml` or `json`.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(aliases = ["pipeline", "pl"])]
    Pipelines,
    #[value(aliases = ["job"])]
    Jobs,
}

pub fn run(args: GetArgs, flags: &ClusterArgs) -> anyhow::Result<ExitCode> {
    if args.pipeline.is_some() && args.resource == Resource::Pipelines {
        bail!("-p/--pipeline filters Jobs: spate get jobs -p PIPELINE");
    }
    runtime()?.block_on(async {
        let cluster = Cluster::connect(flags).await?;
        match args.resource {
            Resource::Pipelines => pipelines(&cluster, &args).await,
            Resource::Jobs => jobs(&cluster, &args).await,
        }
    })
}

fn scope(cluster: &Cluster, args: &GetArgs) -> Option<String> {
    (!args.all_namespaces).then(|| cluster.namespace.clone())
}

fn nothing_found(namespace: Option<&str>) {
    match namespace {
        Some(namespace) => eprintln!("No resources found in {namespace} namespace."),
        None => eprintln!("No resources found"),
    }
}

async fn pipelines(cluster: &Cluster, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let namespace = scope(cluster, args);
    let mut items = match (&args.name, &namespace) {
        (Some(name), Some(namespace)) => vec![cluster.pipeline(namespace, name).await?],
        _ => {
            let api: Api<Pipeline> = match &namespace {
                Some(namespace) => Api::namespaced(cluster.client.clone(), namespace),
                None => Api::all(cluster.client.clone()),
            };
            api.list(&ListParams::default())
                .await
                .map_err(|e| cluster.pipeline_list_error(e))?
                .items
        }
    };
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    if let Some(format @ (OutputFormat::Yaml | OutputFormat::Json)) = args.output {
        print_objects(
            format,
            &items,
            ("spate.dev/v1alpha1", "Pipeline"),
            args.name.is_some(),
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        nothing_found(namespace.as_deref());
        return Ok(ExitCode::SUCCESS);
    }
    let wide = matches!(args.output, Some(OutputFormat::Wide));
    let mut headers = vec![
        "NAME",
        "SOURCE",
        "MODE",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "AGE",
    ];
    if wide {
        headers.extend([
            "RECEIVED",
            "QUEUED",
            "LAG",
            "DEAD-LETTERED",
            "PAUSED",
            "READY",
            "LAST ERROR",
        ]);
    }
    if args.all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(&headers);
    let now = Timestamp::now();
    for pipeline in &items {
        let status = pipeline.status.clone().unwrap_or_default();
        let mut row = vec![
            pipeline.metadata.name.clone().unwrap_or_default(),
            status
                .source
                .clone()
                .unwrap_or_else(|| pipeline.spec.source.kind().to_string()),
            pipeline.spec.fanout.mode.as_str().to_string(),
            status.running.to_string(),
            status.succeeded.to_string(),
            status.failed.to_string(),
            age(pipeline.metadata.creation_timestamp.as_ref(), now),
        ];
        if wide {
            row.extend([
                status.received.to_string(),
                status.pending.to_string(),
                lag(status.source_lag),
                status.dead_lettered.to_string(),
                is_paused(pipeline).to_string(),
                ready(pipeline),
                status
                    .last_error
                    .as_deref()
                    .map(|e| cut(e, 80))
                    .unwrap_or_else(|| "<none>".to_string()),
            ]);
        }
        if args.all_namespaces {
            row.insert(0, pipeline.metadata.namespace.clone().unwrap_or_default());
        }
        table.push(row);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

pub fn is_paused(pipeline: &Pipeline) -> bool {
    pipeline
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PAUSED_ANNOTATION))
        .is_some_and(|value| value == "true")
}

/// The Ready condition as `True`, or `False (Reason)`; `<unknown>` before the controller
/// has written one.
pub fn ready(pipeline: &Pipeline) -> String {
    let condition = pipeline
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match condition {
        Some(c) if c.status == "True" => "True".to_string(),
        Some(c) if c.reason.is_empty() => c.status.clone(),
        Some(c) => format!("{} ({})", c.status, c.reason),
        None => "<unknown>".to_string(),
    }
}

/// The label selector for a pipeline's Jobs and pods, or for all of Spate's.
pub fn selector(pipeline: Option<&str>) -> String {
    match pipeline {
        Some(pipeline) => format!("{PIPELINE_LABEL}={}", sanitize_label_value(pipeline)),
        None => PIPELINE_LABEL.to_string(),
    }
}

async fn jobs(cluster: &Cluster, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let namespace = scope(cluster, args);
    let (jobs_api, pods_api): (Api<Job>, Api<Pod>) = match &namespace {
        Some(namespace) => (
            Api::namespaced(cluster.client.clone(), namespace),
            Api::namespaced(cluster.client.clone(), namespace),
        ),
        None => (
            Api::all(cluster.client.clone()),
            Api::all(cluster.client.clone()),
        ),
    };
    let labels = selector(args.pipeline.as_deref());
    let mut items = match &args.name {
        Some(name) => {
            let job = jobs_api
                .get_opt(name)
                .await
                .map_err(|e| cluster.error(e))?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "job \"{name}\" not found in namespace \"{}\"",
                        cluster.namespace
                    )
                })?;
            if !job
                .metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(PIPELINE_LABEL))
            {
                bail!("job \"{name}\" was not created by Spate (it has no {PIPELINE_LABEL} label)");
            }
            vec![job]
        }
        None => {
            jobs_api
                .list(&ListParams::default().labels(&labels))
                .await
                .map_err(|e| cluster.error(e))?
                .items
        }
    };
    items.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    if let Some(format @ (OutputFormat::Yaml | OutputFormat::Json)) = args.output {
        print_objects(format, &items, ("batch/v1", "Job"), args.name.is_some())?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        nothing_found(namespace.as_deref());
        return Ok(ExitCode::SUCCESS);
    }
    let wide = matches!(args.output, Some(OutputFormat::Wide));
    let nodes = if wide {
        let pods = pods_api
            .list(&ListParams::default().labels(&labels))
            .await
            .map_err(|e| cluster.error(e))?
            .items;
        nodes_by_job(&pods)
    } else {
        BTreeMap::new()
    };
    let mut headers = vec!["NAME", "PIPELINE", "COMPLETIONS", "STATUS", "AGE"];
    if wide {
        headers.extend(["EVENTS", "NODES"]);
    }
    if args.all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(&headers);
    let now = Timestamp::now();
    for job in &items {
        let name = job.metadata.name.clone().unwrap_or_default();
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        let mut row = vec![
            name.clone(),
            job.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(PIPELINE_LABEL).cloned())
                .unwrap_or_default(),
            completions(job),
            job_status(job).to_string(),
            age(job.metadata.creation_timestamp.as_ref(), now),
        ];
        if wide {
            let on = nodes
                .get(&(namespace.clone(), name))
                .map(|nodes| nodes.iter().cloned().collect::<Vec<_>>().join(","))
                .filter(|nodes| !nodes.is_empty())
                .unwrap_or_else(|| "<none>".to_string());
            row.extend([events_column(job), on]);
        }
        if args.all_namespaces {
            row.insert(0, namespace);
        }
        table.push(row);
    }
    table.print()?;
    Ok(ExitCode::SUCCESS)
}

/// `succeeded/completions`, as kubectl's COMPLETIONS column.
pub fn completions(job: &Job) -> String {
    let succeeded = job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0);
    let wanted = job.spec.as_ref().and_then(|s| s.completions).unwrap_or(1);
    format!("{succeeded}/{wanted}")
}

/// kubectl's STATUS column for Jobs.
pub fn job_status(job: &Job) -> &'static str {
    let condition = |kind: &str| {
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
    };
    if job.metadata.deletion_timestamp.is_some() {
        "Terminating"
    } else if condition("Complete") {
        "Complete"
    } else if condition("Failed") {
        "Failed"
    } else if condition("FailureTarget") {
        "FailureTarget"
    } else if condition("SuccessCriteriaMet") {
        "SuccessCriteriaMet"
    } else if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
        "Suspended"
    } else {
        "Running"
    }
}

/// The ids of the events a Job serves, from its annotation.
pub fn event_ids(job: &Job) -> Vec<String> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EVENT_IDS_ANNOTATION))
        .and_then(|ids| serde_json::from_str(ids).ok())
        .unwrap_or_default()
}

fn events_column(job: &Job) -> String {
    let ids = event_ids(job);
    match ids.len() {
        0 => "<none>".to_string(),
        1..=3 => cut(&ids.join(","), 80),
        n => format!("{},+{} more", cut(&ids[..3].join(","), 60), n - 3),
    }
}

/// (namespace, Job name) → the nodes its pods are bound to.
fn nodes_by_job(pods: &[Pod]) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut nodes: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for pod in pods {
        let Some(job) = owning_job(pod) else { continue };
        let entry = nodes
            .entry((pod.metadata.namespace.clone().unwrap_or_default(), job))
            .or_default();
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            entry.insert(node);
        }
    }
    nodes
}

/// The Job a pod belongs to: its controller owner, else the Job controller's label.
pub fn owning_job(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.kind == "Job")
        .map(|owner| owner.name.clone())
        .or_else(|| {
            let labels = pod.metadata.labels.as_ref()?;
            labels
                .get("batch.kubernetes.io/job-name")
                .or_else(|| labels.get("job-name"))
                .cloned()
        })
}

/// A source's lag, or `<unknown>` when its protocol does not tell (or it is disconnected).
pub(super) fn lag(source_lag: Option<i64>) -> String {
    source_lag.map_or_else(|| "<unknown>".to_string(), |lag| lag.to_string())
}
