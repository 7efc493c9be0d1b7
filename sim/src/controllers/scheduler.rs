//! The scheduler: binds pods that have no node to the best feasible node, as kube-scheduler
//! does for what Spate relies on.
//!
//! Filters (node readiness, `spec.unschedulable`, taints and tolerations, `nodeSelector`,
//! required node affinity, CPU/memory/pod-count fit) and scores (preferred node affinity, then
//! least allocated) are pure functions over API objects. The loop around them keeps reflectors
//! of Nodes, of assigned pods (for what each node already carries) and of unassigned pods (the
//! queue), binds through `pods/binding`, and marks pods no node fits `PodScheduled=False` /
//! `Unschedulable` with a `FailedScheduling` event (once per distinct message), retrying them
//! when a node changes or a pod on a node stops. Successful binds record no `Scheduled`
//! event: in a burst that would double the API writes per pod for little information.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{
    Binding, Node, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference, Pod, PodCondition,
    Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use super::events::{self, Reporter};
use super::resources::{Resources, node_allocatable, pod_requests};
use super::retry::{has_code, retry};

/// The scheduler name pods get by default; pods naming another scheduler are left alone.
const DEFAULT_SCHEDULER: &str = "default-scheduler";
/// Pods decided per pass, so watch events keep flowing during a large burst.
const BATCH: usize = 512;
/// Binds and status writes in flight at once.
const WRITES_IN_FLIGHT: usize = 32;
/// Coalesces the retries of unschedulable pods that a stream of cluster changes triggers.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a bound pod counts against its node before the assigned-pod watch reports it.
const ASSUME_TTL: Duration = Duration::from_secs(30);

/// Why a node cannot take a pod, worded as kube-scheduler words it.
fn taint_reason(taint: &Taint) -> String {
    format!(
        "node(s) had untolerated taint {{{}: {}}}",
        taint.key,
        taint.value.as_deref().unwrap_or_default()
    )
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Whether `toleration` tolerates `taint` (key, operator `Exists`/`Equal`, value and effect).
pub(crate) fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_matches = toleration
        .effect
        .as_deref()
        .is_none_or(|effect| effect.is_empty() || effect == taint.effect);
    if !effect_matches {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    let exists = toleration.operator.as_deref() == Some("Exists");
    if key.is_empty() {
        // An empty key with `Exists` matches every taint; with `Equal` it matches nothing.
        return exists;
    }
    if key != taint.key {
        return false;
    }
    exists
        || toleration.value.as_deref().unwrap_or_default()
            == taint.value.as_deref().unwrap_or_default()
}

fn untolerated<'a>(pod: &Pod, node: &'a Node, effects: &[&str]) -> Vec<&'a Taint> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|taint| effects.contains(&taint.effect.as_str()))
        .filter(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
        .collect()
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let as_int = |text: &str| text.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|candidate| candidate == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|candidate| candidate == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(actual), Some(bound)) = (
                value.and_then(as_int),
                values.first().and_then(|v| as_int(v)),
            ) else {
                return false;
            };
            if requirement.operator == "Gt" {
                actual > bound
            } else {
                actual < bound
            }
        }
        _ => false,
    }
}

/// Whether `node` satisfies one node selector term (its expressions and fields all hold).
pub(crate) fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        // An empty term selects no node, per the API's definition.
        return false;
    }
    let labels = node.labels();
    let name = node.name_any();
    expressions
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = (r.key == "metadata.name").then_some(name.as_str());
            requirement_matches(r, value)
        })
}

