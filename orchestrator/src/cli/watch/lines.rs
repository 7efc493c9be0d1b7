//! `--output plain` and `--output json`: one record per change, at most one per interval.
//!
//! Status records are printed when the counts differ from the last one printed (rates are
//! shown but do not count as a change, or a decaying rate would print a line per interval);
//! each new failure is printed once, as it is seen. Problems of the watch itself (the
//! Pipeline resource is missing, a list was denied) go to stderr, so stdout stays data.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::model::{Counts, Failure, Model, Rates};
use super::{WatchEnd, WatchOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Plain,
    Json,
}

/// A `"type": "status"` JSON record.
#[derive(Serialize)]
struct StatusRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: jiff::Timestamp,
    namespace: &'a str,
    pipeline: &'a str,
    #[serde(flatten)]
    counts: &'a Counts,
    events_per_second: f64,
    jobs_per_second: f64,
    /// The most pods pending or running at once since the watch started.
    peak: u64,
}

/// A `"type": "failure"` JSON record.
#[derive(Serialize)]
struct FailureRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: jiff::Timestamp,
    namespace: &'a str,
    pipeline: &'a str,
    object: &'a str,
    message: &'a str,
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn clock(time: jiff::Timestamp) -> String {
    time.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%H:%M:%S")
        .to_string()
}

/// One plain status line, e.g. `12:00:01 received=200 queued=40 lag=120 dead-lettered=0
/// state=ready | jobs active=50 succeeded=110 failed=0 | pods pending=3 running=47
/// succeeded=110 failed=0 | virtual=50 regular=0 unscheduled=0 | jobs/s=4.0 events/s=4.0`;
/// `lag=` only when the source tells it.
pub(super) fn plain_line(time: jiff::Timestamp, counts: &Counts, rates: &Rates) -> String {
    let mut line = clock(time);
    if counts.pipeline_found == Some(true) {
        line.push_str(&format!(
            " received={} queued={}",
            counts.received.unwrap_or(0),
            counts.queued.unwrap_or(0),
        ));
        if let Some(lag) = counts.source_lag {
            line.push_str(&format!(" lag={lag}"));
        }
        line.push_str(&format!(
            " dead-lettered={} state={} |",
            counts.dead_lettered.unwrap_or(0),
            counts.state.map_or("unknown", |s| s.as_str()),
        ));
    }
    line.push_str(&format!(
        " jobs active={} succeeded={} failed={} | pods pending={} running={} succeeded={} failed={} | virtual={} regular={} unscheduled={} | jobs/s={:.1} events/s={:.1}",
        counts.jobs_active,
        counts.jobs_succeeded,
        counts.jobs_failed,
        counts.pods_pending,
        counts.pods_running,
        counts.pods_succeeded,
        counts.pods_failed,
        counts.virtual_,
        counts.regular,
        counts.unscheduled,
        rates.jobs_per_second,
        rates.events_per_second,
    ));
    line
}

pub(super) fn json_line(
    model: &Model,
    time: jiff::Timestamp,
    counts: &Counts,
    rates: &Rates,
) -> String {
    serde_json::to_string(&StatusRecord {
        kind: "status",
        time,
        namespace: &model.namespace,
        pipeline: &model.pipeline_name,
        counts,
        events_per_second: round(rates.events_per_second),
        jobs_per_second: round(rates.jobs_per_second),
        peak: model.peak,
    })
    .unwrap_or_default()
}

fn failure_line(model: &Model, failure: &Failure, format: Format) -> String {
    match format {
        Format::Plain => format!(
            "{} failure {}: {}",
            clock(failure.time),
            failure.object,
            failure.message
        ),
        Format::Json => serde_json::to_string(&FailureRecord {
            kind: "failure",
            time: failure.time,
            namespace: &model.namespace,
            pipeline: &model.pipeline_name,
            object: &failure.object,
            message: &failure.message,
        })
        .unwrap_or_default(),
    }
}

