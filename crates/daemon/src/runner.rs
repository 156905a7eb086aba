//! The scheduler's [`Runner`] and [`Ledger`] over the pipeline and the
//! catalog: one backup, scheduled verify or prune of one job per attempt.

use std::sync::Arc;

use backstop_config::{Config, JobConfig};
use backstop_pipeline::backup::cluster::{ClusterReport, Ran, resume_job_backup};
use backstop_pipeline::read::select::SelectError;
use backstop_pipeline::read::verify::{VerifyError, VerifyRequest, verify_job_in};
use backstop_pipeline::{BackupError, one_line};
use backstop_scheduler::{Attempt, Outcome, RunCtx, RunKind, Runner, Timetable};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::Core;

/// What a finished run hands to the observer.
#[derive(Debug, Clone)]
pub enum Report {
    Backup {
        backup_id: String,
        dump_bytes: u64,
        stored_bytes: u64,
        /// The stores the backup is complete in.
        stores: Vec<String>,
        suspect: Option<String>,
    },
    Verify,
    Prune,
    /// Nothing to do (a verify before the first backup).
    Nothing,
}

/// A job's cron schedule in its time zone, as the scheduler's timetable.
pub struct Cron {
    pub schedule: backstop_config::Schedule,
    pub tz: Tz,
}

impl Timetable for Cron {
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.next_after(after, self.tz)
    }
}

pub struct JobRunner {
    pub core: Arc<Core>,
    /// Per job, the failed attempt of a cluster run waiting for its retry
    /// (by the scheduler's run id): the retry keeps what it completed.
    retried: std::sync::Mutex<std::collections::HashMap<String, (u64, Box<ClusterReport>)>>,
}

impl Runner for JobRunner {
    type Report = Report;

    async fn run(&self, run: &RunCtx, cancel: CancellationToken) -> Attempt<Report> {
        let core = &self.core;
        // Each attempt reads the config in force (a reload between retries
        // applies to the next attempt).
        let config = core.config();
        let Some(job) = config.job(&run.job).cloned() else {
            return Attempt::Failed {
                error: format!("job \"{}\" was removed by a reload", run.job),
                retryable: false,
            };
        };
        if run.attempt == 1 {
            core.load_last_outcome(&job.name, run.kind).await;
        }
        #[cfg(feature = "test-standin")]
        if let Some(r) = standin::run(core, run, &cancel).await {
            return r;
        }
        match run.kind {
            RunKind::Backup => self.backup(&config, &job, &cancel, run).await,
            RunKind::Verify => tokio::select! {
                r = verify_latest(&core.catalog, &config, &job) => {
                    core.refresh_drill(&job).await;
                    r
                }
                () = cancel.cancelled() => Attempt::Interrupted,
            },
            // Cancelled between deletes when the node loses its lease or the
            // daemon's grace runs out (prune deletes manifest first, so what
            // a cut leaves is an incomplete backup the next prune removes).
            RunKind::Prune => {
                let r = tokio::select! {
                    r = self.prune(&config, &job) => r,
                    () = cancel.cancelled() => Attempt::Interrupted,
                };
                core.refresh_storage(&config, &job).await;
                r
            }
        }
    }
}

