#!/usr/bin/env bash
# Render a patchbay HTML report to a PNG with headless Chromium, to look at it as a reader would.
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH] [HEIGHT]
# Needs Debian's `chromium` package (apt-get install -y chromium). HEIGHT cuts the page
# (default 4000 px); pass a larger one to see more of it.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH] [HEIGHT]" >&2
    exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1280}
height=${4:-4000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "no chromium found: apt-get install -y chromium" >&2
    exit 2
fi
# A throwaway profile, no GPU and no sandbox (root in containers); the page needs no network.
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$out" "file://$report" 2>/dev/null
echo "$out"
