//! The scheduler: when backstop's runs happen and how many go at once.
//!
//! It sits between the configuration (which jobs exist and their fire
//! times) and the pipeline (which runs one backup, verify or prune). It owns
//! the decisions only, and reaches everything else through traits:
//!
//! - [`Timetable`]: a job's fire times (the daemon adapts the config's cron
//!   schedule evaluated in the job's time zone; the DST behaviour of that is
//!   table-tested in the config crate);
//! - [`Runner`]: runs one attempt of one job, and honours cancellation;
//! - [`Ledger`]: what the catalog knows (the last success, for catch-up) and
//!   the claim on a run. A shared ledger (a fleet's PostgreSQL catalog)
//!   also records each tick, so any node may run it, and decides at start
//!   which missed ticks run (the newest) and which are skipped;
//! - [`Clock`]: the time, so the tests run on a paused tokio clock.
//!
//! Decisions: every fire time triggers a run, never early (a clock stepped
//! back waits again); runs of one job and kind never overlap (a trigger
//! while one is queued or going is skipped and reported); at most
//! `max_concurrent` runs hold a slot, the rest wait for one; a retryable
//! failure is retried `retries` times with a doubling backoff; a job whose
//! last success is older than one interval runs once at start (catch-up);
//! a reload replaces the entries without touching runs already going; and
//! shutdown stops the schedule, lets runs finish within a grace, then
//! cancels them. Everything that happens is reported as an [`Event`] to one
//! observer (metrics, notifications, sd_notify and the run API live there).

mod engine;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

pub use engine::{Drain, Missed, Scheduler, TriggerError, catch_up_window, record_missed_ticks};

pub use backstop_vocab::{Claim, Outcome, RunKind};

/// Why a run was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    CatchUp,
    /// The run API (or `backup --wait`).
    Api,
    /// A follow-up a finished run asked for (retention after a backup).
    AfterBackup,
    /// A pending run in a shared catalog (a tick another node recorded, a
    /// run put back after its node died, or one asked for through another
    /// node's API).
    Fleet,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch-up",
            Trigger::Api => "api",
            Trigger::AfterBackup => "after backup",
            Trigger::Fleet => "fleet",
        }
    }
}

/// A job's fire times.
pub trait Timetable: Send + Sync {
    /// The first fire time strictly after `after`.
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>>;

    /// The time between the next two fire times after `now`.
    fn interval_after(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        let a = self.next_after(now)?;
        let b = self.next_after(a)?;
        Some(b - a)
    }
}

/// The fire times in `(after, now]`, oldest first, at most `limit` (the
/// newest ones when there are more; the walk starts no earlier than
/// `limit` intervals before `now`, so a long gap is not walked tick by
/// tick).
pub fn fire_times_between(
    timetable: &dyn Timetable,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
    limit: usize,
) -> Vec<DateTime<Utc>> {
    let mut out = std::collections::VecDeque::new();
    let mut t = after;
    if let Some(interval) = timetable.interval_after(after) {
        let window = interval * i32::try_from(limit).unwrap_or(i32::MAX).saturating_add(1);
        t = t.max(now - window);
    }
    while let Some(next) = timetable.next_after(t) {
        if next > now {
            break;
        }
        if out.len() == limit {
            out.pop_front();
        }
        out.push_back(next);
        t = next;
    }
    out.into()
}

/// The newest fire time at or before `now`, looking back at most `span`.
/// Looks back a minute, an hour, a day, a month, then `span`, so a
/// schedule firing every second is not walked for a year.
pub fn last_fire_time(
    timetable: &dyn Timetable,
    now: DateTime<Utc>,
    span: chrono::Duration,
) -> Option<DateTime<Utc>> {
    [
        chrono::Duration::minutes(1),
        chrono::Duration::hours(1),
        chrono::Duration::days(1),
        chrono::Duration::days(31),
        span,
    ]
    .into_iter()
    .filter(|s| *s <= span)
    .find_map(|s| fire_times_between(timetable, now - s, now, 1).pop())
}

