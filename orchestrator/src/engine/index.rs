//! Which events already have a Job, so a redelivered event is acknowledged instead of run
//! again, even when redelivery groups events into different batches (indexed mode names a
//! Job after its whole batch, so a regrouped batch would get a new name and a second Job).
//!
//! The index is rebuilt from the cluster: the tracker's Job watch lists every Job of the
//! pipeline (their `spate.dev/event-ids` annotation) before the intake takes its first event,
//! and the intake adds each Job it creates at once. It covers Jobs that still exist and will
//! run: a Job a crash left incomplete (suspended, its input missing) is not in it, so a
//! redelivery of its events makes them a Job that runs. Finished Jobs stay until their TTL,
//! which starts when they are reported, so the guarantee holds at least that long.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use parking_lot::Mutex;

use super::emit::is_incomplete;
use crate::render::EVENT_IDS_ANNOTATION;

#[derive(Debug, Clone, Default)]
pub struct EventIndex {
    inner: Arc<Mutex<Index>>,
}

#[derive(Debug, Default)]
struct Index {
    /// How many indexed Jobs carry each event: after a crash an event can be in two (one
    /// finished, one made from its redelivery before the first was seen).
    jobs_with: HashMap<String, u32>,
    events_of: HashMap<String, Vec<String>>,
}

impl EventIndex {
    /// Records that `job` carries `events`.
    pub fn insert(&self, job: &str, events: impl IntoIterator<Item = String>) {
        let mut index = self.inner.lock();
        if index.events_of.contains_key(job) {
            return;
        }
        let mut events: Vec<String> = events.into_iter().collect();
        events.sort_unstable();
        events.dedup();
        for event in &events {
            *index.jobs_with.entry(event.clone()).or_default() += 1;
        }
        index.events_of.insert(job.to_string(), events);
    }

    /// Records a Job seen by the watch, unless it is incomplete: it will not run as it is.
    pub fn insert_job(&self, job: &Job) {
        let name = job.metadata.name.as_deref().unwrap_or_default();
        if is_incomplete(job) || self.inner.lock().events_of.contains_key(name) {
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
        let Some(events) = index.events_of.remove(job) else {
            return;
        };
        for event in events {
            if let Some(count) = index.jobs_with.get_mut(&event) {
                *count -= 1;
                if *count == 0 {
                    index.jobs_with.remove(&event);
                }
            }
        }
    }

    /// Events held: those of the live Jobs.
    pub fn len(&self) -> usize {
        self.inner.lock().jobs_with.len()
    }

    /// The ids among `events` that already have a Job.
    pub fn existing<'a>(&self, events: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
        let index = self.inner.lock();
        events
            .into_iter()
            .filter(|event| index.jobs_with.contains_key(*event))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::emit::INCOMPLETE_LABEL;

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

    #[test]
    fn an_event_in_two_jobs_is_known_until_both_are_gone() {
        let index = EventIndex::default();
        index.insert("job-a", ["e1".to_string()]);
        index.insert("job-b", ["e1".to_string(), "e1".to_string()]);
        index.remove_job("job-b");
        assert_eq!(index.existing(["e1"]), HashSet::from(["e1".to_string()]));
        index.remove_job("job-a");
        assert!(index.existing(["e1"]).is_empty());
    }

    #[test]
    fn an_incomplete_job_is_indexed_once_released() {
        let job = |labels: serde_json::Value| -> Job {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "job-a", "labels": labels,
                    "annotations": {EVENT_IDS_ANNOTATION: "[\"e1\"]"}}
            }))
            .unwrap()
        };
        let index = EventIndex::default();
        index.insert_job(&job(serde_json::json!({INCOMPLETE_LABEL: "true"})));
        assert!(index.existing(["e1"]).is_empty(), "it would never run");
        index.insert_job(&job(serde_json::json!({})));
        assert_eq!(index.existing(["e1"]), HashSet::from(["e1".to_string()]));
    }
}
