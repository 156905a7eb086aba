//! The memory one backup stream may hold: a job's `memory_budget`, shared
//! by the stream's buffers, the compressor and every S3 store's parts.
//!
//! The stream's own buffers are of fixed size; the compressor's working
//! memory depends on the level and the number of threads; what is left is
//! divided among the S3 stores, which size their parts and how many they
//! upload at once to fit (`backstop_storage::PartPlan`). A local store writes each chunk as
//! it comes and needs no share.

use crate::Compression;

/// Read size from pg_dump's pipe.
pub const READ_BUF: u64 = 256 * 1024;
/// Size of the chunks handed between the stream's stages and to storage.
pub const CHUNK: u64 = 256 * 1024;
/// Compressed chunks in flight between the two CPU stages.
pub const STAGE_QUEUE: usize = 2;
/// Chunks queued per store before the stream waits for it.
pub const UPLOAD_QUEUE: usize = 4;
/// The input of one multithreaded compression job. Small jobs keep the
/// compressor's memory small (zstd's default at level 3 is 8 MiB a job,
/// 67 MiB for two workers); with the window carried over from the job
/// before, the ratio is within 0.5 % of zstd's default on JSON and text.
pub const ZSTD_JOB: u64 = 1024 * 1024;

/// The budget when a job sets none (raised to what the job needs at least,
/// see [`MemoryPlan::minimum`], when its compression needs more).
pub const DEFAULT_MEMORY_BUDGET: u64 = 28 * MIB;

/// S3's smallest part (except the last).
pub const MIN_PART: u64 = crate::MIN_PART_SIZE;
const MIB: u64 = 1024 * 1024;

/// The streams a backup with `streams` data streams writes at once: one,
/// or the data streams and one more for the schema sections (pre-data,
/// post-data) and the data pg_dump keeps (sequences, large objects).
pub fn lanes(streams: u32) -> u32 {
    if streams <= 1 { 1 } else { streams + 1 }
}

/// `compression_threads`: how many threads compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One per core this process may use.
    Auto,
    /// This many; 1 compresses on the stream's own thread.
    Count(u32),
}

/// How a job's compression uses threads: zstd's worker threads at the start
/// (0: the stream's own thread compresses), and how many it moves to, for
/// the rest of the dump, once compression is what pg_dump waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPlan {
    pub start: u32,
    pub grow_to: Option<u32>,
}

impl ThreadPlan {
    /// The most worker threads it may use (what memory is planned for).
    pub fn most(&self) -> u32 {
        self.grow_to.unwrap_or(0).max(self.start)
    }
}

/// The plan for `compression` with `threads` on this host, for a job of
/// `lanes` streams whose compression may take `share` of the host's cores.
///
/// `"auto"` starts on the stream's own thread: on data zstd compresses
/// quickly, worker threads only cost (on 2 cores shared with the server,
/// 0.4 CPU-s per GB more and up to 15 % more wall time, docs/BENCHMARKS.md).
/// When compression holds pg_dump up, the rest goes to worker threads, on
/// hosts of 4 cores or more: `share` of the cores (rounded down), split
/// between the job's lanes, and only if that gives each lane two or more
/// (the database server lives on these cores too).
/// `zstd:auto` changes the level of a frame in progress, which zstd does
/// only on worker threads: it starts on one and stays there.
pub fn thread_plan(
    compression: Compression,
    threads: Threads,
    share: f64,
    lanes: u32,
) -> ThreadPlan {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    plan_for(compression, threads, cores, share, lanes)
}

/// `"auto"` moves to worker threads only on hosts with at least this many
/// cores. On 2 cores shared with the server there is no core to move to:
/// zstd:9 moved to 2 workers took 5.5 s instead of 4.7 s for 0.23 GB.
const GROW_FROM_CORES: u32 = 4;

/// The share of the host's cores `"auto"` compression may take, unset.
pub const DEFAULT_COMPRESSION_SHARE: f64 = 0.5;

fn plan_for(
    compression: Compression,
    threads: Threads,
    cores: u32,
    share: f64,
    lanes: u32,
) -> ThreadPlan {
    let adaptive = compression == Compression::ZstdAuto;
    match threads {
        Threads::Count(n) if adaptive => ThreadPlan {
            start: n.max(1),
            grow_to: None,
        },
        Threads::Count(n) => ThreadPlan {
            start: n,
            grow_to: None,
        },
        Threads::Auto if adaptive => ThreadPlan {
            start: 1,
            grow_to: None,
        },
        Threads::Auto => {
            let allowed = (f64::from(cores) * share).floor() as u32;
            let per_lane = allowed / lanes.max(1);
            ThreadPlan {
                start: 0,
                grow_to: (cores >= GROW_FROM_CORES && per_lane >= 2).then_some(per_lane),
            }
        }
    }
}

