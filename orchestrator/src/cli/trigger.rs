//! `spate trigger`: inject one event by hand, through the engine's own render and create path.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use serde_json::Value;
use spate_sources::{Event, SourceConfig};

use super::table::{Cluster, load_pipeline_file, owner_reference, resolve_pipeline, runtime, tag};
use super::{ClusterArgs, OutputFormat};
use crate::engine::emit::{Created, Emitter};
use crate::pipeline::LoadedPipeline;
use crate::render::{RenderedJob, render_job};

/// Run a pipeline for one event given by hand, as if its source had delivered it.
///
/// The Pipeline is read from the cluster (or from a file with -f, for a pipeline run with
/// `spate run -f`) and checked as `spate validate` checks it; the event is checked against
/// the source kind (an `id`, and the fields that kind's events always carry). The Job is
/// rendered and created exactly as the engine does: same name (derived from the pipeline and
/// the event id), labels, annotations and owner reference, input ConfigMap when the event is
/// large. So triggering the same event id twice creates one Job: the second time says
/// "already exists" and exits 0; a running engine also sees the Job, tracks it and reports
/// its result to the sinks.
///
/// A hand trigger bypasses the pipeline's rate limit (maxJobsPerSecond, burst), its
/// parallelism budget (maxParallelism) and a pause: it is one Job, created now. In indexed
/// mode it is an Indexed Job of one item.
///
/// Exit codes: 0 created or already there (or printed, with --dry-run); 1 invalid pipeline or
/// event, template error, pipeline not found, API refusal or unreachable cluster.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate trigger thumbnails --event '{\"id\":\"u-1\",\"bucket\":\"uploads\",\"key\":\"a.jpg\",\"size\":10,\"etag\":\"x\",\"url\":\"s3://uploads/a.jpg\",\"lastModified\":\"2026-01-01T00:00:00Z\"}'\n  \
    spate trigger render-frames --event-file event.json -n media\n  \
    echo '{\"id\":\"job-7\",\"subject\":\"frames\",\"routingKey\":\"frames\",\"exchange\":\"\",\"headers\":{},\"data\":{\"frame\":7}}' | spate trigger render-frames --event-file -\n  \
    spate trigger -f examples/webhook/pipeline.yaml --event @event.json --dry-run -o json")]
pub struct TriggerArgs {
    /// The Pipeline's name (with -f: which pipeline of the file, when it holds several).
    #[arg(value_name = "PIPELINE")]
    pub pipeline: Option<String>,
    /// The event as JSON, with an `id` (or @FILE).
    #[arg(
        long,
        value_name = "JSON",
        conflicts_with = "event_file",
        required_unless_present = "event_file"
    )]
    pub event: Option<String>,
    /// Read the event from a file, or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    pub event_file: Option<PathBuf>,
    /// A pipeline file instead of the cluster's Pipeline resource.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Print the Job (and input ConfigMap) instead of creating it.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: yaml (default) or json.
    #[arg(short = 'o', long, value_enum, requires = "dry_run")]
    pub output: Option<OutputFormat>,
}

