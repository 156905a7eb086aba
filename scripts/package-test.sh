#!/usr/bin/env bash
# The Debian package, installed for real on this machine (root; CI runs it
# from scripts/test.sh when CI=true): builds the previous commit's package
# and this one's, then
#   1. installs the previous one (or, when the previous commit has no
#      package, this one), edits /etc/backstop/backstop.toml as an operator
#      would (a job, its password file) and makes a backup as the backstop
#      user into /var/lib/backstop;
#   2. installs this one over it and checks every file's path, owner and
#      mode, the conffile, `systemd-analyze verify` on the installed unit,
#      `backstop --version`, `check-config` as the backstop user, that the
#      edited config was kept, that the catalog was migrated and still lists
#      the backup, and that it restores; then a new backup; and the drop-in
#      `backstop ip-allow` writes (systemd-analyze takes it, exposure 1.1
#      or less);
#   3. `dpkg -r`: the binary goes, the config and /var/lib/backstop stay;
#      `dpkg -P`: the config goes, /var/lib/backstop (catalog, backups) and
#      files put in /etc/backstop by hand stay;
#   4. scripts/systemd-test.sh: this package in a Debian container booted
#      with systemd as PID 1 (started, a backup through the API, reloaded,
#      stopped); its image is cached in /var/cache/backstop-systemd-test.
# Prints how long each step took. Refuses to run where backstop is already
# installed or has its folders; leaves the package purged and both folders
# removed.
#
#   scripts/package-test.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
[ "$(id -u)" -eq 0 ] || { echo "package-test: needs root (dpkg -i)" >&2; exit 2; }
# It installs the package for real: never on a host with backstop's own.
dropin_dir=/etc/systemd/system/backstop.service.d
for p in /etc/backstop /var/lib/backstop "$dropin_dir"; do
  if [ -e "$p" ] || dpkg -s backstop >/dev/null 2>&1; then
    echo "package-test: $p or the backstop package is already on this machine; this test installs, upgrades and purges the package for real and removes both folders after: run it on a throwaway machine (CI)" >&2
    exit 2
  fi
