//! The dump stage: pg_dump of the job's database in its snapshot (under
//! the lock guard, counting rows in the stream), pg_dumpall of the globals,
//! each streamed into every store as an artifact.

use backstop_config::{DumpFormat, Encryption, JobConfig, RowCounts};
use backstop_dump::{DumpChild, DumpOptions, PgTarget, PgTool, RowCounter, Snapshot, find_tool};
use tracing::warn;

use super::fan_out::{Destination, Dumping, stream_artifact};
use super::guard;
use super::names::{artifact_file, artifact_key};
use super::stream::StreamStats;
use super::{BackupError, DumpTool, Step};
use crate::manifest::{Artifact, ArtifactEncryption, Source};

/// What [`dump_database`] made.
pub(super) struct Dumped {
    pub(super) artifacts: Vec<Artifact>,
    pub(super) inventory: backstop_dump::Inventory,
    pub(super) row_counts: RowCounts,
    pub(super) source: Source,
    pub(super) snapshot_id: String,
    /// Sessions the lock guard saw blocked behind the dump (warn mode).
    pub(super) lock_blocks: u32,
}

/// pg_dump of the job's database in `snapshot`, streamed to every store,
/// under the lock guard: its artifact, inventory, how rows were counted,
/// and the source.
pub(super) async fn dump_database(
    job: &JobConfig,
    targets: &mut [Destination],
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
    let permit = super::sources::permit(job, target).await;
    let (child, stdout) = DumpChild::spawn_as(pg_dump, target, &options.args(&snapshot.id), &app)
        .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDump), e))?;
    let guard = guard::Guard::start(target, &app, job.lock_guard, &job.name);
    let dumping = Dumping {
        tool: DumpTool::PgDump,
        child,
        stdout,
        target,
        app: &app,
        permit,
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

impl Dumped {
    /// What a globals-only member dumps of its database: nothing but
    /// where it is and the snapshot it opened.
    pub(super) fn nothing(source: Source, snapshot: &Snapshot) -> Self {
        Dumped {
            artifacts: Vec::new(),
            inventory: backstop_dump::Inventory::default(),
            row_counts: RowCounts::Off,
            source,
            snapshot_id: snapshot.id.clone(),
            lock_blocks: 0,
        }
    }
}

/// pg_dumpall --globals-only (roles and tablespaces), streamed to every
/// store as the backup's `globals` artifact.
pub(super) async fn dump_globals(
    job: &JobConfig,
    targets: &mut [Destination],
    backup_id: &str,
    target: &PgTarget,
) -> Result<Artifact, BackupError> {
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
    let permit = super::sources::permit(job, target).await;
    let (child, stdout) = DumpChild::spawn_as(&pg_dumpall, target, &args, &app)
        .map_err(|e| BackupError::at(Step::Dump(DumpTool::PgDumpall), e))?;
    let dumping = Dumping {
        tool: DumpTool::PgDumpall,
        child,
        stdout,
        target,
        app: &app,
        permit,
    };
    let g = stream_artifact(job, targets, backup_id, &file, dumping, None).await?;
    Ok(make_artifact(
        job,
        backup_id,
        "globals",
        DumpFormat::Plain,
        &file,
        &g,
    ))
}

pub(super) fn make_artifact(
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
        tables: Vec::new(),
    }
}

pub(super) fn source(target: &PgTarget, snapshot: &Snapshot, pg_dump: &PgTool) -> Source {
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
