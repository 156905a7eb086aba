//! standby = "pause": a standby's WAL replay paused while backups dump from
//! it, so replay cannot cancel them. The pause belongs to the server, not
//! to a backup: every backup dumping from it (jobs, a cluster job's
//! databases, the nodes of a fleet on a shared catalog) records a hold in
//! the catalog, and replay resumes when the last hold ends. A pause backstop
//! found in place (an operator's) is never lifted by backstop.
//!
//! Every change is made on a fresh session holding an advisory lock on the
//! standby ([`StandbyLock`]), so a backup that ends cannot resume replay
//! under one that is starting. No session is kept across the dump: resume
//! connects anew, with retries, and what cannot be resumed now (the
//! standby or the catalog unreachable) is an orphan the next backup of that
//! server or the daemon's minute tick resumes.

use std::time::{Duration, Instant};

use backstop_catalog::{Catalog, PausedBy};
use backstop_config::{Config, JobConfig};
use backstop_dump::PgTarget;
use backstop_dump::admin::{Resumed, StandbyLock};
use tracing::{error, info, warn};

use super::{BackupError, Step};

/// One backup's hold on its standby's replay pause; give it back with
/// [`resume_replay`].
pub struct ReplayHold {
    id: String,
    server: String,
    target: PgTarget,
    since: Instant,
}

/// The server a target is on, as the books name it.
pub fn server_of(target: &PgTarget) -> String {
    format!("{}:{}", target.host().to_lowercase(), target.port())
}

/// The server `job` dumps from, as the books name it (None: its URL is
/// unusable).
pub fn server_of_job(job: &JobConfig) -> Option<String> {
    PgTarget::from_config(&job.database)
        .ok()
        .map(|t| server_of(&t))
}

/// How often, and after what pauses, giving a pause back is tried before
/// it is left to the next backup or the daemon.
const RESUME_BACKOFF: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// With standby = "pause" on a standby: takes a hold on the server's pause,
/// pausing replay if it runs. `node` is the fleet node holding the run.
///
/// # Errors
/// Connection and preflight errors; a catalog that cannot record the hold
/// (the attempt fails and is retried: dumping without a hold could see
/// another backup resume replay under it).
pub(super) async fn pause_replay(
    job: &JobConfig,
    catalog: &Catalog,
    node: Option<&str>,
) -> Result<Option<ReplayHold>, BackupError> {
    if job.standby != backstop_config::StandbyMode::Pause {
        return Ok(None);
    }
    let target =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    let server = server_of(&target);
    // Recorded before the pause: a process killed a moment after it took
    // hold leaves a hold that dies with it, and a server row to resume.
    let id = catalog
        .add_replay_hold(&server, &job.name, node)
        .await
        .map_err(|e| {
            BackupError::said(
                Step::Preflight,
                format!("cannot record the standby's replay pause in the catalog: {e}"),
            )
        })?;
    let hold = ReplayHold {
        id,
        server,
        target,
        since: Instant::now(),
    };
    match take_pause(&hold, job, catalog).await {
        Ok(true) => Ok(Some(hold)),
        Ok(false) => {
            let _ = catalog.drop_replay_hold(&hold.id).await;
            Ok(None)
        }
        Err(e) => {
            // Not dumping after all: the hold goes, and with it the pause
            // if no other backup holds it.
            give_back(&job.name, &hold, catalog).await;
            Err(e)
        }
    }
}

