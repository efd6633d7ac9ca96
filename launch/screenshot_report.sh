#!/usr/bin/env bash
# Screenshot of a report page with headless Chromium (Debian: apt-get install -y chromium).
#
#   launch/screenshot_report.sh WORKDIR/report/index.html OUT.png [WIDTH,HEIGHT]
#
# Shows what a person opening the page from the file system sees (relative links, no server). The
# flags keep Chromium off the network and away from any existing profile.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 INDEX_HTML OUT_PNG [WIDTH,HEIGHT]" >&2
  exit 2
fi
page="$(realpath "$1")"
out="$(realpath -m "$2")"
size="${3:-1400,2000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
  echo "error: no chromium found (Debian: apt-get install -y chromium)" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --disable-background-networking --disable-component-update --no-first-run --disable-sync \
  --disable-quic --user-data-dir="$profile" \
  --window-size="$size" --screenshot="$out" "file://$page" 2>/dev/null
echo "$out"
