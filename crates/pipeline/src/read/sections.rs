//! Restoring a backup in streams, fed from the store with no temp file:
//! `pre-data` (pg_restore, one transaction), then the `data` artifacts
//! `jobs` at a time, each into psql in one transaction of its own, beside
//! `data-rest` (sequence values, large objects) into pg_restore; then
//! `post-data`: its indexes and primary, unique and exclusion constraints
//! spread over `jobs` pg_restore connections (each given its share of the
//! archive's list with `-L`), then the rest of it (foreign keys, triggers,
//! privileges, …) on one. Each pg_restore reads the archive from the store
//! again; only the lists of its entries are written to a private temp
//! directory.
//!
//! A failure stops the others; a database this restore created is dropped,
//! and one that existed is named in the error as partly restored.

use std::path::Path;
use std::sync::Arc;

use backstop_crypto::Identities;
use backstop_dump::{PgTarget, PgTool, admin};
use backstop_storage::Storage;
use futures::StreamExt;
use tracing::{info, warn};

use crate::manifest::{Artifact, Manifest};
use crate::read::consume::{How, RestoreError, RestoreStep, failed, feed_how};
use crate::read::options::{RestoreOptions, selected_tables, table_args};
use crate::read::readback::Copied;
use crate::watch::Watch;

/// The most connections a restore in streams opens (`streams`' own limit).
pub const MAX_JOBS: u32 = 64;

/// What a restore of a backup in streams runs, decided from the options
/// before anything is touched. Pure, so every combination is table-tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sections {
    /// pg_restore's arguments for pre-data (None: skipped).
    pub pre: Option<Vec<String>>,
    /// Whether the data artifacts are loaded, and of which tables only
    /// (their COPY names; None: all).
    pub data: Option<Option<Vec<String>>>,
    /// pg_restore's arguments for the rest of the data and for post-data.
    pub rest: Option<Vec<String>>,
    pub post: Option<Vec<String>>,
    /// Connections at once.
    pub jobs: usize,
}

/// Checks the options against a backup in streams.
///
/// # Errors
/// [`RestoreError::Usage`] saying what to do instead.
pub fn sections(manifest: &Manifest, o: &RestoreOptions) -> Result<Sections, RestoreError> {
    let usage = |m: &str| Err(RestoreError::Usage(m.to_string()));
    if o.schema_only && o.data_only {
        return usage("--schema-only and --data-only exclude each other");
    }
    if o.clean && o.data_only {
        return usage(
            "--clean drops and recreates tables, so it cannot be combined with --data-only; empty the tables first (TRUNCATE) and restore with --data-only",
        );
    }
    if o.clean {
        return usage(
            "--clean does not apply to a backup in streams yet (its foreign keys and triggers are in post-data, so dropping the tables in pre-data order fails): restore into a new database (--create-db), or drop the database and restore again",
        );
    }
    if o.disable_triggers {
        return usage(
            "--disable-triggers does not apply to a backup in streams: its data is loaded before post-data creates triggers and foreign keys; for --data-only into tables that have them, disable them by hand (ALTER TABLE … DISABLE TRIGGER ALL) first",
        );
    }
    if o.globals && manifest.artifact("globals").is_none() {
        return usage(
            "--globals asked for, but this backup has no globals artifact (set globals = true in the job to back up roles)",
        );
    }
    let jobs = match o.jobs {
        Some(0) => return usage("--jobs must be at least 1"),
        Some(n) if n > MAX_JOBS => {
            return usage(&format!("--jobs is at most {MAX_JOBS}"));
        }
        Some(n) => n as usize,
        None => manifest.dump.streams.unwrap_or(1).clamp(1, MAX_JOBS) as usize,
    };
    let mut base = vec!["--exit-on-error".to_string(), "--no-password".to_string()];
    if o.no_owner {
        base.push("--no-owner".into());
    }
    if o.no_privileges {
        base.push("--no-privileges".into());
    }
    let mut one_transaction = base.clone();
    one_transaction.push("--single-transaction".into());
    let mut pre = one_transaction.clone();
    let selected = selected_tables(&o.tables)?;
    pre.extend(table_args(&selected));
    let only = (!selected.is_empty()).then(|| {
        selected
            .iter()
            .map(|(s, name)| crate::backup::copy_name(s, name))
            .collect::<Vec<_>>()
    });
    let tables = only.is_some();
    Ok(Sections {
        pre: (!o.data_only).then_some(pre),
        data: (!o.schema_only).then_some(only),
        // A table restore is its definition and its rows, as pg_restore
        // --table makes it: no sequences, large objects or indexes.
        rest: (!o.schema_only && !tables).then_some(one_transaction),
        post: (!o.data_only && !tables).then_some(base),
        jobs,
    })
}

