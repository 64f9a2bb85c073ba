"""The service processes: start-up, clean stop, reconnect, the example seed."""

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from shared.rabbitmq import queue_names
from shared.events import METRIC_LOADED, new_event
from shared.service import EXIT_BROKER_UNAVAILABLE, EXIT_DATABASE_UNAVAILABLE
from testkit.ports import free_port
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


def test_exits_non_zero_with_a_clear_message_when_postgresql_is_unreachable(service_env):
    env = {**service_env, "DATABASE_URL": "postgresql+psycopg2://postgres:pw-s3cret@127.0.0.1:1/kpi",
           "KPI_STARTUP_ATTEMPTS": "2"}
    result = run_module("trigger_checker", env)
    assert result.returncode == EXIT_DATABASE_UNAVAILABLE, result.stderr
    assert "PostgreSQL not reachable" in result.stderr
    assert "pw-s3cret" not in result.stderr + result.stdout


def test_sigterm_stops_cleanly_and_requeues_nothing_lost(start_service, bus, exchange):
    service = start_service("trigger_checker")
    assert service.terminate() == 0
    assert "stopped" in service.log()


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


def test_the_example_seed_loads_with_psql(db, database_url):
    dsn = database_url.replace("postgresql+psycopg2://", "postgresql://")
    for _ in range(2):  # loading twice is harmless
        result = subprocess.run(["psql", dsn, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(ROOT / "seeds/example.sql")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    with db.connect() as conn:
        counts = dict(conn.execute(text(
            "SELECT 'triggers', count(*) FROM triggers UNION ALL SELECT 'scopes', count(DISTINCT scope) "
            "FROM trigger_thresholds UNION ALL SELECT 'kinds', count(DISTINCT kind) FROM operations "
            "UNION ALL SELECT 'actions', count(*) FROM actions")).all())
        metrics = {row[0] for row in conn.execute(text("SELECT DISTINCT metric_key FROM triggers"))}
    assert counts == {"triggers": 6, "scopes": 4, "kinds": 5, "actions": 2}
    assert metrics == {"cr", "pacc", "gtr", "cap_fill", "clicks_zero_conv"}


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
