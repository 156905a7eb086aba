//! What a restore or a verify asks of the database it writes to: does the
//! database exist, create or drop it, which roles exist, and whether it
//! already holds what a restore would create. All the target-side SQL, next
//! to the source-side SQL of the dump.

use std::collections::HashSet;

use sqlx::Connection;

use crate::{DumpError, PgTarget, connect, query_error, quote_ident};

/// Whether the target database exists, asked of the server's `postgres`
/// database (falling back to the target itself).
///
/// # Errors
/// When neither can be reached or the lookup fails.
pub async fn database_exists(target: &PgTarget) -> Result<bool, DumpError> {
    let mut conn = match connect(&target.with_database("postgres")).await {
        Ok(c) => c,
        Err(_) => connect(target).await?,
    };
    let found: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1")
            .bind(target.database())
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| query_error(target, &e))?;
    let _ = conn.close().await;
    Ok(found.is_some())
}

/// Creates the target database from template0 (a clean slate: template1 may
/// hold local additions that would collide with the backup's objects).
///
/// # Errors
/// When the server cannot be reached or refuses.
pub async fn create_database(target: &PgTarget) -> Result<(), DumpError> {
    create_database_owned(target, None).await
}

/// [`create_database`], owned by `owner` (a server restore gives each
/// database back its owner; the role must exist, from the globals).
///
/// # Errors
/// When the server cannot be reached or refuses.
pub async fn create_database_owned(
    target: &PgTarget,
    owner: Option<&str>,
) -> Result<(), DumpError> {
    let mut conn = connect(&target.with_database("postgres")).await?;
    let mut sql = format!(
        "CREATE DATABASE {} TEMPLATE template0",
        quote_ident(&target.database())
    );
    if let Some(owner) = owner {
        sql.push_str(&format!(" OWNER {}", quote_ident(owner)));
    }
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| query_error(target, &e));
    let _ = conn.close().await;
    r
}

/// One database of a server, as a cluster job sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDatabase {
    pub name: String,
    pub owner: String,
    /// Whether the connecting role may connect to it (CONNECT privilege).
    pub can_connect: bool,
}

/// The databases of the server `target` is on, by name: not templates,
/// not those that refuse every connection (`datallowconn = false`).
///
/// # Errors
/// When the server cannot be reached or the query fails.
pub async fn list_databases(target: &PgTarget) -> Result<Vec<ServerDatabase>, DumpError> {
    let mut conn = connect(target).await?;
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT datname, pg_catalog.pg_get_userbyid(datdba), pg_catalog.has_database_privilege(oid, 'CONNECT')
           FROM pg_catalog.pg_database
          WHERE NOT datistemplate AND datallowconn
          ORDER BY datname",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(|e| query_error(target, &e))?;
    let _ = conn.close().await;
    Ok(rows
        .into_iter()
        .map(|(name, owner, can_connect)| ServerDatabase {
            name,
            owner,
            can_connect,
        })
        .collect())
}

/// Drops `name` on `server`, disconnecting its sessions (PostgreSQL 13+;
/// a plain DROP on older servers).
///
/// # Errors
/// When the server cannot be reached or refuses.
pub async fn drop_database(server: &PgTarget, name: &str) -> Result<(), DumpError> {
    let admin = server.with_database("postgres");
    let mut conn = connect(&admin).await?;
    let ident = quote_ident(name);
    let forced = format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)");
    let r = match sqlx::raw_sql(sqlx::AssertSqlSafe(forced))
        .execute(&mut conn)
        .await
    {
        Ok(_) => Ok(()),
        Err(_) => sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {ident}"
        )))
        .execute(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| query_error(server, &e)),
    };
    let _ = conn.close().await;
    r
}

/// The databases on `server` whose names begin with `prefix` (a plain
/// prefix: `_` and `%` in it match only themselves), each with whether any
/// session is connected to it now.
///
/// # Errors
/// When the server cannot be reached or the query fails.
pub async fn databases_named(
    server: &PgTarget,
    prefix: &str,
) -> Result<Vec<(String, bool)>, DumpError> {
    let mut conn = connect(&server.with_database("postgres")).await?;
    let pattern = format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%")
    );
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT d.datname::text,
                EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.datname = d.datname)
         FROM pg_catalog.pg_database d WHERE d.datname LIKE $1 ORDER BY 1",
    )
    .bind(pattern)
    .fetch_all(&mut conn)
    .await
    .map_err(|e| query_error(server, &e))?;
    let _ = conn.close().await;
    Ok(rows)
}

