//! The running AMQP source: one connection, one channel, one consumer, rebuilt on failure.
//!
//! At-least-once. The channel's QoS (`prefetch`) bounds what the broker pushes before Spate
//! acknowledges, and the engine's bounded channel bounds what is handed over: when the engine
//! stops reading, `send` waits, the prefetch window stays full and the broker keeps the rest.
//! A message is acknowledged only when the engine says its Job exists; `retry` requeues it,
//! `reject` drops it to the queue's dead-letter exchange (if its owner configured one).
//!
//! When the connection drops or the broker restarts, the source reconnects with jittered
//! exponential backoff. Deliveries of the dead channel cannot be settled any more: the broker
//! redelivers them, and their redelivered copies carry the same id, hence the same Job, so a
//! late `ack` on the old channel is a harmless no-op.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Acker, Connection, ConnectionProperties, ErrorKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::message::{Origin, to_event};
use crate::backoff::Backoff;
use crate::{Ack, Delivery, Settle, Source, SourceError};

/// How long a TCP connect and AMQP handshake may take: a black-holed address must become a
/// retry, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the reconnect backoff.
/// On shutdown, how long the connection stays open for the engine to settle the deliveries it
/// holds (the engine's own drain timeout ends sooner by default).
const SETTLE_GRACE: Duration = Duration::from_secs(60);
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// A configured, not yet connected, AMQP consumer.
pub(super) struct AmqpConsumer {
    pub(super) url: String,
    pub(super) queue: String,
    pub(super) prefetch: u16,
    pub(super) pipeline: String,
}

/// Why a consuming session ended without an error.
enum SessionEnd {
    Shutdown,
    /// The engine dropped its receiver: nobody will read another delivery.
    EngineGone,
    /// The broker cancelled the consumer (queue deleted, node down, policy change).
    CancelledByBroker,
}

impl Source for AmqpConsumer {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move { self.consume(out, shutdown).await })
    }
}

impl AmqpConsumer {
    async fn consume(
        self,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let address = crate::redact::url(&self.url);
        let mut backoff = Backoff::reconnect();
        // A missing queue or refused credentials at start-up is a configuration error the
        // operator must see; once the source has consumed, the same errors are an outage
        // (queue being recreated, permissions being rotated) and are retried.
        let mut has_consumed = false;
        loop {
            let started = Instant::now();
            let outcome = self
                .session(&out, &shutdown, &mut backoff, &mut has_consumed)
                .await;
            // A connection that lived longer than the longest delay was a success even if it
            // never delivered (an idle queue); one that broke at once keeps the delay growing.
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            match outcome {
                Ok(SessionEnd::Shutdown) | Ok(SessionEnd::EngineGone) => return Ok(()),
                Ok(SessionEnd::CancelledByBroker) => error!(
                    queue = %self.queue,
                    %address,
                    "the broker cancelled Spate's consumer (was the queue deleted?); consuming again after a backoff"
                ),
                Err(err) if !has_consumed && is_permanent(&err) => {
                    return Err(SourceError::Broker {
                        kind: "amqp",
                        reason: format!("queue {} at {address}: {err}", self.queue),
                    });
                }
                Err(err) => {
                    warn!(queue = %self.queue, %address, error = %err, "amqp session failed")
                }
            }
            let delay = backoff.next_delay();
            warn!(
                queue = %self.queue,
                attempt = backoff.attempt(),
                delay_ms = delay.as_millis() as u64,
                "reconnecting to the amqp broker"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life: connect, consume until it ends, close.
    async fn session(
        &self,
        out: &mpsc::Sender<Delivery>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        has_consumed: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("spate {}", self.pipeline).into());
        let connection = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.url, properties)) =>
                match connection {
                    Ok(connection) => connection?,
                    Err(_) => return Err(SessionError::ConnectTimeout),
                },
        };
        // Every delivery's settle handle holds a clone of `in_flight`; when the last is
        // settled or dropped, `settled` yields None.
        let (in_flight, mut settled) = mpsc::channel::<()>(1);
        // The channel belongs to the session, not to `deliver`: dropping a lapin channel
        // closes it, and acknowledgements of deliveries still held by the engine need it
        // after `deliver` is cancelled.
        let channel = connection.create_channel().await?;
        let end = tokio::select! {
            _ = shutdown.cancelled() => Ok(SessionEnd::Shutdown),
            end = self.deliver(&channel, out, backoff, has_consumed, &in_flight) => end,
        };
        drop(in_flight);
        if matches!(end, Ok(SessionEnd::Shutdown)) {
            // Stop taking messages but keep the channel: acknowledgements for the Jobs the
            // engine is still creating must reach the broker, or it would redeliver them.
            if tokio::time::timeout(SETTLE_GRACE, settled.recv())
                .await
                .is_err()
            {
                warn!(queue = %self.queue, "deliveries still unsettled at shutdown; the broker will redeliver them");
            }
        }
        if connection.status().connected() {
            // Closing returns unacknowledged messages to the queue at once instead of after
            // the broker notices the socket is gone.
            if let Err(err) = connection.close(200, "spate source stopping".into()).await {
                debug!(error = %err, "closing the amqp connection");
            }
        }
        end.map_err(SessionError::from)
    }

    async fn deliver(
        &self,
        channel: &lapin::Channel,
        out: &mpsc::Sender<Delivery>,
        backoff: &mut Backoff,
        has_consumed: &mut bool,
        in_flight: &mpsc::Sender<()>,
    ) -> Result<SessionEnd, lapin::Error> {
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        // Passive: the queue belongs to its owner, who chose its arguments (dead-letter
        // exchange, TTL, quorum type). Declaring it with other arguments would fail with
        // PRECONDITION_FAILED, and declaring it ourselves would hide a typo in its name.
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let tag = format!("spate-{}-{}", self.pipeline, uuid::Uuid::new_v4());
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *has_consumed = true;
        info!(queue = %self.queue, prefetch = self.prefetch, "consuming amqp queue");

        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            // Deliveries mean the broker is back: the next failure starts from a short delay.
            backoff.reset();
            let origin = Origin {
                queue: &self.queue,
                exchange: delivery.exchange.as_str(),
                routing_key: delivery.routing_key.as_str(),
            };
            let event = match to_event(&origin, &delivery.properties, &delivery.data) {
                Ok(event) => event,
                Err(err) => {
                    // Unreachable with the ids built here, but a message that cannot become
                    // an event must not loop forever: let the dead-letter exchange have it.
                    error!(queue = %self.queue, error = %err, "rejecting a message that is not an event");
                    delivery
                        .acker
                        .reject(BasicRejectOptions { requeue: false })
                        .await?;
                    continue;
                }
            };
            let settle = AmqpSettle {
                acker: delivery.acker,
                id: event.id().to_string(),
                _in_flight: in_flight.clone(),
            };
            let handed_over = out
                .send(Delivery {
                    refusal: None,
                    event,
                    ack: Ack::new(settle),
                })
                .await;
            if handed_over.is_err() {
                return Ok(SessionEnd::EngineGone);
            }
        }
        Ok(SessionEnd::CancelledByBroker)
    }
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("no connection within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
}

