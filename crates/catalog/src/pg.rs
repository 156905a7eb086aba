//! A PostgreSQL catalog: connecting (the password from a file or the
//! environment, never the URL), its migrations, and the check that its
//! schema is the one this backstop uses.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::{CatalogError, Location, migrator};

/// The PostgreSQL catalog's migrations (see the SQLite list in lib.rs).
const PG_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "fleet",
        include_str!("../migrations/postgres/0001_fleet.sql"),
    ),
    (
        2,
        "imported",
        include_str!("../migrations/postgres/0002_imported.sql"),
    ),
    (
        3,
        "replay pauses",
        include_str!("../migrations/postgres/0003_replay_pauses.sql"),
    ),
    (
        4,
        "fleet publishing",
        include_str!("../migrations/postgres/0004_fleet_publishing.sql"),
    ),
    (
        5,
        "imported unique",
        include_str!("../migrations/postgres/0005_imported_unique.sql"),
    ),
    (
        6,
        "history",
        include_str!("../migrations/postgres/0006_history.sql"),
    ),
    (
        7,
        "drills",
        include_str!("../migrations/postgres/0007_drills.sql"),
    ),
    (
        8,
        "backups",
        include_str!("../migrations/postgres/0008_backups.sql"),
    ),
    (
        9,
        "replay holds",
        include_str!("../migrations/postgres/0009_replay_holds.sql"),
    ),
];

/// Where a catalog's schema stands against this backstop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    /// No migration applied yet.
    Empty,
    /// Applied up to this version, older than this backstop's.
    Behind(i64),
    /// Exactly this backstop's (the version).
    Current(i64),
    /// Applied by a newer backstop (the version).
    Ahead(i64),
}

impl std::fmt::Display for SchemaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaState::Empty => f.write_str("empty (no schema)"),
            SchemaState::Behind(v) => write!(f, "version {v} (older than this backstop's)"),
            SchemaState::Current(v) => write!(f, "version {v} (current)"),
            SchemaState::Ahead(v) => write!(f, "version {v} (newer than this backstop's)"),
        }
    }
}

/// Whether a `postgres://` URL carries a password (refused: it would be in
/// the config file, `ps` and logs; use a password file or variable).
pub fn pg_url_has_password(url: &str) -> bool {
    PgConnectOptions::from_str(url).is_ok()
        && url::Url::parse(url).is_ok_and(|u| u.password().is_some())
}

fn options(at: Location<'_>) -> Result<PgConnectOptions, CatalogError> {
    let mut opts = PgConnectOptions::from_str(at.url).map_err(|e| CatalogError::Open {
        url: redact(at.url),
        reason: e.to_string(),
    })?;
    if let Some(p) = at.password {
        opts = opts.password(p);
    }
    // Behind a transaction pooler a cached named statement would outlive
    // the server connection it was prepared on: cache nothing.
    Ok(opts
        .statement_cache_capacity(0)
        .application_name("backstop"))
}

/// The URL without credentials, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(unparsable catalog URL)".into(),
    }
}

/// How long an operation waits for a connection of the pool (sqlx retries
/// a refused or full server until then).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of at most `at.pool_size` connections, idle ones closed after a
/// minute (a quiet node gives its connections back to the server), with
/// one connection made now so a wrong URL or password fails here.
pub(crate) async fn connect(at: Location<'_>) -> Result<PgPool, CatalogError> {
    let pool = PgPoolOptions::new()
        .max_connections(at.pool_size)
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options(at)?);
    match pool.acquire().await {
        Ok(_) => Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => Err(no_connection(&pool).await),
        Err(e) => Err(CatalogError::Open {
            url: redact(at.url),
            reason: e.to_string(),
        }),
    }
}

/// A pool of `connections` to where `pool` connects, made when first used.
pub(crate) fn side_pool(pool: &PgPool, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections.max(1))
        .min_connections(0)
        .idle_timeout(Duration::from_secs(60))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// A transaction on the pool; when no connection came in time, the error
