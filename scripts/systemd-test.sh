#!/usr/bin/env bash
# The package under a real systemd (PID 1 of a Debian container booted with
# systemd-nspawn, sharing this machine's network): what `systemd-analyze`
# cannot show. Installs the .deb in a fresh copy of the container, gives the
# service a job on a throwaway PostgreSQL on this machine, its password and
# API token as credentials (LoadCredential=), and the ip-allow drop-in, then
#   - `systemctl enable --now backstop` reaches "active" (Type=notify: only
#     after READY=1), with the status text the daemon sends;
#   - a backup asked for through the run API succeeds under the hardened
#     unit, into /var/lib/backstop, owned by backstop, and the metrics say so;
#   - `systemctl reload` (SIGHUP) keeps it running and reloads the config;
#   - `systemctl stop` ends it cleanly (Result=success, no restart), with
#     its journal in JSON.
# scripts/package-test.sh runs it with the package it built (CI). Root only.
#
#   scripts/systemd-test.sh prepare ROOT   debootstrap the container into ROOT
#                                          (once; quick when it is there)
#   scripts/systemd-test.sh run DEB ROOT   the test, on a copy of ROOT
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "systemd-test: needs root (systemd-nspawn)" >&2; exit 2; }
t0=$SECONDS
step() { echo "==> systemd-test ($((SECONDS - t0)) s): $*" >&2; }
fail() { echo "systemd-test: FAILED: $*" >&2; exit 1; }

need_tools() {
  command -v systemd-nspawn >/dev/null && command -v debootstrap >/dev/null && return 0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-container debootstrap >/dev/null
}

# The Debian mirror this machine's apt uses (the same registry).
mirror() {
  local m
  m=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  [ -n "$m" ] || m=$(sed -n 's/^deb \(http[^ ]*\) bookworm .*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)
  echo "${m:-http://deb.debian.org/debian}"
}

prepare() {
  local root=$1
  [ -e "$root/.complete" ] && return 0
  need_tools
  # An interrupted debootstrap may have left its mounts in the image.
  { findmnt -rn -o TARGET | grep -F "$root/" || true; } | sort -r | xargs -r umount -l
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  # What the package depends on is in the image, so dpkg -i needs no
  # network inside the container.
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,postgresql-client,passwd,procps,zstd,age \
    bookworm "$root" "$(mirror)" >"$root.log" 2>&1 || fail "debootstrap (see $root.log)"
  touch "$root/.complete"
}

case "${1:-}" in
  prepare)
    prepare "${2:?ROOT}"
    exit 0
    ;;
  run) deb=$(realpath "${2:?DEB}") root=${3:?ROOT} ;;
  *) echo "usage: $0 prepare ROOT | run DEB ROOT" >&2; exit 2 ;;
esac

step "preparing the container image"
prepare "$root"
work=$(mktemp -d /tmp/backstop-systemd-XXXXXX)
chmod 755 "$work"
nspawn=
pid=
# shellcheck source=lib/throwaway-pg.sh
. "$repo/scripts/lib/throwaway-pg.sh"
cleanup() {
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
    kill -TERM "$nspawn" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$nspawn" 2>/dev/null || true
    # The container's systemd outlives a killed nspawn.
    [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
  fi
  pg_down
  rm -rf "$work"
}
trap cleanup EXIT

pg_up "$work/pg"
trap cleanup EXIT
pg_shop
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
token="tok-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
install -m 0644 "$deb" "$work/backstop.deb"

step "booting the container (systemd as PID 1)"
# A throwaway copy of the image (--ephemeral), this machine's network (the
# database and the listener on loopback), no registration with a host
# systemd (there may be none).
systemd-nspawn -q -D "$root" --ephemeral --register=no --keep-unit --boot --console=pipe \
  --bind-ro="$work/backstop.deb:/root/backstop.deb" >"$work/console.log" 2>&1 &
nspawn=$!
for _ in $(seq 1 100); do
  pid=$(pgrep -P "$nspawn" -x systemd || true)
  [ -n "$pid" ] && break
  kill -0 "$nspawn" 2>/dev/null || fail "systemd-nspawn ended: $(cat "$work/console.log")"
  sleep 0.2
done
[ -n "$pid" ] || fail "no systemd in the container: $(cat "$work/console.log")"
in_ct() { nsenter -t "$pid" -a -- env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
# Until its systemd answers on its bus, then until it has booted.
state=
for _ in $(seq 1 120); do
  state=$(timeout 60 nsenter -t "$pid" -a -- systemctl is-system-running --wait 2>&1 || true)
  case "$state" in
    running | degraded) break ;;
  esac
  sleep 0.5
done
case "$state" in
  running | degraded) ;;
  *) fail "the container did not boot: '$state' $(cat "$work/console.log")" ;;
