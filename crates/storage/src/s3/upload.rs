//! The streaming upload, stage by stage: a [`PartCutter`] cuts the stream
//! into parts sized to the memory the upload may hold ([`PartPlan`]); the
//! first full part starts the multipart upload (an output smaller than one
//! part is one PutObject instead); a [`Multipart`] keeps a bounded set of
//! parts in flight, each with a CRC32C the store verifies; completing it
//! confirms the object's size with a HEAD. Any failure, or dropping the
//! upload, aborts it so no partial object or pending upload is left.

use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use bytes::{Bytes, BytesMut};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::abort::AbortGuard;
use super::errors::{classify, flatten};
use super::{MAX_PARTS, S3Storage};
use crate::{ByteStream, StorageError, StreamItem};

/// S3's largest part.
pub(super) const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
/// S3's smallest part (except the last).
pub(super) const MIN_PART: u64 = 5 * MIB;
/// The largest base part chosen when the store does not set one: beyond
/// it, more memory buys more parts in flight rather than bigger parts.
const MAX_AUTO_PART: u64 = 16 * MIB;
/// Parts in flight at most when the store does not set a limit.
const MAX_AUTO_IN_FLIGHT: usize = 8;
/// What an upload may hold when its caller gives no budget.
pub(super) const DEFAULT_UPLOAD_MEMORY: u64 = 32 * MIB;
pub(super) const MIB: u64 = 1024 * 1024;

/// How one upload is cut into parts, planned before its first byte: every
/// part the same size (the last smaller), so every provider accepts the
/// object (Cloudflare R2 refuses unequal parts at CompleteMultipartUpload,
/// after the whole dump), big enough that the expected size fits the
/// store's `max_parts` twice over, and never more than the upload's memory
/// holds: the part being filled and at least one in flight, which the HTTP
/// client copies as it sends it (measured: each part in flight costs twice
/// its size), so three parts at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlan {
    /// Every part's size but the last's.
    pub part: u64,
    /// The memory the upload's parts may hold.
    pub memory: u64,
    /// `max_in_flight_parts` as the store sets it, if it does.
    pub max_in_flight: Option<usize>,
    /// Parts the store takes at most (`max_parts`).
    pub max_parts: u32,
    /// Parts may grow past the plan (`equal_parts = false`: stores that
    /// accept unequal parts), while two of them still fit the memory.
    pub may_grow: bool,
}

/// A store's own limits on how it is uploaded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimits {
    pub part_size: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub max_parts: u32,
    pub equal_parts: bool,
}

impl Default for PartLimits {
    fn default() -> Self {
        Self {
            part_size: None,
            max_in_flight: None,
            max_parts: MAX_PARTS,
            equal_parts: true,
        }
    }
}

impl PartPlan {
    /// The plan for `memory` bytes, honouring the store's own `part_size`
    /// and `max_in_flight_parts` where set, for an object of no known size.
    pub fn within(memory: u64, part_size: Option<u64>, max_in_flight: Option<usize>) -> Self {
        let limits = PartLimits {
            part_size,
            max_in_flight,
            ..PartLimits::default()
        };
        let part = limits.part_size.unwrap_or_else(|| auto_part(memory));
        PartPlan {
            part,
            memory,
            max_in_flight,
            max_parts: limits.max_parts,
            may_grow: !limits.equal_parts,
        }
    }