/// The entries of a `pg_restore --list` that may run at once on several
/// connections (indexes, and primary-key, unique and exclusion
/// constraints: each locks one table only, and pg_dump writes a
/// partitioned table's with ONLY), dealt round-robin over `jobs` lists;
/// and the rest, in the archive's order, for one connection after them.
pub fn split_post_data(list: &str, jobs: usize) -> (Vec<String>, String) {
    let jobs = jobs.max(1);
    let mut lists = vec![String::new(); jobs];
    let mut rest = String::new();
    let mut n = 0;
    for line in list.lines() {
        let line = line.trim_end();
        let Some((_, entry)) = line.split_once("; ") else {
            continue;
        };
        if line.starts_with(';') {
            continue;
        }
        // "<tableoid> <oid> <DESC> <schema> <tag> <owner>"
        let desc = entry.splitn(3, ' ').nth(2).unwrap_or("");
        let parallel = (desc.starts_with("INDEX ") && !desc.starts_with("INDEX ATTACH "))
            || desc.starts_with("CONSTRAINT ");
        let to = if parallel {
            n += 1;
            &mut lists[(n - 1) % jobs]
        } else {
            &mut rest
        };
        to.push_str(line);
        to.push('\n');
    }
    lists.retain(|l| !l.is_empty());
    (lists, rest)
}

/// The tools a restore in streams runs.
pub(crate) struct Tools<'a> {
    pub pg_restore: &'a PgTool,
    pub psql: &'a PgTool,
}

/// Restores the backup in streams `manifest` into `target` as `plan`
/// says. `created`: this restore created the database (dropped again if
/// the restore fails). Returns whether every artifact was read whole and
/// the stored bytes read.
pub(crate) async fn restore_sections(
    storage: Arc<dyn Storage>,
    manifest: &Manifest,
    identities: Option<Arc<Identities>>,
    target: &PgTarget,
    (plan, tools): (&Sections, Tools<'_>),
    (created, o): (bool, &RestoreOptions),
) -> Result<(Copied, u64), RestoreError> {
    let feed = Feeder {
        storage,
        identities,
        target,
        watch: &o.watch,
    };
    let result = run(&feed, manifest, plan, &tools, o).await;
    let Err(e) = result else { return result };
    if created {
        match admin::drop_database(target, &target.database()).await {
            Ok(()) => {
                warn!(database = %target.database(), "The restore failed; the database it created was dropped.")
            }
            Err(d) => {
                warn!(database = %target.database(), error = %d, "The restore failed, and the database it created could not be dropped: drop it by hand.")
            }
        }
        return Err(e);
    }
    Err(match e {
        RestoreError::Failed { step, cause } => failed(
            step,
            format!(
                "{}; database \"{}\" is partly restored: drop it before restoring again",
                crate::one_line(&*cause),
                target.database()
            ),
        ),
        other => other,
    })
}

/// Feeds artifacts of one backup into consumers of one target.
struct Feeder<'a> {
    storage: Arc<dyn Storage>,
    identities: Option<Arc<Identities>>,
    target: &'a PgTarget,
    watch: &'a Watch,
}

