//! Recovery of a whole server, and the drill that measures it.
//!
//! [`restore_server`] restores one run of a cluster job onto a server:
//! the run's roles and tablespaces first, then each database the run
//! backed up, created with its owner, several at once, each checked
//! against its manifest afterwards (inventory and row counts).
//! [`drill`] restores the latest backups into scratch databases, compares
//! them, drops them and records how long it took: the measured RTO.

use std::sync::Arc;
use std::time::Instant;

use backstop_catalog::{Catalog, Outcome, RunKind, RunResult};
use backstop_config::{Config, JobConfig, VerifyLevel};
use backstop_crypto::Identities;
use backstop_dump::PgTarget;
use futures::StreamExt;
use serde::Serialize;
use tracing::{info, warn};

use crate::manifest::Manifest;
use crate::read::restore::{self, RestoreOptions};
use crate::read::select::{SelectError, Selection, select};
use crate::read::verify::{
    BackupCheck, VerifyError, VerifyRequest, compare_inventory, verify_job_in,
};
use crate::store::Store;
use crate::trust::Trusted;

/// How a server restore runs.
#[derive(Debug, Clone)]
pub struct ServerRestoreOptions {
    /// The run: `latest`, or the latest at or before a time.
    pub at: Selection,
    /// Databases restored at once.
    pub parallel: usize,
    /// Create each database (with its owner) when it does not exist.
    pub create_db: bool,
    /// Restore a database whose backup in the run failed (or cannot be
    /// read) from its latest earlier backup, said so; without it that
    /// database fails, named, and nothing older is restored in its place.
    pub allow_older: bool,
    pub pg_bin_dir: Option<std::path::PathBuf>,
    pub pg_dump_path: Option<std::path::PathBuf>,
}

/// One database of a server restore.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseRestore {
    pub database: String,
    /// The backup restored (None when there was none to restore).
    pub backup_id: Option<String>,
    pub ok: bool,
    pub seconds: f64,
    /// Tables and rows the manifest records.
    pub manifest_tables: u64,
    pub manifest_rows: Option<u64>,
    /// Tables and rows found in the restored database.
    pub restored_tables: Option<u64>,
    pub restored_rows: Option<u64>,
    /// Why it failed, or how the restored database differs from its manifest.
    pub problems: Vec<String>,
    /// Said when the run's own backup of it had failed and an earlier one was used.
    pub note: Option<String>,
}

/// A database with backups in the store that the restored run does not
/// hold (dropped before the run, created after it, or excluded then):
/// not restored, and said so.
#[derive(Debug, Clone, Serialize)]
pub struct AbsentDatabase {
    pub database: String,
    /// Its latest backup at or before the run, if any.
    pub latest_before: Option<String>,
}

/// What a server restore did.
#[derive(Debug, Clone, Serialize)]
pub struct ServerRestoreReport {
    /// The run restored (its globals backup's id).
    pub backup_id: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub globals_ok: bool,
    pub globals_problem: Option<String>,
    pub databases: Vec<DatabaseRestore>,
    /// Databases with backups in the store that are not in this run.
    pub absent: Vec<AbsentDatabase>,
    pub seconds: f64,
}

impl ServerRestoreReport {
    pub fn ok(&self) -> bool {
        self.globals_ok && self.databases.iter().all(|d| d.ok)
    }
}

