//! Dump stage of the flow: a snapshot of the source database and `pg_dump`
//! running as a child whose stdout is the start of the backup stream.
//!
//! The order matters: [`Snapshot::open`] starts a REPEATABLE READ transaction
//! and exports its snapshot, the inventory is read in it, and pg_dump is
//! started with `--snapshot` while the transaction is still open, so the
//! manifest describes exactly what was dumped. Passwords reach pg_dump only
//! through its environment, never its argv.

pub mod admin;
mod inventory;
pub mod preflight;
mod rows;
mod target;
mod tools;

use std::process::Stdio;
use std::time::Duration;

use backstop_config::{DumpFormat, Filters, Scope};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

pub use inventory::{DataTable, Inventory, TableInfo};
pub use rows::{RowCountMap, RowCounter};
pub use target::PgTarget;
pub use tools::{PgTool, find_tool, parse_major};

/// How long to wait for a connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a child's stderr is kept for error messages.
const STDERR_KEEP: usize = 16 * 1024;

/// Why a dump step failed. Messages are already redacted.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// `blocked`: this host refused to open the connection (a packet
    /// filter such as the unit's IPAddressDeny=): not retryable, and the
    /// reason says what to do.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        target: String,
        reason: String,
        blocked: bool,
    },
    #[error("query on {target} failed: {reason}")]
    Query { target: String, reason: String },
    #[error("{0}")]
    Tool(String),
    /// A pre-flight check found what would make the dump fail or wrong.
    #[error("{0}")]
    Preflight(String),
    #[error(
        "{tool} {found} is older than the server ({server}); pg_dump must be at least the server's major version. Install postgresql-client-{server} and set pg_bin_dir = \"/usr/lib/postgresql/{server}/bin\" (or pg_dump_path) in the job"
    )]
    TooOld {
        tool: String,
        found: u32,
        server: u32,
    },
    #[error("cannot start {tool}: {reason}")]
    Spawn { tool: String, reason: String },
    #[error("{tool} failed ({status}): {stderr}")]
    Exited {
        tool: String,
        status: String,
        stderr: String,
    },
}

impl DumpError {
    /// Whether a retry may succeed (connection trouble, a killed backend).
    pub fn is_retryable(&self) -> bool {
        match self {
            DumpError::Connect { blocked, .. } => !blocked,
            DumpError::Exited { .. } => true,
            _ => false,
        }
    }
}

/// How long ending a snapshot's transaction may take.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An open REPEATABLE READ transaction whose snapshot pg_dump imports.
pub struct Snapshot {
    conn: PgConnection,
    target: PgTarget,
    /// The exported snapshot id passed to `pg_dump --snapshot`.
    pub id: String,
    /// `server_version_num`, e.g. 150019.
    pub server_version_num: u32,
    /// `server_version`, e.g. "15.19 (Debian 15.19-0+deb12u1)".
    pub server_version: String,
}

impl Snapshot {
    /// Connects, begins a read-only REPEATABLE READ transaction and exports its snapshot.
    ///
    /// # Errors
    /// [`DumpError::Connect`] or [`DumpError::Query`], redacted.
    pub async fn open(target: &PgTarget) -> Result<Self, DumpError> {
        Self::open_with_lock_timeout(target, None).await
    }

