//! The simulated fleet: the real scheduler, node and ledger code on
//! several nodes, a simulated clock (tokio's, paused: it jumps to the next
//! timer when every task waits) and the simulated catalog behind
//! [`FaultyCatalog`]s, with crashes, pauses and failovers drawn from one
//! seed. Everything that happens goes through [`Checker`], which holds the
//! fleet's invariants after every step and at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_scheduler::{
    Attempt, Clock, Entry, Outcome, RunCtx, RunKind, Runner, Scheduler, Timetable,
};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::catalog::SimCatalog;
use super::faults::{CatalogGate, Faults, FaultyCatalog, NodeGate, Rng};
use crate::catalog::{ClaimableEntry, FleetCatalog, NodeInfo};
use crate::ledger::{Attempts, FleetLedger};
use crate::node::{FleetNode, NoHooks};

/// One simulation's shape.
#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    pub jobs: usize,
    pub days: u32,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub max_concurrent: usize,
    pub faults: Faults,
    /// Per node and day.
    pub crashes_per_day: f64,
    pub pauses_per_day: f64,
    /// For the whole catalog, per day.
    pub failovers_per_day: f64,
    /// `daemon.catalog_history`: each node deletes the runs that ended
    /// longer ago than this, as the daemon does.
    pub history: Duration,
}

impl Params {
    /// What CI runs for each seed.
    pub fn ci() -> Self {
        Self {
            nodes: 4,
            jobs: 60,
            days: 10,
            lease: Duration::from_secs(120),
            heartbeat: Duration::from_secs(30),
            max_concurrent: 4,
            faults: Faults {
                error: 0.01,
                lost_reply: 0.005,
                slow: 0.01,
                slow_for: (Duration::from_millis(50), Duration::from_secs(90)),
                crash: 0.0003,
            },
            crashes_per_day: 0.15,
            pauses_per_day: 0.3,
            failovers_per_day: 0.3,
            // The least the configuration allows: the most deleted.
            history: Duration::from_secs(24 * 3600),
        }
    }

    /// The full shape: 5 nodes, 200 jobs, 30 days.
    pub fn full() -> Self {
        Self {
            nodes: 5,
            jobs: 200,
            days: 30,
            ..Self::ci()
        }
    }

    /// Nothing goes wrong: the protocol alone.
    pub fn calm() -> Self {
        Self {
            faults: Faults::NONE,
            crashes_per_day: 0.0,
            pauses_per_day: 0.0,
            failovers_per_day: 0.0,
            ..Self::ci()
        }
    }
}

/// Where the simulated time starts.
pub fn epoch() -> DateTime<Utc> {
    // 2026-03-01T00:00:00Z
    DateTime::from_timestamp(1_772_323_200, 0).unwrap_or_default()
}

thread_local! {
    /// When the simulation on this thread began (for log stamps).
    static STARTED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The simulated time of the simulation running on this thread.
pub fn sim_now() -> DateTime<Utc> {
    STARTED
        .with(|s| s.get())
        .map_or_else(epoch, |start| SimTime { start }.now())
}

/// The simulation's time, shared by the catalog and (with a skew) the nodes.
#[derive(Clone)]
pub struct SimTime {
    start: Instant,
}

impl SimTime {
    pub fn now(&self) -> DateTime<Utc> {
        epoch() + chrono::TimeDelta::from_std(self.start.elapsed()).unwrap_or_default()
    }
}

/// A node's clock: the simulation's, off by a skew.
struct SkewClock {
    time: SimTime,
    skew: chrono::TimeDelta,
}

impl Clock for SkewClock {
    fn now(&self) -> DateTime<Utc> {
        self.time.now() + self.skew
    }
}

/// A job's schedule: every `interval` from `offset` past the epoch.
#[derive(Debug, Clone)]
struct Every {
    interval: chrono::TimeDelta,
    offset: chrono::TimeDelta,
}

impl Timetable for Every {
    fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let first = epoch() + self.offset;
        if after < first {
            return Some(first);
        }
        let n = (after - first).num_milliseconds() / self.interval.num_milliseconds() + 1;
        Some(first + self.interval * n as i32)
    }
}

/// The wait before a failed attempt's retry, doubled each time.
const BACKOFF: Duration = Duration::from_secs(60);

/// How long a prune takes.
const PRUNE_TAKES: Duration = Duration::from_secs(5);

