//! The intake of one pipeline: deliveries from its source become Jobs.
//!
//! For each batch (one event in `perEvent` mode): drop the events that already have a Job
//! (a redelivery, acknowledged at once) and the second deliveries of events already taken
//! (settled as the first one is), claim the rest, render them as as many Jobs as the API
//! server's size limits require, and for each Job reserve pods in the budget (waiting while
//! it is full, which stops reading the source so the broker holds the rest), wait for the
//! rate limiter, create the Job, and only then acknowledge its events. An event that cannot
//! become a Job (its template fails to render, it is larger than any Job can carry, the API
//! refuses it, its source refused it: not readable, delivered too often) goes to the
//! dead-letter sink with the reason and is rejected
//! at its source; if even the dead-letter sink fails, the event is handed back for
//! redelivery. Nothing is acknowledged without its Job, and nothing is dropped.
//!
//! An event is claimed from the moment its batch is taken until its Job exists or it is
//! settled otherwise, so a delivery of it arriving meanwhile (the source's redelivery timer
//! is shorter than the budget wait and the create) joins that outcome instead of becoming a
//! second Job. The index leaves out the Jobs a crash left incomplete (see [`super::emit`]),
//! so a delivery of one of their events becomes a Job that runs; the incomplete Jobs found at
//! startup are deleted after a grace period.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use parking_lot::Mutex;
use spate_sinks::{Outcome, Record};
use spate_sources::backoff::Backoff;
use spate_sources::{Delivery, Event};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::batch::next_batch;
use super::budget::Budget;
use super::emit::{self, Created, EmitError, Emitter, Repair};
use super::index::EventIndex;
use super::sinks::PipelineSinks;
use crate::metrics::{self, METRICS};
use crate::pipeline::{FanOutMode, LoadedPipeline};
use crate::render::{PIPELINE_LABEL, RenderError, pipeline_namespace, render_parts};
use spate_sources::check::parse_duration;

/// Job creations in flight at once per pipeline: enough to hide API latency, few enough to
/// stay polite to the API server.
const CONCURRENT_CREATES: usize = 32;
/// How long an incomplete Job found at startup is left alone, counted from when this process
/// found it: a leader that lost its Lease mid-create may still be completing it.
const REPAIR_GRACE: Duration = Duration::from_secs(120);

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

/// How a claim's events were settled, for the other deliveries of the same events.
#[derive(Debug, Clone, PartialEq)]
enum Settled {
    Created,
    Rejected(String),
}

/// A claim's outcome, `None` until settled; the claim dropped unsettled means handed back.
type ClaimOutcome = watch::Receiver<Option<Settled>>;
/// Event id to the outcome of the Job (or dead letter) that has claimed it.
type Claims = HashMap<String, ClaimOutcome>;

/// The intake while it runs.
struct Running {
    intake: Intake,
    /// Event ids taken by a Job being created, from the moment their batch is taken until
    /// they are settled.
    claims: Mutex<Claims>,
    /// Incomplete Jobs to delete once [`REPAIR_GRACE`] has passed since they were found.
    to_repair: mpsc::UnboundedSender<(Job, Instant)>,
}

/// The event ids of one Job-to-be. Dropping it ends the claim; the outcome is what
/// [`Claim::settle`] said, or "handed back" when it said nothing.
struct Claim {
    ids: Vec<String>,
    outcome: watch::Sender<Option<Settled>>,
    running: Arc<Running>,
}

impl Claim {
    fn settle(&self, settled: Settled) {
        self.outcome.send_replace(Some(settled));
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Only the intake's loop claims, and never an id already claimed, so every id here
        // is still this claim's.
        let mut claims = self.running.claims.lock();
        for id in &self.ids {
            claims.remove(id);
        }
    }
}

/// What taking a batch found.
#[derive(Default)]
struct Taken {
    /// Deliveries of events that already have a Job.
    done: Vec<Delivery>,
    /// Deliveries of events claimed by a Job being created, and that claim's outcome.
    followers: Vec<(Delivery, ClaimOutcome)>,
    /// The Jobs to create.
    parts: Vec<Prepared>,
    /// Events that cannot become a Job, with the reason.
    refused: Vec<(Vec<Delivery>, Claim, String)>,
}

