//! The fault matrix (docs/RELIABILITY.md has one row per test here).
//!
//! Each row breaks one real thing while the daemon runs a backup, and
//! asserts the same four promises:
//! 1. **loud**: the run is marked failed (or interrupted) with the step and
//!    the cause, in the run API and in the catalog;
//! 2. **paged**: the alert metric moves: `last_failure` passes
//!    `last_success` (BackstopJobFailed's expression) and the failed-runs
//!    counter counts the run;
//! 3. **clean**: nothing partial is listed (`list` shows no backup) or left
//!    in the store (no object, no file, no pending multipart upload);
//! 4. **recovers**: once the fault is gone, the next run succeeds and the
//!    alert clears.
//!
//! Length: one row per fault, each small; one file so the matrix reads at
//! a glance next to docs/RELIABILITY.md.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::daemon::{Daemon, daemon_config, wait_for};
use crate::harness::s3::{S3Server, SECRET_KEY};
use crate::harness::s3proxy::{Answer, S3Proxy, s3_error};
use crate::harness::{Env, walk_all, write_private};

const JOB: &str = "app";

async fn metric(d: &Daemon, name: &str, labels: &str) -> f64 {
    d.metric(&format!("{name}{{{labels}}}"))
        .await
        .unwrap_or(0.0)
}

async fn last(d: &Daemon, what: &str) -> f64 {
    metric(
        d,
        &format!("backstop_job_last_{what}_timestamp_seconds"),
        &format!("job=\"{JOB}\",kind=\"backup\""),
    )
    .await
}

/// The job's backup runs in the catalog: (outcome, error), oldest first.
async fn catalog_runs(env: &Env) -> Vec<(String, Option<String>)> {
    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_as("SELECT outcome, error FROM runs WHERE job = ? AND kind = 'backup' ORDER BY id")
        .bind(JOB)
        .fetch_all(&mut c)
        .await
        .unwrap()
}

/// Promises 1 and 2 for the run the daemon reported as `state`.
async fn assert_loud_and_paged(env: &Env, d: &Daemon, state: &Value, step: &str, cause: &str) {
    let log = d.log();
    assert_eq!(state["state"], "failed", "{state}\n{log}");
    let err = state["error"].as_str().unwrap_or_default();
    assert!(err.contains(step), "step {step:?} not named: {err}");
    assert!(err.contains(cause), "cause {cause:?} not given: {err}");
    let runs = catalog_runs(env).await;
    let (outcome, error) = runs.last().expect("the run is in the catalog");
    assert_eq!(outcome, "failed", "{runs:?}");
    let error = error.as_deref().unwrap_or_default();
    assert!(error.contains(step) && error.contains(cause), "{runs:?}");
    assert!(
        last(d, "failure").await > last(d, "success").await,
        "BackstopJobFailed would not fire"
    );
    assert!(
        metric(
            d,
            "backstop_job_runs_total",
            &format!("job=\"{JOB}\",kind=\"backup\",outcome=\"failed\"")
        )
        .await
            >= 1.0
    );
}

/// Promise 3: `leftovers` (what the store still holds besides complete
/// backups) is empty and `list` shows no backup.
async fn assert_clean(env: &Env, leftovers: Vec<String>) {
    assert!(leftovers.is_empty(), "partial data left: {leftovers:?}");
    let list = env.backstop(&["list", "--job", JOB, "--json"]).await;
    list.assert_ok();
    let listed: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
    assert!(listed.is_empty(), "a failed run is listed: {}", list.stdout);
}

/// Promise 4: the next run succeeds, is listed, and the alert clears.
async fn assert_recovers(env: &Env, d: &Daemon) -> Value {
    let state = d.run_to_end(JOB).await;
    assert_eq!(state["state"], "success", "{state}\n{}", d.log());
    assert!(
        last(d, "success").await >= last(d, "failure").await,
        "BackstopJobFailed would still fire"
    );
    let list = env.backstop(&["list", "--job", JOB, "--json"]).await;
    let listed: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{}", list.stdout);
    assert_eq!(listed[0]["backup_id"], state["backup_id"]);
    state
}

/// What an S3 store holds under the job besides complete backups: every
/// object (before the first success there should be none) and every
/// multipart upload not completed or aborted.
/// [`s3_leftovers`] once an abort still on its way has landed (up to 10 s).
async fn settled_s3_leftovers(s3: &S3Server) -> Vec<String> {
    let mut left = s3_leftovers(s3).await;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = s3_leftovers(s3).await;
    }
    left
}

async fn s3_leftovers(s3: &S3Server) -> Vec<String> {
    let mut left = s3.keys(&format!("prod/{JOB}/")).await;
    left.extend(
        s3.pending_uploads()
            .into_iter()
            .map(|p| p.display().to_string()),
    );
    left
}

/// A database `db` with one table of `rows` rows of random md5 text (about
/// 2:1 under zstd: `rows = 250_000` makes two 5 MiB parts).
async fn payload_db(env: &Env, db: &str, rows: u32) {
    env.pg.create_db(db).await;
    env.pg
        .execute(
            db,
            &format!(
                "CREATE TABLE payload AS SELECT g AS id, md5(random()::text) || md5(random()::text) AS body FROM generate_series(1, {rows}) g"
            ),
        )
        .await;
}

