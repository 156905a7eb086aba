//! `backstop drill --job J`: the disaster-recovery drill as a command.

use backstop_config::Config;
use backstop_pipeline::read::recovery::{DrillRequest, drill};

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, job: &str, req: &DrillRequest, json: bool) -> CmdResult {
    let job = find_job(config, job)?;
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let report = super::as_node(config, &catalog, async {
        drill(&catalog, config, job, req)
            .await
            .map_err(CliError::from)
    })
    .await;
    catalog.close().await;
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (series, c) in &report.checks {
            println!(
                "{:<7} {series:<40} {} {}",
                if c.ok { "ok" } else { "FAILED" },
                c.backup_id,
                c.scratch_database
                    .as_deref()
                    .map(|d| format!("(scratch {d}, dropped)"))
                    .unwrap_or_default()
            );
            for p in c.problems() {
                println!("        {p}");
            }
        }
        println!(
            "drill of job \"{}\" from store \"{}\": {} restored in {:.1}s{}",
            report.job,
            report.store,
            report.checks.len(),
            report.seconds,
            match report.rto_seconds {
                Some(rto) => format!(
                    " (rto {}: {})",
                    humantime::format_duration(std::time::Duration::from_secs_f64(rto)),
                    if report.seconds <= rto {
                        "met"
                    } else {
                        "MISSED"
                    }
                ),
                None => String::new(),
            }
        );
    }
    if !report.ok {
        return Err(CliError::failed(format!(
            "drill of job \"{}\" failed: {}",
            report.job,
            report.problems.join("; ")
        )));
    }
    if let Some(rto) = report.rto_seconds
        && report.seconds > rto
    {
        return Err(CliError::failed(format!(
            "drill of job \"{}\" took {:.1}s, longer than its rto of {rto:.0}s",
            report.job, report.seconds
        )));
    }
    Ok(())
}
