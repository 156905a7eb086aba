//! The lock guard: a migration's ALTER TABLE queued behind the dump's
//! locks, and the application's SELECTs queued behind the ALTER.

use std::time::{Duration, Instant};

use crate::harness::daemon::{Daemon, daemon_config, wait_for};
use crate::harness::{Env, walk};

/// A pg_dump whose output drains only after `secs`: it blocks on a full
/// pipe with its ACCESS SHARE locks held, as a dump of a large table does.
fn slow_reader_pg_dump(env: &Env, secs: u32) -> String {
    crate::harness::pg_dump_wrapper(
        env,
        "held_pg_dump",
        &format!("set -o pipefail\n\"$REAL\" \"$@\" | {{ sleep {secs}; cat; }}"),
    )
}

async fn count(env: &Env, sql: &str) -> i64 {
    let mut c = env.pg.connect("marketplace").await;
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    n
}

/// Waits until pg_dump holds its lock on `orders`, queues an ALTER TABLE
/// behind it, then times a SELECT queued behind the ALTER.
async fn select_blocked_for(env: &Env, d: &Daemon, column: &str) -> Duration {
    wait_for(
        "pg_dump to hold its lock on orders",
        Duration::from_secs(60),
        || async {
            count(
                env,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                  WHERE a.application_name LIKE 'backstop-pg_dump-%' AND l.granted
                    AND l.relation = 'public.orders'::regclass",
            )
            .await
                > 0
        },
        &d.log,
    )
    .await;
    let mut migration = env.pg.connect("marketplace").await;
    let alter = format!("ALTER TABLE orders ADD COLUMN {column} int");
    let alter = tokio::spawn(async move {
        sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
            .execute(&mut migration)
            .await
            .unwrap();
    });
    wait_for(
        "the ALTER TABLE to queue",
        Duration::from_secs(30),
        || async {
            count(
                env,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE orders%'",
            )
            .await
                > 0
        },
        &d.log,
    )
    .await;
    let mut app = env.pg.connect("marketplace").await;
    let start = Instant::now();
    let (_,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
        .fetch_one(&mut app)
        .await
        .unwrap();
    let blocked = start.elapsed();
    alter.await.unwrap();
    blocked
}

/// A daemon whose job `app` dumps through `held` under lock_guard `mode`
/// (max_block 2s), with a backup asked of it: the daemon and the run's id.
async fn guarded_run(env: &Env, held: &str, mode: &str, extra: &str) -> (Daemon, u64) {
    let cfg = daemon_config(
        env,
        "",
        &env.job(
            "app",
            "marketplace",
            &format!("{held}\nlock_guard = {{ mode = \"{mode}\", max_block = \"2s\" }}\n{extra}"),
        ),
    );
    let mut d = Daemon::start(&cfg, env.path(&format!("{mode}.log")));
    d.ready().await;
    let id = d.start_run("app").await;
    (d, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn yield_lets_the_application_through_and_retries_while_warn_only_reports() {
    let env = Env::new().await;
    let held = slow_reader_pg_dump(&env, 12);

    // yield: the SELECTs wait about max_block, the run fails its attempt
    // as retryable and the retry succeeds.
    let (mut d, id) =
        guarded_run(&env, &held, "yield", "retries = 1\nretry_backoff = \"1s\"").await;
    let with_yield = select_blocked_for(&env, &d, "yield_probe").await;
    let run = d.wait_run("app", id).await;
    let log = d.log();
    assert_eq!(run["state"], "success", "{run}\n{log}");
    assert_eq!(run["attempts"], 2, "{run}");
    assert!(
        log.contains("the dump yields (lock_guard = \"yield\")")
            && log.contains("yielded to a blocked session: session pid")
            && log.contains("AccessExclusiveLock on orders"),
        "{log}"
    );
    assert!(
        with_yield < Duration::from_secs(2 + 4),
        "the SELECT waited {with_yield:?} with yield (max_block 2s)"
    );
    assert_eq!(
        d.metric("backstop_lock_blocks_total{job=\"app\"}").await,
        Some(1.0)
    );
    d.stop().await;
    // The yielded attempt left no session and published nothing of its own.
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backstop-pg_dump-%'"
        )
        .await,
        0
    );
    let manifests = walk(&env.store())
        .iter()
        .filter(|p| p.ends_with("manifest.json"))
        .count();
    assert_eq!(manifests, 1, "only the retry's backup");

    // warn: the event is logged and counted; the application waits for
    // the whole dump.
    let (mut d, id) = guarded_run(&env, &held, "warn", "retries = 0").await;
    let with_warn = select_blocked_for(&env, &d, "warn_probe").await;
    let run = d.wait_run("app", id).await;
    let log = d.log();
    assert_eq!(run["state"], "success", "{run}\n{log}");
    assert!(
        log.contains("A session is blocked behind the dump's locks (lock_guard = \"warn\")"),
        "{log}"
    );
    assert_eq!(
        d.metric("backstop_lock_blocks_total{job=\"app\"}").await,
        Some(1.0)
    );
    assert!(
        with_warn > with_yield + Duration::from_secs(3),
        "warn {with_warn:?} vs yield {with_yield:?}"
    );
    d.stop().await;
    println!(
        "SELECT blocked behind the queued ALTER: yield {with_yield:?}, warn (no guard action) {with_warn:?}"
    );
}

/// pg_dump never waits forever behind an exclusive lock: with
/// lock_wait_timeout it gives up and the run fails naming the lock.
#[tokio::test(flavor = "multi_thread")]
async fn lock_wait_timeout_stops_a_dump_queued_behind_an_exclusive_lock() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", "lock_wait_timeout = \"1s\""));
    let mut holder = env.pg.connect("marketplace").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE;")
        .execute(&mut holder)
        .await
        .unwrap();
    let start = Instant::now();
    let r = env.backstop(&["backup", "--job", "app"]).await;
    let took = start.elapsed();
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    assert_eq!(r.code, Some(1), "{r:?}");
    // The inventory (in the dump's snapshot) or pg_dump itself gives up.
    assert!(
        r.stderr.contains("lock timeout") || r.stderr.contains("could not obtain lock"),
        "{}",
        r.stderr
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
}

