//! `backstop sign --job J [--backup ID|all]`: signs the manifests of
//! backups made before this host had a signing key.

use backstop_config::Config;
use backstop_pipeline::sign::{Signed, sign_job};

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    backup: &str,
    storage: Option<&str>,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    let only = (backup != "all").then_some(backup);
    let report = sign_job(config, job, storage, only).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for r in &report {
            let what = match &r.outcome {
                Signed::Signed { key } => format!("signed (key {key})"),
                Signed::Already { key } => format!("already signed (key {key})"),
                Signed::Refused { reason } => format!("NOT SIGNED: {reason}"),
            };
            println!(
                "{:<10} {:<30} {:<27} {what}",
                r.store, r.series, r.backup_id
            );
        }
    }
    if let Some(id) = only
        && report.is_empty()
    {
        return Err(CliError::failed(format!(
            "no backup {id} of job \"{}\" in its stores (see `backstop list --job {}`)",
            job.name, job.name
        )));
    }
    let refused = report
        .iter()
        .filter(|r| matches!(r.outcome, Signed::Refused { .. }))
        .count();
    if refused > 0 {
        return Err(CliError::failed(format!(
            "{refused} of {} backup(s) were not signed (reasons above)",
            report.len()
        )));
    }
    let signed = report
        .iter()
        .filter(|r| matches!(r.outcome, Signed::Signed { .. }))
        .count();
    eprintln!("{signed} signed, {} already signed.", report.len() - signed);
    Ok(())
}
