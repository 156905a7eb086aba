//! What on-call looks at: each job's state against its RPO, its last run,
//! sizes, stores, verification and measured restore time, read from the
//! catalog and the stores. One model for `backstop status` (text and
//! `--json`), the daemon's status page and `/api/v1/status`.

use backstop_catalog::{
    BackupInStore, Catalog, JobFacts, Outcome, RunKind, RunRecord, Verification,
};
use backstop_config::{Config, JobConfig};
use backstop_pipeline::store::Store;
use backstop_pipeline::trust::Listing;
use backstop_pipeline::{Manifest, Trusted};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// How many of a job's latest backups its history (the page's chart) holds.
pub const HISTORY: usize = 30;

/// The newest backup runs (not skipped ticks) status reads of each job:
/// the last run, and the chart's [`HISTORY`] points among them.
pub const RECENT_RUNS: u32 = HISTORY as u32 + 2;

/// Jobs whose status is read at once.
const STATUS_CONCURRENCY: usize = 8;

/// One job's row.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub job: String,
    /// `failing`, `never succeeded`, `suspect` (the latest backup is much
    /// smaller than usual), `stale`, or `ok`.
    pub state: String,
    pub last_run_outcome: Option<Outcome>,
    pub last_run_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub rpo_seconds: Option<i64>,
    pub next_run_at: Option<DateTime<Utc>>,
    /// Complete backups in the job's first store (`None`: it cannot be listed).
    pub backups_stored: Option<usize>,
    pub latest_stored_bytes: Option<u64>,
    pub previous_stored_bytes: Option<u64>,
    /// The median stored size of the backups before the latest (at most
    /// [`HISTORY`] of them), what the latest is compared with.
    pub median_stored_bytes: Option<u64>,
    /// The latest backup's dump (before compression and encryption).
    pub latest_dump_bytes: Option<u64>,
    /// `ok checksum 3h ago`: the newest backup's latest verification.
    pub last_verify: Option<String>,
    pub verification: Option<Verification>,
    /// Backups per store, in the job's order.
    pub stores: Vec<StoreCount>,
    /// The latest successful drill's wall time.
    pub restore_seconds: Option<f64>,
    pub rto_seconds: Option<i64>,
    /// The latest backups, oldest first.
    pub history: Vec<HistoryPoint>,
    /// A cluster job's databases, each on its own row.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseStatus>,
}

impl JobStatus {
    /// Whether on-call should look at it.
    pub fn needs_attention(&self) -> bool {
        self.state != "ok"
    }

    /// The state as one word: ok, stale, failing, suspect, never.
    pub fn state_class(&self) -> &'static str {
        state_class(&self.state)
    }
}

/// The one-word class of a state string.
pub fn state_class(state: &str) -> &'static str {
    match state {
        "ok" => "ok",
        "failing" => "failing",
        "suspect" => "suspect",
        "stale" => "stale",
        "missing" => "missing",
        _ => "never",
    }
}

/// A store's count of complete backups.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCount {
    pub store: String,
    pub backups: Option<usize>,
    /// Objects posing as backups that are not trusted (forged, altered,
    /// unsigned where signatures are required): nobody here wrote them.
    #[serde(skip_serializing_if = "is_zero")]
    pub untrusted: usize,
    /// Why it could not be listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the listing shown began (the daemon lists at start, after its
    /// runs, when the catalog shows a newer backup, and hourly); `null`:
    /// not listed yet (`backups` is `null` too, with no `error`).
    pub listed_at: Option<DateTime<Utc>>,
}

/// One backup in a job's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPoint {
    pub backup_id: Option<String>,
    pub finished_at: DateTime<Utc>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    pub seconds: f64,
    pub suspect: bool,
}

/// One database of a cluster job.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    pub database: String,
    /// `ok`, `failing` (its backup failed in the latest run), `suspect`, or
    /// `missing` (not in the latest run: gone from the server, excluded or
    /// not connectable; its backups are kept until they age out).
    pub state: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub latest_dump_bytes: Option<i64>,
}

/// What `backstop status --json` and `/api/v1/status` say: every job,
/// and with a shared catalog the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Attention first, then by name.
    pub jobs: Vec<JobStatus>,
    /// `null` with a catalog of one host.
    pub fleet: Option<FleetStatus>,
}

