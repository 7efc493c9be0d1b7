//! The pod status a kubelet reports, built from what the node agent knows of each container.
//!
//! [`PodRun`] is the agent's record of one pod (IPs, start time, each container's state and
//! restarts); [`PodRun::status`] turns it into the `PodStatus` written to `pods/status`:
//! phase, the four standard conditions, and container statuses with ids and image ids.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

/// Waiting reason while a container is being created.
pub(crate) const CONTAINER_CREATING: &str = "ContainerCreating";
/// Waiting reason of a pod the provider refused (virtual-kubelet's wording).
pub(crate) const PROVIDER_FAILED: &str = "ProviderFailed";

fn digest(parts: &[&str]) -> String {
    let mut first = DefaultHasher::new();
    parts.hash(&mut first);
    let mut second = DefaultHasher::new();
    (parts, "second").hash(&mut second);
    format!("{:016x}{:016x}", first.finish(), second.finish())
}

/// One container as the agent runs it.
#[derive(Debug, Clone)]
pub(crate) struct ContainerRun {
    pub(crate) name: String,
    image: String,
    pub(crate) state: ContainerState,
    last_state: Option<ContainerState>,
    pub(crate) restart_count: i32,
    container_id: Option<String>,
}

/// The agent's record of one pod.
#[derive(Debug, Clone)]
pub(crate) struct PodRun {
    uid: String,
    host_ip: String,
    pod_ip: Option<String>,
    start_time: Option<Timestamp>,
    pub(crate) containers: Vec<ContainerRun>,
    transitions: HashMap<&'static str, (bool, Timestamp)>,
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..ContainerState::default()
    }
}

