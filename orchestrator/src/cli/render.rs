//! `spate render`: print the exact Job (and input ConfigMap) an event would produce.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;
use spate_sources::Event;

use super::run::PodSecurityArgs;
use super::{ClusterArgs, OutputFormat};
use crate::pipeline::FanOutMode;
use crate::pipeline::load::load_file_with;
use crate::render::render_job;

/// Render a pipeline's Job for an event, exactly as `spate run` would create it.
///
/// The output is the Job, placement and deterministic name included, followed in indexed mode
/// (or for an event too large for env) by the ConfigMap that carries the input. Nothing is
/// sent to a cluster.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  spate render -f pipeline.yaml --event '{\"id\":\"u-1\",\"bucket\":\"uploads\",\"key\":\"a.jpg\",\"size\":10,\"etag\":\"x\",\"url\":\"s3://uploads/a.jpg\"}'\n  spate render -f pipeline.yaml --event @event.json -o json\n  spate render -f indexed.yaml --events @batch.jsonl"
)]
pub struct RenderArgs {
    /// The pipeline file.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Which pipeline, when the file holds several.
    #[arg(long, value_name = "NAME")]
    pub pipeline: Option<String>,
    /// The event as JSON with an `id`, or @FILE to read it from a file.
    #[arg(
        long,
        value_name = "JSON|@FILE",
        conflicts_with = "events",
        required_unless_present = "events"
    )]
    pub event: Option<String>,
    /// A batch for indexed mode: a JSON list of events, or JSON lines, or @FILE.
    #[arg(long, value_name = "JSON|@FILE")]
    pub events: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub pod_security: PodSecurityArgs,
}

pub fn run(args: RenderArgs, cluster: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let pipelines = match load_file_with(&args.file, &args.pod_security.policy()?) {
        Ok(pipelines) => pipelines,
        Err(diagnostics) => {
            for diagnostic in diagnostics {
                eprintln!("{diagnostic}");
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    let loaded = match (&args.pipeline, pipelines.as_slice()) {
        (None, [only]) => only,
        (None, _) => bail!(
            "{} holds several pipelines; choose one with --pipeline NAME",
            args.file.display()
        ),
        (Some(name), all) => all
            .iter()
            .find(|p| p.pipeline.metadata.name.as_deref() == Some(name))
            .with_context(|| format!("no pipeline named {name} in {}", args.file.display()))?,
    };
    // As with `kubectl apply -n`, the flag places a pipeline that names no namespace.
    let mut pipeline = loaded.pipeline.clone();
    if pipeline.metadata.namespace.is_none() {
        pipeline.metadata.namespace = cluster.namespace.clone();
    }
    let events = match (&args.event, &args.events) {
        (Some(event), _) => vec![parse_event(&read_argument(event)?)?],
        (None, Some(batch)) => parse_batch(&read_argument(batch)?)?,
        (None, None) => bail!("give --event or --events"),
    };
    if pipeline.spec.fanout.mode == FanOutMode::PerEvent && events.len() > 1 {
        bail!("pipeline is in perEvent mode: render one event at a time with --event");
    }
    let rendered = render_job(&pipeline, &loaded.template, &loaded.values, &events)?;
    let mut documents = vec![serde_json::to_value(&rendered.job)?];
    if let Some(input) = &rendered.input {
        documents.push(serde_json::to_value(input)?);
    }
    for document in &mut documents {
        tag_kind(document);
    }
    args.output.print(&documents)?;
    Ok(ExitCode::SUCCESS)
}

/// Adds `apiVersion`/`kind`, which k8s-openapi types leave to the client that sends them.
fn tag_kind(document: &mut Value) {
    let (api_version, kind) = if document.pointer("/spec/template").is_some() {
        ("batch/v1", "Job")
    } else {
        ("v1", "ConfigMap")
    };
    if let Value::Object(map) = document {
        let mut tagged = serde_json::Map::new();
        tagged.insert("apiVersion".to_string(), api_version.into());
        tagged.insert("kind".to_string(), kind.into());
        tagged.append(map);
        *map = tagged;
    }
}

fn read_argument(argument: &str) -> anyhow::Result<String> {
    match argument.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}")),
        None => Ok(argument.to_string()),
    }
}

fn parse_event(text: &str) -> anyhow::Result<Event> {
    let value: Value = serde_json::from_str(text).context("the event is not valid JSON")?;
    Ok(Event::from_json(value)?)
}

fn parse_batch(text: &str) -> anyhow::Result<Vec<Event>> {
    let values: Vec<Value> = match serde_json::from_str(text) {
        Ok(Value::Array(items)) => items,
        _ => text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(n, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("line {} is not valid JSON", n + 1))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    if values.is_empty() {
        bail!("the batch holds no events");
    }
    values
        .into_iter()
        .enumerate()
        .map(|(n, value)| Event::from_json(value).with_context(|| format!("event {n}")))
        .collect()
}
