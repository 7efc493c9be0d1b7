//! Polling: list the bucket under the prefix every `pollInterval` and emit one event per
//! object version not yet done.
//!
//! A listing is streamed page by page (1,000 keys a page on S3) straight into the engine's
//! bounded channel: when the engine is busy the listing waits, so memory holds one page and
//! the channel whatever the bucket's size. Which objects are done is kept by the
//! [`Ledger`](super::checkpoint::Ledger), whose module documents the delivery guarantee.
//!
//! Every poll lists everything under the prefix (one request per 1,000 keys on S3): fine for
//! tens of thousands of objects every few seconds; for millions, use notifications mode.
//!
//! Folder markers (empty `dir/` objects that consoles create) are skipped when the folder has
//! contents; an empty folder's marker is reported as the empty object `dir`.
//!
//! A listing that fails (the store unreachable, a key `object_store` cannot represent, such as
//! one with an empty segment `a//b`) ends early and is logged; the next poll starts over, so
//! nothing is skipped. Such a key ends every listing where it sorts until it is renamed; the
//! warning names it. Bad credentials, a missing bucket and presigning without credentials
//! stop the source with an error.
//!
//! A local folder is listed as it is: a file still being written is seen with its partial
//! size, then again (new size and mtime, so a new id) once complete. Writers should create
//! files under another name and rename them into place, as `object_store` itself does.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::checkpoint::Ledger;
use super::filter::KeyFilter;
use super::object::{ObjectId, ObjectVersion};
use super::store::Bucket;
use crate::{Ack, Delivery, Settle, Source, SourceError};

pub struct PollSource {
    pub bucket: Bucket,
    pub filter: KeyFilter,
    /// The folder listed: [`KeyFilter::list_root`], parsed.
    pub root: Option<Path>,
    pub ledger: Arc<Ledger>,
    pub interval: Duration,
    pub presign_expiry: Option<Duration>,
}

/// How a listing ended.
enum Listing {
    Complete,
    /// Shutdown, or the engine stopped reading.
    Stopped,
}

impl Source for PollSource {
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let mut ticks = tokio::time::interval(self.interval);
            // A listing longer than the interval is followed by a full interval of rest, not
            // by a burst of catch-up listings.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures = 0u32;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = ticks.tick() => {}
                }
                match self.list_once(&out, &shutdown).await {
                    Ok(Listing::Complete) => failures = 0,
                    Ok(Listing::Stopped) => return Ok(()),
                    Err(ListError::Fatal(error)) => return Err(error),
                    Err(ListError::Transient(reason)) => {
                        failures += 1;
                        tracing::warn!(
                            bucket = %self.bucket.url_base(), failures, %reason,
                            retry_in = ?self.interval,
                            "listing failed; the next poll lists again from the start"
                        );
                    }
                }
            }
        })
    }
}

enum ListError {
    Fatal(SourceError),
    Transient(String),
}

impl PollSource {
    async fn list_once(
        &self,
        out: &mpsc::Sender<Delivery>,
        shutdown: &CancellationToken,
    ) -> Result<Listing, ListError> {
        let mut listing = self.bucket.store().list(self.root.as_ref()).peekable();
        self.ledger.begin_listing();
        let mut emitted = 0u64;
        let ended = loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => break Ok(Listing::Stopped),
                item = listing.next() => item,
            };
            let meta = match item {
                None => break Ok(Listing::Complete),
                Some(Ok(meta)) => meta,
                Some(Err(error)) => break Err(classify(error, self.bucket.url_base())),
            };
            if !self.filter.matches(meta.location.as_ref()) {
                continue;
            }
            // A folder marker (`dir/`, made by consoles' "create folder") is listed as `dir`
            // and sorts right before the folder's contents: it is not an object to process.
            if meta.size == 0 {
                let peek = Pin::new(&mut listing).peek();
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break Ok(Listing::Stopped),
                    next = peek => next,
                };
                if let Some(Ok(next)) = next
                    && next
                        .location
                        .as_ref()
                        .strip_prefix(meta.location.as_ref())
                        .is_some_and(|rest| rest.starts_with('/'))
                {
                    continue;
                }
            }
            let object = ObjectVersion::listed(self.bucket.name(), &meta);
            let id = object.id();
            if !self.ledger.claim(id) {
                continue;
            }
            // From here the claim is released if the delivery is dropped unsent.
            let ack = ObjectAck::new(self.ledger.clone(), id);
            let event = match self.event(&object).await {
                Ok(event) => event,
                Err(error) => break Err(ListError::Fatal(error)),
            };
            let delivery = Delivery {
                refusal: None,
                event,
                ack: Ack::new(ack),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(Listing::Stopped),
                sent = out.send(delivery) => {
                    if sent.is_err() {
                        break Ok(Listing::Stopped);
                    }
                    emitted += 1;
                }
            }
        };
        let complete = matches!(ended, Ok(Listing::Complete));
        if complete {
            tracing::debug!(bucket = %self.bucket.url_base(), emitted, "listing complete");
        }
        self.ledger
            .end_listing(complete)
            .await
            .map_err(|e| ListError::Transient(e.to_string()))?;
        ended
    }

    async fn event(&self, object: &ObjectVersion) -> Result<crate::Event, SourceError> {
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

/// Store error codes (S3, and Azure's for containers) that mean the bucket cannot be listed
/// with this configuration, however long one waits.
const FATAL_CODES: [&str; 6] = [
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ContainerNotFound",
    "AuthenticationFailed",
];

fn classify(error: object_store::Error, bucket: &str) -> ListError {
    let fatal = |error: &object_store::Error| {
        ListError::Fatal(SourceError::Connect {
            address: bucket.to_string(),
            reason: error.to_string(),
        })
    };
    match error {
        object_store::Error::InvalidPath { source } => ListError::Transient(format!(
            "a key cannot be read ({source}); rename or delete it: keys listed after it are \
             not seen until then"
        )),
        object_store::Error::Unauthenticated { .. }
        | object_store::Error::PermissionDenied { .. }
        | object_store::Error::NotFound { .. } => fatal(&error),
        // Listing failures arrive as `Generic` with the store's answer inside; its error code
        // is the stable part.
        other => {
            let text = other.to_string();
            if FATAL_CODES.iter().any(|code| text.contains(code)) {
                fatal(&other)
            } else {
                ListError::Transient(text)
            }
        }
    }
}

/// Settles one listed object with the ledger.
struct ObjectAck {
    ledger: Arc<Ledger>,
    id: ObjectId,
    settled: bool,
}

impl ObjectAck {
    fn new(ledger: Arc<Ledger>, id: ObjectId) -> Self {
        ObjectAck {
            ledger,
            id,
            settled: false,
        }
    }
}

// The ledger is updated before the returned future is first polled, so a future that is
// dropped unawaited still leaves the object done (or released), never stuck in flight.
impl Settle for ObjectAck {
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.settled = true;
        self.ledger.mark_done(self.id);
        Box::pin(async move { self.ledger.commit().await })
    }

    fn retry(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.settled = true;
        self.ledger.release(self.id);
        Box::pin(async { Ok(()) })
    }

    fn reject(mut self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        self.settled = true;
        tracing::debug!(object = %self.id, %reason, "object rejected; recorded as done");
        self.ledger.mark_done(self.id);
        Box::pin(async move { self.ledger.commit().await })
    }
}

impl Drop for ObjectAck {
    fn drop(&mut self) {
        // Dropped unsettled (shutdown, the engine gone): the next listing offers it again.
        if !self.settled {
            self.ledger.release(self.id);
        }
    }
}