/// Every role name on the target's server.
///
/// # Errors
/// When the server cannot be reached or the query fails.
pub async fn existing_roles(target: &PgTarget) -> Result<HashSet<String>, DumpError> {
    let mut conn = connect(target).await?;
    let roles: Vec<(String,)> = sqlx::query_as("SELECT rolname::text FROM pg_catalog.pg_roles")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| query_error(target, &e))?;
    let _ = conn.close().await;
    Ok(roles.into_iter().map(|r| r.0).collect())
}

/// What a database already holds: user relations and functions (not
/// system objects, not extension members), and a few relation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupancy {
    pub relations: i64,
    pub functions: i64,
    /// Up to three `schema.name`s.
    pub sample: Vec<String>,
}

impl Occupancy {
    pub fn is_empty(&self) -> bool {
        self.relations + self.functions == 0
    }
}

/// What the target database holds.
///
/// # Errors
/// When the database cannot be reached or a query fails.
pub async fn occupancy(target: &PgTarget) -> Result<Occupancy, DumpError> {
    const USER_REL: &str = "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
          AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
          AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";
    let mut conn = connect(target).await?;
    let q = |e: sqlx::Error| query_error(target, &e);
    let (relations,): (i64,) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT count(*) {USER_REL}")))
            .fetch_one(&mut conn)
            .await
            .map_err(q)?;
    let sample: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT n.nspname || '.' || c.relname {USER_REL} ORDER BY 1 LIMIT 3"
    )))
    .fetch_all(&mut conn)
    .await
    .map_err(q)?;
    let (functions,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_catalog.pg_proc f JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
         WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = f.oid AND d.deptype = 'e')",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(q)?;
    let _ = conn.close().await;
    Ok(Occupancy {
        relations,
        functions,
        sample: sample.into_iter().map(|s| s.0).collect(),
    })
}

/// Which of `tables` (schema, name) exist in the target database, as
/// `schema.name`.
///
/// # Errors
/// When the database cannot be reached or a query fails.
pub async fn existing_tables(
    target: &PgTarget,
    tables: &[(String, String)],
) -> Result<Vec<String>, DumpError> {
    let mut conn = connect(target).await?;
    let mut present = Vec::new();
    for (s, n) in tables {
        let (exists,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2)",
        )
        .bind(s)
        .bind(n)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| query_error(target, &e))?;
        if exists {
            present.push(format!("{s}.{n}"));
        }
    }
    let _ = conn.close().await;
    Ok(present)
}

/// Which of `tables` hold at least one row, as `schema.name`. A table that
/// is missing is not reported (pg_restore says so in its own words).
///
/// # Errors
/// When the database cannot be reached.
pub async fn tables_with_rows(
    target: &PgTarget,
    tables: &[(String, String)],
) -> Result<Vec<String>, DumpError> {
    let mut conn = connect(target).await?;
    let mut full = Vec::new();
    for (s, n) in tables {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.{})",
            quote_ident(s),
            quote_ident(n)
        );
        if let Ok((true,)) = sqlx::query_as::<_, (bool,)>(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
        {
            full.push(format!("{s}.{n}"));
        }
    }
    let _ = conn.close().await;
    Ok(full)
}

/// A session waiting for a lock that a watched session holds.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedSession {
    pub pid: i32,
    pub application: String,
    /// The start of its query (up to 200 characters).
    pub query: String,
    /// Seconds since its query started.
    pub waited: f64,
    /// The locks it waits for, e.g. `AccessExclusiveLock on orders`.
    pub lock: String,
}

/// A connection that watches the sessions whose `application_name` starts
/// with a backup's name (its pg_dump's; in streams, each lane's, named
/// `NAME-NN`) for the sessions their locks block: the lock guard's.
pub struct LockWatch {
    conn: sqlx::PgConnection,
    target: PgTarget,
    app: String,
}

impl LockWatch {
    /// Connects to `target`'s database to watch sessions named `app` or
    /// `app…`.
    ///
    /// # Errors
    /// [`DumpError::Connect`].
    pub async fn connect(target: &PgTarget, app: &str) -> Result<Self, DumpError> {
        Ok(Self {
            conn: connect(target).await?,
            target: target.clone(),
            app: app.to_string(),
        })
    }

