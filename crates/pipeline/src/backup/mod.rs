//! One backup run end to end: snapshot → inventory → pg_dump → stream →
//! stores → confirm → manifest (last) → catalog.

use std::sync::Arc;
use std::time::Instant;

use backstop_catalog::{Catalog, Claim, Outcome, RunKind, RunResult};
use backstop_config::{Compression, Config, DumpFormat, Encryption, JobConfig, Member, RowCounts};
use backstop_dump::{DumpChild, DumpOptions, PgTarget, PgTool, RowCounter, Snapshot, find_tool};
use backstop_storage::PendingUpload;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::manifest::{
    Artifact, ArtifactEncryption, DumpInfo, FORMAT_VERSION, MANIFEST_FILE, Manifest, Source, Tool,
};
use crate::stream::StreamStats;
use crate::{BackupError, DumpTool, Step, open_storage};

mod fan_out;
mod guard;
use fan_out::{Dumping, Target, confirm_sizes, first_failure, stream_artifact};

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

/// Runs one backup of `job` now and records it in `catalog`.
///
/// # Errors
/// [`BackupError`] naming the failed step; nothing without a manifest is left
/// in any store, and the run is recorded as failed.
pub async fn run_backup(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<BackupReport, BackupError> {
    run_backup_until(config, job, catalog, &CancellationToken::new(), None).await
}

/// [`run_backup`] that stops cleanly when `cancel` fires (daemon shutdown):
/// pg_dump is killed, uploads are aborted, this run's artifacts are removed
/// and the run is recorded as `interrupted`.
///
/// With a `claim` (a fleet's shared catalog) the run is that claimed row:
/// no lock or row of its own is taken, the backup id and sizes are
/// recorded on it, the claim is checked right before the manifest is
/// written ([`BackupError::LostClaim`] when it no longer holds), and the
/// caller records how the run ended.
///
/// # Errors
/// As [`run_backup`], or [`BackupError::Interrupted`].
pub async fn run_backup_until(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
) -> Result<BackupReport, BackupError> {
    if let Some(claim) = claim {
        return run_locked(config, job, catalog, cancel, Mode::Claimed(claim)).await;
    }
    lock_job(catalog, &job.name).await?;
    let result = run_locked(config, job, catalog, cancel, Mode::Own).await;
    unlock_job(catalog, &job.name).await;
    result
}

/// Records the start of a backup run: on a fleet's claimed run, its backup
/// id (None: the claimed row is the run); otherwise a run row of its own,
/// whose id is returned.
///
/// # Errors
/// [`BackupError::LostClaim`] when the claim no longer holds, or the
/// catalog's error.
pub(crate) async fn begin_run(
    catalog: &Catalog,
    name: &str,
    claim: Option<&Claim>,
    backup_id: &str,
    started_at: DateTime<Utc>,
) -> Result<Option<i64>, BackupError> {
    match claim {
        Some(claim) => {
            if !catalog
                .annotate(claim, backup_id, None)
                .await
                .map_err(BackupError::Catalog)?
            {
                return Err(lost_claim());
            }
            Ok(None)
        }
        None => catalog
            .start_run(name, RunKind::Backup, Some(backup_id), started_at)
            .await
            .map(Some)
            .map_err(BackupError::Catalog),
    }
}

/// Takes job `name`'s lock in a catalog of one host: one backup of a job at
/// a time, across the daemon and one-shot runs. (A shared catalog has no
/// locks: its backups are claimed runs.)
///
/// # Errors
/// [`BackupError::Locked`] naming the holder, or the catalog's error.
pub(crate) async fn lock_job(catalog: &Catalog, name: &str) -> Result<(), BackupError> {
    if catalog.is_shared() {
        return Err(BackupError::Locked(format!(
            "job \"{name}\": a backup against a shared catalog runs as a claimed run (`backstop backup` and the daemon claim one)"
        )));
    }
    match catalog.lock_job(name).await.map_err(BackupError::Catalog)? {
        Ok(()) => Ok(()),
        Err(holder) => Err(BackupError::Locked(format!(
            "another backstop process ({holder}) is running a backup of job \"{name}\"; wait for it (or use `backstop backup --wait`, which queues through the daemon)"
        ))),
    }
}

/// Releases [`lock_job`]'s lock (a failure is logged: the lock of an exited
/// process is taken over).
pub(crate) async fn unlock_job(catalog: &Catalog, name: &str) {
    if let Err(e) = catalog.unlock_job(name).await {
        warn!(job = %name, error = %e, "Could not release the job's lock in the catalog; it is taken over once this process exits.");
    }
}

/// One database (or the globals) of a cluster job's run, as a backup of
/// its own series with its own catalog record: `backup_id` is the run's
/// (every database of one run shares it), and `fence` the run's claim in a
/// fleet, checked before the manifest as for any claimed backup. The
/// cluster run holds the job's lock.
///
/// # Errors
/// As [`run_backup_until`].
pub async fn run_member(
    config: &Config,
    member: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    backup_id: &str,
    fence: Option<&Claim>,
) -> Result<BackupReport, BackupError> {
    run_locked(
        config,
        member,
        catalog,
        cancel,
        Mode::Member { backup_id, fence },
    )
    .await
}

/// Whose run a backup is.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Its own: a run row of its own, under the job's lock.
    Own,
    /// A fleet's claimed run.
    Claimed(&'a Claim),
    /// A member of a cluster job's run.
    Member {
        backup_id: &'a str,
        fence: Option<&'a Claim>,
    },
}

async fn run_locked(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    mode: Mode<'_>,
) -> Result<BackupReport, BackupError> {
    let started_at = crate::now();
    let (backup_id, claim) = match mode {
        Mode::Own => (new_backup_id(started_at), None),
        Mode::Claimed(c) => (new_backup_id(started_at), Some(c)),
        Mode::Member { backup_id, .. } => (backup_id.to_string(), None),
    };
    let fence_claim = match mode {
        Mode::Own => None,
        Mode::Claimed(c) => Some(c),
        Mode::Member { fence, .. } => fence,
    };
    let run_id = begin_run(catalog, &job.name, claim, &backup_id, started_at).await?;
    info!(job = %job.name, backup_id = %backup_id, "Backup started.");
    if job.encryption == Encryption::None {
        warn!(job = %job.name, "Backup is NOT encrypted: the job sets encryption = \"none\".");
    }

    let mut targets = Vec::new();
    for name in &job.storage {
        let journal: backstop_storage::Journal = Arc::new(crate::CatalogJournal(catalog.clone()));
        let storage = open_storage(config, name, Some(journal))
            .await
            .map_err(|m| BackupError::said(Step::OpenStorage, m))?;
        targets.push(Target {
            name: name.clone(),
            storage,
            written: Vec::new(),
            failed: None,
            complete: false,
        });
    }
    // Check every store before touching the database: a missing bucket or
    // rejected credentials fail fast, with the store's own message.
    for t in &mut targets {
        if let Err(e) = t.storage.probe(false).await {
            t.failed = Some(BackupError::at(Step::CheckStore(t.name.clone()), e));
        }
    }
    abort_stale_uploads(job, &targets, catalog).await;

    let fence = fence_claim.map(|c| (catalog, c));
    let result = match pause_replay(job, catalog).await {
        Err(e) => Err(e),
        Ok(pause) => {
            let attempt = attempt(config, job, &mut targets, &backup_id, started_at, fence);
            let limited = async {
                match job.timeout {
                    Some(limit) => match tokio::time::timeout(limit, attempt).await {
                        Ok(r) => r,
                        Err(_) => Err(BackupError::Timeout(limit)),
                    },
                    None => attempt.await,
                }
            };
            let result = tokio::select! {
                r = limited => r,
                () = cancel.cancelled() => Err(BackupError::Interrupted),
            };
            // Resumed on every path: success, failure, timeout, shutdown.
            let replay = match pause {
                Some(p) => resume_replay(job, p, catalog).await,
                None => None,
            };
            result.map(|mut r| {
                r.replay = replay;
                r
            })
        }
    };

    // Stores without a manifest must not keep this run's artifacts.
    for t in targets.iter().filter(|t| !t.complete) {
        for key in &t.written {
            if let Err(e) = t.storage.delete(key).await {
                warn!(job = %job.name, store = %t.name, key = %key, error = %e,
                    "Could not remove an artifact of the failed backup; prune will clean it up.");
            }
        }
    }
    // A store that failed while others succeeded still fails the run.
    let result = result.and_then(|report| {
        let failed: Vec<(String, String)> = targets
            .iter()
            .filter_map(|t| {
                t.failed
                    .as_ref()
                    .map(|e| (t.name.clone(), crate::one_line(e)))
            })
            .collect();
        if failed.is_empty() {
            Ok(report)
        } else {
            Err(BackupError::SomeStores {
                stored_in: report.stores,
                backup_id: report.manifest.backup_id,
                failed,
            })
        }
    });

    let finished_at = Utc::now();
    match result {
        Ok(report) => {
            let m = &report.manifest;
            // The manifest's time, so a catalog rebuilt from the stores
            // says exactly what this one does.
            let finished_at = m.finished_at;
            let outcome = if m.suspect.is_some() {
                Outcome::Suspect
            } else {
                Outcome::Success
            };
            match (run_id, claim) {
                (Some(run_id), _) => catalog
                    .finish_run(
                        run_id,
                        outcome,
                        finished_at,
                        &RunResult {
                            error: m.suspect.as_deref(),
                            dump_bytes: Some(m.dump_bytes()),
                            stored_bytes: Some(m.stored_bytes()),
                        },
                    )
                    .await
                    .map_err(BackupError::Catalog)?,
                (None, Some(claim)) => {
                    if let Err(e) = catalog
                        .annotate(claim, &backup_id, Some((m.dump_bytes(), m.stored_bytes())))
                        .await
                    {
                        warn!(job = %job.name, error = %e, "Could not record the backup's sizes in the catalog.");
                    }
                }
                (None, None) => {}
            }
            info!(
                job = %job.name,
                backup_id = %backup_id,
                dump_bytes = m.dump_bytes(),
                stored_bytes = m.stored_bytes(),
                tables = m.inventory.tables,
                rows = m.total_rows(),
                seconds = m.duration_seconds,
                stores = %report.stores.join(","),
                "Backup complete."
            );
            Ok(report)
        }
        Err(err) => {
            let message = crate::one_line(&err);
            let outcome = if matches!(err, BackupError::Interrupted) {
                warn!(job = %job.name, backup_id = %backup_id, "Backup interrupted by shutdown; its partial artifacts were removed.");
                Outcome::Interrupted
            } else {
                error!(job = %job.name, backup_id = %backup_id, error = %message, "Backup failed.");
                Outcome::Failed
            };
            if let Some(run_id) = run_id
                && let Err(e) = catalog
                    .finish_run(
                        run_id,
                        outcome,
                        finished_at,
                        &RunResult {
                            error: Some(&message),
                            ..Default::default()
                        },
                    )
                    .await
            {
                warn!(job = %job.name, error = %e, "Could not record the failed run in the catalog.");
            }
            Err(err)
        }
    }
}

/// Aborts multipart uploads a crashed or killed earlier run of this job left
/// behind: those the catalog recorded as in flight, and those the store lists.
/// Runs of one job never overlap, so any pending upload under the job's prefix
/// is stale. Best effort: failures are logged, not fatal.
async fn abort_stale_uploads(job: &JobConfig, targets: &[Target], catalog: &Catalog) {
    let prefix = format!("{}/", job.name);
    for t in targets {
        let mut stale: Vec<PendingUpload> = match catalog.recorded_uploads(&t.name, &prefix).await {
            Ok(r) => r
                .into_iter()
                .map(|u| PendingUpload {
                    key: u.key,
                    upload_id: u.upload_id,
                    initiated_unix: None,
                })
                .collect(),
            Err(e) => {
                warn!(job = %job.name, store = %t.name, error = %e, "Cannot read recorded uploads from the catalog.");
                Vec::new()
            }
        };
        match t.storage.pending_uploads(&prefix).await {
            Ok(listed) => {
                for u in listed {
                    if !stale.iter().any(|s| s.upload_id == u.upload_id) {
                        stale.push(u);
                    }
                }
            }
            Err(e) => debug!(job = %job.name, store = %t.name, error = %e,
                "Cannot list pending multipart uploads on this store; relying on the catalog."),
        }
        for u in stale {
            match t.storage.abort_upload(&u).await {
                Ok(()) => warn!(job = %job.name, store = %t.name, key = %u.key,
                    "Aborted a multipart upload left by an interrupted run."),
                Err(e) => warn!(job = %job.name, store = %t.name, key = %u.key, error = %e,
                    "Could not abort a stale multipart upload; will retry on the next run."),
            }
        }
    }
}

/// The part of a backup a timeout cancels. Each target records the keys it
/// committed and whether it failed, so the caller can clean up and report.
fn lost_claim() -> BackupError {
    BackupError::LostClaim(
        "this node lost its claim on the run (its lease expired while it was paused or cut off from the catalog); nothing was published, its uploads are removed, and another node runs it".into(),
    )
}

async fn attempt(
    config: &Config,
    job: &JobConfig,
    targets: &mut [Target],
    backup_id: &str,
    started_at: DateTime<Utc>,
    fence: Option<(&Catalog, &Claim)>,
) -> Result<BackupReport, BackupError> {
    let clock = Instant::now();
    if !targets.iter().any(Target::live) {
        return Err(first_failure(targets));
    }
    let target =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    let pg_dump = find_tool(
        "pg_dump",
        job.pg_dump_path.as_deref(),
        job.pg_bin_dir.as_deref(),
    )
    .await
    .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDump), e))?;

    preflight_pooler(&target).await?;
    let mut snapshot = match Snapshot::open_with_lock_timeout(&target, job.lock_wait_timeout).await
    {
        Ok(s) => s,
        Err(e) => return Err(connect_failed(&target, e).await),
    };
    if pg_dump.major < snapshot.server_major() {
        return Err(BackupError::at(
            Step::VersionCheck,
            backstop_dump::DumpError::TooOld {
                tool: format!("{} ({})", pg_dump.name(), pg_dump.path.display()),
                found: pg_dump.major,
                server: snapshot.server_major(),
            },
        ));
    }
    if !matches!(job.member, Some(Member::Globals { .. })) {
        let (role, found) = snapshot
            .unreadable_tables(&job.filters)
            .await
            .map_err(|e| BackupError::at(Step::Preflight, e))?;
        if let Some(m) = backstop_dump::preflight::describe_unreadable(&role, &found) {
            snapshot.close().await;
            return Err(BackupError::at(
                Step::Preflight,
                backstop_dump::DumpError::Preflight(m),
            ));
        }
    }
    let database_owner = match &job.member {
        Some(Member::Database(_)) => Some(
            snapshot
                .database_owner()
                .await
                .map_err(|e| BackupError::at(Step::Inventory, e))?,
        ),
        _ => None,
    };
    let Dumped {
        mut artifacts,
        inventory,
        row_counts,
        source,
        snapshot_id,
        lock_blocks,
    } = if matches!(job.member, Some(Member::Globals { .. })) {
        // A cluster run's roles and tablespaces: no database dump.
        let source = source(&target, &snapshot, &pg_dump);
        let snapshot_id = snapshot.id.clone();
        snapshot.close().await;
        Dumped {
            artifacts: Vec::new(),
            inventory: backstop_dump::Inventory::default(),
            row_counts: RowCounts::Off,
            source,
            snapshot_id,
            lock_blocks: 0,
        }
    } else {
        dump_database(job, targets, backup_id, &target, snapshot, &pg_dump).await?
    };
    if job.globals {
        let pg_dumpall = find_tool(
            "pg_dumpall",
            job.pg_dump_path.as_deref(),
            job.pg_bin_dir.as_deref(),
        )
        .await
        .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDumpall), e))?;
        let mut args = vec!["--globals-only".to_string(), "--no-password".to_string()];
        if job.no_role_passwords {
            args.push("--no-role-passwords".into());
        }
        let file = artifact_file(
            "globals",
            DumpFormat::Plain,
            job.compression,
            &job.encryption,
        );
        let app = format!("backstop-pg_dumpall-{:016x}", rand::random::<u64>());
        let (child, stdout) = DumpChild::spawn_as(&pg_dumpall, &target, &args, &app)
            .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDumpall), e))?;
        let dumping = Dumping {
            tool: DumpTool::PgDumpall,
            child,
            stdout,
            target: &target,
            app: &app,
        };
        let g = stream_artifact(job, targets, backup_id, &file, dumping, None).await?;
        artifacts.push(make_artifact(
            job,
            backup_id,
            "globals",
            DumpFormat::Plain,
            &file,
            &g,
        ));
    }

    // Invariant: the manifest is written only after the store confirms every
    // artifact at its expected size.
    for t in targets.iter_mut().filter(|t| t.live()) {
        if let Err(e) = confirm_sizes(t, job, backup_id, &artifacts).await {
            t.failed = Some(e);
        }
    }

    // On the run's own clock, which tests may inject (see crate::now).
    let finished_at = started_at + chrono::Duration::from_std(clock.elapsed()).unwrap_or_default();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tool: Tool {
            name: "backstop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        job: backstop_vocab::series::split(&job.name).0.to_string(),
        backup_id: backup_id.to_string(),
        started_at,
        finished_at,
        duration_seconds: (clock.elapsed().as_millis() as f64) / 1000.0,
        source,
        dump: DumpInfo {
            format: job.format.as_str().into(),
            scope: job.scope.as_str().into(),
            snapshot: snapshot_id,
            include_schemas: job.filters.include_schemas.clone(),
            exclude_schemas: job.filters.exclude_schemas.clone(),
            include_tables: job.filters.include_tables.clone(),
            exclude_tables: job.filters.exclude_tables.clone(),
            globals: job.globals,
            no_role_passwords: job.no_role_passwords,
        },
        artifacts,
        row_counts: row_counts.as_str().into(),
        inventory,
        suspect: None,
        member: backstop_vocab::series::split(&job.name)
            .1
            .map(str::to_string),
        database_owner,
        databases: match &job.member {
            Some(Member::Globals { databases }) => Some(databases.clone()),
            _ => None,
        },
    };
    // The size-anomaly guard, against the job's recent complete backups in
    // the first store still taking part.
    let mut manifest = manifest;
    if let Some(t) = targets.iter().find(|t| t.live()) {
        // Only trusted backups: forged small ones must not make a real
        // backup look normal, nor forged big ones a real one suspect.
        match crate::list_backups(t.storage.as_ref(), job, &crate::Trust::from_config(config)).await
        {
            Ok(previous) => {
                manifest.suspect =
                    crate::anomaly::check(&manifest, &previous.backups, job.anomaly_min_ratio);
            }
            Err(e) => {
                warn!(job = %job.name, store = %t.name, error = %e, "Cannot list earlier backups; the size-anomaly check is skipped.")
            }
        }
    }
    if let Some(why) = &manifest.suspect {
        warn!(job = %job.name, backup_id = %backup_id, reason = %why, "Backup is SUSPECT: much smaller than the job's recent backups. It is kept and marked; check the database.");
    }
    let body = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    let key = artifact_key(job, backup_id, MANIFEST_FILE);
    // Fencing: a node whose claim is gone (reaped while it was paused)
    // must not publish; the caller removes what it uploaded.
    if let Some((catalog, claim)) = fence
        && !catalog.fence(claim).await.unwrap_or(false)
    {
        return Err(lost_claim());
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
    Ok(BackupReport {
        manifest,
        stores,
        lock_blocks,
        replay: None,
    })
}

