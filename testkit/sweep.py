"""Remove what killed test runs left behind: `kpi_test_*` databases and the `kpi.test.*`
exchanges and durable queues.

Other runs may be going on at the same time on this machine, so only leftovers are taken:
a database created more than `--min-age-minutes` ago that nobody is connected to; a queue
without consumers, and an exchange, both already seen by a sweep at least that long ago
(RabbitMQ does not say when a queue was made, so the sweep keeps a note of what it saw in
`--state`). A test lasts minutes; an hour-old name with nobody on it is a leftover.

    python -m testkit.sweep [--min-age-minutes 60] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pika
from sqlalchemy import text

from shared.db import make_engine
from testkit.broker import amqp_url
from testkit.database import admin_url, drop_database

DATABASE_PREFIX = "kpi_test_"
EXCHANGE_PREFIX = "kpi.test."
STATE = Path("/tmp/kpi-test-sweep.json")

# Created more than `age` seconds ago (the PG_VERSION file is written by CREATE DATABASE and
# never again), with no connection.
_OLD_DATABASES = text(r"""
    SELECT d.datname FROM pg_database d
    WHERE d.datname LIKE 'kpi\_test\_%'
      AND (pg_stat_file('base/' || d.oid || '/PG_VERSION')).modification < now() - make_interval(secs => :age)
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)
    ORDER BY 1
""")


def old_databases(admin: str, min_age: float) -> list[str]:
    engine = make_engine(admin)
    try:
        with engine.connect() as conn:
            return list(conn.execute(_OLD_DATABASES, {"age": min_age}).scalars())
    finally:
        engine.dispose()


def _rabbitmqctl(*args: str) -> list[list[str]]:
    out = subprocess.run(["rabbitmqctl", "-q", *args, "--no-table-headers"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def test_topology() -> tuple[dict[str, int], set[str]]:
    """{queue: consumers} and the exchanges, of the test prefix."""
    queues = {row[0]: int(row[1]) for row in _rabbitmqctl("list_queues", "name", "consumers")
              if row[0].startswith(EXCHANGE_PREFIX)}
    exchanges = {row[0] for row in _rabbitmqctl("list_exchanges", "name") if row[0].startswith(EXCHANGE_PREFIX)}
    return queues, exchanges


def sweep(min_age: float, dry_run: bool, state: Path) -> tuple[list[str], list[str], list[str]]:
    now = time.time()
    databases = old_databases(admin_url("TEST_PG_ADMIN_URL"), min_age)

    queues, exchanges = test_topology()
    try:
        seen: dict[str, float] = json.loads(state.read_text())
    except (OSError, ValueError):
        seen = {}
    present = set(queues) | exchanges
    seen = {name: first for name, first in seen.items() if name in present}
    for name in present:
        seen.setdefault(name, now)
    old = {name for name, first in seen.items() if now - first >= min_age}
    idle_queues = sorted(q for q, consumers in queues.items() if q in old and consumers == 0)
    # An exchange goes with its queues: only when none of its queues is left or swept now.
    kept = set(queues) - set(idle_queues)
    idle_exchanges = sorted(e for e in exchanges if e in old and not any(q.startswith(e + ".") for q in kept))

    if not dry_run:
        for name in databases:
            drop_database(admin_url("TEST_PG_ADMIN_URL"), name)
        if idle_queues or idle_exchanges:
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url("TEST_AMQP_URL")))
            try:
                channel = connection.channel()
                for queue in idle_queues:
                    channel.queue_delete(queue, if_unused=True)
                for exchange in idle_exchanges:
                    channel.exchange_delete(exchange)
            finally:
                connection.close()
        for name in (*idle_queues, *idle_exchanges):
            seen.pop(name, None)
    try:
        state.write_text(json.dumps(seen))
    except OSError:
        pass
    return databases, idle_queues, idle_exchanges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-age-minutes", type=float, default=60)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--state", type=Path, default=STATE)
    args = parser.parse_args(argv)
    try:
        databases, queues, exchanges = sweep(args.min_age_minutes * 60, args.dry_run, args.state)
    except Exception as exc:  # a sweep that cannot run must not stop the tests
        print(f"sweep: skipped ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
              file=sys.stderr)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"sweep: {verb} {len(databases)} leftover test database(s), {len(queues)} queue(s), "
          f"{len(exchanges)} exchange(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
