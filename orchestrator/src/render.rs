//! Renders a pipeline's Job template for an event (or a batch of events) into the exact Job
//! Spate creates.
//!
//! Safety by construction: the template is parsed *before* rendering, and each string leaf is
//! rendered on its own, so event text can never add a field, a list item or a command-line
//! argument; it only ever becomes the value of the string it was placed in. Templates that
//! would pass event text to a shell (`sh -c "... {{ event.key }}"`) are refused at validation:
//! the event reaches a script through environment variables instead.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::LazyLock;

use k8s_openapi::api::batch::v1::{Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PodSpec, PreferredSchedulingTerm, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value, json};
use spate_sources::Event;

use crate::naming;
use crate::pipeline::located::{join_index, join_key};
use crate::pipeline::{FanOutMode, Pipeline, PlacementMode};
use crate::pod_security;

/// Label on every Job and pod: the pipeline that made it.
pub const PIPELINE_LABEL: &str = "spate.dev/pipeline";
/// Label on every Job and pod: the batch (hash of its event ids).
pub const BATCH_LABEL: &str = "spate.dev/batch";
/// Annotation: the ids of the events a Job serves, as a JSON list.
pub const EVENT_IDS_ANNOTATION: &str = "spate.dev/event-ids";
/// Annotation: the source kind the events came from.
pub const SOURCE_ANNOTATION: &str = "spate.dev/source";
/// Annotation: the `ttlSecondsAfterFinished` the Job gets once its outcome is reported. A Job
/// is created without one, so the TTL controller cannot delete a finished Job before the
/// tracker has read it (while Spate is down, say); the tracker sets it with the reported mark.
pub const TTL_ANNOTATION: &str = "spate.dev/ttl-seconds-after-finished";
/// Annotation: the parallelism an indexed Job was rendered with, set by the engine when the
/// budget had fewer pods free at its creation; the tracker raises it back as pods come free.
pub const WANTED_PARALLELISM_ANNOTATION: &str = "spate.dev/wanted-parallelism";
/// The virtual-kubelet taint key every provider uses (`virtual-kubelet.io/provider=<name>`).
pub const VIRTUAL_KUBELET_TAINT: &str = "virtual-kubelet.io/provider";
/// The node label virtual-kubelet nodes carry (`type=virtual-kubelet`).
pub const NODE_TYPE_LABEL: &str = "type";
pub const VIRTUAL_KUBELET_NODE_TYPE: &str = "virtual-kubelet";

/// Where the event or batch file is mounted in the pod when it does not fit in env.
pub const INPUT_MOUNT_PATH: &str = "/var/run/spate";
const INPUT_VOLUME: &str = "spate-input";
/// Events up to this size travel in the `SPATE_EVENT` env var; larger ones as a file.
pub const MAX_ENV_EVENT_BYTES: usize = 16 * 1024;
/// The API server's limit on an object's annotations, keys and values together.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// The API server's limit on a ConfigMap's data, keys and values together.
pub const MAX_CONFIG_MAP_BYTES: usize = 1024 * 1024;
/// The API server's limit on a request body.
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024;
/// What the split leaves for the metadata and the placeholders it cannot measure before
/// rendering; a part that still does not fit is halved.
const SPLIT_MARGIN_BYTES: usize = 8 * 1024;

/// The objects to create for one Job: the Job, and the ConfigMap carrying its input when the
/// input does not fit in env (always, in indexed mode). The ConfigMap has the Job's name and
/// is made owned by the Job when created, so it is garbage-collected with it.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedJob {
    pub job: Job,
    pub input: Option<ConfigMap>,
}

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    /// A placeholder failed; `path` is the field inside the job template.
    #[error("{path}: {message}")]
    Placeholder { path: String, message: String },
    #[error("{0}")]
    Batch(String),
    /// The Job or its input is larger than the API server accepts.
    #[error("{0}")]
    TooLarge(String),
    #[error("the rendered template is not a valid JobTemplateSpec: {0}")]
    Invalid(String),
    /// The rendered pod breaks its pipeline's pod security level (a placeholder filled a
    /// field the template left open); `path` is the field inside the Job.
    #[error("{path}: {message}")]
    PodSecurity { path: String, message: String },
}

/// What a render needs besides the template and the events.
#[derive(Debug, Clone, Default)]
pub struct TemplateValues {
    /// `params.*` from a `templateRef`.
    pub params: BTreeMap<String, String>,
    /// The level the rendered pod must meet, the one the pipeline was loaded under.
    pub pod_security: pod_security::Level,
}

/// Renders `template` for `events` of `pipeline`: one event in `perEvent` mode, the whole
/// batch in `indexed` mode.
pub fn render_job(
    pipeline: &Pipeline,
    template: &JobTemplateSpec,
    values: &TemplateValues,
    events: &[Event],
) -> Result<RenderedJob, RenderError> {
    let mode = pipeline.spec.fanout.mode;
    match (mode, events.len()) {
        (_, 0) => return Err(RenderError::Batch("no events to render".to_string())),
        (FanOutMode::PerEvent, n) if n > 1 => {
            return Err(RenderError::Batch(format!(
                "perEvent mode renders one event per Job, got {n}"
            )));
        }
        _ => {}
    }
    let namespace = pipeline_namespace(pipeline);
    let pipeline_name = pipeline.metadata.name.clone().unwrap_or_default();
    let ids: Vec<&str> = events.iter().map(Event::id).collect();
    let name = naming::job_name(&namespace, &pipeline_name, &ids);
    let batch = naming::batch_id(&namespace, &pipeline_name, &ids);

    let context = template_context(pipeline, values, events, &batch, mode);
    let raw = serde_json::to_value(template).map_err(|e| RenderError::Invalid(e.to_string()))?;
    let rendered = render_strings(&raw, &context, "")?;
    let mut template: JobTemplateSpec =
        serde_json::from_value(rendered).map_err(|e| RenderError::Invalid(e.to_string()))?;

    let input = job_input(mode, events);
    let mut spec = template.spec.take().unwrap_or_default();
    let ttl_after_reported = shape_job_spec(&mut spec, pipeline, events.len());
    let pod_meta = spec.template.metadata.get_or_insert_with(Default::default);
    add_spate_labels(pod_meta, &pipeline_name, &batch);
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    apply_placement(pod, pipeline);
    pod_security::harden(pod);
    pass_input(pod, &input, &name, &pipeline_name, events);
    if let Some(violation) = pod_security::check(pod, values.pod_security)
        .into_iter()
        .next()
    {
        return Err(RenderError::PodSecurity {
            path: format!("spec.template.spec.{}", violation.path),
            message: violation.message,
        });
    }

    let mut metadata = template.metadata.take().unwrap_or_default();
    metadata.name = Some(name.clone());
    metadata.generate_name = None;
    metadata.namespace = Some(namespace.clone());
    add_spate_labels(&mut metadata, &pipeline_name, &batch);
    let annotations = metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert(
        EVENT_IDS_ANNOTATION.to_string(),
        Value::from(ids.clone()).to_string(),
    );
    annotations.insert(
        SOURCE_ANNOTATION.to_string(),
        pipeline.spec.source.kind().to_string(),
    );
    annotations.insert(TTL_ANNOTATION.to_string(), ttl_after_reported.to_string());

    let input = input.map(|contents| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace),
            labels: metadata.labels.clone(),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(contents.file.to_string(), contents.text)])),
        ..Default::default()
    });
    let rendered = RenderedJob {
        job: Job {
            metadata,
            spec: Some(spec),
            status: None,
        },
        input,
    };
    check_limits(&rendered, events)?;
    Ok(rendered)
}

/// One Job's share of a batch: the events it carries, as a range of the batch, and its Job.
#[derive(Debug)]
pub struct Part {
    pub events: Range<usize>,
    pub job: Result<RenderedJob, RenderError>,
}

/// Renders `events` as as many Jobs as the API server's size limits require (in `indexed`
/// mode; one event is one Job in `perEvent` mode). The split depends only on the events and
/// their order, so the same batch always becomes the same Jobs. An event too large for any
/// Job is a part of its own whose render says why.
pub fn render_parts(
    pipeline: &Pipeline,
    template: &JobTemplateSpec,
    values: &TemplateValues,
    events: &[Event],
) -> Vec<Part> {
    let mut parts = Vec::new();
    for range in split_by_size(template, events) {
        render_fitting(pipeline, template, values, events, range, &mut parts);
    }
    parts
}

/// Renders `events[range]`, halving it until each half fits: the split's estimate cannot see
/// what placeholders expand to.
fn render_fitting(
    pipeline: &Pipeline,
    template: &JobTemplateSpec,
    values: &TemplateValues,
    events: &[Event],
    range: Range<usize>,
    parts: &mut Vec<Part>,
) {
    match render_job(pipeline, template, values, &events[range.clone()]) {
        Err(RenderError::TooLarge(_)) if range.len() > 1 => {
            let middle = range.start + range.len() / 2;
            render_fitting(
                pipeline,
                template,
                values,
                events,
                range.start..middle,
                parts,
            );
            render_fitting(pipeline, template, values, events, middle..range.end, parts);
        }
        job => parts.push(Part { events: range, job }),
    }
}

/// Consecutive ranges of `events`, each as long as its ids fit the Job's annotations, its
/// items the ConfigMap, and both objects the request body limit.
fn split_by_size(template: &JobTemplateSpec, events: &[Event]) -> Vec<Range<usize>> {
    let template_annotations = template
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.annotations.as_ref())
        .map_or(0, |annotations| {
            annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
        });
    let template_body = serde_json::to_vec(template).map_or(0, |body| body.len());
    let fixed_annotations = template_annotations
        + EVENT_IDS_ANNOTATION.len()
        + SOURCE_ANNOTATION.len()
        + TTL_ANNOTATION.len()
        + WANTED_PARALLELISM_ANNOTATION.len()
        + SPLIT_MARGIN_BYTES;
    let ids_room = MAX_ANNOTATIONS_BYTES.saturating_sub(fixed_annotations);
    let items_room = MAX_CONFIG_MAP_BYTES.saturating_sub(SPLIT_MARGIN_BYTES);
    let job_body_room = MAX_REQUEST_BYTES.saturating_sub(template_body + SPLIT_MARGIN_BYTES);
    let input_body_room = MAX_REQUEST_BYTES.saturating_sub(SPLIT_MARGIN_BYTES);
    let mut ranges = Vec::new();
    let mut start = 0;
    let (mut ids, mut items, mut job_body, mut input_body) = (2, 2, 2, 2);
    for (at, event) in events.iter().enumerate() {
        let id = Value::from(event.id()).to_string();
        let item = event.to_json().to_string();
        // Each list separator is a comma; inside a request body the JSON text of the
        // annotation and of items.json is itself a string, so quotes and backslashes double.
        let cost = (
            id.len() + 1,
            item.len() + 1,
            escaped_len(&id) + 1,
            escaped_len(&item) + 1,
        );
        let fits = ids + cost.0 <= ids_room
            && items + cost.1 <= items_room
            && job_body + cost.2 <= job_body_room
            && input_body + cost.3 <= input_body_room;
        if !fits && at > start {
            ranges.push(start..at);
            start = at;
            (ids, items, job_body, input_body) = (2, 2, 2, 2);
        }
        ids += cost.0;
        items += cost.1;
        job_body += cost.2;
        input_body += cost.3;
    }
    if start < events.len() {
        ranges.push(start..events.len());
    }
    ranges
}

