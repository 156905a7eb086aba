#!/usr/bin/env bash
# Benchmark: what the stream costs. One PostgreSQL, one s3s-fs on loopback,
# one realistic database (pgbench accounts plus a table of jsonb and text),
# and four ways of getting it into S3, each measured with /usr/bin/time -v
# (wall time, CPU time of the whole process tree, peak RSS):
#
#   1. pg_dump -Fc -Z0 > /dev/null                    the ceiling: PostgreSQL producing the data
#   2. pg_dump -Fc > file && aws s3 cp file s3://…    the script most users run today
#   3. pg_dump -Fc -Z0 | zstd -3 -T0 | age -r KEY | aws s3 cp - s3://…   the best shell pipeline
#   4. backstop backup with the defaults (zstd:3, compression_threads = "auto",
#      memory_budget 28 MiB), on 2 threads from the start, at zstd:1,
#      zstd:auto, and zstd:9 (where one thread cannot keep up) with threads
#      auto and on the stream's own thread
#   5. the shell pipeline and backstop's defaults against a store slower than
#      the dump: s3s-fs behind bench/throttle.py at THROTTLE bytes/s
#
# Usage: bench/s3-backup.sh [SCALE] [EXTRA_ROWS] [THROTTLE]
#   SCALE       pgbench scale (default 200: 20M accounts)
#   EXTRA_ROWS  rows of the jsonb/text table (default 2000000)
#   THROTTLE    upload rate of the slow store in bytes/s (default 4000000)
# Defaults give about 2.4 GB of raw dump. `30 2000000` is the JSON/text-heavy
# set (about 1.1 GB, ~10:1), `15 200000` the small one. Results go in
# docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scale=${1:-200}
extra=${2:-2000000}
throttle=${3:-4000000}
# shellcheck source=lib.sh
. "$repo/bench/lib.sh"
bench_setup "$scale" "$extra"

# The slow store: the same s3s-fs behind a throttling proxy.
slowport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 "$repo/bench/throttle.py" "$slowport" "$s3port" "$throttle" &
throttle_pid=$!
trap 'kill "$throttle_pid" 2>/dev/null || true; cleanup' EXIT
slow="http://127.0.0.1:$slowport"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$slowport") 2>/dev/null && break; sleep 0.05; done

bench_config
cat >> "$work/backstop.toml" <<TOML
[storage.slow]
type = "s3"
bucket = "bench"
prefix = "slow/"
region = "us-east-1"
endpoint = "$slow"
force_path_style = true
access_key_id = "$AWS_ACCESS_KEY_ID"
secret_access_key_file = "$work/s3-secret"
TOML
bench_job defaults
bench_job twothreads 'compression_threads = 2'
bench_job z9auto 'compression = "zstd:9"'
bench_job z9one 'compression = "zstd:9"' 'compression_threads = 0'
bench_job zstd1 'compression = "zstd:1"'
bench_job auto 'compression = "zstd:auto"'
bench_job slow 'storage = ["slow"]'

pgdump=(env PGPASSWORD="$PG_PASSWORD" pg_dump -h 127.0.0.1 -p "$PG_PORT" -U postgres)
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(pg_dump --version); $(zstd --version | head -n1); age $(age --version); $(aws --version 2>&1 | cut -d' ' -f1)"
echo "database: pgbench scale $scale + $extra event rows; raw dump (pg_dump -Fc -Z0) $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}')"
echo
export MEASURE_SERVER=1
echo "| what | wall s | CPU s | peak RSS MiB | server CPU s | 2-core floor s |"
echo "|---|---:|---:|---:|---:|---:|"
measure "pg_dump -Fc -Z0 > /dev/null (ceiling)" "${pgdump[@]}" -Fc -Z0 bench
ceiling_cpu=$(cpu_of_last)
measure "pg_dump -Fc > file && aws s3 cp file (temp-file script)" bash -c \
  "$(printf '%q ' "${pgdump[@]}") -Fc -f '$work/dump.file' bench && aws s3 cp --quiet --endpoint-url '$endpoint' '$work/dump.file' s3://bench/script/dump.file; rc=\$?; rm -f '$work/dump.file'; exit \$rc"
