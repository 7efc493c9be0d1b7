//! The running MQTT source: one client and event loop per connection, rebuilt on failure.
//!
//! At-least-once with QoS 1. The client connects with manual acknowledgements: the broker
//! keeps every delivered message in flight (Mosquitto: `max_inflight_messages`, 20 by
//! default) until Spate sends its PUBACK, which happens only when the engine says its Job
//! exists. The in-flight window is the backpressure: when the engine stops reading, the
//! window fills, the broker stops sending and queues the rest for the session.
//!
//! The event loop runs in its own task so keep-alive pings flow while deliveries wait for the
//! engine. Each connection gets a fresh client: a settlement of a delivery from a dead
//! connection goes nowhere (its packet id may already name another message on the new
//! connection), and the broker redelivers that message on the persistent session, with the
//! same content-derived id, hence the same Job.
//!
//! MQTT 3.1.1 has no negative acknowledgement: `retry` hands the message to the engine again
//! after a short delay (the broker still counts it in flight); `reject` acknowledges it (the
//! engine has already dead-lettered it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Endpoint;
use super::message::to_event;
use crate::backoff::Backoff;
use crate::{Ack, Delivery, Settle, Source, SourceError};

/// On shutdown, how long the connection stays open for the engine to settle the deliveries it
/// holds (the engine's own drain timeout ends sooner by default).
const SETTLE_GRACE: Duration = Duration::from_secs(60);
/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);
/// How long a retried message waits before the engine sees it again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// MQTT's largest packet: a smaller limit would make an oversized message break the connection
/// on every redelivery.
const MAX_PACKET: usize = 268_435_455;
/// How long the TCP connect and CONNACK may take.
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// A configured, not yet connected, MQTT consumer.
pub(super) struct MqttConsumer {
    /// The URL without credentials, for logs.
    pub(super) address: String,
    pub(super) endpoint: Endpoint,
    pub(super) topic: String,
    pub(super) client_id: String,
    pub(super) qos: QoS,
    pub(super) clean_session: bool,
    pub(super) keep_alive: Duration,
}

/// Why a session ended without an error.
enum SessionEnd {
    Shutdown,
    /// The engine dropped its receiver: nobody will read another delivery.
    EngineGone,
}

/// What the event loop task reports.
enum Polled {
    Connected { session_present: bool },
    Subscribed(Vec<SubscribeReasonCode>),
    Publish(Publish),
    Failed(ConnectionError),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(
        "the broker refused the subscription to {0} (not authorised, or a filter it does not support)"
    )]
    SubscribeRefused(String),
    #[error("the mqtt event loop stopped")]
    LoopGone,
}

impl Source for MqttConsumer {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move { self.consume(out, shutdown).await })
    }
}

