//! The chart's RBAC is exactly what the controller uses, proven on the simulator.
//!
//! `spate run` runs in controller mode with the very arguments of the chart's Deployment,
//! authenticated as the chart's ServiceAccount (the simulator records every request per
//! user), through a scenario that takes every code path that calls the Kubernetes API: the
//! leader Lease (created, then renewed), Pipelines watched and their status written, a
//! webhook source whose token is a `secretKeyRef` (Secret read), events becoming Jobs that
//! succeed and are marked reported, an event too large for env (input ConfigMap), an event
//! dead-lettered by its template (a Kubernetes Event), a pod stuck Pending past
//! `pendingTimeout` (the pod read again, its Job ended by a patch, then reported), an indexed cron pipeline (batch
//! ConfigMaps, checkpoints in ConfigMaps), pause and resume, and /metrics.
//!
//! Then the chart is rendered with the real Helm library and the test fails if the controller
//! made a request its Roles do not grant, or if a Role grants a verb on a resource the
//! controller never used (in that namespace). The table of requests is printed on failure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Secret};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use spate::pipeline::Pipeline;
use spate_sim::{RequestKey, SimCluster, SimConfig};

use crate::common::cluster::TestCluster;
use crate::common::{free_port, install_crd};

const WORK: &str = "work";
const RELEASE_NAMESPACE: &str = "spate-system";
const IDENTITY: &str = "spate-0";
const HOOK_TOKEN: &str = "hook-s3cret";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `helm template` of the chart (release `spate` in `spate-system`) with `values`.
fn render(values: &str) -> Vec<Value> {
    render_in(RELEASE_NAMESPACE, values)
}