    /// The sessions now waiting for a lock the watched sessions hold
    /// (`pg_blocking_pids`), longest waiting first.
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn blocked(&mut self) -> Result<Vec<BlockedSession>, DumpError> {
        let rows: Vec<(i32, String, String, f64, String)> = sqlx::query_as(
            "SELECT w.pid, coalesce(w.application_name, ''), left(coalesce(w.query, ''), 200),
                    coalesce(extract(epoch FROM now() - w.query_start), 0)::float8,
                    coalesce((SELECT string_agg(DISTINCT l.mode || ' on ' || coalesce(l.relation::regclass::text, l.locktype), ', ')
                                FROM pg_catalog.pg_locks l WHERE l.pid = w.pid AND NOT l.granted), '')
               FROM pg_catalog.pg_stat_activity w
              WHERE w.wait_event_type = 'Lock'
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity d
                             WHERE left(d.application_name, length($1)) = $1 AND d.pid = ANY (pg_catalog.pg_blocking_pids(w.pid)))
              ORDER BY 4 DESC",
        )
        .bind(&self.app)
        .fetch_all(&mut self.conn)
        .await
        .map_err(|e| query_error(&self.target, &e))?;
        Ok(rows
            .into_iter()
            .map(|(pid, application, query, waited, lock)| BlockedSession {
                pid,
                application,
                query,
                waited,
                lock,
            })
            .collect())
    }

    /// Ends the watched sessions (`pg_terminate_backend`): their locks go
    /// at once, and their client sees its connection closed. Returns the
    /// pids ended.
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn terminate(&mut self) -> Result<Vec<i32>, DumpError> {
        terminate_on(&mut self.conn, &self.target, &self.app).await
    }
}

/// How long ending a session may take before it is reported as ended
/// anyway (PostgreSQL 14 and later wait for the backend to exit).
const TERMINATE_WAIT_MS: i64 = 5000;

/// What a dump tool's sessions are doing on the server, read again and
/// again on one session of its own (made anew when it breaks): the stall
/// watchdog's second witness. pg_dump writes nothing while it reads the
/// catalog (hours of queries on a schema of hundreds of thousands of
/// relations), but every query it issues changes its session's
/// `query_start`, and one query of that phase may itself run for longer
/// than `stall_timeout` with the server working on it all along (on the
/// CPU or reading the disk). A dump that is really stuck (a lock it
/// waits for, a client that stopped reading) changes nothing and shows
/// no work. A backend that itself stopped (a hung disk, a stopped
/// process) shows the state it last reported, working or not, for good:
/// the watchdog counts one unchanged query for a bounded time only.
pub struct Activity {
    target: PgTarget,
    app: String,
    conn: Option<sqlx::PgConnection>,
}

impl Activity {
    pub fn new(target: &PgTarget, app: &str) -> Self {
        Self {
            target: target.clone(),
            app: app.to_string(),
            conn: None,
        }
    }

    /// Each session named exactly `app`, or None when the server cannot be asked
    /// now.
    pub async fn now(&mut self) -> Option<Sessions> {
        if self.conn.is_none() {
            self.conn = connect(&self.target).await.ok();
        }
        let conn = self.conn.as_mut()?;
        // Working: a query running on the CPU (no wait event) or waiting
        // for the disk or an internal lock (LWLock). Waiting for a lock, a
        // buffer pin, the client (ClientWrite: pg_dump stopped reading)
        // or a timer is not.
        let seen: Result<(Option<String>, Option<bool>), _> = sqlx::query_as(
            "SELECT string_agg(pid::text || ' ' || coalesce(state, '') || ' ' || coalesce(query_start::text, '') || ' ' || coalesce(state_change::text, ''), ', ' ORDER BY pid),
                    bool_or(state = 'active' AND (wait_event_type IS NULL OR wait_event_type IN ('IO', 'LWLock')))
               FROM pg_catalog.pg_stat_activity
              WHERE application_name = $1 AND pid <> pg_catalog.pg_backend_pid()",
        )
        .bind(&self.app)
        .fetch_one(conn)
        .await;
        match seen {
            Ok((line, working)) => Some(Sessions {
                line: line.unwrap_or_default(),
                working: working.unwrap_or(false),
            }),
            Err(_) => {
                self.conn = None;
                None
            }
        }
    }
}

