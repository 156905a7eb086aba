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
//! What it records lives in a room each: [`runs`], verifications, imports,
//! uploads, locks; [`fleet`] is the shared catalog's coordination.

mod pg;

pub mod fleet;

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, SecondsFormat, Utc};
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
    (
        12,
        "replay holds",
        include_str!("../migrations/sqlite/0012_replay_holds.sql"),
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
            crate::Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let $c = &mut *conn;
                $body
            }
            crate::Db::Pg(pool) => {
                let mut tx = crate::pg::begin(pool).await?;
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

mod imports;
mod locks;
mod replay;
mod runs;
mod status;
mod uploads;
mod verifications;

pub use imports::ImportedRun;
pub use replay::{PausedBy, ReplayServer};
pub use runs::{RunRecord, RunResult};
pub use uploads::RecordedUpload;
pub use verifications::Verification;

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
            crate::Db::Sqlite(pool) => {
                let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(pool)
                    .await;
                pool.close().await;
            }
            Db::Pg(pool) => pool.close().await,
        }
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
        assert_eq!(a.len(), 12);
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
