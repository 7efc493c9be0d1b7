//! Request accounting: how many requests of each kind the server answered.
//!
//! Benchmarks read it to report API writes per event, and least-privilege tests read it to
//! learn every (verb, resource) a client used.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

/// What one accounted request was.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestKey {
    /// Authenticated user.
    pub user: String,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group, empty for core.
    pub group: String,
    /// Plural resource.
    pub resource: String,
    /// Subresource, empty for the main resource.
    pub subresource: String,
    /// Namespace, empty for cluster-scoped or cluster-wide requests.
    pub namespace: String,
    /// HTTP status code of the response.
    pub code: u16,
}

/// One row of [`RequestCounts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestCount {
    /// What was requested.
    #[serde(flatten)]
    pub key: RequestKey,
    /// How many times.
    pub count: u64,
}

/// A snapshot of the request counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RequestCounts(pub Vec<RequestCount>);

const WRITE_VERBS: &[&str] = &["create", "update", "patch", "delete", "deletecollection"];

impl RequestCounts {
    /// Requests with this verb on `resource` (`plural`, `plural.group` or `plural/sub`).
    pub fn count(&self, verb: &str, resource: &str) -> u64 {
        self.0
            .iter()
            .filter(|c| c.key.verb == verb && resource_matches(&c.key, resource))
            .map(|c| c.count)
            .sum()
    }

    /// All writes (create, update, patch, delete, deletecollection).
    pub fn writes(&self) -> u64 {
        self.0
            .iter()
            .filter(|c| WRITE_VERBS.contains(&c.key.verb.as_str()))
            .map(|c| c.count)
            .sum()
    }

    /// Every request counted.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|c| c.count).sum()
    }
}

fn resource_matches(key: &RequestKey, wanted: &str) -> bool {
    let (name, sub) = wanted.split_once('/').unwrap_or((wanted, ""));
    let (plural, group) = name.split_once('.').unwrap_or((name, ""));
    key.resource == plural && key.subresource == sub && (group.is_empty() || key.group == group)
}

/// The live counters.
#[derive(Debug, Clone, Default)]
pub struct Accounting(Arc<Mutex<HashMap<RequestKey, u64>>>);

impl Accounting {
    /// Counts one request.
    pub fn record(&self, key: RequestKey) {
        *self.0.lock().entry(key).or_default() += 1;
    }

    /// A sorted snapshot.
    pub fn snapshot(&self) -> RequestCounts {
        let mut rows: Vec<RequestCount> = self
            .0
            .lock()
            .iter()
            .map(|(key, count)| RequestCount {
                key: key.clone(),
                count: *count,
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        RequestCounts(rows)
    }

    /// Zeroes every counter.
    pub fn reset(&self) {
        self.0.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(verb: &str, group: &str, resource: &str, sub: &str) -> RequestKey {
        RequestKey {
            user: "admin".into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: "default".into(),
            code: 200,
        }
    }

    #[test]
    fn counts_by_verb_and_resource() {
        let accounting = Accounting::default();
        accounting.record(key("create", "batch", "jobs", ""));
        accounting.record(key("create", "batch", "jobs", ""));
        accounting.record(key("update", "batch", "jobs", "status"));
        accounting.record(key("list", "", "pods", ""));
        let counts = accounting.snapshot();
        assert_eq!(counts.count("create", "jobs.batch"), 2);
        assert_eq!(counts.count("update", "jobs/status"), 1);
        assert_eq!(counts.writes(), 3);
        assert_eq!(counts.total(), 4);
        accounting.reset();
        assert_eq!(accounting.snapshot().total(), 0);
    }
}
