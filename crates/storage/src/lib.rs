//! Storage stage of the flow: where encrypted artifacts and manifests land.
//!
//! [`Storage`] is the seam every backend implements; the pipeline never knows
//! which one it writes to. An object written with [`Storage::put_stream`]
//! becomes visible only when its stream ends with an explicit
//! [`StreamItem::Finish`]: a stream that simply stops (its producer failed,
//! panicked or was cancelled), or dropping the future, leaves nothing behind
//! under that key.

mod local;
mod s3;

use std::io;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

pub use local::LocalStorage;
/// What is known of an object's size before it is uploaded, for a store
/// that plans its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeHint {
    Unknown,
    /// About this big (the job's history, or its `expected_size`): planned
    /// for twice it, and refused if that does not fit the memory.
    Expected(u64),
    /// At most this big (the database's size on disk, which its compressed
    /// dump is far below): planned for it, or for as much as the memory
    /// holds, with a warning, when that is less.
    AtMost(u64),
}

pub use s3::{MAX_PARTS, PartLimits, PartPlan, S3Options, S3Storage};

use std::sync::Arc;

/// A shared journal handle.
pub type Journal = Arc<dyn UploadJournal>;

/// One item of an upload stream.
#[derive(Debug)]
pub enum StreamItem {
    Data(Bytes),
    /// The producer vouches that the stream is complete. Without it the
    /// upload is aborted when the channel closes.
    Finish,
}

/// A stream of chunks, committed only by a final [`StreamItem::Finish`].
pub type ByteStream = mpsc::Receiver<StreamItem>;

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's root (`<job>/<backup-id>/<file>`).
    pub key: String,
    pub size: u64,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Self-contained: the I/O error's text is in the message (and not
    /// repeated as a source).
    #[error("{op} {location} failed: {error}")]
    Io {
        op: &'static str,
        location: String,
        error: io::Error,
    },
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("upload of {key} aborted: {reason}")]
    Aborted { key: String, reason: String },
    #[error("invalid object key {0:?}")]
    BadKey(String),
    /// An object read whole was larger than its reader allows (a manifest,
    /// a signature): the store is untrusted input.
    #[error("object {key} is larger than the {limit} bytes it may have; not read")]
    TooLarge { key: String, limit: u64 },
    /// The store refused because the object is under Object Lock
    /// (retention or legal hold): expected until the lock expires, not a
    /// fault. Decided from the store's own error code and message.
    #[error(
        "{op} {location} refused: the object is protected by the bucket's Object Lock ({code}: {message})"
    )]
    Locked {
        op: &'static str,
        location: String,
        code: String,
        message: String,
    },
    #[error("{op} {location} failed: {message}")]
    Remote {
        op: &'static str,
        location: String,
        message: String,
        retryable: bool,
    },
}

/// Where a store records multipart uploads in flight, so that one left behind
/// (crash, store down during the abort) can be aborted later even on stores
/// that cannot list pending uploads. Implemented by the pipeline over the catalog.
#[async_trait]
pub trait UploadJournal: Send + Sync {
    async fn started(&self, store: &str, key: &str, upload_id: &str);
    async fn ended(&self, store: &str, upload_id: &str);
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    /// When it was started (Unix seconds), if the store says.
    pub initiated_unix: Option<i64>,
}

/// Whether an S3 error (its code and message, as the store sent them) is a
/// refusal by Object Lock: AWS answers a delete of a locked version with
/// `AccessDenied` "Access Denied because object protected by object lock",
/// other stores with `ObjectLocked` or "WORM protected". A plain
/// `AccessDenied` (missing permission) is not.
pub fn is_object_lock_refusal(code: &str, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    let lock_words = [
        "object lock",
        "objectlock",
        "retention",
        "legal hold",
        "worm",
    ];
    code == "ObjectLocked"
        || (matches!(code, "AccessDenied" | "InvalidRequest" | "Forbidden")
            && lock_words.iter().any(|w| m.contains(w)))
}

