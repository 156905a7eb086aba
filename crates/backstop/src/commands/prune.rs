//! `backstop prune --job J`: the job's retention applied to each of its
//! stores, the plan printed (keep or delete, and why).

use backstop_config::Config;
use backstop_pipeline::read::select::job_stores;

use super::find_job;
use crate::error::{CliError, CmdResult};

pub async fn run(
    config: &Config,
    job: &str,
    storage: Option<&str>,
    dry_run: bool,
    json: bool,
) -> CmdResult {
    let job = find_job(config, job)?;
    let Some(retention) = &job.retention else {
        return Err(CliError::usage(format!(
            "job \"{}\" has no retention policy, so every backup is kept; add retention = {{ keep_daily = 7, … }} to the job or a [retention] default",
            job.name
        )));
    };
    let catalog = backstop_pipeline::open_catalog(config).await?;
    let stores = job_stores(job, storage)?;
    let prune = async {
        backstop_pipeline::prune::prune_job(config, job, retention, &catalog, &stores, dry_run)
            .await
            .map_err(CliError::from)
    };
    // A dry run deletes and records nothing; a real one on a shared
    // catalog claims the job's prune, so it never runs beside a node's.
    let reports = if dry_run {
        prune.await
    } else {
        claimed_prune(config, &catalog, &job.name, prune).await
    };
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
        return Err(CliError::failed(format!(
            "prune failed in {failed} store(s); nothing was deleted there"
        )));
    }
    if undeleted > 0 {
        return Err(CliError::failed(format!(
            "{undeleted} object(s) could not be deleted (listed as SKIPPED above); the next prune tries again"
        )));
    }
    Ok(())
}

fn print_prune(r: &backstop_pipeline::prune::PruneReport) {
    let verb = if r.dry_run { "would delete" } else { "delete" };
    let series = if r.series.contains('/') {
        format!(" {}", r.series)
    } else {
        String::new()
    };
    println!(
        "store \"{}\"{series}: {} backup(s), keep {}, {verb} {}{}",
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

/// `prune` run as this process's claimed prune of `job` when the catalog is
/// shared: refused while another node prunes the job, stopped when the
/// lease is lost, its end recorded.
async fn claimed_prune<T>(
    config: &Config,
    catalog: &backstop_catalog::Catalog,
    job: &str,
    prune: impl std::future::Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    use backstop_catalog::fleet::Release;
    use backstop_catalog::{Outcome, RunKind};
    let Some(node) = backstop_daemon::CliNode::join(config, catalog).await? else {
        return prune.await;
    };
    let claim = match node.claim(job, RunKind::Prune).await {
        Ok(Ok(c)) => c,
        Ok(Err(holder)) => {
            node.leave().await;
            return Err(CliError::failed(format!(
                "another backstop process ({holder}) is pruning job \"{job}\"; wait for it"
            )));
        }
        Err(e) => {
            node.leave().await;
            return Err(e.into());
        }
    };
    let result = tokio::select! {
        r = prune => r,
        () = node.cancel.cancelled() => Err(CliError::failed(super::LEASE_LOST)),
    };
    let message = result.as_ref().err().map(|e| {
        let (CliError::Usage(e) | CliError::Failed(e)) = e;
        format!("{e:#}")
    });
    let how = match (&result, node.cancel.is_cancelled()) {
        (_, true) => Release::Interrupted(super::LEASE_LOST),
        (Ok(_), false) => Release::Done(Outcome::Success, None, None),
        (Err(_), false) => Release::Done(Outcome::Failed, message.as_deref(), None),
    };
    node.release(&claim, how).await;
    node.leave().await;
    result
}
