//! `backstop download`: one stored artifact written to a file, as stored or
//! decrypted, checked against the manifest; nothing is left on failure.

use backstop_config::Config;
use backstop_pipeline::human_bytes;
use backstop_pipeline::manifest::{Artifact, ArtifactEncryption};
use backstop_pipeline::read::download::download;
use backstop_pipeline::read::select::{Selection, identities, select};

use super::one_backup;
use crate::cli::DownloadArgs;
use crate::error::{CliError, CmdResult};

pub async fn run(config: &Config, args: DownloadArgs) -> CmdResult {
    let (job, store) = one_backup(config, &args.from, args.artifact == "globals")?;
    let out = args.out.as_path();
    if out.exists() && !args.force {
        return Err(CliError::usage(format!(
            "{} exists; choose another --out or pass --force to replace it",
            out.display()
        )));
    }
    let which = Selection::parse(&args.from.backup);
    let (backend, selected) = select(config, &job, &store, &which, false).await?;
    let m = &selected[0];
    let stem = |a: &Artifact| a.file.split('.').next().unwrap_or_default().to_string();
    let artifact = m
        .artifacts
        .iter()
        .find(|a| stem(a) == args.artifact)
        .ok_or_else(|| {
            CliError::usage(format!(
                "backup {} has no {} artifact; --artifact is one of: {}",
                m.backup_id,
                args.artifact,
                m.artifacts.iter().map(stem).collect::<Vec<_>>().join(", ")
            ))
        })?;
    let plain = args.decrypt;
    let ids = if plain {
        identities(&[args.identity.as_deref(), job.identity_file.as_deref()])?
    } else {
        None
    };
    let read = download(
        backend,
        artifact,
        ids,
        out,
        plain,
        &crate::progress::Bars::unless(false),
    )
    .await
    .map_err(|e| CliError::from(e).context(format!("download of {} failed", artifact.key)))?;
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

fn encryption_name(a: &Artifact) -> &'static str {
    match a.encryption {
        ArtifactEncryption::None => "not encrypted",
        ArtifactEncryption::Age { .. } => "age-encrypted",
    }
}