/// zstd's streaming context at each level (1–19), single-threaded, in KiB,
/// as `ZSTD_sizeof_CCtx` reports it once compression has started (measured
/// with zstd 1.5; the pipeline's tests check these still bound it).
const ZSTD_CONTEXT_KIB: [u64; 19] = [
    1332, 2048, 3584, 4813, 5837, 5837, 8909, 8909, 17101, 29389, 29389, 53965, 37581, 53965,
    70349, 37786, 58266, 58880, 91648,
];

/// An upper bound of the compressor's memory for `compression` with
/// `workers` zstd worker threads (0: single-threaded).
pub fn compressor_memory(compression: Compression, workers: u32) -> u64 {
    let Some(level) = compression.max_level() else {
        return 0;
    };
    let idx = (level.clamp(1, 19) - 1) as usize;
    // 5 % over the measured size, for allocator rounding and other builds.
    let context = ZSTD_CONTEXT_KIB[idx] * 1024 * 105 / 100;
    if workers == 0 {
        return context;
    }
    // Each worker has a context of its own beside the caller's, and the
    // jobs' input and output buffers: two per worker and two spare.
    let w = u64::from(workers);
    context * (w + 1) + (2 * w + 2) * ZSTD_JOB
}

/// The stream's fixed buffers with `stores` outputs: the read buffer, the
/// chunk each stage fills, the queue between the stages, and each store's
/// queue and the chunk it holds.
pub fn stream_buffers(stores: usize) -> u64 {
    let chunks = 3 + STAGE_QUEUE as u64 + (UPLOAD_QUEUE as u64 + 1) * stores as u64;
    READ_BUF + chunks * CHUNK
}

/// What each store that gathers parts in memory may hold of `budget`, given
/// each one's least (`minimums`, two of its parts), once the compressor and
/// the stream's buffers for `stores` outputs are counted: its least, plus
/// an equal share of what is left over.
pub fn part_shares(
    budget: u64,
    compression: Compression,
    workers: u32,
    stores: usize,
    minimums: &[u64],
) -> Vec<u64> {
    let fixed = compressor_memory(compression, workers) + stream_buffers(stores);
    let spare = budget
        .saturating_sub(fixed)
        .saturating_sub(minimums.iter().sum());
    let extra = spare / minimums.len().max(1) as u64;
    minimums.iter().map(|m| m + extra).collect()
}

/// How a job's budget is spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    pub budget: u64,
    pub compressor: u64,
    pub stream: u64,
    /// Per S3 store, in the job's order, what its parts may hold (see
    /// `backstop_storage::PartPlan`).
    pub s3_shares: Vec<u64>,
}

/// One S3 store's own settings, as the plan needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Parts {
    pub part_size: Option<u64>,
    pub max_in_flight: Option<usize>,
}

impl S3Parts {
    /// The least its uploads hold: three parts, one filling and one in
    /// flight, which the HTTP client copies as it sends it.
    pub fn minimum(&self) -> u64 {
        3 * self.part_size.unwrap_or(MIN_PART)
    }
}

impl MemoryPlan {
    /// The least budget that holds the compressor, the stream's buffers and,
    /// per S3 store, three parts (one filling, one in flight and its copy).
    pub fn minimum(compression: Compression, workers: u32, stores: usize, s3: &[S3Parts]) -> u64 {
        let parts: u64 = s3.iter().map(S3Parts::minimum).sum();
        compressor_memory(compression, workers) + stream_buffers(stores) + parts
    }

