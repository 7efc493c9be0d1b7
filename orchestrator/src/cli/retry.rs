//! `spate retry`: run dead-lettered items again, from the Kubernetes Events the default
//! dead-letter sink wrote.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Args;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use spate_sinks::kubernetes_event::{
    DEAD_LETTERED_REASON, EVENT_ANNOTATION, EVENT_ID_ANNOTATION, EVENT_OMITTED_ANNOTATION,
    JOB_ANNOTATION, RETRIED_ANNOTATION,
};
use spate_sources::Event;

use super::ClusterArgs;
use super::describe::pipeline_events;
use super::table::{Cluster, resolve_pipeline, runtime};
use super::trigger::{emitter, render};
use crate::engine::emit::Created;
use crate::naming;
use crate::pipeline::LoadedPipeline;
use crate::render::{BATCH_LABEL, RenderedJob, pipeline_namespace};

/// Annotation on a re-run Job: its retry generation (1 for the first re-run of an event).
pub const RETRY_ANNOTATION: &str = "spate.dev/retry";
/// Annotation on a re-run Job: the dead-letter Event it re-runs.
pub const DEAD_LETTER_ANNOTATION: &str = "spate.dev/dead-letter";
/// Annotation on a re-run Job: the Job whose item it re-runs, when there was one.
pub const RETRY_OF_ANNOTATION: &str = "spate.dev/retry-of";

/// Generations tried past the first free-looking one before giving up on an event.
const MAX_GENERATION_PROBES: u32 = 20;

/// Re-run a pipeline's dead-lettered items.
///
/// Reads the Pipeline's `DeadLettered` Kubernetes Events (written by the default dead-letter
/// sink, `kubernetesEvent`, which keeps each event's JSON in the `spate.dev/event`
/// annotation), and for each not yet retried creates a new Job for its event, rendered and
/// created as `spate trigger` does, with a retry generation in the name derivation (the event
/// id and `retry-N`), so it is a new Job and not the failed one. Once the Job exists, the Event is
/// marked `spate.dev/retried: <job>`, so a second `spate retry` does not run the item again;
/// if the re-run fails too, its new dead letter can be retried in turn (generation N+1). An
/// event id dead-lettered several times is re-run once.
///
/// Skipped, and counted in the summary: events over 64 KiB (the sink does not keep them),
/// and Events written by a Spate that did not keep events. Kubernetes expires Events (after
/// one hour by default), and with them what can be retried. Pipelines with another
/// dead-letter sink (NATS, AMQP, webhook, object store) keep their dead letters there, not
/// in Events: replay them from there.
///
/// Re-runs are created at the pipeline's rate (maxJobsPerSecond, burst) but outside its
/// parallelism budget; progress goes to stderr, the summary to stdout.
///
/// Exit codes: 0 when every item not skipped was re-run (or nothing was left to retry); 1
/// when a re-run could not be created, the pipeline is not found or invalid, or the cluster
/// is unreachable.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    spate retry thumbnails --dry-run          (what would be re-run)\n  \
    spate retry thumbnails\n  \
    spate retry thumbnails --event-id uploads/a.jpg@3f1c...\n  \
    spate retry -f pipeline.yaml              (a pipeline run with `spate run -f`)\n\n\
Output:\n  \
    3 dead-lettered items re-run, 1 skipped: event too large to keep")]
pub struct RetryArgs {
    /// The Pipeline's name (with -f: which pipeline of the file, when it holds several).
    #[arg(value_name = "PIPELINE")]
    pub pipeline: Option<String>,
    /// A pipeline file instead of the cluster's Pipeline resource.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Only the items of these event ids.
    #[arg(long = "event-id", value_name = "ID")]
    pub event_ids: Vec<String>,
    /// List what would be re-run, with the Job names, without creating or marking anything.
    #[arg(long)]
    pub dry_run: bool,
}

