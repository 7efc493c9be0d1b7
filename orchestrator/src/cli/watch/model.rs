//! What `spate watch` knows of a pipeline, built only from Kubernetes objects: its Jobs, their
//! pods, the nodes they run on and the Pipeline resource's status.
//!
//! Pure state and counting, no I/O: the watchers in `mod.rs` feed objects in, the views
//! (`lines.rs`, `tui.rs`) read [`Counts`], [`Rates`], the history and the failures out. Time
//! is passed in, so every rule here is tested without a cluster or a clock.
//!
//! Jobs and pods are kept while they exist; when one is deleted (a Job's
//! `ttlSecondsAfterFinished`, garbage collection of its pods) its outcome moves into
//! cumulative counters, so `succeeded` keeps counting everything that succeeded since the
//! watch started instead of falling back when the cluster cleans up.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Serialize;

use crate::pipeline::PipelineStatus;

/// The window the per-second rates are averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How much of the pods-over-time history is kept.
pub const HISTORY: Duration = Duration::from_secs(15 * 60);
/// Samples closer than this to the previous one replace it instead of adding a point.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Failures kept for display.
const FAILURES_KEPT: usize = 100;

/// Pod label the Job controller sets (Kubernetes 1.27+), and its older spelling.
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
const LEGACY_JOB_NAME_LABEL: &str = "job-name";

/// Waiting reasons that mean a pod will not start by itself.
const STUCK_REASONS: &[&str] = &[
    "ProviderFailed",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Where a Job stands, from its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Active,
    Succeeded,
    Failed,
}

/// One Job of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub name: String,
    pub state: JobState,
    /// Pods the Job controller counts as active, succeeded and failed.
    pub active: i32,
    pub succeeded: i32,
    pub failed: i32,
    pub completions: i32,
    /// Events the Job serves (its `spate.dev/event-ids` annotation), at least 1.
    pub events: u64,
    pub created: Option<jiff::Timestamp>,
    /// The `Failed` condition's reason and message.
    pub failure: Option<String>,
    /// Order in which the watch first saw it: creation times have one-second precision, so
    /// this orders the Jobs created within the same second.
    pub seen: u64,
}

impl JobInfo {
    pub fn from_job(job: &Job) -> JobInfo {
        let status = job.status.as_ref();
        let conditions = status
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let mut state = JobState::Active;
        let mut failure = None;
        for condition in conditions.iter().filter(|c| c.status == "True") {
            match condition.type_.as_str() {
                "Complete" | "SuccessCriteriaMet" => state = JobState::Succeeded,
                "Failed" | "FailureTarget" => {
                    state = JobState::Failed;
                    failure = Some(reason_message(
                        condition.reason.as_deref().unwrap_or("Failed"),
                        condition.message.as_deref(),
                    ));
                }
                _ => {}
            }
        }
        let events = job
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::render::EVENT_IDS_ANNOTATION))
            .and_then(|ids| serde_json::from_str::<Vec<serde_json::Value>>(ids).ok())
            .map_or(1, |ids| ids.len().max(1) as u64);
        JobInfo {
            name: job.metadata.name.clone().unwrap_or_default(),
            state,
            active: status.and_then(|s| s.active).unwrap_or(0),
            succeeded: status.and_then(|s| s.succeeded).unwrap_or(0),
            failed: status.and_then(|s| s.failed).unwrap_or(0),
            completions: job.spec.as_ref().and_then(|s| s.completions).unwrap_or(1),
            events,
            created: job.metadata.creation_timestamp.as_ref().map(|t| t.0),
            failure,
            seen: 0,
        }
    }
}

/// A pod's phase, as the kubelet reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl Phase {
    fn parse(phase: Option<&str>) -> Phase {
        match phase {
            None | Some("Pending") => Phase::Pending,
            Some("Running") => Phase::Running,
            Some("Succeeded") => Phase::Succeeded,
            Some("Failed") => Phase::Failed,
            Some(_) => Phase::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }
}

