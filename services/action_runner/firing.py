"""Which actions a trigger event fires (DESIGN.md sections 4, 6 and 8), and their runs.

The decision is decisions.evaluate's, applied to what is read here: the actions with a
condition (T, S) of the event, the pair's states under their other conditions' triggers.
It is taken once per event, in one transaction serialised per event by an advisory lock,
and recorded: one action_evaluations row per action evaluated (fired or why not, for
`kpi explain`), one action_firings row per episode (the first event that completes the
conjunction claims it), and one operation_runs row per (event, action, operation) of a
fired action: `pending`, or `silenced` when a silence matches the event (no side effect).
A redelivery finds the evaluations and keeps that decision instead of re-reading
trigger_states, which may have moved on. Running the runs is execution.py's job.

Reminders (actions.repeat_minutes) are runs of the same event and action with repeat
1, 2 ...: `due_reminders` finds them (the action_runner's ticker records and runs them).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

from sqlalchemy import Connection, Text, and_, bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.action_runner.decisions import (
    ActionRule, Condition, Evaluation, OperationRule, StateOf, episode_holds, evaluate, reminder_due,
)
from shared import silences
from shared.db import (
    Action, ActionCondition, ActionEvaluation, ActionFiring, ActionOperation, Operation, OperationRun, Trigger,
    TriggerCheck, TriggerEvent, TriggerState,
)
from shared.events import TriggerEventMessage

logger = logging.getLogger(__name__)


def ensure_runs(conn: Connection, event: TriggerEventMessage, created_at: datetime) -> list[tuple[int, str]]:
    """The event's operation runs (id, status), deciding which actions fire if no
    delivery of the event has yet. `created_at`: when the event was recorded (silences)."""
    # Two replicas with the same event must not both evaluate the conditions: if
    # trigger_states changed in between, their union would run more than either decided.
    # The lock first, in a statement of its own: a statement reads what was committed
    # when it started, which is before it waited for the lock.
    conn.execute(_DECIDING, {"key": f"action_runner.trigger_event:{event.trigger_event_id}"})
    decided = conn.execute(_DECIDED, {"event": event.trigger_event_id}).scalar_one()
    if decided:
        return runs_of(conn, event.trigger_event_id)
    actions = load_actions(conn, trigger_id=event.trigger_id, status=event.status)
    if not actions:
        return runs_of(conn, event.trigger_event_id)
    states = pair_states(conn, event.offer_id, event.affiliate_id,
                         {c.trigger_id for a in actions for c in a.conditions})
    names = trigger_names(conn, {c.trigger_id for a in actions for c in a.conditions})
    fired: list[ActionRule] = []
    evaluations = []
    for action in actions:
        evaluation = evaluate(action, event.trigger_id, event.status, event.measured_at, states, names)
        if evaluation.fired:
            owner = claim_episode(conn, event, action.id, evaluation.episode)  # type: ignore[arg-type]
            if owner != event.trigger_event_id:
                evaluation = Evaluation(False, f"already fired for this episode, by trigger event {owner}",
                                        evaluation.episode)
            else:
                fired.append(action)
        evaluations.append({"trigger_event_id": event.trigger_event_id, "action_id": action.id,
                            "fired": evaluation.fired, "reason": evaluation.reason, "episode": evaluation.episode})
    conn.execute(_ADD_EVALUATIONS, evaluations)
    if not fired:
        return []
    # No run of the event existed (the evaluations did not): the new ones are all of them.
    return sorted(add_runs(conn, event, [(action, op) for action in fired for op in action.operations], repeat=0,
                           measured_at=event.measured_at, at=created_at))


# The statements of every event, built once: building a statement costs more CPU than
# running it (SQLAlchemy's cache keys them by structure, and memoizes a statement's key).
_DECIDING = select(func.pg_advisory_xact_lock(func.hashtextextended(bindparam("key", type_=Text()), 0)))
_DECIDED = select(func.count()).select_from(ActionEvaluation).where(
    ActionEvaluation.trigger_event_id == bindparam("event"))
_ADD_EVALUATIONS = pg_insert(ActionEvaluation).on_conflict_do_nothing()
_ADD_RUNS = (pg_insert(OperationRun).on_conflict_do_nothing(constraint="uq_operation_runs_run")
             .returning(OperationRun.id, OperationRun.status))
_ADD_SILENCED_RUNS = (pg_insert(OperationRun).values(finished_at=func.clock_timestamp())
                      .on_conflict_do_nothing(constraint="uq_operation_runs_run")
                      .returning(OperationRun.id, OperationRun.status))


def add_runs(conn: Connection, event: TriggerEventMessage, runs: Iterable[tuple[ActionRule, OperationRule]], *,
             repeat: int, measured_at: datetime, at: datetime) -> list[tuple[int, str]]:
    """Record runs (ON CONFLICT DO NOTHING): pending, or silenced if a silence matches
    the event at `at`. The new ones (id, status)."""
    rows = list(runs)
    if not rows:
        return []
    silence = silences.active_for(conn, event.trigger_id, event.offer_id, event.affiliate_id, at)
    values = [{"trigger_event_id": event.trigger_event_id, "action_id": action.id, "operation_id": op.id,
               "kind": op.kind, "repeat": repeat, "measured_at": measured_at,
               "status": "silenced" if silence else "pending",
               "detail": f"silenced by {silence.describe()}" if silence else None,
               "silence_id": silence.id if silence else None}
              for action, op in sorted(rows, key=lambda r: (r[0].id, r[1].id))]
    # One statement for all the rows (executemany through SQLAlchemy's insertmanyvalues).
    return [tuple(r) for r in conn.execute(_ADD_SILENCED_RUNS if silence else _ADD_RUNS, values)]  # type: ignore[misc]


def load_actions(conn: Connection, *, trigger_id: int | None = None, status: str | None = None,
                 action_ids: Collection[int] | None = None) -> list[ActionRule]:
    """Actions with their conditions and operations, in one statement: those with a
    condition (trigger_id, status), or those of `action_ids`, or all."""
    query, params = _ACTIONS, {}
    if trigger_id is not None:
        query, params = _ACTIONS_OF_CONDITION, {"trigger": trigger_id, "status": status}
    if action_ids is not None:
        query = query.where(Action.id.in_(list(action_ids)))
    heads: dict[int, tuple] = {}
    conditions: dict[int, set[Condition]] = defaultdict(set)
    operations: dict[int, dict[int, OperationRule]] = defaultdict(dict)
    for r in conn.execute(query.order_by(Action.id), params):
        heads.setdefault(r.id, (r.name, r.active, r.repeat_minutes))
        if r.trigger_id is not None:
            conditions[r.id].add(Condition(r.trigger_id, r.trigger_status))
        if r.op_id is not None:
            operations[r.id][r.op_id] = OperationRule(r.op_id, r.op_name, r.kind, r.digest_minutes)
    return [ActionRule(action_id, name, active, tuple(sorted(conditions[action_id])),
                       tuple(op for _, op in sorted(operations[action_id].items())), repeat)
            for action_id, (name, active, repeat) in heads.items()]


_ACTIONS = (select(Action.id, Action.name, Action.active, Action.repeat_minutes, ActionCondition.trigger_id,
                   ActionCondition.trigger_status, Operation.id.label("op_id"), Operation.name.label("op_name"),
                   Operation.kind, Operation.digest_minutes)
            .outerjoin(ActionCondition, ActionCondition.action_id == Action.id)
            .outerjoin(ActionOperation, ActionOperation.action_id == Action.id)
            .outerjoin(Operation, Operation.id == ActionOperation.operation_id))
_ACTIONS_OF_CONDITION = _ACTIONS.where(Action.id.in_(
    select(ActionCondition.action_id).where(ActionCondition.trigger_id == bindparam("trigger"),
                                            ActionCondition.trigger_status == bindparam("status"))))


def pair_states(conn: Connection, offer_id: int, affiliate_id: int, trigger_ids: Collection[int]
                ) -> dict[int, StateOf]:
    if not trigger_ids:
        return {}
    rows = conn.execute(_PAIR_STATES, {"offer": offer_id, "affiliate": affiliate_id, "triggers": list(trigger_ids)})
    return {t: StateOf(status, since) for t, status, since in rows}


def trigger_names(conn: Connection, trigger_ids: Collection[int]) -> dict[int, str]:
    if not trigger_ids:
        return {}
    return dict(conn.execute(_TRIGGER_NAMES, {"triggers": list(trigger_ids)}).all())


_PAIR_STATES = select(TriggerState.trigger_id, TriggerState.status, TriggerState.since).where(
    TriggerState.offer_id == bindparam("offer"), TriggerState.affiliate_id == bindparam("affiliate"),
    TriggerState.trigger_id.in_(bindparam("triggers", expanding=True)))
_TRIGGER_NAMES = select(Trigger.id, Trigger.name).where(Trigger.id.in_(bindparam("triggers", expanding=True)))


def claim_episode(conn: Connection, event: TriggerEventMessage, action_id: int, episode: str) -> int:
    """The trigger event that fires the action for its episode: this one if it is the
    first to claim it. A second event completing the same conjunction (the other
    condition's change) finds it claimed and fires nothing: one reject, not two."""
    claimed = conn.execute(_CLAIM_EPISODE, {
        "action_id": action_id, "offer_id": event.offer_id, "affiliate_id": event.affiliate_id, "episode": episode,
        "trigger_event_id": event.trigger_event_id}).scalar()
    if claimed is not None:
        return claimed
    owner = conn.execute(
        select(ActionFiring.trigger_event_id).where(
            ActionFiring.action_id == action_id, ActionFiring.offer_id == event.offer_id,
            ActionFiring.affiliate_id == event.affiliate_id, ActionFiring.episode == episode)
    ).scalar_one()
    if owner != event.trigger_event_id:
        logger.info("trigger_event %d: action %d already fired for this episode by trigger_event %d",
                    event.trigger_event_id, action_id, owner)
    return owner


_CLAIM_EPISODE = pg_insert(ActionFiring).on_conflict_do_nothing().returning(ActionFiring.trigger_event_id)


def runs_of(conn: Connection, trigger_event_id: int) -> list[tuple[int, str]]:
    return [tuple(r) for r in conn.execute(_RUNS_OF, {"event": trigger_event_id})]  # type: ignore[misc]


_RUNS_OF = (select(OperationRun.id, OperationRun.status)
            .where(OperationRun.trigger_event_id == bindparam("event")).order_by(OperationRun.id))


# -- reminders -----------------------------------------------------------------------------


def due_reminders(conn: Connection) -> list[tuple[int, int, int, datetime]]:
    """(trigger event, action, repeat, measured_at) of every reminder due now: for each
    episode of an action with repeat_minutes that still lasts, the first check of the
    event's pair under the event's trigger at least repeat_minutes after its last run."""
    e, s, f = TriggerEvent, TriggerState, ActionFiring
    # Episodes still open under the event's own trigger: the pair is still in the status
    # the event entered, since then. (Other conditions are checked below.)
    open_firings = conn.execute(
        select(f.trigger_event_id, f.action_id, f.episode, e.trigger_id, e.offer_id, e.affiliate_id,
               Action.repeat_minutes, s.measured_at.label("folded"))
        .join(e, e.id == f.trigger_event_id)
        .join(s, and_(s.trigger_id == e.trigger_id, s.offer_id == e.offer_id, s.affiliate_id == e.affiliate_id,
                      s.status == e.status, s.since == e.measured_at))
        .join(Action, and_(Action.id == f.action_id, Action.active, Action.repeat_minutes.is_not(None)))
    ).all()
    if not open_firings:
        return []
    keys = [(r.trigger_event_id, r.action_id) for r in open_firings]
    last = {(te, a): (repeat, at) for te, a, repeat, at in conn.execute(
        select(OperationRun.trigger_event_id, OperationRun.action_id, func.max(OperationRun.repeat),
               func.max(OperationRun.measured_at))
        .where(tuple_(OperationRun.trigger_event_id, OperationRun.action_id).in_(keys))
        .group_by(OperationRun.trigger_event_id, OperationRun.action_id))}
    actions = {a.id: a for a in load_actions(conn, action_ids={r.action_id for r in open_firings})}
    due = []
    for r in open_firings:
        action = actions.get(r.action_id)
        if action is None or not action.email_operations or (r.trigger_event_id, r.action_id) not in last:
            continue
        repeat, last_at = last[r.trigger_event_id, r.action_id]
        if last_at is None:
            continue
        states = pair_states(conn, r.offer_id, r.affiliate_id, {c.trigger_id for c in action.conditions})
        if not episode_holds(r.episode, states, action.conditions):
            continue
        mark = last_at + timedelta(minutes=r.repeat_minutes)
        c = TriggerCheck
        # Only a check the state has folded in: one recorded but not yet applied may be the
        # very check that ends the episode.
        check_at = conn.execute(
            select(func.min(c.measured_at)).where(
                c.trigger_id == r.trigger_id, c.offer_id == r.offer_id, c.affiliate_id == r.affiliate_id,
                c.measured_at >= mark, c.measured_at <= r.folded)
        ).scalar()
        if check_at is not None and reminder_due(last_at, check_at, r.repeat_minutes):
            due.append((r.trigger_event_id, r.action_id, repeat + 1, check_at))
    return due
