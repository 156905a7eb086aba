//! The CPU stages of the stream: pg_dump's stdout → (row count, sha256,
//! zstd) → (age, sha256) → upload channels.
//!
//! Two blocking threads joined by a channel of capacity 2 keep compression and
//! encryption off the async runtime and let them overlap. Every buffer is of
//! fixed size, so memory does not depend on the size of the database. Errors
//! stop the stage and travel back through the join handles; the upload is
//! committed by the caller, with an explicit `Finish`, only once every stage
//! and pg_dump itself have reported success.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use backstop_config::Compression;
use backstop_config::budget;

use crate::backup::adapt;
use backstop_crypto::EncryptWriter;
use backstop_dump::{RowCountMap, RowCounter};
use backstop_storage::StreamItem;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Read size from pg_dump's pipe.
const READ_BUF: usize = budget::READ_BUF as usize;
/// Size of the chunks handed between stages and to storage.
pub const CHUNK: usize = budget::CHUNK as usize;
/// Compressed chunks in flight between the two stages.
const STAGE_QUEUE: usize = budget::STAGE_QUEUE;

/// Why the stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the dump output failed: {0}")]
    Read(io::Error),
    #[error("compression failed: {0}")]
    Compress(io::Error),
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("every store stopped accepting data")]
    Downstream,
    #[error("a stream stage panicked")]
    Panicked,
}

/// What the stream measured.
#[derive(Debug, Clone)]
pub struct StreamStats {
    pub plain_bytes: u64,
    pub plain_sha256: String,
    pub stored_bytes: u64,
    pub stored_sha256: String,
    /// Row counts read from the stream, if counting was asked for.
    pub rows: Option<Result<RowCountMap, String>>,
    /// `zstd:auto`: the plain bytes compressed at each level.
    pub levels: Option<BTreeMap<i32, u64>>,
}

/// The running stages. Call [`StreamHandle::finish`].
#[must_use = "the stream's outcome is only known from finish()"]
pub struct StreamHandle {
    first: tokio::task::JoinHandle<Result<FirstOut, StreamError>>,
    second: tokio::task::JoinHandle<Result<SecondOut, StreamError>>,
}

struct FirstOut {
    plain_bytes: u64,
    plain_sha256: String,
    rows: Option<Result<RowCountMap, String>>,
    levels: Option<BTreeMap<i32, u64>>,
}

struct SecondOut {
    stored_bytes: u64,
    stored_sha256: String,
    /// The senders of the stores that were still accepting at the end.
    senders: Vec<Option<mpsc::Sender<StreamItem>>>,
}

/// How far a stream has come, for the stall watchdog: when anything last
/// moved (bytes read from the dump, a chunk taken by a store, an upload
/// finished), and who is waiting on whom, so a stall can say where it is.
#[derive(Clone)]
pub struct Counters(Arc<CountersInner>);

struct CountersInner {
    origin: Instant,
    /// Milliseconds after `origin` of the last movement.
    last_ms: AtomicU64,
    /// The dump tool exited well and the uploads were told to commit.
    committed: AtomicBool,
    /// The dump's output has ended.
    eof: AtomicBool,
    /// 1 + the output the second stage is waiting to hand a chunk to (0: none).
    sending_to: AtomicUsize,
    /// Per output: its upload has returned.
    finished: Vec<AtomicBool>,
    /// Bytes read from the dump tool so far.
    dumped: AtomicU64,
    /// Rows counted in them so far (when the job counts rows).
    rows: AtomicU64,
    /// Per output: bytes (compressed and encrypted) it has taken.
    taken: Vec<AtomicU64>,
    /// How long one store may take nothing while another still takes data
    /// before it is given up (None: wait for it as long as it takes).
    patience: Option<Duration>,
    /// Per output: fired when it was given up for taking nothing.
    given_up: Vec<tokio_util::sync::CancellationToken>,
}

/// How far a stream has come: for progress bars and log lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    pub dumped: u64,
    pub rows: u64,
    /// Per output, in the order given to [`start`].
    pub taken: Vec<u64>,
    pub elapsed: Duration,
}

/// Where a stalled stream is stuck.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stuck {
    /// Waiting for the dump tool to write.
    Source,
    /// Waiting for this output (store) to take a chunk.
    Output(usize),
    /// Everything was handed over; these outputs did not finish their upload.
    Finishing(Vec<usize>),
    /// The dump's output ended but the tool has not exited.
    Exit,
}

impl Counters {
    /// A stream with `outputs` stores, starting now.
    pub fn new(outputs: usize) -> Self {
        Self::with_patience(outputs, None)
    }