impl StorageError {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Io { error, .. } => matches!(
                error.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            StorageError::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// A place backups are stored.
#[async_trait]
pub trait Storage: Send + Sync {
    /// Human description for logs and `check-config` (no credentials).
    fn describe(&self) -> String;

    /// Streams `body` into `key` and returns the number of bytes stored.
    /// The object exists only if this returns `Ok`.
    ///
    /// # Errors
    /// A stream closed without `Finish`, or any write failure; nothing is left behind.
    async fn put_stream(&self, key: &str, body: ByteStream) -> Result<u64, StorageError>;

    /// [`Storage::put_stream`], holding at most about `memory` bytes of the
    /// stream at once, for an object whose size `expected` hints at: a store that gathers the stream into parts plans them, and
    /// how many it sends at once, to fit both (see [`PartPlan`]). Others
    /// need no memory of their own and ignore both.
    ///
    /// # Errors
    /// As [`Storage::put_stream`]; a store that cannot fit such an object
    /// in the memory refuses before it writes anything.
    async fn put_stream_within(
        &self,
        key: &str,
        body: ByteStream,
        _memory: u64,
        _expected: SizeHint,
    ) -> Result<u64, StorageError> {
        self.put_stream(key, body).await
    }

    /// The least memory an upload to this store holds, if it gathers the
    /// stream into parts in memory (and so takes a share of a job's
    /// `memory_budget`): two of its parts. `None`: it holds none.
    fn part_memory_minimum(&self) -> Option<u64> {
        None
    }

    /// Stores a small object in one piece (manifests).
    ///
    /// # Errors
    /// Any write failure; nothing is left behind.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;

    /// Reads a small object whole (manifests).
    ///
    /// # Errors
    /// [`StorageError::NotFound`] or a read failure.
    async fn get(&self, key: &str) -> Result<Bytes, StorageError>;

    /// Reads an object whole, but never more than `limit` bytes of it: the
    /// read stops there (a ranged read where the store has them), so an
    /// object larger than a listing said, or than any manifest may be,
    /// costs no more memory than the limit.
    ///
    /// # Errors
    /// [`StorageError::TooLarge`], [`StorageError::NotFound`] or a read failure.
    async fn get_capped(&self, key: &str, limit: u64) -> Result<Bytes, StorageError> {
        use tokio::io::AsyncReadExt;
        let reader = self
            .open_range(key, 0, Some(limit.saturating_add(1)))
            .await?;
        let mut body = Vec::new();
        reader
            .take(limit.saturating_add(1))
            .read_to_end(&mut body)
            .await
            .map_err(|error| StorageError::Io {
                op: "read",
                location: key.to_string(),
                error,
            })?;
        if body.len() as u64 > limit {
            return Err(StorageError::TooLarge {
                key: key.to_string(),
                limit,
            });
        }
        Ok(Bytes::from(body))
    }

    /// Opens an object for streaming reads.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] or an open failure.
    async fn open(&self, key: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError> {
        self.open_range(key, 0, None).await
    }

    /// Opens bytes `start..end` (to the end when `end` is `None`) for streaming reads.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] or an open failure.
    async fn open_range(
        &self,
        key: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError>;

    /// Every complete object whose key starts with `prefix`, sorted by key.
    ///
    /// # Errors
    /// A listing failure: callers must treat it as "unknown", never as "empty".
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError>;

    /// Deletes `key`; deleting a missing object is not an error.
    ///
    /// # Errors
    /// A failure to delete an existing object.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Deletes several objects (batched where the store allows).
    ///
    /// # Errors
    /// The first failure; objects before it may be gone.
    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        for k in keys {
            self.delete(k).await?;
        }
        Ok(())
    }

    /// Uploads under `prefix` that were started and never completed or aborted.
    ///
    /// # Errors
    /// A listing failure.
    async fn pending_uploads(&self, _prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        Ok(Vec::new())
    }

    /// Aborts one pending upload.
    ///
    /// # Errors
    /// The store refused or could not be reached.
    async fn abort_upload(&self, _upload: &PendingUpload) -> Result<(), StorageError> {
        Ok(())
    }

    /// Checks the store is reachable (and with `write`, that an object can be
    /// written and deleted). Returns what was checked.
    ///
    /// # Errors
    /// Why it is not usable.
    async fn probe(&self, write: bool) -> Result<String, StorageError>;
}

/// Whether `key` is one a store accepts: no empty, `.` or `..` segment,
/// none starting with a dot (temp files). A listing may still show others
/// (written by something else): readers skip them.
pub fn is_valid_key(key: &str) -> bool {
    check_key(key).is_ok()
}

/// Rejects keys that could escape the store's root or hide as temp files.
fn check_key(key: &str) -> Result<(), StorageError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == ".." || seg.starts_with('.'));
    if bad {
        Err(StorageError::BadKey(key.to_string()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "a/.tmp", "./a"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check_key("job/2026-01-01T00-00-00Z-abcd/manifest.json").is_ok());
    }
}
