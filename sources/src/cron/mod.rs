//! Cron schedules: one event per tick, carrying its scheduled time; missed ticks after
//! downtime handled by policy.
//!
//! Delivery guarantee: at least once per tick that the missed-run policy keeps. The event id
//! is `<pipeline>/<tick in RFC 3339 UTC>`, so a tick emitted again after a crash maps to the
//! Job it already has. The checkpoint (the last tick whose event was settled, with every
//! earlier one settled too) advances only on ack or reject, and on restart the ticks after
//! it are `skip`ped, run once (`runOnce`: the latest) or caught up (`catchUp`: the latest
//! `catchUpLimit`, oldest first).
//!
//! With `listBucket`, a tick is one event per object under the prefix (id
//! `<tick id>/<key>`), and the tick counts as settled once its listing has ended and every
//! one of its events is settled.

mod listing;
mod runner;
mod ticks;

use std::sync::Arc;

use chrono::Utc;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::check::BUCKET_SCHEMES;
use crate::check::Problems;
use crate::object_store::object_sample;
use crate::{Source, SourceContext, SourceError};
use listing::TickListing;
pub use runner::Clock;
use runner::CronRunner;
pub use ticks::Schedule;

/// A cron schedule; each tick is one event carrying its scheduled time.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CronSource {
    /// Five fields (minute hour day month weekday) or six (with seconds first).
    pub schedule: String,
    /// IANA time zone the schedule is read in, e.g. `Europe/Paris`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// What to do with ticks missed while Spate was down.
    #[serde(default)]
    pub missed_runs: MissedRunPolicy,
    /// With `missedRuns: catchUp`, at most this many missed ticks are run.
    #[serde(default = "default_catch_up_limit")]
    pub catch_up_limit: u32,
    /// Each tick lists this bucket prefix and emits one event per object, as a batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_bucket: Option<BucketListing>,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

fn default_catch_up_limit() -> u32 {
    10
}

/// Ticks missed during downtime.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MissedRunPolicy {
    /// Forget them.
    Skip,
    /// Run one tick for all of them.
    #[default]
    RunOnce,
    /// Run each, up to `catchUpLimit`.
    CatchUp,
}

/// A bucket prefix listed at each cron tick.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BucketListing {
    /// As in `objectStore.url`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl CronSource {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let fields = self.schedule.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            problems.push(
                format!("{path}.schedule"),
                format!(
                    "`{}` has {fields} fields; write 5 (minute hour day month weekday) or 6 (seconds first)",
                    self.schedule
                ),
            );
        } else if let Err(error) = parse_schedule(&self.schedule) {
            problems.push(
                format!("{path}.schedule"),
                format!("`{}` is not a cron expression: {error}", self.schedule),
            );
        }
        if self.timezone.parse::<chrono_tz::Tz>().is_err() {
            problems.push(
                format!("{path}.timezone"),
                format!(
                    "`{}` is not an IANA time zone; write e.g. `UTC` or `Europe/Paris`",
                    self.timezone
                ),
            );
        }
        if self.missed_runs == MissedRunPolicy::CatchUp && self.catch_up_limit == 0 {
            problems.push(
                format!("{path}.catchUpLimit"),
                "must be at least 1 with `missedRuns: catchUp`",
            );
        }
        if let Some(listing) = &self.list_bucket {
            problems.url(
                &format!("{path}.listBucket.url"),
                &listing.url,
                &BUCKET_SCHEMES,
            );
        }
    }

    /// An event as this source produces it.
    pub fn sample_event(&self) -> Value {
        let mut event = match &self.list_bucket {
            Some(listing) => object_sample(&listing.url),
            None => json!({"id": "sample-0001"}),
        };
        event["subject"] = json!(self.schedule);
        event["scheduledTime"] = json!("2026-01-01T00:00:00Z");
        event
    }
}

/// Parses 5- and 6-field expressions (seconds first); years are not allowed.
pub fn parse_schedule(schedule: &str) -> Result<croner::Cron, croner::errors::CronError> {
    croner::parser::CronParser::builder()
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(schedule)
}

/// Starts the source on the system clock.
pub fn build(
    config: &CronSource,
    cx: &SourceContext,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    build_with_clock(config, cx, Arc::new(Utc::now))
}

/// Starts the source on the given clock; tests use it to place "now" where they need it.
pub fn build_with_clock(
    config: &CronSource,
    cx: &SourceContext,
    clock: Clock,
) -> BoxFuture<'static, Result<Box<dyn Source>, SourceError>> {
    let (config, cx) = (config.clone(), cx.clone());
    Box::pin(async move {
        let cron = parse_schedule(&config.schedule).map_err(|error| {
            SourceError::Config(format!(
                "cron schedule `{}` is not a cron expression: {error}",
                config.schedule
            ))
        })?;
        let timezone: chrono_tz::Tz = config.timezone.parse().map_err(|_| {
            SourceError::Config(format!(
                "cron timezone `{}` is not an IANA time zone",
                config.timezone
            ))
        })?;
        let listing = match &config.list_bucket {
            Some(listing) => Some(TickListing::open(listing, cx.secrets.as_ref()).await?),
            None => None,
        };
        Ok(Box::new(CronRunner {
            pipeline: cx.pipeline.clone(),
            schedule_text: config.schedule.clone(),
            timezone: config.timezone.clone(),
            schedule: Schedule::new(cron, timezone),
            policy: config.missed_runs,
            catch_up_limit: usize::try_from(config.catch_up_limit).unwrap_or(usize::MAX),
            checkpoints: cx.checkpoints.clone(),
            clock,
            listing,
        }) as Box<dyn Source>)
    })
}
