//! Fleets: several real `backstop` processes sharing one PostgreSQL catalog
//! (a throwaway cluster, directly or behind a real PgBouncer in transaction
//! mode). Most rows use the test build's backup stand-in
//! (BACKSTOP_TEST_STANDIN: sleeps, checks its claim like a backup before its
//! manifest, then appends "node job tick attempt run" to a file), so dozens
//! of jobs fit on a small machine; `real_backups_*` runs real pg_dump into
//! S3.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::{Connection, Row};

use crate::harness::daemon::Daemon;
use crate::harness::pg::{free_port, rand_u64};
use crate::harness::pgbouncer::Bouncer;
use crate::harness::stall::StallWatch;
use crate::harness::{Env, Run, run_backstop_with, write_private};

const CATALOG_DB: &str = "catalog";

/// One fleet's world: the cluster (its `catalog` database holds the fleet's
/// catalog, `postgres` is what the jobs name), and the stand-in's record file.
struct Fleet {
    env: Env,
    records: PathBuf,
    /// Where nodes reach the catalog (the server, or PgBouncer).
    catalog_url: String,
    /// More `[storage.*]` tables for every node's config.
    storage: String,
}

impl Fleet {
    async fn new() -> Self {
        Self::on(Env::empty().await).await
    }

    async fn on(env: Env) -> Self {
        env.pg.create_db(CATALOG_DB).await;
        let records = env.path("standin.log");
        let catalog_url = env.pg.url(CATALOG_DB);
        Fleet {
            env,
            records,
            catalog_url,
            storage: String::new(),
        }
    }

    /// A node's config: the shared catalog, its own listener and token,
    /// short leases, and `jobs`.
    fn config(&self, name: &str, extra: &str, jobs: &str) -> PathBuf {
        let extra = if extra.contains("max_concurrent_jobs") {
            extra.to_string()
        } else {
            format!("max_concurrent_jobs = 8\n{extra}")
        };
        let token = self.env.path(&format!("{name}-token"));
        write_private(&token, &format!("test-token-{:016x}\n", rand_u64()));
        let text = format!(
            "[daemon]\ncatalog = \"{catalog}\"\ncatalog_password_file = \"{pw}\"\nlisten = \"127.0.0.1:{port}\"\napi_token_file = \"{token}\"\nlease = \"6s\"\nheartbeat = \"1s\"\nshutdown_grace = \"20s\"\n{extra}\n\n[storage.local]\ntype = \"local\"\npath = \"{store}\"\n\n[encryption.default]\nrecipients = [\"{recipient}\"]\n\n{storage}{jobs}",
            catalog = self.catalog_url,
            pw = self.env.password_file.display(),
            port = free_port(),
            token = token.display(),
            store = self.env.store().display(),
            recipient = self.env.recipient,
            storage = self.storage,
        );
        let p = self.env.path(&format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `n` stand-in jobs on `schedule`.
    fn jobs(&self, n: usize, schedule: &str) -> String {
        (0..n)
            .map(|i| {
                self.env.job(
                    &format!("j{i:02}"),
                    "postgres",
                    &format!("schedule = \"{schedule}\"\nstarting_deadline = \"10m\""),
                )
            })
            .collect()
    }

    fn standin_env(&self, ms: &str) -> Vec<(&'static str, String)> {
        vec![
            ("BACKSTOP_TEST_STANDIN", self.records.display().to_string()),
            ("BACKSTOP_TEST_STANDIN_MS", ms.to_string()),
        ]
    }

    async fn migrate(&self, config: &Path) {
        self.backstop(
            config,
            &["migrate", "--url", &self.env.pg.url(CATALOG_DB)],
            &[],
        )
        .await
        .assert_ok();
    }

    async fn backstop(&self, config: &Path, args: &[&str], envs: &[(&str, String)]) -> Run {
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_backstop_with(config, args, &envs).await
    }

    async fn daemon(&self, name: &str, config: &Path, ms: &str) -> Daemon {
        let mut d = Daemon::start_with(
            config,
            self.env.path(&format!("{name}.log")),
            &self.standin_env(ms),
        );
        d.ready().await;
        d
    }

    /// The stand-in's published records: (node, job, tick, attempt, run).
    fn records(&self) -> Vec<(String, String, String, u32, i64)> {
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (
                    f[0].to_string(),
                    f[1].to_string(),
                    f[2].to_string(),
                    f[3].parse().unwrap(),
                    f[4].parse().unwrap(),
                )
            })
            .collect()
    }

    async fn query(&self, sql: &str) -> Vec<sqlx::postgres::PgRow> {
        let mut c = self.env.pg.connect(CATALOG_DB).await;
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_all(&mut c)
            .await
            .unwrap()
    }

    /// The node id a process registered as (its newest).
    async fn node_of(&self, pid: u32) -> Option<String> {
        self.query(&format!(
            "SELECT id FROM nodes WHERE pid = {pid} ORDER BY started_at DESC LIMIT 1"
        ))
        .await
        .first()
        .map(|r| r.get(0))
    }

