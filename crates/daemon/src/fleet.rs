//! This process as a node of a fleet (a PostgreSQL catalog several
//! processes share): its lease, the heartbeat that renews it, reaping
//! dead nodes, and picking up pending runs. The protocol itself is in
//! [`backstop_catalog::fleet`]; the scheduling decisions stay in the
//! scheduler, which reaches this through its [`Ledger`] seam.
//!
//! A node trusts its lease for `daemon.lease − daemon.heartbeat` after the
//! last renewal. Past that (the catalog is unreachable, or the process was
//! paused) it stops its runs itself, before any other node may reap them;
//! when the catalog says the lease is gone, it registers anew.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backstop_catalog::Catalog;
use backstop_catalog::fleet::{NodeInfo, Release};
use backstop_config::Config;
use backstop_scheduler::{ClaimError, Ending, Ledger, RunCtx, RunKind};
use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use super::{Core, Sched};

/// This process's node.
pub struct FleetNode {
    id: RwLock<String>,
    info: NodeInfo,
    lease: Duration,
    trust: Duration,
    pub heartbeat: Duration,
    renewed: Mutex<Instant>,
    /// [`claimable_entries`] of the config in force, made once per config
    /// (a heartbeat of a node with 1,000 jobs spent half its time on it).
    entries: Mutex<Option<(Arc<Config>, Arc<Claimable>)>>,
}

