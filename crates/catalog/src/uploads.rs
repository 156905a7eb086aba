//! Multipart uploads in flight, recorded so a crashed run's uploads can be
//! aborted by the next.

use chrono::Utc;

use crate::{Catalog, CatalogError, ts};

/// A multipart upload recorded as in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedUpload {
    pub store: String,
    pub key: String,
    pub upload_id: String,
}

impl Catalog {
    /// Records that a multipart upload was started.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_upload(
        &self,
        store: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO multipart_uploads (store, key, upload_id, started_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (store, upload_id) DO UPDATE SET key = excluded.key, started_at = excluded.started_at",
            )
            .persistent(false)
            .bind(store)
            .bind(key)
            .bind(upload_id)
            .bind(ts(Utc::now()))
            .execute(&mut *c)
            .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Forgets an upload that was completed or aborted.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_upload(&self, store: &str, upload_id: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM multipart_uploads WHERE store = $1 AND upload_id = $2")
                .persistent(false)
                .bind(store)
                .bind(upload_id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Uploads recorded as in flight in `store` whose key starts with `prefix`.
    ///
    /// # Errors
    /// A database error.
    pub async fn recorded_uploads(
        &self,
        store: &str,
        prefix: &str,
    ) -> Result<Vec<RecordedUpload>, CatalogError> {
        let rows: Vec<(String, String, String)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT store, key, upload_id FROM multipart_uploads WHERE store = $1 AND substr(key, 1, length(CAST($2 AS TEXT))) = $2 ORDER BY started_at",
            )
            .persistent(false)
            .bind(store)
            .bind(prefix)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(store, key, upload_id)| RecordedUpload {
                store,
                key,
                upload_id,
            })
            .collect())
    }
}
