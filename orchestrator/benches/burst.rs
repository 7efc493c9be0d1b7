//! The burst benchmark: RabbitMQ messages become Jobs on the simulator, with 5 ms of added
//! latency on every API request.
//!
//! For 1,000 and 10,000 events, per-event and indexed, it prints: the time until every Job
//! exists (from `spate run` starting), event-to-Job latency p50/p99 (read from Spate's own
//! `spate_event_to_job_seconds` histogram, interpolated within its 25%-wide buckets), API
//! writes per event made by Spate alone (the simulator counts requests per identity, and
//! Spate runs with its own token), and the orchestrator's peak RSS (it runs as a separate
//! process, `spate run`, so the simulator's memory is not counted).
//!
//! Run: `cargo bench -p spate --bench burst` (needs RabbitMQ on 127.0.0.1:5672, see
//! `scripts/services`). `SPATE_BENCH_SIZES=1000` limits the sizes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use spate_sim::{Faults, SimCluster, SimConfig};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BATCH: usize = 100;

struct Row {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for events in sizes {
        for mode in ["perEvent", "indexed"] {
            eprintln!("bench: {events} events, {mode}...");
            rows.push(runtime.block_on(run(events, mode))?);
        }
    }
    println!();
    println!(
        "| events | mode | Jobs | every Job exists | event→Job p50 | event→Job p99 | API writes/event | peak RSS |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} | {:.2} s | {:.1} ms | {:.1} ms | {:.3} | {:.1} MiB |",
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

async fn run(events: usize, mode: &'static str) -> anyhow::Result<Row> {
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

    let queue = format!("spate-bench-{events}-{mode}-{}", std::process::id());
    let connection = publish(&queue, events).await?;
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
    amqp: {{url: "{AMQP}", queue: {queue}, prefetch: 500}}
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
    let metrics_port = free_port()?;
    let started = Instant::now();
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
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
        anyhow::ensure!(
            Instant::now() < deadline,
            "the burst did not finish in 10 minutes"
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
    let channel = connection.create_channel().await?;
    let _ = channel
        .queue_delete(
            ShortString::from(queue.as_str()),
            QueueDeleteOptions::default(),
        )
        .await;
    cluster.shutdown().await;
    Ok(Row {
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

async fn publish(queue: &str, count: usize) -> anyhow::Result<Connection> {
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

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn scrape(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
