#!/usr/bin/env bash
# Benchmark: disaster recovery. Prints:
#   1. restore: a cluster job over a server with 4 databases (the marketplace
#      fixture at scale $SCALE in three of them, under several names, plus an
#      empty `postgres`): the backup's wall time, then `backstop drill` (every
#      database restored into scratch databases, checked, dropped: the
#      measured RTO) and `backstop restore --all-databases` onto a second,
#      freshly initdb'd server, with --parallel 1 and 2;
#   2. rebuild: `backstop catalog rebuild` into an empty catalog from a local
#      store and from S3 (s3s-fs) holding N backups, each with a verification
#      record, for N = 100, 1,000 and 5,000 (cloned from one real backup:
#      rebuild reads manifests and records, never artifacts, so the clones
#      hard-link one artifact); then the same rebuild again (nothing to add).
#
# Debug build of the workspace (dependencies optimised, as the tests use):
# times are pessimistic for the JSON and catalog work. Takes 3-5 minutes.
#
#   SCALE=10 bench/recovery.sh [restore] [rebuild]   (default: both)
# Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh" >&2
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(restore rebuild)
scale=${SCALE:-10}

cargo build --quiet --bin backstop
bin="$repo/target/debug/backstop"
s3s=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")
work=$(mktemp -d /tmp/backstop-recovery-bench-XXXXXX)
chmod 755 "$work"
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
s3pid=
target_dir=
cleanup() {
  [ -z "$s3pid" ] || kill "$s3pid" 2>/dev/null || true
  if [ -n "$target_dir" ]; then
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$target_dir/data" -m fast stop >/dev/null 2>&1 || true
  fi
  pg_down
  rm -rf "$work"
}
pg_up "$work/pg"
trap cleanup EXIT
source_port=$PG_PORT source_password=$PG_PASSWORD
printf '%s\n' "$PG_PASSWORD" > "$work/pw"
chmod 600 "$work/pw"
age-keygen -o "$work/id" 2>/dev/null
recipient=$(age-keygen -y "$work/id")
now_ms() { date +%s%3N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1000 }'; }

config() { # config FILE CATALOG STORE_TOML
  cat > "$1" <<TOML
[daemon]
catalog = "sqlite://$2"
max_concurrent_jobs = 2
$3
[encryption.default]
recipients = ["$recipient"]

[[job]]
name = "prod"
database = { url = "postgres://postgres@127.0.0.1:$source_port/postgres", password_file = "$work/pw", all = true }
identity_file = "$work/id"
storage = ["store"]
TOML
}
local_store() { printf '[storage.store]\ntype = "local"\npath = "%s"\n' "$1"; }

restore_section() {
  echo "==> building the source server: 3 marketplace databases at scale $scale" >&2
  for db in shop "Shop EU" inventory; do
    pg_psql postgres -c "CREATE DATABASE \"$db\""
    PGOPTIONS="-c backstop.fixture_scale=$scale" pg_psql "$db" -f tests/fixtures/marketplace.sql >/dev/null
  done
  config "$work/r.toml" "$work/r-catalog.db" "$(local_store "$work/r-store")"
  local t0 t1
  t0=$(now_ms)
  BACKSTOP_LOG=warn "$bin" -c "$work/r.toml" backup --job prod > "$work/backup.out"
  t1=$(now_ms)
  echo "cluster backup (4 databases + globals): $(secs "$t0" "$t1") s; $(tail -n1 "$work/backup.out")"

  for p in 1 2; do
    t0=$(now_ms)
    BACKSTOP_LOG=warn "$bin" -c "$work/r.toml" drill --job prod --parallel "$p" \
      --target-server "postgres://postgres@127.0.0.1:$source_port/postgres" --target-password-file "$work/pw" > "$work/drill.out"
    t1=$(now_ms)
    echo "drill --parallel $p: $(secs "$t0" "$t1") s wall; $(tail -n1 "$work/drill.out")"
  done

  for p in 1 2; do
    target_dir="$work/target-$p"
    local saved_port=$PG_PORT saved_password=$PG_PASSWORD saved_dir=$PG_DIR
    PG_DIR=""
    pg_up "$target_dir"
    trap cleanup EXIT
    local tport=$PG_PORT
    printf '%s\n' "$PG_PASSWORD" > "$work/tpw"
    chmod 600 "$work/tpw"
    PG_PORT=$saved_port PG_PASSWORD=$saved_password PG_DIR=$saved_dir
    t0=$(now_ms)
    BACKSTOP_LOG=warn "$bin" -c "$work/r.toml" restore --job prod --all-databases --create-db --parallel "$p" \
      --target-server "postgres://postgres@127.0.0.1:$tport/postgres" --target-password-file "$work/tpw" > "$work/restore.out"
    t1=$(now_ms)
    echo "restore --all-databases --parallel $p onto a new server: $(secs "$t0" "$t1") s; $(tail -n1 "$work/restore.out")"
    "${PG_RUN[@]}" "$PG_BIN/pg_ctl" -D "$target_dir/data" -m fast stop >/dev/null
    target_dir=
  done
}

