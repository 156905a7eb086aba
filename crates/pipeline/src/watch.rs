//! Who watches a read (restore, download, verify) as it goes: the CLI
//! draws progress bars or writes log lines; the daemon passes none (its
//! runs are in the metrics and on the status page). The library only says
//! when a read starts, how far it is, and that it completed.

use std::sync::Arc;

/// Bytes read so far, from whatever counts them.
pub type Counter = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Shows reads to a person.
pub trait Watcher: Send + Sync {
    /// A read of `total` stored bytes starts under `label`; `counter` says
    /// how far it is. The returned reading is finished when the read
    /// completes, and dropped unfinished when it fails.
    fn read(&self, label: String, counter: Counter, total: u64) -> Box<dyn Reading>;
}

/// One read being shown.
pub trait Reading: Send {
    /// The read completed.
    fn finish(self: Box<Self>);
}

/// The watcher of an operation, if any (the default: none).
#[derive(Clone, Default)]
pub struct Watch(Option<Arc<dyn Watcher>>);

impl Watch {
    /// Reads shown by `watcher`.
    pub fn by(watcher: Arc<dyn Watcher>) -> Self {
        Watch(Some(watcher))
    }

    /// Starts showing a read, when someone watches.
    pub fn read(&self, label: String, counter: Counter, total: u64) -> Option<Box<dyn Reading>> {
        self.0.as_ref().map(|w| w.read(label, counter, total))
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Watch(shown)"
        } else {
            "Watch(none)"
        })
    }
}
