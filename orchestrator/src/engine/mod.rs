//! The fan-out engine: per pipeline, a source feeding an intake that creates Jobs, and a
//! tracker watching them.
//!
//! ```text
//! source ──Delivery──▶ intake: batch ▸ render ▸ budget ▸ rate ▸ create Job ▸ ack
//!                                        ▲
//!                  tracker: watch Jobs ──┘ (pods in use) ──▶ sinks (results, dead letters)
//! ```

mod batch;
pub mod budget;
pub mod checkpoints;
pub mod controller;
pub mod emit;
pub mod http;
mod index;
mod intake;
pub mod leader;
#[cfg(test)]
mod model;
pub mod secrets;
mod sinks;
pub mod stats;
mod stuck;
pub mod tenancy;
pub mod tracker;
mod widen;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use spate_sinks::{PipelineRef, SinkContext};
use spate_sources::SourceContext;
use spate_sources::backlog::Backlog;
use spate_sources::checkpoint::CheckpointStore;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{FanOutMode, LoadedPipeline};
use crate::render::pipeline_namespace;
use budget::Budget;

/// Process-wide settings.
#[derive(Clone)]
pub struct EngineOptions {
    /// Where sources keep local state.
    pub state_dir: PathBuf,
    /// Where sources save checkpoints.
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// Pods at once across all pipelines of the process (the namespace budget).
    pub namespace_budget: Option<Budget>,
    /// The shared webhook server, when any pipeline has a webhook source.
    pub webhooks: Option<spate_sources::webhook::WebhookServer>,
    /// How long SIGTERM waits for creates in flight before giving their events back.
    pub drain_timeout: Duration,
    /// What each pipeline may use of the process's own environment, identity and files.
    pub tenancy: Arc<tenancy::Tenancy>,
}

/// Pipelines being run, and how to stop them.
pub struct Engine {
    /// Sources and intakes: they end when the sources stop.
    flow: JoinSet<()>,
    /// Trackers and stuck-pod sweepers: they run until everything stops.
    watchers: JoinSet<()>,
    sources: CancellationToken,
    everything: CancellationToken,
    drain_timeout: Duration,
    /// One per pipeline: true once its Job watch has listed what exists.
    pub synced: Vec<watch::Receiver<bool>>,
    /// What each pipeline is doing, for status.
    pub pipelines: Vec<RunningPipeline>,
}

/// A started pipeline's live numbers.
#[derive(Clone)]
pub struct RunningPipeline {
    pub id: String,
    pub stats: Arc<stats::PipelineStats>,
    pub budget: Budget,
    /// What the source last reported it still holds for the pipeline.
    pub backlog: Backlog,
    /// Why the source stopped for good, once it has (a queue that does not exist, refused
    /// credentials): the pipeline takes no more events.
    pub source_failure: Arc<OnceLock<String>>,
}