/// The time. Sleeping is tokio's, so tests pause it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// One (job, kind) the scheduler knows: runs may be asked for it, and it
/// fires by its timetable if it has one.
#[derive(Clone)]
pub struct Entry {
    pub job: String,
    pub kind: RunKind,
    pub timetable: Option<Arc<dyn Timetable>>,
    /// Extra attempts after a retryable failure.
    pub retries: u32,
    /// The wait before the first retry; doubled for each further one.
    pub backoff: Duration,
    /// Run once at start when the last success is older than one interval.
    pub catch_up: bool,
}

/// The run an attempt belongs to.
#[derive(Debug, Clone)]
pub struct RunCtx {
    pub id: u64,
    pub job: String,
    pub kind: RunKind,
    pub trigger: Trigger,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The claim a shared ledger gave this run (None with one process).
    pub claim: Option<Claim>,
}

/// How one attempt ended.
pub enum Attempt<R> {
    /// The run is done (`Success` or `Suspect`, or `Skipped` when there was
    /// nothing to do), with what the runner reports about it. `then` asks
    /// for a follow-up run of the same job (retention after a backup): it is
    /// queued before this run lets go of the job, and is accepted during a
    /// shutdown's grace, so a drain never ends between the two.
    Done {
        outcome: Outcome,
        report: R,
        then: Option<RunKind>,
    },
    Failed {
        error: String,
        retryable: bool,
    },
    /// It stopped because its cancellation token was cancelled.
    Interrupted,
}

/// Runs one attempt of one job.
pub trait Runner: Send + Sync + 'static {
    /// What a finished attempt reports (sizes, backup id…), handed to the
    /// observer with [`Event::Finished`].
    type Report: Send + 'static;

    /// Runs `run`; must stop soon after `cancel` is cancelled, returning
    /// [`Attempt::Interrupted`].
    fn run(
        &self,
        run: &RunCtx,
        cancel: CancellationToken,
    ) -> impl Future<Output = Attempt<Self::Report>> + Send;
}

/// Why a run was not claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimError {
    /// Nothing to claim here: another node took it, or runs it now.
    Elsewhere,
    /// The claim could not be made (the catalog is unreachable, this node
    /// lost its lease…); the run fails with this error.
    Failed(String),
}

/// How a claimed run ended, for [`Ledger::release`].
#[derive(Debug, Clone, Copy)]
pub enum Ending<'a> {
    /// Final, and the follow-up run the runner asked for (retention after
    /// a backup), which a shared ledger queues with the release so that
    /// any node runs it, even if this one dies right after.
    Done(Outcome, Option<RunKind>),
    Failed(&'a str),
    Interrupted(&'a str),
}

/// What the scheduler asks of the catalog.
pub trait Ledger: Send + Sync + 'static {
    /// When `job`'s last successful run of `kind` finished.
    fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, String>> + Send;

    /// Whether other processes share this ledger (a fleet): ticks are then
    /// recorded in it, claims decide who runs what, and catch-up follows the
    /// recorded ticks.
    fn shared(&self) -> bool {
        false
    }

    /// Records that `job`'s `kind` is due at `at` (a shared ledger; the
    /// first node to record a tick makes it the run every node may claim).
    fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
    ) -> impl Future<Output = ()> + Send {
        let _ = (job, kind, at);
        async {}
    }

    /// The newest tick recorded for `job`'s `kind` at or before
    /// `at_or_before` (a shared ledger). Later ticks are the fire loops'
    /// (recorded while a slow start was still catching up) and say nothing
    /// about what was missed before.
    fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, String>> + Send {
        let _ = (job, kind, at_or_before);
        async { Ok(None) }
    }

    /// The ticks recorded for `job`'s `kind` in `from..=to` (a shared
    /// ledger), oldest first: what catch-up compares with the fire times
    /// to find ticks that were never recorded (every node failed to write
    /// them), not only those after the newest. `None`: the ledger cannot
    /// say (catch-up then looks after the newest tick only).
    fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> impl Future<Output = Result<Option<Vec<DateTime<Utc>>>, String>> + Send {
        let _ = (job, kind, from, to);
        async { Ok(None) }
    }

    /// Records `ticks` of `job`'s `kind` as skipped, with `why`.
    fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: Vec<DateTime<Utc>>,
        why: String,
    ) -> impl Future<Output = Result<(), String>> + Send {
        let _ = (job, kind, ticks, why);
        async { Ok(()) }
    }

    /// Claims `run` once it has a slot, before it starts. `Ok(None)`: no
    /// claim is needed (one process). The default claims nothing.
    fn claim(
        &self,
        run: &RunCtx,
    ) -> impl Future<Output = Result<Option<Claim>, ClaimError>> + Send {
        let _ = run;
        async { Ok(None) }
    }

    /// Before a retry of a claimed run: records the failed attempt and
    /// the next one in `run.claim`. An `Err` (the claim was lost) stops the
    /// run as interrupted.
    fn next_attempt<'a>(
        &'a self,
        run: &'a mut RunCtx,
        error: &'a str,
    ) -> impl Future<Output = Result<(), String>> + Send + 'a {
        let _ = (run, error);
        async { Ok(()) }
    }

    /// Gives the claim back after the run, saying how it ended.
    fn release(&self, run: &RunCtx, ending: Ending<'_>) -> impl Future<Output = ()> + Send {
        let _ = (run, ending);
        async {}
    }
}