/// One event to run again, and the dead-letter Events it answers.
struct Item {
    id: String,
    event: Event,
    /// The first dead letter: its name goes on the Job.
    letter: String,
    /// Every unretried dead letter of this event id: all are marked with the new Job.
    letters: Vec<String>,
    failed_job: Option<String>,
    /// Earlier re-runs of this event id.
    done: u32,
}

pub fn run(args: RetryArgs, flags: &ClusterArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let cluster = Cluster::connect(flags).await?;
        let loaded =
            resolve_pipeline(&cluster, args.pipeline.as_deref(), args.file.as_deref()).await?;
        retry(&cluster, &loaded, &args).await
    })
}

async fn retry(
    cluster: &Cluster,
    loaded: &LoadedPipeline,
    args: &RetryArgs,
) -> anyhow::Result<ExitCode> {
    let namespace = pipeline_namespace(&loaded.pipeline);
    let name = loaded.pipeline.metadata.name.clone().unwrap_or_default();
    let letters = pipeline_events(cluster, &namespace, &name, Some(DEAD_LETTERED_REASON)).await?;
    let (items, skipped) = plan(&letters, &args.event_ids);
    let mut summary = Summary {
        skipped,
        ..Summary::default()
    };
    if items.is_empty() {
        println!("{}", summary.line(args.dry_run));
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "spate: {} dead-lettered item(s) of pipeline {namespace}/{name} to re-run{}",
        items.len(),
        if args.dry_run { " (dry run)" } else { "" }
    );
    let emitter = emitter(cluster, loaded);
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), &namespace);
    let events: Api<KubeEvent> = Api::namespaced(cluster.client.clone(), &namespace);
    let total = items.len();
    for (index, item) in items.into_iter().enumerate() {
        let step = format!("[{}/{total}]", index + 1);
        let rendered = match render(loaded, &item.event) {
            Ok(rendered) => rendered,
            Err(error) => {
                eprintln!("spate: {step} event {}: {error:#}", item.id);
                summary.failed += 1;
                continue;
            }
        };
        let mut generation = item.done + 1;
        let mut outcome = None;
        for _ in 0..MAX_GENERATION_PROBES {
            let job = retry_job(&rendered, loaded, &item, generation);
            let job_name = job.job.metadata.name.clone().unwrap_or_default();
            if args.dry_run {
                outcome = Some(Ok(job_name));
                break;
            }
            match emitter.create(&job).await {
                Ok(Created::New) => {
                    outcome = Some(Ok(job_name));
                    break;
                }
                Ok(Created::AlreadyExisted) => {
                    // Ours from a run that stopped before marking the Event, or another
                    // dead letter's re-run whose Event has expired: then try the next name.
                    match jobs.get_opt(&job_name).await {
                        Ok(Some(existing)) if answers(&existing, &item.letter) => {
                            outcome = Some(Ok(job_name));
                            break;
                        }
                        Ok(_) => generation += 1,
                        Err(error) => {
                            outcome = Some(Err(cluster.error(error)));
                            break;
                        }
                    }
                }
                Err(error) => {
                    outcome = Some(Err(anyhow!("{error}")));
                    break;
                }
            }
        }
        let job_name = match outcome {
            Some(Ok(job_name)) => job_name,
            Some(Err(error)) => {
                eprintln!("spate: {step} event {}: {error:#}", item.id);
                summary.failed += 1;
                continue;
            }
            None => {
                eprintln!(
                    "spate: {step} event {}: no free retry name after {MAX_GENERATION_PROBES} \
                     tries",
                    item.id
                );
                summary.failed += 1;
                continue;
            }
        };
        if args.dry_run {
            eprintln!(
                "spate: {step} event {} would re-run as job.batch/{job_name} (retry {generation})",
                item.id
            );
            summary.rerun += 1;
            continue;
        }
        let mark = json!({"metadata": {"annotations": {RETRIED_ANNOTATION: job_name}}});
        let mut marked = true;
        for letter in &item.letters {
            match events
                .patch(letter, &PatchParams::default(), &Patch::Merge(&mark))
                .await
            {
                Ok(_) => {}
                // Expired meanwhile: nothing left to mark.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    eprintln!(
                        "spate: {step} event {}: Job {job_name} exists but the dead letter {letter} \
                         could not be marked retried (a later retry finds the Job and marks it): {}",
                        item.id,
                        cluster.error(error)
                    );
                    marked = false;
                }
            }
        }
        if !marked {
            summary.failed += 1;
            continue;
        }
        eprintln!(
            "spate: {step} event {} re-run as job.batch/{job_name} (retry {generation})",
            item.id
        );
        summary.rerun += 1;
    }
    println!("{}", summary.line(args.dry_run));
    Ok(if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Default)]
