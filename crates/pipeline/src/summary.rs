//! One record of how a backup run ended, built from what the stores hold
//! (a manifest, or a cluster run's members' manifests). The live run and
//! `catalog rebuild` both record this, so a catalog rebuilt from the
//! stores says what one recorded live says by construction.

use backstop_catalog::{ImportedRun, Outcome, RunKind, RunResult};
use chrono::{DateTime, Utc};

use crate::manifest::Manifest;

/// How a backup run ended, as the catalog records it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub outcome: Outcome,
    /// Why it failed, or why it is suspect.
    pub error: Option<String>,
    pub dump_bytes: u64,
    pub stored_bytes: u64,
    pub started_at: DateTime<Utc>,
    /// When its content was complete: the manifest's time, not the clock
    /// when the catalog was written.
    pub finished_at: DateTime<Utc>,
}

impl RunSummary {
    /// A complete backup of one series: a success, or suspect when the
    /// size-anomaly guard marked it.
    pub fn of_backup(m: &Manifest) -> Self {
        RunSummary {
            outcome: if m.suspect.is_some() {
                Outcome::Suspect
            } else {
                Outcome::Success
            },
            error: m.suspect.clone(),
            dump_bytes: m.dump_bytes(),
            stored_bytes: m.stored_bytes(),
            started_at: m.started_at,
            finished_at: m.finished_at,
        }
    }

    /// A cluster run whose members (the globals' and each database's of
    /// one backup id) all completed: suspect when a member is, sizes
    /// summed (a globals-only backup's globals count toward the dump),
    /// from the first start to the last finish. `None` without members.
    pub fn of_members(members: &[&Manifest]) -> Option<Self> {
        let suspect: Vec<String> = members
            .iter()
            .filter_map(|m| m.suspect.as_ref().map(|s| format!("{}: {s}", m.series())))
            .collect();
        let (outcome, error) = if suspect.is_empty() {
            (Outcome::Success, None)
        } else {
            (Outcome::Suspect, Some(suspect.join("; ")))
        };
        Some(RunSummary {
            outcome,
            error,
            dump_bytes: members.iter().map(|m| cluster_dump_bytes(m)).sum(),
            stored_bytes: members.iter().map(|m| m.stored_bytes()).sum(),
            started_at: members.iter().map(|m| m.started_at).min()?,
            finished_at: members.iter().map(|m| m.finished_at).max()?,
        })
    }

    /// A cluster run as the stores show it ([`RunSummary::of_members`] of
    /// what they hold of it), where a member that failed left no backup:
    /// failed when the globals, or a database the globals list, has none.
    pub fn of_cluster(members: &[&Manifest]) -> Option<Self> {
        let mut summary = Self::of_members(members)?;
        let globals = members
            .iter()
            .find(|m| m.member.as_deref() == Some(backstop_vocab::series::GLOBALS_SEGMENT));
        let present: Vec<String> = members
            .iter()
            .filter_map(|m| m.cluster_database())
            .collect();
        let absent: Vec<String> = globals
            .and_then(|g| g.databases.as_ref())
            .map(|dbs| {
                dbs.iter()
                    .filter(|d| !present.contains(d))
                    .map(|d| format!("database \"{d}\""))
                    .collect()
            })
            .unwrap_or_default();
        if globals.is_none() {
            summary.outcome = Outcome::Failed;
            summary.error = Some(
                "imported: the run's roles and tablespaces (globals) backup is missing".into(),
            );
        } else if !absent.is_empty() {
            summary.outcome = Outcome::Failed;
            summary.error = Some(format!(
                "imported: no backup of {} in this run (it failed, or was pruned since)",
                absent.join(", ")
            ));
        }
        Some(summary)
    }

    /// What the catalog's run row records of it.
    pub fn result(&self) -> RunResult<'_> {
        RunResult {
            error: self.error.as_deref(),
            dump_bytes: Some(self.dump_bytes),
            stored_bytes: Some(self.stored_bytes),
        }
    }

    /// The run row `catalog rebuild` imports for it.
    pub fn imported<'a>(&'a self, job: &'a str, backup_id: &'a str) -> ImportedRun<'a> {
        ImportedRun {
            job,
            kind: RunKind::Backup,
            backup_id,
            started_at: self.started_at,
            finished_at: self.finished_at,
            outcome: self.outcome,
            error: self.error.as_deref(),
            dump_bytes: Some(self.dump_bytes),
            stored_bytes: Some(self.stored_bytes),
            level: None,
            store: None,
        }
    }
}

