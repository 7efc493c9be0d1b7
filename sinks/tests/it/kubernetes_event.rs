//! The Kubernetes Event sink against the simulated API server, read back with `kube` as
//! `kubectl describe pipeline` would.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::json;
use spate_sinks::kubernetes_event::KubernetesEventSink;
use spate_sinks::{Outcome, PipelineRef, Record, SinkContext};
use spate_sources::secret::EnvSecrets;

fn record(outcome: Outcome, id: &str, reason: Option<&str>) -> Record {
    Record {
        pipeline: "default/thumbnails".into(),
        outcome,
        event: json!({"id": id}),
        job: Some(format!("thumbnails-{id}")),
        reason: reason.map(str::to_string),
        at: "2026-03-01T12:00:00Z".into(),
    }
}

#[tokio::test]
async fn outcomes_become_events_on_the_pipeline() {
    let cluster = spate_sim::SimCluster::start(spate_sim::SimConfig::default())
        .await
        .unwrap();
    let cx = SinkContext {
        pipeline: PipelineRef {
            namespace: "default".into(),
            name: "thumbnails".into(),
            uid: Some("6f1c-uid".into()),
        },
        secrets: Arc::new(EnvSecrets),
        kube: Some(cluster.client()),
    };
    let sink = spate_sinks::kubernetes_event::build(&KubernetesEventSink {}, &cx)
        .await
        .unwrap();
    sink.deliver(&[
        record(Outcome::Succeeded, "a1", None),
        record(Outcome::Failed, "b2", Some("exit code 3")),
        record(Outcome::DeadLettered, "c3", Some("template error")),
    ])
    .await
    .unwrap();

    let events: Api<Event> = Api::namespaced(cluster.client(), "default");
    let listed = events.list(&ListParams::default()).await.unwrap();
    let mut mine: Vec<&Event> = listed
        .items
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("thumbnails"))
        .collect();
    mine.sort_by_key(|e| e.message.clone());
    assert_eq!(mine.len(), 3);
    let summary: Vec<(Option<&str>, Option<&str>)> = mine
        .iter()
        .map(|e| (e.reason.as_deref(), e.type_.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some("JobSucceeded"), Some("Normal")),
            (Some("JobFailed"), Some("Warning")),
            (Some("DeadLettered"), Some("Warning")),
        ]
    );
    let failed = mine[1];
    let message = failed.message.as_deref().unwrap_or_default();
    assert!(
        message.contains("b2")
            && message.contains("thumbnails-b2")
            && message.contains("exit code 3"),
        "{message}"
    );
    let involved = &failed.involved_object;
    assert_eq!(involved.api_version.as_deref(), Some("spate.dev/v1alpha1"));
    assert_eq!(involved.kind.as_deref(), Some("Pipeline"));
    assert_eq!(involved.namespace.as_deref(), Some("default"));
    assert_eq!(involved.uid.as_deref(), Some("6f1c-uid"));
    assert_eq!(failed.reporting_component.as_deref(), Some("spate"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn without_a_cluster_the_sink_is_refused_at_start() {
    let cx = SinkContext {
        pipeline: PipelineRef {
            namespace: "default".into(),
            name: "thumbnails".into(),
            uid: None,
        },
        secrets: Arc::new(EnvSecrets),
        kube: None,
    };
    let error = spate_sinks::kubernetes_event::build(&KubernetesEventSink {}, &cx)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("needs a Kubernetes cluster"), "{error}");
}
