"""Debounce and hysteresis through the real services: three event_detector replicas,
checks in any order, duplicated, against a fold written here from DESIGN.md section 6."""

from __future__ import annotations

import random
from collections import defaultdict

from sqlalchemy import text

from services.trigger_checker.handler import handle_metric_loaded
from shared.rabbitmq import queue_names
from testkit.waiting import wait_for
from tests.support import drain, queue_depth
from tests.trigger_scenario import check_items, checked_message, metric_loaded, published_events

OFFERS = (101, 102)
AFFILIATES = range(1, 9)
HOURS = range(16)


def seed(db) -> int:
    """min CR: lt 0.05, PROBLEM after 3 checks in a row, back to OK only at 0.08 or more;
    offer 102 has its own threshold row (0.04) with its own recovery value (0.07)."""
    with db.begin() as conn:
        trigger = conn.execute(text(
            "INSERT INTO triggers (name, metric_key, operator, threshold, for_checks, recovery_threshold) "
            "VALUES ('min CR', 'cr', 'lt', 0.05, 3, 0.08) RETURNING id")).scalar_one()
        conn.execute(text("INSERT INTO trigger_thresholds (trigger_id, scope, offer_id, value, recovery_value) "
                          "VALUES (:t, 'offer', 102, 0.04, 0.07)"), {"t": trigger})
    return trigger


def model(values: list[tuple[int, float]], threshold: float, recovery: float, for_checks: int
          ) -> tuple[str | None, list[tuple[str | None, str]]]:
    """(final status, the changes) of one pair: values (hour, value) folded in hour order."""
    status, run, changes = None, 0, []
    for _, value in sorted(values):
        if value < threshold:
            run += 1
            if status != "PROBLEM" and run >= for_checks:
                changes.append((status, "PROBLEM"))
                status = "PROBLEM"
        else:
            run = 0
            if status is None:
                status = "OK"
            elif status == "PROBLEM" and not value < recovery:
                changes.append(("PROBLEM", "OK"))
                status = "OK"
    return status, changes


def test_debounce_and_hysteresis_with_three_replicas_and_any_order(db, bus, exchange, start_service):
    trigger = seed(db)
    rng = random.Random(13)
    values = {(o, a): [(h, rng.choice([0.01, 0.01, 0.03, 0.06, 0.075, 0.1])) for h in HOURS]
              for o in OFFERS for a in AFFILIATES}
    handle_metric_loaded(metric_loaded([("cr", o, a, h, v) for (o, a), hv in values.items() for h, v in hv]),
                         engine=db)
    with db.connect() as conn:
        recorded = dict(conn.execute(text("SELECT threshold_scope, recovery FROM trigger_checks "
                                          "GROUP BY threshold_scope, recovery")).all())
    assert recorded == {"general": 0.08, "offer": 0.07}  # each check records the recovery it used

    items = check_items(db)
    messages = [checked_message([item]) for item in items]
    messages += [checked_message([rng.choice(items)]) for _ in range(len(items) // 3)]  # delivered again
    messages += [checked_message(rng.sample(items, 5)) for _ in range(15)]  # several pairs at once
    rng.shuffle(messages)
    replicas = [start_service("event_detector") for _ in range(3)]
    for message in messages:
        bus.publish(message)
    wait_for(lambda: sum(r.log().count("message handled") for r in replicas) == len(messages), 60,
             what="every trigger.checked handled")

    with db.connect() as conn:
        states = {(r.offer_id, r.affiliate_id): (r.status, r.streak) for r in conn.execute(text(
            "SELECT offer_id, affiliate_id, status, streak FROM trigger_states WHERE trigger_id = :t"),
            {"t": trigger})}
        events = defaultdict(list)
        for r in conn.execute(text("SELECT offer_id, affiliate_id, previous_status, status, check_id "
                                   "FROM trigger_events ORDER BY id")):
            events[r.offer_id, r.affiliate_id].append((r.previous_status, r.status))
    for pair, pair_values in values.items():
        threshold, recovery = (0.04, 0.07) if pair[0] == 102 else (0.05, 0.08)
        status, _ = model(pair_values, threshold, recovery, 3)
        assert states[pair][0] == status, (pair, sorted(pair_values))
        # The announced story is consistent (each change starts where the last one ended; a
        # first OK is never announced) and ends where the state is.
        story = events[pair]
        for (_, earlier), (later, _) in zip(story, story[1:]):
            assert later == earlier, (pair, story)
        assert not story or (story[0][0] in (None, "OK") and story[-1][1] == status), (pair, story)
        assert story or status != "PROBLEM", (pair, "a pair in PROBLEM was never announced")
    published = published_events(drain(queue_names(exchange, "action_runner").work))
    with db.connect() as conn:
        recorded_ids = set(conn.execute(text("SELECT id FROM trigger_events")).scalars())
    assert {m["data"]["trigger_event_id"] for m in published.values()} == recorded_ids
    assert queue_depth(queue_names(exchange, "event_detector").dead) == 0


def test_in_order_the_announced_changes_are_exactly_the_models(db, bus, exchange, start_service):
    trigger = seed(db)
    rng = random.Random(5)
    values = {(101, a): [(h, rng.choice([0.01, 0.01, 0.06, 0.1])) for h in HOURS] for a in AFFILIATES}
    checker, detector = start_service("trigger_checker"), start_service("event_detector")
    for h in HOURS:  # one load per hour, each handled before the next is published
        bus.publish(metric_loaded([("cr", o, a, h, dict(hv)[h]) for (o, a), hv in values.items()]))
        wait_for(lambda: detector.log().count("message handled") == h + 1, 30, what=f"hour {h}")
    with db.connect() as conn:
        events = defaultdict(list)
        for r in conn.execute(text("SELECT affiliate_id, previous_status, status, measured_at FROM trigger_events "
                                   "WHERE trigger_id = :t ORDER BY measured_at"), {"t": trigger}):
            events[r.affiliate_id].append((r.previous_status, r.status))
    for (_, affiliate), pair_values in values.items():
        assert events[affiliate] == model(pair_values, 0.05, 0.08, 3)[1], sorted(pair_values)
