//! Clean-up that must outlive the operation that needs it: a restore check
//! cancelled mid-restore (a shutdown, a lost lease) has its future dropped,
//! so its scratch database is dropped by a task spawned here, which the
//! daemon and the CLI wait for before they exit ([`finish`]).

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use tokio_util::task::TaskTracker;

static TASKS: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Runs `work` on the current runtime, tracked so [`finish`] waits for it.
/// Outside a runtime it cannot run, and is dropped.
pub(crate) fn spawn<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        TASKS.spawn_on(work, &handle);
    }
}

/// Waits up to `within` for the clean-up spawned so far (and any spawned
/// meanwhile); false when some was still going.
pub async fn finish(within: Duration) -> bool {
    TASKS.close();
    let done = tokio::time::timeout(within, TASKS.wait()).await.is_ok();
    TASKS.reopen();
    done
}
