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
