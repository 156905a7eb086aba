//! The catalog's history kept to `daemon.catalog_history`: once an hour
//! the daemon deletes the runs that ended before it, a bounded batch per
//! statement and a bounded time per pass, so the catalog (and status, which
//! reads it) stays the same size for months. Every node of a fleet does
//! this; their deletes of the same rows are harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Core;

/// How often a pass runs.
const EVERY: Duration = Duration::from_secs(3600);
/// How long after the daemon starts the first pass runs: not during the
/// start's catch-up, and after an upgrade's `backstop sign`, which reads
/// the runs of the backups it vouches for.
const FIRST: Duration = Duration::from_secs(3600);
/// Runs deleted per statement (each its own short transaction).
const BATCH: u32 = 5_000;
/// A pass stops after this long even if more is left; the next goes on.
const PASS: Duration = Duration::from_secs(60);

/// Runs a pass every [`EVERY`] until `stop`.
pub(crate) async fn keep(core: Arc<Core>, stop: CancellationToken) {
    let mut wait = first_wait();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            _ = pass(&core) => {}
        }
        wait = EVERY;
    }
}

fn first_wait() -> Duration {
    // The test build can start the first pass at once.
    #[cfg(feature = "test-standin")]
    if let Some(ms) = std::env::var("BACKSTOP_TEST_HISTORY_FIRST_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    FIRST
}

/// Deletes what ended before now − `catalog_history`, [`BATCH`] runs at a
/// time, for at most [`PASS`]; returns how many.
async fn pass(core: &Core) -> u64 {
    let keep = core.config().daemon.catalog_history;
    let Some(before) = chrono::Duration::from_std(keep)
        .ok()
        .and_then(|k| backstop_vocab::now().checked_sub_signed(k))
    else {
        return 0;
    };
    let clock = Instant::now();
    let mut total = 0;
    loop {
        match core.catalog.forget_history(before, BATCH).await {
            Ok(n) => {
                total += n;
                core.metrics.catalog_forgotten.inc_by(n);
                if n < u64::from(BATCH) {
                    break;
                }
                if clock.elapsed() > PASS {
                    info!(
                        deleted = total,
                        "The catalog holds more old runs than one pass deletes; the next pass goes on."
                    );
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, deleted = total, "Cannot delete old runs from the catalog; the next pass tries again.");
                break;
            }
        }
    }
    if total > 0 {
        info!(
            deleted = total,
            before = %before.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            catalog_history = %humantime::format_duration(keep),
            seconds = clock.elapsed().as_secs_f64(),
            "Deleted runs that ended before daemon.catalog_history from the catalog (each job's newest of each kind and outcome stays)."
        );
    }
    total
}
