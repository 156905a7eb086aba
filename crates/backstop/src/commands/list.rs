//! `backstop list --job J`: a job's complete backups in one store, newest
//! first, with their latest verification.

use backstop_config::Config;
use backstop_pipeline::human_bytes;
use backstop_pipeline::read::select::job_stores;
use backstop_pipeline::store::Store;

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    database: Option<&str>,
    storage: Option<&str>,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    // Default: the job's first store.
    let store = job_stores(job, storage)?.swap_remove(0);
    let backend = Store::open(config, &store)
        .await
        .map_err(CliError::failed)?;
    let series = super::series(config, job, database, Some(&store)).await?;
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let mut all = Vec::new();
    for (n, member) in series.iter().enumerate() {
        if !json && series.len() > 1 {
            if n > 0 {
                println!();
            }
            println!("{}", super::series_title(member));
        }
        all.extend(list_series(&catalog, member, &backend, json).await?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if series.is_empty() {
        println!(
            "no complete backups of job \"{}\" in store \"{store}\"",
            job.name
        );
    }
    Ok(())
}

/// Prints one series' backups (or, with `json`, returns them).
///
/// Length: the text and JSON of one series' backups, row by row.
async fn list_series(
    catalog: &backstop_catalog::Catalog,
    job: &backstop_config::JobConfig,
    backend: &Store,
    json: bool,
) -> Result<Vec<serde_json::Value>, CliError> {
    let store = backend.name().to_string();
    let listing = backend.backups(job).await.map_err(|e| {
        CliError::from(e).context(format!("cannot list backups in store \"{store}\""))
    })?;
    let manifests = &listing.backups;
    // Verification results: the catalog's and the store's records (which
    // outlive the catalog); a verify never rewrites a backup.
    let verified = catalog.last_verifications(&job.name, &store).await?;
    let records = backend.verifications(&job.name).await.map_err(|e| {
        CliError::from(e).context(format!("cannot list backups in store \"{store}\""))
    })?;
    let verified = backstop_pipeline::verification::merge_latest(&records, Some(verified));
    let untrusted: Vec<&backstop_pipeline::Untrusted> =
        listing.untrusted.iter().chain(&records.untrusted).collect();
    if json {
        let mut out = Vec::new();
        for m in manifests {
            let mut v = serde_json::to_value(m)?;
            v["last_verification"] = serde_json::to_value(verified.get(&m.backup_id))?;
            v["trusted"] = true.into();
            v["signed_by"] = m.signed_by().into();
            out.push(v);
        }
        for u in &untrusted {
            out.push(serde_json::json!({
                "job": job.name,
                "backup_id": u.backup_id,
                "key": u.key,
                "trusted": false,
                "reason": u.reason,
            }));
        }
        return Ok(out);
    }
    if manifests.is_empty() && untrusted.is_empty() {
        println!(
            "no complete backups of job \"{}\" in store \"{store}\"",
            job.name
        );
        return Ok(Vec::new());
    }
    println!(
        "{:<27} {:<20} {:>9} {:>10} {:>10} {:>7} {:>12}  VERIFIED",
        "BACKUP ID", "STARTED (UTC)", "DURATION", "DUMP", "STORED", "TABLES", "ROWS"
    );
    for m in manifests {
        let verification = match verified.get(&m.backup_id) {
            Some(v) if v.ok => format!("{} {}", v.level, v.at.format("%Y-%m-%d %H:%M")),
            Some(v) => format!("FAILED {} {}", v.level, v.at.format("%Y-%m-%d %H:%M")),
            None => "-".into(),
        };
        let verification = if m.suspect.is_some() {
            format!("{verification}  SUSPECT (much smaller than usual)")
        } else {
            verification
        };
        println!(
            "{:<27} {:<20} {:>8.1}s {:>10} {:>10} {:>7} {:>12}  {verification}",
            m.backup_id,
            m.started_at.format("%Y-%m-%d %H:%M:%S"),
            m.duration_seconds,
            human_bytes(m.dump_bytes()),
            human_bytes(m.stored_bytes()),
            m.inventory.tables,
            m.total_rows().map_or_else(
                || "-".to_string(),
                |r| {
                    if m.row_counts == "estimate" {
                        format!("~{r}")
                    } else {
                        r.to_string()
                    }
                }
            ),
        );
    }
    // What lies there posing as a backup: never restored, verified or
    // counted by retention (docs/SECURITY.md).
    for u in &untrusted {
        println!(
            "{:<27} UNTRUSTED: {} ({})",
            u.backup_id.as_deref().unwrap_or("-"),
            u.reason,
            u.key
        );
    }
    Ok(Vec::new())
}
