//! The model's broker and sinks.
//!
//! The broker behaves like a JetStream durable consumer: a delivery not settled within the
//! ack wait is delivered again while the first is still held, a retried event comes back, a
//! crashed process's unsettled deliveries come back when its connection closes, and
//! producers sometimes publish the same event id twice. The sinks record every record with
//! the process that delivered it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use futures::future::BoxFuture;
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value};
use spate_sinks::{Outcome, Record, Sink, SinkError};
use spate_sources::{Ack, Delivery, Event, Settle, SourceError};
use tokio::sync::mpsc;

use super::Shared;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    Unsettled,
    Acked,
    Rejected,
}

pub struct Message {
    pub id: String,
    pub fields: Map<String, Value>,
    pub state: MessageState,
}

pub struct DeliveryRecord {
    pub message: usize,
    pub incarnation: u32,
    pub at: u64,
    pub settled: bool,
    /// Its ack wait ran out and the message was handed out again.
    pub redelivered: bool,
}

pub struct Broker {
    pub messages: Vec<Message>,
    /// When each message is published, in order.
    schedule: VecDeque<(u64, usize)>,
    ready: VecDeque<usize>,
    pub deliveries: BTreeMap<u64, DeliveryRecord>,
    next_tag: u64,
    pub ack_wait: u64,
    /// How likely a delivery is handed out twice in a row.
    pub duplicate: f64,
    pub notes: Vec<(u64, String)>,
}

/// What the source task does next.
pub enum Next {
    Deliver {
        tag: u64,
        id: String,
        fields: Map<String, Value>,
    },
    WaitUntil(u64),
}

impl Broker {
    pub fn new(messages: Vec<(u64, Message)>, ack_wait: u64, duplicate: f64) -> Self {
        let mut schedule: Vec<(u64, usize)> = messages
            .iter()
            .enumerate()
            .map(|(index, (at, _))| (*at, index))
            .collect();
        schedule.sort();
        Broker {
            messages: messages.into_iter().map(|(_, message)| message).collect(),
            schedule: schedule.into(),
            ready: VecDeque::new(),
            deliveries: BTreeMap::new(),
            next_tag: 0,
            ack_wait,
            duplicate,
            notes: Vec::new(),
        }
    }

    pub fn next(&mut self, incarnation: u32, now: u64, rng: &mut StdRng) -> Next {
        while let Some(&(at, message)) = self.schedule.front() {
            if at > now {
                break;
            }
            self.schedule.pop_front();
            self.ready.push_back(message);
        }
        let mut timer = u64::MAX;
        for delivery in self.deliveries.values_mut() {
            if delivery.settled || delivery.redelivered {
                continue;
            }
            if self.messages[delivery.message].state != MessageState::Unsettled {
                continue;
            }
            let due = delivery.at + self.ack_wait;
            if due <= now {
                delivery.redelivered = true;
                self.ready.push_back(delivery.message);
            } else {
                timer = timer.min(due);
            }
        }
        while let Some(message) = self.ready.pop_front() {
            if self.messages[message].state != MessageState::Unsettled {
                continue;
            }
            if rng.random_bool(self.duplicate) {
                self.ready.push_front(message);
            }
            self.next_tag += 1;
            let tag = self.next_tag;
            self.deliveries.insert(
                tag,
                DeliveryRecord {
                    message,
                    incarnation,
                    at: now,
                    settled: false,
                    redelivered: false,
                },
            );
            let message = &self.messages[message];
            return Next::Deliver {
                tag,
                id: message.id.clone(),
                fields: message.fields.clone(),
            };
        }
        let published = self.schedule.front().map_or(u64::MAX, |(at, _)| *at);
        Next::WaitUntil(published.min(timer))
    }

    /// Hands a message out again (after `retry`).
    pub fn requeue(&mut self, message: usize) {
        if self.messages[message].state == MessageState::Unsettled {
            self.ready.push_back(message);
        }
    }

