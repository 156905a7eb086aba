//! What a catalog of one host holds for a process: a job's lock (taken
//! over from a dead process), and the standby replay pauses a backup must
//! resume if its process died.

use std::path::Path;

use chrono::Utc;

use crate::{Catalog, CatalogError, Db, ts};

impl Catalog {
    /// Takes the per-job lock for this process. Returns who holds it
    /// instead ("pid 123", or a fleet node); a SQLite lock of a dead
    /// process is taken over. A shared catalog has no lock rows: a backup
    /// there is a claimed run, and [`fleet`] refuses a second one.
    ///
    /// # Errors
    /// A database error.
    pub async fn lock_job(&self, job: &str) -> Result<Result<(), String>, CatalogError> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Pg(_) => return Ok(Ok(())),
        };
        let me = i64::from(std::process::id());
        for _ in 0..2 {
            let taken = sqlx::query(
                "INSERT INTO job_locks (job, pid, acquired_at) VALUES (?, ?, ?) ON CONFLICT (job) DO NOTHING",
            )
            .bind(job)
            .bind(me)
            .bind(ts(Utc::now()))
            .execute(pool)
            .await?
            .rows_affected();
            if taken == 1 {
                return Ok(Ok(()));
            }
            let holder: Option<(i64,)> = sqlx::query_as("SELECT pid FROM job_locks WHERE job = ?")
                .bind(job)
                .fetch_optional(pool)
                .await?;
            match holder {
                Some((pid,)) if pid != me && pid_alive(pid) => {
                    return Ok(Err(format!("pid {pid}")));
                }
                Some((pid,)) => {
                    sqlx::query("DELETE FROM job_locks WHERE job = ? AND pid = ?")
                        .bind(job)
                        .bind(pid)
                        .execute(pool)
                        .await?;
                }
                None => {}
            }
        }
        Ok(Err("another process".into()))
    }

    /// Releases this process's lock on `job`.
    ///
    /// # Errors
    /// A database error.
    pub async fn unlock_job(&self, job: &str) -> Result<(), CatalogError> {
        if let Db::Sqlite(pool) = &self.db {
            sqlx::query("DELETE FROM job_locks WHERE job = ? AND pid = ?")
                .bind(job)
                .bind(i64::from(std::process::id()))
                .execute(pool)
                .await?;
        }
        Ok(())
    }
}

impl Catalog {
    /// Records that a backup of `job` paused its standby's WAL replay.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_replay_pause(&self, job: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO replay_pauses (job, paused_at) VALUES ($1, $2)
                 ON CONFLICT (job) DO UPDATE SET paused_at = excluded.paused_at",
            )
            .persistent(false)
            .bind(job)
            .bind(ts(Utc::now()))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Forgets the pause of `job`'s standby (replay was resumed).
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_replay_pause(&self, job: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM replay_pauses WHERE job = $1")
                .persistent(false)
                .bind(job)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The jobs whose standby a backup paused and did not resume.
    ///
    /// # Errors
    /// A database error.
    pub async fn replay_pauses(&self) -> Result<Vec<String>, CatalogError> {
        let rows: Vec<(String,)> = with_conn!(self, |c| {
            sqlx::query_as("SELECT job FROM replay_pauses ORDER BY job")
                .persistent(false)
                .fetch_all(&mut *c)
                .await?
        });
        Ok(rows.into_iter().map(|(j,)| j).collect())
    }
}

/// Whether a process with `pid` exists on this host.
pub(crate) fn pid_alive(pid: i64) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}