/// With standby = "pause" on a standby: resumes a pause a dead process
/// left for this job (its runs never overlap, so a recorded pause is not
/// another run's), then pauses replay for this dump and records it.
async fn pause_replay(
    job: &JobConfig,
    catalog: &Catalog,
) -> Result<Option<backstop_dump::admin::ReplayPause>, BackupError> {
    if job.standby != backstop_config::StandbyMode::Pause {
        return Ok(None);
    }
    let target =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    if catalog
        .replay_pauses()
        .await
        .is_ok_and(|p| p.contains(&job.name))
    {
        resume_left_pause(job, catalog).await;
    }
    // Recorded before pausing: a process killed a moment after the pause
    // took hold still leaves the record its successor resumes from.
    if let Err(e) = catalog.record_replay_pause(&job.name).await {
        warn!(job = %job.name, error = %e, "Could not record the replay pause in the catalog; if this process dies during the dump, resume replay by hand.");
    }
    let paused = backstop_dump::admin::ReplayPause::begin(&target).await;
    if !matches!(paused, Ok(Some(_))) {
        let _ = catalog.forget_replay_pause(&job.name).await;
    }
    match paused {
        Ok(Some(p)) => {
            info!(job = %job.name, "The database is a standby: WAL replay is paused for the dump (standby = \"pause\").");
            Ok(Some(p))
        }
        Ok(None) => Ok(None),
        Err(e @ backstop_dump::DumpError::Connect { .. }) => Err(connect_failed(&target, e).await),
        Err(e) => Err(BackupError::at(Step::Preflight, e)),
    }
}

