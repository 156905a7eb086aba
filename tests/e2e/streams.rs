//! Backups in streams (`streams` above 1): the schema in pg_dump's
//! sections, the table data over several connections in one snapshot
//! (the largest tables cut into ctid ranges), restored through backstop
//! (`--jobs`, fed from the store) and through stock tools alone.
//!
//! Length: one test per promise of issue 30, sharing the fixture and the
//! database fingerprint.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::harness::{Env, manifest, sh};

/// Adds to `db` a table several MiB large with a quoted mixed-case name,
/// JSON and text that compress about 6:1, a sequence, indexes and a
/// foreign key pointing at it: what `split_tables_larger_than = "1MiB"`
/// cuts into parts.
async fn big_table(env: &Env, db: &str) {
    env.pg
        .execute(
            db,
            r#"CREATE SCHEMA "Ledger";
            CREATE TABLE "Ledger"."Big Entries" (
                id      bigserial PRIMARY KEY,
                "Account" text NOT NULL,
                memo    text NOT NULL,
                doc     jsonb NOT NULL
            );
            INSERT INTO "Ledger"."Big Entries" ("Account", memo, doc)
            SELECT 'acct-' || (g % 997),
                   'payment ' || g || ' settled against invoice ' || (g * 7 % 100003) || ' on ' || (date '2026-01-01' + g % 300),
                   jsonb_build_object('id', g, 'currency', (ARRAY['EUR','USD','GBP'])[g % 3 + 1],
                                      'lines', jsonb_build_array(g % 17, g % 29, md5(g::text)))
            FROM generate_series(1, 40000) g;
            CREATE INDEX big_entries_account ON "Ledger"."Big Entries" ("Account");
            CREATE TABLE "Ledger".notes (
                id    int PRIMARY KEY,
                entry bigint NOT NULL REFERENCES "Ledger"."Big Entries" (id)
            );
            INSERT INTO "Ledger".notes SELECT g, g * 3 FROM generate_series(1, 500) g;
            SELECT setval('"Ledger"."Big Entries_id_seq"', 40123);
            CREATE TABLE "Ledger"."Größe ""Ω""" (id int PRIMARY KEY, "naïve" text NOT NULL);
            INSERT INTO "Ledger"."Größe ""Ω""" SELECT g, 'crème brûlée n° ' || g FROM generate_series(1, 300) g;
            CREATE TABLE "Ledger"."two
lines" (id int, note text);
            INSERT INTO "Ledger"."two
lines" SELECT g, E'tab\there, backslash \\ and a line\nbreak ' || g FROM generate_series(1, 200) g;
            ANALYZE;"#,
        )
        .await;
}

/// What must come back identically: every relation's rows (an md5 of
/// them in order), sequences, index and constraint definitions, triggers,
/// policies, large objects and the materialized view's rows.
async fn fingerprint(env: &Env, db: &str) -> BTreeMap<String, String> {
    let mut c = env.pg.connect(db).await;
    let mut out = BTreeMap::new();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT schemaname::text, tablename::text FROM pg_tables
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    for (s, t) in tables {
        let q = format!(
            "SELECT count(*)::text || ' ' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') FROM ONLY \"{}\".\"{}\" x",
            s.replace('"', "\"\""),
            t.replace('"', "\"\"")
        );
        let (v,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(q))
            .fetch_one(&mut c)
            .await
            .unwrap();
        out.insert(format!("rows {s}.{t}"), v);
    }
    for (name, q) in [
        (
            "sequences",
            "SELECT schemaname || '.' || sequencename || '=' || coalesce(last_value::text, 'null') FROM pg_sequences",
        ),
        (
            "indexes",
            "SELECT indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "constraints",
            "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "triggers",
            "SELECT tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal",
        ),
        (
            "policies",
            "SELECT schemaname || '.' || tablename || ' ' || policyname || ' ' || cmd || ' ' || coalesce(qual, '') FROM pg_policies",
        ),
        (
            "large objects",
            "SELECT oid::text || ' ' || md5(lo_get(oid)) FROM pg_largeobject_metadata",
        ),
        (
            "materialized views",
            "SELECT schemaname || '.' || matviewname || ' ' || ispopulated::text FROM pg_matviews",
        ),
        (
            "customer_totals",
            "SELECT x::text FROM \"Reporting\".customer_totals x",
        ),
    ] {
        if name == "customer_totals" {
            let (there,): (bool,) =
                sqlx::query_as("SELECT to_regclass('\"Reporting\".customer_totals') IS NOT NULL")
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
            if !there {
                continue;
            }
        }
        let q = format!("SELECT string_agg(v, E'\\n' ORDER BY v) FROM ({q}) AS s(v)");
        let (v,): (Option<String>,) = sqlx::query_as(sqlx::AssertSqlSafe(q))
            .fetch_one(&mut c)
            .await
            .unwrap();
        out.insert(name.to_string(), v.unwrap_or_default());
    }
    out
}

