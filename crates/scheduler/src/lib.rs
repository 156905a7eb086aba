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
//!   the claim on a run (the seam several daemons sharing one catalog will
//!   use);
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

pub use engine::{Drain, Scheduler, TriggerError};

pub use backstop_vocab::{Outcome, RunKind};

/// Why a run was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Schedule,
    CatchUp,
    /// The run API (or `backup --wait`).
    Api,
    /// A follow-up a finished run asked for (retention after a backup).
    AfterBackup,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::CatchUp => "catch-up",
            Trigger::Api => "api",
            Trigger::AfterBackup => "after backup",
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

/// What the scheduler asks of the catalog.
pub trait Ledger: Send + Sync + 'static {
    /// When `job`'s last successful run of `kind` finished.
    fn last_success(
        &self,
        job: &str,
        kind: RunKind,
    ) -> impl Future<Output = Result<Option<DateTime<Utc>>, String>> + Send;

    /// Claims `run` before it starts; an `Err` (why not) fails the run
    /// without running it. The default claims nothing (one process).
    fn claim(&self, run: &RunCtx) -> impl Future<Output = Result<(), String>> + Send {
        let _ = run;
        async { Ok(()) }
    }

    /// Gives the claim back after the run.
    fn release(&self, run: &RunCtx) -> impl Future<Output = ()> + Send {
        let _ = run;
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
    /// The ledger could not be read for catch-up; no catch-up for this entry.
    LedgerUnavailable {
        job: String,
        kind: RunKind,
        error: String,
    },
}

#[cfg(test)]
mod tests;
