//! The Job controller: runs `batch/v1` Jobs to completion by creating and deleting their pods.
//!
//! It follows the upstream controller's observable behaviour for what Spate uses: NonIndexed
//! and Indexed completion modes, `parallelism`, `backoffLimit`, `backoffLimitPerIndex` and
//! `maxFailedIndexes` (so a batch reports which items failed in `status.failedIndexes`),
//! `activeDeadlineSeconds`, `suspend`, and the status fields and conditions clients wait on
//! (`Complete`/`Failed` with `SuccessCriteriaMet`/`FailureTarget` as Kubernetes 1.31+ sets
//! them). With `backoffLimitPerIndex` the Job-wide `backoffLimit` is not applied, as the
//! API's default for such Jobs (the largest int32) makes it.
//!
//! Reconciles are driven by [`kube::runtime::applier`] from two watches: Jobs (a reflector
//! store) and the pods Jobs own, which feed an index by owner uid *before* they trigger the
//! owner's reconcile, so a reconcile never reads pods older than the event that woke it.
//! Pods this controller created but has not yet seen through the watch are remembered
//! ("expectations", as upstream calls them) so a reconcile in between does not create twice.
//!
//! Simplifications: failed pods are replaced at once (no exponential pod-failure backoff),
//! and succeeded/failed counts come from the pods that still exist, never going down, rather
//! than from tracking finalizers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, future, stream};
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, applier};
use kube::{Resource, ResourceExt};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use super::relist;
use super::retry::{has_code, jittered, retry};

/// Label and annotation carrying an Indexed Job pod's index.
pub(crate) const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
const LEGACY_CONTROLLER_UID: &str = "controller-uid";
const JOB_NAME: &str = "batch.kubernetes.io/job-name";
const LEGACY_JOB_NAME: &str = "job-name";
/// `backoffLimit` when the Job does not set one.
const DEFAULT_BACKOFF_LIMIT: i32 = 6;
/// Pod creations and deletions in flight per reconcile.
const WRITES_IN_FLIGHT: usize = 16;
/// How long a created pod counts as active before its watch event arrives.
const EXPECTATION_TTL: Duration = Duration::from_secs(60);
/// Safety net: every Job is looked at again this often even if nothing wakes it.
const RESYNC: Duration = Duration::from_secs(300);

/// Why a reconcile failed; the error policy retries it with backoff.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Creating one of the Job's pods failed.
    #[error("failed to create a pod for Job {job}: {source}")]
    CreatePod {
        /// `namespace/name` of the Job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
    /// Deleting one of the Job's pods failed.
    #[error("failed to delete pod {pod} of Job {job}: {source}")]
    DeletePod {
        /// `namespace/name` of the Job.
        job: String,
        /// The pod's name.
        pod: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the Job's status failed.
    #[error("failed to update the status of Job {job}: {source}")]
    UpdateStatus {
        /// `namespace/name` of the Job.
        job: String,
        /// The API error.
        source: kube::Error,
    },
}

/// The pods of each Job, keyed by the Job's uid, kept from the pod watch.
#[derive(Default)]
struct OwnedPods {
    by_owner: RwLock<HashMap<String, HashMap<String, Arc<Pod>>>>,
    /// Pods listed so far during a relist; swapped in when it completes.
    relisting: Mutex<HashMap<String, HashMap<String, Arc<Pod>>>>,
    /// Jobs whose pods a relist listed, woken once the relisted pods are swapped in: woken
    /// earlier, their reconcile would read the pods from before the watch broke.
    relisted_jobs: Mutex<HashSet<ObjectRef<Job>>>,
    synced: AtomicBool,
}

/// The uid and reference of the Job controlling `pod`, if any.
fn controlling_job(pod: &Pod) -> Option<(String, ObjectRef<Job>)> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "Job")?;
    let reference = ObjectRef::new(&owner.name).within(&pod.namespace()?);
    Some((owner.uid.clone(), reference))
}

