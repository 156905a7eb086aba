//! `backstop sign`: signing the manifests of backups made before this host
//! had a signing key, so an upgrade to signed stores is one command.
//!
//! A manifest is signed only when it passes every check that holds without
//! a signature (its folder, id, times, artifacts' names and the job's
//! encryption) and every artifact it names is re-read from the store and
//! matches its recorded size and sha256: a signature vouches for what is
//! there, so nothing altered since the backup is vouched for. A manifest
//! that already carries a signature this host cannot verify is never
//! signed over.

use std::sync::Arc;

use backstop_config::{Config, JobConfig};
use backstop_storage::Storage;
use serde::Serialize;

use crate::manifest::MANIFEST_FILE;
use crate::select::{SelectError, job_stores};
use crate::trust::{self, MAX_MANIFEST_BYTES, Read, Trust};

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
}

/// Signs the unsigned manifests of `job` (every series of a cluster job)
/// in `storage` (or every store of the job): backup `only`, or all.
///
/// # Errors
/// [`SelectError::Usage`] without a signing key or for a store the job
/// does not use; a store that cannot be opened or listed.
pub async fn sign_job(
    config: &Config,
    job: &JobConfig,
    storage: Option<&str>,
    only: Option<&str>,
) -> Result<Vec<SignReport>, SelectError> {
    let Some(key) = config.daemon.signing_key.clone() else {
        return Err(SelectError::Usage(format!(
            "backstop sign needs this host's signing key: set daemon.signing_key_file in {} (make one with `backstop keygen --out FILE`)",
            config.source.display()
        )));
    };
    let trust = Trust::from_config(config);
    let mut out = Vec::new();
    for store in job_stores(job, storage)? {
        let backend = crate::open_storage(config, &store, None)
            .await
            .map_err(SelectError::OpenStore)?;
        let list_err = |source| SelectError::List {
            store: store.clone(),
            source,
        };
        for series in crate::cluster::series_in_store(job, backend.as_ref())
            .await
            .map_err(list_err)?
        {
            let prefix = format!("{}/", series.name);
            let (folders, _) =
                trust::folders(&prefix, backend.list(&prefix).await.map_err(list_err)?);
            for (id, objs) in &folders {
                if only.is_some_and(|o| o != id) {
                    continue;
                }
                let mkey = format!("{prefix}{id}/{MANIFEST_FILE}");
                if !objs.iter().any(|o| o.key == mkey) {
                    continue;
                }
                let signed = objs.iter().any(|o| o.key == trust::signature_key(&mkey));
                let outcome =
                    sign_one(backend.clone(), &series, id, &mkey, signed, &trust, &key).await;
                out.push(SignReport {
                    store: store.clone(),
                    series: series.name.clone(),
                    backup_id: id.clone(),
                    outcome,
                });
            }
        }
    }
    Ok(out)
}

async fn sign_one(
    storage: Arc<dyn Storage>,
    series: &JobConfig,
    id: &str,
    mkey: &str,
    signed: bool,
    trust: &Trust,
    key: &backstop_crypto::sign::SigningKey,
) -> Signed {
    let refused = |reason: String| Signed::Refused { reason };
    let (body, sig) =
        match trust::read_signed(storage.as_ref(), mkey, MAX_MANIFEST_BYTES, signed).await {
            Ok(Read::Body(b, s)) => (b, s),
            Ok(Read::Gone) => return refused("it was deleted while signing".into()),
            Ok(Read::Refused(why)) => return refused(why),
            Err(e) => return refused(format!("cannot read it: {e}")),
        };
    if let Some(sig) = &sig {
        // Trusted already, or a signature this host must not paper over.
        return match trust::trust_manifest(series, id, mkey, &body, Some(sig), trust) {
            Ok(m) => Signed::Already {
                key: m.signed_by().unwrap_or_default().to_string(),
            },
            Err(why) => refused(format!(
                "{why}; a signature is there already, so it is not signed over (if you know this backup is genuine, delete {} and run sign again)",
                trust::signature_key(mkey)
            )),
        };
    }
    // The checks that hold without a signature, then the stored bytes.
    let unchecked = Trust::new(Default::default(), trust.now());
    let m = match trust::trust_manifest(series, id, mkey, &body, None, &unchecked) {
        Ok(m) => m,
        Err(why) => return refused(why),
    };
    let check = crate::verify::verify_checksums(storage.as_ref(), &m, false).await;
    if !check.ok {
        return refused(format!(
            "its artifacts do not match it: {}",
            check.problems().join("; ")
        ));
    }
    let sig = key.sign(&body, mkey);
    match storage
        .put(&trust::signature_key(mkey), bytes::Bytes::from(sig))
        .await
    {
        Ok(()) => Signed::Signed {
            key: key.public().id(),
        },
        Err(e) => refused(format!("cannot write its signature: {e}")),
    }
}
