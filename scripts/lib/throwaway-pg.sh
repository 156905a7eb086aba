# Sourced by scripts: a throwaway PostgreSQL cluster in a directory, on a free
# loopback port, with scram password auth over TCP. Run as a non-root user when
# the caller is root (PostgreSQL refuses root).
#
#   pg_up DIR      starts it; sets PG_PORT, PG_PASSWORD, PG_BIN; registers a stop on EXIT
#   pg_psql DB ... runs psql against it as postgres
#   pg_shop        creates database shop: a quoted mixed-case schema and table
#                  of 5,000 orders (JSON and text), 0.5 MB
#   pg_down        stops it

pg_up() {
  local dir=$1
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  PG_RUN=()
  if [ "$(id -u)" -eq 0 ]; then
    local user=postgres
    id "$user" >/dev/null 2>&1 || user=nobody
    PG_RUN=(runuser -u "$user" --)
  fi
  PG_DIR=$dir
  mkdir -p "$dir"
  chmod 755 "$dir"
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 30000)))
  PG_PASSWORD="pw-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  printf '%s\n' "$PG_PASSWORD" > "$dir/.pwfile"
  if [ ${#PG_RUN[@]} -gt 0 ]; then chown "${PG_RUN[2]}" "$dir" "$dir/.pwfile"; fi
  "${PG_RUN[@]}" "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/.pwfile" \
    --auth-host=scram-sha-256 --auth-local=trust --no-sync >/dev/null
  rm -f "$dir/.pwfile"
  trap pg_down EXIT
  "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
}

pg_psql() {
  local db=$1
  shift
  PGPASSWORD="$PG_PASSWORD" psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

pg_down() {
  [ -n "${PG_DIR:-}" ] || return 0
  "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
}

pg_shop() {
  pg_psql postgres -c "CREATE DATABASE shop" >/dev/null
  pg_psql shop >/dev/null <<'SQL'
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Orders" (id bigint PRIMARY KEY, placed date, doc jsonb, note text);
INSERT INTO "Sales"."Orders"
  SELECT g, date '2026-01-01' + g % 300, jsonb_build_object('sku', 'SKU-' || g % 400, 'qty', g % 9),
         md5(g::text) || ' gift wrap'
  FROM generate_series(1, 5000) g;
SQL
}
