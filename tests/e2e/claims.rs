//! Claims the README makes that no other test exercised: exact counts in
//! the exported snapshot under concurrent writes, every failure step it
//! names, and settings that were documented but never run.
//!
//! Length: one test per README claim, each small.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::s3::{S3Server, SECRET_KEY};
use crate::harness::s3proxy::S3Proxy;
use crate::harness::{Env, manifest, run_backstop_with, write_private};

fn manifest_rows(m: &Value) -> BTreeMap<String, i64> {
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
                t["rows"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Writers insert, update and delete in several tables (money moving
/// between accounts, events appended and removed) for the whole dump. The
/// manifest's counts must equal the restored database's exactly, and equal
/// `count(*)` taken inside the exported snapshot itself (by a pg_dump
/// wrapper that imports the snapshot pg_dump is given before running it);
/// the accounts' total is the invariant every committed transfer keeps.
#[tokio::test(flavor = "multi_thread")]
async fn exact_counts_in_the_exported_snapshot_under_concurrent_writes() {
    let env = Env::empty().await;
    env.pg.create_db("shop").await;
    env.pg
        .execute(
            "shop",
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 200) g;
             CREATE TABLE events (id bigserial PRIMARY KEY, account int, body jsonb);
             INSERT INTO events (account, body) SELECT g % 200 + 1, jsonb_build_object('n', g) FROM generate_series(1, 5000) g;
             CREATE SCHEMA \"Audit\";
             CREATE TABLE \"Audit\".\"Log\" (id bigserial, note text);
             CREATE TABLE bulk AS SELECT g AS id, md5(g::text) || md5((g * 3)::text) AS body FROM generate_series(1, 300000) g;",
        )
        .await;
    // The wrapper counts inside the snapshot it is handed, then dumps.
    let counts_file = env.path("snapshot-counts.txt");
    let wrapper = env.path("pg_dump");
    let real = crate::harness::pg::pg_bin();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && exec '{pg_dump}' \"$@\"\nsnap=$(printf '%s\\n' \"$@\" | sed -n 's/^--snapshot=//p')\n'{psql}' -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p {port} -U postgres -d shop -c 'BEGIN ISOLATION LEVEL REPEATABLE READ' -c \"SET TRANSACTION SNAPSHOT '$snap'\" -c \"SELECT 'public.accounts', count(*) FROM ONLY accounts UNION ALL SELECT 'public.events', count(*) FROM ONLY events UNION ALL SELECT 'Audit.Log', count(*) FROM ONLY \\\"Audit\\\".\\\"Log\\\" UNION ALL SELECT 'public.bulk', count(*) FROM ONLY bulk UNION ALL SELECT 'sum', sum(balance) FROM accounts\" -c COMMIT > '{out}.tmp' || exit 97\nmv '{out}.tmp' '{out}'\nexec '{pg_dump}' \"$@\"\n",
            pg_dump = real.join("pg_dump").display(),
            psql = real.join("psql").display(),
            port = env.pg.port,
            out = counts_file.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // The other client programs are looked for next to pg_dump_path.
    for tool in ["pg_restore", "psql", "pg_dumpall"] {
        std::os::unix::fs::symlink(real.join(tool), env.path(tool)).unwrap();
    }
    env.write_config(&env.job(
        "shop",
        "shop",
        &format!(
            "compression = \"zstd:19\"\npg_dump_path = \"{}\"",
            wrapper.display()
        ),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let (stop, commits) = (stop.clone(), commits.clone());
        let mut c = env.pg.connect("shop").await;
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (a, b) = ((i * 7 + w) % 200 + 1, (i * 13 + w * 5) % 200 + 1);
                let sql = format!(
                    "BEGIN;
                     UPDATE accounts SET balance = balance - 5 WHERE id = {a};
                     UPDATE accounts SET balance = balance + 5 WHERE id = {b};
                     INSERT INTO events (account, body) VALUES ({a}, '{{\"transfer\": {i}}}');
                     DELETE FROM events WHERE id = (SELECT min(id) FROM events WHERE account = {b});
                     INSERT INTO \"Audit\".\"Log\" (note) VALUES ('writer {w} step {i}');
                     COMMIT;"
                );
                if sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .is_ok()
                {
                    commits.fetch_add(1, Ordering::SeqCst);
                } else {
                    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut c).await;
                }
            }
        }));
    }
    // Writes are going before the backup starts.
    while commits.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = env.backstop(&["backup", "--job", "shop"]).await;
    let at_end = commits.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    run.assert_ok();
    let snapshot: BTreeMap<String, i64> = std::fs::read_to_string(&counts_file)
        .expect("the wrapper counted in the snapshot")
        .lines()
        .map(|l| {
            let (k, v) = l.split_once('|').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    assert_eq!(snapshot["sum"], 200 * 1000, "transfers keep the total");
    let m = manifest(&env.only_backup("shop"));
    assert_eq!(m["row_counts"], "exact");
    let recorded = manifest_rows(&m);
    let mut in_snapshot = snapshot.clone();
    in_snapshot.remove("sum");
    assert_eq!(
        recorded, in_snapshot,
        "manifest vs count(*) in the snapshot"
    );
    // The database moved on during the dump: the counts are not just "now".
    let live = env.pg.row_counts("shop").await;
    assert!(at_end > 20, "no writes overlapped the dump");
    assert_ne!(
        live["Audit.Log"], recorded["Audit.Log"],
        "the writers did not overlap the dump"
    );
    // The restored database is exactly the snapshot.
    env.backstop(&[
        "restore",
        "--job",
        "shop",
        "--target",
        &env.pg.url("restored"),
        "--target-password-file",
        &env.password_file.display().to_string(),
        "--identity",
        &env.identity.display().to_string(),
        "--create-db",
    ])
    .await
    .assert_ok();
    let restored = env.pg.row_counts("restored").await;
    assert_eq!(restored, recorded);
    let mut c = env.pg.connect("restored").await;
    let (sum,): (i64,) = sqlx::query_as("SELECT sum(balance)::int8 FROM accounts")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(sum, 200 * 1000);
}

/// A login role `backup_ro` (not a superuser, BYPASSRLS: the fixture has
/// row-level security) with its own password file, given `grants`.
async fn limited_role(env: &Env, grants: &str) -> String {
    env.pg
        .execute(
            "marketplace",
            &format!("CREATE ROLE backup_ro LOGIN BYPASSRLS PASSWORD 'ro-pass-9f3k'; {grants}"),
        )
        .await;
    let pw = env.path("ro-password");
    write_private(&pw, "ro-pass-9f3k\n");
    format!(
        "[[job]]\nname = \"ro\"\ndatabase = {{ url = \"postgres://backup_ro@127.0.0.1:{}/marketplace\", password_file = \"{}\" }}\nstorage = [\"local\"]\n",
        env.pg.port,
        pw.display()
    )
}

/// One backup of job `ro` fails at `step` with `cause`, cleanly (the shared
/// check: exit status, step, cause, nothing left, the catalog's record),
/// lists nothing and never prints the role's password.
async fn assert_step_failed(env: &Env, step: &str, cause: &str) {
    let run = env.backstop(&["backup", "--job", "ro"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    crate::backup::assert_failed_cleanly(env, "ro", &run, step, cause).await;
    let list = env.backstop(&["list", "--job", "ro", "--json"]).await;
    assert_eq!(list.stdout.trim(), "[]");
    assert!(!run.all().contains("ro-pass-9f3k"));
}

/// The `inventory` step: a role the server does not let run
/// pg_total_relation_size (hardened servers revoke such functions).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_rights_fails_the_inventory_step() {
    let env = Env::new().await;
    let job = limited_role(
        &env,
        "GRANT pg_read_all_data TO backup_ro; REVOKE EXECUTE ON FUNCTION pg_catalog.pg_total_relation_size(regclass) FROM PUBLIC;",
    )
    .await;
    env.write_config(&job);
    assert_step_failed(
        &env,
        "inventory failed",
        "permission denied for function pg_total_relation_size",
    )
    .await;
}

/// The `pg_dumpall` step: globals with role passwords read pg_authid; the
/// role may read the tables but not that (pg_read_all_data would let it).
#[tokio::test(flavor = "multi_thread")]
async fn globals_without_superuser_rights_fail_the_pg_dumpall_step() {
    let env = Env::new().await;
    let job = limited_role(
        &env,
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO backup_ro; GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO backup_ro;",
    )
    .await;
    env.write_config(&format!("{job}globals = true\n"));
    assert_step_failed(
        &env,
        "pg_dumpall failed",
        "permission denied for table pg_authid",
    )
    .await;
    // With no_role_passwords the same role can (pg_roles instead of pg_authid).
    env.write_config(&format!("{job}globals = true\nno_role_passwords = true\n"));
    env.backstop(&["backup", "--job", "ro"]).await.assert_ok();
}

/// `storage_class`, `sse` reach S3 (seen on the wire by a proxy), and
/// `check-config --probe` only reads: no PUT, POST or DELETE reaches the
/// store and nothing is written locally.
#[tokio::test(flavor = "multi_thread")]
async fn storage_class_and_sse_reach_s3_and_probe_only_reads() {
    let env = Env::new().await;
    let s3 = S3Server::start();
    let proxy = S3Proxy::start(s3.port).await;
    let p = env.write_config_with_s3(
        &s3,
        "storage_class = \"STANDARD_IA\"\nsse = \"AES256\"",
        &env.job_to("app", "marketplace", &["offsite", "local"], ""),
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(&s3.endpoint(), &proxy.endpoint());
    std::fs::write(&p, &text).unwrap();
    // s3s-fs offers no STANDARD_IA: the refusal names the setting to fix.
    let refused = env.backstop(&["backup", "--job", "app"]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains(
            "does not offer storage class \"STANDARD_IA\" (check storage.offsite.storage_class)"
        ),
        "{}",
        refused.stderr
    );
    std::fs::write(&p, text.replace("STANDARD_IA", "STANDARD")).unwrap();
    for d in std::fs::read_dir(env.store().join("app"))
        .unwrap()
        .flatten()
    {
        std::fs::remove_dir_all(d.path()).unwrap();
    }
    proxy.clear();

    let probe = env.backstop(&["check-config", "--probe"]).await;
    probe.assert_ok();
    let writes: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method != "GET" && s.method != "HEAD")
        .collect();
    assert!(writes.is_empty(), "a read-only probe wrote: {writes:?}");
    assert!(
        !proxy.seen().is_empty(),
        "the probe never reached the store"
    );
    assert!(crate::harness::walk(&env.store()).is_empty());
    assert!(s3.keys("").await.is_empty());

    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let put = proxy
        .seen()
        .into_iter()
        .find(|s| s.method == "PUT" && s.path.ends_with(".age"))
        .expect("the artifact was uploaded");
    let header = |name: &str| {
        put.amz
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("x-amz-storage-class").as_deref(),
        Some("STANDARD"),
        "{put:?}"
    );
    assert_eq!(
        header("x-amz-server-side-encryption").as_deref(),
        Some("AES256"),
        "{put:?}"
    );

    // --storage NAME picks the store for list, verify and restore.
    for store in ["offsite", "local"] {
        let list = env
            .backstop(&["list", "--job", "app", "--storage", store, "--json"])
            .await;
        list.assert_ok();
        let v: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
        assert_eq!(v.len(), 1, "{store}: {}", list.stdout);
    }
    let before = proxy.seen().len();
    env.backstop(&["verify", "--job", "app", "--storage", "local"])
        .await
        .assert_ok();
    assert_eq!(proxy.seen().len(), before, "verify --storage local read S3");
    let v = env
        .backstop(&["verify", "--job", "app", "--storage", "offsite"])
        .await;
    v.assert_ok();
    assert!(v.stdout.contains("offsite"), "{}", v.stdout);
    assert!(proxy.seen().len() > before);
    let nope = env
        .backstop(&["list", "--job", "app", "--storage", "elsewhere"])
        .await;
    assert_eq!(nope.code, Some(2), "{nope:?}");
}

/// The AWS default credential chain: with no keys in the config, the
/// environment's and then a shared credentials file's profile are used; with
/// neither, the error says where credentials are looked for.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_default_credential_chain_from_environment_and_profile() {
    let env = Env::new().await;
    let s3 = S3Server::start();
    let storage = format!(
        "[storage.offsite]\ntype = \"s3\"\nbucket = \"backups\"\nprefix = \"prod/\"\nregion = \"us-east-1\"\nendpoint = \"{}\"\nforce_path_style = true\n\n",
        s3.endpoint()
    );
    let cfg = env.path("backstop.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{storage}{}",
            env.header(),
            env.job_to("app", "marketplace", &["offsite"], "")
        ),
    )
    .unwrap();
    let empty = env.path("empty-aws");
    std::fs::write(&empty, "").unwrap();
    let isolated = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("AWS_CONFIG_FILE", empty.display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", empty.display().to_string()),
            ("AWS_ACCESS_KEY_ID", String::new()),
            ("AWS_SECRET_ACCESS_KEY", String::new()),
        ];
        for (k, val) in extra {
            v.retain(|(kk, _)| *kk != k);
            v.push((k, val));
        }
        v
    };
    let run_with = |envs: Vec<(&'static str, String)>| {
        let cfg = cfg.clone();
        async move {
            let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_backstop_with(&cfg, &["backup", "--job", "app"], &pairs).await
        }
    };
    // The environment.
    run_with(isolated(vec![
        ("AWS_ACCESS_KEY_ID", crate::harness::s3::ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
    ]))
    .await
    .assert_ok();
    // A shared credentials file and a named profile.
    let creds = env.path("aws-credentials");
    write_private(
        &creds,
        &format!(
            "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n[backstop-test]\naws_access_key_id = {}\naws_secret_access_key = {SECRET_KEY}\n",
            crate::harness::s3::ACCESS_KEY
        ),
    );
    let run = run_with(isolated(vec![
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_PROFILE", "backstop-test".into()),
    ]))
    .await;
    run.assert_ok();
    assert!(!run.all().contains(SECRET_KEY));
    let manifests = s3
        .keys("prod/app/")
        .await
        .into_iter()
        .filter(|k| k.ends_with("manifest.json"))
        .count();
    assert_eq!(manifests, 2);
    // Nothing anywhere: a failure that says so, never a hang.
    let none = run_with(isolated(vec![])).await;
    assert_eq!(none.code, Some(1), "{none:?}");
    assert!(none.stderr.contains("offsite"), "{}", none.stderr);
}

