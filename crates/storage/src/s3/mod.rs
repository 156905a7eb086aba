//! The S3 backend (AWS S3 or any S3-compatible store): `<prefix><job>/<backup-id>/<file>`.
//!
//! Uploads are streaming multipart uploads: the stream is cut into parts,
//! sized (with how many are uploaded at once) to the memory the upload may
//! hold ([`PartPlan`]); each carries a CRC32C checksum the store verifies, and the object's size is confirmed with a
//! HEAD after completion. Any failure, or dropping the upload, aborts the
//! multipart upload so no partial object or pending upload is left behind.
//! Outputs smaller than one part use a single PutObject.
//!
//! Transient errors (5xx, throttling, timeouts, connection resets) are
//! retried by the SDK's standard strategy: exponential backoff with jitter,
//! a bounded number of attempts per request (so per part). Permanent ones
//! (403, NoSuchBucket, InvalidAccessKeyId) fail at once with a hint.
//!
//! The streaming upload's stages (cut parts, start the multipart upload,
//! keep a bounded set in flight, complete) are in `upload.rs`, error
//! mapping in `errors.rs`, abort-on-drop in `abort.rs`.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, Delete, ObjectIdentifier, ServerSideEncryption, StorageClass,
};
use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::{ByteStream, Journal, ObjectMeta, PendingUpload, Storage, StorageError, check_key};

mod abort;
mod errors;
mod upload;
use errors::{classify, is_not_found};
use upload::{DEFAULT_UPLOAD_MEMORY, MIN_PART as SMALLEST_PART};
pub use upload::{PartLimits, PartPlan};

/// S3's limit on parts per upload.
pub const MAX_PARTS: u32 = 10_000;
/// Request attempts (first try + retries) for transient errors.
const MAX_ATTEMPTS: u32 = 6;

/// Settings of one S3 store (mapped from the config by the pipeline).
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The store's name in the config, for messages.
    pub name: String,
    pub bucket: String,
    /// Empty or ending in `/`.
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    pub storage_class: Option<String>,
    pub sse: Option<String>,
    pub kms_key_id: Option<String>,
    /// (access key id, secret); `None` uses the standard AWS credential chain.
    pub credentials: Option<(String, String)>,
    /// The least part size; `None`: chosen from the memory an upload may
    /// hold (see [`PartPlan`]), larger when the expected size needs it.
    pub part_size: Option<u64>,
    /// Parts uploaded at once at most; `None`: as many as the memory holds (≤ 8).
    pub max_in_flight_parts: Option<usize>,
    /// Parts one object may have (`max_parts`, S3: 10,000).
    pub max_parts: u32,
    /// Every part the same size (`equal_parts`, default): false lets parts
    /// grow past the plan on stores that accept unequal parts.
    pub equal_parts: bool,
}

pub struct S3Storage {
    client: Client,
    opts: S3Options,
    journal: Option<Journal>,
}

