"""Benchmark: the services end to end on three workloads, against a relay run in the same invocation.

    .venv/bin/python -m scripts.bench_pipeline [--profile] [--json] [--skip actions] ...

Every service runs as a real process (`python -m services.X`, one replica each) against
its own database (created and migrated here) and its own exchange, with every guarantee
on: persistent messages, publisher confirms, commits before acks, synchronous_commit on.

1. steady: 5 metrics x 2 active triggers (general thresholds that put roughly 10% and 5%
   of the pairs in PROBLEM) and a few thresholds of every other scope. `--rounds` rounds
   of every (metric, offer, affiliate) value (50 offers x 100 affiliates x 5 metrics =
   25,000 values a round, each pair drifting a little from round to round so that some
   states change and events are emitted), as metric.loaded messages of 1000 items,
   published back to back; from the first publish to the last trigger_states update
   (updated_at = clock_timestamp(), inside the event_detector's transaction). Then one
   more round at a steady `--rate` values/s (batches of 100 every 100 ms) for
   `--latency-seconds`: per state row, publish -> updated_at.
2. first load: a new network, 100,000 values over 100,000 new pairs (2 metrics x 100
   offers x 500 affiliates, one trigger each, `lt 0.5` on uniform values): every check
   creates its pair's state, about half open a PROBLEM (an event each).
3. actions: `scripts/bench_actions.py`: email runs and HasOffers runs per second of one
   action_runner, exactly once.
4. The bare 4-hop pika relay (scripts/pika_relay.py) as the machine's baseline at this
   moment: every rate is also given per relay message/s.

For each workload: the CPU time that each service and its PostgreSQL backends spent per
1000 values (per run for the actions; a figure that the machine's other tenants inflate
far less than the wall clock), and each service's peak RSS (VmHWM). With `--profile` the
services run under cProfile (KPI_PROFILE, shared/profiling.py) and the functions that
took their CPU are printed per service; the profiler inflates every CPU figure of that
run, so measure without it.

Everything it creates (databases, exchanges, queues, processes) is removed at the end,
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, text

from scripts.pika_relay import run_relay
from shared.db import make_engine
from shared.events import METRIC_LOADED, encode, new_event
from shared.profiling import top_functions
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
FIRST_LOAD_METRICS = ("cr", "pacc")
FIRST_LOAD_OFFERS = range(1, 101)
FIRST_LOAD_AFFILIATES = range(1, 501)


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


def seed_first_load(engine: Engine) -> None:
    """A new network: one trigger per metric that about half of uniform values breach."""
    with engine.begin() as conn:
        for metric in FIRST_LOAD_METRICS:
            conn.execute(text("INSERT INTO triggers (name, metric_key, operator, threshold) VALUES "
                              "(:name, :m, 'lt', 0.5)"), dict(name=f"{metric} under half", m=metric))


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
    """The PostgreSQL backends serving the services (same machine: their CPU is readable),
    the benchmark's own connection left out."""
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
        ), dict(d=database)).scalars())


class CpuMeter:
    """CPU seconds of the services and of their database's backends since it was made.

    The broker is shared with the machine's other tenants, so it is left out. A backend
    that connects meanwhile counts whole; one that ends meanwhile is lost (rare)."""

    def __init__(self, engine: Engine, database: str, services: list[ServiceProcess]):
        self.engine, self.database, self.services = engine, database, services
        self.before = self._snapshot()

    def _snapshot(self) -> dict[tuple[str, int], float]:
        pids = [(s.name, s.pid) for s in self.services]
        pids += [("postgres", pid) for pid in backend_pids(self.engine, self.database)]
        return {key: cpu_seconds(key[1]) for key in pids}

    def ms_per(self, units: float) -> dict[str, float]:
        """CPU milliseconds per unit (1000 values, or one run) by component."""
        spent: dict[str, float] = {}
        for key, seconds in self._snapshot().items():
            spent[key[0]] = spent.get(key[0], 0.0) + seconds - self.before.get(key, 0.0)
        return {name: ms * 1000 / units for name, ms in spent.items()}


