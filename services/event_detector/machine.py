"""The state machine of a (trigger, offer, affiliate) pair (DESIGN.md sections 4 and 6).

Pure functions, no I/O: the event_detector, `kpi backtest` and `kpi explain` all decide
with these, so what the backtest says the rules would do is what the services do.

A pair's state is the machine folded over its checks in measured_at order:
- a PROBLEM check adds one to the streak (counted up to `for_checks`, which is all the
  machine needs); the pair enters PROBLEM when the streak reaches `for_checks`;
- an OK check resets the streak. A pair in PROBLEM returns to OK only when the check
  also clears the recovery value (`NOT (value <operator> recovery)`, recorded with the
  check); a pair with no status yet becomes OK at its first OK check, silently;
- until a status is decided (a new pair whose first PROBLEM checks have not reached
  `for_checks`) the pair has no status, and nothing is announced.

Checks may arrive in any order. Two kinds of check make the state after them
independent of everything before them: an OK check that clears, and `for_checks`
PROBLEM checks in a row. Such an *anchor* is where a refold may start, so a late check
is folded in by reading back to the nearest anchor before it, never the whole history.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

from shared.vocabulary import Status


class Reading(NamedTuple):
    """A recorded check as the machine sees it."""

    check_id: int
    measured_at: datetime
    value: float
    threshold: float
    status: Status  # `value <operator> threshold` as recorded
    clears: bool  # OK, and `value <operator> recovery` does not hold either


class PairState(NamedTuple):
    status: Status | None  # None: no status decided yet
    streak: int  # consecutive PROBLEM checks up to the last one, at most for_checks
    since: datetime | None  # measured_at of the check at which the status was entered
    last: Reading | None  # the newest check folded in

    @property
    def measured_at(self) -> datetime | None:
        return self.last.measured_at if self.last else None


NO_STATE = PairState(None, 0, None, None)


class Change(NamedTuple):
    """A change of status: a trigger_events row and a trigger.event.<status> message.

    `entered` is the check at which the pair entered the new status (its value,
    threshold and measured_at are the event's); `tag` is the check the event is
    recorded under (trigger_events.check_id is unique). They are the same check unless
    a late check rewrote history the pair had already announced (see `refold`).
    """

    previous: Status | None
    status: Status
    entered: Reading
    tag: Reading


def step(state: PairState, reading: Reading, for_checks: int) -> PairState:
    """The state after one more check, newer than every check in `state`."""
    if reading.status == "PROBLEM":
        streak = min(state.streak + 1, for_checks)
        if state.status != "PROBLEM" and streak >= for_checks:
            return PairState("PROBLEM", streak, reading.measured_at, reading)
        return PairState(state.status, streak, state.since, reading)
    if state.status is None or (state.status == "PROBLEM" and reading.clears):
        return PairState("OK", 0, reading.measured_at, reading)
    return PairState(state.status, 0, state.since, reading)


def advance(state: PairState, readings: Iterable[Reading], for_checks: int) -> tuple[PairState, list[Change]]:
    """Fold checks newer than `state` in, in measured_at order; every change is its own
    event, recorded under the check that made it (never recorded before: it is new)."""
    changes = []
    for reading in readings:
        after = step(state, reading, for_checks)
        if after.status != state.status and not (state.status is None and after.status == "OK"):
            changes.append(Change(state.status, after.status, reading, reading))  # type: ignore[arg-type]
        state = after
    return state, changes


def fold(readings: Iterable[Reading], for_checks: int, start: PairState = NO_STATE) -> PairState:
    state = start
    for reading in readings:
        state = step(state, reading, for_checks)
    return state


def anchor_depth(newest_first: Sequence[Reading], for_checks: int) -> int:
    """How many of `newest_first` (checks before a late one, newest first) lead back to
    the nearest anchor, the anchor's checks included; 0 when there is none among them."""
    problems = 0
    for index, reading in enumerate(newest_first):
        if reading.status == "PROBLEM":
            problems += 1
            if problems >= for_checks:
                return index + 1
        else:
            if reading.clears:
                return index + 1
            problems = 0
    return 0


class Recorded(Protocol):
    """The recorded checks of one pair, for a refold (the event_detector reads them from
    trigger_checks; the backtest and the tests keep them in memory)."""

    def before(self, measured_at: datetime, limit: int) -> list[Reading]:
        """Up to `limit` checks older than `measured_at`, newest first."""

    def between(self, first: datetime, last: datetime) -> list[Reading]:
        """The checks with first <= measured_at <= last, oldest first."""

    def tagged(self, check_ids: Collection[int]) -> set[int]:
        """Which of these checks already have a trigger event recorded under them."""


def settle(stored: PairState, delivered: Sequence[Reading], newer: Sequence[Reading], for_checks: int,
           recorded: Recorded) -> tuple[PairState, list[Change]]:
    """Apply one delivery of checks to a pair: the new state and the changes to announce.

    `delivered`: the pair's checks in the message. `newer`: every recorded check of the
    pair newer than the stored state up to the newest delivered one, delivered or not
    (a check recorded but still on its way is folded in now; when it arrives it changes
    nothing). When every delivered check is newer than the state, that is all there is
    to do. A delivered check as old as the state or older (out of order, or delivered
    again) refolds the pair from the nearest anchor before it: if that changes the
    status at the state's newest check, one corrective change is announced, recorded
    under a check no event was recorded under yet (a late check the history had not seen).
    """
    late = [r for r in delivered if stored.last is not None and r.measured_at <= stored.last.measured_at]
    state, changes = stored, []
    if late and not all(r.check_id == stored.last.check_id for r in late):  # type: ignore[union-attr]
        state, change = _fold_in_late(stored, late, for_checks, recorded)
        if change is not None:
            changes.append(change)
    state, forward = advance(state, newer, for_checks)
    return state, changes + forward


def _fold_in_late(stored: PairState, late: Sequence[Reading], for_checks: int,
                  recorded: Recorded) -> tuple[PairState, Change | None]:
    assert stored.last is not None
    earliest = min(r.measured_at for r in late)
    behind: list[Reading] = []
    depth = 0
    chunk = max(for_checks, 16)
    while True:  # back to the nearest anchor before the earliest late check
        older = recorded.before(behind[-1].measured_at if behind else earliest, chunk)
        behind += older
        depth = anchor_depth(behind, for_checks)
        if depth or len(older) < chunk:
            break
    start = list(reversed(behind[:depth] if depth else behind))
    history = start + recorded.between(earliest, stored.last.measured_at)
    state, status, entered = refold(stored, history, for_checks)
    if status is None or (stored.status is None and status == "OK"):
        return state, None
    window = [r for r in history if r.measured_at >= earliest]
    taken = recorded.tagged([r.check_id for r in window])
    candidates = sorted(late, key=lambda r: r.measured_at) + window
    tag = next((r for r in candidates if r.check_id not in taken), None)
    if tag is None:  # cannot happen: a change needs a check the stored state had not seen
        raise AssertionError(f"no untagged check among {[r.check_id for r in window]}")
    return state, Change(stored.status, status, entered or history[0], tag)


def refold(stored: PairState, history: Sequence[Reading], for_checks: int) -> tuple[PairState, Status | None,
                                                                                     Reading | None]:
    """The state at `stored`'s newest check, recomputed from `history`: every recorded
    check from an anchor (or the first check) up to that newest check, in measured_at
    order, late ones included.

    Returns the state, and when its status differs from the stored one, the status and
    the check at which the fold entered it. `since` is kept when the status is the same
    (a late check does not move the start of an episode others may already have acted on).
    """
    state = fold(history, for_checks)
    if state.status == stored.status:
        return PairState(stored.status, state.streak, stored.since, state.last), None, None
    entered = None
    previous = NO_STATE
    for reading in history:  # the check at which the fold entered its final status
        after = step(previous, reading, for_checks)
        if after.status == state.status and previous.status != state.status:
            entered = reading
        previous = after
    return state, state.status, entered