/// What happened, for the observer.
#[derive(Debug)]
pub enum Event<R> {
    Queued {
        id: u64,
        job: String,
        kind: RunKind,
        trigger: Trigger,
    },
    /// Every slot is taken; the run waits for one.
    WaitingForSlot {
        id: u64,
        job: String,
        kind: RunKind,
        max: usize,
    },
    Started {
        id: u64,
        job: String,
        kind: RunKind,
        attempt: u32,
    },
    /// An attempt failed with a retryable error; the next one follows after `wait`.
    Retrying {
        id: u64,
        job: String,
        kind: RunKind,
        attempt: u32,
        wait: Duration,
        error: String,
    },
    /// A trigger while run `running` of the job was queued or going.
    Skipped {
        job: String,
        kind: RunKind,
        trigger: Trigger,
        running: u64,
    },
    /// The run ended. Sent after the job is free again, so an observer may
    /// start the next run of it.
    Finished {
        id: u64,
        job: String,
        kind: RunKind,
        trigger: Trigger,
        outcome: Outcome,
        attempts: u32,
        error: Option<String>,
        report: Option<R>,
        elapsed: Duration,
    },
    /// When the entry fires next.
    NextRun {
        job: String,
        kind: RunKind,
        at: DateTime<Utc>,
    },
    /// The timetable has no further fire time.
    ScheduleEnded { job: String, kind: RunKind },
    /// At start: the last success is older than the interval (or there is
    /// none); the job runs once now.
    CatchingUp {
        job: String,
        kind: RunKind,
        last_success: Option<DateTime<Utc>>,
    },
    /// A shared ledger: another node claimed the run (or runs the job now);
    /// nothing ran here.
    ClaimedElsewhere { id: u64, job: String, kind: RunKind },
    /// At start with a shared ledger: ticks missed while no node was up.
    /// The newest runs (`running`), the `skipped` older ones never will. A
    /// job never ticked before starts with its next tick: its latest past
    /// one is recorded as skipped (`new_job`).
    MissedTicks {
        job: String,
        kind: RunKind,
        skipped: usize,
        running: Option<DateTime<Utc>>,
        new_job: bool,
    },
    /// The ledger could not be read for catch-up; no catch-up for this entry.
    LedgerUnavailable {
        job: String,
        kind: RunKind,
        error: String,
    },
}

#[cfg(test)]
mod tests;
