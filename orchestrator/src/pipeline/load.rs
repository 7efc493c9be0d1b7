//! Loading pipeline files, with every mistake reported at its field and line.
//!
//! A document goes through five checks, each reporting all it finds: YAML syntax, the
//! resource header (`apiVersion`, `kind`, `metadata`), the CRD schema (types, unknown
//! fields, required fields, one-of kinds), semantic rules serde cannot express (durations,
//! cron expressions, URLs, ranges, exclusive fields), and a trial render of the Job template
//! with a sample event of the source's kind, so that a placeholder naming a field the event
//! will not have is caught before any event arrives.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use kube::CustomResourceExt;
use serde_json::{Value, json};
use spate_sources::Event;

use super::located::{Location, join_key, parse_documents};
use super::schema::{self, Violation};
use super::spec::*;
use crate::naming;
use crate::pod_security;
use crate::render::{self, TemplateValues};
use crate::templates;

pub const API_VERSION: &str = "spate.dev/v1alpha1";

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub location: Option<Location>,
    /// The field path, e.g. `spec.fanout.batchSize`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(Location { line, column }) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A pipeline that passed every check, with its Job template resolved.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub pipeline: Pipeline,
    /// `spec.jobTemplate`, or the template `spec.templateRef` names.
    pub template: JobTemplateSpec,
    pub values: TemplateValues,
}

/// Reads and checks every pipeline in a file, its pods against the `restricted` pod security
/// level.
pub fn load_file(path: &Path) -> Result<Vec<LoadedPipeline>, Vec<Diagnostic>> {
    load_file_with(path, &pod_security::Policy::default())
}

/// Reads and checks every pipeline in a file, its pods against the level `policy` gives its
/// namespace (the default level for a pipeline that names none).
pub fn load_file_with(
    path: &Path,
    policy: &pod_security::Policy,
) -> Result<Vec<LoadedPipeline>, Vec<Diagnostic>> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => load_str_with(&text, &file, policy),
        Err(error) => Err(vec![Diagnostic {
            file,
            location: None,
            path: String::new(),
            message: format!("cannot read the file: {error}"),
        }]),
    }
}

/// Reads and checks every pipeline in `text`; `file` names it in diagnostics. Pods are checked
/// against the `restricted` pod security level.
pub fn load_str(text: &str, file: &str) -> Result<Vec<LoadedPipeline>, Vec<Diagnostic>> {
    load_str_with(text, file, &pod_security::Policy::default())
}

/// [`load_str`], with pods checked against the level `policy` gives each pipeline's namespace.
pub fn load_str_with(
    text: &str,
    file: &str,
    policy: &pod_security::Policy,
) -> Result<Vec<LoadedPipeline>, Vec<Diagnostic>> {
    let documents = parse_documents(text).map_err(|error| {
        vec![Diagnostic {
            file: file.to_string(),
            location: Some(error.location),
            path: String::new(),
            message: format!("invalid YAML: {}", error.message),
        }]
    })?;
    if documents.is_empty() {
        return Err(vec![Diagnostic {
            file: file.to_string(),
            location: None,
            path: String::new(),
            message: "the file holds no pipeline".to_string(),
        }]);
    }
    let mut loaded = Vec::new();
    let mut diagnostics = Vec::new();
    for document in &documents {
        match check_value(&document.value, policy) {
            Ok(pipeline) => loaded.push(pipeline),
            Err(problems) => {
                diagnostics.extend(problems.into_iter().map(|(path, message)| Diagnostic {
                    file: file.to_string(),
                    location: document.locations.find(&path),
                    path,
                    message,
                }))
            }
        }
    }
    if diagnostics.is_empty() {
        Ok(loaded)
    } else {
        diagnostics.sort_by_key(|d| d.location);
        Err(diagnostics)
    }
}

type Problems = Vec<(String, String)>;

/// Checks a Pipeline read from the cluster; problems are `field path: message` lines, as
/// the controller reports them in the Pipeline's status.
pub fn check_resource(pipeline: &Pipeline) -> Result<LoadedPipeline, Vec<String>> {
    check_resource_with(pipeline, &pod_security::Policy::default())
}

/// [`check_resource`], with pods checked against the level `policy` gives its namespace.
pub fn check_resource_with(
    pipeline: &Pipeline,
    policy: &pod_security::Policy,
) -> Result<LoadedPipeline, Vec<String>> {
    let value = serde_json::to_value(pipeline).map_err(|e| vec![e.to_string()])?;
    check_value(&value, policy).map_err(|problems| {
        problems
            .into_iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect()
    })
}

