//! What a person running `backstop backup`, `restore`, `download` or
//! `verify` watches: on a terminal, progress bars (indicatif) on stderr and
//! a summary line at the end; otherwise a log line every 10 seconds and the
//! summary as a log line. The daemon shows none of this (its runs are in
//! the metrics and the status page).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

use backstop_pipeline::backup::live::{self, LiveStream};
use backstop_pipeline::human_bytes;
use backstop_pipeline::watch::{Counter, Reading, Watch, Watcher};

/// How often a bar is redrawn, and a log line written without a terminal.
const BAR_TICK: Duration = Duration::from_millis(200);
const LINE_EVERY: Duration = Duration::from_secs(10);

/// The bars on screen now, if any: log lines are written around them.
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Runs `f` (which writes to stderr) with the bars on screen, if any, lifted
/// out of the way and drawn again after, so a log line never lands inside a
/// bar. The CLI's log writer goes through this.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match active {
        Some(m) => m.suspend(f),
        None => f(),
    }
}

/// Makes `multi` the bars log lines are written around.
fn show(multi: &MultiProgress) {
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = Some(multi.clone());
}

/// The bars are gone: log lines go straight to stderr again.
fn hide() {
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Whether stderr is a terminal (bars) or not (log lines).
pub fn on_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// `1.2 GiB of 2.4 GiB (50%), 45.1 MiB/s, ETA 27s`.
pub fn progress_line(done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let pct = if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    };
    let eta = if rate > 0.0 && total > done {
        let left = (total - done) as f64 / rate;
        humantime::format_duration(Duration::from_secs(left.ceil() as u64)).to_string()
    } else {
        "-".into()
    };
    format!(
        "{} of {} ({pct:.0}%), {}/s, ETA {eta}",
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64)
    )
}

/// `1.2 GiB in 3.4 s (350.0 MiB/s)`.
fn summary(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    format!(
        "{} in {secs:.1} s ({}/s)",
        human_bytes(bytes),
        human_bytes((bytes as f64 / secs) as u64)
    )
}

/// The CLI's watcher: a bar per read on a terminal, log lines otherwise.
pub struct Bars;

impl Bars {
    /// What a command that reads a backup passes the pipeline: the bars,
    /// or none (`--json`: stdout is for the result, and a log line per
    /// 10 s would be noise).
    pub fn unless(json: bool) -> Watch {
        if json {
            Watch::default()
        } else {
            Watch::by(Arc::new(Bars))
        }
    }
}

impl Watcher for Bars {
    fn read(&self, label: String, counter: Counter, total: u64) -> Box<dyn Reading> {
        Box::new(ReadProgress::start(label, counter, total))
    }
}

impl Reading for ReadProgress {
    fn finish(self: Box<Self>) {
        ReadProgress::finish(*self);
    }
}

/// A read of `total` bytes (restore, download, verify): a bar with rate,
/// elapsed and ETA, or log lines. [`ReadProgress::finish`] prints the summary;
/// dropped unfinished (a failure), it just goes away.
pub struct ReadProgress {
    label: String,
    counter: Counter,
    started: Instant,
    bar: Option<(MultiProgress, ProgressBar)>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadProgress {
    /// Starts showing `counter` against `total` bytes under `label`.
    pub fn start(label: String, counter: Counter, total: u64) -> Self {
        let started = Instant::now();
        let bar = on_terminal().then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let bar = multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {elapsed} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.clone());
            show(&multi);
            (multi, bar)
        });
        let task = {
            let (counter, label) = (counter.clone(), label.clone());
            let bar = bar.as_ref().map(|(_, b)| b.clone());
            tokio::spawn(async move {
                let mut tick =
                    tokio::time::interval(if bar.is_some() { BAR_TICK } else { LINE_EVERY });
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let done = counter();
                    match &bar {
                        Some(b) => b.set_position(done),
                        None => info!("{label}: {}", progress_line(done, total, started.elapsed())),
                    }
                }
            })
        };
        Self {
            label,
            counter,
            started,
            bar,
            task,
        }
    }

    /// The read completed: the bar gives way to a summary line.
    pub fn finish(self) {
        let line = summary((self.counter)(), self.started.elapsed());
        match &self.bar {
            Some((_, b)) => {
                b.finish_and_clear();
                hide();
                eprintln!("{}: {line}", self.label);
            }
            None => info!("{}: done, {line}", self.label),
        }
    }
}

impl Drop for ReadProgress {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((_, b)) = &self.bar {
            b.finish_and_clear();
            hide();
        }
    }
}

/// A backup of one job as it streams: per artifact, bytes dumped, rows
/// counted so far, rate and elapsed, and what each store has taken.
pub struct BackupProgress {
    task: tokio::task::JoinHandle<()>,
    bars: Option<MultiProgress>,
}

/// `dumped 1.2 GiB, 1,234,567 rows, 45.0 MiB/s, 12s`.
fn dump_line(s: &LiveStream) -> String {
    let secs = s.flow.elapsed.as_secs_f64().max(0.001);
    let rows = if s.flow.rows > 0 {
        format!(", {} rows", thousands(s.flow.rows))
    } else {
        String::new()
    };
    format!(
        "dumped {}{rows}, {}/s, {}",
        human_bytes(s.flow.dumped),
        human_bytes((s.flow.dumped as f64 / secs) as u64),
        humantime::format_duration(Duration::from_secs(s.flow.elapsed.as_secs()))
    )
}

