//! The backstop daemon (`backstop run`) as a library. The
//! [`backstop_scheduler`] decides when runs happen (fire times in each job's
//! time zone, at most `max_concurrent_jobs` at once, no overlap, retries,
//! catch-up, reload, drain); this crate gives it a [`runner::JobRunner`]
//! over the pipeline and the catalog, turns its events into metrics, logs,
//! notifications, sd_notify status and the run API's states
//! ([`observer`]), and serves /metrics, /healthz, /readyz and the run API.
//!
//! It handles no signals and never exits the process: the caller passes
//! [`Control`] (a reload channel and a shutdown future) and decides what a
//! second signal during the drain means.
//!
//! Fire times come from [`backstop_config::Schedule::next_after`] (croner
//! with chrono-tz, table-tested across DST changes). tokio-cron-scheduler,
//! the scheduler first specified, has open time-zone/DST bugs and would own
//! the clock, so it is not used (docs/design.md).

mod announce;
mod fleet;
mod history;
mod http;
mod listener;
mod metrics;
mod observer;
pub mod page;
mod runner;
mod sd_notify;
mod standby;
pub mod status;
pub mod status_cache;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backstop_catalog::Catalog;
use backstop_config::{Config, JobConfig};
use backstop_scheduler::{Entry, Outcome, RunKind, Scheduler, SystemClock, Trigger};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{error, info, warn};

use backstop_scheduler::TriggerError;
use metrics::Metrics;

pub use announce::{RunFacts, run_event};
use fleet::{CatalogLedger, Fleet};
pub use fleet::{CliNode, claimed_backup};
use runner::{Cron, JobRunner};

/// The state of one run started by the daemon, as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct RunState {
    pub id: u64,
    pub job: String,
    pub trigger: String,
    /// queued | running | success | suspect | failed | interrupted | skipped
    pub state: String,
    pub attempts: u32,
    pub backup_id: Option<String>,
    pub error: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Finished runs the run API still answers for (`backup --wait` polls a
/// run it just started); older ones are forgotten, so a daemon's memory
/// does not grow with every run it ever made.
const FINISHED_RUNS_KEPT: usize = 1000;

/// Forgets the oldest finished runs beyond `keep`.
fn forget_finished(runs: &mut HashMap<u64, RunState>, keep: usize) {
    let mut finished: Vec<u64> = runs
        .values()
        .filter(|r| r.finished_at.is_some())
        .map(|r| r.id)
        .collect();
    if finished.len() > keep {
        finished.sort_unstable();
        for id in &finished[..finished.len() - keep] {
            runs.remove(id);
        }
    }
}

#[cfg(test)]
mod run_state_tests {
    use super::*;

    fn run(id: u64, finished: bool) -> RunState {
        RunState {
            id,
            job: "app".into(),
            trigger: "schedule".into(),
            state: if finished { "success" } else { "running" }.into(),
            attempts: 1,
            backup_id: None,
            error: None,
            queued_at: Utc::now(),
            started_at: Some(Utc::now()),
            finished_at: finished.then(Utc::now),
        }
    }

    /// Finished runs beyond the cap go, oldest first; running ones stay
    /// whatever their age. (Before, every run stayed until a restart.)
    #[test]
    fn only_the_newest_finished_runs_are_kept() {
        let mut runs = HashMap::new();
        runs.insert(1, run(1, false));
        for id in 2..=2000 {
            runs.insert(id, run(id, true));
            forget_finished(&mut runs, 1000);
        }
        assert_eq!(runs.len(), 1001);
        assert!(runs.contains_key(&1), "a running run is kept");
        assert!(!runs.contains_key(&1000));
        assert!(runs.contains_key(&1001) && runs.contains_key(&2000));
    }
}

/// A wait the test build reads from environment variable `var` (in
/// milliseconds), so a test need not sit through an hour; None in a
/// release build, or when it is not set.
fn test_wait(var: &str) -> Option<Duration> {
    #[cfg(feature = "test-standin")]
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        return Some(Duration::from_millis(ms));
    }
    let _ = var;
    None
}

