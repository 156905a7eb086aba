//! Applying retention to one store: list, plan, delete (each backup's
//! manifest first, then its artifacts), then clean up incomplete attempts
//! older than the grace.
//!
//! Nothing is deleted unless the listing succeeded and is consistent: every
//! manifest readable and every artifact it names present at its size. An
//! interrupted prune leaves, at worst, artifacts without a manifest (an
//! incomplete attempt the next prune removes), never a manifest pointing at
//! missing artifacts: deleting the artifacts first would leave exactly that
//! when interrupted between two of them.

use std::collections::BTreeMap;

use backstop_catalog::{Catalog, CatalogError, Outcome, RunKind, RunResult};
use backstop_config::{Config, JobConfig, RetentionConfig};
use backstop_retention::{Backup, Plan, plan};
use backstop_storage::{ObjectMeta, Storage, StorageError};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::manifest::{MANIFEST_FILE, Manifest};

/// Why a prune did nothing.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("listing store \"{store}\" failed, so nothing was deleted: {reason}")]
    List { store: String, reason: String },
    #[error(
        "store \"{store}\" is inconsistent, so nothing was deleted: {reason} (run `backstop verify --job {job} --backup all` and look at it by hand)"
    )]
    Inconsistent {
        store: String,
        job: String,
        reason: String,
    },
}

/// Prunes `job`'s backups in each of `stores` on its own, recording one
/// prune run per store in `catalog` (none for a dry run), as of
/// [`crate::now`]. The CLI and the daemon both call this. A store that cannot
/// be opened, listed or read fails on its own; the others go on.
///
/// # Errors
/// [`CatalogError`] when a run cannot be recorded.
pub async fn prune_job(
    config: &Config,
    job: &JobConfig,
    retention: &RetentionConfig,
    catalog: &Catalog,
    stores: &[String],
    dry_run: bool,
) -> Result<Vec<(String, Result<PruneReport, PruneError>)>, CatalogError> {
    let mut out = Vec::new();
    for store in stores {
        let backend = match crate::open_storage(config, store, None).await {
            Ok(b) => b,
            Err(reason) => {
                out.push((
                    store.clone(),
                    Err(PruneError::List {
                        store: store.clone(),
                        reason,
                    }),
                ));
                continue;
            }
        };
        // A cluster job's databases (and its globals) each keep their own
        // backups by the job's retention, those of databases the server
        // no longer has included, until they age out.
        let series = match crate::cluster::series_in_store(job, backend.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                out.push((
                    store.clone(),
                    Err(PruneError::List {
                        store: store.clone(),
                        reason: e.to_string(),
                    }),
                ));
                continue;
            }
        };
        for member in &series {
            let run = if dry_run {
                None
            } else {
                Some(
                    catalog
                        .start_run(&member.name, RunKind::Prune, None, Utc::now())
                        .await?,
                )
            };
            let r = prune_store(
                backend.as_ref(),
                store,
                member,
                retention,
                Some(catalog),
                crate::now(),
                dry_run,
            )
            .await;
            if let Some(run) = run {
                let (outcome, error) = match &r {
                    Ok(rep) if rep.skipped.is_empty() => (Outcome::Success, None),
                    Ok(rep) => (
                        Outcome::Failed,
                        Some(format!(
                            "{} object(s) could not be deleted",
                            rep.skipped.len()
                        )),
                    ),
                    Err(e) => (Outcome::Failed, Some(e.to_string())),
                };
                let result = RunResult {
                    error: error.as_deref(),
                    ..Default::default()
                };
                catalog
                    .finish_run(run, outcome, Utc::now(), &result)
                    .await?;
            }
            out.push((store.clone(), r));
        }
    }
    Ok(out)
}

/// What a prune of one store did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub store: String,
    /// The job, or a cluster job's series (`<job>/<segment>`).
    pub series: String,
    pub dry_run: bool,
    pub plan: Plan,
    /// Backups deleted (manifest and artifacts).
    pub deleted: Vec<String>,
    /// Objects that could not be deleted because of a fault: key and why.
    /// A prune with any is a failed run.
    pub skipped: Vec<(String, String)>,
    /// Backups the store refused to delete because Object Lock protects
    /// them (retention or legal hold): backup id and the store's words.
    /// Expected on a locked bucket, kept whole, tried again next prune; not
    /// a failure.
    pub locked: Vec<(String, String)>,
    /// Incomplete attempts (folders without a manifest) removed.
    pub orphans: Vec<String>,
    /// Multipart uploads / partial files aborted.
    pub aborted_uploads: usize,
}

