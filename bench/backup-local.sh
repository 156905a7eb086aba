#!/usr/bin/env bash
# Benchmark: `backstop backup` into a local store at two database sizes, next
# to the ceiling `pg_dump -Fc -Z0 > /dev/null`. Prints wall time, CPU time
# (user+sys) and peak RSS from /usr/bin/time -v, and the raw dump size.
# The point: backstop's memory must not grow with the database.
#
#   bench/backup-local.sh [SCALE ...]     pgbench scales, default "20 100"
#                                         (about 0.3 GB and 1.5 GB of raw dump)
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh"
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
scales=("$@")
[ ${#scales[@]} -gt 0 ] || scales=(20 100)

cargo build --quiet --release --bin backstop
bin="$repo/target/release/backstop"
work=$(mktemp -d /tmp/backstop-bench-XXXXXX)
chmod 755 "$work"
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
pg_up "$work/pg"
cleanup() { pg_down; rm -rf "$work"; }
trap cleanup EXIT
printf '%s\n' "$PG_PASSWORD" > "$work/pw"
chmod 600 "$work/pw"
age-keygen -o "$work/id" 2>/dev/null
recipient=$(age-keygen -y "$work/id")

# measure LABEL CMD...: one line of numbers from /usr/bin/time -v.
measure() {
  local label=$1
  shift
  /usr/bin/time -v -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; return 1; }
  awk -v label="$label" -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, p, ":"); wall = (n == 3) ? p[1]*3600 + p[2]*60 + p[3] : p[1]*60 + p[2] }
    /User time/ { user = $2 } /System time/ { sys = $2 } /Maximum resident/ { rss = $2 }
    END { printf "  %-34s wall %7.2f s   cpu %7.2f s   peak RSS %7.1f MiB\n", label, wall, user + sys, rss / 1024 }
  ' "$work/time"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(psql --version | head -n1)"
for scale in "${scales[@]}"; do
  db="bench_s$scale"
  pg_psql postgres -c "CREATE DATABASE $db"
  PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pgbench" -q -i -s "$scale" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db" >/dev/null 2>&1
  raw=$(PGPASSWORD="$PG_PASSWORD" pg_dump -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db" | wc -c)
  echo "pgbench scale $scale: raw dump $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}')"
  for level in 1 3; do
    cat > "$work/backstop.toml" <<TOML
[daemon]
catalog = "sqlite://$work/catalog.db"
[storage.local]
type = "local"
path = "$work/store"
[encryption.default]
recipients = ["$recipient"]
[[job]]
name = "bench"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/$db", password_file = "$work/pw" }
storage = ["local"]
compression = "zstd:$level"
TOML
    measure "pg_dump -Fc -Z0 > /dev/null" env PGPASSWORD="$PG_PASSWORD" pg_dump -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres -f /dev/null "$db"
    measure "backstop backup (zstd:$level, age)" "$bin" --config "$work/backstop.toml" backup --job bench
    stored=$(du -sb "$work/store/bench" | cut -f1)
    echo "    stored $(awk -v b="$stored" 'BEGIN {printf "%.1f MB", b/1e6}')"
    rm -rf "$work/store"
  done
  pg_psql postgres -c "DROP DATABASE $db"
done
