//! This process as a node of a fleet: its lease, the heartbeat that renews
//! it, reaping dead nodes, picking up pending runs, and keeping the
//! catalog's account of this node true.
//!
//! - The lease is trusted for `lease − heartbeat` from when the renewal was
//!   *sent* (the catalog's lease starts no earlier), and a watchdog stops
//!   this node's runs the moment that runs out, whatever the heartbeat is
//!   waiting for; every catalog call of the heartbeat has a time limit.
//! - What the catalog says this node holds is reconciled with what runs
//!   here at every heartbeat: an end that could not be recorded is
//!   recorded again, and a run held but not running here (a claim whose
//!   reply was lost) is given back.
//! - A tick that could not be recorded is tried again at every heartbeat.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use backstop_scheduler::{Clock, Ledger, Outcome, RunKind, Runner, Scheduler, Trigger};
use backstop_vocab::Claim;
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::catalog::{
    ClaimableEntry, FleetCatalog, FleetResult, NodeInfo, NodeStatus, Reaped, Release, Waiting,
};

/// The fleet as a whole is read for the metrics at every this many beats.
const FLEET_EVERY: u64 = 4;

/// What a node tells the process around it (metrics, in the daemon).
pub trait Hooks: Send + Sync {
    /// The node registered (at start, or anew after its lease was lost).
    fn registered(&self, _id: &str) {}
    /// Whether the node can trust its lease now.
    fn lease_ok(&self, _ok: bool) {}
    /// A dead node's run was put back (or given up).
    fn reaped(&self, _r: &Reaped) {}
    /// Every node the catalog knows (read every few beats).
    fn fleet_seen(&self, _nodes: &[NodeStatus]) {}
    /// The runs waiting to be claimed (read with the nodes).
    fn waiting_seen(&self, _waiting: &[Waiting]) {}
    /// A claim call of this node took `took` (whatever it answered).
    fn claimed(&self, _took: Duration) {}
    /// Ticks recorded as skipped.
    fn ticks_skipped(&self, _job: &str, _kind: RunKind, _n: u64) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a run held here ended, kept until the catalog has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Done(Outcome, Option<String>, Option<RunKind>),
    Interrupted(String),
}

impl Ended {
    pub(crate) fn release(&self) -> Release<'_> {
        match self {
            Ended::Done(o, e, then) => Release::Done(*o, e.as_deref(), *then),
            Ended::Interrupted(why) => Release::Interrupted(why),
        }
    }
}

/// A run this node holds in the catalog.
#[derive(Debug, Clone)]
struct Held {
    claim: Claim,
    /// Set once the run ended here and the catalog could not be told.
    ended: Option<Ended>,
}

/// This node's own account of what it holds and owes the catalog.
#[derive(Default)]
struct Local {
    held: BTreeMap<i64, Held>,
    /// Claims whose call is in flight (job, kind): what the catalog shows
    /// held by this node for those may not be known here yet.
    claiming: BTreeMap<(String, RunKind), u32>,
    /// Ticks that could not be recorded: (job, kind, at, max attempts).
    unrecorded: BTreeSet<(String, RunKind, DateTime<Utc>, u32)>,
}

/// This process's node.
pub struct FleetNode {
    /// The catalog of the runs' bookkeeping (claims, releases).
    pub catalog: Arc<dyn FleetCatalog>,
    /// The heartbeat's own way to the catalog (its own connection in
    /// production), so busy run bookkeeping cannot hold up the lease.
    beat: Arc<dyn FleetCatalog>,
    pub hooks: Arc<dyn Hooks>,
    clock: Arc<dyn Clock>,
    id: RwLock<String>,
    /// What it registers as (again, after its lease expired): the config
    /// digest follows reloads.
    info: Mutex<NodeInfo>,
    lease: Duration,
    trust: Duration,
    pub heartbeat: Duration,
    renewed: Mutex<Instant>,
    lease_ok: AtomicBool,
    beats: AtomicU64,
    local: Mutex<Local>,
    /// Whether the heartbeat may claim pending runs: not before this
    /// process recorded the ticks it missed ([`Self::caught_up`]). A run
    /// its reaper puts back would otherwise be claimed before the newer
    /// tick that supersedes it is recorded, and an old tick would run
    /// before the newest.
    claiming: AtomicBool,
}