/// says why (see [`no_connection`]).
pub(crate) async fn begin(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, CatalogError> {
    match pool.begin().await {
        Err(sqlx::Error::PoolTimedOut) => Err(no_connection(pool).await),
        other => Ok(other?),
    }
}

/// Why the pool had no connection for [`ACQUIRE_TIMEOUT`]: sqlx retries a
/// full or refusing server silently until then and says only that it timed
/// out, so one direct connection asks the server. Either the server refuses
/// (which limit, in its words) or it accepts and this process's own
/// connections were all busy.
async fn no_connection(pool: &PgPool) -> CatalogError {
    let opts = pool.connect_options();
    let size = pool.options().get_max_connections();
    let url = format!(
        "postgres://{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default()
    );
    let direct = tokio::time::timeout(ACQUIRE_TIMEOUT / 2, PgConnection::connect_with(&opts)).await;
    let reason = match direct {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            format!(
                "all {size} of this process's catalog connections for runs (daemon.catalog_connections, less one a fleet node keeps for its heartbeat) stayed busy, though the server accepts more: the catalog server is slow or a lock is held there (look at pg_stat_activity), or raise daemon.catalog_connections"
            )
        }
        Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("53300") => format!(
            "the server refuses new connections ({}): its max_connections (less superuser_reserved_connections for a role that is not a superuser) or a CONNECTION LIMIT on the role or database is used up. Each backstop process may hold {size} (daemon.catalog_connections); the limit must cover every node's plus one-shot commands and anything else on that server: raise it, lower daemon.catalog_connections, or put PgBouncer in front",
            e.message()
        ),
        Ok(Err(e)) => format!("cannot connect: {e}"),
        Err(_) => format!(
            "a new connection did not answer within {} s",
            (ACQUIRE_TIMEOUT / 2).as_secs()
        ),
    };
    CatalogError::NoConnection {
        url,
        waited: ACQUIRE_TIMEOUT.as_secs(),
        reason,
    }
}

async fn state(pool: &PgPool) -> Result<SchemaState, CatalogError> {
    let mut tx = begin(pool).await?;
    let exists: (bool,) = sqlx::query_as("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .persistent(false)
        .fetch_one(&mut *tx)
        .await?;
    let version = if exists.0 {
        let v: (Option<i64>,) =
            sqlx::query_as("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .persistent(false)
                .fetch_one(&mut *tx)
                .await?;
        v.0
    } else {
        None
    };
    tx.commit().await?;
    let ours = PG_MIGRATIONS.len() as i64;
    Ok(match version {
        None => SchemaState::Empty,
        Some(v) if v < ours => SchemaState::Behind(v),
        Some(v) if v > ours => SchemaState::Ahead(v),
        Some(v) => SchemaState::Current(v),
    })
}

pub(crate) async fn check_schema(pool: &PgPool, url: &str) -> Result<(), CatalogError> {
    let url = redact(url);
    match state(pool).await? {
        SchemaState::Current(_) => Ok(()),
        SchemaState::Empty => Err(CatalogError::Schema(format!(
            "the catalog {url} has no backstop schema yet: run `backstop migrate` (on a direct connection, not through a pooler) before starting backstop"
        ))),
        SchemaState::Behind(v) => Err(CatalogError::Schema(format!(
            "the catalog {url} is at schema version {v}, older than this backstop's {}: run `backstop migrate` (on a direct connection) once, then start every node",
            PG_MIGRATIONS.len()
        ))),
        SchemaState::Ahead(v) => Err(CatalogError::Schema(format!(
            "the catalog {url} is at schema version {v}, newer than this backstop's {} (a newer backstop migrated it): upgrade this node's backstop; do not downgrade the catalog",
            PG_MIGRATIONS.len()
        ))),
    }
}

pub(crate) async fn migrate(at: Location<'_>) -> Result<(SchemaState, SchemaState), CatalogError> {
    let pool = connect(at).await?;
    let before = state(&pool).await?;
    if let SchemaState::Ahead(v) = before {
        pool.close().await;
        return Err(CatalogError::Schema(format!(
            "the catalog is at schema version {v}, newer than this backstop's {}: migrate with the newer backstop",
            PG_MIGRATIONS.len()
        )));
    }
    migrator(PG_MIGRATIONS).run(&pool).await?;
    let after = state(&pool).await?;
    pool.close().await;
    Ok((before, after))
}
