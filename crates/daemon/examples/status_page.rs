//! Benchmark of the status page at fleet scale (run by bench/status-page.sh):
//! a config of JOBS jobs (default 1,000) and a SQLite catalog holding DAYS
//! days (default 90) of PER_DAY backup ticks a day (default 96: every 15
//! minutes) of each, as `daemon.catalog_history` keeps them, with a prune
//! and a verify a day; about one tick in 13 skipped (a fleet's superseded
//! ones), one backup in 97 failed, some jobs failing now with long errors
//! and some suspect, a cluster job every 50th. Prints the time to read the
//! status afresh (the catalog's statement and the store listings, as
//! `backstop status` does) and the catalog's share, the daemon's listing of
//! every store at start, what its first request reads (the catalog) and
//! what a later one costs (served from what it keeps), the time to render
//! the page and to serialise the API's JSON, and the page's size.
//!
//!   cargo run -p backstop-daemon --example status_page [--release] -- [JOBS] [ROUNDS] [DAYS] [PER_DAY]

use std::time::{Duration, Instant};

use backstop_catalog::{Catalog, Location};
use backstop_daemon::{page, status};
use sqlx::Connection;

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<28} min {:>8.2} ms   median {:>8.2} ms   max {:>8.2} ms   ({} rounds)",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let days: u32 = args.next().map_or(Ok(90), |a| a.parse())?;
    let per_day: u32 = args.next().map_or(Ok(96), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store)?;
    let mut toml = format!(
        "[daemon]\ncatalog = \"sqlite://{}\"\nstatus_page = true\n\n[storage.local]\ntype = \"local\"\npath = \"{}\"\n\n",
        dir.path().join("catalog.db").display(),
        store.display()
    );
    let names: Vec<String> = (0..jobs)
        .map(|i| match i % 7 {
            0 => format!("billing-{i:03}"),
            1 => format!("Orders_EU_{i:03}"),
            2 => format!("analytics_{i:03}"),
            _ => format!("app-{i:03}"),
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        let database = if i % 50 == 0 {
            "database = { url = \"postgres://backup@db-1.internal:5432/postgres\", all = true }"
                .to_string()
        } else {
            format!(
                "database = {{ url = \"postgres://backup@db-{}.internal:5432/app\" }}",
                i % 40
            )
        };
        toml.push_str(&format!(
            "[[job]]\nname = \"{name}\"\n{database}\nencryption = \"none\"\nstorage = [\"local\"]\nschedule = \"{} * * * *\"\nrpo = \"2h\"\nrto = \"1h\"\nretention = {{ keep_daily = 14 }}\n\n",
            i % 60
        ));
    }
    let cfg_path = dir.path().join("backstop.toml");
    std::fs::write(&cfg_path, toml)?;
    let config = backstop_config::Config::load(&cfg_path)?;
    let catalog = Catalog::open(Location::new(&config.catalog, None)).await?;

    let t0 = Instant::now();
    let now = chrono::Utc::now();
    let history = history(&config.catalog, &names, now, days, per_day).await?;
    println!(
        "{jobs} jobs, {history} runs in the catalog ({days} days of {per_day} backup ticks a day per job, a prune and a verify a day; written in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    let origin = page::Origin {
        host: "bench",
        version: env!("CARGO_PKG_VERSION"),
        now,
    };
    // Each round reads the whole status (what a request does), and the
    // catalog's batched read alone (its share), one after the other.
    let mut read = Vec::new();
    let mut facts = Vec::new();
    let mut rows = Vec::new();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    for _ in 0..rounds.div_ceil(2).max(1) {
        let t = Instant::now();
        rows = status::collect(&config, &catalog, now).await?;
        read.push(t.elapsed());
        let t = Instant::now();
        let f = catalog.status_facts(&all, status::RECENT_RUNS).await?;
        facts.push(t.elapsed());
        assert_eq!(f.len(), names.len());
    }
    // What the daemon serves GET / and /api/v1/status from: what it keeps
    // of each job: its stores' listing, its catalog facts read once (the
    // first request) and kept fresh by its own runs and, while someone
    // looks, a reader every 30 s.
    let kept = backstop_daemon::status_cache::StatusCache::default();
    // What the daemon does at start (seeding its metrics): one listing of
    // each job's stores, which the page keeps.
    let t = Instant::now();
    for job in &config.jobs {
        let seq = kept.begin_listing();
        kept.listed(&job.name, seq, status::list_stores(&config, job).await);
    }
    let listed = t.elapsed();
    let t = Instant::now();
    kept.collect(&config, &catalog, now).await?;
    let first = t.elapsed();
    let mut served = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        rows = kept.collect(&config, &catalog, now).await?;
        served.push(t.elapsed());
    }
    let mut render = Vec::new();
    let mut html = String::new();
    for _ in 0..rounds {
        let t = Instant::now();
        html = page::overview(&rows, &origin);
        render.push(t.elapsed());
    }
    let mut json = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let _ = serde_json::to_vec(&rows)?;
        json.push(t.elapsed());
    }
    let attention = rows.iter().filter(|r| r.needs_attention()).count();
    let points: usize = rows.iter().map(|r| r.history.len()).sum();
    println!(
        "page: {} KiB of HTML, {} rows ({attention} need attention), {points} chart points",
        html.len() / 1024,
        rows.len()
    );
    stats("read status (catalog+store)", read);
    stats("  of which the catalog's read", facts);
    println!(
        "the daemon's listing of every store at start: {:.2} ms",
        listed.as_secs_f64() * 1000.0
    );
    println!(
        "the daemon's first request reads the catalog: {:.2} ms",
        first.as_secs_f64() * 1000.0
    );
    stats("served from the kept reads", served);
    stats("render / (HTML)", render);
    stats("/api/v1/status (JSON)", json);
    catalog.close().await;
    Ok(())
}