/// What the runner, the observer and the HTTP handlers share.
pub struct Core {
    config_path: PathBuf,
    config: RwLock<Arc<Config>>,
    catalog: Catalog,
    pub metrics: Metrics,
    /// Runs started since this process began, for the run API.
    runs: Mutex<HashMap<u64, RunState>>,
    /// The final outcome of each job's last run, by "job/kind": what tells
    /// a recovery from an ordinary success. Filled from the catalog on a
    /// job's first run, then kept here (retried attempts are not final).
    last_outcome: Mutex<HashMap<(String, RunKind), Outcome>>,
    /// Notifications being sent; shutdown waits a little for them.
    notifications: tokio_util::task::TaskTracker,
    /// Per job, whether the start ping of its running backup was sent: the
    /// end ping waits for it.
    heartbeats: Mutex<HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// This process as a fleet node (a shared PostgreSQL catalog).
    fleet: Option<Arc<Fleet>>,
    /// The address the HTTP listener is bound to: fixed for the process's
    /// life, whatever a reload says (None: `run-due` serves nothing).
    pub bound: Option<std::net::SocketAddr>,
    /// Untrusted objects last counted per (job, store): each one is logged
    /// when the count changes, not at every refresh.
    untrusted_seen: Mutex<HashMap<(String, String), usize>>,
    /// What the status page and `/api/v1/status` serve from.
    pub status: Arc<status_cache::StatusCache>,
}

type Sched = Scheduler<JobRunner, CatalogLedger, SystemClock>;

/// The running daemon: the shared core and its scheduler.
pub struct Daemon {
    core: Arc<Core>,
    sched: Sched,
}

impl std::ops::Deref for Daemon {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The member config of a cluster job's database from its series name
/// (`<job>/<segment>`).
fn member_of(config: &Config, series: &str) -> Option<JobConfig> {
    let (job, segment) = backstop_vocab::series::split(series);
    let db = backstop_vocab::series::database_of(segment?)?;
    config.job(job).map(|j| j.member(&db))
}

/// The scheduler's entries for `config`: each job's backups (on demand, and
/// on its schedule if it has one), its scheduled verify, and its prune (after
/// each successful backup, and on the retention schedule if any).
fn entries(config: &Config) -> Vec<Entry> {
    let cron = |s: &backstop_config::Schedule, job: &JobConfig| {
        Some(Arc::new(Cron {
            schedule: s.clone(),
            tz: job.timezone,
        }) as Arc<dyn backstop_scheduler::Timetable>)
    };
    let mut out = Vec::new();
    for job in &config.jobs {
        out.push(Entry {
            job: job.name.clone(),
            kind: RunKind::Backup,
            timetable: job.schedule.as_ref().and_then(|s| cron(s, job)),
            retries: job.retries,
            backoff: job.retry_backoff,
            catch_up: job.catch_up,
        });
        if let Some(v) = &job.verify {
            out.push(Entry {
                job: job.name.clone(),
                kind: RunKind::Verify,
                timetable: cron(&v.schedule, job),
                retries: 0,
                backoff: Duration::ZERO,
                catch_up: false,
            });
        }
        if let Some(r) = &job.retention {
            out.push(Entry {
                job: job.name.clone(),
                kind: RunKind::Prune,
                timetable: r.schedule.as_ref().and_then(|s| cron(s, job)),
                retries: 0,
                backoff: Duration::ZERO,
                catch_up: false,
            });
        }
    }
    out
}

impl Core {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_run(&self, r: RunState) {
        let mut runs = lock(&self.runs);
        runs.insert(r.id, r);
        forget_finished(&mut runs, FINISHED_RUNS_KEPT);
    }

    fn forget_run(&self, id: u64) {
        lock(&self.runs).remove(&id);
    }

    fn update_run(&self, id: u64, f: impl FnOnce(&mut RunState)) {
        if let Some(r) = lock(&self.runs).get_mut(&id) {
            f(r);
        }
    }

    pub fn run_state(&self, id: u64) -> Option<RunState> {
        lock(&self.runs).get(&id).cloned()
    }