done
t0=$SECONDS
step() { echo "==> package-test ($((SECONDS - t0)) s): $*" >&2; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
# mode owner group of a path
stat_is() {
  local got
  got=$(stat -c '%a %U %G' "$1") || fail "$1 is missing"
  [ "$got" = "$2" ] || fail "$1 is '$got', want '$2'"
}

# The previous commit is built in this checkout (checked out in place, then
# back): a second checkout sharing the target folder would be taken for
# this one by cargo (same crates, same paths relative to the workspace) and
# one of the two binaries would be the other's. So: a clean tree only, and
# this script runs from a copy (git replaces it while it runs).
if [ -z "${BACKSTOP_PACKAGE_TEST_COPY:-}" ]; then
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "package-test: the checkout has uncommitted changes; it checks out the previous commit in place, so commit or stash them first" >&2
    exit 2
  fi
  copy=$(mktemp /tmp/backstop-package-test-XXXXXX.sh)
  cp "$0" "$copy"
  BACKSTOP_PACKAGE_TEST_COPY=$copy exec bash "$copy" "$repo"
fi
rm -f "$BACKSTOP_PACKAGE_TEST_COPY"
repo=${1:?}
cd "$repo"
orig=$(git symbolic-ref -q --short HEAD || git rev-parse HEAD)
head=$(git rev-parse --short=12 HEAD)
work=$(mktemp -d /tmp/backstop-package-XXXXXX)
chmod 755 "$work"
# shellcheck source=lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
# The container image for the run under a real systemd (the last step),
# made while the packages build: its own process group, from a copy of the
# script (the checkout changes meanwhile), cached for the next run.
systemd_root=/var/cache/backstop-systemd-test/bookworm-2
mkdir -p "$(dirname "$systemd_root")"
cp "$repo/scripts/systemd-test.sh" "$work/systemd-test.sh"
setsid -w bash "$work/systemd-test.sh" prepare "$systemd_root" >"$work/prepare.log" 2>&1 &
prepare=$!
cleanup() {
  [ -z "$prepare" ] || kill -TERM -- "-$prepare" 2>/dev/null || true
  pg_down
  [ "$(git -C "$repo" rev-parse --short=12 HEAD)" = "$head" ] || git -C "$repo" checkout -q "$orig"
  dpkg -P backstop-dbgsym backstop >/dev/null 2>&1 || true
  # All three were absent at the start (checked above).
  rm -rf "$work" /etc/backstop /var/lib/backstop "$dropin_dir"
}
trap cleanup EXIT

# The packages: this commit's, then the previous commit's (checked out in
# place: only the crates that changed are built again).
step "building this commit's package ($head)"
scripts/package.sh "$work/deb-new"
new_deb=$(ls "$work"/deb-new/backstop_*.deb)
dbgsym=$(ls "$work"/deb-new/backstop-dbgsym_*.*deb)
echo "package: $(stat -c %s "$new_deb") bytes ($new_deb); symbols: $(stat -c %s "$dbgsym") bytes" >&2
prev_deb=
prev=
if git rev-parse -q --verify HEAD~1 >/dev/null &&
  git cat-file -e HEAD~1:scripts/package.sh 2>/dev/null; then
  prev=$(git rev-parse --short=12 HEAD~1)
  step "building the previous commit's package ($prev)"
  git checkout -q --detach HEAD~1
  scripts/package.sh "$work/deb-prev"
  git checkout -q "$orig"
  prev_deb=$(ls "$work"/deb-prev/backstop_*.deb)
else
  # The first packaged commit (or a clone without history): say so loudly.
  step "NO UPGRADE FROM THE PREVIOUS COMMIT: HEAD~1 has no scripts/package.sh (or is not in this clone); installing this package over itself"
fi

dpkg -P backstop >/dev/null 2>&1 || true
first=${prev_deb:-$new_deb}
step "installing $(basename "$first")"
dpkg -i "$first" >/dev/null
getent passwd backstop >/dev/null || fail "no backstop user"
stat_is /var/lib/backstop "700 backstop backstop"
case "$(/usr/bin/backstop --version)" in
  *"(commit ${prev:-$head}, "*) ;;
  *) fail "the first package's binary says '$(/usr/bin/backstop --version)', not commit ${prev:-$head}" ;;
esac
# The config as installed passes check-config, as the service reads it.
runuser -u backstop -- /usr/bin/backstop --config /etc/backstop/backstop.toml check-config >/dev/null ||
  fail "check-config fails on the installed config"

# A throwaway server with a small database, as the backstop user sees it.
pg_up "$work/pg"
trap cleanup EXIT
pg_shop
install -d -m 0750 -o root -g backstop /etc/backstop/secrets
install -m 0640 -o root -g backstop /dev/null /etc/backstop/secrets/db-password
printf '%s\n' "$PG_PASSWORD" > /etc/backstop/secrets/db-password
# The operator's edit: a job.
cat >> /etc/backstop/backstop.toml <<TOML

