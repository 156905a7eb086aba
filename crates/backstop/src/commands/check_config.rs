//! `backstop check-config [--probe[=write]]`: the configuration as
//! backstop understood it, and with `--probe` whether every database and
//! store answers.

use backstop_config::{Config, Encryption};
use backstop_pipeline::store::Store;
use chrono::Utc;

use crate::cli::ProbeMode;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, probe: Option<ProbeMode>) -> CmdResult {
    print_summary(config);
    match probe {
        Some(mode) => probe_all(config, mode == ProbeMode::Write).await,
        None => Ok(()),
    }
}

/// Length: one printed section per part of the config, in file order.
fn print_summary(config: &Config) {
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
    println!("signatures: {}", backstop_pipeline::trust::describe(config));
    println!("storage:");
    for (name, s) in &config.storages {
        println!("  {name:<16} {}", s.describe());
    }
    if !config.notifiers.is_empty() {
        println!("notify:");
        for (name, n) in &config.notifiers {
            let on: Vec<&str> = n.on.iter().map(|e| e.as_str()).collect();
            let on = match n.channel {
                backstop_config::Channel::Heartbeat { .. } => {
                    "every backup run's start, success and failure".to_string()
                }
                _ => on.join(", "),
            };
            println!(
                "  {name:<16} {} to {} on {} ({} retries, {} timeout){}",
                n.channel.kind(),
                backstop_notify::target(n),
                on,
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
                    backstop_config::Channel::Heartbeat { method, .. } => match method {
                        backstop_config::HttpMethod::Post => ", POST",
                        backstop_config::HttpMethod::Get => ", GET",
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
        println!("  {:<16} {}", "", memory_line(config, j));
        if !j.notify.is_empty() {
            println!("  {:<16} notifies {}", "", j.notify.join(", "));
        } else if !config.notifiers.is_empty() {
            println!("  {:<16} notifies nobody (no `notify` in the job)", "");
        }
    }
}

/// How a job's `memory_budget` is spent: compressor, stream buffers and,
/// per S3 store, its parts.
fn memory_line(config: &Config, j: &backstop_config::JobConfig) -> String {
    use backstop_config::human_bytes;
    let plan = j.memory_plan(&config.storages);
    let t = j.thread_plan();
    let threads = match (t.start, t.grow_to) {
        (0, None) => "on the stream's thread".to_string(),
        (0, Some(n)) => format!("on the stream's thread, then {n} if it falls behind"),
        (n, _) => format!("on {n} thread{}", if n == 1 { "" } else { "s" }),
    };
    let mut line = format!(
        "memory {}: compressor {} {threads}, buffers {}",
        human_bytes(plan.budget),
        human_bytes(plan.compressor),
        human_bytes(plan.stream),
    );
    for (s, share) in j.s3_parts(&config.storages).iter().zip(&plan.s3_shares) {
        let p = backstop_storage::PartPlan::within(*share, s.part_size, s.max_in_flight);
        line.push_str(&format!(
            ", S3 parts {} ({} parts, {} in flight)",
            human_bytes(*share),
            human_bytes(p.part),
            p.in_flight_for(p.part)
        ));
    }
    line
}

/// Connects to every database and store and prints one line per check.
async fn probe_all(config: &Config, write: bool) -> CmdResult {
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
        let line = match Store::open(config, name).await {
            Ok(store) => match store.storage().probe(write).await {
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
        return Err(CliError::failed(format!("{failed} probe(s) failed")));
    }
    Ok(())
}

/// The backup's own pre-flight ([`backstop_pipeline::backup::preflight`]),
/// so the probe and a run cannot disagree about a database.
async fn probe_database(job: &backstop_config::JobConfig) -> Result<String, String> {
    // The check's own words ("cannot connect …"), not the step's.
    let said = |e: backstop_pipeline::BackupError| match std::error::Error::source(&e) {
        Some(cause) => backstop_pipeline::one_line(cause),
        None => backstop_pipeline::one_line(&e),
    };
    let ready = backstop_pipeline::backup::preflight(job)
        .await
        .map_err(said)?;
    let line = format!(
        "{} reachable, PostgreSQL {}; {} {}",
        ready.target.display(),
        ready.snapshot.server_version,
        ready.pg_dump.path.display(),
        ready.pg_dump.major
    );
    ready.snapshot.close().await;
    Ok(line)
}