impl MqttConsumer {
    fn options(&self) -> MqttOptions {
        let mut options =
            MqttOptions::new(&self.client_id, &self.endpoint.host, self.endpoint.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(username) = &self.endpoint.username {
            options.set_credentials(
                username.clone(),
                self.endpoint.password.clone().unwrap_or_default(),
            );
        }
        options
    }

    async fn consume(
        self,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut backoff = Backoff::reconnect();
        // Refused credentials or subscription at start-up are configuration errors the
        // operator must see; once the source has consumed, the same errors are an outage
        // (credentials being rotated) and are retried.
        let mut has_consumed = false;
        loop {
            let started = Instant::now();
            let outcome = self
                .session(&out, &shutdown, &mut backoff, &mut has_consumed)
                .await;
            if started.elapsed() >= STABLE_SESSION {
                backoff.reset();
            }
            match outcome {
                Ok(SessionEnd::Shutdown) | Ok(SessionEnd::EngineGone) => return Ok(()),
                Err(err) if !has_consumed && is_permanent(&err) => {
                    return Err(SourceError::Broker {
                        kind: "mqtt",
                        reason: format!("topic {} at {}: {err}", self.topic, self.address),
                    });
                }
                Err(err) => {
                    warn!(topic = %self.topic, address = %self.address, error = %err, "mqtt session failed")
                }
            }
            let delay = backoff.next_delay();
            warn!(
                topic = %self.topic,
                attempt = backoff.attempt(),
                delay_ms = delay.as_millis() as u64,
                "reconnecting to the mqtt broker"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life: connect, subscribe, deliver until it ends, disconnect.
    async fn session(
        &self,
        out: &mpsc::Sender<Delivery>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
        has_consumed: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        let mut options = self.options();
        options.set_request_channel_capacity(256);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        eventloop
            .network_options
            .set_connection_timeout(CONNECT_TIMEOUT_SECS);
        let (polled_tx, mut polled) = mpsc::unbounded_channel();
        let poller = tokio::spawn(poll(eventloop, polled_tx));
        // Every delivery's settle handle holds a clone of `in_flight`; when the last is
        // settled or dropped, `settled` yields None.
        let (in_flight, mut settled) = mpsc::channel::<()>(1);
        let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<Publish>();
        let handles = Handles {
            client: client.clone(),
            retry: retry_tx,
            in_flight,
        };
        let end = tokio::select! {
            _ = shutdown.cancelled() => Ok(SessionEnd::Shutdown),
            end = self.deliver(&handles, &mut polled, &mut retry_rx, out, backoff, has_consumed) => end,
        };
        drop(handles);
        if matches!(end, Ok(SessionEnd::Shutdown)) {
            // Stop handing out messages but keep the connection: PUBACKs for the Jobs the
            // engine is still creating must reach the broker, or it would redeliver them.
            if tokio::time::timeout(SETTLE_GRACE, settled.recv())
                .await
                .is_err()
            {
                warn!(topic = %self.topic, "deliveries still unsettled at shutdown; the broker will redeliver them");
            }
        }
        // DISCONNECT goes after the PUBACKs already queued; the session stays at the broker
        // (unless cleanSession), unacknowledged messages with it.
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(event) = polled.recv().await {
                    if matches!(event, Polled::Failed(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        poller.abort();
        end
    }

    async fn deliver(
        &self,
        handles: &Handles,
        polled: &mut mpsc::UnboundedReceiver<Polled>,
        retry_rx: &mut mpsc::UnboundedReceiver<Publish>,
        out: &mpsc::Sender<Delivery>,
        backoff: &mut Backoff,
        has_consumed: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        // Queued before the CONNACK; the event loop sends it once connected.
        handles
            .client
            .subscribe(self.topic.as_str(), self.qos)
            .await
            .map_err(|_| SessionError::LoopGone)?;
        // At most the broker's in-flight window waits here (plus retries).
        let mut pending: VecDeque<Delivery> = VecDeque::new();
        loop {
            tokio::select! {
                event = polled.recv() => match event {
                    None => return Err(SessionError::LoopGone),
                    Some(Polled::Failed(err)) => return Err(err.into()),
                    Some(Polled::Connected { session_present }) => {
                        debug!(client_id = %self.client_id, session_present, "connected to the mqtt broker");
                    }
                    Some(Polled::Subscribed(codes)) => {
                        if codes.iter().any(|code| matches!(code, SubscribeReasonCode::Failure)) {
                            return Err(SessionError::SubscribeRefused(self.topic.clone()));
                        }
                        *has_consumed = true;
                        info!(topic = %self.topic, client_id = %self.client_id, "consuming mqtt topic");
                    }
                    Some(Polled::Publish(publish)) => {
                        // Messages mean the broker is back: the next failure starts from a
                        // short delay.
                        backoff.reset();
                        if let Some(delivery) = self.delivery(publish, handles) {
                            pending.push_back(delivery);
                        }
                    }
                },
                Some(publish) = retry_rx.recv() => {
                    if let Some(delivery) = self.delivery(publish, handles) {
                        pending.push_back(delivery);
                    }
                }
                permit = out.reserve(), if !pending.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(delivery) = pending.pop_front() {
                            permit.send(delivery);
                        }
                    }
                    Err(_) => return Ok(SessionEnd::EngineGone),
                },
            }
        }
    }

    fn delivery(&self, publish: Publish, handles: &Handles) -> Option<Delivery> {
        match to_event(&publish.topic, &publish.payload, publish.retain) {
            Ok(event) => {
                let settle = MqttSettle {
                    id: event.id().to_string(),
                    client: handles.client.clone(),
                    retry: handles.retry.clone(),
                    _in_flight: handles.in_flight.clone(),
                    publish,
                };
                Some(Delivery {
                    refusal: None,
                    event,
                    ack: Ack::new(settle),
                })
            }
            Err(err) => {
                // Unreachable with the ids built here, but a message that cannot become an
                // event must not come back forever.
                error!(topic = %publish.topic, error = %err, "dropping a message that is not an event");
                let _ = handles.client.try_ack(&publish);
                None
            }
        }
    }
}

/// What every delivery of one connection shares.
struct Handles {
    client: AsyncClient,
    retry: mpsc::UnboundedSender<Publish>,
    in_flight: mpsc::Sender<()>,
}

/// Drives the event loop (connection, pings, acknowledgements) until it fails or the session
/// stops listening.
async fn poll(mut eventloop: EventLoop, polled: mpsc::UnboundedSender<Polled>) {
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => Polled::Connected {
                session_present: connack.session_present,
            },
            Ok(Event::Incoming(Packet::SubAck(suback))) => Polled::Subscribed(suback.return_codes),
            Ok(Event::Incoming(Packet::Publish(publish))) => Polled::Publish(publish),
            Ok(_) => continue,
            Err(err) => {
                let _ = polled.send(Polled::Failed(err));
                return;
            }
        };
        if polled.send(event).is_err() {
            return;
        }
    }
}

/// Errors that retrying will not fix, as long as nobody changes the broker.
fn is_permanent(err: &SessionError) -> bool {
    match err {
        SessionError::SubscribeRefused(_) => true,
        SessionError::Connection(ConnectionError::ConnectionRefused(code)) => matches!(
            code,
            ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized
                | ConnectReturnCode::BadClientId
                | ConnectReturnCode::RefusedProtocolVersion
        ),
        _ => false,
    }
}

/// Settles one delivery on the connection it came from.
struct MqttSettle {
    id: String,
    client: AsyncClient,
    publish: Publish,
    retry: mpsc::UnboundedSender<Publish>,
    /// Keeps the session's connection open until this delivery is settled.
    _in_flight: mpsc::Sender<()>,
}

impl Settle for MqttSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // A lost PUBACK is harmless: the redelivered copy has the same id, finds its Job
            // and is acknowledged on the new connection.
            if let Err(err) = self.client.ack(&self.publish).await {
                debug!(id = %self.id, error = %err, "late ack: its connection is gone and the broker redelivers the message");
            }
            Ok(())
        })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // The broker still holds the message in flight; hand it to the engine again
            // later. If the connection dies first, the broker redelivers it anyway.
            let MqttSettle {
                publish,
                retry,
                _in_flight,
                ..
            } = *self;
            tokio::spawn(async move {
                tokio::time::sleep(RETRY_DELAY).await;
                let _ = retry.send(publish);
                drop(_in_flight);
            });
            Ok(())
        })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            match self.client.ack(&self.publish).await {
                Ok(()) => {
                    debug!(id = %self.id, %reason, "acknowledged a dead-lettered mqtt message");
                    Ok(())
                }
                Err(_) => Err(SourceError::Broker {
                    kind: "mqtt",
                    reason: format!(
                        "message {} could not be acknowledged (its connection closed first); the broker will redeliver it",
                        self.id
                    ),
                }),
            }
        })
    }
}
