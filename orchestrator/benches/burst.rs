//! The burst benchmark: messages of a source (RabbitMQ, Redis Streams, Kafka or MQTT) become
//! Jobs on the simulator, with 5 ms of added latency on every API request.
//!
//! For each source, 1,000 and 10,000 events, per-event (and indexed for RabbitMQ), it prints:
//! the time until every Job exists (from `spate run` starting; for MQTT from the first
//! publish), event-to-Job latency p50/p99 (read from Spate's own `spate_event_to_job_seconds`
//! histogram, interpolated within its 25%-wide buckets), API writes per event made by Spate
//! alone (the simulator counts requests per identity, and Spate runs with its own token), and
//! the orchestrator's peak RSS (it runs as a separate process, `spate run`, so the simulator's
//! memory is not counted).
//!
//! Run: `cargo bench -p spate --bench burst`. `SPATE_BENCH_SIZES=1000` limits the sizes;
//! `SPATE_BENCH_SOURCES=amqp,redis,kafka,mqtt` picks the sources (default `amqp`). Each needs
//! its broker on 127.0.0.1: RabbitMQ (5672), Redis (6379) and Mosquitto (1883) from
//! `scripts/services`, Kafka (tansu, 9092) from `scripts/kafka start`.
//!
//! Events are published before `spate run` starts, except for MQTT: QoS 1 messages published
//! before the subscriber's persistent session exists are lost, so the benchmark starts Spate,
//! waits for its `consuming mqtt topic` log line (written once the broker acknowledged the
//! subscription), and then publishes.

mod support;

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use spate_sim::{Faults, SimCluster, SimConfig};
use support::{free_port, metric_sum, scrape};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";
const KAFKA: &str = "127.0.0.1:9092";
const KAFKA_PARTITIONS: i32 = 4;
const MQTT_HOST: &str = "127.0.0.1";
const MQTT_PORT: u16 = 1883;
/// Mosquitto's default `max_queued_messages`: QoS 1 messages queued for one client beyond
/// those in flight. More are dropped, so the MQTT publisher keeps fewer than this unread.
const MQTT_QUEUE: usize = 1000;
const BATCH: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Amqp,
    Redis,
    Kafka,
    Mqtt,
}