    /// Running claimed runs held by `node`.
    async fn held_by(&self, node: &str) -> Vec<i64> {
        self.query(&format!(
            "SELECT id FROM runs WHERE node = '{node}' AND outcome = 'running' AND attempt > 0"
        ))
        .await
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// (outcome, attempts rows as (attempt, node, outcome)) of run `id`.
    async fn run_and_attempts(&self, id: i64) -> (String, Vec<(i32, String, String)>) {
        let run = self
            .query(&format!("SELECT outcome FROM runs WHERE id = {id}"))
            .await;
        let attempts = self
            .query(&format!(
                "SELECT attempt, node, outcome FROM attempts WHERE run = {id} ORDER BY attempt"
            ))
            .await;
        (
            run[0].get(0),
            attempts
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        )
    }

    async fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl AsyncFnMut() -> bool,
        logs: &[&Daemon],
    ) {
        let start = Instant::now();
        while !cond().await {
            if start.elapsed() > limit {
                let logs: Vec<String> = logs.iter().map(|d| d.log()).collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}; logs:\n{}",
                    logs.join("\n-----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// No (job, tick) was published twice.
fn published_once(records: &[(String, String, String, u32, i64)]) {
    let mut seen = BTreeSet::new();
    for r in records {
        assert!(
            seen.insert((r.1.clone(), r.2.clone())),
            "published twice: {r:?}"
        );
    }
}

async fn stop(d: &mut Daemon) {
    d.stop().await;
}

/// A pause of the machine this long (see [`StallWatch`]) may rightly cost
/// a node its trust in its lease (trust window 5 s, heartbeat 1 s).
const STALL: Duration = Duration::from_secs(2);

/// Every claimed run up to `until` succeeded with exactly one successful
/// attempt, and had no other attempt, unless the machine stalled (`watch`)
/// and the other attempts were interrupted because a node rightly stopped
/// trusting its lease; any other extra attempt fails the test.
async fn exactly_one_successful_attempt(f: &Fleet, until: &str, watch: &StallWatch) {
    let bad = f
        .query(&format!(
            "SELECT r.id, r.job, r.scheduled_for, r.outcome, count(a.*) AS attempts,
                    count(a.*) FILTER (WHERE a.outcome = 'success') AS ok,
                    count(a.*) FILTER (WHERE a.outcome = 'interrupted' AND a.error LIKE '%lease%') AS lease
             FROM runs r LEFT JOIN attempts a ON a.run = r.id
             WHERE r.outcome <> 'skipped' AND r.scheduled_for <= '{until}'
             GROUP BY r.id HAVING r.outcome <> 'success' OR count(a.*) <> 1
                 OR count(a.*) FILTER (WHERE a.outcome = 'success') <> 1
             ORDER BY r.id"
        ))
        .await;
    if bad.is_empty() {
        return;
    }
    let stalled = watch.longest();
    // Interrupted for the lease and then run once to success elsewhere:
    // what a node must do after a pause it cannot rule out.
    let excused = |r: &sqlx::postgres::PgRow| {
        stalled >= STALL
            && r.get::<String, _>(3) == "success"
            && r.get::<i64, _>(5) == 1
            && r.get::<i64, _>(4) == 1 + r.get::<i64, _>(6)
    };
    if bad.iter().all(excused) {
        eprintln!(
            "the machine stalled for {stalled:?}: {} run(s) were interrupted for their lease and re-run once",
            bad.len()
        );
        return;
    }
    let runs: Vec<String> = bad
        .iter()
        .map(|r| {
            format!(
                "run {} {} {} {} attempts={} ok={}",
                r.get::<i64, _>(0),
                r.get::<String, _>(1),
                r.get::<String, _>(2),
                r.get::<String, _>(3),
                r.get::<i64, _>(4),
                r.get::<i64, _>(5)
            )
        })
        .collect();
    let ids: Vec<String> = bad.iter().map(|r| r.get::<i64, _>(0).to_string()).collect();
    // How each attempt of those runs ended, and why.
    let attempts = f
        .query(&format!(
            "SELECT run, attempt, node, outcome, coalesce(error, '') FROM attempts
             WHERE run IN ({}) ORDER BY run, attempt",
            ids.join(", ")
        ))
        .await;
    let attempts: Vec<String> = attempts
        .iter()
        .map(|r| {
            format!(
                "run {} attempt {} on {}: {} {}",
                r.get::<i64, _>(0),
                r.get::<i32, _>(1),
                r.get::<String, _>(2),
                r.get::<String, _>(3),
                r.get::<String, _>(4)
            )
        })
        .collect();
    panic!(
        "runs without exactly one successful attempt (longest machine stall seen: {stalled:?}):\n{}\nattempts:\n{}",
        runs.join("\n"),
        attempts.join("\n")
    );
}

fn ts(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_run_every_tick_of_fifty_jobs_exactly_once() {
    let watch = StallWatch::start();
    let f = Fleet::new().await;
    let jobs = f.jobs(50, "*/10 * * * * *");
    // n2's config differs (one slot fewer): status and metrics say so.
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let slots = if i == 2 { 7 } else { 8 };
            f.config(
                &format!("n{i}"),
                &format!("max_concurrent_jobs = {slots}"),
                &jobs,
            )
        })
        .collect();
    f.migrate(&configs[0]).await;
    let started = chrono::Utc::now();
    let mut nodes = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        nodes.push(f.daemon(&format!("n{i}"), c, "1000-5000").await);
    }
    // Three ticks of every job at least.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let status = f.backstop(&configs[0], &["status"], &[]).await;
    let node_lines = status
        .stdout
        .lines()
        .filter(|l| l.contains(" daemon "))
        .count();
    assert_eq!(node_lines, 3, "{}", status.all());
    assert!(status.stdout.contains("s left"), "{}", status.all());
    assert!(
        status
            .stdout
            .contains("WARNING: the fleet's nodes run different configurations"),
        "{}",
        status.all()
    );
    // The same table in `status --json` (and so /api/v1/status).
    let json = f.backstop(&configs[0], &["status", "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let fleet = &v["fleet"];
    let listed = fleet["nodes"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        listed
            .iter()
            .filter(|n| n["live"] == true && n["mode"] == "daemon")
            .count(),
        3,
        "{fleet}"
    );
    assert!(
        listed
            .iter()
            .all(|n| n["lease_until"].is_string() && n["runs"].is_array()),
        "{fleet}"
    );
    assert_eq!(fleet["configs_differ"], true, "{fleet}");
    assert_eq!(
        fleet["live_config_hashes"].as_array().map(Vec::len),
        Some(2),
        "{fleet}"
    );
    assert!(fleet["waiting"].is_array(), "{fleet}");
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(50));
    assert_eq!(nodes[0].metric("backstop_fleet_nodes").await, Some(3.0));
    assert_eq!(
        nodes[0].metric("backstop_fleet_config_hashes").await,
        Some(2.0)
    );
    assert_eq!(nodes[0].metric("backstop_fleet_lease_ok").await, Some(1.0));
    // Busy nodes stay within their daemon.catalog_connections (4 each).
    let open = f
        .query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backstop'")
        .await[0]
        .get::<i64, _>(0);
    assert!(open <= 3 * 4, "{open} catalog connections for three nodes");
    tokio::time::sleep(Duration::from_secs(16)).await;
    let stopped = chrono::Utc::now();
    for d in &mut nodes {
        d.signal("-TERM");
    }
    for d in &mut nodes {
        assert_eq!(
            d.exit_code(Duration::from_secs(60)).await,
            Some(0),
            "{}",
            d.log()
        );
        // The catalog's password reaches no log.
        assert!(!d.log().contains(&f.env.pg.password));
    }
    // Ticks whose runs had time to finish before the stop.
    let until = ts(stopped - chrono::Duration::seconds(6));
    exactly_one_successful_attempt(&f, &until, &watch).await;

    // Every tick in the window is a row, consecutive, 10 s apart.
    let ticks = f
        .query(&format!(
            "SELECT job, scheduled_for FROM runs WHERE outcome = 'success' AND scheduled_for <= '{until}' ORDER BY job, scheduled_for"
        ))
        .await;
    let mut by_job: BTreeMap<String, Vec<chrono::DateTime<chrono::Utc>>> = BTreeMap::new();
    for r in &ticks {
        let t: String = r.get(1);
        by_job
            .entry(r.get(0))
            .or_default()
            .push(chrono::DateTime::parse_from_rfc3339(&t).unwrap().to_utc());
    }
    assert_eq!(by_job.len(), 50, "every job ran");
    for (job, t) in &by_job {
        assert!(t.len() >= 2, "{job}: {t:?}");
        assert!(
            t[0] - started <= chrono::Duration::seconds(12),
            "{job} started late: {t:?}"
        );
        for w in t.windows(2) {
            assert_eq!(
                w[1] - w[0],
                chrono::Duration::seconds(10),
                "{job}: a tick is missing: {t:?}"
            );
        }
    }

    // What was published: once per (job, tick), spread over all three nodes.
    let records = f.records();
    published_once(&records);
    let published_nodes: BTreeSet<&str> = records.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        published_nodes.len(),
        3,
        "work spread over every node: {published_nodes:?}"
    );

    // No two attempts of one job overlapped.
    let spans = f
        .query(
            "SELECT r.job, a.started_at, a.finished_at FROM attempts a JOIN runs r ON r.id = a.run
             WHERE a.finished_at IS NOT NULL ORDER BY r.job, a.started_at",
        )
        .await;
    let overlaps = f
        .query(
            "SELECT count(*) FROM attempts a JOIN runs r ON r.id = a.run
             JOIN attempts b ON b.run <> a.run JOIN runs s ON s.id = b.run AND s.job = r.job AND s.kind = r.kind
             WHERE a.started_at < b.finished_at AND b.started_at < a.finished_at",
        )
        .await;
    assert!(!spans.is_empty());
    assert_eq!(
        overlaps[0].get::<i64, _>(0),
        0,
        "attempts of one job overlapped"
    );

    // New jobs were not backfilled: one skipped tick each, before the start.
    let skipped = f
        .query(
            "SELECT count(*) FROM runs WHERE outcome = 'skipped' AND error LIKE 'not backfilled%'",
        )
        .await;
    assert_eq!(skipped[0].get::<i64, _>(0), 50);
}

/// Waits until `node` holds at least one run; returns them.
async fn holding(f: &Fleet, node: &str, d: &Daemon) -> Vec<i64> {
    let start = Instant::now();
    loop {
        let held = f.held_by(node).await;
        if !held.is_empty() {
            return held;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "node {node} never held a run; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two daemons; one is SIGKILLed (or SIGSTOPped) while it holds runs.
async fn two_nodes(f: &Fleet, jobs: usize, schedule: &str, ms: &str) -> (Daemon, Daemon, String) {
    let jobs = f.jobs(jobs, schedule);
    let a = f.config("a", "", &jobs);
    let b = f.config("b", "", &jobs);
    f.migrate(&a).await;
    let da = f.daemon("a", &a, ms).await;
    let db = f.daemon("b", &b, ms).await;
    let node_a = f
        .node_of(da.child.id().unwrap())
        .await
        .expect("a registered");
    (da, db, node_a)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_daemons_runs_are_interrupted_and_rerun_once_elsewhere() {
    let f = Fleet::new().await;
    let (mut a, mut b, node_a) = two_nodes(&f, 6, "*/20 * * * * *", "6000-8000").await;
    let held = holding(&f, &node_a, &a).await;
    // Asking the other node's API for that job now says who runs it.
    let job: String = f
        .query(&format!("SELECT job FROM runs WHERE id = {}", held[0]))
        .await[0]
        .get(0);
    // (b may be trying to claim the same tick itself just now.)
    let refused = b.run_to_end_when_free(&job).await;
    assert_eq!(refused["state"], "failed", "{refused}");
    let why = refused["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("already running on node") && why.contains(&node_a),
        "{refused}"
    );
    a.signal("-KILL");
    let killed = Instant::now();
    let _ = a.exit_code(Duration::from_secs(10)).await;
    for &run in &held {
        f.wait(
            "the killed node's run to be re-run elsewhere",
            Duration::from_secs(40),
            async || f.run_and_attempts(run).await.0 == "success",
            &[&b],
        )
        .await;
        let (_, attempts) = f.run_and_attempts(run).await;
        assert_eq!(attempts.len(), 2, "run {run}: {attempts:?}");
        assert_eq!(
            (attempts[0].1.as_str(), attempts[0].2.as_str()),
            (node_a.as_str(), "interrupted")
        );
        assert_ne!(attempts[1].1, node_a);
        assert_eq!(attempts[1].2, "success");
        let published: Vec<_> = f.records().into_iter().filter(|r| r.4 == run).collect();
        assert_eq!(
            published.len(),
            1,
            "run {run} published once: {published:?}"
        );
        assert_ne!(published[0].0, node_a);
    }
    // Within the lease (6 s), a reaper pass (1 s) and the re-run (≤ 8 s).
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    assert!(
        b.log().contains("lease expired while it held this run"),
        "{}",
        b.log()
    );
    // The dead node is gone from the catalog.
    assert!(
        f.query(&format!("SELECT 1 FROM nodes WHERE id = '{node_a}'"))
            .await
            .is_empty()
    );
    stop(&mut b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_paused_past_its_lease_publishes_nothing_and_registers_anew() {
    let f = Fleet::new().await;
    let (mut a, mut b, node_a) = two_nodes(&f, 6, "*/20 * * * * *", "5000-6000").await;
    // A reload first: the node registers anew with the reloaded config's
    // digest, not the one it started with.
    let digest = async |node: &str| -> String {
        f.query(&format!(
            "SELECT config_hash FROM nodes WHERE id = '{node}'"
        ))
        .await
        .first()
        .map(|r| r.get(0))
        .unwrap_or_default()
    };
    let started_with = digest(&node_a).await;
    let config_a = f.env.path("a.toml");
    std::fs::write(
        &config_a,
        std::fs::read_to_string(&config_a)
            .unwrap()
            .replace("max_concurrent_jobs = 8", "max_concurrent_jobs = 7"),
    )
    .unwrap();
    a.signal("-HUP");
    f.wait(
        "the reloaded digest in the catalog",
        Duration::from_secs(20),
        async || digest(&node_a).await != started_with,
        &[&a],
    )
    .await;
    let reloaded = digest(&node_a).await;
    let held = holding(&f, &node_a, &a).await;
    a.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(14)).await;
    a.signal("-CONT");
    for &run in &held {
        f.wait(
            "the paused node's run to be re-run elsewhere",
            Duration::from_secs(40),
            async || f.run_and_attempts(run).await.0 == "success",
            &[&a, &b],
        )
        .await;
    }
    // Let the resumed node notice and settle.
    f.wait(
        "the paused node to register anew",
        Duration::from_secs(20),
        async || {
            f.node_of(a.child.id().unwrap())
                .await
                .is_some_and(|n| n != node_a)
        },
        &[&a],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = f.records();
    assert!(
        records
            .iter()
            .all(|r| r.0 != node_a || !held.contains(&r.4)),
        "the stale node published a run it had lost: {records:?}"
    );
    published_once(&records);
    // What the woken node said (not the join line, which names its lease
    // too): its lease was gone, so it stopped its runs and registered anew.
    let log = a.log();
    assert!(log.contains("This node's lease expired"), "{log}");
    assert!(log.contains("Registered anew."), "{log}");
    let anew = f.node_of(a.child.id().unwrap()).await.unwrap();
    assert_eq!(
        digest(&anew).await,
        reloaded,
        "registered anew with the reloaded config's digest (it started with {started_with})"
    );
    stop(&mut a).await;
    stop(&mut b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_whole_fleet_was_down_one_catch_up_run_per_job_and_the_rest_skipped() {
    let f = Fleet::new().await;
    let jobs = f.jobs(4, "*/5 * * * * *");
    let a = f.config("a", "", &jobs);
    let b = f.config("b", "", &jobs);
    f.migrate(&a).await;
    let mut da = f.daemon("a", &a, "200-500").await;
    let mut db = f.daemon("b", &b, "200-500").await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    stop(&mut da).await;
    stop(&mut db).await;
    let down = chrono::Utc::now();
    // Four intervals with no node up.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let up = chrono::Utc::now();
    let mut da = f.daemon("a2", &a, "200-500").await;
    let mut db = f.daemon("b2", &b, "200-500").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(&mut da).await;
    stop(&mut db).await;
    let rows = f
        .query(&format!(
            "SELECT job, outcome, error FROM runs WHERE scheduled_for > '{}' AND scheduled_for <= '{}' ORDER BY job, scheduled_for",
            ts(down),
            ts(up)
        ))
        .await;
    let mut per_job: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &rows {
        let e = per_job.entry(r.get(0)).or_default();
        match r.get::<String, _>(1).as_str() {
            "skipped" => {
                assert!(
                    r.get::<Option<String>, _>(2)
                        .unwrap()
                        .contains("no node recorded it when it was due")
                );
                e.0 += 1;
            }
            "success" => e.1 += 1,
            other => panic!("unexpected outcome {other}"),
        }
    }
    assert_eq!(per_job.len(), 4, "{per_job:?}");
    for (job, (skipped, ran)) in per_job {
        assert_eq!(ran, 1, "{job}: one catch-up run");
        assert!(
            skipped >= 3,
            "{job}: the older missed ticks are skipped ({skipped})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_inserts_of_the_same_ticks_yield_one_row_each() {
    let f = Fleet::new().await;
    let config = f.config("a", "", "");
    f.migrate(&config).await;
    let url = f.catalog_url.clone();
    let password = f.env.pg.password.clone();
    let base = chrono::Utc::now();
    let ticks: Vec<_> = (0..20)
        .map(|i| base + chrono::Duration::seconds(i * 10))
        .collect();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (url, password, ticks) = (url.clone(), password.clone(), ticks.clone());
        tasks.push(tokio::spawn(async move {
            // One connection each: 16 writers stay within the test
            // cluster's max_connections.
            let cat = backstop_catalog::Catalog::open(
                backstop_catalog::Location::new(&url, Some(&password)).with_pool_size(1),
            )
            .await
            .unwrap();
            let mut won = 0;
            for t in ticks {
                if cat
                    .record_tick(
                        "app",
                        backstop_catalog::RunKind::Backup,
                        t,
                        1,
                        chrono::Utc::now(),
                    )
                    .await
                    .unwrap()
                {
                    won += 1;
                }
            }
            won
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap();
    }
    assert_eq!(won, 20, "each tick inserted by exactly one writer");
    let rows = f
        .query("SELECT count(*), count(DISTINCT scheduled_for) FROM runs WHERE job = 'app'")
        .await;
    assert_eq!(
        (rows[0].get::<i64, _>(0), rows[0].get::<i64, _>(1)),
        (20, 20)
    );
}

/// Waits until 300 ms past the wall clock's next multiple of 10 seconds
/// (a tick of `*/10 * * * * *`).
async fn just_past_a_ten_second_tick() {
    let into = chrono::Utc::now().timestamp_millis().rem_euclid(10_000) as u64;
    tokio::time::sleep(Duration::from_millis(10_000 - into + 300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cronjob_mode_two_invocations_run_each_due_tick_once_and_a_killed_ones_run_is_taken_over() {
    let f = Fleet::new().await;
    let jobs = f.jobs(5, "*/10 * * * * *");
    let config = f.config("cron", "", &jobs);
    f.migrate(&config).await;
    let env = f.standin_env("1000-2000");
    // First invocation: the jobs are new to the fleet, nothing is backfilled.
    // It starts just past a tick, so it is done (about 2 s) before the next
    // one falls due: a tick due while it works would be run, as it should.
    just_past_a_ten_second_tick().await;
    let first = f.backstop(&config, &["run-due", "--once"], &env).await;
    first.assert_ok();
    assert!(first.stdout.contains("nothing was due"), "{}", first.all());
    // Wait for the next tick, then two invocations at once.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (x, y) = tokio::join!(
        f.backstop(&config, &["run-due", "--once"], &env),
        f.backstop(&config, &["run-due", "--once"], &env)
    );
    x.assert_ok();
    y.assert_ok();
    let records = f.records();
    published_once(&records);
    let jobs_run: BTreeSet<&str> = records.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(jobs_run.len(), 5, "{records:?}\n{}\n{}", x.all(), y.all());

    // A killed invocation's run is taken over by the next one.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut slow = tokio::process::Command::new(crate::harness::backstop_bin());
    slow.args(["run-due", "--once", "--job", "j00"])
        .env("BACKSTOP_CONFIG", &config)
        .envs(f.standin_env("20000-20000").into_iter())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = slow.spawn().unwrap();
    let pid = child.id().unwrap();
    let mut node = None;
    f.wait(
        "the invocation to claim j00",
        Duration::from_secs(20),
        async || {
            node = f.node_of(pid).await;
            match &node {
                Some(n) => !f.held_by(n).await.is_empty(),
                None => false,
            }
        },
        &[],
    )
    .await;
    let node = node.unwrap();
    let held = f.held_by(&node).await;
    child.kill().await.unwrap();
    // After its lease (6 s) the next invocation reaps it. A newer tick of
    // the job (every 10 s) is due by then: the dead run goes back to
    // pending and is superseded by it (one backup, the newest, runs
    // instead of two in a row), and that one runs once.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let next = f
        .backstop(&config, &["run-due", "--once", "--job", "j00"], &env)
        .await;
    next.assert_ok();
    assert_eq!(held.len(), 1);
    let run = held[0];
    let (outcome, attempts) = f.run_and_attempts(run).await;
    assert_eq!(outcome, "skipped", "{attempts:?}\n{}", next.all());
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].2, "interrupted");
    let why = f
        .query(&format!("SELECT error FROM runs WHERE id = {run}"))
        .await[0]
        .get::<String, _>(0);
    assert!(why.starts_with("superseded"), "{why}");
    let newer = f
        .query(&format!(
            "SELECT id FROM runs WHERE job = 'j00' AND id > {run} AND outcome = 'success'"
        ))
        .await;
    // The newest tick, and any that fell due while the invocation worked
    // (its fire loops run them), each published once.
    assert!(!newer.is_empty(), "{}", next.all());
    for row in &newer {
        let id: i64 = row.get(0);
        assert_eq!(f.records().iter().filter(|r| r.4 == id).count(), 1);
    }
    assert_eq!(f.records().iter().filter(|r| r.4 == run).count(), 0);
}

/// Without the diagnosis, both cases said only "pool timed out while
/// waiting for an open connection" (sqlx retries a full or refusing server
/// silently until its acquire timeout).
#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_without_a_free_connection_says_which_limit_and_a_down_one_says_so() {
    let f = Fleet::new().await;
    let config = f.config("a", "", &f.jobs(1, "0 0 * * * *"));
    f.migrate(&config).await;
    // A status that reached the catalog lists the job (and exits 1: it has
    // never succeeded).
    let answered = |r: &Run| r.stdout.contains("NEVER SUCCEEDED");
    let status = f.backstop(&config, &["status"], &[]).await;
    assert!(answered(&status), "{}", status.all());
    // Everything else on the server takes every connection it has left.
    let opts: sqlx::postgres::PgConnectOptions = f.env.pg.url(CATALOG_DB).parse().unwrap();
    let opts = opts.password(&f.env.pg.password);
    let mut hogs = Vec::new();
    loop {
        match sqlx::postgres::PgConnection::connect_with(&opts).await {
            Ok(c) => hogs.push(c),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53300") => break,
            Err(e) => panic!("unexpected error filling the server: {e}"),
        }
        assert!(hogs.len() <= 30, "the test cluster allows 30 connections");
    }
    let full = f.backstop(&config, &["status"], &[]).await;
    full.assert_failed();
    assert!(!answered(&full), "{}", full.all());
    let all = full.all();
    for says in [
        "no connection to the catalog postgres://127.0.0.1:",
        "within 10 s",
        "the server refuses new connections (sorry, too many clients already)",
        "max_connections",
        "daemon.catalog_connections",
    ] {
        assert!(all.contains(says), "missing {says:?}:\n{all}");
    }
    assert!(!all.contains("pool timed out"), "{all}");
    assert!(!all.contains(&f.env.pg.password), "{all}");
    // Connections given back: status works again, nothing lost.
    for c in hogs {
        c.close().await.unwrap();
    }
    let status = f.backstop(&config, &["status"], &[]).await;
    assert!(answered(&status), "{}", status.all());
    // A catalog server that is down is named as such.
    f.env.pg.stop();
    let down = f.backstop(&config, &["status"], &[]).await;
    down.assert_failed();
    assert!(
        down.all().contains("cannot connect") && down.all().contains("refused"),
        "{}",
        down.all()
    );
    assert!(!down.all().contains("pool timed out"), "{}", down.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_features_refuse_a_sqlite_catalog_and_a_new_catalog_needs_migrate() {
    let f = Fleet::new().await;
    // An unmigrated PostgreSQL catalog: the daemon refuses, naming the fix.
    let config = f.config("a", "", &f.jobs(1, "0 0 * * * *"));
    let run = f.backstop(&config, &["run"], &[]).await;
    run.assert_failed();
    assert!(run.stderr.contains("backstop migrate"), "{}", run.all());
    // A catalog a newer backstop migrated: refused, saying to upgrade.
    f.migrate(&config).await;
    f.env
        .pg
        .execute(
            CATALOG_DB,
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99, 'future', true, '\\x00', 0)",
        )
        .await;
    let newer = f.backstop(&config, &["run"], &[]).await;
    newer.assert_failed();
    assert!(
        newer.stderr.contains("newer than this backstop's"),
        "{}",
        newer.all()
    );
    assert!(
        newer.stderr.contains("upgrade this node's backstop"),
        "{}",
        newer.all()
    );
    assert!(!newer.all().contains(&f.env.pg.password), "{}", newer.all());

    // A password inline in the URL is refused by the config check.
    let inline = std::fs::read_to_string(&config)
        .unwrap()
        .replace("postgres://postgres@", "postgres://postgres:hunter2@");
    std::fs::write(&config, inline).unwrap();
    let check = f.backstop(&config, &["check-config"], &[]).await;
    assert_eq!(check.code, Some(2), "{}", check.all());
    assert!(
        check.all().contains("catalog_password_file"),
        "{}",
        check.all()
    );
    assert!(!check.all().contains("hunter2"), "{}", check.all());
    // run-due on the embedded SQLite catalog.
    let sqlite = f.env.write_config(&f.env.job("app", "postgres", ""));
    let due = f.backstop(&sqlite, &["run-due", "--once"], &[]).await;
    due.assert_failed();
    assert!(
        due.all().contains("needs a PostgreSQL catalog"),
        "{}",
        due.all()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn through_pgbouncer_in_transaction_mode_every_tick_runs_exactly_once() {
    let watch = StallWatch::start();
    let mut f = Fleet::new().await;
    let bouncer = Bouncer::start(&f.env, CATALOG_DB, "transaction");
    f.catalog_url = format!(
        "postgres://postgres@127.0.0.1:{}/{CATALOG_DB}",
        bouncer.port
    );
    let jobs = f.jobs(12, "*/5 * * * * *");
    let a = f.config("a", "", &jobs);
    let b = f.config("b", "", &jobs);
    // Migrations take a session lock: straight to the server.
    f.migrate(&a).await;
    let started = chrono::Utc::now();
    let mut da = f.daemon("a", &a, "500-2000").await;
    let mut db = f.daemon("b", &b, "500-2000").await;
    tokio::time::sleep(Duration::from_secs(21)).await;
    let stopped = chrono::Utc::now();
    stop(&mut da).await;
    stop(&mut db).await;
    let until = ts(stopped - chrono::Duration::seconds(4));
    exactly_one_successful_attempt(&f, &until, &watch).await;
    let ran = f
        .query(&format!("SELECT count(*) FROM runs WHERE outcome = 'success' AND scheduled_for > '{}' AND scheduled_for <= '{until}'", ts(started)))
        .await;
    assert!(
        ran[0].get::<i64, _>(0) >= 12 * 3,
        "{}",
        ran[0].get::<i64, _>(0)
    );
    for d in [&da, &db] {
        let log = d.log();
        assert!(!log.contains("prepared statement"), "{log}");
        // After a machine stall a node may rightly say it cannot renew its
        // lease in time; nothing else may fail.
        let stalled = watch.longest() >= STALL;
        assert!(
            !log.lines()
                .any(|l| l.contains("Cannot") && !(stalled && l.contains("lease"))),
            "{log}"
        );
    }
    drop(bouncer);
}

#[tokio::test(flavor = "multi_thread")]
async fn real_backups_two_daemons_and_a_one_shot_share_the_catalog_and_the_bucket() {
    let watch = StallWatch::start();
    let mut f = Fleet::on(Env::new().await).await;
    let s3 = crate::harness::s3::S3Server::start();
    let secret = f.env.path("s3-secret");
    write_private(&secret, &format!("{}\n", crate::harness::s3::SECRET_KEY));
    f.storage = s3
        .storage_toml("offsite", "")
        .replace("{SECRET_FILE}", &secret.display().to_string());
    let jobs = f.env.job_to(
        "app",
        "marketplace",
        &["offsite"],
        "schedule = \"*/20 * * * * *\"",
    );
    let a = f.config("a", "", &jobs);
    let b = f.config("b", "", &jobs);
    f.migrate(&a).await;
    // No stand-in: real pg_dump, age, zstd and S3.
    let mut da = Daemon::start_with(&a, f.env.path("a.log"), &[]);
    da.ready().await;
    let mut db = Daemon::start_with(&b, f.env.path("b.log"), &[]);
    db.ready().await;
    // A one-shot backup on the same catalog claims its own run.
    let once = f.backstop(&a, &["backup", "--job", "app"], &[]).await;
    once.assert_ok();
    // So does a run asked of one daemon through its API: it runs there.
    let asked = db.run_to_end("app").await;
    assert_eq!(asked["state"], "success", "{asked}\n{}", db.log());
    f.wait(
        "two scheduled backups",
        Duration::from_secs(90),
        async || {
            f.query("SELECT 1 FROM runs WHERE job = 'app' AND kind = 'backup' AND outcome = 'success' AND scheduled_for IS NOT NULL")
                .await
                .len()
                >= 2
        },
        &[&da, &db],
    )
    .await;
    stop(&mut da).await;
    stop(&mut db).await;
    let until = ts(chrono::Utc::now());
    exactly_one_successful_attempt(&f, &until, &watch).await;
    // Every successful backup run has its manifest in the bucket, and the
    // bucket holds nothing else: no duplicate, nothing partial.
    let ids: BTreeSet<String> = f
        .query("SELECT backup_id FROM runs WHERE job = 'app' AND kind = 'backup' AND outcome = 'success'")
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ids.len() >= 3, "{ids:?}");
    let keys = s3.keys("prod/app/").await;
    let in_bucket: BTreeSet<String> = keys
        .iter()
        .filter_map(|k| {
            k.strip_prefix("prod/app/")?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(in_bucket, ids, "bucket keys: {keys:?}");
    for id in &ids {
        assert!(
            keys.contains(&format!("prod/app/{id}/manifest.json")),
            "{id}: {keys:?}"
        );
    }
    // Both daemons and the one-shot were nodes; the runs name who ran them.
    let who = f.query("SELECT count(DISTINCT node) FROM attempts").await;
    assert!(who[0].get::<i64, _>(0) >= 2);
    let verify = f
        .backstop(&a, &["verify", "--job", "app", "--backup", "all"], &[])
        .await;
    verify.assert_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn run_due_max_runtime_interrupts_its_runs_back_to_pending_and_exits_1() {
    let f = Fleet::new().await;
    // Once a minute, 4 s from now: one tick comes soon, the next not before
    // the test is over (a newer tick would supersede the run put back).
    let second = (chrono::Utc::now() + chrono::Duration::seconds(4)).format("%S");
    let config = f.config("cron", "", &f.jobs(1, &format!("{second} * * * * *")));
    f.migrate(&config).await;
    let fast = f.standin_env("100-200");
    // Baseline (a new job is not backfilled), then wait for the tick.
    f.backstop(&config, &["run-due", "--once"], &fast)
        .await
        .assert_ok();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = Instant::now();
    let cut = f
        .backstop(
            &config,
            &["run-due", "--once", "--max-runtime", "2s"],
            &f.standin_env("30000-30000"),
        )
        .await;
    assert_eq!(cut.code, Some(1), "{}", cut.all());
    assert!(
        cut.stderr.contains("--max-runtime ran out"),
        "{}",
        cut.all()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let rows = f
        .query("SELECT outcome, interruptions, id FROM runs WHERE attempt > 0")
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<String, _>(0),
        "pending",
        "back for the next invocation"
    );
    assert_eq!(rows[0].get::<i32, _>(1), 1);
    assert!(f.records().is_empty(), "nothing published");
    // The next invocation runs it.
    let run: i64 = rows[0].get(2);
    f.backstop(&config, &["run-due", "--once"], &fast)
        .await
        .assert_ok();
    assert_eq!(f.run_and_attempts(run).await.0, "success");
    assert_eq!(f.records().iter().filter(|r| r.4 == run).count(), 1);
}

/// A cluster job on a fleet's catalog: the one-shot backup and a daemon's
/// API run each claim the job's run, every database is a record of its own
/// under the claim, and `catalog rebuild` against the PostgreSQL catalog
/// finds everything already there.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_job_runs_as_one_claimed_run_with_a_record_per_database() {
    let f = Fleet::on(Env::new().await).await;
    let jobs = format!(
        "[[job]]\nname = \"server\"\ndatabase = {{ url = \"{}\", password_file = \"{}\", all = true, exclude = [\"{CATALOG_DB}\"] }}\nstorage = [\"local\"]\n\n",
        f.env.pg.url("postgres"),
        f.env.password_file.display()
    );
    let a = f.config("a", "", &jobs);
    f.migrate(&a).await;
    let once = f.backstop(&a, &["backup", "--job", "server"], &[]).await;
    once.assert_ok();
    assert!(
        once.stdout.contains("ok      database \"marketplace\""),
        "{}",
        once.stdout
    );
    let mut d = Daemon::start_with(&a, f.env.path("a.log"), &[]);
    d.ready().await;
    let asked = d.run_to_end("server").await;
    assert_eq!(asked["state"], "success", "{asked}\n{}", d.log());
    stop(&mut d).await;
    let runs: Vec<(String, String, i32, bool)> = f
        .query("SELECT job, outcome, attempt, node IS NOT NULL FROM runs WHERE kind = 'backup' ORDER BY id")
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let claimed: Vec<_> = runs.iter().filter(|r| r.0 == "server").collect();
    assert_eq!(claimed.len(), 2, "{runs:?}");
    assert!(
        claimed.iter().all(|r| r.1 == "success" && r.2 == 1),
        "{runs:?}"
    );
    for series in ["server/@globals", "server/marketplace", "server/postgres"] {
        let of: Vec<_> = runs.iter().filter(|r| r.0 == series).collect();
        assert_eq!(of.len(), 2, "{series}: {runs:?}");
        assert!(
            of.iter().all(|r| r.1 == "success" && r.2 == 0 && r.3),
            "{series}: {runs:?}"
        );
    }
    let rebuilt = f.backstop(&a, &["catalog", "rebuild"], &[]).await;
    rebuilt.assert_ok();
    assert!(
        rebuilt
            .stdout
            .contains("6 backup(s) in 3 series, 0 added; 0 verification(s), 0 added;"),
        "{}",
        rebuilt.stdout
    );
    assert!(
        !rebuilt.stdout.contains("cluster run(s) added"),
        "the claimed cluster run is already recorded: {}",
        rebuilt.stdout
    );
    let status = f.backstop(&a, &["status", "--json"], &[]).await;
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        v["jobs"][0]["databases"].as_array().unwrap().len(),
        2,
        "{v}"
    );
}

/// A run-due invocation whose catalog fails after it joined the fleet (here:
/// its role may register but not write runs) cannot know what was due: it
/// exits 1 and says so, instead of "nothing was due" and 0. (Before the fix
/// it printed "nothing was due" and exited 0.)
#[tokio::test(flavor = "multi_thread")]
async fn run_due_fails_when_the_catalog_fails_after_it_joined() {
    let mut f = Fleet::new().await;
    let admin = f.config("admin", "", &f.jobs(2, "*/5 * * * * *"));
    f.migrate(&admin).await;
    let password = f.env.pg.password.clone();
    f.env
        .pg
        .execute(
            CATALOG_DB,
            &format!(
                "CREATE ROLE limited LOGIN PASSWORD '{password}';
                 GRANT SELECT, INSERT, UPDATE, DELETE ON nodes, attempts TO limited;
                 GRANT SELECT ON runs, _sqlx_migrations TO limited;"
            ),
        )
        .await;
    f.catalog_url = f.catalog_url.replacen(
        &format!("{}@", crate::harness::pg::SUPERUSER),
        "limited@",
        1,
    );
    let config = f.config("cron", "", &f.jobs(2, "*/5 * * * * *"));
    let out = f
        .backstop(&config, &["run-due", "--once"], &f.standin_env("100-200"))
        .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(!out.stdout.contains("nothing was due"), "{}", out.all());
    assert!(
        out.stderr
            .contains("the catalog failed after this invocation joined"),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("catalog: cannot"), "{}", out.all());
    // It joined (and left) with that role: the failure came after.
    assert!(out.stderr.contains("Joined the fleet"), "{}", out.all());
}

/// Ticks that fall due while a run-due invocation works are recorded when
/// they are due (and run while it lasts), as a daemon's are, not found
/// missing by the next invocation. Before the fix no tick of the
/// invocation's lifetime had a row.
#[tokio::test(flavor = "multi_thread")]
async fn run_due_records_the_ticks_that_fall_due_while_it_works() {
    let f = Fleet::new().await;
    let config = f.config("cron", "", &f.jobs(1, "*/3 * * * * *"));
    f.migrate(&config).await;
    f.backstop(&config, &["run-due", "--once"], &f.standin_env("100-200"))
        .await
        .assert_ok();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let from = chrono::Utc::now();
    let long = f
        .backstop(
            &config,
            &["run-due", "--once", "--max-runtime", "14s"],
            &f.standin_env("5000-5000"),
        )
        .await;
    let to = chrono::Utc::now();
    // Runs slower than the interval keep it busy until --max-runtime.
    assert_eq!(long.code, Some(1), "{}", long.all());
    assert!(
        long.stderr.contains("--max-runtime ran out"),
        "{}",
        long.all()
    );
    let rows = f
        .query(&format!(
            "SELECT scheduled_for, outcome, COALESCE(error, '') FROM runs WHERE job = 'j00' AND scheduled_for > '{}' AND scheduled_for <= '{}' ORDER BY scheduled_for",
            ts(from),
            ts(to - chrono::Duration::seconds(1))
        ))
        .await;
    let seen: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // Every 3 s over at least 14 s: at least four fire times, each a row.
    assert!(seen.len() >= 4, "{seen:#?}\n{}", long.all());
    let mut fire = from.timestamp() / 3 * 3 + 3;
    while fire <= (to - chrono::Duration::seconds(1)).timestamp() {
        let at = ts(chrono::DateTime::from_timestamp(fire, 0).unwrap());
        assert!(
            seen.iter().any(|r| r.0 == at),
            "the tick {at} has no row: {seen:#?}\n{}",
            long.all()
        );
        fire += 3;
    }
    assert!(seen.iter().all(|r| !r.2.starts_with("missed")), "{seen:#?}");
    // And it ran one of them (the others were superseded while it was busy).
    assert!(
        seen.iter().any(|r| r.1 == "success"),
        "{seen:#?}\n{}",
        long.all()
    );
}

/// Two rebuilds at once (two nodes starting on an empty catalog) import a
/// backup once: the second waits for the first's transaction and then finds
/// the row. Before the unique index it did not see the uncommitted row,
/// did not wait, and added a second one.
#[tokio::test(flavor = "multi_thread")]
async fn two_rebuilds_at_once_import_each_backup_once() {
    let f = Fleet::new().await;
    let config = f.config("a", "", "");
    f.migrate(&config).await;
    let password = f.env.pg.password.clone();
    let url = f.catalog_url.clone();
    let at = chrono::Utc::now();
    // One rebuild's import, not yet committed.
    let mut first = f.env.pg.connect(CATALOG_DB).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; INSERT INTO runs (job, kind, backup_id, started_at, finished_at, outcome, imported)
         VALUES ('app', 'backup', '20261206T000000Z', '{t}', '{t}', 'success', true)",
        t = ts(at)
    )))
    .execute(&mut first)
    .await
    .unwrap();
    let second = tokio::spawn(async move {
        let cat =
            backstop_catalog::Catalog::open(backstop_catalog::Location::new(&url, Some(&password)))
                .await
                .unwrap();
        let run = backstop_catalog::ImportedRun {
            job: "app",
            kind: backstop_catalog::RunKind::Backup,
            backup_id: "20261206T000000Z",
            started_at: at,
            finished_at: at,
            outcome: backstop_catalog::Outcome::Success,
            error: None,
            dump_bytes: None,
            stored_bytes: None,
            level: None,
            store: None,
        };
        let added = cat.import_runs(&[run]).await.unwrap();
        cat.close().await;
        added
    });
    // The second import either finishes (it did not wait: the defect) or
    // waits on the first's row lock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = f
            .query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backstop' AND wait_event_type = 'Lock'")
            .await[0]
            .get::<i64, _>(0);
        if waiting > 0 || second.is_finished() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second import neither waited nor finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut first).await.unwrap();
    let added = second.await.unwrap();
    let rows = f
        .query("SELECT count(*) FROM runs WHERE backup_id = '20261206T000000Z'")
        .await[0]
        .get::<i64, _>(0);
    assert_eq!(rows, 1, "one imported row per backup");
    assert_eq!(added, 0, "the second import added nothing");
}

/// The fleet's own gauges: runs waiting per job and how long the oldest
/// has waited, what each live node runs, this node's claim latency, and the
/// job's interval the waiting alert compares with.
#[tokio::test(flavor = "multi_thread")]
async fn fleet_metrics_show_waiting_runs_what_each_node_runs_and_claim_latency() {
    let f = Fleet::new().await;
    let jobs = f.jobs(3, "*/2 * * * * *");
    let a = f.config("a", "max_concurrent_jobs = 1", &jobs);
    f.migrate(&a).await;
    // One slot for three jobs whose runs take 6 s: two always wait.
    let mut d = f.daemon("a", &a, "6000-6000").await;
    let sum = |body: &str, prefix: &str, max: bool| {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |acc: f64, v| if max { acc.max(v) } else { acc + v })
    };
    let mut seen = String::new();
    f.wait(
        "waiting runs, their age and one running run in the fleet's gauges",
        Duration::from_secs(40),
        async || {
            seen = d.http("GET", "/metrics", None).await.1;
            sum(&seen, "backstop_fleet_pending_runs{", false) >= 1.0
                && sum(&seen, "backstop_fleet_pending_age_seconds{", true) > 0.0
                && sum(&seen, "backstop_fleet_node_running_runs{", false) == 1.0
        },
        &[&d],
    )
    .await;
    assert!(
        seen.lines()
            .any(|l| l.starts_with("backstop_fleet_node_running_runs{") && l.contains("hostname=")),
        "{seen}"
    );
    assert!(
        d.metric("backstop_fleet_claim_seconds_count").await >= Some(1.0),
        "{seen}"
    );
    assert_eq!(
        d.metric("backstop_job_interval_seconds{job=\"j00\"}").await,
        Some(2.0)
    );
    stop(&mut d).await;
}

/// Issue 28, item 11. One-shot commands on a shared catalog are fleet
/// nodes: a `verify` killed mid-check leaves a run row that a daemon's
/// reaping ends `interrupted` once its lease lapses (before, the row had no
/// node and stayed `running` for good), and a `prune` claims the job's
/// prune, so it is refused while another node prunes the job and records
/// its run as a claimed one.
#[tokio::test(flavor = "multi_thread")]
async fn one_shot_verify_and_prune_on_a_shared_catalog_are_fleet_nodes() {
    let f = Fleet::on(Env::new().await).await;
    let slow = crate::harness::slow_pg_restore_dir(&f.env, "slow-bin", 120);
    let id = f.env.identity.display().to_string();
    let jobs = f.env.job(
        "app",
        "marketplace",
        &format!(
            "pg_bin_dir = \"{}\"\nidentity_file = \"{id}\"\nretention = {{ keep_last = 1 }}\nverify = {{ schedule = \"0 5 * * sun\", level = \"restore\", target = \"{}\", target_password_file = \"{}\", identity_file = \"{id}\" }}",
            slow.display(),
            f.env.pg.url("postgres"),
            f.env.password_file.display()
        ),
    );
    let config = f.config("n", "", &jobs);
    f.migrate(&config).await;
    f.backstop(&config, &["backup", "--job", "app"], &[])
        .await
        .assert_ok();

    // A verify whose restore check is under way, then killed.
    let mut verify = tokio::process::Command::new(crate::harness::backstop_bin())
        .args(["verify", "--job", "app", "--level", "restore"])
        .env("BACKSTOP_CONFIG", &config)
        .env("BACKSTOP_LOG", "info")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = verify.id().unwrap();
    let started = Instant::now();
    let node = loop {
        let rows = f
            .query("SELECT node FROM runs WHERE kind = 'verify' AND outcome = 'running'")
            .await;
        if let Some(r) = rows.first() {
            break r.get::<Option<String>, _>(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the verify never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        node.is_some() && node == f.node_of(pid).await,
        "the verify's run row carries the node the process registered as: {node:?}"
    );
    verify.kill().await.unwrap();
    let _ = verify.wait().await;

    // A daemon reaps it once its lease (6 s) lapsed.
    let mut d = f.daemon("n", &config, "100-200").await;
    let started = Instant::now();
    loop {
        let rows = f
            .query("SELECT outcome, error FROM runs WHERE kind = 'verify' ORDER BY id")
            .await;
        let outcome: String = rows[0].get(0);
        if outcome == "interrupted" {
            let error: Option<String> = rows[0].get(1);
            assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.contains("stopped renewing its lease")),
                "{error:?}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the killed verify's run is still {outcome}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(&mut d).await;

    // Another (live) node holds the job's prune: a one-shot prune waits.
    f.query(
        "INSERT INTO nodes (id, hostname, pid, version, config_hash, mode, lease_until)
         VALUES ('other', 'elsewhere', 1, 'test', 'x', 'daemon', now() + interval '1 hour')",
    )
    .await;
    f.query(
        "INSERT INTO runs (job, kind, started_at, outcome, node, attempt)
         VALUES ('app', 'prune', '2026-01-01T00:00:00.000Z', 'running', 'other', 1)",
    )
    .await;
    let refused = f.backstop(&config, &["prune", "--job", "app"], &[]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("is pruning job \"app\"; wait for it"),
        "{}",
        refused.stderr
    );
    f.query("DELETE FROM runs WHERE node = 'other'").await;
    f.query("DELETE FROM nodes WHERE id = 'other'").await;
    f.backstop(&config, &["prune", "--job", "app"], &[])
        .await
        .assert_ok();
    // The claimed run (attempt 1) and the prune's own records (attempt 0),
    // all this process's node's.
    let pruned: Vec<(String, i32, bool)> = f
        .query("SELECT outcome, attempt, node IS NOT NULL FROM runs WHERE kind = 'prune' ORDER BY attempt DESC, id")
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        pruned.first(),
        Some(&("success".to_string(), 1, true)),
        "a claimed prune run: {pruned:?}"
    );
    assert!(
        pruned.iter().all(|(o, _, node)| o == "success" && *node),
        "{pruned:?}"
    );
}