esac
[ "$(in_ct cat /proc/1/comm)" = systemd ] || fail "PID 1 of the container is not systemd"

step "installing the package in it"
in_ct dpkg -i /root/backstop.deb >/dev/null || fail "dpkg -i in the container"
in_ct install -d -m 0750 -o root -g backstop /etc/backstop/secrets
# Secrets through stdin, never in an argument.
printf '%s\n' "$PG_PASSWORD" | in_ct sh -c 'umask 027; cat > /etc/backstop/secrets/db-password'
printf '%s\n' "$token" | in_ct sh -c 'umask 027; cat > /etc/backstop/secrets/api-token'
in_ct chgrp backstop /etc/backstop/secrets/db-password /etc/backstop/secrets/api-token
# As README "Install" says: the secrets as credentials, in a drop-in.
in_ct sh -c "mkdir -p /etc/systemd/system/backstop.service.d && cat > /etc/systemd/system/backstop.service.d/credentials.conf" <<'EOF'
[Service]
LoadCredential=db-password:/etc/backstop/secrets/db-password
LoadCredential=api-token:/etc/backstop/secrets/api-token
EOF
# The operator's edits: the listener on a free port, the API token and a
# job, both secrets read as credentials (the unit's LoadCredential= lines
# name exactly these files).
in_ct sh -c "cat > /tmp/edit.sed" <<EOF
s|^listen = .*|listen = "127.0.0.1:$port"|
s|^# api_token_file = .*|api_token_file = "/run/credentials/backstop.service/api-token"|
EOF
in_ct sed -i -f /tmp/edit.sed /etc/backstop/backstop.toml
in_ct sh -c "cat >> /etc/backstop/backstop.toml" <<EOF

[[job]]
name = "shop"
database = { url = "postgres://postgres@127.0.0.1:$PG_PORT/shop", password_file = "/run/credentials/backstop.service/db-password" }
storage = ["local"]
encryption = "none"
schedule = "0 3 * * *"
catch_up = false
EOF
in_ct grep -q "^listen = \"127.0.0.1:$port\"" /etc/backstop/backstop.toml || fail "the listener was not set"
in_ct grep -q '^api_token_file = ' /etc/backstop/backstop.toml || fail "the API token was not set"
said=$(in_ct backstop ip-allow --output /etc/systemd/system/backstop.service.d/ip-allow.conf 2>&1) ||
  fail "backstop ip-allow in the container: $said"

step "systemctl enable --now backstop"
in_ct systemctl daemon-reload
started=$SECONDS
in_ct systemctl enable --now backstop >/dev/null 2>&1 ||
  fail "the service did not start: $(in_ct systemctl status --no-pager backstop 2>&1; in_ct journalctl -u backstop --no-pager 2>&1 | tail -20)"
[ "$(in_ct systemctl is-active backstop)" = active ] || fail "not active after start"
echo "systemd-test: active $((SECONDS - started)) s after start (READY=1)" >&2
show() { in_ct systemctl show backstop -p "$1" --value; }
[ "$(show Type)" = notify ] || fail "Type is $(show Type)"
[ -n "$(show StatusText)" ] || fail "no STATUS= text from the daemon"
grep -q /etc/systemd/system/backstop.service.d/ip-allow.conf <<<"$(show DropInPaths)" ||
  fail "the ip-allow drop-in is not loaded: $(show DropInPaths)"
