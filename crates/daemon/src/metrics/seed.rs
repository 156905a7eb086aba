//! The metrics a restart must not lose: seeded from the catalog and the
//! stores at start and after each run (last success and failure, sizes,
//! backups per store, untrusted objects, drills, a cluster's databases), so
//! a restart never makes a stale job look fresh or hides a failure.

use backstop_config::{Config, JobConfig};
use backstop_pipeline::store::Store;
use backstop_scheduler::RunKind;
use chrono::Utc;
use tracing::warn;

use crate::Core;

impl Core {
    /// Counts a prune's deletions and Object Lock refusals per store.
    pub(crate) fn count_pruned(&self, job: &str, stores: &[(String, usize, usize)]) {
        for (store, deleted, locked) in stores {
            self.metrics
                .retention_deleted
                .with_label_values(&[job, store])
                .inc_by(*deleted as u64);
            self.metrics
                .retention_locked
                .with_label_values(&[job, store])
                .inc_by(*locked as u64);
        }
    }

    /// A cluster run's per-database series: each database's last success
    /// or failure and size, and which databases are gone or unreachable.
    pub(crate) fn observe_cluster(
        &self,
        job: &JobConfig,
        c: &backstop_pipeline::backup::cluster::ClusterReport,
    ) {
        let now = Utc::now().timestamp() as f64;
        for m in &c.members {
            let Some(db) = &m.database else { continue };
            let labels = [job.name.as_str(), db.as_str()];
            match &m.result {
                Ok(r) => {
                    self.metrics
                        .db_last_success
                        .with_label_values(&labels)
                        .set(r.manifest.finished_at.timestamp() as f64);
                    self.metrics
                        .db_last_size
                        .with_label_values(&labels)
                        .set(r.manifest.dump_bytes() as f64);
                    self.metrics.db_last_failure.with_label_values(&labels);
                }
                Err(_) => self
                    .metrics
                    .db_last_failure
                    .with_label_values(&labels)
                    .set(now),
            }
            self.metrics.db_missing.with_label_values(&labels).set(0.0);
            self.metrics
                .db_unreachable
                .with_label_values(&labels)
                .set(0.0);
        }
        for db in &c.missing {
            self.metrics
                .db_missing
                .with_label_values(&[job.name.as_str(), db.as_str()])
                .set(1.0);
        }
        for db in &c.not_connectable {
            self.metrics
                .db_unreachable
                .with_label_values(&[job.name.as_str(), db.as_str()])
                .set(1.0);
        }
    }

    /// The measured restore time of the job's latest successful drill.
    pub(crate) async fn refresh_drill(&self, job: &JobConfig) {
        if let Some(rto) = job.rto {
            self.metrics
                .rto
                .with_label_values(&[&job.name])
                .set(rto.as_secs_f64());
        }
        if let Ok(Some((started, finished))) = self.catalog.last_drill(&job.name).await {
            self.metrics
                .restore_duration
                .with_label_values(&[&job.name])
                .set((finished - started).num_milliseconds() as f64 / 1000.0);
        }
    }