    /// [`Snapshot::open`] whose transaction waits at most `lock_timeout`
    /// for a lock (the inventory's table sizes take ACCESS SHARE locks, as
    /// pg_dump does): a table held exclusively fails the backup instead of
    /// queueing it, and everything behind it, for good.
    ///
    /// # Errors
    /// As [`Snapshot::open`].
    pub async fn open_with_lock_timeout(
        target: &PgTarget,
        lock_timeout: Option<Duration>,
    ) -> Result<Self, DumpError> {
        let mut conn = begin_repeatable_read(target).await?;
        let q = |e: sqlx::Error| query_error(target, &e);
        if let Some(t) = lock_timeout {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "SET LOCAL lock_timeout = {}",
                t.as_millis().max(1)
            )))
            .execute(&mut conn)
            .await
            .map_err(q)?;
        }
        let (id, num, version): (String, String, String) = sqlx::query_as(
            "SELECT pg_export_snapshot(), current_setting('server_version_num'), current_setting('server_version')",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(q)?;
        Ok(Self {
            conn,
            target: target.clone(),
            id,
            server_version_num: num.parse().unwrap_or(0),
            server_version: version,
        })
    }

    /// The database's size on disk (tables, indexes, TOAST): an upper
    /// bound of what a dump of it stores.
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn database_size(&mut self) -> Result<u64, DumpError> {
        let (n,): (i64,) = sqlx::query_as("SELECT pg_catalog.pg_database_size(current_database())")
            .fetch_one(&mut self.conn)
            .await
            .map_err(|e| query_error(&self.target, &e))?;
        Ok(n.max(0) as u64)
    }

    /// The server's major version (e.g. 15, 17).
    pub fn server_major(&self) -> u32 {
        self.server_version_num / 10000
    }

    /// Reads the inventory (object counts, tables with sizes and estimated
    /// rows) in this snapshot, restricted to what `filters` select.
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn inventory(&mut self, filters: &Filters) -> Result<Inventory, DumpError> {
        inventory::read(&mut self.conn, filters)
            .await
            .map_err(|e| DumpError::Query {
                target: self.target.display(),
                reason: self.target.redact(&e.to_string()),
            })
    }

    /// What of `filters`' tables this role cannot read, per schema, with
    /// the role's name (see [`preflight::describe_unreadable`]).
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn unreadable_tables(
        &mut self,
        filters: &Filters,
    ) -> Result<(String, Vec<preflight::Unreadable>), DumpError> {
        let (role,): (String,) = sqlx::query_as("SELECT current_user::text")
            .fetch_one(&mut self.conn)
            .await
            .map_err(|e| query_error(&self.target, &e))?;
        let found = preflight::unreadable_tables(&mut self.conn, &self.target, filters).await?;
        Ok((role, found))
    }

    /// The owner of the database, read in this snapshot.
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn database_owner(&mut self) -> Result<String, DumpError> {
        let (owner,): (String,) = sqlx::query_as(
            "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database WHERE datname = current_database()",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(|e| query_error(&self.target, &e))?;
        Ok(owner)
    }

    /// The tables whose rows a backup in streams copies itself, largest
    /// first, and the database's encoding (what COPY writes them in).
    ///
    /// # Errors
    /// [`DumpError::Query`].
    pub async fn data_tables(
        &mut self,
        filters: &Filters,
    ) -> Result<(Vec<DataTable>, String), DumpError> {
        let generated = self.server_version_num >= 120000;
        let tables = inventory::data_tables(&mut self.conn, filters, generated)
            .await
            .map_err(|e| query_error(&self.target, &e))?;
        let (encoding,): (String,) =
            sqlx::query_as("SELECT pg_catalog.pg_encoding_to_char(encoding)::text FROM pg_catalog.pg_database WHERE datname = current_database()")
                .fetch_one(&mut self.conn)
                .await
                .map_err(|e| query_error(&self.target, &e))?;
        Ok((tables, encoding))
    }

    /// Holds ACCESS SHARE locks on `tables` in this snapshot's transaction
    /// until it ends, as pg_dump does on its own connection: no table can be
    /// dropped or rewritten between the snapshot and the stream that copies
    /// it. The session takes the name `app`, so the lock guard sees who
    /// waits behind these locks too. Waits at most the snapshot's lock
    /// timeout.
    ///
    /// # Errors
    /// [`DumpError::Query`] (a lock not granted in time among them).
    pub async fn hold(&mut self, tables: &[DataTable], app: &str) -> Result<(), DumpError> {
        let q = |e: sqlx::Error| query_error(&self.target, &e);
        sqlx::query("SELECT pg_catalog.set_config('application_name', $1, false)")
            .bind(app)
            .execute(&mut self.conn)
            .await
            .map_err(q)?;
        // A few hundred names a statement: one lock request each.
        for chunk in tables.chunks(500) {
            let names: Vec<String> = chunk
                .iter()
                .map(|t| format!("ONLY {}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
                .collect();
            let sql = format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", "));
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut self.conn)
                .await
                .map_err(q)?;
        }
        Ok(())
    }

    /// Ends the transaction. Call only after pg_dump has finished. Bounded:
    /// after a stall the server or the network may not answer, and the run
    /// must still end; the session is then dropped (its socket closed, so
    /// the server ends it, and the snapshot, when it notices).
    pub async fn close(mut self) {
        let ended = tokio::time::timeout(CLOSE_WAIT, async {
            let _ = sqlx::query("COMMIT").execute(&mut self.conn).await;
        })
        .await;
        if ended.is_err() {
            tracing::warn!(target = %self.target.display(), seconds = CLOSE_WAIT.as_secs(), "The snapshot's session did not answer COMMIT; its connection was dropped (the server ends the session when it notices).");
            return;
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, self.conn.close()).await;
    }
}

