#!/usr/bin/env bash
# The browser the web page tests drive (tests/ui): Chromium. Debian's package where it is
# missing (this project's machines are Debian, root, with the package registry reachable),
# else Playwright's own build (`playwright install`, which downloads from Playwright's
# CDN). PAGELLM_CHROMIUM names another binary and skips both.
set -euo pipefail
PY="${1:-python3}"
if [ -n "${PAGELLM_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1 \
    || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
      >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; then
    exit 0
  fi
fi
echo "install_browser: no system Chromium; trying playwright install chromium" >&2
"$PY" -m playwright install chromium
