//! Throwaway PostgreSQL clusters: `initdb` + `pg_ctl` in a temp dir on a
//! free loopback port, run as a non-root user, with password authentication
//! over TCP so wrong passwords can be tested. Each test gets its own server
//! and may stop, kill (SIGKILL) or restart it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub const SUPERUSER: &str = "postgres";

/// The newest `/usr/lib/postgresql/N/bin`.
pub fn pg_bin() -> PathBuf {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (Debian package postgresql) are installed")
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
        .1
}

/// The user the server runs as when the tests run as root.
fn run_as() -> Option<(String, u32, u32)> {
    if !is_root() {
        return None;
    }
    for user in ["postgres", "nobody"] {
        let uid = Command::new("id").args(["-u", user]).output().ok()?;
        let gid = Command::new("id").args(["-g", user]).output().ok()?;
        if uid.status.success() {
            let parse = |o: std::process::Output| {
                String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
            };
            return Some((user.to_string(), parse(uid), parse(gid)));
        }
    }
    panic!("running as root but neither a postgres nor a nobody user exists");
}

pub fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Runs a PostgreSQL server program as the server's user.
pub fn pg_command(program: &Path) -> Command {
    match run_as() {
        Some((user, _, _)) => {
            let mut c = Command::new("runuser");
            c.args(["-u", &user, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

pub fn chown_to_server(path: &Path) {
    if let Some((_, uid, gid)) = run_as() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// A temporary directory the server's user owns (mode 0755), for what a
/// server program run through [`pg_command`] reads and writes.
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    chown_to_server(dir.path());
    dir
}

/// A data directory made once by initdb and copied for every cluster: initdb
/// is the slow part of starting a server.
fn template() -> &'static (tempfile::TempDir, String) {
    static T: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    T.get_or_init(|| {
        let dir = server_dir("backstop-pg-template-");
        let password = format!("pw-{:016x}", rand_u64());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        chown_to_server(&pwfile);
        let out = pg_command(&pg_bin().join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                SUPERUSER,
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, password)
    })
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// A free TCP port on loopback (released before the server binds it; a
/// collision makes `start` fail and retry on another).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    pub password: String,
}

impl PgCluster {
    /// A hot standby of this cluster, streaming from it on loopback
    /// (`pg_basebackup -R -X stream`), with `settings` (postgresql.conf
    /// lines such as `max_standby_streaming_delay = 1s`) added; it has
    /// this cluster's data and password.
    pub fn standby(&self, settings: &str) -> PgCluster {
        let dir = server_dir("backstop-standby-");
        let out = pg_command(&pg_bin().join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "-c", "fast"])
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let auto = dir.path().join("data/postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap();
        conf.push_str(&format!("hot_standby = on\n{settings}\n"));
        std::fs::write(&auto, conf).unwrap();
        chown_to_server(&auto);
        let mut c = PgCluster {
            dir,
            port: 0,
            password: self.password.clone(),
        };
        c.boot();
        c
    }
}

impl PgCluster {
    /// Starts a new, empty cluster.
    pub fn start() -> Self {
        let (tpl, password) = template();
        let dir = server_dir("backstop-pg-");
        let status = Command::new("cp")
            .arg("-a")
            .arg(tpl.path().join("data"))
            .arg(dir.path().join("data"))
            .status()
            .unwrap();
        assert!(status.success());
        chown_to_server(dir.path());
        let mut c = PgCluster {
            dir,
            port: 0,
            password: password.clone(),
        };
        c.boot();
        c.own_password();
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn boot(&mut self) {
        for _ in 0..5 {
            if self.port == 0 {
                self.port = free_port();
            }
            let out = pg_command(&pg_bin().join("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=30 -c max_locks_per_transaction=256",
                    self.port,
                    self.dir.path().display()
                ))
                .arg("start")
                .output()
                .unwrap();
            if out.status.success() && self.listens() {
                return;
            }
            // Probably a port collision: try another.
            self.stop();
            self.port = 0;
        }
        panic!("could not start PostgreSQL; log:\n{}", self.log());
    }

    /// Whether the postmaster of this data directory (its pid from
    /// postmaster.pid) holds the listening socket on our port: pg_ctl -w
    /// only proves the server started, not that the port is its own.
    fn listens(&self) -> bool {
        let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
        pid.is_some_and(|pid| super::listens_on(pid, self.port))
    }

    /// Gives this cluster's superuser a password of its own (over the
    /// Unix socket, where the template trusts local connections), so that a
    /// test reaching another test's server by mistake is refused.
    fn own_password(&mut self) {
        let password = format!("pw-{:016x}", rand_u64());
        let out = Command::new(pg_bin().join("psql"))
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c"])
            .arg(format!("ALTER ROLE {SUPERUSER} PASSWORD '{password}'"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot set the cluster's password: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.password = password;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server cleanly.
    pub fn stop(&self) {
        let _ = pg_command(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    /// SIGKILLs the postmaster (a crash, not a shutdown).
    pub fn kill(&self) {
        let pidfile =
            std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        if let Some(pid) = pidfile.lines().next() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }

    /// Makes the server refuse every connection to database `db` (a
    /// `reject` line first in pg_hba.conf, then a reload), as a broken or
    /// firewalled database would.
    pub fn reject_connections_to(&self, db: &str) {
        let hba = self.data().join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host \"{db}\" all 127.0.0.1/32 reject\n{old}"),
        )
        .unwrap();
        let out = pg_command(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("reload")
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl reload failed");
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }

    /// `postgres://postgres@127.0.0.1:PORT/db` (no password: it travels separately).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    pub async fn connect(&self, db: &str) -> PgConnection {
        let opts: sqlx::postgres::PgConnectOptions = self.url(db).parse().unwrap();
        PgConnection::connect_with(&opts.password(&self.password))
            .await
            .unwrap()
    }

    pub async fn execute(&self, db: &str, sql: &str) {
        let mut c = self.connect(db).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await
            .unwrap();
    }

    pub async fn create_db(&self, db: &str) {
        self.execute("postgres", &format!("CREATE DATABASE \"{db}\""))
            .await;
    }

    /// Runs a SQL file with psql (for `\gset` and friends), stopping on error.
    pub fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) {
        let mut cmd = Command::new(pg_bin().join("psql"));
        cmd.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            SUPERUSER,
        ])
        .args(["-p", &self.port.to_string(), "-d", db, "-f"])
        .arg(file)
        .env("PGPASSWORD", &self.password);
        if !vars.is_empty() {
            let opts: Vec<String> = vars.iter().map(|(k, v)| format!("-c {k}={v}")).collect();
            cmd.env("PGOPTIONS", opts.join(" "));
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "psql -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates `db` and loads the marketplace fixture into it.
    pub async fn marketplace(&self, db: &str) {
        self.create_db(db).await;
        self.psql_file(
            db,
            &super::repo().join("tests/fixtures/marketplace.sql"),
            &[],
        );
    }

    /// Adds the production-shapes fixture (partitions, inheritance, an
    /// unlogged table, a materialized view, mixed-case names, a large
    /// object) to the existing database `db`.
    pub fn shapes(&self, db: &str) {
        self.psql_file(db, &super::repo().join("tests/fixtures/shapes.sql"), &[]);
    }

    /// `SELECT count(*) FROM ONLY` every user table (partitioned parents
    /// count 0, inheritance parents exclude their children), by
    /// `schema.table`.
    pub async fn row_counts(&self, db: &str) -> std::collections::BTreeMap<String, i64> {
        let mut c = self.connect(db).await;
        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT schemaname::text, tablename::text FROM pg_tables
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        let mut out = std::collections::BTreeMap::new();
        for (s, t) in tables {
            let sql = format!(
                "SELECT count(*) FROM ONLY \"{}\".\"{}\"",
                s.replace('"', "\"\""),
                t.replace('"', "\"\"")
            );
            let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut c)
                .await
                .unwrap();
            out.insert(format!("{s}.{t}"), n);
        }
        out
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = pg_command(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