/// The stock-tools recipe for a backup in streams, exactly as
/// docs/manifest.md gives it, pointed at `key` and `url`.
fn documented_recipe(key: &Path, url: &str) -> String {
    let doc = std::fs::read_to_string(crate::harness::repo().join("docs/manifest.md")).unwrap();
    let (_, after) = doc
        .split_once("<!-- recipe: restore in streams -->\n```bash\n")
        .expect("docs/manifest.md has the recipe");
    let (block, _) = after.split_once("```").unwrap();
    let mut script = String::new();
    for line in block.lines() {
        if line.starts_with("KEY=") {
            script.push_str(&format!("KEY='{}'\n", key.display()));
        } else if line.starts_with("DB=") {
            script.push_str(&format!("DB='{url}'\n"));
        } else {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(script.contains("pg_restore") && script.contains("psql"));
    script
}

fn artifacts_of<'a>(m: &'a serde_json::Value, kind: &str) -> Vec<&'a serde_json::Value> {
    m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_in_streams_restores_identically_through_backstop_and_stock_tools() {
    let env = Env::new().await;
    env.pg.shapes("marketplace");
    big_table(&env, "marketplace").await;
    let id = env.identity.display().to_string();
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "streams = 3\nsplit_tables_larger_than = \"1MiB\"\nglobals = true\nverify = {{ schedule = \"0 5 * * sun\", level = \"restore\", target = \"{}\", target_password_file = \"{}\", identity_file = \"{id}\" }}",
            env.pg.url("postgres"),
            env.password_file.display()
        ),
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let dir = env.only_backup("app");
    let m = manifest(&dir);

    // The layout: version 2, the sections, three data streams.
    assert_eq!(m["format_version"], 2);
    assert_eq!(m["dump"]["streams"], 3);
    for kind in ["pre-data", "data-rest", "post-data", "globals"] {
        assert_eq!(artifacts_of(&m, kind).len(), 1, "{kind}: {m}");
    }
    let data = artifacts_of(&m, "data");
    assert_eq!(data.len(), 3);
    // The big table is cut into parts spread over every stream, each part
    // in exactly one, and its rows add up to the table's.
    let mut parts: Vec<u64> = Vec::new();
    let mut rows = 0;
    let mut holders = 0;
    for a in &data {
        for t in a["tables"].as_array().unwrap() {
            if t["name"] == "Big Entries" {
                assert_eq!(t["schema"], "Ledger");
                assert!(t["of"].as_u64().unwrap() > 1, "{t}");
                parts.extend(
                    t["parts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| p.as_u64().unwrap()),
                );
                rows += t["rows"].as_u64().unwrap();
                holders += 1;
            }
        }
    }
    parts.sort_unstable();
    assert_eq!(parts, (1..=parts.len() as u64).collect::<Vec<_>>());
    assert_eq!(holders, 3, "{m}");
    assert_eq!(rows, 40000);
    // Every table's rows, counted in the streams, equal the source's.
    let source_rows = env.pg.row_counts("marketplace").await;
    for t in m["inventory"]["per_table"].as_array().unwrap() {
        let name = format!(
            "{}.{}",
            t["schema"].as_str().unwrap(),
            t["name"].as_str().unwrap()
        );
        assert_eq!(
            t["rows"].as_i64(),
            source_rows.get(&name).copied(),
            "{name}"
        );
    }
    let source = fingerprint(&env, "marketplace").await;
    assert!(source["large objects"].contains(' '), "{source:?}");
    assert!(source["sequences"].contains("Big Entries_id_seq=40123"));

    // Through backstop: every artifact from the store, three connections.
    let r = restore_of(&env, "app", "copy", &["--create-db"]).await;
    r.assert_ok();
    assert!(r.stderr.contains("connections=3"), "{}", r.stderr);
    assert_eq!(fingerprint(&env, "copy").await, source);

    // Through stock tools: the documented recipe, as written.
    env.pg.create_db("stock").await;
    let recipe = documented_recipe(&env.identity, &env.pg.url("stock"));
    std::fs::write(env.path("recipe.sh"), &recipe).unwrap();
    let stock = sh(&format!(
        "cd '{}' && PGPASSWORD='{}' bash '{}'",
        dir.display(),
        env.pg.password,
        env.path("recipe.sh").display()
    ));
    stock.assert_ok();
    assert_eq!(fingerprint(&env, "stock").await, source);

    // download takes any artifact by name; an unknown one lists them.
    let out = env.path("data-01.sql");
    let out_s = out.display().to_string();
    env.backstop(&[
        "download",
        "--job",
        "app",
        "--artifact",
        "data-01",
        "--out",
        &out_s,
        "--decrypt",
        "--identity",
        &id,
    ])
    .await
    .assert_ok();
    let sql = std::fs::read_to_string(&out).unwrap();
    assert!(
        sql.contains(" FROM stdin;\n") && sql.contains("\n\\.\n"),
        "{}",
        &sql[..300]
    );
    let none = env
        .backstop(&[
            "download",
            "--job",
            "app",
            "--artifact",
            "database",
            "--out",
            &format!("{out_s}.none"),
        ])
        .await;
    none.assert_failed();
    assert!(
        none.stderr
            .contains("pre-data, data-01, data-02, data-03, data-rest, post-data, globals"),
        "{}",
        none.stderr
    );

    // verify --level restore goes the same way.
    let v = env
        .backstop(&[
            "verify",
            "--job",
            "app",
            "--level",
            "restore",
            "--identity",
            &id,
        ])
        .await;
    v.assert_ok();
    assert!(v.stdout.contains("restore OK"), "{}", v.stdout);

    // --table: the table (all its parts) and nothing else, into a
    // database that has its schema (pg_restore --table creates no schema).
    env.pg.create_db("one").await;
    env.pg.execute("one", "CREATE SCHEMA \"Ledger\"").await;
    let t = restore_of(
        &env,
        "app",
        "one",
        &["--table", "\"Ledger\".\"Big Entries\""],
    )
    .await;
    t.assert_ok();
    let one = fingerprint(&env, "one").await;
    let restored: Vec<&String> = one.keys().filter(|k| k.starts_with("rows ")).collect();
    assert_eq!(restored, ["rows Ledger.Big Entries"], "{one:?}");
    assert_eq!(
        one["rows Ledger.Big Entries"],
        source["rows Ledger.Big Entries"]
    );
}

/// The LATIN1 test's text, read back as UTF-8.
async fn latin_text(env: &Env, db: &str) -> String {
    let mut c = env.pg.connect(db).await;
    let (a,): (String,) = sqlx::query_as(
        r#"SELECT string_agg("café", '|' ORDER BY n) || (SELECT string_agg("Ä", '|' ORDER BY id) FROM "Straße") FROM "Größe""#,
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    a
}

/// A LATIN1 database: names outside ASCII reach the server in escapes
/// the session's encoding cannot garble, the rows in the database's own
/// encoding, and a restore into a UTF8 database gives back the same text.
#[tokio::test(flavor = "multi_thread")]
async fn a_latin1_database_in_streams_keeps_its_names_and_text() {
    let env = Env::empty().await;
    env.pg
        .execute(
            "postgres",
            "CREATE DATABASE latin WITH ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        )
        .await;
    env.pg
        .execute(
            "latin",
            r#"CREATE TABLE "Größe" (n int PRIMARY KEY, "café" text NOT NULL);
            INSERT INTO "Größe" SELECT g, 'crème brûlée à ' || g || ' fin' FROM generate_series(1, 3000) g;
            CREATE TABLE "Straße" (id int, "Ä" text);
            INSERT INTO "Straße" SELECT g, 'Öl ' || g FROM generate_series(1, 2000) g;"#,
        )
        .await;
    env.write_config(&env.job("latin", "latin", "streams = 2"));
    env.backstop(&["backup", "--job", "latin"])
        .await
        .assert_ok();
    let m = manifest(&env.only_backup("latin"));
    let rows: BTreeMap<String, u64> = m["inventory"]["per_table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["rows"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows["Größe"], 3000, "{rows:?}");
    assert_eq!(rows["Straße"], 2000, "{rows:?}");

    let r = restore_of(&env, "latin", "back", &["--create-db"]).await;
    r.assert_ok();
    let source = latin_text(&env, "latin").await;
    assert!(source.contains("crème brûlée à 17 fin|"), "{source}");
    assert_eq!(latin_text(&env, "back").await, source);
}

/// A stream whose COPY fails (here: a value its type can no longer
/// print) fails the backup at once: the other streams are stopped, no
/// manifest is written and nothing is left in the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_stream_fails_the_backup_and_leaves_nothing() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    env.pg
        .execute(
            "marketplace",
            "CREATE TYPE mood AS ENUM ('ok', 'doomed');
             CREATE TABLE public.moods (id int PRIMARY KEY, m mood NOT NULL);
             INSERT INTO public.moods VALUES (1, 'ok'), (2, 'doomed');
             DELETE FROM pg_enum WHERE enumlabel = 'doomed';",
        )
        .await;
    env.write_config(&env.job(
        "app",
        "marketplace",
        "streams = 3\nsplit_tables_larger_than = \"1MiB\"\nretries = 0",
    ));
    let r = env.backstop(&["backup", "--job", "app"]).await;
    r.assert_failed();
    assert!(
        r.stderr.contains("psql") && r.stderr.contains("invalid internal value for enum"),
        "{}",
        r.stderr
    );
    env.assert_store_empty();
}

/// `backstop restore` of `job` into `db` of the test's cluster, with the
/// test's identity and `extra` arguments.
async fn restore_of(env: &Env, job: &str, db: &str, extra: &[&str]) -> crate::harness::Run {
    let url = env.pg.url(db);
    let pw = env.password_file.display().to_string();
    let id = env.identity.display().to_string();
    let mut args = vec![
        "restore",
        "--job",
        job,
        "--target",
        &url,
        "--target-password-file",
        &pw,
        "--identity",
        &id,
    ];
    args.extend_from_slice(extra);
    env.backstop(&args).await
}

/// A restore that fails part-way (a data stream altered in the store)
/// drops the database it created, and names one it did not create as
/// partly restored.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_restore_drops_what_it_created_and_names_what_it_did_not() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    env.write_config(&env.job(
        "app",
        "marketplace",
        "streams = 2\nsplit_tables_larger_than = \"1MiB\"",
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let dir = env.only_backup("app");
    // One byte of the second data stream flipped, mid-file.
    let victim = dir.join("data-02.sql.zst.age");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    let created = restore_of(&env, "app", "fresh", &["--create-db"]).await;
    created.assert_failed();
    assert!(
        created.stderr.contains("data-02.sql.zst.age"),
        "{}",
        created.stderr
    );
    let mut c = env.pg.connect("postgres").await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_database WHERE datname = 'fresh'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0, "the database this restore created is dropped");

    env.pg.create_db("existing").await;
    let named = restore_of(&env, "app", "existing", &[]).await;
    named.assert_failed();
    assert!(
        named
            .stderr
            .contains("database \"existing\" is partly restored: drop it before restoring again"),
        "{}",
        named.stderr
    );
}

/// `max_source_connections` caps the dump connections a backup opens at
/// once (here 2, for 4 data streams and the schema's): every pg_dump and
/// psql is wrapped to log when it ran, and no more than 2 ever overlap.
#[tokio::test(flavor = "multi_thread")]
async fn max_source_connections_caps_the_dump_connections() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    let real = crate::harness::pg::pg_bin();
    let log = env.path("ran.log");
    let logged = |tool: &str| {
        format!(
            "if [ \"$1\" = --version ]; then exec '{real}/{tool}' \"$@\"; fi\necho \"start $$ $(date +%s%N) {tool} $PGAPPNAME\" >> '{log}'\n'{real}/{tool}' \"$@\"\nrc=$?\necho \"end $$ $(date +%s%N)\" >> '{log}'\nexit $rc",
            real = real.display(),
            log = log.display()
        )
    };
    let bin = crate::harness::wrapped_bin(
        &env,
        &[("pg_dump", logged("pg_dump")), ("psql", logged("psql"))],
    );
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "streams = 4\nsplit_tables_larger_than = \"1MiB\"\nmax_source_connections = 2\npg_bin_dir = \"{}\"",
            bin.display()
        ),
    ));
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let m = manifest(&env.only_backup("app"));
    assert_eq!(artifacts_of(&m, "data").len(), 4);

    let mut events: Vec<(u128, i32)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2].parse().unwrap(), if f[0] == "start" { 1 } else { -1 })
        })
        .collect();
    // Ends before starts at the same instant: a permit is given back
    // before the next tool can start.
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in &events {
        now += d;
        most = most.max(now);
    }
    // 3 pg_dump sections and 4 psql streams, never more than 2 at once.
    assert_eq!(events.len(), 14, "{events:?}");
    assert!((1..=2).contains(&most), "{most} at once: {events:?}");

    // Each lane's sessions carry a name of their own after the backup's
    // (the schema lane 00, the streams 01 to 04), so that one lane's stall
    // watchdog sees its own sessions, not another lane's at work.
    let names: BTreeSet<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("start "))
        .map(|l| l.split(' ').skip(3).collect::<Vec<_>>().join(" "))
        .collect();
    let backup = names
        .iter()
        .find_map(|n| n.strip_prefix("pg_dump ")?.strip_suffix("-00"))
        .unwrap_or_else(|| panic!("no schema lane: {names:?}"))
        .to_string();
    assert!(backup.starts_with("backstop-pg_dump-"), "{names:?}");
    let want: BTreeSet<String> = std::iter::once(format!("pg_dump {backup}-00"))
        .chain((1..=4).map(|n| format!("psql {backup}-{n:02}")))
        .collect();
    assert_eq!(names, want);
}

