//! Verification of stored backups against their manifests.
//!
//! `checksum` re-reads every stored artifact and compares its size and SHA-256
//! with the manifest. It needs no private key: the backup host can prove its
//! backups are intact without being able to read them.

use backstop_storage::Storage;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::manifest::Manifest;

/// The outcome for one artifact.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCheck {
    pub kind: String,
    pub key: String,
    pub ok: bool,
    /// What differs, or why it could not be read.
    pub problem: Option<String>,
}

/// The outcome for one backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupCheck {
    pub backup_id: String,
    pub level: String,
    pub ok: bool,
    pub artifacts: Vec<ArtifactCheck>,
}

/// Re-reads every artifact of `manifest` from `storage` and compares size and
/// sha256 of the stored bytes with the manifest.
pub async fn verify_checksums(storage: &dyn Storage, manifest: &Manifest) -> BackupCheck {
    let mut artifacts = Vec::new();
    for a in &manifest.artifacts {
        let problem = match stored_digest(storage, &a.key).await {
            Err(e) => Some(format!("cannot read: {e}")),
            Ok((bytes, _)) if bytes != a.stored_bytes => Some(format!(
                "size differs: stored {bytes} bytes, manifest says {}",
                a.stored_bytes
            )),
            Ok((_, sum)) if sum != a.stored_sha256 => Some(format!(
                "sha256 differs: stored {sum}, manifest says {}",
                a.stored_sha256
            )),
            Ok(_) => None,
        };
        artifacts.push(ArtifactCheck {
            kind: a.kind.clone(),
            key: a.key.clone(),
            ok: problem.is_none(),
            problem,
        });
    }
    BackupCheck {
        backup_id: manifest.backup_id.clone(),
        level: "checksum".into(),
        ok: artifacts.iter().all(|a| a.ok),
        artifacts,
    }
}

async fn stored_digest(storage: &dyn Storage, key: &str) -> Result<(u64, String), String> {
    let mut reader = storage.open(key).await.map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| chain(&e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// An error with its sources: the store's client often wraps the real cause
/// (e.g. a response checksum mismatch) in a generic "streaming error".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out
}
