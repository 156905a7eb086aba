//! The catalog's history (issue 28, item 10): runs older than
//! `daemon.catalog_history` are deleted in bounded passes, except each
//! job's newest of every kind, outcome and level; status reads a window
//! that skipped ticks do not fill; a cluster job's series come from an
//! index range, not a scan.

use std::time::Duration;

use backstop_catalog::{Catalog, Location};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Connection;

use crate::harness::Env;
use crate::harness::daemon::{Daemon, daemon_config, wait_for};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One row of `runs`: job, kind, level, outcome, started this long ago.
struct Row(
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    chrono::Duration,
);

/// A history: 300 successful backups of `app` 100–101 days old, its one
/// failure 120 days old, a drill and a checksum verification 150 days old,
/// three recent backups and 250 skipped ticks after them (more than the
/// status window's 200); five old backups of `old` (a job no longer
/// configured).
fn history() -> Vec<Row> {
    let mut rows: Vec<Row> = (0..300)
        .map(|n| {
            Row(
                "app",
                "backup",
                None,
                "success",
                chrono::Duration::days(100) + chrono::Duration::minutes(n),
            )
        })
        .collect();
    rows.push(Row(
        "app",
        "backup",
        None,
        "failed",
        chrono::Duration::days(120),
    ));
    rows.push(Row(
        "app",
        "verify",
        Some("drill"),
        "success",
        chrono::Duration::days(150),
    ));
    rows.push(Row(
        "app",
        "verify",
        Some("checksum"),
        "success",
        chrono::Duration::days(150),
    ));
    for d in 1..=3 {
        rows.push(Row(
            "app",
            "backup",
            None,
            "success",
            chrono::Duration::days(d),
        ));
    }
    for m in 1..=SKIPPED {
        rows.push(Row(
            "app",
            "backup",
            None,
            "skipped",
            chrono::Duration::minutes(m),
        ));
    }
    for d in 0..5 {
        rows.push(Row(
            "old",
            "backup",
            None,
            "success",
            chrono::Duration::days(200 + d),
        ));
    }
    // Oldest first, as a catalog records them.
    rows.sort_by_key(|r| std::cmp::Reverse(r.4));
    rows
}

const SKIPPED: i64 = 250;

/// What is left after a pass: (job, kind, level, outcome) per run, by id;
/// then the skipped ticks.
const LEFT: &[(&str, &str, Option<&str>, &str)] = &[
    ("old", "backup", None, "success"),
    ("app", "verify", Some("drill"), "success"),
    ("app", "verify", Some("checksum"), "success"),
    ("app", "backup", None, "failed"),
    ("app", "backup", None, "success"),
    ("app", "backup", None, "success"),
    ("app", "backup", None, "success"),
];

type Left = Vec<(String, String, Option<String>, String)>;

/// The daemon's pass on a SQLite catalog: the old runs go, each job's
/// newest of every kind, outcome and level stays, the metric counts what
/// went, and status still shows the last success and the old drill's
/// restore time.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_forgets_old_runs_but_never_a_jobs_newest_of_a_kind() {
    let env = Env::new().await;
    let config = daemon_config(
        &env,
        "status_page = true",
        &env.job("app", "marketplace", ""),
    );
    // The catalog made by a first command, then filled with history.
    env.backstop(&["status"]).await.assert_ok();
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let now = Utc::now();
    for Row(job, kind, level, outcome, ago) in history() {
        let started = now - ago;
        sqlx::query(
            "INSERT INTO runs (job, kind, level, backup_id, started_at, finished_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(job)
        .bind(kind)
        .bind(level)
        .bind(started.format("%Y%m%dT%H%M%SZ").to_string())
        .bind(ts(started))
        .bind(ts(started + chrono::Duration::seconds(30)))
        .bind(outcome)
        .execute(&mut c)
        .await
        .unwrap();
    }
    c.close().await.unwrap();

    let log = env.path("daemon.log");
    let mut d = Daemon::start_with(
        &config,
        log.clone(),
        &[("BACKSTOP_TEST_HISTORY_FIRST_MS", "0".into())],
    );
    d.ready().await;
    wait_for(
        "the history pass",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("Deleted runs that ended before")
        },
        &log,
    )
    .await;
    assert_eq!(
        d.metric("backstop_catalog_runs_forgotten_total").await,
        Some(304.0),
        "300 old backups of app and 4 of old"
    );
    let (code, body) = d
        .http("GET", "/api/v1/status", Some(d.token.as_str()))
        .await;
    d.stop().await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let app = status["jobs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job"] == "app"))
        .unwrap_or_else(|| panic!("{status}"));
    assert_eq!(app["restore_seconds"], 30.0, "the old drill stays: {app}");
    // The last run is the newest backup, behind 250 skipped ticks (which
    // filled the whole window of 200 before).
    assert_eq!(app["last_run_outcome"], "success", "{app}");
    assert_eq!(app["state"], "ok", "{app}");
    assert!(app["last_success_at"].is_string(), "{app}");

    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let left: Left = sqlx::query_as("SELECT job, kind, level, outcome FROM runs ORDER BY id")
        .fetch_all(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    assert_eq!(left, want_left());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("deleted=304"), "{log}");
}

fn want_left() -> Left {
    let skipped = ("app", "backup", None, "skipped");
    LEFT.iter()
        .chain(std::iter::repeat_n(&skipped, SKIPPED as usize))
        .map(|(j, k, l, o)| {
            (
                j.to_string(),
                k.to_string(),
                l.map(str::to_string),
                o.to_string(),
            )
        })
        .collect()
}