/// Issue 31, item 4: a job URL that sets `application_name` (libpq lets it
/// win over the name backstop gives pg_dump's session) left the guard
/// blind: it never saw the ALTER TABLE blocked behind the dump, and
/// `yield` never yielded. Failed before the fix: the ALTER waited for the
/// whole dump and the run succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn yield_works_when_the_url_names_its_own_application() {
    let env = Env::new().await;
    let held = slow_reader_pg_dump(&env, 12);
    let job = env
        .job(
            "app",
            "marketplace",
            &format!(
                "{held}\nlock_guard = {{ mode = \"yield\", max_block = \"1s\" }}\nretries = 0"
            ),
        )
        .replace(
            &env.pg.url("marketplace"),
            &format!("{}?application_name=reporting", env.pg.url("marketplace")),
        );
    env.write_config(&job);
    let _ = yields_to_a_migration(&env, "orders").await;
}

/// Runs `backstop backup --job app` (lock_guard yield) beside a migration
/// that, once the backup holds its lock on `table` (an SQL name in the
/// database marketplace), runs `ALTER TABLE … ADD COLUMN`; asserts the
/// backup yielded to it and the ALTER went through before the backup
/// ended. Returns how long the ALTER waited.
pub(crate) async fn yields_to_a_migration(env: &Env, table: &str) -> Duration {
    let log = env.path("no-daemon.log");
    let backup = async {
        let r = env.backstop(&["backup", "--job", "app"]).await;
        (r, Instant::now())
    };
    let held = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE a.backend_type = 'client backend' AND l.granted
            AND l.relation = '{}'::regclass AND a.pid <> pg_backend_pid()",
        table.replace('\'', "''")
    );
    let migration = async {
        wait_for(
            &format!("the backup to hold its lock on {table}"),
            Duration::from_secs(60),
            || async { count(env, &held).await > 0 },
            &log,
        )
        .await;
        let mut c = env.pg.connect("marketplace").await;
        let started = Instant::now();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} ADD COLUMN migrated int"
        )))
        .execute(&mut c)
        .await
        .unwrap();
        (started, Instant::now())
    };
    let ((r, backup_ended), (alter_started, altered)) = tokio::join!(backup, migration);
    r.assert_failed();
    assert!(
        r.stderr.contains("yielded to a blocked session"),
        "{}",
        r.stderr
    );
    assert!(
        altered < backup_ended,
        "the ALTER went through only after the backup ended"
    );
    altered - alter_started
}

/// `max_snapshot_age` bounds how long a dump holds its snapshot (and the
/// primary's xmin): a warning at 80 %, then the attempt is given up, not
/// retried (another would hold it as long), with nothing left in the store.
#[tokio::test(flavor = "multi_thread")]
async fn max_snapshot_age_warns_then_gives_up_the_dump() {
    let env = Env::new().await;
    let slow = slow_reader_pg_dump(&env, 10);
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!("{slow}\nmax_snapshot_age = \"3s\"\nretries = 2"),
    ));
    let start = Instant::now();
    let out = env.backstop(&["backup", "--job", "app"]).await;
    let took = start.elapsed();
    out.assert_failed();
    assert!(
        out.all().contains("80 % of max_snapshot_age"),
        "{}",
        out.all()
    );
    assert!(
        out.all().contains("reached max_snapshot_age (3s)"),
        "{}",
        out.all()
    );
    assert!(
        took < Duration::from_secs(9),
        "the dump ran {took:?}, past its 3 s bound"
    );
    env.assert_store_empty();
}