impl Engine {
    /// Connects every pipeline's source and sinks and starts them. Fails, naming the
    /// pipeline, if one cannot be connected.
    pub async fn start(
        client: kube::Client,
        pipelines: Vec<LoadedPipeline>,
        options: EngineOptions,
    ) -> anyhow::Result<Engine> {
        let sources = CancellationToken::new();
        let everything = CancellationToken::new();
        let mut flow = JoinSet::new();
        let mut watchers = JoinSet::new();
        let mut synced = Vec::new();
        let mut running = Vec::new();
        for loaded in pipelines {
            let namespace = pipeline_namespace(&loaded.pipeline);
            let name = loaded.pipeline.metadata.name.clone().unwrap_or_default();
            let id = format!("{namespace}/{name}");
            let spec = &loaded.pipeline.spec;
            let secrets = Arc::new(secrets::KubeSecrets {
                client: client.clone(),
                namespace: namespace.clone(),
                authority: options.tenancy.for_namespace(&namespace),
            });
            let sinks = sinks::PipelineSinks::connect(
                &spec.sinks,
                &SinkContext {
                    pipeline: PipelineRef {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        uid: loaded.pipeline.metadata.uid.clone(),
                    },
                    secrets: secrets.clone(),
                    kube: Some(client.clone()),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("pipeline {id}: {e}"))?;
            let sinks = Arc::new(sinks);
            let backlog = Backlog::default();
            let source = spec
                .source
                .build(&SourceContext {
                    pipeline: id.clone(),
                    secrets,
                    checkpoints: options.checkpoints.clone(),
                    state_dir: options.state_dir.clone(),
                    webhooks: options.webhooks.clone(),
                    backlog: backlog.clone(),
                })
                .await
                .with_context(|| {
                    format!(
                        "pipeline {id}: cannot start its {} source",
                        spec.source.kind()
                    )
                })?;
            let budget = Budget::with_parent(
                spec.fanout.max_parallelism,
                options.namespace_budget.clone(),
            );
            let stats = Arc::new(stats::PipelineStats::default());
            let source_failure = Arc::new(OnceLock::new());
            running.push(RunningPipeline {
                id: id.clone(),
                stats: stats.clone(),
                budget: budget.clone(),
                backlog,
                source_failure: source_failure.clone(),
            });
            let emitter = emit::Emitter::new(
                client.clone(),
                &spec.fanout,
                &spec.retry,
                owner_reference(&loaded.pipeline),
            );
            let (synced_tx, synced_rx) = watch::channel(false);
            let known = index::EventIndex::default();
            synced.push(synced_rx.clone());
            let tracker = tracker::Tracker {
                client: client.clone(),
                namespace: namespace.clone(),
                pipeline: name.clone(),
                budget: budget.clone(),
                sinks: sinks.clone(),
                synced: synced_tx,
                known: known.clone(),
                stats: stats.clone(),
            };
            watchers.spawn(tracker.run(everything.clone()));
            let stuck = stuck::StuckPods {
                client: client.clone(),
                namespace: namespace.clone(),
                pipeline: name.clone(),
                timeout: spate_sources::check::parse_duration(&spec.retry.pending_timeout),
            };
            watchers.spawn(stuck.run(everything.clone()));

            // A small channel: the broker, not Spate, holds a backlog.
            let capacity = match spec.fanout.mode {
                FanOutMode::PerEvent => 16,
                FanOutMode::Indexed => spec.fanout.batch_size as usize,
            };
            let (deliveries_tx, deliveries_rx) = mpsc::channel(capacity);
            let source_shutdown = sources.clone();
            let source_id = id.clone();
            flow.spawn(async move {
                if let Err(error) = source.run(deliveries_tx, source_shutdown).await {
                    tracing::error!(pipeline = %source_id, %error, "source stopped");
                    let _ = source_failure.set(error.to_string());
                }
            });
            let intake = intake::Intake {
                pipeline: Arc::new(loaded),
                id,
                budget,
                emitter,
                sinks,
                known,
                stats,
            };
            let intake_shutdown = everything.clone();
            let mut synced_rx = synced_rx;
            flow.spawn(async move {
                // The budget is right only once existing Jobs are counted.
                if synced_rx.wait_for(|synced| *synced).await.is_ok() {
                    intake.run(deliveries_rx, intake_shutdown).await;
                }
            });
        }
        Ok(Engine {
            flow,
            watchers,
            sources,
            everything,
            drain_timeout: options.drain_timeout,
            synced,
            pipelines: running,
        })
    }

    /// Stops taking events, lets creates in flight finish and acknowledge (up to the drain
    /// timeout), then stops everything.
    pub async fn shutdown(self) {
        self.shutdown_unless(&CancellationToken::new()).await;
    }

    /// [`Engine::shutdown`], cut short into [`Engine::abort`] when `abort` fires during the
    /// drain: a controller that loses the leader Lease while one pipeline drains (its spec
    /// changed, it was deleted) must not keep creating Jobs for up to the drain timeout while
    /// another replica takes over.
    pub async fn shutdown_unless(mut self, abort: &CancellationToken) {
        self.sources.cancel();
        // Sources close their channels; intakes finish their creates, acknowledge and end.
        let drain = tokio::time::timeout(self.drain_timeout, async {
            while self.flow.join_next().await.is_some() {}
        });
        tokio::select! {
            drained = drain => {
                if drained.is_err() {
                    tracing::warn!("drain timeout: unfinished events go back to their sources");
                }
            }
            _ = abort.cancelled() => {
                tracing::warn!("drain cut short: unfinished events go back to their sources");
            }
        }
        self.everything.cancel();
        while self.flow.join_next().await.is_some() {}
        while self.watchers.join_next().await.is_some() {}
        // The status keeps a copy of each budget: closing, not dropping, is what gives a
        // stopped pipeline's pods back to the namespace's cap.
        for pipeline in &self.pipelines {
            pipeline.budget.close();
        }
    }

    /// Stops at once, creates in flight included: for a replica that lost the leader Lease,
    /// which must be stopped before another replica can take the Lease over. The events it
    /// holds are not settled, so their brokers deliver them again, to the new leader.
    pub async fn abort(mut self) {
        self.sources.cancel();
        self.everything.cancel();
        while self.flow.join_next().await.is_some() {}
        while self.watchers.join_next().await.is_some() {}
        for pipeline in &self.pipelines {
            pipeline.budget.close();
        }
    }

    /// Runs until `until` fires (`true`), or until every pipeline's flow has ended on its own
    /// (`false`): a source that fails for good stops its own pipeline, logged as an error,
    /// and the others keep running.
    pub async fn wait(&mut self, until: CancellationToken) -> bool {
        loop {
            tokio::select! {
                _ = until.cancelled() => return true,
                ended = self.flow.join_next() => {
                    if ended.is_none() {
                        return false;
                    }
                }
            }
        }
    }
}

/// Jobs of a Pipeline that lives in the cluster are owned by it, so deleting the Pipeline
/// deletes them; pipelines from files have no uid and own nothing.
fn owner_reference(
    pipeline: &crate::pipeline::Pipeline,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    use kube::Resource;
    Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: crate::pipeline::Pipeline::api_version(&()).to_string(),
            kind: crate::pipeline::Pipeline::kind(&()).to_string(),
            name: pipeline.metadata.name.clone()?,
            uid: pipeline.metadata.uid.clone()?,
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    )
}
