//! Raw schema → validated [`Config`], collecting every problem with its position.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use toml::Spanned;

use crate::raw::RawStorage;
use crate::raw::{RawConfig, RawDatabase, RawJob, RawVerify};
use crate::{
    Compression, Config, ConfigError, DEFAULT_CATALOG, DatabaseConfig, Diagnostic, Encryption,
    Filters, JobConfig, MAX_PART_SIZE, MIN_PART_SIZE, S3Config, S3Credentials, Schedule, Secret,
    StorageConfig, VerifyConfig, VerifyLevel,
};

/// Collects diagnostics against one source text.
pub(crate) struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

impl Checker<'_> {
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.diagnostics.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    /// The value of the environment variable `env` names; an error if unset or empty.
    pub(crate) fn env_value(&mut self, env: &Spanned<String>) -> Option<String> {
        match std::env::var(env.get_ref()) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                self.error(
                    env.span(),
                    format!("environment variable {} is not set", env.get_ref()),
                );
                None
            }
        }
    }

    /// Reads a secret file, insisting that it is not readable by everyone.
    pub(crate) fn read_secret_file(
        &mut self,
        key: &str,
        value: &Spanned<String>,
    ) -> Option<String> {
        let path = self.check_secret_file(key, value)?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                self.error(
                    value.span(),
                    format!("cannot read {key} {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// The path of a secret file that exists and is not readable by everyone.
    pub(crate) fn check_secret_file(
        &mut self,
        key: &str,
        value: &Spanned<String>,
    ) -> Option<PathBuf> {
        let path = self.resolve(value.get_ref());
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                self.error(
                    value.span(),
                    format!(
                        "cannot read {key} {}: {e} (create the file or fix the path)",
                        path.display()
                    ),
                );
                return None;
            }
        };
        if meta.permissions().mode() & 0o004 != 0 {
            self.error(
                value.span(),
                format!(
                    "{key} {} is readable by every user; run `chmod 600 {}` (or 640 with a dedicated group)",
                    path.display(),
                    path.display()
                ),
            );
            return None;
        }
        Some(path)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

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
            if !s.starts_with("sqlite:") {
                c.error(
                    cat.span(),
                    format!(
                        "unsupported catalog {s:?}: use a SQLite URL such as \"{DEFAULT_CATALOG}\""
                    ),
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

    if c.diagnostics.is_empty() {
        Ok(Config {
            source: path.to_path_buf(),
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

const LOCAL_ONLY: &str = "path";
const S3_ONLY: &str = "bucket, prefix, region, endpoint, force_path_style, storage_class, sse, kms_key_id, access_key_id, access_key_id_env, secret_access_key_file, secret_access_key_env, part_size, max_in_flight_parts";

fn validate_storage(
    c: &mut Checker<'_>,
    name: &Spanned<String>,
    st: &RawStorage,
) -> Option<StorageConfig> {
    let before = c.diagnostics.len();
    let s3_keys = [
        st.bucket.as_ref().map(|v| v.span()),
        st.prefix.as_ref().map(|v| v.span()),
        st.region.as_ref().map(|v| v.span()),
        st.endpoint.as_ref().map(|v| v.span()),
        st.storage_class.as_ref().map(|v| v.span()),
        st.sse.as_ref().map(|v| v.span()),
        st.kms_key_id.as_ref().map(|v| v.span()),
        st.access_key_id.as_ref().map(|v| v.span()),
        st.access_key_id_env.as_ref().map(|v| v.span()),
        st.secret_access_key_file.as_ref().map(|v| v.span()),
        st.secret_access_key_env.as_ref().map(|v| v.span()),
        st.part_size.as_ref().map(|v| v.span()),
        st.max_in_flight_parts.as_ref().map(|v| v.span()),
    ];
    match st.kind.get_ref().as_str() {
        "local" => {
            if let Some(span) = s3_keys.into_iter().flatten().next() {
                c.error(
                    span,
                    format!(
                        "this key belongs to S3 stores ({S3_ONLY}); storage \"{}\" is local",
                        name.get_ref()
                    ),
                );
            }
            match &st.path {
                Some(p) if !p.get_ref().is_empty() => Some(StorageConfig::Local {
                    path: c.resolve(p.get_ref()),
                }),
                _ => {
                    c.error(
                        st.kind.span(),
                        format!(
                            "storage \"{}\" of type \"local\" needs a path, e.g. path = \"/var/lib/backstop/backups\"",
                            name.get_ref()
                        ),
                    );
                    None
                }
            }
        }
        "s3" => {
            if let Some(p) = &st.path {
                c.error(
                    p.span(),
                    format!(
                        "`{LOCAL_ONLY}` belongs to local stores; S3 stores use bucket and prefix"
                    ),
                );
            }
            let bucket = match &st.bucket {
                Some(b) if valid_bucket(b.get_ref()) => b.get_ref().clone(),
                Some(b) => {
                    c.error(
                        b.span(),
                        format!(
                            "invalid bucket name {:?}: 3–63 lowercase letters, digits, '.' and '-'",
                            b.get_ref()
                        ),
                    );
                    String::new()
                }
                None => {
                    c.error(
                        st.kind.span(),
                        format!(
                            "S3 storage \"{}\" needs a bucket, e.g. bucket = \"acme-db-backups\"",
                            name.get_ref()
                        ),
                    );
                    String::new()
                }
            };
            let prefix = match &st.prefix {
                None => String::new(),
                Some(p) => {
                    let v = p.get_ref().trim_start_matches('/');
                    if v.split('/').any(|seg| seg == ".." || seg == ".") {
                        c.error(p.span(), "prefix must not contain '.' or '..' segments");
                    }
                    if v.is_empty() || v.ends_with('/') {
                        v.to_string()
                    } else {
                        format!("{v}/")
                    }
                }
            };
            let region = st
                .region
                .as_ref()
                .map_or_else(|| "us-east-1".to_string(), |r| r.get_ref().clone());
            let endpoint = st
                .endpoint
                .as_ref()
                .and_then(|e| match url::Url::parse(e.get_ref()) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                        Some(e.get_ref().trim_end_matches('/').to_string())
                    }
                    _ => {
                        c.error(
                            e.span(),
                            format!(
                                "invalid endpoint {:?}: expected http(s)://host[:port]",
                                e.get_ref()
                            ),
                        );
                        None
                    }
                });
            let sse = st.sse.as_ref().and_then(|s| match s.get_ref().as_str() {
                "AES256" | "aws:kms" => Some(s.get_ref().clone()),
                other => {
                    c.error(
                        s.span(),
                        format!("unknown sse {other:?}: use \"AES256\" or \"aws:kms\""),
                    );
                    None
                }
            });
            if let Some(k) = &st.kms_key_id
                && sse.as_deref() != Some("aws:kms")
            {
                c.error(k.span(), "kms_key_id needs sse = \"aws:kms\"");
            }
            let key_id = match (&st.access_key_id, &st.access_key_id_env) {
                (Some(_), Some(env)) => {
                    c.error(
                        env.span(),
                        "set either access_key_id or access_key_id_env, not both",
                    );
                    None
                }
                (Some(k), None) => Some((k.span(), k.get_ref().clone())),
                (None, Some(env)) => c.env_value(env).map(|v| (env.span(), v)),
                (None, None) => None,
            };
            let secret = match (&st.secret_access_key_file, &st.secret_access_key_env) {
                (Some(_), Some(env)) => {
                    c.error(
                        env.span(),
                        "set either secret_access_key_file or secret_access_key_env, not both",
                    );
                    None
                }
                (Some(f), None) => c
                    .read_secret_file("secret_access_key_file", f)
                    .map(|v| (f.span(), v)),
                (None, Some(env)) => c.env_value(env).map(|v| (env.span(), v)),
                (None, None) => None,
            };
            let credentials = match (key_id, secret) {
                (Some((_, id)), Some((_, secret))) => Some(S3Credentials {
                    access_key_id: id,
                    secret_access_key: Secret::new(secret),
                }),
                (Some((span, _)), None) => {
                    c.error(span, "an access key id needs its secret: set secret_access_key_file (or secret_access_key_env)");
                    None
                }
                (None, Some((span, _))) => {
                    c.error(span, "a secret access key needs its id: set access_key_id_env (or access_key_id)");
                    None
                }
                (None, None) => None,
            };
            let part_size = match &st.part_size {
                None => 16 * 1024 * 1024,
                Some(p) => match parse_size(p.get_ref()) {
                    Ok(n) if (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&n) => n,
                    Ok(_) => {
                        c.error(
                            p.span(),
                            "part_size must be between 5MiB and 5GiB (S3's limits)",
                        );
                        0
                    }
                    Err(e) => {
                        c.error(
                            p.span(),
                            format!("invalid part_size {:?}: {e}", p.get_ref()),
                        );
                        0
                    }
                },
            };
            let max_in_flight_parts = match &st.max_in_flight_parts {
                None => 4,
                Some(n) if (1..=64).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    c.error(n.span(), "max_in_flight_parts must be between 1 and 64");
                    4
                }
            };
            (c.diagnostics.len() == before).then(|| {
                StorageConfig::S3(S3Config {
                    bucket,
                    prefix,
                    region,
                    endpoint,
                    force_path_style: st.force_path_style.unwrap_or(false),
                    storage_class: st.storage_class.as_ref().map(|s| s.get_ref().clone()),
                    sse,
                    kms_key_id: st.kms_key_id.as_ref().map(|s| s.get_ref().clone()),
                    credentials,
                    part_size,
                    max_in_flight_parts,
                })
            })
        }
        other => {
            c.error(
                st.kind.span(),
                format!("unknown storage type {other:?} (expected \"local\" or \"s3\")"),
            );
            None
        }
    }
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '.' || ch == '-')
        && b.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && b.ends_with(|ch: char| ch.is_ascii_alphanumeric())
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a size such as `"16MiB"`, `"5 MB"`, `"1GiB"` or `"1048576"` (bytes).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "write a number with a unit, e.g. \"16MiB\"".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// Names become directory names and metric labels: keep them tame.
fn check_name(c: &mut Checker<'_>, what: &str, name: &Spanned<String>) {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        && !n.starts_with('-');
    if !ok {
        c.error(
            name.span(),
            format!(
                "invalid {what} name {n:?}: use 1–64 letters, digits, '-' or '_' (it becomes a directory name and a metric label)"
            ),
        );
    }
}

fn validate_job(
    c: &mut Checker<'_>,
    job: &RawJob,
    storages: &BTreeMap<String, StorageConfig>,
    profiles: &BTreeMap<String, Vec<String>>,
    notifiers: &BTreeMap<Spanned<String>, crate::raw::RawNotify>,
    default_retention: Option<&crate::RetentionConfig>,
) -> Option<JobConfig> {
    let before = c.diagnostics.len();
    let name = job.name.get_ref().clone();

    let database = validate_database(c, &job.database);

    let timezone = match &job.timezone {
        Some(tz) => match Tz::from_str(tz.get_ref()) {
            Ok(tz) => tz,
            Err(_) => {
                c.error(
                    tz.span(),
                    format!(
                        "unknown time zone {:?}: use an IANA name such as \"UTC\" or \"Europe/Berlin\"",
                        tz.get_ref()
                    ),
                );
                Tz::UTC
            }
        },
        None => Tz::UTC,
    };

    let schedule = job.schedule.as_ref().and_then(|s| parse_schedule(c, s));

    let compression = match &job.compression {
        None => Compression::Zstd { level: 3 },
        Some(s) => match parse_compression(s.get_ref()) {
            Some(comp) => comp,
            None => {
                c.error(
                    s.span(),
                    format!(
                        "invalid compression {:?}: use \"zstd:N\" with N from 1 to 19 (e.g. \"zstd:3\"), \"zstd\" or \"none\"",
                        s.get_ref()
                    ),
                );
                Compression::None
            }
        },
    };

    let encryption = match &job.encryption {
        Some(e) if e.get_ref() == "none" => Encryption::None,
        Some(e) => match profiles.get(e.get_ref()) {
            Some(recipients) => Encryption::Age {
                profile: e.get_ref().clone(),
                recipients: recipients.clone(),
            },
            None => {
                c.error(
                    e.span(),
                    format!(
                        "job \"{name}\" uses encryption profile {:?}, which is not defined: add [encryption.{}] or set encryption = \"none\"{}",
                        e.get_ref(),
                        e.get_ref(),
                        known("profiles", profiles.keys())
                    ),
                );
                Encryption::None
            }
        },
        None => match profiles.get("default") {
            Some(recipients) => Encryption::Age {
                profile: "default".into(),
                recipients: recipients.clone(),
            },
            None => {
                c.error(
                    job.name.span(),
                    format!(
                        "job \"{name}\" has no encryption: add an [encryption.default] profile with age recipients, name one with encryption = \"<profile>\", or opt out explicitly with encryption = \"none\""
                    ),
                );
                Encryption::None
            }
        },
    };

    let mut storage = Vec::new();
    if job.storage.get_ref().is_empty() {
        c.error(
            job.storage.span(),
            format!("job \"{name}\" has no storage: name at least one [storage.NAME]"),
        );
    }
    for s in job.storage.get_ref() {
        if !storages.contains_key(s.get_ref()) {
            c.error(
                s.span(),
                format!(
                    "job \"{name}\" uses storage {:?}, which is not defined: add [storage.{}]{}",
                    s.get_ref(),
                    s.get_ref(),
                    known("storages", storages.keys())
                ),
            );
        } else if storage.contains(s.get_ref()) {
            c.error(
                s.span(),
                format!("storage {:?} is listed twice", s.get_ref()),
            );
        } else {
            storage.push(s.get_ref().clone());
        }
    }

    let timeout = job.timeout.as_ref().and_then(|t| duration(c, "timeout", t));
    let rpo = job.rpo.as_ref().and_then(|t| duration(c, "rpo", t));

    let pg_dump_path = job.pg_dump_path.as_ref().map(|p| c.resolve(p.get_ref()));
    let pg_bin_dir = job.pg_bin_dir.as_ref().map(|p| c.resolve(p.get_ref()));
    if let (Some(p), Some(_)) = (&job.pg_dump_path, &job.pg_bin_dir) {
        c.error(p.span(), "set either pg_dump_path or pg_bin_dir, not both");
    }

    let identity_file = job
        .identity_file
        .as_ref()
        // Must exist and not be readable by everyone; read only when a restore
        // or decrypting verify runs.
        .and_then(|p| c.check_secret_file("identity_file", p));
    let verify = job.verify.as_ref().and_then(|v| {
        validate_verify(
            c,
            &name,
            !matches!(encryption, Encryption::None),
            identity_file.as_ref(),
            v,
        )
    });

    let retries = int_in(c, "retries", job.retries.as_ref(), 0..=10, 2) as u32;
    let retry_backoff = job
        .retry_backoff
        .as_ref()
        .and_then(|t| duration(c, "retry_backoff", t))
        .unwrap_or(Duration::from_secs(60));

    let anomaly_min_ratio = match job.anomaly.as_ref().and_then(|a| a.min_ratio.as_ref()) {
        Some(r) if (0.0..1.0).contains(r.get_ref()) => *r.get_ref(),
        Some(r) => {
            c.error(
                r.span(),
                "anomaly.min_ratio must be at least 0 (off) and below 1, e.g. 0.5",
            );
            0.5
        }
        None => 0.5,
    };
    let retention = match &job.retention {
        Some(r) => validate_retention(c, r),
        None => default_retention.cloned(),
    };
    let mut notify = Vec::new();
    for n in job.notify.iter().flat_map(|l| l.get_ref()) {
        if !notifiers.keys().any(|k| k.get_ref() == n.get_ref()) {
            c.error(
                n.span(),
                format!(
                    "job \"{name}\" notifies {:?}, which is not defined: add [notify.{}]{}",
                    n.get_ref(),
                    n.get_ref(),
                    known("notifiers", notifiers.keys().map(Spanned::get_ref))
                ),
            );
        } else if notify.contains(n.get_ref()) {
            c.error(
                n.span(),
                format!("notifier {:?} is listed twice", n.get_ref()),
            );
        } else {
            notify.push(n.get_ref().clone());
        }
    }

    if c.diagnostics.len() != before {
        return None;
    }
    Some(JobConfig {
        name,
        database: database?,
        schedule,
        timezone,
        format: job.format,
        scope: job.scope,
        globals: job.globals,
        no_role_passwords: job.no_role_passwords,
        filters: Filters {
            include_schemas: job.include_schemas.clone(),
            exclude_schemas: job.exclude_schemas.clone(),
            include_tables: job.include_tables.clone(),
            exclude_tables: job.exclude_tables.clone(),
        },
        compression,
        encryption,
        storage,
        timeout,
        rpo,
        row_counts: job.row_counts,
        pg_dump_path,
        pg_bin_dir,
        identity_file,
        verify,
        retries,
        retry_backoff,
        catch_up: job.catch_up,
        retention,
        anomaly_min_ratio,
        notify,
    })
}

fn validate_retention(
    c: &mut Checker<'_>,
    r: &Spanned<crate::raw::RawRetention>,
) -> Option<crate::RetentionConfig> {
    let raw = r.get_ref();
    let before = c.diagnostics.len();
    let mut count = |key: &str, v: &Option<Spanned<i64>>, default: u32| -> u32 {
        match v {
            Some(n) if (0..=100_000).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                c.error(n.span(), format!("{key} must be from 0 to 100000"));
                0
            }
            None => default,
        }
    };
    let policy = backstop_retention::Policy {
        keep_last: count("keep_last", &raw.keep_last, 0),
        keep_hourly: count("keep_hourly", &raw.keep_hourly, 0),
        keep_daily: count("keep_daily", &raw.keep_daily, 0),
        keep_weekly: count("keep_weekly", &raw.keep_weekly, 0),
        keep_monthly: count("keep_monthly", &raw.keep_monthly, 0),
        keep_yearly: count("keep_yearly", &raw.keep_yearly, 0),
        min_keep: count("min_keep", &raw.min_keep, 3),
        keep_within: raw
            .keep_within
            .as_ref()
            .and_then(|d| duration(c, "keep_within", d)),
    };
    if let Some(m) = &raw.min_keep
        && *m.get_ref() < 1
    {
        c.error(
            m.span(),
            "min_keep must be at least 1: retention never deletes every backup",
        );
    }
    if !policy.has_rules() && c.diagnostics.len() == before {
        c.error(
            r.span(),
            "retention has no rule: set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within (or remove retention to keep every backup)",
        );
    }
    let orphan_grace = raw
        .orphan_grace
        .as_ref()
        .and_then(|d| duration(c, "orphan_grace", d))
        .unwrap_or(Duration::from_secs(24 * 3600));
    let schedule = raw.schedule.as_ref().and_then(|s| parse_schedule(c, s));
    (c.diagnostics.len() == before).then_some(crate::RetentionConfig {
        policy,
        orphan_grace,
        schedule,
    })
}

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
    let api_token = d.api_token_file.as_ref().and_then(|f| {
        let token = c.read_secret_file("daemon.api_token_file", f)?;
        if token.trim().len() < 16 {
            c.error(
                f.span(),
                "daemon.api_token_file holds fewer than 16 characters; use a long random token, e.g. `openssl rand -hex 32`",
            );
            return None;
        }
        Some(Secret::new(token.trim()))
    });
    crate::DaemonConfig {
        listen,
        max_concurrent_jobs,
        shutdown_grace,
        api_token,
    }
}

fn parse_schedule(c: &mut Checker<'_>, s: &Spanned<String>) -> Option<Schedule> {
    match crate::parse_schedule(s.get_ref()) {
        Ok(schedule) => Some(schedule),
        Err(e) => {
            c.error(
                s.span(),
                format!(
                    "invalid cron expression {:?}: {e} (five fields \"minute hour day-of-month month day-of-week\", e.g. \"15 2 * * *\", or six with seconds first)",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

fn validate_verify(
    c: &mut Checker<'_>,
    job_name: &str,
    encrypted: bool,
    job_identity: Option<&PathBuf>,
    v: &Spanned<RawVerify>,
) -> Option<VerifyConfig> {
    let raw = v.get_ref();
    let schedule = parse_schedule(c, &raw.schedule);
    let identity_file = raw
        .identity_file
        .as_ref()
        .and_then(|p| c.check_secret_file("verify.identity_file", p));
    if encrypted
        && raw.level.needs_identity()
        && raw.identity_file.is_none()
        && job_identity.is_none()
    {
        c.error(
            v.span(),
            format!(
                "verify level \"{}\" of job \"{job_name}\" decrypts the backup: set identity_file (the age identity matching the job's recipients, e.g. \"/run/credentials/backstop.service/age-identity\") in verify or in the job, or use level = \"checksum\"",
                raw.level.as_str()
            ),
        );
    }
    let target = match &raw.target {
        Some(url) if url::Url::parse(url.get_ref()).is_ok_and(|u| u.password().is_some()) => {
            c.error(
                url.span(),
                "verify.target contains a password; never inline secrets: use target_password_file or target_password_env",
            );
            None
        }
        Some(url) => {
            let db = RawDatabase {
                url: Some(url.clone()),
                url_env: None,
                password_file: raw.target_password_file.clone(),
                password_env: raw.target_password_env.clone(),
            };
            validate_database(c, &Spanned::new(url.span(), db))
        }
        None if raw.level == VerifyLevel::Restore => {
            c.error(
                v.span(),
                format!(
                    "verify level \"restore\" of job \"{job_name}\" needs target = \"postgres://user@verify-host:5432/postgres\": a server where a scratch database may be created and dropped"
                ),
            );
            None
        }
        None => None,
    };
    Some(VerifyConfig {
        schedule: schedule?,
        level: raw.level,
        target,
        identity_file,
    })
}

fn known<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<_> = names.map(|n| format!("\"{n}\"")).collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (defined {what}: {})", names.join(", "))
    }
}

/// An integer setting within `range` (an error naming the range otherwise),
/// or `default` when unset.
pub(crate) fn int_in(
    c: &mut Checker<'_>,
    key: &str,
    value: Option<&Spanned<i64>>,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> i64 {
    match value {
        Some(n) if range.contains(n.get_ref()) => *n.get_ref(),
        Some(n) => {
            c.error(
                n.span(),
                format!("{key} must be from {} to {}", range.start(), range.end()),
            );
            *range.start()
        }
        None => default,
    }
}

pub(crate) fn duration(
    c: &mut Checker<'_>,
    key: &str,
    value: &Spanned<String>,
) -> Option<Duration> {
    match parse_duration(value.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            c.error(
                value.span(),
                format!("invalid {key} {:?}: {e}", value.get_ref()),
            );
            None
        }
    }
}

/// Parses a positive duration such as `"90s"`, `"5m"`, `"2h"`, `"1d 12h"`.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "{e}; write a number with a unit, e.g. \"90s\", \"30m\", \"2h\", \"1d\""
        )),
    }
}

fn parse_compression(s: &str) -> Option<Compression> {
    match s {
        "none" => Some(Compression::None),
        "zstd" => Some(Compression::Zstd { level: 3 }),
        _ => {
            let level: i32 = s.strip_prefix("zstd:")?.parse().ok()?;
            (1..=19)
                .contains(&level)
                .then_some(Compression::Zstd { level })
        }
    }
}

fn validate_database(c: &mut Checker<'_>, db: &Spanned<RawDatabase>) -> Option<DatabaseConfig> {
    let raw = db.get_ref();
    let url = match (&raw.url, &raw.url_env) {
        (Some(_), Some(env)) => {
            c.error(
                env.span(),
                "set either database.url or database.url_env, not both",
            );
            None
        }
        (None, None) => {
            c.error(
                db.span(),
                "database needs url_env = \"VAR\" (a postgres:// URL in the environment) or url = \"postgres://user@host:5432/db\" with password_file",
            );
            None
        }
        (Some(url), None) => match url::Url::parse(url.get_ref()) {
            Ok(u) if u.password().is_some() => {
                c.error(
                        url.span(),
                        "database.url contains a password; never inline secrets: move it to password_file, or put the whole URL in the environment and use url_env",
                    );
                None
            }
            _ => check_url(c, url.span(), url.get_ref(), "database.url"),
        },
        (None, Some(env)) => match std::env::var(env.get_ref()) {
            Ok(v) if !v.is_empty() => check_url(
                c,
                env.span(),
                &v,
                &format!("environment variable {}", env.get_ref()),
            ),
            _ => {
                c.error(
                    env.span(),
                    format!(
                        "environment variable {} is not set; export it (e.g. in the systemd unit's EnvironmentFile=) or use url + password_file",
                        env.get_ref()
                    ),
                );
                None
            }
        },
    };
    let password = match (&raw.password_file, &raw.password_env) {
        (Some(_), Some(env)) => {
            c.error(
                env.span(),
                "set either database.password_file or database.password_env, not both",
            );
            None
        }
        (Some(file), None) => c.read_secret_file("password_file", file).map(Secret::new),
        (None, Some(env)) => match std::env::var(env.get_ref()) {
            Ok(v) => Some(Secret::new(v)),
            Err(_) => {
                c.error(
                    env.span(),
                    format!("environment variable {} is not set", env.get_ref()),
                );
                None
            }
        },
        (None, None) => None,
    };
    Some(DatabaseConfig {
        url: url?,
        password,
    })
}

fn check_url(c: &mut Checker<'_>, span: Range<usize>, value: &str, what: &str) -> Option<Secret> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") && u.host_str().is_some() => {
            if let Some(param) = crate::secret_query_parameter(&u) {
                c.error(
                    span,
                    format!(
                        "{what} has a {param}= query parameter; it would reach pg_dump's command line, visible to every user in `ps`: remove it and use password_file or password_env (target_password_file for verify.target)"
                    ),
                );
                return None;
            }
            Some(Secret::new(value))
        }
        // The value may hold a password: describe it without echoing it.
        _ => {
            c.error(
                span,
                format!(
                    "{what} is not a valid PostgreSQL URL; expected postgres://user@host:port/database"
                ),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn durations() {
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
