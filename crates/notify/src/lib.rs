//! Notifications: the last stage of a run. When a run fails, a backup is
//! marked suspect, or a job recovers, each `[notify.NAME]` the job names is
//! told: a generic webhook (JSON, optionally HMAC-signed), a Slack-compatible
//! incoming webhook, or an email over SMTP. A heartbeat (a dead man's
//! switch) is told of every backup run's start and end.
//!
//! Sending never decides a run's outcome: [`deliver`] retries transient
//! failures with backoff and returns what happened for the caller to log and
//! count; the daemon runs it on its own task so a slow receiver cannot hold up
//! a backup.

mod email;
mod fanout;
mod http;
mod render;

use std::time::Duration;

use backstop_config::{Channel, HttpMethod, NotifierConfig, NotifyOn};
pub use backstop_vocab::{Outcome, RunKind};
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use fanout::{Sent, has_heartbeat, send, send_after};
pub use render::{email_subject, slack_text, text_body, webhook_body};

/// The version of the webhook's JSON body; bumped on incompatible changes.
pub const PAYLOAD_VERSION: u32 = 1;

/// Why a notification is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Failure,
    Suspect,
    Recovery,
    Success,
    /// `backstop test-notify`: checks a channel end to end.
    Test,
    /// A backup run started: heard only by heartbeats (`URL/start`).
    Start,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Failure => "failure",
            EventKind::Suspect => "suspect",
            EventKind::Recovery => "recovery",
            EventKind::Success => "success",
            EventKind::Test => "test",
            EventKind::Start => "start",
        }
    }

    /// Whether a notifier listening for `on` gets this event. A recovery is
    /// also a success, so `on = ["success"]` hears about it too.
    pub fn wanted_by(self, on: &[NotifyOn]) -> bool {
        match self {
            EventKind::Failure => on.contains(&NotifyOn::Failure),
            EventKind::Suspect => on.contains(&NotifyOn::Suspect),
            EventKind::Recovery => {
                on.contains(&NotifyOn::Recovery) || on.contains(&NotifyOn::Success)
            }
            EventKind::Success => on.contains(&NotifyOn::Success),
            EventKind::Test => true,
            EventKind::Start => false,
        }
    }
}

/// Whether notifier `n` is told `event`. A heartbeat hears every backup
/// run (its start and its end, whatever the outcome, `on` aside) and
/// nothing else: a successful verify must not vouch for failing backups.
pub fn hears(n: &NotifierConfig, event: &Event) -> bool {
    match n.channel {
        Channel::Heartbeat { .. } => {
            event.kind == RunKind::Backup || event.event == EventKind::Test
        }
        _ => event.event.wanted_by(&n.on),
    }
}

/// Where a heartbeat pings for `event`: `URL/start`, `URL` (success),
/// `URL/fail` (a failure or a suspect backup), `URL/log` (a test, which
/// healthchecks.io records without changing the check's state).
pub fn ping_url(base: &str, event: EventKind) -> Option<String> {
    let suffix = match event {
        EventKind::Start => Some("start"),
        EventKind::Failure | EventKind::Suspect => Some("fail"),
        EventKind::Success | EventKind::Recovery => None,
        EventKind::Test => Some("log"),
    };
    let mut url = url::Url::parse(base).ok()?;
    if let Some(s) = suffix {
        url.path_segments_mut().ok()?.pop_if_empty().push(s);
    }
    Some(url.into())
}

/// What a finished run is worth telling: `outcome` is this run's final
/// outcome (after retries), `previous` the one before it of the same job and
/// kind. Interrupted and skipped runs are not events: shutdown is not a
/// failure, and staleness is the alert rules' job.
pub fn classify(outcome: Outcome, previous: Option<Outcome>) -> Option<EventKind> {
    match outcome {
        Outcome::Failed => Some(EventKind::Failure),
        Outcome::Suspect => Some(EventKind::Suspect),
        Outcome::Success if matches!(previous, Some(Outcome::Failed | Outcome::Suspect)) => {
            Some(EventKind::Recovery)
        }
        Outcome::Success => Some(EventKind::Success),
        Outcome::Interrupted | Outcome::Skipped => None,
    }
}

