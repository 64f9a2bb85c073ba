"""RabbitMQ permissions per service, on this machine's broker: a non-admin user per
service (made for the test, unique names, deleted afterwards) can do its service's work
and nothing of the others'."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pika
import pika.exceptions as amqp
import pytest

from shared.events import Envelope, new_event
from shared.rabbitmq import SERVICE_BINDINGS, Bus, PublishError, queue_names
from shared.rabbitmq.permissions import PUBLISHES, USERS, definitions
from testkit.broker import delete_topology_at
from tests.support import AMQP_URL, ROOT

pytestmark = pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed")


def _rabbitmqctl(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"rabbitmqctl {args[0]} failed (it needs root, as CI has): {result.stderr.strip()}")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[str, dict[str, str]]]:
    """An exchange with its topology declared by the administrator, and role -> the URL
    of a user with that role's permissions."""
    run = uuid.uuid4().hex[:10]
    exchange = f"kpi.perm.{run}"
    users = {role: (f"kpi_t{run}_{role}", uuid.uuid4().hex) for role in USERS}
    host = AMQP_URL.split("@", 1)[1]
    urls = {role: f"amqp://{user}:{quote(password, safe='')}@{host}" for role, (user, password) in users.items()}
    try:
        with Bus(AMQP_URL, exchange).connect():
            pass  # the whole topology, as an administrator declares it
        _rabbitmqctl("import_definitions", stdin=json.dumps(definitions(exchange, users)))
        yield exchange, urls
    finally:
        names = "[" + ",".join(f'<<"{user}">>' for user, _ in users.values()) + "]"
        _rabbitmqctl("eval", f"lists:foreach(fun(U) -> rabbit_auth_backend_internal:delete_user(U, <<\"test\">>) "
                             f"end, {names}).")
        delete_topology_at(AMQP_URL, exchange)


def _event(routing_key: str) -> Envelope:
    """An envelope of that type (the bus does not look inside its data)."""
    return new_event(routing_key, {}, correlation_id="permissions")


def _refused(action) -> bool:
    try:
        action()
    except (amqp.ChannelClosedByBroker, PublishError) as exc:
        code = getattr(exc, "reply_code", None) or getattr(getattr(exc, "__cause__", None), "reply_code", None)
        assert code in (403, None), exc
        return True
    return False


def _channel(url: str) -> pika.adapters.blocking_connection.BlockingChannel:
    return pika.BlockingConnection(pika.URLParameters(url)).channel()


@pytest.mark.parametrize("service", list(SERVICE_BINDINGS))
def test_a_service_user_does_its_work_and_no_other(world, service):
    exchange, urls = world
    url = urls[service]
    own = queue_names(exchange, service)
    with Bus(url, exchange).connect() as bus:  # declares what it may, checks the rest
        for routing_key in PUBLISHES[service]:  # operation.executed: no queue of ours is bound to it
            bus.publish(_event(routing_key), mandatory=routing_key != "operation.executed")
        bus.send_to_queue(own.retry, b"{}", message_id="m1", type="x", headers={}, expiration_ms=60_000)
        bus.send_to_queue(own.dead, b"{}", message_id="m2", type="x", headers={})
    channel = _channel(url)
    try:
        channel.basic_get(own.work, auto_ack=False)  # its own queue: allowed
        channel.basic_consume(own.work, lambda *args: None)
    finally:
        channel.connection.close()

    others = [s for s in SERVICE_BINDINGS if s != service]
    foreign_keys = sorted({key for role in USERS for key in PUBLISHES[role]} - set(PUBLISHES[service]))
    for routing_key in foreign_keys:
        with Bus(url, exchange).connect() as bus:
            assert _refused(lambda: bus.publish(_event(routing_key))), f"{service} published {routing_key}"
    for other in others:
        names = queue_names(exchange, other)
        for action in (lambda ch: ch.basic_get(names.work, auto_ack=False),
                       lambda ch: ch.queue_delete(names.work),
                       lambda ch: ch.queue_purge(names.dead),
                       lambda ch: ch.queue_bind(names.work, exchange, routing_key="#")):
            channel = _channel(url)
            try:
                assert _refused(lambda: action(channel)), f"{service} reached {other}'s queues"
            finally:
                if channel.connection.is_open:
                    channel.connection.close()
    channel = _channel(url)
    try:
        assert _refused(lambda: channel.exchange_declare(f"{exchange}.other", exchange_type="topic"))
    finally:
        if channel.connection.is_open:
            channel.connection.close()