/// One pod of the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInfo {
    pub name: String,
    /// The Job it belongs to.
    pub job: Option<String>,
    pub phase: Phase,
    pub node: Option<String>,
    /// Asks for the virtual node (`nodeSelector: type=virtual-kubelet`): how it is placed
    /// when its node is not known (no permission to read Nodes).
    pub wants_virtual: bool,
    /// Why it is waiting or how it ended, e.g. `ContainerCreating`, `Completed`, `Error`.
    pub reason: Option<String>,
    /// What went wrong, for a failed or stuck pod.
    pub failure: Option<String>,
    /// The first container, whose logs are shown.
    pub container: Option<String>,
    pub created: Option<jiff::Timestamp>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let labels = pod.metadata.labels.as_ref();
        let job = labels
            .and_then(|l| {
                l.get(JOB_NAME_LABEL)
                    .or_else(|| l.get(LEGACY_JOB_NAME_LABEL))
            })
            .cloned()
            .or_else(|| {
                pod.metadata
                    .owner_references
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .find(|owner| owner.kind == "Job")
                    .map(|owner| owner.name.clone())
            });
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = Phase::parse(status.and_then(|s| s.phase.as_deref()));
        let containers = status
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        let waiting = containers
            .iter()
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
            .find(|w| w.reason.is_some());
        // The first container that did not end well, else the first that ended.
        let terminated = containers
            .iter()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
            .max_by_key(|t| t.exit_code != 0);
        let reason = match phase {
            Phase::Succeeded | Phase::Failed => terminated
                .and_then(|t| t.reason.clone())
                .or_else(|| status.and_then(|s| s.reason.clone())),
            _ => waiting
                .and_then(|w| w.reason.clone())
                .or_else(|| status.and_then(|s| s.reason.clone())),
        };
        let failure = match phase {
            Phase::Failed => Some(match terminated {
                Some(t) => {
                    let what = format!(
                        "{} (exit {})",
                        t.reason.as_deref().unwrap_or("Error"),
                        t.exit_code
                    );
                    reason_message(
                        &what,
                        t.message
                            .as_deref()
                            .or(status.and_then(|s| s.message.as_deref())),
                    )
                }
                None => reason_message(
                    status.and_then(|s| s.reason.as_deref()).unwrap_or("Failed"),
                    status.and_then(|s| s.message.as_deref()),
                ),
            }),
            Phase::Pending | Phase::Running => waiting
                .filter(|w| STUCK_REASONS.contains(&w.reason.as_deref().unwrap_or_default()))
                .map(|w| {
                    reason_message(
                        w.reason.as_deref().unwrap_or_default(),
                        w.message.as_deref(),
                    )
                }),
            _ => None,
        };
        PodInfo {
            name: pod.metadata.name.clone().unwrap_or_default(),
            job,
            phase,
            node: spec.and_then(|s| s.node_name.clone()),
            wants_virtual: spec
                .and_then(|s| s.node_selector.as_ref())
                .and_then(|s| s.get(crate::render::NODE_TYPE_LABEL))
                .is_some_and(|v| v == crate::render::VIRTUAL_KUBELET_NODE_TYPE),
            reason,
            failure,
            container: spec
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone()),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }

    /// Pending or running: counted against the pipeline's parallelism.
    pub fn in_flight(&self) -> bool {
        matches!(self.phase, Phase::Pending | Phase::Running)
    }
}

/// Whether a node is a virtual-kubelet node: the `virtual-kubelet.io/provider` taint or the
/// `type=virtual-kubelet` label.
pub fn is_virtual_node(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|t| t.key == crate::render::VIRTUAL_KUBELET_TAINT);
    let labelled = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(crate::render::NODE_TYPE_LABEL))
        .is_some_and(|v| v == crate::render::VIRTUAL_KUBELET_NODE_TYPE);
    tainted || labelled
}

/// The Pipeline resource's readiness, from its `Ready` condition and pause annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelineState {
    Ready,
    Paused,
    Invalid,
    /// Valid, but not running: its engine could not start, or its source stopped for good
    /// (reasons `StartFailed`, `SourceFailed`); the controller keeps trying.
    Failing,
    /// No `Ready` condition yet (no controller has picked it up).
    Unknown,
}

impl PipelineState {
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Ready => "ready",
            PipelineState::Paused => "paused",
            PipelineState::Invalid => "invalid",
            PipelineState::Failing => "failing",
            PipelineState::Unknown => "unknown",
        }
    }
}

/// What the Pipeline resource says.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineInfo {
    pub state: PipelineState,
    pub status: PipelineStatus,
}

impl PipelineInfo {
    /// From the resource's `status` (any JSON; unknown fields are ignored) and whether its
    /// pause annotation is set.
    pub fn from_parts(status: Option<&serde_json::Value>, paused_annotation: bool) -> PipelineInfo {
        let parsed = status.and_then(|s| serde_json::from_value(s.clone()).ok());
        // A condition another writer left incomplete must not hide the counts.
        let counts: PipelineStatus = parsed
            .or_else(|| {
                let mut without = status?.clone();
                without.as_object_mut()?.remove("conditions");
                serde_json::from_value(without).ok()
            })
            .unwrap_or_default();
        let ready = status
            .and_then(|s| s.get("conditions")?.as_array())
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
        let field = |c: &serde_json::Value, name: &str| c[name].as_str().unwrap_or("").to_string();
        let state = match ready.map(|c| (field(c, "status"), field(c, "reason"))) {
            Some((ready, _)) if ready == "True" => PipelineState::Ready,
            Some((_, reason)) if reason == "Invalid" => PipelineState::Invalid,
            Some((_, reason)) if reason == "Paused" => PipelineState::Paused,
            Some((_, reason)) if reason == "StartFailed" || reason == "SourceFailed" => {
                PipelineState::Failing
            }
            _ if paused_annotation => PipelineState::Paused,
            _ => PipelineState::Unknown,
        };
        PipelineInfo {
            state,
            status: counts,
        }
    }
}

/// Whether the Pipeline resource exists.
#[derive(Debug, Clone, PartialEq)]
pub enum PipelineView {
    /// Not asked yet.
    Unknown,
    /// No such resource (the pipeline runs from a file, or the CRD is not installed).
    Missing,
    Found(PipelineInfo),
}

