//! The chaos table: `spate run` killed with SIGKILL five times at random moments during a
//! 2,000-event burst from RabbitMQ, NATS JetStream, S3 polling, a Redis stream and a Kafka
//! topic, restarted each time.
//! Every event must end with exactly one Job, and nothing may be left unacknowledged.
//!
//! The table is printed when a scenario fails, and written to the file named by
//! `SPATE_RELIABILITY_TABLE` (scripts/test sets it and prints it in the CI log).

mod common;
#[path = "../../sources/tests/support/kafka.rs"]
mod kafka;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    AMQP, KillOnDrop, connect_amqp, delete_queues, ids, messages_left, publish, redis_cli,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use rand::{Rng, SeedableRng};
use spate_sim::{SimCluster, SimConfig};

const EVENTS: usize = 2000;
const KILLS: usize = 5;
const S3: &str = "http://127.0.0.1:9090";
const KAFKA_PARTITIONS: i32 = 4;

/// One row of the table.
struct Outcome {
    scenario: &'static str,
    events: usize,
    jobs: usize,
    lost: usize,
    duplicates: usize,
    unacknowledged: u64,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.jobs == self.events
            && self.lost == 0
            && self.duplicates == 0
            && self.unacknowledged == 0
    }
}

fn table(rows: &[Outcome], seed: u64) -> String {
    let mut out = format!(
        "SIGKILL x{KILLS} at random moments (seed {seed}), restarted each time\n\n\
         | scenario | events in | Jobs created | events lost | duplicates | left unacknowledged | result |\n\
         |---|---:|---:|---:|---:|---:|---|\n"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.events,
            row.jobs,
            row.lost,
            row.duplicates,
            row.unacknowledged,
            if row.passed() { "pass" } else { "FAIL" }
        );
    }
    out
}