/// A backup in streams stopped by its timeout while one stream still runs
/// removes what the streams that finished had stored: each key is recorded
/// the moment it commits, not when every stream is done. Failed before the
/// fix: the finished streams' artifacts stayed in the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_removes_what_the_finished_streams_stored() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    // The first data stream's psql waits a minute before it starts.
    let bin = crate::harness::wrapped_bin(
        &env,
        &[(
            "psql",
            format!(
                "if [ \"$1\" != --version ] && mkdir '{lock}' 2>/dev/null; then sleep 60; fi\nexec '{real}/psql' \"$@\"",
                lock = env.path("first-psql").display(),
                real = crate::harness::pg::pg_bin().display()
            ),
        )],
    );
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "streams = 3\nsplit_tables_larger_than = \"1MiB\"\ntimeout = \"5s\"\nretries = 0\npg_bin_dir = \"{}\"",
            bin.display()
        ),
    ));
    let r = env.backstop(&["backup", "--job", "app"]).await;
    r.assert_failed();
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    env.assert_store_empty();
}

/// A cluster job in streams: two databases at once (`parallel`), each over
/// two streams, under a `max_source_connections` smaller than the two
/// multiplied; a drill restores every database the same way into scratch
/// databases, and `restore --all-databases` brings the whole server back
/// onto a new one, identical.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_job_in_streams_comes_back_whole_on_a_new_server() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    env.pg.marketplace("shop").await;
    let id = env.identity.display().to_string();
    env.write_config(&format!(
        "[[job]]\nname = \"prod\"\ndatabase = {{ url = \"{}\", password_file = \"{}\", all = true }}\nstorage = [\"local\"]\nstreams = 2\nsplit_tables_larger_than = \"1MiB\"\nparallel = 2\nmax_source_connections = 3\nidentity_file = \"{id}\"\n",
        env.pg.url("postgres"),
        env.password_file.display()
    ));
    env.backstop(&["backup", "--job", "prod"]).await.assert_ok();
    for db in ["marketplace", "shop"] {
        let m = manifest(&env.only_backup(&format!("prod/{db}")));
        assert_eq!(m["format_version"], 2, "{db}");
        assert_eq!(artifacts_of(&m, "data").len(), 2, "{db}");
    }

    let pw = env.password_file.display().to_string();
    let drill = env
        .backstop(&[
            "drill",
            "--job",
            "prod",
            "--target-server",
            &env.pg.url("postgres"),
            "--target-password-file",
            &pw,
        ])
        .await;
    drill.assert_ok();

    let target = crate::harness::PgCluster::start();
    let target_pw = env.path("target-password");
    crate::harness::write_private(&target_pw, &format!("{}\n", target.password));
    let restored = env
        .backstop(&[
            "restore",
            "--job",
            "prod",
            "--all-databases",
            "--target-server",
            &target.url("postgres"),
            "--target-password-file",
            &target_pw.display().to_string(),
            "--create-db",
        ])
        .await;
    restored.assert_ok();
    assert!(
        restored.stdout.contains("3 of 3 database(s) restored"),
        "{}",
        restored.stdout
    );
    for db in ["marketplace", "shop"] {
        assert_eq!(
            target.row_counts(db).await,
            env.pg.row_counts(db).await,
            "{db}"
        );
    }
}

