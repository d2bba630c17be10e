#!/usr/bin/env bash
# System tools the test suite uses beyond the virtual environment: a Compose implementation to
# validate docker-compose.yml. Installed from Debian's packages when missing and we are root.
set -u
if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq docker-compose >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq docker-compose >/dev/null 2>&1; } \
    || echo "could not install docker-compose; the compose test will say so"
fi
exit 0
