//! Runs rebuilt from the stores (`catalog rebuild`): a backup from its
//! manifest, a verification from its record, each imported once.

use chrono::{DateTime, Utc};

use crate::{Catalog, CatalogError, Db, Outcome, RunKind, pg, ts};

/// A run rebuilt from a store: a backup from its manifest, a verification
/// from its record.
#[derive(Debug, Clone)]
pub struct ImportedRun<'a> {
    pub job: &'a str,
    pub kind: RunKind,
    pub backup_id: &'a str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: Outcome,
    pub error: Option<&'a str>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// A verification's level and the store it read.
    pub level: Option<&'a str>,
    pub store: Option<&'a str>,
}

impl Catalog {
    /// Records a run rebuilt from a store, unless the catalog already has
    /// it: a backup by (job, backup id) whatever its outcome, a verification by (job, backup
    /// id, level, store, finish). Returns whether it was added.
    ///
    /// # Errors
    /// A database error.
    pub async fn import_run(&self, r: &ImportedRun<'_>) -> Result<bool, CatalogError> {
        Ok(self.import_runs(std::slice::from_ref(r)).await? == 1)
    }

    /// [`Catalog::import_run`] for many, in one transaction (a rebuild of
    /// thousands of backups is otherwise thousands of commits). Returns how
    /// many were added.
    ///
    /// # Errors
    /// A database error (nothing of the batch is recorded).
    pub async fn import_runs(&self, runs: &[ImportedRun<'_>]) -> Result<usize, CatalogError> {
        macro_rules! import {
            ($tx:expr, $r:expr) => {
                sqlx::query(
                    "INSERT INTO runs (job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, level, store, imported)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
                     WHERE NOT EXISTS (
                         SELECT 1 FROM runs WHERE job = $1 AND kind = $2 AND backup_id = $3
                            AND ($2 = 'backup'
                              OR ($2 = 'verify' AND level = $10 AND store = $11 AND finished_at = $5)))
                     ON CONFLICT DO NOTHING",
                )
                .persistent(false)
                .bind($r.job)
                .bind($r.kind.as_str())
                .bind($r.backup_id)
                .bind(ts($r.started_at))
                .bind(ts($r.finished_at))
                .bind($r.outcome.as_str())
                .bind($r.error)
                .bind($r.dump_bytes.map(|b| b as i64))
                .bind($r.stored_bytes.map(|b| b as i64))
                .bind($r.level)
                .bind($r.store)
                .bind(true)
                .execute(&mut *$tx)
                .await?
                .rows_affected()
            };
        }
        let mut added = 0u64;
        match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for r in runs {
                    added += import!(tx, r);
                }
                tx.commit().await?;
            }
            Db::Pg(pool) => {
                let mut tx = pg::begin(pool).await?;
                for r in runs {
                    added += import!(tx, r);
                }
                tx.commit().await?;
            }
        }
        Ok(added as usize)
    }

    /// Whether the catalog has no record of any finished backup (a new or
    /// lost catalog, which the daemon rebuilds from the stores).
    ///
    /// # Errors
    /// A database error.
    pub async fn has_no_backups(&self) -> Result<bool, CatalogError> {
        let row: Option<(i64,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT id FROM runs WHERE kind = 'backup' AND finished_at IS NOT NULL LIMIT 1",
            )
            .persistent(false)
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.is_none())
    }
}