/// What [`Activity::now`] saw of a dump tool's sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sessions {
    /// Each session's pid, state and when its query and state last
    /// changed, as one line: a new query or state changes it.
    pub line: String,
    /// Whether the server is working on a query of one of them now.
    pub working: bool,
}

/// Ends every session whose name starts with `app` (`pg_terminate_backend`:
/// a lane's name ends only that lane's, a backup's every lane's) on `target`'s
/// server, on a connection of its own, waiting (PostgreSQL 14+) until
/// each backend has exited, so none is left in `pg_stat_activity` holding
/// a snapshot or locks. Returns the pids ended.
///
/// # Errors
/// [`DumpError::Connect`] or [`DumpError::Query`].
pub async fn terminate_sessions(target: &PgTarget, app: &str) -> Result<Vec<i32>, DumpError> {
    let mut conn = connect(target).await?;
    let ended = terminate_on(&mut conn, target, app).await;
    let _ = conn.close().await;
    ended
}

async fn terminate_on(
    conn: &mut sqlx::PgConnection,
    target: &PgTarget,
    app: &str,
) -> Result<Vec<i32>, DumpError> {
    let (version,): (i32,) = sqlx::query_as("SELECT current_setting('server_version_num')::int")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| query_error(target, &e))?;
    // The sessions first, then each ended: a pg_terminate_backend in a
    // WHERE clause may be evaluated before the name is compared, and end
    // every session on the server.
    let pids: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE left(application_name, length($1)) = $1 AND pid <> pg_catalog.pg_backend_pid()",
    )
    .bind(app)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| query_error(target, &e))?;
    let mut ended = Vec::new();
    for (pid,) in pids {
        let (ok,): (bool,) = if version >= 140000 {
            sqlx::query_as("SELECT pg_catalog.pg_terminate_backend($1, $2)")
                .bind(pid)
                .bind(TERMINATE_WAIT_MS)
        } else {
            sqlx::query_as("SELECT pg_catalog.pg_terminate_backend($1)").bind(pid)
        }
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| query_error(target, &e))?;
        if ok {
            ended.push(pid);
        }
    }
    Ok(ended)
}

/// What a pause cost the standby.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resumed {
    /// How long replay stood still (for this backup).
    pub paused_seconds: f64,
    /// WAL received but not replayed when the backup ended: the lag the
    /// pause caused.
    pub lag_bytes: u64,
}

/// How long a requested pause may take to take hold (replay finishes the
/// record it is applying).
const PAUSE_CONFIRM: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a backup waits for another to finish changing the pause.
const LOCK_WAIT: &str = "60s";

/// The advisory lock every backstop takes on a standby before it changes
/// or judges the standby's replay pause ("backstop" in ASCII). Advisory
/// locks work in recovery and never conflict with replay.
const PAUSE_LOCK: i64 = 0x6261_636b_7374_6f70;

/// A fresh session on a standby holding the advisory lock under which the
/// standby's replay pause is changed: whoever holds it may read the pause's
/// books and pause or resume knowing no other backup does the same. Held
/// for milliseconds (a pause's confirmation at most), never for the dump:
/// no session idles for hours, and a session that dies frees the lock.
pub struct StandbyLock {
    conn: sqlx::PgConnection,
    target: PgTarget,
    version: i32,
}

