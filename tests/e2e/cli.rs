//! The command line itself: exit codes and messages an operator sees.

use crate::harness::run_backstop;

const RECIPIENT: &str = "age1gld8ygn59cyusj92ru25h0y30wc26st304z7er6h4keqc9se74kq63muva";

fn config(dir: &std::path::Path, jobs: &str) -> std::path::PathBuf {
    let p = dir.join("backstop.toml");
    std::fs::write(
        &p,
        format!(
            "[daemon]\ncatalog = \"sqlite://{}/catalog.db\"\n\n[storage.local]\ntype = \"local\"\npath = \"{}/store\"\n\n[encryption.default]\nrecipients = [\"{RECIPIENT}\"]\n\n{jobs}",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    p
}

#[tokio::test]
async fn check_config_prints_a_summary_with_next_run_times() {
    let dir = tempfile::tempdir().unwrap();
    let p = config(
        dir.path(),
        "[[job]]\nname = \"marketplace\"\ndatabase = { url = \"postgres://app@db.internal/marketplace\" }\nschedule = \"15 2 * * *\"\ntimezone = \"Europe/Berlin\"\nstorage = [\"local\"]\n\n[[job]]\nname = \"adhoc\"\ndatabase = { url = \"postgres://app@db.internal/adhoc\" }\nstorage = [\"local\"]\nencryption = \"none\"\n",
    );
    let run = run_backstop(&p, &["check-config"]).await;
    run.assert_ok();
    assert!(run.stdout.contains(": OK"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("\"15 2 * * *\" in Europe/Berlin, next "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("on demand only"), "{}", run.stdout);
    assert!(
        run.stdout.contains("daemon: listen 127.0.0.1:9871") && run.stdout.contains("run API off"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("NOT ENCRYPTED"), "{}", run.stdout);
    assert!(run.stdout.contains("local directory"), "{}", run.stdout);
}

#[tokio::test]
async fn invalid_config_exits_2_with_file_line_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = config(
        dir.path(),
        "[[job]]\nname = \"app\"\ndatabase = { url = \"postgres://app@db.internal/app\" }\nstorage = [\"local\"]\nschedul = \"15 2 * * *\"\n",
    );
    let run = run_backstop(&p, &["check-config"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("{}:15:1: unknown field `schedul`", p.display())),
        "{}",
        run.stderr
    );
    // Every command validates first.
    let run = run_backstop(&p, &["backup", "--job", "app"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[tokio::test]
async fn missing_config_and_unknown_job_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_backstop(&dir.path().join("nope.toml"), &["check-config"]).await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("cannot read config file") && run.stderr.contains("--config"),
        "{}",
        run.stderr
    );

    let p = config(dir.path(), "");
    let run = run_backstop(&p, &["backup", "--job", "ghost"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("no job named \"ghost\""),
        "{}",
        run.stderr
    );
}

/// The shipped alert rules are valid and their unit tests pass (promtool, from
/// Debian's `prometheus`), and every metric they use is one the daemon exports.
#[test]
fn alert_rules_pass_promtool() {
    let dir = crate::harness::repo().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "backstop-alerts.yml"],
        vec!["test", "rules", "backstop-alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian: prometheus) must be installed");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // That every metric the rules use is exported is checked against a live
    // scrape: daemon::every_documented_metric_is_in_a_live_scrape.
    let rules = std::fs::read_to_string(dir.join("backstop-alerts.yml")).unwrap();
    for anchor in [
        "backstopdown",
        "backstopjobfailed",
        "backstopbackupstale",
        "backstopneversucceeded",
        "backstopverifyfailed",
        "backstopverifystale",
        "backstopbackupsuspect",
        "backstopretentionnotrunning",
        "backstopconfigreloadfailed",
        "backstopnotificationsfailing",
        "backstopfleetleaselost",
        "backstopfleetconfigdrift",
    ] {
        assert!(
            rules.contains(&format!("docs/runbook.md#{anchor}")),
            "{anchor}"
        );
    }
    let runbook = std::fs::read_to_string(crate::harness::repo().join("docs/runbook.md")).unwrap();
    for alert in [
        "BackstopDown",
        "BackstopJobFailed",
        "BackstopBackupStale",
        "BackstopNeverSucceeded",
        "BackstopVerifyFailed",
        "BackstopVerifyStale",
        "BackstopBackupSuspect",
        "BackstopRetentionNotRunning",
        "BackstopConfigReloadFailed",
        "BackstopNotificationsFailing",
        "BackstopFleetLeaseLost",
        "BackstopFleetConfigDrift",
    ] {
        assert!(
            runbook.contains(&format!("## {alert}")),
            "runbook lacks {alert}"
        );
    }
}

/// `status` puts failing jobs first and exits 1 while any job needs attention.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_failing_jobs_first_and_exits_1() {
    let env = crate::harness::Env::new().await;
    env.write_config(&format!(
        "{}{}",
        env.job("healthy", "marketplace", "schedule = \"0 3 * * *\""),
        env.job("broken", "nowhere", "schedule = \"0 3 * * *\"")
    ));
    env.backstop(&["backup", "--job", "healthy"])
        .await
        .assert_ok();
    env.backstop(&["backup", "--job", "healthy"])
        .await
        .assert_ok();
    env.backstop(&["backup", "--job", "broken"])
        .await
        .assert_failed();

    let s = env.backstop(&["status"]).await;
    assert_eq!(s.code, Some(1), "{s:?}");
    let lines: Vec<&str> = s.stdout.lines().collect();
    assert!(
        lines[1].starts_with("broken") && lines[1].contains("FAILING"),
        "{}",
        s.stdout
    );
    assert!(
        s.stdout.contains("error:") && s.stdout.contains("nowhere"),
        "{}",
        s.stdout
    );
    let healthy = lines.iter().find(|l| l.starts_with("healthy")).unwrap();
    assert!(
        healthy.contains(" ok ") && healthy.contains("(1day 12h)"),
        "{healthy}"
    );
    assert!(s.stderr.contains("1 job(s) need attention"), "{}", s.stderr);

    let j = env.backstop(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(v["jobs"][0]["job"], "broken");
    assert_eq!(v["jobs"][1]["state"], "ok");
    assert_eq!(v["jobs"][1]["backups_stored"], 2);
    assert_eq!(v["jobs"][1]["rpo_seconds"], 129600);
    assert!(v["fleet"].is_null(), "{v}");

    // Only the healthy job: exit 0.
    env.write_config(&env.job("healthy", "marketplace", "schedule = \"0 3 * * *\""));
    env.backstop(&["status"]).await.assert_ok();
}

/// The Grafana dashboard is valid JSON and queries only metrics the daemon
/// exports (and Prometheus's own series for histograms).
#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let repo = crate::harness::repo();
    let dash: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("deploy/grafana/backstop.json")).unwrap())
            .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut metrics = std::collections::BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for w in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if w.starts_with("backstop_") {
                    metrics.insert(w.trim_end_matches("_bucket").to_string());
                }
            }
        }
    }
    // Each of them is in a live scrape: see
    // daemon::every_documented_metric_is_in_a_live_scrape.
    for needed in [
        "backstop_job_last_success_timestamp_seconds",
        "backstop_job_rpo_seconds",
        "backstop_job_runs_total",
        "backstop_job_duration_seconds",
        "backstop_backup_last_size_bytes",
        "backstop_backups_stored",
        "backstop_storage_used_bytes",
        "backstop_verify_last_success_timestamp_seconds",
    ] {
        assert!(metrics.contains(needed), "the dashboard lacks {needed}");
    }
}

