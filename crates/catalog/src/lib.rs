//! Run history: every backup attempt (job, kind, start, end, outcome, error,
//! bytes) recorded through sqlx, in a SQLite file by default or in a
//! PostgreSQL database several backstop processes share (a fleet, whose
//! coordination lives in [`fleet`]).
//!
//! The store stays the source of truth for which backups exist; the catalog
//! records what was attempted and how it went.
//!
//! Both backends run the same SQL for what they share (`$N` placeholders,
//! RFC 3339 text timestamps, `CAST` rather than `::`). Against PostgreSQL
//! every operation is one short transaction of unnamed statements, so the
//! catalog works behind a transaction pooler (PgBouncer in transaction
//! mode), which would strand named prepared statements and session state.
//!
//! Length: one method per question asked of the catalog, and its unit tests.

mod pg;

pub mod fleet;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Row;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

pub use pg::{SchemaState, pg_url_has_password};

/// Why the catalog could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "cannot open catalog {url}: {reason} (check daemon.catalog and the directory's permissions)"
    )]
    Open { url: String, reason: String },
    #[error("catalog migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("catalog query failed: {0}")]
    Query(#[from] sqlx::Error),
    /// No connection to a PostgreSQL catalog came in time, and why.
    #[error("no connection to the catalog {url} within {waited} s: {reason}")]
    NoConnection {
        url: String,
        waited: u64,
        reason: String,
    },
    /// The PostgreSQL catalog's schema is not the one this backstop uses.
    #[error("{0}")]
    Schema(String),
    /// What needs a shared (PostgreSQL) catalog was asked of a SQLite one.
    #[error(
        "{0} needs a PostgreSQL catalog (daemon.catalog = \"postgres://…\"); a SQLite catalog serves one host"
    )]
    NotShared(&'static str),
}

pub use backstop_vocab::{Claim, Outcome, RunKind};

/// One recorded run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub kind: RunKind,
    pub backup_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// None while the run is going (or waits to be claimed: see `pending`).
    pub outcome: Option<Outcome>,
    /// Waiting in a shared catalog for a node to claim it.
    pub pending: bool,
    pub error: Option<String>,
    pub dump_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    /// The tick it was scheduled for (a shared catalog's scheduled runs).
    pub scheduled_for: Option<DateTime<Utc>>,
    /// The node holding (or last holding) it, in a shared catalog.
    pub node: Option<String>,
    /// Rebuilt from the stores rather than recorded as it ran.
    pub imported: bool,
    /// A verification's level (`listing`, `checksum`, `restore`, `drill`).
    pub level: Option<String>,
}

/// A run rebuilt from a store: a backup from its manifest, a verification
/// from its record.
#[derive(Debug, Clone)]
pub struct ImportedRun<'a> {
    pub job: &'a str,
    pub kind: RunKind,
    pub backup_id: &'a str,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: Outcome,
    pub error: Option<&'a str>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// A verification's level and the store it read.
    pub level: Option<&'a str>,
    pub store: Option<&'a str>,
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct RunResult<'a> {
    pub error: Option<&'a str>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
}

/// The latest verification of one backup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verification {
    pub level: String,
    pub ok: bool,
    pub at: DateTime<Utc>,
}

/// The SQLite catalog's migrations, in order: (version, description, SQL).
/// Versions and descriptions are those `sqlx::migrate!` derives from the
/// file names, and the checksums are sqlx's own, so catalogs created by
/// earlier versions (which used the macro) open unchanged; a test checks
/// this against the macro. Built by hand so the build needs no sqlx
/// macros (their host copies of both database drivers and of SQLite cost
/// minutes of a cold build).
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "runs",
        include_str!("../migrations/sqlite/0001_runs.sql"),
    ),
    (
        2,
        "uploads",
        include_str!("../migrations/sqlite/0002_uploads.sql"),
    ),
    (
        3,
        "verifications",
        include_str!("../migrations/sqlite/0003_verifications.sql"),
    ),
    (
        4,
        "daemon",
        include_str!("../migrations/sqlite/0004_daemon.sql"),
    ),
    (
        5,
        "fleet",
        include_str!("../migrations/sqlite/0005_fleet.sql"),
    ),
    (
        6,
        "imported",
        include_str!("../migrations/sqlite/0006_imported.sql"),
    ),
    (
        7,
        "replay pauses",
        include_str!("../migrations/sqlite/0007_replay_pauses.sql"),
    ),
    (
        8,
        "imported unique",
        include_str!("../migrations/sqlite/0008_imported_unique.sql"),
    ),
    (
        9,
        "history",
        include_str!("../migrations/sqlite/0009_history.sql"),
    ),
    (
        10,
        "drills",
        include_str!("../migrations/sqlite/0010_drills.sql"),
    ),
    (
        11,
        "backups",
        include_str!("../migrations/sqlite/0011_backups.sql"),
    ),
];