/// `url_env` (the whole URL from the environment), `password_env`,
/// include filters, and `scope = "data"`.
#[tokio::test(flavor = "multi_thread")]
async fn url_env_password_env_include_filters_and_data_scope() {
    let env = Env::new().await;
    env.pg
        .execute(
            "marketplace",
            "CREATE SCHEMA reporting; CREATE TABLE reporting.daily AS SELECT g AS id FROM generate_series(1, 40) g;",
        )
        .await;
    let url = env.pg.url("marketplace");
    let jobs = format!(
        "[[job]]\nname = \"fromenv\"\ndatabase = {{ url_env = \"APP_DATABASE_URL\", password_env = \"APP_DATABASE_PASSWORD\" }}\nstorage = [\"local\"]\ninclude_schemas = [\"reporting\"]\n\n[[job]]\nname = \"tables\"\ndatabase = {{ url = \"{url}\", password_env = \"APP_DATABASE_PASSWORD\" }}\nstorage = [\"local\"]\ninclude_tables = [\"public.orders\", \"public.users\"]\n\n[[job]]\nname = \"dataonly\"\ndatabase = {{ url = \"{url}\", password_env = \"APP_DATABASE_PASSWORD\" }}\nstorage = [\"local\"]\nscope = \"data\"\n"
    );
    let cfg = env.write_config(&jobs);
    let envs = [
        ("APP_DATABASE_URL", url.as_str()),
        ("APP_DATABASE_PASSWORD", env.pg.password.as_str()),
    ];
    for job in ["fromenv", "tables", "dataonly"] {
        let run = run_backstop_with(&cfg, &["backup", "--job", job], &envs).await;
        run.assert_ok();
        assert!(!run.all().contains(&env.pg.password));
    }
    let fromenv = manifest(&env.only_backup("fromenv"));
    assert_eq!(
        manifest_rows(&fromenv),
        BTreeMap::from([("reporting.daily".to_string(), 40)])
    );
    assert!(!fromenv.to_string().contains(&env.pg.password));
    let tables = manifest(&env.only_backup("tables"));
    let names: Vec<String> = manifest_rows(&tables).into_keys().collect();
    assert_eq!(names, ["public.orders", "public.users"]);
    let data = manifest(&env.only_backup("dataonly"));
    assert_eq!(data["dump"]["scope"], "data");
    // A data-only archive holds no table definitions: stock pg_restore --list.
    let listing = crate::harness::sh(&format!(
        "age -d -i '{}' < '{}' | zstd -d -q > '{out}' && pg_restore --list '{out}'",
        env.identity.display(),
        env.only_backup("dataonly")
            .join("database.dump.zst.age")
            .display(),
        out = env.path("data.dump").display()
    ));
    listing.assert_ok();
    assert!(
        listing.stdout.contains("TABLE DATA public orders"),
        "{}",
        listing.stdout
    );
    assert!(
        !listing.stdout.contains(" TABLE public orders "),
        "{}",
        listing.stdout
    );
    // Without the variable: a clear error naming it, exit 2.
    let missing = run_backstop_with(&cfg, &["backup", "--job", "fromenv"], &[]).await;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(
        missing.stderr.contains("APP_DATABASE_URL"),
        "{}",
        missing.stderr
    );
}

