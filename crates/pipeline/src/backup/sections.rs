//! A backup in streams (`streams` above 1): the schema in pg_dump's
//! sections and the table data over several connections, all reading the
//! one exported snapshot.
//!
//! The snapshot's own session holds ACCESS SHARE on every table it lists
//! (as pg_dump does), so nothing is dropped or rewritten before its stream
//! reaches it. Then, at once, each in its own zstd → age → store stream
//! within an equal share of the job's `memory_budget`:
//! - one lane after the other: `pre-data` (pg_dump `--section=pre-data`),
//!   `data-rest` (pg_dump `--section=data` without the tables the streams
//!   copy: sequence values and large objects) and `post-data`;
//! - one lane per data stream: psql running [`streams::copy_script`], whose
//!   output is the `data-NN` artifact of plain-SQL COPY blocks.
//!
//! Every session is named after the backup (the snapshot's with its name,
//! each lane's with `NAME-NN`), so the lock guard watches them all by
//! prefix and a yield or a failed lane ends them all, while each lane's
//! stall watchdog sees its own sessions only. A lane
//! that fails fails the backup at once: the other lanes are dropped, which
//! kills their children and aborts their uploads.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use backstop_config::{DumpFormat, JobConfig, RowCounts};
use backstop_dump::{
    DataTable, DumpChild, DumpError, PgTarget, PgTool, RowCountMap, RowCounter, Snapshot, find_tool,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::dump::{Dumped, make_artifact, source};
use super::fan_out::{Destination, Dumping, Produced, Settle, artifact_result, stream_to};
use super::names::artifact_file;
use super::stream::StreamStats;
use super::streams::{self, StreamPlan};
use super::{BackupError, DumpTool, Step, guard, sources};
use crate::manifest::{Artifact, ArtifactTable};

/// TID range scans (PostgreSQL 14) read only a range's blocks; before
/// them, every part would read the whole table.
const SPLIT_FROM_SERVER: u32 = 140000;

/// What the dump tools of one backup in streams share.
struct Lanes<'a> {
    job: &'a JobConfig,
    targets: &'a [Destination],
    backup_id: &'a str,
    target: &'a PgTarget,
    /// The application name of this backup's snapshot session; each lane's
    /// sessions are named after it ([`Lanes::lane_app`]), so that the
    /// stall watchdog of one lane sees its own sessions only, while the
    /// lock guard and the end of the backup take every lane's by prefix.
    app: &'a str,
    snapshot: &'a str,
    /// Each lane's share of the job's memory budget.
    memory: u64,
    /// Every artifact's uploads, for the targets once the lanes are done.
    settled: Mutex<Vec<Settle>>,
    /// Set when a lane failed: the others start nothing more.
    stop: CancellationToken,
}

/// One artifact a lane made.
struct Made {
    kind: &'static str,
    file: String,
    format: DumpFormat,
    stats: StreamStats,
    /// A data artifact's plan.
    plan: Option<StreamPlan>,
}

/// Why a lane stopped.
enum Failure {
    /// Before production: the tool did not start, or the stream stalled.
    Now(BackupError),
    /// Production or every store failed; said once the stores are settled.
    Produced(DumpTool, Produced),
    /// Stopped because another lane failed.
    Stopped,
}

/// How long the lanes still running when one failed have, once their
/// sessions are ended, to wind down (their uploads aborted, or committed
/// and recorded) before they are dropped.
const WIND_DOWN: Duration = Duration::from_secs(30);

/// Runs every lane to its end. When one fails, the others are stopped:
/// they start nothing more, and every session of the backup is ended on
/// the server, so their dump tools exit and their uploads are aborted
/// (rather than dropped mid-commit, which could leave an object behind
/// no run knows of). Returns the lanes' artifacts, or the first failure.
async fn run_lanes(
    all: Vec<Lane<'_>>,
    stop: &CancellationToken,
    target: &PgTarget,
    app: &str,
) -> Result<Vec<Made>, Failure> {
    let first: Mutex<Option<Failure>> = Mutex::new(None);
    let watched = all.into_iter().map(|lane| {
        let first = &first;
        async move {
            match lane.await {
                Ok(made) => made,
                Err(f) => {
                    let mut slot = first
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if slot.is_none() && !matches!(f, Failure::Stopped) && !stop.is_cancelled() {
                        *slot = Some(f);
                    }
                    stop.cancel();
                    Vec::new()
                }
            }
        }
    });
    let ended = async {
        stop.cancelled().await;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            backstop_dump::admin::terminate_sessions(target, app),
        )
        .await;
        tokio::time::sleep(WIND_DOWN).await;
    };
    let made = tokio::select! {
        made = futures::future::join_all(watched) => made,
        () = ended => Vec::new(),
    };
    match first
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(f) => Err(f),
        None if stop.is_cancelled() => Err(Failure::Stopped),
        None => Ok(made.into_iter().flatten().collect()),
    }
}

