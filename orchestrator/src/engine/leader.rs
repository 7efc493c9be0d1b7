//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never run the same
//! pipelines: only the holder of the Lease runs them; the others stay live and ready and wait.
//!
//! The holder renews the Lease every `renew`; a Lease not renewed for `duration` may be taken
//! over. Updates use the Lease's resourceVersion, so two candidates racing for an expired
//! Lease cannot both win: the loser gets 409 and tries again later. A holder that cannot renew
//! before its Lease expires steps down (cancels its work) before anyone else can take over,
//! including when the renewal itself hangs: each renewal gets only the time left until then.
//!
//! Expiry is judged as client-go does, on the candidate's own monotonic clock: a Lease has
//! expired when the candidate has seen it unchanged for `duration`. Its `renewTime` is the
//! holder's wall clock, and comparing it with the candidate's would let a candidate whose
//! clock runs ahead (or a holder whose clock is behind) take a Lease that is being renewed.

use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// Waits until this replica holds the Lease, then returns a token that is cancelled when it
/// stops holding it (renewal failed, or `shutdown`).
pub async fn acquire(
    client: kube::Client,
    config: LeaseConfig,
    shutdown: CancellationToken,
) -> Option<CancellationToken> {
    let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut seen = Seen::default();
    loop {
        match try_acquire(&leases, &config, &mut seen).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, lease = %config.name, "leader election"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(config.renew) => {}
        }
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "became leader");
    let leading = shutdown.child_token();
    let renewing = leading.clone();
    tokio::spawn(async move {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = renewing.cancelled() => break,
                _ = tokio::time::sleep(config.renew) => {}
            }
            // Stepped down by then, others may take the Lease `renew` later at the earliest.
            let step_down_at = last_renewal + config.duration.saturating_sub(config.renew);
            let renewal =
                tokio::time::timeout_at(step_down_at, try_acquire(&leases, &config, &mut seen));
            match renewal.await {
                Ok(Ok(true)) => last_renewal = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!(lease = %config.name, "lost the lease to another replica");
                    break;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "could not renew the lease");
                    if Instant::now() >= step_down_at {
                        break;
                    }
                }
                Err(_) => {
                    tracing::warn!(lease = %config.name, "the lease renewal did not answer before the lease could expire; stepping down");
                    break;
                }
            }
        }
        renewing.cancel();
    });
    Some(leading)
}

/// Another holder's Lease as this replica last saw it (its resourceVersion, which every
/// renewal changes), and since when, by this replica's clock.
#[derive(Default)]
struct Seen {
    version: Option<String>,
    since: Option<Instant>,
}

impl Seen {
    /// How long `lease` has looked the same to this replica.
    fn unchanged_for(&mut self, lease: &Lease) -> Duration {
        let now = Instant::now();
        if self.since.is_none() || self.version != lease.metadata.resource_version {
            self.version.clone_from(&lease.metadata.resource_version);
            self.since = Some(now);
        }
        self.since.map_or(Duration::ZERO, |since| now - since)
    }
}

/// Takes or renews the Lease; `Ok(false)` when another live holder has it.
async fn try_acquire(
    leases: &Api<Lease>,
    config: &LeaseConfig,
    seen: &mut Seen,
) -> Result<bool, kube::Error> {
    let now = MicroTime(jiff::Timestamp::now());
    let duration_seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = leases.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        };
    };
    let unchanged_for = seen.unchanged_for(&lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let expired = match (&spec.holder_identity, spec.lease_duration_seconds) {
        (Some(_), Some(seconds)) => {
            unchanged_for >= Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
        }
        _ => true,
    };
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(duration_seconds);
    match leases
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}
