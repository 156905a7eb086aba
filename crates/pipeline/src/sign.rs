//! `backstop sign`: signing the manifests (and verification records) of
//! backups made before this host had a signing key, so an upgrade to
//! signed stores is one command.
//!
//! A signature vouches for a backup, so `sign` vouches only for what this
//! host can tell is its own: a manifest is signed when
//! - it passes every check that holds without a signature (its folder, id,
//!   times, its artifacts' names and the job's encryption),
//! - every artifact it names is re-read from the store and matches its
//!   recorded size and sha256, and
//! - this host's catalog recorded making that backup (a successful backup
//!   run of the series with that id and the same sizes, recorded as it
//!   ran, not imported from a store): a manifest someone planted in the
//!   bucket before signing was set up is consistent with itself, but no
//!   catalog made it. One the catalog does not know (it was lost) is
//!   signed only when asked for by id with `force`, after a person has
//!   looked at it.
//!
//! A verification record of a signed backup is signed when the catalog
//! recorded the same verification (level, store, outcome and finish). A
//! manifest or record that already carries a signature this host cannot
//! verify is never signed over.

use std::sync::Arc;

use backstop_catalog::{Catalog, Outcome, OwnRun, RunKind};
use backstop_config::{Config, JobConfig};
use backstop_storage::{ObjectMeta, Storage};
use serde::Serialize;

use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::read::select::{SelectError, job_stores};
use crate::store::Store;
use crate::trust::{self, MAX_MANIFEST_BYTES, Read, Trust};
use crate::verification::VerificationRecord;

/// What `sign` did with one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Signed {
    /// Re-checked and signed now.
    Signed { key: String },
    /// A trusted key's signature was there already.
    Already { key: String },
    /// Not signed, and why.
    Refused { reason: String },
}

/// One backup's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct SignReport {
    pub store: String,
    pub series: String,
    pub backup_id: String,
    #[serde(flatten)]
    pub outcome: Signed,
    /// Its verification records signed now.
    pub records_signed: usize,
    /// Its records left unsigned (not the catalog's, or not readable).
    pub records_left: usize,
}

/// Which backups `sign` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    All,
    /// One backup; `force` signs it even when this host's catalog has no
    /// record of making it (a person looked at it).
    Id {
        id: String,
        force: bool,
    },
}

/// Signs the unsigned manifests of `job` (every series of a cluster job)
/// in `storage` (or every store of the job) that this host can tell are
/// its own, and their verification records.
///
/// # Errors
/// [`SelectError::Usage`] without a signing key or for a store the job
/// does not use; a store that cannot be opened or listed; the catalog.
pub async fn sign_job(
    config: &Config,
    job: &JobConfig,
    storage: Option<&str>,
    which: &Which,
) -> Result<Vec<SignReport>, SelectError> {
    let Some(key) = config.daemon.signing_key.clone() else {
        return Err(SelectError::Usage(format!(
            "backstop sign needs this host's signing key: set daemon.signing_key_file in {} (make one with `backstop keygen --out FILE`)",
            config.source.display()
        )));
    };
    let catalog = crate::open_catalog(config)
        .await
        .map_err(|e| SelectError::OpenStore(format!("cannot open the catalog: {e}")))?;
    let mut out = Vec::new();
    for store in job_stores(job, storage)? {
        let opened = Store::open(config, &store)
            .await
            .map_err(SelectError::OpenStore)?;
        let backend = opened.shared();
        let list_err = |source| SelectError::List {
            store: store.clone(),
            source,
        };
        for series in opened.series(job).await.map_err(list_err)? {
            let prefix = format!("{}/", series.name);
            let (folders, _) =
                trust::folders(&prefix, backend.list(&prefix).await.map_err(list_err)?);
            for (id, objs) in &folders {
                if let Which::Id { id: only, .. } = which
                    && only != id
                {
                    continue;
                }
                let mkey = format!("{prefix}{id}/{MANIFEST_FILE}");
                if !objs.iter().any(|o| o.key == mkey) {
                    continue;
                }
                let force = matches!(which, Which::Id { force: true, .. });
                let one = One {
                    storage: backend.clone(),
                    store: &store,
                    series: &series,
                    id,
                    objs,
                    trust: opened.trust(),
                    key: &key,
                    catalog: &catalog,
                };
                out.push(one.sign(force).await);
            }
        }
    }
    catalog.close().await;
    Ok(out)
}

/// One backup folder being signed.
struct One<'a> {
    storage: Arc<dyn Storage>,
    store: &'a str,
    series: &'a JobConfig,
    id: &'a str,
    objs: &'a [ObjectMeta],
    trust: &'a Trust,
    key: &'a backstop_crypto::sign::SigningKey,
    catalog: &'a Catalog,
}

