//! Aborting a multipart upload: on failure, and also when the upload's
//! future is dropped (timeout, cancellation), so no pending upload is left.

use aws_sdk_s3::Client;
use tracing::warn;

use crate::Journal;

/// Aborts a multipart upload unless disarmed, including when the upload
/// future is dropped (timeout, cancellation).
pub(super) struct AbortGuard {
    pub(super) client: Client,
    pub(super) bucket: String,
    pub(super) key: String,
    pub(super) store: String,
    pub(super) journal: Option<Journal>,
    pub(super) upload_id: Option<String>,
}

impl AbortGuard {
    pub(super) async fn abort_now(&mut self) {
        if let Some(id) = self.upload_id.take() {
            match abort(&self.client, &self.bucket, &self.key, &id).await {
                Ok(()) => {
                    if let Some(j) = &self.journal {
                        j.ended(&self.store, &id).await;
                    }
                }
                Err(e) => warn!(key = %self.key, error = %e,
                    "Could not abort the multipart upload; the next run of the job aborts it."),
            }
        }
    }

    /// The upload completed: nothing to abort any more.
    pub(super) async fn completed(&mut self) {
        if let Some(id) = self.upload_id.take()
            && let Some(j) = &self.journal
        {
            j.ended(&self.store, &id).await;
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if let Some(id) = self.upload_id.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (client, bucket, key) =
                (self.client.clone(), self.bucket.clone(), self.key.clone());
            let (store, journal) = (self.store.clone(), self.journal.clone());
            rt.spawn(async move {
                if abort(&client, &bucket, &key, &id).await.is_ok()
                    && let Some(j) = journal
                {
                    j.ended(&store, &id).await;
                }
            });
        }
    }
}

pub(super) async fn abort(
    client: &Client,
    bucket: &str,
    key: &str,
    id: &str,
) -> Result<(), String> {
    client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| format!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))
}