/// The lock guard watches every session of a backup in streams: a
/// migration's ALTER TABLE queued behind the locks the backup's snapshot
/// holds makes the backup yield (lock_guard = "yield"): its sessions are
/// ended, the ALTER goes through long before the slow streams would have
/// finished, and the failed run leaves nothing in the store.
#[tokio::test(flavor = "multi_thread")]
async fn the_lock_guard_yields_every_stream_to_a_blocked_migration() {
    let env = Env::new().await;
    big_table(&env, "marketplace").await;
    // Each stream's output drains only after 8 s: a long dump.
    let bin = crate::harness::wrapped_bin(
        &env,
        &[(
            "psql",
            format!(
                "if [ \"$1\" = --version ]; then exec '{real}/psql' \"$@\"; fi\nset -o pipefail\n'{real}/psql' \"$@\" | {{ sleep 8; cat; }}",
                real = crate::harness::pg::pg_bin().display()
            ),
        )],
    );
    env.write_config(&env.job(
        "app",
        "marketplace",
        &format!(
            "streams = 2\nlock_guard = {{ mode = \"yield\", max_block = \"1s\" }}\nretries = 0\npg_bin_dir = \"{}\"",
            bin.display()
        ),
    ));
    let waited = crate::guard::yields_to_a_migration(&env, r#""Ledger"."Big Entries""#).await;
    // Every stream's session was ended with the snapshot's (they are named
    // after it): none held its lock until its output drained (8 s).
    assert!(
        waited < Duration::from_secs(5),
        "the ALTER waited {waited:?}: a stream kept its lock"
    );
    env.assert_store_empty();
}