type Lane<'a> = Pin<Box<dyn Future<Output = Result<Vec<Made>, Failure>> + Send + 'a>>;

/// pg_dump's arguments for one section (or the rest of the data) in `snapshot`.
fn section_args(job: &JobConfig, snapshot: &str, section: &str) -> Vec<String> {
    let options = backstop_dump::DumpOptions {
        format: DumpFormat::Custom,
        scope: backstop_config::Scope::Full,
        filters: job.filters.clone(),
        lock_wait_timeout: job.lock_wait_timeout,
    };
    let mut args = options.args(snapshot);
    args.push(format!("--section={section}"));
    args
}

/// A table whose rows the rest of the data section holds although a data
/// stream copies it (an exclusion pattern that did not match).
fn copied_twice(stats: &StreamStats, copied: &[DataTable]) -> Option<String> {
    let Some(Ok(rows)) = &stats.rows else {
        return None;
    };
    copied
        .iter()
        .find(|t| rows.contains_key(&(t.schema.clone(), t.name.clone())))
        .map(|t| format!("{}.{}", t.schema, t.name))
}

/// `--exclude-table-data` patterns matching exactly these tables (quoted,
/// so case and every character are literal).
fn exclude_data_of(tables: &[DataTable]) -> Vec<String> {
    let pattern = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    tables
        .iter()
        .map(|t| {
            format!(
                "--exclude-table-data={}.{}",
                pattern(&t.schema),
                pattern(&t.name)
            )
        })
        .collect()
}

impl Lanes<'_> {
    /// The application name of lane `n`'s sessions (0: the schema lane;
    /// the data streams from 1).
    fn lane_app(&self, n: usize) -> String {
        format!("{}-{n:02}", self.app)
    }

    /// Runs one dump tool into every store as artifact `file`, under a
    /// `max_source_connections` permit.
    async fn artifact(
        &self,
        app: &str,
        tool: DumpTool,
        file: &str,
        start: impl FnOnce() -> Result<(DumpChild, std::fs::File), DumpError>,
        counter: Option<RowCounter>,
    ) -> Result<StreamStats, Failure> {
        let permit = tokio::select! {
            p = sources::permit(self.job, self.target) => p,
            () = self.stop.cancelled() => return Err(Failure::Stopped),
        };
        if self.stop.is_cancelled() {
            return Err(Failure::Stopped);
        }
        let (child, stdout) =
            start().map_err(|e| Failure::Now(BackupError::at(Step::Dump(tool), e)))?;
        let dumping = Dumping {
            tool,
            child,
            stdout,
            target: self.target,
            app,
            permit,
        };
        let (settle, produced) = stream_to(
            self.job,
            self.targets,
            self.backup_id,
            file,
            dumping,
            counter,
            self.memory,
        )
        .await
        .map_err(Failure::Now)?;
        let committed = settle.any_committed();
        self.settled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(settle);
        match produced {
            Ok(stats) if committed => Ok(stats),
            other => Err(Failure::Produced(tool, other)),
        }
    }

    /// pre-data, post-data, the rest of the data: pg_dump three times,
    /// the sections first, while they are quick (each pg_dump takes its
    /// locks when it starts, before a DDL statement comes to queue behind
    /// the snapshot's).
    async fn schema_lane(
        &self,
        pg_dump: &PgTool,
        copied: &[DataTable],
    ) -> Result<Vec<Made>, Failure> {
        let job = self.job;
        let app = self.lane_app(0);
        let mut made = Vec::new();
        for kind in ["pre-data", "post-data", "data-rest"] {
            let rest = kind == "data-rest";
            let mut args = section_args(job, self.snapshot, if rest { "data" } else { kind });
            if rest {
                // The patterns are UTF-8, as pg_dump must read them.
                args.push("--encoding=UTF8".into());
                args.extend(exclude_data_of(copied));
            }
            let file = artifact_file(kind, DumpFormat::Custom, job.compression, &job.encryption);
            let stats = self
                .artifact(
                    &app,
                    DumpTool::PgDump,
                    &file,
                    || DumpChild::spawn_as(pg_dump, self.target, &args, &app),
                    rest.then(RowCounter::custom),
                )
                .await?;
            if rest && let Some(twice) = copied_twice(&stats, copied) {
                return Err(Failure::Now(BackupError::said(
                    Step::Dump(DumpTool::PgDump),
                    format!(
                        "pg_dump's data section holds rows of {twice}, which a data stream copies too: the backup would restore them twice, so it is refused (please report this, with the table's name)"
                    ),
                )));
            }
            made.push(Made {
                kind,
                file,
                format: DumpFormat::Custom,
                stats,
                plan: None,
            });
        }
        Ok(made)
    }

    /// One data stream: psql copying `plan`'s pieces.
    async fn data_lane(
        &self,
        psql: &PgTool,
        plan: StreamPlan,
        (stream, streams): (usize, usize),
        tables: &BTreeMap<(String, String), DataTable>,
        encoding: &str,
    ) -> Result<Vec<Made>, Failure> {
        let job = self.job;
        let app = self.lane_app(stream);
        let script = streams::copy_script(
            &plan,
            (stream, streams),
            tables,
            self.snapshot,
            encoding,
            job.lock_wait_timeout,
        );
        let file = artifact_file(
            &format!("data-{stream:02}"),
            DumpFormat::Plain,
            job.compression,
            &job.encryption,
        );
        let counter = (job.row_counts == RowCounts::Exact).then(RowCounter::plain);
        let stats = self
            .artifact(
                &app,
                DumpTool::Psql,
                &file,
                || {
                    DumpChild::spawn_scripted(
                        psql,
                        self.target,
                        &streams::copy_args(),
                        &app,
                        script,
                    )
                },
                counter,
            )
            .await?;
        Ok(vec![Made {
            kind: "data",
            file,
            format: DumpFormat::Plain,
            stats,
            plan: Some(plan),
        }])
    }
}

