//! Notifications mode: S3 event-notification documents (AWS S3, MinIO, Ceph RGW, Garage)
//! arriving over another source (AMQP, NATS, a webhook) become one event per created object.
//!
//! The transport's source runs unchanged; each message it delivers carries a "Records"
//! document in its `data` field. Every `ObjectCreated:*` record becomes an event with the same
//! fields and the same id as polling would give the object, so a pipeline can switch modes
//! without re-running anything. Other records (removals, restores, test events) are ignored.
//!
//! # Delivery guarantee
//!
//! The message is settled with its transport only when every event made from it is settled:
//! acked when all of them were acked or rejected, retried (redelivered by the broker) when any
//! was retried or dropped unsettled. A redelivered message emits its events again with the
//! same ids, so the ones already handled find their Jobs. A message with no created objects is
//! acked at once. A document that cannot be read, and a message its transport already refused
//! (delivered too often), go to the engine as they are, refused: the engine dead-letters the
//! message with the reason, then rejects it at the transport.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use object_store::path::Path;
use parking_lot::Mutex;
use percent_encoding::percent_decode_str;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::filter::KeyFilter;
use super::object::{ObjectVersion, quoted_etag};
use super::store::Bucket;
use crate::{Ack, Delivery, Event, Settle, Source, SourceError};

/// Messages taken from the transport ahead of the engine. The transport's own prefetch is the
/// real bound; this only decouples the two loops.
const TRANSPORT_BUFFER: usize = 16;
/// How long a stopping source waits for its transport to close.
const TRANSPORT_STOP: Duration = Duration::from_secs(10);

/// Reads the created objects out of one notification message's `data`: a Records document,
/// as JSON or as a string holding JSON, possibly wrapped in an SNS envelope (`Message`).
pub fn created_objects(data: &Value) -> Result<Vec<ObjectVersion>, String> {
    let parsed;
    let document = match data {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("the notification is not JSON: {e}"))?;
            &parsed
        }
        other => other,
    };
    let Value::Object(document) = document else {
        return Err("the notification is not a JSON object".to_string());
    };
    if let Some(records) = document.get("Records") {
        let Value::Array(records) = records else {
            return Err("`Records` is not a list".to_string());
        };
        let mut created = Vec::new();
        for (index, record) in records.iter().enumerate() {
            if let Some(object) =
                created_object(record).map_err(|reason| format!("Records[{index}]: {reason}"))?
            {
                created.push(object);
            }
        }
        return Ok(created);
    }
    if document.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        // S3 sends one when a notification is configured; there is nothing to process.
        return Ok(Vec::new());
    }
    if let Some(Value::String(message)) = document.get("Message") {
        return created_objects(&Value::String(message.clone()));
    }
    Err("the notification has no `Records` list".to_string())
}

/// The created object a record describes; `None` for other kinds of record.
fn created_object(record: &Value) -> Result<Option<ObjectVersion>, String> {
    let name = text(record, &["eventName"])?;
    // AWS writes `ObjectCreated:Put`, MinIO `s3:ObjectCreated:Put`.
    if !name
        .strip_prefix("s3:")
        .unwrap_or(name)
        .starts_with("ObjectCreated:")
    {
        return Ok(None);
    }
    let bucket = text(record, &["s3", "bucket", "name"])?;
    let key = decode_key(text(record, &["s3", "object", "key"])?)?;
    let size = match field(record, &["s3", "object", "size"])? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("s3.object.size `{n}` is not a size"))?,
        other => return Err(format!("s3.object.size is {other}, not a number")),
    };
    let etag = quoted_etag(text(record, &["s3", "object", "eTag"])?);
    let last_modified = text(record, &["eventTime"]).unwrap_or_default().to_string();
    Ok(Some(ObjectVersion {
        bucket: bucket.to_string(),
        key,
        size,
        etag,
        last_modified,
    }))
}

/// Keys in notifications are URL-encoded form-style: `+` is a space, then `%XX` escapes (a
/// literal `+` arrives as `%2B`, so the order matters).
pub fn decode_key(encoded: &str) -> Result<String, String> {
    let spaced = encoded.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|key| key.into_owned())
        .map_err(|e| format!("s3.object.key `{encoded}` is not UTF-8 once decoded: {e}"))
}

fn field<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value, String> {
    path.iter()
        .try_fold(value, |value, name| value.get(name))
        .ok_or_else(|| format!("{} is missing", path.join(".")))
}

