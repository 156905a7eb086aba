//! The `backstop` binary: CLI and wiring of the stages.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use backstop_catalog::Catalog;
use backstop_config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Encryption};
use backstop_pipeline::{list_backups, open_storage, run_backup};
use chrono::Utc;
use clap::{Parser, Subcommand, ValueEnum};

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
    },
    /// Verify stored backups against their manifests. `checksum` (the only level
    /// so far) re-reads every stored artifact and compares size and sha256; it
    /// needs no private key. Exit 1 on any mismatch.
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
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
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
    runtime.block_on(async {
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
            Command::Backup { job } => backup(&config, &job).await,
            Command::Verify {
                job,
                backup,
                level: VerifyLevel::Checksum,
                storage,
                json,
            } => verify(&config, &job, &backup, storage.as_deref(), json).await,
            Command::List { job, storage, json } => {
                list(&config, &job, storage.as_deref(), json).await
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                if e.downcast_ref::<UsageError>().is_some() {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
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

fn find_job<'a>(config: &'a Config, name: &str) -> anyhow::Result<&'a backstop_config::JobConfig> {
    config.job(name).ok_or_else(|| {
        let known: Vec<_> = config.jobs.iter().map(|j| j.name.as_str()).collect();
        UsageError(format!(
            "no job named \"{name}\" in {} (jobs: {})",
            config.source.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
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
    println!("storage:");
    for (name, s) in &config.storages {
        println!("  {name:<16} {}", s.describe());
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
        println!(
            "  {:<16} {} {} dump, {}, {enc}, to {}",
            "",
            j.format.as_str(),
            j.scope.as_str(),
            j.compression,
            j.storage.join(", ")
        );
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
    let report = run_backup(config, job, &catalog)
        .await
        .with_context(|| format!("backup of job \"{}\" failed", job.name))?;
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
    if json {
        println!("{}", serde_json::to_string_pretty(&manifests)?);
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
        "{:<27} {:<20} {:>9} {:>10} {:>10} {:>7} {:>12}",
        "BACKUP ID", "STARTED (UTC)", "DURATION", "DUMP", "STORED", "TABLES", "ROWS"
    );
    for m in &manifests {
        println!(
            "{:<27} {:<20} {:>8.1}s {:>10} {:>10} {:>7} {:>12}",
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

async fn verify(
    config: &Config,
    job: &str,
    which: &str,
    storage: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let stores = job_stores(job, storage)?;
    let catalog = Catalog::open(&config.catalog).await?;
    let mut results = Vec::new();
    let mut failures = 0;
    for store in &stores {
        let backend = open_storage(config, store, None)
            .await
            .map_err(anyhow::Error::msg)?;
        let (manifests, _) = list_backups(backend.as_ref(), &job.name)
            .await
            .with_context(|| format!("cannot list backups in store \"{store}\""))?;
        let selected: Vec<_> = match which {
            "all" => manifests.iter().collect(),
            "latest" => manifests.iter().take(1).collect(),
            id => manifests.iter().filter(|m| m.backup_id == id).collect(),
        };
        if selected.is_empty() {
            anyhow::bail!(
                "no backup {which:?} of job \"{}\" in store \"{store}\"",
                job.name
            );
        }
        for m in selected {
            let started = Utc::now();
            let run = catalog
                .start_run(&job.name, "verify", Some(&m.backup_id), started)
                .await?;
            let check = backstop_pipeline::verify::verify_checksums(backend.as_ref(), m).await;
            let problems: Vec<String> = check
                .artifacts
                .iter()
                .filter_map(|a| a.problem.as_ref().map(|p| format!("{}: {p}", a.key)))
                .collect();
            let outcome = if check.ok {
                backstop_catalog::Outcome::Success
            } else {
                failures += 1;
                backstop_catalog::Outcome::Failed
            };
            let error = problems.join("; ");
            catalog
                .finish_run(
                    run,
                    outcome,
                    Utc::now(),
                    &backstop_catalog::RunResult {
                        error: (!check.ok).then_some(error.as_str()),
                        ..Default::default()
                    },
                )
                .await?;
            if !json {
                if check.ok {
                    println!(
                        "{store}: {} checksum OK ({} artifacts)",
                        m.backup_id,
                        check.artifacts.len()
                    );
                } else {
                    println!("{store}: {} checksum MISMATCH", m.backup_id);
                    for p in &problems {
                        println!("  {p}");
                    }
                }
            }
            results.push(serde_json::json!({ "store": store, "result": check }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    if failures > 0 {
        anyhow::bail!("{failures} backup(s) failed verification");
    }
    Ok(())
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
