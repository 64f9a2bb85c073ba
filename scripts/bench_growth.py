"""Benchmark: the pipeline on empty tables and with many rows already stored; dropping a
day; the database's size per million values.

    .venv/bin/python -m scripts.bench_growth [--rows 50000000] [--days 30] [--rounds 3]

One replica of the trigger_checker and of the event_detector run as real processes
against a database and an exchange of their own (scripts/bench_pipeline.py's seed:
5 metrics x 2 triggers, 5,000 pairs a metric).

1. Empty: a warm-up round (every pair gets its state), then `--rounds` rounds of 25,000
   values (measured from the first publish to the last trigger_states update), and the
   CPU time of the services and their PostgreSQL backends per 1000 values.
2. History: `--rows` rows put into metric_values and as many into trigger_checks, spread
   over the `--days` days before today, a day partition at a time, in SQL (generate_series
   into a table without keys, the keys built once by sorting, then attached as the day's
   partition: what a real load leaves, without taking a day to get there). The pipeline's
   own pairs are among them, with every 15 minutes of each day.
3. Full: `--rounds` more rounds, measured the same way; the ratio to 1.
4. Dropping the oldest day (both tables) as the retention upkeep does it, timed.
5. Size: bytes per million rows of each table (heap, indexes, TOAST) and per million
   values with their checks (this seed checks each value with 2 triggers).
6. Migration 0010 (partitioning an existing database) timed on a database of its own
   holding `--migration-rows` rows in each table.

The wall-clock figures move with the machine's other tenants; the CPU figures and the
ratios of two phases run minutes apart in one invocation move far less. Everything it
creates is removed at the end, failure or not.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, text

from alembic.script import ScriptDirectory

from scripts import bench_pipeline as pipeline
from shared import migrate, partitions
from shared.db import make_engine
from shared.events import METRIC_LOADED
from shared.rabbitmq import Bus
from testkit import broker
from testkit.database import admin_url, create_database, drop_database, migrated_database
from testkit.processes import ServiceProcess

SLOTS_PER_DAY = 96  # a load every 15 minutes
METRIC_COUNT = len(pipeline.METRICS)
TRIGGER_COUNT = 2 * METRIC_COUNT


def run_rounds(bus: Bus, engine: Engine, services: list[ServiceProcess], base: dict, first: int, rounds: int,
               timeout: float, database: str) -> dict[str, object]:
    """Rounds first .. first + rounds - 1, published back to back; values/s to the last
    state update, and CPU ms per 1000 values of each component."""
    all_keys = pipeline.keys()
    bodies = [pipeline.message(items, values, r) for r in range(first, first + rounds)
              for values in [pipeline.round_values(base, r)] for items in pipeline.chunks(all_keys, pipeline.BATCH)]
    components = {s.name: [s.pid] for s in services}
    components["postgres"] = pipeline.backend_pids(engine, database)
    cpu_before = {name: sum(map(pipeline.cpu_seconds, pids)) for name, pids in components.items()}
    started = time.time()
    for body in bodies:
        bus.publish_raw(METRIC_LOADED, body, type=METRIC_LOADED)
    last_round = first + rounds - 1
    pipeline.wait_for_round(engine, last_round, 2 * len(all_keys), services, timeout)
    with engine.connect() as conn:
        last = float(conn.execute(text("SELECT extract(epoch FROM max(updated_at)) FROM trigger_states")).scalar())
    values = len(all_keys) * rounds
    seconds = last - started
    cpu = {name: (sum(map(pipeline.cpu_seconds, pids)) - cpu_before[name]) * 1000 / (values / 1000)
           for name, pids in components.items()}
    return {"values": values, "seconds": seconds, "values_per_second": values / seconds,
            "cpu_ms_per_1000_values": cpu, "cpu_ms_total": sum(cpu.values())}


def fill_day(engine: Engine, table: str, day, rows: int) -> int:
    """`rows` rows of one day as the day's partition: a table filled without keys, the
    keys built by sorting, the range proven by a CHECK (so ATTACH does not scan again)."""
    name = partitions.partition_name(table, day)
    low, high = partitions.day_start(day), partitions.day_start(day + timedelta(days=1))
    per_slot = max(1, rows // SLOTS_PER_DAY)
    kinds = METRIC_COUNT if table == "metric_values" else TRIGGER_COUNT
    pairs = max(1, per_slot // kinds)
    # g -> (slot, kind, pair): pairs 0..4999 are the pipeline's own (offers 1-50 x affiliates 1-100).
    if table == "metric_values":
        kind = "(ARRAY['cr','pacc','gtr','clicks_zero_conv','cap_fill'])[1 + (g / :pairs) % 5]"
        columns = "metric_key, offer_id, affiliate_id, value, measured_at, received_at, event_id"
        select = (f"{kind}, 1 + (g % :pairs) / 100, 1 + (g % :pairs) % 100, (g % 1000) / 1000.0, "
                  f"CAST(:low AS timestamptz) + (g / (:pairs * 5)) * interval '15 minutes', now(), "
                  # a metric.loaded event id is a UUID: as many bytes as a real one
                  f"'00000000-0000-4000-8000-' || lpad((g / (:pairs * 5))::text, 12, '0')")
    else:
        kind = "(SELECT array_agg(id ORDER BY id) FROM triggers)[1 + (g / :pairs) % 10]"
        columns = "trigger_id, offer_id, affiliate_id, value, operator, threshold, status, measured_at, checked_at"
        select = (f"{kind}, 1 + (g % :pairs) / 100, 1 + (g % :pairs) % 100, (g % 1000) / 1000.0, 'lt', 0.1, "
                  f"CASE WHEN g % 1000 < 100 THEN 'PROBLEM' ELSE 'OK' END, "
                  f"CAST(:low AS timestamptz) + (g / (:pairs * 10)) * interval '15 minutes', now()")
    count = pairs * kinds * SLOTS_PER_DAY
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
        conn.execute(text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
        conn.execute(text(f"INSERT INTO {name} (id, {columns}) SELECT nextval('{table}_id_seq'), {select} "
                          f"FROM generate_series(0, :count - 1) g"),
                     {"pairs": pairs, "low": low, "count": count})
        unique = ("metric_key" if table == "metric_values" else "trigger_id") + ", offer_id, affiliate_id, measured_at"
        conn.execute(text(f"ALTER TABLE {name} ADD PRIMARY KEY (id, measured_at)"))
        conn.execute(text(f"ALTER TABLE {name} ADD UNIQUE ({unique})"))
        conn.execute(text(f"ALTER TABLE {name} ADD CONSTRAINT {name}_range "
                          f"CHECK (measured_at >= '{low.isoformat()}' AND measured_at < '{high.isoformat()}')"))
        conn.execute(text(f"ALTER TABLE {table} ATTACH PARTITION {name} "
                          f"FOR VALUES FROM ('{low.isoformat()}') TO ('{high.isoformat()}')"))
        conn.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_range"))
    return count


def fill(engine: Engine, rows: int, days: int, today) -> dict[str, int]:
    """`rows` rows in each table over the `days` days before yesterday (yesterday onwards
    are the pipeline's)."""
    per_day = rows // days
    filled = {}
    for table in partitions.PARTITIONED_TABLES:
        total = 0
        started = time.monotonic()
        for n in range(days):
            total += fill_day(engine, table, today - timedelta(days=days + 1 - n), per_day)
        # What autovacuum would long since have done to these days: left to it, it would
        # vacuum them during the measured rounds.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"VACUUM (ANALYZE) {table}"))
        filled[table] = total
        print(f"  {table}: {total:,} rows over {days} days in {time.monotonic() - started:.0f}s", flush=True)
    return filled


def table_bytes(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits i "
            "WHERE i.inhparent = to_regclass(:t)"), {"t": table}).scalar())


