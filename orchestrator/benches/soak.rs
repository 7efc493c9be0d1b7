//! The soak benchmark: 200,000 RabbitMQ messages become Jobs on the simulator, one Job per
//! event, and the Jobs are deleted a second after they finish, so what a long run leaves
//! behind in `spate run`'s memory shows.
//!
//! Settings: `perEvent`, `maxParallelism: 200`, `maxJobsPerSecond: 100000`, `burst: 1000`,
//! AMQP `prefetch: 500`, `ttlSecondsAfterFinished: 1`, pods that run 0.1 s (the pod-template
//! annotation `sim.spate.dev/run-seconds`, after the simulated node's 0.1 s start latency), no
//! added API latency. The budget and rate are high enough that Spate and the API are what is
//! measured.
//!
//! Publishing runs in a background task while `spate run` consumes: it keeps at most
//! 10,000 messages published and not yet received by Spate (read from Spate's
//! `spate_events_received_total`), so RabbitMQ never holds a 200,000-message persistent queue.
//! Messages are persistent and published with confirms, 1,000 at a time. Tests that share the
//! broker may close every connection on it; the publisher then connects again and publishes
//! the unconfirmed chunk again (same message ids), and Spate reconnects by itself.
//!
//! At 5%, 25%, 50% and 100% of the events received by Spate (10k, 50k, 100k and 200k by
//! default) it prints a row: events received, items finished, Jobs existing in the simulator
//! (label `spate.dev/pipeline=soak`), the engine's event index (`spate_event_index_events`),
//! Spate's current RSS (`VmRSS`, and its anonymous part `RssAnon`) and peak RSS so far (the
//! larger of `VmHWM` and every `VmRSS` read), and the events received per second since the
//! previous row. Events received count redeliveries too (after a lost connection). A final
//! row follows once the queue is empty, every Job has finished
//! (`spate_items_finished_total` ≥ events) and the TTL has deleted every Job. Spate runs as
//! its own process, so the simulator's memory is not counted (progress lines on stderr show
//! it, with both processes' CPU time). The benchmark asserts nothing about timings; it exits
//! non-zero if neither events received nor items finished change for 60 s.
//!
//! Run: `cargo bench -p spate --bench soak`; `SPATE_SOAK_EVENTS=20000` for a shorter run.
//! It needs RabbitMQ on 127.0.0.1:5672 (guest/guest, `scripts/services`).

mod support;

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use spate_sim::{SimCluster, SimConfig};
use support::{free_port, metric_sum, scrape};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PIPELINE: &str = "soak";
const NAMESPACE: &str = "default";
const DEFAULT_EVENTS: usize = 200_000;
/// Percentages of the events at which a row is printed.
const CHECKPOINTS: [usize; 4] = [5, 25, 50, 100];
/// Messages published and not yet received by Spate, at most.
const AHEAD: usize = 10_000;
/// Messages published between waits for their confirms.
const CHUNK: usize = 1_000;
const STALL: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

struct Row {
    /// Events received, and what the row is.
    label: String,
    finished: usize,
    jobs: usize,
    index: Option<i64>,
    rss_kib: u64,
    anon_kib: u64,
    peak_kib: u64,
    elapsed: Duration,
    /// Events received per second since the previous row.
    rate: Option<f64>,
}

/// `spate run`, killed when dropped (an error return included).
struct Spate(Child);

impl Drop for Spate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let events: usize = match std::env::var("SPATE_SOAK_EVENTS") {
        Ok(n) => n
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("SPATE_SOAK_EVENTS: not a count: {n:?}"))?,
        Err(_) => DEFAULT_EVENTS,
    };
    anyhow::ensure!(events >= 20, "SPATE_SOAK_EVENTS: at least 20 events");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let queue = format!("spate-soak-{events}-{}", std::process::id());
    let rows = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        // A signal drops the run, and with it `spate run` (killed) and the simulator.
        let result = tokio::select! {
            rows = run(events, &queue) => rows,
            _ = terminate.recv() => Err(anyhow::anyhow!("soak: stopped by SIGTERM")),
            _ = interrupt.recv() => Err(anyhow::anyhow!("soak: stopped by SIGINT")),
        };
        delete_queue(&queue).await;
        result
    })?;
    println!();
    println!(
        "| events received | items finished | Jobs in the simulator | event index | RSS | of which anonymous | peak RSS | elapsed | events/s since previous row |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        println!("{}", markdown(row));
    }
    Ok(())
}

