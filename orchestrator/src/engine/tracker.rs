//! Watches a pipeline's Jobs: keeps the parallelism budget equal to what the cluster runs,
//! and reports each finished Job's items to the sinks.
//!
//! Reporting is recovered from the cluster, not from memory: a Job carries its events (in
//! `SPATE_EVENT` or its input ConfigMap), and is marked `spate.dev/reported` once its records
//! are delivered, so a restarted Spate reports the Jobs that finished while it was down (as
//! long as their TTL has not removed them) and never reports one twice.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use parking_lot::Mutex;
use serde_json::{Value, json};
use spate_sinks::{Outcome, Record};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, JobUsage};
use super::index::EventIndex;
use super::sinks::PipelineSinks;
use crate::metrics::{METRICS, OutcomeLabels};
use crate::render::PIPELINE_LABEL;

/// Marks a Job whose records reached the sinks.
pub const REPORTED_ANNOTATION: &str = "spate.dev/reported";

/// Reports run concurrently, bounded so a burst of completions cannot open thousands of
/// connections to the sinks at once.
const CONCURRENT_REPORTS: usize = 16;

pub struct Tracker {
    pub client: kube::Client,
    pub namespace: String,
    pub pipeline: String,
    pub budget: Budget,
    pub sinks: Arc<PipelineSinks>,
    /// Set once the first list of Jobs is in: the budget is only right after that.
    pub synced: watch::Sender<bool>,
    /// Events that have a Job, for the intake to skip redeliveries.
    pub known: EventIndex,
    pub stats: Arc<super::stats::PipelineStats>,
}

impl Tracker {
    pub async fn run(self, shutdown: CancellationToken) {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let selector = format!(
            "{PIPELINE_LABEL}={}",
            crate::naming::sanitize_label_value(&self.pipeline)
        );
        let stream = watcher(jobs, watcher::Config::default().labels(&selector)).default_backoff();
        let mut stream = std::pin::pin!(stream.into_stream());
        let this = Arc::new(self);
        let reporting = Arc::new(Mutex::new(HashSet::<String>::new()));
        let permits = Arc::new(Semaphore::new(CONCURRENT_REPORTS));
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) => {
                    this.known.insert_job(&job);
                    this.observe(&job);
                    if finished(&job).is_some() && !is_reported(&job) {
                        let name = job.metadata.name.clone().unwrap_or_default();
                        if reporting.lock().insert(name.clone()) {
                            let (this, reporting, permits) =
                                (this.clone(), reporting.clone(), permits.clone());
                            tokio::spawn(async move {
                                let _permit = permits.acquire_owned().await;
                                if let Err(error) = this.report(&job).await {
                                    tracing::warn!(job = %name, %error, "reporting results failed; will retry on the next change or resync");
                                }
                                reporting.lock().remove(&name);
                            });
                        }
                    }
                }
                Ok(watcher::Event::Delete(job)) => {
                    this.budget
                        .release(job.metadata.name.as_deref().unwrap_or_default());
                }
                Ok(watcher::Event::InitDone) => {
                    this.synced.send_replace(true);
                }
                Ok(watcher::Event::Init) => {}
                Err(error) => {
                    tracing::warn!(pipeline = %this.pipeline, %error, "Job watch error; the watcher retries")
                }
            }
            METRICS
                .pods_in_budget
                .get_or_create(&crate::metrics::pipeline(&this.pipeline))
                .set(i64::from(this.budget.in_use()));
        }
    }

    fn observe(&self, job: &Job) {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        self.budget.observe(name, usage(job));
    }

    async fn report(&self, job: &Job) -> Result<(), String> {
        let name = job.metadata.name.clone().unwrap_or_default();
        let Some((succeeded, reason)) = finished(job) else {
            return Ok(());
        };
        let events = job_events(&self.client, job).await?;
        let completed = job
            .status
            .as_ref()
            .and_then(|status| status.completed_indexes.as_deref())
            .map(parse_indexes);
        let indexed = job
            .spec
            .as_ref()
            .and_then(|spec| spec.completion_mode.as_deref())
            == Some("Indexed");
        let at = jiff::Timestamp::now().to_string();
        let mut results = Vec::new();
        let mut dead = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            let item_succeeded = if indexed {
                completed.as_ref().is_some_and(|done| done.contains(&index))
            } else {
                succeeded
            };
            let record = Record {
                pipeline: format!("{}/{}", self.namespace, self.pipeline),
                outcome: if item_succeeded {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                },
                event,
                job: Some(name.clone()),
                reason: (!item_succeeded).then(|| reason.clone()),
                at: at.clone(),
            };
            if !item_succeeded {
                dead.push(Record {
                    outcome: Outcome::DeadLettered,
                    ..record.clone()
                });
            }
            results.push(record);
        }
        self.sinks.report(&results).await?;
        if !dead.is_empty() {
            self.sinks.dead_letter(&dead).await?;
        }
        for record in &results {
            self.stats.finished(record.outcome == Outcome::Succeeded);
            let outcome = match record.outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed => "failed",
                Outcome::DeadLettered => "dead_lettered",
            };
            METRICS
                .items_finished
                .get_or_create(&OutcomeLabels {
                    pipeline: self.pipeline.clone(),
                    outcome: outcome.to_string(),
                })
                .inc();
        }
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let mark = json!({"metadata": {"annotations": {REPORTED_ANNOTATION: "true"}}});
        match jobs
            .patch(&name, &PatchParams::default(), &Patch::Merge(&mark))
            .await
        {
            Ok(_) => Ok(()),
            // Deleted by its TTL meanwhile: the records are delivered, nothing left to mark.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(format!("cannot mark Job {name} reported: {error}")),
        }
    }
}