/// One notification, as sent to every channel (the webhook's JSON body).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub version: u32,
    pub event: EventKind,
    pub job: String,
    /// backup | verify | prune
    pub kind: RunKind,
    /// failed | suspect | success
    pub outcome: Outcome,
    pub error: Option<String>,
    pub backup_id: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub attempts: u32,
    pub dump_bytes: Option<u64>,
    pub stored_bytes: Option<u64>,
    pub storage: Vec<String>,
    /// The outcome of the run before this one (what a recovery recovered from).
    pub previous_outcome: Option<Outcome>,
    pub host: String,
    /// The same on every retry of this notification, so a receiver can
    /// drop duplicates.
    pub delivery_id: String,
}

impl Event {
    /// An event with the run's identity; the caller fills in what it knows.
    pub fn new(
        event: EventKind,
        job: &str,
        kind: RunKind,
        outcome: Outcome,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
    ) -> Self {
        Self {
            version: PAYLOAD_VERSION,
            event,
            job: job.to_string(),
            kind,
            outcome,
            error: None,
            backup_id: None,
            started_at,
            finished_at,
            duration_seconds: (finished_at - started_at).num_milliseconds().max(0) as f64 / 1000.0,
            attempts: 1,
            dump_bytes: None,
            stored_bytes: None,
            storage: Vec::new(),
            previous_outcome: None,
            host: hostname(),
            delivery_id: format!("{:016x}", rand::random::<u64>()),
        }
    }
}

impl Event {
    /// A backup run of `job` starting at `at` (heard only by heartbeats).
    pub fn backup_started(job: &str, at: DateTime<Utc>) -> Self {
        Self::new(
            EventKind::Start,
            job,
            RunKind::Backup,
            Outcome::Success,
            at,
            at,
        )
    }
}

/// This machine's name, for "… failed on db-backup-1".
pub fn hostname() -> String {
    backstop_vocab::hostname().unwrap_or_else(|| "unknown-host".into())
}

/// A notification that could not be delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{channel} notifier \"{notifier}\" to {target} failed after {attempts} attempt(s): {reason}"
)]
pub struct DeliveryError {
    pub notifier: String,
    pub channel: &'static str,
    /// Where it was sent, without path or query (a webhook URL may hold a token).
    pub target: String,
    pub attempts: u32,
    pub reason: String,
}

/// One attempt's failure.
#[derive(Debug)]
pub(crate) struct SendError {
    pub message: String,
    /// Worth another attempt (connection trouble, 5xx, 429, SMTP 4xx).
    pub retryable: bool,
    /// The receiver asked for this pause (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

impl SendError {
    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            retry_after: None,
        }
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            retry_after: None,
        }
    }
}

/// Where `n` sends, safe to print.
pub fn target(n: &NotifierConfig) -> String {
    match &n.channel {
        Channel::Webhook { url, .. } | Channel::Slack { url } | Channel::Heartbeat { url, .. } => {
            http::redact(url.expose())
        }
        Channel::Email(e) => format!("smtp://{}:{}", e.host, e.port),
    }
}

