//! The daemon's Prometheus metrics. Labels are only `job`, `kind`, `storage`,
//! `outcome` (and `stage` on the size gauge, `version`, `revision` and `built` on build_info,
//! `database` on a cluster job's per-database series).

mod seed;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Every metric's name. The alert rules (deploy/prometheus), the Grafana
/// dashboard and the runbook query these, so a rename is a breaking change;
/// a test checks that everything they use is defined here.
pub mod name {
    pub const BACKUP_BYTES_TOTAL: &str = "backstop_backup_bytes_total";
    pub const BACKUP_LAST_SIZE_BYTES: &str = "backstop_backup_last_size_bytes";
    pub const BACKUPS_STORED: &str = "backstop_backups_stored";
    pub const BUILD_INFO: &str = "backstop_build_info";
    pub const CONFIG_RELOAD_SUCCESS: &str = "backstop_config_reload_success";
    pub const CONFIG_HASH: &str = "backstop_config_hash";
    pub const CATALOG_RUNS_FORGOTTEN_TOTAL: &str = "backstop_catalog_runs_forgotten_total";
    pub const FLEET_NODES: &str = "backstop_fleet_nodes";
    pub const FLEET_CONFIG_HASHES: &str = "backstop_fleet_config_hashes";
    pub const FLEET_LEASE_OK: &str = "backstop_fleet_lease_ok";
    pub const FLEET_PENDING_RUNS: &str = "backstop_fleet_pending_runs";
    pub const FLEET_PENDING_AGE_SECONDS: &str = "backstop_fleet_pending_age_seconds";
    pub const FLEET_NODE_RUNNING_RUNS: &str = "backstop_fleet_node_running_runs";
    pub const FLEET_CLAIM_SECONDS: &str = "backstop_fleet_claim_seconds";
    pub const JOB_INTERVAL_SECONDS: &str = "backstop_job_interval_seconds";
    pub const JOB_DURATION_SECONDS: &str = "backstop_job_duration_seconds";
    pub const JOB_LAST_FAILURE_TIMESTAMP_SECONDS: &str =
        "backstop_job_last_failure_timestamp_seconds";
    pub const JOB_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "backstop_job_last_success_timestamp_seconds";
    pub const JOB_NEXT_RUN_TIMESTAMP_SECONDS: &str = "backstop_job_next_run_timestamp_seconds";
    pub const JOB_RPO_SECONDS: &str = "backstop_job_rpo_seconds";
    pub const JOB_RUNNING: &str = "backstop_job_running";
    pub const JOB_RUNS_TOTAL: &str = "backstop_job_runs_total";
    pub const JOB_SKIPPED_TOTAL: &str = "backstop_job_skipped_total";
    pub const NOTIFICATIONS_FAILED_TOTAL: &str = "backstop_notifications_failed_total";
    pub const NOTIFICATIONS_SENT_TOTAL: &str = "backstop_notifications_sent_total";
    pub const OLDEST_BACKUP_TIMESTAMP_SECONDS: &str = "backstop_oldest_backup_timestamp_seconds";
    pub const RETENTION_DELETED_TOTAL: &str = "backstop_retention_deleted_total";
    pub const RETENTION_LOCKED_TOTAL: &str = "backstop_retention_locked_total";
    pub const STORAGE_USED_BYTES: &str = "backstop_storage_used_bytes";
    pub const STORE_UNTRUSTED_OBJECTS: &str = "backstop_store_untrusted_objects";
    pub const VERIFY_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "backstop_verify_last_success_timestamp_seconds";
    pub const LOCK_BLOCKS_TOTAL: &str = "backstop_lock_blocks_total";
    pub const STANDBY_REPLAY_LAG_BYTES: &str = "backstop_standby_replay_lag_bytes";
    pub const STANDBY_REPLAY_PAUSED_SECONDS: &str = "backstop_standby_replay_paused_seconds";
    pub const STANDBY_REPLAY_PAUSE_AGE_SECONDS: &str = "backstop_standby_replay_pause_age_seconds";
    pub const STANDBY_REPLAY_PAUSE_LIMIT_SECONDS: &str =
        "backstop_standby_replay_pause_limit_seconds";
    pub const JOB_RESTORE_DURATION_SECONDS: &str = "backstop_job_restore_duration_seconds";
    pub const JOB_RTO_SECONDS: &str = "backstop_job_rto_seconds";
    pub const DATABASE_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
        "backstop_database_last_success_timestamp_seconds";
    pub const DATABASE_LAST_FAILURE_TIMESTAMP_SECONDS: &str =
        "backstop_database_last_failure_timestamp_seconds";
    pub const DATABASE_LAST_SIZE_BYTES: &str = "backstop_database_last_size_bytes";
    pub const DATABASE_MISSING: &str = "backstop_database_missing";
    pub const DATABASE_UNREACHABLE: &str = "backstop_database_unreachable";

