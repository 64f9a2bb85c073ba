"""The event_detector handler as a function, against the real database."""

import json
import random
import threading
from collections import Counter

import pytest
from sqlalchemy import text

from services.event_detector.handler import handle_trigger_checked
from services.trigger_checker.handler import handle_metric_loaded
from shared.events import (
    TRIGGER_EVENT_OK, TRIGGER_EVENT_PROBLEM, InvalidMessageError, TriggerEventMessage, encode, parse_envelope,
    stable_event_id,
)
from tests.trigger_scenario import (
    BATCHES, Model, actual_events, actual_states, assert_consistent_history, check_items, checked_message,
    expected_checks, metric_loaded, model_of_batches, seed,
)


def run_scenario(db):
    """Both handlers in a row, batch after batch, as one replica of each would."""
    published = []
    for batch in BATCHES:
        for checked in handle_metric_loaded(metric_loaded(batch), engine=db).events:
            published += handle_trigger_checked(checked, engine=db).events
    return published



def handle_concurrently(db, batches, threads=8) -> list[Exception]:
    """Hand the batches to `threads` threads at once; return what they raised."""
    errors: list[Exception] = []

    def work(share):
        try:
            for batch in share:
                handle_trigger_checked(checked_message(batch), engine=db)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(batches[n::threads],)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    # A worker still running (stuck on a lock, say) would leave its batches unchecked.
    assert not [w for w in workers if w.is_alive()], "a worker did not finish within 60 s"
    return errors

def test_the_scenario_gives_the_expected_states_and_events(db):
    seed(db)
    published = run_scenario(db)
    model = model_of_batches(BATCHES)
    assert actual_states(db) == model.states
    assert Counter(actual_events(db)) == Counter(model.events)
    # each message publishes the events of its checks: every change once, and once more the
    # (103, 9) change of hour 0, whose check the last batch carried again with its value
    assert len({e.event_id for e in published}) == len(model.events)
    times = Counter(e.event_id for e in published)
    repeated = [e.data for e in published if times[e.event_id] > 1]
    assert [(d["offer_id"], d["affiliate_id"], d["status"]) for d in repeated] == [(103, 9, "PROBLEM")] * 2
    with db.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT * FROM trigger_events"))}
        names = dict(conn.execute(text("SELECT id, name FROM triggers")).all())
    for event in published:
        data = TriggerEventMessage.model_validate(event.data)
        row = rows[data.trigger_event_id]
        assert event.event_id == stable_event_id("trigger_event", row.id)
        assert event.type == {"PROBLEM": TRIGGER_EVENT_PROBLEM, "OK": TRIGGER_EVENT_OK}[row.status]
        assert (data.trigger_name, data.check_id, data.previous_status, data.value, data.threshold, data.measured_at) \
            == (names[row.trigger_id], row.check_id, row.previous_status, row.value, row.threshold, row.measured_at)


def test_the_state_row_carries_the_latest_check(db):
    seed(db)
    run_scenario(db)
    with db.connect() as conn:
        mismatched = conn.execute(text(
            "SELECT count(*) FROM trigger_states s JOIN trigger_checks c ON c.id = s.check_id "
            "WHERE (c.value, c.threshold, c.status, c.measured_at) IS DISTINCT FROM "
            "(s.value, s.threshold, s.status, s.measured_at)")).scalar_one()
    assert mismatched == 0


def test_redelivery_changes_nothing_and_publishes_the_recorded_events_again(db):
    seed(db)
    checked = handle_metric_loaded(metric_loaded(BATCHES[0], correlation_id="run-3"), engine=db).events[0]
    first = handle_trigger_checked(checked, engine=db)
    states, events = actual_states(db), actual_events(db)
    again = handle_trigger_checked(parse_envelope(encode(checked)), engine=db)
    assert (actual_states(db), actual_events(db)) == (states, events)
    assert [(e.event_id, e.type, e.data) for e in again.events] == [(e.event_id, e.type, e.data) for e in first.events]
    assert {e.causation_id for e in again.events} == {str(checked.event_id)}
    assert {e.correlation_id for e in again.events} == {"run-3"}


