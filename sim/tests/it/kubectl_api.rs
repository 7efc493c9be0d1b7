//! The simulator's API server as real clients see it: the real `/usr/bin/kubectl` and the
//! `kube` crate, against an in-process [`SimCluster`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use spate_sim::{Faults, SimCluster, SimConfig};
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

impl Fixture {
    async fn start() -> Self {
        // No nodes: these tests exercise the API server, not the node agent.
        let config = SimConfig {
            virtual_nodes: 0,
            ..SimConfig::default()
        };
        Self::with_config(config).await
    }

    async fn with_config(config: SimConfig) -> Self {
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

    fn command(&self, kubeconfig: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(KUBECTL);
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn run_with(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            self.command(kubeconfig, args).output(),
        )
        .await
        .expect("kubectl finishes in time")
        .expect("kubectl runs");
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    async fn kubectl(&self, args: &[&str]) -> Output {
        self.run_with(&self.kubeconfig, args).await
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

    async fn apply_yaml(&self, name: &str, yaml: &str, extra: &[&str]) -> Output {
        let path = self.dir.path().join(name);
        tokio::fs::write(&path, yaml)
            .await
            .expect("manifest written");
        let path = path.to_string_lossy().into_owned();
        let mut args = vec!["apply", "-f", path.as_str()];
        args.extend_from_slice(extra);
        self.ok(&args).await
    }
}

#[tokio::test]
async fn kubectl_sees_a_cluster_with_its_namespaces() {
    let f = Fixture::start().await;
    let version = f.ok(&["version", "-o", "json"]).await.json();
    assert_eq!(version["serverVersion"]["major"], "1");
    assert_eq!(version["serverVersion"]["minor"], "32");
    let namespaces = f.ok(&["get", "ns", "-o", "name"]).await.stdout;
    for ns in [
        "namespace/default",
        "namespace/kube-system",
        "namespace/kube-node-lease",
    ] {
        assert!(
            namespaces.lines().any(|l| l == ns),
            "{ns} missing from {namespaces}"
        );
    }
    let table = f.ok(&["get", "ns"]).await.stdout;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "AGE"],
        "server-side table columns: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("default") && l.contains("Active")),
        "{table}"
    );
    let accounts = f
        .ok(&["get", "serviceaccounts", "-n", "kube-system", "-o", "name"])
        .await
        .stdout;
    assert_eq!(accounts.trim(), "serviceaccount/default");
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn configmaps_are_created_applied_patched_and_deleted_with_kubectl() {
    let f = Fixture::start().await;
    f.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
    ])
    .await;
    let cm = f
        .ok(&["get", "configmap", "settings", "-o", "json"])
        .await
        .json();
    assert_eq!(cm["data"]["mode"], "fast");
    assert!(
        cm["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );

    let first = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  labels: {app: web}\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    f.apply_yaml("applied.yaml", first, &[]).await;
    let second = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: applied\n  labels: {app: web}\ndata:\n  a: \"10\"\n";
    let out = f.apply_yaml("applied.yaml", second, &[]).await;
    assert!(out.stdout.contains("configured"), "{}", out.stdout);
    let cm = f.ok(&["get", "cm", "applied", "-o", "json"]).await.json();
    assert_eq!(
        cm["data"],
        json!({"a": "10"}),
        "client-side apply removes b and changes a"
    );

    f.ok(&[
        "patch",
        "cm",
        "applied",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"m":"merge"}}"#,
    ])
    .await;
    f.ok(&[
        "patch",
        "cm",
        "applied",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/data/j","value":"json"}]"#,
    ])
    .await;
    f.ok(&[
        "patch",
        "cm",
        "applied",
        "--type",
        "strategic",
        "-p",
        r#"{"data":{"s":"strategic","a":null}}"#,
    ])
    .await;
    let cm = f.ok(&["get", "cm", "applied", "-o", "json"]).await.json();
    assert_eq!(
        cm["data"],
        json!({"m": "merge", "j": "json", "s": "strategic"})
    );

