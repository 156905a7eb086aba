//! Writing one artifact to every store of a backup at once: a store that
//! fails drops out (recorded in its [`Destination`]) while the others go on; the
//! artifact fails as a whole only if the dump or the stream fails, or every
//! store does. Then each store is asked to confirm what it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::time::{Duration, Instant};

use backstop_config::{Encryption, JobConfig, budget};
use backstop_dump::{DumpChild, PgTarget, RowCounter};
use backstop_storage::{Storage, StorageError, StreamItem};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::names::artifact_key;
use super::{BackupError, DumpTool, Step};
use crate::backup::stream::{self, Counters, StreamError, StreamStats, Stuck};
use crate::manifest::Artifact;

/// Chunks queued per store before the stream waits for it.
const UPLOAD_QUEUE: usize = budget::UPLOAD_QUEUE;

/// A store the backup is written to (a destination, as a [`PgTarget`] is
/// the database it comes from), and how it is doing.
pub(super) struct Destination {
    pub(super) name: String,
    pub(super) storage: Arc<dyn Storage>,
    /// Keys committed in this store by this run.
    pub(super) written: Written,
    /// Why this store dropped out of the run.
    pub(super) failed: Option<BackupError>,
    /// Its manifest is written: the backup exists in this store.
    pub(super) complete: bool,
    /// About how big the backup's largest stored artifact will be, to plan
    /// parts for.
    pub(super) expected: backstop_storage::SizeHint,
}

impl Destination {
    pub(super) fn new(name: String, storage: Arc<dyn Storage>) -> Self {
        Destination {
            name,
            storage,
            written: Written::default(),
            failed: None,
            complete: false,
            expected: backstop_storage::SizeHint::Unknown,
        }
    }

    pub(super) fn live(&self) -> bool {
        self.failed.is_none()
    }
}

/// The keys a run committed in one store, recorded by each upload the
/// moment it commits (several streams write at once, and a stream may be
/// dropped while another store still uploads its artifact), so a run
/// stopped part-way (timeout, shutdown, a failed stream) still removes
/// every one of them.
#[derive(Debug, Default, Clone)]
pub(super) struct Written(Arc<std::sync::Mutex<Vec<String>>>);