# clone N: $work/base (one real backup with a record) → $work/tree/prod/... N backups.
clone() {
  python3 - "$work/base" "$work/tree" "$1" <<'PY'
import json, os, sys, datetime, shutil
base, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
shutil.rmtree(out, ignore_errors=True)
series = [s for s in os.listdir(os.path.join(base, "prod"))]
t0 = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
per = n // len(series)
for s in series:
    src_series = os.path.join(base, "prod", s)
    (src_id,) = os.listdir(src_series)
    src = os.path.join(src_series, src_id)
    m = json.load(open(os.path.join(src, "manifest.json")))
    rec_dir = os.path.join(src, "verify")
    (rec_name,) = os.listdir(rec_dir)
    rec = json.load(open(os.path.join(rec_dir, rec_name)))
    for i in range(per):
        t = t0 + datetime.timedelta(hours=i)
        bid = t.strftime("%Y-%m-%dT%H-%M-%SZ") + "-%04x" % (i % 65536)
        d = os.path.join(out, "prod", s, bid)
        os.makedirs(os.path.join(d, "verify"))
        m["backup_id"] = bid
        m["started_at"] = t.isoformat().replace("+00:00", "Z")
        m["finished_at"] = (t + datetime.timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
        for a in m["artifacts"]:
            a["key"] = f"prod/{s}/{bid}/{a['file']}"
            os.link(os.path.join(src, a["file"]), os.path.join(d, a["file"]))
        json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
        rec["backup_id"] = bid
        json.dump(rec, open(os.path.join(d, "verify", rec_name), "w"))
PY
}

rebuild_section() {
  echo "==> one real cluster backup (2 series: globals + postgres) with verification records" >&2
  config "$work/b.toml" "$work/b-catalog.db" "$(local_store "$work/base")"
  # Only `postgres` (empty) besides the globals: the clones need one backup per series.
  sed -i 's/all = true }/all = true, exclude = ["shop", "Shop EU", "inventory"] }/' "$work/b.toml"
  BACKSTOP_LOG=warn "$bin" -c "$work/b.toml" backup --job prod >/dev/null
  BACKSTOP_LOG=warn "$bin" -c "$work/b.toml" verify --job prod >/dev/null

  mkdir -p "$work/s3/bench"
  local s3port
  s3port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export AWS_ACCESS_KEY_ID=bench-key AWS_SECRET_ACCESS_KEY=bench-secret-0123456789 AWS_EC2_METADATA_DISABLED=true
  printf '%s\n' "$AWS_SECRET_ACCESS_KEY" > "$work/s3-secret"
  chmod 600 "$work/s3-secret"
  "$s3s" --host 127.0.0.1 --port "$s3port" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$work/s3" >/dev/null 2>&1 &
  s3pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && break; sleep 0.05; done
  local s3_toml
  s3_toml=$(printf '[storage.store]\ntype = "s3"\nbucket = "bench"\nregion = "us-east-1"\nendpoint = "http://127.0.0.1:%s"\nforce_path_style = true\naccess_key_id = "%s"\nsecret_access_key_file = "%s"\n' \
    "$s3port" "$AWS_ACCESS_KEY_ID" "$work/s3-secret")

  for n in 100 1000 5000; do
    clone "$n"
    rm -rf "$work/s3/bench"/*
    cp -al "$work/tree/prod" "$work/s3/bench/prod"
    for kind in local s3; do
      local store_toml
      if [ "$kind" = local ]; then store_toml=$(local_store "$work/tree"); else store_toml=$s3_toml; fi
      rm -f "$work/rb-catalog.db"*
      config "$work/rb.toml" "$work/rb-catalog.db" "$store_toml"
      local t0 t1 t2
      t0=$(now_ms)
      BACKSTOP_LOG=warn "$bin" -c "$work/rb.toml" catalog rebuild > "$work/rb.out"
      t1=$(now_ms)
      BACKSTOP_LOG=warn "$bin" -c "$work/rb.toml" catalog rebuild > /dev/null
      t2=$(now_ms)
      echo "rebuild $kind, $n backups: $(secs "$t0" "$t1") s into an empty catalog, $(secs "$t1" "$t2") s again; $(head -n1 "$work/rb.out")"
    done
  done
}

for s in "${sections[@]}"; do
  case $s in
    restore) restore_section ;;
    rebuild) rebuild_section ;;
    *) echo "unknown section $s (restore, rebuild)" >&2; exit 2 ;;
  esac
done
