//! Configuration: the first stage of every backstop run.
//!
//! The TOML file is parsed into a raw, span-carrying schema ([`raw`]) and then
//! validated into [`Config`], a separate type in which every reference
//! (storage, encryption profile, secret) has been resolved. Every problem is
//! reported as `file:line:column: message` with a hint on how to fix it, so a
//! typo such as `schedul` is an error and never a silently ignored key.

pub mod budget;
mod check;
pub mod credentials;
mod notify;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

pub use check::{human_bytes, parse_duration, parse_size};
pub use notify::{
    Channel, DEFAULT_NOTIFY_ON, EmailConfig, HttpMethod, NotifierConfig, NotifyOn, SmtpTls,
};

/// Where the config is read from when neither `--config` nor `BACKSTOP_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/backstop/backstop.toml";
/// The catalog used when `daemon.catalog` is not set.
pub const DEFAULT_CATALOG: &str = "sqlite:///var/lib/backstop/catalog.db";

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call sites are the few places that hand it to a
    /// connection or a child's environment.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from.
    pub source: PathBuf,
    /// sqlx URL of the run catalog.
    pub catalog: String,
    pub storages: BTreeMap<String, StorageConfig>,
    pub jobs: Vec<JobConfig>,
    pub daemon: DaemonConfig,
    /// `[notify.NAME]` sections, by name.
    pub notifiers: BTreeMap<String, NotifierConfig>,
    /// A digest of the file's settings (not its comments or layout): the
    /// nodes of a fleet publish it, and disagreeing nodes are reported.
    pub hash: String,
}

/// Default HTTP listener: loopback only; 9187 is postgres_exporter's.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9871";

/// Connections a process opens to a PostgreSQL catalog unless
/// `daemon.catalog_connections` says otherwise: the lease's renewal and a
/// few runs' short transactions at once.
pub const DEFAULT_CATALOG_CONNECTIONS: u32 = 4;

/// How long the catalog keeps runs that ended (`daemon.catalog_history`).
pub const DEFAULT_CATALOG_HISTORY: std::time::Duration =
    std::time::Duration::from_secs(90 * 86_400);

/// How `backstop run` behaves.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where /metrics, /healthz, /readyz and the API listen.
    pub listen: std::net::SocketAddr,
    /// Runs at once; more wait their turn.
    pub max_concurrent_jobs: usize,
    /// How long running jobs may finish after SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    /// The bearer token of the run API; `None` disables the API.
    pub api_token: Option<Secret>,
    /// Serve the read-only status page (`/`, `/jobs/NAME`) and
    /// `/api/v1/status` on the listener.
    pub status_page: bool,
    /// A token that reads the status page and nothing else (the API token
    /// reads it too). One of them is required when the listener is not
    /// loopback.
    pub status_token: Option<Secret>,
    /// The password of a PostgreSQL catalog (from
    /// `catalog_password_file` or `catalog_password_env`).
    pub catalog_password: Option<Secret>,
    /// The most connections this process opens to a PostgreSQL catalog
    /// (each operation holds one for a short transaction; idle ones are
    /// closed after a minute). A fleet's nodes together need up to the sum
    /// of theirs, within the server's `max_connections`.
    pub catalog_connections: u32,
    /// How long the catalog keeps the runs that ended (`catalog_history`,
    /// default 90 days): older ones are deleted a bounded batch at a time,
    /// except each job's newest of every kind and outcome (its last
    /// success, last failure, last drill…), which status and the metrics
    /// read. The backups themselves live in the stores, not here.
    pub catalog_history: Duration,
    /// How long a fleet node's claim on its runs lasts without a heartbeat.
    pub lease: Duration,
    /// How often a fleet node renews its lease, reaps dead nodes and looks
    /// for pending runs.
    pub heartbeat: Duration,
    /// The key this host signs manifests and verification records with
    /// (`signing_key_file`, a minisign secret key without a password).
    pub signing_key: Option<std::sync::Arc<backstop_crypto::sign::SigningKey>>,
    /// Public keys whose signatures make what a store holds trustworthy:
    /// `trusted_keys` and the signing key's own. Empty: nothing is signed
    /// or checked (a warning says so).
    pub trusted_keys: backstop_crypto::sign::TrustedKeys,
}

