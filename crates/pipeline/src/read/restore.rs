//! Restoring a backup into a database: the stored artifact streamed through
//! age and zstd into `pg_restore` (or `psql` for plain SQL) without touching
//! disk, or, for a parallel restore, into a private temp file first because
//! `pg_restore -j` needs a seekable archive.
//!
//! Everything that can be checked is checked before the target is touched:
//! option combinations, the identity, whether the target database exists and
//! whether it already holds what the restore would create. SQL errors are
//! failures (`--exit-on-error`, `ON_ERROR_STOP=1`), and a serial restore runs
//! in one transaction, so a failed restore leaves the target as it was.
//!
//! Length: about 170 lines are the table tests of option combinations.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

use backstop_crypto::Identities;
use backstop_dump::{DumpChild, PgTarget, PgTool, admin, find_tool};
use backstop_storage::Storage;
use serde::Serialize;
use tracing::info;

use crate::manifest::{Artifact, Manifest};
use crate::psql_guard::PsqlGuard;
pub use crate::read::consume::{Cause, RestoreError, RestoreStep};
use crate::read::consume::{failed, feed};
use crate::read::download::download;
pub use crate::read::options::RestoreOptions;
use crate::read::options::{selected_tables, split_table, table_args};
use crate::read::readback::{self, Copied, ReadbackError};
use crate::trust::Trusted;

/// The largest globals artifact applied: it is read whole and checked
/// before psql sees any of it (pg_dumpall's roles and tablespaces of even
/// a large cluster are a few MB).
const MAX_GLOBALS_BYTES: u64 = 64 * 1024 * 1024;

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub database: String,
    pub created_database: bool,
    pub globals_applied: bool,
    /// Whether every stored byte was read and matched the manifest. False
    /// when pg_restore needed only the start of the archive (`--table`).
    pub whole_artifact_checked: bool,
    pub stored_bytes_read: u64,
    pub seconds: f64,
}

/// Checks the options against the backup and returns the consumer's arguments
/// (without connection and input). Pure, so every combination is table-tested.
///
/// # Errors
/// [`RestoreError::Usage`] saying what to do instead.
pub fn consumer_args(manifest: &Manifest, o: &RestoreOptions) -> Result<Vec<String>, RestoreError> {
    let usage = |m: &str| Err(RestoreError::Usage(m.to_string()));
    let Some(db) = manifest.artifact("database") else {
        return usage("this backup has no database artifact");
    };
    if o.schema_only && o.data_only {
        return usage("--schema-only and --data-only exclude each other");
    }
    if o.clean && o.data_only {
        return usage(
            "--clean drops and recreates tables, so it cannot be combined with --data-only; empty the tables first (TRUNCATE) and restore with --data-only",
        );
    }
    if o.jobs == Some(0) {
        return usage("--jobs must be at least 1");
    }
    if o.globals && manifest.artifact("globals").is_none() {
        return usage(
            "--globals asked for, but this backup has no globals artifact (set globals = true in the job to back up roles)",
        );
    }
    if db.format == "plain" {
        if !o.tables.is_empty()
            || o.schema_only
            || o.data_only
            || o.clean
            || o.jobs.unwrap_or(1) > 1
        {
            return usage(
                "this backup is a plain SQL dump: it is restored whole with psql, so --table, --schema-only, --data-only, --clean and --jobs do not apply (use format = \"custom\" for selective and parallel restores, or `backstop download --decrypt` and edit the SQL)",
            );
        }
        return Ok(vec![
            "--no-psqlrc".into(),
            "--quiet".into(),
            "--no-password".into(),
            "--set=ON_ERROR_STOP=1".into(),
            "--single-transaction".into(),
        ]);
    }
    if manifest.dump.scope == "schema" && o.data_only {
        return usage("this backup holds the schema only; --data-only would restore nothing");
    }
    if manifest.dump.scope == "data" && o.schema_only {
        return usage("this backup holds data only; --schema-only would restore nothing");
    }
    let mut args = vec!["--exit-on-error".to_string(), "--no-password".to_string()];
    if let Some(jobs) = o.jobs.filter(|&j| j > 1) {
        args.push(format!("--jobs={jobs}"));
    } else {
        args.push("--single-transaction".into());
    }
    if o.clean {
        args.extend(["--clean".into(), "--if-exists".into()]);
    }
    if o.schema_only {
        args.push("--schema-only".into());
    }
    if o.data_only {
        args.push("--data-only".into());
    }
    if o.no_owner {
        args.push("--no-owner".into());
    }
    if o.no_privileges {
        args.push("--no-privileges".into());
    }
    if o.disable_triggers {
        args.push("--disable-triggers".into());
    }
    args.extend(table_args(&selected_tables(&o.tables)?));
    Ok(args)
}

