#!/usr/bin/env bash
# backstop demo on embedded defaults: installs what is missing, starts a
# throwaway PostgreSQL with the marketplace fixture, backs it up (encrypted,
# compressed) into a local directory, lists it, and prints how to restore it
# with stock tools. Everything lives in ./.demo; the PostgreSQL server is
# stopped when the script exits.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/scripts/install-deps.sh" demo

echo "==> building backstop"
cargo build --quiet --bin backstop
bin="$repo/target/debug/backstop"

demo="$repo/.demo"
rm -rf "$demo"
mkdir -p "$demo"
chmod 755 "$demo"

# shellcheck source=lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
echo "==> starting a throwaway PostgreSQL"
pg_up "$demo/pg"
echo "    listening on 127.0.0.1:$PG_PORT (stopped when this script exits)"
printf '%s\n' "$PG_PASSWORD" > "$demo/db-password"
chmod 600 "$demo/db-password"
pg_psql postgres -c "CREATE DATABASE marketplace"
pg_psql marketplace -f "$repo/tests/fixtures/marketplace.sql" >/dev/null

echo "==> generating an age key pair (the private key stays in .demo/age-identity.txt)"
age-keygen -o "$demo/age-identity.txt" 2>/dev/null
recipient=$(age-keygen -y "$demo/age-identity.txt")

echo "==> backstop keygen (this host signs every manifest; readers trust only signed backups)"
rm -f "$demo/signing.key" "$demo/signing.key.pub"
"$bin" keygen --out "$demo/signing.key" >/dev/null 2>&1

cat > "$demo/backstop.toml" <<TOML
[daemon]
catalog = "sqlite://$demo/catalog.db"
signing_key_file = "$demo/signing.key"

[storage.local]
type = "local"
path = "$demo/backups"

[encryption.default]
recipients = ["$recipient"]

[[job]]
name = "marketplace"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/marketplace", password_file = "$demo/db-password" }
schedule = "15 2 * * *"
timezone = "Europe/Berlin"
globals = true
storage = ["local"]
identity_file = "$demo/age-identity.txt"
verify = { schedule = "0 5 * * sun", level = "restore", target = "postgres://postgres@127.0.0.1:$PG_PORT/postgres", target_password_file = "$demo/db-password" }
TOML

export BACKSTOP_CONFIG="$demo/backstop.toml"
echo "==> backstop check-config"
"$bin" check-config
echo "==> backstop backup --job marketplace"
"$bin" backup --job marketplace
echo "==> backstop verify --job marketplace --level restore   (scratch database, compared with the manifest, dropped)"
"$bin" verify --job marketplace --level restore
echo "==> backstop restore --job marketplace --target …/restored --create-db"
"$bin" restore --job marketplace --target "postgres://postgres@127.0.0.1:$PG_PORT/restored" \
  --target-password-file "$demo/db-password" --create-db
echo "==> backstop verify --job marketplace --against-live"
"$bin" verify --job marketplace --against-live
echo "==> backstop list --job marketplace"
"$bin" list --job marketplace

id=$("$bin" list --job marketplace --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup_id"])' 2>/dev/null \
     || ls "$demo/backups/marketplace" | sort | tail -n1)
cat <<EOF

The backup is in $demo/backups/marketplace/$id/ (manifest.json, its signature
manifest.json.minisig, and the encrypted artifacts). Check the signature and
restore it with stock tools, no backstop needed:

  minisign -Vm $demo/backups/marketplace/$id/manifest.json -p $demo/signing.key.pub

  createdb -h HOST -U USER restored
  age -d -i $demo/age-identity.txt $demo/backups/marketplace/$id/database.dump.zst.age \\
    | zstd -d | pg_restore --no-owner -h HOST -U USER -d restored

Roles and tablespaces: age -d -i … globals.sql.zst.age | zstd -d | psql -h HOST -U USER -d postgres
(The demo server is stopped now; point HOST at any PostgreSQL you have.)
EOF
