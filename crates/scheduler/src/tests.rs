//! The scheduler's behaviour on a paused tokio clock: a fake clock that
//! moves with tokio's time, a fake runner whose attempts take a set time
//! and end as scripted, and a fake ledger. No test waits for real time.
//!
//! Length: every scheduler behaviour in one file, so the fakes are shared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio_util::sync::CancellationToken;

use crate::*;

/// Wall time that moves with tokio's (paused) clock, and can be stepped.
#[derive(Clone)]
struct FakeClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
    offset: Arc<Mutex<chrono::Duration>>,
}

impl FakeClock {
    fn at(base: DateTime<Utc>) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
            offset: Arc::new(Mutex::new(chrono::Duration::zero())),
        }
    }
    fn step(&self, by: chrono::Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        self.base
            + chrono::Duration::from_std(self.start.elapsed()).unwrap()
            + *self.offset.lock().unwrap()
    }
}

/// Fires at every multiple of `secs` seconds since the epoch.
struct Every(i64);

impl Timetable for Every {
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let t = after.timestamp().div_euclid(self.0) * self.0 + self.0;
        Utc.timestamp_opt(t, 0).single()
    }
}

/// Fires once, at `at`.
struct Once(DateTime<Utc>);

impl Timetable for Once {
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        (after < self.0).then_some(self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    Ok,
    Retryable,
    Permanent,
}

/// One attempt the runner made: job, kind, attempt, start and end on the
/// fake clock, and whether it was cancelled.
#[derive(Debug, Clone)]
struct Ran {
    job: String,
    attempt: u32,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    cancelled: bool,
}

#[derive(Clone)]
struct FakeRunner {
    clock: FakeClock,
    takes: Arc<Mutex<HashMap<String, Duration>>>,
    /// Per job, the outcome of each attempt in turn (then Ok).
    script: Arc<Mutex<HashMap<String, Vec<Script>>>>,
    ran: Arc<Mutex<Vec<Ran>>>,
}

impl FakeRunner {
    fn new(clock: &FakeClock) -> Self {
        Self {
            clock: clock.clone(),
            takes: Arc::default(),
            script: Arc::default(),
            ran: Arc::default(),
        }
    }
    fn takes(self, job: &str, d: Duration) -> Self {
        self.takes.lock().unwrap().insert(job.into(), d);
        self
    }
    fn script(self, job: &str, s: &[Script]) -> Self {
        self.script.lock().unwrap().insert(job.into(), s.to_vec());
        self
    }
    fn ran(&self) -> Vec<Ran> {
        self.ran.lock().unwrap().clone()
    }
}

impl Runner for FakeRunner {
    type Report = u32;

    async fn run(&self, run: &RunCtx, cancel: CancellationToken) -> Attempt<u32> {
        let start = self.clock.now();
        let takes = self
            .takes
            .lock()
            .unwrap()
            .get(&run.job)
            .copied()
            .unwrap_or(Duration::from_millis(100));
        let cancelled = tokio::select! {
            () = tokio::time::sleep(takes) => false,
            () = cancel.cancelled() => true,
        };
        self.ran.lock().unwrap().push(Ran {
            job: run.job.clone(),
            attempt: run.attempt,
            start,
            end: self.clock.now(),
            cancelled,
        });
        if cancelled {
            return Attempt::Interrupted;
        }
        let next = {
            let mut s = self.script.lock().unwrap();
            let steps = s.entry(run.job.clone()).or_default();
            if steps.is_empty() {
                Script::Ok
            } else {
                steps.remove(0)
            }
        };
        match next {
            Script::Ok => Attempt::Done {
                outcome: Outcome::Success,
                report: run.attempt,
                then: (run.kind == RunKind::Backup && run.job.starts_with("retained"))
                    .then_some(RunKind::Prune),
            },
            Script::Retryable => Attempt::Failed {
                error: "connection reset".into(),
                retryable: true,
            },
            Script::Permanent => Attempt::Failed {
                error: "password authentication failed".into(),
                retryable: false,
            },
        }
    }
}

/// A tick the ledger recorded: to run, or recorded as skipped.
#[derive(Debug, Clone)]
struct Tick {
    job: String,
    kind: RunKind,
    at: DateTime<Utc>,
    skipped: bool,
}

/// A pending run a claim took: job, kind, and the tick it was scheduled
/// for (None: a follow-up queued with its parent's release).
type Taken = (String, RunKind, Option<DateTime<Utc>>);

#[derive(Clone, Default)]
struct FakeLedger {
    last: Arc<Mutex<HashMap<String, DateTime<Utc>>>>,
    refuse: Arc<Mutex<Option<String>>>,
    claims: Arc<Mutex<Vec<(String, bool)>>>,
    /// A shared ledger, which behaves like a fleet's catalog (see
    /// `FleetLedger` in the fleet crate): ticks are recorded, and a claim
    /// must find a pending run (see `claim`).
    shared: bool,
    /// Every tick recorded (shared).
    ticks: Arc<Mutex<Vec<Tick>>>,
    /// Follow-ups queued with their parent's release (job, kind), each
    /// waiting for a claim (shared).
    follow_ups: Arc<Mutex<Vec<(String, RunKind)>>>,
    /// The pending runs claims took, in order (shared).
    taken: Arc<Mutex<Vec<Taken>>>,
    /// Whether a claim finds the job running elsewhere.
    elsewhere: Arc<Mutex<bool>>,
}

impl FakeLedger {
    /// A backup tick of `job` the fleet recorded before the test and that
    /// no claim took yet.
    fn pending_tick(&self, job: &str, at: DateTime<Utc>) {
        self.ticks.lock().unwrap().push(Tick {
            job: job.into(),
            kind: RunKind::Backup,
            at,
            skipped: false,
        });
    }

