//! How much a source still holds for its pipeline, where the protocol can tell: Kafka's
//! consumer-group lag, a Redis stream group's unread and pending entries.
//!
//! The source writes it as it learns it; the engine reads it into the pipeline's status, where
//! `spate watch` shows it. Sources whose broker cannot tell (AMQP's queue depth is not per
//! consumer, MQTT has none) leave it unknown rather than guess.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A shared, lock-free reading of the source's backlog; cloning shares it.
#[derive(Clone, Debug)]
pub struct Backlog(Arc<AtomicI64>);

const UNKNOWN: i64 = -1;

impl Default for Backlog {
    fn default() -> Self {
        Backlog(Arc::new(AtomicI64::new(UNKNOWN)))
    }
}

impl Backlog {
    /// Messages at the source not yet done: not delivered yet, or delivered and not yet
    /// acknowledged.
    pub fn set(&self, messages: u64) {
        self.0.store(
            i64::try_from(messages).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The connection is gone: the last reading would be stale.
    pub fn forget(&self) {
        self.0.store(UNKNOWN, Ordering::Relaxed);
    }

    /// The latest reading, `None` before the first or after [`Backlog::forget`].
    pub fn get(&self) -> Option<u64> {
        u64::try_from(self.0.load(Ordering::Relaxed)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_set_and_after_forget() {
        let backlog = Backlog::default();
        let reader = backlog.clone();
        assert_eq!(reader.get(), None);
        backlog.set(42);
        assert_eq!(reader.get(), Some(42));
        backlog.forget();
        assert_eq!(reader.get(), None);
        backlog.set(u64::MAX);
        assert_eq!(reader.get(), Some(i64::MAX as u64));
    }
}