impl Intake {
    /// Runs until the source's channel closes or `shutdown` is cancelled; then waits for the
    /// creates in flight and settles their events before returning.
    pub async fn run(self, mut deliveries: mpsc::Receiver<Delivery>, shutdown: CancellationToken) {
        let fanout = &self.pipeline.pipeline.spec.fanout;
        let (size, max_wait) = match fanout.mode {
            FanOutMode::PerEvent => (1, Duration::ZERO),
            FanOutMode::Indexed => (fanout.batch_size as usize, parse_duration(&fanout.max_wait)),
        };
        let (to_repair, repairs) = mpsc::unbounded_channel();
        let this = Arc::new(Running {
            intake: self,
            claims: Mutex::default(),
            to_repair,
        });
        let repairs = tokio::spawn(this.clone().repair(repairs, shutdown.clone()));
        let permits = Arc::new(Semaphore::new(CONCURRENT_CREATES));
        let mut creates = JoinSet::new();
        'batches: loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                batch = next_batch(&mut deliveries, size, max_wait) => batch,
            };
            let Some(batch) = batch else { break };
            let arrived = Instant::now();
            this.intake.stats.received(batch.len());
            METRICS
                .events_received
                .get_or_create(&metrics::pipeline(&this.intake.id))
                .inc_by(batch.len() as u64);
            let span = tracing::info_span!(
                "batch",
                pipeline = %this.intake.id,
                event = %batch_label(&batch),
            );
            let taken = this.take(batch);
            for (delivery, outcome) in taken.followers {
                creates.spawn(follow(delivery, outcome).instrument(span.clone()));
            }
            this.ack_existing(taken.done).instrument(span.clone()).await;
            for (batch, claim, reason) in taken.refused {
                if this
                    .dead_letter(batch, None, reason.clone())
                    .instrument(span.clone())
                    .await
                {
                    claim.settle(Settled::Rejected(reason));
                }
            }
            let mut parts = taken.parts.into_iter();
            while let Some(mut prepared) = parts.next() {
                // One span per Job-to-be, from the event ids to the Job name, so a log
                // search for an event finds its Job, its retries and its acknowledgement.
                let span = tracing::info_span!(
                    "event",
                    pipeline = %this.intake.id,
                    event = %batch_label(&prepared.batch),
                    job = %prepared.name,
                );
                let granted = tokio::select! {
                    _ = shutdown.cancelled() => {
                        prepared.give_back().await;
                        for rest in parts {
                            rest.give_back().await;
                        }
                        break 'batches;
                    }
                    granted = this.intake.budget.reserve(&prepared.name, prepared.wanted) => granted,
                };
                prepared.fit(granted);
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    permit = permits.clone().acquire_owned() => permit.ok(),
                };
                let Some(permit) = permit else {
                    this.intake.budget.release(&prepared.name);
                    prepared.give_back().await;
                    for rest in parts {
                        rest.give_back().await;
                    }
                    break 'batches;
                };
                let this = this.clone();
                creates.spawn(
                    async move {
                        this.create(prepared, arrived).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            // Reap finished creates so the set stays small during long runs.
            while creates.try_join_next().is_some() {}
        }
        // Stop taking events, finish what is in flight so its events are acknowledged.
        while creates.join_next().await.is_some() {}
        repairs.abort();
    }
}

