//! The objectStore source while its S3 server stops answering, in the middle of polling and
//! for longer than a poll interval and the client's patience, in the two ways a server fails:
//! - it hangs: moto (`scripts/s3-server`) frozen with SIGSTOP, then thawed with SIGCONT;
//! - it is killed and started again: a moto of the test's own is SIGKILLed and restarted,
//!   and gets its bucket back from moto's recorder (moto keeps buckets in memory only, where
//!   a real server has them on disk). Spate reaches it through a port forward that stays
//!   closed until the data is back, as a real server's port is until it has loaded its disk:
//!   refused connections, cut connections, then the same data.
//!
//! A file of its own: cargo runs test binaries one after another, so freezing the shared
//! server stalls no other test.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use spate_sources::checkpoint::FileCheckpoints;
use spate_sources::object_store::store::{self, Bucket, BucketConfig};
use spate_sources::object_store::{ObjectStoreCredentials, ObjectStoreMode, ObjectStoreSource};
use spate_sources::secret::{SecretError, SecretResolver, SecretValue};
use spate_sources::{Delivery, SourceContext};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::ports::free_port;

const ENDPOINT: &str = "http://127.0.0.1:9090";

/// One outage at a time: the frozen server would otherwise also stall the other test.
static ONE_OUTAGE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// moto accepts any key.
struct TestKeys;

impl SecretResolver for TestKeys {
    fn resolve<'a>(&'a self, _: &'a SecretValue) -> BoxFuture<'a, Result<String, SecretError>> {
        Box::pin(async { Ok("test".to_string()) })
    }
}

fn credentials() -> ObjectStoreCredentials {
    ObjectStoreCredentials {
        access_key_id: SecretValue::Env("AWS_ACCESS_KEY_ID".into()),
        secret_access_key: SecretValue::Env("AWS_SECRET_ACCESS_KEY".into()),
    }
}

async fn upload(bucket: &Bucket, keys: impl IntoIterator<Item = String>) {
    for key in keys {
        bucket
            .store()
            .put(
                &Path::parse(&key).unwrap(),
                PutPayload::from(key.clone().into_bytes()),
            )
            .await
            .unwrap_or_else(|e| panic!("upload {key}: {e}"));
    }
}

/// The pid of the moto server `scripts/s3-server` started.
fn moto_pid() -> String {
    std::fs::read_to_string("/tmp/spate-s3/moto.pid")
        .expect("scripts/s3-server writes /tmp/spate-s3/moto.pid")
        .trim()
        .to_string()
}

fn signal(name: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Thaws the server even when the test fails, so later tests find it answering.
struct Frozen(String);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("CONT", &self.0);
    }
}

async fn receive(deliveries: &mut mpsc::Receiver<Delivery>, seen: &mut Vec<String>, until: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < until {
        let delivery = tokio::time::timeout_at(deadline, deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {until} objects delivered", seen.len()))
            .expect("the source keeps running through the outage");
        seen.push(delivery.event.fields()["key"].as_str().unwrap().to_string());
        delivery.ack.ack().await.unwrap();
    }
}

/// Starts the shared moto (`scripts/s3-server`), installing it where it is missing.
fn shared_s3_server() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
    let status = std::process::Command::new(script)
        .arg("start")
        .status()
        .unwrap();
    assert!(status.success(), "scripts/s3-server start failed");
}

/// A new bucket on the moto at `endpoint`.
async fn create_bucket(name: &str, endpoint: &str) -> Bucket {
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{name}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    store::open(
        BucketConfig {
            url: &format!("s3://{name}"),
            endpoint: Some(endpoint),
            region: Some("us-east-1"),
            credentials: Some(&credentials()),
        },
        &TestKeys,
    )
    .await
    .unwrap()
}

/// A polling source listing `in/` of the bucket `name` every 200 ms through `endpoint`.
struct Polling {
    deliveries: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), spate_sources::SourceError>>,
    _state: tempfile::TempDir,
}