impl DaemonConfig {
    /// The tokens that may read the status page: the read token and the
    /// API token. Empty means the page is open (a loopback listener only:
    /// validation refuses a page on another address without a token).
    pub fn status_tokens(&self) -> Vec<&Secret> {
        self.status_token.iter().chain(&self.api_token).collect()
    }

    /// How long a node trusts its lease after its last successful renewal:
    /// one heartbeat less than the lease, so it stops its runs before any
    /// other node may reap them.
    pub fn lease_trust(&self) -> Duration {
        self.lease.saturating_sub(self.heartbeat)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`]
    /// with one diagnostic per problem otherwise.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Validates `text` as if it had been read from `path` (used for messages
    /// and to resolve relative secret files).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with one diagnostic per problem.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        validate::validate(path, text)
    }

    /// The job called `name`.
    pub fn job(&self, name: &str) -> Option<&JobConfig> {
        self.jobs.iter().find(|j| j.name == name)
    }
}

/// A storage backend a job can write to.
// A config holds a handful of these: boxing the S3 variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// A local directory: `<path>/<job>/<backup-id>/`.
    Local { path: PathBuf },
    /// An S3 bucket or S3-compatible store: `<prefix><job>/<backup-id>/`.
    S3(S3Config),
}

impl StorageConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StorageConfig::Local { .. } => "local",
            StorageConfig::S3(_) => "s3",
        }
    }

    /// Where it is, for people (never credentials).
    pub fn describe(&self) -> String {
        match self {
            StorageConfig::Local { path } => format!("local directory {}", path.display()),
            StorageConfig::S3(s) => {
                let mut d = format!("s3://{}/{}", s.bucket, s.prefix);
                if let Some(e) = &s.endpoint {
                    d.push_str(&format!(" at {e}"));
                }
                d.push_str(&format!(" ({})", s.region));
                d
            }
        }
    }
}

/// Smallest part S3 accepts (except the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Settings of an S3 store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix, empty or ending in `/`.
    pub prefix: String,
    pub region: String,
    /// For S3-compatible stores (MinIO, Garage, Ceph, R2 …).
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    pub storage_class: Option<String>,
    /// `AES256` or `aws:kms`.
    pub sse: Option<String>,
    pub kms_key_id: Option<String>,
    /// Explicit credentials; `None` uses the standard AWS chain.
    pub credentials: Option<S3Credentials>,
    /// The least part size; `None` chooses it from the job's
    /// `memory_budget` (see [`budget::PartPlan`]), larger when an object's
    /// expected size needs it.
    pub part_size: Option<u64>,
    /// Parts uploaded at once at most; `None` chooses from the budget.
    pub max_in_flight_parts: Option<usize>,
    /// Parts one object may have (1–10,000; default 10,000).
    pub max_parts: u32,
    /// Every part the same size (default); false lets parts grow past the
    /// plan, on providers that accept unequal parts.
    pub equal_parts: bool,
}

/// Static credentials resolved from the environment or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// pg_dump's output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DumpFormat {
    /// `pg_dump -Fc`: restorable selectively with `pg_restore`.
    #[default]
    Custom,
    /// `pg_dump -Fp`: SQL text, restored with `psql`.
    Plain,
}

impl DumpFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DumpFormat::Custom => "custom",
            DumpFormat::Plain => "plain",
        }
    }
}

/// What part of the database is dumped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Full,
    Schema,
    Data,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Schema => "schema",
            Scope::Data => "data",
        }
    }
}

/// How per-table row counts in the manifest are obtained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowCounts {
    /// Counted from the dump stream itself as it passes through (no extra scan).
    #[default]
    Exact,
    /// `pg_class.reltuples`, read in the dump's snapshot.
    Estimate,
    /// Not recorded.
    Off,
}

impl RowCounts {
    pub fn as_str(self) -> &'static str {
        match self {
            RowCounts::Exact => "exact",
            RowCounts::Estimate => "estimate",
            RowCounts::Off => "off",
        }
    }
}

/// How deeply a backup is verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyLevel {
    /// Re-read the stored bytes and compare size and sha256 with the manifest (no key).
    #[default]
    Checksum,
    /// Decrypt and decompress, compare the plain sha256, and have pg_restore read the archive.
    Decrypt,
    /// Restore into a scratch database and compare inventory and row counts.
    Restore,
}

impl VerifyLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyLevel::Checksum => "checksum",
            VerifyLevel::Decrypt => "decrypt",
            VerifyLevel::Restore => "restore",
        }
    }

    /// Whether this level reads an age identity.
    pub fn needs_identity(self) -> bool {
        self != VerifyLevel::Checksum
    }
}

/// A job's scheduled verification (`verify = { … }`), run by the daemon.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub schedule: Schedule,
    pub level: VerifyLevel,
    /// The server scratch databases are created on (level `restore`).
    pub target: Option<DatabaseConfig>,
    /// The age identity for levels `decrypt` and `restore` (else the job's).
    pub identity_file: Option<PathBuf>,
}

/// Compression applied by backstop (pg_dump's own is always off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd {
        level: i32,
    },
    /// `zstd:auto`: the level moves within [`ZSTD_AUTO_LEVELS`] with where
    /// the stream waits (see the pipeline's `adapt`).
    ZstdAuto,
}

/// The levels `zstd:auto` moves between.
pub const ZSTD_AUTO_LEVELS: std::ops::RangeInclusive<i32> = 1..=6;

impl Compression {
    /// Whether the output is a zstd frame.
    pub fn is_zstd(self) -> bool {
        !matches!(self, Compression::None)
    }

    /// The highest level it compresses at (memory and CPU go with it).
    pub fn max_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Zstd { level } => Some(level),
            Compression::ZstdAuto => Some(*ZSTD_AUTO_LEVELS.end()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
            Compression::ZstdAuto => f.write_str("zstd:auto"),
        }
    }
}

/// How a job's artifacts are encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// `encryption = "none"`: explicitly unencrypted, flagged in logs.
    None,
    /// age X25519 recipients from the named profile.
    Age {
        profile: String,
        recipients: Vec<String>,
    },
}

/// Connection settings for the database a job dumps.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// A `postgres://` URL. Kept secret because a URL taken from the
    /// environment may carry a password.
    pub url: Secret,
    /// The password from `password_file` or `password_env`, if any.
    pub password: Option<Secret>,
}

/// A cron schedule evaluated in a job's time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expression: String,
    cron: croner::Cron,
}

