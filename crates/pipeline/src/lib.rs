//! One run end to end: backup (and later verify, restore, prune), joining the
//! dump, crypto and storage stages and writing the manifest last.

pub mod adapt;
pub mod anomaly;
pub mod backup;
pub mod cleanup;
pub mod cluster;
pub mod consume;
pub mod download;
pub mod live;
pub mod manifest;
pub mod progress;
pub mod prune;
pub mod psql_guard;
pub mod readback;
pub mod rebuild;
pub mod recovery;
pub mod restore;
pub mod select;
pub mod sign;
pub mod stream;
#[cfg(test)]
pub(crate) mod testkit;
pub mod trust;
pub mod verification;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use backstop_catalog::Catalog;
use backstop_catalog::CatalogError;
use backstop_config::{Config, StorageConfig};
use backstop_dump::DumpError;
use backstop_storage::{
    Journal, LocalStorage, S3Options, S3Storage, Storage, StorageError, UploadJournal,
};
use tracing::warn;

pub use backup::{
    BackupReport, artifact_file, new_backup_id, run_backup, run_backup_until, run_member,
};
pub use manifest::Manifest;

/// The step of a backup that failed, as its error names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Opening the job's stores.
    OpenStorage,
    /// Checking that a store is reachable before dumping.
    CheckStore(String),
    Connect,
    /// The checks of a managed database before dumping (pooler, rights).
    Preflight,
    VersionCheck,
    Inventory,
    /// Running a dump tool (`pg_dump` or `pg_dumpall`).
    Dump(DumpTool),
    ReadDumpOutput,
    Compress,
    Encrypt,
    Stream,
    Upload,
    UploadTo(String),
    ConfirmUpload,
    ConfirmUploadTo(String),
    WriteManifestTo(String),
}

/// The two dump tools a backup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpTool {
    PgDump,
    PgDumpall,
}

impl DumpTool {
    pub fn as_str(self) -> &'static str {
        match self {
            DumpTool::PgDump => "pg_dump",
            DumpTool::PgDumpall => "pg_dumpall",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::OpenStorage => f.write_str("storage"),
            Step::CheckStore(s) => write!(f, "check store \"{s}\""),
            Step::Connect => f.write_str("connect"),
            Step::Preflight => f.write_str("pre-flight"),
            Step::VersionCheck => f.write_str("version check"),
            Step::Inventory => f.write_str("inventory"),
            Step::Dump(tool) => f.write_str(tool.as_str()),
            Step::ReadDumpOutput => f.write_str("read dump output"),
            Step::Compress => f.write_str("compress"),
            Step::Encrypt => f.write_str("encrypt"),
            Step::Stream => f.write_str("stream"),
            Step::Upload => f.write_str("upload"),
            Step::UploadTo(s) => write!(f, "upload to store \"{s}\""),
            Step::ConfirmUpload => f.write_str("confirm upload"),
            Step::ConfirmUploadTo(s) => write!(f, "confirm upload to store \"{s}\""),
            Step::WriteManifestTo(s) => write!(f, "write manifest to store \"{s}\""),
        }
    }
}

/// What went wrong in a step: the typed error of the stage underneath, or
/// (for checks the pipeline makes itself) a message.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Dump(#[from] DumpError),
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    #[error("{0}")]
    Message(String),
}

/// Why a run failed. [`BackupError::Step`] names the step; the cause is
/// its `source()` (print with [`one_line`] or `{:#}` for both).
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{step} failed")]
    Step {
        step: Step,
        #[source]
        cause: Cause,
    },
    #[error("backup timed out after {}; pg_dump was stopped and partial uploads removed (raise the job's timeout if the database has grown)", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("catalog")]
    Catalog(#[source] CatalogError),
    #[error("interrupted by shutdown; pg_dump was stopped and partial uploads removed")]
    Interrupted,
    #[error("{0}")]
    Locked(String),
    /// The lock guard stopped the dump so a session it blocked could proceed.
    #[error(
        "yielded to a blocked session: {0}; pg_dump's session was ended so it could proceed, partial uploads removed, and the run is retried later (lock_guard = \"yield\")"
    )]
    Yielded(String),
    /// The standby cancelled the dump's query to replay WAL.
    #[error(
        "pg_dump was cancelled by a recovery conflict on the standby ({0}); the run is retried. To stop it: set standby = \"pause\" (replay waits for the dump), hot_standby_feedback = on on the standby (vacuum on the primary keeps the rows the dump reads), or a longer max_standby_streaming_delay"
    )]
    RecoveryConflict(String),
    /// Nothing moved for the job's `stall_timeout`.
    #[error(
        "stalled: {at} for {}; pg_dump was stopped, {ended}, and partial uploads removed (stall_timeout = \"{}\")",
        humantime::format_duration(*.after),
        humantime::format_duration(*.after)
    )]
    Stalled {
        /// Where it stood still ("pg_dump wrote no output").
        at: String,
        after: Duration,
        /// What became of the dump's database session.
        ended: String,
    },
    /// A fleet node's claim on the run was lost before it published.
    #[error("{0}")]
    LostClaim(String),
    /// Some databases of a cluster job's run failed (the others are complete).
    #[error("cluster run {}: {} of {} failed: {}", .0.backup_id, .0.failures().len(), .0.members.len(), .0.failures().join("; "))]
    SomeDatabases(Box<cluster::ClusterReport>),
    #[error("backup {backup_id} is complete in {} but failed in {}", stored_in.join(", "), failed.iter().map(|(s, e)| format!("store \"{s}\" ({e})")).collect::<Vec<_>>().join("; "))]
    SomeStores {
        backup_id: String,
        stored_in: Vec<String>,
        /// Each failed store and its error on one line.
        failed: Vec<(String, String)>,
    },
}