/// Resumes the standby's replay after the dump and says what it cost.
async fn resume_replay(
    job: &JobConfig,
    pause: backstop_dump::admin::ReplayPause,
    catalog: &Catalog,
) -> Option<backstop_dump::admin::Resumed> {
    match pause.resume().await {
        Ok(r) => {
            let _ = catalog.forget_replay_pause(&job.name).await;
            info!(job = %job.name, paused_seconds = r.paused_seconds, replay_lag_bytes = r.lag_bytes, "WAL replay on the standby resumed.");
            Some(r)
        }
        Err(e) => {
            error!(job = %job.name, error = %e, "Could not resume WAL replay on the standby: it stays paused and falls behind. The next run or daemon start tries again; or run SELECT pg_wal_replay_resume(); on it.");
            None
        }
    }
}

/// Resumes a pause of `job`'s standby that a dead process left behind.
pub async fn resume_left_pause(job: &JobConfig, catalog: &Catalog) {
    let target = match PgTarget::from_config(&job.database) {
        Ok(t) => t,
        Err(e) => {
            error!(job = %job.name, error = %e, "A backup left WAL replay paused on the standby and its URL is unusable now; run SELECT pg_wal_replay_resume(); on it.");
            return;
        }
    };
    match backstop_dump::admin::resume_left_pause(&target).await {
        Ok(resumed) => {
            if resumed {
                warn!(job = %job.name, "Resumed WAL replay on the standby: a backup that did not finish (the process died) had left it paused.");
            }
            let _ = catalog.forget_replay_pause(&job.name).await;
        }
        Err(e) => {
            error!(job = %job.name, error = %e, "A backup left WAL replay paused on the standby and it cannot be resumed now; run SELECT pg_wal_replay_resume(); on it.");
        }
    }
}