/// One simulated job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    every: Every,
    /// How long its dumps take.
    pub duration: (Duration, Duration),
    pub retries: u32,
    pub retention: bool,
    pub starting_deadline: Option<Duration>,
    /// How often a dump fails on its own (retryably).
    pub fail_rate: f64,
}

impl JobSpec {
    /// The longest a run of this job can take: every attempt at its
    /// slowest and every backoff between them.
    fn longest_run(&self) -> Duration {
        let backoffs: Duration = (0..self.retries).map(|k| BACKOFF * 2u32.pow(k)).sum();
        self.duration.1.max(PRUNE_TAKES) * (self.retries + 1) + backoffs
    }

    /// The most rows of this job the catalog may hold when it keeps
    /// `history`: a backup (and a prune, with retention) for each tick of
    /// the history, of the hours a
    /// pass may come late (a pass an hour, the first an hour after a node
    /// starts, a day of passes cut short by faults) and of its longest
    /// run; and the newest run of each kind and outcome, which stays.
    fn most_rows(&self, history: Duration) -> usize {
        let window = history
            + crate::history::EVERY
            + crate::history::FIRST
            + self.longest_run()
            + Duration::from_secs(24 * 3600);
        let interval = self
            .every
            .interval
            .to_std()
            .unwrap_or(Duration::from_secs(3600));
        let ticks = window.as_secs().div_ceil(interval.as_secs().max(1)) as usize;
        let kinds = 1 + usize::from(self.retention);
        kinds * (ticks + 1) + kinds * 5
    }

    fn fire_times(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = self
            .every
            .next_after(from - chrono::TimeDelta::milliseconds(1));
        while let Some(x) = t {
            if x > to {
                break;
            }
            out.push(x);
            t = self.every.next_after(x);
        }
        out
    }
}

fn jobs(rng: &mut Rng, n: usize) -> Vec<JobSpec> {
    (0..n)
        .map(|i| {
            let hours = [1, 1, 2, 6, 6, 12, 24, 24][rng.below(8) as usize];
            let interval = chrono::TimeDelta::hours(hours);
            let offset = chrono::TimeDelta::minutes(rng.below(60 * hours as u64) as i64);
            let i_secs = hours as u64 * 3600;
            // Most dumps take minutes; one job in ten takes longer than its
            // interval (its backlog is what coalescing is for).
            let duration = if rng.chance(0.1) {
                (
                    Duration::from_secs(i_secs),
                    Duration::from_secs(i_secs * 3 / 2),
                )
            } else {
                (
                    Duration::from_secs(30),
                    Duration::from_secs(60 + rng.below(1200)),
                )
            };
            JobSpec {
                name: format!("job{i:03}"),
                every: Every { interval, offset },
                duration,
                retries: rng.below(3) as u32,
                retention: rng.chance(0.7),
                // As operators set it (the shipped configmap says 2 h),
                // whatever the interval.
                starting_deadline: rng
                    .chance(0.3)
                    .then(|| Duration::from_secs([1800, 7200][rng.below(2) as usize])),
                fail_rate: if rng.chance(0.2) { 0.1 } else { 0.0 },
            }
        })
        .collect()
}

/// A broken invariant, with when and what.
#[derive(Debug, Clone)]
pub struct Violation {
    pub at: DateTime<Utc>,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at.to_rfc3339(), self.what)
    }
}

/// What a simulation did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub ticks: usize,
    pub published: usize,
    pub skipped: usize,
    pub failed: usize,
    pub prunes: usize,
    pub crashes: usize,
    pub pauses: usize,
    pub failovers: usize,
    /// Rows in the catalog at the end.
    pub rows: usize,
    /// The most rows the catalog held at any hour.
    pub max_rows: usize,
    /// Rows the history passes deleted.
    pub forgotten: usize,
}

/// A dump going on.
struct Dump {
    node: Arc<FleetNode>,
    cancel: CancellationToken,
    run: i64,
    /// The tick it runs for (None: asked for on demand).
    tick: Option<DateTime<Utc>>,
}