impl FleetNode {
    /// Registers a node (`info.mode`: daemon | run-due | cli).
    ///
    /// # Errors
    /// When the catalog cannot register it.
    pub async fn join(
        catalog: Arc<dyn FleetCatalog>,
        beat: Arc<dyn FleetCatalog>,
        hooks: Arc<dyn Hooks>,
        clock: Arc<dyn Clock>,
        info: NodeInfo,
        lease: Duration,
        heartbeat: Duration,
    ) -> FleetResult<Arc<Self>> {
        let sent = Instant::now();
        let id = catalog.register_node(&info, lease).await?;
        info!(node = %id, hostname = %info.hostname, mode = %info.mode, config_hash = %info.config_hash, lease = ?lease, "Joined the fleet.");
        hooks.registered(&id);
        hooks.lease_ok(true);
        Ok(Arc::new(Self {
            catalog,
            beat,
            hooks,
            clock,
            id: RwLock::new(id),
            info: Mutex::new(info),
            lease,
            trust: lease.saturating_sub(heartbeat),
            heartbeat,
            renewed: Mutex::new(sent),
            lease_ok: AtomicBool::new(true),
            beats: AtomicU64::new(0),
            local: Mutex::new(Local::default()),
            claiming: AtomicBool::new(false),
        }))
    }

    /// This process recorded the ticks it missed (its catch-up is over):
    /// from now on its heartbeat claims pending runs.
    pub fn caught_up(&self) {
        self.claiming.store(true, Ordering::SeqCst);
    }

    /// The config digest this node registers with from now on (a reload
    /// changed it; the catalog's row is updated by the caller).
    pub fn set_config_hash(&self, hash: &str) {
        lock(&self.info).config_hash = hash.to_string();
    }

    /// The config digest this node registers with.
    pub fn config_hash(&self) -> String {
        lock(&self.info).config_hash.clone()
    }

    pub fn id(&self) -> String {
        self.id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The node's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Whether the lease was renewed recently enough to be sure no other
    /// node may have reaped this one's runs.
    pub fn trusted(&self) -> bool {
        lock(&self.renewed).elapsed() < self.trust
    }

    /// When trust in the lease runs out, unless it is renewed.
    fn trusted_until(&self) -> Instant {
        *lock(&self.renewed) + self.trust
    }

    /// Records a renewal sent at `sent` that succeeded: the catalog's new
    /// lease started no earlier than that.
    pub fn renewed_at(&self, sent: Instant) {
        let mut r = lock(&self.renewed);
        *r = (*r).max(sent);
    }

    /// Renews the lease once (within the heartbeat's time limit), for a
    /// process that holds one run and no scheduler (a one-shot command).
    /// False: the lease is gone.
    ///
    /// # Errors
    /// When the catalog did not answer in time or failed.
    pub async fn renew(&self) -> FleetResult<bool> {
        let sent = Instant::now();
        let ok = self
            .limited(self.beat.renew_lease(&self.id(), self.lease))
            .await?;
        if ok {
            self.renewed_at(sent);
        }
        Ok(ok)
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

    /// Stops this node's runs when its lease can no longer be trusted
    /// (once per loss of trust).
    fn distrust<R: Runner, L: Ledger, C: Clock>(&self, sched: &Scheduler<R, L, C>) {
        if self.lease_ok.swap(false, Ordering::SeqCst) {
            error!(node = %self.id(), trust = ?self.trust, "The lease was not renewed within its trust window (catalog unreachable, or this process was paused); stopping this node's runs before another node may take them over.");
            self.hooks.lease_ok(false);
            sched.abandon_runs();
        }
    }

    /// A catalog call of the heartbeat, within its time limit (a hung call
    /// must not hold the heartbeat past the lease).
    async fn limited<T>(&self, call: impl Future<Output = FleetResult<T>>) -> FleetResult<T> {
        match tokio::time::timeout(self.heartbeat, call).await {
            Ok(r) => r,
            Err(_) => Err(crate::FleetError(format!(
                "no answer within {:?}",
                self.heartbeat
            ))),
        }
    }

    /// Runs the heartbeat every `heartbeat` (sooner again after a failed
    /// renewal) and the trust watchdog, until `stop`.
    pub fn keep_beating<R: Runner, L: Ledger, C: Clock>(
        self: Arc<Self>,
        sched: Scheduler<R, L, C>,
        entries: Arc<dyn Fn() -> Arc<Vec<ClaimableEntry>> + Send + Sync>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let watch = {
            let (me, sched, stop) = (self.clone(), sched.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let until = me.trusted_until();
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep_until(until) => {}
                    }
                    if !me.trusted() {
                        me.distrust(&sched);
                        tokio::select! {
                            biased;
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(me.heartbeat / 6) => {}
                        }
                    }
                }
            })
        };
        tokio::spawn(async move {
            loop {
                let renewed = self.beat(&sched, &entries()).await;
                let wait = if renewed {
                    self.heartbeat
                } else {
                    self.heartbeat / 6
                };
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            watch.abort();
        })
    }

