//! The `spate` verbs that work on a cluster (`apply`, `get`, `describe`, `trigger`, `logs`,
//! `retry`), run as the built binary against the simulator, and checked through the API and
//! the real kubectl.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event as KubeEvent;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use spate::engine::tenancy::Tenancy;
use spate::pipeline::Pipeline;
use spate_sim::{SimCluster, SimConfig};
use spate_sinks::kubernetes_event::{
    EVENT_ANNOTATION, EVENT_OMITTED_ANNOTATION, KubernetesEventSink, RETRIED_ANNOTATION,
};
use spate_sinks::{Outcome, PipelineRef, Record, SinkConfig, SinkContext};

const PIPELINE: &str = r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: frames
spec:
  source:
    amqp: {url: "amqp://127.0.0.1:5672/%2f", queue: frames}
  fanout: {maxParallelism: 10}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/run-seconds: "0.2"
        spec:
          containers:
            - name: render
              image: busybox:1.36
              env:
                - name: FRAME
                  value: "{{ event.data.frame }}"
"#;

fn event(id: &str, frame: u32) -> String {
    json!({"id": id, "subject": "frames", "routingKey": "frames", "exchange": "",
           "headers": {}, "data": {"frame": frame}})
    .to_string()
}

/// A simulated cluster, a kubeconfig for it and a folder for files.
struct Env {
    cluster: SimCluster,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Env {
    async fn start(crd: bool) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig).unwrap();
        let env = Env {
            cluster,
            dir,
            kubeconfig,
        };
        if crd {
            env.install_crd().await;
        }
        env
    }

    async fn install_crd(&self) {
        crate::common::install_crd(&self.cluster.client()).await;
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `spate --kubeconfig ... ARGS`, with `stdin` as its input.
    async fn spate(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spate"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "off");
        run(command, stdin.map(str::to_string)).await
    }

    /// Runs `spate`, asserting it succeeds; its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.spate(args, None).await;
        assert!(
            output.status.success(),
            "spate {args:?} failed: {}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    /// Runs `spate`, asserting it fails; its stderr.
    async fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.spate(args, stdin).await;
        assert!(
            !output.status.success(),
            "spate {args:?} should have failed: {}",
            text(&output.stdout)
        );
        text(&output.stderr)
    }

    async fn apply_pipeline(&self) -> String {
        let file = self.file("pipeline.yaml", PIPELINE);
        self.ok(&["apply", "-f", file.to_str().unwrap()]).await
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.cluster.client(), "default")
    }

    async fn job_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .jobs()
            .list(&ListParams::default().labels("spate.dev/pipeline=frames"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|job| job.metadata.name)
            .collect();
        names.sort();
        names
    }

    async fn wait_complete(&self, job: &str) {
        for _ in 0..300 {
            let done = self
                .jobs()
                .get(job)
                .await
                .ok()
                .and_then(|job| job.status)
                .and_then(|status| status.succeeded)
                == Some(1);
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Job {job} did not complete");
    }
}

