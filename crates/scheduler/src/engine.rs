//! The engine: one task per timetable entry sleeping until its next fire
//! time, one tracked task per run (slot, claim, attempts, release).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{
    Attempt, ClaimError, Clock, Ending, Entry, Event, Ledger, Outcome, RunCtx, RunKind, Runner,
    Trigger, fire_times_between, last_fire_time,
};

/// At most this many missed ticks of one entry are recorded as skipped at
/// start (older ones are left unrecorded: the newest is what matters).
const MAX_MISSED: usize = 1000;

/// Why a run was not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriggerError {
    /// No entry for this job and kind.
    UnknownJob,
    /// A run of the job and kind is queued or going (its id).
    AlreadyRunning(u64),
    ShuttingDown,
}

/// How a shutdown went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drain {
    /// Runs queued or going when the shutdown began.
    pub running: usize,
    /// Whether the grace ran out and the remaining runs were cancelled.
    pub cancelled: bool,
    /// Runs still not finished when the shutdown gave up on them.
    pub stuck: usize,
}

type Key = (String, RunKind);
type Observer<R> = Box<dyn Fn(Event<R>) + Send + Sync>;

struct Inner<R: Runner, L, C> {
    runner: R,
    ledger: L,
    clock: C,
    observer: Observer<R::Report>,
    slots: Arc<Semaphore>,
    max_slots: usize,
    entries: Mutex<HashMap<Key, Entry>>,
    /// Runs queued or going, by job and kind.
    busy: Mutex<HashMap<Key, u64>>,
    idle: Notify,
    next_id: AtomicU64,
    schedule_stop: Mutex<CancellationToken>,
    /// The instant the fire loops count from (set with the entries): they
    /// fire the ticks after it, catch-up sees to those at or before it, so
    /// a slow start neither loses a tick nor records one twice.
    loops_from: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
    /// Cancels the runs going; replaced after [`Scheduler::abandon_runs`].
    cancel_runs: Mutex<CancellationToken>,
    stopping: AtomicBool,
    runs: TaskTracker,
}

/// The scheduler; cheap to clone (one shared state).
pub struct Scheduler<R: Runner, L: Ledger, C: Clock> {
    inner: Arc<Inner<R, L, C>>,
}

