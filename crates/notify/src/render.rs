//! What each channel says: the webhook's JSON, Slack's one message, the
//! email's subject and body. Written for the on-call engineer reading it on
//! a phone: what happened to which job, the error, and what to run next.

use backstop_config::human_bytes;

use crate::{Event, EventKind};

/// The webhook's body: the event as JSON.
pub fn webhook_body(event: &Event) -> Vec<u8> {
    serde_json::to_vec(event).expect("an event serializes")
}

/// "backup of job "app" FAILED", "backup of job "app" recovered", …
fn headline(e: &Event) -> String {
    let what = match e.event {
        EventKind::Failure => "FAILED",
        EventKind::Suspect => "is SUSPECT (much smaller than usual)",
        EventKind::Recovery => "recovered",
        EventKind::Success => "succeeded",
        EventKind::Test => "test notification",
        EventKind::Start => "started",
    };
    format!("{} of job \"{}\" {what}", e.kind, e.job)
}

/// The facts, one `label: value` per line, only those known.
fn facts(e: &Event) -> Vec<(&'static str, String)> {
    let mut f = Vec::new();
    if let Some(err) = &e.error {
        f.push(("Error", err.clone()));
    }
    if let Some(id) = &e.backup_id {
        f.push(("Backup", id.clone()));
    }
    if e.attempts > 1 {
        f.push(("Attempts", e.attempts.to_string()));
    }
    f.push((
        "Started",
        e.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    ));
    if e.event != EventKind::Start {
        f.push(("Duration", format!("{:.1} s", e.duration_seconds)));
    }
    if let Some(d) = e.dump_bytes {
        f.push(("Dump size", human_bytes(d)));
    }
    if let Some(s) = e.stored_bytes {
        f.push(("Stored size", human_bytes(s)));
    }
    if !e.storage.is_empty() {
        f.push(("Storage", e.storage.join(", ")));
    }
    if let Some(p) = &e.previous_outcome {
        f.push(("Previous run", p.to_string()));
    }
    f.push(("Host", e.host.clone()));
    f
}

/// What to run next, by event.
fn next_steps(e: &Event) -> Vec<String> {
    match e.event {
        EventKind::Failure => vec![
            "backstop status".into(),
            format!("journalctl -u backstop --since -2h | grep '{}'", e.job),
            format!(
                "backstop backup --job {} --wait   # after fixing the cause",
                e.job
            ),
            "Runbook: docs/runbook.md#backstopjobfailed".into(),
        ],
        EventKind::Suspect => vec![
            format!(
                "backstop verify --job {} --backup latest --against-live",
                e.job
            ),
            format!("backstop list --job {}", e.job),
            "Runbook: docs/runbook.md#backstopbackupsuspect".into(),
        ],
        _ => Vec::new(),
    }
}

/// Slack-compatible `text` (Slack, Mattermost, Rocket.Chat): mrkdwn.
pub fn slack_text(e: &Event) -> String {
    let icon = match e.event {
        EventKind::Failure => ":red_circle:",
        EventKind::Suspect => ":warning:",
        EventKind::Recovery | EventKind::Success => ":large_green_circle:",
        EventKind::Test | EventKind::Start => ":information_source:",
    };
    let mut s = format!("{icon} *backstop: {}* on `{}`", headline(e), e.host);
    for (label, value) in facts(e) {
        if label == "Host" {
            continue;
        }
        if label == "Error" {
            s.push_str(&format!(
                "\n*{label}:* ```{}```",
                value.replace("```", "'''")
            ));
        } else {
            s.push_str(&format!("\n*{label}:* {value}"));
        }
    }
    let steps = next_steps(e);
    if !steps.is_empty() {
        s.push_str("\n*Next:*");
        for step in steps {
            s.push_str(&format!("\n• `{step}`"));
        }
    }
    s
}

/// `[backstop] FAILED: backup of job "app" on db1`.
pub fn email_subject(e: &Event) -> String {
    let tag = match e.event {
        EventKind::Failure => "FAILED",
        EventKind::Suspect => "SUSPECT",
        EventKind::Recovery => "RECOVERED",
        EventKind::Success => "OK",
        EventKind::Test => "TEST",
        EventKind::Start => "STARTED",
    };
    format!(
        "[backstop] {tag}: {} of job \"{}\" on {}",
        e.kind, e.job, e.host
    )
}

