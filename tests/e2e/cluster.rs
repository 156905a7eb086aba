//! Cluster jobs (every database of a server), the catalog rebuilt from the
//! stores, a whole server restored onto a bare host, and the restore drill.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::daemon::{Daemon, daemon_config, wait_for};
use crate::harness::pg::PgCluster;
use crate::harness::s3::S3Server;
use crate::harness::{Env, manifest, run_backstop, run_backstop_with, walk, write_private};

/// `[[job]]` of a cluster job on `env`'s server as `user` (password in `pw`).
fn cluster_job(env: &Env, name: &str, user: &str, pw: &std::path::Path, extra: &str) -> String {
    format!(
        "[[job]]\nname = \"{name}\"\ndatabase = {{ url = \"postgres://{user}@127.0.0.1:{port}/postgres\", password_file = \"{pw}\", all = true, exclude = [\"scratch_*\"] }}\nstorage = [\"local\"]\n{extra}\n\n",
        port = env.pg.port,
        pw = pw.display(),
    )
}

/// The folders under `path` in the local store, sorted: a cluster job's
/// database segments, or a series' backup ids.
fn folders(env: &Env, path: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.store().join(path))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn scalar(pg: &PgCluster, db: &str, sql: &str) -> i64 {
    let mut c = pg.connect(db).await;
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    n
}