impl Source {
    fn parse(name: &str) -> anyhow::Result<Source> {
        Ok(match name {
            "amqp" => Source::Amqp,
            "redis" => Source::Redis,
            "kafka" => Source::Kafka,
            "mqtt" => Source::Mqtt,
            other => anyhow::bail!(
                "SPATE_BENCH_SOURCES: unknown source {other:?} (amqp, redis, kafka, mqtt)"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Source::Amqp => "amqp",
            Source::Redis => "redis",
            Source::Kafka => "kafka",
            Source::Mqtt => "mqtt",
        }
    }

    /// Indexed mode batches events after the source, the same way for every source, so it
    /// is measured with RabbitMQ alone.
    fn modes(self) -> &'static [&'static str] {
        match self {
            Source::Amqp => &["perEvent", "indexed"],
            _ => &["perEvent"],
        }
    }
}

struct Row {
    source: Source,
    events: usize,
    mode: &'static str,
    jobs: usize,
    all_jobs: Duration,
    p50: f64,
    p99: f64,
    writes_per_event: f64,
    peak_rss_mib: f64,
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sizes: Vec<usize> = std::env::var("SPATE_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 10_000]);
    let sources: Vec<Source> = match std::env::var("SPATE_BENCH_SOURCES") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(Source::parse)
            .collect::<anyhow::Result<_>>()?,
        Err(_) => vec![Source::Amqp],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for &source in &sources {
        for &events in &sizes {
            for &mode in source.modes() {
                eprintln!("bench: {}, {events} events, {mode}...", source.name());
                rows.push(runtime.block_on(run(source, events, mode))?);
            }
        }
    }
    println!();
    println!(
        "| source | events | mode | Jobs | every Job exists | event→Job p50 | event→Job p99 | API writes/event | peak RSS |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} s | {:.1} ms | {:.1} ms | {:.3} | {:.1} MiB |",
            row.source.name(),
            row.events,
            row.mode,
            row.jobs,
            row.all_jobs.as_secs_f64(),
            row.p50 * 1000.0,
            row.p99 * 1000.0,
            row.writes_per_event,
            row.peak_rss_mib
        );
    }
    Ok(())
}

/// What a source's run leaves to clean up once the burst is measured.
enum Published {
    Amqp(Connection),
    Redis(redis::aio::MultiplexedConnection),
    Kafka,
    Mqtt(tokio::task::JoinHandle<anyhow::Result<()>>),
}

async fn run(source: Source, events: usize, mode: &'static str) -> anyhow::Result<Row> {
    let mut config = SimConfig {
        faults: Faults {
            latency_ms: 5,
            ..Faults::default()
        },
        ..SimConfig::default()
    };
    config.node.run_time = Duration::from_millis(200);
    let cluster = SimCluster::start(config).await?;
    let token = cluster.api_server().add_token("spate");
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    let mut as_spate = cluster.api_server().kubeconfig_json();
    if let Some(users) = as_spate["users"].as_array_mut() {
        for user in users {
            user["user"] = serde_json::json!({"token": token});
        }
    }
    std::fs::write(&kubeconfig, serde_json::to_string(&as_spate)?)?;

    let name = format!(
        "spate-bench-{}-{events}-{mode}-{}",
        source.name(),
        std::process::id()
    );
    let mqtt_topic = format!("spate/bench/{name}");
    let (source_yaml, mut published) = match source {
        Source::Amqp => (
            format!("amqp: {{url: \"{AMQP}\", queue: {name}, prefetch: 500}}"),
            Some(Published::Amqp(publish_amqp(&name, events).await?)),
        ),
        Source::Redis => (
            format!("redisStreams: {{url: \"{REDIS}\", stream: {name}, group: bench, batch: 500}}"),
            Some(Published::Redis(publish_redis(&name, events).await?)),
        ),
        Source::Kafka => {
            publish_kafka(&name, events).await?;
            (
                format!(
                    "kafka: {{brokers: [\"{KAFKA}\"], topic: {name}, group: {name}, commitInterval: 200ms}}"
                ),
                Some(Published::Kafka),
            )
        }
        // Published once Spate has subscribed, below.
        Source::Mqtt => (
            format!(
                "mqtt: {{url: \"mqtt://{MQTT_HOST}:{MQTT_PORT}\", topic: \"{mqtt_topic}\", clientId: {name}, qos: 1}}"
            ),
            None,
        ),
    };
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: bench
spec:
  source:
    {source_yaml}
  fanout: {{mode: {mode}, batchSize: {BATCH}, maxWait: 1s, maxParallelism: {events}, maxJobsPerSecond: 100000, burst: 10000}}
  ttlSecondsAfterFinished: 600
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )?;
    let metrics_port = free_port();
    let mut started = Instant::now();
    let mut spate = Command::new(env!("CARGO_BIN_EXE_spate"))
        .args([
            "run",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("-f")
        .arg(&pipeline)
        // Spate's own progress lines (the default filter) tell when MQTT has subscribed.
        .env(
            "RUST_LOG",
            "warn,spate=info,spate_sources=info,kube_client=off",
        )
        .env("SPATE_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let log = Log::follow(&mut spate);
    if source == Source::Mqtt {
        let deadline = Instant::now() + TIMEOUT;
        while !log.subscribed.load(Ordering::SeqCst) {
            if let Some(status) = spate.try_wait()? {
                anyhow::bail!("spate run exited ({status}):\n{}", log.tail());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "spate did not subscribe to {mqtt_topic} in {TIMEOUT:?}:\n{}",
                log.tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started = Instant::now();
        published = Some(Published::Mqtt(tokio::spawn(publish_mqtt(
            mqtt_topic.clone(),
            name.clone(),
            events,
            metrics_port,
        ))));
    }
    let jobs = match mode {
        "indexed" => events.div_ceil(BATCH),
        _ => events,
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let text = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(text) = scrape(metrics_port).await
            && metric_sum(&text, "spate_jobs_created_total") as usize >= jobs
            && histogram_count(&text) as usize >= events
        {
            break text;
        }
        // A publisher that failed ends the run; one that finished is done with.
        if matches!(&published, Some(Published::Mqtt(publisher)) if publisher.is_finished())
            && let Some(Published::Mqtt(publisher)) = published.take()
        {
            publisher.await??;
        }
        if let Some(status) = spate.try_wait()? {
            anyhow::bail!("spate run exited ({status}):\n{}", log.tail());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the burst did not finish in 10 minutes:\n{}",
            log.tail()
        );
    };
    let all_jobs = started.elapsed();
    let peak_rss_mib = peak_rss_kib(spate.id()).unwrap_or(0) as f64 / 1024.0;
    let _ = spate.kill();
    let _ = spate.wait();
    let writes: u64 = cluster
        .requests()
        .0
        .iter()
        .filter(|row| row.key.user == "spate")
        .filter(|row| {
            ["create", "update", "patch", "delete", "deletecollection"]
                .contains(&row.key.verb.as_str())
        })
        .map(|row| row.count)
        .sum();
    match published {
        Some(Published::Amqp(connection)) => {
            let channel = connection.create_channel().await?;
            let _ = channel
                .queue_delete(
                    ShortString::from(name.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        Some(Published::Redis(mut connection)) => {
            let _ = redis::cmd("DEL")
                .arg(&name)
                .query_async::<()>(&mut connection)
                .await;
        }
        Some(Published::Kafka) => {
            let admin: AdminClient<DefaultClientContext> = kafka_config().create()?;
            let _ = admin
                .delete_topics(&[name.as_str()], &AdminOptions::new())
                .await;
        }
        Some(Published::Mqtt(publisher)) => publisher.await??,
        None => {}
    }
    if source == Source::Mqtt {
        // Spate's session (clean session off) would stay at the broker: end it.
        let _ = end_mqtt_session(&name).await;
    }
    cluster.shutdown().await;
    Ok(Row {
        source,
        events,
        mode,
        jobs,
        all_jobs,
        p50: quantile(&text, 0.50),
        p99: quantile(&text, 0.99),
        writes_per_event: writes as f64 / events as f64,
        peak_rss_mib,
    })
}

/// Follows `spate run`'s stderr: notes the MQTT subscription and keeps the last lines for
/// error messages.
struct Log {
    subscribed: Arc<AtomicBool>,
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl Log {
    fn follow(child: &mut Child) -> Log {
        let log = Log {
            subscribed: Arc::new(AtomicBool::new(false)),
            lines: Arc::new(Mutex::new(VecDeque::new())),
        };
        if let Some(stderr) = child.stderr.take() {
            let subscribed = log.subscribed.clone();
            let lines = log.lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("consuming mqtt topic") {
                        subscribed.store(true, Ordering::SeqCst);
                    }
                    let mut lines = lines.lock().unwrap_or_else(|e| e.into_inner());
                    if lines.len() == 20 {
                        lines.pop_front();
                    }
                    lines.push_back(line);
                }
            });
        }
        log
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

async fn publish_amqp(queue: &str, count: usize) -> anyhow::Result<Connection> {
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(ShortString::from(queue), durable, FieldTable::default())
        .await?;
    let mut confirms = Vec::with_capacity(count);
    for i in 0..count {
        confirms.push(
            channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions::default(),
                    format!("{{\"n\":{i}}}").as_bytes(),
                    BasicProperties::default()
                        .with_message_id(ShortString::from(format!("b-{i}")))
                        .with_delivery_mode(2),
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.await?;
    }
    Ok(connection)
}

/// `XADD`s `count` entries `data={"n":i}`, pipelined 500 at a time.
async fn publish_redis(
    stream: &str,
    count: usize,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(REDIS)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let _ = redis::cmd("DEL")
        .arg(stream)
        .query_async::<()>(&mut connection)
        .await;
    let mut from = 0;
    while from < count {
        let to = (from + 500).min(count);
        let mut pipe = redis::pipe();
        for i in from..to {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("data")
                .arg(format!("{{\"n\":{i}}}"))
                .ignore();
        }
        pipe.query_async::<()>(&mut connection).await?;
        from = to;
    }
    Ok(connection)
}

fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", KAFKA);
    config
}

/// Creates `topic` with 4 partitions and produces `count` records `{"n":i}`, keyed so they
/// spread over the partitions. One record per batch (`linger.ms=0`, `batch.num.messages=1`):
/// tansu 0.6 answers a fetch that starts inside a stored batch with nothing, forever
/// (`sources/tests/support/kafka.rs` does the same).
async fn publish_kafka(topic: &str, count: usize) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka_config().create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                KAFKA_PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await?;
    for result in created {
        if let Err((name, code)) = result {
            anyhow::bail!("creating kafka topic {name}: {code}");
        }
    }
    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()?;
    let sends = (0..count).map(|i| {
        let producer = &producer;
        async move {
            let key = format!("key-{i}");
            let payload = format!("{{\"n\":{i}}}");
            producer
                .send(FutureRecord::to(topic).key(&key).payload(&payload), TIMEOUT)
                .await
                .map_err(|(err, _)| err)
        }
    });
    for sent in futures::future::join_all(sends).await {
        sent?;
    }
    producer.flush(TIMEOUT)?;
    Ok(())
}

/// Publishes `count` messages `{"id":"bench-<i>"}` at QoS 1 and waits for their PUBACKs.
/// At 1,000 events it never waits for Spate; beyond, it keeps fewer than Mosquitto's queue
/// limit published and not yet received by Spate, so the broker drops none.
async fn publish_mqtt(
    topic: String,
    name: String,
    count: usize,
    metrics_port: u16,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(format!("{name}-pub"), MQTT_HOST, MQTT_PORT);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        while acked < count {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await? {
                acked += 1;
            }
        }
        anyhow::Ok(eventloop)
    });
    let chunk = MQTT_QUEUE / 2;
    for from in (0..count).step_by(chunk) {
        let to = (from + chunk).min(count);
        if to > MQTT_QUEUE {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let received = scrape(metrics_port)
                    .await
                    .map(|text| metric_sum(&text, "spate_events_received_total") as usize)
                    .unwrap_or(0);
                if to <= received + MQTT_QUEUE {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "spate stopped receiving");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for i in from..to {
            client
                .publish(
                    topic.as_str(),
                    QoS::AtLeastOnce,
                    false,
                    format!("{{\"id\":\"bench-{i}\"}}"),
                )
                .await?;
        }
    }
    // Disconnecting earlier would drop PUBACKs still on their way.
    let mut eventloop = acks.await??;
    client.disconnect().await?;
    while !matches!(
        eventloop.poll().await,
        Err(_) | Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
    ) {}
    Ok(())
}

/// Connects as Spate's client id with a clean session, which ends the session Spate left.
async fn end_mqtt_session(client_id: &str) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let mut options = MqttOptions::new(client_id, MQTT_HOST, MQTT_PORT);
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                client.disconnect().await?;
                let _ = eventloop.poll().await;
                return anyhow::Ok(());
            }
        }
    })
    .await?
}

fn histogram_count(text: &str) -> f64 {
    metric_sum(text, "spate_event_to_job_seconds_count")
}

/// `histogram_quantile`, as Prometheus computes it: linear within the bucket.
fn quantile(text: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with("spate_event_to_job_seconds_bucket{"))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, line.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(bound, count) in &buckets {
        if count >= rank {
            if bound.is_infinite() {
                return previous.0;
            }
            let within = if count > previous.1 {
                (rank - previous.1) / (count - previous.1)
            } else {
                0.0
            };
            return previous.0 + (bound - previous.0) * within;
        }
        previous = (bound, count);
    }
    f64::NAN
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
