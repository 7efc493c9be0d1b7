//! An SQS queue as the transport of S3 event notifications (the AWS-native path: bucket →
//! SQS), feeding [`NotificationSource`](super::notifications::NotificationSource).
//!
//! Each SQS message becomes one delivery whose `data` is the message body (the Records
//! document). Acknowledging or rejecting deletes the message; retrying makes it visible again
//! at once. A message still held by the engine when the queue's visibility timeout runs out is
//! delivered a second time: its objects keep their ids, so they map to the same Jobs. Give the
//! queue a visibility timeout longer than Job creation takes under load (the SQS default, 30s,
//! usually is).

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use futures::future::BoxFuture;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Ack, Delivery, Event, Settle, Source, SourceError};

/// Messages asked for per receive: the SQS maximum.
const BATCH: i32 = 10;
/// Long polling: an idle queue costs one request per this many seconds.
const WAIT_SECONDS: i32 = 10;
/// Consecutive failed receives before the source gives up and reports the error.
const MAX_FAILURES: u32 = 8;

/// Where the queue is and the keys to read it with.
pub struct SqsSettings {
    pub queue_url: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
}

pub struct SqsSource {
    client: Client,
    queue_url: String,
}

impl SqsSource {
    pub fn new(settings: SqsSettings) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region))
            .credentials_provider(Credentials::new(
                settings.access_key_id,
                settings.secret_access_key,
                None,
                None,
                "spate-pipeline",
            ))
            .http_client(http);
        if let Some(endpoint) = settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        SqsSource {
            client: Client::from_conf(config.build()),
            queue_url: settings.queue_url,
        }
    }
}

impl Source for SqsSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let mut failures = 0u32;
            loop {
                let receive = self
                    .client
                    .receive_message()
                    .queue_url(&self.queue_url)
                    .max_number_of_messages(BATCH)
                    .wait_time_seconds(WAIT_SECONDS)
                    .send();
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    received = receive => received,
                };
                let messages = match received {
                    Ok(output) => {
                        failures = 0;
                        output.messages.unwrap_or_default()
                    }
                    Err(error) => {
                        failures += 1;
                        let reason = DisplayErrorContext(&error).to_string();
                        if failures >= MAX_FAILURES {
                            return Err(SourceError::Connect {
                                address: self.queue_url.clone(),
                                reason,
                            });
                        }
                        let pause = backoff(failures);
                        tracing::warn!(
                            queue = %self.queue_url, failures, %reason, retry_in = ?pause,
                            "cannot receive from SQS; retrying"
                        );
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(pause) => continue,
                        }
                    }
                };
                for message in messages {
                    let (Some(id), Some(receipt)) = (message.message_id, message.receipt_handle)
                    else {
                        continue;
                    };
                    let mut fields = Map::new();
                    fields.insert("subject".into(), Value::String(self.queue_url.clone()));
                    fields.insert(
                        "data".into(),
                        Value::String(message.body.unwrap_or_default()),
                    );
                    let event = Event::new(id, fields).map_err(|e| SourceError::Broker {
                        kind: "sqs",
                        reason: e.to_string(),
                    })?;
                    let ack = Ack::new(SqsAck {
                        client: self.client.clone(),
                        queue_url: self.queue_url.clone(),
                        receipt,
                    });
                    tokio::select! {
                                           // Unsettled messages reappear after the visibility timeout.
                                           _ = shutdown.cancelled() => return Ok(()),
                                           sent = out.send(Delivery {
                    event,
                    ack,
                    refusal: None,
                    }) => {
                                               if sent.is_err() {
                                                   return Ok(());
                                               }
                                           }
                                       }
                }
            }
        })
    }
}

/// 0.5s doubling to 30s, plus up to half again at random so restarted replicas spread out.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500 * 2u64.pow(failures.min(6))).min(Duration::from_secs(30));
    base + base.mul_f64(rand::rng().random_range(0.0..0.5))
}

struct SqsAck {
    client: Client,
    queue_url: String,
    receipt: String,
}

impl SqsAck {
    async fn delete(self) -> Result<(), SourceError> {
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(&self.receipt)
            .send()
            .await
            .map(|_| ())
            .map_err(|error| SourceError::Broker {
                kind: "sqs",
                reason: format!("cannot delete a message: {}", DisplayErrorContext(&error)),
            })
    }
}

impl Settle for SqsAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.delete())
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            self.client
                .change_message_visibility()
                .queue_url(&self.queue_url)
                .receipt_handle(&self.receipt)
                .visibility_timeout(0)
                .send()
                .await
                .map(|_| ())
                .map_err(|error| SourceError::Broker {
                    kind: "sqs",
                    reason: format!("cannot release a message: {}", DisplayErrorContext(&error)),
                })
        })
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        tracing::debug!(queue = %self.queue_url, %reason, "deleting a rejected SQS message");
        Box::pin(self.delete())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        assert!(backoff(1) >= Duration::from_secs(1) && backoff(1) <= Duration::from_millis(1500));
        for failures in 1..20 {
            assert!(backoff(failures) <= Duration::from_secs(45));
        }
        assert!(backoff(10) >= Duration::from_secs(30));
    }
}
