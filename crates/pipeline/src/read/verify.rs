//! Verification of stored backups against their manifests.
//!
//! `checksum` re-reads every stored artifact and compares its size and SHA-256
//! with the manifest. It needs no private key: the backup host can prove its
//! backups are intact without being able to read them. `decrypt` also reads
//! the plaintext back and has pg_restore read the archive's table of contents.
//! `restore` restores into a scratch database and compares what arrived with
//! the manifest's inventory and row counts.

use std::path::PathBuf;
use std::sync::Arc;

use backstop_catalog::{Catalog, CatalogError, Outcome, RunKind, RunResult};
use backstop_config::{Config, JobConfig, VerifyLevel};
use backstop_crypto::Identities;
use backstop_dump::{Inventory, PgTarget, PgTool};
use backstop_storage::Storage;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::manifest::{Artifact, Manifest};
use crate::read::readback;
use crate::read::restore::{self, RestoreOptions};
use crate::read::select::{SelectError, Selection, identities, is_encrypted, job_stores, select};
use crate::trust::Trusted;
use crate::watch::Watch;

/// The outcome for one artifact.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCheck {
    pub kind: String,
    pub key: String,
    pub ok: bool,
    /// What differs, or why it could not be read.
    pub problem: Option<String>,
}

/// The outcome for one backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupCheck {
    pub backup_id: String,
    pub level: String,
    pub ok: bool,
    pub artifacts: Vec<ArtifactCheck>,
    /// Level `restore`: how the restored database differs from the manifest.
    pub differences: Vec<String>,
    /// Level `restore`: the scratch database used (and dropped).
    pub scratch_database: Option<String>,
}

impl BackupCheck {
    /// Every problem found, one line each: an artifact's, then each
    /// difference of the restored database.
    pub fn problems(&self) -> Vec<String> {
        self.artifacts
            .iter()
            .filter_map(|a| a.problem.as_ref().map(|p| format!("{}: {p}", a.key)))
            .chain(self.differences.iter().cloned())
            .collect()
    }
}

/// One `verify` operation: which backups, at what level, where.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    pub which: Selection,
    pub level: VerifyLevel,
    /// One of the job's stores, or every one.
    pub storage: Option<String>,
    /// The age identity (default: `verify.identity_file`, the job's
    /// `identity_file`, then systemd's credential).
    pub identity: Option<PathBuf>,
    /// The server for level `restore`'s scratch database (default: the
    /// job's `verify.target`).
    pub server: Option<PgTarget>,
    /// Who watches the reads (the CLI's bars), if anyone.
    pub watch: Watch,
}

impl VerifyRequest {
    /// The daemon's scheduled verification: the latest backup in every
    /// store, at the job's configured level, with the job's settings.
    pub fn scheduled(level: VerifyLevel) -> Self {
        VerifyRequest {
            which: Selection::Latest,
            level,
            storage: None,
            identity: None,
            server: None,
            watch: Watch::default(),
        }
    }
}

/// Why a verification could not run. Mismatches are results
/// ([`BackupCheck::ok`]), not errors.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Tool(#[from] backstop_dump::DumpError),
    #[error("catalog")]
    Catalog(#[from] CatalogError),
}

impl VerifyError {
    /// A mistake in what was asked (no identity, no target, unknown store).
    pub fn is_usage(&self) -> bool {
        matches!(self, VerifyError::Select(SelectError::Usage(_)))
    }
}

fn usage(message: String) -> VerifyError {
    VerifyError::Select(SelectError::Usage(message))
}

/// Verifies the backups `req` selects of `job` in each store and records
/// every check in the catalog as a `verify` run; `on_check` sees each as it
/// completes. The CLI and the daemon's scheduled verification both run it.
///
/// # Errors
/// A usage problem (no identity, no target), a store that cannot be listed,
/// or the catalog.
pub async fn verify_job(
    config: &Config,
    job: &JobConfig,
    req: &VerifyRequest,
    on_check: &mut (dyn FnMut(&str, &BackupCheck) + Send),
) -> Result<Vec<(String, BackupCheck)>, VerifyError> {
    let catalog = crate::open_catalog(config).await?;
    let result = verify_job_in(&catalog, config, job, req, on_check).await;
    catalog.close().await;
    result
}

