#!/usr/bin/env bash
# The fleet simulation at the issue's full shape (5 nodes, 200 jobs, 30
# simulated days, faults) over many seeds: what the test suite's 50 seeds of
# a smaller fleet cannot reach in a minute. Seeds 0..N-1 (default 100), on
# every core; about 1 min per seed per core on a 2-core machine. A failing
# seed is printed with the command that replays it alone.
#
#   scripts/sim-long.sh            # seeds 0..99
#   scripts/sim-long.sh 20         # seeds 0..19
#   BACKSTOP_SIM_SEED=7 scripts/sim-long.sh   # one seed
set -euo pipefail
cd "$(dirname "$0")/.."
export BACKSTOP_SIM_SEEDS="${1:-${BACKSTOP_SIM_SEEDS:-100}}"
exec cargo test -p backstop-fleet --lib --locked sim::tests::full -- --ignored --exact --nocapture
