//! What a fleet asks of its shared catalog, whatever holds it: the
//! PostgreSQL catalog in production (the catalog crate implements
//! [`FleetCatalog`]), an in-memory one with the same semantics in the
//! simulation ([`crate::sim::SimCatalog`]).
//!
//! The protocol, as both implement it:
//! - each tick is a run row keyed by (job, kind, scheduled for): any node
//!   may insert it, the first insert wins;
//! - a node claims the oldest pending run of a (job, kind) when it has a
//!   free slot; at most one run of a (job, kind) is running at a time;
//! - nodes hold leases (on the catalog's clock) renewed by heartbeats; any
//!   node reaps nodes whose lease expired: their running attempts become
//!   interrupted and their runs pending again (up to
//!   [`MAX_INTERRUPTIONS`] times);
//! - every update that finishes or publishes a run is guarded by (run,
//!   attempt, node, running): a node whose claim is gone changes nothing;
//! - at most one run of a (job, kind) waits: a newer tick supersedes an
//!   older pending one, which is recorded as skipped with why;
//! - a run that began publishing (its fence passed) is never run again: if
//!   its node dies before it says how it ended, it ends interrupted;
//! - a successful run's follow-up (retention after a backup) is queued in
//!   the same transaction as its release, so any node runs it.
//!
//! Times a node supplies (`now`) are the node's clock; leases are the
//! catalog's.

use std::time::Duration;

use async_trait::async_trait;
use backstop_vocab::{Claim, Outcome, RunKind};
use chrono::{DateTime, Utc};

/// A run cut off this many times (its node died or lost its lease each
/// time) is not queued again: something about it kills its nodes.
pub const MAX_INTERRUPTIONS: i32 = 3;

/// Why a catalog call failed: its effect is unknown (it may have
/// committed with the reply lost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetError(pub String);

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FleetError {}

pub type FleetResult<T> = Result<T, FleetError>;

/// What a node says of itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub hostname: String,
    pub pid: u32,
    pub version: String,
    pub config_hash: String,
    /// daemon | run-due | cli
    pub mode: String,
}

impl NodeInfo {
    /// This process, with `config_hash` and `mode`.
    pub fn this_process(config_hash: &str, mode: &str) -> Self {
        let hostname = backstop_vocab::hostname().unwrap_or_else(|| "unknown".into());
        Self {
            hostname,
            pid: std::process::id(),
            version: backstop_vocab::build::version().to_string(),
            config_hash: config_hash.to_string(),
            mode: mode.to_string(),
        }
    }
}

/// A node as the catalog knows it, for `backstop status` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub hostname: String,
    pub pid: i64,
    pub version: String,
    pub config_hash: String,
    pub mode: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
    /// Its lease has not expired (by the catalog's clock).
    pub live: bool,
    /// The runs it holds.
    pub runs: Vec<HeldRun>,
}

/// A run a node holds (running, claimed by it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldRun {
    pub run: i64,
    pub job: String,
    pub kind: String,
    pub attempt: i32,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
}

/// Runs waiting to be claimed, of one job and kind (for metrics).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Waiting {
    pub job: String,
    pub kind: String,
    pub runs: i64,
    /// The oldest one's tick (or when it was queued, for a run with no
    /// tick).
    pub since: DateTime<Utc>,
}

/// A run put back (or given up) because its node's lease expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub run: i64,
    pub job: String,
    pub kind: String,
    pub node: String,
    /// `pending` (another node re-runs it) or `interrupted` (given up).
    pub now: String,
}

/// How a claimed run ended, for [`FleetCatalog::release`].
#[derive(Debug, Clone, Copy)]
pub enum Release<'a> {
    /// Final: success, suspect, skipped or failed, with the error if any,
    /// and the follow-up run to queue (retention after a backup).
    Done(Outcome, Option<&'a str>, Option<RunKind>),
    /// Cut off on this node (shutdown, lost lease): another node re-runs it.
    Interrupted(&'a str),
}

/// A (job, kind) a node may claim, with the job's starting deadline (None:
/// a pending run may start however late).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimableEntry {
    pub job: String,
    pub kind: RunKind,
    pub starting_deadline: Option<Duration>,
}

