//! Provider quotas, as serverless container back-ends (Azure Container Instances, Fargate)
//! impose them on a virtual-kubelet node: a cap on container groups running at once and on
//! how many may start per time window. A refused pod is not retried: virtual-kubelet reports
//! it as `ProviderFailed` and leaves it Pending, which is what Spate must count against its
//! budget.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The quota's bookkeeping: pods running now and recent starts.
#[derive(Debug)]
pub(crate) struct Quota {
    max_running: Option<usize>,
    max_starts: Option<usize>,
    per: Duration,
    running: usize,
    starts: VecDeque<Instant>,
}

impl Quota {
    pub(crate) fn new(
        max_running: Option<usize>,
        max_starts: Option<usize>,
        per: Duration,
    ) -> Self {
        Self {
            max_running,
            max_starts,
            per,
            running: 0,
            starts: VecDeque::new(),
        }
    }

    /// Admits one more pod at `now`, or says why the provider refuses it.
    pub(crate) fn try_start(&mut self, now: Instant) -> Result<(), String> {
        if let Some(max) = self.max_running
            && self.running >= max
        {
            return Err(format!(
                "container group quota exceeded: {} of {max} container groups are running",
                self.running
            ));
        }
        while self
            .starts
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= self.per)
        {
            self.starts.pop_front();
        }
        if let Some(max) = self.max_starts
            && self.starts.len() >= max
        {
            return Err(format!(
                "container group creation rate exceeded: at most {max} creations per {}s",
                self.per.as_secs_f64()
            ));
        }
        self.running += 1;
        self.starts.push_back(now);
        Ok(())
    }

    /// A pod admitted by [`Quota::try_start`] has stopped.
    pub(crate) fn finish(&mut self) {
        self.running = self.running.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_pods_running_at_once_and_frees_a_slot_when_one_finishes() {
        let mut quota = Quota::new(Some(2), None, Duration::from_secs(60));
        let now = Instant::now();
        assert!(quota.try_start(now).is_ok());
        assert!(quota.try_start(now).is_ok());
        assert!(quota.try_start(now).is_err());
        quota.finish();
        assert!(quota.try_start(now).is_ok());
    }

    #[test]
    fn caps_starts_per_window_and_forgets_old_starts() {
        let mut quota = Quota::new(None, Some(2), Duration::from_secs(10));
        let now = Instant::now();
        assert!(quota.try_start(now).is_ok());
        assert!(quota.try_start(now).is_ok());
        let refused = quota.try_start(now + Duration::from_secs(5));
        assert!(refused.is_err_and(|m| m.contains("at most 2 creations per 10s")));
        assert!(quota.try_start(now + Duration::from_secs(10)).is_ok());
    }
}