/// A failure worth showing: a failed pod, a stuck pod, a failed Job, the Pipeline's lastError.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// Increases by one per failure, for views to print each once.
    #[serde(skip)]
    pub seq: u64,
    pub time: jiff::Timestamp,
    /// `pod/NAME`, `job/NAME` or `pipeline/NAME`.
    pub object: String,
    /// Reason and message, e.g. `Error (exit 1): out of memory`.
    pub message: String,
}

/// Cumulative counts of objects that were deleted (TTL, garbage collection).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Gone {
    jobs_succeeded: u64,
    jobs_failed: u64,
    pods_succeeded: u64,
    pods_failed: u64,
}

/// Everything a view prints, with stable field names (the `--output json` record).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Whether the Pipeline resource exists; `null` until it was asked for.
    pub pipeline_found: Option<bool>,
    /// `ready`, `paused`, `invalid` or `unknown`; `null` without a Pipeline resource.
    pub state: Option<PipelineState>,
    /// Events taken from the source (Pipeline status `received`).
    pub received: Option<i64>,
    /// Events waiting for or in a Job (Pipeline status `pending`).
    pub queued: Option<i64>,
    /// Messages the source still holds for the pipeline (Pipeline status `sourceLag`): `null`
    /// without a Pipeline resource, or when the source cannot tell.
    pub source_lag: Option<i64>,
    /// Events sent to the dead-letter sink (Pipeline status `deadLettered`).
    pub dead_lettered: Option<i64>,
    /// The Pipeline status' `lastError`.
    pub last_error: Option<String>,
    /// Jobs without a `Complete` or `Failed` condition.
    pub jobs_active: u64,
    /// Jobs that completed since the watch started (deleted ones included).
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub pods_pending: u64,
    pub pods_running: u64,
    /// Pods that succeeded since the watch started (deleted ones included).
    pub pods_succeeded: u64,
    pub pods_failed: u64,
    /// Pending or running pods on virtual-kubelet nodes.
    #[serde(rename = "virtual")]
    pub virtual_: u64,
    /// Pending or running pods on regular nodes.
    pub regular: u64,
    /// Pending pods not yet bound to a node.
    pub unscheduled: u64,
    /// Pending or running pods per node.
    pub nodes: BTreeMap<String, u64>,
}

impl Counts {
    /// Pods pending or running.
    pub fn in_flight(&self) -> u64 {
        self.pods_pending + self.pods_running
    }
}

/// Per-second rates over [`RATE_WINDOW`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Events received per second: from the Pipeline's `received`, else the events of the
    /// Jobs created.
    pub events_per_second: f64,
    /// Jobs created per second.
    pub jobs_per_second: f64,
}

/// A per-second rate over a sliding window of timestamped amounts.
#[derive(Debug, Clone, Default)]
struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
    since: Option<Instant>,
}