    /// Replay pauses an earlier backstop recorded per job (it died during
    /// the dump) are handed to the per-server books, so the standby pass
    /// resumes them under the standby's lock (never under a live backup's
    /// hold, never an operator's pause), as it does any orphaned pause.
    async fn resume_left_pauses(&self) {
        if self.catalog.is_shared() {
            return;
        }
        let jobs = match self.catalog.replay_pauses().await {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "Cannot read the recorded replay pauses from the catalog.");
                return;
            }
        };
        let config = self.config();
        for name in jobs {
            let job = config
                .job(&name)
                .cloned()
                .or_else(|| member_of(&config, &name));
            let server = job
                .as_ref()
                .and_then(backstop_pipeline::backup::server_of_job);
            let Some(server) = server else {
                warn!(job = %name, "A backup left WAL replay paused on a standby of a job no longer configured; resume it by hand (SELECT pg_wal_replay_resume();).");
                continue;
            };
            let known = matches!(self.catalog.replay_server(&server).await, Ok(Some(_)));
            if (known
                || self
                    .catalog
                    .set_replay_server(&server, backstop_catalog::PausedBy::Backstop, &name)
                    .await
                    .is_ok())
                && let Err(e) = self.catalog.forget_replay_pause(&name).await
            {
                warn!(job = %name, error = %e, "Cannot forget an earlier version's replay pause record.");
            }
        }
    }

    /// A catalog with no backup recorded while the stores hold some (a new
    /// host, or the catalog was lost) is rebuilt from them before anything
    /// is scheduled, so staleness, sizes and retention see the real history.
    async fn rebuild_if_empty(&self) {
        match self.catalog.has_no_backups().await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(error = %e, "Cannot tell whether the catalog is empty; not rebuilding it.");
                return;
            }
        }
        let config = self.config();
        match backstop_pipeline::rebuild::rebuild(&self.catalog, &config, None).await {
            Ok(rows) => {
                let added: usize = rows.iter().map(|r| r.backups_added).sum();
                let verifications: usize = rows.iter().map(|r| r.verifications_added).sum();
                if added > 0 {
                    warn!(
                        backups = added,
                        verifications,
                        "The catalog was empty but the stores hold backups: rebuilt it from their manifests and verification records (runs marked imported)."
                    );
                }
            }
            Err(e) => error!(error = %e, "Could not rebuild the empty catalog from the stores."),
        }
    }
}

impl Daemon {
    /// Starts a backup of `job` now (the run API), unless one is queued or
    /// going. In a fleet it runs on this node as a run of its own, claimed
    /// when it gets a slot; it fails naming the node if another node is
    /// running the job then.
    pub async fn trigger(&self, job: &str) -> Result<u64, TriggerError> {
        self.sched.trigger(job, RunKind::Backup, Trigger::Api)
    }

    /// SIGHUP: the new config replaces the old one if it is valid. Jobs it
    /// removes lose their series (no stale alert for a job that is gone);
    /// every job is seeded again, so a job it adds is exported at once and
    /// alerts can fire for it without a restart.
    async fn reload(&self) {
        match Config::load(&self.config_path) {
            Ok(new) if new.daemon.listen != self.config().daemon.listen => {
                self.metrics.config_reload_success.set(0);
                error!(
                    path = %self.config_path.display(),
                    listening = ?self.bound,
                    asked = %new.daemon.listen,
                    "Configuration reload refused: daemon.listen changed, and a reload does not move the listener. Restart the daemon to listen elsewhere (or put daemon.listen back); the previous configuration stays in force."
                );
            }
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
                self.metrics.config_hash.set(hash_number(&config.hash));
                if let Some(node) = &self.fleet {
                    // Also what it registers with if its lease lapses.
                    node.set_config_hash(&config.hash);
                    if let Err(e) = self
                        .catalog
                        .set_node_config_hash(&node.id(), &config.hash)
                        .await
                    {
                        warn!(error = %e, "Cannot publish the new config digest to the fleet.");
                    }
                }
                self.metrics.next_run.reset();
                // Jobs and stores may have changed: the page reads anew.
                self.status.forget().await;
                self.sched.set_entries(entries(&config));
                info!(path = %self.config_path.display(), jobs = config.jobs.len(), "Configuration reloaded; running jobs continue with the settings they started with.");
                self.core.seed_metrics().await;
            }
            Err(e) => {
                self.metrics.config_reload_success.set(0);
                error!(path = %self.config_path.display(), error = %e, "Configuration reload failed; the previous configuration stays in force.");
            }
        }
    }
}

/// What the process around the daemon asks of it.
pub struct Control<S> {
    /// A message here reloads the configuration (the binary sends one per
    /// SIGHUP).
    pub reload: tokio::sync::mpsc::Receiver<()>,
    /// Completes when the daemon should stop: no new runs, running ones get
    /// `daemon.shutdown_grace`, then are cancelled. To stop at once during
    /// the drain, the caller exits the process.
    pub shutdown: S,
}