fn migrator(migrations: &[(i64, &str, &'static str)]) -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr;
    sqlx::migrate::Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                sqlx::migrate::Migration::new(
                    version,
                    description.to_string().into(),
                    sqlx::migrate::MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

#[derive(Debug, Clone)]
enum Db {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

/// The run catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    db: Db,
    /// The fleet node this process registered as, if any: the runs it
    /// records are its own, so they are reaped if it dies.
    node: Arc<RwLock<Option<String>>>,
    /// A PostgreSQL catalog's pool of one connection for a fleet node's
    /// heartbeat (one of `daemon.catalog_connections`; connected when first
    /// used), so run bookkeeping that holds every other connection cannot
    /// hold up the lease.
    beat: Option<PgPool>,
}

/// Runs `$body` with `$c` bound to a connection: a pooled SQLite connection,
/// or a short PostgreSQL transaction (committed when the body succeeds).
/// The body is compiled once per backend, so it must be valid for both.
macro_rules! with_conn {
    ($self:expr, |$c:ident| $body:expr) => {
        match &$self.db {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let $c = &mut *conn;
                $body
            }
            Db::Pg(pool) => {
                let mut tx = pg::begin(pool).await?;
                let out = {
                    let $c = &mut *tx;
                    $body
                };
                tx.commit().await?;
                out
            }
        }
    };
}

/// The [`RunRecord`] in row `$r` (of either backend) holding the columns
/// of `runs` by name; None for a kind this version does not know.
macro_rules! run_record {
    ($r:expr) => {{
        let r = &$r;
        let outcome: String = r.get("outcome");
        Some(crate::RunRecord {
            id: r.get("id"),
            job: r.get("job"),
            kind: crate::RunKind::parse(r.get::<String, _>("kind").as_str())?,
            backup_id: r.get("backup_id"),
            started_at: crate::parse_ts(&r.get::<String, _>("started_at")),
            finished_at: r
                .get::<Option<String>, _>("finished_at")
                .as_deref()
                .map(crate::parse_ts),
            outcome: (outcome != "running" && outcome != "pending")
                .then(|| crate::Outcome::parse(&outcome).unwrap_or(crate::Outcome::Failed)),
            pending: outcome == "pending",
            error: r.get("error"),
            dump_bytes: r.get("dump_bytes"),
            stored_bytes: r.get("stored_bytes"),
            scheduled_for: r
                .get::<Option<String>, _>("scheduled_for")
                .as_deref()
                .map(crate::parse_ts),
            node: r.get("node"),
            imported: r.get("imported"),
            level: r.get("level"),
        })
    }};
}

mod status;

pub use status::{BackupInStore, JobFacts};

pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn parse_ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

/// A run as this catalog recorded it live ([`Catalog::own_runs_of_backup`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnRun {
    pub kind: RunKind,
    pub outcome: Outcome,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    /// A verification's level.
    pub level: Option<String>,
    /// A verification's store.
    pub store: Option<String>,
    pub finished_at: DateTime<Utc>,
}

/// How to reach the catalog: its URL, and the password of a PostgreSQL
/// catalog (from a file or the environment; never in the URL).
#[derive(Clone, Copy)]
pub struct Location<'a> {
    pub url: &'a str,
    pub password: Option<&'a str>,
    /// The most connections a PostgreSQL catalog's pool opens (default 4,
    /// as `daemon.catalog_connections`:
    /// each operation holds one for a short transaction).
    pub pool_size: u32,
}

impl<'a> Location<'a> {
    pub fn new(url: &'a str, password: Option<&'a str>) -> Self {
        Self {
            url,
            password,
            pool_size: 4,
        }
    }

    pub fn with_pool_size(self, pool_size: u32) -> Self {
        Self {
            pool_size: pool_size.max(1),
            ..self
        }
    }

    pub fn is_postgres(&self) -> bool {
        is_postgres_url(self.url)
    }
}

/// Whether `url` names a PostgreSQL catalog.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Catalog {
    /// Opens the catalog. A SQLite file is created if needed and migrated;
    /// a PostgreSQL catalog must already have the schema this version uses
    /// (`backstop migrate` applies it), or the error says what to run.
    ///
    /// # Errors
    /// [`CatalogError::Open`] when it cannot be reached or created,
    /// [`CatalogError::Schema`] when a PostgreSQL schema is older or newer.
    pub async fn open(at: Location<'_>) -> Result<Self, CatalogError> {
        let (db, beat) = if at.is_postgres() {
            // One of the connections is the heartbeat's (when there are two).
            let shared = at.pool_size > 1;
            let main = at.with_pool_size(at.pool_size - u32::from(shared));
            let pool = pg::connect(main).await?;
            pg::check_schema(&pool, at.url).await?;
            let beat = shared.then(|| pg::side_pool(&pool, 1));
            (Db::Pg(pool), beat)
        } else {
            (Db::Sqlite(open_sqlite(at.url).await?), None)
        };
        Ok(Self {
            db,
            node: Arc::new(RwLock::new(None)),
            beat,
        })
    }

    /// Applies the catalog's migrations (`backstop migrate`) and returns the
    /// schema state before and after. Run it on a direct connection, not
    /// through a transaction pooler: migrations take a session lock.
    ///
    /// # Errors
    /// When the catalog cannot be reached or a migration fails.
    pub async fn migrate(at: Location<'_>) -> Result<(SchemaState, SchemaState), CatalogError> {
        if at.is_postgres() {
            pg::migrate(at).await
        } else {
            let before = SchemaState::Current(SQLITE_MIGRATIONS.len() as i64);
            open_sqlite(at.url).await?.close().await;
            Ok((before, before))
        }
    }

    /// This catalog on its heartbeat's own connection (see `beat`), or
    /// on the same pool when it has a single connection. None for SQLite.
    pub fn heartbeat(&self) -> Option<Self> {
        let Db::Pg(main) = &self.db else {
            return None;
        };
        Some(Self {
            db: Db::Pg(self.beat.clone().unwrap_or_else(|| main.clone())),
            node: self.node.clone(),
            beat: None,
        })
    }

    /// Whether several processes share this catalog (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Pg(_))
    }

    pub(crate) fn pg(&self, what: &'static str) -> Result<&PgPool, CatalogError> {
        match &self.db {
            Db::Pg(p) => Ok(p),
            Db::Sqlite(_) => Err(CatalogError::NotShared(what)),
        }
    }

    /// The fleet node this process records its runs as (None: by pid only).
    pub fn set_node(&self, node: Option<String>) {
        *self
            .node
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = node;
    }

    pub(crate) fn node(&self) -> Option<String> {
        self.node
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Checkpoints a SQLite write-ahead log into the database file and
    /// closes every connection, so what this process wrote is in
    /// `catalog.db` itself (and the `-wal` file is gone) when it exits: a
    /// copy or a scan of the file sees every row. Errors are ignored: the
    /// rows are safe in the WAL either way, and SQLite replays it on the
    /// next open.
    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite(pool) => {
                let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(pool)
                    .await;
                pool.close().await;
            }
            Db::Pg(pool) => pool.close().await,
        }
    }

    /// Records the start of a run and returns its id.
    ///
    /// # Errors
    /// A database error.
    pub async fn start_run(
        &self,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        started_at: DateTime<Utc>,
    ) -> Result<i64, CatalogError> {
        let node = self.node();
        let id: i64 = with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO runs (job, kind, backup_id, started_at, outcome, pid, node) VALUES ($1, $2, $3, $4, 'running', $5, $6) RETURNING id",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .bind(backup_id)
            .bind(ts(started_at))
            .bind(i64::from(std::process::id()))
            .bind(node.as_deref())
            .fetch_one(&mut *c)
            .await?
            .get(0)
        });
        Ok(id)
    }

    /// Records how run `id` ended.
    ///
    /// # Errors
    /// A database error.
    pub async fn finish_run(
        &self,
        id: i64,
        outcome: Outcome,
        finished_at: DateTime<Utc>,
        result: &RunResult<'_>,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "UPDATE runs SET outcome = $1, finished_at = $2, error = $3, dump_bytes = $4, stored_bytes = $5 WHERE id = $6",
            )
            .persistent(false)
            .bind(outcome.as_str())
            .bind(ts(finished_at))
            .bind(result.error)
            .bind(result.dump_bytes.map(|b| b as i64))
            .bind(result.stored_bytes.map(|b| b as i64))
            .bind(id)
            .execute(&mut *c)
            .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Marks runs left `running` by processes that no longer exist as
    /// `interrupted` and returns them (job, kind, backup id). In a SQLite
    /// catalog a process is known by its pid on this host; a shared catalog
    /// knows its processes by their leases instead (see [`fleet`]), so this
    /// finds nothing there.
    ///
    /// # Errors
    /// A database error.
    pub async fn interrupt_orphaned_runs(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, RunKind, Option<String>)>, CatalogError> {
        let Db::Sqlite(pool) = &self.db else {
            return Ok(Vec::new());
        };
        // id, job, kind, backup id, pid
        type Open = (i64, String, String, Option<String>, Option<i64>);
        let rows: Vec<Open> = sqlx::query_as(
            "SELECT id, job, kind, backup_id, pid FROM runs WHERE outcome = 'running'",
        )
        .fetch_all(pool)
        .await?;
        let mut out = Vec::new();
        for (id, job, kind, backup_id, pid) in rows {
            if pid.is_some_and(pid_alive) {
                continue;
            }
            sqlx::query(
                "UPDATE runs SET outcome = 'interrupted', finished_at = ?, error = ? WHERE id = ? AND outcome = 'running'",
            )
            .bind(ts(now))
            .bind("backstop stopped while this run was going (crash, SIGKILL or power loss)")
            .bind(id)
            .execute(pool)
            .await?;
            if let Some(kind) = RunKind::parse(&kind) {
                out.push((job, kind, backup_id));
            }
        }
        Ok(out)
    }

    /// When `job` last completed a run of `kind` successfully.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<DateTime<Utc>>, CatalogError> {
        let row: Option<(String,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT finished_at FROM runs WHERE job = $1 AND kind = $2 AND outcome = 'success' AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|r| parse_ts(&r.0)))
    }

    /// When `job` last finished a run of `kind` with `outcome` (e.g. failed).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_finished(
        &self,
        job: &str,
        kind: RunKind,
        outcome: Outcome,
    ) -> Result<Option<(DateTime<Utc>, Option<i64>, Option<i64>)>, CatalogError> {
        let row: Option<(String, Option<i64>, Option<i64>)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT finished_at, dump_bytes, stored_bytes FROM runs WHERE job = $1 AND kind = $2 AND outcome = $3 AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .bind(outcome.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|(t, d, s)| (parse_ts(&t), d, s)))
    }

    /// The outcome of the latest finished run of `kind` of `job`, leaving out
    /// interrupted and skipped ones (a shutdown or a missed tick says
    /// nothing of the job's health): what tells a recovery from an ordinary
    /// success.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_outcome(
        &self,
        job: &str,
        kind: RunKind,
    ) -> Result<Option<Outcome>, CatalogError> {
        let row: Option<(String,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT outcome FROM runs WHERE job = $1 AND kind = $2 AND finished_at IS NOT NULL AND outcome NOT IN ('interrupted', 'running', 'pending', 'skipped') ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .bind(kind.as_str())
            .fetch_optional(&mut *c)
            .await?
        });
        // A value this version does not know is reported as a failure.
        Ok(row.map(|r| Outcome::parse(&r.0).unwrap_or(Outcome::Failed)))
    }

    /// Takes the per-job lock for this process. Returns who holds it
    /// instead ("pid 123", or a fleet node); a SQLite lock of a dead
    /// process is taken over. A shared catalog has no lock rows: a backup
    /// there is a claimed run, and [`fleet`] refuses a second one.
    ///
    /// # Errors
    /// A database error.
    pub async fn lock_job(&self, job: &str) -> Result<Result<(), String>, CatalogError> {
        let pool = match &self.db {
            Db::Sqlite(pool) => pool,
            Db::Pg(_) => return Ok(Ok(())),
        };
        let me = i64::from(std::process::id());
        for _ in 0..2 {
            let taken = sqlx::query(
                "INSERT INTO job_locks (job, pid, acquired_at) VALUES (?, ?, ?) ON CONFLICT (job) DO NOTHING",
            )
            .bind(job)
            .bind(me)
            .bind(ts(Utc::now()))
            .execute(pool)
            .await?
            .rows_affected();
            if taken == 1 {
                return Ok(Ok(()));
            }
            let holder: Option<(i64,)> = sqlx::query_as("SELECT pid FROM job_locks WHERE job = ?")
                .bind(job)
                .fetch_optional(pool)
                .await?;
            match holder {
                Some((pid,)) if pid != me && pid_alive(pid) => {
                    return Ok(Err(format!("pid {pid}")));
                }
                Some((pid,)) => {
                    sqlx::query("DELETE FROM job_locks WHERE job = ? AND pid = ?")
                        .bind(job)
                        .bind(pid)
                        .execute(pool)
                        .await?;
                }
                None => {}
            }
        }
        Ok(Err("another process".into()))
    }

    /// Releases this process's lock on `job`.
    ///
    /// # Errors
    /// A database error.
    pub async fn unlock_job(&self, job: &str) -> Result<(), CatalogError> {
        if let Db::Sqlite(pool) = &self.db {
            sqlx::query("DELETE FROM job_locks WHERE job = ? AND pid = ?")
                .bind(job)
                .bind(i64::from(std::process::id()))
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Whether the catalog answers (for /readyz).
    ///
    /// # Errors
    /// A database error.
    pub async fn ping(&self) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("SELECT 1")
                .persistent(false)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Records what verify run `id` checks: its level and the store read.
    ///
    /// # Errors
    /// A database error.
    pub async fn set_verify_scope(
        &self,
        id: i64,
        level: &str,
        store: &str,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("UPDATE runs SET level = $1, store = $2 WHERE id = $3")
                .persistent(false)
                .bind(level)
                .bind(store)
                .bind(id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The latest finished verification of each of `job`'s backups in `store`,
    /// keyed by backup id.
    ///
    /// # Errors
    /// A database error.
    pub async fn last_verifications(
        &self,
        job: &str,
        store: &str,
    ) -> Result<HashMap<String, Verification>, CatalogError> {
        // backup id, level, outcome, finished at
        type Row = (String, Option<String>, String, String);
        let rows: Vec<Row> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT backup_id, level, outcome, finished_at FROM runs
                 WHERE job = $1 AND kind = 'verify' AND store = $2 AND finished_at IS NOT NULL
                   AND backup_id IS NOT NULL AND outcome IN ('success', 'failed')
                 ORDER BY id",
            )
            .persistent(false)
            .bind(job)
            .bind(store)
            .fetch_all(&mut *c)
            .await?
        });
        let mut out = HashMap::new();
        for (backup_id, level, outcome, finished_at) in rows {
            out.insert(
                backup_id,
                Verification {
                    level: level.unwrap_or_default(),
                    ok: outcome == "success",
                    at: parse_ts(&finished_at),
                },
            );
        }
        Ok(out)
    }

    /// The runs this catalog recorded as they happened (not imported from a
    /// store) of `series`'s backup `backup_id`: the backup itself and its
    /// verifications. What `backstop sign` holds a manifest and its
    /// records against before vouching for them.
    ///
    /// # Errors
    /// A database error.
    pub async fn own_runs_of_backup(
        &self,
        series: &str,
        backup_id: &str,
    ) -> Result<Vec<OwnRun>, CatalogError> {
        // kind, outcome, dump bytes, stored bytes, level, store, finished at
        type Row = (
            String,
            String,
            Option<i64>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT kind, outcome, dump_bytes, stored_bytes, level, store, finished_at FROM runs
                 WHERE job = $1 AND backup_id = $2 AND NOT imported AND finished_at IS NOT NULL
                 ORDER BY id",
            )
            .persistent(false)
            .bind(series)
            .bind(backup_id)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(kind, outcome, dump, stored, level, store, finished)| {
                Some(OwnRun {
                    kind: RunKind::parse(&kind)?,
                    outcome: Outcome::parse(&outcome)?,
                    dump_bytes: dump.map(|b| b as u64),
                    stored_bytes: stored.map(|b| b as u64),
                    level,
                    store,
                    finished_at: parse_ts(&finished?),
                })
            })
            .collect())
    }

    /// Records a run rebuilt from a store, unless the catalog already has
    /// it: a backup by (job, backup id) whatever its outcome, a verification by (job, backup
    /// id, level, store, finish). Returns whether it was added.
    ///
    /// # Errors
    /// A database error.
    pub async fn import_run(&self, r: &ImportedRun<'_>) -> Result<bool, CatalogError> {
        Ok(self.import_runs(std::slice::from_ref(r)).await? == 1)
    }

    /// [`Catalog::import_run`] for many, in one transaction (a rebuild of
    /// thousands of backups is otherwise thousands of commits). Returns how
    /// many were added.
    ///
    /// # Errors
    /// A database error (nothing of the batch is recorded).
    pub async fn import_runs(&self, runs: &[ImportedRun<'_>]) -> Result<usize, CatalogError> {
        macro_rules! import {
            ($tx:expr, $r:expr) => {
                sqlx::query(
                    "INSERT INTO runs (job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, level, store, imported)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
                     WHERE NOT EXISTS (
                         SELECT 1 FROM runs WHERE job = $1 AND kind = $2 AND backup_id = $3
                            AND ($2 = 'backup'
                              OR ($2 = 'verify' AND level = $10 AND store = $11 AND finished_at = $5)))
                     ON CONFLICT DO NOTHING",
                )
                .persistent(false)
                .bind($r.job)
                .bind($r.kind.as_str())
                .bind($r.backup_id)
                .bind(ts($r.started_at))
                .bind(ts($r.finished_at))
                .bind($r.outcome.as_str())
                .bind($r.error)
                .bind($r.dump_bytes.map(|b| b as i64))
                .bind($r.stored_bytes.map(|b| b as i64))
                .bind($r.level)
                .bind($r.store)
                .bind(true)
                .execute(&mut *$tx)
                .await?
                .rows_affected()
            };
        }
        let mut added = 0u64;
        match &self.db {
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for r in runs {
                    added += import!(tx, r);
                }
                tx.commit().await?;
            }
            Db::Pg(pool) => {
                let mut tx = pg::begin(pool).await?;
                for r in runs {
                    added += import!(tx, r);
                }
                tx.commit().await?;
            }
        }
        Ok(added as usize)
    }

    /// Whether the catalog has no record of any finished backup (a new or
    /// lost catalog, which the daemon rebuilds from the stores).
    ///
    /// # Errors
    /// A database error.
    pub async fn has_no_backups(&self) -> Result<bool, CatalogError> {
        let row: Option<(i64,)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT id FROM runs WHERE kind = 'backup' AND finished_at IS NOT NULL LIMIT 1",
            )
            .persistent(false)
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.is_none())
    }

    /// The latest successful restore drill of `job`: when it started and
    /// finished (its duration is the measured restore time).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_drill(
        &self,
        job: &str,
    ) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>, CatalogError> {
        let row: Option<(String, String)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT started_at, finished_at FROM runs WHERE job = $1 AND kind = 'verify' AND level = 'drill' AND outcome = 'success' AND finished_at IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .persistent(false)
            .bind(job)
            .fetch_optional(&mut *c)
            .await?
        });
        Ok(row.map(|(s, f)| (parse_ts(&s), parse_ts(&f))))
    }

    /// Deletes at most `limit` runs that ended before `before`, oldest
    /// first (a fleet's attempts go with them): never a pending or running
    /// one, and never a job's newest run of its kind, outcome and level
    /// (its last success, last failure, last drill…), which status, the
    /// metrics and a fleet's catch-up read however old it is. Returns how
    /// many were deleted; fewer than `limit` means none is left.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_history(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, CatalogError> {
        let deleted = with_conn!(self, |c| {
            sqlx::query(
                "DELETE FROM runs WHERE id IN (
                     SELECT r.id FROM runs r
                     WHERE r.started_at < $1
                       AND r.outcome NOT IN ('pending', 'running')
                       AND (r.finished_at IS NULL OR r.finished_at < $1)
                       AND EXISTS (SELECT 1 FROM runs n
                                   WHERE n.job = r.job AND n.kind = r.kind AND n.outcome = r.outcome
                                     AND n.level IS NOT DISTINCT FROM r.level AND n.id > r.id)
                     ORDER BY r.started_at LIMIT $2)",
            )
            .persistent(false)
            .bind(ts(before))
            .bind(i64::from(limit))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(deleted)
    }

    /// The series recorded under cluster job `job` (`<job>/<segment>`).
    ///
    /// # Errors
    /// A database error.
    pub async fn series_of(&self, job: &str) -> Result<Vec<String>, CatalogError> {
        let rows: Vec<(String,)> = with_conn!(self, |c| {
            // A walk of the index over the range `job/` .. `job0` ('0'
            // follows '/'), one step per series, not per run.
            sqlx::query_as(
                "WITH RECURSIVE s(job) AS (
                     SELECT min(job) FROM runs WHERE job > $1 || '/' AND job < $1 || '0'
                     UNION ALL
                     SELECT (SELECT min(job) FROM runs WHERE job > s.job AND job < $1 || '0')
                     FROM s WHERE s.job IS NOT NULL
                 )
                 SELECT job FROM s WHERE job IS NOT NULL ORDER BY job",
            )
            .persistent(false)
            .bind(job)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// The most recent runs, newest first, optionally for one job.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_runs(
        &self,
        job: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(job, None, limit, true).await
    }

    /// [`Self::recent_runs`] without the skipped ticks (a fleet's missed
    /// or superseded ones, which are not runs): the window status and the
    /// status page show, which skipped ticks would otherwise fill.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_runs_done(
        &self,
        job: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(job, None, limit, false).await
    }

    /// The newest backup runs of `job` that were runs (not skipped ticks),
    /// newest first: its last backup and its recent sizes, for status.
    ///
    /// # Errors
    /// A database error.
    pub async fn recent_backups(
        &self,
        job: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        self.runs_window(Some(job), Some(RunKind::Backup), limit, false)
            .await
    }

    async fn runs_window(
        &self,
        job: Option<&str>,
        kind: Option<RunKind>,
        limit: u32,
        skipped: bool,
    ) -> Result<Vec<RunRecord>, CatalogError> {
        // `job = $1` spelled out when there is a job: behind an OR the
        // planner cannot use the (job, id) index and walks every run.
        let sql = match job {
            Some(_) => {
                "SELECT id, job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, scheduled_for, node, imported, level
                 FROM runs WHERE job = $1 AND ($3 OR outcome <> 'skipped')
                   AND (CAST($4 AS TEXT) IS NULL OR kind = $4)
                 ORDER BY id DESC LIMIT $2"
            }
            None => {
                "SELECT id, job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes, scheduled_for, node, imported, level
                 FROM runs WHERE CAST($1 AS TEXT) IS NULL AND ($3 OR outcome <> 'skipped')
                   AND (CAST($4 AS TEXT) IS NULL OR kind = $4)
                 ORDER BY id DESC LIMIT $2"
            }
        };
        let rows = with_conn!(self, |c| {
            sqlx::query(sql)
                .persistent(false)
                .bind(job)
                .bind(i64::from(limit))
                .bind(skipped)
                .bind(kind.map(RunKind::as_str))
                .fetch_all(&mut *c)
                .await?
                .into_iter()
                .filter_map(|r| run_record!(r))
                .collect::<Vec<_>>()
        });
        Ok(rows)
    }
}

