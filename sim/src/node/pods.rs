//! The pod lifecycle on one node: what the kubelet does for pods bound to it.
//!
//! A watch of pods with `spec.nodeName=<node>` starts one task per new pod. The task asks the
//! provider quota, reports `ContainerCreating`, waits the start latency, reports `Running`,
//! then either waits the run time (simulated) or runs the containers' commands (exec mode),
//! restarts containers as `restartPolicy` says, and reports `Succeeded` or `Failed`. A pod
//! that gets a `deletionTimestamp` is stopped (its processes killed) and deleted with a grace
//! period of zero, as a kubelet confirms a graceful deletion. Tasks only sleep on timers or
//! wait on processes, so thousands of pods cost no polling; status writes share a bound.
//!
//! Not modelled: init containers (pods start with their regular containers), probes, and the
//! kubelet's crash-loop back-off beyond one start latency between in-place restarts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::NodeConfig;
use super::exec::{self, Launch, Sandbox};
use super::logs::{ContainerLog, LogStore};
use super::quota::Quota;
use super::registration::HOST_IP;
use super::status::{PROVIDER_FAILED, PodRun};
use crate::controllers::events::{self, Reporter};
use crate::controllers::retry::{has_code, retry};

/// Per-pod override of the run time, in seconds.
pub const RUN_SECONDS_ANNOTATION: &str = "sim.spate.dev/run-seconds";
/// Per-pod override of the start latency, in seconds.
pub const START_SECONDS_ANNOTATION: &str = "sim.spate.dev/start-seconds";
/// Per-pod override of the outcome: `true`, `false`, or a failure probability.
pub const FAIL_ANNOTATION: &str = "sim.spate.dev/fail";
/// Status writes in flight per node.
const WRITES_IN_FLIGHT: usize = 64;

/// Pod IPs are unique across every node agent of the process.
static NEXT_POD_IP: AtomicU32 = AtomicU32::new(1);

