//! The model's Kubernetes: an in-memory API server serving what the engine calls (Jobs,
//! ConfigMaps, Pods, core/v1 Events), and the controllers behind it (Job controller, kubelet
//! and provider, garbage collector, TTL), with faults chosen from the seed.
//!
//! Requests are not served when they arrive but at the next tick (every [`TICK_MS`]), all the
//! requests of a tick in one canonical order, so what the cluster sees does not hang on how
//! tasks interleave within a tick. Lists and watches are served on a coarser beat,
//! [`WATCH_BEAT_MS`], longer than the watcher's first backoff (0.8 s to 1.6 s), and a watcher
//! is never given two errors without an event in between, which would double that backoff
//! past the beat. (The retry jitter itself is seeded: see `run_seed`.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ConfigMap, ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::render::EVENT_IDS_ANNOTATION;

/// Short requests are served on this beat, in a canonical order.
pub const TICK_MS: u64 = 10;
/// Lists and watches are served on this beat, and watch faults happen on it.
pub const WATCH_BEAT_MS: u64 = 2_000;
/// Changes a watch can resume from; older resource versions answer `410 Gone`.
const HISTORY: usize = 2_000;
/// What the engine asks the API server for, and how to answer.
pub type Reply = (StatusCode, Vec<(&'static str, String)>, Body);

pub enum Body {
    Full(Bytes),
    /// A watch: lines as the cluster changes, until the sender is dropped.
    Stream(mpsc::UnboundedReceiver<Bytes>),
    /// The connection drops before the answer is read.
    Broken,
}

/// How likely each fault is, per request (or per watch, per beat). All zero in the quiet
/// period at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub throttle: f64,
    pub unavailable: f64,
    /// Stored, but the answer is lost (a 500, or the connection drops).
    pub lost_answer: f64,
    /// A create refused for good (`403`, as a ResourceQuota or an admission webhook does).
    pub refusal: f64,
    pub slow: f64,
    pub watch_cut: f64,
    pub watch_gone: f64,
    pub compaction: f64,
    pub list_failure: f64,
}

/// How the simulated pods behave.
#[derive(Debug, Clone, Copy)]
pub struct Kubelet {
    /// A pod the virtual node's provider refuses stays Pending for good.
    pub refuse: f64,
    pub pod_failure: f64,
    pub start_ms: (u64, u64),
    pub run_ms: (u64, u64),
    /// `retry.pendingTimeout` of the pipeline, to age refused pods for the sweeper.
    pub pending_timeout_ms: u64,
}

pub struct Request {
    pub incarnation: u32,
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Bytes,
    pub arrived: u64,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Job,
    Pod,
}

struct Change {
    rv: u64,
    kind: Kind,
    labels: BTreeMap<String, String>,
    line: Bytes,
}

struct OpenWatch {
    incarnation: u32,
    kind: Kind,
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
    ends: u64,
    bookmarks: bool,
}

/// What the Job controller keeps per Job.
struct JobRun {
    uid: String,
    indexed: bool,
    completions: u32,
    parallelism: u32,
    backoff_limit: u32,
    /// `ttlSecondsAfterFinished`: none, the Job stays.
    ttl_ms: Option<u64>,
    /// `spec.suspend`: the controller starts no pods.
    suspended: bool,
    /// `spec.activeDeadlineSeconds` was set. Spate sets it only on a Job running for longer
    /// than `pendingTimeout`, to 1 s, so the model takes it as passed.
    past_deadline: bool,
    /// The ConfigMap its pods mount, if any.
    input: Option<String>,
    succeeded: BTreeSet<u32>,
    active: BTreeMap<u32, String>,
    failed: u32,
    finished: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

struct PodRun {
    job: String,
    phase: Phase,
    created: u64,
    due: u64,
    refused: bool,
    aged: bool,
}

/// How a Job ended, kept after it is gone for the final checks.
#[derive(Debug, Clone)]
pub struct Grave {
    pub name: String,
    /// In index order.
    pub events: Vec<String>,
    /// The indexes whose pod succeeded.
    pub succeeded_indexes: BTreeSet<u32>,
    pub succeeded: Option<bool>,
    pub marked_reported: bool,
    pub deleted_by_ttl: bool,
}

#[derive(Default)]
pub struct Cluster {
    rv: u64,
    pub jobs: BTreeMap<String, Job>,
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub pods: BTreeMap<String, Pod>,
    /// Dead letters and failures posted as core/v1 Events: (event id, reason, message).
    pub posted_events: Vec<(String, String, String)>,
    history: VecDeque<Change>,
    compacted: u64,
    watches: Vec<OpenWatch>,
    /// Watchers (incarnation, kind) given an error and no event since: see the module doc.
    fragile: BTreeSet<(u32, Kind)>,
    /// Watchers whose last list failed.
    list_failed: BTreeSet<(u32, Kind)>,
    pending: Vec<Request>,
    delayed: Vec<(u64, oneshot::Sender<Reply>, Reply)>,
    runs: BTreeMap<String, JobRun>,
    pod_runs: BTreeMap<String, PodRun>,
    pod_serial: u64,
    /// Every Job ever created, by uid (a name comes back when an event runs again after its
    /// first Job's TTL).
    pub graves: BTreeMap<String, Grave>,
    /// Uids of the Jobs whose reported mark was stored.
    pub marked: BTreeSet<String>,
    /// Set when the store changed, for the checks.
    pub changed: bool,
    pub notes: Vec<(u64, String)>,
}

impl Cluster {
    pub fn enqueue(&mut self, request: Request) {
        self.pending.push(request);
    }

    /// When the cluster next has something to do, in ms since the start.
    pub fn next_deadline(&self, now: u64) -> u64 {
        let tick = (now / TICK_MS + 1) * TICK_MS;
        let beat = (now / WATCH_BEAT_MS + 1) * WATCH_BEAT_MS;
        let mut next = u64::MAX;
        for request in &self.pending {
            next = next.min(if serves_on_beat(request) { beat } else { tick });
        }
        for (due, ..) in &self.delayed {
            next = next.min((*due).max(tick));
        }
        for pod in self.pod_runs.values() {
            if matches!(pod.phase, Phase::Pending | Phase::Running) && pod.due != u64::MAX {
                next = next.min(align(pod.due).max(tick));
            }
        }
        for run in self.runs.values() {
            if let (Some(finished), Some(ttl)) = (run.finished, run.ttl_ms) {
                next = next.min(align(finished + ttl).max(tick));
            }
        }
        if !self.watches.is_empty() {
            next = next.min(beat);
        }
        next
    }

    /// Serves what is due at `now` (a tick) and moves the controllers on.
    pub fn tick(
        &mut self,
        now: u64,
        alive: Option<u32>,
        faults: &Faults,
        kubelet: &Kubelet,
        rng: &mut StdRng,
    ) {
        let mut index = 0;
        while index < self.delayed.len() {
            if self.delayed[index].0 <= now {
                let (_, reply, answer) = self.delayed.swap_remove(index);
                let _ = reply.send(answer);
            } else {
                index += 1;
            }
        }
        let on_beat = now.is_multiple_of(WATCH_BEAT_MS);
        let (mut due, waiting): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| r.arrived < now && (on_beat || !serves_on_beat(r)));
        self.pending = waiting;
        due.sort_by(|a, b| {
            (a.method.as_str(), &a.path, &a.query, &a.body).cmp(&(
                b.method.as_str(),
                &b.path,
                &b.query,
                &b.body,
            ))
        });
        for request in due {
            if Some(request.incarnation) != alive {
                continue;
            }
            self.serve(request, now, faults, rng);
        }
        self.control(now, kubelet, rng);
        if on_beat {
            self.beat(now, faults, rng);
        }
    }

    fn serve(&mut self, request: Request, now: u64, faults: &Faults, rng: &mut StdRng) {
        let Request {
            incarnation,
            method,
            path,
            query,
            body,
            reply,
            ..
        } = request;
        let query = parse_query(&query);
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (resource, name) = match segments.as_slice() {
            ["apis", "batch", "v1", "namespaces", _, resource] => (*resource, None),
            ["apis", "batch", "v1", "namespaces", _, resource, name] => (*resource, Some(*name)),
            ["api", "v1", "namespaces", _, resource] => (*resource, None),
            ["api", "v1", "namespaces", _, resource, name] => (*resource, Some(*name)),
            _ => {
                let _ = reply.send(status(404, "NotFound", format!("no route {path}")));
                return;
            }
        };
        let kind = match resource {
            "jobs" => Some(Kind::Job),
            "pods" => Some(Kind::Pod),
            _ => None,
        };
        let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        if method == Method::GET
            && name.is_none()
            && let Some(kind) = kind
        {
            let selector = parse_selector(query.get("labelSelector").map_or("", String::as_str));
            let answer = if watching {
                let rv = query.get("resourceVersion").cloned().unwrap_or_default();
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(290);
                let bookmarks = query
                    .get("allowWatchBookmarks")
                    .is_some_and(|b| b == "true");
                self.watch(
                    incarnation,
                    kind,
                    selector,
                    &rv,
                    now + timeout * 1000,
                    bookmarks,
                )
            } else {
                self.list(incarnation, kind, &selector, faults, rng)
            };
            let _ = reply.send(answer);
            return;
        }
        let mutating = method != Method::GET;
        let roll: f64 = rng.random();
        let mut threshold = faults.throttle;
        if roll < threshold {
            self.note(now, format!("api: {method} {path}: 429"));
            let mut answer = status(429, "TooManyRequests", "slow down".into());
            answer.1.push(("retry-after", "1".to_string()));
            let _ = reply.send(answer);
            return;
        }
        threshold += faults.unavailable;
        if roll < threshold {
            self.note(now, format!("api: {method} {path}: 503 before storing"));
            let _ = reply.send(status(
                503,
                "ServiceUnavailable",
                "etcd leader changed".into(),
            ));
            return;
        }
        let answer = match (method.clone(), resource, name) {
            (Method::POST, "jobs", None) => self.create_job(&body, now),
            (Method::POST, "configmaps", None) => self.create_config_map(&body, now),
            (Method::POST, "events", None) => self.create_event(&body),
            (Method::GET, "jobs", Some(name)) => get(self.jobs.get(name), name),
            (Method::GET, "pods", Some(name)) => get(self.pods.get(name), name),
            (Method::GET, "configmaps", Some(name)) => get(self.config_maps.get(name), name),
            (Method::PATCH, "jobs", Some(name)) => self.patch_job(name, &body, now),
            (Method::PATCH, "configmaps", Some(name)) => self.patch_config_map(name, &body, now),
            (Method::DELETE, "jobs", Some(name)) => match self.precondition_failed(name, &body) {
                Some(refusal) => refusal,
                None => self.delete_job(name, now, false),
            },
            (Method::DELETE, "configmaps", Some(name)) => self.delete_config_map(name),
            _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
        };
        threshold += faults.refusal;
        if method == Method::POST && resource != "events" && roll < threshold {
            self.note(now, format!("api: {method} {path}: 403 exceeded quota"));
            let _ = reply.send(status(
                403,
                "Forbidden",
                "exceeded quota: model, requested: count/jobs.batch=1".into(),
            ));
            return;
        }
        threshold += faults.lost_answer;
        if mutating && roll < threshold {
            let broken = rng.random_bool(0.5);
            self.note(
                now,
                format!(
                    "api: {method} {path} answered {} but the answer is lost ({})",
                    answer.0.as_u16(),
                    if broken { "connection dropped" } else { "500" }
                ),
            );
            let lost = if broken {
                (StatusCode::OK, Vec::new(), Body::Broken)
            } else {
                status(500, "InternalError", "the answer was lost".into())
            };
            let _ = reply.send(lost);
            return;
        }
        threshold += faults.slow;
        if roll < threshold {
            let delay = rng.random_range(1..=100) * TICK_MS;
            self.delayed.push((now + delay, reply, answer));
            return;
        }
        let _ = reply.send(answer);
    }

    fn list(
        &mut self,
        incarnation: u32,
        kind: Kind,
        selector: &[(String, String)],
        faults: &Faults,
        rng: &mut StdRng,
    ) -> Reply {
        let watcher = (incarnation, kind);
        if !self.list_failed.contains(&watcher)
            && !self.fragile.contains(&watcher)
            && rng.random_bool(faults.list_failure)
        {
            self.list_failed.insert(watcher);
            self.fragile.insert(watcher);
            return status(500, "InternalError", "list failed".into());
        }
        self.list_failed.remove(&watcher);
        self.fragile.remove(&watcher);
        let items: Vec<Value> = match kind {
            Kind::Job => self
                .jobs
                .values()
                .filter(|job| matches(selector, job.metadata.labels.as_ref()))
                .map(to_json)
                .collect(),
            Kind::Pod => self
                .pods
                .values()
                .filter(|pod| matches(selector, pod.metadata.labels.as_ref()))
                .map(to_json)
                .collect(),
        };
        let (api_version, list_kind) = match kind {
            Kind::Job => ("batch/v1", "JobList"),
            Kind::Pod => ("v1", "PodList"),
        };
        ok(json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": self.rv.to_string()},
            "items": items,
        }))
    }

    fn watch(
        &mut self,
        incarnation: u32,
        kind: Kind,
        selector: Vec<(String, String)>,
        rv: &str,
        ends: u64,
        bookmarks: bool,
    ) -> Reply {
        let (tx, rx) = mpsc::unbounded_channel();
        let from: u64 = rv.parse().unwrap_or(0);
        if from < self.compacted {
            let _ = tx.send(line(&json!({"type": "ERROR", "object": status_json(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", self.compacted),
                None,
            )})));
            self.fragile.insert((incarnation, kind));
            return (StatusCode::OK, Vec::new(), Body::Stream(rx));
        }
        let mut delivered = false;
        for change in &self.history {
            if change.rv > from && change.kind == kind && matches(&selector, Some(&change.labels)) {
                let _ = tx.send(change.line.clone());
                delivered = true;
            }
        }
        if delivered {
            self.fragile.remove(&(incarnation, kind));
        }
        self.watches.push(OpenWatch {
            incarnation,
            kind,
            selector,
            tx,
            ends,
            bookmarks,
        });
        (StatusCode::OK, Vec::new(), Body::Stream(rx))
    }

    /// Watch faults and bookmarks, on the beat.
    fn beat(&mut self, now: u64, faults: &Faults, rng: &mut StdRng) {
        if self.fragile.is_empty() && rng.random_bool(faults.compaction) {
            self.compacted = self.rv;
            self.history.clear();
            self.note(
                now,
                format!("api: history compacted at resourceVersion {}", self.rv),
            );
        }
        let rv = self.rv;
        let watches = std::mem::take(&mut self.watches);
        for watch in watches {
            let watcher = (watch.incarnation, watch.kind);
            if now >= watch.ends || watch.tx.is_closed() {
                continue;
            }
            if rng.random_bool(faults.watch_cut) {
                self.note(
                    now,
                    format!("api: {:?} watch of #{} cut", watch.kind, watch.incarnation),
                );
                continue;
            }
            if !self.fragile.contains(&watcher) && rng.random_bool(faults.watch_gone) {
                let _ = watch
                    .tx
                    .send(line(&json!({"type": "ERROR", "object": status_json(
                        410,
                        "Expired",
                        "watch expired",
                        None,
                    )})));
                self.fragile.insert(watcher);
                self.note(
                    now,
                    format!(
                        "api: {:?} watch of #{} gone (410)",
                        watch.kind, watch.incarnation
                    ),
                );
                continue;
            }
            if watch.bookmarks {
                let (api_version, kind) = match watch.kind {
                    Kind::Job => ("batch/v1", "Job"),
                    Kind::Pod => ("v1", "Pod"),
                };
                let _ = watch.tx.send(line(&json!({"type": "BOOKMARK", "object": {
                    "apiVersion": api_version,
                    "kind": kind,
                    "metadata": {"resourceVersion": rv.to_string()},
                }})));
            }
            self.watches.push(watch);
        }
    }

    fn record(&mut self, kind: Kind, event: &str, object: Value, labels: BTreeMap<String, String>) {
        self.changed = true;
        let line = line(&json!({"type": event, "object": object}));
        for watch in &self.watches {
            if watch.kind == kind && matches(&watch.selector, Some(&labels)) {
                let _ = watch.tx.send(line.clone());
                self.fragile.remove(&(watch.incarnation, watch.kind));
            }
        }
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            labels,
            line,
        });
        while self.history.len() > HISTORY {
            if let Some(oldest) = self.history.pop_front() {
                self.compacted = oldest.rv;
            }
        }
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn create_job(&mut self, body: &[u8], now: u64) -> Reply {
        let mut job: Job = match serde_json::from_slice(body) {
            Ok(job) => job,
            Err(error) => return status(400, "BadRequest", error.to_string()),
        };
        let name = job.metadata.name.clone().unwrap_or_default();
        if self.jobs.contains_key(&name) {
            return status(
                409,
                "AlreadyExists",
                format!("jobs.batch \"{name}\" already exists"),
            );
        }
        let annotations: usize = job
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if annotations > 256 * 1024 {
            return status(
                422,
                "Invalid",
                "metadata.annotations: Too long: must have at most 262144 bytes".into(),
            );
        }
        let rv = self.next_rv();
        let uid = format!("uid-{rv}");
        job.metadata.uid = Some(uid.clone());
        job.metadata.resource_version = Some(rv);
        job.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
        let spec = job.spec.clone().unwrap_or_default();
        let indexed = spec.completion_mode.as_deref() == Some("Indexed");
        let count = |value: Option<i32>, default: u32| {
            value.and_then(|v| u32::try_from(v).ok()).unwrap_or(default)
        };
        let input = spec
            .template
            .spec
            .as_ref()
            .and_then(|pod| pod.volumes.as_ref())
            .and_then(|volumes| volumes.iter().find_map(|v| v.config_map.as_ref()))
            .map(|config_map| config_map.name.clone());
        let run = JobRun {
            uid,
            indexed,
            completions: count(spec.completions, 1),
            parallelism: count(spec.parallelism, 1),
            backoff_limit: count(spec.backoff_limit, 6),
            ttl_ms: ttl_ms(spec.ttl_seconds_after_finished),
            suspended: spec.suspend == Some(true),
            past_deadline: spec.active_deadline_seconds.is_some(),
            input,
            succeeded: BTreeSet::new(),
            active: BTreeMap::new(),
            failed: 0,
            finished: None,
        };
        job.status = Some(JobStatus::default());
        self.note(
            now,
            format!("api: Job {name} created ({} events)", event_ids(&job).len()),
        );
        self.graves.insert(
            run.uid.clone(),
            Grave {
                name: name.clone(),
                events: event_ids(&job),
                succeeded_indexes: BTreeSet::new(),
                succeeded: None,
                marked_reported: false,
                deleted_by_ttl: false,
            },
        );
        self.runs.insert(name.clone(), run);
        let answer = ok(to_json(&job));
        let labels = job.metadata.labels.clone().unwrap_or_default();
        self.record(Kind::Job, "ADDED", to_json(&job), labels);
        self.jobs.insert(name, job);
        answer
    }

    fn create_config_map(&mut self, body: &[u8], now: u64) -> Reply {
        let mut config_map: ConfigMap = match serde_json::from_slice(body) {
            Ok(config_map) => config_map,
            Err(error) => return status(400, "BadRequest", error.to_string()),
        };
        let name = config_map.metadata.name.clone().unwrap_or_default();
        if self.config_maps.contains_key(&name) {
            return status(
                409,
                "AlreadyExists",
                format!("configmaps \"{name}\" already exists"),
            );
        }
        let size: usize = config_map
            .data
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if size > 1024 * 1024 {
            return status(
                422,
                "Invalid",
                "data: Too long: must have at most 1048576 bytes".into(),
            );
        }
        let rv = self.next_rv();
        config_map.metadata.uid = Some(format!("uid-{rv}"));
        config_map.metadata.resource_version = Some(rv);
        self.note(now, format!("api: ConfigMap {name} created"));
        let answer = ok(to_json(&config_map));
        self.config_maps.insert(name, config_map);
        self.changed = true;
        answer
    }

    fn create_event(&mut self, body: &[u8]) -> Reply {
        let event: Value = match serde_json::from_slice(body) {
            Ok(event) => event,
            Err(error) => return status(400, "BadRequest", error.to_string()),
        };
        let annotation = |key: &str| {
            event["metadata"]["annotations"][key]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        self.posted_events.push((
            annotation("spate.dev/event-id"),
            event["reason"].as_str().unwrap_or_default().to_string(),
            event["message"].as_str().unwrap_or_default().to_string(),
        ));
        ok(event)
    }

    fn patch_job(&mut self, name: &str, body: &[u8], now: u64) -> Reply {
        let Some(job) = self.jobs.get(name) else {
            return not_found("jobs.batch", name);
        };
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "not JSON".into());
        };
        let mut value = to_json(job);
        merge_patch(&mut value, &patch);
        let mut patched: Job = match serde_json::from_value(value) {
            Ok(job) => job,
            Err(error) => return status(422, "Invalid", error.to_string()),
        };
        patched.metadata.name = job.metadata.name.clone();
        patched.metadata.uid = job.metadata.uid.clone();
        // Of the spec, only what the real API server lets change on a live Job and the
        // engine changes: suspend, the TTL, the deadline and the parallelism.
        let (suspend, ttl, deadline, parallelism) = patched
            .spec
            .as_ref()
            .map(|spec| {
                (
                    spec.suspend,
                    spec.ttl_seconds_after_finished,
                    spec.active_deadline_seconds,
                    spec.parallelism,
                )
            })
            .unwrap_or_default();
        patched.spec = job.spec.clone();
        if let Some(spec) = patched.spec.as_mut() {
            spec.suspend = suspend;
            spec.ttl_seconds_after_finished = ttl;
            spec.active_deadline_seconds = deadline;
            spec.parallelism = parallelism;
        }
        let mut changes = Vec::new();
        if let Some(run) = self.runs.get_mut(name) {
            run.suspended = suspend == Some(true);
            run.ttl_ms = ttl_ms(ttl);
            if deadline.is_some() && !run.past_deadline {
                run.past_deadline = true;
                changes.push("given a deadline".to_string());
            }
            let parallelism = parallelism.and_then(|p| u32::try_from(p).ok()).unwrap_or(1);
            if parallelism != run.parallelism {
                changes.push(format!("parallelism {} -> {parallelism}", run.parallelism));
                run.parallelism = parallelism;
            }
        }
        patched.status = job.status.clone();
        for change in changes {
            self.note(now, format!("api: Job {name} {change}"));
        }
        patched.metadata.resource_version = Some(self.next_rv());
        let uid = patched.metadata.uid.clone().unwrap_or_default();
        if is_reported(&patched) && self.marked.insert(uid.clone()) {
            self.note(now, format!("api: Job {name} marked reported"));
            if let Some(grave) = self.graves.get_mut(&uid) {
                grave.marked_reported = true;
            }
        }
        let answer = ok(to_json(&patched));
        let labels = patched.metadata.labels.clone().unwrap_or_default();
        self.record(Kind::Job, "MODIFIED", to_json(&patched), labels);
        self.jobs.insert(name.to_string(), patched);
        answer
    }

    fn patch_config_map(&mut self, name: &str, body: &[u8], now: u64) -> Reply {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "not JSON".into());
        };
        let Some(config_map) = self.config_maps.get(name) else {
            return not_found("configmaps", name);
        };
        let mut value = to_json(config_map);
        merge_patch(&mut value, &patch);
        let mut patched: ConfigMap = match serde_json::from_value(value) {
            Ok(config_map) => config_map,
            Err(error) => return status(422, "Invalid", error.to_string()),
        };
        patched.metadata.name = Some(name.to_string());
        patched.metadata.uid = config_map.metadata.uid.clone();
        patched.metadata.resource_version = Some(self.next_rv());
        self.note(now, format!("api: ConfigMap {name} patched"));
        let answer = ok(to_json(&patched));
        self.config_maps.insert(name.to_string(), patched);
        self.changed = true;
        answer
    }

    fn delete_config_map(&mut self, name: &str) -> Reply {
        match self.config_maps.remove(name) {
            Some(config_map) => {
                self.changed = true;
                ok(to_json(&config_map))
            }
            None => not_found("configmaps", name),
        }
    }

    /// A delete's preconditions (uid, resourceVersion) against the Job as stored: the real
    /// API server refuses a mismatch with `409 Conflict`.
    fn precondition_failed(&self, name: &str, body: &[u8]) -> Option<Reply> {
        let job = self.jobs.get(name)?;
        let options: Value = serde_json::from_slice(body).ok()?;
        let wanted = &options["preconditions"];
        let differs = |key: &str, stored: &Option<String>| {
            wanted[key]
                .as_str()
                .is_some_and(|wanted| Some(wanted) != stored.as_deref())
        };
        (differs("uid", &job.metadata.uid)
            || differs("resourceVersion", &job.metadata.resource_version))
        .then(|| {
            status(
                409,
                "Conflict",
                format!("Precondition failed for jobs.batch {name}"),
            )
        })
    }

    /// Deletes a Job; its pods and owned ConfigMaps go with it (the garbage collector, at
    /// once: pods being deleted no longer count as running).
    fn delete_job(&mut self, name: &str, now: u64, by_ttl: bool) -> Reply {
        let Some(mut job) = self.jobs.remove(name) else {
            return not_found("jobs.batch", name);
        };
        self.note(
            now,
            format!(
                "api: Job {name} deleted{}",
                if by_ttl { " by its TTL" } else { "" }
            ),
        );
        let uid = job.metadata.uid.clone().unwrap_or_default();
        if let Some(grave) = self.graves.get_mut(&uid) {
            grave.deleted_by_ttl = by_ttl;
        }
        job.metadata.resource_version = Some(self.next_rv());
        job.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        let answer = ok(to_json(&job));
        let labels = job.metadata.labels.clone().unwrap_or_default();
        self.record(Kind::Job, "DELETED", to_json(&job), labels);
        self.runs.remove(name);
        let pods: Vec<String> = self
            .pod_runs
            .iter()
            .filter(|(_, pod)| pod.job == name)
            .map(|(pod, _)| pod.clone())
            .collect();
        for pod in pods {
            self.pod_runs.remove(&pod);
            if let Some(mut object) = self.pods.remove(&pod) {
                object.metadata.resource_version = Some(self.next_rv());
                object.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
                let labels = object.metadata.labels.clone().unwrap_or_default();
                self.record(Kind::Pod, "DELETED", to_json(&object), labels);
            }
        }
        self.config_maps.retain(|_, config_map| {
            !config_map
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|owner| owner.uid == uid)
        });
        answer
    }

    /// The Job controller, the kubelet with its provider, and the TTL controller.
    fn control(&mut self, now: u64, kubelet: &Kubelet, rng: &mut StdRng) {
        let expired: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, run)| {
                run.finished
                    .zip(run.ttl_ms)
                    .is_some_and(|(at, ttl)| at + ttl <= now)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            self.delete_job(&name, now, true);
        }
        let pods: Vec<String> = self
            .pod_runs
            .iter()
            .filter(|(_, pod)| {
                matches!(pod.phase, Phase::Pending | Phase::Running) && pod.due <= now
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut touched_jobs = BTreeSet::new();
        for name in pods {
            let Some(pod) = self.pod_runs.get(&name) else {
                continue;
            };
            let job = pod.job.clone();
            let input_ready = self
                .runs
                .get(&job)
                .and_then(|run| run.input.as_ref())
                .is_none_or(|input| self.config_maps.contains_key(input));
            let Some(pod) = self.pod_runs.get_mut(&name) else {
                continue;
            };
            match pod.phase {
                Phase::Pending if pod.refused || !input_ready => {
                    if !pod.aged && now >= pod.created + kubelet.pending_timeout_ms {
                        // The sweeper reads a pod's age from its creationTimestamp against
                        // the wall clock; the model's time is virtual, so the pod is made as
                        // old as it is in the model.
                        pod.aged = true;
                        pod.due = u64::MAX;
                        let age = kubelet.pending_timeout_ms + 1_000;
                        if let Some(object) = self.pods.get_mut(&name) {
                            object.metadata.creation_timestamp = Some(Time(
                                jiff::Timestamp::now()
                                    - jiff::SignedDuration::from_millis(age as i64),
                            ));
                        }
                        self.publish_pod(&name);
                    } else if !pod.aged {
                        pod.due = if pod.refused {
                            pod.created + kubelet.pending_timeout_ms
                        } else {
                            now + 200
                        };
                    }
                }
                Phase::Pending => {
                    pod.phase = Phase::Running;
                    pod.due = now + rng.random_range(kubelet.run_ms.0..=kubelet.run_ms.1);
                    self.publish_pod(&name);
                }
                Phase::Running => {
                    pod.phase = if rng.random_bool(kubelet.pod_failure) {
                        Phase::Failed
                    } else {
                        Phase::Succeeded
                    };
                    touched_jobs.insert(job);
                    self.publish_pod(&name);
                }
                Phase::Succeeded | Phase::Failed => {}
            }
        }
        let unsynced: Vec<String> = self
            .runs
            .iter()
            .filter(|(name, run)| {
                run.finished.is_none()
                    && !run.suspended
                    && (touched_jobs.contains(*name)
                        || run.past_deadline
                        || (run.active.len() as u32)
                            < run
                                .parallelism
                                .min(run.completions - run.succeeded.len() as u32))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in unsynced {
            self.sync_job(&name, now, kubelet, rng);
        }
    }

    fn sync_job(&mut self, name: &str, now: u64, kubelet: &Kubelet, rng: &mut StdRng) {
        let Some(run) = self.runs.get_mut(name) else {
            return;
        };
        let mut finished_pods = Vec::new();
        for (index, pod) in &run.active {
            match self.pod_runs.get(pod).map(|p| p.phase) {
                Some(Phase::Succeeded) => finished_pods.push((*index, true)),
                Some(Phase::Failed) => finished_pods.push((*index, false)),
                _ => {}
            }
        }
        for (index, succeeded) in finished_pods {
            run.active.remove(&index);
            if succeeded {
                run.succeeded.insert(index);
            } else {
                run.failed += 1;
            }
        }
        if let Some(grave) = self.graves.get_mut(&run.uid) {
            grave.succeeded_indexes.clone_from(&run.succeeded);
        }
        let mut condition = None;
        if run.past_deadline && run.succeeded.len() < run.completions as usize {
            condition = Some((
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            ));
        } else if run.failed > run.backoff_limit {
            condition = Some((
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            ));
        } else if run.succeeded.len() as u32 >= run.completions {
            condition = Some(("Complete", "", ""));
        }
        let mut new_pods = Vec::new();
        if condition.is_none() {
            for index in 0..run.completions {
                if run.active.len() as u32 >= run.parallelism {
                    break;
                }
                if run.succeeded.contains(&index) || run.active.contains_key(&index) {
                    continue;
                }
                self.pod_serial += 1;
                let pod = format!("{name}-{index}-{:05}", self.pod_serial);
                run.active.insert(index, pod.clone());
                new_pods.push((index, pod));
            }
        }
        let terminated: Vec<String> = if condition.is_some() {
            std::mem::take(&mut run.active).into_values().collect()
        } else {
            Vec::new()
        };
        if let Some((kind, ..)) = condition {
            run.finished = Some(now);
            let succeeded = kind == "Complete";
            if let Some(grave) = self.graves.get_mut(&run.uid) {
                grave.succeeded = Some(succeeded);
            }
            self.notes
                .push((now, format!("cluster: Job {name} {kind}")));
        }
        let indexed = run.indexed;
        let status = JobStatus {
            active: Some(run.active.len() as i32),
            succeeded: Some(run.succeeded.len() as i32),
            failed: Some(run.failed as i32),
            completed_indexes: indexed.then(|| format_indexes(&run.succeeded)),
            conditions: condition.map(|(kind, reason, message)| {
                vec![JobCondition {
                    type_: kind.to_string(),
                    status: "True".to_string(),
                    reason: (!reason.is_empty()).then(|| reason.to_string()),
                    message: (!message.is_empty()).then(|| message.to_string()),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        };
        let uid = run.uid.clone();
        for pod in terminated {
            self.pod_runs.remove(&pod);
            if let Some(mut object) = self.pods.remove(&pod) {
                object.metadata.resource_version = Some(self.next_rv());
                let labels = object.metadata.labels.clone().unwrap_or_default();
                self.record(Kind::Pod, "DELETED", to_json(&object), labels);
            }
        }
        for (index, pod) in new_pods {
            self.create_pod(name, &uid, index, &pod, now, kubelet, rng);
        }
        let Some(job) = self.jobs.get_mut(name) else {
            return;
        };
        if job.status.as_ref() == Some(&status) {
            return;
        }
        job.status = Some(status);
        self.rv += 1;
        job.metadata.resource_version = Some(self.rv.to_string());
        let object = to_json(job);
        let labels = job.metadata.labels.clone().unwrap_or_default();
        self.record(Kind::Job, "MODIFIED", object, labels);
    }

    #[allow(clippy::too_many_arguments)]
    fn create_pod(
        &mut self,
        job: &str,
        uid: &str,
        index: u32,
        name: &str,
        now: u64,
        kubelet: &Kubelet,
        rng: &mut StdRng,
    ) {
        let Some(owner) = self.jobs.get(job) else {
            return;
        };
        let mut labels = owner
            .spec
            .as_ref()
            .and_then(|spec| spec.template.metadata.as_ref())
            .and_then(|meta| meta.labels.clone())
            .unwrap_or_default();
        labels.insert("job-name".to_string(), job.to_string());
        labels.insert("batch.kubernetes.io/job-name".to_string(), job.to_string());
        labels.insert(
            "batch.kubernetes.io/job-completion-index".to_string(),
            index.to_string(),
        );
        let refused = rng.random_bool(kubelet.refuse);
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("default".to_string()),
                labels: Some(labels),
                creation_timestamp: Some(Time(jiff::Timestamp::now())),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".to_string(),
                    kind: "Job".to_string(),
                    name: job.to_string(),
                    uid: uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: None,
            status: None,
        };
        if refused {
            self.note(now, format!("cluster: the provider refuses pod {name}"));
        }
        self.pods.insert(name.to_string(), pod);
        self.pod_runs.insert(
            name.to_string(),
            PodRun {
                job: job.to_string(),
                phase: Phase::Pending,
                created: now,
                due: now + rng.random_range(kubelet.start_ms.0..=kubelet.start_ms.1),
                refused,
                aged: false,
            },
        );
        self.publish_pod(name);
    }

    /// Writes a pod's status from the kubelet's view and tells its watchers.
    fn publish_pod(&mut self, name: &str) {
        let Some(run) = self.pod_runs.get(name) else {
            return;
        };
        let input_ready = self
            .runs
            .get(&run.job)
            .and_then(|job| job.input.as_ref())
            .is_none_or(|input| self.config_maps.contains_key(input));
        let (phase, waiting) = match run.phase {
            Phase::Pending if run.refused => (
                "Pending",
                Some((
                    "ProviderFailed",
                    "container group quota exceeded".to_string(),
                )),
            ),
            Phase::Pending if !input_ready => (
                "Pending",
                Some((
                    "ContainerCreating",
                    format!("configmap \"{}\" not found", run.job),
                )),
            ),
            Phase::Pending => ("Pending", Some(("ContainerCreating", String::new()))),
            Phase::Running => ("Running", None),
            Phase::Succeeded => ("Succeeded", None),
            Phase::Failed => ("Failed", None),
        };
        let rv = {
            self.rv += 1;
            self.rv.to_string()
        };
        let Some(pod) = self.pods.get_mut(name) else {
            return;
        };
        pod.metadata.resource_version = Some(rv);
        pod.status = Some(PodStatus {
            phase: Some(phase.to_string()),
            container_statuses: Some(vec![ContainerStatus {
                name: "work".to_string(),
                image: "example/work".to_string(),
                image_id: String::new(),
                ready: phase == "Running",
                restart_count: 0,
                state: waiting.map(|(reason, message)| ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.to_string()),
                        message: Some(message),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let object = to_json(pod);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        self.record(Kind::Pod, "MODIFIED", object, labels);
    }

    /// What the model knows of a Job in the store.
    pub fn live_grave(&self, name: &str) -> Option<&Grave> {
        let uid = self.jobs.get(name)?.metadata.uid.as_ref()?;
        self.graves.get(uid)
    }

    /// Pods Pending or Running (what the budget must cover).
    pub fn pods_in_flight(&self) -> usize {
        self.pod_runs
            .values()
            .filter(|pod| matches!(pod.phase, Phase::Pending | Phase::Running))
            .count()
    }

    /// Whether a stored Job can start: it needs no input, or its input exists.
    /// Whether the Job will run: released by Spate (not suspended for its input) and its
    /// input there.
    pub fn runnable(&self, job: &str) -> bool {
        let Some(run) = self.runs.get(job) else {
            return false;
        };
        let released = self
            .jobs
            .get(job)
            .is_some_and(|object| !super::emit::is_incomplete(object));
        released
            && run
                .input
                .as_ref()
                .is_none_or(|input| self.config_maps.contains_key(input))
    }

    /// Forgets what a dead process had in flight: its requests and watches.
    pub fn disconnect(&mut self, incarnation: u32) {
        self.pending
            .retain(|request| request.incarnation != incarnation);
        self.watches
            .retain(|watch| watch.incarnation != incarnation);
        self.fragile.retain(|(owner, _)| *owner != incarnation);
        self.list_failed.retain(|(owner, _)| *owner != incarnation);
        self.delayed.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.pods.is_empty() && self.config_maps.is_empty()
    }

    fn note(&mut self, now: u64, text: String) {
        self.notes.push((now, text));
    }
}

/// The event ids a Job carries, from its annotation.
pub fn event_ids(job: &Job) -> Vec<String> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(EVENT_IDS_ANNOTATION))
        .and_then(|ids| serde_json::from_str(ids).ok())
        .unwrap_or_default()
}

fn is_reported(job: &Job) -> bool {
    job.metadata
        .annotations
        .as_ref()
        .is_some_and(|annotations| {
            annotations.contains_key(crate::engine::tracker::REPORTED_ANNOTATION)
        })
}

fn serves_on_beat(request: &Request) -> bool {
    request.method == Method::GET
        && (request.path.ends_with("/jobs") || request.path.ends_with("/pods"))
}

fn align(ms: u64) -> u64 {
    ms.div_ceil(TICK_MS) * TICK_MS
}

fn format_indexes(indexes: &BTreeSet<u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = indexes.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn ok(value: Value) -> Reply {
    (
        StatusCode::OK,
        vec![("content-type", "application/json".to_string())],
        Body::Full(Bytes::from(value.to_string())),
    )
}

fn get<T: serde::Serialize>(object: Option<&T>, name: &str) -> Reply {
    match object {
        Some(object) => ok(to_json(object)),
        None => not_found("object", name),
    }
}

fn not_found(kind: &str, name: &str) -> Reply {
    status(404, "NotFound", format!("{kind} \"{name}\" not found"))
}

fn status_json(code: u16, reason: &str, message: &str, retry_after: Option<u32>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(seconds) = retry_after {
        status["details"] = json!({"retryAfterSeconds": seconds});
    }
    status
}

/// An error answer. Every retryable one asks for a one-second wait, so the emitter's own
/// jitter (not seeded by the model) never decides when the retry comes.
fn status(code: u16, reason: &str, message: String) -> Reply {
    let retry_after = (code == 429 || code >= 500).then_some(1);
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        vec![("content-type", "application/json".to_string())],
        Body::Full(Bytes::from(
            status_json(code, reason, &message, retry_after).to_string(),
        )),
    )
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_selector(selector: &str) -> Vec<(String, String)> {
    selector
        .split(',')
        .filter_map(|term| term.split_once('='))
        .map(|(key, value)| {
            (
                key.trim().to_string(),
                value.trim_start_matches('=').trim().to_string(),
            )
        })
        .collect()
}

fn matches(selector: &[(String, String)], labels: Option<&BTreeMap<String, String>>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

fn ttl_ms(seconds: Option<i32>) -> Option<u64> {
    seconds.map(|seconds| u64::try_from(seconds).unwrap_or(0) * 1000)
}
