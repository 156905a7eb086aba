//! `download`: one stored artifact written to a file, as stored or
//! decrypted, checked against the manifest, renamed into place only when
//! complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backstop_crypto::Identities;
use backstop_storage::Storage;

use crate::manifest::Artifact;
use crate::read::consume::{RestoreError, RestoreStep, failed};
use crate::read::readback::{self, ReadbackError};
use crate::watch::Watch;

/// Writes `artifact` to `path` (as stored, or with `plain` decrypted and
/// decompressed), checked against the manifest. The file is created 0600
/// under a temporary name and renamed into place only when complete.
///
/// # Errors
/// A read, write or checksum failure; nothing is left at `path`.
pub async fn download(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    path: &Path,
    plain: bool,
    watch: &Watch,
) -> Result<u64, RestoreError> {
    let identities = if plain { identities } else { None };
    let opened = if plain {
        readback::open(storage.as_ref(), artifact, identities).await?
    } else {
        readback::open_raw(storage.as_ref(), artifact).await?
    };
    let meters = opened.meters.clone();
    let partial = partial_name(path);
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| {
                failed(
                    RestoreStep::CreateOutput,
                    format!("{}: {e}", partial.display()),
                )
            })?
    };
    let progress = {
        let meter = meters.stored.clone();
        watch.read(
            format!("downloading {}", artifact.file),
            Arc::new(move || meter.bytes()),
            artifact.stored_bytes,
        )
    };
    let name = path.display().to_string();
    let copy = tokio::task::spawn_blocking(move || -> Result<(), ReadbackError> {
        let mut out = std::io::BufWriter::with_capacity(1024 * 1024, out);
        let mut reader = if plain { opened.plain()? } else { opened.raw() };
        reader.copy_to(&mut out, &name, false, (None, None))?;
        let file = out.into_inner().map_err(|e| ReadbackError::Write {
            consumer: name.clone(),
            reason: e.to_string(),
        })?;
        file.sync_all().map_err(|e| ReadbackError::Write {
            consumer: name,
            reason: e.to_string(),
        })
    })
    .await
    .map_err(|_| failed(RestoreStep::Download, "the download thread panicked"));
    let result = match copy {
        Ok(Ok(())) => if plain {
            meters.check(artifact)
        } else {
            meters.check_stored(artifact)
        }
        .map_err(RestoreError::from),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        failed(
            RestoreStep::RenameOutput,
            format!("{}: {e}", path.display()),
        )
    })?;
    if let Some(p) = progress {
        p.finish();
    }
    Ok(meters.stored.bytes())
}

fn partial_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}
