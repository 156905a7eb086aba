//! What every read-back operation (verify, restore, download, compare with
//! live) starts with: which backups of a job in which store, and the age
//! identity that opens them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backstop_config::{Config, JobConfig};
use backstop_crypto::{CryptoError, Identities};
use backstop_storage::{Storage, StorageError};

use crate::manifest::{ArtifactEncryption, Manifest};
use crate::store::Store;
use crate::{Trusted, Untrusted};

/// The identity file systemd's `LoadCredential=age-identity:…` provides.
pub const CREDENTIAL_NAME: &str = "age-identity";

/// Which backups an operation reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Latest,
    Id(String),
    /// Every complete backup (verify only).
    All,
    /// The latest backup started at or before this time (a point-in-time
    /// restore).
    AtOrBefore(chrono::DateTime<chrono::Utc>),
}

impl Selection {
    /// `latest`, `all` or a backup id, as the command line spells them.
    pub fn parse(s: &str) -> Self {
        match s {
            "latest" => Selection::Latest,
            "all" => Selection::All,
            id => Selection::Id(id.to_string()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Selection::Latest => "latest".into(),
            Selection::All => "all".into(),
            Selection::Id(id) => id.clone(),
            Selection::AtOrBefore(t) => format!("at or before {}", t.to_rfc3339()),
        }
    }
}

/// Why an operation could not start. [`SelectError::Usage`] is a mistake in
/// what was asked (the CLI exits 2); the rest are failures (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("{0}")]
    Usage(String),
    /// The store holds no backup matching the selection (for `latest`: none
    /// yet). The daemon's scheduled verify skips a job in that state
    /// instead of reporting a failed verification.
    #[error(
        "no backup {which:?} of job \"{job}\" in store \"{store}\" (see `backstop list --job {job} --storage {store}`)"
    )]
    NoBackup {
        which: String,
        job: String,
        store: String,
    },
    /// A point in time before the first backup.
    #[error(
        "no backup of \"{job}\" in store \"{store}\" started at or before {at}: the oldest started at {oldest}; choose a later --at (see `backstop list`)"
    )]
    TooEarly {
        job: String,
        store: String,
        at: chrono::DateTime<chrono::Utc>,
        oldest: chrono::DateTime<chrono::Utc>,
    },
    /// The backup asked for lies in the store but is not trusted.
    #[error(
        "backup {id} of job \"{job}\" in store \"{store}\" is not trusted: {reason}. It is not restored, verified or counted by retention (docs/SECURITY.md){hint}"
    )]
    Untrusted {
        id: String,
        job: String,
        store: String,
        reason: String,
        /// What to do when it may be genuine (a backup from before signing).
        hint: String,
    },
    #[error("{0}")]
    OpenStore(String),
    #[error("cannot list backups in store \"{store}\"")]
    List {
        store: String,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Identity(#[from] CryptoError),
}

/// The stores an operation works on: the one asked for (which the job must
/// use), or all of the job's.
///
/// # Errors
/// [`SelectError::Usage`] when the job does not use `storage`.
pub fn job_stores(job: &JobConfig, storage: Option<&str>) -> Result<Vec<String>, SelectError> {
    match storage {
        Some(s) if job.storage.iter().any(|j| j == s) => Ok(vec![s.to_string()]),
        Some(s) => Err(SelectError::Usage(format!(
            "job \"{}\" does not use storage \"{s}\" (it uses {})",
            job.name,
            job.storage.join(", ")
        ))),
        None => Ok(job.storage.clone()),
    }
}

/// The backups `which` of `job` in `store`, newest first, and the store.
/// Only trusted backups are ever selected; one asked for by id that lies in
/// the store but is not trusted is refused by name
/// ([`SelectError::Untrusted`]). `all` is refused unless `allow_all`.
///
/// # Errors
/// See [`SelectError`].
pub async fn select(
    config: &Config,
    job: &JobConfig,
    store: &str,
    which: &Selection,
    allow_all: bool,
) -> Result<(Arc<dyn Storage>, Vec<Trusted<Manifest>>), SelectError> {
    if *which == Selection::All && !allow_all {
        return Err(SelectError::Usage(
            "--backup all is only for verify; name one backup id or `latest`".into(),
        ));
    }
    let opened = Store::open(config, store)
        .await
        .map_err(SelectError::OpenStore)?;
    let backend = opened.shared();
    let listing = opened
        .backups(job)
        .await
        .map_err(|source| SelectError::List {
            store: store.to_string(),
            source,
        })?;
    warn_untrusted(&job.name, store, &listing.untrusted);
    if let Selection::Id(id) = which
        && listing.get(id).is_none()
        && let Some(u) = listing.why_not(id)
    {
        let unsigned = u.reason.contains("it is not signed");
        return Err(SelectError::Untrusted {
            id: id.clone(),
            job: job.name.clone(),
            store: store.to_string(),
            reason: u.reason.clone(),
            hint: if unsigned {
                format!(
                    ". If it is this host's backup from before signing was set up, `backstop sign --job {} --backup {id}` checks it against the catalog and the stored bytes and signs it",
                    job.name
                )
            } else {
                String::new()
            },
        });
    }
    let manifests = listing.backups;
    let selected: Vec<Trusted<Manifest>> = match which {
        Selection::All => manifests,
        Selection::Latest => manifests.into_iter().take(1).collect(),
        Selection::Id(id) => manifests
            .into_iter()
            .filter(|m| &m.backup_id == id)
            .collect(),
        Selection::AtOrBefore(at) => {
            let oldest = manifests.last().map(|m| m.started_at);
            let chosen: Vec<Trusted<Manifest>> = manifests
                .into_iter()
                .filter(|m| m.started_at <= *at)
                .take(1)
                .collect();
            if chosen.is_empty()
                && let Some(oldest) = oldest
            {
                return Err(SelectError::TooEarly {
                    job: job.name.clone(),
                    store: store.to_string(),
                    at: *at,
                    oldest,
                });
            }
            chosen
        }
    };
    if selected.is_empty() {
        return Err(SelectError::NoBackup {
            which: which.describe(),
            job: job.name.clone(),
            store: store.to_string(),
        });
    }
    Ok((backend, selected))
}

/// Logs what a listing did not trust, one event per series (a log event,
/// not a bare line: `--log-format json` and the daemon's journal must stay
/// one JSON object per line).
pub fn warn_untrusted(series: &str, store: &str, untrusted: &[Untrusted]) {
    if let Some(first) = untrusted.first() {
        tracing::warn!(
            series,
            store,
            count = untrusted.len(),
            key = %first.key,
            reason = %first.reason,
            "Ignoring objects in the store that are not trusted (the first is named; `backstop list` shows every one)."
        );
    }
}

/// Loads the first identity found: the candidates in order, then systemd's
/// credential. None when there is none (encrypted artifacts then fail with
/// a message saying how to give one).
///
/// # Errors
/// When the identity file chosen cannot be read or parsed.
pub fn identities(candidates: &[Option<&Path>]) -> Result<Option<Arc<Identities>>, SelectError> {
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| PathBuf::from(d).join(CREDENTIAL_NAME))
        .filter(|p| p.is_file());
    let path = candidates
        .iter()
        .flatten()
        .map(|p| p.to_path_buf())
        .next()
        .or(credential);
    match path {
        Some(p) => {
            warn_if_exposed(&p);
            Ok(Some(Arc::new(Identities::from_file(&p)?)))
        }
        None => Ok(None),
    }
}

/// Whether any artifact of `m` is encrypted.
pub fn is_encrypted(m: &Manifest) -> bool {
    m.artifacts
        .iter()
        .any(|a| a.encryption != ArtifactEncryption::None)
}

/// Warns when an identity file is readable by others.
pub fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(path = %path.display(), "The age identity file is readable by every user; run chmod 600 on it.");
    }
}
