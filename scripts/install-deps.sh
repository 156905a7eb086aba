#!/usr/bin/env bash
# Installs what backstop's demo and tests need and this machine lacks.
# Idempotent and quick when everything is present. Debian/Ubuntu (apt).
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
have pg_dump || need_pkgs+=(postgresql-client)
have age || need_pkgs+=(age)
have zstd || need_pkgs+=(zstd)
# The notification tests make a throwaway CA and check HMAC signatures with it.
have openssl || need_pkgs+=(openssl)
have cc || need_pkgs+=(gcc)
# systemd-analyze verifies the shipped unit file.
have systemd-analyze || need_pkgs+=(systemd)
# The full-disk fault test mounts a tmpfs in a mount namespace of its own.
{ have unshare && have nsenter; } || need_pkgs+=(util-linux)
# promtool tests the shipped alert rules.
have promtool || need_pkgs+=(prometheus)

if ((${#need_pkgs[@]})); then
  echo "install-deps: installing ${need_pkgs[*]}" >&2
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! have cargo; then
  echo "install-deps: cargo is missing; install Rust 1.95 (https://rustup.rs) first" >&2
  exit 1
fi

# The S3-compatible server the tests run on loopback. Newer versions need a
# newer rustc than 1.95.
if ! have s3s-fs && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  echo "install-deps: installing s3s-fs 0.14.1 (cargo install, a few minutes)" >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi
