#!/usr/bin/env bash
# Benchmark: what the stream costs. One PostgreSQL, one s3s-fs on loopback,
# one realistic database (pgbench accounts plus a table of jsonb and text),
# and four ways of getting it into S3, each measured with /usr/bin/time -v
# (wall time, CPU time of the whole process tree, peak RSS):
#
#   1. pg_dump -Fc -Z0 > /dev/null                    the ceiling: PostgreSQL producing the data
#   2. pg_dump -Fc > file && aws s3 cp file s3://…    the script most users run today
#   3. pg_dump -Fc -Z0 | zstd -3 -T0 | age -r KEY | aws s3 cp - s3://…   the best shell pipeline
#   4. backstop backup (zstd:3 and zstd:1, age, 16 MiB parts, 4 in flight)
#
# Usage: bench/s3-backup.sh [SCALE] [EXTRA_ROWS]
#   SCALE       pgbench scale (default 200: 20M accounts)
#   EXTRA_ROWS  rows of the jsonb/text table (default 2000000)
# Defaults give about 2.4 GB of raw dump. Results go in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scale=${1:-200}
extra=${2:-2000000}
# shellcheck source=lib.sh
. "$repo/bench/lib.sh"
bench_setup "$scale" "$extra"

bench_config
bench_job zstd3 'compression = "zstd:3"'
bench_job zstd1 'compression = "zstd:1"'

pgdump=(env PGPASSWORD="$PG_PASSWORD" pg_dump -h 127.0.0.1 -p "$PG_PORT" -U postgres)
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(pg_dump --version); $(zstd --version | head -n1); age $(age --version); $(aws --version 2>&1 | cut -d' ' -f1)"
echo "database: pgbench scale $scale + $extra event rows; raw dump (pg_dump -Fc -Z0) $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}')"
echo
echo "| what | wall s | CPU s | peak RSS MiB |"
echo "|---|---:|---:|---:|"
measure "pg_dump -Fc -Z0 > /dev/null (ceiling)" "${pgdump[@]}" -Fc -Z0 bench
measure "pg_dump -Fc > file && aws s3 cp file (temp-file script)" bash -c \
  "$(printf '%q ' "${pgdump[@]}") -Fc -f '$work/dump.file' bench && aws s3 cp --quiet --endpoint-url '$endpoint' '$work/dump.file' s3://bench/script/dump.file; rc=\$?; rm -f '$work/dump.file'; exit \$rc"
measure "pg_dump -Z0 | zstd -3 -T0 | age | aws s3 cp - (shell pipeline)" bash -o pipefail -c \
  "$(printf '%q ' "${pgdump[@]}") -Fc -Z0 bench | zstd -q -3 -T0 | age -r '$recipient' | aws s3 cp --quiet --expected-size $raw --endpoint-url '$endpoint' - s3://bench/pipe/dump.zst.age"
measure "backstop backup (zstd:3, age, 16 MiB parts)" "$bin" --config "$work/backstop.toml" backup --job zstd3
measure "backstop backup (zstd:1, age, 16 MiB parts)" "$bin" --config "$work/backstop.toml" backup --job zstd1
echo
"$bin" --config "$work/backstop.toml" list --job zstd3 | tail -n +1
