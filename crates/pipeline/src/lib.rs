//! What backstop does with a job, end to end. This file is the table of
//! contents; each room says what it holds.
//!
//! - [`backup`]: making a backup. One run goes through named stages: open
//!   the job's stores, pre-flight the database, dump it (and the globals)
//!   through compression and encryption into every store, confirm the
//!   sizes, then write the manifest last ([`backup::run`], [`backup::attempt`]).
//!   A cluster job runs one such backup per database ([`backup::cluster`]).
//! - [`read`]: using a backup. Choosing one ([`read::select`]), reading an
//!   artifact back ([`read::readback`]), restoring, downloading, verifying,
//!   and the restore drill ([`read::recovery`]).
//! - [`store`]: where backups live: opening a store or the catalog a config
//!   names, and reading what a store holds.
//! - [`manifest`], [`verification`]: the two formats backstop writes into a
//!   store; [`trust`] decides which of them a reader believes, [`sign`] signs
//!   older ones.
//! - [`prune`] (retention) and [`rebuild`] (the catalog again from the stores).
//! - [`psql_guard`]: what a plain-SQL restore may feed psql.

pub mod backup;
pub mod cleanup;
pub mod manifest;
pub mod prune;
pub mod psql_guard;
pub mod read;
pub mod rebuild;
pub mod sign;
pub mod store;
pub mod summary;
#[cfg(test)]
pub(crate) mod testkit;
pub mod trust;
pub mod verification;
pub mod watch;

pub use backup::{
    BackupError, BackupReport, Cause, DumpTool, Step, artifact_file, new_backup_id, run_backup,
    run_backup_until, run_member,
};
pub use manifest::Manifest;
pub use store::{CatalogJournal, Store, catalog_location, open_catalog};
pub use trust::{Listing, Trust, Trusted, Untrusted, list_backups};

/// Sizes for people; lives with `parse_size` in the config crate.
pub use backstop_config::human_bytes;

pub use backstop_vocab::{now, one_line};