impl RateWindow {
    fn start(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    fn add(&mut self, now: Instant, amount: u64) {
        if amount > 0 {
            self.samples.push_back((now, amount));
        }
        self.prune(now);
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.samples.front() {
            if now.saturating_duration_since(at) > RATE_WINDOW {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    fn per_second(&self, now: Instant) -> f64 {
        let Some(since) = self.since else {
            return 0.0;
        };
        let total: u64 = self
            .samples
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= RATE_WINDOW)
            .map(|(_, amount)| amount)
            .sum();
        // Averaged over the window, or over the time watched when shorter (at least 1s, so
        // the first second does not read as a huge rate).
        let span = now
            .saturating_duration_since(since)
            .clamp(Duration::from_secs(1), RATE_WINDOW);
        total as f64 / span.as_secs_f64()
    }
}

/// The pipeline as seen through the API.
#[derive(Debug, Clone)]
pub struct Model {
    pub namespace: String,
    pub pipeline_name: String,
    jobs: BTreeMap<String, JobInfo>,
    /// Jobs seen so far, for [`JobInfo::seen`].
    jobs_ordered: u64,
    pods: BTreeMap<String, PodInfo>,
    /// Node name → virtual.
    nodes: BTreeMap<String, bool>,
    pub pipeline: PipelineView,
    gone: Gone,
    /// The first list of Jobs / pods is in.
    pub jobs_synced: bool,
    pub pods_synced: bool,
    /// At least one Job of the pipeline was seen.
    pub jobs_seen: bool,
    history: VecDeque<(Instant, u64)>,
    pub peak: u64,
    started: Instant,
    job_rate: RateWindow,
    event_rate: RateWindow,
    last_received: Option<i64>,
    failures: VecDeque<Failure>,
    failure_keys: HashSet<String>,
    next_seq: u64,
    /// Problems of the watch itself (a denied list, the missing Pipeline), newest last.
    notes: Vec<(u64, String)>,
}

impl Model {
    pub fn new(namespace: &str, pipeline: &str, now: Instant) -> Model {
        Model {
            namespace: namespace.to_string(),
            pipeline_name: pipeline.to_string(),
            jobs: BTreeMap::new(),
            jobs_ordered: 0,
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            pipeline: PipelineView::Unknown,
            gone: Gone::default(),
            jobs_synced: false,
            pods_synced: false,
            jobs_seen: false,
            history: VecDeque::new(),
            peak: 0,
            started: now,
            job_rate: RateWindow::default(),
            event_rate: RateWindow::default(),
            last_received: None,
            failures: VecDeque::new(),
            failure_keys: HashSet::new(),
            next_seq: 1,
            notes: Vec::new(),
        }
    }

    // ----- Jobs -----

    /// A Job was created or changed.
    pub fn apply_job(&mut self, job: &Job, now: Instant) {
        self.jobs_seen = true;
        let mut info = JobInfo::from_job(job);
        match self.jobs.get(&info.name) {
            Some(known) => info.seen = known.seen,
            None => {
                self.jobs_ordered += 1;
                info.seen = self.jobs_ordered;
                if self.jobs_synced {
                    self.job_created(&info, now);
                }
            }
        }
        self.job_failure(&info, now);
        self.jobs.insert(info.name.clone(), info);
    }

    /// A Job was deleted: its outcome stays counted.
    pub fn delete_job(&mut self, name: &str) {
        if let Some(info) = self.jobs.remove(name) {
            match info.state {
                JobState::Succeeded => self.gone.jobs_succeeded += 1,
                JobState::Failed => self.gone.jobs_failed += 1,
                JobState::Active => {}
            }
        }
    }

    /// The complete list of Jobs (the watch's initial list, or a re-list after it lost
    /// track): Jobs no longer in it were deleted meanwhile.
    pub fn relist_jobs(&mut self, jobs: &[Job], now: Instant) {
        let listed: HashSet<String> = jobs
            .iter()
            .filter_map(|j| j.metadata.name.clone())
            .collect();
        let missing: Vec<String> = self
            .jobs
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        for name in missing {
            self.delete_job(&name);
        }
        for job in jobs {
            self.apply_job(job, now);
        }
        if !self.jobs_synced {
            self.jobs_synced = true;
            self.job_rate.start(now);
            if !matches!(self.pipeline, PipelineView::Found(_)) {
                self.event_rate.start(now);
            }
        }
    }

    fn job_created(&mut self, info: &JobInfo, now: Instant) {
        self.job_rate.add(now, 1);
        if !matches!(self.pipeline, PipelineView::Found(_)) {
            self.event_rate.add(now, info.events);
        }
    }

    fn job_failure(&mut self, info: &JobInfo, _now: Instant) {
        if let Some(message) = &info.failure {
            self.failure(format!("job/{}", info.name), message.clone());
        }
    }

    /// Jobs that exist now, newest first.
    pub fn jobs(&self) -> Vec<&JobInfo> {
        let mut jobs: Vec<&JobInfo> = self.jobs.values().collect();
        jobs.sort_by(|a, b| b.created.cmp(&a.created).then(b.seen.cmp(&a.seen)));
        jobs
    }

    pub fn job(&self, name: &str) -> Option<&JobInfo> {
        self.jobs.get(name)
    }

    // ----- Pods -----

    pub fn apply_pod(&mut self, pod: &Pod) {
        let info = PodInfo::from_pod(pod);
        if let Some(message) = &info.failure {
            self.failure(format!("pod/{}", info.name), message.clone());
        }
        self.pods.insert(info.name.clone(), info);
    }

    /// A pod was deleted: a finished one stays counted.
    pub fn delete_pod(&mut self, name: &str) {
        if let Some(info) = self.pods.remove(name) {
            match info.phase {
                Phase::Succeeded => self.gone.pods_succeeded += 1,
                Phase::Failed => self.gone.pods_failed += 1,
                _ => {}
            }
        }
    }

    pub fn relist_pods(&mut self, pods: &[Pod]) {
        let listed: HashSet<String> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let missing: Vec<String> = self
            .pods
            .keys()
            .filter(|name| !listed.contains(*name))
            .cloned()
            .collect();
        for name in missing {
            self.delete_pod(&name);
        }
        for pod in pods {
            self.apply_pod(pod);
        }
        self.pods_synced = true;
    }

    /// The pods of `job`, oldest first.
    pub fn pods_of(&self, job: &str) -> Vec<&PodInfo> {
        let mut pods: Vec<&PodInfo> = self
            .pods
            .values()
            .filter(|p| p.job.as_deref() == Some(job))
            .collect();
        pods.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)));
        pods
    }

    // ----- Nodes -----

