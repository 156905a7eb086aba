//! Verification records in the store: each verification of a backup writes
//! a small immutable JSON object beside its manifest,
//! `<series>/<backup-id>/verify/<finished>-<level>-<random>.json`, never
//! rewriting the manifest. The catalog keeps the same result, but the
//! store's copy is what survives the loss of the catalog: `list`'s
//! VERIFIED column, retention's `min_keep` ("not failed verification") and
//! `catalog rebuild` read it. Prune deletes the records with their backup.

use std::collections::HashMap;

use backstop_catalog::Verification;
use backstop_storage::{Storage, StorageError};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, Tool};

/// The folder of a backup's verification records, inside its folder.
pub const VERIFY_DIR: &str = "verify";
/// Bumped on incompatible changes; readers skip versions they do not know.
pub const RECORD_FORMAT_VERSION: u32 = 1;
/// The largest record read (one is a few hundred bytes; problems are capped).
const MAX_RECORD_BYTES: u64 = 1024 * 1024;

/// One verification of one backup in one store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerificationRecord {
    pub format_version: u32,
    pub tool: Tool,
    pub job: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub backup_id: String,
    /// `checksum`, `decrypt` or `restore`.
    pub level: String,
    pub ok: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// What was wrong (empty when ok).
    #[serde(default)]
    pub problems: Vec<String>,
}

impl VerificationRecord {
    /// The record of a verification of `m` that ran from `started_at` to
    /// `finished_at`.
    pub fn of(
        m: &Manifest,
        level: &str,
        ok: bool,
        started_at: DateTime<Utc>,
        finished_at: DateTime<Utc>,
        problems: Vec<String>,
    ) -> Self {
        VerificationRecord {
            format_version: RECORD_FORMAT_VERSION,
            tool: Tool {
                name: "backstop".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            job: m.job.clone(),
            member: m.member.clone(),
            backup_id: m.backup_id.clone(),
            level: level.into(),
            ok,
            started_at,
            finished_at,
            problems: problems.into_iter().take(50).collect(),
        }
    }

    /// As `list` and retention use it.
    pub fn verification(&self) -> Verification {
        Verification {
            level: self.level.clone(),
            ok: self.ok,
            at: self.finished_at,
        }
    }

    /// How long the verification took.
    pub fn seconds(&self) -> f64 {
        (self.finished_at - self.started_at)
            .num_milliseconds()
            .max(0) as f64
            / 1000.0
    }
}

/// Where `record` is stored: in its backup's folder, named by its finish
/// time (so they sort), level and a random suffix (two stores or two
/// processes never write the same key).
pub fn record_key(m: &Manifest, record: &VerificationRecord) -> String {
    format!(
        "{}{VERIFY_DIR}/{}-{}-{:04x}.json",
        m.folder(),
        record.finished_at.format("%Y%m%dT%H%M%S%.3fZ"),
        record.level,
        rand::random::<u16>()
    )
}

/// Writes `record` of backup `m` to `storage`.
///
/// # Errors
/// The store's error.
pub async fn write(
    storage: &dyn Storage,
    m: &Manifest,
    record: &VerificationRecord,
) -> Result<(), StorageError> {
    let body = serde_json::to_vec_pretty(record).expect("a record serializes");
    storage.put(&record_key(m, record), Bytes::from(body)).await
}

/// Whether `key` (relative to `<series>/`) is a verification record:
/// `<backup-id>/verify/<name>.json`.
fn record_backup_id(rest: &str) -> Option<&str> {
    let (id, file) = rest.split_once('/')?;
    let name = file.strip_prefix(VERIFY_DIR)?.strip_prefix('/')?;
    (!name.contains('/') && name.ends_with(".json")).then_some(id)
}

/// Every verification record of `series` in `storage`, by backup id,
/// oldest first. Records that cannot be read are skipped (a warning says
/// which): they only ever add knowledge.
///
/// # Errors
/// The store's listing error.
pub async fn read_all(
    storage: &dyn Storage,
    series: &str,
) -> Result<HashMap<String, Vec<VerificationRecord>>, StorageError> {
    let prefix = format!("{series}/");
    let mut out: HashMap<String, Vec<VerificationRecord>> = HashMap::new();
    let mut wanted = Vec::new();
    for o in storage.list(&prefix).await? {
        let Some(id) = o.key.strip_prefix(&prefix).and_then(record_backup_id) else {
            continue;
        };
        if o.size > MAX_RECORD_BYTES {
            tracing::warn!(key = %o.key, size = o.size, "Skipping an oversized verification record.");
            continue;
        }
        let id = id.to_string();
        wanted.push((o.key, id));
    }
    let mut bodies = futures::stream::iter(wanted.into_iter().map(|(key, id)| async move {
        let body = storage.get(&key).await;
        (key, id, body)
    }))
    .buffered(crate::MANIFEST_READS_IN_FLIGHT);
    while let Some((key, id, body)) = bodies.next().await {
        match serde_json::from_slice::<VerificationRecord>(&body?) {
            Ok(r) if r.format_version <= RECORD_FORMAT_VERSION && r.backup_id == id => {
                out.entry(id).or_default().push(r);
            }
            Ok(_) => {
                tracing::warn!(key = %key, "Skipping a verification record of another backup or a newer format.");
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "Skipping an unreadable verification record.");
            }
        }
    }
    for records in out.values_mut() {
        records.sort_by_key(|r| r.finished_at);
    }
    Ok(out)
}

/// The latest verification of each backup of `series`, from the catalog's
/// results and the store's records together (the newer wins; either may
/// be missing: the store's after an older backstop, the catalog's after
/// it was lost).
///
/// # Errors
/// The store's listing error.
pub async fn latest(
    storage: &dyn Storage,
    series: &str,
    catalog: Option<HashMap<String, Verification>>,
) -> Result<HashMap<String, Verification>, StorageError> {
    let mut out = catalog.unwrap_or_default();
    for (id, records) in read_all(storage, series).await? {
        if let Some(r) = records.last() {
            let v = r.verification();
            match out.get(&id) {
                Some(c) if c.at >= v.at => {}
                _ => {
                    out.insert(id, v);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_in_a_backups_verify_folder_count() {
        assert_eq!(
            record_backup_id("2026-01-01T00-00-00Z-0001/verify/x-checksum-00aa.json"),
            Some("2026-01-01T00-00-00Z-0001")
        );
        assert_eq!(
            record_backup_id("2026-01-01T00-00-00Z-0001/manifest.json"),
            None
        );
        assert_eq!(
            record_backup_id("2026-01-01T00-00-00Z-0001/verify/deeper/x.json"),
            None
        );
        assert_eq!(
            record_backup_id("db/2026-01-01T00-00-00Z-0001/verify/x.json"),
            None
        );
    }
}
