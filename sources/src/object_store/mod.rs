//! Object stores (S3 and S3-compatible, GCS, Azure Blob, a local folder): polling with a
//! durable checkpoint, or S3 event notifications arriving over AMQP, NATS, a webhook or SQS.
//!
//! Every object version is one event with a stable id (bucket, key and ETag hashed: see
//! [`object`]), the same whichever mode found it. Polling ([`poll`]) streams listings into the
//! engine's bounded channel and records acknowledged objects in a durable checkpoint
//! ([`checkpoint`]): at least once, never re-emitting an acknowledged object. Notifications
//! ([`notifications`]) settle each transport message once all its objects' events are
//! settled.
//!
//! With `presignExpiry`, events carry a presigned GET URL made by `object_store`'s own signer
//! (S3 SigV4, GCS, Azure SAS): no request and no extra SDK. A local folder (`file://`) has no
//! URLs to sign, so its events carry no `presignedUrl`.

mod checkpoint;
mod filter;
mod notifications;
mod object;
mod poll;
mod sqs;
pub mod store;

use std::sync::Arc;

use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::amqp::AmqpSource;
use crate::check::{BUCKET_SCHEMES, HTTP_SCHEMES};
use crate::check::{Problems, parse_duration};
use crate::nats::NatsSource;
use crate::secret::SecretValue;
use crate::webhook::WebhookSource;
use crate::{Source, SourceContext, SourceError};
use checkpoint::Ledger;
use filter::KeyFilter;
use notifications::NotificationSource;
use object_store::path::Path;
use poll::PollSource;
use sqs::{SqsSettings, SqsSource};
use store::BucketConfig;

pub use notifications::{created_objects, decode_key};
pub use object::{ObjectId, ObjectVersion};

/// Objects landing in a bucket, found by polling or by the store's event notifications.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectStoreSource {
    /// The bucket: `s3://bucket`, `gs://bucket`, `az://container`, or `file:///path` for a
    /// local folder.
    pub url: String,
    /// Only keys starting with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Only keys ending with this suffix, e.g. `.jpg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Only keys matching this glob (`*` within a path segment, `**` across segments, `?`,
    /// `[abc]`, `{jpg,png}`), e.g. `incoming/**/*.{jpg,png}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
    /// Endpoint of an S3-compatible store (MinIO, Ceph, Garage), e.g. `http://127.0.0.1:9000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// S3 region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Access keys; without them the store's usual credential chain is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<ObjectStoreCredentials>,
    /// `poll` lists the bucket every `pollInterval`; `notifications` consumes the store's
    /// event notifications from `notifications`.
    #[serde(default)]
    pub mode: ObjectStoreMode,
    /// How often to list the bucket in `poll` mode, e.g. `10s`.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: String,
    /// Where the store publishes its event notifications (`notifications` mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<NotificationTransport>,
    /// When set, each event carries a presigned GET URL valid this long (e.g. `1h`), so pods
    /// need no bucket credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presign_expiry: Option<String>,
}

fn default_poll_interval() -> String {
    "10s".to_string()
}

/// Access keys for an object store.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectStoreCredentials {
    pub access_key_id: SecretValue,
    pub secret_access_key: SecretValue,
}

/// How new objects are discovered.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ObjectStoreMode {
    #[default]
    Poll,
    Notifications,
}

/// The channel carrying S3 event-notification records ("Records" documents).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NotificationTransport {
    Amqp(AmqpSource),
    Nats(NatsSource),
    Webhook(WebhookSource),
    Sqs(SqsQueue),
}