struct Summary {
    rerun: usize,
    failed: usize,
    /// Reason → how many.
    skipped: BTreeMap<&'static str, usize>,
}

impl Summary {
    fn line(&self, dry_run: bool) -> String {
        let verb = if dry_run { "to re-run" } else { "re-run" };
        let mut line = format!(
            "{} dead-lettered item{} {verb}",
            self.rerun,
            if self.rerun == 1 { "" } else { "s" }
        );
        if self.failed > 0 {
            line.push_str(&format!(", {} failed (see above)", self.failed));
        }
        for (reason, count) in &self.skipped {
            line.push_str(&format!(", {count} skipped: {reason}"));
        }
        line
    }
}

const TOO_LARGE: &str = "event too large to keep";
const NOT_KEPT: &str = "event not recorded in the dead letter";
const UNREADABLE: &str = "recorded event unreadable";

/// The items to re-run, one per event id, and what is skipped; oldest first.
fn plan(letters: &[KubeEvent], only: &[String]) -> (Vec<Item>, BTreeMap<&'static str, usize>) {
    let mut items: Vec<Item> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut done: HashMap<String, u32> = HashMap::new();
    let mut skipped = BTreeMap::new();
    let annotation = |letter: &KubeEvent, key: &str| {
        letter
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key).cloned())
    };
    for letter in letters {
        if let Some(id) = annotation(letter, EVENT_ID_ANNOTATION)
            && annotation(letter, RETRIED_ANNOTATION).is_some()
        {
            *done.entry(id).or_default() += 1;
        }
    }
    for letter in letters {
        if annotation(letter, RETRIED_ANNOTATION).is_some() {
            continue;
        }
        let id = annotation(letter, EVENT_ID_ANNOTATION);
        if !only.is_empty() && !id.as_ref().is_some_and(|id| only.contains(id)) {
            continue;
        }
        let event = match annotation(letter, EVENT_ANNOTATION) {
            Some(text) => serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|value| Event::from_json(value).ok()),
            None => {
                let reason = if annotation(letter, EVENT_OMITTED_ANNOTATION).is_some() {
                    TOO_LARGE
                } else {
                    NOT_KEPT
                };
                *skipped.entry(reason).or_default() += 1;
                continue;
            }
        };
        let Some(event) = event else {
            *skipped.entry(UNREADABLE).or_default() += 1;
            continue;
        };
        let id = event.id().to_string();
        let letter_name = letter.metadata.name.clone().unwrap_or_default();
        match by_id.get(&id) {
            Some(&index) => items[index].letters.push(letter_name),
            None => {
                by_id.insert(id.clone(), items.len());
                items.push(Item {
                    done: done.get(&id).copied().unwrap_or(0),
                    id,
                    event,
                    letter: letter_name.clone(),
                    letters: vec![letter_name],
                    failed_job: annotation(letter, JOB_ANNOTATION),
                });
            }
        }
    }
    (items, skipped)
}

