//! The catalog's history kept to `daemon.catalog_history`: once an hour
//! each process deletes the runs that ended before it, a bounded batch per
//! statement and a bounded time per pass, so the catalog (and status, which
//! reads it) stays the same size for months. Every node of a fleet does
//! this; their deletes of the same rows are harmless. What is never
//! deleted (a pending or running run, a job's newest run of each kind,
//! outcome and level) is the catalog's to decide
//! ([`FleetCatalog::forget_history`]).
//!
//! Here, not in the daemon, so the simulation runs the same passes on its
//! nodes as the daemon does and checks that the catalog stays bounded.

use std::sync::Arc;
use std::time::Duration;

use backstop_scheduler::{Clock, Timetable, catch_up_window};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::{FleetCatalog, FleetError};

/// How often a pass runs.
pub const EVERY: Duration = Duration::from_secs(3600);
/// How long after a process starts its first pass runs: not during the
/// start's catch-up, and after an upgrade's `backstop sign`, which reads
/// the runs of the backups it vouches for.
pub const FIRST: Duration = Duration::from_secs(3600);
/// Runs deleted per statement (each its own short transaction).
pub const BATCH: u32 = 5_000;
/// A pass stops after this long even if more is left; the next goes on.
pub const PASS: Duration = Duration::from_secs(60);

/// What the catalog keeps: `history` (`daemon.catalog_history`), or
/// longer when catch-up looks further back for one of `timetables`. Catch-up
/// takes a fire time in its window with no row for a tick no node recorded
/// and records it as missed; a row the history pass deleted would read
/// the same. So the horizon covers the longest window from now, and one
/// more interval of its job (a month's window is three months long, and a
/// later pass's window may be a longer month's), and a day.
pub fn horizon<'a>(
    history: Duration,
    timetables: impl IntoIterator<Item = &'a dyn Timetable>,
    now: DateTime<Utc>,
) -> Duration {
    timetables
        .into_iter()
        .map(|t| {
            let window = catch_up_window(t, now);
            let interval = t.interval_after(now).unwrap_or_default();
            (window + interval + chrono::TimeDelta::days(1))
                .to_std()
                .unwrap_or_default()
        })
        .fold(history, Duration::max)
}

/// How a pass went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// What ended before this was deleted.
    pub before: DateTime<Utc>,
    pub deleted: u64,
    /// It stopped at [`PASS`] with more left.
    pub more_left: bool,
    /// It stopped at this error (what was deleted before it stays deleted).
    pub error: Option<FleetError>,
    pub took: Duration,
}

/// One pass: deletes what ended before `before`, [`BATCH`] runs at a
/// time, for at most [`PASS`]. `deleted` hears each batch's count as it
/// goes (a pass cut off by shutdown has still reported what it did).
pub async fn pass(
    catalog: &dyn FleetCatalog,
    before: DateTime<Utc>,
    deleted: &(dyn Fn(u64) + Send + Sync),
) -> Pass {
    let clock = Instant::now();
    let mut out = Pass {
        before,
        deleted: 0,
        more_left: false,
        error: None,
        took: Duration::ZERO,
    };
    loop {
        match catalog.forget_history(before, BATCH).await {
            Ok(n) => {
                out.deleted += n;
                deleted(n);
                if n < u64::from(BATCH) {
                    break;
                }
                if clock.elapsed() > PASS {
                    out.more_left = true;
                    break;
                }
            }
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out.took = clock.elapsed();
    out
}

/// Runs a pass every [`EVERY`], the first after `first`, until `stop`:
/// each deletes what ended `history(now)` before `clock`'s now (asked at
/// each pass: a reload may change it; see [`horizon`]). `deleted` hears
/// each batch, `done` each pass.
pub async fn keep(
    catalog: Arc<dyn FleetCatalog>,
    clock: Arc<dyn Clock>,
    history: impl Fn(DateTime<Utc>) -> Duration + Send,
    first: Duration,
    stop: CancellationToken,
    deleted: impl Fn(u64) + Send + Sync,
    done: impl Fn(&Pass) + Send,
) {
    let mut wait = first;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = EVERY;
        let now = clock.now();
        let Some(before) = chrono::Duration::from_std(history(now))
            .ok()
            .and_then(|k| now.checked_sub_signed(k))
        else {
            continue;
        };
        tokio::select! {
            () = stop.cancelled() => return,
            p = pass(catalog.as_ref(), before, &deleted) => done(&p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Every(chrono::TimeDelta);

    impl Timetable for Every {
        fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
            let n = after.timestamp().div_euclid(self.0.num_seconds()) + 1;
            DateTime::from_timestamp(n * self.0.num_seconds(), 0)
        }
    }

    /// The catalog keeps daemon.catalog_history unless catch-up reads
    /// further back: then that window, an interval and a day.
    #[test]
    fn the_horizon_covers_what_catch_up_reads() {
        let now = DateTime::from_timestamp(1_772_323_200, 0).unwrap_or_default();
        let day = Duration::from_secs(86_400);
        let hourly = Every(chrono::TimeDelta::hours(1));
        let daily = Every(chrono::TimeDelta::days(1));
        let monthly = Every(chrono::TimeDelta::days(31));
        assert_eq!(horizon(day * 90, [], now), day * 90);
        assert_eq!(
            horizon(day, [&hourly as &dyn Timetable], now),
            day * 2 + Duration::from_secs(3600)
        );
        assert_eq!(
            horizon(day * 90, [&hourly as &dyn Timetable, &daily], now),
            day * 90
        );
        assert_eq!(
            horizon(day, [&hourly as &dyn Timetable, &daily], now),
            day * 5
        );
        assert_eq!(
            horizon(day * 90, [&monthly as &dyn Timetable], now),
            day * (93 + 31 + 1)
        );
    }
}