/// `offsite 300.0 MiB` per store.
fn stores_line(s: &LiveStream) -> String {
    s.stores
        .iter()
        .zip(&s.flow.taken)
        .map(|(name, b)| format!("{name} {}", human_bytes(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What a stream is called on its line: the file, and a cluster job's database.
fn stream_title(s: &LiveStream) -> String {
    match backstop_vocab::series::split(&s.series).1 {
        Some(seg) => match backstop_vocab::series::database_of(seg) {
            Some(db) => format!("{db}: {}", s.file),
            None => format!("globals: {}", s.file),
        },
        None => s.file.clone(),
    }
}

/// One artifact's bars: the dump, then one per store.
struct StreamBars {
    key: (String, String),
    dump: ProgressBar,
    stores: Vec<ProgressBar>,
}

impl BackupProgress {
    /// Watches the backups of job `job` until [`BackupProgress::finish`].
    pub fn watch(job: &str) -> Self {
        let job = job.to_string();
        if !on_terminal() {
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(LINE_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    for s in live::streams_of(&job) {
                        info!(job = %job, artifact = %stream_title(&s), stored = %stores_line(&s),
                            "Backup in progress: {}.", dump_line(&s));
                    }
                }
            });
            return Self { task, bars: None };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        show(&multi);
        let dump_style = ProgressStyle::with_template("{spinner:.green} {prefix}: {msg}")
            .expect("a valid template");
        let store_style =
            ProgressStyle::with_template("    → {prefix}: {msg}").expect("a valid template");
        let m = multi.clone();
        let task = tokio::spawn(async move {
            let mut shown: Vec<StreamBars> = Vec::new();
            let mut tick = tokio::time::interval(BAR_TICK);
            loop {
                tick.tick().await;
                let now = live::streams_of(&job);
                // Streams that ended give their lines back.
                shown.retain(|b| {
                    let live = now
                        .iter()
                        .any(|s| (s.series.clone(), s.file.clone()) == b.key);
                    if !live {
                        b.dump.finish_and_clear();
                        b.stores.iter().for_each(ProgressBar::finish_and_clear);
                    }
                    live
                });
                for s in &now {
                    let key = (s.series.clone(), s.file.clone());
                    let i = match shown.iter().position(|b| b.key == key) {
                        Some(i) => i,
                        None => {
                            let dump = m.add(ProgressBar::new_spinner());
                            dump.set_style(dump_style.clone());
                            dump.set_prefix(format!("{job} {}", stream_title(s)));
                            let stores = s
                                .stores
                                .iter()
                                .map(|name| {
                                    let b = m.add(ProgressBar::new_spinner());
                                    b.set_style(store_style.clone());
                                    b.set_prefix(name.clone());
                                    b
                                })
                                .collect();
                            shown.push(StreamBars { key, dump, stores });
                            shown.len() - 1
                        }
                    };
                    let bars = &shown[i];
                    bars.dump.set_message(dump_line(s));
                    bars.dump.tick();
                    let secs = s.flow.elapsed.as_secs_f64().max(0.001);
                    for (b, taken) in bars.stores.iter().zip(&s.flow.taken) {
                        b.set_message(format!(
                            "{} stored, {}/s",
                            human_bytes(*taken),
                            human_bytes((*taken as f64 / secs) as u64)
                        ));
                    }
                }
            }
        });
        Self {
            task,
            bars: Some(multi),
        }
    }

    /// The backup ended: the bars go (the caller prints the outcome).
    pub fn finish(self) {}
}

impl Drop for BackupProgress {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(m) = &self.bars {
            hide();
            let _ = m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line(
                512 * 1024 * 1024,
                1024 * 1024 * 1024,
                Duration::from_secs(8)
            ),
            "512.0 MiB of 1.0 GiB (50%), 64.0 MiB/s, ETA 8s"
        );
        assert_eq!(
            progress_line(0, 1000, Duration::from_secs(1)),
            "0 B of 1000 B (0%), 0 B/s, ETA -"
        );
        assert_eq!(
            progress_line(10, 0, Duration::from_secs(1)),
            "10 B of 0 B (100%), 10 B/s, ETA -"
        );
    }

    #[test]
    fn backup_lines_say_how_far_each_store_is() {
        let s = LiveStream {
            series: "prod/Sales%20DB".into(),
            file: "database.dump.zst.age".into(),
            stores: vec!["local".into(), "offsite".into()],
            flow: backstop_pipeline::backup::stream::Flow {
                dumped: 3 * 1024 * 1024 * 1024,
                rows: 12_345_678,
                taken: vec![400 * 1024 * 1024, 380 * 1024 * 1024],
                elapsed: Duration::from_secs(64),
            },
        };
        assert_eq!(
            dump_line(&s),
            "dumped 3.0 GiB, 12,345,678 rows, 48.0 MiB/s, 1m 4s"
        );
        assert_eq!(stores_line(&s), "local 400.0 MiB, offsite 380.0 MiB");
        assert_eq!(stream_title(&s), "Sales DB: database.dump.zst.age");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(
            summary(10 * 1024 * 1024, Duration::from_secs(2)),
            "10.0 MiB in 2.0 s (5.0 MiB/s)"
        );
    }
}