    /// The plan for an object of about `expected` bytes (None: unknown)
    /// within `memory`: parts of what the memory suggests, or larger when
    /// twice the expected size would not fit `max_parts` of them.
    ///
    /// # Errors
    /// When such parts do not fit the memory twice (one filling, one in
    /// flight) or exceed S3's 5 GiB: what to change, in words.
    pub fn plan(memory: u64, expected: Option<u64>, limits: &PartLimits) -> Result<Self, String> {
        let chosen = limits.part_size.unwrap_or_else(|| auto_part(memory));
        let needed = expected.map_or(0, |e| {
            e.saturating_mul(2)
                .div_ceil(u64::from(limits.max_parts.max(1)))
                .div_ceil(MIB)
                * MIB
        });
        let part = chosen.max(needed).max(MIN_PART);
        let about = |n: u64| format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64);
        if part > MAX_PART {
            return Err(format!(
                "an object of about {} cannot be uploaded in {} parts of at most 5 GiB; raise the store's max_parts",
                about(expected.unwrap_or(0)),
                limits.max_parts
            ));
        }
        if 3 * part > memory {
            return Err(format!(
                "an object of about {} (twice that, for growth) needs parts of {} MiB to stay within the store's {} parts, and an upload holds three of them ({} MiB: one filling, one in flight and the HTTP client's copy of it), more than the {} MiB this upload may hold; raise the job's memory_budget to give it at least {} MiB (with streams, per stream), or raise the store's max_parts if the provider allows more",
                about(expected.unwrap_or(0)),
                part >> 20,
                limits.max_parts,
                (3 * part) >> 20,
                memory >> 20,
                (3 * part).div_ceil(MIB)
            ));
        }
        Ok(PartPlan {
            part,
            memory,
            max_in_flight: limits.max_in_flight,
            max_parts: limits.max_parts,
            may_grow: !limits.equal_parts,
        })
    }

    /// The largest equal parts whose three fit `memory` (at least S3's
    /// least), for an object whose size is not known well enough to refuse.
    pub fn fitting(memory: u64, limits: &PartLimits) -> Self {
        let part = (memory / 3 / MIB * MIB).clamp(MIN_PART, MAX_PART);
        PartPlan {
            part: limits.part_size.map_or(part, |p| p.max(part)),
            memory,
            max_in_flight: limits.max_in_flight,
            max_parts: limits.max_parts,
            may_grow: !limits.equal_parts,
        }
    }

    /// The size of part `n` (1-based): the plan's part; with `may_grow`,
    /// doubling every twentieth of `max_parts` past its first half, while
    /// three parts still fit the memory (and never past 5 GiB).
    pub fn part_size(&self, n: u32) -> u64 {
        let half = self.max_parts / 2;
        if !self.may_grow || n <= half {
            return self.part;
        }
        let every = (self.max_parts / 20).max(1);
        let mut size = self.part;
        for _ in 0..((n - half - 1) / every + 1).min(20) {
            let next = (size * 2).min(MAX_PART);
            if 3 * next > self.memory {
                break;
            }
            size = next;
        }
        size
    }

    /// What the upload holds at most: `max_parts` parts of their sizes.
    pub fn capacity(&self) -> u64 {
        (1..=self.max_parts).map(|n| self.part_size(n)).sum()
    }

    /// Parts uploaded at once when parts are `part` big: as many as fit
    /// beside the one being filled, each twice (the HTTP client's copy), at
    /// least one, at most the store's `max_in_flight_parts` (8 when unset).
    pub fn in_flight_for(&self, part: u64) -> usize {
        let fit = ((self.memory / part.max(1)).saturating_sub(1) / 2) as usize;
        fit.clamp(1, self.max_in_flight.unwrap_or(MAX_AUTO_IN_FLIGHT))
    }

    /// What the parts hold at most when they are `part` big.
    pub fn peak_for(&self, part: u64) -> u64 {
        part * (2 * self.in_flight_for(part) as u64 + 1)
    }
}

/// A fifth of `memory` (one part filling, two in flight and their copies),
/// in whole MiB, between S3's least and 16 MiB.
fn auto_part(memory: u64) -> u64 {
    ((memory / 5) / MIB * MIB).clamp(MIN_PART, MAX_AUTO_PART)
}

/// Part buffers to reuse: a part's allocation comes back once its upload is
/// done, so an upload allocates about as many parts as it holds at once,
/// not one per part. Allocating a new 9 MiB part per part grew peak RSS
/// against a slow store from 58 MiB (0.2 GB) to 77 MiB (0.9 GB): the
/// allocator kept what the freed parts left behind.
#[derive(Default)]
pub(super) struct PartPool(Vec<BytesMut>);

