//! The fleet simulation: seeds 0..N (BACKSTOP_SIM_SEEDS, default 50), each
//! a fleet of nodes over simulated days with faults, checked against the
//! fleet's invariants. A failing seed is printed with the command that
//! replays it alone: BACKSTOP_SIM_SEED=<seed> cargo test -p backstop-fleet
//! --lib sim::tests::faults -- --exact --nocapture.

use super::{Params, run};

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("BACKSTOP_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n: u64 = std::env::var("BACKSTOP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    (0..n).collect()
}

/// BACKSTOP_SIM_LOG=info (or debug) prints what the nodes log, stamped
/// with the simulated time: for replaying one seed.
fn logs() {
    struct SimTimer;
    impl tracing_subscriber::fmt::time::FormatTime for SimTimer {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            write!(w, "{}", super::sim_now().format("%m-%dT%H:%M:%S%.3f"))
        }
    }
    if let Ok(filter) = std::env::var("BACKSTOP_SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_timer(SimTimer)
            .with_test_writer()
            .try_init();
    }
}

/// Runs every seed (on every core, each seed on its own thread and
/// runtime, so each stays deterministic) and prints them in order.
fn check(name: &str, p: &Params) {
    logs();
    let seeds = seeds();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(seeds.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(&seed) = seeds.get(i) else { return };
                    let began = std::time::Instant::now();
                    let r = run(seed, p);
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((seed, began.elapsed(), r));
                }
            });
        }
    });
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|r| r.0);
    let mut failed = Vec::new();
    for (seed, took, r) in results {
        match r {
            Ok(s) => println!(
                "{name} seed {seed}: ok in {:.2} s: {} ticks, {} published, {} skipped, {} failed, {} prunes, {} crashes, {} pauses, {} failovers, {} rows at the end (at most {} at an hour, {} deleted by the history passes)",
                took.as_secs_f64(),
                s.ticks,
                s.published,
                s.skipped,
                s.failed,
                s.prunes,
                s.crashes,
                s.pauses,
                s.failovers,
                s.rows,
                s.max_rows,
                s.forgotten
            ),
            Err(v) => {
                println!("{name} seed {seed}: FAILED");
                for x in &v {
                    println!("  {x}");
                }
                failed.push(seed);
            }
        }
    }
    println!(
        "{name}: {} seeds in {:.1} s on {workers} threads",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{name}: seeds {failed:?} broke the fleet's invariants; replay one with: BACKSTOP_SIM_SEED={} cargo test -p backstop-fleet --lib sim::tests::{name} -- --exact --nocapture{}",
        failed[0],
        if name == "full" { " --ignored" } else { "" }
    );
}

#[test]
fn calm() {
    check("calm", &Params::calm());
}

#[test]
fn faults() {
    check("faults", &Params::ci());
}

/// The full shape (5 nodes, 200 jobs, 30 days): what
/// scripts/sim-long.sh runs over many seeds; ignored in the suite.
#[test]
#[ignore = "long: run by scripts/sim-long.sh"]
fn full() {
    check("full", &Params::full());
}