impl Written {
    pub(super) fn push(&self, key: String) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key);
    }

    pub(super) fn keys(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The first store failure (all stores failed).
pub(super) fn first_failure(targets: &mut [Destination]) -> BackupError {
    targets
        .iter_mut()
        .find_map(|t| t.failed.take())
        .unwrap_or_else(|| BackupError::said(Step::Upload, "no store accepted the backup"))
}

/// A dump tool writing an artifact: the child, its output, and how its
/// session is named on the server (to end it if the run stalls).
pub(super) struct Dumping<'a> {
    pub(super) tool: DumpTool,
    pub(super) child: DumpChild,
    pub(super) stdout: std::fs::File,
    pub(super) target: &'a PgTarget,
    /// The `application_name` the child's sessions carry.
    pub(super) app: &'a str,
    /// Its place under `max_source_connections`, given back when it exits.
    pub(super) permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Streams one child's output to every live store. A store that fails drops
/// out (recorded in its target) while the others continue; the artifact
/// fails as a whole only if the dump or stream fails, or every store does.
/// Nothing moving for the job's `stall_timeout` fails it as stalled.
/// `memory` is what this stream may hold of the job's budget.
pub(super) async fn stream_artifact(
    job: &JobConfig,
    targets: &mut [Destination],
    backup_id: &str,
    file: &str,
    dumping: Dumping<'_>,
    counter: Option<RowCounter>,
) -> Result<StreamStats, BackupError> {
    let tool = dumping.tool;
    let (settle, produced) = stream_to(
        job,
        targets,
        backup_id,
        file,
        dumping,
        counter,
        job.lane_budget(),
    )
    .await?;
    settle.apply(job, targets);
    artifact_result(tool, targets, produced)
}

/// How each store's upload of one artifact ended, to record in the
/// stores' [`Destination`]s once no stream borrows them ([`Settle::apply`]).
pub(super) struct Settle {
    /// The stores that took part (indexes into the targets), and their uploads.
    live: Vec<usize>,
    uploaded: Vec<Result<u64, StorageError>>,
}

impl Settle {
    /// Records each store's outcome: the key committed, or the store
    /// dropped out of the run.
    pub(super) fn apply(self, job: &JobConfig, targets: &mut [Destination]) {
        for (i, up) in self.live.into_iter().zip(self.uploaded) {
            settle_store(job, &mut targets[i], up);
        }
    }

    /// Whether some store committed the artifact.
    pub(super) fn any_committed(&self) -> bool {
        self.uploaded.iter().any(Result::is_ok)
    }
}

/// What production (the dump tool and the stream) came to.
pub(super) type Produced =
    Result<StreamStats, (Option<StreamError>, Option<backstop_dump::DumpError>)>;

/// [`stream_artifact`] without touching the targets, so several streams
/// may write at once: how each store's upload ended, and what production
/// came to. `Err` only for a stall, whose uploads are aborted.
pub(super) async fn stream_to(
    job: &JobConfig,
    targets: &[Destination],
    backup_id: &str,
    file: &str,
    dumping: Dumping<'_>,
    counter: Option<RowCounter>,
    memory: u64,
) -> Result<(Settle, Produced), BackupError> {
    let Dumping {
        tool,
        child,
        stdout,
        target,
        app,
        permit,
    } = dumping;
    let key = artifact_key(job, backup_id, file);
    let child_pid = child.pid();
    let live: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].live()).collect();
    // A store taking nothing for half the stall timeout, while another
    // still takes the stream, is given up before the watchdog would end
    // them all.
    let progress = Counters::with_patience(live.len(), job.stall_timeout.map(|t| t / 2));
    // Listed for progress displays (`backstop backup` on a terminal) while it streams.
    let _listed = crate::backup::live::register(
        &job.name,
        file,
        live.iter().map(|&i| targets[i].name.clone()).collect(),
        &progress,
    );
    let threads = job.thread_plan();
    let (senders, uploads) = start_uploads(job, targets, &live, &key, &progress, memory);
    let recipients = match &job.encryption {
        Encryption::None => None,
        Encryption::Age { recipients, .. } => Some(recipients.clone()),
    };
    let handle = stream::start(
        stdout,
        stream::Compressing {
            compression: job.compression,
            workers: threads.start,
            grow_to: threads.grow_to,
        },
        recipients,
        counter,
        senders,
        progress.clone(),
    );

    let committing = progress.clone();
    let produce = async move {
        let streamed = handle.finish().await;
        let dumped = child.finish().await;
        drop(permit);
        match (streamed, dumped) {
            (Ok((stats, senders)), Ok(_)) => {
                // Every stage and the child vouch for the stream: commit it.
                committing.committed();
                for tx in senders.into_iter().flatten() {
                    let _ = tx.send(StreamItem::Finish).await;
                }
                Ok(stats)
            }
            // Dropping the senders without Finish aborts every upload.
            (streamed, dumped) => Err((streamed.err(), dumped.err())),
        }
    };
    let work = async { tokio::join!(produce, futures::future::join_all(uploads)) };
    let watchdog = async {
        match job.stall_timeout {
            Some(limit) => {
                let witness = watch_source(target, app, child_pid, &progress, limit);
                let judge = async {
                    loop {
                        let stuck = progress.stalled(limit).await;
                        // Some stores have their whole upload done while
                        // others hang: those are given up, not the backup.
                        if let Stuck::Finishing(pending) = &stuck
                            && pending.len() < live.len()
                        {
                            for &i in pending {
                                progress.give_up(i);
                            }
                            continue;
                        }
                        return (stuck, limit);
                    }
                };
                tokio::select! {
                    stuck = judge => stuck,
                    never = witness => match never {},
                }
            }
            None => std::future::pending().await,
        }
    };
    let mut work = std::pin::pin!(work);
    let (produced, uploaded) = tokio::select! {
        done = &mut work => done,
        (stuck, limit) = watchdog => {
            let names: Vec<&str> = live.iter().map(|&i| targets[i].name.as_str()).collect();
            let at = stuck_at(tool, &stuck, &names);
            // The server side first, while the child still holds its
            // connection (the work is no longer polled, so whatever it
            // does now cannot end the run some other way); returning then
            // drops the work, which kills the child (kill_on_drop) and
            // aborts every upload.
            return Err(stalled(job, target, app, at, limit).await);
        }
    };
    Ok((Settle { live, uploaded }, produced))
}

