//! Workloads on the simulated cluster as a user drives them with the real `/usr/bin/kubectl`:
//! Jobs run to completion on the virtual node through the Job controller, the scheduler and
//! the node agent; untolerating pods stay unschedulable; deletion and TTL clean up; logs of
//! exec-mode pods come back through `kubectl logs`; bursts overflow from regular nodes to the
//! virtual node; provider quotas refuse pods the way virtual-kubelet does.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use serde_json::Value;
use spate_sim::node::NodeConfig;
use spate_sim::{SimCluster, SimConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const KUBECTL: &str = "/usr/bin/kubectl";

/// A cluster plus a kubectl set up to use it, with its own HOME and discovery cache.
struct Fixture {
    cluster: SimCluster,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// Fast simulated pods, so the suite stays quick.
fn fast_nodes() -> NodeConfig {
    NodeConfig {
        start_latency: Duration::from_millis(100),
        run_time: Duration::from_millis(300),
        ..NodeConfig::default()
    }
}

impl Fixture {
    async fn start(config: SimConfig) -> Self {
        // `RUST_LOG=spate_sim=debug` shows what the controllers and nodes did.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let cluster = SimCluster::start(config).await.expect("cluster starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        cluster
            .write_kubeconfig(&kubeconfig)
            .expect("kubeconfig written");
        Self {
            cluster,
            dir,
            kubeconfig,
        }
    }

    async fn virtual_only() -> Self {
        Self::start(SimConfig {
            node: fast_nodes(),
            ..SimConfig::default()
        })
        .await
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(KUBECTL);
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        let output = tokio::time::timeout(Duration::from_secs(90), self.command(args).output())
            .await
            .expect("kubectl finishes in time")
            .expect("kubectl runs");
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs kubectl and insists it succeeds.
    async fn ok(&self, args: &[&str]) -> Output {
        let out = self.kubectl(args).await;
        assert!(
            out.ok,
            "kubectl {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out
    }

    async fn apply(&self, name: &str, yaml: &str) {
        let path = self.dir.path().join(name);
        tokio::fs::write(&path, yaml)
            .await
            .expect("manifest written");
        self.ok(&["apply", "-f", &path.to_string_lossy()]).await;
    }

    async fn pods_of(&self, job: &str) -> Vec<Value> {
        let selector = format!("job-name={job}");
        let out = self
            .ok(&["get", "pods", "-l", &selector, "-o", "json"])
            .await;
        out.json()["items"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `check` until it returns `Some`, failing the test after `timeout`.
    async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_complete(&self, job: &str) {
        let target = format!("job/{job}");
        let out = self
            .kubectl(&["wait", "--for=condition=complete", &target, "--timeout=60s"])
            .await;
        if !out.ok {
            // Say what the Job and its pods looked like, so a failure explains itself.
            let state = self.kubectl(&["get", &target, "-o", "json"]).await.stdout;
            let pods: Vec<String> = self
                .pods_of(job)
                .await
                .iter()
                .map(|p| format!("{} {} {}", p["metadata"]["name"], phase(p), p["status"]))
                .collect();
            panic!(
                "{target} did not complete: {}\n{state}\n{pods:#?}",
                out.stderr
            );
        }
    }
}

/// A Job manifest; `extra_spec` and `pod_spec` are YAML lines indented for their place.
fn job_yaml(name: &str, spec: &str, annotations: &str, pod_spec: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
{spec}
  template:
    metadata:
      annotations:
        sim.spate.dev/run-seconds: "0.3"
{annotations}
    spec:
      restartPolicy: Never
{pod_spec}
      containers:
      - name: work
        image: busybox
"#
    )
}

const TOLERATE_VIRTUAL: &str = r#"      tolerations:
      - key: virtual-kubelet.io/provider
        operator: Equal
        value: spate
        effect: NoSchedule"#;

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("Pending")
}

#[tokio::test]
async fn an_indexed_job_completes_on_the_virtual_node_within_its_parallelism() {
    let fx = Fixture::virtual_only().await;
    // Watch the Job's pods from before it exists, to see every state they pass through.
    let pods: Api<Pod> = Api::default_namespaced(fx.cluster.client());
    let config = watcher::Config::default().labels("job-name=resize");
    let observer = tokio::spawn(async move {
        let mut phases: HashMap<String, String> = HashMap::new();
        let mut most_active = 0;
        let mut events = std::pin::pin!(watcher::watcher(pods, config));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    let phase = pod
                        .status
                        .and_then(|s| s.phase)
                        .unwrap_or_else(|| "Pending".into());
                    phases.insert(name, phase);
                }
                Ok(watcher::Event::Delete(pod)) => {
                    phases.remove(&pod.metadata.name.unwrap_or_default());
                }
                _ => continue,
            }
            let active = phases
                .values()
                .filter(|p| *p != "Succeeded" && *p != "Failed")
                .count();
            most_active = most_active.max(active);
            let succeeded = phases.values().filter(|p| *p == "Succeeded").count();
            if succeeded == 20 {
                return most_active;
            }
        }
        most_active
    });

    let spec = "  completions: 20\n  parallelism: 10\n  completionMode: Indexed";
    fx.apply("job.yaml", &job_yaml("resize", spec, "", TOLERATE_VIRTUAL))
        .await;
    fx.wait_complete("resize").await;

    let pods = fx.pods_of("resize").await;
    assert_eq!(pods.len(), 20, "one pod per completion, none retried");
    let mut indexes = Vec::new();
    for pod in &pods {
        assert_eq!(phase(pod), "Succeeded");
        assert_eq!(pod["spec"]["nodeName"], "spate-virtual-0");
        let index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            .as_str()
            .and_then(|i| i.parse::<i32>().ok())
            .expect("an indexed pod carries its index");
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            name.starts_with(&format!("resize-{index}-")),
            "indexed pod name {name}"
        );
        assert_eq!(pod["spec"]["hostname"], format!("resize-{index}"));
        indexes.push(index);
    }
    indexes.sort_unstable();
    assert_eq!(indexes, (0..20).collect::<Vec<_>>());
    // Simulated containers leave a few synthetic lines for `kubectl logs`.
    let first = pods[0]["metadata"]["name"].as_str().unwrap_or_default();
    let logs = fx.ok(&["logs", first]).await;
    assert_eq!(logs.stdout, "started\nrunning for 0.3s\nexit 0\n");

    let job = fx.ok(&["get", "job", "resize", "-o", "json"]).await.json();
    assert_eq!(job["status"]["succeeded"], 20);
    assert_eq!(job["status"]["completedIndexes"], "0-19");
    assert!(job["status"]["completionTime"].is_string());
    let most_active = tokio::time::timeout(Duration::from_secs(10), observer)
        .await
        .expect("the observer saw every pod succeed")
        .expect("the observer ran");
    assert!(
        (1..=10).contains(&most_active),
        "at most parallelism pods active at once, saw {most_active}"
    );
}

