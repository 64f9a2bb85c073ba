"""The `kpi` command line against the real broker and database."""

import json
import os
import subprocess
import sys
import uuid

from sqlalchemy import text

from shared.rabbitmq import queue_names
from shared.events import METRIC_LOADED
from testkit.database import create_database, drop_database
from testkit.waiting import wait_for
from tests.support import PG_ADMIN_URL, ROOT, drain, queue_depth


def kpi(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_migrate_then_seed_a_fresh_database(service_env):
    name = f"kpi_cli_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_ADMIN_URL, name)
    env = {**service_env, "DATABASE_URL": url}
    try:
        result = kpi(env, "migrate")
        assert result.returncode == 0, result.stderr
        result = kpi(env, "seed", str(ROOT / "seeds/example.sql"))
        assert result.returncode == 0, result.stderr
        result = kpi(env, "triggers")
        assert result.returncode == 0, result.stderr
        assert "min CR" in result.stdout and "offer 2 / affiliate 5" in result.stdout
        assert "category 3" in result.stdout
    finally:
        drop_database(PG_ADMIN_URL, name)


def test_seed_errors_are_clear(service_env, db, tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_text("INSERT INTO triggers (name, metric_key, operator) VALUES ('x', 'nope', 'lt');")
    result = kpi(service_env, "seed", str(bad))
    assert result.returncode == 2
    assert "foreign key" in result.stderr and "Traceback" not in result.stderr
    result = kpi(service_env, "seed", str(tmp_path / "missing.sql"))
    assert result.returncode == 2 and "no such file" in result.stderr


def test_load_publishes_requests(service_env, exchange, bus):
    result = kpi(service_env, "load", "all", "--lookback-hours", "48")
    assert result.returncode == 0, result.stderr
    messages = drain(queue_names(exchange, "metric_loader").work)
    data = [json.loads(body)["data"] for _, body in messages]
    assert sorted(d["metric_key"] for d in data) == sorted(
        ["cr", "pacc", "gtr", "clicks_zero_conv", "cap_fill", "reference"])
    assert {d["lookback_hours"] for d in data} == {48}


def test_bad_arguments_exit_2(service_env, bus):
    assert kpi(service_env, "load", "nonsense").returncode == 2
    result = kpi(service_env, "load", "cr", "--lookback-hours", "0")
    assert result.returncode == 2 and "greater than 0" in result.stderr
    assert kpi(service_env, "dead", "list", "nobody").returncode == 2
    assert kpi(service_env).returncode == 2


def test_unreachable_services_exit_3(service_env):
    result = kpi({**service_env, "AMQP_URL": "amqp://guest:topsecret@127.0.0.1:1/%2F"}, "load", "cr")
    assert result.returncode == 3 and "RabbitMQ not reachable" in result.stderr
    assert "topsecret" not in result.stderr
    result = kpi({**service_env, "DATABASE_URL": "postgresql+psycopg2://u:topsecret@127.0.0.1:1/x"}, "status")
    assert result.returncode == 3 and "PostgreSQL not reachable" in result.stderr
    assert "topsecret" not in result.stderr


def test_status_lists_problems_and_counts(service_env, db):
    with db.begin() as conn:
        conn.execute(text("INSERT INTO triggers (id, name, metric_key, operator, threshold) VALUES "
                          "(1, 'min CR', 'cr', 'lt', 0.01), (2, 'cap fill', 'cap_fill', 'ge', 1)"))
        conn.execute(text(
            "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, check_id,"
            " value, threshold) VALUES "
            "(1, 10, 20, 'PROBLEM', '2026-11-01T10:00:00Z', '2026-11-02T10:00:00Z', 1, 0.004, 0.01),"
            "(1, 11, 20, 'OK', '2026-11-01T10:00:00Z', '2026-11-02T10:00:00Z', 2, 0.05, 0.01),"
            "(2, 10, 21, 'PROBLEM', '2026-11-01T11:00:00Z', '2026-11-02T10:00:00Z', 3, 1.5, 1)"))
    result = kpi(service_env, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert [(p["trigger"], p["offer_id"], p["affiliate_id"], p["value"]) for p in status["problems"]] == [
        ("cap fill", 10, 21, 1.5), ("min CR", 10, 20, 0.004)]
    assert {t["trigger"]: (t["problem"], t["ok"]) for t in status["triggers"]} == {"min CR": (1, 1), "cap fill": (1, 0)}
    plain = kpi(service_env, "status")
    assert plain.returncode == 0 and "0.004" in plain.stdout and "Per trigger" in plain.stdout


def test_dead_list_and_replay(start_service, service_env, exchange, bus):
    service = start_service("trigger_checker")
    bus.publish_raw(METRIC_LOADED, b"{broken")
    names = queue_names(exchange, "trigger_checker")
    wait_for(lambda: queue_depth(names.dead) == 1, what="the dead letter")
    service.terminate()

    result = kpi(service_env, "dead", "list", "trigger_checker")
    assert result.returncode == 0, result.stderr
    assert "1 dead letter(s)" in result.stdout and "not valid JSON" in result.stdout
    assert queue_depth(names.dead) == 1  # listing does not consume

    result = kpi(service_env, "dead", "replay", "trigger_checker")
    assert result.returncode == 0 and "replayed 1" in result.stdout
    assert queue_depth(names.dead) == 0
    assert [body for _, body in drain(names.work)] == [b"{broken"]
