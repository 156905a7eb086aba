//! Progress people can watch: bars in a pseudo-terminal (`script`) for
//! backup, restore, download and verify, log lines without one, and a
//! summary line at the end either way.

use std::path::Path;

use crate::harness::{Env, Run, backstop_bin, pg_dump_wrapper};

/// Runs backstop with `args` in a pseudo-terminal of 120×30 (util-linux
/// `script`); the terminal's output (stdout and stderr as one) is `stdout`.
async fn in_terminal(config: &Path, args: &[&str]) -> Run {
    let quoted: Vec<String> = std::iter::once(backstop_bin().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let out = tokio::process::Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("stty cols 120 rows 30; exec {}", quoted.join(" ")))
        .arg("/dev/null")
        .env("BACKSTOP_CONFIG", config)
        .env("BACKSTOP_LOG", "info")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    Run::from(out)
}

/// The last line a person sees: what remains after carriage returns and
/// the erase-line sequences bars redraw with.
fn last_visible_line(terminal: &str) -> String {
    let lines: Vec<String> = terminal
        .split('\n')
        .map(|l| {
            let l = l
                .rsplit('\r')
                .find(|part| !part.trim().is_empty())
                .unwrap_or("");
            strip_ansi(l).trim().to_string()
        })
        .filter(|l| !l.is_empty())
        .collect();
    lines.last().cloned().unwrap_or_default()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() {
    let env = Env::new().await;
    // A pg_dump that stops for a while after its first 64 KiB, so the
    // display has something to show mid-dump.
    let pause = |secs: u32| {
        format!(
            "set -o pipefail\n\"$REAL\" \"$@\" | {{ dd bs=65536 count=1 iflag=fullblock status=none; sleep {secs}; cat; }}"
        )
    };
    let quick = pg_dump_wrapper(&env, "pausing_pg_dump", &pause(2));
    let slow = pg_dump_wrapper(&env, "slower_pg_dump", &pause(12));
    let cfg = env.write_config(&format!(
        "{}{}{}",
        env.job("app", "marketplace", &quick),
        env.job("nightly", "marketplace", &slow),
        env.job("shop", "marketplace", "")
    ));

    // A terminal: the bars (the dump, then each store), then the summary.
    let tty = in_terminal(&cfg, &["backup", "--job", "app"]).await;
    assert_eq!(tty.code, Some(0), "{}", tty.stdout);
    let screen = strip_ansi(&tty.stdout);
    // What the terminal received, for a person to look at.
    let artifacts = crate::harness::browser::artifacts();
    std::fs::write(artifacts.join("progress-backup.tty"), &tty.stdout).unwrap();
    assert!(screen.contains("app database.dump"), "{screen}");
    assert!(
        screen.contains("dumped 64.0 KiB"),
        "the bar mid-dump: {screen}"
    );
    assert!(screen.contains("→ local: "), "the store's bar: {screen}");
    assert!(screen.contains(" stored, "), "{screen}");
    // A log line written while the bars are up starts a line of its own
    // (the bars are lifted for it), never glued to the end of a bar.
    let logged = tty
        .stdout
        .split('\n')
        .find(|l| l.contains("Backup complete."))
        .expect("the completion log line");
    let segment = logged
        .split('\r')
        .find(|part| part.contains("Backup complete."))
        .unwrap();
    let segment = strip_ansi(segment);
    assert!(
        segment.trim_start().starts_with("20") && segment.contains(" INFO "),
        "the log line begins its own line: {segment:?}"
    );
    let last = last_visible_line(&tty.stdout);
    assert!(
        last.starts_with("backup ") && last.contains("of job \"app\" complete"),
        "the summary ends the output: {last:?}\n{screen}"
    );

    // No terminal: no bar, no escape sequence, a log line every 10 s, the summary.
    let plain = env.backstop(&["backup", "--job", "nightly"]).await;
    plain.assert_ok();
    assert!(
        !plain.stderr.contains('\r') && !plain.stderr.contains('\x1b'),
        "{}",
        plain.stderr
    );
    assert!(!plain.stderr.contains("→"), "{}", plain.stderr);
    let progress: Vec<&str> = plain
        .stderr
        .lines()
        .filter(|l| l.contains("Backup in progress: dumped 64.0 KiB"))
        .collect();
    assert!(
        !progress.is_empty(),
        "a log line mid-dump: {}",
        plain.stderr
    );
    assert!(progress[0].contains("stored=local "), "{}", progress[0]);
    assert!(
        plain
            .stdout
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("of job \"nightly\" complete")
    );

    // A restore and a download in a terminal end with their summary lines.
    env.backstop(&["backup", "--job", "shop"]).await.assert_ok();
    let url = env.pg.url("restored");
    let pw = env.password_file.display().to_string();
    let id = env.identity.display().to_string();
    let restore = in_terminal(
        &cfg,
        &[
            "restore",
            "--job",
            "shop",
            "--target",
            &url,
            "--target-password-file",
            &pw,
            "--create-db",
            "--identity",
            &id,
        ],
    )
    .await;
    assert_eq!(restore.code, Some(0), "{}", restore.stdout);
    let screen = strip_ansi(&restore.stdout);
    assert!(screen.contains("restoring database.dump"), "{screen}");
    assert!(
        screen
            .lines()
            .any(|l| l.contains("restoring database.dump") && l.contains("/s)")),
        "the read's summary: {screen}"
    );
    let out = env.path("raw.dump");
    let download = in_terminal(
        &cfg,
        &[
            "download",
            "--job",
            "shop",
            "--out",
            &out.display().to_string(),
        ],
    )
    .await;
    assert_eq!(download.code, Some(0), "{}", download.stdout);
    let screen = strip_ansi(&download.stdout);
    assert!(
        screen
            .lines()
            .any(|l| l.contains("downloading database.dump") && l.contains(" in ")),
        "{screen}"
    );
    let verify = in_terminal(&cfg, &["verify", "--job", "shop", "--level", "checksum"]).await;
    assert_eq!(verify.code, Some(0), "{}", verify.stdout);
    let screen = strip_ansi(&verify.stdout);
    assert!(
        screen
            .lines()
            .any(|l| l.contains("checking database.dump") && l.contains("/s)")),
        "the checksum read's summary: {screen}"
    );
}
