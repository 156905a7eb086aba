//! The artifacts being streamed right now, for progress displays: each
//! registers while it streams and is gone when it ends. Read-only for
//! everyone else; a backup does not wait on anything here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backup::stream::{Counters, Flow};

struct Entry {
    id: u64,
    series: String,
    file: String,
    stores: Vec<String>,
    progress: Counters,
}

static LIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// One artifact being written: what it is, where to, how far.
#[derive(Debug, Clone)]
pub struct LiveStream {
    /// The job, or a cluster job's series (`<job>/<segment>`).
    pub series: String,
    pub file: String,
    /// The stores it is written to, in the order of [`Flow::taken`].
    pub stores: Vec<String>,
    pub flow: Flow,
}

/// Keeps an artifact listed until dropped.
pub(crate) struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = LIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|e| e.id != self.0);
    }
}

/// Lists an artifact of `series` written to `stores` while the result lives.
pub(crate) fn register(
    series: &str,
    file: &str,
    stores: Vec<String>,
    progress: &Counters,
) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Entry {
            id,
            series: series.to_string(),
            file: file.to_string(),
            stores,
            progress: progress.clone(),
        });
    Registration(id)
}

/// The artifacts of job `job` (and of its databases) being written now.
pub fn streams_of(job: &str) -> Vec<LiveStream> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|e| backstop_vocab::series::split(&e.series).0 == job)
        .map(|e| LiveStream {
            series: e.series.clone(),
            file: e.file.clone(),
            stores: e.stores.clone(),
            flow: e.progress.flow(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_is_listed_while_it_streams() {
        let p = Counters::new(2);
        let stores = vec!["local".to_string(), "offsite".to_string()];
        let r = register("live-test/Sales%20DB", "database.dump", stores.clone(), &p);
        let other = register(
            "live-test-other",
            "database.dump",
            Vec::new(),
            &Counters::new(0),
        );
        let listed = streams_of("live-test");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].series, "live-test/Sales%20DB");
        assert_eq!(listed[0].stores, stores);
        assert_eq!(listed[0].flow.taken, [0, 0]);
        drop(r);
        assert!(streams_of("live-test").is_empty());
        assert_eq!(streams_of("live-test-other").len(), 1);
        drop(other);
    }
}