fn node_affinity(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::NodeAffinity> {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
}

/// `nodeSelector` and required node affinity (terms are ORed).
pub(crate) fn matches_node_selection(pod: &Pod, node: &Node) -> bool {
    let labels = node.labels();
    let selector_ok = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .is_none_or(|selector| {
            selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
        });
    let required = node_affinity(pod).and_then(|a| {
        a.required_during_scheduling_ignored_during_execution
            .as_ref()
    });
    selector_ok
        && required.is_none_or(|required| {
            required
                .node_selector_terms
                .iter()
                .any(|term| term_matches(term, node))
        })
}

/// Runs every filter; `Err` carries the reasons the node was rejected.
pub(crate) fn filter(pod: &Pod, node: &Node, in_use: Resources) -> Result<(), Vec<String>> {
    if !is_ready(node) {
        return Err(vec!["node(s) were not ready".to_owned()]);
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Err(vec!["node(s) were unschedulable".to_owned()]);
    }
    if let Some(taint) = untolerated(pod, node, &["NoSchedule", "NoExecute"]).first() {
        return Err(vec![taint_reason(taint)]);
    }
    if !matches_node_selection(pod, node) {
        return Err(vec![
            "node(s) didn't match Pod's node affinity/selector".to_owned(),
        ]);
    }
    let allocatable = node_allocatable(node);
    let wanted = pod_requests(pod);
    let mut reasons = Vec::new();
    if in_use.pods + wanted.pods > allocatable.pods {
        reasons.push("Too many pods".to_owned());
    }
    if wanted.cpu > 0 && in_use.cpu + wanted.cpu > allocatable.cpu {
        reasons.push("Insufficient cpu".to_owned());
    }
    if wanted.memory > 0 && in_use.memory + wanted.memory > allocatable.memory {
        reasons.push("Insufficient memory".to_owned());
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

/// Ranks a feasible node: preferred node affinity weights dominate (so `burst` placement
/// fills regular nodes before overflowing), untolerated `PreferNoSchedule` taints count
/// against, and the least allocated node wins among equals.
pub(crate) fn score(pod: &Pod, node: &Node, in_use: Resources) -> i64 {
    let preferred: i64 = node_affinity(pod)
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|terms| {
            terms
                .iter()
                .filter(|t| term_matches(&t.preference, node))
                .map(|t| i64::from(t.weight))
                .sum()
        })
        .unwrap_or(0);
    let avoided = untolerated(pod, node, &["PreferNoSchedule"]).len() as i64;
    let allocatable = node_allocatable(node);
    let mut after = in_use;
    after += pod_requests(pod);
    let free_share = |total: i128, used: i128| -> i64 {
        if total <= 0 {
            0
        } else {
            i64::try_from(((total - used).max(0) * 100) / total).unwrap_or(0)
        }
    };
    let least_allocated =
        (free_share(allocatable.cpu, after.cpu) + free_share(allocatable.memory, after.memory)) / 2;
    preferred * 1_000 - avoided * 200 + least_allocated
}

/// The `PodScheduled=False` message: `0/3 nodes are available: 1 ..., 2 ....`
pub(crate) fn unschedulable_message(node_count: usize, rejections: &[Vec<String>]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in rejections.iter().flatten() {
        *counts.entry(reason.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return format!("0/{node_count} nodes are available.");
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{count} {reason}"))
        .collect();
    format!("0/{node_count} nodes are available: {}.", parts.join(", "))
}

/// The outcome of scheduling one pod against the current cluster.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    Bind(String),
    Unschedulable(String),
}

/// Picks the node for `pod` given each node's current usage. Ties go to the first name, so
/// placements are reproducible.
pub(crate) fn place<'a>(
    pod: &Pod,
    nodes: impl IntoIterator<Item = &'a Node>,
    usage: &HashMap<String, Resources>,
) -> Placement {
    let mut best: Option<(i64, String)> = None;
    let mut rejections = Vec::new();
    let mut count = 0;
    for node in nodes {
        count += 1;
        let name = node.name_any();
        let in_use = usage.get(&name).copied().unwrap_or_default();
        match filter(pod, node, in_use) {
            Ok(()) => {
                let score = score(pod, node, in_use);
                let better = best.as_ref().is_none_or(|(best_score, best_name)| {
                    score > *best_score || (score == *best_score && name < *best_name)
                });
                if better {
                    best = Some((score, name));
                }
            }
            Err(reasons) => rejections.push(reasons),
        }
    }
    match best {
        Some((_, name)) => Placement::Bind(name),
        None => Placement::Unschedulable(unschedulable_message(count, &rejections)),
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn wants_this_scheduler(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().unwrap_or_default().is_empty())
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|name| name == DEFAULT_SCHEDULER)
        && pod.metadata.deletion_timestamp.is_none()
}

fn scheduled_condition(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
}

/// A write the scheduler decided on in one pass.
enum Write {
    Bind {
        pod: ObjectRef<Pod>,
        node: String,
    },
    MarkUnschedulable {
        pod: Arc<Pod>,
        message: String,
        conditions: Vec<PodCondition>,
    },
}

/// The scheduling loop's state: what is queued, what waits for the cluster to change, and
/// which binds the assigned-pod watch has not reported yet.
struct Scheduler {
    client: kube::Client,
    nodes: Store<Node>,
    assigned: Store<Pod>,
    unassigned: Store<Pod>,
    queue: VecDeque<ObjectRef<Pod>>,
    queued: HashSet<ObjectRef<Pod>>,
    unschedulable: HashSet<ObjectRef<Pod>>,
    assumed: HashMap<String, (String, Resources, Instant)>,
}

impl Scheduler {
    fn enqueue(&mut self, pod: ObjectRef<Pod>) {
        if self.queued.insert(pod.clone()) {
            self.queue.push_back(pod);
        }
    }

    fn retry_unschedulable(&mut self) {
        for pod in std::mem::take(&mut self.unschedulable) {
            self.enqueue(pod);
        }
    }

    /// What each node carries: its non-terminal assigned pods plus binds not yet observed.
    fn usage(&mut self) -> HashMap<String, Resources> {
        let mut usage: HashMap<String, Resources> = HashMap::new();
        let mut seen = HashSet::new();
        for pod in self.assigned.state() {
            if let Some(uid) = pod.uid() {
                seen.insert(uid);
            }
            if is_terminal(&pod) {
                continue;
            }
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                *usage.entry(node).or_default() += pod_requests(&pod);
            }
        }
        self.assumed
            .retain(|uid, (_, _, at)| !seen.contains(uid) && at.elapsed() < ASSUME_TTL);
        for (node, requests, _) in self.assumed.values() {
            *usage.entry(node.clone()).or_default() += *requests;
        }
        usage
    }

    /// Decides placements for up to [`BATCH`] queued pods, then performs the writes.
    async fn schedule_batch(&mut self) {
        let nodes = self.nodes.state();
        let mut usage = self.usage();
        let mut writes = Vec::new();
        for _ in 0..BATCH {
            let Some(key) = self.queue.pop_front() else {
                break;
            };
            self.queued.remove(&key);
            let Some(pod) = self.unassigned.get(&key) else {
                continue;
            };
            if !wants_this_scheduler(&pod) {
                continue;
            }
            match place(&pod, nodes.iter().map(AsRef::as_ref), &usage) {
                Placement::Bind(node) => {
                    let requests = pod_requests(&pod);
                    *usage.entry(node.clone()).or_default() += requests;
                    if let Some(uid) = pod.uid() {
                        self.assumed
                            .insert(uid, (node.clone(), requests, Instant::now()));
                    }
                    writes.push(Write::Bind { pod: key, node });
                }
                Placement::Unschedulable(message) => {
                    self.unschedulable.insert(key.clone());
                    let current = scheduled_condition(&pod);
                    let unchanged = current.is_some_and(|c| {
                        c.status == "False" && c.message.as_deref() == Some(message.as_str())
                    });
                    if !unchanged {
                        let mut conditions: Vec<PodCondition> = pod
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.clone())
                            .unwrap_or_default();
                        conditions.retain(|c| c.type_ != "PodScheduled");
                        conditions.push(PodCondition {
                            type_: "PodScheduled".to_owned(),
                            status: "False".to_owned(),
                            reason: Some("Unschedulable".to_owned()),
                            message: Some(message.clone()),
                            last_transition_time: Some(Time(jiff::Timestamp::now())),
                            ..PodCondition::default()
                        });
                        writes.push(Write::MarkUnschedulable {
                            pod,
                            message,
                            conditions,
                        });
                    }
                }
            }
        }
        let client = self.client.clone();
        let failed: Vec<ObjectRef<Pod>> = stream::iter(writes)
            .map(|write| perform(client.clone(), write))
            .buffer_unordered(WRITES_IN_FLIGHT)
            .filter_map(|outcome| async move { outcome })
            .collect()
            .await;
        // A pod whose bind kept failing waits with the unschedulable ones for the next change.
        self.unschedulable.extend(failed);
    }
}

