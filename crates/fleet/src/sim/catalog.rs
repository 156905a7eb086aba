//! A catalog in memory with the PostgreSQL catalog's semantics, statement
//! for statement (crates/catalog/src/fleet.rs): every call is one
//! transaction, applied at once; its clock is the simulation's. The e2e
//! test `fleet_sim::the_simulated_catalog_agrees_with_postgres` runs one
//! scripted scenario against both and compares what they record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backstop_vocab::{Claim, Outcome, RunKind};
use chrono::{DateTime, Utc};

use crate::catalog::{
    ClaimableEntry, FleetCatalog, FleetResult, HeldRun, MAX_INTERRUPTIONS, NodeInfo, NodeStatus,
    Reaped, Release, Waiting,
};

/// One row of `runs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: i64,
    pub job: String,
    pub kind: RunKind,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub error: Option<String>,
    pub node: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub interruptions: i32,
    pub not_before: DateTime<Utc>,
    pub backup_id: Option<String>,
    /// Its current attempt passed its fence and is publishing.
    pub publishing: bool,
}

#[derive(Debug, Clone)]
struct NodeRow {
    info: NodeInfo,
    started_at: DateTime<Utc>,
    heartbeat_at: DateTime<Utc>,
    lease_until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct AttemptRow {
    node: String,
    outcome: String,
}

type Key = (String, RunKind);

#[derive(Default)]
struct Tables {
    nodes: BTreeMap<String, NodeRow>,
    runs: BTreeMap<i64, RunRow>,
    attempts: BTreeMap<(i64, i32), AttemptRow>,
    next_run: i64,
    next_node: u64,
    // Indexes (what PostgreSQL's are for): kept by `insert` and `update`.
    by_tick: BTreeMap<(String, RunKind, DateTime<Utc>), i64>,
    pending: BTreeMap<Key, BTreeSet<i64>>,
    running: BTreeMap<Key, BTreeSet<i64>>,
    by_node: BTreeMap<String, BTreeSet<i64>>,
    last_ok: BTreeMap<Key, i64>,
    /// The newest run of each job, kind and outcome (exact for the
    /// outcomes a run ends with, which it never leaves).
    newest: BTreeMap<(String, RunKind, String), i64>,
    /// The rows `forget_history` deleted, oldest deletion first: not the
    /// catalog's any more, but the checker's, which holds every tick to
    /// account however long ago it ran.
    forgotten: Vec<RunRow>,
}

impl Tables {
    fn index(&mut self, r: &RunRow) {
        let newest = self
            .newest
            .entry((r.job.clone(), r.kind, r.outcome.clone()))
            .or_insert(r.id);
        *newest = (*newest).max(r.id);
        let key = (r.job.clone(), r.kind);
        match r.outcome.as_str() {
            "pending" => {
                self.pending.entry(key).or_default().insert(r.id);
            }
            "running" => {
                if r.attempt > 0 {
                    self.running.entry(key).or_default().insert(r.id);
                }
                if let Some(n) = &r.node {
                    self.by_node.entry(n.clone()).or_default().insert(r.id);
                }
            }
            "success" => {
                let e = self.last_ok.entry(key).or_insert(r.id);
                *e = (*e).max(r.id);
            }
            _ => {}
        }
    }

    fn unindex(&mut self, r: &RunRow) {
        let key = (r.job.clone(), r.kind);
        if let Some(s) = self.pending.get_mut(&key) {
            s.remove(&r.id);
            if s.is_empty() {
                self.pending.remove(&key);
            }
        }
        if let Some(s) = self.running.get_mut(&key) {
            s.remove(&r.id);
            if s.is_empty() {
                self.running.remove(&key);
            }
        }
        if let Some(n) = &r.node
            && let Some(s) = self.by_node.get_mut(n)
        {
            s.remove(&r.id);
        }
    }

    fn insert(&mut self, r: RunRow) {
        if let Some(t) = r.scheduled_for {
            self.by_tick.insert((r.job.clone(), r.kind, t), r.id);
        }
        self.index(&r);
        self.runs.insert(r.id, r);
    }

    /// Changes run `id` with `f`, keeping the indexes.
    fn update<T>(&mut self, id: i64, f: impl FnOnce(&mut RunRow) -> T) -> Option<T> {
        let mut r = self.runs.remove(&id)?;
        self.unindex(&r);
        let out = f(&mut r);
        self.index(&r);
        self.runs.insert(id, r);
        Some(out)
    }

