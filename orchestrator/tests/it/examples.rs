//! The example pipelines (examples/*/pipeline.yaml) end to end: each file is loaded as it is,
//! changed only where it must be to run here (unique queue, subject and bucket names, the
//! local services' addresses, a schedule that fires within seconds), run by the engine
//! against the simulator, and fed real events through the real broker or HTTP. The tests
//! check the Jobs each example promises, and its result and dead-letter sinks.
//!
//! Services: RabbitMQ on 127.0.0.1:5672, NATS with JetStream on 127.0.0.1:4222
//! (`scripts/services`), the moto S3 server on 127.0.0.1:9090 (`scripts/s3-server`, started
//! here when missing).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Timelike;
use common::{
    KillOnDrop, Observer, connect_amqp, delete_queues, free_port, messages_left, start_engine,
};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Event, PodSpec, Secret};
use kube::api::{Api, ListParams, PostParams};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use parking_lot::Mutex;
use serde_json::{Value, json};
use spate_sim::{SimCluster, SimConfig};
use tokio::time::Instant;

const S3: &str = "http://127.0.0.1:9090";

/// The example's pipeline file, as it is in the repository.
fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("pipeline.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces every `from` with `to`, insisting `from` is there: once an example changes, its
/// test must fail rather than quietly run something else.
fn edit(yaml: String, from: &str, to: &str) -> String {
    assert!(
        yaml.contains(from),
        "the example no longer contains `{from}`; update its test:\n{yaml}"
    );
    yaml.replace(from, to)
}

/// A name no other run of these tests uses at the same time.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

fn job_list(client: &kube::Client) -> Api<Job> {
    Api::namespaced(client.clone(), "default")
}

/// One line per Job: its name, its event ids and whether it completed.
fn describe(jobs: &[Job]) -> String {
    jobs.iter()
        .map(|job| {
            format!(
                "  {} events={:?} finished={:?}",
                job.metadata.name.as_deref().unwrap_or("?"),
                common::event_ids(job),
                spate::engine::tracker::finished(job)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the pipeline's Jobs carry exactly the `expected` event ids, each in one Job,
/// and every Job has completed; returns the Jobs. On timeout, panics with what it saw and
/// `context()` (e.g. the engine's log).
async fn complete_jobs(
    client: &kube::Client,
    pipeline: &str,
    expected: &BTreeSet<String>,
    timeout: Duration,
    context: impl Fn() -> String,
) -> Vec<Job> {
    let api = job_list(client);
    let params = ListParams::default().labels(&format!("spate.dev/pipeline={pipeline}"));
    let deadline = Instant::now() + timeout;
    loop {
        let jobs = api.list(&params).await.map(|l| l.items).unwrap_or_default();
        let owners = common::jobs_per_event(&jobs);
        let covered: BTreeSet<String> = owners.keys().cloned().collect();
        let complete = jobs
            .iter()
            .all(|job| spate::engine::tracker::finished(job).is_some_and(|(ok, _)| ok));
        if &covered == expected && complete {
            assert!(
                owners.values().all(|count| *count == 1),
                "an event has several Jobs:\n{}",
                describe(&jobs)
            );
            return jobs;
        }
        assert!(
            Instant::now() < deadline,
            "after {timeout:?}, the Jobs of {pipeline} are not one complete Job per event\n\
             expected events: {expected:?}\nJobs:\n{}\n{}",
            describe(&jobs),
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A deadline for polling: `check` panics with what was seen once it has passed, and
/// otherwise waits a poll interval.
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    async fn check(&self, what: impl FnOnce() -> String) {
        assert!(
            Instant::now() < self.at,
            "after {:?}: {}",
            self.timeout,
            what()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod_spec(job: &Job) -> &PodSpec {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a Job with a pod template")
}

fn container(job: &Job) -> &Container {
    pod_spec(job)
        .containers
        .first()
        .expect("a Job with a container")
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|v| v.name == name)?
        .value
        .as_deref()
}

fn requests(container: &Container) -> BTreeMap<String, String> {
    container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .map(|r| r.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

/// The event a per-event Job hands its pod in `SPATE_EVENT`.
fn job_event(job: &Job) -> Value {
    let raw = env_value(container(job), "SPATE_EVENT").expect("SPATE_EVENT");
    serde_json::from_str(raw).unwrap()
}

/// A `spate run -f` process against the simulator, its output in a log file shown when an
/// assertion fails.
struct SpateRun {
    _process: KillOnDrop,
    log: PathBuf,
}

impl SpateRun {
    fn start(
        dir: &Path,
        cluster: &SimCluster,
        yaml: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> SpateRun {
        let kubeconfig = dir.join("kubeconfig");
        cluster.write_kubeconfig(&kubeconfig).unwrap();
        let pipeline = dir.join("pipeline.yaml");
        std::fs::write(&pipeline, yaml).unwrap();
        let log = dir.join("spate.log");
        let output = std::fs::File::create(&log).unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spate"));
        command
            .arg("run")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("-f")
            .arg(&pipeline)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(output.try_clone().unwrap())
            .stderr(output);
        for (name, value) in env {
            command.env(name, value);
        }
        SpateRun {
            _process: KillOnDrop(command.spawn().expect("start spate run")),
            log,
        }
    }

    /// The last lines spate wrote.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "--- spate run (last 40 lines of {}):\n{tail}",
            self.log.display()
        )
    }
}

/// Waits until the `spate run` whose metrics listen on `port` answers `/readyz` with 200.
async fn wait_ready(port: u16, spate: &SpateRun) {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Deadline::after(Duration::from_secs(15));
    loop {
        if let Ok(response) = http.get(&url).send().await
            && response.status().is_success()
        {
            return;
        }
        deadline
            .check(|| format!("spate run never became ready\n{}", spate.log()))
            .await;
    }
}

// ------------------------------------------------------------------------------------------
// amqp-work-queue

/// Declares a durable queue that the broker deletes after ten unused minutes, so a failed
/// run leaves nothing behind for long.
async fn declare(connection: &Connection, queue: &str) {
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-expires"),
        AMQPValue::LongInt(10 * 60 * 1000),
    );
    channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .unwrap();
}

/// Publishes a persistent JSON message with `id` as its `message-id`, waiting for the confirm.
async fn publish_json(connection: &Connection, queue: &str, id: &str, body: &Value) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_message_id(ShortString::from(id))
                .with_content_type(ShortString::from("application/json"))
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Takes every message ready in `queue`, as JSON.
async fn drain(connection: &Connection, queue: &str) -> Vec<Value> {
    let channel = connection.create_channel().await.unwrap();
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        messages.push(serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null));
    }
    messages
}

/// Four frames become four Jobs rendering `--scene`/`--frame`; their results reach the
/// results queue; a message without `frame` goes to the dead-letter queue, and nothing is
/// left in the work queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqp_work_queue_renders_one_job_per_frame() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let queue = unique("spate-example-frames");
    let (done, dead) = (format!("{queue}.done"), format!("{queue}.dead"));
    let yaml = example("amqp-work-queue");
    let yaml = edit(yaml, "queue: frames\n", &format!("queue: {queue}\n"));
    let yaml = edit(
        yaml,
        "routingKey: frames.done",
        &format!("routingKey: {done}"),
    );
    let yaml = edit(
        yaml,
        "routingKey: frames.dead",
        &format!("routingKey: {dead}"),
    );

    let connection = connect_amqp().await;
    // The sinks publish `mandatory` to the default exchange: their queues must exist.
    for name in [&queue, &done, &dead] {
        declare(&connection, name).await;
    }
    let frames: Vec<(String, u32)> = (1..=4).map(|n| (format!("frame-{n}"), n * 10)).collect();
    for (id, frame) in &frames {
        publish_json(
            &connection,
            &queue,
            id,
            &json!({"scene": "intro", "frame": frame}),
        )
        .await;
    }
    publish_json(&connection, &queue, "no-frame", &json!({"scene": "intro"})).await;

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let observer = Observer::start(&client, "render-frames");
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;

    let expected: BTreeSet<String> = frames.iter().map(|(id, _)| id.clone()).collect();
    let jobs = complete_jobs(
        &client,
        "render-frames",
        &expected,
        Duration::from_secs(20),
        String::new,
    )
    .await;
    for job in &jobs {
        let id = &common::event_ids(job)[0];
        let frame = frames.iter().find(|(f, _)| f == id).unwrap().1;
        let render = container(job);
        assert_eq!(
            render.image.as_deref(),
            Some("ghcr.io/example/frame-renderer:2.1")
        );
        assert_eq!(
            render.args.clone().unwrap_or_default(),
            ["--scene", "intro", "--frame", &frame.to_string()],
            "Job {:?}",
            job.metadata.name
        );
        assert_eq!(
            requests(render),
            BTreeMap::from([("cpu".into(), "1".into()), ("memory".into(), "1Gi".into())])
        );
    }

    // Each finished frame is a result on `<queue>.done`; the frameless message is a dead
    // letter on `<queue>.dead`, with the reason.
    let mut results = Vec::new();
    let deadline = Deadline::after(Duration::from_secs(15));
    loop {
        results.extend(drain(&connection, &done).await);
        if results.len() >= frames.len() {
            break;
        }
        deadline
            .check(|| format!("a result per frame on {done}; so far: {results:#?}"))
            .await;
    }
    let result_ids: BTreeSet<String> = results
        .iter()
        .map(|r| r["event"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(result_ids, expected, "{results:#?}");
    assert!(
        results.iter().all(|r| r["outcome"] == "succeeded"),
        "{results:#?}"
    );
    let deadline = Deadline::after(Duration::from_secs(15));
    let dead_letters = loop {
        let letters = drain(&connection, &dead).await;
        if !letters.is_empty() {
            break letters;
        }
        deadline
            .check(|| format!("no dead letter on {dead} for the message without `frame`"))
            .await;
    };
    assert_eq!(dead_letters.len(), 1, "{dead_letters:#?}");
    let letter = &dead_letters[0];
    assert_eq!(letter["outcome"], "deadLettered", "{letter:#}");
    assert_eq!(letter["event"]["id"], "no-frame", "{letter:#}");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("frame"),
        "the reason names the missing field: {letter:#}"
    );

    engine.shutdown().await;
    observer.finish();
    // Every message was settled: acknowledged once its Job existed, or rejected once
    // dead-lettered.
    assert_eq!(messages_left(&connection, &queue).await, 0);
    delete_queues(&connection, &[&queue, &done, &dead]).await;
    cluster.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// nats-jetstream

/// Deletes a JetStream stream when the test ends, also when it panics.
struct DeleteStreamOnDrop(String);

impl Drop for DeleteStreamOnDrop {
    fn drop(&mut self) {
        let stream = self.0.clone();
        // A runtime of its own: the test's may be shutting down or blocked in this drop.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(nats) = async_nats::connect("nats://127.0.0.1:4222").await {
                    let _ = async_nats::jetstream::new(nats)
                        .delete_stream(&stream)
                        .await;
                }
            });
        })
        .join();
    }
}

/// Sixty uploads on the stream become Indexed Jobs of at most 50 items (`batchSize`), one
/// completion per message, on regular nodes first and the virtual node for the overflow
/// (`placement: burst`); each item is a result on the results subject and every message is
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_jetstream_batches_uploads_into_indexed_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tag = unique("ex").replace('-', "_");
    let stream = format!("SPATE_EXAMPLE_MEDIA_{tag}");
    let prefix = format!("spate.{tag}");
    let yaml = example("nats-jetstream");
    let yaml = edit(yaml, "stream: MEDIA\n", &format!("stream: {stream}\n"));
    // The source, results and dead-letter subjects, all under `media.`.
    let yaml = edit(
        yaml,
        "subject: media.",
        &format!("subject: {prefix}.media."),
    );
    assert_eq!(yaml.matches(&format!("{prefix}.media.")).count(), 3);

    let nats = async_nats::connect("nats://127.0.0.1:4222")
        .await
        .expect("NATS on 127.0.0.1:4222 (scripts/services starts it)");
    let jetstream = async_nats::jetstream::new(nats.clone());
    // One stream for the uploads and the results (`jetstream: true` needs a stream to store
    // them), as `nats stream add MEDIA --subjects 'media.>'` would make it.
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.media.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let _delete_stream = DeleteStreamOnDrop(stream.clone());
    let results = Arc::new(Mutex::new(Vec::<Value>::new()));
    let mut subscriber = nats
        .subscribe(format!("{prefix}.media.transcoded"))
        .await
        .unwrap();
    let received = results.clone();
    let collector = tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            received
                .lock()
                .push(serde_json::from_slice(&message.payload).unwrap_or(Value::Null));
        }
    });
    const UPLOADS: usize = 60;
    for i in 0..UPLOADS {
        jetstream
            .publish(
                format!("{prefix}.media.uploaded.camera-{}", i % 3),
                json!({"file": format!("clip-{i}.mp4")}).to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let cluster = SimCluster::start(SimConfig {
        regular_nodes: 2,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let client = cluster.client();
    let observer = Observer::start(&client, "transcode");
    let state = tempfile::tempdir().unwrap();
    let engine = start_engine(&client, &yaml, state.path()).await;

    let expected: BTreeSet<String> = (1..=UPLOADS)
        .map(|sequence| format!("{stream}:{sequence}"))
        .collect();
    let jobs = complete_jobs(
        &client,
        "transcode",
        &expected,
        Duration::from_secs(25),
        String::new,
    )
    .await;
    assert!(
        jobs.len() >= 2,
        "60 uploads with batchSize 50 make at least two Jobs:\n{}",
        describe(&jobs)
    );
    for job in &jobs {
        let spec = job.spec.as_ref().unwrap();
        let items = common::event_ids(job).len() as i32;
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(spec.completions, Some(items), "{}", describe(&jobs));
        assert!(items <= 50, "a batch above batchSize:\n{}", describe(&jobs));
        let main = container(job);
        assert_eq!(
            main.image.as_deref(),
            Some("ghcr.io/example/transcoder:1.4")
        );
        assert_eq!(
            requests(main),
            BTreeMap::from([("cpu".into(), "2".into()), ("memory".into(), "2Gi".into())])
        );
        assert!(env_value(main, "SPATE_ITEMS_FILE").is_some());
        // Burst placement: the virtual node is tolerated, not required.
        let pod = pod_spec(job);
        assert!(pod.node_selector.is_none(), "{:?}", pod.node_selector);
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.key.as_deref() == Some("virtual-kubelet.io/provider")),
            "{:?}",
            pod.tolerations
        );
    }

    let deadline = Deadline::after(Duration::from_secs(15));
    while results.lock().len() < UPLOADS {
        deadline
            .check(|| {
                format!(
                    "a result per upload on the results subject; {} so far",
                    results.lock().len()
                )
            })
            .await;
    }
    {
        let results = results.lock();
        let ids: BTreeSet<String> = results
            .iter()
            .map(|r| r["event"]["id"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(ids, expected);
        assert!(results.iter().all(|r| r["outcome"] == "succeeded"));
    }

    engine.shutdown().await;
    let census = observer.finish();
    assert!(
        census
            .node_peak
            .keys()
            .any(|node| !node.contains("virtual"))
            && census.node_peak.keys().any(|node| node.contains("virtual")),
        "burst placement fills the regular nodes and overflows to the virtual one: {:?}",
        census.node_peak
    );
    // Every message was acknowledged: the durable consumer has nothing pending.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream
        .get_stream(&stream)
        .await
        .unwrap()
        .get_consumer("spate-transcode")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    collector.abort();
    cluster.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// nightly-batch

async fn s3_server() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-server");
    let status = tokio::process::Command::new(script)
        .arg("start")
        .status()
        .await
        .expect("run scripts/s3-server");
    assert!(status.success(), "scripts/s3-server start failed");
}

/// The keys under `prefix` in `bucket` (moto answers unsigned requests).
async fn s3_keys(http: &reqwest::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let listing = http
        .get(format!("{S3}/{bucket}?list-type=2&prefix={prefix}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    listing
        .split("<Key>")
        .skip(1)
        .filter_map(|rest| rest.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

/// A request as the `test` access key Spate used: moto takes the account from the key and
/// does not check the signature, and what Spate wrote only its account may read.
fn as_spate(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request.header(
        "Authorization",
        "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=0",
    )
}

/// The schedule made to fire once, a few seconds from now (Paris time, as the example's
/// timezone says); every object under `pending/` becomes an item of one Indexed Job running
/// the script, and the results manifest lands in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nightly_batch_lists_the_bucket_into_one_indexed_job() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    s3_server().await;
    let bucket = unique("spate-example-reports");
    let http = reqwest::Client::new();
    let created = http.put(format!("{S3}/{bucket}")).send().await.unwrap();
    assert!(created.status().is_success(), "{created:?}");
    let reports: Vec<String> = (1..=3).map(|n| format!("pending/report-{n}.csv")).collect();
    for key in reports.iter().chain([&"archive/2024.csv".to_string()]) {
        let put = http
            .put(format!("{S3}/{bucket}/{key}"))
            .body(format!("rows of {key}"))
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "{put:?}");
    }

    // The process starts in well under a second; the margin is for a loaded machine.
    let fire_at = (chrono::Utc::now().with_timezone(&chrono_tz::Europe::Paris)
        + chrono::Duration::seconds(6))
    .with_nanosecond(0)
    .unwrap();
    let schedule = fire_at.format("%-S %-M %-H * * *").to_string();
    let yaml = example("nightly-batch");
    let yaml = edit(
        yaml,
        "schedule: \"0 2 * * *\"",
        &format!("schedule: \"{schedule}\""),
    );
    let yaml = edit(
        yaml,
        "url: s3://reports\n",
        &format!("url: s3://{bucket}\n"),
    );
    let yaml = edit(
        yaml,
        "endpoint: http://127.0.0.1:9000",
        &format!("endpoint: {S3}"),
    );
    // The tick emits every object at once; waiting 30 s for more would only slow the test.
    let yaml = edit(yaml, "maxWait: 30s", "maxWait: 1s");

    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_port();
    // listBucket and the manifest sink use the usual AWS credential chain: any keys do for
    // moto.
    let spate = SpateRun::start(
        dir.path(),
        &cluster,
        &yaml,
        &[
            "--metrics-listen".to_string(),
            format!("127.0.0.1:{metrics}"),
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    wait_ready(metrics, &spate).await;
    assert!(
        chrono::Utc::now() < fire_at,
        "spate run was ready only after the tick it was to run ({fire_at}); raise the margin\n{}",
        spate.log()
    );

    let api = job_list(&client);
    let params = ListParams::default().labels("spate.dev/pipeline=nightly-reports");
    let deadline = Deadline::after(Duration::from_secs(20));
    let jobs = loop {
        let jobs = api.list(&params).await.map(|l| l.items).unwrap_or_default();
        if !jobs.is_empty()
            && jobs
                .iter()
                .all(|job| spate::engine::tracker::finished(job).is_some_and(|(ok, _)| ok))
        {
            break jobs;
        }
        deadline
            .check(|| {
                format!(
                    "no complete Job for the tick at {fire_at}:\n{}\n{}",
                    describe(&jobs),
                    spate.log()
                )
            })
            .await;
    };
    assert_eq!(jobs.len(), 1, "one tick, one Job:\n{}", describe(&jobs));
    let job = &jobs[0];
    let ids = common::event_ids(job);
    // Ids are `<namespace>/<pipeline>/<tick>/<key>`: the tick is the Paris time asked for.
    let tick = fire_at
        .with_timezone(&chrono::Utc)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let expected: BTreeSet<String> = reports
        .iter()
        .map(|key| format!("default/nightly-reports/{tick}/{key}"))
        .collect();
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "one item per object under pending/, from the tick at {fire_at}"
    );
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(reports.len() as i32));
    let script = container(job);
    assert_eq!(script.image.as_deref(), Some("busybox:1.36"));
    let command = script.command.clone().unwrap_or_default();
    assert_eq!(command[..2], ["/bin/sh", "-c"], "{command:?}");
    assert!(
        command[2].contains("building report for item $JOB_COMPLETION_INDEX"),
        "{command:?}"
    );
    assert_eq!(env_value(script, "SPATE_BATCH_SIZE"), Some("3"));

    // The results manifest: one JSON line per item, under manifests/.
    let deadline = Deadline::after(Duration::from_secs(15));
    let manifests = loop {
        let keys = s3_keys(&http, &bucket, "manifests/").await;
        if !keys.is_empty() {
            break keys;
        }
        deadline
            .check(|| format!("no results manifest under manifests/\n{}", spate.log()))
            .await;
    };
    assert_eq!(manifests.len(), 1, "{manifests:?}");
    let response = as_spate(http.get(format!("{S3}/{bucket}/{}", manifests[0])))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let manifest = response.text().await.unwrap();
    let records: Vec<Value> = manifest
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), reports.len(), "{manifest}");
    assert!(
        records.iter().all(|r| r["outcome"] == "succeeded"),
        "{manifest}"
    );
    drop(spate);
    for key in s3_keys(&http, &bucket, "").await {
        let _ = as_spate(http.delete(format!("{S3}/{bucket}/{key}")))
            .send()
            .await;
    }
    let _ = as_spate(http.delete(format!("{S3}/{bucket}"))).send().await;
    cluster.shutdown().await;
}

// ------------------------------------------------------------------------------------------
// webhook

/// Hex HMAC-SHA256 of `body`, as `openssl dgst -sha256 -hmac KEY` prints it.
fn hmac_sha256(key: &[u8], body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x36))
        .chain_update(body)
        .finalize();
    let outer = Sha256::new()
        .chain_update(block.map(|b| b ^ 0x5c))
        .chain_update(inner)
        .finalize();
    data_encoding::HEXLOWER.encode(&outer)
}

/// An HTTP receiver for the results sink: it keeps every record POSTed to `/results`.
async fn results_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/results", listener.local_addr().unwrap());
    let store = received.clone();
    let app = axum::Router::new().route(
        "/results",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                store
                    .lock()
                    .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Signed calls become Jobs with `TARGET_URL` from the body and the `team: platform` label;
/// a bad signature gets 401; a call without `url` is dead-lettered as a Kubernetes Event on
/// the pipeline; each finished check is POSTed to the results receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_calls_signed_with_the_secret_become_smoke_test_jobs() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = SimCluster::start(SimConfig::default()).await.unwrap();
    let client = cluster.client();
    // The HMAC secret, as the example expects it: a Secret in the pipeline's namespace.
    let key = unique("hook-key");
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("deploy-checks-webhook".to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "secret".to_string(),
            ByteString(key.clone().into_bytes()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    let (results_url, results) = results_receiver().await;
    let yaml = edit(
        example("webhook"),
        "url: http://127.0.0.1:8089/results",
        &format!("url: {results_url}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spate = SpateRun::start(
        dir.path(),
        &cluster,
        &yaml,
        &[
            "--metrics-listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--webhook-listen".to_string(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
    );

    let url = format!("http://127.0.0.1:{port}/hooks/deploy-checks");
    let http = reqwest::Client::new();
    // Signed as the example asks: the HMAC of "<unix seconds>.<body>".
    let sign = |secret: &[u8], body: &Value| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let signature = hmac_sha256(secret, format!("{now}.{body}").as_bytes());
        (now, signature)
    };
    let call = |id: &str, body: Value, (timestamp, signature): (String, String)| {
        http.post(&url)
            .header("Idempotency-Key", id)
            .header("X-Spate-Timestamp", timestamp)
            .header("X-Spate-Signature", format!("sha256={signature}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let targets: BTreeMap<String, String> = (1..=3)
        .map(|n| {
            (
                format!("deploy-{n}"),
                format!("https://staging-{n}.example.test"),
            )
        })
        .collect();
    for (n, (id, target)) in targets.iter().enumerate() {
        let body = json!({"url": target, "service": "checkout"});
        if n == 0 {
            // The server comes up with the engine: retry the first call until it answers.
            let deadline = Deadline::after(Duration::from_secs(15));
            loop {
                let answer = call(id, body.clone(), sign(key.as_bytes(), &body)).await;
                if answer.as_ref().is_ok_and(|r| r.status() == 202) {
                    break;
                }
                deadline
                    .check(|| format!("the webhook server answered {answer:?}\n{}", spate.log()))
                    .await;
            }
        } else {
            let signed = sign(key.as_bytes(), &body);
            let status = call(id, body.clone(), signed.clone())
                .await
                .unwrap()
                .status();
            assert_eq!(status, 202, "{}", spate.log());
            // The same signed call again, captured and replayed: refused.
            let replay = call(id, body, signed).await.unwrap().status();
            assert_eq!(replay, 409, "{}", spate.log());
        }
    }
    let forged = json!({"url": "https://evil.example.test"});
    let wrong = sign(b"not-the-secret", &forged);
    assert_eq!(call("forged", forged, wrong).await.unwrap().status(), 401);
    let no_url = json!({"service": "checkout"});
    let signed = sign(key.as_bytes(), &no_url);
    // It cannot become a Job: the caller learns why, and it is dead-lettered.
    let refused = call("no-url", no_url, signed).await.unwrap();
    assert_eq!(refused.status(), 422, "{}", spate.log());
    let answer: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(answer["deadLettered"], true, "{answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains("url")),
        "{answer}"
    );

    let expected: BTreeSet<String> = targets.keys().cloned().collect();
    let jobs = complete_jobs(
        &client,
        "deploy-checks",
        &expected,
        Duration::from_secs(20),
        || spate.log(),
    )
    .await;
    for job in &jobs {
        let id = &common::event_ids(job)[0];
        let check = container(job);
        assert_eq!(
            check.image.as_deref(),
            Some("ghcr.io/example/smoke-tests:3")
        );
        assert_eq!(
            env_value(check, "TARGET_URL"),
            Some(targets[id].as_str()),
            "Job {:?}",
            job.metadata.name
        );
        assert_eq!(
            check.command.clone().unwrap_or_default(),
            ["/bin/sh", "-c", r#"run-smoke-tests --target "$TARGET_URL""#]
        );
        let labels = job.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("team").map(String::as_str),
            Some("platform"),
            "{labels:?}"
        );
        assert_eq!(
            job.spec.as_ref().unwrap().active_deadline_seconds,
            Some(600)
        );
        assert_eq!(job_event(job)["data"]["url"], targets[id].as_str());
    }

    // Each finished check is POSTed to the results receiver.
    let deadline = Deadline::after(Duration::from_secs(15));
    while results.lock().len() < targets.len() {
        deadline
            .check(|| {
                format!(
                    "a result per check at the receiver; received: {:#?}\n{}",
                    results.lock(),
                    spate.log()
                )
            })
            .await;
    }
    {
        let results = results.lock();
        let ids: BTreeSet<String> = results
            .iter()
            .map(|r| r["event"]["id"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(ids, expected, "{results:#?}");
        assert!(
            results.iter().all(|r| r["outcome"] == "succeeded"),
            "{results:#?}"
        );
    }

    // The call without `url` is a DeadLettered Event on the pipeline.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = Deadline::after(Duration::from_secs(15));
    let dead = loop {
        let list = events
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let found = list.iter().find(|event| {
            event.reason.as_deref() == Some("DeadLettered")
                && event.involved_object.name.as_deref() == Some("deploy-checks")
        });
        if let Some(event) = found {
            break event.clone();
        }
        deadline
            .check(|| {
                let seen: Vec<_> = list
                    .iter()
                    .map(|e| (e.reason.clone(), e.message.clone()))
                    .collect();
                format!(
                    "no DeadLettered Event for the call without `url`; Events: {seen:?}\n{}",
                    spate.log()
                )
            })
            .await;
    };
    let message = dead.message.unwrap_or_default();
    assert!(message.contains("no-url"), "{message}");
    drop(spate);
    cluster.shutdown().await;
}

/// `spate run` serves webhooks on 127.0.0.1:8088 unless told otherwise: an example whose
/// results or dead letters are POSTed there would send them to Spate itself (404, lost).
#[test]
fn no_example_posts_its_results_to_spates_own_webhook_server() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_spate"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let listen = help
        .split("--webhook-listen")
        .nth(1)
        .and_then(|rest| rest.split("[default: ").nth(1))
        .and_then(|rest| rest.split(']').next())
        .unwrap_or_else(|| panic!("no --webhook-listen default in `spate run --help`:\n{help}"));
    for name in [
        "amqp-work-queue",
        "nats-jetstream",
        "nightly-batch",
        "thumbnails",
        "webhook",
    ] {
        let loaded = spate::pipeline::load_str(&example(name), name).unwrap();
        for pipeline in loaded {
            let sinks = &pipeline.pipeline.spec.sinks;
            for sink in sinks.results.iter().chain(&sinks.dead_letter) {
                if let spate_sinks::SinkConfig::Webhook(webhook) = sink {
                    assert!(
                        !webhook.url.contains(&format!("//{listen}/")),
                        "examples/{name}: {} is Spate's own webhook server (--webhook-listen \
                         defaults to {listen})",
                        webhook.url
                    );
                }
            }
        }
    }
}
