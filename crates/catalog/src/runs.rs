//! What the catalog records of runs: a run's start and end, the last
//! success, failure and drill of a job, its recent runs, and forgetting
//! the history older than the daemon keeps.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::locks::pid_alive;
use crate::{Catalog, CatalogError, Db, Outcome, OwnRun, RunKind, parse_ts, ts};

/// One recorded run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub kind: RunKind,
    pub backup_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// None while the run is going (or waits to be claimed: see `pending`).
    pub outcome: Option<Outcome>,
    /// Waiting in a shared catalog for a node to claim it.
    pub pending: bool,
    pub error: Option<String>,
    pub dump_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    /// The tick it was scheduled for (a shared catalog's scheduled runs).
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The node holding (or last holding) it, in a shared catalog.
    pub node: Option<String>,
    /// Rebuilt from the stores rather than recorded as it ran.
    pub imported: bool,
    /// A verification's level (`listing`, `checksum`, `restore`, `drill`).
    pub level: Option<String>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct RunResult<'a> {
    pub error: Option<&'a str>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
}

impl Catalog {
    /// Records the start of a run and returns its id.
    ///
    /// # Errors
    /// A database error.
    pub async fn start_run(
        &self,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        started_at: DateTime<Utc>,
    ) -> Result<i64, CatalogError> {
        let node = self.node();
        let id: i64 = with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO runs (job, kind, backup_id, started_at, outcome, pid, node) VALUES ($1, $2, $3, $4, 'running', $5, $6) RETURNING id",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .bind(backup_id)
            .bind(ts(started_at))
            .bind(i64::from(std::process::id()))
            .bind(node.as_deref())
            .fetch_one(&mut *c)
            .await?
            .get(0)
        });
        Ok(id)
    }

    /// Records how run `id` ended.
    ///
    /// # Errors
    /// A database error.
    pub async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        finished_at: DateTime<Utc>,
        result: &RunResult<'_>,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "UPDATE runs SET outcome = $1, finished_at = $2, error = $3, dump_bytes = $4, stored_bytes = $5 WHERE id = $6",
            )
            .persistent(false)
            .bind(outcome.as_str())
            .bind(ts(finished_at))
            .bind(result.error)
            .bind(result.dump_bytes.map(|b| b as i64))
            .bind(result.stored_bytes.map(|b| b as i64))
            .bind(id)
            .execute(&mut *c)
            .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Marks runs left `running` by processes that no longer exist as
    /// `interrupted` and returns them (job, kind, backup id). In a SQLite
    /// catalog a process is known by its pid on this host; a shared catalog
    /// knows its processes by their leases instead (see [`fleet`]), so this
    /// finds nothing there.
    ///
    /// # Errors
    /// A database error.
    pub async fn interrupt_orphaned_runs(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, RunKind, Option<String>)>, CatalogError> {
        let Db::Sqlite(pool) = &self.db else {
            return Ok(Vec::new());
        };
        // id, job, kind, backup id, pid
        type Open = (i64, String, String, Option<String>, Option<i64>);
        let rows: Vec<Open> = sqlx::query_as(
            "SELECT id, job, kind, backup_id, pid FROM runs WHERE outcome = 'running'",
        )
        .fetch_all(pool)
        .await?;
        let mut out = Vec::new();
        for (id, job, kind, backup_id, pid) in rows {
            if pid.is_some_and(pid_alive) {
                continue;
            }
            sqlx::query(
                "UPDATE runs SET outcome = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND outcome = 'running'",
            )
            .bind(ts(now))
            .bind("backstop stopped while this run was going (crash, SIGKILL or power loss)")
            .bind(id)
            .execute(pool)
            .await?;
            if let Some(kind) = RunKind::parse(&kind) {
                out.push((job, kind, backup_id));
            }
        }
        Ok(out)
    }

    /// When `job` last completed a run of `kind` successfully.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<DateTime<Utc>>, CatalogError> {
        let row: Option<(String,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT finished_at FROM runs WHERE job = $1 AND kind = $2 AND outcome = 'success' AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|r| parse_ts(&r.0)))
    }

    /// When `job` last finished a run of `kind` with `outcome` (e.g. failed).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_finished(
        &self,
        job: &str,
        kind: RunKind,
        outcome: Outcome,
    ) -> Result<Option<(DateTime<Utc>, Option<i64>, Option<i64>)>, CatalogError> {
        let row: Option<(String, Option<i64>, Option<i64>)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT finished_at, dump_bytes, stored_bytes FROM runs WHERE job = $1 AND kind = $2 AND outcome = $3 AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .bind(outcome.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|(t, d, s)| (parse_ts(&t), d, s)))
    }

    /// The outcome of the latest finished run of `kind` of `job`, leaving out
    /// interrupted and skipped ones (a shutdown or a missed tick says
    /// nothing of the job's health): what tells a recovery from an ordinary
    /// success.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_outcome(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<Outcome>, CatalogError> {
        let row: Option<(String,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT outcome FROM runs WHERE job = $1 AND kind = $2 AND finished_at IS NOT NULL AND outcome NOT IN ('interrupted', 'running', 'pending', 'skipped') ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        // A value this version does not know is reported as a failure.
        Ok(row.map(|r| Outcome::parse(&r.0).unwrap_or(Outcome::Failed)))
    }

    /// The latest successful restore drill of `job`: when it started and
    /// finished (its duration is the measured restore time).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_drill(
        &self,
        job: &str,
    ) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>, CatalogError> {
        let row: Option<(String, String)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT started_at, finished_at FROM runs WHERE job = $1 AND kind = 'verify' AND level = 'drill' AND outcome = 'success' AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|(s, f)| (parse_ts(&s), parse_ts(&f))))
    }

    /// Deletes at most `limit` runs that ended before `before`, oldest
    /// first (a fleet's attempts go with them): never a pending or running
    /// one, and never a job's newest run of its kind, outcome and level
    /// (its last success, last failure, last drill…), which status, the
    /// metrics and a fleet's catch-up read however old it is. Returns how
    /// many were deleted; fewer than `limit` means none is left.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_history(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, CatalogError> {
        let deleted = with_conn!(self, |c| {
            sqlx::query(
                "DELETE FROM runs WHERE id IN (
                     SELECT r.id FROM runs r
                     WHERE r.started_at < $1
                       AND r.outcome NOT IN ('pending', 'running')
                       AND (r.finished_at IS NULL OR r.finished_at < $1)
                       AND EXISTS (SELECT 1 FROM runs n
                                   WHERE n.job = r.job AND n.kind = r.kind AND n.outcome = r.outcome
                                     AND n.level IS NOT DISTINCT FROM r.level AND n.id > r.id)
                     ORDER BY r.started_at LIMIT $2)",
            )
            .persistent(false)
            .bind(ts(before))
            .bind(i64::from(limit))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(deleted)
    }

    /// The series recorded under cluster job `job` (`<job>/<segment>`).
    ///
    /// # Errors
    /// A database error.
    pub async fn series_of(&self, job: &str) -> Result<Vec<String>, CatalogError> {
        let rows: Vec<(String,)> = with_conn!(self, |c| {
            // A walk of the index over the range `job/` .. `job0` ('0'
            // follows '/'), one step per series, not per run.
            sqlx::query_as(
                "WITH RECURSIVE s(job) AS (
                     SELECT min(job) FROM runs WHERE job > $1 || '/' AND job < $1 || '0'
                     UNION ALL
                     SELECT (SELECT min(job) FROM runs WHERE job > s.job AND job < $1 || '0')
                     FROM s WHERE s.job IS NOT NULL
                 )
                 SELECT job FROM s WHERE job IS NOT NULL ORDER BY job",
            )
            .persistent(false)
            .bind(job)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The most recent runs, newest first, optionally for one job.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_runs(
        &self,
        job: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(job, None, limit, true).await
    }

    /// [`Self::recent_runs`] without the skipped ticks (a fleet's missed
    /// or superseded ones, which are not runs): the window status and the
    /// status page show, which skipped ticks would otherwise fill.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_runs_done(
        &self,
        job: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(job, None, limit, false).await
    }

    /// The newest backup runs of `job` that were runs (not skipped ticks),
    /// newest first: its last backup and its recent sizes, for status.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_backups(
        &self,
        job: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(Some(job), Some(RunKind::Backup), limit, false)
            .await
    }

    async fn runs_window(
        &self,
        job: Option<&str>,
        kind: Option<RunKind>,
        limit: u32,
        skipped: bool,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        // `job = $1` spelled out when there is a job: behind an OR the
        // planner cannot use the (job, id) index and walks every run.
        let sql = match job {
            Some(_) => {
                "SELECT id, job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, scheduled_for, node, imported, level
                 FROM runs WHERE job = $1 AND ($3 OR outcome <> 'skipped')
                   AND (CAST($4 AS TEXT) IS NULL OR kind = $4)
                 ORDER BY id DESC LIMIT $2"
            }
            None => {
                "SELECT id, job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, scheduled_for, node, imported, level
                 FROM runs WHERE CAST($1 AS TEXT) IS NULL AND ($3 OR outcome <> 'skipped')
                   AND (CAST($4 AS TEXT) IS NULL OR kind = $4)
                 ORDER BY id DESC LIMIT $2"
            }
        };
        let rows = with_conn!(self, |c| {
            sqlx::query(sql)
                .persistent(false)
                .bind(job)
                .bind(i64::from(limit))
                .bind(skipped)
                .bind(kind.map(RunKind::as_str))
                .fetch_all(&mut *c)
                .await?
                .into_iter()
                .filter_map(|r| run_record!(r))
                .collect::<Vec<_>>()
        });
        Ok(rows)
    }

    /// The runs this catalog recorded as they happened (not imported from a
    /// store) of `series`'s backup `backup_id`: the backup itself and its
    /// verifications. What `backstop sign` holds a manifest and its
    /// records against before vouching for them.
    ///
    /// # Errors
    /// A database error.
    pub async fn own_runs_of_backup(
        &self,
        series: &str,
        backup_id: &str,
    ) -> Result<Vec<OwnRun>, CatalogError> {
        // kind, outcome, dump bytes, stored bytes, level, store, finished at
        type Row = (
            String,
            String,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT kind, outcome, dump_bytes, stored_bytes, level, store, finished_at FROM runs
                 WHERE job = $1 AND backup_id = $2 AND NOT imported AND finished_at IS NOT NULL
                 ORDER BY id",
            )
            .persistent(false)
            .bind(series)
            .bind(backup_id)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(kind, outcome, dump, stored, level, store, finished)| {
                Some(OwnRun {
                    kind: RunKind::parse(&kind)?,
                    outcome: Outcome::parse(&outcome)?,
                    dump_bytes: dump.map(|b| b as u64),
                    stored_bytes: stored.map(|b| b as u64),
                    level,
                    store,
                    finished_at: parse_ts(&finished?),
                })
            })
            .collect())
    }
}