/// Refuses a transaction-mode pooler in front of the database before the
/// snapshot is taken through it.
async fn preflight_pooler(target: &PgTarget) -> Result<(), BackupError> {
    match backstop_dump::preflight::transaction_pooler(target).await {
        Ok(None) => Ok(()),
        Ok(Some(m)) => Err(BackupError::at(
            Step::Preflight,
            backstop_dump::DumpError::Preflight(m),
        )),
        Err(e @ backstop_dump::DumpError::Connect { .. }) => Err(connect_failed(target, e).await),
        Err(e) => Err(BackupError::at(Step::Preflight, e)),
    }
}

/// A connection failure, with the reason when it is a host this machine
/// cannot reach over IPv6 (not retryable then: retrying cannot help).
pub(crate) async fn connect_failed(target: &PgTarget, e: backstop_dump::DumpError) -> BackupError {
    match backstop_dump::preflight::ipv6_only_host(target).await {
        Some(why) => BackupError::said(Step::Connect, format!("{e}; {why}")),
        None => BackupError::at(Step::Connect, e),
    }
}

/// What [`dump_database`] made.
struct Dumped {
    artifacts: Vec<Artifact>,
    inventory: backstop_dump::Inventory,
    row_counts: RowCounts,
    source: Source,
    snapshot_id: String,
    /// Sessions the lock guard saw blocked behind the dump (warn mode).
    lock_blocks: u32,
}

