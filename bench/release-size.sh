#!/usr/bin/env bash
# What the release build ships: `cargo build --release --bin backstop`
# (the README's install command), then the size of the binary, of any
# debug info packed beside it (backstop.dwp, when the release profile
# splits it), and the debug sections left in the binary. Results are in
# docs/BENCHMARKS.md.
#
#   bench/release-size.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$(date +%s)
cargo build --release --locked --bin backstop
echo "build: $(( $(date +%s) - start )) s"
for f in target/release/backstop target/release/backstop.dwp; do
  if [ -e "$f" ]; then
    printf '%-32s %12d bytes  (%s)\n' "$f" "$(stat -c %s "$f")" "$(du -h "$f" | cut -f1)"
  else
    printf '%-32s absent\n' "$f"
  fi
done
if command -v readelf >/dev/null; then
  echo "debug sections in the binary: $(readelf -S --wide target/release/backstop | grep -c '\.debug_' || true)"
  echo "symbols in the binary: $(readelf -s --wide target/release/backstop | wc -l)"
fi
