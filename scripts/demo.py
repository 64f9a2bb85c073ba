"""The demo: the whole pipeline on this machine, against a fake HasOffers network.

Creates its own database and exchange, migrates, seeds the example triggers and
actions, creates the services' PostgreSQL roles (`kpi roles`, a prefix of its own),
starts the fake HasOffers and a local SMTP sink, starts the four services (each as its
own role), starts the console (`kpi web`), requests a reference load and every metric, waits until
the pipeline is idle, prints a summary, the console's address, a backtest of the demo's
own history and an explain of one rejected pair, and stops everything it started (with
--keep, once you press Ctrl-C: look at the console meanwhile).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import Engine, text

from shared.db import make_engine
from shared.events import METRIC_LOAD_REQUESTED, MetricLoadRequested, new_event
from shared.rabbitmq import SERVICE_BINDINGS, Bus, queue_names
from shared.sql import run_script
from shared.vocabulary import METRIC_KEYS, REFERENCE
from scripts.demo_console import backtest_and_explain, console_lines, start_console
from testkit import ROOT, broker
from testkit.database import admin_url, create_service_roles, drop_database, drop_service_roles, migrated_database
from testkit.ports import free_port, port_open
from testkit.processes import ServiceProcess, terminate_all
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for

SERVICES = list(SERVICE_BINDINGS)
TOKEN = "NETdemo" + uuid.uuid4().hex[:16]
# The fake network reports its stats in New York time (not UTC), as real networks do.
NETWORK_TIMEZONE = "America/New_York"


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT (SELECT count(*) FROM metric_values), (SELECT count(*) FROM trigger_checks),"
            " (SELECT count(*) FROM trigger_states), (SELECT count(*) FROM trigger_events),"
            " (SELECT count(*) FROM operation_runs WHERE status <> 'pending'),"
            " (SELECT count(*) FROM load_runs WHERE status IN ('requested', 'running'))")).one()
    return dict(zip(["values", "checks", "states", "events", "runs", "loads_open"], row))


def queues_empty(bus: Bus) -> bool:
    for service in SERVICES:
        names = queue_names(bus.exchange, service)
        if bus.queue_depth(names.work) or bus.queue_depth(names.retry):
            return False
    return True


def wait_idle(engine: Engine, bus: Bus, timeout: float) -> dict[str, int]:
    """Idle = no load open, work and retry queues empty, and the counts still for 2 s."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] | None = None
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = counts(engine)
        if now != last:
            say("progress: " + ", ".join(f"{k} {v}" for k, v in now.items() if k != "loads_open"))
            last, stable_since = now, time.monotonic()
        elif now["loads_open"] == 0 and queues_empty(bus) and time.monotonic() - stable_since >= 2:
            return now
        time.sleep(0.5)
    raise TimeoutError("the pipeline did not become idle in time")