/// Writes the history straight into the SQLite catalog at `url` (what the
/// daemon would have recorded run by run), one statement per job; returns
/// the number of runs.
async fn history(
    url: &str,
    names: &[String],
    now: chrono::DateTime<chrono::Utc>,
    days: u32,
    per_day: u32,
) -> anyhow::Result<i64> {
    let mut c = sqlx::sqlite::SqliteConnection::connect(url).await?;
    // A bulk load: the catalog's indexes are set aside and made again
    // after (the same definitions, from sqlite_master), as a restore would.
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs' AND sql IS NOT NULL",
    )
    .fetch_all(&mut c)
    .await?;
    sqlx::query("PRAGMA synchronous = OFF")
        .execute(&mut c)
        .await?;
    for (name, _) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX \"{name}\"")))
            .execute(&mut c)
            .await?;
    }
    let error = "pg_dump failed (exit status 1): pg_dump: error: query failed: ERROR:  canceling statement due to conflict with recovery\nDETAIL:  User query might have needed to see row versions that must be removed.\npg_dump: detail: Query was: COPY sales.\"Orders\" (id, placed, doc) TO stdout;";
    let at = now.format("%Y-%m-%d %H:%M:%S").to_string();
    let ticks = i64::from(days * per_day);
    let minutes = 1440 / i64::from(per_day.max(1));
    sqlx::query("BEGIN").execute(&mut c).await?;
    for (i, name) in names.iter().enumerate() {
        // The last tick: failing for every 25th job, suspect for every 40th.
        let last = match (i % 25, i % 40) {
            (3, _) => "failed",
            (_, 7) => "suspect",
            _ => "success",
        };
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
             INSERT INTO runs (job, kind, backup_id, started_at, finished_at, outcome, error, dump_bytes, stored_bytes)
             SELECT $1, 'backup',
                    strftime('%Y-%m-%dT%H-%M-%SZ', $3, printf('%+d minutes', -($2 - i + 1) * $4)),
                    strftime('%Y-%m-%dT%H:%M:%fZ', $3, printf('%+d minutes', -($2 - i + 1) * $4)),
                    strftime('%Y-%m-%dT%H:%M:%fZ', $3, printf('%+d minutes', 10 - ($2 - i + 1) * $4)),
                    o, CASE o WHEN 'failed' THEN $5 END,
                    CASE WHEN o IN ('success', 'suspect') THEN 3000000000 + i * 7000 END,
                    CASE WHEN o IN ('success', 'suspect') THEN 500000000 + i * 1100 END
             FROM (SELECT i, CASE WHEN i = $2 THEN $6 WHEN i % 97 = 5 THEN 'failed' WHEN i % 13 = 0 THEN 'skipped' ELSE 'success' END AS o FROM n)",
        )
        .bind(name)
        .bind(ticks)
        .bind(&at)
        .bind(minutes)
        .bind(error)
        .bind(last)
        .execute(&mut c)
        .await?;
        // A prune and a verify a day.
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $2)
             INSERT INTO runs (job, kind, backup_id, started_at, finished_at, outcome, level, store)
             SELECT $1, k.kind, NULL,
                    strftime('%Y-%m-%dT%H:%M:%fZ', $3, '-' || ($2 - i) || ' days', '+5 minutes'),
                    strftime('%Y-%m-%dT%H:%M:%fZ', $3, '-' || ($2 - i) || ' days', '+6 minutes'),
                    'success', k.level, k.store
             FROM n, (SELECT 'prune' AS kind, NULL AS level, NULL AS store
                      UNION ALL SELECT 'verify', 'checksum', 'local') k",
        )
        .bind(name)
        .bind(i64::from(days))
        .bind(&at)
        .execute(&mut c)
        .await?;
    }
    sqlx::query("COMMIT").execute(&mut c).await?;
    for (_, sql) in &indexes {
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut c)
            .await?;
    }
    sqlx::query("ANALYZE").execute(&mut c).await?;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM runs")
        .fetch_one(&mut c)
        .await?;
    c.close().await?;
    Ok(n)
}