impl BackupError {
    pub(crate) fn at(step: Step, cause: impl Into<Cause>) -> Self {
        BackupError::Step {
            step,
            cause: cause.into(),
        }
    }

    pub(crate) fn said(step: Step, message: impl Into<String>) -> Self {
        Self::at(step, Cause::Message(message.into()))
    }

    /// Whether retrying the run may succeed: decided by the cause
    /// (connection trouble, a killed backend, a transient store error,
    /// a timeout), never by the message.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackupError::Step { cause, .. } => match cause {
                Cause::Dump(e) => e.is_retryable(),
                Cause::Store(e) => e.is_retryable(),
                Cause::Stream(_) | Cause::Message(_) => false,
            },
            BackupError::Timeout(_)
            | BackupError::Yielded(_)
            | BackupError::Stalled { .. }
            | BackupError::RecoveryConflict(_) => true,
            BackupError::Catalog(_) => false,
            BackupError::Interrupted => false,
            BackupError::Locked(_) | BackupError::LostClaim(_) => false,
            BackupError::SomeStores { .. } => false,
            BackupError::SomeDatabases(r) => r.retryable(),
        }
    }

    /// The failed step, when the error is one.
    pub fn step(&self) -> Option<&Step> {
        match self {
            BackupError::Step { step, .. } => Some(step),
            _ => None,
        }
    }
}

pub use backstop_vocab::one_line;

/// Opens the catalog `config` names (a SQLite file, or a fleet's
/// PostgreSQL database with its password from the config's secret).
///
/// # Errors
/// As [`Catalog::open`].
pub async fn open_catalog(config: &Config) -> Result<Catalog, CatalogError> {
    Catalog::open(catalog_location(config)).await
}

/// Where the catalog of `config` is.
pub fn catalog_location(config: &Config) -> backstop_catalog::Location<'_> {
    backstop_catalog::Location::new(
        &config.catalog,
        config
            .daemon
            .catalog_password
            .as_ref()
            .map(backstop_config::Secret::expose),
    )
    .with_pool_size(config.daemon.catalog_connections)
}

/// The backend for the store called `name`.
///
/// # Errors
/// A message when no such store is configured.
pub async fn open_storage(
    config: &Config,
    name: &str,
    journal: Option<Journal>,
) -> Result<Arc<dyn Storage>, String> {
    match config.storages.get(name) {
        Some(StorageConfig::Local { path }) => Ok(Arc::new(LocalStorage::new(path.clone()))),
        Some(StorageConfig::S3(s)) => Ok(Arc::new(
            S3Storage::new(S3Options {
                name: name.to_string(),
                bucket: s.bucket.clone(),
                prefix: s.prefix.clone(),
                region: s.region.clone(),
                endpoint: s.endpoint.clone(),
                force_path_style: s.force_path_style,
                storage_class: s.storage_class.clone(),
                sse: s.sse.clone(),
                kms_key_id: s.kms_key_id.clone(),
                credentials: s.credentials.as_ref().map(|c| {
                    (
                        c.access_key_id.clone(),
                        c.secret_access_key.expose().to_string(),
                    )
                }),
                part_size: s.part_size,
                max_in_flight_parts: s.max_in_flight_parts,
            })
            .await
            .with_journal(journal),
        )),
        None => Err(format!(
            "no storage named \"{name}\" in {}",
            config.source.display()
        )),
    }
}

/// The catalog as the stores' upload journal. A journal write that fails is
/// logged: losing it only means a crash could leave an upload for the store's
/// own listing (or lifecycle rule) to find.
pub struct CatalogJournal(pub Catalog);

#[async_trait::async_trait]
impl UploadJournal for CatalogJournal {
    async fn started(&self, store: &str, key: &str, upload_id: &str) {
        if let Err(e) = self.0.record_upload(store, key, upload_id).await {
            warn!(store, key, error = %e, "Could not record a multipart upload in the catalog.");
        }
    }

    async fn ended(&self, store: &str, upload_id: &str) {
        if let Err(e) = self.0.forget_upload(store, upload_id).await {
            warn!(store, error = %e, "Could not clear a multipart upload from the catalog.");
        }
    }
}

pub use trust::{Listing, Trust, Trusted, Untrusted, list_backups};

/// Sizes for people; lives with `parse_size` in the config crate.
pub use backstop_config::human_bytes;

pub use backstop_vocab::now;
