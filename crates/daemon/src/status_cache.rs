//! What the status page and `/api/v1/status` serve from: each job's last
//! [`JobRead`], kept between requests, so a page of 1,000 jobs costs the
//! rows' arithmetic and its HTML, not the catalog and every store each
//! time. A request never lists a store.
//!
//! What the stores hold is the daemon's own listing of each job's stores
//! ([`StatusCache::listed`]), made when it lists them anyway: at start and
//! after a reload (seeding the metrics), and after each backup or prune it
//! runs. Besides, its lister ([`keep_listed`]) lists a job again
//! - when the catalog's newest backup of the job is not the listing's
//!   newest (another node's or a one-shot's backup), once for each such
//!   backup;
//! - every [`LIST_EVERY`] (what nobody recorded: a hand deletion, a
//!   lifecycle rule, another node's prune).
//!
//! How fresh the catalog's part is:
//! - a job this daemon ran (a run started or ended) or listed is read again
//!   at the next request, so what this daemon did shows at once;
//! - while someone looks (a request in the last [`WATCHED`]), a task reads
//!   every job again each [`EVERY`], so another node's runs show within it;
//! - a request reads whatever is older than [`STALE`] (the first after a
//!   quiet spell, or when the task fell behind) and any job it never read.
//!
//! `backstop status` and a job's own page read everything themselves (one
//! look, read afresh).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backstop_catalog::Catalog;
use backstop_config::{Config, JobConfig};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Core;
use crate::status::{JobRead, JobStatus, Listed, attention_first, job_row, read_catalog};

/// How often the task reads every job again while someone looks.
pub const EVERY: Duration = Duration::from_secs(30);
/// What a request reads again itself.
pub const STALE: Duration = Duration::from_secs(90);
/// How long after the last request the task keeps reading.
pub const WATCHED: Duration = Duration::from_secs(300);
/// How often the lister lists every job's stores again.
pub const LIST_EVERY: Duration = Duration::from_secs(3600);
/// Jobs the lister lists at once.
const LISTERS: usize = 4;

/// A job's last listing of its stores.
struct Shelf {
    listed: Listed,
    /// The catalog's newest backup a listing was last asked for: asked
    /// once, however often the catalog is read before the store has it.
    asked_for: Option<String>,
    /// When it began, in [`StatusCache::begin_listing`]'s order.
    seq: u64,
}

struct Kept {
    read: JobRead,
    at: Instant,
}