    f.ok(&["delete", "cm", "applied"]).await;
    let gone = f.kubectl(&["get", "cm", "applied"]).await;
    assert!(!gone.ok);
    assert!(
        gone.stderr.contains(r#"configmaps "applied" not found"#),
        "{}",
        gone.stderr
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_merges_owned_fields_and_reports_conflicts() {
    let f = Fixture::start().await;
    let first =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    f.apply_yaml("ssa.yaml", first, &["--server-side"]).await;
    let second = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n";
    f.apply_yaml("ssa.yaml", second, &["--server-side"]).await;
    let cm = f
        .ok(&["get", "cm", "ssa", "-o", "json", "--show-managed-fields"])
        .await
        .json();
    assert_eq!(cm["data"], json!({"a": "1"}));
    assert_eq!(cm["metadata"]["managedFields"][0]["manager"], "kubectl");

    let other = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"2\"\n";
    let path = f.dir.path().join("other.yaml");
    tokio::fs::write(&path, other).await.unwrap();
    let path = path.to_string_lossy().into_owned();
    let conflict = f
        .kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            "intruder",
            "-f",
            &path,
        ])
        .await;
    assert!(!conflict.ok);
    assert!(conflict.stderr.contains("conflict"), "{}", conflict.stderr);
    f.ok(&[
        "apply",
        "--server-side",
        "--field-manager",
        "intruder",
        "--force-conflicts",
        "-f",
        &path,
    ])
    .await;
    let cm = f.ok(&["get", "cm", "ssa", "-o", "json"]).await.json();
    assert_eq!(cm["data"]["a"], "2");
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let f = Fixture::start().await;
    for (name, tier) in [("one", "front"), ("two", "back"), ("three", "front")] {
        f.ok(&["create", "cm", name]).await;
        f.ok(&["label", "cm", name, &format!("tier={tier}")]).await;
    }
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let front = f
        .ok(&["get", "cm", "-l", "tier=front", "-o", "json"])
        .await
        .json();
    assert_eq!(names(&front), vec!["one", "three"]);
    let not_front = f
        .ok(&["get", "cm", "-l", "tier notin (front),tier", "-o", "json"])
        .await
        .json();
    assert_eq!(names(&not_front), vec!["two"]);
    let by_name = f
        .ok(&[
            "get",
            "cm",
            "--field-selector",
            "metadata.name=two",
            "-o",
            "json",
        ])
        .await
        .json();
    assert_eq!(names(&by_name), vec!["two"]);
    let everywhere = f
        .ok(&[
            "get",
            "cm",
            "-A",
            "--field-selector",
            "metadata.namespace!=default",
            "-o",
            "json",
        ])
        .await
        .json();
    assert!(names(&everywhere).is_empty());
    let paged = f
        .ok(&["get", "cm", "--chunk-size", "1", "-o", "json"])
        .await
        .json();
    assert_eq!(names(&paged), vec!["one", "three", "two"]);
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn kubectl_watch_streams_changes() {
    let f = Fixture::start().await;
    let mut child = f
        .command(
            &f.kubeconfig,
            &[
                "get",
                "cm",
                "--watch",
                "-o",
                "name",
                "--request-timeout=20s",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl watch starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let cms: Api<ConfigMap> = Api::namespaced(f.cluster.client(), "default");
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push(line);
            if seen.iter().any(|l| l == "configmap/watched") {
                break;
            }
        }
        seen
    });
    // Give kubectl time to establish the watch, then create the object it must report.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "watched"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("watch reports in time")
        .unwrap();
    assert!(seen.iter().any(|l| l == "configmap/watched"), "{seen:?}");
    let _ = child.kill().await;
    f.cluster.shutdown().await;
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

#[tokio::test]
async fn custom_resources_appear_with_their_crd_and_keep_status_separate() {
    let f = Fixture::start().await;
    f.apply_yaml("crd.yaml", WIDGET_CRD, &[]).await;
    let widget =
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n";
    f.apply_yaml("widget.yaml", widget, &[]).await;
    let listed = f.ok(&["get", "widgets", "-o", "json"]).await.json();
    assert_eq!(listed["items"][0]["spec"]["size"], 3);
    assert_eq!(listed["items"][0]["metadata"]["generation"], 1);
    let table = f.ok(&["get", "widgets"]).await.stdout;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "SIZE", "AGE"], "printer columns: {table}");
    assert_eq!(rows[1][..2], ["w1", "3"], "{table}");
    let short = f.ok(&["get", "wg", "-o", "name"]).await.stdout;
    assert_eq!(short.trim(), "widget.example.com/w1");

