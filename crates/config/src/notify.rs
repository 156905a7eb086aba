//! `[notify.NAME]`: the channels failures, suspect backups and recoveries are
//! sent to. Validated here like every other section; the sending lives in the
//! `backstop-notify` crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use crate::Secret;
use crate::check::{Checker, duration, int_in};
use crate::raw::RawNotify;

/// Which outcomes a notifier is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyOn {
    /// A run failed (after its retries).
    Failure,
    /// A backup completed but the size-anomaly guard marked it suspect.
    Suspect,
    /// The first success after a failure or a suspect backup.
    Recovery,
    /// Every success (a recovery is also sent as one).
    Success,
}

impl NotifyOn {
    pub const ALL: [NotifyOn; 4] = [
        NotifyOn::Failure,
        NotifyOn::Suspect,
        NotifyOn::Recovery,
        NotifyOn::Success,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOn::Failure => "failure",
            NotifyOn::Suspect => "suspect",
            NotifyOn::Recovery => "recovery",
            NotifyOn::Success => "success",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for NotifyOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The events a notifier gets when `on` is not set.
pub const DEFAULT_NOTIFY_ON: [NotifyOn; 3] =
    [NotifyOn::Failure, NotifyOn::Suspect, NotifyOn::Recovery];

/// One validated `[notify.NAME]`.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    pub name: String,
    pub channel: Channel,
    pub on: Vec<NotifyOn>,
    /// Per attempt (connect, send, answer).
    pub timeout: Duration,
    /// Further attempts after a failed one whose cause may be transient.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// Extra PEM certificates to trust (a private CA), besides the system's.
    pub ca_file: Option<PathBuf>,
}

/// Where a notifier sends.
#[derive(Debug, Clone)]
pub enum Channel {
    /// JSON body; signed with HMAC-SHA256 when `secret` is set.
    Webhook {
        url: Secret,
        secret: Option<Secret>,
    },
    /// A Slack-compatible incoming webhook (`{"text": …}`).
    Slack {
        url: Secret,
    },
    Email(EmailConfig),
    /// A dead man's switch (healthchecks.io, Cronitor and the like): every
    /// backup run pings `URL/start` when it starts, `URL` when it succeeds,
    /// `URL/fail` (the error as the body) when it fails, so the service's
    /// own timer catches a run that never ends and a host that died.
    Heartbeat {
        url: Secret,
        method: HttpMethod,
    },
}

/// How a heartbeat pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMethod {
    /// With a text body (the error of a failed run).
    Post,
    /// No body, for services that take only GET.
    Get,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Get => "GET",
        }
    }
}

impl Channel {
    pub fn kind(&self) -> &'static str {
        match self {
            Channel::Webhook { .. } => "webhook",
            Channel::Slack { .. } => "slack",
            Channel::Email(_) => "email",
            Channel::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which is required (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on this host.
    None,
}

impl SmtpTls {
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpTls::StartTls => "starttls",
            SmtpTls::Tls => "tls",
            SmtpTls::None => "none",
        }
    }
}

/// An SMTP submission server and the message's envelope.
#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub from: String,
    pub to: Vec<String>,
}

/// Like `name@example.com` or `Backstop <name@example.com>`.
fn valid_mailbox(s: &str) -> bool {
    let addr = match (s.rfind('<'), s.strip_suffix('>')) {
        (Some(i), Some(rest)) => &rest[i + 1..],
        (None, None) => s.trim(),
        _ => return false,
    };
    match addr.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !addr.contains(char::is_whitespace)
                && domain.contains('.') | (domain == "localhost")
        }
        None => false,
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

const WEBHOOK_KEYS: &str = "url, url_file, url_env, secret_file, secret_env";
const EMAIL_KEYS: &str = "host, port, tls, username, password_file, password_env, from, to";

/// One secret given by exactly one of `KEY` (inline), `KEY_file` or `KEY_env`.
fn one_secret(
    c: &mut Checker<'_>,
    what: &str,
    section: &Spanned<String>,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<String>>,
    env: Option<&Spanned<String>>,
) -> Option<Option<Secret>> {
    let given: Vec<_> = [inline, file, env].into_iter().flatten().collect();
    if given.len() > 1 {
        c.error(
            given[1].span(),
            format!("set only one of {what}, {what}_file and {what}_env"),
        );
        return None;
    }
    let value = match (inline, file, env) {
        (Some(v), _, _) => Some(v.get_ref().clone()),
        (_, Some(f), _) => Some(c.read_secret_file(&format!("{what}_file"), f)?),
        (_, _, Some(e)) => Some(c.env_value(e)?),
        _ => None,
    };
    match value {
        Some(v) if v.trim().is_empty() => {
            c.error(
                given[0].span(),
                format!("{what} of notifier \"{}\" is empty", section.get_ref()),
            );
            None
        }
        v => Some(v.map(|v| Secret::new(v.trim()))),
    }
}