/// Prints until `stop`, stdout closes, or (with `until_idle`) the pipeline stays idle.
pub(super) async fn run(
    model: &Arc<Mutex<Model>>,
    options: &WatchOptions,
    format: Format,
    stop: &CancellationToken,
) -> anyhow::Result<WatchEnd> {
    let mut ticker =
        tokio::time::interval(options.interval.max(std::time::Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last: Option<Counts> = None;
    let mut seen = 0u64;
    let mut noted = 0u64;
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(WatchEnd::Cancelled),
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let mut out = Vec::new();
        let idle;
        {
            let mut model = model.lock();
            model.sample(now);
            for (seq, note) in model.notes_after(noted) {
                eprintln!("spate watch: {note}");
                noted = noted.max(*seq);
            }
            if !model.synced() {
                continue;
            }
            for failure in model.failures_after(seen) {
                out.push(failure_line(&model, failure, format));
                seen = seen.max(failure.seq);
            }
            let counts = model.counts();
            if last.as_ref() != Some(&counts) {
                let rates = model.rates(now);
                let time = jiff::Timestamp::now();
                out.push(match format {
                    Format::Plain => plain_line(time, &counts, &rates),
                    Format::Json => json_line(&model, time, &counts, &rates),
                });
                last = Some(counts);
            }
            idle = model.idle();
        }
        let mut stdout = std::io::stdout().lock();
        for line in out {
            if let Err(error) = writeln!(stdout, "{line}") {
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(WatchEnd::Quit);
                }
                return Err(error.into());
            }
        }
        drop(stdout);
        if options.until_idle {
            if idle {
                let since = *idle_since.get_or_insert(now);
                if now.duration_since(since) >= options.idle_for {
                    return Ok(WatchEnd::Idle);
                }
            } else {
                idle_since = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::watch::model::PipelineState;
    use std::collections::BTreeMap;

    fn counts() -> Counts {
        Counts {
            jobs_active: 50,
            jobs_succeeded: 110,
            pods_pending: 3,
            pods_running: 47,
            pods_succeeded: 110,
            virtual_: 50,
            nodes: BTreeMap::from([("spate-virtual-0".to_string(), 50)]),
            ..Counts::default()
        }
    }

    #[test]
    fn a_plain_line_has_every_count() {
        let time = jiff::Timestamp::now();
        let rates = Rates {
            events_per_second: 4.0,
            jobs_per_second: 3.96,
        };
        let line = plain_line(time, &counts(), &rates);
        assert!(
            line.ends_with(
                " jobs active=50 succeeded=110 failed=0 | pods pending=3 running=47 succeeded=110 failed=0 | virtual=50 regular=0 unscheduled=0 | jobs/s=4.0 events/s=4.0"
            ),
            "{line}"
        );
        let with_pipeline = Counts {
            pipeline_found: Some(true),
            state: Some(PipelineState::Paused),
            received: Some(200),
            queued: Some(40),
            dead_lettered: Some(1),
            ..counts()
        };
        let line = plain_line(time, &with_pipeline, &rates);
        assert!(
            line.contains(" received=200 queued=40 dead-lettered=1 state=paused | jobs active=50"),
            "{line}"
        );
        let lagging = Counts {
            source_lag: Some(1234),
            ..with_pipeline
        };
        let line = plain_line(time, &lagging, &rates);
        assert!(
            line.contains(" received=200 queued=40 lag=1234 dead-lettered=1 state=paused |"),
            "{line}"
        );
    }

    #[test]
    fn a_json_line_has_stable_fields() {
        let model = Model::new("default", "p", Instant::now());
        let rates = Rates {
            events_per_second: 1.0 / 3.0,
            jobs_per_second: 2.0,
        };
        let line = json_line(&model, jiff::Timestamp::now(), &counts(), &rates);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        for field in [
            "type",
            "time",
            "namespace",
            "pipeline",
            "pipeline_found",
            "state",
            "received",
            "queued",
            "source_lag",
            "dead_lettered",
            "last_error",
            "jobs_active",
            "jobs_succeeded",
            "jobs_failed",
            "pods_pending",
            "pods_running",
            "pods_succeeded",
            "pods_failed",
            "virtual",
            "regular",
            "unscheduled",
            "nodes",
            "events_per_second",
            "jobs_per_second",
            "peak",
        ] {
            assert!(value.get(field).is_some(), "{field} missing from {line}");
        }
        assert_eq!(value["type"], "status");
        assert_eq!(value["pods_running"], 47);
        assert_eq!(value["nodes"]["spate-virtual-0"], 50);
        assert_eq!(value["events_per_second"], 0.33);
        assert!(value["received"].is_null());
        assert!(value["source_lag"].is_null());
        let lagging = Counts {
            source_lag: Some(1234),
            ..counts()
        };
        let line = json_line(&model, jiff::Timestamp::now(), &lagging, &rates);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["source_lag"], 1234);
    }
}
