//! Notifications end to end: the real binary sending to a local HTTP(S)
//! receiver and a local SMTP sink started by the test.

use std::time::Duration;

use crate::harness::daemon::{Daemon, daemon_config};
use crate::harness::receivers::{HttpReceiver, Reply, SmtpMode, SmtpSink, TestCa};
use crate::harness::{Env, write_private};

const WAIT: Duration = Duration::from_secs(60);

/// HMAC-SHA256 of `body` under `key`, hex, computed by the stock `openssl`
/// (an implementation independent of backstop's).
fn openssl_hmac(key: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_notifies_a_failure_once_after_its_retries_then_the_recovery() {
    let env = Env::new().await;
    let hooks = HttpReceiver::start(&[]).await;
    let secret = env.path("hook-secret");
    write_private(&secret, "hmac-key-123\n");
    // The Slack URL is itself the credential: kept in a private file.
    let slack_url = env.path("slack-url");
    write_private(
        &slack_url,
        &format!("{}\n", hooks.url("/services/T1/B2/sl4ck-t0ken")),
    );
    let notifiers = format!(
        "[notify.oncall]\ntype = \"webhook\"\nurl = \"{}\"\nsecret_file = \"{}\"\n\n[notify.chat]\ntype = \"slack\"\nurl_file = \"{}\"\n\n",
        hooks.url("/hook"),
        secret.display(),
        slack_url.display()
    );
    // appdb does not exist yet: the first run fails (after one retry).
    let job = env.job(
        "app",
        "appdb",
        "notify = [\"oncall\", \"chat\"]\nretries = 1\nretry_backoff = \"1s\"",
    );
    let cfg = daemon_config(&env, "", &format!("{notifiers}{job}"));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;

    let failed = d.run_to_end("app").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let got = hooks.wait_for(2, WAIT).await;
    let hook = got.iter().find(|r| r.path == "/hook").unwrap();
    let v = hook.json();
    assert_eq!(v["event"], "failure");
    assert_eq!(v["job"], "app");
    assert_eq!(v["kind"], "backup");
    assert_eq!(v["outcome"], "failed");
    assert_eq!(v["attempts"], 2, "one notification for both attempts: {v}");
    assert!(v["error"].as_str().unwrap().contains("appdb"), "{v}");
    assert_eq!(v["storage"][0], "local");
    assert!(v["duration_seconds"].as_f64().unwrap() >= 1.0, "{v}");
    // The signature is HMAC-SHA256 of the exact body under the secret.
    assert_eq!(
        hook.header("x-backstop-signature-256").unwrap(),
        format!("sha256={}", openssl_hmac("hmac-key-123", &hook.body))
    );
    assert_eq!(
        hook.header("x-backstop-delivery").unwrap(),
        v["delivery_id"]
    );
    // The receiver's logs say exactly which build sent it.
    assert_eq!(
        hook.header("user-agent").unwrap(),
        format!("backstop/{}", crate::harness::backstop_version())
    );
    let slack = got
        .iter()
        .find(|r| r.path.starts_with("/services/"))
        .unwrap();
    let text = slack.json()["text"].as_str().unwrap().to_string();
    assert!(
        text.starts_with(":red_circle: *backstop: backup of job \"app\" FAILED*"),
        "{text}"
    );
    assert!(
        text.contains("*Attempts:* 2") && text.contains("appdb"),
        "{text}"
    );
    assert!(slack.header("x-backstop-signature-256").is_none());

    // Fixed: the next run succeeds and says so once, with the backup.
    env.pg.marketplace("appdb").await;
    let ok = d.run_to_end("app").await;
    assert_eq!(ok["state"], "success", "{ok}");
    let got = hooks.wait_for(4, WAIT).await;
    let recovery = got[2..]
        .iter()
        .find(|r| r.path == "/hook")
        .expect("a recovery webhook")
        .json();
    assert_eq!(recovery["event"], "recovery");
    assert_eq!(recovery["outcome"], "success");
    assert_eq!(recovery["previous_outcome"], "failed");
    assert_eq!(recovery["backup_id"], ok["backup_id"]);
    assert!(recovery["error"].is_null());
    assert!(
        recovery["dump_bytes"].as_u64().unwrap() > 10_000,
        "{recovery}"
    );
    assert!(recovery["stored_bytes"].as_u64().unwrap() > 0);
    let slack = got[2..]
        .iter()
        .find(|r| r.path.starts_with("/services/"))
        .unwrap();
    assert!(
        slack.json()["text"]
            .as_str()
            .unwrap()
            .contains("backup of job \"app\" recovered"),
        "{:?}",
        slack.json()
    );

    // An ordinary success is not news (default on = failure, suspect,
    // recovery); the next failure is. So the receiver sees exactly
    // failure, recovery, failure: nothing for the third run.
    assert_eq!(d.run_to_end("app").await["state"], "success");
    env.pg
        .execute("postgres", "DROP DATABASE appdb WITH (FORCE)")
        .await;
    assert_eq!(d.run_to_end("app").await["state"], "failed");
    let got = hooks.wait_for(6, WAIT).await;
    let events: Vec<String> = got
        .iter()
        .filter(|r| r.path == "/hook")
        .map(|r| r.json()["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(events, ["failure", "recovery", "failure"]);
    crate::harness::daemon::wait_for(
        "the counters",
        WAIT,
        || async {
            d.metric(r#"backstop_notifications_sent_total{job="app",outcome="failure"}"#)
                .await
                == Some(4.0)
        },
        &d.log,
    )
    .await;
    assert_eq!(
        d.metric(r#"backstop_notifications_sent_total{job="app",outcome="recovery"}"#)
            .await,
        Some(2.0)
    );
    assert_eq!(
        d.metric(r#"backstop_notifications_failed_total{job="app",outcome="failure"}"#)
            .await,
        Some(0.0)
    );
    assert_eq!(hooks.requests().len(), 6);
    // Neither the Slack URL's token nor the HMAC key is ever logged.
    let log = d.log();
    assert!(log.contains("Notification sent."), "{log}");
    assert!(
        !log.contains("sl4ck-t0ken") && !log.contains("hmac-key-123"),
        "{log}"
    );
    let metrics = d.http("GET", "/metrics", None).await.1;
    assert!(!metrics.contains("sl4ck-t0ken"));
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_receivers_are_retried_logged_and_counted_and_never_hold_up_a_backup() {
    let env = Env::new().await;
    // Answers 503 twice (first with Retry-After: 2), then 200.
    let flaky = HttpReceiver::start(&[Reply::RetryAfter(503, 2), Reply::Status(503)]).await;
    // Asks for an hour: capped at a minute.
    let greedy = HttpReceiver::start(&[Reply::RetryAfter(503, 3600)]).await;
    // Regression (issue 12, item 1): a backoff over 60 s made the Retry-After
    // arithmetic panic, and the panic was swallowed without a word.
    let patient = HttpReceiver::start(&[Reply::RetryAfter(503, 1)]).await;
    // Reads the request and never answers.
    let hang = HttpReceiver::start(&[Reply::Hang]).await;
    // Answers 404: a wrong URL is not retried.
    let wrong = HttpReceiver::start(&[Reply::Status(404)]).await;
    let closed = crate::harness::pg::free_port();
    let notifiers = format!(
        "[notify.flaky]\ntype = \"webhook\"\nurl = \"{}\"\non = [\"success\"]\nretry_backoff = \"200ms\"\n\n\
         [notify.gone]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{closed}/hook/g0ne-t0ken\"\non = [\"success\"]\nretries = 1\nretry_backoff = \"200ms\"\n\n\
         [notify.wrong]\ntype = \"slack\"\nurl = \"{}\"\non = [\"success\"]\nretry_backoff = \"200ms\"\n\n\
         [notify.hang]\ntype = \"webhook\"\nurl = \"{}\"\non = [\"success\"]\ntimeout = \"6s\"\nretries = 0\n\n\
         [notify.greedy]\ntype = \"webhook\"\nurl = \"{}\"\non = [\"success\"]\nretry_backoff = \"200ms\"\n\n\
         [notify.patient]\ntype = \"webhook\"\nurl = \"{}\"\non = [\"success\"]\nretry_backoff = \"2m\"\n\n",
        flaky.url("/flaky"),
        wrong.url("/services/wr0ng-t0ken"),
        hang.url("/hang"),
        greedy.url("/greedy"),
        patient.url("/patient"),
    );
    let jobs = format!(
        "{}{}",
        env.job(
            "app",
            "marketplace",
            "notify = [\"flaky\", \"gone\", \"wrong\"]"
        ),
        env.job("slow", "marketplace", "notify = [\"hang\"]")
    );
    // Their retries wait a minute or two: a job of their own, so the
    // counters of the others (updated once all of a run's deliveries end)
    // are not held up.
    let jobs = format!(
        "{jobs}{}",
        env.job("later", "marketplace", "notify = [\"greedy\", \"patient\"]")
    );
    let cfg = daemon_config(&env, "", &format!("{notifiers}{jobs}"));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;

    // The receiver that never answers does not hold up the backup: the run
    // is reported finished while its notification is still unanswered.
    let slow = d.run_to_end("slow").await;
    assert_eq!(slow["state"], "success", "{slow}");
    let in_flight = hang.wait_for(1, WAIT).await;
    assert_eq!(in_flight[0].json()["job"], "slow");
    let failed_slow = r#"backstop_notifications_failed_total{job="slow",outcome="success"}"#;
    assert_eq!(
        d.metric(failed_slow).await,
        Some(0.0),
        "the notification should still be waiting for its answer"
    );

    let later = d.run_to_end("later").await;
    assert_eq!(later["state"], "success", "{later}");
    let app = d.run_to_end("app").await;
    assert_eq!(app["state"], "success", "{app}");
    // Flaky: three attempts of the same delivery, the third accepted.
    let tries = flaky.wait_for(3, WAIT).await;
    let ids: Vec<_> = tries
        .iter()
        .map(|r| r.json()["delivery_id"].clone())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    // Retry-After: 2 is honoured over the 200 ms backoff; the next pause
    // (no Retry-After) is the doubled backoff again.
    let first_pause = tries[1].at - tries[0].at;
    let second_pause = tries[2].at - tries[1].at;
    assert!(
        first_pause >= Duration::from_millis(1900),
        "Retry-After: 2 not honoured: retried after {first_pause:?}"
    );
    assert!(
        second_pause < Duration::from_millis(1500),
        "{second_pause:?}"
    );
    let sent = r#"backstop_notifications_sent_total{job="app",outcome="success"}"#;
    let failed = r#"backstop_notifications_failed_total{job="app",outcome="success"}"#;
    crate::harness::daemon::wait_for(
        "flaky delivered, gone and wrong given up",
        WAIT,
        || async { d.metric(sent).await == Some(1.0) && d.metric(failed).await == Some(2.0) },
        &d.log,
    )
    .await;
    // A 404 is permanent: asked once.
    assert_eq!(wrong.requests().len(), 1);
    // The hanging one gives up after its timeout.
    crate::harness::daemon::wait_for(
        "the hanging receiver to time out",
        WAIT,
        || async { d.metric(failed_slow).await == Some(1.0) },
        &d.log,
    )
    .await;

    let log = d.log();
    for want in [
        "Notification attempt failed; retrying.",
        "HTTP 503",
        "Notification could not be delivered",
        "notifier=gone",
        "after 2 attempt(s)",
        "Connection refused",
        "notifier=wrong",
        "HTTP 404",
        "answer 404",
        "notifier=hang",
        "no answer within 6s",
        "backstop test-notify --notifier gone",
        // Retry-After: 3600 is capped at a minute; a 2 minute backoff wins
        // over a shorter Retry-After (and no longer panics).
        "notifier=greedy attempt=1 retry_in=60s",
        "notifier=patient attempt=1 retry_in=120s",
    ] {
        assert!(log.contains(want), "{want:?} not in the log:\n{log}");
    }
    // Where it went is named by host and port only; the token paths never.
    assert!(log.contains(&format!("http://127.0.0.1:{closed}")), "{log}");
    assert!(
        !log.contains("g0ne-t0ken") && !log.contains("wr0ng-t0ken"),
        "{log}"
    );
    // The backups themselves are fine.
    assert_eq!(
        d.metric(r#"backstop_job_runs_total{job="app",kind="backup",outcome="success"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_shot_backup_emails_its_failure_and_recovery_over_starttls_with_auth() {
    let env = Env::new().await;
    let ca = TestCa::create(env.dir.path());
    let sink = SmtpSink::start(SmtpMode::StartTls, Some(&ca), false).await;
    let pw = env.path("smtp-password");
    write_private(&pw, "smtp-s3cret\n");
    let notifier = format!(
        "[notify.mail]\ntype = \"email\"\nhost = \"127.0.0.1\"\nport = {}\nusername = \"backstop@example.com\"\npassword_file = \"{}\"\nfrom = \"Backstop <backstop@example.com>\"\nto = [\"oncall@example.com\", \"dba@example.com\"]\nca_file = \"{}\"\n\n",
        sink.port,
        pw.display(),
        ca.ca_pem.display()
    );
    let cfg = env.write_config(&format!(
        "{notifier}{}",
        env.job("app", "appdb", "notify = [\"mail\"]")
    ));

    let run = crate::harness::run_backstop(&cfg, &["backup", "--job", "app"]).await;
    run.assert_failed();
    let mails = sink.wait_for(1, WAIT).await;
    let m = &mails[0];
    assert!(m.tls, "STARTTLS before anything else");
    assert_eq!(
        m.auth,
        Some(("backstop@example.com".into(), "smtp-s3cret".into()))
    );
    assert_eq!(m.from, "backstop@example.com");
    assert_eq!(m.to, ["oncall@example.com", "dba@example.com"]);
    let subject = m.header("subject").unwrap();
    assert!(
        subject.starts_with("[backstop] FAILED: backup of job \"app\" on "),
        "{subject}"
    );
    let body = m.body();
    assert!(body.contains("Error:"), "{body}");
    assert!(body.contains("appdb"), "{body}");
    assert!(
        body.contains("What to do:") && body.contains("backstop status"),
        "{body}"
    );
    assert!(run.stderr.contains("Notification sent."), "{}", run.stderr);

    env.pg.marketplace("appdb").await;
    let run = crate::harness::run_backstop(&cfg, &["backup", "--job", "app"]).await;
    run.assert_ok();
    let mails = sink.wait_for(2, WAIT).await;
    let subject = mails[1].header("subject").unwrap();
    assert!(
        subject.starts_with("[backstop] RECOVERED: backup of job \"app\""),
        "{subject}"
    );
    assert!(
        mails[1].body().contains("Previous run: failed"),
        "{}",
        mails[1].body()
    );
    // Another success: nothing (the default events).
    crate::harness::run_backstop(&cfg, &["backup", "--job", "app"])
        .await
        .assert_ok();
    assert_eq!(sink.mails().len(), 2);
    assert!(!run.all().contains("smtp-s3cret"));
}

#[tokio::test(flavor = "multi_thread")]
async fn test_notify_checks_each_channel_and_says_what_is_wrong() {
    let env = Env::new().await;
    let ca = TestCa::create(env.dir.path());
    let tls_sink = SmtpSink::start(SmtpMode::Tls, Some(&ca), false).await;
    let relay = SmtpSink::start(SmtpMode::Plain, None, false).await;
    let rejecting = SmtpSink::start(SmtpMode::Plain, None, true).await;
    let https = HttpReceiver::start_tls(&[], &ca).await;
    let not_found = HttpReceiver::start(&[Reply::Status(404)]).await;
    let pw = env.path("smtp-password");
    write_private(&pw, "smtp-s3cret\n");
    let mail = |name: &str, port: u16, extra: &str| {
        format!(
            "[notify.{name}]\ntype = \"email\"\nhost = \"127.0.0.1\"\nport = {port}\nfrom = \"backstop@example.com\"\nto = [\"oncall@example.com\"]\n{extra}\n\n"
        )
    };
    let notifiers = [
        mail(
            "implicit",
            tls_sink.port,
            &format!(
                "tls = \"tls\"\nusername = \"u\"\npassword_file = \"{}\"\nca_file = \"{}\"",
                pw.display(),
                ca.ca_pem.display()
            ),
        ),
        mail("relay", relay.port, "tls = \"none\""),
        mail("bounce", rejecting.port, "tls = \"none\""),
        // STARTTLS demanded of a server that does not offer it.
        mail("notls", relay.port, ""),
        format!(
            "[notify.secure]\ntype = \"webhook\"\nurl = \"{}\"\nca_file = \"{}\"\n\n",
            https.https_url("/h/s3cure-t0ken"),
            ca.ca_pem.display()
        ),
        format!(
            "[notify.untrusted]\ntype = \"webhook\"\nurl = \"{}\"\n\n",
            https.https_url("/h/untrusted-t0ken")
        ),
        format!(
            "[notify.missing]\ntype = \"webhook\"\nurl = \"{}\"\n\n",
            not_found.url("/h/m1ssing-t0ken")
        ),
    ]
    .concat();
    let cfg = env.write_config(&format!("{notifiers}{}", env.job("app", "marketplace", "")));
    let test = |n: &str| {
        let cfg = cfg.clone();
        let n = n.to_string();
        async move {
            crate::harness::run_backstop(&cfg, &["test-notify", "--notifier", &n, "--job", "app"])
                .await
        }
    };

    // check-config names each channel by host only.
    let check = crate::harness::run_backstop(&cfg, &["check-config"]).await;
    check.assert_ok();
    assert!(
        check.stdout.contains(&format!(
            "webhook to https://{} on failure, suspect, recovery",
            https.addr
        )),
        "{}",
        check.stdout
    );
    assert!(
        check.stdout.contains("email to smtp://127.0.0.1:"),
        "{}",
        check.stdout
    );
    assert!(!check.all().contains("t0ken"), "{}", check.all());

    // Implicit TLS with AUTH, trusting the private CA.
    let run = test("implicit").await;
    run.assert_ok();
    assert!(
        run.stdout.contains("test notification delivered"),
        "{}",
        run.stdout
    );
    let m = &tls_sink.wait_for(1, WAIT).await[0];
    assert!(m.tls);
    assert_eq!(m.auth, Some(("u".into(), "smtp-s3cret".into())));
    assert!(
        m.header("subject")
            .unwrap()
            .starts_with("[backstop] TEST: backup of job \"app\""),
        "{:?}",
        m.header("subject")
    );
    // A local relay without TLS.
    test("relay").await.assert_ok();
    assert!(!relay.wait_for(1, WAIT).await[0].tls);

    // HTTPS with the private CA.
    test("secure").await.assert_ok();
    let r = &https.wait_for(1, WAIT).await[0];
    assert_eq!(r.json()["event"], "test");
    assert_eq!(r.json()["job"], "app");

    // Failures: exit 1, the cause, nothing secret, one attempt.
    let cases = [
        (
            "untrusted",
            "UnknownIssuer (the server's certificate is not signed by a CA this host trusts",
        ),
        ("missing", "HTTP 404"),
        ("bounce", "permanent error (550): 5.1.1 no such user here"),
        ("notls", "STARTTLS"),
    ];
    for (name, cause) in cases {
        let run = test(name).await;
        run.assert_failed();
        let all = run.all();
        assert!(
            all.contains("test notification not delivered"),
            "{name}: {all}"
        );
        assert!(all.contains(cause), "{name}: {cause:?} not in {all}");
        assert!(all.contains("after 1 attempt(s)"), "{name}: {all}");
        assert!(
            !all.contains("t0ken") && !all.contains("smtp-s3cret"),
            "{name}: {all}"
        );
    }
    assert_eq!(not_found.requests().len(), 1);
    assert!(rejecting.mails().is_empty());

    let run = test("nope").await;
    assert_eq!(run.code, Some(2), "{}", run.all());
    assert!(
        run.all().contains("no notifier named \"nope\""),
        "{}",
        run.all()
    );
    assert!(run.all().contains("implicit"), "{}", run.all());
}

/// Regression (issue 12, item 3): a certificate the host does not trust was
/// retried `retries` times, although it is refused the same way every time.
/// Through the daemon (test-notify forces zero retries), with `retries = 3`.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_is_not_retried() {
    let env = Env::new().await;
    let ca = TestCa::create(env.dir.path());
    let https = HttpReceiver::start_tls(&[], &ca).await;
    let mail = SmtpSink::start(SmtpMode::Tls, Some(&ca), false).await;
    let notifiers = format!(
        "[notify.tls]\ntype = \"webhook\"\nurl = \"{}\"\non = [\"success\"]\nretries = 3\nretry_backoff = \"200ms\"\n\n\
         [notify.mail]\ntype = \"email\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"tls\"\nfrom = \"backstop@example.com\"\nto = [\"oncall@example.com\"]\non = [\"success\"]\nretries = 3\nretry_backoff = \"200ms\"\n\n",
        https.https_url("/hook"),
        mail.port,
    );
    let cfg = daemon_config(
        &env,
        "",
        &format!(
            "{notifiers}{}",
            env.job("app", "marketplace", "notify = [\"tls\", \"mail\"]")
        ),
    );
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;
    let run = d.run_to_end("app").await;
    assert_eq!(run["state"], "success", "{run}");
    let failed = r#"backstop_notifications_failed_total{job="app",outcome="success"}"#;
    crate::harness::daemon::wait_for(
        "both notifications given up",
        WAIT,
        || async { d.metric(failed).await == Some(2.0) },
        &d.log,
    )
    .await;
    let log = d.log();
    assert!(
        !log.contains("Notification attempt failed; retrying."),
        "a refused certificate was retried:\n{log}"
    );
    assert_eq!(
        log.matches("after 1 attempt(s)").count(),
        2,
        "each channel tried exactly once:\n{log}"
    );
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert_eq!(https.connections(), 1, "one TLS handshake, no retry");
    assert!(https.requests().is_empty());
}

/// A dead man's switch: every backup run pings `URL/start`, then `URL` on
/// success or `URL/fail` with the error as the body. The end never
/// overtakes the start: here the start is refused once (503) and only
/// delivered on its retry two seconds later, long after the small backup
/// finished; without the ordering the success ping would arrive first and
/// leave the check "started" until it timed out.
#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_pings_start_then_success_or_fail_in_order() {
    let env = Env::new().await;
    let hc = HttpReceiver::start(&[Reply::Status(503)]).await;
    let base = "/ping/5f2c9a1e-hc";
    let url_file = env.path("hc-url");
    write_private(&url_file, &format!("{}\n", hc.url(base)));
    let notifiers = format!(
        "[notify.hc]\ntype = \"heartbeat\"\nurl_file = \"{}\"\nretry_backoff = \"2s\"\n\n",
        url_file.display()
    );
    let job = env.job("app", "marketplace", "notify = [\"hc\"]\nretries = 0");
    let cfg = daemon_config(&env, "", &format!("{notifiers}{job}"));
    let mut d = Daemon::start(&cfg, env.path("daemon.log"));
    d.ready().await;

    let ok = d.run_to_end("app").await;
    assert_eq!(ok["state"], "success", "{ok}");
    let got = hc.wait_for(3, WAIT).await;
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    let start = format!("{base}/start");
    assert_eq!(paths, [start.as_str(), start.as_str(), base], "{got:#?}");
    assert!(got.iter().all(|r| r.method == "POST"), "{got:#?}");
    let body = String::from_utf8_lossy(&got[2].body).into_owned();
    assert!(body.contains("backup of job \"app\" succeeded"), "{body}");
    assert!(
        body.contains(ok["backup_id"].as_str().unwrap()),
        "the success ping names the backup: {body}"
    );
    assert!(
        String::from_utf8_lossy(&got[0].body).contains("started"),
        "{got:#?}"
    );

    // The database goes away: the next backup fails and says why.
    env.pg
        .execute("postgres", "DROP DATABASE marketplace WITH (FORCE)")
        .await;
    let failed = d.run_to_end("app").await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let got = hc.wait_for(5, WAIT).await;
    let paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    let fail = format!("{base}/fail");
    assert_eq!(&paths[3..], [start.as_str(), fail.as_str()], "{got:#?}");
    let body = String::from_utf8_lossy(&got[4].body).into_owned();
    assert!(body.contains("FAILED"), "{body}");
    assert!(
        body.contains("marketplace"),
        "the error is in the body: {body}"
    );
    // The URL is the check's secret: never in the log.
    assert!(!d.log().contains("5f2c9a1e-hc"), "{}", d.log());
    assert_eq!(
        d.metric(r#"backstop_notifications_sent_total{job="app",outcome="start"}"#)
            .await,
        Some(2.0)
    );
}