async fn text(pg: &PgCluster, db: &str, sql: &str) -> String {
    let mut c = pg.connect(db).await;
    let (s,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    s
}

/// A server with five databases besides `postgres`: two with the same
/// tables, one whose name needs quoting, one the backup role may not
/// connect to, one excluded by pattern. The job's role is not a superuser.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_job_backs_up_every_database_finds_new_ones_and_reports_gone_ones() {
    let env = Env::empty().await;
    env.pg.marketplace("shop").await;
    env.pg.marketplace("shop_eu").await;
    env.pg.marketplace("Sales DB").await;
    env.pg.create_db("locked").await;
    env.pg.create_db("scratch_1").await;
    env.pg
        .execute(
            "postgres",
            "CREATE ROLE backup LOGIN BYPASSRLS PASSWORD 'backup-pw-1' IN ROLE pg_read_all_data;
             REVOKE CONNECT ON DATABASE locked FROM PUBLIC;",
        )
        .await;
    let pw = env.path("backup-password");
    write_private(&pw, "backup-pw-1\n");
    let config = daemon_config(
        &env,
        "",
        &cluster_job(
            &env,
            "cluster",
            "backup",
            &pw,
            "no_role_passwords = true\nretries = 0",
        ),
    );
    env.backstop(&["check-config"]).await.assert_ok();

    let first = env.backstop(&["backup", "--job", "cluster"]).await;
    first.assert_ok();
    for line in [
        "ok      roles and tablespaces (globals)",
        "ok      database \"shop\"",
        "ok      database \"shop_eu\"",
        "ok      database \"Sales DB\"",
        "ok      database \"postgres\"",
        "skipped database \"locked\": the job's role may not connect to it",
        "excluded database \"scratch_1\" (by \"scratch_*\")",
        "cluster backup ",
    ] {
        assert!(first.stdout.contains(line), "{line}\n{}", first.stdout);
    }
    assert_eq!(
        folders(&env, "cluster"),
        ["@globals", "Sales%20DB", "postgres", "shop", "shop_eu"]
    );
    // Each database its own backup of one run id, its own snapshot and
    // manifest; the globals list the run's databases.
    let shop = manifest(&walk_one(&env, "cluster/shop"));
    let eu = manifest(&walk_one(&env, "cluster/shop_eu"));
    let sales = manifest(&walk_one(&env, "cluster/Sales%20DB"));
    let globals = manifest(&walk_one(&env, "cluster/@globals"));
    assert_eq!(shop["backup_id"], eu["backup_id"]);
    assert_eq!(shop["backup_id"], globals["backup_id"]);
    assert_ne!(shop["dump"]["snapshot"], eu["dump"]["snapshot"]);
    assert_eq!(shop["job"], "cluster");
    assert_eq!(shop["member"], "shop");
    assert_eq!(sales["member"], "Sales%20DB");
    assert_eq!(sales["source"]["database"], "Sales DB");
    assert_eq!(sales["database_owner"], "postgres");
    let tables = |m: &serde_json::Value| -> Vec<(String, u64)> {
        m["inventory"]["per_table"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_string(),
                    t["rows"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        tables(&shop),
        tables(&eu),
        "same tables and rows, each in its own backup"
    );
    assert_eq!(tables(&shop).len(), 8);
    assert_eq!(
        globals["databases"],
        serde_json::json!(["Sales DB", "postgres", "shop", "shop_eu"])
    );
    assert_eq!(globals["artifacts"][0]["kind"], "globals");
    // Nothing in the store or the output carries the role's password.
    for f in walk(&env.store()) {
        let body = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&body).contains("backup-pw-1"),
            "{}",
            f.display()
        );
    }
    assert!(!first.all().contains("backup-pw-1"));

    // A database that appears is backed up at the next run, with a log
    // line; one that disappears is reported and its backups kept. This run
    // goes through the daemon, whose metrics show both.
    env.pg.create_db("newdb").await;
    env.pg
        .execute(
            "newdb",
            "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 42);",
        )
        .await;
    env.pg.execute("postgres", "DROP DATABASE shop_eu").await;
    let mut daemon = Daemon::start(&config, env.path("daemon.log"));
    daemon.ready().await;
    let run = daemon.run_to_end("cluster").await;
    assert_eq!(run["state"], "success", "{run}\n{}", daemon.log());
    let log = daemon.log();
    assert!(
        log.contains("New database found on the server; backing it up from this run on.")
            && log.contains("newdb"),
        "{log}"
    );
    assert!(log.contains("Database is gone from the server"), "{log}");
    assert!(folders(&env, "cluster").contains(&"newdb".to_string()));
    assert_eq!(
        std::fs::read_dir(env.store().join("cluster/shop_eu"))
            .unwrap()
            .count(),
        1,
        "the gone database's backup is kept"
    );
    let m = |s: &str| {
        let d = &daemon;
        let s = s.to_string();
        async move { d.metric(&s).await }
    };
    assert_eq!(
        m("backstop_database_missing{database=\"shop_eu\",job=\"cluster\"}").await,
        Some(1.0)
    );
    assert_eq!(
        m("backstop_database_missing{database=\"shop\",job=\"cluster\"}").await,
        Some(0.0)
    );
    assert_eq!(
        m("backstop_database_unreachable{database=\"locked\",job=\"cluster\"}").await,
        Some(1.0)
    );
    assert!(
        m("backstop_database_last_success_timestamp_seconds{database=\"newdb\",job=\"cluster\"}")
            .await
            .is_some_and(|t| t > 0.0)
    );
    assert!(
        m("backstop_database_last_size_bytes{database=\"Sales DB\",job=\"cluster\"}")
            .await
            .is_some_and(|b| b > 10_000.0)
    );
    let stored = m("backstop_backups_stored{job=\"cluster\",storage=\"local\"}")
        .await
        .unwrap();
    // Two runs: 5 series, then 5 again (newdb instead of shop_eu).
    assert_eq!(stored, 10.0);

    // One database failing is its own failure: named, the others complete,
    // the run failed.
    env.pg.reject_connections_to("shop");
    let run = daemon.run_to_end("cluster").await;
    assert_eq!(run["state"], "failed", "{run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("1 of 5 failed: database \"shop\"") && error.contains("connect"),
        "{error}"
    );
    assert!(
        m("backstop_database_last_failure_timestamp_seconds{database=\"shop\",job=\"cluster\"}")
            .await
            .is_some_and(|t| t > 0.0)
    );
    daemon.stop().await;
    let newdb_backups = std::fs::read_dir(env.store().join("cluster/newdb"))
        .unwrap()
        .count();
    assert_eq!(newdb_backups, 2, "the other databases were backed up");

    // status: a row per database under the job.
    let status = env.backstop(&["status"]).await;
    assert_eq!(status.code, Some(1), "the job is failing: {status:?}");
    for (db, state) in [("shop", "FAILING"), ("shop_eu", "MISSING"), ("newdb", "ok")] {
        assert!(
            status
                .stdout
                .lines()
                .any(|l| l.trim_start().starts_with(db) && l.contains(state)),
            "{db} {state}\n{}",
            status.stdout
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&env.backstop(&["status", "--json"]).await.stdout).unwrap();
    let dbs = json["jobs"][0]["databases"].as_array().unwrap();
    assert!(
        dbs.iter()
            .any(|d| d["database"] == "Sales DB" && d["state"] == "ok")
    );

    // list: every database under a heading, or one with --database.
    let list = env.backstop(&["list", "--job", "cluster"]).await;
    list.assert_ok();
    assert!(
        list.stdout
            .contains("== database \"Sales DB\" (cluster/Sales%20DB) ==")
            && list
                .stdout
                .contains("== database \"shop_eu\" (cluster/shop_eu) ==")
            && list
                .stdout
                .contains("== roles and tablespaces (cluster/@globals) =="),
        "{}",
        list.stdout
    );
    let one = env
        .backstop(&[
            "list",
            "--job",
            "cluster",
            "--database",
            "Sales DB",
            "--json",
        ])
        .await;
    one.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&one.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[0]["source"]["database"], "Sales DB");
}