/// Connects to `target`, giving up after [`CONNECT_TIMEOUT`].
///
/// # Errors
/// [`DumpError::Connect`], redacted.
pub async fn connect(target: &PgTarget) -> Result<PgConnection, DumpError> {
    let options = target.sqlx_options();
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            let refused = backstop_vocab::ipfilter::refused_by_this_host(&e);
            let reason = target.redact(&e.to_string());
            // An answer (a wrong password, no such database, TLS refused)
            // proves the connection was made: only a connection that
            // failed is compared with the filter.
            if refused || matches!(e, sqlx::Error::Io(_)) {
                Err(connect_error(
                    target,
                    reason,
                    refused,
                    &resolve(target).await,
                ))
            } else {
                Err(DumpError::Connect {
                    target: target.display(),
                    reason,
                    blocked: false,
                })
            }
        }
        // What a SYN this host's filter drops looks like from here.
        Err(_) => {
            let reason = format!("no answer within {}s", CONNECT_TIMEOUT.as_secs());
            Err(connect_error(target, reason, false, &resolve(target).await))
        }
    }
}

/// The addresses `target` connects to (its hosts resolved now, within a
/// few seconds; none for a socket or when resolving fails).
async fn resolve(target: &PgTarget) -> Vec<std::net::IpAddr> {
    let hosts = backstop_config::postgres_hosts(&target.url_without_password()).unwrap_or_default();
    let lookups = async {
        let mut out = Vec::new();
        for (host, port) in hosts {
            if let Ok(found) = tokio::net::lookup_host((host.as_str(), port)).await {
                out.extend(found.map(|a| a.ip()));
            }
        }
        out.sort();
        out.dedup();
        out
    };
    tokio::time::timeout(Duration::from_secs(3), lookups)
        .await
        .unwrap_or_default()
}

/// A failed connection to `target` (`reason` redacted), with what this
/// host's packet filter has to do with it: when the ip-allow drop-in does
/// not allow one of `addrs`, or the connection was refused here (EPERM),
/// the reason says so and what to do, and it is not retried.
fn connect_error(
    target: &PgTarget,
    reason: String,
    refused: bool,
    addrs: &[std::net::IpAddr],
) -> DumpError {
    let what = target.display();
    match backstop_vocab::ipfilter::explain(&what, addrs, refused) {
        Some(x) => DumpError::Connect {
            target: what,
            reason: format!("{reason}; {}", x.hint),
            blocked: x.certain,
        },
        None => DumpError::Connect {
            target: what,
            reason,
            blocked: false,
        },
    }
}

fn query_error(target: &PgTarget, e: &sqlx::Error) -> DumpError {
    DumpError::Query {
        target: target.display(),
        reason: target.redact(&e.to_string()),
    }
}

/// Connects and begins a read-only REPEATABLE READ transaction: one snapshot
/// for everything read on the connection.
async fn begin_repeatable_read(target: &PgTarget) -> Result<PgConnection, DumpError> {
    let mut conn = connect(target).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut conn)
        .await
        .map_err(|e| query_error(target, &e))?;
    Ok(conn)
}

