//! Watches a pipeline's Jobs: keeps the parallelism budget equal to what the cluster runs,
//! and reports each finished Job's items to the sinks.
//!
//! Reporting is recovered from the cluster, not from memory: a Job carries its events (in
//! `SPATE_EVENT` or its input ConfigMap), and is marked `spate.dev/reported` once its records
//! are delivered, so a restarted Spate reports the Jobs that finished while it was down and
//! never reports one twice. Jobs are created without `ttlSecondsAfterFinished`; the mark sets
//! it (from `spate.dev/ttl-seconds-after-finished`), so no Job is deleted unreported.
//!
//! The budget, the event index and the reports in flight hold only live Jobs: a deletion
//! forgets the Job, and so does a re-list (after a watch gap) that no longer shows it. A
//! report that fails is retried with backoff until it is delivered, its Job is gone, or the
//! engine stops; a retry resumes after the sinks that already have the records.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use parking_lot::Mutex;
use serde_json::{Value, json};
use spate_sinks::{Outcome, Record};
use spate_sources::backoff::Backoff;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, JobUsage};
use super::index::EventIndex;
use super::sinks::PipelineSinks;
use super::widen::Widening;
use crate::metrics::{METRICS, OutcomeLabels};
use crate::render::{PIPELINE_LABEL, TTL_ANNOTATION};

/// Marks a Job whose records reached the sinks.
pub const REPORTED_ANNOTATION: &str = "spate.dev/reported";

/// Reports delivering at once.
const CONCURRENT_REPORTS: usize = 16;
/// A failed report is retried after this long, doubling up to the maximum.
const REPORT_RETRY_MIN: Duration = Duration::from_secs(1);
const REPORT_RETRY_MAX: Duration = Duration::from_secs(60);

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
        let widening = Arc::new(Widening::new(
            self.client.clone(),
            self.namespace.clone(),
            self.pipeline.clone(),
            self.budget.clone(),
        ));
        // Widening ends with the tracker, whichever way the tracker ends.
        let widening_ends = shutdown.child_token();
        tokio::spawn({
            let (widening, ends) = (widening.clone(), widening_ends.clone());
            async move { widening.run(ends).await }
        });
        let _end_widening = widening_ends.drop_guard();
        let this = Arc::new(self);
        let reports = Arc::new(Reports::new());
        // Every Job the watch has shown and not seen deleted: after a re-list, those missing
        // from it were deleted during the gap, and no Delete will ever come for them.
        let mut watched = HashSet::<String>::new();
        let mut relisted: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            let Some(event) = event else { return };
            match event {
                Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) => {
                    let name = job.metadata.name.clone().unwrap_or_default();
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(name.clone());
                    }
                    watched.insert(name.clone());
                    this.known.insert_job(&job);
                    widening.observe(&job);
                    if finished(&job).is_some() && !is_reported(&job) {
                        reports.start(&this, job, &shutdown);
                    }
                }
                Ok(watcher::Event::Delete(job)) => {
                    let name = job.metadata.name.as_deref().unwrap_or_default();
                    watched.remove(name);
                    this.forget(name, &reports, &widening);
                }
                Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relisted.take() {
                        for gone in watched.difference(&seen) {
                            tracing::debug!(pipeline = %this.pipeline, job = %gone, "Job deleted during a watch gap");
                            this.forget(gone, &reports, &widening);
                        }
                        watched = seen;
                    }
                    this.synced.send_replace(true);
                }
                Err(error) => {
                    tracing::warn!(pipeline = %this.pipeline, %error, "Job watch error; the watcher retries")
                }
            }
            let label = crate::metrics::pipeline(&this.pipeline);
            METRICS
                .pods_in_budget
                .get_or_create(&label)
                .set(i64::from(this.budget.in_use()));
            METRICS
                .event_index_events
                .get_or_create(&label)
                .set(i64::try_from(this.known.len()).unwrap_or(i64::MAX));
        }
    }

    /// A deleted Job: its pods and its events are free again.
    fn forget(&self, name: &str, reports: &Reports, widening: &Widening) {
        widening.forget(name);
        self.known.remove_job(name);
        reports.forget(name);
    }

    /// Reads what a finished Job did into the records its report delivers.
    async fn outcome(&self, job: &Job) -> Result<Report, String> {
        let name = job.metadata.name.clone().unwrap_or_default();
        let (succeeded, reason) = finished(job).unwrap_or_default();
        // A Job the sweeper ended failed on its deadline; its pods' own reason says why.
        let reason = super::stuck::gave_up_reason(job).map_or(reason, str::to_string);
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
        let mut report = Report {
            job: name.clone(),
            ttl_after_reported: job
                .metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(TTL_ANNOTATION))
                .and_then(|ttl| ttl.parse().ok()),
            ..Report::default()
        };
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
                report.dead.push(Record {
                    outcome: Outcome::DeadLettered,
                    ..record.clone()
                });
            }
            report.results.push(record);
        }
        Ok(report)
    }

    /// Delivers what `report` has not delivered yet, then marks the Job reported.
    async fn deliver(&self, report: &mut Report) -> Result<(), String> {
        self.sinks
            .report(&report.results, &mut report.results_delivered)
            .await?;
        if !report.dead.is_empty() && !report.dead_lettered {
            self.sinks.dead_letter(&report.dead).await?;
            report.dead_lettered = true;
        }
        if !report.counted {
            report.counted = true;
            for record in &report.results {
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
        }
        let name = &report.job;
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut mark = json!({"metadata": {"annotations": {REPORTED_ANNOTATION: "true"}}});
        if let Some(ttl) = report.ttl_after_reported {
            mark["spec"] = json!({"ttlSecondsAfterFinished": ttl});
        }
        match jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(&mark))
            .await
        {
            Ok(_) => Ok(()),
            // Deleted by its TTL meanwhile: the records are delivered, nothing left to mark.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(error) => Err(format!("cannot mark Job {name} reported: {error}")),
        }
    }
}