/// An SQS queue that receives S3 event notifications. It is read with the source's
/// `credentials`, which are required for this transport.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SqsQueue {
    /// e.g. `https://sqs.eu-west-1.amazonaws.com/123456789012/uploads`.
    pub queue_url: String,
    /// The queue's region; defaults to the source's `region`, then `us-east-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// An SQS-compatible endpoint; defaults to the source's `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl ObjectStoreSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.url(&format!("{path}.url"), &self.url, &BUCKET_SCHEMES);
        if let Some(endpoint) = &self.endpoint {
            problems.url(&format!("{path}.endpoint"), endpoint, &HTTP_SCHEMES);
        }
        problems.duration(&format!("{path}.pollInterval"), &self.poll_interval);
        if let Some(expiry) = &self.presign_expiry {
            problems.duration(&format!("{path}.presignExpiry"), expiry);
        }
        if let Some(glob) = &self.glob
            && let Err(reason) = check_glob(glob)
        {
            problems.push(format!("{path}.glob"), reason);
        }
        match (self.mode, &self.notifications) {
            (ObjectStoreMode::Notifications, None) => problems.push(
                format!("{path}.mode"),
                "mode `notifications` needs `notifications` (amqp, nats, webhook or sqs)",
            ),
            (ObjectStoreMode::Poll, Some(_)) => problems.push(
                format!("{path}.notifications"),
                "only used with `mode: notifications`",
            ),
            (_, Some(transport)) => {
                let path = format!("{path}.notifications");
                match transport {
                    NotificationTransport::Amqp(amqp) => {
                        amqp.validate(&format!("{path}.amqp"), problems)
                    }
                    NotificationTransport::Nats(nats) => {
                        nats.validate(&format!("{path}.nats"), problems)
                    }
                    NotificationTransport::Webhook(webhook) => {
                        webhook.validate(&format!("{path}.webhook"), problems)
                    }
                    NotificationTransport::Sqs(sqs) => {
                        problems.url(
                            &format!("{path}.sqs.queueUrl"),
                            &sqs.queue_url,
                            &HTTP_SCHEMES,
                        );
                        if let Some(endpoint) = &sqs.endpoint {
                            problems.url(&format!("{path}.sqs.endpoint"), endpoint, &HTTP_SCHEMES);
                        }
                        if self.credentials.is_none() {
                            problems.push(
                                format!("{path}.sqs"),
                                "sqs needs the source's `credentials` to read the queue",
                            );
                        }
                    }
                }
            }
            (ObjectStoreMode::Poll, None) => {}
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        let mut event = object_sample(&self.url);
        if self.presign_expiry.is_some() {
            event["presignedUrl"] = json!("https://bucket.example/photo.jpg?X-Amz-Signature=0");
        }
        event
    }
}

/// The fields of an object event, for a bucket URL, as the source makes them: `bucket` is the
/// bucket (or a local folder's path), `url` the object in the store's own URL form.
pub fn object_sample(url: &str) -> Value {
    let (scheme, rest) = url.split_once("://").unwrap_or(("s3", url));
    let (bucket, url_base) = if scheme == "file" {
        let folder = rest.trim_end_matches('/');
        (folder.to_string(), format!("file://{folder}"))
    } else {
        let bucket = rest.split('/').find(|s| !s.is_empty()).unwrap_or(rest);
        (bucket.to_string(), format!("{scheme}://{bucket}"))
    };
    let key = "incoming/photo.jpg";
    json!({
        "id": ObjectId::new(&bucket, key, "9b2cf535f27731c974343645a3985328").to_string(),
        "bucket": bucket,
        "key": key,
        "size": 1048576,
        "etag": "\"9b2cf535f27731c974343645a3985328\"",
        "url": format!("{url_base}/{key}"),
        "lastModified": "2026-01-01T00:00:00Z",
    })
}

fn check_glob(glob: &str) -> Result<(), String> {
    let mut depth = 0i32;
    for c in glob.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("`{glob}` has unbalanced brackets or braces"));
        }
    }
    if depth != 0 {
        return Err(format!("`{glob}` has an unclosed `[` or `{{`"));
    }
    Ok(())
}

