"""trigger_checker and event_detector as real processes on the real broker and database.

Published trigger events are read from the action_runner's work queue (bound to
trigger.event.* by the topology; no action_runner runs here).
"""

import json
import random
from collections import Counter

from sqlalchemy import text

from services.trigger_checker.handler import handle_metric_loaded
from shared.rabbitmq import queue_names, read_dead_letters
from shared.events import new_event
from testkit.waiting import wait_for
from tests.support import drain, queue_depth
from tests.trigger_scenario import (
    BATCHES, actual_checks, actual_events, actual_states, as_model_events, assert_consistent_history, at,
    check_items, checked_message, expected_checks, metric_loaded, model_of_batches, model_of_whole_pairs,
    published_events, seed,
)


def handled(*services) -> int:
    return sum(service.log().count("message handled") for service in services)


def wait_handled(services, expected: int, what: str) -> None:
    wait_for(lambda: handled(*services) >= expected, 30, what=f"{expected} {what} messages handled")
    assert handled(*services) == expected


def trigger_names(db) -> dict[int, str]:
    with db.connect() as conn:
        return dict(conn.execute(text("SELECT id, name FROM triggers")).all())


def event_ids(db) -> set[int]:
    with db.connect() as conn:
        return set(conn.execute(text("SELECT id FROM trigger_events")).scalars())


def assert_published_are_the_recorded_events(db, published: dict[str, dict]) -> None:
    assert sorted(m["data"]["trigger_event_id"] for m in published.values()) == sorted(event_ids(db))


def test_scenario_end_to_end(db, bus, exchange, start_service):
    seed(db)
    checker = start_service("trigger_checker")
    detector = start_service("event_detector")
    messages = [metric_loaded(batch) for batch in BATCHES]
    messages.append(messages[0])  # delivered again, as after a crash before the ack
    for message in messages:
        bus.publish(message)
    wait_handled([checker], len(messages), "metric.loaded")
    wait_handled([detector], len(messages), "trigger.checked")

    model = model_of_batches(BATCHES + [BATCHES[0]])
    assert actual_checks(db) == expected_checks(BATCHES)
    assert actual_states(db) == model.states
    assert Counter(actual_events(db)) == Counter(model.events)
    published = published_events(drain(queue_names(exchange, "action_runner").work))
    assert Counter(as_model_events(published, trigger_names(db))) == Counter(model.events)
    assert_published_are_the_recorded_events(db, published)
    for service in ("trigger_checker", "event_detector"):
        assert queue_depth(queue_names(exchange, service).dead) == 0


def test_three_event_detector_replicas_with_shuffled_duplicated_deliveries(db, bus, exchange, start_service):
    """Every message carries all the checks of its pairs, so the outcome must not depend
    on which replica takes which message, in which order, or how often."""
    seed(db)
    for batch in BATCHES:
        handle_metric_loaded(metric_loaded(batch), engine=db)
    by_pair: dict = {}
    for item in check_items(db):
        by_pair.setdefault((item["trigger_id"], item["offer_id"], item["affiliate_id"]), []).append(item)
    pairs = sorted(by_pair)
    rng = random.Random(7)
    groups = [[p] for p in pairs] + [rng.sample(pairs, rng.randint(2, len(pairs))) for _ in range(12)]
    messages = []
    for group in groups:
        message = checked_message([item for pair in group for item in by_pair[pair]])
        messages += [message, message]  # the same delivery twice
        messages.append(checked_message(message.data["checks"]))  # and as another message
    rng.shuffle(messages)

    replicas = [start_service("event_detector") for _ in range(3)]
    for message in messages:
        bus.publish(message)
    wait_handled(replicas, len(messages), "trigger.checked")
    assert all(handled(replica) > 0 for replica in replicas), "every replica took a share"

    model = model_of_whole_pairs(expected_checks(BATCHES))
    assert actual_states(db) == model.states
    assert Counter(actual_events(db)) == Counter(model.events)
    published = published_events(drain(queue_names(exchange, "action_runner").work))
    assert Counter(as_model_events(published, trigger_names(db))) == Counter(model.events)
    assert_published_are_the_recorded_events(db, published)
    assert queue_depth(queue_names(exchange, "event_detector").dead) == 0