/// Parses a cron expression (five fields, or six with seconds first).
///
/// # Errors
/// croner's description of what is wrong.
/// libpq connection parameters that carry a secret. In a URL's query string
/// (`postgres://u@h/db?password=x`) they would reach pg_dump's and
/// pg_restore's argv (`ps`, `/proc/*/cmdline`), so backstop refuses them.
pub const SECRET_URL_PARAMETERS: [&str; 2] = ["password", "sslpassword"];

/// The first secret-bearing query parameter of a PostgreSQL URL, if any
/// (matched without regard to case; libpq's own names are lowercase).
pub fn secret_query_parameter(url: &url::Url) -> Option<String> {
    url.query_pairs()
        .map(|(k, _)| k.to_ascii_lowercase())
        .find(|k| SECRET_URL_PARAMETERS.contains(&k.as_str()))
}

pub fn parse_schedule(expr: &str) -> Result<Schedule, String> {
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .year(croner::parser::Year::Disallowed)
        .build();
    parser
        .parse(expr)
        .map(|cron| Schedule {
            expression: expr.to_string(),
            cron,
        })
        .map_err(|e| e.to_string())
}

impl Schedule {
    /// The time between the next two fire times after `now` (a schedule's
    /// interval, for catch-up and the default RPO).
    pub fn interval_after(&self, now: DateTime<Utc>, tz: Tz) -> Option<chrono::Duration> {
        let a = self.next_after(now, tz)?;
        let b = self.next_after(a, tz)?;
        Some(b - a)
    }

