//! The controllers a real control plane runs for the resources Spate uses: the Job
//! controller ([`job`]), the scheduler ([`scheduler`]), the garbage collector ([`gc`]) and
//! TTL-after-finished clean-up ([`ttl`]).
//!
//! Each talks to the API server only through a [`kube::Client`], watches through
//! `kube::runtime` reflectors (which survive dropped watches and `410 Gone`), and retries
//! throttled or failed writes a bounded number of times ([`retry`]).

pub(crate) mod events;
mod gc;
pub mod job;
mod relist;
mod resources;
pub(crate) mod retry;
mod scheduler;
pub mod ttl;

use tokio_util::sync::CancellationToken;

/// Runs every controller against `client` until `shutdown` is cancelled.
pub async fn run(
    client: kube::Client,
    config: ControllersConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tokio::join!(
        job::run(client.clone(), config.job_concurrency, shutdown.clone()),
        scheduler::run(client.clone(), shutdown.clone()),
        gc::run(client.clone(), shutdown.clone()),
        ttl::run(client, shutdown),
    );
    Ok(())
}

/// Tuning for the controllers.
#[derive(Debug, Clone)]
pub struct ControllersConfig {
    /// Jobs reconciled at once by the Job controller.
    pub job_concurrency: u16,
}

impl Default for ControllersConfig {
    fn default() -> Self {
        Self {
            job_concurrency: 32,
        }
    }
}
