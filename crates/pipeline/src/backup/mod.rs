//! Making a backup. One run of one database, stage by stage:
//!
//! 1. [`run`]: record the run's start (its own row under the job's lock,
//!    or a fleet's claimed row), open the job's stores and check each.
//! 2. [`attempt`], bounded by the job's timeout and the daemon's shutdown
//!    (and the standby's replay pause, [`replay`]):
//!    [`preflight`] the database, [`dump`] it and its globals through
//!    [`stream`] (compress, encrypt, hash) into every store at once
//!    ([`fan_out`]), under the lock [`guard`]; confirm the sizes; describe
//!    it in its manifest, checked by the size-[`anomaly`] guard; publish
//!    the manifest last, fenced by the claim.
//! 3. [`run`] again: discard what no manifest covers and finish the record.
//!
//! With `streams` above 1 the dump is in [`sections`]: the schema by
//! pg_dump, the table data over several connections ([`streams`]), each
//! dump connection under the job's `max_source_connections` ([`sources`]).
//!
//! A cluster job runs that once per database under one backup id
//! ([`cluster`]). [`error`] says why a run failed.

pub mod adapt;
pub mod anomaly;
mod attempt;
pub mod cluster;
mod dump;
mod error;
mod fan_out;
mod guard;
pub mod live;
mod names;
mod replay;
mod run;
mod sections;
mod sources;
pub mod stream;
pub mod streams;

pub use attempt::{BackupReport, Ready, preflight};
pub use error::{BackupError, Cause, DumpTool, Step};
pub use names::{artifact_file, new_backup_id};
pub use replay::{resume_orphaned_pauses, server_of, server_of_job};
pub(crate) use run::{begin_run, lock_job, unlock_job};
pub use run::{run_backup, run_backup_until, run_member};
pub(crate) use streams::copy_name;