impl<R: Runner, L: Ledger, C: Clock> Clone for Scheduler<R, L, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves the maps consistent
    // (each update is a single insert or remove), so go on with them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<R: Runner, L: Ledger, C: Clock> Scheduler<R, L, C> {
    /// A scheduler with no entries yet; at most `max_concurrent` runs go at
    /// once. Every [`Event`] goes to `observer`, on the task where it
    /// happened: keep it quick (spawn slow work).
    pub fn new(
        runner: R,
        ledger: L,
        clock: C,
        max_concurrent: usize,
        observer: impl Fn(Event<R::Report>) + Send + Sync + 'static,
    ) -> Self {
        let max = max_concurrent.max(1);
        Self {
            inner: Arc::new(Inner {
                runner,
                ledger,
                clock,
                observer: Box::new(observer),
                slots: Arc::new(Semaphore::new(max)),
                max_slots: max,
                entries: Mutex::new(HashMap::new()),
                busy: Mutex::new(HashMap::new()),
                idle: Notify::new(),
                next_id: AtomicU64::new(1),
                schedule_stop: Mutex::new(CancellationToken::new()),
                loops_from: Mutex::new(None),
                cancel_runs: Mutex::new(CancellationToken::new()),
                stopping: AtomicBool::new(false),
                runs: TaskTracker::new(),
            }),
        }
    }

    pub fn runner(&self) -> &R {
        &self.inner.runner
    }

    pub fn ledger(&self) -> &L {
        &self.inner.ledger
    }

    /// Replaces the entries (at start and on reload) and their fire-time
    /// loops. Runs already queued or going finish as they started.
    pub fn set_entries(&self, entries: Vec<Entry>) {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stop = CancellationToken::new();
        let old = std::mem::replace(&mut *lock(&self.inner.schedule_stop), stop.clone());
        old.cancel();
        let from = self.inner.clock.now();
        *lock(&self.inner.loops_from) = Some(from);
        let mut map = HashMap::new();
        for e in entries {
            if e.timetable.is_some() {
                self.spawn_fire_loop(e.clone(), from, stop.clone());
            }
            map.insert((e.job.clone(), e.kind), e);
        }
        *lock(&self.inner.entries) = map;
    }

    /// The entries in a fixed order (by job, then kind), so catch-up asks
    /// the ledger in the same order every time.
    fn sorted_entries(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = lock(&self.inner.entries).values().cloned().collect();
        entries.sort_by(|a, b| (&a.job, a.kind.as_str()).cmp(&(&b.job, b.kind.as_str())));
        entries
    }

    /// The entry of `job` and `kind`, if any.
    pub fn entry(&self, job: &str, kind: RunKind) -> Option<Entry> {
        lock(&self.inner.entries)
            .get(&(job.to_string(), kind))
            .cloned()
    }

    /// Fires `entry`'s ticks after `from`, then after each wake-up.
    fn spawn_fire_loop(
        &self,
        entry: Entry,
        from: chrono::DateTime<chrono::Utc>,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let timetable = entry.timetable.clone().expect("checked by the caller");
        tokio::spawn(async move {
            let mut after = Some(from);
            loop {
                let now = me.inner.clock.now();
                let Some(next) = timetable.next_after(after.take().unwrap_or(now)) else {
                    me.emit(Event::ScheduleEnded {
                        job: entry.job.clone(),
                        kind: entry.kind,
                    });
                    return;
                };
                me.emit(Event::NextRun {
                    job: entry.job.clone(),
                    kind: entry.kind,
                    at: next,
                });
                let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
                // Biased (here and below): one order whatever the draw, so a
                // seeded simulation of the scheduler replays exactly.
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                // Never early: a clock stepped back while we slept waits again
                // for the same fire time.
                if me.inner.clock.now() < next {
                    continue;
                }
                // A shared ledger gets the tick first: it is then the fleet's,
                // whichever node runs it (and survives this one).
                if me.inner.ledger.shared() {
                    me.inner
                        .ledger
                        .record_tick(&entry.job, entry.kind, next)
                        .await;
                }
                let _ = me.trigger(&entry.job, entry.kind, Trigger::Schedule);
            }
        });
    }

    /// At start: each entry with `catch_up` whose last success is older
    /// than its interval (or that never succeeded) runs once now.
    pub async fn catch_up(&self) {
        if self.inner.ledger.shared() {
            return self.catch_up_ticks().await;
        }
        let entries = self.sorted_entries();
        let now = self.inner.clock.now();
        for e in entries.into_iter().filter(|e| e.catch_up) {
            let Some(interval) = e.timetable.as_ref().and_then(|t| t.interval_after(now)) else {
                continue;
            };
            match self.inner.ledger.last_success(&e.job, e.kind).await {
                Ok(last) if last.is_none_or(|t| now - t > interval) => {
                    self.emit(Event::CatchingUp {
                        job: e.job.clone(),
                        kind: e.kind,
                        last_success: last,
                    });
                    let _ = self.trigger(&e.job, e.kind, Trigger::CatchUp);
                }
                Ok(_) => {}
                Err(error) => self.emit(Event::LedgerUnavailable {
                    job: e.job.clone(),
                    kind: e.kind,
                    error,
                }),
            }
        }
    }

    /// Catch-up with a shared ledger, by the recorded ticks: of the ticks
    /// missed since the last one recorded, the newest is recorded and runs
    /// and the older ones are recorded as skipped. A job with no recorded
    /// tick is not backfilled: its latest past tick is recorded as skipped,
    /// and it starts with its next one. See [`record_missed_ticks`].
    async fn catch_up_ticks(&self) {
        let entries = self.sorted_entries();
        // Up to where the fire loops took over, however long the start took.
        let now = (*lock(&self.inner.loops_from)).unwrap_or_else(|| self.inner.clock.now());
        for e in entries {
            match record_missed_ticks(&self.inner.ledger, &e, now).await {
                Ok(Some(m)) => {
                    let run = m.running.is_some();
                    self.emit(Event::MissedTicks {
                        job: e.job.clone(),
                        kind: e.kind,
                        skipped: m.skipped,
                        running: m.running,
                        new_job: m.new_job,
                    });
                    if run {
                        let _ = self.trigger(&e.job, e.kind, Trigger::CatchUp);
                    }
                }
                Ok(None) => {}
                Err(error) => self.emit(Event::LedgerUnavailable {
                    job: e.job.clone(),
                    kind: e.kind,
                    error,
                }),
            }
        }
    }

    /// Asks for a run of `job` and `kind` now.
    ///
    /// # Errors
    /// [`TriggerError`]: no such entry, a run of it is queued or going (the
    /// trigger is skipped and reported), or the scheduler is shutting down.
    pub fn trigger(&self, job: &str, kind: RunKind, trigger: Trigger) -> Result<u64, TriggerError> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err(TriggerError::ShuttingDown);
        }
        self.enqueue(job, kind, trigger)
    }

    fn enqueue(&self, job: &str, kind: RunKind, trigger: Trigger) -> Result<u64, TriggerError> {
        if self.cancel_token().is_cancelled() {
            return Err(TriggerError::ShuttingDown);
        }
        let Some(entry) = self.entry(job, kind) else {
            return Err(TriggerError::UnknownJob);
        };
        let key = (job.to_string(), kind);
        let id = {
            let mut busy = lock(&self.inner.busy);
            if let Some(&running) = busy.get(&key) {
                drop(busy);
                self.emit(Event::Skipped {
                    job: job.to_string(),
                    kind,
                    trigger,
                    running,
                });
                return Err(TriggerError::AlreadyRunning(running));
            }
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            busy.insert(key, id);
            id
        };
        self.emit(Event::Queued {
            id,
            job: job.to_string(),
            kind,
            trigger,
        });
        let me = self.clone();
        self.inner.runs.spawn(async move {
            me.run(entry, id, trigger).await;
        });
        Ok(id)
    }

    /// Runs queued or going.
    pub fn busy(&self) -> usize {
        lock(&self.inner.busy).len()
    }

    /// The run of `job` and `kind` queued or going, if any.
    pub fn running(&self, job: &str, kind: RunKind) -> Option<u64> {
        lock(&self.inner.busy)
            .get(&(job.to_string(), kind))
            .copied()
    }

    async fn run(&self, entry: Entry, id: u64, trigger: Trigger) {
        let started = Instant::now();
        let mut ctx = RunCtx {
            id,
            job: entry.job.clone(),
            kind: entry.kind,
            trigger,
            attempt: 0,
            claim: None,
        };
        let Some((outcome, error, report, then)) = self.attempts(&entry, &mut ctx).await else {
            // Claimed by another node: nothing ran here.
            self.free(&entry);
            self.emit(Event::ClaimedElsewhere {
                id,
                job: entry.job,
                kind: entry.kind,
            });
            return;
        };
        if let Some(kind) = then {
            // Queued while this run still holds the job: a drain waiting for
            // an empty scheduler cannot end in between.
            let _ = self.enqueue(&entry.job, kind, Trigger::AfterBackup);
        }
        self.free(&entry);
        self.emit(Event::Finished {
            id,
            job: entry.job,
            kind: entry.kind,
            trigger,
            outcome,
            attempts: ctx.attempt,
            error,
            report,
            elapsed: started.elapsed(),
        });
    }

    fn free(&self, entry: &Entry) {
        let mut busy = lock(&self.inner.busy);
        busy.remove(&(entry.job.clone(), entry.kind));
        if busy.is_empty() {
            self.inner.idle.notify_waiters();
        }
    }

    /// The token that cancels the runs going now.
    fn cancel_token(&self) -> CancellationToken {
        lock(&self.inner.cancel_runs).clone()
    }

    /// Cancels every run going or waiting for a slot (they end
    /// interrupted) while the scheduler goes on: what a fleet node does
    /// when it can no longer trust its lease.
    pub fn abandon_runs(&self) {
        let old = std::mem::replace(
            &mut *lock(&self.inner.cancel_runs),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// A slot, the claim, then attempts until one is final. None: another
    /// node has the run.
    ///
    /// Length: one run's attempts with backoff, abandonment and the ledger's
    /// release, in order; each branch ends the run differently.
    async fn attempts(
        &self,
        entry: &Entry,
        ctx: &mut RunCtx,
    ) -> Option<(Outcome, Option<String>, Option<R::Report>, Option<RunKind>)> {
        let cancel = &self.cancel_token();
        let interrupted = || {
            let why = if self.stopping() {
                "interrupted by shutdown"
            } else {
                "interrupted: this node could no longer trust its lease on the run"
            };
            (Outcome::Interrupted, Some(why.to_string()), None, None)
        };
        let _permit = match self.inner.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.emit(Event::WaitingForSlot {
                    id: ctx.id,
                    job: entry.job.clone(),
                    kind: entry.kind,
                    max: self.inner.max_slots,
                });
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Some(interrupted()),
                    p = self.inner.slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return Some(interrupted()),
                    },
                }
            }
        };
        // A slot freed by cancelling its run is no reason to start another.
        if cancel.is_cancelled() {
            return Some(interrupted());
        }
        match self.inner.ledger.claim(ctx).await {
            Ok(Some(claim)) => {
                // A run put back after its node died goes on counting.
                ctx.attempt = u32::try_from(claim.attempt.max(1) - 1).unwrap_or(0);
                ctx.claim = Some(claim);
            }
            Ok(None) => {}
            Err(ClaimError::Elsewhere) => return None,
            Err(ClaimError::Failed(why)) => return Some((Outcome::Failed, Some(why), None, None)),
        }
        let mut last_error = String::new();
        let result = loop {
            if ctx.attempt > 0
                && !last_error.is_empty()
                && let Err(why) = self.inner.ledger.next_attempt(ctx, &last_error).await
            {
                break (Outcome::Interrupted, Some(why), None, None);
            }
            ctx.attempt += 1;
            self.emit(Event::Started {
                id: ctx.id,
                job: entry.job.clone(),
                kind: entry.kind,
                attempt: ctx.attempt,
            });
            match self.inner.runner.run(ctx, cancel.child_token()).await {
                Attempt::Done {
                    outcome,
                    report,
                    then,
                } => break (outcome, None, Some(report), then),
                Attempt::Interrupted => break interrupted(),
                Attempt::Failed { error, retryable } => {
                    if !retryable || ctx.attempt > entry.retries || cancel.is_cancelled() {
                        break (Outcome::Failed, Some(error), None, None);
                    }
                    last_error = error.clone();
                    let wait = entry.backoff * 2u32.saturating_pow(ctx.attempt - 1);
                    self.emit(Event::Retrying {
                        id: ctx.id,
                        job: entry.job.clone(),
                        kind: entry.kind,
                        attempt: ctx.attempt,
                        wait,
                        error,
                    });
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => break interrupted(),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        let ending = match (&result.0, &result.1) {
            (Outcome::Interrupted, why) => {
                Ending::Interrupted(why.as_deref().unwrap_or("interrupted"))
            }
            (Outcome::Failed, why) => Ending::Failed(why.as_deref().unwrap_or("failed")),
            (outcome, _) => Ending::Done(*outcome, result.3),
        };
        self.inner.ledger.release(ctx, ending).await;
        Some(result)
    }

    /// Stops the schedule and new runs; lets the runs going finish within
    /// `grace`, then cancels them and waits up to `cancel_wait` for them to
    /// stop.
    pub async fn shutdown(&self, grace: Duration, cancel_wait: Duration) -> Drain {
        self.inner.stopping.store(true, Ordering::SeqCst);
        lock(&self.inner.schedule_stop).cancel();
        let running = self.busy();
        let mut cancelled = false;
        if tokio::time::timeout(grace, self.drained()).await.is_err() {
            cancelled = true;
            self.cancel_token().cancel();
            let _ = tokio::time::timeout(cancel_wait, self.drained()).await;
        }
        // Runs that never got a slot end as interrupted when cancelled.
        self.cancel_token().cancel();
        self.inner.runs.close();
        let _ = tokio::time::timeout(cancel_wait, self.inner.runs.wait()).await;
        Drain {
            running,
            cancelled,
            stuck: self.busy(),
        }
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Waits until no run is queued or going.
    pub async fn wait_idle(&self) {
        self.drained().await;
    }

    async fn drained(&self) {
        loop {
            let idle = self.inner.idle.notified();
            if self.busy() == 0 {
                return;
            }
            idle.await;
        }
    }

    fn emit(&self, e: Event<R::Report>) {
        (self.inner.observer)(e);
    }
}

/// How far back catch-up looks for ticks that were never recorded (at
/// least this, and three of the entry's intervals).
const GAP_WINDOW: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// How far back from `now` catch-up looks for ticks of `timetable` that
/// no node recorded: a day, or three intervals when that is longer. A
/// catalog that deletes old runs must keep at least this much (see
/// `backstop_fleet::history::horizon`), or catch-up takes a deleted tick
/// for a missed one.
pub fn catch_up_window(
    timetable: &dyn crate::Timetable,
    now: chrono::DateTime<chrono::Utc>,
) -> chrono::TimeDelta {
    timetable
        .interval_after(now)
        .map_or(GAP_WINDOW, |i| (i * 3).max(GAP_WINDOW))
}

/// With a shared ledger: records the ticks of `entry` missed up to `now`
/// and says what became of them. Missed are the fire times after the
/// newest recorded tick, and those in the last day (or three intervals)
/// with no row at all (every node failed to record them). The newest fire
/// time runs if it is among them; every other missed one is recorded as
/// skipped, with why. A job never ticked before is not backfilled: its
/// latest past tick (within a year) is recorded as skipped. None: nothing
/// was missed (or the entry has no timetable). Used by the daemon at start
/// and by `run-due`.
///
/// # Errors
/// The ledger's, when it cannot be read or written.
pub async fn record_missed_ticks<L: Ledger>(
    ledger: &L,
    entry: &Entry,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<Missed>, String> {
    let Some(timetable) = entry.timetable.as_deref() else {
        return Ok(None);
    };
    let (job, kind) = (entry.job.as_str(), entry.kind);
    let Some(last) = ledger.last_tick(job, kind, now).await? else {
        let Some(latest) = last_fire_time(timetable, now, chrono::Duration::days(366)) else {
            return Ok(None);
        };
        ledger
            .skip_ticks(
                job,
                kind,
                vec![latest],
                "not backfilled: the first tick of a job new to the fleet is its next one".into(),
            )
            .await?;
        return Ok(Some(Missed {
            skipped: 1,
            running: None,
            new_job: true,
        }));
    };
    let window = catch_up_window(timetable, now);
    // Gaps count only from the oldest tick recorded in the window: the
    // fire times before a job's first tick were never the fleet's.
    let recorded = ledger
        .recorded_ticks(job, kind, now - window, now)
        .await?
        .unwrap_or_default();
    let from = recorded.first().map_or(last, |first| (*first).min(last));
    let expected = fire_times_between(timetable, from, now, MAX_MISSED);
    let missing: Vec<chrono::DateTime<chrono::Utc>> = expected
        .iter()
        .copied()
        .filter(|t| !recorded.contains(t))
        .collect();
    let Some(&newest) = expected.last() else {
        return Ok(None);
    };
    if missing.is_empty() {
        return Ok(None);
    }
    let runs = missing.last() == Some(&newest) && newest > last;
    let skipped: Vec<_> = missing
        .iter()
        .copied()
        .filter(|t| !(runs && *t == newest))
        .collect();
    let n = skipped.len();
    if !skipped.is_empty() {
        ledger
            .skip_ticks(
                job,
                kind,
                skipped,
                format!(
                    "missed: no node recorded it when it was due (down, or the catalog could not be written); only the newest tick ({}) runs",
                    newest.to_rfc3339()
                ),
            )
            .await?;
    }
    if runs {
        ledger.record_tick(job, kind, newest).await;
    }
    Ok(Some(Missed {
        skipped: n,
        running: runs.then_some(newest),
        new_job: false,
    }))
}

/// What [`record_missed_ticks`] recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// Ticks recorded as skipped.
    pub skipped: usize,
    /// The missed tick recorded to run.
    pub running: Option<chrono::DateTime<chrono::Utc>>,
    /// The job had no recorded tick (not backfilled).
    pub new_job: bool,
}
