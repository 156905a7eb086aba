//! A PostgreSQL catalog: connecting (the password from a file or the
//! environment, never the URL), its migrations, and the check that its
//! schema is the one this backstop uses.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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

pub(crate) async fn connect(at: Location<'_>) -> Result<PgPool, CatalogError> {
    PgPoolOptions::new()
        .max_connections(at.pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options(at)?)
        .await
        .map_err(|e| CatalogError::Open {
            url: redact(at.url),
            reason: e.to_string(),
        })
}

async fn state(pool: &PgPool) -> Result<SchemaState, CatalogError> {
    let mut tx = pool.begin().await?;
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
