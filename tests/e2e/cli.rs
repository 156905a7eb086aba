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
