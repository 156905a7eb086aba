//! The `backstop` binary: CLI and wiring of the stages.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use backstop_catalog::Catalog;
use backstop_config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Encryption};
use backstop_pipeline::{human_bytes, list_backups, open_storage, run_backup};
use chrono::Utc;
use clap::{Parser, Subcommand, ValueEnum};

mod client;
mod daemon;
mod notifications;
mod recover;
mod status;

use backstop_pipeline::restore::{RestoreError, RestoreOptions};
use recover::{VerifyRequest, compare_live, download, restore, verify};

/// Scheduled, streaming, encrypted, verified logical backups of PostgreSQL.
#[derive(Parser)]
#[command(name = "backstop", version, about, propagate_version = true)]
struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "BACKSTOP_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Log format on stderr (level from BACKSTOP_LOG, default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProbeMode {
    Read,
    Write,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerifyLevel {
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ArtifactKind {
    Database,
    Globals,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print a summary (exit 2 if invalid).
    CheckConfig {
        /// Also connect to every job's database and every store and report each
        /// on its own line (exit 1 if any fails). `--probe=write` also writes and
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
    /// Run the daemon: schedule every job, serve /metrics, /healthz, /readyz
    /// and the run API on daemon.listen. SIGHUP reloads the config; SIGTERM
    /// lets running jobs finish within daemon.shutdown_grace, then cancels them.
    Run,
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
        /// The job whose backups to verify.
        #[arg(long)]
        job: String,
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
    Restore {
        #[command(flatten)]
        from: OneBackup,
        /// Target database, as postgres://user@host:port/dbname. Its password
        /// comes from --target-password-file, PGPASSWORD or ~/.pgpass, never
        /// the URL (arguments are visible to every user in `ps`).
        #[arg(long)]
        target: String,
        /// File holding the --target password.
        #[arg(long)]
        target_password_file: Option<PathBuf>,
        /// age identity file (default: the job's identity_file, then
        /// $CREDENTIALS_DIRECTORY/age-identity under systemd).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Restore only this table, as SCHEMA.NAME (repeatable; one schema per
        /// run). Restores its definition and data, not its indexes or
        /// constraints; with --data-only just its rows.
        #[arg(long = "table", value_name = "SCHEMA.NAME")]
        tables: Vec<String>,
        /// Restore object definitions only.
        #[arg(long, conflicts_with = "data_only")]
        schema_only: bool,
        /// Restore rows only, into existing empty tables.
        #[arg(long)]
        data_only: bool,
        /// Drop the backup's objects (if they exist) before recreating them.
        #[arg(long, conflicts_with = "data_only")]
        clean: bool,
        /// Accepted for pg_restore habit; --clean always uses IF EXISTS.
        #[arg(long, requires = "clean")]
        if_exists: bool,
        /// Create the target database (from template0) if it does not exist.
        #[arg(long)]
        create_db: bool,
        /// Do not restore ownership (objects belong to the connecting user).
        #[arg(long)]
        no_owner: bool,
        /// Do not restore GRANTs.
        #[arg(long)]
        no_privileges: bool,
        /// Disable triggers, foreign keys included, while loading data
        /// (superuser only); for --data-only restores of single tables.
        #[arg(long)]
        disable_triggers: bool,
        /// Also apply the backup's roles and tablespaces first (existing roles
        /// are kept and altered, not recreated).
        #[arg(long)]
        globals: bool,
        /// Parallel restore with N jobs. pg_restore needs a seekable file for
        /// this, so the decrypted archive is first written to a private temp
        /// file (0600, in --temp-dir) and removed afterwards; a parallel restore
        /// cannot run in one transaction.
        #[arg(long, short = 'j', default_value_t = 1, value_name = "N")]
        jobs: u32,
        /// Directory for --jobs' temp file (default: $TMPDIR or /tmp).
        #[arg(long)]
        temp_dir: Option<PathBuf>,
    },
    /// Write a stored artifact to a file, as stored (encrypted and compressed)
    /// or with --decrypt as the plain pg_dump archive, for use with stock
    /// tools. Checked against the manifest; nothing is left on failure.
    Download {
        #[command(flatten)]
        from: OneBackup,
        /// Which artifact.
        #[arg(long, value_enum, default_value_t = ArtifactKind::Database)]
        artifact: ArtifactKind,
        /// Output file (created 0600; must not exist unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
        /// Decrypt and decompress: write the plain pg_dump output.
        #[arg(long)]
        decrypt: bool,
        /// age identity file for --decrypt (default: the job's identity_file).
        #[arg(long, requires = "decrypt")]
        identity: Option<PathBuf>,
    },
    /// List a job's complete backups (those with a manifest), newest first.
    List {
        /// The job whose backups to list.
        #[arg(long)]
        job: String,
        /// Which of the job's stores to list (default: its first).
        #[arg(long)]
        storage: Option<String>,
        /// Print the manifests as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// Which backup `restore` and `download` read.
#[derive(Debug, clap::Args)]
struct OneBackup {
    /// The job whose backup to read.
    #[arg(long)]
    job: String,
    /// A backup id or `latest`.
    #[arg(long, default_value = "latest")]
    backup: String,
    /// Which of the job's stores to read (default: its first).
    #[arg(long)]
    storage: Option<String>,
}

/// Exit code for an invalid configuration or command line.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let config = match Config::load(&cli.config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: invalid configuration\n{e}");
                if matches!(e, ConfigError::Invalid { .. }) {
                    eprintln!("(fix the lines above, then run `backstop check-config`)");
                }
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let result = match cli.command {
            Command::CheckConfig { probe } => {
                check_config(&config);
                match probe {
                    Some(mode) => probe_all(&config, mode == ProbeMode::Write).await,
                    None => Ok(()),
                }
            }
            Command::Backup { job, wait: true } => {
                match client::backup_via_daemon(&config, &job).await {
                    Some(r) => r,
                    None => backup(&config, &job).await,
                }
            }
            Command::Backup { job, wait: false } => backup(&config, &job).await,
            Command::Run => daemon::run(cli.config.clone(), config).await,
            Command::TestNotify { notifier, job } => {
                notifications::test(&config, &notifier, job.as_deref()).await
            }
            Command::Status { json } => status::status(&config, json).await,
            Command::Prune {
                job,
                storage,
                dry_run,
                json,
            } => prune(&config, &job, storage.as_deref(), dry_run, json).await,
            Command::Verify {
                job,
                backup,
                level,
                storage,
                identity,
                target,
                target_password_file,
                against_live,
                json,
            } => {
                if against_live {
                    compare_live(&config, &job, &backup, storage.as_deref(), json).await
                } else {
                    let req = VerifyRequest {
                        which: backup,
                        level: level.into(),
                        storage,
                        identity,
                        target,
                        target_password_file,
                        json,
                    };
                    verify(&config, &job, &req).await
                }
            }
            Command::Restore {
                from:
                    OneBackup {
                        job,
                        backup,
                        storage,
                    },
                target,
                target_password_file,
                identity,
                tables,
                schema_only,
                data_only,
                clean,
                if_exists: _,
                create_db,
                no_owner,
                no_privileges,
                disable_triggers,
                globals,
                jobs,
                temp_dir,
            } => {
                let options = RestoreOptions {
                    tables,
                    schema_only,
                    data_only,
                    clean,
                    create_db,
                    no_owner,
                    no_privileges,
                    disable_triggers,
                    globals,
                    jobs,
                    temp_dir,
                    progress: true,
                    ..Default::default()
                };
                restore(
                    &config,
                    &job,
                    &backup,
                    storage.as_deref(),
                    &target,
                    target_password_file.as_deref(),
                    identity.as_deref(),
                    options,
                )
                .await
            }
            Command::Download {
                from:
                    OneBackup {
                        job,
                        backup,
                        storage,
                    },
                artifact,
                out,
                force,
                decrypt,
                identity,
            } => {
                download(
                    &config,
                    &job,
                    &backup,
                    storage.as_deref(),
                    artifact,
                    &out,
                    force,
                    decrypt.then_some(identity),
                )
                .await
            }
            Command::List { job, storage, json } => {
                list(&config, &job, storage.as_deref(), json).await
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                let usage = e.downcast_ref::<UsageError>().is_some()
                    || matches!(
                        e.downcast_ref::<RestoreError>(),
                        Some(RestoreError::Usage(_))
                    );
                if usage {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    });
    // Do not wait for blocking threads stuck on a pipe some grandchild still
    // holds open: everything that matters has been recorded by now.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKSTOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into journald or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A mistake in what was asked (unknown job, store): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// "no job named "x" in /etc/backstop/backstop.toml (defined: a, b)".
pub(crate) fn not_defined<'a>(
    config: &Config,
    what: &str,
    name: &str,
    known: impl Iterator<Item = &'a str>,
) -> UsageError {
    let known: Vec<_> = known.collect();
    UsageError(format!(
        "no {what} named \"{name}\" in {} (defined: {})",
        config.source.display(),
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

fn find_job<'a>(config: &'a Config, name: &str) -> anyhow::Result<&'a backstop_config::JobConfig> {
    config.job(name).ok_or_else(|| {
        not_defined(
            config,
            "job",
            name,
            config.jobs.iter().map(|j| j.name.as_str()),
        )
        .into()
    })
}

/// The stores a command works on: the one asked for (which the job must
/// use), or all of the job's.
fn job_stores(
    job: &backstop_config::JobConfig,
    storage: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    match storage {
        Some(s) if job.storage.iter().any(|j| j == s) => Ok(vec![s.to_string()]),
        Some(s) => Err(UsageError(format!(
            "job \"{}\" does not use storage \"{s}\" (it uses {})",
            job.name,
            job.storage.join(", ")
        ))
        .into()),
        None => Ok(job.storage.clone()),
    }
}

fn check_config(config: &Config) {
    let now = Utc::now();
    println!("{}: OK", config.source.display());
    println!("catalog: {}", config.catalog);
    let d = &config.daemon;
    println!(
        "daemon: listen {} (/metrics /healthz /readyz), {} run(s) at once, shutdown grace {}, run API {}",
        d.listen,
        d.max_concurrent_jobs,
        humantime::format_duration(d.shutdown_grace),
        if d.api_token.is_some() {
            "on (bearer token)"
        } else {
            "off (no daemon.api_token_file)"
        }
    );
    println!("storage:");
    for (name, s) in &config.storages {
        println!("  {name:<16} {}", s.describe());
    }
    if !config.notifiers.is_empty() {
        println!("notify:");
        for (name, n) in &config.notifiers {
            let on: Vec<&str> = n.on.iter().map(|e| e.as_str()).collect();
            println!(
                "  {name:<16} {} to {} on {} ({} retries, {} timeout){}",
                n.channel.kind(),
                backstop_notify::target(n),
                on.join(", "),
                n.retries,
                humantime::format_duration(n.timeout),
                match &n.channel {
                    backstop_config::Channel::Webhook {
                        secret: Some(_), ..
                    } => ", HMAC-signed",
                    backstop_config::Channel::Email(e) => match e.tls {
                        backstop_config::SmtpTls::StartTls => ", STARTTLS",
                        backstop_config::SmtpTls::Tls => ", TLS",
                        backstop_config::SmtpTls::None => ", NO TLS",
                    },
                    _ => "",
                }
            );
        }
    }
    println!("jobs:");
    for j in &config.jobs {
        let schedule = match &j.schedule {
            Some(s) => {
                let next = s
                    .next_after(now, j.timezone)
                    .map(|t| {
                        format!(
                            "next {} ({})",
                            t.with_timezone(&j.timezone).format("%Y-%m-%d %H:%M %Z"),
                            t.format("%Y-%m-%dT%H:%M:%SZ")
                        )
                    })
                    .unwrap_or_else(|| "never fires".into());
                format!("\"{}\" in {}, {next}", s.expression, j.timezone)
            }
            None => "on demand only (no schedule)".into(),
        };
        let enc = match &j.encryption {
            Encryption::None => "NOT ENCRYPTED".to_string(),
            Encryption::Age {
                profile,
                recipients,
            } => {
                format!(
                    "age profile \"{profile}\" ({} recipient(s))",
                    recipients.len()
                )
            }
        };
        println!("  {:<16} {schedule}", j.name);
        if let Some(v) = &j.verify {
            let next = v
                .schedule
                .next_after(now, j.timezone)
                .map(|t| {
                    t.with_timezone(&j.timezone)
                        .format("%Y-%m-%d %H:%M %Z")
                        .to_string()
                })
                .unwrap_or_else(|| "never".into());
            println!(
                "  {:<16} verify {} \"{}\", next {next}{}",
                "",
                v.level.as_str(),
                v.schedule.expression,
                v.target
                    .as_ref()
                    .and_then(|t| backstop_dump::PgTarget::from_config(t).ok())
                    .map(|t| format!(", scratch databases on {}", t.display()))
                    .unwrap_or_default()
            );
        }
        println!(
            "  {:<16} {} {} dump, {}, {enc}, to {}",
            "",
            j.format.as_str(),
            j.scope.as_str(),
            j.compression,
            j.storage.join(", ")
        );
        if !j.notify.is_empty() {
            println!("  {:<16} notifies {}", "", j.notify.join(", "));
        } else if !config.notifiers.is_empty() {
            println!("  {:<16} notifies nobody (no `notify` in the job)", "");
        }
    }
}

/// Connects to every database and store and prints one line per check.
async fn probe_all(config: &Config, write: bool) -> anyhow::Result<()> {
    let mut failed = 0;
    println!("probes:");
    for job in &config.jobs {
        let line = match probe_database(job).await {
            Ok(ok) => format!("OK: {ok}"),
            Err(e) => {
                failed += 1;
                format!("FAILED: {e}")
            }
        };
        println!("  database of job \"{}\": {line}", job.name);
    }
    for (name, s) in &config.storages {
        let line = match open_storage(config, name, None).await {
            Ok(store) => match store.probe(write).await {
                Ok(ok) => format!("OK: {ok}"),
                Err(e) => {
                    failed += 1;
                    format!("FAILED: {e}")
                }
            },
            Err(e) => {
                failed += 1;
                format!("FAILED: {e}")
            }
        };
        println!("  store \"{name}\" ({}): {line}", s.describe());
    }
    if failed > 0 {
        anyhow::bail!("{failed} probe(s) failed");
    }
    Ok(())
}

async fn probe_database(job: &backstop_config::JobConfig) -> anyhow::Result<String> {
    let target = backstop_dump::PgTarget::from_config(&job.database).map_err(anyhow::Error::msg)?;
    let tool = backstop_dump::find_tool(
        "pg_dump",
        job.pg_dump_path.as_deref(),
        job.pg_bin_dir.as_deref(),
    )
    .await?;
    let snapshot = backstop_dump::Snapshot::open(&target).await?;
    let (server, major) = (snapshot.server_version.clone(), snapshot.server_major());
    snapshot.close().await;
    if tool.major < major {
        anyhow::bail!(
            "{} reachable (PostgreSQL {server}), but {} is version {} and the server is {major}: set pg_bin_dir to a PostgreSQL {major} client",
            target.display(),
            tool.path.display(),
            tool.major
        );
    }
    Ok(format!(
        "{} reachable, PostgreSQL {server}; {} {}",
        target.display(),
        tool.path.display(),
        tool.major
    ))
}

async fn backup(config: &Config, job: &str) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let catalog = Catalog::open(&config.catalog).await?;
    let previous = catalog
        .last_outcome(&job.name, "backup")
        .await
        .ok()
        .flatten()
        .map(|o| o.as_str());
    let started = Utc::now();
    let result = run_backup(config, job, &catalog).await;
    catalog.close().await;
    // A one-shot backup from cron or a timer notifies like the daemon does;
    // a refusal because the daemon holds the job is not a failed backup.
    if !job.notify.is_empty() && !matches!(result, Err(backstop_pipeline::BackupError::Locked(_))) {
        let (outcome, error) = match &result {
            Ok(r) if r.manifest.suspect.is_some() => ("suspect", r.manifest.suspect.clone()),
            Ok(_) => ("success", None),
            Err(e) => ("failed", Some(e.to_string())),
        };
        if let Some(kind) = backstop_notify::classify(outcome, previous) {
            let mut event = backstop_notify::Event::new(
                kind,
                &job.name,
                "backup",
                outcome,
                started,
                Utc::now(),
            );
            event.error = error;
            event.previous_outcome = previous.map(str::to_string);
            event.storage = job.storage.clone();
            if let Ok(r) = &result {
                event.backup_id = Some(r.manifest.backup_id.clone());
                event.dump_bytes = Some(r.manifest.dump_bytes());
                event.stored_bytes = Some(r.manifest.stored_bytes());
                event.storage = r.stores.clone();
            }
            notifications::send(config, job, event).await;
        }
    }
    let report = result.with_context(|| format!("backup of job \"{}\" failed", job.name))?;
    let m = &report.manifest;
    println!(
        "backup {} of job \"{}\" complete in {:.1}s: {} tables, {} rows ({}), dump {}, stored {} in {}",
        m.backup_id,
        m.job,
        m.duration_seconds,
        m.inventory.tables,
        m.total_rows()
            .map_or_else(|| "-".to_string(), |r| r.to_string()),
        m.row_counts,
        human_bytes(m.dump_bytes()),
        human_bytes(m.stored_bytes()),
        report.stores.join(", ")
    );
    if let Some(why) = &m.suspect {
        println!(
            "WARNING: backup {} is SUSPECT: {why}. It is kept and marked; check the database (backstop verify --job {} --against-live).",
            m.backup_id, m.job
        );
    }
    Ok(())
}

async fn list(config: &Config, job: &str, storage: Option<&str>, json: bool) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    // Default: the job's first store.
    let store = job_stores(job, storage)?.swap_remove(0);
    let backend = open_storage(config, &store, None)
        .await
        .map_err(anyhow::Error::msg)?;
    let (manifests, unreadable) = list_backups(backend.as_ref(), &job.name)
        .await
        .with_context(|| format!("cannot list backups in store \"{store}\""))?;
    for u in &unreadable {
        eprintln!("warning: skipping {}: {}", u.key, u.reason);
    }
    // Verification results live in the catalog: a verify never rewrites a backup.
    let verified = Catalog::open(&config.catalog)
        .await?
        .last_verifications(&job.name, &store)
        .await?;
    if json {
        let mut out = Vec::new();
        for m in &manifests {
            let mut v = serde_json::to_value(m)?;
            v["last_verification"] = serde_json::to_value(verified.get(&m.backup_id))?;
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if manifests.is_empty() {
        println!(
            "no complete backups of job \"{}\" in store \"{store}\"",
            job.name
        );
        return Ok(());
    }
    println!(
        "{:<27} {:<20} {:>9} {:>10} {:>10} {:>7} {:>12}  VERIFIED",
        "BACKUP ID", "STARTED (UTC)", "DURATION", "DUMP", "STORED", "TABLES", "ROWS"
    );
    for m in &manifests {
        let verification = match verified.get(&m.backup_id) {
            Some(v) if v.ok => format!("{} {}", v.level, v.at.format("%Y-%m-%d %H:%M")),
            Some(v) => format!("FAILED {} {}", v.level, v.at.format("%Y-%m-%d %H:%M")),
            None => "-".into(),
        };
        let verification = if m.suspect.is_some() {
            format!("{verification}  SUSPECT (much smaller than usual)")
        } else {
            verification
        };
        println!(
            "{:<27} {:<20} {:>8.1}s {:>10} {:>10} {:>7} {:>12}  {verification}",
            m.backup_id,
            m.started_at.format("%Y-%m-%d %H:%M:%S"),
            m.duration_seconds,
            human_bytes(m.dump_bytes()),
            human_bytes(m.stored_bytes()),
            m.inventory.tables,
            m.total_rows().map_or_else(
                || "-".to_string(),
                |r| {
                    if m.row_counts == "estimate" {
                        format!("~{r}")
                    } else {
                        r.to_string()
                    }
                }
            ),
        );
    }
    Ok(())
}

async fn prune(
    config: &Config,
    job: &str,
    storage: Option<&str>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let Some(retention) = &job.retention else {
        return Err(UsageError(format!(
            "job \"{}\" has no retention policy, so every backup is kept; add retention = {{ keep_daily = 7, … }} to the job or a [retention] default",
            job.name
        ))
        .into());
    };
    let catalog = Catalog::open(&config.catalog).await?;
    let stores = job_stores(job, storage)?;
    let reports =
        backstop_pipeline::prune::prune_job(config, job, retention, &catalog, &stores, dry_run)
            .await;
    catalog.close().await;
    let reports = reports?;
    let mut failed = 0;
    let mut undeleted = 0;
    let mut out = Vec::new();
    for (store, r) in reports {
        match r {
            Ok(report) => {
                if !json {
                    print_prune(&report);
                }
                undeleted += report.skipped.len();
                out.push(serde_json::json!({ "store": store, "report": report }));
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
                out.push(serde_json::json!({ "store": store, "error": e.to_string() }));
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if failed > 0 {
        anyhow::bail!("prune failed in {failed} store(s); nothing was deleted there");
    }
    if undeleted > 0 {
        anyhow::bail!(
            "{undeleted} object(s) could not be deleted (listed as SKIPPED above); the next prune tries again"
        );
    }
    Ok(())
}

fn print_prune(r: &backstop_pipeline::prune::PruneReport) {
    let verb = if r.dry_run { "would delete" } else { "delete" };
    println!(
        "store \"{}\": {} backup(s), keep {}, {verb} {}{}",
        r.store,
        r.plan.decisions.len(),
        r.plan.kept().count(),
        r.plan.deleted().count(),
        if r.dry_run {
            " (dry run: nothing deleted)"
        } else {
            ""
        }
    );
    for d in &r.plan.decisions {
        println!(
            "  {:<6} {:<27} {}",
            if d.keep {
                "keep"
            } else if r.dry_run {
                "DELETE?"
            } else {
                "DELETE"
            },
            d.id,
            d.reasons.join(", ")
        );
    }
    for o in &r.orphans {
        println!(
            "  {} incomplete attempt {o} (no manifest, older than orphan_grace)",
            if r.dry_run { "would remove" } else { "removed" }
        );
    }
    if r.aborted_uploads > 0 {
        println!("  aborted {} stale upload(s)", r.aborted_uploads);
    }
    for (id, why) in &r.locked {
        println!(
            "  LOCKED {id}: kept until its Object Lock expires; the next prune tries again ({why})"
        );
    }
    for (k, why) in &r.skipped {
        println!("  SKIPPED {k}: {why}");
    }
}