/// The events a Job served, in index order: from `SPATE_EVENT`, or from its input ConfigMap.
pub async fn job_events(client: &kube::Client, job: &Job) -> Result<Vec<Value>, String> {
    let env = job
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .and_then(|pod| pod.containers.first())
        .and_then(|container| container.env.as_ref());
    let embedded = env
        .and_then(|vars| vars.iter().find(|var| var.name == "SPATE_EVENT"))
        .and_then(|var| var.value.as_deref());
    if let Some(event) = embedded {
        let event =
            serde_json::from_str(event).map_err(|e| format!("SPATE_EVENT is not JSON: {e}"))?;
        return Ok(vec![event]);
    }
    let name = job.metadata.name.clone().unwrap_or_default();
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let input = config_maps
        .get(&name)
        .await
        .map_err(|e| format!("cannot read the input of Job {name}: {e}"))?;
    let data = input.data.unwrap_or_default();
    if let Some(items) = data.get("items.json") {
        return serde_json::from_str(items)
            .map_err(|e| format!("items.json of {name} is not a JSON list: {e}"));
    }
    let event = data
        .get("event.json")
        .ok_or_else(|| format!("the input of Job {name} holds no events"))?;
    Ok(vec![
        serde_json::from_str(event).map_err(|e| format!("event.json of {name}: {e}"))?,
    ])
}

fn is_reported(job: &Job) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| annotations.contains_key(REPORTED_ANNOTATION))
}

/// `Some((succeeded, reason))` once the Job has its Complete or Failed condition.
pub fn finished(job: &Job) -> Option<(bool, String)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .filter(|condition| condition.status == "True")
        .find_map(|condition| match condition.type_.as_str() {
            "Complete" => Some((true, String::new())),
            "Failed" => Some((
                false,
                format!(
                    "Job failed: {}{}",
                    condition.reason.as_deref().unwrap_or("Failed"),
                    condition
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
            )),
            _ => None,
        })
}

pub fn usage(job: &Job) -> JobUsage {
    let spec = job.spec.as_ref();
    let status = job.status.as_ref();
    let count = |value: Option<i32>| u32::try_from(value.unwrap_or(0)).unwrap_or(0);
    let parallelism = count(spec.and_then(|s| s.parallelism).or(Some(1)));
    JobUsage {
        parallelism,
        completions: spec
            .and_then(|s| s.completions)
            .map_or(parallelism, |c| count(Some(c))),
        succeeded: count(status.and_then(|s| s.succeeded)),
        finished: finished(job).is_some(),
    }
}

/// Parses a Job's `completedIndexes`, e.g. `0-3,5`.
pub fn parse_indexes(text: &str) -> HashSet<usize> {
    let mut indexes = HashSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (start, end) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(start), Ok(end)) = (start.parse::<usize>(), end.parse::<usize>()) {
            indexes.extend(start..=end);
        }
    }
    indexes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completed_indexes_are_read_as_kubernetes_writes_them() {
        let indexes = parse_indexes("0-3,5,7-8");
        let mut sorted: Vec<usize> = indexes.into_iter().collect();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3, 5, 7, 8]);
        assert!(parse_indexes("").is_empty());
        assert!(parse_indexes("x-y").is_empty());
    }

    #[test]
    fn a_failed_job_says_why() {
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"template": {}},
            "status": {"conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
            ]}
        }))
        .unwrap();
        let (succeeded, reason) = finished(&job).unwrap();
        assert!(!succeeded);
        assert_eq!(
            reason,
            "Job failed: BackoffLimitExceeded: Job has reached the specified backoff limit"
        );
        assert!(usage(&job).finished);
    }
}