/// pg_dump of the job's database in `snapshot`, streamed to every store,
/// under the lock guard: its artifact, inventory, how rows were counted,
/// and the source.
async fn dump_database(
    job: &JobConfig,
    targets: &mut [Target],
    backup_id: &str,
    target: &PgTarget,
    mut snapshot: Snapshot,
    pg_dump: &PgTool,
) -> Result<Dumped, BackupError> {
    let mut inventory = snapshot
        .inventory(&job.filters)
        .await
        .map_err(|e| BackupError::at(Step::Inventory, e))?;

    let options = DumpOptions {
        format: job.format,
        scope: job.scope,
        filters: job.filters.clone(),
        lock_wait_timeout: job.lock_wait_timeout,
    };
    let counter = match (job.row_counts, job.format) {
        (RowCounts::Exact, DumpFormat::Custom) => Some(RowCounter::custom()),
        (RowCounts::Exact, DumpFormat::Plain) => Some(RowCounter::plain()),
        _ => None,
    };
    let db_file = artifact_file("database", job.format, job.compression, &job.encryption);
    // A name of its own on the server, by which the lock guard finds
    // pg_dump's session (and only this dump's).
    let app = format!("backstop-pg_dump-{:016x}", rand::random::<u64>());
    let (child, stdout) = DumpChild::spawn_as(pg_dump, target, &options.args(&snapshot.id), &app)
        .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDump), e))?;
    let guard = guard::Guard::start(target, &app, job.lock_guard, &job.name);
    let dumping = Dumping {
        tool: DumpTool::PgDump,
        child,
        stdout,
        target,
        app: &app,
    };
    let db = stream_artifact(job, targets, backup_id, &db_file, dumping, counter).await;
    let seen = guard.stop();
    let source = source(target, &snapshot, pg_dump);
    let snapshot_id = snapshot.id.clone();
    // pg_dump has exited (finish() waited for it): the snapshot may end now.
    snapshot.close().await;
    if seen.yielded
        && let Some(b) = seen.blocked.last()
    {
        return Err(BackupError::Yielded(guard::describe(b)));
    }
    let db = db?;

    let row_counts = match (job.row_counts, &db.rows) {
        (RowCounts::Off, _) => {
            inventory.per_table.iter_mut().for_each(|t| t.rows = None);
            RowCounts::Off
        }
        (RowCounts::Estimate, _) => RowCounts::Estimate,
        (RowCounts::Exact, Some(Ok(counts))) => {
            for t in &mut inventory.per_table {
                t.rows = Some(
                    *counts
                        .get(&(t.schema.clone(), t.name.clone()))
                        .unwrap_or(&0),
                );
            }
            RowCounts::Exact
        }
        (RowCounts::Exact, other) => {
            let why = match other {
                Some(Err(why)) => why.clone(),
                _ => "no counter".into(),
            };
            warn!(job = %job.name, reason = %why,
                "Could not count rows in the dump stream; recording pg_class estimates instead.");
            RowCounts::Estimate
        }
    };

    let artifacts = vec![make_artifact(
        job, backup_id, "database", job.format, &db_file, &db,
    )];
    Ok(Dumped {
        artifacts,
        inventory,
        row_counts,
        source,
        snapshot_id,
        lock_blocks: seen.blocked.len() as u32,
    })
}