measure "pg_dump -Z0 | zstd -3 -T0 | age | aws s3 cp - (shell pipeline)" bash -o pipefail -c \
  "$(printf '%q ' "${pgdump[@]}") -Fc -Z0 bench | zstd -q -3 -T0 | age -r '$recipient' | aws s3 cp --quiet --expected-size $raw --endpoint-url '$endpoint' - s3://bench/pipe/dump.zst.age"
measure "backstop backup, defaults (zstd:3, threads auto, 28 MiB)" "$bin" --config "$work/backstop.toml" backup --job defaults
defaults_cpu=$(cpu_of_last)
measure "backstop backup, compression_threads = 2" "$bin" --config "$work/backstop.toml" backup --job twothreads
measure "backstop backup, zstd:1" "$bin" --config "$work/backstop.toml" backup --job zstd1
measure "backstop backup, zstd:auto" "$bin" --config "$work/backstop.toml" backup --job auto
measure "backstop backup, zstd:9 (threads auto)" "$bin" --config "$work/backstop.toml" backup --job z9auto
measure "backstop backup, zstd:9, compression_threads = 0" "$bin" --config "$work/backstop.toml" backup --job z9one
echo
echo "Against a store taking $(awk -v b="$throttle" 'BEGIN {printf "%.1f MB/s", b/1e6}'):"
echo
measure "pg_dump -Z0 | zstd -3 -T0 | age | aws s3 cp - (slow store)" bash -o pipefail -c \
  "$(printf '%q ' "${pgdump[@]}") -Fc -Z0 bench | zstd -q -3 -T0 | age -r '$recipient' | aws s3 cp --quiet --expected-size $raw --endpoint-url '$slow' - s3://bench/slowpipe/dump.zst.age"
measure "backstop backup, defaults (slow store)" "$bin" --config "$work/backstop.toml" backup --job slow
echo
zst=$(find "$work/s3/bench/pipe" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
echo "stored: shell pipeline (zstd -3 -T0 | age) $(awk -v b="$zst" 'BEGIN {printf "%.1f MiB", b/1048576}'); backstop:"
"$bin" --config "$work/backstop.toml" list --job defaults | tail -n +1
for j in twothreads auto z9auto z9one; do "$bin" --config "$work/backstop.toml" list --job $j | tail -n +2; done
find "$work/s3/bench" -path '*auto*' -name manifest.json -exec python3 -c '
import json, sys
for a in json.load(open(sys.argv[1]))["artifacts"]:
    if a.get("compression_levels"): print("zstd:auto levels (plain bytes):", a["compression_levels"])' {} \;
"$bin" --config "$work/backstop.toml" check-config 2>/dev/null | grep -A3 '^  defaults' | grep memory || true

# Where backstop's own CPU goes, by stage (PROFILE=0 skips it): perf's
# cpu-clock samples of one default backup, grouped by what the symbol does,
# give each stage's share; the CPU-seconds are those shares of backstop's
# own CPU measured above without perf (the defaults row minus the ceiling's
# pg_dump). pg_dump's samples are left out; SHA-256 of the plain and of the
# stored bytes share one function and are split by their byte counts.
if [ "${PROFILE:-1}" != 0 ] && command -v perf >/dev/null; then
  echo
  echo "CPU by stage (perf, one default backup; CPU-s per raw GB):"
  echo
  perf record -q -e cpu-clock -F 999 -o "$work/perf.data" -- \
    "$bin" --config "$work/backstop.toml" backup --job defaults >/dev/null 2>&1
  m=$(find "$work/s3/bench/defaults" -name manifest.json | head -n1 | xargs python3 -c '
import json, sys
a = [x for x in json.load(open(sys.argv[1]))["artifacts"] if x["kind"] == "database"][0]
print(a["plain_bytes"], a["stored_bytes"])')
  perf report -i "$work/perf.data" --stdio --no-children --sort comm,dso,symbol -F overhead,comm,dso,symbol 2>/dev/null \
    | awk -v own="$(awk -v a="$defaults_cpu" -v b="$ceiling_cpu" 'BEGIN {print a - b}')" -v m="$m" -v raw="$raw" -f "$repo/bench/stages.awk"
fi
