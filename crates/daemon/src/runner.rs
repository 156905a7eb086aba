//! The scheduler's [`Runner`] and [`Ledger`] over the pipeline and the
//! catalog: one backup, scheduled verify or prune of one job per attempt.

use std::sync::Arc;

use backstop_config::{Config, JobConfig};
use backstop_pipeline::select::SelectError;
use backstop_pipeline::verify::{VerifyError, VerifyRequest, verify_job_in};
use backstop_pipeline::{BackupError, one_line, run_backup_until};
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
                r = verify_latest(&core.catalog, &config, &job) => r,
                () = cancel.cancelled() => Attempt::Interrupted,
            },
            RunKind::Prune => {
                let r = self.prune(&config, &job).await;
                core.refresh_storage(&config, &job).await;
                r
            }
        }
    }
}

impl JobRunner {
    async fn backup(
        &self,
        config: &Config,
        job: &JobConfig,
        cancel: &CancellationToken,
        run: &RunCtx,
    ) -> Attempt<Report> {
        match run_backup_until(config, job, &self.core.catalog, cancel, run.claim.as_ref()).await {
            Ok(report) => {
                let m = &report.manifest;
                self.core.refresh_storage(config, job).await;
                Attempt::Done {
                    outcome: if m.suspect.is_some() {
                        Outcome::Suspect
                    } else {
                        Outcome::Success
                    },
                    report: Report::Backup {
                        backup_id: m.backup_id.clone(),
                        dump_bytes: m.dump_bytes(),
                        stored_bytes: m.stored_bytes(),
                        stores: report.stores.clone(),
                        suspect: m.suspect.clone(),
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
    let req = VerifyRequest::scheduled(v.level);
    match verify_job_in(catalog, config, job, &req, &mut |_, _| {}).await {
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
        // Regression (issue 12): a verify scheduled before the job's first
        // backup counted as a failed verification (and paged).
        Err(e @ VerifyError::Select(SelectError::NoBackup { .. })) => {
            info!(job = %job.name, reason = %e, "No backup to verify yet; skipped.");
            Attempt::Done {
                outcome: Outcome::Skipped,
                report: Report::Nothing,
                then: None,
            }
        }
        Err(e) => {
            let e = one_line(&e);
            error!(job = %job.name, error = %e, "Scheduled verification could not run.");
            Attempt::Failed {
                error: e,
                retryable: false,
            }
        }
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