fn make_artifact(
    job: &JobConfig,
    backup_id: &str,
    kind: &str,
    format: DumpFormat,
    file: &str,
    s: &StreamStats,
) -> Artifact {
    Artifact {
        kind: kind.into(),
        file: file.into(),
        key: artifact_key(job, backup_id, file),
        format: format.as_str().into(),
        plain_bytes: s.plain_bytes,
        plain_sha256: s.plain_sha256.clone(),
        stored_bytes: s.stored_bytes,
        stored_sha256: s.stored_sha256.clone(),
        compression: job.compression.to_string(),
        compression_levels: s.levels.as_ref().map(|levels| {
            levels
                .iter()
                .map(|(level, bytes)| (level.to_string(), *bytes))
                .collect()
        }),
        encryption: match &job.encryption {
            Encryption::None => ArtifactEncryption::None,
            Encryption::Age { recipients, .. } => ArtifactEncryption::Age {
                recipients: recipients.clone(),
            },
        },
    }
}

fn source(target: &PgTarget, snapshot: &Snapshot, pg_dump: &PgTool) -> Source {
    Source {
        host: target.host(),
        port: target.port(),
        database: target.database(),
        user: target.user(),
        server_version: snapshot.server_version.clone(),
        server_version_num: snapshot.server_version_num,
        pg_dump_version: pg_dump.version.clone(),
    }
}

/// `database.dump.zst.age`, `globals.sql.zst.age`, `database.sql` …
pub fn artifact_file(
    kind: &str,
    format: DumpFormat,
    compression: Compression,
    enc: &Encryption,
) -> String {
    let mut name = format!(
        "{kind}.{}",
        match format {
            DumpFormat::Custom => "dump",
            DumpFormat::Plain => "sql",
        }
    );
    if compression.is_zstd() {
        name.push_str(".zst");
    }
    if let Encryption::Age { .. } = enc {
        name.push_str(".age");
    }
    name
}

fn artifact_key(job: &JobConfig, backup_id: &str, file: &str) -> String {
    format!("{}/{}/{}", job.name, backup_id, file)
}

/// Sortable by time, unique enough to never collide: `2026-01-22T02-15-00Z-7f3a`.
pub fn new_backup_id(at: DateTime<Utc>) -> String {
    format!(
        "{}-{:04x}",
        at.format("%Y-%m-%dT%H-%M-%SZ"),
        rand::random::<u16>()
    )
}