/// The one backup folder under `series` (asserting there is exactly one).
fn walk_one(env: &Env, series: &str) -> std::path::PathBuf {
    let dirs: Vec<_> = std::fs::read_dir(env.store().join(series))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{series}: {dirs:?}");
    dirs.into_iter().next().unwrap()
}

/// The samples of /metrics the catalog seeds, for comparing two daemons.
async fn seeded(daemon: &Daemon) -> BTreeMap<String, f64> {
    let (_, body) = daemon.http("GET", "/metrics", None).await;
    body.lines()
        .filter(|l| {
            [
                "backstop_job_last_success_timestamp_seconds{job=\"prod\",kind=\"backup\"}",
                "backstop_backup_last_size_bytes{",
                "backstop_backups_stored{",
                "backstop_storage_used_bytes{",
                "backstop_oldest_backup_timestamp_seconds{",
                "backstop_database_last_success_timestamp_seconds{",
                "backstop_database_last_size_bytes{",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn start_seeded(config: &std::path::Path, log: std::path::PathBuf) -> Daemon {
    let mut d = Daemon::start(config, log.clone());
    d.ready().await;
    wait_for(
        "metrics seeded",
        Duration::from_secs(60),
        || async {
            d.metric("backstop_backups_stored{job=\"prod\",storage=\"offsite\"}")
                .await
                .is_some()
        },
        &log,
    )
    .await;
    d
}

/// The whole disaster: back up a server (roles, grants, a database and
/// tables owned by a role that is not the superuser), verify and drill it,
/// lose the catalog, and from a new directory holding only the config and
/// the identity rebuild the catalog from the bucket (S3, s3s-fs), list,
/// and restore the whole server onto a second, freshly initdb'd PostgreSQL.
#[tokio::test(flavor = "multi_thread")]
async fn the_whole_server_comes_back_on_a_bare_host_from_the_bucket_alone() {
    let env = Env::new().await;
    env.pg
        .execute(
            "postgres",
            "CREATE ROLE app_owner LOGIN PASSWORD 'owner-pw-9'",
        )
        .await;
    env.pg
        .execute("postgres", "CREATE DATABASE \"Inventory\" OWNER app_owner")
        .await;
    env.pg
        .execute(
            "Inventory",
            "SET ROLE app_owner;
             CREATE SCHEMA stock;
             CREATE TABLE stock.\"Items\" (id int PRIMARY KEY, doc jsonb);
             INSERT INTO stock.\"Items\" SELECT g, jsonb_build_object('sku', 'SKU-' || g, 'note', repeat('shelf ', g % 17)) FROM generate_series(1, 3000) g;
             GRANT USAGE ON SCHEMA stock TO marketplace_readonly;
             GRANT SELECT ON stock.\"Items\" TO marketplace_readonly;",
        )
        .await;
    // Production shapes too: partitions, inheritance, mixed-case names,
    // a large object.
    env.pg.shapes("marketplace");
    let source_counts: BTreeMap<&str, BTreeMap<String, i64>> = BTreeMap::from([
        ("marketplace", env.pg.row_counts("marketplace").await),
        ("Inventory", env.pg.row_counts("Inventory").await),
    ]);
    let id = env.identity.display().to_string();
    // The bucket: an S3 store on s3s-fs.
    let s3 = S3Server::start();
    let secret = env.path("s3-secret");
    write_private(&secret, &format!("{}\n", crate::harness::s3::SECRET_KEY));
    let storage = s3
        .storage_toml("offsite", "")
        .replace("{SECRET_FILE}", &secret.display().to_string());
    let job = cluster_job(
        &env,
        "prod",
        "postgres",
        &env.password_file,
        &format!("identity_file = \"{id}\"\nrto = \"1h\"\nparallel = 2"),
    )
    .replace("storage = [\"local\"]", "storage = [\"offsite\"]");
    let config = daemon_config(&env, "", &format!("{storage}{job}"));
    let config_text = std::fs::read_to_string(&config).unwrap();
    env.backstop(&["backup", "--job", "prod"]).await.assert_ok();
    env.backstop(&["verify", "--job", "prod", "--level", "checksum"])
        .await
        .assert_ok();
    let url = env.pg.url("postgres");
    let pw = env.password_file.display().to_string();
    let drill = env
        .backstop(&[
            "drill",
            "--job",
            "prod",
            "--target-server",
            &url,
            "--target-password-file",
            &pw,
        ])
        .await;
    drill.assert_ok();
    assert!(
        drill.stdout.contains("ok      prod/Inventory") && drill.stdout.contains("(rto 1h: met)"),
        "{}",
        drill.stdout
    );
    assert_eq!(
        scalar(
            &env.pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'backstop_verify_%'"
        )
        .await,
        0,
        "the drill drops its scratch databases"
    );

    // What the daemon exports with the catalog intact.
    let mut before = start_seeded(&config, env.path("before.log")).await;
    let drilled = before
        .metric("backstop_job_restore_duration_seconds{job=\"prod\"}")
        .await
        .expect("the drill's restore time is exported");
    assert!(drilled > 0.0 && drilled < 3600.0, "{drilled}");
    assert_eq!(
        before
            .metric("backstop_job_rto_seconds{job=\"prod\"}")
            .await,
        Some(3600.0)
    );
    let metrics_before = seeded(&before).await;
    before.stop().await;
    assert!(metrics_before.len() >= 8, "{metrics_before:?}");

    // The backup host dies with its catalog.
    for f in env.catalog_files() {
        std::fs::remove_file(f).unwrap();
    }

    // A bare host: a new directory, the config and the identity (the store
    // is the bucket; its path is in the config).
    let bare = tempfile::tempdir().unwrap();
    let bare_config = bare.path().join("backstop.toml");
    let bare_catalog = bare.path().join("catalog.db");
    std::fs::write(
        &bare_config,
        config_text.replace(
            &env.path("catalog.db").display().to_string(),
            &bare_catalog.display().to_string(),
        ),
    )
    .unwrap();
    let rebuilt = run_backstop(&bare_config, &["catalog", "rebuild"]).await;
    rebuilt.assert_ok();
    assert!(
        rebuilt
            .stdout
            .contains("job \"prod\" store \"offsite\": 4 backup(s) in 4 series, 4 added; 7 verification(s), 7 added; 1 cluster run(s) added"),
        "{}",
        rebuilt.stdout
    );
    let again = run_backstop(&bare_config, &["catalog", "rebuild"]).await;
    assert!(
        again
            .stdout
            .contains("4 backup(s) in 4 series, 0 added; 7 verification(s), 0 added;"),
        "{}",
        again.stdout
    );
    // The cluster run is not imported twice either (its count would follow
    // the prefix above).
    assert!(
        !again.stdout.contains("cluster run(s) added"),
        "{}",
        again.stdout
    );
    let list = run_backstop(&bare_config, &["list", "--job", "prod"]).await;
    list.assert_ok();
    // The verifications made before the loss: the checksum of every
    // backup, then the drill's restore of each database (the latest shows).
    assert_eq!(
        (
            list.stdout.matches("restore 20").count(),
            list.stdout.matches("checksum 20").count()
        ),
        (3, 1),
        "{}",
        list.stdout
    );

    // A second bare host whose daemon finds the catalog empty: it rebuilds
    // by itself, and seeds exactly what the lost catalog did.
    let auto = tempfile::tempdir().unwrap();
    let auto_config = auto.path().join("backstop.toml");
    std::fs::write(
        &auto_config,
        config_text.replace(
            &env.path("catalog.db").display().to_string(),
            &auto.path().join("catalog.db").display().to_string(),
        ),
    )
    .unwrap();
    let mut after = start_seeded(&auto_config, auto.path().join("daemon.log")).await;
    let metrics_after = seeded(&after).await;
    let log = after.log();
    after.stop().await;
    assert!(log.contains("rebuilt it from their manifests"), "{log}");
    assert_eq!(metrics_after, metrics_before);

    // Restore the whole server onto a new, empty PostgreSQL.
    let target = PgCluster::start();
    let target_pw = bare.path().join("target-password");
    write_private(&target_pw, &format!("{}\n", target.password));
    let target_url = target.url("postgres");
    let target_pw_s = target_pw.display().to_string();
    let restore_server = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--job",
            "prod",
            "--all-databases",
            "--target-server",
            &target_url,
            "--target-password-file",
            &target_pw_s,
            "--create-db",
        ];
        args.extend_from_slice(extra);
        let config = bare_config.clone();
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_backstop(&config, &args).await
        }
    };
    let early = restore_server(&["--at", "2000-01-01T00:00:00Z"]).await;
    assert_eq!(early.code, Some(1), "{early:?}");
    assert!(
        early
            .stderr
            .contains("started at or before 2000-01-01 00:00:00 UTC: the oldest started at"),
        "{}",
        early.stderr
    );
    let restored = restore_server(&["--parallel", "2"]).await;
    restored.assert_ok();
    assert!(
        restored.stdout.contains("ok      roles and tablespaces")
            && restored.stdout.contains("3 of 3 database(s) restored"),
        "{}",
        restored.stdout
    );
    for (db, counts) in &source_counts {
        assert_eq!(&target.row_counts(db).await, counts, "{db}");
        let line = restored
            .stdout
            .lines()
            .find(|l| l.contains(&format!(" {db} ")))
            .unwrap_or_else(|| panic!("{db}: {}", restored.stdout));
        let total: i64 = counts.values().sum();
        assert!(line.contains(&format!("{total}/{total}")), "{line}");
    }
    // Roles, grants and owners came back.
    assert_eq!(
        scalar(&target, "postgres", "SELECT count(*) FROM pg_roles WHERE rolname IN ('app_owner', 'marketplace_app', 'marketplace_readonly')").await,
        3
    );
    assert_eq!(
        text(
            &target,
            "postgres",
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = 'Inventory'"
        )
        .await,
        "app_owner"
    );
    assert_eq!(
        text(
            &target,
            "Inventory",
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'Items'"
        )
        .await,
        "app_owner"
    );
    assert_eq!(
        scalar(&target, "Inventory", "SELECT has_table_privilege('marketplace_readonly', 'stock.\"Items\"', 'SELECT')::int::bigint").await,
        1
    );
    assert_eq!(
        scalar(
            &target,
            "marketplace",
            "SELECT has_table_privilege('marketplace_app', 'public.orders', 'INSERT')::int::bigint"
        )
        .await,
        1
    );
    // The restore kept its own connection working (the source superuser's
    // password was not applied to the role it connects as).
    target.execute("postgres", "SELECT 1").await;

    // An objective the drill misses fails it (and is what the alert says).
    std::fs::write(
        &bare_config,
        std::fs::read_to_string(&bare_config)
            .unwrap()
            .replace("rto = \"1h\"", "rto = \"1ms\""),
    )
    .unwrap();
    let missed = run_backstop(
        &bare_config,
        &[
            "drill",
            "--job",
            "prod",
            "--target-server",
            &target_url,
            "--target-password-file",
            &target_pw_s,
        ],
    )
    .await;
    assert_eq!(missed.code, Some(1), "{missed:?}");
    assert!(
        missed.stdout.contains("MISSED") && missed.stderr.contains("longer than its rto"),
        "{missed:?}"
    );
}

/// Retention's min_keep counts only backups that did not fail
/// verification; with the catalog gone, the store's verification records
/// still say which failed. Before the records, the failed backup counted
/// toward min_keep and the older good one was deleted.
#[tokio::test(flavor = "multi_thread")]
async fn retention_after_a_catalog_loss_still_honours_failed_verifications() {
    let env = Env::new().await;
    env.write_config(&env.job(
        "app",
        "marketplace",
        "retention = { keep_last = 1, min_keep = 2 }",
    ));
    for d in 1..=3 {
        run_backstop_with(
            &env.path("backstop.toml"),
            &["backup", "--job", "app"],
            &[("BACKSTOP_TEST_NOW", &format!("2026-01-0{d}T02:00:00Z"))],
        )
        .await
        .assert_ok();
    }
    let ids = folders(&env, "app");
    // The middle backup rots in the store (same size, one byte changed).
    let dir = env.store().join("app").join(&ids[1]);
    let artifact = dir.join(manifest(&dir)["artifacts"][0]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, bytes).unwrap();
    // Verified on the same injected clock as the backups and the prune
    // (a record dated after the prune's "now" would not be trusted).
    let bad = run_backstop_with(
        &env.path("backstop.toml"),
        &["verify", "--job", "app", "--backup", &ids[1]],
        &[("BACKSTOP_TEST_NOW", "2026-01-03T12:00:00Z")],
    )
    .await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(
        walk(&dir)
            .iter()
            .any(|p| p.to_string_lossy().contains("/verify/")),
        "a verification record beside the manifest"
    );

    for f in env.catalog_files() {
        std::fs::remove_file(f).unwrap();
    }
    let list = env.backstop(&["list", "--job", "app"]).await;
    assert!(list.stdout.contains("FAILED checksum"), "{}", list.stdout);
    let prune = run_backstop_with(
        &env.path("backstop.toml"),
        &["prune", "--job", "app"],
        &[("BACKSTOP_TEST_NOW", "2026-01-04T00:00:00Z")],
    )
    .await;
    prune.assert_ok();
    let left = folders(&env, "app");
    assert_eq!(
        left,
        [ids[0].clone(), ids[2].clone()],
        "the newest and the older good one are kept, the failed one goes: {}",
        prune.stdout
    );
}

/// Mistakes in a cluster job's settings are refused with what to do.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_job_settings_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let recipient = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
    let config = dir.path().join("backstop.toml");
    let base = format!(
        "[storage.local]\ntype = \"local\"\npath = \"{}\"\n\n[encryption.default]\nrecipients = [\"{recipient}\"]\n\n",
        dir.path().join("store").display()
    );
    for (job, expected) in [
        (
            "database = { url = \"postgres://u@127.0.0.1/postgres\", all = true }\ninclude_tables = [\"public.orders\"]",
            "include_tables names objects of one database, but all = true backs up every database",
        ),
        (
            "database = { url = \"postgres://u@127.0.0.1/postgres\", all = true, exclude = [\"*\"] }",
            "exclude pattern \"*\" matches every database",
        ),
        (
            "database = { url = \"postgres://u@127.0.0.1/app\", exclude = [\"x\"] }",
            "database.exclude only applies to a cluster job",
        ),
        (
            "database = { url = \"postgres://u@127.0.0.1/app\" }\nparallel = 4",
            "parallel only applies to a cluster job",
        ),
    ] {
        std::fs::write(
            &config,
            format!("{base}[[job]]\nname = \"c\"\n{job}\nstorage = [\"local\"]\n"),
        )
        .unwrap();
        let r = run_backstop(&config, &["check-config"]).await;
        assert_eq!(r.code, Some(2), "{job}: {r:?}");
        assert!(r.stderr.contains(expected), "{job}: {}", r.stderr);
    }
}

