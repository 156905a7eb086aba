#!/usr/bin/env bash
# backstop demo on embedded defaults: installs what is missing, starts a
# throwaway PostgreSQL with the marketplace fixture, backs it up (encrypted,
# compressed) into a local directory, lists it, and prints how to restore it
# with stock tools. Everything lives in ./.demo; the PostgreSQL server is
# stopped when the script exits.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh"

echo "==> building backstop"
cargo build --quiet --bin backstop
bin="$repo/target/debug/backstop"

demo="$repo/.demo"
rm -rf "$demo"
mkdir -p "$demo"
chmod 755 "$demo"

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
run_pg=()
if [ "$(id -u)" -eq 0 ]; then
  # PostgreSQL refuses to run as root.
  pguser=postgres
  id "$pguser" >/dev/null 2>&1 || pguser=nobody
  run_pg=(runuser -u "$pguser" --)
fi

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 54329)
mkdir -p "$demo/pg"
[ ${#run_pg[@]} -eq 0 ] || chown "$pguser" "$demo/pg"
password="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$password" > "$demo/db-password"
chmod 600 "$demo/db-password"
cp "$demo/db-password" "$demo/pg/.pwfile"
[ ${#run_pg[@]} -eq 0 ] || chown "$pguser" "$demo/pg/.pwfile"

echo "==> starting a throwaway PostgreSQL on 127.0.0.1:$port"
"${run_pg[@]}" "$pgbin/initdb" -D "$demo/pg/data" -U postgres --pwfile="$demo/pg/.pwfile" \
  --auth-host=scram-sha-256 --auth-local=trust >/dev/null
stop_pg() { "${run_pg[@]}" "$pgbin/pg_ctl" -D "$demo/pg/data" -m fast stop >/dev/null 2>&1 || true; }
trap stop_pg EXIT
"${run_pg[@]}" "$pgbin/pg_ctl" -D "$demo/pg/data" -l "$demo/pg/server.log" -w \
  -o "-p $port -k $demo/pg -c listen_addresses=127.0.0.1" start >/dev/null

export PGPASSWORD="$password"
psql -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE marketplace"
psql -q -h 127.0.0.1 -p "$port" -U postgres -d marketplace -f "$repo/tests/fixtures/marketplace.sql" >/dev/null
unset PGPASSWORD

echo "==> generating an age key pair (the private key stays in .demo/age-identity.txt)"
age-keygen -o "$demo/age-identity.txt" 2>/dev/null
recipient=$(age-keygen -y "$demo/age-identity.txt")

cat > "$demo/backstop.toml" <<TOML
[daemon]
catalog = "sqlite://$demo/catalog.db"

[storage.local]
type = "local"
path = "$demo/backups"

[encryption.default]
recipients = ["$recipient"]

[[job]]
name = "marketplace"
database = { url = "postgres://postgres@127.0.0.1:$port/marketplace", password_file = "$demo/db-password" }
schedule = "15 2 * * *"
timezone = "Europe/Berlin"
globals = true
storage = ["local"]
TOML

export BACKSTOP_CONFIG="$demo/backstop.toml"
echo "==> backstop check-config"
"$bin" check-config
echo "==> backstop backup --job marketplace"
"$bin" backup --job marketplace
echo "==> backstop list --job marketplace"
"$bin" list --job marketplace

id=$("$bin" list --job marketplace --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup_id"])' 2>/dev/null \
     || ls "$demo/backups/marketplace" | sort | tail -n1)
cat <<EOF

The backup is in $demo/backups/marketplace/$id/ (manifest.json + encrypted artifacts).
Restore it with stock tools, no backstop needed:

  createdb -h HOST -U USER restored
  age -d -i $demo/age-identity.txt $demo/backups/marketplace/$id/database.dump.zst.age \\
    | zstd -d | pg_restore --no-owner -h HOST -U USER -d restored

Roles and tablespaces: age -d -i … globals.sql.zst.age | zstd -d | psql -h HOST -U USER -d postgres
(The demo server is stopped now; point HOST at any PostgreSQL you have.)
EOF
