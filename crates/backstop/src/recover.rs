//! The commands that read backups back: verify, restore, download, and the
//! comparison of a backup with the live database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use backstop_catalog::{Catalog, Outcome, RunResult};
use backstop_config::{Config, JobConfig, VerifyLevel};
use backstop_crypto::Identities;
use backstop_dump::PgTarget;
use backstop_pipeline::manifest::Manifest;
use backstop_pipeline::restore::{self, RestoreOptions};
use backstop_pipeline::verify::{self, BackupCheck};
use backstop_pipeline::{human_bytes, list_backups, open_storage};
use backstop_storage::Storage;
use chrono::Utc;

use crate::{ArtifactKind, UsageError, find_job, job_stores};

/// The identity file systemd's `LoadCredential=age-identity:…` provides.
const CREDENTIAL_NAME: &str = "age-identity";

/// The backups `which` (an id, `latest`, or with `allow_all` also `all`) of
/// `job` in `store`, newest first.
async fn select(
    config: &Config,
    job: &JobConfig,
    store: &str,
    which: &str,
    allow_all: bool,
) -> anyhow::Result<(Arc<dyn Storage>, Vec<Manifest>)> {
    let backend = open_storage(config, store, None)
        .await
        .map_err(anyhow::Error::msg)?;
    let (manifests, unreadable) = list_backups(backend.as_ref(), &job.name)
        .await
        .with_context(|| format!("cannot list backups in store \"{store}\""))?;
    for u in &unreadable {
        // A log event, not a bare line: `--log-format json` (and the
        // daemon's journal) must stay one JSON object per line.
        tracing::warn!(key = %u.key, reason = %u.reason, "Skipping an unreadable manifest.");
    }
    let selected: Vec<Manifest> = match which {
        "all" if allow_all => manifests,
        "all" => {
            return Err(UsageError(
                "--backup all is only for verify; name one backup id or `latest`".into(),
            )
            .into());
        }
        "latest" => manifests.into_iter().take(1).collect(),
        id => manifests
            .into_iter()
            .filter(|m| m.backup_id == id)
            .collect(),
    };
    if selected.is_empty() {
        return Err(NoBackup(format!(
            "no backup {which:?} of job \"{}\" in store \"{store}\" (see `backstop list --job {} --storage {store}`)",
            job.name, job.name
        ))
        .into());
    }
    Ok((backend, selected))
}

/// The store holds no backup matching the selection (for `latest`: none
/// yet). The daemon's scheduled verify skips a job in that state instead
/// of reporting a failed verification.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NoBackup(String);

/// A database named on the command line. A password in the URL is refused:
/// arguments are visible to every user. It comes from `password_file`, else
/// PGPASSWORD; without either, the client tools may still use ~/.pgpass.
fn target_from_cli(url: &str, password_file: Option<&Path>) -> anyhow::Result<PgTarget> {
    if url::Url::parse(url).is_ok_and(|u| u.password().is_some()) {
        return Err(UsageError(
            "--target contains a password, which every user can read in `ps`; remove it and use --target-password-file, PGPASSWORD or ~/.pgpass".into(),
        )
        .into());
    }
    let password = match password_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --target-password-file {}", p.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        None => std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()),
    };
    PgTarget::new(url, password.as_deref()).map_err(|e| UsageError(format!("--target: {e}")).into())
}

/// Loads the first identity found: the one given, the configured ones, then
/// systemd's credential. None when there is none (encrypted artifacts then
/// fail with a message saying how to give one).
fn identities(candidates: &[Option<&Path>]) -> anyhow::Result<Option<Arc<Identities>>> {
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| PathBuf::from(d).join(CREDENTIAL_NAME))
        .filter(|p| p.is_file());
    let path = candidates
        .iter()
        .flatten()
        .map(|p| p.to_path_buf())
        .next()
        .or(credential);
    match path {
        Some(p) => {
            restore::warn_if_exposed(&p);
            Ok(Some(Arc::new(Identities::from_file(&p)?)))
        }
        None => Ok(None),
    }
}

fn is_encrypted(m: &Manifest) -> bool {
    m.artifacts
        .iter()
        .any(|a| a.encryption != backstop_pipeline::manifest::ArtifactEncryption::None)
}

pub(crate) struct VerifyRequest {
    pub which: String,
    pub level: VerifyLevel,
    pub storage: Option<String>,
    pub identity: Option<PathBuf>,
    pub target: Option<String>,
    pub target_password_file: Option<PathBuf>,
    pub json: bool,
}