fn text<'a>(value: &'a Value, path: &[&str]) -> Result<&'a str, String> {
    field(value, path)?
        .as_str()
        .ok_or_else(|| format!("{} is not a string", path.join(".")))
}

/// Wraps a transport's source and turns its messages into object events.
pub struct NotificationSource {
    pub transport: Box<dyn Source>,
    /// The configured bucket, for its name, URL form and presigning.
    pub bucket: Bucket,
    pub filter: KeyFilter,
    pub presign_expiry: Option<Duration>,
}

impl Source for NotificationSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let NotificationSource {
                transport,
                bucket,
                filter,
                presign_expiry,
            } = *self;
            let (messages_tx, mut messages) = mpsc::channel(TRANSPORT_BUFFER);
            let transport_stop = shutdown.child_token();
            let mut transport = tokio::spawn(transport.run(messages_tx, transport_stop.clone()));
            let mapper = Mapper {
                bucket,
                filter,
                presign_expiry,
            };
            let result = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    ended = &mut transport => return transport_ended(ended),
                    message = messages.recv() => {
                        // The transport dropped its end: it has stopped, and says why.
                        let Some(message) = message else {
                            return transport_ended(transport.await);
                        };
                        match mapper.forward(message, &out, &shutdown).await {
                            Ok(true) => {}
                            Ok(false) => break Ok(()),
                            Err(error) => break Err(error),
                        }
                    }
                }
            };
            transport_stop.cancel();
            // Let the transport close its connection cleanly, but never hang a shutdown on it.
            if tokio::time::timeout(TRANSPORT_STOP, transport)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the notification transport did not stop within {TRANSPORT_STOP:?}; leaving it"
                );
            }
            result
        })
    }
}

fn transport_ended(
    ended: Result<Result<(), SourceError>, tokio::task::JoinError>,
) -> Result<(), SourceError> {
    ended.unwrap_or_else(|join| {
        Err(SourceError::Broker {
            kind: "objectStore",
            reason: format!("the notification transport failed: {join}"),
        })
    })
}

struct Mapper {
    bucket: Bucket,
    filter: KeyFilter,
    presign_expiry: Option<Duration>,
}

/// Hands a message that can never become object events to the engine, which dead-letters
/// it whole (the transport's own message, with `reason`) and then rejects it; `false` when
/// the engine or the process is stopping.
async fn refuse(
    message: Event,
    ack: Ack,
    reason: String,
    out: &mpsc::Sender<Delivery>,
    shutdown: &CancellationToken,
) -> bool {
    tracing::warn!(message = %message.id(), %reason, "notification refused; it goes to the dead-letter sink");
    let refused = Delivery {
        event: message,
        ack,
        refusal: Some(reason),
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        sent = out.send(refused) => sent.is_ok(),
    }
}

impl Mapper {
    /// Sends the message's events on; `false` when the engine or the process is stopping, an
    /// error when presigning fails (no credentials to sign with: retrying cannot help, and
    /// retrying the message would only spin).
    async fn forward(
        &self,
        message: Delivery,
        out: &mpsc::Sender<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SourceError> {
        let Delivery {
            event,
            ack,
            refusal,
        } = message;
        if let Some(reason) = refusal {
            return Ok(refuse(event, ack, reason, out, shutdown).await);
        }
        let data = event.fields().get("data").unwrap_or(&Value::Null);
        let objects = match created_objects(data) {
            Ok(objects) => objects,
            Err(reason) => {
                let reason = format!("not an S3 event notification: {reason}");
                return Ok(refuse(event, ack, reason, out, shutdown).await);
            }
        };
        let objects: Vec<ObjectVersion> = objects
            .into_iter()
            .filter(|object| {
                object.bucket == self.bucket.name() && self.filter.matches(&object.key)
            })
            .collect();
        if objects.is_empty() {
            settle_logged(ack.ack().await);
            return Ok(true);
        }
        // Presigning goes through `object_store` paths, which cannot hold every S3 key
        // (`a//b`): such an object can never get its URL, so the message is refused (the
        // engine dead-letters it) rather than stopping the source.
        if self.presign_expiry.is_some()
            && let Some((key, error)) = objects
                .iter()
                .find_map(|o| Path::parse(&o.key).err().map(|e| (&o.key, e)))
        {
            let reason = format!("cannot presign `{key}`: {error}");
            return Ok(refuse(event, ack, reason, out, shutdown).await);
        }
        let mut events = Vec::with_capacity(objects.len());
        for object in &objects {
            match self.event(object).await {
                Ok(event) => events.push(event),
                Err(error) => {
                    // The broker keeps the message for the next start.
                    settle_logged(ack.retry().await);
                    return Err(error);
                }
            }
        }
        let message = Arc::new(Message {
            ack: Mutex::new(Some(ack)),
            remaining: Mutex::new(Countdown {
                left: events.len(),
                retry: false,
            }),
        });
        // Every event gets its ack before any is sent: unsent deliveries dropped on shutdown
        // then count as retries, and the message is redelivered.
        let deliveries: Vec<Delivery> = events
            .into_iter()
            .map(|event| Delivery {
                refusal: None,
                event,
                ack: Ack::new(RecordAck {
                    message: Some(message.clone()),
                }),
            })
            .collect();
        for delivery in deliveries {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                sent = out.send(delivery) => if sent.is_err() { return Ok(false) },
            }
        }
        Ok(true)
    }

