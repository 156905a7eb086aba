//! `backstop backup --job J [--wait]`: one backup now, here or (with
//! `--wait`) through the running daemon; exit 0 only if it completed.

use backstop_catalog::RunKind;
use backstop_config::Config;
use backstop_daemon::{RunFacts, run_event};
use backstop_pipeline::backup::cluster::{ClusterReport, Ran, run_job_backup};
use backstop_pipeline::{BackupError, human_bytes};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    wait: bool,
    interrupt: &CancellationToken,
) -> CmdResult {
    if wait {
        // Following the daemon's run: a signal stops the following, not
        // the backup, which goes on in the daemon.
        let followed = tokio::select! {
            r = crate::client::backup_via_daemon(config, job) => r,
            () = interrupt.cancelled() => Some(Err(CliError::failed(format!(
                "stopped following the backup of job \"{job}\"; it goes on in the daemon (backstop status shows how it ends)"
            )))),
        };
        if let Some(r) = followed {
            return r;
        }
    }
    backup_here(config, job, interrupt).await
}

async fn backup_here(config: &Config, job: &str, interrupt: &CancellationToken) -> CmdResult {
    let job = find_job(config, job)?;
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let previous = catalog
        .last_outcome(&job.name, RunKind::Backup)
        .await
        .ok()
        .flatten();
    let started = Utc::now();
    // A heartbeat hears the start at once; the backup does not wait for it.
    let start_ping = backstop_notify::has_heartbeat(config, job).then(|| {
        let event = backstop_notify::Event::backup_started(&job.name, started);
        let (config, job) = (config.clone(), job.clone());
        tokio::spawn(async move { backstop_notify::send(&config, &job, event).await })
    });
    // Bars on a terminal, a log line every 10 s otherwise; the summary below.
    let progress = crate::progress::BackupProgress::watch(&job.name);
    let result = if catalog.is_shared() {
        backstop_daemon::claimed_backup(config, job, &catalog, interrupt).await
    } else {
        run_job_backup(config, job, &catalog, interrupt, None).await
    };
    progress.finish();
    catalog.close().await;
    // A one-shot backup from cron or a timer notifies like the daemon does;
    // a refusal because the daemon holds the job is not a failed backup.
    // The end must not reach a heartbeat before the start did.
    if let Some(p) = start_ping {
        let _ = p.await;
    }
    if !job.notify.is_empty() && !matches!(result, Err(BackupError::Locked(_))) {
        let (outcome, facts) = RunFacts::of_backup(job, started, &result);
        if let Some(event) = run_event(&job.name, RunKind::Backup, outcome, previous, facts) {
            backstop_notify::send(config, job, event).await;
        }
    }
    let ran = match result {
        Ok(Ran::Cluster(c)) if !c.failures().is_empty() => {
            print_cluster(&c);
            return Err(CliError::failed(c.failure_line())
                .context(format!("backup of job \"{}\" failed", job.name)));
        }
        Ok(r) => r,
        Err(e) => {
            return Err(CliError::from(e).context(format!("backup of job \"{}\" failed", job.name)));
        }
    };
    let report = match ran {
        Ran::One(r) => *r,
        Ran::Cluster(c) => {
            print_cluster(&c);
            return Ok(());
        }
    };
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

/// One line per database of a cluster run, then what was left out.
fn print_cluster(c: &ClusterReport) {
    for m in &c.members {
        match &m.result {
            Ok(r) => println!(
                "ok      {:<40} {} tables, {} rows, dump {}, stored {}",
                m.label(),
                r.manifest.inventory.tables,
                r.manifest
                    .total_rows()
                    .map_or_else(|| "-".to_string(), |r| r.to_string()),
                human_bytes(r.manifest.dump_bytes()),
                human_bytes(r.manifest.stored_bytes()),
            ),
            Err(e) => println!(
                "FAILED  {:<40} {}",
                m.label(),
                backstop_pipeline::one_line(e)
            ),
        }
    }
    for d in &c.new {
        println!("new     database \"{d}\": backed up for the first time");
    }
    for d in &c.not_connectable {
        println!(
            "skipped database \"{d}\": the job's role may not connect to it (GRANT CONNECT, or exclude it)"
        );
    }
    for d in &c.missing {
        println!(
            "missing database \"{d}\": no longer on the server; its backups are kept until retention ages them out"
        );
    }
    for (d, p) in &c.excluded {
        println!("excluded database \"{d}\" (by {p:?})");
    }
    let (dump, stored) = c.sizes();
    let failed = c.failures().len();
    println!(
        "cluster backup {}: {} of {} complete, dump {}, stored {}",
        c.backup_id,
        c.members.len() - failed,
        c.members.len(),
        human_bytes(dump),
        human_bytes(stored)
    );
}
