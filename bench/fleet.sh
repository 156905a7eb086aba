#!/usr/bin/env bash
# Benchmark: fleets on a PostgreSQL catalog. Prints:
#   1. idle: one daemon, 1,000 configured jobs (none due): CPU % of a core and
#      catalog transactions per second over 60 s (every catalog operation is
#      one transaction; pg_stat_database.xact_commit of the catalog database);
#   2. jitter: one daemon, 1,000 jobs firing once a minute, spread over the
#      seconds: attempt start − tick, p50/p99/max over two minutes;
#   3. burst: 3 daemons × the same 300 jobs due at the same second: time until
#      every run is claimed and finished, and how many ran twice (must be 0);
#   4. takeover: 2 daemons, SIGKILL the one holding a run, 10 times: time from
#      the kill until another node starts the run (default lease 30 s,
#      heartbeat 5 s), p50/max.
#
# Uses the test build (feature test-clock) for its backup stand-in
# (BACKSTOP_TEST_STANDIN): the scheduling, claims and catalog traffic are
# real, the backups are sleeps. Debug build (dependencies optimised), so CPU
# figures are pessimistic. Takes about 12 minutes.
#
#   bench/fleet.sh [SECTION ...]    idle jitter burst takeover (default: all)
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh"
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(idle jitter burst takeover)

cargo build --quiet --features backstop/test-clock --bin backstop
bin="$repo/target/debug/backstop"
work=$(mktemp -d /tmp/backstop-fleet-bench-XXXXXX)
chmod 755 "$work"
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
pg_up "$work/pg"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pg_down
  rm -rf "$work"
}
trap cleanup EXIT
printf '%s\n' "$PG_PASSWORD" > "$work/pw"
chmod 600 "$work/pw"
age-keygen -o "$work/id" 2>/dev/null
recipient=$(age-keygen -y "$work/id")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
q() { pg_psql catalog -At -c "$1"; }

# config NAME JOBS SCHEDULE_FN [DAEMON_EXTRA]: SCHEDULE_FN I prints job I's schedule.
config() {
  local name=$1 jobs=$2 sched=$3 extra=${4:-}
  {
    cat <<TOML
[daemon]
catalog = "postgres://postgres@127.0.0.1:$PG_PORT/catalog"
catalog_password_file = "$work/pw"
listen = "127.0.0.1:$(free_port)"
max_concurrent_jobs = 64
$extra
[storage.local]
type = "local"
path = "$work/store"
[encryption.default]
recipients = ["$recipient"]
TOML
    for ((i = 0; i < jobs; i++)); do
      printf '[[job]]\nname = "j%04d"\ndatabase = { url = "postgres://postgres@127.0.0.1:%s/postgres", password_file = "%s" }\nschedule = "%s"\nstorage = ["local"]\n' \
        "$i" "$PG_PORT" "$work/pw" "$($sched "$i")"
    done
  } > "$work/$name.toml"
}