async fn open_sqlite(url: &str) -> Result<SqlitePool, CatalogError> {
    let open_err = |reason: String| CatalogError::Open {
        url: url.to_string(),
        reason,
    };
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| open_err(e.to_string()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(10));
    let file = opts.get_filename().to_path_buf();
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir).map_err(|e| open_err(format!("{}: {e}", dir.display())))?;
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .map_err(|e| open_err(e.to_string()))?;
    migrator(SQLITE_MIGRATIONS).run(&pool).await?;
    Ok(pool)
}

/// A multipart upload recorded as in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedUpload {
    pub store: String,
    pub key: String,
    pub upload_id: String,
}

impl Catalog {
    /// Records that a multipart upload was started.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_upload(
        &self,
        store: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO multipart_uploads (store, key, upload_id, started_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (store, upload_id) DO UPDATE SET key = excluded.key, started_at = excluded.started_at",
            )
            .persistent(false)
            .bind(store)
            .bind(key)
            .bind(upload_id)
            .bind(ts(Utc::now()))
            .execute(&mut *c)
            .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Forgets an upload that was completed or aborted.
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_upload(&self, store: &str, upload_id: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM multipart_uploads WHERE store = $1 AND upload_id = $2")
                .persistent(false)
                .bind(store)
                .bind(upload_id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// Uploads recorded as in flight in `store` whose key starts with `prefix`.
    ///
    /// # Errors
    /// A database error.
    pub async fn recorded_uploads(
        &self,
        store: &str,
        prefix: &str,
    ) -> Result<Vec<RecordedUpload>, CatalogError> {
        let rows: Vec<(String, String, String)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT store, key, upload_id FROM multipart_uploads WHERE store = $1 AND substr(key, 1, length(CAST($2 AS TEXT))) = $2 ORDER BY started_at",
            )
            .persistent(false)
            .bind(store)
            .bind(prefix)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(store, key, upload_id)| RecordedUpload {
                store,
                key,
                upload_id,
            })
            .collect())
    }
}

