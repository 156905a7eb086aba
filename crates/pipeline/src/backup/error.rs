//! Why a backup failed: the step that failed and its typed cause, or how
//! the run was stopped (timeout, shutdown, a lost claim, a yielded lock).

use std::time::Duration;

use backstop_catalog::CatalogError;
use backstop_dump::DumpError;
use backstop_storage::StorageError;

use super::stream;

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

/// The dump tools a backup runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpTool {
    PgDump,
    PgDumpall,
    /// psql copying a data stream of a backup in streams.
    Psql,
}

impl DumpTool {
    pub fn as_str(self) -> &'static str {
        match self {
            DumpTool::PgDump => "pg_dump",
            DumpTool::PgDumpall => "pg_dumpall",
            DumpTool::Psql => "psql",
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
    /// The dump's snapshot reached the job's `max_snapshot_age`.
    #[error(
        "the dump's snapshot reached max_snapshot_age ({}) and was given up so the primary's vacuum can proceed; pg_dump was stopped and partial uploads removed. Dump faster (streams), from a standby (standby = \"pause\"), or raise max_snapshot_age",
        humantime::format_duration(*.0)
    )]
    SnapshotTooOld(Duration),
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
            // Another attempt would hold the snapshot as long again.
            BackupError::SnapshotTooOld(_) => false,
            BackupError::Interrupted => false,
            BackupError::Locked(_) | BackupError::LostClaim(_) => false,
            BackupError::SomeStores { .. } => false,
        }
    }

    /// The error of a run whose fleet claim is gone before it published.
    pub(crate) fn lost_claim() -> Self {
        BackupError::LostClaim(
            "this node lost its claim on the run (its lease expired while it was paused or cut off from the catalog); nothing was published, its uploads are removed, and another node runs it".into(),
        )
    }

    /// A connection failure, with the reason when it is a host this
    /// machine cannot reach over IPv6 (not retryable then: retrying cannot
    /// help).
    pub(crate) async fn connect_failed(
        target: &backstop_dump::PgTarget,
        e: backstop_dump::DumpError,
    ) -> Self {
        match backstop_dump::preflight::ipv6_only_host(target).await {
            Some(why) => BackupError::said(Step::Connect, format!("{e}; {why}")),
            None => BackupError::at(Step::Connect, e),
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