    /// [`Counters::new`] where a store that takes nothing for `patience`
    /// while another still could is given up, so the others finish.
    pub fn with_patience(outputs: usize, patience: Option<Duration>) -> Self {
        Self(Arc::new(CountersInner {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            committed: AtomicBool::new(false),
            eof: AtomicBool::new(false),
            sending_to: AtomicUsize::new(0),
            finished: (0..outputs).map(|_| AtomicBool::new(false)).collect(),
            dumped: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            taken: (0..outputs).map(|_| AtomicU64::new(0)).collect(),
            patience,
            given_up: (0..outputs)
                .map(|_| tokio_util::sync::CancellationToken::new())
                .collect(),
        }))
    }

    /// Fires when output `i` is given up for taking nothing.
    pub fn given_up(&self, i: usize) -> tokio_util::sync::CancellationToken {
        self.0.given_up.get(i).cloned().unwrap_or_default()
    }

    /// Gives output `i` up (its upload ends as failed, the others go on).
    pub fn give_up(&self, i: usize) {
        if let Some(t) = self.0.given_up.get(i) {
            t.cancel();
        }
        self.moved();
    }

    /// Whether the dump tool exited well and the uploads were told to commit.
    pub fn is_committed(&self) -> bool {
        self.0.committed.load(Ordering::Relaxed)
    }

    /// How far it has come.
    pub fn flow(&self) -> Flow {
        let p = &self.0;
        Flow {
            dumped: p.dumped.load(Ordering::Relaxed),
            rows: p.rows.load(Ordering::Relaxed),
            taken: p.taken.iter().map(|t| t.load(Ordering::Relaxed)).collect(),
            elapsed: p.origin.elapsed(),
        }
    }

    /// Something moved.
    pub fn moved(&self) {
        let ms = self.0.origin.elapsed().as_millis() as u64;
        self.0.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long nothing has moved.
    pub fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        self.0.origin.elapsed().saturating_sub(last)
    }

    /// The dump tool exited well: the uploads were told to commit.
    pub fn committed(&self) {
        self.0.committed.store(true, Ordering::Relaxed);
        self.moved();
    }

    /// Output `i`'s upload returned (committed or not).
    pub fn finished(&self, i: usize) {
        if let Some(f) = self.0.finished.get(i) {
            f.store(true, Ordering::Relaxed);
        }
        self.moved();
    }

    /// Where the stream waits now.
    pub fn stuck(&self) -> Stuck {
        let p = &self.0;
        match p.sending_to.load(Ordering::Relaxed) {
            0 => {}
            i => return Stuck::Output(i - 1),
        }
        if !p.eof.load(Ordering::Relaxed) {
            return Stuck::Source;
        }
        if !p.committed.load(Ordering::Relaxed) {
            return Stuck::Exit;
        }
        Stuck::Finishing(
            (0..p.finished.len())
                .filter(|&i| !p.finished[i].load(Ordering::Relaxed))
                .collect(),
        )
    }

    /// Resolves once nothing has moved for `limit`, with where it is stuck;
    /// looks about ten times per `limit` (at most once a second).
    pub async fn stalled(&self, limit: Duration) -> Stuck {
        let tick = (limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            if self.idle() >= limit {
                return self.stuck();
            }
        }
    }
}

/// How the stream compresses: the codec and level, and zstd's worker
/// threads (0: on the first stage's own thread) at the start and, once
/// compression is what the source waits for, for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressing {
    pub compression: Compression,
    pub workers: u32,
    pub grow_to: Option<u32>,
}

impl From<Compression> for Compressing {
    fn from(compression: Compression) -> Self {
        Self {
            compression,
            workers: 0,
            grow_to: None,
        }
    }
}

/// Starts both stages reading `input`. `outputs` has one sender per store;
/// `progress` is told of every read and every chunk a store takes.
pub fn start(
    input: std::fs::File,
    compression: impl Into<Compressing>,
    recipients: Option<Vec<String>>,
    counter: Option<RowCounter>,
    outputs: Vec<mpsc::Sender<StreamItem>>,
    progress: Counters,
) -> StreamHandle {
    let compression = compression.into();
    let (tx, rx) = std_mpsc::sync_channel::<Vec<u8>>(STAGE_QUEUE);
    let p = progress.clone();
    let first =
        tokio::task::spawn_blocking(move || first_stage(input, compression, counter, tx, &p));
    let second =
        tokio::task::spawn_blocking(move || second_stage(rx, recipients, outputs, progress));
    StreamHandle { first, second }
}

impl StreamHandle {
    /// Waits for both stages. On success returns the stats and, per store, its
    /// sender if that store kept accepting data to the end (`None` if it failed).
    ///
    /// # Errors
    /// The first stage's error if any, else the second's; when the first only
    /// saw the second stop, the second's.
    pub async fn finish(
        self,
    ) -> Result<(StreamStats, Vec<Option<mpsc::Sender<StreamItem>>>), StreamError> {
        let first = self.first.await.map_err(|_| StreamError::Panicked)?;
        let second = self.second.await.map_err(|_| StreamError::Panicked)?;
        // The first stage sees only that the second stopped taking data
        // (Downstream); the second knows why.
        let first = match (first, &second) {
            (Err(StreamError::Downstream), Err(_)) => return Err(second.err().expect("matched")),
            (first, _) => first?,
        };
        let second = second?;
        Ok((
            StreamStats {
                plain_bytes: first.plain_bytes,
                plain_sha256: first.plain_sha256,
                stored_bytes: second.stored_bytes,
                stored_sha256: second.stored_sha256,
                rows: first.rows,
                levels: first.levels,
            },
            second.senders,
        ))
    }
}

