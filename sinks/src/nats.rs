//! Publishes records to a NATS subject, waiting for the JetStream acknowledgement when
//! asked.
//!
//! With `jetstream: true`, at-least-once: `deliver` returns once the stream has acknowledged
//! (stored) every record. Each record carries a `Nats-Msg-Id` derived from its content, so
//! when a lost acknowledgement makes Spate publish it again the stream's duplicate window
//! drops the copy. Without JetStream, a core publish followed by a flush: the server has the
//! records, and subscribers connected at that moment get them (at-most-once).
//! Failures are retried a bounded number of times with jittered backoff; the client
//! reconnects by itself in between.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, ConnectOptions, HeaderMap};
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spate_sources::backoff::Backoff;
use spate_sources::check::Problems;
use spate_sources::check::{NATS_SCHEMES, check_subject};
use tracing::warn;

use crate::{Record, Sink, SinkContext, SinkError};

/// Publish attempts per `deliver` before giving up.
const ATTEMPTS: u32 = 5;
/// The longest one attempt (publishes plus flush or acknowledgements) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSink {
    pub url: String,
    pub subject: String,
    /// Wait for the JetStream acknowledgement of each publish.
    #[serde(default)]
    pub jetstream: bool,
}

impl NatsSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url(&format!("{path}.url"), &self.url, &NATS_SCHEMES);
        check_subject(problems, &format!("{path}.subject"), &self.subject, false);
    }
}

/// Connects the sink: the server must answer now, so a wrong URL fails the pipeline at
/// start-up rather than at its first result.
pub fn build(
    config: &NatsSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let name = format!("spate {}/{}", cx.pipeline.namespace, cx.pipeline.name);
    Box::pin(async move {
        let (url, options) =
            spate_sources::nats::without_credentials(&config.url, ConnectOptions::new().name(name));
        let client = options
            .connect(url.as_str())
            .await
            .map_err(|err| SinkError::Connect {
                address: url.clone(),
                reason: err.to_string(),
            })?;
        let jetstream = config.jetstream.then(|| jetstream::new(client.clone()));
        Ok(Box::new(NatsPublisher {
            client,
            jetstream,
            subject: config.subject,
        }) as Box<dyn Sink>)
    })
}

struct NatsPublisher {
    client: Client,
    jetstream: Option<jetstream::Context>,
    subject: String,
}

impl NatsPublisher {
    /// Publishes the records not yet acknowledged, marking those the stream acknowledges.
    async fn publish_to_stream(
        &self,
        context: &jetstream::Context,
        payloads: &[Vec<u8>],
        done: &mut [bool],
    ) -> Result<(), String> {
        let mut pending = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            if done[index] {
                continue;
            }
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", content_id(payload).as_str());
            let ack = context
                .publish_with_headers(self.subject.clone(), headers, payload.clone().into())
                .await
                .map_err(|err| err.to_string())?;
            pending.push((index, ack));
        }
        for (index, ack) in pending {
            ack.await.map_err(|err| err.to_string())?;
            done[index] = true;
        }
        Ok(())
    }

    async fn publish_core(&self, payloads: &[Vec<u8>]) -> Result<(), String> {
        for payload in payloads {
            self.client
                .publish(self.subject.clone(), payload.clone().into())
                .await
                .map_err(|err| err.to_string())?;
        }
        self.client.flush().await.map_err(|err| err.to_string())
    }
}

impl Sink for NatsPublisher {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let payloads = crate::encode(records, "nats")?;
            let mut done = vec![false; payloads.len()];
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                let attempt = async {
                    match &self.jetstream {
                        Some(context) => {
                            self.publish_to_stream(context, &payloads, &mut done).await
                        }
                        // Core publishes are not acknowledged one by one: a retry sends the
                        // whole batch again.
                        None => self.publish_core(&payloads).await,
                    }
                };
                let reason = match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(reason)) => reason,
                    Err(_) => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                };
                if backoff.attempt() + 1 >= ATTEMPTS {
                    return Err(SinkError::Delivery {
                        kind: "nats",
                        reason: format!(
                            "publishing {} records to {} failed {ATTEMPTS} times: {reason}",
                            payloads.len(),
                            self.subject
                        ),
                    });
                }
                let delay = backoff.next_delay();
                warn!(subject = %self.subject, error = %reason, attempt = backoff.attempt(),
                    delay_ms = delay.as_millis() as u64, "nats publish failed; retrying");
                tokio::time::sleep(delay).await;
            }
        })
    }
}

/// The record's JetStream de-duplication id: the same bytes, the same id.
fn content_id(payload: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(payload))
}
