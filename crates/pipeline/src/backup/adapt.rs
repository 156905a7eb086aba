//! `compression = "zstd:auto"`: the level follows where the stream waits.
//!
//! Each second the first stage reports how long it waited for pg_dump and
//! how long for the stores. Waiting for pg_dump means spare CPU: a higher
//! level makes the backup smaller at no cost in time. Hardly waiting at all
//! means compression is what pg_dump waits for: a lower level. Waiting for
//! the stores means they set the pace: smaller output is faster, so a
//! higher level. A level whose input rate came out clearly below the level
//! under it (the CPU it took slowed the server or pg_dump on a shared host)
//! is backed out of and not tried again for a while, and so is a level
//! above the start whose output is not at least 1 % smaller than the level
//! under it gave (zstd's levels 4 and 5 often are not, on JSON and text).
//!
//! The same windows tell an `"auto"`-threaded stream when to move from its
//! own thread to worker threads ([`compression_is_behind`]).

use std::collections::BTreeMap;
use std::time::Duration;

/// The levels `zstd:auto` moves between, and where it starts.
pub const LEVELS: std::ops::RangeInclusive<i32> = backstop_config::ZSTD_AUTO_LEVELS;
pub const START: i32 = 3;
/// How long a window lasts, and the least it must read to count.
pub const WINDOW: Duration = Duration::from_secs(1);
pub const WINDOW_BYTES: u64 = 4 * 1024 * 1024;

/// Below this share of the window spent waiting for pg_dump, compression
/// is the bottleneck. Not zero: every read of the pipe waits a little for
/// pg_dump to be woken and refill it (8-10 % of a window with a 64 KiB
/// pipe, measured while zstd:9 held pg_dump up).
const BUSY: f64 = 0.15;
/// Above this share waiting for pg_dump, or for the stores, there is slack.
const SLACK: f64 = 0.25;
/// A level is "slower" when its input rate is below this fraction of the
/// rate seen one level lower.
const SLOWER: f64 = 0.90;
/// A level above the start pays when its output is below this fraction of
/// the level under it (1 % smaller).
const PAYS: f64 = 0.99;
/// Windows before a level backed out of may be tried again.
const COOL_DOWN: u32 = 20;

/// Windows in a row compression must hold the source up before an
/// `"auto"` stream moves to worker threads.
pub const BEHIND_WINDOWS: u32 = 2;

/// Whether compression was what the source waited for in `w`: the stream
/// hardly waited for the source, and not for the stores either.
pub fn compression_is_behind(w: &Window) -> bool {
    let secs = w.elapsed.as_secs_f64();
    secs > 0.0
        && w.waiting_for_source.as_secs_f64() / secs < BUSY
        && w.waiting_for_stores.as_secs_f64() / secs < SLACK
}

/// What one window of the stream measured.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub elapsed: Duration,
    /// Blocked reading pg_dump's pipe.
    pub waiting_for_source: Duration,
    /// Blocked handing compressed chunks on (the stores' pace).
    pub waiting_for_stores: Duration,
    /// Read from pg_dump in the window.
    pub bytes: u64,
    /// Compressed bytes the window handed on.
    pub compressed: u64,
}

/// The level controller.
#[derive(Debug)]
pub struct LevelControl {
    level: i32,
    /// Input rate (bytes/s) last measured at each level.
    rate: BTreeMap<i32, f64>,
    /// Compressed / plain bytes last measured at each level.
    ratio: BTreeMap<i32, f64>,
    /// Levels at or above this are not tried until the cool-down ends.
    cap: i32,
    cool_down: u32,
}

impl Default for LevelControl {
    fn default() -> Self {
        Self {
            level: START,
            rate: BTreeMap::new(),
            ratio: BTreeMap::new(),
            cap: *LEVELS.end() + 1,
            cool_down: 0,
        }
    }
}

impl LevelControl {
    pub fn level(&self) -> i32 {
        self.level
    }

