"""`kpi queues upgrade`: a deployment's classic queues become quorum queues with every
message kept, also when the upgrade is interrupted and run again; a process that meets
queues of the other type says so in one line instead of retrying."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pika
import pika.exceptions as amqp
import pytest

from shared import cli
from shared.rabbitmq import SERVICE_BINDINGS, Bus, QueueMismatchError, QueueOptions, queue_names
from shared.rabbitmq.migration import upgrade_queues
from shared.rabbitmq.topology import declare_topology, holding_queue
from testkit.waiting import wait_for
from tests.support import AMQP_URL

CLASSIC = QueueOptions(queue_type="classic")
QUORUM = QueueOptions()
LONG_DELAY_MS = "600000"  # still waiting in the retry queue when the test looks
SHORT_DELAY_MS = "1500"  # expires during or after the upgrade: ends in the work queue
PUBLISHED_KEY = {"metric_loader": "metric.load.requested", "trigger_checker": "metric.loaded",
                 "event_detector": "trigger.checked", "action_runner": "trigger.event.problem"}


def every_queue(exchange: str) -> list[str]:
    queues = []
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        queues += [names.work, names.retry, names.dead]
    return queues


@pytest.fixture
def broker(exchange: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.confirm_delivery()
    yield channel
    cleanup = connection.channel() if channel.is_closed else channel
    for queue in every_queue(exchange):
        cleanup.queue_delete(holding_queue(queue))
    connection.close()


def in_flight(channel, exchange: str) -> Counter:
    """Messages in every kind of queue of a classic deployment: {(message id, where it must end up)}."""
    declare_topology(channel, exchange, CLASSIC)
    expected: Counter = Counter()
    for service in SERVICE_BINDINGS:
        names = queue_names(exchange, service)
        for i in range(7):
            message_id = f"{service}-work-{i}"
            channel.basic_publish(exchange, PUBLISHED_KEY[service], b'{"n": %d}' % i, pika.BasicProperties(
                message_id=message_id, type=PUBLISHED_KEY[service], delivery_mode=2,
                content_type="application/json", headers={"x-kpi-retry-count": 1, "x-other": "kept"}),
                mandatory=True)
            expected[message_id, names.work] += 1
        for i, delay in enumerate([SHORT_DELAY_MS, SHORT_DELAY_MS, LONG_DELAY_MS, LONG_DELAY_MS]):  # one delay per queue in real life: a message expires at the head only
            message_id = f"{service}-retry-{i}"
            channel.basic_publish("", names.retry, b"{}", pika.BasicProperties(
                message_id=message_id, delivery_mode=2, expiration=delay, headers={"x-kpi-retry-count": 2}))
            expected[message_id, names.retry if delay == LONG_DELAY_MS else names.work] += 1
        for i in range(3):
            message_id = f"{service}-dead-{i}"
            channel.basic_publish("", names.dead, b"{}", pika.BasicProperties(
                message_id=message_id, delivery_mode=2, headers={"x-kpi-dead-reason": "bad"}))
            expected[message_id, names.dead] += 1
    return expected


def assert_quorum(channel, exchange: str) -> None:
    declare_topology(channel, exchange, QUORUM)  # the same declaration again: accepted
    probe = channel.connection.channel()
    with pytest.raises(QueueMismatchError, match="x-queue-type is quorum on the broker, classic here"):
        declare_topology(probe, exchange, CLASSIC)


def collect(channel, exchange: str) -> Counter:
    """Every message left, by (message id, queue), once the short delays are over; checks
    what each kind of message kept."""
    retry_queues = [queue_names(exchange, s).retry for s in SERVICE_BINDINGS]
    wait_for(lambda: all(channel.queue_declare(q, passive=True).method.message_count == 2 for q in retry_queues),
             15, what="the short delays to expire into the work queues")
    found: Counter = Counter()
    for queue in every_queue(exchange):
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            found[properties.message_id, queue] += 1
            headers = properties.headers or {}
            assert "x-kpi-upgrade-expiration" not in headers
            if queue.endswith(".retry"):
                assert properties.expiration == LONG_DELAY_MS and headers["x-kpi-retry-count"] == 2
            elif "-work-" in properties.message_id:
                assert headers["x-other"] == "kept" and properties.content_type == "application/json"
                assert properties.type == PUBLISHED_KEY[properties.message_id.split("-")[0]]
    return found


def run_cli(monkeypatch, capsys, exchange: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    monkeypatch.setenv("KPI_EXCHANGE", exchange)
    code = cli.main(["queues", "upgrade", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_upgrade_moves_every_message_of_every_kind_of_queue(broker, exchange, monkeypatch, capsys):
    expected = in_flight(broker, exchange)
    code, out, err = run_cli(monkeypatch, capsys, exchange)
    assert code == 0, err
    assert f"{queue_names(exchange, 'trigger_checker').work}: redeclared (x-queue-type is classic on the broker, " \
           f"quorum here), 7 message(s) kept" in out
    assert out.strip().endswith(f"queues of {exchange}: quorum queues (delivery limit 20); 12 redeclared, "
                                f"{sum(expected.values())} message(s) moved")
    assert_quorum(broker, exchange)
    # Run again: nothing to do, nothing moved.
    code, out, _ = run_cli(monkeypatch, capsys, exchange)
    assert code == 0 and "0 redeclared, 0 message(s) moved" in out
    assert collect(broker, exchange) == expected
    for queue in every_queue(exchange):  # no holding queue left behind
        probe = broker.connection.channel()
        with pytest.raises(amqp.ChannelClosedByBroker, match="NOT_FOUND"):
            probe.queue_declare(holding_queue(queue), passive=True)


@pytest.mark.parametrize("step, which", [
    ("unbound", "work"),
    ("moved", "work"),  # a first batch of the work queue is parked, the rest still there
    ("deleted", "work"),  # the work queue is gone, its messages wait in the holding queue
    ("moved", "holding work"),  # half restored
    ("deleted", "retry"),  # the retry queue is gone, its messages parked
    ("before delete", "dead"),
])
def test_an_interrupted_upgrade_finishes_when_run_again(broker, exchange, step, which):
    expected = in_flight(broker, exchange)
    names = queue_names(exchange, "event_detector")
    queue = {"work": names.work, "retry": names.retry, "dead": names.dead,
             "holding work": holding_queue(names.work)}[which]

    def crash(at: str, on: str) -> None:
        if (at, on) == (step, queue):
            raise KeyboardInterrupt(f"stopped at {at} {on}")

    bus = Bus(AMQP_URL, exchange, queues=QUORUM).connect(declare=False)
    with pytest.raises(KeyboardInterrupt):
        upgrade_queues(bus, batch=3, checkpoint=crash)
    bus.close()
    # A process that starts meanwhile meets classic queues (or, for a missing one, declares it).
    bus = Bus(AMQP_URL, exchange, queues=QUORUM).connect(declare=False)
    report = upgrade_queues(bus, batch=3)
    bus.close()
    assert report.queues and len(report.queues) == 12
    assert_quorum(broker, exchange)
    assert collect(broker, exchange) == expected


def test_upgrade_refuses_while_a_service_consumes(broker, exchange, monkeypatch, capsys):
    declare_topology(broker, exchange, CLASSIC)
    work = queue_names(exchange, "trigger_checker").work
    broker.basic_consume(work, lambda *args: None)
    code, _, err = run_cli(monkeypatch, capsys, exchange)
    assert code == 2
    assert f"stop the services first: consumers on {work} (1)" in err
    broker.close()
    probe = broker.connection.channel()
    declare_topology(probe, exchange, CLASSIC)  # nothing was changed


def test_a_service_meeting_classic_queues_says_what_to_do_in_one_line(broker, exchange, start_service):
    declare_topology(broker, exchange, CLASSIC)
    service = start_service("trigger_checker", wait_ready=False)
    assert service.wait(30) == 4
    log = service.log()
    assert "Traceback" not in log and log.count("kpi queues upgrade") == 2  # the log line and stderr
    line = next(line for line in log.splitlines() if line.startswith("trigger_checker: cannot start"))
    work = queue_names(exchange, "metric_loader").work
    assert line == (f"trigger_checker: cannot start: queue {work} exists with other arguments than this process "
                    "declares (x-queue-type is classic on the broker, quorum here); stop the services and run "
                    "`kpi queues upgrade` with the new settings, or set KPI_QUEUE_TYPE and KPI_DELIVERY_LIMIT to what "
                    "the queues have")
    # The same deployment started as classic runs.
    start_service("trigger_checker", KPI_QUEUE_TYPE="classic")


def test_the_cli_says_so_too(broker, exchange, monkeypatch, capsys):
    declare_topology(broker, exchange, CLASSIC)
    monkeypatch.setenv("AMQP_URL", AMQP_URL)
    monkeypatch.setenv("KPI_EXCHANGE", exchange)
    assert cli.main(["load", "cr"]) == 2
    assert "`kpi queues upgrade`" in capsys.readouterr().err
    with pytest.raises(QueueMismatchError, match="x-queue-type is classic on the broker, quorum here"):
        Bus(AMQP_URL, exchange).connect()


def test_another_delivery_limit_is_an_upgrade_too(broker, exchange, monkeypatch, capsys):
    declare_topology(broker, exchange, QUORUM)
    work = queue_names(exchange, "action_runner").work
    broker.basic_publish("", work, b"{}", pika.BasicProperties(message_id="kept", delivery_mode=2))
    monkeypatch.setenv("KPI_DELIVERY_LIMIT", "5")
    code, out, err = run_cli(monkeypatch, capsys, exchange)
    assert code == 0, err
    assert f"{work}: redeclared (x-delivery-limit is 20 on the broker, 5 here), 1 message(s) kept" in out
    assert "4 redeclared" in out  # the work queues only
    declare_topology(broker, exchange, QueueOptions(delivery_limit=5))
    method, properties, _ = broker.basic_get(work, auto_ack=True)
    assert properties.message_id == "kept"