/// Length: the reading loop of the stream's first stage (read, count rows,
/// compress, hand on), with its end-of-stream and failure paths; per-byte
/// code kept in one loop.
fn first_stage(
    mut input: std::fs::File,
    compression: Compressing,
    mut counter: Option<RowCounter>,
    tx: std_mpsc::SyncSender<Vec<u8>>,
    progress: &Counters,
) -> Result<FirstOut, StreamError> {
    let handed = Arc::new(Handed::default());
    let sink = ChunkSink::new(StageSender(tx, handed.clone()));
    let mut windows = Windows::new(handed);
    let mut adaptive = None;
    let mut level = 0;
    let mut out = match compression.compression {
        Compression::None => Compressor::None(sink),
        Compression::Zstd { level: l } => {
            level = l;
            Compressor::Zstd(zstd_encoder(sink, l, compression.workers)?)
        }
        Compression::ZstdAuto => {
            adaptive = Some(Adaptive::default());
            level = adapt::START;
            Compressor::Zstd(zstd_encoder(sink, level, compression.workers.max(1))?)
        }
    };
    // Threads to move to once compression holds the source up, and how
    // many windows in a row it has.
    let mut grow_to = compression.grow_to.filter(|_| out.is_zstd());
    let mut behind = 0;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let reading = Instant::now();
        let read = input.read(&mut buf);
        let n = match read {
            Ok(0) => {
                progress.0.eof.store(true, Ordering::Relaxed);
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.0.eof.store(true, Ordering::Relaxed);
                return Err(StreamError::Read(e));
            }
        };
        if let Some(a) = adaptive.as_mut() {
            a.count(n);
        }
        if let Some(w) = windows.read(n, reading.elapsed()) {
            tracing::debug!(
                seconds = w.elapsed.as_secs_f64(),
                waiting_for_source = w.waiting_for_source.as_secs_f64(),
                waiting_for_stores = w.waiting_for_stores.as_secs_f64(),
                bytes = w.bytes,
                compressed = w.compressed,
                level,
                "Stream window."
            );
            if let Some(workers) = grow_to {
                behind = if adapt::compression_is_behind(&w) {
                    behind + 1
                } else {
                    0
                };
                if behind >= adapt::BEHIND_WINDOWS {
                    tracing::info!(
                        threads = workers,
                        after_bytes = total,
                        "Compression is what pg_dump waits for: compressing the rest of the dump on {workers} threads."
                    );
                    out = out.restart_on(level, workers)?;
                    grow_to = None;
                }
            }
            if let Some(a) = adaptive.as_mut() {
                level = a.after(&w, &mut out)?;
            }
        }
        progress.moved();
        let data = &buf[..n];
        total += n as u64;
        hasher.update(data);
        progress.0.dumped.store(total, Ordering::Relaxed);
        if let Some(c) = counter.as_mut() {
            c.feed(data);
            progress.0.rows.store(c.rows_so_far(), Ordering::Relaxed);
        }
        out.write_all(data)
            .map_err(|e| downstream_or(e, StreamError::Compress))?;
    }
    out.finish()
        .map_err(|e| downstream_or(e, StreamError::Compress))?;
    Ok(FirstOut {
        plain_bytes: total,
        plain_sha256: hex::encode(hasher.finalize()),
        rows: counter.map(RowCounter::finish),
        levels: adaptive.map(|a| a.levels),
    })
}

fn zstd_encoder<W: Write>(
    sink: W,
    level: i32,
    workers: u32,
) -> Result<zstd::stream::write::Encoder<'static, W>, StreamError> {
    let mut enc = zstd::stream::write::Encoder::new(sink, level).map_err(StreamError::Compress)?;
    // Lets stock `zstd -d` detect corruption on its own.
    enc.include_checksum(true).map_err(StreamError::Compress)?;
    if workers > 0 {
        multithread(&mut enc, workers)?;
    }
    Ok(enc)
}

/// The first stage's windows of [`adapt::WINDOW`]: how long it waited for
/// the source and for the stores in each.
struct Windows {
    since: Instant,
    bytes: u64,
    waiting_for_source: Duration,
    handed: Arc<Handed>,
    /// `handed`'s wait and bytes when the window began.
    waited_before: u64,
    compressed_before: u64,
}

impl Windows {
    fn new(handed: Arc<Handed>) -> Self {
        Self {
            since: Instant::now(),
            bytes: 0,
            waiting_for_source: Duration::ZERO,
            handed,
            waited_before: 0,
            compressed_before: 0,
        }
    }

