//! `spate describe pipeline`: everything about one Pipeline on one screen, like
//! `kubectl describe`.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::ClusterArgs;
use super::get::{completions, event_ids, is_paused, job_status, selector};
use super::table::{Cluster, Table, age, cut, pairs, runtime};
use crate::pipeline::{Pipeline, PlacementMode, SinkConfig};
use crate::render::{NODE_TYPE_LABEL, VIRTUAL_KUBELET_NODE_TYPE, VIRTUAL_KUBELET_TAINT};

/// Jobs and Events shown; `spate get jobs -p NAME` and `kubectl get events` have the rest.
const RECENT_JOBS: usize = 10;
const RECENT_EVENTS: usize = 20;

/// Show a Pipeline in detail, like `kubectl describe`.
///
/// Its spec in short (source, fan-out, template, placement, sinks, retry), its status counts
/// and conditions, its most recent Jobs, and the Kubernetes Events recorded on it (dead
/// letters, failures). Source URLs are shown with their passwords hidden.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate describe pipeline thumbnails\n  \
    spate describe pl thumbnails -n media")]
pub struct DescribeArgs {
    /// What to describe: `pipeline` (also `pipelines`, `pl`).
    #[arg(value_enum)]
    pub resource: Kind,
    /// The Pipeline's name.
    pub name: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    #[value(aliases = ["pipelines", "pl"])]
    Pipeline,
}

pub fn run(args: DescribeArgs, flags: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let Kind::Pipeline = args.resource;
    runtime()?.block_on(async {
        let cluster = Cluster::connect(flags).await?;
        let pipeline = cluster.pipeline(&cluster.namespace, &args.name).await?;
        let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let mut jobs = jobs
            .list(&ListParams::default().labels(&selector(Some(&args.name))))
            .await
            .map_err(|e| cluster.error(e))?
            .items;
        jobs.sort_by(|a, b| {
            b.metadata
                .creation_timestamp
                .cmp(&a.metadata.creation_timestamp)
        });
        let events = pipeline_events(&cluster, &cluster.namespace, &args.name, None).await?;
        print!("{}", describe(&pipeline, &jobs, &events, Timestamp::now()));
        Ok(ExitCode::SUCCESS)
    })
}

/// The Events on a Pipeline, oldest first; only those with `reason` when given.
pub async fn pipeline_events(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    reason: Option<&str>,
) -> anyhow::Result<Vec<Event>> {
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), namespace);
    let mut fields = format!("involvedObject.kind=Pipeline,involvedObject.name={name}");
    if let Some(reason) = reason {
        fields.push_str(&format!(",reason={reason}"));
    }
    let mut items = events
        .list(&ListParams::default().fields(&fields))
        .await
        .map_err(|e| cluster.error(e))?
        .items;
    items.sort_by(|a, b| (event_time(a), &a.metadata.name).cmp(&(event_time(b), &b.metadata.name)));
    Ok(items)
}

/// When an Event last happened: `lastTimestamp`, `eventTime`, else its creation.
pub fn event_time(event: &Event) -> Option<Time> {
    event
        .last_timestamp
        .clone()
        .or_else(|| event.event_time.as_ref().map(|t| Time(t.0)))
        .or_else(|| event.metadata.creation_timestamp.clone())
}