def states_at(engine: Engine, measured_at: datetime) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM trigger_states WHERE measured_at = :m"),
                            dict(m=measured_at)).scalar_one()


def wait_for_states(engine: Engine, measured_at: datetime, expected: int, services: list[ServiceProcess],
                    timeout: float) -> None:
    def done() -> bool:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} died:\n{service.log()[-3000:]}")
        return states_at(engine, measured_at) >= expected
    wait_for(done, timeout, 0.2, f"{expected} states measured at {measured_at.isoformat()}")


def wait_for_round(engine: Engine, round_: int, expected: int, services: list[ServiceProcess], timeout: float
                   ) -> None:
    wait_for_states(engine, T0 + timedelta(hours=round_), expected, services, timeout)


@dataclass
class Stack:
    """A database, an exchange and the two pipeline services, for one workload."""

    name: str
    engine: Engine
    bus: Bus
    services: list[ServiceProcess]

    def meter(self) -> CpuMeter:
        return CpuMeter(self.engine, self.name, self.services)

    def peak_rss_mb(self) -> dict[str, float]:
        return {s.name: peak_rss_mb(s) for s in self.services}


@contextmanager
def pipeline(label: str, seed_with: Callable[[Engine], None], prefetch: int | None,
             profile_dir: Path | None) -> Iterator[Stack]:
    pg_admin = admin_url("BENCH_PG_ADMIN_URL")
    amqp_url = broker.amqp_url()
    suffix = uuid.uuid4().hex[:8]
    db_name, exchange = f"kpi_bench_{suffix}", f"kpi.bench.{suffix}"
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench_{label}_"))
    services: list[ServiceProcess] = []
    engine: Engine | None = None
    bus: Bus | None = None
    try:
        database_url = migrated_database(pg_admin, db_name)
        engine = make_engine(database_url)
        seed_with(engine)
        env = {"DATABASE_URL": database_url, "AMQP_URL": amqp_url, "KPI_EXCHANGE": exchange,
               "KPI_LOG_LEVEL": "INFO", "KPI_RETENTION_DAYS": "0"}  # fixed dates: keep every row
        if prefetch is not None:
            env["KPI_PREFETCH"] = str(prefetch)
        if profile_dir is not None:
            env["KPI_PROFILE"] = str(profile_dir / label)
        # No heartbeats: the benchmark waits on the database for minutes without touching this connection.
        bus = Bus(amqp_url, exchange, name="bench_pipeline", heartbeat=0).connect()
        services = [ServiceProcess(name, env, log_dir, log_name=f"{name}.log").start(timeout=30)
                    for name in SERVICES]
        yield Stack(db_name, engine, bus, services)
    except BaseException:
        for service in services:
            print(f"--- {service.name} log (tail) ---\n{service.log()[-3000:]}", file=sys.stderr)
        raise
    finally:
        cleanup = [service.terminate for service in services]  # SIGTERM: profiles are written
        cleanup += [bus.close] if bus is not None else []
        cleanup += [engine.dispose] if engine is not None else []
        cleanup += [lambda: broker.delete_topology_at(amqp_url, exchange), lambda: drop_database(pg_admin, db_name)]
        for step in cleanup:
            try:  # every step, even when one fails (the broker or the database may be down)
                step()
            except Exception as exc:
                print(f"cleanup: {type(exc).__name__}: {exc}", file=sys.stderr)


# -- phases --------------------------------------------------------------------------------


def throughput(stack: Stack, base: dict[Key, float], rounds: int, timeout: float) -> dict:
    bus, engine, services = stack.bus, stack.engine, stack.services
    all_keys = keys()
    bodies = [message(items, values, r) for r in range(rounds)
              for values in [round_values(base, r)] for items in chunks(all_keys, BATCH)]
    meter = stack.meter()
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
    cpu_ms = meter.ms_per(values / 1000)
    return {"values": values, "checks": checks, "events": events, "seconds": seconds,
            "publish_seconds": published - started, "values_per_second": values / seconds,
            "checks_per_second": checks / seconds, "messages_per_second": len(bodies) / seconds,
            "cpu_ms_per_1000_values": cpu_ms}