impl One<'_> {
    fn report(&self, outcome: Signed, records: (usize, usize)) -> SignReport {
        SignReport {
            store: self.store.to_string(),
            series: self.series.name.clone(),
            backup_id: self.id.to_string(),
            outcome,
            records_signed: records.0,
            records_left: records.1,
        }
    }

    /// Length: `backstop sign` of one job: each series and folder, what it signs
    /// and why it refuses.
    async fn sign(&self, force: bool) -> SignReport {
        let refused = |reason: String| Signed::Refused { reason };
        let mkey = format!("{}/{}/{MANIFEST_FILE}", self.series.name, self.id);
        let (body, sig) = match trust::read_signed(
            self.storage.as_ref(),
            &mkey,
            self.size(&mkey).unwrap_or(0),
            MAX_MANIFEST_BYTES,
            self.size(&trust::signature_key(&mkey)),
        )
        .await
        {
            Ok(Read::Body(b, s)) => (b, s),
            Ok(Read::Gone) => {
                return self.report(refused("it was deleted meanwhile".into()), (0, 0));
            }
            Ok(Read::Refused(why)) => return self.report(refused(why), (0, 0)),
            Err(e) => return self.report(refused(format!("cannot read it: {e}")), (0, 0)),
        };
        let own = match self
            .catalog
            .own_runs_of_backup(&self.series.name, self.id)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return self.report(refused(format!("cannot read the catalog: {e}")), (0, 0));
            }
        };
        if let Some(sig) = &sig {
            // Trusted already, or a signature this host must not paper over.
            return match trust::trust_manifest(self.series, self.id, &mkey, &body, Some(sig), self.trust) {
                Ok(m) => {
                    let records = self.sign_records(&m, &own).await;
                    self.report(
                        Signed::Already {
                            key: m.signed_by().unwrap_or_default().to_string(),
                        },
                        records,
                    )
                }
                Err(why) => self.report(
                    refused(format!(
                        "{why}; a signature is there already, so it is not signed over (if you know this backup is genuine, delete {} and run sign again)",
                        trust::signature_key(&mkey)
                    )),
                    (0, 0),
                ),
            };
        }
        // The checks that hold without a signature, then the catalog, then
        // the stored bytes.
        let unchecked = Trust::new(Default::default(), self.trust.now());
        let m = match trust::trust_manifest(self.series, self.id, &mkey, &body, None, &unchecked) {
            Ok(m) => m,
            Err(why) => return self.report(refused(why), (0, 0)),
        };
        if !force && !made_here(&m, &own) {
            return self.report(
                refused(format!(
                    "this host's catalog has no record of making this backup (a successful backup run of {} {} with its sizes), so it may have been planted in the store; if you have checked that it is genuine, sign it alone with `backstop sign --job JOB --backup {} --force`",
                    self.series.name, self.id, self.id
                )),
                (0, 0),
            );
        }
        let check = crate::read::verify::verify_checksums(
            self.storage.as_ref(),
            &m,
            &crate::watch::Watch::default(),
        )
        .await;
        if !check.ok {
            return self.report(
                refused(format!(
                    "its artifacts do not match it: {}",
                    check.problems().join("; ")
                )),
                (0, 0),
            );
        }
        let sig = self.key.sign(&body, &mkey);
        if let Err(e) = self
            .storage
            .put(&trust::signature_key(&mkey), bytes::Bytes::from(sig))
            .await
        {
            return self.report(refused(format!("cannot write its signature: {e}")), (0, 0));
        }
        let records = self.sign_records(&m, &own).await;
        self.report(
            Signed::Signed {
                key: self.key.public().id(),
            },
            records,
        )
    }

    fn has(&self, key: &str) -> bool {
        self.objs.iter().any(|o| o.key == key)
    }

    /// The listed size of `key` in this folder.
    fn size(&self, key: &str) -> Option<u64> {
        self.objs.iter().find(|o| o.key == key).map(|o| o.size)
    }

    /// Signs the backup's unsigned verification records that match a
    /// verification the catalog recorded: (signed, left unsigned).
    async fn sign_records(&self, m: &Manifest, own: &[OwnRun]) -> (usize, usize) {
        let (mut signed, mut left) = (0, 0);
        let prefix = format!("{}/", self.series.name);
        for o in self.objs {
            let Some(rest) = o.key.strip_prefix(&prefix) else {
                continue;
            };
            if crate::verification::record_backup_id(rest) != Some(self.id)
                || self.has(&trust::signature_key(&o.key))
            {
                continue;
            }
            let matched =
                match trust::read_signed(self.storage.as_ref(), &o.key, o.size, 1024 * 1024, None)
                    .await
                {
                    Ok(Read::Body(body, _)) => serde_json::from_slice::<VerificationRecord>(&body)
                        .ok()
                        .filter(|r| {
                            r.backup_id == m.backup_id
                                && r.store.as_deref().is_none_or(|s| s == self.store)
                                && recorded_here(r, self.store, own)
                        })
                        .map(|_| body),
                    _ => None,
                };
            let Some(body) = matched else {
                left += 1;
                continue;
            };
            let sig = self.key.sign(&body, &o.key);
            match self
                .storage
                .put(&trust::signature_key(&o.key), bytes::Bytes::from(sig))
                .await
            {
                Ok(()) => signed += 1,
                Err(_) => left += 1,
            }
        }
        (signed, left)
    }
}

/// Whether `own` (this catalog's live runs of the backup) has the
/// successful backup run that made `m`, with its sizes.
fn made_here(m: &Manifest, own: &[OwnRun]) -> bool {
    own.iter().any(|r| {
        r.kind == RunKind::Backup
            && matches!(r.outcome, Outcome::Success | Outcome::Suspect)
            && r.dump_bytes.is_none_or(|b| b == m.dump_bytes())
            && r.stored_bytes.is_none_or(|b| b == m.stored_bytes())
    })
}

/// Whether `own` has the verification `r` records: same level, store,
/// outcome, and finish within a second.
fn recorded_here(r: &VerificationRecord, store: &str, own: &[OwnRun]) -> bool {
    own.iter().any(|o| {
        o.kind == RunKind::Verify
            && o.level.as_deref() == Some(r.level.as_str())
            && o.store.as_deref() == Some(store)
            && (o.outcome == Outcome::Success) == r.ok
            && (o.finished_at - r.finished_at).num_milliseconds().abs() <= 1000
    })
}