impl Feeder<'_> {
    async fn feed(
        &self,
        artifact: &Artifact,
        tool: &PgTool,
        args: &[String],
        how: How,
    ) -> Result<(Copied, u64), RestoreError> {
        feed_how(
            self.storage.clone(),
            artifact,
            self.identities.clone(),
            Some(self.target),
            tool,
            args,
            self.watch,
            how,
        )
        .await
    }
}

/// One artifact being fed, as it runs beside others.
type Load<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Copied, u64), RestoreError>> + Send + 'a>,
>;

/// What a step read: whether each artifact was read whole, and the bytes.
#[derive(Default)]
struct Read {
    whole: bool,
    bytes: u64,
}

impl Read {
    fn add(&mut self, (copied, bytes): (Copied, u64)) {
        self.whole &= copied == Copied::All;
        self.bytes += bytes;
    }
}

async fn run(
    feed: &Feeder<'_>,
    manifest: &Manifest,
    plan: &Sections,
    tools: &Tools<'_>,
    o: &RestoreOptions,
) -> Result<(Copied, u64), RestoreError> {
    let mut read = Read {
        whole: true,
        bytes: 0,
    };
    let section = |kind: &str| {
        manifest.artifact(kind).ok_or_else(|| {
            failed(
                RestoreStep::CheckBackup,
                format!("the manifest lists no {kind} artifact"),
            )
        })
    };
    if let Some(args) = &plan.pre {
        info!("Restoring the schema before the data (pre-data).");
        read.add(
            feed.feed(section("pre-data")?, tools.pg_restore, args, How::default())
                .await?,
        );
    }
    if let Some(only) = &plan.data {
        let data: Vec<&Artifact> = manifest
            .artifacts_of("data")
            .filter(|a| match only {
                None => true,
                Some(names) => a
                    .tables
                    .iter()
                    .any(|t| names.contains(&crate::backup::copy_name(&t.schema, &t.name))),
            })
            .collect();
        // A table restore reads only the artifacts that hold the table.
        read.whole &= plan.rest.is_some();
        info!(
            artifacts = data.len(),
            connections = plan.jobs,
            "Loading the data streams."
        );
        let psql_args = psql_args();
        let mut loads: Vec<Load<'_>> = data
            .into_iter()
            .map(|a| -> Load<'_> {
                let how = How {
                    drain: false,
                    only: only.clone(),
                };
                let args = psql_args.clone();
                Box::pin(async move { feed.feed(a, tools.psql, &args, how).await })
            })
            .collect();
        if let (Some(args), Some(rest)) = (&plan.rest, manifest.artifact("data-rest")) {
            loads.push(Box::pin(async move {
                feed.feed(rest, tools.pg_restore, args, How::default())
                    .await
            }));
        }
        let mut running = futures::stream::iter(loads).buffer_unordered(plan.jobs);
        while let Some(done) = running.next().await {
            // An error drops the stream, and with it every load still running.
            read.add(done?);
        }
    }
    if let Some(args) = &plan.post {
        info!(
            connections = plan.jobs,
            "Building indexes and constraints (post-data)."
        );
        let post = section("post-data")?;
        read.add(post_data(feed, post, tools.pg_restore, args, plan.jobs, o).await?);
    }
    Ok((
        if read.whole {
            Copied::All
        } else {
            Copied::ConsumerClosed
        },
        read.bytes,
    ))
}