fn check_value(value: &Value, policy: &pod_security::Policy) -> Result<LoadedPipeline, Problems> {
    let mut problems = check_header(value);
    let mut violations = Vec::new();
    match value.get("spec") {
        Some(spec) => schema::check(spec, &SPEC_SCHEMA, "spec", &mut violations),
        None => problems.push((
            "spec".to_string(),
            "missing required field `spec`".to_string(),
        )),
    }
    problems.extend(
        violations
            .into_iter()
            .map(|Violation { path, message }| (path, message)),
    );
    if !problems.is_empty() {
        return Err(problems);
    }
    let pipeline: Pipeline = serde_json::from_value(value.clone())
        .map_err(|error| vec![("spec".to_string(), error.to_string())])?;
    let mut problems = check_semantics(&pipeline.spec);
    let level = policy.level_for(pipeline.metadata.namespace.as_deref().unwrap_or_default());
    let resolved = resolve_template(&pipeline, level, &mut problems);
    if let Some((template, values)) = &resolved
        && problems.is_empty()
    {
        check_trial_render(&pipeline, template, values, &mut problems);
    }
    match resolved {
        Some((template, values)) if problems.is_empty() => Ok(LoadedPipeline {
            pipeline,
            template,
            values,
        }),
        _ => Err(problems),
    }
}

/// The spec's whole schema, the pod template's included (the installed CRD stops short of
/// it: see [`super::crd`]).
static SPEC_SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    serde_json::to_value(Pipeline::crd())
        .ok()
        .and_then(|crd| {
            crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
                .cloned()
        })
        .unwrap_or(Value::Null)
});

const METADATA_FIELDS: [&str; 12] = [
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
];

fn check_header(value: &Value) -> Problems {
    let mut problems = Vec::new();
    let Some(document) = value.as_object() else {
        return vec![(
            String::new(),
            "a pipeline must be a mapping with apiVersion, kind, metadata and spec".to_string(),
        )];
    };
    match value.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => problems.push((
            "apiVersion".to_string(),
            format!("must be `{API_VERSION}`, got `{other}`"),
        )),
        None => problems.push((
            "apiVersion".to_string(),
            format!("missing required field `apiVersion` (`{API_VERSION}`)"),
        )),
    }
    match value.get("kind").and_then(Value::as_str) {
        Some("Pipeline") => {}
        Some(other) => problems.push((
            "kind".to_string(),
            format!("must be `Pipeline`, got `{other}`"),
        )),
        None => problems.push((
            "kind".to_string(),
            "missing required field `kind` (`Pipeline`)".to_string(),
        )),
    }
    for key in document.keys() {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
            problems.push((
                join_key("", key),
                format!("unknown field `{key}`; expected apiVersion, kind, metadata, spec"),
            ));
        }
    }
    let Some(metadata) = value.get("metadata").and_then(Value::as_object) else {
        problems.push((
            "metadata".to_string(),
            "missing required field `metadata` with a `name`".to_string(),
        ));
        return problems;
    };
    for key in metadata.keys() {
        if !METADATA_FIELDS.contains(&key.as_str()) {
            problems.push((
                join_key("metadata", key),
                format!("unknown field `{key}` in metadata"),
            ));
        }
    }
    match metadata.get("name") {
        Some(Value::String(name)) if naming::is_dns1123_label(name) => {}
        Some(Value::String(name)) => problems.push((
            "metadata.name".to_string(),
            format!(
                "`{name}` is not a valid name: use at most 63 lowercase letters, digits and \
                 `-`, starting and ending with a letter or digit"
            ),
        )),
        Some(other) if !other.is_null() => problems.push((
            "metadata.name".to_string(),
            format!("must be a string (a DNS-1123 label), got {other}; quote it"),
        )),
        _ => problems.push((
            "metadata.name".to_string(),
            "missing required field `name`".to_string(),
        )),
    }
    if let Some(namespace) = metadata.get("namespace")
        && !namespace.as_str().is_some_and(naming::is_dns1123_label)
    {
        problems.push((
            "metadata.namespace".to_string(),
            format!("{namespace} is not a valid namespace name"),
        ));
    }
    for field in ["labels", "annotations"] {
        if let Some(map) = metadata.get(field).and_then(Value::as_object) {
            for (key, item) in map {
                if !item.is_string() {
                    problems.push((
                        join_key(&join_key("metadata", field), key),
                        format!("{field} values must be strings; quote it: \"{item}\""),
                    ));
                }
            }
        }
    }
    problems
}

