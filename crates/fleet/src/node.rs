//! This process as a node of a fleet: its lease, the heartbeat that renews
//! it, reaping dead nodes, and picking up pending runs.
//!
//! A node trusts its lease for `lease − heartbeat` after the last renewal.
//! Past that (the catalog is unreachable, or the process was paused) it
//! stops its runs itself, before any other node may reap them; when the
//! catalog says the lease is gone, it registers anew.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backstop_scheduler::{Clock, Ledger, RunKind, Runner, Scheduler, Trigger};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::catalog::{ClaimableEntry, FleetCatalog, FleetResult, NodeInfo, Reaped};

/// What a node tells the process around it (metrics, in the daemon).
pub trait Hooks: Send + Sync {
    /// Whether the node can trust its lease now.
    fn lease_ok(&self, _ok: bool) {}
    /// A dead node's run was put back (or given up).
    fn reaped(&self, _r: &Reaped) {}
    /// Live nodes and distinct config digests among them.
    fn fleet_seen(&self, _live: usize, _configs: usize) {}
    /// Ticks recorded as skipped.
    fn ticks_skipped(&self, _job: &str, _kind: RunKind, _n: u64) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's node.
pub struct FleetNode {
    pub catalog: Arc<dyn FleetCatalog>,
    pub hooks: Arc<dyn Hooks>,
    clock: Arc<dyn Clock>,
    id: RwLock<String>,
    info: NodeInfo,
    lease: Duration,
    trust: Duration,
    pub heartbeat: Duration,
    renewed: Mutex<Instant>,
    lease_ok: AtomicBool,
}

impl FleetNode {
    /// Registers a node (`info.mode`: daemon | run-due | cli).
    ///
    /// # Errors
    /// When the catalog cannot register it.
    pub async fn join(
        catalog: Arc<dyn FleetCatalog>,
        hooks: Arc<dyn Hooks>,
        clock: Arc<dyn Clock>,
        info: NodeInfo,
        lease: Duration,
        heartbeat: Duration,
    ) -> FleetResult<Arc<Self>> {
        let id = catalog.register_node(&info, lease).await?;
        info!(node = %id, hostname = %info.hostname, mode = %info.mode, config_hash = %info.config_hash, lease = ?lease, "Joined the fleet.");
        hooks.lease_ok(true);
        Ok(Arc::new(Self {
            catalog,
            hooks,
            clock,
            id: RwLock::new(id),
            info,
            lease,
            trust: lease.saturating_sub(heartbeat),
            heartbeat,
            renewed: Mutex::new(Instant::now()),
            lease_ok: AtomicBool::new(true),
        }))
    }

    pub fn id(&self) -> String {
        self.id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The node's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    /// Whether the lease was renewed recently enough to be sure no other
    /// node may have reaped this one's runs.
    pub fn trusted(&self) -> bool {
        lock(&self.renewed).elapsed() < self.trust
    }

    /// Records a renewal that succeeded.
    pub fn renewed_now(&self) {
        *lock(&self.renewed) = Instant::now();
    }

    /// Leaves the fleet: the node row goes (runs it still holds go back to
    /// pending for other nodes).
    pub async fn leave(&self) {
        let id = self.id();
        match self.catalog.deregister_node(&id, self.now()).await {
            Ok(left) if left.is_empty() => info!(node = %id, "Left the fleet."),
            Ok(left) => {
                warn!(node = %id, runs = left.len(), "Left the fleet; its unfinished runs go back to pending for other nodes.")
            }
            Err(e) => {
                warn!(node = %id, error = %e, "Could not leave the fleet cleanly; other nodes reap this node once its lease expires.")
            }
        }
    }

    fn set_lease_ok(&self, ok: bool) {
        self.lease_ok.store(ok, Ordering::SeqCst);
        self.hooks.lease_ok(ok);
    }

    /// One heartbeat: check trust, renew the lease (registering anew if it
    /// is gone), reap dead nodes, pick up pending runs, publish the fleet's
    /// gauges.
    pub async fn beat<R: Runner, L: Ledger, C: Clock>(
        &self,
        sched: &Scheduler<R, L, C>,
        entries: &[ClaimableEntry],
    ) {
        let catalog = &self.catalog;
        if !self.trusted() && self.lease_ok.load(Ordering::SeqCst) {
            error!(node = %self.id(), trust = ?self.trust, "The lease was not renewed within its trust window (catalog unreachable, or this process was paused); stopping this node's runs before another node may take them over.");
            self.set_lease_ok(false);
            sched.abandon_runs();
        }
        match catalog.renew_lease(&self.id(), self.lease).await {
            Ok(true) => {
                self.renewed_now();
                self.set_lease_ok(true);
            }
            Ok(false) => {
                warn!(node = %self.id(), "This node's lease expired (it was paused or cut off from the catalog): its runs are stopped and nothing of theirs is published; registering as a new node.");
                self.set_lease_ok(false);
                sched.abandon_runs();
                match catalog.register_node(&self.info, self.lease).await {
                    Ok(id) => {
                        info!(old = %self.id(), node = %id, "Registered anew.");
                        *self
                            .id
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
                        self.renewed_now();
                        self.set_lease_ok(true);
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
        match catalog.reap(self.now()).await {
            Ok(reaped) => {
                for r in reaped {
                    warn!(job = %r.job, kind = %r.kind, run = r.run, dead_node = %r.node, now = %r.now, "A node's lease expired while it held this run: its attempt is interrupted and the run goes back to pending (another node re-runs it).");
                    self.hooks.reaped(&r);
                }
            }
            Err(e) => warn!(error = %e, "Cannot reap expired nodes."),
        }
        if self.trusted() {
            self.pick_up(sched, entries).await;
        }
        match catalog.fleet().await {
            Ok(nodes) => {
                let live: Vec<_> = nodes.iter().filter(|n| n.live).collect();
                let mut hashes: Vec<&str> = live.iter().map(|n| n.config_hash.as_str()).collect();
                hashes.sort_unstable();
                hashes.dedup();
                self.hooks.fleet_seen(live.len(), hashes.len());
            }
            Err(e) => warn!(error = %e, "Cannot read the fleet's nodes."),
        }
    }

    /// Triggers a local run for each of `entries` with a pending run in the
    /// catalog; each claims it once it has a slot. Returns how many.
    pub async fn pick_up<R: Runner, L: Ledger, C: Clock>(
        &self,
        sched: &Scheduler<R, L, C>,
        entries: &[ClaimableEntry],
    ) -> usize {
        match self.catalog.claimable(entries, self.now()).await {
            Ok(due) => {
                let n = due.len();
                for (job, kind) in due {
                    let _ = sched.trigger(&job, kind, Trigger::Fleet);
                }
                n
            }
            Err(e) => {
                warn!(error = %e, "Cannot look for pending runs in the catalog.");
                0
            }
        }
    }
}
