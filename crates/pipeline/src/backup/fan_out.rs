//! Writing one artifact to every store of a backup at once: a store that
//! fails drops out (recorded in its [`Target`]) while the others go on; the
//! artifact fails as a whole only if the dump or the stream fails, or every
//! store does. Then each store is asked to confirm what it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use backstop_config::{Encryption, JobConfig};
use backstop_dump::{DumpChild, RowCounter};
use backstop_storage::{Storage, StorageError, StreamItem};
use tokio::sync::mpsc;
use tracing::warn;

use super::artifact_key;
use crate::manifest::Artifact;
use crate::stream::{self, StreamError, StreamStats};
use crate::{BackupError, DumpTool, Step};

/// Chunks queued per store before the stream waits for it.
const UPLOAD_QUEUE: usize = 4;

/// A store the backup is written to, and how it is doing.
pub(super) struct Target {
    pub(super) name: String,
    pub(super) storage: Arc<dyn Storage>,
    /// Keys committed in this store by this run.
    pub(super) written: Vec<String>,
    /// Why this store dropped out of the run.
    pub(super) failed: Option<BackupError>,
    /// Its manifest is written: the backup exists in this store.
    pub(super) complete: bool,
}

impl Target {
    pub(super) fn live(&self) -> bool {
        self.failed.is_none()
    }
}

/// The first store failure (all stores failed).
pub(super) fn first_failure(targets: &mut [Target]) -> BackupError {
    targets
        .iter_mut()
        .find_map(|t| t.failed.take())
        .unwrap_or_else(|| BackupError::said(Step::Upload, "no store accepted the backup"))
}

/// Streams one child's output to every live store. A store that fails drops
/// out (recorded in its target) while the others continue; the artifact
/// fails as a whole only if the dump or stream fails, or every store does.
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream_artifact(
    job: &JobConfig,
    targets: &mut [Target],
    backup_id: &str,
    file: &str,
    tool: DumpTool,
    child: DumpChild,
    stdout: std::fs::File,
    counter: Option<RowCounter>,
) -> Result<StreamStats, BackupError> {
    let key = artifact_key(job, backup_id, file);
    let live: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].live()).collect();
    let mut senders = Vec::new();
    let mut uploads = Vec::new();
    for &i in &live {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        senders.push(tx);
        let storage = targets[i].storage.clone();
        let key = key.clone();
        uploads.push(async move { storage.put_stream(&key, rx).await });
    }
    let recipients = match &job.encryption {
        Encryption::None => None,
        Encryption::Age { recipients, .. } => Some(recipients.clone()),
    };
    let handle = stream::start(stdout, job.compression, recipients, counter, senders);

    let produce = async move {
        let streamed = handle.finish().await;
        let dumped = child.finish().await;
        match (streamed, dumped) {
            (Ok((stats, senders)), Ok(_)) => {
                // Every stage and the child vouch for the stream: commit it.
                for tx in senders.into_iter().flatten() {
                    let _ = tx.send(StreamItem::Finish).await;
                }
                Ok(stats)
            }
            // Dropping the senders without Finish aborts every upload.
            (streamed, dumped) => Err((streamed.err(), dumped.err())),
        }
    };
    let (produced, uploaded) = tokio::join!(produce, futures::future::join_all(uploads));

    for (&i, up) in live.iter().zip(uploaded) {
        let t = &mut targets[i];
        match up {
            Ok(_) => t.written.push(key.clone()),
            // Aborted because production failed: not this store's fault.
            Err(StorageError::Aborted { .. }) => {}
            Err(e) => {
                warn!(job = %job.name, store = %t.name, error = %e, "Store failed; the other stores of the job (if any) continue.");
                t.failed = Some(BackupError::at(Step::UploadTo(t.name.clone()), e));
            }
        }
    }
    match produced {
        Ok(stats) => {
            if targets.iter().any(Target::live) {
                Ok(stats)
            } else {
                Err(first_failure(targets))
            }
        }
        Err((streamed, dumped)) => {
            // The root cause first: when every store failed, pg_dump died of a
            // broken pipe, so its error is the consequence, not the cause.
            if !targets.iter().any(Target::live) {
                return Err(first_failure(targets));
            }
            if let Some(e) = dumped {
                return Err(BackupError::at(Step::Dump(tool), e));
            }
            match streamed {
                Some(StreamError::Downstream) | None => Err(BackupError::said(
                    Step::Dump(tool),
                    "the stream stopped before completing",
                )),
                Some(e) => Err(BackupError::at(stream_step(&e), e)),
            }
        }
    }
}

fn stream_step(e: &StreamError) -> Step {
    match e {
        StreamError::Read(_) => Step::ReadDumpOutput,
        StreamError::Compress(_) => Step::Compress,
        StreamError::Encrypt(_) => Step::Encrypt,
        StreamError::Downstream | StreamError::Panicked => Step::Stream,
    }
}

pub(super) async fn confirm_sizes(
    t: &Target,
    job: &JobConfig,
    backup_id: &str,
    artifacts: &[Artifact],
) -> Result<(), BackupError> {
    let prefix = format!("{}/{}/", job.name, backup_id);
    let listed: BTreeMap<String, u64> = t
        .storage
        .list(&prefix)
        .await
        .map_err(|e| BackupError::at(Step::ConfirmUploadTo(t.name.clone()), e))?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    for a in artifacts {
        match listed.get(&a.key) {
            Some(&size) if size == a.stored_bytes => {}
            Some(&size) => {
                return Err(BackupError::said(
                    Step::ConfirmUpload,
                    format!(
                        "store \"{}\" holds {} bytes for {}, expected {}",
                        t.name, size, a.key, a.stored_bytes
                    ),
                ));
            }
            None => {
                return Err(BackupError::said(
                    Step::ConfirmUpload,
                    format!("store \"{}\" does not list {} after upload", t.name, a.key),
                ));
            }
        }
    }
    Ok(())
}
