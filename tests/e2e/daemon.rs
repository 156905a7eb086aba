//! `backstop run`: the daemon as a real process, driven by signals and HTTP.
//!
//! Length: the real process's tests (signals, sd_notify, HTTP, metrics),
//! sharing the daemon harness; scheduling decisions are unit-tested in
//! crates/scheduler instead.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::daemon::{Daemon, daemon_config, http, wait_for};
use crate::harness::pg::free_port;
use crate::harness::{Env, backstop_bin, run_backstop, walk};

/// A started, listening daemon with one job `name` (and its config path).
async fn one_job_daemon(
    env: &Env,
    daemon_extra: &str,
    name: &str,
    job_extra: &str,
) -> (PathBuf, Daemon) {
    let cfg = daemon_config(env, daemon_extra, &env.job(name, "marketplace", job_extra));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    (cfg, d)
}

/// A pg_dump that waits `secs` before dumping, to make runs long.
fn slow_pg_dump(env: &Env, secs: u32) -> String {
    crate::harness::pg_dump_wrapper(
        env,
        "slow_pg_dump",
        &format!("sleep {secs}\nexec \"$REAL\" \"$@\""),
    )
}

/// A daemon whose one job, `app`, dumps through a pg_dump that first sleeps
/// `secs`; its catch-up run (no success yet) is going when this returns.
async fn daemon_running_slow_catch_up(
    env: &Env,
    secs: u32,
    daemon_extra: &str,
    envs: &[(&str, String)],
) -> Daemon {
    let slow = slow_pg_dump(env, secs);
    let cfg = daemon_config(
        env,
        daemon_extra,
        &env.job(
            "app",
            "marketplace",
            &format!("schedule = \"0 3 * * *\"\n{slow}"),
        ),
    );
    let mut d = Daemon::start_with(&cfg, env.path("daemon.log"), envs);
    d.ready().await;
    let running = r#"backstop_job_running{job="app",kind="backup"}"#;
    wait_for(
        "the catch-up run",
        Duration::from_secs(30),
        || async { d.metric(running).await == Some(1.0) },
        &d.log,
    )
    .await;
    d
}