/// The invariants and what they are checked against.
pub struct Checker {
    time: SimTime,
    violations: Vec<Violation>,
    active: BTreeMap<String, Vec<Dump>>,
    published_runs: BTreeSet<i64>,
    published_ticks: BTreeMap<(String, DateTime<Utc>), i64>,
    published: Vec<(String, DateTime<Utc>)>,
    /// Runs whose dump started.
    started: BTreeSet<i64>,
    /// Runs reported as held too long.
    overheld: BTreeSet<i64>,
    /// Jobs already reported holding too many rows.
    overgrown: BTreeSet<String>,
    prunes: BTreeMap<String, Vec<DateTime<Utc>>>,
    /// Node id → when it crashed.
    crashed: BTreeMap<String, DateTime<Utc>>,
    summary: Summary,
}

impl Checker {
    fn violate(&mut self, what: String) {
        let at = self.time.now();
        if self.violations.len() < 20 {
            self.violations.push(Violation { at, what });
        }
    }

    fn dump_started(&mut self, job: &str, d: Dump) {
        let others = self.active.entry(job.to_string()).or_default();
        for o in others.iter() {
            if !o.cancel.is_cancelled() && o.node.trusted() {
                let what = format!(
                    "two dumps of {job} at once: run {} on node {} started while run {} on node {} still trusts its lease and goes on",
                    d.run,
                    d.node.id(),
                    o.run,
                    o.node.id()
                );
                self.violations.push(Violation {
                    at: self.time.now(),
                    what,
                });
            }
        }
        // Never an older tick's backup after a newer one was published.
        if let Some(t) = d.tick
            && let Some(((_, newer), by)) = self
                .published_ticks
                .range((job.to_string(), t)..)
                .take_while(|((j, _), _)| j == job)
                .find(|((_, tick), _)| *tick > t)
        {
            let what = format!(
                "run {} of {job} (tick {}) started after the newer tick {} was published (run {by})",
                d.run,
                t.to_rfc3339(),
                newer.to_rfc3339()
            );
            self.violations.push(Violation {
                at: self.time.now(),
                what,
            });
        }
        self.started.insert(d.run);
        let others = self.active.entry(job.to_string()).or_default();
        others.push(d);
    }

    fn dump_ended(&mut self, job: &str, run: i64, cancel: &CancellationToken) {
        if let Some(v) = self.active.get_mut(job) {
            v.retain(|d| !(d.run == run && d.cancel.is_cancelled() == cancel.is_cancelled()));
        }
    }

