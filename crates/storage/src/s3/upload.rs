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
pub(super) struct PartPool(Vec<BytesMut>);

impl PartPool {
    /// An empty buffer of at least `size` bytes.
    pub(super) fn take(&mut self, size: usize) -> BytesMut {
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

/// Cuts a stream into parts: `base`-sized for the first 1,000, growing
/// after (see [`part_size_for`]), each in an allocation of its own.
struct PartCutter {
    base: u64,
    buf: BytesMut,
    pool: PartPool,
    /// Parts cut so far.
    cut: u32,
    /// Bytes taken in.
    total: u64,
}

impl PartCutter {
    fn new(base: u64) -> Self {
        let mut pool = PartPool::default();
        let buf = pool.take(part_size_for(1, base) as usize);
        PartCutter {
            base,
            buf,
            pool,
            cut: 0,
            total: 0,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        self.buf.extend_from_slice(chunk);
    }

    /// The size of the next part when one is due: a full part, or (once the
    /// stream is `finished`) what is left.
    fn due(&self, finished: bool) -> Option<usize> {
        let want = part_size_for(self.cut + 1, self.base) as usize;
        let last = finished && !self.buf.is_empty() && self.buf.len() < want;
        (self.buf.len() >= want || last).then_some(want)
    }

    /// The next part (at most `want` bytes; the overflow is carried into
    /// the next part by copy, not by sharing the allocation) and its
    /// number; None past S3's 10,000 parts.
    fn cut(&mut self, want: usize) -> Option<(u32, Bytes)> {
        self.cut += 1;
        if self.cut > MAX_PARTS {
            return None;
        }
        let next = self
            .pool
            .take(part_size_for(self.cut + 1, self.base) as usize);
        let mut part = std::mem::replace(&mut self.buf, next);
        if part.len() > want {
            self.buf.extend_from_slice(&part[want..]);
            part.truncate(want);
        }
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
    ) -> Result<u64, StorageError> {
        let full = self.full_key(key)?;
        let plan = PartPlan::within(memory, self.opts.part_size, self.opts.max_in_flight_parts);
        debug!(key = %full, part = plan.base, in_flight = plan.in_flight_for(plan.base), memory, "Upload planned.");
        let aborted = |reason: &str| StorageError::Aborted {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let mut cutter = PartCutter::new(plan.base);
        let mut upload: Option<Multipart> = None;
        // Said once per upload, when parts outgrow the memory.
        let mut over_budget = false;
        loop {
            let finished = match body.recv().await {
                Some(StreamItem::Data(chunk)) => {
                    cutter.push(&chunk);
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
                    return Err(aborted("the object would need more than 10,000 parts"));
                };
                if !over_budget && plan.peak_for(want as u64) > memory {
                    over_budget = true;
                    warn!(
                        key = %full,
                        part = want,
                        memory,
                        "This object is past {} parts: they grow to {} MiB, and two of them exceed the {} MiB its upload may hold; raise the job's memory_budget or the store's part_size for objects this big.",
                        n - 1,
                        want >> 20,
                        memory >> 20
                    );
                }
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