/// The length of `text` written as a JSON string, without its quotes.
fn escaped_len(text: &str) -> usize {
    text.len() + text.bytes().filter(|b| matches!(b, b'"' | b'\\')).count()
}

/// Refuses a Job the API server would refuse for its size, saying which limit and why.
fn check_limits(rendered: &RenderedJob, events: &[Event]) -> Result<(), RenderError> {
    let what = match events {
        [event] => format!("event {}", event.id()),
        _ => format!("the {} events of this Job", events.len()),
    };
    let kib = |bytes: usize| bytes.div_ceil(1024);
    let annotations: usize = rendered
        .job
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    if annotations > MAX_ANNOTATIONS_BYTES {
        return Err(RenderError::TooLarge(format!(
            "the annotations of the Job for {what} take {} KiB, more than the {} KiB the API \
             server allows (the ids of its events are one of them, {EVENT_IDS_ANNOTATION}); \
             use shorter event ids or a smaller template",
            kib(annotations),
            MAX_ANNOTATIONS_BYTES / 1024
        )));
    }
    if let Some(input) = &rendered.input {
        let data: usize = input
            .data
            .iter()
            .flatten()
            .map(|(key, value)| key.len() + value.len())
            .sum();
        if data > MAX_CONFIG_MAP_BYTES {
            return Err(RenderError::TooLarge(format!(
                "{what} takes {} KiB, more than a ConfigMap holds ({} KiB); send smaller \
                 events (e.g. a reference to the data, not the data)",
                kib(data),
                MAX_CONFIG_MAP_BYTES / 1024
            )));
        }
    }
    let bodies = [
        serde_json::to_vec(&rendered.job).map_err(|e| RenderError::Invalid(e.to_string()))?,
        match &rendered.input {
            Some(input) => {
                serde_json::to_vec(input).map_err(|e| RenderError::Invalid(e.to_string()))?
            }
            None => Vec::new(),
        },
    ];
    if let Some(body) = bodies
        .iter()
        .map(Vec::len)
        .find(|len| *len > MAX_REQUEST_BYTES)
    {
        return Err(RenderError::TooLarge(format!(
            "the Job for {what} takes {} KiB as a request, more than the {} KiB the API \
             server accepts; use a smaller template or smaller events",
            kib(body),
            MAX_REQUEST_BYTES / 1024
        )));
    }
    Ok(())
}

pub fn pipeline_namespace(pipeline: &Pipeline) -> String {
    pipeline
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string())
}

fn template_context(
    pipeline: &Pipeline,
    values: &TemplateValues,
    events: &[Event],
    batch: &str,
    mode: FanOutMode,
) -> Value {
    let mut context = json!({
        "pipeline": {
            "name": pipeline.metadata.name.clone().unwrap_or_default(),
            "namespace": pipeline_namespace(pipeline),
        },
        "batch": {"id": batch, "size": events.len()},
        "params": values.params,
    });
    if let (FanOutMode::PerEvent, [event]) = (mode, events) {
        context["event"] = event.to_json();
    }
    context
}

