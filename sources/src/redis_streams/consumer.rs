//! The running Redis Streams source: one reading connection and one acknowledging connection,
//! rebuilt with jittered backoff when Redis restarts or drops them.
//!
//! At-least-once. Each read asks for no more entries than the engine's channel has room for
//! (`COUNT`), so when the engine stops reading Spate stops reading and the stream keeps the
//! rest. Entries handed to the engine stay in the group's pending list (PEL) until the engine
//! settles them:
//!
//! - `ack` (the Job exists): `XACK`.
//! - `retry`: no `XACK`; the reader re-reads its own pending entries (`XREADGROUP ... 0`) and
//!   delivers the entry again at once.
//! - `reject` (the engine dead-lettered it): `XACK`, confirmed.
//!
//! Each session begins by re-reading this consumer's own pending entries (id `0`) before
//! asking for new ones (`>`), so nothing delivered-but-unacknowledged before a disconnect is
//! lost. Entries still held by the engine are not delivered twice by this process: their
//! settlement goes through whichever connection is current when it happens (an `XACK` is
//! not tied to a connection, unlike an AMQP ack). Every `claimIdle / 2`, `XAUTOCLAIM` takes
//! over entries pending longer than `claimIdle` on any consumer of the group (a crashed
//! replica, an acknowledgement lost with its connection). It claims ids only (`JUSTID`,
//! which leaves delivery counts alone); the entries among them that this process does not
//! hold are then claimed again with `XCLAIM`, which counts the new delivery. So an entry the
//! engine holds for long (backpressure) keeps its count, and is not dead-lettered unrun after
//! a restart. An entry whose delivery count (from
//! `XPENDING`) exceeds `maxDeliveries` is added to the dead-letter stream with the reason and
//! acknowledged, in one `MULTI`.
//!
//! Every [`BACKLOG_EVERY`] the session reads the group's `lag` (entries not delivered yet) and
//! `pending` (delivered, not acknowledged) with `XINFO GROUPS`, and reports their sum as the
//! pipeline's backlog.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::entry::{
    Entry, GroupCounts, autoclaim_reply, entries, group_counts, pending_counts, read_reply,
    to_event,
};
use crate::backlog::Backlog;
use crate::backoff::Backoff;
use crate::{Ack, Delivery, Settle, Source, SourceError};

/// How long connecting may take: a black-holed address must become a retry, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a command may wait for its answer, beyond `block` for blocking reads.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// Attempts of one `XACK` (through the current connection each time) before leaving the entry
/// pending for a reclaim.
const ACK_ATTEMPTS: u32 = 3;
/// How often the group's backlog is read: often enough for a live view, one cheap command
/// per pipeline.
const BACKLOG_EVERY: Duration = Duration::from_secs(2);

/// A configured, not yet connected, stream consumer.
pub(super) struct StreamConsumer {
    pub(super) client: redis::Client,
    /// The URL without credentials.
    pub(super) address: String,
    pub(super) stream: String,
    pub(super) group: String,
    pub(super) consumer: String,
    pub(super) create_group: bool,
    pub(super) batch: usize,
    pub(super) block: Duration,
    pub(super) claim_idle: Duration,
    pub(super) max_deliveries: u64,
    pub(super) dead_letter_stream: String,
    pub(super) pipeline: String,
    pub(super) backlog: Backlog,
}

/// What the reading loop shares with the settlement handles.
struct Shared {
    stream: String,
    group: String,
    /// The current acknowledging connection; replaced on reconnect.
    acker: Mutex<Option<MultiplexedConnection>>,
    /// Entry ids handed to the engine and not settled yet: never handed over twice at once.
    in_flight: Mutex<HashSet<String>>,
    /// Set by `retry`: the reader re-reads its own pending entries.
    reread: AtomicBool,
}

/// How a session ended without an error.
enum End {
    Shutdown,
    /// The engine dropped its receiver: nobody will read another delivery.
    EngineGone,
}

impl Source for StreamConsumer {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move { self.consume(out, shutdown).await })
    }
}

