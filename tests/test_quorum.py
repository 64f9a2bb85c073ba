"""Quorum queues: the attempt number a handler sees, and the delivery limit as the last
guard against a message that kills every process that takes it."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from shared.events import METRIC_LOADED, encode, new_event
from shared.handling import RetryableError
from shared.rabbitmq import Bus, Consumer, QueueOptions, queue_names
from testkit.broker import consuming
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for
from tests.support import AMQP_URL, drain, queue_depth


def metric_loaded(value: float = 0.5):
    measured_at = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    return new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": "cr", "offer_id": 1, "affiliate_id": 1, "value": value, "measured_at": measured_at}]},
        correlation_id="test")


def test_the_attempt_number_counts_retries_and_returns_but_not_a_publishers_delivery_count(bus, exchange, tmp_path):
    seen = []

    def flaky(envelope, delivery):
        seen.append((delivery.attempt, delivery.redelivered))
        if len(seen) == 1:
            raise RetryableError("database down")

    # A publisher's own x-delivery-count: RabbitMQ leaves it on the first delivery.
    event = metric_loaded()
    bus.publish_raw(METRIC_LOADED, encode(event), message_id=str(event.event_id), type=METRIC_LOADED,
                    headers={"x-delivery-count": 7})
    consumer = Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker", handler=flaky,
                        retry_limit=5, retry_delay_ms=20)
    with consuming(consumer):
        wait_for(lambda: len(seen) == 2, what="the retry")
    assert seen == [(1, False), (2, False)]  # the retry is counted by our header, the forged count ignored

    # A consumer killed holding the message: the broker counts the return.
    holder = ServiceProcess("blocking", {}, tmp_path, module="tests.blocking_consumer", args=[exchange]).start()
    event = metric_loaded()
    bus.publish(event)
    wait_for(lambda: f"holding {event.event_id}" in holder.log(), what="the blocking consumer to take the message")
    holder.kill()
    seen.clear()
    consumer = Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker", handler=flaky)
    with consuming(consumer):
        wait_for(lambda: consumer.stats.handled == 1, what="the returned message")
    assert seen == [(2, True)]


def blocked_backends(engine) -> int:
    """Sessions of this database waiting for a lock: a trigger_checker in the middle of a message."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")).scalar_one()


def test_a_message_that_kills_its_consumer_every_time_ends_in_the_dead_queue(db, exchange, start_service):
    """The delivery limit (2 here): three deliveries, each ending with the process killed in
    the middle of the message, then RabbitMQ dead-letters it instead of a fourth."""
    bus = Bus(AMQP_URL, exchange, queues=QueueOptions(delivery_limit=2)).connect()
    names = queue_names(exchange, "trigger_checker")
    locker = db.connect()
    transaction = locker.begin()
    try:
        # Every start of the message blocks on its first write, as a handler that hangs would.
        locker.execute(text("LOCK TABLE metric_values IN ACCESS EXCLUSIVE MODE"))
        event = metric_loaded()
        bus.publish(event)
        for delivery in range(1, 4):
            service = start_service("trigger_checker", KPI_DELIVERY_LIMIT="2")
            wait_for(lambda: blocked_backends(db) == delivery, 20, what=f"delivery {delivery} to be in the handler")
            service.kill()
        wait_for(lambda: queue_depth(names.dead) == 1, 20, what="the broker to dead-letter the message")
    finally:
        transaction.rollback()
        locker.close()
        bus.close()
    assert queue_depth(names.work) == 0
    [(properties, body)] = drain(names.dead)
    assert properties.message_id == str(event.event_id) and json.loads(body)["event_id"] == str(event.event_id)
    assert properties.headers["x-first-death-reason"] == "delivery_limit"
    assert properties.headers["x-first-death-queue"] == names.work
    # The killed processes' sessions roll back: nothing of the message was written.
    wait_for(lambda: blocked_backends(db) == 0, what="the killed sessions to end")
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM metric_values")).scalar_one() == 0


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_both_queue_types_run_the_pipeline(db, exchange, start_service, queue_type):
    """KPI_QUEUE_TYPE=classic still works for a deployment that keeps its classic queues."""
    with db.begin() as conn:
        conn.execute(text("INSERT INTO triggers (name, metric_key, operator, threshold) VALUES ('min CR', 'cr', 'lt', 1)"))
    bus = Bus(AMQP_URL, exchange, queues=QueueOptions(queue_type=queue_type)).connect()
    try:
        start_service("trigger_checker", KPI_QUEUE_TYPE=queue_type)
        start_service("event_detector", KPI_QUEUE_TYPE=queue_type)
        bus.publish(metric_loaded(0.5))
        wait_for(lambda: queue_depth(queue_names(exchange, "action_runner").work) == 1, 20,
                 what="the state change to reach the action_runner's queue")
    finally:
        bus.close()
    with db.connect() as conn:
        assert conn.execute(text("SELECT status FROM trigger_states")).scalar_one() == "PROBLEM"


def test_several_amqp_urls_are_tried_in_turn(exchange):
    """AMQP_URL lists the nodes of a cluster: a node that does not answer is skipped."""
    from shared.rabbitmq.topology import redact_url

    nobody = "amqp://guest:secret@127.0.0.1:1/%2F"
    bus = Bus(f"{nobody}, {AMQP_URL}", exchange).connect()
    try:
        assert bus.connected_url == redact_url(AMQP_URL)
        bus.publish(metric_loaded())
        assert bus.queue_depth(queue_names(exchange, "trigger_checker").work) == 1
    finally:
        bus.close()
    assert redact_url(f"{nobody},{AMQP_URL}") == f"amqp://guest:***@127.0.0.1:1/%2F,{redact_url(AMQP_URL)}"
    with pytest.raises(Exception) as failed:
        Bus(nobody, exchange).connect_with_retry(attempts=1)
    assert "secret" not in str(failed.value)
