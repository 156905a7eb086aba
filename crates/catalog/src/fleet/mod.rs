//! The claim protocol of a fleet: several backstop processes (nodes) sharing
//! one PostgreSQL catalog, every scheduled run executed exactly once, with
//! no leader and no session state (so it works behind a transaction pooler).
//!
//! - Each tick is a row, keyed by (job, kind, scheduled_for): every node may
//!   insert it (`ON CONFLICT DO NOTHING`); the first insert wins.
//! - A node claims the oldest pending run of a (job, kind) only when it has
//!   a free slot, in one short transaction (`FOR UPDATE SKIP LOCKED`); the
//!   partial unique index `runs_one_running` refuses a second running run
//!   of a job and kind.
//! - Nodes hold leases renewed by heartbeats on the database's clock. Any
//!   node reaps nodes whose lease expired: their running attempts become
//!   `interrupted` and their runs go back to `pending` (up to
//!   [`MAX_INTERRUPTIONS`] times). A run is never taken away because it is
//!   long, only because its node stopped renewing.
//! - Every update that finishes or publishes a run is guarded by (run,
//!   attempt, node, `running`): a node that was paused past its lease finds
//!   its claim gone and publishes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use crate::{Catalog, CatalogError, Claim, RunKind, parse_ts, ts};

pub use backstop_fleet::{
    ClaimableEntry, FleetCatalog, FleetError, FleetResult, HeldRun, MAX_INTERRUPTIONS, NodeInfo,
    NodeStatus, Reaped, Release, Waiting,
};

/// How long a fleet call may take before its caller treats it as failed
/// (its effect unknown, as when the reply is lost): a catalog that hangs
/// (a failover whose old primary vanished without a reset) must not hang
/// a run's bookkeeping. The heartbeat's own calls have a shorter limit
/// (one heartbeat).
pub const FLEET_CALL_TIMEOUT: Duration = Duration::from_secs(30);

const SUPERSEDED: &str = "superseded: at most one run of a job waits, and a newer one (";