/// The inventory of a live database with exact row counts (`count(*)` of
/// every selected table), all read in one REPEATABLE READ snapshot. Used to
/// check a restored database, or to compare a backup with the source now.
///
/// Each relation is counted on its own (`FROM ONLY`), as pg_dump copies it:
/// a partitioned parent holds no rows itself (its partitions are listed and
/// counted separately) and an inheritance parent's count excludes its
/// children. Counting with the children would count their rows twice and
/// fail every good backup of such a database.
///
/// # Errors
/// [`DumpError::Connect`] or [`DumpError::Query`].
pub async fn live_inventory(target: &PgTarget, filters: &Filters) -> Result<Inventory, DumpError> {
    let mut conn = begin_repeatable_read(target).await?;
    let q = |e: sqlx::Error| query_error(target, &e);
    let mut inv = inventory::read(&mut conn, filters).await.map_err(q)?;
    for t in &mut inv.per_table {
        let sql = format!(
            "SELECT count(*) FROM ONLY {}.{}",
            quote_ident(&t.schema),
            quote_ident(&t.name)
        );
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .map_err(q)?;
        t.rows = Some(n.max(0) as u64);
    }
    let _ = sqlx::query("COMMIT").execute(&mut conn).await;
    let _ = conn.close().await;
    Ok(inv)
}

/// Quotes an SQL identifier: `a"b` → `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What pg_dump is asked to dump.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub format: DumpFormat,
    pub scope: Scope,
    pub filters: Filters,
    /// pg_dump's `--lock-wait-timeout` (None: wait as long as it takes).
    pub lock_wait_timeout: Option<std::time::Duration>,
}

impl DumpOptions {
    /// pg_dump's arguments, without connection details.
    pub fn args(&self, snapshot: &str) -> Vec<String> {
        let mut a = vec![
            format!("--format={}", self.format.as_str()),
            // backstop compresses; pg_dump's own compression would also hide the
            // COPY text that row counting reads.
            "--compress=0".to_string(),
            format!("--snapshot={snapshot}"),
            "--no-password".to_string(),
        ];
        if let Some(t) = self.lock_wait_timeout {
            a.push(format!("--lock-wait-timeout={}", t.as_millis().max(1)));
        }
        match self.scope {
            Scope::Full => {}
            Scope::Schema => a.push("--schema-only".into()),
            Scope::Data => a.push("--data-only".into()),
        }
        let f = &self.filters;
        a.extend(f.include_schemas.iter().map(|s| format!("--schema={s}")));
        a.extend(
            f.exclude_schemas
                .iter()
                .map(|s| format!("--exclude-schema={s}")),
        );
        a.extend(f.include_tables.iter().map(|s| format!("--table={s}")));
        a.extend(
            f.exclude_tables
                .iter()
                .map(|s| format!("--exclude-table={s}")),
        );
        a
    }
}

/// The size asked for the pipe between a client program and backstop.
const PIPE_SIZE: usize = 1024 * 1024;

