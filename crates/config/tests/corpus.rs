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
    // Every file counts: numbered 01, 02, … with no gap and none missing, so
    // a deleted or renamed case fails here instead of silently not running.
    const CASES: usize = 69;
    assert_eq!(files.len(), CASES, "the corpus has {} files", files.len());
    for (i, file) in files.iter().enumerate() {
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            name.starts_with(&format!("{:02}-", i + 1)) && name.ends_with(".toml"),
            "corpus file {name} is out of sequence (expected {:02}-*.toml)",
            i + 1
        );
    }
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

/// `compression_threads` and `memory_budget`: their defaults, a job whose
/// compression needs more than the default budget gets what it needs, and
/// S3 part settings left unset are chosen from the budget.
#[test]
fn memory_settings_default_to_auto_threads_and_a_budget_that_fits() {
    use backstop_config::budget::{DEFAULT_MEMORY_BUDGET, MemoryPlan, Threads};
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[storage.s3]
type = "s3"
bucket = "backups"
region = "eu-central-1"

[storage.big]
type = "s3"
bucket = "archive"
region = "eu-central-1"
part_size = "64MiB"
max_in_flight_parts = 2

[encryption.default]
recipients = ["age1gld8ygn59cyusj92ru25h0y30wc26st304z7er6h4keqc9se74kq63muva"]

[[job]]
name = "plain"
database = { url = "postgres://app@db.internal:5432/app" }
storage = ["s3"]

[[job]]
name = "tight"
database = { url = "postgres://app@db.internal:5432/app" }
storage = ["s3"]
compression_threads = 0
memory_budget = "24MiB"

[[job]]
name = "archive"
database = { url = "postgres://app@db.internal:5432/app" }
storage = ["s3", "big"]
compression = "zstd:19"
compression_threads = 2
"#;
    let c = Config::from_toml(&dir.path().join("backstop.toml"), text)
        .unwrap_or_else(|e| panic!("{e}"));
    let plain = c.job("plain").unwrap();
    assert_eq!(plain.compression_threads, Threads::Auto);
    // The default, or more where this host's cores make "auto" plan for
    // more compression threads than it holds.
    let least = MemoryPlan::minimum(
        plain.compression,
        plain.thread_plan().most(),
        1,
        &plain.s3_parts(&c.storages),
    );
    assert_eq!(plain.memory_budget, DEFAULT_MEMORY_BUDGET.max(least));
    let backstop_config::StorageConfig::S3(s3) = &c.storages["s3"] else {
        panic!("s3")
    };
    assert_eq!((s3.part_size, s3.max_in_flight_parts), (None, None));

    let tight = c.job("tight").unwrap();
    assert_eq!(tight.compression_threads, Threads::Count(0));
    assert_eq!(tight.memory_budget, 24 << 20);

    let archive = c.job("archive").unwrap();
    let needed = MemoryPlan::minimum(archive.compression, 2, 2, &archive.s3_parts(&c.storages));
    assert!(needed > DEFAULT_MEMORY_BUDGET);
    assert_eq!(archive.memory_budget, needed);
    let plan = archive.memory_plan(&c.storages);
    assert_eq!(plan.s3_shares, [15 << 20, 192 << 20], "{plan:?}");
}

/// config/backstop.example.toml stays valid as the schema changes (its
/// secret files are provided in a temp dir).
#[test]
fn the_shipped_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/backstop.example.toml");
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(&std::fs::read_to_string(&example).unwrap(), dir.path());
    let c = Config::from_toml(&example, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.jobs.len(), 1);
    assert!(c.jobs[0].globals);
    assert_eq!(c.jobs[0].notify, ["oncall"]);
}