#[tokio::test]
async fn a_job_without_the_toleration_stays_pending_and_unschedulable() {
    let fx = Fixture::virtual_only().await;
    fx.apply("job.yaml", &job_yaml("plain", "  completions: 1", "", ""))
        .await;
    let condition = fx
        .eventually("an unschedulable pod", Duration::from_secs(20), || async {
            let pods = fx.pods_of("plain").await;
            let pod = pods.first()?;
            let conditions = pod["status"]["conditions"].as_array()?;
            conditions
                .iter()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                .cloned()
        })
        .await;
    assert_eq!(condition["reason"], "Unschedulable");
    assert_eq!(
        condition["message"],
        "0/1 nodes are available: 1 node(s) had untolerated taint {virtual-kubelet.io/provider: spate}."
    );
    let events = fx
        .eventually(
            "a FailedScheduling event",
            Duration::from_secs(10),
            || async {
                let selector = "reason=FailedScheduling";
                let out = fx
                    .ok(&["get", "events", "--field-selector", selector, "-o", "json"])
                    .await
                    .json();
                let events = out["items"].as_array().cloned().unwrap_or_default();
                let recorded = events.iter().any(|e| e["message"] == condition["message"]);
                recorded.then_some(events)
            },
        )
        .await;
    // One event per distinct message (an earlier one may predate the node's registration).
    let current: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == condition["message"])
        .collect();
    assert_eq!(current.len(), 1, "{events:?}");
    assert_eq!(current[0]["type"], "Warning");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = fx.pods_of("plain").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(phase(&pods[0]), "Pending");
    assert!(pods[0]["spec"]["nodeName"].is_null());
}