[ "$(in_ct stat -c %U /proc/"$(show MainPID)")" = backstop ] || fail "the daemon does not run as backstop"
echo "systemd-test: status: $(show StatusText)" >&2

step "a backup through the run API, under the hardened unit"
api() { API_TOKEN=$token python3 - "$port" "$@"; }
run_id=$(api POST /api/v1/jobs/shop/run <<'PY'
import json, os, sys, urllib.request
port, method, path = sys.argv[1:4]
token = os.environ["API_TOKEN"]
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                             headers={"Authorization": f"Bearer {token}"})
print(json.load(urllib.request.urlopen(req, timeout=10))["run_id"])
PY
) || fail "POST /api/v1/jobs/shop/run"
final=
for _ in $(seq 1 120); do
  final=$(api GET "/api/v1/runs/$run_id" <<'PY'
import json, os, sys, urllib.request
port, method, path = sys.argv[1:4]
token = os.environ["API_TOKEN"]
req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                             headers={"Authorization": f"Bearer {token}"})
run = json.load(urllib.request.urlopen(req, timeout=10))
print(run["state"] if run["state"] in ("queued", "running") else json.dumps(run))
PY
  ) || fail "GET /api/v1/runs/$run_id"
  case "$final" in queued | running) sleep 0.5 ;; *) break ;; esac
done
case "$final" in
  *'"state": "success"'* | *'"state":"success"'*) ;;
  *) fail "the backup did not succeed: $final $(in_ct journalctl -u backstop --no-pager | tail -20)" ;;
esac
manifest=$(in_ct sh -c 'ls /var/lib/backstop/backups/shop/*/manifest.json 2>/dev/null | head -n1' || true)
[ -n "$manifest" ] || fail "no manifest in /var/lib/backstop"
[ "$(in_ct stat -c '%U %a' "$manifest")" = "backstop 600" ] || fail "$manifest is $(in_ct stat -c '%U %a' "$manifest")"
metrics=$(python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=10).read().decode())")
grep -q '^backstop_job_last_success_timestamp_seconds{job="shop",kind="backup"} [1-9]' <<<"$metrics" ||
  fail "the metrics do not show the backup"

step "systemctl reload, then stop"
in_ct systemctl reload backstop
reloaded=
for _ in $(seq 1 40); do
  if grep -q 'Configuration reloaded' <<<"$(in_ct journalctl -u backstop --no-pager -o cat)"; then
    reloaded=1
    break
  fi
  sleep 0.25
done
[ -n "$reloaded" ] || fail "the reload is not in the journal"
[ "$(in_ct systemctl is-active backstop)" = active ] || fail "not active after reload"
in_ct systemctl stop backstop
[ "$(show Result)" = success ] || fail "stopped with Result=$(show Result)"
[ "$(show NRestarts)" = 0 ] || fail "restarted $(show NRestarts) time(s)"
# The journal holds the daemon's JSON lines (--log-format json), no secret.
journal=$(in_ct journalctl -u backstop --no-pager -o cat)
grep -q '^{.*"level"' <<<"$journal" || fail "no JSON log lines in the journal"
if grep -qF -f <(printf '%s\n' "$PG_PASSWORD" "$token") <<<"$journal"; then fail "a secret is in the journal"; fi
# Whether this machine's systemd can enforce IPAddressDeny= (cgroup v2 and
# BPF; a cgroup v1 host cannot): said, not required.
if grep -qi 'bpf.*not supported\|firewall.*not supported\|cgroupsv1' <<<"$(in_ct journalctl -b --no-pager -o cat)"; then
  echo "systemd-test: this machine's systemd cannot enforce IPAddressDeny= (cgroup v1 or no BPF): the drop-in loaded, its filter not exercised" >&2
fi
step "passed"
