//! The chaos table: a fault injected during a 2,000-event burst, each row one fault and one
//! source. `spate run` killed with SIGKILL five times at random moments, restarted each
//! time, under RabbitMQ, NATS JetStream, S3 polling, a Redis stream and a Kafka topic;
//! RabbitMQ restarted; a nats-server SIGKILLed and restarted; the leader of two controller
//! replicas SIGKILLed, or frozen past its Lease and thawed, the other taking over; and
//! `spate run` SIGKILLed five times under webhook callers that retry until they get `202`.
//! Every event must end with exactly one Job, and nothing may be left unacknowledged.
//! `SPATE_CHAOS_ONLY=<text>` runs only the rows whose fault or scenario contains the text.
//!
//! Taking the shared RabbitMQ away is safe because this is the only test of its binary and
//! cargo runs test binaries one after another.
//!
//! The table is printed when a scenario fails, and written to the file named by
//! `SPATE_RELIABILITY_TABLE` (scripts/test sets it and prints it in the CI log).

mod common;
#[path = "../../sources/tests/support/kafka.rs"]
mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    AMQP, KillOnDrop, connect_amqp, delete_queues, ids, messages_left, publish, redis_cli,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, PostParams};
use rand::{Rng, SeedableRng};
use spate::pipeline::Pipeline;
use spate_sim::{SimCluster, SimConfig};

const EVENTS: usize = 2000;
const KILLS: usize = 5;
const NATS: &str = "nats://127.0.0.1:4222";
const S3: &str = "http://127.0.0.1:9090";
const KAFKA_PARTITIONS: i32 = 4;
/// JetStream's redelivery timeout, the longest a lost acknowledgement goes unnoticed.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Short, so the surviving replica takes over within seconds rather than the default 15.
const LEASE_DURATION: Duration = Duration::from_secs(4);
/// Webhook callers at once, each waiting for its Job before its next call.
const WEBHOOK_CALLERS: usize = 16;
const WEBHOOK_JOBS_PER_SECOND: u32 = 200;

/// One row of the table.
struct Outcome {
    fault: String,
    scenario: &'static str,
    events: usize,
    jobs: usize,
    lost: usize,
    duplicates: usize,
    unacknowledged: u64,
    /// What went wrong with the fault itself, such as a replica that did not take over.
    problem: Option<String>,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.jobs == self.events
            && self.lost == 0
            && self.duplicates == 0
            && self.unacknowledged == 0
            && self.problem.is_none()
    }
}

