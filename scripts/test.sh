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
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --all-targets --locked
