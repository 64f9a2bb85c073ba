"""State changes (DESIGN.md section 4, "State change") with the default rules (for_checks
1, no recovery value): one pair's checks applied by the event_detector against the real
database, as they behaved before debounce and hysteresis existed."""

from datetime import datetime, timedelta, timezone
from typing import NamedTuple

import pytest
from sqlalchemy import text

from services.event_detector.handler import handle_trigger_checked
from tests.trigger_scenario import checked_message

T0 = datetime(2026, 11, 28, tzinfo=timezone.utc)
OFFER, AFFILIATE = 12, 7


class Check(NamedTuple):
    id: int
    status: str
    measured_at: datetime
    value: float
    threshold: float


def check(id, hour, status, value=1.0, threshold=0.5) -> Check:
    return Check(id, status, T0 + timedelta(hours=hour), value, threshold)


def state(status, since_hour, hour, check_id, value=1.0, threshold=0.5) -> tuple:
    return (status, T0 + timedelta(hours=since_hour), T0 + timedelta(hours=hour), check_id, value, threshold)


def changes_of(changes):
    return [(c["check_id"], c["previous_status"], c["status"]) for c in changes]


@pytest.fixture
def apply(db):
    """apply(before, checks) -> (the pair's state after, the changes), through the database.

    The checks are recorded in trigger_checks as the trigger_checker would, and so is the
    check of the state `before` (a state is always the fold of recorded checks)."""
    with db.begin() as conn:
        trigger_id = conn.execute(text(
            "INSERT INTO triggers (name, metric_key, operator, threshold) VALUES ('t', 'cr', 'lt', 0.5) RETURNING id"
        )).scalar_one()
    pair = (trigger_id, OFFER, AFFILIATE)

    def record(conn, c: Check) -> None:
        conn.execute(text(
            "INSERT INTO trigger_checks (id, trigger_id, offer_id, affiliate_id, value, operator, threshold, status, "
            "measured_at) VALUES (:id, :t, :o, :a, :v, 'lt', :th, :s, :m) ON CONFLICT DO NOTHING"
        ), {"id": c.id, "t": pair[0], "o": pair[1], "a": pair[2], "v": c.value, "th": c.threshold, "s": c.status,
            "m": c.measured_at})

    def run(before, checks):
        with db.begin() as conn:
            for table in ("trigger_events", "trigger_states", "trigger_checks"):
                conn.execute(text(f"DELETE FROM {table}"))
            if before is not None:
                status, since, measured_at, check_id, value, threshold = before
                record(conn, Check(check_id, status, measured_at, value, threshold))
                conn.execute(text(
                    "INSERT INTO trigger_states (trigger_id, offer_id, affiliate_id, status, since, measured_at, "
                    "check_id, value, threshold) VALUES (:t, :o, :a, :status, :since, :m, :c, :v, :th)"
                ), dict(zip(("t", "o", "a", "status", "since", "m", "c", "v", "th"), (*pair, *before))))
            for c in checks:
                record(conn, c)
        items = [{"check_id": c.id, "trigger_id": pair[0], "trigger_name": "t", "metric_key": "cr",
                  "offer_id": OFFER, "affiliate_id": AFFILIATE, "value": c.value, "operator": "lt",
                  "threshold": c.threshold, "status": c.status, "measured_at": c.measured_at.isoformat()}
                 for c in checks]
        result = handle_trigger_checked(checked_message(items), engine=db)
        with db.connect() as conn:
            after = conn.execute(text(
                "SELECT status, since, measured_at, check_id, value, threshold FROM trigger_states"
            )).one()
        return tuple(after), [e.data for e in result.events]

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
    # (Two checks of one pair cannot share a measured_at: trigger_checks is unique on it.)
    before = state("PROBLEM", 0, 2, 3)
    for late in (check(9, 1, "OK"), check(3, 2, "PROBLEM")):
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
