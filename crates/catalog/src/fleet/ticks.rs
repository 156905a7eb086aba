//! The fleet's ticks: each scheduled time of a job is one row any node may
//! insert (the first insert wins); gaps among them are what catch-up finds.

use chrono::{DateTime, Utc};

use super::*;
use crate::{Catalog, CatalogError, RunKind, parse_ts, ts};

impl Catalog {
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
}
