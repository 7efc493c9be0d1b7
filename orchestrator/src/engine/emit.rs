//! Creates a rendered Job (and its input ConfigMap) through the Kubernetes API.
//!
//! Creation is idempotent by construction: Job names are derived from event ids, so `409
//! AlreadyExists` means a previous attempt (before a crash, or of a redelivered event)
//! already created it, and counts as success. Transient failures (429, 5xx, connection
//! errors) are retried with exponential backoff and full jitter up to the pipeline's
//! `maxAttempts`; anything else (422 Invalid, 403 Forbidden) is permanent and goes back to the
//! caller for dead-lettering.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use rand::Rng;

use crate::pipeline::{FanOut, RetryPolicy};
use crate::render::RenderedJob;
use spate_sources::check::parse_duration;

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
}

/// What a successful creation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// The Job was already there (a redelivery or a retry after a crash).
    AlreadyExisted,
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

    /// Creates the Job, then its input ConfigMap owned by it. A Job whose ConfigMap is not
    /// there yet simply waits (kubelets retry volume mounts), so a crash between the two is
    /// repaired when the redelivered event creates the ConfigMap.
    pub async fn create(&self, rendered: &RenderedJob) -> Result<Created, EmitError> {
        self.limiter.until_ready().await;
        let mut job = rendered.job.clone();
        if let Some(owner) = &self.owner {
            job.metadata.owner_references = Some(vec![owner.clone()]);
        }
        let namespace = job.metadata.namespace.clone().unwrap_or_default();
        let name = job.metadata.name.clone().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &namespace);
        let post = PostParams::default();
        let (created, uid) = match self
            .with_retries(&name, || jobs.create(&post, &job))
            .await?
        {
            Some(job) => (Created::New, job.metadata.uid),
            None => {
                let existing = self.with_retries(&name, || jobs.get(&name)).await?;
                (
                    Created::AlreadyExisted,
                    existing.and_then(|job| job.metadata.uid),
                )
            }
        };
        if let Some(input) = &rendered.input {
            let mut input = input.clone();
            input.metadata.owner_references = uid.map(|uid| {
                vec![OwnerReference {
                    api_version: Job::api_version(&()).to_string(),
                    kind: Job::kind(&()).to_string(),
                    name: name.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            });
            let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
            self.with_retries(&name, || config_maps.create(&post, &input))
                .await?;
        }
        Ok(created)
    }

    /// Runs `call` until it succeeds (`Some`), finds the object already there (`None`), or
    /// fails permanently.
    async fn with_retries<T, F, Fut>(&self, job: &str, mut call: F) -> Result<Option<T>, EmitError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut delay = self.retry.initial;
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
            let sleep = jittered(delay).max(minimum);
            tracing::warn!(job, attempt, delay_ms = sleep.as_millis() as u64, %error, "API call failed, retrying");
            crate::metrics::METRICS.api_retries.inc();
            tokio::time::sleep(sleep).await;
            delay = (delay * 2).min(self.retry.max);
            attempt += 1;
        }
    }
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

/// Full jitter: a uniformly random delay up to `delay`, so retrying clients spread out.
fn jittered(delay: Duration) -> Duration {
    let millis = delay.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
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

    #[test]
    fn jitter_stays_between_half_and_the_whole_delay() {
        for _ in 0..100 {
            let delay = jittered(Duration::from_millis(200));
            assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(200));
        }
    }
}
