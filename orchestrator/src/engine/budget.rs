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
use std::sync::atomic::{AtomicU64, Ordering};

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

/// A budget and the ones drawing from it (the namespace's cap and its pipelines) share one
/// lock, so a reservation checks and takes room on every level at once: two pipelines
/// reserving together cannot both take the namespace's last pod.
#[derive(Debug, Default)]
struct Tree {
    nodes: Mutex<HashMap<u64, Node>>,
    /// Any release in the tree may make room for any waiting reservation in it.
    freed: Notify,
}

#[derive(Debug)]
struct Node {
    limit: u32,
    parent: Option<u64>,
    /// Pods per Job of this budget itself.
    jobs: HashMap<String, u32>,
    /// Its own Jobs' pods plus every child budget's total.
    total: u32,
}

/// Identifies budgets for good: a pointer could be handed to a later budget once this one is
/// gone.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Adds `added` and removes `removed` from the totals of `from` and of every budget above it.
fn shift(nodes: &mut HashMap<u64, Node>, from: Option<u64>, removed: u32, added: u32) {
    let mut next = from;
    while let Some(id) = next {
        let Some(node) = nodes.get_mut(&id) else {
            return;
        };
        node.total = node.total.saturating_sub(removed).saturating_add(added);
        next = node.parent;
    }
}

/// Pods `id` may still take: the least room left on its way up. None at all once it (or a
/// budget above it) is closed.
fn room(nodes: &HashMap<u64, Node>, id: u64) -> u32 {
    let mut free = u32::MAX;
    let mut next = Some(id);
    while let Some(id) = next {
        let Some(node) = nodes.get(&id) else {
            return 0;
        };
        free = free.min(node.limit.saturating_sub(node.total));
        next = node.parent;
    }
    free
}

/// Sets `job`'s pods in budget `id`; true when that made room.
fn set(nodes: &mut HashMap<u64, Node>, id: u64, job: &str, pods: u32) -> bool {
    let Some(node) = nodes.get_mut(&id) else {
        return false;
    };
    let previous = if pods == 0 {
        node.jobs.remove(job)
    } else {
        node.jobs.insert(job.to_string(), pods)
    }
    .unwrap_or(0);
    shift(nodes, Some(id), previous, pods);
    pods < previous
}

/// A pod budget shared by the intake (which reserves before creating a Job) and the tracker
/// (which reports what the Job watch sees). Cloning shares it. Closing it, or dropping its last
/// clone, gives its pods back to the budget it draws from.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    tree: Arc<Tree>,
    id: u64,
    limit: u32,
    /// Keeps the namespace's budget alive while this one draws from it.
    _parent: Option<Budget>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        close(&self.tree, self.id);
    }
}

fn close(tree: &Tree, id: u64) {
    let freed = {
        let mut nodes = tree.nodes.lock();
        match nodes.remove(&id) {
            Some(node) => {
                shift(&mut nodes, node.parent, node.total, 0);
                node.total > 0
            }
            None => false,
        }
    };
    if freed {
        tree.freed.notify_waiters();
    }
}

impl Budget {
    pub fn new(limit: u32) -> Self {
        Self::with_parent(limit, None)
    }

    /// A budget that also counts against `parent` (the namespace's cap across pipelines).
    pub fn with_parent(limit: u32, parent: Option<Budget>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let tree = parent
            .as_ref()
            .map_or_else(Arc::default, |parent| parent.inner.tree.clone());
        tree.nodes.lock().insert(
            id,
            Node {
                limit,
                parent: parent.as_ref().map(|parent| parent.inner.id),
                jobs: HashMap::new(),
                total: 0,
            },
        );
        Budget {
            inner: Arc::new(Handle {
                tree,
                id,
                limit,
                _parent: parent,
            }),
        }
    }

    pub fn limit(&self) -> u32 {
        self.inner.limit
    }

    /// Pods counted now (for a namespace budget, those of every pipeline drawing from it).
    pub fn in_use(&self) -> u32 {
        self.inner
            .tree
            .nodes
            .lock()
            .get(&self.inner.id)
            .map_or(0, |node| node.total)
    }

