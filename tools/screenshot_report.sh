#!/usr/bin/env bash
# Screenshot of a run's report page in headless Chromium, to see what a reader sees:
#   tools/screenshot_report.sh WORKDIR OUT.png
# Renders WORKDIR/report.html (run `python -m bigkd.report WORKDIR` first) at 1280x2400 px.
# Needs Debian's chromium (apt-get install -y chromium); no network, no profile left behind.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 WORKDIR OUT.png" >&2
  exit 2
fi
page="$(cd "$1" && pwd)/report.html"
out="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
[ -f "$page" ] || { echo "$0: no $page (run python -m bigkd.report $1 first)" >&2; exit 2; }
browser="${CHROMIUM:-chromium}"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1280,2400 \
  --screenshot="$out" "file://$page" >/dev/null 2>&1
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