    /// Of the pending runs of `key`, only the newest waits (by tick; a
    /// run asked for on demand counts as newest): the others are recorded
    /// as skipped, superseded.
    fn coalesce(&mut self, key: &Key, now: DateTime<Utc>) {
        let ids: Vec<i64> = self
            .pending
            .get(key)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let Some(&keep) = ids.iter().max_by_key(|id| {
            let r = &self.runs[id];
            (r.scheduled_for.unwrap_or(DateTime::<Utc>::MAX_UTC), **id)
        }) else {
            return;
        };
        let newest = self.runs[&keep].scheduled_for.map_or_else(
            || "a run asked for on demand".to_string(),
            |t| {
                format!(
                    "tick {}",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )
            },
        );
        for id in ids.into_iter().filter(|id| *id != keep) {
            self.update(id, |r| {
                r.outcome = "skipped".into();
                r.finished_at = Some(now);
                r.error = Some(format!(
                    "superseded: at most one run of a job waits, and a newer one ({newest}) runs instead"
                ));
            });
        }
    }

    /// Inserts a new run of `job`/`kind` (the next id): pending and never
    /// claimed, started at `at`, unless `f` says otherwise. Returns its id.
    fn add(
        &mut self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        not_before: DateTime<Utc>,
        f: impl FnOnce(&mut RunRow),
    ) -> i64 {
        let id = self.next_run;
        self.next_run += 1;
        let mut r = RunRow {
            id,
            job: job.into(),
            kind,
            scheduled_for: None,
            started_at: at,
            finished_at: None,
            outcome: "pending".into(),
            error: None,
            node: None,
            attempt: 0,
            max_attempts: 1,
            interruptions: 0,
            not_before,
            backup_id: None,
            publishing: false,
        };
        f(&mut r);
        self.insert(r);
        id
    }

    /// Deletes at most `limit` runs that ended before `before`, oldest
    /// start first, as the PostgreSQL catalog's `forget_history` does:
    /// never a pending or running run, never the newest run of its job,
    /// kind and outcome; their attempts go with them.
    fn forget(&mut self, before: DateTime<Utc>, limit: u32) -> u64 {
        let newest: BTreeSet<i64> = self.newest.values().copied().collect();
        let mut old: Vec<(DateTime<Utc>, i64)> = self
            .runs
            .values()
            .filter(|r| {
                r.started_at < before
                    && r.outcome != "pending"
                    && r.outcome != "running"
                    && r.finished_at.is_none_or(|f| f < before)
                    && !newest.contains(&r.id)
            })
            .map(|r| (r.started_at, r.id))
            .collect();
        old.sort_unstable();
        old.truncate(limit as usize);
        for (_, id) in &old {
            if let Some(r) = self.runs.remove(id) {
                self.unindex(&r);
                if let Some(t) = r.scheduled_for {
                    self.by_tick.remove(&(r.job.clone(), r.kind, t));
                }
                let attempts: Vec<(i64, i32)> = self
                    .attempts
                    .range((*id, i32::MIN)..=(*id, i32::MAX))
                    .map(|(k, _)| *k)
                    .collect();
                for a in attempts {
                    self.attempts.remove(&a);
                }
                self.forgotten.push(r);
            }
        }
        old.len() as u64
    }