fn check_semantics(spec: &PipelineSpec) -> Problems {
    let mut problems = spate_sources::check::Problems::new();
    let fanout = &spec.fanout;
    problems.duration("spec.fanout.maxWait", &fanout.max_wait);
    if fanout.batch_size == 0 || fanout.batch_size > 100_000 {
        problems.push(
            "spec.fanout.batchSize",
            format!(
                "must be between 1 and 100000 (the most completions an Indexed Job may have), \
                 got {}",
                fanout.batch_size
            ),
        );
    }
    if fanout.max_parallelism == 0 {
        problems.push("spec.fanout.maxParallelism", "must be at least 1 pod");
    }
    if !(fanout.max_jobs_per_second.is_finite() && fanout.max_jobs_per_second > 0.0) {
        problems.push(
            "spec.fanout.maxJobsPerSecond",
            format!(
                "must be a positive number, got {}",
                fanout.max_jobs_per_second
            ),
        );
    }
    if fanout.burst == 0 {
        problems.push("spec.fanout.burst", "must be at least 1");
    }
    if spec.ttl_seconds_after_finished < 0 {
        problems.push("spec.ttlSecondsAfterFinished", "must be 0 or more seconds");
    }

    let retry = &spec.retry;
    if retry.backoff_limit < 0 {
        problems.push("spec.retry.backoffLimit", "must be 0 or more");
    }
    if retry.max_attempts == 0 {
        problems.push("spec.retry.maxAttempts", "must be at least 1");
    }
    let initial = problems.duration("spec.retry.initialBackoff", &retry.initial_backoff);
    let max = problems.duration("spec.retry.maxBackoff", &retry.max_backoff);
    if let (Some(initial), Some(max)) = (initial, max)
        && initial > max
    {
        problems.push(
            "spec.retry.initialBackoff",
            format!(
                "`{}` is longer than maxBackoff `{}`",
                retry.initial_backoff, retry.max_backoff
            ),
        );
    }
    problems.duration("spec.retry.pendingTimeout", &retry.pending_timeout);

    spec.source.validate("spec.source", &mut problems);
    if let Some(sink) = &spec.sinks.dead_letter {
        sink.validate("spec.sinks.deadLetter", &mut problems);
    }
    for (index, sink) in spec.sinks.results.iter().enumerate() {
        sink.validate(&format!("spec.sinks.results[{index}]"), &mut problems);
    }
    problems.into_vec()
}

fn resolve_template(
    pipeline: &Pipeline,
    level: pod_security::Level,
    problems: &mut Problems,
) -> Option<(JobTemplateSpec, TemplateValues)> {
    let spec = &pipeline.spec;
    let (template, values, base) = match (&spec.job_template, &spec.template_ref) {
        (Some(_), Some(_)) => {
            problems.push((
                "spec.templateRef".to_string(),
                "set either jobTemplate or templateRef, not both".to_string(),
            ));
            return None;
        }
        (None, None) => {
            problems.push((
                "spec.jobTemplate".to_string(),
                format!(
                    "missing required field: set jobTemplate, or templateRef naming one of: {}",
                    templates::BUILTIN.map(|(name, _)| name).join(", ")
                ),
            ));
            return None;
        }
        (Some(template), None) => (template.clone(), BTreeMap::new(), "spec.jobTemplate"),
        (None, Some(reference)) => match templates::resolve(&reference.name, &reference.params) {
            Ok((template, values)) => (template, values, "spec.templateRef"),
            Err(error) => {
                problems.push(("spec.templateRef".to_string(), error.to_string()));
                return None;
            }
        },
    };
    check_pod_template(&template, base, level, problems);
    let raw = serde_json::to_value(&template).unwrap_or(Value::Null);
    for path in render::inline_code_reading_the_event(&raw) {
        problems.push((
            join_template_path(base, &path),
            "event values must not be written into inline code (`sh -c`, `python -c`, `perl \
             -e`, `node -e`, ...): an object named `a; rm -rf /` would run; pass them as env, \
             e.g. `env: [{name: KEY, value: \"{{ event.key }}\"}]`, and use \"$KEY\" in the \
             script, or as an argument after the script (`sh -c 'convert \"$1\"' sh \
             '{{ event.key }}'`)"
                .to_string(),
        ));
    }
    let values = TemplateValues {
        params: values,
        pod_security: level,
    };
    Some((template, values))
}

