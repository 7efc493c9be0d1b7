//! The running Kafka source: one librdkafka consumer on a thread of its own.
//!
//! librdkafka runs rebalances inside `poll`, on the polling thread, and a partition being
//! revoked must wait for the Jobs of its records already handed out before its offset is
//! committed. Waiting there must not block an async worker, so the consumer lives on a
//! blocking thread and talks to the engine through the same bounded channel as every source.
//!
//! - Each record read is registered with [`Offsets`] and queued; it is handed to the engine
//!   when the channel has room. While it has none, the assigned partitions are paused and
//!   `poll` keeps the group membership alive without fetching: the broker holds the rest.
//! - `ack` (the Job exists) and `reject` (the engine dead-lettered it) finish the record.
//!   `retry` parks it; it is handed out again after a delay, and after `maxDeliveries`
//!   hand-backs it is produced to the dead-letter topic with the reason, then finished.
//! - Every `commitInterval` the watermark of each partition is committed synchronously.
//! - On revoke: queued and parked records of the revoked partitions are dropped (the new
//!   owner reads them), the records with the engine get up to `rebalanceDrain` to settle,
//!   the watermarks are committed, and the partitions are let go. On assign: each partition
//!   starts a new generation and resumes from its committed offset.
//! - Broker failures are librdkafka's to retry (with its own backoff); they are logged with
//!   the brokers' addresses.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::{Condvar, Mutex};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, trace, warn};

use super::offsets::{Offsets, Open, Partition};
use super::record::{Record, to_event};
use super::{KafkaSource, StartFrom, client_config};
use crate::backlog::Backlog;
use crate::{Ack, Delivery, Settle, Source, SourceError};

/// The longest one `poll` waits, so shutdown and hand-outs are never late by more.
const POLL: Duration = Duration::from_millis(100);
/// How often librdkafka reports statistics, from which the backlog is computed.
const STATISTICS_INTERVAL_MS: &str = "2000";
/// The delay before a handed-back record is handed out again, per hand-back so far.
const REDELIVERY_STEP: Duration = Duration::from_millis(500);
/// How long producing one dead letter may take before it is retried.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Records read and not yet handed out at which fetching pauses; it resumes once they are all
/// handed out. Pausing drops librdkafka's prefetched records (they are fetched again on
/// resume), so it happens only for a real backlog, not each time the channel is full.
const PAUSE_AT: usize = 500;
/// librdkafka's prefetch per partition (`queued.min.messages`, 100,000 by default): enough to
/// keep the engine busy, without holding a large backlog in Spate's memory.
const PREFETCH: &str = "1000";
/// At most one warning per this interval for repeated poll errors (a broker that is down
/// reports on every poll).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A configured, not yet connected, Kafka consumer.
pub(super) struct KafkaConsumer {
    pub(super) config: KafkaSource,
    pub(super) dead_letter_topic: String,
    pub(super) commit_interval: Duration,
    pub(super) rebalance_drain: Duration,
    pub(super) pipeline: String,
    pub(super) backlog: Backlog,
}

/// A record read and not yet handed to the engine.
struct Queued {
    record: Record,
    generation: u64,
    /// Hand-backs so far.
    handed_back: u32,
}

/// A record handed back by the engine, waiting for its next hand-out.
struct Parked {
    queued: Queued,
    due: Instant,
}

/// What the polling thread shares with the settlement handles and the rebalance callbacks.
struct Shared {
    topic: String,
    brokers: String,
    offsets: Mutex<Offsets>,
    /// Signalled whenever a record with the engine is settled or parked.
    settled: Condvar,
    queue: Mutex<VecDeque<Queued>>,
    parked: Mutex<Vec<Parked>>,
    /// Set by a rebalance: the pause state of the assignment must be applied again.
    rebalanced: AtomicBool,
    /// Weak, so the deliveries in the channel (which hold this) do not keep it open.
    out: mpsc::WeakSender<Delivery>,
    rebalance_drain: Duration,
    backlog: Backlog,
}

impl Shared {
    /// Waits (bounded) for the records of `partitions` still with the engine, commits the
    /// watermarks, and forgets the partitions.
    fn let_go(&self, consumer: &BaseConsumer<SpateContext>, partitions: &[Partition]) {
        self.queue
            .lock()
            .retain(|queued| !partitions.contains(&partition_of(&queued.record)));
        self.parked
            .lock()
            .retain(|parked| !partitions.contains(&partition_of(&parked.queued.record)));
        let deadline = Instant::now() + self.rebalance_drain;
        let mut offsets = self.offsets.lock();
        loop {
            let waiting = offsets.in_engine(partitions);
            if waiting == 0 || self.engine_gone() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(topic = %self.topic, records = waiting,
                    "partitions revoked before every Job of theirs was created; their new owner reads those records again");
                break;
            }
            // Woken by each settlement; the timeout also notices the engine going away.
            self.settled
                .wait_for(&mut offsets, (deadline - now).min(POLL));
        }
        drop(offsets);
        commit(consumer, self, Some(partitions));
        let mut offsets = self.offsets.lock();
        for partition in partitions {
            offsets.revoke(partition);
        }
    }

    /// Nobody will settle the records with the engine any more.
    fn engine_gone(&self) -> bool {
        self.out.upgrade().is_none_or(|out| out.is_closed())
    }

    fn finish(&self, partition: &Partition, generation: u64, offset: i64) {
        self.offsets.lock().done(partition, generation, offset);
        self.settled.notify_all();
    }
}

