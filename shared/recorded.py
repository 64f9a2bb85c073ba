"""Messages rebuilt from what the database recorded, never from a message received.

A trigger event is announced again (a held reject released, a reminder due, a redelivery)
from its trigger_events row: the trigger name, value, threshold, statuses and time that
go into emails and reject notes are the row's.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select

from shared.db import Trigger, TriggerEvent
from shared.events import TriggerEventMessage


def trigger_event_message(conn: Connection, trigger_event_id: int) -> TriggerEventMessage | None:
    """The trigger.event.* data of a recorded event, or None when there is no such row."""
    # The event's own facts: its check may be past retention (migration 0010 copied the
    # check's value into events recorded without one).
    row = conn.execute(_TRIGGER_EVENT, {"event": trigger_event_id}).first()
    if row is None:
        return None
    # Built without validation: these are our own rows.
    return TriggerEventMessage.model_construct(
        trigger_event_id=row.id, trigger_id=row.trigger_id, trigger_name=row.name, offer_id=row.offer_id,
        affiliate_id=row.affiliate_id, previous_status=row.previous_status, status=row.status, value=row.value,
        threshold=row.threshold, measured_at=row.measured_at, check_id=row.check_id)


_e = TriggerEvent
# Built once: the action_runner reads one for every event it acts on.
_TRIGGER_EVENT = (
    select(_e.id, _e.trigger_id, Trigger.name, _e.offer_id, _e.affiliate_id, _e.previous_status, _e.status,
           _e.value, _e.threshold, _e.measured_at, _e.check_id)
    .join(Trigger, Trigger.id == _e.trigger_id)
    .where(_e.id == bindparam("event"))
)
