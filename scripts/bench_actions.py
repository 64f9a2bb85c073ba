"""Benchmark: the action_runner's operation runs per second, exactly once.

    .venv/bin/python -m scripts.bench_actions [--events 1000] [--calls-events 500]

One action_runner process (`python -m services.action_runner`, default settings: commit
before ack, confirms) against its own database and exchange, a local SMTP server
(aiosmtpd) and the fake HasOffers with no latency and no rate limit of its own.

1. Email runs: `--events` trigger events, each firing an action with two email
   operations (the affiliate's users, the administrators): published back to back, timed
   from the first publish to the last run final.
2. HasOffers runs: `--calls-events` trigger events firing an approve operation.

Then checks that every run is final and succeeded exactly once: one email per email run
(X-KPI-Operation-Run), one HasOffers call per approve run. Prints runs/s of each phase
and the CPU per run of the action_runner and its PostgreSQL backends.
`scripts/bench_pipeline.py` runs it as its third workload. Everything it creates is
removed at the end."""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, text

from scripts.bench_pipeline import machine
from shared.db import make_engine
from shared.events import TRIGGER_EVENT_PROBLEM, TriggerEventMessage, encode, new_event, stable_event_id
from shared.rabbitmq import Bus
from testkit import broker
from testkit.database import admin_url, drop_database, migrated_database
from testkit.fake_hasoffers.network import FakeAffiliate, FakeOffer, Network
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.processes import ServiceProcess
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
OFFERS = range(1, 11)
# The network's rate limit (50 calls per 10 s) lifted to 1000 calls a second, still
# counted in PostgreSQL as in production: the runs are measured, not the pacing.
CALLS_UNTHROTTLED = {"HASOFFERS_RATE_LIMIT_CALLS": "1000", "HASOFFERS_RATE_LIMIT_SECONDS": "1"}
CALLS_EVENTS = 500