    /// Divides `budget` (at least [`MemoryPlan::minimum`]): the rest after
    /// the compressor and the stream is shared equally by the S3 stores.
    pub fn new(
        budget: u64,
        compression: Compression,
        workers: u32,
        stores: usize,
        s3: &[S3Parts],
    ) -> Self {
        MemoryPlan {
            budget,
            compressor: compressor_memory(compression, workers),
            stream: stream_buffers(stores),
            s3_shares: part_shares(
                budget,
                compression,
                workers,
                stores,
                &s3.iter().map(S3Parts::minimum).collect::<Vec<_>>(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZSTD3: Compression = Compression::Zstd { level: 3 };
    const AUTO: S3Parts = S3Parts {
        part_size: None,
        max_in_flight: None,
    };

    #[test]
    fn the_default_budget_leaves_one_s3_store_room_for_three_seven_mib_parts() {
        let plan = MemoryPlan::new(DEFAULT_MEMORY_BUDGET, ZSTD3, 0, 1, &[AUTO]);
        assert!(plan.s3_shares[0] >= 21 * MIB, "{plan:?}");
        assert!(plan.compressor + plan.stream + plan.s3_shares[0] <= plan.budget);
    }

    #[test]
    fn s3_stores_share_what_is_left_and_each_keeps_its_three_parts() {
        let one = MemoryPlan::new(40 * MIB, ZSTD3, 0, 2, &[AUTO]);
        assert_eq!(
            one.s3_shares,
            [40 * MIB - compressor_memory(ZSTD3, 0) - stream_buffers(2)]
        );
        let two = MemoryPlan::new(40 * MIB, ZSTD3, 0, 2, &[AUTO, AUTO]);
        assert_eq!(two.s3_shares[0], two.s3_shares[1]);
        assert!(two.s3_shares[0] * 2 <= one.s3_shares[0]);
        // A store with big parts keeps room for three of them.
        let big = S3Parts {
            part_size: Some(64 * MIB),
            max_in_flight: None,
        };
        let budget = MemoryPlan::minimum(ZSTD3, 0, 2, &[AUTO, big]) + 10 * MIB;
        let mixed = MemoryPlan::new(budget, ZSTD3, 0, 2, &[AUTO, big]);
        assert_eq!(mixed.s3_shares, [20 * MIB, 197 * MIB]);
        // A budget below the fixed part leaves each its least, not an underflow.
        assert_eq!(part_shares(MIB, ZSTD3, 0, 1, &[10 * MIB]), [10 * MIB]);
    }

    #[test]
    fn the_minimum_grows_with_level_threads_and_stores() {
        let one = MemoryPlan::minimum(ZSTD3, 0, 1, &[AUTO]);
        assert!(one < 25 * MIB, "{one}");
        assert!(MemoryPlan::minimum(Compression::Zstd { level: 19 }, 0, 1, &[AUTO]) > 90 * MIB);
        assert!(MemoryPlan::minimum(ZSTD3, 4, 1, &[AUTO]) > one + 10 * MIB);
        assert!(MemoryPlan::minimum(ZSTD3, 0, 2, &[AUTO, AUTO]) >= one + 10 * MIB);
        let big = S3Parts {
            part_size: Some(64 * MIB),
            max_in_flight: None,
        };
        assert_eq!(
            MemoryPlan::minimum(ZSTD3, 0, 1, &[big]) - MemoryPlan::minimum(ZSTD3, 0, 1, &[AUTO]),
            3 * (64 * MIB - MIN_PART)
        );
        assert_eq!(
            MemoryPlan::minimum(Compression::None, 0, 1, &[]),
            stream_buffers(1)
        );
    }

    #[test]
    fn auto_threads_start_on_the_stream_s_thread_and_grow_within_their_share() {
        let plan = |c, t, cores| {
            let p = plan_for(c, t, cores, 1.0, 1);
            (p.start, p.grow_to, p.most())
        };
        assert_eq!(plan(ZSTD3, Threads::Auto, 8), (0, Some(8), 8));
        assert_eq!(plan(ZSTD3, Threads::Auto, 4), (0, Some(4), 4));
        assert_eq!(plan(ZSTD3, Threads::Auto, 2), (0, None, 0));
        assert_eq!(plan(ZSTD3, Threads::Auto, 1), (0, None, 0));
        assert_eq!(plan(ZSTD3, Threads::Count(0), 8), (0, None, 0));
        assert_eq!(plan(ZSTD3, Threads::Count(3), 8), (3, None, 3));
        // zstd:auto needs a worker thread to change levels.
        assert_eq!(plan(Compression::ZstdAuto, Threads::Auto, 8), (1, None, 1));
        assert_eq!(
            plan(Compression::ZstdAuto, Threads::Count(0), 8),
            (1, None, 1)
        );
        assert_eq!(
            plan(Compression::ZstdAuto, Threads::Count(4), 8),
            (4, None, 4)
        );
        // The default share: half the cores, split between the lanes, and
        // no growth when a lane would get fewer than two.
        let shared =
            |cores, share, lanes| plan_for(ZSTD3, Threads::Auto, cores, share, lanes).grow_to;
        assert_eq!(shared(8, DEFAULT_COMPRESSION_SHARE, 1), Some(4));
        assert_eq!(shared(64, DEFAULT_COMPRESSION_SHARE, 5), Some(6));
        assert_eq!(shared(4, DEFAULT_COMPRESSION_SHARE, 1), Some(2));
        assert_eq!(shared(6, DEFAULT_COMPRESSION_SHARE, 1), Some(3));
        assert_eq!(shared(8, DEFAULT_COMPRESSION_SHARE, 3), None);
        assert_eq!(shared(16, 0.25, 1), Some(4));
        // An explicit count is the operator's: never capped.
        assert_eq!(plan_for(ZSTD3, Threads::Count(12), 16, 0.25, 1).most(), 12);
    }
}
