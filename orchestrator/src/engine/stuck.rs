//! Pods that never start: their Job is failed after `retry.pendingTimeout`.
//!
//! A virtual-kubelet provider that refuses a pod (Azure Container Instances over quota, an
//! image it cannot pull) leaves it Pending and never retries. Such a pod holds its share of
//! the budget forever, so after the timeout the sweeper ends its Job: one patch sets the
//! Job's `activeDeadlineSeconds` to 1 (the Job controller then marks it Failed,
//! `DeadlineExceeded`, and deletes its pods, freeing the budget) and records the pod's own
//! reason in [`GAVE_UP_ANNOTATION`], e.g. `ProviderFailed: container group quota exceeded`.
//! The Job is then reported like any finished Job, by the tracker: the indexes that already
//! succeeded as succeeded, the rest as failed and dead-lettered with that reason, once per
//! sink; its TTL starts with the report.
//!
//! The watch can be behind (a pod replaced, a gap it re-listed over), so a pod is given up
//! on only after the API still shows it Pending.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::render::PIPELINE_LABEL;

/// Set on a Job the sweeper ended: why its pods never started, the reason its unfinished
/// items are reported with.
pub const GAVE_UP_ANNOTATION: &str = "spate.dev/gave-up";

/// A Pending pod: when it was created, its Job, and why it waits.
#[derive(Debug, Clone)]
struct Waiting {
    since: jiff::Timestamp,
    job: String,
    reason: String,
}

pub struct StuckPods {
    pub client: kube::Client,
    pub namespace: String,
    pub pipeline: String,
    pub timeout: Duration,
}

impl StuckPods {
    pub async fn run(self, shutdown: CancellationToken) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!(
            "{PIPELINE_LABEL}={}",
            crate::naming::sanitize_label_value(&self.pipeline)
        );
        let waiting = Arc::new(Mutex::new(BTreeMap::<String, Waiting>::new()));
        let watched = waiting.clone();
        let watch = watcher(pods, watcher::Config::default().labels(&selector))
            .default_backoff()
            .touched_objects()
            .for_each(move |pod| {
                if let Ok(pod) = pod {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    match pending(&pod) {
                        Some(entry) => {
                            watched.lock().insert(name, entry);
                        }
                        None => {
                            watched.lock().remove(&name);
                        }
                    }
                }
                futures::future::ready(())
            });
        let sweep = async {
            let every =
                (self.timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
            loop {
                tokio::time::sleep(every).await;
                let now = jiff::Timestamp::now();
                let stuck: Vec<(String, Waiting)> = waiting
                    .lock()
                    .iter()
                    .filter(|(_, w)| now.duration_since(w.since).unsigned_abs() >= self.timeout)
                    .map(|(pod, w)| (pod.clone(), w.clone()))
                    .collect();
                for (pod, entry) in stuck {
                    match self.give_up(&pod, &entry).await {
                        Ok(()) => {
                            waiting.lock().remove(&pod);
                        }
                        Err(error) => {
                            tracing::warn!(pipeline = %self.pipeline, job = %entry.job, %error, "cannot end a Job whose pod never started; trying again");
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = watch => {}
            _ = sweep => {}
        }
    }

    /// Fails the pod's Job, with the pod's reason, if the API still shows the pod Pending
    /// and the Job unfinished.
    async fn give_up(&self, pod: &str, waiting: &Waiting) -> Result<(), kube::Error> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        if pods
            .get_opt(pod)
            .await?
            .as_ref()
            .and_then(pending)
            .is_none()
        {
            return Ok(());
        }
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(job) = jobs.get_opt(&waiting.job).await? else {
            return Ok(());
        };
        if super::tracker::finished(&job).is_some() || gave_up_reason(&job).is_some() {
            return Ok(());
        }
        let reason = format!(
            "pod Pending for more than {}: {}",
            humantime::format_duration(self.timeout),
            waiting.reason
        );
        tracing::warn!(pipeline = %self.pipeline, job = %waiting.job, %reason, "giving up on a Job that cannot start");
        let patch = json!({
            "metadata": {"annotations": {GAVE_UP_ANNOTATION: reason}},
            "spec": {"activeDeadlineSeconds": 1},
        });
        match jobs
            .patch(&waiting.job, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// Why the sweeper ended this Job, if it did.
pub fn gave_up_reason(job: &Job) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(GAVE_UP_ANNOTATION)
        .map(String::as_str)
}

fn pending(pod: &Pod) -> Option<Waiting> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Pending") || pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let job = pod.metadata.labels.as_ref()?.get("job-name")?.clone();
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|container| container.state.as_ref()?.waiting.clone());
    let unschedulable = status
        .conditions
        .iter()
        .flatten()
        .find(|condition| condition.type_ == "PodScheduled" && condition.status == "False");
    let reason = match (waiting, unschedulable) {
        (Some(waiting), _) => format!(
            "{}: {}",
            waiting.reason.unwrap_or_default(),
            waiting.message.unwrap_or_default()
        ),
        (None, Some(condition)) => format!(
            "{}: {}",
            condition.reason.clone().unwrap_or_default(),
            condition.message.clone().unwrap_or_default()
        ),
        (None, None) => "not started".to_string(),
    };
    Some(Waiting {
        since: pod.metadata.creation_timestamp.as_ref()?.0,
        job,
        reason,
    })
}