def seed(engine: Engine, events: int, calls: int) -> list[TriggerEventMessage]:
    """Triggers 1 (emails) and 2 (approvals), their actions, and one trigger event per pair."""
    affiliates = range(1, max(events, calls) // len(OFFERS) + 2)
    with engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO triggers (id, name, metric_key, operator, threshold) VALUES
                (1, 'low CR', 'cr', 'lt', 0.05), (2, 'good CR', 'cr', 'gt', 0.5);
            INSERT INTO offers (id, name) SELECT o, 'Offer ' || o FROM generate_series(1, 10) o;
            INSERT INTO affiliates (id, company) SELECT a, 'Aff ' || a FROM generate_series(1, :n) a;
            INSERT INTO affiliate_users (id, affiliate_id, email, status)
                SELECT a, a, 'user' || a || '@aff.example', 'active' FROM generate_series(1, :n) a;
            INSERT INTO administrators (email) VALUES ('ops@bench.example');
            INSERT INTO operations (id, name, kind) VALUES (1, 'affiliate', 'email_affiliate'),
                (2, 'ops', 'email_administrators'), (3, 'approve', 'approve_affiliate');
            INSERT INTO actions (id, name) VALUES (1, 'tell'), (2, 'approve');
            INSERT INTO action_conditions (action_id, trigger_id, trigger_status) VALUES (1, 1, 'PROBLEM'),
                (2, 2, 'PROBLEM');
            INSERT INTO action_operations (action_id, operation_id) VALUES (1, 1), (1, 2), (2, 3);
        """), {"n": len(affiliates)})
        out = []
        for trigger_id, count in ((1, events), (2, calls)):
            for n in range(count):
                offer, affiliate = OFFERS[n % len(OFFERS)], affiliates[n // len(OFFERS)]
                measured_at = T0 + timedelta(minutes=n)
                check_id = trigger_id * 10_000_000 + n
                event_id = conn.execute(text(
                    "INSERT INTO trigger_events (trigger_id, offer_id, affiliate_id, previous_status, status, "
                    "check_id, value, threshold, measured_at) VALUES (:t, :o, :a, 'OK', 'PROBLEM', :c, 0.01, 0.05, :m) "
                    "RETURNING id"), {"t": trigger_id, "o": offer, "a": affiliate, "c": check_id,
                                      "m": measured_at}).scalar_one()
                conn.execute(text(
                    "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, "
                    "check_id) VALUES (:t, :o, :a, 'PROBLEM', :m, :m, :c) ON CONFLICT DO NOTHING"),
                    {"t": trigger_id, "o": offer, "a": affiliate, "m": measured_at, "c": check_id})
                out.append(TriggerEventMessage(
                    trigger_event_id=event_id, trigger_id=trigger_id, trigger_name="x", offer_id=offer,
                    affiliate_id=affiliate, previous_status="OK", status="PROBLEM", value=0.01, threshold=0.05,
                    measured_at=measured_at, check_id=check_id))
    return out


def final_runs(engine: Engine, kind_like: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM operation_runs WHERE status <> 'pending' AND kind LIKE :k"),
                            {"k": kind_like}).scalar_one()


def phase(bus: Bus, engine: Engine, events: list[TriggerEventMessage], runs: int, kind_like: str,
          service: ServiceProcess) -> float:
    started = time.perf_counter()
    for event in events:
        bus.publish_raw(TRIGGER_EVENT_PROBLEM, encode(new_event(
            TRIGGER_EVENT_PROBLEM, event, event_id=stable_event_id("trigger_event", event.trigger_event_id))))

    def done() -> bool:
        if not service.alive():
            raise RuntimeError(f"the action_runner died:\n{service.log()[-3000:]}")
        return final_runs(engine, kind_like) >= runs

    wait_for(done, 600, 0.1, f"{runs} final runs")
    return time.perf_counter() - started


def run_actions(events: int, calls_events: int, profile_dir: Path | None = None) -> dict:
    """Both phases against one action_runner; its runs/s, CPU per run and peak RSS, and
    whether every run succeeded exactly once."""
    from scripts.bench_pipeline import CpuMeter, peak_rss_mb  # one module imports the other's helpers

    admin = admin_url("TEST_PG_ADMIN_URL")
    name = f"kpi_bench_actions_{uuid.uuid4().hex[:8]}"
    exchange = f"kpi.bench.actions.{uuid.uuid4().hex[:8]}"
    smtp = FakeSmtpServer().start()
    network = Network(offers={o: FakeOffer(o, f"Offer {o}") for o in OFFERS},
                      affiliates={a: FakeAffiliate(a, f"Aff {a}") for a in range(1, max(events, calls_events) + 2)})
    fake = FakeHasOffers(network, rate_limit=(10**9, 10.0))
    fake.start()
    engine: Engine | None = None
    try:
        url = migrated_database(admin, name)
        engine = make_engine(url)
        messages = seed(engine, events, calls_events)
        env = {**smtp.env, "DATABASE_URL": url, "AMQP_URL": broker.amqp_url(), "KPI_EXCHANGE": exchange,
               "HASOFFERS_BASE_URL": fake.base_url, "HASOFFERS_NETWORK_ID": fake.network_id,
               "HASOFFERS_NETWORK_TOKEN": fake.network_token, **CALLS_UNTHROTTLED}
        if profile_dir is not None:
            env["KPI_PROFILE"] = str(profile_dir)
        # No heartbeats: the benchmark's connection sits idle for minutes while the runs go.
        with tempfile.TemporaryDirectory() as log_dir, Bus(broker.amqp_url(), exchange, heartbeat=0) as bus:
            service = ServiceProcess("action_runner", env, Path(log_dir)).start()
            try:
                meter = CpuMeter(engine, name, [service])
                email_seconds = phase(bus, engine, messages[:events], 2 * events, "email%", service)
                email_cpu = meter.ms_per(2 * events)
                meter = CpuMeter(engine, name, [service])
                call_seconds = phase(bus, engine, messages[events:], calls_events, "approve%", service)
                call_cpu = meter.ms_per(calls_events)
                rss = peak_rss_mb(service)
            finally:
                service.terminate()
        mails = Counter(mail.header("X-KPI-Operation-Run") for mail in smtp.mails())
        with engine.connect() as conn:
            statuses = Counter(conn.execute(text("SELECT kind, status FROM operation_runs")).all())
        calls = len(fake.write_calls())
        once = (len(mails) == 2 * events and set(mails.values()) == {1} and calls == calls_events
                and set(statuses) <= {(k, "succeeded") for k, _ in statuses})
        return {"email_runs": 2 * events, "email_seconds": email_seconds,
                "email_runs_per_second": 2 * events / email_seconds, "email_cpu_ms_per_run": email_cpu,
                "hasoffers_runs": calls_events, "hasoffers_seconds": call_seconds,
                "hasoffers_runs_per_second": calls_events / call_seconds, "hasoffers_cpu_ms_per_run": call_cpu,
                "peak_rss_mb": {"action_runner": rss}, "exactly_once": once,
                "detail": f"{sum(mails.values())} mails for {len(mails)} runs, {calls} HasOffers calls for "
                          f"{calls_events} runs; {dict(statuses)}"}
    finally:
        if engine is not None:
            engine.dispose()
        smtp.stop()
        fake.stop()
        drop_database(admin, name)
        broker.delete_topology_at(broker.amqp_url(), exchange)


def report(result: dict) -> str:
    cpu = lambda ms: ", ".join(f"{k} {v:.2f}" for k, v in ms.items())  # noqa: E731
    return (f"email runs: {result['email_runs']} in {result['email_seconds']:.1f}s = "
            f"{result['email_runs_per_second']:,.0f} runs/s; CPU ms per run: {cpu(result['email_cpu_ms_per_run'])}\n"
            f"HasOffers runs: {result['hasoffers_runs']} in {result['hasoffers_seconds']:.1f}s = "
            f"{result['hasoffers_runs_per_second']:,.0f} runs/s; CPU ms per run: "
            f"{cpu(result['hasoffers_cpu_ms_per_run'])}\n"
            f"peak RSS: action_runner {result['peak_rss_mb']['action_runner']:.0f} MB\n"
            f"exactly once: {'yes' if result['exactly_once'] else 'NO'} ({result['detail']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events firing two email operations each")
    parser.add_argument("--calls-events", type=int, default=CALLS_EVENTS, help="events firing an approve operation")
    args = parser.parse_args()
    result = run_actions(args.events, args.calls_events)
    print(f"machine: {machine()}")
    print(report(result))
    return 0 if result["exactly_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
