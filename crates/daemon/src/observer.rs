//! What the daemon does with the scheduler's events: logs, metrics, the run
//! API's states, sd_notify status lines and notifications. Called on the
//! task where the event happened, so it only records and spawns.

use std::sync::Arc;

use backstop_scheduler::{Event, Outcome, RunKind};
use chrono::Utc;
use tracing::{error, info, warn};

use super::announce::RunFacts;
use super::runner::Report;
use super::{Core, RunState, sd_notify};

/// Length: one arm per scheduler event, each turning it into metrics, run
/// state and logs.
pub fn on_event(core: &Arc<Core>, event: Event<Report>) {
    // What the status page keeps of a job is read again once a run of it
    // started, retried or ended here (its catalog rows have changed).
    if let Event::Started { job, .. } | Event::Retrying { job, .. } | Event::Finished { job, .. } =
        &event
    {
        core.status.changed(job);
    }
    match &event {
        Event::Started {
            job, attempt: 1, ..
        } => core.status.run_began(job),
        Event::Finished { job, .. } => core.status.run_ended(job),
        _ => {}
    }
    match event {
        Event::Queued {
            id,
            job,
            kind: _,
            trigger,
        } => core.set_run(RunState {
            id,
            job,
            trigger: trigger.as_str().to_string(),
            state: "queued".into(),
            attempts: 0,
            backup_id: None,
            error: None,
            queued_at: Utc::now(),
            started_at: None,
            finished_at: None,
        }),
        Event::WaitingForSlot { job, max, .. } => {
            info!(job = %job, max_concurrent_jobs = max, "Waiting for a free slot: the maximum number of runs is going.");
        }
        Event::Started {
            id,
            job,
            kind,
            attempt,
        } => {
            core.update_run(id, |r| {
                r.state = "running".into();
                r.attempts = attempt;
                r.started_at.get_or_insert_with(Utc::now);
            });
            if attempt == 1 {
                core.metrics
                    .running
                    .with_label_values(&[&job, kind.as_str()])
                    .set(1);
                if kind == RunKind::Backup {
                    let config = core.config();
                    if let Some(job_cfg) = config.job(&job) {
                        core.announce_start(&config, job_cfg);
                    }
                }
                sd_notify::notify(&match kind {
                    RunKind::Verify => format!("STATUS=verifying the latest backup of job {job}"),
                    _ => format!("STATUS=running {} of job {job}", kind.as_str()),
                });
            }
        }
        Event::Retrying {
            id,
            job,
            kind,
            attempt,
            wait,
            error,
        } => {
            warn!(job = %job, attempt, retry_in = %humantime::format_duration(wait), error = %error, "Backup failed with a transient error; retrying.");
            core.metrics
                .runs
                .with_label_values(&[&job, kind.as_str(), "failed"])
                .inc();
            core.update_run(id, |r| r.error = Some(error));
        }
        Event::Skipped {
            job,
            kind,
            trigger,
            running,
        } if core.fleet.is_some()
            && matches!(
                trigger,
                backstop_scheduler::Trigger::Schedule | backstop_scheduler::Trigger::Fleet
            ) =>
        {
            // In a fleet the tick is the catalog's: it stays pending for
            // whichever node is free, and the catalog records (and counts)
            // a tick that is really skipped.
            tracing::debug!(job = %job, kind = kind.as_str(), trigger = trigger.as_str(), running_run = running, "This node is busy with the job; the pending run waits for a claim.");
        }
        Event::Skipped {
            job,
            kind,
            trigger,
            running,
        } => {
            warn!(
                job = %job,
                kind = kind.as_str(),
                trigger = trigger.as_str(),
                running_run = running,
                "Skipping this run: the previous run of the job is still going (runs of one job never overlap)."
            );
            core.metrics
                .runs
                .with_label_values(&[&job, kind.as_str(), "skipped"])
                .inc();
            core.metrics
                .skipped
                .with_label_values(&[&job, kind.as_str()])
                .inc();
        }
        Event::Finished {
            id,
            job,
            kind,
            outcome,
            attempts,
            error,
            report,
            elapsed,
            ..
        } => finished(
            core, id, &job, kind, outcome, attempts, error, report, elapsed,
        ),
        Event::NextRun { job, kind, at } => {
            core.metrics
                .next_run
                .with_label_values(&[&job, kind.as_str()])
                .set(at.timestamp() as f64);
        }
        Event::ScheduleEnded { job, kind } => {
            warn!(job = %job, kind = kind.as_str(), "The schedule never fires again.");
        }
        Event::CatchingUp {
            job, last_success, ..
        } => {
            info!(job = %job, last_success = ?last_success, "Catching up: the last successful backup is older than the schedule's interval; running once now.");
        }
        Event::ClaimedElsewhere { id, job, kind } => {
            lock_runs_remove(core, id);
            tracing::debug!(job = %job, kind = kind.as_str(), "Another node has this run.");
        }
        Event::MissedTicks {
            job,
            kind,
            skipped,
            running,
            new_job,
        } => {
            if new_job {
                info!(job = %job, kind = kind.as_str(), "New to the fleet: not backfilled; the job starts with its next tick.");
            } else {
                info!(job = %job, kind = kind.as_str(), skipped, running = ?running, "Ticks were missed while no node was running: the newest runs now, older ones are recorded as skipped.");
            }
        }
        Event::LedgerUnavailable { job, error, .. } => {
            warn!(job = %job, error = %error, "Cannot read the last success from the catalog; no catch-up.");
        }
    }
}

