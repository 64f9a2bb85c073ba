"""State changes (DESIGN.md section 4, "State change"): one pair's checks applied by the
event_detector's upsert against the real database, and the pure helpers of state.py."""

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from services.event_detector.handler import apply_checks
from services.event_detector.state import Change, Check, change_of, rounds

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)
OFFER, AFFILIATE = 12, 7


def check(id, hour, status, value=1.0, threshold=0.5) -> Check:
    return Check(id, status, T0 + timedelta(hours=hour), value, threshold)


def state(status, since_hour, hour, check_id, value=1.0, threshold=0.5) -> tuple:
    return (status, T0 + timedelta(hours=since_hour), T0 + timedelta(hours=hour), check_id, value, threshold)


def changes_of(changes):
    return [(c.check.id, c.previous_status, c.status) for _, c in changes]


@pytest.fixture
def apply(db):
    """apply(before, checks) -> (the pair's state after, the changes), through the database."""
    with db.begin() as conn:
        trigger_id = conn.execute(text(
            "INSERT INTO triggers (name, metric_key, operator, threshold) VALUES ('t', 'cr', 'lt', 0.5) RETURNING id"
        )).scalar_one()
    pair = (trigger_id, OFFER, AFFILIATE)

    def run(before, checks):
        with db.begin() as conn:
            conn.execute(text("DELETE FROM trigger_states"))
            if before is not None:
                conn.execute(text(
                    "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, "
                    "check_id, value, threshold) VALUES (:t, :o, :a, :status, :since, :m, :c, :v, :th)"
                ), dict(zip(("t", "o", "a", "status", "since", "m", "c", "v", "th"), (*pair, *before))))
            changes, _, _ = apply_checks(conn, {pair: checks})
            after = conn.execute(text(
                "SELECT status, since, measured_at, check_id, value, threshold FROM trigger_states"
            )).one()
        return tuple(after), changes

    return run


def test_first_check_in_problem_is_stored_and_is_a_change_from_nothing(apply):
    after, changes = apply(None, [check(1, 0, "PROBLEM")])
    assert after == state("PROBLEM", 0, 0, 1)
    assert changes_of(changes) == [(1, None, "PROBLEM")]


def test_first_check_ok_is_stored_silently(apply):
    after, changes = apply(None, [check(1, 0, "OK")])
    assert after == state("OK", 0, 0, 1)
    assert changes == []


def test_newer_check_with_another_status_changes_the_state(apply):
    after, changes = apply(state("OK", 0, 2, 3), [check(4, 3, "PROBLEM", value=0.1, threshold=0.2)])
    assert after == state("PROBLEM", 3, 3, 4, value=0.1, threshold=0.2)
    assert changes_of(changes) == [(4, "OK", "PROBLEM")]


def test_newer_check_with_the_same_status_moves_measured_at_only(apply):
    after, changes = apply(state("PROBLEM", 0, 2, 3), [check(4, 5, "PROBLEM", value=0.7)])
    assert after == state("PROBLEM", 0, 5, 4, value=0.7)  # still PROBLEM since hour 0
    assert changes == []


def test_older_and_equal_checks_change_nothing(apply):
    before = state("PROBLEM", 0, 2, 3)
    for late in (check(9, 1, "OK"), check(10, 2, "OK"), check(3, 2, "PROBLEM")):
        assert apply(before, [late]) == (before, [])


def test_a_batch_is_applied_in_measured_at_order_whatever_its_order(apply):
    batch = [check(4, 3, "OK"), check(2, 1, "PROBLEM"), check(1, 0, "OK"), check(3, 2, "PROBLEM")]
    after, changes = apply(None, batch)
    assert after == state("OK", 3, 3, 4)
    assert changes_of(changes) == [(2, "OK", "PROBLEM"), (4, "PROBLEM", "OK")]


def test_a_batch_against_a_newer_state_only_applies_what_is_newer(apply):
    after, changes = apply(state("OK", 0, 2, 3), [check(1, 1, "PROBLEM"), check(5, 4, "PROBLEM")])
    assert after == state("PROBLEM", 4, 4, 5)
    assert changes_of(changes) == [(5, "OK", "PROBLEM")]


def test_rounds_take_each_pairs_checks_in_measured_at_order_and_pairs_in_key_order():
    a, b = (1, 2, 3), (1, 2, 1)
    first, second, third = check(7, 0, "OK"), check(5, 1, "OK"), check(6, 1, "OK")
    assert rounds({a: [third, first, second], b: [second]}) == [
        {b: second, a: first}, {a: second}, {a: third}]
    assert [list(r) for r in rounds({a: [first], b: [first]})] == [[b, a]]
    assert rounds({}) == []


def test_change_of_reads_the_returned_state():
    c = check(1, 3, "PROBLEM")
    assert change_of(c, "PROBLEM", True, None) == Change(c, None)        # created in PROBLEM
    assert change_of(check(1, 3, "OK"), "OK", True, None) is None         # created OK: not news
    assert change_of(c, "PROBLEM", True, "OK") == Change(c, "OK")        # status changed
    assert change_of(c, "PROBLEM", False, "OK") is None                  # same status, since kept
