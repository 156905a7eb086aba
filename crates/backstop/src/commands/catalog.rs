//! `backstop catalog rebuild [--job J]`: the catalog rebuilt from the
//! stores' manifests and verification records.

use backstop_config::Config;

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run_rebuild(config: &Config, job: Option<&str>, json: bool) -> CmdResult {
    let only = job.map(|j| find_job(config, j)).transpose()?;
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let rows = backstop_pipeline::rebuild::rebuild(&catalog, config, only).await;
    catalog.close().await;
    let rows = rows?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for r in &rows {
            match &r.error {
                Some(e) => println!("job \"{}\" store \"{}\": FAILED: {e}", r.job, r.store),
                None => println!(
                    "job \"{}\" store \"{}\": {} backup(s) in {} series, {} added; {} verification(s), {} added{}; {:.2}s",
                    r.job,
                    r.store,
                    r.backups,
                    r.series,
                    r.backups_added,
                    r.verifications,
                    r.verifications_added,
                    if r.cluster_runs_added > 0 {
                        format!("; {} cluster run(s) added", r.cluster_runs_added)
                    } else {
                        String::new()
                    },
                    r.seconds
                ),
            }
            for u in &r.untrusted {
                println!("  skipped, not trusted: {u}");
            }
        }
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(CliError::failed(format!(
            "{failed} store(s) could not be read; the catalog has what the others hold"
        )));
    }
    Ok(())
}

pub use run_rebuild as rebuild;
