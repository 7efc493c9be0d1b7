//! Core `v1` Events about pods, as the scheduler and kubelets record them, so
//! `kubectl describe pod` and `kubectl get events` explain what happened to a pod.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::retry::retry;

/// Who records an event: `component` (e.g. `default-scheduler`) on `host`, if any.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    pub(crate) component: String,
    pub(crate) host: Option<String>,
}

/// Records a `Warning` event on `pod`; failures are logged, never fatal: events are advisory.
pub(crate) async fn warn(
    client: &kube::Client,
    reporter: &Reporter,
    pod: &Pod,
    reason: &str,
    message: &str,
) {
    let namespace = pod.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.name_any())),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Pod".to_owned()),
            name: Some(pod.name_any()),
            namespace: Some(namespace.clone()),
            uid: pod.uid(),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        type_: Some("Warning".to_owned()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        source: Some(EventSource {
            component: Some(reporter.component.clone()),
            host: reporter.host.clone(),
        }),
        reporting_component: Some(reporter.component.clone()),
        reporting_instance: Some(
            reporter
                .host
                .clone()
                .unwrap_or_else(|| reporter.component.clone()),
        ),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let post = PostParams::default();
    if let Err(error) = retry(|| api.create(&post, &event)).await {
        tracing::warn!(pod = %pod.name_any(), reason, %error, "could not record event");
    }
}
