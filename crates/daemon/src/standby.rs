//! Standbys' replay pauses kept honest while the daemon runs: every minute
//! (and at start), a pause no live backup holds is resumed (its process
//! died, or resuming failed then), and each standby = "pause" job's
//! `backstop_standby_replay_pause_age_seconds` says how long its standby's
//! replay has been paused now, against the limit its alert fires past.

use std::sync::Arc;
use std::time::Duration;

use backstop_catalog::RunKind;
use backstop_config::{JobConfig, StandbyMode};
use tokio_util::sync::CancellationToken;

use crate::Core;

const TICK: Duration = Duration::from_secs(60);

/// A pause is stuck past this when the job has no timeout and no history.
const FLOOR: Duration = Duration::from_secs(3600);

/// Runs the pass at once and every minute until `stop`.
pub(crate) async fn keep(core: Arc<Core>, stop: CancellationToken) {
    let tick = crate::test_wait("BACKSTOP_TEST_STANDBY_TICK_MS").unwrap_or(TICK);
    loop {
        pass(&core).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
    }
}

pub(crate) async fn pass(core: &Core) {
    let config = core.config();
    if !config.jobs.iter().any(|j| j.standby == StandbyMode::Pause) {
        return;
    }
    let ages = backstop_pipeline::backup::resume_orphaned_pauses(&config, &core.catalog).await;
    for (job, age) in ages {
        core.metrics
            .replay_pause_age
            .with_label_values(&[&job])
            .set(age);
        if let Some(j) = config.job(&job) {
            let limit = limit(core, j).await;
            core.metrics
                .replay_pause_limit
                .with_label_values(&[&job])
                .set(limit.as_secs_f64());
        }
    }
}

/// How long the job's dump may keep replay paused: its timeout, or twice
/// its longest backup of the last twenty, and never under an hour.
async fn limit(core: &Core, job: &JobConfig) -> Duration {
    if let Some(t) = job.timeout {
        return t;
    }
    let longest = core
        .catalog
        .recent_backups(&job.name, 20)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.kind == RunKind::Backup)
        .filter_map(|r| Some((r.finished_at? - r.started_at).to_std().ok()? * 2))
        .max()
        .unwrap_or_default();
    longest.max(FLOOR)
}
