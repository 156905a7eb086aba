//! Cluster jobs: every database of a server, each in its own exported
//! snapshot and its own backup (`<job>/<segment>/<backup-id>/`), plus the
//! server's roles and tablespaces once per run (`<job>/@globals/<backup-id>/`).
//! Every database of one run shares the run's backup id. A database's
//! failure is its own (named, the others go on); the run fails if any did.

use std::collections::BTreeSet;

use backstop_catalog::{Catalog, Claim, Outcome, RunResult};
use backstop_config::{Config, JobConfig};
use backstop_dump::PgTarget;
use backstop_vocab::series;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backup::{BackupReport, new_backup_id, run_member};
use crate::summary::RunSummary;
use crate::{BackupError, Step};

/// How one database (or the globals) of a cluster run ended.
#[derive(Debug)]
pub struct MemberRun {
    /// The database's name (`None` for the globals).
    pub database: Option<String>,
    /// Its series, `<job>/<segment>`.
    pub series: String,
    pub result: Result<BackupReport, BackupError>,
}

impl MemberRun {
    /// What to call it in messages: the database's name or "globals".
    pub fn label(&self) -> String {
        match &self.database {
            Some(d) => format!("database \"{d}\""),
            None => "roles and tablespaces (globals)".into(),
        }
    }
}

/// What a cluster run did.
#[derive(Debug)]
pub struct ClusterReport {
    pub backup_id: String,
    /// When the run (its first attempt) started.
    pub started_at: DateTime<Utc>,
    /// The globals first, then each database in name order.
    pub members: Vec<MemberRun>,
    /// Databases left out by `exclude`: name and pattern.
    pub excluded: Vec<(String, String)>,
    /// Databases the job's role may not connect to: reported, not fatal.
    pub not_connectable: Vec<String>,
    /// Databases backed up for the first time in this run (after earlier runs).
    pub new: Vec<String>,
    /// Databases with backups in the store that the server no longer has.
    pub missing: Vec<String>,
}

impl ClusterReport {
    /// Each failed member and why, on one line each.
    pub fn failures(&self) -> Vec<String> {
        self.members
            .iter()
            .filter_map(|m| {
                m.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {}", m.label(), crate::one_line(e)))
            })
            .collect()
    }

    /// Whether a member was cut off by shutdown or a lost claim.
    pub fn interrupted(&self) -> bool {
        self.members.iter().any(|m| {
            matches!(
                m.result,
                Err(BackupError::Interrupted | BackupError::LostClaim(_))
            )
        })
    }

    /// Whether every failure may pass on a retry.
    pub fn retryable(&self) -> bool {
        self.members
            .iter()
            .filter_map(|m| m.result.as_ref().err())
            .all(BackupError::is_retryable)
    }

    /// The completed members' reports.
    pub fn done(&self) -> impl Iterator<Item = &BackupReport> {
        self.members.iter().filter_map(|m| m.result.as_ref().ok())
    }

    /// Sessions the lock guard saw blocked behind any database's dump (a
    /// yield counts as one).
    pub fn lock_blocks(&self) -> u32 {
        self.members
            .iter()
            .map(|m| match &m.result {
                Ok(r) => r.lock_blocks,
                Err(BackupError::Yielded(_)) => 1,
                Err(_) => 0,
            })
            .sum()
    }

    /// Summed dump and stored bytes of what completed (a globals-only
    /// backup's globals count toward the dump), as [`RunSummary`] sums them.
    pub fn sizes(&self) -> (u64, u64) {
        let manifests: Vec<&crate::Manifest> = self.done().map(|r| &r.manifest).collect();
        RunSummary::of_members(&manifests).map_or((0, 0), |s| (s.dump_bytes, s.stored_bytes))
    }

    /// How the run ended: interrupted or failed (naming each member that
    /// failed) when a member did; otherwise [`RunSummary::of_members`] of
    /// its manifests, as a rebuilt catalog sums them.
    pub fn summary(&self) -> RunSummary {
        let failures = self.failures();
        let (dump_bytes, stored_bytes) = self.sizes();
        let ended = |outcome, error| RunSummary {
            outcome,
            error: Some(error),
            dump_bytes,
            stored_bytes,
            started_at: self.started_at,
            finished_at: crate::now(),
        };
        if self.interrupted() {
            return ended(Outcome::Interrupted, failures.join("; "));
        }
        if !failures.is_empty() {
            return ended(
                Outcome::Failed,
                format!(
                    "{} of {} failed: {}",
                    failures.len(),
                    self.members.len(),
                    failures.join("; ")
                ),
            );
        }
        // Every member completed (a retry keeps what its first attempt
        // completed, whose globals may list a database the server has
        // dropped since): what the stores hold of it, summed.
        let manifests: Vec<&crate::Manifest> = self.done().map(|r| &r.manifest).collect();
        RunSummary::of_members(&manifests)
            .unwrap_or_else(|| ended(Outcome::Failed, "no database was backed up".into()))
    }