/// Performs one write; returns the pod when it should be tried again later.
async fn perform(client: kube::Client, write: Write) -> Option<ObjectRef<Pod>> {
    match write {
        Write::Bind { pod, node } => {
            let namespace = pod.namespace.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client, &namespace);
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(pod.name.clone()),
                    namespace: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Node".to_owned()),
                    name: Some(node.clone()),
                    ..ObjectReference::default()
                },
            };
            let post = PostParams::default();
            let outcome = retry(|| {
                api.create_subresource::<_, serde_json::Value>(
                    "binding", &pod.name, &post, &binding,
                )
            })
            .await;
            match outcome {
                Ok(_) => {
                    tracing::debug!(pod = %pod, %node, "bound");
                    None
                }
                // Already bound elsewhere, or gone: nothing left to do for this pod.
                Err(error) if has_code(&error, 404) || has_code(&error, 409) => None,
                Err(error) => {
                    tracing::warn!(pod = %pod, %node, %error, "binding failed");
                    Some(pod)
                }
            }
        }
        Write::MarkUnschedulable {
            pod,
            message,
            conditions,
        } => {
            let namespace = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let name = pod.name_any();
            let patch = serde_json::json!({
                "status": {"phase": "Pending", "conditions": conditions}
            });
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            match retry(|| api.patch_status(&name, &params, &patch)).await {
                Ok(_) => {
                    let reporter = Reporter {
                        component: DEFAULT_SCHEDULER.to_owned(),
                        host: None,
                    };
                    events::warn(&client, &reporter, &pod, "FailedScheduling", &message).await;
                }
                Err(error) if has_code(&error, 404) => {}
                Err(error) => {
                    tracing::warn!(pod = %name, %namespace, %error, "could not mark pod unschedulable");
                }
            }
            None
        }
    }
}