impl S3Storage {
    /// Builds a client. Credentials and region come from the options, or the
    /// standard AWS chain (environment, profile, web identity, container and
    /// instance metadata) when none are configured.
    pub async fn new(opts: S3Options) -> Self {
        let retry = RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(20));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(120))
            .operation_attempt_timeout(Duration::from_secs(15 * 60))
            .build();
        let mut b = match &opts.credentials {
            // Static credentials: nothing in the default chain is consulted.
            Some((id, secret)) => aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .credentials_provider(Credentials::new(id, secret, None, None, "backstop-config")),
            None => {
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(opts.region.clone()))
                    .load()
                    .await;
                aws_sdk_s3::config::Builder::from(&shared)
            }
        };
        b = b
            .region(Region::new(opts.region.clone()))
            .force_path_style(opts.force_path_style)
            .retry_config(retry)
            .timeout_config(timeouts);
        if let Some(ep) = &opts.endpoint {
            b = b.endpoint_url(ep);
        }
        Self {
            client: Client::from_conf(b.build()),
            opts,
            journal: None,
        }
    }

    /// Records multipart uploads in flight in `journal` (none: not recorded).
    pub fn with_journal(mut self, journal: Option<Journal>) -> Self {
        self.journal = journal;
        self
    }

    pub(super) fn full_key(&self, key: &str) -> Result<String, StorageError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.opts.prefix))
    }

    pub(super) fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.opts.bucket, self.opts.prefix)
    }

    pub(super) fn err<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        classify(op, self.location(key), &self.opts, e)
    }

    pub(super) async fn put_single(
        &self,
        key: &str,
        full: &str,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let len = data.len();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.opts.bucket)
            .key(full)
            .content_length(len as i64)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .body(S3Body::from(data));
        if let Some(sc) = &self.opts.storage_class {
            req = req.storage_class(StorageClass::from(sc.as_str()));
        }
        if let Some(sse) = &self.opts.sse {
            req = req.server_side_encryption(ServerSideEncryption::from(sse.as_str()));
        }
        if let Some(k) = &self.opts.kms_key_id {
            req = req.ssekms_key_id(k);
        }
        req.send().await.map_err(|e| self.err("upload", key, e))?;
        Ok(())
    }

    pub(super) async fn confirm_size(
        &self,
        key: &str,
        full: &str,
        expected: u64,
    ) -> Result<(), StorageError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.opts.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| self.err("confirm", key, e))?;
        let got = head.content_length().unwrap_or(-1);
        if got != expected as i64 {
            return Err(StorageError::Remote {
                op: "confirm",
                location: self.location(key),
                message: format!("the store reports {got} bytes, {expected} were uploaded"),
                retryable: false,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn describe(&self) -> String {
        let mut d = format!("s3://{}/{}", self.opts.bucket, self.opts.prefix);
        if let Some(e) = &self.opts.endpoint {
            d.push_str(&format!(" at {e}"));
        }
        d
    }

    async fn put_stream(&self, key: &str, body: ByteStream) -> Result<u64, StorageError> {
        self.put_stream_within(key, body, DEFAULT_UPLOAD_MEMORY, crate::SizeHint::Unknown)
            .await
    }

    fn part_memory_minimum(&self) -> Option<u64> {
        // One part filling, one in flight and the HTTP client's copy of it.
        Some(3 * self.opts.part_size.unwrap_or(SMALLEST_PART))
    }

    /// The stream cut into parts within `memory`, planned for an object of
    /// about `expected` bytes (see [`upload`]).
    async fn put_stream_within(
        &self,
        key: &str,
        body: ByteStream,
        memory: u64,
        expected: crate::SizeHint,
    ) -> Result<u64, StorageError> {
        self.upload_stream(key, body, memory, expected).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let full = self.full_key(key)?;
        let len = data.len() as u64;
        self.put_single(key, &full, data).await?;
        self.confirm_size(key, &full, len).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.opts.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    StorageError::NotFound(key.to_string())
                } else {
                    self.err("read", key, e)
                }
            })?;
        let body = out.body.collect().await.map_err(|e| StorageError::Remote {
            op: "read",
            location: self.location(key),
            message: e.to_string(),
            retryable: true,
        })?;
        Ok(body.into_bytes())
    }

    async fn open_range(
        &self,
        key: &str,
        start: u64,
        end: Option<u64>,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StorageError> {
        let full = self.full_key(key)?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.opts.bucket)
            .key(&full);
        if start > 0 || end.is_some() {
            req = req.range(match end {
                Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                None => format!("bytes={start}-"),
            });
        }
        let out = req.send().await.map_err(|e| {
            if is_not_found(&e) {
                StorageError::NotFound(key.to_string())
            } else {
                self.err("read", key, e)
            }
        })?;
        Ok(Box::new(out.body.into_async_read()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let full_prefix = format!("{}{prefix}", self.opts.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.opts.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.err("list", prefix, e))?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = k.strip_prefix(&self.opts.prefix) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: rel.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.opts.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.err("delete", key, e))?;
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), StorageError> {
        for batch in keys.chunks(1000) {
            let mut ids = Vec::with_capacity(batch.len());
            for k in batch {
                let full = self.full_key(k)?;
                ids.push(
                    ObjectIdentifier::builder()
                        .key(full)
                        .build()
                        .map_err(|e| StorageError::BadKey(e.to_string()))?,
                );
            }
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StorageError::BadKey(e.to_string()))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.opts.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.err("delete", &batch[0], e))?;
            if let Some(first) = out.errors().first() {
                let (code, message) = (first.code().unwrap_or(""), first.message().unwrap_or(""));
                if crate::is_object_lock_refusal(code, message) {
                    return Err(StorageError::Locked {
                        op: "delete",
                        location: format!(
                            "s3://{}/{}",
                            self.opts.bucket,
                            first.key().unwrap_or("")
                        ),
                        code: code.to_string(),
                        message: message.to_string(),
                    });
                }
                return Err(StorageError::Remote {
                    op: "delete",
                    location: format!("s3://{}/{}", self.opts.bucket, first.key().unwrap_or("")),
                    message: format!(
                        "{}: {} ({} of {} objects failed)",
                        first.code().unwrap_or("error"),
                        first.message().unwrap_or(""),
                        out.errors().len(),
                        batch.len()
                    ),
                    retryable: false,
                });
            }
        }
        Ok(())
    }

    async fn pending_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, StorageError> {
        let full_prefix = format!("{}{prefix}", self.opts.prefix);
        let mut out = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.opts.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| self.err("list uploads", prefix, e))?;
            for u in page.uploads() {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let Some(rel) = k.strip_prefix(&self.opts.prefix) else {
                    continue;
                };
                out.push(PendingUpload {
                    key: rel.to_string(),
                    upload_id: id.to_string(),
                    initiated_unix: u.initiated().map(|t| t.secs()),
                });
            }
            if page.is_truncated() == Some(true) {
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(out)
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<(), StorageError> {
        let full = self.full_key(&upload.key)?;
        let result = self
            .client
            .abort_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(&full)
            .upload_id(&upload.upload_id)
            .send()
            .await;
        match result {
            Ok(_) => {}
            // Already gone: nothing left to abort.
            Err(SdkError::ServiceError(se)) if se.err().code() == Some("NoSuchUpload") => {}
            Err(e) => return Err(self.err("abort upload", &upload.key, e)),
        }
        if let Some(j) = &self.journal {
            j.ended(&self.opts.name, &upload.upload_id).await;
        }
        Ok(())
    }

    async fn probe(&self, write: bool) -> Result<String, StorageError> {
        // A one-key listing rather than HeadBucket: the same permission
        // (s3:ListBucket, which confirming uploads needs anyway), but a GET
        // whose error body carries the code, so a wrong secret and an
        // unknown key id are told apart instead of a bare 403.
        match self
            .client
            .list_objects_v2()
            .bucket(&self.opts.bucket)
            .prefix(&self.opts.prefix)
            .max_keys(1)
            .send()
            .await
        {
            Ok(_) => {}
            // Some stores answer a missing bucket with a bare 404.
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                return Err(StorageError::Remote {
                    op: "probe",
                    location: format!("s3://{}", self.opts.bucket),
                    message: format!(
                        "bucket \"{}\" does not exist (check storage.{}.bucket, region and endpoint)",
                        self.opts.bucket, self.opts.name
                    ),
                    retryable: false,
                });
            }
            Err(e) => return Err(self.err("probe", "", e)),
        }
        if write {
            let key = format!(".backstop-probe-{:08x}", rand::random::<u32>());
            let full = format!("{}{key}", self.opts.prefix);
            self.client
                .put_object()
                .bucket(&self.opts.bucket)
                .key(&full)
                .body(S3Body::from(Bytes::from_static(b"backstop write probe\n")))
                .send()
                .await
                .map_err(|e| self.err("probe write", &key, e))?;
            self.client
                .delete_object()
                .bucket(&self.opts.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| self.err("probe delete", &key, e))?;
            return Ok("reachable, bucket exists, write and delete allowed".into());
        }
        Ok("reachable, bucket exists".into())
    }
}
