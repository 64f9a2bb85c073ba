"""event_detector: trigger.checked -> trigger_states, trigger_events -> trigger.event.*.

Correct with any number of replicas and any delivery order because the database
serialises the work per pair: one upsert per message creates the missing state rows,
locks every state row of the batch in primary-key order (so two batches never wait on
each other in a cycle) and applies each pair's check to the row it locked, whatever
committed last (state.py says what applying means). A pair with several checks in one
message takes one more upsert per further check, on rows it already holds.
trigger_events is unique on check_id, so a redelivery cannot record a change twice; it
publishes the recorded events of its checks again (same event ids), which covers a crash
between commit and publish. The checks themselves are read from trigger_checks, the
record the trigger_checker committed before it published the message.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy import BigInteger, Double, Integer, Text, any_, case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine

from shared.batch import split_batch
from shared.handling import Delivery, HandlerResult
from shared.db import TZ, Trigger, TriggerCheck, TriggerEvent, TriggerState
from shared.events import (
    MAX_CHECKS, TRIGGER_EVENT_TYPES, CheckItem, Envelope, TriggerEventMessage, new_event, stable_event_id,
)
from shared.sql import array, transaction, unnest
from services.event_detector.state import Change, Check, Pair, change_of, rounds

logger = logging.getLogger(__name__)

PAIR_COLUMNS = {"trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer()}
STATE_COLUMNS = {
    **PAIR_COLUMNS, "status": Text(), "since": TZ, "measured_at": TZ, "check_id": BigInteger(), "value": Double(),
    "threshold": Double(),
}

trigger_checks = TriggerCheck.__table__
trigger_states = TriggerState.__table__
trigger_events = TriggerEvent.__table__
triggers = Trigger.__table__


def handle_trigger_checked(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine) -> HandlerResult:
    batch = split_batch(envelope, "checks", CheckItem, MAX_CHECKS)
    with transaction(engine) as conn:
        checks = _load_checks(conn, sorted({item.check_id for item in batch.valid.values()}))
        for index, item in list(batch.valid.items()):
            if item.check_id not in checks:
                batch.reject(index, "check_id",
                             f"no trigger check {item.check_id} (unknown, or its trigger was deleted)")
        if not batch.valid:
            raise batch.nothing_valid_error()

        by_pair: dict[Pair, list[Check]] = defaultdict(list)
        for pair, check in checks.values():
            by_pair[pair].append(check)
        changes, created, updated = apply_checks(conn, by_pair)
        new_events = _record_events(conn, changes)
        rows = _load_events(conn, sorted(checks))
    events = [_event_message(envelope, row) for row in rows]
    logger.info(
        "detected event_id=%s checks=%d invalid=%d pairs=%d new_states=%d updated_states=%d changes=%d "
        "new_events=%d published=%d",
        envelope.event_id, len(batch.raw), len(batch.reasons), len(by_pair), created, updated,
        len(changes), new_events, len(events),
    )
    dead = batch.dead_letter()
    return HandlerResult(events=events, dead_letters=[dead] if dead else [])


def _load_checks(conn: Connection, check_ids: list[int]) -> dict[int, tuple[Pair, Check]]:
    if not check_ids:
        return {}
    c = trigger_checks.c
    rows = conn.execute(
        select(c.id, c.trigger_id, c.offer_id, c.affiliate_id, c.status, c.measured_at, c.value, c.threshold)
        .join(triggers, triggers.c.id == c.trigger_id)
        .where(c.id == any_(array(check_ids, BigInteger())))
    ).all()
    return {
        check_id: ((trigger_id, offer_id, affiliate_id), Check(check_id, status, measured_at, value, threshold))
        for check_id, trigger_id, offer_id, affiliate_id, status, measured_at, value, threshold in rows
    }


def apply_checks(conn: Connection, by_pair: dict[Pair, list[Check]]) -> tuple[list[tuple[Pair, Change]], int, int]:
    """Apply a message's checks to trigger_states; return the changes they made and how
    many states were created and updated."""
    changes: list[tuple[Pair, Change]] = []
    created = updated = 0
    for round_ in rounds(by_pair):
        for pair, status, check_id, status_set, previous_status in _apply_round(conn, round_):
            check = round_[pair]
            assert check_id == check.id, "the upsert returns only the rows its check was applied to"
            if status_set and previous_status is None:
                created += 1
            else:
                updated += 1
            change = change_of(check, status, status_set, previous_status)
            if change is not None:
                changes.append((pair, change))
    return changes, created, updated


def _apply_round(conn: Connection, round_: dict[Pair, Check]) -> list[tuple[Pair, str, int, bool, str | None]]:
    """One check per pair, as state.py describes, in one statement: the states it created
    or changed (status, check_id, whether this check set the status, previous_status),
    not those it left alone.

    INSERT ... ON CONFLICT DO UPDATE takes the rows in primary-key order (the SELECT's
    ORDER BY), locks each existing one (waiting for a concurrent writer to commit) and
    evaluates SET and WHERE on its latest committed version; a row the WHERE leaves
    alone stays locked too. SET expressions all read the row as it was.
    """
    v = unnest(STATE_COLUMNS, [
        (*pair, check.status, check.measured_at, check.measured_at, check.id, check.value, check.threshold)
        for pair, check in round_.items()
    ])
    stmt = insert(trigger_states).from_select(
        [*STATE_COLUMNS, "updated_at"],
        select(*v.c, func.clock_timestamp()).order_by(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id),
    )
    s, new = trigger_states.c, stmt.excluded
    same_status = s.status == new.status
    stmt = stmt.on_conflict_do_update(
        index_elements=list(PAIR_COLUMNS),
        set_={
            "status": new.status,
            "since": case((same_status, s.since), else_=new.since),
            "previous_status": case((same_status, s.previous_status), else_=s.status),
            "measured_at": new.measured_at, "check_id": new.check_id, "value": new.value,
            "threshold": new.threshold, "updated_at": new.updated_at,
        },
        # Only a newer check: an older one (out of order) or the same again changes nothing.
        where=new.measured_at > s.measured_at,
    ).returning(s.trigger_id, s.offer_id, s.affiliate_id, s.status, s.check_id,
                # A boolean, not the two timestamps: parsing them cost more than the rest.
                (s.since == s.measured_at).label("status_set"), s.previous_status)
    return [((t, o, a), status, check_id, status_set, previous)
            for t, o, a, status, check_id, status_set, previous in conn.execute(stmt)]


def _record_events(conn: Connection, changes: list[tuple[Pair, Change]]) -> int:
    if not changes:
        return 0
    rows = sorted(
        (change.check.id, *pair, change.previous_status, change.status, change.check.value,
         change.check.threshold, change.check.measured_at)
        for pair, change in changes
    )
    v = unnest({
        "check_id": BigInteger(), **PAIR_COLUMNS, "previous_status": Text(), "status": Text(), "value": Double(),
        "threshold": Double(), "measured_at": TZ,
    }, rows)
    stmt = (
        insert(trigger_events)
        .from_select(list(v.c.keys()), select(*v.c).order_by(v.c.check_id))
        .on_conflict_do_nothing(index_elements=["check_id"])
    )
    return conn.execute(stmt).rowcount


def _load_events(conn: Connection, check_ids: list[int]) -> list:
    """The recorded changes of the batch's checks, whoever recorded them and when."""
    e = trigger_events.c
    return list(conn.execute(
        select(e.id, e.trigger_id, triggers.c.name, e.offer_id, e.affiliate_id, e.previous_status, e.status,
               e.value, e.threshold, e.measured_at, e.check_id)
        .join(triggers, triggers.c.id == e.trigger_id)
        .where(e.check_id == any_(array(check_ids, BigInteger())))
        .order_by(e.id)
    ))


def _event_message(envelope: Envelope, row) -> Envelope:
    data = TriggerEventMessage(
        trigger_event_id=row.id, trigger_id=row.trigger_id, trigger_name=row.name, offer_id=row.offer_id,
        affiliate_id=row.affiliate_id, previous_status=row.previous_status, status=row.status, value=row.value,
        threshold=row.threshold, measured_at=row.measured_at, check_id=row.check_id,
    )
    return new_event(
        TRIGGER_EVENT_TYPES[row.status], data, correlation_id=envelope.correlation_id,
        causation_id=str(envelope.event_id), event_id=stable_event_id("trigger_event", row.id),
    )
