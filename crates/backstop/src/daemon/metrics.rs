//! The daemon's Prometheus metrics. Labels are only `job`, `kind`, `outcome`.

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    pub runs: IntCounterVec,
    pub last_success: GaugeVec,
    pub last_failure: GaugeVec,
    pub running: IntGaugeVec,
    pub next_run: GaugeVec,
    pub config_reload_success: IntGauge,
    pub retention_deleted: IntCounterVec,
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
        for c in [
            Box::new(build) as Box<dyn prometheus::core::Collector>,
            Box::new(runs.clone()),
            Box::new(last_success.clone()),
            Box::new(last_failure.clone()),
            Box::new(running.clone()),
            Box::new(next_run.clone()),
            Box::new(config_reload_success.clone()),
            Box::new(retention_deleted.clone()),
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
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
