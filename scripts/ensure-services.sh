#!/usr/bin/env bash
# Start PostgreSQL, Redis and RabbitMQ on localhost if they are not answering (the test suite
# needs all three; RabbitMQ gets the vhost the broker matrix runs in, celery_recovery_test),
# install Debian's chromium for the browser tests (tests/browser) if /usr/bin/chromium is
# missing, and Debian's prometheus package for promtool (tests/integration/test_metrics.py)
# if /usr/bin/promtool is missing. Uses the machine's own service commands; does nothing when all are already there.
set -u

pg_up() { python3 - <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5432)) == 0 else 1)
PY
}
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; }
rabbit_up() { rabbitmqctl -q await_startup >/dev/null 2>&1 && python3 - <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5672)) == 0 else 1)
PY
}
RABBIT_VHOST="${RABBIT_VHOST:-celery_recovery_test}"

if ! pg_up; then
  echo "PostgreSQL is down; starting it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! redis_up; then
  echo "Redis is down; starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 1 30); do redis_up && break; sleep 1; done
fi
if ! rabbit_up; then
  echo "RabbitMQ is down; starting it"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do rabbit_up && break; sleep 1; done
fi
# The test matrix's vhost, and the benchmark's (make bench BROKER=rabbitmq)
for vhost in "$RABBIT_VHOST" celery_recovery_bench; do
  if rabbit_up && ! rabbitmqctl -q list_vhosts 2>/dev/null | grep -qx "$vhost"; then
    rabbitmqctl -q add_vhost "$vhost" >/dev/null
    rabbitmqctl -q set_permissions -p "$vhost" guest ".*" ".*" ".*" >/dev/null
  fi
done
if [ ! -x /usr/bin/chromium ]; then
  echo "Chromium is missing; installing Debian's chromium package for the browser tests"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || true
fi
if [ ! -x /usr/bin/promtool ]; then
  echo "promtool is missing; installing Debian's prometheus package for the metrics tests"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null || true
fi
pg_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
redis_up || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
rabbit_up || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
[ -x /usr/bin/chromium ] || { echo "Chromium is not installed at /usr/bin/chromium (apt-get install chromium)" >&2; exit 1; }
[ -x /usr/bin/promtool ] || { echo "promtool is not installed at /usr/bin/promtool (apt-get install prometheus)" >&2; exit 1; }
echo "services: PostgreSQL, Redis and RabbitMQ (vhost $RABBIT_VHOST) are up, Chromium and promtool are installed"
