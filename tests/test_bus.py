"""The bus against the real RabbitMQ: publish, consume, ack, dead letters, retries."""

import json
from datetime import datetime, timezone

import pytest

from shared.handling import HandlerResult, RetryableError
from shared.rabbitmq import H_HISTORY, H_REASON, H_RETRIES, Bus, Consumer, PublishError, queue_names, read_dead_letters, replay_dead_letters
from shared.events import METRIC_LOADED, new_event
from shared.profiling import top_functions
from testkit.broker import channel, consuming
from testkit.processes import ServiceProcess
from testkit.waiting import wait_for
from tests.support import AMQP_URL, drain, queue_depth


def metric_event(value=0.5):
    return new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": "cr", "offer_id": 1, "affiliate_id": 2, "value": value,
         "measured_at": datetime(2026, 11, 1, tzinfo=timezone.utc).isoformat()}]})


def running(consumer: Consumer):
    return consuming(consumer, stop_within=10)


def make_consumer(exchange, handler, **kwargs) -> Consumer:
    kwargs.setdefault("retry_delay_ms", 50)
    return Consumer(amqp_url=AMQP_URL, exchange=exchange, service="trigger_checker", handler=handler, **kwargs)


def test_topology_names_derive_from_the_exchange(bus, exchange):
    names = queue_names(exchange, "event_detector")
    assert (names.work, names.retry, names.dead) == (
        f"{exchange}.event_detector", f"{exchange}.event_detector.retry", f"{exchange}.event_detector.dead")
    for queue in (names.work, names.retry, names.dead):
        assert queue_depth(queue) == 0  # declared by connecting


def test_published_message_is_consumed_and_acked_once(bus, exchange):
    seen = []
    event = metric_event()
    with running(make_consumer(exchange, lambda e, d: seen.append(e.event_id))) as consumer:
        bus.publish(event)
        wait_for(lambda: consumer.stats.handled == 1, what="the message to be handled")
    assert seen == [event.event_id]
    names = queue_names(exchange, "trigger_checker")
    assert queue_depth(names.work) == 0  # acked: nothing comes back after the consumer left
    assert queue_depth(names.dead) == 0


def test_publishing_to_a_key_nobody_is_bound_to_raises(bus):
    with pytest.raises(PublishError, match="unroutable"):
        bus.publish_raw("nobody.listens.here", b"{}")


def test_a_batch_is_confirmed_as_a_whole_and_an_unroutable_message_fails_it(bus, exchange):
    events = [metric_event(value=i / 10) for i in range(5)]
    bus.publish_many(events)
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 5

    with pytest.raises(PublishError, match="'nobody.listens.here' is unroutable"):
        with bus.batch():
            bus.publish(metric_event())
            bus.publish_raw("nobody.listens.here", b"{}")
            bus.publish(metric_event())
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 7  # the routable ones went through
    bus.publish(metric_event())  # the failure is not blamed on the next message
    assert queue_depth(queue_names(exchange, "trigger_checker").work) == 8


def test_a_consumer_killed_before_its_ack_gets_the_message_again(bus, exchange, tmp_path):
    holder = ServiceProcess("blocking", {}, tmp_path, module="tests.blocking_consumer", args=[exchange]).start()
    event = metric_event()
    bus.publish(event)
    wait_for(lambda: f"holding {event.event_id}" in holder.log(), what="the blocking consumer to take the message")
    names = queue_names(exchange, "trigger_checker")
    assert queue_depth(names.work) == 0  # delivered, unacked
    holder.kill()  # SIGKILL: no ack, no clean close
    wait_for(lambda: queue_depth(names.work) == 1, what="the message to return to the queue")

    seen = []
    with running(make_consumer(exchange, lambda e, d: seen.append(e.event_id))) as consumer:
        wait_for(lambda: consumer.stats.handled == 1)
    assert seen == [event.event_id]


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "not valid JSON"),
    (None, "data.metrics.0.offer_id: Field required"),
    ("nan", "metrics.0.value: Input should be a finite number"),
])
def test_invalid_messages_go_to_the_dead_queue_with_a_reason(bus, exchange, body, reason):
    if body is None:
        event = json.loads(metric_event().model_dump_json())
        del event["data"]["metrics"][0]["offer_id"]
        body = json.dumps(event).encode()
        reason = "metrics.0.offer_id: Field required"
    elif body == "nan":
        body = metric_event().model_dump_json().replace('"value":0.5', '"value":NaN').encode()
        assert b"NaN" in body

    from shared.events import parse_data

    handled = []

    def handler(envelope, delivery):
        parse_data(envelope)
        handled.append(envelope.event_id)

    good = metric_event()
    with running(make_consumer(exchange, handler)) as consumer:
        bus.publish_raw(METRIC_LOADED, body)
        bus.publish(good)  # the queue moves on
        wait_for(lambda: consumer.stats.handled == 2)
    assert handled == [good.event_id]
    dead = read_dead_letters(bus, "trigger_checker")
    assert len(dead) == 1
    assert reason in dead[0]["reason"]
    assert dead[0]["routing_key"] == METRIC_LOADED
    assert dead[0]["body"].encode() == body


def test_retryable_error_is_retried_then_dead_lettered_with_history(bus, exchange):
    attempts = []

    def handler(envelope, delivery):
        attempts.append(envelope.event_id)
        raise RetryableError(f"database down (attempt {len(attempts)})")

    event = metric_event()
    with running(make_consumer(exchange, handler, retry_limit=3)):
        bus.publish(event)
        names = queue_names(exchange, "trigger_checker")
        wait_for(lambda: queue_depth(names.dead) == 1, what="the message in the dead queue")
    assert attempts == [event.event_id] * 4  # first try + 3 retries
    [(properties, body)] = drain(queue_names(exchange, "trigger_checker").dead)
    assert properties.headers[H_RETRIES] == 3
    assert "gave up after 4 attempts" in properties.headers[H_REASON]
    assert [h.split(":")[0] for h in properties.headers[H_HISTORY]] == [f"attempt {i}" for i in range(1, 5)]
    assert properties.message_id == str(event.event_id)
    assert json.loads(body)["event_id"] == str(event.event_id)