    fn has_tick(&self, job: &str, kind: RunKind, at: DateTime<Utc>) -> bool {
        self.by_tick.contains_key(&(job.to_string(), kind, at))
    }
}

/// The catalog's clock.
pub type DbClock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The in-memory catalog.
pub struct SimCatalog {
    tables: Mutex<Tables>,
    clock: DbClock,
}

fn d(x: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(x).unwrap_or(chrono::TimeDelta::MAX)
}

impl SimCatalog {
    pub fn new(clock: DbClock) -> Self {
        Self {
            tables: Mutex::new(Tables {
                next_run: 1,
                next_node: 1,
                ..Tables::default()
            }),
            clock,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every run row, for the invariants and the comparison with
    /// PostgreSQL.
    pub fn runs(&self) -> Vec<RunRow> {
        self.lock().runs.values().cloned().collect()
    }

    /// The rows `forget_history` deleted (the checker's record of them).
    pub fn forgotten(&self) -> Vec<RunRow> {
        self.lock().forgotten.clone()
    }

    /// How many rows `runs` holds now.
    pub fn rows(&self) -> usize {
        self.lock().runs.len()
    }

    /// How many rows `runs` holds now per job.
    pub fn rows_per_job(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for r in self.lock().runs.values() {
            *out.entry(r.job.clone()).or_default() += 1;
        }
        out
    }

    /// The runs running on some node now.
    pub fn running(&self) -> Vec<RunRow> {
        let t = self.lock();
        t.by_node
            .values()
            .flatten()
            .filter_map(|id| t.runs.get(id).cloned())
            .collect()
    }

    /// The most runs waiting for any one (job, kind), and which.
    pub fn most_pending(&self) -> Option<(String, RunKind, usize)> {
        self.lock()
            .pending
            .iter()
            .map(|(k, s)| (k.0.clone(), k.1, s.len()))
            .max_by_key(|x| x.2)
    }

    /// The nodes' ids and leases.
    pub fn leases(&self) -> Vec<(String, DateTime<Utc>)> {
        self.lock()
            .nodes
            .iter()
            .map(|(id, n)| (id.clone(), n.lease_until))
            .collect()
    }

    fn held_by(t: &Tables, node: &str) -> Vec<HeldRun> {
        t.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| t.runs.get(id))
            .filter(|r| r.attempt > 0)
            .map(|r| HeldRun {
                run: r.id,
                job: r.job.clone(),
                kind: r.kind.as_str().into(),
                attempt: r.attempt,
                scheduled_for: r.scheduled_for,
                started_at: r.started_at,
            })
            .collect()
    }

    /// Whether `node` holds a valid lease now.
    fn lease_valid(t: &Tables, node: &str, now: DateTime<Utc>) -> bool {
        t.nodes.get(node).is_some_and(|n| n.lease_until > now)
    }

    fn one_running(t: &Tables, job: &str, kind: RunKind, except: i64) -> bool {
        t.running
            .get(&(job.to_string(), kind))
            .is_some_and(|s| s.iter().any(|id| *id != except))
    }

    fn start_attempt(t: &mut Tables, claim: &Claim) {
        t.attempts.insert(
            (claim.run, claim.attempt),
            AttemptRow {
                node: claim.node.clone(),
                outcome: "running".into(),
            },
        );
    }

    fn end_attempt(t: &mut Tables, claim: &Claim, outcome: &str) {
        if let Some(a) = t.attempts.get_mut(&(claim.run, claim.attempt))
            && a.node == claim.node
            && a.outcome == "running"
        {
            a.outcome = outcome.to_string();
        }
    }

    /// Whether `claim` guards its run: running as this attempt on this node.
    fn guarded(t: &Tables, claim: &Claim) -> bool {
        t.runs.get(&claim.run).is_some_and(|r| {
            r.attempt == claim.attempt
                && r.node.as_deref() == Some(claim.node.as_str())
                && r.outcome == "running"
        })
    }

    fn reap_nodes(t: &mut Tables, dead: &[String], why: &str, now: DateTime<Utc>) -> Vec<Reaped> {
        for a in t.attempts.values_mut() {
            if dead.contains(&a.node) && a.outcome == "running" {
                a.outcome = "interrupted".into();
            }
        }
        let mut held: Vec<i64> = dead
            .iter()
            .flat_map(|n| t.by_node.get(n).into_iter().flatten().copied())
            .collect();
        held.sort_unstable();
        let mut out = Vec::new();
        for id in held {
            let reaped = t.update(id, |r| {
                let node = r.node.clone().unwrap_or_default();
                // A run that began publishing is never run again: what it
                // published stands (or its manifest is missing, which the
                // next backup covers).
                let again =
                    r.attempt > 0 && r.interruptions + 1 < MAX_INTERRUPTIONS && !r.publishing;
                if r.attempt > 0 {
                    r.interruptions += 1;
                }
                r.outcome = if again { "pending" } else { "interrupted" }.into();
                r.finished_at = if again { None } else { Some(now) };
                r.error = Some(if r.publishing {
                    format!("{why}, after it began publishing: not run again (its backup is in the store if its manifest is)")
                } else {
                    why.to_string()
                });
                Reaped {
                    run: r.id,
                    job: r.job.clone(),
                    kind: r.kind.as_str().into(),
                    node,
                    now: r.outcome.clone(),
                }
            });
            out.extend(reaped);
        }
        // A run back to pending waits alone too.
        let keys: BTreeSet<Key> = out
            .iter()
            .filter(|r| r.now == "pending")
            .filter_map(|r| Some((r.job.clone(), RunKind::parse(&r.kind)?)))
            .collect();
        for k in keys {
            t.coalesce(&k, now);
        }
        for n in dead {
            t.nodes.remove(n);
            t.by_node.remove(n);
        }
        out
    }
}

#[async_trait]
impl FleetCatalog for SimCatalog {
    async fn register_node(&self, info: &NodeInfo, lease: Duration) -> FleetResult<String> {
        let now = self.now();
        let mut t = self.lock();
        let id = format!("{:012x}", t.next_node);
        t.next_node += 1;
        t.nodes.insert(
            id.clone(),
            NodeRow {
                info: info.clone(),
                started_at: now,
                heartbeat_at: now,
                lease_until: now + d(lease),
            },
        );
        Ok(id)
    }