    /// A backup tick of `job` the fleet recorded and ran before the test.
    fn past_tick(&self, job: &str, at: DateTime<Utc>) {
        self.pending_tick(job, at);
        self.taken
            .lock()
            .unwrap()
            .push((job.into(), RunKind::Backup, Some(at)));
    }

    /// The oldest tick of `job`'s `kind` recorded to run that no claim
    /// took yet.
    fn oldest_pending_tick(&self, job: &str, kind: RunKind) -> Option<DateTime<Utc>> {
        let taken = self.taken.lock().unwrap().clone();
        self.ticks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.job == job && t.kind == kind && !t.skipped)
            .map(|t| t.at)
            .filter(|at| !taken.contains(&(job.to_string(), kind, Some(*at))))
            .min()
    }

    /// Takes a pending run of `job`'s `kind`: the oldest pending tick, else
    /// a queued follow-up. None: nothing is pending.
    fn take_pending(&self, job: &str, kind: RunKind) -> Option<Taken> {
        let took = match self.oldest_pending_tick(job, kind) {
            Some(at) => (job.to_string(), kind, Some(at)),
            None => {
                let mut queued = self.follow_ups.lock().unwrap();
                let i = queued.iter().position(|q| q.0 == job && q.1 == kind)?;
                queued.remove(i);
                (job.to_string(), kind, None)
            }
        };
        self.taken.lock().unwrap().push(took.clone());
        Some(took)
    }
}

impl Ledger for FakeLedger {
    async fn last_success(&self, job: &str, _: RunKind) -> Result<Option<DateTime<Utc>>, String> {
        Ok(self.last.lock().unwrap().get(job).copied())
    }
    fn shared(&self) -> bool {
        self.shared
    }
    async fn record_tick(&self, job: &str, kind: RunKind, at: DateTime<Utc>) {
        // A catalog's round trip: whatever was started before this call
        // gets to run before the tick is recorded.
        tokio::task::yield_now().await;
        self.ticks.lock().unwrap().push(Tick {
            job: job.into(),
            kind,
            at,
            skipped: false,
        });
    }
    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, String> {
        Ok(self
            .ticks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.job == job && t.kind == kind && t.at <= at_or_before)
            .map(|t| t.at)
            .max())
    }
    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Option<Vec<DateTime<Utc>>>, String> {
        let mut v: Vec<DateTime<Utc>> = self
            .ticks
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.job == job && t.kind == kind && t.at >= from && t.at <= to)
            .map(|t| t.at)
            .collect();
        v.sort_unstable();
        v.dedup();
        Ok(Some(v))
    }
    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: Vec<DateTime<Utc>>,
        _why: String,
    ) -> Result<(), String> {
        let mut all = self.ticks.lock().unwrap();
        all.extend(ticks.into_iter().map(|at| Tick {
            job: job.into(),
            kind,
            at,
            skipped: true,
        }));
        Ok(())
    }
    async fn claim(&self, run: &RunCtx) -> Result<Option<crate::Claim>, crate::ClaimError> {
        self.claims.lock().unwrap().push((run.job.clone(), true));
        if *self.elsewhere.lock().unwrap() {
            return Err(crate::ClaimError::Elsewhere);
        }
        if let Some(why) = self.refuse.lock().unwrap().clone() {
            return Err(crate::ClaimError::Failed(why));
        }
        if !self.shared {
            return Ok(None);
        }
        // Like `FleetLedger::claim`: a run asked for through this node's
        // API is a new run of its own (the catalog's `claim_now`); any other
        // takes a pending run of its job and kind (a recorded tick, a
        // follow-up queued with its parent's release), and without one
        // there is nothing to claim, so a run claimed before its tick was
        // recorded never runs.
        let scheduled_for = if run.trigger == Trigger::Api {
            None
        } else {
            let Some((_, _, at)) = self.take_pending(&run.job, run.kind) else {
                return Err(crate::ClaimError::Elsewhere);
            };
            at
        };
        let n = self.claims.lock().unwrap().len();
        Ok(Some(crate::Claim {
            run: i64::try_from(n).unwrap(),
            attempt: 1,
            node: "this node".into(),
            scheduled_for,
        }))
    }
    async fn release(&self, run: &RunCtx, ending: crate::Ending<'_>) {
        if self.shared {
            // A catalog's round trip, as for a tick: a follow-up that
            // claimed before its parent's release was recorded would find
            // nothing to claim.
            tokio::task::yield_now().await;
        }
        self.claims.lock().unwrap().push((run.job.clone(), false));
        // Like the fleet's catalog: a claimed run's follow-up is queued with
        // its release, for any node to claim, unless a run of the job and
        // kind is already pending (one waits at most).
        if let (Some(_), crate::Ending::Done(_, Some(kind))) = (&run.claim, ending)
            && self.oldest_pending_tick(&run.job, kind).is_none()
        {
            let mut queued = self.follow_ups.lock().unwrap();
            if !queued.iter().any(|q| q.0 == run.job && q.1 == kind) {
                queued.push((run.job.clone(), kind));
            }
        }
    }
}

