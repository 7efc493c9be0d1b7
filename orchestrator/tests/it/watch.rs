//! `spate watch` against the simulator, run as the real binary: plain and JSON lines during a
//! burst, `--until-idle`, and the terminal UI in a real terminal (tmux).
//!
//! The bursts are made without the engine: Jobs labelled `spate.dev/pipeline=<name>` (on the
//! Job and its pod template, as `render` labels them) that tolerate the virtual node, which
//! the simulator runs for `sim.spate.dev/run-seconds`. The watch only reads the API, so it
//! cannot tell these from the engine's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use spate::pipeline::Pipeline;
use spate_sim::{SimCluster, SimConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const SPATE: &str = env!("CARGO_BIN_EXE_spate");

struct Cluster {
    sim: SimCluster,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

/// A simulated cluster with one virtual node and one regular node.
async fn cluster() -> Cluster {
    spate_sim::install_crypto_provider();
    let config = SimConfig {
        regular_nodes: 1,
        ..SimConfig::default()
    };
    let sim = SimCluster::start(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).unwrap();
    Cluster {
        sim,
        kubeconfig,
        _dir: dir,
    }
}

/// A Job of `pipeline` as the engine would make it: labelled, on the virtual node.
fn job(pipeline: &str, name: &str, run_seconds: f64, fail: bool) -> Job {
    let labels = json!({"spate.dev/pipeline": pipeline, "app.kubernetes.io/managed-by": "spate"});
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"spate.dev/event-ids": format!("[\"{name}\"]")}
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "sim.spate.dev/run-seconds": run_seconds.to_string(),
                        "sim.spate.dev/fail": fail.to_string()
                    }
                },
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"type": "virtual-kubelet"},
                    "tolerations": [{"key": "virtual-kubelet.io/provider",
                                     "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "work", "image": "busybox"}]
                }
            }
        }
    }))
    .unwrap()
}

/// Creates `count` Jobs named `<pipeline>-<prefix>-<i>`, `spacing` apart.
async fn burst(
    client: &kube::Client,
    pipeline: &str,
    prefix: &str,
    count: usize,
    run_seconds: f64,
    fail: bool,
    spacing: Duration,
) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    for i in 0..count {
        let name = format!("{pipeline}-{prefix}-{i}");
        jobs.create(
            &PostParams::default(),
            &job(pipeline, &name, run_seconds, fail),
        )
        .await
        .unwrap();
        tokio::time::sleep(spacing).await;
    }
}

/// A Pipeline resource (no controller runs it) with `status` written as a controller would.
async fn pipeline_with_status(client: &kube::Client, name: &str, status: Value) {
    crate::common::install_crd(client).await;
    let yaml = format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: default
spec:
  source:
    amqp: {{url: "amqp://127.0.0.1:5672/%2f", queue: {name}}}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
    );
    let pipeline = spate::pipeline::load_str(&yaml, "p.yaml")
        .unwrap()
        .remove(0)
        .pipeline;
    let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), "default");
    pipelines
        .create(&PostParams::default(), &pipeline)
        .await
        .unwrap();
    set_status(client, name, status).await;
}

async fn set_status(client: &kube::Client, name: &str, status: Value) {
    let pipelines: Api<Pipeline> = Api::namespaced(client.clone(), "default");
    pipelines
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();
}

fn ready_condition() -> Value {
    json!([{"type": "Ready", "status": "True", "reason": "Running", "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z"}])
}

/// `spate watch` as a child process, its stdout lines on a channel.
struct Watch {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

fn start_watch(cluster: &Cluster, args: &[&str]) -> Watch {
    let mut child = tokio::process::Command::new(SPATE)
        .arg("watch")
        .args(args)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["-n", "default"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Watch { child, lines }
}

impl Watch {
    async fn next_line(&mut self, seconds: u64) -> String {
        tokio::time::timeout(Duration::from_secs(seconds), self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("spate watch printed nothing for {seconds}s"))
            .expect("spate watch closed its stdout")
    }

    /// Waits for the process to exit (`--until-idle`); returns its exit code, the lines it
    /// printed since the last read and its stderr.
    async fn finish(mut self, seconds: u64) -> (Option<i32>, Vec<String>, String) {
        let status = tokio::time::timeout(Duration::from_secs(seconds), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("spate watch --until-idle still running after {seconds}s"))
            .unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).await.unwrap();
        }
        let mut lines = Vec::new();
        while let Some(line) = self.lines.recv().await {
            lines.push(line);
        }
        (status.code(), lines, stderr)
    }
}

