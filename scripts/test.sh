#!/usr/bin/env bash
# The whole test suite: installs what is missing, checks formatting and lints,
# then runs every test (unit tests and the end-to-end tests against real
# PostgreSQL clusters the tests start and stop themselves).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
# The test build honours BACKSTOP_TEST_NOW (feature test-clock, which the
# e2e target requires); a release build does not, and the clock's unit
# test (crates/vocab) runs without the feature too to prove it.
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked --features backstop/test-clock -- -D warnings
echo "==> cargo test"
cargo test --workspace --all-targets --locked --features backstop/test-clock
echo "==> cargo test (release clock)"
cargo test -p backstop-vocab --lib --locked -- clock_tests
# The Debian package, installed, upgraded from the previous commit's and
# removed for real (dpkg on this machine): in CI, which runs as root on a
# throwaway machine; elsewhere when asked (BACKSTOP_PACKAGE_TEST=1).
if [ "${CI:-}" = true ] || [ "${BACKSTOP_PACKAGE_TEST:-}" = 1 ]; then
  echo "==> package test"
  scripts/package-test.sh
fi
