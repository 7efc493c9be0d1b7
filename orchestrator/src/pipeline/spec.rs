//! The `Pipeline` custom resource: one source, a fan-out policy, a Job template, a placement
//! and sinks.
//!
//! These types are the single source of truth: the CRD schema (`spate crd`), validation and the
//! field reference in `docs/pipeline.md` all come from them. Defaults live here, next to the
//! field they belong to, and are chosen for real providers (see [`FanOut`]).

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
pub use spate_sinks::SinkConfig;
pub use spate_sources::SourceConfig;

/// Turns events from one source into Kubernetes Jobs on the virtual node.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "spate.dev",
    version = "v1alpha1",
    kind = "Pipeline",
    namespaced,
    status = "PipelineStatus",
    shortname = "pl",
    category = "spate",
    doc = "A Spate pipeline: events from one source become Kubernetes Jobs on the virtual node.",
    printcolumn = r#"{"name": "Source", "type": "string", "jsonPath": ".status.source"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.fanout.mode"}"#,
    printcolumn = r#"{"name": "Running", "type": "integer", "jsonPath": ".status.running"}"#,
    printcolumn = r#"{"name": "Succeeded", "type": "integer", "jsonPath": ".status.succeeded"}"#,
    printcolumn = r#"{"name": "Failed", "type": "integer", "jsonPath": ".status.failed"}"#,
    printcolumn = r#"{"name": "Lag", "type": "integer", "jsonPath": ".status.sourceLag", "priority": 1}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// Where events come from: exactly one source.
    pub source: SourceConfig,
    /// How events become Jobs, and how fast.
    #[serde(default)]
    pub fanout: FanOut,
    /// The Job to create per event (or per batch), a standard `batch/v1` JobTemplateSpec.
    /// Any string may hold `{{ event.<field> }}` placeholders. Exclusive with `templateRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_template: Option<JobTemplateSpec>,
    /// The name of a ready template from `job-templates/` (`image-resize`,
    /// `generic-container`, `script-runner`). Exclusive with `jobTemplate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<TemplateRef>,
    /// Which nodes the pods may run on.
    #[serde(default)]
    pub placement: Placement,
    /// Where results and dead letters go.
    #[serde(default)]
    pub sinks: Sinks,
    /// Retries of pods, of API calls and of failed items.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Seconds a finished Job (and its pods) stays before Kubernetes deletes it, so the cluster
    /// returns to zero after a burst.
    #[serde(default = "default_ttl_seconds_after_finished")]
    pub ttl_seconds_after_finished: i32,
}

fn default_ttl_seconds_after_finished() -> i32 {
    60
}

/// A template from `job-templates/`, with values for its parameters.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateRef {
    /// Template name, e.g. `image-resize`.
    pub name: String,
    /// Values for the template's `{{ params.<name> }}` placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

/// How events become Jobs, and how fast.
///
/// The rate defaults stay within Azure Container Instances' default quota of about 100
/// container-group creates per 5 minutes (0.33 per second): a virtual node backed by ACI
/// refuses pods past it. Raise them for providers with larger quotas, or use `indexed` mode,
/// which turns a whole batch into one Job.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FanOut {
    /// `perEvent`: one Job per event. `indexed`: one Indexed Job per batch of events, each pod
    /// finding its item by `JOB_COMPLETION_INDEX`.
    #[serde(default)]
    pub mode: FanOutMode,
    /// Events per Job in `indexed` mode.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// How long a partial batch may wait for more events before its Job is created, e.g. `5s`.
    #[serde(default = "default_max_wait")]
    pub max_wait: String,
    /// Pods pending or running at once for this pipeline. When full, Spate stops taking events
    /// and the broker holds the rest.
    #[serde(default = "default_max_parallelism")]
    pub max_parallelism: u32,
    /// Job creations per second, sustained.
    #[serde(default = "default_max_jobs_per_second")]
    pub max_jobs_per_second: f64,
    /// Job creations allowed at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

