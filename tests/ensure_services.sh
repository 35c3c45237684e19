#!/usr/bin/env bash
# Make sure the servers the integration tests talk to are up on loopback; start any that is down,
# and that the browser the report test uses is installed.
# (The S3 endpoint is moto's server, which the tests start themselves.)
set -euo pipefail

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
# RabbitMQ: an AMQP broker the Celery worker can use instead of Redis (tests/test_amqp_broker.py).
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! pg_up; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis_up; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

if ! rabbit_up && command -v rabbitmq-server >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
fi

# The report test renders report.html in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium; the report rendering test will fail" >&2
fi

# The reference CTC recognizer (bench/task_models.py) is trained on lines rendered with DejaVu fonts.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "installing fonts-dejavu-core"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null) \
    || echo "could not install fonts-dejavu-core; tests/test_reference_task_models.py will fail" >&2
fi

for _ in $(seq 1 30); do
  if pg_up && redis_up; then
    rabbit_up && echo "RabbitMQ is up" || echo "RabbitMQ is not up (yet); the AMQP broker test will wait for it" >&2
    echo "PostgreSQL and Redis are up"
    exit 0
  fi
  sleep 1
done
pg_up || echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2
redis_up || echo "Redis is not reachable on 127.0.0.1:6379" >&2
exit 1
