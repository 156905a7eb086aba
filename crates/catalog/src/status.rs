//! What status reads of every job at once: a handful of queries for the
//! whole fleet of jobs rather than a handful per job, so the status page
//! of 1,000 jobs costs the catalog a few statements, not thousands (each
//! statement's round trip, not SQLite's or PostgreSQL's work, is what a
//! per-job read spent its time on).
//!
//! The job list travels as one JSON parameter (SQLite's `json_each`,
//! PostgreSQL's `json_array_elements_text`); each job's rows come from the
//! same indexes the per-job queries use.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::{Catalog, CatalogError, Db, RunRecord, Verification, parse_ts};

/// What status needs of one job's history.
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    /// The newest backup runs that were runs (not skipped ticks), newest
    /// first: the last backup and the chart's points. What status shows of
    /// each: not its tick, node, level or whether it was imported, and the
    /// error of the last that ended only.
    pub recent_backups: Vec<RunRecord>,
    /// When the last backup succeeded.
    pub last_success: Option<DateTime<Utc>>,
    /// The start and end of the latest successful drill.
    pub last_drill: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// One backup whose latest verification is asked for: its series, the
/// store that holds it and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupInStore {
    pub series: String,
    pub store: String,
    pub backup_id: String,
}

/// Runs `$body` once per backend with `$sql` bound to that backend's text.
macro_rules! per_backend {
    ($self:expr, $sqlite:expr, $pg:expr, |$sql:ident, $c:ident| $body:expr) => {
        match &$self.db {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let $c = &mut *conn;
                let $sql = $sqlite;
                $body
            }
            Db::Pg(pool) => {
                let mut tx = crate::pg::begin(pool).await?;
                let out = {
                    let $c = &mut *tx;
                    let $sql = $pg;
                    $body
                };
                tx.commit().await?;
                out
            }
        }
    };
}

/// Each job's facts as one row (the recent runs as one JSON array, so a
/// thousand jobs are a thousand rows, not thirty thousand): after either
/// backend's `w(job)`, with its JSON functions and its way to the index of
/// backup runs. The recent runs and the last success come from that index
/// alone (`runs_backups`: a page or two a job, however large the table);
/// the table is read for the last finished run's error and the last drill
/// (`runs_drills`), one row each.
macro_rules! facts_sql {
    ($w:literal, $agg:literal, $array:literal, $backups:literal) => {
        concat!(
            $w,
            "
    SELECT w.job,
      (SELECT CAST(",
            $agg,
            "(",
            $array,
            "(id, backup_id, started_at, finished_at, outcome, NULL, dump_bytes,
                 stored_bytes)) AS TEXT)
         FROM (SELECT id, backup_id, started_at, finished_at, outcome, dump_bytes, stored_bytes
               FROM ",
            $backups,
            " WHERE job = w.job AND kind = 'backup' AND outcome <> 'skipped'
               ORDER BY id DESC LIMIT $2) r) AS recent,
      (SELECT finished_at FROM ",
            $backups,
            " WHERE job = w.job AND kind = 'backup' AND outcome = 'success'
         ORDER BY id DESC LIMIT 1) AS last_success,
      (SELECT error FROM runs WHERE id = (
         SELECT id FROM ",
            $backups,
            " WHERE job = w.job AND kind = 'backup'
           AND outcome NOT IN ('skipped', 'running', 'pending')
         ORDER BY id DESC LIMIT 1)) AS last_error,
      (SELECT started_at || ' ' || finished_at FROM runs WHERE id = (
         SELECT id FROM runs WHERE job = w.job AND kind = 'verify' AND level = 'drill'
           AND outcome = 'success'
         ORDER BY id DESC LIMIT 1)) AS last_drill
    FROM w"
        )
    };
}

const FACTS_SQLITE: &str = facts_sql!(
    "WITH w(job) AS (SELECT value FROM json_each($1))",
    "json_group_array",
    "json_array",
    "runs INDEXED BY runs_backups"
);
const FACTS_PG: &str = facts_sql!(
    "WITH w(job) AS (SELECT value FROM json_array_elements_text(CAST($1 AS json)) AS value)",
    "json_agg",
    "json_build_array",
    "runs"
);

