"""Which actions a trigger event fires (DESIGN.md section 4, "Action", and section 8).

An action fires for an event (trigger T, status S, pair P) when it is active, has a
condition (T, S), and all its conditions hold for P: the condition on T by the event
itself, every other one by the current trigger_states. It fires once per episode (section
8): the first event that completes the conjunction claims it in action_firings.

The decision is taken once per event, in one transaction serialised per event by an
advisory lock, and recorded as one `pending` operation_runs row per (event, action,
operation), ON CONFLICT DO NOTHING. A redelivery finds the runs and keeps that decision
instead of re-reading trigger_states, which may have moved on. Running them is
execution.py's job.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Select, and_, exists, func, literal, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import aliased

from shared.db import Action, ActionCondition, ActionFiring, ActionOperation, Operation, OperationRun, TriggerState
from shared.events import TriggerEventMessage

logger = logging.getLogger(__name__)


def ensure_runs(conn: Connection, event: TriggerEventMessage) -> list[tuple[int, str]]:
    """The event's operation runs (id, status), deciding which actions fire if no
    delivery of the event has yet."""
    # Two replicas with the same event must not both evaluate the conditions: if
    # trigger_states changed in between, their union would run more than either decided.
    conn.execute(select(func.pg_advisory_xact_lock(
        func.hashtextextended(f"action_runner.trigger_event:{event.trigger_event_id}", 0))))
    runs = _runs_of(conn, event.trigger_event_id)
    if runs:
        return runs
    fired = [a for a in conn.execute(firing_actions(event)).scalars() if claim_episode(conn, event, a)]
    if not fired:
        return []
    conn.execute(
        pg_insert(OperationRun)
        .from_select(
            ["trigger_event_id", "action_id", "operation_id", "kind", "status"],
            select(literal(event.trigger_event_id), ActionOperation.action_id, ActionOperation.operation_id,
                   Operation.kind, literal("pending"))
            .join(Operation, Operation.id == ActionOperation.operation_id)
            .where(ActionOperation.action_id.in_(fired))
            .order_by(ActionOperation.action_id, ActionOperation.operation_id),
        )
        .on_conflict_do_nothing(index_elements=["trigger_event_id", "action_id", "operation_id"])
    )
    return _runs_of(conn, event.trigger_event_id)


def firing_actions(event: TriggerEventMessage) -> Select[tuple[int]]:
    """Active actions with a condition (T, S) all of whose conditions hold for the pair.

    A condition on the event's own trigger is judged by the event (it holds only for
    status S); any other is read from trigger_states, and holds only if a state row for
    the pair has that status.
    """
    t, s = event.trigger_id, event.status
    own = exists().where(ActionCondition.action_id == Action.id, ActionCondition.trigger_id == t,
                         ActionCondition.trigger_status == s)
    other = aliased(ActionCondition)
    state_holds = exists().where(
        TriggerState.trigger_id == other.trigger_id, TriggerState.offer_id == event.offer_id,
        TriggerState.affiliate_id == event.affiliate_id, TriggerState.status == other.trigger_status,
    )
    unmet = exists().where(
        other.action_id == Action.id,
        or_(and_(other.trigger_id == t, other.trigger_status != s),
            and_(other.trigger_id != t, ~state_holds)),
    )
    return select(Action.id).where(Action.active, own, ~unmet)


def episode_of(conn: Connection, event: TriggerEventMessage, action_id: int) -> str:
    """Names the episode in which all the action's conditions hold: for each condition,
    its trigger and when its status began (the event's own measured_at for the event's
    trigger, the state's `since` for the others). Two events that complete the same
    conjunction name the same episode."""
    rows = conn.execute(
        select(ActionCondition.trigger_id, TriggerState.since)
        .outerjoin(TriggerState, and_(TriggerState.trigger_id == ActionCondition.trigger_id,
                                      TriggerState.offer_id == event.offer_id,
                                      TriggerState.affiliate_id == event.affiliate_id))
        .where(ActionCondition.action_id == action_id)
        .distinct().order_by(ActionCondition.trigger_id)
    ).all()
    parts = []
    for trigger_id, since in rows:
        began = event.measured_at if trigger_id == event.trigger_id else since
        parts.append(f"{trigger_id}@{began.isoformat()}")
    return ";".join(parts)


def claim_episode(conn: Connection, event: TriggerEventMessage, action_id: int) -> bool:
    """True when this event is the one that fires the action for its episode.

    A second event completing the same conjunction (the other condition's change) finds
    the episode claimed and fires nothing: one reject, not two.
    """
    episode = episode_of(conn, event, action_id)
    conn.execute(
        pg_insert(ActionFiring)
        .values(action_id=action_id, offer_id=event.offer_id, affiliate_id=event.affiliate_id,
                episode=episode, trigger_event_id=event.trigger_event_id)
        .on_conflict_do_nothing()
    )
    owner = conn.execute(
        select(ActionFiring.trigger_event_id).where(
            ActionFiring.action_id == action_id, ActionFiring.offer_id == event.offer_id,
            ActionFiring.affiliate_id == event.affiliate_id, ActionFiring.episode == episode)
    ).scalar_one()
    if owner != event.trigger_event_id:
        logger.info("trigger_event %d: action %d already fired for this episode by trigger_event %d",
                    event.trigger_event_id, action_id, owner)
    return owner == event.trigger_event_id


def _runs_of(conn: Connection, trigger_event_id: int) -> list[tuple[int, str]]:
    return [tuple(r) for r in conn.execute(  # type: ignore[misc]
        select(OperationRun.id, OperationRun.status)
        .where(OperationRun.trigger_event_id == trigger_event_id).order_by(OperationRun.id)
    )]