impl Polling {
    async fn start(name: &str, endpoint: &str) -> Polling {
        let state = tempfile::tempdir().unwrap();
        let config = ObjectStoreSource {
            url: format!("s3://{name}"),
            prefix: Some("in/".to_string()),
            suffix: None,
            glob: None,
            endpoint: Some(endpoint.to_string()),
            region: Some("us-east-1".to_string()),
            credentials: Some(credentials()),
            mode: ObjectStoreMode::Poll,
            poll_interval: "200ms".to_string(),
            notifications: None,
            presign_expiry: None,
        };
        let cx = SourceContext {
            pipeline: "default/outage".to_string(),
            secrets: Arc::new(TestKeys),
            checkpoints: Arc::new(FileCheckpoints::new(state.path())),
            state_dir: state.path().to_path_buf(),
            webhooks: None,
            backlog: Default::default(),
        };
        let source = spate_sources::object_store::build(&config, &cx)
            .await
            .unwrap();
        let (out, deliveries) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(out, shutdown.clone()));
        Polling {
            deliveries,
            shutdown,
            task,
            _state: state,
        }
    }

    /// Receives and acknowledges until `seen` holds `until` keys.
    async fn receive(&mut self, seen: &mut Vec<String>, until: usize) {
        receive(&mut self.deliveries, seen, until).await;
    }

    /// After a few more polls: every object before and after the outage, each exactly once.
    async fn finish(mut self, seen: &[String], expected: BTreeSet<String>) {
        if let Ok(Some(extra)) =
            tokio::time::timeout(Duration::from_secs(2), self.deliveries.recv()).await
        {
            panic!("delivered again: {}", extra.event.to_json());
        }
        let delivered: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            delivered, expected,
            "every object before and after the outage"
        );
        assert_eq!(seen.len(), expected.len(), "no object delivered twice");
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn keys(stage: &str) -> Vec<String> {
    (0..40).map(|i| format!("in/{stage}-{i:03}.bin")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_a_frozen_s3_server_and_loses_nothing() {
    let _alone = ONE_OUTAGE_AT_A_TIME.lock().await;
    shared_s3_server();
    let name = format!("spate-outage-{}", std::process::id());
    let bucket = create_bucket(&name, ENDPOINT).await;
    upload(&bucket, keys("before")).await;
    let mut polling = Polling::start(&name, ENDPOINT).await;
    let mut seen = Vec::new();
    polling.receive(&mut seen, 40).await;

    // Frozen for many poll intervals: listings in flight hang, later ones cannot connect.
    let frozen = Frozen(moto_pid());
    signal("STOP", &frozen.0);
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(frozen);

    upload(&bucket, keys("after")).await;
    polling.receive(&mut seen, 80).await;
    let expected = keys("before").into_iter().chain(keys("after")).collect();
    polling.finish(&seen, expected).await;
}

/// A moto server of the test's own, on a free port. It records the requests that build its
/// bucket, so that after a restart it can be given the same data by replaying them.
struct Moto {
    port: u16,
    recording: tempfile::TempDir,
    process: tokio::process::Child,
}

impl Moto {
    async fn start() -> Moto {
        let recording = tempfile::tempdir().unwrap();
        let port = free_port();
        let process = Self::spawn(port, recording.path()).await;
        Moto {
            port,
            recording,
            process,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn spawn(port: u16, recording: &std::path::Path) -> tokio::process::Child {
        let process = tokio::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("MOTO_RECORDER_FILEPATH", recording.join("requests.jsonl"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto installed (scripts/s3-server installs it)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto answers within 30s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        process
    }

    async fn recorder(&self, action: &str) {
        let answer = reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/{action}", self.url()))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{action}: {answer:?}");
    }

    /// SIGKILL, a new process on the same port, and the recorded requests replayed into it.
    async fn kill_and_restart(&mut self) {
        self.process.kill().await.unwrap();
        self.process = Self::spawn(self.port, self.recording.path()).await;
        self.recorder("replay-recording").await;
    }
}

/// The server's port as Spate sees it: a TCP forward to `upstream` that can be closed, which
/// refuses new connections and cuts the open ones.
struct PortForward {
    connections: JoinHandle<()>,
}

impl PortForward {
    async fn open(port: u16, upstream: u16) -> PortForward {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream));
        let connections = tokio::spawn(async move {
            // Dropped with this task when the port closes, cutting every connection.
            let mut open = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                open.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        PortForward { connections }
    }

    /// Returns once the listener is dropped: an abort only asks the task to stop, and under
    /// load a connect right after it could still reach the old listener.
    async fn close(self) {
        self.connections.abort();
        let _ = self.connections.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_the_s3_server_killed_and_restarted_with_its_data() {
    let _alone = ONE_OUTAGE_AT_A_TIME.lock().await;
    shared_s3_server();
    let mut moto = Moto::start().await;
    let name = format!("spate-restart-{}", std::process::id());
    moto.recorder("start-recording").await;
    let bucket = create_bucket(&name, &moto.url()).await;
    upload(&bucket, keys("before")).await;
    moto.recorder("stop-recording").await;

    let port = free_port();
    let forward = PortForward::open(port, moto.port).await;
    let mut polling = Polling::start(&name, &format!("http://127.0.0.1:{port}")).await;
    let mut seen = Vec::new();
    // Part of the bucket delivered, the rest in the channel or not yet listed.
    polling.receive(&mut seen, 20).await;

    forward.close().await;
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "the port still answers"
    );
    moto.kill_and_restart().await;
    // Many poll intervals of refused connections in all, while the deliveries already out
    // are acknowledged (the checkpoint is on local disk, not on the server).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _forward = PortForward::open(port, moto.port).await;

    upload(&bucket, keys("after")).await;
    polling.receive(&mut seen, 80).await;
    assert!(
        !polling.task.is_finished(),
        "the source gave up during the outage"
    );
    let expected = keys("before").into_iter().chain(keys("after")).collect();
    polling.finish(&seen, expected).await;
}
