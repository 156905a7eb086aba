//! What the catalog records of verifications: each backup's latest
//! verification per store, and which backups a verify run covered.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::{Catalog, CatalogError, parse_ts};

/// The latest verification of one backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub level: String,
    pub ok: bool,
    pub at: DateTime<Utc>,
}

impl Catalog {
    /// Records what verify run `id` checks: its level and the store read.
    ///
    /// # Errors
    /// A database error.
    pub async fn set_verify_scope(
        &self,
        id: i64,
        level: &str,
        store: &str,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("UPDATE runs SET level = $1, store = $2 WHERE id = $3")
                .persistent(false)
                .bind(level)
                .bind(store)
                .bind(id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The latest finished verification of each of `job`'s backups in `store`,
    /// keyed by backup id.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_verifications(
        &self,
        job: &str,
        store: &str,
    ) -> Result<HashMap<String, Verification>, CatalogError> {
        // backup id, level, outcome, finished at
        type Row = (String, Option<String>, String, String);
        let rows: Vec<Row> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT backup_id, level, outcome, finished_at FROM runs
                 WHERE job = $1 AND kind = 'verify' AND store = $2 AND finished_at IS NOT NULL
                   AND backup_id IS NOT NULL AND outcome IN ('success', 'failed')
                 ORDER BY id",
            )
            .persistent(false)
            .bind(job)
            .bind(store)
            .fetch_all(&mut *c)
            .await?
        });
        let mut out = HashMap::new();
        for (backup_id, level, outcome, finished_at) in rows {
            out.insert(
                backup_id,
                Verification {
                    level: level.unwrap_or_default(),
                    ok: outcome == "success",
                    at: parse_ts(&finished_at),
                },
            );
        }
        Ok(out)
    }
}