/// Renders every string containing a placeholder, keeping the structure exactly as parsed.
fn render_strings(value: &Value, context: &Value, path: &str) -> Result<Value, RenderError> {
    Ok(match value {
        Value::String(text) if has_placeholder(text) => {
            Value::String(render_text(text, context).map_err(|message| {
                RenderError::Placeholder {
                    path: path.to_string(),
                    message,
                }
            })?)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| render_strings(item, context, &join_index(path, i)))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (key, item) in map {
                out.insert(
                    key.clone(),
                    render_strings(item, context, &join_key(path, key))?,
                );
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

pub fn has_placeholder(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

static ENVIRONMENT: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // A template naming a field the event lacks is an error, never an empty string.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
});

/// Every `event.*`, `params.*`, `pipeline.*` and `batch.*` reference in a template's strings.
pub fn template_references(template: &Value) -> Vec<String> {
    match template {
        Value::String(text) => dotted_references(text),
        Value::Array(items) => items.iter().flat_map(template_references).collect(),
        Value::Object(map) => map.values().flat_map(template_references).collect(),
        _ => Vec::new(),
    }
}

/// Renders one string. Errors name the missing field when a reference cannot be resolved.
fn render_text(text: &str, context: &Value) -> Result<String, String> {
    if let Some(message) = first_unresolved_reference(text, context) {
        return Err(message);
    }
    ENVIRONMENT
        .render_str(text, minijinja::value::Serde(context))
        .map_err(|error| match error.detail() {
            Some(detail) => format!("{}: {detail}", error.kind()),
            None => error.kind().to_string(),
        })
}

/// Finds the first `event.a.b` / `params.x` reference the context cannot resolve, to say
/// which field is missing rather than minijinja's generic "undefined value".
fn first_unresolved_reference(text: &str, context: &Value) -> Option<String> {
    for reference in dotted_references(text) {
        let mut parts = reference.split('.');
        let Some(root) = parts.next() else { continue };
        let Some(mut current) = context.get(root) else {
            if root == "event" {
                return Some(
                    "`event` is not available in indexed mode: one Job serves a whole batch; \
                     each pod reads its item from the JSON list in $SPATE_ITEMS_FILE at index \
                     $JOB_COMPLETION_INDEX"
                        .to_string(),
                );
            }
            continue;
        };
        let mut walked = root.to_string();
        for part in parts {
            match current.get(part) {
                Some(next) => {
                    current = next;
                    walked = format!("{walked}.{part}");
                }
                None => {
                    let available: Vec<&str> = current
                        .as_object()
                        .map(|m| m.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let what = if root == "params" {
                        "template parameter".to_string()
                    } else {
                        format!("field of `{walked}`")
                    };
                    let has = if available.is_empty() {
                        String::new()
                    } else {
                        format!(" (it has: {})", available.join(", "))
                    };
                    return Some(format!("`{reference}`: no {what} named `{part}`{has}"));
                }
            }
        }
    }
    None
}

/// `event.key`, `params.width`, … as written inside `{{ }}` and `{% %}` blocks.
fn dotted_references(text: &str) -> Vec<String> {
    let mut references = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(['{']) {
        rest = &rest[start + 1..];
        let close = match rest.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => continue,
        };
        // The closer is looked for after the opener's second character: in `{%}` the `%` that
        // opens the block would otherwise also be the start of the `%}` that closes it.
        let body = &rest[1..];
        let Some(end) = body.find(close) else { break };
        let block = &body[..end];
        rest = &body[end..];
        let mut current = String::new();
        for c in block.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                current.push(c);
            } else {
                let token = current.trim_matches('.');
                if token.contains('.')
                    && ["event.", "params.", "pipeline.", "batch."]
                        .iter()
                        .any(|root| token.starts_with(root))
                {
                    references.push(token.to_string());
                }
                current.clear();
            }
        }
    }
    references
}

/// The input file, when the events do not travel in env.
struct InputFile {
    file: &'static str,
    text: String,
}

fn job_input(mode: FanOutMode, events: &[Event]) -> Option<InputFile> {
    let (file, text) = match (mode, events) {
        (FanOutMode::PerEvent, [event]) => {
            let text = event.to_json().to_string();
            if text.len() <= MAX_ENV_EVENT_BYTES {
                return None;
            }
            ("event.json", text)
        }
        _ => (
            "items.json",
            Value::from(events.iter().map(Event::to_json).collect::<Vec<_>>()).to_string(),
        ),
    };
    Some(InputFile { file, text })
}

/// Fills in what the pipeline decides, and returns the TTL for [`TTL_ANNOTATION`]: the
/// template's own, else the pipeline's.
fn shape_job_spec(spec: &mut JobSpec, pipeline: &Pipeline, events: usize) -> i32 {
    let fanout = &pipeline.spec.fanout;
    let ttl_after_reported = spec
        .ttl_seconds_after_finished
        .take()
        .unwrap_or(pipeline.spec.ttl_seconds_after_finished);
    spec.backoff_limit
        .get_or_insert(pipeline.spec.retry.backoff_limit);
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    pod.restart_policy
        .get_or_insert_with(|| "Never".to_string());
    match fanout.mode {
        FanOutMode::PerEvent => {
            spec.completions.get_or_insert(1);
            spec.parallelism.get_or_insert(1);
        }
        FanOutMode::Indexed => {
            let completions = i32::try_from(events).unwrap_or(i32::MAX);
            let budget = i32::try_from(fanout.max_parallelism).unwrap_or(i32::MAX);
            spec.completion_mode = Some("Indexed".to_string());
            spec.completions = Some(completions);
            spec.parallelism = Some(
                completions
                    .min(budget)
                    .min(spec.parallelism.unwrap_or(i32::MAX)),
            );
        }
    }
    ttl_after_reported
}

fn add_spate_labels(metadata: &mut ObjectMeta, pipeline: &str, batch: &str) {
    let labels = metadata.labels.get_or_insert_with(Default::default);
    for value in labels.values_mut() {
        *value = naming::sanitize_label_value(value);
    }
    labels.insert(
        PIPELINE_LABEL.to_string(),
        naming::sanitize_label_value(pipeline),
    );
    labels.insert(BATCH_LABEL.to_string(), batch.to_string());
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        "spate".to_string(),
    );
}

/// The virtual-kubelet toleration every provider's taint is covered by.
pub fn virtual_kubelet_toleration() -> Toleration {
    Toleration {
        key: Some(VIRTUAL_KUBELET_TAINT.to_string()),
        operator: Some("Exists".to_string()),
        effect: Some("NoSchedule".to_string()),
        ..Default::default()
    }
}

fn not_virtual_node() -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: NODE_TYPE_LABEL.to_string(),
        operator: "NotIn".to_string(),
        values: Some(vec![VIRTUAL_KUBELET_NODE_TYPE.to_string()]),
    }
}

