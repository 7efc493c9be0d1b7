//! The cron source on real timers: a per-second schedule ticks on time, downtime is handled
//! by the missed-run policy, and the checkpoint only moves once ticks are settled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use spate_sources::checkpoint::CheckpointStore;
use spate_sources::cron::{Clock, CronSource, MissedRunPolicy};
use spate_sources::secret::EnvSecrets;
use spate_sources::{Delivery, SourceContext};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PIPELINE: &str = "reports/nightly";
const KEY: &str = "cron/reports/nightly";

#[derive(Default)]
struct MemoryCheckpoints(Mutex<HashMap<String, Vec<u8>>>);

impl MemoryCheckpoints {
    fn get(&self) -> Option<String> {
        let map = self.0.lock().unwrap();
        map.get(KEY)
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
    }
}

impl CheckpointStore for MemoryCheckpoints {
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move { Ok(self.0.lock().unwrap().get(key).cloned()) })
    }

    fn save<'a>(&'a self, key: &'a str, value: Vec<u8>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.0.lock().unwrap().insert(key.to_string(), value);
            Ok(())
        })
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn config(schedule: &str, missed_runs: MissedRunPolicy, catch_up_limit: u32) -> CronSource {
    CronSource {
        schedule: schedule.to_string(),
        timezone: "UTC".to_string(),
        missed_runs,
        catch_up_limit,
        list_bucket: None,
    }
}

