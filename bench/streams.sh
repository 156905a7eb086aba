#!/usr/bin/env bash
# Benchmark: backups in streams (job.streams). A database of mixed tables
# (one much larger than the rest, a partitioned table, JSON and text that
# compress 5-10:1, quoted mixed-case names, a large object) is backed up
# with streams = 1, 2, 4 and 8 into a local store and restored with
# `restore --jobs N` (fed from the store, no temp file; streams = 1 is the
# one-archive backup restored in one stream), twice:
#   - behind bench/throttle.py capping each TCP connection to RATE MB/s
#     both ways (a far region, a managed service's per-connection cap);
#   - straight to the server on this machine, where the CPU is the limit.
# Prints, per streams: backup and restore wall time and their speedup
# against streams = 1, backstop's CPU time and peak RSS next to the
# job's memory_budget, and whether the restored database equals the
# source (every table's row count and an md5 of its rows, the sequences,
# index and constraint definitions, the large object).
#
#   bench/streams.sh [RATE_MB_PER_S] [SCALE]    default 4 and 1 (~0.25 GB raw)
#
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh"
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
rate_mb=${1:-4}
scale=${2:-1}
streams_list=(1 2 4 8)

cargo build --quiet --release --locked --bin backstop
bin="$repo/target/release/backstop"
work=$(mktemp -d /tmp/backstop-bench-XXXXXX)
chmod 755 "$work"
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
pg_up "$work/pg"
proxy_pid=""
cleanup() {
  [ -z "$proxy_pid" ] || kill "$proxy_pid" 2>/dev/null || true
  pg_down
  rm -rf "$work"
}
trap cleanup EXIT
printf '%s\n' "$PG_PASSWORD" > "$work/pw"
chmod 600 "$work/pw"
age-keygen -o "$work/id" 2>/dev/null
recipient=$(age-keygen -y "$work/id")
export PGPASSWORD="$PG_PASSWORD"

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(psql --version | head -n1)"
pg_psql postgres -c "CREATE DATABASE src"
pg_psql src -v scale="$scale" <<'SQL'
CREATE SCHEMA "App";
-- The big one: ~60 % of the data, JSON events.
CREATE TABLE "App"."Events" (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL,
  kind text NOT NULL,
  payload jsonb NOT NULL
);
INSERT INTO "App"."Events" (at, kind, payload)
SELECT timestamptz '2026-01-01' + g * interval '7 seconds',
       (ARRAY['login','view','search','cart','checkout','refund','logout'])[g % 7 + 1],
       jsonb_build_object(
         'user', 'user-' || (g::bigint * 7919 % 100000),
         'path', '/api/v1/' || (ARRAY['orders','items','users','carts','search','reviews'])[g % 6 + 1] || '/' || (g % 5000),
         'agent', (ARRAY['Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0','Mozilla/5.0 (Macintosh) Safari/17.4','okhttp/4.12.0','curl/8.5.0'])[g % 4 + 1],
         'ms', g % 997,
         'status', (ARRAY[200,200,200,201,304,404,500])[g % 7 + 1],
         'note', 'request ' || g || ' served from ' || (ARRAY['eu-west','us-east','ap-south'])[g % 3 + 1] || ' cache ' || (g % 17))
FROM generate_series(1, 420000 * :scale) g;
-- Partitioned by month.
CREATE TABLE public.metrics (
  id bigint NOT NULL, at timestamptz NOT NULL, host text NOT NULL, value numeric NOT NULL, labels jsonb NOT NULL,
  PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
CREATE TABLE public.metrics_2026_01 PARTITION OF public.metrics FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE public.metrics_2026_02 PARTITION OF public.metrics FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE public.metrics_2026_03 PARTITION OF public.metrics FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE TABLE public.metrics_rest PARTITION OF public.metrics DEFAULT;
INSERT INTO public.metrics
SELECT g, timestamptz '2026-01-01' + (g % 110) * interval '1 day' + (g % 86400) * interval '1 second',
       'host-' || (g % 40) || '.prod.internal', round((g % 10007) / 7.0, 3),
       jsonb_build_object('dc', (ARRAY['fra','ams','iad'])[g % 3 + 1], 'rack', 'r' || (g % 24), 'service', (ARRAY['api','worker','db','cache'])[g % 4 + 1])
FROM generate_series(1, 200000 * :scale) g;
CREATE TABLE public.customers (
  id int PRIMARY KEY, "Name" text NOT NULL, email text NOT NULL, address text NOT NULL, notes text
);
INSERT INTO public.customers
SELECT g, 'Customer ' || g, 'customer' || g || '@example.com',
       (g % 900 + 1) || ' ' || (ARRAY['Main Street','Station Road','Harbour Lane','Mill Way'])[g % 4 + 1] || ', ' || (ARRAY['Berlin','Lisbon','Oslo','Porto','Graz'])[g % 5 + 1],
       CASE WHEN g % 3 = 0 THEN 'prefers delivery before noon; call ahead ' || (g % 13) END
FROM generate_series(1, 60000 * :scale) g;
CREATE TABLE public.orders (
  id bigint PRIMARY KEY, customer int NOT NULL REFERENCES public.customers (id), placed timestamptz NOT NULL,
  total numeric(12,2) NOT NULL, lines jsonb NOT NULL
);
INSERT INTO public.orders
SELECT g, (g % (60000 * :scale)) + 1, timestamptz '2026-01-01' + g * interval '1 minute', round((g % 9973) * 1.13, 2),
       jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 800), 'qty', g % 5 + 1), jsonb_build_object('sku', 'SKU-' || (g % 311), 'qty', 1))