    f.ok(&[
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"ready":true}}"#,
    ])
    .await;
    f.ok(&[
        "patch",
        "widget",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"size":4},"status":{"ready":false}}"#,
    ])
    .await;
    let w = f.ok(&["get", "widget", "w1", "-o", "json"]).await.json();
    assert_eq!(
        w["status"]["ready"], true,
        "main resource writes ignore status"
    );
    assert_eq!(w["spec"]["size"], 4);
    assert_eq!(
        w["metadata"]["generation"], 2,
        "spec change bumps generation, status does not"
    );

    f.ok(&["delete", "crd", "widgets.example.com"]).await;
    let gone = f.kubectl(&["get", "widgets"]).await;
    assert!(!gone.ok, "widgets are no longer served: {}", gone.stdout);
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn stale_updates_conflict_and_dry_runs_store_nothing() {
    let f = Fixture::start().await;
    f.ok(&["create", "cm", "versioned", "--from-literal=k=1"])
        .await;
    let mut stale = f.ok(&["get", "cm", "versioned", "-o", "json"]).await.json();
    f.ok(&[
        "patch",
        "cm",
        "versioned",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"k":"2"}}"#,
    ])
    .await;
    stale["data"]["k"] = json!("3");
    let path = f.dir.path().join("stale.json");
    tokio::fs::write(&path, stale.to_string()).await.unwrap();
    let replaced = f.kubectl(&["replace", "-f", &path.to_string_lossy()]).await;
    assert!(!replaced.ok);
    assert!(replaced.stderr.contains("the object has been modified; please apply your changes to the latest version and try again"), "{}", replaced.stderr);

    let dry = f
        .ok(&[
            "create",
            "cm",
            "phantom",
            "--from-literal=x=y",
            "--dry-run=server",
            "-o",
            "json",
        ])
        .await
        .json();
    assert_eq!(dry["data"]["x"], "y");
    assert!(!f.kubectl(&["get", "cm", "phantom"]).await.ok);
    f.ok(&["delete", "cm", "versioned", "--dry-run=server"])
        .await;
    assert!(f.kubectl(&["get", "cm", "versioned"]).await.ok);
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized() {
    let f = Fixture::start().await;
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&f.kubeconfig).unwrap()).unwrap();
    config["users"][0]["user"]["token"] = json!("not-the-token");
    let bad = f.dir.path().join("bad-kubeconfig");
    std::fs::write(&bad, config.to_string()).unwrap();
    let out = f.run_with(&bad, &["get", "cm"]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains("Unauthorized") || out.stderr.contains("must be logged in"),
        "{}",
        out.stderr
    );
    let url = format!("{}/api/v1/namespaces", f.cluster.url());
    let curl_free = reqwest_free_status(&f.cluster, &url).await;
    assert_eq!(curl_free, 401);
    f.cluster.shutdown().await;
}