impl Catalog {
    /// Records that a backup of `job` paused its standby's WAL replay.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_replay_pause(&self, job: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO replay_pauses (job, paused_at) VALUES ($1, $2)
                 ON CONFLICT (job) DO UPDATE SET paused_at = excluded.paused_at",
            )
            .persistent(false)
            .bind(job)
            .bind(ts(Utc::now()))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Forgets the pause of `job`'s standby (replay was resumed).
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_replay_pause(&self, job: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM replay_pauses WHERE job = $1")
                .persistent(false)
                .bind(job)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The jobs whose standby a backup paused and did not resume.
    ///
    /// # Errors
    /// A database error.
    pub async fn replay_pauses(&self) -> Result<Vec<String>, CatalogError> {
        let rows: Vec<(String,)> = with_conn!(self, |c| {
            sqlx::query_as("SELECT job FROM replay_pauses ORDER BY job")
                .persistent(false)
                .fetch_all(&mut *c)
                .await?
        });
        Ok(rows.into_iter().map(|(j,)| j).collect())
    }
}

/// Whether a process with `pid` exists on this host.
fn pid_alive(pid: i64) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Catalog {
        fn sqlite_pool(&self) -> &SqlitePool {
            match &self.db {
                Db::Sqlite(p) => p,
                Db::Pg(_) => unreachable!("the unit tests use SQLite"),
            }
        }
    }

    /// The hand-built migrations are exactly what `sqlx::migrate!` makes of
    /// the files (versions, descriptions, checksums), so a catalog created
    /// by an earlier backstop opens without a "migration was modified" error,
    /// and a new file cannot be forgotten in MIGRATIONS.
    #[test]
    fn migrations_match_what_the_macro_makes_of_the_files() {
        let by_macro = sqlx::migrate!("./migrations/sqlite");
        let by_hand = migrator(SQLITE_MIGRATIONS);
        let key = |m: &sqlx::migrate::Migration| {
            (
                m.version,
                m.description.to_string(),
                m.checksum.to_vec(),
                m.no_tx,
                m.migration_type.is_down_migration(),
            )
        };
        let a: Vec<_> = by_macro.iter().map(key).collect();
        let b: Vec<_> = by_hand.iter().map(key).collect();
        assert_eq!(a.len(), 11);
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn records_runs() {
        let dir = std::env::temp_dir().join(format!("backstop-cat-{}", std::process::id()));
        let url = format!("sqlite://{}/sub/catalog.db", dir.display());
        let cat = Catalog::open(Location::new(&url, None)).await.unwrap();
        let t0 = Utc::now();
        let a = cat
            .start_run("app", RunKind::Backup, Some("id-a"), t0)
            .await
            .unwrap();
        let b = cat
            .start_run("other", RunKind::Backup, None, t0)
            .await
            .unwrap();
        cat.finish_run(
            a,
            Outcome::Failed,
            t0,
            &RunResult {
                error: Some("pg_dump exited 1"),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let runs = cat.recent_runs(Some("app"), 10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].outcome, Some(Outcome::Failed));
        assert_eq!(runs[0].error.as_deref(), Some("pg_dump exited 1"));
        let all = cat.recent_runs(None, 10).await.unwrap();
        assert_eq!(all[0].id, b);
        assert_eq!(all[0].outcome, None);
        cat.record_upload("offsite", "app/id/database.dump", "u1")
            .await
            .unwrap();
        cat.record_upload("offsite", "other/id/database.dump", "u2")
            .await
            .unwrap();
        let ups = cat.recorded_uploads("offsite", "app/").await.unwrap();
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].upload_id, "u1");
        cat.forget_upload("offsite", "u1").await.unwrap();
        assert!(
            cat.recorded_uploads("offsite", "app/")
                .await
                .unwrap()
                .is_empty()
        );
        // Reopening runs migrations idempotently.
        drop(cat);
        Catalog::open(Location::new(&url, None)).await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn locks_and_orphaned_runs() {
        let dir = std::env::temp_dir().join(format!("backstop-catl-{}", std::process::id()));
        let url = format!("sqlite://{}/catalog.db", dir.display());
        let cat = Catalog::open(Location::new(&url, None)).await.unwrap();
        assert_eq!(cat.lock_job("app").await.unwrap(), Ok(()));
        // Held by this process: taking it again is fine (same holder).
        assert_eq!(cat.lock_job("app").await.unwrap(), Ok(()));
        // A live other process (pid 1 always exists) holds "db".
        sqlx::query("INSERT INTO job_locks (job, pid, acquired_at) VALUES ('db', 1, 'x')")
            .execute(cat.sqlite_pool())
            .await
            .unwrap();
        assert_eq!(cat.lock_job("db").await.unwrap(), Err("pid 1".into()));
        // A dead process's lock is taken over.
        sqlx::query("INSERT INTO job_locks (job, pid, acquired_at) VALUES ('old', 999999999, 'x')")
            .execute(cat.sqlite_pool())
            .await
            .unwrap();
        assert_eq!(cat.lock_job("old").await.unwrap(), Ok(()));
        cat.unlock_job("app").await.unwrap();
        let n: (i64,) = sqlx::query_as("SELECT count(*) FROM job_locks WHERE job = 'app'")
            .fetch_one(cat.sqlite_pool())
            .await
            .unwrap();
        assert_eq!(n.0, 0);

        // Runs left running: ours stays, a dead process's is interrupted.
        let t0 = Utc::now();
        let mine = cat
            .start_run("app", RunKind::Backup, Some("b1"), t0)
            .await
            .unwrap();
        let theirs = cat
            .start_run("app", RunKind::Backup, Some("b2"), t0)
            .await
            .unwrap();
        sqlx::query("UPDATE runs SET pid = 999999999 WHERE id = ?")
            .bind(theirs)
            .execute(cat.sqlite_pool())
            .await
            .unwrap();
        let cut = cat.interrupt_orphaned_runs(t0).await.unwrap();
        assert_eq!(
            cut,
            vec![("app".into(), RunKind::Backup, Some("b2".into()))]
        );
        let runs = cat.recent_runs(Some("app"), 10).await.unwrap();
        let by_id = |id| runs.iter().find(|r| r.id == id).unwrap().outcome;
        assert_eq!(by_id(mine), None);
        assert_eq!(by_id(theirs), Some(Outcome::Interrupted));
        assert_eq!(
            cat.last_success("app", RunKind::Backup).await.unwrap(),
            None
        );
        // Running and interrupted runs say nothing of the job's health.
        assert_eq!(
            cat.last_outcome("app", RunKind::Backup).await.unwrap(),
            None
        );
        cat.finish_run(mine, Outcome::Success, t0, &RunResult::default())
            .await
            .unwrap();
        assert!(
            cat.last_success("app", RunKind::Backup)
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            cat.last_outcome("app", RunKind::Backup).await.unwrap(),
            Some(Outcome::Success)
        );
        let failed = cat
            .start_run("app", RunKind::Backup, None, t0)
            .await
            .unwrap();
        cat.finish_run(failed, Outcome::Failed, t0, &RunResult::default())
            .await
            .unwrap();
        let cut = cat
            .start_run("app", RunKind::Backup, None, t0)
            .await
            .unwrap();
        cat.finish_run(cut, Outcome::Interrupted, t0, &RunResult::default())
            .await
            .unwrap();
        assert_eq!(
            cat.last_outcome("app", RunKind::Backup).await.unwrap(),
            Some(Outcome::Failed)
        );
        assert_eq!(
            cat.last_outcome("app", RunKind::Verify).await.unwrap(),
            None
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn latest_verification_per_backup_and_store() {
        let dir = std::env::temp_dir().join(format!("backstop-catv-{}", std::process::id()));
        let url = format!("sqlite://{}/catalog.db", dir.display());
        let cat = Catalog::open(Location::new(&url, None)).await.unwrap();
        let t0 = Utc::now();
        for (backup, store, level, outcome) in [
            ("b1", "local", "checksum", Some(Outcome::Success)),
            ("b1", "local", "restore", Some(Outcome::Failed)),
            ("b1", "s3", "decrypt", Some(Outcome::Success)),
            ("b2", "local", "decrypt", Some(Outcome::Success)),
            // A run still going does not count.
            ("b2", "local", "restore", None),
        ] {
            let id = cat
                .start_run("app", RunKind::Verify, Some(backup), t0)
                .await
                .unwrap();
            cat.set_verify_scope(id, level, store).await.unwrap();
            if let Some(outcome) = outcome {
                cat.finish_run(id, outcome, t0, &RunResult::default())
                    .await
                    .unwrap();
            }
        }
        // A backup run of the same id is not a verification.
        let b = cat
            .start_run("app", RunKind::Backup, Some("b3"), t0)
            .await
            .unwrap();
        cat.finish_run(b, Outcome::Success, t0, &RunResult::default())
            .await
            .unwrap();
        let v = cat.last_verifications("app", "local").await.unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!((v["b1"].level.as_str(), v["b1"].ok), ("restore", false));
        assert_eq!((v["b2"].level.as_str(), v["b2"].ok), ("decrypt", true));
        let s3 = cat.last_verifications("app", "s3").await.unwrap();
        assert_eq!((s3["b1"].level.as_str(), s3["b1"].ok), ("decrypt", true));
        Catalog::open(Location::new(&url, None)).await.unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
