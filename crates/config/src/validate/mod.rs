//! Raw schema → validated [`Config`], collecting every problem with its
//! position. One module per section over the shared [`crate::check`]
//! checker: storage, jobs (with their retention and verify), databases;
//! notifiers live in [`crate::notify`]; the daemon section is here.

mod database;
mod job;
mod storage;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use crate::raw::RawConfig;
use crate::{Config, ConfigError, DEFAULT_CATALOG, Secret};
use toml::Spanned;

use crate::check::*;
use job::*;
use storage::*;

/// Length: the config's sections checked in file order, then what ties them
/// together (names that refer to each other).
pub(crate) fn validate(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut c = Checker {
        path,
        text,
        diagnostics: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            c.error(span, e.message().trim_end().to_string());
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                diagnostics: c.diagnostics,
            });
        }
    };

    let catalog = match &raw.daemon.catalog {
        Some(cat) => {
            let s = cat.get_ref();
            let postgres = s.starts_with("postgres://") || s.starts_with("postgresql://");
            if !s.starts_with("sqlite:") && !postgres {
                c.error(
                    cat.span(),
                    format!(
                        "unsupported catalog {:?}: use a SQLite URL such as \"{DEFAULT_CATALOG}\" (one host) or postgres://USER@HOST:PORT/DB (a fleet)",
                        redact_url(s)
                    ),
                );
            } else if postgres && url::Url::parse(s).is_ok_and(|u| u.password().is_some()) {
                c.error(
                    cat.span(),
                    "daemon.catalog holds a password: remove it from the URL and set daemon.catalog_password_file (or catalog_password_env)",
                );
            } else if postgres && url::Url::parse(s).is_err() {
                c.error(
                    cat.span(),
                    "daemon.catalog is not a valid URL: use postgres://USER@HOST:PORT/DB",
                );
            }
            s.clone()
        }
        None => DEFAULT_CATALOG.to_string(),
    };

    let daemon = validate_daemon(&mut c, &raw.daemon);
    let default_retention = raw
        .retention
        .as_ref()
        .and_then(|r| validate_retention(&mut c, r));

    let mut storages = BTreeMap::new();
    for (name, st) in &raw.storage {
        check_name(&mut c, "storage", name);
        if let Some(cfg) = validate_storage(&mut c, name, st) {
            storages.insert(name.get_ref().clone(), cfg);
        }
    }

    let mut notifiers = BTreeMap::new();
    for (name, n) in &raw.notify {
        check_name(&mut c, "notifier", name);
        if let Some(cfg) = crate::notify::validate_notifier(&mut c, name, n) {
            notifiers.insert(name.get_ref().clone(), cfg);
        }
    }

    let mut profiles: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, enc) in &raw.encryption {
        check_name(&mut c, "encryption profile", name);
        if name.get_ref() == "none" {
            c.error(
                name.span(),
                "\"none\" is reserved for `encryption = \"none\"`; pick another profile name",
            );
        }
        let before = c.diagnostics.len();
        let mut recipients = Vec::new();
        for r in enc.recipients.iter().flatten() {
            match backstop_crypto::parse_recipient(r.get_ref()) {
                Ok(_) => recipients.push(r.get_ref().trim().to_string()),
                Err(e) => c.error(
                    r.span(),
                    format!("{e} (recipients are age public keys: age1…)"),
                ),
            }
        }
        if let Some(file) = &enc.recipients_file {
            let path = c.resolve(file.get_ref());
            match std::fs::read_to_string(&path) {
                Ok(body) => {
                    for (i, line) in body.lines().enumerate() {
                        let line = line.trim();
                        if line.is_empty() || line.starts_with('#') {
                            continue;
                        }
                        match backstop_crypto::parse_recipient(line) {
                            Ok(_) => recipients.push(line.to_string()),
                            Err(e) => c.error(
                                file.span(),
                                format!("{}:{}: {e}", path.display(), i + 1),
                            ),
                        }
                    }
                }
                Err(e) => c.error(
                    file.span(),
                    format!(
                        "cannot read age recipients from {}: {e} (fix encryption.{}.recipients_file)",
                        path.display(),
                        name.get_ref()
                    ),
                ),
            }
        }
        if recipients.is_empty() && c.diagnostics.len() == before {
            c.error(
                name.span(),
                format!(
                    "encryption profile \"{}\" has no recipients: set recipients = [\"age1…\"] or recipients_file",
                    name.get_ref()
                ),
            );
        }
        profiles.insert(name.get_ref().clone(), recipients);
    }

    let mut seen = HashSet::new();
    let mut jobs = Vec::new();
    for job in &raw.jobs {
        check_name(&mut c, "job", &job.name);
        if !seen.insert(job.name.get_ref().clone()) {
            c.error(
                job.name.span(),
                format!(
                    "duplicate job name \"{}\": each [[job]] needs its own name",
                    job.name.get_ref()
                ),
            );
        }
        if let Some(j) = validate_job(
            &mut c,
            job,
            &storages,
            &profiles,
            &raw.notify,
            default_retention.as_ref(),
        ) {
            jobs.push(j);
        }
    }

    if daemon.catalog_password.is_some() && !catalog.starts_with("postgres") {
        c.error(
            raw.daemon
                .catalog_password_file
                .as_ref()
                .or(raw.daemon.catalog_password_env.as_ref())
                .map_or(0..0, |s| s.span()),
            "a catalog password is set but daemon.catalog is not a postgres:// URL",
        );
    }

    if c.diagnostics.is_empty() {
        Ok(Config {
            source: path.to_path_buf(),
            hash: settings_hash(text),
            catalog,
            storages,
            jobs,
            daemon,
            notifiers,
        })
    } else {
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            diagnostics: c.diagnostics,
        })
    }
}

