//! `backstop backup --job J [--wait]`: one backup now, here or (with
//! `--wait`) through the running daemon; exit 0 only if it completed.

use backstop_catalog::{Outcome, RunKind};
use backstop_config::Config;
use backstop_pipeline::{human_bytes, run_backup};
use chrono::Utc;

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, job: &str, wait: bool) -> CmdResult {
    if wait && let Some(r) = crate::client::backup_via_daemon(config, job).await {
        return r;
    }
    backup_here(config, job).await
}

async fn backup_here(config: &Config, job: &str) -> CmdResult {
    let job = find_job(config, job)?;
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let previous = catalog
        .last_outcome(&job.name, RunKind::Backup)
        .await
        .ok()
        .flatten();
    let started = Utc::now();
    let result = if catalog.is_shared() {
        backstop_daemon::claimed_backup(config, job, &catalog).await
    } else {
        run_backup(config, job, &catalog).await
    };
    catalog.close().await;
    // A one-shot backup from cron or a timer notifies like the daemon does;
    // a refusal because the daemon holds the job is not a failed backup.
    if !job.notify.is_empty() && !matches!(result, Err(backstop_pipeline::BackupError::Locked(_))) {
        let (outcome, error) = match &result {
            Ok(r) if r.manifest.suspect.is_some() => (Outcome::Suspect, r.manifest.suspect.clone()),
            Ok(_) => (Outcome::Success, None),
            Err(e) => (Outcome::Failed, Some(backstop_pipeline::one_line(e))),
        };
        if let Some(kind) = backstop_notify::classify(outcome, previous) {
            let mut event = backstop_notify::Event::new(
                kind,
                &job.name,
                RunKind::Backup,
                outcome,
                started,
                Utc::now(),
            );
            event.error = error;
            event.previous_outcome = previous;
            event.storage = job.storage.clone();
            if let Ok(r) = &result {
                event.backup_id = Some(r.manifest.backup_id.clone());
                event.dump_bytes = Some(r.manifest.dump_bytes());
                event.stored_bytes = Some(r.manifest.stored_bytes());
                event.storage = r.stores.clone();
            }
            backstop_notify::send(config, job, event).await;
        }
    }
    let report = result
        .map_err(|e| CliError::from(e).context(format!("backup of job \"{}\" failed", job.name)))?;
    let m = &report.manifest;
    println!(
        "backup {} of job \"{}\" complete in {:.1}s: {} tables, {} rows ({}), dump {}, stored {} in {}",
        m.backup_id,
        m.job,
        m.duration_seconds,
        m.inventory.tables,
        m.total_rows()
            .map_or_else(|| "-".to_string(), |r| r.to_string()),
        m.row_counts,
        human_bytes(m.dump_bytes()),
        human_bytes(m.stored_bytes()),
        report.stores.join(", ")
    );
    if let Some(why) = &m.suspect {
        println!(
            "WARNING: backup {} is SUSPECT: {why}. It is kept and marked; check the database (backstop verify --job {} --against-live).",
            m.backup_id, m.job
        );
    }
    Ok(())
}