/// Writes every `/etc/backstop/NAME` file `text` names into `dir` (600,
/// plausible contents) and returns the text pointing there.
fn with_secret_files(text: &str, dir: &Path) -> String {
    for part in text.split("\"/etc/backstop/").skip(1) {
        let name = part.split('"').next().unwrap();
        let body = if name.contains("recipients") {
            "age1gld8ygn59cyusj92ru25h0y30wc26st304z7er6h4keqc9se74kq63muva\n"
        } else if name.contains("url") {
            "https://hooks.example.com/backstop/t0ken\n"
        } else {
            "x\n"
        };
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    text.replace("/etc/backstop/", &format!("{}/", dir.display()))
}

/// config/examples/*.toml (Supabase, RDS) are valid and keep the settings
/// those platforms need.
#[test]
fn the_managed_postgres_examples_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap().flatten() {
        let path = entry.path();
        let dir = tempfile::tempdir().unwrap();
        let text = with_secret_files(&std::fs::read_to_string(&path).unwrap(), dir.path());
        let c = Config::from_toml(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        for j in &c.jobs {
            assert!(j.no_role_passwords, "{}: {}", path.display(), j.name);
            assert!(j.stall_timeout.is_some() && j.lock_wait_timeout.is_some());
        }
        seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        if path.ends_with("supabase.toml") {
            let j = &c.jobs[0];
            assert!(j.filters.exclude_schemas.iter().any(|s| s == "auth"));
            assert!(j.filters.exclude_schemas.iter().any(|s| s == "storage"));
            let url = url::Url::parse(j.database.url.expose()).unwrap();
            assert_eq!(
                url.port(),
                Some(5432),
                "the session pooler's port, not 6543"
            );
        }
    }
    seen.sort();
    assert_eq!(seen, ["rds", "supabase"]);
}

const NOTIFY_BASE: &str = "[storage.local]\ntype = \"local\"\npath = \"/srv\"\n[[job]]\nname = \"a\"\nencryption = \"none\"\nstorage = [\"local\"]\ndatabase = { url = \"postgres://a@h/d\" }\nnotify = [\"hook\", \"mail\"]\n";

#[test]
fn notifiers_are_resolved_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("url");
    let secret = dir.path().join("secret");
    let pw = dir.path().join("pw");
    for (p, body) in [
        (&url, "https://hooks.example.com/T1/B2/tok3n\n"),
        (&secret, "hmac-key\n"),
        (&pw, "smtp-pass\n"),
    ] {
        std::fs::write(p, body).unwrap();
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let text = format!(
        "{NOTIFY_BASE}[notify.hook]\ntype = \"webhook\"\nurl_file = \"{}\"\nsecret_file = \"{}\"\n[notify.mail]\ntype = \"email\"\nhost = \"smtp.example.com\"\nusername = \"u\"\npassword_file = \"{}\"\nfrom = \"Backstop <b@example.com>\"\nto = [\"o@example.com\"]\non = [\"failure\", \"success\"]\ntls = \"tls\"\n",
        url.display(),
        secret.display(),
        pw.display()
    );
    let config = Config::from_toml(&dir.path().join("c.toml"), &text).unwrap();
    assert_eq!(config.jobs[0].notify, ["hook", "mail"]);
    let hook = &config.notifiers["hook"];
    assert_eq!(hook.on, backstop_config::DEFAULT_NOTIFY_ON);
    assert_eq!(hook.timeout, std::time::Duration::from_secs(10));
    assert_eq!(hook.retries, 3);
    match &hook.channel {
        backstop_config::Channel::Webhook { url, secret } => {
            assert_eq!(url.expose(), "https://hooks.example.com/T1/B2/tok3n");
            assert_eq!(secret.as_ref().unwrap().expose(), "hmac-key");
        }
        other => panic!("{other:?}"),
    }
    let mail = &config.notifiers["mail"];
    assert_eq!(
        mail.on,
        [
            backstop_config::NotifyOn::Failure,
            backstop_config::NotifyOn::Success
        ]
    );
    match &mail.channel {
        backstop_config::Channel::Email(e) => {
            assert_eq!((e.port, e.tls), (465, backstop_config::SmtpTls::Tls));
            assert_eq!(e.password.as_ref().unwrap().expose(), "smtp-pass");
        }
        other => panic!("{other:?}"),
    }
    // Debug output of the whole config shows no secret.
    let debug = format!("{config:?}");
    for secret in ["tok3n", "hmac-key", "smtp-pass"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
}

#[test]
fn a_bad_webhook_url_is_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("url");
    std::fs::write(&url, "hooks.example.com/T1/B2/tok3n\n").unwrap();
    std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = format!(
        "{NOTIFY_BASE}[notify.hook]\ntype = \"slack\"\nurl_file = \"{}\"\n[notify.mail]\ntype = \"email\"\nhost = \"localhost\"\ntls = \"none\"\nfrom = \"b@localhost\"\nto = [\"o@localhost\"]\n",
        url.display()
    );
    let err = Config::from_toml(&dir.path().join("c.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not an http:// or https:// URL"), "{err}");
    assert!(!err.contains("tok3n"), "{err}");

    // World-readable: refused with the chmod hint, content never shown.
    std::fs::write(&url, "https://hooks.example.com/T1/B2/tok3n\n").unwrap();
    std::fs::set_permissions(&url, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = Config::from_toml(&dir.path().join("c.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("tok3n"), "{err}");
}
