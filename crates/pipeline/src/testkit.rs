//! Test-only helpers: a store in memory and a manifest builder, so logic
//! that is not about PostgreSQL (listing, trust, retention) gets fast unit
//! tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use backstop_storage::{ByteStream, ObjectMeta, PendingUpload, Storage, StorageError};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::io::AsyncRead;

use crate::Manifest;

/// A store in memory. Its deletes can be made to fail after a budget of
/// them, as if the server died mid-prune.
pub struct MemStore {
    objects: Mutex<BTreeMap<String, Bytes>>,
    budget: Mutex<usize>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::with_delete_budget(usize::MAX)
    }
}

impl MemStore {
    pub fn with_delete_budget(budget: usize) -> Self {
        Self {
            objects: Mutex::new(BTreeMap::new()),
            budget: Mutex::new(budget),
        }
    }

    pub fn set_delete_budget(&self, budget: usize) {
        *self.budget.lock().unwrap() = budget;
    }

    /// Puts an object, even under a key a real store would refuse (what
    /// someone else's client might have written).
    pub fn insert(&self, key: &str, body: impl Into<Bytes>) {
        self.objects.lock().unwrap().insert(key.into(), body.into());
    }

    pub fn remove(&self, key: &str) {
        self.objects.lock().unwrap().remove(key);
    }

    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().unwrap().keys().cloned().collect()
    }
}

#[async_trait]
impl Storage for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn put_stream(&self, _: &str, _: ByteStream) -> Result<u64, StorageError> {
        Err(StorageError::BadKey(
            "no streams into the test store".into(),
        ))
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.insert(key, data);
        Ok(())
    }
    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        if !backstop_storage::is_valid_key(key) {
            return Err(StorageError::BadKey(key.into()));
        }
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::NotFound(key.into()))
    }
    async fn open_range(
        &self,
        key: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError> {
        let b = self.get(key).await?;
        let start = (start as usize).min(b.len());
        let end = end.map_or(b.len(), |e| (e as usize).min(b.len()));
        Ok(Box::new(std::io::Cursor::new(b[start..end].to_vec())))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }
    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let mut budget = self.budget.lock().unwrap();
        if *budget == 0 {
            return Err(StorageError::Remote {
                op: "delete",
                location: key.into(),
                message: "connection refused".into(),
                retryable: true,
            });
        }
        *budget -= 1;
        self.objects.lock().unwrap().remove(key);
        Ok(())
    }
    async fn pending_uploads(&self, _: &str) -> Result<Vec<PendingUpload>, StorageError> {
        Ok(Vec::new())
    }
    async fn probe(&self, _: bool) -> Result<String, StorageError> {
        Ok("memory".into())
    }
}

/// A manifest of job `app`'s backup `id` started at `at`, with one
/// artifact per `(kind, bytes)`: `database` a custom-format dump,
/// `globals` plain SQL, both zstd, unencrypted.
pub fn manifest_for(id: &str, at: DateTime<Utc>, sizes: &[(&str, usize)]) -> Manifest {
    let artifacts: Vec<serde_json::Value> = sizes
        .iter()
        .map(|(kind, n)| {
            let (ext, format) = if *kind == "globals" {
                ("sql", "plain")
            } else {
                ("dump", "custom")
            };
            serde_json::json!({
                "kind": kind, "file": format!("{kind}.{ext}.zst"), "key": format!("app/{id}/{kind}.{ext}.zst"),
                "format": format, "plain_bytes": n, "plain_sha256": "", "stored_bytes": n,
                "stored_sha256": "", "compression": "zstd:3", "encryption": { "type": "none" }
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "format_version": 1, "tool": { "name": "backstop", "version": "0" },
        "job": "app", "backup_id": id, "started_at": at, "finished_at": at,
        "duration_seconds": 1.0,
        "source": { "host": "h", "port": 5432, "database": "d", "user": "u",
                    "server_version": "15", "server_version_num": 150000, "pg_dump_version": "15" },
        "dump": { "format": "custom", "scope": "full", "snapshot": "s", "include_schemas": [],
                  "exclude_schemas": [], "include_tables": [], "exclude_tables": [],
                  "globals": true, "no_role_passwords": false },
        "artifacts": artifacts, "row_counts": "exact",
        "inventory": { "tables": 0, "indexes": 0, "functions": 0, "triggers": 0,
                       "policies": 0, "extensions": 0, "per_table": [] }
    }))
    .unwrap()
}

/// A backup id at `at` (`2026-01-22T02-15-00Z-00ab`).
pub fn id_at(at: DateTime<Utc>, n: u16) -> String {
    format!("{}-{n:04x}", at.format("%Y-%m-%dT%H-%M-%SZ"))
}

/// The job `app` of a config with one local store, plus `extra` lines.
pub fn app_job(extra: &str) -> backstop_config::JobConfig {
    let (_, recipient) = backstop_crypto::generate_keypair();
    let text = format!(
        "[storage.s]\ntype = \"local\"\npath = \"/tmp/x\"\n[encryption.default]\nrecipients = [\"{recipient}\"]\n[[job]]\nname = \"app\"\ndatabase = {{ url = \"postgres://u@h/d\" }}\nstorage = [\"s\"]\n{extra}\n"
    );
    // A directory of its own: tests run in parallel.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    backstop_config::Config::load(&path).unwrap().jobs[0].clone()
}