/// Runs the daemon until `control.shutdown` completes and the drain is over.
///
/// # Errors
/// When the catalog or the listener cannot be set up.
///
/// Length: the daemon's start-up in order, then its one select loop over
/// reload and shutdown; each step is a call, the order is the point.
pub async fn run<S: std::future::Future<Output = ()>>(
    config_path: PathBuf,
    config: Config,
    control: Control<S>,
) -> anyhow::Result<()> {
    let catalog = backstop_pipeline::open_catalog(&config).await?;
    let metrics = Metrics::new();
    let fleet = match catalog.is_shared() {
        true => Some(Fleet::join(&catalog, &config, Some(&metrics), "daemon").await?),
        false => None,
    };
    metrics.config_hash.set(hash_number(&config.hash));
    for (job, kind, backup) in catalog.interrupt_orphaned_runs(Utc::now()).await? {
        warn!(job, kind = kind.as_str(), backup_id = ?backup, "A run was cut off by a crash or kill; marked interrupted. Its partial uploads are aborted by the job's next run.");
        // Counted, so a daemon that keeps dying mid-run is visible.
        metrics
            .runs
            .with_label_values(&[&job, kind.as_str(), Outcome::Interrupted.as_str()])
            .inc();
    }
    let listen = config.daemon.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e} (set daemon.listen)"))?;
    let bound = listener.local_addr()?;
    let max = config.daemon.max_concurrent_jobs;
    let grace = config.daemon.shutdown_grace;
    let core = Arc::new(Core {
        config_path,
        config: RwLock::new(Arc::new(config)),
        catalog,
        metrics,
        runs: Mutex::new(HashMap::new()),
        last_outcome: Mutex::new(HashMap::new()),
        heartbeats: Mutex::new(HashMap::new()),
        notifications: tokio_util::task::TaskTracker::new(),
        fleet,
        bound: Some(bound),
        untrusted_seen: Mutex::new(HashMap::new()),
        status: Arc::default(),
    });
    let observed = core.clone();
    let sched = Scheduler::new(
        JobRunner::new(core.clone()),
        CatalogLedger::new(&core),
        SystemClock,
        max,
        move |e| observer::on_event(&observed, e),
    );
    let daemon = Arc::new(Daemon { core, sched });
    // Entries first: the run API may be asked as soon as it listens.
    daemon.sched.set_entries(entries(&daemon.config()));
    let server_stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(http::serve(listener, daemon.clone(), server_stop.clone()));
    let heartbeat = tokio_util::sync::CancellationToken::new();
    // The heartbeat first: catch-up can take long, and a lease must not
    // lapse meanwhile.
    let beats = daemon.core.fleet.as_ref().map(|fleet| {
        fleet.keep_beating(daemon.core.clone(), daemon.sched.clone(), heartbeat.clone())
    });
    let history = tokio::spawn(history::keep(daemon.core.clone(), server_stop.clone()));
    let fresh = {
        let core = daemon.core.clone();
        tokio::spawn(status_cache::keep_fresh(
            daemon.core.status.clone(),
            move || core.config(),
            daemon.core.catalog.clone(),
            server_stop.clone(),
        ))
    };
    let lister = tokio::spawn(status_cache::keep_listed(
        daemon.core.clone(),
        server_stop.clone(),
    ));
    daemon.core.rebuild_if_empty().await;
    daemon.core.resume_left_pauses().await;
    let standbys = tokio::spawn(standby::keep(daemon.core.clone(), server_stop.clone()));
    daemon.core.seed_metrics().await;
    daemon.sched.catch_up().await;
    // Claims only now: what it claims is the newest of what it missed.
    if let Some(fleet) = &daemon.core.fleet {
        fleet.node.caught_up();
    }
    let jobs = daemon.config().jobs.len();
    info!(listen = %listen, jobs, max_concurrent_jobs = max, "backstop daemon started.");
    sd_notify::notify(&format!("READY=1\nSTATUS=scheduling {jobs} job(s)"));

    let Control {
        mut reload,
        shutdown,
    } = control;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut watchdog = sd_notify::watchdog_interval().map(tokio::time::interval);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = reload.recv() => daemon.reload().await,
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                sd_notify::notify("WATCHDOG=1");
            }
        }
    }

    // Shutdown: no new runs; running ones get the grace, then are cancelled.
    sd_notify::notify("STOPPING=1");
    info!(running = daemon.sched.busy(), grace = %humantime::format_duration(grace), "Shutting down: letting running jobs finish (a second signal stops at once).");
    let drain = daemon.sched.shutdown(grace, Duration::from_secs(60)).await;
    if drain.cancelled {
        warn!(
            running = drain.running,
            "Shutdown grace is over; running jobs were cancelled."
        );
    }
    if drain.stuck > 0 {
        warn!(
            stuck = drain.stuck,
            "Running jobs did not stop within 60 s of being cancelled."
        );
    }
    // Scratch databases of cancelled restore checks are dropped first.
    if !backstop_pipeline::cleanup::finish(Duration::from_secs(30)).await {
        warn!("Clean-up of cancelled runs (scratch databases) did not finish within 30 s.");
    }
    // Let notifications of the last runs go out, within reason.
    let notes = &daemon.notifications;
    notes.close();
    if !notes.is_empty() {
        info!(
            pending = notes.len(),
            "Waiting up to 30 s for notifications to be delivered."
        );
        if tokio::time::timeout(Duration::from_secs(30), notes.wait())
            .await
            .is_err()
        {
            warn!(
                pending = notes.len(),
                "Notifications still undelivered after 30 s; giving up on them."
            );
        }
    }
    server_stop.cancel();
    let _ = server.await;
    let _ = history.await;
    let _ = fresh.await;
    let _ = lister.await;
    let _ = standbys.await;
    heartbeat.cancel();
    if let Some(b) = beats {
        let _ = b.await;
    }
    if let Some(fleet) = &daemon.fleet {
        fleet.node.leave().await;
    }
    daemon.catalog.close().await;
    info!("backstop daemon stopped.");
    Ok(())
}