/// A running PostgreSQL client program: pg_dump or pg_dumpall whose stdout
/// is being read, or pg_restore or psql being fed on stdin.
///
/// Completion is explicit: the stream is only good once [`DumpChild::finish`]
/// has seen the child exit 0. Dropping it kills the child.
#[must_use = "call finish() to learn whether the dump succeeded"]
pub struct DumpChild {
    tool: String,
    child: Child,
    stderr: JoinHandle<String>,
    target: Option<PgTarget>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pipe {
    Stdout,
    Stdin,
    /// stdout read, and a script written to stdin.
    Scripted,
}

/// Gives a PostgreSQL client tool a clean environment: what a client
/// needs (PATH, HOME for `~/.pgpass` and `~/.postgresql/`, the locale and
/// time zone, libpq's `PG*` settings, Kerberos' for GSSAPI) and nothing
/// else of this process's, so AWS keys, tokens and webhook URLs in the
/// daemon's environment never reach pg_dump, pg_restore or psql. For a
/// dump (`dump` true) the job's config is the whole truth about its
/// credentials: PGPASSWORD and PGPASSFILE from the environment are dropped
/// too (the job's own password is set by the caller).
pub fn client_env(cmd: &mut Command, dump: bool) {
    cmd.env_clear();
    for (name, value) in std::env::vars_os() {
        let Some(n) = name.to_str() else { continue };
        let keep = matches!(
            n,
            "PATH"
                | "HOME"
                | "USER"
                | "LOGNAME"
                | "LANG"
                | "LANGUAGE"
                | "TZ"
                | "TMPDIR"
                | "LD_LIBRARY_PATH"
        ) || n.starts_with("LC_")
            || n.starts_with("KRB5")
            || (n.starts_with("PG") && !(dump && matches!(n, "PGPASSWORD" | "PGPASSFILE")));
        if keep {
            cmd.env(name, value);
        }
    }
}

impl DumpChild {
    /// Starts `tool` with `args` against `target`, stdout piped.
    /// Returns the child and its stdout as a blocking file.
    ///
    /// # Errors
    /// [`DumpError::Spawn`].
    pub fn spawn(
        tool: &PgTool,
        target: &PgTarget,
        args: &[String],
    ) -> Result<(Self, std::fs::File), DumpError> {
        Self::start(tool, Some(target), args, Pipe::Stdout, "backstop")
    }

    /// [`DumpChild::spawn`] whose session carries `application_name`
    /// `app` on the server (the lock guard finds pg_dump's backend by it).
    ///
    /// # Errors
    /// [`DumpError::Spawn`].
    pub fn spawn_as(
        tool: &PgTool,
        target: &PgTarget,
        args: &[String],
        app: &str,
    ) -> Result<(Self, std::fs::File), DumpError> {
        Self::start(tool, Some(target), args, Pipe::Stdout, app)
    }

