//! Which events already have a Job, so a redelivered event is acknowledged instead of run
//! again, even when redelivery groups events into different batches (indexed mode names a
//! Job after its whole batch, so a regrouped batch would get a new name and a second Job).
//!
//! The index is rebuilt from the cluster: the tracker's Job watch lists every Job of the
//! pipeline (their `spate.dev/event-ids` annotation) before the intake takes its first event,
//! and the intake adds each Job it creates at once. It covers Jobs that still exist, so the
//! guarantee holds for as long as `ttlSecondsAfterFinished` keeps finished Jobs around.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use parking_lot::Mutex;

use crate::render::EVENT_IDS_ANNOTATION;

#[derive(Debug, Clone, Default)]
pub struct EventIndex {
    inner: Arc<Mutex<Index>>,
}

#[derive(Debug, Default)]
struct Index {
    job_of: HashMap<String, String>,
    events_of: HashMap<String, Vec<String>>,
}

impl EventIndex {
    /// Records that `job` carries `events`.
    pub fn insert(&self, job: &str, events: impl IntoIterator<Item = String>) {
        let mut index = self.inner.lock();
        if index.events_of.contains_key(job) {
            return;
        }
        let events: Vec<String> = events.into_iter().collect();
        for event in &events {
            index.job_of.insert(event.clone(), job.to_string());
        }
        index.events_of.insert(job.to_string(), events);
    }

    /// Records a Job seen by the watch.
    pub fn insert_job(&self, job: &Job) {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        if self.inner.lock().events_of.contains_key(name) {
            return;
        }
        let ids: Vec<String> = job
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(EVENT_IDS_ANNOTATION))
            .and_then(|ids| serde_json::from_str(ids).ok())
            .unwrap_or_default();
        self.insert(name, ids);
    }

    /// Forgets a deleted Job.
    pub fn remove_job(&self, job: &str) {
        let mut index = self.inner.lock();
        if let Some(events) = index.events_of.remove(job) {
            for event in events {
                if index.job_of.get(&event).is_some_and(|owner| owner == job) {
                    index.job_of.remove(&event);
                }
            }
        }
    }

    /// The ids among `events` that already have a Job.
    pub fn existing<'a>(&self, events: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let index = self.inner.lock();
        events
            .into_iter()
            .filter(|event| index.job_of.contains_key(*event))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_known_while_their_job_exists() {
        let index = EventIndex::default();
        index.insert("job-a", ["e1".to_string(), "e2".to_string()]);
        assert_eq!(
            index.existing(["e1", "e3"]),
            HashSet::from(["e1".to_string()])
        );
        index.remove_job("job-a");
        assert!(index.existing(["e1", "e2"]).is_empty());
    }
}
