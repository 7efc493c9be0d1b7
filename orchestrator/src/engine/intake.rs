//! The intake of one pipeline: deliveries from its source become Jobs.
//!
//! For each Job's worth of events (one, or a batch in indexed mode): render it, reserve pods
//! in the budget (waiting while it is full, which stops reading the source so the broker holds
//! the rest), wait for the rate limiter, create the Job, and only then acknowledge the events
//! to their source. An event that cannot become a Job (its template fails to render, the API
//! refuses it, retries run out) goes to the dead-letter sink with the reason and is rejected
//! at its source; if even the dead-letter sink fails, the event is handed back for
//! redelivery. Nothing is acknowledged without its Job, and nothing is dropped.

use std::sync::Arc;
use std::time::Duration;

use spate_sinks::{Outcome, Record};
use spate_sources::{Delivery, Event};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::next_batch;
use super::budget::Budget;
use super::emit::Emitter;
use super::index::EventIndex;
use super::sinks::PipelineSinks;
use crate::metrics::{self, METRICS};
use crate::pipeline::{FanOutMode, LoadedPipeline};
use crate::render::render_job;
use spate_sources::check::parse_duration;

/// Job creations in flight at once per pipeline: enough to hide API latency, few enough to
/// stay polite to the API server.
const CONCURRENT_CREATES: usize = 32;

pub struct Intake {
    pub pipeline: Arc<LoadedPipeline>,
    /// `namespace/name`, for records and logs.
    pub id: String,
    pub budget: Budget,
    pub emitter: Emitter,
    pub sinks: Arc<PipelineSinks>,
    pub known: EventIndex,
    pub stats: Arc<super::stats::PipelineStats>,
}

