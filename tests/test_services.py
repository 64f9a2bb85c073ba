"""The service processes: start-up, clean stop, reconnect, the example seed."""

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from shared.db import Base
from shared.rabbitmq import queue_names
from shared.events import METRIC_LOADED, new_event
from shared.service import EXIT_BROKER_UNAVAILABLE, EXIT_CONFIGURATION, EXIT_DATABASE_UNAVAILABLE
from testkit.ports import free_port
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for
from tests.support import ROOT, queue_depth

SERVICES = ["metric_loader", "trigger_checker", "event_detector", "action_runner"]


def run_module(service, env, timeout=60):
    return subprocess.run([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("service", SERVICES)
def test_exits_non_zero_with_a_clear_message_when_rabbitmq_is_unreachable(service, service_env):
    env = {**service_env, "AMQP_URL": "amqp://guest:s3cret@127.0.0.1:1/%2F", "KPI_STARTUP_ATTEMPTS": "2"}
    result = run_module(service, env)
    assert result.returncode == EXIT_BROKER_UNAVAILABLE, result.stderr
    assert "RabbitMQ not reachable" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_exits_non_zero_with_a_clear_message_when_postgresql_is_unreachable(service, service_env):
    env = {**service_env, "DATABASE_URL": "postgresql+psycopg2://postgres:pw-s3cret@127.0.0.1:1/kpi",
           "KPI_STARTUP_ATTEMPTS": "2"}
    result = run_module(service, env)
    assert result.returncode == EXIT_DATABASE_UNAVAILABLE, result.stderr
    assert "PostgreSQL not reachable" in result.stderr
    assert "pw-s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_an_invalid_environment_variable_stops_the_start_with_one_line(service, service_env):
    result = run_module(service, {**service_env, "KPI_PREFETCH": "many", "KPI_RETRY_LIMIT": "-1"})
    assert result.returncode == EXIT_CONFIGURATION
    assert result.stderr.strip() == (
        f"{service}: cannot start: invalid configuration: KPI_PREFETCH: Input should be a valid integer, unable to "
        "parse string as an integer (got 'many'); KPI_RETRY_LIMIT: Input should be greater than or equal to 0 "
        "(got '-1')")


def broker_connection_of(process_id: int) -> str | None:
    """The broker-side pid of the connection a process named with its own pid."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        if f"pid={process_id}" in line:
            return line.split("\t", 1)[0]
    return None


def test_reconnects_when_the_broker_drops_the_connection(start_service, bus, exchange):
    service = start_service("trigger_checker")
    our_connection = lambda: broker_connection_of(service.process.pid)  # noqa: E731
    pid = wait_for(our_connection, 30, interval=0.5, what="the service's connection")
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: broker restart"], check=True, timeout=60)
    wait_for(lambda: "reconnected" in service.log(), 30, what="the service to reconnect")
    bus.publish(new_event(METRIC_LOADED, {"metrics": [{"metric_key": "cr", "offer_id": 1, "affiliate_id": 1,
                          "value": 1.0, "measured_at": datetime.now(timezone.utc).isoformat()}]}))
    wait_for(lambda: "outcome=handled" in service.log(), what="a message handled after the reconnect")
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 0


def every_row(db) -> dict[str, list[tuple]]:
    """Every row of every table but the migrations' own, sorted: what a second load must not change."""
    with db.connect() as conn:
        return {table.name: sorted(conn.execute(table.select()).all(), key=repr)
                for table in Base.metadata.sorted_tables if table.name not in ("metrics", "alembic_version")}


def test_the_example_seed_loads_with_psql_and_kpi_seed_and_is_safe_to_load_twice(db, database_url, service_env):
    dsn = database_url.replace("postgresql+psycopg2://", "postgresql://")
    seed = str(ROOT / "seeds/example.sql")

    def with_psql():
        result = subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", seed],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    def with_kpi_seed():
        result = subprocess.run([sys.executable, "-m", "shared.cli", "seed", seed], cwd=ROOT,
                                env={**os.environ, **service_env}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == f"loaded {seed}", result.stderr

    with_psql()
    once = every_row(db)
    counts = {table: len(rows) for table, rows in once.items() if rows}
    assert counts == {"triggers": 6, "trigger_thresholds": 6, "operations": 5, "administrators": 1, "actions": 2,
                      "action_conditions": 3, "action_operations": 4}
    assert {row.metric_key for row in once["triggers"]} == {"cr", "pacc", "gtr", "cap_fill", "clicks_zero_conv"}
    with_psql()
    assert every_row(db) == once, "a second load with psql changed the tables"
    with_kpi_seed()
    with_kpi_seed()
    assert every_row(db) == once, "kpi seed (twice) changed the tables"

    TRUNCATE_SEEDED = ", ".join(counts)
    with db.begin() as conn:
        conn.execute(text(f"TRUNCATE {TRUNCATE_SEEDED} RESTART IDENTITY CASCADE"))
    with_kpi_seed()
    assert every_row(db) == once, "kpi seed on its own loads what psql loads"


def test_metrics_endpoint_counts_what_was_handled_and_logs_are_json(start_service, bus, exchange):
    import httpx

    port = free_port()
    service = start_service("action_runner", KPI_METRICS_PORT=str(port), KPI_LOG_JSON="true")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, what="health to turn green")
    before = httpx.get(f"{base}/metrics").text
    assert 'kpi_messages_handled_total{outcome="dead_lettered",service="action_runner"}' not in before
    for _ in range(3):
        bus.publish_raw("trigger.event.problem", b"not json at all")
    wait_for(lambda: queue_depth(queue_names(exchange, "action_runner").dead) == 3)

    def counter_moved():
        text = httpx.get(f"{base}/metrics").text
        return 'kpi_messages_handled_total{outcome="dead_lettered",service="action_runner"} 3.0' in text and text

    text = wait_for(counter_moved, what="the dead-letter counter to reach 3")
    assert 'kpi_messages_dead_lettered_total{service="action_runner"} 3.0' in text
    assert 'kpi_handler_seconds_count{service="action_runner"} 3.0' in text
    service.terminate()
    lines = [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]
    handled = [line for line in lines if line["message"].startswith("message handled")]
    assert len(handled) == 3 and all("outcome=dead_lettered" in line["message"] for line in handled)
    assert all(line["service"] == "action_runner" for line in lines)


def test_health_answers_503_until_the_consumer_is_connected(service_env, tmp_path):
    import httpx

    port = free_port()
    # A broker that is not there: the service keeps trying (and /health says not ready).
    env = {**service_env, "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F", "KPI_STARTUP_ATTEMPTS": "1000",
           "KPI_METRICS_PORT": str(port)}
    process = ServiceProcess("trigger_checker", env, tmp_path)
    process.start(wait_ready=False)
    try:
        def answer():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.TransportError:
                return None

        health = wait_for(answer, 90, what="/health to answer")
        assert (health.status_code, health.text) == (503, "not ready\n")
    finally:
        process.kill()


def test_the_prefetch_comes_from_kpi_prefetch(start_service, exchange):
    start_service("trigger_checker", KPI_PREFETCH="7")
    work = queue_names(exchange, "trigger_checker").work

    def prefetch():
        out = subprocess.run(["rabbitmqctl", "-q", "list_consumers", "queue_name", "prefetch_count",
                              "--no-table-headers"], capture_output=True, text=True, timeout=60).stdout
        return next((line.split("\t")[1] for line in out.splitlines() if line.split("\t")[0] == work), None)

    assert wait_for(prefetch, 30, what="the consumer on the work queue") == "7"