# Added on this host (the upgrade must keep it).
[[job]]
name = "shop"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/shop", password_file = "/etc/backstop/secrets/db-password" }
storage = ["local"]
encryption = "none"
TOML
edited=$(sha256sum /etc/backstop/backstop.toml)
as_backstop() { runuser -u backstop -- /usr/bin/backstop --config /etc/backstop/backstop.toml "$@"; }
step "a backup as the backstop user"
as_backstop backup --job shop >/dev/null
before=$(as_backstop list --job shop --json)
echo "$before" | grep -q '"backup_id"' || fail "no backup listed: $before"
first_id=$(echo "$before" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup_id"])')

step "upgrading to $(basename "$new_deb")"
# No terminal: dpkg keeps the edited config and puts a changed shipped one
# beside it (.dpkg-dist) instead of asking.
dpkg -i --force-confdef --force-confold "$new_deb" </dev/null >/dev/null
dpkg -i "$dbgsym" >/dev/null
if ! cmp -s <(dpkg-deb --fsys-tarfile "$first" | tar -xO ./etc/backstop/backstop.toml) \
  <(dpkg-deb --fsys-tarfile "$new_deb" | tar -xO ./etc/backstop/backstop.toml); then
  [ -e /etc/backstop/backstop.toml.dpkg-dist ] || fail "the shipped config changed and no .dpkg-dist was left"
fi

step "checking the installed files"
# Every file the package holds, at its path with its owner and mode (the
# config and its folder as postinst sets them).
files=0
while read -r want owner path; do
  path=${path#.}
  # cargo-deb writes some entries with numeric ids.
  [ "$owner" != 0/0 ] || owner=root/root
  case "$path" in
    /etc/backstop/backstop.toml) stat_is "$path" "640 root backstop" ;;
    */) ;;
    *) stat_is "$path" "$want ${owner%/*} ${owner#*/}" ;;
  esac
  files=$((files + 1))
done < <(dpkg-deb -c "$new_deb" |
  awk '{ m = 0; for (i = 2; i <= 10; i++) m = m * 2 + (substr($1, i, 1) != "-"); printf "%o %s %s\n", m, $2, $6 }')
echo "package: $files entries checked" >&2
[ "$files" -ge 40 ] || fail "only $files entries in the package"
stat_is /etc/backstop "750 root backstop"
stat_is /var/lib/backstop "700 backstop backstop"
for f in /usr/bin/backstop /lib/systemd/system/backstop.service /usr/share/man/man1/backstop.1.gz \
  /usr/share/man/man1/backstop-restore.1.gz /usr/share/bash-completion/completions/backstop \
  /usr/share/backstop/prometheus/backstop-alerts.yml /usr/share/doc/backstop/README.md; do
  [ -e "$f" ] || fail "$f is missing"
done
# The symbols, where tools look for them by build id.
id=$(readelf -n /usr/bin/backstop | sed -n 's/.*Build ID: \([0-9a-f]*\).*/\1/p')
[ -s "/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug" ] || fail "no symbols for build id $id"
dpkg-query --control-show backstop conffiles | grep -qx ' */etc/backstop/backstop.toml.*' ||
  dpkg-query --control-show backstop conffiles | grep -q '/etc/backstop/backstop.toml' ||
  fail "/etc/backstop/backstop.toml is not a conffile"
sections=$(readelf -S --wide /usr/bin/backstop)
if grep -q '\.debug_\|\.symtab' <<<"$sections"; then
  fail "the installed binary is not stripped"
fi
verify=$(systemd-analyze verify /lib/systemd/system/backstop.service 2>&1) || fail "systemd-analyze verify: $verify"
if grep -q 'backstop.service:' <<<"$verify"; then
  fail "systemd-analyze verify: $verify"
fi
exposure=$(systemd-analyze security --offline=yes --no-pager /lib/systemd/system/backstop.service |
  sed -n 's/.*Overall exposure level for backstop.service: \([0-9.]*\).*/\1/p')
echo "package: the installed unit's exposure (systemd-analyze security): $exposure" >&2
python3 -c "import sys; sys.exit(0 if float('$exposure') <= 1.2 else 1)" || fail "exposure $exposure > 1.2"
version=$(/usr/bin/backstop --version)
case "$version" in
  "backstop "*"(commit $head, built "*) ;;
  *) fail "--version says '$version'" ;;
esac
[ "$(sha256sum /etc/backstop/backstop.toml)" = "$edited" ] || fail "the edited config was not kept"

step "the ip-allow drop-in"
# Written by root from the installed config, where an operator puts it;
# systemd reads it with the installed unit.
/usr/bin/backstop --config /etc/backstop/backstop.toml ip-allow --output "$dropin_dir/ip-allow.conf" 2>/dev/null ||
  fail "backstop ip-allow failed on the installed config"
