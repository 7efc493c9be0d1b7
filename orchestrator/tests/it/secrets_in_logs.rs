//! No secret reaches the logs: `spate run -f` at `RUST_LOG=debug`, with a webhook bearer token,
//! an S3 secret key and an AMQP URL (with its password) from Kubernetes Secrets, a NATS URL
//! holding a token (its server unreachable), and a sink
//! bearer token from the environment, is driven through good calls, refused calls, events that
//! fail to render (dead-lettered to a sink that is down) and a broker that refuses the
//! password. Everything it prints, stdout and stderr, must be free of each secret value.

use crate::common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{KillOnDrop, free_port};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use spate_sim::{SimCluster, SimConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn random_secret(label: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{label}-{}", data_encoding::HEXLOWER.encode(&bytes))
}

async fn post(addr: SocketAddr, token: &str, body: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "POST /hooks/secretive HTTP/1.1\r\nHost: spate\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&raw)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_in_debug_logs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let webhook_token = random_secret("whtoken");
    let s3_secret = random_secret("s3secret");
    let s3_key_id = random_secret("s3keyid");
    let sink_token = random_secret("sinktoken");
    let amqp_password = random_secret("amqppw");
    let amqp_url = format!("amqp://guest:{amqp_password}@127.0.0.1:5672/%2f");
    // NATS takes a token as the URL's user part; nothing listens on the port, so the source
    // logs its reconnection attempts.
    let nats_token = random_secret("natstoken");
    let nats_port = free_port();

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), "default");
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("spate-secrets".to_string()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([
                    ("webhook-token".to_string(), webhook_token.clone()),
                    ("s3-secret".to_string(), s3_secret.clone()),
                    ("amqp-url".to_string(), amqp_url.clone()),
                ])),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: secretive
spec:
  source:
    webhook:
      path: /hooks/secretive
      auth: {bearer: {token: {secretKeyRef: {name: spate-secrets, key: webhook-token}}}}
  fanout: {maxJobsPerSecond: 100, burst: 100}
  retry: {maxAttempts: 2, initialBackoff: 50ms, maxBackoff: 200ms}
  sinks:
    results:
      - objectStore:
          url: s3://spate-secret-results
          endpoint: http://127.0.0.1:9
          region: us-east-1
          credentials:
            accessKeyId: {env: SPATE_TEST_S3_KEY_ID}
            secretAccessKey: {secretKeyRef: {name: spate-secrets, key: s3-secret}}
    deadLetter:
      webhook: {url: "http://127.0.0.1:9/dead", bearerToken: {env: SPATE_TEST_SINK_TOKEN}, maxAttempts: 2}
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: work
              image: busybox
              args: ["{{ event.data.name }}"]
"#
        .to_string()
            + &format!(
                r#"---
apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: nats-unreachable
spec:
  source:
    nats: {{url: "nats://{nats_token}@127.0.0.1:{nats_port}", subject: spate.secret}}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
            ),
    )
    .unwrap();
    // A separate process: a source that stops ends `spate run -f` as a whole (see
    // docs/reliability.md), which would take the webhook pipeline down with it.
    let broker_pipeline = dir.path().join("broker.yaml");
    std::fs::write(
        &broker_pipeline,
        r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: broker-refuses
spec:
  source:
    amqp: {urlFrom: {secretKeyRef: {name: spate-secrets, key: amqp-url}}, queue: spate-secret-never}
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: work, image: busybox}]
"#,
    )
    .unwrap();

    let broker_log = dir.path().join("broker.log");
    let broker_log_file = std::fs::File::create(&broker_log).unwrap();
    let broker = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["run", "--metrics-listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("broker-state"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("-f")
        .arg(&broker_pipeline)
        .env("RUST_LOG", "debug")
        .stdout(broker_log_file.try_clone().unwrap())
        .stderr(broker_log_file)
        .stdin(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();

    let webhook = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let log = dir.path().join("spate.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut spate = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["run", "--metrics-listen", "127.0.0.1:0", "--webhook-listen"])
        .arg(webhook.to_string())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("-f")
        .arg(&pipeline)
        .env("RUST_LOG", "debug")
        .env("SPATE_LOG_FORMAT", "json")
        .env("SPATE_TEST_S3_KEY_ID", &s3_key_id)
        .env("SPATE_TEST_SINK_TOKEN", &sink_token)
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .stdin(Stdio::null())
        .spawn()
        .map(KillOnDrop)
        .unwrap();

    // Wait for the webhook to take a good call.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = post(webhook, &webhook_token, r#"{"name": "first"}"#).await;
        if status == Some(202) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let output = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = output.lines().rev().take(40).collect();
            panic!(
                "the webhook never accepted a call (last answer {status:?}, spate {:?}); log \
                 tail:\n{}",
                spate.try_wait(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Good calls, refused calls (near misses of the token), and events that cannot render
    // (no `data.name`), which go to the dead-letter sink, which is down.
    for i in 0..3 {
        assert_eq!(
            post(webhook, &webhook_token, &format!(r#"{{"name": "n{i}"}}"#)).await,
            Some(202)
        );
        let near_miss = format!("{}x", &webhook_token[..webhook_token.len() - 1]);
        assert_eq!(post(webhook, &near_miss, "{}").await, Some(401));
        // Not dead-lettered while the sink is down, so handed back: Spate does not have it.
        assert_eq!(
            post(webhook, &webhook_token, r#"{"other": 1}"#).await,
            Some(503)
        );
    }
    // Let the Jobs finish (results go to the unreachable S3 endpoint), dead letters fail,
    // and the broker refuse the password a few times.
    tokio::time::sleep(Duration::from_secs(8)).await;
    spate.kill().unwrap();
    spate.wait().unwrap();
    drop(broker);

    let output =
        std::fs::read_to_string(&log).unwrap() + &std::fs::read_to_string(&broker_log).unwrap();
    assert!(
        output.contains("DEBUG") || output.contains("debug"),
        "debug logging was not on: {output}"
    );
    // The error paths did run: otherwise the test would prove nothing.
    let lower = output.to_lowercase();
    for expected in [
        "webhook",
        "secretive",
        "broker-refuses",
        "access_refused",
        "cannot connect to nats",
    ] {
        assert!(
            lower.contains(expected),
            "nothing logged about {expected}: {output}"
        );
    }
    // JSON logs carry the event's span: its id through to its Job's name.
    let traced = output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .any(|line| {
            line["fields"]["message"] == "Job exists"
                && line["span"]["name"] == "event"
                && line["span"]["event"]
                    .as_str()
                    .is_some_and(|id| !id.is_empty())
                && line["span"]["job"]
                    .as_str()
                    .is_some_and(|job| job.starts_with("secretive"))
        });
    assert!(
        traced,
        "no JSON log line ties an event to its Job: {output}"
    );
    let mut leaks = Vec::new();
    for (what, secret) in [
        ("the webhook bearer token", &webhook_token),
        ("the S3 secret access key", &s3_secret),
        ("the S3 access key id", &s3_key_id),
        ("the dead-letter sink's bearer token", &sink_token),
        ("the AMQP password", &amqp_password),
        ("the NATS token", &nats_token),
    ] {
        for (number, line) in output.lines().enumerate() {
            if line.contains(secret.as_str()) {
                leaks.push(format!("{what} on log line {}: {line}", number + 1));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    cluster.shutdown().await;
}