/// Adds what `placement` asks for to what the template already says; the template's own
/// tolerations, selectors and affinities are kept.
fn apply_placement(pod: &mut PodSpec, pipeline: &Pipeline) {
    let placement = &pipeline.spec.placement;
    let tolerations = placement
        .tolerations
        .clone()
        .unwrap_or_else(|| vec![virtual_kubelet_toleration()]);
    let tolerate = |pod: &mut PodSpec| {
        let existing = pod.tolerations.get_or_insert_with(Vec::new);
        for toleration in &tolerations {
            if !existing.contains(toleration) {
                existing.push(toleration.clone());
            }
        }
    };
    match placement.mode {
        PlacementMode::Virtual => {
            tolerate(pod);
            let selector = placement.node_selector.clone().unwrap_or_else(|| {
                BTreeMap::from([(
                    NODE_TYPE_LABEL.to_string(),
                    VIRTUAL_KUBELET_NODE_TYPE.to_string(),
                )])
            });
            let existing = pod.node_selector.get_or_insert_with(Default::default);
            for (key, value) in selector {
                existing.entry(key).or_insert(value);
            }
        }
        PlacementMode::Burst => {
            tolerate(pod);
            node_affinity(pod)
                .preferred_during_scheduling_ignored_during_execution
                .get_or_insert_with(Vec::new)
                .push(PreferredSchedulingTerm {
                    weight: 100,
                    preference: NodeSelectorTerm {
                        match_expressions: Some(vec![not_virtual_node()]),
                        match_fields: None,
                    },
                });
        }
        PlacementMode::Regular => {
            // Some providers' virtual nodes carry no taint; a required affinity keeps pods off
            // them all the same.
            let required = node_affinity(pod)
                .required_during_scheduling_ignored_during_execution
                .get_or_insert_with(|| NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm::default()],
                });
            if required.node_selector_terms.is_empty() {
                required
                    .node_selector_terms
                    .push(NodeSelectorTerm::default());
            }
            // Terms are ORed, so the requirement must hold in each of them.
            for term in &mut required.node_selector_terms {
                term.match_expressions
                    .get_or_insert_with(Vec::new)
                    .push(not_virtual_node());
            }
        }
    }
}

fn node_affinity(pod: &mut PodSpec) -> &mut NodeAffinity {
    pod.affinity
        .get_or_insert_with(Affinity::default)
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
}

/// Hands the event (or the batch) to every container: in env when small, else as a file.
fn pass_input(
    pod: &mut PodSpec,
    input: &Option<InputFile>,
    job_name: &str,
    pipeline: &str,
    events: &[Event],
) {
    let mut env = vec![env_var("SPATE_PIPELINE", pipeline)];
    match (input, events) {
        (None, [event]) => {
            env.push(env_var("SPATE_EVENT_ID", event.id()));
            env.push(env_var("SPATE_EVENT", &event.to_json().to_string()));
        }
        (Some(file), [event]) if file.file == "event.json" => {
            env.push(env_var("SPATE_EVENT_ID", event.id()));
            env.push(env_var(
                "SPATE_EVENT_FILE",
                &format!("{INPUT_MOUNT_PATH}/event.json"),
            ));
        }
        _ => {
            env.push(env_var(
                "SPATE_ITEMS_FILE",
                &format!("{INPUT_MOUNT_PATH}/items.json"),
            ));
            env.push(env_var("SPATE_BATCH_SIZE", &events.len().to_string()));
        }
    }
    if input.is_some() {
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: INPUT_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: job_name.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let containers = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    for container in containers {
        add_env(container, &env);
        if input.is_some() {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: INPUT_VOLUME.to_string(),
                    mount_path: INPUT_MOUNT_PATH.to_string(),
                    read_only: Some(true),
                    ..Default::default()
                });
        }
    }
}

fn env_var(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// `SPATE_*` variables are Spate's: they replace a template's variable of the same name.
fn add_env(container: &mut Container, vars: &[EnvVar]) {
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|existing| !vars.iter().any(|var| var.name == existing.name));
    env.extend(vars.iter().cloned());
}

/// Programs that run code given inline, and the flags that give it: the flag's letter in a
/// cluster of short flags (`sh -ec`, `perl -ne`) or the flag as written (`node --eval`).
const INTERPRETERS: &[(&[&str], &[char], &[&str])] = &[
    (
        &["sh", "bash", "dash", "zsh", "ash", "ksh", "mksh", "busybox"],
        &['c'],
        &[],
    ),
    (
        &["python", "python2", "python3", "pypy", "pypy3"],
        &['c'],
        &[],
    ),
    (&["perl"], &['e', 'E'], &[]),
    (&["ruby"], &['e'], &[]),
    (
        &["node", "nodejs", "deno", "bun"],
        &['e', 'p'],
        &["--eval", "--print", "eval"],
    ),
    (&["php"], &['r'], &[]),
    (&["pwsh", "powershell"], &['c'], &["-Command", "-command"]),
    (&["awk", "gawk", "mawk", "jq", "sed"], &[], &[]),
];

/// The name a program is known by: `/usr/bin/python3.12` is `python3`.
fn program_name(word: &str) -> &str {
    let base = word.rsplit('/').next().unwrap_or(word);
    base.split_once('.')
        .filter(|(_, version)| version.chars().all(|c| c.is_ascii_digit()))
        .map_or(base, |(name, _)| name)
}

/// Whether a string of the template reads the event, however it is written: `event.key`,
/// `event['key']`, `event | tojson`, `{% for k in event %}`, `{% set e = event %}{{ e.key }}`.
/// Decided on minijinja's parse of the text; text that does not parse (refused at render)
/// counts as reading it when it names it.
fn reads_event(text: &str) -> bool {
    if !has_placeholder(text) {
        return false;
    }
    match ENVIRONMENT.template_from_str(text) {
        Ok(template) => template.undeclared_variables(false).contains("event"),
        Err(_) => text.contains("event"),
    }
}

