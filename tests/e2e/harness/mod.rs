//! Shared set-up for end-to-end tests: a real PostgreSQL per test, real age
//! keys from the stock `age-keygen`, and the real `backstop` binary.

pub mod browser;
pub mod daemon;
pub mod pg;
pub mod pgbouncer;
pub mod receivers;
pub mod s3;
pub mod s3proxy;
pub mod stall;

use std::path::{Path, PathBuf};
use std::process::Stdio;

pub use pg::PgCluster;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The binary under test: this build's, or `BACKSTOP_E2E_BIN` (to run a
/// test against another build, e.g. to see an attack test fail against
/// the code before its fix).
pub fn backstop_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("BACKSTOP_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_backstop").into())
    })
}

/// What `backstop --version` says after "backstop ": the version, the
/// commit and the build date, as manifests, the notifier's User-Agent and
/// the build_info metric record them.
pub fn backstop_version() -> String {
    let out = std::process::Command::new(backstop_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8(out.stdout).unwrap();
    line.trim_end()
        .strip_prefix("backstop ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string()
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Everything it printed, for secret scans.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.ok(),
            "command failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn assert_failed(&self) -> &Self {
        assert!(
            !self.ok() && self.code.is_some(),
            "command should have failed ({:?})\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// One test's world: a PostgreSQL cluster with the marketplace database, a
/// key pair, a password file, a store directory and a config.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pg: PgCluster,
    pub identity: PathBuf,
    pub recipient: String,
    pub password_file: PathBuf,
}

impl Env {
    /// A cluster with the marketplace fixture in database `marketplace`.
    pub async fn new() -> Self {
        let env = Self::empty().await;
        env.pg.marketplace("marketplace").await;
        env
    }

    /// A cluster with no user database.
    pub async fn empty() -> Self {
        let pg = PgCluster::start();
        let dir = tempfile::Builder::new()
            .prefix("backstop-e2e-")
            .tempdir()
            .unwrap();
        let identity = dir.path().join("age-identity.txt");
        let out = std::process::Command::new("age-keygen")
            .arg("-o")
            .arg(&identity)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "age-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("age-keygen")
            .arg("-y")
            .arg(&identity)
            .output()
            .unwrap();
        let recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let password_file = dir.path().join("db-password");
        write_private(&password_file, &format!("{}\n", pg.password));
        Env {
            dir,
            pg,
            identity,
            recipient,
            password_file,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every file the SQLite catalog owns (the database, its WAL and
    /// shared-memory files), for secret scans.
    pub fn catalog_files(&self) -> Vec<PathBuf> {
        walk(self.dir.path())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("catalog.db")
            })
            .collect()
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// The config header (catalog, a local store, the default age profile).
    pub fn header(&self) -> String {
        format!(
            "[daemon]\ncatalog = \"sqlite://{catalog}\"\n\n[storage.local]\ntype = \"local\"\npath = \"{store}\"\n\n[encryption.default]\nrecipients = [\"{recipient}\"]\n\n",
            catalog = self.path("catalog.db").display(),
            store = self.store().display(),
            recipient = self.recipient,
        )
    }

    /// A `[[job]]` named `name` backing up `db` with the password file and `extra` lines.
    pub fn job(&self, name: &str, db: &str, extra: &str) -> String {
        format!(
            "[[job]]\nname = \"{name}\"\ndatabase = {{ url = \"{url}\", password_file = \"{pw}\" }}\nstorage = [\"local\"]\n{extra}\n\n",
            url = self.pg.url(db),
            pw = self.password_file.display(),
        )
    }

    /// Writes `backstop.toml` with the header, extra `[storage.*]` tables for
    /// `s3` (its secret written to a private file) and `jobs`.
    pub fn write_config_with_s3(
        &self,
        s3: &s3::S3Server,
        extra_storage: &str,
        jobs: &str,
    ) -> PathBuf {
        let secret = self.path("s3-secret");
        write_private(&secret, &format!("{}\n", s3::SECRET_KEY));
        let storage = s3
            .storage_toml("offsite", extra_storage)
            .replace("{SECRET_FILE}", &secret.display().to_string());
        let p = self.path("backstop.toml");
        std::fs::write(&p, format!("{}{storage}{jobs}", self.header())).unwrap();
        p
    }

    /// A job like [`Env::job`] writing to the given stores.
    pub fn job_to(&self, name: &str, db: &str, stores: &[&str], extra: &str) -> String {
        let list: Vec<String> = stores.iter().map(|s| format!("\"{s}\"")).collect();
        self.job(name, db, extra).replace(
            "storage = [\"local\"]",
            &format!("storage = [{}]", list.join(", ")),
        )
    }

    /// Writes `backstop.toml` from the header and `jobs`.
    pub fn write_config(&self, jobs: &str) -> PathBuf {
        let p = self.path("backstop.toml");
        std::fs::write(&p, format!("{}{jobs}", self.header())).unwrap();
        p
    }

    pub async fn backstop(&self, args: &[&str]) -> Run {
        run_backstop(&self.path("backstop.toml"), args).await
    }

    /// Every file and folder under the store, temporary ones included.
    /// Asserts the local store holds no file (a failed or interrupted
    /// backup left nothing behind).
    pub fn assert_store_empty(&self) {
        let left: Vec<_> = self
            .store_entries()
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        assert!(left.is_empty(), "left in the store: {left:?}");
    }

    pub fn store_entries(&self) -> Vec<PathBuf> {
        walk_all(&self.store())
    }

    /// The one backup folder of `job` (asserting there is exactly one).
    pub fn only_backup(&self, job: &str) -> PathBuf {
        let dirs: Vec<_> = std::fs::read_dir(self.store().join(job))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(dirs.len(), 1, "expected one backup of {job}: {dirs:?}");
        dirs.into_iter().next().unwrap()
    }
}

pub async fn run_backstop(config: &Path, args: &[&str]) -> Run {
    run_backstop_with(config, args, &[]).await
}

/// [`run_backstop`] with extra environment variables (they win over the
/// defaults, `BACKSTOP_LOG=info` included).
pub async fn run_backstop_with(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let out = tokio::process::Command::new(backstop_bin())
        .args(args)
        .env("BACKSTOP_CONFIG", config)
        .env("BACKSTOP_LOG", "info")
        .env("NO_COLOR", "1")
        // Never let the AWS credential chain look for instance metadata.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(envs.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    Run::from(out)
}

/// `backstop ARGS` on `config` started in the background (killed if
/// dropped), its output piped, for a test that signals or kills it.
pub fn spawn_backstop(config: &Path, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(backstop_bin())
        .args(args)
        .env("BACKSTOP_CONFIG", config)
        .env("BACKSTOP_LOG", "info")
        .env("NO_COLOR", "1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Sends `sig` (`-TERM`, `-STOP`, …) to process `pid`.
pub fn kill(sig: &str, pid: impl std::fmt::Display) {
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill {sig} {pid}"
    );
}

pub fn write_private(path: &Path, body: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(body.as_bytes()).unwrap();
}

/// Files and folders under `root`.
pub fn walk_all(root: &Path) -> Vec<PathBuf> {
    walk_with(root, true)
}

/// Files under `root`.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    walk_with(root, false)
}

fn walk_with(root: &Path, dirs: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_with(&p, dirs));
            if dirs {
                out.push(p);
            }
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs a shell pipeline (stock tools) and returns its output.
pub fn sh(script: &str) -> Run {
    let out = std::process::Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::from(out)
}

pub fn manifest(backup_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).unwrap()).unwrap()
}

/// Writes an executable at `wrapper` that records its argv, its
/// /proc/self/cmdline and whether PGPASSWORD is set into `log` (except for
/// `--version`), then runs `real` with the same arguments.
pub fn argv_recorder(wrapper: &Path, real: &Path, log: &Path) {
    std::fs::write(
        wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" != --version ]; then printf '%s\\n' \"$@\" > '{log}'; cat /proc/$$/cmdline | tr '\\0' ' ' >> '{log}'; [ -n \"$PGPASSWORD\" ] && echo PGPASSWORD-set >> '{log}'; fi\nexec '{real}' \"$@\"\n",
            log = log.display(),
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// Whether process `pid` holds the listening TCP socket on loopback `port`:
/// the kernel's own answer to "is the server on this port the one this test
/// started?" (a port chosen by bind-and-release can be taken by another
/// test's server, and they share database names and fixtures).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    let inodes: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let listening = f.get(1)?.ends_with(&want) && *f.get(3)? == "0A";
            let inode = f.get(9)?;
            listening.then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|t| inodes.iter().any(|i| t.to_string_lossy() == *i))
    })
}

pub use pg::is_root;

/// A pg_dump stand-in at `env.path(name)`: `--version` goes to the real
/// pg_dump; anything else runs `body` (bash, `$REAL` the real pg_dump).
/// Returns the job's `pg_dump_path = "…"` line.
pub fn pg_dump_wrapper(env: &Env, name: &str, body: &str) -> String {
    let real = pg::pg_bin().join("pg_dump");
    let w = env.path(name);
    std::fs::write(
        &w,
        format!(
            "#!/bin/bash\nREAL='{}'\nif [ \"$1\" = --version ]; then exec \"$REAL\" \"$@\"; fi\n{body}\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!("pg_dump_path = \"{}\"", w.display())
}

/// A `pg_bin_dir` in the test's folder: each of `wrapped` a bash script of
/// that body, every other client tool the real one.
pub fn wrapped_bin(env: &Env, wrapped: &[(&str, String)]) -> std::path::PathBuf {
    let bin = env.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let real = pg::pg_bin();
    for tool in ["pg_dump", "pg_dumpall", "pg_restore", "psql"] {
        match wrapped.iter().find(|(name, _)| *name == tool) {
            Some((_, body)) => {
                let w = bin.join(tool);
                std::fs::write(&w, format!("#!/bin/bash\n{body}\n")).unwrap();
                std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .unwrap();
            }
            None => std::os::unix::fs::symlink(real.join(tool), bin.join(tool)).unwrap(),
        }
    }
    bin
}

/// A `pg_bin_dir` at `env.path(name)` whose pg_restore waits `secs` before
/// it starts (the other tools are the real ones): a restore check that is
/// still going while its scratch database exists.
pub fn slow_pg_restore_dir(env: &Env, name: &str, secs: u32) -> PathBuf {
    let bin = env.path(name);
    std::fs::create_dir(&bin).unwrap();
    let real = pg::pg_bin();
    for tool in ["pg_dump", "pg_dumpall", "psql"] {
        std::os::unix::fs::symlink(real.join(tool), bin.join(tool)).unwrap();
    }
    let restore = bin.join("pg_restore");
    std::fs::write(
        &restore,
        format!(
            "#!/bin/bash\nif [ \"$1\" != --version ]; then sleep {secs}; fi\nexec '{}' \"$@\"\n",
            real.join("pg_restore").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &restore,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    bin
}