/// Issue 28, item 7. A cluster run whose one database fails with a
/// transient error retries only that database, in the same run (before,
/// the retry dumped the whole server again under a new id). A server
/// restore of a run in which a database failed fails that database by
/// name unless `--allow-older` (before, it silently restored an older
/// backup and exited 0), and names the databases with backups that the
/// run does not hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_redumps_only_the_failed_database_and_a_server_restore_never_falls_back_silently() {
    let env = Env::empty().await;
    for db in ["alpha", "beta", "gone"] {
        env.pg.create_db(db).await;
        env.pg
            .execute(
                db,
                "CREATE SCHEMA \"Ops\";
                 CREATE TABLE \"Ops\".\"Events\" (id int PRIMARY KEY, doc jsonb);
                 INSERT INTO \"Ops\".\"Events\" SELECT g, jsonb_build_object('kind', 'audit', 'note', repeat('checked ', g % 13)) FROM generate_series(1, 500) g;",
            )
            .await;
    }
    // A non-superuser role, so a connection limit of 0 shuts it out of
    // beta: a transient failure of that one database.
    env.pg
        .execute(
            "postgres",
            "CREATE ROLE backup LOGIN BYPASSRLS PASSWORD 'backup-pw-2' IN ROLE pg_read_all_data;
             ALTER DATABASE beta CONNECTION LIMIT 0;",
        )
        .await;
    let pw = env.path("backup-password");
    write_private(&pw, "backup-pw-2\n");
    let config = daemon_config(
        &env,
        "",
        &cluster_job(
            &env,
            "srv",
            "backup",
            &pw,
            &format!(
                "retries = 1\nretry_backoff = \"5s\"\nidentity_file = \"{}\"",
                env.identity.display()
            ),
        ),
    );
    let log = env.path("daemon.log");
    let mut daemon = Daemon::start(&config, log.clone());
    daemon.ready().await;
    let id = daemon.start_run("srv").await;
    wait_for(
        "the first attempt to fail on beta and wait for its retry",
        Duration::from_secs(60),
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("retrying")
        },
        &log,
    )
    .await;
    env.pg
        .execute("postgres", "ALTER DATABASE beta CONNECTION LIMIT -1")
        .await;
    let end = daemon.wait_run("srv", id).await;
    let daemon_log = daemon.log();
    daemon.stop().await;
    assert_eq!(end["state"], "success", "{end}\n{daemon_log}");
    assert_eq!(end["attempts"], 2, "{end}");
    assert!(
        daemon_log.contains("Cluster backup retried") && daemon_log.contains("again=\"beta\""),
        "{daemon_log}"
    );
    // One backup of each part, all of one id: the retry dumped beta alone.
    let first = folders(&env, "srv/beta");
    assert_eq!(first.len(), 1, "{first:?}");
    for part in ["@globals", "alpha", "gone", "postgres"] {
        assert_eq!(folders(&env, &format!("srv/{part}")), first, "{part}");
    }
    assert_eq!(
        daemon_log.matches("Backup complete.").count(),
        5,
        "globals, alpha, beta, gone and postgres once each: {daemon_log}"
    );
    let r1 = first[0].clone();

    // A second run: gone was dropped, beta fails (no retries one-shot).
    env.pg.execute("postgres", "DROP DATABASE gone").await;
    env.pg
        .execute("postgres", "ALTER DATABASE beta CONNECTION LIMIT 0")
        .await;
    let second = env.backstop(&["backup", "--job", "srv"]).await;
    assert_eq!(second.code, Some(1), "{second:?}");
    let r2 = folders(&env, "srv/alpha")
        .into_iter()
        .find(|f| *f != r1)
        .expect("the second run's backup of alpha");
    assert_eq!(folders(&env, "srv/beta"), std::slice::from_ref(&r1));

    // Restore the latest run onto an empty server.
    let target = PgCluster::start();
    let target_pw = env.path("target-password");
    write_private(&target_pw, &format!("{}\n", target.password));
    let target_url = target.url("postgres");
    let target_pw = target_pw.display().to_string();
    let restore = |extra: &'static [&'static str]| {
        let mut args = vec![
            "restore",
            "--job",
            "srv",
            "--all-databases",
            "--target-server",
            &target_url,
            "--target-password-file",
            &target_pw,
            "--create-db",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        let env = &env;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.backstop(&args).await
        }
    };
    let strict = restore(&[]).await;
    assert_eq!(strict.code, Some(1), "{strict:?}");
    let beta_line = strict
        .stdout
        .lines()
        .find(|l| l.contains(" beta "))
        .unwrap_or_else(|| panic!("{}", strict.stdout));
    assert!(beta_line.trim_start().starts_with("FAILED"), "{beta_line}");
    for want in [
        format!("its backup in run {r2} cannot be used"),
        format!("Its latest earlier backup is {r1}: pass --allow-older"),
        format!(
            "absent  gone: it has backups in the store but none in this run; its latest before the run is {r1}"
        ),
        "2 of 3 database(s) restored".to_string(),
    ] {
        assert!(strict.stdout.contains(&want), "{want}\n{}", strict.stdout);
    }
    assert_eq!(
        scalar(
            &target,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname IN ('beta', 'gone')"
        )
        .await,
        0,
        "nothing older restored in beta's place, and gone is not in the run"
    );
    assert_eq!(
        scalar(&target, "alpha", "SELECT count(*) FROM \"Ops\".\"Events\"").await,
        500
    );

    // With --allow-older beta comes from the first run, said so.
    target.execute("postgres", "DROP DATABASE alpha").await;
    let older = restore(&["--allow-older"]).await;
    older.assert_ok();
    for want in [
        format!("restored its previous backup {r1} (--allow-older)"),
        "3 of 3 database(s) restored".to_string(),
        "absent  gone:".to_string(),
    ] {
        assert!(older.stdout.contains(&want), "{want}\n{}", older.stdout);
    }
    assert_eq!(
        scalar(&target, "beta", "SELECT count(*) FROM \"Ops\".\"Events\"").await,
        500
    );
}