/// Length: one check per key of a notifier, by type, each with its own
/// message.
pub(crate) fn validate_notifier(
    c: &mut Checker<'_>,
    name: &Spanned<String>,
    raw: &RawNotify,
) -> Option<NotifierConfig> {
    let before = c.diagnostics.len();
    let n = name.get_ref();
    let webhook_keys = [
        raw.url.as_ref(),
        raw.url_file.as_ref(),
        raw.url_env.as_ref(),
        raw.secret_file.as_ref(),
        raw.secret_env.as_ref(),
    ];
    let email_spans = [
        raw.host.as_ref().map(Spanned::span),
        raw.port.as_ref().map(Spanned::span),
        raw.tls.as_ref().map(Spanned::span),
        raw.username.as_ref().map(Spanned::span),
        raw.password_file.as_ref().map(Spanned::span),
        raw.password_env.as_ref().map(Spanned::span),
        raw.from.as_ref().map(Spanned::span),
        raw.to.as_ref().map(Spanned::span),
    ];
    let kind = raw.kind.get_ref().as_str();
    if kind != "heartbeat"
        && let Some(m) = &raw.method
    {
        c.error(
            m.span(),
            format!("method belongs to heartbeat notifiers; notifier \"{n}\" is a {kind}"),
        );
    }
    let channel = match kind {
        "webhook" | "slack" | "heartbeat" => {
            if let Some(span) = email_spans.into_iter().flatten().next() {
                c.error(
                    span,
                    format!(
                        "this key belongs to email notifiers ({EMAIL_KEYS}); notifier \"{n}\" is a {kind}"
                    ),
                );
            }
            if kind == "slack"
                && let Some(s) = raw.secret_file.as_ref().or(raw.secret_env.as_ref())
            {
                c.error(
                    s.span(),
                    "Slack incoming webhooks are not signed: the secret is the URL itself; use type = \"webhook\" for a signed JSON body",
                );
            }
            if kind == "heartbeat" {
                if let Some(s) = raw.secret_file.as_ref().or(raw.secret_env.as_ref()) {
                    c.error(
                        s.span(),
                        "heartbeat pings are not signed: the check's URL is its secret",
                    );
                }
                if let Some(on) = &raw.on {
                    c.error(
                        on.span(),
                        format!("a heartbeat hears every backup run (URL/start when it starts, URL on success, URL/fail on failure or a suspect backup), so `on` does not apply: remove it from notifier \"{n}\""),
                    );
                }
            }
            let url = one_secret(
                c,
                "url",
                name,
                raw.url.as_ref(),
                raw.url_file.as_ref(),
                raw.url_env.as_ref(),
            );
            let url = match url {
                Some(Some(u)) => {
                    let at = raw
                        .url
                        .as_ref()
                        .or(raw.url_file.as_ref())
                        .or(raw.url_env.as_ref())
                        .map(Spanned::span)
                        .unwrap_or_else(|| raw.kind.span());
                    // Never echo the URL: a Slack URL is itself the credential.
                    match url::Url::parse(u.expose()) {
                        Ok(p) if matches!(p.scheme(), "http" | "https") && p.host().is_some() => {
                            if p.password().is_some() || !p.username().is_empty() {
                                c.error(at, format!("the URL of notifier \"{n}\" has user:password@ in it; use secret_file to authenticate the body instead"));
                            }
                            Some(u)
                        }
                        _ => {
                            c.error(
                                at,
                                format!("the URL of notifier \"{n}\" is not an http:// or https:// URL (it is not shown here: it may hold a token)"),
                            );
                            None
                        }
                    }
                }
                Some(None) => {
                    c.error(
                        raw.kind.span(),
                        format!(
                            "notifier \"{n}\" of type \"{kind}\" needs url_file = \"/etc/backstop/{n}-url\" (or url_env, or url): where to send"
                        ),
                    );
                    None
                }
                None => None,
            };
            if kind == "slack" {
                url.map(|url| Channel::Slack { url })
            } else if kind == "heartbeat" {
                let method = match raw
                    .method
                    .as_ref()
                    .map(|m| (m, m.get_ref().to_ascii_lowercase()))
                {
                    None => Some(HttpMethod::Post),
                    Some((_, m)) if m == "post" => Some(HttpMethod::Post),
                    Some((_, m)) if m == "get" => Some(HttpMethod::Get),
                    Some((m, _)) => {
                        c.error(
                            m.span(),
                            format!(
                                "unknown method {:?}: use \"post\" (the default; a failure's error goes in the body) or \"get\"",
                                m.get_ref()
                            ),
                        );
                        None
                    }
                };
                match (url, method) {
                    (Some(url), Some(method)) => Some(Channel::Heartbeat { url, method }),
                    _ => None,
                }
            } else {
                let secret = one_secret(
                    c,
                    "secret",
                    name,
                    None,
                    raw.secret_file.as_ref(),
                    raw.secret_env.as_ref(),
                );
                match (url, secret) {
                    (Some(url), Some(secret)) => Some(Channel::Webhook { url, secret }),
                    _ => None,
                }
            }
        }
        "email" => {
            if let Some(k) = webhook_keys.into_iter().flatten().next() {
                c.error(
                    k.span(),
                    format!(
                        "this key belongs to webhook and slack notifiers ({WEBHOOK_KEYS}); notifier \"{n}\" is an email"
                    ),
                );
            }
            validate_email(c, name, raw).map(Channel::Email)
        }
        other => {
            c.error(
                raw.kind.span(),
                format!(
                    "unknown notifier type {other:?}: use \"webhook\" (JSON, optionally HMAC-signed), \"slack\" (Slack-compatible incoming webhook), \"email\" (SMTP) or \"heartbeat\" (a dead man's switch such as healthchecks.io)"
                ),
            );
            None
        }
    };

    let on = match &raw.on {
        None => DEFAULT_NOTIFY_ON.to_vec(),
        Some(list) => {
            if list.get_ref().is_empty() {
                c.error(
                    list.span(),
                    format!("`on` of notifier \"{n}\" is empty, so it would never send: list events or remove `on` (default: failure, suspect, recovery)"),
                );
            }
            let mut on = Vec::new();
            for e in list.get_ref() {
                match NotifyOn::parse(e.get_ref()) {
                    Some(ev) if !on.contains(&ev) => on.push(ev),
                    Some(_) => c.error(e.span(), format!("{:?} is listed twice", e.get_ref())),
                    None => c.error(
                        e.span(),
                        format!(
                            "unknown event {:?}: use \"failure\", \"suspect\", \"recovery\" or \"success\"",
                            e.get_ref()
                        ),
                    ),
                }
            }
            on
        }
    };
    let timeout = raw
        .timeout
        .as_ref()
        .and_then(|t| duration(c, "timeout", t))
        .unwrap_or(Duration::from_secs(10));
    let retries = int_in(c, "retries", raw.retries.as_ref(), 0..=10, 3) as u32;
    let retry_backoff = raw
        .retry_backoff
        .as_ref()
        .and_then(|t| duration(c, "retry_backoff", t))
        .unwrap_or(Duration::from_secs(5));
    let ca_file = raw.ca_file.as_ref().and_then(|f| {
        let path = c.resolve(f.get_ref());
        match std::fs::read_to_string(&path) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(path),
            Ok(_) => {
                c.error(
                    f.span(),
                    format!(
                        "ca_file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    ),
                );
                None
            }
            Err(e) => {
                c.error(
                    f.span(),
                    format!("cannot read ca_file {}: {e}", path.display()),
                );
                None
            }
        }
    });

    if c.diagnostics.len() != before {
        return None;
    }
    Some(NotifierConfig {
        name: n.clone(),
        channel: channel?,
        on,
        timeout,
        retries,
        retry_backoff,
        ca_file,
    })
}