/// The plain-text body of an email.
pub fn text_body(e: &Event) -> String {
    let mut s = format!("backstop: {} on host {}.\n\n", headline(e), e.host);
    for (label, value) in facts(e) {
        s.push_str(&format!("{:<13} {value}\n", format!("{label}:")));
    }
    let steps = next_steps(e);
    if !steps.is_empty() {
        s.push_str("\nWhat to do:\n");
        for step in steps {
            s.push_str(&format!("  {step}\n"));
        }
    }
    s.push_str(&format!(
        "\nSent by backstop {} (delivery {}).\n",
        backstop_vocab::build::version(),
        e.delivery_id
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    use crate::{Outcome, RunKind};

    fn failure() -> Event {
        let t0 = chrono::Utc
            .with_ymd_and_hms(2026, 11, 24, 2, 15, 0)
            .unwrap();
        let mut e = Event::new(
            EventKind::Failure,
            "marketplace",
            RunKind::Backup,
            Outcome::Failed,
            t0,
            t0 + chrono::Duration::milliseconds(12_300),
        );
        e.error = Some("pg_dump exited with status 1: connection refused".into());
        e.attempts = 3;
        e.storage = vec!["offsite".into()];
        e.host = "db1".into();
        e
    }

    #[test]
    fn webhook_body_has_every_field() {
        let v: serde_json::Value = serde_json::from_slice(&webhook_body(&failure())).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["event"], "failure");
        assert_eq!(v["job"], "marketplace");
        assert_eq!(v["kind"], "backup");
        assert_eq!(v["outcome"], "failed");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["duration_seconds"], 12.3);
        assert_eq!(v["started_at"], "2026-11-24T02:15:00Z");
        assert!(v["backup_id"].is_null() && v["dump_bytes"].is_null());
        assert_eq!(v["storage"][0], "offsite");
        assert_eq!(v["delivery_id"].as_str().unwrap().len(), 16);
    }

    #[test]
    fn slack_failure_says_what_and_what_next() {
        let t = slack_text(&failure());
        assert!(
            t.starts_with(":red_circle: *backstop: backup of job \"marketplace\" FAILED* on `db1`"),
            "{t}"
        );
        assert!(
            t.contains("*Error:* ```pg_dump exited with status 1: connection refused```"),
            "{t}"
        );
        assert!(t.contains("*Attempts:* 3"), "{t}");
        assert!(t.contains("`backstop status`"), "{t}");
    }

    #[test]
    fn recovery_reports_the_backup() {
        let mut e = failure();
        e.event = EventKind::Recovery;
        e.outcome = Outcome::Success;
        e.error = None;
        e.attempts = 1;
        e.backup_id = Some("2026-11-24T02-15-00Z-7f3a".into());
        e.dump_bytes = Some(3 * 1024 * 1024);
        e.stored_bytes = Some(512 * 1024);
        e.previous_outcome = Some(Outcome::Failed);
        assert_eq!(
            email_subject(&e),
            "[backstop] RECOVERED: backup of job \"marketplace\" on db1"
        );
        let body = text_body(&e);
        assert!(
            body.starts_with("backstop: backup of job \"marketplace\" recovered on host db1."),
            "{body}"
        );
        assert!(
            body.contains("Backup:       2026-11-24T02-15-00Z-7f3a\n"),
            "{body}"
        );
        assert!(body.contains("Dump size:    3.0 MiB\n"), "{body}");
        assert!(body.contains("Previous run: failed\n"), "{body}");
        assert!(!body.contains("What to do"), "{body}");
        assert!(!body.contains("Attempts"), "{body}");
    }

    #[test]
    fn suspect_points_at_against_live() {
        let mut e = failure();
        e.event = EventKind::Suspect;
        let body = text_body(&e);
        assert!(body.contains("is SUSPECT"), "{body}");
        assert!(body.contains("backstop verify --job marketplace --backup latest --against-live"));
        assert_eq!(
            email_subject(&e),
            "[backstop] SUSPECT: backup of job \"marketplace\" on db1"
        );
    }
}