/// The server a `restore`-level verification restores into: the request's,
/// else the job's `verify.target`; none for the other levels.
///
/// # Errors
/// Usage, when level `restore` has no server.
fn scratch_server(job: &JobConfig, req: &VerifyRequest) -> Result<Option<PgTarget>, VerifyError> {
    match (req.level, &req.server) {
        (VerifyLevel::Restore, Some(server)) => Ok(Some(server.clone())),
        (VerifyLevel::Restore, None) => match job.verify.as_ref().and_then(|v| v.target.as_ref()) {
            Some(db) => Ok(Some(PgTarget::from_config(db).map_err(usage)?)),
            None => Err(usage(format!(
                "--level restore needs a server for its scratch database: pass --target postgres://user@host:port/postgres or set verify.target in job \"{}\"",
                job.name
            ))),
        },
        _ => Ok(None),
    }
}

/// Finishes a verify run with its check's result.
///
/// # Errors
/// The catalog's.
async fn record_check(
    catalog: &Catalog,
    run: i64,
    finished_at: chrono::DateTime<chrono::Utc>,
    check: &BackupCheck,
) -> Result<(), CatalogError> {
    let error = check.problems().join("; ");
    let outcome = if check.ok {
        Outcome::Success
    } else {
        Outcome::Failed
    };
    let result = RunResult {
        error: (!check.ok).then_some(error.as_str()),
        ..Default::default()
    };
    catalog.finish_run(run, outcome, finished_at, &result).await
}

/// Writes the verification record beside the backup (signed where the
/// host signs); a failure is logged: the catalog has the result.
async fn write_record(
    config: &Config,
    job: &JobConfig,
    storage: &dyn Storage,
    m: &Trusted<Manifest>,
    record: &crate::verification::VerificationRecord,
) {
    if let Err(e) =
        crate::verification::write(storage, config.daemon.signing_key.as_deref(), m, record).await
    {
        tracing::warn!(job = %job.name, store = record.store.as_deref().unwrap_or(""), backup_id = %m.backup_id, error = %e,
            "Could not write the verification record to the store; the catalog has the result, but a catalog rebuild will not.");
    }
}

