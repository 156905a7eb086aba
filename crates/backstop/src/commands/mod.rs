//! One module per command: arguments → operation → print. The operations
//! themselves (backup, verify, prune, restore, download) live in the
//! pipeline, so the daemon runs exactly the same code.

mod backup;
mod catalog;
mod check_config;
pub mod docs;
mod download;
mod drill;
pub mod ip_allow;
pub mod keygen;
mod list;
mod migrate;
mod prune;
mod restore;
mod run;
mod run_due;
mod sign;
mod status;
mod test_notify;
mod verify;

use std::path::Path;

use backstop_config::{Config, JobConfig};
use backstop_dump::PgTarget;

use crate::cli::{Command, OneBackup};
use crate::error::{CliError, CmdResult, not_defined};

/// What a one-shot command says when its lease on a shared catalog was
/// lost mid-work.
const LEASE_LOST: &str = "this process lost its lease on the shared catalog (it was paused, or cut off from the catalog, longer than daemon.lease), so it stopped; another node may take its run over. Run the command again";

/// Runs `work` with this process as a fleet node when `catalog` is shared:
/// the runs it records carry the node's id (so they end `interrupted` if it
/// dies, instead of staying `running` for good), and it stops when its
/// lease cannot be kept. A catalog of one host: just `work`.
async fn as_node<T>(
    config: &Config,
    catalog: &backstop_catalog::Catalog,
    work: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    let Some(node) = backstop_daemon::CliNode::join(config, catalog).await? else {
        return work.await;
    };
    let result = tokio::select! {
        r = work => r,
        () = node.cancel.cancelled() => Err(CliError::failed(LEASE_LOST)),
    };
    node.leave().await;
    result
}

/// Runs `command` on `config` (loaded from `config_path`).
///
/// Length: the dispatch of every subcommand: one arm each.
pub async fn run(
    command: Command,
    config_path: &Path,
    config: &Config,
    interrupt: &tokio_util::sync::CancellationToken,
) -> CmdResult {
    // Every command but check-config (which says so in its summary) reads
    // or writes a store, or runs what does.
    if !matches!(
        command,
        Command::CheckConfig { .. }
            | Command::Migrate { .. }
            | Command::TestNotify { .. }
            | Command::IpAllow { .. }
    ) {
        backstop_pipeline::trust::warn_if_unsigned(config);
    }
    match command {
        Command::CheckConfig { probe } => check_config::run(config, probe).await,
        Command::Backup { job, wait } => backup::run(config, &job, wait, interrupt).await,
        Command::Run => run::run(config_path, config.clone()).await,
        Command::RunDue {
            once: _,
            job,
            max_runtime,
        } => run_due::run(config_path, config.clone(), job, max_runtime, interrupt).await,
        Command::Migrate { url } => migrate::run(config, url.as_deref()).await,
        Command::TestNotify { notifier, job } => {
            test_notify::run(config, &notifier, job.as_deref()).await
        }
        Command::Status { json } => status::run(config, json).await,
        Command::Prune {
            job,
            storage,
            dry_run,
            json,
        } => prune::run(config, &job, storage.as_deref(), dry_run, json).await,
        Command::Verify {
            job,
            backup,
            level,
            storage,
            identity,
            target,
            target_password_file,
            against_live,
            json,
            database,
        } => {
            if against_live {
                verify::against_live(config, &job, &backup, storage.as_deref(), json).await
            } else {
                let server = target
                    .filter(|_| level == crate::cli::VerifyLevel::Restore)
                    .map(|t| target_from_cli(&t, target_password_file.as_deref()))
                    .transpose()?;
                let req = backstop_pipeline::read::verify::VerifyRequest {
                    which: backstop_pipeline::read::select::Selection::parse(&backup),
                    level: level.into(),
                    storage,
                    identity,
                    server,
                    watch: crate::progress::Bars::unless(json),
                };
                verify::run(config, &job, database.as_deref(), &req, json).await
            }
        }
        Command::Restore(args) => restore::run(config, args).await,
        Command::Catalog(crate::cli::CatalogCommand::Rebuild { job, json }) => {
            catalog::rebuild(config, job.as_deref(), json).await
        }
        Command::Drill {
            job,
            target_server,
            target_password_file,
            identity,
            storage,
            parallel,
            json,
        } => {
            let server = target_server
                .map(|t| target_from_cli(&t, target_password_file.as_deref()))
                .transpose()?;
            let req = backstop_pipeline::read::recovery::DrillRequest {
                storage,
                server,
                identity,
                parallel,
            };
            drill::run(config, &job, &req, json).await
        }
        Command::Download(args) => download::run(config, args).await,
        Command::IpAllow {
            allow,
            aws_ip_ranges,
            output,
        } => ip_allow::run(config, allow, aws_ip_ranges, output).await,
        // Handled before a configuration is loaded (see main.rs).
        Command::Keygen { out } => keygen::run(&out),
        Command::Completions { .. } | Command::Manpages { .. } => Ok(()),
        Command::Sign {
            job,
            backup,
            force,
            storage,
            json,
        } => sign::run(config, &job, &backup, force, storage.as_deref(), json).await,
        Command::List {
            job,
            database,
            storage,
            json,
        } => list::run(config, &job, database.as_deref(), storage.as_deref(), json).await,
    }
}