    /// All of them (the test below checks the deploy files against it).
    #[cfg(test)]
    pub const ALL: &[&str] = &[
        BACKUP_BYTES_TOTAL,
        BACKUP_LAST_SIZE_BYTES,
        BACKUPS_STORED,
        STORE_UNTRUSTED_OBJECTS,
        BUILD_INFO,
        CONFIG_RELOAD_SUCCESS,
        CONFIG_HASH,
        CATALOG_RUNS_FORGOTTEN_TOTAL,
        FLEET_NODES,
        FLEET_CONFIG_HASHES,
        FLEET_LEASE_OK,
        FLEET_PENDING_RUNS,
        FLEET_PENDING_AGE_SECONDS,
        FLEET_NODE_RUNNING_RUNS,
        FLEET_CLAIM_SECONDS,
        JOB_INTERVAL_SECONDS,
        JOB_DURATION_SECONDS,
        JOB_LAST_FAILURE_TIMESTAMP_SECONDS,
        JOB_LAST_SUCCESS_TIMESTAMP_SECONDS,
        JOB_NEXT_RUN_TIMESTAMP_SECONDS,
        JOB_RPO_SECONDS,
        JOB_RUNNING,
        JOB_RUNS_TOTAL,
        JOB_SKIPPED_TOTAL,
        NOTIFICATIONS_FAILED_TOTAL,
        NOTIFICATIONS_SENT_TOTAL,
        OLDEST_BACKUP_TIMESTAMP_SECONDS,
        RETENTION_DELETED_TOTAL,
        RETENTION_LOCKED_TOTAL,
        STORAGE_USED_BYTES,
        VERIFY_LAST_SUCCESS_TIMESTAMP_SECONDS,
        LOCK_BLOCKS_TOTAL,
        STANDBY_REPLAY_LAG_BYTES,
        STANDBY_REPLAY_PAUSED_SECONDS,
        STANDBY_REPLAY_PAUSE_AGE_SECONDS,
        STANDBY_REPLAY_PAUSE_LIMIT_SECONDS,
        JOB_RESTORE_DURATION_SECONDS,
        JOB_RTO_SECONDS,
        DATABASE_LAST_SUCCESS_TIMESTAMP_SECONDS,
        DATABASE_LAST_FAILURE_TIMESTAMP_SECONDS,
        DATABASE_LAST_SIZE_BYTES,
        DATABASE_MISSING,
        DATABASE_UNREACHABLE,
    ];
}

