#!/usr/bin/env bash
# Benchmark: the daemon's status page at fleet scale. Builds the example
# crates/daemon/examples/status_page.rs in release, which writes a SQLite
# catalog of JOBS jobs with 30 backups and 30 prunes each (some failing with
# long errors, some suspect, a cluster job every 50th), then prints the
# time to read the status from the catalog (what each request does), to
# render GET / from it, and to serialise /api/v1/status, as min / median /
# max over ROUNDS.
#
#   bench/status-page.sh [JOBS] [ROUNDS]     default 500 20
#
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
cargo build --quiet --release --locked -p backstop-daemon --example status_page
exec "$repo/target/release/examples/status_page" "${1:-500}" "${2:-20}"