/// Restores `manifest`'s backup from `storage` into `target`.
///
/// # Errors
/// [`RestoreError`]; `Usage` and `Refused` mean nothing was changed.
pub async fn restore(
    storage: Arc<dyn Storage>,
    manifest: &Trusted<Manifest>,
    identities: Option<Arc<Identities>>,
    target: &PgTarget,
    o: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let how = How::of(manifest, o).await?;
    let psql = if o.globals {
        Some(tool("psql", o).await?)
    } else {
        None
    };
    for a in &manifest.artifacts {
        if a.encryption != crate::manifest::ArtifactEncryption::None && identities.is_none() {
            return Err(ReadbackError::NoIdentity(a.key.clone()).into());
        }
    }

    // Look before touching anything.
    let exists = admin::database_exists(target)
        .await
        .map_err(|e| failed(RestoreStep::LookUpDatabase, e))?;
    if !exists && !o.create_db {
        return Err(RestoreError::Refused(format!(
            "database \"{}\" does not exist on {}:{}; pass --create-db to create it (from template0), or name an existing database in --target",
            target.database(),
            target.host(),
            target.port()
        )));
    }
    if exists && !o.clean {
        check_target_is_free(target, manifest, o).await?;
    }

    let mut globals_applied = false;
    if let Some(psql) = &psql {
        let g = manifest
            .artifact("globals")
            .expect("checked by consumer_args");
        // Roles first: the database's objects are owned by them.
        let maintenance = if exists {
            target.clone()
        } else {
            target.with_database("postgres")
        };
        apply_globals(storage.clone(), g, identities.clone(), &maintenance, psql).await?;
        globals_applied = true;
    }
    if !exists {
        admin::create_database_owned(target, o.owner.as_deref())
            .await
            .map_err(|e| failed(RestoreStep::CreateDatabase, e))?;
        info!(database = %target.database(), "Created the target database from template0.");
    }

    let copied = match how {
        How::Streams(plan, pg_restore, psql) => {
            let tools = crate::read::sections::Tools {
                pg_restore: &pg_restore,
                psql: &psql,
            };
            crate::read::sections::restore_sections(
                storage,
                manifest,
                identities,
                target,
                (&plan, tools),
                (!exists, o),
            )
            .await?
        }
        How::One { args, consumer } => {
            let db = manifest
                .artifact("database")
                .expect("checked by consumer_args");
            if o.jobs.unwrap_or(1) > 1 {
                restore_parallel(storage, db, identities, target, &consumer, &args, o).await?
            } else {
                feed(
                    storage,
                    db,
                    identities,
                    Some(target),
                    &consumer,
                    &args,
                    &o.watch,
                )
                .await?
            }
        }
    };
    Ok(RestoreReport {
        backup_id: manifest.backup_id.clone(),
        database: target.database(),
        created_database: !exists,
        globals_applied,
        whole_artifact_checked: copied.0 == Copied::All,
        stored_bytes_read: copied.1,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How a backup is restored: its one archive into one consumer, or its
/// sections and streams.
enum How {
    One { args: Vec<String>, consumer: PgTool },
    Streams(crate::read::sections::Sections, PgTool, PgTool),
}

impl How {
    /// Checks the options against the backup and finds the tools.
    async fn of(manifest: &Manifest, o: &RestoreOptions) -> Result<Self, RestoreError> {
        if manifest.in_streams() {
            let plan = crate::read::sections::sections(manifest, o)?;
            return Ok(How::Streams(
                plan,
                tool("pg_restore", o).await?,
                tool("psql", o).await?,
            ));
        }
        let args = consumer_args(manifest, o)?;
        let db = manifest
            .artifact("database")
            .expect("checked by consumer_args");
        let name = if db.format == "plain" {
            "psql"
        } else {
            "pg_restore"
        };
        Ok(How::One {
            args,
            consumer: tool(name, o).await?,
        })
    }
}

async fn tool(name: &str, o: &RestoreOptions) -> Result<PgTool, RestoreError> {
    find_tool(name, o.pg_dump_path.as_deref(), o.pg_bin_dir.as_deref())
        .await
        .map_err(|e| RestoreError::Usage(e.to_string()))
}

async fn restore_parallel(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    target: &PgTarget,
    tool: &PgTool,
    args: &[String],
    o: &RestoreOptions,
) -> Result<(Copied, u64), RestoreError> {
    let base = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // tempfile creates the directory 0700; the archive inside is 0600. Both
    // go when `dir` is dropped, whatever happens.
    let dir = tempfile::Builder::new()
        .prefix("backstop-restore-")
        .tempdir_in(&base)
        .map_err(|e| {
            failed(
                RestoreStep::TempDir,
                format!("{}: {e} (pass --temp-dir with room for the decompressed dump, or restore without --jobs)", base.display()),
            )
        })?;
    let file = dir.path().join("database.dump");
    info!(path = %file.display(), "Parallel restore: writing the decrypted archive to a private temp file first (pg_restore --jobs needs a seekable file); it is removed afterwards.");
    let read = download(storage, artifact, identities, &file, true, &o.watch).await?;
    let mut args = args.to_vec();
    args.push(file.display().to_string());
    // The same child handling as a streamed restore (password only in the
    // environment, stderr kept and redacted); pg_restore reads the file, so
    // its stdin is closed at once.
    let (child, stdin) = DumpChild::spawn_fed(tool, Some(target), &args)
        .map_err(|e| failed(RestoreStep::Start("pg_restore".into()), e))?;
    drop(stdin);
    child.finish().await.map_err(|e| {
        failed(
            RestoreStep::Consumer("pg_restore".into()),
            format!("{e}; objects restored before the error stay in the target (a parallel restore cannot run in one transaction)"),
        )
    })?;
    drop(dir);
    Ok((Copied::All, read))
}

/// Applies the globals artifact with psql. `CREATE ROLE x;` lines for roles
/// that already exist are skipped (pg_dumpall emits them unconditionally and
/// they would fail the run); everything else must succeed.
///
/// Length: the globals restore in order: read whole, check, filter, guard,
/// feed psql.
pub async fn apply_globals(
    storage: Arc<dyn Storage>,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
    target: &PgTarget,
    psql: &PgTool,
) -> Result<(), RestoreError> {
    let existing = admin::existing_roles(target)
        .await
        .map_err(|e| failed(RestoreStep::ReadRoles, e))?;
    crate::psql_guard::require_restrict(psql).map_err(RestoreError::Usage)?;
    // Roles and tablespaces cannot be applied in one transaction (CREATE
    // TABLESPACE refuses to run in one), so nothing may reach psql before
    // the whole artifact is known to be the one the manifest names: it is
    // read (it is small), checked against the manifest, filtered and
    // guarded first, and only then handed to psql.
    let opened = readback::open(storage.as_ref(), artifact, identities).await?;
    let meters = opened.meters.clone();
    let me = target.user();
    let mut guard = PsqlGuard::for_psql(&psql.version);
    let key = artifact.key.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, bool), ReadbackError> {
        let mut plain = Vec::new();
        opened
            .plain()?
            .take(MAX_GLOBALS_BYTES + 1)
            .read_to_end(&mut plain)
            .map_err(|error| ReadbackError::Read {
                key: key.clone(),
                stored_bytes: 0,
                error,
            })?;
        if plain.len() as u64 > MAX_GLOBALS_BYTES {
            return Err(ReadbackError::Mismatch(format!(
                "{key}: over {MAX_GLOBALS_BYTES} bytes of roles and tablespaces, which pg_dumpall never writes; not applied"
            )));
        }
        // What psql gets: the lines kept, through the guard (which sees
        // exactly what psql will, so the two never disagree about a line).
        let mut kept_own = false;
        let mut input = Vec::with_capacity(plain.len() + 64);
        guard.filter(&[], &mut input).map_err(ReadbackError::Refused)?;
        for line in plain.split_inclusive(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(line);
            if let Some(role) = created_role(&text)
                && existing.contains(&role)
            {
                continue;
            }
            // The role this restore connects as keeps its own password
            // and attributes: the source's would lock the restore (and
            // the operator) out of the server mid-way.
            if altered_role(&text).is_some_and(|r| r == me) {
                kept_own = true;
                continue;
            }
            guard.filter(line, &mut input).map_err(ReadbackError::Refused)?;
        }
        guard.finish(&mut input).map_err(ReadbackError::Refused)?;
        Ok((input, kept_own))
    })
    .await
    .map_err(|_| failed(RestoreStep::ApplyGlobals, "a stream thread panicked"))?;
    let (input, kept_own) = read
        .and_then(|r| meters.check(artifact).map(|()| r))
        .map_err(|e| failed(RestoreStep::ApplyGlobals, e))?;
    if kept_own {
        info!(role = %target.user(), "Kept the connecting role's own password and attributes (the backup's ALTER ROLE for it was not applied).");
    }
    let args = vec![
        "--no-psqlrc".to_string(),
        "--quiet".into(),
        "--no-password".into(),
        "--set=ON_ERROR_STOP=1".into(),
    ];
    let (child, stdin) = DumpChild::spawn_fed(psql, Some(target), &args)
        .map_err(|e| failed(RestoreStep::StartGlobals, e))?;
    let written = tokio::task::spawn_blocking(move || {
        let mut stdin = stdin;
        stdin.write_all(&input).and_then(|()| stdin.flush())
    })
    .await
    .map_err(|_| failed(RestoreStep::ApplyGlobals, "a stream thread panicked"))?;
    let finished = child.finish().await;
    finished.map_err(|e| failed(RestoreStep::ApplyGlobalsPsql, e))?;
    written.map_err(|e| {
        failed(
            RestoreStep::ApplyGlobals,
            ReadbackError::Write {
                consumer: "psql".into(),
                reason: e.to_string(),
            },
        )
    })?;
    info!("Applied roles and tablespaces from the globals artifact.");
    Ok(())
}

/// The role an `ALTER ROLE name …` line of pg_dumpall changes.
fn altered_role(line: &str) -> Option<String> {
    let rest = line.strip_prefix("ALTER ROLE ")?;
    if let Some(q) = rest.strip_prefix('"') {
        // "a""b" WITH …: the name ends at the first lone quote.
        let mut name = String::new();
        let mut chars = q.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        rest.split([' ', ';']).next().map(str::to_string)
    }
}

/// The role a `CREATE ROLE name;` line of pg_dumpall creates.
fn created_role(line: &str) -> Option<String> {
    let rest = line
        .trim_end()
        .strip_prefix("CREATE ROLE ")?
        .strip_suffix(';')?;
    if let Some(q) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(q.replace("\"\"", "\""))
    } else if rest.contains([' ', '"']) {
        None
    } else {
        Some(rest.to_string())
    }
}

