//! Appends records to a Redis stream (`XADD`), one entry per record with the record's JSON in
//! the field `data`, optionally trimmed approximately to `maxLen` entries (`MAXLEN ~`).
//!
//! At-least-once: `deliver` returns once Redis has answered every `XADD` of the batch (sent
//! as one pipeline). A failed attempt is retried with jittered backoff a bounded number of
//! times, on a new connection, and re-sends the whole batch: a timeout after Redis applied
//! it can leave duplicate entries, which readers recognise by the record's content.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use spate_sources::backoff::Backoff;
use spate_sources::check::Problems;
use spate_sources::redact;
use spate_sources::redis_streams::{REDIS_EXAMPLE, REDIS_SCHEMES, resolve_url};
use spate_sources::secret::SecretValue;
use tokio::sync::Mutex;
use tracing::warn;

use crate::{Record, Sink, SinkContext, SinkError};

/// `XADD` attempts per `deliver` before giving up.
const ATTEMPTS: u32 = 5;
/// The longest one attempt (connect plus the pipeline) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Append each record to a Redis stream.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisStreamsSink {
    /// `redis://host:6379/0` (or `rediss://`). Put credentials in `urlFrom` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The whole URL, credentials included, from a Secret or the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretValue>,
    /// The stream's key; created by the first `XADD`.
    pub stream: String,
    /// Trim the stream to about this many entries on each `XADD` (`MAXLEN ~`); unset keeps
    /// everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
}

impl RedisStreamsSink {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url_or_secret(
            path,
            self.url.as_deref(),
            self.url_from.is_some(),
            &REDIS_SCHEMES,
            REDIS_EXAMPLE,
        );
        if self.stream.trim().is_empty() {
            problems.push(format!("{path}.stream"), "must name a stream");
        }
        if self.max_len == Some(0) {
            problems.push(
                format!("{path}.maxLen"),
                "must be at least 1 (leave it out to keep every entry)",
            );
        }
    }
}

/// Connects the sink: Redis must answer now, so a wrong URL fails the pipeline at start-up
/// rather than at its first result.
pub fn build(
    config: &RedisStreamsSink,
    cx: &SinkContext,
) -> BoxFuture<'static, Result<Box<dyn Sink>, SinkError>> {
    let config = config.clone();
    let secrets = cx.secrets.clone();
    Box::pin(async move {
        let url = resolve_url(&config.url, &config.url_from, secrets.as_ref())
            .await
            .map_err(|err| SinkError::Config(err.to_string()))?;
        let address = redact::url(&url);
        let client = redis::Client::open(url.as_str()).map_err(|err| SinkError::Connect {
            address: address.clone(),
            reason: err.to_string(),
        })?;
        let connection = connect(&client)
            .await
            .map_err(|reason| SinkError::Connect {
                address: address.clone(),
                reason,
            })?;
        Ok(Box::new(RedisStreamsPublisher {
            client,
            connection: Mutex::new(Some(connection)),
            stream: config.stream,
            max_len: config.max_len,
        }) as Box<dyn Sink>)
    })
}

async fn connect(client: &redis::Client) -> Result<MultiplexedConnection, String> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(ATTEMPT_TIMEOUT))
        .set_response_timeout(Some(ATTEMPT_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|err| err.to_string())
}

struct RedisStreamsPublisher {
    client: redis::Client,
    /// `None` after a failure: the next attempt connects again.
    connection: Mutex<Option<MultiplexedConnection>>,
    stream: String,
    max_len: Option<u64>,
}

impl RedisStreamsPublisher {
    async fn append(&self, payloads: &[Vec<u8>]) -> Result<(), String> {
        let mut slot = self.connection.lock().await;
        let mut connection = match slot.as_ref() {
            Some(connection) => connection.clone(),
            None => connect(&self.client).await?,
        };
        let mut pipe = redis::pipe();
        for payload in payloads {
            let cmd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(max_len) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(max_len);
            }
            cmd.arg("*").arg("data").arg(payload.as_slice()).ignore();
        }
        match pipe.query_async::<()>(&mut connection).await {
            Ok(()) => {
                *slot = Some(connection);
                Ok(())
            }
            Err(err) => {
                *slot = None;
                Err(err.to_string())
            }
        }
    }
}

impl Sink for RedisStreamsPublisher {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let payloads = crate::encode(records, "redisStreams")?;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                let reason =
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, self.append(&payloads)).await {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(reason)) => reason,
                        Err(_) => {
                            *self.connection.lock().await = None;
                            format!("no answer within {ATTEMPT_TIMEOUT:?}")
                        }
                    };
                if backoff.attempt() + 1 >= ATTEMPTS {
                    return Err(SinkError::Delivery {
                        kind: "redisStreams",
                        reason: format!(
                            "adding {} records to stream {} failed {ATTEMPTS} times: {reason}",
                            payloads.len(),
                            self.stream
                        ),
                    });
                }
                let delay = backoff.next_delay();
                warn!(stream = %self.stream, error = %reason, attempt = backoff.attempt(),
                    delay_ms = delay.as_millis() as u64, "redis XADD failed; retrying");
                tokio::time::sleep(delay).await;
            }
        })
    }
}