/// Errors that retrying will not fix, as long as nobody changes the broker.
fn is_permanent(err: &SessionError) -> bool {
    let SessionError::Amqp(err) = err else {
        return false;
    };
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED | AMQPSoftError::NOTFOUND)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        ErrorKind::AuthProviderError(_) => true,
        _ => false,
    }
}

/// Settles one delivery on the channel it came from.
struct AmqpSettle {
    acker: Acker,
    id: String,
    /// Keeps the session's connection open until this delivery is settled.
    _in_flight: mpsc::Sender<()>,
}

impl AmqpSettle {
    /// `true` when the broker got the settlement; `false` when the channel died first, in
    /// which case the broker redelivers the message.
    fn reached_broker(&self, outcome: lapin::Result<bool>, what: &str) -> bool {
        match outcome {
            Ok(true) => true,
            Ok(false) => {
                debug!(id = %self.id, "late {what}: its channel is gone and the broker redelivers the message");
                false
            }
            Err(err) => {
                debug!(id = %self.id, error = %err, "{what} failed with its channel: the broker redelivers the message");
                false
            }
        }
    }
}

impl Settle for AmqpSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // A lost ack is harmless: the redelivered copy has the same id, finds its Job and
            // is acknowledged on the new channel.
            let outcome = self.acker.ack(BasicAckOptions::default()).await;
            self.reached_broker(outcome, "ack");
            Ok(())
        })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // If the channel is gone the broker redelivers anyway, which is what retry asks.
            let outcome = self
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await;
            self.reached_broker(outcome, "retry");
            Ok(())
        })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let outcome = self
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            if self.reached_broker(outcome, "reject") {
                debug!(id = %self.id, %reason, "rejected amqp message");
                Ok(())
            } else {
                // Unlike an ack, this cannot be absorbed: the message comes back and the
                // engine must settle its redelivered copy again.
                Err(SourceError::Broker {
                    kind: "amqp",
                    reason: format!(
                        "message {} could not be rejected (its channel closed first); the broker will redeliver it",
                        self.id
                    ),
                })
            }
        })
    }
}