impl PodRun {
    /// A freshly bound pod: every container waiting in `ContainerCreating`.
    pub(crate) fn new(pod: &Pod, host_ip: &str) -> Self {
        let containers = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| ContainerRun {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                state: waiting(CONTAINER_CREATING, None),
                last_state: None,
                restart_count: 0,
                container_id: None,
            })
            .collect();
        Self {
            uid: pod.uid().unwrap_or_default(),
            host_ip: host_ip.to_owned(),
            pod_ip: None,
            start_time: None,
            containers,
            transitions: HashMap::new(),
        }
    }

    /// Every container waits with `reason` (e.g. [`PROVIDER_FAILED`]).
    pub(crate) fn wait_all(&mut self, reason: &str, message: &str) {
        for container in &mut self.containers {
            container.state = waiting(reason, Some(message.to_owned()));
        }
    }

    /// The pod got its sandbox: IP and start time.
    pub(crate) fn started(&mut self, pod_ip: String, now: Timestamp) {
        self.pod_ip = Some(pod_ip);
        self.start_time.get_or_insert(now);
    }

    pub(crate) fn running(&mut self, name: &str, now: Timestamp) {
        let uid = self.uid.clone();
        if let Some(container) = self.containers.iter_mut().find(|c| c.name == name) {
            container.container_id = Some(format!(
                "containerd://{}",
                digest(&[&uid, name, &container.restart_count.to_string()])
            ));
            container.state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(now)),
                }),
                ..ContainerState::default()
            };
        }
    }

    pub(crate) fn terminated(&mut self, name: &str, exit_code: i32, now: Timestamp) {
        if let Some(container) = self.containers.iter_mut().find(|c| c.name == name) {
            let started_at = container
                .state
                .running
                .as_ref()
                .and_then(|r| r.started_at.clone());
            container.state = ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.to_owned()),
                    started_at,
                    finished_at: Some(Time(now)),
                    container_id: container.container_id.clone(),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            };
        }
    }

    /// Restarts a terminated container in place (`restartPolicy: OnFailure`/`Always`).
    pub(crate) fn restart(&mut self, name: &str, now: Timestamp) {
        if let Some(container) = self.containers.iter_mut().find(|c| c.name == name) {
            container.last_state = Some(container.state.clone());
            container.restart_count += 1;
        }
        self.running(name, now);
    }

    pub(crate) fn phase(&self) -> &'static str {
        let all_terminated = self.containers.iter().all(|c| c.state.terminated.is_some());
        if all_terminated && !self.containers.is_empty() {
            let succeeded = self.containers.iter().all(|c| {
                c.state
                    .terminated
                    .as_ref()
                    .is_some_and(|t| t.exit_code == 0)
            });
            return if succeeded { "Succeeded" } else { "Failed" };
        }
        let started = self
            .containers
            .iter()
            .any(|c| c.state.waiting.is_none() || c.restart_count > 0);
        if started { "Running" } else { "Pending" }
    }

    fn condition(
        &mut self,
        type_: &'static str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
        now: Timestamp,
    ) -> PodCondition {
        let since = match self.transitions.get(type_) {
            Some(&(was, since)) if was == ok => since,
            _ => {
                self.transitions.insert(type_, (ok, now));
                now
            }
        };
        PodCondition {
            type_: type_.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.map(str::to_owned),
            message,
            last_transition_time: Some(Time(since)),
            ..PodCondition::default()
        }
    }

    /// The status to write now.
    pub(crate) fn status(&mut self, now: Timestamp) -> PodStatus {
        let phase = self.phase();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| c.state.running.is_none())
            .map(|c| c.name.as_str())
            .collect();
        let ready = unready.is_empty() && !terminal;
        let (reason, message) = match (ready, terminal) {
            (true, _) => (None, None),
            (false, true) => (Some("PodCompleted"), None),
            (false, false) => (
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            ),
        };
        let conditions = vec![
            self.condition(
                "PodReadyToStartContainers",
                self.pod_ip.is_some() && !terminal,
                None,
                None,
                now,
            ),
            self.condition("Initialized", true, None, None, now),
            self.condition("Ready", ready, reason, message.clone(), now),
            self.condition("ContainersReady", ready, reason, message, now),
            self.condition("PodScheduled", true, None, None, now),
        ];
        let container_statuses = self
            .containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone(),
                image_id: format!(
                    "{}@sha256:{}{}",
                    c.image,
                    digest(&[&c.image]),
                    digest(&[&c.image, "2"])
                ),
                container_id: c.container_id.clone(),
                ready: c.state.running.is_some(),
                started: Some(c.state.running.is_some()),
                restart_count: c.restart_count,
                state: Some(c.state.clone()),
                last_state: c.last_state.clone(),
                ..ContainerStatus::default()
            })
            .collect();
        PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(conditions),
            host_ip: Some(self.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.clone(),
            }]),
            pod_ip: self.pod_ip.clone(),
            pod_ips: self.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            start_time: self.start_time.map(Time),
            container_statuses: Some(container_statuses),
            // Left out: the API server computed it from the resources at creation, and a merge
            // patch keeps it (writing BestEffort relabelled every Burstable pod).
            ..PodStatus::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"containers": [{"name": "a", "image": "busybox"}, {"name": "b", "image": "busybox"}]}
        }))
        .expect("a valid pod")
    }

    #[test]
    fn a_pod_goes_pending_running_succeeded() {
        let now = Timestamp::now();
        let mut run = PodRun::new(&pod(), "127.0.0.1");
        let pending = run.status(now);
        assert_eq!(pending.phase.as_deref(), Some("Pending"));
        assert_eq!(pending.qos_class, None, "the API server's to set");
        let waiting = pending.container_statuses.unwrap_or_default()[0]
            .state
            .clone()
            .and_then(|s| s.waiting);
        assert_eq!(
            waiting.and_then(|w| w.reason).as_deref(),
            Some(CONTAINER_CREATING)
        );

        run.started("10.0.0.7".into(), now);
        run.running("a", now);
        run.running("b", now);
        let running = run.status(now);
        assert_eq!(running.phase.as_deref(), Some("Running"));
        assert_eq!(running.pod_ip.as_deref(), Some("10.0.0.7"));
        let ready = running
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready");
        assert_eq!(ready.map(|c| c.status), Some("True".to_owned()));
        let statuses = running.container_statuses.unwrap_or_default();
        assert!(
            statuses
                .iter()
                .all(|s| s.ready && s.started == Some(true) && s.container_id.is_some())
        );

        run.terminated("a", 0, now);
        assert_eq!(run.phase(), "Running");
        run.terminated("b", 0, now);
        let done = run.status(now);
        assert_eq!(done.phase.as_deref(), Some("Succeeded"));
        let terminated = done.container_statuses.unwrap_or_default()[1]
            .state
            .clone()
            .and_then(|s| s.terminated);
        assert_eq!(
            terminated.and_then(|t| t.reason).as_deref(),
            Some("Completed")
        );
    }

    #[test]
    fn a_non_zero_exit_fails_the_pod_and_a_restart_counts() {
        let now = Timestamp::now();
        let mut run = PodRun::new(&pod(), "127.0.0.1");
        run.started("10.0.0.8".into(), now);
        run.running("a", now);
        run.running("b", now);
        run.terminated("a", 1, now);
        run.restart("a", now);
        assert_eq!(run.containers[0].restart_count, 1);
        assert_eq!(run.phase(), "Running");
        run.terminated("a", 1, now);
        run.terminated("b", 0, now);
        assert_eq!(run.phase(), "Failed");
    }

    #[test]
    fn a_provider_refusal_keeps_the_pod_pending() {
        let mut run = PodRun::new(&pod(), "127.0.0.1");
        run.wait_all(PROVIDER_FAILED, "quota exceeded");
        let status = run.status(Timestamp::now());
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let waiting = status.container_statuses.unwrap_or_default()[0]
            .state
            .clone()
            .and_then(|s| s.waiting);
        assert_eq!(
            waiting.and_then(|w| w.reason).as_deref(),
            Some(PROVIDER_FAILED)
        );
    }
}