/// Restores cluster job `job`'s run chosen by `o.at` from `store` onto
/// `server` (its maintenance database's URL; each database is restored
/// under its own name on the same server).
///
/// # Errors
/// [`SelectError`] when nothing can be restored: not a cluster job, no
/// globals backup at that time, a store that cannot be listed. A
/// database's failure is in the report.
pub async fn restore_server(
    config: &Config,
    job: &JobConfig,
    store: &str,
    server: &PgTarget,
    identities: Option<Arc<Identities>>,
    o: &ServerRestoreOptions,
) -> Result<ServerRestoreReport, SelectError> {
    if job.cluster.is_none() {
        return Err(SelectError::Usage(format!(
            "job \"{}\" backs up one database; --all-databases restores a cluster job (database = {{ url = …, all = true }}); restore this job with --target",
            job.name
        )));
    }
    let clock = Instant::now();
    let globals_job = job.globals_member(&[]);
    let (backend, chosen) = select(config, &globals_job, store, &o.at, false).await?;
    let run = chosen.into_iter().next().expect("select returns one");
    let databases = run.databases.clone().unwrap_or_default();
    info!(job = %job.name, backup_id = %run.backup_id, databases = databases.len(), "Restoring the server: roles and tablespaces first.");
    // Each database serially in one transaction: a failure leaves it
    // empty rather than half restored; --parallel restores several at once.
    let ropts = RestoreOptions {
        jobs: None,
        pg_bin_dir: o.pg_bin_dir.clone(),
        pg_dump_path: o.pg_dump_path.clone(),
        ..Default::default()
    };
    let globals = match run.artifact("globals") {
        Some(a) => match find_psql(&ropts).await {
            Ok(psql) => restore::apply_globals(
                backend.clone(),
                a,
                identities.clone(),
                &server.with_database("postgres"),
                &psql,
            )
            .await
            .map_err(|e| crate::one_line(&e)),
            Err(e) => Err(e),
        },
        None => Err(format!(
            "backup {} of {} has no globals artifact",
            run.backup_id,
            run.series()
        )),
    };
    let absent = absent_databases(config, job, store, backend.clone(), &run).await;
    for a in &absent {
        warn!(job = %job.name, database = %a.database, backup_id = %run.backup_id, latest_before = a.latest_before.as_deref().unwrap_or("none"), "Database has backups in the store but none in the run being restored; it is not restored.");
    }
    let mut report = ServerRestoreReport {
        backup_id: run.backup_id.clone(),
        started_at: run.started_at,
        globals_ok: globals.is_ok(),
        globals_problem: globals.err(),
        databases: Vec::new(),
        absent,
        seconds: 0.0,
    };
    if !report.globals_ok {
        // Databases owned by roles that do not exist would fail one by one.
        report.seconds = clock.elapsed().as_secs_f64();
        return Ok(report);
    }
    let parallel = o.parallel.max(1);
    let mut restored: Vec<DatabaseRestore> =
        futures::stream::iter(databases.into_iter().map(|name| {
            let backend = backend.clone();
            let identities = identities.clone();
            let run = &run;
            let ropts = &ropts;
            async move {
                restore_one(
                    config, job, store, backend, identities, server, run, &name, o, ropts,
                )
                .await
            }
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;
    restored.sort_by(|a, b| a.database.cmp(&b.database));
    report.databases = restored;
    report.seconds = clock.elapsed().as_secs_f64();
    Ok(report)
}

/// The databases with backups in `storage` that `run` (a globals backup)
/// does not list, each with its latest backup at or before the run.
async fn absent_databases(
    config: &Config,
    job: &JobConfig,
    store: &str,
    storage: Arc<dyn backstop_storage::Storage>,
    run: &Manifest,
) -> Vec<AbsentDatabase> {
    let opened = Store::new(store, storage, crate::Trust::from_config(config));
    let segments = match opened.members(&job.name).await {
        Ok(s) => s,
        Err(e) => {
            warn!(job = %job.name, store, error = %e, "Cannot list the store for databases absent from the run.");
            return Vec::new();
        }
    };
    let in_run = run.databases.clone().unwrap_or_default();
    let mut absent = Vec::new();
    for name in segments
        .iter()
        .filter_map(|s| backstop_vocab::series::database_of(s))
        .filter(|d| !in_run.contains(d))
    {
        let latest_before = select(
            config,
            &job.member(&name),
            store,
            &Selection::AtOrBefore(run.started_at),
            false,
        )
        .await
        .ok()
        .and_then(|(_, found)| found.into_iter().next())
        .map(|m| m.backup_id.clone());
        absent.push(AbsentDatabase {
            database: name,
            latest_before,
        });
    }
    absent.sort_by(|a, b| a.database.cmp(&b.database));
    absent
}

async fn find_psql(o: &RestoreOptions) -> Result<backstop_dump::PgTool, String> {
    backstop_dump::find_tool("psql", o.pg_dump_path.as_deref(), o.pg_bin_dir.as_deref())
        .await
        .map_err(|e| e.to_string())
}

/// The backup of `member` to restore for `run`: the run's own, else (it
/// failed in that run) its latest before the run, only with `allow_older`
/// and said so in the note.
///
/// # Errors
/// Why nothing of the database can be restored. The run's own backup
/// lying there untrusted is one: an older backup would hide it.
async fn backup_of_run(
    config: &Config,
    member: &JobConfig,
    store: &str,
    run: &Manifest,
    allow_older: bool,
) -> Result<(Trusted<Manifest>, Option<String>), String> {
    let why = match select(
        config,
        member,
        store,
        &Selection::Id(run.backup_id.clone()),
        false,
    )
    .await
    {
        Ok((_, mut found)) => return Ok((found.remove(0), None)),
        Err(e @ SelectError::Untrusted { .. }) => return Err(crate::one_line(&e)),
        Err(why) => crate::one_line(&why),
    };
    let older = select(
        config,
        member,
        store,
        &Selection::AtOrBefore(run.started_at),
        false,
    )
    .await;
    match older {
        Ok((_, mut found)) if allow_older => {
            let m = found.remove(0);
            let note = format!(
                "its backup in run {} cannot be used ({why}); restored its previous backup {} (--allow-older)",
                run.backup_id, m.backup_id
            );
            Ok((m, Some(note)))
        }
        Ok((_, found)) => Err(format!(
            "its backup in run {} cannot be used ({why}); nothing of it was restored. Its latest earlier backup is {}: pass --allow-older to restore that instead",
            run.backup_id, found[0].backup_id
        )),
        Err(e) => Err(format!(
            "its backup in run {} cannot be used ({why}), and no earlier one either: {}",
            run.backup_id,
            crate::one_line(&e)
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn restore_one(
    config: &Config,
    job: &JobConfig,
    store: &str,
    backend: Arc<dyn backstop_storage::Storage>,
    identities: Option<Arc<Identities>>,
    server: &PgTarget,
    run: &Manifest,
    name: &str,
    o: &ServerRestoreOptions,
    ropts: &RestoreOptions,
) -> DatabaseRestore {
    let clock = Instant::now();
    let member = job.member(name);
    let mut out = DatabaseRestore {
        database: name.to_string(),
        backup_id: None,
        ok: false,
        seconds: 0.0,
        manifest_tables: 0,
        manifest_rows: None,
        restored_tables: None,
        restored_rows: None,
        problems: Vec::new(),
        note: None,
    };
    let m = match backup_of_run(config, &member, store, run, o.allow_older).await {
        Ok((m, note)) => {
            out.note = note;
            m
        }
        Err(problem) => {
            out.problems.push(problem);
            out.seconds = clock.elapsed().as_secs_f64();
            return out;
        }
    };
    out.backup_id = Some(m.backup_id.clone());
    out.manifest_tables = m.inventory.tables;
    out.manifest_rows = m.total_rows();
    let target = server.with_database(name);
    let options = RestoreOptions {
        create_db: o.create_db,
        owner: m.database_owner.clone(),
        ..ropts.clone()
    };
    info!(job = %job.name, database = %name, backup_id = %m.backup_id, "Restoring database.");
    match restore::restore(backend, &m, identities, &target, &options).await {
        Ok(_) => match backstop_dump::live_inventory(&target, &m.dump.filters()).await {
            Ok(actual) => {
                out.restored_tables = Some(actual.tables);
                out.restored_rows = actual.per_table.iter().map(|t| t.rows).sum();
                out.problems = compare_inventory(
                    &m.inventory,
                    &actual,
                    m.row_counts == "exact",
                    ("manifest", "restored"),
                );
                out.ok = out.problems.is_empty();
            }
            Err(e) => out
                .problems
                .push(format!("reading the restored database failed: {e}")),
        },
        Err(e) => out.problems.push(crate::one_line(&e)),
    }
    out.seconds = clock.elapsed().as_secs_f64();
    if !out.ok {
        warn!(job = %job.name, database = %name, problems = %out.problems.join("; "), "Database restore FAILED.");
    }
    out
}

/// What a drill asks for.
#[derive(Debug, Clone)]
pub struct DrillRequest {
    /// The store restored from (default: the job's first).
    pub storage: Option<String>,
    /// The server scratch databases are created on (default: verify.target).
    pub server: Option<PgTarget>,
    pub identity: Option<std::path::PathBuf>,
    /// Databases restored at once (cluster jobs; default: the job's parallel,
    /// else daemon.max_concurrent_jobs).
    pub parallel: Option<usize>,
}

/// What a drill measured.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub job: String,
    pub store: String,
    /// Each series restored: its name and the check (scratch database,
    /// differences).
    pub checks: Vec<(String, BackupCheck)>,
    /// Wall time of the whole drill: every database restored, compared
    /// and dropped. The measured restore time (RTO) of the job.
    pub seconds: f64,
    pub ok: bool,
    /// Every problem, one line each (a database's differences, or why it
    /// could not be restored).
    pub problems: Vec<String>,
    /// The job's objective, when it has one.
    pub rto_seconds: Option<f64>,
}

/// What a drill restores: the latest backup of a single-database job, or
/// each database of a cluster job's latest run.
///
/// # Errors
/// As [`select`] of the run's globals.
async fn drilled_series(
    config: &Config,
    job: &JobConfig,
    store: &str,
) -> Result<Vec<(JobConfig, Selection)>, VerifyError> {
    if job.cluster.is_none() {
        return Ok(vec![(job.clone(), Selection::Latest)]);
    }
    let globals = job.globals_member(&[]);
    let (_, latest) = select(config, &globals, store, &Selection::Latest, false).await?;
    let run = &latest[0];
    Ok(run
        .databases
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|d| (job.member(d), Selection::Id(run.backup_id.clone())))
        .collect())
}

/// Records the drill as a verify run of level `drill` on `store`, failed
/// with `error` when there is one.
///
/// # Errors
/// The catalog's.
async fn record_drill(
    catalog: &Catalog,
    job: &str,
    store: &str,
    (started_at, finished_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
    error: Option<&str>,
) -> Result<(), backstop_catalog::CatalogError> {
    let run = catalog
        .start_run(job, RunKind::Verify, None, started_at)
        .await?;
    catalog.set_verify_scope(run, DRILL_LEVEL, store).await?;
    let outcome = if error.is_none() {
        Outcome::Success
    } else {
        Outcome::Failed
    };
    catalog
        .finish_run(
            run,
            outcome,
            finished_at,
            &RunResult {
                error,
                ..Default::default()
            },
        )
        .await
}

/// Restores the latest backup of `job` (of a cluster job: of each of its
/// databases in its latest run) into scratch databases, compares each
/// with its manifest, drops them, and records the drill as a `verify`
/// run of level `drill` whose duration is the measured restore time.
/// Each database's check is recorded as a `restore` verification too.
///
/// # Errors
/// What keeps the drill from running (no backup, no server, no identity).
pub async fn drill(
    catalog: &Catalog,
    config: &Config,
    job: &JobConfig,
    req: &DrillRequest,
) -> Result<DrillReport, VerifyError> {
    let store = crate::read::select::job_stores(job, req.storage.as_deref())?.swap_remove(0);
    let started_at = chrono::Utc::now();
    let clock = Instant::now();
    let series = drilled_series(config, job, &store).await?;
    let parallel = req
        .parallel
        .or(job.cluster.as_ref().and_then(|c| c.parallel))
        .unwrap_or(config.daemon.max_concurrent_jobs)
        .max(1);
    type SeriesChecks = Result<Vec<(String, BackupCheck)>, (String, VerifyError)>;
    let results: Vec<SeriesChecks> =
        futures::stream::iter(series.into_iter().map(|(member, which)| {
            let vreq = VerifyRequest {
                which,
                level: VerifyLevel::Restore,
                storage: Some(store.clone()),
                identity: req.identity.clone(),
                server: req.server.clone(),
                watch: Default::default(),
            };
            async move {
                verify_job_in(catalog, config, &member, &vreq, &mut |_, _| {})
                    .await
                    .map(|checks| {
                        checks
                            .into_iter()
                            .map(|(_, c)| (member.name.clone(), c))
                            .collect()
                    })
                    .map_err(|e| (member.name.clone(), e))
            }
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut checks = Vec::new();
    let mut problems = Vec::new();
    for r in results {
        match r {
            Ok(c) => checks.extend(c),
            // A usage problem is the same for every database: say it once.
            Err((_, e))
                if e.is_usage()
                    || (job.cluster.is_none()
                        && matches!(e, VerifyError::Select(SelectError::NoBackup { .. }))) =>
            {
                return Err(e);
            }
            Err((series, e)) => problems.push(format!("{series}: {}", crate::one_line(&e))),
        }
    }
    checks.sort_by(|a, b| a.0.cmp(&b.0));
    for (series, c) in &checks {
        if !c.ok {
            problems.push(format!("{series}: {}", c.problems().join("; ")));
        }
    }
    let seconds = clock.elapsed().as_secs_f64();
    let ok = problems.is_empty() && !checks.is_empty();
    let error = if checks.is_empty() && problems.is_empty() {
        "the drill restored nothing".to_string()
    } else {
        problems.join("; ")
    };
    let finished_at = started_at + chrono::Duration::milliseconds((seconds * 1000.0) as i64);
    record_drill(
        catalog,
        &job.name,
        &store,
        (started_at, finished_at),
        (!ok).then_some(error.as_str()),
    )
    .await?;
    info!(job = %job.name, store = %store, databases = checks.len(), seconds, ok, "Restore drill finished.");
    Ok(DrillReport {
        job: job.name.clone(),
        store,
        checks,
        seconds,
        ok,
        problems,
        rto_seconds: job.rto.map(|d| d.as_secs_f64()),
    })
}

/// The level a drill's own catalog record has (its database checks are
/// `restore` verifications).
pub const DRILL_LEVEL: &str = "drill";