impl StreamConsumer {
    async fn consume(
        self,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let shared = Arc::new(Shared {
            stream: self.stream.clone(),
            group: self.group.clone(),
            acker: Mutex::new(None),
            in_flight: Mutex::new(HashSet::new()),
            reread: AtomicBool::new(false),
        });
        let mut backoff = Backoff::reconnect();
        // A missing group or refused credentials at start-up is a configuration error the
        // operator must see; once the source has read, the same errors are an outage (a
        // group being recreated, a Redis restarted without its data) and are retried.
        let mut has_read = false;
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => Ok(End::Shutdown),
                outcome = self.session(&shared, &out, &mut backoff, &mut has_read) => outcome,
            };
            // Nothing measures it between sessions: a last reading left in place would hide
            // the outage.
            self.backlog.forget();
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            match outcome {
                Ok(End::Shutdown) | Ok(End::EngineGone) => return Ok(()),
                Err(err) if !has_read && is_permanent(&err) => {
                    return Err(SourceError::Broker {
                        kind: "redisStreams",
                        reason: format!(
                            "stream {} group {} at {}: {err}",
                            self.stream, self.group, self.address
                        ),
                    });
                }
                Err(err) => warn!(stream = %self.stream, group = %self.group,
                    address = %self.address, error = %err, "redis stream session failed"),
            }
            let delay = backoff.next_delay();
            warn!(stream = %self.stream, attempt = backoff.attempt(),
                delay_ms = delay.as_millis() as u64, "reconnecting to redis");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn connect(&self, response: Duration) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response));
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // Named so an operator (and the tests) can tell Spate's connections in CLIENT LIST.
        let name: String = format!("spate:{}", self.pipeline)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async::<()>(&mut connection)
            .await?;
        Ok(connection)
    }

    /// One connection's life: connect, create the group, read (and measure the backlog) until
    /// an error or the end.
    async fn session(
        &self,
        shared: &Arc<Shared>,
        out: &mpsc::Sender<Delivery>,
        backoff: &mut Backoff,
        has_read: &mut bool,
    ) -> Result<End, RedisError> {
        let mut reader = self.connect(self.block + RESPONSE_TIMEOUT).await?;
        let acker = self.connect(RESPONSE_TIMEOUT).await?;
        if self.create_group {
            let created = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.stream)
                .arg(&self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut reader)
                .await;
            match created {
                Ok(()) => {
                    info!(stream = %self.stream, group = %self.group, "created consumer group")
                }
                Err(err) if err.code() == Some("BUSYGROUP") => {}
                Err(err) => return Err(err),
            }
        }
        let measuring = acker.clone();
        *shared.acker.lock() = Some(acker);
        info!(stream = %self.stream, group = %self.group, consumer = %self.consumer,
            "reading redis stream");
        tokio::select! {
            end = self.read(shared, &mut reader, out, backoff, has_read) => end,
            never = self.measure_backlog(measuring) => match never {},
        }
    }

    /// Reads and hands entries over until an error or the end of the session.
    async fn read(
        &self,
        shared: &Arc<Shared>,
        reader: &mut MultiplexedConnection,
        out: &mpsc::Sender<Delivery>,
        backoff: &mut Backoff,
        has_read: &mut bool,
    ) -> Result<End, RedisError> {
        // Own pending entries first: delivered before a disconnect or a restart, never acked.
        let mut pending_cursor = Some("0".to_string());
        let mut claim_cursor = "0-0".to_string();
        let claim_every = (self.claim_idle / 2).max(Duration::from_millis(100));
        let mut next_claim = Instant::now();
        loop {
            // Wait until the engine has room, then ask for no more than that: this sender is
            // the channel's only one, so the room can only grow until these are handed over.
            let room = match out.reserve().await {
                Ok(permit) => {
                    drop(permit);
                    out.capacity().clamp(1, self.batch)
                }
                Err(_) => return Ok(End::EngineGone),
            };
            if shared.reread.swap(false, Ordering::SeqCst) {
                pending_cursor = Some("0".to_string());
            }
            let end = if let Some(cursor) = pending_cursor.take() {
                let reply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(room)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(&cursor)
                    .query_async::<redis::Value>(reader)
                    .await?;
                *has_read = true;
                let entries = parse(read_reply(&reply))?;
                if let Some(last) = entries.last() {
                    pending_cursor = Some(last.id.clone());
                }
                self.handle(shared, reader, out, entries, true).await?
            } else if Instant::now() >= next_claim {
                let reply = redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.claim_idle.as_millis() as u64)
                    .arg(&claim_cursor)
                    .arg("COUNT")
                    .arg(room)
                    .arg("JUSTID")
                    .query_async::<redis::Value>(reader)
                    .await?;
                let (cursor, claimed, deleted) = parse(autoclaim_reply(&reply))?;
                let idle: Vec<String> = {
                    let held = shared.in_flight.lock();
                    claimed
                        .into_iter()
                        .filter(|id| !held.contains(id))
                        .collect()
                };
                let entries = if idle.is_empty() {
                    Vec::new()
                } else {
                    let reply = redis::cmd("XCLAIM")
                        .arg(&self.stream)
                        .arg(&self.group)
                        .arg(&self.consumer)
                        .arg(0)
                        .arg(&idle)
                        .query_async::<redis::Value>(reader)
                        .await?;
                    parse(entries(&reply))?
                };
                if deleted > 0 {
                    debug!(stream = %self.stream, deleted, "pending entries no longer in the stream were dropped");
                }
                if !entries.is_empty() {
                    info!(stream = %self.stream, entries = entries.len(), "reclaimed entries idle longer than claimIdle");
                }
                if cursor == "0-0" {
                    next_claim = Instant::now() + claim_every;
                }
                claim_cursor = cursor;
                self.handle(shared, reader, out, entries, true).await?
            } else {
                let wait = self
                    .block
                    .min(next_claim.saturating_duration_since(Instant::now()))
                    .max(Duration::from_millis(1));
                let reply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(room)
                    .arg("BLOCK")
                    .arg(wait.as_millis() as u64)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(">")
                    .query_async::<redis::Value>(reader)
                    .await?;
                *has_read = true;
                let entries = parse(read_reply(&reply))?;
                self.handle(shared, reader, out, entries, false).await?
            };
            if let Some(end) = end {
                return Ok(end);
            }
            backoff.reset();
        }
    }

    /// Reports the group's backlog every [`BACKLOG_EVERY`] until the session ends. It uses the
    /// acknowledging connection, because the reading one may sit in `XREADGROUP ... BLOCK`
    /// for up to `block`.
    async fn measure_backlog(&self, mut connection: MultiplexedConnection) -> Infallible {
        let mut every = tokio::time::interval(BACKLOG_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let reply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.stream)
                .query_async::<redis::Value>(&mut connection)
                .await
                .map_err(|err| err.to_string())
                .and_then(|reply| group_counts(&reply, &self.group));
            match reply {
                Ok(Some(GroupCounts {
                    pending,
                    lag: Some(lag),
                })) => self.backlog.set(lag.saturating_add(pending)),
                // Redis cannot count the undelivered entries (before 7.0, or past an `XDEL`
                // ahead of the group): `pending` alone would understate the backlog, possibly
                // as 0 with a stream full of entries, so it is reported as unknown.
                Ok(Some(GroupCounts { lag: None, .. })) => self.backlog.forget(),
                // The group is gone: the reader's next command fails the session on NOGROUP.
                Ok(None) => self.backlog.forget(),
                Err(err) => {
                    debug!(stream = %self.stream, group = %self.group, error = %err,
                        "cannot read the group's backlog");
                    self.backlog.forget();
                }
            }
        }
    }

    /// Hands entries over (or dead-letters them); `lookup` when they may have been delivered
    /// before, so their delivery counts must be read. `Some` when the loop must stop.
    async fn handle(
        &self,
        shared: &Arc<Shared>,
        connection: &mut MultiplexedConnection,
        out: &mpsc::Sender<Delivery>,
        entries: Vec<Entry>,
        lookup: bool,
    ) -> Result<Option<End>, RedisError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(None);
        };
        let counts: HashMap<String, u64> = if lookup {
            let reply = redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&first.id)
                .arg(&last.id)
                .arg(entries.len())
                .arg(&self.consumer)
                .query_async::<redis::Value>(connection)
                .await?;
            pending_counts(&reply).into_iter().collect()
        } else {
            HashMap::new()
        };
        for entry in entries {
            let Some(fields) = entry.fields else {
                // Deleted (XDEL, trimming) while pending: there is nothing left to run.
                xack(connection, &self.stream, &self.group, &entry.id).await?;
                continue;
            };
            if shared.in_flight.lock().contains(&entry.id) {
                continue;
            }
            let deliveries = counts.get(&entry.id).copied().unwrap_or(1);
            let event = match to_event(&self.stream, &entry.id, &fields) {
                Ok(event) if deliveries <= self.max_deliveries => event,
                Ok(event) => {
                    let reason = format!(
                        "delivered {deliveries} times, more than maxDeliveries ({}) without its Job being created",
                        self.max_deliveries
                    );
                    self.dead_letter(connection, &entry.id, event.to_json(), deliveries, &reason)
                        .await?;
                    continue;
                }
                Err(err) => {
                    let reason = format!("not an event: {err}");
                    self.dead_letter(
                        connection,
                        &entry.id,
                        serde_json::Value::Null,
                        deliveries,
                        &reason,
                    )
                    .await?;
                    continue;
                }
            };
            shared.in_flight.lock().insert(entry.id.clone());
            let ack = Ack::new(StreamSettle {
                shared: shared.clone(),
                entry_id: entry.id,
            });
            if out
                .send(Delivery {
                    event,
                    ack,
                    refusal: None,
                })
                .await
                .is_err()
            {
                return Ok(Some(End::EngineGone));
            }
        }
        Ok(None)
    }

    /// Adds the entry to the dead-letter stream with `reason` and acknowledges it, atomically.
    async fn dead_letter(
        &self,
        connection: &mut MultiplexedConnection,
        entry_id: &str,
        event: serde_json::Value,
        deliveries: u64,
        reason: &str,
    ) -> Result<(), RedisError> {
        warn!(stream = %self.stream, entry = %entry_id, %reason,
            dead_letter_stream = %self.dead_letter_stream, "dead-lettering redis stream entry");
        redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(&self.dead_letter_stream)
            .arg("*")
            .arg("reason")
            .arg(reason)
            .arg("stream")
            .arg(&self.stream)
            .arg("entryId")
            .arg(entry_id)
            .arg("group")
            .arg(&self.group)
            .arg("deliveries")
            .arg(deliveries)
            .arg("event")
            .arg(event.to_string())
            .ignore()
            .cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(entry_id)
            .ignore()
            .query_async::<()>(connection)
            .await
    }
}

