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

use backstop_catalog::{Catalog, CatalogError, Outcome, RunKind, RunResult};
use backstop_config::{Config, JobConfig, RetentionConfig};
use backstop_retention::{Backup, Plan, plan};
use backstop_storage::{ObjectMeta, Storage, StorageError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::manifest::MANIFEST_FILE;
use crate::store::Store;
use crate::trust::id_time;

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
        let backend = match Store::open(config, store).await {
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
        let series = match backend.series(job).await {
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
        // A database the newest cluster run no longer holds (dropped from
        // the server, or excluded) ages out after keep_gone_for.
        let newest_run = if job.cluster.is_some() {
            newest_cluster_run(&backend, job).await
        } else {
            None
        };
        for member in &series {
            let gone = newest_run.as_ref().and_then(|(run, started, databases)| {
                let database = backstop_vocab::series::split(&member.name)
                    .1
                    .and_then(backstop_vocab::series::database_of)?;
                (!databases.contains(&database)).then(|| Gone {
                    run: run.clone(),
                    run_started: *started,
                    keep_for: retention.keep_gone_for,
                })
            });
            let run = if dry_run {
                None
            } else {
                Some(
                    catalog
                        .start_run(&member.name, RunKind::Prune, None, Utc::now())
                        .await?,
                )
            };
            let r = prune_series(
                &backend,
                member,
                retention,
                Some(catalog),
                crate::now(),
                dry_run,
                gone.as_ref(),
            )
            .await;
            if let Some(run) = run {
                record_prune(catalog, run, &r).await?;
            }
            out.push((store.clone(), r));
        }
    }
    Ok(out)
}

/// The newest trusted globals backup of cluster job `job` in `storage`: its
/// run's id, start and databases (None when there is none, or the store
/// cannot be read: then nothing counts as gone).
async fn newest_cluster_run(
    store: &Store,
    job: &JobConfig,
) -> Option<(String, DateTime<Utc>, Vec<String>)> {
    let listing = store.backups(&job.globals_member(&[])).await.ok()?;
    let newest = listing.backups.iter().max_by_key(|m| m.started_at)?;
    Some((
        newest.backup_id.clone(),
        newest.started_at,
        newest.databases.clone()?,
    ))
}

/// `90d` for whole days, else humantime's words.
fn days(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// A cluster job's database that the newest cluster run does not hold.
#[derive(Debug, Clone)]
pub struct Gone {
    /// The newest run (its globals backup's id) and when it started.
    pub run: String,
    pub run_started: DateTime<Utc>,
    /// `retention.keep_gone_for`.
    pub keep_for: std::time::Duration,
}

impl Gone {
    /// Whether a series with `backups` ages out `now`: its newest backup
    /// is older than the newest run and than `keep_gone_for`.
    fn ages_out(&self, backups: &[Backup], now: DateTime<Utc>) -> bool {
        backups
            .iter()
            .map(|b| b.started_at)
            .max()
            .is_some_and(|newest| {
                newest < self.run_started
                    && chrono::Duration::from_std(self.keep_for).is_ok_and(|k| now - newest > k)
            })
    }
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
    /// Objects that are not trusted (forged or altered manifests and
    /// records, keys the store refuses): kept, and counted by no rule.
    pub untrusted: Vec<crate::Untrusted>,
}

/// Whether a delete failed because the store protects the object for now:
/// the storage crate decides it from the store's own error code and message
/// (a plain "access denied" is a fault, not a lock).
pub fn is_retention_lock(e: &StorageError) -> bool {
    matches!(e, StorageError::Locked { .. })
}

/// Prunes `job`'s backups in `store` by its retention.
///
/// # Errors
/// [`PruneError`] when the listing fails or is inconsistent; nothing is
/// deleted then.
pub async fn prune_store(
    store: &Store,
    job: &JobConfig,
    retention: &RetentionConfig,
    catalog: Option<&Catalog>,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, PruneError> {
    prune_series(store, job, retention, catalog, now, dry_run, None).await
}

/// [`prune_store`] of one series, which with `gone` (its database is not in
/// the newest cluster run) loses every backup once its newest is older
/// than `keep_gone_for` and older than that run.
///
/// Length: the prune of one series in order (list, check, plan, delete, clean
/// up), each stage a call; what stays here is the plan, which every stage
/// shares.
#[allow(clippy::too_many_arguments)]
async fn prune_series(
    opened: &Store,
    job: &JobConfig,
    retention: &RetentionConfig,
    catalog: Option<&Catalog>,
    now: DateTime<Utc>,
    dry_run: bool,
    gone: Option<&Gone>,
) -> Result<PruneReport, PruneError> {
    let (storage, store, trust) = (opened.storage(), opened.name(), opened.trust());
    let prefix = format!("{}/", job.name);
    let list_err = |e: StorageError| PruneError::List {
        store: store.to_string(),
        reason: e.to_string(),
    };
    let objects = storage.list(&prefix).await.map_err(list_err)?;
    // Folders as the store lists them: prune plans by folder and deletes
    // what it listed in a folder, never by what a manifest claims.
    let (folders, refused) = crate::trust::folders(&prefix, objects);
    let listing = crate::trust::read_backups(storage, job, trust, &folders)
        .await
        .map_err(list_err)?;
    let inconsistent = |reason: String| PruneError::Inconsistent {
        store: store.to_string(),
        job: job.name.clone(),
        reason,
    };
    let mkey_of = |id: &str| format!("{prefix}{id}/{MANIFEST_FILE}");
    // A folder without a manifest is an incomplete attempt; one whose
    // manifest is not trusted is kept untouched and counts for nothing.
    let incomplete: Vec<(String, Vec<ObjectMeta>)> = folders
        .iter()
        .filter(|(id, objs)| !objs.iter().any(|o| o.key == mkey_of(id)))
        .map(|(id, objs)| (id.clone(), objs.clone()))
        .collect();
    if let Some(reason) = inconsistency(&listing, &folders, &mkey_of) {
        return Err(inconsistent(reason));
    }
    for u in listing.untrusted.iter().chain(&refused) {
        warn!(job = %job.name, store, key = %u.key, reason = %u.reason, "Keeping an object that is not trusted: prune neither deletes nor counts it.");
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
    let records = opened.verifications(&job.name).await.map_err(list_err)?;
    let failed_verify = crate::verification::merge_latest(&records, from_catalog);
    let backups: Vec<Backup> = listing
        .backups
        .iter()
        .map(|m| Backup {
            id: m.backup_id.clone(),
            started_at: m.started_at,
            verify_failed: failed_verify.get(&m.backup_id).is_some_and(|v| !v.ok),
            suspect: m.suspect.is_some(),
        })
        .collect();
    let mut plan = plan(&retention.policy, &backups, job.timezone);
    if let Some(g) = gone
        && g.ages_out(&backups, now)
    {
        let why = format!(
            "its database is gone from the server (not in run {}) and its newest backup is older than keep_gone_for ({})",
            g.run,
            days(g.keep_for)
        );
        info!(job = %job.name, store, run = %g.run, backups = backups.len(), "The database is gone from the server for longer than keep_gone_for: its backups age out.");
        for d in &mut plan.decisions {
            d.keep = false;
            d.reasons = vec![why.clone()];
        }
    }
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
        untrusted: listing.untrusted.iter().chain(&refused).cloned().collect(),
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

    delete_planned(storage, job, &plan, &folders, &mut report).await;
    let stale = |t: DateTime<Utc>| now - t > grace;
    clean_incomplete(storage, &prefix, &incomplete, stale, &mut report).await;
    Ok(report)
}

/// Finishes a prune run: failed when the series could not be pruned or
/// some objects could not be deleted.
///
/// # Errors
/// The catalog's.
async fn record_prune(
    catalog: &Catalog,
    run: i64,
    r: &Result<PruneReport, PruneError>,
) -> Result<(), CatalogError> {
    let (outcome, error) = match r {
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
    catalog.finish_run(run, outcome, Utc::now(), &result).await
}

/// What a trusted backup's manifest and its folder disagree on (an
/// artifact missing, or of another size), if anything: prune then touches
/// nothing of the series.
fn inconsistency(
    listing: &crate::Listing,
    folders: &std::collections::BTreeMap<String, Vec<ObjectMeta>>,
    mkey_of: &dyn Fn(&str) -> String,
) -> Option<String> {
    for m in &listing.backups {
        let objs = &folders[&m.backup_id];
        for a in &m.artifacts {
            match objs.iter().find(|o| o.key == a.key) {
                Some(o) if o.size == a.stored_bytes => {}
                Some(o) => {
                    return Some(format!(
                        "{} is {} bytes, its manifest says {}",
                        a.key, o.size, a.stored_bytes
                    ));
                }
                None => {
                    return Some(format!(
                        "{} names {}, which is missing",
                        mkey_of(&m.backup_id),
                        a.key
                    ));
                }
            }
        }
    }
    None
}

/// Deletes the backups the plan drops, each manifest first: from then on
/// the backup does not exist, and if the prune is interrupted its
/// artifacts are an incomplete attempt the next prune removes. Never a
/// manifest naming deleted files.
async fn delete_planned(
    storage: &dyn Storage,
    job: &JobConfig,
    plan: &Plan,
    folders: &std::collections::BTreeMap<String, Vec<ObjectMeta>>,
    report: &mut PruneReport,
) {
    let store = report.store.clone();
    for d in plan.deleted() {
        let Some(objs) = folders.get(&d.id) else {
            continue;
        };
        let mkey = format!("{}/{}/{MANIFEST_FILE}", job.name, d.id);
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
}

/// Removes incomplete attempts (folders without a manifest) and aborts
/// pending uploads, each only once `stale` (older than `orphan_grace`): a
/// backup running now must not lose its artifacts.
async fn clean_incomplete(
    storage: &dyn Storage,
    prefix: &str,
    incomplete: &[(String, Vec<ObjectMeta>)],
    stale: impl Fn(DateTime<Utc>) -> bool,
    report: &mut PruneReport,
) {
    for (id, objs) in incomplete
        .iter()
        .filter(|(id, _)| id_time(id).is_some_and(&stale))
    {
        let keys: Vec<String> = objs.iter().map(|o| o.key.clone()).collect();
        match storage.delete_many(&keys).await {
            Ok(()) => report.orphans.push(id.clone()),
            Err(e) => report
                .skipped
                .push((format!("{prefix}{id}/"), e.to_string())),
        }
    }
    if let Ok(pending) = storage.pending_uploads(prefix).await {
        for p in pending {
            let id = p.key[prefix.len().min(p.key.len())..]
                .split('/')
                .next()
                .unwrap_or("");
            let started = p
                .initiated_unix
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .or_else(|| id_time(id));
            if started.is_some_and(&stale) && storage.abort_upload(&p).await.is_ok() {
                report.aborted_uploads += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Manifest;
    use crate::testkit::MemStore as Mem;
    use crate::trust::Trust;
    use bytes::Bytes;

    fn no_keys(now: DateTime<Utc>) -> Trust {
        Trust::new(Default::default(), now)
    }

    /// `mem` as store "s", read with no keys as of `now`.
    fn opened(mem: &std::sync::Arc<Mem>, now: DateTime<Utc>) -> Store {
        Store::new("s", mem.clone(), no_keys(now))
    }

    use crate::testkit::manifest_for;

    /// Ten daily backups of two artifacts each.
    fn store(budget: usize) -> std::sync::Arc<Mem> {
        let mem = std::sync::Arc::new(Mem::with_delete_budget(budget));
        for d in 1..=10 {
            let at = DateTime::parse_from_rfc3339(&format!("2026-01-{d:02}T02:00:00Z"))
                .unwrap()
                .with_timezone(&Utc);
            let id = format!("{}-00{d:02}", at.format("%Y-%m-%dT%H-%M-%SZ"));
            let m = manifest_for(&id, at, &[("database", 100 + d), ("globals", 10)]);
            for a in &m.artifacts {
                mem.insert(&a.key, Bytes::from(vec![0u8; a.stored_bytes as usize]));
            }
            mem.insert(
                &format!("app/{id}/{MANIFEST_FILE}"),
                Bytes::from(serde_json::to_vec(&m).unwrap()),
            );
        }
        mem
    }

    fn job_and_policy() -> (JobConfig, RetentionConfig) {
        let job = crate::testkit::app_job("encryption = \"none\"\nretention = { keep_last = 3 }");
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
            let r = prune_store(&opened(&mem, now), &job, &retention, None, now, false)
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
            mem.set_delete_budget(usize::MAX);
            let again = prune_store(&opened(&mem, now), &job, &retention, None, now, false)
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
        let r = prune_store(
            &opened(&mem, Utc::now()),
            &job,
            &retention,
            None,
            Utc::now(),
            true,
        )
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
            .rfind(|o| o.key.ends_with("database.dump.zst"))
            .unwrap();
        mem.remove(&gone.key);
        let e = prune_store(
            &opened(&mem, Utc::now()),
            &job,
            &retention,
            None,
            Utc::now(),
            false,
        )
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
