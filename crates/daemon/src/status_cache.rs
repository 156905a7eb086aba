//! What the status page and `/api/v1/status` serve from: each job's last
//! [`JobRead`], kept between requests, so a page of 1,000 jobs costs the
//! rows' arithmetic and its HTML, not the catalog and every store each
//! time.
//!
//! How fresh it is:
//! - a job this daemon ran (a run started or ended) is read again at the
//!   next request, so what this daemon did shows at once;
//! - while someone looks (a request in the last [`WATCHED`]), a task reads
//!   every job again each [`EVERY`], so another node's runs show within it;
//! - a request reads whatever is older than [`STALE`] (the first after a
//!   quiet spell, or when the task fell behind) and any job it never read.
//!
//! `backstop status` reads everything itself (it is one process, one look).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backstop_catalog::Catalog;
use backstop_config::{Config, JobConfig};
use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::status::{JobRead, JobStatus, attention_first, job_row, read_jobs};

/// How often the task reads every job again while someone looks.
pub const EVERY: Duration = Duration::from_secs(30);
/// What a request reads again itself.
pub const STALE: Duration = Duration::from_secs(90);
/// How long after the last request the task keeps reading.
pub const WATCHED: Duration = Duration::from_secs(300);

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
        if let Err(e) = read_into(&mut kept, config, catalog, &due).await {
            // Read them again next time.
            lock(&self.changed).extend(changed);
            return Err(e);
        }
        kept.retain(|name, _| config.job(name).is_some());
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
        read_into(&mut kept, config, catalog, &jobs).await?;
        kept.retain(|name, _| config.job(name).is_some());
        Ok(())
    }

    /// Whether a request came in the last [`WATCHED`].
    fn watched(&self) -> bool {
        lock(&self.asked).is_some_and(|t| t.elapsed() < WATCHED)
    }

    /// Forgets every read (a reload: jobs and stores may have changed).
    pub async fn forget(&self) {
        self.kept.lock().await.clear();
    }
}

async fn read_into(
    kept: &mut HashMap<String, Kept>,
    config: &Config,
    catalog: &Catalog,
    jobs: &[&JobConfig],
) -> anyhow::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let reads = read_jobs(config, catalog, jobs).await?;
    let at = Instant::now();
    for (job, read) in jobs.iter().zip(reads) {
        kept.insert(job.name.clone(), Kept { read, at });
    }
    Ok(())
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

fn every() -> Duration {
    // The test build can read sooner.
    crate::test_wait("BACKSTOP_TEST_STATUS_EVERY_MS").unwrap_or(EVERY)
}
