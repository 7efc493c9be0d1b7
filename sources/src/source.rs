//! The runtime contract between a source and the engine.
//!
//! A source pushes [`Delivery`]s into a bounded channel. The channel is the backpressure: when
//! the engine's parallelism budget is full it stops reading, the channel fills, the source
//! stops pulling, and the broker keeps the rest (AMQP prefetch, JetStream pull batches).
//! Each delivery carries an [`Ack`] that the engine settles exactly once, and only after the
//! event's Job exists: "acknowledged" always means "its Job is in the cluster".

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Event;
use crate::checkpoint::CheckpointStore;
use crate::secret::SecretResolver;

/// An event and the means to settle it with its source.
pub struct Delivery {
    pub event: Event,
    pub ack: Ack,
    /// Why no Job may be made of this delivery, when the source knows it cannot be run: a
    /// transport message that is not what the source reads (an S3 notification that is not
    /// one), or a message delivered more times than the source allows. The engine sends it
    /// to the dead-letter sink with this reason and rejects it, unless its event already has
    /// a Job (then it is acknowledged); the `event` is what the broker delivered.
    pub refusal: Option<String>,
}

/// How a source settles one event. Exactly one method is called, once.
pub trait Settle: Send {
    /// The event's Job exists: the source may forget the event (AMQP `basic.ack`, JetStream
    /// ack, checkpoint advance).
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>>;
    /// The event could not be handled now: deliver it again later (AMQP nack with requeue,
    /// JetStream nak).
    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>>;
    /// The event can never be handled (the engine has already dead-lettered it with
    /// `reason`): never deliver it again (AMQP reject without requeue, JetStream term).
    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// The settlement handle of one delivery.
pub struct Ack(Box<dyn Settle>);

impl Ack {
    pub fn new(settle: impl Settle + 'static) -> Self {
        Ack(Box::new(settle))
    }

    /// For sources with nothing to settle (core NATS subscriptions are at-most-once).
    pub fn none() -> Self {
        Ack(Box::new(NothingToSettle))
    }

    pub async fn ack(self) -> Result<(), SourceError> {
        self.0.ack().await
    }

    pub async fn retry(self) -> Result<(), SourceError> {
        self.0.retry().await
    }

    pub async fn reject(self, reason: String) -> Result<(), SourceError> {
        self.0.reject(reason).await
    }
}

struct NothingToSettle;

impl Settle for NothingToSettle {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }

    fn reject(self: Box<Self>, _reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A running source.
pub trait Source: Send {
    /// Sends deliveries into `out` until `shutdown` is cancelled, reconnecting on its own
    /// after broker failures. Returns an error only for failures retrying cannot fix (bad
    /// credentials, a queue that does not exist).
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<Delivery>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}

/// What a source gets from the process that runs it.
#[derive(Clone)]
pub struct SourceContext {
    /// `namespace/name` of the pipeline, for names (consumer tags, checkpoint keys) and logs.
    pub pipeline: String,
    pub secrets: Arc<dyn SecretResolver>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// Where sources may keep local files (e.g. object-store listings in progress).
    pub state_dir: PathBuf,
    /// The process's shared webhook server, where webhook sources register their path.
    pub webhooks: Option<crate::webhook::WebhookServer>,
    /// Where the source reports its backlog (consumer-group lag, pending entries) if its
    /// protocol tells it.
    pub backlog: crate::backlog::Backlog,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{kind} source: {reason}")]
    Broker { kind: &'static str, reason: String },
}
