//! One backup run around its attempt: the run's record and lock, then four
//! stages: open the job's stores, run the attempt bounded (timeout,
//! shutdown, the standby's replay pause), discard what was not published,
//! and finish the record.

use std::sync::Arc;

use backstop_catalog::{Catalog, Claim, Outcome, RunKind, RunResult};
use backstop_config::{Config, Encryption, JobConfig};
use backstop_storage::PendingUpload;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::attempt::{BackupReport, attempt};
use super::fan_out::Destination;
use super::names::new_backup_id;
use super::replay::{pause_replay, resume_replay};
use super::{BackupError, Step};
use crate::store::{CatalogJournal, Store};
use crate::summary::RunSummary;

/// Runs one backup of `job` now and records it in `catalog`.
///
/// # Errors
/// [`BackupError`] naming the failed step; nothing without a manifest is left
/// in any store, and the run is recorded as failed.
pub async fn run_backup(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<BackupReport, BackupError> {
    run_backup_until(config, job, catalog, &CancellationToken::new(), None).await
}

/// [`run_backup`] that stops cleanly when `cancel` fires (daemon shutdown):
/// pg_dump is killed, uploads are aborted, this run's artifacts are removed
/// and the run is recorded as `interrupted`.
///
/// With a `claim` (a fleet's shared catalog) the run is that claimed row:
/// no lock or row of its own is taken, the backup id and sizes are
/// recorded on it, the claim is checked right before the manifest is
/// written ([`BackupError::LostClaim`] when it no longer holds), and the
/// caller records how the run ended.
///
/// # Errors
/// As [`run_backup`], or [`BackupError::Interrupted`].
pub async fn run_backup_until(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
) -> Result<BackupReport, BackupError> {
    if let Some(claim) = claim {
        return run_locked(config, job, catalog, cancel, Mode::Claimed(claim)).await;
    }
    lock_job(catalog, &job.name).await?;
    let result = run_locked(config, job, catalog, cancel, Mode::Own).await;
    unlock_job(catalog, &job.name).await;
    result
}

/// One database (or the globals) of a cluster job's run, as a backup of
/// its own series with its own catalog record: `backup_id` is the run's
/// (every database of one run shares it), and `fence` the run's claim in a
/// fleet, checked before the manifest as for any claimed backup. The
/// cluster run holds the job's lock.
///
/// # Errors
/// As [`run_backup_until`].
pub async fn run_member(
    config: &Config,
    member: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    backup_id: &str,
    fence: Option<&Claim>,
) -> Result<BackupReport, BackupError> {
    run_locked(
        config,
        member,
        catalog,
        cancel,
        Mode::Member { backup_id, fence },
    )
    .await
}

/// Records the start of a backup run: on a fleet's claimed run, its backup
/// id (None: the claimed row is the run); otherwise a run row of its own,
/// whose id is returned.
///
/// # Errors
/// [`BackupError::LostClaim`] when the claim no longer holds, or the
/// catalog's error.
pub(crate) async fn begin_run(
    catalog: &Catalog,
    name: &str,
    claim: Option<&Claim>,
    backup_id: &str,
    started_at: DateTime<Utc>,
) -> Result<Option<i64>, BackupError> {
    match claim {
        Some(claim) => {
            if !catalog
                .annotate(claim, backup_id, None)
                .await
                .map_err(BackupError::Catalog)?
            {
                return Err(BackupError::lost_claim());
            }
            Ok(None)
        }
        None => catalog
            .start_run(name, RunKind::Backup, Some(backup_id), started_at)
            .await
            .map(Some)
            .map_err(BackupError::Catalog),
    }
}

/// Takes job `name`'s lock in a catalog of one host: one backup of a job at
/// a time, across the daemon and one-shot runs. (A shared catalog has no
/// locks: its backups are claimed runs.)
///
/// # Errors
/// [`BackupError::Locked`] naming the holder, or the catalog's error.
pub(crate) async fn lock_job(catalog: &Catalog, name: &str) -> Result<(), BackupError> {
    if catalog.is_shared() {
        return Err(BackupError::Locked(format!(
            "job \"{name}\": a backup against a shared catalog runs as a claimed run (`backstop backup` and the daemon claim one)"
        )));
    }
    match catalog.lock_job(name).await.map_err(BackupError::Catalog)? {
        Ok(()) => Ok(()),
        Err(holder) => Err(BackupError::Locked(format!(
            "another backstop process ({holder}) is running a backup of job \"{name}\"; wait for it (or use `backstop backup --wait`, which queues through the daemon)"
        ))),
    }
}

/// Releases [`lock_job`]'s lock (a failure is logged: the lock of an exited
/// process is taken over).
pub(crate) async fn unlock_job(catalog: &Catalog, name: &str) {
    if let Err(e) = catalog.unlock_job(name).await {
        warn!(job = %name, error = %e, "Could not release the job's lock in the catalog; it is taken over once this process exits.");
    }
}

/// Whose run a backup is.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Its own: a run row of its own, under the job's lock.
    Own,
    /// A fleet's claimed run.
    Claimed(&'a Claim),
    /// A member of a cluster job's run.
    Member {
        backup_id: &'a str,
        fence: Option<&'a Claim>,
    },
}

impl<'a> Mode<'a> {
    /// The claim whose row is the run (a fleet's claimed run).
    fn claim(self) -> Option<&'a Claim> {
        match self {
            Mode::Claimed(c) => Some(c),
            Mode::Own | Mode::Member { .. } => None,
        }
    }

    /// The claim checked before the manifest is written.
    fn fence(self) -> Option<&'a Claim> {
        match self {
            Mode::Own => None,
            Mode::Claimed(c) => Some(c),
            Mode::Member { fence, .. } => fence,
        }
    }
}

