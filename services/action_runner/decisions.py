"""What the action_runner decides, as pure functions (DESIGN.md sections 4, 6, 7 and 8).

No I/O: firing.py and execution.py apply them to what they read from the database, and
`kpi backtest` to what it replays in memory, so the backtest says what the services do.

- An action is *evaluated* for a trigger event (trigger T, status S, pair P) when it has
  a condition (T, S). It fires when it is active and every condition holds for P: (T, S)
  by the event itself, any other by the pair's current state of that trigger.
- It fires once per *episode*: the episode is named by when each condition's status
  began (the event's measured_at for T, the state's `since` for the others), so two
  events that complete the same conjunction fire it once.
- A run whose event a silence matches is `silenced`; a reject for a protected affiliate is
  `skipped`; a reject beyond KPI_MAX_REJECTS_PER_HOUR rejects in the last hour is `held`.
- A reminder of an action's email operations is due at a new check of the pair at least
  `repeat_minutes` after the episode's last run, while the episode lasts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from shared.vocabulary import EMAIL_KINDS, Status

PROTECTED = "protected affiliate"


class Condition(NamedTuple):
    trigger_id: int
    status: Status


class OperationRule(NamedTuple):
    id: int
    name: str
    kind: str
    digest_minutes: int | None = None


class ActionRule(NamedTuple):
    id: int
    name: str
    active: bool
    conditions: tuple[Condition, ...]
    operations: tuple[OperationRule, ...]
    repeat_minutes: int | None = None

    def is_evaluated_for(self, trigger_id: int, status: str) -> bool:
        return Condition(trigger_id, status) in self.conditions  # type: ignore[arg-type]

    @property
    def email_operations(self) -> tuple[OperationRule, ...]:
        return tuple(op for op in self.operations if op.kind in EMAIL_KINDS)


class StateOf(NamedTuple):
    """A pair's state under one trigger, as a condition reads it."""

    status: Status | None
    since: datetime | None


class Evaluation(NamedTuple):
    fired: bool
    reason: str  # why it fired, or the first reason it did not
    episode: str | None  # set when every condition holds


def evaluate(action: ActionRule, trigger_id: int, status: str, measured_at: datetime,
             states: Mapping[int, StateOf], names: Mapping[int, str] | None = None) -> Evaluation:
    """Does `action` fire for an event (trigger_id, status) of a pair whose states are
    `states` (trigger id -> state; a trigger absent from it has no state for the pair)?
    The episode claim (once per episode) is the caller's: it needs the record of firings."""
    names = names or {}
    if not action.active:
        return Evaluation(False, "the action is inactive", None)
    parts = []
    for condition in sorted(set(action.conditions)):
        label = f"({names.get(condition.trigger_id, f'trigger {condition.trigger_id}')}, {condition.status})"
        if condition.trigger_id == trigger_id:
            if condition.status != status:
                return Evaluation(False, f"condition {label} does not hold: the event is {status}", None)
            parts.append(f"{condition.trigger_id}@{measured_at.isoformat()}")
            continue
        state = states.get(condition.trigger_id)
        if state is None or state.status is None:
            return Evaluation(False, f"condition {label} does not hold: the pair has no state under it", None)
        if state.status != condition.status:
            return Evaluation(False, f"condition {label} does not hold: the pair is {state.status}", None)
        assert state.since is not None
        parts.append(f"{condition.trigger_id}@{state.since.isoformat()}")
    return Evaluation(True, "every condition holds", ";".join(parts))


def episode_holds(episode: str, states: Mapping[int, StateOf], conditions: Sequence[Condition]) -> bool:
    """Whether the episode an action fired for still lasts: every condition holds, with
    the status it had then, begun when it began then."""
    began = dict(part.split("@", 1) for part in episode.split(";") if part)
    for condition in conditions:
        state = states.get(condition.trigger_id)
        if state is None or state.status != condition.status or state.since is None:
            return False
        if began.get(str(condition.trigger_id)) != state.since.isoformat():
            return False
    return True


def reminder_due(last_run_at: datetime, check_at: datetime, repeat_minutes: int) -> bool:
    return check_at >= last_run_at + timedelta(minutes=repeat_minutes)


def cap_allows(rejects_in_the_last_hour: int, max_per_hour: int) -> bool:
    """Whether one more reject may run: 0 means no reject runs at all."""
    return rejects_in_the_last_hour < max_per_hour


def held_detail(rejects_in_the_last_hour: int, max_per_hour: int) -> str:
    if max_per_hour == 0:
        return "held: KPI_MAX_REJECTS_PER_HOUR is 0 (no reject runs without an operator's release)"
    return (f"held: {rejects_in_the_last_hour} rejects in the last 60 minutes reached KPI_MAX_REJECTS_PER_HOUR "
            f"({max_per_hour}); release it with `kpi held release`")
