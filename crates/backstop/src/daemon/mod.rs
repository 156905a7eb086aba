//! `backstop run`: the daemon. Schedules every job from its cron expression in
//! its time zone, runs at most `max_concurrent_jobs` at once, never overlaps a
//! job with itself, retries transient failures, catches up a missed run once
//! at start, reloads on SIGHUP, drains on SIGTERM, and serves /metrics,
//! /healthz, /readyz and the run API.
//!
//! Fire times come from [`backstop_config::Schedule::next_after`] (croner with
//! chrono-tz, table-tested across DST changes); the daemon only sleeps until
//! them on tokio's clock. tokio-cron-scheduler, the scheduler first
//! specified, has open time-zone/DST bugs and would own the clock, so it is
//! not used.

mod http;
mod metrics;
pub mod notify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backstop_catalog::Catalog;
use backstop_config::{Config, JobConfig};
use backstop_pipeline::{BackupError, run_backup_until};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use metrics::Metrics;

/// The state of one run started by the daemon, as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    pub id: u64,
    pub job: String,
    pub trigger: String,
    /// queued | running | success | suspect | failed | interrupted
    pub state: String,
    pub attempts: u32,
    pub backup_id: Option<String>,
    pub error: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub struct Daemon {
    config_path: PathBuf,
    config: RwLock<Arc<Config>>,
    catalog: Catalog,
    slots: Arc<Semaphore>,
    max_slots: usize,
    /// Jobs with a run queued or going, by name.
    busy: Mutex<HashMap<String, u64>>,
    runs: Mutex<HashMap<u64, RunState>>,
    next_id: AtomicU64,
    pub metrics: Metrics,
    /// Cancels running backups (after the shutdown grace).
    cancel_runs: CancellationToken,
    /// Stops the schedule of the current config (replaced on reload).
    schedule_stop: Mutex<CancellationToken>,
    /// Finished when no run is queued or going.
    idle: tokio::sync::Notify,
    /// The final outcome of each job's last run, by "job/kind": what tells
    /// a recovery from an ordinary success. Filled from the catalog on a
    /// job's first run, then kept here (retried attempts are not final).
    last_outcome: Mutex<HashMap<String, String>>,
    /// Notifications being sent; shutdown waits a little for them.
    notifications: tokio_util::task::TaskTracker,
}

/// What a finished run leaves for its notification.
struct RunFacts {
    started_at: DateTime<Utc>,
    attempts: u32,
    /// A failure's error, or why a backup is suspect.
    error: Option<String>,
    backup_id: Option<String>,
    dump_bytes: Option<u64>,
    stored_bytes: Option<u64>,
    stores: Vec<String>,
}

impl RunFacts {
    /// A run of `job` starting now.
    fn starting(job: &JobConfig) -> Self {
        Self {
            started_at: Utc::now(),
            attempts: 1,
            error: None,
            backup_id: None,
            dump_bytes: None,
            stored_bytes: None,
            stores: job.storage.clone(),
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Backup,
    Verify,
    Prune,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Backup => "backup",
            Kind::Verify => "verify",
            Kind::Prune => "prune",
        }
    }
}

/// Why a run was not started.
#[derive(Debug)]
pub enum TriggerError {
    UnknownJob,
    AlreadyRunning(u64),
    ShuttingDown,
}

impl Daemon {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts a backup of `job` now, unless one is queued or going.
    pub fn trigger(self: &Arc<Self>, job: &str, trigger: &str) -> Result<u64, TriggerError> {
        self.trigger_kind(job, Kind::Backup, trigger)
    }