/// Length: one check per key of `[daemon]`, each with its own message.
fn validate_daemon(c: &mut Checker<'_>, d: &crate::raw::RawDaemon) -> crate::DaemonConfig {
    let listen = match &d.listen {
        Some(l) => match l.get_ref().parse::<std::net::SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                c.error(
                    l.span(),
                    format!(
                        "invalid daemon.listen {:?}: use IP:PORT, e.g. \"{}\" (loopback) or \"0.0.0.0:9871\"",
                        l.get_ref(),
                        crate::DEFAULT_LISTEN
                    ),
                );
                crate::DEFAULT_LISTEN.parse().expect("valid default")
            }
        },
        None => crate::DEFAULT_LISTEN.parse().expect("valid default"),
    };
    let max_concurrent_jobs = int_in(
        c,
        "daemon.max_concurrent_jobs",
        d.max_concurrent_jobs.as_ref(),
        1..=64,
        2,
    ) as usize;
    let shutdown_grace = d
        .shutdown_grace
        .as_ref()
        .and_then(|g| duration(c, "daemon.shutdown_grace", g))
        .unwrap_or(Duration::from_secs(300));
    let api_token = d
        .api_token_file
        .as_ref()
        .and_then(|f| token_file(c, "daemon.api_token_file", f));
    let status_token = d
        .status_token_file
        .as_ref()
        .and_then(|f| token_file(c, "daemon.status_token_file", f));
    let status_page = d.status_page.as_ref().is_some_and(|s| *s.get_ref());
    if let Some(s) = d.status_page.as_ref().filter(|s| *s.get_ref())
        && !listen.ip().is_loopback()
        && d.api_token_file.is_none()
        && d.status_token_file.is_none()
    {
        c.error(
            s.span(),
            format!(
                "daemon.status_page on a listener other than loopback ({listen}) needs a token: set daemon.status_token_file (reads the page only) or daemon.api_token_file, or listen on 127.0.0.1"
            ),
        );
    }
    if let Some(f) = d.status_token_file.as_ref().filter(|_| !status_page) {
        c.error(
            f.span(),
            "daemon.status_token_file is set but the status page is off: add daemon.status_page = true",
        );
    }
    let catalog_password = match (&d.catalog_password_file, &d.catalog_password_env) {
        (Some(_), Some(env)) => {
            c.error(
                env.span(),
                "set either daemon.catalog_password_file or catalog_password_env, not both",
            );
            None
        }
        (Some(f), None) => c
            .read_secret_file("daemon.catalog_password_file", f)
            .map(Secret::new),
        (None, Some(env)) => c.env_value(env).map(Secret::new),
        (None, None) => None,
    };
    let catalog_connections = int_in(
        c,
        "daemon.catalog_connections",
        d.catalog_connections.as_ref(),
        1..=100,
        crate::DEFAULT_CATALOG_CONNECTIONS.into(),
    ) as u32;
    let catalog_history = match d.catalog_history.as_ref() {
        Some(h) => match duration(c, "daemon.catalog_history", h) {
            Some(v) if v < Duration::from_secs(86_400) => {
                c.error(
                    h.span(),
                    "daemon.catalog_history must be at least 1d: the catalog's runs are what status, the metrics and the fleet's catch-up read (the backups themselves are in the stores)",
                );
                None
            }
            v => v,
        },
        None => None,
    }
    .unwrap_or(crate::DEFAULT_CATALOG_HISTORY);
    let lease = d
        .lease
        .as_ref()
        .and_then(|g| duration(c, "daemon.lease", g))
        .unwrap_or(Duration::from_secs(30));
    let heartbeat = d
        .heartbeat
        .as_ref()
        .and_then(|g| duration(c, "daemon.heartbeat", g))
        .unwrap_or(Duration::from_secs(5));
    if heartbeat * 3 > lease {
        c.error(
            d.heartbeat
                .as_ref()
                .or(d.lease.as_ref())
                .map_or(0..0, |s| s.span()),
            format!(
                "daemon.heartbeat ({}) must be at most a third of daemon.lease ({}): a node renews its lease several times before it may expire",
                humantime::format_duration(heartbeat),
                humantime::format_duration(lease)
            ),
        );
    }
    let signing_key = d.signing_key_file.as_ref().and_then(|f| signing_key(c, f));
    let mut keys: Vec<backstop_crypto::sign::PublicKey> = Vec::new();
    for k in d.trusted_keys.iter().flatten() {
        match backstop_crypto::sign::PublicKey::parse(k.get_ref()) {
            Ok(pk) => keys.push(pk),
            Err(e) => c.error(k.span(), format!("daemon.trusted_keys: {e}")),
        }
    }
    // A host trusts what it signs itself.
    keys.extend(signing_key.iter().map(|k| k.public().clone()));
    crate::DaemonConfig {
        listen,
        max_concurrent_jobs,
        shutdown_grace,
        api_token,
        status_page,
        status_token,
        catalog_password,
        catalog_connections,
        catalog_history,
        lease,
        heartbeat,
        signing_key,
        trusted_keys: backstop_crypto::sign::TrustedKeys::new(keys),
    }
}