pub fn run(args: TriggerArgs, flags: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let text = match (&args.event, &args.event_file) {
        (Some(event), _) => match event.strip_prefix('@') {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
            }
            None => event.clone(),
        },
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the event from standard input")?;
            text
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, None) => bail!("give the event with --event JSON or --event-file FILE"),
    };
    let format = match args.output {
        Some(OutputFormat::Wide) => bail!("-o wide is for tables; use -o yaml or -o json"),
        Some(format) => format,
        None => OutputFormat::Yaml,
    };
    runtime()?.block_on(async {
        let connected = Cluster::connect(flags).await;
        // A dry run of a pipeline file needs no cluster, as `spate render` needs none.
        if let (true, Some(file), Err(_)) = (args.dry_run, &args.file, &connected) {
            let namespace = flags.namespace.as_deref().unwrap_or("default");
            let loaded = load_pipeline_file(file, args.pipeline.as_deref(), namespace)?;
            let event = parse_event(&text, &loaded.pipeline.spec.source)?;
            print_rendered(&loaded, &render(&loaded, &event)?, format)?;
            return Ok(ExitCode::SUCCESS);
        }
        let cluster = connected?;
        let loaded =
            resolve_pipeline(&cluster, args.pipeline.as_deref(), args.file.as_deref()).await?;
        let event = parse_event(&text, &loaded.pipeline.spec.source)?;
        let rendered = render(&loaded, &event)?;
        let name = rendered.job.metadata.name.clone().unwrap_or_default();
        if args.dry_run {
            print_rendered(&loaded, &rendered, format)?;
            return Ok(ExitCode::SUCCESS);
        }
        if super::get::is_paused(&loaded.pipeline) {
            eprintln!(
                "spate: note: pipeline {} is paused; a hand trigger creates its Job anyway",
                loaded.pipeline.metadata.name.as_deref().unwrap_or_default()
            );
        }
        match create(&cluster, &loaded, &rendered).await? {
            Created::New => println!("job.batch/{name} created"),
            Created::AlreadyExisted => println!(
                "job.batch/{name} already exists: event {} was triggered (or delivered) \
                 before; nothing new was created",
                event.id()
            ),
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Renders the Job for one event as the engine's intake does.
pub fn render(loaded: &LoadedPipeline, event: &Event) -> anyhow::Result<RenderedJob> {
    render_job(
        &loaded.pipeline,
        &loaded.template,
        &loaded.values,
        std::slice::from_ref(event),
    )
    .map_err(|error| {
        anyhow!(
            "cannot render the Job template for event {}: {error}",
            event.id()
        )
    })
}

/// Creates the Job (and its input) through the engine's emitter: owner reference, `409` as
/// "already there", transient errors retried as the pipeline's retry policy says.
pub async fn create(
    cluster: &Cluster,
    loaded: &LoadedPipeline,
    rendered: &RenderedJob,
) -> anyhow::Result<Created> {
    emitter(cluster, loaded)
        .create(rendered)
        .await
        .map_err(|error| anyhow!("{error} (API server {})", cluster.server))
}

/// The engine's emitter for this pipeline.
pub fn emitter(cluster: &Cluster, loaded: &LoadedPipeline) -> Emitter {
    let spec = &loaded.pipeline.spec;
    Emitter::new(
        cluster.client.clone(),
        &spec.fanout,
        &spec.retry,
        owner_reference(&loaded.pipeline),
    )
}

/// Prints the Job as it would be created (owner reference included), then its ConfigMap.
fn print_rendered(
    loaded: &LoadedPipeline,
    rendered: &RenderedJob,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut job = rendered.job.clone();
    job.metadata.owner_references = owner_reference(&loaded.pipeline).map(|o| vec![o]);
    let mut documents = vec![serde_json::to_value(&job)?];
    tag(&mut documents[0], "batch/v1", "Job");
    if let Some(input) = &rendered.input {
        let mut input = serde_json::to_value(input)?;
        tag(&mut input, "v1", "ConfigMap");
        documents.push(input);
    }
    format.print(&documents)
}

/// Parses an event and checks it against what the source kind delivers: a JSON object with
/// a string `id`, every field that kind's events always carry, with the same JSON type.
pub fn parse_event(text: &str, source: &SourceConfig) -> anyhow::Result<Event> {
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|error| anyhow!("the event is not valid JSON: {error}"))?;
    check_event(&value, source)?;
    Event::from_json(value).map_err(|error| anyhow!("invalid event: {error}"))
}

fn check_event(value: &Value, source: &SourceConfig) -> anyhow::Result<()> {
    let Value::Object(fields) = value else {
        bail!("the event must be a JSON object with an `id`, got {value}");
    };
    let kind = source.kind();
    let sample = source.sample_event();
    let Some(expected) = sample.as_object() else {
        return Ok(());
    };
    let mut missing = Vec::new();
    let mut mistyped = Vec::new();
    for (field, example) in expected {
        match fields.get(field) {
            // Headers and the body are whatever the producer sent.
            None if matches!(field.as_str(), "headers" | "data") => {}
            None => missing.push(field.as_str()),
            Some(given) if field == "data" || json_type(given) == json_type(example) => {}
            Some(given) => mistyped.push(format!(
                "`{field}` must be {}, got {}",
                json_type(example),
                json_type(given)
            )),
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing {}", missing.join(", ")));
    }
    problems.extend(mistyped);
    if problems.is_empty() {
        return Ok(());
    }
    let all: Vec<&str> = expected.keys().map(String::as_str).collect();
    bail!(
        "the event is not what {kind} sources deliver: {} ({kind} events carry: {}; e.g. {})",
        problems.join("; "),
        all.join(", "),
        sample
    )
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amqp() -> SourceConfig {
        serde_json::from_value(serde_json::json!({"amqp": {"url": "amqp://h/%2f", "queue": "q"}}))
            .unwrap()
    }

    #[test]
    fn an_event_must_carry_what_its_source_kind_delivers() {
        let ok = r#"{"id":"1","subject":"q","routingKey":"q","exchange":""}"#;
        assert_eq!(parse_event(ok, &amqp()).unwrap().id(), "1");
        let error = parse_event(r#"{"id":"1","subject":"q"}"#, &amqp()).unwrap_err();
        assert!(
            error.to_string().contains("missing exchange, routingKey"),
            "{error}"
        );
        let error = parse_event(
            r#"{"id":"1","subject":"q","routingKey":"q","exchange":"","headers":[]}"#,
            &amqp(),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("`headers` must be an object"),
            "{error}"
        );
        let error = parse_event("{\"id\": ", &amqp()).unwrap_err();
        assert!(error.to_string().contains("not valid JSON"), "{error}");
        let error =
            parse_event(r#"{"subject":"q","routingKey":"q","exchange":""}"#, &amqp()).unwrap_err();
        assert!(error.to_string().contains("missing id"), "{error}");
    }
}