impl JobRunner {
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            retried: std::sync::Mutex::default(),
        }
    }

    /// The failed attempt `run` retries, if it was a cluster run's (an
    /// entry of another run of the job is stale and dropped).
    fn earlier_attempt(&self, job: &str, run: &RunCtx) -> Option<Box<ClusterReport>> {
        let mut retried = self
            .retried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match retried.remove(job) {
            Some((id, report)) if id == run.id && run.attempt > 1 => Some(report),
            _ => None,
        }
    }

    async fn backup(
        &self,
        config: &Config,
        job: &JobConfig,
        cancel: &CancellationToken,
        run: &RunCtx,
    ) -> Attempt<Report> {
        let earlier = self.earlier_attempt(&job.name, run);
        let result = resume_job_backup(
            config,
            job,
            &self.core.catalog,
            cancel,
            run.claim.as_ref(),
            earlier,
        )
        .await;
        let blocks = match &result {
            Ok(ran) => ran.lock_blocks(),
            Err(BackupError::Yielded(_)) => 1,
            Err(_) => 0,
        };
        self.core
            .metrics
            .lock_blocks
            .with_label_values(&[&job.name])
            .inc_by(u64::from(blocks));
        match result {
            // Some databases failed, the others are complete: a retry
            // dumps only the databases that failed.
            Ok(Ran::Cluster(c)) if !c.failures().is_empty() => {
                self.core.refresh_storage(config, job).await;
                self.core.observe_cluster(job, &c);
                let retryable = c.retryable();
                let error = c.failure_line();
                if retryable {
                    self.retried
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(job.name.clone(), (run.id, Box::new(c)));
                }
                Attempt::Failed { retryable, error }
            }
            Ok(ran) => {
                if let Some(r) = ran.replay() {
                    let m = &self.core.metrics;
                    m.replay_lag
                        .with_label_values(&[&job.name])
                        .set(r.lag_bytes as f64);
                    m.replay_paused
                        .with_label_values(&[&job.name])
                        .set(r.paused_seconds);
                }
                self.core.refresh_storage(config, job).await;
                if let Ran::Cluster(c) = &ran {
                    self.core.observe_cluster(job, c);
                }
                let summary = ran.summary();
                Attempt::Done {
                    outcome: summary.outcome,
                    report: Report::Backup {
                        backup_id: ran.backup_id().to_string(),
                        dump_bytes: summary.dump_bytes,
                        stored_bytes: summary.stored_bytes,
                        stores: ran.stores(),
                        suspect: summary.error,
                    },
                    // Retention runs after a successful backup, never after a
                    // failed one.
                    then: job.retention.is_some().then_some(RunKind::Prune),
                }
            }
            // A lost claim is the node that reaped it's to run again.
            Err(BackupError::Interrupted | BackupError::LostClaim(_)) => Attempt::Interrupted,
            Err(e) => Attempt::Failed {
                retryable: e.is_retryable(),
                error: one_line(&e),
            },
        }
    }

    /// Applies the job's retention to each of its stores.
    async fn prune(&self, config: &Config, job: &JobConfig) -> Attempt<Report> {
        let Some(retention) = &job.retention else {
            return Attempt::Failed {
                error: "the job has no retention policy".into(),
                retryable: false,
            };
        };
        let reports = match backstop_pipeline::prune::prune_job(
            config,
            job,
            retention,
            &self.core.catalog,
            &job.storage,
            false,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Failed {
                    error: format!("{e:#}"),
                    retryable: false,
                };
            }
        };
        let mut problems = Vec::new();
        let mut stores = Vec::new();
        for (store, r) in reports {
            match r {
                Ok(rep) => {
                    info!(job = %job.name, store, deleted = rep.deleted.len(), kept = rep.plan.kept().count(), locked = rep.locked.len(), orphans = rep.orphans.len(), skipped = rep.skipped.len(), "Retention applied.");
                    if !rep.skipped.is_empty() {
                        problems.push(format!(
                            "{store}: {} object(s) could not be deleted",
                            rep.skipped.len()
                        ));
                    }
                    stores.push((store, rep.deleted.len(), rep.locked.len()));
                }
                Err(e) => {
                    error!(job = %job.name, store, error = %e, "Prune failed; nothing was deleted in this store.");
                    problems.push(e.to_string());
                }
            }
        }
        // What was deleted is counted even when another store failed.
        self.core.count_pruned(&job.name, &stores);
        if problems.is_empty() {
            Attempt::Done {
                outcome: Outcome::Success,
                report: Report::Prune,
                then: None,
            }
        } else {
            Attempt::Failed {
                error: problems.join("; "),
                retryable: false,
            }
        }
    }
}

/// The job's scheduled verification of its latest backup in every store.
async fn verify_latest(
    catalog: &backstop_catalog::Catalog,
    config: &Config,
    job: &JobConfig,
) -> Attempt<Report> {
    let Some(v) = &job.verify else {
        return Attempt::Failed {
            error: "the job has no verify settings".into(),
            retryable: false,
        };
    };
    // Level restore is the restore drill: every database of the job's
    // latest run restored into scratch databases, timed (the measured RTO).
    if v.level == backstop_config::VerifyLevel::Restore {
        return scheduled_drill(catalog, config, job).await;
    }
    let req = VerifyRequest::scheduled(v.level);
    let checks = match job.cluster {
        None => verify_job_in(catalog, config, job, &req, &mut |_, _| {}).await,
        Some(_) => verify_cluster(catalog, config, job, &req).await,
    };
    match checks {
        Ok(checks) => {
            let bad: Vec<String> = checks
                .iter()
                .filter(|(_, c)| !c.ok)
                .map(|(store, c)| format!("{store}: {} {} failed", c.backup_id, c.level))
                .collect();
            if bad.is_empty() {
                info!(job = %job.name, level = v.level.as_str(), checked = checks.len(), "Scheduled verification passed.");
                Attempt::Done {
                    outcome: Outcome::Success,
                    report: Report::Verify,
                    then: None,
                }
            } else {
                error!(job = %job.name, level = v.level.as_str(), failures = %bad.join("; "), "Scheduled verification FAILED; see `backstop list` and the catalog for details.");
                Attempt::Failed {
                    error: bad.join("; "),
                    retryable: false,
                }
            }
        }
        Err(e) => could_not_verify(job, "verification", e),
    }
}

/// A scheduled verification (or drill) that could not run. Regression
/// (issue 12): one scheduled before the job's first backup counted as a
/// failed verification (and paged); it is skipped.
fn could_not_verify(job: &JobConfig, what: &str, e: VerifyError) -> Attempt<Report> {
    if let VerifyError::Select(SelectError::NoBackup { .. }) = e {
        info!(job = %job.name, reason = %e, "No backup to check yet; the scheduled {what} is skipped.");
        return Attempt::Done {
            outcome: Outcome::Skipped,
            report: Report::Nothing,
            then: None,
        };
    }
    let e = one_line(&e);
    error!(job = %job.name, error = %e, "Scheduled {what} could not run.");
    Attempt::Failed {
        error: e,
        retryable: false,
    }
}