fn find_job<'a>(config: &'a Config, name: &str) -> Result<&'a JobConfig, CliError> {
    config.job(name).ok_or_else(|| {
        not_defined(
            config,
            "job",
            name,
            config.jobs.iter().map(|j| j.name.as_str()),
        )
    })
}

/// The series of `job` a command reads: a single-database job itself; of
/// a cluster job the one `--database` names, or else every series its
/// store (`storage`, default its first) holds: its globals and databases.
async fn series(
    config: &Config,
    job: &JobConfig,
    database: Option<&str>,
    storage: Option<&str>,
) -> Result<Vec<JobConfig>, CliError> {
    match (database, &job.cluster) {
        (Some(d), Some(_)) => Ok(vec![job.member(d)]),
        (Some(_), None) => Err(CliError::usage(format!(
            "job \"{}\" backs up one database; --database only applies to a cluster job (database = {{ url = …, all = true }})",
            job.name
        ))),
        (None, None) => Ok(vec![job.clone()]),
        (None, Some(_)) => {
            let store = backstop_pipeline::read::select::job_stores(job, storage)?.swap_remove(0);
            let backend = backstop_pipeline::store::Store::open(config, &store)
                .await
                .map_err(CliError::failed)?;
            backend
                .series(job)
                .await
                .map_err(|e| CliError::from(e).context(format!("cannot list store \"{store}\"")))
        }
    }
}

/// A heading for one series of a cluster job.
fn series_title(member: &JobConfig) -> String {
    match &member.member {
        Some(backstop_config::Member::Database(d)) => {
            format!("== database \"{d}\" ({}) ==", member.name)
        }
        Some(backstop_config::Member::Globals { .. }) => {
            format!("== roles and tablespaces ({}) ==", member.name)
        }
        None => format!("== {} ==", member.name),
    }
}

/// The job, the one store a read-back command reads (default: the job's
/// first), and which backup.
/// `globals`: a cluster job without `--database` reads its globals series.
fn one_backup(
    config: &Config,
    from: &OneBackup,
    globals: bool,
) -> Result<(JobConfig, String), CliError> {
    let job = find_job(config, &from.job)?;
    let store =
        backstop_pipeline::read::select::job_stores(job, from.storage.as_deref())?.swap_remove(0);
    let job = match (&from.database, &job.cluster) {
        (Some(d), Some(_)) => job.member(d),
        (Some(_), None) => {
            return Err(CliError::usage(format!(
                "job \"{}\" backs up one database; --database only applies to a cluster job",
                job.name
            )));
        }
        (None, Some(_)) if globals => job.globals_member(&[]),
        (None, Some(_)) => {
            return Err(CliError::usage(format!(
                "job \"{}\" is a cluster job: name the database with --database NAME (see `backstop list --job {}`), or restore the whole server with --all-databases --target-server URL",
                job.name, job.name
            )));
        }
        (None, None) => job.clone(),
    };
    Ok((job, store))
}

/// A database named on the command line. A password in the URL is refused:
/// arguments are visible to every user. It comes from `password_file`, else
/// PGPASSWORD; without either, the client tools may still use ~/.pgpass.
fn target_from_cli(url: &str, password_file: Option<&Path>) -> Result<PgTarget, CliError> {
    if url::Url::parse(url).is_ok_and(|u| u.password().is_some()) {
        return Err(CliError::usage(
            "--target contains a password, which every user can read in `ps`; remove it and use --target-password-file, PGPASSWORD or ~/.pgpass",
        ));
    }
    let password = match password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| {
                    CliError::failed(format!(
                        "cannot read --target-password-file {}: {e}",
                        p.display()
                    ))
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()),
    };
    PgTarget::new(url, password.as_deref()).map_err(|e| CliError::usage(format!("--target: {e}")))
}