/// The run, stage by stage: record its start, open the stores, run the
/// attempt bounded, discard what no manifest covers, finish the record.
async fn run_locked(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    mode: Mode<'_>,
) -> Result<BackupReport, BackupError> {
    let started_at = crate::now();
    let backup_id = match mode {
        Mode::Own | Mode::Claimed(_) => new_backup_id(started_at),
        Mode::Member { backup_id, .. } => backup_id.to_string(),
    };
    let run_id = begin_run(catalog, &job.name, mode.claim(), &backup_id, started_at).await?;
    info!(job = %job.name, backup_id = %backup_id, "Backup started.");
    if job.encryption == Encryption::None {
        warn!(job = %job.name, "Backup is NOT encrypted: the job sets encryption = \"none\".");
    }

    let mut targets = open_targets(config, job, catalog).await?;
    let run = Bounded {
        config,
        job,
        catalog,
        cancel,
        backup_id: &backup_id,
        started_at,
        fence: mode.fence().map(|c| (catalog, c)),
    };
    let result = run.attempt(&mut targets).await;
    discard_unpublished(job, &targets).await;
    let result = result.and_then(|report| every_store_or_error(report, &targets));
    finish_record(catalog, job, run_id, mode.claim(), &backup_id, result).await
}

/// Opens each of the job's stores and checks it is reachable before the
/// database is touched (a missing bucket or rejected credentials fail fast,
/// with the store's own message); then aborts uploads earlier runs left.
async fn open_targets(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<Vec<Destination>, BackupError> {
    let mut targets = Vec::new();
    for name in &job.storage {
        let journal: backstop_storage::Journal = Arc::new(CatalogJournal(catalog.clone()));
        let store = Store::open_journaled(config, name, journal)
            .await
            .map_err(|m| BackupError::said(Step::OpenStorage, m))?;
        targets.push(Destination::new(name.clone(), store.shared()));
    }
    for t in &mut targets {
        if let Err(e) = t.storage.probe(false).await {
            t.failed = Some(BackupError::at(Step::CheckStore(t.name.clone()), e));
        }
    }
    abort_stale_uploads(job, &targets, catalog).await;
    let expected = expected_size(job, catalog).await.map_or(
        backstop_storage::SizeHint::Unknown,
        backstop_storage::SizeHint::Expected,
    );
    for t in &mut targets {
        t.expected = expected;
    }
    Ok(targets)
}

/// What the job's backups store, to plan S3 parts for: its expected_size,
/// else the largest of its last ten complete backups (the plan doubles it
/// for growth); None when neither says.
async fn expected_size(job: &JobConfig, catalog: &Catalog) -> Option<u64> {
    if job.expected_size.is_some() {
        return job.expected_size;
    }
    catalog
        .recent_backups(&job.name, 10)
        .await
        .ok()?
        .iter()
        .filter(|r| r.outcome.is_some_and(|o| o.is_success()))
        .filter_map(|r| r.stored_bytes)
        .max()
        .map(|b| b.max(0) as u64)
}

/// What bounds an attempt: the job's timeout, the daemon's shutdown, and
/// (standby = "pause") the standby's replay, paused for the attempt and
/// resumed on every path out of it.
struct Bounded<'a> {
    config: &'a Config,
    job: &'a JobConfig,
    catalog: &'a Catalog,
    cancel: &'a CancellationToken,
    backup_id: &'a str,
    started_at: DateTime<Utc>,
    fence: Option<(&'a Catalog, &'a Claim)>,
}