    /// The level for the next window, after `w`.
    pub fn after(&mut self, w: &Window) -> i32 {
        let secs = w.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return self.level;
        }
        let source = w.waiting_for_source.as_secs_f64() / secs;
        let stores = w.waiting_for_stores.as_secs_f64() / secs;
        let rate = w.bytes as f64 / secs;
        self.rate.insert(self.level, rate);
        let ratio = w.compressed as f64 / w.bytes.max(1) as f64;
        self.ratio.insert(self.level, ratio);
        // Above the start, a level must make the output smaller than the
        // level under it did, or its CPU buys nothing.
        let pays = self.level <= START
            || self
                .ratio
                .get(&(self.level - 1))
                .is_none_or(|&under| ratio < PAYS * under);
        if self.cool_down > 0 {
            self.cool_down -= 1;
            if self.cool_down == 0 {
                self.cap = *LEVELS.end() + 1;
            }
        }
        let below = self.rate.get(&(self.level - 1)).copied();
        let next = if !pays {
            self.back_off()
        } else if stores > SLACK {
            // The stores set the pace: fewer bytes are faster.
            self.level + 1
        } else if source < BUSY {
            self.back_off()
        } else if below.is_some_and(|b| rate < SLOWER * b) && source < SLACK {
            // This level cost more input rate than the one below gave.
            self.back_off()
        } else if source > SLACK {
            self.level + 1
        } else {
            self.level
        };
        let next = next.clamp(*LEVELS.start(), *LEVELS.end());
        self.level = if next > self.level && next >= self.cap {
            self.level
        } else {
            next
        };
        self.level
    }

    /// One level down, and the level left is not tried again for a while.
    fn back_off(&mut self) -> i32 {
        self.cap = self.level;
        self.cool_down = COOL_DOWN;
        self.level - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One window at `mb` MB/s, waiting `source` and `stores` of it, whose
    /// output is 2 % smaller per level (where higher levels pay); the level
    /// after it.
    fn step(c: &mut LevelControl, source: f64, stores: f64, mb: f64) -> i32 {
        let ratio = 0.12 * 0.98f64.powi(c.level() - START);
        c.after(&window(source, stores, mb, ratio))
    }

    fn window(source: f64, stores: f64, mb: f64, ratio: f64) -> Window {
        let bytes = (mb * 1e6) as u64;
        Window {
            elapsed: WINDOW,
            waiting_for_source: WINDOW.mul_f64(source),
            waiting_for_stores: WINDOW.mul_f64(stores),
            bytes,
            compressed: (bytes as f64 * ratio) as u64,
        }
    }

    /// The level after ten alike windows from the start.
    fn settles_at(source: f64, stores: f64, mb: f64) -> i32 {
        let mut c = LevelControl::default();
        for _ in 0..10 {
            step(&mut c, source, stores, mb);
        }
        c.level()
    }

    #[test]
    fn spare_cpu_raises_the_level_to_the_top_of_the_range() {
        assert_eq!(settles_at(0.6, 0.0, 100.0), *LEVELS.end());
    }

    #[test]
    fn compression_that_holds_pg_dump_up_lowers_the_level_to_the_bottom() {
        assert_eq!(settles_at(0.01, 0.0, 100.0), *LEVELS.start());
    }

    #[test]
    fn a_slow_store_raises_the_level_even_when_compression_is_busy() {
        assert_eq!(settles_at(0.0, 0.7, 20.0), *LEVELS.end());
    }

    #[test]
    fn a_level_that_was_too_slow_is_not_retried_until_the_cool_down_ends() {
        let mut c = LevelControl::default();
        // Slack at 3: up to 4.
        assert_eq!(step(&mut c, 0.5, 0.0, 100.0), 4);
        // At 4 compression cannot keep up: back to 3, and 4 is capped.
        assert_eq!(step(&mut c, 0.02, 0.0, 80.0), 3);
        // Slack again at 3, but 4 stays out of reach for the cool-down.
        for _ in 0..COOL_DOWN - 2 {
            assert_eq!(step(&mut c, 0.4, 0.0, 100.0), 3);
        }
        assert_eq!(step(&mut c, 0.4, 0.0, 100.0), 3);
        assert_eq!(step(&mut c, 0.4, 0.0, 100.0), 4);
    }

    #[test]
    fn a_level_that_slows_the_source_is_backed_out_of() {
        let mut c = LevelControl::default();
        // At 3: 100 MB/s with some waiting for pg_dump: up to 4.
        assert_eq!(step(&mut c, 0.3, 0.0, 100.0), 4);
        // At 4 the input rate fell to 70 MB/s (a shared host's CPU): back.
        assert_eq!(step(&mut c, 0.2, 0.0, 70.0), 3);
    }

    #[test]
    fn compression_is_behind_only_when_neither_source_nor_stores_are_waited_for() {
        assert!(compression_is_behind(&window(0.01, 0.0, 100.0, 0.1)));
        assert!(!compression_is_behind(&window(0.2, 0.0, 100.0, 0.1)));
        assert!(!compression_is_behind(&window(0.01, 0.6, 100.0, 0.1)));
    }

    #[test]
    fn a_level_whose_output_is_no_smaller_is_backed_out_of() {
        let mut c = LevelControl::default();
        // Slack at 3: up to 4; at 4 the output is as big as at 3.
        assert_eq!(c.after(&window(0.5, 0.0, 100.0, 0.12)), 4);
        assert_eq!(c.after(&window(0.5, 0.0, 100.0, 0.1195)), 3);
        // And it stays out for the cool-down, slack or not.
        assert_eq!(c.after(&window(0.5, 0.0, 100.0, 0.12)), 3);
        // A store slower than the dump does not bring it back either.
        assert_eq!(c.after(&window(0.0, 0.8, 20.0, 0.12)), 3);
    }

    #[test]
    fn a_balanced_stream_keeps_its_level() {
        let mut c = LevelControl::default();
        for _ in 0..5 {
            assert_eq!(step(&mut c, 0.15, 0.05, 100.0), START);
        }
    }
}
