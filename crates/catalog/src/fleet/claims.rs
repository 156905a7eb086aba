//! Claiming and finishing runs: the oldest pending run of a (job, kind)
//! claimed in one short transaction, every update that finishes or
//! publishes a run guarded by (run, attempt, node, `running`), and the
//! coalescing that keeps at most one run of a job waiting.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Row};

use super::*;
use crate::{Catalog, CatalogError, Claim, RunKind, parse_ts, ts};

impl Catalog {
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
}

/// Of the pending runs of `job`/`kind`, only the newest waits (by tick; a
/// run asked for on demand or queued as a follow-up counts as newest): the
/// others are recorded as skipped, superseded, at `now`.
pub(super) async fn coalesce(
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

pub(super) async fn start_attempt(c: &mut PgConnection, claim: &Claim) -> Result<(), CatalogError> {
    sqlx::query(
        "INSERT INTO attempts (run, attempt, node, outcome) VALUES ($1, $2, $3, 'running')
         ON CONFLICT (run, attempt) DO UPDATE SET node = excluded.node, started_at = now(), outcome = 'running', finished_at = NULL, error = NULL",
    )
    .guarded_by(claim)
    .execute(&mut *c)
    .await?;
    Ok(())
}

pub(super) async fn end_attempt(
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

pub(super) fn held_run(r: &sqlx::postgres::PgRow) -> HeldRun {
    HeldRun {
        run: r.get(0),
        job: r.get(1),
        kind: r.get(2),
        attempt: r.get(3),
        scheduled_for: r.get::<Option<String>, _>(4).as_deref().map(parse_ts),
        started_at: parse_ts(&r.get::<String, _>(5)),
    }
}