/// The first 52 bits of a hex config digest, as a number a gauge holds
/// exactly.
fn hash_number(hash: &str) -> f64 {
    u64::from_str_radix(hash.get(..13).unwrap_or(hash), 16).unwrap_or(0) as f64
}

/// What `backstop run-due --once` did.
#[derive(Debug, Default)]
pub struct RunDueReport {
    /// Each run this process executed: job, kind, outcome, error.
    pub runs: Vec<(String, RunKind, Outcome, Option<String>)>,
    /// `--max-runtime` ran out; the runs going were interrupted (and go
    /// back to pending for the next invocation).
    pub timed_out: bool,
    /// What the catalog failed to do after this process joined (recording
    /// the due ticks, looking for pending runs): work that was due may not
    /// have run, so the invocation fails.
    pub catalog_errors: Vec<String>,
}

impl RunDueReport {
    /// Exit 0 only if every run it executed succeeded and it was not cut off.
    pub fn ok(&self) -> bool {
        !self.timed_out
            && self.catalog_errors.is_empty()
            && self
                .runs
                .iter()
                .all(|r| matches!(r.2, Outcome::Success | Outcome::Skipped))
    }
}

/// `backstop run-due --once`: joins the fleet, records the ticks due,
/// reaps dead nodes, then claims and runs pending work (of `only` if
/// given) until a round claims nothing, and leaves. For a cluster
/// scheduler such as a Kubernetes CronJob; needs a PostgreSQL catalog.
///
/// # Errors
/// When the catalog is not shared or cannot be reached.
///
/// Length: `backstop run-due` in order, from joining to leaving; each step
/// is a call.
pub async fn run_due(
    config_path: PathBuf,
    config: Config,
    only: Option<String>,
    max_runtime: Option<Duration>,
    interrupt: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<RunDueReport> {
    if let Some(job) = &only
        && config.job(job).is_none()
    {
        anyhow::bail!("no job named \"{job}\" in {}", config_path.display());
    }
    let catalog = backstop_pipeline::open_catalog(&config).await?;
    if !catalog.is_shared() {
        anyhow::bail!(backstop_catalog::CatalogError::NotShared("run-due"));
    }
    let fleet = Fleet::join(&catalog, &config, None, "run-due").await?;
    let node = fleet.node.clone();
    let max = config.daemon.max_concurrent_jobs;
    let mut all = entries(&config);
    all.retain(|e| only.as_deref().is_none_or(|j| e.job == j));
    let core = Arc::new(Core {
        config_path,
        config: RwLock::new(Arc::new(config)),
        catalog,
        metrics: Metrics::new(),
        runs: Mutex::new(HashMap::new()),
        last_outcome: Mutex::new(HashMap::new()),
        heartbeats: Mutex::new(HashMap::new()),
        notifications: tokio_util::task::TaskTracker::new(),
        fleet: Some(fleet.clone()),
        bound: None,
        untrusted_seen: Mutex::new(HashMap::new()),
        status: Arc::default(),
    });
    let report = Arc::new(Mutex::new(RunDueReport::default()));
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (observed, seen, count) = (core.clone(), report.clone(), started.clone());
    let sched: Sched = Scheduler::new(
        JobRunner::new(core.clone()),
        CatalogLedger::new(&core),
        SystemClock,
        max,
        move |e| {
            match &e {
                backstop_scheduler::Event::Started { .. } => {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                backstop_scheduler::Event::Finished {
                    job,
                    kind,
                    outcome,
                    error,
                    ..
                } => lock(&seen)
                    .runs
                    .push((job.clone(), *kind, *outcome, error.clone())),
                _ => {}
            }
            observer::on_event(&observed, e)
        },
    );
    // The fire loops record (and run) ticks that fall due while this
    // invocation works, as a daemon's do: a long invocation must not leave
    // them for the next one to find missed.
    sched.set_entries(all.clone());
    // The heartbeat first: the lease must not lapse while ticks are read.
    let beat_stop = tokio_util::sync::CancellationToken::new();
    let beats = fleet.keep_beating(core.clone(), sched.clone(), beat_stop.clone());
    let now = backstop_pipeline::now();
    for e in &all {
        match backstop_scheduler::record_missed_ticks(sched.ledger(), e, now).await {
            Ok(Some(m)) if m.skipped > 0 || m.new_job => {
                info!(job = %e.job, kind = e.kind.as_str(), skipped = m.skipped, due = ?m.running, new_job = m.new_job, "Recorded the job's missed ticks.");
            }
            Ok(_) => {}
            Err(err) => {
                warn!(job = %e.job, error = %err, "Cannot record the job's due ticks.");
                lock(&report).catalog_errors.push(format!(
                    "cannot record the due ticks of {} {}: {err}",
                    e.job, e.kind
                ));
            }
        }
    }
    // Replay pauses left by a dead process (or a failed resume) are
    // resumed here too: a fleet run from cron has no daemon to do it.
    standby::pass(&core).await;
    // Claims only now: what it claims is the newest of what was missed.
    node.caught_up();
    let work = async {
        loop {
            let before = started.load(std::sync::atomic::Ordering::SeqCst);
            node.reap_dead().await;
            if let Err(e) = node.pick_up(&sched, &fleet.claimable(&core.config())).await {
                lock(&report)
                    .catalog_errors
                    .push(format!("cannot look for pending runs: {e}"));
                break;
            }
            sched.wait_idle().await;
            if started.load(std::sync::atomic::Ordering::SeqCst) == before {
                break;
            }
        }
    };
    let out_of_time = async {
        match max_runtime {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let (timed_out, interrupted) = tokio::select! {
        () = work => (false, false),
        () = out_of_time => (true, false),
        () = interrupt.cancelled() => (false, true),
    };
    if timed_out {
        warn!(max_runtime = %humantime::format_duration(max_runtime.unwrap_or_default()), running = sched.busy(), "--max-runtime is over: interrupting the runs going (they go back to pending for the next invocation).");
    }
    // Out of time or interrupted: the runs going stop now. Otherwise a run
    // a fire loop started as the work ended gets the daemon's grace.
    let grace = if timed_out || interrupted {
        Duration::ZERO
    } else {
        core.config().daemon.shutdown_grace
    };
    sched.shutdown(grace, Duration::from_secs(60)).await;
    standby::pass(&core).await;
    // Scratch databases of restore checks --max-runtime cut off.
    backstop_pipeline::cleanup::finish(Duration::from_secs(30)).await;
    beat_stop.cancel();
    let _ = beats.await;
    node.leave().await;
    core.notifications.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), core.notifications.wait()).await;
    core.catalog.close().await;
    let mut out = std::mem::take(&mut *lock(&report));
    out.timed_out = timed_out;
    out.catalog_errors.dedup();
    Ok(out)
}
