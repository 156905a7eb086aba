//! `backstop status`: one screen for on-call, read from the catalog and the
//! stores (the daemon need not run). Jobs needing attention come first; the
//! exit code is 1 if any job is failing, stale or suspect, so it can be a check.

use backstop_catalog::{Catalog, Outcome, RunKind};
use backstop_config::{Config, JobConfig};
use backstop_pipeline::cluster::list_job_backups;
use backstop_pipeline::{Manifest, human_bytes, open_storage};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{CliError, CmdResult};

#[derive(Debug, Serialize)]
struct JobStatus {
    job: String,
    /// `failing`, `never succeeded`, `suspect` (the latest backup is much
    /// smaller than usual), `stale`, or `ok`.
    state: String,
    last_run_outcome: Option<Outcome>,
    last_run_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_success_at: Option<DateTime<Utc>>,
    rpo_seconds: Option<i64>,
    next_run_at: Option<DateTime<Utc>>,
    backups_stored: Option<usize>,
    latest_stored_bytes: Option<u64>,
    previous_stored_bytes: Option<u64>,
    last_verify: Option<String>,
    /// A cluster job's databases, each on its own row.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    databases: Vec<DatabaseStatus>,
}

/// One database of a cluster job.
#[derive(Debug, Serialize)]
struct DatabaseStatus {
    database: String,
    /// `ok`, `failing` (its backup failed in the latest run), `suspect`, or
    /// `missing` (not in the latest run: gone from the server, excluded or
    /// not connectable; its backups are kept until they age out).
    state: String,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    latest_dump_bytes: Option<i64>,
}

/// The rows of a cluster job's databases, against its latest run.
async fn database_rows(
    catalog: &Catalog,
    job: &JobConfig,
    latest_run: Option<&str>,
) -> anyhow::Result<Vec<DatabaseStatus>> {
    let mut out = Vec::new();
    for s in catalog.series_of(&job.name).await? {
        let Some(database) = backstop_vocab::series::split(&s)
            .1
            .and_then(backstop_vocab::series::database_of)
        else {
            continue;
        };
        let last = catalog
            .recent_runs(Some(&s), 20)
            .await?
            .into_iter()
            .find(|r| r.kind == RunKind::Backup && r.outcome.is_some());
        let success = catalog
            .last_finished(&s, RunKind::Backup, Outcome::Success)
            .await?;
        let in_latest = last
            .as_ref()
            .is_some_and(|r| latest_run.is_some() && r.backup_id.as_deref() == latest_run);
        let state = match last.as_ref().and_then(|r| r.outcome) {
            _ if !in_latest => "missing",
            Some(Outcome::Failed | Outcome::Interrupted) => "failing",
            Some(Outcome::Suspect) => "suspect",
            _ => "ok",
        };
        out.push(DatabaseStatus {
            database,
            state: state.into(),
            last_success_at: success.as_ref().map(|s| s.0),
            last_error: last
                .as_ref()
                .filter(|r| r.outcome == Some(Outcome::Failed))
                .and_then(|r| r.error.clone()),
            latest_dump_bytes: success.and_then(|s| s.1),
        });
    }
    Ok(out)
}

/// At most `n` characters, marked with `…` when cut.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn age(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => {
            let secs = (now - t).num_seconds().max(0) as u64;
            let rounded = if secs >= 3600 { secs / 60 * 60 } else { secs };
            format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(rounded))
            )
        }
        None => "never".into(),
    }
}

