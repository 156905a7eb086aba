//! One pause of a standby's WAL replay per server, shared by every backup
//! dumping from it: the server's row (who paused it) and one hold per
//! backup. The pipeline changes them only under an advisory lock it holds
//! on the standby, so "the last hold ends, replay resumes" cannot race a
//! backup that is just starting; this module only keeps the books and
//! judges which holds are alive.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use chrono::{DateTime, Utc};

use crate::{Catalog, CatalogError, Db, parse_ts, ts};

/// Who paused a server's replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausedBy {
    /// backstop did, and resumes it when the last hold ends.
    Backstop,
    /// Replay was already paused when a backup came (an operator, a
    /// failover script): backstop never lifts it.
    SomeoneElse,
}

impl PausedBy {
    fn as_str(self) -> &'static str {
        match self {
            PausedBy::Backstop => "backstop",
            PausedBy::SomeoneElse => "someone else",
        }
    }
}

/// The recorded pause of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayServer {
    /// `host:port` as the jobs' URLs name it.
    pub server: String,
    pub paused_by: PausedBy,
    /// A job that dumps from it: its URL can resume an orphaned pause.
    pub job: String,
    pub paused_at: DateTime<Utc>,
}

/// The holds this process took and has not dropped. A hold of this
/// process that is not here was left by a step that failed to remove it
/// (a catalog blip): it is dead although the process lives.
fn held_here() -> &'static Mutex<HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(|| Mutex::new(HashSet::new()))
}

fn held(id: &str) -> bool {
    held_here()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(id)
}

/// This process, among every process that ever held a pause: a hold's id
/// begins with it. Not the pid alone: a container restarted reuses pid 1.
fn instance() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}.{:x}", std::process::id(), nanos)
    })
}

/// This machine's name, which with a pid names a process.
pub(crate) fn this_host() -> String {
    backstop_vocab::hostname().unwrap_or_else(|| "unknown-host".into())
}

impl Catalog {
    /// Records a backup's hold on `server`'s pause, by this process (and
    /// `node`, the fleet node holding the run); returns the hold's id.
    ///
    /// # Errors
    /// A database error: the hold is not recorded.
    pub async fn add_replay_hold(
        &self,
        server: &str,
        job: &str,
        node: Option<&str>,
    ) -> Result<String, CatalogError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!(
            "{}-{}",
            instance(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let id = id.as_str();
        held_here()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string());
        let host = this_host();
        let r: Result<u64, CatalogError> = async {
            Ok(with_conn!(self, |c| {
                sqlx::query(
                    "INSERT INTO replay_holds (id, server, job, host, pid, node, since)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .persistent(false)
                .bind(id)
                .bind(server)
                .bind(job)
                .bind(&host)
                .bind(i64::from(std::process::id()))
                .bind(node)
                .bind(ts(Utc::now()))
                .execute(&mut *c)
                .await?
                .rows_affected()
            }))
        }
        .await;
        if r.is_err() {
            forget_here(id);
        }
        r.map(|_| id.to_string())
    }

    /// Ends a hold. It is dead from now on even if the row cannot be
    /// removed (the next count removes it).
    ///
    /// # Errors
    /// A database error.
    pub async fn drop_replay_hold(&self, id: &str) -> Result<(), CatalogError> {
        forget_here(id);
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM replay_holds WHERE id = $1")
                .persistent(false)
                .bind(id)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The live holds on `server`'s pause, after removing the dead ones: one
    /// this process ended but could not remove, a fleet node's whose lease
    /// expired, and a process that is gone (a catalog of one host: whatever
    /// the host's name was then, which a recreated container changes; a
    /// shared one: of this host). A process is gone when its pid is, or when
    /// this process has its pid (a restarted container's pid 1). A hold of
    /// another host without a node cannot be judged and counts as alive.
    ///
    /// # Errors
    /// A database error.
    pub async fn live_replay_holds(&self, server: &str) -> Result<Vec<String>, CatalogError> {
        let rows: Vec<(String, String, String, i64, Option<String>)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT id, job, host, pid, node FROM replay_holds WHERE server = $1 ORDER BY since",
            )
            .persistent(false)
            .bind(server)
            .fetch_all(&mut *c)
            .await?
        });
        let expired: HashSet<String> = match &self.db {
            Db::Pg(pool) => {
                let mut tx = crate::pg::begin(pool).await?;
                let gone: Vec<(String,)> = sqlx::query_as(
                    "SELECT h.node FROM replay_holds h
                      WHERE h.server = $1 AND h.node IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = h.node AND n.lease_until > now())",
                )
                .persistent(false)
                .bind(server)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                gone.into_iter().map(|(n,)| n).collect()
            }
            Db::Sqlite(_) => HashSet::new(),
        };
        let (host, me) = (this_host(), i64::from(std::process::id()));
        let mine = format!("{}-", instance());
        let mut live = Vec::new();
        for (id, job, h, pid, node) in rows {
            let dead = if id.starts_with(&mine) {
                !held(&id)
            } else if let (Some(n), true) = (&node, self.is_shared()) {
                expired.contains(n)
            } else if !self.is_shared() || h == host {
                pid == me || !crate::locks::pid_alive(pid)
            } else {
                false
            };
            if dead {
                self.drop_replay_hold(&id).await?;
            } else {
                live.push(job);
            }
        }
        Ok(live)
    }

    /// The recorded pause of `server`, if any.
    ///
    /// # Errors
    /// A database error.
    pub async fn replay_server(&self, server: &str) -> Result<Option<ReplayServer>, CatalogError> {
        Ok(self
            .replay_servers()
            .await?
            .into_iter()
            .find(|s| s.server == server))
    }

    /// Every recorded pause.
    ///
    /// # Errors
    /// A database error.
    pub async fn replay_servers(&self) -> Result<Vec<ReplayServer>, CatalogError> {
        let rows: Vec<(String, String, String, String)> = with_conn!(self, |c| {
            sqlx::query_as(
                "SELECT server, paused_by, job, paused_at FROM replay_servers ORDER BY server",
            )
            .persistent(false)
            .fetch_all(&mut *c)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(server, by, job, at)| ReplayServer {
                server,
                paused_by: if by == PausedBy::SomeoneElse.as_str() {
                    PausedBy::SomeoneElse
                } else {
                    PausedBy::Backstop
                },
                job,
                paused_at: parse_ts(&at),
            })
            .collect())
    }

    /// Records who paused `server` (before backstop pauses it, so a
    /// process killed a moment after leaves the row a successor resumes).
    ///
    /// # Errors
    /// A database error.
    pub async fn set_replay_server(
        &self,
        server: &str,
        paused_by: PausedBy,
        job: &str,
    ) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query(
                "INSERT INTO replay_servers (server, paused_by, job, paused_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (server) DO UPDATE SET paused_by = excluded.paused_by, job = excluded.job,
                    paused_at = excluded.paused_at",
            )
            .persistent(false)
            .bind(server)
            .bind(paused_by.as_str())
            .bind(job)
            .bind(ts(Utc::now()))
            .execute(&mut *c)
            .await?
            .rows_affected()
        });
        Ok(())
    }

    /// Forgets `server`'s pause (replay resumed, or it was not backstop's).
    ///
    /// # Errors
    /// A database error.
    pub async fn forget_replay_server(&self, server: &str) -> Result<(), CatalogError> {
        with_conn!(self, |c| {
            sqlx::query("DELETE FROM replay_servers WHERE server = $1")
                .persistent(false)
                .bind(server)
                .execute(&mut *c)
                .await?
                .rows_affected()
        });
        Ok(())
    }
}

