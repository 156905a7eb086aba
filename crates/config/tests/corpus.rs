//! The invalid-config corpus: every file in `tests/invalid/` starts with
//! `# expect: LINE:COLUMN: message` and must be rejected with a diagnostic at
//! exactly that position whose message contains that text.

use std::path::Path;

use backstop_config::{Config, ConfigError};

#[test]
fn every_invalid_config_is_rejected_at_its_line_and_column() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the corpus shrank to {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line: # expect: L:C: message");
        let mut parts = expect.splitn(3, ':');
        let line: usize = parts.next().unwrap().trim().parse().unwrap();
        let column: usize = parts.next().unwrap().trim().parse().unwrap();
        let message = parts.next().unwrap_or("").trim();
        match Config::load(file) {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(ConfigError::Invalid { diagnostics, .. }) => {
                if !diagnostics
                    .iter()
                    .any(|d| d.line == line && d.column == column && d.message.contains(message))
                {
                    failures.push(format!(
                        "{}: wanted {line}:{column}: {message:?}, got {diagnostics:#?}",
                        file.display()
                    ));
                }
                // Rendered as file:line:col: message.
                let rendered = ConfigError::Invalid {
                    path: file.clone(),
                    diagnostics,
                }
                .to_string();
                assert!(
                    rendered.starts_with(&format!("{}:", file.display())),
                    "{rendered}"
                );
            }
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn world_readable_password_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let text = format!(
        "[storage.local]\ntype = \"local\"\npath = \"/srv\"\n[[job]]\nname = \"a\"\nencryption = \"none\"\nstorage = [\"local\"]\ndatabase = {{ url = \"postgres://a@h/d\", password_file = \"{}\" }}\n",
        pw.display()
    );
    let err = Config::from_toml(&dir.path().join("c.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("readable by every user") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(err.contains(":8:"), "{err}");
    assert!(!err.contains("s3cret"));

    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = Config::from_toml(&dir.path().join("c.toml"), &text).unwrap();
    let job = config.job("a").unwrap();
    assert_eq!(job.database.password.as_ref().unwrap().expose(), "s3cret");
    assert!(
        !format!("{job:?}").contains("s3cret"),
        "Debug leaks the password"
    );
}

#[test]
fn a_valid_config_resolves_defaults_and_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("recipients.txt"),
        "# ops team\nage1gld8ygn59cyusj92ru25h0y30wc26st304z7er6h4keqc9se74kq63muva\n",
    )
    .unwrap();
    let text = r#"
[storage.local]
type = "local"
path = "backups"

[encryption.default]
recipients_file = "recipients.txt"

[[job]]
name = "marketplace"
database = { url = "postgres://app@db.internal:5432/marketplace" }
schedule = "30 2 * * *"
timezone = "Europe/Berlin"
storage = ["local"]
timeout = "2h"
"#;
    let c = Config::from_toml(&dir.path().join("backstop.toml"), text).unwrap();
    assert_eq!(c.catalog, backstop_config::DEFAULT_CATALOG);
    assert_eq!(
        c.storages["local"],
        backstop_config::StorageConfig::Local {
            path: dir.path().join("backups")
        }
    );
    let j = c.job("marketplace").unwrap();
    assert_eq!(
        j.compression,
        backstop_config::Compression::Zstd { level: 3 }
    );
    assert_eq!(j.format, backstop_config::DumpFormat::Custom);
    assert_eq!(j.row_counts, backstop_config::RowCounts::Exact);
    assert_eq!(j.timeout, Some(std::time::Duration::from_secs(7200)));
    assert!(
        matches!(&j.encryption, backstop_config::Encryption::Age { profile, recipients } if profile == "default" && recipients.len() == 1)
    );
    // 02:30 Berlin on 2026-03-29 does not exist (clocks jump 02:00 → 03:00).
    let s = j.schedule.as_ref().unwrap();
    let after = chrono::DateTime::parse_from_rfc3339("2026-01-10T12:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!(
        s.next_after(after, j.timezone).unwrap().to_rfc3339(),
        "2026-01-11T01:30:00+00:00"
    );
}

/// config/backstop.example.toml stays valid as the schema changes (its
/// secret files are provided in a temp dir).
#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/backstop.example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("recipients.txt"),
        "age1gld8ygn59cyusj92ru25h0y30wc26st304z7er6h4keqc9se74kq63muva\n",
    )
    .unwrap();
    let pw = dir.path().join("marketplace.password");
    std::fs::write(&pw, "x\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = text.replace("/etc/backstop/", &format!("{}/", dir.path().display()));
    let c = Config::from_toml(&example, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.jobs.len(), 1);
    assert!(c.jobs[0].globals);
}