/// What a member adds to its cluster run's dump size: its database
/// artifact's plain bytes, or a globals-only backup's globals.
fn cluster_dump_bytes(m: &Manifest) -> u64 {
    m.dump_bytes()
        + if m.artifact("database").is_none() {
            m.artifact("globals").map_or(0, |a| a.plain_bytes)
        } else {
            0
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::manifest_for;
    use backstop_vocab::series::{GLOBALS_SEGMENT, segment};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// A cluster run's globals listing `databases`, with a 10-byte globals
    /// artifact.
    fn globals(databases: &[&str]) -> Manifest {
        let mut m = manifest_for("r", at("2026-03-01T02:00:00Z"), &[("globals", 10)]);
        m.member = Some(GLOBALS_SEGMENT.into());
        m.databases = Some(databases.iter().map(|d| d.to_string()).collect());
        m
    }

    /// The run's backup of `database`: 100 dump bytes, done at `done`.
    fn database(name: &str, done: &str) -> Manifest {
        let mut m = manifest_for("r", at("2026-03-01T02:00:01Z"), &[("database", 100)]);
        m.member = Some(segment(name));
        m.finished_at = at(done);
        m
    }

    #[test]
    fn a_backup_is_a_success_or_suspect_with_its_sizes_and_times() {
        let mut m = manifest_for(
            "b",
            at("2026-03-01T02:00:00Z"),
            &[("database", 100), ("globals", 10)],
        );
        m.finished_at = at("2026-03-01T02:05:00Z");
        let s = RunSummary::of_backup(&m);
        assert_eq!((s.outcome, s.error.as_deref()), (Outcome::Success, None));
        assert_eq!((s.dump_bytes, s.stored_bytes), (100, 110));
        assert_eq!(s.finished_at, at("2026-03-01T02:05:00Z"));
        m.suspect = Some("much smaller".into());
        let s = RunSummary::of_backup(&m);
        assert_eq!(
            (s.outcome, s.error.as_deref()),
            (Outcome::Suspect, Some("much smaller"))
        );
        // What the catalog records live and what a rebuild imports agree.
        let r = s.result();
        let i = s.imported("app", "b");
        assert_eq!(
            (r.error, r.dump_bytes, r.stored_bytes),
            (i.error, i.dump_bytes, i.stored_bytes)
        );
        assert_eq!((i.outcome, i.finished_at), (s.outcome, s.finished_at));
    }

    #[test]
    fn a_cluster_run_sums_its_members_and_fails_on_what_is_missing() {
        let g = globals(&["a", "b"]);
        let a = database("a", "2026-03-01T02:03:00Z");
        let b = database("b", "2026-03-01T02:04:00Z");
        let s = RunSummary::of_cluster(&[&g, &a, &b]).unwrap();
        assert_eq!(s.outcome, Outcome::Success);
        // The globals' plain bytes count toward the dump; its stored too.
        assert_eq!((s.dump_bytes, s.stored_bytes), (210, 210));
        assert_eq!((s.started_at, s.finished_at), (g.started_at, b.finished_at));

        let s = RunSummary::of_cluster(&[&g, &a]).unwrap();
        assert_eq!(s.outcome, Outcome::Failed);
        assert!(s.error.unwrap().contains("database \"b\""));
        // Live, every member completed: a retry's kept globals may list a
        // database dropped since, which is no failure of the run.
        let s = RunSummary::of_members(&[&g, &a]).unwrap();
        assert_eq!((s.outcome, s.dump_bytes), (Outcome::Success, 110));

        let s = RunSummary::of_cluster(&[&a, &b]).unwrap();
        assert_eq!(s.outcome, Outcome::Failed);
        assert!(s.error.unwrap().contains("globals"));

        let mut small = database("b", "2026-03-01T02:04:00Z");
        small.suspect = Some("much smaller".into());
        let s = RunSummary::of_cluster(&[&g, &a, &small]).unwrap();
        assert_eq!(s.outcome, Outcome::Suspect);
        assert!(s.error.unwrap().contains("much smaller"));

        assert_eq!(RunSummary::of_cluster(&[]), None);
    }
}