/// Status code of an unauthenticated GET, via kubectl's raw mode with an anonymous config.
async fn reqwest_free_status(cluster: &SimCluster, url: &str) -> u16 {
    let mut config = cluster.kubeconfig();
    for user in &mut config.auth_infos {
        if let Some(info) = user.auth_info.as_mut() {
            info.token = None;
        }
    }
    let client_config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    let client = kube::Client::try_from(client_config).unwrap();
    let request = http::Request::get(url).body(Vec::new()).unwrap();
    match client.request::<Value>(request).await {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_watcher_sees_every_final_state_through_dropped_watches_and_expiry() {
    let config = SimConfig {
        virtual_nodes: 0,
        faults: Faults {
            drop_watches_after_seconds: Some(1),
            ..Faults::default()
        },
        bookmark_interval: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let f = Fixture::with_config(config).await;
    let cms: Api<ConfigMap> = Api::namespaced(f.cluster.client(), "default");
    let (reader, writer) = kube::runtime::reflector::store::<ConfigMap>();
    let stream = kube::runtime::reflector(
        writer,
        watcher(
            cms.clone(),
            watcher::Config::default().labels("suite=watch"),
        ),
    );
    let driver = tokio::spawn(stream.try_for_each(|_| async { Ok(()) }));
    reader.wait_until_ready().await.unwrap();

    let mut expected = std::collections::BTreeMap::new();
    for round in 0..6 {
        for i in 0..5 {
            let name = format!("w{i}");
            let value = format!("{round}");
            let patch = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"suite": "watch"}}, "data": {"round": value}});
            cms.patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&patch),
            )
            .await
            .unwrap();
            expected.insert(name, value);
        }
        if round == 2 {
            f.cluster.faults().expire_next_watch();
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    cms.delete("w4", &DeleteParams::default()).await.unwrap();
    expected.remove("w4");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let seen: std::collections::BTreeMap<String, String> = reader
            .state()
            .iter()
            .map(|cm| {
                (
                    cm.metadata.name.clone().unwrap_or_default(),
                    cm.data
                        .as_ref()
                        .and_then(|d| d.get("round").cloned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        if seen == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher state {seen:?} never reached {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watches = f.cluster.requests().count("watch", "configmaps");
    assert!(
        watches >= 3,
        "watches were dropped and resumed ({watches} watch requests)"
    );
    driver.abort();
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn jobs_pods_and_bindings_follow_api_server_rules() {
    let f = Fixture::start().await;
    let client = f.cluster.client();
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), "default");
    let invalid = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "bad"},
        "spec": {"template": {"spec": {"restartPolicy": "Always", "containers": [{"name": "c", "image": "busybox"}]}}}});
    let err = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value(invalid).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422 && s.reason == "Invalid"),
        "{err:?}"
    );

    let job = f
        .ok(&[
            "create",
            "job",
            "hello",
            "--image=busybox:1.36",
            "-o",
            "json",
            "--",
            "echo",
            "hi",
        ])
        .await
        .json();
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["job-name"],
        "hello"
    );
    assert_eq!(job["spec"]["backoffLimit"], 6);

    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p1\nspec:\n  containers:\n  - name: main\n    image: busybox:1.36\n";
    f.apply_yaml("pod.yaml", pod, &[]).await;
    let pod = f.ok(&["get", "pod", "p1", "-o", "json"]).await.json();
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["spec"]["schedulerName"], "default-scheduler");
    let logs = f.kubectl(&["logs", "p1"]).await;
    assert!(
        logs.stderr
            .contains("is waiting to start: ContainerCreating"),
        "{}",
        logs.stderr
    );

    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p1"}, "target": {"kind": "Node", "name": "n1"}});
    let url = "/api/v1/namespaces/default/pods/p1/binding";
    let bind = |body: Value| {
        let client = client.clone();
        async move {
            let request = http::Request::post(url)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .unwrap();
            client.request::<Value>(request).await
        }
    };
    bind(binding.clone()).await.unwrap();
    let again = bind(binding).await.unwrap_err();
    assert!(
        matches!(&again, kube::Error::Api(s) if s.code == 409),
        "{again:?}"
    );
    let pod = f.ok(&["get", "pod", "p1", "-o", "json"]).await.json();
    assert_eq!(pod["spec"]["nodeName"], "n1");

    f.ok(&["delete", "pod", "p1", "--wait=false"]).await;
    let terminating = f.ok(&["get", "pod", "p1", "-o", "json"]).await.json();
    assert!(
        terminating["metadata"]["deletionTimestamp"].is_string(),
        "bound pods terminate gracefully"
    );
    f.ok(&["delete", "pod", "p1", "--grace-period=0", "--force"])
        .await;
    assert!(!f.kubectl(&["get", "pod", "p1"]).await.ok);
    f.cluster.shutdown().await;
}

/// A stand-in kubelet: answers one `containerLogs` request and reports the path it was asked.
async fn fake_kubelet(body: &'static str) -> (u16, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (sender, receiver) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buffer).await.unwrap();
            request.extend_from_slice(&buffer[..n]);
        }
        let line = String::from_utf8_lossy(&request)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        let _ = sender.send(line);
    });
    (port, receiver)
}

#[tokio::test]
async fn pod_logs_are_proxied_to_the_node_agent() {
    let f = Fixture::start().await;
    let (port, asked) = fake_kubelet("line one\nline two\n").await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(f.cluster.client());
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kubelet-1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                   "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(node).unwrap(),
        )
        .await
        .unwrap();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: talker\nspec:\n  nodeName: kubelet-1\n  containers:\n  - name: main\n    image: busybox:1.36\n";
    f.apply_yaml("talker.yaml", pod, &[]).await;
    let logs = f.ok(&["logs", "talker", "--tail=5"]).await;
    assert_eq!(logs.stdout, "line one\nline two\n");
    let line = tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        line,
        "GET /containerLogs/default/talker/main?tailLines=5 HTTP/1.1"
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn client_certificates_signed_by_the_cluster_ca_authenticate() {
    let f = Fixture::start().await;
    let issued = f
        .cluster
        .api_server()
        .issue_client_certificate("alice")
        .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&f.kubeconfig).unwrap()).unwrap();
    config["users"][0]["user"] = json!({
        "client-certificate-data": data_encoding::BASE64.encode(issued.cert_pem.as_bytes()),
        "client-key-data": data_encoding::BASE64.encode(issued.key_pem.as_bytes()),
    });
    let path = f.dir.path().join("alice-kubeconfig");
    std::fs::write(&path, config.to_string()).unwrap();
    let out = f.run_with(&path, &["get", "cm", "-o", "name"]).await;
    assert!(out.ok, "{}", out.stderr);
    let alice = f
        .cluster
        .requests()
        .0
        .iter()
        .filter(|c| c.key.user == "alice" && c.key.verb == "list")
        .count();
    assert!(
        alice >= 1,
        "requests are accounted to the certificate's user"
    );
    f.cluster.shutdown().await;
}

