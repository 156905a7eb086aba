#!/usr/bin/env bash
# Benchmark: the daemon's status page at fleet scale. Builds the example
# crates/daemon/examples/status_page.rs in release, which writes a SQLite
# catalog of JOBS jobs with DAYS days of PER_DAY backup ticks a day each
# (what daemon.catalog_history keeps; about one tick in 13 skipped, one
# backup in 97 failed, a prune and a verify a day, some jobs failing now
# with long errors, some suspect, a cluster job every 50th), then prints
# the time to read the status afresh (what `backstop status` does) and the
# catalog's share of it, the daemon's listing of every store at start,
# what its first request reads (the catalog) and what every later one
# costs (served from what it keeps of each job), the time to render GET /,
# and to serialise /api/v1/status, as min / median / max over ROUNDS. 1,000 × 90 × 96 writes 8.8 million runs
# (about 2 minutes, 3 GB in a temporary directory).
#
#   bench/status-page.sh [JOBS] [ROUNDS] [DAYS] [PER_DAY]   default 1000 20 90 96
#
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cargo build --quiet --release --locked -p backstop-daemon --example status_page
exec "$repo/target/release/examples/status_page" "${1:-1000}" "${2:-20}" "${3:-90}" "${4:-96}"
