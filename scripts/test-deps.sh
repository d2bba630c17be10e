#!/usr/bin/env bash
# System tools the test suite uses beyond the virtual environment, installed from Debian's
# packages when missing and we are root (idempotent):
# - a Compose implementation, to validate docker-compose.yml;
# - Chromium, which the browser tests (tests/browser.py) drive through Playwright
#   (executable_path=/usr/bin/chromium; Playwright's own browser download is never used).
set -u
missing=()
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  missing+=(docker-compose)
fi
if [ ! -x /usr/bin/chromium ]; then
  missing+=(chromium)
fi
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; } \
    || echo "could not install ${missing[*]}; the tests that need them will say so"
fi
exit 0