FROM generate_series(1, 150000 * :scale) g;
CREATE INDEX orders_customer ON public.orders (customer);
CREATE TABLE public.attachments (id int PRIMARY KEY, blob oid NOT NULL);
INSERT INTO public.attachments VALUES (1, lo_from_bytea(0, convert_to(repeat('terms and conditions apply; ', 70000), 'UTF8')));
ANALYZE;
SQL
raw=$(pg_psql src -At -c "SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog','information_schema')")
echo "database: $(awk -v b="$raw" 'BEGIN {printf "%.2f GB", b/1e9}') in tables (\"App\".\"Events\" ~60 %, a partitioned table, customers, orders, a large object); scale $scale"

# What a restore must reproduce, one line per item: every table's rows
# (count and an md5 of them in order), sequences, index and constraint
# definitions, the large object.
fingerprint() {
  local db=$1 t
  pg_psql "$db" -At -c "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1" |
    while read -r t; do
      echo "$t $(pg_psql "$db" -At -c "SELECT count(*) || ' ' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), '') FROM ONLY $t x")"
    done
  pg_psql "$db" -At <<'SQL'
SELECT schemaname || '.' || sequencename || '=' || last_value FROM pg_sequences ORDER BY 1;
SELECT indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1;
SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace::regnamespace::text NOT IN ('pg_catalog', 'information_schema') ORDER BY 1;
SELECT md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY 1;
SQL
}
fingerprint src > "$work/src.fp"

# measure OUT CMD...: wall, cpu and peak RSS of CMD from /usr/bin/time -v into OUT.
measure() {
  local out=$1
  shift
  /usr/bin/time -v -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; return 1; }
  awk -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, p, ":"); wall = (n == 3) ? p[1]*3600 + p[2]*60 + p[3] : p[1]*60 + p[2] }
    /User time/ { user = $2 } /System time/ { sys = $2 } /Maximum resident/ { rss = $2 }
    END { printf "%.2f %.2f %.1f\n", wall, user + sys, rss / 1024 }
  ' "$work/time" > "$out"
}

run_mode() {
  local label=$1 port=$2
  echo
  echo "$label"
  printf '  %-8s %10s %8s %8s %10s %10s %12s %8s  %s\n' streams "backup s" speedup "cpu s" "RSS MiB" "budget" "restore s" speedup "restored"
  local b1="" r1=""
  for n in "${streams_list[@]}"; do
    rm -rf "$work/store" "$work/catalog.db"*
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
database = { url = "postgres://postgres@127.0.0.1:$port/src", password_file = "$work/pw" }
storage = ["local"]
compression = "zstd:3"
streams = $n
split_tables_larger_than = "16MiB"
lock_guard = { mode = "off" }
TOML
    measure "$work/b" "$bin" --config "$work/backstop.toml" backup --job bench
    read -r bw bc brss < "$work/b"
    local lanes=$(( n > 1 ? n + 1 : 1 ))
    PGOPTIONS="-c client_min_messages=warning" pg_psql postgres -c "DROP DATABASE IF EXISTS r" >/dev/null
    measure "$work/r" "$bin" --config "$work/backstop.toml" restore --job bench \
      --target "postgres://postgres@127.0.0.1:$port/r" --target-password-file "$work/pw" \
      --create-db --identity "$work/id" --jobs "$n"
    read -r rw _ _ < "$work/r"
    fingerprint r > "$work/r.fp"
    local same=identical
    cmp -s "$work/src.fp" "$work/r.fp" || same="DIFFERENT (diff $work/src.fp $work/r.fp)"
    [ -n "$b1" ] || { b1=$bw; r1=$rw; }
    printf '  %-8s %10s %7.2fx %8s %10s %9sMi %12s %7.2fx  %s\n' "$n" "$bw" "$(awk -v a="$b1" -v b="$bw" 'BEGIN {print a/b}')" \
      "$bc" "$brss" "$((28 * lanes))" "$rw" "$(awk -v a="$r1" -v b="$rw" 'BEGIN {print a/b}')" "$same"
    [ "$same" = identical ] || { diff "$work/src.fp" "$work/r.fp" | head -n 20 >&2; exit 1; }
  done
  local m
  m=$(ls "$work"/store/bench/*/manifest.json)
  python3 - "$m" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
plain = sum(a["plain_bytes"] for a in m["artifacts"])
stored = sum(a["stored_bytes"] for a in m["artifacts"])
print(f"  raw dump {plain / 1e9:.2f} GB, stored {stored / 1e9:.3f} GB (compresses {plain / stored:.1f}:1)")
PY
}

proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 "$repo/bench/throttle.py" "$proxy_port" "$PG_PORT" "$((rate_mb * 1000000))" --per-connection --both-ways &
proxy_pid=$!
for _ in $(seq 100); do
  python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$proxy_port" 2>/dev/null && break
  kill -0 "$proxy_pid" || { echo "throttle.py did not start" >&2; exit 1; }
  sleep 0.1
done
run_mode "behind a per-connection cap of $rate_mb MB/s each way (bench/throttle.py --per-connection --both-ways):" "$proxy_port"
kill "$proxy_pid"
proxy_pid=""
run_mode "straight to the server (loopback; $(nproc) cores shared by the server, backstop, pg_dump/psql and pg_restore):" "$PG_PORT"