pub(crate) async fn verify(config: &Config, job: &str, req: &VerifyRequest) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let checks = verify_job(config, job, req, !req.json).await?;
    if req.json {
        let results: Vec<_> = checks
            .iter()
            .map(|(store, check)| serde_json::json!({ "store": store, "result": check }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    let failures = checks.iter().filter(|(_, c)| !c.ok).count();
    if failures > 0 {
        anyhow::bail!("{failures} backup(s) failed verification");
    }
    Ok(())
}

/// Verifies the backups `req` selects of `job` in each store, records every
/// check in the catalog, and (with `print`) prints each as it completes.
/// The daemon's scheduled verification runs this too.
///
/// # Errors
/// A usage problem (no identity, no target) or a store that cannot be listed;
/// mismatches are results, not errors.
pub(crate) async fn verify_job(
    config: &Config,
    job: &JobConfig,
    req: &VerifyRequest,
    print: bool,
) -> anyhow::Result<Vec<(String, BackupCheck)>> {
    let stores = job_stores(job, req.storage.as_deref())?;
    let level = req.level;
    let verify_cfg = job.verify.as_ref();
    let server = match (level, &req.target) {
        (VerifyLevel::Restore, Some(url)) => {
            Some(target_from_cli(url, req.target_password_file.as_deref())?)
        }
        (VerifyLevel::Restore, None) => match verify_cfg.and_then(|v| v.target.as_ref()) {
            Some(db) => Some(PgTarget::from_config(db).map_err(anyhow::Error::msg)?),
            None => {
                return Err(UsageError(format!(
                    "--level restore needs a server for its scratch database: pass --target postgres://user@host:port/postgres or set verify.target in job \"{}\"",
                    job.name
                ))
                .into());
            }
        },
        _ => None,
    };
    let (ids, pg_restore) = if level.needs_identity() {
        let ids = identities(&[
            req.identity.as_deref(),
            verify_cfg.and_then(|v| v.identity_file.as_deref()),
            job.identity_file.as_deref(),
        ])?;
        let tool = backstop_dump::find_tool(
            "pg_restore",
            job.pg_dump_path.as_deref(),
            job.pg_bin_dir.as_deref(),
        )
        .await?;
        (ids, Some(tool))
    } else {
        (None, None)
    };
    let catalog = Catalog::open(&config.catalog).await?;
    let mut results = Vec::new();
    for store in &stores {
        let (backend, selected) = select(config, job, store, &req.which, true).await?;
        for m in &selected {
            if level.needs_identity() && ids.is_none() && is_encrypted(m) {
                return Err(UsageError(format!(
                    "--level {} decrypts backup {}: pass --identity FILE (the age identity matching the job's recipients) or set identity_file in job \"{}\"",
                    level.as_str(),
                    m.backup_id,
                    job.name
                ))
                .into());
            }
            let run = catalog
                .start_run(&job.name, "verify", Some(&m.backup_id), Utc::now())
                .await?;
            catalog.set_verify_scope(run, level.as_str(), store).await?;
            let check = match level {
                VerifyLevel::Checksum => verify::verify_checksums(backend.as_ref(), m).await,
                VerifyLevel::Decrypt => {
                    let tool = pg_restore.as_ref().expect("found above");
                    verify::verify_decrypt(backend.clone(), m, ids.clone(), tool).await
                }
                VerifyLevel::Restore => {
                    let server = server.as_ref().expect("resolved above");
                    let options = RestoreOptions {
                        pg_bin_dir: job.pg_bin_dir.clone(),
                        pg_dump_path: job.pg_dump_path.clone(),
                        progress: print,
                        ..Default::default()
                    };
                    verify::verify_restore(backend.clone(), m, ids.clone(), server, &options).await
                }
            };
            let problems = problems(&check);
            let error = problems.join("; ");
            catalog
                .finish_run(
                    run,
                    if check.ok {
                        Outcome::Success
                    } else {
                        Outcome::Failed
                    },
                    Utc::now(),
                    &RunResult {
                        error: (!check.ok).then_some(error.as_str()),
                        ..Default::default()
                    },
                )
                .await?;
            if print {
                print_check(store, &check, &problems);
            }
            results.push((store.clone(), check));
        }
    }
    catalog.close().await;
    Ok(results)
}

fn problems(check: &BackupCheck) -> Vec<String> {
    check
        .artifacts
        .iter()
        .filter_map(|a| a.problem.as_ref().map(|p| format!("{}: {p}", a.key)))
        .chain(check.differences.iter().cloned())
        .collect()
}

fn print_check(store: &str, check: &BackupCheck, problems: &[String]) {
    let scratch = check
        .scratch_database
        .as_ref()
        .map(|d| format!(", scratch database {d} dropped"))
        .unwrap_or_default();
    if check.ok {
        let what = match check.level.as_str() {
            "restore" => "restored; inventory and row counts match the manifest".to_string(),
            _ => format!("{} artifact(s) match the manifest", check.artifacts.len()),
        };
        println!(
            "{store}: {} {} OK: {what}{scratch}",
            check.backup_id, check.level
        );
    } else {
        println!(
            "{store}: {} {} FAILED{scratch}",
            check.backup_id, check.level
        );
        for p in problems {
            println!("  {p}");
        }
    }
}

/// Compares the backup's inventory and row counts with the live database.
pub(crate) async fn compare_live(
    config: &Config,
    job: &str,
    which: &str,
    storage: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let store = job_stores(job, storage)?.swap_remove(0);
    let (_, selected) = select(config, job, &store, which, false).await?;
    let m = &selected[0];
    let target = PgTarget::from_config(&job.database).map_err(anyhow::Error::msg)?;
    let live = backstop_dump::live_inventory(&target, &m.dump.filters()).await?;
    let exact = m.row_counts == "exact";
    let differences = verify::compare_inventory(&m.inventory, &live, exact, ("backup", "live"));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "backup_id": m.backup_id,
                "backup_started_at": m.started_at,
                "rows_compared": exact,
                "differences": differences,
                "live": live,
            }))?
        );
    } else {
        println!(
            "backup {} (taken {}) against {} now:",
            m.backup_id,
            m.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            target.display()
        );
        if !exact {
            println!(
                "  (row counts not compared: the backup recorded them as {})",
                m.row_counts
            );
        }
        if differences.is_empty() {
            println!("  no differences in inventory or row counts");
        }
        for d in &differences {
            println!("  {d}");
        }
    }
    if !differences.is_empty() {
        anyhow::bail!(
            "{} difference(s) between the backup and the live database",
            differences.len()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn restore(
    config: &Config,
    job: &str,
    which: &str,
    storage: Option<&str>,
    target: &str,
    target_password_file: Option<&Path>,
    identity: Option<&Path>,
    mut options: RestoreOptions,
) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let store = job_stores(job, storage)?.swap_remove(0);
    let target = target_from_cli(target, target_password_file)?;
    let (backend, selected) = select(config, job, &store, which, false).await?;
    let m = &selected[0];
    let ids = identities(&[identity, job.identity_file.as_deref()])?;
    options.pg_bin_dir = job.pg_bin_dir.clone();
    options.pg_dump_path = job.pg_dump_path.clone();
    eprintln!(
        "restoring backup {} of job \"{}\" ({} stored, {} tables) from store \"{store}\" into {}",
        m.backup_id,
        job.name,
        human_bytes(m.stored_bytes()),
        m.inventory.tables,
        target.display()
    );
    let report = restore::restore(backend, m, ids, &target, &options)
        .await
        .with_context(|| {
            format!(
                "restore of backup {} into {} failed",
                m.backup_id,
                target.display()
            )
        })?;
    println!(
        "restored backup {} into database \"{}\" in {:.1}s{}{}; {}",
        report.backup_id,
        report.database,
        report.seconds,
        if report.created_database {
            " (created)"
        } else {
            ""
        },
        if report.globals_applied {
            ", roles applied"
        } else {
            ""
        },
        if report.whole_artifact_checked {
            "every byte matched the manifest's sha256".to_string()
        } else {
            format!(
                "pg_restore needed only the first {} of the archive, so the whole artifact was not checksummed (run `backstop verify` for that)",
                human_bytes(report.stored_bytes_read)
            )
        }
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn download(
    config: &Config,
    job: &str,
    which: &str,
    storage: Option<&str>,
    kind: ArtifactKind,
    out: &Path,
    force: bool,
    decrypt: Option<Option<PathBuf>>,
) -> anyhow::Result<()> {
    let job = find_job(config, job)?;
    let store = job_stores(job, storage)?.swap_remove(0);
    if out.exists() && !force {
        return Err(UsageError(format!(
            "{} exists; choose another --out or pass --force to replace it",
            out.display()
        ))
        .into());
    }
    let (backend, selected) = select(config, job, &store, which, false).await?;
    let m = &selected[0];
    let kind = match kind {
        ArtifactKind::Database => "database",
        ArtifactKind::Globals => "globals",
    };
    let artifact = m.artifact(kind).ok_or_else(|| {
        UsageError(format!(
            "backup {} has no {kind} artifact (it has: {})",
            m.backup_id,
            m.artifacts
                .iter()
                .map(|a| a.kind.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let plain = decrypt.is_some();
    let ids = match &decrypt {
        Some(identity) => identities(&[identity.as_deref(), job.identity_file.as_deref()])?,
        None => None,
    };
    let read = restore::download(backend, artifact, ids, out, plain, true)
        .await
        .with_context(|| format!("download of {} failed", artifact.key))?;
    let written = std::fs::metadata(out).map(|md| md.len()).unwrap_or(0);
    println!(
        "wrote {} ({}, {}) from {} ({} read); sha256 matches the manifest",
        out.display(),
        if plain {
            format!("plain {} pg_dump output", artifact.format)
        } else {
            format!(
                "as stored: {}, {}",
                artifact.compression,
                encryption_name(artifact)
            )
        },
        human_bytes(written),
        artifact.key,
        human_bytes(read)
    );
    if !plain {
        println!(
            "  restore with stock tools: age -d -i KEY {} | zstd -d | pg_restore -d DBNAME",
            out.display()
        );
    }
    Ok(())
}

fn encryption_name(a: &backstop_pipeline::manifest::Artifact) -> &'static str {
    match a.encryption {
        backstop_pipeline::manifest::ArtifactEncryption::None => "not encrypted",
        backstop_pipeline::manifest::ArtifactEncryption::Age { .. } => "age-encrypted",
    }
}