impl Running {
    /// Sorts a batch: events with a Job, second deliveries of claimed events, and the rest,
    /// claimed and rendered as the Jobs that will carry them. Nothing here waits, so no other
    /// batch can claim an event between the look and the claim.
    fn take(self: &Arc<Self>, batch: Vec<Delivery>) -> Taken {
        let mut taken = Taken::default();
        let indexed = self
            .intake
            .known
            .existing(batch.iter().map(|d| d.event.id()));
        let mut fresh = Vec::with_capacity(batch.len());
        let mut refused_by_source = Vec::new();
        let mut repeated = Vec::new();
        {
            let claims = self.claims.lock();
            let mut seen = HashSet::with_capacity(batch.len());
            for mut delivery in batch {
                let id = delivery.event.id();
                if let Some(outcome) = claims.get(id) {
                    taken.followers.push((delivery, outcome.clone()));
                } else if indexed.contains(id) {
                    taken.done.push(delivery);
                } else if !seen.insert(id.to_string()) {
                    repeated.push(delivery);
                } else if let Some(reason) = delivery.refusal.take() {
                    refused_by_source.push((delivery, reason));
                } else {
                    fresh.push(delivery);
                }
            }
        }
        // In id order, so the same events always make the same Job whatever order their
        // (re)deliveries come in: its name ignores the order, but its annotation and its input
        // list the events by index, and a Job found existing after a crash gets its input
        // from the new rendering.
        fresh.sort_unstable_by(|a, b| a.event.id().cmp(b.event.id()));
        let parts = if fresh.is_empty() {
            Vec::new()
        } else {
            let events: Vec<Event> = fresh.iter().map(|d| d.event.clone()).collect();
            let loaded = &self.intake.pipeline;
            render_parts(&loaded.pipeline, &loaded.template, &loaded.values, &events)
        };
        let mut fresh = fresh.into_iter();
        let mut claims = self.claims.lock();
        // Refused deliveries are claimed like the rest, so another delivery of the same event
        // arriving while the dead-letter sink is written is settled with them.
        for (delivery, reason) in refused_by_source {
            let claim = self.claim(&mut claims, vec![delivery.event.id().to_string()]);
            taken.refused.push((vec![delivery], claim, reason));
        }
        for part in parts {
            let batch: Vec<Delivery> = fresh.by_ref().take(part.events.len()).collect();
            let ids: Vec<String> = batch.iter().map(|d| d.event.id().to_string()).collect();
            let claim = self.claim(&mut claims, ids);
            match part.job {
                Ok(rendered) => taken.parts.push(Prepared::new(batch, rendered, claim)),
                Err(error) => {
                    let reason = match error {
                        RenderError::TooLarge(reason) => reason,
                        other => format!("cannot render the Job template: {other}"),
                    };
                    taken.refused.push((batch, claim, reason));
                }
            }
        }
        for delivery in repeated {
            // Every repeated id was claimed just above; a missing claim hands the event back.
            let outcome = claims
                .get(delivery.event.id())
                .cloned()
                .unwrap_or_else(|| watch::channel(None).1);
            taken.followers.push((delivery, outcome));
        }
        taken
    }

    /// Claims `ids` for one outcome; the caller holds the claims' lock.
    fn claim(self: &Arc<Self>, claims: &mut Claims, ids: Vec<String>) -> Claim {
        let (outcome, receiver) = watch::channel(None);
        for id in &ids {
            claims.insert(id.clone(), receiver.clone());
        }
        Claim {
            ids,
            outcome,
            running: self.clone(),
        }
    }

    async fn ack_existing(&self, batch: Vec<Delivery>) {
        for delivery in batch {
            tracing::debug!(pipeline = %self.intake.id, event = %delivery.event.id(), "redelivered event already has a Job; acknowledging");
            if let Err(error) = delivery.ack.ack().await {
                tracing::warn!(pipeline = %self.intake.id, %error, "ack of a redelivered event failed");
            }
        }
    }

