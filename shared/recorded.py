"""Messages rebuilt from what the database recorded, never from a message received.

A trigger event is announced again (a held reject released, a reminder due, a redelivery)
from its trigger_events row: the trigger name, value, threshold, statuses and time that
go into emails and reject notes are the row's.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from shared.db import Trigger, TriggerCheck, TriggerEvent
from shared.events import TriggerEventMessage


def trigger_event_message(conn: Connection, trigger_event_id: int) -> TriggerEventMessage | None:
    """The trigger.event.* data of a recorded event, or None when there is no such row."""
    e, c = TriggerEvent, TriggerCheck
    row = conn.execute(
        select(e.id, e.trigger_id, Trigger.name, e.offer_id, e.affiliate_id, e.previous_status, e.status,
               # An event older than migration 0002 has no value of its own: its check's.
               func.coalesce(e.value, c.value).label("value"),
               func.coalesce(e.threshold, c.threshold).label("threshold"), e.measured_at, e.check_id)
        .join(Trigger, Trigger.id == e.trigger_id)
        .outerjoin(c, c.id == e.check_id)
        .where(e.id == trigger_event_id)
    ).first()
    if row is None:
        return None
    # Built without validation: these are our own rows (value may still be NULL in rows
    # older than migration 0002 whose check is gone).
    return TriggerEventMessage.model_construct(
        trigger_event_id=row.id, trigger_id=row.trigger_id, trigger_name=row.name, offer_id=row.offer_id,
        affiliate_id=row.affiliate_id, previous_status=row.previous_status, status=row.status, value=row.value,
        threshold=row.threshold, measured_at=row.measured_at, check_id=row.check_id)
