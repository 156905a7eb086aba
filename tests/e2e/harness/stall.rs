//! Whether this machine stalled while a test ran: a thread that wakes every
//! 50 ms and keeps the longest time it was kept from waking. A pause of the
//! whole machine (a loaded CI host, a VM paused by its hypervisor) shows as
//! a gap of seconds; the fleet tests read it to tell a node rightly
//! distrusting its lease after such a pause from a defect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(50);

pub struct StallWatch {
    stop: Arc<AtomicBool>,
    longest_ms: Arc<AtomicU64>,
}

impl StallWatch {
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let longest_ms = Arc::new(AtomicU64::new(0));
        let (s, l) = (stop.clone(), longest_ms.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let before = Instant::now();
                std::thread::sleep(TICK);
                let late = before.elapsed().saturating_sub(TICK);
                l.fetch_max(
                    u64::try_from(late.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
            }
        });
        Self { stop, longest_ms }
    }

    /// The longest this watch was kept from waking so far.
    pub fn longest(&self) -> Duration {
        Duration::from_millis(self.longest_ms.load(Ordering::Relaxed))
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