/// [`verify_job`] recording in `catalog` (the daemon's, whose fleet node
/// then owns the records, so they are reaped with it).
///
/// # Errors
/// As [`verify_job`].
pub async fn verify_job_in(
    catalog: &Catalog,
    config: &Config,
    job: &JobConfig,
    req: &VerifyRequest,
    on_check: &mut (dyn FnMut(&str, &BackupCheck) + Send),
) -> Result<Vec<(String, BackupCheck)>, VerifyError> {
    let stores = job_stores(job, req.storage.as_deref())?;
    let level = req.level;
    let verify_cfg = job.verify.as_ref();
    let server = scratch_server(job, req)?;
    let (ids, pg_restore) = if level.needs_identity() {
        let ids = identities(&[
            req.identity.as_deref(),
            verify_cfg.and_then(|v| v.identity_file.as_deref()),
            job.identity_file.as_deref(),
        ])?;
        let tool = backstop_dump::find_tool(
            "pg_restore",
            job.pg_dump_path.as_deref(),
            job.pg_bin_dir.as_deref(),
        )
        .await?;
        (ids, Some(tool))
    } else {
        (None, None)
    };
    let mut results = Vec::new();
    for store in &stores {
        let (backend, selected) = select(config, job, store, &req.which, true).await?;
        for m in &selected {
            if level.needs_identity() && ids.is_none() && is_encrypted(m) {
                return Err(usage(format!(
                    "--level {} decrypts backup {}: pass --identity FILE (the age identity matching the job's recipients) or set identity_file in job \"{}\"",
                    level.as_str(),
                    m.backup_id,
                    job.name
                )));
            }
            let started_at = crate::now();
            let run = catalog
                .start_run(&job.name, RunKind::Verify, Some(&m.backup_id), started_at)
                .await?;
            catalog.set_verify_scope(run, level.as_str(), store).await?;
            let check = match level {
                VerifyLevel::Checksum => verify_checksums(backend.as_ref(), m, &req.watch).await,
                VerifyLevel::Decrypt => {
                    let tool = pg_restore.as_ref().expect("found above");
                    verify_decrypt(backend.clone(), m, ids.clone(), tool).await
                }
                VerifyLevel::Restore => {
                    let server = server.as_ref().expect("resolved above");
                    let options = RestoreOptions {
                        pg_bin_dir: job.pg_bin_dir.clone(),
                        pg_dump_path: job.pg_dump_path.clone(),
                        watch: req.watch.clone(),
                        ..Default::default()
                    };
                    verify_restore(backend.clone(), m, ids.clone(), server, &options).await
                }
            };
            let finished_at = crate::now();
            record_check(catalog, run, finished_at, &check).await?;
            // The store's own copy of the result, which outlives the catalog.
            let record = crate::verification::VerificationRecord::of(
                m,
                store,
                level.as_str(),
                check.ok,
                started_at,
                finished_at,
                check.problems(),
            );
            write_record(config, job, backend.as_ref(), m, &record).await;
            on_check(store, &check);
            results.push((store.clone(), check));
        }
    }
    Ok(results)
}

/// Re-reads every artifact of `manifest` from `storage` and compares size and
/// sha256 of the stored bytes with the manifest, shown to `watch`.
pub async fn verify_checksums(
    storage: &dyn Storage,
    manifest: &Trusted<Manifest>,
    watch: &Watch,
) -> BackupCheck {
    let mut artifacts = Vec::new();
    for a in &manifest.artifacts {
        let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bar = {
            let counter = read.clone();
            watch.read(
                format!("checking {}", a.file),
                Arc::new(move || counter.load(std::sync::atomic::Ordering::Relaxed)),
                a.stored_bytes,
            )
        };
        let digest = stored_digest(storage, &a.key, &read).await;
        if let (Some(bar), Ok(_)) = (bar, &digest) {
            bar.finish();
        }
        let problem = match digest {
            Err(e) => Some(format!("cannot read: {e}")),
            Ok((bytes, _)) if bytes != a.stored_bytes => Some(format!(
                "size differs: stored {bytes} bytes, manifest says {}",
                a.stored_bytes
            )),
            Ok((_, sum)) if sum != a.stored_sha256 => Some(format!(
                "sha256 differs: stored {sum}, manifest says {}",
                a.stored_sha256
            )),
            Ok(_) => None,
        };
        artifacts.push(ArtifactCheck {
            kind: a.kind.clone(),
            key: a.key.clone(),
            ok: problem.is_none(),
            problem,
        });
    }
    BackupCheck {
        backup_id: manifest.backup_id.clone(),
        level: "checksum".into(),
        ok: artifacts.iter().all(|a| a.ok),
        artifacts,
        differences: Vec::new(),
        scratch_database: None,
    }
}