#[tokio::test]
async fn deleting_a_job_removes_its_pods() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 3\n  parallelism: 3";
    let slow = "        sim.spate.dev/start-seconds: \"0\"";
    let yaml = job_yaml("long", spec, slow, TOLERATE_VIRTUAL).replace("\"0.3\"", "\"60\"");
    fx.apply("job.yaml", &yaml).await;
    fx.eventually("three running pods", Duration::from_secs(20), || async {
        let pods = fx.pods_of("long").await;
        (pods.len() == 3 && pods.iter().all(|p| phase(p) == "Running")).then_some(())
    })
    .await;
    fx.ok(&["delete", "job", "long"]).await;
    fx.eventually("the pods to be gone", Duration::from_secs(20), || async {
        fx.pods_of("long").await.is_empty().then_some(())
    })
    .await;
    let job = fx.kubectl(&["get", "job", "long"]).await;
    assert!(!job.ok && job.stderr.contains("NotFound"), "{}", job.stderr);
}

#[tokio::test]
async fn ttl_after_finished_deletes_the_job_and_then_its_pods() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 2\n  parallelism: 2\n  ttlSecondsAfterFinished: 4";
    fx.apply("job.yaml", &job_yaml("brief", spec, "", TOLERATE_VIRTUAL))
        .await;
    fx.wait_complete("brief").await;
    assert_eq!(fx.pods_of("brief").await.len(), 2);
    fx.eventually("the Job to be deleted", Duration::from_secs(20), || async {
        let job = fx.kubectl(&["get", "job", "brief"]).await;
        (!job.ok && job.stderr.contains("NotFound")).then_some(())
    })
    .await;
    fx.eventually(
        "its pods to be deleted",
        Duration::from_secs(20),
        || async { fx.pods_of("brief").await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn kubectl_get_jobs_watch_streams_progress() {
    let fx = Fixture::virtual_only().await;
    let mut watch = fx
        .command(&[
            "get",
            "jobs",
            "--watch",
            "-o",
            r#"jsonpath={.metadata.name} {.status.succeeded} {.status.conditions[?(@.type=="Complete")].status}{"\n"}"#,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl starts");
    let stdout = watch.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    // Give the watch a moment to be established, then make changes it must stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = "  completions: 2\n  parallelism: 1";
    fx.apply(
        "job.yaml",
        &job_yaml("streamed", spec, "", TOLERATE_VIRTUAL),
    )
    .await;
    let mut seen = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.trim() == "streamed 2 True";
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(outcome, Ok(true), "streamed lines: {seen:?}");
    assert!(
        seen.len() >= 3,
        "creation, progress and completion each streamed: {seen:?}"
    );
    assert!(seen.iter().any(|l| l.trim() == "streamed 1"), "{seen:?}");
    watch.kill().await.expect("kubectl stops");
}

#[tokio::test]
async fn kubectl_logs_returns_an_exec_pods_output() {
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: echo
spec:
  completions: 2
  parallelism: 2
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
{TOLERATE_VIRTUAL}
      containers:
      - name: echo
        image: busybox
        command: ["/bin/sh", "-c", "echo hello-from-pod $JOB_COMPLETION_INDEX $GREETING; echo oops >&2"]
        env:
        - name: WHO
          value: world
        - name: GREETING
          value: "hi-$(WHO)"
"#
    );
    fx.apply("job.yaml", &yaml).await;
    fx.wait_complete("echo").await;
    let mut outputs = BTreeMap::new();
    for pod in fx.pods_of("echo").await {
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let logs = fx.ok(&["logs", &name]).await;
        outputs.insert(index, logs.stdout);
    }
    assert_eq!(
        outputs,
        BTreeMap::from([
            (
                "0".to_owned(),
                "hello-from-pod 0 hi-world\noops\n".to_owned()
            ),
            (
                "1".to_owned(),
                "hello-from-pod 1 hi-world\noops\n".to_owned()
            ),
        ])
    );
    let pod = &fx.pods_of("echo").await[0];
    let terminated = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 0);
    assert_eq!(terminated["reason"], "Completed");
}

#[tokio::test]
async fn exec_pods_find_their_command_on_the_nodes_exec_path() {
    // A worker installed only in a folder of its own, as `spate dev` installs the thumbnailer:
    // the node's exec path stands in for the image that carries it.
    let bin = tempfile::tempdir().unwrap();
    let worker = bin.path().join("hello-worker");
    std::fs::write(&worker, "#!/bin/sh\necho worker says \"$1\"\n").unwrap();
    std::fs::set_permissions(&worker, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let exec_path =
        std::env::join_paths([bin.path(), "/usr/bin".as_ref(), "/bin".as_ref()]).unwrap();
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: NodeConfig {
            exec_path: Some(exec_path),
            ..fast_nodes()
        },
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: on-path
spec:
  template:
    spec:
      restartPolicy: Never
{TOLERATE_VIRTUAL}
      containers:
      - name: work
        image: example/hello-worker
        command: ["hello-worker"]
        args: ["hi"]
"#
    );
    fx.apply("job.yaml", &yaml).await;
    fx.wait_complete("on-path").await;
    let pod = &fx.pods_of("on-path").await[0];
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    assert_eq!(fx.ok(&["logs", name]).await.stdout, "worker says hi\n");
}

#[tokio::test]
async fn a_failing_exec_pod_fails_the_job_at_its_backoff_limit() {
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: broken
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
{TOLERATE_VIRTUAL}
      containers:
      - name: fail
        image: busybox
        command: ["/bin/sh", "-c", "echo failing; exit 3"]
"#
    );
    fx.apply("job.yaml", &yaml).await;
    fx.ok(&[
        "wait",
        "--for=condition=failed",
        "job/broken",
        "--timeout=60s",
    ])
    .await;
    let job = fx.ok(&["get", "job", "broken", "-o", "json"]).await.json();
    assert_eq!(job["status"]["failed"], 2);
    let conditions = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = conditions.iter().find(|c| c["type"] == "Failed");
    assert_eq!(
        failed.map(|c| c["reason"].clone()),
        Some(Value::from("BackoffLimitExceeded"))
    );
    let pods = fx.pods_of("broken").await;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        assert_eq!(phase(pod), "Failed");
        let terminated = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 3);
    }
}

