//! Telling people about runs: which of a job's notifiers hear about an
//! event, sending to them side by side, and saying in the log what came of it.

use std::sync::Arc;

use backstop_config::{Config, JobConfig, NotifierConfig};
use backstop_notify::{DeliveryError, Event, EventKind};
use tracing::{error, info};

/// What came of one notifier.
pub struct Sent {
    pub notifier: String,
    pub result: Result<u32, DeliveryError>,
}

/// The notifiers of `job` that listen for `event`.
fn listeners<'a>(config: &'a Config, job: &JobConfig, event: EventKind) -> Vec<&'a NotifierConfig> {
    job.notify
        .iter()
        .filter_map(|n| config.notifiers.get(n))
        .filter(|n| event.wanted_by(&n.on))
        .collect()
}

/// Sends `event` to every notifier of `job` that listens for it, all at
/// once, each with its own retries; logs each result. Never fails: a
/// notification that cannot be delivered is reported, not raised.
pub async fn send(config: &Config, job: &JobConfig, event: Event) -> Vec<Sent> {
    let event = Arc::new(event);
    let mut set = tokio::task::JoinSet::new();
    for n in listeners(config, job, event.event) {
        let (n, event) = (n.clone(), event.clone());
        set.spawn(async move {
            let result = backstop_notify::deliver(&n, &event).await;
            Sent {
                notifier: n.name,
                result,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        let Ok(sent) = joined else { continue };
        match &sent.result {
            Ok(attempts) => info!(
                job = %event.job,
                kind = %event.kind,
                event = event.event.as_str(),
                notifier = %sent.notifier,
                attempts,
                "Notification sent."
            ),
            Err(e) => error!(
                job = %event.job,
                kind = %event.kind,
                event = event.event.as_str(),
                notifier = %sent.notifier,
                error = %e,
                "Notification could not be delivered: nobody was told through this channel. Check it with `backstop test-notify --notifier {}`.",
                sent.notifier
            ),
        }
        out.push(sent);
    }
    out
}

/// `backstop test-notify`: one test event through one notifier, no retries,
/// the result printed.
///
/// # Errors
/// When the notifier is unknown or the notification was not delivered.
pub async fn test(config: &Config, notifier: &str, job: Option<&str>) -> anyhow::Result<()> {
    let Some(n) = config.notifiers.get(notifier) else {
        let known = config.notifiers.keys().map(String::as_str);
        return Err(crate::not_defined(config, "notifier", notifier, known).into());
    };
    let now = chrono::Utc::now();
    let mut event = Event::new(
        EventKind::Test,
        job.unwrap_or("test"),
        "backup",
        "success",
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
        Err(e) => Err(anyhow::Error::new(e).context("test notification not delivered")),
    }
}