    /// Waits until at least one pod fits, then reserves up to `wanted` pods for `job` and
    /// returns how many were reserved (at least 1). An indexed Job is created with that
    /// parallelism, so it starts with what is free instead of waiting for the whole budget.
    /// A closed budget has no room: its reservations wait for good. Reserving again for a
    /// Job already counted (a redelivery of its events) replaces its count instead of adding
    /// to it: one Job's pods cannot wait for themselves.
    pub async fn reserve(&self, job: &str, wanted: u32) -> u32 {
        let tree = &self.inner.tree;
        loop {
            // Created before looking, so a release between the look and the wait still wakes
            // us: `notify_waiters` reaches every `Notified` that exists, polled or not.
            let freed = tree.freed.notified();
            {
                let mut nodes = tree.nodes.lock();
                let own = nodes
                    .get(&self.inner.id)
                    .and_then(|node| node.jobs.get(job))
                    .copied()
                    .unwrap_or(0);
                let granted = room(&nodes, self.inner.id)
                    .saturating_add(own)
                    .min(wanted.max(1));
                if granted > 0 {
                    set(&mut nodes, self.inner.id, job, granted);
                    return granted;
                }
            }
            freed.await;
        }
    }

    /// Raises `job`'s count towards `wanted` pods with what is free now, without waiting:
    /// the new count, or `None` when nothing more was free.
    pub fn grow(&self, job: &str, wanted: u32) -> Option<u32> {
        let mut nodes = self.inner.tree.nodes.lock();
        let own = nodes
            .get(&self.inner.id)
            .and_then(|node| node.jobs.get(job))
            .copied()
            .unwrap_or(0);
        let granted = room(&nodes, self.inner.id).saturating_add(own).min(wanted);
        if granted <= own {
            return None;
        }
        set(&mut nodes, self.inner.id, job, granted);
        Some(granted)
    }

    /// Resolves at the next release anywhere in this budget's tree (created before looking
    /// at the room, it still sees a release that happens in between).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.tree.freed.notified()
    }

    /// Records what the Job watch saw for `job`.
    pub fn observe(&self, job: &str, usage: JobUsage) {
        self.set(job, usage.pods());
    }

    /// Forgets `job` (deleted, or its creation failed).
    pub fn release(&self, job: &str) {
        self.set(job, 0);
    }

    /// Gives every pod back to the budget above, for good: the pipeline stopped.
    pub fn close(&self) {
        close(&self.inner.tree, self.inner.id);
    }

    /// The pods counted per Job.
    #[cfg(test)]
    pub fn jobs(&self) -> HashMap<String, u32> {
        self.inner
            .tree
            .nodes
            .lock()
            .get(&self.inner.id)
            .map(|node| node.jobs.clone())
            .unwrap_or_default()
    }

    fn set(&self, job: &str, pods: u32) {
        let tree = &self.inner.tree;
        let freed = set(&mut tree.nodes.lock(), self.inner.id, job, pods);
        if freed {
            tree.freed.notify_waiters();
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

    #[tokio::test(start_paused = true)]
    async fn a_job_reserved_again_does_not_wait_for_itself() {
        let budget = Budget::with_parent(2, Some(Budget::new(1)));
        assert_eq!(budget.reserve("a", 1).await, 1);
        // The same Job again (its events redelivered after a create whose answer was lost).
        let again = tokio::time::timeout(Duration::from_secs(60), budget.reserve("a", 1)).await;
        assert_eq!(again, Ok(1));
        assert_eq!(budget.in_use(), 1);
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

    #[tokio::test]
    async fn a_stopped_pipeline_gives_its_pods_back_to_the_namespace() {
        let namespace = Budget::new(4);
        let dropped = Budget::with_parent(3, Some(namespace.clone()));
        assert_eq!(dropped.reserve("a", 3).await, 3);
        drop(dropped);
        assert_eq!(namespace.in_use(), 0, "a dropped budget holds nothing");

        let closed = Budget::with_parent(4, Some(namespace.clone()));
        let status_copy = closed.clone();
        assert_eq!(closed.reserve("a", 4).await, 4);
        let waiting = {
            let next = Budget::with_parent(4, Some(namespace.clone()));
            tokio::spawn(async move { next.reserve("b", 4).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        closed.close();
        assert_eq!(
            namespace.in_use(),
            0,
            "closed, though a copy (the status) is still around"
        );
        assert_eq!(
            waiting.await.unwrap(),
            4,
            "the namespace's whole cap is back for the pipeline that restarted"
        );
        // What the stopped pipeline's tasks still report does not count any more.
        status_copy.observe("late", running(1, 1, 0));
        assert_eq!(namespace.in_use(), 0);
    }
}