#[tokio::test]
async fn a_burst_fills_regular_nodes_first_then_overflows_to_the_virtual_node() {
    let fx = Fixture::start(SimConfig {
        regular_nodes: 1,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let prefer_regular = format!(
        r#"{TOLERATE_VIRTUAL}
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            preference:
              matchExpressions:
              - key: type
                operator: NotIn
                values: ["virtual-kubelet"]"#
    );
    let spec = "  completions: 25\n  parallelism: 25";
    let yaml = job_yaml("burst", spec, "", &prefer_regular).replace("\"0.3\"", "\"30\"");
    fx.apply("job.yaml", &yaml).await;
    let placement = fx
        .eventually("all 25 pods bound", Duration::from_secs(30), || async {
            let pods = fx.pods_of("burst").await;
            let nodes: Vec<String> = pods
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_owned))
                .collect();
            (nodes.len() == 25).then_some(nodes)
        })
        .await;
    let on = |node: &str| placement.iter().filter(|n| *n == node).count();
    // A regular node holds 20 pods.
    assert_eq!(on("spate-node-0"), 20, "{placement:?}");
    assert_eq!(on("spate-virtual-0"), 5, "{placement:?}");
}

#[tokio::test]
async fn a_pod_beyond_the_provider_quota_stays_pending_with_provider_failed() {
    let fx = Fixture::start(SimConfig {
        node: NodeConfig {
            max_pods_running: Some(2),
            ..fast_nodes()
        },
        ..SimConfig::default()
    })
    .await;
    let spec = "  completions: 3\n  parallelism: 3";
    let yaml = job_yaml("quota", spec, "", TOLERATE_VIRTUAL).replace("\"0.3\"", "\"60\"");
    fx.apply("job.yaml", &yaml).await;
    let refused = fx
        .eventually(
            "two running pods and one refused",
            Duration::from_secs(20),
            || async {
                let pods = fx.pods_of("quota").await;
                let running = pods.iter().filter(|p| phase(p) == "Running").count();
                let refused: Vec<Value> = pods
                    .iter()
                    .filter(|p| {
                        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                            == "ProviderFailed"
                    })
                    .cloned()
                    .collect();
                (running == 2 && refused.len() == 1).then(|| refused[0].clone())
            },
        )
        .await;
    assert_eq!(phase(&refused), "Pending");
    let message = refused["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("quota"), "{message}");
    let name = refused["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let events = fx
        .eventually(
            "a ProviderCreateFailed event",
            Duration::from_secs(10),
            || async {
                let out = fx.ok(&["get", "events", "-o", "json"]).await.json();
                let events = out["items"].as_array().cloned().unwrap_or_default();
                let found: Vec<Value> = events
                    .into_iter()
                    .filter(|e| e["reason"] == "ProviderCreateFailed")
                    .collect();
                (!found.is_empty()).then_some(found)
            },
        )
        .await;
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["involvedObject"]["name"], name.as_str());
    // Never retried: still refused a while later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pod = fx.ok(&["get", "pod", &name, "-o", "json"]).await.json();
    assert_eq!(phase(&pod), "Pending");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
        "ProviderFailed"
    );
}

