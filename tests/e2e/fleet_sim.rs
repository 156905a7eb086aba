//! The fleet simulation proves the protocol against an in-memory catalog
//! (crates/fleet, `sim::catalog`); this test proves that catalog says what
//! the PostgreSQL one says. One scripted scenario (ticks, superseded ticks,
//! claims, retries, fences, releases with a follow-up, deadlines, dead
//! nodes with runs that did and did not begin publishing, runs given up
//! after their interruptions, on-demand claims, skipped ticks) runs against
//! both through `FleetCatalog`; every answer and every row must agree.

use std::time::Duration;

use backstop_catalog::{Catalog, Location};
use backstop_fleet::sim::SimCatalog;
use backstop_fleet::{ClaimableEntry, FleetCatalog, NodeInfo, Release};
use backstop_vocab::{Outcome, RunKind};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Connection;

use crate::harness::Env;

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn info(host: &str) -> NodeInfo {
    NodeInfo {
        hostname: host.into(),
        pid: 1,
        version: "test".into(),
        config_hash: "c0ffee".into(),
        mode: "daemon".into(),
    }
}

fn claim_text(c: &Option<backstop_vocab::Claim>) -> String {
    match c {
        Some(c) => format!(
            "claim(tick {}, attempt {})",
            c.scheduled_for.map_or_else(|| "none".into(), ts),
            c.attempt
        ),
        None => "none".into(),
    }
}

/// The scenario; returns what each step answered, one line each.
async fn scenario(c: &dyn FleetCatalog, now: DateTime<Utc>) -> Vec<String> {
    let mut out = Vec::new();
    let mut say = |step: &str, what: String| out.push(format!("{step}: {what}"));
    let tick = |minutes: i64| now - chrono::Duration::minutes(minutes);
    let long = Duration::from_secs(600);
    let (t1, t2, t3) = (tick(30), tick(20), tick(10));
    let entries = [
        ("j1", RunKind::Backup, None),
        ("j1", RunKind::Prune, None),
        ("j2", RunKind::Backup, Some(Duration::from_secs(7200))),
        ("j3", RunKind::Backup, Some(Duration::from_secs(7200))),
    ]
    .map(|(job, kind, starting_deadline)| ClaimableEntry {
        job: job.into(),
        kind,
        starting_deadline,
    });
    let claimable = async |c: &dyn FleetCatalog| {
        let mut due = c.claimable(&entries, now).await.unwrap();
        due.sort();
        format!("{due:?}")
    };

    let a = c.register_node(&info("a"), long).await.unwrap();
    let b = c.register_node(&info("b"), long).await.unwrap();
    let backup = RunKind::Backup;
    for (step, at) in [("tick t1", t1), ("tick t1 again", t1), ("tick t2", t2)] {
        let r = c.record_tick("j1", backup, at, 2).await.unwrap();
        say(step, r.to_string());
    }
    let ticks = c.recorded_ticks("j1", backup, tick(60), now).await.unwrap();
    say(
        "recorded",
        format!("{:?}", ticks.iter().map(|t| ts(*t)).collect::<Vec<_>>()),
    );
    let last = c.last_tick("j1", backup, t2).await.unwrap();
    say("last tick", format!("{:?}", last.map(ts)));
    say("claimable", claimable(c).await);
    let c1 = c.claim(&a, "j1", backup, now).await.unwrap();
    say("a claims j1", claim_text(&c1));
    let c1 = c1.unwrap();
    say(
        "b claims j1",
        claim_text(&c.claim(&b, "j1", backup, now).await.unwrap()),
    );
    say(
        "tick t3",
        c.record_tick("j1", backup, t3, 2)
            .await
            .unwrap()
            .to_string(),
    );
    say(
        "b claims j1 while a runs it",
        claim_text(&c.claim(&b, "j1", backup, now).await.unwrap()),
    );
    let c1b = c.next_attempt(&c1, "boom").await.unwrap();
    say("retry", claim_text(&c1b));
    let c1b = c1b.unwrap();
    say(
        "fence of the old attempt",
        c.fence(&c1).await.unwrap().to_string(),
    );
    say("fence", c.fence(&c1b).await.unwrap().to_string());
    let done = Release::Done(Outcome::Success, None, Some(RunKind::Prune));
    say(
        "release with a prune",
        c.release(&c1b, done, now).await.unwrap().to_string(),
    );
    say(
        "release again",
        c.release(&c1b, done, now).await.unwrap().to_string(),
    );
    say(
        "last success",
        c.last_success("j1", backup)
            .await
            .unwrap()
            .is_some()
            .to_string(),
    );
    say("claimable after", claimable(c).await);
    say(
        "b claims the prune",
        claim_text(&c.claim(&b, "j1", RunKind::Prune, now).await.unwrap()),
    );
    let c3 = c.claim(&a, "j1", backup, now).await.unwrap();
    say("a claims t3", claim_text(&c3));
    say(
        "a fences t3",
        c.fence(c3.as_ref().unwrap()).await.unwrap().to_string(),
    );
    let held: Vec<String> = c
        .held(&a)
        .await
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{} {} {:?} {}",
                h.job,
                h.kind,
                h.scheduled_for.map(ts),
                h.attempt
            )
        })
        .collect();
    say("a holds", format!("{held:?}"));
    say(
        "tick j2 (old)",
        c.record_tick("j2", backup, tick(200), 1)
            .await
            .unwrap()
            .to_string(),
    );
    say(
        "b claims j2",
        claim_text(&c.claim(&b, "j2", backup, now).await.unwrap()),
    );

    // Both nodes die: a while publishing t3, b with the prune and j2.
    for n in [&a, &b] {
        c.renew_lease(n, Duration::ZERO).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut reaped: Vec<String> = c
        .reap(now)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {} -> {}", r.job, r.kind, r.now))
        .collect();
    reaped.sort();
    say("reaped", format!("{reaped:?}"));
    say(
        "a renews",
        c.renew_lease(&a, long).await.unwrap().to_string(),
    );
    say("nodes", c.fleet().await.unwrap().len().to_string());

    let n = c.register_node(&info("c"), long).await.unwrap();
    say(
        "tick j3 (old)",
        c.record_tick("j3", backup, tick(200), 1)
            .await
            .unwrap()
            .to_string(),
    );
    say("claimable (deadlines)", claimable(c).await);
    for round in 1..=2 {
        let got = c.claim(&n, "j2", backup, now).await.unwrap();
        say(&format!("c claims j2 ({round})"), claim_text(&got));
        let why = Release::Interrupted("cut off on purpose");
        let r = c.release(got.as_ref().unwrap(), why, now).await.unwrap();
        say(&format!("c interrupts j2 ({round})"), r.to_string());
    }
    let first = c.claim_now(&n, "j4", backup, None, now).await.unwrap();
    say(
        "claim now",
        format!("{:?}", first.as_ref().map(|c| c.attempt)),
    );
    let second = c.claim_now(&n, "j4", backup, None, now).await.unwrap();
    say("claim now again", second.is_err().to_string());
    let skip = [tick(5), tick(4)];
    for step in ["skip", "skip again"] {
        let k = c
            .skip_ticks("j5", backup, &skip, "missed on purpose", now)
            .await;
        say(step, k.unwrap().to_string());
    }
    let left: Vec<String> = c
        .deregister_node(&n, now)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {} -> {}", r.job, r.kind, r.now))
        .collect();
    say("c leaves", format!("{left:?}"));
    out
}