    /// The first fire time strictly after `after`, evaluated in `tz`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Table and schema selection passed to pg_dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub include_schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
    pub include_tables: Vec<String>,
    pub exclude_tables: Vec<String>,
}

/// What the lock guard does about sessions blocked behind the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockGuardMode {
    /// Log the blocked session and count it (`backstop_lock_blocks_total`).
    Warn,
    /// Stop the dump so the blocked session proceeds; the run fails as
    /// retryable and is retried later.
    Yield,
    Off,
}

impl LockGuardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockGuardMode::Warn => "warn",
            LockGuardMode::Yield => "yield",
            LockGuardMode::Off => "off",
        }
    }
}

/// `lock_guard = { mode, max_block }`: while pg_dump runs, sessions waiting
/// this long for a lock its ACCESS SHARE locks block are acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockGuard {
    pub mode: LockGuardMode,
    pub max_block: Duration,
}

/// The defaults: warn after 10 s.
pub const DEFAULT_LOCK_GUARD: LockGuard = LockGuard {
    mode: LockGuardMode::Warn,
    max_block: Duration::from_secs(10),
};

/// pg_dump's `--lock-wait-timeout` by default: it never queues behind an
/// exclusive lock for longer (the run fails, retryable).
pub const DEFAULT_LOCK_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a backup does when its database is a streaming standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandbyMode {
    /// Dump as on a primary; a query cancelled by a recovery conflict fails
    /// the run as retryable, with the cause and the fixes.
    Retry,
    /// Pause WAL replay for the dump (`pg_wal_replay_pause`), resume it on
    /// every path: no conflict can cancel the dump; the standby lags meanwhile.
    Pause,
}

impl StandbyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StandbyMode::Retry => "retry",
            StandbyMode::Pause => "pause",
        }
    }
}

/// A run whose dump writes nothing, or whose upload accepts nothing, for
/// this long is failed as stalled (much shorter than a `timeout` sized for
/// the biggest night).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Tables above this size are split between streams unless a job says
/// otherwise (`split_tables_larger_than`).
pub const DEFAULT_SPLIT_TABLES_LARGER_THAN: u64 = 1024 * 1024 * 1024;

/// A cluster job's settings (`database = { url = …, all = true }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Databases left out, as shell patterns (`template*`, `scratch_*`).
    pub exclude: Vec<String>,
    /// Databases dumped at once (None: `daemon.max_concurrent_jobs`).
    pub parallel: Option<usize>,
}

impl ClusterConfig {
    /// The pattern that leaves `database` out, if one does.
    pub fn excluded_by(&self, database: &str) -> Option<&str> {
        self.exclude
            .iter()
            .find(|p| backstop_vocab::series::glob_match(p, database))
            .map(String::as_str)
    }
}

/// What part of a cluster job's run a job config stands for (see
/// [`JobConfig::member`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// One database of the server.
    Database(String),
    /// The server's roles and tablespaces (`pg_dumpall --globals-only`),
    /// and the databases the run backs up (recorded in its manifest, so a
    /// server restore knows which databases made up the server then).
    Globals { databases: Vec<String> },
}