fn partition_of(record: &Record) -> Partition {
    (record.topic.clone(), record.partition)
}

fn partitions_of(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements()
        .iter()
        .map(|element| (element.topic().to_string(), element.partition()))
        .collect()
}

/// Commits the watermarks that moved (of `only` those partitions, when given).
fn commit(consumer: &BaseConsumer<SpateContext>, shared: &Shared, only: Option<&[Partition]>) {
    let due: Vec<(Partition, i64)> = shared
        .offsets
        .lock()
        .to_commit()
        .into_iter()
        .filter(|(partition, _)| only.is_none_or(|only| only.contains(partition)))
        .collect();
    if due.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::with_capacity(due.len());
    for ((topic, partition), offset) in &due {
        if let Err(err) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            error!(%topic, partition, offset, error = %err, "cannot build the commit");
            return;
        }
    }
    match consumer.commit(&list, CommitMode::Sync) {
        Ok(()) => {
            let mut offsets = shared.offsets.lock();
            for (partition, offset) in &due {
                offsets.committed(partition, *offset);
            }
            trace!(topic = %shared.topic, partitions = due.len(), "committed watermarks");
        }
        // Not lost: the watermark is committed with the next commit, or read again by the
        // partition's next owner from the last commit that succeeded.
        Err(err) => warn!(topic = %shared.topic, brokers = %shared.brokers, error = %err,
            "committing offsets failed; they are committed again later"),
    }
}

/// librdkafka's callbacks: logs and errors to `tracing`, statistics to the backlog,
/// rebalances to [`Offsets`].
struct SpateContext {
    shared: Arc<Shared>,
}

impl ClientContext for SpateContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                debug!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => trace!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(brokers = %self.shared.brokers, %error, %reason, "kafka client error");
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.shared.topic) else {
            return;
        };
        let offsets = self.shared.offsets.lock();
        let mut lag = 0u64;
        for partition in offsets.assigned() {
            let Some(reading) = topic.partitions.get(&partition.1) else {
                continue;
            };
            if reading.hi_offset < 0 {
                continue;
            }
            // From the first record not done; before reading anything, from the committed
            // offset, or the start of the log for a group that never committed.
            let from = offsets
                .watermark(&partition)
                .or((reading.committed_offset >= 0).then_some(reading.committed_offset))
                .unwrap_or(reading.lo_offset.max(0));
            lag += u64::try_from(reading.hi_offset - from).unwrap_or(0);
        }
        self.shared.backlog.set(lag);
    }
}

impl ConsumerContext for SpateContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions = partitions_of(list);
            info!(topic = %self.shared.topic, partitions = ?partitions.iter().map(|p| p.1).collect::<Vec<_>>(),
                "partitions revoked; settling their records before letting go");
            self.shared.let_go(consumer, &partitions);
            self.shared.rebalanced.store(true, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions = partitions_of(list);
                let mut offsets = self.shared.offsets.lock();
                for partition in &partitions {
                    offsets.assign(partition.clone());
                }
                drop(offsets);
                self.shared.rebalanced.store(true, Ordering::SeqCst);
                info!(topic = %self.shared.topic, partitions = ?partitions.iter().map(|p| p.1).collect::<Vec<_>>(),
                    "partitions assigned; reading from their committed offsets");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => {
                warn!(topic = %self.shared.topic, error = %err, "rebalance failed")
            }
        }
    }
}

impl Source for KafkaConsumer {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || self.consume(out, shutdown, runtime))
                .await
                .map_err(|err| SourceError::Broker {
                    kind: "kafka",
                    reason: format!("the consumer thread ended abnormally: {err}"),
                })?
        })
    }
}