fn markdown(row: &Row) -> String {
    format!(
        "| {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s | {} |",
        row.label,
        row.finished,
        row.jobs,
        row.index
            .map_or_else(|| "n/a".to_string(), |n| n.to_string()),
        row.rss_kib as f64 / 1024.0,
        row.anon_kib as f64 / 1024.0,
        row.peak_kib as f64 / 1024.0,
        row.elapsed.as_secs_f64(),
        row.rate
            .map_or_else(|| "—".to_string(), |r| format!("{r:.0}")),
    )
}

async fn run(events: usize, queue: &str) -> anyhow::Result<Vec<Row>> {
    let mut config = SimConfig::default();
    // The annotation sets each pod's run time; this is the node's default for any other.
    config.node.run_time = Duration::from_millis(100);
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

    {
        let (connection, setup) = amqp_channel(false).await?;
        let _ = setup
            .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
            .await;
        setup
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = connection.close(200, "declared".into()).await;
    }

    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            r#"apiVersion: spate.dev/v1alpha1
kind: Pipeline
metadata:
  name: {PIPELINE}
  namespace: {NAMESPACE}
spec:
  source:
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 500}}
  fanout: {{mode: perEvent, maxParallelism: 200, maxJobsPerSecond: 100000, burst: 1000}}
  ttlSecondsAfterFinished: 1
  jobTemplate:
    spec:
      template:
        metadata:
          annotations:
            sim.spate.dev/run-seconds: "0.1"
        spec:
          containers: [{{name: work, image: busybox}}]