/// The same on a PostgreSQL catalog, in bounded batches, with a fleet's
/// attempts deleted with their runs; its series come from an index range
/// (a job whose name shares the prefix is not a series).
#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_catalog_forgets_in_batches_and_finds_series_by_range() {
    let env = Env::empty().await;
    env.pg.create_db("catalog").await;
    let url = env.pg.url("catalog");
    let password = std::fs::read_to_string(&env.password_file).unwrap();
    let at = Location::new(&url, Some(password.trim()));
    Catalog::migrate(at).await.unwrap();
    let catalog = Catalog::open(at).await.unwrap();
    let mut c = env.pg.connect("catalog").await;
    let now = Utc::now();
    for Row(job, kind, level, outcome, ago) in history() {
        let started = now - ago;
        sqlx::query(
            "WITH r AS (INSERT INTO runs (job, kind, level, backup_id, started_at, finished_at, outcome, attempt)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, 1) RETURNING id)
             INSERT INTO attempts (run, attempt, node, outcome) SELECT id, 1, 'n1', $7 FROM r",
        )
        .bind(job)
        .bind(kind)
        .bind(level)
        .bind(started.format("%Y%m%dT%H%M%SZ").to_string())
        .bind(ts(started))
        .bind(ts(started + chrono::Duration::seconds(30)))
        .bind(outcome)
        .execute(&mut c)
        .await
        .unwrap();
    }
    // A cluster job's series, and jobs whose names merely begin alike.
    for job in [
        "srv/Sales%20DB",
        "srv/@globals",
        "srv/shop",
        "srv/shop",
        "srv-eu",
        "srv0",
        "srvx",
        "srv",
    ] {
        sqlx::query("INSERT INTO runs (job, kind, started_at, outcome) VALUES ($1, 'backup', $2, 'success')")
            .bind(job)
            .bind(ts(now))
            .execute(&mut c)
            .await
            .unwrap();
    }
    assert_eq!(
        catalog.series_of("srv").await.unwrap(),
        ["srv/@globals", "srv/Sales%20DB", "srv/shop"]
    );

    let before = now - chrono::Duration::days(90);
    let mut passes = Vec::new();
    loop {
        let n = catalog.forget_history(before, 100).await.unwrap();
        passes.push(n);
        if n < 100 {
            break;
        }
    }
    assert_eq!(passes, [100, 100, 100, 4], "bounded batches, 304 in all");
    assert_eq!(catalog.forget_history(before, 100).await.unwrap(), 0);
    let left: Left = sqlx::query_as(
        "SELECT job, kind, level, outcome FROM runs WHERE job IN ('app', 'old') ORDER BY id",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(left, want_left());
    let (attempts,): (i64,) = sqlx::query_as("SELECT count(*) FROM attempts")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(
        attempts,
        LEFT.len() as i64 + SKIPPED,
        "attempts go with their runs"
    );
    // The status window skips the skipped ticks; the full one has them.
    let done = catalog.recent_runs_done(Some("app"), 1).await.unwrap();
    assert_eq!(done[0].outcome, Some(backstop_vocab::Outcome::Success));
    let all = catalog.recent_runs(Some("app"), 1).await.unwrap();
    assert_eq!(all[0].outcome, Some(backstop_vocab::Outcome::Skipped));

    // Status's batched reads (PostgreSQL's text of them) say what the
    // per-job queries say, job by job.
    sqlx::query(
        "INSERT INTO runs (job, kind, level, store, backup_id, started_at, finished_at, outcome)
         VALUES ('app', 'verify', 'drill', 'local', 'b1', $1, $2, 'success'),
                ('app', 'verify', 'checksum', 'local', 'b1', $2, $2, 'failed'),
                ('app', 'verify', 'checksum', 's3', 'b1', $2, $2, 'success')",
    )
    .bind(ts(now - chrono::Duration::minutes(9)))
    .bind(ts(now))
    .execute(&mut c)
    .await
    .unwrap();
    let jobs = ["app", "old", "srv/shop", "srv", "never \"ran\""];
    let facts = catalog.status_facts(&jobs, 5).await.unwrap();
    for job in jobs {
        let ids =
            |runs: &[backstop_catalog::RunRecord]| runs.iter().map(|r| r.id).collect::<Vec<_>>();
        let one = catalog.recent_backups(job, 5).await.unwrap();
        assert_eq!(ids(&facts[job].recent_backups), ids(&one), "{job}");
        assert_eq!(
            facts[job].last_success,
            catalog
                .last_success(job, backstop_vocab::RunKind::Backup)
                .await
                .unwrap(),
            "{job}"
        );
        assert_eq!(
            facts[job].last_drill,
            catalog.last_drill(job).await.unwrap(),
            "{job}"
        );
    }
    assert!(facts["app"].last_drill.is_some());
    assert!(!facts["srv"].recent_backups.is_empty());
    let wanted: Vec<backstop_catalog::BackupInStore> =
        [("app", "local"), ("app", "s3"), ("app", "gcs")]
            .into_iter()
            .map(|(series, store)| backstop_catalog::BackupInStore {
                series: series.into(),
                store: store.into(),
                backup_id: "b1".into(),
            })
            .collect();
    let found = catalog.latest_verifications(&wanted).await.unwrap();
    assert_eq!(found.len(), 2);
    for w in &wanted {
        let one = catalog
            .last_verifications(&w.series, &w.store)
            .await
            .unwrap()
            .remove("b1");
        assert_eq!(found.get(w), one.as_ref(), "{w:?}");
    }
    catalog.close().await;
}