    fn publish(&mut self, job: &str, run: i64, tick: Option<DateTime<Utc>>) {
        if !self.published_runs.insert(run) {
            self.violate(format!("run {run} of {job} published twice"));
        }
        if let Some(t) = tick
            && let Some(first) = self.published_ticks.insert((job.to_string(), t), run)
        {
            self.violate(format!(
                "tick {} of {job} published twice (runs {first} and {run})",
                t.to_rfc3339()
            ));
        }
        self.published.push((job.to_string(), self.time.now()));
        self.summary.published += 1;
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The runner of one node: dumps that take their job's time, publish after
/// a fence, and fail now and then.
pub struct SimRunner {
    node: Arc<Mutex<Option<Arc<FleetNode>>>>,
    gate: Arc<NodeGate>,
    jobs: Arc<BTreeMap<String, JobSpec>>,
    checker: Shared<Checker>,
    rng: Mutex<Rng>,
}

impl Runner for SimRunner {
    type Report = ();

    async fn run(&self, run: &RunCtx, cancel: CancellationToken) -> Attempt<()> {
        self.gate.pass().await;
        let node = lock(&self.node)
            .clone()
            .expect("the node joined before running");
        let spec = &self.jobs[&run.job];
        let (duration, fails) = {
            let mut rng = lock(&self.rng);
            let d = match run.kind {
                RunKind::Backup => rng.between(spec.duration.0, spec.duration.1),
                _ => PRUNE_TAKES,
            };
            (d, run.kind == RunKind::Backup && rng.chance(spec.fail_rate))
        };
        let run_id = run.claim.as_ref().map_or(-(run.id as i64), |c| c.run);
        if run.kind == RunKind::Backup {
            lock(&self.checker).dump_started(
                &run.job,
                Dump {
                    node: node.clone(),
                    cancel: cancel.clone(),
                    run: run_id,
                    tick: run.claim.as_ref().and_then(|c| c.scheduled_for),
                },
            );
        }
        let done = tokio::select! {
            biased;
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(duration) => true,
        };
        if run.kind == RunKind::Backup {
            lock(&self.checker).dump_ended(&run.job, run_id, &cancel);
        }
        if !done {
            return Attempt::Interrupted;
        }
        self.gate.pass().await;
        if fails {
            return Attempt::Failed {
                error: "pg_dump failed (simulated)".into(),
                retryable: true,
            };
        }
        match run.kind {
            RunKind::Backup => {
                let held = match &run.claim {
                    Some(c) => node.catalog.fence(c).await.unwrap_or(false),
                    None => true,
                };
                if !held {
                    return Attempt::Interrupted;
                }
                lock(&self.checker).publish(
                    &run.job,
                    run_id,
                    run.claim.as_ref().and_then(|c| c.scheduled_for),
                );
                Attempt::Done {
                    outcome: Outcome::Success,
                    report: (),
                    then: spec.retention.then_some(RunKind::Prune),
                }
            }
            RunKind::Prune => {
                let now = self_now(&node);
                lock(&self.checker)
                    .prunes
                    .entry(run.job.clone())
                    .or_default()
                    .push(now);
                Attempt::Done {
                    outcome: Outcome::Success,
                    report: (),
                    then: None,
                }
            }
            RunKind::Verify => Attempt::Done {
                outcome: Outcome::Success,
                report: (),
                then: None,
            },
        }
    }
}

fn self_now(node: &FleetNode) -> DateTime<Utc> {
    node.now()
}

struct JobAttempts(Arc<BTreeMap<String, JobSpec>>);

impl Attempts for JobAttempts {
    fn max_attempts(&self, job: &str, kind: RunKind) -> u32 {
        match (kind, self.0.get(job)) {
            (RunKind::Backup, Some(j)) => j.retries + 1,
            _ => 1,
        }
    }
}

/// One incarnation of a node.
struct Running {
    node: Arc<FleetNode>,
    gate: Arc<NodeGate>,
    /// Stops its heartbeat: a crashed process beats no more.
    stop: CancellationToken,
}

struct World {
    p: Params,
    time: SimTime,
    db: Arc<SimCatalog>,
    catalog_gate: Arc<CatalogGate>,
    jobs: Arc<BTreeMap<String, JobSpec>>,
    entries: Vec<ClaimableEntry>,
    checker: Shared<Checker>,
}

impl World {
    fn sched_entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for j in self.jobs.values() {
            out.push(Entry {
                job: j.name.clone(),
                kind: RunKind::Backup,
                timetable: Some(Arc::new(j.every.clone())),
                retries: j.retries,
                backoff: BACKOFF,
                catch_up: true,
            });
            if j.retention {
                out.push(Entry {
                    job: j.name.clone(),
                    kind: RunKind::Prune,
                    timetable: None,
                    retries: 0,
                    backoff: BACKOFF,
                    catch_up: false,
                });
            }
        }
        out
    }

    /// Starts an incarnation of node `index`; retries joining until the
    /// catalog lets it.
    async fn start_node(&self, index: usize, rng: &mut Rng) -> Running {
        let gate = Arc::new(NodeGate::default());
        let catalog: Arc<dyn FleetCatalog> = Arc::new(FaultyCatalog {
            inner: self.db.clone(),
            node: gate.clone(),
            catalog: self.catalog_gate.clone(),
            faults: self.p.faults,
            rng: Mutex::new(rng.fork()),
        });
        let skew = chrono::TimeDelta::milliseconds(rng.below(20_000) as i64 - 10_000);
        let clock = Arc::new(SkewClock {
            time: self.time.clone(),
            skew,
        });
        let info = NodeInfo {
            hostname: format!("node{index}"),
            pid: index as u32,
            version: "sim".into(),
            config_hash: "c0ffee".into(),
            mode: "daemon".into(),
        };
        let node = loop {
            match FleetNode::join(
                catalog.clone(),
                catalog.clone(),
                Arc::new(NoHooks),
                clock.clone(),
                info.clone(),
                self.p.lease,
                self.p.heartbeat,
            )
            .await
            {
                Ok(n) => break n,
                Err(_) => tokio::time::sleep(Duration::from_secs(5)).await,
            }
        };
        let slot = Arc::new(Mutex::new(Some(node.clone())));
        let runner = SimRunner {
            node: slot,
            gate: gate.clone(),
            jobs: self.jobs.clone(),
            checker: self.checker.clone(),
            rng: Mutex::new(rng.fork()),
        };
        let ledger = FleetLedger {
            node: node.clone(),
            attempts: Arc::new(JobAttempts(self.jobs.clone())),
        };
        let sched = Scheduler::new(
            runner,
            ledger,
            SkewClock {
                time: self.time.clone(),
                skew,
            },
            self.p.max_concurrent,
            |_| {},
        );
        sched.set_entries(self.sched_entries());
        // The heartbeat first: catch-up may take longer than a lease.
        let entries = Arc::new(self.entries.clone());
        let stop = CancellationToken::new();
        node.clone().keep_beating(
            sched.clone(),
            Arc::new(move || entries.clone()),
            stop.clone(),
        );
        // Its own task: the node may crash in the middle of it.
        let (catching_up, caught_up) = (sched.clone(), node.clone());
        tokio::spawn(async move {
            catching_up.catch_up().await;
            caught_up.caught_up();
        });
        // The daemon's history passes, on this node's clock and catalog.
        let history = self.p.history;
        let timetables: Vec<Every> = self.jobs.values().map(|j| j.every.clone()).collect();
        tokio::spawn(crate::history::keep(
            catalog,
            clock,
            move |now| {
                crate::history::horizon(
                    history,
                    timetables.iter().map(|t| t as &dyn Timetable),
                    now,
                )
            },
            crate::history::FIRST,
            stop.clone(),
            |_| {},
            |_| {},
        ));
        Running { node, gate, stop }
    }
}

/// Runs one simulation; `Err` with the invariants it broke.
pub fn run(seed: u64, p: &Params) -> Result<Summary, Vec<Violation>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(simulate(seed, p.clone()))
}