def summary(engine: Engine, sink: FakeSmtpServer, hasoffers_calls: list[dict], exchange: str, bus: Bus) -> str:
    out = []
    with engine.connect() as conn:
        loads = conn.execute(text(
            "SELECT metric_key, status, rows_read, values_published, coalesce(error, '') FROM load_runs ORDER BY id"
        )).all()
        per_trigger = conn.execute(text(
            "SELECT t.name, count(DISTINCT (c.offer_id, c.affiliate_id)) AS pairs,"
            " count(*) FILTER (WHERE c.status = 'PROBLEM') AS problem_checks"
            " FROM triggers t LEFT JOIN trigger_checks c ON c.trigger_id = t.id GROUP BY t.name ORDER BY t.name"
        )).all()
        in_problem = conn.execute(text(
            "SELECT t.name, count(*) FROM trigger_states s JOIN triggers t ON t.id = s.trigger_id"
            " WHERE s.status = 'PROBLEM' GROUP BY t.name ORDER BY t.name")).all()
        changes = conn.execute(text(
            "SELECT coalesce(previous_status, 'none') || ' -> ' || status, count(*) FROM trigger_events"
            " GROUP BY 1 ORDER BY 1")).all()
        runs = conn.execute(text(
            "SELECT kind, status, count(*) FROM operation_runs GROUP BY kind, status ORDER BY kind, status")).all()
    out.append("=" * 72)
    out.append("hasoffers-kpi demo summary")
    out.append("=" * 72)
    out.append("Loads:")
    for key, status, rows, published, error in loads:
        out.append(f"  {key:<18} {status:<10} rows read {rows:>6}  values published {published:>6}  {error}")
    out.append("Pairs checked per trigger:")
    for name, pairs, problems in per_trigger:
        out.append(f"  {name:<20} {pairs:>6} pairs checked, {problems:>5} checks in PROBLEM")
    out.append("Pairs in PROBLEM now:")
    for name, n in in_problem or [("(none)", 0)]:
        out.append(f"  {name:<20} {n:>6}")
    out.append("State changes (trigger events):")
    for change, n in changes or [("(none)", 0)]:
        out.append(f"  {change:<20} {n:>6}")
    out.append("Operations run:")
    for kind, status, n in runs or [("(none)", "", 0)]:
        out.append(f"  {kind:<26} {status:<10} {n:>5}")
    mails = sink.mails()
    out.append(f"Emails captured by the SMTP sink: {len(mails)}")
    for mail in mails[:15]:
        out.append(f"  to {', '.join(mail.rcpt_tos)[:60]:<60} | {mail.subject[:70]}")
    if len(mails) > 15:
        out.append(f"  ... and {len(mails) - 15} more")
    out.append(f"Approve/reject calls HasOffers received: {len(hasoffers_calls)}")
    for call in hasoffers_calls[:15]:
        status = f" status={call['status']}" if "status" in call else ""
        notes = f" notes={call['notes']!r}" if call.get("notes") else ""
        out.append(f"  {call['method']:<28} offer {call['offer_id']:>4} affiliate {call['affiliate_id']:>4}{status}{notes}")
    if len(hasoffers_calls) > 15:
        out.append(f"  ... and {len(hasoffers_calls) - 15} more")
    dead = {s: bus.queue_depth(queue_names(exchange, s).dead) for s in SERVICES}
    out.append("Dead letters: " + ", ".join(f"{s} {n}" for s, n in dead.items()))
    out.append("=" * 72)
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offers", type=int, default=30)
    parser.add_argument("--affiliates", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=150,
                        help="seconds to wait for the pipeline to go idle (default 150)")
    parser.add_argument("--keep-database", action="store_true", help="leave the demo database for inspection")
    parser.add_argument("--keep", action="store_true",
                        help="leave the console and the services running until Ctrl-C, so you can look")
    args = parser.parse_args()

    pg_admin = admin_url("DEMO_PG_ADMIN_URL")
    amqp_url = broker.amqp_url()
    run_id = uuid.uuid4().hex[:8]
    db_name, exchange = f"kpi_demo_{run_id}", f"kpi.demo.{run_id}"
    started = time.monotonic()
    processes: list[ServiceProcess] = []
    log_dir = Path(tempfile.mkdtemp(prefix="kpi-demo-"))
    smtp = None
    bus = None
    engine = None
    database_url = None
    roles_prefix = None
    try:
        say(f"database {db_name}, exchange {exchange}, logs in {log_dir}")
        database_url = migrated_database(pg_admin, db_name)
        engine = make_engine(database_url)
        run_script(engine, (ROOT / "seeds/example.sql").read_text())
        roles_prefix, role_urls = create_service_roles(database_url)
        say(f"schema migrated, example triggers and actions seeded, roles {roles_prefix}<service> granted")

        smtp = FakeSmtpServer().start()
        fake_port = free_port()
        env = {"DATABASE_URL": database_url, "AMQP_URL": amqp_url,
               "KPI_EXCHANGE": exchange, "HASOFFERS_BASE_URL": f"http://127.0.0.1:{fake_port}/Apiv3/json",
               "HASOFFERS_NETWORK_ID": "demo", "HASOFFERS_NETWORK_TOKEN": TOKEN, "SMTP_HOST": "127.0.0.1",
               "SMTP_PORT": str(smtp.port), "SMTP_STARTTLS": "false", "MAIL_FROM": "kpi@demo.local", "KPI_RETRY_DELAY_MS": "1000",
               "KPI_CLICK_COST": "0.01", "HASOFFERS_TIMEZONE": NETWORK_TIMEZONE}

        def spawn(name: str, module: str | None = None, args: list[str] | None = None) -> ServiceProcess:
            # Each service connects as its own role: it can write only the tables it owns.
            own = {**env, "DATABASE_URL": role_urls[name]} if name in role_urls else env
            process = ServiceProcess(name, own, log_dir, module=module, args=args or [], log_name=f"{name}.log")
            processes.append(process)
            return process.start(wait_ready=False)

        spawn("fake_hasoffers", "testkit.fake_hasoffers",
              ["--host", "127.0.0.1", "--port", str(fake_port), "--seed", str(args.seed), "--offers",
               str(args.offers), "--affiliates", str(args.affiliates), "--network-id", "demo", "--token", TOKEN, "--timezone", NETWORK_TIMEZONE])
        wait_for(lambda: port_open(fake_port), 20, 0.5, "the fake HasOffers to listen")
        say(f"fake HasOffers on port {fake_port} ({args.offers} offers, {args.affiliates} affiliates, "
            f"stats in {NETWORK_TIMEZONE} time as a real network reports them), "
            f"SMTP sink on port {smtp.port}")
        services = [spawn(service) for service in SERVICES]
        bus = Bus(amqp_url, exchange, name="hasoffers-kpi demo").connect()
        wait_for(lambda: all(service.ready() for service in services), 30, 0.5, "the four services to start")
        say("four services running")
        console = start_console({**env, "DATABASE_URL": role_urls["console"]}, log_dir, processes.append)
        say(f"console on {console.url}")

        bus.publish(new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key=REFERENCE), correlation_id="demo"))
        wait_for(lambda: _reference_done(engine), 60, 0.5, "the reference load")
        with engine.begin() as conn:  # local setting: track each offer's first goal for the gtr metric
            conn.execute(text("UPDATE offers o SET tracked_goal_id = (SELECT min(g.id) FROM goals g"
                              " WHERE g.offer_id = o.id) WHERE tracked_goal_id IS NULL"))
        say("reference data loaded: " + _reference_counts(engine))
        for key in METRIC_KEYS:
            bus.publish(new_event(METRIC_LOAD_REQUESTED, MetricLoadRequested(metric_key=key), correlation_id="demo"))
        say(f"requested loads of {', '.join(METRIC_KEYS)}; waiting for the pipeline to go idle")
        wait_idle(engine, bus, args.timeout)

        calls = httpx.get(f"http://127.0.0.1:{fake_port}/_fake/calls", timeout=5).json()
        print(summary(engine, smtp, calls, exchange, bus), flush=True)
        print("\n".join(console_lines(console)), flush=True)
        print(backtest_and_explain(engine, env), flush=True)
        for process in processes:
            for secret, what in ((TOKEN, "HasOffers token"), (console.password, "console password")):
                if secret in process.log():
                    raise RuntimeError(f"the {what} appeared in the {process.name} log")
        say(f"finished in {time.monotonic() - started:.1f}s")
        if args.keep:
            keep_running(console.url)
        return 0
    except Exception as exc:
        say(f"FAILED: {exc}; logs are in {log_dir}")
        return 1
    finally:
        terminate_all(processes)
        if smtp is not None:
            smtp.stop()
        if bus is not None:
            try:
                broker.delete_topology(bus.channel, exchange)
            except Exception:  # best effort: the broker may be gone already
                pass
            bus.close()
        if engine is not None:
            engine.dispose()
        if roles_prefix is not None:
            drop_service_roles(pg_admin, roles_prefix, database_url)
        if not args.keep_database:
            drop_database(pg_admin, db_name)
        say("stopped everything it started")


def keep_running(console_url: str) -> None:
    """--keep: wait for Ctrl-C (or SIGTERM) with everything running."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    say(f"--keep: the console ({console_url}) and the services keep running; press Ctrl-C to stop them")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")


def _reference_done(engine: Engine) -> bool:
    with engine.connect() as conn:
        status = conn.execute(text(
            "SELECT status, error FROM load_runs WHERE metric_key = 'reference' ORDER BY id DESC LIMIT 1")).first()
    if status is not None and status[0] == "failed":
        raise RuntimeError(f"the reference load failed: {status[1]}")
    return status is not None and status[0] == "succeeded"


def _reference_counts(engine: Engine) -> str:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT (SELECT count(*) FROM offers), (SELECT count(*) FROM affiliates),"
            " (SELECT count(*) FROM affiliate_users), (SELECT count(*) FROM goals),"
            " (SELECT count(*) FROM conversion_caps)")).one()
    return json.dumps(dict(zip(["offers", "affiliates", "affiliate_users", "goals", "caps"], row)))


if __name__ == "__main__":
    sys.exit(main())
