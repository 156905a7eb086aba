//! `[[job]]`: one database, its schedule, format, encryption, stores,
//! retention and scheduled verification.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use toml::Spanned;

use crate::budget::{
    DEFAULT_MEMORY_BUDGET, MemoryPlan, S3Parts, Threads, compressor_memory, stream_buffers,
};
use crate::raw::{RawDatabase, RawJob, RawVerify};
use crate::{
    Compression, Encryption, Filters, JobConfig, StorageConfig, VerifyConfig, VerifyLevel,
};

use super::database::*;
use crate::check::*;

/// Length: one check per key of a `[[job]]` table, each with its
/// file:line:col message.
pub(crate) fn validate_job(
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
    let cluster = validate_cluster(c, job);

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
                        "invalid compression {:?}: use \"zstd:N\" with N from 1 to 19 (e.g. \"zstd:3\"), \"zstd\", \"zstd:auto\" (the level follows the CPU left: 1 to 6) or \"none\"",
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

    let compression_threads = validate_threads(c, job.compression_threads.as_ref());
    let compression_share = validate_share(c, job.compression_share.as_ref());
    let streams = validate_streams(c, job);
    let memory_budget = validate_memory_budget(
        c,
        job,
        compression,
        (compression_threads, compression_share),
        (&storage, storages),
        crate::budget::lanes(streams),
    );
    let split_tables_larger_than = match &job.split_tables_larger_than {
        None => Some(crate::DEFAULT_SPLIT_TABLES_LARGER_THAN),
        Some(raw) if raw.get_ref().trim() == "0" || raw.get_ref() == "off" => None,
        Some(raw) => match parse_size(raw.get_ref()) {
            Ok(n) if n >= 1024 * 1024 => Some(n),
            Ok(_) => {
                c.error(
                    raw.span(),
                    "split_tables_larger_than below 1MiB would cut small tables into many pieces: give a size such as \"1GiB\", or 0 to never split",
                );
                None
            }
            Err(e) => {
                c.error(
                    raw.span(),
                    format!("invalid split_tables_larger_than {:?}: {e} (a size such as \"1GiB\", or 0 to never split)", raw.get_ref()),
                );
                None
            }
        },
    };
    let max_source_connections = job
        .max_source_connections
        .as_ref()
        .map(|m| int_in(c, "max_source_connections", Some(m), 1..=1000, 1) as u32);

    let timeout = job.timeout.as_ref().and_then(|t| duration(c, "timeout", t));
    let starting_deadline = job
        .starting_deadline
        .as_ref()
        .and_then(|t| duration(c, "starting_deadline", t));
    let rpo = job.rpo.as_ref().and_then(|t| duration(c, "rpo", t));
    let rto = job.rto.as_ref().and_then(|t| duration(c, "rto", t));
    let lock_wait_timeout = match &job.lock_wait_timeout {
        Some(t) if t.get_ref() == "0" || t.get_ref() == "off" => None,
        Some(t) => duration(c, "lock_wait_timeout", t),
        None => Some(crate::DEFAULT_LOCK_WAIT_TIMEOUT),
    };
    let lock_guard = validate_lock_guard(c, job.lock_guard.as_ref());
    let standby = match job.standby.as_ref().map(|s| (s, s.get_ref().as_str())) {
        None | Some((_, "retry")) => crate::StandbyMode::Retry,
        Some((_, "pause")) => crate::StandbyMode::Pause,
        Some((s, other)) => {
            c.error(
                s.span(),
                format!("unknown standby {other:?}: use \"retry\" (the default: a dump cancelled by a recovery conflict is retried) or \"pause\" (WAL replay is paused for the dump and resumed after it)"),
            );
            crate::StandbyMode::Retry
        }
    };
    let stall_timeout = match &job.stall_timeout {
        Some(t) if t.get_ref() == "0" || t.get_ref() == "off" => None,
        Some(t) => duration(c, "stall_timeout", t),
        None => Some(crate::DEFAULT_STALL_TIMEOUT),
    };

    let max_snapshot_age = job
        .max_snapshot_age
        .as_ref()
        .and_then(|t| duration(c, "max_snapshot_age", t));

    let expected_size =
        job.expected_size
            .as_ref()
            .and_then(|raw| match crate::parse_size(raw.get_ref()) {
                Ok(n) if n > 0 => Some(n),
                Ok(_) => {
                    c.error(raw.span(), "expected_size must be above 0 (or left out)");
                    None
                }
                Err(e) => {
                    c.error(
                        raw.span(),
                        format!("invalid expected_size {:?}: {e}", raw.get_ref()),
                    );
                    None
                }
            });

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
        cluster,
        member: None,
        rto,
        lock_wait_timeout,
        lock_guard,
        stall_timeout,
        max_snapshot_age,
        expected_size,
        standby,
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
        compression_threads,
        compression_share,
        memory_budget,
        streams,
        split_tables_larger_than,
        max_source_connections,
        encryption,
        storage,
        timeout,
        starting_deadline,
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

/// `compression_threads = "auto" | N`.
fn validate_threads(c: &mut Checker<'_>, raw: Option<&Spanned<toml::Value>>) -> Threads {
    let Some(raw) = raw else {
        return Threads::Auto;
    };
    match raw.get_ref() {
        toml::Value::String(s) if s == "auto" => Threads::Auto,
        toml::Value::Integer(n) if (0..=64).contains(n) => Threads::Count(*n as u32),
        other => {
            c.error(
                raw.span(),
                format!(
                    "compression_threads {other} is not \"auto\" (the stream's own thread, then every core if compression holds pg_dump up) or a number of worker threads from 0 to 64 (0: the stream's own thread)"
                ),
            );
            Threads::Auto
        }
    }
}

/// `compression_share = 0.5`: the share of the host's cores `"auto"`
/// compression may take (more than 0, at most 1).
fn validate_share(c: &mut Checker<'_>, raw: Option<&Spanned<toml::Value>>) -> f64 {
    let Some(raw) = raw else {
        return crate::budget::DEFAULT_COMPRESSION_SHARE;
    };
    let share = match raw.get_ref() {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(1) => Some(1.0),
        _ => None,
    };
    match share {
        Some(f) if f > 0.0 && f <= 1.0 => f,
        _ => {
            c.error(
                raw.span(),
                format!(
                    "compression_share {} is not a share of the host's cores above 0 and at most 1 (0.5: compression_threads = \"auto\" grows to at most half the cores, split between the job's streams)",
                    raw.get_ref()
                ),
            );
            crate::budget::DEFAULT_COMPRESSION_SHARE
        }
    }
}

/// `memory_budget = "48MiB"`: it must hold the compressor, the stream's
/// buffers and two parts per S3 store. Unset, it is the default or, when
/// the job's compression needs more, that minimum.
/// With `lanes` streams at once (see [`crate::budget::lanes`]) each needs that.
fn validate_memory_budget(
    c: &mut Checker<'_>,
    job: &RawJob,
    compression: Compression,
    (threads, share): (Threads, f64),
    (storage, storages): (&[String], &BTreeMap<String, StorageConfig>),
    lanes: u32,
) -> u64 {
    let s3: Vec<S3Parts> = storage
        .iter()
        .filter_map(|name| match storages.get(name) {
            Some(StorageConfig::S3(s)) => Some(S3Parts {
                part_size: s.part_size,
                max_in_flight: s.max_in_flight_parts,
            }),
            _ => None,
        })
        .collect();
    let workers = crate::budget::thread_plan(compression, threads, share, lanes).most();
    let per_lane = MemoryPlan::minimum(compression, workers, storage.len().max(1), &s3);
    let minimum = per_lane * u64::from(lanes);
    let Some(raw) = &job.memory_budget else {
        return (DEFAULT_MEMORY_BUDGET * u64::from(lanes)).max(minimum);
    };
    let budget = match parse_size(raw.get_ref()) {
        Ok(n) => n,
        Err(e) => {
            c.error(
                raw.span(),
                format!("invalid memory_budget {:?}: {e}", raw.get_ref()),
            );
            return DEFAULT_MEMORY_BUDGET;
        }
    };
    if budget < minimum {
        let parts = if s3.is_empty() {
            String::new()
        } else {
            format!(
                ", and two parts per S3 store ({} for {} store{})",
                human_bytes(s3.iter().map(S3Parts::minimum).sum()),
                s3.len(),
                if s3.len() == 1 { "" } else { "s" }
            )
        };
        c.error(
            raw.span(),
            format!(
                "memory_budget {:?} is too small for this job: it needs at least {}{}: {compression} on {} thread{} takes {}, the stream's buffers {}{parts}; raise memory_budget, or lower the compression level or compression_threads{}",
                raw.get_ref(),
                human_bytes(minimum),
                if lanes > 1 {
                    format!(" ({lanes} streams at once, streams = {} and one for the schema, {} each)", lanes - 1, human_bytes(per_lane))
                } else {
                    String::new()
                },
                workers.max(1),
                if workers <= 1 { "" } else { "s" },
                human_bytes(compressor_memory(compression, workers)),
                human_bytes(stream_buffers(storage.len().max(1))),
                if lanes > 1 { " or streams" } else { "" },
            ),
        );
    }
    budget
}

/// `streams = N`: how many connections dump the table data (1 to 64). A
/// backup in streams is in sections, so it needs the custom format and
/// the whole database (schema and data).
fn validate_streams(c: &mut Checker<'_>, job: &RawJob) -> u32 {
    let streams = int_in(c, "streams", job.streams.as_ref(), 1..=64, 1) as u32;
    if streams > 1
        && let Some(raw) = &job.streams
    {
        if job.format != crate::DumpFormat::Custom {
            c.error(
                raw.span(),
                "streams above 1 needs format = \"custom\": a backup in streams keeps its schema as pg_dump custom archives (pre-data and post-data) beside the data streams",
            );
        } else if job.scope != crate::Scope::Full {
            c.error(
                raw.span(),
                format!(
                    "streams above 1 dumps the schema and the data in sections; with scope = \"{}\" leave streams at 1",
                    job.scope.as_str()
                ),
            );
        }
    }
    streams
}

/// `lock_guard = { mode = "warn" | "yield" | "off", max_block = "10s" }`.
fn validate_lock_guard(
    c: &mut Checker<'_>,
    raw: Option<&Spanned<crate::raw::RawLockGuard>>,
) -> crate::LockGuard {
    let mut g = crate::DEFAULT_LOCK_GUARD;
    let Some(raw) = raw else { return g };
    let raw = raw.get_ref();
    if let Some(m) = &raw.mode {
        g.mode = match m.get_ref().as_str() {
            "warn" => crate::LockGuardMode::Warn,
            "yield" => crate::LockGuardMode::Yield,
            "off" => crate::LockGuardMode::Off,
            other => {
                c.error(
                    m.span(),
                    format!(
                        "lock_guard.mode {other:?} is not one of \"warn\" (log and count sessions the dump blocks), \"yield\" (stop the dump so they proceed, retry later) or \"off\""
                    ),
                );
                g.mode
            }
        };
    }
    if let Some(t) = &raw.max_block
        && let Some(d) = duration(c, "lock_guard.max_block", t)
    {
        if d < Duration::from_secs(1) {
            c.error(t.span(), "lock_guard.max_block must be at least 1s");
        } else {
            g.max_block = d;
        }
    }
    g
}

/// `all = true`, `exclude` and `parallel`: what makes a job a cluster job.
fn validate_cluster(c: &mut Checker<'_>, job: &RawJob) -> Option<crate::ClusterConfig> {
    let db = job.database.get_ref();
    let all = db.all.as_ref().is_some_and(|a| *a.get_ref());
    let exclude: Vec<String> = db
        .exclude
        .iter()
        .flat_map(|l| l.get_ref())
        .map(|p| p.get_ref().clone())
        .collect();
    if !all {
        if let Some(e) = &db.exclude {
            c.error(
                e.span(),
                "database.exclude only applies to a cluster job: add all = true to back up every database of the server, or remove exclude",
            );
        }
        if let Some(p) = &job.parallel {
            c.error(
                p.span(),
                "parallel only applies to a cluster job (database = { url = …, all = true }): it is how many of its databases are dumped at once",
            );
        }
        return None;
    }
    let span = db.all.as_ref().map_or(0..0, |a| a.span());
    for (key, set) in [
        ("include_tables", !job.include_tables.is_empty()),
        ("include_schemas", !job.include_schemas.is_empty()),
    ] {
        if set {
            c.error(
                span.clone(),
                format!(
                    "{key} names objects of one database, but all = true backs up every database of the server: make a job of its own for that database, or use exclude_schemas / exclude_tables (applied to every database)"
                ),
            );
        }
    }
    for p in db.exclude.iter().flat_map(|l| l.get_ref()) {
        if p.get_ref().is_empty() || p.get_ref().chars().all(|ch| ch == '*') {
            c.error(
                p.span(),
                format!(
                    "exclude pattern {:?} matches every database, so the job would back up nothing: name the databases to leave out (e.g. \"scratch_*\"), or remove the job",
                    p.get_ref()
                ),
            );
        }
    }
    let parallel = job
        .parallel
        .as_ref()
        .map(|p| int_in(c, "parallel", Some(p), 1..=64, 1) as usize);
    Some(crate::ClusterConfig { exclude, parallel })
}

pub(crate) fn validate_retention(
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
    let keep_gone_for = match raw.keep_gone_for.as_ref() {
        Some(d) => match duration(c, "keep_gone_for", d) {
            Some(v) if v < Duration::from_secs(86_400) => {
                c.error(
                    d.span(),
                    "keep_gone_for must be at least 1d: it is how long the backups of a database dropped from the server are kept after its last one",
                );
                None
            }
            v => v,
        },
        None => None,
    }
    .unwrap_or(Duration::from_secs(90 * 86_400));
    let schedule = raw.schedule.as_ref().and_then(|s| parse_schedule(c, s));
    (c.diagnostics.len() == before).then_some(crate::RetentionConfig {
        policy,
        orphan_grace,
        keep_gone_for,
        schedule,
    })
}

pub(crate) fn validate_verify(
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
                all: None,
                exclude: None,
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

pub(crate) fn parse_compression(s: &str) -> Option<Compression> {
    match s {
        "none" => Some(Compression::None),
        "zstd" => Some(Compression::Zstd { level: 3 }),
        "zstd:auto" => Some(Compression::ZstdAuto),
        _ => {
            let level: i32 = s.strip_prefix("zstd:")?.parse().ok()?;
            (1..=19)
                .contains(&level)
                .then_some(Compression::Zstd { level })
        }
    }
}
