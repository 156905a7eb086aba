//! The words every crate shares, so a run means the same thing in the
//! catalog, the scheduler, notifications, metrics and the run API: what kind
//! of run it is ([`RunKind`]) and how it ended ([`Outcome`]). Their strings
//! are stored in the catalog, sent in webhook bodies and used as metric
//! labels, so they never change. And how any error is said on one line
//! ([`one_line`]), the same in the catalog, the run API, logs and
//! notifications; and what time it is ([`now`]), which only a test build
//! lets the tests set.

pub mod ipfilter;
pub mod series;
pub mod unit;

/// This machine's name, as `hostname` prints it (the kernel's node name,
/// through uname(2): the systemd unit's `ProcSubset=pid` hides
/// /proc/sys/kernel/hostname); `None` when it is empty or not UTF-8.
pub fn hostname() -> Option<String> {
    let uts = rustix::system::uname();
    let name = uts.nodename().to_str().ok()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The environment variable `name` in a test build (feature `test-clock`,
/// never a release): how the end-to-end tests point backstop at files
/// outside /etc. `None` in a release build.
pub fn test_env(name: &str) -> Option<String> {
    #[cfg(feature = "test-clock")]
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    let _ = name;
    None
}

/// What this build is, as `backstop --version` says it: the version, the
/// git commit and the build date. The binary sets it at start; every
/// manifest's and verification record's `tool.version`, a fleet node's
/// registration and the status page read it. Anything else (a library
/// test) reads the bare version.
pub mod build {
    struct Info {
        version: String,
        commit: String,
        built: String,
    }

    static INFO: std::sync::OnceLock<Info> = std::sync::OnceLock::new();
    static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

    /// When this process started (when [`set`] was called; else the first
    /// time this is asked).
    pub fn started() -> std::time::SystemTime {
        *STARTED.get_or_init(std::time::SystemTime::now)
    }

    /// Sets what this build is, once (the binary, at start): `version` as
    /// `--version` prints it, the git commit and the build date.
    pub fn set(version: &str, commit: &str, built: &str) {
        started();
        let _ = INFO.set(Info {
            version: version.to_string(),
            commit: commit.to_string(),
            built: built.to_string(),
        });
    }

    /// The version, with the commit and build date when the binary set it.
    pub fn version() -> &'static str {
        INFO.get()
            .map_or(env!("CARGO_PKG_VERSION"), |i| i.version.as_str())
    }

    /// The git commit this build was made from ("unknown" when not set).
    pub fn commit() -> &'static str {
        INFO.get().map_or("unknown", |i| i.commit.as_str())
    }

    /// The build date, YYYY-MM-DD ("unknown" when not set).
    pub fn built() -> &'static str {
        INFO.get().map_or("unknown", |i| i.built.as_str())
    }
}

use std::fmt;

use serde::Serialize;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Backup,
    Verify,
    Prune,
}

impl RunKind {
    pub const ALL: [RunKind; 3] = [RunKind::Backup, RunKind::Verify, RunKind::Prune];

    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Backup => "backup",
            RunKind::Verify => "verify",
            RunKind::Prune => "prune",
        }
    }

    /// The kind a stored string names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run held by one node of a fleet sharing a PostgreSQL catalog: the
/// catalog row, which attempt of it this is, and the node holding it. Every
/// update that finishes or publishes the run is guarded by all three (and
/// by the run still being `running`), so a node that lost its claim (its
/// lease expired while it was paused) can publish nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub run: i64,
    /// 1 for the first attempt.
    pub attempt: i32,
    pub node: String,
    /// The tick the run was scheduled for; None for a run asked for on demand.
    pub scheduled_for: Option<chrono::DateTime<chrono::Utc>>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    /// Complete, but the size-anomaly guard found it much smaller than usual.
    Suspect,
    Failed,
    /// Cancelled by shutdown (or found cut off by a crash).
    Interrupted,
    /// Not run: the previous run of the job was still going, or there was
    /// nothing to do.
    Skipped,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Suspect,
        Outcome::Failed,
        Outcome::Interrupted,
        Outcome::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Suspect => "suspect",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
            Outcome::Skipped => "skipped",
        }
    }

    /// The outcome a stored string names.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the run produced what it was for (a suspect backup is
    /// complete and kept, so it counts).
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Suspect)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and its causes on one line ("step failed: cause: its cause"),
/// for a catalog column, a JSON field, a log line or a notification. Errors
/// keep their typed causes as `source()` until this point; a cause whose text
/// a layer already repeats (some client libraries do) is not printed twice.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// The current time. A build with the `test-clock` feature (the test
/// suite's, never a release) reads `BACKSTOP_TEST_NOW` (RFC 3339) instead:
/// the clock the end-to-end tests inject to create backups across months in
/// seconds and to prune as of a given day.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    now_from(std::env::var("BACKSTOP_TEST_NOW").ok())
}

fn now_from(injected: Option<String>) -> chrono::DateTime<chrono::Utc> {
    #[cfg(feature = "test-clock")]
    if let Some(t) = injected.and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok()) {
        return t.with_timezone(&chrono::Utc);
    }
    #[cfg(not(feature = "test-clock"))]
    let _ = injected;
    chrono::Utc::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings are stored and sent: each parses back to itself.
    #[test]
    fn every_word_round_trips() {
        for k in RunKind::ALL {
            assert_eq!(RunKind::parse(k.as_str()), Some(k));
        }
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(RunKind::parse("restore"), None);
        assert_eq!(Outcome::parse("running"), None);
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn one_line_says_each_cause_once() {
        let e = Layer(
            "upload to store \"offsite\" failed",
            Some(Box::new(Layer(
                "dispatch failure: io error",
                Some(Box::new(Layer("io error", None))),
            ))),
        );
        assert_eq!(
            one_line(&e),
            "upload to store \"offsite\" failed: dispatch failure: io error"
        );
    }
}

#[cfg(test)]
mod clock_tests {
    /// The production build ignores an injected time; only a `test-clock`
    /// build honours it. scripts/test.sh runs this both ways
    /// (without the feature it builds this crate alone, in seconds).
    #[test]
    fn only_a_test_clock_build_honours_an_injected_time() {
        let injected = super::now_from(Some("2001-02-03T04:05:06Z".into()));
        let honoured = injected.to_rfc3339() == "2001-02-03T04:05:06+00:00";
        assert_eq!(honoured, cfg!(feature = "test-clock"), "{injected}");
        if !honoured {
            assert!((chrono::Utc::now() - injected).num_seconds().abs() < 5);
        }
    }
}

#[cfg(test)]
mod hostname_tests {
    /// The name uname(2) gives is the one /proc/sys says (readable here:
    /// the tests do not run under the unit's ProcSubset).
    #[test]
    fn hostname_is_the_kernels_node_name() {
        let proc = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(super::hostname().as_deref(), Some(proc.trim()));
    }
}
