//! `backstop prune` against real stores, with backups made by the real
//! pipeline on an injected clock (`BACKSTOP_TEST_NOW`).

use crate::harness::s3::S3Server;
use crate::harness::{Env, Run, run_backstop_with};

/// One backup a day at 02:00 UTC from 2026-01-01, `n` of them.
async fn daily_backups(env: &Env, job: &str, n: u32) {
    for d in 1..=n {
        let now = format!("2026-01-{d:02}T02:00:00Z");
        run_backstop_with(
            &env.path("backstop.toml"),
            &["backup", "--job", job],
            &[("BACKSTOP_TEST_NOW", &now)],
        )
        .await
        .assert_ok();
    }
}

async fn prune_at(env: &Env, now: &str, args: &[&str]) -> Run {
    let mut all = vec!["prune", "--job", "app"];
    all.extend_from_slice(args);
    run_backstop_with(
        &env.path("backstop.toml"),
        &all,
        &[("BACKSTOP_TEST_NOW", now)],
    )
    .await
}

fn ids(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.store().join("app"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const POLICY: &str =
    "retention = { keep_daily = 5, keep_weekly = 3, min_keep = 3, orphan_grace = \"1d\" }";

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_then_prune_deletes_exactly_the_plan_and_the_kept_ones_restore() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", POLICY));
    daily_backups(&env, "app", 20).await;
    let before = ids(&env);
    assert_eq!(before.len(), 20);
    // An incomplete attempt from long ago (its manifest gone) and a fresh one.
    let old = env.store().join("app").join(&before[0]);
    std::fs::remove_file(old.join("manifest.json")).unwrap();

    let dry = prune_at(&env, "2026-01-21T00:00:00Z", &["--dry-run"]).await;
    dry.assert_ok();
    assert_eq!(ids(&env), before, "a dry run deletes nothing");
    let planned: Vec<String> = dry
        .stdout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("DELETE? "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    // Kept: Jan 16–20 (daily) and Jan 11 (weekly 2026-W02; the newest of
    // W04 and W03, Jan 20 and Jan 18, are kept daily already).
    assert_eq!(planned.len(), 19 - 6, "{}", dry.stdout);
    assert!(dry.stdout.contains("weekly 2026-W02"), "{}", dry.stdout);
    assert!(
        dry.stdout
            .contains(&format!("would remove incomplete attempt {}", before[0])),
        "{}",
        dry.stdout
    );

    let run = prune_at(&env, "2026-01-21T00:00:00Z", &["--json"]).await;
    run.assert_ok();
    let after = ids(&env);
    let mut expected: Vec<String> = before
        .iter()
        .skip(1)
        .filter(|id| !planned.contains(id))
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(after, expected);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        v[0]["report"]["deleted"].as_array().unwrap().len(),
        planned.len()
    );
    assert_eq!(v[0]["report"]["orphans"][0], before[0].as_str());

    // The kept ones still restore: the oldest kept, through a scratch database.
    let url = env.pg.url("postgres");
    let pw = env.password_file.display().to_string();
    let id = env.identity.display().to_string();
    for backup in [&after[0], after.last().unwrap()] {
        env.backstop(&[
            "verify",
            "--job",
            "app",
            "--backup",
            backup,
            "--level",
            "restore",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--identity",
            &id,
        ])
        .await
        .assert_ok();
    }
    // Pruning again changes nothing.
    prune_at(&env, "2026-01-21T00:00:00Z", &[])
        .await
        .assert_ok();
    assert_eq!(ids(&env), after);
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_on_s3_and_a_listing_failure_deletes_nothing() {
    let env = Env::new().await;
    let mut s3 = S3Server::start();
    env.write_config_with_s3(
        &s3,
        "",
        &env.job_to(
            "app",
            "marketplace",
            &["offsite"],
            "retention = { keep_last = 2, min_keep = 2 }",
        ),
    );
    daily_backups(&env, "app", 5).await;
    let manifests = |keys: Vec<String>| {
        keys.into_iter()
            .filter(|k| k.ends_with("manifest.json"))
            .count()
    };
    assert_eq!(manifests(s3.keys("prod/app/").await), 5);

    s3.kill();
    let down = prune_at(&env, "2026-01-06T00:00:00Z", &[]).await;
    assert_eq!(down.code, Some(1), "{down:?}");
    assert!(
        down.stderr.contains("nothing was deleted"),
        "{}",
        down.stderr
    );
    s3.restart();
    assert_eq!(manifests(s3.keys("prod/app/").await), 5);

    prune_at(&env, "2026-01-06T00:00:00Z", &[])
        .await
        .assert_ok();
    let keys = s3.keys("prod/app/").await;
    assert_eq!(manifests(keys.clone()), 2);
    assert_eq!(keys.len(), 4, "two backups of two objects each: {keys:?}");
    let list = env.backstop(&["list", "--job", "app"]).await;
    assert!(
        list.stdout.contains("2026-01-05T02-00-00Z")
            && list.stdout.contains("2026-01-04T02-00-00Z"),
        "{}",
        list.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_retention_is_not_pruned() {
    let env = Env::new().await;
    env.write_config(&env.job("app", "marketplace", ""));
    let r = env.backstop(&["prune", "--job", "app"]).await;
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("has no retention policy"), "{}", r.stderr);
}

/// Regression (issue 12, item 2): the S3 error mapping replaced every
/// AccessDenied with a fixed hint and dropped the store's message, so a
/// delete refused by Object Lock was never recognised: the backup was
/// reported as a fault ("access denied … check the bucket policy") and the
/// lock case never ran. Here a proxy in front of s3s-fs answers deletes of
/// two backups the way AWS does for locked objects (403 AccessDenied "…
/// protected by object lock" for DeleteObject, per-key errors in a 200 for
/// DeleteObjects): they are kept whole, reported as LOCKED, counted, the
/// prune succeeds, and nothing else changes. A plain AccessDenied stays a
/// fault (SKIPPED, exit 1).
#[tokio::test(flavor = "multi_thread")]
async fn object_locked_backups_are_kept_reported_and_counted() {
    use crate::harness::daemon::{Daemon, daemon_config};
    use crate::harness::s3proxy::{
        Answer, LOCKED_MESSAGE, S3Proxy, locked_delete_result, s3_error,
    };
    let env = Env::new().await;
    let s3 = S3Server::start();
    let proxy = S3Proxy::start(s3.port).await;
    let policy = "retention = { keep_last = 2, min_keep = 2 }";
    let p = env.write_config_with_s3(
        &s3,
        "",
        &env.job_to("app", "marketplace", &["offsite"], policy),
    );
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace(&s3.endpoint(), &proxy.endpoint());
    std::fs::write(&p, &text).unwrap();
    daily_backups(&env, "app", 5).await;
    let mut ids: Vec<String> = s3
        .keys("prod/app/")
        .await
        .iter()
        .filter_map(|k| k.strip_suffix("/manifest.json"))
        .map(|k| k.trim_start_matches("prod/app/").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 5);
    let locked = vec![ids[0].clone(), ids[1].clone()];
    let lock_rule = |message: &'static str, locked: Vec<String>| {
        move |r: &crate::harness::s3proxy::Req| {
            let hit = |k: &str| locked.iter().any(|id| k.contains(id.as_str()));
            if r.method == "DELETE" && !r.has("uploadId") && hit(r.path) {
                Answer::Respond(403, s3_error("AccessDenied", message))
            } else if r.body.is_some() && r.delete_keys().iter().any(|k| hit(k)) {
                Answer::Respond(200, locked_delete_result(&r.delete_keys()))
            } else {
                Answer::Forward
            }
        }
    };
    proxy.set_rule(lock_rule(LOCKED_MESSAGE, locked.clone()));
    let before = s3.keys("prod/app/").await;

    let run = prune_at(&env, "2026-01-06T00:00:00Z", &["--json"]).await;
    run.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let report = &v[0]["report"];
    assert_eq!(report["deleted"], serde_json::json!([ids[2]]), "{report}");
    assert_eq!(report["skipped"], serde_json::json!([]), "{report}");
    let mut reported: Vec<&str> = report["locked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[0].as_str().unwrap())
        .collect();
    reported.sort();
    assert_eq!(reported, [ids[0].as_str(), ids[1].as_str()]);
    // The store's own words are kept.
    assert!(
        report["locked"][0][1]
            .as_str()
            .unwrap()
            .contains(LOCKED_MESSAGE),
        "{report}"
    );
    // Nothing else changed: exactly the one unlocked backup's objects went.
    let after = s3.keys("prod/app/").await;
    let expected: Vec<String> = before
        .iter()
        .filter(|k| !k.contains(&ids[2]))
        .cloned()
        .collect();
    assert_eq!(after, expected);
    // The locked ones are still whole backups.
    let list = env.backstop(&["list", "--job", "app", "--json"]).await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed.len(), 4);
    let text_run = prune_at(&env, "2026-01-06T00:00:00Z", &[]).await;
    text_run.assert_ok();
    assert!(
        text_run.stdout.contains(&format!(
            "LOCKED {}: kept until its Object Lock expires",
            ids[0]
        )),
        "{}",
        text_run.stdout
    );

    // Counted by the daemon: its prune after a backup meets the same locks.
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "{}{}",
            &text[text.find("[storage.offsite]").unwrap()..text.find("[[job]]").unwrap()],
            env.job_to("app", "marketplace", &["offsite"], policy)
        ),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    assert_eq!(d.run_to_end("app").await["state"], "success", "{}", d.log());
    let sample = r#"backstop_retention_locked_total{job="app",storage="offsite"}"#;
    let ended = |outcome: &'static str| {
        format!("backstop_job_runs_total{{job=\"app\",kind=\"prune\",outcome=\"{outcome}\"}}")
    };
    // The prune that follows the backup is a run of its own: wait for its end.
    crate::harness::daemon::wait_for(
        "the prune after the backup",
        std::time::Duration::from_secs(30),
        || async {
            d.metric(&ended("success")).await.unwrap_or(0.0)
                + d.metric(&ended("failed")).await.unwrap_or(0.0)
                >= 1.0
        },
        &d.log,
    )
    .await;
    assert_eq!(
        d.metric(&ended("success")).await,
        Some(1.0),
        "a lock is not a failed prune: {}",
        d.log()
    );
    assert_eq!(d.metric(sample).await, Some(2.0));
    for id in &locked {
        assert!(s3.keys(&format!("prod/app/{id}/")).await.len() == 2);
    }
    d.signal("-TERM");
    d.exit_code(std::time::Duration::from_secs(30)).await;

    // A plain AccessDenied (a missing permission) is a fault, not a lock.
    proxy.set_rule(lock_rule("Access Denied", locked.clone()));
    let denied = prune_at(&env, "2026-12-31T00:00:00Z", &[]).await;
    assert_eq!(denied.code, Some(1), "{denied:?}");
    assert!(denied.stdout.contains("SKIPPED"), "{}", denied.stdout);
    assert!(
        denied
            .stdout
            .contains("access denied: Access Denied (check the credentials"),
        "{}",
        denied.stdout
    );
    assert!(!denied.stdout.contains("LOCKED"), "{}", denied.stdout);
}