async fn stored_digest(
    storage: &dyn Storage,
    key: &str,
    read: &std::sync::atomic::AtomicU64,
) -> Result<(u64, String), String> {
    let mut reader = storage.open(key).await.map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| crate::one_line(&e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        read.store(total, std::sync::atomic::Ordering::Relaxed);
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Decrypts and decompresses every artifact, compares plain and stored size
/// and sha256 with the manifest, and has `pg_restore --list` read the table of
/// contents of custom-format archives.
pub async fn verify_decrypt(
    storage: Arc<dyn Storage>,
    manifest: &Trusted<Manifest>,
    identities: Option<Arc<Identities>>,
    pg_restore: &PgTool,
) -> BackupCheck {
    let mut artifacts = Vec::new();
    for a in &manifest.artifacts {
        let result = if a.format == "custom" {
            crate::read::consume::feed_all(
                storage.clone(),
                a,
                identities.clone(),
                pg_restore,
                &["--list".to_string()],
            )
            .await
            .map(|_| ())
            .map_err(|e| crate::one_line(&e))
        } else {
            read_plain(storage.clone(), a, identities.clone()).await
        };
        artifacts.push(ArtifactCheck {
            kind: a.kind.clone(),
            key: a.key.clone(),
            ok: result.is_ok(),
            problem: result.err(),
        });
    }
    BackupCheck {
        backup_id: manifest.backup_id.clone(),
        level: "decrypt".into(),
        ok: artifacts.iter().all(|a| a.ok),
        artifacts,
        differences: Vec::new(),
        scratch_database: None,
    }
}

async fn read_plain(
    storage: Arc<dyn Storage>,
    a: &Artifact,
    identities: Option<Arc<Identities>>,
) -> Result<(), String> {
    let opened = readback::open(storage.as_ref(), a, identities)
        .await
        .map_err(|e| crate::one_line(&e))?;
    let meters = opened.meters.clone();
    tokio::task::spawn_blocking(move || opened.plain()?.drain())
        .await
        .map_err(|_| "the read thread panicked".to_string())?
        .map_err(|e| crate::one_line(&e))?;
    meters.check(a).map_err(|e| crate::one_line(&e))
}

/// Restores the backup into a new scratch database on `server`, compares its
/// inventory and row counts with the manifest, and drops it again whatever
/// happened. The stored bytes are checked against the manifest first: an
/// unattended check (the scheduled verify, the drill) never feeds the
/// server an artifact someone swapped in the store, whose SQL would run
/// before the mismatch showed at its end.
pub async fn verify_restore(
    storage: Arc<dyn Storage>,
    manifest: &Trusted<Manifest>,
    identities: Option<Arc<Identities>>,
    server: &PgTarget,
    options: &RestoreOptions,
) -> BackupCheck {
    let stored = verify_checksums(storage.as_ref(), manifest, &Watch::default()).await;
    if !stored.ok {
        return BackupCheck {
            level: "restore".into(),
            differences: vec![
                "not restored: the stored artifacts do not match the manifest".into(),
            ],
            ..stored
        };
    }
    let now = chrono::Utc::now();
    sweep_scratch(server, now).await;
    let scratch = server.with_database(&scratch_name(&manifest.job, now));
    // Dropped whatever happens, a cancellation (the future dropped
    // mid-restore) included.
    let mut guard = ScratchGuard {
        server: server.clone(),
        name: Some(scratch.database()),
    };
    let o = RestoreOptions {
        create_db: true,
        no_owner: true,
        no_privileges: true,
        jobs: None,
        ..options.clone()
    };
    let mut check = BackupCheck {
        backup_id: manifest.backup_id.clone(),
        level: "restore".into(),
        ok: false,
        artifacts: Vec::new(),
        differences: Vec::new(),
        scratch_database: Some(scratch.database()),
    };
    let restored = restore::restore(storage, manifest, identities, &scratch, &o).await;
    let outcome = match restored {
        Ok(_) => match backstop_dump::live_inventory(&scratch, &manifest.dump.filters()).await {
            Ok(actual) => {
                check.differences = compare_inventory(
                    &manifest.inventory,
                    &actual,
                    manifest.row_counts == "exact",
                    ("manifest", "restored"),
                );
                Ok(())
            }
            Err(e) => Err(format!("reading the restored database failed: {e}")),
        },
        Err(e) => Err(crate::one_line(&e)),
    };
    // Always dropped, on success and failure alike. The name is random and
    // marked as backstop's, so nothing else is ever dropped.
    guard.name = None;
    if let Err(e) = backstop_dump::admin::drop_database(server, &scratch.database()).await {
        check.differences.push(format!(
            "the scratch database \"{}\" could not be dropped ({e}); drop it by hand",
            scratch.database()
        ));
    }
    let db = manifest
        .artifact("database")
        .map(|a| a.key.clone())
        .unwrap_or_default();
    check.artifacts.push(ArtifactCheck {
        kind: "database".into(),
        key: db,
        ok: outcome.is_ok(),
        problem: outcome.err(),
    });
    check.ok = check.artifacts.iter().all(|a| a.ok) && check.differences.is_empty();
    check
}

/// What every scratch database's name begins with.
const SCRATCH_PREFIX: &str = "backstop_verify_";

/// A scratch database older than this that nobody is connected to is a
/// leftover (of a process killed mid-check) and the next restore check on
/// its server drops it.
const SCRATCH_LEFTOVER: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// `backstop_verify_<job>_<YYYYMMDDhhmmss>_<random>`, at most 61 bytes:
/// when it was made is in its name, for [`sweep_scratch`].
fn scratch_name(job: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    let job: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    format!(
        "{SCRATCH_PREFIX}{job}_{}_{:04x}",
        now.format("%Y%m%d%H%M%S"),
        rand::random::<u16>()
    )
}

/// When a scratch database named by [`scratch_name`] was made (`None`
/// for any other name, such as those of earlier versions, which carry no
/// time and are never swept).
fn scratch_created(name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let rest = name.strip_prefix(SCRATCH_PREFIX)?;
    let mut parts = rest.rsplitn(3, '_');
    let random = parts.next()?;
    let stamp = parts.next()?;
    parts.next()?;
    if random.len() != 4 || !random.bytes().all(|b| b.is_ascii_hexdigit()) || stamp.len() != 14 {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// Drops the scratch databases on `server` that a restore check left
/// (killed before it could drop them): older than [`SCRATCH_LEFTOVER`] and
/// with no session connected, so a long check still going is never
/// touched. Best effort: what fails is logged.
async fn sweep_scratch(server: &PgTarget, now: chrono::DateTime<chrono::Utc>) {
    let found = match backstop_dump::admin::databases_named(server, SCRATCH_PREFIX).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "Cannot list leftover scratch databases.");
            return;
        }
    };
    for (name, busy) in found {
        let Some(created) = scratch_created(&name) else {
            continue;
        };
        if busy || now - created < SCRATCH_LEFTOVER {
            continue;
        }
        match backstop_dump::admin::drop_database(server, &name).await {
            Ok(()) => {
                tracing::warn!(database = %name, created = %created.to_rfc3339(), "Dropped a scratch database a restore check left behind (its process was killed before it could).")
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %e, "Cannot drop a leftover scratch database; drop it by hand.")
            }
        }
    }
}