/// A pg_dump whose first act is one query on its own session (the same
/// application_name) that writes nothing: `work` is the body of that
/// query's DO block, with no single quote (the shell quotes it).
fn pg_dump_first_querying(env: &Env, name: &str, work: &str) -> String {
    let psql = crate::harness::pg::pg_bin().join("psql");
    crate::harness::pg_dump_wrapper(
        env,
        name,
        &format!(
            "for a in \"$@\"; do case \"$a\" in --dbname=*) url=\"${{a#--dbname=}}\";; esac; done\n\
             '{}' -X -q -v ON_ERROR_STOP=1 -d \"$url\" -c 'DO $$ BEGIN {work} END $$' >/dev/null || exit 1\n\
             exec \"$REAL\" \"$@\"",
            psql.display()
        ),
    )
}

/// One query of a dump's that the server works on for longer than
/// stall_timeout (as one catalog query of a huge schema does) is progress,
/// though the session's state and query_start do not change and pg_dump
/// uses no CPU while it waits; before, a 331 ms catalog query on a loaded
/// machine failed a 300 ms stall_timeout. A session that waits for a lock
/// (or for a client that stopped reading, or a timer) is still a stall,
/// and one query counts for five stall_timeouts at most: a backend that
/// stopped on the server looks like one at work for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_the_server_works_on_is_progress_for_a_while_a_lock_wait_is_not() {
    let env = Env::new().await;
    let busy = |secs: u32| {
        pg_dump_first_querying(
            &env,
            &format!("busy_{secs}_pg_dump"),
            &format!(
                "WHILE clock_timestamp() < now() + make_interval(secs => {secs}) LOOP END LOOP;"
            ),
        )
    };
    let job = |w: &str| {
        env.job(
            "app",
            "marketplace",
            &format!("stall_timeout = \"1s\"\nretries = 0\n{w}"),
        )
    };
    let stalled = "stalled: pg_dump wrote no output for 1s";

    // 3 s of work on one query: progress.
    env.write_config(&job(&busy(3)));
    let started = Instant::now();
    let out = env.backstop(&["backup", "--job", "app"]).await;
    out.assert_ok();
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the query did not run"
    );

    // Waiting for a lock the test holds: a stall.
    let mut holder = env.pg.connect("marketplace").await;
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await
        .unwrap();
    env.write_config(&job(&pg_dump_first_querying(
        &env,
        "waiting_pg_dump",
        "PERFORM pg_advisory_lock(4242);",
    )));
    let out = env.backstop(&["backup", "--job", "app"]).await;
    out.assert_failed();
    assert!(out.all().contains(stalled), "{}", out.all());

    // 10 s on one query, unchanged: after five stall_timeouts, a stall.
    env.write_config(&job(&busy(10)));
    let out = env.backstop(&["backup", "--job", "app"]).await;
    out.assert_failed();
    assert!(out.all().contains(stalled), "{}", out.all());
}

/// pg_dump writes nothing while it reads the catalog: on 4,000 tables that
/// outlasts a short stall_timeout here (measured below), as hundreds of
/// thousands of relations outlast the default 600 s. Its queries on the
/// server and its own CPU time are progress, so the dump completes; before,
/// the watchdog killed it as stalled.
#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_phase_longer_than_stall_timeout_is_progress_not_a_stall() {
    let env = Env::empty().await;
    env.pg.create_db("wide").await;
    for b in 0..8 {
        env.pg
            .execute(
                "wide",
                &format!(
                    "DO $$ BEGIN FOR i IN {}..{} LOOP EXECUTE format('CREATE TABLE t%s (id int PRIMARY KEY, v text CHECK (length(v) < 100), c int DEFAULT 3)', i); END LOOP; END $$",
                    b * 500 + 1,
                    b * 500 + 500
                ),
            )
            .await;
    }
    // How long stock pg_dump stays silent on this schema.
    let start = Instant::now();
    let mut child = std::process::Command::new(crate::harness::pg::pg_bin().join("pg_dump"))
        .args(["-Fc", &env.pg.url("wide")])
        .env("PGPASSWORD", &env.pg.password)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    let silent = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let limit = Duration::from_millis(300);
    println!("pg_dump was silent for {silent:?} (stall_timeout {limit:?})");
    assert!(
        silent > limit * 2,
        "the catalog phase ({silent:?}) does not outlast stall_timeout here"
    );
    env.write_config(&env.job(
        "app",
        "wide",
        &format!("stall_timeout = \"{}ms\"\nretries = 0", limit.as_millis()),
    ));
    let out = env.backstop(&["backup", "--job", "app"]).await;
    out.assert_ok();
    assert!(out.all().contains("4000 tables"), "{}", out.all());
}
