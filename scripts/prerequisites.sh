#!/usr/bin/env bash
# What the tests, the demo and CI need from the machine, checked up front so that a missing
# piece is the first line of output rather than a failure deep in a test.
#   prerequisites.sh          the tools: Python >= 3.11, PostgreSQL's and RabbitMQ's
#   prerequisites.sh --access the running services: postgres@127.0.0.1 without a password
set -euo pipefail

fail() { echo "prerequisite missing: $*" >&2; exit 2; }

if [ "${1:-}" = "--access" ]; then
    # The tests create and drop databases as postgres over TCP, without a password.
    out=$(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -Atc 'SELECT 1' 2>&1) || fail \
        "PostgreSQL must let postgres@127.0.0.1 in without a password; add to pg_hba.conf" \
        "'host all postgres 127.0.0.1/32 trust' and reload (psql said: $(echo "$out" | head -n1))"
    exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || fail "$python (Python >= 3.11; set PYTHON=/path/to/python3.11)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || fail "Python >= 3.11 ($python is $("$python" -V 2>&1 | head -n1); set PYTHON=/path/to/python3.11)"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "Python's venv and ensurepip for $python (Debian: apt-get install python3-venv)"
for tool in psql pg_isready pg_ctlcluster; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool (PostgreSQL's client and server tools; Debian: apt-get install postgresql)"
done
for tool in rabbitmq-server rabbitmqctl; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool (Debian: apt-get install rabbitmq-server)"
done