fn millis(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

/// Epoch milliseconds of a timestamptz column, so no chrono support in the
/// driver is needed.
macro_rules! ms {
    ($col:literal) => {
        concat!("CAST(extract(epoch FROM ", $col, ") * 1000 AS BIGINT)")
    };
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Binds `$1`, `$2`, `$3` to a claim's run, attempt and node (the guard of
/// every update that finishes or publishes a run), with an unnamed
/// statement like every catalog query.
trait Guarded {
    fn guarded_by(self, claim: &Claim) -> Self;
}

impl Guarded for sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn guarded_by(self, claim: &Claim) -> Self {
        self.persistent(false)
            .bind(claim.run)
            .bind(claim.attempt)
            .bind(claim.node.clone())
    }
}

impl<O> Guarded for sqlx::query::QueryAs<'_, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn guarded_by(self, claim: &Claim) -> Self {
        self.persistent(false)
            .bind(claim.run)
            .bind(claim.attempt)
            .bind(claim.node.clone())
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// The node (`$3`) holds a valid lease, by the database's clock.
macro_rules! lease_valid {
    () => {
        "EXISTS (SELECT 1 FROM nodes n WHERE n.id = $3 AND n.lease_until > now())"
    };
}

impl Catalog {
    async fn tx(
        &self,
        what: &'static str,
    ) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, CatalogError> {
        crate::pg::begin(self.pg(what)?).await
    }

    /// Registers this process as a node holding a lease of `lease`; returns
    /// its id (random per process start).
    ///
    /// # Errors
    /// A database error, or a SQLite catalog.
    pub async fn register_node(
        &self,
        info: &NodeInfo,
        lease: Duration,
    ) -> Result<String, CatalogError> {
        let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let mut tx = self.tx("a fleet node").await?;
        sqlx::query(
            "INSERT INTO nodes (id, hostname, pid, version, config_hash, mode, lease_until)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))",
        )
        .persistent(false)
        .bind(&id)
        .bind(&info.hostname)
        .bind(i64::from(info.pid))
        .bind(&info.version)
        .bind(&info.config_hash)
        .bind(&info.mode)
        .bind(secs(lease))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Renews `node`'s lease for `lease` from now (the database's clock).
    /// False when the lease is gone: it expired (the node may already have
    /// been reaped), so the node must stop its runs and register anew.
    ///
    /// # Errors
    /// A database error (the lease is then not known to be renewed).
    pub async fn renew_lease(&self, node: &str, lease: Duration) -> Result<bool, CatalogError> {
        let mut tx = self.tx("a lease").await?;
        let n = sqlx::query(
            "UPDATE nodes SET heartbeat_at = now(), lease_until = now() + make_interval(secs => $2)
             WHERE id = $1 AND lease_until >= now()",
        )
        .persistent(false)
        .bind(node)
        .bind(secs(lease))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Publishes `node`'s new config digest (after a reload).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_node_config_hash(&self, node: &str, hash: &str) -> Result<(), CatalogError> {
        let mut tx = self.tx("a fleet node").await?;
        sqlx::query("UPDATE nodes SET config_hash = $2 WHERE id = $1")
            .persistent(false)
            .bind(node)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes `node` (a clean exit); runs it still holds are put back as
    /// if it had died.
    ///
    /// # Errors
    /// A database error.
    pub async fn deregister_node(
        &self,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Reaped>, CatalogError> {
        let mut tx = self.tx("a fleet node").await?;
        let reaped = reap_nodes(&mut tx, &[node.to_string()], "its node stopped", now).await?;
        tx.commit().await?;
        Ok(reaped)
    }

    /// Reaps every node whose lease expired: its running attempts become
    /// `interrupted` and its runs `pending` again (or `interrupted` for good
    /// after [`MAX_INTERRUPTIONS`]). Safe to run on every node at once.
    ///
    /// # Errors
    /// A database error.
    pub async fn reap(&self, now: DateTime<Utc>) -> Result<Vec<Reaped>, CatalogError> {
        let mut tx = self.tx("reaping").await?;
        let dead: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM nodes WHERE lease_until < now() ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        let dead: Vec<String> = dead.into_iter().map(|d| d.0).collect();
        let reaped = if dead.is_empty() {
            Vec::new()
        } else {
            reap_nodes(&mut tx, &dead, "its node stopped renewing its lease (crashed, killed, paused or cut off from the catalog)", now).await?
        };
        tx.commit().await?;
        Ok(reaped)
    }

    /// Who runs `job`/`kind` now, for messages.
    async fn holder(&self, job: &str, kind: RunKind) -> Result<String, CatalogError> {
        let mut tx = self.tx("claims").await?;
        let row: Option<(String, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT r.node, n.hostname, n.pid FROM runs r LEFT JOIN nodes n ON n.id = r.node
             WHERE r.job = $1 AND r.kind = $2 AND r.outcome = 'running' AND r.attempt > 0",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match row {
            Some((node, Some(host), Some(pid))) => format!("node {node} on {host}, pid {pid}"),
            Some((node, _, _)) => format!("node {node}"),
            None => "another node (it just finished)".into(),
        })
    }

    /// The runs waiting to be claimed, per job and kind.
    ///
    /// # Errors
    /// A database error.
    pub async fn waiting(&self) -> Result<Vec<Waiting>, CatalogError> {
        let mut tx = self.tx("fleet status").await?;
        let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
            "SELECT job, kind, count(*), min(COALESCE(scheduled_for, started_at)) FROM runs
             WHERE outcome = 'pending' GROUP BY job, kind ORDER BY job, kind",
        )
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(job, kind, runs, since)| Waiting {
                job,
                kind,
                runs,
                since: parse_ts(&since),
            })
            .collect())
    }

    /// The runs `node` holds (what its heartbeat reconciles).
    ///
    /// # Errors
    /// A database error.
    pub async fn held(&self, node: &str) -> Result<Vec<HeldRun>, CatalogError> {
        let mut tx = self.tx("fleet status").await?;
        let rows = sqlx::query(
            "SELECT id, job, kind, attempt, scheduled_for, started_at FROM runs
             WHERE node = $1 AND outcome = 'running' AND attempt > 0 ORDER BY id",
        )
        .persistent(false)
        .bind(node)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.iter().map(held_run).collect())
    }

    /// Every node the catalog knows, with the runs each holds.
    ///
    /// # Errors
    /// A database error, or a SQLite catalog.
    pub async fn fleet(&self) -> Result<Vec<NodeStatus>, CatalogError> {
        let mut tx = self.tx("fleet status").await?;
        let nodes = sqlx::query(concat!(
            "SELECT id, hostname, pid, version, config_hash, mode, ",
            ms!("started_at"),
            ", ",
            ms!("heartbeat_at"),
            ", ",
            ms!("lease_until"),
            ", lease_until > now() FROM nodes ORDER BY started_at, id"
        ))
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        let runs = sqlx::query(
            "SELECT id, job, kind, attempt, scheduled_for, started_at, node FROM runs
             WHERE outcome = 'running' AND node IS NOT NULL AND attempt > 0 ORDER BY id",
        )
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut out: Vec<NodeStatus> = nodes
            .into_iter()
            .map(|r| NodeStatus {
                id: r.get(0),
                hostname: r.get(1),
                pid: r.get(2),
                version: r.get(3),
                config_hash: r.get(4),
                mode: r.get(5),
                started_at: millis(r.get(6)),
                heartbeat_at: millis(r.get(7)),
                lease_until: millis(r.get(8)),
                live: r.get(9),
                runs: Vec::new(),
            })
            .collect();
        for r in runs {
            let node: String = r.get(6);
            if let Some(n) = out.iter_mut().find(|n| n.id == node) {
                n.runs.push(held_run(&r));
            }
        }
        Ok(out)
    }
}