    async fn create(&self, prepared: Prepared, arrived: Instant) {
        let Prepared {
            batch,
            rendered,
            name,
            claim,
            ..
        } = prepared;
        let started = Instant::now();
        let label = metrics::pipeline(&self.intake.id);
        let created = match self.intake.emitter.create(&rendered).await {
            // An earlier attempt whose answer was lost may have made the Job all the same,
            // whatever the last attempt heard: what the API has decides. Asked before the
            // claim ends, so no other create can take the name meanwhile.
            Err(error) if self.leftover(&rendered.job).await => {
                tracing::debug!(pipeline = %self.intake.id, job = %name, %error, "the create failed but its Job is there");
                Ok(Created::AlreadyExisted)
            }
            other => other,
        };
        match created {
            Ok(created) => {
                // Indexed before the claim ends, so a delivery of these events always finds
                // one or the other.
                self.intake.known.insert(&name, claim.ids.iter().cloned());
                claim.settle(Settled::Created);
                drop(claim);
                METRICS.jobs_created.get_or_create(&label).inc();
                METRICS
                    .job_create_seconds
                    .get_or_create(&label)
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(pipeline = %self.intake.id, job = %name, ?created, events = batch.len(), "Job exists");
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
                        tracing::warn!(pipeline = %self.intake.id, event = %id, %error, "ack failed; the source will redeliver");
                    }
                }
            }
            // Retries ran out on errors that do not say the Job is not there: a create whose
            // answer was lost may have stored it. Handed back, not dead-lettered: the
            // redelivery finds that Job (409) or makes it.
            Err(error @ EmitError::Exhausted { .. }) => {
                tracing::warn!(pipeline = %self.intake.id, job = %name, %error, "handing the events back for redelivery");
                give_back_all(batch).await;
            }
            // Refused: the events cannot become this Job.
            Err(error) => {
                let reason = error.to_string();
                if self.dead_letter(batch, Some(name), reason.clone()).await {
                    claim.settle(Settled::Rejected(reason));
                }
            }
        }
    }

    /// After a failed create, what the API has under the Job's name: true when it is the
    /// Job wanted and may run. A Job that may run keeps its reserved pods (the tracker
    /// accounts for it from now on); one waiting for its input (the emitter could not delete
    /// it) gives them back and is deleted later, unless a redelivery completes it first; no
    /// Job, nothing to keep.
    async fn leftover(&self, wanted: &Job) -> bool {
        let name = wanted.metadata.name.as_deref().unwrap_or_default();
        let namespace = pipeline_namespace(&self.intake.pipeline.pipeline);
        let mut backoff = Backoff::reconnect();
        let found = loop {
            match self.intake.emitter.find(&namespace, name).await {
                Ok(found) => break found,
                Err(error) => {
                    tracing::warn!(pipeline = %self.intake.id, job = name, %error, "cannot tell whether a failed create left its Job; asking again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        };
        match found {
            Some(job) if !emit::is_incomplete(&job) => self.intake.emitter.serves(wanted, &job),
            Some(job) => {
                self.intake.budget.release(name);
                let _ = self.to_repair.send((job, Instant::now()));
                false
            }
            None => {
                self.intake.budget.release(name);
                false
            }
        }
    }

    /// The Jobs a crash left incomplete, for the repair; `None` on shutdown. Retried until
    /// the API answers, so the repair cannot miss one.
    async fn find_incomplete(&self, shutdown: &CancellationToken) -> Option<Vec<Job>> {
        let pipeline = &self.intake.pipeline.pipeline;
        let namespace = pipeline_namespace(pipeline);
        let selector = format!(
            "{PIPELINE_LABEL}={}",
            crate::naming::sanitize_label_value(
                pipeline.metadata.name.as_deref().unwrap_or_default()
            )
        );
        let mut backoff = Backoff::reconnect();
        loop {
            let listed = tokio::select! {
                _ = shutdown.cancelled() => return None,
                listed = self.intake.emitter.incomplete(&namespace, &selector) => listed,
            };
            match listed {
                Ok(jobs) => return Some(jobs),
                Err(error) => {
                    tracing::warn!(pipeline = %self.intake.id, %error, "cannot list incomplete Jobs; retrying before taking events");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Deletes the incomplete Jobs found at startup and those a create left, in the order
    /// found, [`REPAIR_GRACE`] after finding each.
    async fn repair(
        self: Arc<Self>,
        mut found: mpsc::UnboundedReceiver<(Job, Instant)>,
        shutdown: CancellationToken,
    ) {
        let Some(jobs) = self.find_incomplete(&shutdown).await else {
            return;
        };
        let now = Instant::now();
        for job in jobs {
            let _ = self.to_repair.send((job, now));
        }
        let namespace = pipeline_namespace(&self.intake.pipeline.pipeline);
        let mut backoff = Backoff::reconnect();
        loop {
            let (job, at) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = found.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(at + REPAIR_GRACE) => {}
            }
            let name = job.metadata.name.clone().unwrap_or_default();
            let uid = job.metadata.uid.clone().unwrap_or_default();
            loop {
                let wait = match self.intake.emitter.repair(&namespace, &name, &uid).await {
                    Ok(Repair::Settled) => break,
                    Ok(Repair::Deleted) => {
                        tracing::info!(pipeline = %self.intake.id, job = %name, "deleted an incomplete Job (a crash or a failed create left it); its events run when redelivered");
                        break;
                    }
                    Ok(Repair::NotDeleted) => backoff.next_delay(),
                    Err(error) => {
                        tracing::warn!(pipeline = %self.intake.id, job = %name, %error, "cannot repair an incomplete Job; retrying");
                        backoff.next_delay()
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// Sends the events to the dead-letter sink with `reason`, then rejects them at their
    /// source; true once done. If the dead-letter sink fails too, they go back for
    /// redelivery instead.
    async fn dead_letter(&self, batch: Vec<Delivery>, job: Option<String>, reason: String) -> bool {
        let at = jiff::Timestamp::now().to_string();
        let records: Vec<Record> = batch
            .iter()
            .map(|delivery| Record {
                pipeline: self.intake.id.clone(),
                outcome: Outcome::DeadLettered,
                event: delivery.event.to_json(),
                job: job.clone(),
                reason: Some(reason.clone()),
                at: at.clone(),
            })
            .collect();
        tracing::warn!(pipeline = %self.intake.id, events = batch.len(), %reason, "dead-lettering");
        match self.intake.sinks.dead_letter(&records).await {
            Ok(()) => {
                self.intake.stats.dead_lettered(batch.len(), &reason);
                METRICS
                    .dead_letters
                    .get_or_create(&metrics::pipeline(&self.intake.id))
                    .inc_by(batch.len() as u64);
                for delivery in batch {
                    if let Err(error) = delivery.ack.reject(reason.clone()).await {
                        tracing::warn!(pipeline = %self.intake.id, %error, "reject failed");
                    }
                }
                true
            }
            Err(error) => {
                tracing::error!(pipeline = %self.intake.id, %error, "dead-letter sink failed; handing the events back for redelivery");
                give_back_all(batch).await;
                false
            }
        }
    }
}

/// Settles another delivery of a claimed event as the claim's own were settled.
async fn follow(delivery: Delivery, mut outcome: ClaimOutcome) {
    let settled = outcome
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|settled| settled.clone());
    let id = delivery.event.id().to_string();
    let result = match settled {
        Some(Settled::Created) => delivery.ack.ack().await,
        Some(Settled::Rejected(reason)) => delivery.ack.reject(reason).await,
        None => delivery.ack.retry().await,
    };
    if let Err(error) = result {
        tracing::warn!(event = %id, %error, "settling a repeated delivery failed; the source will redeliver");
    }
}

/// A rendered Job with its reserved pods, the deliveries it carries and their claim.
struct Prepared {
    batch: Vec<Delivery>,
    rendered: crate::render::RenderedJob,
    name: String,
    /// Pods the Job would run at once.
    wanted: u32,
    claim: Claim,
}

impl Prepared {
    fn new(batch: Vec<Delivery>, rendered: crate::render::RenderedJob, claim: Claim) -> Self {
        let name = rendered.job.metadata.name.clone().unwrap_or_default();
        let wanted = rendered
            .job
            .spec
            .as_ref()
            .and_then(|spec| spec.parallelism)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(1);
        Prepared {
            batch,
            rendered,
            name,
            wanted,
            claim,
        }
    }

    /// Starts an indexed Job with the pods free now; the Job controller queues the rest, and
    /// the tracker raises its parallelism back towards what it wanted as pods come free.
    fn fit(&mut self, granted: u32) {
        if granted < self.wanted
            && let Some(spec) = self.rendered.job.spec.as_mut()
        {
            spec.parallelism = i32::try_from(granted).ok();
            self.rendered
                .job
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(
                    crate::render::WANTED_PARALLELISM_ANNOTATION.to_string(),
                    self.wanted.to_string(),
                );
        }
    }

    /// Hands the events back; the claim ends unsettled, so its other deliveries go back too.
    async fn give_back(self) {
        give_back_all(self.batch).await;
    }
}

async fn give_back_all(batch: Vec<Delivery>) {
    for delivery in batch {
        if let Err(error) = delivery.ack.retry().await {
            tracing::warn!(%error, "could not hand an event back; the broker redelivers it when the connection closes");
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures::future::BoxFuture;
    use k8s_openapi::api::batch::v1::Job;
    use serde_json::Map;
    use spate_sinks::{PipelineRef, SinkContext};
    use spate_sources::{Ack, Settle, SourceError};

    use super::*;
    use crate::engine::emit::fake::FakeApi;
    use crate::render::EVENT_IDS_ANNOTATION;

    /// How each delivery was settled, in order: `(event id, "ack" | "retry" | "reject")`.
    #[derive(Clone, Default)]
    struct Settlements(Arc<parking_lot::Mutex<Vec<(String, &'static str)>>>);

    impl Settlements {
        fn of(&self, id: &str) -> Vec<&'static str> {
            let log = self.0.lock();
            log.iter()
                .filter(|(event, _)| event == id)
                .map(|(_, how)| *how)
                .collect()
        }
    }

    struct Recorded {
        id: String,
        log: Settlements,
    }

    impl Recorded {
        fn record(self, how: &'static str) -> BoxFuture<'static, Result<(), SourceError>> {
            self.log.0.lock().push((self.id.clone(), how));
            Box::pin(async { Ok(()) })
        }
    }

    impl Settle for Recorded {
        fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
            (*self).record("ack")
        }
        fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
            (*self).record("retry")
        }
        fn reject(self: Box<Self>, _reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
            (*self).record("reject")
        }
    }

    struct Harness {
        api: FakeApi,
        deliveries: mpsc::Sender<Delivery>,
        settled: Settlements,
        shutdown: CancellationToken,
        run: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        async fn start(fanout: &str) -> Harness {
            Self::start_with(FakeApi::default(), EventIndex::default(), fanout).await
        }

        async fn start_with(api: FakeApi, known: EventIndex, fanout: &str) -> Harness {
            let client = api.client();
            let yaml = format!(
                "apiVersion: spate.dev/v1alpha1\nkind: Pipeline\nmetadata:\n  name: p\nspec:\n  source:\n    webhook:\n      path: /hooks/p\n      auth: {{none: {{}}}}\n  fanout: {fanout}\n  retry: {{maxAttempts: 3, initialBackoff: 1s, maxBackoff: 4s}}\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          containers: [{{name: work, image: busybox}}]\n"
            );
            let loaded = crate::pipeline::load_str(&yaml, "p.yaml")
                .unwrap_or_else(|e| panic!("{e:#?}"))
                .remove(0);
            let spec = &loaded.pipeline.spec;
            let sinks = PipelineSinks::connect(
                &spec.sinks,
                &SinkContext {
                    pipeline: PipelineRef {
                        namespace: "default".to_string(),
                        name: "p".to_string(),
                        uid: None,
                    },
                    secrets: Arc::new(spate_sources::secret::EnvSecrets),
                    kube: Some(client.clone()),
                },
            )
            .await
            .unwrap();
            let budget = Budget::new(spec.fanout.max_parallelism);
            let intake = Intake {
                emitter: Emitter::new(client, &spec.fanout, &spec.retry, None),
                pipeline: Arc::new(loaded),
                id: "default/p".to_string(),
                budget,
                sinks: Arc::new(sinks),
                known,
                stats: Arc::default(),
            };
            let (deliveries, receiver) = mpsc::channel(16);
            let shutdown = CancellationToken::new();
            let run = tokio::spawn(intake.run(receiver, shutdown.clone()));
            Harness {
                api,
                deliveries,
                settled: Settlements::default(),
                shutdown,
                run,
            }
        }

        async fn deliver(&self, id: &str) {
            self.send(id, None).await;
        }

        /// A delivery its source refuses to have run, with `reason`.
        async fn deliver_refused(&self, id: &str, reason: &str) {
            self.send(id, Some(reason.to_string())).await;
        }

        async fn send(&self, id: &str, refusal: Option<String>) {
            let delivery = Delivery {
                refusal,
                event: Event::new(id, Map::new()).unwrap(),
                ack: Ack::new(Recorded {
                    id: id.to_string(),
                    log: self.settled.clone(),
                }),
            };
            self.deliveries.send(delivery).await.unwrap();
        }

        /// How many Jobs carry each event.
        fn jobs_per_event(&self) -> BTreeMap<String, usize> {
            let mut counts = BTreeMap::new();
            for job in self.api.jobs() {
                for id in event_ids(&job) {
                    *counts.entry(id).or_default() += 1;
                }
            }
            counts
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.run.await.unwrap();
        }
    }

    fn event_ids(job: &Job) -> Vec<String> {
        let annotation = &job.metadata.annotations.as_ref().unwrap()[EVENT_IDS_ANNOTATION];
        serde_json::from_str(annotation).unwrap()
    }

    fn once_each(ids: &[&str]) -> BTreeMap<String, usize> {
        ids.iter().map(|id| (id.to_string(), 1)).collect()
    }

    const INDEXED: &str = "{mode: indexed, batchSize: 2, maxWait: 1s, maxParallelism: 50, maxJobsPerSecond: 1000, burst: 1000}";

    #[tokio::test(start_paused = true)]
    async fn a_redelivery_while_its_job_is_being_created_joins_that_job() {
        let harness = Harness::start(INDEXED).await;
        // Creating a Job takes longer than the source's redelivery timer.
        harness.api.objects().job_create_delay = Duration::from_secs(30);
        harness.deliver("e1").await;
        harness.deliver("e2").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The source redelivers e1, now batched with a new event.
        harness.deliver("e1").await;
        harness.deliver("e3").await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(harness.jobs_per_event(), once_each(&["e1", "e2", "e3"]));
        assert_eq!(harness.settled.of("e1"), ["ack", "ack"]);
        assert_eq!(harness.settled.of("e2"), ["ack"]);
        assert_eq!(harness.settled.of("e3"), ["ack"]);
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holding_an_event_twice_runs_it_once() {
        let harness = Harness::start(INDEXED).await;
        harness.deliver("e1").await;
        harness.deliver("e1").await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let jobs = harness.api.jobs();
        assert_eq!(jobs.len(), 1);
        assert_eq!(event_ids(&jobs[0]), ["e1"]);
        assert_eq!(jobs[0].spec.as_ref().unwrap().completions, Some(1));
        assert_eq!(harness.settled.of("e1"), ["ack", "ack"]);
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn events_of_a_job_a_crash_left_incomplete_run_again_when_regrouped() {
        let api = FakeApi::default();
        // A previous process created the suspended Job for e1 and e2, then died before its
        // input existed; the Job watch indexed it from its annotation.
        api.insert(
            "jobs",
            serde_json::json!({
                "metadata": {"name": "p-old", "namespace": "default",
                    "labels": {PIPELINE_LABEL: "p", crate::engine::emit::INCOMPLETE_LABEL: "true"},
                    "annotations": {EVENT_IDS_ANNOTATION: "[\"e1\",\"e2\"]"}},
                "spec": {"suspend": true, "template": {}}
            }),
            Duration::from_secs(600),
        );
        let known = EventIndex::default();
        known.insert_job(&api.job("p-old").unwrap());
        let harness = Harness::start_with(api, known, INDEXED).await;
        // Redelivered, grouped differently.
        for id in ["e1", "e3", "e2", "e4"] {
            harness.deliver(id).await;
        }
        tokio::time::sleep(REPAIR_GRACE + Duration::from_secs(30)).await;
        assert!(
            harness.api.job("p-old").is_none(),
            "the incomplete Job is deleted"
        );
        assert_eq!(
            harness.jobs_per_event(),
            once_each(&["e1", "e2", "e3", "e4"])
        );
        for id in ["e1", "e2", "e3", "e4"] {
            assert_eq!(harness.settled.of(id), ["ack"], "{id}");
        }
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_delivery_of_a_dead_lettered_event_is_rejected_with_it() {
        let harness = Harness::start(INDEXED).await;
        harness
            .api
            .objects()
            .faults
            .push((axum::http::Method::POST, "jobs", 422));
        harness.deliver("e1").await;
        harness.deliver("e1").await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(harness.api.jobs().is_empty());
        assert_eq!(harness.settled.of("e1"), ["reject", "reject"]);
        assert_eq!(harness.api.objects().events.len(), 1, "one dead letter");
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_its_source_refused_is_dead_lettered_with_the_reason() {
        let harness = Harness::start(INDEXED).await;
        // One batch holds the refused event twice.
        harness
            .deliver_refused("e2", "delivered 6 times, more than maxDeliver (5)")
            .await;
        harness.deliver_refused("e2", "delivered 7 times").await;
        harness.deliver("e1").await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(harness.jobs_per_event(), once_each(&["e1"]));
        assert_eq!(harness.settled.of("e1"), ["ack"]);
        assert_eq!(harness.settled.of("e2"), ["reject", "reject"]);
        let dead_letters = harness.api.objects().events.clone();
        assert_eq!(dead_letters.len(), 1, "one dead letter: {dead_letters:?}");
        assert!(
            dead_letters[0]
                .to_string()
                .contains("more than maxDeliver (5)"),
            "{}",
            dead_letters[0]
        );
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_delivery_of_an_event_that_has_a_job_is_acknowledged() {
        let api = FakeApi::default();
        api.insert(
            "jobs",
            serde_json::json!({
                "metadata": {"name": "p-done", "namespace": "default",
                    "labels": {PIPELINE_LABEL: "p"},
                    "annotations": {EVENT_IDS_ANNOTATION: "[\"e1\"]"}},
                "spec": {"template": {}}
            }),
            Duration::from_secs(600),
        );
        let known = EventIndex::default();
        known.insert_job(&api.job("p-done").unwrap());
        let harness = Harness::start_with(api, known, INDEXED).await;
        // Its acknowledgements were lost until the source gave up on it.
        harness.deliver_refused("e1", "delivered 6 times").await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(harness.settled.of("e1"), ["ack"]);
        assert!(harness.api.objects().events.is_empty(), "no dead letter");
        harness.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_too_large_for_one_job_becomes_several() {
        // The budget covers every part: no tracker here gives pods back.
        let harness = Harness::start(
            "{mode: indexed, batchSize: 5000, maxWait: 1s, maxParallelism: 4000, maxJobsPerSecond: 1000, burst: 1000}",
        )
        .await;
        let ids: Vec<String> = (0..4000).map(|i| format!("{i:064}")).collect();
        let sending = {
            let deliveries = harness.deliveries.clone();
            let settled = harness.settled.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                for id in ids {
                    let delivery = Delivery {
                        refusal: None,
                        event: Event::new(id.clone(), Map::new()).unwrap(),
                        ack: Ack::new(Recorded {
                            id,
                            log: settled.clone(),
                        }),
                    };
                    deliveries.send(delivery).await.unwrap();
                }
            })
        };
        sending.await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let per_event = harness.jobs_per_event();
        assert!(harness.api.jobs().len() > 1);
        assert_eq!(per_event.len(), 4000);
        assert!(per_event.values().all(|jobs| *jobs == 1));
        assert!(ids.iter().all(|id| harness.settled.of(id) == ["ack"]));
        harness.stop().await;
    }
}