    /// The run's failure on one line, naming the run and each failed member.
    pub fn failure_line(&self) -> String {
        let failures = self.failures();
        format!(
            "cluster run {}: {} of {} failed: {}",
            self.backup_id,
            failures.len(),
            self.members.len(),
            failures.join("; ")
        )
    }
}

/// A backup run of any job: one database's backup, or a cluster run.
#[derive(Debug)]
pub enum Ran {
    One(Box<BackupReport>),
    Cluster(ClusterReport),
}

impl Ran {
    pub fn backup_id(&self) -> &str {
        match self {
            Ran::One(r) => &r.manifest.backup_id,
            Ran::Cluster(c) => &c.backup_id,
        }
    }

    /// Sessions the lock guard saw blocked behind the dump.
    pub fn lock_blocks(&self) -> u32 {
        match self {
            Ran::One(r) => r.lock_blocks,
            Ran::Cluster(c) => c.lock_blocks(),
        }
    }

    /// What pausing the standby's replay cost (of a cluster run: the
    /// database whose pause left the most lag).
    pub fn replay(&self) -> Option<backstop_dump::admin::Resumed> {
        match self {
            Ran::One(r) => r.replay,
            Ran::Cluster(c) => c
                .members
                .iter()
                .filter_map(|m| m.result.as_ref().ok().and_then(|r| r.replay))
                .max_by_key(|r| r.lag_bytes),
        }
    }

    /// Stores every part of the run is complete in.
    pub fn stores(&self) -> Vec<String> {
        match self {
            Ran::One(r) => r.stores.clone(),
            Ran::Cluster(c) => {
                let mut all: Option<BTreeSet<String>> = None;
                for r in c.done() {
                    let these: BTreeSet<String> = r.stores.iter().cloned().collect();
                    all = Some(match all {
                        None => these,
                        Some(a) => a.intersection(&these).cloned().collect(),
                    });
                }
                all.unwrap_or_default().into_iter().collect()
            }
        }
    }

    /// How the run ended, as the catalog records it and notifications
    /// tell it.
    pub fn summary(&self) -> RunSummary {
        match self {
            Ran::One(r) => RunSummary::of_backup(&r.manifest),
            Ran::Cluster(c) => c.summary(),
        }
    }

    /// The failure of a cluster run some of whose databases failed (the
    /// others are complete): retried for the failed ones only.
    pub fn failed_members(&self) -> Option<&ClusterReport> {
        match self {
            Ran::Cluster(c) if !c.failures().is_empty() => Some(c),
            _ => None,
        }
    }
}

/// Runs one backup of `job`: [`crate::run_backup_until`] for a
/// single-database job, [`run_cluster_backup`] for a cluster job, whose
/// run is interrupted when any database was. A cluster run where some
/// databases failed is a [`Ran::Cluster`] whose [`Ran::summary`] says so.
///
/// # Errors
/// As those two.
pub async fn run_job_backup(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
) -> Result<Ran, BackupError> {
    resume_job_backup(config, job, catalog, cancel, claim, None).await
}

/// [`run_job_backup`], continuing `earlier` when it is given: a cluster
/// run's failed attempt, retried under the same backup id, whose completed
/// databases (and globals) are kept and only the others dumped again.
/// `earlier` is ignored for a single-database job.
///
/// # Errors
/// As [`run_job_backup`].
pub async fn resume_job_backup(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
    earlier: Option<Box<ClusterReport>>,
) -> Result<Ran, BackupError> {
    if job.cluster.is_none() {
        return crate::run_backup_until(config, job, catalog, cancel, claim)
            .await
            .map(|r| Ran::One(Box::new(r)));
    }
    let report = run_cluster_backup(config, job, catalog, cancel, claim, earlier).await?;
    if let Some(Err(e)) = report
        .members
        .iter()
        .map(|m| &m.result)
        .find(|r| matches!(r, Err(BackupError::LostClaim(_))))
    {
        return Err(BackupError::LostClaim(crate::one_line(e)));
    }
    if report.interrupted() {
        return Err(BackupError::Interrupted);
    }
    Ok(Ran::Cluster(report))
}

