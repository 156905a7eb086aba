//! What a run tells people: its outcome to the job's notifiers (when it is
//! worth telling: a failure, a suspect backup, a recovery, or a success
//! someone asked for), the heartbeat's start ping, and the counts of what
//! was delivered. Sends run on tasks of their own: a slow or broken
//! receiver never holds up a run.

use std::sync::Arc;

use backstop_config::{Config, JobConfig};
use backstop_pipeline::BackupError;
use backstop_pipeline::backup::cluster::Ran;
use backstop_scheduler::{Outcome, RunKind};
use chrono::{DateTime, Utc};
use tracing::warn;

use super::{Core, lock};

/// What a finished run leaves for its notification.
#[derive(Debug, Clone)]
pub struct RunFacts {
    pub started_at: DateTime<Utc>,
    pub attempts: u32,
    /// A failure's error, or why a backup is suspect.
    pub error: Option<String>,
    pub backup_id: Option<String>,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    pub stores: Vec<String>,
}

impl RunFacts {
    /// What a one-shot backup of `job` that started at `started_at` leaves
    /// for its notification, and its outcome.
    pub fn of_backup(
        job: &JobConfig,
        started_at: DateTime<Utc>,
        result: &Result<Ran, BackupError>,
    ) -> (Outcome, RunFacts) {
        let mut facts = RunFacts {
            started_at,
            attempts: 1,
            error: None,
            backup_id: None,
            dump_bytes: None,
            stored_bytes: None,
            stores: job.storage.clone(),
        };
        let outcome = match result {
            // Some databases failed: a failed run, as the daemon tells it
            // (no backup id or sizes: the run is not one complete backup).
            Ok(ran) if ran.failed_members().is_some() => {
                facts.error = ran.failed_members().map(|c| c.failure_line());
                Outcome::Failed
            }
            Ok(ran) => {
                let summary = ran.summary();
                facts.backup_id = Some(ran.backup_id().to_string());
                facts.dump_bytes = Some(summary.dump_bytes);
                facts.stored_bytes = Some(summary.stored_bytes);
                facts.stores = ran.stores();
                facts.error = summary.error;
                summary.outcome
            }
            Err(e) => {
                facts.error = Some(backstop_pipeline::one_line(e));
                Outcome::Failed
            }
        };
        (outcome, facts)
    }
}

/// The notification of a finished run of `job`, when it is worth telling
/// (a failure, a suspect backup, a recovery against `previous`, or a
/// success someone asked for). The daemon and the one-shot CLI both build
/// theirs here.
pub fn run_event(
    job: &str,
    kind: RunKind,
    outcome: Outcome,
    previous: Option<Outcome>,
    facts: RunFacts,
) -> Option<backstop_notify::Event> {
    let event_kind = backstop_notify::classify(outcome, previous)?;
    let mut event =
        backstop_notify::Event::new(event_kind, job, kind, outcome, facts.started_at, Utc::now());
    event.error = facts.error;
    event.attempts = facts.attempts;
    event.dump_bytes = facts.dump_bytes;
    event.stored_bytes = facts.stored_bytes;
    event.storage = facts.stores;
    event.previous_outcome = previous;
    event.backup_id = facts.backup_id;
    Some(event)
}

impl Core {
    /// Records a run's final outcome and, when it is worth telling (a
    /// failure, a suspect backup, a recovery, or a success someone asked
    /// for), sends it to the job's notifiers on a task of its own: a slow or
    /// broken receiver never holds up a run.
    pub fn announce(
        self: &Arc<Self>,
        config: &Arc<Config>,
        job: &JobConfig,
        kind: RunKind,
        outcome: Outcome,
        facts: RunFacts,
    ) {
        let start_sent = (kind == RunKind::Backup)
            .then(|| lock(&self.heartbeats).remove(&job.name))
            .flatten();
        if matches!(outcome, Outcome::Interrupted | Outcome::Skipped) {
            return;
        }
        let previous = self
            .last_outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((job.name.clone(), kind), outcome);
        if job.notify.is_empty() {
            return;
        }
        let Some(event) = run_event(&job.name, kind, outcome, previous, facts) else {
            return;
        };
        let (me, config, job) = (self.clone(), config.clone(), job.clone());
        self.notifications.spawn(async move {
            let label = event.event.as_str();
            let delivered = backstop_notify::send_after(&config, &job, event, start_sent).await;
            me.count_notifications(&job.name, label, &delivered);
        });
    }

    /// Counts what came of one event's deliveries.
    pub fn count_notifications(&self, job: &str, event: &str, delivered: &[backstop_notify::Sent]) {
        for sent in delivered {
            let counter = if sent.result.is_ok() {
                &self.metrics.notifications_sent
            } else {
                &self.metrics.notifications_failed
            };
            counter.with_label_values(&[job, event]).inc();
        }
    }

    /// A backup run of `job` started: its heartbeats (if any) are pinged at
    /// `URL/start`, on a task of their own; the run's end ping waits for it.
    pub fn announce_start(self: &Arc<Self>, config: &Arc<Config>, job: &JobConfig) {
        if !backstop_notify::has_heartbeat(config, job) {
            return;
        }
        let (sent, start_sent) = tokio::sync::watch::channel(false);
        lock(&self.heartbeats).insert(job.name.clone(), start_sent);
        let event = backstop_notify::Event::backup_started(&job.name, Utc::now());
        let (me, config, job) = (self.clone(), config.clone(), job.clone());
        self.notifications.spawn(async move {
            let delivered = backstop_notify::send(&config, &job, event).await;
            me.count_notifications(&job.name, "start", &delivered);
            let _ = sent.send(true);
        });
    }

    /// Reads the job's last final outcome of `kind` from the catalog, once.
    pub async fn load_last_outcome(&self, job: &str, kind: RunKind) {
        let key = (job.to_string(), kind);
        let known = self
            .last_outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&key);
        if known {
            return;
        }
        match self.catalog.last_outcome(job, kind).await {
            Ok(Some(o)) => {
                self.last_outcome
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key)
                    .or_insert(o);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(job, kind = kind.as_str(), error = %e, "Cannot read the last outcome from the catalog; a recovery may be reported as a plain success.");
            }
        }
    }
}