/// `helm template` of the chart, release `spate` in `namespace`, with `values`.
fn render_in(namespace: &str, values: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let output = Command::new(repo().join("scripts/chart"))
        .args(["template", "--namespace", namespace])
        .arg(&file)
        .output()
        .expect("run scripts/chart");
    assert!(
        output.status.success(),
        "scripts/chart template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stream = String::from_utf8(output.stdout).unwrap();
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in stream.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if current
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                documents.push(serde_saphyr::from_str::<Value>(&current).unwrap());
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// One rule of a Role or ClusterRole, where it applies (`None`: every namespace).
#[derive(Debug, Clone)]
struct Grant {
    namespace: Option<String>,
    role: String,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

impl Grant {
    fn covers(&self, namespace: &str, verb: &str, group: &str, resource: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.groups.iter().any(|g| g == group)
            && self.resources.iter().any(|r| r == resource)
            && self.verbs.iter().any(|v| v == verb)
    }

    /// Every (group, resource, verb) the rule grants.
    fn triples(&self) -> Vec<(String, String, String)> {
        let mut triples = Vec::new();
        for group in &self.groups {
            for resource in &self.resources {
                for verb in &self.verbs {
                    triples.push((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
        triples
    }
}

/// The rules bound to `user` (`system:serviceaccount:<ns>:<name>`) by the rendered bindings.
fn grants_for(documents: &[Value], user: &str) -> Vec<Grant> {
    let bound_to_user = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"] == "ServiceAccount"
                    && format!(
                        "system:serviceaccount:{}:{}",
                        s["namespace"].as_str().unwrap_or_default(),
                        s["name"].as_str().unwrap_or_default()
                    ) == user
            })
    };
    let role = |kind: &str, name: &str, namespace: Option<&str>| {
        documents
            .iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"] == name
                    && (kind == "ClusterRole" || d["metadata"]["namespace"].as_str() == namespace)
            })
            .unwrap_or_else(|| panic!("{kind} {name} is bound but not rendered"))
    };
    let mut grants = Vec::new();
    for binding in documents.iter().filter(|d| bound_to_user(d)) {
        let (namespace, kind) = match binding["kind"].as_str() {
            Some("ClusterRoleBinding") => (None, "ClusterRole"),
            Some("RoleBinding") => (
                binding["metadata"]["namespace"].as_str(),
                binding["roleRef"]["kind"].as_str().unwrap_or_default(),
            ),
            _ => continue,
        };
        let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = role(kind, name, namespace);
        for rule in role["rules"].as_array().into_iter().flatten() {
            grants.push(Grant {
                namespace: namespace.map(str::to_string),
                role: format!(
                    "{kind} {}{name}",
                    namespace.map(|n| format!("{n}/")).unwrap_or_default()
                ),
                groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                names: strings(&rule["resourceNames"]),
            });
        }
    }
    grants
}

/// A request as RBAC sees it: namespace, verb, group, `resource[/subresource]`.
type Use = (String, String, String, String);

fn uses(requests: &[(RequestKey, u64)]) -> BTreeSet<Use> {
    requests
        .iter()
        .map(|(key, _)| {
            let resource = if key.subresource.is_empty() {
                key.resource.clone()
            } else {
                format!("{}/{}", key.resource, key.subresource)
            };
            (
                key.namespace.clone(),
                key.verb.clone(),
                key.group.clone(),
                resource,
            )
        })
        .collect()
}

fn table(requests: &[(RequestKey, u64)]) -> String {
    let mut text = format!(
        "{:<8} {:<20} {:<22} {:<14} {:>5} {:>6}\n",
        "VERB", "GROUP", "RESOURCE", "NAMESPACE", "CODE", "COUNT"
    );
    for (key, count) in requests {
        let resource = if key.subresource.is_empty() {
            key.resource.clone()
        } else {
            format!("{}/{}", key.resource, key.subresource)
        };
        let group = if key.group.is_empty() {
            "\"\""
        } else {
            &key.group
        };
        text.push_str(&format!(
            "{:<8} {:<20} {:<22} {:<14} {:>5} {:>6}\n",
            key.verb, group, resource, key.namespace, key.code, count
        ));
    }
    text
}

/// A child process killed when the test ends, also when it panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn eventually<F, Fut>(what: &str, seconds: u64, log: &Path, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{what}: {last}\n--- spate run, last lines:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pipeline_resources() -> Vec<Pipeline> {
    [hooks_pipeline(WORK), ticks_pipeline()].into()
}

fn load_pipeline(yaml: &str) -> Pipeline {
    spate::pipeline::load_str(yaml, "p.yaml")
        .unwrap_or_else(|e| panic!("{e:#?}"))
        .remove(0)
        .pipeline
}

/// Webhook calls with a bearer token from the Secret `hook-token`, in `namespace`.
fn hooks_pipeline(namespace: &str) -> Pipeline {
    load_pipeline(&format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: hooks
  namespace: {namespace}
spec:
  source:
    webhook:
      path: /hooks/work
      auth: {{bearer: {{token: {{secretKeyRef: {{name: hook-token, key: token}}}}}}}}
  fanout: {{maxParallelism: 20, maxJobsPerSecond: 100, burst: 20}}
  retry: {{pendingTimeout: 3s}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/run-seconds: "0.2"
            sim.spate.dev/start-seconds: "{{{{ event.data.start }}}}"
        spec:
          containers:
            - name: work
              image: busybox:1.36
              env:
                - {{name: CUSTOMER, value: "{{{{ event.data.customer }}}}"}}
"#
    ))
}

fn ticks_pipeline() -> Pipeline {
    load_pipeline(&format!(
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: ticks
  namespace: {WORK}
spec:
  source:
    cron: {{schedule: "* * * * * *", missedRuns: skip}}
  fanout: {{mode: indexed, batchSize: 3, maxWait: 2s, maxParallelism: 10}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/run-seconds: "0.2"
        spec:
          containers:
            - name: work
              image: busybox:1.36
"#
    ))
}

/// The container args of the chart's Deployment, made runnable on this machine.
fn deployment_command(
    documents: &[Value],
    namespace: &str,
    state: &Path,
    metrics: u16,
    webhooks: u16,
) -> Command {
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut command = Command::new(env!("CARGO_BIN_EXE_spate"));
    for arg in strings(&container["args"]) {
        let (flag, _) = arg.split_once('=').unwrap_or((&arg, ""));
        let arg = match flag {
            "--metrics-listen" => format!("{flag}=127.0.0.1:{metrics}"),
            "--webhook-listen" => format!("{flag}=127.0.0.1:{webhooks}"),
            "--state-dir" => format!("{flag}={}", state.display()),
            _ => arg.replace("$(POD_NAME)", IDENTITY),
        };
        command.arg(arg);
    }
    for var in container["env"].as_array().into_iter().flatten() {
        if let Some(value) = var["value"].as_str() {
            command.env(var["name"].as_str().unwrap(), value);
        }
    }
    command
        .env("POD_NAME", IDENTITY)
        .env("POD_NAMESPACE", namespace);
    command
}

/// Grants the scenario cannot reach in its time, each with the code that needs it: every other
/// grant must be used. (group, resource, verb, why)
const NOT_REACHED: &[(&str, &str, &str, &str)] = &[(
    "batch",
    "jobs",
    "delete",
    "incomplete Jobs a crash left are deleted two minutes after start-up (engine/intake.rs \
     repair), and one whose input the API refused at once (engine/emit.rs delete_incomplete)",
)];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_grants_exactly_what_the_controller_uses() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let namespaced = render(&format!("watchNamespace: {WORK}\n"));
    let cluster_wide = render("");
    let account = namespaced
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .expect("a ServiceAccount");
    let user = format!(
        "system:serviceaccount:{}:{}",
        account["metadata"]["namespace"].as_str().unwrap(),
        account["metadata"]["name"].as_str().unwrap()
    );

    // The cluster as an administrator prepares it: namespaces, the CRD, the webhook's token.
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let admin = cluster.client();
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for name in [WORK, RELEASE_NAMESPACE] {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.create(&PostParams::default(), &spate::pipeline::crd::definition())
        .await
        .unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(admin.clone(), WORK);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spate.log");
    eventually("the Pipeline CRD served", 10, &log, || async {
        pipelines
            .list(&ListParams::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), WORK);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("hook-token".to_string()),
            ..Default::default()
        },
        data: Some(
            [(
                "token".to_string(),
                ByteString(HOOK_TOKEN.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    // `spate run` as the ServiceAccount, with the Deployment's own arguments.
    let mut kubeconfig = cluster.api_server().kubeconfig_json();
    kubeconfig["users"][0]["user"]["token"] = json!(cluster.api_server().add_token(&user));
    let kubeconfig_path = dir.path().join("controller.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string()).unwrap();
    let (metrics_port, webhook_port) = (free_port(), free_port());
    let mut command = deployment_command(
        &namespaced,
        RELEASE_NAMESPACE,
        &dir.path().join("state"),
        metrics_port,
        webhook_port,
    );
    let spate = command
        .arg("--kubeconfig")
        .arg(&kubeconfig_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    for pipeline in pipeline_resources() {
        pipelines
            .create(&PostParams::default(), &pipeline)
            .await
            .unwrap();
    }

    // Webhook events: four that succeed, one whose template needs a field it lacks
    // (dead-lettered), one over 16 KiB (input in a ConfigMap), one whose pod never starts.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{webhook_port}/hooks/work");
    let post = |id: &str, body: Value| {
        http.post(&url)
            .bearer_auth(HOOK_TOKEN)
            .header("Idempotency-Key", id)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    eventually(
        "the webhook answers 202 (leader, pipeline started)",
        30,
        &log,
        || async {
            match post("ok-0", json!({"customer": "c0", "start": "0.1"})).await {
                Ok(response) if response.status() == 202 => Ok(()),
                Ok(response) => Err(format!("HTTP {}", response.status())),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await;
    for i in 1..4 {
        let response = post(
            &format!("ok-{i}"),
            json!({"customer": format!("c{i}"), "start": "0.1"}),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 202);
    }
    post("no-customer", json!({"start": "0.1"})).await.unwrap();
    post(
        "large",
        json!({"customer": "big", "start": "0.1", "blob": "x".repeat(20 * 1024)}),
    )
    .await
    .unwrap();
    post("stuck", json!({"customer": "slow", "start": "60"}))
        .await
        .unwrap();

    let jobs: Api<Job> = Api::namespaced(admin.clone(), WORK);
    let events: Api<Event> = Api::namespaced(admin.clone(), WORK);
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), WORK);
    let event_ids = |job: &Job| -> Vec<String> {
        job.annotations()
            .get("spate.dev/event-ids")
            .and_then(|ids| serde_json::from_str(ids).ok())
            .unwrap_or_default()
    };
    eventually(
        "the webhook Jobs finished and marked reported",
        30,
        &log,
        || async {
            let list = jobs
                .list(&ListParams::default().labels("spate.dev/pipeline=hooks"))
                .await
                .map_err(|e| e.to_string())?;
            let reported: BTreeSet<String> = list
                .items
                .iter()
                .filter(|job| job.annotations().contains_key("spate.dev/reported"))
                .flat_map(event_ids)
                .collect();
            let wanted = ["ok-0", "ok-1", "ok-2", "ok-3", "large"];
            wanted
                .iter()
                .all(|id| reported.contains(*id))
                .then_some(())
                .ok_or(format!("reported: {reported:?}"))
        },
    )
    .await;
    let large = jobs
        .list(&ListParams::default().labels("spate.dev/pipeline=hooks"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|job| event_ids(job) == ["large"])
        .unwrap();
    config_maps
        .get(&large.name_any())
        .await
        .expect("the large event's input ConfigMap");
    eventually(
        "dead letters as Events: the template error and the stuck pod",
        30,
        &log,
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let dead: Vec<String> = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("DeadLettered"))
                .map(|e| e.message.clone().unwrap_or_default())
                .collect();
            let template = dead
                .iter()
                .any(|m| m.contains("no-customer") && m.contains("customer"));
            let stuck = dead
                .iter()
                .any(|m| m.contains("stuck") && m.contains("Pending"));
            (template && stuck)
                .then_some(())
                .ok_or(format!("dead-letter Events: {dead:?}"))
        },
    )
    .await;
    eventually("the stuck Job ended and reported", 20, &log, || async {
        let list = jobs
            .list(&ListParams::default().labels("spate.dev/pipeline=hooks"))
            .await
            .map_err(|e| e.to_string())?;
        let running: Vec<String> = list
            .items
            .iter()
            .filter(|job| event_ids(job) == ["stuck"])
            .filter(|job| {
                let annotations = job.metadata.annotations.clone().unwrap_or_default();
                !(annotations.contains_key("spate.dev/gave-up")
                    && annotations.contains_key("spate.dev/reported"))
            })
            .map(|job| job.name_any())
            .collect();
        running
            .is_empty()
            .then_some(())
            .ok_or(format!("not ended and reported: {running:?}"))
    })
    .await;

    // The indexed cron pipeline: batches in ConfigMaps, checkpoints in the Lease's namespace.
    eventually(
        "an indexed Job reported, with its items",
        30,
        &log,
        || async {
            let list = jobs
                .list(&ListParams::default().labels("spate.dev/pipeline=ticks"))
                .await
                .map_err(|e| e.to_string())?;
            let reported = list.items.iter().any(|job| {
                job.annotations().contains_key("spate.dev/reported")
                    && job.spec.as_ref().and_then(|s| s.completion_mode.as_deref())
                        == Some("Indexed")
            });
            reported
                .then_some(())
                .ok_or(format!("{} tick Jobs, none reported", list.items.len()))
        },
    )
    .await;
    let checkpoints: Api<ConfigMap> = Api::namespaced(admin.clone(), RELEASE_NAMESPACE);
    eventually("a cron checkpoint ConfigMap", 10, &log, || async {
        let list = checkpoints
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .any(|map| map.name_any().starts_with("spate-checkpoint-"))
            .then_some(())
            .ok_or("none yet".to_string())
    })
    .await;

    // Pause and resume by annotation; the status says so each time.
    let condition = |reason: &'static str| {
        let pipelines = pipelines.clone();
        async move {
            let status = pipelines
                .get_status("ticks")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            let now = status.conditions.first().map(|c| c.reason.clone());
            (now.as_deref() == Some(reason))
                .then_some(())
                .ok_or(format!("condition {now:?}"))
        }
    };
    eventually("ticks Running", 20, &log, || condition("Running")).await;
    let annotate = |value: &str| json!({"metadata": {"annotations": {"spate.dev/paused": value}}});
    pipelines
        .patch(
            "ticks",
            &PatchParams::default(),
            &Patch::Merge(&annotate("true")),
        )
        .await
        .unwrap();
    eventually("ticks Paused", 20, &log, || condition("Paused")).await;
    pipelines
        .patch(
            "ticks",
            &PatchParams::default(),
            &Patch::Merge(&annotate("false")),
        )
        .await
        .unwrap();
    eventually("ticks Running again", 20, &log, || condition("Running")).await;

    // The Lease: held by this replica, and renewed at least once.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), RELEASE_NAMESPACE);
    eventually("the Lease renewed", 20, &log, || async {
        let lease = leases
            .get("spate-controller")
            .await
            .map_err(|e| e.to_string())?;
        let spec = lease.spec.unwrap_or_default();
        (spec.holder_identity.as_deref() == Some(IDENTITY) && spec.renew_time != spec.acquire_time)
            .then_some(())
            .ok_or(format!("{spec:?}"))
    })
    .await;

    // /metrics, /healthz, /readyz.
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "spate_events_received_total{pipeline=\"work/hooks\"}",
        "spate_jobs_created_total{pipeline=\"work/ticks\"}",
        "spate_dead_letters_total{pipeline=\"work/hooks\"}",
        "spate_job_create_seconds_bucket",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    for path in ["healthz", "readyz"] {
        let status = http
            .get(format!("http://127.0.0.1:{metrics_port}/{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "/{path}");
    }

    // A graceful stop, so shutdown's own calls are counted too.
    let mut spate = spate;
    let _ = Command::new("kill")
        .args(["-TERM", &spate.0.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while spate.0.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What the controller used, against what the chart grants.
    let requests: Vec<(RequestKey, u64)> = cluster
        .requests()
        .0
        .into_iter()
        .filter(|row| row.key.user == user)
        .map(|row| (row.key, row.count))
        .collect();
    let used = uses(&requests);
    let grants = grants_for(&namespaced, &user);
    let mut problems = Vec::new();
    for grant in &grants {
        for (group, resource, verb) in grant.triples() {
            if [&group, &resource, &verb].iter().any(|s| s.contains('*')) {
                problems.push(format!("{}: grants a wildcard", grant.role));
            }
        }
    }
    for (namespace, verb, group, resource) in &used {
        if !grants
            .iter()
            .any(|g| g.covers(namespace, verb, group, resource))
        {
            problems.push(format!(
                "used but not granted: {verb} {resource} (group \"{group}\") in namespace \"{namespace}\""
            ));
        }
    }
    for grant in &grants {
        for (group, resource, verb) in grant.triples() {
            if NOT_REACHED
                .iter()
                .any(|(g, r, v, _)| *g == group && *r == resource && *v == verb)
            {
                continue;
            }
            let was_used = used.iter().any(|(namespace, v, g, r)| {
                *v == verb
                    && *g == group
                    && *r == resource
                    && grant.namespace.as_deref().is_none_or(|ns| ns == namespace)
            });
            if !was_used {
                problems.push(format!(
                    "granted but never used: {verb} {resource} (group \"{group}\") by {}",
                    grant.role
                ));
            }
        }
    }
    // Names a rule is limited to must be the names the controller uses.
    for grant in grants.iter().filter(|g| !g.names.is_empty()) {
        assert_eq!(grant.resources, ["leases"], "{grant:?}");
        assert_eq!(grant.names, ["spate-controller"], "{grant:?}");
    }
    assert!(
        problems.is_empty(),
        "{}\n\nrequests of {user}:\n{}",
        problems.join("\n"),
        table(&requests)
    );

    // Without watchNamespace the chart grants the same, through a ClusterRole.
    let triples = |grants: &[Grant]| -> BTreeMap<(String, String, String), usize> {
        let mut all = BTreeMap::new();
        for grant in grants {
            for triple in grant.triples() {
                *all.entry(triple).or_insert(0) += 1;
            }
        }
        all
    };
    let cluster_grants = grants_for(&cluster_wide, &user);
    assert_eq!(
        triples(&cluster_grants),
        triples(&grants),
        "ClusterRole and namespaced Roles differ"
    );
    assert!(
        cluster_grants
            .iter()
            .any(|g| g.namespace.is_none() && g.resources == ["pipelines"]),
        "{cluster_grants:?}"
    );
    cluster.shutdown().await;
}

/// `kubectl --kubeconfig KUBECONFIG ARGS…` with `input` on its stdin; its stdout, or a panic
/// with its stderr.
fn kubectl(kubeconfig: &Path, args: &[&str], input: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl on PATH (scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The same chart on the real API server's authorizer, in namespaced mode: its
/// ServiceAccount, Roles and RoleBindings applied by an administrator, and `spate run` (the
/// Deployment's arguments) holding only a token the TokenRequest API issued to that account.
/// A webhook pipeline reads its Secret, makes Jobs, marks them reported and writes its status
/// with no `403`; then, with `create` on Jobs taken out of the Role, the next event is refused
/// by the authorizer and dead-lettered with the refusal as its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_the_real_authorizer_the_chart_grants_enough_and_the_jobs_rule_is_needed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let release = TestCluster::real("rbac-release").await;
    let work = TestCluster::real("rbac-work").await;
    let (release_ns, work_ns) = (release.namespace(), work.namespace());
    let admin = release.client();
    install_crd(&admin).await;

    let documents = render_in(release_ns, &format!("watchNamespace: {work_ns}\n"));
    let rbac: Vec<&Value> = documents
        .iter()
        .filter(|d| {
            ["ServiceAccount", "Role", "RoleBinding"].contains(&d["kind"].as_str().unwrap())
        })
        .collect();
    assert!(
        !documents
            .iter()
            .any(|d| d["kind"].as_str().unwrap().starts_with("Cluster")),
        "namespaced mode renders no cluster-wide grant"
    );
    let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    kubectl(
        release.kubeconfig(),
        &["apply", "-f", "-"],
        &list.to_string(),
    );
    let account = rbac.iter().find(|d| d["kind"] == "ServiceAccount").unwrap()["metadata"]["name"]
        .as_str()
        .unwrap();
    let token = kubectl(
        release.kubeconfig(),
        &[
            "create",
            "token",
            account,
            "-n",
            release_ns,
            "--duration",
            "2h",
        ],
        "",
    );
    let mut kubeconfig: Value =
        serde_json::from_slice(&std::fs::read(release.kubeconfig()).unwrap()).unwrap();
    for user in kubeconfig["users"].as_array_mut().unwrap() {
        user["user"] = json!({"token": token.trim()});
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig_path = dir.path().join("controller.kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig.to_string()).unwrap();

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), work_ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hook-token"},
        "stringData": {"token": HOOK_TOKEN},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let log = dir.path().join("spate.log");
    let (metrics_port, webhook_port) = (free_port(), free_port());
    let spate = deployment_command(
        &documents,
        release_ns,
        &dir.path().join("state"),
        metrics_port,
        webhook_port,
    )
    .arg("--kubeconfig")
    .arg(&kubeconfig_path)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .map(KillOnDrop)
    .unwrap();
    let pipelines: Api<Pipeline> = Api::namespaced(admin.clone(), work_ns);
    pipelines
        .create(&PostParams::default(), &hooks_pipeline(work_ns))
        .await
        .unwrap();

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{webhook_port}/hooks/work");
    let post = |id: String| {
        let request = http
            .post(&url)
            .bearer_auth(HOOK_TOKEN)
            .header("Idempotency-Key", id)
            .header("content-type", "application/json")
            .body(json!({"customer": "c", "start": "0.1"}).to_string())
            .send();
        async move {
            let response = request.await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            Ok::<_, String>((status, response.text().await.unwrap_or_default()))
        }
    };
    eventually("the webhook answers 202", 60, &log, || async {
        match post("ok-0".into()).await? {
            (202, _) => Ok(()),
            (status, body) => Err(format!("HTTP {status}: {body}")),
        }
    })
    .await;
    for i in 1..4 {
        assert_eq!(post(format!("ok-{i}")).await.unwrap().0, 202);
    }
    let jobs: Api<Job> = Api::namespaced(admin.clone(), work_ns);
    eventually("four Jobs marked reported", 60, &log, || async {
        let list = jobs
            .list(&ListParams::default().labels("spate.dev/pipeline=hooks"))
            .await
            .map_err(|e| e.to_string())?;
        let reported = list
            .items
            .iter()
            .filter(|job| job.annotations().contains_key("spate.dev/reported"))
            .count();
        (reported == 4)
            .then_some(())
            .ok_or(format!("{reported} of {} reported", list.items.len()))
    })
    .await;
    eventually("the status written, Running", 30, &log, || async {
        let status = pipelines
            .get_status("hooks")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        let reason = status.conditions.first().map(|c| c.reason.clone());
        (reason.as_deref() == Some("Running"))
            .then_some(())
            .ok_or(format!("condition {reason:?}"))
    })
    .await;
    let before = std::fs::read_to_string(&log).unwrap();
    assert!(
        !before.to_lowercase().contains("forbidden"),
        "a request was forbidden with the chart's RBAC:\n{before}"
    );

    // Take `create` on Jobs out of the Role; the authorizer's cache follows within a moment.
    let roles: Api<Role> = Api::namespaced(admin.clone(), work_ns);
    let mut role = roles.get(&release_role_name(&rbac, work_ns)).await.unwrap();
    for rule in role.rules.iter_mut().flatten() {
        let on_jobs = rule.resources.iter().flatten().any(|r| r == "jobs");
        if on_jobs && rule.api_groups.iter().flatten().any(|g| g == "batch") {
            rule.verbs.retain(|verb| verb != "create");
        }
    }
    roles
        .replace(&role.name_any(), &PostParams::default(), &role)
        .await
        .unwrap();
    let mut attempt = 0;
    eventually(
        "an event refused by the authorizer, answered 422",
        30,
        &log,
        || {
            attempt += 1;
            let call = post(format!("after-revoke-{attempt}"));
            async move {
                let (status, body) = call.await?;
                let error = serde_json::from_str::<Value>(&body).unwrap_or_default()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if status == 422 && error.contains(r#"cannot create resource "jobs""#) {
                    Ok(())
                } else {
                    Err(format!("HTTP {status}: {body}"))
                }
            }
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(admin.clone(), work_ns);
    eventually(
        "the refusal dead-lettered as an Event",
        30,
        &log,
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("DeadLettered")
                        && e.message
                            .as_deref()
                            .is_some_and(|m| m.contains("after-revoke") && m.contains("forbidden"))
                })
                .then_some(())
                .ok_or(format!("{} Events, no such dead letter", list.items.len()))
        },
    )
    .await;
    drop(spate);
    work.shutdown().await;
    release.shutdown().await;
}

/// The name of the chart's Role in `namespace`.
fn release_role_name(rbac: &[&Value], namespace: &str) -> String {
    rbac.iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == namespace)
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("the chart's Role in the watched namespace")
        .to_string()
}