/// Schedules pods until `shutdown` is cancelled.
pub(crate) async fn run(client: kube::Client, shutdown: CancellationToken) {
    let pods: Api<Pod> = Api::all(client.clone());
    let (nodes, node_writer) = reflector::store();
    let (assigned, assigned_writer) = reflector::store();
    let (unassigned, unassigned_writer) = reflector::store();
    let mut node_events = pin!(reflector::reflector(
        node_writer,
        watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
    ));
    let mut assigned_events = pin!(reflector::reflector(
        assigned_writer,
        watcher::watcher(
            pods.clone(),
            watcher::Config::default().fields("spec.nodeName!=")
        )
        .default_backoff(),
    ));
    let mut unassigned_events = pin!(reflector::reflector(
        unassigned_writer,
        watcher::watcher(pods, watcher::Config::default().fields("spec.nodeName="))
            .default_backoff(),
    ));
    let mut scheduler = Scheduler {
        client,
        nodes,
        assigned,
        unassigned,
        queue: VecDeque::new(),
        queued: HashSet::new(),
        unschedulable: HashSet::new(),
        assumed: HashMap::new(),
    };
    let (mut nodes_synced, mut assigned_synced) = (false, false);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let schedule_retry = |retry_at: &mut Option<tokio::time::Instant>| {
        retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY_DELAY);
    };
    loop {
        let ready = nodes_synced && assigned_synced && !scheduler.queue.is_empty();
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(event) = node_events.next() => match event {
                Ok(Event::InitDone) => { nodes_synced = true; schedule_retry(&mut retry_at); }
                Ok(Event::Apply(_) | Event::Delete(_)) => schedule_retry(&mut retry_at),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "node watch failed"),
            },
            Some(event) = assigned_events.next() => match event {
                Ok(Event::InitDone) => assigned_synced = true,
                Ok(Event::Delete(_)) => schedule_retry(&mut retry_at),
                Ok(Event::Apply(pod)) if is_terminal(&pod) => schedule_retry(&mut retry_at),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "assigned pod watch failed"),
            },
            Some(event) = unassigned_events.next() => match event {
                Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                    let key = ObjectRef::from_obj(&pod);
                    // Waiting pods are retried when the cluster changes, not on their own
                    // status updates (which the scheduler itself writes).
                    if wants_this_scheduler(&pod) && !scheduler.unschedulable.contains(&key) {
                        scheduler.enqueue(key);
                    }
                }
                Ok(Event::Delete(pod)) => {
                    scheduler.unschedulable.remove(&ObjectRef::from_obj(&pod));
                }
                // A relist (after a 410) reaches the reflector's store only now, so pods queued
                // from its InitApply events were not found and fell out of the queue: queue
                // every waiting pod again.
                Ok(Event::InitDone) => {
                    for pod in scheduler.unassigned.state() {
                        let key = ObjectRef::from_obj(&*pod);
                        if wants_this_scheduler(&pod) && !scheduler.unschedulable.contains(&key) {
                            scheduler.enqueue(key);
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "unassigned pod watch failed"),
            },
            () = async {
                if let Some(at) = retry_at {
                    tokio::time::sleep_until(at).await;
                }
            }, if retry_at.is_some() => {
                retry_at = None;
                scheduler.retry_unschedulable();
            }
            () = std::future::ready(()), if ready => scheduler.schedule_batch().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, labels: serde_json::Value, taints: serde_json::Value, pods: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
            "status": {
                "allocatable": {"cpu": "4", "memory": "16Gi", "pods": pods},
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .expect("a valid node")
    }

    fn virtual_node() -> Node {
        node(
            "virtual",
            json!({"type": "virtual-kubelet"}),
            json!([{"key": "virtual-kubelet.io/provider", "value": "spate", "effect": "NoSchedule"}]),
            "10000",
        )
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": "1"}}}]);
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec}),
        )
        .expect("a valid pod")
    }

    fn virtual_toleration() -> serde_json::Value {
        json!([{"key": "virtual-kubelet.io/provider", "operator": "Equal", "value": "spate", "effect": "NoSchedule"}])
    }

    #[test]
    fn tolerations_match_key_value_operator_and_effect() {
        let taint: Taint =
            serde_json::from_value(json!({"key": "k", "value": "v", "effect": "NoSchedule"}))
                .expect("a taint");
        let toleration = |t: serde_json::Value| -> Toleration {
            serde_json::from_value(t).expect("a toleration")
        };
        assert!(tolerates(
            &toleration(json!({"key": "k", "value": "v"})),
            &taint
        ));
        assert!(tolerates(
            &toleration(json!({"key": "k", "operator": "Exists"})),
            &taint
        ));
        assert!(tolerates(
            &toleration(json!({"operator": "Exists"})),
            &taint
        ));
        assert!(!tolerates(
            &toleration(json!({"key": "k", "value": "x"})),
            &taint
        ));
        assert!(!tolerates(
            &toleration(json!({"key": "k", "operator": "Exists", "effect": "NoExecute"})),
            &taint
        ));
        assert!(!tolerates(&toleration(json!({"value": "v"})), &taint));
    }

    #[test]
    fn an_untolerating_pod_is_unschedulable_with_kube_scheduler_wording() {
        let nodes = [
            virtual_node(),
            node("a", json!({"disk": "hdd"}), json!([]), "20"),
            node("b", json!({"disk": "hdd"}), json!([]), "20"),
        ];
        let pod = pod(json!({"nodeSelector": {"disk": "ssd"}}));
        assert_eq!(
            place(&pod, &nodes, &HashMap::new()),
            Placement::Unschedulable(
                "0/3 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, \
                 1 node(s) had untolerated taint {virtual-kubelet.io/provider: spate}."
                    .to_owned()
            )
        );
    }

    #[test]
    fn tolerating_pod_lands_on_the_virtual_node() {
        let nodes = [virtual_node()];
        let pod = pod(json!({"tolerations": virtual_toleration()}));
        assert_eq!(
            place(&pod, &nodes, &HashMap::new()),
            Placement::Bind("virtual".into())
        );
    }

    #[test]
    fn required_affinity_supports_every_operator_and_match_fields() {
        let n = node("n1", json!({"zone": "a", "gen": "5"}), json!([]), "20");
        let affinity = |term: serde_json::Value| {
            pod(json!({"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}}))
        };
        let fits = |term| matches_node_selection(&affinity(term), &n);
        assert!(fits(
            json!({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]})
        ));
        assert!(!fits(
            json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]})
        ));
        assert!(fits(
            json!({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["a"]}]})
        ));
        assert!(fits(
            json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})
        ));
        assert!(fits(
            json!({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]})
        ));
        assert!(fits(
            json!({"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["4"]}]})
        ));
        assert!(!fits(
            json!({"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["4"]}]})
        ));
        assert!(fits(
            json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]})
        ));
        assert!(!fits(
            json!({"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]})
        ));
        assert!(!fits(json!({})));
    }

    #[test]
    fn burst_prefers_regular_nodes_until_full_then_overflows() {
        let nodes = [
            virtual_node(),
            node(
                "regular",
                json!({"kubernetes.io/role": "agent"}),
                json!([]),
                "2",
            ),
        ];
        let mut spec = json!({"tolerations": virtual_toleration(), "affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
                "matchExpressions": [{"key": "type", "operator": "NotIn", "values": ["virtual-kubelet"]}]}}]}}});
        spec["containers"] = json!([]);
        let pod = pod(spec);
        let mut usage = HashMap::new();
        assert_eq!(
            place(&pod, &nodes, &usage),
            Placement::Bind("regular".into())
        );
        usage.insert(
            "regular".to_owned(),
            Resources {
                cpu: 2_000,
                memory: 0,
                pods: 2_000,
            },
        );
        assert_eq!(
            place(&pod, &nodes, &usage),
            Placement::Bind("virtual".into())
        );
    }

    #[test]
    fn insufficient_resources_are_reported_per_resource() {
        let nodes = [node("small", json!({}), json!([]), "20")];
        let pod = pod(json!({}));
        let usage = HashMap::from([(
            "small".to_owned(),
            Resources {
                cpu: 3_500,
                memory: 0,
                pods: 1_000,
            },
        )]);
        assert_eq!(
            place(&pod, &nodes, &usage),
            Placement::Unschedulable("0/1 nodes are available: 1 Insufficient cpu.".into())
        );
    }

    #[test]
    fn least_allocated_node_wins_among_equals() {
        let nodes = [
            node("a", json!({}), json!([]), "20"),
            node("b", json!({}), json!([]), "20"),
        ];
        let pod = pod(json!({}));
        let usage = HashMap::from([(
            "a".to_owned(),
            Resources {
                cpu: 2_000,
                memory: 0,
                pods: 1_000,
            },
        )]);
        assert_eq!(place(&pod, &nodes, &usage), Placement::Bind("b".into()));
    }
}