/// `backstop --version` says exactly what runs: the version, the git commit
/// it was built from and the build date; every manifest's `tool.version`
/// records the same. Completions and man pages come from the command line's
/// own definition.
#[tokio::test(flavor = "multi_thread")]
async fn version_names_its_commit_and_build_date_and_manifests_record_it() {
    use crate::harness::{Env, backstop_version, manifest, repo};
    let version = backstop_version();
    let line = format!("backstop {version}");
    let (semver, rest) = version
        .split_once(" (commit ")
        .unwrap_or_else(|| panic!("{line}"));
    let (commit, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(semver, env!("CARGO_PKG_VERSION"), "{line}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    match head {
        // The build's HEAD is this checkout's (a commit since rebuilds it).
        Some(head) => assert_eq!(commit, head, "{line}"),
        None => assert_eq!(commit, "unknown", "{line}"),
    }
    let built = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(built <= chrono::Utc::now().date_naive(), "{line}");

    let env = Env::new().await;
    let p = env.write_config(&env.job("app", "marketplace", ""));
    run_backstop(&p, &["backup", "--job", "app"])
        .await
        .assert_ok();
    let m = manifest(&env.only_backup("app"));
    assert_eq!(m["tool"]["version"], version.as_str(), "{m}");

    // Completions for each shell name the commands and their options.
    for shell in ["bash", "zsh", "fish"] {
        let run = run_backstop(&p, &["completions", shell]).await;
        run.assert_ok();
        for word in ["restore", "check-config", "--job"] {
            assert!(run.stdout.contains(word), "{shell}: no {word}");
        }
    }
    let run = run_backstop(&p, &["completions", "tcsh"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    // Man pages: backstop(1) and one per command.
    let dir = env.path("man");
    let run = run_backstop(&p, &["manpages", dir.to_str().unwrap()]).await;
    run.assert_ok();
    let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    assert!(
        page("backstop.1").contains(".TH backstop 1"),
        "{}",
        page("backstop.1")
    );
    assert!(
        page("backstop.1").contains(&version),
        "{}",
        page("backstop.1")
    );
    let backup = page("backstop-backup.1");
    assert!(backup.contains("\\-\\-job"), "{backup}");
    assert!(dir.join("backstop-restore.1").exists());
    assert!(dir.join("backstop-catalog-rebuild.1").exists());
    assert!(
        !dir.join("backstop-manpages.1").exists(),
        "the hidden command got a page"
    );
}

/// A config that reads its secrets as the service's credentials
/// (`/run/credentials/backstop.service/NAME`, which exist only inside the
/// service) works from a shell too: each is read from the source the
/// unit's LoadCredential= names (a drop-in's wins over the unit's). A name
/// no LoadCredential= gives is an error that says so.
#[tokio::test(flavor = "multi_thread")]
async fn one_shot_commands_read_the_services_credentials_from_their_sources() {
    use crate::harness::{Env, run_backstop_with};
    let env = Env::new().await;
    let units = env.path("units");
    std::fs::create_dir_all(units.join("backstop.service.d")).unwrap();
    std::fs::write(
        units.join("backstop.service"),
        "[Service]\nLoadCredential=db-password:/nonexistent/db-password\n",
    )
    .unwrap();
    std::fs::write(
        units.join("backstop.service.d/secrets.conf"),
        format!(
            "[Service]\nLoadCredential=db-password:{}\n",
            env.password_file.display()
        ),
    )
    .unwrap();
    let job = env.job("app", "marketplace", "").replace(
        &env.password_file.display().to_string(),
        "/run/credentials/backstop.service/db-password",
    );
    let p = env.write_config(&job);
    let dirs = [("BACKSTOP_TEST_UNIT_DIRS", units.to_str().unwrap())];
    run_backstop_with(&p, &["check-config"], &dirs)
        .await
        .assert_ok();
    run_backstop_with(&p, &["backup", "--job", "app"], &dirs)
        .await
        .assert_ok();
    env.only_backup("app");
    // Without the drop-in: the unit's source, which is missing.
    std::fs::remove_file(units.join("backstop.service.d/secrets.conf")).unwrap();
    let run = run_backstop_with(&p, &["check-config"], &dirs).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("cannot read password_file /nonexistent/db-password")
            && run.stderr.contains("LoadCredential="),
        "{run:?}"
    );
    // No LoadCredential= for it at all.
    std::fs::write(units.join("backstop.service"), "[Service]\n").unwrap();
    let run = run_backstop_with(&p, &["check-config"], &dirs).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("no backstop.service or drop-in names one it can find"),
        "{run:?}"
    );
}