fn join_template_path(base: &str, path: &str) -> String {
    if base == "spec.jobTemplate" {
        format!("{base}.{path}")
    } else {
        base.to_string()
    }
}

fn check_pod_template(
    template: &JobTemplateSpec,
    base: &str,
    level: pod_security::Level,
    problems: &mut Problems,
) {
    let pod = template
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref());
    let Some(pod) = pod else {
        problems.push((
            format!("{base}.spec.template.spec"),
            "missing the pod spec: a Job template needs spec.template.spec.containers".to_string(),
        ));
        return;
    };
    let path = format!("{base}.spec.template.spec");
    if pod.containers.is_empty() {
        problems.push((
            format!("{path}.containers"),
            "a Job needs at least one container".to_string(),
        ));
    }
    for (index, container) in pod.containers.iter().enumerate() {
        if container.image.as_deref().is_none_or(str::is_empty) {
            problems.push((
                format!("{path}.containers[{index}].image"),
                "missing required field `image`".to_string(),
            ));
        }
    }
    if let Some(policy) = &pod.restart_policy
        && policy != "Never"
        && policy != "OnFailure"
    {
        problems.push((
            format!("{path}.restartPolicy"),
            format!("a Job's pods must use `Never` or `OnFailure`, got `{policy}`"),
        ));
    }
    // As the pod will be: the restricted defaults filled in where the template is silent.
    let mut pod = pod.clone();
    pod_security::harden(&mut pod);
    let written = serde_json::to_value(&pod).unwrap_or(Value::Null);
    for violation in pod_security::check(&pod, level) {
        // A placeholder is judged once it has a value: each rendered pod is checked again.
        if value_at(&written, &violation.path)
            .and_then(Value::as_str)
            .is_some_and(|text| text.contains("{{"))
        {
            continue;
        }
        problems.push((
            join_template_path(base, &format!("spec.template.spec.{}", violation.path)),
            violation.message,
        ));
    }
}

/// The value at a field path such as `containers[0].securityContext.capabilities.add[1]`.
fn value_at<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |value, step| {
        let (field, indexes) = step.split_once('[').unwrap_or((step, ""));
        let mut value = value.get(field)?;
        for index in indexes.split('[') {
            if let Some(index) = index.strip_suffix(']') {
                value = value.get(index.parse::<usize>().ok()?)?;
            }
        }
        Some(value)
    })
}

fn check_trial_render(
    pipeline: &Pipeline,
    template: &JobTemplateSpec,
    values: &TemplateValues,
    problems: &mut Problems,
) {
    let mut sample = pipeline.spec.source.sample_event();
    // Message bodies and headers are free-form: whatever a template reads from them is
    // assumed to be there, since only the producer knows.
    let raw = serde_json::to_value(template).unwrap_or(Value::Null);
    for reference in render::template_references(&raw) {
        fill_free_form(&mut sample, &reference);
    }
    let Ok(event) = Event::from_json(sample) else {
        return;
    };
    let base = if pipeline.spec.template_ref.is_some() {
        "spec.templateRef"
    } else {
        "spec.jobTemplate"
    };
    if let Err(error) = render::render_job(pipeline, template, values, &[event]) {
        match error {
            render::RenderError::Placeholder { path, message } => problems.push((
                join_template_path(base, &path),
                format!(
                    "{message} (checked with a sample {} event)",
                    pipeline.spec.source.kind()
                ),
            )),
            // The sample's values are made up; each real event's pod is checked as rendered.
            render::RenderError::PodSecurity { .. } => {}
            other => problems.push((base.to_string(), other.to_string())),
        }
    }
}

fn fill_free_form(sample: &mut Value, reference: &str) {
    let mut parts = reference.split('.');
    if parts.next() != Some("event") {
        return;
    }
    let parts: Vec<&str> = parts.collect();
    let Some(first) = parts.first() else { return };
    if !matches!(sample.get(*first), Some(Value::Object(_))) || !["data", "headers"].contains(first)
    {
        return;
    }
    let mut current = sample;
    for (index, part) in parts.iter().enumerate() {
        let last = index + 1 == parts.len();
        let Some(map) = current.as_object_mut() else {
            return;
        };
        current = map
            .entry(part.to_string())
            .or_insert_with(|| if last { json!("sample") } else { json!({}) });
    }
}
