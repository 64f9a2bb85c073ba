"""action_runner's handler: a trigger event in, each firing action's operations run once.

Exactly once, step by step (DESIGN.md section 4, "Action"):

1. The message only names a trigger_events row; what the operations use is read from
   the row (recorded_event), as the event_detector reads checks.
2. Which actions fire is decided once per event and recorded as pending operation runs
   (firing.py).
3. Each pending run is claimed, counted, done and its outcome committed (execution.py);
   a run held by another delivery sends this one through the retry queue.
4. Every final run of the event is announced as operation.executed, on every delivery.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine

from services.action_runner import execution, firing
from services.action_runner.mailer import Mailer
from shared.events import TRIGGER_EVENT_TYPES, Envelope, InvalidMessageError, TriggerEventMessage, encode, parse_data
from shared.handling import DeadLetter, Delivery, HandlerResult, RetryableError
from shared.hasoffers import HasOffersClient
from shared.recorded import trigger_event_message
from shared.settings import Settings
from shared.sql import connection

logger = logging.getLogger(__name__)


def handle_trigger_event(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine, mailer: Mailer,
                         hasoffers: HasOffersClient | None, settings: Settings) -> HandlerResult:
    message = _validate(envelope)
    delivery = delivery or Delivery(max_attempts=settings.kpi_retry_limit + 1)
    event_id = str(envelope.event_id)
    # One connection for the whole delivery: the runs' claims are session locks, taken in
    # the transaction that decides, held while each side effect is done and its outcome
    # committed, and released at the end.
    with connection(engine) as conn:
        locked: set[int] = set()
        try:
            with conn.begin():
                event = recorded_event(conn, message)
                facts, created_at = execution.event_facts(conn, event_id, event)
                runs = firing.ensure_runs(conn, event, created_at)
                pending = [run_id for run_id, status in runs if status == "pending"]
                claimed, locked = execution.claim(conn, pending, settings)
            logger.info("event_id=%s trigger_event %d: %d operation run(s)", event_id, event.trigger_event_id,
                        len(runs))
            results = execution.run_claimed(conn, pending, claimed, locked, facts, delivery, mailer=mailer,
                                            hasoffers=hasoffers, settings=settings)
        finally:
            execution.release(conn, sorted(locked))

        retry = [r.reason for r in results if r.kind in ("retry", "busy")]
        gave_up = [r.reason for r in results if r.kind == "gave_up"]
        if retry:
            # Nothing is lost by raising: finished runs are committed, and their notices go out
            # with whichever later delivery (a retry, or a replay from the dead queue) returns.
            raise RetryableError("; ".join(retry))
        notices = execution.notices(conn, envelope, event)
    if gave_up:
        # The event itself goes to the dead queue, so an operator sees it and can replay it
        # (after resetting the failed runs to pending, see README).
        return HandlerResult(notices=notices, dead_letters=[DeadLetter(encode(envelope), "; ".join(gave_up))])
    return HandlerResult(notices=notices)


def _validate(envelope: Envelope) -> TriggerEventMessage:
    event = parse_data(envelope)
    if not isinstance(event, TriggerEventMessage):
        raise InvalidMessageError(f"action_runner does not handle {envelope.type}")
    if TRIGGER_EVENT_TYPES[event.status] != envelope.type:
        raise InvalidMessageError(f"a {envelope.type} event with status {event.status}")
    return event


def recorded_event(conn: Connection, message: TriggerEventMessage) -> TriggerEventMessage:
    """The trigger event as trigger_events recorded it: the message only names it.

    Anyone who can publish can send a trigger.event.*; what goes into an email or a
    reject note (trigger name, value, threshold, statuses, time) is read from the
    database, as the event_detector reads checks. operation_runs references
    trigger_events, so without the row no run can be recorded; a row that names another
    pair or status than the message means the message is not ours.
    """
    row = trigger_event_message(conn, message.trigger_event_id)
    if row is None:
        raise InvalidMessageError(f"trigger_event {message.trigger_event_id} does not exist in trigger_events")
    expected = (message.trigger_id, message.offer_id, message.affiliate_id, message.status)
    if (row.trigger_id, row.offer_id, row.affiliate_id, row.status) != expected:
        raise InvalidMessageError(
            f"trigger_event {message.trigger_event_id} is (trigger {row.trigger_id}, offer {row.offer_id}, "
            f"affiliate {row.affiliate_id}, {row.status}) in trigger_events, but the message says (trigger "
            f"{expected[0]}, offer {expected[1]}, affiliate {expected[2]}, {expected[3]})"
        )
    return row