impl Intake {
    /// Runs until the source's channel closes or `shutdown` is cancelled; then waits for the
    /// creates in flight and settles their events before returning.
    pub async fn run(self, mut deliveries: mpsc::Receiver<Delivery>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let fanout = &this.pipeline.pipeline.spec.fanout;
        let (size, max_wait) = match fanout.mode {
            FanOutMode::PerEvent => (1, Duration::ZERO),
            FanOutMode::Indexed => (fanout.batch_size as usize, parse_duration(&fanout.max_wait)),
        };
        let permits = Arc::new(Semaphore::new(CONCURRENT_CREATES));
        let mut creates = JoinSet::new();
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = next_batch(&mut deliveries, size, max_wait) => batch,
            };
            let Some(batch) = batch else { break };
            let arrived = Instant::now();
            this.stats.received(batch.len());
            METRICS
                .events_received
                .get_or_create(&metrics::pipeline(&this.id))
                .inc_by(batch.len() as u64);
            // One span per Job-to-be, from the event ids to the Job name, so a log search for
            // an event finds its Job, its retries and its acknowledgement.
            let span = tracing::info_span!(
                "event",
                pipeline = %this.id,
                event = %batch_label(&batch),
                job = tracing::field::Empty,
            );
            let Some(mut prepared) = this.render(batch).instrument(span.clone()).await else {
                continue;
            };
            span.record("job", prepared.name.as_str());
            let granted = tokio::select! {
                _ = shutdown.cancelled() => {
                    prepared.give_back().await;
                    break;
                }
                granted = this.budget.reserve(&prepared.name, prepared.wanted) => granted,
            };
            prepared.fit(granted);
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    this.budget.release(&prepared.name);
                    prepared.give_back().await;
                    break;
                }
                permit = permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { break };
            let this = this.clone();
            creates.spawn(
                async move {
                    this.create(prepared, arrived).await;
                    drop(permit);
                }
                .instrument(span),
            );
            // Reap finished creates so the set stays small during long runs.
            while creates.try_join_next().is_some() {}
        }
        // Stop taking events, finish what is in flight so its events are acknowledged.
        while creates.join_next().await.is_some() {}
    }

    /// Renders the batch; `None` when its events were dead-lettered instead, or all already
    /// had Jobs. Events that already have a Job (a redelivery) are acknowledged here.
    async fn render(&self, batch: Vec<Delivery>) -> Option<Prepared> {
        let batch = self.skip_existing(batch).await;
        if batch.is_empty() {
            return None;
        }
        let events: Vec<Event> = batch.iter().map(|d| d.event.clone()).collect();
        let loaded = &self.pipeline;
        let rendered = match render_job(&loaded.pipeline, &loaded.template, &loaded.values, &events)
        {
            Ok(rendered) => rendered,
            Err(error) => {
                self.dead_letter(
                    batch,
                    None,
                    format!("cannot render the Job template: {error}"),
                )
                .await;
                return None;
            }
        };
        let name = rendered.job.metadata.name.clone().unwrap_or_default();
        let wanted = rendered
            .job
            .spec
            .as_ref()
            .and_then(|spec| spec.parallelism)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(1);
        Some(Prepared {
            batch,
            rendered,
            name,
            wanted,
        })
    }

    async fn skip_existing(&self, batch: Vec<Delivery>) -> Vec<Delivery> {
        let existing = self.known.existing(batch.iter().map(|d| d.event.id()));
        if existing.is_empty() {
            return batch;
        }
        let mut fresh = Vec::with_capacity(batch.len());
        for delivery in batch {
            if existing.contains(delivery.event.id()) {
                tracing::debug!(pipeline = %self.id, event = %delivery.event.id(), "redelivered event already has a Job; acknowledging");
                if let Err(error) = delivery.ack.ack().await {
                    tracing::warn!(pipeline = %self.id, %error, "ack of a redelivered event failed");
                }
            } else {
                fresh.push(delivery);
            }
        }
        fresh
    }

    async fn create(&self, prepared: Prepared, arrived: Instant) {
        let Prepared {
            batch,
            rendered,
            name,
            ..
        } = prepared;
        let started = Instant::now();
        let label = metrics::pipeline(&self.id);
        match self.emitter.create(&rendered).await {
            Ok(created) => {
                self.known
                    .insert(&name, batch.iter().map(|d| d.event.id().to_string()));
                METRICS.jobs_created.get_or_create(&label).inc();
                METRICS
                    .job_create_seconds
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(pipeline = %self.id, job = %name, ?created, events = batch.len(), "Job exists");
                {
                    let latency = METRICS.event_to_job_seconds.get_or_create(&label);
                    for _ in &batch {
                        latency.observe(arrived.elapsed().as_secs_f64());
                    }
                }
                // Settled together, so a source that persists acks (a checkpoint) can save
                // once for the whole Job instead of once per event.
                let acks = batch.into_iter().map(|delivery| {
                    let id = delivery.event.id().to_string();
                    async move { (id, delivery.ack.ack().await) }
                });
                for (id, acked) in futures::future::join_all(acks).await {
                    if let Err(error) = acked {
                        // The Job exists; a redelivery finds it (index or 409), so this is safe.
                        tracing::warn!(pipeline = %self.id, event = %id, %error, "ack failed; the source will redeliver");
                    }
                }
            }
            // Refused, or retries exhausted: either way the events cannot become a Job now.
            Err(error) => {
                self.budget.release(&name);
                self.dead_letter(batch, Some(name), error.to_string()).await;
            }
        }
    }

    /// Sends the events to the dead-letter sink with `reason`, then rejects them at their
    /// source. If the dead-letter sink fails too, they go back for redelivery instead.
    async fn dead_letter(&self, batch: Vec<Delivery>, job: Option<String>, reason: String) {
        let at = jiff::Timestamp::now().to_string();
        let records: Vec<Record> = batch
            .iter()
            .map(|delivery| Record {
                pipeline: self.id.clone(),
                outcome: Outcome::DeadLettered,
                event: delivery.event.to_json(),
                job: job.clone(),
                reason: Some(reason.clone()),
                at: at.clone(),
            })
            .collect();
        tracing::warn!(pipeline = %self.id, events = batch.len(), %reason, "dead-lettering");
        match self.sinks.dead_letter(&records).await {
            Ok(()) => {
                self.stats.dead_lettered(batch.len(), &reason);
                METRICS
                    .dead_letters
                    .get_or_create(&metrics::pipeline(&self.id))
                    .inc_by(batch.len() as u64);
                for delivery in batch {
                    if let Err(error) = delivery.ack.reject(reason.clone()).await {
                        tracing::warn!(pipeline = %self.id, %error, "reject failed");
                    }
                }
            }
            Err(error) => {
                tracing::error!(pipeline = %self.id, %error, "dead-letter sink failed; handing the events back for redelivery");
                Prepared::give_back_all(batch).await;
            }
        }
    }
}

/// A rendered Job with its reserved pods and the deliveries it carries.
struct Prepared {
    batch: Vec<Delivery>,
    rendered: crate::render::RenderedJob,
    name: String,
    /// Pods the Job would run at once.
    wanted: u32,
}

impl Prepared {
    /// Starts an indexed Job with the pods free now; the Job controller queues the rest.
    fn fit(&mut self, granted: u32) {
        if granted < self.wanted
            && let Some(spec) = self.rendered.job.spec.as_mut()
        {
            spec.parallelism = i32::try_from(granted).ok();
        }
    }

    async fn give_back(self) {
        Self::give_back_all(self.batch).await;
    }

    async fn give_back_all(batch: Vec<Delivery>) {
        for delivery in batch {
            if let Err(error) = delivery.ack.retry().await {
                tracing::warn!(%error, "could not hand an event back; the broker redelivers it when the connection closes");
            }
        }
    }
}

/// The event id of a one-event batch; the first id and how many more for a larger one.
fn batch_label(batch: &[Delivery]) -> String {
    match batch {
        [] => String::new(),
        [only] => only.event.id().to_string(),
        [first, rest @ ..] => format!("{} (+{} more)", first.event.id(), rest.len()),
    }
}