/// Runs one backup of cluster job `job`: lists the server's databases,
/// backs up the globals, then each database (up to `parallel` at once),
/// and records the run under the job's name with each database's run
/// under its series. With a `claim` (a fleet) the run is that claimed row
/// and every member is fenced by it; the caller releases it. With
/// `earlier` (a failed attempt of this run) the run keeps its backup id and
/// what completed in it, and dumps only the rest.
///
/// # Errors
/// What fails the whole run before any database is dumped: the lock, the
/// server's listing, every database excluded. A database's failure is in
/// the report.
pub async fn run_cluster_backup(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
    earlier: Option<Box<ClusterReport>>,
) -> Result<ClusterReport, BackupError> {
    if claim.is_none() {
        crate::backup::lock_job(catalog, &job.name).await?;
    }
    let result = run_unlocked(config, job, catalog, cancel, claim, earlier).await;
    if claim.is_none() {
        crate::backup::unlock_job(catalog, &job.name).await;
    }
    result
}

async fn run_unlocked(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    claim: Option<&Claim>,
    earlier: Option<Box<ClusterReport>>,
) -> Result<ClusterReport, BackupError> {
    let started_at = crate::now();
    let backup_id = earlier
        .as_ref()
        .map_or_else(|| new_backup_id(started_at), |e| e.backup_id.clone());
    let run_id =
        crate::backup::begin_run(catalog, &job.name, claim, &backup_id, started_at).await?;
    let run = Run {
        backup_id: &backup_id,
        started_at: earlier.as_ref().map_or(started_at, |e| e.started_at),
        claim,
    };
    let result = members_of_run(config, job, catalog, cancel, run, earlier).await;
    let finished_at = Utc::now();
    let (outcome, error, sizes, finished) = match &result {
        Ok(report) => {
            let s = report.summary();
            let done = s.outcome != Outcome::Failed && s.outcome != Outcome::Interrupted;
            (
                s.outcome,
                s.error,
                Some((s.dump_bytes, s.stored_bytes)),
                done.then_some(s.finished_at),
            )
        }
        Err(e) => (
            if matches!(e, BackupError::Interrupted) {
                Outcome::Interrupted
            } else {
                Outcome::Failed
            },
            Some(crate::one_line(e)),
            None,
            None,
        ),
    };
    match (run_id, claim) {
        (Some(id), _) => {
            let r = RunResult {
                error: error.as_deref(),
                dump_bytes: sizes.map(|s| s.0),
                stored_bytes: sizes.map(|s| s.1),
            };
            if let Err(e) = catalog
                .finish_run(id, outcome, finished.unwrap_or(finished_at), &r)
                .await
            {
                warn!(job = %job.name, error = %e, "Could not record the cluster run in the catalog.");
            }
        }
        (None, Some(c)) => {
            if let Some(s) = sizes
                && let Err(e) = catalog.annotate(c, &backup_id, Some(s)).await
            {
                warn!(job = %job.name, error = %e, "Could not record the run's sizes in the catalog.");
            }
        }
        (None, None) => {}
    }
    match &result {
        Ok(report) if report.failures().is_empty() => {
            let (dump, stored) = report.sizes();
            info!(job = %job.name, backup_id = %backup_id, databases = report.members.len() - 1, dump_bytes = dump, stored_bytes = stored, "Cluster backup complete.");
        }
        Ok(report) => {
            error!(job = %job.name, backup_id = %backup_id, failed = %report.failures().join("; "), "Cluster backup FAILED for some databases; the others are complete.");
        }
        Err(e) => {
            error!(job = %job.name, backup_id = %backup_id, error = %crate::one_line(e), "Cluster backup failed.");
        }
    }
    result
}

/// Which run the members belong to.
#[derive(Clone, Copy)]
struct Run<'a> {
    backup_id: &'a str,
    started_at: DateTime<Utc>,
    claim: Option<&'a Claim>,
}

/// The server's databases: every one listed, those to back up, those
/// `exclude` leaves out (with the pattern) and those the role may not
/// connect to.
struct OnServer {
    listed: Vec<String>,
    databases: Vec<String>,
    excluded: Vec<(String, String)>,
    not_connectable: Vec<String>,
}

