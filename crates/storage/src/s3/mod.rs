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
//! Length: `impl Storage for S3Storage` is one trait implementation against
//! one SDK (streaming multipart upload with bounded parts in flight, ranged
//! reads, paged listing, batched deletes, probes), kept whole so each method
//! reads top to bottom; error mapping is in `errors.rs`, abort-on-drop in
//! `abort.rs`.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    ServerSideEncryption, StorageClass,
};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncRead;
use tracing::{debug, warn};

use crate::{
    ByteStream, Journal, ObjectMeta, PendingUpload, Storage, StorageError, StreamItem, check_key,
};

mod abort;
mod errors;
use abort::AbortGuard;
use errors::{classify, flatten, is_not_found};

/// S3's limit on parts per upload.
pub const MAX_PARTS: u32 = 10_000;
const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
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
    /// The size of the first 1,000 parts; `None`: chosen from the memory
    /// an upload may hold (see [`PartPlan`]).
    pub part_size: Option<u64>,
    /// Parts uploaded at once at most; `None`: as many as the memory holds (≤ 8).
    pub max_in_flight_parts: Option<usize>,
}

pub struct S3Storage {
    client: Client,
    opts: S3Options,
    journal: Option<Journal>,
}

/// S3's smallest part (except the last).
const MIN_PART: u64 = 5 * MIB;
/// The largest base part chosen when the store does not set one: beyond
/// it, more memory buys more parts in flight rather than bigger parts.
const MAX_AUTO_PART: u64 = 16 * MIB;
/// Parts in flight at most when the store does not set a limit.
const MAX_AUTO_IN_FLIGHT: usize = 8;
/// What an upload may hold when its caller gives no budget.
const DEFAULT_UPLOAD_MEMORY: u64 = 32 * MIB;
const MIB: u64 = 1024 * 1024;

/// How one upload is cut into parts within the memory it may hold: the part
/// being filled and the parts in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    /// The size of the first 1,000 parts (they grow after, see [`part_size_for`]).
    pub base: u64,
    /// The memory the upload's parts may hold.
    pub memory: u64,
    /// `max_in_flight_parts` as the store sets it, if it does.
    pub max_in_flight: Option<usize>,
}

impl PartPlan {
    /// The plan for `memory` bytes, honouring the store's own `part_size`
    /// and `max_in_flight_parts` where set.
    pub fn within(memory: u64, part_size: Option<u64>, max_in_flight: Option<usize>) -> Self {
        let base = part_size.unwrap_or_else(|| {
            // Three parts' worth: one filling, two in flight.
            ((memory / 3) / MIB * MIB).clamp(MIN_PART, MAX_AUTO_PART)
        });
        PartPlan {
            base,
            memory,
            max_in_flight,
        }
    }

    /// Parts uploaded at once when parts are `part` big: as many as fit
    /// beside the one being filled, at least one, at most the store's
    /// `max_in_flight_parts` (8 when unset).
    pub fn in_flight_for(&self, part: u64) -> usize {
        let fit = (self.memory / part.max(1)).saturating_sub(1) as usize;
        fit.clamp(1, self.max_in_flight.unwrap_or(MAX_AUTO_IN_FLIGHT))
    }

    /// What the parts hold at most when they are `part` big.
    pub fn peak_for(&self, part: u64) -> u64 {
        part * (self.in_flight_for(part) as u64 + 1)
    }
}

/// Part buffers to reuse: a part's allocation comes back once its upload is
/// done, so an upload allocates about as many parts as it holds at once,
/// not one per part. Allocating a new 9 MiB part per part grew peak RSS
/// against a slow store from 58 MiB (0.2 GB) to 77 MiB (0.9 GB): the
/// allocator kept what the freed parts left behind.
#[derive(Default)]
struct PartPool(Vec<BytesMut>);

impl PartPool {
    /// An empty buffer of at least `size` bytes.
    fn take(&mut self, size: usize) -> BytesMut {
        match self.0.iter().position(|b| b.capacity() >= size) {
            Some(i) => {
                let mut b = self.0.swap_remove(i);
                b.clear();
                b
            }
            None => BytesMut::with_capacity(size),
        }
    }