async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, kube::Error> {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .unwrap();
    client.request::<Value>(request).await
}

#[tokio::test]
async fn faults_and_request_counts_are_served_over_http() {
    let f = Fixture::start().await;
    let client = f.cluster.client();
    raw(&client, "DELETE", "/sim/requests", None).await.unwrap();
    let faults = raw(
        &client,
        "PUT",
        "/sim/faults",
        Some(json!({"throttleRate": 1.0, "retryAfterSeconds": 0})),
    )
    .await
    .unwrap();
    assert_eq!(faults["throttleRate"], 1.0);
    // kube retries 429s with backoff; lifting the fault at run time lets the retry through.
    let retried = tokio::spawn({
        let client = client.clone();
        async move {
            raw(
                &client,
                "GET",
                "/api/v1/namespaces/default/configmaps",
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bad = raw(
        &client,
        "PUT",
        "/sim/faults",
        Some(json!({"throttleRate": 3.0})),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&bad, kube::Error::Api(s) if s.code == 400),
        "{bad:?}"
    );
    f.cluster.faults().set(Faults::default());
    let list = retried.await.unwrap().unwrap();
    assert_eq!(list["kind"], "ConfigMapList");
    let counts = raw(&client, "GET", "/sim/requests", None).await.unwrap();
    let rows = counts.as_array().unwrap();
    let count = |code: u64| -> u64 {
        rows.iter()
            .filter(|r| r["verb"] == "list" && r["resource"] == "configmaps" && r["code"] == code)
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    assert!(count(429) >= 1, "{rows:?}");
    assert_eq!(count(200), 1, "{rows:?}");
    assert_eq!(
        f.cluster.requests().count("list", "configmaps"),
        count(429) + 1
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn streaming_lists_deliver_initial_state_then_changes() {
    let f = Fixture::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(f.cluster.client(), "default");
    for name in ["s1", "s2"] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let (reader, writer) = kube::runtime::reflector::store::<ConfigMap>();
    let stream = kube::runtime::reflector(
        writer,
        watcher(cms.clone(), watcher::Config::default().streaming_lists()),
    );
    let driver = tokio::spawn(stream.try_for_each(|_| async { Ok(()) }));
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.state().len(), 2);
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "s3"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reader.state().len() != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new object never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    driver.abort();
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn deletion_honours_finalizers_foreground_collections_and_namespaces() {
    let f = Fixture::start().await;
    let client = f.cluster.client();
    f.ok(&["create", "namespace", "scratch"]).await;
    let accounts = f
        .ok(&["get", "sa", "-n", "scratch", "-o", "name"])
        .await
        .stdout;
    assert_eq!(accounts.trim(), "serviceaccount/default");

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "scratch");
    let held: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &held).await.unwrap();
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = cms.get("held").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        cms.get_opt("held").await.unwrap().is_none(),
        "removing the last finalizer completes deletion"
    );

    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    cms.create(&PostParams::default(), &owner).await.unwrap();
    // The response shows the marked owner; the garbage collector may finish it right after.
    let marked = cms
        .delete("owner", &DeleteParams::foreground())
        .await
        .unwrap();
    let owner = marked
        .left()
        .expect("foreground deletion returns the marked object");
    assert_eq!(
        owner.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_owned()])
    );
    assert!(owner.metadata.deletion_timestamp.is_some());

    for (name, tier) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier}}}))
                .unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &kube::api::ListParams::default().labels("tier=x"),
    )
    .await
    .unwrap();
    let left: Vec<String> = cms
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let left: Vec<&str> = left
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "owner")
        .collect();
    assert_eq!(left, vec!["c"], "only the unselected object remains");

    f.ok(&["delete", "namespace", "scratch"]).await;
    let all: Api<ConfigMap> = Api::all(client);
    let remaining = all
        .list(&kube::api::ListParams::default().fields("metadata.namespace=scratch"))
        .await
        .unwrap();
    assert!(
        remaining.items.is_empty(),
        "namespace deletion removes its objects"
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_status_errors() {
    let f = Fixture::start().await;
    let client = f.cluster.client();
    let status_of = |result: Result<Value, kube::Error>| match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason),
        other => panic!("expected a Status error, got {other:?}"),
    };
    let bad_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": "not-an-object"});
    assert_eq!(
        status_of(
            raw(
                &client,
                "POST",
                "/api/v1/namespaces/default/pods",
                Some(bad_pod)
            )
            .await
        ),
        (400, "BadRequest".into())
    );
    f.ok(&["create", "cm", "target"]).await;
    let request = http::Request::patch("/api/v1/namespaces/default/configmaps/target")
        .header("content-type", "application/json-patch+json")
        .body(br#"[{"op":"replace","path":"","value":"scalar"}]"#.to_vec())
        .unwrap();
    assert_eq!(
        status_of(client.request::<Value>(request).await),
        (400, "BadRequest".into())
    );
    assert_eq!(
        status_of(
            raw(
                &client,
                "GET",
                "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20b",
                None
            )
            .await
        )
        .0,
        400
    );
    assert_eq!(
        status_of(raw(&client, "GET", "/apis/example.com/v1/gadgets", None).await),
        (404, "NotFound".into())
    );
    let mismatched = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m", "namespace": "kube-system"}});
    assert_eq!(
        status_of(
            raw(
                &client,
                "POST",
                "/api/v1/namespaces/default/configmaps",
                Some(mismatched)
            )
            .await
        )
        .0,
        400
    );
    let invalid_name =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_Valid"}});
    assert_eq!(
        status_of(
            raw(
                &client,
                "POST",
                "/api/v1/namespaces/default/configmaps",
                Some(invalid_name)
            )
            .await
        ),
        (422, "Invalid".into())
    );
    let missing_ns = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
    assert_eq!(
        status_of(
            raw(
                &client,
                "POST",
                "/api/v1/namespaces/nowhere/configmaps",
                Some(missing_ns)
            )
            .await
        )
        .0,
        404
    );

    let unknown_field = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: strict\nbogus: true\n";
    let path = f.dir.path().join("strict.yaml");
    tokio::fs::write(&path, unknown_field).await.unwrap();
    let out = f.kubectl(&["apply", "-f", &path.to_string_lossy()]).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains(r#"unknown field "bogus""#),
        "{}",
        out.stderr
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn events_recorded_through_events_k8s_io_show_in_kubectl_describe() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let f = Fixture::start().await;
    f.ok(&["create", "cm", "observed"]).await;
    let cms: Api<ConfigMap> = Api::namespaced(f.cluster.client(), "default");
    let observed = cms.get("observed").await.unwrap();
    let reference = kube::Resource::object_ref(&observed, &());
    let recorder = Recorder::new(
        f.cluster.client(),
        Reporter {
            controller: "spate-test".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Observed".into(),
        note: Some("seen by the test".into()),
        action: "Observe".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let core = f.ok(&["get", "events", "-o", "json"]).await.json();
    let item = &core["items"][0];
    assert_eq!(item["apiVersion"], "v1");
    assert_eq!(item["involvedObject"]["name"], "observed");
    assert_eq!(item["message"], "seen by the test");
    let described = f.ok(&["describe", "cm", "observed"]).await.stdout;
    assert!(
        described.contains("Observed") && described.contains("seen by the test"),
        "{described}"
    );
    let new_api = f
        .ok(&["get", "events.v1.events.k8s.io", "-o", "json"])
        .await
        .json();
    assert_eq!(new_api["items"][0]["regarding"]["name"], "observed");
    assert_eq!(new_api["items"][0]["reportingController"], "spate-test");
    assert_eq!(
        new_api["items"][0]["series"]["count"], 2,
        "the repeat was recorded as a series"
    );
    f.cluster.shutdown().await;
}

#[tokio::test]
async fn the_spate_sim_binary_serves_kubectl_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spate-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--virtual-nodes",
            "0",
            "--kubeconfig-out",
        ])
        .arg(&kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spate-sim starts");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !kubeconfig.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kubeconfig written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "ns", "default", "-o", "name"])
        .env("HOME", dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "namespace/default",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}