/// Starts the source: opens the bucket, then either loads the polling checkpoint or connects
/// the notification transport.
pub fn build(
    config: &ObjectStoreSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let config = config.clone();
    let cx = cx.clone();
    Box::pin(async move {
        let bucket = store::open(
            BucketConfig {
                url: &config.url,
                endpoint: config.endpoint.as_deref(),
                region: config.region.as_deref(),
                credentials: config.credentials.as_ref(),
            },
            cx.secrets.as_ref(),
        )
        .await?;
        let filter = KeyFilter::new(
            bucket.key_prefix(config.prefix.as_deref()),
            config.suffix.as_deref(),
            config.glob.as_deref(),
        )?;
        let presign_expiry = config.presign_expiry.as_deref().map(parse_duration);
        match (config.mode, config.notifications) {
            (ObjectStoreMode::Poll, _) => {
                let root = match filter.list_root() {
                    "" => None,
                    root => Some(Path::parse(root).map_err(|e| {
                        SourceError::Config(format!("prefix `{}`: {e}", filter.prefix()))
                    })?),
                };
                // The pipeline and the bucket URL: a pipeline pointed at another bucket, or
                // two pipelines on one bucket, each keep their own record.
                let key = format!("object-store/{}/{}", cx.pipeline, config.url);
                let ledger = Ledger::load(cx.checkpoints.clone(), key).await?;
                Ok(Box::new(PollSource {
                    bucket,
                    filter,
                    root,
                    ledger: Arc::new(ledger),
                    interval: parse_duration(&config.poll_interval),
                    presign_expiry,
                }) as Box<dyn Source>)
            }
            (ObjectStoreMode::Notifications, None) => Err(SourceError::Config(
                "mode `notifications` needs `notifications` (amqp, nats, webhook or sqs)"
                    .to_string(),
            )),
            (ObjectStoreMode::Notifications, Some(transport)) => {
                let transport = match &transport {
                    NotificationTransport::Amqp(amqp) => crate::amqp::build(amqp, &cx).await?,
                    NotificationTransport::Nats(nats) => crate::nats::build(nats, &cx).await?,
                    NotificationTransport::Webhook(webhook) => {
                        crate::webhook::build(webhook, &cx).await?
                    }
                    NotificationTransport::Sqs(queue) => {
                        // Without aws-config there is no ambient credential chain: keys are
                        // required, which also keeps a misconfigured pod from probing for
                        // instance credentials.
                        let Some(credentials) = &config.credentials else {
                            return Err(SourceError::Config(
                                "notifications over sqs need `credentials` (the access keys \
                                 that read the queue)"
                                    .to_string(),
                            ));
                        };
                        Box::new(SqsSource::new(SqsSettings {
                            queue_url: queue.queue_url.clone(),
                            region: queue
                                .region
                                .clone()
                                .or_else(|| config.region.clone())
                                .unwrap_or_else(|| "us-east-1".to_string()),
                            endpoint: queue.endpoint.clone().or_else(|| config.endpoint.clone()),
                            access_key_id: cx.secrets.resolve(&credentials.access_key_id).await?,
                            secret_access_key: cx
                                .secrets
                                .resolve(&credentials.secret_access_key)
                                .await?,
                        })) as Box<dyn Source>
                    }
                };
                Ok(Box::new(NotificationSource {
                    transport,
                    bucket,
                    filter,
                    presign_expiry,
                }) as Box<dyn Source>)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn field_names(event: &Value) -> BTreeSet<String> {
        event.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn the_sample_event_has_the_fields_and_forms_of_a_real_one() {
        for (url, presign) in [("s3://photos", true), ("file:///data/in", false)] {
            let mut config: ObjectStoreSource =
                serde_json::from_value(json!({ "url": url })).unwrap();
            if presign {
                config.presign_expiry = Some("1h".to_string());
            }
            let sample = config.sample_event();
            let (bucket, base) = match url.strip_prefix("file://") {
                Some(folder) => (folder.to_string(), url.to_string()),
                None => ("photos".to_string(), url.to_string()),
            };
            let real = ObjectVersion {
                bucket: bucket.clone(),
                key: "incoming/photo.jpg".to_string(),
                size: 1048576,
                etag: "\"9b2cf535f27731c974343645a3985328\"".to_string(),
                last_modified: "2026-01-01T00:00:00Z".to_string(),
            }
            .event(
                format!("{base}/incoming/photo.jpg"),
                presign.then(|| "https://signed".to_string()),
            )
            .unwrap()
            .to_json();
            assert_eq!(field_names(&sample), field_names(&real), "{url}");
            for field in ["id", "bucket", "key", "size", "etag", "url", "lastModified"] {
                assert_eq!(sample[field], real[field], "{url}: {field}");
            }
        }
    }
}
