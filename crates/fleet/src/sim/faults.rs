//! Faults between a node and the catalog, drawn from the seed: a call that
//! fails before it reaches the catalog, one that commits with its reply
//! lost, slow requests and replies, a catalog that is down for a while
//! (a failover), a node that crashed (its calls never return) or is paused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backstop_vocab::{Claim, RunKind};
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use crate::catalog::{
    ClaimableEntry, FleetCatalog, FleetError, FleetResult, HeldRun, NodeInfo, NodeStatus, Reaped,
    Release, Waiting,
};

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }

    /// A child generator (so adding draws in one place does not shift the
    /// draws of another).
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// How often each fault happens.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// A call fails before the catalog sees it.
    pub error: f64,
    /// A call commits, and its reply is lost.
    pub lost_reply: f64,
    /// A call's request and reply are slow.
    pub slow: f64,
    /// How slow (each way).
    pub slow_for: (Duration, Duration),
    /// A node crashes at a call of its runs' bookkeeping (claim, retry,
    /// fence, release, tick): before the request, or after it committed.
    pub crash: f64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        error: 0.0,
        lost_reply: 0.0,
        slow: 0.0,
        slow_for: (Duration::ZERO, Duration::ZERO),
        crash: 0.0,
    };
}

/// What the simulation does to one node.
#[derive(Default)]
pub struct NodeGate {
    /// Crashed: nothing of it ever happens again.
    pub crashed: AtomicBool,
    /// Paused until then (a SIGSTOP, a VM migration, a partition).
    pub paused_until: Mutex<Option<Instant>>,
    /// When it crashed.
    pub crashed_at: Mutex<Option<Instant>>,
}

impl NodeGate {
    /// The node crashes now.
    pub fn crash(&self) {
        if !self.crashed.swap(true, Ordering::SeqCst) {
            *self
                .crashed_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        }
    }

    /// Waits while the node is paused; never returns once it crashed.
    pub async fn pass(&self) {
        loop {
            if self.crashed.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let until = *self
                .paused_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }
}

/// The catalog as far as the whole fleet is concerned (failovers).
#[derive(Default)]
pub struct CatalogGate {
    pub down_until: Mutex<Option<Instant>>,
    /// No more faults of any kind from now on.
    pub calm: AtomicBool,
}

impl CatalogGate {
    fn down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| t > Instant::now())
    }
}

/// One node's way to the catalog.
pub struct FaultyCatalog {
    pub inner: Arc<dyn FleetCatalog>,
    pub node: Arc<NodeGate>,
    pub catalog: Arc<CatalogGate>,
    pub faults: Faults,
    pub rng: Mutex<Rng>,
}

enum Fate {
    Ok,
    Fail,
    LostReply,
    /// The node crashes once the call committed.
    CrashAfter,
}

impl FaultyCatalog {
    /// Before the call: the node's gate, the catalog's, and what befalls
    /// this call.
    async fn before(&self, crashy: bool) -> FleetResult<Fate> {
        self.node.pass().await;
        if self.catalog.calm.load(Ordering::SeqCst) {
            return Ok(Fate::Ok);
        }
        let (slow, fate, crash_before) = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slow = rng
                .chance(self.faults.slow)
                .then(|| rng.between(self.faults.slow_for.0, self.faults.slow_for.1));
            let crash = crashy && rng.chance(self.faults.crash);
            let crash_before = crash && rng.chance(0.5);
            let fate = if rng.chance(self.faults.error) {
                Fate::Fail
            } else if rng.chance(self.faults.lost_reply) {
                Fate::LostReply
            } else if crash {
                Fate::CrashAfter
            } else {
                Fate::Ok
            };
            (slow, fate, crash_before)
        };
        if crash_before {
            self.node.crash();
            self.node.pass().await;
        }
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
            self.node.pass().await;
        }
        if self.catalog.down() {
            return Err(FleetError(
                "the catalog is down (simulated failover)".into(),
            ));
        }
        match fate {
            Fate::Fail => Err(FleetError("connection reset (simulated)".into())),
            other => Ok(other),
        }
    }

    /// After the call: the reply's way back.
    async fn after<T>(&self, fate: Fate, r: FleetResult<T>) -> FleetResult<T> {
        if matches!(fate, Fate::CrashAfter) {
            self.node.crash();
        }
        if self.catalog.calm.load(Ordering::SeqCst) {
            self.node.pass().await;
            return r;
        }
        let slow = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rng.chance(self.faults.slow)
                .then(|| rng.between(self.faults.slow_for.0, self.faults.slow_for.1))
        };
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        self.node.pass().await;
        match fate {
            Fate::LostReply => Err(FleetError("the reply was lost (simulated)".into())),
            _ => r,
        }
    }
}

