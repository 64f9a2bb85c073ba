"""Held rejects (DESIGN.md section 7): list, release, discard.

A reject beyond KPI_MAX_REJECTS_PER_HOUR is recorded `held`. Releasing it sets it back
to `pending` with who and when (a released run is not capped again) and publishes its
trigger event once more, so an action_runner runs it now; discarding it ends it
`discarded`. Both are one conditional UPDATE ... WHERE status = 'held': a run released
twice, or by two operators at once, is released (and run) once. Shared by `kpi held` and
the console.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import Connection, func, select, update

from shared.db import Affiliate, Offer, OperationRun, Trigger, TriggerEvent
from shared.events import TRIGGER_EVENT_TYPES, Envelope, new_event
from shared.recorded import trigger_event_message


class HeldError(Exception):
    """Bad input (unknown or not held ids): the message is for a person."""


def listing(conn: Connection, limit: int = 500, offset: int = 0) -> list[dict]:
    """Held runs, oldest first."""
    r, e = OperationRun, TriggerEvent
    rows = conn.execute(
        select(r.id, r.trigger_event_id, Trigger.name.label("trigger"), e.offer_id, Offer.name.label("offer_name"),
               e.affiliate_id, Affiliate.company.label("affiliate_company"), e.value, e.threshold, e.measured_at,
               r.detail, r.created_at, r.finished_at)
        .join(e, e.id == r.trigger_event_id).join(Trigger, Trigger.id == e.trigger_id)
        .outerjoin(Offer, Offer.id == e.offer_id).outerjoin(Affiliate, Affiliate.id == e.affiliate_id)
        .where(r.status == "held").order_by(r.id).limit(limit).offset(offset)).all()
    return [row._asdict() for row in rows]


def _check(conn: Connection, run_ids: Sequence[int] | None) -> list[int] | None:
    if run_ids is None:
        return None
    if not run_ids:
        raise HeldError("name the runs (IDs) or pass --all")
    known = dict(conn.execute(select(OperationRun.id, OperationRun.status)
                              .where(OperationRun.id.in_(list(run_ids)))).all())
    unknown = sorted(set(run_ids) - set(known))
    if unknown:
        raise HeldError(f"no operation run with id {', '.join(map(str, unknown))}")
    return list(run_ids)


def release(conn: Connection, run_ids: Sequence[int] | None, by: str) -> tuple[list[int], list[Envelope]]:
    """Release held runs (all of them when run_ids is None): the runs this call released
    (those released or decided already are left alone), and the trigger events to
    publish so an action_runner runs them."""
    ids = _check(conn, run_ids)
    stmt = (update(OperationRun).where(OperationRun.status == "held")
            # started_at cleared: the ticker knows a released run nobody has tried yet.
            .values(status="pending", decided_by=by[:200], decided_at=func.now(), finished_at=None, started_at=None,
                    detail=f"released by {by[:200]}")
            .returning(OperationRun.id, OperationRun.trigger_event_id))
    if ids is not None:
        stmt = stmt.where(OperationRun.id.in_(ids))
    released = conn.execute(stmt).all()
    events = sorted({trigger_event_id for _, trigger_event_id in released})
    return sorted(run_id for run_id, _ in released), [_event(conn, te) for te in events]


def discard(conn: Connection, run_ids: Sequence[int] | None, by: str) -> list[int]:
    ids = _check(conn, run_ids)
    stmt = (update(OperationRun).where(OperationRun.status == "held")
            .values(status="discarded", decided_by=by[:200], decided_at=func.now(),
                    finished_at=func.clock_timestamp(), detail=f"discarded by {by[:200]}")
            .returning(OperationRun.id))
    if ids is not None:
        stmt = stmt.where(OperationRun.id.in_(ids))
    return sorted(conn.scalars(stmt))


def _event(conn: Connection, trigger_event_id: int) -> Envelope:
    message = trigger_event_message(conn, trigger_event_id)
    assert message is not None  # operation_runs references trigger_events
    # A new delivery of the event (not a duplicate): the action_runner finds the released
    # run pending and runs it.
    return new_event(TRIGGER_EVENT_TYPES[message.status], message, correlation_id="held-release",
                     event_id=uuid.uuid4())