"#
        ),
    )?;
    let metrics_port = free_port();
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_spate"))
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
        .env("RUST_LOG", "warn,kube_client=off")
        .env("SPATE_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut spate = Spate(child);
    let log = Log::follow(&mut spate.0);
    let pid = spate.0.id();

    let received = Arc::new(AtomicUsize::new(0));
    let republished = Arc::new(AtomicUsize::new(0));
    let mut publisher = Some(tokio::spawn(publish(
        queue.to_string(),
        events,
        received.clone(),
        republished.clone(),
    )));

    let jobs_api: Api<Job> = Api::namespaced(cluster.client(), NAMESPACE);
    let selector = ListParams::default().labels(&format!("spate.dev/pipeline={PIPELINE}"));

    let mut checkpoints: VecDeque<usize> = CHECKPOINTS
        .iter()
        .map(|percent| events * percent / 100)
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    let mut previous = (0usize, started);
    let mut last_change = ((0usize, 0usize), Instant::now());
    let mut last_progress = Instant::now();
    let mut max_jobs = 0usize;
    let mut max_index = 0i64;
    let mut peak_kib = 0u64;
    // Consecutive polls that found the run drained.
    let mut drained_polls = 0;
    loop {
        tokio::time::sleep(POLL).await;
        if let Some(status) = spate.0.try_wait()? {
            anyhow::bail!("spate run exited ({status}):\n{}", log.tail());
        }
        if publisher.as_ref().is_some_and(|task| task.is_finished())
            && let Some(task) = publisher.take()
        {
            task.await??;
            eprintln!(
                "soak: all {events} events published after {:.1} s ({} published again after a lost connection)",
                started.elapsed().as_secs_f64(),
                republished.load(Ordering::SeqCst),
            );
        }
        // Not listening yet while it starts.
        let Ok(text) = scrape(metrics_port).await else {
            anyhow::ensure!(
                last_change.1.elapsed() < STALL,
                "spate's /metrics did not answer for {STALL:?}:\n{}",
                log.tail()
            );
            continue;
        };
        let now_received = metric_sum(&text, "spate_events_received_total") as usize;
        let now_finished = metric_sum(&text, "spate_items_finished_total") as usize;
        received.store(now_received, Ordering::SeqCst);
        let index = index_size(&text);
        max_index = max_index.max(index.unwrap_or(0));
        if (now_received, now_finished) != last_change.0 {
            last_change = ((now_received, now_finished), Instant::now());
        }

        let due = checkpoints.front().is_some_and(|&at| now_received >= at);
        let finishing = checkpoints.is_empty() && publisher.is_none() && now_finished >= events;
        if due || finishing || last_progress.elapsed() >= PROGRESS_EVERY {
            let jobs = count_jobs(&jobs_api, &selector).await?;
            max_jobs = max_jobs.max(jobs);
            let memory = memory_kib(pid).unwrap_or_default();
            peak_kib = peak_kib.max(memory.hwm).max(memory.rss);
            let now = Instant::now();
            let row = |label: String, rate: Option<f64>| Row {
                label,
                finished: now_finished,
                jobs,
                index,
                rss_kib: memory.rss,
                anon_kib: memory.anon,
                peak_kib,
                elapsed: now - started,
                rate,
            };
            // Every Job deleted and nothing left in the queue, twice in a row: redeliveries
            // after a lost connection count as events received and items finished again, so
            // the counters alone could reach `events` early.
            drained_polls = if finishing && jobs == 0 && queue_ready(queue).await == Some(0) {
                drained_polls + 1
            } else {
                0
            };
            if due {
                while checkpoints.front().is_some_and(|&at| now_received >= at) {
                    checkpoints.pop_front();
                }
                let seconds = (now - previous.1).as_secs_f64();
                let rate = (now_received - previous.0) as f64 / seconds.max(1e-9);
                previous = (now_received, now);
                let row = row(now_received.to_string(), Some(rate));
                eprintln!("soak: row {}", markdown(&row));
                rows.push(row);
            } else if drained_polls >= 2 {
                let row = row(format!("{now_received} (all finished, Jobs deleted)"), None);
                eprintln!("soak: row {}", markdown(&row));
                rows.push(row);
                break;
            } else if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = now;
                eprintln!(
                    "soak: {:.0} s: received {now_received}, finished {now_finished}, Jobs {jobs}, index {}, RSS {:.1} MiB (anonymous {:.1} MiB, peak {:.1} MiB); {}; load {}",
                    started.elapsed().as_secs_f64(),
                    index.map_or_else(|| "n/a".to_string(), |n| n.to_string()),
                    memory.rss as f64 / 1024.0,
                    memory.anon as f64 / 1024.0,
                    peak_kib as f64 / 1024.0,
                    cpu_note(pid),
                    loadavg(),
                );
            }
        }
        if last_change.1.elapsed() >= STALL {
            let jobs = count_jobs(&jobs_api, &selector)
                .await
                .map_or_else(|e| e.to_string(), |n| n.to_string());
            anyhow::bail!(
                "soak stalled: neither events received ({now_received}) nor items finished \
                 ({now_finished}) changed for {STALL:?}, of {events} events; {jobs} Jobs exist, \
                 the event index holds {}, the queue holds {:?} ready messages; spate's last \
                 log lines:\n{}",
                index.map_or_else(|| "n/a".to_string(), |n| n.to_string()),
                queue_ready(queue).await,
                log.tail()
            );
        }
    }
    eprintln!(
        "soak: done in {:.1} s; at most {max_jobs} Jobs seen at once (sampled), event index at most {max_index} (sampled); {} events published again after a lost connection; {}; load {}; spate logged {} lines, the last:\n{}",
        started.elapsed().as_secs_f64(),
        republished.load(Ordering::SeqCst),
        cpu_note(pid),
        loadavg(),
        log.count(),
        log.tail(),
    );
    drop(spate);
    cluster.shutdown().await;
    Ok(rows)
}

