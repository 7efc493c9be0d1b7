//! Creates a rendered Job (and its input ConfigMap) through the Kubernetes API.
//!
//! A Job never runs without its input and never counts as created before it can run. A Job
//! with an input is created suspended and labelled `spate.dev/incomplete`; its ConfigMap is
//! created owned by it, so garbage collection removes the two together; only then is the Job
//! released (unsuspended and unlabelled) in one patch. A crash at any point leaves either no
//! Job, or an incomplete one: a redelivery of the same events completes it (through the `409`
//! below), and [`Emitter::repair`] deletes one whose events come back grouped differently.
//!
//! Job names derive from event ids, so `409 AlreadyExists` usually means a previous attempt
//! (before a crash, or of a redelivered event) created it. It counts as done only for a Job
//! that carries the same events, has the same owner and is not being deleted: a Job being
//! deleted (its TTL, the stuck-pod sweeper) is waited out and created again; one carrying
//! other events or owned by something else is refused. Transient failures (429, 5xx,
//! connection errors) are retried with exponential backoff and equal jitter
//! ([`spate_sources::backoff`]) up to the pipeline's `maxAttempts`; anything else (422
//! Invalid, 403 Forbidden) is permanent. When a step fails after the Job exists, the
//! incomplete Job is deleted (only as it was before the release, which may have been applied
//! with its answer lost) before the error goes back to the caller. The caller then asks
//! [`Emitter::find`] what the API has under the name: an earlier attempt whose answer was
//! lost may have stored the Job after all.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, Resource};
use serde_json::json;
use spate_sources::backoff::Backoff;
use tokio::time::Instant;

use crate::pipeline::{FanOut, RetryPolicy};
use crate::render::{EVENT_IDS_ANNOTATION, RenderedJob};
use spate_sources::check::parse_duration;

/// Label on a Job whose input is not in place yet: it is suspended, and its events are not
/// acknowledged.
pub const INCOMPLETE_LABEL: &str = "spate.dev/incomplete";
/// How long a Job or ConfigMap being deleted under the name we need is waited for.
const DELETION_WAIT: Duration = Duration::from_secs(60);
const DELETION_POLL: Duration = Duration::from_secs(1);

/// The rate limiter for one pipeline's Job creations.
pub fn rate_limiter(fanout: &FanOut) -> Arc<DefaultDirectRateLimiter> {
    let period = Duration::from_secs_f64(1.0 / fanout.max_jobs_per_second.max(1e-6));
    let burst = NonZeroU32::new(fanout.burst).unwrap_or(NonZeroU32::MIN);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    Arc::new(RateLimiter::direct(quota))
}

/// Why a Job could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("the API refused Job {job}: {reason}")]
    Refused { job: String, reason: String },
    #[error("Job {job} could not be created after {attempts} attempts: {last}")]
    Exhausted {
        job: String,
        attempts: u32,
        last: String,
    },
    /// A Job of that name exists but is not this one, or will not go away.
    #[error("Job {job} already exists but {reason}")]
    Conflict { job: String, reason: String },
}

/// What a successful creation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// The Job was already there (a redelivery or a retry after a crash), completed now if a
    /// crash had left it incomplete.
    AlreadyExisted,
}

/// What [`Emitter::repair`] did with an incomplete Job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// It is gone, complete, or another Job by now: nothing to do.
    Settled,
    /// Deleted: its events run again when they are redelivered.
    Deleted,
    /// The delete failed (logged): try again later.
    NotDeleted,
}

/// Creates Jobs for one pipeline.
#[derive(Clone)]
pub struct Emitter {
    client: Client,
    limiter: Arc<DefaultDirectRateLimiter>,
    retry: Retry,
    /// The Pipeline owning every Job, when it is a cluster resource (so deleting the
    /// Pipeline deletes its Jobs).
    owner: Option<OwnerReference>,
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    initial: Duration,
    max: Duration,
}

impl Emitter {
    pub fn new(
        client: Client,
        fanout: &FanOut,
        retry: &RetryPolicy,
        owner: Option<OwnerReference>,
    ) -> Self {
        Emitter {
            client,
            limiter: rate_limiter(fanout),
            retry: Retry {
                attempts: retry.max_attempts.max(1),
                initial: parse_duration(&retry.initial_backoff),
                max: parse_duration(&retry.max_backoff),
            },
            owner,
        }
    }