/// psql's arguments for a data artifact: one transaction, stop at the first error.
fn psql_args() -> Vec<String> {
    [
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--set=ON_ERROR_STOP=1",
        "--single-transaction",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

/// post-data over `jobs` connections: the archive's list, split
/// ([`split_post_data`]), each share restored with `-L`.
async fn post_data(
    feed: &Feeder<'_>,
    artifact: &Artifact,
    pg_restore: &PgTool,
    args: &[String],
    jobs: usize,
    o: &RestoreOptions,
) -> Result<(Copied, u64), RestoreError> {
    let base = o.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // 0700, removed when dropped: only lists of entries, never data.
    let dir = tempfile::Builder::new()
        .prefix("backstop-restore-")
        .tempdir_in(&base)
        .map_err(|e| failed(RestoreStep::TempDir, format!("{}: {e}", base.display())))?;
    let listed = dir.path().join("post-data.list");
    let mut read = Read {
        whole: true,
        bytes: 0,
    };
    read.add(
        feed_how(
            feed.storage.clone(),
            artifact,
            feed.identities.clone(),
            None,
            pg_restore,
            &["--list".to_string(), format!("--file={}", listed.display())],
            &Watch::default(),
            How {
                drain: true,
                only: None,
            },
        )
        .await?,
    );
    // In the archive's encoding: only the entries' ids (ASCII, at the
    // start of each line) are what pg_restore -L reads back.
    let list = std::fs::read(&listed)
        .map_err(|e| failed(RestoreStep::TempDir, format!("{}: {e}", listed.display())))?;
    let list = String::from_utf8_lossy(&list);
    let (lists, rest) = split_post_data(&list, jobs);
    let with_list = |n: &str, entries: &str| -> Result<Vec<String>, RestoreError> {
        let path = dir.path().join(n);
        write_list(&path, entries)?;
        let mut a = args.to_vec();
        a.push(format!("--use-list={}", path.display()));
        Ok(a)
    };
    let mut shares = Vec::new();
    for (i, entries) in lists.iter().enumerate() {
        shares.push(with_list(&format!("indexes-{i}.list"), entries)?);
    }
    let builds: Vec<Load<'_>> = shares
        .into_iter()
        .map(|a| -> Load<'_> {
            Box::pin(async move { feed.feed(artifact, pg_restore, &a, How::default()).await })
        })
        .collect();
    let mut running = futures::stream::iter(builds).buffer_unordered(jobs);
    while let Some(done) = running.next().await {
        read.add(done?);
    }
    drop(running);
    if !rest.is_empty() {
        let a = with_list("rest.list", &rest)?;
        read.add(feed.feed(artifact, pg_restore, &a, How::default()).await?);
    }
    drop(dir);
    // pg_restore -L stops reading once its entries are done: the whole
    // archive was read and checked by the listing.
    Ok((Copied::All, read.bytes))
}

fn write_list(path: &Path, entries: &str) -> Result<(), RestoreError> {
    std::fs::write(path, entries)
        .map_err(|e| failed(RestoreStep::TempDir, format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_post_data_list_splits_indexes_from_the_rest() {
        let list = ";\n; Archive created at …\n;\n3001; 1259 16500 INDEX public big_a_idx app\n3002; 2606 16501 CONSTRAINT public big big_pkey app\n3003; 0 0 INDEX ATTACH public m_1_pkey app\n3004; 2606 16502 FK CONSTRAINT public c c_big_fkey app\n3005; 2620 16503 TRIGGER public big t app\n3006; 1259 16504 INDEX public c_idx app\n3007; 0 0 ACL - TABLE big app\n";
        let (lists, rest) = split_post_data(list, 2);
        assert_eq!(
            lists,
            [
                "3001; 1259 16500 INDEX public big_a_idx app\n3006; 1259 16504 INDEX public c_idx app\n",
                "3002; 2606 16501 CONSTRAINT public big big_pkey app\n"
            ]
        );
        assert_eq!(
            rest,
            "3003; 0 0 INDEX ATTACH public m_1_pkey app\n3004; 2606 16502 FK CONSTRAINT public c c_big_fkey app\n3005; 2620 16503 TRIGGER public big t app\n3007; 0 0 ACL - TABLE big app\n"
        );
        let (one, _) = split_post_data(list, 1);
        assert_eq!(one.len(), 1);
        assert_eq!(
            split_post_data("", 4),
            (Vec::<String>::new(), String::new())
        );
    }
}