/// Deletes the benchmark's queue, whatever the run's outcome; best effort.
async fn delete_queue(queue: &str) {
    if let Ok((connection, channel)) = amqp_channel(false).await {
        let _ = channel
            .queue_delete(ShortString::from(queue), QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
    }
}

async fn count_jobs(api: &Api<Job>, selector: &ListParams) -> anyhow::Result<usize> {
    Ok(api.list(selector).await?.items.len())
}

/// A new connection and channel to RabbitMQ; with publisher confirms if `confirm`.
async fn amqp_channel(confirm: bool) -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect(AMQP, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    if confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    Ok((connection, channel))
}

/// Messages ready in `queue` (not those delivered and unacknowledged); `None` if RabbitMQ
/// does not answer.
async fn queue_ready(queue: &str) -> Option<u32> {
    let (connection, channel) = amqp_channel(false).await.ok()?;
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = connection.close(200, "counted".into()).await;
    Some(declared.message_count())
}

/// Publishes `{"n":i}` with message id `s-<i>`, persistent, with confirms, `CHUNK` at a
/// time, keeping at most `AHEAD` published and not yet received by Spate.
///
/// Other tests on the machine share the broker, and some close every connection on it
/// (`connection_forced`): then it connects again and publishes the unconfirmed chunk again
/// (same message ids), counting those messages in `republished`. It gives up after
/// `STALL` without a confirmed chunk.
async fn publish(
    queue: String,
    count: usize,
    received: Arc<AtomicUsize>,
    republished: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut amqp: Option<(Connection, Channel)> = None;
    let mut confirmed_at = Instant::now();
    let mut from = 0;
    while from < count {
        while from >= received.load(Ordering::SeqCst) + AHEAD {
            tokio::time::sleep(Duration::from_millis(20)).await;
            confirmed_at = Instant::now();
        }
        let to = (from + CHUNK).min(count);
        let attempt = async {
            if amqp.is_none() {
                amqp = Some(amqp_channel(true).await?);
            }
            let Some((_, channel)) = &amqp else {
                unreachable!("connected above")
            };
            publish_chunk(channel, &queue, from, to).await
        };
        match attempt.await {
            Ok(()) => {
                from = to;
                confirmed_at = Instant::now();
            }
            Err(error) => {
                anyhow::ensure!(
                    confirmed_at.elapsed() < STALL,
                    "publishing to RabbitMQ failed for {STALL:?}: {error:#}"
                );
                eprintln!("soak: publishing messages {from}..{to} failed ({error:#}); again");
                republished.fetch_add(to - from, Ordering::SeqCst);
                amqp = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if let Some((connection, _)) = amqp {
        let _ = connection.close(200, "published".into()).await;
    }
    Ok(())
}

async fn publish_chunk(
    channel: &Channel,
    queue: &str,
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(to - from);
    for i in from..to {
        confirms.push(
            channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions::default(),
                    format!("{{\"n\":{i}}}").as_bytes(),
                    BasicProperties::default()
                        .with_message_id(ShortString::from(format!("s-{i}")))
                        .with_delivery_mode(2),
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(!confirm.await?.is_nack(), "RabbitMQ refused a message");
    }
    Ok(())
}

/// Keeps the last lines of `spate run`'s stderr for error messages, and counts them.
struct Log {
    lines: Arc<Mutex<(VecDeque<String>, usize)>>,
}

impl Log {
    fn follow(child: &mut Child) -> Log {
        let log = Log {
            lines: Arc::new(Mutex::new((VecDeque::new(), 0))),
        };
        if let Some(stderr) = child.stderr.take() {
            let lines = log.lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut lines = lines.lock().unwrap_or_else(|e| e.into_inner());
                    if lines.0.len() == 20 {
                        lines.0.pop_front();
                    }
                    lines.0.push_back(line);
                    lines.1 += 1;
                }
            });
        }
        log
    }

    fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.0.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// `spate_event_index_events` of the pipeline, labelled `pipeline="soak"` (or with its
/// namespace, `default/soak`); `None` before the gauge is first set.
fn index_size(text: &str) -> Option<i64> {
    let name = "spate_event_index_events{";
    let labels = [
        format!("pipeline=\"{PIPELINE}\""),
        format!("pipeline=\"{NAMESPACE}/{PIPELINE}\""),
    ];
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter(|line| labels.iter().any(|label| line.contains(label.as_str())))
        .find_map(|line| line.rsplit(' ').next()?.parse::<i64>().ok())
}

#[derive(Default, Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
    hwm: u64,
}

/// `VmRSS`, `RssAnon` and `VmHWM` of `pid`, in KiB. `VmHWM` is only brought up to date
/// when memory is unmapped, so the peak reported is the larger of it and every `VmRSS` read.
fn memory_kib(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u64> {
        status
            .lines()
            .find(|line| line.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        hwm: field("VmHWM:")?,
    })
}

/// CPU seconds (user + system) of `pid` so far, from `/proc/<pid>/stat` (in `USER_HZ`,
/// 100 per second on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: the state
    // is the first, utime the 12th and stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Where the CPU time went: `spate run`'s, and this process's (the simulator, the publisher
/// and the scrapes), with this process's RSS, for the progress lines.
fn cpu_note(pid: u32) -> String {
    let spate = cpu_seconds(&pid.to_string()).unwrap_or(f64::NAN);
    let bench = cpu_seconds("self").unwrap_or(f64::NAN);
    let bench_rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    format!(
        "CPU: spate {spate:.0} s, simulator and bench {bench:.0} s (RSS {:.0} MiB)",
        bench_rss as f64 / 1024.0
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
