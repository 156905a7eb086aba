//! The lock guard: while pg_dump runs, look (on a connection of its own)
//! for sessions waiting on a lock that pg_dump's ACCESS SHARE locks block
//! (`pg_blocking_pids`). One blocked longer than `max_block` is logged and
//! counted (`warn`), or makes the dump yield (`yield`): pg_dump's backend
//! is terminated, so the blocked session (and everything queued behind
//! it, such as a migration's ALTER TABLE and the application's SELECTs
//! behind that) proceeds, and the run fails as retryable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_config::{LockGuard, LockGuardMode};
use backstop_dump::PgTarget;
use tokio::task::JoinHandle;
use tracing::warn;

/// A session the dump blocked for too long.
pub(crate) type Blocked = backstop_dump::admin::BlockedSession;

/// How a blocked session is named in a run's error.
pub(crate) fn describe(b: &Blocked) -> String {
    format!(
        "session pid {} (application {:?}) waited {:.1}s for {} behind pg_dump's locks: {:?}",
        b.pid,
        b.application,
        b.waited,
        if b.lock.is_empty() { "a lock" } else { &b.lock },
        b.query
    )
}

/// What the guard saw, shared with its task.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Sessions blocked past `max_block` (each counted once).
    pub blocked: Vec<Blocked>,
    /// Set when the dump yielded to `blocked.last()`.
    pub yielded: bool,
}

/// A running guard; [`Guard::stop`] ends it and says what it saw.
pub(crate) struct Guard {
    task: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
}

/// How often the guard looks: often enough to act close to `max_block`.
fn interval(max_block: Duration) -> Duration {
    (max_block / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
}

impl Guard {
    /// Starts watching the sessions whose `application_name` is `app` or
    /// starts with it (pg_dump's; in streams, every lane's `app-NN`) on
    /// `target`'s database. `job` names it in logs.
    pub(crate) fn start(target: &PgTarget, app: &str, cfg: LockGuard, job: &str) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        if cfg.mode == LockGuardMode::Off {
            return Guard { task: None, seen };
        }
        let (target, app, job, shared) = (
            target.clone(),
            app.to_string(),
            job.to_string(),
            seen.clone(),
        );
        let task = tokio::spawn(async move {
            let mut watch = match backstop_dump::admin::LockWatch::connect(&target, &app).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(job = %job, error = %e, "The lock guard cannot connect; the dump runs unguarded (lock_wait_timeout still applies).");
                    return;
                }
            };
            let mut counted: HashSet<i32> = HashSet::new();
            loop {
                tokio::time::sleep(interval(cfg.max_block)).await;
                let blocked = match watch.blocked().await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(job = %job, error = %e, "The lock guard's query failed; the dump runs unguarded from here.");
                        return;
                    }
                };
                let Some(b) = blocked
                    .into_iter()
                    .find(|b| b.waited >= cfg.max_block.as_secs_f64() && !counted.contains(&b.pid))
                else {
                    continue;
                };
                counted.insert(b.pid);
                let yielding = cfg.mode == LockGuardMode::Yield;
                {
                    let mut s = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    s.blocked.push(b.clone());
                    s.yielded = yielding;
                }
                if !yielding {
                    warn!(job = %job, blocked_pid = b.pid, application = %b.application, lock = %b.lock, waited_seconds = b.waited, query = %b.query,
                        "A session is blocked behind the dump's locks (lock_guard = \"warn\"): it and whatever queues behind it wait until the dump ends.");
                    continue;
                }
                warn!(job = %job, blocked_pid = b.pid, application = %b.application, lock = %b.lock, waited_seconds = b.waited, query = %b.query,
                    "A session is blocked behind the dump's locks: the dump yields (lock_guard = \"yield\"); the run fails and is retried.");
                // Ending pg_dump's backend releases its locks at once;
                // pg_dump then exits with an error the backup reports as
                // this yield.
                if let Err(e) = watch.terminate().await {
                    warn!(job = %job, error = %e, "The lock guard could not stop pg_dump's session.");
                }
                return;
            }
        });
        Guard {
            task: Some(task),
            seen,
        }
    }

    /// Ends the guard and returns what it saw.
    pub(crate) fn stop(mut self) -> Seen {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        std::mem::take(
            &mut *self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
