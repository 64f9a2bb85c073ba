"""Benchmark: metric values through trigger_checker and event_detector, end to end.

    .venv/bin/python -m scripts.bench_pipeline [--rounds 4] [--latency-seconds 20] [--relay-messages 5000]

One replica of each service runs as a real process (`python -m services.X`) against its
own database (created and migrated here) and its own exchange, with every guarantee on:
persistent messages, publisher confirms, commits before acks, synchronous_commit on.
Seeded: 5 metrics x 2 active triggers (general thresholds that put roughly 10% and 5%
of the pairs in PROBLEM) and a few thresholds of every other scope.

1. Throughput: `--rounds` rounds of every (metric, offer, affiliate) value (50 offers x
   100 affiliates x 5 metrics = 25,000 values a round, each pair drifting a little from
   round to round so that some states change and events are emitted), as metric.loaded
   messages of 1000 items, published back to back. Measured from the first publish to
   the last trigger_states update (trigger_states.updated_at = clock_timestamp()).
2. Latency: one more round at a steady `--rate` values/s (batches of 100 every 100 ms)
   for `--latency-seconds`; per state row, publish -> updated_at of the state.
   updated_at is taken inside the event_detector's transaction, just before its commit.
3. Peak RSS (VmHWM) of both services, read before they stop, and the CPU time that the
   services and their PostgreSQL backends spent per 1000 values in phase 1 (a figure
   that the machine's other tenants inflate far less than the wall clock).
4. The bare 4-hop pika relay (scripts/pika_relay.py) in the same invocation, as the
   machine's baseline at this moment: the ratio is values/s per relay message/s.

Everything it creates (database, exchange, queues, processes) is removed at the end,
failure or not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, text

from scripts.pika_relay import run_relay
from shared.db import make_engine
from shared.events import METRIC_LOADED, encode, new_event
from shared.rabbitmq import Bus
from testkit import broker
from testkit.database import admin_url, drop_database, migrated_database
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for

METRICS = ("cr", "pacc", "gtr", "clicks_zero_conv", "cap_fill")
OFFERS = range(1, 51)
AFFILIATES = range(1, 101)
BATCH = 1000
LATENCY_BATCH = 100
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SERVICES = ("trigger_checker", "event_detector")


# -- set-up --------------------------------------------------------------------------------


def seed(engine: Engine) -> None:
    """Two triggers per metric with general thresholds, and one threshold of every other scope."""
    with engine.begin() as conn:
        for metric in METRICS:
            conn.execute(text(
                "INSERT INTO triggers (name, metric_key, operator, threshold) VALUES "
                "(:low, :m, 'lt', 0.1), (:high, :m, 'gt', 0.95)"
            ), dict(low=f"{metric} low", high=f"{metric} high", m=metric))
        conn.execute(text("INSERT INTO offers (id, name) SELECT o, 'offer ' || o FROM generate_series(1, 50) o"))
        conn.execute(text("INSERT INTO offer_categories (offer_id, category_id) "
                          "SELECT o, 1 + o % 5 FROM generate_series(1, 50) o"))
        conn.execute(text("""
            INSERT INTO trigger_thresholds (trigger_id, scope, category_id, offer_id, affiliate_id, value)
            SELECT t.id, v.scope, v.category_id, v.offer_id, v.affiliate_id, v.value
            FROM (VALUES ('cr low', 'offer_category', 1, NULL, NULL, 0.2),
                         ('cr low', 'offer_category', 2, NULL, NULL, 0.15),
                         ('pacc high', 'offer', NULL, 7, NULL, 0.9),
                         ('gtr low', 'affiliate', NULL, NULL, 3, 0.3),
                         ('cap_fill high', 'offer_affiliate', NULL, 10, 10, 0.5))
                 AS v(name, scope, category_id, offer_id, affiliate_id, value)
            JOIN triggers t ON t.name = v.name
        """))


# -- load ----------------------------------------------------------------------------------


Key = tuple[str, int, int]  # metric_key, offer_id, affiliate_id


def keys() -> list[Key]:
    return [(m, o, a) for m in METRICS for o in OFFERS for a in AFFILIATES]


def round_values(base: dict[Key, float], round_: int) -> dict[Key, float]:
    """Each pair's base value give or take 0.05: pairs near a threshold flip now and then."""
    rng = random.Random(round_)
    return {key: value + rng.uniform(-0.05, 0.05) for key, value in base.items()}