def count_rows(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar())


def drop_oldest_day(engine: Engine, today, days: int) -> dict[str, float]:
    oldest = today - timedelta(days=days + 1)
    with engine.connect() as conn:
        rows = {t: int(conn.execute(text(f"SELECT count(*) FROM {partitions.partition_name(t, oldest)}")).scalar())
                for t in partitions.PARTITIONED_TABLES}
    # A retention that ends exactly after the oldest day: the upkeep's own call.
    now = partitions.day_start(oldest + timedelta(days=1))
    started = time.monotonic()
    pruned = partitions.prune(engine, 1, now + timedelta(days=1))
    seconds = time.monotonic() - started
    assert pruned is not None and len(pruned.dropped) == 2, pruned
    return {"rows": sum(rows.values()), "seconds": seconds}


def time_migration(pg_admin: str, rows: int) -> dict[str, float]:
    """Migration 0010 on a database holding `rows` rows in each table (over the last 30
    days), timed: what an upgrade of an existing deployment costs."""
    name = f"kpi_growth_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(pg_admin, name)
    engine = make_engine(url)
    try:
        before = ScriptDirectory.from_config(migrate.alembic_config(url)).get_revision("0010").down_revision
        migrate.upgrade(url, before)
        pipeline.seed(engine)
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at, event_id) "
                "SELECT (ARRAY['cr','pacc','gtr','clicks_zero_conv','cap_fill'])[1 + g % 5], 1 + (g / 5) % 2000, "
                "1 + g / 10000, (g % 1000) / 1000.0, now() - (g % 2880) * interval '15 minutes', "
                "'00000000-0000-4000-8000-' || lpad((g % 2880)::text, 12, '0') FROM generate_series(0, :n - 1) g"),
                {"n": rows})
            conn.execute(text(
                "INSERT INTO trigger_checks (trigger_id, offer_id, affiliate_id, value, operator, threshold, status, "
                "measured_at) SELECT (SELECT min(id) FROM triggers) + g % 10, 1 + (g / 10) % 2000, 1 + g / 20000, "
                "0.5, 'lt', 0.1, 'OK', now() - (g % 2880) * interval '15 minutes' FROM generate_series(0, :n - 1) g"),
                {"n": rows})
        started = time.monotonic()
        migrate.upgrade(url, "0010")
        seconds = time.monotonic() - started
    finally:
        engine.dispose()
        drop_database(pg_admin, name)
    return {"rows_per_table": rows, "seconds": seconds, "seconds_per_million_rows": seconds / (2 * rows / 1e6)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000, help="rows put into each table before phase 3")
    parser.add_argument("--days", type=int, default=30, help="days (before yesterday) the rows are spread over")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of 25,000 values per phase")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for a phase")
    parser.add_argument("--migration-rows", type=int, default=1_000_000,
                        help="rows per table of the database migration 0010 is timed on (0: not timed)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = parser.parse_args()
    if args.days < 2:
        parser.error("--days must be at least 2")

    pg_admin = admin_url("BENCH_PG_ADMIN_URL")
    amqp_url = broker.amqp_url()
    suffix = uuid.uuid4().hex[:8]
    db_name, exchange = f"kpi_growth_{suffix}", f"kpi.growth.{suffix}"
    log_dir = Path(tempfile.mkdtemp(prefix="bench_growth_"))
    now = datetime.now(timezone.utc)
    today = now.date()
    # The pipeline's rounds are the last hours (in yesterday's or today's partition, made
    # by the migration), none in the future.
    pipeline.T0 = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2 * args.rounds + 2)
    rng = random.Random(1)
    base = {key: rng.random() for key in pipeline.keys()}
    services: list[ServiceProcess] = []
    engine: Engine | None = None
    bus: Bus | None = None
    results: dict[str, object] = {"machine": pipeline.machine(), "rows_per_table": args.rows, "days": args.days}
    try:
        database_url = migrated_database(pg_admin, db_name)
        engine = make_engine(database_url)
        pipeline.seed(engine)
        env = {"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "KPI_EXCHANGE": exchange,
               "KPI_LOG_LEVEL": "INFO", "KPI_RETENTION_DAYS": "0"}
        bus = Bus(amqp_url, exchange, name="bench_growth").connect()
        services = [ServiceProcess(name, env, log_dir, log_name=f"{name}.log").start(timeout=60)
                    for name in pipeline.SERVICES]
        run_rounds(bus, engine, services, base, 0, 1, args.timeout, db_name)  # warm-up: every pair's state
        results["empty"] = empty = run_rounds(bus, engine, services, base, 1, args.rounds, args.timeout, db_name)
        print(f"empty tables: {empty['values_per_second']:.0f} values/s, CPU {empty['cpu_ms_total']:.0f} ms "
              f"per 1000 values", flush=True)

        print(f"putting {args.rows:,} rows into each table over {args.days} days ...", flush=True)
        started = time.monotonic()
        results["filled"] = fill(engine, args.rows, args.days, today)
        results["fill_seconds"] = time.monotonic() - started

        # A blocking connection left idle through the fill has missed its heartbeats.
        bus.close()
        bus = Bus(amqp_url, exchange, name="bench_growth").connect()
        first = 1 + args.rounds
        results["full"] = full = run_rounds(bus, engine, services, base, first, args.rounds, args.timeout, db_name)
        ratio = full["values_per_second"] / empty["values_per_second"]
        cpu_ratio = full["cpu_ms_total"] / empty["cpu_ms_total"]
        results["ratio"], results["cpu_ratio"] = ratio, cpu_ratio
        print(f"with {args.rows:,} rows in each table: {full['values_per_second']:.0f} values/s "
              f"({ratio:.0%} of empty), CPU {full['cpu_ms_total']:.0f} ms per 1000 values ({cpu_ratio:.0%} of empty)",
              flush=True)
        for phase in ("empty", "full"):
            cpu = results[phase]["cpu_ms_per_1000_values"]  # type: ignore[index]
            print(f"  CPU per 1000 values, {phase}: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in cpu.items()))

        sizes = {}
        for table in partitions.PARTITIONED_TABLES:
            rows, size = count_rows(engine, table), table_bytes(engine, table)
            sizes[table] = {"rows": rows, "bytes": size, "bytes_per_million_rows": size / rows * 1e6}
        per_value = (sizes["metric_values"]["bytes_per_million_rows"]
                     + 2 * sizes["trigger_checks"]["bytes_per_million_rows"])
        results["sizes"], results["bytes_per_million_values_with_checks"] = sizes, per_value
        for table, s in sizes.items():
            print(f"size: {table} {s['rows']:,} rows, {s['bytes'] / 2**30:.2f} GiB = "
                  f"{s['bytes_per_million_rows'] / 2**20:.0f} MiB per million rows")
        print(f"size per million values with their 2 checks: {per_value / 2**20:.0f} MiB")

        results["drop_day"] = dropped = drop_oldest_day(engine, today, args.days)
        print(f"dropping the oldest day ({dropped['rows']:,} rows in the two tables): {dropped['seconds']:.2f}s",
              flush=True)
    except BaseException:
        for service in services:
            print(f"--- {service.name} log (tail) ---\n{service.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        cleanup = [service.terminate for service in services]
        cleanup += [bus.close] if bus is not None else []
        cleanup += [engine.dispose] if engine is not None else []
        cleanup += [lambda: broker.delete_topology_at(amqp_url, exchange), lambda: drop_database(pg_admin, db_name)]
        for step in cleanup:
            try:  # every step, even when one fails (the broker or the database may be down)
                step()
            except Exception as exc:
                print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.migration_rows:
        results["migration"] = m = time_migration(pg_admin, args.migration_rows)
        print(f"migration 0010 (partitioning) of {args.migration_rows:,} rows in each table: {m['seconds']:.1f}s "
              f"= {m['seconds_per_million_rows']:.1f}s per million rows", flush=True)
    print(f"machine: {results['machine']}")
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