def test_three_event_detector_replicas_with_checks_one_by_one_in_any_order(db, bus, exchange, start_service):
    """One check per message, shuffled and duplicated: the outcome depends on the order by
    design (an older check arriving late is ignored), but the history must stay whole."""
    seed(db)
    rng = random.Random(3)
    handle_metric_loaded(metric_loaded(
        [("cr", 103, a, h, rng.choice([0.01, 0.09])) for a in range(20, 28) for h in range(10)]), engine=db)
    items = check_items(db, "t.name = 'min CR'")
    messages = [checked_message([item]) for item in items]
    messages += rng.sample(messages, len(messages) // 2)  # half of them delivered twice
    messages += [checked_message(rng.sample(items, 10)) for _ in range(20)]
    rng.shuffle(messages)

    replicas = [start_service("event_detector") for _ in range(3)]
    for message in messages:
        bus.publish(message)
    wait_handled(replicas, len(messages), "trigger.checked")

    assert assert_consistent_history(db) >= 8
    published = published_events(drain(queue_names(exchange, "action_runner").work))
    assert_published_are_the_recorded_events(db, published)
    assert queue_depth(queue_names(exchange, "event_detector").dead) == 0


def test_invalid_items_are_dead_lettered_with_reasons_and_the_valid_ones_flow_on(db, bus, exchange, start_service):
    seed(db)
    checker = start_service("trigger_checker")
    detector = start_service("event_detector")
    good = {"metric_key": "cr", "offer_id": 103, "affiliate_id": 9, "value": 0.01, "measured_at": at(0).isoformat()}
    items = [good, {**good, "metric_key": "nope"}, {**good, "affiliate_id": 0},
             {**good, "affiliate_id": 10, "value": 0.5}, {**good, "measured_at": "yesterday"}]
    message = new_event("metric.loaded", {"metrics": items}, correlation_id="run-5")
    bus.publish(message)
    wait_handled([checker], 1, "metric.loaded")
    wait_handled([detector], 1, "trigger.checked")

    [dead] = read_dead_letters(bus, "trigger_checker")
    assert dead["message_id"] == str(message.event_id)
    body = json.loads(dead["body"])
    assert body["event_id"] == str(message.event_id) and body["data"]["metrics"] == [items[1], items[2], items[4]]
    assert "data.metrics.1.metric_key: unknown metric key 'nope'" in dead["reason"]
    assert "data.metrics.2.affiliate_id:" in dead["reason"] and "data.metrics.4.measured_at:" in dead["reason"]
    assert "outcome=handled_partly" in checker.log()

    assert actual_checks(db) == expected_checks([[("cr", 103, 9, 0, 0.01), ("cr", 103, 10, 0, 0.5)]],
                                                {("min CR", 103, 9): 0.05, ("min CR", 103, 10): 0.05,
                                                 ("max CR", 103, 9): None, ("max CR", 103, 10): None})
    published = published_events(drain(queue_names(exchange, "action_runner").work))
    assert [(m["data"]["affiliate_id"], m["data"]["status"], m["correlation_id"]) for m in published.values()] == [
        (9, "PROBLEM", "run-5")]
    assert queue_depth(queue_names(exchange, "event_detector").dead) == 0


def test_redelivery_and_the_same_values_again_give_no_second_check_or_event(db, bus, exchange, start_service):
    seed(db)
    checker = start_service("trigger_checker")
    detector = start_service("event_detector")
    message = metric_loaded(BATCHES[0])
    bus.publish(message)
    wait_handled([detector], 1, "trigger.checked")
    checks, states, events = actual_checks(db), actual_states(db), actual_events(db)
    first = published_events(drain(queue_names(exchange, "action_runner").work))
    assert len(first) == len(events) > 0

    bus.publish(message)  # the same message again
    bus.publish(metric_loaded(BATCHES[0], correlation_id="run-2"))  # the same values in a new message
    wait_handled([checker], 3, "metric.loaded")
    wait_handled([detector], 3, "trigger.checked")
    assert (actual_checks(db), actual_states(db), actual_events(db)) == (checks, states, events)
    again = published_events(drain(queue_names(exchange, "action_runner").work))
    # republished (harmless: same event ids, which downstream dedupes on), never new
    assert set(again) == set(first) and all(again[i]["data"] == first[i]["data"] for i in again)