/// The fleet's table: its nodes, what waits to be claimed, and whether the
/// nodes run one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    /// Every registered node (live or with an expired lease), with the runs
    /// each holds.
    pub nodes: Vec<backstop_catalog::fleet::NodeStatus>,
    /// Runs waiting for a node to claim them, per job and kind.
    pub waiting: Vec<backstop_catalog::fleet::Waiting>,
    /// The config digest of the file this status was read with.
    pub config_hash: String,
    /// The distinct config digests of the live nodes.
    pub live_config_hashes: Vec<String>,
    /// The live nodes run more than one configuration, or another than
    /// this file's.
    pub configs_differ: bool,
}

impl FleetStatus {
    /// The fleet's table from a shared catalog.
    ///
    /// # Errors
    /// A catalog error.
    pub async fn read(config: &Config, catalog: &Catalog) -> anyhow::Result<Self> {
        let nodes = catalog.fleet().await?;
        let waiting = catalog.waiting().await?;
        let mut hashes: Vec<String> = nodes
            .iter()
            .filter(|n| n.live)
            .map(|n| n.config_hash.clone())
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        let configs_differ = hashes.len() > 1 || hashes.first().is_some_and(|h| *h != config.hash);
        Ok(Self {
            nodes,
            waiting,
            config_hash: config.hash.clone(),
            live_config_hashes: hashes,
            configs_differ,
        })
    }
}

/// The whole status: [`collect`], and the fleet's table when the catalog
/// is shared.
///
/// # Errors
/// A catalog error.
pub async fn report(
    config: &Config,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> anyhow::Result<StatusReport> {
    report_with(collect(config, catalog, now).await?, config, catalog).await
}

/// The whole status from `jobs` (read elsewhere: the daemon's
/// [`crate::status_cache::StatusCache`]) and the fleet's table.
///
/// # Errors
/// A catalog error.
pub async fn report_with(
    jobs: Vec<JobStatus>,
    config: &Config,
    catalog: &Catalog,
) -> anyhow::Result<StatusReport> {
    let fleet = match catalog.is_shared() {
        true => Some(FleetStatus::read(config, catalog).await?),
        false => None,
    };
    Ok(StatusReport { jobs, fleet })
}

/// Every job of `config`, attention first, then by name.
///
/// # Errors
/// A catalog error.
pub async fn collect(
    config: &Config,
    catalog: &Catalog,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<JobStatus>> {
    let jobs: Vec<&JobConfig> = config.jobs.iter().collect();
    let mut rows = statuses(config, catalog, &jobs, now).await?;
    attention_first(&mut rows);
    Ok(rows)
}

/// Jobs that need attention first, then by name.
pub fn attention_first(rows: &mut [JobStatus]) {
    rows.sort_by(|a, b| (!a.needs_attention(), &a.job).cmp(&(!b.needs_attention(), &b.job)));
}

/// The status of each of `jobs`, in their order.
async fn statuses(
    config: &Config,
    catalog: &Catalog,
    jobs: &[&JobConfig],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<JobStatus>> {
    let reads = read_jobs(config, catalog, jobs).await?;
    Ok(jobs
        .iter()
        .zip(&reads)
        .map(|(job, read)| job_row(job, read, now))
        .collect())
}

/// What status reads of one job: its facts from the catalog, what its
/// stores hold, its newest backup's verification and a cluster job's
/// databases. Its row ([`job_row`]) is made from it at any time after.
#[derive(Debug, Clone)]
pub struct JobRead {
    facts: JobFacts,
    listed: Listed,
    databases: Vec<DatabaseStatus>,
}

/// What status reads of each of `jobs`, in their order: every store of
/// each listed (several jobs at once), then [`read_catalog`]. What
/// `backstop status` and a job's own page do: one look, read afresh.
///
/// # Errors
/// A catalog error.
pub async fn read_jobs(
    config: &Config,
    catalog: &Catalog,
    jobs: &[&JobConfig],
) -> anyhow::Result<Vec<JobRead>> {
    use futures::{FutureExt, StreamExt};
    // Store listings are mostly waiting. (Boxed: a stream of the plain
    // futures is not Send for axum's handlers.)
    let listings: Vec<futures::future::BoxFuture<'_, Listed>> = jobs
        .iter()
        .map(|job| list_stores(config, job).boxed())
        .collect();
    let listed: Vec<Listed> = futures::stream::iter(listings)
        .buffered(STATUS_CONCURRENCY)
        .collect()
        .await;
    read_catalog(catalog, jobs, listed).await
}

/// What status reads of each of `jobs` from the catalog alone, with what
/// their stores were last seen to hold (`listed`, in the same order): the
/// facts of every job in one read, the verification of each newest stored
/// backup, a cluster job's databases. No store is asked.
///
/// # Errors
/// A catalog error.
pub async fn read_catalog(
    catalog: &Catalog,
    jobs: &[&JobConfig],
    listed: Vec<Listed>,
) -> anyhow::Result<Vec<JobRead>> {
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    // The chart's points are the successes among the newest backup runs:
    // a couple more than it holds, for a failure or two among them.
    let mut facts = catalog.status_facts(&names, RECENT_RUNS).await?;
    let newest: Vec<BackupInStore> = listed.iter().filter_map(|l| l.newest.clone()).collect();
    let verified = catalog.latest_verifications(&newest).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for (job, mut listed) in jobs.iter().zip(listed) {
        listed.stored.verification = listed
            .newest
            .as_ref()
            .and_then(|n| verified.get(n))
            .cloned();
        let facts = facts.remove(&job.name).unwrap_or_default();
        let databases = match job.cluster {
            Some(_) => {
                let latest = last_run(&facts).and_then(|r| r.backup_id.clone());
                database_rows(catalog, job, latest.as_deref()).await?
            }
            None => Vec::new(),
        };
        out.push(JobRead {
            facts,
            listed,
            databases,
        });
    }
    Ok(out)
}

impl JobRead {
    /// The backup id of the job's newest good backup as the catalog
    /// knows it: a store listing that does not have it as its newest is
    /// older than the catalog (another node's or process's backup).
    pub fn catalog_newest(&self) -> Option<&str> {
        self.facts
            .recent_backups
            .iter()
            .find(|r| matches!(r.outcome, Some(Outcome::Success | Outcome::Suspect)))
            .and_then(|r| r.backup_id.as_deref())
    }
}

/// The job's last backup run that ran (a fleet's skipped ticks are not
/// runs).
fn last_run(facts: &JobFacts) -> Option<&RunRecord> {
    facts
        .recent_backups
        .iter()
        .find(|r| r.outcome.is_some_and(|o| o != Outcome::Skipped))
}

/// The median of `v` (the lower middle of an even count).
fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// `ok checksum 3h ago`.
fn verify_line(v: &Verification, now: DateTime<Utc>) -> String {
    format!(
        "{} {} {}",
        if v.ok { "ok" } else { "FAILED" },
        v.level,
        age(Some(v.at), now)
    )
}

/// `3h ago`, `never`.
pub fn age(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => {
            let secs = (now - t).num_seconds().max(0) as u64;
            let rounded = if secs >= 3600 { secs / 60 * 60 } else { secs };
            format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(rounded))
            )
        }
        None => "never".into(),
    }
}

