//! `backstop run-due --once [--job NAME] [--max-runtime D]`: the daemon's
//! work for one moment, for a cluster scheduler (a Kubernetes CronJob).

use std::path::Path;
use std::time::Duration;

use backstop_config::Config;

use crate::error::{CliError, CmdResult};

pub async fn run(
    config_path: &Path,
    config: Config,
    job: Option<String>,
    max_runtime: Option<Duration>,
    interrupt: &tokio_util::sync::CancellationToken,
) -> CmdResult {
    let report = backstop_daemon::run_due(
        config_path.to_path_buf(),
        config,
        job,
        max_runtime,
        interrupt,
    )
    .await
    .map_err(|e| CliError::failed(format!("run-due: {e:#}")))?;
    for (job, kind, outcome, error) in &report.runs {
        match error {
            Some(e) => println!("{job} {kind}: {outcome}: {e}"),
            None => println!("{job} {kind}: {outcome}"),
        }
    }
    for e in &report.catalog_errors {
        println!("catalog: {e}");
    }
    if report.runs.is_empty() && report.catalog_errors.is_empty() {
        println!("nothing was due");
    }
    if !report.catalog_errors.is_empty() {
        return Err(CliError::failed(format!(
            "the catalog failed after this invocation joined the fleet ({}); work that was due may not have run: check the catalog and run again",
            report.catalog_errors[0]
        )));
    }
    if report.timed_out {
        return Err(CliError::failed(
            "--max-runtime ran out; the runs going were interrupted and are pending for the next invocation",
        ));
    }
    if report.ok() {
        Ok(())
    } else {
        let bad = report
            .runs
            .iter()
            .filter(|r| {
                !matches!(
                    r.2,
                    backstop_catalog::Outcome::Success | backstop_catalog::Outcome::Skipped
                )
            })
            .count();
        Err(CliError::failed(format!("{bad} run(s) did not succeed")))
    }
}