impl Default for FanOut {
    fn default() -> Self {
        FanOut {
            mode: FanOutMode::default(),
            batch_size: default_batch_size(),
            max_wait: default_max_wait(),
            max_parallelism: default_max_parallelism(),
            max_jobs_per_second: default_max_jobs_per_second(),
            burst: default_burst(),
        }
    }
}

fn default_batch_size() -> u32 {
    100
}

fn default_max_wait() -> String {
    "5s".to_string()
}

fn default_max_parallelism() -> u32 {
    50
}

fn default_max_jobs_per_second() -> f64 {
    0.33
}

fn default_burst() -> u32 {
    20
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FanOutMode {
    #[default]
    PerEvent,
    Indexed,
}

impl FanOutMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FanOutMode::PerEvent => "perEvent",
            FanOutMode::Indexed => "indexed",
        }
    }
}

/// Which nodes pods may run on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub mode: PlacementMode,
    /// Replaces the virtual-kubelet toleration (`virtual-kubelet.io/provider` Exists,
    /// NoSchedule) for providers with another taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Replaces the virtual node selector (`type: virtual-kubelet`) in `virtual` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PlacementMode {
    /// Only the virtual node.
    #[default]
    Virtual,
    /// Regular nodes first; what does not fit overflows to the virtual node.
    Burst,
    /// Only regular nodes.
    Regular,
}

/// Where results and dead letters go.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sinks {
    /// Each finished item is reported to every results sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<SinkConfig>,
    /// Items that could not be processed, with the reason. Without one, they are reported as
    /// Kubernetes Events on the Pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<SinkConfig>,
}

/// Retries of pods, of API calls and of failed items.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Pod retries inside one Job (the Job's `backoffLimit`), unless the template sets it.
    #[serde(default = "default_backoff_limit")]
    pub backoff_limit: i32,
    /// Attempts per event (Job creation, and re-runs of items whose Job failed) before the
    /// event goes to the dead-letter sink.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First delay between attempts, doubled each time with jitter, e.g. `1s`.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: String,
    /// Longest delay between attempts.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: String,
    /// A pod still Pending after this long (e.g. refused by the virtual node's provider) is
    /// deleted and its items retried or dead-lettered.
    #[serde(default = "default_pending_timeout")]
    pub pending_timeout: String,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff_limit: default_backoff_limit(),
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            pending_timeout: default_pending_timeout(),
        }
    }
}

fn default_backoff_limit() -> i32 {
    2
}

fn default_max_attempts() -> u32 {
    3
}

fn default_initial_backoff() -> String {
    "1s".to_string()
}

fn default_max_backoff() -> String {
    "1m".to_string()
}

fn default_pending_timeout() -> String {
    "10m".to_string()
}

/// What the orchestrator observed, written through the status subresource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    /// The source kind, for `kubectl get pipelines`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Events taken from the source since the controller started this pipeline.
    #[serde(default)]
    pub received: i64,
    /// Events received whose Job has not finished (or that wait for one).
    #[serde(default)]
    pub pending: i64,
    /// Pods pending or running, as counted against `maxParallelism`.
    #[serde(default)]
    pub running: i64,
    /// Items whose Job succeeded.
    #[serde(default)]
    pub succeeded: i64,
    /// Items whose Job failed.
    #[serde(default)]
    pub failed: i64,
    /// Events sent to the dead-letter sink.
    #[serde(default)]
    pub dead_lettered: i64,
    /// Messages the source still holds for this pipeline (not yet delivered to Spate, or
    /// delivered and not yet acknowledged): consumer-group lag for Kafka, unread plus pending
    /// entries for Redis Streams; absent when the source's protocol does not tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_lag: Option<i64>,
    /// The most recent problem: a dead-letter reason or a validation error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: `True` while running; `False` with reason `Paused` or `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