#[tokio::test]
async fn jobs_complete_through_throttling_server_errors_and_dropped_watches() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 30\n  parallelism: 10\n  completionMode: Indexed";
    fx.apply("job.yaml", &job_yaml("stormy", spec, "", TOLERATE_VIRTUAL))
        .await;
    fx.cluster.faults().set(spate_sim::Faults {
        throttle_rate: 0.1,
        retry_after_seconds: 0,
        error_rate: 0.1,
        drop_watches_after_seconds: Some(1),
        ..spate_sim::Faults::default()
    });
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::default_namespaced(fx.cluster.client());
    fx.eventually(
        "the Job to complete despite faults",
        Duration::from_secs(60),
        || async {
            // Reads fail too while faults are on; a failed read is just another poll.
            let job = jobs.get("stormy").await.ok()?;
            let conditions = job.status?.conditions?;
            conditions
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    fx.cluster.faults().set(spate_sim::Faults::default());
    let job = fx.ok(&["get", "job", "stormy", "-o", "json"]).await.json();
    assert_eq!(job["status"]["completedIndexes"], "0-29");
    assert_eq!(job["status"]["succeeded"], 30);
    let pods = fx.pods_of("stormy").await;
    assert!(
        pods.iter().all(|p| phase(p) == "Succeeded"),
        "no pod failed or was left behind"
    );
}

#[tokio::test]
async fn a_thousand_pods_burst_onto_the_virtual_node_and_finish() {
    let fx = Fixture::virtual_only().await;
    let started = std::time::Instant::now();
    let mut manifests = String::new();
    for i in 0..20 {
        let spec = "  completions: 50\n  parallelism: 50\n  completionMode: Indexed";
        manifests.push_str(&job_yaml(&format!("batch-{i}"), spec, "", TOLERATE_VIRTUAL));
        manifests.push_str("---\n");
    }
    fx.apply("jobs.yaml", &manifests).await;
    for i in 0..20 {
        fx.wait_complete(&format!("batch-{i}")).await;
    }
    let elapsed = started.elapsed();
    let out = fx.ok(&["get", "pods", "-o", "json"]).await.json();
    let pods = out["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(pods.len(), 1000);
    assert!(pods.iter().all(|p| phase(p) == "Succeeded"));
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    eprintln!("1000 pods in {elapsed:?}");
}

#[tokio::test]
async fn pods_waiting_for_capacity_are_scheduled_as_others_finish() {
    let fx = Fixture::start(SimConfig {
        virtual_nodes: 0,
        regular_nodes: 1,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let spec = "  completions: 25\n  parallelism: 25";
    let yaml = job_yaml("queued", spec, "", "").replace("\"0.3\"", "\"3\"");
    fx.apply("job.yaml", &yaml).await;
    let message = fx
        .eventually(
            "pods beyond the node's 20 slots to wait",
            Duration::from_secs(20),
            || async {
                let pods = fx.pods_of("queued").await;
                let waiting: Vec<String> = pods
                    .iter()
                    .filter_map(|p| {
                        let conditions = p["status"]["conditions"].as_array()?;
                        let scheduled = conditions.iter().find(|c| c["type"] == "PodScheduled")?;
                        (scheduled["status"] == "False")
                            .then(|| scheduled["message"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect();
                (waiting.len() == 5).then(|| waiting[0].clone())
            },
        )
        .await;
    assert_eq!(message, "0/1 nodes are available: 1 Too many pods.");
    fx.wait_complete("queued").await;
    let pods = fx.pods_of("queued").await;
    assert_eq!(pods.len(), 25);
    assert!(
        pods.iter()
            .all(|p| phase(p) == "Succeeded" && p["spec"]["nodeName"] == "spate-node-0")
    );
}

#[tokio::test]
async fn foreground_and_orphan_cascades_are_honoured() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 2\n  parallelism: 2";
    for name in ["fore", "orphaned"] {
        let yaml = job_yaml(name, spec, "", TOLERATE_VIRTUAL).replace("\"0.3\"", "\"60\"");
        fx.apply(&format!("{name}.yaml"), &yaml).await;
        fx.eventually("two pods", Duration::from_secs(20), || async {
            (fx.pods_of(name).await.len() == 2).then_some(())
        })
        .await;
    }
    fx.ok(&[
        "delete",
        "job",
        "fore",
        "--cascade=foreground",
        "--timeout=30s",
    ])
    .await;
    assert!(
        fx.pods_of("fore").await.is_empty(),
        "foreground deletion removes the pods before the Job"
    );
    let job = fx.kubectl(&["get", "job", "fore"]).await;
    assert!(job.stderr.contains("NotFound"), "{}", job.stderr);

    fx.ok(&["delete", "job", "orphaned", "--cascade=orphan"])
        .await;
    fx.eventually(
        "the orphaned Job to be gone",
        Duration::from_secs(20),
        || async {
            fx.kubectl(&["get", "job", "orphaned"])
                .await
                .stderr
                .contains("NotFound")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pods = fx.pods_of("orphaned").await;
    assert_eq!(pods.len(), 2, "orphaned pods stay");
    assert!(pods.iter().all(|p| {
        p["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(Vec::is_empty)
    }));
}

#[tokio::test]
async fn suspending_a_job_stops_its_pods_and_resuming_finishes_it() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 2\n  parallelism: 2";
    let yaml = job_yaml("paused", spec, "", TOLERATE_VIRTUAL).replace("\"0.3\"", "\"2\"");
    fx.apply("job.yaml", &yaml).await;
    fx.eventually("two pods", Duration::from_secs(20), || async {
        (fx.pods_of("paused").await.len() == 2).then_some(())
    })
    .await;
    fx.ok(&[
        "patch",
        "job",
        "paused",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ])
    .await;
    fx.ok(&[
        "wait",
        "--for=condition=suspended",
        "job/paused",
        "--timeout=30s",
    ])
    .await;
    fx.eventually(
        "the pods to be stopped",
        Duration::from_secs(20),
        || async { fx.pods_of("paused").await.is_empty().then_some(()) },
    )
    .await;
    let job = fx.ok(&["get", "job", "paused", "-o", "json"]).await.json();
    assert_eq!(job["status"]["active"], 0);
    fx.ok(&[
        "patch",
        "job",
        "paused",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ])
    .await;
    fx.wait_complete("paused").await;
}

#[tokio::test]
async fn an_active_deadline_fails_the_job_and_stops_its_pods() {
    let fx = Fixture::virtual_only().await;
    let spec = "  completions: 1\n  activeDeadlineSeconds: 1";
    let yaml = job_yaml("late", spec, "", TOLERATE_VIRTUAL).replace("\"0.3\"", "\"60\"");
    fx.apply("job.yaml", &yaml).await;
    fx.ok(&[
        "wait",
        "--for=condition=failed",
        "job/late",
        "--timeout=30s",
    ])
    .await;
    let job = fx.ok(&["get", "job", "late", "-o", "json"]).await.json();
    let conditions = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = conditions
        .iter()
        .find(|c| c["type"] == "Failed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["reason"], "DeadlineExceeded");
    fx.eventually("the pod to be stopped", Duration::from_secs(20), || async {
        fx.pods_of("late").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn kubectl_logs_follows_a_running_exec_pod_and_tails() {
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: counter
spec:
  restartPolicy: Never
{TOLERATE_VIRTUAL}
  containers:
  - name: count
    image: busybox
    command: ["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.2; done"]
"#
    )
    .replace("\n      ", "\n  ");
    fx.apply("pod.yaml", &yaml).await;
    fx.eventually("the pod to run", Duration::from_secs(20), || async {
        let pod = fx.ok(&["get", "pod", "counter", "-o", "json"]).await.json();
        (phase(&pod) == "Running").then_some(())
    })
    .await;
    let followed = fx.ok(&["logs", "-f", "counter"]).await;
    assert_eq!(followed.stdout, "line-1\nline-2\nline-3\nline-4\nline-5\n");
    let tail = fx.ok(&["logs", "counter", "--tail=2"]).await;
    assert_eq!(tail.stdout, "line-4\nline-5\n");
    let stamped = fx
        .ok(&["logs", "counter", "--tail=1", "--timestamps"])
        .await;
    assert!(
        stamped.stdout.ends_with(" line-5\n") && stamped.stdout.len() > 20,
        "{}",
        stamped.stdout
    );
    let pod = fx.ok(&["get", "pod", "counter", "-o", "json"]).await.json();
    assert_eq!(phase(&pod), "Succeeded");
}

#[tokio::test]
async fn nodes_register_with_virtual_kubelet_conventions_and_renew_their_lease() {
    let fx = Fixture::start(SimConfig {
        regular_nodes: 1,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let nodes = fx
        .eventually("both nodes Ready", Duration::from_secs(20), || async {
            let out = fx.ok(&["get", "nodes", "-o", "json"]).await.json();
            let nodes = out["items"].as_array().cloned().unwrap_or_default();
            let ready = |n: &Value| {
                n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            };
            (nodes.len() == 2 && nodes.iter().all(ready)).then_some(nodes)
        })
        .await;
    let by_name: HashMap<&str, &Value> = nodes
        .iter()
        .map(|n| (n["metadata"]["name"].as_str().unwrap_or_default(), n))
        .collect();
    let virtual_node = by_name["spate-virtual-0"];
    assert_eq!(
        virtual_node["metadata"]["labels"]["type"],
        "virtual-kubelet"
    );
    assert_eq!(
        virtual_node["metadata"]["labels"]["kubernetes.io/role"],
        "agent"
    );
    assert_eq!(
        virtual_node["spec"]["taints"][0],
        serde_json::json!({"key": "virtual-kubelet.io/provider", "value": "spate", "effect": "NoSchedule"})
    );
    assert_eq!(virtual_node["status"]["allocatable"]["pods"], "10000");
    assert!(
        virtual_node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .is_some_and(|p| p > 0)
    );
    let addresses = virtual_node["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        addresses
            .iter()
            .any(|a| a["type"] == "InternalIP" && a["address"] == "127.0.0.1")
    );
    let regular = by_name["spate-node-0"];
    assert!(regular["spec"]["taints"].is_null());
    assert!(regular["metadata"]["labels"]["type"].is_null());
    assert_eq!(regular["status"]["allocatable"]["pods"], "20");

    let renew_time = || async {
        let lease = fx
            .ok(&[
                "get",
                "lease",
                "spate-virtual-0",
                "-n",
                "kube-node-lease",
                "-o",
                "json",
            ])
            .await
            .json();
        assert_eq!(lease["spec"]["holderIdentity"], "spate-virtual-0");
        lease["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    fx.eventually("the node's Lease", Duration::from_secs(10), || async {
        let out = fx
            .kubectl(&["get", "lease", "spate-virtual-0", "-n", "kube-node-lease"])
            .await;
        out.ok.then_some(())
    })
    .await;
    let before = renew_time().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_ne!(renew_time().await, before, "the Lease is renewed");
}

#[tokio::test]
async fn exec_pods_see_their_config_maps_secrets_and_downward_api() {
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let scratch = fx.dir.path().join("mounted");
    let yaml = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  greeting: bonjour
  size: "128"
---
apiVersion: v1
kind: Secret
metadata:
  name: credentials
stringData:
  token: s3cr3t
---
apiVersion: v1
kind: Pod
metadata:
  name: reader
  labels:
    app: thumbnailer
spec:
  restartPolicy: Never
  tolerations:
  - {{key: virtual-kubelet.io/provider, operator: Exists, effect: NoSchedule}}
  volumes:
  - name: settings
    configMap:
      name: settings
  - name: scratch
    emptyDir: {{}}
  containers:
  - name: read
    image: busybox
    command: ["/bin/sh", "-c"]
    args:
    - >-
      echo "greeting=$(cat $SPATE_SIM_VOLUME_ROOT/etc/settings/greeting)";
      echo "direct=$(cat {scratch}/size)";
      echo "token=$TOKEN size=$SIZE pod=$POD_NAME app=$APP";
      touch $SPATE_SIM_VOLUME_ROOT/work/out && echo wrote
    env:
    - name: TOKEN
      valueFrom:
        secretKeyRef: {{name: credentials, key: token}}
    - name: SIZE
      valueFrom:
        configMapKeyRef: {{name: settings, key: size}}
    - name: POD_NAME
      valueFrom:
        fieldRef: {{fieldPath: metadata.name}}
    - name: APP
      valueFrom:
        fieldRef: {{fieldPath: "metadata.labels['app']"}}
    volumeMounts:
    - name: settings
      mountPath: /etc/settings
    - name: settings
      mountPath: {scratch}
    - name: scratch
      mountPath: /work
"#,
        scratch = scratch.display(),
    );
    fx.apply("reader.yaml", &yaml).await;
    fx.eventually("the pod to finish", Duration::from_secs(30), || async {
        let pod = fx.ok(&["get", "pod", "reader", "-o", "json"]).await.json();
        matches!(phase(&pod), "Succeeded" | "Failed").then_some(())
    })
    .await;
    let logs = fx.ok(&["logs", "reader"]).await;
    assert_eq!(
        logs.stdout,
        "greeting=bonjour\ndirect=128\ntoken=s3cr3t size=128 pod=reader app=thumbnailer\nwrote\n"
    );
    let pod = fx.ok(&["get", "pod", "reader", "-o", "json"]).await.json();
    assert_eq!(phase(&pod), "Succeeded");
}

#[tokio::test]
async fn on_failure_pods_restart_in_place_until_the_backoff_limit() {
    let fx = Fixture::virtual_only().await;
    let spec = "  backoffLimit: 2";
    let yaml = job_yaml(
        "flaky",
        spec,
        "        sim.spate.dev/fail: \"true\"",
        TOLERATE_VIRTUAL,
    )
    .replace("restartPolicy: Never", "restartPolicy: OnFailure");
    fx.apply("job.yaml", &yaml).await;
    fx.ok(&[
        "wait",
        "--for=condition=failed",
        "job/flaky",
        "--timeout=30s",
    ])
    .await;
    let job = fx.ok(&["get", "job", "flaky", "-o", "json"]).await.json();
    let conditions = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = conditions
        .iter()
        .find(|c| c["type"] == "Failed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["reason"], "BackoffLimitExceeded");
    assert!(
        job["status"]["failed"].as_i64().is_some_and(|f| f > 2),
        "{}",
        job["status"]
    );
}

#[tokio::test]
async fn a_thousand_jobs_each_run_their_pod_and_complete() {
    const JOBS: usize = 1000;
    use k8s_openapi::api::batch::v1::Job;
    let fx = Fixture::virtual_only().await;
    let jobs: Api<Job> = Api::default_namespaced(fx.cluster.client());
    let started = std::time::Instant::now();
    let created = futures::stream::iter(0..JOBS)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                let yaml = job_yaml(
                    &format!("event-{i}"),
                    "  completions: 1",
                    "",
                    TOLERATE_VIRTUAL,
                );
                let job: Job = serde_saphyr::from_str(&yaml).expect("a valid Job manifest");
                jobs.create(&kube::api::PostParams::default(), &job)
                    .await
                    .is_ok()
            }
        })
        .buffer_unordered(32)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(created, JOBS);
    let complete = |job: &Job| {
        job.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    };
    fx.eventually(
        "every Job to complete",
        Duration::from_secs(120),
        || async {
            let list = jobs.list(&kube::api::ListParams::default()).await.ok()?;
            (list.items.iter().filter(|j| complete(j)).count() == JOBS).then_some(())
        },
    )
    .await;
    eprintln!("{JOBS} Jobs in {:?}", started.elapsed());
}

#[tokio::test]
async fn an_index_that_keeps_failing_is_reported_in_failed_indexes() {
    let fx = Fixture::start(SimConfig {
        exec: true,
        node: fast_nodes(),
        ..SimConfig::default()
    })
    .await;
    let yaml = format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: items
spec:
  completions: 4
  parallelism: 4
  completionMode: Indexed
  backoffLimitPerIndex: 1
  template:
    spec:
      restartPolicy: Never
{TOLERATE_VIRTUAL}
      containers:
      - name: item
        image: busybox
        command: ["/bin/sh", "-c", "test \"$JOB_COMPLETION_INDEX\" != 2"]
"#
    );
    fx.apply("job.yaml", &yaml).await;
    fx.ok(&[
        "wait",
        "--for=condition=failed",
        "job/items",
        "--timeout=60s",
    ])
    .await;
    let job = fx.ok(&["get", "job", "items", "-o", "json"]).await.json();
    assert_eq!(job["status"]["failedIndexes"], "2");
    assert_eq!(job["status"]["completedIndexes"], "0-1,3");
    assert_eq!(job["status"]["failed"], 2, "index 2 ran twice (one retry)");
    let conditions = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let failed = conditions
        .iter()
        .find(|c| c["type"] == "Failed")
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["reason"], "FailedIndexes");
}
