"""The `kpi` command line against the real broker and database."""

import json
import os
import re
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import text

from shared.db import make_engine
from shared.rabbitmq import H_REASON, queue_names
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


# -- every error path: exit 2 (bad input or configuration) or 3 (unreachable), one line ---------


def one_line_error(result) -> str:
    """The command's only line of stderr, checked to be an error and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kpi: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


@pytest.mark.parametrize("args", [
    ["migrate"], ["seed", str(ROOT / "seeds/example.sql")], ["status"], ["triggers"], ["silence", "list"],
    ["held", "list"], ["backtest", "--from", "2026-11-01T00:00:00Z"],
    ["explain", "--trigger", "min CR", "--offer", "1", "--affiliate", "2"], ["partitions", "list"],
])
def test_every_database_command_exits_3_when_postgresql_is_unreachable(service_env, args):
    result = kpi({**service_env, "DATABASE_URL": "postgresql+psycopg2://u:topsecret@127.0.0.1:1/x"}, *args)
    assert result.returncode == 3, result.stderr
    assert "PostgreSQL not reachable" in one_line_error(result) and "topsecret" not in result.stderr


@pytest.mark.parametrize("args", [
    ["load", "cr"], ["dead", "list", "trigger_checker"], ["dead", "replay", "metric_loader"], ["queues", "upgrade"],
])
def test_every_broker_command_exits_3_when_rabbitmq_is_unreachable(service_env, args):
    result = kpi({**service_env, "AMQP_URL": "amqp://guest:topsecret@127.0.0.1:1/%2F"}, *args)
    assert result.returncode == 3, result.stderr
    assert "RabbitMQ not reachable" in one_line_error(result) and "topsecret" not in result.stderr


@pytest.mark.parametrize("variable, value, says", [
    ("KPI_PREFETCH", "abc", "KPI_PREFETCH: Input should be a valid integer"),
    ("KPI_QUEUE_TYPE", "lazy", "KPI_QUEUE_TYPE: Input should be 'quorum' or 'classic'"),
    ("KPI_LOOKBACK_HOURS", "0", "KPI_LOOKBACK_HOURS: Input should be greater than 0 (got '0')"),
])
def test_an_invalid_environment_variable_exits_2_with_one_line(service_env, variable, value, says):
    result = kpi({**service_env, variable: value}, "status")
    assert result.returncode == 2
    assert says in one_line_error(result)


def test_migrate_refuses_a_database_at_an_unknown_revision_with_exit_2(service_env):
    name = f"kpi_cli_{uuid.uuid4().hex[:8]}"
    url = create_database(PG_ADMIN_URL, name)
    env = {**service_env, "DATABASE_URL": url}
    try:
        assert kpi(env, "migrate").returncode == 0
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0999_from_a_newer_version'"))
        engine.dispose()
        result = kpi(env, "migrate")
        assert result.returncode == 2
        assert "migration failed: Can't locate revision identified by '0999_from_a_newer_version'" in one_line_error(
            result)
    finally:
        drop_database(PG_ADMIN_URL, name)


def test_load_defaults_to_kpi_lookback_hours(service_env, exchange, bus):
    result = kpi({**service_env, "KPI_LOOKBACK_HOURS": "36"}, "load", "cr")
    assert result.returncode == 0, result.stderr
    [(_, body)] = drain(queue_names(exchange, "metric_loader").work)
    assert json.loads(body)["data"] == {"metric_key": "cr", "lookback_hours": 36}


def test_status_limit_says_there_are_more(service_env, db):
    with db.begin() as conn:
        conn.execute(text("INSERT INTO triggers (id, name, metric_key, operator, threshold) VALUES "
                          "(1, 'min CR', 'cr', 'lt', 0.01)"))
        conn.execute(text(
            "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, check_id,"
            " value, threshold) SELECT 1, 10, a, 'PROBLEM', '2026-11-01T10:00:00Z'::timestamptz + a * interval '1m',"
            " '2026-11-02T10:00:00Z', a, 0.001, 0.01 FROM generate_series(1, 3) AS a"))
    status = json.loads(kpi(service_env, "status", "--json", "--limit", "2").stdout)
    assert [p["affiliate_id"] for p in status["problems"]] == [1, 2]  # the oldest first
    assert status["triggers"][0]["problem"] == 3
    plain = kpi(service_env, "status", "--limit", "2")
    assert plain.returncode == 0 and "Pairs in PROBLEM (2+):" in plain.stdout
    assert "Pairs in PROBLEM (3):" in kpi(service_env, "status", "--limit", "5").stdout


def test_dead_list_and_replay_limits_say_what_they_left_out(service_env, exchange, bus):
    names = queue_names(exchange, "trigger_checker")
    for n in range(3):
        bus.send_to_queue(names.dead, f"{{broken {n}".encode(), message_id=f"m{n}", type=METRIC_LOADED,
                          headers={H_REASON: "not valid JSON"})
    result = kpi(service_env, "dead", "list", "trigger_checker", "--json", "--limit", "2")
    assert result.returncode == 0
    assert len(json.loads(result.stdout)) == 2
    assert result.stderr.strip() == "kpi: 2 of 3 dead letter(s) shown (--limit)"
    result = kpi(service_env, "dead", "list", "trigger_checker", "--json")
    assert len(json.loads(result.stdout)) == 3 and result.stderr == ""
    result = kpi(service_env, "dead", "list", "trigger_checker", "--limit", "1")
    assert result.stdout.startswith(f"3 dead letter(s) in {names.dead}; the first 1 shown (--limit)")
    assert queue_depth(names.dead) == 3  # listing does not consume

    result = kpi(service_env, "dead", "replay", "trigger_checker", "--limit", "2")
    assert result.returncode == 0 and f"replayed 2 message(s) from {names.dead}" in result.stdout
    assert (queue_depth(names.dead), queue_depth(names.work)) == (1, 2)


def test_a_replay_the_broker_refuses_exits_2_and_keeps_the_letters(service_env, exchange, bus):
    names = queue_names(exchange, "trigger_checker")
    bus.send_to_queue(names.dead, b"{broken", message_id="m1", type=METRIC_LOADED, headers={H_REASON: "x"})
    # The work queue refuses every message: over its length of 0 already (a quorum queue
    # lets in the one message that takes it over its limit), each publish is nacked.
    bus.send_to_queue(names.work, b"{}", message_id="m0", type=METRIC_LOADED, headers={})
    policy = f"kpi-test-refuse-{exchange}"
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "--apply-to", "queues", "--priority", "100", policy,
                    f"^{re.escape(names.work)}$", '{"max-length": 0, "overflow": "reject-publish"}'],
                   check=True, capture_output=True, timeout=60)
    try:
        wait_for(lambda: _policy_of(names.work) == policy, what="the policy to apply")
        result = kpi(service_env, "dead", "replay", "trigger_checker")
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy], check=True, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert "replay stopped: " in one_line_error(result) and f"still in {names.dead}" in result.stderr
    assert (queue_depth(names.dead), queue_depth(names.work)) == (1, 1)


def _policy_of(queue: str) -> str | None:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "policy", "--no-table-headers"],
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        name, _, policy = line.partition("\t")
        if name == queue:
            return policy.strip() or None
    return None
