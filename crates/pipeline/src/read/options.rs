//! What a restore is asked to do ([`RestoreOptions`]) and the tables it
//! selects: shared by the restore of one archive ([`crate::read::restore`])
//! and of a backup in streams ([`crate::read::sections`]).

use std::path::PathBuf;

use crate::read::consume::RestoreError;
use crate::watch::Watch;

/// What to restore and how.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// `schema.table` names; empty for the whole database.
    pub tables: Vec<String>,
    pub schema_only: bool,
    pub data_only: bool,
    /// Drop the backup's objects before recreating them (`--clean --if-exists`).
    pub clean: bool,
    /// Create the target database (from template0) if it does not exist.
    pub create_db: bool,
    pub no_owner: bool,
    pub no_privileges: bool,
    /// Disable triggers (foreign keys included) while loading data; superuser only.
    pub disable_triggers: bool,
    /// Also apply the roles and tablespaces artifact, before the database.
    pub globals: bool,
    /// Connections the restore uses (None: as the backup was made, one
    /// for a one-stream backup, its `streams` for a backup in streams).
    /// Above 1 a one-stream archive is downloaded to a temp file first
    /// (pg_restore --jobs needs one); a backup in streams is fed from the
    /// store, one artifact a connection.
    pub jobs: Option<u32>,
    /// Where that temp file goes (default: the system temp dir).
    pub temp_dir: Option<PathBuf>,
    /// The job's client binaries.
    pub pg_bin_dir: Option<PathBuf>,
    pub pg_dump_path: Option<PathBuf>,
    /// Who watches the restore's reads (the CLI's bars), if anyone.
    pub watch: Watch,
    /// The owner of a database created with `create_db` (a server restore
    /// gives each database its owner back); None: the connecting role.
    pub owner: Option<String>,
}

/// `--table` names as (schema, name), all in one schema (pg_restore's
/// `--schema` and `--table` cannot select across schemas exactly).
///
/// # Errors
/// [`RestoreError::Usage`] for a name without its schema, or names in
/// several schemas.
pub(crate) fn selected_tables(tables: &[String]) -> Result<Vec<(String, String)>, RestoreError> {
    let usage = |m: String| Err(RestoreError::Usage(m));
    let mut out: Vec<(String, String)> = Vec::new();
    for t in tables {
        let Some((s, name)) = split_table(t) else {
            return usage(format!(
                "--table {t:?}: give the table as SCHEMA.NAME, e.g. public.orders"
            ));
        };
        if out.first().is_some_and(|(first, _)| *first != s) {
            return usage(
                "--table names tables in more than one schema; pg_restore cannot select that exactly: run one restore per schema".into(),
            );
        }
        out.push((s, name));
    }
    Ok(out)
}

/// pg_restore's `--schema` and `--table` arguments for [`selected_tables`].
pub(crate) fn table_args(selected: &[(String, String)]) -> Vec<String> {
    let mut args: Vec<String> = selected
        .first()
        .map(|(s, _)| format!("--schema={s}"))
        .into_iter()
        .collect();
    args.extend(selected.iter().map(|(_, name)| format!("--table={name}")));
    args
}

/// `schema.name` (either part may be double-quoted) → (schema, name) as stored.
pub(crate) fn split_table(t: &str) -> Option<(String, String)> {
    let mut quoted = false;
    for (i, ch) in t.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                let unquote = |p: &str| {
                    let p = p.trim();
                    if p.len() >= 2 && p.starts_with('"') && p.ends_with('"') {
                        p[1..p.len() - 1].replace("\"\"", "\"")
                    } else {
                        p.to_string()
                    }
                };
                let (s, n) = (unquote(&t[..i]), unquote(&t[i + 1..]));
                return (!s.is_empty() && !n.is_empty()).then_some((s, n));
            }
            _ => {}
        }
    }
    None
}
