#!/usr/bin/env bash
# Headless Chromium for the test that opens a report as a person would (tests/report/): Debian's
# chromium-headless-shell, unpacked under .cache/chromium/ with the libraries this machine lacks
# (`apt-get download` + `dpkg -x`: no root needed, nothing installed system-wide). The tests find
# it through .cache/chromium/headless-shell, a launcher that sets the library path; one already on
# PATH (chromium-headless-shell, chromium) is used instead. Fast when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/chromium
LAUNCHER=$DEST/headless-shell
if [ -x "$LAUNCHER" ] && "$LAUNCHER" --version >/dev/null 2>&1; then
    exit 0
fi
for exe in chromium-headless-shell chromium; do
    if command -v "$exe" >/dev/null && "$exe" --headless --version >/dev/null 2>&1; then
        mkdir -p "$DEST"
        printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$exe")" >"$LAUNCHER"
        chmod +x "$LAUNCHER"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "setup_browser: no apt-get/dpkg (not a Debian-like system): install Chromium and put chromium-headless-shell on PATH" >&2
    exit 1
fi
missing() {  # the packages chromium-headless-shell needs that this machine does not have
    apt-get install -s --no-install-recommends chromium-headless-shell 2>/dev/null | awk '/^Inst/{print $2}'
}
PKGS=$(missing)
if [ -z "$PKGS" ]; then  # a fresh machine may have no package lists yet
    apt-get update -qq 2>/dev/null || true
    PKGS=$(missing)
fi
if [ -z "$PKGS" ]; then
    echo "setup_browser: apt cannot resolve chromium-headless-shell (no package lists, or no network to the Debian mirror)" >&2
    exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$DEST.tmp"' EXIT
(cd "$WORK" && apt-get download $PKGS >/dev/null 2>&1) || { echo "setup_browser: apt-get download failed for: $PKGS" >&2; exit 1; }
rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp/root"
for deb in "$WORK"/*.deb; do
    dpkg -x "$deb" "$DEST.tmp/root"
done
ROOT=$(cd "$DEST.tmp" && pwd)/root
FINAL=$(mkdir -p "$(dirname "$DEST")" && cd "$(dirname "$DEST")" && pwd)/$(basename "$DEST")/root
LIBS="$FINAL/usr/lib/x86_64-linux-gnu:$FINAL/usr/lib/x86_64-linux-gnu/pulseaudio:$FINAL/usr/lib/chromium"
[ -x "$ROOT/usr/lib/chromium/chromium-headless-shell" ] || { echo "setup_browser: the package holds no chromium-headless-shell" >&2; exit 1; }
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
    "$LIBS" "$FINAL/usr/lib/chromium/chromium-headless-shell" >"$DEST.tmp/headless-shell"
chmod +x "$DEST.tmp/headless-shell"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
"$LAUNCHER" --version
