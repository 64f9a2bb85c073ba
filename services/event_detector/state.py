"""State changes (DESIGN.md section 4, "State change").

trigger_states holds the latest status of a (trigger, offer, affiliate) pair ordered by
measured_at, never by arrival. PostgreSQL applies one check to a pair's state, under the
row's lock, in the upsert of handler.py (`_apply_round`):
- no state yet: the check's becomes the state; a change from nothing if it is PROBLEM;
- a newer check with another status: status, since = its measured_at, previous_status =
  the status it leaves; a change;
- a newer check with the same status: measured_at (with check, value, threshold) only;
- a check older than the state or as old: nothing.
What is left here is pure: the order in which a message's checks of one pair are applied,
and what the row an upsert returns says about its check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import NamedTuple

from shared.vocabulary import Status

Pair = tuple[int, int, int]  # trigger_id, offer_id, affiliate_id


# NamedTuples rather than frozen dataclasses: a message builds thousands of them, and a
# frozen dataclass costs three times as much to create.
class Check(NamedTuple):
    id: int
    status: Status
    measured_at: datetime
    value: float
    threshold: float


class Change(NamedTuple):
    """One state change: a trigger_events row and a trigger.event.<status> message."""

    check: Check
    previous_status: Status | None

    @property
    def status(self) -> Status:
        return self.check.status


def rounds(by_pair: Mapping[Pair, Iterable[Check]]) -> list[dict[Pair, Check]]:
    """The checks of each pair in (measured_at, id) order, the k-th of every pair in the
    k-th round, each round's pairs in primary-key order: one upsert per round applies a
    pair's checks in measured_at order, and the first one locks every pair of the message."""
    ordered = {pair: sorted(checks, key=lambda c: (c.measured_at, c.id)) for pair, checks in by_pair.items()}
    depth = max((len(checks) for checks in ordered.values()), default=0)
    return [
        {pair: checks[k] for pair, checks in sorted(ordered.items()) if len(checks) > k}
        for k in range(depth)
    ]


def change_of(check: Check, status: Status, status_set: bool, previous_status: Status | None) -> Change | None:
    """The change `check` made, judged from the state the upsert returned after it.

    `status_set`: the state's since equals its measured_at, i.e. this check set the status
    (a same-status update keeps an older since); previous_status is NULL only for a state
    this check created.
    """
    if not status_set:
        return None
    if previous_status is None:
        # A pair first seen OK is not news; first seen in PROBLEM is.
        return Change(check, None) if status == "PROBLEM" else None
    return Change(check, previous_status)
