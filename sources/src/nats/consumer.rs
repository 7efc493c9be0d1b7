//! The running NATS source: a core subscription or a JetStream durable pull consumer.
//!
//! Core subscriptions are at-most-once: a message published while Spate is disconnected, or
//! dropped by the client because the engine fell more than [`SUBSCRIPTION_CAPACITY`] messages
//! behind (NATS "slow consumer"), is gone, and deliveries carry [`Ack::none`].
//!
//! JetStream consumers are at-least-once: each pull asks for no more messages than the
//! engine's channel has room for, so when the engine stops reading Spate stops pulling and
//! the stream keeps the rest. A message is acked once its Job exists, nak'ed for `retry`
//! (redelivered at once) and terminated for `reject` (never redelivered). A message not acked
//! within `ackWait` (crash, stall, a lost ack) is redelivered with the same id, hence the
//! same Job; so `ackWait` should exceed the time to create a Job under load. A delivery past
//! `maxDeliver` (counted by the server, enforced here) is handed to the engine refused: it is
//! dead-lettered, then terminated, unless its Job exists.
//!
//! The client reconnects by itself after a server restart; around it the pull loop retries
//! with jittered backoff and re-opens the consumer, so it survives restarts and a stream being
//! recreated.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, ConnectErrorKind, ConnectOptions};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::message::{StreamPosition, to_event};
use crate::backoff::Backoff;
use crate::{Ack, Delivery, Settle, Source, SourceError};

/// Messages the client buffers per core subscription before dropping (NATS slow consumer):
/// bounds memory when the engine stalls, at the cost of losing messages, which core NATS
/// subjects accept by design.
pub const SUBSCRIPTION_CAPACITY: usize = 4096;
/// The most messages one JetStream pull asks for, even when the engine has more room.
const MAX_PULL: usize = 256;
/// How long one pull waits on an idle stream before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The durable consumer's settings, parsed.
pub(super) struct JetStreamSettings {
    pub(super) stream: String,
    pub(super) durable: String,
    pub(super) ack_wait: Duration,
    pub(super) max_deliver: i64,
}

/// A configured, not yet connected, NATS source.
pub(super) struct NatsConsumer {
    pub(super) url: String,
    pub(super) subject: String,
    pub(super) jetstream: Option<JetStreamSettings>,
    pub(super) pipeline: String,
}

/// How a consuming loop ended without an error.
enum End {
    Shutdown,
    /// The engine dropped its receiver: nobody will read another delivery.
    EngineGone,
}

impl Source for NatsConsumer {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let Some(client) = self.connect(&shutdown).await? else {
                return Ok(());
            };
            match &self.jetstream {
                None => self.subscribe(client, out, shutdown).await,
                Some(settings) => self.pull(settings, client, out, shutdown).await,
            }
        })
    }
}