/// Template fields that hand event text to an interpreter as code: a container whose command
/// (or args) is `<program> <code flag> <code>` — a shell's `-c`, `python -c`, `perl -e`,
/// `node -e`, `ruby -e`, `php -r`, `pwsh -Command`, or the program text of `awk`, `jq` or
/// `sed` — where the code reads the event. Returns the paths of those code strings. The
/// words after the code are its arguments (`sh -c 'convert "$1"' sh '{{ event.key }}'`),
/// which the code quotes itself, so they may carry event values.
pub fn inline_code_reading_the_event(template: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let pod = &template["spec"]["template"]["spec"];
    for list in ["containers", "initContainers"] {
        let Some(containers) = pod[list].as_array() else {
            continue;
        };
        for (index, container) in containers.iter().enumerate() {
            let base = join_index(&format!("spec.template.spec.{list}"), index);
            let words: Vec<(String, &str)> = ["command", "args"]
                .iter()
                .flat_map(|field| {
                    let base = &base;
                    container[*field]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .enumerate()
                        .filter_map(move |(i, word)| {
                            Some((join_index(&join_key(base, field), i), word.as_str()?))
                        })
                })
                .collect();
            if let Some(path) = code_reading_the_event(&words) {
                found.push(path);
            }
        }
    }
    found
}

