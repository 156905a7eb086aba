#!/usr/bin/env bash
# Cold build of the backstop binary, as a newcomer's first `scripts/demo.sh`
# does it: a fresh clone of REV (default HEAD) in a temp dir with an empty
# target dir, `cargo build --bin backstop --timings`. Prints the wall time,
# the sum of unit times, and the units that cost most. With --demo, runs the
# clone's scripts/demo.sh instead and prints when its first backup completed.
#
#   bench/cold-build.sh [REV] [--demo]
#
# The cargo registry (~/.cargo/registry) is reused: downloads are not part
# of the number. Results are in docs/BENCHMARKS.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
rev=HEAD
demo=false
for a in "$@"; do
  case "$a" in
    --demo) demo=true ;;
    *) rev=$a ;;
  esac
done

work=$(mktemp -d /tmp/backstop-cold-XXXXXX)
# The demo's PostgreSQL runs as a non-root user, who must reach the clone.
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/src"
git -C "$work/src" checkout -q "$rev"
cd "$work/src"
echo "cold build of $(git rev-parse --short HEAD) on $(nproc) cores"

start=$(date +%s)
if $demo; then
  scripts/demo.sh > "$work/demo.log" 2>&1 &
  pid=$!
  first=""
  while kill -0 "$pid" 2>/dev/null; do
    if [ -z "$first" ] && grep -q "complete in" "$work/demo.log"; then
      first=$(( $(date +%s) - start ))
    fi
    sleep 1
  done
  if ! wait "$pid"; then
    echo "demo failed:" >&2
    tail -n 30 "$work/demo.log" >&2
    exit 1
  fi
  [ -n "$first" ] || first="never"
  echo "demo: first backup complete after ${first}s; demo finished after $(( $(date +%s) - start ))s"
  exit 0
fi

if ! cargo build --bin backstop --timings > "$work/build.log" 2>&1; then
  tail -n 30 "$work/build.log" >&2
  exit 1
fi
echo "wall: $(( $(date +%s) - start ))s"
python3 - "$work/src/target/cargo-timings" <<'PY'
import glob, json, re, sys
f = sorted(glob.glob(sys.argv[1] + "/cargo-timing-*.html"))[-1]
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);\n", open(f).read(), re.S).group(1))
print("units: %d, sum of unit times: %.0fs" % (len(units), sum(u["duration"] for u in units)))
for u in sorted(units, key=lambda u: -u["duration"])[:12]:
    print("  %-26s %-20s %6.1fs" % (u["name"], u.get("target", "").strip(), u["duration"]))
PY