impl Bounded<'_> {
    async fn attempt(&self, targets: &mut [Destination]) -> Result<BackupReport, BackupError> {
        let (job, catalog) = (self.job, self.catalog);
        let node = self.fence.map(|(_, claim)| claim.node.as_str());
        let pause = pause_replay(job, catalog, node).await?;
        // On the heap: the attempt's future is large, and a cluster job's
        // members nest it inside their own on a worker thread's stack.
        let attempt = Box::pin(attempt(
            self.config,
            job,
            targets,
            self.backup_id,
            self.started_at,
            self.fence,
        ));
        let limited = async {
            let attempt = snapshot_bound(job, attempt);
            match job.timeout {
                Some(limit) => match tokio::time::timeout(limit, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(BackupError::Timeout(limit)),
                },
                None => attempt.await,
            }
        };
        let result = tokio::select! {
            r = limited => r,
            () = self.cancel.cancelled() => Err(BackupError::Interrupted),
        };
        // Resumed on every path: success, failure, timeout, shutdown.
        let replay = match pause {
            Some(p) => resume_replay(job, p, catalog).await,
            None => None,
        };
        result.map(|mut r| {
            r.replay = replay;
            r
        })
    }
}

/// The job's `max_snapshot_age` around an attempt, which holds its
/// snapshot (the primary's xmin) from start to end: a warning at 80 %,
/// then the attempt is given up.
async fn snapshot_bound(
    job: &JobConfig,
    attempt: impl std::future::Future<Output = Result<BackupReport, BackupError>>,
) -> Result<BackupReport, BackupError> {
    let Some(max) = job.max_snapshot_age else {
        return attempt.await;
    };
    let warn_at = max.mul_f64(0.8);
    let mut attempt = std::pin::pin!(attempt);
    tokio::select! {
        r = &mut attempt => return r,
        () = tokio::time::sleep(warn_at) => {
            warn!(job = %job.name, held = %humantime::format_duration(warn_at), max_snapshot_age = %humantime::format_duration(max), "The dump has held its snapshot (and the primary's xmin: vacuum cannot remove rows dead since it began) for 80 % of max_snapshot_age; it is given up if it is not done in time.");
        }
    }
    match tokio::time::timeout(max - warn_at, attempt).await {
        Ok(r) => r,
        Err(_) => Err(BackupError::SnapshotTooOld(max)),
    }
}

/// Stores without a manifest must not keep this run's artifacts.
async fn discard_unpublished(job: &JobConfig, targets: &[Destination]) {
    for t in targets.iter().filter(|t| !t.complete) {
        for key in &t.written.keys() {
            if let Err(e) = t.storage.delete(key).await {
                warn!(job = %job.name, store = %t.name, key = %key, error = %e,
                    "Could not remove an artifact of the failed backup; prune will clean it up.");
            }
        }
    }
}

/// A store that failed while others succeeded still fails the run.
fn every_store_or_error(
    report: BackupReport,
    targets: &[Destination],
) -> Result<BackupReport, BackupError> {
    let failed: Vec<(String, String)> = targets
        .iter()
        .filter_map(|t| {
            t.failed
                .as_ref()
                .map(|e| (t.name.clone(), crate::one_line(e)))
        })
        .collect();
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(BackupError::SomeStores {
            stored_in: report.stores,
            backup_id: report.manifest.backup_id,
            failed,
        })
    }
}

