"""Benchmark of the operators' console: its pages with a million trigger checks.

Creates and migrates its own database, seeds a network's history (testkit/console_world.py:
by default 100 offers x 100 affiliates x 4 triggers x 25 rounds = 1,000,000 checks, plus
90 days of checks every 15 minutes for pair 1/1, with the states, state changes and
operation runs they imply), runs VACUUM ANALYZE as
autovacuum would, starts `kpi web` as a real process, and times N sequential requests per
page over one keep-alive HTTP connection (after a warm-up). Prints median, p95 and max
per page; the goal is under 200 ms for the problems page and a pair page.

    .venv/bin/python -m scripts.bench_console [--requests 50] [--offers 100 --affiliates 100 --rounds 25]

Drops its database and stops the console even when it fails (--keep-database keeps it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import text

from shared.db import make_engine
from testkit.console_world import seed_console_world
from testkit.database import admin_url, drop_database, migrated_database
from testkit.ports import free_port
from testkit.processes import ServiceProcess

USER, PASSWORD = "bench", uuid.uuid4().hex
BUDGET_MS = 200.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offers", type=int, default=100)
    parser.add_argument("--affiliates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=25, help="checks per (trigger, pair)")
    parser.add_argument("--long-history", type=int, default=8640,
                        help="checks per trigger of pair 1/1 (default: 90 days, one every 15 minutes)")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per page")
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args()

    name = f"kpi_bench_console_{uuid.uuid4().hex[:8]}"
    pg_admin = admin_url("TEST_PG_ADMIN_URL")
    url = None
    process = None
    try:
        url = migrated_database(pg_admin, name)
        engine = make_engine(url, isolation_level="AUTOCOMMIT")
        started = time.monotonic()
        with engine.begin() as conn:
            world = seed_console_world(conn, offers=args.offers, affiliates=args.affiliates, rounds=args.rounds,
                                       interval=timedelta(minutes=15), long_history=args.long_history)
        with engine.begin() as conn:
            # Silences and held rejects for their pages: 40 silences (half ended), 300 held runs.
            conn.execute(text(
                "INSERT INTO silences (trigger_id, offer_id, starts_at, ends_at, reason, created_by) "
                "SELECT 1 + i % 4, i, now() - interval '1 day', now() + (i - 20) * interval '1 hour', "
                "'maintenance window ' || i, 'ops' FROM generate_series(1, 40) i"))
            conn.execute(text(
                "UPDATE operation_runs SET status = 'held', detail = 'held: the hourly cap', finished_at = created_at "
                "WHERE id IN (SELECT id FROM operation_runs WHERE kind = 'reject_affiliate' ORDER BY id DESC LIMIT 300)"))
        seeded = time.monotonic() - started
        with engine.connect() as conn:
            conn.execute(text("VACUUM ANALYZE"))
            counts = {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                      for table in ("trigger_checks", "trigger_states", "trigger_events", "operation_runs",
                                    "load_runs")}
            problems = conn.execute(text("SELECT count(*) FROM trigger_states WHERE status = 'PROBLEM'")).scalar_one()
            # Of the pairs with a recent history, the one with the most state changes.
            offer_id, affiliate_id, changes = conn.execute(text(
                "SELECT offer_id, affiliate_id, count(*) FROM trigger_events WHERE (offer_id, affiliate_id) <> (1, 1) "
                "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 1"
            )).one()
            size = conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar_one()
        engine.dispose()
        print(f"database {name}: {size}, seeded in {seeded:.1f} s")
        print("  " + ", ".join(f"{table} {n:,}" for table, n in counts.items()) + f"; {problems:,} pairs in PROBLEM")
        print(f"  {world.offers} offers x {world.affiliates} affiliates x 4 triggers x {world.rounds} rounds; "
              f"pair 1/1: {args.long_history} checks per trigger")

        port = free_port()
        env = {"DATABASE_URL": url, "KPI_WEB_USER": USER, "KPI_WEB_PASSWORD": PASSWORD, "KPI_LOG_LEVEL": "WARNING"}
        process = ServiceProcess("console", env, Path(tempfile.mkdtemp(prefix="kpi-bench-console-")),
                                 module="shared.cli", args=["web", "--port", str(port)]).start(wait_ready=False)
        base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, auth=(USER, PASSWORD), timeout=30)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get("/static/console.css")
                break
            except httpx.TransportError:
                if not process.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the console did not start: {process.log()[-2000:]}")
                time.sleep(0.1)

        pages = [
            ("problems", "/"),
            ("problems, one trigger", "/?trigger=1"),
            ("problems, offer name filter", "/?offer=casino"),
            ("problems, page 10", "/?page=10"),
            ("problems JSON", "/api/problems"),
            (f"pair {offer_id}/{affiliate_id} ({changes} changes)", f"/pairs/{offer_id}/{affiliate_id}"),
            ("pair JSON", f"/api/pairs/{offer_id}/{affiliate_id}"),
            (f"pair 1/1 ({args.long_history} checks/trigger)", "/pairs/1/1"),
            ("pair 1/1 JSON", "/api/pairs/1/1"),
            ("pair 1/1, checks page 100", "/pairs/1/1?trigger=1&checks_page=100"),
            ("loads", "/loads"),
            ("silences (20 in force)", "/silences"),
            ("held rejects (300)", "/held"),
            ("held rejects JSON", "/api/held"),
        ]
        print(f"\n{args.requests} requests per page after 5 warm-up requests, one keep-alive connection:\n")
        print(f"{'page':42} {'median':>9} {'p95':>9} {'max':>9} {'bytes':>9}")
        slow = []
        for label, path in pages:
            for _ in range(5):
                client.get(path).raise_for_status()
            times = []
            for _ in range(args.requests):
                started = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            times.sort()
            p95 = times[min(len(times) - 1, int(round(0.95 * len(times))) - 1)]
            median = statistics.median(times)
            print(f"{label:42} {median:7.1f}ms {p95:7.1f}ms {times[-1]:7.1f}ms {len(response.content):9,}")
            if p95 > BUDGET_MS:
                slow.append(label)
        client.close()
        print(f"\n{'every page under' if not slow else 'OVER'} {BUDGET_MS:.0f} ms at p95"
              + (f": {', '.join(slow)}" if slow else ""))
        return 1 if slow else 0
    finally:
        if process is not None:
            process.terminate(10)
        if args.keep_database:
            print(f"kept database {name}: {url}")
        else:
            drop_database(pg_admin, name)


if __name__ == "__main__":
    sys.exit(main())
