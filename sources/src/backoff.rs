//! Exponential backoff with jitter for reconnect loops.
//!
//! Shared by the messaging connectors (AMQP and NATS sources, and the sinks through
//! `spate_sources::backoff`): a broker restart must not turn every Spate replica into a
//! synchronised reconnect storm, so each delay is drawn at random from the upper half of the
//! current exponential step, and the step never exceeds a fixed ceiling.

use std::time::Duration;

/// Delays for successive attempts: `min`, doubling up to `max`, each with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The connectors' default: 100ms, doubling to 10s.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// How many delays were handed out since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt ("equal jitter": half fixed, half random, so the delay
    /// still grows while replicas spread out).
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .min
            .saturating_mul(2u32.saturating_pow(self.attempt.min(31)))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        // fastrand's thread-local generator, which the engine's model test seeds.
        half + Duration::from_nanos(fastrand::u64(0..=jitter_nanos))
    }

    /// Back to the shortest delay after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_with_jitter_and_stay_bounded() {
        let mut backoff = Backoff::reconnect();
        let mut previous_ceiling = Duration::ZERO;
        for attempt in 0..40 {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt))
                .min(Duration::from_secs(10));
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            assert!(step >= previous_ceiling);
            previous_ceiling = step;
        }
        assert!(backoff.next_delay() <= Duration::from_secs(10));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