async fn job_status(
    config: &Config,
    catalog: &Catalog,
    job: &JobConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<JobStatus> {
    let last = catalog
        .recent_runs(Some(&job.name), 50)
        .await?
        .into_iter()
        // A skipped tick (a fleet's missed or superseded one) is not a run.
        .find(|r| r.kind == RunKind::Backup && r.outcome.is_some_and(|o| o != Outcome::Skipped));
    let success = catalog.last_success(&job.name, RunKind::Backup).await?;
    let rpo = job.effective_rpo(now);
    let next = job
        .schedule
        .as_ref()
        .and_then(|s| s.next_after(now, job.timezone));
    let mut suspect = false;
    let (stored, latest, previous, verify) = match job.storage.first() {
        Some(store) => match open_storage(config, store, None).await {
            Ok(b) => match list_job_backups(b.as_ref(), job).await {
                Ok((m, _)) => {
                    suspect = m.first().is_some_and(|x| x.suspect.is_some());
                    let newest = m.first().map(Manifest::series).unwrap_or_default();
                    let v = catalog.last_verifications(&newest, store).await?;
                    let verify = m
                        .first()
                        .and_then(|newest| v.get(&newest.backup_id))
                        .map(|v| {
                            format!(
                                "{} {} {}",
                                if v.ok { "ok" } else { "FAILED" },
                                v.level,
                                age(Some(v.at), now)
                            )
                        });
                    // Sizes per run: a cluster job's parts of one run share its id.
                    let mut runs: Vec<(&str, u64)> = Vec::new();
                    for x in &m {
                        match runs.iter_mut().find(|(id, _)| *id == x.backup_id) {
                            Some(r) => r.1 += x.stored_bytes(),
                            None => runs.push((&x.backup_id, x.stored_bytes())),
                        }
                    }
                    (
                        Some(m.len()),
                        runs.first().map(|r| r.1),
                        runs.get(1).map(|r| r.1),
                        verify,
                    )
                }
                Err(_) => (None, None, None, None),
            },
            Err(_) => (None, None, None, None),
        },
        None => (None, None, None, None),
    };
    let failing = last
        .as_ref()
        .is_some_and(|r| r.outcome == Some(Outcome::Failed));
    let stale = match (success, rpo) {
        (Some(t), Some(rpo)) => now - t > rpo,
        _ => false,
    };
    let state = if failing {
        "failing"
    } else if success.is_none() && job.schedule.is_some() {
        "never succeeded"
    } else if suspect {
        "suspect"
    } else if stale {
        "stale"
    } else {
        "ok"
    };
    let databases = if job.cluster.is_some() {
        database_rows(
            catalog,
            job,
            last.as_ref().and_then(|r| r.backup_id.as_deref()),
        )
        .await?
    } else {
        Vec::new()
    };
    Ok(JobStatus {
        databases,
        job: job.name.clone(),
        state: state.into(),
        last_run_outcome: last.as_ref().and_then(|r| r.outcome),
        last_run_at: last.as_ref().and_then(|r| r.finished_at),
        last_error: last.as_ref().and_then(|r| r.error.clone()),
        last_success_at: success,
        rpo_seconds: rpo.map(|d| d.num_seconds()),
        next_run_at: next,
        backups_stored: stored,
        latest_stored_bytes: latest,
        previous_stored_bytes: previous,
        last_verify: verify,
    })
}

pub async fn run(config: &Config, json: bool) -> CmdResult {
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let now = Utc::now();
    let mut rows = Vec::new();
    for job in &config.jobs {
        rows.push(job_status(config, &catalog, job, now).await?);
    }
    // Attention first, then by name.
    rows.sort_by_key(|r| (r.state == "ok", r.job.clone()));
    let attention = rows.iter().filter(|r| r.state != "ok").count();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<16} {:<16} {:<22} {:<26} {:<18} {:>7} {:<22} VERIFIED",
            "JOB", "STATE", "LAST RUN", "LAST SUCCESS (RPO)", "NEXT RUN", "STORED", "LATEST SIZE"
        );
        for r in &rows {
            let last = match (&r.last_run_outcome, r.last_run_at) {
                (Some(o), t) => format!("{o} {}", age(t, now)),
                _ => "-".into(),
            };
            let rpo = r
                .rpo_seconds
                .map(|s| {
                    format!(
                        " ({})",
                        humantime::format_duration(std::time::Duration::from_secs(s.max(0) as u64))
                    )
                })
                .unwrap_or_default();
            let size = match (r.latest_stored_bytes, r.previous_stored_bytes) {
                (Some(a), Some(b)) if b > 0 => format!(
                    "{} ({:+.0}%)",
                    human_bytes(a),
                    (a as f64 - b as f64) * 100.0 / b as f64
                ),
                (Some(a), _) => human_bytes(a),
                _ => "-".into(),
            };
            println!(
                "{:<16} {:<16} {:<22} {:<26} {:<18} {:>7} {:<22} {}",
                r.job,
                if r.state == "ok" {
                    "ok".to_string()
                } else {
                    r.state.to_uppercase()
                },
                last,
                format!("{}{rpo}", age(r.last_success_at, now)),
                r.next_run_at
                    .map(|t| t.format("%Y-%m-%d %H:%MZ").to_string())
                    .unwrap_or_else(|| "on demand".into()),
                r.backups_stored.map_or("?".into(), |n| n.to_string()),
                size,
                r.last_verify.clone().unwrap_or_else(|| "-".into())
            );
            if r.state == "failing"
                && let Some(e) = &r.last_error
            {
                println!("{:<16} error: {e}", "");
            }
            for d in &r.databases {
                println!(
                    "  {:<14} {:<16} {:<22} {:<26} {}",
                    truncate(&d.database, 14),
                    if d.state == "ok" {
                        "ok".to_string()
                    } else {
                        d.state.to_uppercase()
                    },
                    "",
                    age(d.last_success_at, now),
                    d.latest_dump_bytes.map_or_else(
                        || "-".to_string(),
                        |b| format!("dump {}", human_bytes(b.max(0) as u64))
                    )
                );
                if let Some(e) = &d.last_error {
                    println!("{:<16} error: {e}", "");
                }
            }
        }
    }
    if catalog.is_shared() && !json {
        print_fleet(config, &catalog, now).await?;
    }
    if attention > 0 {
        return Err(CliError::failed(format!(
            "{attention} job(s) need attention"
        )));
    }
    Ok(())
}