/// Sends `event` through `n`, retrying transient failures with backoff
/// (`n.retry_backoff`, doubled each time; longer if the receiver asks).
/// Returns the number of attempts it took.
///
/// # Errors
/// [`DeliveryError`] when every attempt failed or one failed permanently.
pub async fn deliver(n: &NotifierConfig, event: &Event) -> Result<u32, DeliveryError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match tokio::time::timeout(n.timeout, send_once(n, event)).await {
            Ok(r) => r,
            Err(_) => Err(SendError::transient(format!(
                "no answer within {}",
                humanize(n.timeout)
            ))),
        };
        let err = match result {
            Ok(()) => return Ok(attempt),
            Err(e) => e,
        };
        if !err.retryable || attempt > n.retries {
            return Err(DeliveryError {
                notifier: n.name.clone(),
                channel: n.channel.kind(),
                target: target(n),
                attempts: attempt,
                reason: err.message,
            });
        }
        let wait = retry_wait(n.retry_backoff, attempt, err.retry_after);
        tracing::warn!(
            notifier = %n.name,
            attempt,
            retry_in = %humanize(wait),
            error = %err.message,
            "Notification attempt failed; retrying."
        );
        tokio::time::sleep(wait).await;
    }
}

/// The longest pause a receiver's `Retry-After` can ask for: a receiver
/// asking for an hour must not hold a failure notification back that long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long to wait after failed attempt number `attempt` (1-based): the
/// configured backoff doubled per attempt, or longer when the receiver asked
/// for a longer pause (`Retry-After`, honoured up to [`MAX_RETRY_AFTER`]).
/// Never panics, whatever the backoff (`Ord::clamp` did when the backoff
/// already exceeded the cap).
pub fn retry_wait(backoff: Duration, attempt: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = backoff.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    match retry_after {
        Some(asked) => backoff.max(asked.min(MAX_RETRY_AFTER)),
        None => backoff,
    }
}

async fn send_once(n: &NotifierConfig, event: &Event) -> Result<(), SendError> {
    let ca = n.ca_file.as_deref();
    match &n.channel {
        Channel::Webhook { url, secret } => {
            let body = webhook_body(event);
            let mut headers = vec![
                ("content-type", "application/json".to_string()),
                ("x-backstop-event", event.event.as_str().to_string()),
                ("x-backstop-delivery", event.delivery_id.clone()),
            ];
            if let Some(secret) = secret {
                headers.push((
                    "x-backstop-signature-256",
                    format!("sha256={}", signature(secret.expose().as_bytes(), &body)),
                ));
            }
            http::post(url.expose(), ca, &headers, body).await
        }
        Channel::Slack { url } => {
            let body = serde_json::to_vec(&serde_json::json!({ "text": slack_text(event) }))
                .expect("a JSON object serializes");
            let headers = [("content-type", "application/json".to_string())];
            http::post(url.expose(), ca, &headers, body).await
        }
        Channel::Email(cfg) => email::send(cfg, ca, event).await,
        Channel::Heartbeat { url, method } => {
            let to = ping_url(url.expose(), event.event)
                .ok_or_else(|| SendError::permanent("the heartbeat URL cannot take a path"))?;
            let (method, headers, body) = match method {
                HttpMethod::Get => (hyper::Method::GET, vec![], Vec::new()),
                HttpMethod::Post => (
                    hyper::Method::POST,
                    vec![("content-type", "text/plain; charset=utf-8".to_string())],
                    text_body(event).into_bytes(),
                ),
            };
            http::request(method, &to, ca, &headers, body).await
        }
    }
}