/// How many stall_timeouts one query the server works on counts as
/// progress while neither it nor the dump's output changes: a backend
/// that stopped (a hung disk, a process stopped on the server) shows the
/// state it last reported for good.
const WORKING_LIMITS: u32 = 5;

/// The stall watchdog's other witnesses: the sessions named `app` on the
/// server (a query started, a state changed, or the server working on a
/// query: pg_dump reading a big catalog writes nothing for a long time,
/// but queries all along, some of them longer than the limit; one query
/// counts for [`WORKING_LIMITS`] limits of no output at most) and the
/// tool's own
/// process (CPU time used, or ready to run: working through what it read,
/// or waiting only for a busy CPU). Any of them counts as progress; a dump
/// waiting on a lock or on a full pipe shows none. Each witness looks on
/// its own, so a slow answer from the server does not leave the process
/// unwatched. Never returns.
async fn watch_source(
    target: &PgTarget,
    app: &str,
    child: Option<u32>,
    progress: &Counters,
    limit: Duration,
) -> std::convert::Infallible {
    let every = (limit / 5).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let server = async {
        let mut sessions = backstop_dump::admin::Activity::new(target, app);
        // The sessions as last seen; since when neither they nor the
        // dump's output changed; the output then.
        let mut seen: Option<String> = None;
        let (mut since, mut dumped) = (Instant::now(), progress.flow().dumped);
        let window = limit.saturating_mul(WORKING_LIMITS);
        loop {
            tokio::time::sleep(every).await;
            let Some(now) = sessions.now().await else {
                continue;
            };
            let out = progress.flow().dumped;
            let changed = seen.as_ref().is_some_and(|before| *before != now.line);
            if changed {
                progress.moved();
            }
            if changed || seen.is_none() || out != dumped {
                seen = Some(now.line);
                (since, dumped) = (Instant::now(), out);
            }
            if now.working && since.elapsed() < window && waits_for_source(progress) {
                progress.moved();
            }
        }
    };
    let process = async {
        let mut cpu = None;
        loop {
            tokio::time::sleep(every).await;
            let now = child.and_then(process_now);
            let used = now.map(|p| p.ticks);
            let working = now.is_some_and(|p| p.runnable)
                || matches!((cpu, used), (Some(before), Some(after)) if after > before);
            if working && waits_for_source(progress) {
                progress.moved();
            }
            cpu = used.or(cpu);
        }
    };
    tokio::select! {
        never = server => never,
        never = process => never,
    }
}

/// Whether the stream waits for the dump tool (to write, or to exit):
/// only then is what the tool does progress. Waiting for a store, the
/// store is what must move (and the tool's pid may be another process's
/// once it has exited).
fn waits_for_source(progress: &Counters) -> bool {
    matches!(progress.stuck(), Stuck::Source | Stuck::Exit)
}

/// What a process is doing, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessNow {
    /// CPU time used (user and system, in clock ticks).
    ticks: u64,
    /// Running, or ready to run and waiting for a CPU (state R).
    runnable: bool,
}

fn process_now(pid: u32) -> Option<ProcessNow> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A `/proc/PID/stat` line: what [`ProcessNow`] holds.
fn parse_stat(stat: &str) -> Option<ProcessNow> {
    // After the command's name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // The state is field 3 of the line (0 after the name); utime and
    // stime are fields 14 and 15 (11 and 12 after it).
    Some(ProcessNow {
        ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
        runnable: *fields.first()? == "R",
    })
}