    /// One heartbeat: renew the lease (registering anew if it is gone),
    /// record ticks that could not be, reconcile what this node holds, reap
    /// dead nodes, pick up pending runs. Returns whether the lease was
    /// renewed.
    ///
    /// Length: one heartbeat's steps in order; the order is the protocol.
    pub async fn beat<R: Runner, L: Ledger, C: Clock>(
        &self,
        sched: &Scheduler<R, L, C>,
        entries: &[ClaimableEntry],
    ) -> bool {
        if !self.trusted() {
            self.distrust(sched);
        }
        let sent = Instant::now();
        match self
            .limited(self.beat.renew_lease(&self.id(), self.lease))
            .await
        {
            Ok(true) => {
                self.renewed_at(sent);
                if !self.lease_ok.swap(true, Ordering::SeqCst) {
                    self.hooks.lease_ok(true);
                }
            }
            Ok(false) => {
                warn!(node = %self.id(), "This node's lease expired (it was paused or cut off from the catalog): its runs are stopped and nothing of theirs is published; registering as a new node.");
                self.set_lease_ok(false);
                sched.abandon_runs();
                // What the old node held is the reaper's now.
                lock(&self.local).held.clear();
                let sent = Instant::now();
                let info = lock(&self.info).clone();
                match self
                    .limited(self.beat.register_node(&info, self.lease))
                    .await
                {
                    Ok(id) => {
                        info!(old = %self.id(), node = %id, "Registered anew.");
                        self.hooks.registered(&id);
                        *self
                            .id
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
                        *lock(&self.renewed) = sent;
                        self.set_lease_ok(true);
                    }
                    Err(e) => {
                        warn!(error = %e, "Cannot register anew; retrying soon.");
                        return false;
                    }
                }
            }
            Err(e) => {
                warn!(node = %self.id(), error = %e, "Cannot renew this node's lease; retrying soon.");
                return false;
            }
        }
        self.record_unrecorded().await;
        self.reap_dead().await;
        // The fleet as a whole (for metrics) every few beats; what this
        // node holds at every one.
        if self
            .beats
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(FLEET_EVERY)
        {
            match self.limited(self.beat.fleet()).await {
                Ok(nodes) => self.hooks.fleet_seen(&nodes),
                Err(e) => warn!(error = %e, "Cannot read the fleet's nodes."),
            }
            match self.limited(self.beat.waiting()).await {
                Ok(waiting) => self.hooks.waiting_seen(&waiting),
                Err(e) => warn!(error = %e, "Cannot read the fleet's waiting runs."),
            }
        }
        match self.limited(self.beat.held(&self.id())).await {
            Ok(runs) => {
                let me = self.id();
                let held: Vec<Claim> = runs
                    .iter()
                    .map(|r| Claim {
                        run: r.run,
                        attempt: r.attempt,
                        node: me.clone(),
                        scheduled_for: r.scheduled_for,
                    })
                    .collect();
                let kinds: Vec<(String, Option<RunKind>)> = runs
                    .iter()
                    .map(|r| (r.job.clone(), RunKind::parse(&r.kind)))
                    .collect();
                self.reconcile(&held, &kinds).await;
            }
            Err(e) => warn!(error = %e, "Cannot read which runs the catalog says this node holds."),
        }
        if self.trusted() && self.claiming.load(Ordering::SeqCst) {
            let _ = self.pick_up(sched, entries).await;
        }
        true
    }

    /// Reaps the nodes whose lease expired (their runs go back to pending).
    pub async fn reap_dead(&self) {
        match self.limited(self.beat.reap(self.now())).await {
            Ok(reaped) => {
                for r in reaped {
                    warn!(job = %r.job, kind = %r.kind, run = r.run, dead_node = %r.node, now = %r.now, "A node's lease expired while it held this run: its attempt is interrupted and the run goes back to pending (another node re-runs it).");
                    self.hooks.reaped(&r);
                }
            }
            Err(e) => warn!(error = %e, "Cannot reap expired nodes."),
        }
    }

