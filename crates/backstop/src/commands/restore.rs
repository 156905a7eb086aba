//! `backstop restore`: a backup streamed from its store through age and
//! zstd into pg_restore (psql for plain dumps) on the target database.

use backstop_config::Config;
use backstop_pipeline::human_bytes;
use backstop_pipeline::read::recovery::{
    ServerRestoreOptions, restore_server as restore_server_op,
};
use backstop_pipeline::read::restore::{self, RestoreOptions};
use backstop_pipeline::read::select::{Selection, identities, job_stores, select};

use super::{one_backup, target_from_cli};
use crate::cli::RestoreArgs;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, args: RestoreArgs) -> CmdResult {
    if args.all_databases {
        return restore_server(config, args).await;
    }
    let (job, store) = one_backup(config, &args.from, false)?;
    let target = target_from_cli(
        args.target.as_deref().expect("clap requires --target"),
        args.target_password_file.as_deref(),
    )?;
    let which = Selection::parse(&args.from.backup);
    let (backend, selected) = select(config, &job, &store, &which, false).await?;
    let m = &selected[0];
    let ids = identities(&[args.identity.as_deref(), job.identity_file.as_deref()])?;
    let options = RestoreOptions {
        tables: args.tables,
        schema_only: args.schema_only,
        data_only: args.data_only,
        clean: args.clean,
        create_db: args.create_db,
        no_owner: args.no_owner,
        no_privileges: args.no_privileges,
        disable_triggers: args.disable_triggers,
        globals: args.globals,
        jobs: args.jobs,
        temp_dir: args.temp_dir,
        watch: crate::progress::Bars::unless(false),
        pg_bin_dir: job.pg_bin_dir.clone(),
        pg_dump_path: job.pg_dump_path.clone(),
        owner: None,
    };
    eprintln!(
        "restoring backup {} of job \"{}\" ({} stored, {} tables) from store \"{store}\" into {}",
        m.backup_id,
        job.name,
        human_bytes(m.stored_bytes()),
        m.inventory.tables,
        target.display()
    );
    let report = restore::restore(backend, m, ids, &target, &options)
        .await
        .map_err(|e| {
            CliError::from(e).context(format!(
                "restore of backup {} into {} failed",
                m.backup_id,
                target.display()
            ))
        })?;
    println!(
        "restored backup {} into database \"{}\" in {:.1}s{}{}; {}",
        report.backup_id,
        report.database,
        report.seconds,
        if report.created_database {
            " (created)"
        } else {
            ""
        },
        if report.globals_applied {
            ", roles applied"
        } else {
            ""
        },
        if report.whole_artifact_checked {
            "every byte matched the manifest's sha256".to_string()
        } else {
            format!(
                "pg_restore needed only the first {} of the archive, so the whole artifact was not checksummed (run `backstop verify` for that)",
                human_bytes(report.stored_bytes_read)
            )
        }
    );
    Ok(())
}

/// `restore --all-databases`: a cluster job's whole server.
///
/// Length: parses a server restore's options and prints each database's line
/// and the summary.
async fn restore_server(config: &Config, args: RestoreArgs) -> CmdResult {
    let job = super::find_job(config, &args.from.job)?;
    let store = job_stores(job, args.from.storage.as_deref())?.swap_remove(0);
    let server = target_from_cli(
        args.target_server
            .as_deref()
            .expect("clap requires --target-server"),
        args.target_password_file.as_deref(),
    )?;
    let at = match (args.at, args.from.backup.as_str()) {
        (Some(t), _) => Selection::AtOrBefore(t),
        (None, "latest") => Selection::Latest,
        (None, id) => Selection::Id(id.to_string()),
    };
    let ids = identities(&[args.identity.as_deref(), job.identity_file.as_deref()])?;
    let o = ServerRestoreOptions {
        at,
        parallel: args.parallel,
        create_db: args.create_db,
        allow_older: args.allow_older,
        pg_bin_dir: job.pg_bin_dir.clone(),
        pg_dump_path: job.pg_dump_path.clone(),
    };
    eprintln!(
        "restoring job \"{}\" from store \"{store}\" onto {} ({} database(s) at once)",
        job.name,
        server.display(),
        o.parallel
    );
    let report = restore_server_op(config, job, &store, &server, ids, &o).await?;
    println!(
        "run {} (started {}) onto {}:",
        report.backup_id,
        report.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        server.display()
    );
    match &report.globals_problem {
        None => println!("  ok      roles and tablespaces"),
        Some(p) => println!("  FAILED  roles and tablespaces: {p} (no database was restored)"),
    }
    println!(
        "  {:<7} {:<32} {:<27} {:>7} {:>21} {:>9}",
        "", "DATABASE", "BACKUP", "TABLES", "ROWS RESTORED/MANIFEST", "SECONDS"
    );
    for d in &report.databases {
        let rows = |r: Option<u64>| r.map_or_else(|| "-".to_string(), |r| r.to_string());
        println!(
            "  {:<7} {:<32} {:<27} {:>7} {:>21} {:>9.1}",
            if d.ok { "ok" } else { "FAILED" },
            d.database,
            d.backup_id.as_deref().unwrap_or("-"),
            d.restored_tables
                .map_or_else(|| "-".to_string(), |t| t.to_string()),
            format!("{}/{}", rows(d.restored_rows), rows(d.manifest_rows)),
            d.seconds
        );
        if let Some(n) = &d.note {
            println!("          note: {n}");
        }
        for p in &d.problems {
            println!("          {p}");
        }
    }
    for a in &report.absent {
        match &a.latest_before {
            Some(id) => println!(
                "  absent  {}: it has backups in the store but none in this run; its latest before the run is {id} (backstop restore --job {} --database '{}' --backup {id} --target …)",
                a.database, job.name, a.database
            ),
            None => println!(
                "  absent  {}: it has backups in the store but none in this run, and none before it (only later runs hold it)",
                a.database
            ),
        }
    }
    let failed =
        report.databases.iter().filter(|d| !d.ok).count() + usize::from(!report.globals_ok);
    println!(
        "{} of {} database(s) restored in {:.1}s{}",
        report.databases.iter().filter(|d| d.ok).count(),
        report.databases.len(),
        report.seconds,
        if failed > 0 { "; FAILURES above" } else { "" }
    );
    if !report.absent.is_empty() {
        println!(
            "{} database(s) with backups were not in this run and were not restored (listed as absent above)",
            report.absent.len()
        );
    }
    if report.ok() {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "server restore of job \"{}\" failed for {failed} part(s)",
            job.name
        )))
    }
}