/// Refuses a restore that would collide with what the target holds: a whole
/// or schema restore needs an empty database; a `--table` restore needs those
/// tables absent; a data-only restore needs its tables empty.
async fn check_target_is_free(
    target: &PgTarget,
    manifest: &Manifest,
    o: &RestoreOptions,
) -> Result<(), RestoreError> {
    let q = |e| failed(RestoreStep::InspectTarget, e);
    let db = target.database();
    let selected: Vec<(String, String)> = if o.tables.is_empty() {
        manifest
            .inventory
            .per_table
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect()
    } else {
        o.tables.iter().filter_map(|t| split_table(t)).collect()
    };
    let refusal = if o.data_only {
        let full = admin::tables_with_rows(target, &selected)
            .await
            .map_err(q)?;
        (!full.is_empty()).then(|| {
            format!(
                "refusing to restore: {} in database \"{db}\" already hold rows, and a data-only restore would add the backup's rows to them; empty them first (TRUNCATE) or restore into another database",
                list_some(&full)
            )
        })
    } else if !o.tables.is_empty() {
        let present = admin::existing_tables(target, &selected).await.map_err(q)?;
        (!present.is_empty()).then(|| {
            format!(
                "refusing to restore: {} already exist in database \"{db}\"; pass --clean to drop and recreate them, or --data-only to load rows into the existing (empty) tables",
                list_some(&present)
            )
        })
    } else {
        let admin::Occupancy {
            relations,
            functions,
            sample,
        } = admin::occupancy(target).await.map_err(q)?;
        (relations + functions > 0).then(|| {
            format!(
                "refusing to restore: database \"{db}\" is not empty ({relations} tables/views/sequences, {functions} functions; e.g. {}); pass --clean to drop and recreate the backup's objects, or restore into a new database with --create-db",
                if sample.is_empty() { "-".into() } else { sample.join(", ") }
            )
        })
    };
    match refusal {
        Some(r) => Err(RestoreError::Refused(r)),
        None => Ok(()),
    }
}