/// Puts back the runs of `dead` nodes and removes the nodes.
async fn reap_nodes(
    c: &mut PgConnection,
    dead: &[String],
    why: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Reaped>, CatalogError> {
    let at = now;
    let now = ts(now);
    sqlx::query(
        "UPDATE attempts SET outcome = 'interrupted', finished_at = now(), error = $2
         WHERE node = ANY(CAST($1 AS TEXT[])) AND outcome = 'running'",
    )
    .persistent(false)
    .bind(dead)
    .bind(why)
    .execute(&mut *c)
    .await?;
    // Claimed runs go back to pending (within their interruption budget,
    // and unless they began publishing: what a run published stands); a
    // run's own records (attempt 0) just end interrupted.
    let rows = sqlx::query(
        "UPDATE runs SET
            interruptions = interruptions + CASE WHEN attempt > 0 THEN 1 ELSE 0 END,
            outcome = CASE WHEN attempt > 0 AND interruptions + 1 < $3 AND NOT publishing THEN 'pending' ELSE 'interrupted' END,
            finished_at = CASE WHEN attempt > 0 AND interruptions + 1 < $3 AND NOT publishing THEN NULL ELSE $4 END,
            error = CASE WHEN publishing
                THEN $2 || ', after it began publishing: not run again (its backup is in the store if its manifest is)'
                ELSE $2 END
         WHERE outcome = 'running' AND node = ANY(CAST($1 AS TEXT[]))
         RETURNING id, job, kind, node, outcome",
    )
    .persistent(false)
    .bind(dead)
    .bind(why)
    .bind(MAX_INTERRUPTIONS)
    .bind(&now)
    .fetch_all(&mut *c)
    .await?;
    sqlx::query("DELETE FROM nodes WHERE id = ANY(CAST($1 AS TEXT[]))")
        .persistent(false)
        .bind(dead)
        .execute(&mut *c)
        .await?;
    let reaped: Vec<Reaped> = rows
        .into_iter()
        .map(|r| Reaped {
            run: r.get(0),
            job: r.get(1),
            kind: r.get(2),
            node: r.get(3),
            now: r.get(4),
        })
        .collect();
    // A run back to pending waits alone too.
    let mut keys: Vec<(&str, &str)> = reaped
        .iter()
        .filter(|r| r.now == "pending")
        .map(|r| (r.job.as_str(), r.kind.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for (job, kind) in keys {
        coalesce(c, job, kind, at).await?;
    }
    Ok(reaped)
}

/// A fleet call within [`FLEET_CALL_TIMEOUT`], its error as the fleet's
/// (an unknown effect either way).
async fn within<T>(
    call: impl std::future::Future<Output = Result<T, CatalogError>>,
) -> FleetResult<T> {
    match tokio::time::timeout(FLEET_CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| FleetError(e.to_string())),
        Err(_) => Err(FleetError(format!(
            "the catalog did not answer within {} s",
            FLEET_CALL_TIMEOUT.as_secs()
        ))),
    }
}

mod claims;
mod protocol;
mod ticks;

use claims::{coalesce, held_run};