    /// Creates the Job and its input, or completes the one a previous attempt left; returns
    /// once the Job can run.
    pub async fn create(&self, rendered: &RenderedJob) -> Result<Created, EmitError> {
        self.limiter.until_ready().await;
        let mut job = rendered.job.clone();
        if let Some(owner) = &self.owner {
            job.metadata.owner_references = Some(vec![owner.clone()]);
        }
        let suspend = job
            .spec
            .as_ref()
            .and_then(|spec| spec.suspend)
            .unwrap_or(false);
        if rendered.input.is_some() {
            job.spec.get_or_insert_with(Default::default).suspend = Some(true);
            job.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(INCOMPLETE_LABEL.to_string(), "true".to_string());
        }
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        let name = job.metadata.name.clone().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        let (created, existing) = self.create_job(&jobs, &job).await?;
        let Some(input) = &rendered.input else {
            return Ok(created);
        };
        if !is_incomplete(&existing) {
            return Ok(created);
        }
        let uid = existing.metadata.uid.clone().unwrap_or_default();
        let completed = async {
            self.create_input(&namespace, &name, &uid, input).await?;
            self.release(&jobs, &name, suspend).await
        }
        .await;
        if let Err(error) = completed {
            // Only as it was before the release: a release whose answer was lost may have
            // made it runnable, and then it stays (the events come back and find it).
            let unreleased = existing.metadata.resource_version.clone();
            self.delete_incomplete(&jobs, &name, &uid, unreleased).await;
            return Err(error);
        }
        Ok(created)
    }

    /// Creates the Job, or finds the one of that name that serves the same events.
    async fn create_job(&self, jobs: &Api<Job>, job: &Job) -> Result<(Created, Job), EmitError> {
        let name = job.metadata.name.clone().unwrap_or_default();
        let post = PostParams::default();
        let deadline = Instant::now() + DELETION_WAIT;
        loop {
            if let Some(created) = self.with_retries(&name, || jobs.create(&post, job)).await? {
                return Ok((Created::New, created));
            }
            let existing = self
                .with_retries(&name, || jobs.get_opt(&name))
                .await?
                .flatten();
            match existing {
                Some(existing) if existing.metadata.deletion_timestamp.is_none() => {
                    self.check_same(job, &existing)?;
                    return Ok((Created::AlreadyExisted, existing));
                }
                // Being deleted, or gone since the 409: it cannot run these events.
                _ if Instant::now() < deadline => tokio::time::sleep(DELETION_POLL).await,
                _ => {
                    return Err(EmitError::Conflict {
                        job: name,
                        reason: format!(
                            "is being deleted and was still there after {}s",
                            DELETION_WAIT.as_secs()
                        ),
                    });
                }
            }
        }
    }