    /// Backups stored, bytes used and the oldest backup, per store of the
    /// job (of a cluster job: of all its databases and globals together),
    /// from one listing of each store, which the status page keeps too (it
    /// never lists a store for a request). A listing that began before the
    /// one kept (which may miss what a run did since) changes nothing.
    pub(crate) async fn refresh_storage(&self, config: &Config, job: &JobConfig) {
        let seq = self.status.begin_listing();
        let at = Utc::now();
        let mut listings = Vec::with_capacity(job.storage.len());
        for store in &job.storage {
            let listed = match Store::open(config, store).await {
                Ok(b) => {
                    let listing = b.job_backups(job).await;
                    // Verification records are store objects too: a forged
                    // one is as much news as a forged manifest.
                    let mut records = 0;
                    if listing.is_ok() {
                        for s in b.series(job).await.unwrap_or_default() {
                            if let Ok(r) = b.verifications(&s.name).await {
                                records += r.untrusted.len();
                            }
                        }
                    }
                    listing.map(|l| (l, records)).map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &listed {
                warn!(job = %job.name, store, error = %e, "Cannot list the store for its metrics.");
            }
            listings.push(listed);
        }
        let newest = self.status.listed(
            &job.name,
            seq,
            crate::status::Listed::from_listings(
                at,
                job.storage
                    .iter()
                    .map(String::as_str)
                    .zip(listings.iter().map(|l| match l {
                        Ok((listing, _)) => Ok(listing),
                        Err(e) => Err(e.clone()),
                    })),
            ),
        );
        if newest {
            for (store, listed) in job.storage.iter().zip(&listings) {
                if let Ok((listing, untrusted_records)) = listed {
                    self.count_stored(job, store, listing, *untrusted_records);
                }
            }
        }
    }

    /// The metrics of one store's listing of the job.
    fn count_stored(
        &self,
        job: &JobConfig,
        store: &str,
        listing: &backstop_pipeline::Listing,
        untrusted_records: usize,
    ) {
        let labels = [job.name.as_str(), store];
        let untrusted = listing.untrusted.len() + untrusted_records;
        let before = self
            .untrusted_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((job.name.clone(), store.to_string()), untrusted);
        if untrusted > 0 && before != Some(untrusted) {
            for u in &listing.untrusted {
                warn!(job = %job.name, store, key = %u.key, reason = %u.reason, "The store holds an object posing as a backup that is not trusted: nobody here wrote it (see docs/SECURITY.md).");
            }
        }
        self.metrics
            .untrusted_objects
            .with_label_values(&labels)
            .set(untrusted as f64);
        let manifests = &listing.backups;
        self.metrics
            .backups_stored
            .with_label_values(&labels)
            .set(manifests.len() as f64);
        self.metrics
            .storage_used
            .with_label_values(&labels)
            .set(manifests.iter().map(|m| m.stored_bytes()).sum::<u64>() as f64);
        if let Some(oldest) = manifests.iter().map(|m| m.started_at).min() {
            self.metrics
                .oldest_backup
                .with_label_values(&labels)
                .set(oldest.timestamp() as f64);
        }
    }

    /// Seeds the metrics from the catalog and the stores, so a restart does
    /// not make a stale job look fresh or hide a failure.
    ///
    /// Length: one seeded family after another, each read from the catalog for
    /// every job.
    pub(crate) async fn seed_metrics(&self) {
        let config = self.config();
        let now = Utc::now();
        // Listed below, one after another: the page does not ask meanwhile.
        self.status
            .listing_soon(config.jobs.iter().map(|j| j.name.as_str()));
        for job in &config.jobs {
            let name = job.name.as_str();
            // Present at 0 from the start, so `increase()` sees the first failure.
            for n in job.notify.iter().filter_map(|n| config.notifiers.get(n)) {
                for on in &n.on {
                    let outcome = on.as_str();
                    self.metrics
                        .notifications_sent
                        .with_label_values(&[name, outcome]);
                    self.metrics
                        .notifications_failed
                        .with_label_values(&[name, outcome]);
                }
            }
            // Present at 0 from the start (dashboards show 0, not "no data").
            self.metrics.skipped.with_label_values(&[name, "backup"]);
            self.metrics.lock_blocks.with_label_values(&[name]);
            // 0 until a dump of the job pauses a standby's replay.
            self.metrics.replay_lag.with_label_values(&[name]);
            self.metrics.replay_paused.with_label_values(&[name]);
            if job.verify.is_some() {
                self.metrics.skipped.with_label_values(&[name, "verify"]);
            }
            for kind in RunKind::ALL {
                let ok = self
                    .catalog
                    .last_finished(name, kind, backstop_catalog::Outcome::Success)
                    .await
                    .ok()
                    .flatten();
                let bad = self
                    .catalog
                    .last_finished(name, kind, backstop_catalog::Outcome::Failed)
                    .await
                    .ok()
                    .flatten();
                let configured = match kind {
                    RunKind::Backup => true,
                    RunKind::Verify => job.verify.is_some(),
                    RunKind::Prune => job.retention.is_some(),
                };
                let kind = kind.as_str();
                if configured || ok.is_some() {
                    // 0 = never: alert rules tell "never succeeded" from "stale".
                    self.metrics
                        .last_success
                        .with_label_values(&[name, kind])
                        .set(ok.as_ref().map_or(0.0, |o| o.0.timestamp() as f64));
                }
                if configured || bad.is_some() {
                    // 0 = never failed (documented and on dashboards; the
                    // alert compares it with the last success).
                    self.metrics
                        .last_failure
                        .with_label_values(&[name, kind])
                        .set(bad.as_ref().map_or(0.0, |b| b.0.timestamp() as f64));
                }
                if kind == "verify" && (configured || ok.is_some()) {
                    // 0 = never verified, which BackstopVerifyStale reports.
                    self.metrics
                        .verify_last_success
                        .with_label_values(&[name])
                        .set(ok.as_ref().map_or(0.0, |o| o.0.timestamp() as f64));
                }
                if kind == "backup"
                    && let Some((_, dump, stored)) = ok
                {
                    if let Some(d) = dump {
                        self.metrics
                            .last_size
                            .with_label_values(&[name, "dump"])
                            .set(d as f64);
                    }
                    if let Some(s) = stored {
                        self.metrics
                            .last_size
                            .with_label_values(&[name, "stored"])
                            .set(s as f64);
                    }
                }
            }
            // The RPO last of the job's catalog-derived series: BackstopBackupStale
            // compares it with the last success, so a scrape must never see
            // an RPO without it (a reload's scrape did, on a loaded machine).
            if let Some(interval) = job
                .schedule
                .as_ref()
                .and_then(|s| s.interval_after(now, job.timezone))
            {
                self.metrics
                    .interval
                    .with_label_values(&[name])
                    .set(interval.num_milliseconds() as f64 / 1000.0);
            }
            if let Some(rpo) = job.effective_rpo(now) {
                self.metrics
                    .rpo
                    .with_label_values(&[name])
                    .set(rpo.num_milliseconds() as f64 / 1000.0);
            }
            if job.retention.is_some() {
                for store in &job.storage {
                    self.metrics
                        .retention_deleted
                        .with_label_values(&[name, store]);
                    self.metrics
                        .retention_locked
                        .with_label_values(&[name, store]);
                }
            }
            // A cluster job's per-database series before the store's: a
            // scrape that sees the backups in the store sees each
            // database's last success and size too (one did not, between).
            if job.cluster.is_some() {
                self.seed_databases(job).await;
            }
            self.refresh_drill(job).await;
            self.refresh_storage(&config, job).await;
        }
    }

    /// A cluster job's per-database series from the catalog.
    pub(crate) async fn seed_databases(&self, job: &JobConfig) {
        let Ok(series) = self.catalog.series_of(&job.name).await else {
            return;
        };
        for s in series {
            let Some(db) = backstop_vocab::series::split(&s)
                .1
                .and_then(backstop_vocab::series::database_of)
            else {
                continue;
            };
            let labels = [job.name.as_str(), db.as_str()];
            let ok = self
                .catalog
                .last_finished(&s, RunKind::Backup, backstop_catalog::Outcome::Success)
                .await
                .ok()
                .flatten();
            let bad = self
                .catalog
                .last_finished(&s, RunKind::Backup, backstop_catalog::Outcome::Failed)
                .await
                .ok()
                .flatten();
            if let Some((at, dump, _)) = ok {
                self.metrics
                    .db_last_success
                    .with_label_values(&labels)
                    .set(at.timestamp() as f64);
                if let Some(d) = dump {
                    self.metrics
                        .db_last_size
                        .with_label_values(&labels)
                        .set(d as f64);
                }
            }
            self.metrics
                .db_last_failure
                .with_label_values(&labels)
                .set(bad.map_or(0.0, |b| b.0.timestamp() as f64));
        }
    }
}