/// One validated `[[job]]`.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// The job's name; for a cluster job's member, its series
    /// (`<job>/<segment>`, see [`backstop_vocab::series`]).
    pub name: String,
    pub database: DatabaseConfig,
    /// Set for a cluster job: the URL names the server (its database is
    /// where the list of databases is read).
    pub cluster: Option<ClusterConfig>,
    /// Set for one database (or the globals) of a cluster job's run.
    pub member: Option<Member>,
    /// The recovery-time objective: how long a restore may take (the
    /// measured restore time of drills is compared with it).
    pub rto: Option<Duration>,
    /// How long pg_dump waits for a table lock before failing (None: forever).
    pub lock_wait_timeout: Option<Duration>,
    /// What happens to sessions the dump's locks block.
    pub lock_guard: LockGuard,
    /// No bytes from pg_dump, or none taken by a store, for this long fails
    /// the run as stalled (None: never).
    pub stall_timeout: Option<Duration>,
    /// How long a dump may hold its snapshot (and so the primary's xmin):
    /// a warning at 80 %, then the attempt fails (None: no bound).
    pub max_snapshot_age: Option<Duration>,
    /// The stored size of the job's backups to plan S3 parts for, when its
    /// history does not say (`expected_size`).
    pub expected_size: Option<u64>,
    /// When the database is a standby: pause its replay, or retry conflicts.
    pub standby: StandbyMode,
    pub schedule: Option<Schedule>,
    pub timezone: Tz,
    pub format: DumpFormat,
    pub scope: Scope,
    pub globals: bool,
    pub no_role_passwords: bool,
    pub filters: Filters,
    pub compression: Compression,
    /// Threads that compress (`compression_threads`).
    pub compression_threads: budget::Threads,
    /// The share of the host's cores `"auto"` compression may grow to,
    /// across the job's lanes (`compression_share`, 0–1).
    pub compression_share: f64,
    /// The memory one backup stream of this job may hold: buffers, the
    /// compressor and the S3 stores' parts (see [`budget`]).
    pub memory_budget: u64,
    /// Connections the table data is dumped over (`streams`, 1: one
    /// pg_dump custom archive); above 1 the backup is in sections:
    /// pre-data, one data artifact per stream, the rest of the data
    /// (sequences, large objects) and post-data.
    pub streams: u32,
    /// A table larger than this is cut into ranges dumped by several
    /// streams (None: never; `split_tables_larger_than = 0`).
    pub split_tables_larger_than: Option<u64>,
    /// The most dump connections this process opens to the job's server
    /// at once (None: no limit beyond `parallel` × (`streams` + 1)).
    pub max_source_connections: Option<u32>,
    pub encryption: Encryption,
    pub storage: Vec<String>,
    pub timeout: Option<Duration>,
    /// A run of a fleet not started this long after its tick is skipped
    /// (None: it starts however late).
    pub starting_deadline: Option<Duration>,
    pub rpo: Option<Duration>,
    pub row_counts: RowCounts,
    pub pg_dump_path: Option<PathBuf>,
    pub pg_bin_dir: Option<PathBuf>,
    /// The age identity (private key) restore and decrypting verify use by
    /// default. Backing up never reads it.
    pub identity_file: Option<PathBuf>,
    pub verify: Option<VerifyConfig>,
    /// Retries of a failed run whose cause may be transient.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// Run once at daemon start when the last success is older than the interval.
    pub catch_up: bool,
    /// The job's retention (its own or the `[retention]` default); `None`
    /// keeps every backup.
    pub retention: Option<RetentionConfig>,
    /// A backup below this fraction of the recent median (dump size or rows)
    /// is marked suspect; 0 turns the guard off.
    pub anomaly_min_ratio: f64,
    /// Names of the `[notify.NAME]` sections told about this job's runs.
    pub notify: Vec<String>,
}

/// What prune keeps, and when it runs besides after each successful backup.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub policy: backstop_retention::Policy,
    /// Incomplete attempts younger than this are never touched (a running upload).
    pub orphan_grace: Duration,
    /// A cluster job's database that is gone from the server (not in the
    /// newest cluster run) keeps its backups this long after its newest
    /// one, then prune deletes them all (min_keep included).
    pub keep_gone_for: Duration,
    /// Extra prune runs of the daemon.
    pub schedule: Option<Schedule>,
}

impl JobConfig {
    /// The streams a backup of this job writes at once: one, or with
    /// `streams` above 1, the data streams and one for the schema
    /// sections and the rest of the data.
    pub fn lanes(&self) -> u32 {
        budget::lanes(self.streams)
    }

    /// What one lane may hold of the job's `memory_budget`: the budget
    /// is honoured as a whole, each of [`JobConfig::lanes`] gets an equal share.
    pub fn lane_budget(&self) -> u64 {
        self.memory_budget / u64::from(self.lanes())
    }

    /// How this job's compression uses threads on this host.
    pub fn thread_plan(&self) -> budget::ThreadPlan {
        budget::thread_plan(
            self.compression,
            self.compression_threads,
            self.compression_share,
            self.lanes(),
        )
    }