impl OwnedPods {
    /// Records a watch event and returns the Jobs it concerns, to be reconciled.
    fn apply(&self, event: Event<Pod>) -> Vec<ObjectRef<Job>> {
        match event {
            Event::Init => {
                self.relisting.lock().clear();
                self.relisted_jobs.lock().clear();
                Vec::new()
            }
            Event::InitApply(pod) => {
                if let (Some((owner, job)), Some(uid)) = (controlling_job(&pod), pod.uid()) {
                    self.relisting
                        .lock()
                        .entry(owner)
                        .or_default()
                        .insert(uid, Arc::new(pod));
                    self.relisted_jobs.lock().insert(job);
                }
                Vec::new()
            }
            Event::InitDone => {
                *self.by_owner.write() = std::mem::take(&mut *self.relisting.lock());
                self.synced.store(true, Ordering::Release);
                self.relisted_jobs.lock().drain().collect()
            }
            Event::Apply(pod) => {
                let (Some((owner, job)), Some(uid)) = (controlling_job(&pod), pod.uid()) else {
                    return Vec::new();
                };
                self.by_owner
                    .write()
                    .entry(owner)
                    .or_default()
                    .insert(uid, Arc::new(pod));
                vec![job]
            }
            Event::Delete(pod) => {
                let (Some((owner, job)), Some(uid)) = (controlling_job(&pod), pod.uid()) else {
                    return Vec::new();
                };
                let mut by_owner = self.by_owner.write();
                if let Some(pods) = by_owner.get_mut(&owner) {
                    pods.remove(&uid);
                    if pods.is_empty() {
                        by_owner.remove(&owner);
                    }
                }
                vec![job]
            }
        }
    }

    fn of(&self, job_uid: &str) -> Vec<Arc<Pod>> {
        self.by_owner
            .read()
            .get(job_uid)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// A pod created but not yet seen through the watch.
struct Expected {
    name: String,
    index: Option<i32>,
    created: Instant,
}

/// Shared state of the reconciles.
struct Context {
    client: kube::Client,
    pods: OwnedPods,
    expected: Mutex<HashMap<String, Vec<Expected>>>,
}

fn job_key(job: &Job) -> String {
    format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())
}

fn completion_index(pod: &Pod) -> Option<i32> {
    pod.annotations()
        .get(COMPLETION_INDEX)
        .or_else(|| pod.labels().get(COMPLETION_INDEX))
        .and_then(|index| index.parse().ok())
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Formats indexes as the API does: sorted, consecutive runs collapsed (`0-3,5`).
pub(crate) fn format_indexes(indexes: &BTreeSet<i32>) -> String {
    let mut ranges: Vec<(i32, i32)> = Vec::new();
    for &index in indexes {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == index => *end = index,
            _ => ranges.push((index, index)),
        }
    }
    ranges
        .iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the `completedIndexes` format; malformed parts are skipped.
pub(crate) fn parse_indexes(text: &str) -> BTreeSet<i32> {
    let mut indexes = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((start, end)) => {
                if let (Ok(start), Ok(end)) = (start.parse::<i32>(), end.parse::<i32>()) {
                    indexes.extend(start..=end);
                }
            }
            None => {
                if let Ok(index) = part.parse() {
                    indexes.insert(index);
                }
            }
        }
    }
    indexes
}

fn has_condition(status: &JobStatus, type_: &str) -> bool {
    status
        .conditions
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Sets condition `type_`, keeping the transition time when its status does not change.
fn set_condition(
    conditions: &mut Vec<JobCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status {
            existing.last_transition_time = Some(Time(now));
        }
        existing.status = status.to_owned();
        existing.reason = Some(reason.to_owned());
        existing.message = Some(message.to_owned());
        existing.last_probe_time = Some(Time(now));
        return;
    }
    conditions.push(JobCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    });
}

/// What the Job's pods say, before deciding anything.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PodCounts {
    pub(crate) active: Vec<ActivePod>,
    pub(crate) succeeded: i32,
    pub(crate) failed: i32,
    pub(crate) succeeded_indexes: BTreeSet<i32>,
    /// Failed pods plus in-place restarts, per completion index.
    pub(crate) failures_per_index: BTreeMap<i32, i32>,
}

/// A pod still running (or about to) for the Job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ActivePod {
    pub(crate) name: String,
    pub(crate) index: Option<i32>,
    pub(crate) ready: bool,
}