/// The job's latest [`HISTORY`] backups from the catalog, oldest first.
fn history(runs: &[RunRecord]) -> Vec<HistoryPoint> {
    let mut out: Vec<HistoryPoint> = runs
        .iter()
        .filter(|r| {
            r.kind == RunKind::Backup
                && matches!(r.outcome, Some(Outcome::Success | Outcome::Suspect))
        })
        .filter_map(|r| {
            let finished = r.finished_at?;
            Some(HistoryPoint {
                backup_id: r.backup_id.clone(),
                finished_at: finished,
                dump_bytes: r.dump_bytes.map(|b| b.max(0) as u64),
                stored_bytes: r.stored_bytes.map(|b| b.max(0) as u64),
                seconds: ((finished - r.started_at).num_milliseconds().max(0) as f64) / 1000.0,
                suspect: r.outcome == Some(Outcome::Suspect),
            })
        })
        .take(HISTORY)
        .collect();
    out.reverse();
    out
}

/// What the first store says of the job's newest backups.
#[derive(Debug, Clone, Default)]
struct Stored {
    count: Option<usize>,
    latest: Option<u64>,
    previous: Option<u64>,
    median: Option<u64>,
    latest_dump: Option<u64>,
    suspect: bool,
    verification: Option<Verification>,
}

/// What the job's stores say: the first store's newest backups and each
/// store's count. Made from one listing of each store; kept by the daemon
/// between its listings.
#[derive(Debug, Clone)]
pub struct Listed {
    stored: Stored,
    stores: Vec<StoreCount>,
    /// The first store's newest backup, whose verification status shows.
    newest: Option<BackupInStore>,
    /// The ids of the first store's backups.
    ids: std::collections::HashSet<String>,
}