async fn runs(env: &Env) -> Vec<(String, String, String, Option<String>)> {
    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_as(
        "SELECT job, outcome, started_at, finished_at FROM runs WHERE kind = 'backup' ORDER BY id",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_second_job_runs_repeatedly_serves_metrics_and_the_api() {
    let env = Env::new().await;
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "{}{}",
            env.job(
                "tick",
                "marketplace",
                "schedule = \"* * * * * *\"\ncatch_up = false"
            ),
            env.job("manual", "marketplace", "")
        ),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let ok = r#"backstop_job_runs_total{job="tick",kind="backup",outcome="success"}"#;
    wait_for(
        "two scheduled runs",
        Duration::from_secs(60),
        || async { d.metric(ok).await.unwrap_or(0.0) >= 2.0 },
        &d.log,
    )
    .await;
    let (s, body) = d.http("GET", "/metrics", None).await;
    assert_eq!(s, 200);
    for name in [
        // Labels in name order: built, revision, version.
        "backstop_build_info{built=",
        "backstop_job_last_success_timestamp_seconds{job=\"tick\",kind=\"backup\"}",
        "backstop_job_running{job=\"tick\",kind=\"backup\"}",
        "backstop_job_next_run_timestamp_seconds{job=\"tick\",kind=\"backup\"}",
        "backstop_config_reload_success 1",
        "backstop_job_duration_seconds_bucket{job=\"tick\",kind=\"backup\",le=\"1\"}",
        "backstop_job_rpo_seconds{job=\"tick\"} 1.5",
        "backstop_backup_last_size_bytes{job=\"tick\",stage=\"stored\"}",
        "backstop_backup_last_size_bytes{job=\"tick\",stage=\"dump\"}",
        "backstop_backup_bytes_total{job=\"tick\"}",
        "backstop_backups_stored{job=\"tick\",storage=\"local\"}",
        "backstop_storage_used_bytes{job=\"tick\",storage=\"local\"}",
        "backstop_oldest_backup_timestamp_seconds{job=\"tick\",storage=\"local\"}",
        // Seeded at start: never succeeded is 0, not absent.
        "backstop_job_last_success_timestamp_seconds{job=\"manual\",kind=\"backup\"} 0",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    assert!(
        !body.contains("next_run_timestamp_seconds{job=\"manual\""),
        "an unscheduled job has no next run"
    );
    assert!(!body.contains(&d.token));
    assert_eq!(d.http("GET", "/readyz", None).await.0, 200);

    // The run API: no token, a wrong one, the right one.
    assert_eq!(d.http("POST", "/api/v1/jobs/manual/run", None).await.0, 401);
    assert_eq!(
        d.http(
            "POST",
            "/api/v1/jobs/manual/run",
            Some("wrong-token-xxxxxxxx")
        )
        .await
        .0,
        401
    );
    assert_eq!(
        d.http("POST", "/api/v1/jobs/nope/run", Some(d.token.as_str()))
            .await
            .0,
        404
    );
    let (s, body) = d
        .http("POST", "/api/v1/jobs/manual/run", Some(d.token.as_str()))
        .await;
    assert_eq!(s, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let id = v["run_id"].as_u64().unwrap();
    assert_eq!(
        d.http("GET", &format!("/api/v1/runs/{id}"), None).await.0,
        401
    );
    let path = format!("/api/v1/runs/{id}");
    wait_for(
        "the API run to succeed",
        Duration::from_secs(30),
        || async {
            d.http("GET", &path, Some(d.token.as_str()))
                .await
                .1
                .contains("\"state\":\"success\"")
        },
        &d.log,
    )
    .await;
    // An id the daemon does not know says why it may not.
    let (s, body) = d
        .http(
            "GET",
            &format!("/api/v1/runs/{}", id + 1000),
            Some(d.token.as_str()),
        )
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("another node claimed"), "{body}");

    // backup --wait goes through the daemon.
    let wait = env.backstop(&["backup", "--job", "manual", "--wait"]).await;
    wait.assert_ok();
    assert!(
        wait.stderr.contains("daemon run") && wait.stdout.contains("complete (daemon run"),
        "{wait:?}"
    );
    assert!(!wait.all().contains(&d.token));

    d.signal("-TERM");
    assert_eq!(
        d.exit_code(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        d.log()
    );
    assert!(!d.log().contains(&d.token) && !d.log().contains(&env.pg.password));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_longer_than_its_interval_is_never_overlapped() {
    let env = Env::new().await;
    let slow = slow_pg_dump(&env, 3);
    let (_, mut d) = one_job_daemon(
        &env,
        "",
        "slow",
        &format!("schedule = \"* * * * * *\"\ncatch_up = false\n{slow}"),
    )
    .await;
    let skipped = r#"backstop_job_runs_total{job="slow",kind="backup",outcome="skipped"}"#;
    let ok = r#"backstop_job_runs_total{job="slow",kind="backup",outcome="success"}"#;
    // Three runs at least, so the overlap check below compares real
    // neighbours (with one run it would check nothing).
    wait_for(
        "three successes and skips",
        Duration::from_secs(90),
        || async {
            d.metric(ok).await.unwrap_or(0.0) >= 3.0
                && d.metric(skipped).await.unwrap_or(0.0) >= 2.0
        },
        &d.log,
    )
    .await;
    assert!(
        d.log().contains("previous run of the job is still going"),
        "{}",
        d.log()
    );
    d.signal("-TERM");
    d.exit_code(Duration::from_secs(60)).await;
    // No two runs of the job ever overlapped.
    let r = runs(&env).await;
    assert!(r.len() >= 3, "{r:?}");
    for w in r.windows(2) {
        let (prev_end, next_start) = (w[0].3.clone().unwrap(), w[1].2.clone());
        assert!(prev_end <= next_start, "overlap: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_run_finish_within_the_grace_and_cancels_it_after() {
    // A generous grace: the run completes, the daemon exits 0.
    let env = Env::new().await;
    // catch_up starts a run at once (no success yet).
    let mut d = daemon_running_slow_catch_up(&env, 3, "shutdown_grace = \"60s\"", &[]).await;
    // A one-shot run of the same job meanwhile is refused by the catalog's job lock.
    let one_shot = env.backstop(&["backup", "--job", "app"]).await;
    assert_eq!(one_shot.code, Some(1), "{one_shot:?}");
    assert!(
        one_shot.stderr.contains("another backstop process"),
        "{}",
        one_shot.stderr
    );
    d.stop().await;
    let r = runs(&env).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, "success", "{r:?}\n{}", d.log());

    // A short grace: the run is cancelled, recorded interrupted, nothing left.
    let env = Env::new().await;
    let mut d = daemon_running_slow_catch_up(&env, 30, "shutdown_grace = \"1s\"", &[]).await;
    d.signal("-TERM");
    assert_eq!(
        d.exit_code(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        d.log()
    );
    let r = runs(&env).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, "interrupted", "{r:?}\n{}", d.log());
    assert!(
        walk(&env.store()).is_empty(),
        "left behind: {:?}",
        walk(&env.store())
    );
    assert!(d.log().contains("Shutdown grace is over"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let env = Env::new().await;
    let (cfg, mut d) = one_job_daemon(
        &env,
        "",
        "first",
        "schedule = \"0 3 * * *\"\ncatch_up = false",
    )
    .await;
    let first = r#"backstop_job_next_run_timestamp_seconds{job="first",kind="backup"}"#;
    let second = r#"backstop_job_next_run_timestamp_seconds{job="second",kind="backup"}"#;
    assert!(d.metric(first).await.is_some());
    assert!(d.metric(second).await.is_none());

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}{}",
            env.job(
                "second",
                "marketplace",
                "schedule = \"0 4 * * *\"\ncatch_up = false"
            )
        ),
    )
    .unwrap();
    d.signal("-HUP");
    wait_for(
        "the new job to be scheduled",
        Duration::from_secs(10),
        || async { d.metric(second).await.is_some() },
        &d.log,
    )
    .await;
    assert_eq!(d.metric("backstop_config_reload_success").await, Some(1.0));
    // Regression (issue 12, item 4): a job added by a reload had no RPO and
    // no `last_success = 0`, so BackstopBackupStale and
    // BackstopBackupNeverSucceeded could not fire for it until a restart.
    let rpo = |job: &str| format!(r#"backstop_job_rpo_seconds{{job="{job}"}}"#);
    let never = |job: &str| {
        format!(r#"backstop_job_last_success_timestamp_seconds{{job="{job}",kind="backup"}}"#)
    };
    wait_for(
        "the new job's RPO and last success to be exported",
        Duration::from_secs(10),
        || async { d.metric(&rpo("second")).await.is_some() },
        &d.log,
    )
    .await;
    assert_eq!(d.metric(&never("second")).await, Some(0.0));
    // A daily schedule: the default RPO is the interval plus its slack.
    assert!(d.metric(&rpo("second")).await.unwrap() >= 86_400.0);

    std::fs::write(&cfg, format!("{text}[[job]]\nname = \"broken\"\n")).unwrap();
    d.signal("-HUP");
    wait_for(
        "the failed reload",
        Duration::from_secs(10),
        || async { d.metric("backstop_config_reload_success").await == Some(0.0) },
        &d.log,
    )
    .await;
    assert!(
        d.log().contains("previous configuration stays in force"),
        "{}",
        d.log()
    );
    assert!(
        d.metric(first).await.is_some() && d.metric(second).await.is_some(),
        "old jobs keep their schedules"
    );

    // A reload that removes a job removes its series: no stale alert for a
    // job that no longer exists.
    let header = text.split("[[job]]").next().unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{header}{}",
            env.job(
                "second",
                "marketplace",
                "schedule = \"0 4 * * *\"\ncatch_up = false"
            )
        ),
    )
    .unwrap();
    d.signal("-HUP");
    wait_for(
        "the removed job's series to go",
        Duration::from_secs(10),
        || async { d.metric(&rpo("first")).await.is_none() },
        &d.log,
    )
    .await;
    let (_, scrape) = d.http("GET", "/metrics", None).await;
    assert!(
        !scrape.contains(r#"job="first""#),
        "series of the removed job still exported:\n{scrape}"
    );
    assert_eq!(d.metric(&never("second")).await, Some(0.0));
    // The remaining job's next run is exported again by its new fire loop
    // (a task of its own, so not necessarily by the time the removed
    // job's series are gone: that race failed this test on a loaded run).
    wait_for(
        "the remaining job's next run",
        Duration::from_secs(10),
        || async { d.metric(second).await.is_some() },
        &d.log,
    )
    .await;
    d.signal("-TERM");
    assert_eq!(d.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[test]
fn the_systemd_unit_verifies() {
    let repo = crate::harness::repo();
    let unit = std::fs::read_to_string(repo.join("systemd/backstop.service")).unwrap();
    // systemd-analyze checks that ExecStart exists: point it at the built binary.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backstop.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/backstop", backstop_bin()),
    )
    .unwrap();
    assert_eq!(systemd_verify(&path), "", "systemd-analyze verify");
    for hardening in [
        "Type=notify",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        // The identity that decrypts every backup is not loaded unless a
        // job's verify decrypts; the signing key once it is made (a
        // missing credential file would stop the unit from starting).
        "\n#LoadCredential=age-identity",
        "\n#LoadCredential=signing-key",
        "\nLimitCORE=0\n",
        "StateDirectory=backstop",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "RestrictAddressFamilies=",
        // Below the database server for CPU and disk on a shared host.
        "\nCPUWeight=25\n",
        "\nIOWeight=25\n",
        "\nNice=10\n",
    ] {
        assert!(unit.contains(hardening), "{hardening} missing");
    }
    // systemd's own score of what the unit leaves open: at most 1.2.
    let (exposure, text) = systemd_exposure(&path);
    assert!(exposure <= 1.2, "exposure {exposure}:\n{text}");
}

/// `systemd-analyze security --offline` of the unit at `path` (with the
/// drop-ins beside it): the overall exposure and the whole report.
fn systemd_exposure(path: &std::path::Path) -> (f64, String) {
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for backstop.service: "))
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (exposure, text)
}

/// `systemd-analyze verify` of the unit at `path` and its drop-ins: what
/// it said about them (nothing when they are good).
fn systemd_verify(path: &std::path::Path) -> String {
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(path)
        .output()
        .expect("systemd-analyze (Debian: systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
        .lines()
        .filter(|l| l.contains("backstop.service:") || l.contains("ip-allow.conf:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A database the ip-allow drop-in leaves out: the connection fails (here
/// at once, as nothing listens; behind the real filter, at the connect
/// timeout), the run's error names the address the drop-in does not allow
/// and the command that writes it again, and the run is not retried. The
/// same database with the drop-in allowing it: retried as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_the_ip_allow_drop_in_leaves_out_fails_once_naming_it() {
    let env = Env::new().await;
    let port = free_port();
    let job = format!(
        "[[job]]\nname = \"app\"\ndatabase = {{ url = \"postgres://app@127.0.0.1:{port}/app\", password_file = \"{}\" }}\nstorage = [\"local\"]\nretries = 1\nretry_backoff = \"1s\"\n\n",
        env.password_file.display()
    );
    let cfg = daemon_config(&env, "", &job);
    let drop_in = env.path("ip-allow.conf");
    // The job run to its end by a daemon started with `allow` as the
    // drop-in's allow-list.
    let run_allowing = |allow: &'static str, log: &'static str| {
        let (cfg, drop_in, log) = (&cfg, &drop_in, env.path(log));
        async move {
            std::fs::write(
                drop_in,
                format!("[Service]\nIPAddressDeny=any\nIPAddressAllow={allow}\n"),
            )
            .unwrap();
            let override_env = [(
                "BACKSTOP_TEST_IP_ALLOW_DROP_IN",
                drop_in.display().to_string(),
            )];
            let mut d = Daemon::start_with(cfg, log, &override_env);
            d.ready().await;
            let run = d.run_to_end("app").await;
            d.stop().await;
            run
        }
    };
    let run = run_allowing("10.0.0.0/8", "daemon.log").await;
    assert_eq!(run["state"], "failed", "{run}");
    assert_eq!(run["attempts"], 1, "not retried: {run}");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("the service's IPAddressDeny=/IPAddressAllow= do not allow 127.0.0.1")
            && error.contains("backstop ip-allow --output"),
        "{error}"
    );

    // Allowed (loopback): an ordinary connection failure, retried.
    let run = run_allowing("localhost", "daemon2.log").await;
    assert_eq!(run["state"], "failed", "{run}");
    assert_eq!(run["attempts"], 2, "retried: {run}");
    assert!(
        !run["error"].as_str().unwrap().contains("ip-allow"),
        "{run}"
    );
}

/// `backstop ip-allow` writes a drop-in systemd takes: IPAddressDeny=any,
/// loopback, and each store's and notifier's address; the unit's
/// exposure drops below the shipped unit's. What it cannot pin (AWS S3
/// without its published ranges) is refused and an existing drop-in is
/// left as it was; with the ranges, the region's S3 prefixes are allowed.
#[tokio::test(flavor = "multi_thread")]
async fn ip_allow_writes_a_drop_in_systemd_takes_and_refuses_what_it_cannot_pin() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(crate::harness::repo().join("systemd/backstop.service"))
        .unwrap()
        .replace("/usr/local/bin/backstop", backstop_bin());
    let path = dir.path().join("backstop.service");
    std::fs::write(&path, unit).unwrap();
    let (shipped, _) = systemd_exposure(&path);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "x\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let base = format!(
        "[daemon]\ncatalog = \"sqlite://{d}/catalog.db\"\n\n\
         [storage.minio]\ntype = \"s3\"\nbucket = \"backups\"\nregion = \"us-east-1\"\nendpoint = \"http://10.77.0.9:9000\"\naccess_key_id = \"AK\"\nsecret_access_key_file = \"{s}\"\n\n\
         [notify.oncall]\ntype = \"webhook\"\nurl = \"https://192.0.2.10/hook/SECRET-PATH\"\n\n",
        d = dir.path().display(),
        s = secret.display()
    );
    let job = |stores: &str| {
        format!(
            "[[job]]\nname = \"app\"\ndatabase = {{ url = \"postgres://app@127.0.0.1:5432/app\", password_file = \"{s}\" }}\nstorage = [{stores}]\nencryption = \"none\"\nnotify = [\"oncall\"]\n",
            s = secret.display()
        )
    };
    let cfg = dir.path().join("backstop.toml");
    std::fs::write(&cfg, format!("{base}{}", job("\"minio\""))).unwrap();
    let drop_in = dir.path().join("backstop.service.d/ip-allow.conf");
    let out = drop_in.to_str().unwrap();
    let run = run_backstop(&cfg, &["ip-allow", "--output", out]).await;
    run.assert_ok();
    assert!(
        run.stderr.contains("now run: systemctl daemon-reload"),
        "{run:?}"
    );
    let written = std::fs::read_to_string(&drop_in).unwrap();
    for line in [
        "[Service]\nIPAddressDeny=any\n",
        "\nIPAddressAllow=localhost\n",
        "# store minio\nIPAddressAllow=10.77.0.9\n",
        "# notifier oncall\nIPAddressAllow=192.0.2.10\n",
    ] {
        assert!(written.contains(line), "{line:?} not in:\n{written}");
    }
    // The database is on loopback (covered by localhost); the webhook's
    // secret path is not written.
    assert!(
        !written.contains("IPAddressAllow=127.") && !written.contains("SECRET"),
        "{written}"
    );
    assert_eq!(systemd_verify(&path), "", "systemd-analyze verify");
    let (exposure, report) = systemd_exposure(&path);
    assert!(
        exposure < shipped && report.contains("IP address allow list with non-localhost entries"),
        "{shipped} → {exposure}:\n{report}"
    );

    // An AWS store: refused, nothing written over the drop-in.
    let aws = "[storage.aws]\ntype = \"s3\"\nbucket = \"backups\"\nregion = \"eu-west-1\"\n\n";
    std::fs::write(&cfg, format!("{base}{aws}{}", job("\"minio\", \"aws\""))).unwrap();
    let run = run_backstop(&cfg, &["ip-allow", "--output", out]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("no drop-in written")
            && run.stderr.contains("store aws is AWS S3")
            && run.stderr.contains("--aws-ip-ranges"),
        "{run:?}"
    );
    assert_eq!(std::fs::read_to_string(&drop_in).unwrap(), written);
    // A file that is not AWS's list: a usage error.
    let ranges = dir.path().join("ip-ranges.json");
    std::fs::write(&ranges, "<html>captive portal</html>").unwrap();
    let run = run_backstop(
        &cfg,
        &["ip-allow", "--aws-ip-ranges", ranges.to_str().unwrap()],
    )
    .await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("not AWS's ip-ranges.json"), "{run:?}");
    // AWS's list (its shape, a few entries): the region's S3 prefixes, and
    // the metadata service for a store without static credentials.
    std::fs::write(
        &ranges,
        r#"{"syncToken":"1764583200","createDate":"2026-12-01-10-00-00","prefixes":[
        {"ip_prefix":"52.218.0.0/17","region":"eu-west-1","service":"S3","network_border_group":"eu-west-1"},
        {"ip_prefix":"52.92.0.0/17","region":"eu-west-1","service":"AMAZON","network_border_group":"eu-west-1"},
        {"ip_prefix":"52.95.128.0/21","region":"us-east-1","service":"S3","network_border_group":"us-east-1"}],
        "ipv6_prefixes":[{"ipv6_prefix":"2a05:d07a:a000::/40","region":"eu-west-1","service":"S3","network_border_group":"eu-west-1"}]}"#,
    )
    .unwrap();
    let run = run_backstop(
        &cfg,
        &["ip-allow", "--aws-ip-ranges", ranges.to_str().unwrap()],
    )
    .await;
    run.assert_ok();
    for line in [
        "\nIPAddressAllow=52.218.0.0/17\n",
        "\nIPAddressAllow=2a05:d07a:a000::/40\n",
        "\nIPAddressAllow=169.254.169.254\n",
    ] {
        assert!(
            run.stdout.contains(line),
            "{line:?} not in:\n{}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains("52.92.0.0") && !run.stdout.contains("52.95.128.0"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_queue_for_a_free_slot_and_transient_failures_are_retried() {
    let env = Env::new().await;
    let slow = slow_pg_dump(&env, 2);
    env.pg.create_db("gone").await;
    let cfg = daemon_config(
        &env,
        "max_concurrent_jobs = 1",
        &format!(
            "{}{}{}",
            env.job("a", "marketplace", &slow),
            env.job("b", "marketplace", &slow),
            // A database that disappears: connection errors are transient.
            env.job("flaky", "gone", "retries = 2\nretry_backoff = \"1s\"")
        ),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    env.pg.execute("postgres", "DROP DATABASE gone").await;
    for job in ["a", "b"] {
        let (s, body) = d
            .http(
                "POST",
                &format!("/api/v1/jobs/{job}/run"),
                Some(d.token.as_str()),
            )
            .await;
        assert_eq!(s, 202, "{body}");
    }
    // A second trigger of a queued job is refused, not stacked.
    assert_eq!(
        d.http("POST", "/api/v1/jobs/b/run", Some(d.token.as_str()))
            .await
            .0,
        409
    );
    let ok = |j: &str| {
        format!("backstop_job_runs_total{{job=\"{j}\",kind=\"backup\",outcome=\"success\"}}")
    };
    wait_for(
        "both runs",
        Duration::from_secs(60),
        || async { d.metric(&ok("a")).await == Some(1.0) && d.metric(&ok("b")).await == Some(1.0) },
        &d.log,
    )
    .await;
    assert!(d.log().contains("Waiting for a free slot"), "{}", d.log());
    // One slot: the two runs never overlapped.
    let r = runs(&env).await;
    assert_eq!(r.len(), 2);
    assert!(r[0].3.clone().unwrap() <= r[1].2, "{r:?}");

    let state = d.run_to_end("flaky").await;
    assert_eq!(state["state"], "failed", "{state}");
    assert!(
        state["attempts"] == 3 && state["error"].as_str().unwrap().contains("does not exist"),
        "{state}"
    );
    let flaky: Vec<_> = runs(&env)
        .await
        .into_iter()
        .filter(|r| r.0 == "flaky")
        .collect();
    assert_eq!(flaky.len(), 3, "one run and two retries: {flaky:?}");
    assert!(d.log().contains("retrying"), "{}", d.log());
    d.signal("-TERM");
    d.exit_code(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_the_api_is_off_and_backup_wait_runs_in_process() {
    let env = Env::new().await;
    let port = free_port();
    let header = env.header().replacen(
        "[daemon]\n",
        &format!("[daemon]\nlisten = \"127.0.0.1:{port}\"\n"),
        1,
    );
    let cfg = env.path("backstop.toml");
    std::fs::write(
        &cfg,
        format!("{header}{}", env.job("app", "marketplace", "")),
    )
    .unwrap();
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let (s, body) = d
        .http("POST", "/api/v1/jobs/app/run", Some(d.token.as_str()))
        .await;
    assert_eq!(s, 403);
    assert!(body.contains("api_token_file"), "{body}");
    let wait = env.backstop(&["backup", "--job", "app", "--wait"]).await;
    wait.assert_ok();
    assert!(
        wait.stderr.contains("running the backup here"),
        "{}",
        wait.stderr
    );
    d.signal("-INT");
    assert_eq!(d.exit_code(Duration::from_secs(30)).await, Some(0));
}

/// `backup --wait` stopped by SIGINT while it follows the daemon's run:
/// it exits 130 at once and says the backup goes on, which it does. Before,
/// it ignored the signal until the daemon's run ended, then exited 130
/// even after a successful backup.
#[tokio::test(flavor = "multi_thread")]
async fn backup_wait_stops_following_on_a_signal_and_the_daemon_goes_on() {
    let env = Env::new().await;
    let slow = slow_pg_dump(&env, 6);
    let cfg = daemon_config(&env, "", &env.job("app", "marketplace", &slow));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let mut child = crate::harness::spawn_backstop(&cfg, &["backup", "--job", "app", "--wait"]);
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // Following once the daemon has queued it.
    while !line.contains("queued") {
        line.clear();
        assert!(
            tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line)
                .await
                .unwrap()
                > 0,
            "backup --wait ended before following the daemon's run"
        );
    }
    crate::harness::kill("-INT", child.id().unwrap());
    let signalled = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("backup --wait did not exit")
        .unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(130));
    assert!(
        took < Duration::from_secs(3),
        "it took {took:?} to stop following"
    );
    // "daemon run N of job "app" queued"
    let id: u64 = line
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {line:?}"));
    let state = d.wait_run("app", id).await;
    assert_eq!(state["state"], "success", "{state}\n{}", d.log());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_verification_runs_and_reports_a_damaged_backup() {
    let env = Env::new().await;
    let id = env.identity.display().to_string();
    let cfg = daemon_config(
        &env,
        "",
        &env.job(
            "app",
            "marketplace",
            &format!("identity_file = \"{id}\"\nverify = {{ schedule = \"* * * * * *\", level = \"decrypt\" }}"),
        ),
    );
    env.backstop(&["backup", "--job", "app"]).await.assert_ok();
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let ok = r#"backstop_job_runs_total{job="app",kind="verify",outcome="success"}"#;
    let failed = r#"backstop_job_runs_total{job="app",kind="verify",outcome="failed"}"#;
    wait_for(
        "a scheduled verification",
        Duration::from_secs(60),
        || async { d.metric(ok).await.unwrap_or(0.0) >= 1.0 },
        &d.log,
    )
    .await;
    assert!(
        d.metric(r#"backstop_job_next_run_timestamp_seconds{job="app",kind="verify"}"#)
            .await
            .is_some()
    );
    let list = env.backstop(&["list", "--job", "app"]).await;
    assert!(list.stdout.contains("decrypt 20"), "{}", list.stdout);

    let art = env.only_backup("app").join("database.dump.zst.age");
    crate::verify::flip_byte(&art, 500);
    wait_for(
        "the damage to be reported",
        Duration::from_secs(60),
        || async { d.metric(failed).await.unwrap_or(0.0) >= 1.0 },
        &d.log,
    )
    .await;
    assert!(
        d.metric(r#"backstop_job_last_failure_timestamp_seconds{job="app",kind="verify"}"#)
            .await
            .unwrap()
            > 0.0
    );
    assert!(
        d.log().contains("Scheduled verification FAILED"),
        "{}",
        d.log()
    );
    d.signal("-TERM");
    assert_eq!(d.exit_code(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn tells_systemd_it_is_ready_alive_and_stopping_and_a_second_signal_quits_at_once() {
    let env = Env::new().await;
    let sock_path = env.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let envs = [
        ("NOTIFY_SOCKET", sock_path.display().to_string()),
        ("WATCHDOG_USEC", "400000".into()),
    ];
    // The catch-up run is going (20 s): the first TERM waits for it.
    let mut d = daemon_running_slow_catch_up(&env, 20, "shutdown_grace = \"60s\"", &envs).await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    // READY=1 comes once the listener is up; then keepalives every 200 ms.
    while !(seen.iter().any(|m: &String| m.starts_with("READY=1"))
        && seen.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        let n = sock
            .recv(&mut buf)
            .expect("no sd_notify message within 30 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(seen.iter().any(|m| m.contains("STATUS=")), "{seen:?}");
    assert_eq!(
        d.http("GET", "/healthz", None).await.0,
        200,
        "ready means listening"
    );
    // The first TERM waits for the run, the second quits.
    d.signal("-TERM");
    loop {
        let n = sock.recv(&mut buf).expect("no STOPPING=1");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
    d.signal("-TERM");
    assert_eq!(
        d.exit_code(Duration::from_secs(10)).await,
        Some(143),
        "{}",
        d.log()
    );
    assert!(d.log().contains("Second signal"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_prunes_after_each_successful_backup() {
    let env = Env::new().await;
    let (_, mut d) = one_job_daemon(
        &env,
        "",
        "app",
        "schedule = \"* * * * * *\"\ncatch_up = false\nretention = { keep_last = 2, min_keep = 2 }",
    )
    .await;
    let deleted = r#"backstop_retention_deleted_total{job="app",storage="local"}"#;
    wait_for(
        "two pruned backups",
        Duration::from_secs(60),
        || async { d.metric(deleted).await.unwrap_or(0.0) >= 2.0 },
        &d.log,
    )
    .await;
    d.signal("-TERM");
    assert_eq!(d.exit_code(Duration::from_secs(30)).await, Some(0));
    let left = std::fs::read_dir(env.store().join("app")).unwrap().count();
    assert_eq!(left, 2, "keep_last = 2 after the last run's prune");
    assert!(d.log().contains("Retention applied"), "{}", d.log());
}

/// A real Prometheus scraping a real daemon whose job fails: the shipped
/// BackstopJobFailed rule fires, as seen through Prometheus's HTTP API.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_fires_backstop_job_failed() {
    let env = Env::new().await;
    // The job's database does not exist: its catch-up run at start fails.
    let cfg = daemon_config(
        &env,
        "",
        &env.job("broken", "nowhere", "schedule = \"0 3 * * *\"\nretries = 0"),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let failed = r#"backstop_job_runs_total{job="broken",kind="backup",outcome="failed"}"#;
    wait_for(
        "a failed run",
        Duration::from_secs(30),
        || async { d.metric(failed).await.is_some() },
        &d.log,
    )
    .await;

    let prom_port = free_port();
    let rules = crate::harness::repo().join("deploy/prometheus/backstop-alerts.yml");
    let cfg = env.path("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: backstop\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            rules.display(),
            d.port
        ),
    )
    .unwrap();
    let log = env.path("prometheus.log");
    let _prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            env.path("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian: prometheus) must be installed");
    wait_for(
        "BackstopJobFailed to fire in Prometheus",
        Duration::from_secs(90),
        || async {
            let (_, body) = http(prom_port, "GET", "/api/v1/alerts", None).await;
            body.contains("\"alertname\":\"BackstopJobFailed\"")
                && body.contains("\"job\":\"broken\"")
                && body.contains("\"state\":\"firing\"")
        },
        &log,
    )
    .await;
    // And the daemon itself is up as far as Prometheus knows.
    let (_, up) = http(
        prom_port,
        "GET",
        "/api/v1/query?query=up%7Bjob%3D%22backstop%22%7D",
        None,
    )
    .await;
    assert!(up.contains("\"value\":[") && up.contains("\"1\"]"), "{up}");
}

/// Issue 12, item 8: `backup --wait` was only tested on success. A run that
/// fails in the daemon makes the command fail, with the daemon's cause.
#[tokio::test(flavor = "multi_thread")]
async fn backup_wait_exits_non_zero_with_the_cause_when_the_daemon_run_fails() {
    let env = Env::new().await;
    let cfg = daemon_config(&env, "", &env.job("gone", "no_such_db", "retries = 0"));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let wait = env.backstop(&["backup", "--job", "gone", "--wait"]).await;
    wait.assert_failed();
    assert_eq!(wait.code, Some(1), "{wait:?}");
    assert!(
        wait.stderr
            .contains("backup of job \"gone\" failed (daemon run")
            && wait.stderr.contains("no_such_db"),
        "{wait:?}"
    );
    assert!(!wait.all().contains(&d.token) && !wait.all().contains(&env.pg.password));
    assert_eq!(
        d.metric(r#"backstop_job_runs_total{job="gone",kind="backup",outcome="failed"}"#)
            .await,
        Some(1.0)
    );
}

/// Every `backstop_*` name in `text` (metric names, not prefixes such as
/// `backstop_job` in `grep backstop_job`).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("backstop_") && !w.ends_with('_') && *w != "backstop_job")
        .map(|w| {
            w.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect()
}

/// Regression (issue 12, item 6): the metric tests used to read the names
/// from metrics.rs, so a metric that is declared but never exported (not
/// registered, or with no series until some event) passed. Here every metric
/// named by the README, the alert rules and the dashboard must have a sample
/// in a live /metrics of a daemon that has done a backup, a verify and a
/// prune.
#[tokio::test(flavor = "multi_thread")]
async fn every_documented_metric_is_in_a_live_scrape() {
    let env = Env::new().await;
    let hooks = crate::harness::receivers::HttpReceiver::start(&[]).await;
    let id = env.identity.display().to_string();
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "[notify.oncall]\ntype = \"webhook\"\nurl = \"{}\"\n\n{}",
            hooks.url("/hook"),
            env.job(
                "app",
                "marketplace",
                &format!(
                    // standby = "pause" on a primary: no pause, but the
                    // pause's age and limit are reported.
                    "schedule = \"0 3 * * *\"\ncatch_up = false\nnotify = [\"oncall\"]\nidentity_file = \"{id}\"\nverify = {{ schedule = \"* * * * * *\", level = \"decrypt\" }}\nretention = {{ keep_last = 3, min_keep = 1 }}\nstandby = \"pause\""
                ),
            )
        ),
    );
    // A cluster job too (its per-database series), drilled once before the
    // daemon starts (the restore time and the RTO are seeded from the catalog).
    let pw = env.password_file.display().to_string();
    let cluster = format!(
        "[[job]]\nname = \"server\"\ndatabase = {{ url = \"{}\", password_file = \"{pw}\", all = true }}\nstorage = [\"local\"]\nidentity_file = \"{id}\"\nrto = \"1h\"\n\n",
        env.pg.url("postgres")
    );
    std::fs::write(
        &cfg,
        format!("{}{cluster}", std::fs::read_to_string(&cfg).unwrap()),
    )
    .unwrap();
    env.backstop(&["backup", "--job", "server"])
        .await
        .assert_ok();
    let url = env.pg.url("postgres");
    env.backstop(&[
        "drill",
        "--job",
        "server",
        "--target-server",
        &url,
        "--target-password-file",
        &pw,
    ])
    .await
    .assert_ok();
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    assert_eq!(d.run_to_end("app").await["state"], "success", "{}", d.log());
    assert_eq!(
        d.run_to_end("server").await["state"],
        "success",
        "{}",
        d.log()
    );
    for kind in ["verify", "prune"] {
        let sample =
            format!("backstop_job_runs_total{{job=\"app\",kind=\"{kind}\",outcome=\"success\"}}");
        wait_for(
            kind,
            Duration::from_secs(60),
            || async { d.metric(&sample).await.unwrap_or(0.0) >= 1.0 },
            &d.log,
        )
        .await;
    }
    let (_, scrape) = d.http("GET", "/metrics", None).await;
    let exported: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap();
            metric_names(name).into_iter().next().unwrap_or_default()
        })
        .collect();
    let repo = crate::harness::repo();
    let mut documented = std::collections::BTreeMap::new();
    for file in [
        "README.md",
        "deploy/prometheus/backstop-alerts.yml",
        "deploy/grafana/backstop.json",
        "docs/runbook.md",
    ] {
        for m in metric_names(&std::fs::read_to_string(repo.join(file)).unwrap()) {
            documented.entry(m).or_insert(file);
        }
    }
    assert!(documented.len() >= 20, "{documented:?}");
    // A fleet's series (from its shared catalog) are not in one host's
    // scrape: fleet::fleet_metrics_show_waiting_runs_… checks them in a
    // fleet node's.
    let fleet_only = [
        "backstop_fleet_pending_runs",
        "backstop_fleet_pending_age_seconds",
        "backstop_fleet_node_running_runs",
    ];
    let missing: Vec<_> = documented
        .iter()
        .filter(|(m, _)| !exported.contains(*m) && !fleet_only.contains(&m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "named but not in a live scrape (name, where): {missing:?}\nscrape:\n{scrape}"
    );
    // Real values, not just declared series.
    let value = |sample: &str| {
        scrape
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or_else(|| panic!("{sample} not in the scrape"))
    };
    assert!(value(r#"backstop_verify_last_success_timestamp_seconds{job="app"}"#) > 1.7e9);
    assert!(
        value(r#"backstop_job_last_success_timestamp_seconds{job="app",kind="prune"}"#) > 1.7e9
    );
    assert!(value(r#"backstop_backups_stored{job="app",storage="local"}"#) >= 1.0);
    // build_info names the commit and build date `--version` names.
    let version = crate::harness::backstop_version();
    let (semver, rest) = version.split_once(" (commit ").unwrap();
    let (commit, built) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap();
    let info = scrape
        .lines()
        .find(|l| l.starts_with("backstop_build_info{"))
        .unwrap_or_else(|| panic!("no build_info in:\n{scrape}"));
    for label in [
        format!("version=\"{semver}\""),
        format!("revision=\"{commit}\""),
        format!("built=\"{built}\""),
    ] {
        assert!(info.contains(&label), "{label} not in {info}");
    }
}
