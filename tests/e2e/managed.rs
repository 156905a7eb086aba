//! The managed-PostgreSQL pre-flight (issue 16): what Supabase, RDS and
//! Cloud SQL users hit at night, found before the dump with a message that
//! says what to change, in `check-config --probe` and at each run's start.

use crate::backup::assert_failed_cleanly;
use crate::harness::pgbouncer::Bouncer;
use crate::harness::{Env, write_private};

/// A job `name` on `marketplace` at `port` as `user` (password in a file).
fn job_at(env: &Env, name: &str, user: &str, port: u16, password: &str, extra: &str) -> String {
    let pw = env.path(&format!("{name}-password"));
    write_private(&pw, &format!("{password}\n"));
    format!(
        "[[job]]\nname = \"{name}\"\ndatabase = {{ url = \"postgres://{user}@127.0.0.1:{port}/marketplace\", password_file = \"{}\" }}\nstorage = [\"local\"]\n{extra}\n\n",
        pw.display()
    )
}

/// The probe's line for job `name`.
fn probe_line<'a>(out: &'a str, name: &str) -> &'a str {
    let key = format!("database of job \"{name}\":");
    out.lines()
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("no probe line for {name}:\n{out}"))
}

/// A real PgBouncer in transaction mode (Supabase's port 6543, RDS Proxy)
/// is refused before any snapshot is taken through it, with the fix; the
/// same PgBouncer in session mode (Supabase's port 5432) is not, and the
/// backup through it succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_pooler_is_refused_before_dumping_and_a_session_pooler_is_not() {
    let env = Env::new().await;
    let tx = Bouncer::start(&env, "marketplace", "transaction");
    let session = Bouncer::start(&env, "marketplace", "session");
    let pw = env.pg.password.clone();
    env.write_config(&format!(
        "{}{}",
        job_at(&env, "tx", "postgres", tx.port, &pw, ""),
        job_at(&env, "sess", "postgres", session.port, &pw, "")
    ));

    let probe = env.backstop(&["check-config", "--probe"]).await;
    assert_eq!(probe.code, Some(1), "{probe:?}");
    let line = probe_line(&probe.stdout, "tx");
    assert!(line.contains("FAILED"), "{line}");
    assert!(
        line.contains("connection pooler in transaction mode"),
        "{line}"
    );
    assert!(line.contains("session-mode port"), "{line}");
    assert!(
        probe_line(&probe.stdout, "sess").contains("OK"),
        "{}",
        probe.stdout
    );

    let run = env.backstop(&["backup", "--job", "tx"]).await;
    assert_failed_cleanly(
        &env,
        "tx",
        &run,
        "pre-flight failed",
        "goes through a connection pooler in transaction mode",
    )
    .await;
    assert!(!run.all().contains(&pw), "the password leaked: {run:?}");
    env.backstop(&["backup", "--job", "sess"]).await.assert_ok();
}

/// Supabase-like: the platform's `auth` schema is not readable by the
/// backup role. The run is refused before pg_dump starts, naming the
/// tables and saying that exclude_schemas = ["auth"] loses nothing the role
/// can read; with that setting the backup succeeds. A single unreadable
/// table among readable ones gets exclude_tables advice instead.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_schemas_are_named_with_the_exclusion_that_fixes_them() {
    let env = Env::new().await;
    env.pg
        .execute(
            "marketplace",
            "CREATE SCHEMA auth;
             CREATE TABLE auth.users (id uuid PRIMARY KEY, email text);
             CREATE TABLE auth.sessions (id bigint PRIMARY KEY, user_id uuid);
             CREATE ROLE backup_ro LOGIN BYPASSRLS PASSWORD 'ro-pass-7h2q';
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO backup_ro;
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO backup_ro;",
        )
        .await;
    let job = |extra: &str| job_at(&env, "ro", "backup_ro", env.pg.port, "ro-pass-7h2q", extra);
    env.write_config(&job(""));
    let probe = env.backstop(&["check-config", "--probe"]).await;
    assert_eq!(probe.code, Some(1), "{probe:?}");
    let line = probe_line(&probe.stdout, "ro");
    assert!(
        line.contains("auth.sessions, auth.users (no USAGE on schema auth)"),
        "{line}"
    );
    let run = env.backstop(&["backup", "--job", "ro"]).await;
    assert_failed_cleanly(
        &env,
        "ro",
        &run,
        "pre-flight failed",
        "role \"backup_ro\" cannot read 2 table(s) the dump includes",
    )
    .await;
    assert!(
        run.stderr
            .contains("exclude_schemas = [\"auth\"], which leaves out nothing the role can read"),
        "{}",
        run.stderr
    );

    env.write_config(&job("exclude_schemas = [\"auth\"]"));
    env.backstop(&["backup", "--job", "ro"]).await.assert_ok();

    // One table of public, the rest readable: excluding public would lose them.
    env.pg
        .execute(
            "marketplace",
            "REVOKE SELECT ON public.otp_verifications FROM backup_ro",
        )
        .await;
    let run = env.backstop(&["backup", "--job", "ro"]).await;
    run.assert_failed();
    assert!(
        run.stderr.contains("public.otp_verifications"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("exclude_tables"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("exclude_schemas = ["),
        "{}",
        run.stderr
    );
}
