# Shared by the benchmarks: a throwaway PostgreSQL and s3s-fs on loopback,
# an age key pair, and the benchmark database (pgbench accounts plus a table
# of jsonb and text). Sourced, not run; expects $repo.
#
# bench_setup SCALE EXTRA_ROWS sets: work bin endpoint recipient raw
#   (and PG_PORT PG_PASSWORD PG_BIN from scripts/lib/throwaway-pg.sh);
#   everything is removed on exit.
# bench_config writes $work/backstop.toml's catalog, S3 store and age
#   recipient; bench_job NAME [LINE...] appends a [[job]] that backs up the
#   benchmark database to the S3 store (or the `storage = …` line given),
#   with extra TOML lines.

bench_config() {
  cat > "$work/backstop.toml" <<TOML
[daemon]
catalog = "sqlite://$work/catalog.db"
[storage.s3]
type = "s3"
bucket = "bench"
region = "us-east-1"
endpoint = "$endpoint"
force_path_style = true
access_key_id = "$AWS_ACCESS_KEY_ID"
secret_access_key_file = "$work/s3-secret"
[encryption.default]
recipients = ["$recipient"]
TOML
}

bench_job() {
  local name=$1
  shift
  {
    echo "[[job]]"
    echo "name = \"$name\""
    echo "database = { url = \"postgres://postgres@127.0.0.1:$PG_PORT/bench\", password_file = \"$work/pw\" }"
    # The S3 store unless a line names the job's storage.
    case " $* " in *"storage ="*) ;; *) echo 'storage = ["s3"]' ;; esac
    [ $# -eq 0 ] || printf '%s\n' "$@"
  } >> "$work/backstop.toml"
}

# measure LABEL CMD...: one Markdown table row with wall time, CPU time of
#   the whole process tree and peak RSS, from /usr/bin/time -v.

bench_setup() {
  local scale=$1 extra=$2
  "$repo/scripts/install-deps.sh"
  command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
  command -v aws >/dev/null || pip install --quiet awscli

  cargo build --quiet --release --bin backstop
  bin="$repo/target/release/backstop"
  s3s=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")

  work=$(mktemp -d /tmp/backstop-bench-XXXXXX)
  chmod 755 "$work"
  # shellcheck source=../scripts/lib/throwaway-pg.sh
  . "$repo/scripts/lib/throwaway-pg.sh"
  pg_up "$work/pg"
  mkdir -p "$work/s3/bench"
  s3port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export AWS_ACCESS_KEY_ID=bench-key AWS_SECRET_ACCESS_KEY=bench-secret-0123456789 AWS_DEFAULT_REGION=us-east-1
  export AWS_EC2_METADATA_DISABLED=true
  "$s3s" --host 127.0.0.1 --port "$s3port" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" >/dev/null 2>&1 &
  s3pid=$!
  cleanup() { kill "$s3pid" 2>/dev/null || true; pg_down; rm -rf "$work"; }
  trap cleanup EXIT
  # A signal (Ctrl-C, a closed pipe) exits through the EXIT trap too, so
  # no server outlives the script.
  trap 'exit 130' INT TERM HUP PIPE
  endpoint="http://127.0.0.1:$s3port"
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && break; sleep 0.05; done

  printf '%s\n' "$PG_PASSWORD" > "$work/pw"
  chmod 600 "$work/pw"
  printf '%s\n' "$AWS_SECRET_ACCESS_KEY" > "$work/s3-secret"
  chmod 600 "$work/s3-secret"
  age-keygen -o "$work/id" 2>/dev/null
  recipient=$(age-keygen -y "$work/id")

  echo "==> building the database (pgbench scale $scale + $extra rows of jsonb/text)" >&2
  pg_psql postgres -c "CREATE DATABASE bench"
  PGPASSWORD="$PG_PASSWORD" "$PG_BIN/pgbench" -q -i -s "$scale" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench >/dev/null 2>&1
  pg_psql bench -c "CREATE TABLE events AS
    SELECT g AS id, now() - g * interval '1 second' AS at,
           jsonb_build_object('user', g % 100000, 'kind', (ARRAY['view','click','buy'])[1 + g % 3],
                              'tags', jsonb_build_array('a' || g % 17, 'b' || g % 31), 'score', (g::bigint * 7919) % 1000) AS payload,
           md5(g::text) || ' ' || repeat(chr(97 + g % 26), 20 + g % 40) AS note
    FROM generate_series(1, $extra) g" >/dev/null
  bench_shapes
  pg_psql bench -c "VACUUM ANALYZE" >/dev/null
  raw=$(PGPASSWORD="$PG_PASSWORD" pg_dump -Fc -Z0 -h 127.0.0.1 -p "$PG_PORT" -U postgres bench | wc -c)
}

