#!/usr/bin/env bash
# Installs what backstop needs and this machine lacks: `install-deps.sh demo`
# only what the demo uses (the build, PostgreSQL, age, zstd), no argument or
# `test` also what the test suite uses (an S3 server, promtool, openssl, …).
# Idempotent and quick when everything is present. Debian/Ubuntu (apt).
set -euo pipefail

mode=${1:-test}
need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }

ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
have pg_dump || need_pkgs+=(postgresql-client)
have age || need_pkgs+=(age)
have zstd || need_pkgs+=(zstd)
have cc || need_pkgs+=(gcc)
# The build links Debian's zstd instead of compiling the bundled copy.
have pkg-config || need_pkgs+=(pkg-config)
pkg-config --exists libzstd 2>/dev/null || need_pkgs+=(libzstd-dev)
if [ "$mode" = test ]; then
  # The notification tests make a throwaway CA and check HMAC signatures with it.
  have openssl || need_pkgs+=(openssl)
  # systemd-analyze verifies the shipped unit file.
  have systemd-analyze || need_pkgs+=(systemd)
  # The full-disk fault test mounts a tmpfs in a mount namespace of its own.
  { have unshare && have nsenter; } || need_pkgs+=(util-linux)
  # promtool tests the shipped alert rules.
  have promtool || need_pkgs+=(prometheus)
  # The fleet tests put the PostgreSQL catalog behind a transaction pooler.
  { have pgbouncer || [ -x /usr/sbin/pgbouncer ]; } || need_pkgs+=(pgbouncer)
  # The status-page tests load the page in a headless browser.
  have chromium || need_pkgs+=(chromium)
  # Stock minisign verifies the manifests' signatures (and signs as an attacker).
  have minisign || need_pkgs+=(minisign)
fi

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

# The S3-compatible server the tests run on loopback (the demo uses a local
# store, so it skips this build of several minutes). Newer versions need a
# newer rustc than 1.95.
if [ "$mode" = test ] && ! have s3s-fs && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  echo "install-deps: installing s3s-fs 0.14.1 (cargo install, a few minutes)" >&2
  cargo install s3s-fs --version 0.14.1 --features binary --locked --quiet
fi

# kubernetes-validate checks the shipped Kubernetes manifests against the
# Kubernetes JSON schemas it bundles (no network at run time), rejecting
# unknown fields (tests/e2e/deploy.rs). Pinned: its schemas follow its version.
k8s_validate=1.37.0
if [ "$mode" = test ] &&
  [ "$(python3 -m kubernetes_validate --version 2>/dev/null)" != "$k8s_validate" ]; then
  echo "install-deps: installing kubernetes-validate $k8s_validate (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "kubernetes-validate==$k8s_validate"
fi