impl KafkaConsumer {
    fn consume(
        self,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
        runtime: tokio::runtime::Handle,
    ) -> Result<(), SourceError> {
        let brokers = self.config.brokers.join(",");
        let shared = Arc::new(Shared {
            topic: self.config.topic.clone(),
            brokers: brokers.clone(),
            offsets: Mutex::new(Offsets::default()),
            settled: Condvar::new(),
            queue: Mutex::new(VecDeque::new()),
            parked: Mutex::new(Vec::new()),
            rebalanced: AtomicBool::new(false),
            out: out.downgrade(),
            rebalance_drain: self.rebalance_drain,
            backlog: self.backlog.clone(),
        });
        let mut config = client_config(
            &self.config.brokers,
            &self.pipeline,
            &self.config.properties,
        );
        config
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match self.config.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        if !self.config.properties.contains_key("queued.min.messages") {
            config.set("queued.min.messages", PREFETCH);
        }
        let config_error = |err: KafkaError| {
            SourceError::Config(format!("kafka: cannot configure the client: {err}"))
        };
        let consumer: BaseConsumer<SpateContext> = config
            .create_with_context(SpateContext {
                shared: shared.clone(),
            })
            .map_err(config_error)?;
        let producer: FutureProducer = client_config(
            &self.config.brokers,
            &self.pipeline,
            &self.config.properties,
        )
        .set("enable.idempotence", "true")
        .create()
        .map_err(config_error)?;
        consumer
            .subscribe(&[&self.config.topic])
            .map_err(|err| SourceError::Broker {
                kind: "kafka",
                reason: format!("cannot subscribe to {}: {err}", self.config.topic),
            })?;
        info!(topic = %self.config.topic, group = %self.config.group, %brokers,
            "joining kafka consumer group");

        let mut paused = false;
        let mut last_commit = Instant::now();
        let mut last_warning: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            self.unpark(&shared, &producer, &runtime);
            let want_paused = match hand_out(&shared, &out) {
                HandOut::EngineGone => break,
                // Hysteresis: once paused, stay paused until every queued record is out.
                HandOut::Blocked(queued) => paused || queued >= PAUSE_AT,
                HandOut::AllHanded => false,
            };
            // librdkafka keeps a partition's pause across a rebalance that revokes and assigns
            // it again, so after a rebalance the wanted state is applied whatever it was.
            if want_paused != paused || shared.rebalanced.swap(false, Ordering::SeqCst) {
                set_paused(&consumer, want_paused);
                paused = want_paused;
            }
            match consumer.poll(POLL) {
                None => {}
                Some(Ok(message)) => {
                    let record = Record::from_message(&message);
                    let generation = shared
                        .offsets
                        .lock()
                        .read(&partition_of(&record), record.offset);
                    match generation {
                        Some(generation) => shared.queue.lock().push_back(Queued {
                            record,
                            generation,
                            handed_back: 0,
                        }),
                        None => debug!(topic = %record.topic, partition = record.partition,
                            offset = record.offset, "record of a partition no longer assigned; its new owner reads it"),
                    }
                }
                Some(Err(err)) => {
                    if last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        warn!(topic = %self.config.topic, %brokers, error = %err,
                            "kafka consumer error; the client retries");
                        last_warning = Some(Instant::now());
                    } else {
                        debug!(topic = %self.config.topic, error = %err, "kafka consumer error");
                    }
                }
            }
            if last_commit.elapsed() >= self.commit_interval {
                commit(&consumer, &shared, None);
                last_commit = Instant::now();
            }
        }

        // Stopping: give the engine's creates in flight their chance to finish, commit what
        // they finished, then leave the group (which revokes, commits again and returns).
        shared.queue.lock().clear();
        let deadline = Instant::now() + self.rebalance_drain;
        {
            let mut offsets = shared.offsets.lock();
            while offsets.in_engine_total() > 0 && !out.is_closed() && Instant::now() < deadline {
                shared.settled.wait_for(&mut offsets, POLL);
            }
        }
        commit(&consumer, &shared, None);
        shared.backlog.forget();
        drop(consumer);
        info!(topic = %self.config.topic, group = %self.config.group, "left kafka consumer group");
        Ok(())
    }

    /// Queues the parked records whose delay is over; dead-letters those handed back too often.
    fn unpark(
        &self,
        shared: &Arc<Shared>,
        producer: &FutureProducer,
        runtime: &tokio::runtime::Handle,
    ) {
        let now = Instant::now();
        let due: Vec<Parked> = {
            let mut parked = shared.parked.lock();
            let (due, waiting): (Vec<Parked>, Vec<Parked>) =
                parked.drain(..).partition(|parked| parked.due <= now);
            *parked = waiting;
            due
        };
        for Parked { queued, .. } in due {
            let partition = partition_of(&queued.record);
            if queued.handed_back < self.config.max_deliveries {
                let requeued = shared.offsets.lock().mark(
                    &partition,
                    queued.generation,
                    queued.record.offset,
                    Open::Queued,
                );
                if requeued {
                    shared.queue.lock().push_back(queued);
                }
                continue;
            }
            let reason = format!(
                "handed back {} times (maxDeliveries {}) without its Job being created",
                queued.handed_back, self.config.max_deliveries
            );
            match runtime.block_on(self.dead_letter(producer, &queued, &reason)) {
                Ok(()) => shared.finish(&partition, queued.generation, queued.record.offset),
                Err(err) => {
                    warn!(topic = %self.dead_letter_topic, error = %err,
                        "cannot produce a dead letter; trying again later");
                    shared.parked.lock().push(Parked {
                        queued,
                        due: Instant::now() + DEAD_LETTER_TIMEOUT,
                    });
                }
            }
        }
    }

    /// Produces the record, unchanged, to the dead-letter topic with headers saying why and
    /// where it came from.
    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        queued: &Queued,
        reason: &str,
    ) -> Result<(), KafkaError> {
        let record = &queued.record;
        warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
            dead_letter_topic = %self.dead_letter_topic, %reason, "dead-lettering kafka record");
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 6);
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let handed_back = queued.handed_back.to_string();
        for (key, value) in [
            ("spate.reason", reason),
            ("spate.topic", record.topic.as_str()),
            ("spate.partition", partition.as_str()),
            ("spate.offset", offset.as_str()),
            ("spate.group", self.config.group.as_str()),
            ("spate.deliveries", handed_back.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut out = FutureRecord::<[u8], [u8]>::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            out = out.payload(value.as_slice());
        }
        producer
            .send(out, DEAD_LETTER_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }
}

