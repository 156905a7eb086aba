//! One attempt at a backup, stage by stage: [`preflight`] the database
//! (also what `check-config --probe` runs), dump it and the globals into
//! every store, confirm the sizes, describe it ([`Manifest::for_backup`],
//! then the size-anomaly guard), and [`publish`] the manifest last.

use std::time::Instant;

use backstop_catalog::{Catalog, Claim};
use backstop_config::{Config, JobConfig, Member};
use backstop_dump::{PgTarget, PgTool, Snapshot, find_tool};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tracing::warn;

use super::dump::{Dumped, dump_database, dump_globals, source};
use super::fan_out::{Destination, confirm_sizes, first_failure};
use super::names::artifact_key;
use super::{BackupError, DumpTool, Step};
use crate::manifest::{
    DumpInfo, FORMAT_VERSION, FORMAT_VERSION_ONE_STREAM, MANIFEST_FILE, Manifest, Tool,
};
use crate::store::Store;

/// What a backup produced.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub manifest: Manifest,
    /// Stores that received the backup, manifest included.
    pub stores: Vec<String>,
    /// Sessions the lock guard saw blocked behind the dump for longer than
    /// `lock_guard.max_block` (logged; `backstop_lock_blocks_total`).
    pub lock_blocks: u32,
    /// What pausing the standby's replay cost (standby = "pause" on a standby).
    pub replay: Option<backstop_dump::admin::Resumed>,
}

/// A database ready to dump: where it is, the pg_dump that can dump it, and
/// the snapshot the dump reads.
pub struct Ready {
    pub target: PgTarget,
    pub pg_dump: PgTool,
    pub snapshot: Snapshot,
}

/// The checks before a dump, in order: the job's URL, a pg_dump, no
/// transaction-mode pooler in front, the snapshot (under the job's lock
/// wait), a pg_dump at least the server's version, and (for a job that
/// dumps tables) that its role can read every table the dump includes.
///
/// # Errors
/// [`BackupError`] naming the check that failed; the snapshot is closed.
pub async fn preflight(job: &JobConfig) -> Result<Ready, BackupError> {
    let target =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    let pg_dump = find_tool(
        "pg_dump",
        job.pg_dump_path.as_deref(),
        job.pg_bin_dir.as_deref(),
    )
    .await
    .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDump), e))?;
    refuse_transaction_pooler(&target).await?;
    let mut snapshot = match Snapshot::open_with_lock_timeout(&target, job.lock_wait_timeout).await
    {
        Ok(s) => s,
        Err(e) => return Err(BackupError::connect_failed(&target, e).await),
    };
    if pg_dump.major < snapshot.server_major() {
        let server = snapshot.server_major();
        snapshot.close().await;
        return Err(BackupError::at(
            Step::VersionCheck,
            backstop_dump::DumpError::TooOld {
                tool: format!("{} ({})", pg_dump.name(), pg_dump.path.display()),
                found: pg_dump.major,
                server,
            },
        ));
    }
    // A cluster job's databases are each checked when their run starts;
    // its globals dump no tables.
    let dumps_tables = job.cluster.is_none() && !matches!(job.member, Some(Member::Globals { .. }));
    if dumps_tables && let Err(e) = refuse_unreadable(&mut snapshot, job).await {
        snapshot.close().await;
        return Err(e);
    }
    Ok(Ready {
        target,
        pg_dump,
        snapshot,
    })
}

/// Refuses a dump that would include tables the job's role cannot read.
async fn refuse_unreadable(snapshot: &mut Snapshot, job: &JobConfig) -> Result<(), BackupError> {
    let (role, found) = snapshot
        .unreadable_tables(&job.filters)
        .await
        .map_err(|e| BackupError::at(Step::Preflight, e))?;
    match backstop_dump::preflight::describe_unreadable(&role, &found) {
        Some(m) => Err(BackupError::at(
            Step::Preflight,
            backstop_dump::DumpError::Preflight(m),
        )),
        None => Ok(()),
    }
}