fn parse<T>(parsed: Result<T, String>) -> Result<T, RedisError> {
    parsed.map_err(|reason| {
        error!(%reason, "unexpected redis reply");
        RedisError::from((ErrorKind::UnexpectedReturnType, "unexpected reply", reason))
    })
}

async fn xack(
    connection: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    entry_id: &str,
) -> Result<(), RedisError> {
    redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(entry_id)
        .query_async::<()>(connection)
        .await
}

/// Errors that retrying will not fix, as long as nobody changes the server.
fn is_permanent(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || matches!(
        err.code(),
        Some("NOGROUP" | "WRONGTYPE" | "NOAUTH" | "WRONGPASS" | "NOPERM")
    )
}

/// Settles one entry through the current acknowledging connection.
struct StreamSettle {
    shared: Arc<Shared>,
    entry_id: String,
}

impl StreamSettle {
    /// `XACK` through the connection current at each attempt (a reconnect may replace it).
    async fn xack(&self) -> Result<(), String> {
        let mut last = String::from("not connected");
        for attempt in 0..ACK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let connection = self.shared.acker.lock().clone();
            let Some(mut connection) = connection else {
                continue;
            };
            match xack(
                &mut connection,
                &self.shared.stream,
                &self.shared.group,
                &self.entry_id,
            )
            .await
            {
                Ok(()) => return Ok(()),
                Err(err) => last = err.to_string(),
            }
        }
        Err(last)
    }

    fn settled(&self) {
        self.shared.in_flight.lock().remove(&self.entry_id);
    }
}

impl Drop for StreamSettle {
    fn drop(&mut self) {
        self.settled();
    }
}

impl Settle for StreamSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // A lost ack is harmless: the entry stays pending, is delivered again (re-read
            // after a reconnect, or reclaimed after claimIdle) with the same id, finds its
            // Job and is acknowledged then.
            if let Err(err) = self.xack().await {
                debug!(entry = %self.entry_id, error = %err, "XACK lost; the entry will be delivered again");
            }
            Ok(())
        })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // Not in flight any more, then ask the reader to re-read its pending entries.
            self.settled();
            self.shared.reread.store(true, Ordering::SeqCst);
            Ok(())
        })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            self.xack().await.map_err(|err| SourceError::Broker {
                kind: "redisStreams",
                reason: format!(
                    "entry {} could not be acknowledged after being dead-lettered ({err}); it will be delivered again",
                    self.entry_id
                ),
            })?;
            debug!(entry = %self.entry_id, %reason, "acknowledged dead-lettered redis entry");
            Ok(())
        })
    }
}