/// Every series of a cluster job (its globals and each database with
/// backups), verified as one job's.
async fn verify_cluster(
    catalog: &backstop_catalog::Catalog,
    config: &Config,
    job: &JobConfig,
    req: &VerifyRequest,
) -> Result<Vec<(String, backstop_pipeline::read::verify::BackupCheck)>, VerifyError> {
    let store = job.storage.first().cloned().unwrap_or_default();
    let backend = backstop_pipeline::store::Store::open(config, &store)
        .await
        .map_err(|m| VerifyError::Select(SelectError::OpenStore(m)))?;
    let series = backend
        .series(job)
        .await
        .map_err(|source| VerifyError::Select(SelectError::List { store, source }))?;
    if series.is_empty() {
        return Err(VerifyError::Select(SelectError::NoBackup {
            which: "latest".into(),
            job: job.name.clone(),
            store: job.storage.join(", "),
        }));
    }
    let mut all = Vec::new();
    for member in &series {
        all.extend(verify_job_in(catalog, config, member, req, &mut |_, _| {}).await?);
    }
    Ok(all)
}

/// The scheduled restore drill of a job with `verify = { level = "restore" }`.
async fn scheduled_drill(
    catalog: &backstop_catalog::Catalog,
    config: &Config,
    job: &JobConfig,
) -> Attempt<Report> {
    let req = backstop_pipeline::read::recovery::DrillRequest {
        storage: None,
        server: None,
        identity: None,
        parallel: None,
    };
    match backstop_pipeline::read::recovery::drill(catalog, config, job, &req).await {
        Ok(d) if d.ok => {
            info!(job = %job.name, seconds = d.seconds, databases = d.checks.len(), "Scheduled restore drill passed.");
            if let Some(rto) = d.rto_seconds
                && d.seconds > rto
            {
                tracing::warn!(job = %job.name, seconds = d.seconds, rto_seconds = rto, "The restore drill took longer than the job's rto.");
            }
            Attempt::Done {
                outcome: Outcome::Success,
                report: Report::Verify,
                then: None,
            }
        }
        Ok(d) => {
            let error = if d.problems.is_empty() {
                "the drill restored nothing".to_string()
            } else {
                d.problems.join("; ")
            };
            error!(job = %job.name, failures = %error, "Scheduled restore drill FAILED.");
            Attempt::Failed {
                error,
                retryable: false,
            }
        }
        Err(e) => could_not_verify(job, "restore drill", e),
    }
}

/// The test build's stand-in for a whole backup (feature `test-standin`,
/// env `BACKSTOP_TEST_STANDIN=FILE`): the fleet tests run dozens of jobs on
/// three daemons, which real dumps would not fit on a small machine. It
/// sleeps 1–5 s (`BACKSTOP_TEST_STANDIN_MS=MIN-MAX` to change that),
/// honouring cancellation, then checks its claim exactly as a backup does
/// before its manifest, and only then appends "node job tick attempt run"
/// to FILE: what the tests count as published.
#[cfg(feature = "test-standin")]
mod standin {
    use std::io::Write;

    use super::*;

    pub async fn run(
        core: &Core,
        run: &RunCtx,
        cancel: &CancellationToken,
    ) -> Option<Attempt<Report>> {
        let file = std::env::var_os("BACKSTOP_TEST_STANDIN")?;
        if run.kind != RunKind::Backup {
            return None;
        }
        let (lo, hi) = std::env::var("BACKSTOP_TEST_STANDIN_MS")
            .ok()
            .and_then(|s| {
                let (a, b) = s.split_once('-')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            })
            .unwrap_or((1000, 5000));
        let ms = lo + rand::random::<u64>() % (hi - lo + 1);
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
            () = cancel.cancelled() => return Some(Attempt::Interrupted),
        }
        let (node, tick, run_id) = match &run.claim {
            Some(c) => {
                if !core.catalog.fence(c).await.unwrap_or(false) {
                    tracing::warn!(job = %run.job, run = c.run, "Stand-in: the claim is gone; publishing nothing.");
                    return Some(Attempt::Interrupted);
                }
                (
                    c.node.clone(),
                    c.scheduled_for
                        .map_or_else(|| "-".to_string(), |t| t.to_rfc3339()),
                    c.run,
                )
            }
            None => ("-".into(), "-".into(), 0),
        };
        let line = format!("{node} {} {tick} {} {run_id}\n", run.job, run.attempt);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .expect("stand-in record file");
        f.write_all(line.as_bytes()).expect("stand-in record");
        Some(Attempt::Done {
            outcome: Outcome::Success,
            report: Report::Nothing,
            then: None,
        })
    }
}