/// A daemon config whose job backs up `db` to s3s-fs at `endpoint` (the
/// server itself or a proxy in front of it) in 5 MiB parts.
fn s3_config(env: &Env, s3: &S3Server, endpoint: &str, db: &str, job_extra: &str) -> PathBuf {
    let secret = env.path("s3-secret");
    write_private(&secret, &format!("{SECRET_KEY}\n"));
    let storage = s3
        .storage_toml("offsite", "part_size = \"5MiB\"")
        .replace("{SECRET_FILE}", &secret.display().to_string())
        .replace(&s3.endpoint(), endpoint);
    daemon_config(
        env,
        "",
        &format!(
            "{storage}{}",
            env.job_to(JOB, db, &["offsite"], &format!("retries = 0\n{job_extra}"))
        ),
    )
}

async fn started(cfg: &std::path::Path, env: &Env) -> Daemon {
    let mut d = Daemon::start(cfg, env.path("daemon.log"));
    d.ready().await;
    d
}

/// Rewrites the config (`from` → `to`) and has the daemon reload it.
async fn reload(d: &Daemon, cfg: &std::path::Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(cfg, text.replace(from, to)).unwrap();
    let before = d.log().matches("Configuration reloaded").count();
    d.signal("-HUP");
    wait_for(
        "the reload",
        Duration::from_secs(30),
        || async { d.log().matches("Configuration reloaded").count() > before },
        &d.log,
    )
    .await;
}

/// Polls `cond` every 20 ms for up to `limit`.
async fn poll(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const INTERNAL: &str = "We encountered an internal error. Please try again.";

/// One row through a fault proxy: `rule` breaks one kind of S3 call; the
/// run must fail at `step` with `cause`, the rule is lifted, and the next
/// run succeeds. Returns the proxy, for the row's own assertions.
async fn proxy_row(
    rule: impl Fn(&crate::harness::s3proxy::Req) -> Answer + Send + Sync + 'static,
    job_extra: &str,
    step: &str,
    cause: &str,
) -> (Env, S3Server, S3Proxy) {
    let env = Env::empty().await;
    payload_db(&env, "big", 250_000).await;
    let s3 = S3Server::start();
    let proxy = S3Proxy::start(s3.port).await;
    let cfg = s3_config(
        &env,
        &s3,
        &proxy.endpoint(),
        "big",
        &format!("compression = \"zstd:1\"\n{job_extra}"),
    );
    let d = started(&cfg, &env).await;
    proxy.set_rule(rule);
    let state = d.run_to_end(JOB).await;
    assert_loud_and_paged(&env, &d, &state, step, cause).await;
    let left = settled_s3_leftovers(&s3).await;
    assert_clean(&env, left).await;
    proxy.set_rule(|_| Answer::Forward);
    assert_recovers(&env, &d).await;
    assert_eq!(s3.keys(&format!("prod/{JOB}/")).await.len(), 2);
    assert!(s3.pending_uploads().is_empty());
    (env, s3, proxy)
}

fn is_upload_part(r: &crate::harness::s3proxy::Req) -> bool {
    r.method == "PUT" && r.has("partNumber") && r.has("uploadId")
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_500_on_the_last_part() {
    const PART: u64 = 5 * 1024 * 1024;
    let (_env, _s3, proxy) = proxy_row(
        |r| {
            if is_upload_part(r) && r.len.is_some_and(|n| n < PART) {
                Answer::Respond(500, s3_error("InternalError", INTERNAL))
            } else {
                Answer::Forward
            }
        },
        "",
        "upload to store \"offsite\" failed",
        "InternalError",
    )
    .await;
    let seen = proxy.seen();
    let refused: Vec<_> = seen.iter().filter(|s| s.status == 500).collect();
    // The last part only (part 1 went through), retried as transient.
    assert!(refused.len() >= 2, "not retried: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|s| s.query.contains("partNumber=2") && s.method == "PUT"),
        "{refused:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.method == "PUT" && s.query.contains("partNumber=1") && s.status == 200)
    );
    // The failed upload was aborted, not left for later.
    assert!(
        seen.iter()
            .any(|s| s.method == "DELETE" && s.query.contains("uploadId") && s.status < 300),
        "no AbortMultipartUpload: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_500_on_complete_multipart_upload() {
    let (_env, _s3, proxy) = proxy_row(
        |r| {
            if r.method == "POST" && r.has("uploadId") {
                Answer::Respond(500, s3_error("InternalError", INTERNAL))
            } else {
                Answer::Forward
            }
        },
        "",
        "upload to store \"offsite\" failed",
        "InternalError",
    )
    .await;
    let completes =
        proxy.count(|s| s.method == "POST" && s.query.contains("uploadId") && s.status == 500);
    assert!(completes >= 2, "CompleteMultipartUpload not retried");
    assert!(
        proxy.count(|s| s.method == "DELETE" && s.query.contains("uploadId") && s.status < 300)
            >= 1,
        "no AbortMultipartUpload"
    );
}

/// The store accepts the first part, then stops answering: the job's
/// timeout ends the run and the upload is aborted.
#[tokio::test(flavor = "multi_thread")]
async fn s3_that_stops_answering_mid_upload() {
    let (_env, _s3, proxy) = proxy_row(
        |r| {
            if is_upload_part(r) && r.param("partNumber") == Some("2") {
                Answer::Stall
            } else {
                Answer::Forward
            }
        },
        "timeout = \"8s\"",
        "timed out after 8s",
        "partial uploads removed",
    )
    .await;
    assert!(proxy.count(|s| s.status == 0) >= 1, "nothing stalled");
}

/// The same stalled store without a job timeout: the stall watchdog
/// (stall_timeout) fails the run within seconds, names the store, ends
/// pg_dump's session and aborts the multipart upload.
#[tokio::test(flavor = "multi_thread")]
async fn s3_that_stops_answering_is_failed_as_stalled() {
    let (env, _s3, proxy) = proxy_row(
        |r| {
            if is_upload_part(r) && r.param("partNumber") == Some("2") {
                Answer::Stall
            } else {
                Answer::Forward
            }
        },
        "stall_timeout = \"3s\"",
        "stalled: store \"offsite\"",
        "for 3s; pg_dump was stopped",
    )
    .await;
    assert!(proxy.count(|s| s.status == 0) >= 1, "nothing stalled");
    assert_eq!(
        dump_sessions(&env).await,
        0,
        "pg_dump's session outlived the stall"
    );
}

/// One of two stores stops answering mid-upload (S3 part 2 is never
/// answered): once the local store has the whole artifact and the hung one
/// has not finished for the stall_timeout, it is given up; the backup
/// completes in the local store, and the run fails naming the hung store;
/// its multipart upload is aborted. Before, the stream waited on the
/// hung store and the watchdog failed the backup in both.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_store_fails_only_itself_and_the_other_store_completes() {
    let env = Env::empty().await;
    payload_db(&env, "big", 250_000).await;
    let s3 = S3Server::start();
    let proxy = S3Proxy::start(s3.port).await;
    let secret = env.path("s3-secret");
    write_private(&secret, &format!("{SECRET_KEY}\n"));
    let storage = s3
        .storage_toml("offsite", "part_size = \"5MiB\"")
        .replace("{SECRET_FILE}", &secret.display().to_string())
        .replace(&s3.endpoint(), &proxy.endpoint());
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "{storage}{}",
            env.job_to(
                JOB,
                "big",
                &["local", "offsite"],
                "retries = 0\ncompression = \"zstd:1\"\nstall_timeout = \"4s\""
            )
        ),
    );
    let d = started(&cfg, &env).await;
    proxy.set_rule(|r| {
        if is_upload_part(r) && r.param("partNumber") == Some("2") {
            Answer::Stall
        } else {
            Answer::Forward
        }
    });
    let state = d.run_to_end(JOB).await;
    assert_eq!(state["state"], "failed", "{state}\n{}", d.log());
    let error = state["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is complete in local but failed in store \"offsite\"")
            && error.contains("it was given up"),
        "{state}\n{}",
        d.log()
    );
    let m = crate::harness::manifest(&env.only_backup(JOB));
    assert_eq!(
        m["inventory"]["per_table"][0]["rows"].as_i64(),
        Some(250_000),
        "{m}"
    );
    let left = settled_s3_leftovers(&s3).await;
    assert!(left.is_empty(), "left in the bucket: {left:?}");
    assert!(proxy.count(|s| s.status == 0) >= 1, "nothing stalled");
}