/// Counts pods, adding restarts as failures when containers restart in place (`OnFailure`),
/// as upstream does for `backoffLimit`.
pub(crate) fn count_pods(pods: &[Arc<Pod>], completions: Option<i32>) -> PodCounts {
    let mut counts = PodCounts::default();
    for pod in pods {
        let index = completion_index(pod);
        let in_range = |i: i32| completions.is_none_or(|c| (0..c).contains(&i));
        match phase(pod) {
            "Succeeded" => {
                counts.succeeded += 1;
                if let Some(index) = index.filter(|&i| in_range(i)) {
                    counts.succeeded_indexes.insert(index);
                }
            }
            "Failed" => {
                counts.failed += 1;
                if let Some(index) = index {
                    *counts.failures_per_index.entry(index).or_default() += 1;
                }
            }
            _ if pod.metadata.deletion_timestamp.is_none() => {
                counts.active.push(ActivePod {
                    name: pod.name_any(),
                    index,
                    ready: is_ready(pod),
                });
            }
            _ => {}
        }
        let restarts: i32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|statuses| statuses.iter().map(|s| s.restart_count).sum())
            .unwrap_or(0);
        counts.failed += restarts;
        if let Some(index) = index.filter(|_| restarts > 0) {
            *counts.failures_per_index.entry(index).or_default() += restarts;
        }
    }
    counts
}

/// What a reconcile decided: pods to create (by index, `None` for NonIndexed), pods to
/// delete, and the status to write.
#[derive(Debug, PartialEq)]
pub(crate) struct Decision {
    pub(crate) create: Vec<Option<i32>>,
    pub(crate) delete: Vec<String>,
    pub(crate) status: JobStatus,
    /// When to look again regardless of events (the active deadline).
    pub(crate) requeue_after: Option<Duration>,
}