/// `key=value` pairs of one segment of a plain line, by its first word (`jobs`, `pods`), or
/// `placement` for the one that starts with `virtual=`.
fn segment(line: &str, name: &str) -> BTreeMap<String, String> {
    line.split(" | ")
        .map(|segment| segment.split_whitespace().collect::<Vec<_>>())
        .find(|words| match name {
            "placement" => words.first().is_some_and(|w| w.starts_with("virtual=")),
            _ => words.first() == Some(&name) || words.get(1) == Some(&name),
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn count(map: &BTreeMap<String, String>, key: &str, line: &str) -> u64 {
    map.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_lines_follow_a_burst_up_and_back_to_zero() {
    let cluster = cluster().await;
    let client = cluster.sim.client();
    let mut watch = start_watch(
        &cluster,
        &[
            "burst-plain",
            "--output",
            "plain",
            "--interval",
            "200ms",
            "--until-idle",
            "--idle-for",
            "2s",
        ],
    );
    // The first line comes once the watches have listed: nothing yet.
    let first = watch.next_line(30).await;
    assert_eq!(
        count(&segment(&first, "jobs"), "active", &first),
        0,
        "{first}"
    );
    assert!(
        !first.contains("received="),
        "no Pipeline resource: {first}"
    );

    burst(
        &client,
        "burst-plain",
        "a",
        40,
        1.0,
        false,
        Duration::from_millis(20),
    )
    .await;
    let (code, rest, stderr) = watch.finish(120).await;
    let lines: Vec<String> = std::iter::once(first).chain(rest).collect();
    assert_eq!(
        code,
        Some(0),
        "--until-idle exits 0 once idle\n{}",
        lines.join("\n")
    );
    assert!(
        stderr.contains("no Pipeline resource burst-plain in namespace default"),
        "said once that the Pipeline resource is missing: {stderr}"
    );
    assert_eq!(
        stderr.matches("no Pipeline resource").count(),
        1,
        "{stderr}"
    );

    let mut peak = 0;
    for line in &lines {
        assert!(
            line.chars().take(8).all(|c| c.is_ascii_digit() || c == ':'),
            "starts with a clock: {line}"
        );
        let pods = segment(line, "pods");
        let in_flight = count(&pods, "pending", line) + count(&pods, "running", line);
        peak = peak.max(count(&pods, "running", line));
        // The virtual node only: the regular node is never used.
        let placement = segment(line, "placement");
        assert_eq!(count(&placement, "regular", line), 0, "{line}");
        assert_eq!(
            count(&placement, "virtual", line) + count(&placement, "unscheduled", line),
            in_flight,
            "{line}"
        );
    }
    assert!(
        peak > 1,
        "running pods rose above one: peak {peak}\n{}",
        lines.join("\n")
    );
    let last = lines.last().unwrap();
    let (jobs, pods) = (segment(last, "jobs"), segment(last, "pods"));
    assert_eq!(
        (
            count(&jobs, "active", last),
            count(&jobs, "succeeded", last),
            count(&jobs, "failed", last)
        ),
        (0, 40, 0),
        "{last}"
    );
    assert_eq!(
        (
            count(&pods, "pending", last),
            count(&pods, "running", last),
            count(&pods, "succeeded", last)
        ),
        (0, 0, 40),
        "{last}"
    );
    // Only changes are printed: no two consecutive lines with the same counts.
    let counts_only = |line: &String| line.split_once(" | jobs/s").unwrap().0[8..].to_string();
    for pair in lines.windows(2) {
        assert_ne!(counts_only(&pair[0]), counts_only(&pair[1]), "{pair:?}");
    }
    cluster.sim.shutdown().await;
}

const STATUS_FIELDS: &[&str] = &[
    "type",
    "time",
    "namespace",
    "pipeline",
    "pipeline_found",
    "state",
    "received",
    "queued",
    "source_lag",
    "dead_lettered",
    "last_error",
    "jobs_active",
    "jobs_succeeded",
    "jobs_failed",
    "pods_pending",
    "pods_running",
    "pods_succeeded",
    "pods_failed",
    "virtual",
    "regular",
    "unscheduled",
    "nodes",
    "events_per_second",
    "jobs_per_second",
    "peak",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_show_the_pipeline_status_counts_and_failures() {
    let cluster = cluster().await;
    let client = cluster.sim.client();
    pipeline_with_status(
        &client,
        "burst-json",
        json!({"received": 20, "pending": 0, "deadLettered": 1, "sourceLag": 0,
               "lastError": "event 7: the object is gone", "conditions": ready_condition()}),
    )
    .await;
    let mut watch = start_watch(
        &cluster,
        &[
            "burst-json",
            "-o",
            "json",
            "--interval",
            "200ms",
            "--until-idle",
            "--idle-for",
            "2s",
        ],
    );
    let first = watch.next_line(30).await;
    tokio::join!(
        burst(
            &client,
            "burst-json",
            "ok",
            18,
            1.0,
            false,
            Duration::from_millis(20)
        ),
        burst(
            &client,
            "burst-json",
            "bad",
            2,
            0.5,
            true,
            Duration::from_millis(20)
        ),
    );
    let (code, rest, stderr) = watch.finish(120).await;
    let lines: Vec<String> = std::iter::once(first).chain(rest).collect();
    assert_eq!(code, Some(0), "{stderr}\n{}", lines.join("\n"));
    assert!(
        !stderr.contains("no Pipeline resource"),
        "the Pipeline exists: {stderr}"
    );

    let records: Vec<Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let statuses: Vec<&Value> = records.iter().filter(|r| r["type"] == "status").collect();
    let failures: Vec<&Value> = records.iter().filter(|r| r["type"] == "failure").collect();
    assert_eq!(statuses.len() + failures.len(), records.len(), "{lines:?}");
    for status in &statuses {
        for field in STATUS_FIELDS {
            assert!(status.get(*field).is_some(), "{field} missing: {status}");
        }
        assert_eq!(status["pipeline"], "burst-json");
        assert_eq!(status["namespace"], "default");
        assert_eq!(status["pipeline_found"], true);
        assert_eq!(status["state"], "ready");
        assert_eq!(status["received"], 20);
        assert_eq!(status["queued"], 0);
        assert_eq!(status["dead_lettered"], 1);
        assert_eq!(status["source_lag"], 0);
        assert_eq!(status["last_error"], "event 7: the object is gone");
        assert_eq!(status["regular"], 0);
    }
    let peak = statuses
        .iter()
        .map(|s| s["pods_running"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(peak > 0, "running pods rose above zero: {lines:?}");
    let last = statuses.last().unwrap();
    assert_eq!(last["jobs_active"], 0, "{last}");
    assert_eq!(last["jobs_succeeded"], 18, "{last}");
    assert_eq!(last["jobs_failed"], 2, "{last}");
    assert_eq!(last["pods_running"], 0, "{last}");
    assert_eq!(last["pods_pending"], 0, "{last}");
    assert_eq!(last["pods_failed"], 2, "{last}");
    assert!(last["peak"].as_u64().unwrap() >= peak, "{last}");
    assert!(
        statuses
            .iter()
            .any(|s| s["jobs_per_second"].as_f64().unwrap() > 0.0),
        "a Job creation rate was seen"
    );

    let said = |object: &str, text: &str| {
        failures.iter().any(|f| {
            f["object"].as_str().unwrap().starts_with(object)
                && f["message"].as_str().unwrap().contains(text)
        })
    };
    assert!(said("pod/burst-json-bad-", "exit 1"), "{failures:?}");
    assert!(
        said("job/burst-json-bad-", "BackoffLimitExceeded"),
        "{failures:?}"
    );
    assert!(
        said("pipeline/burst-json", "the object is gone"),
        "{failures:?}"
    );
    for failure in &failures {
        assert_eq!(failure["pipeline"], "burst-json");
        assert!(failure["time"].is_string());
    }
    cluster.sim.shutdown().await;
}

/// A private tmux server (its own socket) running one command; killed when dropped.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let found = std::process::Command::new("sh")
            .args(["-c", "command -v tmux"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "tmux is not installed: the terminal UI test runs spate watch in a real terminal \
             (apt-get install -y tmux; scripts/test installs it)"
        );
        let unique = format!(
            "spate-watch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let tmux = Tmux {
            socket: unique.clone(),
            session: unique,
        };
        let status = std::process::Command::new("tmux")
            .args(["-L", &tmux.socket, "-f", "/dev/null"])
            .args([
                "new-session",
                "-d",
                "-s",
                &tmux.session,
                "-x",
                "160",
                "-y",
                "48",
            ])
            .arg(command)
            .env_remove("TMUX")
            .env("TERM", "xterm-256color")
            .status()
            .unwrap();
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn capture(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "capture-pane",
                "-p",
                "-t",
                &self.session,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, key: &str) {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", &self.session, key])
            .status()
            .unwrap();
    }

    fn alive(&self) -> bool {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket, "has-session", "-t", &self.session])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// The number after `label ` on the first line holding every one of `markers`.
fn on_screen(screen: &str, markers: &[&str], label: &str) -> Option<u64> {
    let line = screen
        .lines()
        .find(|line| markers.iter().all(|m| line.contains(m)))?;
    let after = &line[line.find(&format!("{label} "))? + label.len() + 1..];
    after.split_whitespace().next()?.parse().ok()
}

async fn wait_screen(tmux: &Tmux, seconds: u64, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let screen = tmux.capture();
        if done(&screen) {
            return screen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {seconds}s; the screen:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_ui_shows_the_burst_a_jobs_pods_and_logs_and_quits() {
    let cluster = cluster().await;
    let client = cluster.sim.client();
    let name = "thumbnails";
    pipeline_with_status(
        &client,
        name,
        json!({"received": 0, "pending": 0, "conditions": ready_condition()}),
    )
    .await;
    let exit_file = cluster._dir.path().join("exit-code");
    let command = format!(
        "{} watch {name} --kubeconfig {} -n default --output tui; echo $? > {}",
        shell_quote(Path::new(SPATE)),
        shell_quote(&cluster.kubeconfig),
        shell_quote(&exit_file),
    );
    let tmux = Tmux::start(&command);
    let jobs_line = ["jobs:", "created"];
    let pods_line = ["pods:", "in flight"];
    wait_screen(&tmux, 30, "the view lists the pipeline", |s| {
        s.contains(&format!("spate watch {name}"))
            && !s.contains("listing…")
            && on_screen(s, &pods_line, "running") == Some(0)
    })
    .await;

    // What a controller would write while the burst runs: events received and queued.
    let status_client = client.clone();
    let status = tokio::spawn(async move {
        let jobs: Api<Job> = Api::namespaced(status_client.clone(), "default");
        loop {
            let list = jobs.list(&ListParams::default()).await.unwrap();
            let unfinished = list
                .items
                .iter()
                .filter(|j| {
                    !j.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.status == "True"))
                })
                .count();
            set_status(
                &status_client,
                "thumbnails",
                json!({"received": list.items.len(), "pending": unfinished}),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let jobs = tokio::spawn({
        let client = client.clone();
        async move {
            tokio::join!(
                burst(
                    &client,
                    name,
                    "img",
                    40,
                    4.0,
                    false,
                    Duration::from_millis(60)
                ),
                burst(
                    &client,
                    name,
                    "broken",
                    2,
                    1.0,
                    true,
                    Duration::from_millis(600)
                ),
            );
        }
    });

    // The burst: running pods rise; the fullest screen is kept as the docs' screenshot.
    let mut fullest = (0, String::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux.capture();
        let running = on_screen(&screen, &pods_line, "running").unwrap_or(0);
        if running > fullest.0 {
            fullest = (running, screen);
        }
        if fullest.0 >= 20 || (fullest.0 > 0 && jobs.is_finished()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "running pods never rose; the screen:\n{}",
            tmux.capture()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fullest.0 > 0);
    if let Ok(path) = std::env::var("SPATE_WATCH_SCREEN") {
        // Wait for a screen that has it all: the rise and the start of the fall, failures,
        // the Pipeline's counts.
        let screen = wait_screen(&tmux, 20, "a screen with failures", |s| {
            s.contains("pod/thumbnails-broken")
                && on_screen(s, &jobs_line, "succeeded") >= Some(12)
                && on_screen(s, &pods_line, "running") > Some(5)
        })
        .await;
        std::fs::write(path, screen).unwrap();
    }

    // Select a Job and open it: its pods and the selected pod's log.
    tmux.send("j");
    tmux.send("Enter");
    wait_screen(&tmux, 20, "the Job's pods and the pod's logs", |s| {
        s.contains("pods of job") && s.contains("logs of") && s.contains("started")
    })
    .await;
    tmux.send("Escape");
    wait_screen(&tmux, 10, "back to the Jobs", |s| {
        s.contains("recent failures")
    })
    .await;

    // And back to zero, every Job accounted for.
    jobs.await.unwrap();
    let screen = wait_screen(&tmux, 60, "all pods finished", |s| {
        on_screen(s, &pods_line, "running") == Some(0)
            && on_screen(s, &pods_line, "pending") == Some(0)
            && on_screen(s, &jobs_line, "succeeded") == Some(40)
            && on_screen(s, &jobs_line, "failed") == Some(2)
            && on_screen(s, &jobs_line, "active") == Some(0)
    })
    .await;
    assert!(screen.contains("pod/thumbnails-broken"), "{screen}");
    assert!(screen.contains("received 42"), "{screen}");
    status.abort();

    tmux.send("q");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "q did not end spate watch:\n{}",
            tmux.capture()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let code = std::fs::read_to_string(&exit_file).unwrap();
    assert_eq!(code.trim(), "0", "spate watch exit code");
    cluster.sim.shutdown().await;
}
