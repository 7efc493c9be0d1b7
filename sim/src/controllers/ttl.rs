//! TTL-after-finished: deletes Jobs `ttlSecondsAfterFinished` seconds after they finished.
//!
//! A Job is finished when its `Complete` or `Failed` condition is true; the clock starts at
//! that condition's transition time. Deletion uses background propagation, so the garbage
//! collector then removes the Job's pods, and that is how a burst returns to zero.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::{WatchStreamExt, applier, reflector, watcher};
use tokio_util::sync::CancellationToken;

use super::relist;
use super::retry::{has_code, jittered, retry};

/// Why deleting an expired Job failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to delete finished Job {job}: {source}")]
pub struct TtlError {
    job: String,
    source: kube::Error,
}

/// When `job` is due for deletion, if it has a TTL and has finished.
pub(crate) fn expiry(job: &Job) -> Option<Timestamp> {
    let ttl = job.spec.as_ref()?.ttl_seconds_after_finished?;
    let finished = job
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .filter(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .min()
        .or_else(|| job.status.as_ref()?.completion_time.as_ref().map(|t| t.0))?;
    Some(finished + SignedDuration::from_secs(i64::from(ttl)))
}

async fn reconcile(job: Arc<Job>, client: Arc<kube::Client>) -> Result<Action, TtlError> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(due) = expiry(&job) else {
        return Ok(Action::await_change());
    };
    let now = Timestamp::now();
    if due > now {
        let wait = Duration::try_from(now.duration_until(due)).unwrap_or_default();
        return Ok(Action::requeue(wait + Duration::from_millis(10)));
    }
    let namespace = job.namespace().unwrap_or_default();
    let api: Api<Job> = Api::namespaced((*client).clone(), &namespace);
    // The uid precondition keeps a re-created namesake from being deleted in its place.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: job.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    let name = job.name_any();
    match retry(|| api.delete(&name, &params)).await {
        Ok(_) => {
            tracing::debug!(job = %job.name_any(), %namespace, "deleted finished Job after its TTL");
            Ok(Action::await_change())
        }
        Err(source) if has_code(&source, 404) || has_code(&source, 409) => {
            Ok(Action::await_change())
        }
        Err(source) => Err(TtlError {
            job: format!("{namespace}/{}", job.name_any()),
            source,
        }),
    }
}

fn error_policy(_job: Arc<Job>, error: &TtlError, _client: Arc<kube::Client>) -> Action {
    tracing::warn!(%error, "TTL-after-finished");
    Action::requeue(jittered(Duration::from_secs(2)))
}

/// Runs the TTL-after-finished controller until `shutdown` is cancelled.
pub(crate) async fn run(client: kube::Client, shutdown: CancellationToken) {
    let (jobs, writer) = reflector::store::<Job>();
    let triggers = relist::triggers(
        reflector::reflector(
            writer,
            watcher::watcher(Api::<Job>::all(client.clone()), watcher::Config::default())
                .default_backoff(),
        ),
        "TTL-after-finished Job",
        |_: &Job| {},
    )
    .map(Ok::<_, Infallible>);
    applier(
        |job, client| Box::pin(reconcile(job, client)),
        error_policy,
        Arc::new(client),
        jobs,
        triggers,
        ControllerConfig::default(),
    )
    .take_until(shutdown.cancelled_owned())
    .for_each(|_| futures::future::ready(()))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expiry_counts_from_the_finished_condition() {
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"ttlSecondsAfterFinished": 5, "template": {}},
            "status": {"conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}
            ]}
        }))
        .expect("a valid job");
        assert_eq!(expiry(&job), "2026-01-01T00:00:06Z".parse().ok());
    }

    #[test]
    fn running_jobs_and_jobs_without_ttl_never_expire() {
        let running: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"}, "spec": {"ttlSecondsAfterFinished": 0, "template": {}}, "status": {"active": 1}
        }))
        .expect("a valid job");
        assert_eq!(expiry(&running), None);
        let no_ttl: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"}, "spec": {"template": {}},
            "status": {"conditions": [{"type": "Failed", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("a valid job");
        assert_eq!(expiry(&no_ttl), None);
    }
}
