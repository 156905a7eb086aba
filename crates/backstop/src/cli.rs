//! The command line: every subcommand, its arguments and its `--help`.

use std::path::PathBuf;

use backstop_config::DEFAULT_CONFIG_PATH;
use clap::{Parser, Subcommand, ValueEnum};

/// What `--version` says: the version, the git commit and the build date
/// (see build.rs); every manifest's `tool.version` records the same.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BACKSTOP_COMMIT"),
    ", built ",
    env!("BACKSTOP_BUILD_DATE"),
    ")"
);

/// Scheduled, streaming, encrypted, verified logical backups of PostgreSQL.
#[derive(Parser)]
#[command(name = "backstop", version = VERSION, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "BACKSTOP_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Log format on stderr (level from BACKSTOP_LOG, default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbeMode {
    Read,
    Write,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyLevel {
    Checksum,
    Decrypt,
    Restore,
}

impl From<VerifyLevel> for backstop_config::VerifyLevel {
    fn from(l: VerifyLevel) -> Self {
        match l {
            VerifyLevel::Checksum => Self::Checksum,
            VerifyLevel::Decrypt => Self::Decrypt,
            VerifyLevel::Restore => Self::Restore,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Validate the configuration and print a summary (exit 2 if invalid).
    CheckConfig {
        /// Also connect to every job's database (with the pre-flight checks: a
        /// transaction-mode pooler, tables the role cannot read, pg_dump's
        /// version, an IPv6-only host) and every store and report each on its
        /// own line (exit 1 if any fails). `--probe=write` also writes and
        /// deletes a probe object in each store.
        #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "read")]
        probe: Option<ProbeMode>,
    },
    /// Run one backup of a job now; exit 0 only if the backup is complete.
    Backup {
        /// The job to back up.
        #[arg(long)]
        job: String,
        /// Ask the running daemon (through its API, so its concurrency limit
        /// and no-overlap rule apply), print the run's progress and exit 0 only
        /// when the backup completed. Without a reachable daemon, runs here.
        #[arg(long)]
        wait: bool,
    },
    /// Apply the job's retention to each of its stores: print the plan (keep or
    /// delete, and why), then delete each pruned backup manifest first (so an
    /// interruption never leaves a manifest naming deleted files) and remove
    /// incomplete attempts older than retention.orphan_grace. Nothing is
    /// deleted from a store whose listing fails or is inconsistent. Backups
    /// S3 Object Lock protects are kept and shown as LOCKED; any other object
    /// that cannot be deleted is SKIPPED and makes the exit status 1.
    Prune {
        /// The job to prune.
        #[arg(long)]
        job: String,
        /// Which of the job's stores (default: every one, each on its own).
        #[arg(long)]
        storage: Option<String>,
        /// Print the plan and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One screen for on-call: every job's last run, last success against its
    /// RPO, next run, backups stored, latest size and its change, last verify;
    /// jobs needing attention first. Exit 1 if any job is failing or stale.
    Status {
        /// Print the rows as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a test notification through one `[notify.NAME]` (no retries) and
    /// say whether it was delivered; exit 1 if not.
    TestNotify {
        /// The notifier to test.
        #[arg(long)]
        notifier: String,
        /// The job name the test event carries (default: "test").
        #[arg(long)]
        job: Option<String>,
    },
    /// Run the daemon: schedule every job, serve /metrics, /healthz, /readyz,
    /// the run API and (daemon.status_page = true) the status page on
    /// daemon.listen. SIGHUP reloads the config; SIGTERM
    /// lets running jobs finish within daemon.shutdown_grace, then cancels them.
    Run,
    /// For a cluster scheduler (a Kubernetes CronJob) instead of the daemon:
    /// join the fleet, record the ticks due now (and those falling due
    /// while it works), reap dead nodes, claim and run pending work until
    /// nothing is left, leave. Exit 0 only if every run it executed
    /// succeeded and the catalog did not fail it. Needs a PostgreSQL
    /// catalog; any number of invocations may overlap (each run is claimed
    /// once).
    RunDue {
        /// Run what is due once and exit (the only mode).
        #[arg(long, required = true)]
        once: bool,
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Stop after this long (e.g. "50m"): runs going are interrupted and
        /// go back to pending for the next invocation; exit 1.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_runtime: Option<std::time::Duration>,
    },
    /// Apply the catalog's schema migrations (a PostgreSQL catalog: run it
    /// once per upgrade, before starting the nodes, on a direct connection
    /// rather than through a transaction pooler). Prints the schema version
    /// before and after.
    Migrate {
        /// Connect here instead of daemon.catalog (e.g. the database's own
        /// port when the nodes go through PgBouncer); no password in it: the
        /// config's catalog password is used.
        #[arg(long)]
        url: Option<String>,
    },
    /// Verify stored backups against their manifests; exit 1 on any mismatch.
    ///
    /// `checksum` re-reads every stored artifact and compares size and sha256
    /// (no private key needed). `decrypt` also decrypts and decompresses it,
    /// compares the plain sha256 and has `pg_restore --list` read the archive.
    /// `restore` restores into a scratch database on --target (created with a
    /// unique name, always dropped afterwards) and compares the inventory and
    /// every table's row count with the manifest. Each result is recorded in
    /// the catalog; `list` shows the latest.
    Verify {
        /// The job whose backups to verify (of a cluster job: every
        /// database's and the globals', unless --database).
        #[arg(long)]
        job: String,
        /// Of a cluster job, only this database.
        #[arg(long)]
        database: Option<String>,
        /// A backup id, `latest` or `all`.
        #[arg(long, default_value = "latest")]
        backup: String,
        /// What to check.
        #[arg(long, value_enum, default_value_t = VerifyLevel::Checksum)]
        level: VerifyLevel,
        /// Which of the job's stores (default: every one).
        #[arg(long)]
        storage: Option<String>,
        /// age identity file for `decrypt` and `restore` (default: the job's
        /// identity_file, then $CREDENTIALS_DIRECTORY/age-identity).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Server for `restore`'s scratch database, as
        /// postgres://user@host:port/postgres (default: the job's verify.target).
        /// Its password comes from --target-password-file, PGPASSWORD or ~/.pgpass.
        #[arg(long)]
        target: Option<String>,
        /// File holding the --target password.
        #[arg(long)]
        target_password_file: Option<PathBuf>,
        /// Instead: compare the backup's inventory and row counts with the live
        /// database now and print the differences (exit 1 if there are any).
        #[arg(long, conflicts_with_all = ["level", "target"])]
        against_live: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a database, streamed from the store through age
    /// and zstd into pg_restore (psql for plain dumps) without touching disk.
    ///
    /// Refuses, before changing anything, a target that already holds what the
    /// restore would create (unless --clean). SQL errors fail the restore; a
    /// serial restore runs in one transaction, so a failure leaves the target
    /// as it was.
    Restore(RestoreArgs),
    /// Write a stored artifact to a file, as stored (encrypted and compressed)
    /// or with --decrypt as the plain pg_dump archive, for use with stock
    /// tools. Checked against the manifest; nothing is left on failure.
    Download(DownloadArgs),
    /// The catalog as a cache of the stores.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// A disaster-recovery drill: restore the job's latest backup (of a
    /// cluster job: every database of its latest run) into scratch databases
    /// on --target-server, compare inventory and row counts with the
    /// manifests, drop them, and record how long it all took (the measured
    /// restore time; `backstop_job_restore_duration_seconds`). Exit 1 if any
    /// database failed, or the drill took longer than the job's rto.
    Drill {
        /// The job to drill.
        #[arg(long)]
        job: String,
        /// Server for the scratch databases, as postgres://user@host:port/postgres
        /// (default: the job's verify.target).
        #[arg(long)]
        target_server: Option<String>,
        /// File holding the --target-server password.
        #[arg(long)]
        target_password_file: Option<PathBuf>,
        /// age identity file (default: the job's identity_file).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Which of the job's stores (default: its first).
        #[arg(long)]
        storage: Option<String>,
        /// Databases restored at once (default: the job's parallel, else
        /// daemon.max_concurrent_jobs).
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make this host's signing key: writes FILE (the minisign secret key,
    /// mode 0600, no password: it signs unattended) and FILE.pub, and prints
    /// the public key for `trusted_keys`. Needs no configuration. Refuses to
    /// overwrite either file.
    Keygen {
        /// Where to write the secret key (e.g. /etc/backstop/signing.key).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the shell completion script for SHELL on stdout (the package
    /// installs bash's, zsh's and fish's). Needs no configuration. E.g.
    /// `backstop completions bash > /etc/bash_completion.d/backstop`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a systemd drop-in that lets the service reach only what this
    /// configuration needs: IPAddressDeny=any, then loopback and the
    /// addresses of every job's database and verify server, a PostgreSQL
    /// catalog, every S3 store and notifier (names resolved now, each
    /// commented with what needs it) and the DNS resolvers. Exit 1, writing
    /// nothing, when something cannot be pinned to addresses: a name that
    /// does not resolve, AWS S3 without --aws-ip-ranges, a listener off
    /// loopback without --allow. Write it again after changing the config.
    IpAllow {
        /// Also allow this address or network, e.g. the Prometheus servers'
        /// when daemon.listen is not loopback (repeatable).
        #[arg(long, value_name = "CIDR")]
        allow: Vec<crate::commands::ip_allow::Prefix>,
        /// AWS's published ranges (https://ip-ranges.amazonaws.com/ip-ranges.json,
        /// downloaded): allow the S3 prefixes of each AWS store's region.
        #[arg(long, value_name = "FILE")]
        aws_ip_ranges: Option<PathBuf>,
        /// Write the drop-in to FILE (whole or not at all, 0644, its folder
        /// made) instead of printing it, e.g.
        /// /etc/systemd/system/backstop.service.d/ip-allow.conf.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Write the man pages (backstop.1 and one per command) into DIR; what
    /// the package ships. Needs no configuration.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Sign the manifests (and verification records) of backups made before
    /// this host had a signing key (daemon.signing_key_file), after checking
    /// each: where it lies, its times, its artifacts' names, every artifact
    /// re-read from the store against its recorded size and sha256, and that
    /// this host's catalog recorded making it (so nothing planted in the
    /// bucket is vouched for). A manifest with a signature that does not
    /// verify is never signed over. Exit 1 if any was refused.
    Sign {
        /// The job whose backups to sign (of a cluster job: every database's
        /// and the globals').
        #[arg(long)]
        job: String,
        /// A backup id, or `all`.
        #[arg(long)]
        backup: String,
        /// With one backup id: sign it even though this host's catalog has
        /// no record of making it (a lost catalog). Only after checking by
        /// hand that it is genuine.
        #[arg(long)]
        force: bool,
        /// Which of the job's stores (default: every one).
        #[arg(long)]
        storage: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a job's complete backups (those with a manifest), newest first;
    /// of a cluster job every database's (and the globals'), each under a
    /// heading. VERIFIED is the latest verification, from the catalog or
    /// the store's own records (which survive the catalog). What lies in the
    /// store posing as a backup but is not trusted (unsigned where
    /// trusted_keys is set, altered, not matching its folder) is shown as
    /// UNTRUSTED with the reason.
    List {
        /// The job whose backups to list.
        #[arg(long)]
        job: String,
        /// Of a cluster job, only this database.
        #[arg(long)]
        database: Option<String>,
        /// Which of the job's stores to list (default: its first).
        #[arg(long)]
        storage: Option<String>,
        /// Print the manifests as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `backstop catalog …`.
#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Rebuild the catalog from the stores: every backup their manifests
    /// describe becomes an imported run, every verification record a
    /// verification; what the catalog already has is left alone. For a new
    /// host or a lost catalog (the daemon does it by itself at start when
    /// the catalog has no backups and the stores do).
    Rebuild {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}: give an RFC 3339 time such as 2026-12-01T03:00:00Z"))
}

/// Which backup `restore` and `download` read.
#[derive(Debug, clap::Args)]
pub struct OneBackup {
    /// The job whose backup to read.
    #[arg(long)]
    pub job: String,
    /// A backup id or `latest`.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Of a cluster job, the database whose backup to read.
    #[arg(long)]
    pub database: Option<String>,
    /// Which of the job's stores to read (default: its first).
    #[arg(long)]
    pub storage: Option<String>,
}

// `backstop restore`'s arguments (its help is on Command::Restore).
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub from: OneBackup,
    /// Target database, as postgres://user@host:port/dbname. Its password
    /// comes from --target-password-file, PGPASSWORD or ~/.pgpass, never
    /// the URL (arguments are visible to every user in `ps`).
    #[arg(long, required_unless_present = "all_databases")]
    pub target: Option<String>,
    /// Restore a cluster job's whole server: its roles and tablespaces
    /// first, then every database of one run (the latest, or the latest at
    /// or before --at) under its own name on --target-server, --parallel at
    /// a time, each checked against its manifest; one summary at the end,
    /// exit 1 if any failed.
    #[arg(long, requires = "target_server", conflicts_with_all = ["target", "database", "tables", "schema_only", "data_only", "clean", "globals"])]
    pub all_databases: bool,
    /// The server for --all-databases, as postgres://user@host:port/ (a
    /// superuser: it creates roles and databases).
    #[arg(long, requires = "all_databases")]
    pub target_server: Option<String>,
    /// With --all-databases: the latest run started at or before this time
    /// (RFC 3339, e.g. 2026-12-01T03:00:00Z; default: the latest run).
    #[arg(long, requires = "all_databases", value_parser = parse_time)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// With --all-databases: a database whose backup in the chosen run
    /// failed or cannot be read is restored from its latest earlier backup
    /// (said so in the summary). Without it that database fails, named,
    /// and the restore exits 1.
    #[arg(long, requires = "all_databases")]
    pub allow_older: bool,
    /// With --all-databases: databases restored at once.
    #[arg(
        long,
        default_value_t = 2,
        value_name = "N",
        requires = "all_databases"
    )]
    pub parallel: usize,
    /// File holding the --target password.
    #[arg(long)]
    pub target_password_file: Option<PathBuf>,
    /// age identity file (default: the job's identity_file, then
    /// $CREDENTIALS_DIRECTORY/age-identity under systemd).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Restore only this table, as SCHEMA.NAME (repeatable; one schema per
    /// run). Restores its definition and data, not its indexes or
    /// constraints; with --data-only just its rows.
    #[arg(long = "table", value_name = "SCHEMA.NAME")]
    pub tables: Vec<String>,
    /// Restore object definitions only.
    #[arg(long, conflicts_with = "data_only")]
    pub schema_only: bool,
    /// Restore rows only, into existing empty tables.
    #[arg(long)]
    pub data_only: bool,
    /// Drop the backup's objects (if they exist) before recreating them.
    #[arg(long, conflicts_with = "data_only")]
    pub clean: bool,
    /// Accepted for pg_restore habit; --clean always uses IF EXISTS.
    #[arg(long, requires = "clean")]
    pub if_exists: bool,
    /// Create the target database (from template0) if it does not exist.
    #[arg(long)]
    pub create_db: bool,
    /// Do not restore ownership (objects belong to the connecting user).
    #[arg(long)]
    pub no_owner: bool,
    /// Do not restore GRANTs.
    #[arg(long)]
    pub no_privileges: bool,
    /// Disable triggers, foreign keys included, while loading data
    /// (superuser only); for --data-only restores of single tables.
    #[arg(long)]
    pub disable_triggers: bool,
    /// Also apply the backup's roles and tablespaces first (existing roles
    /// are kept and altered, not recreated).
    #[arg(long)]
    pub globals: bool,
    /// Restore over N connections. A backup in streams (the job's
    /// `streams` above 1) is fed straight from the store, one artifact a
    /// connection, and restores over as many connections as it was dumped
    /// with unless told otherwise. For a one-stream backup, pg_restore
    /// needs a seekable file, so the decrypted archive is first written to
    /// a private temp file (0600, in --temp-dir) and removed afterwards.
    /// Either way a parallel restore cannot run in one transaction.
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<u32>,
    /// Directory for --jobs' temp file (default: $TMPDIR or /tmp).
    #[arg(long)]
    pub temp_dir: Option<PathBuf>,
}

// `backstop download`'s arguments (its help is on Command::Download).
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub from: OneBackup,
    /// Which artifact, by its file name without extensions: `database`
    /// (the default), `globals`, or for a backup in streams `pre-data`,
    /// `data-01` …, `data-rest`, `post-data`.
    #[arg(long, default_value = "database", value_name = "NAME")]
    pub artifact: String,
    /// Output file (created 0600; must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Decrypt and decompress: write the plain pg_dump output.
    #[arg(long)]
    pub decrypt: bool,
    /// age identity file for --decrypt (default: the job's identity_file).
    #[arg(long, requires = "decrypt")]
    pub identity: Option<PathBuf>,
}