/// A row of `runs` as both catalogs can say it.
type Row = (String, String, String, String, i32, i32, bool, String);

#[tokio::test(flavor = "multi_thread")]
async fn the_simulated_catalog_agrees_with_postgres() {
    let env = Env::empty().await;
    env.pg.create_db("catalog").await;
    let url = env.pg.url("catalog");
    let password = std::fs::read_to_string(&env.password_file).unwrap();
    let at = Location::new(&url, Some(password.trim()));
    Catalog::migrate(at).await.unwrap();
    let pg = Catalog::open(at).await.unwrap();
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let on_pg = scenario(&pg, now).await;
    pg.close().await;

    let sim = SimCatalog::new(std::sync::Arc::new(Utc::now));
    let on_sim = scenario(&sim, now).await;
    for (p, s) in on_pg.iter().zip(&on_sim) {
        assert_eq!(
            p, s,
            "PostgreSQL and the simulated catalog answered differently"
        );
    }
    assert_eq!(on_pg.len(), on_sim.len());
    // The scenario did what it is for (not two catalogs agreeing on nothing).
    for expected in [
        "tick t1 again: false",
        "b claims j1 while a runs it: none",
        "fence of the old attempt: false",
        "release again: false",
        "a renews: false",
        "claim now again: true",
        "skip again: 0",
    ] {
        assert!(
            on_pg.iter().any(|l| l == expected),
            "{expected}\n{on_pg:#?}"
        );
    }
    let reaped = on_pg.iter().find(|l| l.starts_with("reaped")).unwrap();
    assert!(
        reaped.contains("j1 backup -> interrupted")
            && reaped.contains("j1 prune -> pending")
            && reaped.contains("j2 backup -> pending"),
        "{reaped}"
    );

    let mut conn = sqlx::PgConnection::connect_with(
        &url.parse::<sqlx::postgres::PgConnectOptions>()
            .unwrap()
            .password(password.trim()),
    )
    .await
    .unwrap();
    let pg_rows: Vec<Row> = sqlx::query_as(
        "SELECT job, kind, COALESCE(scheduled_for, '-'), outcome, attempt, interruptions, publishing, COALESCE(error, '')
         FROM runs ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let sim_rows: Vec<Row> = sim
        .runs()
        .into_iter()
        .map(|r| {
            (
                r.job,
                r.kind.as_str().to_string(),
                r.scheduled_for.map_or_else(|| "-".into(), ts),
                r.outcome,
                r.attempt,
                r.interruptions,
                r.publishing,
                r.error.unwrap_or_default(),
            )
        })
        .collect();
    for (p, s) in pg_rows.iter().zip(&sim_rows) {
        assert_eq!(
            p, s,
            "a run row differs between PostgreSQL and the simulated catalog"
        );
    }
    assert_eq!(pg_rows.len(), sim_rows.len(), "{pg_rows:#?}\n{sim_rows:#?}");
    let outcomes: Vec<&str> = pg_rows.iter().map(|r| r.3.as_str()).collect();
    for o in ["skipped", "success", "interrupted", "pending"] {
        assert!(outcomes.contains(&o), "no {o} run: {pg_rows:#?}");
    }
    assert!(
        pg_rows
            .iter()
            .any(|r| r.3 == "skipped" && r.7.starts_with("superseded")),
        "{pg_rows:#?}"
    );
    assert!(
        pg_rows
            .iter()
            .any(|r| r.3 == "skipped" && r.7.contains("starting deadline")),
        "{pg_rows:#?}"
    );
}