fn forget_here(id: &str) {
    held_here()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Location;

    async fn catalog(name: &str) -> Catalog {
        let dir =
            std::env::temp_dir().join(format!("backstop-holds-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let url = format!("sqlite://{}/catalog.db", dir.display());
        Catalog::open(Location::new(&url, None)).await.unwrap()
    }

    /// A hold row as some process wrote it.
    async fn hold(c: &Catalog, id: &str, host: &str, pid: i64) {
        let Db::Sqlite(pool) = &c.db else {
            unreachable!()
        };
        sqlx::query(
            "INSERT INTO replay_holds (id, server, job, host, pid, node, since) VALUES (?, 'db:5432', ?, ?, ?, NULL, '2026-01-01T00:00:00Z')",
        )
        .bind(id)
        .bind(id)
        .bind(host)
        .bind(pid)
        .execute(pool)
        .await
        .unwrap();
    }

    /// On a catalog of one host: this process's own hold lives until it
    /// ends it; a hold whose process is gone is dead whatever the host was
    /// called then (a recreated container has a new name), and so is an
    /// earlier process's that had this process's pid (a restarted
    /// container's pid 1). Before, both stayed alive for good and kept
    /// replay paused.
    #[tokio::test]
    async fn holds_of_gone_processes_are_dead_whatever_their_host_was_called() {
        let c = catalog("gone").await;
        let mine = c.add_replay_hold("db:5432", "app", None).await.unwrap();
        let me = i64::from(std::process::id());
        hold(&c, "renamed-container", "a1b2c3d4e5f6", i64::from(u32::MAX)).await;
        hold(&c, "restarted-container", "a1b2c3d4e5f6", me).await;
        hold(&c, "alive-elsewhere", &this_host(), 1).await;
        let mut live = c.live_replay_holds("db:5432").await.unwrap();
        live.sort();
        assert_eq!(live, ["alive-elsewhere", "app"], "{live:?}");
        c.drop_replay_hold(&mine).await.unwrap();
        assert_eq!(
            c.live_replay_holds("db:5432").await.unwrap(),
            ["alive-elsewhere"]
        );
    }

    /// A hold this process ended but could not remove (the catalog blipped)
    /// is dead at the next count, though the process lives.
    #[tokio::test]
    async fn a_hold_this_process_ended_is_dead_though_its_row_stayed() {
        let c = catalog("ended").await;
        let id = c.add_replay_hold("db:5432", "app", None).await.unwrap();
        forget_here(&id);
        assert!(c.live_replay_holds("db:5432").await.unwrap().is_empty());
    }
}