    async fn event(&self, object: &ObjectVersion) -> Result<Event, SourceError> {
        let presigned = match self.presign_expiry {
            Some(expiry) => self
                .bucket
                .presign(&object.key, expiry)
                .await
                .map_err(SourceError::Config)?,
            None => None,
        };
        object.event(self.bucket.object_url(&object.key), presigned)
    }
}

fn settle_logged(result: Result<(), SourceError>) {
    if let Err(error) = result {
        tracing::warn!(%error, "cannot settle a notification message with its transport");
    }
}

/// One transport message shared by the events made from it.
struct Message {
    ack: Mutex<Option<Ack>>,
    remaining: Mutex<Countdown>,
}

struct Countdown {
    left: usize,
    retry: bool,
}

impl Message {
    /// Counts one event settled; the last one gets the transport's ack and whether to retry.
    fn count(&self, retry: bool) -> Option<(Ack, bool)> {
        let retry = {
            let mut remaining = self.remaining.lock();
            remaining.retry |= retry;
            remaining.left = remaining.left.saturating_sub(1);
            if remaining.left > 0 {
                return None;
            }
            remaining.retry
        };
        self.ack.lock().take().map(|ack| (ack, retry))
    }
}

async fn settle_message(last: Option<(Ack, bool)>) -> Result<(), SourceError> {
    match last {
        Some((ack, true)) => ack.retry().await,
        Some((ack, false)) => ack.ack().await,
        None => Ok(()),
    }
}

/// Settles one event of a message.
struct RecordAck {
    /// Taken when settled, so `Drop` knows whether it still has to count.
    message: Option<Arc<Message>>,
}

impl RecordAck {
    /// Counts at once, so a settle future dropped unawaited still counts; only the
    /// transport's ack, by the last event, is left to the future.
    fn settle(&mut self, retry: bool) -> BoxFuture<'static, Result<(), SourceError>> {
        let last = self.message.take().and_then(|message| message.count(retry));
        Box::pin(settle_message(last))
    }
}

impl Settle for RecordAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.settle(false)
    }

    fn retry(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.settle(true)
    }

    fn reject(mut self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        // This object is dead-lettered: done, as far as the message is concerned.
        tracing::debug!(%reason, "object from a notification rejected");
        self.settle(false)
    }
}