macro_rules! faulty {
    ($self:ident, $call:expr) => {
        faulty!($self, false, $call)
    };
    ($self:ident, $crashy:expr, $call:expr) => {{
        let fate = $self.before($crashy).await?;
        let r = $call.await;
        $self.after(fate, r).await
    }};
}

#[async_trait]
impl FleetCatalog for FaultyCatalog {
    async fn register_node(&self, info: &NodeInfo, lease: Duration) -> FleetResult<String> {
        faulty!(self, self.inner.register_node(info, lease))
    }
    async fn renew_lease(&self, node: &str, lease: Duration) -> FleetResult<bool> {
        faulty!(self, self.inner.renew_lease(node, lease))
    }
    async fn deregister_node(&self, node: &str, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        faulty!(self, self.inner.deregister_node(node, now))
    }
    async fn reap(&self, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        faulty!(self, self.inner.reap(now))
    }
    async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
    ) -> FleetResult<bool> {
        faulty!(
            self,
            true,
            self.inner.record_tick(job, kind, at, max_attempts)
        )
    }
    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> FleetResult<Vec<DateTime<Utc>>> {
        faulty!(self, self.inner.recorded_ticks(job, kind, from, to))
    }
    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> FleetResult<u64> {
        faulty!(self, self.inner.skip_ticks(job, kind, ticks, why, now))
    }
    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> FleetResult<Option<DateTime<Utc>>> {
        faulty!(self, self.inner.last_tick(job, kind, at_or_before))
    }
    async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> FleetResult<Vec<(String, RunKind)>> {
        faulty!(self, self.inner.claimable(entries, now))
    }
    async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> FleetResult<Option<Claim>> {
        faulty!(self, true, self.inner.claim(node, job, kind, now))
    }
    async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> FleetResult<Result<Claim, String>> {
        faulty!(
            self,
            true,
            self.inner.claim_now(node, job, kind, backup_id, now)
        )
    }
    async fn next_attempt(&self, claim: &Claim, error: &str) -> FleetResult<Option<Claim>> {
        faulty!(self, true, self.inner.next_attempt(claim, error))
    }
    async fn fence(&self, claim: &Claim) -> FleetResult<bool> {
        faulty!(self, true, self.inner.fence(claim))
    }
    async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> FleetResult<bool> {
        faulty!(self, true, self.inner.release(claim, how, now))
    }
    async fn last_success(&self, job: &str, kind: RunKind) -> FleetResult<Option<DateTime<Utc>>> {
        faulty!(self, self.inner.last_success(job, kind))
    }
    async fn fleet(&self) -> FleetResult<Vec<NodeStatus>> {
        faulty!(self, self.inner.fleet())
    }
    async fn held(&self, node: &str) -> FleetResult<Vec<HeldRun>> {
        faulty!(self, self.inner.held(node))
    }

    async fn waiting(&self) -> FleetResult<Vec<Waiting>> {
        faulty!(self, self.inner.waiting())
    }
    async fn forget_history(&self, before: DateTime<Utc>, limit: u32) -> FleetResult<u64> {
        faulty!(self, true, self.inner.forget_history(before, limit))
    }
}