impl StandbyLock {
    /// Connects to `target` and takes the lock; `None` when `target` is not
    /// in recovery (a primary, or a standby since promoted).
    ///
    /// # Errors
    /// Connection errors; a query error, or the lock not free within a
    /// minute.
    pub async fn take(target: &PgTarget) -> Result<Option<Self>, DumpError> {
        // Advisory locks belong to one database: every backstop takes this
        // one in the same database of the server (`postgres`, else
        // `template1`), whichever database its job dumps, so a cluster
        // job's databases and other jobs on the server serialise too. Only
        // a role that may connect to neither locks in its own database.
        let mut conn = match connect(&target.with_database("postgres")).await {
            Ok(c) => c,
            Err(_) => match connect(&target.with_database("template1")).await {
                Ok(c) => c,
                Err(_) => {
                    tracing::warn!(target = %target.display(), "The role cannot connect to postgres or template1 on the standby: the replay pause's lock is taken in the job's own database, which does not keep backups of other databases of this server from resuming replay under it.");
                    connect(target).await?
                }
            },
        };
        let q = |e: sqlx::Error| query_error(target, &e);
        let (in_recovery, version): (bool, i32) = sqlx::query_as(
            "SELECT pg_catalog.pg_is_in_recovery(), current_setting('server_version_num')::int",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(q)?;
        if !in_recovery {
            let _ = conn.close().await;
            return Ok(None);
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET lock_timeout = '{LOCK_WAIT}'; SELECT pg_catalog.pg_advisory_lock({PAUSE_LOCK})"
        )))
        .execute(&mut conn)
        .await
        .map_err(q)?;
        Ok(Some(Self {
            conn,
            target: target.clone(),
            version,
        }))
    }

    /// Whether replay is paused, or a pause was asked for.
    ///
    /// # Errors
    /// A query error.
    pub async fn is_paused(&mut self) -> Result<bool, DumpError> {
        let (paused,): (bool,) = sqlx::query_as("SELECT pg_catalog.pg_is_wal_replay_paused()")
            .fetch_one(&mut self.conn)
            .await
            .map_err(|e| query_error(&self.target, &e))?;
        Ok(paused)
    }

    /// Pauses replay and waits until the server says it is paused.
    ///
    /// # Errors
    /// [`DumpError::Preflight`] when the role may not pause replay or the
    /// pause does not take hold (replay is then asked to resume); query
    /// errors.
    pub async fn pause(&mut self) -> Result<(), DumpError> {
        let target = self.target.clone();
        let q = |e: sqlx::Error| query_error(&target, &e);
        if let Err(e) = sqlx::query("SELECT pg_catalog.pg_wal_replay_pause()")
            .execute(&mut self.conn)
            .await
        {
            return Err(DumpError::Preflight(format!(
                "{} is a standby and the job has standby = \"pause\", but WAL replay cannot be paused ({}): let the role run it (GRANT EXECUTE ON FUNCTION pg_wal_replay_pause(), pg_wal_replay_resume() TO the role) or set standby = \"retry\"",
                target.display(),
                target.redact(&e.to_string())
            )));
        }
        // 'paused' once replay has stopped (PostgreSQL 14+; before that
        // the request is all there is to see).
        let state = if self.version >= 140000 {
            "SELECT pg_catalog.pg_get_wal_replay_pause_state() = 'paused'"
        } else {
            "SELECT pg_catalog.pg_is_wal_replay_paused()"
        };
        let since = std::time::Instant::now();
        loop {
            let (paused,): (bool,) = sqlx::query_as(state)
                .fetch_one(&mut self.conn)
                .await
                .map_err(q)?;
            if paused {
                return Ok(());
            }
            if since.elapsed() > PAUSE_CONFIRM {
                let _ = resume_on(&mut self.conn, &target).await;
                return Err(DumpError::Preflight(format!(
                    "WAL replay on {} was asked to pause but did not within {}s",
                    target.display(),
                    PAUSE_CONFIRM.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The WAL received but not yet replayed.
    ///
    /// # Errors
    /// A query error.
    pub async fn lag(&mut self) -> Result<u64, DumpError> {
        replay_lag(&mut self.conn, &self.target).await
    }

    /// Resumes replay; returns the WAL it had yet to replay.
    ///
    /// # Errors
    /// A query error: replay may still be paused.
    pub async fn resume(&mut self) -> Result<u64, DumpError> {
        resume_on(&mut self.conn, &self.target).await
    }

    /// Frees the lock and closes the session.
    pub async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_catalog.pg_advisory_unlock_all()")
            .execute(&mut self.conn)
            .await;
        let _ = self.conn.close().await;
    }
}

async fn replay_lag(conn: &mut sqlx::PgConnection, target: &PgTarget) -> Result<u64, DumpError> {
    let (lag,): (i64,) = sqlx::query_as(
        "SELECT coalesce(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_receive_lsn(), pg_catalog.pg_last_wal_replay_lsn()), 0)::int8",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| query_error(target, &e))?;
    Ok(lag.max(0) as u64)
}

/// Resumes replay on `conn`; returns the WAL received but not yet replayed.
async fn resume_on(conn: &mut sqlx::PgConnection, target: &PgTarget) -> Result<u64, DumpError> {
    let lag = replay_lag(conn, target).await?;
    sqlx::query("SELECT pg_catalog.pg_wal_replay_resume()")
        .execute(&mut *conn)
        .await
        .map_err(|e| query_error(target, &e))?;
    Ok(lag)
}