def test_a_retry_that_succeeds_is_handled_once(bus, exchange):
    attempts = []

    def handler(envelope, delivery):
        attempts.append(envelope.event_id)
        if len(attempts) < 3:
            raise RetryableError("flaky")

    with running(make_consumer(exchange, handler, retry_limit=5)) as consumer:
        bus.publish(metric_event())
        wait_for(lambda: len(attempts) == 3)
        wait_for(lambda: consumer.stats.handled == 3)
    names = queue_names(exchange, "trigger_checker")
    assert queue_depth(names.dead) == 0 and queue_depth(names.work) == 0 and queue_depth(names.retry) == 0


def test_dead_letters_can_be_replayed(bus, exchange):
    fail = [True]
    handled = []

    def handler(envelope, delivery):
        if fail[0]:
            raise RetryableError("down")
        handled.append(envelope.event_id)

    event = metric_event()
    names = queue_names(exchange, "trigger_checker")
    with running(make_consumer(exchange, handler, retry_limit=0)):
        bus.publish(event)
        wait_for(lambda: queue_depth(names.dead) == 1)
        fail[0] = False
        assert replay_dead_letters(bus, "trigger_checker") == 1
        wait_for(lambda: handled == [event.event_id])
    assert queue_depth(names.dead) == 0


def test_an_unroutable_output_is_retried_then_dead_lettered_never_dropped(bus, exchange):
    attempts = []

    def handler(envelope, delivery):
        attempts.append(delivery.attempt)
        return HandlerResult(events=[new_event("trigger.checked", {"checks": []})])

    names = queue_names(exchange, "trigger_checker")
    with running(make_consumer(exchange, handler, retry_limit=1)) as consumer:
        with channel(AMQP_URL) as ch:  # after the consumer declared the topology: trigger.checked routes nowhere
            ch.queue_delete(queue_names(exchange, "event_detector").work)
        bus.publish(metric_event())
        wait_for(lambda: queue_depth(names.dead) == 1, what="the message to be dead-lettered")
        wait_for(lambda: consumer.stats.handled == 2, what="both attempts to finish")
    assert attempts == [1, 2], "the failed publish was retried through the retry queue once"
    assert queue_depth(names.work) == 0 and queue_depth(names.retry) == 0
    [letter] = read_dead_letters(bus, "trigger_checker", 10)
    assert "'trigger.checked' is unroutable" in letter["reason"]


def test_handler_outputs_are_published_before_the_ack(bus, exchange):
    """Outputs go out with confirms and persistent, under their own message ids."""
    out = new_event("trigger.checked", {"checks": []})

    def handler(envelope, delivery):
        return HandlerResult(events=[out])

    with running(make_consumer(exchange, handler, retry_limit=0)):
        bus.publish(metric_event())
        wait_for(lambda: queue_depth(queue_names(exchange, "event_detector").work) == 1)
    [(properties, body)] = drain(queue_names(exchange, "event_detector").work)
    assert properties.message_id == str(out.event_id) and properties.delivery_mode == 2


def test_after_publish_runs_once_the_outputs_are_confirmed(bus, exchange):
    out = new_event("trigger.checked", {"checks": []})
    seen = []

    def handler(envelope, delivery):
        def published():
            # the output is already on its queue when the hook runs
            seen.append(queue_depth(queue_names(exchange, "event_detector").work))
        return HandlerResult(events=[out], after_publish=published)

    with running(make_consumer(exchange, handler)) as consumer:
        bus.publish(metric_event())
        wait_for(lambda: consumer.stats.handled == 1)
    assert seen == [1]


def test_stop_hands_back_what_it_holds_instead_of_draining_the_queue(bus, exchange):
    handled = []

    def handler(envelope, delivery):
        handled.append(envelope.event_id)
        consumer.stop()

    consumer = make_consumer(exchange, handler, prefetch=50)
    events = [metric_event() for _ in range(20)]
    for event in events:
        bus.publish(event)
    with running(consumer):
        wait_for(lambda: handled, what="the first message")
    # stop() was asked during the first message: every other delivery went back to the queue
    assert len(handled) == 1
    names = queue_names(exchange, "trigger_checker")
    wait_for(lambda: queue_depth(names.work) == 19)
    assert queue_depth(names.retry) == 0 and queue_depth(names.dead) == 0


def test_a_profiled_consumer_writes_each_threads_cpu_profile_when_it_stops(bus, exchange, tmp_path):
    def busy_handler(envelope, delivery):
        sum(i * i for i in range(200_000))  # CPU the profile must show, in this function

    with running(make_consumer(exchange, busy_handler, profile_dir=str(tmp_path))) as consumer:
        bus.publish(metric_event())
        wait_for(lambda: consumer.stats.handled == 1, what="the message to be handled")
        assert not list(tmp_path.glob("*.prof"))  # written at shutdown
    profiles = sorted(p.name for p in tmp_path.glob("*.prof"))
    assert profiles == ["trigger_checker.connection.prof", "trigger_checker.worker.prof"]
    top = top_functions([tmp_path / "trigger_checker.worker.prof"], limit=5)
    assert "busy_handler" in top and "total CPU in profiled threads" in top