/// HMAC-SHA256 of `body` under `key`, hex: what `X-Backstop-Signature-256`
/// carries after `sha256=` (the format of GitHub's `X-Hub-Signature-256`, so
/// existing verifiers work once pointed at this header).
pub fn signature(key: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn humanize(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The error and its causes on one line ("client error (Connect): tcp
/// connect error: Connection refused (os error 111)"), each cause once, with
/// a hint when the fix is in backstop's config.
pub(crate) fn delivery_reason(e: &(dyn std::error::Error + 'static), connection: bool) -> String {
    let mut s = backstop_vocab::one_line(e);
    if s.contains("UnknownIssuer") {
        s.push_str(" (the server's certificate is not signed by a CA this host trusts: install the CA in the system store or set ca_file)");
    }
    // Only a connection that failed (not an answer) may be the filter's.
    if let Some(x) = filter_explains(e).filter(|x| connection || x.certain) {
        s.push_str("; ");
        s.push_str(&x.hint);
    }
    s
}

/// What this host's packet filter (the ip-allow drop-in) has to do with a
/// failed delivery, if anything: a certain explanation is not retried.
pub(crate) fn filter_explains(
    e: &(dyn std::error::Error + 'static),
) -> Option<backstop_vocab::ipfilter::Explanation> {
    let refused = backstop_vocab::ipfilter::refused_by_this_host(e);
    backstop_vocab::ipfilter::explain("the notifier's receiver", &[], refused)
}

/// Whether `e` (or any of its causes) is a TLS certificate the peer
/// presented and this host refuses (untrusted issuer, expired, wrong name):
/// permanent, since asking again gets the same certificate. rustls' error
/// travels inside an `io::Error`, whose `source()` skips it, so each
/// `io::Error` is also looked into.
pub(crate) fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let refused = |r: &rustls::Error| {
        matches!(
            r,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType
        )
    };
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>()
            && refused(r)
        {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
            && refused(r)
        {
            return true;
        }
        // Some connectors box the handshake error where no downcast reaches
        // it; rustls' own wording for a refused certificate still does.
        if c.to_string().contains("invalid peer certificate") {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The CA certificates in a PEM file.
pub(crate) fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, SendError> {
    std::fs::read(path)
        .map_err(|e| SendError::permanent(format!("cannot read ca_file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let cases = [
            ("failed", None, Some(EventKind::Failure)),
            ("failed", Some("failed"), Some(EventKind::Failure)),
            ("suspect", Some("success"), Some(EventKind::Suspect)),
            ("success", None, Some(EventKind::Success)),
            ("success", Some("success"), Some(EventKind::Success)),
            ("success", Some("failed"), Some(EventKind::Recovery)),
            ("success", Some("suspect"), Some(EventKind::Recovery)),
            ("success", Some("interrupted"), Some(EventKind::Success)),
            ("interrupted", Some("failed"), None),
            ("skipped", None, None),
        ];
        for (outcome, previous, want) in cases {
            assert_eq!(
                classify(
                    Outcome::parse(outcome).unwrap(),
                    previous.map(|p| Outcome::parse(p).unwrap())
                ),
                want,
                "{outcome} after {previous:?}"
            );
        }
    }

    #[test]
    fn who_hears_what() {
        use NotifyOn::*;
        let default = backstop_config::DEFAULT_NOTIFY_ON;
        assert!(EventKind::Failure.wanted_by(&default));
        assert!(EventKind::Suspect.wanted_by(&default));
        assert!(EventKind::Recovery.wanted_by(&default));
        assert!(!EventKind::Success.wanted_by(&default));
        assert!(EventKind::Recovery.wanted_by(&[Success]));
        assert!(EventKind::Success.wanted_by(&[Success]));
        assert!(!EventKind::Failure.wanted_by(&[Success, Recovery]));
        assert!(!EventKind::Suspect.wanted_by(&[Failure]));
        assert!(EventKind::Test.wanted_by(&[Failure]));
    }

    fn notifier(channel: Channel) -> NotifierConfig {
        NotifierConfig {
            name: "n".into(),
            channel,
            on: backstop_config::DEFAULT_NOTIFY_ON.to_vec(),
            timeout: Duration::from_secs(1),
            retries: 0,
            retry_backoff: Duration::from_secs(1),
            ca_file: None,
        }
    }

    #[test]
    fn a_heartbeat_hears_every_backup_run_and_nothing_else() {
        let hb = notifier(Channel::Heartbeat {
            url: backstop_config::Secret::new("https://hc.example.com/ping/abc"),
            method: HttpMethod::Post,
        });
        let hook = notifier(Channel::Slack {
            url: backstop_config::Secret::new("https://hooks.example.com/x"),
        });
        let t = Utc::now();
        let ev = |e, k| Event::new(e, "app", k, Outcome::Success, t, t);
        for e in [
            EventKind::Start,
            EventKind::Success,
            EventKind::Recovery,
            EventKind::Failure,
            EventKind::Suspect,
        ] {
            assert!(hears(&hb, &ev(e, RunKind::Backup)), "{e:?}");
            assert!(!hears(&hb, &ev(e, RunKind::Verify)), "{e:?} of a verify");
            assert!(!hears(&hb, &ev(e, RunKind::Prune)), "{e:?} of a prune");
        }
        // `on` still rules the other channels; none hears a start.
        assert!(!hears(&hook, &ev(EventKind::Start, RunKind::Backup)));
        assert!(!hears(&hook, &ev(EventKind::Success, RunKind::Backup)));
        assert!(hears(&hook, &ev(EventKind::Failure, RunKind::Verify)));
    }

    #[test]
    fn heartbeat_ping_urls() {
        let cases = [
            (
                "https://hc-ping.com/5f2c",
                EventKind::Start,
                "https://hc-ping.com/5f2c/start",
            ),
            (
                "https://hc-ping.com/5f2c/",
                EventKind::Start,
                "https://hc-ping.com/5f2c/start",
            ),
            (
                "https://hc-ping.com/5f2c",
                EventKind::Success,
                "https://hc-ping.com/5f2c",
            ),
            (
                "https://hc-ping.com/5f2c",
                EventKind::Recovery,
                "https://hc-ping.com/5f2c",
            ),
            (
                "https://hc-ping.com/5f2c",
                EventKind::Failure,
                "https://hc-ping.com/5f2c/fail",
            ),
            (
                "https://hc-ping.com/5f2c",
                EventKind::Suspect,
                "https://hc-ping.com/5f2c/fail",
            ),
            (
                "https://hc-ping.com/5f2c",
                EventKind::Test,
                "https://hc-ping.com/5f2c/log",
            ),
            // A query (a key) stays where it was.
            (
                "http://127.0.0.1:8000/p/key?rid=1",
                EventKind::Failure,
                "http://127.0.0.1:8000/p/key/fail?rid=1",
            ),
        ];
        for (base, event, want) in cases {
            assert_eq!(
                ping_url(base, event).as_deref(),
                Some(want),
                "{base} {event:?}"
            );
        }
    }

    #[test]
    fn signature_matches_rfc_4231_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Regression (issue 12, item 1): `r.clamp(backoff, 60s)` panicked as
    /// soon as the backoff exceeded 60 s, and the daemon swallowed the panic.
    #[test]
    fn retry_wait_honours_retry_after_up_to_the_cap_and_never_panics() {
        let s = Duration::from_secs;
        let cases = [
            // backoff, attempt, Retry-After, wait
            (s(5), 1, None, s(5)),
            (s(5), 3, None, s(20)),
            (s(5), 1, Some(s(30)), s(30)),
            (s(5), 1, Some(s(2)), s(5)),
            (s(5), 1, Some(s(3600)), MAX_RETRY_AFTER),
            // The cases that panicked: the backoff alone exceeds the cap.
            (s(120), 1, Some(s(1)), s(120)),
            (s(120), 1, Some(s(3600)), s(120)),
            (s(5), 6, Some(s(10)), s(160)),
            (s(5), 40, Some(s(10)), s(5) * u32::MAX),
            (Duration::MAX, 40, Some(s(10)), Duration::MAX),
        ];
        for (backoff, attempt, asked, want) in cases {
            assert_eq!(
                retry_wait(backoff, attempt, asked),
                want,
                "backoff {backoff:?}, attempt {attempt}, Retry-After {asked:?}"
            );
        }
    }

    #[test]
    fn durations_for_logs() {
        assert_eq!(humanize(Duration::from_secs(5)), "5s");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
    }
}