    /// A process died: its connection closes and what it held comes back.
    pub fn disconnect(&mut self, incarnation: u32) {
        let mut back: Vec<usize> = self
            .deliveries
            .values()
            .filter(|d| d.incarnation == incarnation && !d.settled && !d.redelivered)
            .map(|d| d.message)
            .collect();
        back.sort();
        back.dedup();
        for delivery in self.deliveries.values_mut() {
            if delivery.incarnation == incarnation {
                delivery.redelivered = true;
            }
        }
        for message in back {
            if !self.ready.contains(&message) {
                self.requeue(message);
            }
        }
    }

    pub fn unsettled(&self) -> impl Iterator<Item = &Message> {
        self.messages
            .iter()
            .filter(|m| m.state == MessageState::Unsettled)
    }

    /// Every message is published and nothing is waiting to be handed out.
    pub fn drained(&self) -> bool {
        self.schedule.is_empty() && self.unsettled().next().is_none()
    }
}

/// How the engine settled one delivery.
#[derive(Debug)]
pub enum Settlement {
    Ack,
    Retry,
    Reject(String),
}

/// Feeds one process's intake until the process dies.
pub async fn run_source(shared: Arc<Shared>, incarnation: u32, out: mpsc::Sender<Delivery>) {
    loop {
        let next = shared.world.lock().next_delivery(incarnation);
        match next {
            Next::Deliver { tag, id, fields } => {
                let Ok(event) = Event::new(id, fields) else {
                    return;
                };
                let ack = Ack::new(ModelAck {
                    shared: shared.clone(),
                    tag,
                    incarnation,
                });
                if out
                    .send(Delivery {
                        event,
                        ack,
                        refusal: None,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Next::WaitUntil(at) => {
                let wake = shared.source_wake.notified();
                tokio::select! {
                    _ = tokio::time::sleep_until(shared.instant(at)) => {}
                    _ = wake => {}
                }
            }
        }
    }
}

struct ModelAck {
    shared: Arc<Shared>,
    tag: u64,
    incarnation: u32,
}

impl ModelAck {
    fn settle(self, how: Settlement) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async move {
            let settled = self
                .shared
                .world
                .lock()
                .settle(self.tag, self.incarnation, how);
            if !settled {
                // A dead process settles nothing.
                std::future::pending::<()>().await;
            }
            self.shared.source_wake.notify_one();
            Ok(())
        })
    }
}

impl Settle for ModelAck {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        (*self).settle(Settlement::Ack)
    }

    fn retry(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        (*self).settle(Settlement::Retry)
    }

    fn reject(self: Box<Self>, reason: String) -> BoxFuture<'static, Result<(), SourceError>> {
        (*self).settle(Settlement::Reject(reason))
    }
}

/// One record as a sink received it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub outcome: Outcome,
    pub event: String,
    pub job: Option<String>,
    pub reason: Option<String>,
    /// The Job was already marked reported when this arrived.
    pub after_mark: bool,
    /// The event's pod in that Job had succeeded when this arrived.
    pub ran_in_job: bool,
}

#[derive(Default)]
pub struct SinkLog {
    pub results: Vec<Logged>,
    pub dead_letters: Vec<Logged>,
    /// How likely a delivery fails (the broker behind the sink is away).
    pub failure: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkRole {
    Results,
    DeadLetter,
}

/// An in-memory sink that belongs to one process.
pub struct ModelSink {
    pub shared: Arc<Shared>,
    pub incarnation: u32,
    pub role: SinkRole,
}

impl Sink for ModelSink {
    fn deliver<'a>(&'a self, records: &'a [Record]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let delivered =
                self.shared
                    .world
                    .lock()
                    .sink_delivery(self.incarnation, self.role, records);
            match delivered {
                Some(true) => Ok(()),
                Some(false) => Err(SinkError::Delivery {
                    kind: "model",
                    reason: "the sink's broker is away".to_string(),
                }),
                None => std::future::pending().await,
            }
        })
    }
}

pub fn event_id(event: &Value) -> String {
    event
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}