enum HandOut {
    /// The queue is empty.
    AllHanded,
    /// The engine's channel is full; this many records wait.
    Blocked(usize),
    /// The engine dropped its receiver.
    EngineGone,
}

/// Hands queued records to the engine while its channel has room.
fn hand_out(shared: &Arc<Shared>, out: &mpsc::Sender<Delivery>) -> HandOut {
    loop {
        let Some(queued) = shared.queue.lock().pop_front() else {
            return HandOut::AllHanded;
        };
        let permit = match out.try_reserve() {
            Ok(permit) => permit,
            Err(TrySendError::Full(())) => {
                let mut queue = shared.queue.lock();
                queue.push_front(queued);
                return HandOut::Blocked(queue.len());
            }
            Err(TrySendError::Closed(())) => return HandOut::EngineGone,
        };
        let partition = partition_of(&queued.record);
        let event = match to_event(&queued.record) {
            Ok(event) => event,
            // A record's place always makes a valid id; kept total rather than trusted.
            Err(err) => {
                error!(topic = %queued.record.topic, offset = queued.record.offset, error = %err,
                    "record cannot become an event; skipping it");
                shared.finish(&partition, queued.generation, queued.record.offset);
                continue;
            }
        };
        if !shared.offsets.lock().mark(
            &partition,
            queued.generation,
            queued.record.offset,
            Open::InEngine,
        ) {
            // Revoked since it was read: the new owner reads it.
            continue;
        }
        permit.send(Delivery {
            refusal: None,
            event,
            ack: Ack::new(KafkaSettle {
                shared: shared.clone(),
                partition,
                queued: Some(queued),
            }),
        });
    }
}

fn set_paused(consumer: &BaseConsumer<SpateContext>, paused: bool) {
    let assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(err) => {
            warn!(error = %err, "cannot read the assignment to pause or resume it");
            return;
        }
    };
    if assignment.count() == 0 {
        return;
    }
    let result = if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => debug!(
            paused,
            "kafka partitions paused or resumed for backpressure"
        ),
        Err(err) => warn!(paused, error = %err, "cannot pause or resume kafka partitions"),
    }
}

/// Settles one record with the offsets of its partition.
struct KafkaSettle {
    shared: Arc<Shared>,
    partition: Partition,
    /// Taken when the record is parked for a redelivery.
    queued: Option<Queued>,
}

impl KafkaSettle {
    fn finish(&self) {
        if let Some(queued) = &self.queued {
            self.shared
                .finish(&self.partition, queued.generation, queued.record.offset);
        }
    }
}

impl Settle for KafkaSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.finish();
        Box::pin(async { Ok(()) })
    }

    fn retry(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        if let Some(mut queued) = self.queued.take() {
            let parked = self.shared.offsets.lock().mark(
                &self.partition,
                queued.generation,
                queued.record.offset,
                Open::Parked,
            );
            if parked {
                queued.handed_back += 1;
                let due = Instant::now() + REDELIVERY_STEP * queued.handed_back;
                self.shared.parked.lock().push(Parked { queued, due });
            }
            self.shared.settled.notify_all();
        }
        Box::pin(async { Ok(()) })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        // The engine has put the event in the pipeline's dead-letter sink already.
        if let Some(queued) = &self.queued {
            debug!(topic = %queued.record.topic, partition = queued.record.partition,
                offset = queued.record.offset, %reason, "kafka record dead-lettered by the engine");
        }
        self.finish();
        Box::pin(async { Ok(()) })
    }
}