type Claimable = Vec<(String, RunKind, Option<Duration>)>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FleetNode {
    /// Registers this process as a node (`mode`: daemon | run-due | cli).
    ///
    /// # Errors
    /// When the catalog cannot register it.
    pub async fn join(catalog: &Catalog, config: &Config, mode: &str) -> anyhow::Result<Arc<Self>> {
        let info = NodeInfo::this_process(&config.hash, mode);
        let lease = config.daemon.lease;
        let id = catalog.register_node(&info, lease).await?;
        catalog.set_node(Some(id.clone()));
        info!(node = %id, hostname = %info.hostname, mode, config_hash = %info.config_hash, lease = %humantime::format_duration(lease), "Joined the fleet.");
        Ok(Arc::new(Self {
            id: RwLock::new(id),
            info,
            lease,
            trust: config.daemon.lease_trust(),
            heartbeat: config.daemon.heartbeat,
            renewed: Mutex::new(Instant::now()),
            entries: Mutex::new(None),
        }))
    }

    /// What this node may claim under `config`.
    pub fn claimable(&self, config: &Arc<Config>) -> Arc<Claimable> {
        let mut cached = lock(&self.entries);
        match &*cached {
            Some((c, e)) if Arc::ptr_eq(c, config) => e.clone(),
            _ => {
                let e = Arc::new(claimable_entries(config));
                *cached = Some((config.clone(), e.clone()));
                e
            }
        }
    }

    pub fn id(&self) -> String {
        self.id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the lease was renewed recently enough to be sure no other
    /// node may have reaped this one's runs.
    pub fn trusted(&self) -> bool {
        lock(&self.renewed).elapsed() < self.trust
    }

    /// Leaves the fleet: the node row goes (runs it still holds go back
    /// to pending for other nodes).
    pub async fn leave(&self, catalog: &Catalog) {
        let id = self.id();
        match catalog.deregister_node(&id).await {
            Ok(left) if left.is_empty() => info!(node = %id, "Left the fleet."),
            Ok(left) => {
                warn!(node = %id, runs = left.len(), "Left the fleet; its unfinished runs go back to pending for other nodes.")
            }
            Err(e) => {
                warn!(node = %id, error = %e, "Could not leave the fleet cleanly; other nodes reap this node once its lease expires.")
            }
        }
    }

    /// Beats every `daemon.heartbeat` until `stop` is cancelled.
    pub fn keep_beating(
        self: Arc<Self>,
        core: Arc<Core>,
        sched: Sched,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(self.heartbeat);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => self.beat(&core, &sched).await,
                    () = stop.cancelled() => return,
                }
            }
        })
    }

    /// One heartbeat: check trust, renew the lease (registering anew if it
    /// is gone), reap dead nodes, pick up pending runs, publish the fleet's
    /// gauges.
    pub async fn beat(&self, core: &Arc<Core>, sched: &Sched) {
        let catalog = &core.catalog;
        if !self.trusted() && core.metrics.fleet_lease_ok.get() == 1 {
            error!(node = %self.id(), trust = %humantime::format_duration(self.trust), "The lease was not renewed within its trust window (catalog unreachable, or this process was paused); stopping this node's runs before another node may take them over.");
            core.metrics.fleet_lease_ok.set(0);
            sched.abandon_runs();
        }
        match catalog.renew_lease(&self.id(), self.lease).await {
            Ok(true) => {
                *lock(&self.renewed) = Instant::now();
                core.metrics.fleet_lease_ok.set(1);
            }
            Ok(false) => {
                warn!(node = %self.id(), "This node's lease expired (it was paused or cut off from the catalog): its runs are stopped and nothing of theirs is published; registering as a new node.");
                core.metrics.fleet_lease_ok.set(0);
                sched.abandon_runs();
                match catalog.register_node(&self.info, self.lease).await {
                    Ok(id) => {
                        info!(old = %self.id(), node = %id, "Registered anew.");
                        catalog.set_node(Some(id.clone()));
                        *self
                            .id
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
                        *lock(&self.renewed) = Instant::now();
                        core.metrics.fleet_lease_ok.set(1);
                    }
                    Err(e) => {
                        warn!(error = %e, "Cannot register anew; retrying at the next heartbeat.")
                    }
                }
            }
            Err(e) => {
                warn!(node = %self.id(), error = %e, "Cannot renew this node's lease; retrying at the next heartbeat.");
                return;
            }
        }
        match catalog.reap().await {
            Ok(reaped) => {
                for r in reaped {
                    warn!(job = %r.job, kind = %r.kind, run = r.run, dead_node = %r.node, now = %r.now, "A node's lease expired while it held this run: its attempt is interrupted and the run goes back to pending (another node re-runs it).");
                    core.metrics
                        .runs
                        .with_label_values(&[&r.job, &r.kind, "interrupted"])
                        .inc();
                }
            }
            Err(e) => warn!(error = %e, "Cannot reap expired nodes."),
        }
        if self.trusted() {
            pick_up(core, sched, &self.claimable(&core.config())).await;
        }
        match catalog.fleet().await {
            Ok(nodes) => {
                let live: Vec<_> = nodes.iter().filter(|n| n.live).collect();
                let mut hashes: Vec<&str> = live.iter().map(|n| n.config_hash.as_str()).collect();
                hashes.sort_unstable();
                hashes.dedup();
                core.metrics.fleet_nodes.set(live.len() as i64);
                core.metrics.fleet_config_hashes.set(hashes.len() as i64);
            }
            Err(e) => warn!(error = %e, "Cannot read the fleet's nodes."),
        }
    }
}

/// The (job, kind, starting deadline) of every entry this node can run.
pub fn claimable_entries(config: &Config) -> Vec<(String, RunKind, Option<Duration>)> {
    let mut out = Vec::new();
    for job in &config.jobs {
        out.push((job.name.clone(), RunKind::Backup, job.starting_deadline));
        if job.verify.is_some() {
            out.push((job.name.clone(), RunKind::Verify, job.starting_deadline));
        }
        if job.retention.is_some() {
            out.push((job.name.clone(), RunKind::Prune, job.starting_deadline));
        }
    }
    out
}

/// Triggers a local run for each of `entries` with a pending run in the
/// catalog; each claims it once it has a slot. Returns how many.
pub async fn pick_up(core: &Arc<Core>, sched: &Sched, entries: &Claimable) -> usize {
    match core.catalog.claimable(entries).await {
        Ok(due) => {
            let n = due.len();
            for (job, kind) in due {
                let _ = sched.trigger(&job, kind, backstop_scheduler::Trigger::Fleet);
            }
            n
        }
        Err(e) => {
            warn!(error = %e, "Cannot look for pending runs in the catalog.");
            0
        }
    }
}

