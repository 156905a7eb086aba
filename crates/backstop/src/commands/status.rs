//! `backstop status`: one screen for on-call, read from the catalog and the
//! stores (the daemon need not run). Jobs needing attention come first; the
//! exit code is 1 if any job is failing, stale or suspect, so it can be a check.

use backstop_config::Config;
use backstop_daemon::status::{FleetStatus, age, report};
use backstop_pipeline::human_bytes;
use chrono::{DateTime, Utc};

use crate::error::{CliError, CmdResult};

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

/// Length: the status table and its JSON, row by row.
pub async fn run(config: &Config, json: bool) -> CmdResult {
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let now = Utc::now();
    // Attention first, then by name: the status page's rows, in its order.
    let report = report(config, &catalog, now).await?;
    let rows = &report.jobs;
    let attention = rows.iter().filter(|r| r.needs_attention()).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:<16} {:<16} {:<22} {:<26} {:<18} {:>7} {:<22} VERIFIED",
            "JOB", "STATE", "LAST RUN", "LAST SUCCESS (RPO)", "NEXT RUN", "STORED", "LATEST SIZE"
        );
        for r in rows {
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
    if let Some(fleet) = report.fleet.as_ref().filter(|_| !json) {
        print_fleet(fleet, now);
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
fn print_fleet(fleet: &FleetStatus, now: DateTime<Utc>) {
    let nodes = &fleet.nodes;
    println!();
    println!(
        "{:<14} {:<20} {:>8} {:<8} {:<9} {:<17} {:<18} RUNS",
        "NODE", "HOST", "PID", "MODE", "VERSION", "CONFIG", "LEASE"
    );
    for n in nodes {
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
            if n.config_hash == fleet.config_hash {
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
    for w in &fleet.waiting {
        println!(
            "waiting: {} of job \"{}\" ({} run(s), the oldest {})",
            w.kind,
            w.job,
            w.runs,
            age(Some(w.since), now)
        );
    }
    if fleet.configs_differ {
        println!(
            "WARNING: the fleet's nodes run different configurations (digests {}; this file's is {}; * marks the others). Nodes schedule what their own file says: roll the same config out to every node.",
            fleet.live_config_hashes.join(", "),
            fleet.config_hash
        );
    }
}
