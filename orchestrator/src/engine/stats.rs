//! Counts of one pipeline, for its status.

use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;

#[derive(Debug, Default)]
pub struct PipelineStats {
    received: AtomicI64,
    succeeded: AtomicI64,
    failed: AtomicI64,
    dead_lettered: AtomicI64,
    last_error: Mutex<Option<String>>,
}

/// A consistent-enough copy of the counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub dead_lettered: i64,
    pub last_error: Option<String>,
}

impl PipelineStats {
    pub fn received(&self, events: usize) {
        self.received.fetch_add(events as i64, Ordering::Relaxed);
    }

    pub fn finished(&self, succeeded: bool) {
        let counter = if succeeded {
            &self.succeeded
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dead_lettered(&self, events: usize, reason: &str) {
        self.dead_lettered
            .fetch_add(events as i64, Ordering::Relaxed);
        self.error(reason);
    }

    pub fn error(&self, reason: &str) {
        *self.last_error.lock() = Some(reason.to_string());
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}
