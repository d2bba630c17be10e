#!/usr/bin/env bash
# Make sure Redis and PostgreSQL answer on their usual local ports, starting them if they are
# installed but stopped. Prints what it found; exits 0 either way (the tests decide whether a
# missing service is a skip or, under CI=true, a failure).
set -u
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 6379; then
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || true
  fi
fi
if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start \
      >/dev/null 2>&1 || true
  fi
fi
for i in $(seq 1 30); do
  port_open 6379 && port_open 5432 && break
  sleep 0.5
done
port_open 6379 && echo "redis: 127.0.0.1:6379 up" || echo "redis: not available"
port_open 5432 && echo "postgres: 127.0.0.1:5432 up" || echo "postgres: not available"
exit 0