fn spawn_spate(
    pipeline: &Path,
    kubeconfig: &Path,
    state: &Path,
    env: &[(&str, &str)],
) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_spate"))
            .args(["run", "--metrics-listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("-f")
            .arg(pipeline)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
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
    Amqp { queue: String },
    JetStream { stream: String, subject: String },
    S3 { bucket: String },
    RedisStream { stream: String },
    Kafka { topic: String },
}

impl Source {
    async fn publish(&self) {
        match self {
            Source::Amqp { queue } => {
                let connection = connect_amqp().await;
                publish(&connection, queue, ids("m", 0, EVENTS)).await;
            }
            Source::JetStream { stream, subject } => {
                let jetstream = jetstream().await;
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
            Source::JetStream { stream, subject } => format!(
                "nats: {{url: \"nats://127.0.0.1:4222\", subject: {subject}, \
                 jetstream: {{stream: {stream}, durable: chaos, ackWait: 30s}}}}"
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
        }
    }

    /// Messages the broker still holds for the pipeline, read while `spate` is stopped.
    /// Polling has no acknowledgement: its promise is the checkpoint, which the duplicate
    /// count checks.
    async fn unacknowledged(&self) -> u64 {
        match self {
            Source::Amqp { queue } => u64::from(messages_left(&connect_amqp().await, queue).await),
            Source::JetStream { stream, .. } => {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream()
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
        }
    }

    async fn clean_up(&self) {
        match self {
            Source::Amqp { queue } => delete_queues(&connect_amqp().await, &[queue]).await,
            Source::JetStream { stream, .. } => {
                let _ = jetstream().await.delete_stream(stream).await;
            }
            Source::RedisStream { stream } => {
                redis_cli(&[format!("DEL {stream}")]);
            }
            // Topics live in the broker's memory; a unique name per run keeps them apart.
            Source::Kafka { .. } | Source::S3 { .. } => {}
        }
    }
}

async fn jetstream() -> async_nats::jetstream::Context {
    let nats = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("NATS on 127.0.0.1:4222 (scripts/services starts it)");
    async_nats::jetstream::new(nats)
}

async fn run_scenario(
    scenario: &'static str,
    name: &str,
    source: Source,
    rng: &mut rand::rngs::StdRng,
) -> Outcome {
    source.publish().await;
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cluster.write_kubeconfig(&kubeconfig).unwrap();
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
spec:
  source:
    {source}
  fanout: {{maxParallelism: 2000, maxJobsPerSecond: 2000, burst: 500}}
  retry: {{maxAttempts: 20, initialBackoff: 50ms, maxBackoff: 1s}}
  ttlSecondsAfterFinished: 3600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#,
            source = source.source_yaml()
        ),
    )
    .unwrap();
    // S3 credentials for the object-store scenario; moto accepts any.
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ];
    let state = dir.path().join("state");
    let jobs: Api<Job> = Api::namespaced(cluster.client(), "default");

    let mut spate = spawn_spate(&pipeline, &kubeconfig, &state, &env);
    for kill in 1..=KILLS {
        // Spread the kills over the burst, each at a random moment within its stretch.
        let target = EVENTS * kill / (KILLS + 2) + rng.random_range(0..EVENTS / (KILLS + 2));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (_, owners) = jobs_per_event(&jobs, name).await;
            if owners.len() >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{scenario}: stuck at {} of {target} events before kill {kill}",
                owners.len()
            );
            tokio::time::sleep(Duration::from_millis(rng.random_range(10..60))).await;
        }
        spate.kill().unwrap();
        spate.wait().unwrap();
        spate = spawn_spate(&pipeline, &kubeconfig, &state, &env);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, owners) = jobs_per_event(&jobs, name).await;
        if owners.len() >= EVENTS || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Long enough for acknowledgements in flight to land and for a poll to find anything
    // the checkpoint forgot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    spate.kill().unwrap();
    spate.wait().unwrap();

    let (job_count, owners) = jobs_per_event(&jobs, name).await;
    let covered: BTreeSet<&String> = owners.keys().collect();
    let outcome = Outcome {
        scenario,
        events: EVENTS,
        jobs: job_count,
        lost: EVENTS.saturating_sub(covered.len()),
        duplicates: owners.values().filter(|count| **count > 1).count(),
        unacknowledged: source.unacknowledged().await,
    };
    source.clean_up().await;
    cluster.shutdown().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_five_times_during_two_thousand_event_bursts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed: u64 = std::env::var("SPATE_CHAOS_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tag = std::process::id();
    let mut rows = vec![
        run_scenario(
            "RabbitMQ queue (perEvent)",
            "chaos-amqp",
            Source::Amqp {
                queue: format!("spate-chaos-{tag}"),
            },
            &mut rng,
        )
        .await,
    ];
    rows.push(
        run_scenario(
            "NATS JetStream durable consumer (perEvent)",
            "chaos-jetstream",
            Source::JetStream {
                stream: format!("SPATE_CHAOS_{tag}"),
                subject: format!("spate.chaos.{tag}"),
            },
            &mut rng,
        )
        .await,
    );
    rows.push(
        run_scenario(
            "S3 polling with a checkpoint (perEvent)",
            "chaos-s3",
            Source::S3 {
                bucket: format!("spate-chaos-{tag}"),
            },
            &mut rng,
        )
        .await,
    );
    rows.push(
        run_scenario(
            "Redis Streams consumer group (perEvent)",
            "chaos-redis",
            Source::RedisStream {
                stream: format!("spate-chaos-{tag}"),
            },
            &mut rng,
        )
        .await,
    );
    rows.push(
        run_scenario(
            "Kafka consumer group, 4 partitions (perEvent)",
            "chaos-kafka",
            Source::Kafka {
                topic: format!("spate-chaos-{tag}"),
            },
            &mut rng,
        )
        .await,
    );
    let table = table(&rows, seed);
    if let Ok(path) = std::env::var("SPATE_RELIABILITY_TABLE") {
        std::fs::write(Path::new(&path), &table).unwrap();
    }
    assert!(
        rows.iter().all(Outcome::passed),
        "{table}\nrerun with SPATE_CHAOS_SEED={seed}"
    );
}