def message(items: list[Key], values: dict[Key, float], round_: int) -> bytes:
    measured_at = (T0 + timedelta(hours=round_)).isoformat()
    return encode(new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": m, "offer_id": o, "affiliate_id": a, "value": values[m, o, a], "measured_at": measured_at}
        for m, o, a in items
    ]}, correlation_id=f"bench-round-{round_}"))


def chunks(items: list[Key], size: int) -> list[list[Key]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# -- processes -----------------------------------------------------------------------------


def peak_rss_mb(service: ServiceProcess) -> float:
    for line in Path(f"/proc/{service.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_pids(engine: Engine, database: str) -> list[int]:
    """The PostgreSQL backends serving the services (same machine: their CPU is readable)."""
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
        ), dict(d=database)).scalars())


def states_at(engine: Engine, round_: int) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM trigger_states WHERE measured_at = :m"),
                            dict(m=T0 + timedelta(hours=round_))).scalar_one()


def wait_for_round(engine: Engine, round_: int, expected: int, services: list[ServiceProcess], timeout: float
                   ) -> None:
    def done() -> bool:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} died:\n{service.log()[-3000:]}")
        return states_at(engine, round_) >= expected
    wait_for(done, timeout, 0.2, f"{expected} states of round {round_}")


# -- phases --------------------------------------------------------------------------------


def throughput(bus: Bus, engine: Engine, services: list[ServiceProcess], base: dict[Key, float], rounds: int,
               timeout: float, database: str) -> dict[str, float]:
    all_keys = keys()
    bodies = [message(items, values, r) for r in range(rounds)
              for values in [round_values(base, r)] for items in chunks(all_keys, BATCH)]
    # CPU seconds per component, which the machine's other tenants do not inflate much:
    # the services and their PostgreSQL backends (the broker is shared, so it is left out).
    components = {s.name: [s.pid] for s in services}
    components["postgres"] = backend_pids(engine, database)
    cpu_before = {name: sum(map(cpu_seconds, pids)) for name, pids in components.items()}
    started = time.time()
    for body in bodies:
        bus.publish_raw(METRIC_LOADED, body, type=METRIC_LOADED)
    published = time.time()
    wait_for_round(engine, rounds - 1, 2 * len(all_keys), services, timeout)
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT extract(epoch FROM max(updated_at)), (SELECT count(*) FROM trigger_checks), "
            "(SELECT count(*) FROM trigger_events) FROM trigger_states"
        )).one()
    last, checks, events = float(row[0]), row[1], row[2]
    values = len(all_keys) * rounds
    seconds = last - started
    cpu_ms = {name: (sum(map(cpu_seconds, pids)) - cpu_before[name]) * 1000 / (values / 1000)
              for name, pids in components.items()}
    return {"values": values, "checks": checks, "events": events, "seconds": seconds,
            "publish_seconds": published - started, "values_per_second": values / seconds,
            "checks_per_second": checks / seconds, "messages_per_second": len(bodies) / seconds,
            "cpu_ms_per_1000_values": cpu_ms}


