"""State changes (DESIGN.md section 4, "State change"), as a pure function."""

from datetime import datetime, timedelta, timezone

from services.event_detector.state import Check, PairState, apply_checks

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)


def check(id, hour, status, value=1.0, threshold=0.5) -> Check:
    return Check(id, status, T0 + timedelta(hours=hour), value, threshold)


def state(status, since_hour, hour, check_id, value=1.0, threshold=0.5) -> PairState:
    return PairState(status, T0 + timedelta(hours=since_hour), T0 + timedelta(hours=hour), check_id, value, threshold)


def changes_of(changes):
    return [(c.check.id, c.previous_status, c.status) for c in changes]


def test_first_check_in_problem_is_stored_and_is_a_change_from_nothing():
    after, changes = apply_checks(None, [check(1, 0, "PROBLEM")])
    assert after == state("PROBLEM", 0, 0, 1)
    assert changes_of(changes) == [(1, None, "PROBLEM")]


def test_first_check_ok_is_stored_silently():
    after, changes = apply_checks(None, [check(1, 0, "OK")])
    assert after == state("OK", 0, 0, 1)
    assert changes == []


def test_newer_check_with_another_status_changes_the_state():
    after, changes = apply_checks(state("OK", 0, 2, 3), [check(4, 3, "PROBLEM", value=0.1, threshold=0.2)])
    assert after == state("PROBLEM", 3, 3, 4, value=0.1, threshold=0.2)
    assert changes_of(changes) == [(4, "OK", "PROBLEM")]


def test_newer_check_with_the_same_status_moves_measured_at_only():
    after, changes = apply_checks(state("PROBLEM", 0, 2, 3), [check(4, 5, "PROBLEM", value=0.7)])
    assert after == state("PROBLEM", 0, 5, 4, value=0.7)  # still PROBLEM since hour 0
    assert changes == []


def test_older_and_equal_checks_change_nothing():
    before = state("PROBLEM", 0, 2, 3)
    for late in (check(9, 1, "OK"), check(10, 2, "OK"), check(3, 2, "PROBLEM")):
        assert apply_checks(before, [late]) == (before, [])


def test_a_batch_is_applied_in_measured_at_order_whatever_its_order():
    batch = [check(4, 3, "OK"), check(2, 1, "PROBLEM"), check(1, 0, "OK"), check(3, 2, "PROBLEM")]
    after, changes = apply_checks(None, batch)
    assert after == state("OK", 3, 3, 4)
    assert changes_of(changes) == [(2, "OK", "PROBLEM"), (4, "PROBLEM", "OK")]


def test_a_batch_against_a_newer_state_only_applies_what_is_newer():
    after, changes = apply_checks(state("OK", 0, 2, 3), [check(1, 1, "PROBLEM"), check(5, 4, "PROBLEM")])
    assert after == state("PROBLEM", 4, 4, 5)
    assert changes_of(changes) == [(5, "OK", "PROBLEM")]