/// Issue 28, item 11. The backups of a database dropped from the server age
/// out `keep_gone_for` after its newest one (before, min_keep kept them for
/// good): kept while younger, deleted with the reason once older, and a
/// database still on the server keeps its old backups by the rules.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_databases_backups_age_out_after_keep_gone_for() {
    let env = Env::empty().await;
    for db in ["alpha", "gone"] {
        env.pg.create_db(db).await;
        env.pg
            .execute(
                db,
                "CREATE TABLE notes (id int PRIMARY KEY, body text);
                 INSERT INTO notes SELECT g, repeat('kept ', g % 11) FROM generate_series(1, 200) g;",
            )
            .await;
    }
    let job = |keep_gone_for: &str| {
        cluster_job(
            &env,
            "srv",
            "postgres",
            &env.password_file,
            &format!("retention = {{ keep_last = 5{keep_gone_for} }}"),
        )
    };
    let config = env.write_config(&job(", keep_gone_for = \"200d\""));
    // The first run 100 days ago (the test build's clock), then gone is
    // dropped and a run now no longer holds it.
    let then = (chrono::Utc::now() - chrono::Duration::days(100)).to_rfc3339();
    run_backstop_with(
        &config,
        &["backup", "--job", "srv"],
        &[("BACKSTOP_TEST_NOW", then.as_str())],
    )
    .await
    .assert_ok();
    let old = folders(&env, "srv/gone");
    assert_eq!(old.len(), 1, "{old:?}");
    env.pg.execute("postgres", "DROP DATABASE gone").await;
    env.backstop(&["backup", "--job", "srv"]).await.assert_ok();

    // 100 days is less than 200: kept.
    let younger = env.backstop(&["prune", "--job", "srv", "--dry-run"]).await;
    younger.assert_ok();
    assert!(
        !younger.stdout.contains("is gone from the server"),
        "{}",
        younger.stdout
    );

    // The default, 90 days: gone's backups go, with the reason; alpha keeps
    // its old backup.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&job(", keep_gone_for = \"200d\""), &job("")),
    )
    .unwrap();
    let dry = env.backstop(&["prune", "--job", "srv", "--dry-run"]).await;
    dry.assert_ok();
    assert!(
        dry.stdout.contains(&format!("{} ", old[0]))
            && dry
                .stdout
                .contains("its database is gone from the server (not in run ")
            && dry
                .stdout
                .contains("and its newest backup is older than keep_gone_for (90d)"),
        "{}",
        dry.stdout
    );
    env.backstop(&["prune", "--job", "srv"]).await.assert_ok();
    let left = std::fs::read_dir(env.store().join("srv/gone"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "gone's backups are deleted");
    assert_eq!(
        folders(&env, "srv/alpha").len(),
        2,
        "alpha keeps both by keep_last"
    );
}