def test_one_message_with_several_checks_of_a_pair_applies_them_in_measured_at_order(db):
    seed(db)
    items = [("cr", 101, 1, h, v) for h, v in [(0, 0.04), (1, 0.02), (2, 0.01), (3, 0.03), (4, 0.001)]]
    handle_metric_loaded(metric_loaded(items), engine=db)
    min_cr = check_items(db, "t.name = 'min CR'")
    random.Random(4).shuffle(min_cr)
    result = handle_trigger_checked(checked_message(min_cr), engine=db)
    assert [(e.data["previous_status"], e.data["status"]) for e in result.events] == [
        ("OK", "PROBLEM"), ("PROBLEM", "OK"), ("OK", "PROBLEM")]
    assert actual_states(db)["min CR", 101, 1] == {"status": "PROBLEM", "since": 4, "hour": 4}


def test_unknown_checks_are_dead_lettered_and_the_known_ones_processed(db):
    seed(db)
    handle_metric_loaded(metric_loaded([("cr", 103, 9, 0, 0.01)]), engine=db)
    [known] = check_items(db)
    unknown = {**known, "check_id": known["check_id"] + 1000}
    bad = {**known, "status": "MAYBE"}
    envelope = checked_message([unknown, known, bad])
    result = handle_trigger_checked(envelope, engine=db)
    assert [e.data["check_id"] for e in result.events] == [known["check_id"]]
    [dead] = result.dead_letters
    assert json.loads(dead.body)["data"]["checks"] == [unknown, bad]
    assert json.loads(dead.body)["event_id"] == str(envelope.event_id)
    assert dead.reason.startswith(f"data.checks.0.check_id: no trigger check {unknown['check_id']}")
    assert "data.checks.2.status:" in dead.reason
    with pytest.raises(InvalidMessageError, match="every item"):
        handle_trigger_checked(checked_message([unknown]), engine=db)


def test_concurrent_handlers_on_the_same_pairs_record_each_change_once(db):
    """Eight threads, each with its own connection, handle overlapping batches at once."""
    seed(db)
    values = [("cr", 103, a, h, 0.01 if (h + a) % 3 else 0.09) for a in range(20, 40) for h in range(4)]
    handle_metric_loaded(metric_loaded(values), engine=db)
    items = check_items(db)
    by_pair: dict = {}
    for item in items:
        by_pair.setdefault((item["trigger_id"], item["offer_id"], item["affiliate_id"]), []).append(item)
    pairs = sorted(by_pair)
    rng = random.Random(11)
    # every batch has all checks of its pairs: the outcome cannot depend on the order
    batches = [[i for p in rng.sample(pairs, 6) for i in by_pair[p]] for _ in range(40)]
    batches += [[i for p in pairs for i in by_pair[p]]] * 2
    rng.shuffle(batches)
    assert handle_concurrently(db, batches) == []

    model = Model()
    thresholds = {(name, 103, a): {"min CR": 0.05, "max CR": None}[name] for name in ("min CR", "max CR")
                  for a in range(20, 40)}
    model.feed_batch(expected_checks([values], thresholds))
    assert actual_states(db) == model.states
    assert Counter(actual_events(db)) == Counter(model.events)


def test_concurrent_handlers_with_partial_batches_keep_a_consistent_history(db):
    """Batches holding random parts of the pairs' checks, handled at once by eight threads:
    the outcome depends on the order, but each state is the latest check and each pair's
    events are one chain of changes, each recorded once."""
    seed(db)
    rng = random.Random(5)
    values = [("cr", 103, a, h, rng.choice([0.01, 0.09])) for a in range(20, 26) for h in range(16)]
    handle_metric_loaded(metric_loaded(values), engine=db)
    items = check_items(db, "t.name = 'min CR'")
    batches = [rng.sample(items, rng.randint(1, 24)) for _ in range(300)] + [[i] for i in items]
    rng.shuffle(batches)
    assert handle_concurrently(db, batches) == []
    assert assert_consistent_history(db) >= 6