/// Lists the server's databases and sorts them as [`OnServer`] says.
///
/// # Errors
/// The connection's, or none left to back up.
async fn on_server(job: &JobConfig) -> Result<OnServer, BackupError> {
    let cluster = job.cluster.as_ref().expect("a cluster job");
    let server =
        PgTarget::from_config(&job.database).map_err(|m| BackupError::said(Step::Connect, m))?;
    let listed = backstop_dump::admin::list_databases(&server)
        .await
        .map_err(|e| BackupError::at(Step::Connect, e))?;
    let mut excluded = Vec::new();
    let mut not_connectable = Vec::new();
    let mut databases = Vec::new();
    for db in &listed {
        if let Some(p) = cluster.excluded_by(&db.name) {
            excluded.push((db.name.clone(), p.to_string()));
        } else if !db.can_connect {
            warn!(job = %job.name, database = %db.name, role = %server.user(), "Database skipped: the job's role has no CONNECT privilege on it (GRANT CONNECT, or exclude it to silence this).");
            not_connectable.push(db.name.clone());
        } else {
            databases.push(db.name.clone());
        }
    }
    if databases.is_empty() {
        return Err(BackupError::said(
            Step::Inventory,
            format!(
                "job \"{}\" has no database to back up on {}: {} listed, {} excluded by {:?}, {} not connectable; change database.exclude or grant CONNECT",
                job.name,
                server.display(),
                listed.len(),
                excluded.len(),
                cluster.exclude,
                not_connectable.len()
            ),
        ));
    }

    Ok(OnServer {
        listed: listed.iter().map(|d| d.name.clone()).collect(),
        databases,
        excluded,
        not_connectable,
    })
}

/// What the stores say of the server's databases: those with backups the
/// server no longer has (`missing`), and those backed up for the first
/// time now (`new`; none on a job's first run).
async fn compared_with_stores(
    config: &Config,
    job: &JobConfig,
    listed: &[String],
    databases: &[String],
) -> (Vec<String>, Vec<String>) {
    // What earlier runs backed up, from the first store that answers.

    let mut known = BTreeSet::new();
    for name in &job.storage {
        if let Ok(store) = crate::store::Store::open(config, name).await
            && let Ok(found) = store.members(&job.name).await
        {
            known = found;
            break;
        }
    }
    let on_server: BTreeSet<String> = listed.iter().map(|d| series::segment(d)).collect();
    let missing: Vec<String> = known
        .iter()
        .filter(|s| !on_server.contains(*s))
        .filter_map(|s| series::database_of(s))
        .collect();
    for m in &missing {
        warn!(job = %job.name, database = %m, "Database is gone from the server: it has backups but is no longer listed. Its backups are kept until retention ages them out.");
    }
    let new: Vec<String> = if known.is_empty() {
        Vec::new()
    } else {
        databases
            .iter()
            .filter(|d| !known.contains(&series::segment(d)))
            .cloned()
            .collect()
    };
    for d in &new {
        info!(job = %job.name, database = %d, "New database found on the server; backing it up from this run on.");
    }

    (missing, new)
}

/// A retry keeps what the failed attempt completed (of the databases the
/// server still has) and dumps only the rest, under the same id; the
/// databases that attempt found new stay new.
fn kept_from(
    job: &JobConfig,
    backup_id: &str,
    earlier: ClusterReport,
    databases: &[String],
    new: &mut Vec<String>,
) -> Vec<MemberRun> {
    for d in earlier.new {
        if !new.contains(&d) {
            new.push(d);
        }
    }
    let kept: Vec<MemberRun> = earlier
        .members
        .into_iter()
        .filter(|m| m.result.is_ok() && m.database.as_ref().is_none_or(|d| databases.contains(d)))
        .collect();
    let again: Vec<String> = std::iter::once(None)
        .chain(databases.iter().map(Some))
        .filter(|d| !kept.iter().any(|k| k.database.as_ref() == *d))
        .map(|d| d.map_or_else(|| "globals".to_string(), |d| format!("\"{d}\"")))
        .collect();
    info!(job = %job.name, backup_id, again = %again.join(", "), kept = kept.len(), "Cluster backup retried: only what failed is dumped again; what completed in the failed attempt is kept.");
    kept
}