impl Drop for RecordAck {
    fn drop(&mut self) {
        // Dropped unsettled: count it as a retry so the broker redelivers the message. The
        // transport's ack is async, so the last drop hands it to a task.
        if let Some(last) = self.message.take().and_then(|message| message.count(true))
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { settle_logged(settle_message(Some(last)).await) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(name: &str, key: &str) -> Value {
        json!({
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventTime": "2026-01-01T00:00:00.000Z",
            "eventName": name,
            "s3": {
                "bucket": {"name": "photos"},
                "object": {"key": key, "size": 7, "eTag": "0123abcd"}
            }
        })
    }

    #[test]
    fn created_records_become_objects_and_others_are_ignored() {
        let doc = json!({"Records": [
            record("ObjectCreated:Put", "in/a.jpg"),
            record("ObjectRemoved:Delete", "in/b.jpg"),
            record("s3:ObjectCreated:CompleteMultipartUpload", "in/c.jpg"),
        ]});
        let objects = created_objects(&doc).unwrap();
        let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["in/a.jpg", "in/c.jpg"]);
        assert_eq!(objects[0].etag, "\"0123abcd\"");
        assert_eq!(objects[0].bucket, "photos");
        assert_eq!(objects[0].size, 7);
        assert_eq!(objects[0].last_modified, "2026-01-01T00:00:00.000Z");
    }

    #[test]
    fn keys_are_decoded_plus_first_then_percent() {
        assert_eq!(decode_key("a+b%2Bc%25d").unwrap(), "a b+c%d");
        assert_eq!(
            decode_key("caf%C3%A9/%E6%97%A5.jpg").unwrap(),
            "café/日.jpg"
        );
        assert!(decode_key("%FF").is_err());
    }

    #[test]
    fn a_document_as_text_or_in_an_sns_envelope_is_read() {
        let doc = json!({"Records": [record("ObjectCreated:Put", "k")]});
        assert_eq!(
            created_objects(&Value::String(doc.to_string()))
                .unwrap()
                .len(),
            1
        );
        let sns = json!({"Type": "Notification", "Message": doc.to_string()});
        assert_eq!(created_objects(&sns).unwrap().len(), 1);
        let test_event = json!({"Service": "Amazon S3", "Event": "s3:TestEvent"});
        assert!(created_objects(&test_event).unwrap().is_empty());
    }

    #[test]
    fn malformed_documents_say_what_is_wrong() {
        assert!(
            created_objects(&json!("not json"))
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            created_objects(&json!({"x": 1}))
                .unwrap_err()
                .contains("Records")
        );
        let mut bad = record("ObjectCreated:Put", "k");
        bad["s3"]["object"]["size"] = json!("7");
        let error = created_objects(&json!({"Records": [record("ObjectCreated:Put", "k"), bad]}))
            .unwrap_err();
        assert!(error.starts_with("Records[1]: s3.object.size"), "{error}");
        let mut no_bucket = record("ObjectCreated:Put", "k");
        no_bucket["s3"]["bucket"] = json!({});
        assert!(
            created_objects(&json!({"Records": [no_bucket]}))
                .unwrap_err()
                .contains("s3.bucket.name is missing")
        );
    }

    #[test]
    fn a_notified_object_has_the_id_polling_gives_it() {
        let doc = json!({"Records": [record("ObjectCreated:Put", "in/a+b.jpg")]});
        let object = &created_objects(&doc).unwrap()[0];
        let listed = super::super::object::ObjectId::new("photos", "in/a b.jpg", "\"0123abcd\"");
        assert_eq!(object.id(), listed);
    }

    /// A sink for settlements, to watch what the message's ack receives.
    struct Recorder(Arc<Mutex<Vec<&'static str>>>);

    impl Settle for Recorder {
        fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
            self.0.lock().push("ack");
            Box::pin(async { Ok(()) })
        }
        fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
            self.0.lock().push("retry");
            Box::pin(async { Ok(()) })
        }
        fn reject(self: Box<Self>, _: String) -> BoxFuture<'static, Result<(), SourceError>> {
            self.0.lock().push("reject");
            Box::pin(async { Ok(()) })
        }
    }

    fn message(events: usize) -> (Arc<Message>, Arc<Mutex<Vec<&'static str>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let message = Arc::new(Message {
            ack: Mutex::new(Some(Ack::new(Recorder(log.clone())))),
            remaining: Mutex::new(Countdown {
                left: events,
                retry: false,
            }),
        });
        (message, log)
    }

    fn record_ack(message: &Arc<Message>) -> Ack {
        Ack::new(RecordAck {
            message: Some(message.clone()),
        })
    }

    #[tokio::test]
    async fn a_message_is_acked_when_all_its_events_are() {
        let (message, log) = message(3);
        record_ack(&message).ack().await.unwrap();
        record_ack(&message).reject("bad".into()).await.unwrap();
        assert!(log.lock().is_empty());
        record_ack(&message).ack().await.unwrap();
        assert_eq!(*log.lock(), ["ack"]);
    }

    #[tokio::test]
    async fn a_message_is_retried_when_any_event_is() {
        let (message, log) = message(2);
        record_ack(&message).retry().await.unwrap();
        record_ack(&message).ack().await.unwrap();
        assert_eq!(*log.lock(), ["retry"]);
    }

    #[tokio::test]
    async fn a_dropped_event_retries_its_message() {
        let (message, log) = message(2);
        record_ack(&message).ack().await.unwrap();
        drop(record_ack(&message));
        for _ in 0..100 {
            if !log.lock().is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(*log.lock(), ["retry"]);
    }
}
