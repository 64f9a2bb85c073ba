#!/usr/bin/env bash
# Start RabbitMQ and PostgreSQL on this machine if they are not running, and wait for them.
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL did not start" >&2; exit 1; }

rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbit_up; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
fi
for _ in $(seq 90); do rabbit_up && break; sleep 1; done
rabbit_up || { echo "RabbitMQ did not start" >&2; exit 1; }
# The port opens before the broker accepts work; wait until it answers.
timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