/// Drops its scratch database when dropped before the check disarmed it
/// (`name` taken): the check's future was cancelled mid-restore.
struct ScratchGuard {
    server: PgTarget,
    name: Option<String>,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else {
            return;
        };
        let server = self.server.clone();
        crate::cleanup::spawn(async move {
            match backstop_dump::admin::drop_database(&server, &name).await {
                Ok(()) => {
                    tracing::info!(database = %name, "Dropped the scratch database of a cancelled restore check.")
                }
                Err(e) => {
                    tracing::warn!(database = %name, error = %e, "Cannot drop the scratch database of a cancelled restore check; the next check on this server drops it after a day, or drop it by hand.")
                }
            }
        });
    }
}

/// The differences between an expected inventory (a manifest's) and an actual
/// one, in words: object counts, tables missing or extra, and, when
/// `compare_rows`, every table whose row count differs.
pub fn compare_inventory(
    expected: &Inventory,
    actual: &Inventory,
    compare_rows: bool,
    (exp, act): (&str, &str),
) -> Vec<String> {
    let mut out = Vec::new();
    for (what, e, a) in [
        ("tables", expected.tables, actual.tables),
        ("indexes", expected.indexes, actual.indexes),
        ("functions", expected.functions, actual.functions),
        ("triggers", expected.triggers, actual.triggers),
        ("policies", expected.policies, actual.policies),
        ("extensions", expected.extensions, actual.extensions),
    ] {
        if e != a {
            out.push(format!("{what}: {exp} {e}, {act} {a}"));
        }
    }
    let key = |t: &backstop_dump::TableInfo| format!("{}.{}", t.schema, t.name);
    let actual_tables: std::collections::BTreeMap<String, &backstop_dump::TableInfo> =
        actual.per_table.iter().map(|t| (key(t), t)).collect();
    let expected_tables: std::collections::BTreeMap<String, &backstop_dump::TableInfo> =
        expected.per_table.iter().map(|t| (key(t), t)).collect();
    for (name, e) in &expected_tables {
        match actual_tables.get(name) {
            None => out.push(format!("table {name}: in {exp}, missing from {act}")),
            Some(a) if compare_rows => {
                if let (Some(er), Some(ar)) = (e.rows, a.rows)
                    && er != ar
                {
                    out.push(format!("table {name} rows: {exp} {er}, {act} {ar}"));
                }
            }
            Some(_) => {}
        }
    }
    for name in actual_tables.keys() {
        if !expected_tables.contains_key(name) {
            out.push(format!("table {name}: in {act}, not in {exp}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop_dump::TableInfo;

    fn inv(tables: &[(&str, u64)]) -> Inventory {
        Inventory {
            tables: tables.len() as u64,
            indexes: 4,
            functions: 2,
            triggers: 1,
            policies: 1,
            extensions: 1,
            per_table: tables
                .iter()
                .map(|(n, r)| TableInfo {
                    schema: "public".into(),
                    name: (*n).into(),
                    rows: Some(*r),
                    bytes: 8192,
                })
                .collect(),
        }
    }

    #[test]
    fn a_scratch_name_carries_when_it_was_made() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-06T23:16:44Z")
            .unwrap()
            .to_utc();
        let name = scratch_name("Shop-EU/orders with a very long name indeed", at);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.starts_with("backstop_verify_shop_eu_orders_with_a_ve_20261206231644_"),
            "{name}"
        );
        assert_eq!(scratch_created(&name), Some(at));
        // Earlier versions' names carry no time: never swept.
        assert_eq!(scratch_created("backstop_verify_shop_3f2a9c01"), None);
        assert_eq!(
            scratch_created("backstop_verify_x_2026120623164_beef"),
            None
        );
        assert_eq!(
            scratch_created("backstop_verify_x_20261206231644_zzzz"),
            None
        );
        assert_eq!(scratch_created("shop_20261206231644_beef"), None);
    }

    #[test]
    fn equal_inventories_have_no_differences() {
        let a = inv(&[("orders", 31), ("users", 8)]);
        assert!(compare_inventory(&a, &a.clone(), true, ("manifest", "restored")).is_empty());
    }

    #[test]
    fn differences_are_named() {
        let expected = inv(&[("orders", 31), ("users", 8), ("audit", 0)]);
        let mut actual = inv(&[("orders", 30), ("users", 8), ("extra", 1)]);
        actual.policies = 0;
        let d = compare_inventory(&expected, &actual, true, ("manifest", "restored"));
        assert_eq!(
            d,
            vec![
                "policies: manifest 1, restored 0",
                "table public.audit: in manifest, missing from restored",
                "table public.orders rows: manifest 31, restored 30",
                "table public.extra: in restored, not in manifest",
            ]
        );
        // Estimated counts are not compared.
        let d = compare_inventory(&expected, &actual, false, ("backup", "live"));
        assert_eq!(d.len(), 3, "{d:?}");
    }
}
