//! Pods that never start: deleted after `retry.pendingTimeout`, their events dead-lettered.
//!
//! A virtual-kubelet provider that refuses a pod (Azure Container Instances over quota, an
//! image it cannot pull) leaves it Pending and never retries. Such a pod holds its share of
//! the budget forever, so after the timeout its Job is deleted (freeing the budget) and its
//! events go to the dead-letter sink with the pod's own reason, e.g. `ProviderFailed:
//! container group quota exceeded`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use kube::runtime::{WatchStreamExt, watcher};
use parking_lot::Mutex;
use spate_sinks::{Outcome, Record};
use tokio_util::sync::CancellationToken;

use super::sinks::PipelineSinks;
use super::stats::PipelineStats;
use crate::render::PIPELINE_LABEL;

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
    pub sinks: Arc<PipelineSinks>,
    pub stats: Arc<PipelineStats>,
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
                    if self.give_up(&entry).await.is_ok() {
                        waiting.lock().remove(&pod);
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

    /// Dead-letters the Job's events, then deletes the Job and its pods.
    async fn give_up(&self, waiting: &Waiting) -> Result<(), String> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(job) = jobs
            .get_opt(&waiting.job)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let reason = format!(
            "pod Pending for more than {}: {}",
            humantime::format_duration(self.timeout),
            waiting.reason
        );
        let at = jiff::Timestamp::now().to_string();
        let events = super::tracker::job_events(&self.client, &job).await?;
        let records: Vec<Record> = events
            .into_iter()
            .map(|event| Record {
                pipeline: format!("{}/{}", self.namespace, self.pipeline),
                outcome: Outcome::DeadLettered,
                event,
                job: Some(waiting.job.clone()),
                reason: Some(reason.clone()),
                at: at.clone(),
            })
            .collect();
        self.sinks.dead_letter(&records).await?;
        self.stats.dead_lettered(records.len(), &reason);
        tracing::warn!(pipeline = %self.pipeline, job = %waiting.job, %reason, "giving up on a Job that cannot start");
        match jobs.delete(&waiting.job, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }
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
