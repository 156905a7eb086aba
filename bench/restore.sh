#!/usr/bin/env bash
# Benchmark: what a restore costs. The benchmark database (see bench/lib.sh)
# is backed up once by backstop to s3s-fs on loopback (zstd:3, age), then
# restored four ways into a new database each, measured with /usr/bin/time -v:
#
#   1. pg_restore --single-transaction FILE   stock, serial, plain archive on local disk
#   2. pg_restore -j 2 FILE                   stock, parallel, plain archive on local disk
#   3. backstop restore                       streamed S3 → age → zstd → pg_restore, serial, one transaction
#   4. backstop restore --jobs 2              S3 → age → zstd → private temp file → pg_restore -j 2
#
# The local file of 1 and 2 is the same archive, written by
# `backstop download --decrypt` (its download time is printed too). Each
# target database is dropped after it is measured.
#
# Usage: bench/restore.sh [SCALE] [EXTRA_ROWS]   (defaults 200 and 2000000: ~2.4 GB raw dump)
# Results go in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scale=${1:-200}
extra=${2:-2000000}
# shellcheck source=lib.sh
. "$repo/bench/lib.sh"
bench_setup "$scale" "$extra"

bench_config
bench_job bench "identity_file = \"$work/id\""
bs=("$bin" --config "$work/backstop.toml")
"${bs[@]}" backup --job bench >/dev/null 2>&1
target() { echo "postgres://postgres@127.0.0.1:$PG_PORT/$1"; }
drop() { pg_psql postgres -c "DROP DATABASE IF EXISTS $1" >/dev/null; }
stock=(env PGPASSWORD="$PG_PASSWORD" pg_restore --exit-on-error -h 127.0.0.1 -p "$PG_PORT" -U postgres)

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(pg_restore --version); server $("$PG_BIN/postgres" --version)"
echo "database: pgbench scale $scale + $extra event rows; raw dump (pg_dump -Fc -Z0) $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}'); stored $("${bs[@]}" list --job bench --json | python3 -c 'import json,sys; m=json.load(sys.stdin)[0]; print(round(sum(a["stored_bytes"] for a in m["artifacts"])/2**20,1), "MiB")')"
echo
echo "| what | wall s | CPU s | peak RSS MiB |"
echo "|---|---:|---:|---:|"
measure "backstop download --decrypt (S3 → local plain archive)" "${bs[@]}" download --job bench --decrypt --out "$work/plain.dump"
pg_psql postgres -c "CREATE DATABASE r1" >/dev/null
measure "pg_restore --single-transaction FILE (stock, serial)" "${stock[@]}" --single-transaction -d r1 "$work/plain.dump"
drop r1
pg_psql postgres -c "CREATE DATABASE r2" >/dev/null
measure "pg_restore -j 2 FILE (stock, parallel)" "${stock[@]}" -j 2 -d r2 "$work/plain.dump"
drop r2
rm -f "$work/plain.dump"
measure "backstop restore (streamed from S3, serial)" env PGPASSWORD="$PG_PASSWORD" "${bs[@]}" restore --job bench --create-db --target "$(target r3)"
drop r3
measure "backstop restore --jobs 2 (S3 → temp file → pg_restore -j 2)" env PGPASSWORD="$PG_PASSWORD" TMPDIR="$work" "${bs[@]}" restore --job bench --create-db --jobs 2 --target "$(target r4)"
drop r4