def latency(stack: Stack, base: dict[Key, float], round_: int, rate: int, seconds: float) -> dict[str, float]:
    bus, engine, services = stack.bus, stack.engine, stack.services
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


def first_load(stack: Stack, timeout: float) -> dict:
    """100,000 values over 100,000 new pairs: every check a new state, about half a PROBLEM."""
    rng = random.Random(2)
    measured_at = T0 + timedelta(days=30)
    items = [(m, o, a) for m in FIRST_LOAD_METRICS for o in FIRST_LOAD_OFFERS for a in FIRST_LOAD_AFFILIATES]
    values = {key: rng.random() for key in items}
    bodies = [encode(new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": m, "offer_id": o, "affiliate_id": a, "value": values[m, o, a],
         "measured_at": measured_at.isoformat()} for m, o, a in part]}, correlation_id="bench-first-load"))
        for part in chunks(items, BATCH)]
    meter = stack.meter()
    started = time.time()
    for body in bodies:
        stack.bus.publish_raw(METRIC_LOADED, body, type=METRIC_LOADED)
    wait_for_states(stack.engine, measured_at, len(items), stack.services, timeout)
    with stack.engine.connect() as conn:
        last, checks, events = conn.execute(text(
            "SELECT extract(epoch FROM max(updated_at)), (SELECT count(*) FROM trigger_checks), "
            "(SELECT count(*) FROM trigger_events) FROM trigger_states"
        )).one()
    seconds = float(last) - started
    return {"values": len(items), "checks": checks, "events": events, "seconds": seconds,
            "values_per_second": len(items) / seconds, "cpu_ms_per_1000_values": meter.ms_per(len(items) / 1000)}


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:")))
    return f"{os.cpu_count()} cores ({model}), {mem_kb / 1024 / 1024:.1f} GiB RAM"


# -- main ----------------------------------------------------------------------------------


def cpu_line(cpu: dict[str, float], unit: str) -> str:
    return (f"CPU per {unit}: " + ", ".join(f"{name} {ms:.{2 if ms < 10 else 0}f} ms" for name, ms in cpu.items())
            + f"; total {sum(cpu.values()):.{2 if sum(cpu.values()) < 10 else 0}f} ms (broker not counted)")


