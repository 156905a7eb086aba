#!/usr/bin/env bash
# Builds the Debian package of backstop from this checkout:
#
#   scripts/package.sh [OUT_DIR]      default target/debian
#
# writes OUT_DIR/backstop_VERSION_ARCH.deb (VERSION: 0.1.0+gitN.COMMIT-1,
# N the commit count, so a later build upgrades an earlier one; the stripped binary, the
# hardened systemd unit, /etc/backstop/backstop.toml as a conffile, man
# pages, shell completions, alert rules, dashboard, runbook, README) and
# OUT_DIR/backstop-dbgsym_VERSION_ARCH.ddeb (the symbols stripped from the
# binary, for profilers and debuggers: /usr/lib/debug/.build-id/…; install
# it with `dpkg -i` beside the package). It reuses the
# release build (`cargo build --release`, about 10 minutes cold on 2 cores;
# seconds when it is up to date) and installs cargo-deb if missing.
# Package metadata: [package.metadata.deb] in crates/backstop/Cargo.toml;
# maintainer scripts: packaging/debian/.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${1:-$repo/target/debian}
cargo_deb=3.8.0

have() { command -v "$1" >/dev/null 2>&1; }
if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != "$cargo_deb" ]; then
  echo "package: installing cargo-deb $cargo_deb (cargo install, a few minutes)" >&2
  cargo install cargo-deb --version "$cargo_deb" --locked --quiet
fi
# cargo-deb strips the binary and splits its symbols with binutils.
if ! have objcopy || ! have strip; then
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends binutils >/dev/null
fi

start=$SECONDS
# The binary this checkout built, by the path cargo reports: the copy at
# target/release/backstop can be another checkout's sharing the target
# folder (package-test builds the previous commit's there), and cargo does
# not copy it again when nothing needs building.
exe=$(cargo build --release --locked --bin backstop --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "backstop":
        print(m["executable"])')
echo "package: release build took $((SECONDS - start)) s" >&2
bin=${CARGO_TARGET_DIR:-$repo/target}/release/backstop
[ -n "$exe" ] || { echo "package: cargo named no backstop binary" >&2; exit 1; }
if ! cmp -s "$exe" "$bin"; then
  cp -f "$exe" "$bin"
fi

# What is generated from the binary and the repository's files, in one
# staging folder the package's assets point at.
stage=$repo/packaging/stage
rm -rf "$stage"
mkdir -p "$stage/man" "$stage/completions"
"$bin" manpages "$stage/man"
"$bin" completions bash > "$stage/completions/backstop"
"$bin" completions zsh > "$stage/completions/_backstop"
"$bin" completions fish > "$stage/completions/backstop.fish"
gzip -9n "$stage"/man/*.1

# The config: the example, with every table that needs a file or a server
# of the operator's own (encryption recipients, notifiers, jobs) commented
# out, so `backstop check-config` passes on a fresh install and the daemon
# starts with nothing to do.
awk '
  /^\[/ {
    off = ($0 ~ /^\[\[job\]\]/ || $0 ~ /^\[job\./ || $0 ~ /^\[encryption\./ || $0 ~ /^\[notify\./)
  }
  off && $0 !~ /^[[:space:]]*(#|$)/ { print "# " $0; next }
  { print }
' config/backstop.example.toml > "$stage/backstop.toml"
{
  echo
  echo "# Installed by the backstop package: uncomment a [[job]] above (and its"
  echo "# [encryption.default] recipients), then \`backstop check-config\` and"
  echo "# \`systemctl enable --now backstop\`."
} >> "$stage/backstop.toml"

# The unit: the binary in /usr/bin; credentials are the operator's to add
# (a LoadCredential whose file is missing stops the unit from starting), in
# a drop-in (`systemctl edit backstop`).
sed -e 's#/usr/local/bin/backstop#/usr/bin/backstop#g' \
  -e 's#^LoadCredential=#\#LoadCredential=#' \
  systemd/backstop.service > "$stage/backstop.service"

mkdir -p "$out"
rm -f "$out"/backstop_*.deb "$out"/backstop-dbgsym_*.ddeb
# cargo-deb strips the binary it packs (symbols and all).
# The Debian version grows with every commit (the crate's version, then the
# commit count and hash), so `apt install` of a newer build upgrades.
deb_version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)+git$(git rev-list --count HEAD).$(git rev-parse --short=12 HEAD)-1"
cargo deb -p backstop --no-build --locked --deb-version "$deb_version" --output "$out" >&2
deb=$(ls "$out"/backstop_*.deb)

# The symbols it stripped, for perf and gdb: the release binary's symbol
# table (the release profile keeps no debug info) in a -dbgsym package, at
# /usr/lib/debug/.build-id/XX/REST.debug, which tools find by the build id
# both binaries carry.
id=$(readelf -n "$bin" | sed -n 's/.*Build ID: \([0-9a-f]*\).*/\1/p')
[ -n "$id" ] || { echo "package: the binary has no build id" >&2; exit 1; }
version=$(dpkg-deb -f "$deb" Version)
arch=$(dpkg-deb -f "$deb" Architecture)
dbg=$stage/dbgsym
mkdir -p "$dbg/DEBIAN" "$dbg/usr/lib/debug/.build-id/${id:0:2}" "$dbg/usr/share/doc"
objcopy --only-keep-debug --compress-debug-sections=zlib "$bin" "$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
chmod 644 "$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
ln -s backstop "$dbg/usr/share/doc/backstop-dbgsym"
cat > "$dbg/DEBIAN/control" <<CONTROL
Package: backstop-dbgsym
Source: backstop
Version: $version
Architecture: $arch
Maintainer: $(dpkg-deb -f "$deb" Maintainer)
Priority: optional
Section: debug
Depends: backstop (= $version)
Installed-Size: $(du -sk "$dbg/usr" | cut -f1)
Build-Ids: $id
Description: debug symbols for backstop
CONTROL
dpkg-deb --root-owner-group -Zxz --build "$dbg" "$out/backstop-dbgsym_${version}_${arch}.ddeb" >/dev/null
ls -l "$out"/backstop_*.deb "$out"/backstop-dbgsym_*.ddeb
