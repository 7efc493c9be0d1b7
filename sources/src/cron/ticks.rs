//! Which ticks are due: pure schedule arithmetic, separate from timers and I/O so the
//! missed-run policy is tested without waiting.

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

/// A parsed schedule read in its time zone. Searches run on zoned times, so croner applies
/// the zone's DST rules: a tick inside a skipped hour runs when the clock jumps, a tick in a
/// repeated hour runs once.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    timezone: Tz,
}

impl Schedule {
    pub fn new(cron: croner::Cron, timezone: Tz) -> Self {
        Schedule { cron, timezone }
    }

    /// The first tick strictly after `after`, or `None` if the schedule never fires again.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// The latest `limit` ticks in `(after, now]`, oldest first. Walks backwards from `now`,
    /// so a checkpoint a year old costs `limit` searches, not a year of ticks.
    pub fn due(
        &self,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut due = Vec::new();
        let mut cursor = now.with_timezone(&self.timezone);
        let mut inclusive = true;
        while due.len() < limit {
            let Ok(tick) = self.cron.find_previous_occurrence(&cursor, inclusive) else {
                break;
            };
            let tick_utc = tick.with_timezone(&Utc);
            if tick_utc <= after || tick_utc > now {
                break;
            }
            due.push(tick_utc);
            cursor = tick;
            inclusive = false;
        }
        due.reverse();
        due
    }
}

/// A tick as it appears in event ids and checkpoints: RFC 3339 in UTC, whole seconds, so the
/// same tick always prints the same way whatever the schedule's zone.
pub fn format_tick(tick: DateTime<Utc>) -> String {
    tick.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn parse_tick(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|tick| tick.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cron::parse_schedule;

    fn at(text: &str) -> DateTime<Utc> {
        parse_tick(text).unwrap()
    }

    fn hourly(zone: &str) -> Schedule {
        Schedule::new(parse_schedule("30 * * * *").unwrap(), zone.parse().unwrap())
    }

    #[test]
    fn due_ticks_are_the_latest_ones_oldest_first() {
        let schedule = hourly("UTC");
        let due = schedule.due(at("2026-03-01T00:00:00Z"), at("2026-03-01T05:00:00Z"), 3);
        let printed: Vec<String> = due.into_iter().map(format_tick).collect();
        assert_eq!(
            printed,
            [
                "2026-03-01T02:30:00Z",
                "2026-03-01T03:30:00Z",
                "2026-03-01T04:30:00Z"
            ]
        );
        assert!(
            schedule
                .due(at("2026-03-01T04:30:00Z"), at("2026-03-01T05:00:00Z"), 3)
                .is_empty()
        );
        assert_eq!(
            schedule.due(at("2026-03-01T04:00:00Z"), at("2026-03-01T04:30:00Z"), 3),
            [at("2026-03-01T04:30:00Z")]
        );
    }

    #[test]
    fn six_fields_tick_every_second() {
        let schedule = Schedule::new(parse_schedule("*/1 * * * * *").unwrap(), Tz::UTC);
        let after = at("2026-03-01T00:00:00Z") + chrono::Duration::milliseconds(400);
        assert_eq!(schedule.next_after(after), Some(at("2026-03-01T00:00:01Z")));
    }

    #[test]
    fn daylight_saving_neither_loses_nor_doubles_a_tick() {
        let schedule = Schedule::new(
            parse_schedule("30 2 * * *").unwrap(),
            "Europe/Paris".parse().unwrap(),
        );
        // 2026-03-29: Paris jumps from 02:00 to 03:00; the 02:30 tick runs at the jump.
        let spring = schedule.next_after(at("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(format_tick(spring), "2026-03-29T01:00:00Z");
        // 2026-10-25: 02:30 happens twice; the tick runs once.
        let autumn = schedule.next_after(at("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(format_tick(autumn), "2026-10-25T00:30:00Z");
        let after = schedule.next_after(autumn).unwrap();
        assert_eq!(format_tick(after), "2026-10-26T01:30:00Z");
    }
}