/// Length: a finished run's metrics, state, logs and notification, one after
/// another for each outcome.
#[allow(clippy::too_many_arguments)]
fn finished(
    core: &Arc<Core>,
    id: u64,
    job: &str,
    kind: RunKind,
    outcome: Outcome,
    attempts: u32,
    error: Option<String>,
    report: Option<Report>,
    elapsed: std::time::Duration,
) {
    let k = kind.as_str();
    let m = &core.metrics;
    m.running.with_label_values(&[job, k]).set(0);
    if !matches!(outcome, Outcome::Interrupted | Outcome::Skipped) {
        m.duration
            .with_label_values(&[job, k])
            .observe(elapsed.as_secs_f64());
    }
    m.runs.with_label_values(&[job, k, outcome.as_str()]).inc();
    let now = Utc::now().timestamp() as f64;
    match outcome {
        Outcome::Success => {
            m.last_success.with_label_values(&[job, k]).set(now);
            if kind == RunKind::Verify {
                m.verify_last_success.with_label_values(&[job]).set(now);
            }
        }
        Outcome::Failed => {
            m.last_failure.with_label_values(&[job, k]).set(now);
            if kind == RunKind::Backup {
                error!(job = %job, attempts, error = error.as_deref().unwrap_or(""), "Backup failed; no retries left.");
            }
        }
        _ => {}
    }
    let state = core.run_state(id);
    let mut facts = RunFacts {
        started_at: state
            .as_ref()
            .and_then(|s| s.started_at)
            .unwrap_or_else(Utc::now),
        attempts: attempts.max(1),
        error: error.clone(),
        backup_id: None,
        dump_bytes: None,
        stored_bytes: None,
        stores: Vec::new(),
    };
    if let Some(Report::Backup {
        backup_id,
        dump_bytes,
        stored_bytes,
        stores,
        suspect,
    }) = &report
    {
        m.last_size
            .with_label_values(&[job, "dump"])
            .set(*dump_bytes as f64);
        m.last_size
            .with_label_values(&[job, "stored"])
            .set(*stored_bytes as f64);
        m.bytes_total
            .with_label_values(&[job])
            .inc_by(stored_bytes * stores.len() as u64);
        facts.backup_id = Some(backup_id.clone());
        facts.dump_bytes = Some(*dump_bytes);
        facts.stored_bytes = Some(*stored_bytes);
        facts.stores.clone_from(stores);
        facts.error.clone_from(suspect);
    }
    let config = core.config();
    if let Some(job_cfg) = config.job(job) {
        if facts.stores.is_empty() {
            facts.stores.clone_from(&job_cfg.storage);
        }
        // Spawned before the run is reported finished: whoever sees the end
        // of a run can rely on its notification being under way.
        core.announce(&config, job_cfg, kind, outcome, facts.clone());
    }
    core.update_run(id, |r| {
        r.state = outcome.as_str().into();
        r.finished_at = Some(Utc::now());
        r.attempts = attempts.max(r.attempts);
        r.backup_id.clone_from(&facts.backup_id);
        r.error = match (outcome, &report) {
            (Outcome::Success, _) => None,
            (
                Outcome::Suspect,
                Some(Report::Backup {
                    suspect: Some(why), ..
                }),
            ) => Some(format!("suspect: {why}")),
            _ => error.clone().or(r.error.take()),
        };
    });
    sd_notify::notify(&format!(
        "STATUS=idle; last run: {} {k} of job {job}",
        outcome.as_str()
    ));
}

/// A run another node took is not this node's to report.
fn lock_runs_remove(core: &Core, id: u64) {
    core.forget_run(id);
}
