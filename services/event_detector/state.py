"""State changes (DESIGN.md section 4, "State change"): pure functions, no I/O.

trigger_states holds the latest status of a (trigger, offer, affiliate) pair ordered by
measured_at, never by arrival. Checks of one batch for the same pair are applied in
measured_at order; a check that is not newer than the state changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal, NamedTuple

Status = Literal["OK", "PROBLEM"]


# NamedTuples rather than frozen dataclasses: a message builds thousands of them, and a
# frozen dataclass costs three times as much to create.
class Check(NamedTuple):
    id: int
    status: Status
    measured_at: datetime
    value: float
    threshold: float


class PairState(NamedTuple):
    status: Status
    since: datetime  # measured_at of the check that put the pair into this status
    measured_at: datetime
    check_id: int
    value: float | None
    threshold: float | None


class Change(NamedTuple):
    """One state change: a trigger_events row and a trigger.event.<status> message."""

    check: Check
    previous_status: Status | None

    @property
    def status(self) -> Status:
        return self.check.status


def start(check: Check) -> PairState:
    return PairState(check.status, check.measured_at, check.measured_at, check.id, check.value, check.threshold)


def apply_checks(state: PairState | None, checks: Iterable[Check]) -> tuple[PairState | None, list[Change]]:
    """The pair's state after `checks`, and the changes they made, in measured_at order."""
    changes: list[Change] = []
    for check in sorted(checks, key=lambda c: (c.measured_at, c.id)):
        if state is None:
            state = start(check)
            # A pair first seen OK is not news; first seen in PROBLEM is.
            if check.status == "PROBLEM":
                changes.append(Change(check, None))
        elif check.measured_at <= state.measured_at:
            continue  # out of order or a duplicate: recorded as a check, nothing more
        elif check.status != state.status:
            changes.append(Change(check, state.status))
            state = start(check)
        else:
            state = state._replace(measured_at=check.measured_at, check_id=check.id, value=check.value,
                                   threshold=check.threshold)
    return state, changes
