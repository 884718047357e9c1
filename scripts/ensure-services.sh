#!/usr/bin/env bash
# Makes sure the PostgreSQL and NATS the tests use are running, starting the machine's own
# if they are installed but stopped. Tests never mock them.
set -euo pipefail
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "==> starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
  pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432: install it (apt-get install -y postgresql) or set TEST_DATABASE_URL" >&2; exit 1; }
fi
if ! nats_up; then
  if command -v nats-server >/dev/null 2>&1; then
    echo "==> starting nats-server with JetStream"
    mkdir -p /var/lib/nats-server 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  fi
  for _ in $(seq 1 30); do nats_up && break; sleep 1; done
  nats_up || { echo "NATS is not reachable on 127.0.0.1:4222: install it (apt-get install -y nats-server)" >&2; exit 1; }
fi
