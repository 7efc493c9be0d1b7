//! The running cron source: sleeps until each tick, emits it (or, with `listBucket`, one
//! event per object listed), and checkpoints the last tick whose events were all settled, so
//! a restart knows what it missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::future::BoxFuture;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use super::MissedRunPolicy;
use super::listing::TickListing;
use super::ticks::{Schedule, format_tick, parse_tick};
use crate::checkpoint::CheckpointStore;
use crate::{Ack, Delivery, Event, Settle, Source, SourceError};

/// The time source; tests inject one to start "in the past" without waiting.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Events the engine asked to see again wait here for the run loop; a full queue only delays
/// the re-emission (the waiting task holds the event, and the checkpoint waits for it).
const RETRY_QUEUE: usize = 64;
/// A retried event comes back after this, plus up to as much again of jitter.
const RETRY_DELAY: Duration = Duration::from_secs(1);

pub(super) struct CronRunner {
    pub(super) pipeline: String,
    pub(super) schedule_text: String,
    pub(super) timezone: String,
    pub(super) schedule: Schedule,
    pub(super) policy: MissedRunPolicy,
    pub(super) catch_up_limit: usize,
    pub(super) checkpoints: Arc<dyn CheckpointStore>,
    pub(super) clock: Clock,
    pub(super) listing: Option<TickListing>,
}

impl Source for CronRunner {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.run_until(out, shutdown))
    }
}

/// Ticks with work outstanding (events unsettled, a listing in progress), counted per tick.
/// The checkpoint only ever moves to a tick with nothing outstanding at or before it, so
/// acks arriving out of order never skip unfinished work.
struct Ledger {
    key: String,
    checkpoints: Arc<dyn CheckpointStore>,
    outstanding: Mutex<BTreeMap<DateTime<Utc>, usize>>,
}

impl Ledger {
    async fn hold(&self, tick: DateTime<Utc>) {
        *self.outstanding.lock().await.entry(tick).or_insert(0) += 1;
    }

    async fn release(&self, tick: DateTime<Utc>) -> Result<(), SourceError> {
        // Held across the save so two releases cannot write checkpoints out of order.
        let mut outstanding = self.outstanding.lock().await;
        if let Some(count) = outstanding.get_mut(&tick) {
            *count = count.saturating_sub(1);
        }
        let mut advanced_to = None;
        while let Some(entry) = outstanding.first_entry() {
            if *entry.get() > 0 {
                break;
            }
            advanced_to = Some(entry.remove_entry().0);
        }
        if let Some(tick) = advanced_to {
            self.checkpoints
                .save(&self.key, format_tick(tick).into_bytes())
                .await
                .map_err(SourceError::Checkpoint)?;
        }
        Ok(())
    }
}

/// Hands events to the engine, each holding its tick open until settled.
#[derive(Clone)]
struct Emitter {
    ledger: Arc<Ledger>,
    retries: mpsc::Sender<(DateTime<Utc>, Event)>,
    out: mpsc::Sender<Delivery>,
    shutdown: CancellationToken,
}

impl Emitter {
    /// Sends one event of `tick`; `false` once the source should stop.
    async fn send(&self, tick: DateTime<Utc>, event: Event) -> bool {
        self.ledger.hold(tick).await;
        self.resend(tick, event).await
    }

    /// Sends an event whose tick is already held (a retry).
    async fn resend(&self, tick: DateTime<Utc>, event: Event) -> bool {
        let delivery = Delivery {
            refusal: None,
            ack: Ack::new(TickSettle {
                tick,
                event: event.clone(),
                ledger: self.ledger.clone(),
                retries: self.retries.clone(),
            }),
            event,
        };
        tokio::select! {
            sent = self.out.send(delivery) => sent.is_ok(),
            () = self.shutdown.cancelled() => false,
        }
    }
}

struct TickSettle {
    tick: DateTime<Utc>,
    event: Event,
    ledger: Arc<Ledger>,
    retries: mpsc::Sender<(DateTime<Utc>, Event)>,
}

impl Settle for TickSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move { self.ledger.release(self.tick).await })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        let delay = RETRY_DELAY.mul_f64(1.0 + rand::rng().random::<f64>());
        tracing::info!(
            key = %self.ledger.key,
            event = %self.event.id(),
            delay_ms = delay.as_millis() as u64,
            "cron event to be emitted again"
        );
        // The tick stays held, so the checkpoint waits for it; the re-emission happens off
        // the engine's path so its settle call returns at once. How often an event may be
        // retried is the engine's call: it rejects (dead-letters) it past its own bound.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A closed queue means the source stopped: the held tick is not checkpointed and
            // the missed-run policy decides about it at the next start.
            let _ = self.retries.send((self.tick, self.event)).await;
        });
        Box::pin(async { Ok(()) })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        tracing::warn!(key = %self.ledger.key, event = %self.event.id(), %reason, "cron event rejected");
        // Dead-lettered by the engine: settled, never to be run again.
        Box::pin(async move { self.ledger.release(self.tick).await })
    }
}

