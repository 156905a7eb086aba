//! The daemon's Prometheus metrics. Labels are only `job`, `kind`, `storage`,
//! `outcome` (and `stage` on the size gauge, `version` on build_info).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

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
    pub storage_used: GaugeVec,
    pub oldest_backup: GaugeVec,
    pub verify_last_success: GaugeVec,
    pub skipped: IntCounterVec,
    pub notifications_sent: IntCounterVec,
    pub notifications_failed: IntCounterVec,
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("backstop_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let runs = IntCounterVec::new(
            Opts::new(
                "backstop_job_runs_total",
                "Runs by job, kind (backup, verify) and outcome (success, failed, interrupted, skipped).",
            ),
            &["job", "kind", "outcome"],
        )
        .expect("valid metric");
        let last_success = GaugeVec::new(
            Opts::new(
                "backstop_job_last_success_timestamp_seconds",
                "When the job's last successful run finished (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let last_failure = GaugeVec::new(
            Opts::new(
                "backstop_job_last_failure_timestamp_seconds",
                "When the job's last failed run finished (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let running = IntGaugeVec::new(
            Opts::new("backstop_job_running", "1 while a run of the job is going."),
            &["job", "kind"],
        )
        .expect("valid metric");
        let next_run = GaugeVec::new(
            Opts::new(
                "backstop_job_next_run_timestamp_seconds",
                "When the job is next scheduled (Unix time).",
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let config_reload_success = IntGauge::new(
            "backstop_config_reload_success",
            "1 if the last configuration (re)load succeeded, 0 if it failed and the previous one stays in force.",
        )
        .expect("valid metric");
        config_reload_success.set(1);
        let retention_deleted = IntCounterVec::new(
            Opts::new(
                "backstop_retention_deleted_total",
                "Backups deleted by retention, by job and store.",
            ),
            &["job", "storage"],
        )
        .expect("valid metric");
        let retention_locked = counter(
            "backstop_retention_locked_total",
            "Backups retention would delete but the store's Object Lock protects (kept; tried again next prune), by job and store.",
            &["job", "storage"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new("backstop_job_duration_seconds", "How long runs took.").buckets(
                vec![
                    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                    14400.0, 28800.0, 43200.0,
                ],
            ),
            &["job", "kind"],
        )
        .expect("valid metric");
        let rpo = gauge(
            "backstop_job_rpo_seconds",
            "How old the job's newest backup may get (its rpo, default 1.5 × its schedule's interval).",
            &["job"],
        );
        let last_size = gauge(
            "backstop_backup_last_size_bytes",
            "Size of the job's latest complete backup: stage dump (pg_dump output) or stored (compressed, encrypted).",
            &["job", "stage"],
        );
        let bytes_total = counter(
            "backstop_backup_bytes_total",
            "Bytes stored by the job's backups (per store written once).",
            &["job"],
        );
        let backups_stored = gauge(
            "backstop_backups_stored",
            "Complete backups of the job in the store.",
            &["job", "storage"],
        );
        let storage_used = gauge(
            "backstop_storage_used_bytes",
            "Bytes the job's complete backups take in the store.",
            &["job", "storage"],
        );
        let oldest_backup = gauge(
            "backstop_oldest_backup_timestamp_seconds",
            "Start of the job's oldest complete backup in the store (Unix time).",
            &["job", "storage"],
        );
        let verify_last_success = gauge(
            "backstop_verify_last_success_timestamp_seconds",
            "When the job's last successful verification finished (Unix time).",
            &["job"],
        );
        let skipped = counter(
            "backstop_job_skipped_total",
            "Occurrences skipped because the job's previous run was still going.",
            &["job", "kind"],
        );
        let notifications_sent = counter(
            "backstop_notifications_sent_total",
            "Notifications delivered, by job and event (outcome: failure, suspect, recovery, success).",
            &["job", "outcome"],
        );
        let notifications_failed = counter(
            "backstop_notifications_failed_total",
            "Notifications that could not be delivered after their retries, by job and event.",
            &["job", "outcome"],
        );
        for c in [
            Box::new(build) as Box<dyn prometheus::core::Collector>,
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
            Box::new(storage_used.clone()),
            Box::new(oldest_backup.clone()),
            Box::new(verify_last_success.clone()),
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
            storage_used,
            oldest_backup,
            verify_last_success,
            skipped,
            notifications_sent,
            notifications_failed,
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
        forget(&self.last_size, job);
        forget(&self.bytes_total, job);
        forget(&self.backups_stored, job);
        forget(&self.storage_used, job);
        forget(&self.oldest_backup, job);
        forget(&self.verify_last_success, job);
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