grep -qx 'IPAddressDeny=any' "$dropin_dir/ip-allow.conf" && grep -qx 'IPAddressAllow=localhost' "$dropin_dir/ip-allow.conf" ||
  fail "the drop-in lacks IPAddressDeny=any or loopback: $(cat "$dropin_dir/ip-allow.conf")"
stat_is "$dropin_dir/ip-allow.conf" "644 root root"
verify=$(systemd-analyze verify /lib/systemd/system/backstop.service 2>&1) || fail "systemd-analyze verify with the drop-in: $verify"
if grep -q 'backstop.service:\|ip-allow.conf:' <<<"$verify"; then
  fail "systemd-analyze verify with the drop-in: $verify"
fi
report=$(systemd-analyze security --offline=yes --no-pager /lib/systemd/system/backstop.service)
grep -q 'IP address allow list with' <<<"$report" || fail "systemd did not read the drop-in: $report"
exposure=$(sed -n 's/.*Overall exposure level for backstop.service: \([0-9.]*\).*/\1/p' <<<"$report")
echo "package: exposure with the ip-allow drop-in: $exposure" >&2
python3 -c "import sys; sys.exit(0 if float('$exposure') <= 1.1 else 1)" || fail "exposure with the drop-in $exposure > 1.1"
rm -r "$dropin_dir"

step "the catalog migrated, the backup listed and restorable"
as_backstop check-config >/dev/null
as_backstop list --job shop --json | grep -q "\"$first_id\"" || fail "backup $first_id is no longer listed"
as_backstop status --json | python3 -c '
import json, sys
jobs = {j["job"]: j for j in json.load(sys.stdin)["jobs"]}
assert jobs["shop"]["last_success_at"], jobs
' || fail "status lost the backup made before the upgrade"
as_backstop restore --job shop --backup "$first_id" \
  --target "postgres://postgres@127.0.0.1:$PG_PORT/shop_restored" \
  --target-password-file /etc/backstop/secrets/db-password --create-db >/dev/null
[ "$(pg_psql shop_restored -Atc 'SELECT count(*) FROM "Sales"."Orders"')" = 5000 ] ||
  fail "the restored database lacks rows"
as_backstop backup --job shop >/dev/null
after=$(as_backstop list --job shop --json)
[ "$(echo "$after" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 2 ] ||
  fail "the backup after the upgrade is not listed: $after"

# list, status and restore opened the catalog: the new binary migrated it.
as_backstop migrate | grep -q "(current): nothing to do" || fail "the catalog was not migrated by the new binary"

step "dpkg -r keeps the config and the data"
dpkg -r backstop-dbgsym backstop >/dev/null
[ ! -e /usr/bin/backstop ] || fail "/usr/bin/backstop is still there"
[ "$(sha256sum /etc/backstop/backstop.toml)" = "$edited" ] || fail "remove changed the config"
[ -s /var/lib/backstop/catalog.db ] || fail "remove lost the catalog"
step "dpkg -P removes the config, never the data"
dpkg -P backstop-dbgsym backstop >/dev/null
[ ! -e /etc/backstop/backstop.toml ] || fail "purge kept the config"
! dpkg-statoverride --list /etc/backstop/backstop.toml >/dev/null || fail "purge left the config's statoverride"
[ -e /etc/backstop/secrets/db-password ] || fail "purge removed a file put there by hand"
[ -s /var/lib/backstop/catalog.db ] || fail "purge lost the catalog"
[ "$(find /var/lib/backstop/backups/shop -name manifest.json | wc -l)" = 2 ] || fail "purge lost the backups"
# 4. The package under a real systemd (PID 1 of a container).
step "under systemd: booting a container with the package (scripts/systemd-test.sh)"
wait "$prepare" || fail "preparing the container image failed: $(tail -5 "$work/prepare.log")"
prepare=
"$repo/scripts/systemd-test.sh" run "$new_deb" "$systemd_root"
step "passed"