fn table(rows: &[Outcome], seed: u64) -> String {
    let mut out = format!(
        "One fault per row during a {EVENTS}-event burst; SIGKILL moments drawn at random \
         (seed {seed})\n\n\
         | fault | scenario | events in | Jobs created | events lost | duplicates | left unacknowledged | result |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n"
    );
    for row in rows {
        let result = match (&row.problem, row.passed()) {
            (_, true) => "pass".to_string(),
            (None, false) => "FAIL".to_string(),
            (Some(problem), false) => format!("FAIL: {problem}"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {result} |",
            row.fault,
            row.scenario,
            row.events,
            row.jobs,
            row.lost,
            row.duplicates,
            row.unacknowledged,
        );
    }
    out
}

/// What goes wrong during the burst.
enum Fault {
    /// `spate run -f` SIGKILLed [`KILLS`] times at random moments, restarted each time.
    SpateKilled,
    /// The broker stopped and started (`rabbitmqctl stop_app`, `start_app`); the queue is
    /// durable and its messages persistent, as they must be to survive it.
    RabbitMqRestarted,
    /// The scenario's own nats-server SIGKILLed, started again on its port and store.
    NatsRestarted(NatsServer),
    /// Two controller replicas (`spate run` without -f); the holder of the Lease SIGKILLed.
    LeaderKilled,
    /// The same, the holder frozen (SIGSTOP) until the other has taken the Lease and made
    /// progress, then thawed: it must notice it is no longer leader, and run nothing twice.
    LeaderFrozen,
}

impl Fault {
    fn label(&self) -> String {
        match self {
            Fault::SpateKilled => format!("SIGKILL ×{KILLS}"),
            Fault::RabbitMqRestarted => "RabbitMQ restarted".to_string(),
            Fault::NatsRestarted(_) => "nats-server SIGKILLed and restarted".to_string(),
            Fault::LeaderKilled => "leader SIGKILLed, 2 replicas".to_string(),
            Fault::LeaderFrozen => "leader frozen past its Lease, then thawed".to_string(),
        }
    }

    /// Killing `spate` acts at once, so its bursts run at full speed. The other faults take
    /// seconds to act (rabbitmqctl, the Lease running out), so their bursts are slower, to
    /// be under way still when they hit.
    fn jobs_per_second(&self) -> u32 {
        match self {
            Fault::SpateKilled => 2000,
            _ => 200,
        }
    }
}

/// Event id → Jobs carrying it; the observer retries the API like any client.
async fn jobs_per_event(jobs: &Api<Job>, pipeline: &str) -> (usize, BTreeMap<String, usize>) {
    let params = ListParams::default().labels(&format!("spate.dev/pipeline={pipeline}"));
    for _ in 0..50 {
        if let Ok(list) = jobs.list(&params).await {
            return (list.items.len(), common::jobs_per_event(&list.items));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("listing Jobs keeps failing");
}

/// What differs between sources: how the burst is published, the pipeline's source, and
/// how to tell that nothing is left unacknowledged.
enum Source {
    Amqp {
        queue: String,
    },
    JetStream {
        url: String,
        stream: String,
        subject: String,
    },
    S3 {
        bucket: String,
    },
    RedisStream {
        stream: String,
    },
    Kafka {
        topic: String,
    },
    /// Callers posting to `spate run`'s webhook server on `port`, retrying every answer but
    /// `202` with the same `Idempotency-Key`, as the webhook's delivery contract asks.
    Webhook {
        port: u16,
        accepted: Arc<AtomicUsize>,
        callers: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    },
}

impl Source {
    fn webhook() -> Source {
        Source::Webhook {
            port: common::free_port(),
            accepted: Arc::new(AtomicUsize::new(0)),
            callers: std::sync::Mutex::new(None),
        }
    }

    async fn publish(&self) {
        match self {
            Source::Amqp { queue } => {
                let connection = connect_amqp().await;
                publish(&connection, queue, ids("m", 0, EVENTS)).await;
            }
            Source::JetStream {
                url,
                stream,
                subject,
            } => {
                let jetstream = jetstream(url).await;
                jetstream
                    .create_stream(async_nats::jetstream::stream::Config {
                        name: stream.clone(),
                        subjects: vec![subject.clone()],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let mut acks = Vec::with_capacity(EVENTS);
                for i in 0..EVENTS {
                    acks.push(
                        jetstream
                            .publish(subject.clone(), format!("{{\"n\":{i}}}").into())
                            .await
                            .unwrap(),
                    );
                }
                for ack in acks {
                    ack.await.unwrap();
                }
            }
            // The calls go on in the background, through the kills, until each has its 202.
            Source::Webhook {
                port,
                accepted,
                callers,
            } => {
                let url = format!("http://127.0.0.1:{port}/hooks/chaos");
                let (http, accepted) = (reqwest::Client::new(), accepted.clone());
                let calls = futures::StreamExt::for_each_concurrent(
                    futures::stream::iter(0..EVENTS),
                    WEBHOOK_CALLERS,
                    move |i| {
                        let (http, url, accepted) = (http.clone(), url.clone(), accepted.clone());
                        async move {
                            common::post_until_accepted(&http, &url, &format!("w-{i}")).await;
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                );
                *callers.lock().unwrap() = Some(tokio::spawn(calls));
            }
            Source::Kafka { topic } => {
                kafka::ensure_broker();
                kafka::create_topic(kafka::BROKER, topic, KAFKA_PARTITIONS).await;
                let produced =
                    kafka::produce(&kafka::producer(kafka::BROKER), topic, 0, EVENTS).await;
                assert_eq!(produced.len(), EVENTS);
            }
            Source::RedisStream { stream } => {
                let entries: Vec<String> = (0..EVENTS)
                    .map(|n| format!("XADD {stream} * n {n}"))
                    .collect();
                assert_eq!(redis_cli(&entries).len(), EVENTS);
            }
            Source::S3 { bucket } => {
                let status = tokio::process::Command::new(
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server"),
                )
                .arg("start")
                .status()
                .await
                .unwrap();
                assert!(status.success(), "scripts/s3-server start failed");
                let http = reqwest::Client::new();
                let created = http.put(format!("{S3}/{bucket}")).send().await.unwrap();
                assert!(created.status().is_success(), "{created:?}");
                futures::StreamExt::for_each_concurrent(
                    futures::stream::iter(0..EVENTS),
                    32,
                    |i| {
                        let (http, bucket) = (http.clone(), bucket.clone());
                        async move {
                            let put = http
                                .put(format!("{S3}/{bucket}/in/object-{i:05}.bin"))
                                .body(format!("object {i}"))
                                .send()
                                .await
                                .unwrap();
                            assert!(put.status().is_success());
                        }
                    },
                )
                .await;
            }
        }
    }

    fn source_yaml(&self) -> String {
        match self {
            Source::Amqp { queue } => {
                format!("amqp: {{url: \"{AMQP}\", queue: {queue}, prefetch: 200}}")
            }
            Source::JetStream {
                url,
                stream,
                subject,
            } => format!(
                "nats: {{url: \"{url}\", subject: {subject}, \
                 jetstream: {{stream: {stream}, durable: chaos, ackWait: {ack_wait}s}}}}",
                ack_wait = ACK_WAIT.as_secs()
            ),
            Source::RedisStream { stream } => format!(
                "redisStreams: {{url: \"redis://127.0.0.1:6379\", stream: {stream}, group: chaos, \
                 consumer: chaos, claimIdle: 5s}}"
            ),
            // A short session, so the group gives a killed member's partitions to its
            // successor within seconds rather than the default 45.
            Source::Kafka { topic } => format!(
                "kafka: {{brokers: [\"{broker}\"], topic: {topic}, group: chaos, \
                 commitInterval: 200ms, properties: {{session.timeout.ms: \"6000\", \
                 heartbeat.interval.ms: \"500\"}}}}",
                broker = kafka::BROKER
            ),
            Source::S3 { bucket } => format!(
                "objectStore: {{url: \"s3://{bucket}\", prefix: in/, endpoint: \"{S3}\", \
                 region: us-east-1, pollInterval: 300ms}}"
            ),
            // `respond: afterJob`, the default: a 202 only once the Job exists.
            Source::Webhook { .. } => "webhook: {path: /hooks/chaos, auth: {none: {}}}".to_string(),
        }
    }

    /// How long a `spate run` SIGKILLed waits before it is started again. Kafka: until the
    /// killed member's session (6s) has expired. Kafka itself rebalances again when a dead
    /// member's session ends, but tansu 0.6 does not: a member that joined beside the dead one
    /// was seen assigned no partitions for good (see engine_kafka.rs).
    fn restart_gap(&self) -> Duration {
        match self {
            Source::Kafka { .. } => Duration::from_secs(7),
            _ => Duration::ZERO,
        }
    }

    /// What `spate run` needs besides the pipeline to serve this source.
    fn run_args(&self) -> Vec<String> {
        match self {
            Source::Webhook { port, .. } => {
                vec!["--webhook-listen".to_string(), format!("127.0.0.1:{port}")]
            }
            _ => Vec::new(),
        }
    }

    /// Messages the broker still holds for the pipeline, read while `spate` is stopped:
    /// while it runs, RabbitMQ counts none of those it holds unacknowledged.
    /// Polling has no acknowledgement: its promise is the checkpoint, which the duplicate
    /// count checks.
    async fn unacknowledged(&self) -> u64 {
        match self {
            Source::Amqp { queue } => u64::from(messages_left(&connect_amqp().await, queue).await),
            Source::JetStream { url, stream, .. } => {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream(url)
                    .await
                    .get_stream(stream)
                    .await
                    .unwrap()
                    .get_consumer("chaos")
                    .await
                    .unwrap();
                let info = consumer.info().await.unwrap();
                info.num_ack_pending as u64 + info.num_pending
            }
            Source::RedisStream { stream } => {
                let lines = redis_cli(&[format!("XPENDING {stream} chaos")]);
                lines
                    .first()
                    .and_then(|count| count.parse().ok())
                    .unwrap_or_else(|| panic!("XPENDING answered {lines:?}"))
            }
            // Records above the group's committed offsets: not yet known to have a Job.
            Source::Kafka { topic } => {
                let highs = kafka::high_watermarks(kafka::BROKER, topic, KAFKA_PARTITIONS);
                let committed = kafka::committed(kafka::BROKER, "chaos", topic, KAFKA_PARTITIONS);
                highs
                    .iter()
                    .zip(&committed)
                    .map(|(high, committed)| u64::try_from(high - committed.max(&0)).unwrap_or(0))
                    .sum()
            }
            Source::S3 { .. } => 0,
            // Calls not answered 202 yet: their callers still retry them.
            Source::Webhook { accepted, .. } => (EVENTS - accepted.load(Ordering::SeqCst)) as u64,
        }
    }

    /// Waits, at most `timeout`, until the broker holds nothing unacknowledged for the
    /// pipeline. An acknowledgement lost to a fault is made good only when the message comes
    /// again, for JetStream after `ackWait`, and is acknowledged against its existing Job.
    async fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.unacknowledged().await > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn clean_up(&self) {
        match self {
            Source::Amqp { queue } => delete_queues(&connect_amqp().await, &[queue]).await,
            Source::JetStream { url, stream, .. } => {
                let _ = jetstream(url).await.delete_stream(stream).await;
            }
            Source::RedisStream { stream } => {
                redis_cli(&[format!("DEL {stream}")]);
            }
            Source::Webhook { callers, .. } => {
                if let Some(callers) = callers.lock().unwrap().take() {
                    callers.abort();
                }
            }
            // Topics live in the broker's memory; a unique name per run keeps them apart.
            Source::Kafka { .. } | Source::S3 { .. } => {}
        }
    }
}

async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let nats = async_nats::connect(url)
        .await
        .unwrap_or_else(|error| panic!("NATS on {url} (scripts/services starts 4222): {error}"));
    async_nats::jetstream::new(nats)
}

/// A nats-server of the scenario's own, on a free port with its JetStream store in a
/// temporary directory, so that killing it leaves the machine's shared server alone.
struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    process: KillOnDrop,
}

impl NatsServer {
    async fn start() -> NatsServer {
        let port = common::free_port();
        let store = tempfile::tempdir().unwrap();
        let process = Self::spawn(port, store.path()).await;
        NatsServer {
            port,
            store,
            process,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(port: u16, store: &Path) -> KillOnDrop {
        let process = KillOnDrop(
            Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(store)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server installed (scripts/services)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server listens within 10s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }

    /// SIGKILL: no chance to write what it holds in memory.
    fn kill(&mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }

    /// On the same port and store.
    async fn start_again(&mut self) {
        self.process = Self::spawn(self.port, self.store.path()).await;
    }
}

async fn rabbitmqctl(command: &str) {
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("rabbitmqctl")
            .arg(command)
            .stdout(Stdio::null())
            .status(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {command} within 60s"))
    .unwrap_or_else(|error| panic!("rabbitmqctl {command}: {error}"));
    assert!(status.success(), "rabbitmqctl {command}: {status}");
}

async fn lease_holder(cluster: &SimCluster) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster.client(), "default");
    leases
        .get("spate-controller")
        .await
        .unwrap()
        .spec
        .and_then(|spec| spec.holder_identity)
}

/// How the Lease's holder stops holding it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takeover {
    Killed,
    Frozen,
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// A pipeline on a simulated cluster of its own, and how `spate run` is started on it.
struct Bench {
    scenario: &'static str,
    name: &'static str,
    cluster: SimCluster,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    manifest: String,
    file: PathBuf,
    /// What the source needs of `spate run -f` besides the file.
    run_args: Vec<String>,
    /// [`Source::restart_gap`].
    restart_gap: Duration,
    jobs: Api<Job>,
}

impl Bench {
    async fn start(
        scenario: &'static str,
        name: &'static str,
        source: &Source,
        jobs_per_second: u32,
    ) -> Bench {
        let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig).unwrap();
        let manifest = format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
spec:
  source:
    {source}
  fanout: {{maxParallelism: 2000, maxJobsPerSecond: {jobs_per_second}, burst: {burst}}}
  retry: {{maxAttempts: 20, initialBackoff: 50ms, maxBackoff: 1s}}
  ttlSecondsAfterFinished: 3600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#,
            source = source.source_yaml(),
            burst = jobs_per_second / 4
        );
        let file = dir.path().join("pipeline.yaml");
        std::fs::write(&file, &manifest).unwrap();
        let jobs = Api::namespaced(cluster.client(), "default");
        Bench {
            scenario,
            name,
            cluster,
            dir,
            kubeconfig,
            manifest,
            file,
            run_args: source.run_args(),
            restart_gap: source.restart_gap(),
            jobs,
        }
    }

    /// `spate run` with `args` and a state directory of its own, named `state`.
    fn spawn<I, S>(&self, state: &str, args: I) -> KillOnDrop
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_spate"))
                .args(["run", "--metrics-listen", "127.0.0.1:0", "--state-dir"])
                .arg(self.dir.path().join(state))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args)
                // For the object-store scenario; moto accepts any.
                .envs([
                    ("AWS_ACCESS_KEY_ID", "test"),
                    ("AWS_SECRET_ACCESS_KEY", "test"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// `spate run -f` on the pipeline file; its restarts share its state.
    fn spawn_from_file(&self) -> KillOnDrop {
        let file = [OsStr::new("-f"), self.file.as_os_str()];
        let args = file.into_iter().chain(self.run_args.iter().map(OsStr::new));
        self.spawn("state", args)
    }

    /// How many events have Jobs once `target` do or `timeout` has passed.
    async fn events_with_jobs(&self, target: usize, timeout: Duration, poll: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, owners) = jobs_per_event(&self.jobs, self.name).await;
            if owners.len() >= target || Instant::now() >= deadline {
                return owners.len();
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Waits until `target` events have Jobs, the moment for `fault`.
    async fn reach(&self, target: usize, fault: &str, poll: Duration) {
        let reached = self
            .events_with_jobs(target, Duration::from_secs(90), poll)
            .await;
        assert!(
            reached >= target,
            "{}: stuck at {reached} of {target} events before {fault}",
            self.scenario
        );
    }

    /// Injects `fault` during the burst; the `spate` processes left running, and what went
    /// wrong with the fault itself.
    async fn inject(
        &self,
        fault: &mut Fault,
        rng: &mut rand::rngs::StdRng,
    ) -> (Vec<KillOnDrop>, Option<String>) {
        const ONE_THIRD: usize = EVENTS / 3;
        const POLL: Duration = Duration::from_millis(50);
        match fault {
            Fault::SpateKilled => {
                let mut spate = self.spawn_from_file();
                for kill in 1..=KILLS {
                    // Spread the kills over the burst, each at a random moment within its
                    // stretch.
                    let target =
                        EVENTS * kill / (KILLS + 2) + rng.random_range(0..EVENTS / (KILLS + 2));
                    let poll = Duration::from_millis(rng.random_range(10..60));
                    self.reach(target, &format!("kill {kill}"), poll).await;
                    spate.kill().unwrap();
                    spate.wait().unwrap();
                    tokio::time::sleep(self.restart_gap).await;
                    spate = self.spawn_from_file();
                }
                (vec![spate], None)
            }
            Fault::RabbitMqRestarted => {
                let spate = self.spawn_from_file();
                self.reach(ONE_THIRD, "the broker's restart", POLL).await;
                rabbitmqctl("stop_app").await;
                let problem = self.after_the_burst("the broker stopped").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                rabbitmqctl("start_app").await;
                (vec![spate], problem)
            }
            Fault::NatsRestarted(server) => {
                let spate = self.spawn_from_file();
                self.reach(ONE_THIRD, "the server's SIGKILL", POLL).await;
                server.kill();
                let problem = self.after_the_burst("the server was killed").await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                server.start_again().await;
                (vec![spate], problem)
            }
            Fault::LeaderKilled => self.fail_over(ONE_THIRD, POLL, Takeover::Killed).await,
            Fault::LeaderFrozen => self.fail_over(ONE_THIRD, POLL, Takeover::Frozen).await,
        }
    }

    /// Two controller replicas run the pipeline as a Pipeline resource; the Lease's holder is
    /// SIGKILLed or frozen once `target` events have Jobs and the other must take the Lease
    /// over.
    async fn fail_over(
        &self,
        target: usize,
        poll: Duration,
        takeover: Takeover,
    ) -> (Vec<KillOnDrop>, Option<String>) {
        common::install_crd(&self.cluster.client()).await;
        let [first, second] = ["chaos-a", "chaos-b"].map(|identity| {
            let replica = self.spawn(
                identity,
                [
                    "--identity",
                    identity,
                    "--lease-duration",
                    &format!("{}s", LEASE_DURATION.as_secs()),
                    "--webhook-listen",
                    "127.0.0.1:0",
                    "-n",
                    "default",
                ],
            );
            (identity, replica)
        });
        let mut pipeline = spate::pipeline::load_str(&self.manifest, "chaos.yaml")
            .unwrap()
            .remove(0)
            .pipeline;
        pipeline.metadata.namespace = Some("default".to_string());
        Api::<Pipeline>::namespaced(self.cluster.client(), "default")
            .create(&PostParams::default(), &pipeline)
            .await
            .unwrap();
        self.reach(target, "the leader's SIGKILL", poll).await;
        let holder = lease_holder(&self.cluster).await;
        let ((_, mut leader), (survivor, replica)) = if holder.as_deref() == Some(first.0) {
            (first, second)
        } else {
            assert_eq!(holder.as_deref(), Some(second.0), "the Lease's holder");
            (second, first)
        };
        match takeover {
            Takeover::Killed => {
                leader.kill().unwrap();
                leader.wait().unwrap();
            }
            Takeover::Frozen => signal("STOP", leader.id()),
        }
        let mut problem = self.after_the_burst("the leader was stopped").await;
        // It expires LEASE_DURATION after the last renewal; the survivor tries every third.
        let deadline = Instant::now() + 3 * LEASE_DURATION;
        let mut holder = lease_holder(&self.cluster).await;
        while holder.as_deref() != Some(survivor) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            holder = lease_holder(&self.cluster).await;
        }
        if holder.as_deref() != Some(survivor) {
            problem = Some(format!(
                "{survivor} did not take the Lease over ({holder:?})"
            ));
        }
        if takeover == Takeover::Killed {
            return (vec![replica], problem);
        }
        // The frozen leader still holds its unacknowledged messages; the new one takes the
        // rest. Once it has made progress, the old one wakes up mid-work: it must find the
        // Lease taken and stop, leaving the Jobs it was creating as they are.
        let (_, owners) = jobs_per_event(&self.jobs, self.name).await;
        let progress = (owners.len() + EVENTS / 10).min(EVENTS);
        let reached = self
            .events_with_jobs(progress, 3 * LEASE_DURATION, poll)
            .await;
        if reached < progress {
            problem.get_or_insert(format!(
                "no progress while the leader was frozen: {} then {reached} events with Jobs",
                owners.len()
            ));
        }
        signal("CONT", leader.id());
        tokio::time::sleep(LEASE_DURATION).await;
        let holder = lease_holder(&self.cluster).await;
        if holder.as_deref() != Some(survivor) {
            problem.get_or_insert(format!(
                "the thawed leader took the Lease back ({holder:?})"
            ));
        }
        (vec![replica, leader], problem)
    }

    /// A single fault must hit the burst under way: a fault that lands after it says nothing.
    async fn after_the_burst(&self, fault: &str) -> Option<String> {
        let (_, owners) = jobs_per_event(&self.jobs, self.name).await;
        (owners.len() >= EVENTS).then(|| format!("the burst was over when {fault}"))
    }
}

async fn run_scenario(
    scenario: &'static str,
    name: &'static str,
    source: Source,
    mut fault: Fault,
    rng: &mut rand::rngs::StdRng,
) -> Outcome {
    source.publish().await;
    let jobs_per_second = match source {
        // Callers outpace Job creation, so calls are waiting for their Jobs at each kill:
        // the moment a 202 given too early would be lost.
        Source::Webhook { .. } => WEBHOOK_JOBS_PER_SECOND,
        _ => fault.jobs_per_second(),
    };
    let bench = Bench::start(scenario, name, &source, jobs_per_second).await;
    let (mut running, problem) = bench.inject(&mut fault, rng).await;
    bench
        .events_with_jobs(EVENTS, Duration::from_secs(120), Duration::from_millis(200))
        .await;
    // Long enough for acknowledgements in flight to land and for a poll to find anything
    // the checkpoint forgot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    source.settle(ACK_WAIT + Duration::from_secs(10)).await;
    for spate in &mut running {
        spate.kill().unwrap();
        spate.wait().unwrap();
    }

    let (job_count, owners) = jobs_per_event(&bench.jobs, name).await;
    let covered: BTreeSet<&String> = owners.keys().collect();
    let outcome = Outcome {
        fault: fault.label(),
        scenario,
        events: EVENTS,
        jobs: job_count,
        lost: EVENTS.saturating_sub(covered.len()),
        duplicates: owners.values().filter(|count| **count > 1).count(),
        unacknowledged: source.unacknowledged().await,
        problem,
    };
    source.clean_up().await;
    bench.cluster.shutdown().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_during_two_thousand_event_bursts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed: u64 = std::env::var("SPATE_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tag = std::process::id();
    let nats = NatsServer::start().await;
    let scenarios = [
        (
            "RabbitMQ queue (perEvent)",
            "chaos-amqp",
            Source::Amqp {
                queue: format!("spate-chaos-{tag}"),
            },
            Fault::SpateKilled,
        ),
        (
            "NATS JetStream durable consumer (perEvent)",
            "chaos-jetstream",
            Source::JetStream {
                url: NATS.to_string(),
                stream: format!("SPATE_CHAOS_{tag}"),
                subject: format!("spate.chaos.{tag}"),
            },
            Fault::SpateKilled,
        ),
        (
            "S3 polling with a checkpoint (perEvent)",
            "chaos-s3",
            Source::S3 {
                bucket: format!("spate-chaos-{tag}"),
            },
            Fault::SpateKilled,
        ),
        (
            "Redis Streams consumer group (perEvent)",
            "chaos-redis",
            Source::RedisStream {
                stream: format!("spate-chaos-{tag}"),
            },
            Fault::SpateKilled,
        ),
        (
            "Kafka consumer group, 4 partitions (perEvent)",
            "chaos-kafka",
            Source::Kafka {
                topic: format!("spate-chaos-{tag}"),
            },
            Fault::SpateKilled,
        ),
        (
            "RabbitMQ durable queue, persistent messages (perEvent)",
            "chaos-amqp-restart",
            Source::Amqp {
                queue: format!("spate-chaos-restart-{tag}"),
            },
            Fault::RabbitMqRestarted,
        ),
        (
            "NATS JetStream durable consumer, file store (perEvent)",
            "chaos-nats-restart",
            Source::JetStream {
                url: nats.url(),
                stream: format!("SPATE_CHAOS_{tag}"),
                subject: format!("spate.chaos.{tag}"),
            },
            Fault::NatsRestarted(nats),
        ),
        (
            "RabbitMQ queue, Pipeline resource (perEvent)",
            "chaos-failover",
            Source::Amqp {
                queue: format!("spate-chaos-failover-{tag}"),
            },
            Fault::LeaderKilled,
        ),
        (
            "RabbitMQ queue, Pipeline resource (perEvent)",
            "chaos-frozen",
            Source::Amqp {
                queue: format!("spate-chaos-frozen-{tag}"),
            },
            Fault::LeaderFrozen,
        ),
        (
            "webhook callers retrying with their Idempotency-Key (respond: afterJob)",
            "chaos-webhook",
            Source::webhook(),
            Fault::SpateKilled,
        ),
    ];
    // SPATE_CHAOS_ONLY=<text> runs the rows whose fault or scenario contains it, to debug one.
    let only = std::env::var("SPATE_CHAOS_ONLY").unwrap_or_default();
    let mut rows = Vec::new();
    for (scenario, name, source, fault) in scenarios {
        if scenario.contains(&only) || fault.label().contains(&only) {
            rows.push(run_scenario(scenario, name, source, fault, &mut rng).await);
        }
    }
    let table = table(&rows, seed);
    if let Ok(path) = std::env::var("SPATE_RELIABILITY_TABLE") {
        std::fs::write(Path::new(&path), &table).unwrap();
    }
    assert!(
        rows.iter().all(Outcome::passed),
        "{table}\nrerun with SPATE_CHAOS_SEED={seed}"
    );
}
