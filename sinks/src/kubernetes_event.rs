//! Records as Kubernetes Events on the Pipeline, visible in `kubectl describe pipeline`.
//!
//! Delivery guarantee: a record is delivered when the API server has stored its Event
//! (`core/v1`, which `kubectl describe` and `kubectl events` show). Throttling, server errors
//! and lost connections are retried a few times with jittered backoff; a refusal (403, 422)
//! is permanent. Events are for people, not an audit log: the cluster expires them (one hour
//! by default).
//!
//! A `DeadLettered` or `JobFailed` Event also carries what is needed to run its item again
//! (`spate retry` reads it): the original event as JSON in the `spate.dev/event` annotation
//! (left out, with a note in the message and in `spate.dev/event-omitted`, when it is over
//! 64 KiB), its id in `spate.dev/event-id` and the Job in `spate.dev/job`.

use std::collections::BTreeMap;
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

/// The Event reason of an item that could not be processed.
pub const DEAD_LETTERED_REASON: &str = "DeadLettered";
/// The Event reason of an item whose Job failed.
pub const JOB_FAILED_REASON: &str = "JobFailed";
/// Annotation: the original event, as the JSON the source delivered.
pub const EVENT_ANNOTATION: &str = "spate.dev/event";
/// Annotation: the id of the original event.
pub const EVENT_ID_ANNOTATION: &str = "spate.dev/event-id";
/// Annotation: the Job that ran (or was to run) the item.
pub const JOB_ANNOTATION: &str = "spate.dev/job";
/// Annotation, instead of [`EVENT_ANNOTATION`]: why the event is not kept.
pub const EVENT_OMITTED_ANNOTATION: &str = "spate.dev/event-omitted";
/// Annotation `spate retry` puts on a dead-letter Event once its item runs again: the new
/// Job's name.
pub const RETRIED_ANNOTATION: &str = "spate.dev/retried";
/// The largest event kept in an Event: the API server allows 256 KiB of annotations in all.
pub const MAX_EVENT_ANNOTATION_BYTES: usize = 64 * 1024;

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
    let (reason, type_, mut message) = match record.outcome {
        Outcome::Succeeded => (
            "JobSucceeded",
            "Normal",
            format!("event {event_id}: Job {job} succeeded"),
        ),
        Outcome::Failed => (
            JOB_FAILED_REASON,
            "Warning",
            format!("event {event_id}: Job {job} failed: {why}"),
        ),
        Outcome::DeadLettered => (
            DEAD_LETTERED_REASON,
            "Warning",
            format!("event {event_id} dead-lettered (Job {job}): {why}"),
        ),
    };
    let annotations = match record.outcome {
        Outcome::Succeeded => None,
        Outcome::Failed | Outcome::DeadLettered => {
            let (annotations, note) = item_annotations(record);
            if let Some(note) = note {
                // Said first, so the cut to MAX_MESSAGE_CHARS cannot lose it.
                message = format!("{note}; {message}");
            }
            Some(annotations)
        }
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
            annotations,
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

/// What a failed or dead-lettered item's Event carries so that it can be run again, and the
/// note to add to the message when the event is too large to keep.
fn item_annotations(record: &Record) -> (BTreeMap<String, String>, Option<String>) {
    let mut annotations = BTreeMap::new();
    if let Some(id) = record.event.get("id").and_then(|id| id.as_str()) {
        annotations.insert(EVENT_ID_ANNOTATION.to_string(), id.to_string());
    }
    if let Some(job) = &record.job {
        annotations.insert(JOB_ANNOTATION.to_string(), job.clone());
    }
    let event = record.event.to_string();
    let note = if event.len() <= MAX_EVENT_ANNOTATION_BYTES {
        annotations.insert(EVENT_ANNOTATION.to_string(), event);
        None
    } else {
        let note = format!(
            "the event ({} KiB) is over the {} KiB an Event keeps, so it is not kept and \
             `spate retry` cannot re-run it",
            event.len().div_ceil(1024),
            MAX_EVENT_ANNOTATION_BYTES / 1024
        );
        annotations.insert(EVENT_OMITTED_ANNOTATION.to_string(), note.clone());
        Some(note)
    };
    (annotations, note)
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
        let annotations = event.metadata.annotations.unwrap_or_default();
        let kept: serde_json::Value = serde_json::from_str(&annotations[EVENT_ANNOTATION]).unwrap();
        assert_eq!(kept, record.event);
        assert_eq!(annotations[EVENT_ID_ANNOTATION], "photos/a.jpg");
        assert_eq!(annotations[JOB_ANNOTATION], "thumbnails-abc");
        assert!(!annotations.contains_key(EVENT_OMITTED_ANNOTATION));
    }

    fn pipeline() -> PipelineRef {
        PipelineRef {
            namespace: "media".into(),
            name: "thumbnails".into(),
            uid: None,
        }
    }

    fn record(outcome: Outcome, event: serde_json::Value) -> Record {
        Record {
            pipeline: "media/thumbnails".into(),
            outcome,
            event,
            job: Some("thumbnails-abc".into()),
            reason: Some("exit 1".into()),
            at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_failed_job_keeps_its_event_too_but_a_success_does_not() {
        let event = json!({"id": "e-1", "data": {"n": 1}});
        let failed = pipeline_event(
            &pipeline(),
            &record(Outcome::Failed, event.clone()),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(failed.reason.as_deref(), Some(JOB_FAILED_REASON));
        let annotations = failed.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations[EVENT_ANNOTATION], event.to_string());
        assert_eq!(annotations[JOB_ANNOTATION], "thumbnails-abc");
        let succeeded = pipeline_event(
            &pipeline(),
            &record(Outcome::Succeeded, event),
            Timestamp::UNIX_EPOCH,
        );
        assert!(succeeded.metadata.annotations.is_none());
    }

    #[test]
    fn an_event_over_64_kib_is_left_out_with_a_note() {
        let event = json!({"id": "big", "data": "x".repeat(MAX_EVENT_ANNOTATION_BYTES)});
        let dead = pipeline_event(
            &pipeline(),
            &record(Outcome::DeadLettered, event),
            Timestamp::UNIX_EPOCH,
        );
        let annotations = dead.metadata.annotations.unwrap_or_default();
        assert!(!annotations.contains_key(EVENT_ANNOTATION));
        assert_eq!(annotations[EVENT_ID_ANNOTATION], "big");
        let note = &annotations[EVENT_OMITTED_ANNOTATION];
        assert!(note.contains("65 KiB") && note.contains("64 KiB"), "{note}");
        let message = dead.message.unwrap_or_default();
        assert!(message.starts_with(note.as_str()), "{message}");
        assert!(message.contains("dead-lettered"), "{message}");
        assert!(message.chars().count() <= MAX_MESSAGE_CHARS);
    }

    #[test]
    fn an_event_of_exactly_64_kib_is_kept() {
        let mut event = json!({"id": "edge", "data": ""});
        let room = MAX_EVENT_ANNOTATION_BYTES - event.to_string().len();
        event["data"] = json!("y".repeat(room));
        assert_eq!(event.to_string().len(), MAX_EVENT_ANNOTATION_BYTES);
        let dead = pipeline_event(
            &pipeline(),
            &record(Outcome::DeadLettered, event),
            Timestamp::UNIX_EPOCH,
        );
        let annotations = dead.metadata.annotations.unwrap_or_default();
        assert!(annotations.contains_key(EVENT_ANNOTATION));
        assert!(!annotations.contains_key(EVENT_OMITTED_ANNOTATION));
    }
}
