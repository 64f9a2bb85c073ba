"""The pair state machine (debounce, hysteresis) against a reference model written here.

The model folds a whole history at once, straight from DESIGN.md section 6; the machine
applies deliveries one at a time, in any order, duplicated, with late checks read back
from the recorded history. After every check has arrived, the two must agree.
"""

from __future__ import annotations

import bisect
import operator
import random
from collections.abc import Collection
from datetime import datetime, timedelta, timezone

import pytest

from services.event_detector.machine import (
    NO_STATE, Change, PairState, Reading, advance, anchor_depth, fold, settle, step,
)

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
LT = operator.lt


def reading(n: int, value: float, threshold: float = 0.5, recovery: float | None = None, op=LT) -> Reading:
    problem = op(value, threshold)
    clears = not problem and not op(value, recovery if recovery is not None else threshold)
    return Reading(n, T0 + timedelta(minutes=15 * n), value, threshold, "PROBLEM" if problem else "OK", clears)


# -- the reference model -------------------------------------------------------------------


def model(readings: list[Reading], for_checks: int) -> tuple[str | None, int, list[tuple[str | None, str, int]]]:
    """(final status, streak, [(previous, status, check id) per announced change]), folded
    over the whole history in measured_at order, as section 6 words it."""
    status: str | None = None
    run = 0  # consecutive PROBLEM checks
    changes = []
    for r in sorted(readings, key=lambda r: r.measured_at):
        if r.status == "PROBLEM":
            run += 1
            if status != "PROBLEM" and run >= for_checks:
                changes.append((status, "PROBLEM", r.check_id))
                status = "PROBLEM"
        else:
            run = 0
            if status is None:
                status = "OK"  # a first OK is stored silently
            elif status == "PROBLEM" and r.clears:
                changes.append(("PROBLEM", "OK", r.check_id))
                status = "OK"
    return status, min(run, for_checks), changes


class Memory:
    """Recorded checks of one pair, in memory, and the checks events were recorded under."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.tags: set[int] = set()

    def record(self, r: Reading) -> None:
        if all(x.check_id != r.check_id for x in self.readings):
            bisect.insort(self.readings, r, key=lambda x: x.measured_at)

    def before(self, measured_at: datetime, limit: int) -> list[Reading]:
        older = [r for r in self.readings if r.measured_at < measured_at]
        return list(reversed(older))[:limit]

    def between(self, first: datetime, last: datetime) -> list[Reading]:
        return [r for r in self.readings if first <= r.measured_at <= last]

    def after(self, first: datetime | None, last: datetime) -> list[Reading]:
        return [r for r in self.readings if (first is None or r.measured_at > first) and r.measured_at <= last]

    def tagged(self, check_ids: Collection[int]) -> set[int]:
        return self.tags & set(check_ids)


def deliver(state: PairState, memory: Memory, delivered: list[Reading], for_checks: int
            ) -> tuple[PairState, list[Change]]:
    """What the event_detector does with one message's checks of one pair."""
    newest = max(r.measured_at for r in delivered)
    newer = memory.after(state.measured_at, newest) if state.measured_at is None or newest > state.measured_at else []
    state, changes = settle(state, delivered, newer, for_checks, memory)
    for change in changes:
        assert change.tag.check_id not in memory.tags, "two events recorded under one check"
        memory.tags.add(change.tag.check_id)
    return state, changes


# -- one check at a time, in order -----------------------------------------------------------


def test_defaults_behave_as_before_any_of_this_existed():
    state, changes = advance(NO_STATE, [reading(1, 0.9), reading(2, 0.1), reading(3, 0.2), reading(4, 0.7)], 1)
    assert [(c.previous, c.status, c.entered.check_id) for c in changes] == [("OK", "PROBLEM", 2),
                                                                             ("PROBLEM", "OK", 4)]
    assert (state.status, state.since, state.last.check_id) == ("OK", reading(4, 0).measured_at, 4)


def test_a_new_pair_enters_problem_after_for_checks_in_a_row_and_an_ok_resets_the_streak():
    state, changes = advance(NO_STATE, [reading(1, 0.1), reading(2, 0.1)], 3)
    assert (state.status, state.streak, changes) == (None, 2, [])  # nothing decided, nothing announced
    state, changes = advance(state, [reading(3, 0.9), reading(4, 0.1), reading(5, 0.1)], 3)
    assert (state.status, state.streak, changes) == ("OK", 2, [])
    state, changes = advance(state, [reading(6, 0.1)], 3)
    assert [(c.previous, c.status, c.entered.check_id) for c in changes] == [("OK", "PROBLEM", 6)]
    assert state.since == reading(6, 0).measured_at


def test_a_new_pair_that_reaches_the_streak_first_enters_problem_from_nothing():
    _, changes = advance(NO_STATE, [reading(1, 0.1), reading(2, 0.1)], 2)
    assert [(c.previous, c.status) for c in changes] == [(None, "PROBLEM")]


def test_hysteresis_keeps_a_pair_in_problem_until_the_recovery_value_is_cleared():
    # min CR: lt 0.005, recovery 0.008 (the example of section 6)
    r = [reading(1, 0.004, 0.005, 0.008), reading(2, 0.006, 0.005, 0.008), reading(3, 0.0079, 0.005, 0.008),
         reading(4, 0.008, 0.005, 0.008)]
    state, changes = advance(NO_STATE, r, 1)
    assert [(c.previous, c.status, c.entered.check_id) for c in changes] == [(None, "PROBLEM", 1),
                                                                             ("PROBLEM", "OK", 4)]


