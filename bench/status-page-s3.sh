#!/usr/bin/env bash
# Benchmark: the daemon's status page with JOBS jobs on an S3 store. One
# throwaway PostgreSQL with a small shop database (two schemas, a
# partitioned table with a quoted mixed-case name, JSON and text), s3s-fs on
# loopback behind bench/count_s3.py (a proxy that logs every request it
# forwards), and the release daemon with the status page on, every job
# backed up into the one S3 store. Each job gets BACKUPS backups (the
# daemon's catch-up at start, then runs asked for through the run API),
# so each listing has that many manifests to read.
#
# Then, with the daemon idle, it times ROUNDS requests of GET / and of
# /api/v1/status (min / median / max, from a keep-alive client on loopback)
# and counts the store requests the proxy saw meanwhile: what the page
# costs, and whether a page view asks the store anything. For comparison it
# times `backstop status --json` (a fresh read of the catalog and every
# store, what each page read did before the daemon kept its listings) and
# counts its store requests.
#
#   bench/status-page-s3.sh [JOBS] [ROUNDS] [BACKUPS]   default 500 50 2
#
# 500 jobs × 2 backups take about 4 minutes to make on 2 cores. Results are
# recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
jobs=${1:-500}
rounds=${2:-50}
backups=${3:-2}

"$repo/scripts/install-deps.sh" >&2
cargo build --quiet --release --locked --bin backstop
bin="$repo/target/release/backstop"
s3s=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

work=$(mktemp -d /tmp/backstop-bench-XXXXXX)
chmod 755 "$work"
pids=()
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pg_down
  rm -rf "$work"
}
pg_up "$work/pg"
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

export AWS_ACCESS_KEY_ID=bench-key AWS_SECRET_ACCESS_KEY=bench-secret-0123456789
mkdir -p "$work/s3/bench"
s3port=$(free_port)
"$s3s" --host 127.0.0.1 --port "$s3port" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" >/dev/null 2>&1 &
pids+=($!)
wait_port "$s3port"
proxyport=$(free_port)
python3 "$repo/bench/count_s3.py" "$proxyport" "$s3port" "$work/requests.log" &
pids+=($!)
wait_port "$proxyport"

echo "==> the shop database" >&2
pg_psql postgres -c "CREATE DATABASE shop"
pg_psql shop >/dev/null <<'SQL'
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Orders" (id bigint, "placedAt" date, customer jsonb, note text)
  PARTITION BY RANGE ("placedAt");
CREATE TABLE "Sales"."Orders_2025" PARTITION OF "Sales"."Orders" FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE "Sales"."Orders_2026" PARTITION OF "Sales"."Orders" FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO "Sales"."Orders"
  SELECT g, date '2025-01-01' + g % 700,
         jsonb_build_object('name', 'customer ' || g % 5000, 'city', (ARRAY['Berlin', 'Lyon', 'Porto', 'Oslo'])[1 + g % 4]),
         md5((g * 31)::text) || ' order note ' || g % 977
  FROM generate_series(1, 3000) g;
CREATE SCHEMA audit;
CREATE TABLE audit.log (at timestamptz, who text, what text);
INSERT INTO audit.log SELECT now() - g * interval '1 minute', 'user' || g % 300, 'changed setting ' || md5(g::text)
  FROM generate_series(1, 2000) g;
SQL
printf '%s\n' "$PG_PASSWORD" > "$work/pw"
printf '%s\n' "$AWS_SECRET_ACCESS_KEY" > "$work/s3-secret"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/token"
chmod 600 "$work/pw" "$work/s3-secret" "$work/token"
token=$(cat "$work/token")
port=$(free_port)

{
  cat <<TOML
[daemon]
catalog = "sqlite://$work/catalog.db"
listen = "127.0.0.1:$port"
status_page = true
api_token_file = "$work/token"
max_concurrent_jobs = 4

[storage.s3]
type = "s3"
bucket = "bench"
region = "us-east-1"
endpoint = "http://127.0.0.1:$proxyport"
force_path_style = true
access_key_id = "$AWS_ACCESS_KEY_ID"
secret_access_key_file = "$work/s3-secret"

TOML
  for i in $(seq 0 $((jobs - 1))); do
    case $((i % 3)) in 0) name=$(printf 'billing-%03d' "$i") ;; 1) name=$(printf 'Orders_EU_%03d' "$i") ;; *) name=$(printf 'app-%03d' "$i") ;; esac
    cat <<TOML
[[job]]
name = "$name"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/shop", password_file = "$work/pw" }
encryption = "none"
storage = ["s3"]
schedule = "$((i % 60)) 3 * * *"
rpo = "2d"

TOML
  done
} > "$work/backstop.toml"
names=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$work/backstop.toml")

# Status as JSON from the daemon; prints how many jobs have at least $1
# backups stored.
stored_at_least() {
  curl -sf "http://127.0.0.1:$port/api/v1/status" | python3 -c '
import json, sys
n = int(sys.argv[1])
print(sum(1 for j in json.load(sys.stdin)["jobs"] if (j["backups_stored"] or 0) >= n))' "$1"
}
wait_stored() {
  local want=$1 start=$SECONDS
  until [ "$(stored_at_least "$want")" -ge "$jobs" ]; do
    [ $((SECONDS - start)) -lt 1800 ] || { echo "backups did not finish; see $work/daemon.log" >&2; exit 1; }
    sleep 2
  done
}

echo "==> $jobs jobs: the daemon's catch-up backs each up once" >&2
t0=$SECONDS
"$bin" --config "$work/backstop.toml" run > "$work/daemon.log" 2>&1 &
daemon=$!
pids+=("$daemon")
wait_port "$port" || { echo "the daemon did not listen:" >&2; tail -20 "$work/daemon.log" >&2; exit 1; }
wait_stored 1
for b in $(seq 2 "$backups"); do
  echo "==> backup $b of each job, through the run API" >&2
  for n in $names; do
    curl -sf -o /dev/null -X POST -H "Authorization: Bearer $token" "http://127.0.0.1:$port/api/v1/jobs/$n/run"
  done
  wait_stored "$b"
done
echo "==> $((jobs * backups)) backups made in $((SECONDS - t0)) s" >&2

# The daemon idle: no run going, its lister done (no store request for 3 s).
last=-1
until [ "$last" -eq "$(wc -l < "$work/requests.log")" ]; do
  last=$(wc -l < "$work/requests.log")
  sleep 3
done
before=$(wc -l < "$work/requests.log")
python3 - "$port" "$rounds" <<'PY'
import http.client, statistics, sys, time
port, rounds = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
for path in ["/", "/api/v1/status"]:
    took, size = [], 0
    for _ in range(rounds):
        t = time.perf_counter()
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        took.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, (r.status, body[:200])
        size = len(body)
    took.sort()
    print(f"GET {path:<16} min {took[0]:7.1f} ms   median {statistics.median(took):7.1f} ms   max {took[-1]:7.1f} ms   ({rounds} requests, {size // 1024} KiB)")
PY
after=$(wc -l < "$work/requests.log")
echo "store requests during $((2 * rounds)) page and API requests: $((after - before))"

before=$after
t=$(date +%s%N)
"$bin" --config "$work/backstop.toml" status --json > "$work/status.json" 2> "$work/status.err" || true
took=$((($(date +%s%N) - t) / 1000000))
after=$(wc -l < "$work/requests.log")
echo "a fresh read of every store (backstop status --json): $took ms, $((after - before)) store requests"