    pub fn apply_node(&mut self, node: &Node) {
        if let Some(name) = &node.metadata.name {
            self.nodes.insert(name.clone(), is_virtual_node(node));
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn relist_nodes(&mut self, nodes: &[Node]) {
        self.nodes.clear();
        for node in nodes {
            self.apply_node(node);
        }
    }

    /// Whether `node` is virtual: from the Node when known, else from what the pod asked for.
    fn node_is_virtual(&self, pod: &PodInfo, node: &str) -> bool {
        self.nodes.get(node).copied().unwrap_or(pod.wants_virtual)
    }

    /// Nodes known, with whether each is virtual.
    pub fn nodes(&self) -> &BTreeMap<String, bool> {
        &self.nodes
    }

    // ----- Pipeline -----

    /// The result of asking for the Pipeline resource.
    pub fn set_pipeline(&mut self, view: PipelineView, now: Instant) {
        if let PipelineView::Found(info) = &view {
            let received = info.status.received;
            match self.last_received {
                // The first reading starts the rate; a decrease is a controller restart.
                None => self.event_rate.start(now),
                Some(before) if received > before => {
                    self.event_rate.add(now, (received - before) as u64)
                }
                Some(_) => {}
            }
            self.last_received = Some(received);
            if let Some(error) = &info.status.last_error {
                self.failure(format!("pipeline/{}", self.pipeline_name), error.clone());
            }
        }
        if view == PipelineView::Missing && self.pipeline == PipelineView::Unknown {
            self.note(format!(
                "no Pipeline resource {} in namespace {} (run from a file with `spate run -f`?): showing Jobs and pods only",
                self.pipeline_name, self.namespace
            ));
        }
        self.pipeline = view;
    }

    // ----- Failures and notes -----

    fn failure(&mut self, object: String, message: String) {
        let key = format!("{object}\n{message}");
        if !self.failure_keys.insert(key) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.failures.push_back(Failure {
            seq,
            time: jiff::Timestamp::now(),
            object,
            message,
        });
        while self.failures.len() > FAILURES_KEPT {
            self.failures.pop_front();
        }
    }

    /// Failures kept, oldest first.
    pub fn failures(&self) -> impl DoubleEndedIterator<Item = &Failure> {
        self.failures.iter()
    }

    /// Failures newer than `seq`.
    pub fn failures_after(&self, seq: u64) -> impl Iterator<Item = &Failure> {
        self.failures.iter().filter(move |f| f.seq > seq)
    }

    /// Records a problem of the watch itself, once per distinct text.
    pub fn note(&mut self, message: String) {
        if self.notes.iter().any(|(_, m)| *m == message) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.notes.push((seq, message));
    }

    pub fn notes_after(&self, seq: u64) -> impl Iterator<Item = &(u64, String)> {
        self.notes.iter().filter(move |(s, _)| *s > seq)
    }

    pub fn last_note(&self) -> Option<&str> {
        self.notes.last().map(|(_, m)| m.as_str())
    }

    // ----- What the views read -----

    pub fn counts(&self) -> Counts {
        let mut counts = Counts {
            jobs_succeeded: self.gone.jobs_succeeded,
            jobs_failed: self.gone.jobs_failed,
            pods_succeeded: self.gone.pods_succeeded,
            pods_failed: self.gone.pods_failed,
            ..Counts::default()
        };
        match &self.pipeline {
            PipelineView::Unknown => {}
            PipelineView::Missing => counts.pipeline_found = Some(false),
            PipelineView::Found(info) => {
                counts.pipeline_found = Some(true);
                counts.state = Some(info.state);
                counts.received = Some(info.status.received);
                counts.queued = Some(info.status.pending);
                counts.source_lag = info.status.source_lag;
                counts.dead_lettered = Some(info.status.dead_lettered);
                counts.last_error = info.status.last_error.clone();
            }
        }
        for job in self.jobs.values() {
            match job.state {
                JobState::Active => counts.jobs_active += 1,
                JobState::Succeeded => counts.jobs_succeeded += 1,
                JobState::Failed => counts.jobs_failed += 1,
            }
        }
        for pod in self.pods.values() {
            match pod.phase {
                Phase::Pending => counts.pods_pending += 1,
                Phase::Running => counts.pods_running += 1,
                Phase::Succeeded => counts.pods_succeeded += 1,
                Phase::Failed => counts.pods_failed += 1,
                Phase::Unknown => {}
            }
            if !pod.in_flight() {
                continue;
            }
            match &pod.node {
                None => counts.unscheduled += 1,
                Some(node) => {
                    *counts.nodes.entry(node.clone()).or_default() += 1;
                    if self.node_is_virtual(pod, node) {
                        counts.virtual_ += 1;
                    } else {
                        counts.regular += 1;
                    }
                }
            }
        }
        counts
    }

    pub fn rates(&self, now: Instant) -> Rates {
        Rates {
            events_per_second: self.event_rate.per_second(now),
            jobs_per_second: self.job_rate.per_second(now),
        }
    }

    /// Records the pods in flight now, for the chart.
    pub fn sample(&mut self, now: Instant) {
        let in_flight = self.counts().in_flight();
        self.peak = self.peak.max(in_flight);
        match self.history.back_mut() {
            Some((at, value)) if now.saturating_duration_since(*at) < SAMPLE_EVERY => {
                *value = (*value).max(in_flight);
            }
            _ => self.history.push_back((now, in_flight)),
        }
        while let Some(&(at, _)) = self.history.front() {
            if now.saturating_duration_since(at) > HISTORY {
                self.history.pop_front();
            } else {
                break;
            }
        }
    }

    /// `(seconds since the watch started, pods in flight)`, oldest first.
    pub fn history(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.history.iter().map(|(at, value)| {
            (
                at.saturating_duration_since(self.started).as_secs_f64(),
                *value,
            )
        })
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Ready to show: both watches listed once and the Pipeline was asked for.
    pub fn synced(&self) -> bool {
        self.jobs_synced && self.pods_synced && self.pipeline != PipelineView::Unknown
    }

    /// Nothing left to do: Jobs were seen, none is active, no pod is pending or running, and
    /// the Pipeline (if any) has no queued events and its source holds none (as far as the
    /// source can tell).
    pub fn idle(&self) -> bool {
        let counts = self.counts();
        self.synced()
            && self.jobs_seen
            && counts.jobs_active == 0
            && counts.in_flight() == 0
            && counts.queued.unwrap_or(0) == 0
            && counts.source_lag.unwrap_or(0) == 0
    }
}

fn reason_message(reason: &str, message: Option<&str>) -> String {
    match message.map(str::trim).filter(|m| !m.is_empty()) {
        Some(message) => format!("{reason}: {message}"),
        None => reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(name: &str, conditions: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "annotations": {"spate.dev/event-ids": "[\"a\",\"b\"]"},
                "labels": {"spate.dev/pipeline": "p"}
            },
            "spec": {"template": {"spec": {"containers": []}}},
            "status": {"active": 1, "conditions": conditions}
        }))
        .unwrap()
    }