impl PartPool {
    /// An empty buffer of at least `size` bytes. Buffers smaller than
    /// `size` are freed: parts only grow, so they would never be used again.
    pub(super) fn take(&mut self, size: usize) -> BytesMut {
        self.0.retain(|b| b.capacity() >= size);
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
    pub(super) fn give_back(&mut self, part: Bytes) {
        if let Ok(b) = part.try_into_mut() {
            self.0.push(b);
        }
    }
}

/// Cuts a stream into parts of the plan's sizes, each in an allocation of
/// its own that is filled to its size and never past it (a chunk that
/// crosses a part's end is copied in two pieces, so no buffer is ever
/// reallocated to a larger one).
struct PartCutter {
    plan: PartPlan,
    buf: BytesMut,
    /// What of the last chunk is not copied into a part yet.
    pending: Bytes,
    pool: PartPool,
    /// Parts cut so far.
    cut: u32,
    /// Bytes taken in.
    total: u64,
}

impl PartCutter {
    fn new(plan: PartPlan) -> Self {
        let mut pool = PartPool::default();
        let buf = pool.take(plan.part_size(1) as usize);
        PartCutter {
            plan,
            buf,
            pending: Bytes::new(),
            pool,
            cut: 0,
            total: 0,
        }
    }

    /// Takes a chunk in (after the parts the last one filled were cut).
    fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.pending.is_empty());
        self.total += chunk.len() as u64;
        self.pending = chunk;
    }

    /// Copies what is pending into the part being filled, up to its size.
    fn fill(&mut self) {
        let want = self.plan.part_size(self.cut + 1) as usize;
        let n = want.saturating_sub(self.buf.len()).min(self.pending.len());
        self.buf.extend_from_slice(&self.pending[..n]);
        bytes::Buf::advance(&mut self.pending, n);
    }

    /// The size of the next part when one is due: a full part, or (once the
    /// stream is `finished`) what is left.
    fn due(&mut self, finished: bool) -> Option<usize> {
        self.fill();
        let want = self.plan.part_size(self.cut + 1) as usize;
        let last = finished && !self.buf.is_empty() && self.pending.is_empty();
        (self.buf.len() >= want || last).then_some(want)
    }

    /// The next part and its number; None past the store's `max_parts`.
    fn cut(&mut self, _want: usize) -> Option<(u32, Bytes)> {
        self.cut += 1;
        if self.cut > self.plan.max_parts {
            return None;
        }
        let next = self.pool.take(self.plan.part_size(self.cut + 1) as usize);
        let part = std::mem::replace(&mut self.buf, next);
        Some((self.cut, part.freeze()))
    }

    /// Everything taken in, when it fits one part (a single PutObject).
    fn whole(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// A multipart upload under way: its abort guard and the parts in flight.
/// Spawned, so parts keep uploading while the stream is awaited; dropping
/// it (cancellation) stops them and the guard aborts the upload.
struct Multipart {
    guard: AbortGuard,
    upload_id: String,
    in_flight: JoinSet<Result<(CompletedPart, Bytes), StorageError>>,
    done: Vec<CompletedPart>,
}

impl Multipart {
    /// Stops the parts in flight and aborts the upload.
    async fn abort(&mut self) {
        self.in_flight.abort_all();
        self.guard.abort_now().await;
    }

    /// Records one finished part (its buffer goes back to `pool`), or
    /// aborts the upload on the part's failure.
    async fn finished(
        &mut self,
        part: Result<(CompletedPart, Bytes), StorageError>,
        pool: &mut PartPool,
    ) -> Result<(), StorageError> {
        match part {
            Ok((p, body)) => {
                self.done.push(p);
                pool.give_back(body);
                Ok(())
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Waits until fewer than `limit` parts are in flight (bounding memory).
    async fn wait_for_slot(
        &mut self,
        limit: usize,
        pool: &mut PartPool,
    ) -> Result<(), StorageError> {
        while self.in_flight.len() >= limit {
            match self.in_flight.join_next().await.map(flatten) {
                Some(r) => self.finished(r, pool).await?,
                None => break,
            }
        }
        Ok(())
    }

    /// Collects the parts already finished; fails early if one failed.
    async fn collect_ready(&mut self, pool: &mut PartPool) -> Result<(), StorageError> {
        while let Some(r) = self.in_flight.try_join_next().map(flatten) {
            self.finished(r, pool).await?;
        }
        Ok(())
    }
}

impl S3Storage {
    /// The stream uploaded to `key`, cut into parts within `memory`;
    /// returns its size once the store confirms it.
    pub(super) async fn upload_stream(
        &self,
        key: &str,
        mut body: ByteStream,
        memory: u64,
        hint: crate::SizeHint,
    ) -> Result<u64, StorageError> {
        let full = self.full_key(key)?;
        let limits = PartLimits {
            part_size: self.opts.part_size,
            max_in_flight: self.opts.max_in_flight_parts,
            max_parts: self.opts.max_parts,
            equal_parts: self.opts.equal_parts,
        };
        let aborted = |reason: &str| StorageError::Aborted {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let refused = |message: String| StorageError::Remote {
            op: "plan the upload of",
            location: self.location(key),
            message,
            retryable: false,
        };
        let plan = match hint {
            crate::SizeHint::Unknown => PartPlan::plan(memory, None, &limits),
            crate::SizeHint::Expected(n) => PartPlan::plan(memory, Some(n), &limits),
            // An upper bound, already generous: planned for itself (half of
            // it, doubled), or for what the memory holds.
            crate::SizeHint::AtMost(n) => PartPlan::plan(memory, Some(n / 2), &limits).or_else(|_| {
                let fits = PartPlan::fitting(memory, &limits);
                warn!(key = %full, at_most = n, planned_for = fits.capacity(), memory, "Parts are planned for {:.1} GiB, what this upload's memory holds, below the database's size on disk ({:.1} GiB, which its compressed dump is usually far below). If the backup stores more, it fails at the end: set the job's expected_size, or raise memory_budget.", fits.capacity() as f64 / (1u64 << 30) as f64, n as f64 / (1u64 << 30) as f64);
                Ok(fits)
            }),
        }
        .map_err(refused)?;
        debug!(key = %full, part = plan.part, in_flight = plan.in_flight_for(plan.part), memory, ?hint, "Upload planned.");
        let mut cutter = PartCutter::new(plan);
        let mut upload: Option<Multipart> = None;
        loop {
            let finished = match body.recv().await {
                Some(StreamItem::Data(chunk)) => {
                    cutter.push(chunk);
                    false
                }
                Some(StreamItem::Finish) => true,
                None => {
                    if let Some(u) = upload.as_mut() {
                        u.abort().await;
                    }
                    return Err(aborted("the stream ended without completing"));
                }
            };
            while let Some(want) = cutter.due(finished) {
                let u = match upload.as_mut() {
                    Some(u) => u,
                    None if finished && cutter.cut == 0 => {
                        // Small output: one PutObject.
                        let (data, total) = (cutter.whole(), cutter.total);
                        self.put_single(key, &full, data).await?;
                        self.confirm_size(key, &full, total).await?;
                        return Ok(total);
                    }
                    None => upload.insert(self.start_multipart(key, &full).await?),
                };
                let Some((n, part)) = cutter.cut(want) else {
                    u.abort().await;
                    return Err(refused(format!(
                        "the object outgrew its plan: more than the store's {} parts of {} MiB ({:.1} GiB){}; set the job's expected_size to its size so parts are planned for it{}",
                        plan.max_parts,
                        plan.part >> 20,
                        plan.capacity() as f64 / (1u64 << 30) as f64,
                        if plan.may_grow {
                            ", and parts can grow no more within the memory"
                        } else {
                            ""
                        },
                        if plan.may_grow {
                            " (and raise memory_budget)"
                        } else {
                            ", or set equal_parts = false if the provider accepts unequal parts"
                        }
                    )));
                };
                u.wait_for_slot(plan.in_flight_for(want as u64), &mut cutter.pool)
                    .await?;
                self.send_part(u, key, &full, n, part);
            }
            if finished {
                break;
            }
            if let Some(u) = upload.as_mut() {
                u.collect_ready(&mut cutter.pool).await?;
            }
        }
        match upload {
            Some(u) => self.complete(key, &full, u, cutter.total).await,
            None => {
                // An empty object.
                self.put_single(key, &full, Bytes::new()).await?;
                self.confirm_size(key, &full, 0).await?;
                Ok(0)
            }
        }
    }

    /// Starts the multipart upload (with the store's class and encryption)
    /// and records it in the journal, so a crash leaves it findable.
    async fn start_multipart(&self, key: &str, full: &str) -> Result<Multipart, StorageError> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(full)
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
        Ok(Multipart {
            guard: AbortGuard {
                client: self.client.clone(),
                bucket: self.opts.bucket.clone(),
                key: full.to_string(),
                store: self.opts.name.clone(),
                journal: self.journal.clone(),
                upload_id: Some(id.clone()),
            },
            upload_id: id,
            in_flight: JoinSet::new(),
            done: Vec::new(),
        })
    }

    /// Uploads part `n` on a task of its own.
    fn send_part(&self, u: &mut Multipart, key: &str, full: &str, n: u32, part: Bytes) {
        let client = self.client.clone();
        let bucket = self.opts.bucket.clone();
        let full_key = full.to_string();
        let location = self.location(key);
        let opts = self.opts.clone();
        let upload_id = u.upload_id.clone();
        let n = n as i32;
        // Ours, to reuse the allocation once the SDK has let go.
        let kept = part.clone();
        u.in_flight.spawn(async move {
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
    }

    /// Waits for the last parts, completes the upload and confirms its
    /// size; an object whose size is wrong is deleted, never left under a
    /// real key.
    async fn complete(
        &self,
        key: &str,
        full: &str,
        mut u: Multipart,
        total: u64,
    ) -> Result<u64, StorageError> {
        while let Some(r) = u.in_flight.join_next().await.map(flatten) {
            match r {
                Ok((p, _)) => u.done.push(p),
                Err(e) => {
                    u.abort().await;
                    return Err(e);
                }
            }
        }
        let mut done = std::mem::take(&mut u.done);
        done.sort_by_key(|p| p.part_number());
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.opts.bucket)
            .key(full)
            .upload_id(&u.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = completed {
            u.guard.abort_now().await;
            return Err(self.err("complete upload", key, e));
        }
        u.guard.completed().await;
        if let Err(e) = self.confirm_size(key, full, total).await {
            let _ = crate::Storage::delete(self, key).await;
            return Err(e);
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn parts_fit_the_memory_three_to_a_share_and_never_below_s3_s_minimum() {
        let p = PartPlan::within(28 * MIB, None, None);
        assert_eq!((p.part, p.in_flight_for(p.part)), (5 * MIB, 2));
        assert!(p.peak_for(p.part) <= 28 * MIB);
        let small = PartPlan::within(7 * MIB, None, None);
        assert_eq!((small.part, small.in_flight_for(small.part)), (MIN_PART, 1));
        let big = PartPlan::within(400 * MIB, None, None);
        assert_eq!((big.part, big.in_flight_for(big.part)), (16 * MIB, 8));
    }

    /// Every part the same size at any object size (R2 refuses anything
    /// else), planned for twice the expected size within max_parts, and
    /// never more in memory than the budget.
    #[test]
    fn parts_are_equal_and_planned_from_the_expected_size_within_the_budget() {
        let limits = PartLimits::default();
        for expected in [GIB, 100 * GIB, 400 * GIB] {
            let p = PartPlan::plan(1024 * MIB, Some(expected), &limits).unwrap();
            assert!(
                (1..=MAX_PARTS).all(|n| p.part_size(n) == p.part),
                "{expected}"
            );
            assert!(p.capacity() >= 2 * expected, "{expected}: {p:?}");
            assert!(p.peak_for(p.part) <= p.memory, "{expected}: {p:?}");
        }
        // 400 GB stored: 77 MiB parts, three of them 231 MiB, refused
        // within the default 28 MiB with what to change (it used to go
        // ahead and hold about 2.6 GiB).
        let why = PartPlan::plan(28 * MIB, Some(400_000_000_000), &limits).unwrap_err();
        assert!(
            why.contains("raise the job's memory_budget to give it at least 231 MiB"),
            "{why}"
        );
        // Unknown size: the memory's part, 10,000 of them.
        let p = PartPlan::plan(28 * MIB, None, &limits).unwrap();
        assert_eq!((p.part, p.capacity()), (5 * MIB, 50_000 * MIB));
    }

    /// An upper bound that does not fit (a first backup of a big database)
    /// gets the largest parts the memory holds instead of a refusal.
    #[test]
    fn parts_fitting_the_memory_are_the_largest_three_of_which_fit() {
        let p = PartPlan::fitting(21 * MIB, &PartLimits::default());
        assert_eq!((p.part, p.in_flight_for(p.part)), (7 * MIB, 1));
        assert!(p.peak_for(p.part) <= 21 * MIB);
        assert_eq!(p.capacity(), 70_000 * MIB);
    }

    /// A provider that takes 1,000 parts at most gets parts ten times
    /// bigger for the same object.
    #[test]
    fn a_store_s_max_parts_is_honoured() {
        let limits = PartLimits {
            max_parts: 1000,
            ..PartLimits::default()
        };
        let p = PartPlan::plan(512 * MIB, Some(50 * GIB), &limits).unwrap();
        assert_eq!(p.part, 103 * MIB);
        assert!(p.capacity() >= 100 * GIB);
        let default = PartPlan::plan(512 * MIB, Some(50 * GIB), &PartLimits::default()).unwrap();
        assert_eq!(default.part, 16 * MIB);
    }

    /// equal_parts = false: past the first half of max_parts parts double,
    /// but only while two of them fit the memory; then they stay.
    #[test]
    fn unequal_parts_grow_only_within_the_memory() {
        let limits = PartLimits {
            equal_parts: false,
            ..PartLimits::default()
        };
        let p = PartPlan::plan(40 * MIB, None, &limits).unwrap();
        assert_eq!(p.part, 8 * MIB);
        let sizes = [5000, 5001, 5501, 9999].map(|n| p.part_size(n));
        assert_eq!(
            sizes,
            [8 * MIB, 8 * MIB, 8 * MIB, 8 * MIB],
            "16 MiB parts would not fit three times"
        );
        let roomy = PartPlan::plan(200 * MIB, None, &limits).unwrap();
        let sizes = [5000, 5001, 5501, 6001, 9999].map(|n| roomy.part_size(n));
        assert_eq!(sizes, [16 * MIB, 32 * MIB, 64 * MIB, 64 * MIB, 64 * MIB]);
        assert!(sizes.iter().all(|&s| roomy.peak_for(s) <= roomy.memory));
    }

    /// A cutter gives parts of exactly the plan's size, the last smaller,
    /// and keeps no more buffers than it holds at once.
    #[test]
    fn the_cutter_cuts_equal_parts_and_frees_outgrown_buffers() {
        let plan = PartPlan::within(15 * MIB, None, None);
        let mut c = PartCutter::new(plan);
        let chunk = Bytes::from(vec![1u8; 3 * MIB as usize + 17]);
        let mut sizes = Vec::new();
        for _ in 0..10 {
            c.push(chunk.clone());
            while let Some(want) = c.due(false) {
                let (_, part) = c.cut(want).unwrap();
                sizes.push(part.len() as u64);
                c.pool.give_back(part);
            }
        }
        while let Some(want) = c.due(true) {
            let (_, part) = c.cut(want).unwrap();
            sizes.push(part.len() as u64);
        }
        let total: u64 = sizes.iter().sum();
        assert_eq!(total, 10 * (3 * MIB + 17));
        let (last, full) = sizes.split_last().unwrap();
        assert!(full.iter().all(|&s| s == plan.part), "{sizes:?}");
        assert!(*last <= plan.part);
        assert!(c.pool.0.len() <= 2, "{} buffers kept", c.pool.0.len());
        // No part's buffer grew past its size (a reallocation and a copy).
        assert!(c.buf.capacity() <= plan.part as usize);
        // Buffers smaller than a bigger part are freed, not kept.
        let mut pool = PartPool::default();
        let small = pool.take(MIN_PART as usize);
        pool.give_back(small.freeze());
        let _ = pool.take(2 * MIN_PART as usize);
        assert!(pool.0.is_empty(), "an outgrown buffer was kept");
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
        // 100 MiB holds a 32 MiB part filling and one in flight (with its
        // copy), not the two the store allows.
        let p = PartPlan::within(100 * MIB, Some(32 * MIB), Some(2));
        assert_eq!((p.part, p.in_flight_for(p.part)), (32 * MIB, 1));
        let p = PartPlan::within(400 * MIB, Some(8 * MIB), Some(3));
        assert_eq!(p.in_flight_for(p.part), 3);
    }
}