/// One finished Job's records, and how far their delivery got: a retry resumes where the
/// last attempt failed, so no sink gets them twice from one process.
#[derive(Default)]
struct Report {
    job: String,
    /// The Job's [`TTL_ANNOTATION`], set on it with the reported mark: from then on the TTL
    /// controller may delete it.
    ttl_after_reported: Option<i32>,
    results: Vec<Record>,
    dead: Vec<Record>,
    /// How many results sinks, in order, have the results.
    results_delivered: usize,
    dead_lettered: bool,
    /// Counted in the metrics and the live stats.
    counted: bool,
}

/// The reports of one pipeline's finished Jobs.
struct Reports {
    /// Bounds the reports delivering at once, so a burst of completions cannot open
    /// thousands of connections to the sinks.
    permits: Semaphore,
    /// Per live Job, a report running or done by this process: a watch event of a Job
    /// already being reported, or reported before its mark reached the watch, starts none.
    /// Entries go with their Job.
    of_job: Mutex<HashMap<String, ReportState>>,
    serial: AtomicU64,
}

enum ReportState {
    /// Cancelled when the Job is deleted: an input not read by then is gone with it.
    Running {
        serial: u64,
        deleted: CancellationToken,
    },
    Done,
}

impl Reports {
    fn new() -> Self {
        Reports {
            permits: Semaphore::new(CONCURRENT_REPORTS),
            of_job: Mutex::default(),
            serial: AtomicU64::new(0),
        }
    }

    /// Reports `job` unless this process already does or did. A failed attempt is retried
    /// with backoff: a finished Job does not change again, so no watch event brings it back.
    fn start(self: &Arc<Self>, tracker: &Arc<Tracker>, job: Job, shutdown: &CancellationToken) {
        let name = job.metadata.name.clone().unwrap_or_default();
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let deleted = CancellationToken::new();
        {
            let mut of_job = self.of_job.lock();
            if of_job.contains_key(&name) {
                return;
            }
            let state = ReportState::Running {
                serial,
                deleted: deleted.clone(),
            };
            of_job.insert(name.clone(), state);
        }
        let (reports, tracker, shutdown) = (self.clone(), tracker.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut backoff = Backoff::new(REPORT_RETRY_MIN, REPORT_RETRY_MAX);
            let mut report: Option<Report> = None;
            let done = loop {
                let attempt = async {
                    let _permit = reports.permits.acquire().await;
                    if report.is_none() {
                        report = Some(tracker.outcome(&job).await?);
                    }
                    match report.as_mut() {
                        Some(report) => tracker.deliver(report).await,
                        None => Ok(()),
                    }
                }
                .await;
                let Err(error) = attempt else { break true };
                let delay = backoff.next_delay();
                tracing::warn!(pipeline = %tracker.pipeline, job = %name, %error, retry_in_ms = delay.as_millis() as u64, "reporting results failed; retrying");
                // Once read, the records are delivered even if the Job is deleted meanwhile.
                let unread = report.is_none();
                tokio::select! {
                    _ = shutdown.cancelled() => break false,
                    _ = deleted.cancelled(), if unread => {
                        tracing::warn!(pipeline = %tracker.pipeline, job = %name, "the Job was deleted before its results could be read; they are lost");
                        break false;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            };
            let mut of_job = reports.of_job.lock();
            let ours = matches!(of_job.get(&name), Some(ReportState::Running { serial: s, .. }) if *s == serial);
            if ours {
                if done {
                    of_job.insert(name, ReportState::Done);
                } else {
                    of_job.remove(&name);
                }
            }
        });
    }

    /// The Job is gone: forget it, and stop a report that could not read it yet.
    fn forget(&self, name: &str) {
        if let Some(ReportState::Running { deleted, .. }) = self.of_job.lock().remove(name) {
            deleted.cancel();
        }
    }
}

/// The events a Job served, in index order: from `SPATE_EVENT`, or from its input ConfigMap.
async fn job_events(client: &kube::Client, job: &Job) -> Result<Vec<Value>, String> {
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
