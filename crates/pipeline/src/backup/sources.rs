//! `max_source_connections`: how many dump connections (pg_dump,
//! pg_dumpall, the data streams' psql) this process holds open to one
//! server at once. A cluster job dumps `parallel` databases, each over
//! `streams` connections and one for its schema: without a limit that is
//! `parallel` × (`streams` + 1) connections. Each dump tool takes a permit
//! before it starts and gives it back when it exits; one that finds none
//! free waits. The connection each database's snapshot is held on is not
//! counted (a run waiting for permits must keep its snapshot, and counting
//! it could leave every permit held by a snapshot).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use backstop_config::JobConfig;
use backstop_dump::PgTarget;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A server (host and port) and a limit.
type Source = (String, u16, u32);

/// One pool of permits per server and limit: jobs that name the same
/// server with the same limit share it.
static POOLS: LazyLock<Mutex<HashMap<Source, Arc<Semaphore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A permit for one dump connection to `target` under `job`'s limit
/// (None when the job sets none).
pub(super) async fn permit(job: &JobConfig, target: &PgTarget) -> Option<OwnedSemaphorePermit> {
    let limit = job.max_source_connections?;
    let pool = POOLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry((target.host(), target.port(), limit))
        .or_insert_with(|| Arc::new(Semaphore::new(limit as usize)))
        .clone();
    // The semaphore is never closed.
    pool.acquire_owned().await.ok()
}