fn next_pod_ip() -> String {
    let n = NEXT_POD_IP.fetch_add(1, Ordering::Relaxed);
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

fn seconds_annotation(pod: &Pod, key: &str) -> Option<Duration> {
    pod.annotations()
        .get(key)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// Whether a simulated run fails: the pod's annotation if any, else the node's failure rate.
pub(crate) fn should_fail(pod: &Pod, failure_rate: f64, roll: f64) -> bool {
    let rate = match pod.annotations().get(FAIL_ANNOTATION).map(|v| v.trim()) {
        Some("true") => 1.0,
        Some("false") => 0.0,
        Some(other) => other.parse().unwrap_or(failure_rate),
        None => failure_rate,
    };
    roll < rate
}

/// Whether a container that exited with `exit_code` is restarted in place.
pub(crate) fn restarts(pod: &Pod, exit_code: i32) -> bool {
    match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Never") => false,
        Some("OnFailure") => exit_code != 0,
        // `Always` is the API default.
        _ => true,
    }
}

/// What the agent knows of a pod it has seen.
struct Tracked {
    stop: CancellationToken,
    /// The pod's task has ended; a deletion is then carried out directly.
    finished: bool,
    /// The pod has a `deletionTimestamp`: once stopped, it is deleted.
    deleting: bool,
}

/// The node agent's pod side.
pub(crate) struct PodAgent {
    client: kube::Client,
    config: NodeConfig,
    logs: Arc<LogStore>,
    quota: Mutex<Quota>,
    pods: Mutex<HashMap<String, Tracked>>,
    writes: Semaphore,
}

impl PodAgent {
    pub(crate) fn new(client: kube::Client, config: NodeConfig, logs: Arc<LogStore>) -> Self {
        let quota = Quota::new(config.max_pods_running, config.max_starts, config.per);
        Self {
            client,
            config,
            logs,
            quota: Mutex::new(quota),
            pods: Mutex::new(HashMap::new()),
            writes: Semaphore::new(WRITES_IN_FLIGHT),
        }
    }

    /// Drives the pods bound to this node until `shutdown` is cancelled.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let selector = format!("spec.nodeName={}", self.config.name);
        let mut relisted: HashSet<String> = HashSet::new();
        let events = watcher::watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&selector),
        )
        .default_backoff()
        .take_until(shutdown.clone().cancelled_owned());
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => relisted.clear(),
                Ok(Event::InitApply(pod)) => {
                    relisted.extend(pod.uid());
                    self.observe(pod);
                }
                Ok(Event::InitDone) => {
                    // Pods deleted while the watch was down.
                    let gone: Vec<String> = self
                        .pods
                        .lock()
                        .keys()
                        .filter(|uid| !relisted.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.forget(&uid);
                    }
                }
                Ok(Event::Apply(pod)) => self.observe(pod),
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.uid() {
                        self.forget(&uid);
                        let logs = self.logs.clone();
                        let (namespace, name) =
                            (pod.namespace().unwrap_or_default(), pod.name_any());
                        tokio::spawn(async move { logs.remove_pod(&namespace, &name, &uid).await });
                    }
                }
                Err(error) => tracing::warn!(node = %self.config.name, %error, "pod watch failed"),
            }
        }
        for tracked in self.pods.lock().values() {
            tracked.stop.cancel();
        }
    }

    fn forget(&self, uid: &str) {
        if let Some(tracked) = self.pods.lock().remove(uid) {
            tracked.stop.cancel();
        }
    }

    /// Reacts to the latest state of a pod bound to this node.
    fn observe(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.uid() else {
            return;
        };
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let mut pods = self.pods.lock();
        if let Some(tracked) = pods.get_mut(&uid) {
            if deleting && !tracked.deleting {
                tracked.deleting = true;
                tracked.stop.cancel();
                if tracked.finished {
                    tokio::spawn(self.clone().confirm_deletion(pod));
                }
            }
            return;
        }
        let stop = CancellationToken::new();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let refused = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|statuses| {
                statuses.iter().any(|s| {
                    s.state
                        .as_ref()
                        .and_then(|st| st.waiting.as_ref())
                        .and_then(|w| w.reason.as_deref())
                        == Some(PROVIDER_FAILED)
                })
            });
        let settled = matches!(phase, Some("Succeeded" | "Failed")) || refused;
        if deleting {
            stop.cancel();
            pods.insert(
                uid,
                Tracked {
                    stop,
                    finished: true,
                    deleting: true,
                },
            );
            tokio::spawn(self.clone().confirm_deletion(pod));
        } else if settled {
            // Finished, or refused by the provider (never retried): nothing to drive.
            pods.insert(
                uid,
                Tracked {
                    stop,
                    finished: true,
                    deleting: false,
                },
            );
        } else {
            pods.insert(
                uid,
                Tracked {
                    stop: stop.clone(),
                    finished: false,
                    deleting: false,
                },
            );
            tokio::spawn(self.clone().drive(pod, stop));
        }
    }

    /// Deletes a pod whose graceful deletion the agent has carried out.
    async fn confirm_deletion(self: Arc<Self>, pod: Pod) {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name = pod.name_any();
        match retry(|| api.delete(&name, &params)).await {
            Ok(_) => tracing::debug!(pod = %name, "pod deleted"),
            Err(error) if has_code(&error, 404) || has_code(&error, 409) => {}
            Err(error) => tracing::warn!(pod = %name, %error, "could not delete pod"),
        }
    }

    async fn write_status(&self, pod: &Pod, run: &tokio::sync::Mutex<PodRun>) {
        let Ok(_permit) = self.writes.acquire().await else {
            return;
        };
        // Holding the run's lock across the write keeps status writes in order.
        let mut run = run.lock().await;
        let patch = serde_json::json!({ "status": run.status(Timestamp::now()) });
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let (name, params, patch) = (pod.name_any(), PatchParams::default(), Patch::Merge(&patch));
        match retry(|| api.patch_status(&name, &params, &patch)).await {
            Ok(_) => {}
            Err(error) if has_code(&error, 404) => {}
            Err(error) => tracing::warn!(pod = %name, %error, "could not update pod status"),
        }
    }

    async fn warn_event(&self, pod: &Pod, reason: &str, message: &str) {
        let reporter = Reporter {
            component: format!("{}/pod-controller", self.config.name),
            host: Some(self.config.name.clone()),
        };
        events::warn(&self.client, &reporter, pod, reason, message).await;
    }

    /// Sleeps `duration` unless the pod is stopped first; `false` when stopped.
    async fn wait(stop: &CancellationToken, duration: Duration) -> bool {
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(duration) => true,
        }
    }

    /// The whole life of one pod on this node.
    async fn drive(self: Arc<Self>, pod: Pod, stop: CancellationToken) {
        let run = tokio::sync::Mutex::new(PodRun::new(&pod, HOST_IP));
        let already_running =
            pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        let admitted = self.quota.lock().try_start(Instant::now());
        let admitted = match admitted {
            Ok(()) => true,
            Err(_) if already_running => false,
            Err(message) => {
                let message = format!("Creating pod on the provider failed: {message}");
                tracing::info!(pod = %pod.name_any(), %message, "provider refused pod");
                run.lock().await.wait_all(PROVIDER_FAILED, &message);
                self.write_status(&pod, &run).await;
                self.warn_event(&pod, "ProviderCreateFailed", &message)
                    .await;
                self.settle(&pod);
                return;
            }
        };
        self.lifecycle(&pod, &run, &stop, already_running).await;
        if admitted {
            self.quota.lock().finish();
        }
        self.settle(&pod);
    }

    /// Marks the pod's task finished, deleting the pod if a deletion arrived meanwhile.
    fn settle(self: &Arc<Self>, pod: &Pod) {
        let mut pods = self.pods.lock();
        if let Some(tracked) = pod.uid().and_then(|uid| pods.get_mut(&uid)) {
            tracked.finished = true;
            if tracked.deleting {
                tokio::spawn(self.clone().confirm_deletion(pod.clone()));
            }
        }
    }

    async fn lifecycle(
        &self,
        pod: &Pod,
        run: &tokio::sync::Mutex<PodRun>,
        stop: &CancellationToken,
        already_running: bool,
    ) {
        if !already_running {
            self.write_status(pod, run).await;
            let latency = seconds_annotation(pod, START_SECONDS_ANNOTATION)
                .unwrap_or(self.config.start_latency);
            if !Self::wait(stop, latency).await {
                return;
            }
        }
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let mut sandbox = None;
        if self.config.exec {
            let dir = self
                .logs
                .pod_dir(
                    &pod.namespace().unwrap_or_default(),
                    &pod.name_any(),
                    &pod.uid().unwrap_or_default(),
                )
                .join("sandbox");
            match exec::prepare(&self.client, pod, dir).await {
                Ok(prepared) => sandbox = Some(prepared),
                Err(error) => {
                    run.lock()
                        .await
                        .wait_all("CreateContainerConfigError", &error.to_string());
                    self.write_status(pod, run).await;
                    return;
                }
            }
        }
        {
            let mut run = run.lock().await;
            let now = Timestamp::now();
            run.started(next_pod_ip(), now);
            for container in &containers {
                run.running(&container.name, now);
            }
        }
        self.write_status(pod, run).await;
        let mut launches = Vec::new();
        for container in &containers {
            let launch = match sandbox.as_mut() {
                Some(sandbox) => match self.launch(pod, container, sandbox).await {
                    Ok(launch) => launch,
                    Err(error) => {
                        run.lock()
                            .await
                            .wait_all("CreateContainerConfigError", &error.to_string());
                        self.write_status(pod, run).await;
                        return;
                    }
                },
                None => None,
            };
            launches.push((container.name.clone(), launch));
        }
        let runs = launches
            .into_iter()
            .map(|(name, launch)| self.container(pod, run, stop, name, launch, sandbox.as_ref()));
        futures::future::join_all(runs).await;
        if let Some(sandbox) = &sandbox {
            sandbox.tear_down().await;
        }
        if !stop.is_cancelled() {
            self.write_status(pod, run).await;
        }
    }

    /// The process to run for `container`, or `None` when it has no command and is simulated.
    async fn launch(
        &self,
        pod: &Pod,
        container: &k8s_openapi::api::core::v1::Container,
        sandbox: &mut Sandbox,
    ) -> Result<Option<Launch>, exec::ConfigError> {
        let env = exec::environment(&self.client, pod, container).await?;
        let Some(argv) = exec::argv(container, &env) else {
            return Ok(None);
        };
        exec::mount(sandbox, container).await?;
        let hostname = pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| pod.name_any());
        Ok(Some(Launch {
            argv,
            path: self.config.exec_path.clone(),
            env,
            working_dir: container.working_dir.clone(),
            hostname,
        }))
    }

    /// Runs one container until it stays terminated, restarting it as the policy says.
    async fn container(
        &self,
        pod: &Pod,
        run: &tokio::sync::Mutex<PodRun>,
        stop: &CancellationToken,
        name: String,
        launch: Option<Launch>,
        sandbox: Option<&Sandbox>,
    ) {
        let key = (
            pod.namespace().unwrap_or_default(),
            pod.name_any(),
            name.clone(),
        );
        let log = match self.logs.open(&key, &pod.uid().unwrap_or_default()).await {
            Ok(log) => log,
            Err(error) => {
                tracing::warn!(pod = %pod.name_any(), %error, "could not open container log");
                return;
            }
        };
        loop {
            log.reopen();
            let exit_code = match (&launch, sandbox) {
                (Some(launch), Some(sandbox)) => {
                    Some(exec::run(launch.clone(), sandbox, log.clone(), stop.clone()).await)
                }
                _ => self.simulate(pod, &log, stop).await,
            };
            log.close();
            let Some(exit_code) = exit_code.filter(|_| !stop.is_cancelled()) else {
                return;
            };
            let now = Timestamp::now();
            run.lock().await.terminated(&name, exit_code, now);
            if !restarts(pod, exit_code) {
                return;
            }
            self.write_status(pod, run).await;
            // Restarted containers back off briefly, standing in for CrashLoopBackOff.
            if !Self::wait(stop, self.config.start_latency).await {
                return;
            }
            run.lock().await.restart(&name, Timestamp::now());
            self.write_status(pod, run).await;
        }
    }

    /// A simulated container: a few log lines and the configured run time.
    async fn simulate(
        &self,
        pod: &Pod,
        log: &ContainerLog,
        stop: &CancellationToken,
    ) -> Option<i32> {
        let run_time =
            seconds_annotation(pod, RUN_SECONDS_ANNOTATION).unwrap_or(self.config.run_time);
        let append = |line: String| async move {
            if let Err(error) = log.append("stdout", line.as_bytes()).await {
                tracing::debug!(%error, "could not write container log");
            }
        };
        append("started".to_owned()).await;
        if !Self::wait(stop, run_time).await {
            return None;
        }
        let roll = rand::rng().random_range(0.0..1.0);
        let exit_code = i32::from(should_fail(pod, self.config.failure_rate, roll));
        append(format!("running for {:.1}s", run_time.as_secs_f64())).await;
        append(format!("exit {exit_code}")).await;
        Some(exit_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(annotations: serde_json::Value, restart_policy: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"restartPolicy": restart_policy, "containers": [{"name": "c"}]}
        }))
        .expect("a valid pod")
    }

    #[test]
    fn annotations_override_the_nodes_failure_rate() {
        assert!(should_fail(
            &pod(json!({FAIL_ANNOTATION: "true"}), "Never"),
            0.0,
            0.99
        ));
        assert!(!should_fail(
            &pod(json!({FAIL_ANNOTATION: "false"}), "Never"),
            1.0,
            0.0
        ));
        assert!(should_fail(
            &pod(json!({FAIL_ANNOTATION: "0.5"}), "Never"),
            0.0,
            0.4
        ));
        assert!(should_fail(&pod(json!({}), "Never"), 0.3, 0.2));
        assert!(!should_fail(&pod(json!({}), "Never"), 0.0, 0.0));
    }

    #[test]
    fn restart_policy_decides_in_place_restarts() {
        assert!(!restarts(&pod(json!({}), "Never"), 1));
        assert!(restarts(&pod(json!({}), "OnFailure"), 1));
        assert!(!restarts(&pod(json!({}), "OnFailure"), 0));
        assert!(restarts(&pod(json!({}), "Always"), 0));
    }

    #[test]
    fn timing_annotations_are_seconds() {
        let pod = pod(json!({RUN_SECONDS_ANNOTATION: "0.25"}), "Never");
        assert_eq!(
            seconds_annotation(&pod, RUN_SECONDS_ANNOTATION),
            Some(Duration::from_millis(250))
        );
        assert_eq!(seconds_annotation(&pod, START_SECONDS_ANNOTATION), None);
    }

    #[test]
    fn pod_ips_are_distinct() {
        assert_ne!(next_pod_ip(), next_pod_ip());
    }
}