    fn pod(name: &str, job: &str, phase: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"batch.kubernetes.io/job-name": job}},
            "spec": {"nodeName": node, "containers": [{"name": "work"}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn node(name: &str, taint: bool, label: bool) -> Node {
        let taints = if taint {
            json!([{"key": "virtual-kubelet.io/provider", "value": "azure", "effect": "NoSchedule"}])
        } else {
            json!([])
        };
        let labels = if label {
            json!({"type": "virtual-kubelet"})
        } else {
            json!({"kubernetes.io/hostname": name})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints}
        }))
        .unwrap()
    }

    fn complete() -> serde_json::Value {
        json!([{"type": "Complete", "status": "True"}])
    }

    fn failed() -> serde_json::Value {
        json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit"}])
    }

    #[test]
    fn job_states_come_from_conditions() {
        assert_eq!(
            JobInfo::from_job(&job("a", json!([]))).state,
            JobState::Active
        );
        assert_eq!(
            JobInfo::from_job(&job("a", complete())).state,
            JobState::Succeeded
        );
        let failed = JobInfo::from_job(&job("a", failed()));
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(
            failed.failure.as_deref(),
            Some("BackoffLimitExceeded: Job has reached the specified backoff limit")
        );
        // A condition that is not True does not count.
        let pending = json!([{"type": "Complete", "status": "False"}]);
        assert_eq!(
            JobInfo::from_job(&job("a", pending)).state,
            JobState::Active
        );
        assert_eq!(JobInfo::from_job(&job("a", json!([]))).events, 2);
    }

    #[test]
    fn counts_jobs_and_pods_and_keeps_deleted_outcomes() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        model.relist_jobs(&[job("a", json!([])), job("b", complete())], now);
        model.apply_job(&job("c", failed()), now);
        model.relist_pods(&[
            pod("a-1", "a", "Running", Some("v")),
            pod("a-2", "a", "Pending", None),
            pod("b-1", "b", "Succeeded", Some("v")),
            pod("c-1", "c", "Failed", Some("r")),
        ]);
        let counts = model.counts();
        assert_eq!(
            (
                counts.jobs_active,
                counts.jobs_succeeded,
                counts.jobs_failed
            ),
            (1, 1, 1)
        );
        assert_eq!(
            (
                counts.pods_pending,
                counts.pods_running,
                counts.pods_succeeded,
                counts.pods_failed
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(counts.in_flight(), 2);
        assert_eq!(counts.unscheduled, 1);

        // TTL deletes the finished Job and its pod: still counted.
        model.delete_job("b");
        model.delete_pod("b-1");
        let after = model.counts();
        assert_eq!(after.jobs_succeeded, 1);
        assert_eq!(after.pods_succeeded, 1);
        // An active Job deleted is not an outcome.
        model.delete_job("a");
        assert_eq!(model.counts().jobs_active, 0);
        assert_eq!(model.counts().jobs_succeeded, 1);
        // A re-list without "c" means it was deleted while the watch was away.
        model.relist_jobs(&[], now);
        assert_eq!(model.counts().jobs_failed, 1);
        assert!(model.job("c").is_none());
    }

    #[test]
    fn jobs_are_listed_newest_first() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        // Same creation second: the order they were seen in decides.
        model.relist_jobs(&[job("j-10", json!([])), job("j-2", json!([]))], now);
        model.apply_job(&job("j-3", json!([])), now);
        model.apply_job(&job("j-10", complete()), now);
        let mut older = job("j-0", json!([]));
        older.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2024-01-01T00:00:00Z".parse().unwrap(),
            ));
        model.apply_job(&older, now);
        let names: Vec<&str> = model.jobs().iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["j-3", "j-2", "j-10", "j-0"]);
    }

    #[test]
    fn pods_are_tied_to_their_jobs() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        let owned: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x-1", "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "x", "uid": "u"}]},
            "spec": {"containers": [{"name": "c"}]},
        }))
        .unwrap();
        model.apply_pod(&owned);
        model.apply_pod(&pod("y-1", "y", "Running", None));
        assert_eq!(model.pods_of("x")[0].name, "x-1");
        assert_eq!(model.pods_of("x")[0].phase, Phase::Pending);
        assert_eq!(model.pods_of("y")[0].container.as_deref(), Some("work"));
        assert!(model.pods_of("z").is_empty());
    }

    #[test]
    fn placement_classifies_virtual_and_regular_nodes() {
        assert!(is_virtual_node(&node("aci", true, false)));
        assert!(is_virtual_node(&node("vk", false, true)));
        assert!(!is_virtual_node(&node("worker", false, false)));

        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        model.relist_nodes(&[node("aci", true, true), node("worker", false, false)]);
        model.relist_pods(&[
            pod("1", "j", "Running", Some("aci")),
            pod("2", "j", "Pending", Some("aci")),
            pod("3", "j", "Running", Some("worker")),
            // Finished pods are not placement.
            pod("4", "j", "Succeeded", Some("worker")),
        ]);
        let counts = model.counts();
        assert_eq!((counts.virtual_, counts.regular), (2, 1));
        assert_eq!(
            counts.nodes,
            BTreeMap::from([("aci".to_string(), 2), ("worker".to_string(), 1)])
        );

        // A node that cannot be read is placed by the pod's own node selector.
        let mut selected = pod("5", "j", "Running", Some("hidden"));
        selected.spec.as_mut().unwrap().node_selector = Some(BTreeMap::from([(
            "type".to_string(),
            "virtual-kubelet".to_string(),
        )]));
        model.apply_pod(&selected);
        model.apply_pod(&pod("6", "j", "Running", Some("other")));
        let counts = model.counts();
        assert_eq!((counts.virtual_, counts.regular), (3, 2));
    }

    #[test]
    fn failures_say_why_once() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        let oom: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x-1"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                         "message": "out of memory"}}}]}
        }))
        .unwrap();
        model.apply_pod(&oom);
        model.apply_pod(&oom);
        let stuck: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x-2"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ProviderFailed", "message": "quota exceeded"}}}]}
        }))
        .unwrap();
        model.apply_pod(&stuck);
        // Creating a container is not a failure.
        let creating: Pod = serde_json::from_value(json!({
            "metadata": {"name": "x-3"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ContainerCreating"}}}]}
        }))
        .unwrap();
        model.apply_pod(&creating);
        model.apply_job(&job("x", failed()), now);
        model.set_pipeline(
            PipelineView::Found(PipelineInfo::from_parts(
                Some(&json!({"lastError": "event 7: no such key"})),
                false,
            )),
            now,
        );
        let failures: Vec<(String, String)> = model
            .failures()
            .map(|f| (f.object.clone(), f.message.clone()))
            .collect();
        assert_eq!(
            failures,
            vec![
                (
                    "pod/x-1".to_string(),
                    "OOMKilled (exit 137): out of memory".to_string()
                ),
                (
                    "pod/x-2".to_string(),
                    "ProviderFailed: quota exceeded".to_string()
                ),
                (
                    "job/x".to_string(),
                    "BackoffLimitExceeded: Job has reached the specified backoff limit".to_string()
                ),
                ("pipeline/p".to_string(), "event 7: no such key".to_string()),
            ]
        );
        let second = model.failures().nth(1).unwrap().seq;
        assert_eq!(model.failures_after(second).count(), 2);
    }

    #[test]
    fn pipeline_state_and_status() {
        let ready = PipelineInfo::from_parts(
            Some(
                &json!({"received": 200, "pending": 40, "deadLettered": 2, "sourceLag": 1234,
                         "extra": 1,
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                            "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
            ),
            false,
        );
        assert_eq!(ready.state, PipelineState::Ready);
        assert_eq!(ready.status.received, 200);
        let paused = PipelineInfo::from_parts(
            Some(
                &json!({"conditions": [{"type": "Ready", "status": "False", "reason": "Paused",
                "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
            ),
            true,
        );
        assert_eq!(paused.state, PipelineState::Paused);
        let failing = PipelineInfo::from_parts(
            Some(
                &json!({"conditions": [{"type": "Ready", "status": "False", "reason": "SourceFailed",
                "message": "queue q: NOT_FOUND", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
            ),
            false,
        );
        assert_eq!(failing.state, PipelineState::Failing);
        assert_eq!(
            PipelineInfo::from_parts(None, true).state,
            PipelineState::Paused
        );
        assert_eq!(
            PipelineInfo::from_parts(None, false).state,
            PipelineState::Unknown
        );
        // A condition missing required fields does not hide the counts.
        let partial = PipelineInfo::from_parts(
            Some(&json!({"received": 5, "conditions": [{"type": "Ready", "status": "True"}]})),
            false,
        );
        assert_eq!(
            (partial.state, partial.status.received),
            (PipelineState::Ready, 5)
        );

        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        assert_eq!(model.counts().pipeline_found, None);
        model.set_pipeline(PipelineView::Found(ready), now);
        let counts = model.counts();
        assert_eq!(counts.pipeline_found, Some(true));
        assert_eq!(
            (
                counts.received,
                counts.queued,
                counts.dead_lettered,
                counts.source_lag
            ),
            (Some(200), Some(40), Some(2), Some(1234))
        );
        assert_eq!(counts.state, Some(PipelineState::Ready));
        // A source that cannot tell its lag leaves it unknown, not zero.
        model.set_pipeline(
            PipelineView::Found(PipelineInfo::from_parts(
                Some(&json!({"received": 200})),
                false,
            )),
            now,
        );
        assert_eq!(model.counts().source_lag, None);
    }

    #[test]
    fn a_missing_pipeline_is_noted_once() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        model.set_pipeline(PipelineView::Missing, now);
        model.set_pipeline(PipelineView::Missing, now);
        assert_eq!(model.notes_after(0).count(), 1);
        assert!(
            model
                .last_note()
                .unwrap()
                .contains("no Pipeline resource p")
        );
        assert_eq!(model.counts().pipeline_found, Some(false));
        assert_eq!(model.counts().received, None);
    }

    #[test]
    fn rates_are_per_second_over_a_sliding_window() {
        let start = Instant::now();
        let mut model = Model::new("default", "p", start);
        model.relist_jobs(&[job("old", complete())], start);
        // Jobs in the first list are not "created" while watched.
        assert_eq!(model.rates(start).jobs_per_second, 0.0);
        for i in 0..20 {
            let at = start + Duration::from_millis(100 * i);
            model.apply_job(&job(&format!("j{i}"), json!([])), at);
            // A change to a known Job is not a creation.
            model.apply_job(&job(&format!("j{i}"), complete()), at);
        }
        let at = start + Duration::from_secs(2);
        let rates = model.rates(at);
        assert!((rates.jobs_per_second - 10.0).abs() < 1e-9, "{rates:?}");
        // Without a Pipeline resource, events come from the Jobs' event ids (2 each).
        assert!((rates.events_per_second - 20.0).abs() < 1e-9, "{rates:?}");
        // Once the window has passed, the rate falls back to zero.
        let later = start + Duration::from_secs(20);
        assert_eq!(model.rates(later).jobs_per_second, 0.0);

        // With a Pipeline, events come from its received counter.
        let mut model = Model::new("default", "p", start);
        let status = |received: i64| {
            PipelineView::Found(PipelineInfo::from_parts(
                Some(&json!({"received": received})),
                false,
            ))
        };
        model.set_pipeline(status(100), start);
        model.set_pipeline(status(130), start + Duration::from_secs(1));
        model.set_pipeline(status(150), start + Duration::from_secs(2));
        let rates = model.rates(start + Duration::from_secs(5));
        assert!((rates.events_per_second - 10.0).abs() < 1e-9, "{rates:?}");
        // A restarted controller starts again from zero: not a negative rate.
        model.set_pipeline(status(0), start + Duration::from_secs(6));
        assert!(
            model
                .rates(start + Duration::from_secs(6))
                .events_per_second
                > 0.0
        );
    }

    #[test]
    fn change_detection_and_idle() {
        let now = Instant::now();
        let mut model = Model::new("default", "p", now);
        assert!(!model.idle(), "nothing seen yet");
        model.relist_jobs(&[], now);
        model.relist_pods(&[]);
        model.set_pipeline(PipelineView::Missing, now);
        assert!(model.synced());
        assert!(!model.idle(), "no Job seen yet");
        let before = model.counts();
        model.apply_job(&job("a", json!([])), now);
        model.apply_pod(&pod("a-1", "a", "Running", Some("v")));
        assert_ne!(model.counts(), before);
        assert!(!model.idle());
        let same = model.counts();
        // The same object again is no change.
        model.apply_pod(&pod("a-1", "a", "Running", Some("v")));
        assert_eq!(model.counts(), same);
        model.apply_pod(&pod("a-1", "a", "Succeeded", Some("v")));
        model.apply_job(&job("a", complete()), now);
        assert!(model.idle());
        // Queued events keep a pipeline busy.
        model.set_pipeline(
            PipelineView::Found(PipelineInfo::from_parts(
                Some(&json!({"pending": 3})),
                false,
            )),
            now,
        );
        assert!(!model.idle());
        // So do messages the source still holds; a lag the source cannot tell does not.
        let status = |status: serde_json::Value| {
            PipelineView::Found(PipelineInfo::from_parts(Some(&status), false))
        };
        model.set_pipeline(status(json!({"pending": 0, "sourceLag": 5})), now);
        assert!(!model.idle());
        model.set_pipeline(status(json!({"pending": 0, "sourceLag": 0})), now);
        assert!(model.idle());
        model.set_pipeline(status(json!({"pending": 0})), now);
        assert!(model.idle());
    }

    #[test]
    fn history_records_the_burst_and_the_fall() {
        let start = Instant::now();
        let mut model = Model::new("default", "p", start);
        model.relist_pods(&[]);
        model.sample(start);
        for i in 0..5 {
            model.apply_pod(&pod(&format!("p{i}"), "j", "Running", None));
        }
        model.sample(start + Duration::from_secs(1));
        // Samples closer than SAMPLE_EVERY merge, keeping the highest.
        model.sample(start + Duration::from_millis(1100));
        for i in 0..5 {
            model.apply_pod(&pod(&format!("p{i}"), "j", "Succeeded", None));
        }
        model.sample(start + Duration::from_secs(2));
        let values: Vec<u64> = model.history().map(|(_, v)| v).collect();
        assert_eq!(values, vec![0, 5, 0]);
        assert_eq!(model.peak, 5);
    }
}