    /// `n` bytes were read after waiting `wait` for them; a window that
    /// ends with them is returned.
    fn read(&mut self, n: usize, wait: Duration) -> Option<adapt::Window> {
        self.bytes += n as u64;
        self.waiting_for_source += wait;
        let elapsed = self.since.elapsed();
        if elapsed < adapt::WINDOW || self.bytes < adapt::WINDOW_BYTES {
            return None;
        }
        let waited = self.handed.waited.load(Ordering::Relaxed);
        let compressed = self.handed.bytes.load(Ordering::Relaxed);
        let window = adapt::Window {
            elapsed,
            waiting_for_source: self.waiting_for_source,
            waiting_for_stores: Duration::from_nanos(waited - self.waited_before),
            bytes: self.bytes,
            compressed: compressed - self.compressed_before,
        };
        self.since = Instant::now();
        self.bytes = 0;
        self.waiting_for_source = Duration::ZERO;
        self.waited_before = waited;
        self.compressed_before = compressed;
        Some(window)
    }
}

/// `zstd:auto` in the first stage: sets the level the controller picks
/// after each window, and counts the plain bytes each level took.
#[derive(Default)]
struct Adaptive {
    control: adapt::LevelControl,
    levels: BTreeMap<i32, u64>,
}

impl Adaptive {
    fn count(&mut self, n: usize) {
        *self.levels.entry(self.control.level()).or_default() += n as u64;
    }

    /// The level after window `w`, set on `out`.
    fn after(&mut self, w: &adapt::Window, out: &mut Compressor) -> Result<i32, StreamError> {
        let before = self.control.level();
        let level = self.control.after(w);
        if level != before
            && let Compressor::Zstd(enc) = out
        {
            enc.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))
                .map_err(StreamError::Compress)?;
        }
        Ok(level)
    }
}

/// Compresses on `workers` threads in jobs of [`budget::ZSTD_JOB`] (one
/// standard frame all the same). A libzstd built without threads refuses:
/// then the stream compresses on its own thread, and says so once.
fn multithread<W: Write>(
    enc: &mut zstd::stream::write::Encoder<'static, W>,
    workers: u32,
) -> Result<(), StreamError> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = enc.multithread(workers) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "This libzstd cannot compress on several threads: compressing on one (set compression_threads = 1 to silence this)."
            );
        }
        return Ok(());
    }
    enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(
        budget::ZSTD_JOB as u32,
    ))
    .map_err(StreamError::Compress)
}

fn second_stage(
    rx: std_mpsc::Receiver<Vec<u8>>,
    recipients: Option<Vec<String>>,
    outputs: Vec<mpsc::Sender<StreamItem>>,
    progress: Counters,
) -> Result<SecondOut, StreamError> {
    let sink = Hashing::new(ChunkSink::new(StoreSenders(
        outputs.into_iter().map(Some).collect(),
        progress,
    )));
    let mut out = match recipients {
        None => Encryptor::None(sink),
        Some(r) => Encryptor::Age(
            EncryptWriter::new(&r, sink).map_err(|e| StreamError::Encrypt(e.to_string()))?,
        ),
    };
    // Ends when the first stage drops its sender, successfully or not; the
    // caller decides from both stages' results whether to commit.
    for chunk in rx {
        out.write_all(&chunk)
            .map_err(|e| downstream_or(e, |e| StreamError::Encrypt(e.to_string())))?;
    }
    let hashing = out
        .finish()
        .map_err(|e| downstream_or(e, |e| StreamError::Encrypt(e.to_string())))?;
    let (sink, stored_bytes, digest) = hashing.into_parts();
    let senders = sink.finish().map_err(|_| StreamError::Downstream)?.0;
    Ok(SecondOut {
        stored_bytes,
        stored_sha256: digest,
        senders,
    })
}

fn downstream_or(e: io::Error, f: impl FnOnce(io::Error) -> StreamError) -> StreamError {
    if e.kind() == io::ErrorKind::BrokenPipe {
        StreamError::Downstream
    } else {
        f(e)
    }
}

enum Compressor {
    None(ChunkSink<StageSender>),
    Zstd(zstd::stream::write::Encoder<'static, ChunkSink<StageSender>>),
}

impl Compressor {
    fn is_zstd(&self) -> bool {
        matches!(self, Compressor::Zstd(_))
    }

    /// Ends the frame in progress and compresses what follows in a new one
    /// on `workers` threads (zstd reads concatenated frames as one stream).
    fn restart_on(self, level: i32, workers: u32) -> Result<Self, StreamError> {
        match self {
            Compressor::Zstd(enc) => {
                let sink = enc
                    .finish()
                    .map_err(|e| downstream_or(e, StreamError::Compress))?;
                Ok(Compressor::Zstd(zstd_encoder(sink, level, workers)?))
            }
            none => Ok(none),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.write_all(data),
            Compressor::Zstd(w) => w.write_all(data),
        }
    }