    /// Starts a run of `kind` of `job` now, unless one is queued or going.
    fn trigger_kind(
        self: &Arc<Self>,
        job: &str,
        kind: Kind,
        trigger: &str,
    ) -> Result<u64, TriggerError> {
        if self.cancel_runs.is_cancelled() {
            return Err(TriggerError::ShuttingDown);
        }
        let config = self.config();
        let Some(job_cfg) = config.job(job).cloned() else {
            return Err(TriggerError::UnknownJob);
        };
        let key = format!("{job}/{}", kind.as_str());
        let id = {
            let mut busy = self
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(running) = busy.get(&key) {
                warn!(
                    job,
                    kind = kind.as_str(),
                    trigger,
                    running_run = running,
                    "Skipping this run: the previous run of the job is still going (runs of one job never overlap)."
                );
                self.metrics
                    .runs
                    .with_label_values(&[job, kind.as_str(), "skipped"])
                    .inc();
                self.metrics
                    .skipped
                    .with_label_values(&[job, kind.as_str()])
                    .inc();
                return Err(TriggerError::AlreadyRunning(*running));
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            busy.insert(key.clone(), id);
            id
        };
        self.set_run(RunState {
            id,
            job: job.to_string(),
            trigger: trigger.to_string(),
            state: "queued".into(),
            attempts: 0,
            backup_id: None,
            error: None,
            queued_at: Utc::now(),
            finished_at: None,
        });
        let me = self.clone();
        tokio::spawn(async move {
            me.run_job(id, kind, key, config, job_cfg).await;
        });
        Ok(id)
    }

    fn set_run(&self, r: RunState) {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(r.id, r);
    }

    fn update_run(&self, id: u64, f: impl FnOnce(&mut RunState)) {
        if let Some(r) = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&id)
        {
            f(r);
        }
    }

