//! Telling people about a run: which of a job's notifiers hear about an
//! event, sending to them side by side, and saying in the log what came of
//! it. The daemon and a one-shot `backstop backup` both send through here.

use std::sync::Arc;

use crate::{DeliveryError, Event};
use backstop_config::{Channel, Config, JobConfig, NotifierConfig};
use tracing::{error, info};

/// What came of one notifier.
pub struct Sent {
    pub notifier: String,
    pub result: Result<u32, DeliveryError>,
}

/// The notifiers of `job` that hear `event`.
fn listeners<'a>(config: &'a Config, job: &JobConfig, event: &Event) -> Vec<&'a NotifierConfig> {
    job.notify
        .iter()
        .filter_map(|n| config.notifiers.get(n))
        .filter(|n| crate::hears(n, event))
        .collect()
}

/// Whether `job` has a notifier that hears the start of its backups.
pub fn has_heartbeat(config: &Config, job: &JobConfig) -> bool {
    job.notify
        .iter()
        .filter_map(|n| config.notifiers.get(n))
        .any(|n| matches!(n.channel, Channel::Heartbeat { .. }))
}

/// Sends `event` to every notifier of `job` that listens for it, all at
/// once, each with its own retries; logs each result. Never fails: a
/// notification that cannot be delivered is reported, not raised.
pub async fn send(config: &Config, job: &JobConfig, event: Event) -> Vec<Sent> {
    send_after(config, job, event, None).await
}

/// [`send`], but heartbeats first wait until `start` says true (or is
/// dropped): a run's end must not reach the service before its start,
/// or the check would be left "started" and time out. Other channels do
/// not wait.
pub async fn send_after(
    config: &Config,
    job: &JobConfig,
    event: Event,
    start: Option<tokio::sync::watch::Receiver<bool>>,
) -> Vec<Sent> {
    let event = Arc::new(event);
    let mut set = tokio::task::JoinSet::new();
    let mut spawned = std::collections::HashMap::new();
    for n in listeners(config, job, &event) {
        let (n, event) = (n.clone(), event.clone());
        let who = (n.name.clone(), n.channel.kind(), crate::target(&n));
        let gate = match n.channel {
            Channel::Heartbeat { .. } => start.clone(),
            _ => None,
        };
        let handle = set.spawn(async move {
            if let Some(mut gate) = gate {
                let _ = gate.wait_for(|sent| *sent).await;
            }
            let result = crate::deliver(&n, &event).await;
            Sent {
                notifier: n.name,
                result,
            }
        });
        spawned.insert(handle.id(), who);
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        let sent = match joined {
            Ok(sent) => sent,
            Err(e) => lost_delivery(&e, spawned.remove(&e.id())),
        };
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

/// A delivery whose task panicked or was cancelled is a failed delivery:
/// logged at ERROR and counted like any other, never dropped (a dropped
/// one left `backstop_notifications_failed_total` still and nobody told).
fn lost_delivery(e: &tokio::task::JoinError, who: Option<(String, &'static str, String)>) -> Sent {
    let (notifier, channel, target) =
        who.unwrap_or_else(|| ("(unknown)".into(), "notification", "(unknown)".into()));
    let reason = if e.is_panic() {
        "the delivery task panicked (a defect in backstop: please report it)".to_string()
    } else {
        "the delivery was cancelled before it finished".to_string()
    };
    Sent {
        notifier: notifier.clone(),
        result: Err(DeliveryError {
            notifier,
            channel,
            target,
            attempts: 0,
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue 12, item 1): a panicked delivery task was skipped
    /// (`let Ok(sent) = joined else { continue }`), so it was neither logged
    /// nor counted as failed.
    #[tokio::test]
    async fn a_panicked_or_cancelled_delivery_is_a_failed_one() {
        let panicked = tokio::spawn(async { panic!("boom") }).await.unwrap_err();
        let sent = lost_delivery(
            &panicked,
            Some(("oncall".into(), "webhook", "http://127.0.0.1:9".into())),
        );
        assert_eq!(sent.notifier, "oncall");
        let err = sent.result.unwrap_err();
        assert!(err.reason.contains("panicked"), "{err}");
        assert!(
            err.to_string().contains("webhook notifier \"oncall\""),
            "{err}"
        );

        let pending = tokio::spawn(std::future::pending::<()>());
        pending.abort();
        let cancelled = pending.await.unwrap_err();
        let sent = lost_delivery(&cancelled, None);
        assert!(sent.result.unwrap_err().reason.contains("cancelled"));
    }
}
