//! `backstop test-notify --notifier N`: one test event through one
//! notifier, no retries, the result printed.

use backstop_config::{Config, NotifierConfig};
use backstop_notify::{Event, EventKind, Outcome, RunKind};

use crate::error::{CliError, CmdResult, not_defined};

/// # Errors
/// When the notifier is unknown or the notification was not delivered.
pub async fn run(config: &Config, notifier: &str, job: Option<&str>) -> CmdResult {
    let Some(n) = config.notifiers.get(notifier) else {
        let known = config.notifiers.keys().map(String::as_str);
        return Err(not_defined(config, "notifier", notifier, known));
    };
    let now = chrono::Utc::now();
    let mut event = Event::new(
        EventKind::Test,
        job.unwrap_or("test"),
        RunKind::Backup,
        Outcome::Success,
        now,
        now,
    );
    event.error =
        Some("This is a test notification from `backstop test-notify`; nothing failed.".into());
    let n = NotifierConfig {
        retries: 0,
        ..n.clone()
    };
    let target = backstop_notify::target(&n);
    match backstop_notify::deliver(&n, &event).await {
        Ok(_) => {
            println!(
                "notifier \"{}\" ({} to {target}): test notification delivered",
                n.name,
                n.channel.kind()
            );
            Ok(())
        }
        Err(e) => Err(CliError::Failed(
            anyhow::Error::new(e).context("test notification not delivered"),
        )),
    }
}