    /// Tries again the ticks that could not be recorded.
    async fn record_unrecorded(&self) {
        let todo: Vec<_> = lock(&self.local).unrecorded.iter().cloned().collect();
        for t in todo {
            if self
                .limited(self.beat.record_tick(&t.0, t.1, t.2, t.3))
                .await
                .is_ok()
            {
                lock(&self.local).unrecorded.remove(&t);
            }
        }
    }

    /// Makes the catalog's account of this node true: `held` is what it
    /// says this node runs (run, attempt, job, kind, tick).
    async fn reconcile(&self, held: &[Claim], kinds: &[(String, Option<RunKind>)]) {
        let (retry, orphans) = {
            let mut l = lock(&self.local);
            // Ended here and told: gone from the catalog's account.
            l.held.retain(|run, h| {
                h.ended.is_none()
                    || held
                        .iter()
                        .any(|x| x.run == *run && x.attempt == h.claim.attempt)
            });
            let retry: Vec<(Claim, Ended)> = l
                .held
                .values()
                .filter_map(|h| h.ended.clone().map(|e| (h.claim.clone(), e)))
                .collect();
            let orphans: Vec<Claim> = held
                .iter()
                .zip(kinds)
                .filter(|(c, (job, kind))| {
                    !l.held.contains_key(&c.run)
                        && kind.is_none_or(|k| !l.claiming.contains_key(&(job.clone(), k)))
                })
                .map(|(c, _)| c.clone())
                .collect();
            (retry, orphans)
        };
        for (claim, ended) in retry {
            match self
                .limited(self.beat.release(&claim, ended.release(), self.now()))
                .await
            {
                Ok(_) => {
                    lock(&self.local).held.remove(&claim.run);
                }
                Err(e) => {
                    warn!(run = claim.run, error = %e, "Still cannot record how a run ended; trying again at the next heartbeat.")
                }
            }
        }
        for claim in orphans {
            warn!(
                run = claim.run,
                "The catalog says this node holds a run it does not run (the claim's reply was lost): giving it back."
            );
            let why =
                "claimed by a node that never learnt it (the claim's reply was lost); given back";
            let _ = self
                .limited(
                    self.catalog
                        .release(&claim, Release::Interrupted(why), self.now()),
                )
                .await;
        }
    }

    /// A claim call for `job`/`kind` begins or ends.
    pub(crate) fn claiming(&self, job: &str, kind: RunKind, starts: bool) {
        let mut l = lock(&self.local);
        let key = (job.to_string(), kind);
        if starts {
            *l.claiming.entry(key).or_default() += 1;
        } else if let Some(n) = l.claiming.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                l.claiming.remove(&key);
            }
        }
    }

    /// This node holds `claim` now.
    pub(crate) fn holds(&self, claim: &Claim) {
        lock(&self.local).held.insert(
            claim.run,
            Held {
                claim: claim.clone(),
                ended: None,
            },
        );
    }

    /// The run of `claim` ended here: forgotten once the catalog has it,
    /// kept to be told again when it could not be.
    pub(crate) fn ended(&self, claim: &Claim, told: bool, ended: Ended) {
        let mut l = lock(&self.local);
        if told {
            l.held.remove(&claim.run);
        } else {
            l.held.insert(
                claim.run,
                Held {
                    claim: claim.clone(),
                    ended: Some(ended),
                },
            );
        }
    }

    /// A tick that could not be recorded, to try again.
    pub(crate) fn unrecorded(&self, job: &str, kind: RunKind, at: DateTime<Utc>, max: u32) {
        lock(&self.local)
            .unrecorded
            .insert((job.to_string(), kind, at, max));
    }

    /// Triggers a local run for each of `entries` with a pending run in the
    /// catalog; each claims it once it has a slot. Returns how many.
    ///
    /// # Errors
    /// When the catalog could not say (logged here too).
    pub async fn pick_up<R: Runner, L: Ledger, C: Clock>(
        &self,
        sched: &Scheduler<R, L, C>,
        entries: &[ClaimableEntry],
    ) -> FleetResult<usize> {
        match self.limited(self.beat.claimable(entries, self.now())).await {
            Ok(due) => {
                let n = due.len();
                for (job, kind) in due {
                    let _ = sched.trigger(&job, kind, Trigger::Fleet);
                }
                Ok(n)
            }
            Err(e) => {
                warn!(error = %e, "Cannot look for pending runs in the catalog.");
                Err(e)
            }
        }
    }
}
