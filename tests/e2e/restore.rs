//! `backstop restore`, `download` and `verify --level decrypt|restore|
//! --against-live` against real PostgreSQL (and S3), checked with SQL.
//!
//! Length: one test per restore/verify promise, sharing one set of fixtures.

use std::collections::BTreeMap;

use backstop_config::Filters;
use backstop_dump::{Inventory, PgTarget};

use crate::harness::s3::S3Server;
use crate::harness::{Env, manifest, sh, walk_all};

/// The inventory of `db` with exact row counts, read by the code backstop uses.
async fn inventory(env: &Env, db: &str) -> Inventory {
    let target = PgTarget::new(&env.pg.url(db), Some(&env.pg.password)).unwrap();
    backstop_dump::live_inventory(&target, &Filters::default())
        .await
        .unwrap()
}

fn counts(inv: &Inventory) -> [u64; 6] {
    [
        inv.tables,
        inv.indexes,
        inv.functions,
        inv.triggers,
        inv.policies,
        inv.extensions,
    ]
}

/// A digest of every row of `table`, to compare data and not just counts.
async fn table_digest(env: &Env, db: &str, table: &str) -> String {
    let mut c = env.pg.connect(db).await;
    let sql = format!(
        "SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), 'empty') FROM {table} t"
    );
    let (d,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut c)
        .await
        .unwrap();
    d
}

async fn scalar(env: &Env, db: &str, sql: &str) -> i64 {
    let mut c = env.pg.connect(db).await;
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut c)
        .await
        .unwrap();
    n
}

impl Env {
    /// `backstop restore --job JOB --target <db on the test cluster>` plus `args`.
    async fn restore(&self, job: &str, db: &str, args: &[&str]) -> crate::harness::Run {
        let url = self.pg.url(db);
        let pw = self.password_file.display().to_string();
        let mut all = vec![
            "restore",
            "--job",
            job,
            "--target",
            &url,
            "--target-password-file",
            &pw,
        ];
        all.extend_from_slice(args);
        self.backstop(&all).await
    }