impl Listed {
    /// What one listing, begun `at`, of each of the job's stores says, in
    /// the job's order: its complete backups and untrusted objects, or why
    /// it could not be listed.
    pub fn from_listings<'a>(
        at: DateTime<Utc>,
        stores: impl IntoIterator<Item = (&'a str, Result<&'a Listing, String>)>,
    ) -> Self {
        let mut listed = Listed {
            stored: Stored::default(),
            stores: Vec::new(),
            newest: None,
            ids: std::collections::HashSet::new(),
        };
        for (i, (store, listing)) in stores.into_iter().enumerate() {
            let (backups, untrusted, error) = match &listing {
                Ok(l) => (Some(l.backups.len()), l.untrusted.len(), None),
                Err(e) => (None, 0, Some(e.clone())),
            };
            listed.stores.push(StoreCount {
                store: store.to_string(),
                backups,
                untrusted,
                error,
                listed_at: Some(at),
            });
            if let (0, Ok(l)) = (i, listing) {
                listed.stored = stored(&l.backups);
                listed.ids = l.backups.iter().map(|m| m.backup_id.clone()).collect();
                listed.newest = l.backups.first().map(|m| BackupInStore {
                    series: m.series(),
                    store: store.to_string(),
                    backup_id: m.backup_id.clone(),
                });
            }
        }
        listed
    }

    /// Each of the job's stores, not listed yet.
    pub fn not_yet(job: &JobConfig) -> Self {
        Listed {
            stored: Stored::default(),
            stores: job
                .storage
                .iter()
                .map(|s| StoreCount {
                    store: s.clone(),
                    backups: None,
                    untrusted: 0,
                    error: None,
                    listed_at: None,
                })
                .collect(),
            newest: None,
            ids: std::collections::HashSet::new(),
        }
    }

    /// Whether it lists exactly `job`'s stores, in its order (a reload
    /// can change them).
    pub fn is_for(&self, job: &JobConfig) -> bool {
        self.stores.len() == job.storage.len()
            && self
                .stores
                .iter()
                .zip(&job.storage)
                .all(|(a, b)| a.store == *b)
    }

    /// Whether the first store held backup `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
}

/// One listing of each of `job`'s stores.
pub async fn list_stores(config: &Config, job: &JobConfig) -> Listed {
    let at = Utc::now();
    let mut listings = Vec::with_capacity(job.storage.len());
    for store in &job.storage {
        listings.push(match Store::open(config, store).await {
            Ok(b) => b.job_backups(job).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        });
    }
    Listed::from_listings(
        at,
        job.storage
            .iter()
            .map(String::as_str)
            .zip(listings.iter().map(|l| l.as_ref().map_err(Clone::clone))),
    )
}

/// What the first store's backups (newest first) say of their sizes.
fn stored(m: &[Trusted<Manifest>]) -> Stored {
    // Sizes per run: a cluster job's parts of one run share its id.
    let mut runs: Vec<(&str, u64, u64)> = Vec::new();
    for x in m {
        match runs.iter_mut().find(|(id, ..)| *id == x.backup_id) {
            Some(r) => {
                r.1 += x.stored_bytes();
                r.2 += x.dump_bytes();
            }
            None => runs.push((&x.backup_id, x.stored_bytes(), x.dump_bytes())),
        }
    }
    Stored {
        count: Some(m.len()),
        latest: runs.first().map(|r| r.1),
        previous: runs.get(1).map(|r| r.1),
        median: median(runs.iter().skip(1).take(HISTORY).map(|r| r.1).collect()),
        latest_dump: runs.first().map(|r| r.2),
        suspect: m.first().is_some_and(|x| x.suspect.is_some()),
        verification: None,
    }
}