fn list_some(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_split_like_sql_names() {
        assert_eq!(
            split_table("public.orders"),
            Some(("public".into(), "orders".into()))
        );
        assert_eq!(
            split_table("\"My Schema\".\"Order.Items\""),
            Some(("My Schema".into(), "Order.Items".into()))
        );
        assert_eq!(split_table("orders"), None);
        assert_eq!(split_table(".orders"), None);
    }

    /// A backup in `format` of `scope`, with a globals artifact when
    /// `globals`.
    fn manifest(format: &str, scope: &str, globals: bool) -> Manifest {
        let kinds: &[(&str, usize)] = if globals {
            &[("database", 1), ("globals", 1)]
        } else {
            &[("database", 1)]
        };
        let mut m = crate::testkit::manifest_for("b", chrono::DateTime::UNIX_EPOCH, kinds);
        m.artifacts[0].format = format.into();
        m.dump.format = format.into();
        m.dump.scope = scope.into();
        m.dump.globals = globals;
        m
    }

    #[test]
    fn consumer_arguments_follow_the_options() {
        let custom = manifest("custom", "full", false);
        let o = |f: fn(&mut RestoreOptions)| {
            let mut o = RestoreOptions {
                jobs: Some(1),
                ..Default::default()
            };
            f(&mut o);
            o
        };
        let args = |f: fn(&mut RestoreOptions)| consumer_args(&custom, &o(f)).unwrap().join(" ");
        assert_eq!(
            args(|_| {}),
            "--exit-on-error --no-password --single-transaction"
        );
        assert_eq!(
            args(|o| {
                o.clean = true;
                o.no_owner = true;
                o.no_privileges = true;
            }),
            "--exit-on-error --no-password --single-transaction --clean --if-exists --no-owner --no-privileges"
        );
        assert_eq!(
            args(|o| {
                o.jobs = Some(4);
                o.schema_only = true;
            }),
            "--exit-on-error --no-password --jobs=4 --schema-only"
        );
        assert_eq!(
            args(|o| {
                o.data_only = true;
                o.disable_triggers = true;
                o.tables = vec!["public.orders".into(), "public.\"Order Items\"".into()];
            }),
            "--exit-on-error --no-password --single-transaction --data-only --disable-triggers --schema=public --table=orders --table=Order Items"
        );
        let plain = manifest("plain", "full", false);
        assert_eq!(
            consumer_args(&plain, &o(|_| {})).unwrap().join(" "),
            "--no-psqlrc --quiet --no-password --set=ON_ERROR_STOP=1 --single-transaction"
        );
    }

    #[test]
    fn impossible_combinations_are_refused_with_what_to_do() {
        let custom = manifest("custom", "full", false);
        let plain = manifest("plain", "full", true);
        let schema = manifest("custom", "schema", false);
        type Case<'a> = (&'a Manifest, fn(&mut RestoreOptions), &'a str);
        let cases: Vec<Case> = vec![
            (
                &custom,
                |o| {
                    o.schema_only = true;
                    o.data_only = true;
                },
                "exclude each other",
            ),
            (
                &custom,
                |o| {
                    o.clean = true;
                    o.data_only = true;
                },
                "TRUNCATE",
            ),
            (&custom, |o| o.jobs = Some(0), "at least 1"),
            (&custom, |o| o.globals = true, "no globals artifact"),
            (&custom, |o| o.tables = vec!["orders".into()], "SCHEMA.NAME"),
            (
                &custom,
                |o| o.tables = vec!["a.x".into(), "b.y".into()],
                "one restore per schema",
            ),
            (
                &plain,
                |o| o.tables = vec!["public.orders".into()],
                "plain SQL dump",
            ),
            (&plain, |o| o.jobs = Some(2), "plain SQL dump"),
            (&plain, |o| o.clean = true, "plain SQL dump"),
            (&schema, |o| o.data_only = true, "schema only"),
        ];
        for (m, f, want) in cases {
            let mut o = RestoreOptions {
                jobs: Some(1),
                ..Default::default()
            };
            f(&mut o);
            match consumer_args(m, &o) {
                Err(RestoreError::Usage(msg)) => {
                    assert!(msg.contains(want), "{msg} lacks {want:?}")
                }
                other => panic!("{want}: {other:?}"),
            }
        }
        // Globals with a plain dump are fine.
        let mut o = RestoreOptions {
            jobs: Some(1),
            globals: true,
            ..Default::default()
        };
        assert!(consumer_args(&plain, &o).is_ok());
        o.globals = false;
        assert!(consumer_args(&plain, &o).is_ok());
    }

    #[test]
    fn altered_roles_are_recognised() {
        assert_eq!(
            altered_role("ALTER ROLE postgres WITH SUPERUSER PASSWORD 'x';\n").as_deref(),
            Some("postgres")
        );
        assert_eq!(
            altered_role("ALTER ROLE \"App \"\"Owner\"\"\" WITH LOGIN;\n").as_deref(),
            Some("App \"Owner\"")
        );
        assert_eq!(
            altered_role("ALTER ROLE app SET work_mem TO '64MB';").as_deref(),
            Some("app")
        );
        assert_eq!(altered_role("CREATE ROLE app;"), None);
    }

    #[test]
    fn created_roles_are_recognised() {
        assert_eq!(created_role("CREATE ROLE app;\n"), Some("app".into()));
        assert_eq!(
            created_role("CREATE ROLE \"Ops \"\"x\"\"\";"),
            Some("Ops \"x\"".into())
        );
        assert_eq!(created_role("ALTER ROLE app WITH LOGIN;"), None);
        assert_eq!(created_role("CREATE ROLE app WITH LOGIN;"), None);
    }
}
