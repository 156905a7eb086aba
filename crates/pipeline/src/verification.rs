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
use crate::trust::{Trust, Trusted, Untrusted};
use backstop_crypto::sign::SigningKey;

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
    /// The store whose copy was verified: a record says nothing of another
    /// store's copy (absent in records of backstop before signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
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
        store: &str,
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
                version: backstop_vocab::build::version().into(),
            },
            job: m.job.clone(),
            member: m.member.clone(),
            backup_id: m.backup_id.clone(),
            store: Some(store.into()),
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

/// Writes `record` of backup `m` to `storage`, signed with `signer` when
/// the host has a key (the signature lands first).
///
/// # Errors
/// The store's error.
pub async fn write(
    storage: &dyn Storage,
    signer: Option<&SigningKey>,
    m: &Manifest,
    record: &VerificationRecord,
) -> Result<(), StorageError> {
    let body = serde_json::to_vec_pretty(record).expect("a record serializes");
    crate::trust::put_signed(storage, signer, &record_key(m, record), Bytes::from(body))
        .await
        .map(|_| ())
}

/// Whether `key` (relative to `<series>/`) is a verification record:
/// `<backup-id>/verify/<name>.json`.
pub(crate) fn record_backup_id(rest: &str) -> Option<&str> {
    let (id, file) = rest.split_once('/')?;
    let name = file.strip_prefix(VERIFY_DIR)?.strip_prefix('/')?;
    (!name.contains('/') && name.ends_with(".json")).then_some(id)
}

/// The verification records of one series in one store: the trusted ones
/// by backup id, oldest first, and the others with their reasons.
#[derive(Debug, Default)]
pub struct Records {
    pub by_backup: HashMap<String, Vec<Trusted<VerificationRecord>>>,
    pub untrusted: Vec<Untrusted>,
}

/// Every verification record of `series` in `storage`. Records that are
/// not trusted are listed apart with the reason (a warning says which):
/// records only ever add knowledge, so a forged one must add none.
///
/// # Errors
/// The store's listing error, or a read error other than the record
/// vanishing or being refused.
pub async fn read_all(
    storage: &dyn Storage,
    series: &str,
    store: &str,
    trust: &Trust,
) -> Result<Records, StorageError> {
    let prefix = format!("{series}/");
    let listed = storage.list(&prefix).await?;
    let sizes: HashMap<String, u64> = listed.iter().map(|o| (o.key.clone(), o.size)).collect();
    let mut out = Records::default();
    let mut wanted = Vec::new();
    for o in listed {
        let Some(id) = o.key.strip_prefix(&prefix).and_then(record_backup_id) else {
            continue;
        };
        let id = id.to_string();
        let refused = if !backstop_storage::is_valid_key(&o.key) {
            Some("a key the store refuses to read (an empty or dot segment): not written by backstop".to_string())
        } else {
            None
        };
        if let Some(reason) = refused {
            out.untrusted.push(Untrusted {
                reason,
                key: o.key,
                backup_id: Some(id),
            });
            continue;
        }
        let signature = sizes.get(&crate::trust::signature_key(&o.key)).copied();
        wanted.push((o.key, o.size, id, signature));
    }
    let mut bodies = futures::stream::iter(wanted.into_iter().map(
        |(key, size, id, signature)| async move {
            let read =
                crate::trust::read_signed(storage, &key, size, MAX_RECORD_BYTES, signature).await;
            (key, id, read)
        },
    ))
    .buffered(crate::trust::READS_IN_FLIGHT);
    while let Some((key, id, read)) = bodies.next().await {
        let (body, sig) = match read? {
            crate::trust::Read::Gone => continue,
            crate::trust::Read::Refused(reason) => {
                out.untrusted.push(Untrusted {
                    key,
                    backup_id: Some(id),
                    reason,
                });
                continue;
            }
            crate::trust::Read::Body(b, s) => (b, s),
        };
        let checked = trust_record(series, store, &id, &key, &body, sig.as_deref(), trust);
        match checked {
            Ok(r) => out.by_backup.entry(id).or_default().push(r),
            Err(reason) => {
                tracing::warn!(key = %key, reason = %reason, "Ignoring a verification record that is not trusted.");
                out.untrusted.push(Untrusted {
                    key,
                    backup_id: Some(id),
                    reason,
                });
            }
        }
    }
    for records in out.by_backup.values_mut() {
        records.sort_by_key(|r| r.finished_at);
    }
    Ok(out)
}

/// The latest verification of each backup of `series`, from the catalog's
/// results and the store's trusted records together (the newer wins;
/// either may be missing: the store's after an older backstop, the
/// catalog's after it was lost).
///
/// # Errors
/// The store's listing error.
pub async fn latest(
    storage: &dyn Storage,
    series: &str,
    store: &str,
    trust: &Trust,
    catalog: Option<HashMap<String, Verification>>,
) -> Result<HashMap<String, Verification>, StorageError> {
    Ok(merge_latest(
        &read_all(storage, series, store, trust).await?,
        catalog,
    ))
}

/// [`latest`] from records already read.
pub fn merge_latest(
    records: &Records,
    catalog: Option<HashMap<String, Verification>>,
) -> HashMap<String, Verification> {
    let mut out = catalog.unwrap_or_default();
    for (id, records) in &records.by_backup {
        if let Some(r) = records.last() {
            let v = r.verification();
            match out.get(id) {
                Some(c) if c.at >= v.at => {}
                _ => {
                    out.insert(id.clone(), v);
                }
            }
        }
    }
    out
}

/// Why verification record `r`, stored in backup folder `id` of `series`
/// in `store`, must not be trusted, if it must not (the checks that hold
/// without signatures).
fn record_problem(
    r: &VerificationRecord,
    series: &str,
    store: &str,
    id: &str,
    trust: &Trust,
) -> Option<String> {
    let now = trust.now();
    let of = match &r.member {
        Some(m) => format!("{}/{m}", r.job),
        None => r.job.clone(),
    };
    if r.format_version > RECORD_FORMAT_VERSION {
        return Some(format!(
            "record format {} is newer than this backstop understands",
            r.format_version
        ));
    }
    if of != series || r.backup_id != id {
        return Some(format!(
            "it is a record of {of} backup {}, but lies in {series}/{id}",
            r.backup_id
        ));
    }
    match &r.store {
        Some(s) if s != store => {
            return Some(format!(
                "it is a record of store \"{s}\"'s copy, but lies in store \"{store}\" (copied from another store?)"
            ));
        }
        None if trust.requires_signatures() => {
            return Some("it names no store (made before signatures, or forged)".into());
        }
        _ => {}
    }
    if r.finished_at > now + crate::trust::CLOCK_SKEW || r.started_at > r.finished_at {
        return Some(format!(
            "it is dated in the future or ends before it starts (finished {}, this host's clock says {})",
            r.finished_at.to_rfc3339(),
            now.to_rfc3339()
        ));
    }
    if r.level.is_empty() || r.level.len() > 16 || !r.level.bytes().all(|b| b.is_ascii_lowercase())
    {
        return Some("it names no verification level backstop has".into());
    }
    None
}

/// The verification record stored at `key` (backup folder `id` of
/// `series` in `store`), if it can be trusted there.
///
/// # Errors
/// Why not, in a sentence.
pub fn trust_record(
    series: &str,
    store: &str,
    id: &str,
    key: &str,
    body: &[u8],
    sig: Option<&[u8]>,
    trust: &Trust,
) -> Result<Trusted<VerificationRecord>, String> {
    crate::trust::trust_object(key, body, sig, trust, "verification record", |r| {
        record_problem(r, series, store, id, trust)
    })
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
