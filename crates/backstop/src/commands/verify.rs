//! `backstop verify`: stored backups checked against their manifests (the
//! operation is the pipeline's `verify_job`), or `--against-live`: a
//! backup's inventory and row counts compared with the database now.

use backstop_config::Config;
use backstop_dump::PgTarget;
use backstop_pipeline::read::select::{Selection, job_stores, select};
use backstop_pipeline::read::verify::{self, BackupCheck, VerifyRequest, verify_job_in};

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    database: Option<&str>,
    req: &VerifyRequest,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    // A cluster job's series, as its first (or chosen) store holds them.
    let series = super::series(config, job, database, req.storage.as_deref()).await?;
    if series.is_empty() {
        return Err(CliError::failed(format!(
            "job \"{}\" has no backups to verify yet",
            job.name
        )));
    }
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let checks = super::as_node(
        config,
        &catalog,
        verify_series(config, &catalog, &series, req, json),
    )
    .await;
    catalog.close().await;
    let checks = checks?;
    if json {
        let results: Vec<_> = checks
            .iter()
            .map(|(store, check)| serde_json::json!({ "store": store, "result": check }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    let failures = checks.iter().filter(|(_, c)| !c.ok).count();
    if failures > 0 {
        return Err(CliError::failed(format!(
            "{failures} backup(s) failed verification"
        )));
    }
    Ok(())
}

/// Each series verified, its checks printed as they end (unless `json`).
async fn verify_series(
    config: &Config,
    catalog: &backstop_catalog::Catalog,
    series: &[backstop_config::JobConfig],
    req: &VerifyRequest,
    json: bool,
) -> Result<Vec<(String, BackupCheck)>, CliError> {
    let mut checks = Vec::new();
    for member in series {
        let label = |store: &str| {
            if member.name.contains('/') {
                format!("{store} {}", member.name)
            } else {
                store.to_string()
            }
        };
        let mut print = |store: &str, check: &BackupCheck| {
            if !json {
                print_check(&label(store), check);
            }
        };
        for (store, check) in verify_job_in(catalog, config, member, req, &mut print).await? {
            checks.push((label(&store), check));
        }
    }
    Ok(checks)
}

fn print_check(store: &str, check: &BackupCheck) {
    let scratch = check
        .scratch_database
        .as_ref()
        .map(|d| format!(", scratch database {d} dropped"))
        .unwrap_or_default();
    if check.ok {
        let what = match check.level.as_str() {
            "restore" => "restored; inventory and row counts match the manifest".to_string(),
            _ => format!("{} artifact(s) match the manifest", check.artifacts.len()),
        };
        println!(
            "{store}: {} {} OK: {what}{scratch}",
            check.backup_id, check.level
        );
    } else {
        println!(
            "{store}: {} {} FAILED{scratch}",
            check.backup_id, check.level
        );
        for p in check.problems() {
            println!("  {p}");
        }
    }
}

/// Compares the backup's inventory and row counts with the live database.
pub async fn against_live(
    config: &Config,
    job: &str,
    which: &str,
    storage: Option<&str>,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    let store = job_stores(job, storage)?.swap_remove(0);
    let (_, selected) = select(config, job, &store, &Selection::parse(which), false).await?;
    let m = &selected[0];
    let target = PgTarget::from_config(&job.database).map_err(CliError::failed)?;
    let live = backstop_dump::live_inventory(&target, &m.dump.filters()).await?;
    let exact = m.row_counts == "exact";
    let differences = verify::compare_inventory(&m.inventory, &live, exact, ("backup", "live"));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "backup_id": m.backup_id,
                "backup_started_at": m.started_at,
                "rows_compared": exact,
                "differences": differences,
                "live": live,
            }))?
        );
    } else {
        println!(
            "backup {} (taken {}) against {} now:",
            m.backup_id,
            m.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            target.display()
        );
        if !exact {
            println!(
                "  (row counts not compared: the backup recorded them as {})",
                m.row_counts
            );
        }
        if differences.is_empty() {
            println!("  no differences in inventory or row counts");
        }
        for d in &differences {
            println!("  {d}");
        }
    }
    if !differences.is_empty() {
        return Err(CliError::failed(format!(
            "{} difference(s) between the backup and the live database",
            differences.len()
        )));
    }
    Ok(())
}