/// The signing key from `daemon.signing_key_file`: readable by its owner
/// (and its group) only, a minisign secret key without a password.
fn signing_key(
    c: &mut Checker<'_>,
    f: &Spanned<String>,
) -> Option<std::sync::Arc<backstop_crypto::sign::SigningKey>> {
    use std::os::unix::fs::PermissionsExt;
    let key = "daemon.signing_key_file";
    let path = c.check_secret_file(key, f)?;
    let mode = std::fs::metadata(&path).ok()?.permissions().mode();
    // As the other secret files, with group write refused too (0440 from
    // a Kubernetes Secret with fsGroup is fine, 0640 with a dedicated group).
    if mode & 0o027 != 0 {
        c.error(
            f.span(),
            format!(
                "{key} {} can be read or written by others (mode {:o}): whoever reads it can sign backups this host trusts; run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        );
        return None;
    }
    let text = c.read_secret_file(key, f)?;
    match backstop_crypto::sign::SigningKey::parse(&text) {
        Ok(k) => Some(std::sync::Arc::new(k)),
        Err(e) => {
            c.error(f.span(), format!("{key} {}: {e}", path.display()));
            None
        }
    }
}

/// A bearer token from a file: at least 16 characters.
fn token_file(c: &mut Checker<'_>, key: &str, f: &Spanned<String>) -> Option<Secret> {
    let token = c.read_secret_file(key, f)?;
    if token.trim().len() < 16 {
        c.error(
            f.span(),
            format!(
                "{key} holds fewer than 16 characters; use a long random token, e.g. `openssl rand -hex 32`"
            ),
        );
        return None;
    }
    Some(Secret::new(token.trim()))
}

/// The URL without its password, for messages.
fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => s.to_string(),
    }
}

/// A digest of the settings in `text`: the parsed TOML re-serialised, so
/// comments, key order and layout do not change it. The first 16 hex
/// digits of its SHA-256.
fn settings_hash(text: &str) -> String {
    use sha2::Digest;
    // Where a node listens is its own business, not the fleet's.
    let canonical = toml::from_str::<toml::Value>(text)
        .map(|mut v| {
            if let Some(d) = v.get_mut("daemon").and_then(toml::Value::as_table_mut) {
                d.remove("listen");
                d.remove("api_token_file");
                d.remove("status_token_file");
            }
            v.to_string()
        })
        .unwrap_or_else(|_| text.to_string());
    let digest = sha2::Sha256::digest(canonical.as_bytes());
    hex::encode(digest)[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compression;

    #[test]
    fn line_col_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(line_col(text, 10), (2, 4));
    }

    #[test]
    fn compression_values() {
        assert_eq!(
            parse_compression("zstd:3"),
            Some(Compression::Zstd { level: 3 })
        );
        assert_eq!(
            parse_compression("zstd"),
            Some(Compression::Zstd { level: 3 })
        );
        assert_eq!(parse_compression("none"), Some(Compression::None));
        assert_eq!(parse_compression("zstd:auto"), Some(Compression::ZstdAuto));
        assert_eq!(parse_compression("zstd:Auto"), None);
        assert_eq!(parse_compression("zstd:0"), None);
        assert_eq!(parse_compression("zstd:20"), None);
        assert_eq!(parse_compression("gzip"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("5 MB"), Ok(5_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("16 MiBs").is_err());
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn bucket_names() {
        assert!(valid_bucket("acme-db-backups"));
        assert!(!valid_bucket("Acme"));
        assert!(!valid_bucket("ab"));
        assert!(!valid_bucket("-abc"));
    }

    #[test]
    fn settings_hash_ignores_comments_and_layout() {
        let a = settings_hash("[daemon]\nlisten = \"127.0.0.1:1\"\n");
        let b = settings_hash("# a comment\n[daemon]\n  listen   =   \"127.0.0.1:1\"\n");
        let c = settings_hash("[daemon]\nlisten = \"127.0.0.1:2\"\n");
        let d = settings_hash("[daemon]\nlisten = \"127.0.0.1:1\"\nmax_concurrent_jobs = 3\n");
        assert_eq!(a, b);
        // A node's own listener is not a setting the fleet shares.
        assert_eq!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