/// The backup in streams of the job's database in `snapshot` (see the
/// module's doc): its artifacts in restore order, inventory, row counts
/// and source.
pub(super) async fn dump_in_streams(
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
    let (tables, encoding) = snapshot
        .data_tables(&job.filters)
        .await
        .map_err(|e| BackupError::at(Step::Inventory, e))?;
    let psql = find_tool(
        "psql",
        job.pg_dump_path.as_deref(),
        job.pg_bin_dir.as_deref(),
    )
    .await
    .map_err(|e| BackupError::at(Step::Dump(DumpTool::Psql), e))?;
    let app = format!("backstop-pg_dump-{:016x}", rand::random::<u64>());
    snapshot
        .hold(&tables, &app)
        .await
        .map_err(|e| BackupError::at(Step::Inventory, e))?;
    let split = match job.split_tables_larger_than {
        Some(n) if snapshot.server_version_num >= SPLIT_FROM_SERVER => n,
        Some(_) => {
            info!(job = %job.name, "The server predates TID range scans (PostgreSQL 14): no table is split between streams.");
            0
        }
        None => 0,
    };
    let plans = streams::plan(&tables, job.streams as usize, split);
    let by_name: BTreeMap<(String, String), DataTable> = tables
        .iter()
        .map(|t| ((t.schema.clone(), t.name.clone()), t.clone()))
        .collect();
    let lanes = Lanes {
        job,
        targets: &*targets,
        backup_id,
        target,
        app: &app,
        snapshot: &snapshot.id,
        memory: job.lane_budget(),
        settled: Mutex::new(Vec::new()),
        stop: CancellationToken::new(),
    };
    let guard = guard::Guard::start(target, &app, job.lock_guard, &job.name);
    let streams_n = plans.len();
    let mut all: Vec<Lane<'_>> = vec![Box::pin(lanes.schema_lane(pg_dump, &tables))];
    for (i, plan) in plans.into_iter().enumerate() {
        all.push(Box::pin(lanes.data_lane(
            &psql,
            plan,
            (i + 1, streams_n),
            &by_name,
            &encoding,
        )));
    }
    let ran = run_lanes(all, &lanes.stop, target, &app).await;
    let seen = guard.stop();
    let settled = lanes
        .settled
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = source(target, &snapshot, pg_dump);
    let snapshot_id = snapshot.id.clone();
    // Every dump tool has exited (or was killed): the snapshot may end now.
    snapshot.close().await;
    for s in settled {
        s.apply(job, targets);
    }
    if seen.yielded
        && let Some(b) = seen.blocked.last()
    {
        return Err(BackupError::Yielded(guard::describe(b)));
    }
    let made: Vec<Made> = match ran {
        Ok(made) => made,
        Err(Failure::Now(e)) => return Err(e),
        Err(Failure::Stopped) => {
            return Err(BackupError::said(
                Step::Stream,
                "the backup's streams were stopped before they finished",
            ));
        }
        Err(Failure::Produced(tool, produced)) => {
            return Err(match artifact_result(tool, targets, produced) {
                Err(e) => e,
                // Produced well, but no store took it.
                Ok(_) => super::fan_out::first_failure(targets),
            });
        }
    };
    let (artifacts, row_counts) = describe(job, backup_id, made, &mut inventory);
    Ok(Dumped {
        artifacts,
        inventory,
        row_counts,
        source,
        snapshot_id,
        lock_blocks: seen.blocked.len() as u32,
    })
}