impl NatsConsumer {
    /// Connects, retrying until the server answers; `None` if shut down first.
    async fn connect(&self, shutdown: &CancellationToken) -> Result<Option<Client>, SourceError> {
        let mut backoff = Backoff::reconnect();
        loop {
            let options = ConnectOptions::new()
                .name(format!("spate {}", self.pipeline))
                .subscription_capacity(SUBSCRIPTION_CAPACITY);
            let (url, options) = super::without_credentials(&self.url, options);
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                attempt = options.connect(url.as_str()) => attempt,
            };
            match attempt {
                Ok(client) => return Ok(Some(client)),
                Err(err)
                    if matches!(
                        err.kind(),
                        ConnectErrorKind::Authentication
                            | ConnectErrorKind::AuthorizationViolation
                            | ConnectErrorKind::ServerParse
                            | ConnectErrorKind::Tls
                    ) =>
                {
                    return Err(SourceError::Connect {
                        address: url,
                        reason: err.to_string(),
                    });
                }
                Err(err) => {
                    let delay = backoff.next_delay();
                    warn!(%url, error = %err, attempt = backoff.attempt(),
                        delay_ms = delay.as_millis() as u64, "cannot connect to nats; retrying");
                    if !sleep_unless_shutdown(delay, shutdown).await {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn subscribe(
        &self,
        client: Client,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut backoff = Backoff::reconnect();
        loop {
            match client.subscribe(self.subject.clone()).await {
                Ok(mut subscriber) => {
                    info!(subject = %self.subject, "subscribed to nats subject (at-most-once)");
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            message = subscriber.next() => message,
                        };
                        // The subscription only ends when the client is closed.
                        let Some(message) = message else { break };
                        backoff.reset();
                        let event = match to_event(
                            message.subject.as_str(),
                            message.headers.as_ref(),
                            &message.payload,
                            None,
                        ) {
                            Ok(event) => event,
                            Err(err) => {
                                error!(subject = %message.subject, error = %err, "dropping a message that is not an event");
                                continue;
                            }
                        };
                        let delivery = Delivery {
                            event,
                            ack: Ack::none(),
                            refusal: None,
                        };
                        match hand_over(&out, &shutdown, delivery).await {
                            Some(End::Shutdown) | Some(End::EngineGone) => return Ok(()),
                            None => {}
                        }
                    }
                    warn!(subject = %self.subject, "nats subscription ended; subscribing again");
                }
                Err(err) => {
                    warn!(subject = %self.subject, error = %err, "cannot subscribe to nats subject")
                }
            }
            if !sleep_unless_shutdown(backoff.next_delay(), &shutdown).await {
                return Ok(());
            }
        }
    }

    async fn pull(
        &self,
        settings: &JetStreamSettings,
        client: Client,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let context = jetstream::new(client);
        let mut backoff = Backoff::reconnect();
        // A missing stream or a consumer the server refuses at start-up is a configuration
        // error; after the source has run, the same errors are an outage and are retried.
        let mut has_consumed = false;
        loop {
            match self.open(&context, settings).await {
                Ok(consumer) => {
                    has_consumed = true;
                    info!(stream = %settings.stream, durable = %settings.durable,
                        "pulling from jetstream consumer");
                    match self
                        .pull_from(
                            &consumer,
                            settings.max_deliver,
                            &out,
                            &shutdown,
                            &mut backoff,
                        )
                        .await
                    {
                        Ok(End::Shutdown) | Ok(End::EngineGone) => return Ok(()),
                        Err(reason) => {
                            warn!(stream = %settings.stream, durable = %settings.durable,
                            error = %reason, "jetstream pull failed")
                        }
                    }
                }
                Err(Open {
                    permanent: true,
                    reason,
                }) if !has_consumed => {
                    return Err(SourceError::Broker {
                        kind: "nats",
                        reason: format!(
                            "stream {} consumer {}: {reason}",
                            settings.stream, settings.durable
                        ),
                    });
                }
                Err(Open { reason, .. }) => error!(stream = %settings.stream,
                    durable = %settings.durable, error = %reason,
                    "cannot open the jetstream consumer"),
            }
            let delay = backoff.next_delay();
            warn!(stream = %settings.stream, attempt = backoff.attempt(),
                delay_ms = delay.as_millis() as u64, "retrying jetstream");
            if !sleep_unless_shutdown(delay, &shutdown).await {
                return Ok(());
            }
        }
    }

    /// Creates the durable consumer, or brings an existing one to the pipeline's settings
    /// (the server keeps its position). The server redelivers without limit: `maxDeliver` is
    /// counted here, so the delivery past it reaches the engine refused and is dead-lettered,
    /// where a server-side limit would make the server stop delivering it, silently.
    async fn open(
        &self,
        context: &jetstream::Context,
        settings: &JetStreamSettings,
    ) -> Result<PullConsumer, Open> {
        let stream = context
            .get_stream(&settings.stream)
            .await
            .map_err(|err| Open {
                permanent: matches!(err.kind(), GetStreamErrorKind::JetStream(_)),
                reason: err.to_string(),
            })?;
        let config = pull::Config {
            durable_name: Some(settings.durable.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: -1,
            filter_subject: self.subject.clone(),
            ..pull::Config::default()
        };
        stream.create_consumer(config).await.map_err(|err| Open {
            permanent: matches!(err.kind(), ConsumerErrorKind::JetStream(_)),
            reason: err.to_string(),
        })
    }

    /// Pulls batches sized to the engine's free room until an error or the end.
    async fn pull_from(
        &self,
        consumer: &PullConsumer,
        max_deliver: i64,
        out: &mpsc::Sender<Delivery>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<End, String> {
        loop {
            // Wait until the engine has room, then ask for no more than that: this sender is
            // the channel's only one, so the room can only grow until these are handed over.
            let room = tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                permit = out.reserve() => match permit {
                    Ok(permit) => {
                        drop(permit);
                        out.capacity().clamp(1, MAX_PULL)
                    }
                    Err(_) => return Ok(End::EngineGone),
                },
            };
            let mut batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                batch = consumer.batch().max_messages(room).expires(PULL_EXPIRES).messages() =>
                    batch.map_err(|err| err.to_string())?,
            };
            loop {
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(End::Shutdown),
                    message = batch.next() => message,
                };
                let Some(message) = message else { break };
                let message = message.map_err(|err| err.to_string())?;
                backoff.reset();
                let (position, delivered) = match message.info() {
                    Ok(info) => (
                        (info.stream.to_string(), info.stream_sequence),
                        info.delivered,
                    ),
                    Err(err) => {
                        // Without its metadata the message cannot be named or acked; the
                        // server redelivers it after ackWait.
                        error!(subject = %message.subject, error = %err, "jetstream message without metadata");
                        continue;
                    }
                };
                let (message, acker) = message.split();
                let event = to_event(
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                    Some(StreamPosition {
                        stream: &position.0,
                        sequence: position.1,
                    }),
                );
                let id = format!("{}:{}", position.0, position.1);
                let event = match event {
                    Ok(event) => event,
                    Err(err) => {
                        error!(%id, error = %err, "terminating a message that is not an event");
                        if let Err(err) = acker.ack_with(AckKind::Term).await {
                            warn!(%id, error = %err, "cannot terminate jetstream message");
                        }
                        continue;
                    }
                };
                let refusal = (max_deliver > 0 && delivered > max_deliver)
                    .then(|| {
                        format!(
                            "delivered {delivered} times, more than maxDeliver ({max_deliver}), without its Job being created"
                        )
                    });
                let ack = Ack::new(JetStreamSettle { acker, id });
                let delivery = Delivery {
                    event,
                    ack,
                    refusal,
                };
                if let Some(end) = hand_over(out, shutdown, delivery).await {
                    return Ok(end);
                }
            }
        }
    }
}

struct Open {
    permanent: bool,
    reason: String,
}

/// Sends one delivery; `Some` when the loop must stop instead.
async fn hand_over(
    out: &mpsc::Sender<Delivery>,
    shutdown: &CancellationToken,
    delivery: Delivery,
) -> Option<End> {
    tokio::select! {
        _ = shutdown.cancelled() => Some(End::Shutdown),
        sent = out.send(delivery) => sent.err().map(|_| End::EngineGone),
    }
}

/// `false` when shut down during the sleep.
async fn sleep_unless_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Settles one JetStream message through its reply subject.
struct JetStreamSettle {
    acker: jetstream::message::Acker,
    id: String,
}

impl Settle for JetStreamSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // A lost ack is harmless: after ackWait the message comes again with the same id,
            // finds its Job and is acked then.
            if let Err(err) = self.acker.ack_with(AckKind::Ack).await {
                debug!(id = %self.id, error = %err, "jetstream ack lost; the message will be redelivered");
            }
            Ok(())
        })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // If the nak is lost, ackWait redelivers it anyway: what retry asks for.
            if let Err(err) = self.acker.ack_with(AckKind::Nak(None)).await {
                debug!(id = %self.id, error = %err, "jetstream nak lost; redelivery after ackWait");
            }
            Ok(())
        })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            // Confirmed by the server: a lost term would bring the poison message back.
            self.acker
                .double_ack_with(AckKind::Term)
                .await
                .map_err(|err| SourceError::Broker {
                    kind: "nats",
                    reason: format!("cannot terminate message {}: {err}", self.id),
                })?;
            debug!(id = %self.id, %reason, "terminated jetstream message");
            Ok(())
        })
    }
}
