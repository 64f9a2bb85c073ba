"""Benchmark: `kpi backtest` over 1,000,000 stored values, beside the services.

    .venv/bin/python -m scripts.bench_backtest [--rounds 40] [--service-rounds 4]

Seeds (as scripts/bench_pipeline.py does) 5 metrics x 2 active triggers and thresholds
of every scope, an action per trigger (an email on PROBLEM, a reject on one), then stores
`--rounds` rounds of 50 offers x 100 affiliates x 5 metrics values (25,000 a round,
15 minutes apart; 40 rounds = 1,000,000 values) and times the backtest replaying them all
(in this process, as `kpi backtest` does). For the services, the same values of the first
`--service-rounds` rounds are published to one trigger_checker and one event_detector in
a second database (with every guarantee on, as in bench_pipeline), timed from the first
publish to the last state written; their rate is printed with the time it would take
them for all the values.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, text

from scripts.bench_pipeline import BATCH, METRICS, machine, seed
from shared import backtest
from shared.db import make_engine
from shared.events import METRIC_LOADED, encode, new_event
from shared.rabbitmq import Bus
from testkit import broker
from testkit.database import admin_url, drop_database, migrated_database
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for

OFFERS = range(1, 51)
AFFILIATES = range(1, 101)
T0 = datetime(2026, 10, 1, tzinfo=timezone.utc)


def value(metric: int, offer: int, affiliate: int, round_: int) -> float:
    """Deterministic, spread over [0, 1): about 10 % under the low thresholds, 5 % over the high."""
    return ((offer * 7919 + affiliate * 104729 + metric * 1299709 + round_ * 15485863) % 1000) / 1000


def rows(rounds: range):
    for r in rounds:
        at = T0 + timedelta(minutes=15 * r)
        for m, metric in enumerate(METRICS):
            for o in OFFERS:
                for a in AFFILIATES:
                    yield metric, o, a, value(m, o, a, r), at


def seed_actions(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO operations (name, kind) VALUES ('mail', 'email_administrators'), ('reject', 'reject_affiliate');
            INSERT INTO administrators (email) VALUES ('ops@bench.example');
            INSERT INTO actions (name) SELECT 'on ' || name FROM triggers;
            INSERT INTO action_conditions (action_id, trigger_id, trigger_status)
                SELECT a.id, t.id, 'PROBLEM' FROM actions a JOIN triggers t ON a.name = 'on ' || t.name;
            INSERT INTO action_operations (action_id, operation_id)
                SELECT a.id, o.id FROM actions a, operations o
                WHERE o.kind = 'email_administrators' OR a.name = 'on cr low';
        """))


def store(engine: Engine, rounds: int) -> None:
    """COPY the values into metric_values, as the trigger_checker would have stored them."""
    connection = engine.raw_connection()
    try:
        with connection.cursor() as cursor:
            buffer = io.StringIO()
            for metric, o, a, v, at in rows(range(rounds)):
                buffer.write(f"{metric}\t{o}\t{a}\t{v!r}\t{at.isoformat()}\n")
            buffer.seek(0)
            cursor.copy_expert("COPY metric_values (metric_key, offer_id, affiliate_id, value, measured_at) "
                               "FROM STDIN", buffer)
        connection.commit()
    finally:
        connection.close()


def time_backtest(engine: Engine, rounds: int) -> tuple[float, backtest.Backtest]:
    started = time.perf_counter()
    with engine.connect() as conn:
        result = backtest.run(conn, T0, T0 + timedelta(minutes=15 * rounds), max_rejects_per_hour=25)
        conn.rollback()
    return time.perf_counter() - started, result


def time_services(url: str, exchange: str, rounds: int, log_dir: Path) -> float:
    engine = make_engine(url)
    env = {"DATABASE_URL": url, "AMQP_URL": broker.amqp_url(), "KPI_EXCHANGE": exchange}
    services = [ServiceProcess(s, env, log_dir).start() for s in ("trigger_checker", "event_detector")]
    last = T0 + timedelta(minutes=15 * (rounds - 1))
    states = 2 * len(METRICS) * len(OFFERS) * len(AFFILIATES)  # two triggers per metric, every pair

    def done() -> bool:
        for service in services:
            if not service.alive():
                raise RuntimeError(f"{service.name} died:\n{service.log()[-3000:]}")
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM trigger_states WHERE measured_at = :m"),
                                {"m": last}).scalar_one() >= states

    try:
        with Bus(broker.amqp_url(), exchange) as bus:
            items = list(rows(range(rounds)))
            started = time.perf_counter()
            for start in range(0, len(items), BATCH):
                batch = [{"metric_key": m, "offer_id": o, "affiliate_id": a, "value": v, "measured_at": at.isoformat()}
                         for m, o, a, v, at in items[start:start + BATCH]]
                bus.publish_raw(METRIC_LOADED, encode(new_event(METRIC_LOADED, {"metrics": batch})))
            wait_for(done, 1800, 0.2, "the last round's states")
            return time.perf_counter() - started
    finally:
        for service in services:
            service.terminate()
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds of 25,000 values to store and replay")
    parser.add_argument("--service-rounds", type=int, default=4, help="rounds timed through the services")
    args = parser.parse_args()
    admin = admin_url("TEST_PG_ADMIN_URL")
    name, services_db = f"kpi_bench_backtest_{uuid.uuid4().hex[:8]}", f"kpi_bench_backtest_s_{uuid.uuid4().hex[:8]}"
    exchange = f"kpi.bench.backtest.{uuid.uuid4().hex[:8]}"
    try:
        url = migrated_database(admin, name)
        engine = make_engine(url)
        seed(engine)
        seed_actions(engine)
        began = time.perf_counter()
        store(engine, args.rounds)
        values = args.rounds * len(METRICS) * len(OFFERS) * len(AFFILIATES)
        print(f"stored {values:,} values in {time.perf_counter() - began:.1f}s; machine: {machine()}")
        seconds, result = time_backtest(engine, args.rounds)
        summary = result.summary()
        print(f"backtest: {result.values:,} values, {result.checks:,} checks, {summary['state_changes']:,} state "
              f"changes, {sum(summary['operations'].values()):,} operations in {seconds:.1f}s "
              f"({result.values / seconds:,.0f} values/s)")
        engine.dispose()
        services_url = migrated_database(admin, services_db)
        services_engine = make_engine(services_url)
        seed(services_engine)
        services_engine.dispose()
        with tempfile.TemporaryDirectory() as log_dir:
            service_seconds = time_services(services_url, exchange, args.service_rounds, Path(log_dir))
        service_values = args.service_rounds * len(METRICS) * len(OFFERS) * len(AFFILIATES)
        rate = service_values / service_seconds
        print(f"services (trigger_checker + event_detector, every guarantee on): {service_values:,} values in "
              f"{service_seconds:.1f}s ({rate:,.0f} values/s): {values / rate:.0f}s for the {values:,} values")
        print(f"backtest / services speed: {result.values / seconds / rate:.1f}x")
    finally:
        drop_database(admin, name)
        drop_database(admin, services_db)
        broker.delete_topology_at(broker.amqp_url(), exchange)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