def test_step_counts_the_streak_up_to_for_checks_only():
    state = NO_STATE
    for n in range(10):
        state = step(state, reading(n, 0.1), 3)
    assert (state.status, state.streak) == ("PROBLEM", 3)


@pytest.mark.parametrize("newest_first, for_checks, depth", [
    ("c", 3, 1),  # an OK that clears the recovery value is an anchor by itself
    ("ooc", 3, 3),  # OKs inside the hysteresis band decide nothing
    ("PPP", 3, 3),
    ("PPoPP", 3, 0),  # the OK breaks the run without clearing: no anchor among them
    ("PPoPPPc", 3, 6),
    ("PPPPP", 2, 2),
])
def test_the_anchor_is_the_nearest_check_that_decides_the_state_alone(newest_first, for_checks, depth):
    # P: PROBLEM; o: OK within the band (0.6 < recovery 0.7); c: OK that clears it (0.9)
    values = {"P": 0.1, "o": 0.6, "c": 0.9}
    readings = [reading(i, values[kind], 0.5, 0.7) for i, kind in enumerate(newest_first)]
    assert anchor_depth(readings, for_checks) == depth


# -- any order, duplicates, late checks ---------------------------------------------------------


def scenario(rng: random.Random, n: int) -> list[Reading]:
    threshold, recovery = 0.5, rng.choice([None, 0.6, 0.8])
    return [reading(i, rng.choice([0.1, 0.45, 0.55, 0.65, 0.75, 0.9]), threshold, recovery) for i in range(1, n + 1)]


@pytest.mark.parametrize("seed", range(300))
def test_any_order_and_duplicates_end_in_the_state_the_model_folds(seed):
    rng = random.Random(seed)
    for_checks = rng.choice([1, 1, 2, 3, 4])
    readings = scenario(rng, rng.randint(1, 40))
    deliveries = [[r] for r in readings]
    deliveries += [[rng.choice(readings)] for _ in range(rng.randint(0, 10))]  # delivered again
    if rng.random() < 0.5:  # and some messages carry several checks of the pair
        deliveries += [rng.sample(readings, min(len(readings), rng.randint(2, 4))) for _ in range(3)]
    rng.shuffle(deliveries)
    memory = Memory()
    recorded_ahead = rng.random() < 0.5  # the trigger_checker may record checks long before they arrive
    if recorded_ahead:
        for r in readings:
            memory.record(r)
    state, events = NO_STATE, []
    for message in deliveries:
        for r in message:
            memory.record(r)
        state, changes = deliver(state, memory, message, for_checks)
        events += changes

    status, streak, model_changes = model(readings, for_checks)
    assert (state.status, state.streak) == (status, streak)
    assert state.last == max(readings, key=lambda r: r.measured_at)
    # The events tell a consistent story: each starts where the previous one ended and the
    # last one ends in the final status.
    previous = None
    for change in events:
        assert change.previous == previous or (previous is None and change.previous == "OK")
        previous = change.status
    if events:
        assert events[-1].status == status
    if status == "PROBLEM":
        assert events, "a pair in PROBLEM was never announced"


@pytest.mark.parametrize("seed", range(100))
def test_in_order_deliveries_announce_exactly_the_models_changes(seed):
    rng = random.Random(1000 + seed)
    for_checks = rng.choice([1, 2, 3])
    readings = scenario(rng, rng.randint(1, 40))
    memory = Memory()
    state, events = NO_STATE, []
    for r in readings:
        memory.record(r)
        state, changes = deliver(state, memory, [r], for_checks)
        events += changes
        # every duplicate of something already applied changes nothing
        state2, again = deliver(state, memory, [rng.choice(memory.readings)], for_checks)
        assert again == [] and state2.status == state.status
        state = state2
    assert [(c.previous, c.status, c.entered.check_id) for c in events] == model(readings, for_checks)[2]
    expected_since = {c[2]: c for c in model(readings, for_checks)[2]}
    if events:
        assert state.since == events[-1].entered.measured_at and events[-1].entered.check_id in expected_since


def test_a_late_check_that_breaks_an_announced_streak_announces_the_correction_once():
    """OK at 1 (clears), PROBLEM at 2, 3 (for_checks 2: PROBLEM announced at 3), then a
    clearing OK at 2.5 arrives: the pair was never in PROBLEM after all."""
    memory = Memory()
    state = NO_STATE
    ok, p2, p3 = reading(4, 0.9), reading(8, 0.1), reading(12, 0.1)
    for r in (ok, p2, p3):
        memory.record(r)
        state, changes = deliver(state, memory, [r], 2)
    assert (state.status, [c.status for c in changes]) == ("PROBLEM", ["PROBLEM"])
    late = reading(10, 0.9)
    memory.record(late)
    state, changes = deliver(state, memory, [late], 2)
    assert [(c.previous, c.status, c.tag.check_id) for c in changes] == [("PROBLEM", "OK", 10)]
    assert state.status == "OK" and state.last == p3
    state, again = deliver(state, memory, [late], 2)  # delivered again: nothing more
    assert again == []


def test_a_late_check_that_changes_nothing_keeps_since():
    memory = Memory()
    state = NO_STATE
    for r in (reading(2, 0.1), reading(3, 0.1)):
        memory.record(r)
        state, _ = deliver(state, memory, [r], 1)
    since = state.since
    late = reading(1, 0.1)
    memory.record(late)
    state, changes = deliver(state, memory, [late], 1)
    assert (changes, state.since) == ([], since)


def test_fold_is_the_model():
    rng = random.Random(7)
    for _ in range(200):
        readings = scenario(rng, rng.randint(0, 30))
        for_checks = rng.randint(1, 4)
        state = fold(readings, for_checks)
        assert (state.status, state.streak) == model(readings, for_checks)[:2]