def latency(bus: Bus, engine: Engine, services: list[ServiceProcess], base: dict[Key, float], round_: int, rate: int,
            seconds: float) -> dict[str, float]:
    batches = chunks(keys(), LATENCY_BATCH)[:int(seconds * rate / LATENCY_BATCH)]
    values = round_values(base, round_)
    bodies = [message(items, values, round_) for items in batches]
    interval = LATENCY_BATCH / rate
    published_at: dict[Key, float] = {}
    start = time.monotonic()
    for index, (items, body) in enumerate(zip(batches, bodies)):
        delay = start + index * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.time()
        bus.publish_raw(METRIC_LOADED, body, type=METRIC_LOADED)
        for key in items:
            published_at[key] = sent
    wait_for_round(engine, round_, 2 * len(published_at), services, 120)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.metric_key, s.offer_id, s.affiliate_id, extract(epoch FROM s.updated_at) "
            "FROM trigger_states s JOIN triggers t ON t.id = s.trigger_id WHERE s.measured_at = :m"
        ), dict(m=T0 + timedelta(hours=round_))).all()
    latencies = sorted(float(updated) - published_at[(m, o, a)] for m, o, a, updated in rows)
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"values": len(published_at), "states": len(latencies), "p50": pick(0.50), "p95": pick(0.95),
            "p99": pick(0.99), "max": latencies[-1], "mean": statistics.fmean(latencies)}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
    return f"{os.cpu_count()} cores ({model}), {mem_kb / 1024 / 1024:.1f} GiB RAM"


# -- main ----------------------------------------------------------------------------------



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="throughput rounds of 25,000 values")
    parser.add_argument("--rate", type=int, default=1000, help="values/s of the latency phase")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--relay-messages", type=int, default=5000)
    parser.add_argument("--prefetch", type=int, default=None, help="KPI_PREFETCH for both services")
    parser.add_argument("--timeout", type=float, default=100.0, help="seconds allowed for the throughput phase")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = parser.parse_args()

    pg_admin = admin_url("BENCH_PG_ADMIN_URL")
    amqp_url = broker.amqp_url()
    suffix = uuid.uuid4().hex[:8]
    db_name, exchange = f"kpi_bench_{suffix}", f"kpi.bench.{suffix}"
    log_dir = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    rng = random.Random(1)
    base = {key: rng.random() for key in keys()}
    services: list[ServiceProcess] = []
    engine: Engine | None = None
    bus: Bus | None = None
    results: dict[str, object] = {"machine": machine()}
    try:
        database_url = migrated_database(pg_admin, db_name)
        engine = make_engine(database_url)
        seed(engine)
        env = {"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "KPI_EXCHANGE": exchange,
               "KPI_LOG_LEVEL": "INFO"}
        if args.prefetch is not None:
            env["KPI_PREFETCH"] = str(args.prefetch)
        bus = Bus(amqp_url, exchange, name="bench_pipeline").connect()
        services = [ServiceProcess(name, env, log_dir, log_name=f"{name}.log").start(timeout=30) for name in SERVICES]

        results["throughput"] = t = throughput(bus, engine, services, base, args.rounds, args.timeout, db_name)
        print(f"throughput: {t['values']} values, {t['checks']} checks, {t['events']} events in "
              f"{t['seconds']:.2f}s (published in {t['publish_seconds']:.2f}s) = {t['values_per_second']:.0f} "
              f"values/s, {t['checks_per_second']:.0f} checks/s, {t['messages_per_second']:.1f} metric.loaded/s",
              flush=True)
        cpu = t["cpu_ms_per_1000_values"]
        print("CPU per 1000 values: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in cpu.items())
              + f"; total {sum(cpu.values()):.0f} ms (broker not counted)", flush=True)
        results["latency"] = lat = latency(bus, engine, services, base, args.rounds, args.rate,
                                           args.latency_seconds)
        print(f"latency at {args.rate} values/s ({lat['values']} values, {lat['states']} states): "
              f"p50 {lat['p50'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, p99 {lat['p99'] * 1000:.0f} ms, "
              f"max {lat['max'] * 1000:.0f} ms", flush=True)
        results["peak_rss_mb"] = rss = {s.name: peak_rss_mb(s) for s in services}
        print("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()), flush=True)
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

    results["relay"] = relay = run_relay(amqp_url, args.relay_messages)
    ratio = t["values_per_second"] / relay["messages_per_second"]
    results["values_per_relay_message"] = ratio
    print(f"bare 4-hop pika relay: {relay['messages_per_second']:.0f} msg/s; pipeline / relay = {ratio:.2f} "
          f"values per relay message ({t['messages_per_second'] / relay['messages_per_second']:.3f} "
          f"metric.loaded messages per relay message)")
    print(f"machine: {results['machine']}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