/// The fleet's operations on the shared catalog.
#[async_trait]
pub trait FleetCatalog: Send + Sync {
    /// Registers a node holding a lease of `lease`; returns its id.
    async fn register_node(&self, info: &NodeInfo, lease: Duration) -> FleetResult<String>;

    /// Renews `node`'s lease for `lease` from now (the catalog's clock).
    /// False when the lease is gone (expired; the node may have been
    /// reaped): the node must stop its runs and register anew.
    async fn renew_lease(&self, node: &str, lease: Duration) -> FleetResult<bool>;

    /// Removes `node` (a clean exit); runs it holds are put back as if it
    /// had died.
    async fn deregister_node(&self, node: &str, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>>;

    /// Reaps every node whose lease expired. Safe on every node at once.
    async fn reap(&self, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>>;

    /// Inserts the tick `at` of `job`/`kind` as a pending run, unless a
    /// node already did. True when this call inserted it. Of the pending
    /// runs of the job and kind only the newest waits; the others are
    /// recorded as skipped (superseded).
    async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
    ) -> FleetResult<bool>;

    /// The ticks recorded for `job`/`kind` in `from..=to`, oldest first.
    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> FleetResult<Vec<DateTime<Utc>>>;

    /// Records ticks that will not run as `skipped`, with why.
    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> FleetResult<u64>;

    /// The newest tick recorded for `job`/`kind` at or before `at_or_before`.
    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> FleetResult<Option<DateTime<Utc>>>;

    /// Which of `entries` have a pending run due now; first skips pending
    /// runs that never started and are older than their job's starting
    /// deadline (a run put back after its node died is not skipped: it
    /// started in time).
    async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> FleetResult<Vec<(String, RunKind)>>;

    /// Claims the oldest pending run of `job`/`kind` for `node`, if no
    /// other node runs the job and `node`'s lease is valid.
    async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> FleetResult<Option<Claim>>;

    /// A new running run of `job`/`kind` on `node` at once (asked for on
    /// demand), or who holds the job's running one.
    async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> FleetResult<Result<Claim, String>>;

    /// The next attempt of a claimed run after a failed one. None: the
    /// claim was lost meanwhile.
    async fn next_attempt(&self, claim: &Claim, error: &str) -> FleetResult<Option<Claim>>;

    /// Whether `claim` still holds, asked right before publishing: when it
    /// does, the attempt is marked as publishing, and from then on the run
    /// is never run again (a node that dies before its release leaves it
    /// interrupted, not pending).
    async fn fence(&self, claim: &Claim) -> FleetResult<bool>;

    /// Ends a claimed run (guarded). False: the claim was lost, nothing
    /// changed.
    async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> FleetResult<bool>;

    /// When `job`'s last successful run of `kind` finished.
    async fn last_success(&self, job: &str, kind: RunKind) -> FleetResult<Option<DateTime<Utc>>>;

    /// Every node the catalog knows, with the runs each holds.
    async fn fleet(&self) -> FleetResult<Vec<NodeStatus>>;

    /// The runs `node` holds (what its heartbeat reconciles).
    async fn held(&self, node: &str) -> FleetResult<Vec<HeldRun>>;

    /// The runs waiting to be claimed, per job and kind.
    async fn waiting(&self) -> FleetResult<Vec<Waiting>>;

    /// Deletes at most `limit` runs that ended before `before`, oldest
    /// first (a fleet's attempts go with them): never a pending or running
    /// one, and never a job's newest run of its kind, outcome and level
    /// (its last success, last failure, last drill, last skip…), which
    /// status, the metrics and catch-up read however old it is. Returns
    /// how many were deleted; fewer than `limit` means none is left.
    async fn forget_history(&self, before: DateTime<Utc>, limit: u32) -> FleetResult<u64>;
}