/// Refuses a transaction-mode pooler in front of the database before the
/// snapshot is taken through it.
async fn refuse_transaction_pooler(target: &PgTarget) -> Result<(), BackupError> {
    match backstop_dump::preflight::transaction_pooler(target).await {
        Ok(None) => Ok(()),
        Ok(Some(m)) => Err(BackupError::at(
            Step::Preflight,
            backstop_dump::DumpError::Preflight(m),
        )),
        Err(e @ backstop_dump::DumpError::Connect { .. }) => {
            Err(BackupError::connect_failed(target, e).await)
        }
        Err(e) => Err(BackupError::at(Step::Preflight, e)),
    }
}

/// One attempt: pre-flight, dump the database (and the globals) into every
/// live store, confirm what each holds, describe the backup, and publish
/// its manifest to each store that took all of it. Each store records what
/// it committed and whether it failed, for the caller to clean up.
pub(super) async fn attempt(
    config: &Config,
    job: &JobConfig,
    targets: &mut [Destination],
    backup_id: &str,
    started_at: DateTime<Utc>,
    fence: Option<(&Catalog, &Claim)>,
) -> Result<BackupReport, BackupError> {
    let clock = Instant::now();
    if !targets.iter().any(Destination::live) {
        return Err(first_failure(targets));
    }
    let Ready {
        target,
        pg_dump,
        mut snapshot,
    } = preflight(job).await?;
    // Parts are planned for the backup's size: the job's recent backups or
    // its expected_size when known (run.rs), else the database's size, an
    // upper bound of what its dump stores.
    let unknown = |t: &Destination| t.expected == backstop_storage::SizeHint::Unknown;
    if targets.iter().any(unknown)
        && !matches!(job.member, Some(Member::Globals { .. }))
        && let Ok(size) = snapshot.database_size().await
    {
        for t in targets.iter_mut().filter(|t| unknown(t)) {
            t.expected = backstop_storage::SizeHint::AtMost(size);
        }
    }
    let database_owner = match &job.member {
        Some(Member::Database(_)) => match snapshot.database_owner().await {
            Ok(owner) => Some(owner),
            Err(e) => {
                snapshot.close().await;
                return Err(BackupError::at(Step::Inventory, e));
            }
        },
        _ => None,
    };
    let mut dumped = if matches!(job.member, Some(Member::Globals { .. })) {
        // A cluster run's roles and tablespaces: no database dump.
        let dumped = Dumped::nothing(source(&target, &snapshot, &pg_dump), &snapshot);
        snapshot.close().await;
        dumped
    } else if job.streams > 1 {
        super::sections::dump_in_streams(job, targets, backup_id, &target, snapshot, &pg_dump)
            .await?
    } else {
        dump_database(job, targets, backup_id, &target, snapshot, &pg_dump).await?
    };
    if job.globals {
        let globals = dump_globals(job, targets, backup_id, &target).await?;
        dumped.artifacts.push(globals);
    }
    // Invariant: the manifest is written only after the store confirms every
    // artifact at its expected size.
    for t in targets.iter_mut().filter(|t| t.live()) {
        if let Err(e) = confirm_sizes(t, job, backup_id, &dumped.artifacts).await {
            t.failed = Some(e);
        }
    }
    let lock_blocks = dumped.lock_blocks;
    let mut manifest =
        Manifest::for_backup(job, backup_id, started_at, clock, dumped, database_owner);
    manifest.suspect = size_anomaly(config, job, targets, &manifest).await;
    if let Some(why) = &manifest.suspect {
        warn!(job = %job.name, backup_id = %backup_id, reason = %why, "Backup is SUSPECT: much smaller than the job's recent backups. It is kept and marked; check the database.");
    }
    let stores = publish(config, fence, targets, job, &manifest).await?;
    Ok(BackupReport {
        manifest,
        stores,
        lock_blocks,
        replay: None,
    })
}

