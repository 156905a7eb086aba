//! `manifest.json`: the record that makes a backup exist.
//!
//! Written last, after every artifact is stored and its size confirmed. Plain,
//! documented JSON (docs/manifest.md) so a backup can be understood and
//! restored without backstop. Never holds credentials.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use backstop_dump::Inventory;

/// The manifest's file name inside a backup's folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Bumped on incompatible changes; readers refuse versions they do not know.
/// Version 2 is a backup in streams (sections and data streams, see
/// docs/manifest.md); a backup of one stream is still written as version 1,
/// so an older backstop restores it.
pub const FORMAT_VERSION: u32 = 2;
/// The version of a backup in one stream (one pg_dump archive).
pub const FORMAT_VERSION_ONE_STREAM: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tool: Tool,
    pub job: String,
    pub backup_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub source: Source,
    pub dump: DumpInfo,
    pub artifacts: Vec<Artifact>,
    /// `exact` (counted in the dump stream), `estimate` (pg_class.reltuples) or `off`.
    pub row_counts: String,
    pub inventory: Inventory,
    /// Set by the size-anomaly guard: why this backup looks too small
    /// compared with the job's recent ones. Absent on normal backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect: Option<String>,
    /// A cluster job's backup: the folder segment under the job, the
    /// database's name percent-encoded (`Sales%20DB`), or `@globals` for
    /// the run's roles and tablespaces. Absent for a single-database job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// A cluster job's database backup: the database's owner, whom a
    /// server restore makes the owner of the recreated database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_owner: Option<String>,
    /// A cluster job's globals backup: the databases its run backs up,
    /// which a server restore of this run restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

/// Where the data came from. Never credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub pg_dump_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpInfo {
    pub format: String,
    pub scope: String,
    pub snapshot: String,
    pub include_schemas: Vec<String>,
    pub exclude_schemas: Vec<String>,
    pub include_tables: Vec<String>,
    pub exclude_tables: Vec<String>,
    pub globals: bool,
    pub no_role_passwords: bool,
    /// Connections the table data was dumped over (absent: one, a single
    /// `database` artifact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its role: `database` (pg_dump's archive of a one-stream backup),
    /// `globals` (pg_dumpall --globals-only); in a backup in streams
    /// `pre-data` and `post-data` (pg_dump's sections), `data` (one
    /// stream's tables as plain-SQL COPY blocks, see `tables`) and
    /// `data-rest` (the rest of pg_dump's data section: sequence values
    /// and large objects).
    pub kind: String,
    /// File name inside the backup folder.
    pub file: String,
    /// Key relative to the store root: `<job>/<backup-id>/<file>`.
    pub key: String,
    /// pg_dump's output format for this artifact: `custom` or `plain` (SQL).
    pub format: String,
    pub plain_bytes: u64,
    pub plain_sha256: String,
    pub stored_bytes: u64,
    pub stored_sha256: String,
    /// `zstd:N`, `zstd:auto` or `none`.
    pub compression: String,
    /// `zstd:auto`: the plain bytes compressed at each level (`{"2": …,
    /// "3": …}`). Absent for a fixed level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_levels: Option<std::collections::BTreeMap<String, u64>>,
    pub encryption: ArtifactEncryption,
    /// A `data` artifact: the tables it holds, in order, with their parts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<ArtifactTable>,
}

/// One table's data in a `data` artifact: the whole table (part 1 of 1) or
/// some of the ctid ranges it was cut into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactTable {
    pub schema: String,
    pub name: String,
    /// Which parts (1-based) of `of` this artifact holds.
    pub parts: Vec<u64>,
    pub of: u64,
    /// Rows of those parts, counted in the stream (row_counts = "exact").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ArtifactEncryption {
    None,
    Age { recipients: Vec<String> },
}

impl DumpInfo {
    /// The table and schema selection the dump was made with, to read a
    /// restored or live database's inventory the same way.
    pub fn filters(&self) -> backstop_config::Filters {
        backstop_config::Filters {
            include_schemas: self.include_schemas.clone(),
            exclude_schemas: self.exclude_schemas.clone(),
            include_tables: self.include_tables.clone(),
            exclude_tables: self.exclude_tables.clone(),
        }
    }
}

impl Manifest {
    /// The series this backup belongs to: the job, or `<job>/<member>` for
    /// a cluster job's database (see [`backstop_vocab::series`]).
    pub fn series(&self) -> String {
        match &self.member {
            Some(m) => format!("{}/{m}", self.job),
            None => self.job.clone(),
        }
    }

    /// The folder holding the backup: `<series>/<backup-id>/`.
    pub fn folder(&self) -> String {
        format!("{}/{}/", self.series(), self.backup_id)
    }

    /// The database a cluster job's backup is of (None for its globals
    /// and for single-database jobs).
    pub fn cluster_database(&self) -> Option<String> {
        self.member
            .as_deref()
            .and_then(backstop_vocab::series::database_of)
    }

    /// The artifact of `kind`, if present.
    pub fn artifact(&self, kind: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }

    /// Total rows over all tables, when row counts were recorded.
    pub fn total_rows(&self) -> Option<u64> {
        self.inventory.per_table.iter().map(|t| t.rows).sum()
    }

    /// Bytes of the database dump before compression (every artifact
    /// but the globals).
    pub fn dump_bytes(&self) -> u64 {
        self.artifacts
            .iter()
            .filter(|a| a.kind != "globals")
            .map(|a| a.plain_bytes)
            .sum()
    }

    /// Whether the backup is in streams: sections and data artifacts
    /// instead of one `database` archive.
    pub fn in_streams(&self) -> bool {
        self.artifact("pre-data").is_some()
    }

    /// The artifacts of `kind`, in the manifest's order.
    pub fn artifacts_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Artifact> + 'a {
        self.artifacts.iter().filter(move |a| a.kind == kind)
    }

    /// Bytes stored for all artifacts.
    pub fn stored_bytes(&self) -> u64 {
        self.artifacts.iter().map(|a| a.stored_bytes).sum()
    }
}