async fn simulate(seed: u64, p: Params) -> Result<Summary, Vec<Violation>> {
    let mut rng = Rng::new(seed);
    let time = SimTime {
        start: Instant::now(),
    };
    STARTED.with(|s| s.set(Some(time.start)));
    let db_time = time.clone();
    let db = Arc::new(SimCatalog::new(Arc::new(move || db_time.now())));
    let specs = jobs(&mut rng.fork(), p.jobs);
    let jobs: Arc<BTreeMap<String, JobSpec>> =
        Arc::new(specs.iter().map(|j| (j.name.clone(), j.clone())).collect());
    let mut entries = Vec::new();
    for j in jobs.values() {
        entries.push(ClaimableEntry {
            job: j.name.clone(),
            kind: RunKind::Backup,
            starting_deadline: j.starting_deadline,
        });
        if j.retention {
            entries.push(ClaimableEntry {
                job: j.name.clone(),
                kind: RunKind::Prune,
                starting_deadline: j.starting_deadline,
            });
        }
    }
    let checker = Arc::new(Mutex::new(Checker {
        time: time.clone(),
        violations: Vec::new(),
        active: BTreeMap::new(),
        published_runs: BTreeSet::new(),
        published_ticks: BTreeMap::new(),
        published: Vec::new(),
        started: BTreeSet::new(),
        overheld: BTreeSet::new(),
        overgrown: BTreeSet::new(),
        prunes: BTreeMap::new(),
        crashed: BTreeMap::new(),
        summary: Summary::default(),
    }));
    let world = World {
        p: p.clone(),
        time: time.clone(),
        db: db.clone(),
        catalog_gate: Arc::new(CatalogGate::default()),
        jobs: jobs.clone(),
        entries,
        checker: checker.clone(),
    };
    let mut nodes: Vec<Running> = Vec::new();
    for i in 0..p.nodes {
        nodes.push(world.start_node(i, &mut rng).await);
    }
    // Chaos, minute by minute, until the end; then a calm tail in which
    // every run due must settle.
    let end = epoch() + chrono::TimeDelta::days(i64::from(p.days));
    let per_minute = |per_day: f64| per_day / (24.0 * 60.0);
    let lease = chrono::TimeDelta::from_std(p.lease).unwrap_or_default();
    let beat = chrono::TimeDelta::from_std(p.heartbeat).unwrap_or_default();
    let mut restarts: Vec<(DateTime<Utc>, usize)> = Vec::new();
    while time.now() < end {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let now = time.now();
        for (i, n) in nodes.iter().enumerate() {
            if n.stop.is_cancelled() {
                continue;
            }
            if !n.gate.crashed.load(Ordering::SeqCst) && rng.chance(per_minute(p.crashes_per_day)) {
                n.gate.crash();
            }
            if n.gate.crashed.load(Ordering::SeqCst) {
                // Crashed now, or at a call since the last minute.
                n.stop.cancel();
                let at = lock(&n.gate.crashed_at).map_or(now, |t| {
                    now - chrono::TimeDelta::from_std(Instant::now() - t).unwrap_or_default()
                });
                lock(&checker).crashed.insert(n.node.id(), at);
                lock(&checker).summary.crashes += 1;
                let back = now + chrono::TimeDelta::minutes(1 + rng.below(60) as i64);
                restarts.push((back, i));
            } else if rng.chance(per_minute(p.pauses_per_day)) {
                let d = rng.between(p.lease, p.lease * 3);
                *lock(&n.gate.paused_until) = Some(Instant::now() + d);
                lock(&checker).summary.pauses += 1;
            }
        }
        if rng.chance(per_minute(p.failovers_per_day)) {
            let d = rng.between(Duration::from_secs(10), Duration::from_secs(90));
            *lock(&world.catalog_gate.down_until) = Some(Instant::now() + d);
            lock(&checker).summary.failovers += 1;
        }
        let due: Vec<usize> = restarts
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, i)| *i)
            .collect();
        restarts.retain(|(t, _)| *t > now);
        for i in due {
            nodes[i] = world.start_node(i, &mut rng).await;
        }
        // The catalog stays bounded: no job holds more rows than its
        // history's ticks (checked hourly: counting is the costly part).
        if now.timestamp() % 3600 < 60 {
            let kept = crate::history::horizon(
                p.history,
                jobs.values().map(|j| &j.every as &dyn Timetable),
                now,
            );
            let rows = db.rows_per_job();
            let mut c = lock(&checker);
            c.summary.max_rows = c.summary.max_rows.max(rows.values().sum());
            for (job, n) in rows {
                let Some(spec) = jobs.get(&job) else { continue };
                let most = spec.most_rows(kept);
                if n > most && c.overgrown.insert(job.clone()) {
                    c.violate(format!(
                        "{job} holds {n} rows in the catalog, more than {most} (its ticks in the {} h the catalog keeps, and the newest of each kind and outcome)",
                        kept.as_secs() / 3600
                    ));
                }
            }
        }
        // At most one run of a job and kind waits: a backlog never grows.
        if let Some((job, kind, n)) = db.most_pending()
            && n > 1
        {
            lock(&checker).violate(format!("{n} runs of {job}'s {kind} wait at once"));
        }
        // Nothing stays running longer than a lease after its holder died.
        let runs = db.running();
        let mut c = lock(&checker);
        for r in &runs {
            if r.outcome != "running" {
                continue;
            }
            // Nor held longer than any run of its job could take (held by a
            // node that does not run it blocks the job fleet-wide).
            if let Some(spec) = jobs.get(&r.job) {
                let longest = spec.longest_run() + p.lease * 2 + Duration::from_secs(1800);
                if (now - r.started_at)
                    .to_std()
                    .is_ok_and(|held| held > longest)
                    && c.overheld.insert(r.id)
                {
                    let what = format!(
                        "run {} of {}'s {} held by node {} for {} min, longer than any run of the job takes",
                        r.id,
                        r.job,
                        r.kind,
                        r.node.as_deref().unwrap_or("-"),
                        (now - r.started_at).num_minutes()
                    );
                    c.violate(what);
                }
            }
            if let Some(died) = r.node.as_ref().and_then(|n| c.crashed.get(n)).copied()
                && now - died > lease + beat * 4 + chrono::TimeDelta::minutes(2)
                && c.overheld.insert(r.id)
            {
                let what = format!(
                    "run {} of {} still running on node {} {} min after it died",
                    r.id,
                    r.job,
                    r.node.as_deref().unwrap_or("-"),
                    (now - died).num_minutes()
                );
                c.violate(what);
            }
        }
    }
    // The calm tail: no more faults; long enough for the slowest job.
    *lock(&world.catalog_gate.down_until) = None;
    world.catalog_gate.calm.store(true, Ordering::SeqCst);
    for (i, n) in nodes.iter().enumerate() {
        if n.gate.crashed.load(Ordering::SeqCst) && !n.stop.is_cancelled() {
            n.stop.cancel();
            lock(&checker).summary.crashes += 1;
            restarts.push((end, i));
        }
    }
    for (_, i) in std::mem::take(&mut restarts) {
        nodes[i] = world.start_node(i, &mut rng).await;
    }
    let tail = jobs
        .values()
        .map(|j| j.duration.1 * (j.retries + 1) + Duration::from_secs(3600 * 24))
        .max()
        .unwrap_or_default();
    tokio::time::sleep(tail.min(Duration::from_secs(3 * 24 * 3600))).await;
    // Every row the fleet ever wrote: what is in the catalog now and what
    // its history passes deleted (every tick is held to account, however
    // long ago).
    let forgotten = db.forgotten();
    let rows_now = db.rows();
    let mut runs = db.runs();
    runs.extend(forgotten.iter().cloned());
    let now = time.now();
    let live: BTreeSet<String> = db
        .leases()
        .into_iter()
        .filter(|(_, until)| *until > now)
        .map(|(id, _)| id)
        .collect();
    let mut c = lock(&checker);
    // Every tick up to the end is one published backup, or one skip or
    // failure with its reason.
    let mut by_tick: BTreeMap<(String, DateTime<Utc>), Vec<&super::catalog::RunRow>> =
        BTreeMap::new();
    for r in runs.iter().filter(|r| r.kind == RunKind::Backup) {
        if let Some(t) = r.scheduled_for {
            by_tick.entry((r.job.clone(), t)).or_default().push(r);
        }
    }
    for j in jobs.values() {
        for t in j.fire_times(epoch(), end) {
            c.summary.ticks += 1;
            match by_tick.get(&(j.name.clone(), t)).map(Vec::as_slice) {
                None | Some([]) => c.violate(format!(
                    "tick {} of {} was lost: neither run nor recorded as skipped",
                    t.to_rfc3339(),
                    j.name
                )),
                Some([r]) => match r.outcome.as_str() {
                    "success" | "suspect" => {
                        if !c.published_ticks.contains_key(&(j.name.clone(), t)) {
                            let what = format!(
                                "run {} of {} tick {} is recorded a success but published nothing",
                                r.id,
                                j.name,
                                t.to_rfc3339()
                            );
                            c.violate(what);
                        }
                    }
                    "skipped"
                        if c.started.contains(&r.id)
                            && r.error.as_deref().is_some_and(|e| e.contains("deadline")) =>
                    {
                        let what = format!(
                            "run {} of {} tick {} started in time and was skipped as too late after it was cut off ({:?})",
                            r.id,
                            j.name,
                            t.to_rfc3339(),
                            r.error
                        );
                        c.violate(what);
                    }
                    // Still going at the end, on a live node: a slow job's
                    // last tick.
                    "running" if r.node.as_ref().is_some_and(|n| live.contains(n)) => {}
                    "skipped" | "failed" | "interrupted" if r.error.is_some() => {
                        if r.outcome == "skipped" {
                            c.summary.skipped += 1;
                        } else {
                            c.summary.failed += 1;
                        }
                    }
                    other => {
                        let what = format!(
                            "tick {} of {} ended {other} (run {}, node {:?}, error {:?})",
                            t.to_rfc3339(),
                            j.name,
                            r.id,
                            r.node,
                            r.error
                        );
                        c.violate(what);
                    }
                },
                Some(rs) => c.violate(format!(
                    "tick {} of {} has {} rows: {}",
                    t.to_rfc3339(),
                    j.name,
                    rs.len(),
                    rs.iter()
                        .map(|r| format!("run {} {} ({:?})", r.id, r.outcome, r.error))
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
            }
        }
    }
    // A prune follows every successful backup of a job with retention.
    let published = c.published.clone();
    // A prune waiting or going at the end follows the latest backups.
    let queued: BTreeSet<&str> = runs
        .iter()
        .filter(|r| r.kind == RunKind::Prune && (r.outcome == "pending" || r.outcome == "running"))
        .map(|r| r.job.as_str())
        .collect();
    for (job, at) in published {
        if !jobs[&job].retention || queued.contains(job.as_str()) {
            continue;
        }
        let followed = c
            .prunes
            .get(&job)
            .is_some_and(|p| p.iter().any(|t| *t >= at - chrono::TimeDelta::minutes(1)));
        if !followed {
            c.violate(format!(
                "no prune followed the backup of {job} published at {}",
                at.to_rfc3339()
            ));
        }
    }
    c.summary.prunes = c.prunes.values().map(Vec::len).sum();
    c.summary.rows = rows_now;
    c.summary.forgotten = forgotten.len();
    drop(nodes);
    if c.violations.is_empty() {
        Ok(c.summary.clone())
    } else {
        Err(c.violations.clone())
    }
}