/// One upload per live store, each given its share of the job's memory
/// budget (what the stores that gather parts may hold): the senders the
/// stream writes to, and the uploads to await.
fn start_uploads(
    job: &JobConfig,
    targets: &[Destination],
    live: &[usize],
    key: &str,
    progress: &Counters,
    memory: u64,
) -> (Vec<mpsc::Sender<StreamItem>>, Vec<Upload>) {
    let minimums: Vec<Option<u64>> = live
        .iter()
        .map(|&i| targets[i].storage.part_memory_minimum())
        .collect();
    let mut shares = budget::part_shares(
        memory,
        job.compression,
        job.thread_plan().most(),
        live.len(),
        &minimums.iter().flatten().copied().collect::<Vec<_>>(),
    )
    .into_iter();
    let mut senders = Vec::new();
    let mut uploads: Vec<Upload> = Vec::new();
    let stall = job.stall_timeout.unwrap_or_default();
    for (n, &i) in live.iter().enumerate() {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        senders.push(tx);
        let storage = targets[i].storage.clone();
        let written = targets[i].written.clone();
        // A backup in streams spreads the data over its data streams.
        let per_stream = |e: u64| e.div_ceil(u64::from(job.streams.max(1)));
        let expected = match targets[i].expected {
            backstop_storage::SizeHint::Expected(e) => {
                backstop_storage::SizeHint::Expected(per_stream(e))
            }
            backstop_storage::SizeHint::AtMost(e) => {
                backstop_storage::SizeHint::AtMost(per_stream(e))
            }
            unknown => unknown,
        };
        let (key, progress) = (key.to_string(), progress.clone());
        let share = match minimums[n] {
            Some(_) => shares.next().unwrap_or(0),
            None => 0,
        };
        let given_up = progress.given_up(n);
        uploads.push(Box::pin(async move {
            let r = tokio::select! {
                r = storage.put_stream_within(&key, rx, share, expected) => r,
                () = given_up.cancelled() => Err(StorageError::Aborted {
                    key: key.clone(),
                    reason: "given up".into(),
                }),
            };
            // Dropping the upload above ended its request and aborts it;
            // one that committed as it was given up is listed for removal
            // (the store fails, so nothing of this run stays in it).
            if given_up.is_cancelled() && r.is_ok() {
                written.push(key.clone());
            }
            let r = if given_up.is_cancelled() {
                let message = if progress.is_committed() {
                    format!(
                        "the store had not finished its upload {} (the job's stall_timeout) after the job's other stores had; it was given up so the backup could complete in them",
                        humantime::format_duration(stall)
                    )
                } else {
                    format!(
                        "the store took no data for {} (half the job's stall_timeout) while the job's other stores did; it was given up so the backup could complete in them",
                        humantime::format_duration(stall / 2)
                    )
                };
                Err(StorageError::Remote {
                    op: "upload",
                    location: key.clone(),
                    message,
                    retryable: true,
                })
            } else {
                r
            };
            if r.is_ok() {
                written.push(key);
            }
            progress.finished(n);
            r
        }));
    }
    (senders, uploads)
}

/// One store's upload of an artifact, as it runs beside the others.
type Upload =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, StorageError>> + Send>>;

/// Records how one store's upload ended: committed (its key is in
/// `written` already), or the store dropped out of the run (an upload
/// aborted because production failed is not the store's fault).
fn settle_store(job: &JobConfig, t: &mut Destination, uploaded: Result<u64, StorageError>) {
    match uploaded {
        Ok(_) => {}
        Err(StorageError::Aborted { .. }) => {}
        Err(e) => {
            warn!(job = %job.name, store = %t.name, error = %e, "Store failed; the other stores of the job (if any) continue.");
            t.failed = Some(BackupError::at(Step::UploadTo(t.name.clone()), e));
        }
    }
}

