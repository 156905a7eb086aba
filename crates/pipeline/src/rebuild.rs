//! The catalog as a cache of the stores: `backstop catalog rebuild` (and
//! the daemon, on an empty catalog) records every backup a store holds as
//! an imported run, from its manifest, and every verification from its
//! record. A cluster job's runs are rebuilt from its databases' backups
//! of one run (their shared backup id). Idempotent: what the catalog has
//! already is left alone.

use std::collections::BTreeMap;
use std::time::Instant;

use backstop_catalog::{Catalog, CatalogError, ImportedRun, Outcome, RunKind};
use backstop_config::{Config, JobConfig};
use serde::Serialize;
use tracing::{info, warn};

use crate::manifest::Manifest;
use crate::store::Store;
use crate::summary::RunSummary;
use crate::{Trusted, Untrusted};

/// What a rebuild found and added for one job in one store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreRebuild {
    pub job: String,
    pub store: String,
    /// Series read (1 for a single-database job).
    pub series: usize,
    pub backups: usize,
    pub backups_added: usize,
    pub verifications: usize,
    pub verifications_added: usize,
    /// A cluster job's runs rebuilt from its databases' backups.
    pub cluster_runs_added: usize,
    /// What was not trusted (and not imported): manifests and
    /// verification records, each with the reason.
    pub untrusted: Vec<String>,
    /// Why this store could not be read at all.
    pub error: Option<String>,
    pub seconds: f64,
}

/// Rebuilds `catalog` from every store of every job (or of `only`).
///
/// # Errors
/// A catalog error (a store that cannot be read is reported in its row).
pub async fn rebuild(
    catalog: &Catalog,
    config: &Config,
    only: Option<&JobConfig>,
) -> Result<Vec<StoreRebuild>, CatalogError> {
    let jobs: Vec<&JobConfig> = match only {
        Some(j) => vec![j],
        None => config.jobs.iter().collect(),
    };
    let mut out = Vec::new();
    for job in jobs {
        for store in &job.storage {
            let r = rebuild_store(catalog, config, job, store).await?;
            match &r.error {
                Some(e) => {
                    warn!(job = %job.name, store = %store, error = %e, "Cannot rebuild the catalog from this store.")
                }
                None => {
                    info!(job = %job.name, store = %store, backups = r.backups, added = r.backups_added, verifications_added = r.verifications_added, "Catalog rebuilt from the store.")
                }
            }
            out.push(r);
        }
    }
    Ok(out)
}

async fn rebuild_store(
    catalog: &Catalog,
    config: &Config,
    job: &JobConfig,
    store: &str,
) -> Result<StoreRebuild, CatalogError> {
    let clock = Instant::now();
    let mut r = StoreRebuild {
        job: job.name.clone(),
        store: store.to_string(),
        ..Default::default()
    };
    let backend = match Store::open(config, store).await {
        Ok(b) => b,
        Err(e) => {
            r.error = Some(e);
            return Ok(r);
        }
    };
    let series = match backend.series(job).await {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(crate::one_line(&e));
            return Ok(r);
        }
    };
    r.series = series.len();
    // A cluster job's runs: every series' manifest of one backup id.
    let mut runs: BTreeMap<String, Vec<Trusted<Manifest>>> = BTreeMap::new();
    for member in &series {
        let listing = match backend.backups(member).await {
            Ok(x) => x,
            Err(e) => {
                r.error = Some(format!("{}: {}", member.name, crate::one_line(&e)));
                return Ok(r);
            }
        };
        let manifests = listing.backups;
        r.untrusted.extend(
            listing
                .untrusted
                .into_iter()
                .map(|Untrusted { key, reason, .. }| format!("{key}: {reason}")),
        );
        r.backups += manifests.len();
        let summaries: Vec<RunSummary> =
            manifests.iter().map(|m| RunSummary::of_backup(m)).collect();
        let backups: Vec<ImportedRun> = manifests
            .iter()
            .zip(&summaries)
            .map(|(m, s)| s.imported(&member.name, &m.backup_id))
            .collect();
        r.backups_added += catalog.import_runs(&backups).await?;
        if let Err(e) =
            import_verifications(catalog, &backend, &member.name, &manifests, &mut r).await?
        {
            r.error = Some(format!(
                "{}: verification records: {}",
                member.name,
                crate::one_line(&e)
            ));
        }
        if job.cluster.is_some() {
            for m in manifests {
                runs.entry(m.backup_id.clone()).or_default().push(m);
            }
        }
    }
    // Each run's summary, from its members' manifests.
    let summaries: Vec<(&String, RunSummary)> = runs
        .iter()
        .filter_map(|(id, members)| {
            let members: Vec<&Manifest> = members.iter().map(|m| &**m).collect();
            RunSummary::of_cluster(&members).map(|s| (id, s))
        })
        .collect();
    let cluster_runs: Vec<ImportedRun> = summaries
        .iter()
        .map(|(id, s)| s.imported(&job.name, id))
        .collect();
    r.cluster_runs_added += catalog.import_runs(&cluster_runs).await?;
    r.seconds = clock.elapsed().as_secs_f64();
    Ok(r)
}

/// Imports the trusted verification records of `series`' trusted backups
/// (`manifests`) as verify runs; counts them, and what was not trusted,
/// in `r`.
///
/// # Errors
/// The catalog's error; the store's is returned inside, for `r`.
async fn import_verifications(
    catalog: &Catalog,
    store: &Store,
    series: &str,
    manifests: &[Trusted<Manifest>],
    r: &mut StoreRebuild,
) -> Result<Result<(), backstop_storage::StorageError>, CatalogError> {
    let records = match store.verifications(series).await {
        Ok(records) => records,
        Err(e) => return Ok(Err(e)),
    };
    r.untrusted.extend(
        records
            .untrusted
            .iter()
            .map(|Untrusted { key, reason, .. }| format!("{key}: {reason}")),
    );
    // Only records of backups that are themselves trusted.
    let problems: Vec<(&crate::verification::VerificationRecord, String)> = records
        .by_backup
        .iter()
        .filter(|(id, _)| manifests.iter().any(|m| &m.backup_id == *id))
        .flat_map(|(_, recs)| recs)
        .map(|rec| (&**rec, rec.problems.join("; ")))
        .collect();
    r.verifications += problems.len();
    let verifications: Vec<ImportedRun> = problems
        .iter()
        .map(|(rec, problems)| ImportedRun {
            job: series,
            kind: RunKind::Verify,
            backup_id: &rec.backup_id,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            outcome: if rec.ok {
                Outcome::Success
            } else {
                Outcome::Failed
            },
            error: (!rec.ok).then_some(problems.as_str()),
            dump_bytes: None,
            stored_bytes: None,
            level: Some(&rec.level),
            store: Some(store.name()),
        })
        .collect();
    r.verifications_added += catalog.import_runs(&verifications).await?;
    Ok(Ok(()))
}
