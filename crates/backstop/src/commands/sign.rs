//! `backstop sign --job J --backup ID|all [--force]`: signs the manifests
//! (and verification records) of backups made before this host had a
//! signing key.

use backstop_config::Config;
use backstop_pipeline::sign::{Signed, Which, sign_job};

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    backup: &str,
    force: bool,
    storage: Option<&str>,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    let which = match backup {
        "all" if force => {
            return Err(CliError::usage(
                "--force signs one backup a person has checked: name it with --backup ID",
            ));
        }
        "all" => Which::All,
        id => Which::Id {
            id: id.to_string(),
            force,
        },
    };
    let report = sign_job(config, job, storage, &which).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for r in &report {
            let what = match &r.outcome {
                Signed::Signed { key } => format!("signed (key {key})"),
                Signed::Already { key } => format!("already signed (key {key})"),
                Signed::Refused { reason } => format!("NOT SIGNED: {reason}"),
            };
            let records = match (r.records_signed, r.records_left) {
                (0, 0) => String::new(),
                (s, 0) => format!("; {s} verification record(s) signed"),
                (s, l) => format!(
                    "; {s} verification record(s) signed, {l} left unsigned (not this host's catalog's: delete them if you do not recognise them)"
                ),
            };
            println!(
                "{:<10} {:<30} {:<27} {what}{records}",
                r.store, r.series, r.backup_id
            );
        }
    }
    if let Which::Id { id, .. } = &which
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