/// The event's Job, renamed for retry `generation`: the name (and batch label) derive from
/// the event id and `retry-N`, so the re-run is a new Job, and the same one if this retry is
/// itself repeated before its Event is marked.
fn retry_job(
    rendered: &RenderedJob,
    loaded: &LoadedPipeline,
    item: &Item,
    generation: u32,
) -> RenderedJob {
    let namespace = pipeline_namespace(&loaded.pipeline);
    let pipeline = loaded.pipeline.metadata.name.clone().unwrap_or_default();
    // NUL cannot appear in ids the sources produce, so no event id collides with a retry key.
    let key = [format!("{}\0retry-{generation}", item.id)];
    let name = naming::job_name(&namespace, &pipeline, &key);
    let batch = naming::batch_id(&namespace, &pipeline, &key);
    let mut out = rendered.clone();
    let old = out
        .job
        .metadata
        .name
        .replace(name.clone())
        .unwrap_or_default();
    let mut annotations = BTreeMap::from([
        (RETRY_ANNOTATION.to_string(), generation.to_string()),
        (DEAD_LETTER_ANNOTATION.to_string(), item.letter.clone()),
    ]);
    if let Some(job) = &item.failed_job {
        annotations.insert(RETRY_OF_ANNOTATION.to_string(), job.clone());
    }
    out.job
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .extend(annotations);
    let set_batch = |labels: &mut Option<BTreeMap<String, String>>| {
        if let Some(labels) = labels {
            labels.insert(BATCH_LABEL.to_string(), batch.clone());
        }
    };
    set_batch(&mut out.job.metadata.labels);
    if let Some(spec) = out.job.spec.as_mut() {
        if let Some(metadata) = spec.template.metadata.as_mut() {
            set_batch(&mut metadata.labels);
        }
        // The input ConfigMap is named after the Job.
        for volume in spec
            .template
            .spec
            .as_mut()
            .and_then(|pod| pod.volumes.as_mut())
            .into_iter()
            .flatten()
        {
            if let Some(config_map) = volume.config_map.as_mut()
                && config_map.name == old
            {
                config_map.name = name.clone();
            }
        }
    }
    if let Some(input) = out.input.as_mut() {
        input.metadata.name = Some(name.clone());
        set_batch(&mut input.metadata.labels);
    }
    out
}

/// Whether an existing Job is the re-run of this dead letter.
fn answers(job: &Job, letter: &str) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEAD_LETTER_ANNOTATION))
        .is_some_and(|value| value == letter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn letter(name: &str, annotations: &[(&str, &str)]) -> KubeEvent {
        KubeEvent {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn each_event_id_is_re_run_once_and_retried_letters_count_generations() {
        let event = r#"{"id":"a"}"#;
        let letters = [
            letter(
                "p.1",
                &[
                    (EVENT_ID_ANNOTATION, "a"),
                    (EVENT_ANNOTATION, event),
                    (RETRIED_ANNOTATION, "p-x"),
                ],
            ),
            letter(
                "p.2",
                &[(EVENT_ID_ANNOTATION, "a"), (EVENT_ANNOTATION, event)],
            ),
            letter(
                "p.3",
                &[(EVENT_ID_ANNOTATION, "a"), (EVENT_ANNOTATION, event)],
            ),
            letter(
                "p.4",
                &[
                    (EVENT_ID_ANNOTATION, "big"),
                    (EVENT_OMITTED_ANNOTATION, "too big"),
                ],
            ),
            letter("p.5", &[]),
        ];
        let (items, skipped) = plan(&letters, &[]);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].letters, ["p.2", "p.3"]);
        assert_eq!(items[0].done, 1);
        assert_eq!(skipped[TOO_LARGE], 1);
        assert_eq!(skipped[NOT_KEPT], 1);
        let (items, _) = plan(&letters, &["other".to_string()]);
        assert!(items.is_empty());
    }

    #[test]
    fn the_summary_reads_as_a_sentence() {
        let summary = Summary {
            rerun: 3,
            failed: 0,
            skipped: BTreeMap::from([(TOO_LARGE, 1)]),
        };
        assert_eq!(
            summary.line(false),
            "3 dead-lettered items re-run, 1 skipped: event too large to keep"
        );
    }
}