/// The manifest's artifacts in restore order (pre-data, the data streams,
/// the rest of the data, post-data), each data artifact with its tables,
/// and the inventory's row counts: each table's rows added up over the
/// streams that hold its parts.
fn describe(
    job: &JobConfig,
    backup_id: &str,
    mut made: Vec<Made>,
    inventory: &mut backstop_dump::Inventory,
) -> (Vec<Artifact>, RowCounts) {
    let order = |k: &str| match k {
        "pre-data" => 0,
        "data" => 1,
        "data-rest" => 2,
        _ => 3,
    };
    made.sort_by(|a, b| (order(a.kind), &a.file).cmp(&(order(b.kind), &b.file)));
    // Only the data streams' rows are counted (the rest of the data holds
    // just extension configuration tables' rows).
    let mut counted: Option<RowCountMap> =
        (job.row_counts == RowCounts::Exact).then(Default::default);
    let mut artifacts = Vec::new();
    for m in made {
        let mut a = make_artifact(job, backup_id, m.kind, m.format, &m.file, &m.stats);
        if let Some(plan) = &m.plan {
            let rows = match &m.stats.rows {
                Some(Ok(r)) => Some(r),
                Some(Err(why)) => {
                    warn!(job = %job.name, artifact = %m.file, reason = %why,
                        "Could not count rows in a data stream; recording pg_class estimates instead.");
                    counted = None;
                    None
                }
                None => None,
            };
            a.tables = tables_of(plan, rows);
            if let (Some(total), Some(rows)) = (counted.as_mut(), rows) {
                for (table, n) in rows {
                    *total.entry(table.clone()).or_insert(0) += n;
                }
            }
        }
        artifacts.push(a);
    }
    let row_counts = match (job.row_counts, counted) {
        (RowCounts::Off, _) => {
            inventory.per_table.iter_mut().for_each(|t| t.rows = None);
            RowCounts::Off
        }
        (RowCounts::Exact, Some(total)) => {
            for t in &mut inventory.per_table {
                t.rows = Some(
                    *total
                        .get(&streams::counted_as(&t.schema, &t.name))
                        .unwrap_or(&0),
                );
            }
            RowCounts::Exact
        }
        _ => RowCounts::Estimate,
    };
    (artifacts, row_counts)
}

/// A data artifact's tables, in the order of its pieces, with the parts
/// it holds of each and (counted) their rows.
fn tables_of(plan: &StreamPlan, rows: Option<&RowCountMap>) -> Vec<ArtifactTable> {
    let mut out: Vec<ArtifactTable> = Vec::new();
    for p in &plan.pieces {
        match out
            .iter_mut()
            .find(|t| t.schema == p.schema && t.name == p.name)
        {
            Some(t) => t.parts.push(p.part),
            None => out.push(ArtifactTable {
                schema: p.schema.clone(),
                name: p.name.clone(),
                parts: vec![p.part],
                of: p.parts,
                rows: rows.map(|r| {
                    *r.get(&streams::counted_as(&p.schema, &p.name))
                        .unwrap_or(&0)
                }),
            }),
        }
    }
    for t in &mut out {
        t.parts.sort_unstable();
    }
    out
}
