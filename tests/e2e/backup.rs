//! `backstop backup` against a real PostgreSQL, restored with stock tools.
//!
//! Length: one test per backup promise, sharing fixtures.

use std::collections::BTreeMap;
use std::time::Duration;

use backstop_config::Filters;
use backstop_dump::{Inventory, PgTarget, Snapshot};

use crate::harness::{Env, PgCluster, manifest, sh, walk, write_private};

/// The inventory of `db`, read by the same code backstop uses.
async fn inventory(pg: &PgCluster, db: &str) -> Inventory {
    let target = PgTarget::new(&pg.url(db), Some(&pg.password)).unwrap();
    let mut snap = Snapshot::open(&target).await.unwrap();
    let inv = snap.inventory(&Filters::default()).await.unwrap();
    snap.close().await;
    inv
}

fn counts_of(inv: &Inventory) -> [u64; 6] {
    [
        inv.tables,
        inv.indexes,
        inv.functions,
        inv.triggers,
        inv.policies,
        inv.extensions,
    ]
}

fn manifest_rows(m: &serde_json::Value) -> BTreeMap<String, i64> {
    m["inventory"]["per_table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                format!(
                    "{}.{}",
                    t["schema"].as_str().unwrap(),
                    t["name"].as_str().unwrap()
                ),
                // -1: unknown (an estimate of a never-analyzed table).
                t["rows"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

fn restore_stock(env: &Env, artifact: &std::path::Path, db: &str) {
    let r = sh(&format!(
        "age -d -i '{id}' '{art}' | zstd -d -q | PGPASSWORD='{pw}' pg_restore --exit-on-error --no-owner -h 127.0.0.1 -p {port} -U postgres -d {db}",
        id = env.identity.display(),
        art = artifact.display(),
        pw = env.pg.password,
        port = env.pg.port,
    ));
    r.assert_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_through_stock_age_zstd_and_pg_restore() {
    let env = Env::new().await;
    env.write_config(&env.job("marketplace", "marketplace", "globals = true"));
    let run = env.backstop(&["backup", "--job", "marketplace"]).await;
    run.assert_ok();
    assert!(run.stdout.contains("complete"), "{}", run.stdout);

    let dir = env.only_backup("marketplace");
    let m = manifest(&dir);
    assert_eq!(m["format_version"], 1);
    assert_eq!(m["row_counts"], "exact");
    assert_eq!(m["dump"]["format"], "custom");
    assert!(m["dump"]["snapshot"].as_str().unwrap().len() > 5);
    let artifacts = m["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 2);
    // Files are private to the backup user.
    for f in walk(&dir) {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }

    // The stored bytes are what the manifest says.
    for a in artifacts {
        let path = dir.join(a["file"].as_str().unwrap());
        let sum = sh(&format!("sha256sum '{}' | cut -d' ' -f1", path.display()));
        assert_eq!(sum.stdout.trim(), a["stored_sha256"].as_str().unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            a["stored_bytes"].as_u64().unwrap()
        );
        let plain = sh(&format!(
            "age -d -i '{}' '{}' | zstd -d -q | sha256sum | cut -d' ' -f1",
            env.identity.display(),
            path.display()
        ));
        assert_eq!(plain.stdout.trim(), a["plain_sha256"].as_str().unwrap());
    }

    // Restore with stock tools only, into a fresh database.
    env.pg.create_db("restored").await;
    restore_stock(&env, &dir.join("database.dump.zst.age"), "restored");

    let source = env.pg.row_counts("marketplace").await;
    let restored = env.pg.row_counts("restored").await;
    assert_eq!(source.len(), 8);
    assert_eq!(
        source.values().sum::<i64>(),
        5800,
        "fixture row count changed: {source:?}"
    );
    assert_eq!(restored, source);
    assert_eq!(manifest_rows(&m), source);

    let src_inv = inventory(&env.pg, "marketplace").await;
    let restored_inv = inventory(&env.pg, "restored").await;
    let m_inv: Inventory = serde_json::from_value(m["inventory"].clone()).unwrap();
    assert_eq!(counts_of(&src_inv), [8, 31, 4, 6, 4, 3]);
    assert_eq!(counts_of(&restored_inv), counts_of(&src_inv));
    assert_eq!(counts_of(&m_inv), counts_of(&src_inv));

    // The globals artifact holds the roles.
    let globals = sh(&format!(
        "age -d -i '{}' '{}' | zstd -d -q",
        env.identity.display(),
        dir.join("globals.sql.zst.age").display()
    ));
    globals.assert_ok();
    assert!(
        globals.stdout.contains("CREATE ROLE marketplace_app"),
        "{}",
        globals.stdout
    );

    // list shows it; --json is the manifests.
    let list = env.backstop(&["list", "--job", "marketplace"]).await;
    list.assert_ok();
    let id = m["backup_id"].as_str().unwrap();
    assert!(
        list.stdout.contains(id) && list.stdout.contains("5800"),
        "{}",
        list.stdout
    );
    let json = env
        .backstop(&["list", "--job", "marketplace", "--json"])
        .await;
    let mut listed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    // The manifest, plus the latest verification from the catalog (none
    // yet) and whether it is trusted (no keys configured: by its folder).
    assert_eq!(listed[0]["last_verification"], serde_json::Value::Null);
    assert_eq!(listed[0]["trusted"], serde_json::Value::Bool(true));
    assert_eq!(listed[0]["signed_by"], serde_json::Value::Null);
    for added in ["last_verification", "trusted", "signed_by"] {
        listed[0].as_object_mut().unwrap().remove(added);
    }
    assert_eq!(listed[0], m);
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_only_job_restores_every_object_with_no_rows() {
    let env = Env::new().await;
    env.write_config(&env.job("schema", "marketplace", "scope = \"schema\""));
    env.backstop(&["backup", "--job", "schema"])
        .await
        .assert_ok();
    let dir = env.only_backup("schema");
    let m = manifest(&dir);
    assert!(manifest_rows(&m).values().all(|&n| n == 0), "{m}");

    env.pg.create_db("restored").await;
    restore_stock(&env, &dir.join("database.dump.zst.age"), "restored");
    let restored = env.pg.row_counts("restored").await;
    assert_eq!(restored.len(), 8);
    assert!(restored.values().all(|&n| n == 0), "{restored:?}");
    let inv = inventory(&env.pg, "restored").await;
    assert_eq!(
        counts_of(&inv),
        counts_of(&inventory(&env.pg, "marketplace").await)
    );
    // RLS and policies survived.
    let mut c = env.pg.connect("restored").await;
    let (rls,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_class WHERE relrowsecurity")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(rls, 2);
}

/// `zstd:auto`: a stock-readable `.zst` artifact whose manifest says
/// which levels compressed how many of its bytes. pg_dump's output is held
/// to about 10 MB/s over 60 MB of JSON and text, so each one-second window
/// reads enough to count and the stream waits for pg_dump: spare CPU, and
/// the level moves up from 3 (before, the data was under one window's 4 MiB
/// and the level never changed). Decoded with stock `zstd -d`.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_auto_records_its_levels_and_restores_with_stock_tools() {
    let env = Env::new().await;
    env.pg
        .execute(
            "marketplace",
            "CREATE TABLE events AS SELECT g AS id, jsonb_build_object('user', md5(g::text), 'action', (ARRAY['view','click','buy','refund'])[g % 4 + 1], 'at', now() - g * interval '1 second', 'note', repeat('lorem ipsum dolor sit amet ', 2 + g % 7)) AS body FROM generate_series(1, 350000) g",
        )
        .await;
    let held = crate::harness::pg_dump_wrapper(
        &env,
        "held_to_10mb",
        "set -o pipefail\n\"$REAL\" \"$@\" | python3 -c 'import sys, time\nr, w = sys.stdin.buffer, sys.stdout.buffer\nwhile True:\n    b = r.read(1 << 20)\n    if not b: break\n    w.write(b); w.flush(); time.sleep(0.1)'",
    );
    env.write_config(&env.job(
        "auto",
        "marketplace",
        &format!("compression = \"zstd:auto\"\n{held}"),
    ));
    env.backstop(&["backup", "--job", "auto"]).await.assert_ok();
    let dir = env.only_backup("auto");
    let m = manifest(&dir);
    let db = &m["artifacts"][0];
    assert_eq!(db["compression"], "zstd:auto");
    assert!(
        db["plain_bytes"].as_u64().unwrap() > 40_000_000,
        "too little data to measure: {db}"
    );
    let levels = db["compression_levels"]
        .as_object()
        .expect("levels recorded");
    println!("zstd:auto levels: {levels:?}");
    assert!(
        levels.len() >= 2 && levels.keys().any(|l| l != "3"),
        "the level never moved from 3: {levels:?}"
    );
    assert!(
        levels
            .keys()
            .all(|l| (1..=6).contains(&l.parse::<i32>().unwrap())),
        "{levels:?}"
    );
    assert_eq!(
        levels.values().map(|v| v.as_u64().unwrap()).sum::<u64>(),
        db["plain_bytes"].as_u64().unwrap()
    );
    env.pg.create_db("restored").await;
    restore_stock(&env, &dir.join("database.dump.zst.age"), "restored");
    assert_eq!(
        env.pg.row_counts("restored").await,
        env.pg.row_counts("marketplace").await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_format_counts_rows_and_restores_with_psql() {
    let env = Env::new().await;
    env.write_config(&env.job(
        "plain",
        "marketplace",
        "format = \"plain\"\ncompression = \"zstd:1\"",
    ));
    env.backstop(&["backup", "--job", "plain"])
        .await
        .assert_ok();
    let dir = env.only_backup("plain");
    let m = manifest(&dir);
    assert_eq!(m["row_counts"], "exact");
    let source = env.pg.row_counts("marketplace").await;
    assert_eq!(manifest_rows(&m), source);

    env.pg.create_db("restored").await;
    sh(&format!(
        "age -d -i '{}' '{}' | zstd -d -q | PGPASSWORD='{}' psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p {} -U postgres -d restored >/dev/null",
        env.identity.display(),
        dir.join("database.sql.zst.age").display(),
        env.pg.password,
        env.pg.port
    ))
    .assert_ok();
    assert_eq!(env.pg.row_counts("restored").await, source);
}

#[tokio::test(flavor = "multi_thread")]
async fn estimate_and_off_row_counts() {
    let env = Env::new().await;
    // Statistics set up on purpose, not left to autovacuum's timing: the
    // fixture ANALYZEd now (exact reltuples for tables this small), an
    // analyzed partitioned table, and a table no one has analyzed.
    env.pg
        .execute(
            "marketplace",
            "CREATE TABLE measurements (id int, at date) PARTITION BY RANGE (at);
             CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
             CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
             INSERT INTO measurements SELECT g, date '2025-01-01' + (g % 365) FROM generate_series(1, 3000) g;
             CREATE TABLE never_analyzed (id int) WITH (autovacuum_enabled = false);
             INSERT INTO never_analyzed SELECT generate_series(1, 500);
             ANALYZE users, orders, order_items, vegetables, comments, discussions, guest_orders, otp_verifications, measurements, measurements_2025, measurements_2026;",
        )
        .await;
    env.write_config(&format!(
        "{}{}",
        env.job("est", "marketplace", "row_counts = \"estimate\""),
        env.job("off", "marketplace", "row_counts = \"off\"")
    ));
    env.backstop(&["backup", "--job", "est"]).await.assert_ok();
    env.backstop(&["backup", "--job", "off"]).await.assert_ok();
    let est = manifest(&env.only_backup("est"));
    assert_eq!(est["row_counts"], "estimate");
    // Analyzed tables: reltuples, exact at this size. The partitioned
    // parent counts 0 (its rows are its partitions', listed on their own;
    // it used to carry all 3,000 again). The never-analyzed table is
    // unknown, not empty (it used to read 0).
    let per_table = est["inventory"]["per_table"].as_array().unwrap();
    let rows_of = |name: &str| {
        per_table
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the inventory"))["rows"]
            .clone()
    };
    assert!(rows_of("never_analyzed").is_null(), "{}", est["inventory"]);
    assert_eq!(rows_of("measurements"), 0);
    let mut live = env.pg.row_counts("marketplace").await;
    live.remove("public.never_analyzed");
    let mut recorded = manifest_rows(&est);
    recorded.remove("public.never_analyzed");
    assert_eq!(recorded, live);
    assert_eq!(live["public.measurements_2025"], 3000);
    let off = manifest(&env.only_backup("off"));
    assert_eq!(off["row_counts"], "off");
    assert!(
        off["inventory"]["per_table"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["rows"].is_null())
    );
    let list = env.backstop(&["list", "--job", "off"]).await;
    assert!(
        list.stdout
            .lines()
            .nth(1)
            .unwrap()
            .trim_end()
            .ends_with('-'),
        "{}",
        list.stdout
    );
}

/// Failure cases: each exits non-zero, names the step, leaves no manifest
/// and no partial file, and is recorded in the catalog.
pub(crate) async fn assert_failed_cleanly(
    env: &Env,
    job: &str,
    run: &crate::harness::Run,
    step: &str,
    cause: &str,
) {
    run.assert_failed();
    assert!(
        run.stderr.contains(step),
        "step {step:?} not named:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(cause),
        "cause {cause:?} not given:\n{}",
        run.stderr
    );
    let left = env.store_entries();
    assert!(
        left.is_empty(),
        "failed backup left files or folders: {left:?}"
    );
    let runs = catalog_runs(env, job).await;
    assert_eq!(
        runs.last().map(|r| r.0.as_str()),
        Some("failed"),
        "{runs:?}"
    );
    assert!(
        runs.last()
            .unwrap()
            .1
            .as_deref()
            .unwrap_or("")
            .contains(cause),
        "{runs:?}"
    );
}

async fn catalog_runs(env: &Env, job: &str) -> Vec<(String, Option<String>)> {
    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let runs = sqlx::query_as("SELECT outcome, error FROM runs WHERE job = ? ORDER BY id")
        .bind(job)
        .fetch_all(&mut c)
        .await
        .unwrap();
    // Closed here, not when dropped: a dropped connection closes on
    // sqlx's worker later and removes catalog.db-wal and -shm while a
    // caller scans the catalog's files (seen: a scan read a file gone).
    c.close().await.unwrap();
    runs
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_fails_without_leaking_it() {
    let env = Env::new().await;
    let secret = "Wr0ng-s3cret-ABCDEF";
    write_private(&env.password_file, secret);
    env.write_config(&env.job("app", "marketplace", ""));
    let run = env.backstop(&["backup", "--job", "app"]).await;
    assert_failed_cleanly(
        &env,
        "app",
        &run,
        "connect failed",
        "password authentication failed",
    )
    .await;
    assert!(
        !run.all().contains(secret),
        "password leaked:\n{}",
        run.all()
    );
    // Regression (issue 12, item 7): the catalog runs in WAL mode, so the
    // run's row could sit in catalog.db-wal while a scan of catalog.db alone
    // read nothing new. The run's own error must be in the database file
    // (backstop checkpoints and closes it on exit), and every file the
    // catalog owns is scanned.
    let main = std::fs::read(env.path("catalog.db")).unwrap();
    assert!(
        String::from_utf8_lossy(&main).contains("password authentication failed"),
        "the failed run's row is not in catalog.db: the scan would read nothing"
    );
    let files = env.catalog_files();
    assert!(!files.is_empty());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(secret),
            "password in {}",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_down_fails() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", ""));
    env.pg.stop();
    let run = env.backstop(&["backup", "--job", "app"]).await;
    assert_failed_cleanly(&env, "app", &run, "connect failed", "127.0.0.1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_database_fails() {
    let env = Env::empty().await;
    env.write_config(&env.job("app", "nosuchdb", ""));
    let run = env.backstop(&["backup", "--job", "app"]).await;
    assert_failed_cleanly(&env, "app", &run, "connect failed", "nosuchdb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unwritable_store_fails() {
    let env = Env::new().await;
    // A store path under a regular file cannot be created, even by root.
    std::fs::write(env.path("blocker"), b"not a directory").unwrap();
    let jobs = env.job("app", "marketplace", "");
    let config = format!("{}{jobs}", env.header()).replace(
        &format!("path = \"{}\"", env.store().display()),
        &format!("path = \"{}/store\"", env.path("blocker").display()),
    );
    std::fs::write(env.path("backstop.toml"), config).unwrap();
    let run = env.backstop(&["backup", "--job", "app"]).await;
    // Caught by the pre-flight check, before the database is touched.
    assert_failed_cleanly(
        &env,
        "app",
        &run,
        "check store \"local\" failed",
        "Not a directory",
    )
    .await;
}

/// pg_dump's argv never holds the password: a wrapper records it.
#[tokio::test(flavor = "multi_thread")]
async fn password_reaches_pg_dump_only_through_its_environment() {
    let env = Env::new().await;
    let real = crate::harness::pg::pg_bin().join("pg_dump");
    let wrapper = env.path("pg_dump");
    let argv_log = env.path("argv.log");
    crate::harness::argv_recorder(&wrapper, &real, &argv_log);
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!("pg_dump_path = \"{}\"", wrapper.display()),
    ));
    let run = env.backstop(&["backup", "--job", "app"]).await;
    run.assert_ok();
    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(argv.contains("--snapshot="), "{argv}");
    assert!(argv.contains("--compress=0"), "{argv}");
    assert!(argv.contains("PGPASSWORD-set"), "{argv}");
    assert!(!argv.contains(&env.pg.password), "password in argv: {argv}");
    assert!(!run.all().contains(&env.pg.password));
    let m = std::fs::read_to_string(env.only_backup("app").join("manifest.json")).unwrap();
    assert!(!m.contains(&env.pg.password));
}

#[tokio::test(flavor = "multi_thread")]
async fn old_pg_dump_is_refused_before_dumping() {
    let env = Env::new().await;
    let fake = env.path("old_pg_dump");
    std::fs::write(&fake, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!("pg_dump_path = \"{}\"", fake.display()),
    ));
    let run = env.backstop(&["backup", "--job", "app"]).await;
    assert_failed_cleanly(
        &env,
        "app",
        &run,
        "version check failed",
        "is older than the server",
    )
    .await;
    assert!(run.stderr.contains("pg_bin_dir"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_stops_pg_dump_and_removes_partial_files() {
    let env = Env::empty().await;
    env.pg.create_db("big").await;
    env.pg
        .execute("big", "CREATE TABLE payload AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 400000) g")
        .await;
    env.write_config(&env.job("big", "big", "compression = \"zstd:19\"\ntimeout = \"1s\""));
    let run = env.backstop(&["backup", "--job", "big"]).await;
    assert_failed_cleanly(&env, "big", &run, "timed out after 1s", "timed out").await;
    // pg_dump was killed: its backend goes away.
    let mut c = env.pg.connect("postgres").await;
    let mut left = 1;
    for _ in 0..100 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backstop%'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        left = n;
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, 0, "pg_dump still connected after the timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn unencrypted_backup_needs_explicit_opt_out_and_is_flagged() {
    let env = Env::new().await;
    env.write_config(&env.job("plainly", "marketplace", "encryption = \"none\""));
    let run = env.backstop(&["backup", "--job", "plainly"]).await;
    run.assert_ok();
    assert!(run.stderr.contains("NOT encrypted"), "{}", run.stderr);
    let dir = env.only_backup("plainly");
    let m = manifest(&dir);
    assert_eq!(m["artifacts"][0]["encryption"]["type"], "none");
    env.pg.create_db("restored").await;
    sh(&format!(
        "zstd -d -q < '{}' | PGPASSWORD='{}' pg_restore --exit-on-error -h 127.0.0.1 -p {} -U postgres -d restored",
        dir.join("database.dump.zst").display(),
        env.pg.password,
        env.pg.port
    ))
    .assert_ok();
    assert_eq!(
        env.pg.row_counts("restored").await,
        env.pg.row_counts("marketplace").await
    );
}

/// Schema and table filters reach pg_dump, and the inventory describes the
/// same selection.
#[tokio::test(flavor = "multi_thread")]
async fn filters_select_what_is_dumped_and_inventoried() {
    let env = Env::new().await;
    env.pg
        .execute(
            "marketplace",
            "CREATE SCHEMA audit; CREATE TABLE audit.events AS SELECT g AS id FROM generate_series(1, 50) g;
             CREATE INDEX ON audit.events (id);",
        )
        .await;
    env.write_config(&env.job(
        "filtered",
        "marketplace",
        "exclude_schemas = [\"audit\"]\nexclude_tables = [\"public.otp_verifications\"]",
    ));
    env.backstop(&["backup", "--job", "filtered"])
        .await
        .assert_ok();
    let dir = env.only_backup("filtered");
    let m = manifest(&dir);
    let rows = manifest_rows(&m);
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert!(!rows.contains_key("audit.events") && !rows.contains_key("public.otp_verifications"));
    assert_eq!(m["dump"]["exclude_schemas"][0], "audit");

    env.pg.create_db("restored").await;
    restore_stock(&env, &dir.join("database.dump.zst.age"), "restored");
    let restored = env.pg.row_counts("restored").await;
    assert_eq!(restored, rows);
    // The manifest's object counts are the restored database's.
    let m_inv: Inventory = serde_json::from_value(m["inventory"].clone()).unwrap();
    assert_eq!(
        counts_of(&m_inv),
        counts_of(&inventory(&env.pg, "restored").await)
    );
}

/// `no_role_passwords` keeps role password hashes out of the globals artifact.
#[tokio::test(flavor = "multi_thread")]
async fn globals_with_and_without_role_passwords() {
    let env = Env::new().await;
    env.write_config(&format!(
        "{}{}",
        env.job("with", "marketplace", "globals = true"),
        env.job(
            "without",
            "marketplace",
            "globals = true\nno_role_passwords = true"
        )
    ));
    env.backstop(&["backup", "--job", "with"]).await.assert_ok();
    env.backstop(&["backup", "--job", "without"])
        .await
        .assert_ok();
    let globals = |job: &str| {
        let r = sh(&format!(
            "age -d -i '{}' '{}' | zstd -d -q",
            env.identity.display(),
            env.only_backup(job).join("globals.sql.zst.age").display()
        ));
        r.assert_ok();
        r.stdout
    };
    let with = globals("with");
    let without = globals("without");
    assert!(with.contains("PASSWORD 'SCRAM-SHA-256$"), "{with}");
    assert!(without.contains("CREATE ROLE marketplace_app"), "{without}");
    assert!(!without.contains("SCRAM-SHA-256$"), "{without}");
}

/// The size-anomaly guard: a backup far smaller than the recent ones is kept,
/// marked suspect in its manifest and the catalog, and reported (and a
/// notification says so).
#[tokio::test(flavor = "multi_thread")]
async fn a_much_smaller_backup_is_kept_and_marked_suspect() {
    let env = Env::new().await;
    let hooks = crate::harness::receivers::HttpReceiver::start(&[]).await;
    env.write_config(&format!(
        "[notify.oncall]\ntype = \"webhook\"\nurl = \"{}\"\n\n{}",
        hooks.url("/hook"),
        env.job(
            "app",
            "marketplace",
            "schedule = \"0 3 * * *\"\nnotify = [\"oncall\"]"
        )
    ));
    for _ in 0..3 {
        env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    }
    // A one-shot backup sends before it exits: good backups sent nothing.
    assert!(hooks.requests().is_empty());
    // Someone empties most of the database.
    env.pg
        .execute(
            "marketplace",
            "TRUNCATE order_items, orders, guest_orders, comments, discussions, otp_verifications, vegetables CASCADE",
        )
        .await;
    let run = env.backstop(&["backup", "--job", "app"]).await;
    run.assert_ok();
    assert!(
        run.stdout.contains("is SUSPECT") && run.stdout.contains("of the median"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("Backup is SUSPECT"), "{}", run.stderr);

    let list = env.backstop(&["list", "--job", "app", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert!(
        v[0]["suspect"].as_str().unwrap().contains("rows"),
        "{}",
        v[0]
    );
    assert!(
        v[1].get("suspect").is_none(),
        "earlier backups are not suspect"
    );
    let sent = hooks.requests();
    assert_eq!(sent.len(), 1);
    let n = sent[0].json();
    assert_eq!(n["event"], "suspect");
    assert_eq!(n["outcome"], "suspect");
    assert_eq!(n["backup_id"], v[0]["backup_id"]);
    assert_eq!(n["error"], v[0]["suspect"]);
    let table = env.backstop(&["list", "--job", "app"]).await;
    assert!(
        table.stdout.lines().nth(1).unwrap().contains("SUSPECT"),
        "{}",
        table.stdout
    );

    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let (outcome,): (String,) =
        sqlx::query_as("SELECT outcome FROM runs WHERE kind = 'backup' ORDER BY id DESC LIMIT 1")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(outcome, "suspect");

    let status = env.backstop(&["status"]).await;
    assert_eq!(status.code, Some(1), "{status:?}");
    assert!(status.stdout.contains("SUSPECT"), "{}", status.stdout);
}