# start NAME: a daemon on $work/NAME.toml; sets $started_pid.
start() {
  local name=$1
  BACKSTOP_CONFIG="$work/$name.toml" BACKSTOP_LOG=warn "$bin" run 2>>"$work/$name.log" &
  started_pid=$!
  pids+=("$started_pid")
  local port
  port=$(sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"/\1/p' "$work/$name.toml")
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "daemon $name did not start:" >&2
  cat "$work/$name.log" >&2
  exit 1
}

stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

fresh_catalog() {
  pg_psql postgres -c "DROP DATABASE IF EXISTS catalog" -c "CREATE DATABASE catalog"
  BACKSTOP_CONFIG="$work/$1.toml" "$bin" migrate >/dev/null
  : > "$work/records"
}

export BACKSTOP_TEST_STANDIN="$work/records"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(psql --version | head -n1)"

for section in "${sections[@]}"; do
  case $section in
  idle)
    daily() { echo "0 0 3 * * *"; }
    config idle 1000 daily
    fresh_catalog idle
    export BACKSTOP_TEST_STANDIN_MS=100-200
    start idle
    pid=$started_pid
    sleep 20 # catch-up and seeding settle
    tck=$(getconf CLK_TCK)
    cpu0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    tx0=$(pg_psql postgres -At -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'catalog'")
    sleep 60
    cpu1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    tx1=$(pg_psql postgres -At -c "SELECT xact_commit FROM pg_stat_database WHERE datname = 'catalog'")
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    awk -v c=$((cpu1 - cpu0)) -v t="$tck" -v x=$((tx1 - tx0)) -v r="$rss" 'BEGIN {
      printf "idle, 1000 jobs, 1 daemon:  CPU %.2f %% of a core   catalog %.2f transactions/s   RSS %.0f MiB\n", c / t / 60 * 100, x / 60, r / 1024 }'
    stop_all
    ;;
  jitter)
    spread() { echo "$(($1 % 60)) * * * * *"; }
    config jitter 1000 spread
    fresh_catalog jitter
    export BACKSTOP_TEST_STANDIN_MS=50-200
    start jitter
    sleep 130
    stop_all
    q "SELECT 'jitter, 1000 jobs/min, 1 daemon: runs ' || count(*) ||
              '   p50 ' || round(CAST(percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS numeric), 3) ||
              ' s   p99 ' || round(CAST(percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS numeric), 3) ||
              ' s   max ' || round(CAST(max(d) AS numeric), 3) || ' s'
       FROM (SELECT extract(epoch FROM a.started_at) - extract(epoch FROM CAST(r.scheduled_for AS timestamptz)) AS d
             FROM attempts a JOIN runs r ON r.id = a.run WHERE a.attempt = 1 AND r.scheduled_for IS NOT NULL) s"
    ;;
  burst)
    minute() { echo "0 * * * * *"; }
    for n in b0 b1 b2; do config "$n" 300 minute; done
    fresh_catalog b0
    export BACKSTOP_TEST_STANDIN_MS=100-500
    for n in b0 b1 b2; do start "$n"; done
    # Past the first full minute after start (the first tick is each new
    # job's baseline, recorded skipped) and its runs.
    sleep $((60 - $(date +%-S) + 62))
    stop_all
    q "WITH t AS (SELECT r.scheduled_for, r.id, min(a.started_at) AS s, max(a.finished_at) AS f
                  FROM runs r JOIN attempts a ON a.run = r.id WHERE r.scheduled_for IS NOT NULL GROUP BY r.scheduled_for, r.id)
       SELECT 'burst, 3 daemons x 300 jobs due at ' || scheduled_for || ': runs ' || count(*) ||
              '   all claimed after ' || round(CAST(extract(epoch FROM max(s)) - extract(epoch FROM CAST(scheduled_for AS timestamptz)) AS numeric), 2) ||
              ' s   all finished after ' || round(CAST(extract(epoch FROM max(f)) - extract(epoch FROM CAST(scheduled_for AS timestamptz)) AS numeric), 2) || ' s'
       FROM t GROUP BY scheduled_for ORDER BY scheduled_for"
    twice=$(q "SELECT count(*) FROM (SELECT run FROM attempts GROUP BY run HAVING count(*) > 1) x")
    dup=$(awk '{print $2, $3}' "$work/records" | sort | uniq -d | wc -l)
    per_node=$(awk '{print $1}' "$work/records" | sort | uniq -c | awk '{printf "%s%s", sep, $1; sep="/"}')
    echo "burst: runs with more than one attempt: $twice; (job, tick) published twice: $dup; published per node: $per_node"
    ;;
  takeover)
    every30() { echo "*/30 * * * * *"; }
    config t0 4 every30
    config t1 4 every30
    fresh_catalog t0
    export BACKSTOP_TEST_STANDIN_MS=45000-45000
    start t0
    a=$started_pid
    start t1
    b=$started_pid
    times=()
    for k in $(seq 10); do
      victim=""
      run=""
      for _ in $(seq 600); do
        for p in $a $b; do
          # A run not interrupted before: one cut off 3 times is given up
          # by design (fleet::MAX_INTERRUPTIONS), not taken over.
          run=$(q "SELECT r.id FROM runs r JOIN nodes n ON n.id = r.node WHERE n.pid = $p AND r.outcome = 'running' AND r.attempt > 0 AND r.interruptions = 0 LIMIT 1")
          if [ -n "$run" ]; then victim=$p; break 2; fi
        done
        sleep 0.1
      done
      [ -n "$victim" ] || { echo "no node held a run" >&2; exit 1; }
      attempt=$(q "SELECT attempt FROM runs WHERE id = $run")
      kill -9 "$victim"
      wait "$victim" 2>/dev/null || true
      killed=$(date +%s.%N)
      for _ in $(seq 900); do
        [ -n "$(q "SELECT 1 FROM attempts WHERE run = $run AND attempt > $attempt")" ] && break
        sleep 0.1
      done
      took=$(q "SELECT extract(epoch FROM started_at) FROM attempts WHERE run = $run AND attempt > $attempt ORDER BY attempt LIMIT 1")
      [ -n "$took" ] || { echo "run $run was not taken over within 90 s" >&2; exit 1; }
      t=$(awk -v a="$took" -v k="$killed" 'BEGIN {printf "%.2f", a - k}')
      times+=("$t")
      echo "  kill $k: run $run taken over after $t s"
      # The killed node comes back as a new node.
      if [ "$victim" = "$a" ]; then start t0; a=$started_pid; else start t1; b=$started_pid; fi
    done
    printf '%s\n' "${times[@]}" | sort -n | awk '{v[NR] = $1} END {
      printf "takeover after SIGKILL (lease 30 s, heartbeat 5 s), 10 kills: p50 %.2f s   max %.2f s\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2, v[NR] }'
    stop_all
    ;;
  *)
    echo "unknown section $section (idle, jitter, burst, takeover)" >&2
    exit 2
    ;;
  esac
done