/// The heart of the controller: given the Job and its pods, what should happen now.
pub(crate) fn decide(job: &Job, counts: &PodCounts, now: Timestamp) -> Decision {
    let spec = job.spec.clone().unwrap_or_default();
    let previous = job.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    let mut conditions = previous.conditions.clone().unwrap_or_default();
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let backoff_limit = spec.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT);
    let suspended = spec.suspend == Some(true);
    let all_active: Vec<String> = counts.active.iter().map(|p| p.name.clone()).collect();

    let mut succeeded_indexes = counts.succeeded_indexes.clone();
    if indexed {
        let limit = completions.unwrap_or(0);
        succeeded_indexes.extend(
            parse_indexes(previous.completed_indexes.as_deref().unwrap_or_default())
                .into_iter()
                .filter(|i| (0..limit).contains(i)),
        );
    }
    let succeeded = if indexed {
        i32::try_from(succeeded_indexes.len()).unwrap_or(i32::MAX)
    } else {
        counts.succeeded.max(previous.succeeded.unwrap_or(0))
    };
    let failed = counts.failed.max(previous.failed.unwrap_or(0));
    status.succeeded = Some(succeeded);
    status.failed = Some(failed);
    if indexed {
        status.completed_indexes = Some(format_indexes(&succeeded_indexes));
    }
    // With a per-index limit an index that failed too often is given up, not retried, and
    // the Job carries on with the others (`status.failedIndexes`).
    let per_index_limit = spec.backoff_limit_per_index.filter(|_| indexed);
    let mut failed_indexes = BTreeSet::new();
    if let Some(limit) = per_index_limit {
        let range = 0..completions.unwrap_or(0);
        failed_indexes.extend(
            parse_indexes(previous.failed_indexes.as_deref().unwrap_or_default())
                .into_iter()
                .filter(|i| range.contains(i)),
        );
        failed_indexes.extend(
            counts
                .failures_per_index
                .iter()
                .filter(|&(i, &failures)| failures > limit && range.contains(i))
                .map(|(&i, _)| i),
        );
        failed_indexes.retain(|i| !succeeded_indexes.contains(i));
        status.failed_indexes = Some(format_indexes(&failed_indexes));
    }
    let failed_index_count = i32::try_from(failed_indexes.len()).unwrap_or(i32::MAX);

    let mut decision = Decision {
        create: Vec::new(),
        delete: Vec::new(),
        status: JobStatus::default(),
        requeue_after: None,
    };
    let finished = has_condition(&previous, "Complete") || has_condition(&previous, "Failed");
    if finished {
        // A finished Job keeps no pods running (e.g. a straggler after success).
        decision.delete = all_active;
        status.active = Some(0);
        status.ready = Some(0);
        decision.status = status;
        return decision;
    }

    if !suspended && has_condition(&previous, "Suspended") {
        set_condition(
            &mut conditions,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
            now,
        );
        status.start_time = Some(Time(now));
    }
    if !suspended && status.start_time.is_none() {
        status.start_time = Some(Time(now));
    }

    let complete = match completions {
        Some(completions) => succeeded >= completions,
        // Work-queue Jobs finish once one pod has succeeded and the rest have stopped.
        None => succeeded > 0 && counts.active.is_empty(),
    };
    let deadline = spec
        .active_deadline_seconds
        .filter(|_| !suspended)
        .zip(status.start_time.as_ref())
        .map(|(seconds, start)| start.0 + jiff::SignedDuration::from_secs(seconds));
    let failure = if per_index_limit.is_none() && failed > backoff_limit {
        Some((
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ))
    } else if spec
        .max_failed_indexes
        .is_some_and(|max| failed_index_count > max)
    {
        Some((
            "MaxFailedIndexesExceeded",
            "Job has exceeded the specified maximal number of failed indexes",
        ))
    } else if failed_index_count > 0
        && completions.is_some_and(|c| succeeded + failed_index_count >= c)
    {
        Some(("FailedIndexes", "Job has failed indexes"))
    } else if deadline.is_some_and(|d| d <= now) {
        Some((
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ))
    } else {
        None
    };

    if complete {
        let (reason, message) = (
            "CompletionsReached",
            "Reached expected number of succeeded pods",
        );
        set_condition(
            &mut conditions,
            "SuccessCriteriaMet",
            "True",
            reason,
            message,
            now,
        );
        set_condition(&mut conditions, "Complete", "True", reason, message, now);
        status.completion_time = Some(Time(now));
        decision.delete = all_active;
    } else if let Some((reason, message)) = failure {
        set_condition(
            &mut conditions,
            "FailureTarget",
            "True",
            reason,
            message,
            now,
        );
        set_condition(&mut conditions, "Failed", "True", reason, message, now);
        decision.delete = all_active;
    } else if suspended {
        set_condition(
            &mut conditions,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            now,
        );
        decision.delete = all_active;
    } else {
        decision.requeue_after = deadline.and_then(|d| {
            let left = now.duration_until(d);
            Duration::try_from(left).ok()
        });
        plan_pods(
            &mut decision,
            counts,
            indexed,
            completions,
            parallelism,
            succeeded,
            &succeeded_indexes.union(&failed_indexes).copied().collect(),
        );
    }

    let deleted: HashSet<&String> = decision.delete.iter().collect();
    let remaining: Vec<&ActivePod> = counts
        .active
        .iter()
        .filter(|p| !deleted.contains(&p.name))
        .collect();
    status.active = Some(i32::try_from(remaining.len()).unwrap_or(i32::MAX));
    status.ready =
        Some(i32::try_from(remaining.iter().filter(|p| p.ready).count()).unwrap_or(i32::MAX));
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    decision.status = status;
    decision
}

/// Creates and deletes pods so `min(parallelism, remaining)` are active.
fn plan_pods(
    decision: &mut Decision,
    counts: &PodCounts,
    indexed: bool,
    completions: Option<i32>,
    parallelism: i32,
    succeeded: i32,
    finished_indexes: &BTreeSet<i32>,
) {
    let parallelism = usize::try_from(parallelism).unwrap_or(0);
    if indexed {
        let completions = completions.unwrap_or(0);
        let mut seen = HashSet::new();
        let mut keep = Vec::new();
        // Pods for an index that already finished, out of range, or duplicated are surplus.
        for pod in &counts.active {
            match pod.index {
                Some(i)
                    if (0..completions).contains(&i)
                        && !finished_indexes.contains(&i)
                        && seen.insert(i) =>
                {
                    keep.push(pod);
                }
                _ => decision.delete.push(pod.name.clone()),
            }
        }
        if keep.len() > parallelism {
            keep.sort_by_key(|p| (p.ready, std::cmp::Reverse(p.index)));
            let surplus = keep.len() - parallelism;
            decision
                .delete
                .extend(keep.drain(..surplus).map(|p| p.name.clone()));
        }
        let room = parallelism.saturating_sub(keep.len());
        decision.create = (0..completions)
            .filter(|i| !finished_indexes.contains(i) && !seen.contains(i))
            .take(room)
            .map(Some)
            .collect();
    } else {
        let remaining = match completions {
            Some(c) => usize::try_from(c - succeeded).unwrap_or(0),
            None if succeeded > 0 => 0,
            None => parallelism,
        };
        let want = parallelism.min(remaining);
        let active = counts.active.len();
        if active > want && completions.is_some() {
            let mut surplus: Vec<&ActivePod> = counts.active.iter().collect();
            surplus.sort_by_key(|p| p.ready);
            decision
                .delete
                .extend(surplus.iter().take(active - want).map(|p| p.name.clone()));
        }
        decision.create = vec![None; want.saturating_sub(active)];
    }
}