    /// Whether `existing`, found under `wanted`'s name, serves the same events for the same
    /// owner.
    fn check_same(&self, wanted: &Job, existing: &Job) -> Result<(), EmitError> {
        let name = wanted.metadata.name.clone().unwrap_or_default();
        let (ours, theirs) = (event_ids(wanted), event_ids(existing));
        if ours != theirs {
            return Err(EmitError::Conflict {
                job: name,
                reason: format!(
                    "carries other events ({EVENT_IDS_ANNOTATION}: {})",
                    existing
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(EVENT_IDS_ANNOTATION))
                        .map_or("none", String::as_str)
                ),
            });
        }
        if let Some(owner) = &self.owner {
            let owners = existing
                .metadata
                .owner_references
                .as_deref()
                .unwrap_or_default();
            if !owners.iter().any(|theirs| theirs.uid == owner.uid) {
                let described: Vec<String> = owners
                    .iter()
                    .map(|o| format!("{} {} (uid {})", o.kind, o.name, o.uid))
                    .collect();
                return Err(EmitError::Conflict {
                    job: name,
                    reason: format!(
                        "belongs to {}, not {} {} (uid {})",
                        if described.is_empty() {
                            "no owner".to_string()
                        } else {
                            described.join(", ")
                        },
                        owner.kind,
                        owner.name,
                        owner.uid
                    ),
                });
            }
        }
        Ok(())
    }

    /// Creates the Job's input owned by the Job `uid`, or accepts the one already there for
    /// it. An input left by an earlier Job of the same name is waited out: garbage collection
    /// removes it with its owner.
    async fn create_input(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        input: &ConfigMap,
    ) -> Result<(), EmitError> {
        let mut input = input.clone();
        input.metadata.owner_references = Some(vec![OwnerReference {
            api_version: Job::api_version(&()).to_string(),
            kind: Job::kind(&()).to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let post = PostParams::default();
        let deadline = Instant::now() + DELETION_WAIT;
        loop {
            if self
                .with_retries(name, || config_maps.create(&post, &input))
                .await?
                .is_some()
            {
                return Ok(());
            }
            let existing = self
                .with_retries(name, || config_maps.get_opt(name))
                .await?
                .flatten();
            if let Some(existing) = existing {
                let owners = existing.metadata.owner_references.unwrap_or_default();
                if owners.iter().any(|owner| owner.uid == uid) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(EmitError::Conflict {
                    job: name.to_string(),
                    reason: format!(
                        "its input ConfigMap still belonged to another object after {}s",
                        DELETION_WAIT.as_secs()
                    ),
                });
            }
            tokio::time::sleep(DELETION_POLL).await;
        }
    }

    /// Lets the Job run: unsuspends it (unless its template suspends it) and drops the
    /// incomplete label, in one patch.
    async fn release(&self, jobs: &Api<Job>, name: &str, suspend: bool) -> Result<(), EmitError> {
        let patch = json!({
            "metadata": {"labels": {INCOMPLETE_LABEL: null}},
            "spec": {"suspend": suspend},
        });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        self.with_retries(name, || jobs.patch(name, &params, &patch))
            .await?;
        Ok(())
    }

    /// Deletes an incomplete Job: only that one (`uid`), and only as it was seen
    /// (`resource_version`) when given. Failing to is logged: the Job runs nothing while
    /// suspended, and the intake finds it ([`Emitter::find`]) and has [`Emitter::repair`]
    /// delete it later.
    async fn delete_incomplete(
        &self,
        jobs: &Api<Job>,
        name: &str,
        uid: &str,
        resource_version: Option<String>,
    ) -> bool {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version,
            }),
            ..DeleteParams::background()
        };
        let delete = || async {
            match jobs.delete(name, &params).await {
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        };
        match self.with_retries(name, delete).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(job = name, %error, "cannot delete an incomplete Job");
                false
            }
        }
    }

    /// The incomplete Jobs among those `selector` picks.
    pub async fn incomplete(&self, namespace: &str, selector: &str) -> Result<Vec<Job>, EmitError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default().labels(&format!("{selector},{INCOMPLETE_LABEL}=true"));
        let listed = self
            .with_retries("(list)", || jobs.list(&params))
            .await?
            .map(|list| list.items)
            .unwrap_or_default();
        Ok(listed.into_iter().filter(is_incomplete).collect())
    }

    /// Deletes the incomplete Job `name` (`uid`): a crash left it, and its events, never
    /// acknowledged, come back to be created again. The caller decides when it is old enough
    /// (on its own clock: the API server's timestamps are another machine's). The delete
    /// holds only while the Job is as seen, so a redelivery completing it meanwhile wins.
    pub async fn repair(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Repair, EmitError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let Some(job) = self
            .with_retries(name, || jobs.get_opt(name))
            .await?
            .flatten()
        else {
            return Ok(Repair::Settled);
        };
        if job.metadata.uid.as_deref() != Some(uid)
            || !is_incomplete(&job)
            || job.metadata.deletion_timestamp.is_some()
        {
            return Ok(Repair::Settled);
        }
        if self
            .delete_incomplete(&jobs, name, uid, job.metadata.resource_version.clone())
            .await
        {
            Ok(Repair::Deleted)
        } else {
            Ok(Repair::NotDeleted)
        }
    }

    /// Whether `existing` is the Job `wanted` asked for, alive: same events, same owner.
    pub fn serves(&self, wanted: &Job, existing: &Job) -> bool {
        existing.metadata.deletion_timestamp.is_none() && self.check_same(wanted, existing).is_ok()
    }

    /// The Job `name`, if it exists.
    pub async fn find(&self, namespace: &str, name: &str) -> Result<Option<Job>, EmitError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        Ok(self
            .with_retries(name, || jobs.get_opt(name))
            .await?
            .flatten())
    }

    /// Runs `call` until it succeeds (`Some`), finds the object already there (`None`), or
    /// fails permanently.
    async fn with_retries<T, F, Fut>(&self, job: &str, mut call: F) -> Result<Option<T>, EmitError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut backoff = Backoff::new(self.retry.initial, self.retry.max);
        let mut attempt = 1;
        loop {
            let error = match call().await {
                Ok(value) => return Ok(Some(value)),
                Err(kube::Error::Api(status))
                    if status.code == 409 && status.reason == "AlreadyExists" =>
                {
                    return Ok(None);
                }
                Err(error) => error,
            };
            let (transient, minimum) = classify(&error);
            if !transient {
                return Err(EmitError::Refused {
                    job: job.to_string(),
                    reason: error.to_string(),
                });
            }
            if attempt >= self.retry.attempts {
                return Err(EmitError::Exhausted {
                    job: job.to_string(),
                    attempts: attempt,
                    last: error.to_string(),
                });
            }
            let sleep = backoff.next_delay().max(minimum);
            tracing::warn!(job, attempt, delay_ms = sleep.as_millis() as u64, %error, "API call failed, retrying");
            crate::metrics::METRICS.api_retries.inc();
            tokio::time::sleep(sleep).await;
            attempt += 1;
        }
    }
}

