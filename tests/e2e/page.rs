//! The daemon's status page, as on-call sees it: loaded in headless
//! Chromium from a daemon with a healthy, a failing and a suspect job.

use crate::harness::browser;
use std::time::Duration;

use crate::harness::daemon::{Daemon, daemon_config, http_full, wait_for};
use crate::harness::{Env, pg_dump_wrapper, write_private};

/// The error the failing job's pg_dump prints: markup and quotes that must
/// reach the page as text.
const HOSTILE: &str = r#"<script>alert("pwned")</script> & <img src=x onerror=alert(1)>"#;

/// The `<tr class="job …">` rows of a page, in order: (job, state, row html).
fn job_rows(dom: &str) -> Vec<(String, String, String)> {
    dom.split("<tr class=\"job ")
        .skip(1)
        .map(|chunk| {
            let row = chunk.split("</tr>").next().unwrap().to_string();
            let attr = |name: &str| {
                row.split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_default()
                    .to_string()
            };
            (attr("data-job"), attr("data-state"), row)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser_puts_failing_jobs_first_and_escapes_their_errors() {
    let env = Env::new().await;
    env.pg.create_db("orders").await;
    env.pg
        .execute(
            "orders",
            "CREATE SCHEMA sales; CREATE TABLE sales.\"Orders\" (id bigserial PRIMARY KEY, placed timestamptz DEFAULT now(), doc jsonb)",
        )
        .await;
    env.pg.create_db("events").await;
    env.pg
        .execute(
            "events",
            "CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), body text);
             INSERT INTO audit_log (body) SELECT repeat('login user ' || (g % 977) || ' from 10.0.' || (g % 250) || '.7 ', 8) FROM generate_series(1, 40000) g",
        )
        .await;
    let broken = pg_dump_wrapper(
        &env,
        "broken_pg_dump",
        &format!(
            "echo 'pg_dump: error: {}' >&2\nexit 1",
            HOSTILE.replace('\'', "'\\''")
        ),
    );
    // A webhook whose URL carries a token: it must never reach the page.
    let hook_token = "hook-secret-5f1e2d3c4b5a69788796";
    let notify = format!(
        "[notify.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hook?token={hook_token}\"\non = [\"success\"]\n\n"
    );
    let jobs = format!(
        "{notify}{}{}{}",
        env.job(
            "orders",
            "orders",
            "schedule = \"0 * * * *\"\nrpo = \"2h\"\nrto = \"1h\"\nretention = { keep_last = 20 }\nnotify = [\"hook\"]"
        ),
        env.job("events", "events", "schedule = \"0 3 * * *\"\nretention = { keep_last = 20 }"),
        env.job(
            "billing",
            "marketplace",
            &format!("schedule = \"0 4 * * *\"\nretries = 0\n{broken}")
        ),
    );
    let cfg = daemon_config(&env, "status_page = true", &jobs);
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    // Each scheduled job catches up once at start (billing's fails).
    wait_for(
        "the catch-up runs",
        Duration::from_secs(60),
        || async {
            let (_, _, body) = http_full(d.port, "GET", "/api/v1/status", &[]).await;
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                v["jobs"]
                    .as_array()
                    .is_some_and(|rows| rows.iter().all(|r| !r["last_run_outcome"].is_null()))
            })
        },
        &d.log.clone(),
    )
    .await;

    // 31 backups of a growing orders table: the chart holds the latest 30.
    for i in 0..30 {
        env.pg
            .execute(
                "orders",
                &format!(
                    "INSERT INTO sales.\"Orders\" (doc) SELECT jsonb_build_object('sku', 'SKU-' || (g % 400), 'qty', g % 9, 'note', repeat('gift wrap ', {})) FROM generate_series(1, 300) g",
                    1 + i % 4
                ),
            )
            .await;
        let r = d.run_to_end("orders").await;
        assert_eq!(r["state"], "success", "{r}\n{}", d.log());
    }
    // Events: a few ordinary backups, then one after most rows went.
    for _ in 0..3 {
        assert_eq!(d.run_to_end("events").await["state"], "success");
    }
    env.pg
        .execute("events", "DELETE FROM audit_log WHERE id > 2000")
        .await;
    let r = d.run_to_end("events").await;
    assert_eq!(r["state"], "suspect", "{r}\n{}", d.log());

    // A restore drill of the latest orders backup: its measured time.
    let (server, pw) = (
        env.pg.url("postgres"),
        env.password_file.display().to_string(),
    );
    env.backstop(&[
        "drill",
        "--job",
        "orders",
        "--target-server",
        &server,
        "--target-password-file",
        &pw,
        "--identity",
        &env.identity.display().to_string(),
    ])
    .await
    .assert_ok();

    let base = format!("http://127.0.0.1:{}", d.port);
    let profile = env.path("chromium-profile");
    let dom = browser::dom(&profile, &format!("{base}/"));

    // Attention first (failing, then suspect), the healthy job last.
    let rows = job_rows(&dom);
    let order: Vec<(&str, &str)> = rows
        .iter()
        .map(|(j, s, _)| (j.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            ("billing", "failing"),
            ("events", "suspect"),
            ("orders", "ok")
        ],
        "{dom}"
    );
    // The error is text on the page: escaped, and no element of it exists.
    assert!(
        dom.contains(
            "&lt;script&gt;alert(\"pwned\")&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;"
        ),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    // The healthy job's chart: its latest 30 backups, a dot each.
    let orders = &rows[2].2;
    assert_eq!(
        orders.matches("<circle class=\"size").count(),
        30,
        "{orders}"
    );
    assert!(orders.contains("<svg"), "{orders}");
    assert!(
        orders.contains("local: 20"),
        "20 kept by retention: {orders}"
    );
    assert!(orders.contains("vs median"), "{orders}");
    assert!(orders.contains("(RTO 1h)"), "{orders}");
    assert!(
        !orders.contains("not measured"),
        "the drill's time: {orders}"
    );
    let events = &rows[1].2;
    assert!(events.contains("SUSPECT"), "{events}");
    assert_eq!(
        events.matches("<circle class=\"size").count(),
        5,
        "{events}"
    );
    assert_eq!(events.matches("<circle class=\"size suspect\"").count(), 1);

    // The job pages: backups as `list`, runs with errors, the plan.
    let failing = browser::dom(&profile, &format!("{base}/jobs/billing"));
    assert!(failing.contains("&lt;script&gt;alert("), "{failing}");
    assert!(!failing.contains("<script"), "{failing}");
    assert!(failing.contains("no retention policy"), "{failing}");
    let job = browser::dom(&profile, &format!("{base}/jobs/orders"));
    std::fs::write(browser::artifacts().join("status-job-page.html"), &job).unwrap();
    assert_eq!(job.matches("<tr class=\"backup").count(), 20, "{job}");
    assert_eq!(job.matches("<tr class=\"plan keep\"").count(), 20, "{job}");
    assert!(job.contains("Retention plan"), "{job}");
    // A prune runs after each success: 31 backups (the catch-up and 30), 31 prunes.
    let section = |id: &str| {
        job.split(&format!("<section id=\"{id}\""))
            .nth(1)
            .and_then(|s| s.split("</section>").next())
            .unwrap_or_default()
            .to_string()
    };
    let runs = section("runs");
    assert_eq!(
        runs.matches("<tr class=\"run outcome-success\"").count(),
        62,
        "{runs}"
    );
    assert_eq!(runs.matches(">prune").count(), 31, "{runs}");
    let verifications = section("verifications");
    assert!(verifications.contains("verify drill"), "{verifications}");

    // No secret anywhere: the database password, the API token, the hook's token.
    let (_, _, api) = http_full(d.port, "GET", "/api/v1/status", &[]).await;
    for page in [&dom, &failing, &job, &api] {
        for secret in [env.pg.password.as_str(), d.token.as_str(), hook_token] {
            assert!(!page.contains(secret), "a secret reached the page");
        }
    }

    // /api/v1/status is `backstop status --json`.
    let cli = env.backstop(&["status", "--json"]).await;
    assert_eq!(cli.code, Some(1), "billing fails: {}", cli.all());
    let strip = |mut v: serde_json::Value| {
        assert!(
            v["fleet"].is_null(),
            "a catalog of one host has no fleet: {v}"
        );
        for row in v["jobs"].as_array_mut().unwrap() {
            // Relative to the moment of each call.
            let row = row.as_object_mut().unwrap();
            row.remove("next_run_at");
            row.remove("last_verify");
            // When each listed the stores.
            for store in row["stores"].as_array_mut().unwrap() {
                store.as_object_mut().unwrap().remove("listed_at");
            }
        }
        v
    };
    assert_eq!(
        strip(serde_json::from_str(&api).unwrap()),
        strip(serde_json::from_str(&cli.stdout).unwrap())
    );

    // Served with a policy that allows no script at all.
    let (code, head, _) = http_full(d.port, "GET", "/", &[]).await;
    assert_eq!(code, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'; style-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    let (code, _, missing) = http_full(d.port, "GET", "/jobs/%3Cb%3Enope", &[]).await;
    assert_eq!(code, 404);
    assert!(missing.contains("&lt;b&gt;nope"), "{missing}");

    // Screenshots at desktop and phone widths: test artifacts (the README's come from here).
    let out = browser::artifacts();
    for (name, path, w, h) in [
        ("status-page-desktop.png", "/", 1440, 560),
        ("status-page-phone.png", "/", 390, 1500),
        ("status-job-page-desktop.png", "/jobs/orders", 1280, 1200),
    ] {
        browser::screenshot(&profile, &format!("{base}{path}"), w, h, &out.join(name));
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_off_by_default_and_needs_a_token_off_loopback() {
    let env = Env::empty().await;
    env.pg.create_db("app").await;
    let jobs = env.job("app", "app", "");

    // Off unless asked for.
    let cfg = daemon_config(&env, "", &jobs);
    let mut d = Daemon::start(&cfg, env.path("daemon-off.log"));
    d.ready().await;
    for path in ["/", "/jobs/app", "/api/v1/status", "/static/backstop.css"] {
        let (code, _, body) = http_full(d.port, "GET", path, &[]).await;
        assert_eq!(code, 404, "{path}: {body}");
        assert!(body.contains("daemon.status_page = true"), "{body}");
    }
    d.stop().await;

    // On a listener other than loopback: the read token or the API token.
    let read_token = "read-token-0a1b2c3d4e5f60718293";
    let token_file = env.path("status-token");
    write_private(&token_file, &format!("{read_token}\n"));
    let cfg = daemon_config(
        &env,
        &format!(
            "status_page = true\nstatus_token_file = \"{}\"",
            token_file.display()
        ),
        &jobs,
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("listen = \"127.0.0.1:", "listen = \"0.0.0.0:");
    std::fs::write(&cfg, text).unwrap();
    let mut d = Daemon::start(&cfg, env.path("daemon-on.log"));
    d.ready().await;
    let basic = |user: &str, pass: &str| {
        let out = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(format!("{user}:{pass}").as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        format!("Basic {}", String::from_utf8(out.stdout).unwrap())
    };
    let bearer_api = format!("Bearer {}", d.token);
    let bearer_read = format!("Bearer {read_token}");
    let basic_read = basic("oncall", read_token);
    let basic_wrong = basic("oncall", "not-the-token-at-all");
    for path in ["/", "/jobs/app", "/api/v1/status"] {
        let (code, head, body) = http_full(d.port, "GET", path, &[]).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(
            head.contains("www-authenticate: basic realm=\"backstop status\""),
            "{head}"
        );
        for wrong in [
            basic_wrong.as_str(),
            "Bearer nope-nope-nope-nope",
            "Bearer ",
        ] {
            let (code, _, _) = http_full(d.port, "GET", path, &[("Authorization", wrong)]).await;
            assert_eq!(code, 401, "{path} with {wrong}");
        }
        for good in [&bearer_api, &bearer_read, &basic_read] {
            let (code, _, body) = http_full(d.port, "GET", path, &[("Authorization", good)]).await;
            assert_eq!(code, 200, "{path}: {body}");
            assert!(!body.contains(read_token) && !body.contains(&d.token));
        }
    }
    // The read token reads; it does not run anything.
    let (code, _, _) = http_full(
        d.port,
        "POST",
        "/api/v1/jobs/app/run",
        &[("Authorization", &bearer_read)],
    )
    .await;
    assert_eq!(code, 401);
    d.stop().await;
    assert!(!d.log().contains(read_token), "the read token was logged");
}

/// `job`'s row in the daemon's `/api/v1/status`.
async fn api_row(port: u16, job: &str) -> serde_json::Value {
    let (code, _, body) = http_full(port, "GET", "/api/v1/status", &[]).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["jobs"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["job"] == job).cloned())
        .unwrap_or_else(|| panic!("no row for {job}: {v}"))
}

/// The page and the API serve what the daemon keeps of each job: a run of
/// the daemon's own shows at once; one another process recorded in the
/// catalog (here a one-shot backup) within a round of the reader that keeps
/// every job fresh while someone looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_its_own_runs_at_once_and_anothers_within_a_round() {
    let env = Env::empty().await;
    env.pg.create_db("app").await;
    env.pg.create_db("other").await;
    let jobs = format!(
        "{}{}",
        env.job("app", "app", ""),
        env.job("other", "other", "")
    );
    let cfg = daemon_config(&env, "status_page = true", &jobs);
    let mut d = Daemon::start_with(
        &cfg,
        env.path("daemon.log"),
        &[("BACKSTOP_TEST_STATUS_EVERY_MS", "300".into())],
    );
    d.ready().await;
    let port = d.port;
    let outcome = move |job: &'static str| async move {
        api_row(port, job).await["last_run_outcome"].clone()
    };
    assert!(outcome("app").await.is_null());
    assert!(outcome("other").await.is_null());

    let r = d.run_to_end("app").await;
    assert_eq!(r["state"], "success", "{r}\n{}", d.log());
    assert_eq!(outcome("app").await, "success", "at once: {}", d.log());

    let one_shot = env.backstop(&["backup", "--job", "other"]).await;
    assert_eq!(one_shot.code, Some(0), "{}", one_shot.all());
    wait_for(
        "the page to show the one-shot's backup",
        Duration::from_secs(20),
        || async { outcome("other").await == "success" },
        &d.log.clone(),
    )
    .await;
    d.stop().await;
}

/// The page and `/api/v1/status` never ask a store: they serve the
/// daemon's own listing of each job's stores, made at start and after each
/// of its runs, and made again when the catalog shows a newer backup than
/// the listing holds (another process's), once per such backup. Watched
/// through a proxy that records every store request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_serves_the_daemons_store_listing_and_never_asks_the_store() {
    use crate::harness::s3::S3Server;
    use crate::harness::s3proxy::S3Proxy;
    let env = Env::empty().await;
    env.pg.create_db("app").await;
    env.pg.create_db("other").await;
    let s3 = S3Server::start();
    let proxy = S3Proxy::start(s3.port).await;
    let secret = env.path("s3-secret");
    write_private(&secret, &format!("{}\n", crate::harness::s3::SECRET_KEY));
    let storage = s3
        .storage_toml("offsite", "")
        .replace("{SECRET_FILE}", &secret.display().to_string())
        .replace(&s3.endpoint(), &proxy.endpoint());
    let jobs = format!(
        "{storage}{}{}",
        env.job_to("app", "app", &["offsite", "local"], ""),
        env.job_to("other", "other", &["offsite"], "")
    );
    let cfg = daemon_config(&env, "status_page = true", &jobs);
    let mut d = Daemon::start_with(
        &cfg,
        env.path("daemon.log"),
        &[("BACKSTOP_TEST_STATUS_EVERY_MS", "200".into())],
    );
    d.ready().await;
    let port = d.port;
    // (store, backups) of a job's row.
    let stores = move |job: &'static str| async move {
        api_row(port, job).await["stores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["store"].as_str().unwrap().to_string(),
                    s["backups"].as_u64(),
                )
            })
            .collect::<Vec<_>>()
    };
    let counts = |n: &[(&str, u64)]| -> Vec<(String, Option<u64>)> {
        n.iter().map(|(s, c)| (s.to_string(), Some(*c))).collect()
    };
    // Listed at start: no backups yet.
    wait_for(
        "the daemon's first listing",
        Duration::from_secs(20),
        || async {
            stores("app").await == counts(&[("offsite", 0), ("local", 0)])
                && stores("other").await == counts(&[("offsite", 0)])
        },
        &d.log.clone(),
    )
    .await;

    // Its own run shows at once, listed by the daemon after the run.
    let r = d.run_to_end("app").await;
    assert_eq!(r["state"], "success", "{r}\n{}", d.log());
    assert_eq!(stores("app").await, counts(&[("offsite", 1), ("local", 1)]));

    // Page views, many catalog rounds among them: not one store request.
    proxy.clear();
    for _ in 0..15 {
        for path in ["/", "/api/v1/status"] {
            let (code, _, body) = http_full(port, "GET", path, &[]).await;
            assert_eq!(code, 200, "{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, html) = http_full(port, "GET", "/", &[]).await;
    assert!(html.contains("offsite: 1"), "{html}");
    assert!(
        proxy.seen().is_empty(),
        "page views asked the store: {:?}",
        proxy.seen()
    );

    // A one-shot backup of `other` (another process): the catalog knows a
    // newer backup than the listing, and the daemon lists again.
    let one_shot = env.backstop(&["backup", "--job", "other"]).await;
    one_shot.assert_ok();
    wait_for(
        "the page to show the one-shot's backup",
        Duration::from_secs(20),
        || async { stores("other").await == counts(&[("offsite", 1)]) },
        &d.log.clone(),
    )
    .await;

    // A one-shot backup of `app` into `local` only (another config on the
    // same catalog): its first store never holds it, so the catalog stays
    // ahead of the listing. Listed again once for it, not at every round.
    let about_app = |s: &crate::harness::s3proxy::Seen| {
        format!("{}?{}", s.path, s.query)
            .replace("%2F", "/")
            .contains("prod/app/")
    };
    let local_only = env.path("local-only.toml");
    std::fs::write(
        &local_only,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "storage = [\"offsite\", \"local\"]",
            "storage = [\"local\"]",
        ),
    )
    .unwrap();
    let before = proxy.count(about_app);
    let one_shot = crate::harness::run_backstop(&local_only, &["backup", "--job", "app"]).await;
    one_shot.assert_ok();
    wait_for(
        "the daemon to list app's stores again",
        Duration::from_secs(20),
        || async { stores("app").await == counts(&[("offsite", 1), ("local", 2)]) },
        &d.log.clone(),
    )
    .await;
    assert!(proxy.count(about_app) > before, "{:?}", proxy.seen());
    let relisted = proxy.count(about_app);
    // Rounds go on (the page is watched): shown by another one-shot of
    // `other` reaching the page, which takes a round, a listing and a read.
    let one_shot = env.backstop(&["backup", "--job", "other"]).await;
    one_shot.assert_ok();
    wait_for(
        "the page to show the second one-shot's backup",
        Duration::from_secs(20),
        || async { stores("other").await == counts(&[("offsite", 2)]) },
        &d.log.clone(),
    )
    .await;
    for _ in 0..10 {
        let _ = stores("app").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxy.count(about_app),
        relisted,
        "app was listed again for the same backup: {:?}",
        proxy.seen()
    );
    d.stop().await;
}