def print_profiles(profile_dir: Path, label: str, services: list[str]) -> None:
    for service in services:
        threads = sorted((profile_dir / label).glob(f"{service}.*.prof"))
        print(f"--- CPU profile: {service} ({label}; {', '.join(p.stem.split('.', 1)[1] for p in threads)} "
              f"threads, thread CPU time) ---")
        print(top_functions(threads, limit=12), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="steady throughput rounds of 25,000 values")
    parser.add_argument("--rate", type=int, default=1000, help="values/s of the latency phase")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--relay-messages", type=int, default=5000)
    parser.add_argument("--action-events", type=int, default=1000, help="events of two email runs each")
    parser.add_argument("--calls-events", type=int, default=None, help="events of one HasOffers run each")
    parser.add_argument("--skip", action="append", default=[], choices=["steady", "first_load", "actions"])
    parser.add_argument("--prefetch", type=int, default=None, help="KPI_PREFETCH for the services")
    parser.add_argument("--timeout", type=float, default=200.0, help="seconds allowed for a throughput phase")
    parser.add_argument("--profile", action="store_true",
                        help="run the services under cProfile and print where their CPU went (inflates CPU)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = parser.parse_args()

    from scripts import bench_actions

    profile_dir = Path(tempfile.mkdtemp(prefix="bench_profiles_")) if args.profile else None
    results: dict[str, object] = {"machine": machine(), "profiled": args.profile}
    rss: dict[str, float] = {}
    if "steady" not in args.skip:
        rng = random.Random(1)
        base = {key: rng.random() for key in keys()}
        with pipeline("steady", seed, args.prefetch, profile_dir) as stack:
            results["steady"] = t = throughput(stack, base, args.rounds, args.timeout)
            print(f"steady: {t['values']} values, {t['checks']} checks, {t['events']} events in "
                  f"{t['seconds']:.2f}s (published in {t['publish_seconds']:.2f}s) = {t['values_per_second']:.0f} "
                  f"values/s, {t['checks_per_second']:.0f} checks/s, {t['messages_per_second']:.1f} metric.loaded/s",
                  flush=True)
            print("  " + cpu_line(t["cpu_ms_per_1000_values"], "1000 values"), flush=True)
            results["latency"] = lat = latency(stack, base, args.rounds, args.rate, args.latency_seconds)
            print(f"latency at {args.rate} values/s ({lat['values']} values, {lat['states']} states): "
                  f"p50 {lat['p50'] * 1000:.0f} ms, p95 {lat['p95'] * 1000:.0f} ms, p99 {lat['p99'] * 1000:.0f} ms, "
                  f"max {lat['max'] * 1000:.0f} ms", flush=True)
            rss.update({f"{k} (steady)": v for k, v in stack.peak_rss_mb().items()})
        if profile_dir:
            print_profiles(profile_dir, "steady", list(SERVICES))
    if "first_load" not in args.skip:
        with pipeline("first_load", seed_first_load, args.prefetch, profile_dir) as stack:
            results["first_load"] = f = first_load(stack, args.timeout)
            print(f"first load: {f['values']} values over as many new pairs, {f['checks']} checks, {f['events']} "
                  f"events in "
                  f"{f['seconds']:.2f}s = {f['values_per_second']:.0f} values/s", flush=True)
            print("  " + cpu_line(f["cpu_ms_per_1000_values"], "1000 values"), flush=True)
            if "steady" in results:
                # A steady value is checked by two triggers, a first-load value by one.
                per_check = {label: sum(w["cpu_ms_per_1000_values"].values()) * w["values"] / w["checks"]
                             for label, w in (("steady", t), ("first_load", f))}
                ratio = per_check["first_load"] / per_check["steady"]
                results["first_load_cpu_per_steady_cpu_per_check"] = ratio
                print(f"  CPU per 1000 checks: first load {per_check['first_load']:.0f} ms, steady "
                      f"{per_check['steady']:.0f} ms: a check that creates a state costs {ratio:.2f}x one of the "
                      f"steady load (broker not counted)", flush=True)
            rss.update({f"{k} (first load)": v for k, v in stack.peak_rss_mb().items()})
        if profile_dir:
            print_profiles(profile_dir, "first_load", list(SERVICES))
    if "actions" not in args.skip:
        calls = args.calls_events if args.calls_events is not None else bench_actions.CALLS_EVENTS
        results["actions"] = a = bench_actions.run_actions(args.action_events, calls,
                                                           profile_dir / "actions" if profile_dir else None)
        print("actions: " + bench_actions.report(a).replace("\n", "\n  "), flush=True)
        rss.update(a["peak_rss_mb"])
        if profile_dir:
            print_profiles(profile_dir, "actions", ["action_runner"])
    results["peak_rss_mb"] = rss
    print("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()), flush=True)

    results["relay"] = relay = run_relay(broker.amqp_url(), args.relay_messages)
    per_relay = relay["messages_per_second"]
    print(f"bare 4-hop pika relay: {per_relay:.0f} msg/s; per relay message/s:")
    for label, key in (("steady", "steady"), ("first_load", "first_load")):
        if label in results:
            print(f"  {label}: {results[label]['values_per_second'] / per_relay:.2f} values")  # type: ignore[index]
    if "actions" in results:
        print(f"  actions: {a['email_runs_per_second'] / per_relay:.3f} email runs, "
              f"{a['hasoffers_runs_per_second'] / per_relay:.3f} HasOffers runs")
    print(f"machine: {results['machine']}; load average now {os.getloadavg()[0]:.1f}"
          + ("; PROFILED: CPU figures include the profiler" if args.profile else ""))
    if args.json:
        print(json.dumps(results))
    return 0 if "actions" not in results or a["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