/// The backup id's start time (`2026-01-22T02-15-00Z-7f3a`).
fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let ts = id.get(..20)?;
    NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H-%M-%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// Whether a delete failed because the store protects the object for now:
/// the storage crate decides it from the store's own error code and message
/// (a plain "access denied" is a fault, not a lock).
pub fn is_retention_lock(e: &StorageError) -> bool {
    matches!(e, StorageError::Locked { .. })
}

/// Prunes `job`'s backups in `storage` (called `store`) by its retention.
///
/// # Errors
/// [`PruneError`] when the listing fails or is inconsistent; nothing is
/// deleted then.
pub async fn prune_store(
    storage: &dyn Storage,
    store: &str,
    job: &JobConfig,
    retention: &RetentionConfig,
    catalog: Option<&Catalog>,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, PruneError> {
    let prefix = format!("{}/", job.name);
    let list_err = |e: StorageError| PruneError::List {
        store: store.to_string(),
        reason: e.to_string(),
    };
    let objects = storage.list(&prefix).await.map_err(list_err)?;
    let mut folders: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    for o in objects {
        let Some((id, _)) = o.key[prefix.len()..].split_once('/') else {
            continue;
        };
        folders.entry(id.to_string()).or_default().push(o);
    }
    let inconsistent = |reason: String| PruneError::Inconsistent {
        store: store.to_string(),
        job: job.name.clone(),
        reason,
    };
    let mut complete: BTreeMap<String, (Manifest, Vec<ObjectMeta>)> = BTreeMap::new();
    let mut incomplete: Vec<(String, Vec<ObjectMeta>)> = Vec::new();
    for (id, objs) in folders {
        let mkey = format!("{prefix}{id}/{MANIFEST_FILE}");
        if !objs.iter().any(|o| o.key == mkey) {
            incomplete.push((id, objs));
            continue;
        }
        let body = storage.get(&mkey).await.map_err(list_err)?;
        let m: Manifest = serde_json::from_slice(&body)
            .map_err(|e| inconsistent(format!("{mkey} cannot be read: {e}")))?;
        for a in &m.artifacts {
            match objs.iter().find(|o| o.key == a.key) {
                Some(o) if o.size == a.stored_bytes => {}
                Some(o) => {
                    return Err(inconsistent(format!(
                        "{} is {} bytes, its manifest says {}",
                        a.key, o.size, a.stored_bytes
                    )));
                }
                None => {
                    return Err(inconsistent(format!(
                        "{} names {}, which is missing",
                        mkey, a.key
                    )));
                }
            }
        }
        complete.insert(id, (m, objs));
    }

    // The catalog's results and the store's records together: retention
    // honours a failed verification even after the catalog was lost.
    let from_catalog = match catalog {
        Some(c) => Some(
            c.last_verifications(&job.name, store)
                .await
                .unwrap_or_default(),
        ),
        None => None,
    };
    let failed_verify = crate::verification::latest(storage, &job.name, from_catalog)
        .await
        .map_err(list_err)?;
    let backups: Vec<Backup> = complete
        .values()
        .map(|(m, _)| Backup {
            id: m.backup_id.clone(),
            started_at: m.started_at,
            verify_failed: failed_verify.get(&m.backup_id).is_some_and(|v| !v.ok),
            suspect: m.suspect.is_some(),
        })
        .collect();
    let plan = plan(&retention.policy, &backups, job.timezone);
    let mut report = PruneReport {
        store: store.to_string(),
        series: job.name.clone(),
        dry_run,
        plan: plan.clone(),
        deleted: Vec::new(),
        skipped: Vec::new(),
        locked: Vec::new(),
        orphans: Vec::new(),
        aborted_uploads: 0,
    };

    let grace = chrono::Duration::from_std(retention.orphan_grace).unwrap_or(chrono::Duration::MAX);
    let old_enough = |id: &str| id_time(id).is_some_and(|t| now - t > grace);
    if dry_run {
        report.orphans = incomplete
            .iter()
            .filter(|(id, _)| old_enough(id))
            .map(|(id, _)| id.clone())
            .collect();
        return Ok(report);
    }

    for d in plan.deleted() {
        let Some((_, objs)) = complete.get(&d.id) else {
            continue;
        };
        let mkey = format!("{prefix}{}/{MANIFEST_FILE}", d.id);
        // The manifest first: from then on the backup does not exist, and if
        // the prune is interrupted its artifacts are an incomplete attempt
        // that the next prune removes. Never a manifest naming deleted files.
        if let Err(e) = storage.delete(&mkey).await {
            if is_retention_lock(&e) {
                info!(job = %job.name, store, backup_id = %d.id, refusal = %e, "Backup is protected by Object Lock; kept whole until the lock expires, the next prune tries again.");
                report.locked.push((d.id.clone(), e.to_string()));
            } else {
                warn!(job = %job.name, store, backup_id = %d.id, error = %e, "Could not delete the backup's manifest; the backup is kept whole.");
                report.skipped.push((mkey, e.to_string()));
            }
            continue;
        }
        report.deleted.push(d.id.clone());
        for o in objs.iter().filter(|o| o.key != mkey) {
            if let Err(e) = storage.delete(&o.key).await {
                warn!(job = %job.name, store, key = %o.key, error = %e, "Could not delete an artifact of a pruned backup; the next prune removes it.");
                report.skipped.push((
                    o.key.clone(),
                    format!("{e} (left as an incomplete attempt for the next prune)"),
                ));
            }
        }
        info!(job = %job.name, store, backup_id = %d.id, "Pruned backup.");
    }

    for (id, objs) in incomplete.iter().filter(|(id, _)| old_enough(id)) {
        let keys: Vec<String> = objs.iter().map(|o| o.key.clone()).collect();
        match storage.delete_many(&keys).await {
            Ok(()) => report.orphans.push(id.clone()),
            Err(e) => report
                .skipped
                .push((format!("{prefix}{id}/"), e.to_string())),
        }
    }
    if let Ok(pending) = storage.pending_uploads(&prefix).await {
        for p in pending {
            let id = p.key[prefix.len().min(p.key.len())..]
                .split('/')
                .next()
                .unwrap_or("");
            let started = p
                .initiated_unix
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .or_else(|| id_time(id));
            if started.is_some_and(|t| now - t > grace) && storage.abort_upload(&p).await.is_ok() {
                report.aborted_uploads += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use backstop_storage::{ByteStream, PendingUpload};
    use bytes::Bytes;
    use tokio::io::AsyncRead;

    /// A store in memory whose deletes start failing after `budget` of them,
    /// as if the server died mid-prune.
    struct Mem {
        objects: Mutex<Map<String, Bytes>>,
        budget: Mutex<usize>,
    }

    #[async_trait]
    impl Storage for Mem {
        fn describe(&self) -> String {
            "memory".into()
        }
        async fn put_stream(&self, _: &str, _: ByteStream) -> Result<u64, StorageError> {
            Err(StorageError::BadKey("read-only test store".into()))
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
            self.objects.lock().unwrap().insert(key.into(), data);
            Ok(())
        }
        async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
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
            _: u64,
            _: Option<u64>,
        ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError> {
            let b = self.get(key).await?;
            Ok(Box::new(std::io::Cursor::new(b.to_vec())))
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

    fn manifest_for(id: &str, at: DateTime<Utc>, sizes: &[(&str, usize)]) -> Manifest {
        let artifacts: Vec<serde_json::Value> = sizes
            .iter()
            .map(|(kind, n)| {
                serde_json::json!({
                    "kind": kind, "file": format!("{kind}.zst.age"), "key": format!("app/{id}/{kind}.zst.age"),
                    "format": "custom", "plain_bytes": n, "plain_sha256": "", "stored_bytes": n,
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

    /// Ten daily backups of two artifacts each.
    fn store(budget: usize) -> Mem {
        let mem = Mem {
            objects: Mutex::new(Map::new()),
            budget: Mutex::new(budget),
        };
        for d in 1..=10 {
            let at = DateTime::parse_from_rfc3339(&format!("2026-01-{d:02}T02:00:00Z"))
                .unwrap()
                .with_timezone(&Utc);
            let id = format!("{}-00{d:02}", at.format("%Y-%m-%dT%H-%M-%SZ"));
            let m = manifest_for(&id, at, &[("database", 100 + d), ("globals", 10)]);
            let mut o = mem.objects.lock().unwrap();
            for a in &m.artifacts {
                o.insert(
                    a.key.clone(),
                    Bytes::from(vec![0u8; a.stored_bytes as usize]),
                );
            }
            o.insert(
                format!("app/{id}/{MANIFEST_FILE}"),
                Bytes::from(serde_json::to_vec(&m).unwrap()),
            );
        }
        mem
    }

    fn job_and_policy() -> (JobConfig, RetentionConfig) {
        let text = "[storage.s]\ntype = \"local\"\npath = \"/tmp/x\"\n[[job]]\nname = \"app\"\ndatabase = { url = \"postgres://u@h/d\" }\nstorage = [\"s\"]\nencryption = \"none\"\nretention = { keep_last = 3 }\n";
        // A directory of its own: tests run in parallel.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let c = backstop_config::Config::load(&path).unwrap();
        let job = c.jobs[0].clone();
        let r = job.retention.clone().unwrap();
        (job, r)
    }

    #[tokio::test]
    async fn an_interrupted_prune_never_leaves_a_manifest_without_its_artifacts() {
        let (job, retention) = job_and_policy();
        let now = Utc::now();
        // Every interruption point: 0 … 21 deletes allowed (7 backups × 3 objects).
        for budget in 0..=21 {
            let mem = store(budget);
            let r = prune_store(&mem, "s", &job, &retention, None, now, false)
                .await
                .unwrap();
            let objects = mem.list("app/").await.unwrap();
            for o in objects.iter().filter(|o| o.key.ends_with(MANIFEST_FILE)) {
                let m: Manifest = serde_json::from_slice(&mem.get(&o.key).await.unwrap()).unwrap();
                for a in &m.artifacts {
                    assert!(
                        objects.iter().any(|x| x.key == a.key),
                        "budget {budget}: {} lost {} but kept its manifest",
                        m.backup_id,
                        a.key
                    );
                }
            }
            assert_eq!(
                r.deleted.len(),
                budget.div_ceil(3).min(7),
                "budget {budget}"
            );
            // A later prune with a healthy store finishes the job, removing
            // the half-deleted backup as an incomplete attempt.
            *mem.budget.lock().unwrap() = usize::MAX;
            let again = prune_store(&mem, "s", &job, &retention, None, now, false)
                .await
                .unwrap();
            assert_eq!(again.plan.kept().count(), 3);
            let left = mem.list("app/").await.unwrap();
            assert_eq!(left.len(), 9, "budget {budget}: {left:?}");
        }
    }

    #[tokio::test]
    async fn dry_run_deletes_nothing_and_a_bad_manifest_stops_the_prune() {
        let (job, retention) = job_and_policy();
        let mem = store(usize::MAX);
        let r = prune_store(&mem, "s", &job, &retention, None, Utc::now(), true)
            .await
            .unwrap();
        assert_eq!(r.plan.deleted().count(), 7);
        assert!(r.deleted.is_empty());
        assert_eq!(mem.list("app/").await.unwrap().len(), 30);
        // An artifact of a kept backup went missing: inconsistent, nothing deleted.
        let gone = mem
            .list("app/")
            .await
            .unwrap()
            .into_iter()
            .rfind(|o| o.key.ends_with("database.zst.age"))
            .unwrap();
        mem.objects.lock().unwrap().remove(&gone.key);
        let e = prune_store(&mem, "s", &job, &retention, None, Utc::now(), false)
            .await
            .unwrap_err();
        assert!(matches!(e, PruneError::Inconsistent { .. }), "{e}");
        assert_eq!(mem.list("app/").await.unwrap().len(), 29);
    }

    #[test]
    fn ids_carry_their_time() {
        assert_eq!(
            id_time("2026-01-22T02-15-00Z-7f3a"),
            Some(
                DateTime::parse_from_rfc3339("2026-01-22T02:15:00Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
        assert_eq!(id_time("not-a-backup"), None);
    }

    /// Regression (issue 12, item 2): the S3 mapping replaced every
    /// AccessDenied with a fixed hint, so the lock was never recognised; the
    /// old test passed only because it fed a hand-written string.
    #[test]
    fn object_lock_refusals_are_recognised_from_the_stores_code_and_message() {
        use backstop_storage::is_object_lock_refusal as lock;
        assert!(lock(
            "AccessDenied",
            "Access Denied because object protected by object lock."
        ));
        assert!(lock(
            "ObjectLocked",
            "Object is WORM protected and cannot be overwritten"
        ));
        assert!(lock("AccessDenied", "Object is under legal hold"));
        assert!(!lock("AccessDenied", "Access Denied"));
        assert!(!lock("AccessDenied", ""));
        assert!(!lock("InternalError", "retention service unavailable"));
        let locked = StorageError::Locked {
            op: "delete",
            location: "s3://b/k".into(),
            code: "AccessDenied".into(),
            message: "Access Denied because object protected by object lock.".into(),
        };
        assert!(is_retention_lock(&locked));
        let denied = StorageError::Remote {
            op: "delete",
            location: "s3://b/k".into(),
            message: "access denied: object lock words in a policy message".into(),
            retryable: false,
        };
        assert!(!is_retention_lock(&denied), "only the typed refusal counts");
    }
}