def test_the_console_user_releases_held_runs_and_reads_dead_letters_only(world):
    exchange, urls = world
    url = urls["console"]
    with Bus(url, exchange).connect() as bus:
        bus.publish(_event("trigger.event.problem"))
        assert _refused(lambda: bus.publish(_event("metric.loaded")))
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        channel = _channel(url)
        try:
            channel.basic_get(names.dead, auto_ack=False)  # allowed: the /dead page reads and hands back
            assert _refused(lambda: channel.basic_get(names.work, auto_ack=False))
        finally:
            if channel.connection.is_open:
                channel.connection.close()


def test_a_node_that_loads_the_definitions_at_boot_has_the_users_and_no_guest(tmp_path):
    """What the compose file does: `kpi broker definitions` writes them, RabbitMQ loads
    them at boot (load_definitions), on a node of the test's own."""
    from shutil import chown

    from scripts.rabbit_cluster import RUN_AS, missing_requirement
    from testkit.tls import extra_rabbitmq

    if missing_requirement():
        pytest.skip(missing_requirement())
    exchange = f"kpi.boot.{uuid.uuid4().hex[:8]}"
    passwords = {f"KPI_AMQP_PASSWORD_{role.upper()}": uuid.uuid4().hex for role in [*USERS, "admin"]}
    path = tmp_path / "definitions.json"
    result = subprocess.run([sys.executable, "-m", "shared.cli", "broker", "definitions", "--output", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "KPI_EXCHANGE": exchange, **passwords})
    assert result.returncode == 0, result.stderr

    def configure(directory):
        target = directory / "definitions.json"
        target.write_bytes(path.read_bytes())
        chown(target, RUN_AS, RUN_AS)
        return f"load_definitions = {target}\n"

    with extra_rabbitmq(configure) as port:
        def url(user: str, password: str) -> str:
            return f"amqp://{user}:{password}@127.0.0.1:{port}/%2F"

        with Bus(url("kpi", passwords["KPI_AMQP_PASSWORD_ADMIN"]), exchange).connect():
            pass  # the administrator declares the topology (the compose file's migrate job)
        with Bus(url("kpi_trigger_checker", passwords["KPI_AMQP_PASSWORD_TRIGGER_CHECKER"]), exchange).connect() as bus:
            bus.publish(_event("trigger.checked"))
            assert _refused(lambda: bus.publish(_event("trigger.event.problem")))
        with pytest.raises(amqp.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(url("guest", "guest")))


def test_a_service_process_runs_with_its_own_user_and_role(world, tmp_path):
    """The trigger_checker as deployed: its RabbitMQ user and its PostgreSQL role. It
    consumes, records, publishes its event and dead-letters a bad message."""
    from datetime import datetime, timezone

    from sqlalchemy import text

    from shared.db import make_engine
    from shared.sql import run_script
    from testkit.database import service_roles, temporary_database
    from testkit.processes import ServiceProcess
    from testkit.waiting import wait_for
    from tests.support import PG_ADMIN_URL, queue_depth

    exchange, urls = world
    with temporary_database(PG_ADMIN_URL, "kpi_perm") as url, service_roles(PG_ADMIN_URL, url) as roles_urls:
        owner = make_engine(url)
        run_script(owner, (ROOT / "seeds/example.sql").read_text())
        service = ServiceProcess("trigger_checker", {"DATABASE_URL": roles_urls["trigger_checker"],
                                                     "AMQP_URL": urls["trigger_checker"], "KPI_EXCHANGE": exchange},
                                 tmp_path).start(timeout=60)
        try:
            measured = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
            detector, checker = queue_names(exchange, "event_detector"), queue_names(exchange, "trigger_checker")
            # The module's other tests share this exchange and may have left messages in both queues.
            before = queue_depth(detector.work), queue_depth(checker.dead)
            with Bus(AMQP_URL, exchange).connect() as admin:
                admin.publish(new_event("metric.loaded", {"metrics": [
                    {"metric_key": "cr", "offer_id": 1, "affiliate_id": 2, "value": 0.001, "measured_at": measured}]}))
                admin.publish_raw("metric.loaded", b"not json", message_id="bad", type="metric.loaded")
            wait_for(lambda: queue_depth(detector.work) > before[0] and queue_depth(checker.dead) > before[1], 60,
                     what="trigger.checked published and the bad message dead-lettered")
            with owner.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM trigger_checks")) >= 1
            # Refused only the other services' queues (declared by the administrator instead).
            assert service.alive() and "Traceback" not in service.log(), service.log()
            assert "kpi.perm" in service.log() and f"{checker.work}' in vhost '/' refused" not in service.log()
        finally:
            service.terminate()
            owner.dispose()