    fn id(&self) -> String {
        self.identity.display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn full_restore_from_s3_with_globals_equals_the_source_and_refuses_a_busy_target() {
    let env = Env::new().await;
    let s3 = S3Server::start();
    env.pg
        .execute("postgres", "CREATE ROLE reporting NOLOGIN")
        .await;
    env.write_config_with_s3(
        &s3,
        "",
        &env.job_to("app", "marketplace", &["offsite"], "globals = true"),
    );
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    env.pg.execute("postgres", "DROP ROLE reporting").await;

    let id = env.id();
    let r = env
        .restore(
            "app",
            "restored",
            &["--create-db", "--globals", "--identity", &id],
        )
        .await;
    r.assert_ok();
    assert!(
        r.stdout.contains("into database \"restored\"")
            && r.stdout.contains("(created)")
            && r.stdout.contains("roles applied")
            && r.stdout.contains("every byte matched"),
        "{}",
        r.stdout
    );
    // Roles came back from the globals artifact; existing ones were kept.
    assert_eq!(
        scalar(
            &env,
            "postgres",
            "SELECT count(*) FROM pg_roles WHERE rolname IN ('reporting', 'marketplace_app')"
        )
        .await,
        2
    );
    let src = inventory(&env, "marketplace").await;
    let dst = inventory(&env, "restored").await;
    assert_eq!(counts(&dst), [8, 31, 4, 6, 4, 3]);
    assert_eq!(counts(&dst), counts(&src));
    assert_eq!(dst.per_table, {
        let mut s = src.per_table.clone();
        // Sizes differ after a reload; rows and names must not.
        for (a, b) in s.iter_mut().zip(&dst.per_table) {
            a.bytes = b.bytes;
        }
        s
    });
    for t in ["public.orders", "public.users", "public.comments"] {
        assert_eq!(
            table_digest(&env, "restored", t).await,
            table_digest(&env, "marketplace", t).await,
            "{t}"
        );
    }

    // A database holding something else is refused, and left exactly as it was.
    env.pg.create_db("busy").await;
    env.pg
        .execute(
            "busy",
            "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (1)",
        )
        .await;
    let refused = env.restore("app", "busy", &["--identity", &id]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("database \"busy\" is not empty")
            && refused.stderr.contains("public.keep_me")
            && refused.stderr.contains("--clean"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        scalar(&env, "busy", "SELECT count(*) FROM keep_me").await,
        1
    );
    assert_eq!(
        scalar(
            &env,
            "busy",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        1,
        "nothing was restored into the busy database"
    );

    // A database that does not exist is refused without --create-db.
    let missing = env.restore("app", "nowhere", &["--identity", &id]).await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("pass --create-db"),
        "{}",
        missing.stderr
    );

    // With --clean the restore replaces the backup's objects.
    env.pg
        .execute("restored", "DELETE FROM order_items; DELETE FROM orders")
        .await;
    env.restore(
        "app",
        "restored",
        &["--clean", "--if-exists", "--identity", &id],
    )
    .await
    .assert_ok();
    assert_eq!(
        env.pg.row_counts("restored").await,
        env.pg.row_counts("marketplace").await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn schema_only_then_single_table_data_restore() {
    let env = Env::new().await;
    let id = env.id();
    env.write_config(&env.job("app", "marketplace", &format!("identity_file = \"{id}\"")));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();

    // Schema only: every object, no rows. The identity comes from the job.
    env.restore("app", "partial", &["--create-db", "--schema-only"])
        .await
        .assert_ok();
    let inv = inventory(&env, "partial").await;
    assert_eq!(
        counts(&inv),
        [8, 31, 4, 6, 4, 3],
        "policies, functions, triggers recreated"
    );
    assert!(inv.per_table.iter().all(|t| t.rows == Some(0)));
    assert_eq!(
        scalar(
            &env,
            "partial",
            "SELECT count(*) FROM pg_policies WHERE policyname = 'otp_own_phone'"
        )
        .await,
        1
    );

    // Data of one table with foreign keys, parents absent: pg_restore's error
    // is a failure, and the single transaction leaves nothing behind.
    let fk = env
        .restore(
            "app",
            "partial",
            &["--table", "public.orders", "--data-only"],
        )
        .await;
    assert_eq!(fk.code, Some(1), "{fk:?}");
    assert!(
        fk.stderr.contains("pg_restore failed") && fk.stderr.contains("foreign key"),
        "{}",
        fk.stderr
    );
    assert_eq!(
        scalar(&env, "partial", "SELECT count(*) FROM orders").await,
        0
    );

    // With triggers disabled, only that table gets rows.
    env.restore(
        "app",
        "partial",
        &[
            "--table",
            "public.orders",
            "--data-only",
            "--disable-triggers",
        ],
    )
    .await
    .assert_ok();
    let rows = env.pg.row_counts("partial").await;
    let source = env.pg.row_counts("marketplace").await;
    for (t, n) in &rows {
        if t == "public.orders" {
            assert_eq!(*n, source[t]);
            assert!(*n > 0);
        } else {
            assert_eq!(*n, 0, "{t} should be empty");
        }
    }
    assert_eq!(
        table_digest(&env, "partial", "public.orders").await,
        table_digest(&env, "marketplace", "public.orders").await
    );

    // Again: orders now holds rows, so the data-only restore is refused.
    let again = env
        .restore(
            "app",
            "partial",
            &[
                "--table",
                "public.orders",
                "--data-only",
                "--disable-triggers",
            ],
        )
        .await;
    assert_eq!(again.code, Some(1));
    assert!(
        again
            .stderr
            .contains("public.orders in database \"partial\" already hold rows"),
        "{}",
        again.stderr
    );
    // And a table restore over an existing table is refused without --clean.
    let exists = env
        .restore("app", "partial", &["--table", "public.users"])
        .await;
    assert_eq!(exists.code, Some(1));
    assert!(
        exists.stderr.contains("public.users already exist"),
        "{}",
        exists.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_restore_equals_serial_and_leaves_no_temp_file() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", ""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let id = env.id();
    let tmp = env.path("restore-tmp");
    std::fs::create_dir(&tmp).unwrap();
    let tmp_s = tmp.display().to_string();
    env.restore("app", "serial", &["--create-db", "--identity", &id])
        .await
        .assert_ok();
    let par = env
        .restore(
            "app",
            "parallel",
            &[
                "--create-db",
                "--identity",
                &id,
                "--jobs",
                "2",
                "--temp-dir",
                &tmp_s,
            ],
        )
        .await;
    par.assert_ok();
    assert!(par.stderr.contains("private temp file"), "{}", par.stderr);
    assert!(
        walk_all(&tmp).is_empty(),
        "temp file left: {:?}",
        walk_all(&tmp)
    );
    assert_eq!(
        counts(&inventory(&env, "parallel").await),
        counts(&inventory(&env, "serial").await)
    );
    assert_eq!(
        env.pg.row_counts("parallel").await,
        env.pg.row_counts("serial").await
    );
    for t in ["public.orders", "public.vegetables", "public.guest_orders"] {
        assert_eq!(
            table_digest(&env, "parallel", t).await,
            table_digest(&env, "serial", t).await
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_format_restores_with_psql_and_refuses_selective_options() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", "format = \"plain\""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let id = env.id();
    env.restore("app", "fromsql", &["--create-db", "--identity", &id])
        .await
        .assert_ok();
    assert_eq!(
        env.pg.row_counts("fromsql").await,
        env.pg.row_counts("marketplace").await
    );
    let sel = env
        .restore(
            "app",
            "other",
            &["--create-db", "--identity", &id, "--table", "public.orders"],
        )
        .await;
    assert_eq!(sel.code, Some(2), "{sel:?}");
    assert!(sel.stderr.contains("plain SQL dump"), "{}", sel.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_failures_change_nothing() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", ""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();

    // No identity anywhere: exit 2 before touching the target.
    let no_id = env.restore("app", "r1", &["--create-db"]).await;
    assert_eq!(no_id.code, Some(2), "{no_id:?}");
    assert!(
        no_id.stderr.contains("pass --identity FILE"),
        "{}",
        no_id.stderr
    );
    assert_eq!(
        scalar(
            &env,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'r1'"
        )
        .await,
        0
    );

    // A password in --target is refused (it would be visible in ps).
    let url = env.pg.url("r1").replace("postgres@", "postgres:hunter2@");
    let pw = env
        .backstop(&["restore", "--job", "app", "--target", &url])
        .await;
    assert_eq!(pw.code, Some(2));
    assert!(
        pw.stderr.contains("--target contains a password"),
        "{}",
        pw.stderr
    );
    assert!(!pw.all().contains("hunter2"));

    // Under systemd the identity comes from LoadCredential=age-identity:….
    let creds = env.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(&env.identity, creds.join("age-identity")).unwrap();
    let url = env.pg.url("fromcred");
    let pw_file = env.password_file.display().to_string();
    let cred = crate::harness::run_backstop_with(
        &env.path("backstop.toml"),
        &[
            "restore",
            "--job",
            "app",
            "--target",
            &url,
            "--target-password-file",
            &pw_file,
            "--create-db",
        ],
        &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
    )
    .await;
    cred.assert_ok();
    assert_eq!(
        env.pg.row_counts("fromcred").await,
        env.pg.row_counts("marketplace").await
    );

    // A wrong identity fails at the age header, before anything is restored.
    let other = env.path("other-identity.txt");
    sh(&format!("age-keygen -o '{}' 2>/dev/null", other.display())).assert_ok();
    let other_s = other.display().to_string();
    let wrong = env
        .restore("app", "r2", &["--create-db", "--identity", &other_s])
        .await;
    assert_eq!(wrong.code, Some(1), "{wrong:?}");
    assert!(wrong.stderr.contains("cannot decrypt"), "{}", wrong.stderr);
    assert_eq!(
        scalar(
            &env,
            "r2",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        0
    );

    // A flipped byte in the middle of the stored artifact: age refuses the
    // chunk, pg_restore is killed before it can commit.
    let art = env.only_backup("app").join("database.dump.zst.age");
    let len = std::fs::metadata(&art).unwrap().len();
    crate::verify::flip_byte(&art, len / 2);
    let id = env.id();
    let bad = env
        .restore("app", "r3", &["--create-db", "--identity", &id])
        .await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(
        bad.stderr.contains("reading the backup failed"),
        "{}",
        bad.stderr
    );
    assert_eq!(
        scalar(
            &env,
            "r3",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        .await,
        0,
        "a partial restore was committed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn download_as_stored_and_decrypted() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", "globals = true"));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let dir = env.only_backup("app");
    let m = manifest(&dir);
    let db = &m["artifacts"][0];

    let raw = env.path("db.dump.zst.age");
    let raw_s = raw.display().to_string();
    env.backstop(&["download", "--job", "app", "--out", &raw_s])
        .await
        .assert_ok();
    let sum = sh(&format!("sha256sum '{raw_s}' | cut -d' ' -f1"));
    assert_eq!(sum.stdout.trim(), db["stored_sha256"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&raw).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Stock tools read it (pg_restore --list stops reading after the TOC,
    // so decompress to a file rather than into a pipe it would close).
    let toc = sh(&format!(
        "age -d -i '{}' '{raw_s}' | zstd -d -q -o '{raw_s}.plain' && pg_restore --list '{raw_s}.plain'",
        env.identity.display()
    ));
    toc.assert_ok();
    assert!(toc.stdout.contains("TABLE public orders"), "{}", toc.stdout);

    // An existing file is not replaced without --force.
    let exists = env
        .backstop(&["download", "--job", "app", "--out", &raw_s])
        .await;
    assert_eq!(exists.code, Some(2));
    assert!(exists.stderr.contains("--force"), "{}", exists.stderr);

    let plain = env.path("db.dump");
    let plain_s = plain.display().to_string();
    let id = env.id();
    env.backstop(&[
        "download",
        "--job",
        "app",
        "--out",
        &plain_s,
        "--decrypt",
        "--identity",
        &id,
    ])
    .await
    .assert_ok();
    let sum = sh(&format!("sha256sum '{plain_s}' | cut -d' ' -f1"));
    assert_eq!(sum.stdout.trim(), db["plain_sha256"].as_str().unwrap());
    let g = env.path("globals.sql");
    let g_s = g.display().to_string();
    env.backstop(&[
        "download",
        "--job",
        "app",
        "--artifact",
        "globals",
        "--out",
        &g_s,
        "--decrypt",
        "--identity",
        &id,
    ])
    .await
    .assert_ok();
    assert!(
        std::fs::read_to_string(&g)
            .unwrap()
            .contains("CREATE ROLE marketplace_app")
    );

    // A damaged artifact: the download fails and leaves nothing.
    crate::verify::flip_byte(&dir.join("database.dump.zst.age"), 100);
    let out = env.path("bad.dump");
    let out_s = out.display().to_string();
    let bad = env
        .backstop(&["download", "--job", "app", "--out", &out_s])
        .await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(bad.stderr.contains("stored sha256"), "{}", bad.stderr);
    let left: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("bad.dump"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_verify_detects_a_wrong_identity_and_a_truncated_object() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", "globals = true"));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let dir = env.only_backup("app");
    let backup_id = manifest(&dir)["backup_id"].as_str().unwrap().to_string();
    let id = env.id();

    let ok = env
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "decrypt",
            "--identity",
            &id,
        ])
        .await;
    ok.assert_ok();
    assert!(
        ok.stdout.contains(&format!(
            "local: {backup_id} decrypt OK: 2 artifact(s) match"
        )),
        "{}",
        ok.stdout
    );
    let list = env.backstop(&["list", "--job", "app"]).await;
    assert!(
        list.stdout.contains("VERIFIED") && list.stdout.contains("decrypt 20"),
        "{}",
        list.stdout
    );

    let other = env.path("other-identity.txt");
    sh(&format!("age-keygen -o '{}' 2>/dev/null", other.display())).assert_ok();
    let other_s = other.display().to_string();
    let wrong = env
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "decrypt",
            "--identity",
            &other_s,
        ])
        .await;
    assert_eq!(wrong.code, Some(1), "{wrong:?}");
    assert!(
        wrong.stdout.contains("decrypt FAILED") && wrong.stdout.contains("cannot decrypt"),
        "{}",
        wrong.stdout
    );
    let list = env.backstop(&["list", "--job", "app", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(v[0]["last_verification"]["level"], "decrypt");
    assert_eq!(v[0]["last_verification"]["ok"], false);

    // Truncated by one age chunk's worth: size, and the stream, are wrong.
    let art = dir.join("database.dump.zst.age");
    let len = std::fs::metadata(&art).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&art)
        .unwrap()
        .set_len(len - 20)
        .unwrap();
    let cut = env
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "decrypt",
            "--identity",
            &id,
            "--json",
        ])
        .await;
    assert_eq!(cut.code, Some(1), "{cut:?}");
    let v: serde_json::Value = serde_json::from_str(&cut.stdout).unwrap();
    let db = &v[0]["result"]["artifacts"][0];
    assert_eq!(db["ok"], false);
    assert!(
        db["problem"]
            .as_str()
            .unwrap()
            .contains("database.dump.zst.age"),
        "{db}"
    );
    assert_eq!(v[0]["result"]["artifacts"][1]["ok"], true, "globals intact");
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_verify_passes_then_reports_tampered_counts_and_always_drops_its_scratch_database()
{
    let env = Env::new().await;
    let id = env.id();
    // The scheduled-verify settings are what `verify --level restore` uses.
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "verify = {{ schedule = \"0 5 * * sun\", level = \"restore\", target = \"{}\", target_password_file = \"{}\", identity_file = \"{id}\" }}",
            env.pg.url("postgres"),
            env.password_file.display()
        ),
    ));
    env.backstop(&["check-config"]).await.assert_ok();
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let scratch_dbs = "SELECT count(*) FROM pg_database WHERE datname LIKE 'backstop_verify_%'";

    let ok = env
        .backstop(&["verify", "--job", "app", "--level", "restore"])
        .await;
    ok.assert_ok();
    assert!(
        ok.stdout
            .contains("restore OK: restored; inventory and row counts match the manifest")
            && ok.stdout.contains("scratch database backstop_verify_app_"),
        "{}",
        ok.stdout
    );
    assert_eq!(scalar(&env, "postgres", scratch_dbs).await, 0);
    let list = env.backstop(&["list", "--job", "app"]).await;
    assert!(list.stdout.contains("restore 20"), "{}", list.stdout);

    // Tamper with the manifest's counts: the restore no longer matches it.
    let dir = env.only_backup("app");
    let path = dir.join("manifest.json");
    let mut m = manifest(&dir);
    for t in m["inventory"]["per_table"].as_array_mut().unwrap() {
        if t["name"] == "orders" {
            t["rows"] = serde_json::json!(t["rows"].as_u64().unwrap() + 1);
        }
    }
    m["inventory"]["policies"] = serde_json::json!(5);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let orders: BTreeMap<String, i64> = env.pg.row_counts("marketplace").await;
    let n = orders["public.orders"];
    let bad = env
        .backstop(&["verify", "--job", "app", "--level", "restore"])
        .await;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(
        bad.stdout.contains("restore FAILED")
            && bad.stdout.contains(&format!(
                "table public.orders rows: manifest {}, restored {n}",
                n + 1
            ))
            && bad.stdout.contains("policies: manifest 5, restored 4"),
        "{}",
        bad.stdout
    );
    assert_eq!(
        scalar(&env, "postgres", scratch_dbs).await,
        0,
        "scratch database left after a failure"
    );

    // A restore that fails outright (a wrong identity) also drops it.
    let other = env.path("other-identity.txt");
    sh(&format!("age-keygen -o '{}' 2>/dev/null", other.display())).assert_ok();
    let other_s = other.display().to_string();
    let failed = env
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "restore",
            "--identity",
            &other_s,
        ])
        .await;
    assert_eq!(failed.code, Some(1));
    assert!(
        failed.stdout.contains("cannot decrypt"),
        "{}",
        failed.stdout
    );
    assert_eq!(scalar(&env, "postgres", scratch_dbs).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn against_live_reports_row_count_changes() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", ""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let same = env
        .backstop(&["verify", "--job", "app", "--against-live"])
        .await;
    same.assert_ok();
    assert!(same.stdout.contains("no differences"), "{}", same.stdout);

    let before = env.pg.row_counts("marketplace").await["public.otp_verifications"];
    env.pg
        .execute(
            "marketplace",
            "INSERT INTO otp_verifications (phone, otp_code, expires_at) SELECT phone, otp_code, expires_at FROM otp_verifications LIMIT 2",
        )
        .await;
    env.pg
        .execute("marketplace", "CREATE TABLE added (x int)")
        .await;
    let diff = env
        .backstop(&["verify", "--job", "app", "--against-live"])
        .await;
    assert_eq!(diff.code, Some(1), "{diff:?}");
    assert!(
        diff.stdout.contains(&format!(
            "table public.otp_verifications rows: backup {before}, live {}",
            before + 2
        )) && diff
            .stdout
            .contains("table public.added: in live, not in backup")
            && diff.stdout.contains("tables: backup 8, live 9"),
        "{}",
        diff.stdout
    );
}

/// The target's password reaches pg_restore only through its environment.
#[tokio::test(flavor = "multi_thread")]
async fn restore_password_reaches_pg_restore_only_through_its_environment() {
    let env = Env::new().await;
    let bin = env.path("bin");
    std::fs::create_dir(&bin).unwrap();
    let real = crate::harness::pg::pg_bin();
    std::os::unix::fs::symlink(real.join("pg_dump"), bin.join("pg_dump")).unwrap();
    let log = env.path("argv.log");
    crate::harness::argv_recorder(&bin.join("pg_restore"), &real.join("pg_restore"), &log);
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!("pg_bin_dir = \"{}\"", bin.display()),
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let id = env.id();
    let r = env
        .restore("app", "copy", &["--create-db", "--identity", &id])
        .await;
    r.assert_ok();
    let argv = std::fs::read_to_string(&log).unwrap();
    assert!(
        argv.contains("--single-transaction")
            && argv.contains("--dbname=postgres://postgres@127.0.0.1"),
        "{argv}"
    );
    assert!(argv.contains("PGPASSWORD-set"), "{argv}");
    assert!(!argv.contains(&env.pg.password), "password in argv: {argv}");
    assert!(!r.all().contains(&env.pg.password));
    assert_eq!(
        env.pg.row_counts("copy").await,
        env.pg.row_counts("marketplace").await
    );

    // Regression (issue 12, item 5): a password in the URL's query string
    // reached pg_restore's argv. Now it is refused before anything runs.
    std::fs::remove_file(&log).unwrap();
    let leaky = format!("{}?password={}", env.pg.url("copy2"), env.pg.password);
    let r = env
        .backstop(&[
            "restore",
            "--job",
            "app",
            "--target",
            &leaky,
            "--create-db",
            "--identity",
            &id,
        ])
        .await;
    r.assert_failed();
    assert!(
        r.stderr.contains("password= query parameter"),
        "{}",
        r.stderr
    );
    assert!(!r.all().contains(&env.pg.password), "{}", r.all());
    assert!(!log.exists(), "pg_restore ran with the password in its URL");
    // The same URL in the config is refused by check-config at its position.
    let text = std::fs::read_to_string(env.path("backstop.toml")).unwrap();
    std::fs::write(
        env.path("backstop.toml"),
        text.replace(
            &env.pg.url("marketplace"),
            &format!("{}?password=inline-s3cret", env.pg.url("marketplace")),
        ),
    )
    .unwrap();
    let c = env.backstop(&["check-config"]).await;
    c.assert_failed();
    assert!(
        c.stderr
            .contains("database.url has a password= query parameter")
            && c.stderr.contains("backstop.toml:"),
        "{}",
        c.stderr
    );
    assert!(!c.all().contains("inline-s3cret"));
}

/// Regression (issue 12, item 11): `verify --level restore` and
/// `--against-live` counted a partitioned parent with all its partitions
/// (and an inheritance parent with its children), so every good backup of
/// such a database failed verification ("rows: manifest 0, restored 3000").
#[tokio::test(flavor = "multi_thread")]
async fn every_verify_level_passes_on_partitions_inheritance_and_mixed_case_names() {
    let env = Env::new().await;
    env.pg.shapes("marketplace");
    let id = env.id();
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "globals = true\nverify = {{ schedule = \"0 5 * * sun\", level = \"restore\", target = \"{}\", target_password_file = \"{}\", identity_file = \"{id}\" }}",
            env.pg.url("postgres"),
            env.password_file.display()
        ),
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();

    // The manifest counts each relation as pg_dump copied it: parents of
    // partitions hold nothing, an inheritance parent only its own rows.
    let m = manifest(&env.only_backup("app"));
    let rows = |schema: &str, name: &str| {
        m["inventory"]["per_table"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["schema"] == schema && t["name"] == name)
            .unwrap_or_else(|| panic!("{schema}.{name} not in the manifest"))["rows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(m["row_counts"], "exact");
    assert_eq!(rows("sales", "orders"), 0);
    let partitions: u64 = ["orders_2026_01", "orders_2026_02", "orders_default"]
        .iter()
        .map(|p| rows("sales", p))
        .sum();
    assert_eq!(partitions, 3000);
    assert!(
        rows("sales", "orders_default") > 0,
        "the default partition holds rows"
    );
    assert_eq!(
        rows("sales", "shipments_eu"),
        0,
        "a sub-partitioned partition"
    );
    assert_eq!(
        rows("sales", "shipments_eu_0") + rows("sales", "shipments_eu_1"),
        600
    );
    assert_eq!(rows("public", "events"), 400, "the parent's own rows only");
    assert_eq!(rows("public", "events_audit"), 250);
    assert_eq!(
        rows("public", "session_cache"),
        150,
        "an unlogged table is dumped"
    );
    assert!(rows("Reporting", "DailyTotals") > 0);

    for level in ["checksum", "decrypt", "restore"] {
        let r = env
            .backstop(&[
                "verify",
                "--job",
                "app",
                "--level",
                level,
                "--identity",
                &id,
            ])
            .await;
        r.assert_ok();
        assert!(
            r.stdout.contains(&format!("{level} OK")),
            "{level}: {}",
            r.stdout
        );
    }
    let live = env
        .backstop(&["verify", "--job", "app", "--against-live"])
        .await;
    live.assert_ok();
    assert!(live.stdout.contains("no differences"), "{}", live.stdout);

    // A real restore equals the source, relation by relation, and the
    // materialized view and the large object come back.
    env.restore("app", "copy", &["--create-db", "--identity", &id])
        .await
        .assert_ok();
    assert_eq!(
        env.pg.row_counts("copy").await,
        env.pg.row_counts("marketplace").await
    );
    assert_eq!(
        scalar(
            &env,
            "copy",
            "SELECT count(*) FROM \"Reporting\".customer_totals"
        )
        .await,
        37
    );
    assert_eq!(
        scalar(
            &env,
            "copy",
            "SELECT length(lo_get(blob))::int8 FROM attachments WHERE id = 1"
        )
        .await,
        28 * 200
    );
    assert_eq!(
        table_digest(&env, "copy", "sales.orders").await,
        table_digest(&env, "marketplace", "sales.orders").await
    );
}

/// Issue 12, item 8: a manifest is trusted only for its own folder. One
/// altered to point its artifact at another job's object is not listed and
/// cannot be restored; the other job is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_pointing_outside_its_folder_is_not_trusted() {
    let env = Env::new().await;
    env.write_config(&format!(
        "{}{}",
        env.job("app", "marketplace", ""),
        env.job("other", "marketplace", "")
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    env.backstop(&["backup", "--job", "other"])
        .await
        .assert_ok();
    let other_key = manifest(&env.only_backup("other"))["artifacts"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = env.only_backup("app");
    let mut m = manifest(&dir);
    m["artifacts"][0]["key"] = serde_json::json!(other_key);
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();

    let list = env.backstop(&["list", "--job", "app"]).await;
    let id = m["backup_id"].as_str().unwrap();
    let lines: Vec<&str> = list.stdout.lines().filter(|l| l.contains(id)).collect();
    assert!(
        lines.len() == 1
            && lines[0].starts_with(id)
            && lines[0].contains(" UNTRUSTED: ")
            && lines[0].contains("lies outside the backup's folder"),
        "only as UNTRUSTED, with the reason: {list:?}"
    );
    let id = env.id();
    let r = env
        .restore("app", "copy", &["--create-db", "--identity", &id])
        .await;
    r.assert_failed();
    assert_eq!(
        scalar(
            &env,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'copy'"
        )
        .await,
        0,
        "nothing restored"
    );
    // The job whose object it pointed at still lists and verifies.
    env.backstop(&["verify", "--job", "other"])
        .await
        .assert_ok();
}

/// Issue 28, item 11. A scheduled restore check cut off by a shutdown drops
/// its scratch database (before, the dropped future left it on the server
/// for good), and the next check drops the scratch databases a killed
/// process left: older than a day and with nobody connected, never a fresh
/// one, a busy one or one whose name carries no time.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_restore_check_drops_its_scratch_database_and_leftovers_are_swept() {
    let env = Env::new().await;
    let id = env.id();
    // A pg_restore that takes a minute to start: the check is cut off
    // while its scratch database exists.
    let bin = crate::harness::slow_pg_restore_dir(&env, "slow-bin", 60);
    let job = |pg_bin: &str| {
        env.job(
            "app",
            "marketplace",
            &format!(
                "{pg_bin}verify = {{ schedule = \"* * * * * *\", level = \"restore\", target = \"{}\", target_password_file = \"{}\", identity_file = \"{id}\" }}",
                env.pg.url("postgres"),
                env.password_file.display()
            ),
        )
    };
    let config = crate::harness::daemon::daemon_config(&env, "shutdown_grace = \"1s\"", &job(""));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let scratch = || async {
        let mut c = env.pg.connect("postgres").await;
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'backstop\\_verify\\_%' ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        names.into_iter().map(|n| n.0).collect::<Vec<String>>()
    };

    // Leftovers: a day-old one (swept), a day-old one somebody is connected
    // to, a fresh one, and one named by an earlier version (all kept).
    let now = chrono::Utc::now();
    let fresh = format!("backstop_verify_app_{}_beef", now.format("%Y%m%d%H%M%S"));
    let old = format!(
        "backstop_verify_app_{}_abcd",
        (now - chrono::Duration::hours(25)).format("%Y%m%d%H%M%S")
    );
    let busy = "backstop_verify_app_20200101000000_c0de".to_string();
    let legacy = "backstop_verify_app_3f2a9c01".to_string();
    for db in [&fresh, &old, &busy, &legacy] {
        env.pg.create_db(db).await;
    }
    let held = env.pg.connect(&busy).await;
    env.backstop(&["verify", "--job", "app", "--level", "restore"])
        .await
        .assert_ok();
    let mut kept = vec![busy.clone(), fresh.clone(), legacy.clone()];
    kept.sort();
    assert_eq!(
        scratch().await,
        kept,
        "only the idle day-old one is dropped"
    );

    // The daemon's scheduled check, cut off by a shutdown mid-restore.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            &job(""),
            &job(&format!("pg_bin_dir = \"{}\"\n", bin.display())),
        ),
    )
    .unwrap();
    let log = env.path("daemon.log");
    let mut d = crate::harness::daemon::Daemon::start(&config, log.clone());
    d.ready().await;
    crate::harness::daemon::wait_for(
        "the check's scratch database",
        std::time::Duration::from_secs(60),
        || async { scratch().await.len() > kept.len() },
        &log,
    )
    .await;
    let during = scratch().await;
    d.stop().await;
    let after = scratch().await;
    assert_eq!(
        after,
        kept,
        "the cut-off check's scratch database is dropped (during the check: {during:?})\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("Dropped the scratch database of a cancelled restore check."),
        "{log}"
    );
    drop(held);
}