# bench_shapes: what production databases have beside big tables, so the
#   dump is not one friendly shape: a partitioned table in a quoted
#   mixed-case schema, inherited tables, large objects (about 40 MB in all).
bench_shapes() {
  pg_psql bench >/dev/null <<'SQL'
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Orders" (id bigint, "placedAt" date, customer jsonb, note text)
  PARTITION BY RANGE ("placedAt");
CREATE TABLE "Sales"."Orders_2025" PARTITION OF "Sales"."Orders"
  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE "Sales"."Orders_2026" PARTITION OF "Sales"."Orders"
  FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO "Sales"."Orders"
  SELECT g, date '2025-01-01' + g % 700,
         jsonb_build_object('name', 'customer ' || g % 50000,
                            'city', (ARRAY['Berlin', 'Lyon', 'Porto', 'Oslo'])[1 + g % 4],
                            'vip', g % 11 = 0),
         md5((g * 31)::text) || ' order note ' || g % 977
  FROM generate_series(1, 150000) g;
CREATE SCHEMA audit;
CREATE TABLE audit.log (at timestamptz, who text, what text);
CREATE TABLE audit.log_2026 () INHERITS (audit.log);
INSERT INTO audit.log_2026
  SELECT now() - g * interval '1 minute', 'user' || g % 300, 'changed setting ' || md5(g::text)
  FROM generate_series(1, 100000) g;
SELECT lo_from_bytea(0, convert_to(repeat(md5(g::text) || ' attachment text ', 20000), 'UTF8'))
  FROM generate_series(1, 40) g;
SQL
}

# cpu_of_last: the CPU-seconds (user + sys) of the last measure.
cpu_of_last() {
  awk -F': ' '/User time/ { u = $2 } /System time/ { s = $2 } END { print u + s }' "$work/time"
}

# server_cpu: CPU-seconds the PostgreSQL server has used so far: the
#   postmaster's own and its exited children's (backends, including the
#   one that served pg_dump) plus its living children's.
server_cpu() {
  local pm ticks
  pm=$(head -n1 "$PG_DIR/data/postmaster.pid")
  ticks=$(getconf CLK_TCK)
  { cat "/proc/$pm/stat"; for c in $(cat "/proc/$pm/task/$pm/children" 2>/dev/null); do cat "/proc/$c/stat" 2>/dev/null; done; } \
    | awk -v t="$ticks" 'NR == 1 { s += $14 + $15 + $16 + $17; next } { s += $14 + $15 } END { printf "%.2f", s / t }'
}

# measure LABEL CMD...: wall, CPU (user+sys, whole process tree) and peak RSS;
#   with MEASURE_SERVER=1 also the server's CPU in the meantime and the
#   2-core floor, (CPU + server CPU) / 2: no tool on 2 cores beats it.
#   $work/last holds "wall cpu server rss" of the run as plain numbers.
measure() {
  local label=$1 before after
  shift
  sync
  local pm kids
  pm=$(head -n1 "$PG_DIR/data/postmaster.pid")
  kids=$(pgrep -c -P "$pm" || true)
  before=$(server_cpu)
  /usr/bin/time -v -o "$work/time" "$@" >/dev/null 2>"$work/err" || { echo "FAILED: $label" >&2; cat "$work/err" >&2; return 1; }
  # The run's backends count once the postmaster has reaped them.
  for _ in $(seq 100); do [ "$(pgrep -c -P "$pm" || true)" -le "$kids" ] && break; sleep 0.02; done
  after=$(server_cpu)
  awk -v last="$work/last" -v label="$label" -v server="$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}')" -v extra="${MEASURE_SERVER:-0}" -F': ' '
    /Elapsed \(wall clock\)/ { n = split($2, p, ":"); wall = (n == 3) ? p[1]*3600 + p[2]*60 + p[3] : p[1]*60 + p[2] }
    /User time/ { user = $2 } /System time/ { sys = $2 } /Maximum resident/ { rss = $2 }
    END {
      printf "%.2f %.2f %.2f %.1f\n", wall, user + sys, server, rss / 1024 > last
      if (extra == 1) printf "| %-58s | %7.1f | %7.1f | %8.1f | %7.1f | %7.1f |\n", label, wall, user + sys, rss / 1024, server, (user + sys + server) / 2
      else printf "| %-58s | %7.1f | %7.1f | %8.1f |\n", label, wall, user + sys, rss / 1024
    }
  ' "$work/time"
}