    fn finish(self) -> io::Result<()> {
        let sink = match self {
            Compressor::None(w) => w,
            Compressor::Zstd(w) => w.finish()?,
        };
        sink.finish().map(|_| ())
    }
}

enum Encryptor {
    None(Hashing<ChunkSink<StoreSenders>>),
    Age(EncryptWriter<Hashing<ChunkSink<StoreSenders>>>),
}

impl Encryptor {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Encryptor::None(w) => w.write_all(data),
            Encryptor::Age(w) => w.write_all(data),
        }
    }

    fn finish(self) -> io::Result<Hashing<ChunkSink<StoreSenders>>> {
        match self {
            Encryptor::None(w) => Ok(w),
            Encryptor::Age(w) => w.finish().map_err(|e| io::Error::other(e.to_string())),
        }
    }
}

/// Where a [`ChunkSink`] delivers full chunks.
trait Deliver {
    fn deliver(&mut self, chunk: Vec<u8>) -> io::Result<()>;
}

/// The first stage's output: the queue to the second, and what it measured
/// (for the windows of `zstd:auto` and `compression_threads = "auto"`).
struct StageSender(std_mpsc::SyncSender<Vec<u8>>, Arc<Handed>);

/// What the first stage handed on, all along.
#[derive(Default)]
struct Handed {
    /// Nanoseconds spent waiting for room in the queue (the stores' pace).
    waited: AtomicU64,
    /// Compressed bytes.
    bytes: AtomicU64,
}

impl Deliver for StageSender {
    fn deliver(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        let start = Instant::now();
        let len = chunk.len() as u64;
        let sent = self.0.send(chunk);
        self.1
            .waited
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.1.bytes.fetch_add(len, Ordering::Relaxed);
        sent.map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "next stage stopped"))
    }
}

/// The tee to every store. A store whose upload failed drops its receiver; it
/// is skipped from then on so the others still complete. The slowest store
/// sets the pace (bounded channels), nothing is buffered without bound.
struct StoreSenders(Vec<Option<mpsc::Sender<StreamItem>>>, Counters);

impl Deliver for StoreSenders {
    fn deliver(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        let bytes = Bytes::from(chunk);
        let progress = &self.1;
        for i in 0..self.0.len() {
            let others = self
                .0
                .iter()
                .enumerate()
                .any(|(j, s)| j != i && s.is_some());
            let Some(tx) = &self.0[i] else { continue };
            progress.0.sending_to.store(i + 1, Ordering::Relaxed);
            let item = StreamItem::Data(bytes.clone());
            // A store that takes nothing may be given up only while another
            // still takes the stream; the last one is the watchdog's to judge.
            let sent = match (progress.0.patience, others) {
                (Some(patience), true) => tokio::runtime::Handle::current()
                    .block_on(tokio::time::timeout(patience, tx.send(item)))
                    .map(|r| r.map_err(|_| ())),
                _ => Ok(tx.blocking_send(item).map_err(|_| ())),
            };
            progress.0.sending_to.store(0, Ordering::Relaxed);
            match sent {
                Ok(Ok(())) => {
                    if let Some(t) = progress.0.taken.get(i) {
                        t.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    progress.moved();
                }
                Ok(Err(())) => self.0[i] = None,
                Err(_) => {
                    // Told before its sender goes, so its upload fails as
                    // given up rather than ending as aborted.
                    if let Some(t) = progress.0.given_up.get(i) {
                        t.cancel();
                    }
                    self.0[i] = None;
                    progress.moved();
                }
            }
        }
        if self.0.iter().all(Option::is_none) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "every store stopped",
            ));
        }
        Ok(())
    }
}

/// Buffers writes into fixed-size chunks.
struct ChunkSink<D: Deliver> {
    buf: Vec<u8>,
    to: D,
}

impl<D: Deliver> ChunkSink<D> {
    fn new(to: D) -> Self {
        Self {
            buf: Vec::with_capacity(CHUNK),
            to,
        }
    }

    /// Delivers what is buffered and returns the destination.
    fn finish(mut self) -> io::Result<D> {
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.to.deliver(last)?;
        }
        Ok(self.to)
    }
}