async fn members_of_run(
    config: &Config,
    job: &JobConfig,
    catalog: &Catalog,
    cancel: &CancellationToken,
    run: Run<'_>,
    earlier: Option<Box<ClusterReport>>,
) -> Result<ClusterReport, BackupError> {
    let Run {
        backup_id,
        started_at,
        claim,
    } = run;
    let cluster = job.cluster.as_ref().expect("a cluster job");
    let OnServer {
        listed,
        databases,
        excluded,
        not_connectable,
    } = on_server(job).await?;
    let (missing, mut new) = compared_with_stores(config, job, &listed, &databases).await;

    let kept = match earlier {
        Some(earlier) => kept_from(job, backup_id, *earlier, &databases, &mut new),
        None => {
            info!(job = %job.name, backup_id, databases = databases.len(), excluded = excluded.len(), not_connectable = not_connectable.len(), "Cluster backup started.");
            Vec::new()
        }
    };
    let is_kept = |d: Option<&String>| kept.iter().any(|k| k.database.as_ref() == d);

    // Roles and tablespaces first (a restore needs them first too).
    let mut members = Vec::new();
    if !is_kept(None) {
        let globals = job.globals_member(&databases);
        members.push(MemberRun {
            database: None,
            series: globals.name.clone(),
            result: run_member(config, &globals, catalog, cancel, backup_id, claim).await,
        });
    }
    let parallel = cluster
        .parallel
        .unwrap_or(config.daemon.max_concurrent_jobs)
        .max(1);
    let todo: Vec<String> = databases
        .iter()
        .filter(|d| !is_kept(Some(d)))
        .cloned()
        .collect();
    let runs = futures::stream::iter(todo.into_iter().map(|db| {
        let mut member = job.member(&db);
        // The job's share of the cores is split between the databases
        // dumped at once.
        member.compression_share = job.compression_share / parallel as f64;
        async move {
            let result = run_member(config, &member, catalog, cancel, backup_id, claim).await;
            MemberRun {
                database: Some(db),
                series: member.name.clone(),
                result,
            }
        }
    }))
    .buffer_unordered(parallel)
    .collect::<Vec<_>>()
    .await;
    members.extend(runs);
    members.extend(kept);
    // The globals first (None sorts first), then each database by name.
    members.sort_by(|a, b| a.database.cmp(&b.database));
    Ok(ClusterReport {
        backup_id: backup_id.to_string(),
        started_at,
        members,
        excluded,
        not_connectable,
        new,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::manifest_for;

    fn done(member: &str, kinds: &[(&str, usize)], databases: Option<&[&str]>) -> MemberRun {
        let mut m = manifest_for("r", chrono::DateTime::UNIX_EPOCH, kinds);
        m.member = Some(member.into());
        m.databases = databases.map(|d| d.iter().map(|s| s.to_string()).collect());
        MemberRun {
            database: backstop_vocab::series::database_of(member),
            series: format!("app/{member}"),
            result: Ok(BackupReport {
                manifest: m,
                stores: vec!["s".into()],
                lock_blocks: 0,
                replay: None,
            }),
        }
    }

    /// The run's globals, listing `databases`, and its backup of `a`.
    fn globals_and_a(databases: &[&str]) -> Vec<MemberRun> {
        let globals = done(
            backstop_vocab::series::GLOBALS_SEGMENT,
            &[("globals", 10)],
            Some(databases),
        );
        let a = done(
            &backstop_vocab::series::segment("a"),
            &[("database", 100)],
            None,
        );
        vec![globals, a]
    }

    fn report(members: Vec<MemberRun>) -> ClusterReport {
        ClusterReport {
            backup_id: "r".into(),
            started_at: chrono::DateTime::UNIX_EPOCH,
            members,
            excluded: Vec::new(),
            not_connectable: Vec::new(),
            new: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// A retry keeps its first attempt's globals, which may list a
    /// database the server dropped since: every member of the run
    /// completed, so the run succeeded (a rebuild, which cannot tell a
    /// dropped database from a failed one, says failed).
    #[test]
    fn a_retried_run_whose_members_all_completed_succeeds() {
        let r = report(globals_and_a(&["a", "dropped"]));
        let s = r.summary();
        assert_eq!((s.outcome, s.error), (Outcome::Success, None));
        assert_eq!((s.dump_bytes, s.stored_bytes), r.sizes());
        assert!(r.failures().is_empty());
    }

    #[test]
    fn a_run_with_a_failed_database_names_it() {
        let mut members = globals_and_a(&["a", "b"]);
        members.push(MemberRun {
            database: Some("b".into()),
            series: "app/b".into(),
            result: Err(BackupError::said(Step::Connect, "refused")),
        });
        let r = report(members);
        let s = r.summary();
        assert_eq!(s.outcome, Outcome::Failed);
        assert!(
            s.error
                .unwrap()
                .starts_with("1 of 3 failed: database \"b\"")
        );
        assert!(r.failure_line().starts_with("cluster run r: 1 of 3 failed"));
        assert!(Ran::Cluster(r).failed_members().is_some());
    }
}