    async fn renew_lease(&self, node: &str, lease: Duration) -> FleetResult<bool> {
        let now = self.now();
        let mut t = self.lock();
        match t.nodes.get_mut(node) {
            Some(n) if n.lease_until >= now => {
                n.heartbeat_at = now;
                n.lease_until = now + d(lease);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn deregister_node(&self, node: &str, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        let mut t = self.lock();
        Ok(Self::reap_nodes(
            &mut t,
            &[node.to_string()],
            "its node stopped",
            now,
        ))
    }

    async fn reap(&self, now: DateTime<Utc>) -> FleetResult<Vec<Reaped>> {
        let db_now = self.now();
        let mut t = self.lock();
        let dead: Vec<String> = t
            .nodes
            .iter()
            .filter(|(_, n)| n.lease_until < db_now)
            .map(|(id, _)| id.clone())
            .collect();
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        Ok(Self::reap_nodes(
            &mut t,
            &dead,
            "its node stopped renewing its lease (crashed, killed, paused or cut off from the catalog)",
            now,
        ))
    }

    async fn record_tick(
        &self,
        job: &str,
        kind: RunKind,
        at: DateTime<Utc>,
        max_attempts: u32,
    ) -> FleetResult<bool> {
        let db_now = self.now();
        let mut t = self.lock();
        if t.has_tick(job, kind, at) {
            return Ok(false);
        }
        t.add(job, kind, at, db_now, |r| {
            r.scheduled_for = Some(at);
            r.max_attempts = max_attempts.min(i32::MAX as u32) as i32;
        });
        t.coalesce(&(job.to_string(), kind), at.max(db_now));
        Ok(true)
    }

    async fn recorded_ticks(
        &self,
        job: &str,
        kind: RunKind,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> FleetResult<Vec<DateTime<Utc>>> {
        let t = self.lock();
        let lo = (job.to_string(), kind, from);
        let hi = (job.to_string(), kind, to);
        Ok(t.by_tick.range(lo..=hi).map(|(k, _)| k.2).collect())
    }

    async fn skip_ticks(
        &self,
        job: &str,
        kind: RunKind,
        ticks: &[DateTime<Utc>],
        why: &str,
        now: DateTime<Utc>,
    ) -> FleetResult<u64> {
        let db_now = self.now();
        let mut t = self.lock();
        let mut n = 0;
        for &at in ticks {
            if t.has_tick(job, kind, at) {
                continue;
            }
            t.add(job, kind, at, db_now, |r| {
                r.scheduled_for = Some(at);
                r.finished_at = Some(now);
                r.outcome = "skipped".into();
                r.error = Some(why.into());
            });
            n += 1;
        }
        Ok(n)
    }

    async fn last_tick(
        &self,
        job: &str,
        kind: RunKind,
        at_or_before: DateTime<Utc>,
    ) -> FleetResult<Option<DateTime<Utc>>> {
        let t = self.lock();
        let lo = (job.to_string(), kind, DateTime::<Utc>::MIN_UTC);
        let hi = (job.to_string(), kind, at_or_before);
        Ok(t.by_tick.range(lo..=hi).next_back().map(|(k, _)| k.2))
    }

    async fn claimable(
        &self,
        entries: &[ClaimableEntry],
        now: DateTime<Utc>,
    ) -> FleetResult<Vec<(String, RunKind)>> {
        let db_now = self.now();
        let mut t = self.lock();
        // Only what waits is looked at (the index holds no empty sets).
        let waiting: Vec<(&ClaimableEntry, Vec<i64>)> = t
            .pending
            .iter()
            .filter_map(|(k, ids)| {
                let e = entries.iter().find(|e| e.kind == k.1 && e.job == k.0)?;
                Some((e, ids.iter().copied().collect()))
            })
            .collect();
        let mut out: Vec<(String, RunKind)> = Vec::new();
        for (e, ids) in waiting {
            let oldest = e.starting_deadline.map(|dl| now - d(dl));
            let mut due = false;
            for id in ids {
                let r = t
                    .update(id, |r| {
                        // Only a run that never started: one put back after
                        // its node died started in time.
                        if r.attempt == 0
                            && r.interruptions == 0
                            && r.scheduled_for.zip(oldest).is_some_and(|(s, o)| s < o)
                        {
                            r.outcome = "skipped".into();
                            r.finished_at = Some(now);
                            r.error = Some(
                                "not started within the job's starting deadline (every node was busy or down)"
                                    .into(),
                            );
                        }
                        r.outcome == "pending" && r.not_before <= db_now
                    })
                    .unwrap_or(false);
                due |= r;
            }
            if due {
                out.push((e.job.clone(), e.kind));
            }
        }
        Ok(out)
    }

    async fn claim(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        now: DateTime<Utc>,
    ) -> FleetResult<Option<Claim>> {
        let db_now = self.now();
        let mut t = self.lock();
        let Some(id) = t
            .pending
            .get(&(job.to_string(), kind))
            .into_iter()
            .flatten()
            .copied()
            .find(|id| t.runs.get(id).is_some_and(|r| r.not_before <= db_now))
        else {
            return Ok(None);
        };
        if !Self::lease_valid(&t, node, db_now) || Self::one_running(&t, job, kind, id) {
            return Ok(None);
        }
        let claim = t
            .update(id, |r| {
                r.outcome = "running".into();
                r.node = Some(node.into());
                r.attempt += 1;
                r.started_at = now;
                r.finished_at = None;
                r.error = None;
                r.publishing = false;
                Claim {
                    run: id,
                    attempt: r.attempt,
                    node: node.into(),
                    scheduled_for: r.scheduled_for,
                }
            })
            .expect("found above");
        Self::start_attempt(&mut t, &claim);
        Ok(Some(claim))
    }

    async fn claim_now(
        &self,
        node: &str,
        job: &str,
        kind: RunKind,
        backup_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> FleetResult<Result<Claim, String>> {
        let db_now = self.now();
        let mut t = self.lock();
        if Self::one_running(&t, job, kind, -1) {
            let holder = t
                .running
                .get(&(job.to_string(), kind))
                .and_then(|s| s.iter().next())
                .and_then(|id| t.runs.get(id))
                .and_then(|r| r.node.clone())
                .map_or_else(|| "another node".to_string(), |n| format!("node {n}"));
            return Ok(Err(holder));
        }
        let id = t.add(job, kind, now, db_now, |r| {
            r.outcome = "running".into();
            r.node = Some(node.into());
            r.attempt = 1;
            r.backup_id = backup_id.map(str::to_string);
        });
        let claim = Claim {
            run: id,
            attempt: 1,
            node: node.into(),
            scheduled_for: None,
        };
        Self::start_attempt(&mut t, &claim);
        Ok(Ok(claim))
    }

    async fn next_attempt(&self, claim: &Claim, _error: &str) -> FleetResult<Option<Claim>> {
        let db_now = self.now();
        let mut t = self.lock();
        Self::end_attempt(&mut t, claim, "failed");
        if !Self::lease_valid(&t, &claim.node, db_now) || !Self::guarded(&t, claim) {
            return Ok(None);
        }
        let attempt = t
            .update(claim.run, |r| {
                r.attempt += 1;
                r.attempt
            })
            .expect("guarded");
        let next = Claim {
            attempt,
            ..claim.clone()
        };
        Self::start_attempt(&mut t, &next);
        Ok(Some(next))
    }

    async fn fence(&self, claim: &Claim) -> FleetResult<bool> {
        let db_now = self.now();
        let mut t = self.lock();
        if !Self::lease_valid(&t, &claim.node, db_now) || !Self::guarded(&t, claim) {
            return Ok(false);
        }
        t.update(claim.run, |r| r.publishing = true);
        Ok(true)
    }

    async fn release(
        &self,
        claim: &Claim,
        how: Release<'_>,
        now: DateTime<Utc>,
    ) -> FleetResult<bool> {
        let mut t = self.lock();
        match how {
            Release::Done(outcome, error, then) => {
                Self::end_attempt(&mut t, claim, outcome.as_str());
                if !Self::guarded(&t, claim) {
                    return Ok(false);
                }
                let job = t
                    .update(claim.run, |r| {
                        r.outcome = outcome.as_str().into();
                        r.finished_at = Some(now);
                        r.error = error.map(str::to_string);
                        r.job.clone()
                    })
                    .expect("guarded");
                // The follow-up, queued with the release (one waits at most).
                if let Some(kind) = then {
                    let waiting = t
                        .pending
                        .get(&(job.clone(), kind))
                        .is_some_and(|s| !s.is_empty());
                    if !waiting {
                        let db_now = self.now();
                        t.add(&job, kind, now, db_now, |_| {});
                    }
                }
                Ok(true)
            }
            Release::Interrupted(why) => {
                Self::end_attempt(&mut t, claim, "interrupted");
                if !Self::guarded(&t, claim) {
                    return Ok(false);
                }
                let key = t
                    .update(claim.run, |r| {
                        let again = r.interruptions + 1 < MAX_INTERRUPTIONS && !r.publishing;
                        r.interruptions += 1;
                        r.error = Some(why.into());
                        r.outcome = if again { "pending" } else { "interrupted" }.into();
                        r.finished_at = if again { None } else { Some(now) };
                        if again {
                            r.node = None;
                        }
                        (r.job.clone(), r.kind)
                    })
                    .expect("guarded");
                t.coalesce(&key, now);
                Ok(true)
            }
        }
    }

    async fn last_success(&self, job: &str, kind: RunKind) -> FleetResult<Option<DateTime<Utc>>> {
        let t = self.lock();
        Ok(t.last_ok
            .get(&(job.to_string(), kind))
            .and_then(|id| t.runs.get(id))
            .filter(|r| r.outcome == Outcome::Success.as_str())
            .and_then(|r| r.finished_at))
    }

    async fn fleet(&self) -> FleetResult<Vec<NodeStatus>> {
        let db_now = self.now();
        let t = self.lock();
        let mut out: Vec<NodeStatus> = t
            .nodes
            .iter()
            .map(|(id, n)| NodeStatus {
                id: id.clone(),
                hostname: n.info.hostname.clone(),
                pid: i64::from(n.info.pid),
                version: n.info.version.clone(),
                config_hash: n.info.config_hash.clone(),
                mode: n.info.mode.clone(),
                started_at: n.started_at,
                heartbeat_at: n.heartbeat_at,
                lease_until: n.lease_until,
                live: n.lease_until > db_now,
                runs: Vec::new(),
            })
            .collect();
        for n in &mut out {
            n.runs = Self::held_by(&t, &n.id);
        }
        Ok(out)
    }

    async fn held(&self, node: &str) -> FleetResult<Vec<HeldRun>> {
        Ok(Self::held_by(&self.lock(), node))
    }

    async fn waiting(&self) -> FleetResult<Vec<Waiting>> {
        let t = self.lock();
        Ok(t.pending
            .iter()
            .filter_map(|((job, kind), ids)| {
                let since = ids
                    .iter()
                    .filter_map(|id| t.runs.get(id))
                    .map(|r| r.scheduled_for.unwrap_or(r.started_at))
                    .min()?;
                Some(Waiting {
                    job: job.clone(),
                    kind: kind.as_str().into(),
                    runs: ids.len() as i64,
                    since,
                })
            })
            .collect())
    }

    async fn forget_history(&self, before: DateTime<Utc>, limit: u32) -> FleetResult<u64> {
        Ok(self.lock().forget(before, limit))
    }
}