/// The kept reads (see the module's text).
#[derive(Default)]
pub struct StatusCache {
    /// One reader at a time: requests arriving during a read wait for it
    /// and find its result.
    kept: tokio::sync::Mutex<HashMap<String, Kept>>,
    /// Jobs this daemon changed since they were read.
    changed: std::sync::Mutex<HashSet<String>>,
    /// When the page or the API was last asked for.
    asked: std::sync::Mutex<Option<Instant>>,
    /// Each job's last listing of its stores.
    listings: std::sync::Mutex<HashMap<String, Shelf>>,
    /// Jobs the lister is to list, and those whose listing is asked for
    /// or about to come (the seed's) and has not begun: asked once.
    to_list: std::sync::Mutex<(HashSet<String>, HashSet<String>)>,
    /// Wakes the lister.
    wake: tokio::sync::Notify,
    /// The order listings begin in.
    seq: std::sync::atomic::AtomicU64,
    /// Runs of each job going here: the catalog can record a backup
    /// before the run's own listing is made.
    running: std::sync::Mutex<HashMap<String, usize>>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StatusCache {
    /// A run of `job` started or ended here: read it again at the next
    /// request.
    pub fn changed(&self, job: &str) {
        lock(&self.changed).insert(job.to_string());
    }

    /// A run of `job` began here (its first attempt).
    pub fn run_began(&self, job: &str) {
        *lock(&self.running).entry(job.to_string()).or_default() += 1;
    }

    /// A run of `job` ended here (after its own listing).
    pub fn run_ended(&self, job: &str) {
        let mut running = lock(&self.running);
        if let Some(n) = running.get_mut(job) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(job);
            }
        }
    }

    /// The daemon is about to list `jobs` itself (seeding its metrics at
    /// start or after a reload): the page does not ask the lister for them
    /// meanwhile.
    pub fn listing_soon<'a>(&self, jobs: impl IntoIterator<Item = &'a str>) {
        let mut to_list = lock(&self.to_list);
        for job in jobs {
            to_list.0.remove(job);
            to_list.1.insert(job.to_string());
        }
    }

    /// A listing is beginning: its place in the order listings began in,
    /// for [`Self::listed`].
    pub fn begin_listing(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// What `job`'s stores hold (the daemon listed them, the listing begun
    /// as `seq`): kept for the page, and the job read again from the
    /// catalog at the next request. Returns false, keeping nothing, when
    /// the kept listing began later (this one may miss what a run did
    /// since).
    pub fn listed(&self, job: &str, seq: u64, listed: Listed) -> bool {
        lock(&self.to_list).1.remove(job);
        let mut shelves = lock(&self.listings);
        let asked_for = match shelves.get(job) {
            Some(kept) if kept.seq > seq => return false,
            Some(kept) => kept.asked_for.clone(),
            None => None,
        };
        shelves.insert(
            job.to_string(),
            Shelf {
                listed,
                asked_for,
                seq,
            },
        );
        drop(shelves);
        self.changed(job);
        true
    }

    /// `job`'s last listing, or (none yet, or of other stores: a reload)
    /// a placeholder, asking the lister for one.
    fn listing_of(&self, job: &JobConfig) -> Listed {
        if let Some(s) = lock(&self.listings).get(&job.name)
            && s.listed.is_for(job)
        {
            return s.listed.clone();
        }
        self.want(&job.name);
        Listed::not_yet(job)
    }

    /// Asks the lister to list `job` (once until it has).
    fn want(&self, job: &str) {
        let mut to_list = lock(&self.to_list);
        if to_list.1.insert(job.to_string()) {
            to_list.0.insert(job.to_string());
            drop(to_list);
            self.wake.notify_one();
        }
    }

    /// Asks for a listing of `job` when the catalog knows a backup its
    /// listing does not hold (another node's or process's), once per such
    /// backup; not while a run of it goes here (it lists when it ends).
    fn compare(&self, job: &str, read: &JobRead) {
        let Some(newest) = read.catalog_newest() else {
            return;
        };
        if lock(&self.running).contains_key(job) {
            return;
        }
        let mut shelves = lock(&self.listings);
        let Some(shelf) = shelves.get_mut(job) else {
            return;
        };
        if shelf.listed.holds(newest) || shelf.asked_for.as_deref() == Some(newest) {
            return;
        }
        shelf.asked_for = Some(newest.to_string());
        drop(shelves);
        self.want(job);
    }

    /// The jobs to list now: asked for again from here on (a backup the
    /// catalog shows while they are listed is asked for anew).
    fn take_wanted(&self) -> HashSet<String> {
        let mut to_list = lock(&self.to_list);
        let taken = std::mem::take(&mut to_list.0);
        for job in &taken {
            to_list.1.remove(job);
        }
        taken
    }

    /// Every job of `config`, attention first, then by name, at `now`:
    /// what is kept, after reading again what this daemon changed, what
    /// is older than `stale` and what was never read.
    ///
    /// # Errors
    /// A catalog error (what was kept stays).
    pub async fn collect(
        &self,
        config: &Config,
        catalog: &Catalog,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Vec<JobStatus>> {
        *lock(&self.asked) = Some(Instant::now());
        let mut kept = self.kept.lock().await;
        let changed = std::mem::take(&mut *lock(&self.changed));
        let due: Vec<&JobConfig> = config
            .jobs
            .iter()
            .filter(|j| {
                changed.contains(&j.name)
                    || kept.get(&j.name).is_none_or(|k| k.at.elapsed() > STALE)
            })
            .collect();
        if let Err(e) = self.read_into(&mut kept, catalog, &due).await {
            // Read them again next time.
            lock(&self.changed).extend(changed);
            return Err(e);
        }
        kept.retain(|name, _| config.job(name).is_some());
        lock(&self.listings).retain(|name, _| config.job(name).is_some());
        let mut rows: Vec<JobStatus> = config
            .jobs
            .iter()
            .filter_map(|j| kept.get(&j.name).map(|k| job_row(j, &k.read, now)))
            .collect();
        attention_first(&mut rows);
        Ok(rows)
    }

    /// Every job read again now (a reload, or the task's round).
    async fn refresh(&self, config: &Config, catalog: &Catalog) -> anyhow::Result<()> {
        let mut kept = self.kept.lock().await;
        let jobs: Vec<&JobConfig> = config.jobs.iter().collect();
        self.read_into(&mut kept, catalog, &jobs).await?;
        kept.retain(|name, _| config.job(name).is_some());
        Ok(())
    }

    /// Whether a request came in the last [`WATCHED`].
    fn watched(&self) -> bool {
        lock(&self.asked).is_some_and(|t| t.elapsed() < WATCHED)
    }

    /// Reads `jobs` from the catalog, with their last listings, into
    /// `kept`.
    async fn read_into(
        &self,
        kept: &mut HashMap<String, Kept>,
        catalog: &Catalog,
        jobs: &[&JobConfig],
    ) -> anyhow::Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let listed = jobs.iter().map(|j| self.listing_of(j)).collect();
        let reads = read_catalog(catalog, jobs, listed).await?;
        let at = Instant::now();
        for (job, read) in jobs.iter().zip(reads) {
            self.compare(&job.name, &read);
            kept.insert(job.name.clone(), Kept { read, at });
        }
        Ok(())
    }

    /// Forgets every read (a reload: jobs and stores may have changed).
    pub async fn forget(&self) {
        self.kept.lock().await.clear();
    }
}