/// One job's status.
///
/// # Errors
/// A catalog error.
pub async fn job_status(
    config: &Config,
    catalog: &Catalog,
    job: &JobConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<JobStatus> {
    let mut rows = statuses(config, catalog, &[job], now).await?;
    rows.pop()
        .ok_or_else(|| anyhow::anyhow!("no status for job {}", job.name))
}

/// One job's row at `now` from what was read of it.
pub fn job_row(job: &JobConfig, read: &JobRead, now: DateTime<Utc>) -> JobStatus {
    // The last backup and the chart's points: the newest backup runs (a
    // fleet's skipped ticks are not runs, and prunes and verifies do not
    // push backups out of the window).
    let runs = &read.facts.recent_backups;
    let last = last_run(&read.facts);
    let success = read.facts.last_success;
    let rpo = job.effective_rpo(now);
    let next = job
        .schedule
        .as_ref()
        .and_then(|s| s.next_after(now, job.timezone));
    let Listed { stored, stores, .. } = &read.listed;
    let failing = last.is_some_and(|r| r.outcome == Some(Outcome::Failed));
    let stale = match (success, rpo) {
        (Some(t), Some(rpo)) => now - t > rpo,
        _ => false,
    };
    let state = if failing {
        "failing"
    } else if success.is_none() && job.schedule.is_some() {
        "never succeeded"
    } else if stored.suspect {
        "suspect"
    } else if stale {
        "stale"
    } else {
        "ok"
    };
    let restore_seconds = read
        .facts
        .last_drill
        .map(|(s, f)| (f - s).num_milliseconds().max(0) as f64 / 1000.0);
    JobStatus {
        databases: read.databases.clone(),
        job: job.name.clone(),
        state: state.into(),
        last_run_outcome: last.and_then(|r| r.outcome),
        last_run_at: last.and_then(|r| r.finished_at),
        last_error: last.and_then(|r| r.error.clone()),
        last_success_at: success,
        rpo_seconds: rpo.map(|d| d.num_seconds()),
        next_run_at: next,
        backups_stored: stored.count,
        latest_stored_bytes: stored.latest,
        previous_stored_bytes: stored.previous,
        median_stored_bytes: stored.median,
        latest_dump_bytes: stored.latest_dump,
        last_verify: stored.verification.as_ref().map(|v| verify_line(v, now)),
        verification: stored.verification.clone(),
        stores: stores.clone(),
        restore_seconds,
        rto_seconds: job.rto.map(|d| d.as_secs() as i64),
        history: history(runs),
    }
}

/// The rows of a cluster job's databases, against its latest run.
async fn database_rows(
    catalog: &Catalog,
    job: &JobConfig,
    latest_run: Option<&str>,
) -> anyhow::Result<Vec<DatabaseStatus>> {
    let mut out = Vec::new();
    for s in catalog.series_of(&job.name).await? {
        let Some(database) = backstop_vocab::series::split(&s)
            .1
            .and_then(backstop_vocab::series::database_of)
        else {
            continue;
        };
        let last = catalog
            .recent_runs_done(Some(&s), 20)
            .await?
            .into_iter()
            .find(|r| r.kind == RunKind::Backup && r.outcome.is_some());
        let success = catalog
            .last_finished(&s, RunKind::Backup, Outcome::Success)
            .await?;
        let in_latest = last
            .as_ref()
            .is_some_and(|r| latest_run.is_some() && r.backup_id.as_deref() == latest_run);
        let state = match last.as_ref().and_then(|r| r.outcome) {
            _ if !in_latest => "missing",
            Some(Outcome::Failed | Outcome::Interrupted) => "failing",
            Some(Outcome::Suspect) => "suspect",
            _ => "ok",
        };
        out.push(DatabaseStatus {
            database,
            state: state.into(),
            last_success_at: success.as_ref().map(|s| s.0),
            last_error: last
                .as_ref()
                .filter(|r| r.outcome == Some(Outcome::Failed))
                .and_then(|r| r.error.clone()),
            latest_dump_bytes: success.and_then(|s| s.1),
        });
    }
    Ok(out)
}

/// A job's page: its status, backups per store, runs, verifications and
/// what the next prune would delete.
#[derive(Debug, Clone, Serialize)]
pub struct JobDetail {
    pub status: JobStatus,
    pub backups: Vec<StoreBackups>,
    /// The latest runs of the job (and of a cluster job's databases), newest first.
    pub runs: Vec<RunRow>,
    /// The retention plan per store and series; `None`: the job keeps everything.
    pub retention: Option<Vec<PlanRow>>,
}

/// The complete backups of one store, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct StoreBackups {
    pub store: String,
    pub backups: Vec<BackupRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One backup, as `backstop list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupRow {
    pub series: String,
    pub backup_id: String,
    pub started_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub dump_bytes: u64,
    pub stored_bytes: u64,
    pub tables: u64,
    pub rows: Option<u64>,
    pub rows_estimated: bool,
    pub suspect: bool,
    pub verification: Option<Verification>,
}

/// One run from the catalog.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub series: String,
    pub kind: String,
    pub level: Option<String>,
    pub backup_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub seconds: Option<f64>,
    /// `running`, `pending` or the outcome.
    pub outcome: String,
    pub error: Option<String>,
    pub node: Option<String>,
}

/// The retention plan of one series in one store.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub store: String,
    pub series: String,
    pub decisions: Vec<PlanDecision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanDecision {
    pub backup_id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// How many runs a job page shows.
pub const PAGE_RUNS: u32 = 100;

/// The job page of `job`.
///
/// # Errors
/// A catalog error.
pub async fn job_detail(
    config: &Config,
    catalog: &Catalog,
    job: &JobConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<JobDetail> {
    let status = job_status(config, catalog, job, now).await?;
    let mut backups = Vec::new();
    for store in &job.storage {
        backups.push(store_backups(config, catalog, job, store).await);
    }
    let mut runs: Vec<RunRow> = catalog
        .recent_runs_done(Some(&job.name), PAGE_RUNS)
        .await?
        .into_iter()
        .map(run_row)
        .collect();
    for s in catalog.series_of(&job.name).await? {
        runs.extend(
            catalog
                .recent_runs_done(Some(&s), PAGE_RUNS)
                .await?
                .into_iter()
                .map(run_row),
        );
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.started_at));
    runs.truncate(PAGE_RUNS as usize);
    let retention = match &job.retention {
        None => None,
        // A dry run: it lists and plans, it deletes and records nothing.
        Some(r) => Some(
            backstop_pipeline::prune::prune_job(config, job, r, catalog, &job.storage, true)
                .await?
                .into_iter()
                .map(|(store, r)| match r {
                    Ok(rep) => PlanRow {
                        store,
                        series: rep.series,
                        decisions: rep
                            .plan
                            .decisions
                            .into_iter()
                            .map(|d| PlanDecision {
                                backup_id: d.id,
                                keep: d.keep,
                                reasons: d.reasons,
                            })
                            .collect(),
                        error: None,
                    },
                    Err(e) => PlanRow {
                        store,
                        series: job.name.clone(),
                        decisions: Vec::new(),
                        error: Some(e.to_string()),
                    },
                })
                .collect(),
        ),
    };
    Ok(JobDetail {
        status,
        backups,
        runs,
        retention,
    })
}

fn run_row(r: RunRecord) -> RunRow {
    RunRow {
        outcome: match r.outcome {
            Some(o) => o.to_string(),
            None if r.pending => "pending".into(),
            None => "running".into(),
        },
        seconds: r
            .finished_at
            .map(|f| (f - r.started_at).num_milliseconds().max(0) as f64 / 1000.0),
        series: r.job,
        kind: r.kind.to_string(),
        level: r.level,
        backup_id: r.backup_id,
        started_at: r.started_at,
        error: r.error,
        node: r.node,
    }
}

async fn store_backups(
    config: &Config,
    catalog: &Catalog,
    job: &JobConfig,
    store: &str,
) -> StoreBackups {
    let listed = async {
        let backend = Store::open(config, store).await?;
        let manifests = backend
            .job_backups(job)
            .await
            .map_err(|e| e.to_string())?
            .backups;
        let mut verified = std::collections::HashMap::new();
        let mut rows = Vec::with_capacity(manifests.len());
        for m in manifests {
            let series = m.series();
            if !verified.contains_key(&series) {
                let from_catalog = catalog
                    .last_verifications(&series, store)
                    .await
                    .map_err(|e| e.to_string())?;
                let records = backend
                    .verifications(&series)
                    .await
                    .map_err(|e| e.to_string())?;
                let v = backstop_pipeline::verification::merge_latest(&records, Some(from_catalog));
                verified.insert(series.clone(), v);
            }
            rows.push(BackupRow {
                verification: verified[&series].get(&m.backup_id).cloned(),
                series,
                started_at: m.started_at,
                duration_seconds: m.duration_seconds,
                dump_bytes: m.dump_bytes(),
                stored_bytes: m.stored_bytes(),
                tables: m.inventory.tables,
                rows: m.total_rows(),
                rows_estimated: m.row_counts == "estimate",
                suspect: m.suspect.is_some(),
                backup_id: m.backup_id.clone(),
            });
        }
        Ok::<_, String>(rows)
    }
    .await;
    match listed {
        Ok(backups) => StoreBackups {
            store: store.to_string(),
            backups,
            error: None,
        },
        Err(e) => StoreBackups {
            store: store.to_string(),
            backups: Vec::new(),
            error: Some(e),
        },
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_size() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![7]), Some(7));
        assert_eq!(median(vec![9, 1, 5]), Some(5));
        assert_eq!(median(vec![4, 1, 3, 100]), Some(3));
    }
}
