#!/usr/bin/env bash
# Benchmark: what checking every manifest's signature costs a listing.
# Makes one real backup of the marketplace fixture (a throwaway PostgreSQL)
# into a local store, copies it into N backup folders with their own ids
# and times, signs each copy's manifest with stock minisign (as backstop
# signs: trusted comment "backstop object:<key>"), then times
# `backstop list --job app` with trusted_keys set (every signature read and
# verified, every manifest checked) against the same listing without keys
# (the folder checks only), paired with farm-bench.
#
#   bench/trust-listing.sh [N] [RUNS]     default 500 5
#
# Uses the debug build the tests use (dependencies, the crypto included,
# are built at opt-level 2). Results are recorded in docs/BENCHMARKS.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-500}
runs=${2:-5}
cd "$repo"
cargo build --quiet --locked -p backstop --features backstop/test-clock
bin="$repo/target/debug/backstop"
work=$(mktemp -d /tmp/backstop-trust-bench.XXXXXX)
chmod 755 "$work"
# shellcheck source=../scripts/lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
pg_up "$work/pg"
trap 'pg_down; rm -rf "$work"' EXIT
pg_psql postgres -c "CREATE DATABASE marketplace"
pg_psql marketplace -f "$repo/tests/fixtures/marketplace.sql" >/dev/null
printf '%s\n' "$PG_PASSWORD" > "$work/db-password"
chmod 600 "$work/db-password"
age-keygen -o "$work/age.txt" 2>/dev/null
recipient=$(age-keygen -y "$work/age.txt")
"$bin" keygen --out "$work/signing.key" >/dev/null 2>&1

config() {
  cat <<TOML
[daemon]
catalog = "sqlite://$work/catalog-$1.db"
$2

[storage.local]
type = "local"
path = "$work/store"

[encryption.default]
recipients = ["$recipient"]

[[job]]
name = "app"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/marketplace", password_file = "$work/db-password" }
storage = ["local"]
TOML
}
config signed "signing_key_file = \"$work/signing.key\"" > "$work/signed.toml"
config plain "" > "$work/plain.toml"
BACKSTOP_LOG=error "$bin" -c "$work/signed.toml" backup --job app >/dev/null
real=$(ls "$work/store/app")

echo "==> $n copies of backup $real, each signed with stock minisign"
python3 - "$work/store/app" "$real" "$n" <<'PY'
import json, os, shutil, sys, datetime
root, real, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = json.load(open(os.path.join(root, real, "manifest.json")))
start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
for i in range(n):
    t = start + datetime.timedelta(hours=i)
    bid = t.strftime("%Y-%m-%dT%H-%M-%SZ") + "-%04x" % i
    d = os.path.join(root, bid)
    os.makedirs(d)
    for a in m["artifacts"]:
        os.link(os.path.join(root, real, a["file"]), os.path.join(d, a["file"]))
    c = dict(m)
    c["backup_id"] = bid
    c["started_at"] = t.isoformat().replace("+00:00", "Z")
    c["finished_at"] = (t + datetime.timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    c["artifacts"] = [dict(a, key="app/%s/%s" % (bid, a["file"])) for a in m["artifacts"]]
    json.dump(c, open(os.path.join(d, "manifest.json"), "w"), indent=2)
PY
for d in "$work"/store/app/*/; do
  id=$(basename "$d")
  [ "$id" = "$real" ] && continue
  minisign -S -s "$work/signing.key" -m "$d/manifest.json" -x "$d/manifest.json.minisig" \
    -t "backstop object:app/$id/manifest.json" </dev/null >/dev/null
done
listed=$("$bin" -c "$work/signed.toml" list --job app --json 2>/dev/null | python3 -c 'import json,sys; l=json.load(sys.stdin); print(sum(1 for x in l if x.get("trusted")), len(l))')
echo "    listed with trusted_keys: $listed (trusted, all)"

echo "==> backstop list --job app: signed (A) vs no keys (B), $runs runs each"
BACKSTOP_LOG=error farm-bench -n "$runs" --timeout 900 \
  --vs "$bin -c $work/plain.toml list --job app" \
  -- "$bin" -c "$work/signed.toml" list --job app