/// `anomaly = { min_ratio = … }` moves the guard's threshold: a backup at
/// about 60 % of the usual size is suspect at 0.8 and fine at 0.5 (the
/// default), and `0` turns the guard off.
#[tokio::test(flavor = "multi_thread")]
async fn anomaly_min_ratio_is_honoured() {
    let env = Env::new().await;
    env.pg
        .execute(
            "marketplace",
            "CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 20000) g;",
        )
        .await;
    let jobs = |ratio: &str| {
        format!(
            "{}{}{}",
            env.job(
                "strict",
                "marketplace",
                &format!("anomaly = {{ min_ratio = {ratio} }}")
            ),
            env.job("default", "marketplace", ""),
            env.job("off", "marketplace", "anomaly = { min_ratio = 0 }"),
        )
    };
    env.write_config(&jobs("0.8"));
    for _ in 0..3 {
        for job in ["strict", "default", "off"] {
            env.backstop(&["backup", "--job", job]).await.assert_ok();
        }
    }
    // 8,000 of about 25,800 rows go (and most of the dump's bytes): about
    // 69 % of the median is left.
    env.pg
        .execute("marketplace", "DELETE FROM filler WHERE id % 5 < 2;")
        .await;
    let suspect = |job: &'static str| {
        let env = &env;
        async move {
            let r = env.backstop(&["backup", "--job", job]).await;
            r.assert_ok();
            let list = env.backstop(&["list", "--job", job, "--json"]).await;
            let v: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
            v[0].get("suspect")
                .and_then(Value::as_str)
                .map(str::to_string)
        }
    };
    let strict = suspect("strict").await;
    assert!(
        strict
            .as_deref()
            .is_some_and(|s| s.contains("of the median")),
        "{strict:?}"
    );
    assert_eq!(suspect("default").await, None);
    // Far smaller still: the default catches it, the guard that is off does not.
    env.pg
        .execute(
            "marketplace",
            "TRUNCATE filler, comments, discussions CASCADE;",
        )
        .await;
    assert!(suspect("default").await.is_some());
    assert_eq!(suspect("off").await, None);
}

