//! Feeding a stored artifact's plaintext into a consumer process
//! (pg_restore or psql) on its stdin: the layer between reading a backup
//! back ([`crate::read::readback`]) and what restore, verify and download do
//! with it. The errors of every read-back operation are defined here.

use std::sync::Arc;

use backstop_crypto::Identities;
use backstop_dump::{DumpChild, PgTarget, PgTool};
use backstop_storage::Storage;
use tracing::info;

use crate::manifest::Artifact;
use crate::read::readback::{self, Copied, ReadbackError};
use crate::watch::Watch;

/// A step of a restore or a read-back, as its errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreStep {
    LookUpDatabase,
    InspectTarget,
    CreateDatabase,
    ReadRoles,
    StartGlobals,
    ApplyGlobals,
    ApplyGlobalsPsql,
    ReadBackup,
    CheckBackup,
    Stream,
    /// Starting the consumer (pg_restore or psql).
    Start(String),
    /// The consumer itself (pg_restore or psql).
    Consumer(String),
    TempDir,
    CreateOutput,
    Download,
    RenameOutput,
}

impl std::fmt::Display for RestoreStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            RestoreStep::LookUpDatabase => "looking up the target database",
            RestoreStep::InspectTarget => "inspecting the target database",
            RestoreStep::CreateDatabase => "creating the target database",
            RestoreStep::ReadRoles => "reading existing roles",
            RestoreStep::StartGlobals => "starting psql for globals",
            RestoreStep::ApplyGlobals => "applying globals",
            RestoreStep::ApplyGlobalsPsql => "applying globals (psql)",
            RestoreStep::ReadBackup => "reading the backup",
            RestoreStep::CheckBackup => "checking the backup",
            RestoreStep::Stream => "restore stream",
            RestoreStep::Start(tool) => return write!(f, "starting {tool}"),
            RestoreStep::Consumer(tool) => tool,
            RestoreStep::TempDir => "creating a temp directory",
            RestoreStep::CreateOutput => "creating the output file",
            RestoreStep::Download => "download",
            RestoreStep::RenameOutput => "renaming the output file",
        };
        f.write_str(s)
    }
}

/// The cause of a failed step: the typed error underneath when there is
/// one (a [`backstop_dump::DumpError`], a [`ReadbackError`]), else a message.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a restore (or a read-back into a consumer) did not happen or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request cannot work as asked; nothing was touched.
    #[error("{0}")]
    Usage(String),
    /// The target is not in a state the restore may change; nothing was touched.
    #[error("{0}")]
    Refused(String),
    #[error("{step} failed")]
    Failed {
        step: RestoreStep,
        #[source]
        cause: Cause,
    },
}

pub(crate) fn failed(step: RestoreStep, cause: impl Into<Cause>) -> RestoreError {
    RestoreError::Failed {
        step,
        cause: cause.into(),
    }
}

impl From<ReadbackError> for RestoreError {
    fn from(e: ReadbackError) -> Self {
        match e {
            ReadbackError::NoIdentity(_) => RestoreError::Usage(e.to_string()),
            other => failed(RestoreStep::ReadBackup, other),
        }
    }
}

/// Streams `artifact`'s plaintext into `tool`'s stdin and waits for it. The
/// consumer is killed before its input is closed whenever the stream failed or
/// did not match the manifest, so it never commits a partial or altered input.
/// Returns how the copy ended and the stored bytes read.
pub async fn feed(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    target: Option<&PgTarget>,
    tool: &PgTool,
    args: &[String],
    watch: &Watch,
) -> Result<(Copied, u64), RestoreError> {
    feed_inner(
        storage,
        artifact,
        identities,
        target,
        tool,
        args,
        watch,
        How::default(),
    )
    .await
}

/// How [`feed_inner`] feeds its consumer.
#[derive(Debug, Clone, Default)]
pub(crate) struct How {
    /// Read and check the whole stream even when the consumer stops early.
    pub drain: bool,
    /// Pass only these tables' COPY blocks (names as a data artifact's
    /// COPY lines write them, see [`crate::read::copy_select::CopySelect`]).
    pub only: Option<Vec<String>>,
}

/// [`feed`] as `how` says.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn feed_how(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    target: Option<&PgTarget>,
    tool: &PgTool,
    args: &[String],
    watch: &Watch,
    how: How,
) -> Result<(Copied, u64), RestoreError> {
    feed_inner(
        storage, artifact, identities, target, tool, args, watch, how,
    )
    .await
}

/// [`feed`], but the rest of the stream is read and checked even when the
/// consumer stops reading early (`pg_restore --list` reads only the TOC).
pub async fn feed_all(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    tool: &PgTool,
    args: &[String],
) -> Result<(Copied, u64), RestoreError> {
    feed_inner(
        storage,
        artifact,
        identities,
        None,
        tool,
        args,
        &Watch::default(),
        How {
            drain: true,
            only: None,
        },
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn feed_inner(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    target: Option<&PgTarget>,
    tool: &PgTool,
    args: &[String],
    watch: &Watch,
    how: How,
) -> Result<(Copied, u64), RestoreError> {
    let How { drain, only } = how;
    let name = tool.name();
    if name == "psql" {
        crate::psql_guard::require_restrict(tool).map_err(RestoreError::Usage)?;
    }
    let opened = readback::open(storage.as_ref(), artifact, identities).await?;
    let meters = opened.meters.clone();
    let (child, stdin) = DumpChild::spawn_fed(tool, target, args)
        .map_err(|e| failed(RestoreStep::Start(name.clone()), e))?;
    let progress = {
        let meter = meters.stored.clone();
        watch.read(
            format!("restoring {}", artifact.file),
            Arc::new(move || meter.bytes()),
            artifact.stored_bytes,
        )
    };
    let consumer = name.clone();
    // psql obeys backslash commands; nothing from a backup may give one.
    let mut guard = (name == "psql").then(|| crate::psql_guard::PsqlGuard::for_psql(&tool.version));
    let joined = tokio::task::spawn_blocking(move || {
        let mut stdin = stdin;
        let mut select = only.map(|names| crate::read::copy_select::CopySelect::new(&names));
        let r = opened.plain().and_then(|mut p| {
            p.copy_to(
                &mut stdin,
                &consumer,
                drain,
                (select.as_mut(), guard.as_mut()),
            )
        });
        (r, stdin)
    })
    .await
    .map_err(|_| failed(RestoreStep::Stream, "a stream thread panicked"))?;
    let (result, stdin) = joined;
    let read = meters.stored.bytes();
    let copied = match result {
        Ok(c) => c,
        Err(e) => {
            drop(child); // killed before it sees the end of its input
            drop(stdin);
            return Err(e.into());
        }
    };
    if (copied == Copied::All || drain)
        && let Err(e) = meters.check(artifact)
    {
        drop(child);
        drop(stdin);
        let detail = if copied == Copied::All {
            format!(
                "{e}; {name} was stopped before the end of its input, so its transaction was not committed"
            )
        } else {
            e.to_string()
        };
        return Err(failed(RestoreStep::CheckBackup, detail));
    }
    drop(stdin);
    child
        .finish()
        .await
        .map_err(|e| failed(RestoreStep::Consumer(name.clone()), e))?;
    if let Some(p) = progress {
        p.finish();
    }
    if copied == Copied::ConsumerClosed && !drain {
        info!(
            read,
            stored = artifact.stored_bytes,
            "{name} needed only the start of the archive; the rest was not read."
        );
    }
    Ok((if drain { Copied::All } else { copied }, read))
}