/// Failed attempts a run of `job`'s `kind` may have (retries + 1).
pub fn max_attempts(config: &Config, job: &str, kind: RunKind) -> u32 {
    match (kind, config.job(job)) {
        (RunKind::Backup, Some(j)) => j.retries.saturating_add(1),
        _ => 1,
    }
}

/// The catalog as the scheduler's ledger: last successes for catch-up
/// and, in a fleet, ticks, claims and releases.
pub struct CatalogLedger {
    pub core: Arc<Core>,
}

impl CatalogLedger {
    fn node(&self) -> Option<&Arc<FleetNode>> {
        self.core.fleet.as_ref()
    }
}

impl Ledger for CatalogLedger {
    async fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<DateTime<Utc>>, String> {
        self.core
            .catalog
            .last_success(job, kind)
            .await
            .map_err(|e| {
                warn!(job, error = %e, "Cannot read the last success from the catalog.");
                e.to_string()
            })
    }

    fn shared(&self) -> bool {
        self.node().is_some()
    }

    async fn record_tick(&self, job: &str, kind: RunKind, at: DateTime<Utc>) {
        let max = max_attempts(&self.core.config(), job, kind);
        if let Err(e) = self.core.catalog.record_tick(job, kind, at, max).await {
            warn!(job, kind = kind.as_str(), tick = %at, error = %e, "Cannot record the tick in the catalog; another node may (this one retries it with its next pick-up if it got in).");
        }
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, String> {
        self.core
            .catalog
            .last_tick(job, kind, at_or_before)
            .await
            .map_err(|e| e.to_string())
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: Vec<DateTime<Utc>>,
        why: String,
    ) -> Result<(), String> {
        self.core
            .catalog
            .skip_ticks(job, kind, &ticks, &why)
            .await
            .map(|n| {
                if n > 0 {
                    self.core
                        .metrics
                        .skipped
                        .with_label_values(&[job, kind.as_str()])
                        .inc_by(n);
                }
            })
            .map_err(|e| e.to_string())
    }

    async fn claim(&self, run: &RunCtx) -> Result<Option<backstop_scheduler::Claim>, ClaimError> {
        let Some(node) = self.node() else {
            return Ok(None);
        };
        if !node.trusted() {
            return Err(ClaimError::Elsewhere);
        }
        // Asked of this node (the run API): it runs here, now, as a new run,
        // or says who runs the job, as one host refuses a busy job.
        if run.trigger == backstop_scheduler::Trigger::Api {
            return match self
                .core
                .catalog
                .claim_now(&node.id(), &run.job, run.kind, None)
                .await
            {
                Ok(Ok(c)) => Ok(Some(c)),
                Ok(Err(holder)) => Err(ClaimError::Failed(format!(
                    "a {} of job \"{}\" is already running on {holder}",
                    run.kind, run.job
                ))),
                Err(e) => Err(ClaimError::Failed(format!(
                    "cannot claim the run in the catalog: {e}"
                ))),
            };
        }
        match self
            .core
            .catalog
            .claim(&node.id(), &run.job, run.kind)
            .await
        {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => Err(ClaimError::Elsewhere),
            Err(e) => {
                warn!(job = %run.job, error = %e, "Cannot claim a run in the catalog; the run stays pending for any node.");
                Err(ClaimError::Elsewhere)
            }
        }
    }

    async fn next_attempt(&self, run: &mut RunCtx, error: &str) -> Result<(), String> {
        let Some(claim) = run.claim.clone() else {
            return Ok(());
        };
        match self.core.catalog.next_attempt(&claim, error).await {
            Ok(Some(next)) => {
                run.claim = Some(next);
                Ok(())
            }
            Ok(None) => Err("this node lost its claim on the run before retrying it".into()),
            Err(e) => Err(format!("cannot record the retry in the catalog: {e}")),
        }
    }

    async fn release(&self, run: &RunCtx, ending: Ending<'_>) {
        let Some(claim) = &run.claim else {
            return;
        };
        let how = match ending {
            Ending::Done(o, _) => Release::Done(o, None),
            Ending::Failed(e) => Release::Done(backstop_scheduler::Outcome::Failed, Some(e)),
            Ending::Interrupted(e) => Release::Interrupted(e),
        };
        match self.core.catalog.release(claim, how).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(job = %run.job, run = claim.run, attempt = claim.attempt, "This node's claim on the run was gone when it ended (its lease expired): nothing was recorded; the node that reaped it owns the run now.");
            }
            Err(e) => {
                warn!(job = %run.job, run = claim.run, error = %e, "Cannot record the run's end in the catalog; once this node's lease expires it is reaped and re-run.");
            }
        }
    }
}