    /// `part`'s allocation, if nothing else holds it any more.
    fn give_back(&mut self, part: Bytes) {
        if let Ok(b) = part.try_into_mut() {
            self.0.push(b);
        }
    }
}

/// Size of part `n` (1-based): `base` for the first 1,000 parts, then
/// doubling every 500 parts (capped at 5 GiB) so that 10,000 parts hold at
/// least 5 TiB for any base of 5 MiB or more. Memory only grows past
/// 1,000 × base, i.e. for objects beyond 16 GB at the default 16 MiB.
pub fn part_size_for(n: u32, base: u64) -> u64 {
    if n <= 1000 {
        return base;
    }
    let k = ((n - 1001) / 500 + 1).min(20);
    (base << k).min(MAX_PART)
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

    fn full_key(&self, key: &str) -> Result<String, StorageError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.opts.prefix))
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{key}", self.opts.bucket, self.opts.prefix)
    }

    fn err<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        classify(op, self.location(key), &self.opts, e)
    }

    async fn put_single(&self, key: &str, full: &str, data: Bytes) -> Result<(), StorageError> {
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

    async fn confirm_size(&self, key: &str, full: &str, expected: u64) -> Result<(), StorageError> {
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
        self.put_stream_within(key, body, DEFAULT_UPLOAD_MEMORY)
            .await
    }

    fn part_memory_minimum(&self) -> Option<u64> {
        Some(2 * self.opts.part_size.unwrap_or(MIN_PART))
    }

    async fn put_stream_within(
        &self,
        key: &str,
        mut body: ByteStream,
        memory: u64,
    ) -> Result<u64, StorageError> {
        let full = self.full_key(key)?;
        let plan = PartPlan::within(memory, self.opts.part_size, self.opts.max_in_flight_parts);
        let base = plan.base;
        debug!(
            key = %full,
            part = base,
            in_flight = plan.in_flight_for(base),
            memory,
            "Upload planned."
        );
        // Said once per upload, when parts outgrow the memory.
        let mut over_budget = false;
        // Each part has an allocation of its own (a part in flight never pins
        // more memory than itself), taken back when its upload is done.
        let mut pool = PartPool::default();
        let mut buf = pool.take(part_size_for(1, base) as usize);
        let mut total = 0u64;
        let mut guard: Option<AbortGuard> = None;
        let mut part_no: u32 = 0;
        // Spawned so parts keep uploading while the stream is awaited; dropping
        // the set (cancellation) stops them and the guard aborts the upload.
        let mut in_flight: tokio::task::JoinSet<Result<(CompletedPart, Bytes), StorageError>> =
            tokio::task::JoinSet::new();
        let mut done: Vec<CompletedPart> = Vec::new();

        let aborted = |reason: &str| StorageError::Aborted {
            key: key.to_string(),
            reason: reason.to_string(),
        };

        loop {
            let item = body.recv().await;
            let finished = match item {
                Some(StreamItem::Data(chunk)) => {
                    total += chunk.len() as u64;
                    buf.extend_from_slice(&chunk);
                    false
                }
                Some(StreamItem::Finish) => true,
                None => {
                    if let Some(g) = guard.as_mut() {
                        g.abort_now().await;
                    }
                    return Err(aborted("the stream ended without completing"));
                }
            };
            // Cut full parts (and, at the end, the last one).
            loop {
                let want = part_size_for(part_no + 1, base) as usize;
                let last = finished && !buf.is_empty() && buf.len() < want;
                if buf.len() < want && !last {
                    break;
                }
                if guard.is_none() {
                    if finished && part_no == 0 {
                        // Small output: one PutObject.
                        let data = buf.split().freeze();
                        self.put_single(key, &full, data).await?;
                        self.confirm_size(key, &full, total).await?;
                        return Ok(total);
                    }
                    let mut req = self
                        .client
                        .create_multipart_upload()
                        .bucket(&self.opts.bucket)
                        .key(&full)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32C);
                    if let Some(sc) = &self.opts.storage_class {
                        req = req.storage_class(StorageClass::from(sc.as_str()));
                    }
                    if let Some(sse) = &self.opts.sse {
                        req = req.server_side_encryption(ServerSideEncryption::from(sse.as_str()));
                    }
                    if let Some(k) = &self.opts.kms_key_id {
                        req = req.ssekms_key_id(k);
                    }
                    let created = req.send().await.map_err(|e| self.err("upload", key, e))?;
                    let id = created.upload_id().unwrap_or_default().to_string();
                    debug!(key = %full, upload_id = %id, "Multipart upload started.");
                    if let Some(j) = &self.journal {
                        j.started(&self.opts.name, key, &id).await;
                    }
                    guard = Some(AbortGuard {
                        client: self.client.clone(),
                        bucket: self.opts.bucket.clone(),
                        key: full.clone(),
                        store: self.opts.name.clone(),
                        journal: self.journal.clone(),
                        upload_id: Some(id),
                    });
                }
                part_no += 1;
                if part_no > MAX_PARTS {
                    guard.as_mut().expect("started").abort_now().await;
                    return Err(aborted("the object would need more than 10,000 parts"));
                }
                let next = pool.take(part_size_for(part_no + 1, base) as usize);
                let mut part = std::mem::replace(&mut buf, next);
                if part.len() > want {
                    // Carry the overflow into the next part by copy, not by
                    // sharing the allocation.
                    buf.extend_from_slice(&part[want..]);
                    part.truncate(want);
                }
                let part = part.freeze();
                if !over_budget && plan.peak_for(want as u64) > memory {
                    over_budget = true;
                    warn!(
                        key = %full,
                        part = want,
                        memory,
                        "This object is past {} parts: they grow to {} MiB, and two of them exceed the {} MiB its upload may hold; raise the job's memory_budget or the store's part_size for objects this big.",
                        part_no - 1,
                        want >> 20,
                        memory >> 20
                    );
                }
                // Bound memory: wait for a slot before queueing another part.
                while in_flight.len() >= plan.in_flight_for(want as u64) {
                    match in_flight.join_next().await.map(flatten) {
                        Some(Ok((p, body))) => {
                            done.push(p);
                            pool.give_back(body);
                        }
                        Some(Err(e)) => {
                            in_flight.abort_all();
                            guard.as_mut().expect("started").abort_now().await;
                            return Err(e);
                        }
                        None => break,
                    }
                }
                let upload_id = guard
                    .as_ref()
                    .and_then(|g| g.upload_id.clone())
                    .unwrap_or_default();
                let client = self.client.clone();
                let bucket = self.opts.bucket.clone();
                let full_key = full.clone();
                let location = self.location(key);
                let opts = self.opts.clone();
                let n = part_no as i32;
                // Ours, to reuse the allocation once the SDK has let go.
                let kept = part.clone();
                in_flight.spawn(async move {
                    let out = client
                        .upload_part()
                        .bucket(&bucket)
                        .key(&full_key)
                        .upload_id(&upload_id)
                        .part_number(n)
                        .content_length(part.len() as i64)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32C)
                        .body(S3Body::from(part))
                        .send()
                        .await
                        .map_err(|e| classify("upload part", location, &opts, e))?;
                    Ok::<_, StorageError>((
                        CompletedPart::builder()
                            .part_number(n)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .set_checksum_crc32_c(out.checksum_crc32_c().map(str::to_string))
                            .build(),
                        kept,
                    ))
                });
                if last {
                    break;
                }
            }
            if finished {
                break;
            }
            // Collect finished parts; fail early if one failed.
            while let Some(r) = in_flight.try_join_next().map(flatten) {
                match r {
                    Ok((p, body)) => {
                        done.push(p);
                        pool.give_back(body);
                    }
                    Err(e) => {
                        in_flight.abort_all();
                        if let Some(g) = guard.as_mut() {
                            g.abort_now().await;
                        }
                        return Err(e);
                    }
                }
            }
        }

        let Some(mut g) = guard else {
            // An empty object.
            self.put_single(key, &full, Bytes::new()).await?;
            self.confirm_size(key, &full, 0).await?;
            return Ok(0);
        };
        while let Some(r) = in_flight.join_next().await.map(flatten) {
            match r {
                Ok((p, _)) => done.push(p),
                Err(e) => {
                    in_flight.abort_all();
                    g.abort_now().await;
                    return Err(e);
                }
            }
        }
        done.sort_by_key(|p| p.part_number());
        let upload_id = g.upload_id.clone().unwrap_or_default();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(&full)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = completed {
            g.abort_now().await;
            return Err(self.err("complete upload", key, e));
        }
        g.completed().await;
        if let Err(e) = self.confirm_size(key, &full, total).await {
            // Never leave an object whose size is wrong under a real key.
            let _ = self.delete(key).await;
            return Err(e);
        }
        Ok(total)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_reach_five_tebibytes_within_the_part_limit() {
        for base in [5u64 << 20, 8 << 20, 16 << 20, 64 << 20] {
            let capacity: u64 = (1..=MAX_PARTS).map(|n| part_size_for(n, base)).sum();
            assert!(capacity >= 5 << 40, "base {base}: only {capacity}");
            assert!((1..=MAX_PARTS).all(|n| part_size_for(n, base) <= MAX_PART));
            assert!((1..=1000).all(|n| part_size_for(n, base) == base));
            // Never shrinks.
            assert!((2..=MAX_PARTS).all(|n| part_size_for(n, base) >= part_size_for(n - 1, base)));
        }
    }

    #[test]
    fn parts_fit_the_memory_three_to_a_share_and_never_below_s3_s_minimum() {
        let p = PartPlan::within(28 * MIB, None, None);
        assert_eq!((p.base, p.in_flight_for(p.base)), (9 * MIB, 2));
        assert!(p.peak_for(p.base) <= 28 * MIB);
        let small = PartPlan::within(7 * MIB, None, None);
        assert_eq!((small.base, small.in_flight_for(small.base)), (MIN_PART, 1));
        let big = PartPlan::within(400 * MIB, None, None);
        assert_eq!((big.base, big.in_flight_for(big.base)), (16 * MIB, 8));
    }

    #[test]
    fn as_parts_grow_fewer_are_in_flight_but_always_one() {
        let p = PartPlan::within(40 * MIB, None, None);
        assert_eq!(p.base, 13 * MIB);
        let sizes = [1000, 1001, 1501, 2001].map(|n| part_size_for(n, p.base));
        let in_flight = sizes.map(|s| p.in_flight_for(s));
        assert_eq!(in_flight, [2, 1, 1, 1], "{sizes:?}");
        // From the first doubling on, two parts exceed the memory: the
        // upload warns and goes on with one in flight.
        assert!(p.peak_for(sizes[1]) > 40 * MIB);
    }

    #[test]
    fn a_part_s_allocation_is_reused_once_nothing_else_holds_it() {
        let mut pool = PartPool::default();
        let mut part = pool.take(MIN_PART as usize);
        part.extend_from_slice(&[7u8; 1000]);
        let at = part.as_ptr();
        let part = part.freeze();
        // Still held elsewhere (the SDK's copy of the body): not reused.
        let elsewhere = part.clone();
        pool.give_back(part);
        assert!(pool.0.is_empty());
        pool.give_back(elsewhere);
        let again = pool.take(MIN_PART as usize);
        assert_eq!(again.as_ptr(), at, "the same allocation");
        assert!(again.is_empty() && again.capacity() >= MIN_PART as usize);
        // Too small for a bigger part: a new one.
        pool.give_back(again.freeze());
        assert_ne!(pool.take(2 * MIN_PART as usize).as_ptr(), at);
    }

    #[test]
    fn a_store_s_own_part_size_and_limit_are_kept() {
        let p = PartPlan::within(100 * MIB, Some(32 * MIB), Some(2));
        assert_eq!((p.base, p.in_flight_for(p.base)), (32 * MIB, 2));
        let p = PartPlan::within(400 * MIB, Some(8 * MIB), Some(3));
        assert_eq!(p.in_flight_for(p.base), 3);
    }
}