    /// How this job's `memory_budget` is spent on this host (its stores'
    /// settings from `storages`).
    pub fn memory_plan(&self, storages: &BTreeMap<String, StorageConfig>) -> budget::MemoryPlan {
        budget::MemoryPlan::new(
            self.memory_budget,
            self.compression,
            self.thread_plan().most(),
            self.storage.len(),
            &self.s3_parts(storages),
        )
    }

    /// The part settings of this job's S3 stores, in its order.
    pub fn s3_parts(&self, storages: &BTreeMap<String, StorageConfig>) -> Vec<budget::S3Parts> {
        self.storage
            .iter()
            .filter_map(|name| match storages.get(name) {
                Some(StorageConfig::S3(s)) => Some(budget::S3Parts {
                    part_size: s.part_size,
                    max_in_flight: s.max_in_flight_parts,
                }),
                _ => None,
            })
            .collect()
    }

    /// The job config of one database of this cluster job: the same
    /// settings, its own series (`<job>/<segment>`), the URL pointing at
    /// that database, no globals (a cluster run dumps them once).
    pub fn member(&self, database: &str) -> JobConfig {
        let mut m = self.clone();
        m.name = backstop_vocab::series::of_database(&self.name, database);
        m.cluster = None;
        m.member = Some(Member::Database(database.to_string()));
        m.globals = false;
        m.database.url = Secret::new(url_with_database(self.database.url.expose(), database));
        m
    }

    /// The job config of this cluster job's roles and tablespaces, in a
    /// run backing up `databases`.
    pub fn globals_member(&self, databases: &[String]) -> JobConfig {
        let mut m = self.clone();
        m.name = backstop_vocab::series::of_globals(&self.name);
        m.cluster = None;
        m.member = Some(Member::Globals {
            databases: databases.to_vec(),
        });
        m.globals = true;
        m.anomaly_min_ratio = 0.0;
        m
    }

    /// How old the newest backup may get: `rpo`, else 1.5 × the schedule's
    /// interval; `None` for an unscheduled job without `rpo`.
    pub fn effective_rpo(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        match self.rpo {
            Some(d) => chrono::Duration::from_std(d).ok(),
            None => self
                .schedule
                .as_ref()
                .and_then(|s| s.interval_after(now, self.timezone))
                .map(|i| i * 3 / 2),
        }
    }
}

/// The TCP hosts and ports a libpq URL connects to (none for a Unix
/// socket): its host (or `host` parameter) and its `hostaddr`.
///
/// # Errors
/// When the URL or its port does not parse (the message holds neither the
/// URL nor its password).
pub fn postgres_hosts(url: &str) -> Result<Vec<(String, u16)>, String> {
    let u = url::Url::parse(url).map_err(|e| format!("the URL does not parse ({e})"))?;
    let param = |key: &str| {
        u.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    let port = match param("port") {
        Some(p) => p.parse().map_err(|_| format!("port={p} is not a port"))?,
        None => u.port().unwrap_or(5432),
    };
    // libpq connects to hostaddr when it is set; sqlx (the daemon's own
    // sessions) takes whichever of the two comes last: both are allowed.
    let mut hosts = param("host").unwrap_or_else(|| u.host_str().unwrap_or_default().to_string());
    if let Some(a) = param("hostaddr") {
        hosts = format!("{hosts},{a}");
    }
    Ok(hosts
        .split(',')
        .map(str::trim)
        // No host: libpq's default socket; a path: a socket folder.
        .filter(|h| !h.is_empty() && !h.starts_with('/') && !h.starts_with('@'))
        .map(|h| (h.trim_matches(['[', ']']).to_string(), port))
        .collect())
}

/// `url` with its database replaced by `database` (percent-encoded, so
/// any name survives).
pub fn url_with_database(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let encoded: String = database
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            u.set_path(&format!("/{encoded}"));
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {}: {source} (pass --config PATH or set BACKSTOP_CONFIG)",
        path.display()
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(path, diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(path: &Path, diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("{}:{}:{}: {}", path.display(), d.line, d.column, d.message))
        .collect::<Vec<_>>()
        .join("\n")
}