/// In one container's words: the path of the inline code that reads the event, if any. The
/// program may come after a wrapper (`env sh -c`, `nice -n 5 bash -c`, `busybox sh -c`).
fn code_reading_the_event(words: &[(String, &str)]) -> Option<String> {
    for (at, (_, word)) in words.iter().enumerate() {
        let name = program_name(word);
        let Some((_, letters, long)) = INTERPRETERS
            .iter()
            .find(|(names, _, _)| names.contains(&name))
        else {
            continue;
        };
        let rest = &words[at + 1..];
        let code = if letters.is_empty() && long.is_empty() {
            // awk, jq, sed: the first word that is not an option is the program.
            rest.iter().find(|(_, w)| !w.starts_with('-'))
        } else {
            let flag = rest.iter().position(|(_, w)| {
                long.contains(w)
                    || (w.len() > 1
                        && w.starts_with('-')
                        && !w.starts_with("--")
                        && w[1..].chars().all(|c| c.is_ascii_alphabetic())
                        && w[1..].contains(|c| letters.contains(&c)))
            });
            flag.and_then(|flag| rest[flag + 1..].iter().find(|(_, w)| !w.starts_with('-')))
        };
        if let Some((path, text)) = code
            && reads_event(text)
        {
            return Some(path.clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_references_a_template_makes() {
        assert_eq!(
            dotted_references("{{ event.key }}-{{ params.width|int }} {% if event.meta.a %}"),
            ["event.key", "params.width", "event.meta.a"]
        );
        assert!(dotted_references("{ not } {{ 1 + 2 }}").is_empty());
    }

    #[test]
    fn a_block_opener_next_to_its_closer_is_refused_not_a_panic() {
        // Found by the template_render fuzz target: `{%}` made the block's end come before
        // its start, and slicing it panicked in `spate validate` and in the controller.
        assert!(dotted_references("{%}}/{{ pipeline.name }}").is_empty());
        let context = json!({"event": {"id": "1"}, "pipeline": {"name": "p"}});
        for text in ["{%}", "{%}}/{{ pipeline.name }}", "a{%}{{ event.id }}"] {
            assert!(render_text(text, &context).is_err(), "{text}");
        }
        assert_eq!(
            template_references(&json!({"args": ["{%}", "{{ event.key }}"]})),
            ["event.key"]
        );
    }

    #[test]
    fn a_missing_field_is_named_with_what_the_event_has() {
        let context = json!({"event": {"id": "1", "key": "a.jpg"}});
        let message = render_text("{{ event.bucket }}", &context).unwrap_err();
        assert!(
            message.contains("no field of `event` named `bucket`"),
            "{message}"
        );
        assert!(message.contains("it has: id, key"), "{message}");
        assert_eq!(
            render_text("x-{{ event.key }}", &context).unwrap(),
            "x-a.jpg"
        );
    }

    #[test]
    fn event_text_is_data_even_when_it_looks_like_a_template() {
        let context = json!({"event": {"id": "1", "key": "{{ pipeline.name }}; rm -rf /"}});
        assert_eq!(
            render_text("{{ event.key }}", &context).unwrap(),
            "{{ pipeline.name }}; rm -rf /"
        );
    }

    fn render_webhook(pod_spec: &str) -> PodSpec {
        let yaml = format!(
            "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: hooks\nspec:\n  source:\n    webhook:\n      path: /hooks/x\n      auth: {{none: {{}}}}\n  jobTemplate:\n    spec:\n      template:\n        spec:\n{pod_spec}"
        );
        let loaded = crate::pipeline::load_str(&yaml, "p.yaml")
            .unwrap_or_else(|e| panic!("{e:#?}"))
            .remove(0);
        let event = Event::from_json(json!({"id": "e1", "data": {}})).unwrap();
        let rendered =
            render_job(&loaded.pipeline, &loaded.template, &loaded.values, &[event]).unwrap();
        rendered.job.spec.unwrap().template.spec.unwrap()
    }

    fn indexed_pipeline() -> crate::pipeline::LoadedPipeline {
        let yaml = "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: bulk\nspec:\n  source:\n    webhook:\n      path: /hooks/bulk\n      auth: {none: {}}\n  fanout: {mode: indexed, batchSize: 100000, maxParallelism: 50}\n  jobTemplate:\n    metadata:\n      annotations: {team: imaging}\n    spec:\n      template:\n        spec:\n          containers: [{name: work, image: busybox}]\n";
        crate::pipeline::load_str(yaml, "p.yaml")
            .unwrap_or_else(|e| panic!("{e:#?}"))
            .remove(0)
    }

    /// `count` events with 64-character ids and `payload` bytes of data each.
    fn events_with_long_ids(count: usize, payload: usize) -> Vec<Event> {
        (0..count)
            .map(|i| {
                Event::from_json(
                    json!({"id": format!("{i:064}"), "data": {"blob": "x".repeat(payload)}}),
                )
                .unwrap()
            })
            .collect()
    }

    fn annotations_bytes(job: &Job) -> usize {
        job.metadata
            .annotations
            .iter()
            .flatten()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    fn input_bytes(rendered: &RenderedJob) -> usize {
        rendered
            .input
            .iter()
            .flat_map(|input| input.data.iter().flatten())
            .map(|(key, value)| key.len() + value.len())
            .sum()
    }

    #[test]
    fn a_job_the_api_server_would_refuse_for_its_size_is_not_rendered() {
        let loaded = indexed_pipeline();
        // 3,950 ids of 64 characters: 264,650 bytes of ids, over the 262,144 the API server
        // allows for all annotations together.
        let events = events_with_long_ids(3950, 0);
        match render_job(&loaded.pipeline, &loaded.template, &loaded.values, &events) {
            Err(RenderError::TooLarge(message)) => {
                assert!(message.contains("annotations"), "{message}")
            }
            Ok(rendered) => panic!(
                "rendered a Job with {} bytes of annotations",
                annotations_bytes(&rendered.job)
            ),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn a_large_batch_is_split_into_jobs_that_fit_and_the_same_batch_splits_alike() {
        let loaded = indexed_pipeline();
        let render = |events: &[Event]| {
            render_parts(&loaded.pipeline, &loaded.template, &loaded.values, events)
        };
        // The annotation limit binds first for small events, the ConfigMap's for larger ones.
        for (count, payload) in [(3950, 0), (4500, 200), (20_000, 0)] {
            let events = events_with_long_ids(count, payload);
            let parts = render(&events);
            assert!(parts.len() > 1, "{count} events in one Job");
            let mut next = 0;
            for part in &parts {
                assert_eq!(part.events.start, next, "parts cover the batch in order");
                next = part.events.end;
                let rendered = part.job.as_ref().unwrap();
                assert!(annotations_bytes(&rendered.job) <= MAX_ANNOTATIONS_BYTES);
                assert!(input_bytes(rendered) <= MAX_CONFIG_MAP_BYTES);
                assert!(serde_json::to_vec(&rendered.job).unwrap().len() <= MAX_REQUEST_BYTES);
                let spec = rendered.job.spec.as_ref().unwrap();
                assert_eq!(spec.completions, Some(part.events.len() as i32));
            }
            assert_eq!(next, count);
            let names = |parts: &[Part]| -> Vec<String> {
                parts
                    .iter()
                    .map(|p| p.job.as_ref().unwrap().job.metadata.name.clone().unwrap())
                    .collect()
            };
            assert_eq!(names(&parts), names(&render(&events)));
        }
    }

    #[test]
    fn an_event_larger_than_any_job_is_refused_alone_and_its_neighbours_still_run() {
        let loaded = indexed_pipeline();
        let mut events = events_with_long_ids(3, 10);
        events.insert(
            1,
            Event::from_json(json!({"id": "huge", "data": {"blob": "y".repeat(1024 * 1024)}}))
                .unwrap(),
        );
        let parts = render_parts(&loaded.pipeline, &loaded.template, &loaded.values, &events);
        let refused: Vec<&Part> = parts.iter().filter(|p| p.job.is_err()).collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].events, 1..2);
        let Err(RenderError::TooLarge(message)) = &refused[0].job else {
            panic!("{:?}", refused[0].job)
        };
        assert!(
            message.contains("event huge") && message.contains("more than a ConfigMap holds"),
            "{message}"
        );
        let carried: usize = parts
            .iter()
            .filter(|p| p.job.is_ok())
            .map(|p| p.events.len())
            .sum();
        assert_eq!(carried, 3);
    }

    #[test]
    fn pods_are_restricted_when_the_template_says_nothing() {
        let pod = render_webhook(
            "          initContainers: [{name: fetch, image: busybox}]\n          containers:\n            - {name: work, image: busybox}\n            - name: own\n              image: busybox\n              securityContext: {runAsUser: 1000}\n",
        );
        let security = pod.security_context.unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.seccomp_profile.map(|p| p.type_).as_deref(),
            Some("RuntimeDefault")
        );
        assert_eq!(security.run_as_user, None);
        let restricted = |container: &Container| {
            let context = container.security_context.clone().unwrap();
            assert_eq!(context.allow_privilege_escalation, Some(false));
            assert_eq!(
                context.capabilities.and_then(|c| c.drop),
                Some(vec!["ALL".to_string()])
            );
            // Workers write temporary files.
            assert_eq!(context.read_only_root_filesystem, None);
        };
        restricted(&pod.containers[0]);
        restricted(&pod.init_containers.as_ref().unwrap()[0]);
        // A container's own securityContext keeps what it wrote and gets the rest.
        let own = pod.containers[1].security_context.clone().unwrap();
        assert_eq!(own.run_as_user, Some(1000));
        assert_eq!(own.allow_privilege_escalation, Some(false));
        assert_eq!(own.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    }

    #[test]
    fn a_template_with_its_own_pod_security_context_gets_the_defaults_it_does_not_set() {
        let pod = render_webhook(
            "          securityContext: {runAsUser: 1000, fsGroup: 2000}\n          containers:\n            - {name: work, image: busybox}\n",
        );
        let security = pod.security_context.unwrap();
        assert_eq!(security.run_as_user, Some(1000));
        assert_eq!(security.fs_group, Some(2000));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let own = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(own.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn a_rendered_pod_that_breaks_its_level_is_refused_naming_the_field() {
        let yaml = "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: hooks\nspec:\n  source:\n    webhook:\n      path: /hooks/x\n      auth: {none: {}}\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers:\n            - name: work\n              image: busybox\n              securityContext: {capabilities: {add: [\"{{ event.data.cap }}\"]}}\n";
        let loaded = crate::pipeline::load_str(yaml, "p.yaml")
            .unwrap_or_else(|e| panic!("{e:#?}"))
            .remove(0);
        let render = |cap: &str| {
            let event = Event::from_json(json!({"id": "e1", "data": {"cap": cap}})).unwrap();
            render_job(&loaded.pipeline, &loaded.template, &loaded.values, &[event])
        };
        assert!(render("NET_BIND_SERVICE").is_ok());
        let error = render("SYS_ADMIN").unwrap_err();
        assert_eq!(
            error,
            RenderError::PodSecurity {
                path: "spec.template.spec.containers[0].securityContext.capabilities.add[0]"
                    .to_string(),
                message: "adding `SYS_ADMIN` is not allowed under the `restricted` pod security \
                          level"
                    .to_string(),
            }
        );
    }

    fn inline_code_of(command: &[&str]) -> Vec<String> {
        inline_code_reading_the_event(&json!({"spec": {"template": {"spec": {
            "initContainers": [{"name": "i", "command": command}]
        }}}}))
    }

    #[test]
    fn inline_code_may_not_read_the_event_however_it_is_written() {
        for (command, code_at) in [
            (vec!["/bin/sh", "-c", "convert {{ event.key }}"], 2),
            (vec!["sh", "-c", "x {{ event }}"], 2),
            (vec!["sh", "-c", "x {{ event['key'] }}"], 2),
            (vec!["sh", "-c", "x {{ event | tojson }}"], 2),
            (vec!["sh", "-c", "{% set e = event %}x {{ e.key }}"], 2),
            (
                vec!["sh", "-c", "{% for k in event %}{{ k }}{% endfor %}"],
                2,
            ),
            (vec!["env", "bash", "-lc", "x {{ event.key }}"], 3),
            (vec!["busybox", "sh", "-euxc", "x {{ event.key }}"], 3),
            (vec!["nice", "-n", "5", "dash", "-c", "{{ event.key }}"], 5),
            (vec!["python3", "-c", "print('{{ event.key }}')"], 2),
            (
                vec!["/usr/bin/python3.12", "-c", "print('{{ event.key }}')"],
                2,
            ),
            (vec!["perl", "-ne", "print '{{ event.key }}'"], 2),
            (vec!["node", "--eval", "console.log('{{ event.key }}')"], 2),
            (vec!["node", "-e", "x('{{ event.key }}')"], 2),
            (vec!["ruby", "-e", "puts '{{ event.key }}'"], 2),
            (vec!["php", "-r", "echo '{{ event.key }}';"], 2),
            (
                vec!["pwsh", "-Command", "Write-Output '{{ event.key }}'"],
                2,
            ),
            (vec!["awk", "-F:", "{ print \"{{ event.key }}\" }"], 2),
            (vec!["jq", "-r", ".[\"{{ event.key }}\"]"], 2),
            (vec!["sh", "-c", "x {% if event %}y{% endif %"], 2),
        ] {
            assert_eq!(
                inline_code_of(&command),
                [format!(
                    "spec.template.spec.initContainers[0].command[{code_at}]"
                )],
                "{command:?}"
            );
        }
    }

    #[test]
    fn event_values_outside_inline_code_are_allowed() {
        for command in [
            vec!["convert", "{{ event.key }}", "out.jpg"],
            vec!["bash", "-c", "echo \"$KEY\""],
            // The script quotes its argument: the event's text is never parsed as code.
            vec![
                "sh",
                "-c",
                "convert \"$1\" out.jpg",
                "sh",
                "{{ event.key }}",
            ],
            vec!["python3", "/app/run.py", "{{ event.key }}"],
            vec!["sh", "-c", "echo {{ params.size }} {{ pipeline.name }}"],
            vec!["shasum", "-c", "{{ event.key }}"],
        ] {
            assert!(inline_code_of(&command).is_empty(), "{command:?}");
        }
        // A container's command and args are one command line.
        let split = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "c", "command": ["bash"], "args": ["-c", "x {{ event.key }}"]},
        ]}}}});
        assert_eq!(
            inline_code_reading_the_event(&split),
            ["spec.template.spec.containers[0].args[1]"]
        );
    }
}
