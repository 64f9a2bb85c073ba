"""The trigger_checker handler as a function, against the real database."""

import json
import math

import pytest
from sqlalchemy import text

from services.trigger_checker import handler as handler_module
from services.trigger_checker.handler import handle_metric_loaded
from shared.events import (
    TRIGGER_CHECKED, InvalidMessageError, TriggerChecked, encode, new_event, parse_envelope, stable_event_id,
)
from tests.trigger_scenario import (
    BATCHES, EXPECTED_THRESHOLDS, actual_checks, at, expected_checks, metric_loaded, seed,
)


def count(engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def checks_of(result) -> list[dict]:
    return [c for event in result.events for c in event.data["checks"]]


def test_records_values_and_checks_with_the_threshold_of_every_scope(db):
    ids = seed(db)
    for batch in BATCHES:
        handle_metric_loaded(metric_loaded(batch), engine=db)
    assert actual_checks(db) == expected_checks(BATCHES)
    distinct_values = {(k, o, a, h) for batch in BATCHES for k, o, a, h, _ in batch}
    assert count(db, "metric_values") == len(distinct_values)
    with db.connect() as conn:
        scopes = dict(conn.execute(text(
            "SELECT offer_id::text || '/' || affiliate_id::text, threshold_scope FROM trigger_checks "
            "WHERE trigger_id = :t"), {"t": ids["min CR"]}).all())
        disabled = conn.execute(text("SELECT count(*) FROM trigger_checks WHERE trigger_id = :t"),
                                {"t": ids["disabled"]}).scalar_one()
    assert scopes == {"101/1": "offer_category", "101/7": "affiliate", "102/7": "affiliate",
                      "102/8": "offer_affiliate", "102/9": "offer", "103/9": "general"}
    assert disabled == 0


def test_publishes_every_check_of_the_message_once_with_a_deterministic_id(db):
    seed(db)
    envelope = metric_loaded(BATCHES[0], correlation_id="run-7")
    result = handle_metric_loaded(envelope, engine=db)
    assert len(result.events) == 1 and result.dead_letters == []
    event = result.events[0]
    assert event.type == TRIGGER_CHECKED
    assert event.event_id == stable_event_id(TRIGGER_CHECKED, envelope.event_id, 0)
    assert (event.causation_id, event.correlation_id) == (str(envelope.event_id), "run-7")
    checks = TriggerChecked.model_validate(event.data).checks
    with db.connect() as conn:
        ids = conn.execute(text("SELECT id FROM trigger_checks ORDER BY id")).scalars().all()
    assert [c.check_id for c in checks] == ids
    expected = {k: v for k, v in expected_checks([BATCHES[0]]).items()}
    assert {(c.trigger_name, c.offer_id, c.affiliate_id): (c.value, c.threshold, c.status) for c in checks} == {
        (name, o, a): (v.value, v.threshold, v.status) for (name, o, a, _), v in expected.items()}


def test_redelivery_records_nothing_new_and_publishes_the_same_checks_again(db):
    seed(db)
    envelope = metric_loaded(BATCHES[0])
    first = handle_metric_loaded(envelope, engine=db)
    # as if the process died after its commit, before the publish: the broker redelivers
    again = handle_metric_loaded(parse_envelope(encode(envelope)), engine=db)
    assert [e.event_id for e in again.events] == [e.event_id for e in first.events]
    assert checks_of(again) == checks_of(first)
    assert count(db, "trigger_checks") == len(checks_of(first))


def test_the_same_values_in_a_new_message_add_no_check_and_keep_the_first_value(db):
    seed(db)
    first = handle_metric_loaded(metric_loaded([("cr", 103, 9, 0, 0.01)]), engine=db)
    later = handle_metric_loaded(metric_loaded([("cr", 103, 9, 0, 0.09)]), engine=db)  # same key, another value
    assert checks_of(later) == checks_of(first)
    assert [c["value"] for c in checks_of(later)] == [0.01]
    with db.connect() as conn:
        assert conn.execute(text("SELECT value FROM metric_values")).scalars().all() == [0.01]


def test_a_trigger_edited_in_sql_applies_from_the_next_message(db):
    ids = seed(db)
    first = handle_metric_loaded(metric_loaded([("cr", 103, 9, 0, 0.04)]), engine=db)
    assert [(c["trigger_name"], c["threshold"], c["status"]) for c in checks_of(first)] == [
        ("min CR", 0.05, "PROBLEM")]
    with db.begin() as conn:
        conn.execute(text("UPDATE triggers SET threshold = 0.03, operator = 'le' WHERE id = :t"), {"t": ids["min CR"]})
        conn.execute(text("UPDATE triggers SET active = true, threshold = 1 WHERE id = :t"), {"t": ids["disabled"]})
    second = handle_metric_loaded(metric_loaded([("cr", 103, 9, 1, 0.03)]), engine=db)
    assert sorted((c["trigger_name"], c["operator"], c["threshold"], c["status"]) for c in checks_of(second)) == [
        ("disabled", "lt", 1.0, "PROBLEM"), ("min CR", "le", 0.03, "PROBLEM")]
    with db.begin() as conn:
        conn.execute(text("UPDATE triggers SET active = false"))
    assert handle_metric_loaded(metric_loaded([("cr", 103, 9, 2, 0.03)]), engine=db).events == []
    # the first check is republished as it was evaluated, not as the trigger is now
    with db.begin() as conn:
        conn.execute(text("UPDATE triggers SET active = true"))
    again = handle_metric_loaded(metric_loaded([("cr", 103, 9, 0, 0.04)]), engine=db)
    min_cr = [c for c in checks_of(again) if c["trigger_name"] == "min CR"]
    assert [(c["operator"], c["threshold"]) for c in min_cr] == [("lt", 0.05)]


def test_pairs_without_any_threshold_are_skipped(db, caplog):
    seed(db)
    caplog.set_level("INFO", logger=handler_module.__name__)
    result = handle_metric_loaded(metric_loaded([("cr", 102, 9, 0, 0.9)]), engine=db)
    assert EXPECTED_THRESHOLDS["max CR", 102, 9] is None
    assert [c["trigger_name"] for c in checks_of(result)] == ["min CR"]
    assert "skipped_no_threshold=1" in caplog.text


def test_a_check_recorded_before_its_threshold_was_removed_is_published_again_as_recorded(db):
    ids = seed(db)
    envelope = metric_loaded([("cr", 103, 9, 0, 0.04), ("cr", 103, 10, 0, 0.04)])
    first = handle_metric_loaded(envelope, engine=db)
    with db.begin() as conn:
        conn.execute(text("UPDATE triggers SET threshold = NULL WHERE id = :t"), {"t": ids["min CR"]})
    again = handle_metric_loaded(parse_envelope(encode(envelope)), engine=db)  # redelivered: nothing to check now
    assert checks_of(again) == checks_of(first)
    assert [(c["trigger_name"], c["threshold"]) for c in checks_of(again)] == [("min CR", 0.05)] * 2


def test_a_metric_without_triggers_is_recorded_and_publishes_nothing(db):
    seed(db)
    result = handle_metric_loaded(metric_loaded([("gtr", 104, 2, 0, 0.3)]), engine=db)
    assert result.events == [] and result.dead_letters == []
    assert count(db, "metric_values") == 1


def test_invalid_items_are_dead_lettered_together_and_the_valid_ones_processed(db):
    seed(db)
    good = {"metric_key": "cr", "offer_id": 103, "affiliate_id": 9, "value": 0.01, "measured_at": at(0).isoformat()}
    items = [
        good,
        {**good, "value": math.nan},
        {**good, "metric_key": "bounce_rate"},
        {**good, "offer_id": -4},
        {**good, "affiliate_id": 2**40},
        {**good, "measured_at": "2026-11-28T10:00:00"},  # naive
        {**good, "value": "0.5"},
        {**good, "affiliate_id": 10, "extra": 1},
        "not an object",
        {**good, "affiliate_id": 11, "measured_at": at(1).isoformat()},
    ]
    envelope = new_event("metric.loaded", {"metrics": items}, correlation_id="run-9")
    result = handle_metric_loaded(envelope, engine=db)

    assert [(c["offer_id"], c["affiliate_id"]) for c in checks_of(result)] == [(103, 9), (103, 11)]
    assert count(db, "metric_values") == 2
    [dead] = result.dead_letters
    body = json.loads(dead.body)
    assert body["event_id"] == str(envelope.event_id) and body["correlation_id"] == "run-9"
    assert body["data"]["metrics"][1:] == items[2:9]
    assert math.isnan(body["data"]["metrics"][0]["value"])  # kept as it came, not turned into null
    reasons = dead.reason.split("; ")
    for expected in ("data.metrics.1.value:", "data.metrics.2.metric_key: unknown metric key 'bounce_rate'",
                     "data.metrics.3.offer_id:", "data.metrics.4.affiliate_id: must be at most 2147483647",
                     "data.metrics.5.measured_at:", "data.metrics.6.value:", "data.metrics.7.extra:",
                     "data.metrics.8: "):
        assert any(r.startswith(expected) for r in reasons), (expected, reasons)
    assert len(reasons) == 8


def test_a_message_with_nothing_valid_is_invalid_as_a_whole(db):
    seed(db)
    envelope = metric_loaded([("cr", 103, 9, 0, 0.01)])
    envelope = envelope.model_copy(update={"data": {"metrics": [{**envelope.data["metrics"][0], "metric_key": "x"}]}})
    with pytest.raises(InvalidMessageError, match=r"data\.metrics\.0\.metric_key: unknown metric key 'x'"):
        handle_metric_loaded(envelope, engine=db)
    assert count(db, "metric_values") == 0


@pytest.mark.parametrize("data", [
    {},
    {"metrics": []},
    {"metrics": {"metric_key": "cr"}},
    {"metrics": [{}] * 1001},
    {"metrics": [{}], "checks": []},
])
def test_a_malformed_batch_is_invalid_as_a_whole(db, data):
    with pytest.raises(InvalidMessageError, match="expected an object with only 'metrics'"):
        handle_metric_loaded(new_event("metric.loaded", data), engine=db)


def test_more_checks_than_a_message_holds_are_split_deterministically(db, monkeypatch):
    seed(db)
    monkeypatch.setattr(handler_module, "MAX_CHECKS", 4)
    envelope = metric_loaded([("cr", 103, a, 0, 0.01) for a in range(20, 30)])
    result = handle_metric_loaded(envelope, engine=db)
    assert [len(e.data["checks"]) for e in result.events] == [4, 4, 2]
    assert [e.event_id for e in result.events] == [stable_event_id(TRIGGER_CHECKED, envelope.event_id, n)
                                                   for n in range(3)]
    assert len({c["check_id"] for c in checks_of(result)}) == 10
