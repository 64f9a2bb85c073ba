"""State changes (DESIGN.md section 4, "State change"): pure functions, no I/O.

trigger_states holds the latest status of a (trigger, offer, affiliate) pair ordered by
measured_at, never by arrival. Checks of one batch for the same pair are applied in
measured_at order; a check that is not newer than the state changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

Status = Literal["OK", "PROBLEM"]


@dataclass(frozen=True)
class Check:
    id: int
    status: Status
    measured_at: datetime
    value: float
    threshold: float


@dataclass(frozen=True)
class PairState:
    status: Status
    since: datetime  # measured_at of the check that put the pair into this status
    measured_at: datetime
    check_id: int
    value: float | None
    threshold: float | None


@dataclass(frozen=True)
class Change:
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
            state = replace(state, measured_at=check.measured_at, check_id=check.id, value=check.value,
                            threshold=check.threshold)
    return state, changes
