//! Benchmark of the status page at fleet scale (run by bench/status-page.sh):
//! a config of N jobs (default 500) and a SQLite catalog holding 30
//! backups and 30 prunes of each, some jobs failing with long errors and
//! some suspect, a cluster job every 50th. Prints the time to read the
//! status (catalog queries and store listings, as a request does) and to
//! render the page from it, and the page's size.
//!
//!   cargo run -p backstop-daemon --example status_page [--release] -- [JOBS] [ROUNDS]

use std::time::{Duration, Instant};

use backstop_catalog::{Catalog, Location, Outcome, RunKind, RunResult};
use backstop_daemon::{page, status};

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
    let jobs: usize = args.next().map_or(Ok(500), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(20), |a| a.parse())?;
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
    let error = "pg_dump failed (exit status 1): pg_dump: error: query failed: ERROR:  canceling statement due to conflict with recovery\nDETAIL:  User query might have needed to see row versions that must be removed.\npg_dump: detail: Query was: COPY sales.\"Orders\" (id, placed, doc) TO stdout;";
    for (i, name) in names.iter().enumerate() {
        for b in 0..30u32 {
            let started = now - chrono::Duration::hours(i64::from(30 - b));
            let id = format!("{}-{b:02}", started.format("%Y-%m-%dT%H-%M-%SZ"));
            let run = catalog
                .start_run(name, RunKind::Backup, Some(&id), started)
                .await?;
            let last = b == 29;
            let (outcome, err) = match (last, i % 25, i % 40) {
                (true, 3, _) => (Outcome::Failed, Some(error)),
                (true, _, 7) => (Outcome::Suspect, None),
                _ => (Outcome::Success, None),
            };
            let dump = 3_000_000_000u64 + u64::from(b) * 7_000_000 + (i as u64 % 13) * 1_000_000;
            let result = RunResult {
                error: err,
                dump_bytes: (outcome != Outcome::Failed).then_some(dump),
                stored_bytes: (outcome != Outcome::Failed).then_some(dump / 6),
            };
            let secs = 600 + i64::from(b % 5) * 40;
            catalog
                .finish_run(
                    run,
                    outcome,
                    started + chrono::Duration::seconds(secs),
                    &result,
                )
                .await?;
            let prune = catalog
                .start_run(
                    name,
                    RunKind::Prune,
                    None,
                    started + chrono::Duration::seconds(secs),
                )
                .await?;
            catalog
                .finish_run(
                    prune,
                    Outcome::Success,
                    started + chrono::Duration::seconds(secs + 2),
                    &RunResult::default(),
                )
                .await?;
        }
    }
    println!(
        "{jobs} jobs, {} runs in the catalog (written in {:.1} s)",
        jobs * 60,
        t0.elapsed().as_secs_f64()
    );

    let origin = page::Origin {
        host: "bench",
        version: env!("CARGO_PKG_VERSION"),
        now,
    };
    let mut read = Vec::new();
    let mut rows = Vec::new();
    for _ in 0..rounds.div_ceil(4).max(1) {
        let t = Instant::now();
        rows = status::collect(&config, &catalog, now).await?;
        read.push(t.elapsed());
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
    stats("render / (HTML)", render);
    stats("/api/v1/status (JSON)", json);
    catalog.close().await;
    Ok(())
}