/// The pod the Job runs for `index` (Indexed) or any completion (`None`).
pub(crate) fn pod_for(job: &Job, index: Option<i32>) -> Pod {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut metadata = template.metadata.unwrap_or_default();
    let labels = metadata.labels.get_or_insert_with(Default::default);
    for (key, value) in [
        (CONTROLLER_UID, &uid),
        (LEGACY_CONTROLLER_UID, &uid),
        (JOB_NAME, &name),
        (LEGACY_JOB_NAME, &name),
    ] {
        labels
            .entry(key.to_owned())
            .or_insert_with(|| value.clone());
    }
    let mut spec = template.spec.unwrap_or_default();
    let generate_name = match index {
        Some(index) => {
            labels.insert(COMPLETION_INDEX.to_owned(), index.to_string());
            metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(COMPLETION_INDEX.to_owned(), index.to_string());
            spec.hostname
                .get_or_insert_with(|| format!("{name}-{index}"));
            let env = EnvVar {
                name: "JOB_COMPLETION_INDEX".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: Some("v1".to_owned()),
                        field_path: format!("metadata.annotations['{COMPLETION_INDEX}']"),
                    }),
                    ..EnvVarSource::default()
                }),
            };
            let containers = spec
                .containers
                .iter_mut()
                .chain(spec.init_containers.iter_mut().flatten());
            for container in containers {
                let vars = container.env.get_or_insert_with(Vec::new);
                if !vars.iter().any(|v| v.name == env.name) {
                    vars.push(env.clone());
                }
            }
            format!("{name}-{index}-")
        }
        None => format!("{name}-"),
    };
    Pod {
        metadata: ObjectMeta {
            name: None,
            generate_name: Some(generate_name),
            namespace: job.namespace(),
            owner_references: Some(vec![OwnerReference {
                api_version: Job::api_version(&()).into_owned(),
                kind: Job::kind(&()).into_owned(),
                name,
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..metadata
        },
        spec: Some(spec),
        status: None,
    }
}

/// Only the fields the controller owns, so an unchanged status is not rewritten.
fn status_differs(old: Option<&JobStatus>, new: &JobStatus) -> bool {
    let Some(old) = old else {
        return true;
    };
    let conditions = |s: &JobStatus| {
        s.conditions
            .iter()
            .flatten()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect::<Vec<_>>()
    };
    old.active.unwrap_or(0) != new.active.unwrap_or(0)
        || old.ready.unwrap_or(0) != new.ready.unwrap_or(0)
        || old.succeeded.unwrap_or(0) != new.succeeded.unwrap_or(0)
        || old.failed.unwrap_or(0) != new.failed.unwrap_or(0)
        || old.completed_indexes != new.completed_indexes
        || old.failed_indexes != new.failed_indexes
        || old.start_time != new.start_time
        || old.completion_time != new.completion_time
        || conditions(old) != conditions(new)
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, JobError> {
    if !ctx.pods.synced.load(Ordering::Acquire) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if job.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the pods of a Job being deleted.
        return Ok(Action::await_change());
    }
    let Some(uid) = job.uid() else {
        return Ok(Action::await_change());
    };
    let key = job_key(&job);
    let pods = ctx.pods.of(&uid);
    let completions = job.spec.as_ref().and_then(|s| s.completions);
    let mut counts = count_pods(&pods, completions);
    {
        // Pods created by an earlier reconcile but not yet reported by the watch still count.
        let mut expected = ctx.expected.lock();
        if let Some(pending) = expected.get_mut(&uid) {
            let known: HashSet<String> = pods.iter().map(|p| p.name_any()).collect();
            pending.retain(|e| !known.contains(&e.name) && e.created.elapsed() < EXPECTATION_TTL);
            counts.active.extend(pending.iter().map(|e| ActivePod {
                name: e.name.clone(),
                index: e.index,
                ready: false,
            }));
            if pending.is_empty() {
                expected.remove(&uid);
            }
        }
    }
    let decision = decide(&job, &counts, Timestamp::now());
    let namespace = job.namespace().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);

    let deletions: Vec<Result<(), JobError>> = stream::iter(decision.delete.iter().cloned())
        .map(|pod| {
            let api = pods_api.clone();
            let key = key.clone();
            async move {
                let params = DeleteParams::default();
                match retry(|| api.delete(&pod, &params)).await {
                    Ok(_) => Ok(()),
                    Err(source) if has_code(&source, 404) => Ok(()),
                    Err(source) => Err(JobError::DeletePod {
                        job: key,
                        pod,
                        source,
                    }),
                }
            }
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    deletions.into_iter().collect::<Result<Vec<()>, _>>()?;
    {
        let mut expected = ctx.expected.lock();
        if let Some(pending) = expected.get_mut(&uid) {
            pending.retain(|e| !decision.delete.contains(&e.name));
        }
    }

    let creations: Vec<Result<(), JobError>> = stream::iter(decision.create.iter().copied())
        .map(|index| {
            let api = pods_api.clone();
            let pod = pod_for(&job, index);
            let (ctx, uid, key) = (ctx.clone(), uid.clone(), key.clone());
            async move {
                let params = PostParams::default();
                let created = retry(|| api.create(&params, &pod))
                    .await
                    .map_err(|source| JobError::CreatePod { job: key, source })?;
                ctx.expected.lock().entry(uid).or_default().push(Expected {
                    name: created.name_any(),
                    index,
                    created: Instant::now(),
                });
                Ok(())
            }
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .collect()
        .await;
    let created = creations.iter().filter(|c| c.is_ok()).count();
    if created > 0 {
        tracing::debug!(job = %key, created, "created pods");
    }

    let mut status = decision.status.clone();
    // Pods created just now are active too.
    status.active = Some(status.active.unwrap_or(0) + i32::try_from(created).unwrap_or(0));
    if status_differs(job.status.as_ref(), &status) {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": status });
        let (name, params, patch) = (job.name_any(), PatchParams::default(), Patch::Merge(&patch));
        match retry(|| jobs.patch_status(&name, &params, &patch)).await {
            Ok(_) => {}
            Err(source) if has_code(&source, 404) => return Ok(Action::await_change()),
            Err(source) => return Err(JobError::UpdateStatus { job: key, source }),
        }
    }
    creations.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(match decision.requeue_after {
        Some(after) => Action::requeue(after.min(RESYNC) + Duration::from_millis(10)),
        None => Action::requeue(RESYNC),
    })
}

fn error_policy(job: Arc<Job>, error: &JobError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(job = %job_key(&job), %error, "Job reconcile failed");
    Action::requeue(jittered(Duration::from_secs(2)))
}

/// Runs the Job controller until `shutdown` is cancelled.
pub(crate) async fn run(client: kube::Client, concurrency: u16, shutdown: CancellationToken) {
    let ctx = Arc::new(Context {
        client: client.clone(),
        pods: OwnedPods::default(),
        expected: Mutex::new(HashMap::new()),
    });
    let (jobs, job_writer) = reflector::store::<Job>();
    let job_triggers = relist::triggers(
        reflector::reflector(
            job_writer,
            watcher::watcher(Api::<Job>::all(client.clone()), watcher::Config::default())
                .default_backoff(),
        ),
        "Job",
        {
            let ctx = ctx.clone();
            move |job: &Job| {
                // Expectations of a deleted Job will never be met by its pods.
                if let Some(uid) = job.uid() {
                    ctx.expected.lock().remove(&uid);
                }
            }
        },
    );
    let pod_ctx = ctx.clone();
    let pod_triggers = watcher::watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().labels(CONTROLLER_UID),
    )
    .default_backoff()
    .flat_map(move |event| {
        stream::iter(match event {
            Ok(event) => pod_ctx.pods.apply(event),
            Err(error) => {
                tracing::warn!(%error, "Job pod watch failed");
                Vec::new()
            }
        })
    });
    let queue = stream::select(job_triggers, pod_triggers).map(Ok::<_, Infallible>);
    let config = ControllerConfig::default().concurrency(concurrency);
    let reconciles = applier(
        |job, ctx| Box::pin(reconcile(job, ctx)),
        error_policy,
        ctx,
        jobs,
        queue,
        config,
    )
    .take_until(shutdown.cancelled_owned());
    reconciles
        .for_each(|outcome| {
            if let Err(error) = outcome {
                tracing::debug!(%error, "Job controller");
            }
            future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(spec: serde_json::Value, status: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "resize", "namespace": "default", "uid": "u-1"},
            "spec": spec,
            "status": status,
        }))
        .expect("a valid job")
    }

    fn template() -> serde_json::Value {
        json!({"spec": {"restartPolicy": "Never", "containers": [{"name": "work", "image": "busybox"}]}})
    }

    fn active(name: &str, index: Option<i32>) -> ActivePod {
        ActivePod {
            name: name.into(),
            index,
            ready: true,
        }
    }

    #[test]
    fn indexes_round_trip_through_the_compact_format() {
        let indexes: BTreeSet<i32> = [0, 1, 2, 3, 5, 7, 8].into_iter().collect();
        assert_eq!(format_indexes(&indexes), "0-3,5,7-8");
        assert_eq!(parse_indexes("0-3,5,7-8"), indexes);
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }

    #[test]
    fn indexed_job_starts_parallelism_pods_for_the_lowest_pending_indexes() {
        let job = job(
            json!({"completions": 20, "parallelism": 10, "completionMode": "Indexed", "template": template()}),
            json!({"completedIndexes": "0-2"}),
        );
        let counts = PodCounts {
            active: vec![active("resize-3-abcde", Some(3))],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        assert_eq!(decision.create, (4..13).map(Some).collect::<Vec<_>>());
        assert!(decision.delete.is_empty());
        assert_eq!(decision.status.succeeded, Some(3));
        assert_eq!(decision.status.completed_indexes.as_deref(), Some("0-2"));
        assert!(decision.status.start_time.is_some());
    }

    #[test]
    fn non_indexed_job_keeps_min_of_parallelism_and_remaining() {
        let job = job(
            json!({"completions": 5, "parallelism": 3, "template": template()}),
            json!({}),
        );
        let counts = PodCounts {
            succeeded: 3,
            active: vec![active("a", None)],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        assert_eq!(decision.create, vec![None]);
        let counts = PodCounts {
            succeeded: 4,
            active: vec![active("a", None), active("b", None)],
            ..PodCounts::default()
        };
        assert_eq!(decide(&job, &counts, Timestamp::now()).delete.len(), 1);
    }

    #[test]
    fn reaching_completions_marks_complete_and_success_criteria_met() {
        let job = job(
            json!({"completions": 2, "parallelism": 2, "template": template()}),
            json!({}),
        );
        let counts = PodCounts {
            succeeded: 2,
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        let types: Vec<_> = decision
            .status
            .conditions
            .iter()
            .flatten()
            .map(|c| c.type_.as_str())
            .collect();
        assert_eq!(types, ["SuccessCriteriaMet", "Complete"]);
        assert!(decision.status.completion_time.is_some());
        assert!(decision.create.is_empty());
    }

    #[test]
    fn failures_beyond_backoff_limit_fail_the_job_and_stop_its_pods() {
        let job = job(
            json!({"completions": 3, "parallelism": 2, "backoffLimit": 1, "template": template()}),
            json!({}),
        );
        let counts = PodCounts {
            failed: 2,
            active: vec![active("a", None)],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        let failed = decision
            .status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed");
        assert_eq!(
            failed.and_then(|c| c.reason.as_deref()),
            Some("BackoffLimitExceeded")
        );
        assert_eq!(decision.delete, vec!["a".to_owned()]);
        assert_eq!(decision.status.active, Some(0));
        assert!(decision.create.is_empty());
    }

    #[test]
    fn active_deadline_fails_the_job_once_passed_and_requeues_before() {
        let start = Timestamp::now() - jiff::SignedDuration::from_secs(30);
        let job = job(
            json!({"completions": 1, "activeDeadlineSeconds": 10, "template": template()}),
            json!({"startTime": start.to_string()}),
        );
        let counts = PodCounts {
            active: vec![active("a", None)],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        let failed = decision
            .status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed");
        assert_eq!(
            failed.and_then(|c| c.reason.as_deref()),
            Some("DeadlineExceeded")
        );
        let early = decide(&job, &counts, start + jiff::SignedDuration::from_secs(4));
        assert!(
            early
                .requeue_after
                .is_some_and(|d| d <= Duration::from_secs(6))
        );
    }

    #[test]
    fn suspending_deletes_active_pods_and_sets_the_suspended_condition() {
        let job = job(
            json!({"completions": 3, "parallelism": 3, "suspend": true, "template": template()}),
            json!({}),
        );
        let counts = PodCounts {
            active: vec![active("a", None)],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        assert_eq!(decision.delete, vec!["a".to_owned()]);
        assert!(decision.create.is_empty());
        let suspended = decision
            .status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Suspended");
        assert_eq!(suspended.map(|c| c.status.as_str()), Some("True"));
        assert!(decision.status.start_time.is_none());
    }

    #[test]
    fn indexed_pods_carry_index_hostname_env_and_owner() {
        let job = job(
            json!({"completionMode": "Indexed", "completions": 4, "template": template()}),
            json!({}),
        );
        let pod = pod_for(&job, Some(3));
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("resize-3-"));
        assert_eq!(
            pod.labels().get(COMPLETION_INDEX).map(String::as_str),
            Some("3")
        );
        assert_eq!(
            pod.annotations().get(COMPLETION_INDEX).map(String::as_str),
            Some("3")
        );
        assert_eq!(
            pod.labels().get("job-name").map(String::as_str),
            Some("resize")
        );
        let spec = pod.spec.expect("a spec");
        assert_eq!(spec.hostname.as_deref(), Some("resize-3"));
        let env = spec.containers[0].env.clone().unwrap_or_default();
        let field = env[0]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(
            field,
            Some("metadata.annotations['batch.kubernetes.io/job-completion-index']")
        );
        let owner = &pod.metadata.owner_references.unwrap_or_default()[0];
        assert_eq!(
            (
                owner.kind.as_str(),
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            ("Job", "u-1", Some(true), Some(true))
        );
        assert_eq!(
            pod_for(&job, None).metadata.generate_name.as_deref(),
            Some("resize-")
        );
    }

    #[test]
    fn an_index_failing_beyond_its_own_limit_is_given_up_and_fails_the_job_at_the_end() {
        let spec = json!({"completions": 4, "parallelism": 4, "completionMode": "Indexed",
            "backoffLimit": 6, "backoffLimitPerIndex": 1, "template": template()});
        let job = job(spec.clone(), json!({}));
        let counts = PodCounts {
            failed: 2,
            failures_per_index: BTreeMap::from([(2, 2)]),
            succeeded_indexes: [0].into_iter().collect(),
            active: vec![active("resize-1-a", Some(1))],
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        assert_eq!(decision.status.failed_indexes.as_deref(), Some("2"));
        assert_eq!(decision.create, vec![Some(3)], "index 2 is not retried");
        assert!(
            !decision
                .status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Failed")
        );

        let counts = PodCounts {
            failed: 2,
            failures_per_index: BTreeMap::from([(2, 2)]),
            succeeded_indexes: [0, 1, 3].into_iter().collect(),
            ..PodCounts::default()
        };
        let decision = decide(&job, &counts, Timestamp::now());
        let failed = decision
            .status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed");
        assert_eq!(
            failed.and_then(|c| c.reason.as_deref()),
            Some("FailedIndexes")
        );
        assert_eq!(decision.status.completed_indexes.as_deref(), Some("0-1,3"));

        let mut capped = spec;
        capped["maxFailedIndexes"] = json!(0);
        let counts = PodCounts {
            failures_per_index: BTreeMap::from([(2, 2)]),
            ..PodCounts::default()
        };
        let decision = decide(&job_with(capped), &counts, Timestamp::now());
        let failed = decision
            .status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed");
        assert_eq!(
            failed.and_then(|c| c.reason.as_deref()),
            Some("MaxFailedIndexesExceeded")
        );
    }

    fn job_with(spec: serde_json::Value) -> Job {
        job(spec, json!({}))
    }

    #[test]
    fn restarts_in_place_count_as_failures() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Running", "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 2}]}
        }))
        .expect("a valid pod");
        let counts = count_pods(&[Arc::new(pod)], Some(1));
        assert_eq!((counts.failed, counts.active.len()), (2, 1));
    }
}