type Events = Arc<Mutex<Vec<Event<u32>>>>;

struct World {
    clock: FakeClock,
    runner: FakeRunner,
    ledger: FakeLedger,
    events: Events,
    s: Scheduler<FakeRunner, FakeLedger, FakeClock>,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

fn world(max: usize, runner: impl FnOnce(FakeRunner) -> FakeRunner) -> World {
    world_with(max, runner, FakeLedger::default())
}

fn world_with(
    max: usize,
    runner: impl FnOnce(FakeRunner) -> FakeRunner,
    ledger: FakeLedger,
) -> World {
    let clock = FakeClock::at(t0());
    let runner = runner(FakeRunner::new(&clock));
    let events: Events = Arc::default();
    let sink = events.clone();
    let s = Scheduler::new(
        runner.clone(),
        ledger.clone(),
        clock.clone(),
        max,
        move |e| sink.lock().unwrap().push(e),
    );
    World {
        clock,
        runner,
        ledger,
        events,
        s,
    }
}

fn entry(job: &str, timetable: Option<Arc<dyn Timetable>>) -> Entry {
    Entry {
        job: job.into(),
        kind: RunKind::Backup,
        timetable,
        retries: 0,
        backoff: Duration::from_secs(5),
        catch_up: false,
    }
}

fn every(secs: i64) -> Option<Arc<dyn Timetable>> {
    Some(Arc::new(Every(secs)))
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

/// What `f` picks out of the events, in order.
fn picked<T>(events: &Events, f: impl Fn(&Event<u32>) -> Option<T>) -> Vec<T> {
    events.lock().unwrap().iter().filter_map(f).collect()
}

fn finished(events: &Events) -> Vec<(String, Outcome, u32, Option<String>)> {
    picked(events, |e| match e {
        Event::Finished {
            job,
            outcome,
            attempts,
            error,
            ..
        } => Some((job.clone(), *outcome, *attempts, error.clone())),
        _ => None,
    })
}

fn count(events: &Events, f: impl Fn(&Event<u32>) -> bool) -> usize {
    events.lock().unwrap().iter().filter(|e| f(e)).count()
}

fn secs(w: &World, t: DateTime<Utc>) -> i64 {
    let _ = w;
    (t - t0()).num_seconds()
}

#[tokio::test(start_paused = true)]
async fn fires_at_each_fire_time_and_reports_the_next() {
    let w = world(2, |r| r.takes("app", Duration::from_secs(1)));
    w.s.set_entries(vec![entry("app", every(10))]);
    advance(Duration::from_secs(35)).await;
    let starts: Vec<i64> = w.runner.ran().iter().map(|r| secs(&w, r.start)).collect();
    assert_eq!(starts, [10, 20, 30]);
    assert_eq!(finished(&w.events).len(), 3);
    let next: Vec<i64> = picked(&w.events, |e| match e {
        Event::NextRun { at, .. } => Some(secs(&w, *at)),
        _ => None,
    });
    assert_eq!(next, [10, 20, 30, 40]);
}

#[tokio::test(start_paused = true)]
async fn a_run_longer_than_the_interval_is_never_overlapped_and_the_skips_are_reported() {
    let w = world(2, |r| r.takes("slow", Duration::from_millis(3500)));
    w.s.set_entries(vec![entry("slow", every(1))]);
    // Runs at 1–4.5 s, 5–8.5 s, 9–12.5 s; the ticks between are skipped.
    advance(Duration::from_secs(14)).await;
    let ran = w.runner.ran();
    assert!(ran.len() >= 3, "{ran:?}");
    for pair in ran.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlap: {pair:?}");
    }
    let skipped = count(&w.events, |e| {
        matches!(
            e,
            Event::Skipped {
                trigger: Trigger::Schedule,
                ..
            }
        )
    });
    assert!(skipped >= 6, "{skipped}");
    // A manual trigger while one goes is refused with that run's id.
    let running = w.s.running("slow", RunKind::Backup);
    if let Some(id) = running {
        assert_eq!(
            w.s.trigger("slow", RunKind::Backup, Trigger::Api),
            Err(TriggerError::AlreadyRunning(id))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn runs_wait_for_a_free_slot() {
    let w = world(1, |r| {
        r.takes("a", Duration::from_secs(10))
            .takes("b", Duration::from_secs(10))
    });
    w.s.set_entries(vec![entry("a", None), entry("b", None)]);
    let a = w.s.trigger("a", RunKind::Backup, Trigger::Api).unwrap();
    let b = w.s.trigger("b", RunKind::Backup, Trigger::Api).unwrap();
    assert_ne!(a, b);
    advance(Duration::from_secs(25)).await;
    let ran = w.runner.ran();
    assert_eq!(ran.len(), 2);
    assert_eq!(secs(&w, ran[0].start), 0);
    assert_eq!(secs(&w, ran[1].start), 10, "b waited for a's slot");
    assert_eq!(
        count(
            &w.events,
            |e| matches!(e, Event::WaitingForSlot { job, max: 1, .. } if job == "b")
        ),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_a_doubling_backoff() {
    let w = world(2, |r| {
        r.takes("app", Duration::from_secs(1))
            .script("app", &[Script::Retryable, Script::Retryable, Script::Ok])
    });
    let mut e = entry("app", None);
    e.retries = 2;
    w.s.set_entries(vec![e]);
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(60)).await;
    let starts: Vec<i64> = w.runner.ran().iter().map(|r| secs(&w, r.start)).collect();
    // 1 s attempt, 5 s wait, 1 s, 10 s wait, 1 s.
    assert_eq!(starts, [0, 6, 17]);
    let waits: Vec<Duration> = picked(&w.events, |e| match e {
        Event::Retrying { wait, .. } => Some(*wait),
        _ => None,
    });
    assert_eq!(waits, [Duration::from_secs(5), Duration::from_secs(10)]);
    assert_eq!(
        finished(&w.events),
        [("app".to_string(), Outcome::Success, 3, None)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_failure_is_not_retried_and_retries_run_out() {
    let w = world(2, |r| {
        r.script("denied", &[Script::Permanent])
            .script("flaky", &[Script::Retryable; 5])
    });
    let mut denied = entry("denied", None);
    denied.retries = 3;
    let mut flaky = entry("flaky", None);
    flaky.retries = 1;
    w.s.set_entries(vec![denied, flaky]);
    w.s.trigger("denied", RunKind::Backup, Trigger::Api)
        .unwrap();
    w.s.trigger("flaky", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(60)).await;
    let mut f = finished(&w.events);
    f.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        f,
        [
            (
                "denied".to_string(),
                Outcome::Failed,
                1,
                Some("password authentication failed".to_string())
            ),
            (
                "flaky".to_string(),
                Outcome::Failed,
                2,
                Some("connection reset".to_string())
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn catch_up_runs_once_for_a_stale_or_never_successful_job_only() {
    let w = world(4, |r| r);
    let daily = || every(86_400);
    let mut stale = entry("stale", daily());
    stale.catch_up = true;
    let mut fresh = entry("fresh", daily());
    fresh.catch_up = true;
    let mut never = entry("never", daily());
    never.catch_up = true;
    let off = entry("off", daily());
    {
        let mut last = w.ledger.last.lock().unwrap();
        last.insert("stale".into(), t0() - chrono::Duration::days(3));
        last.insert("fresh".into(), t0() - chrono::Duration::hours(2));
        last.insert("off".into(), t0() - chrono::Duration::days(30));
    }
    w.s.set_entries(vec![stale, fresh, never, off]);
    w.s.catch_up().await;
    advance(Duration::from_secs(60)).await;
    let mut jobs: Vec<String> = w.runner.ran().into_iter().map(|r| r.job).collect();
    jobs.sort();
    assert_eq!(jobs, ["never", "stale"]);
    assert_eq!(
        count(&w.events, |e| matches!(
            e,
            Event::Queued {
                trigger: Trigger::CatchUp,
                ..
            }
        )),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_adds_and_removes_entries_without_touching_a_run_going() {
    let w = world(2, |r| r.takes("old", Duration::from_secs(30)));
    w.s.set_entries(vec![entry("old", every(10))]);
    advance(Duration::from_secs(11)).await;
    assert_eq!(w.runner.ran().len(), 0, "old's run is still going");
    assert!(w.s.running("old", RunKind::Backup).is_some());
    w.s.set_entries(vec![entry("new", every(10))]);
    advance(Duration::from_secs(40)).await;
    let ran = w.runner.ran();
    // old's run finished as it started; old never fired again; new did.
    let old: Vec<&Ran> = ran.iter().filter(|r| r.job == "old").collect();
    assert_eq!(old.len(), 1);
    assert!(!old[0].cancelled);
    let new: Vec<i64> = ran
        .iter()
        .filter(|r| r.job == "new")
        .map(|r| secs(&w, r.start))
        .collect();
    assert_eq!(new, [20, 30, 40, 50]);
    assert_eq!(
        w.s.trigger("old", RunKind::Backup, Trigger::Api),
        Err(TriggerError::UnknownJob)
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_run_finish_within_the_grace() {
    let w = world(2, |r| r.takes("app", Duration::from_secs(3)));
    w.s.set_entries(vec![entry("app", every(3600))]);
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(1)).await;
    let drain =
        w.s.shutdown(Duration::from_secs(60), Duration::from_secs(60))
            .await;
    assert_eq!(
        drain,
        Drain {
            running: 1,
            cancelled: false,
            stuck: 0
        }
    );
    assert_eq!(finished(&w.events)[0].1, Outcome::Success);
    assert_eq!(
        w.s.trigger("app", RunKind::Backup, Trigger::Api),
        Err(TriggerError::ShuttingDown)
    );
    // The schedule stopped: nothing fires at the next hour.
    advance(Duration::from_secs(7200)).await;
    assert_eq!(w.runner.ran().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_runs_after_the_grace_and_queued_ones_never_start() {
    let w = world(1, |r| {
        r.takes("long", Duration::from_secs(600))
            .takes("queued", Duration::from_secs(1))
    });
    w.s.set_entries(vec![entry("long", None), entry("queued", None)]);
    w.s.trigger("long", RunKind::Backup, Trigger::Api).unwrap();
    w.s.trigger("queued", RunKind::Backup, Trigger::Api)
        .unwrap();
    advance(Duration::from_secs(1)).await;
    let before = w.clock.now();
    let drain =
        w.s.shutdown(Duration::from_secs(5), Duration::from_secs(60))
            .await;
    assert_eq!(
        drain,
        Drain {
            running: 2,
            cancelled: true,
            stuck: 0
        }
    );
    assert_eq!(
        (w.clock.now() - before).num_seconds(),
        5,
        "cancelled at the end of the grace"
    );
    let ran = w.runner.ran();
    assert_eq!(ran.len(), 1, "the queued run never started: {ran:?}");
    assert!(ran[0].cancelled);
    let mut f = finished(&w.events);
    f.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(f[0].1, Outcome::Interrupted);
    assert_eq!(f[1].1, Outcome::Interrupted);
}

#[tokio::test(start_paused = true)]
async fn a_clock_stepped_back_never_fires_early_or_twice() {
    let w = world(2, |r| r);
    let at = t0() + chrono::Duration::seconds(100);
    w.s.set_entries(vec![entry("app", Some(Arc::new(Once(at))))]);
    advance(Duration::from_secs(50)).await;
    // NTP steps the wall clock back an hour while the loop sleeps.
    w.clock.step(chrono::Duration::hours(-1));
    advance(Duration::from_secs(60)).await;
    assert!(
        w.runner.ran().is_empty(),
        "fired early: {:?}",
        w.runner.ran()
    );
    advance(Duration::from_secs(3600)).await;
    let ran = w.runner.ran();
    assert_eq!(ran.len(), 1);
    assert!(ran[0].start >= at);
    assert_eq!(
        count(&w.events, |e| matches!(e, Event::ScheduleEnded { .. })),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_claim_fails_the_run_without_running_it_and_each_claim_is_released() {
    let w = world(2, |r| r);
    w.s.set_entries(vec![entry("app", None)]);
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(1)).await;
    *w.ledger.refuse.lock().unwrap() = Some("held by pid 4242".into());
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(1)).await;
    assert_eq!(w.runner.ran().len(), 1);
    let f = finished(&w.events);
    assert_eq!(
        f[1],
        (
            "app".to_string(),
            Outcome::Failed,
            0,
            Some("held by pid 4242".into())
        )
    );
    assert_eq!(
        *w.ledger.claims.lock().unwrap(),
        [
            ("app".to_string(), true),
            ("app".to_string(), false),
            ("app".to_string(), true)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn kinds_of_one_job_are_independent_and_unknown_ones_are_refused() {
    let w = world(2, |r| r.takes("app", Duration::from_secs(5)));
    let mut verify = entry("app", None);
    verify.kind = RunKind::Verify;
    w.s.set_entries(vec![entry("app", None), verify]);
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    w.s.trigger("app", RunKind::Verify, Trigger::Api).unwrap();
    assert_eq!(
        w.s.trigger("app", RunKind::Prune, Trigger::AfterBackup),
        Err(TriggerError::UnknownJob)
    );
    advance(Duration::from_secs(10)).await;
    let ran = w.runner.ran();
    assert_eq!(ran.len(), 2);
    assert_eq!(
        ran[0].start, ran[1].start,
        "backup and verify ran side by side"
    );
    assert_eq!(w.s.busy(), 0);
    let report: Vec<Option<u32>> = picked(&w.events, |e| match e {
        Event::Finished { report, .. } => Some(*report),
        _ => None,
    });
    assert_eq!(
        report,
        [Some(1), Some(1)],
        "the runner's report reaches the observer"
    );
    let _ = ran.iter().map(|r| r.attempt).sum::<u32>();
}

#[tokio::test(start_paused = true)]
async fn a_follow_up_run_is_queued_before_its_parent_ends_even_while_draining() {
    let w = world(1, |r| r.takes("retained", Duration::from_secs(3)));
    let mut prune = entry("retained", None);
    prune.kind = RunKind::Prune;
    w.s.set_entries(vec![entry("retained", None), prune]);
    w.s.trigger("retained", RunKind::Backup, Trigger::Api)
        .unwrap();
    advance(Duration::from_secs(1)).await;
    // The backup ends during the drain; its prune still runs within the grace.
    let drain =
        w.s.shutdown(Duration::from_secs(60), Duration::from_secs(60))
            .await;
    assert!(!drain.cancelled);
    let ran = w.runner.ran();
    assert_eq!(ran.len(), 2, "{ran:?}");
    assert!(ran[0].end <= ran[1].start, "one slot: the prune waited");
    let queued: Vec<(RunKind, Trigger)> = picked(&w.events, |e| match e {
        Event::Queued { kind, trigger, .. } => Some((*kind, *trigger)),
        _ => None,
    });
    assert_eq!(
        queued,
        [
            (RunKind::Backup, Trigger::Api),
            (RunKind::Prune, Trigger::AfterBackup)
        ]
    );
    // Asked for by hand during the drain, it is refused.
    assert_eq!(
        w.s.trigger("retained", RunKind::Prune, Trigger::Api),
        Err(TriggerError::ShuttingDown)
    );
}

/// Real cron fire times in a real zone (what the daemon's timetable adapts).
struct CronIn(croner::Cron, chrono_tz::Tz);

impl Timetable for CronIn {
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0
            .find_next_occurrence(&after.with_timezone(&self.1), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[tokio::test(start_paused = true)]
async fn a_daily_job_runs_once_a_day_across_both_dst_changes() {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse("30 2 * * *")
        .unwrap();
    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    let w = world(1, |r| r.takes("app", Duration::from_secs(60)));
    w.s.set_entries(vec![entry("app", Some(Arc::new(CronIn(cron, berlin))))]);
    // From 2026-03-01 to 2026-10-27 on the paused clock: both changes.
    let until = Utc.with_ymd_and_hms(2026, 10, 27, 3, 0, 0).unwrap();
    advance((until - t0()).to_std().unwrap()).await;
    let starts: Vec<String> = w
        .runner
        .ran()
        .iter()
        .map(|r| r.start.format("%Y-%m-%dT%H:%MZ").to_string())
        .collect();
    let around = |from: &str, to: &str| -> Vec<&str> {
        starts
            .iter()
            .map(String::as_str)
            .filter(|s| *s >= from && *s < to)
            .collect()
    };
    // Spring: 02:30 does not exist on 03-29; it runs once, at 03:00 CEST.
    assert_eq!(
        around("2026-03-28", "2026-03-31"),
        [
            "2026-03-28T01:30Z",
            "2026-03-29T01:00Z",
            "2026-03-30T00:30Z"
        ]
    );
    // Autumn: 02:30 happens twice on 10-25; it runs once, the first.
    assert_eq!(
        around("2026-10-24", "2026-10-27"),
        [
            "2026-10-24T00:30Z",
            "2026-10-25T00:30Z",
            "2026-10-26T01:30Z"
        ]
    );
    // One run a day, every day, none skipped or doubled.
    // 2026-03-01 to 2026-10-27, both included.
    let days = (until.date_naive() - t0().date_naive()).num_days() as usize + 1;
    assert_eq!(starts.len(), days, "{starts:?}");
    let mut distinct: Vec<&str> = starts.iter().map(|s| &s[..10]).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), days);
}

/// The ticks of `job` claims took, in order, in seconds from t0 (None: a
/// follow-up).
fn taken(w: &World, job: &str) -> Vec<Option<i64>> {
    w.ledger
        .taken
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.0 == job)
        .map(|t| t.2.map(|at| secs(w, at)))
        .collect()
}

fn shared() -> FakeLedger {
    FakeLedger {
        shared: true,
        ..FakeLedger::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_ledger_gets_each_tick_before_the_run_is_claimed() {
    // A claim finds only ticks already recorded, so a fire loop that
    // claimed before recording its tick would run nothing.
    let w = world_with(2, |r| r.takes("app", Duration::from_secs(1)), shared());
    w.s.set_entries(vec![entry("app", every(10))]);
    advance(Duration::from_secs(25)).await;
    let ticks: Vec<(i64, bool)> = w
        .ledger
        .ticks
        .lock()
        .unwrap()
        .iter()
        .map(|t| (secs(&w, t.at), t.skipped))
        .collect();
    assert_eq!(ticks, [(10, false), (20, false)]);
    assert_eq!(w.runner.ran().len(), 2);
    let taken: Vec<Option<i64>> = w
        .ledger
        .taken
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.2.map(|at| secs(&w, at)))
        .collect();
    assert_eq!(
        taken,
        [Some(10), Some(20)],
        "each run claimed its own, recorded tick"
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_another_node_claimed_runs_nothing_here_and_reports_no_outcome() {
    let w = world_with(2, |r| r.takes("app", Duration::from_secs(1)), shared());
    // Another node recorded a tick of the job (what a fleet trigger is
    // for), and runs the job now.
    w.ledger.pending_tick("app", t0());
    *w.ledger.elsewhere.lock().unwrap() = true;
    w.s.set_entries(vec![entry("app", None)]);
    w.s.trigger("app", RunKind::Backup, Trigger::Fleet).unwrap();
    advance(Duration::from_secs(2)).await;
    assert!(w.runner.ran().is_empty());
    assert!(
        finished(&w.events).is_empty(),
        "no Finished for a run not ours"
    );
    assert_eq!(
        count(&w.events, |e| matches!(e, Event::ClaimedElsewhere { .. })),
        1
    );
    // The job is free again: the next trigger is accepted, and its run
    // takes the pending tick.
    *w.ledger.elsewhere.lock().unwrap() = false;
    w.s.trigger("app", RunKind::Backup, Trigger::Fleet).unwrap();
    advance(Duration::from_secs(2)).await;
    assert_eq!(w.runner.ran().len(), 1);
    assert_eq!(taken(&w, "app"), [Some(0)]);
}

#[tokio::test(start_paused = true)]
async fn catch_up_with_a_shared_ledger_runs_the_newest_missed_tick_and_skips_the_rest() {
    let w = world_with(2, |r| r.takes("app", Duration::from_secs(1)), shared());
    // The fleet last recorded (and ran) a tick 55 s ago; ticks every 10 s
    // since.
    w.ledger
        .past_tick("app", t0() - chrono::Duration::seconds(55));
    w.s.set_entries(vec![entry("app", every(10)), entry("new", every(10))]);
    w.s.catch_up().await;
    advance(Duration::from_secs(2)).await;
    let ticks = w.ledger.ticks.lock().unwrap().clone();
    let of = |job: &str, skipped: bool| -> Vec<i64> {
        let mut v: Vec<i64> = ticks
            .iter()
            .filter(|t| t.job == job && t.skipped == skipped)
            .map(|t| secs(&w, t.at))
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(of("app", true), [-50, -40, -30, -20, -10]);
    assert_eq!(of("app", false), [-55, 0]);
    // A job new to the fleet is not backfilled: its latest tick is skipped.
    assert_eq!(of("new", true), [0]);
    assert!(of("new", false).is_empty());
    let ran: Vec<String> = w.runner.ran().iter().map(|r| r.job.clone()).collect();
    assert_eq!(ran, ["app"]);
    assert_eq!(
        taken(&w, "app"),
        [Some(-55), Some(0)],
        "the catch-up run took the tick catch-up recorded"
    );
}

/// Regression (issue 28, item 3): a tick every node failed to record (a
/// catalog failover at 02:00) was never seen again, because catch-up only
/// looked after the newest recorded tick. Now a gap before it is skipped
/// with its reason, and the newest missed tick runs.
#[tokio::test(start_paused = true)]
async fn catch_up_finds_a_tick_nobody_recorded_before_the_newest_one() {
    let w = world_with(2, |r| r.takes("app", Duration::from_secs(1)), shared());
    for at in [-40, -30, -10] {
        w.ledger
            .past_tick("app", t0() + chrono::Duration::seconds(at));
    }
    w.s.set_entries(vec![entry("app", every(10))]);
    w.s.catch_up().await;
    advance(Duration::from_secs(2)).await;
    let ticks = w.ledger.ticks.lock().unwrap().clone();
    let of = |skipped: bool| -> Vec<i64> {
        let mut v: Vec<i64> = ticks
            .iter()
            .filter(|t| t.skipped == skipped)
            .map(|t| secs(&w, t.at))
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(of(true), [-20], "the gap is recorded as skipped");
    assert_eq!(of(false), [-40, -30, -10, 0], "the newest missed tick runs");
    assert_eq!(
        taken(&w, "app"),
        [Some(-40), Some(-30), Some(-10), Some(0)],
        "the catch-up run took the tick catch-up recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_slower_than_a_tick_loses_no_tick_and_skips_only_ticks_before_the_start() {
    let w = world_with(2, |r| r.takes("app", Duration::from_secs(1)), shared());
    // The fleet last recorded (and ran) a tick of "old" 25 s ago.
    w.ledger
        .past_tick("old", t0() - chrono::Duration::seconds(25));
    w.s.set_entries(vec![entry("new", every(10)), entry("old", every(10))]);
    // The start is slow (the daemon seeds its metrics, the catalog is
    // busy): two ticks fire before catch-up runs.
    advance(Duration::from_secs(25)).await;
    w.s.catch_up().await;
    advance(Duration::from_secs(2)).await;
    let ticks = w.ledger.ticks.lock().unwrap().clone();
    let of = |job: &str, skipped: bool| -> Vec<i64> {
        let mut v: Vec<i64> = ticks
            .iter()
            .filter(|t| t.job == job && t.skipped == skipped)
            .map(|t| secs(&w, t.at))
            .collect();
        v.sort_unstable();
        v
    };
    // Catch-up covers what came before the start, the fire loops the rest.
    assert_eq!(of("new", true), [0], "the new job's tick before the start");
    assert_eq!(of("new", false), [10, 20]);
    assert_eq!(of("old", true), [-20, -10]);
    assert_eq!(of("old", false), [-25, 0, 10, 20]);
    // Each run took its own tick: the fire loops' first, then catch-up's.
    assert_eq!(taken(&w, "new"), [Some(10), Some(20)]);
    assert_eq!(taken(&w, "old"), [Some(-25), Some(10), Some(20), Some(0)]);
}

#[tokio::test(start_paused = true)]
async fn a_follow_up_with_a_shared_ledger_claims_the_run_its_parent_queued() {
    // Two slots: the follow-up waits for nothing but its parent's release.
    let w = world_with(2, |r| r, shared());
    let mut prune = entry("retained", None);
    prune.kind = RunKind::Prune;
    w.s.set_entries(vec![entry("retained", None), prune]);
    // Asked for through this node's API: a run of its own, no tick needed.
    w.s.trigger("retained", RunKind::Backup, Trigger::Api)
        .unwrap();
    advance(Duration::from_secs(1)).await;
    let ran: Vec<String> = w.runner.ran().iter().map(|r| r.job.clone()).collect();
    assert_eq!(ran, ["retained", "retained"], "the backup, then its prune");
    let done: Vec<(RunKind, Trigger, Outcome)> = picked(&w.events, |e| match e {
        Event::Finished {
            kind,
            trigger,
            outcome,
            ..
        } => Some((*kind, *trigger, *outcome)),
        _ => None,
    });
    assert_eq!(
        done,
        [
            (RunKind::Backup, Trigger::Api, Outcome::Success),
            (RunKind::Prune, Trigger::AfterBackup, Outcome::Success)
        ]
    );
    // The prune took the run the backup's release queued, and only it.
    assert_eq!(
        *w.ledger.taken.lock().unwrap(),
        [("retained".to_string(), RunKind::Prune, None)]
    );
    assert!(w.ledger.follow_ups.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn abandoned_runs_end_interrupted_and_the_scheduler_goes_on() {
    let w = world(2, |r| r.takes("app", Duration::from_secs(30)));
    w.s.set_entries(vec![entry("app", None)]);
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(1)).await;
    w.s.abandon_runs();
    advance(Duration::from_secs(1)).await;
    let done = finished(&w.events);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, Outcome::Interrupted);
    assert!(done[0].3.as_deref().unwrap().contains("lease"), "{done:?}");
    assert!(!w.s.stopping());
    w.s.trigger("app", RunKind::Backup, Trigger::Api).unwrap();
    advance(Duration::from_secs(31)).await;
    assert_eq!(finished(&w.events)[1].1, Outcome::Success);
}

#[test]
fn fire_times_are_found_without_walking_a_long_gap_tick_by_tick() {
    let now = t0() + chrono::Duration::milliseconds(500);
    // Every second for a year back: found in the first minute looked at.
    assert_eq!(
        crate::last_fire_time(&Every(1), now, chrono::Duration::days(366)),
        Some(t0())
    );
    // Daily: further back than a minute or an hour.
    let daily = crate::last_fire_time(&Every(86_400), now, chrono::Duration::days(366)).unwrap();
    assert!(now - daily < chrono::Duration::days(1) && daily <= now);
    // A year of per-second ticks: only the newest `limit` are walked.
    let missed = crate::fire_times_between(&Every(1), now - chrono::Duration::days(365), now, 5);
    let secs: Vec<i64> = missed.iter().map(|t| (*t - t0()).num_seconds()).collect();
    assert_eq!(secs, [-4, -3, -2, -1, 0]);
}
