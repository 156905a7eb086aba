//! `backstop restore`: a backup streamed from its store through age and
//! zstd into pg_restore (psql for plain dumps) on the target database.

use backstop_config::Config;
use backstop_pipeline::human_bytes;
use backstop_pipeline::restore::{self, RestoreOptions};
use backstop_pipeline::select::{Selection, identities, select};

use super::{one_backup, target_from_cli};
use crate::cli::RestoreArgs;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, args: RestoreArgs) -> CmdResult {
    let (job, store) = one_backup(config, &args.from)?;
    let target = target_from_cli(&args.target, args.target_password_file.as_deref())?;
    let which = Selection::parse(&args.from.backup);
    let (backend, selected) = select(config, job, &store, &which, false).await?;
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
        progress: true,
        pg_bin_dir: job.pg_bin_dir.clone(),
        pg_dump_path: job.pg_dump_path.clone(),
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
