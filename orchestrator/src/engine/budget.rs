//! The parallelism budget: how many pods a pipeline (and a namespace) may have at once.
//!
//! The budget counts what is really in the cluster, not what Spate thinks it started: every
//! Job that has not finished counts for the pods it may still run, `min(parallelism,
//! completions - succeeded)`, whether they are Running or sitting Pending because the virtual
//! node's provider refused them. Counting Pending work is what KEDA ScaledJob gets wrong
//! (it keeps creating Jobs while earlier ones wait), and what keeps a burst inside a
//! provider's quota here. Jobs created but not yet seen by the Job watch count at their
//! parallelism until the watch reports them.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Pods one Job may still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobUsage {
    pub parallelism: u32,
    pub completions: u32,
    pub succeeded: u32,
    pub finished: bool,
}

impl JobUsage {
    pub fn pods(&self) -> u32 {
        if self.finished {
            0
        } else {
            self.parallelism
                .min(self.completions.saturating_sub(self.succeeded))
        }
    }
}

#[derive(Debug, Default)]
struct Usage {
    jobs: HashMap<String, u32>,
    total: u32,
}

impl Usage {
    fn set(&mut self, job: &str, pods: u32) {
        let previous = if pods == 0 {
            self.jobs.remove(job)
        } else {
            self.jobs.insert(job.to_string(), pods)
        };
        self.total = self.total - previous.unwrap_or(0) + pods;
    }
}

/// A pod budget shared by the intake (which reserves before creating a Job) and the tracker
/// (which reports what the Job watch sees). Cloning shares it.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    limit: u32,
    usage: Mutex<Usage>,
    freed: Notify,
    /// A namespace-wide budget this one also draws from.
    parent: Option<Budget>,
}

impl Budget {
    pub fn new(limit: u32) -> Self {
        Self::with_parent(limit, None)
    }

    /// A budget that also counts against `parent` (the namespace's cap across pipelines).
    pub fn with_parent(limit: u32, parent: Option<Budget>) -> Self {
        Budget {
            inner: Arc::new(BudgetInner {
                limit,
                usage: Mutex::new(Usage::default()),
                freed: Notify::new(),
                parent,
            }),
        }
    }

    pub fn limit(&self) -> u32 {
        self.inner.limit
    }

    /// Pods counted now.
    pub fn in_use(&self) -> u32 {
        self.inner.usage.lock().total
    }

    fn free(&self) -> u32 {
        let own = self.inner.limit.saturating_sub(self.in_use());
        match &self.inner.parent {
            Some(parent) => own.min(parent.free()),
            None => own,
        }
    }

    /// Waits until at least one pod fits, then reserves up to `wanted` pods for `job` and
    /// returns how many were reserved (at least 1). An indexed Job is created with that
    /// parallelism, so it starts with what is free instead of waiting for the whole budget.
    pub async fn reserve(&self, job: &str, wanted: u32) -> u32 {
        loop {
            // Created before looking, so a release between the look and the wait still wakes
            // us: `notify_waiters` reaches every `Notified` that exists, polled or not.
            let own = self.inner.freed.notified();
            let parent = self
                .inner
                .parent
                .as_ref()
                .map(|parent| parent.inner.freed.notified());
            let granted = self.free().min(wanted.max(1));
            if granted > 0 {
                self.set(job, granted);
                return granted;
            }
            match parent {
                // Either budget freeing pods may make room.
                Some(parent) => {
                    tokio::select! {
                        _ = own => {}
                        _ = parent => {}
                    }
                }
                None => own.await,
            }
        }
    }

    /// Records what the Job watch saw for `job`.
    pub fn observe(&self, job: &str, usage: JobUsage) {
        self.set(job, usage.pods());
    }

    /// Forgets `job` (deleted, or its creation failed).
    pub fn release(&self, job: &str) {
        self.set(job, 0);
    }

    fn set(&self, job: &str, pods: u32) {
        let freed = {
            let mut usage = self.inner.usage.lock();
            let before = usage.total;
            usage.set(job, pods);
            usage.total < before
        };
        if let Some(parent) = &self.inner.parent {
            parent.set(&format!("{:p}/{job}", Arc::as_ptr(&self.inner)), pods);
        }
        if freed {
            self.inner.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn running(parallelism: u32, completions: u32, succeeded: u32) -> JobUsage {
        JobUsage {
            parallelism,
            completions,
            succeeded,
            finished: false,
        }
    }

    #[test]
    fn a_job_counts_for_the_pods_it_may_still_run() {
        assert_eq!(running(10, 20, 0).pods(), 10);
        assert_eq!(running(10, 20, 15).pods(), 5);
        assert_eq!(
            JobUsage {
                finished: true,
                ..running(10, 20, 0)
            }
            .pods(),
            0
        );
    }

    #[tokio::test]
    async fn reservations_wait_for_pods_to_finish() {
        let budget = Budget::new(3);
        assert_eq!(budget.reserve("a", 2).await, 2);
        assert_eq!(budget.reserve("b", 5).await, 1, "only what is free");
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve("c", 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no room while a and b run");
        // a's pods are still Pending: they count. Only finishing frees them.
        budget.observe("a", running(2, 2, 0));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        budget.observe("a", running(2, 2, 2));
        assert_eq!(waiting.await.unwrap(), 1);
        assert_eq!(budget.in_use(), 2);
    }

    #[tokio::test]
    async fn a_namespace_budget_caps_pipelines_together() {
        let namespace = Budget::new(4);
        let first = Budget::with_parent(3, Some(namespace.clone()));
        let second = Budget::with_parent(3, Some(namespace.clone()));
        assert_eq!(first.reserve("a", 3).await, 3);
        assert_eq!(
            second.reserve("b", 3).await,
            1,
            "the namespace has one pod left"
        );
        assert_eq!(namespace.in_use(), 4);
        let waiting = {
            let second = second.clone();
            tokio::spawn(async move { second.reserve("c", 1).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished());
        first.release("a");
        assert_eq!(waiting.await.unwrap(), 1);
    }
}
