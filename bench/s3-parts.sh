#!/usr/bin/env bash
# Memory and part sizes at scale, through the real S3 uploader: streams 1, 5
# and 20 GiB (or the sizes given) of synthetic data to a loopback S3 that
# discards the bodies (bench/discard_s3.py), within a 28 MiB memory budget
# (the whole default job budget, given to the upload alone: stricter than a
# backup, where the upload gets a share of it), with the size expected as
# the pipeline would plan it from the job's history. For each size it prints
# the part plan the store saw (every part but the last must be equal) and
# the process's RSS: baseline before the upload and peak during it,
# sampled every 20 ms.
#
#   bench/s3-parts.sh [MEMORY_MIB] [GIB ...]
#
# Needs: cargo (builds the s3_stream example in release), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
memory="${1:-28}"
shift || true
sizes=("${@:-1 5 20}")
# shellcheck disable=SC2206
sizes=(${sizes[*]})
cargo build --release --locked -q -p backstop-storage --example s3_stream
bin=target/release/examples/s3_stream
work=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 bench/discard_s3.py "$port" "$work/parts.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
done
printf '%-8s %-10s %-8s %-7s %-12s %-9s %-12s %-14s %-8s\n' GiB parts part_MiB equal seconds MB/s base_RSS_MiB peak_over_MiB budget
for gib in "${sizes[@]}"; do
    : > "$work/parts.log"
    out=$("$bin" "http://127.0.0.1:$port" "$gib" "$memory" "$gib")
    val() { sed -n "s/.* $1=\([^ ]*\).*/\1/p; s/^$1=\([^ ]*\).*/\1/p" <<< "$out" | head -1; }
    read -r parts part equal < <(python3 - "$work/parts.log" <<'PY'
import sys
sizes = [int(l.split()[2]) for l in sorted(open(sys.argv[1]), key=lambda l: int(l.split()[1]))]
full = sizes[:-1] or sizes
print(len(sizes), round(full[0] / 2**20, 2), "yes" if len(set(full)) == 1 and sizes[-1] <= full[0] else "NO")
PY
)
    printf '%-8s %-10s %-8s %-7s %-12s %-9s %-12s %-14s %-8s\n' "$gib" "$parts" "$part" "$equal" \
        "$(val seconds)" "$(val mb_per_s)" "$(val baseline_rss_mib)" "$(val over_baseline_mib)" "$memory"
done