    pub fn run_state(&self, id: u64) -> Option<RunState> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    async fn run_job(
        self: Arc<Self>,
        id: u64,
        kind: Kind,
        key: String,
        config: Arc<Config>,
        job: JobConfig,
    ) {
        let name = job.name.clone();
        let k = kind.as_str();
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                info!(job = %name, max_concurrent_jobs = self.max_slots, "Waiting for a free slot: the maximum number of runs is going.");
                tokio::select! {
                    p = self.slots.clone().acquire_owned() => p.ok(),
                    () = self.cancel_runs.cancelled() => None,
                }
            }
        };
        let gauge = self.metrics.running.with_label_values(&[&name, k]);
        let started = std::time::Instant::now();
        let mut facts = RunFacts::starting(&job);
        self.load_last_outcome(&name, kind).await;
        if kind == Kind::Backup && job.retention.is_some() {
            self.load_last_outcome(&name, Kind::Prune).await;
        }
        let mut outcome = "interrupted";
        if permit.is_some() && kind == Kind::Prune {
            gauge.set(1);
            self.update_run(id, |r| {
                r.state = "running".into();
                r.attempts = 1;
            });
            let (o, error) = self.prune(&config, &job).await;
            outcome = o;
            self.update_run(id, |r| r.error = error);
            gauge.set(0);
        } else if permit.is_some() && kind == Kind::Verify {
            gauge.set(1);
            self.update_run(id, |r| {
                r.state = "running".into();
                r.attempts = 1;
            });
            notify::notify(&format!("STATUS=verifying the latest backup of job {name}"));
            let (o, error) = tokio::select! {
                r = self.verify_latest(&config, &job) => r,
                () = self.cancel_runs.cancelled() => ("interrupted", Some("interrupted by shutdown".to_string())),
            };
            outcome = o;
            self.update_run(id, |r| r.error = error);
            gauge.set(0);
        } else if permit.is_some() {
            gauge.set(1);
            self.update_run(id, |r| r.state = "running".into());
            notify::notify(&format!("STATUS=running backup of job {name}"));
            let mut attempt = 0;
            loop {
                attempt += 1;
                self.update_run(id, |r| r.attempts = attempt);
                let result =
                    run_backup_until(&config, &job, &self.catalog, &self.cancel_runs).await;
                match result {
                    Ok(report) => {
                        let m = &report.manifest;
                        outcome = if m.suspect.is_some() {
                            "suspect"
                        } else {
                            "success"
                        };
                        if let Some(why) = &m.suspect {
                            let why = why.clone();
                            self.update_run(id, |r| r.error = Some(format!("suspect: {why}")));
                        }
                        let bid = m.backup_id.clone();
                        self.update_run(id, |r| r.backup_id = Some(bid));
                        facts.error.clone_from(&m.suspect);
                        facts.dump_bytes = Some(m.dump_bytes());
                        facts.stored_bytes = Some(m.stored_bytes());
                        facts.stores.clone_from(&report.stores);
                        self.metrics
                            .last_size
                            .with_label_values(&[&name, "dump"])
                            .set(m.dump_bytes() as f64);
                        self.metrics
                            .last_size
                            .with_label_values(&[&name, "stored"])
                            .set(m.stored_bytes() as f64);
                        self.metrics
                            .bytes_total
                            .with_label_values(&[&name])
                            .inc_by(m.stored_bytes() * report.stores.len() as u64);
                        // Retention runs after a successful backup, never after a failed one.
                        if job.retention.is_some() {
                            let mut prune_facts = RunFacts::starting(&job);
                            let (o, error) = self.prune(&config, &job).await;
                            self.metrics
                                .runs
                                .with_label_values(&[&name, "prune", o])
                                .inc();
                            // Regression (issue 12, item 6): only counted, so
                            // BackstopRetentionNotRunning saw no prune succeed.
                            self.record_finish(&name, Kind::Prune, o);
                            prune_facts.error = error;
                            self.announce(&config, &job, Kind::Prune, o, prune_facts);
                        }
                        break;
                    }
                    Err(BackupError::Interrupted) => {
                        outcome = "interrupted";
                        self.update_run(id, |r| r.error = Some("interrupted by shutdown".into()));
                        break;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        self.update_run(id, |r| r.error = Some(msg.clone()));
                        outcome = "failed";
                        if !e.is_retryable() || attempt > job.retries {
                            error!(job = %name, attempts = attempt, error = %msg, "Backup failed; no retries left.");
                            break;
                        }
                        let wait = job.retry_backoff * 2u32.saturating_pow(attempt - 1);
                        warn!(job = %name, attempt, retry_in = %humantime::format_duration(wait), error = %msg, "Backup failed with a transient error; retrying.");
                        self.metrics
                            .runs
                            .with_label_values(&[&name, "backup", "failed"])
                            .inc();
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = self.cancel_runs.cancelled() => { outcome = "interrupted"; break; }
                        }
                    }
                }
            }
            gauge.set(0);
        }
        drop(permit);
        let now = Utc::now();
        if outcome != "interrupted" {
            self.metrics
                .duration
                .with_label_values(&[&name, k])
                .observe(started.elapsed().as_secs_f64());
        }
        if kind == Kind::Verify && outcome == "success" {
            self.metrics
                .verify_last_success
                .with_label_values(&[&name])
                .set(now.timestamp() as f64);
        }
        if kind != Kind::Verify && matches!(outcome, "success" | "suspect") {
            self.refresh_storage(&config, &job).await;
        }
        self.metrics
            .runs
            .with_label_values(&[&name, k, outcome])
            .inc();
        self.record_finish(&name, kind, outcome);
        // Spawned before the run is reported finished: whoever sees the end
        // of a run can rely on its notification being under way.
        if let Some(r) = self.run_state(id) {
            if outcome == "failed" {
                facts.error = r.error;
            }
            facts.attempts = r.attempts.max(1);
            facts.backup_id = r.backup_id;
            self.announce(&config, &job, kind, outcome, facts);
        }
        self.update_run(id, |r| {
            r.state = outcome.into();
            r.finished_at = Some(now);
            if outcome == "success" {
                r.error = None;
            }
        });
        let idle = {
            let mut busy = self
                .busy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            busy.remove(&key);
            busy.is_empty()
        };
        notify::notify(&format!(
            "STATUS=idle; last run: {outcome} {k} of job {name}"
        ));
        if idle {
            self.idle.notify_waiters();
        }
    }

    /// Moves the job's last success or last failure gauge for a run of
    /// `kind` that ended now with `outcome`.
    fn record_finish(&self, job: &str, kind: Kind, outcome: &str) {
        let gauge = match outcome {
            "success" => &self.metrics.last_success,
            "failed" => &self.metrics.last_failure,
            _ => return,
        };
        gauge
            .with_label_values(&[job, kind.as_str()])
            .set(Utc::now().timestamp() as f64);
    }

    /// Reads the job's last final outcome of `kind` from the catalog, once.
    async fn load_last_outcome(&self, job: &str, kind: Kind) {
        let key = format!("{job}/{}", kind.as_str());
        let known = self
            .last_outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&key);
        if known {
            return;
        }
        match self.catalog.last_outcome(job, kind.as_str()).await {
            Ok(Some(o)) => {
                self.last_outcome
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key)
                    .or_insert_with(|| o.as_str().to_string());
            }
            Ok(None) => {}
            Err(e) => {
                warn!(job, kind = kind.as_str(), error = %e, "Cannot read the last outcome from the catalog; a recovery may be reported as a plain success.");
            }
        }
    }

    /// Records a run's final outcome and, when it is worth telling (a
    /// failure, a suspect backup, a recovery, or a success someone asked
    /// for), sends it to the job's notifiers on a task of its own: a slow or
    /// broken receiver never holds up a run.
    fn announce(
        self: &Arc<Self>,
        config: &Arc<Config>,
        job: &JobConfig,
        kind: Kind,
        outcome: &str,
        facts: RunFacts,
    ) {
        if matches!(outcome, "interrupted" | "skipped") {
            return;
        }
        let previous = self
            .last_outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                format!("{}/{}", job.name, kind.as_str()),
                outcome.to_string(),
            );
        let Some(event_kind) = backstop_notify::classify(outcome, previous.as_deref()) else {
            return;
        };
        if job.notify.is_empty() {
            return;
        }
        let now = Utc::now();
        let mut event = backstop_notify::Event::new(
            event_kind,
            &job.name,
            kind.as_str(),
            outcome,
            facts.started_at,
            now,
        );
        event.error = facts.error;
        event.attempts = facts.attempts;
        event.dump_bytes = facts.dump_bytes;
        event.stored_bytes = facts.stored_bytes;
        event.storage = facts.stores;
        event.previous_outcome = previous;
        event.backup_id = facts.backup_id;
        let (me, config, job) = (self.clone(), config.clone(), job.clone());
        self.notifications.spawn(async move {
            let label = event_kind.as_str();
            for sent in crate::notifications::send(&config, &job, event).await {
                let counter = if sent.result.is_ok() {
                    &me.metrics.notifications_sent
                } else {
                    &me.metrics.notifications_failed
                };
                counter.with_label_values(&[&job.name, label]).inc();
            }
        });
    }

    /// The job's scheduled verification of its latest backup in every store.
    async fn verify_latest(
        &self,
        config: &Config,
        job: &JobConfig,
    ) -> (&'static str, Option<String>) {
        let Some(v) = &job.verify else {
            return ("failed", Some("the job has no verify settings".into()));
        };
        let req = crate::recover::VerifyRequest {
            which: "latest".into(),
            level: v.level,
            storage: None,
            identity: None,
            target: None,
            target_password_file: None,
            json: true,
        };
        match crate::recover::verify_job(config, job, &req, false).await {
            Ok(checks) => {
                let bad: Vec<String> = checks
                    .iter()
                    .filter(|(_, c)| !c.ok)
                    .map(|(store, c)| format!("{store}: {} {} failed", c.backup_id, c.level))
                    .collect();
                if bad.is_empty() {
                    info!(job = %job.name, level = v.level.as_str(), checked = checks.len(), "Scheduled verification passed.");
                    ("success", None)
                } else {
                    error!(job = %job.name, level = v.level.as_str(), failures = %bad.join("; "), "Scheduled verification FAILED; see `backstop list` and the catalog for details.");
                    ("failed", Some(bad.join("; ")))
                }
            }
            // Regression (issue 12): a verify scheduled before the job's
            // first backup counted as a failed verification (and paged).
            Err(e) if e.downcast_ref::<crate::recover::NoBackup>().is_some() => {
                info!(job = %job.name, reason = %e, "No backup to verify yet; skipped.");
                ("skipped", None)
            }
            Err(e) => {
                error!(job = %job.name, error = %format!("{e:#}"), "Scheduled verification could not run.");
                ("failed", Some(format!("{e:#}")))
            }
        }
    }

    /// Applies the job's retention to each of its stores.
    async fn prune(&self, config: &Config, job: &JobConfig) -> (&'static str, Option<String>) {
        let Some(retention) = &job.retention else {
            return ("failed", Some("the job has no retention policy".into()));
        };
        match crate::prune_job(config, job, retention, &self.catalog, None, false).await {
            Ok(reports) => {
                let mut problems = Vec::new();
                for (store, r) in reports {
                    match r {
                        Ok(rep) => {
                            self.metrics
                                .retention_deleted
                                .with_label_values(&[&job.name, &store])
                                .inc_by(rep.deleted.len() as u64);
                            self.metrics
                                .retention_locked
                                .with_label_values(&[&job.name, &store])
                                .inc_by(rep.locked.len() as u64);
                            info!(job = %job.name, store, deleted = rep.deleted.len(), kept = rep.plan.kept().count(), locked = rep.locked.len(), orphans = rep.orphans.len(), skipped = rep.skipped.len(), "Retention applied.");
                            if !rep.skipped.is_empty() {
                                problems.push(format!(
                                    "{store}: {} object(s) could not be deleted",
                                    rep.skipped.len()
                                ));
                            }
                        }
                        Err(e) => {
                            error!(job = %job.name, store, error = %e, "Prune failed; nothing was deleted in this store.");
                            problems.push(e.to_string());
                        }
                    }
                }
                if problems.is_empty() {
                    ("success", None)
                } else {
                    ("failed", Some(problems.join("; ")))
                }
            }
            Err(e) => ("failed", Some(format!("{e:#}"))),
        }
    }

    fn busy_count(&self) -> usize {
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Starts one scheduling task per job of the current config.
    fn schedule_all(self: &Arc<Self>) {
        let stop = CancellationToken::new();
        let old = std::mem::replace(
            &mut *self
                .schedule_stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            stop.clone(),
        );
        old.cancel();
        let config = self.config();
        self.metrics.next_run.reset();
        for job in &config.jobs {
            if let Some(schedule) = job.schedule.clone() {
                self.schedule_one(job, schedule, Kind::Backup, stop.clone());
            }
            if let Some(v) = &job.verify {
                self.schedule_one(job, v.schedule.clone(), Kind::Verify, stop.clone());
            }
            if let Some(s) = job.retention.as_ref().and_then(|r| r.schedule.clone()) {
                self.schedule_one(job, s, Kind::Prune, stop.clone());
            }
        }
    }

    /// One task sleeping until each fire time of `schedule`, then triggering.
    fn schedule_one(
        self: &Arc<Self>,
        job: &JobConfig,
        schedule: backstop_config::Schedule,
        kind: Kind,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let (name, tz) = (job.name.clone(), job.timezone);
        tokio::spawn(async move {
            loop {
                let now = Utc::now();
                let Some(next) = schedule.next_after(now, tz) else {
                    warn!(job = %name, kind = kind.as_str(), "The schedule never fires again.");
                    return;
                };
                me.metrics
                    .next_run
                    .with_label_values(&[&name, kind.as_str()])
                    .set(next.timestamp() as f64);
                let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
                // Never early: the clock may have been stepped back.
                if Utc::now() < next {
                    continue;
                }
                let _ = me.trigger_kind(&name, kind, "schedule");
            }
        });
    }

    /// Backups stored, bytes used and the oldest backup, per store of the job.
    async fn refresh_storage(&self, config: &Config, job: &JobConfig) {
        for store in &job.storage {
            let listed = match backstop_pipeline::open_storage(config, store, None).await {
                Ok(b) => backstop_pipeline::list_backups(b.as_ref(), &job.name)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match listed {
                Ok((manifests, _)) => {
                    let labels = [job.name.as_str(), store.as_str()];
                    self.metrics
                        .backups_stored
                        .with_label_values(&labels)
                        .set(manifests.len() as f64);
                    self.metrics
                        .storage_used
                        .with_label_values(&labels)
                        .set(manifests.iter().map(|m| m.stored_bytes()).sum::<u64>() as f64);
                    if let Some(oldest) = manifests.iter().map(|m| m.started_at).min() {
                        self.metrics
                            .oldest_backup
                            .with_label_values(&labels)
                            .set(oldest.timestamp() as f64);
                    }
                }
                Err(e) => {
                    warn!(job = %job.name, store, error = %e, "Cannot list the store for its metrics.");
                }
            }
        }
    }

    /// Seeds the metrics from the catalog and the stores, so a restart does
    /// not make a stale job look fresh or hide a failure.
    async fn seed_metrics(&self) {
        let config = self.config();
        let now = Utc::now();
        for job in &config.jobs {
            let name = job.name.as_str();
            if let Some(rpo) = job.effective_rpo(now) {
                self.metrics
                    .rpo
                    .with_label_values(&[name])
                    .set(rpo.num_milliseconds() as f64 / 1000.0);
            }
            // Present at 0 from the start, so `increase()` sees the first failure.
            for n in job.notify.iter().filter_map(|n| config.notifiers.get(n)) {
                for on in &n.on {
                    let outcome = on.as_str();
                    self.metrics
                        .notifications_sent
                        .with_label_values(&[name, outcome]);
                    self.metrics
                        .notifications_failed
                        .with_label_values(&[name, outcome]);
                }
            }
            // Present at 0 from the start (dashboards show 0, not "no data").
            self.metrics.skipped.with_label_values(&[name, "backup"]);
            if job.verify.is_some() {
                self.metrics.skipped.with_label_values(&[name, "verify"]);
            }
            for kind in ["backup", "verify", "prune"] {
                let ok = self
                    .catalog
                    .last_finished(name, kind, backstop_catalog::Outcome::Success)
                    .await
                    .ok()
                    .flatten();
                let bad = self
                    .catalog
                    .last_finished(name, kind, backstop_catalog::Outcome::Failed)
                    .await
                    .ok()
                    .flatten();
                let configured = match kind {
                    "backup" => true,
                    "verify" => job.verify.is_some(),
                    _ => job.retention.is_some(),
                };
                if configured || ok.is_some() {
                    // 0 = never: alert rules tell "never succeeded" from "stale".
                    self.metrics
                        .last_success
                        .with_label_values(&[name, kind])
                        .set(ok.as_ref().map_or(0.0, |o| o.0.timestamp() as f64));
                }
                if configured || bad.is_some() {
                    // 0 = never failed (documented and on dashboards; the
                    // alert compares it with the last success).
                    self.metrics
                        .last_failure
                        .with_label_values(&[name, kind])
                        .set(bad.as_ref().map_or(0.0, |b| b.0.timestamp() as f64));
                }
                if kind == "verify" && (configured || ok.is_some()) {
                    // 0 = never verified, which BackstopVerifyStale reports.
                    self.metrics
                        .verify_last_success
                        .with_label_values(&[name])
                        .set(ok.as_ref().map_or(0.0, |o| o.0.timestamp() as f64));
                }
                if kind == "backup"
                    && let Some((_, dump, stored)) = ok
                {
                    if let Some(d) = dump {
                        self.metrics
                            .last_size
                            .with_label_values(&[name, "dump"])
                            .set(d as f64);
                    }
                    if let Some(s) = stored {
                        self.metrics
                            .last_size
                            .with_label_values(&[name, "stored"])
                            .set(s as f64);
                    }
                }
            }
            if job.retention.is_some() {
                for store in &job.storage {
                    self.metrics
                        .retention_deleted
                        .with_label_values(&[name, store]);
                    self.metrics
                        .retention_locked
                        .with_label_values(&[name, store]);
                }
            }
            self.refresh_storage(&config, job).await;
        }
    }

    /// At start: runs a job once if its last success is older than its interval.
    async fn catch_up(self: &Arc<Self>) {
        let config = self.config();
        let now = Utc::now();
        for job in config.jobs.iter().filter(|j| j.catch_up) {
            let Some(s) = &job.schedule else { continue };
            let Some(interval) = s.interval_after(now, job.timezone) else {
                continue;
            };
            let last = match self.catalog.last_success(&job.name, "backup").await {
                Ok(l) => l,
                Err(e) => {
                    warn!(job = %job.name, error = %e, "Cannot read the last success from the catalog; no catch-up.");
                    continue;
                }
            };
            let due = last.is_none_or(|t| now - t > interval);
            if due {
                info!(job = %job.name, last_success = ?last, "Catching up: the last successful backup is older than the schedule's interval; running once now.");
                let _ = self.trigger(&job.name, "catch-up");
            }
        }
    }

    /// SIGHUP: the new config replaces the old one if it is valid. Jobs it
    /// removes lose their series (no stale alert for a job that is gone);
    /// every job is seeded again, so a job it adds is exported at once with
    /// its RPO and `last_success = 0` and the stale and never-succeeded
    /// alerts can fire for it without a restart.
    async fn reload(self: &Arc<Self>) {
        match Config::load(&self.config_path) {
            Ok(new) => {
                let old = std::mem::replace(
                    &mut *self
                        .config
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Arc::new(new),
                );
                let config = self.config();
                for gone in old
                    .jobs
                    .iter()
                    .filter(|o| !config.jobs.iter().any(|j| j.name == o.name))
                {
                    info!(job = %gone.name, "Job removed by the reload; its metrics are no longer exported.");
                    self.metrics.forget_job(&gone.name);
                }
                self.metrics.config_reload_success.set(1);
                self.schedule_all();
                info!(path = %self.config_path.display(), jobs = config.jobs.len(), "Configuration reloaded; running jobs continue with the settings they started with.");
                self.seed_metrics().await;
            }
            Err(e) => {
                self.metrics.config_reload_success.set(0);
                error!(path = %self.config_path.display(), error = %e, "Configuration reload failed; the previous configuration stays in force.");
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
///
/// # Errors
/// When the catalog or the listener cannot be set up.
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let catalog = Catalog::open(&config.catalog).await?;
    let metrics = Metrics::new();
    for (job, kind, backup) in catalog.interrupt_orphaned_runs(Utc::now()).await? {
        warn!(job, kind, backup_id = ?backup, "A run was cut off by a crash or kill; marked interrupted. Its partial uploads are aborted by the job's next run.");
        // Counted, so a daemon that keeps dying mid-run is visible.
        metrics
            .runs
            .with_label_values(&[&job, &kind, "interrupted"])
            .inc();
    }
    let listen = config.daemon.listen;
    let max = config.daemon.max_concurrent_jobs;
    let grace = config.daemon.shutdown_grace;
    let daemon = Arc::new(Daemon {
        config_path,
        config: RwLock::new(Arc::new(config)),
        catalog,
        slots: Arc::new(Semaphore::new(max)),
        max_slots: max,
        busy: Mutex::new(HashMap::new()),
        runs: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        metrics,
        cancel_runs: CancellationToken::new(),
        schedule_stop: Mutex::new(CancellationToken::new()),
        idle: tokio::sync::Notify::new(),
        last_outcome: Mutex::new(HashMap::new()),
        notifications: tokio_util::task::TaskTracker::new(),
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (set daemon.listen)"))?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, daemon.clone(), server_stop.clone()));
    daemon.seed_metrics().await;
    daemon.schedule_all();
    daemon.catch_up().await;
    let jobs = daemon.config().jobs.len();
    info!(listen = %listen, jobs, max_concurrent_jobs = max, "backstop daemon started.");
    notify::notify(&format!("READY=1\nSTATUS=scheduling {jobs} job(s)"));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut watchdog = notify::watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => daemon.reload().await,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                notify::notify("WATCHDOG=1");
            }
        }
    }

    // Shutdown: no new runs; running ones get the grace, then are cancelled.
    notify::notify("STOPPING=1");
    daemon
        .schedule_stop
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .cancel();
    let running = daemon.busy_count();
    info!(running, grace = %humantime::format_duration(grace), "Shutting down: letting running jobs finish (a second signal stops at once).");
    let drained = async {
        while daemon.busy_count() > 0 {
            let idle = daemon.idle.notified();
            if daemon.busy_count() == 0 {
                break;
            }
            idle.await;
        }
    };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(grace) => {
            warn!(running = daemon.busy_count(), "Shutdown grace is over; cancelling running jobs.");
            daemon.cancel_runs.cancel();
            let cleanup = async {
                while daemon.busy_count() > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                () = cleanup => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => warn!("Running jobs did not stop within 60 s of being cancelled."),
                _ = term.recv() => std::process::exit(143),
                _ = int.recv() => std::process::exit(130),
            }
        }
        _ = term.recv() => { warn!("Second signal: quitting now."); std::process::exit(143); }
        _ = int.recv() => { warn!("Second signal: quitting now."); std::process::exit(130); }
    }
    daemon.cancel_runs.cancel();
    // Let notifications of the last runs go out, within reason.
    daemon.notifications.close();
    if !daemon.notifications.is_empty() {
        info!(
            pending = daemon.notifications.len(),
            "Waiting up to 30 s for notifications to be delivered."
        );
        if tokio::time::timeout(Duration::from_secs(30), daemon.notifications.wait())
            .await
            .is_err()
        {
            warn!(
                pending = daemon.notifications.len(),
                "Notifications still undelivered after 30 s; giving up on them."
            );
        }
    }
    server_stop.cancel();
    let _ = server.await;
    daemon.catalog.close().await;
    info!("backstop daemon stopped.");
    Ok(())
}