/// `--log-format json`: every line a one-shot command logs is one JSON
/// object with a level and a message.
#[tokio::test(flavor = "multi_thread")]
async fn log_format_json_prints_one_json_object_per_line() {
    let env = Env::new().await;
    let cfg = env.write_config(&env.job("app", "marketplace", ""));
    let ok = run_backstop_with(
        &cfg,
        &["--log-format", "json", "backup", "--job", "app"],
        &[],
    )
    .await;
    ok.assert_ok();
    // An unreadable manifest is warned about as a log event too (it was a
    // bare "warning:" line that broke the JSON stream).
    let bogus = env.store().join("app").join("2026-01-01T00-00-00Z-0000");
    std::fs::create_dir_all(&bogus).unwrap();
    std::fs::write(bogus.join("manifest.json"), b"{ not json").unwrap();
    let verify = run_backstop_with(
        &cfg,
        &["--log-format", "json", "verify", "--job", "app"],
        &[],
    )
    .await;
    verify.assert_ok();
    assert!(
        verify
            .stderr
            .contains("Ignoring objects in the store that are not trusted")
            && verify.stderr.contains("it is not a manifest"),
        "{}",
        verify.stderr
    );
    let mut env2 = env;
    env2.pg.stop();
    let bad = run_backstop_with(
        &cfg,
        &["--log-format", "json", "backup", "--job", "app"],
        &[],
    )
    .await;
    assert_eq!(bad.code, Some(1));
    let mut lines = 0;
    for run in [&ok, &verify, &bad] {
        for line in run.stderr.lines().filter(|l| !l.trim().is_empty()) {
            // The final error line is for the human at the terminal.
            if line.starts_with("error:") {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{}", run.stderr));
            assert!(
                v["level"].is_string() && v["fields"]["message"].is_string(),
                "{line}"
            );
            lines += 1;
        }
    }
    assert!(lines >= 3, "{}\n{}", ok.stderr, bad.stderr);
    env2.pg.restart();
}

/// The API token must be at least 16 characters: a short one is refused
/// with its position and without being echoed.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_api_token_is_refused() {
    let env = Env::new().await;
    let token = env.path("token");
    write_private(&token, "short-tok\n");
    let cfg = env.path("backstop.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            env.header().replacen(
                "[daemon]\n",
                &format!("[daemon]\napi_token_file = \"{}\"\n", token.display()),
                1
            ),
            env.job("app", "marketplace", "")
        ),
    )
    .unwrap();
    let r = env.backstop(&["check-config"]).await;
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("backstop.toml:2:"), "{}", r.stderr);
    assert!(r.stderr.contains("16"), "{}", r.stderr);
    assert!(!r.all().contains("short-tok"));
}
