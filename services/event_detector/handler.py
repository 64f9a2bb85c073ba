"""event_detector: trigger.checked -> trigger_states, trigger_events -> trigger.event.*.

Correct with any number of replicas and any delivery order because the database
serialises the work per pair: one statement creates the missing state rows and locks
every state row of the batch, in primary-key order (so two batches never wait on each
other in a cycle), and the transitions are computed under that lock (state.py).
trigger_events is unique on check_id, so a redelivery cannot record a change twice; it
publishes the recorded events of its checks again (same event ids), which covers a crash
between commit and publish. The checks themselves are read from trigger_checks, the
record the trigger_checker committed before it published the message.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy import BigInteger, Double, Integer, Text, any_, false, func, select, true, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine

from shared.batch import split_batch
from shared.bus import HandlerResult
from shared.db import TZ, Trigger, TriggerCheck, TriggerState
from shared.db import TriggerEvent as TriggerEventRow
from shared.events import (
    MAX_CHECKS, TRIGGER_EVENT_OK, TRIGGER_EVENT_PROBLEM, CheckItem, Envelope, TriggerEvent, new_event,
    stable_event_id,
)
from shared.sql import array, transaction, unnest
from services.event_detector.state import Change, Check, PairState, apply_checks, start

logger = logging.getLogger(__name__)

Pair = tuple[int, int, int]  # trigger_id, offer_id, affiliate_id

EVENT_TYPES = {"PROBLEM": TRIGGER_EVENT_PROBLEM, "OK": TRIGGER_EVENT_OK}
PAIR_COLUMNS = {"trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer()}
STATE_COLUMNS = {
    **PAIR_COLUMNS, "status": Text(), "since": TZ, "measured_at": TZ, "check_id": BigInteger(), "value": Double(),
    "threshold": Double(),
}

trigger_checks = TriggerCheck.__table__
trigger_states = TriggerState.__table__
trigger_events = TriggerEventRow.__table__
triggers = Trigger.__table__


def handle_trigger_checked(envelope: Envelope, engine: Engine) -> HandlerResult:
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
        created = _create_and_lock_states(conn, by_pair)
        stored = _read_states(conn, sorted(by_pair))
        updates: list[tuple[Pair, PairState]] = []
        changes: list[tuple[Pair, Change]] = []
        for pair in sorted(by_pair):
            before = None if pair in created else stored[pair]
            after, pair_changes = apply_checks(before, by_pair[pair])
            assert after is not None  # at least one check per pair
            if after != stored[pair]:
                updates.append((pair, after))
            changes.extend((pair, change) for change in pair_changes)
        _write_states(conn, updates)
        new_events = _record_events(conn, changes)
        rows = _load_events(conn, sorted(checks))
    events = [_event_message(envelope, row) for row in rows]
    logger.info(
        "detected event_id=%s checks=%d invalid=%d pairs=%d new_states=%d updated_states=%d changes=%d "
        "new_events=%d published=%d",
        envelope.event_id, len(batch.raw), len(batch.reasons), len(by_pair), len(created), len(updates),
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


def _state_row(pair: Pair, state: PairState) -> tuple:
    return (*pair, state.status, state.since, state.measured_at, state.check_id, state.value, state.threshold)


def _create_and_lock_states(conn: Connection, by_pair: dict[Pair, list[Check]]) -> set[Pair]:
    """Insert the state of every pair seen for the first time (from its earliest check)
    and lock every state row of the batch, in one statement and primary-key order.

    ON CONFLICT DO UPDATE ... WHERE false updates nothing but locks each existing row
    (waiting for a concurrent writer to commit first); RETURNING yields only the rows
    this statement inserted, i.e. the pairs that had no state before this batch.
    """
    rows = [_state_row(pair, start(min(checks, key=lambda c: (c.measured_at, c.id))))
            for pair, checks in sorted(by_pair.items())]
    v = unnest(STATE_COLUMNS, rows)
    s = trigger_states.c
    stmt = (
        insert(trigger_states)
        .from_select([*STATE_COLUMNS, "updated_at"],
                     select(*v.c, func.clock_timestamp()).order_by(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id))
        .on_conflict_do_update(index_elements=list(PAIR_COLUMNS), set_={"status": s.status}, where=false())
        .returning(s.trigger_id, s.offer_id, s.affiliate_id)
    )
    return {tuple(r) for r in conn.execute(stmt)}  # type: ignore[misc]


def _read_states(conn: Connection, pairs: list[Pair]) -> dict[Pair, PairState]:
    v = unnest(PAIR_COLUMNS, pairs)
    s = trigger_states.c
    # One primary-key probe per pair whatever the table's size: LIMIT 1 keeps the planner
    # from turning the lateral subquery into a hash join over the whole table, which it
    # prefers for a few thousand pairs and which grows with every pair ever seen.
    state = (
        select(s.trigger_id, s.offer_id, s.affiliate_id, s.status, s.since, s.measured_at, s.check_id, s.value,
               s.threshold)
        .where(s.trigger_id == v.c.trigger_id, s.offer_id == v.c.offer_id, s.affiliate_id == v.c.affiliate_id)
        .limit(1)
        .lateral("s")
    )
    rows = conn.execute(select(state).select_from(v.join(state, true()))).all()
    return {(r[0], r[1], r[2]): PairState(*r[3:]) for r in rows}


def _write_states(conn: Connection, updates: list[tuple[Pair, PairState]]) -> None:
    if not updates:
        return
    v = unnest(STATE_COLUMNS, [_state_row(pair, state) for pair, state in updates])
    s = trigger_states.c
    conn.execute(
        update(trigger_states)
        .values(status=v.c.status, since=v.c.since, measured_at=v.c.measured_at, check_id=v.c.check_id,
                value=v.c.value, threshold=v.c.threshold, updated_at=func.clock_timestamp())
        .where(s.trigger_id == v.c.trigger_id, s.offer_id == v.c.offer_id, s.affiliate_id == v.c.affiliate_id)
    )


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
    data = TriggerEvent(
        trigger_event_id=row.id, trigger_id=row.trigger_id, trigger_name=row.name, offer_id=row.offer_id,
        affiliate_id=row.affiliate_id, previous_status=row.previous_status, status=row.status, value=row.value,
        threshold=row.threshold, measured_at=row.measured_at, check_id=row.check_id,
    )
    return new_event(
        EVENT_TYPES[row.status], data, correlation_id=envelope.correlation_id, causation_id=str(envelope.event_id),
        event_id=stable_event_id("trigger_event", row.id),
    )