struct Running {
    rx: mpsc::Receiver<Delivery>,
    checkpoints: Arc<MemoryCheckpoints>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(config: CronSource, checkpoint: Option<&str>, clock: Option<Clock>) -> Running {
    let checkpoints = Arc::new(MemoryCheckpoints::default());
    if let Some(tick) = checkpoint {
        checkpoints
            .save(KEY, tick.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let cx = SourceContext {
        pipeline: PIPELINE.to_string(),
        secrets: Arc::new(EnvSecrets),
        checkpoints: checkpoints.clone(),
        state_dir: std::env::temp_dir(),
        webhooks: None,
        backlog: Default::default(),
    };
    let source = match clock {
        Some(clock) => spate_sources::cron::build_with_clock(&config, &cx, clock),
        None => spate_sources::cron::build(&config, &cx),
    }
    .await
    .unwrap();
    let (tx, rx) = mpsc::channel(32);
    let stop = CancellationToken::new();
    tokio::spawn(source.run(tx, stop.clone()));
    Running {
        rx,
        checkpoints,
        stop,
    }
}

/// A clock stopped half a minute past noon: no live tick of a per-minute schedule falls due
/// during a test, so only missed runs are emitted.
fn frozen_at_noon() -> Clock {
    let now = at("2026-03-01T12:00:30Z");
    Arc::new(move || now)
}

async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a tick within 5s")
        .expect("the source is running")
}

async fn drain(rx: &mut mpsc::Receiver<Delivery>) -> Vec<Delivery> {
    let mut deliveries = Vec::new();
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_millis(400), rx.recv()).await
    {
        deliveries.push(delivery);
    }
    deliveries
}

fn scheduled(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| {
            d.event.fields()["scheduledTime"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_per_second_schedule_ticks_every_second_with_its_scheduled_time() {
    let mut running = start(
        config("*/1 * * * * *", MissedRunPolicy::Skip, 1),
        None,
        None,
    )
    .await;
    let mut ticks = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut running.rx).await;
        ticks.push((Utc::now(), Instant::now(), delivery));
    }
    for (arrived, _, delivery) in &ticks {
        let fields = delivery.event.fields();
        let time = at(fields["scheduledTime"].as_str().unwrap());
        assert!(time <= *arrived && *arrived - time < chrono::Duration::milliseconds(1000));
        assert_eq!(
            delivery.event.id(),
            format!("{PIPELINE}/{}", fields["scheduledTime"].as_str().unwrap())
        );
        assert_eq!(fields["subject"], "*/1 * * * * *");
        assert_eq!(fields["schedule"], "*/1 * * * * *");
        assert_eq!(fields["timezone"], "UTC");
    }
    for pair in ticks.windows(2) {
        let first = at(pair[0].2.event.fields()["scheduledTime"].as_str().unwrap());
        let second = at(pair[1].2.event.fields()["scheduledTime"].as_str().unwrap());
        assert_eq!(second - first, chrono::Duration::seconds(1));
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap > Duration::from_millis(500) && gap < Duration::from_millis(1500),
            "{gap:?}"
        );
    }
}

#[tokio::test]
async fn skip_resumes_from_now() {
    let mut running = start(
        config("* * * * *", MissedRunPolicy::Skip, 10),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    assert!(drain(&mut running.rx).await.is_empty());
}

#[tokio::test]
async fn run_once_emits_the_latest_missed_tick() {
    let mut running = start(
        config("* * * * *", MissedRunPolicy::RunOnce, 10),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let deliveries = drain(&mut running.rx).await;
    assert_eq!(scheduled(&deliveries), ["2026-03-01T12:00:00Z"]);
    assert_eq!(
        deliveries[0].event.id(),
        "reports/nightly/2026-03-01T12:00:00Z"
    );
}

#[tokio::test]
async fn the_schedule_is_read_in_its_time_zone() {
    let mut tokyo_noon = config("0 12 * * *", MissedRunPolicy::RunOnce, 1);
    tokyo_noon.timezone = "Asia/Tokyo".into();
    let mut running = start(
        tokyo_noon,
        Some("2026-02-27T00:00:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let deliveries = drain(&mut running.rx).await;
    // Noon in Tokyo (UTC+9) is 03:00 UTC.
    assert_eq!(scheduled(&deliveries), ["2026-03-01T03:00:00Z"]);
    assert_eq!(deliveries[0].event.fields()["timezone"], "Asia/Tokyo");
}

#[tokio::test]
async fn catch_up_emits_missed_ticks_oldest_first_up_to_the_limit() {
    let mut limited = start(
        config("* * * * *", MissedRunPolicy::CatchUp, 3),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    assert_eq!(
        scheduled(&drain(&mut limited.rx).await),
        [
            "2026-03-01T11:58:00Z",
            "2026-03-01T11:59:00Z",
            "2026-03-01T12:00:00Z"
        ]
    );
    let mut all = start(
        config("* * * * *", MissedRunPolicy::CatchUp, 100),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let ticks = scheduled(&drain(&mut all.rx).await);
    assert_eq!(ticks.len(), 10);
    assert_eq!(ticks[0], "2026-03-01T11:51:00Z");
    assert_eq!(ticks[9], "2026-03-01T12:00:00Z");
}

#[tokio::test]
async fn the_checkpoint_advances_only_over_settled_ticks() {
    let mut running = start(
        config("* * * * *", MissedRunPolicy::CatchUp, 3),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let mut deliveries = drain(&mut running.rx).await.into_iter();
    let (first, second, third) = (
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
        deliveries.next().unwrap(),
    );
    let checkpoint = || running.checkpoints.get();
    assert_eq!(checkpoint().as_deref(), Some("2026-03-01T11:50:00Z"));
    second.ack.ack().await.unwrap();
    // 11:58 is still out: moving past it would lose it in a crash.
    assert_eq!(checkpoint().as_deref(), Some("2026-03-01T11:50:00Z"));
    first.ack.ack().await.unwrap();
    assert_eq!(checkpoint().as_deref(), Some("2026-03-01T11:59:00Z"));
    third.ack.reject("bad template".into()).await.unwrap();
    assert_eq!(checkpoint().as_deref(), Some("2026-03-01T12:00:00Z"));
}

#[tokio::test]
async fn a_retried_tick_comes_back_with_the_same_id() {
    let mut running = start(
        config("* * * * *", MissedRunPolicy::RunOnce, 1),
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let first = next(&mut running.rx).await;
    let id = first.event.id().to_string();
    first.ack.retry().await.unwrap();
    let again = next(&mut running.rx).await;
    assert_eq!(again.event.id(), id);
    assert_eq!(
        running.checkpoints.get().as_deref(),
        Some("2026-03-01T11:50:00Z")
    );
    again.ack.ack().await.unwrap();
    assert_eq!(
        running.checkpoints.get().as_deref(),
        Some("2026-03-01T12:00:00Z")
    );
}

#[tokio::test]
async fn a_listing_tick_emits_each_object_and_settles_when_all_are_acked() {
    let bucket = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(bucket.path().join("reports")).unwrap();
    std::fs::create_dir_all(bucket.path().join("other")).unwrap();
    std::fs::write(bucket.path().join("reports/jan.csv"), "a,b\n").unwrap();
    std::fs::write(bucket.path().join("reports/feb.csv"), "a,b,c\n").unwrap();
    std::fs::write(bucket.path().join("other/x.csv"), "x").unwrap();
    let mut with_listing = config("* * * * *", MissedRunPolicy::RunOnce, 1);
    with_listing.list_bucket = Some(spate_sources::cron::BucketListing {
        url: format!("file://{}", bucket.path().display()),
        prefix: Some("reports/".into()),
        endpoint: None,
        region: None,
    });
    let mut running = start(
        with_listing,
        Some("2026-03-01T11:50:00Z"),
        Some(frozen_at_noon()),
    )
    .await;
    let mut deliveries = drain(&mut running.rx).await;
    deliveries.sort_by(|a, b| a.event.id().cmp(b.event.id()));
    let ids: Vec<&str> = deliveries.iter().map(|d| d.event.id()).collect();
    assert_eq!(
        ids,
        [
            "reports/nightly/2026-03-01T12:00:00Z/reports/feb.csv",
            "reports/nightly/2026-03-01T12:00:00Z/reports/jan.csv",
        ]
    );
    let jan = deliveries[1].event.fields();
    assert_eq!(jan["key"], "reports/jan.csv");
    assert_eq!(jan["size"], 4);
    assert_eq!(jan["scheduledTime"], "2026-03-01T12:00:00Z");
    assert!(jan["url"].as_str().unwrap().ends_with("/reports/jan.csv"));
    let mut deliveries = deliveries.into_iter();
    let (feb, jan) = (deliveries.next().unwrap(), deliveries.next().unwrap());
    feb.ack.ack().await.unwrap();
    assert_eq!(
        running.checkpoints.get().as_deref(),
        Some("2026-03-01T11:50:00Z")
    );
    jan.ack.ack().await.unwrap();
    assert_eq!(
        running.checkpoints.get().as_deref(),
        Some("2026-03-01T12:00:00Z")
    );
}