/// Length: one check per key of an email notifier (SMTP URL, TLS,
/// credentials, addresses).
fn validate_email(
    c: &mut Checker<'_>,
    name: &Spanned<String>,
    raw: &RawNotify,
) -> Option<EmailConfig> {
    let n = name.get_ref();
    let before = c.diagnostics.len();
    let tls = match &raw.tls {
        None => SmtpTls::StartTls,
        Some(t) => match t.get_ref().as_str() {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            "none" => SmtpTls::None,
            other => {
                c.error(
                    t.span(),
                    format!(
                        "unknown tls {other:?}: use \"starttls\" (port 587), \"tls\" (port 465) or \"none\" (a relay on this host)"
                    ),
                );
                SmtpTls::StartTls
            }
        },
    };
    let host = match &raw.host {
        Some(h) if !h.get_ref().trim().is_empty() => h.get_ref().trim().to_string(),
        Some(h) => {
            c.error(h.span(), "host is empty");
            String::new()
        }
        None => {
            c.error(
                raw.kind.span(),
                format!("email notifier \"{n}\" needs host = \"smtp.example.com\" (the SMTP submission server)"),
            );
            String::new()
        }
    };
    let default_port = match tls {
        SmtpTls::StartTls => 587,
        SmtpTls::Tls => 465,
        SmtpTls::None => 25,
    };
    let port = int_in(c, "port", raw.port.as_ref(), 1..=65535, default_port) as u16;
    let password = one_secret(
        c,
        "password",
        name,
        None,
        raw.password_file.as_ref(),
        raw.password_env.as_ref(),
    )
    .flatten();
    let username = raw.username.as_ref().map(|u| u.get_ref().clone());
    match (&username, &password) {
        (Some(_), None) if c.diagnostics.len() == before => c.error(
            raw.username.as_ref().map_or(raw.kind.span(), Spanned::span),
            format!("email notifier \"{n}\" has a username but no password: set password_file (or password_env)"),
        ),
        (None, Some(_)) => c.error(
            raw.password_file
                .as_ref()
                .or(raw.password_env.as_ref())
                .map_or(raw.kind.span(), Spanned::span),
            format!("email notifier \"{n}\" has a password but no username"),
        ),
        _ => {}
    }
    if tls == SmtpTls::None && password.is_some() && !is_loopback_host(&host) {
        c.error(
            raw.tls.as_ref().map_or(raw.kind.span(), Spanned::span),
            format!(
                "tls = \"none\" would send the SMTP password unencrypted to {host}; use tls = \"starttls\" or \"tls\" (\"none\" is for a relay on this host)"
            ),
        );
    }
    let from = match &raw.from {
        Some(f) if valid_mailbox(f.get_ref()) => f.get_ref().clone(),
        Some(f) => {
            c.error(
                f.span(),
                format!(
                    "invalid from address {:?}: use \"backstop@example.com\" or \"Backstop <backstop@example.com>\"",
                    f.get_ref()
                ),
            );
            String::new()
        }
        None => {
            c.error(
                raw.kind.span(),
                format!("email notifier \"{n}\" needs from = \"backstop@example.com\""),
            );
            String::new()
        }
    };
    let mut to = Vec::new();
    match &raw.to {
        Some(list) if list.get_ref().is_empty() => c.error(
            list.span(),
            format!("email notifier \"{n}\" has no recipients: to = [\"oncall@example.com\"]"),
        ),
        Some(list) => {
            for t in list.get_ref() {
                if valid_mailbox(t.get_ref()) {
                    to.push(t.get_ref().clone());
                } else {
                    c.error(
                        t.span(),
                        format!(
                            "invalid address {:?}: use \"oncall@example.com\"",
                            t.get_ref()
                        ),
                    );
                }
            }
        }
        None => c.error(
            raw.kind.span(),
            format!("email notifier \"{n}\" needs to = [\"oncall@example.com\"]"),
        ),
    }
    (c.diagnostics.len() == before).then_some(EmailConfig {
        host,
        port,
        tls,
        username,
        password,
        from,
        to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes() {
        for ok in [
            "a@example.com",
            "Backstop <backstop@example.com>",
            "\"On Call\" <oncall@ops.example.org>",
            "root@localhost",
        ] {
            assert!(valid_mailbox(ok), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "@example.com",
            "a@",
            "a@b@c.com",
            "Backstop <a@example.com",
            "a b@example.com",
            "a@nodot",
        ] {
            assert!(!valid_mailbox(bad), "{bad}");
        }
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("[::1]"));
        assert!(!is_loopback_host("smtp.example.com"));
        assert!(!is_loopback_host("10.0.0.1"));
    }
}
