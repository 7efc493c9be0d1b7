//! The Helm chart in chart/, rendered with the real Helm library (`scripts/chart`, which
//! installs `helm-python-sdk` on first use): it lints; its default and all-on values render;
//! the manifests are accepted by `kubectl apply --server-side` on the simulator; the
//! Deployment runs `spate run` with flags the binary takes, under the restricted security
//! defaults; and values.schema.json refuses a misspelt value.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use spate_sim::{SimCluster, SimConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart(args: &[&str]) -> Output {
    Command::new(repo().join("scripts/chart"))
        .args(args)
        .output()
        .expect("run scripts/chart")
}

/// `helm template` of the chart with `values` (YAML text; empty for the defaults).
fn render(values: &str) -> Result<Vec<Value>, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let output = chart(&["template", file.to_str().unwrap()]);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(documents(&String::from_utf8(output.stdout).unwrap()))
}

fn render_file(path: &Path) -> Vec<Value> {
    let output = chart(&["template", path.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "scripts/chart template {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8(output.stdout).unwrap())
}

/// The YAML documents of a stream, parsed.
fn documents(stream: &str) -> Vec<Value> {
    let mut documents = Vec::new();
    let mut current = String::new();
    for line in stream.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if current
                .lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            {
                let parsed: Value = serde_saphyr::from_str(&current)
                    .unwrap_or_else(|e| panic!("not YAML: {e}\n{current}"));
                documents.push(parsed);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    documents
}

fn find<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn kinds(documents: &[Value]) -> Vec<String> {
    let mut kinds: Vec<String> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_string())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl on PATH (scripts/test installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn yaml_stream(documents: &[&Value]) -> Vec<u8> {
    documents
        .iter()
        .map(|d| format!("---\n{}\n", serde_json::to_string(d).unwrap()))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn the_chart_lints_with_default_and_all_on_values() {
    let output = chart(&["lint"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("(default values): ok"), "{stdout}");
    assert!(stdout.contains("all-on-values.yaml): ok"), "{stdout}");
}

#[test]
fn a_misspelt_value_is_refused_by_the_schema() {
    for (values, key) in [
        ("replicaCont: 2\n", "replicaCont"),
        ("metrics:\n  serviceMonitor:\n    enable: true\n", "enable"),
        ("image:\n  pullPolicy: Sometimes\n", "pullPolicy"),
        ("logging:\n  format: xml\n", "format"),
    ] {
        let error = render(values).expect_err(values);
        assert!(
            error.contains("schema") && error.contains(key),
            "{values}: {error}"
        );
    }
    // The same values, spelt right, render.
    render("replicaCount: 2\nmetrics:\n  serviceMonitor:\n    enabled: true\n").unwrap();
}

#[test]
fn the_deployment_is_restricted_and_its_flags_are_real() {
    let documents = render("").unwrap();
    assert_eq!(
        kinds(&documents),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ]
    );
    let deployment = find(&documents, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["serviceAccountName"], "spate");

    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "run");
    for expected in [
        "--metrics-listen=0.0.0.0:9464",
        "--webhook-listen=0.0.0.0:8088",
        "--lease-namespace=spate-system",
        "--lease-duration=15s",
        "--identity=$(POD_NAME)",
        "--state-dir=/var/lib/spate",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
    // The state directory is writable although the root file system is not.
    let mounts = container["volumeMounts"].as_array().unwrap();
    let state = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/spate")
        .expect("a volume at the state dir");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == state["name"])
        .unwrap();
    assert!(volume["emptyDir"].is_object(), "{volume}");
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for name in ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"] {
        assert!(env.contains(&name), "{name} in {env:?}");
    }
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{container}"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    // Every flag parses: the binary gets as far as reading the (missing) kubeconfig, where a
    // wrong flag would have stopped it with a usage error (exit code 2).
    for documents in [
        documents,
        render_file(&repo().join("chart/ci/all-on-values.yaml")),
    ] {
        let container =
            &find(&documents, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().replace("$(POD_NAME)", "spate-0"))
            .filter(|a| !a.starts_with("--kubeconfig"))
            .collect();
        let state = tempfile::tempdir().unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_spate"))
            .args(args.iter().map(|a| {
                if a.starts_with("--state-dir") {
                    format!("--state-dir={}", state.path().display())
                } else {
                    a.clone()
                }
            }))
            .arg("--kubeconfig=/nonexistent/spate-chart-test/kubeconfig")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_ne!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot read kubeconfig"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn all_on_values_switch_on_every_template() {
    let documents = render_file(&repo().join("chart/ci/all-on-values.yaml"));
    assert_eq!(
        kinds(&documents),
        [
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    // watchNamespace: a Role there, and the leader Role in the Lease's namespace.
    let roles: Vec<(&str, &str)> = find(&documents, "Role")
        .iter()
        .map(|r| {
            (
                r["metadata"]["namespace"].as_str().unwrap(),
                r["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("work", "spate-all-on"),
            ("spate-system", "spate-all-on-leader")
        ]
    );
    let container = &find(&documents, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().unwrap();
    assert!(args.contains(&json!("--namespace=work")), "{args:?}");
    assert!(args.contains(&json!("--max-pods=200")), "{args:?}");
    // Each credential is granted to its namespaces only: the release's by default.
    for grant in [
        "--grant-env=SPATE_AMQP_URL=spate-system",
        "--grant-env=AWS_ACCESS_KEY_ID=work,*",
        "--grant-env=AWS_SECRET_ACCESS_KEY=work,*",
        "--trust-namespace=spate-system",
        "--pod-security=restricted",
        "--pod-security-namespace=build-farm=baseline",
        "--pod-security-namespace=ops=privileged",
    ] {
        assert!(args.contains(&json!(grant)), "{grant} in {args:?}");
    }
    let env = container["env"].as_array().unwrap();
    let from_secret = env
        .iter()
        .find(|e| e["name"] == "AWS_SECRET_ACCESS_KEY")
        .expect("credentials from an existing Secret");
    assert_eq!(
        from_secret["valueFrom"]["secretKeyRef"],
        json!({"name": "s3-credentials", "key": "secret-access-key", "optional": true})
    );
    let monitor = find(&documents, "ServiceMonitor")[0];
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let policy = find(&documents, "NetworkPolicy")[0];
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    // Without readSecrets, nothing may read Secrets.
    let documents = render("rbac:\n  readSecrets: false\n").unwrap();
    let rules = find(&documents, "ClusterRole")[0]["rules"]
        .as_array()
        .unwrap();
    assert!(
        !rules.iter().any(|r| r["resources"] == json!(["secrets"])),
        "{rules:?}"
    );
}

/// A minimal CRD, as a cluster with prometheus-operator has, for ServiceMonitor and
/// PrometheusRule.
fn monitoring_crd(kind: &str, plural: &str) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}
            }]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_are_accepted_by_kubectl_apply_server_side() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let defaults = render("").unwrap();
    let all_on = render_file(&repo().join("chart/ci/all-on-values.yaml"));
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let cache = dir.path().join("kube-cache");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        let output = kubectl(&kubeconfig, &cache, args, stdin);
        (
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };

    // What the cluster has before the chart: namespaces, the chart's CRD (Helm installs
    // crds/ first) and prometheus-operator's.
    for namespace in ["spate-system", "work"] {
        let (ok, out) = run(&["create", "namespace", namespace], None);
        assert!(ok, "{out}");
    }
    let crds = [
        serde_saphyr::from_str::<Value>(
            &std::fs::read_to_string(repo().join("chart/crds/pipelines.spate.dev.yaml")).unwrap(),
        )
        .unwrap(),
        monitoring_crd("ServiceMonitor", "servicemonitors"),
        monitoring_crd("PrometheusRule", "prometheusrules"),
    ];
    let (ok, out) = run(
        &["apply", "--server-side", "-f", "-"],
        Some(&yaml_stream(&crds.iter().collect::<Vec<_>>())),
    );
    assert!(ok, "{out}");

    for (label, documents) in [("default values", &defaults), ("all-on values", &all_on)] {
        let stream = yaml_stream(&documents.iter().collect::<Vec<_>>());
        // Discovery learns the new CRDs' kinds after a moment, as on a real cluster.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, out) = run(
                &["apply", "--server-side", "--field-manager=helm", "-f", "-"],
                Some(&stream),
            );
            if ok {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{label}: kubectl apply --server-side refused the chart: {out}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Every object is there, as applied.
        let (ok, out) = run(&["get", "-f", "-", "-o", "name"], Some(&stream));
        assert!(ok, "{label}: {out}");
        assert_eq!(out.lines().count(), documents.len(), "{label}: {out}");
        // Applying again changes nothing and is accepted (an upgrade with the same values).
        let (ok, out) = run(
            &["apply", "--server-side", "--field-manager=helm", "-f", "-"],
            Some(&stream),
        );
        assert!(ok, "{label}, second apply: {out}");
    }
    let (ok, out) = run(
        &[
            "get",
            "deployment",
            "spate-all-on",
            "-n",
            "spate-system",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].securityContext.readOnlyRootFilesystem}",
        ],
        None,
    );
    assert!(ok && out.trim() == "true", "{out}");
    cluster.shutdown().await;
}
