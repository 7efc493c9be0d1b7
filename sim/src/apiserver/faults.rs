//! Fault injection: the misbehaviour of a loaded or flaky control plane, on demand.
//!
//! Tests and benchmarks switch faults at start (CLI flags, [`Faults`]) or at run time
//! ([`FaultsHandle`], `PUT /sim/faults`) to prove that clients survive throttling, server
//! errors, slow responses, dropped watches and expired resourceVersions.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Which faults are active. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    /// Fixed latency added to every API request, in milliseconds.
    pub latency_ms: u64,
    /// Extra random latency, uniformly up to this many milliseconds.
    pub jitter_ms: u64,
    /// Fraction (0..=1) of requests answered `429 TooManyRequests`.
    pub throttle_rate: f64,
    /// `Retry-After` seconds sent with 429s.
    pub retry_after_seconds: u64,
    /// Fraction (0..=1) of requests answered 500 or 503 (alternating at random).
    pub error_rate: f64,
    /// End every watch this many seconds after it started.
    pub drop_watches_after_seconds: Option<u64>,
    /// Answer the next watch that resumes from a resourceVersion with `410 Expired`.
    pub expire_next_watch: bool,
}

impl Faults {
    /// Rejects rates outside `0..=1`.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("throttleRate", self.throttle_rate),
            ("errorRate", self.error_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }
}

/// Shared, switchable fault settings.
#[derive(Debug, Clone, Default)]
pub struct FaultsHandle(Arc<RwLock<Faults>>);

impl FaultsHandle {
    /// A handle starting with `faults`.
    pub fn new(faults: Faults) -> Self {
        Self(Arc::new(RwLock::new(faults)))
    }

    /// The current settings.
    pub fn get(&self) -> Faults {
        self.0.read().clone()
    }

    /// Replaces the settings.
    pub fn set(&self, faults: Faults) {
        *self.0.write() = faults;
    }

    /// Arms a one-shot `410 Expired` for the next resuming watch.
    pub fn expire_next_watch(&self) {
        self.0.write().expire_next_watch = true;
    }

    /// Consumes the one-shot expiry, returning whether it was armed.
    pub fn take_watch_expiry(&self) -> bool {
        let mut faults = self.0.write();
        std::mem::take(&mut faults.expire_next_watch)
    }

    /// How long to delay this request.
    pub fn delay(&self) -> Duration {
        let faults = self.0.read();
        let jitter = if faults.jitter_ms > 0 {
            rand::rng().random_range(0..=faults.jitter_ms)
        } else {
            0
        };
        Duration::from_millis(faults.latency_ms + jitter)
    }

    /// The injected failure for this request, if any.
    pub fn injected_error(&self) -> Option<ApiError> {
        let faults = self.0.read();
        let mut rng = rand::rng();
        if faults.throttle_rate > 0.0 && rng.random_bool(faults.throttle_rate.clamp(0.0, 1.0)) {
            let mut err = ApiError::new(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
            );
            err.details.retry_after = Some(faults.retry_after_seconds);
            return Some(err);
        }
        if faults.error_rate > 0.0 && rng.random_bool(faults.error_rate.clamp(0.0, 1.0)) {
            return Some(if rng.random_bool(0.5) {
                ApiError::internal(
                    "an error on the server (\"injected fault\") has prevented the request from succeeding",
                )
            } else {
                let mut err = ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                );
                err.details.retry_after = Some(1);
                err
            });
        }
        None
    }

    /// How long watches may live.
    pub fn watch_lifetime(&self) -> Option<Duration> {
        self.0
            .read()
            .drop_watches_after_seconds
            .map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certain_throttling_always_answers_429_with_retry_after() {
        let handle = FaultsHandle::new(Faults {
            throttle_rate: 1.0,
            retry_after_seconds: 2,
            ..Faults::default()
        });
        let err = handle.injected_error().unwrap();
        assert_eq!((err.code, err.details.retry_after), (429, Some(2)));
        handle.set(Faults::default());
        assert!(handle.injected_error().is_none());
    }

    #[test]
    fn watch_expiry_fires_once() {
        let handle = FaultsHandle::default();
        handle.expire_next_watch();
        assert!(handle.take_watch_expiry());
        assert!(!handle.take_watch_expiry());
        assert!(
            Faults {
                error_rate: 2.0,
                ..Faults::default()
            }
            .validate()
            .is_err()
        );
    }
}
