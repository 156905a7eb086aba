//! standby = "pause": WAL replay on a standby paused for the dump (so
//! replay cannot cancel it), recorded in the catalog before it takes hold,
//! and resumed on every path out of the run, or by the next run or daemon
//! start when a process died holding it.

use backstop_catalog::Catalog;
use backstop_config::JobConfig;
use backstop_dump::PgTarget;
use tracing::{error, info, warn};

use super::{BackupError, Step};

/// With standby = "pause" on a standby: resumes a pause a dead process
/// left for this job (its runs never overlap, so a recorded pause is not
/// another run's), then pauses replay for this dump and records it.
pub(super) async fn pause_replay(
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<Option<backstop_dump::admin::ReplayPause>, BackupError> {
    if job.standby != backstop_config::StandbyMode::Pause {
        return Ok(None);
    }
    let target =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    if catalog
        .replay_pauses()
        .await
        .is_ok_and(|p| p.contains(&job.name))
    {
        resume_left_pause(job, catalog).await;
    }
    // Recorded before pausing: a process killed a moment after the pause
    // took hold still leaves the record its successor resumes from.
    if let Err(e) = catalog.record_replay_pause(&job.name).await {
        warn!(job = %job.name, error = %e, "Could not record the replay pause in the catalog; if this process dies during the dump, resume replay by hand.");
    }
    let paused = backstop_dump::admin::ReplayPause::begin(&target).await;
    if !matches!(paused, Ok(Some(_))) {
        let _ = catalog.forget_replay_pause(&job.name).await;
    }
    match paused {
        Ok(Some(p)) => {
            info!(job = %job.name, "The database is a standby: WAL replay is paused for the dump (standby = \"pause\").");
            Ok(Some(p))
        }
        Ok(None) => Ok(None),
        Err(e @ backstop_dump::DumpError::Connect { .. }) => {
            Err(BackupError::connect_failed(&target, e).await)
        }
        Err(e) => Err(BackupError::at(Step::Preflight, e)),
    }
}

/// Resumes the standby's replay after the dump and says what it cost.
pub(super) async fn resume_replay(
    job: &JobConfig,
    pause: backstop_dump::admin::ReplayPause,
    catalog: &Catalog,
) -> Option<backstop_dump::admin::Resumed> {
    match pause.resume().await {
        Ok(r) => {
            let _ = catalog.forget_replay_pause(&job.name).await;
            info!(job = %job.name, paused_seconds = r.paused_seconds, replay_lag_bytes = r.lag_bytes, "WAL replay on the standby resumed.");
            Some(r)
        }
        Err(e) => {
            error!(job = %job.name, error = %e, "Could not resume WAL replay on the standby: it stays paused and falls behind. The next run or daemon start tries again; or run SELECT pg_wal_replay_resume(); on it.");
            None
        }
    }
}

/// Resumes a pause of `job`'s standby that a dead process left behind.
pub async fn resume_left_pause(job: &JobConfig, catalog: &Catalog) {
    let target = match PgTarget::from_config(&job.database) {
        Ok(t) => t,
        Err(e) => {
            error!(job = %job.name, error = %e, "A backup left WAL replay paused on the standby and its URL is unusable now; run SELECT pg_wal_replay_resume(); on it.");
            return;
        }
    };
    match backstop_dump::admin::resume_left_pause(&target).await {
        Ok(resumed) => {
            if resumed {
                warn!(job = %job.name, "Resumed WAL replay on the standby: a backup that did not finish (the process died) had left it paused.");
            }
            let _ = catalog.forget_replay_pause(&job.name).await;
        }
        Err(e) => {
            error!(job = %job.name, error = %e, "A backup left WAL replay paused on the standby and it cannot be resumed now; run SELECT pg_wal_replay_resume(); on it.");
        }
    }
}