pub struct Metrics {
    pub registry: Registry,
    pub runs: IntCounterVec,
    pub last_success: GaugeVec,
    pub last_failure: GaugeVec,
    pub running: IntGaugeVec,
    pub next_run: GaugeVec,
    pub config_reload_success: IntGauge,
    pub retention_deleted: IntCounterVec,
    pub retention_locked: IntCounterVec,
    pub duration: HistogramVec,
    pub rpo: GaugeVec,
    pub last_size: GaugeVec,
    pub bytes_total: IntCounterVec,
    pub backups_stored: GaugeVec,
    /// Objects in the store posing as the job's backups or verification
    /// records that are not trusted.
    pub untrusted_objects: GaugeVec,
    pub storage_used: GaugeVec,
    pub oldest_backup: GaugeVec,
    pub verify_last_success: GaugeVec,
    /// Sessions the lock guard saw blocked behind a dump.
    pub lock_blocks: IntCounterVec,
    /// The replay lag the last paused standby dump caused, and its pause.
    pub replay_lag: GaugeVec,
    pub replay_paused: GaugeVec,
    /// How long the job's standby has had replay paused by backstop, now,
    /// and how long a pause may last before it is a fault.
    pub replay_pause_age: GaugeVec,
    pub replay_pause_limit: GaugeVec,
    /// The measured restore time of the job's latest successful drill.
    pub restore_duration: GaugeVec,
    /// The job's recovery-time objective (`rto`).
    pub rto: GaugeVec,
    /// A cluster job's databases, each on its own.
    pub db_last_success: GaugeVec,
    pub db_last_failure: GaugeVec,
    pub db_last_size: GaugeVec,
    pub db_missing: GaugeVec,
    pub db_unreachable: GaugeVec,
    pub skipped: IntCounterVec,
    pub notifications_sent: IntCounterVec,
    pub notifications_failed: IntCounterVec,
    /// This node's config digest as a number (label-free: compare nodes
    /// with `count(count_values("h", backstop_config_hash))`).
    pub config_hash: prometheus::Gauge,
    /// Runs this process deleted from the catalog as older than
    /// `daemon.catalog_history`.
    pub catalog_forgotten: prometheus::IntCounter,
    /// Nodes with a live lease in the shared catalog (fleets only).
    pub fleet_nodes: IntGauge,
    /// Distinct config digests among live nodes: above 1, nodes disagree.
    pub fleet_config_hashes: IntGauge,
    /// 1 while this node holds a lease it trusts (fleets only).
    pub fleet_lease_ok: IntGauge,
    /// Runs waiting to be claimed, per job and kind (the whole fleet's).
    pub fleet_pending: GaugeVec,
    /// How long the oldest waiting run of each job and kind has waited.
    pub fleet_pending_age: GaugeVec,
    /// Runs each live node holds.
    pub fleet_node_running: GaugeVec,
    /// How long this node's claim calls take.
    pub fleet_claim: prometheus::Histogram,
    /// The interval of each job's backup schedule.
    pub interval: GaugeVec,
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    /// Length: one registration per metric, each with its help text, splitting would only scatter
    /// the list.
    pub fn new() -> Self {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new(
                name::BUILD_INFO,
                "Build information (version, git commit as revision, build date as built); always 1.",
            ),
            &["version", "revision", "built"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                backstop_vocab::build::commit(),
                backstop_vocab::build::built(),
            ])
            .set(1);
        let runs = IntCounterVec::new(
            Opts::new(
                name::JOB_RUNS_TOTAL,
                "Runs by job, kind (backup, verify) and outcome (success, failed, interrupted, skipped).",
            ),
            &["job", "kind", "outcome"],
        )
        .expect("valid metric");
        let last_success = GaugeVec::new(
            Opts::new(
                name::JOB_LAST_SUCCESS_TIMESTAMP_SECONDS,
                "When the job's last successful run finished (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let last_failure = GaugeVec::new(
            Opts::new(
                name::JOB_LAST_FAILURE_TIMESTAMP_SECONDS,
                "When the job's last failed run finished (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let running = IntGaugeVec::new(
            Opts::new(name::JOB_RUNNING, "1 while a run of the job is going."),
            &["job", "kind"],
        )
        .expect("valid metric");
        let next_run = GaugeVec::new(
            Opts::new(
                name::JOB_NEXT_RUN_TIMESTAMP_SECONDS,
                "When the job is next scheduled (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let config_reload_success = IntGauge::new(
            name::CONFIG_RELOAD_SUCCESS,
            "1 if the last configuration (re)load succeeded, 0 if it failed and the previous one stays in force.",
        )
        .expect("valid metric");
        config_reload_success.set(1);
        let retention_deleted = IntCounterVec::new(
            Opts::new(
                name::RETENTION_DELETED_TOTAL,
                "Backups deleted by retention, by job and store.",
            ),
            &["job", "storage"],
        )
        .expect("valid metric");
        let retention_locked = counter(
            name::RETENTION_LOCKED_TOTAL,
            "Backups retention would delete but the store's Object Lock protects (kept; tried again next prune), by job and store.",
            &["job", "storage"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(name::JOB_DURATION_SECONDS, "How long runs took.").buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
                28800.0, 43200.0,
            ]),
            &["job", "kind"],
        )
        .expect("valid metric");
        let rpo = gauge(
            name::JOB_RPO_SECONDS,
            "How old the job's newest backup may get (its rpo, default 1.5 × its schedule's interval).",
            &["job"],
        );
        let last_size = gauge(
            name::BACKUP_LAST_SIZE_BYTES,
            "Size of the job's latest complete backup: stage dump (pg_dump output) or stored (compressed, encrypted).",
            &["job", "stage"],
        );
        let bytes_total = counter(
            name::BACKUP_BYTES_TOTAL,
            "Bytes stored by the job's backups (per store written once).",
            &["job"],
        );
        let backups_stored = gauge(
            name::BACKUPS_STORED,
            "Complete backups of the job in the store.",
            &["job", "storage"],
        );
        let untrusted_objects = gauge(
            name::STORE_UNTRUSTED_OBJECTS,
            "Objects in the store posing as the job's manifests or verification records that are not trusted (unsigned, signed by an unknown key, altered, or not matching where they lie): nobody here wrote them.",
            &["job", "storage"],
        );
        let storage_used = gauge(
            name::STORAGE_USED_BYTES,
            "Bytes the job's complete backups take in the store.",
            &["job", "storage"],
        );
        let oldest_backup = gauge(
            name::OLDEST_BACKUP_TIMESTAMP_SECONDS,
            "Start of the job's oldest complete backup in the store (Unix time).",
            &["job", "storage"],
        );
        let verify_last_success = gauge(
            name::VERIFY_LAST_SUCCESS_TIMESTAMP_SECONDS,
            "When the job's last successful verification finished (Unix time).",
            &["job"],
        );
        let lock_blocks = counter(
            name::LOCK_BLOCKS_TOTAL,
            "Sessions that waited longer than lock_guard.max_block for a lock the job's pg_dump held (each logged; with mode yield the dump gave way).",
            &["job"],
        );
        let replay_lag = gauge(
            name::STANDBY_REPLAY_LAG_BYTES,
            "WAL the standby had received but not replayed when the job's last backup (standby = \"pause\") resumed its replay: the lag the dump caused.",
            &["job"],
        );
        let replay_paused = gauge(
            name::STANDBY_REPLAY_PAUSED_SECONDS,
            "How long the job's last backup kept the standby's WAL replay paused.",
            &["job"],
        );
        let replay_pause_age = gauge(
            name::STANDBY_REPLAY_PAUSE_AGE_SECONDS,
            "How long WAL replay on the standby the job dumps from (standby = \"pause\") has been paused by backstop, now: 0 while replay runs. Refreshed every minute.",
            &["job"],
        );
        let replay_pause_limit = gauge(
            name::STANDBY_REPLAY_PAUSE_LIMIT_SECONDS,
            "The longest the job's dump is expected to keep replay paused: the job's timeout, or twice its longest recent backup (at least an hour). A pause older than this is stuck.",
            &["job"],
        );
        let restore_duration = gauge(
            name::JOB_RESTORE_DURATION_SECONDS,
            "How long the job's latest successful restore drill took (every database restored into scratch databases, checked and dropped): its measured recovery time.",
            &["job"],
        );
        let rto = gauge(
            name::JOB_RTO_SECONDS,
            "The job's recovery-time objective (its rto): how long a restore may take.",
            &["job"],
        );
        let db_last_success = gauge(
            name::DATABASE_LAST_SUCCESS_TIMESTAMP_SECONDS,
            "When the latest backup of one database of a cluster job completed (Unix time).",
            &["job", "database"],
        );
        let db_last_failure = gauge(
            name::DATABASE_LAST_FAILURE_TIMESTAMP_SECONDS,
            "When the latest backup of one database of a cluster job failed (Unix time; 0 = never).",
            &["job", "database"],
        );
        let db_last_size = gauge(
            name::DATABASE_LAST_SIZE_BYTES,
            "pg_dump output size of the latest backup of one database of a cluster job.",
            &["job", "database"],
        );
        let db_missing = gauge(
            name::DATABASE_MISSING,
            "1 for a database of a cluster job that has backups but is no longer on the server (its backups age out by retention).",
            &["job", "database"],
        );
        let db_unreachable = gauge(
            name::DATABASE_UNREACHABLE,
            "1 for a database on a cluster job's server that its role may not connect to (not backed up).",
            &["job", "database"],
        );
        let skipped = counter(
            name::JOB_SKIPPED_TOTAL,
            "Occurrences skipped because the job's previous run was still going.",
            &["job", "kind"],
        );
        let notifications_sent = counter(
            name::NOTIFICATIONS_SENT_TOTAL,
            "Notifications delivered, by job and event (outcome: failure, suspect, recovery, success).",
            &["job", "outcome"],
        );
        let notifications_failed = counter(
            name::NOTIFICATIONS_FAILED_TOTAL,
            "Notifications that could not be delivered after their retries, by job and event.",
            &["job", "outcome"],
        );
        let config_hash = prometheus::Gauge::new(
            name::CONFIG_HASH,
            "The first 52 bits of this node's config digest (the one `backstop status` shows), as a number: nodes of a fleet should agree.",
        )
        .expect("valid metric");
        let catalog_forgotten = prometheus::IntCounter::new(
            name::CATALOG_RUNS_FORGOTTEN_TOTAL,
            "Runs this process deleted from the catalog because they ended longer ago than daemon.catalog_history.",
        )
        .expect("valid metric");
        let fleet_nodes = IntGauge::new(
            name::FLEET_NODES,
            "Nodes with a live lease in the shared catalog, this one included.",
        )
        .expect("valid metric");
        let fleet_config_hashes = IntGauge::new(
            name::FLEET_CONFIG_HASHES,
            "Distinct config digests among the fleet's live nodes; more than 1 means nodes run different configurations.",
        )
        .expect("valid metric");
        let fleet_lease_ok = IntGauge::new(
            name::FLEET_LEASE_OK,
            "1 while this node holds a lease on the shared catalog that it trusts; 0 while it cannot renew it (it stops its runs).",
        )
        .expect("valid metric");
        let fleet_pending = gauge(
            name::FLEET_PENDING_RUNS,
            "Runs of the job and kind waiting for a node to claim them, across the fleet (at most 1 each: a newer tick supersedes an older one).",
            &["job", "kind"],
        );
        let fleet_pending_age = gauge(
            name::FLEET_PENDING_AGE_SECONDS,
            "How long the oldest waiting run of the job and kind has waited since its tick (or since it was queued), across the fleet.",
            &["job", "kind"],
        );
        let fleet_node_running = gauge(
            name::FLEET_NODE_RUNNING_RUNS,
            "Runs each live node of the fleet holds now.",
            &["node", "hostname"],
        );
        let fleet_claim = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                name::FLEET_CLAIM_SECONDS,
                "How long this node's claims of pending runs take in the shared catalog.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let interval = gauge(
            name::JOB_INTERVAL_SECONDS,
            "The interval of the job's backup schedule (from now to the fire time after next).",
            &["job"],
        );
        for c in [
            Box::new(build) as Box<dyn prometheus::core::Collector>,
            Box::new(fleet_pending.clone()),
            Box::new(fleet_pending_age.clone()),
            Box::new(fleet_node_running.clone()),
            Box::new(fleet_claim.clone()),
            Box::new(interval.clone()),
            Box::new(config_hash.clone()),
            Box::new(catalog_forgotten.clone()),
            Box::new(fleet_nodes.clone()),
            Box::new(fleet_config_hashes.clone()),
            Box::new(fleet_lease_ok.clone()),
            Box::new(runs.clone()),
            Box::new(last_success.clone()),
            Box::new(last_failure.clone()),
            Box::new(running.clone()),
            Box::new(next_run.clone()),
            Box::new(config_reload_success.clone()),
            Box::new(retention_deleted.clone()),
            Box::new(retention_locked.clone()),
            Box::new(duration.clone()),
            Box::new(rpo.clone()),
            Box::new(last_size.clone()),
            Box::new(bytes_total.clone()),
            Box::new(backups_stored.clone()),
            Box::new(untrusted_objects.clone()),
            Box::new(storage_used.clone()),
            Box::new(oldest_backup.clone()),
            Box::new(verify_last_success.clone()),
            Box::new(lock_blocks.clone()),
            Box::new(replay_lag.clone()),
            Box::new(replay_paused.clone()),
            Box::new(replay_pause_age.clone()),
            Box::new(replay_pause_limit.clone()),
            Box::new(restore_duration.clone()),
            Box::new(rto.clone()),
            Box::new(db_last_success.clone()),
            Box::new(db_last_failure.clone()),
            Box::new(db_last_size.clone()),
            Box::new(db_missing.clone()),
            Box::new(db_unreachable.clone()),
            Box::new(skipped.clone()),
            Box::new(notifications_sent.clone()),
            Box::new(notifications_failed.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            runs,
            last_success,
            last_failure,
            running,
            next_run,
            config_reload_success,
            retention_deleted,
            retention_locked,
            duration,
            rpo,
            last_size,
            bytes_total,
            backups_stored,
            untrusted_objects,
            storage_used,
            oldest_backup,
            verify_last_success,
            lock_blocks,
            replay_lag,
            replay_paused,
            replay_pause_age,
            replay_pause_limit,
            restore_duration,
            rto,
            db_last_success,
            db_last_failure,
            db_last_size,
            db_missing,
            db_unreachable,
            skipped,
            notifications_sent,
            notifications_failed,
            config_hash,
            catalog_forgotten,
            fleet_nodes,
            fleet_config_hashes,
            fleet_lease_ok,
            fleet_pending,
            fleet_pending_age,
            fleet_node_running,
            fleet_claim,
            interval,
        }
    }

    /// Removes every series of `job` (a job that a reload removed): its
    /// last success and RPO would otherwise stay exported forever and page
    /// as stale for a job that no longer exists.
    pub fn forget_job(&self, job: &str) {
        forget(&self.runs, job);
        forget(&self.last_success, job);
        forget(&self.last_failure, job);
        forget(&self.running, job);
        forget(&self.next_run, job);
        forget(&self.retention_deleted, job);
        forget(&self.retention_locked, job);
        forget(&self.duration, job);
        forget(&self.rpo, job);
        forget(&self.interval, job);
        forget(&self.last_size, job);
        forget(&self.bytes_total, job);
        forget(&self.backups_stored, job);
        forget(&self.untrusted_objects, job);
        forget(&self.storage_used, job);
        forget(&self.oldest_backup, job);
        forget(&self.verify_last_success, job);
        forget(&self.lock_blocks, job);
        forget(&self.replay_lag, job);
        forget(&self.replay_paused, job);
        forget(&self.replay_pause_age, job);
        forget(&self.replay_pause_limit, job);
        forget(&self.restore_duration, job);
        forget(&self.rto, job);
        forget(&self.db_last_success, job);
        forget(&self.db_last_failure, job);
        forget(&self.db_last_size, job);
        forget(&self.db_missing, job);
        forget(&self.db_unreachable, job);
        forget(&self.skipped, job);
        forget(&self.notifications_sent, job);
        forget(&self.notifications_failed, job);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Removes the series of `vec` whose `job` label is `job`, whatever their
/// other labels.
fn forget<T: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<T>, job: &str) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("job") == Some(&job) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::name;

    /// The metric names the alert rules and the dashboard query are all
    /// defined (a histogram's `_bucket`/`_sum`/`_count` series count as
    /// their histogram).
    #[test]
    fn alert_rules_and_dashboard_use_only_defined_metrics() {
        for (file, text) in [
            (
                "deploy/prometheus/backstop-alerts.yml",
                include_str!("../../../../deploy/prometheus/backstop-alerts.yml"),
            ),
            (
                "deploy/grafana/backstop.json",
                include_str!("../../../../deploy/grafana/backstop.json"),
            ),
        ] {
            let mut used = 0;
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let Some(rest) = word.strip_prefix("backstop_") else {
                    continue;
                };
                if rest.is_empty() || word.chars().any(|c| c.is_ascii_uppercase()) {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|b| name::ALL.contains(b))
                    .unwrap_or(word);
                assert!(
                    name::ALL.contains(&base),
                    "{file} uses {word}, which the daemon does not export"
                );
                used += 1;
            }
            assert!(used > 5, "{file}: no metrics found");
        }
    }
}