/// Whether `job` waits for its input: suspended by Spate, and not to be counted or indexed.
pub fn is_incomplete(job: &Job) -> bool {
    job.metadata
        .labels
        .as_ref()
        .is_some_and(|labels| labels.contains_key(INCOMPLETE_LABEL))
}

/// The set of event ids a Job carries; empty when it names none.
fn event_ids(job: &Job) -> BTreeSet<String> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(EVENT_IDS_ANNOTATION))
        .and_then(|ids| serde_json::from_str::<Vec<String>>(ids).ok())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Whether an error is worth retrying, and the least delay before the retry: what the API
/// server asked for (`retryAfterSeconds`, mirrored from `Retry-After`), else a second for
/// throttling, its default.
fn classify(error: &kube::Error) -> (bool, Duration) {
    let asked = |status: &kube::core::Status| {
        status
            .details
            .as_ref()
            .map(|details| details.retry_after_seconds)
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Duration::from_secs(u64::from(seconds)))
    };
    match error {
        kube::Error::Api(status) if status.code == 429 => {
            (true, asked(status).unwrap_or(Duration::from_secs(1)))
        }
        kube::Error::Api(status) => (
            status.code >= 500 || status.code == 408,
            asked(status).unwrap_or_default(),
        ),
        _ => (true, Duration::ZERO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("test", "Test")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn throttling_and_server_errors_are_retried_but_refusals_are_not() {
        assert_eq!(classify(&status(429)), (true, Duration::from_secs(1)));
        assert!(classify(&status(503)).0);
        assert!(classify(&status(500)).0);
        assert!(!classify(&status(422)).0);
        assert!(!classify(&status(403)).0);
    }

    use axum::http::Method;
    use serde_json::Value;

    use super::fake::FakeApi;

    const OWNER_UID: &str = "pipeline-uid";

    fn emitter(api: &FakeApi, owner: Option<&str>) -> Emitter {
        let fanout = FanOut {
            max_jobs_per_second: 1000.0,
            burst: 1000,
            ..FanOut::default()
        };
        let retry = RetryPolicy {
            max_attempts: 4,
            initial_backoff: "1s".to_string(),
            max_backoff: "8s".to_string(),
            ..RetryPolicy::default()
        };
        let owner = owner.map(|uid| OwnerReference {
            api_version: "spate.dev/v1alpha1".to_string(),
            kind: "Pipeline".to_string(),
            name: "p".to_string(),
            uid: uid.to_string(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        });
        Emitter::new(api.client(), &fanout, &retry, owner)
    }

    /// A Job for `ids` with an input ConfigMap, as `render_job` makes in indexed mode.
    fn rendered(ids: &[&str]) -> RenderedJob {
        let name = format!("p-{}", ids.join("-"));
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default",
                "labels": {"spate.dev/pipeline": "p"},
                "annotations": {EVENT_IDS_ANNOTATION: serde_json::to_string(ids).unwrap()}},
            "spec": {"completions": ids.len(), "parallelism": ids.len(), "template": {"spec": {
                "containers": [{"name": "work", "image": "busybox"}],
                "volumes": [{"name": "spate-input", "configMap": {"name": name}}]}}}
        }))
        .unwrap();
        let input: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "data": {"items.json": serde_json::to_string(ids).unwrap()}
        }))
        .unwrap();
        RenderedJob {
            job,
            input: Some(input),
        }
    }

    fn stored(rendered: &RenderedJob) -> Value {
        serde_json::to_value(&rendered.job).unwrap()
    }

    /// The Job can run: released, and its input is there, owned by it.
    fn assert_runnable(api: &FakeApi, name: &str) {
        let job = api.job(name).expect("the Job exists");
        assert!(!is_incomplete(&job), "{name} is still incomplete");
        assert_eq!(job.spec.as_ref().unwrap().suspend, Some(false));
        let input = api.config_map(name).expect("its input exists");
        let owners = input.metadata.owner_references.unwrap();
        assert_eq!(owners[0].uid, job.metadata.uid.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_is_released_only_once_its_input_exists() {
        let api = FakeApi::default();
        let job = rendered(&["e1", "e2"]);
        assert_eq!(
            emitter(&api, None).create(&job).await.unwrap(),
            Created::New
        );
        assert_runnable(&api, "p-e1-e2");
        let requests = api.objects().requests.clone();
        assert_eq!(
            requests,
            ["POST jobs", "POST configmaps", "PATCH jobs/p-e1-e2"],
            "suspended Job, then its input, then released"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_input_that_cannot_be_created_leaves_no_job_behind() {
        let api = FakeApi::default();
        api.objects().faults.push((Method::POST, "configmaps", 422));
        let error = emitter(&api, None)
            .create(&rendered(&["e1"]))
            .await
            .unwrap_err();
        assert!(matches!(error, EmitError::Refused { .. }), "{error}");
        assert!(api.jobs().is_empty(), "the Job would hold budget forever");
    }

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_completes_what_a_crash_left_half_done() {
        let api = FakeApi::default();
        let job = rendered(&["e1", "e2"]);
        // A crash after the suspended Job was created, before its input.
        let mut half = stored(&job);
        half["metadata"]["labels"][INCOMPLETE_LABEL] = json!("true");
        half["spec"]["suspend"] = json!(true);
        api.insert("jobs", half, Duration::from_secs(5));
        assert_eq!(
            emitter(&api, None).create(&job).await.unwrap(),
            Created::AlreadyExisted
        );
        assert_runnable(&api, "p-e1-e2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_being_deleted_is_waited_out_and_created_again() {
        let api = FakeApi::default();
        let job = rendered(&["e1"]);
        let mut dying = stored(&job);
        dying["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        dying["metadata"]["uid"] = json!("old");
        api.insert("jobs", dying, Duration::from_secs(600));
        let gone = {
            let api = api.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                api.objects().jobs.clear();
            })
        };
        let started = Instant::now();
        assert_eq!(
            emitter(&api, None).create(&job).await.unwrap(),
            Created::New
        );
        assert!(started.elapsed() >= Duration::from_secs(5));
        gone.await.unwrap();
        assert_ne!(
            api.job("p-e1").unwrap().metadata.uid.as_deref(),
            Some("old")
        );
        assert_runnable(&api, "p-e1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_never_finishes_deleting_is_refused() {
        let api = FakeApi::default();
        let job = rendered(&["e1"]);
        let mut dying = stored(&job);
        dying["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        api.insert("jobs", dying, Duration::from_secs(600));
        let error = emitter(&api, None).create(&job).await.unwrap_err();
        assert!(error.to_string().contains("is being deleted"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_namesake_with_other_events_or_another_owner_is_not_this_job() {
        let api = FakeApi::default();
        let job = rendered(&["e1"]);
        let mut other_events = stored(&job);
        other_events["metadata"]["annotations"][EVENT_IDS_ANNOTATION] = json!("[\"x\"]");
        api.insert("jobs", other_events, Duration::from_secs(60));
        let error = emitter(&api, None).create(&job).await.unwrap_err();
        assert!(
            error.to_string().contains("carries other events"),
            "{error}"
        );

        let api = FakeApi::default();
        let mut foreign = stored(&job);
        foreign["metadata"]["ownerReferences"] = json!([{"apiVersion": "spate.dev/v1alpha1",
            "kind": "Pipeline", "name": "p", "uid": "an-earlier-pipeline"}]);
        api.insert("jobs", foreign, Duration::from_secs(60));
        let error = emitter(&api, Some(OWNER_UID))
            .create(&job)
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("belongs to Pipeline p (uid an-earlier-pipeline)"),
            "{error}"
        );

        let api = FakeApi::default();
        let mut ours = stored(&job);
        ours["metadata"]["ownerReferences"] = json!([{"apiVersion": "spate.dev/v1alpha1",
            "kind": "Pipeline", "name": "p", "uid": OWNER_UID}]);
        api.insert("jobs", ours, Duration::from_secs(60));
        assert_eq!(
            emitter(&api, Some(OWNER_UID)).create(&job).await.unwrap(),
            Created::AlreadyExisted
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_with_equal_jitter() {
        let api = FakeApi::default();
        for _ in 0..3 {
            api.objects().faults.push((Method::POST, "jobs", 503));
        }
        let started = Instant::now();
        emitter(&api, None)
            .create(&rendered(&["e1"]))
            .await
            .unwrap();
        // Steps of 1 s, 2 s and 4 s, each delay drawn from the upper half of its step.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(3500) && waited <= Duration::from_secs(7),
            "{waited:?}"
        );
    }
}

/// An in-memory API server for Jobs, ConfigMaps and Events, for the engine's unit tests: it
/// answers as the real one does (409 `AlreadyExists`, 404 `NotFound`, merge patches, delete
/// preconditions, owner garbage collection), and can be slowed or made to fail on demand.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::extract::{Request, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse, Response};
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::ConfigMap;
    use parking_lot::{Mutex, MutexGuard};
    use serde_json::{Value, json};

    #[derive(Debug, Default)]
    pub struct Objects {
        pub jobs: BTreeMap<String, Value>,
        pub config_maps: BTreeMap<String, Value>,
        /// Kubernetes Events posted (the default dead-letter sink).
        pub events: Vec<Value>,
        /// `(method, resource, code)`: the next matching request fails with `code`.
        pub faults: Vec<(Method, &'static str, u16)>,
        /// How long a Job create takes.
        pub job_create_delay: Duration,
        /// Every request, as `METHOD resource[/name]`.
        pub requests: Vec<String>,
        serial: u64,
    }

    #[derive(Clone, Default)]
    pub struct FakeApi {
        objects: Arc<Mutex<Objects>>,
    }

    impl FakeApi {
        pub fn client(&self) -> kube::Client {
            let router = axum::Router::new()
                .fallback(handle)
                .with_state(self.objects.clone());
            kube::Client::new(router, "default")
        }

        pub fn objects(&self) -> MutexGuard<'_, Objects> {
            self.objects.lock()
        }

        pub fn jobs(&self) -> Vec<Job> {
            let objects = self.objects.lock();
            objects
                .jobs
                .values()
                .map(|job| serde_json::from_value(job.clone()).unwrap())
                .collect()
        }

        pub fn job(&self, name: &str) -> Option<Job> {
            let objects = self.objects.lock();
            objects
                .jobs
                .get(name)
                .map(|job| serde_json::from_value(job.clone()).unwrap())
        }

        pub fn config_map(&self, name: &str) -> Option<ConfigMap> {
            let objects = self.objects.lock();
            objects
                .config_maps
                .get(name)
                .map(|cm| serde_json::from_value(cm.clone()).unwrap())
        }

        /// Stores `object` as if created `age` ago.
        pub fn insert(&self, resource: &str, mut object: Value, age: Duration) {
            let mut objects = self.objects.lock();
            objects.serial += 1;
            let serial = objects.serial;
            let created = jiff::Timestamp::now() - jiff::SignedDuration::try_from(age).unwrap();
            let metadata = &mut object["metadata"];
            if metadata.get("uid").is_none() {
                metadata["uid"] = json!(format!("uid-{serial}"));
            }
            metadata["resourceVersion"] = json!(serial.to_string());
            metadata["creationTimestamp"] = json!(created.to_string());
            let name = metadata["name"].as_str().unwrap().to_string();
            let store = match resource {
                "jobs" => &mut objects.jobs,
                _ => &mut objects.config_maps,
            };
            store.insert(name, object);
        }
    }

    fn status(code: u16, reason: &str, message: &str) -> Response {
        let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code});
        (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
    }

    fn ok(object: &Value) -> Response {
        (StatusCode::OK, axum::Json(object.clone())).into_response()
    }

    /// RFC 7386: objects merge, `null` removes, anything else replaces.
    fn merge(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(fields) => {
                if !target.is_object() {
                    *target = json!({});
                }
                for (key, value) in fields {
                    if value.is_null() {
                        target.as_object_mut().unwrap().remove(key);
                    } else {
                        merge(&mut target[key.as_str()], value);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }

    fn selected(object: &Value, selector: &str) -> bool {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| {
            let labels = &object["metadata"]["labels"];
            match term.split_once('=') {
                Some((key, value)) => labels[key].as_str() == Some(value),
                None => labels.get(term).is_some(),
            }
        })
    }

    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    async fn handle(State(objects): State<Arc<Mutex<Objects>>>, request: Request) -> Response {
        let method = request.method().clone();
        let path: Vec<String> = request
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let selector = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix("labelSelector="))
            .map(decode)
            .unwrap_or_default();
        let body = axum::body::to_bytes(request.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (resource, name) = match path.as_slice() {
            [.., namespaces, _, resource] if namespaces == "namespaces" => (resource.clone(), None),
            [.., namespaces, _, resource, name] if namespaces == "namespaces" => {
                (resource.clone(), Some(name.clone()))
            }
            _ => return status(404, "NotFound", "no such path"),
        };
        let delay = {
            let mut objects = objects.lock();
            objects.requests.push(match &name {
                Some(name) => format!("{method} {resource}/{name}"),
                None => format!("{method} {resource}"),
            });
            let fault = objects
                .faults
                .iter()
                .position(|(m, r, _)| *m == method && *r == resource);
            if let Some(at) = fault {
                let (_, _, code) = objects.faults.remove(at);
                return status(code, "Injected", "injected fault");
            }
            objects.job_create_delay
        };
        if method == Method::POST && resource == "jobs" {
            tokio::time::sleep(delay).await;
        }
        let mut objects = objects.lock();
        objects.serial += 1;
        let serial = objects.serial;
        if resource == "events" {
            objects.events.push(body);
            return (
                StatusCode::CREATED,
                axum::Json(json!({"metadata": {"name": "e"}})),
            )
                .into_response();
        }
        let store = match resource.as_str() {
            "jobs" => &mut objects.jobs,
            "configmaps" => &mut objects.config_maps,
            _ => return status(404, "NotFound", "no such resource"),
        };
        let mut deleted_uid = None;
        let response = match (method, name) {
            (Method::POST, None) => {
                let mut object = body;
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if store.contains_key(&name) {
                    return status(
                        409,
                        "AlreadyExists",
                        &format!("{resource} {name} already exists"),
                    );
                }
                object["metadata"]["uid"] = json!(format!("uid-{serial}"));
                object["metadata"]["resourceVersion"] = json!(serial.to_string());
                object["metadata"]["creationTimestamp"] = json!(jiff::Timestamp::now().to_string());
                store.insert(name, object.clone());
                (StatusCode::CREATED, axum::Json(object)).into_response()
            }
            (Method::GET, None) => {
                let items: Vec<Value> = store
                    .values()
                    .filter(|object| selected(object, &selector))
                    .cloned()
                    .collect();
                ok(&json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": serial.to_string()}, "items": items}))
            }
            (Method::GET, Some(name)) => match store.get(&name) {
                Some(object) => ok(object),
                None => status(404, "NotFound", &format!("{resource} {name} not found")),
            },
            (Method::PATCH, Some(name)) => match store.get_mut(&name) {
                Some(object) => {
                    merge(object, &body);
                    object["metadata"]["resourceVersion"] = json!(serial.to_string());
                    ok(object)
                }
                None => status(404, "NotFound", &format!("{resource} {name} not found")),
            },
            (Method::DELETE, Some(name)) => {
                let Some(object) = store.get(&name).cloned() else {
                    return status(404, "NotFound", &format!("{resource} {name} not found"));
                };
                let preconditions = &body["preconditions"];
                for field in ["uid", "resourceVersion"] {
                    if let Some(wanted) = preconditions[field].as_str()
                        && object["metadata"][field].as_str() != Some(wanted)
                    {
                        return status(409, "Conflict", &format!("precondition {field} failed"));
                    }
                }
                store.remove(&name);
                deleted_uid = Some(object["metadata"]["uid"].clone());
                ok(&object)
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        };
        if let Some(uid) = deleted_uid {
            // Garbage collection of what the deleted object owned.
            objects.config_maps.retain(|_, cm| {
                !cm["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|owners| owners.iter().any(|o| o["uid"] == uid))
            });
        }
        response
    }
}
