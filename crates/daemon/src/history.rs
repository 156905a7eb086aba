//! The catalog's history kept to `daemon.catalog_history`: the passes of
//! [`backstop_fleet::history`] (the same code the fleet simulation runs on
//! its nodes), with the daemon's metric and log lines.

use std::sync::Arc;
use std::time::Duration;

use backstop_fleet::history::{FIRST, Pass, horizon};
use backstop_fleet::{FleetCatalog, FleetError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Core;

/// Runs a pass every hour until `stop`.
pub(crate) async fn keep(core: Arc<Core>, stop: CancellationToken) {
    let catalog: Arc<dyn FleetCatalog> = Arc::new(core.catalog.clone());
    let reads = core.clone();
    let counts = core.clone();
    backstop_fleet::history::keep(
        catalog,
        Arc::new(crate::fleet::CatalogClock),
        // daemon.catalog_history, or what catch-up reads when longer.
        move |now| {
            let config = reads.config();
            let entries = crate::entries(&config);
            horizon(
                config.daemon.catalog_history,
                entries.iter().filter_map(|e| e.timetable.as_deref()),
                now,
            )
        },
        first_wait(),
        stop,
        move |n| counts.metrics.catalog_forgotten.inc_by(n),
        |p| report(&core, p),
    )
    .await;
}

fn first_wait() -> Duration {
    // The test build can start the first pass at once.
    crate::test_wait("BACKSTOP_TEST_HISTORY_FIRST_MS").unwrap_or(FIRST)
}

/// The pass's log lines.
fn report(core: &Core, p: &Pass) {
    if let Some(FleetError(e)) = &p.error {
        warn!(error = %e, deleted = p.deleted, "Cannot delete old runs from the catalog; the next pass tries again.");
    }
    if p.more_left {
        info!(
            deleted = p.deleted,
            "The catalog holds more old runs than one pass deletes; the next pass goes on."
        );
    }
    if p.deleted > 0 {
        info!(
            deleted = p.deleted,
            before = %p.before.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            catalog_history = %humantime::format_duration(core.config().daemon.catalog_history),
            seconds = p.took.as_secs_f64(),
            "Deleted runs that ended before daemon.catalog_history from the catalog (each job's newest of each kind and outcome stays)."
        );
    }
}