/// A one-shot `backstop backup` against a shared catalog: this process
/// joins the fleet as a `cli` node, claims a new run of the job (refused
/// while any node runs one), keeps its lease while the backup runs (and
/// stops it if the lease cannot be kept), records how it ended, and leaves.
///
/// # Errors
/// As [`backstop_pipeline::run_backup`]; [`BackupError::Locked`] when
/// another node runs the job.
pub async fn claimed_backup(
    config: &Config,
    job: &backstop_config::JobConfig,
    catalog: &Catalog,
) -> Result<backstop_pipeline::cluster::Ran, backstop_pipeline::BackupError> {
    use backstop_pipeline::BackupError;
    let node = FleetNode::join(catalog, config, "cli")
        .await
        .map_err(|e| BackupError::Locked(format!("cannot join the fleet: {e:#}")))?;
    let claim = match catalog
        .claim_now(&node.id(), &job.name, RunKind::Backup, None)
        .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(holder)) => {
            node.leave(catalog).await;
            return Err(BackupError::Locked(format!(
                "another backstop process ({holder}) is running a backup of job \"{}\"; wait for it",
                job.name
            )));
        }
        Err(e) => {
            node.leave(catalog).await;
            return Err(BackupError::Catalog(e));
        }
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let keeper = {
        let (node, catalog, cancel) = (node.clone(), catalog.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(node.heartbeat).await;
                match catalog.renew_lease(&node.id(), node.lease).await {
                    Ok(true) => *lock(&node.renewed) = Instant::now(),
                    Ok(false) => {
                        error!(
                            "This process's lease expired; stopping the backup (nothing of it is published)."
                        );
                        cancel.cancel();
                        return;
                    }
                    Err(e) if !node.trusted() => {
                        error!(error = %e, "Cannot renew this process's lease within its trust window; stopping the backup.");
                        cancel.cancel();
                        return;
                    }
                    Err(e) => warn!(error = %e, "Cannot renew this process's lease; retrying."),
                }
            }
        })
    };
    let result =
        backstop_pipeline::cluster::run_job_backup(config, job, catalog, &cancel, Some(&claim))
            .await;
    keeper.abort();
    let message = result
        .as_ref()
        .err()
        .map(|e| backstop_pipeline::one_line(e));
    let suspect = result.as_ref().ok().and_then(|r| r.suspect());
    let how = match &result {
        Ok(_) if suspect.is_some() => {
            Release::Done(backstop_scheduler::Outcome::Suspect, suspect.as_deref())
        }
        Ok(_) => Release::Done(backstop_scheduler::Outcome::Success, None),
        Err(BackupError::Interrupted | BackupError::LostClaim(_)) => {
            Release::Interrupted(message.as_deref().unwrap_or("interrupted"))
        }
        Err(_) => Release::Done(backstop_scheduler::Outcome::Failed, message.as_deref()),
    };
    if let Err(e) = catalog.release(&claim, how).await {
        warn!(job = %job.name, error = %e, "Cannot record the run's end in the catalog.");
    }
    node.leave(catalog).await;
    result
}