/// Reads every job again each [`EVERY`] while someone looks, until `stop`.
pub(crate) async fn keep_fresh(
    cache: Arc<StatusCache>,
    config: impl Fn() -> Arc<Config> + Send,
    catalog: Catalog,
    stop: CancellationToken,
) {
    let every = every();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if !cache.watched() {
            continue;
        }
        let config = config();
        tokio::select! {
            () = stop.cancelled() => return,
            r = cache.refresh(&config, &catalog) => {
                if let Err(e) = r {
                    tracing::debug!(error = %format!("{e:#}"), "Cannot read the status again; the next request or round tries again.");
                }
            }
        }
    }
}

/// Lists the stores of the jobs asked for ([`StatusCache::want`]), and
/// every job's each [`LIST_EVERY`], until `stop`.
pub(crate) async fn keep_listed(core: Arc<Core>, stop: CancellationToken) {
    use futures::StreamExt;
    let mut every = tokio::time::interval_at(Instant::now() + LIST_EVERY, LIST_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all = tokio::select! {
            () = stop.cancelled() => return,
            () = core.status.wake.notified() => false,
            _ = every.tick() => true,
        };
        let wanted = core.status.take_wanted();
        let config = core.config();
        // The hourly round is for the page only: the metrics are the
        // daemon's own runs' and need no more.
        let all = all && config.daemon.status_page;
        let jobs: Vec<&JobConfig> = config
            .jobs
            .iter()
            .filter(|j| all || wanted.contains(&j.name))
            .collect();
        let listing = futures::stream::iter(jobs)
            .for_each_concurrent(LISTERS, |job| core.refresh_storage(&config, job));
        tokio::select! {
            () = stop.cancelled() => return,
            () = listing => {}
        }
    }
}

fn every() -> Duration {
    // The test build can read sooner.
    crate::test_wait("BACKSTOP_TEST_STATUS_EVERY_MS").unwrap_or(EVERY)
}
