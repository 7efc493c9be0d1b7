//! Gives indexed Jobs back the parallelism the budget could not grant when they were created.
//!
//! The intake creates an indexed Job with the pods free at that moment (at least one), and
//! records what it wanted in [`WANTED_PARALLELISM_ANNOTATION`]. Whenever pods come free in the
//! budget (a Job finishes or is deleted, another pipeline of the namespace gives pods back),
//! and at least every [`RECHECK`], each such Job that has not finished takes what is free,
//! up to what it wanted, and its `spec.parallelism` is patched to match; the Job controller
//! starts the extra pods.
//!
//! The budget is raised before the patch, under the same lock the tracker takes to count what
//! the watch shows: until the watch shows the raised parallelism, an older version of the Job
//! (still on its way through the watch) counts at the raised value, so the room cannot be
//! handed out twice. A patch that fails may still have been stored (its answer lost), so the
//! room stays taken and the patch is sent again on the next pass, until the watch shows it or
//! the Job ends.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams};
use parking_lot::Mutex;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, JobUsage};
use super::emit;
use super::tracker::usage;
use crate::render::WANTED_PARALLELISM_ANNOTATION;

/// How often narrowed Jobs look for room even when no release was seen (a release in a
/// budget above this one wakes the pass too, but a missed wake-up must not cost for good).
const RECHECK: Duration = Duration::from_secs(5);

pub struct Widening {
    client: kube::Client,
    namespace: String,
    pipeline: String,
    budget: Budget,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Running Jobs with less parallelism than they want: the last version the watch showed.
    narrowed: HashMap<String, Job>,
    /// Parallelism patched (or being patched) but not yet shown by the watch.
    raised: HashMap<String, u32>,
    /// Of those, the ones whose patch failed: sent again on the next pass.
    unsent: HashSet<String>,
}

impl Widening {
    pub fn new(client: kube::Client, namespace: String, pipeline: String, budget: Budget) -> Self {
        Widening {
            client,
            namespace,
            pipeline,
            budget,
            state: Mutex::default(),
        }
    }

    /// Counts what the watch shows of `job` in the budget (an incomplete Job counts nothing:
    /// the intake's reservation holds its pods), and notes whether it could use more pods.
    pub fn observe(&self, job: &Job) {
        if emit::is_incomplete(job) {
            return;
        }
        let name = job.metadata.name.clone().unwrap_or_default();
        let mut usage = usage(job);
        let mut state = self.state.lock();
        if let Some(&raised) = state.raised.get(&name) {
            if usage.parallelism >= raised || usage.finished {
                state.raised.remove(&name);
                state.unsent.remove(&name);
            } else {
                usage.parallelism = raised;
            }
        }
        if wants_more(job, &usage) || state.unsent.contains(&name) {
            state.narrowed.insert(name.clone(), job.clone());
        } else {
            state.narrowed.remove(&name);
        }
        self.budget.observe(&name, usage);
    }

    /// The Job is gone.
    pub fn forget(&self, name: &str) {
        let mut state = self.state.lock();
        state.narrowed.remove(name);
        state.raised.remove(name);
        state.unsent.remove(name);
        self.budget.release(name);
    }

    /// Widens narrowed Jobs whenever pods come free, until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            let freed = self.budget.freed();
            self.widen_all().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = freed => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    async fn widen_all(&self) {
        let names: Vec<String> = self.state.lock().narrowed.keys().cloned().collect();
        for name in names {
            self.widen(&name).await;
        }
    }

    /// Takes what is free for `name`, up to what it wants, and patches its parallelism (or
    /// sends again a patch that failed).
    async fn widen(&self, name: &str) {
        let Some(parallelism) = self.take_room(name) else {
            return;
        };
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.namespace);
        let patch = json!({"spec": {"parallelism": parallelism}});
        match jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            // The watch brings the patched Job, after any older version still on its way:
            // counting the answer here would let an older version lower the count again.
            Ok(_) => {
                tracing::debug!(pipeline = %self.pipeline, job = %name, parallelism, "raised an indexed Job's parallelism");
            }
            Err(error) => {
                tracing::debug!(pipeline = %self.pipeline, job = %name, %error, "cannot raise an indexed Job's parallelism yet; trying again");
                let mut state = self.state.lock();
                if state.raised.get(name) == Some(&parallelism) {
                    state.unsent.insert(name.to_string());
                }
            }
        }
    }

    /// The parallelism to patch `name` to: a failed patch's again, or what the free room
    /// allows now (taken in the budget); `None` when there is nothing to do.
    fn take_room(&self, name: &str) -> Option<u32> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let job = state.narrowed.get(name)?;
        if let Some(&raised) = state.raised.get(name)
            && state.unsent.remove(name)
        {
            return Some(raised);
        }
        let usage = usage(job);
        let wanted = wanted_parallelism(job)?;
        let remaining = usage.completions.saturating_sub(usage.succeeded);
        let granted = self.budget.grow(name, wanted.min(remaining))?;
        // All the pods it can still run are covered: the rest of what it wanted too.
        let parallelism = if granted >= remaining {
            wanted
        } else {
            granted
        };
        state.raised.insert(name.to_string(), parallelism);
        Some(parallelism)
    }
}

fn wanted_parallelism(job: &Job) -> Option<u32> {
    job.metadata
        .annotations
        .as_ref()?
        .get(WANTED_PARALLELISM_ANNOTATION)?
        .parse()
        .ok()
}

/// A running indexed Job whose pods still to run exceed its parallelism, below what it wants.
fn wants_more(job: &Job, usage: &JobUsage) -> bool {
    let suspended = job
        .spec
        .as_ref()
        .and_then(|spec| spec.suspend)
        .unwrap_or(false);
    !usage.finished
        && !suspended
        && wanted_parallelism(job).is_some_and(|wanted| {
            let remaining = usage.completions.saturating_sub(usage.succeeded);
            usage.parallelism < wanted.min(remaining)
        })
}