/// The whole description, as text.
pub fn describe(pipeline: &Pipeline, jobs: &[Job], events: &[Event], now: Timestamp) -> String {
    let mut out = String::new();
    let meta = &pipeline.metadata;
    let spec = &pipeline.spec;
    let field = |out: &mut String, name: &str, value: &str| {
        let _ = writeln!(out, "{:<14}{value}", format!("{name}:"));
    };
    let list = |out: &mut String, name: &str, values: Vec<String>| {
        for (i, value) in values.iter().enumerate() {
            let label = if i == 0 {
                format!("{name}:")
            } else {
                String::new()
            };
            let _ = writeln!(out, "{label:<14}{value}");
        }
    };
    field(&mut out, "Name", meta.name.as_deref().unwrap_or_default());
    field(
        &mut out,
        "Namespace",
        meta.namespace.as_deref().unwrap_or_default(),
    );
    list(&mut out, "Labels", pairs(meta.labels.as_ref(), 60));
    list(
        &mut out,
        "Annotations",
        pairs(meta.annotations.as_ref(), 60),
    );
    if let Some(created) = &meta.creation_timestamp {
        field(
            &mut out,
            "Created",
            &format!("{} ({} ago)", created.0, age(Some(created), now)),
        );
    }
    field(
        &mut out,
        "Paused",
        if is_paused(pipeline) {
            "true (spate resume to restart it)"
        } else {
            "false"
        },
    );

    let _ = writeln!(out, "Source:");
    let source = serde_json::to_value(&spec.source).unwrap_or(Value::Null);
    let settings = source
        .get(spec.source.kind())
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let width = settings
        .keys()
        .map(|k| k.len() + 2)
        .max()
        .unwrap_or(0)
        .max(12);
    let _ = writeln!(out, "  {:<width$}{}", "Kind:", spec.source.kind());
    for (key, value) in &settings {
        let _ = writeln!(
            out,
            "  {:<width$}{}",
            format!("{key}:"),
            spate_sources::redact::urls_in(&flat(value))
        );
    }

    let fanout = &spec.fanout;
    let _ = writeln!(out, "Fan-out:");
    let _ = writeln!(out, "  Mode:             {}", fanout.mode.as_str());
    if fanout.mode == crate::pipeline::FanOutMode::Indexed {
        let _ = writeln!(
            out,
            "  Batch:            {} events, or what arrived within {}",
            fanout.batch_size, fanout.max_wait
        );
    }
    let _ = writeln!(out, "  Max parallelism:  {} pods", fanout.max_parallelism);
    let _ = writeln!(
        out,
        "  Rate:             {} Jobs/s (burst {})",
        fanout.max_jobs_per_second, fanout.burst
    );

    let template = match (&spec.template_ref, &spec.job_template) {
        (Some(reference), _) if reference.params.is_empty() => {
            format!("templateRef {}", reference.name)
        }
        (Some(reference), _) => format!(
            "templateRef {} ({})",
            reference.name,
            reference
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, Some(template)) => {
            let images: Vec<String> = template
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .map(|pod| {
                    pod.containers
                        .iter()
                        .map(|c| format!("{} ({})", c.name, c.image.clone().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            format!("jobTemplate: {}", images.join(", "))
        }
        (None, None) => "<none>".to_string(),
    };
    field(&mut out, "Template", &template);

    let placement = &spec.placement;
    let tolerations = match &placement.tolerations {
        Some(tolerations) => tolerations
            .iter()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t.key.clone().unwrap_or_default(),
                    t.operator.clone().unwrap_or_else(|| "Equal".into()),
                    t.effect.clone().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => format!("{VIRTUAL_KUBELET_TAINT} Exists NoSchedule"),
    };
    let where_ = match placement.mode {
        PlacementMode::Virtual => {
            let selector = placement
                .node_selector
                .as_ref()
                .map(|s| {
                    s.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| format!("{NODE_TYPE_LABEL}={VIRTUAL_KUBELET_NODE_TYPE}"));
            format!("virtual (node selector {selector}; tolerates {tolerations})")
        }
        PlacementMode::Burst => {
            format!(
                "burst (regular nodes preferred, overflow to the virtual node; tolerates {tolerations})"
            )
        }
        PlacementMode::Regular => "regular (never on the virtual node)".to_string(),
    };
    field(&mut out, "Placement", &where_);

    let _ = writeln!(out, "Sinks:");
    let results: Vec<&str> = spec.sinks.results.iter().map(SinkConfig::kind).collect();
    let _ = writeln!(
        out,
        "  Results:       {}",
        if results.is_empty() {
            "<none>".to_string()
        } else {
            results.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "  Dead letters:  {}",
        match &spec.sinks.dead_letter {
            Some(sink) => sink.kind().to_string(),
            None => "kubernetesEvent (the default: Events on this Pipeline, below)".to_string(),
        }
    );
    let retry = &spec.retry;
    field(
        &mut out,
        "Retry",
        &format!(
            "backoffLimit {}, maxAttempts {}, backoff {}..{}, pendingTimeout {}",
            retry.backoff_limit,
            retry.max_attempts,
            retry.initial_backoff,
            retry.max_backoff,
            retry.pending_timeout
        ),
    );
    field(
        &mut out,
        "TTL",
        &format!(
            "{}s after a Job finishes and is reported",
            spec.ttl_seconds_after_finished
        ),
    );

    let status = pipeline.status.clone().unwrap_or_default();
    let _ = writeln!(out, "Status:");
    for (name, value) in [
        ("Received", status.received),
        ("Queued", status.pending),
        ("Running", status.running),
        ("Succeeded", status.succeeded),
        ("Failed", status.failed),
        ("Dead-lettered", status.dead_lettered),
    ] {
        let _ = writeln!(out, "  {:<15}{value}", format!("{name}:"));
    }
    let _ = writeln!(
        out,
        "  Source lag:    {}",
        super::get::lag(status.source_lag)
    );
    let _ = writeln!(
        out,
        "  Last error:    {}",
        status.last_error.as_deref().unwrap_or("<none>")
    );
    if let Some(generation) = status.observed_generation {
        let _ = writeln!(
            out,
            "  Observed generation: {generation} (spec generation {})",
            meta.generation.unwrap_or_default()
        );
    }

    if status.conditions.is_empty() {
        let _ = writeln!(
            out,
            "Conditions:    <none> (no controller has reported yet)"
        );
    } else {
        let _ = writeln!(out, "Conditions:");
        let mut table = Table::new(&["Type", "Status", "Reason", "Age", "Message"]);
        table.push(
            ["----", "------", "------", "---", "-------"]
                .map(String::from)
                .to_vec(),
        );
        for condition in &status.conditions {
            table.push(vec![
                condition.type_.clone(),
                condition.status.clone(),
                condition.reason.clone(),
                age(Some(&condition.last_transition_time), now),
                condition.message.clone(),
            ]);
        }
        indent(&mut out, &table.render());
    }

    if jobs.is_empty() {
        let _ = writeln!(out, "Recent Jobs:   <none>");
    } else {
        let shown = jobs.len().min(RECENT_JOBS);
        if shown < jobs.len() {
            let _ = writeln!(
                out,
                "Recent Jobs:   ({shown} of {}; spate get jobs -p {} lists them all)",
                jobs.len(),
                meta.name.as_deref().unwrap_or_default()
            );
        } else {
            let _ = writeln!(out, "Recent Jobs:");
        }
        let mut table = Table::new(&["Name", "Completions", "Status", "Age", "Events"]);
        table.push(
            ["----", "-----------", "------", "---", "------"]
                .map(String::from)
                .to_vec(),
        );
        for job in &jobs[..shown] {
            let ids = event_ids(job);
            table.push(vec![
                job.metadata.name.clone().unwrap_or_default(),
                completions(job),
                job_status(job).to_string(),
                age(job.metadata.creation_timestamp.as_ref(), now),
                match ids.len() {
                    0 => "<none>".to_string(),
                    1 => cut(&ids[0], 50),
                    n => format!("{n} events"),
                },
            ]);
        }
        indent(&mut out, &table.render());
    }

    if events.is_empty() {
        let _ = writeln!(out, "Events:        <none>");
    } else {
        let skipped = events.len().saturating_sub(RECENT_EVENTS);
        if skipped > 0 {
            let _ = writeln!(out, "Events:        ({skipped} older not shown)");
        } else {
            let _ = writeln!(out, "Events:");
        }
        let mut table = Table::new(&["Type", "Reason", "Age", "From", "Message"]);
        table.push(
            ["----", "------", "----", "----", "-------"]
                .map(String::from)
                .to_vec(),
        );
        for event in &events[skipped..] {
            let count = event.count.unwrap_or(1);
            let when = age(event_time(event).as_ref(), now);
            table.push(vec![
                event.type_.clone().unwrap_or_default(),
                event.reason.clone().unwrap_or_default(),
                if count > 1 {
                    format!("{when} (x{count})")
                } else {
                    when
                },
                event
                    .reporting_component
                    .clone()
                    .filter(|c| !c.is_empty())
                    .or_else(|| event.source.as_ref().and_then(|s| s.component.clone()))
                    .unwrap_or_default(),
                cut(event.message.as_deref().unwrap_or_default(), 200),
            ]);
        }
        indent(&mut out, &table.render());
    }
    out
}

fn indent(out: &mut String, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "  {line}");
    }
}

/// A setting on one line: strings as they are, the rest as compact JSON.
fn flat(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}