impl<D: Deliver> Write for ChunkSink<D> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.to.deliver(full)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn into_parts(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hasher.update(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn input(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        use std::io::Seek;
        f.rewind().unwrap();
        f
    }

    /// Drains a store's channel; returns the bytes and whether it saw Finish.
    async fn drain(mut rx: mpsc::Receiver<StreamItem>) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                StreamItem::Data(b) => out.extend_from_slice(&b),
                StreamItem::Finish => return (out, true),
            }
        }
        (out, false)
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn compresses_encrypts_and_tees_identical_bytes_to_every_store() {
        let data = sample(3 * CHUNK + 12345);
        let (secret, public) = backstop_crypto::generate_keypair();
        let (a_tx, a_rx) = mpsc::channel(2);
        let (b_tx, b_rx) = mpsc::channel(2);
        let progress = Counters::new(2);
        let handle = start(
            input(&data),
            Compression::Zstd { level: 3 },
            Some(vec![public]),
            None,
            vec![a_tx, b_tx],
            progress.clone(),
        );
        let a = tokio::spawn(drain(a_rx));
        let b = tokio::spawn(drain(b_rx));
        let (stats, senders) = handle.finish().await.unwrap();
        assert_eq!(senders.iter().filter(|s| s.is_some()).count(), 2);
        // The caller commits; here, by dropping the senders, we do not.
        drop(senders);
        let (a, a_done) = a.await.unwrap();
        let (b, b_done) = b.await.unwrap();
        assert!(
            !a_done && !b_done,
            "finish must come from the caller, not the stream"
        );
        assert_eq!(a, b);
        assert_eq!(stats.stored_bytes, a.len() as u64);
        assert_eq!(stats.plain_bytes, data.len() as u64);
        assert_eq!(stats.stored_sha256, hex::encode(Sha256::digest(&a)));
        assert_eq!(stats.plain_sha256, hex::encode(Sha256::digest(&data)));
        // What a progress bar reads: everything dumped, all of it taken by both.
        let flow = progress.flow();
        assert_eq!(flow.dumped, data.len() as u64);
        assert_eq!(flow.taken, [a.len() as u64, b.len() as u64]);

        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id");
        std::fs::write(&id, format!("{secret}\n")).unwrap();
        let ids = backstop_crypto::Identities::from_file(&id).unwrap();
        let mut zst = Vec::new();
        ids.decrypt(&a[..]).unwrap().read_to_end(&mut zst).unwrap();
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_store_does_not_stop_the_others() {
        let data = sample(6 * CHUNK);
        let (a_tx, a_rx) = mpsc::channel(1);
        let (b_tx, b_rx) = mpsc::channel(1);
        let handle = start(
            input(&data),
            Compression::None,
            None,
            None,
            vec![a_tx, b_tx],
            Counters::new(2),
        );
        // Store A fails after its first chunk.
        let a = tokio::spawn(async move {
            let mut rx = a_rx;
            rx.recv().await;
        });
        let b = tokio::spawn(drain(b_rx));
        let (stats, senders) = handle.finish().await.unwrap();
        a.await.unwrap();
        assert!(senders[0].is_none(), "the failed store is dropped");
        assert!(senders[1].is_some());
        senders[1]
            .as_ref()
            .unwrap()
            .send(StreamItem::Finish)
            .await
            .unwrap();
        drop(senders);
        let (b, done) = b.await.unwrap();
        assert!(done);
        assert_eq!(b, data);
        assert_eq!(stats.stored_bytes, data.len() as u64);
    }

    /// A store that takes nothing (its receiver is held, never read) while
    /// another takes the stream is given up after the patience, and the
    /// other gets everything. Without patience the stream would wait on it
    /// for good (the watchdog then failed both).
    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_that_takes_nothing_is_given_up_and_the_other_finishes() {
        let data = sample(6 * CHUNK);
        let (a_tx, a_rx) = mpsc::channel(1);
        let (b_tx, b_rx) = mpsc::channel(1);
        let progress = Counters::with_patience(2, Some(Duration::from_millis(200)));
        let gave_up = progress.given_up(0);
        let handle = start(
            input(&data),
            Compression::None,
            None,
            None,
            vec![a_tx, b_tx],
            progress,
        );
        let b = tokio::spawn(drain(b_rx));
        let (stats, senders) = tokio::time::timeout(Duration::from_secs(30), handle.finish())
            .await
            .expect("the stream waited on the store that takes nothing")
            .unwrap();
        assert!(gave_up.is_cancelled(), "the hung store was not told");
        assert!(senders[0].is_none(), "the hung store is dropped");
        senders[1]
            .as_ref()
            .unwrap()
            .send(StreamItem::Finish)
            .await
            .unwrap();
        drop(senders);
        let (b, done) = b.await.unwrap();
        assert!(done);
        assert_eq!(b, data);
        assert_eq!(stats.stored_bytes, data.len() as u64);
        drop(a_rx);
    }

    /// The last store left is never given up: that is the watchdog's call.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_last_store_is_waited_for_not_given_up() {
        let data = sample(2 * CHUNK);
        let (a_tx, mut a_rx) = mpsc::channel(1);
        let progress = Counters::with_patience(1, Some(Duration::from_millis(50)));
        let gave_up = progress.given_up(0);
        let handle = start(
            input(&data),
            Compression::None,
            None,
            None,
            vec![a_tx],
            progress,
        );
        // Slower than the patience, but it takes everything.
        let slow = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(120)).await;
                match a_rx.recv().await {
                    Some(StreamItem::Data(b)) => got.extend_from_slice(&b),
                    _ => return got,
                }
            }
        });
        let (_, senders) = handle.finish().await.unwrap();
        assert!(!gave_up.is_cancelled());
        drop(senders);
        assert_eq!(slow.await.unwrap(), data);
    }

    /// The stall watchdog's view: a source that stops writing, then a
    /// store that stops taking chunks, each named as where it waits.
    #[tokio::test(flavor = "multi_thread")]
    async fn progress_says_where_a_stream_waits() {
        let (r, mut w) = std::io::pipe().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let progress = Counters::new(1);
        let input = std::fs::File::from(std::os::fd::OwnedFd::from(r));
        let handle = start(
            input,
            Compression::None,
            None,
            None,
            vec![tx],
            progress.clone(),
        );
        let writer = tokio::task::spawn_blocking(move || {
            w.write_all(&sample(CHUNK + 10)).unwrap();
            w
        });
        assert!(matches!(rx.recv().await, Some(StreamItem::Data(_))));
        let mut w = writer.await.unwrap();
        let limit = Duration::from_millis(300);
        let stuck = tokio::time::timeout(Duration::from_secs(10), progress.stalled(limit));
        assert_eq!(stuck.await.unwrap(), Stuck::Source);
        assert!(progress.idle() >= limit);

        // Now plenty to send, and a store that takes one chunk, then none.
        let writer = tokio::task::spawn_blocking(move || {
            let _ = w.write_all(&sample(8 * CHUNK));
        });
        assert!(matches!(rx.recv().await, Some(StreamItem::Data(_))));
        let stuck = tokio::time::timeout(Duration::from_secs(10), progress.stalled(limit));
        assert_eq!(stuck.await.unwrap(), Stuck::Output(0));
        drop(rx);
        writer.await.unwrap();
        assert!(matches!(
            handle.finish().await,
            Err(StreamError::Downstream)
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_store_gone_fails_the_stream() {
        let data = sample(8 * CHUNK);
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let handle = start(
            input(&data),
            Compression::None,
            None,
            None,
            vec![tx],
            Counters::new(1),
        );
        assert!(matches!(
            handle.finish().await,
            Err(StreamError::Downstream)
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bad_recipient_is_an_encryption_error() {
        let (tx, rx) = mpsc::channel(1);
        let handle = start(
            input(b"data"),
            Compression::None,
            Some(vec!["age1bogus".into()]),
            None,
            vec![tx],
            Counters::new(1),
        );
        let err = handle.finish().await.expect_err("must fail");
        assert!(matches!(err, StreamError::Encrypt(_)), "{err}");
        let (_, done) = drain(rx).await;
        assert!(!done);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn counts_rows_of_a_plain_dump_while_streaming() {
        let dump = b"-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: o\nCOPY public.t (a) FROM stdin;\n1\n2\n3\n\\.\n";
        let progress = Counters::new(1);
        let (tx, rx) = mpsc::channel(4);
        let handle = start(
            input(dump),
            Compression::Zstd { level: 1 },
            None,
            Some(RowCounter::plain()),
            vec![tx],
            progress.clone(),
        );
        let d = tokio::spawn(drain(rx));
        let (stats, senders) = handle.finish().await.unwrap();
        drop(senders);
        d.await.unwrap();
        let rows = stats.rows.unwrap().unwrap();
        assert_eq!(rows[&("public".to_string(), "t".to_string())], 3);
        assert_eq!(progress.flow().rows, 3);
    }

    /// Text that compresses about 10:1, like JSON rows of a dump.
    fn rows(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 100);
        let mut x: u64 = 7;
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (x >> 33) % 100_000;
            out.extend_from_slice(
                format!(
                    "{id}\t{{\"user\": \"u{}\", \"plan\": \"p{}\", \"n\": {}}}\n",
                    id % 977,
                    x % 13,
                    x % 100_003
                )
                .as_bytes(),
            );
        }
        out.truncate(len);
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn compressing_on_worker_threads_writes_one_standard_frame() {
        // Several jobs' worth, so the workers do compress.
        let data = rows(6 * budget::ZSTD_JOB as usize + 4321);
        let compressing = Compressing {
            compression: Compression::Zstd { level: 3 },
            workers: 2,
            grow_to: None,
        };
        let (stats, zst) = compress(input(&data), compressing).await;
        assert_eq!(stats.stored_bytes, zst.len() as u64);
        assert_eq!(frames(&zst), 1, "one frame, not one per job");
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);
        // Within 2 % of one thread's size.
        let single = zstd::encode_all(&data[..], 3).unwrap().len() as f64;
        let ratio = zst.len() as f64 / single;
        assert!(ratio < 1.02, "{ratio}");
    }

    /// Streams `from` through the stages to one store; its stats and what
    /// the store received.
    async fn compress(from: std::fs::File, c: Compressing) -> (StreamStats, Vec<u8>) {
        let (tx, rx) = mpsc::channel(64);
        let handle = start(from, c, None, None, vec![tx], Counters::new(1));
        let d = tokio::spawn(drain(rx));
        let (stats, senders) = handle.finish().await.unwrap();
        drop(senders);
        (stats, d.await.unwrap().0)
    }

    /// A source slower than compression: `count` bursts of 5 MiB with
    /// 300 ms pauses between, so a stream spends most of each window
    /// waiting for it. The thread returns everything it wrote.
    fn bursts(count: usize) -> (std::fs::File, std::thread::JoinHandle<Vec<u8>>) {
        let (r, mut w) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let burst = rows(5 * 1024 * 1024);
            let mut all = Vec::new();
            for _ in 0..count {
                w.write_all(&burst).unwrap();
                all.extend_from_slice(&burst);
                std::thread::sleep(Duration::from_millis(300));
            }
            all
        });
        (std::fs::File::from(std::os::fd::OwnedFd::from(r)), writer)
    }

    /// Number of zstd frames in `zst`.
    fn frames(zst: &[u8]) -> usize {
        let mut at = 0;
        let mut n = 0;
        while at < zst.len() {
            at += zstd::zstd_safe::find_frame_compressed_size(&zst[at..]).unwrap();
            n += 1;
        }
        n
    }

    /// `compression_threads = "auto"`: a source faster than compression on
    /// the stream's own thread moves the rest of the dump to worker threads,
    /// as a second frame; a slow source never does.
    #[tokio::test(flavor = "multi_thread")]
    async fn auto_threads_move_to_workers_only_when_compression_holds_the_source_up() {
        let growing = Compressing {
            compression: Compression::Zstd { level: 15 },
            workers: 0,
            grow_to: Some(2),
        };
        // A file: never waited for. zstd:15 on one thread: ~6 MB/s.
        let data = rows(16 * 1024 * 1024);
        let (_, zst) = compress(input(&data), growing).await;
        assert_eq!(frames(&zst), 2, "moved to worker threads once");
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);

        // A source slower than compression.
        let growing = Compressing {
            compression: Compression::Zstd { level: 1 },
            ..growing
        };
        let (slow, writer) = bursts(9);
        let (_, zst) = compress(slow, growing).await;
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), writer.join().unwrap());
        assert_eq!(frames(&zst), 1, "stayed on the stream's own thread");
    }

    /// `zstd:auto` with a source slower than compression: it waits for
    /// pg_dump, so it raises the level, and says which levels it used.
    #[tokio::test(flavor = "multi_thread")]
    async fn zstd_auto_raises_the_level_while_it_waits_for_the_source() {
        let (slow, writer) = bursts(14);
        let (stats, zst) = compress(slow, Compression::ZstdAuto.into()).await;
        let all = writer.join().unwrap();
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), all);
        let levels = stats.levels.expect("zstd:auto records its levels");
        assert_eq!(levels.values().sum::<u64>(), all.len() as u64);
        assert!(levels.contains_key(&adapt::START), "{levels:?}");
        assert!(
            levels.keys().any(|&l| l > adapt::START),
            "never raised: {levels:?}"
        );
        assert!(
            levels.keys().all(|l| adapt::LEVELS.contains(l)),
            "{levels:?}"
        );
    }

    /// The budget's compressor estimate bounds what zstd really allocates,
    /// at every level, on one thread and on worker threads with the
    /// stream's job size.
    #[test]
    fn the_compressor_estimate_bounds_zstd_s_own_memory() {
        use zstd::zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer};
        let data = rows(3 * budget::ZSTD_JOB as usize);
        let mut out = vec![0u8; 1 << 20];
        for level in [
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
        ] {
            for workers in [0u32, 1, 2] {
                if level > 9 && workers == 1 {
                    continue; // slow; 0 and 2 bracket it
                }
                let mut c = CCtx::create();
                c.set_parameter(CParameter::CompressionLevel(level))
                    .unwrap();
                c.set_parameter(CParameter::ChecksumFlag(true)).unwrap();
                if workers > 0 {
                    c.set_parameter(CParameter::NbWorkers(workers)).unwrap();
                    c.set_parameter(CParameter::JobSize(budget::ZSTD_JOB as u32))
                        .unwrap();
                }
                let mut peak = 0;
                for chunk in data.chunks(CHUNK) {
                    let mut inb = InBuffer::around(chunk);
                    while inb.pos < chunk.len() {
                        let mut ob = OutBuffer::around(&mut out[..]);
                        c.compress_stream(&mut ob, &mut inb).unwrap();
                        peak = peak.max(c.sizeof());
                    }
                }
                loop {
                    let mut ob = OutBuffer::around(&mut out[..]);
                    let left = c.end_stream(&mut ob).unwrap();
                    peak = peak.max(c.sizeof());
                    if left == 0 {
                        break;
                    }
                }
                let estimate =
                    budget::compressor_memory(Compression::Zstd { level }, workers) as usize;
                assert!(
                    peak <= estimate,
                    "zstd:{level} with {workers} workers holds {peak} bytes, estimated {estimate}"
                );
            }
        }
    }
}