    /// [`DumpChild::spawn_as`] for `psql` reading `script` on its stdin
    /// (written by a task of its own, then closed): a script too long for
    /// its arguments, such as the COPY commands of a stream of thousands
    /// of tables. Its stdout is returned.
    ///
    /// # Errors
    /// [`DumpError::Spawn`].
    pub fn spawn_scripted(
        tool: &PgTool,
        target: &PgTarget,
        args: &[String],
        app: &str,
        script: String,
    ) -> Result<(Self, std::fs::File), DumpError> {
        let (mut me, out) = Self::start(tool, Some(target), args, Pipe::Scripted, app)?;
        let mut stdin = me.child.stdin.take().expect("stdin piped");
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // A child that dies early closes the pipe: its exit status,
            // read by finish(), says why.
            let _ = stdin.write_all(script.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
        Ok((me, out))
    }

    /// Starts a consumer (`pg_restore`, `psql`) with `args`, stdin piped, and
    /// returns it with its stdin as a blocking file. With a `target`, its
    /// password (if any) reaches the child only as PGPASSWORD.
    ///
    /// # Errors
    /// [`DumpError::Spawn`].
    pub fn spawn_fed(
        tool: &PgTool,
        target: Option<&PgTarget>,
        args: &[String],
    ) -> Result<(Self, std::fs::File), DumpError> {
        Self::start(tool, target, args, Pipe::Stdin, "backstop")
    }

    fn start(
        tool: &PgTool,
        target: Option<&PgTarget>,
        args: &[String],
        pipe: Pipe,
        app: &str,
    ) -> Result<(Self, std::fs::File), DumpError> {
        let mut cmd = Command::new(&tool.path);
        client_env(&mut cmd, pipe != Pipe::Stdin);
        cmd.args(args)
            .env("PGAPPNAME", app)
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT.as_secs().to_string())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match pipe {
            Pipe::Stdout => cmd.stdin(Stdio::null()).stdout(Stdio::piped()),
            Pipe::Stdin => cmd.stdin(Stdio::piped()).stdout(Stdio::null()),
            Pipe::Scripted => cmd.stdin(Stdio::piped()).stdout(Stdio::piped()),
        };
        if let Some(target) = target {
            let url = match pipe {
                // A dump's sessions carry backstop's name (PGAPPNAME).
                Pipe::Stdout | Pipe::Scripted => target.url_for_dump_tools(),
                Pipe::Stdin => target.url_without_password(),
            };
            cmd.arg(format!("--dbname={url}"));
            if let Some(pw) = target.password() {
                cmd.env("PGPASSWORD", pw);
            }
        }
        let name = tool.name();
        let mut child = cmd.spawn().map_err(|e| DumpError::Spawn {
            tool: format!("{} ({})", name, tool.path.display()),
            reason: e.to_string(),
        })?;
        let fd = match pipe {
            Pipe::Stdout | Pipe::Scripted => {
                child.stdout.take().expect("stdout piped").into_owned_fd()
            }
            Pipe::Stdin => child.stdin.take().expect("stdin piped").into_owned_fd(),
        };
        let file = fd.map(std::fs::File::from).map_err(|e| DumpError::Spawn {
            tool: name.clone(),
            reason: e.to_string(),
        })?;
        // A 1 MiB pipe instead of Linux's 64 KiB: a sixteenth of the reads
        // and wake-ups per GB (they were 9-16 % of backstop's CPU). Above
        // /proc/sys/fs/pipe-max-size it is refused, and the default stays.
        let _ = rustix::pipe::fcntl_setpipe_size(&file, PIPE_SIZE);
        let mut stderr = child.stderr.take().expect("stderr piped");
        let stderr = tokio::spawn(async move {
            // Keep the tail: the fatal message comes last.
            let mut kept: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * STDERR_KEEP {
                    kept.drain(..kept.len() - STDERR_KEEP);
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        });
        Ok((
            Self {
                tool: name,
                child,
                stderr,
                target: target.cloned(),
            },
            file,
        ))
    }

    /// The child's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the child and checks its exit status.
    ///
    /// # Errors
    /// [`DumpError::Exited`] with its (redacted) stderr if it did not exit 0.
    pub async fn finish(mut self) -> Result<String, DumpError> {
        let status = self.child.wait().await.map_err(|e| DumpError::Exited {
            tool: self.tool.clone(),
            status: "unknown".into(),
            stderr: e.to_string(),
        })?;
        let stderr = self.stderr.await.unwrap_or_default();
        let stderr = match &self.target {
            Some(t) => t.redact(stderr.trim()),
            None => stderr.trim().to_string(),
        };
        if status.success() {
            Ok(stderr)
        } else {
            let status = match status.code() {
                Some(c) => format!("exit status {c}"),
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    format!("killed by signal {}", status.signal().unwrap_or(0))
                }
            };
            Err(DumpError::Exited {
                tool: self.tool,
                status,
                stderr: if stderr.is_empty() {
                    "no error output".into()
                } else {
                    stderr
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// EPERM from connect fails without retries and names `backstop
    /// ip-allow`; a server that refuses is retried as before. (The drop-in
    /// comparison is tested end to end: backup::a_database_the_ip_allow_…)
    #[test]
    fn a_connection_this_host_refused_is_not_retried_and_says_what_to_do() {
        let target = PgTarget::new("postgres://app@10.0.0.5:6432/shop", Some("pw")).unwrap();
        let refused = sqlx::Error::Io(std::io::Error::from_raw_os_error(1));
        assert!(backstop_vocab::ipfilter::refused_by_this_host(&refused));
        let blocked = connect_error(&target, refused.to_string(), true, &[]);
        assert!(!blocked.is_retryable());
        let text = blocked.to_string();
        assert!(
            text.starts_with("cannot connect to app@10.0.0.5:6432/shop: ")
                && text.contains("this host refused the connection to app@10.0.0.5:6432/shop")
                && text.contains("backstop ip-allow"),
            "{text}"
        );
        let other = sqlx::Error::Io(std::io::Error::from_raw_os_error(111));
        assert!(!backstop_vocab::ipfilter::refused_by_this_host(&other));
        let retried = connect_error(&target, other.to_string(), false, &[]);
        assert!(retried.is_retryable());
        assert!(!retried.to_string().contains("ip-allow"), "{retried}");
    }
}
