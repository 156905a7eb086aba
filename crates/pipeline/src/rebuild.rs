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
use crate::{Trust, Trusted, Untrusted, list_backups, open_storage};

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
    let backend = match open_storage(config, store, None).await {
        Ok(b) => b,
        Err(e) => {
            r.error = Some(e);
            return Ok(r);
        }
    };
    let series = match crate::cluster::series_in_store(job, backend.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(crate::one_line(&e));
            return Ok(r);
        }
    };
    r.series = series.len();
    // A cluster job's runs: every series' manifest of one backup id.
    let mut runs: BTreeMap<String, Vec<Trusted<Manifest>>> = BTreeMap::new();
    let trust = Trust::from_config(config);
    for member in &series {
        let listing = match list_backups(backend.as_ref(), member, &trust).await {
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
        let backups: Vec<ImportedRun> = manifests
            .iter()
            .map(|m| {
                let (outcome, error) = match &m.suspect {
                    Some(why) => (Outcome::Suspect, Some(why.as_str())),
                    None => (Outcome::Success, None),
                };
                ImportedRun {
                    job: &member.name,
                    kind: RunKind::Backup,
                    backup_id: &m.backup_id,
                    started_at: m.started_at,
                    finished_at: m.finished_at,
                    outcome,
                    error,
                    dump_bytes: Some(m.dump_bytes()),
                    stored_bytes: Some(m.stored_bytes()),
                    level: None,
                    store: None,
                }
            })
            .collect();
        r.backups_added += catalog.import_runs(&backups).await?;
        match crate::verification::read_all(backend.as_ref(), &member.name, store, &trust).await {
            Ok(records) => {
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
                        job: &member.name,
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
                        store: Some(store),
                    })
                    .collect();
                r.verifications_added += catalog.import_runs(&verifications).await?;
            }
            Err(e) => {
                r.error = Some(format!(
                    "{}: verification records: {}",
                    member.name,
                    crate::one_line(&e)
                ));
            }
        }
        if job.cluster.is_some() {
            for m in manifests {
                runs.entry(m.backup_id.clone()).or_default().push(m);
            }
        }
    }
    // Each run's summary; the messages live as long as the batch.
    let mut summaries = Vec::new();
    for (backup_id, members) in &runs {
        let globals = members
            .iter()
            .find(|m| m.member.as_deref() == Some(backstop_vocab::series::GLOBALS_SEGMENT));
        let present: Vec<String> = members
            .iter()
            .filter_map(|m| m.cluster_database())
            .collect();
        let absent: Vec<&String> = globals
            .and_then(|g| g.databases.as_ref())
            .map(|dbs| dbs.iter().filter(|d| !present.contains(d)).collect())
            .unwrap_or_default();
        let suspect: Vec<String> = members
            .iter()
            .filter_map(|m| m.suspect.as_ref().map(|s| format!("{}: {s}", m.series())))
            .collect();
        let absent_msg: String = format!(
            "imported: no backup of {} in this run (it failed, or was pruned since)",
            absent
                .iter()
                .map(|d| format!("database \"{d}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let suspect_msg = suspect.join("; ");
        let (outcome, error) = if globals.is_none() {
            (
                Outcome::Failed,
                Some("imported: the run's roles and tablespaces (globals) backup is missing"),
            )
        } else if !absent.is_empty() {
            (Outcome::Failed, Some(absent_msg.as_str()))
        } else if !suspect.is_empty() {
            (Outcome::Suspect, Some(suspect_msg.as_str()))
        } else {
            (Outcome::Success, None)
        };
        let dump: u64 = members
            .iter()
            .map(|m| m.dump_bytes() + crate::cluster::globals_plain(m))
            .sum();
        let stored: u64 = members.iter().map(|m| m.stored_bytes()).sum();
        let started = members
            .iter()
            .map(|m| m.started_at)
            .min()
            .expect("a member");
        let finished = members
            .iter()
            .map(|m| m.finished_at)
            .max()
            .expect("a member");
        summaries.push((
            backup_id,
            outcome,
            error.map(str::to_string),
            dump,
            stored,
            started,
            finished,
        ));
    }
    let cluster_runs: Vec<ImportedRun> = summaries
        .iter()
        .map(
            |(backup_id, outcome, error, dump, stored, started, finished)| ImportedRun {
                job: &job.name,
                kind: RunKind::Backup,
                backup_id,
                started_at: *started,
                finished_at: *finished,
                outcome: *outcome,
                error: error.as_deref(),
                dump_bytes: Some(*dump),
                stored_bytes: Some(*stored),
                level: None,
                store: None,
            },
        )
        .collect();
    r.cluster_runs_added += catalog.import_runs(&cluster_runs).await?;
    r.seconds = clock.elapsed().as_secs_f64();
    Ok(r)
}
