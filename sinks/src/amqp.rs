//! Publishes records to a RabbitMQ exchange with publisher confirms.
//!
//! At-least-once: `deliver` returns only when the broker has confirmed every record, each a
//! persistent JSON message published `mandatory`, so a record no queue would receive is an
//! error rather than a silent drop. A failed connection is rebuilt and the records the broker
//! has not confirmed are published again, a bounded number of times with jittered backoff; a
//! record whose confirm was lost with the connection may therefore arrive twice.

use std::time::Duration;

use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use spate_sources::amqp::AMQP_EXAMPLE;
use spate_sources::backoff::Backoff;
use spate_sources::check::{AMQP_SCHEMES, Problems};
use spate_sources::redact;
use spate_sources::secret::SecretValue;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::{Record, Sink, SinkContext, SinkError};

/// Publish attempts per `deliver` before giving up.
const ATTEMPTS: u32 = 5;
/// How long connecting may take before it counts as a failed attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one attempt may wait for its confirms: a broker under a memory or disk alarm
/// blocks publishers silently, and `deliver` must fail rather than hang.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AmqpSink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The exchange; empty for the default exchange.
    #[serde(default)]
    pub exchange: String,
    pub routing_key: String,
}

impl AmqpSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url_or_secret(
            path,
            self.url.as_deref(),
            self.url_from.is_some(),
            &AMQP_SCHEMES,
            AMQP_EXAMPLE,
        );
        if self.routing_key.is_empty() && self.exchange.is_empty() {
            problems.push(
                format!("{path}.routingKey"),
                "name the queue to publish to (the default exchange routes by queue name)",
            );
        }
    }
}

/// Connects the sink: the broker must answer now, so a wrong URL or password fails the
/// pipeline at start-up rather than at its first result.
pub fn build(
    config: &AmqpSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let url = match (&config.url, &config.url_from) {
            (_, Some(secret)) => cx.secrets.resolve(secret).await?,
            (Some(url), None) => url.clone(),
            (None, None) => {
                return Err(SinkError::Config(
                    "amqp sink: set url or urlFrom".to_string(),
                ));
            }
        };
        let publisher = AmqpPublisher {
            name: format!("spate {}/{}", cx.pipeline.namespace, cx.pipeline.name),
            address: redact::url(&url),
            url,
            exchange: config.exchange,
            routing_key: config.routing_key,
            channel: Mutex::new(None),
        };
        let channel = publisher.connect().await?;
        *publisher.channel.lock().await = Some(channel);
        Ok(Box::new(publisher) as Box<dyn Sink>)
    })
}

struct AmqpPublisher {
    url: String,
    /// The URL without credentials, for errors and logs.
    address: String,
    name: String,
    exchange: String,
    routing_key: String,
    /// One confirm-mode channel, rebuilt after a failure; the lock also keeps concurrent
    /// `deliver`s from interleaving their confirms.
    channel: Mutex<Option<OpenChannel>>,
}

struct OpenChannel {
    connection: Connection,
    channel: Channel,
}

/// Why publishing some records failed.
enum Failure {
    /// The connection or channel broke: reconnect and try again.
    Broken(String),
    /// The broker answered and will answer the same again (no route, nack).
    Refused(String),
}

impl AmqpPublisher {
    async fn connect(&self) -> Result<OpenChannel, SinkError> {
        let connect_error = |err: lapin::Error| SinkError::Connect {
            address: self.address.clone(),
            reason: err.to_string(),
        };
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.as_str().into());
        let connection =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.url, properties))
                .await
                .map_err(|_| SinkError::Connect {
                    address: self.address.clone(),
                    reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
                })?
                .map_err(connect_error)?;
        let channel = connection.create_channel().await.map_err(connect_error)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(connect_error)?;
        Ok(OpenChannel {
            connection,
            channel,
        })
    }

    /// Publishes the records not yet confirmed and marks those the broker confirms.
    async fn publish(
        &self,
        channel: &Channel,
        payloads: &[Vec<u8>],
        confirmed: &mut [bool],
    ) -> Result<(), Failure> {
        let mut pending = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            if confirmed[index] {
                continue;
            }
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let confirm = channel
                .basic_publish(
                    self.exchange.as_str().into(),
                    self.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    payload,
                    properties,
                )
                .await
                .map_err(|err| Failure::Broken(err.to_string()))?;
            pending.push((index, confirm));
        }
        for (index, confirm) in pending {
            match confirm
                .await
                .map_err(|err| Failure::Broken(err.to_string()))?
            {
                Confirmation::Ack(None) => confirmed[index] = true,
                Confirmation::Ack(Some(_returned)) => {
                    return Err(Failure::Refused(format!(
                        "no queue is bound to exchange `{}` with routing key `{}`",
                        self.exchange, self.routing_key
                    )));
                }
                Confirmation::Nack(_) => {
                    return Err(Failure::Refused(
                        "the broker refused a record (nack)".to_string(),
                    ));
                }
                Confirmation::NotRequested => {
                    return Err(Failure::Broken(
                        "the channel is not in confirm mode".to_string(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Sink for AmqpPublisher {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let payloads = crate::encode(records, "amqp")?;
            let mut confirmed = vec![false; payloads.len()];
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            let mut slot = self.channel.lock().await;
            loop {
                let failure = match slot.as_ref() {
                    Some(open) if open.channel.status().connected() => {
                        let attempt = self.publish(&open.channel, &payloads, &mut confirmed);
                        match tokio::time::timeout(CONFIRM_TIMEOUT, attempt).await {
                            Ok(Ok(())) => return Ok(()),
                            Ok(Err(failure)) => failure,
                            Err(_) => Failure::Broken(format!(
                                "no confirm within {CONFIRM_TIMEOUT:?} (is the broker blocking publishers?)"
                            )),
                        }
                    }
                    _ => match self.connect().await {
                        Ok(open) => {
                            *slot = Some(open);
                            continue;
                        }
                        Err(err) => Failure::Broken(err.to_string()),
                    },
                };
                let reason = match failure {
                    Failure::Refused(reason) => {
                        return Err(SinkError::Delivery {
                            kind: "amqp",
                            reason,
                        });
                    }
                    Failure::Broken(reason) => reason,
                };
                if let Some(open) = slot.take()
                    && let Err(err) = open.connection.close(200, "reconnecting".into()).await
                {
                    debug!(error = %err, "closing a broken amqp connection");
                }
                if backoff.attempt() + 1 >= ATTEMPTS {
                    return Err(SinkError::Delivery {
                        kind: "amqp",
                        reason: format!(
                            "{} of {} records unconfirmed by {} after {ATTEMPTS} attempts: {reason}",
                            confirmed.iter().filter(|done| !**done).count(),
                            payloads.len(),
                            self.address
                        ),
                    });
                }
                let delay = backoff.next_delay();
                warn!(address = %self.address, error = %reason, attempt = backoff.attempt(),
                    delay_ms = delay.as_millis() as u64, "amqp publish failed; reconnecting");
                tokio::time::sleep(delay).await;
            }
        })
    }
}