impl Manifest {
    /// The manifest of the backup `dumped` made, timed on the run's own
    /// clock (which tests may inject, see [`crate::now`]).
    pub(super) fn for_backup(
        job: &JobConfig,
        backup_id: &str,
        started_at: DateTime<Utc>,
        clock: Instant,
        dumped: Dumped,
        database_owner: Option<String>,
    ) -> Manifest {
        let elapsed = clock.elapsed();
        let (series_job, member) = backstop_vocab::series::split(&job.name);
        let in_streams = dumped.artifacts.iter().any(|a| a.kind == "pre-data");
        Manifest {
            format_version: if in_streams {
                FORMAT_VERSION
            } else {
                FORMAT_VERSION_ONE_STREAM
            },
            tool: Tool {
                name: "backstop".into(),
                version: backstop_vocab::build::version().into(),
            },
            job: series_job.to_string(),
            backup_id: backup_id.to_string(),
            started_at,
            finished_at: started_at + chrono::Duration::from_std(elapsed).unwrap_or_default(),
            duration_seconds: (elapsed.as_millis() as f64) / 1000.0,
            source: dumped.source,
            dump: DumpInfo {
                format: job.format.as_str().into(),
                scope: job.scope.as_str().into(),
                snapshot: dumped.snapshot_id,
                include_schemas: job.filters.include_schemas.clone(),
                exclude_schemas: job.filters.exclude_schemas.clone(),
                include_tables: job.filters.include_tables.clone(),
                exclude_tables: job.filters.exclude_tables.clone(),
                globals: job.globals,
                no_role_passwords: job.no_role_passwords,
                streams: in_streams.then_some(job.streams),
            },
            artifacts: dumped.artifacts,
            row_counts: dumped.row_counts.as_str().into(),
            inventory: dumped.inventory,
            suspect: None,
            member: member.map(str::to_string),
            database_owner,
            databases: match &job.member {
                Some(Member::Globals { databases }) => Some(databases.clone()),
                _ => None,
            },
        }
    }
}

/// The size-anomaly guard, against the job's recent complete backups in
/// the first store still taking part: why the backup looks too small.
async fn size_anomaly(
    config: &Config,
    job: &JobConfig,
    targets: &[Destination],
    manifest: &Manifest,
) -> Option<String> {
    let t = targets.iter().find(|t| t.live())?;
    // Only trusted backups: forged small ones must not make a real backup
    // look normal, nor forged big ones a real one suspect.
    let store = Store::new(
        &t.name,
        t.storage.clone(),
        crate::Trust::from_config(config),
    );
    match store.backups(job).await {
        Ok(previous) => super::anomaly::check(manifest, &previous.backups, job.anomaly_min_ratio),
        Err(e) => {
            warn!(job = %job.name, store = %t.name, error = %e, "Cannot list earlier backups; the size-anomaly check is skipped.");
            None
        }
    }
}

/// Writes the manifest (its signature first) to every store still taking
/// part, unless the run's fleet claim is gone; returns the stores the
/// backup is now complete in.
///
/// # Errors
/// [`BackupError::LostClaim`], or the first store's failure when no store
/// took the manifest.
async fn publish(
    config: &Config,
    fence: Option<(&Catalog, &Claim)>,
    targets: &mut [Destination],
    job: &JobConfig,
    manifest: &Manifest,
) -> Result<Vec<String>, BackupError> {
    let body = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
    let key = artifact_key(job, &manifest.backup_id, MANIFEST_FILE);
    // Fencing: a node whose claim is gone (reaped while it was paused)
    // must not publish; the caller removes what it uploaded.
    if let Some((catalog, claim)) = fence
        && !catalog.fence(claim).await.unwrap_or(false)
    {
        return Err(BackupError::lost_claim());
    }
    // Signed once; the signature lands before the manifest in each store,
    // so where signatures are required the backup is never seen unsigned.
    let signature = crate::trust::sign(config.daemon.signing_key.as_deref(), &key, &body);
    for t in targets.iter_mut().filter(|t| t.live()) {
        if let Some((sig_key, sig, _)) = &signature {
            match t.storage.put(sig_key, sig.clone()).await {
                Ok(()) => t.written.push(sig_key.clone()),
                Err(e) => {
                    t.failed = Some(BackupError::at(Step::WriteManifestTo(t.name.clone()), e));
                    continue;
                }
            }
        }
        match t.storage.put(&key, Bytes::from(body.clone())).await {
            Ok(()) => t.complete = true,
            Err(e) => t.failed = Some(BackupError::at(Step::WriteManifestTo(t.name.clone()), e)),
        }
    }
    let stores: Vec<String> = targets
        .iter()
        .filter(|t| t.complete)
        .map(|t| t.name.clone())
        .collect();
    if stores.is_empty() {
        return Err(first_failure(targets));
    }
    Ok(stores)
}