async fn run(mut command: Command, stdin: Option<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(stdin) = stdin {
            input.write_all(stdin.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The words of each line of a table.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|line| line.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The job name `spate trigger` reports: `job.batch/NAME created`.
fn created_job(stdout: &str) -> String {
    stdout
        .trim()
        .strip_prefix("job.batch/")
        .and_then(|rest| rest.strip_suffix(" created"))
        .unwrap_or_else(|| panic!("not a creation: {stdout}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_validates_every_file_then_creates_leaves_unchanged_and_configures() {
    let env = Env::start(false).await;
    let valid = env.file("pipeline.yaml", PIPELINE);
    let valid = valid.to_str().unwrap();

    let error = env.fails(&["apply", "-f", valid], None).await;
    assert!(error.contains("spate crd | kubectl apply -f -"), "{error}");
    env.install_crd().await;

    // One invalid file among valid ones: its mistakes at file:line:column, nothing applied.
    let invalid = env.file(
        "invalid.yaml",
        &PIPELINE
            .replace("name: frames", "name: broken")
            .replace("maxParallelism: 10", "maxParallelism: lots"),
    );
    let error = env
        .fails(
            &["apply", "-f", valid, "-f", invalid.to_str().unwrap()],
            None,
        )
        .await;
    let expected = format!("{}:8:", invalid.display());
    assert!(error.contains(&expected), "{error}");
    assert!(error.contains("spec.fanout.maxParallelism"), "{error}");
    assert!(error.contains("nothing was applied"), "{error}");
    let pipelines: Api<Pipeline> = Api::namespaced(env.cluster.client(), "default");
    assert!(
        pipelines
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    assert_eq!(
        env.ok(&["apply", "-f", valid]).await,
        "pipeline.spate.dev/frames created\n"
    );
    assert_eq!(
        env.ok(&["apply", "-f", valid]).await,
        "pipeline.spate.dev/frames unchanged\n"
    );
    // From standard input, changed.
    let changed = PIPELINE.replace("maxParallelism: 10", "maxParallelism: 20");
    let output = env.spate(&["apply", "-f", "-"], Some(&changed)).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "pipeline.spate.dev/frames configured\n"
    );
    let applied = pipelines.get("frames").await.unwrap();
    assert_eq!(applied.spec.fanout.max_parallelism, 20);
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.manager.clone())
        .collect();
    assert!(managers.contains(&"spate".to_string()), "{managers:?}");

    // The real kubectl sees it.
    let mut kubectl = Command::new("kubectl");
    kubectl
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["get", "pipelines", "-o", "name"]);
    let listed = run(kubectl, None).await;
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert_eq!(text(&listed.stdout).trim(), "pipeline.spate.dev/frames");

    // Another namespace on the command line than in the file is refused.
    let placed = env.file(
        "placed.yaml",
        &PIPELINE.replace("name: frames", "name: frames\n  namespace: media"),
    );
    let error = env
        .fails(
            &["apply", "-f", placed.to_str().unwrap(), "-n", "other"],
            None,
        )
        .await;
    assert!(error.contains("does not match -n"), "{error}");

    // A cluster that cannot be reached is named.
    let server = env.cluster.url();
    env.cluster.shutdown().await;
    let error = Env::fails_without_cluster(&env.kubeconfig, &["get", "pipelines"]).await;
    assert!(
        error.contains(&format!(
            "cannot reach the Kubernetes API at {}",
            server.trim_end_matches('/')
        )),
        "{error}"
    );
}

impl Env {
    async fn fails_without_cluster(kubeconfig: &Path, args: &[&str]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_spate"));
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .env("RUST_LOG", "off");
        let output = run(command, None).await;
        assert!(!output.status.success());
        text(&output.stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_describe_show_pipelines_and_jobs_as_tables_wide_yaml_and_json() {
    let env = Env::start(true).await;
    env.apply_pipeline().await;
    let pipelines: Api<Pipeline> = Api::namespaced(env.cluster.client(), "default");
    let status = json!({"status": {
        "source": "amqp", "received": 12, "pending": 2, "running": 3, "succeeded": 7,
        "failed": 1, "deadLettered": 1, "sourceLag": 40,
        "lastError": "cannot render the Job template",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                        "message": "taking events", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    }});
    pipelines
        .patch_status("frames", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let table = rows(&env.ok(&["get", "pipelines"]).await);
    assert_eq!(
        table[0],
        [
            "NAME",
            "SOURCE",
            "MODE",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
            "AGE"
        ]
    );
    assert_eq!(table[1][..6], ["frames", "amqp", "perEvent", "3", "7", "1"]);
    let wide = env.ok(&["get", "pl", "-o", "wide"]).await;
    let header = wide.lines().next().unwrap();
    for column in [
        "RECEIVED",
        "QUEUED",
        "LAG",
        "DEAD-LETTERED",
        "PAUSED",
        "READY",
        "LAST ERROR",
    ] {
        assert!(header.contains(column), "{wide}");
    }
    let row = &rows(&wide)[1];
    assert_eq!(
        row[7..13],
        ["12", "2", "40", "1", "false", "True"],
        "{wide}"
    );
    assert!(wide.contains("cannot render the Job template"), "{wide}");
    let all = rows(&env.ok(&["get", "pipeline", "-A"]).await);
    assert_eq!(all[0][0], "NAMESPACE");
    assert_eq!(all[1][..2], ["default", "frames"]);

    let one: Value = serde_json::from_str(&env.ok(&["get", "pl", "frames", "-o", "json"]).await)
        .expect("-o json is JSON");
    assert_eq!(one["kind"], "Pipeline");
    assert_eq!(one["status"]["succeeded"], 7);
    assert!(one["metadata"].get("managedFields").is_none());
    let list: Value =
        serde_json::from_str(&env.ok(&["get", "pipelines", "-o", "json"]).await).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["name"], "frames");
    let yaml = env.ok(&["get", "pl", "frames", "-o", "yaml"]).await;
    assert!(
        yaml.starts_with("apiVersion: spate.dev/v1alpha1\nkind: Pipeline\n"),
        "{yaml}"
    );

    let error = env.fails(&["get", "pl", "nope"], None).await;
    assert!(
        error.contains("\"nope\" not found in namespace \"default\""),
        "{error}"
    );

    // Jobs.
    let stderr = text(&env.spate(&["get", "jobs"], None).await.stderr);
    assert!(
        stderr.contains("No resources found in default namespace"),
        "{stderr}"
    );
    let job = created_job(
        &env.ok(&["trigger", "frames", "--event", &event("f-1", 1)])
            .await,
    );
    env.wait_complete(&job).await;
    let table = rows(&env.ok(&["get", "jobs"]).await);
    assert_eq!(
        table[0],
        ["NAME", "PIPELINE", "COMPLETIONS", "STATUS", "AGE"]
    );
    assert_eq!(table[1][..4], [job.as_str(), "frames", "1/1", "Complete"]);
    let wide = rows(&env.ok(&["get", "jobs", "-p", "frames", "-o", "wide"]).await);
    assert_eq!(wide[0][5..], ["EVENTS", "NODES"]);
    assert_eq!(wide[1][5..], ["f-1", "spate-virtual-0"]);
    let jobs: Value = serde_json::from_str(&env.ok(&["get", "jobs", "-o", "json"]).await).unwrap();
    assert_eq!(jobs["items"][0]["kind"], "Job");
    assert_eq!(
        jobs["items"][0]["metadata"]["labels"]["spate.dev/pipeline"],
        "frames"
    );
    let one: Value =
        serde_json::from_str(&env.ok(&["get", "job", &job, "-o", "json"]).await).unwrap();
    assert_eq!(one["metadata"]["name"], job.as_str());
    assert!(env.ok(&["get", "jobs", "-p", "other"]).await.is_empty());

    let description = env.ok(&["describe", "pipeline", "frames"]).await;
    for expected in [
        "Name:         frames",
        "Namespace:    default",
        "Kind:       amqp",
        "queue:      frames",
        "Max parallelism:  10 pods",
        "jobTemplate: render (busybox:1.36)",
        "Placement:    virtual",
        "Dead letters:  kubernetesEvent",
        "Received:      12",
        "Dead-lettered: 1",
        "Source lag:    40",
        "Ready",
        "taking events",
        "Recent Jobs:",
        &job,
        "Events:        <none>",
    ] {
        assert!(
            description.contains(expected),
            "{expected} in:\n{description}"
        );
    }
    let error = env
        .fails(&["describe", "pl", "nope", "-n", "media"], None)
        .await;
    assert!(
        error.contains("\"nope\" not found in namespace \"media\""),
        "{error}"
    );
    env.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_creates_the_engines_job_once_and_refuses_bad_events() {
    let env = Env::start(true).await;
    env.apply_pipeline().await;
    let file = env.file("pipeline.yaml", PIPELINE);
    let file = file.to_str().unwrap();
    let pipeline: Api<Pipeline> = Api::namespaced(env.cluster.client(), "default");
    let uid = pipeline.get("frames").await.unwrap().metadata.uid.unwrap();

    let first = event("f-1", 7);
    let job = created_job(&env.ok(&["trigger", "frames", "--event", &first]).await);
    assert_eq!(job, spate::naming::job_name("default", "frames", &["f-1"]));
    // Exactly the Job `spate render` shows for the event, which is what the engine creates.
    let rendered: Value = serde_json::from_str(
        &env.ok(&["render", "-f", file, "--event", &first, "-o", "json"])
            .await,
    )
    .unwrap();
    let created = env.jobs().get(&job).await.unwrap();
    assert_eq!(rendered["metadata"]["name"], job.as_str());
    let labels = created.metadata.labels.clone().unwrap();
    assert_eq!(labels["spate.dev/pipeline"], "frames");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "spate");
    assert_eq!(
        labels["spate.dev/batch"],
        rendered["metadata"]["labels"]["spate.dev/batch"]
    );
    let annotations = created.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["spate.dev/event-ids"], r#"["f-1"]"#);
    assert_eq!(annotations["spate.dev/source"], "amqp");
    let owner = &created.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Pipeline", uid.as_str())
    );
    let pod = created.spec.unwrap().template.spec.unwrap();
    let env_vars: Vec<(String, String)> = pod.containers[0]
        .env
        .iter()
        .flatten()
        .map(|var| (var.name.clone(), var.value.clone().unwrap_or_default()))
        .collect();
    let rendered_env: Vec<(String, String)> = rendered["spec"]["template"]["spec"]["containers"][0]
        ["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|var| {
            (
                var["name"].as_str().unwrap().to_string(),
                var["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(env_vars, rendered_env);
    assert!(env_vars.contains(&("FRAME".to_string(), "7".to_string())));
    assert!(env_vars.contains(&("SPATE_EVENT_ID".to_string(), "f-1".to_string())));
    assert_eq!(pod.node_selector.unwrap()["type"], "virtual-kubelet");

    // The same event again: the same Job, reported, nothing new.
    let again = env.ok(&["trigger", "frames", "--event", &first]).await;
    assert!(
        again.contains(&format!("job.batch/{job} already exists")),
        "{again}"
    );
    assert_eq!(env.job_names().await, [job.as_str()]);

    // Bad events: clear errors, non-zero, no Job.
    let error = env
        .fails(&["trigger", "frames", "--event", "{\"id\": \"f-2\""], None)
        .await;
    assert!(error.contains("the event is not valid JSON"), "{error}");
    let error = env
        .fails(
            &[
                "trigger",
                "frames",
                "--event",
                r#"{"subject":"frames","routingKey":"frames","exchange":""}"#,
            ],
            None,
        )
        .await;
    assert!(error.contains("missing id"), "{error}");
    let error = env
        .fails(
            &[
                "trigger",
                "frames",
                "--event",
                r#"{"id":"f-2","subject":"frames"}"#,
            ],
            None,
        )
        .await;
    assert!(
        error.contains("is not what amqp sources deliver: missing exchange, routingKey"),
        "{error}"
    );
    let error = env
        .fails(
            &[
                "trigger",
                "frames",
                "--event",
                r#"{"id":"f-2","subject":"frames","routingKey":"frames","exchange":"","data":{}}"#,
            ],
            None,
        )
        .await;
    assert!(
        error.contains("event.data.frame") && error.contains("f-2"),
        "{error}"
    );
    let error = env
        .fails(&["trigger", "nope", "--event", &first], None)
        .await;
    assert!(
        error.contains("\"nope\" not found in namespace \"default\""),
        "{error}"
    );
    assert_eq!(env.job_names().await, [job.as_str()]);

    // From standard input; a dry run prints and creates nothing.
    let dry = env
        .ok(&[
            "trigger",
            "frames",
            "--event",
            &event("f-3", 3),
            "--dry-run",
        ])
        .await;
    assert!(
        dry.starts_with("apiVersion: batch/v1\nkind: Job\n"),
        "{dry}"
    );
    assert!(
        dry.contains(&uid),
        "the dry run shows the owner reference: {dry}"
    );
    assert_eq!(env.job_names().await.len(), 1);
    let output = env
        .spate(
            &["trigger", "frames", "--event-file", "-"],
            Some(&event("f-3", 3)),
        )
        .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let second = created_job(&text(&output.stdout));
    // A pipeline file, as `spate run -f` runs it, names the Job the same way.
    let from_file = env
        .ok(&["trigger", "-f", file, "--event", &event("f-3", 3)])
        .await;
    assert!(
        from_file.contains(&format!("job.batch/{second} already exists")),
        "{from_file}"
    );
    assert_eq!(env.job_names().await.len(), 2);
    env.cluster.shutdown().await;
}

/// A child that is killed when dropped, also when the test panics.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_prints_each_pods_lines_with_its_job_and_follows_new_pods() {
    let env = Env::start(true).await;
    env.apply_pipeline().await;
    let first = created_job(
        &env.ok(&["trigger", "frames", "--event", &event("f-1", 1)])
            .await,
    );
    env.wait_complete(&first).await;

    // The simulated container writes `started`, `running for 0.2s`, `exit 0`.
    let logs = env.ok(&["logs", "frames"]).await;
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 3, "{logs}");
    let prefix = format!("[{first}/{first}-");
    assert!(lines.iter().all(|line| line.starts_with(&prefix)), "{logs}");
    assert!(lines[0].ends_with("] started"), "{logs}");
    assert!(lines[2].ends_with("] exit 0"), "{logs}");
    let tail = env
        .ok(&["logs", "frames", "--tail", "1", "--job", &first])
        .await;
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert!(tail.ends_with("] exit 0\n"), "{tail}");
    assert!(
        env.ok(&["logs", "frames", "--job", "other"])
            .await
            .is_empty()
    );
    let error = env.fails(&["logs", "nope"], None).await;
    assert!(
        error.contains("\"nope\" not found in namespace \"default\""),
        "{error}"
    );

    // Following: the pod of a Job created afterwards shows up.
    let mut command = Command::new(env!("CARGO_BIN_EXE_spate"));
    command
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["logs", "frames", "-f"])
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut follower = Running(command.spawn().unwrap());
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stdout = follower.0.stdout.take().unwrap();
    let stderr = follower.0.stderr.take().unwrap();
    for stream in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let lines_tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
    }
    let second = created_job(
        &env.ok(&["trigger", "frames", "--event", &event("f-2", 2)])
            .await,
    );
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
                seen.push(line);
                if seen
                    .iter()
                    .any(|l| l.starts_with(&format!("[{second}/")) && l.ends_with("exit 0"))
                {
                    return (true, seen);
                }
            }
        }
        (false, seen)
    })
    .await
    .unwrap();
    assert!(seen.0, "the new pod's lines never came: {:#?}", seen.1);
    assert!(
        seen.1.iter().any(|l| l.starts_with("spate: following [")),
        "{:#?}",
        seen.1
    );
    assert!(
        seen.1.iter().any(|l| l.starts_with(&prefix)),
        "the earlier pod is followed too: {:#?}",
        seen.1
    );
    drop(follower);
    env.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_re_runs_each_dead_letter_once_and_skips_what_was_not_kept() {
    let env = Env::start(true).await;
    env.apply_pipeline().await;
    let pipelines: Api<Pipeline> = Api::namespaced(env.cluster.client(), "default");
    let uid = pipelines.get("frames").await.unwrap().metadata.uid;

    // Dead letters as the engine writes them: through the default dead-letter sink.
    let client = env.cluster.client();
    let sink = SinkConfig::KubernetesEvent(KubernetesEventSink {})
        .build(&SinkContext {
            pipeline: PipelineRef {
                namespace: "default".into(),
                name: "frames".into(),
                uid,
            },
            secrets: Arc::new(spate::engine::secrets::KubeSecrets {
                client: client.clone(),
                namespace: "default".into(),
                authority: Tenancy::SingleTenant.for_namespace("default"),
            }),
            kube: Some(client.clone()),
        })
        .await
        .unwrap();
    let letter = |event: Value, job: &str| Record {
        pipeline: "default/frames".into(),
        outcome: Outcome::DeadLettered,
        event,
        job: Some(job.to_string()),
        reason: Some("Job failed: BackoffLimitExceeded".into()),
        at: "2026-01-01T00:00:00Z".into(),
    };
    let failed: Value = serde_json::from_str(&event("f-9", 9)).unwrap();
    let big = json!({"id": "huge", "subject": "frames", "routingKey": "frames", "exchange": "",
                     "data": {"frame": 1, "blob": "x".repeat(70 * 1024)}});
    sink.deliver(&[
        letter(failed.clone(), "frames-old"),
        letter(big, "frames-old2"),
    ])
    .await
    .unwrap();

    let description = env.ok(&["describe", "pipeline", "frames"]).await;
    assert!(description.contains("DeadLettered"), "{description}");
    assert!(
        description.contains("event f-9 dead-lettered"),
        "{description}"
    );

    let dry = env.ok(&["retry", "frames", "--dry-run"]).await;
    assert_eq!(
        dry,
        "1 dead-lettered item to re-run, 1 skipped: event too large to keep\n"
    );
    assert!(env.job_names().await.is_empty());

    let summary = env.ok(&["retry", "frames"]).await;
    assert_eq!(
        summary,
        "1 dead-lettered item re-run, 1 skipped: event too large to keep\n"
    );
    let jobs = env.job_names().await;
    assert_eq!(jobs.len(), 1);
    let rerun = env.jobs().get(&jobs[0]).await.unwrap();
    // A new name, not the one the event's first Job (or a trigger) has.
    assert_ne!(
        jobs[0],
        spate::naming::job_name("default", "frames", &["f-9"])
    );
    let annotations = rerun.metadata.annotations.clone().unwrap();
    assert_eq!(annotations["spate.dev/event-ids"], r#"["f-9"]"#);
    assert_eq!(annotations["spate.dev/retry"], "1");
    assert_eq!(annotations["spate.dev/retry-of"], "frames-old");
    let env_vars = rerun
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap();
    let event_var = env_vars.iter().find(|v| v.name == "SPATE_EVENT").unwrap();
    let carried: Value = serde_json::from_str(event_var.value.as_deref().unwrap()).unwrap();
    assert_eq!(carried, failed);

    let events: Api<KubeEvent> = Api::namespaced(client.clone(), "default");
    let letters = events
        .list(&ListParams::default().fields("reason=DeadLettered"))
        .await
        .unwrap()
        .items;
    let marked: Vec<_> = letters
        .iter()
        .filter_map(|e| e.metadata.annotations.as_ref())
        .filter(|a| a.contains_key(EVENT_ANNOTATION))
        .map(|a| a.get(RETRIED_ANNOTATION).cloned())
        .collect();
    assert_eq!(marked, [Some(jobs[0].clone())]);
    assert!(
        letters
            .iter()
            .filter_map(|e| e.metadata.annotations.as_ref())
            .any(|a| a.contains_key(EVENT_OMITTED_ANNOTATION))
    );

    // A second retry runs nothing again.
    let again = env.ok(&["retry", "frames"]).await;
    assert_eq!(
        again,
        "0 dead-lettered items re-run, 1 skipped: event too large to keep\n"
    );
    assert_eq!(env.job_names().await, jobs);

    // The re-run failed too: its own dead letter is retried as generation 2, a new Job.
    sink.deliver(&[letter(failed, &jobs[0])]).await.unwrap();
    let third = env.ok(&["retry", "frames", "--event-id", "f-9"]).await;
    assert_eq!(third, "1 dead-lettered item re-run\n");
    let now = env.job_names().await;
    assert_eq!(now.len(), 2);
    let newest = now.iter().find(|name| **name != jobs[0]).unwrap();
    let annotations = env
        .jobs()
        .get(newest)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap();
    assert_eq!(annotations["spate.dev/retry"], "2");
    assert_eq!(annotations["spate.dev/retry-of"], jobs[0].as_str());
    env.cluster.shutdown().await;
}

#[test]
fn every_verb_teaches_with_examples() {
    for verb in ["apply", "get", "describe", "trigger", "logs", "retry"] {
        let output = Command::new(env!("CARGO_BIN_EXE_spate"))
            .args([verb, "--help"])
            .output()
            .unwrap();
        assert!(output.status.success());
        let help = text(&output.stdout);
        assert!(help.contains("Examples:\n  spate "), "{verb}: {help}");
        assert!(help.contains("--namespace"), "{verb}: {help}");
    }
}