/// One backup run as [`FACTS_SQLITE`]'s array holds it: id, backup id,
/// start, end, outcome, error, dump and stored bytes.
type RunJson = (
    i64,
    Option<String>,
    String,
    Option<String>,
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

/// The [`RunRecord`] of one backup run of the JSON array.
fn run_of(job: &str, r: RunJson) -> RunRecord {
    let (id, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes) = r;
    RunRecord {
        id,
        job: job.to_string(),
        kind: crate::RunKind::Backup,
        backup_id,
        started_at: parse_ts(&started_at),
        finished_at: finished_at.as_deref().map(parse_ts),
        outcome: (outcome != "running" && outcome != "pending")
            .then(|| crate::Outcome::parse(&outcome).unwrap_or(crate::Outcome::Failed)),
        pending: outcome == "pending",
        error,
        dump_bytes,
        stored_bytes,
        // Not read: status shows none of them.
        scheduled_for: None,
        node: None,
        imported: false,
        level: None,
    }
}

const VERIFIED_SQLITE: &str = "
    WITH w(series, store, backup_id) AS (
        SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
        FROM json_each($1))
    SELECT w.series, w.store, w.backup_id, r.level, r.outcome, r.finished_at
    FROM w JOIN runs r ON r.id = (
        SELECT id FROM runs WHERE job = w.series AND kind = 'verify' AND store = w.store
          AND backup_id = w.backup_id AND finished_at IS NOT NULL
          AND outcome IN ('success', 'failed')
        ORDER BY id DESC LIMIT 1)";
const VERIFIED_PG: &str = "
    SELECT w.e ->> 0, w.e ->> 1, w.e ->> 2, r.level, r.outcome, r.finished_at
    FROM json_array_elements(CAST($1 AS json)) AS w(e)
    CROSS JOIN LATERAL (
        SELECT level, outcome, finished_at FROM runs
        WHERE job = w.e ->> 0 AND kind = 'verify' AND store = w.e ->> 1
          AND backup_id = w.e ->> 2 AND finished_at IS NOT NULL
          AND outcome IN ('success', 'failed')
        ORDER BY id DESC LIMIT 1) r";

impl Catalog {
    /// [`JobFacts`] of every job in `jobs` (each present in the answer, a
    /// job without history with empty facts), with at most `limit` recent
    /// backups each.
    ///
    /// # Errors
    /// A database error.
    pub async fn status_facts(
        &self,
        jobs: &[&str],
        limit: u32,
    ) -> Result<HashMap<String, JobFacts>, CatalogError> {
        let list = serde_json::to_string(jobs).unwrap_or_else(|_| "[]".into());
        let mut out: HashMap<String, JobFacts> = jobs
            .iter()
            .map(|j| (j.to_string(), JobFacts::default()))
            .collect();
        type Facts = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Facts> = per_backend!(self, FACTS_SQLITE, FACTS_PG, |sql, c| {
            sqlx::query_as(sql)
                .persistent(false)
                .bind(&list)
                .bind(i64::from(limit))
                .fetch_all(&mut *c)
                .await?
        });
        for (job, recent, success, error, drill) in rows {
            let runs: Vec<RunJson> = match recent.as_deref() {
                Some(json) => serde_json::from_str(json).map_err(|e| {
                    CatalogError::Query(sqlx::Error::Decode(
                        format!("the recent runs of {job}: {e}").into(),
                    ))
                })?,
                None => Vec::new(),
            };
            let mut recent: Vec<RunRecord> = runs.into_iter().map(|r| run_of(&job, r)).collect();
            recent.sort_unstable_by_key(|r| std::cmp::Reverse(r.id));
            // The error of the last run that ended (what status shows).
            if let Some(last) = recent
                .iter_mut()
                .find(|r| r.outcome.is_some_and(|o| o != crate::Outcome::Skipped))
            {
                last.error = error;
            }
            let facts = out.entry(job).or_default();
            facts.recent_backups = recent;
            facts.last_success = success.as_deref().map(parse_ts);
            facts.last_drill = drill
                .as_deref()
                .and_then(|d| d.split_once(' '))
                .map(|(s, f)| (parse_ts(s), parse_ts(f)));
        }
        Ok(out)
    }

    /// The latest finished verification (a success or a failure) of each
    /// backup in `wanted` that has one.
    ///
    /// # Errors
    /// A database error.
    pub async fn latest_verifications(
        &self,
        wanted: &[BackupInStore],
    ) -> Result<HashMap<BackupInStore, Verification>, CatalogError> {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let list = serde_json::to_string(
            &wanted
                .iter()
                .map(|w| [&w.series, &w.store, &w.backup_id])
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|_| "[]".into());
        type Found = (String, String, String, Option<String>, String, String);
        let rows: Vec<Found> = per_backend!(self, VERIFIED_SQLITE, VERIFIED_PG, |sql, c| {
            sqlx::query_as(sql)
                .persistent(false)
                .bind(&list)
                .fetch_all(&mut *c)
                .await?
        });
        Ok(rows
            .into_iter()
            .map(|(series, store, backup_id, level, outcome, at)| {
                (
                    BackupInStore {
                        series,
                        store,
                        backup_id,
                    },
                    Verification {
                        level: level.unwrap_or_default(),
                        ok: outcome == "success",
                        at: parse_ts(&at),
                    },
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, Utc};

    use crate::{Catalog, Location, Outcome, RunKind, RunResult};

    use super::BackupInStore;

    /// The batched reads say what the per-job queries say, job by job,
    /// for names JSON must carry intact.
    #[tokio::test]
    async fn the_batched_reads_agree_with_the_per_job_queries() {
        let dir = tempfile_dir("facts");
        let url = format!("sqlite://{}/catalog.db", dir.display());
        let cat = Catalog::open(Location::new(&url, None)).await.unwrap();
        let t0 = Utc::now() - TimeDelta::days(2);
        let jobs = ["app", "Orders \"EU\" / ünï", "never-ran", "app2"];
        let mut n = 0;
        for (j, job) in jobs.iter().enumerate().filter(|(_, j)| **j != "never-ran") {
            for i in 0..40 {
                n += 1;
                let at = t0 + TimeDelta::minutes(n);
                let outcome = match (i + j) % 9 {
                    0 => Outcome::Skipped,
                    4 => Outcome::Failed,
                    7 => Outcome::Suspect,
                    _ => Outcome::Success,
                };
                let id = cat
                    .start_run(job, RunKind::Backup, Some(&format!("b{i}")), at)
                    .await
                    .unwrap();
                let result = RunResult {
                    error: (outcome == Outcome::Failed).then_some("pg_dump failed"),
                    dump_bytes: Some(1000 + i as u64),
                    stored_bytes: Some(100 + i as u64),
                };
                cat.finish_run(id, outcome, at + TimeDelta::seconds(30), &result)
                    .await
                    .unwrap();
                if i % 5 == 0 {
                    for (level, store, ok) in [
                        ("checksum", "local", true),
                        ("drill", "local", i % 10 == 0),
                        ("restore", "s3", false),
                    ] {
                        let v = cat
                            .start_run(job, RunKind::Verify, Some(&format!("b{i}")), at)
                            .await
                            .unwrap();
                        cat.set_verify_scope(v, level, store).await.unwrap();
                        let o = if ok {
                            Outcome::Success
                        } else {
                            Outcome::Failed
                        };
                        cat.finish_run(
                            v,
                            o,
                            at + TimeDelta::seconds(90 + i as i64),
                            &RunResult::default(),
                        )
                        .await
                        .unwrap();
                    }
                }
            }
        }
        // A run still going is not a recent backup's outcome.
        cat.start_run("app", RunKind::Backup, Some("b99"), t0 + TimeDelta::days(1))
            .await
            .unwrap();
        let facts = cat.status_facts(&jobs, 12).await.unwrap();
        assert_eq!(facts.len(), jobs.len());
        for job in jobs {
            let f = &facts[job];
            let runs = cat.recent_backups(job, 12).await.unwrap();
            let one: Vec<i64> = runs.iter().map(|r| r.id).collect();
            assert_eq!(
                f.recent_backups.iter().map(|r| r.id).collect::<Vec<_>>(),
                one,
                "{job}"
            );
            // The last run that ended, with its error.
            let last = |runs: &[crate::RunRecord]| {
                runs.iter()
                    .find(|r| r.outcome.is_some_and(|o| o != Outcome::Skipped))
                    .map(|r| (r.id, r.outcome, r.error.clone()))
            };
            assert_eq!(last(&f.recent_backups), last(&runs), "{job}");
            assert!(f.recent_backups.iter().all(|r| r.job == job));
            assert_eq!(
                f.last_success,
                cat.last_success(job, RunKind::Backup).await.unwrap(),
                "{job}"
            );
            assert_eq!(f.last_drill, cat.last_drill(job).await.unwrap(), "{job}");
        }
        assert!(facts["never-ran"].recent_backups.is_empty());
        assert_eq!(facts["app"].recent_backups.len(), 12);
        assert!(facts["app"].recent_backups[0].outcome.is_none());
        assert!(facts["app"].last_drill.is_some());
        let failed = &facts["Orders \"EU\" / ünï"].recent_backups[0];
        assert_eq!(
            (failed.outcome, failed.error.as_deref()),
            (Some(Outcome::Failed), Some("pg_dump failed"))
        );

        let mut wanted = Vec::new();
        for job in jobs {
            for store in ["local", "s3", "gcs"] {
                for b in ["b0", "b5", "b35", "b36"] {
                    wanted.push(BackupInStore {
                        series: job.into(),
                        store: store.into(),
                        backup_id: b.into(),
                    });
                }
            }
        }
        let found = cat.latest_verifications(&wanted).await.unwrap();
        for w in &wanted {
            let one = cat
                .last_verifications(&w.series, &w.store)
                .await
                .unwrap()
                .remove(&w.backup_id);
            assert_eq!(found.get(w), one.as_ref(), "{w:?}");
        }
        assert!(found.len() >= 12, "{}", found.len());
        assert!(cat.latest_verifications(&[]).await.unwrap().is_empty());
        cat.close().await;
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "backstop-cat-{what}-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