/// The fleet's nodes (a shared catalog): lease, what each holds, and a
/// warning when their configurations differ.
async fn print_fleet(config: &Config, catalog: &Catalog, now: DateTime<Utc>) -> anyhow::Result<()> {
    let nodes = catalog.fleet().await?;
    println!();
    println!(
        "{:<14} {:<20} {:>8} {:<8} {:<9} {:<17} {:<18} RUNS",
        "NODE", "HOST", "PID", "MODE", "VERSION", "CONFIG", "LEASE"
    );
    for n in &nodes {
        let lease = if n.live {
            format!("{}s left", (n.lease_until - now).num_seconds().max(0))
        } else {
            format!("EXPIRED {}", age(Some(n.lease_until), now))
        };
        let runs: Vec<String> = n
            .runs
            .iter()
            .map(|r| {
                format!(
                    "{}/{} (attempt {}, {})",
                    r.job,
                    r.kind,
                    r.attempt,
                    age(Some(r.started_at), now)
                )
            })
            .collect();
        println!(
            "{:<14} {:<20} {:>8} {:<8} {:<9} {:<17} {:<18} {}",
            n.id,
            n.hostname,
            n.pid,
            n.mode,
            n.version,
            if n.config_hash == config.hash {
                n.config_hash.clone()
            } else {
                format!("{}*", n.config_hash)
            },
            lease,
            if runs.is_empty() {
                "-".into()
            } else {
                runs.join(", ")
            }
        );
    }
    if nodes.is_empty() {
        println!("(no node is registered: no daemon or run-due is running against this catalog)");
    }
    let mut hashes: Vec<&str> = nodes
        .iter()
        .filter(|n| n.live)
        .map(|n| n.config_hash.as_str())
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    if hashes.len() > 1 || hashes.first().is_some_and(|h| *h != config.hash) {
        println!(
            "WARNING: the fleet's nodes run different configurations (digests {}; this file's is {}; * marks the others). Nodes schedule what their own file says: roll the same config out to every node.",
            hashes.join(", "),
            config.hash
        );
    }
    Ok(())
}