/// Under the standby's lock: pause replay unless it already is (by another
/// backup, or by someone else, which is recorded so it is never lifted).
/// False when the target is not a standby.
async fn take_pause(
    hold: &ReplayHold,
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<bool, BackupError> {
    let mut lock = match StandbyLock::take(&hold.target).await {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(false),
        Err(e @ backstop_dump::DumpError::Connect { .. }) => {
            return Err(BackupError::connect_failed(&hold.target, e).await);
        }
        Err(e) => return Err(BackupError::at(Step::Preflight, e)),
    };
    let books = |e: backstop_catalog::CatalogError| {
        BackupError::said(
            Step::Preflight,
            format!("cannot read the standby's replay pause from the catalog: {e}"),
        )
    };
    let result = async {
        let recorded = catalog.replay_server(&hold.server).await.map_err(books)?;
        let paused = lock
            .is_paused()
            .await
            .map_err(|e| BackupError::at(Step::Preflight, e))?;
        match (recorded, paused) {
            (Some(_), true) => {
                info!(job = %job.name, server = %hold.server, "WAL replay on the standby is already paused for another backup; this dump shares the pause.");
            }
            (None, true) => {
                catalog
                    .set_replay_server(&hold.server, PausedBy::SomeoneElse, &job.name)
                    .await
                    .map_err(books)?;
                warn!(job = %job.name, server = %hold.server, "WAL replay on the standby was already paused, not by backstop: the dump runs under that pause, and backstop will not resume it.");
            }
            (recorded, false) => {
                if recorded.is_some() {
                    warn!(job = %job.name, server = %hold.server, "WAL replay on the standby was resumed by someone while backstop held it paused; pausing it again.");
                }
                // Recorded first: a process killed right after the pause
                // took hold leaves a row its successor resumes from.
                catalog
                    .set_replay_server(&hold.server, PausedBy::Backstop, &job.name)
                    .await
                    .map_err(books)?;
                lock.pause()
                    .await
                    .map_err(|e| BackupError::at(Step::Preflight, e))?;
                info!(job = %job.name, server = %hold.server, "The database is a standby: WAL replay is paused for the dump (standby = \"pause\").");
            }
        }
        Ok(true)
    }
    .await;
    lock.release().await;
    result
}

/// Ends a backup's hold; replay resumes if it was the last one and
/// backstop made the pause. Says what the pause cost this backup.
pub(super) async fn resume_replay(
    job: &JobConfig,
    hold: ReplayHold,
    catalog: &Catalog,
) -> Option<Resumed> {
    give_back(&job.name, &hold, catalog).await
}

async fn give_back(job: &str, hold: &ReplayHold, catalog: &Catalog) -> Option<Resumed> {
    if let Err(e) = catalog.drop_replay_hold(&hold.id).await {
        warn!(job = %job, error = %e, "Could not remove this backup's replay hold from the catalog; it is ignored from now on.");
    }
    let mut last = String::new();
    for wait in RESUME_BACKOFF.iter().map(Some).chain([None]) {
        match settle(&hold.server, &hold.target, catalog).await {
            Ok(settled) => {
                let cost = Resumed {
                    paused_seconds: hold.since.elapsed().as_secs_f64(),
                    lag_bytes: settled.lag(),
                };
                info!(job = %job, paused_seconds = cost.paused_seconds, replay_lag_bytes = cost.lag_bytes, "This backup's hold on the standby's replay pause ended.");
                return Some(cost);
            }
            Err(e) => last = e,
        }
        if let Some(wait) = wait {
            tokio::time::sleep(*wait).await;
        }
    }
    error!(job = %job, server = %hold.server, error = %last, "Could not resume WAL replay on the standby: it stays paused and falls behind. The daemon tries again every minute, as does the next backup from it; or run SELECT pg_wal_replay_resume(); on it.");
    None
}

/// What became of a server's pause when a hold ended; each with the WAL
/// the standby had yet to replay.
enum Settled {
    /// Replay resumed: no backup holds it and backstop had paused it.
    Resumed(u64),
    /// Other backups still dump under the pause.
    Held(u64),
    /// Left paused: it was not backstop's pause, or not recorded.
    LeftAlone(u64),
    /// The server is no longer a standby.
    Promoted,
}

impl Settled {
    fn lag(&self) -> u64 {
        match self {
            Settled::Resumed(l) | Settled::Held(l) | Settled::LeftAlone(l) => *l,
            Settled::Promoted => 0,
        }
    }
}

/// Under the standby's lock: if no live backup holds `server`'s pause,
/// resume replay (when backstop paused it) and forget the pause.
async fn settle(server: &str, target: &PgTarget, catalog: &Catalog) -> Result<Settled, String> {
    let Some(mut lock) = StandbyLock::take(target).await.map_err(|e| e.to_string())? else {
        // Promoted: there is no replay to resume.
        let _ = catalog.forget_replay_server(server).await;
        return Ok(Settled::Promoted);
    };
    let result = async {
        let live = catalog
            .live_replay_holds(server)
            .await
            .map_err(|e| format!("cannot count the backups still dumping from it: {e}"))?;
        if !live.is_empty() {
            info!(server = %server, holding = %live.join(", "), "WAL replay on the standby stays paused: other backups still dump from it.");
            return lock.lag().await.map(Settled::Held).map_err(|e| e.to_string());
        }
        let recorded = catalog
            .replay_server(server)
            .await
            .map_err(|e| e.to_string())?;
        let settled = match recorded.map(|r| r.paused_by) {
            Some(PausedBy::SomeoneElse) => {
                info!(server = %server, "WAL replay on the standby stays paused: it was paused before the backup, not by backstop.");
                lock.lag().await.map(Settled::LeftAlone)
            }
            Some(PausedBy::Backstop) => {
                let lag = lock.resume().await;
                if lag.is_ok() {
                    info!(server = %server, "WAL replay on the standby resumed.");
                }
                lag.map(Settled::Resumed)
            }
            None => lock.lag().await.map(Settled::LeftAlone),
        }
        .map_err(|e| e.to_string())?;
        catalog
            .forget_replay_server(server)
            .await
            .map_err(|e| format!("replay resumed, but the catalog still records the pause: {e}"))?;
        Ok(settled)
    }
    .await;
    lock.release().await;
    result
}

/// Resumes every pause no live backup holds (its process died, or giving
/// it back failed), for the servers `config`'s jobs dump from. Run at
/// daemon start and every minute after. Returns, per job with standby =
/// "pause", how long its server's replay has been paused by backstop now.
pub async fn resume_orphaned_pauses(config: &Config, catalog: &Catalog) -> Vec<(String, f64)> {
    let recorded = match catalog.replay_servers().await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "Cannot read the standbys' replay pauses from the catalog.");
            return Vec::new();
        }
    };
    let jobs: Vec<(&JobConfig, String)> = config
        .jobs
        .iter()
        .filter(|j| j.standby == backstop_config::StandbyMode::Pause)
        .filter_map(|j| Some((j, server_of(&PgTarget::from_config(&j.database).ok()?))))
        .collect();
    for row in &recorded {
        let Some((job, _)) = jobs.iter().find(|(_, s)| *s == row.server) else {
            continue;
        };
        match catalog.live_replay_holds(&row.server).await {
            Ok(live) if live.is_empty() => {}
            _ => continue,
        }
        let target = match PgTarget::from_config(&job.database) {
            Ok(t) => t,
            Err(_) => continue,
        };
        match settle(&row.server, &target, catalog).await {
            Ok(Settled::Resumed(_)) => {
                warn!(job = %job.name, server = %row.server, "Resumed WAL replay on the standby: a backup that did not finish (its process died, or it could not resume) had left it paused.");
            }
            Ok(_) => {}
            Err(e) => {
                error!(job = %job.name, server = %row.server, error = %e, "A backup left WAL replay paused on the standby and it cannot be resumed now; trying again in a minute (or run SELECT pg_wal_replay_resume(); on it).");
            }
        }
    }
    let now = chrono::Utc::now();
    let still = catalog.replay_servers().await.unwrap_or(recorded);
    jobs.iter()
        .map(|(j, server)| {
            let age = still
                .iter()
                .find(|r| &r.server == server && r.paused_by == PausedBy::Backstop)
                .map_or(0.0, |r| {
                    (now - r.paused_at).num_milliseconds().max(0) as f64 / 1000.0
                });
            (j.name.clone(), age)
        })
        .collect()
}
