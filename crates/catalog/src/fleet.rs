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

    /// Inserts the tick `at` of `job`/`kind` as a pending run, unless a
    /// node already did. True when this call inserted it. Of the pending
    /// runs of the job and kind only the newest then waits; the others are
    /// recorded as skipped (superseded).
    ///
    /// # Errors
    /// A database error.
    pub async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
        now: DateTime<Utc>,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.tx("ticks").await?;
        let n = sqlx::query(
            "INSERT INTO runs (job, kind, scheduled_for, started_at, outcome, max_attempts)
             VALUES ($1, $2, $3, $3, 'pending', $4) ON CONFLICT (job, kind, scheduled_for) DO NOTHING",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(ts(at))
        .bind(max_attempts.min(i32::MAX as u32) as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            coalesce(&mut tx, job, kind.as_str(), now.max(at)).await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The ticks recorded for `job`/`kind` in `from..=to`, oldest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<DateTime<Utc>>, CatalogError> {
        let mut tx = self.tx("ticks").await?;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT scheduled_for FROM runs WHERE job = $1 AND kind = $2
               AND scheduled_for >= $3 AND scheduled_for <= $4 ORDER BY scheduled_for",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(ts(from))
        .bind(ts(to))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.iter().map(|r| parse_ts(&r.0)).collect())
    }

    /// Records ticks that will not run (missed while the fleet was down,
    /// or a new job's last one) as `skipped`, with why.
    ///
    /// # Errors
    /// A database error.
    pub async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> Result<u64, CatalogError> {
        if ticks.is_empty() {
            return Ok(0);
        }
        let ticks: Vec<String> = ticks.iter().map(|t| ts(*t)).collect();
        let mut tx = self.tx("ticks").await?;
        let n = sqlx::query(
            "INSERT INTO runs (job, kind, scheduled_for, started_at, finished_at, outcome, error)
             SELECT $1, $2, t, t, $4, 'skipped', $5 FROM unnest(CAST($3 AS TEXT[])) AS t
             ON CONFLICT (job, kind, scheduled_for) DO NOTHING",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(&ticks)
        .bind(ts(now))
        .bind(why)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n)
    }

    /// The newest tick recorded for `job`/`kind` at or before
    /// `at_or_before`, whatever became of it.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, CatalogError> {
        let mut tx = self.tx("ticks").await?;
        // Ticks are fixed-width UTC text: they sort as they fall.
        let row: (Option<String>,) = sqlx::query_as(
            "SELECT max(scheduled_for) FROM runs WHERE job = $1 AND kind = $2 AND scheduled_for <= $3",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(ts(at_or_before))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.0.as_deref().map(parse_ts))
    }

    /// Which of `entries` have a pending run due now; first skips pending
    /// runs that never started and are older than their job's starting
    /// deadline (a run put back after its node died started in time). One
    /// query each, whatever the number of entries.
    ///
    /// # Errors
    /// A database error.
    pub async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, RunKind)>, CatalogError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<&str> = entries.iter().map(|e| e.job.as_str()).collect();
        let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
        // The oldest scheduled time still allowed to start, per entry ("" = any).
        let oldest: Vec<String> = entries
            .iter()
            .map(|e| {
                e.starting_deadline
                    .and_then(|d| chrono::Duration::from_std(d).ok())
                    .map_or_else(String::new, |d| ts(now - d))
            })
            .collect();
        let mut tx = self.tx("claims").await?;
        sqlx::query(
            "UPDATE runs r SET outcome = 'skipped', finished_at = $4,
                    error = 'not started within the job''s starting deadline (every node was busy or down)'
             FROM unnest(CAST($1 AS TEXT[]), CAST($2 AS TEXT[]), CAST($3 AS TEXT[])) AS d(job, kind, oldest)
             WHERE r.outcome = 'pending' AND r.job = d.job AND r.kind = d.kind
               AND r.attempt = 0 AND r.interruptions = 0
               AND d.oldest <> '' AND r.scheduled_for IS NOT NULL AND r.scheduled_for < d.oldest",
        )
        .persistent(false)
        .bind(&jobs)
        .bind(&kinds)
        .bind(&oldest)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT r.job, r.kind FROM runs r
             JOIN unnest(CAST($1 AS TEXT[]), CAST($2 AS TEXT[])) AS d(job, kind) ON r.job = d.job AND r.kind = d.kind
             WHERE r.outcome = 'pending' AND r.not_before <= now()",
        )
        .persistent(false)
        .bind(&jobs)
        .bind(&kinds)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .filter_map(|(j, k)| Some((j, RunKind::parse(&k)?)))
            .collect())
    }

    /// Claims the oldest pending run of `job`/`kind` for `node`, if there
    /// is one no other node holds and `node`'s lease is valid. None: nothing
    /// to claim (none pending, another node took it, or a run of the job is
    /// already going somewhere).
    ///
    /// # Errors
    /// A database error.
    pub async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> Result<Option<Claim>, CatalogError> {
        let mut tx = self.tx("claims").await?;
        let claimed = sqlx::query(concat!(
            "UPDATE runs r SET outcome = 'running', node = $3, attempt = r.attempt + 1, started_at = $4,
                    finished_at = NULL, error = NULL, pid = $5, publishing = false
             WHERE r.id = (SELECT id FROM runs WHERE job = $1 AND kind = $2 AND outcome = 'pending'
                             AND not_before <= now() ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
               AND ",
            lease_valid!(),
            " RETURNING r.id, r.attempt, r.scheduled_for"
        ))
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(node)
        .bind(ts(now))
        .bind(i64::from(std::process::id()))
        .fetch_optional(&mut *tx)
        .await;
        let row = match claimed {
            Ok(Some(row)) => row,
            Ok(None) => return Ok(None),
            // Another node is running this job and kind (runs_one_running).
            Err(e) if is_unique_violation(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let claim = Claim {
            run: row.get(0),
            attempt: row.get(1),
            node: node.to_string(),
            scheduled_for: row.get::<Option<String>, _>(2).as_deref().map(parse_ts),
        };
        start_attempt(&mut tx, &claim).await?;
        tx.commit().await?;
        Ok(Some(claim))
    }

    /// Starts a run of `job`/`kind` on `node` at once (a one-shot command):
    /// a new running run, or who holds the job's running one.
    ///
    /// # Errors
    /// A database error.
    pub async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Result<Claim, String>, CatalogError> {
        let mut tx = self.tx("claims").await?;
        let inserted = sqlx::query(
            "INSERT INTO runs (job, kind, started_at, outcome, node, attempt, max_attempts, pid, backup_id)
             VALUES ($1, $2, $4, 'running', $3, 1, 1, $5, $6) RETURNING id",
        )
        .persistent(false)
        .bind(job)
        .bind(kind.as_str())
        .bind(node)
        .bind(ts(now))
        .bind(i64::from(std::process::id()))
        .bind(backup_id)
        .fetch_one(&mut *tx)
        .await;
        match inserted {
            Ok(row) => {
                let claim = Claim {
                    run: row.get(0),
                    attempt: 1,
                    node: node.to_string(),
                    scheduled_for: None,
                };
                start_attempt(&mut tx, &claim).await?;
                tx.commit().await?;
                Ok(Ok(claim))
            }
            Err(e) if is_unique_violation(&e) => {
                drop(tx);
                Ok(Err(self.holder(job, kind).await?))
            }
            Err(e) => Err(e.into()),
        }
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

    /// The next attempt of a claimed run after a failed one (a retry on the
    /// same node). None: the claim was lost meanwhile.
    ///
    /// # Errors
    /// A database error.
    pub async fn next_attempt(
        &self,
        claim: &Claim,
        error: &str,
    ) -> Result<Option<Claim>, CatalogError> {
        let mut tx = self.tx("claims").await?;
        end_attempt(&mut tx, claim, "failed", Some(error)).await?;
        let row: Option<(i32,)> = sqlx::query_as(concat!(
            "UPDATE runs SET attempt = attempt + 1 WHERE id = $1 AND attempt = $2 AND node = $3
               AND outcome = 'running' AND ",
            lease_valid!(),
            " RETURNING attempt"
        ))
        .guarded_by(claim)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((attempt,)) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let next = Claim {
            attempt,
            ..claim.clone()
        };
        start_attempt(&mut tx, &next).await?;
        tx.commit().await?;
        Ok(Some(next))
    }

    /// Whether `claim` still holds: the run is running as this attempt on
    /// this node, and the node's lease is valid. Asked right before a run
    /// publishes anything (a backup's manifest); when it holds, the attempt
    /// is marked as publishing, and from then on the run is never run again
    /// (a node that dies before its release leaves it interrupted).
    ///
    /// # Errors
    /// A database error (which the caller treats as "does not hold").
    pub async fn fence(&self, claim: &Claim) -> Result<bool, CatalogError> {
        let mut tx = self.tx("claims").await?;
        let row: Option<(i64,)> = sqlx::query_as(concat!(
            "UPDATE runs SET publishing = true
             WHERE id = $1 AND attempt = $2 AND node = $3 AND outcome = 'running' AND ",
            lease_valid!(),
            " RETURNING id"
        ))
        .guarded_by(claim)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.is_some())
    }

    /// Records a claimed backup's id and sizes on its run (guarded).
    ///
    /// # Errors
    /// A database error.
    pub async fn annotate(
        &self,
        claim: &Claim,
        backup_id: &str,
        sizes: Option<(u64, u64)>,
    ) -> Result<bool, CatalogError> {
        let mut tx = self.tx("claims").await?;
        let n = sqlx::query(
            "UPDATE runs SET backup_id = $4, dump_bytes = COALESCE($5, dump_bytes), stored_bytes = COALESCE($6, stored_bytes)
             WHERE id = $1 AND attempt = $2 AND node = $3 AND outcome = 'running'",
        )
        .guarded_by(claim)
        .bind(backup_id)
        .bind(sizes.map(|s| s.0 as i64))
        .bind(sizes.map(|s| s.1 as i64))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Ends a claimed run (guarded by run, attempt, node and `running`).
    /// False when the claim was lost: nothing was changed, the run belongs
    /// to whoever reaped or re-claimed it. A successful run's follow-up
    /// (retention after a backup) is queued in the same transaction, unless
    /// one already waits; an interrupted run goes back to pending unless it
    /// began publishing or used up its interruptions.
    ///
    /// # Errors
    /// A database error.
    pub async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool, CatalogError> {
        let now = ts(now);
        let mut tx = self.tx("claims").await?;
        let n = match how {
            Release::Done(outcome, error, then) => {
                end_attempt(&mut tx, claim, outcome.as_str(), error).await?;
                let job: Option<(String,)> = sqlx::query_as(
                    "UPDATE runs SET outcome = $4, finished_at = $5, error = $6
                     WHERE id = $1 AND attempt = $2 AND node = $3 AND outcome = 'running'
                     RETURNING job",
                )
                .guarded_by(claim)
                .bind(outcome.as_str())
                .bind(&now)
                .bind(error)
                .fetch_optional(&mut *tx)
                .await?;
                if let (Some((job,)), Some(kind)) = (&job, then) {
                    sqlx::query(
                        "INSERT INTO runs (job, kind, started_at, outcome, max_attempts)
                         SELECT $1, $2, $3, 'pending', 1
                         WHERE NOT EXISTS (SELECT 1 FROM runs WHERE job = $1 AND kind = $2 AND outcome = 'pending')",
                    )
                    .persistent(false)
                    .bind(job)
                    .bind(kind.as_str())
                    .bind(&now)
                    .execute(&mut *tx)
                    .await?;
                }
                u64::from(job.is_some())
            }
            Release::Interrupted(why) => {
                end_attempt(&mut tx, claim, "interrupted", Some(why)).await?;
                let row: Option<(String, String)> = sqlx::query_as(
                    "UPDATE runs SET interruptions = interruptions + 1, error = $4,
                        outcome = CASE WHEN interruptions + 1 < $6 AND NOT publishing THEN 'pending' ELSE 'interrupted' END,
                        finished_at = CASE WHEN interruptions + 1 < $6 AND NOT publishing THEN NULL ELSE $5 END,
                        node = CASE WHEN interruptions + 1 < $6 AND NOT publishing THEN NULL ELSE node END
                     WHERE id = $1 AND attempt = $2 AND node = $3 AND outcome = 'running'
                     RETURNING job, kind",
                )
                .guarded_by(claim)
                .bind(why)
                .bind(&now)
                .bind(MAX_INTERRUPTIONS)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some((job, kind)) = &row {
                    coalesce(&mut tx, job, kind, parse_ts(&now)).await?;
                }
                u64::from(row.is_some())
            }
        };
        tx.commit().await?;
        Ok(n == 1)
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

fn held_run(r: &sqlx::postgres::PgRow) -> HeldRun {
    HeldRun {
        run: r.get(0),
        job: r.get(1),
        kind: r.get(2),
        attempt: r.get(3),
        scheduled_for: r.get::<Option<String>, _>(4).as_deref().map(parse_ts),
        started_at: parse_ts(&r.get::<String, _>(5)),
    }
}

/// Of the pending runs of `job`/`kind`, only the newest waits (by tick; a
/// run asked for on demand or queued as a follow-up counts as newest): the
/// others are recorded as skipped, superseded, at `now`.
async fn coalesce(
    c: &mut PgConnection,
    job: &str,
    kind: &str,
    now: DateTime<Utc>,
) -> Result<u64, CatalogError> {
    let n = sqlx::query(
        "WITH keep AS (
            SELECT id, scheduled_for FROM runs WHERE job = $1 AND kind = $2 AND outcome = 'pending'
            ORDER BY scheduled_for IS NULL DESC, scheduled_for DESC, id DESC LIMIT 1)
         UPDATE runs r SET outcome = 'skipped', finished_at = $3,
                error = $4 || COALESCE('tick ' || keep.scheduled_for, 'a run asked for on demand') || ') runs instead'
         FROM keep
         WHERE r.job = $1 AND r.kind = $2 AND r.outcome = 'pending' AND r.id <> keep.id",
    )
    .persistent(false)
    .bind(job)
    .bind(kind)
    .bind(ts(now))
    .bind(SUPERSEDED)
    .execute(&mut *c)
    .await?
    .rows_affected();
    Ok(n)
}

async fn start_attempt(c: &mut PgConnection, claim: &Claim) -> Result<(), CatalogError> {
    sqlx::query(
        "INSERT INTO attempts (run, attempt, node, outcome) VALUES ($1, $2, $3, 'running')
         ON CONFLICT (run, attempt) DO UPDATE SET node = excluded.node, started_at = now(), outcome = 'running', finished_at = NULL, error = NULL",
    )
    .guarded_by(claim)
    .execute(&mut *c)
    .await?;
    Ok(())
}

async fn end_attempt(
    c: &mut PgConnection,
    claim: &Claim,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), CatalogError> {
    sqlx::query(
        "UPDATE attempts SET outcome = $4, error = $5, finished_at = now()
         WHERE run = $1 AND attempt = $2 AND node = $3 AND outcome = 'running'",
    )
    .guarded_by(claim)
    .bind(outcome)
    .bind(error)
    .execute(&mut *c)
    .await?;
    Ok(())
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

/// The fleet protocol on the PostgreSQL catalog: the methods above, each
/// within [`FLEET_CALL_TIMEOUT`].
#[async_trait::async_trait]
impl FleetCatalog for Catalog {
    async fn register_node(&self, info: &NodeInfo, lease: Duration) -> FleetResult<String> {
        within(Catalog::register_node(self, info, lease)).await
    }

    async fn renew_lease(&self, node: &str, lease: Duration) -> FleetResult<bool> {
        within(Catalog::renew_lease(self, node, lease)).await
    }

    async fn deregister_node(&self, node: &str, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        within(Catalog::deregister_node(self, node, now)).await
    }

    async fn reap(&self, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        within(Catalog::reap(self, now)).await
    }

    async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
    ) -> FleetResult<bool> {
        let now = backstop_vocab::now();
        within(Catalog::record_tick(self, job, kind, at, max_attempts, now)).await
    }

    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> FleetResult<Vec<DateTime<Utc>>> {
        within(Catalog::recorded_ticks(self, job, kind, from, to)).await
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> FleetResult<u64> {
        within(Catalog::skip_ticks(self, job, kind, ticks, why, now)).await
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> FleetResult<Option<DateTime<Utc>>> {
        within(Catalog::last_tick(self, job, kind, at_or_before)).await
    }

    async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> FleetResult<Vec<(String, RunKind)>> {
        within(Catalog::claimable(self, entries, now)).await
    }

    async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> FleetResult<Option<Claim>> {
        within(Catalog::claim(self, node, job, kind, now)).await
    }

    async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> FleetResult<Result<Claim, String>> {
        within(Catalog::claim_now(self, node, job, kind, backup_id, now)).await
    }

    async fn next_attempt(&self, claim: &Claim, error: &str) -> FleetResult<Option<Claim>> {
        within(Catalog::next_attempt(self, claim, error)).await
    }

    async fn fence(&self, claim: &Claim) -> FleetResult<bool> {
        within(Catalog::fence(self, claim)).await
    }

    async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> FleetResult<bool> {
        within(Catalog::release(self, claim, how, now)).await
    }

    async fn last_success(&self, job: &str, kind: RunKind) -> FleetResult<Option<DateTime<Utc>>> {
        within(Catalog::last_success(self, job, kind)).await
    }

    async fn fleet(&self) -> FleetResult<Vec<NodeStatus>> {
        within(Catalog::fleet(self)).await
    }

    async fn held(&self, node: &str) -> FleetResult<Vec<HeldRun>> {
        within(Catalog::held(self, node)).await
    }

    async fn waiting(&self) -> FleetResult<Vec<Waiting>> {
        within(Catalog::waiting(self)).await
    }

    async fn forget_history(&self, before: DateTime<Utc>, limit: u32) -> FleetResult<u64> {
        within(Catalog::forget_history(self, before, limit)).await
    }
}