/// Records how the run ended (its own row, or the sizes on a claimed run;
/// a claimed run's caller records the end) and logs it.
async fn finish_record(
    catalog: &Catalog,
    job: &JobConfig,
    run_id: Option<i64>,
    claim: Option<&Claim>,
    backup_id: &str,
    result: Result<BackupReport, BackupError>,
) -> Result<BackupReport, BackupError> {
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            record_failure(catalog, job, run_id, backup_id, &err).await;
            return Err(err);
        }
    };
    let m = &report.manifest;
    match (run_id, claim) {
        (Some(run_id), _) => {
            // What a catalog rebuilt from the stores would say of it.
            let summary = RunSummary::of_backup(m);
            catalog
                .finish_run(
                    run_id,
                    summary.outcome,
                    summary.finished_at,
                    &summary.result(),
                )
                .await
                .map_err(BackupError::Catalog)?;
        }
        (None, Some(claim)) => {
            if let Err(e) = catalog
                .annotate(claim, backup_id, Some((m.dump_bytes(), m.stored_bytes())))
                .await
            {
                warn!(job = %job.name, error = %e, "Could not record the backup's sizes in the catalog.");
            }
        }
        (None, None) => {}
    }
    info!(
        job = %job.name,
        backup_id = %backup_id,
        dump_bytes = m.dump_bytes(),
        stored_bytes = m.stored_bytes(),
        tables = m.inventory.tables,
        rows = m.total_rows(),
        seconds = m.duration_seconds,
        stores = %report.stores.join(","),
        "Backup complete."
    );
    Ok(report)
}

/// Logs a failed or interrupted run and records it on its own row.
async fn record_failure(
    catalog: &Catalog,
    job: &JobConfig,
    run_id: Option<i64>,
    backup_id: &str,
    err: &BackupError,
) {
    let message = crate::one_line(err);
    let outcome = if matches!(err, BackupError::Interrupted) {
        warn!(job = %job.name, backup_id = %backup_id, "Backup interrupted by shutdown; its partial artifacts were removed.");
        Outcome::Interrupted
    } else {
        error!(job = %job.name, backup_id = %backup_id, error = %message, "Backup failed.");
        Outcome::Failed
    };
    if let Some(run_id) = run_id
        && let Err(e) = catalog
            .finish_run(
                run_id,
                outcome,
                Utc::now(),
                &RunResult {
                    error: Some(&message),
                    ..Default::default()
                },
            )
            .await
    {
        warn!(job = %job.name, error = %e, "Could not record the failed run in the catalog.");
    }
}

/// Aborts multipart uploads a crashed or killed earlier run of this job left
/// behind: those the catalog recorded as in flight, and those the store lists.
/// Runs of one job never overlap, so any pending upload under the job's prefix
/// is stale. Best effort: failures are logged, not fatal.
async fn abort_stale_uploads(job: &JobConfig, targets: &[Destination], catalog: &Catalog) {
    let prefix = format!("{}/", job.name);
    for t in targets {
        let mut stale: Vec<PendingUpload> = match catalog.recorded_uploads(&t.name, &prefix).await {
            Ok(r) => r
                .into_iter()
                .map(|u| PendingUpload {
                    key: u.key,
                    upload_id: u.upload_id,
                    initiated_unix: None,
                })
                .collect(),
            Err(e) => {
                warn!(job = %job.name, store = %t.name, error = %e, "Cannot read recorded uploads from the catalog.");
                Vec::new()
            }
        };
        match t.storage.pending_uploads(&prefix).await {
            Ok(listed) => {
                for u in listed {
                    if !stale.iter().any(|s| s.upload_id == u.upload_id) {
                        stale.push(u);
                    }
                }
            }
            Err(e) => debug!(job = %job.name, store = %t.name, error = %e,
                "Cannot list pending multipart uploads on this store; relying on the catalog."),
        }
        for u in stale {
            match t.storage.abort_upload(&u).await {
                Ok(()) => warn!(job = %job.name, store = %t.name, key = %u.key,
                    "Aborted a multipart upload left by an interrupted run."),
                Err(e) => warn!(job = %job.name, store = %t.name, key = %u.key, error = %e,
                    "Could not abort a stale multipart upload; will retry on the next run."),
            }
        }
    }
}