/// The artifact's outcome once production and the uploads are done (and
/// settled in the targets).
pub(super) fn artifact_result(
    tool: DumpTool,
    targets: &mut [Destination],
    produced: Produced,
) -> Result<StreamStats, BackupError> {
    match produced {
        Ok(stats) => {
            if targets.iter().any(Destination::live) {
                Ok(stats)
            } else {
                Err(first_failure(targets))
            }
        }
        Err((streamed, dumped)) => {
            // The root cause first: when every store failed, pg_dump died of a
            // broken pipe, so its error is the consequence, not the cause.
            if !targets.iter().any(Destination::live) {
                return Err(first_failure(targets));
            }
            if let Some(e) = dumped {
                return Err(dump_failed(tool, e));
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

/// A failed dump tool; a query the standby cancelled to replay WAL is a
/// recovery conflict, said as such (retryable, with the fixes).
fn dump_failed(tool: DumpTool, e: backstop_dump::DumpError) -> BackupError {
    match &e {
        backstop_dump::DumpError::Exited { stderr, .. }
            if stderr.contains("conflict with recovery") =>
        {
            BackupError::RecoveryConflict(crate::one_line(&e))
        }
        _ => BackupError::at(Step::Dump(tool), e),
    }
}

/// Where a stalled stream waits, in words (`stores` names its outputs).
fn stuck_at(tool: DumpTool, stuck: &Stuck, stores: &[&str]) -> String {
    let store = |i: &usize| format!("store \"{}\"", stores.get(*i).copied().unwrap_or("?"));
    match stuck {
        Stuck::Source => format!("{} wrote no output", tool.as_str()),
        Stuck::Output(i) => format!("{} took no data (upload)", store(i)),
        Stuck::Finishing(open) if !open.is_empty() => format!(
            "{} did not finish the upload",
            open.iter().map(store).collect::<Vec<_>>().join(", ")
        ),
        Stuck::Finishing(_) => "the stream did not end".into(),
        Stuck::Exit => format!("{}'s output ended but it did not exit", tool.as_str()),
    }
}

/// How long ending a stalled dump's session may take before the run is
/// failed anyway (the server itself may be what hangs).
const END_SESSION_WAIT: Duration = Duration::from_secs(10);

/// A stalled run's error, after ending the dump tool's database sessions
/// (pg_terminate_backend by its own application_name): the child is
/// already killed, but a backend waiting on a lock or a dead network does
/// not notice that, and would keep its snapshot and locks.
async fn stalled(
    job: &JobConfig,
    target: &PgTarget,
    app: &str,
    at: String,
    limit: Duration,
) -> BackupError {
    let ended = match tokio::time::timeout(
        END_SESSION_WAIT,
        backstop_dump::admin::terminate_sessions(target, app),
    )
    .await
    {
        Ok(Ok(pids)) if pids.is_empty() => "it had no session left on the server".to_string(),
        Ok(Ok(pids)) => format!(
            "its session was ended (pid {})",
            pids.iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Ok(Err(e)) => {
            error!(job = %job.name, application_name = %app, error = %e, "Could not end the stalled dump's session: it may hold a snapshot and locks until the server notices; look for it in pg_stat_activity.");
            format!(
                "its session could not be ended ({}); look for application_name {app:?} in pg_stat_activity",
                crate::one_line(&e)
            )
        }
        Err(_) => {
            error!(job = %job.name, application_name = %app, "Ending the stalled dump's session did not finish in time; look for it in pg_stat_activity.");
            format!(
                "ending its session did not answer within {}s; look for application_name {app:?} in pg_stat_activity",
                END_SESSION_WAIT.as_secs()
            )
        }
    };
    BackupError::Stalled {
        at,
        after: limit,
        ended,
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
    t: &Destination,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_cpu_time_and_whether_the_process_may_run() {
        // A name with spaces and a parenthesis, as a process may give itself.
        let line = "4242 (pg_dump (x) y) R 1 4242 4242 0 -1 4194304 120 0 0 0 37 5 0 0 20 0 1 0 99 1000 10 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcessNow {
                ticks: 42,
                runnable: true
            })
        );
        let sleeping = line.replace(") R ", ") S ");
        assert_eq!(parse_stat(&sleeping).map(|p| p.runnable), Some(false));
        assert_eq!(parse_stat("4242 (pg_dump) R 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_process_waiting_is_not_runnable_and_one_computing_is() {
        let mut waiting = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // Each seen at least once as it is: the sleeping one once it has
        // started, the busy one once it has had a CPU.
        let start = std::time::Instant::now();
        let (mut ran, mut used, mut waited) = (false, 0, false);
        while start.elapsed() < Duration::from_secs(10) && !(ran && used > 0 && waited) {
            std::thread::sleep(Duration::from_millis(20));
            let now = process_now(busy.id()).expect("the busy process");
            ran |= now.runnable;
            used = now.ticks;
            waited |= !process_now(waiting.id())
                .expect("the sleeping process")
                .runnable;
        }
        for c in [&mut waiting, &mut busy] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(ran && used > 0, "a busy loop never ran: {ran} {used}");
        assert!(waited, "sleep 30 was never seen waiting");
        assert_eq!(process_now(u32::MAX), None);
    }
}
