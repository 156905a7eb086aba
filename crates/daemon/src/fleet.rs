//! This process as a node of a fleet (a PostgreSQL catalog several
//! processes share). The protocol (lease, heartbeat, claims, releases,
//! reconciling what the catalog says this node holds) is
//! [`backstop_fleet`]'s, proven there by simulation; the catalog crate
//! implements it on PostgreSQL. Here it is wired to the daemon: its
//! metrics, its config, and the scheduler's ledger.

use std::sync::{Arc, Mutex};

use backstop_catalog::Catalog;
use backstop_config::Config;
use backstop_fleet::{
    Attempts, ClaimableEntry, FleetCatalog, FleetLedger, FleetNode, Hooks, NodeInfo, NodeStatus,
    Reaped, Release, Waiting,
};
use backstop_scheduler::{ClaimError, Clock, Ending, Ledger, RunCtx, RunKind};
use chrono::{DateTime, Utc};
use tracing::{error, warn};

use super::{Core, Sched};
use crate::metrics::Metrics;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The clock a node stamps runs with (the test build's clock in tests).
pub(crate) struct CatalogClock;

impl Clock for CatalogClock {
    fn now(&self) -> DateTime<Utc> {
        backstop_vocab::now()
    }
}

/// What the node tells the daemon: its id to the catalog (runs recorded
/// by this process carry it) and the fleet's metrics.
struct DaemonHooks {
    catalog: Catalog,
    gauges: Option<FleetGauges>,
}

struct FleetGauges {
    lease_ok: prometheus::IntGauge,
    nodes: prometheus::IntGauge,
    configs: prometheus::IntGauge,
    runs: prometheus::IntCounterVec,
    skipped: prometheus::IntCounterVec,
    pending: prometheus::GaugeVec,
    pending_age: prometheus::GaugeVec,
    node_running: prometheus::GaugeVec,
    claim: prometheus::Histogram,
}

impl Hooks for DaemonHooks {
    fn registered(&self, id: &str) {
        self.catalog.set_node(Some(id.to_string()));
    }

    fn lease_ok(&self, ok: bool) {
        if let Some(g) = &self.gauges {
            g.lease_ok.set(i64::from(ok));
        }
    }

    fn reaped(&self, r: &Reaped) {
        if let Some(g) = &self.gauges {
            g.runs
                .with_label_values(&[&r.job, &r.kind, "interrupted"])
                .inc();
        }
    }

    fn fleet_seen(&self, nodes: &[NodeStatus]) {
        let Some(g) = &self.gauges else {
            return;
        };
        let live: Vec<&NodeStatus> = nodes.iter().filter(|n| n.live).collect();
        let mut hashes: Vec<&str> = live.iter().map(|n| n.config_hash.as_str()).collect();
        hashes.sort_unstable();
        hashes.dedup();
        g.nodes.set(live.len() as i64);
        g.configs.set(hashes.len() as i64);
        // Nodes come and go: the series are the live ones now.
        g.node_running.reset();
        for n in live {
            g.node_running
                .with_label_values(&[&n.id, &n.hostname])
                .set(n.runs.len() as f64);
        }
    }

    fn waiting_seen(&self, waiting: &[Waiting]) {
        let Some(g) = &self.gauges else {
            return;
        };
        let now = backstop_vocab::now();
        g.pending.reset();
        g.pending_age.reset();
        for w in waiting {
            let labels = [w.job.as_str(), w.kind.as_str()];
            g.pending.with_label_values(&labels).set(w.runs as f64);
            let age = (now - w.since).num_milliseconds().max(0) as f64 / 1000.0;
            g.pending_age.with_label_values(&labels).set(age);
        }
    }

    fn claimed(&self, took: std::time::Duration) {
        if let Some(g) = &self.gauges {
            g.claim.observe(took.as_secs_f64());
        }
    }

    fn ticks_skipped(&self, job: &str, kind: RunKind, n: u64) {
        if let Some(g) = &self.gauges {
            g.skipped.with_label_values(&[job, kind.as_str()]).inc_by(n);
        }
    }
}

/// This process's node, with what it may claim under the config in force.
pub struct Fleet {
    pub node: Arc<FleetNode>,
    /// [`claimable_entries`] of the config in force, made once per config
    /// (a heartbeat of a node with 1,000 jobs spent half its time on it).
    entries: Mutex<Option<(Arc<Config>, Entries)>>,
}

type Entries = Arc<Vec<ClaimableEntry>>;

impl std::ops::Deref for Fleet {
    type Target = FleetNode;
    fn deref(&self) -> &FleetNode {
        &self.node
    }
}

impl Fleet {
    /// Registers this process as a node (`mode`: daemon | run-due | cli);
    /// its heartbeat gets a connection of its own. `metrics`: where the
    /// fleet's gauges go (None for a one-shot command).
    ///
    /// # Errors
    /// When the catalog cannot register it.
    pub async fn join(
        catalog: &Catalog,
        config: &Config,
        metrics: Option<&Metrics>,
        mode: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let hooks = DaemonHooks {
            catalog: catalog.clone(),
            gauges: metrics.map(|m| FleetGauges {
                lease_ok: m.fleet_lease_ok.clone(),
                nodes: m.fleet_nodes.clone(),
                configs: m.fleet_config_hashes.clone(),
                runs: m.runs.clone(),
                skipped: m.skipped.clone(),
                pending: m.fleet_pending.clone(),
                pending_age: m.fleet_pending_age.clone(),
                node_running: m.fleet_node_running.clone(),
                claim: m.fleet_claim.clone(),
            }),
        };
        let node = FleetNode::join(
            Arc::new(catalog.clone()),
            Arc::new(
                catalog
                    .heartbeat()
                    .ok_or_else(|| anyhow::anyhow!("a fleet needs a PostgreSQL catalog"))?,
            ),
            Arc::new(hooks),
            Arc::new(CatalogClock),
            NodeInfo::this_process(&config.hash, mode),
            config.daemon.lease,
            config.daemon.heartbeat,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot join the fleet: {e}"))?;
        Ok(Arc::new(Self {
            node,
            entries: Mutex::new(None),
        }))
    }

    /// What this node may claim under `config`.
    pub fn claimable(&self, config: &Arc<Config>) -> Entries {
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

    /// Beats every `daemon.heartbeat` (with the lease's watchdog) until
    /// `stop` is cancelled.
    pub fn keep_beating(
        self: &Arc<Self>,
        core: Arc<Core>,
        sched: Sched,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        self.node
            .clone()
            .keep_beating(sched, Arc::new(move || me.claimable(&core.config())), stop)
    }
}

/// The (job, kind, starting deadline) of every entry this node can run.
fn claimable_entries(config: &Config) -> Vec<ClaimableEntry> {
    let mut out = Vec::new();
    for job in &config.jobs {
        let mut add = |kind| {
            out.push(ClaimableEntry {
                job: job.name.clone(),
                kind,
                starting_deadline: job.starting_deadline,
            })
        };
        add(RunKind::Backup);
        if job.verify.is_some() {
            add(RunKind::Verify);
        }
        if job.retention.is_some() {
            add(RunKind::Prune);
        }
    }
    out
}

/// Failed attempts a run of a job's kind may have (its retries + 1), from
/// the config in force.
impl Attempts for Core {
    fn max_attempts(&self, job: &str, kind: RunKind) -> u32 {
        match (kind, self.config().job(job)) {
            (RunKind::Backup, Some(j)) => j.retries.saturating_add(1),
            _ => 1,
        }
    }
}

/// The catalog as the scheduler's ledger: last successes for catch-up
/// and, in a fleet, the fleet's ledger (ticks, claims and releases).
pub struct CatalogLedger {
    core: Arc<Core>,
    fleet: Option<FleetLedger>,
}

impl CatalogLedger {
    pub fn new(core: &Arc<Core>) -> Self {
        Self {
            core: core.clone(),
            fleet: core.fleet.as_ref().map(|f| FleetLedger {
                node: f.node.clone(),
                attempts: core.clone(),
            }),
        }
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
        self.fleet.is_some()
    }

    async fn record_tick(&self, job: &str, kind: RunKind, at: DateTime<Utc>) {
        if let Some(f) = &self.fleet {
            f.record_tick(job, kind, at).await;
        }
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, String> {
        match &self.fleet {
            Some(f) => f.last_tick(job, kind, at_or_before).await,
            None => Ok(None),
        }
    }

    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Option<Vec<DateTime<Utc>>>, String> {
        match &self.fleet {
            Some(f) => f.recorded_ticks(job, kind, from, to).await,
            None => Ok(None),
        }
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: Vec<DateTime<Utc>>,
        why: String,
    ) -> Result<(), String> {
        match &self.fleet {
            Some(f) => f.skip_ticks(job, kind, ticks, why).await,
            None => Ok(()),
        }
    }

    async fn claim(&self, run: &RunCtx) -> Result<Option<backstop_scheduler::Claim>, ClaimError> {
        match &self.fleet {
            Some(f) => f.claim(run).await,
            None => Ok(None),
        }
    }

    async fn next_attempt(&self, run: &mut RunCtx, error: &str) -> Result<(), String> {
        match &self.fleet {
            Some(f) => f.next_attempt(run, error).await,
            None => Ok(()),
        }
    }

    async fn release(&self, run: &RunCtx, ending: Ending<'_>) {
        if let Some(f) = &self.fleet {
            f.release(run, ending).await;
        }
    }
}

/// A one-shot command (`backup`, `verify`, `drill`, `prune`) against a
/// shared catalog: this process as a `cli` node of the fleet. The runs it
/// records carry its node id, so if it dies its lease expires and another
/// node ends them `interrupted` (a row with no node would stay `running`
/// for good). Its lease is renewed while it works; `cancel` fires when the
/// lease cannot be kept, and the work must then stop (another node may
/// take its claimed run over).
pub struct CliNode {
    node: Arc<FleetNode>,
    catalog: Catalog,
    /// Fires when this process's lease is lost.
    pub cancel: tokio_util::sync::CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl CliNode {
    /// Joins the fleet when `catalog` is shared (None otherwise).
    ///
    /// # Errors
    /// When the catalog cannot register this process.
    pub async fn join(config: &Config, catalog: &Catalog) -> anyhow::Result<Option<Self>> {
        if !catalog.is_shared() {
            return Ok(None);
        }
        let node = Fleet::join(catalog, config, None, "cli")
            .await?
            .node
            .clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        let keeper = {
            let (node, cancel) = (node.clone(), cancel.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(node.heartbeat).await;
                    match node.renew().await {
                        Ok(true) => {}
                        Ok(false) => {
                            error!(
                                "This process's lease expired; stopping its work (another node may take it over)."
                            );
                            cancel.cancel();
                            return;
                        }
                        Err(e) if !node.trusted() => {
                            error!(error = %e, "Cannot renew this process's lease within its trust window; stopping its work.");
                            cancel.cancel();
                            return;
                        }
                        Err(e) => warn!(error = %e, "Cannot renew this process's lease; retrying."),
                    }
                }
            })
        };
        Ok(Some(Self {
            node,
            catalog: catalog.clone(),
            cancel,
            keeper,
        }))
    }

    /// Claims a new run of `job`'s `kind` for this process: `Ok(Err(holder))`
    /// while another node runs one.
    ///
    /// # Errors
    /// The catalog's.
    pub async fn claim(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Result<backstop_catalog::Claim, String>, backstop_catalog::CatalogError> {
        self.catalog
            .claim_now(&self.node.id(), job, kind, None, backstop_vocab::now())
            .await
    }

    /// Records how a claimed run ended (a failure to is logged: leaving
    /// puts the run back as if this process had died).
    pub async fn release(&self, claim: &backstop_catalog::Claim, how: Release<'_>) {
        if let Err(e) =
            FleetCatalog::release(&self.catalog, claim, how, backstop_vocab::now()).await
        {
            warn!(run = claim.run, error = %e, "Cannot record the run's end in the catalog; leaving the fleet puts the run back as if this process had died.");
        }
    }

    /// Stops renewing and leaves the fleet.
    pub async fn leave(self) {
        self.keeper.abort();
        self.node.leave().await;
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
    interrupt: &tokio_util::sync::CancellationToken,
) -> Result<backstop_pipeline::backup::cluster::Ran, backstop_pipeline::BackupError> {
    use backstop_pipeline::BackupError;
    let node = CliNode::join(config, catalog)
        .await
        .map_err(|e| BackupError::Locked(format!("{e:#}")))?
        .ok_or_else(|| BackupError::Locked("a claimed backup needs a shared catalog".into()))?;
    let claim = match node.claim(&job.name, RunKind::Backup).await {
        Ok(Ok(c)) => c,
        Ok(Err(holder)) => {
            node.leave().await;
            return Err(BackupError::Locked(format!(
                "another backstop process ({holder}) is running a backup of job \"{}\"; wait for it",
                job.name
            )));
        }
        Err(e) => {
            node.leave().await;
            return Err(BackupError::Catalog(e));
        }
    };
    // Stopped by a lost lease or by the process's signal.
    let cancel = node.cancel.child_token();
    let stop = cancel.clone();
    let signalled = interrupt.clone();
    let relay = tokio::spawn(async move {
        signalled.cancelled().await;
        stop.cancel();
    });
    let result = backstop_pipeline::backup::cluster::run_job_backup(
        config,
        job,
        catalog,
        &cancel,
        Some(&claim),
    )
    .await;
    relay.abort();
    let message = match &result {
        Ok(ran) => ran.failed_members().map(|c| c.failure_line()),
        Err(e) => Some(backstop_pipeline::one_line(e)),
    };
    let summary = result.as_ref().ok().map(|r| r.summary());
    // Retention after the backup, as a daemon queues it: any node runs it.
    let then = job.retention.is_some().then_some(RunKind::Prune);
    let how = match (&result, &summary) {
        (Ok(ran), _) if ran.failed_members().is_some() => Release::Done(
            backstop_scheduler::Outcome::Failed,
            message.as_deref(),
            None,
        ),
        (Ok(_), Some(s)) => Release::Done(s.outcome, s.error.as_deref(), then),
        (Err(BackupError::Interrupted | BackupError::LostClaim(_)), _) => {
            Release::Interrupted(message.as_deref().unwrap_or("interrupted"))
        }
        _ => Release::Done(
            backstop_scheduler::Outcome::Failed,
            message.as_deref(),
            None,
        ),
    };
    node.release(&claim, how).await;
    node.leave().await;
    result
}