impl CronRunner {
    async fn last_tick(&self, key: &str) -> Result<Option<DateTime<Utc>>, SourceError> {
        let Some(bytes) = self
            .checkpoints
            .load(key)
            .await
            .map_err(SourceError::Checkpoint)?
        else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        match parse_tick(&text) {
            Some(tick) => Ok(Some(tick)),
            None => {
                // Refusing to start would stop the schedule for good; forgetting the position
                // only loses the missed runs, which is what a first start does too.
                tracing::warn!(%key, "unreadable cron checkpoint ignored; missed runs are not replayed");
                Ok(None)
            }
        }
    }

    /// The tick's id and the fields every event of the tick carries.
    fn tick(&self, tick: DateTime<Utc>) -> (String, Map<String, Value>) {
        let scheduled = format_tick(tick);
        let mut fields = Map::new();
        fields.insert("subject".into(), Value::String(self.schedule_text.clone()));
        fields.insert("scheduledTime".into(), Value::String(scheduled.clone()));
        fields.insert("schedule".into(), Value::String(self.schedule_text.clone()));
        fields.insert("timezone".into(), Value::String(self.timezone.clone()));
        (format!("{}/{scheduled}", self.pipeline), fields)
    }

    /// Emits the events of one tick; `false` once the source should stop.
    async fn emit(&self, emitter: &Emitter, tick: DateTime<Utc>) -> Result<bool, SourceError> {
        let (id, fields) = self.tick(tick);
        let Some(listing) = &self.listing else {
            let event =
                Event::new(id, fields).map_err(|error| SourceError::Config(error.to_string()))?;
            return Ok(emitter.send(tick, event).await);
        };
        // The listing itself holds the tick, so objects acked before the listing ends cannot
        // let the checkpoint pass a tick whose other objects are not emitted yet.
        emitter.ledger.hold(tick).await;
        let mut objects = listing.objects();
        let mut emitted = 0u64;
        loop {
            let item = tokio::select! {
                () = emitter.shutdown.cancelled() => return Ok(false),
                item = objects.next() => item,
            };
            match item {
                None => break,
                Some(Ok(meta)) => {
                    let event = listing.event(&meta, &id, &fields)?;
                    if !emitter.send(tick, event).await {
                        return Ok(false);
                    }
                    emitted += 1;
                }
                Some(Err(error)) => {
                    // object_store has already retried (bounded, with backoff). A listing is
                    // a snapshot and the next tick lists the whole prefix again, so the tick
                    // ends here with what it found rather than holding the checkpoint forever.
                    tracing::error!(
                        key = %emitter.ledger.key,
                        bucket = %listing.bucket_url(),
                        tick = %format_tick(tick),
                        emitted,
                        %error,
                        "cron listing failed; the next tick lists again"
                    );
                    break;
                }
            }
        }
        tracing::debug!(key = %emitter.ledger.key, tick = %format_tick(tick), emitted, "cron listing done");
        emitter.ledger.release(tick).await?;
        Ok(true)
    }

    async fn run_until(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let key = format!("cron/{}", self.pipeline);
        let last = self.last_tick(&key).await?;
        let (retries, mut retried) = mpsc::channel(RETRY_QUEUE);
        let emitter = Emitter {
            ledger: Arc::new(Ledger {
                key: key.clone(),
                checkpoints: self.checkpoints.clone(),
                outstanding: Mutex::new(BTreeMap::new()),
            }),
            retries,
            out,
            shutdown: shutdown.clone(),
        };

        let now = (self.clock)();
        let missed_limit = match self.policy {
            MissedRunPolicy::Skip => 0,
            MissedRunPolicy::RunOnce => 1,
            MissedRunPolicy::CatchUp => self.catch_up_limit,
        };
        let mut cursor = now;
        if let Some(last) = last {
            let missed = self.schedule.due(last, now, missed_limit);
            tracing::info!(%key, last = %format_tick(last), policy = ?self.policy, emitting = missed.len(), "cron resuming from its checkpoint");
            for tick in missed {
                if !self.emit(&emitter, tick).await? {
                    return Ok(());
                }
            }
            // A clock that went backwards must not replay ticks already run.
            cursor = cursor.max(last);
        }

        // Ticks that fall due while the engine holds us back (a full channel) are missed runs
        // too; in-process, `skip` and `runOnce` both emit the latest one.
        let behind_limit = match self.policy {
            MissedRunPolicy::CatchUp => self.catch_up_limit,
            MissedRunPolicy::Skip | MissedRunPolicy::RunOnce => 1,
        };
        loop {
            let Some(next) = self.schedule.next_after(cursor) else {
                tracing::warn!(%key, schedule = %self.schedule_text, "cron schedule never fires again");
                shutdown.cancelled().await;
                return Ok(());
            };
            let wait = (next - (self.clock)()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                Some((tick, event)) = retried.recv() => {
                    if !emitter.resend(tick, event).await {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep(wait) => {
                    let now = (self.clock)();
                    if now < next {
                        // The timer fires on the monotonic clock; wall time may lag it a little.
                        continue;
                    }
                    for tick in self.schedule.due(cursor, now, behind_limit) {
                        if !self.emit(&emitter, tick).await? {
                            return Ok(());
                        }
                    }
                    cursor = now;
                }
            }
        }
    }
}
