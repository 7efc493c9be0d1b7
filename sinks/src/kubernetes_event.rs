//! Records as Kubernetes Events on the Pipeline, visible in `kubectl describe pipeline`.
//!
//! Delivery guarantee: a record is delivered when the API server has stored its Event
//! (`core/v1`, which `kubectl describe` and `kubectl events` show). Throttling, server errors
//! and lost connections are retried a few times with jittered backoff; a refusal (403, 422)
//! is permanent. Events are for people, not an audit log: the cluster expires them (one hour
//! by default).

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Outcome, PipelineRef, Record, Sink, SinkContext, SinkError};

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesEventSink {}

/// Who reports the Events, as `kubectl` shows it.
const COMPONENT: &str = "spate";
const PIPELINE_API_VERSION: &str = "spate.dev/v1alpha1";
/// Attempts per Event; an Event is worth a short wait, not a stalled tracker.
const MAX_ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Messages are cut here: a failure reason can be a whole log tail.
const MAX_MESSAGE_CHARS: usize = 1024;

/// Connects the sink to the cluster the process runs against.
pub fn build(
    config: &KubernetesEventSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let KubernetesEventSink {} = config;
    let built = match &cx.kube {
        Some(client) => Ok(Box::new(EventRecorder {
            events: Api::namespaced(client.clone(), &cx.pipeline.namespace),
            pipeline: cx.pipeline.clone(),
        }) as Box<dyn Sink>),
        None => Err(SinkError::Config(
            "the kubernetesEvent sink needs a Kubernetes cluster; run Spate against one".into(),
        )),
    };
    Box::pin(async move { built })
}

struct EventRecorder {
    events: Api<Event>,
    pipeline: PipelineRef,
}

impl Sink for EventRecorder {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            for record in records {
                self.record(record).await?;
            }
            Ok(())
        })
    }
}

impl EventRecorder {
    async fn record(&self, record: &Record) -> Result<(), SinkError> {
        let event = pipeline_event(&self.pipeline, record, Timestamp::now());
        let mut attempt = 1;
        loop {
            let error = match self.events.create(&PostParams::default(), &event).await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            let retriable = match &error {
                kube::Error::Api(status) => status.code == 429 || status.code >= 500,
                // Transport failures: the API server may not have stored it; try again.
                _ => true,
            };
            if !retriable || attempt >= MAX_ATTEMPTS {
                return Err(SinkError::Delivery {
                    kind: "kubernetesEvent",
                    reason: format!(
                        "cannot create the Event for pipeline {}/{} after {attempt} attempt(s): {error}",
                        self.pipeline.namespace, self.pipeline.name
                    ),
                });
            }
            let ceiling = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            let pause = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
            tracing::warn!(
                pipeline = %format!("{}/{}", self.pipeline.namespace, self.pipeline.name),
                attempt,
                pause_ms = pause.as_millis() as u64,
                %error,
                "kubernetesEvent sink retrying"
            );
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }
}

/// The Event for one record: on the Pipeline, with a reason `kubectl` users can filter on.
fn pipeline_event(pipeline: &PipelineRef, record: &Record, now: Timestamp) -> Event {
    let event_id = record
        .event
        .get("id")
        .and_then(|id| id.as_str())
        .unwrap_or("(no id)");
    let job = record.job.as_deref().unwrap_or("(none)");
    let why = record.reason.as_deref().unwrap_or("no reason given");
    let (reason, type_, message) = match record.outcome {
        Outcome::Succeeded => (
            "JobSucceeded",
            "Normal",
            format!("event {event_id}: Job {job} succeeded"),
        ),
        Outcome::Failed => (
            "JobFailed",
            "Warning",
            format!("event {event_id}: Job {job} failed: {why}"),
        ),
        Outcome::DeadLettered => (
            "DeadLettered",
            "Warning",
            format!("event {event_id} dead-lettered (Job {job}): {why}"),
        ),
    };
    let message: String = message.chars().take(MAX_MESSAGE_CHARS).collect();
    // Unique like the names kubectl's recorders use: `<object>.<hex>`; the object part is
    // cut so the whole stays a valid name.
    let name_prefix: String = pipeline.name.chars().take(200).collect();
    let suffix: u64 = rand::rng().random();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name_prefix}.{suffix:016x}")),
            namespace: Some(pipeline.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(PIPELINE_API_VERSION.to_string()),
            kind: Some("Pipeline".to_string()),
            namespace: Some(pipeline.namespace.clone()),
            name: Some(pipeline.name.clone()),
            uid: pipeline.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_string()),
        type_: Some(type_.to_string()),
        message: Some(message),
        source: Some(EventSource {
            component: Some(COMPONENT.to_string()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.to_string()),
        reporting_instance: Some(COMPONENT.to_string()),
        action: Some(reason.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_dead_letter_is_a_warning_naming_event_job_and_reason() {
        let pipeline = PipelineRef {
            namespace: "media".into(),
            name: "thumbnails".into(),
            uid: Some("u-1".into()),
        };
        let record = Record {
            pipeline: "media/thumbnails".into(),
            outcome: Outcome::DeadLettered,
            event: json!({"id": "photos/a.jpg"}),
            job: Some("thumbnails-abc".into()),
            reason: Some("template error".into()),
            at: "2026-01-01T00:00:00Z".into(),
        };
        let event = pipeline_event(&pipeline, &record, Timestamp::UNIX_EPOCH);
        assert_eq!(event.reason.as_deref(), Some("DeadLettered"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let message = event.message.unwrap_or_default();
        for part in ["photos/a.jpg", "thumbnails-abc", "template error"] {
            assert!(message.contains(part), "{message}");
        }
        assert_eq!(event.involved_object.kind.as_deref(), Some("Pipeline"));
        assert_eq!(event.involved_object.uid.as_deref(), Some("u-1"));
        assert!(
            event
                .metadata
                .name
                .is_some_and(|name| name.starts_with("thumbnails."))
        );
    }
}