/// The store fails the listing that confirms the uploaded sizes: the
/// manifest is never written and the uploaded artifact is removed.
#[tokio::test(flavor = "multi_thread")]
async fn s3_fails_the_confirmation_listing() {
    let (_env, _s3, proxy) = proxy_row(
        |r| match r.list_prefix() {
            // The backup's own folder (prod/app/<id>/), not the job listing.
            Some(p) if p.starts_with(&format!("prod/{JOB}/2")) => {
                Answer::Respond(500, s3_error("InternalError", INTERNAL))
            }
            _ => Answer::Forward,
        },
        "",
        "confirm upload to store \"offsite\" failed",
        "InternalError",
    )
    .await;
    assert!(
        proxy.count(|s| s.method == "PUT" && s.path.ends_with("/manifest.json")) == 1,
        "a manifest was written while the confirmation failed (only the recovery's may be)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_fails_the_manifest_write() {
    let (_env, _s3, proxy) = proxy_row(
        |r| {
            if r.method == "PUT" && r.path.ends_with("/manifest.json") {
                Answer::Respond(500, s3_error("InternalError", INTERNAL))
            } else {
                Answer::Forward
            }
        },
        "",
        "write manifest to store \"offsite\" failed",
        "InternalError",
    )
    .await;
    assert!(proxy.count(|s| s.path.ends_with("/manifest.json") && s.status == 500) >= 2);
}

/// s3s-fs is SIGKILLed while parts are uploading; the upload it could not be
/// told to abort is aborted by the next run.
#[tokio::test(flavor = "multi_thread")]
async fn s3_killed_mid_upload() {
    let env = Env::empty().await;
    payload_db(&env, "big", 500_000).await;
    let mut s3 = S3Server::start();
    let cfg = s3_config(
        &env,
        &s3,
        &s3.endpoint(),
        "big",
        "compression = \"zstd:19\"",
    );
    let d = started(&cfg, &env).await;
    let id = d.start_run(JOB).await;
    poll("a stored part", Duration::from_secs(120), || {
        s3.uploaded_parts() > 0
    })
    .await;
    s3.kill();
    let state = d.wait_run(JOB, id).await;
    assert_loud_and_paged(
        &env,
        &d,
        &state,
        "upload to store \"offsite\" failed",
        "s3://backups/prod/app/",
    )
    .await;
    s3.restart();
    assert_clean(&env, s3.keys(&format!("prod/{JOB}/")).await).await;
    assert_eq!(
        s3.pending_uploads().len(),
        1,
        "the dead server kept the upload"
    );
    reload(&d, &cfg, "zstd:19", "zstd:1").await;
    assert_recovers(&env, &d).await;
    assert!(
        d.log()
            .contains("Aborted a multipart upload left by an interrupted run"),
        "{}",
        d.log()
    );
    assert!(s3.pending_uploads().is_empty());
    assert_eq!(s3.keys(&format!("prod/{JOB}/")).await.len(), 2);
}

/// A daemon whose job dumps a 600,000-row table throttled by zstd:19 into
/// the local store; returns it with the run id and pid of pg_dump's backend
/// once its COPY is running.
async fn slow_local_run(env: &Env, job_extra: &str) -> (PathBuf, Daemon, u64, i32) {
    payload_db(env, "big", 600_000).await;
    let cfg = daemon_config(
        env,
        "",
        &env.job(
            JOB,
            "big",
            &format!("retries = 0\ncompression = \"zstd:19\"\n{job_extra}"),
        ),
    );
    let d = started(&cfg, env).await;
    let id = d.start_run(JOB).await;
    let mut c = env.pg.connect("postgres").await;
    let start = Instant::now();
    loop {
        let pids: Vec<(i32,)> = sqlx::query_as(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'backstop-pg_dump-%' AND query LIKE 'COPY %' AND state = 'active'",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        if let Some((pid,)) = pids.first() {
            return (cfg, d, id, *pid);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never caught pg_dump in its COPY"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of backstop's dump tools still on the server.
async fn dump_sessions(env: &Env) -> i64 {
    let mut c = env.pg.connect("postgres").await;
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'backstop-pg_dump%'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    n
}

/// pg_dump stops writing in the middle of its COPY (SIGSTOP: what a hung
/// client or a network gone quiet looks like from backstop), holding its
/// snapshot and locks. With stall_timeout = 3s the run fails as stalled at
/// pg_dump, its backend is ended before the run is reported, the stopped
/// process is killed, and nothing partial is left.
#[tokio::test(flavor = "multi_thread")]
async fn pg_dump_that_stops_writing_is_failed_as_stalled() {
    let env = Env::empty().await;
    let (wrapper, pid_file) = pg_dump_with_pid(&env);
    let (cfg, d, id, backend) =
        slow_local_run(&env, &format!("stall_timeout = \"3s\"\n{wrapper}")).await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    // The application's session: ending pg_dump's must leave it alone.
    let mut bystander = env.pg.connect("big").await;
    crate::harness::kill("-STOP", &pid);
    let stopped = Instant::now();
    let state = d.wait_run(JOB, id).await;
    let took = stopped.elapsed();
    assert_loud_and_paged(
        &env,
        &d,
        &state,
        "stalled: pg_dump wrote no output for 3s",
        &format!("its session was ended (pid {backend})"),
    )
    .await;
    assert!(
        took < Duration::from_secs(30),
        "the stall took {took:?} to act on"
    );
    // Ended before the run was reported, not eventually.
    assert_eq!(
        dump_sessions(&env).await,
        0,
        "pg_dump's session outlived the stall"
    );
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM payload")
        .fetch_one(&mut bystander)
        .await
        .expect("only pg_dump's session is ended, not the application's");
    assert_eq!(n, 600_000);
    poll(
        "the stopped pg_dump to be killed",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        },
    )
    .await;
    assert_clean(&env, local_leftovers(&env)).await;
    reload(&d, &cfg, "zstd:19", "zstd:1").await;
    assert_recovers(&env, &d).await;
}

/// After the watchdog fires, the snapshot's transaction is ended within a
/// bound: here its backend is stopped too (SIGSTOP: a server or network
/// that no longer answers), and COMMIT on it would never return. Before,
/// the run hung there for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_session_that_stops_answering_does_not_hang_a_stalled_run() {
    let env = Env::empty().await;
    let (wrapper, pid_file) = pg_dump_with_pid(&env);
    let (_cfg, d, id, _backend) =
        slow_local_run(&env, &format!("stall_timeout = \"3s\"\n{wrapper}")).await;
    let mut c = env.pg.connect("postgres").await;
    let (snapshot,): (i32,) = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = 'big' AND application_name = 'backstop' AND state = 'idle in transaction'",
    )
    .fetch_one(&mut c)
    .await
    .expect("the snapshot's session");
    let dump = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    crate::harness::kill("-STOP", snapshot);
    crate::harness::kill("-STOP", &dump);
    let stopped = Instant::now();
    let state = tokio::time::timeout(Duration::from_secs(90), d.wait_run(JOB, id)).await;
    let took = stopped.elapsed();
    crate::harness::kill("-CONT", snapshot);
    let state = state
        .unwrap_or_else(|_| panic!("the run hung on the stopped snapshot session:\n{}", d.log()));
    assert_eq!(state["state"], "failed", "{state}");
    assert!(
        state["error"]
            .as_str()
            .is_some_and(|e| e.contains("stalled: pg_dump wrote no output for 3s")),
        "{state}"
    );
    assert!(
        took < Duration::from_secs(40),
        "the stalled run took {took:?} to end"
    );
    assert!(d.log().contains("did not answer COMMIT"), "{}", d.log());
    assert_clean(&env, local_leftovers(&env)).await;
}

/// A pg_dump that writes its pid to a file first (to stop it later): the
/// job's `pg_dump_path` line and the file.
fn pg_dump_with_pid(env: &Env) -> (String, PathBuf) {
    let pid_file = env.path("pg_dump.pid");
    let wrapper = crate::harness::pg_dump_wrapper(
        env,
        "pg_dump-that-stops",
        &format!("echo $$ > '{}'\nexec \"$REAL\" \"$@\"", pid_file.display()),
    );
    (wrapper, pid_file)
}

/// pg_dump's own words when its COPY breaks; what follows depends on
/// timing ("terminating connection due to administrator command" or
/// "server closed the connection unexpectedly"), so it is not asserted.
const COPY_FAILED: &str = "Dumping the contents of table \"payload\" failed";

fn local_leftovers(env: &Env) -> Vec<String> {
    walk_all(&env.store())
        .into_iter()
        .map(|p| p.display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_killed_mid_dump_then_restarted() {
    let mut env = Env::empty().await;
    let (cfg, d, id, _) = slow_local_run(&env, "").await;
    env.pg.kill();
    let state = d.wait_run(JOB, id).await;
    assert_loud_and_paged(&env, &d, &state, "pg_dump failed", COPY_FAILED).await;
    assert_clean(&env, local_leftovers(&env)).await;
    env.pg.restart();
    reload(&d, &cfg, "zstd:19", "zstd:1").await;
    let ok = assert_recovers(&env, &d).await;
    let m = crate::harness::manifest(
        &env.store()
            .join(JOB)
            .join(ok["backup_id"].as_str().unwrap()),
    );
    let rows = m["inventory"]["per_table"][0]["rows"].as_i64();
    assert_eq!(rows, Some(600_000), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_terminated_mid_copy() {
    let env = Env::empty().await;
    let (cfg, d, id, pid) = slow_local_run(&env, "").await;
    let mut c = env.pg.connect("postgres").await;
    let (ok,): (bool,) = sqlx::query_as("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(ok);
    let state = d.wait_run(JOB, id).await;
    assert_loud_and_paged(&env, &d, &state, "pg_dump failed", COPY_FAILED).await;
    assert_clean(&env, local_leftovers(&env)).await;
    reload(&d, &cfg, "zstd:19", "zstd:1").await;
    assert_recovers(&env, &d).await;
}

/// The daemon is SIGKILLed mid-run: the restarted daemon marks the run
/// interrupted (and counts it), nothing of it is listed, and the catch-up
/// run succeeds exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn daemon_sigkilled_mid_run_then_restarted() {
    let env = Env::empty().await;
    payload_db(&env, "big", 600_000).await;
    let cfg = daemon_config(
        &env,
        "",
        &env.job(
            JOB,
            "big",
            "retries = 0\ncompression = \"zstd:19\"\nschedule = \"0 3 * * *\"",
        ),
    );
    // No success yet: the daemon catches up at once.
    let mut d = started(&cfg, &env).await;
    wait_for(
        "the catch-up run to write",
        Duration::from_secs(60),
        || async { !local_leftovers(&env).is_empty() },
        &d.log,
    )
    .await;
    d.signal("-KILL");
    d.exit_code(Duration::from_secs(10)).await;
    assert_eq!(catalog_runs(&env).await.last().unwrap().0, "running");
    // A killed writer leaves a partial file; it is never listed.
    assert_clean(&env, vec![]).await;

    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("zstd:19", "zstd:1")).unwrap();
    let mut d2 = Daemon::start(&cfg, env.path("daemon2.log"));
    d2.ready().await;
    let interrupted = metric(
        &d2,
        "backstop_job_runs_total",
        &format!("job=\"{JOB}\",kind=\"backup\",outcome=\"interrupted\""),
    )
    .await;
    assert_eq!(interrupted, 1.0, "the interrupted run is not counted");
    wait_for(
        "the catch-up after the crash",
        Duration::from_secs(60),
        || async { last(&d2, "success").await > 0.0 },
        &d2.log,
    )
    .await;
    let runs = catalog_runs(&env).await;
    assert_eq!(runs[0].0, "interrupted", "{runs:?}");
    assert!(
        runs[0].1.as_deref().unwrap().contains("SIGKILL"),
        "{runs:?}"
    );
    assert_eq!(
        runs.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["interrupted", "success"]
    );
    // The partial file of the killed writer is gone: one backup, two files.
    let files = crate::harness::walk(&env.store());
    assert_eq!(files.len(), 2, "{files:?}");
    let list = env.backstop(&["list", "--job", JOB, "--json"]).await;
    let listed: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed.len(), 1);
}

/// The local store's filesystem fills up mid-write. The daemon runs in a
/// mount namespace of its own with a 2 MiB tmpfs as its store, so the full
/// disk is real and disappears with the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn local_store_disk_full() {
    let env = Env::new().await;
    let store = env.store();
    std::fs::create_dir_all(&store).unwrap();
    let cfg = daemon_config(&env, "", &env.job(JOB, "marketplace", "retries = 0"));
    let root = crate::harness::is_root();
    let mut cmd = tokio::process::Command::new("unshare");
    if !root {
        cmd.args(["--user", "--map-root-user"]);
    }
    // All but 16 KiB taken by a filler: the dump (about 100 KiB) cannot fit.
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=2m tmpfs '{s}' && head -c 2080768 /dev/zero > '{s}/filler' && exec '{bin}' run",
            s = store.display(),
            bin = crate::harness::backstop_bin()
        ));
    let mut d = Daemon::spawn(cmd, &cfg, env.path("daemon.log"), &[]);
    d.ready().await;
    let pid = d.child.id().unwrap().to_string();
    // Runs a command in the daemon's mount namespace.
    let inside = |args: &[&str]| {
        let mut c = std::process::Command::new("nsenter");
        c.args(["-t", &pid]);
        if !root {
            c.args(["--user", "--preserve-credentials"]);
        }
        c.arg("--mount").arg("--").args(args);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let store_s = store.display().to_string();
    let state = d.run_to_end(JOB).await;
    assert_loud_and_paged(
        &env,
        &d,
        &state,
        "upload to store \"local\" failed",
        "No space left on device",
    )
    .await;
    let left: Vec<String> = inside(&[
        "find",
        &store_s,
        "-mindepth",
        "1",
        "-not",
        "-name",
        "filler",
    ])
    .lines()
    .map(str::to_string)
    // The job's folder may stay; nothing inside it.
    .filter(|p| p != &format!("{store_s}/{JOB}"))
    .collect();
    assert_clean_inside(&env, &pid, root, left).await;
    inside(&["rm", &format!("{store_s}/filler")]);
    let state = d.run_to_end(JOB).await;
    assert_eq!(state["state"], "success", "{state}\n{}", d.log());
    assert!(last(&d, "success").await >= last(&d, "failure").await);
    let files = inside(&["find", &store_s, "-type", "f"]);
    assert!(
        files.lines().count() == 2 && files.contains("manifest.json"),
        "{files}"
    );
}

/// Promise 3 for a store only the daemon's namespace sees: `list` runs in
/// there too.
async fn assert_clean_inside(env: &Env, pid: &str, root: bool, leftovers: Vec<String>) {
    assert!(leftovers.is_empty(), "partial data left: {leftovers:?}");
    let mut c = std::process::Command::new("nsenter");
    c.args(["-t", pid]);
    if !root {
        c.args(["--user", "--preserve-credentials"]);
    }
    let out = c
        .args(["--mount", "--"])
        .arg(crate::harness::backstop_bin())
        .args(["list", "--job", JOB, "--json"])
        .env("BACKSTOP_CONFIG", env.path("backstop.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listed.is_empty());
}

async fn last_of(d: &Daemon, what: &str, kind: &str) -> f64 {
    metric(
        d,
        &format!("backstop_job_last_{what}_timestamp_seconds"),
        &format!("job=\"{JOB}\",kind=\"{kind}\""),
    )
    .await
}

/// A stored object is corrupted: the daemon's scheduled checksum verify
/// (no key needed) fails naming the backup and the mismatch, the verify
/// alert's condition holds, the backup is left exactly as found (verify
/// never repairs or deletes), and after a new backup the next verify passes.
#[tokio::test(flavor = "multi_thread")]
async fn corrupted_stored_object_is_detected_by_verify() {
    let env = Env::new().await;
    let cfg = daemon_config(
        &env,
        "",
        &env.job(
            JOB,
            "marketplace",
            "retries = 0\nverify = { schedule = \"* * * * * *\", level = \"checksum\" }",
        ),
    );
    let d = started(&cfg, &env).await;
    let ok = format!("job=\"{JOB}\",kind=\"verify\",outcome=\"success\"");
    let failed = format!("job=\"{JOB}\",kind=\"verify\",outcome=\"failed\"");
    let skipped = format!("job=\"{JOB}\",kind=\"verify\",outcome=\"skipped\"");
    // Regression: before the first backup there is nothing to verify; that
    // is a skip, not a failed verification (it used to page).
    wait_for(
        "a verify tick before any backup",
        Duration::from_secs(30),
        || async { metric(&d, "backstop_job_runs_total", &skipped).await >= 1.0 },
        &d.log,
    )
    .await;
    assert_eq!(metric(&d, "backstop_job_runs_total", &failed).await, 0.0);
    assert_eq!(last_of(&d, "failure", "verify").await, 0.0);
    let first = d.run_to_end(JOB).await;
    assert_eq!(first["state"], "success");
    let id = first["backup_id"].as_str().unwrap().to_string();
    wait_for(
        "a passing verify",
        Duration::from_secs(30),
        || async { metric(&d, "backstop_job_runs_total", &ok).await >= 1.0 },
        &d.log,
    )
    .await;
    let art = env
        .store()
        .join(JOB)
        .join(&id)
        .join("database.dump.zst.age");
    crate::verify::flip_byte(&art, 500);
    let damaged = std::fs::read(&art).unwrap();
    wait_for(
        "the damage to be found",
        Duration::from_secs(30),
        || async { metric(&d, "backstop_job_runs_total", &failed).await >= 1.0 },
        &d.log,
    )
    .await;
    // 1. loud: the catalog names the backup and what differs.
    use sqlx::Connection;
    let url = format!("sqlite://{}", env.path("catalog.db").display());
    let mut c = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    let all: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT kind, outcome, error FROM runs ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap();
    let error = all
        .iter()
        .rev()
        .find(|(k, o, _)| k == "verify" && o == "failed")
        .and_then(|r| r.2.clone())
        .unwrap_or_else(|| panic!("no failed verify run in the catalog: {all:?}"));
    assert!(error.contains("sha256 differs"), "{error}");
    assert!(
        d.log().contains("Scheduled verification FAILED"),
        "{}",
        d.log()
    );
    // 2. paged: BackstopVerifyFailed's expression.
    assert!(last_of(&d, "failure", "verify").await > last_of(&d, "success", "verify").await);
    // 3. the backup is as it was: still listed, shown as failing its check,
    // not repaired, nothing added or removed.
    assert_eq!(std::fs::read(&art).unwrap(), damaged);
    // (Each verification adds its own record beside the manifest: the
    // backup's files themselves are the same two.)
    let files = crate::harness::walk(&env.store());
    let (records, backup): (Vec<_>, Vec<_>) = files
        .iter()
        .partition(|p| p.to_string_lossy().contains("/verify/"));
    assert_eq!(backup.len(), 2, "{files:?}");
    // Named by their finish time: the passing verify before the damage,
    // then the failing ones.
    let mut records = records;
    records.sort();
    let ok_of = |p: &std::path::PathBuf| {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap()["ok"]
            .clone()
    };
    assert!(records.len() >= 2, "{files:?}");
    assert_eq!(ok_of(records[0]), true);
    assert_eq!(ok_of(records.last().unwrap()), false);
    let list = env.backstop(&["list", "--job", JOB]).await;
    assert!(list.stdout.contains("FAILED checksum"), "{}", list.stdout);
    // 4. a new backup, and the next verify (of the latest) passes.
    let before = metric(&d, "backstop_job_runs_total", &ok).await;
    assert_eq!(d.run_to_end(JOB).await["state"], "success");
    wait_for(
        "a passing verify of the new backup",
        Duration::from_secs(30),
        || async { metric(&d, "backstop_job_runs_total", &ok).await > before },
        &d.log,
    )
    .await;
    assert!(last_of(&d, "success", "verify").await >= last_of(&d, "failure", "verify").await);
}

/// Thirty days of failing backups (the database is down) with a prune every
/// day: retention keeps every good backup (never fewer than min_keep, never
/// the newest), nothing is deleted, the failures are in the catalog and the
/// metrics page, and the first good run after them is listed.
#[tokio::test(flavor = "multi_thread")]
async fn thirty_days_of_failing_backups_delete_nothing() {
    use crate::harness::run_backstop_with;
    let mut env = Env::new().await;
    let cfg = env.write_config(&env.job(
        JOB,
        "marketplace",
        "retries = 0\nrpo = \"26h\"\nretention = { keep_daily = 5, min_keep = 3 }",
    ));
    let at = |day: u32| {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()
            + chrono::Days::new(day as u64 - 1);
        format!("{d}T02:00:00Z")
    };
    for day in 1..=5 {
        run_backstop_with(
            &cfg,
            &["backup", "--job", JOB],
            &[("BACKSTOP_TEST_NOW", &at(day))],
        )
        .await
        .assert_ok();
    }
    let good = crate::harness::walk(&env.store());
    assert_eq!(good.len(), 10);
    env.pg.stop();
    for day in 6..=35 {
        let now = at(day);
        let run = run_backstop_with(
            &cfg,
            &["backup", "--job", JOB],
            &[("BACKSTOP_TEST_NOW", &now)],
        )
        .await;
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains("connect failed"), "{}", run.stderr);
        let prune = run_backstop_with(
            &cfg,
            &["prune", "--job", JOB],
            &[("BACKSTOP_TEST_NOW", &now)],
        )
        .await;
        prune.assert_ok();
        assert_eq!(
            crate::harness::walk(&env.store()),
            good,
            "day {day}: {}",
            prune.stdout
        );
    }
    let runs = catalog_runs(&env).await;
    assert_eq!(runs.iter().filter(|r| r.0 == "failed").count(), 30);
    assert!(
        runs.iter()
            .rev()
            .take(30)
            .all(|r| r.1.as_deref().unwrap_or("").contains("connect failed"))
    );
    // The metrics a daemon seeds from the catalog page for it.
    let dcfg = daemon_config(
        &env,
        "",
        &env.job(
            JOB,
            "marketplace",
            "retries = 0\nrpo = \"26h\"\nretention = { keep_daily = 5, min_keep = 3 }",
        ),
    );
    let mut d = Daemon::start(&dcfg, env.path("daemon.log"));
    d.ready().await;
    assert!(last(&d, "failure").await > last(&d, "success").await);
    assert_eq!(
        metric(&d, "backstop_job_rpo_seconds", &format!("job=\"{JOB}\"")).await,
        93600.0
    );
    d.signal("-TERM");
    d.exit_code(Duration::from_secs(30)).await;
    // The first good run after the outage.
    env.pg.restart();
    run_backstop_with(
        &cfg,
        &["backup", "--job", JOB],
        &[("BACKSTOP_TEST_NOW", &at(36))],
    )
    .await
    .assert_ok();
    let list = env.backstop(&["list", "--job", JOB, "--json"]).await;
    let listed: Vec<Value> = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(listed.len(), 6);
    assert!(
        listed[0]["backup_id"]
            .as_str()
            .unwrap()
            .starts_with("2026-02-05")
    );
}

/// Every secret the daemon holds (database password, S3 secret key, API
/// token, age identity, webhook signing key) is absent from its logs (JSON
/// lines, each of which parses), its metrics, the manifests in both stores,
/// every file of the catalog, the webhook bodies, and the command line of
/// every process on the machine while a backup and a verify run.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_metrics_manifests_catalog_or_argv() {
    let env = Env::empty().await;
    payload_db(&env, "big", 200_000).await;
    let s3 = S3Server::start();
    let hooks = crate::harness::receivers::HttpReceiver::start(&[]).await;
    let hmac = "hmac-key-Zq8vW2xR7pL4";
    write_private(&env.path("hook-secret"), hmac);
    let identity = std::fs::read_to_string(&env.identity).unwrap();
    let age_secret = identity
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap()
        .to_string();
    let secret = env.path("s3-secret");
    write_private(&secret, &format!("{SECRET_KEY}\n"));
    let storage = s3
        .storage_toml("offsite", "")
        .replace("{SECRET_FILE}", &secret.display().to_string());
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "[notify.hook]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_file = \"{}\"\non = [\"failure\", \"success\"]\n\n{storage}{}{}",
            hooks.url("/hook"),
            env.path("hook-secret").display(),
            env.job_to(
                JOB,
                "big",
                &["local", "offsite"],
                &format!(
                    "retries = 0\ncompression = \"zstd:9\"\nnotify = [\"hook\"]\nidentity_file = \"{}\"\nverify = {{ schedule = \"* * * * * *\", level = \"decrypt\" }}",
                    env.identity.display()
                )
            ),
            env.job("missing", "nosuchdb", "retries = 0\nnotify = [\"hook\"]"),
        ),
    );
    let mut cmd = tokio::process::Command::new(crate::harness::backstop_bin());
    cmd.args(["--log-format", "json", "run"]);
    let mut d = Daemon::spawn(cmd, &cfg, env.path("daemon.log"), &[]);
    d.ready().await;
    let id = d.start_run(JOB).await;
    // Every process's command line, sampled while the run goes.
    let mut cmdlines = std::collections::BTreeSet::new();
    let sampler = async {
        loop {
            for p in std::fs::read_dir("/proc").unwrap().flatten() {
                if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    // The test's own S3 server takes its key on its command
                    // line; it is the fixture, not backstop.
                    if !c.contains("s3s-fs") {
                        cmdlines.insert(c);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let state = tokio::select! {
        s = d.wait_run(JOB, id) => s,
        () = sampler => unreachable!(),
    };
    assert_eq!(state["state"], "success", "{state}\n{}", d.log());
    assert!(
        cmdlines
            .iter()
            .any(|c| c.contains("pg_dump") && c.contains("--snapshot=")),
        "the sampler never saw pg_dump"
    );
    wait_for(
        "a decrypting verify",
        Duration::from_secs(60),
        || async {
            metric(
                &d,
                "backstop_job_runs_total",
                &format!("job=\"{JOB}\",kind=\"verify\",outcome=\"success\""),
            )
            .await
                >= 1.0
        },
        &d.log,
    )
    .await;
    // And a failure: its error path is logged, notified and recorded.
    assert_eq!(d.run_to_end("missing").await["state"], "failed");
    let (_, metrics) = d.http("GET", "/metrics", None).await;
    let token = d.token.clone();
    d.signal("-TERM");
    assert_eq!(d.exit_code(Duration::from_secs(60)).await, Some(0));

    let log = d.log();
    assert!(log.lines().count() > 5);
    for line in log.lines() {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    let mut texts: Vec<(String, String)> = vec![
        ("daemon log".into(), log),
        ("metrics".into(), metrics),
        (
            "argv".into(),
            cmdlines.into_iter().collect::<Vec<_>>().join("\n"),
        ),
    ];
    let webhooks: Vec<String> = hooks
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert!(webhooks.len() >= 2, "{webhooks:?}");
    texts.push(("webhooks".into(), webhooks.join("\n")));
    for f in crate::harness::walk(&env.store()) {
        if f.ends_with("manifest.json") {
            texts.push((
                f.display().to_string(),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    for k in s3.keys("prod/").await {
        if k.ends_with("manifest.json") {
            texts.push((
                k.clone(),
                std::fs::read_to_string(s3.object_path(&k)).unwrap(),
            ));
        }
    }
    assert!(
        texts
            .iter()
            .filter(|(n, _)| n.ends_with("manifest.json"))
            .count()
            == 2
    );
    let catalog_files = env.catalog_files();
    assert!(!catalog_files.is_empty());
    for f in catalog_files {
        texts.push((
            f.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned(),
        ));
    }
    // The catalog scan reads the runs themselves (not an empty file).
    assert!(
        texts
            .iter()
            .any(|(n, t)| n.ends_with("catalog.db") && t.contains("nosuchdb"))
    );
    for (what, secret) in [
        ("database password", env.pg.password.as_str()),
        ("S3 secret key", SECRET_KEY),
        ("API token", token.as_str()),
        ("age identity", age_secret.as_str()),
        ("webhook signing key", hmac),
    ] {
        for (name, text) in &texts {
            assert!(!text.contains(secret), "the {what} appears in {name}");
        }
    }
}
