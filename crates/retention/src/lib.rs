//! Retention planning as a pure function: (policy, backups, time zone) → for
//! every backup, keep or delete and why.
//!
//! The rules follow restic's `forget`: they are ORed; `keep_last` keeps the
//! newest N; each calendar rule keeps the newest backup of each of its N most
//! recent buckets that hold a backup (buckets in the job's time zone);
//! `keep_within` keeps everything within that duration of the newest complete
//! backup (not of now, so a stalled job does not age its backups out). On top
//! of the rules, the invariants that make retention safe:
//!
//! - only complete backups (with a manifest) are planned; incomplete attempts
//!   are left to orphan cleanup;
//! - the newest complete backup is always kept;
//! - at least `min_keep` complete backups are kept, and backups whose
//!   verification failed do not count toward it;
//! - suspect backups (much smaller than usual) take no rule's slot, so they
//!   never push out older good backups, and do not count toward `min_keep`;
//!   they are kept for inspection while they are newer than the oldest good
//!   backup kept.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;

/// A retention policy. At least one rule must be set (checked by config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub keep_within: Option<Duration>,
    /// Complete, not-failed-verification backups that are always kept.
    pub min_keep: u32,
}

impl Policy {
    /// Whether any rule is set (an empty policy would keep only `min_keep`).
    pub fn has_rules(&self) -> bool {
        self.keep_last
            + self.keep_hourly
            + self.keep_daily
            + self.keep_weekly
            + self.keep_monthly
            + self.keep_yearly
            > 0
            || self.keep_within.is_some()
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub id: String,
    pub started_at: DateTime<Utc>,
    /// Its latest verification failed: kept by rules as usual, but it does
    /// not count toward `min_keep` and is never the "newest good" one.
    pub verify_failed: bool,
    /// The size-anomaly guard marked it suspect.
    pub suspect: bool,
}

/// The decision for one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub started_at: DateTime<Utc>,
    pub keep: bool,
    /// Why: e.g. `last 1`, `daily 2026-01-14`, `newest`, `min_keep`, or
    /// `no rule keeps it`.
    pub reasons: Vec<String>,
}

/// Every backup's decision, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub decisions: Vec<Decision>,
}

impl Plan {
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| d.keep)
    }

    pub fn deleted(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep)
    }
}

#[derive(Clone, Copy)]
enum Bucket {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Bucket {
    fn name(self) -> &'static str {
        match self {
            Bucket::Hourly => "hourly",
            Bucket::Daily => "daily",
            Bucket::Weekly => "weekly",
            Bucket::Monthly => "monthly",
            Bucket::Yearly => "yearly",
        }
    }

    fn of(self, t: DateTime<Utc>, tz: Tz) -> String {
        let l = t.with_timezone(&tz);
        match self {
            Bucket::Hourly => format!("{}T{:02}", l.format("%Y-%m-%d"), l.hour()),
            Bucket::Daily => l.format("%Y-%m-%d").to_string(),
            Bucket::Weekly => {
                let w = l.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Bucket::Monthly => l.format("%Y-%m").to_string(),
            Bucket::Yearly => l.year().to_string(),
        }
    }
}

/// Plans retention for `backups` (complete ones only; any order).
pub fn plan(policy: &Policy, backups: &[Backup], tz: Tz) -> Plan {
    let mut all: Vec<&Backup> = backups.iter().collect();
    all.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let good: Vec<Backup> = all
        .iter()
        .filter(|b| !b.suspect)
        .map(|b| (*b).clone())
        .collect();
    let mut decisions = plan_good(policy, &good, tz).decisions;
    // Suspect backups: kept for inspection while newer than the oldest good
    // backup kept; the newest complete backup is kept whatever it is.
    let oldest_kept = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.started_at)
        .min();
    for (i, b) in all.iter().enumerate().filter(|(_, b)| b.suspect) {
        let keep = i == 0 || oldest_kept.is_none_or(|t| b.started_at >= t);
        let mut reasons = vec![if keep {
            "suspect: kept for inspection".to_string()
        } else {
            "suspect, older than every good backup kept".to_string()
        }];
        if i == 0 {
            reasons.push("newest".into());
        }
        decisions.push(Decision {
            id: b.id.clone(),
            started_at: b.started_at,
            keep,
            reasons,
        });
    }
    decisions.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    Plan { decisions }
}

/// The rules and invariants over backups that are not suspect.
fn plan_good(policy: &Policy, backups: &[Backup], tz: Tz) -> Plan {
    let mut sorted: Vec<&Backup> = backups.iter().collect();
    // Newest first; equal times by id, so the plan is deterministic.
    sorted.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];

    for (i, r) in reasons
        .iter_mut()
        .enumerate()
        .take(policy.keep_last as usize)
    {
        r.push(format!("last {}", i + 1));
    }
    for (bucket, n) in [
        (Bucket::Hourly, policy.keep_hourly),
        (Bucket::Daily, policy.keep_daily),
        (Bucket::Weekly, policy.keep_weekly),
        (Bucket::Monthly, policy.keep_monthly),
        (Bucket::Yearly, policy.keep_yearly),
    ] {
        let mut seen = HashSet::new();
        for (i, b) in sorted.iter().enumerate() {
            if seen.len() as u32 >= n {
                break;
            }
            let key = bucket.of(b.started_at, tz);
            if seen.insert(key.clone()) {
                reasons[i].push(format!("{} {key}", bucket.name()));
            }
        }
    }
    if let (Some(within), Some(newest)) = (policy.keep_within, sorted.first()) {
        let within = chrono::Duration::from_std(within).unwrap_or(chrono::Duration::MAX);
        let cutoff = newest.started_at.checked_sub_signed(within);
        for (i, b) in sorted.iter().enumerate() {
            if cutoff.is_none_or(|c| b.started_at >= c) {
                reasons[i].push("within".into());
            }
        }
    }
    if !sorted.is_empty() {
        reasons[0].push("newest".into());
    }
    // min_keep: count kept backups that did not fail verification; top up
    // with the newest such backups not yet kept.
    let good_kept = sorted
        .iter()
        .zip(&reasons)
        .filter(|(b, r)| !b.verify_failed && !r.is_empty())
        .count() as u32;
    let mut missing = policy.min_keep.saturating_sub(good_kept);
    for (i, b) in sorted.iter().enumerate() {
        if missing == 0 {
            break;
        }
        if !b.verify_failed && reasons[i].is_empty() {
            reasons[i].push("min_keep".into());
            missing -= 1;
        }
    }

    Plan {
        decisions: sorted
            .iter()
            .zip(reasons)
            .map(|(b, r)| Decision {
                id: b.id.clone(),
                started_at: b.started_at,
                keep: !r.is_empty(),
                reasons: if r.is_empty() {
                    vec!["no rule keeps it".into()]
                } else {
                    r
                },
            })
            .collect(),
    }
}
