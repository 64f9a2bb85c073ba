"""event_detector: trigger.checked -> trigger_states, trigger_events -> trigger.event.*.

What a state change is lives in machine.py (pure, shared with `kpi backtest` and
`kpi explain`); this module reads and writes what the machine needs, in one transaction
per message:

1. the message's checks, read from trigger_checks by id (the record the trigger_checker
   committed before publishing; the message is trusted for nothing else);
2. a transaction-scoped advisory lock per pair, taken in key order (two batches never
   wait on each other in a cycle): every write to a pair's state happens under it, so
   any number of replicas decide each pair one at a time;
3. the pairs' states, and every recorded check newer than each state up to the newest
   delivered one (one statement for the whole batch);
4. the machine applies the delivery; a late check reads back the pair's history to the
   nearest anchor (rare, and only for that pair);
5. the new states (one upsert), the changes (one insert; trigger_events is unique on
   check_id, and the machine records each change under a check no event used before),
   and the events to publish: those recorded under the message's checks, or by an
   earlier handling of this very message (a crash between commit and publish).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection
from datetime import datetime, timezone

from pydantic import AwareDatetime, TypeAdapter
from sqlalchemy import BigInteger, Double, Integer, Text, and_, any_, func, literal, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine

from services.event_detector.machine import NO_STATE, Change, PairState, Reading, settle
from shared.batch import split_batch
from shared.db import TZ, Trigger, TriggerCheck, TriggerEvent, TriggerState
from shared.events import (
    MAX_CHECKS, SCHEMA_VERSION, TRIGGER_EVENT_TYPES, CheckItem, Envelope, stable_event_id,
)
from shared.handling import Delivery, HandlerResult
from shared.sql import array, transaction, unnest
from shared.vocabulary import COMPARISONS

logger = logging.getLogger(__name__)

Pair = tuple[int, int, int]  # trigger_id, offer_id, affiliate_id

PAIR_COLUMNS = {"trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer()}
# Before any check: a bound for "newer than the state" when there is no state yet.
BEGINNING = datetime(1970, 1, 1, tzinfo=timezone.utc)

trigger_checks = TriggerCheck.__table__
trigger_states = TriggerState.__table__
trigger_events = TriggerEvent.__table__
triggers = Trigger.__table__


def handle_trigger_checked(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine) -> HandlerResult:
    batch = split_batch(envelope, "checks", CheckItem, MAX_CHECKS)
    with transaction(engine) as conn:
        times = [item.measured_at for item in batch.valid.values()]
        delivered, for_checks = load_delivered(conn, sorted({item.check_id for item in batch.valid.values()}),
                                               (min(times), max(times)) if times else None)
        known = {r.check_id for readings in delivered.values() for r in readings}
        for index, item in list(batch.valid.items()):
            if item.check_id not in known:
                batch.reject(index, "check_id",
                             f"no trigger check {item.check_id} (unknown, or its trigger was deleted)")
        if not batch.valid:
            raise batch.nothing_valid_error()

        pairs = sorted(delivered)
        lock_pairs(conn, pairs)
        stored, previous_statuses, newer = load_states(conn, {p: max(r.measured_at for r in delivered[p])
                                                              for p in pairs})
        states: dict[Pair, PairState] = {}
        changes: list[tuple[Pair, Change]] = []
        for pair in pairs:
            state, pair_changes = settle(stored[pair], delivered[pair], newer.get(pair, []), for_checks[pair[0]],
                                         PairHistory(conn, pair))
            if state != stored[pair]:
                states[pair] = state
            changes += [(pair, change) for change in pair_changes]
        write_states(conn, states, stored, previous_statuses, changes)
        new_events = record_changes(conn, changes, str(envelope.event_id))
        rows = load_events(conn, sorted(known), str(envelope.event_id))
    now = datetime.now(timezone.utc)
    events = [_event_message(envelope, row, now) for row in rows]
    logger.info(
        "detected event_id=%s checks=%d invalid=%d pairs=%d states_written=%d changes=%d new_events=%d "
        "published=%d",
        envelope.event_id, len(batch.raw), len(batch.reasons), len(pairs), len(states), len(changes), new_events,
        len(events),
    )
    dead = batch.dead_letter()
    return HandlerResult(events=events, dead_letters=[dead] if dead else [])


# -- reading ----------------------------------------------------------------------------------


def array_of_ids(ids: list[int]):  # noqa: ANN201 (a SQLAlchemy element)
    return array(ids, BigInteger())


def as_reading(check_id: int, measured_at: datetime, value: float, threshold: float, recovery: float | None,
               operator: str, status: str) -> Reading:
    """A recorded check as the machine sees it: does it clear the recovery value too?"""
    clears = status == "OK" and not COMPARISONS[operator](value, threshold if recovery is None else recovery)
    return Reading(check_id, measured_at, value, threshold, status, clears)  # type: ignore[arg-type]


READING_COLUMNS = (trigger_checks.c.id, trigger_checks.c.measured_at, trigger_checks.c.value,
                   trigger_checks.c.threshold, trigger_checks.c.recovery, trigger_checks.c.operator,
                   trigger_checks.c.status)


def load_delivered(conn: Connection, check_ids: list[int], within: tuple[datetime, datetime] | None = None
                   ) -> tuple[dict[Pair, list[Reading]], dict[int, int]]:
    """The delivered checks by pair (unknown ids, or checks of deleted triggers, left
    out), and for_checks of their triggers. Only their ids and times: what they say is
    read with the pair's window (load_states), or its history when one is late.

    `within`: the first and last measured_at the message gives its checks, so that only
    those days' partitions are searched for the ids (not every day kept)."""
    if not check_ids:
        return {}, {}
    c = trigger_checks.c
    query = (
        select(c.trigger_id, c.offer_id, c.affiliate_id, c.id, c.measured_at, triggers.c.for_checks)
        .join(triggers, triggers.c.id == c.trigger_id)
        .where(c.id == any_(array_of_ids(check_ids)))
    )
    if within is not None:
        query = query.where(c.measured_at.between(*within))
    rows = conn.execute(query).all()
    by_pair: dict[Pair, list[Reading]] = defaultdict(list)
    for_checks: dict[int, int] = {}
    for t, o, a, check_id, measured_at, for_checks_of_trigger in rows:
        by_pair[t, o, a].append(Reading(check_id, measured_at, 0.0, 0.0, "OK", False))
        for_checks[t] = for_checks_of_trigger
    return by_pair, for_checks


def lock_pairs(conn: Connection, pairs: list[Pair]) -> None:
    """Transaction-scoped advisory locks on the pairs, in key order (pairs is sorted)."""
    v = unnest(PAIR_COLUMNS, pairs)
    ordered = select(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id).order_by(
        v.c.trigger_id, v.c.offer_id, v.c.affiliate_id).subquery()
    key = func.hashtextextended(
        func.concat("trigger_state:", ordered.c.trigger_id, ":", ordered.c.offer_id, ":", ordered.c.affiliate_id), 0)
    conn.execute(select(func.count(func.pg_advisory_xact_lock(key))).select_from(ordered))


def load_states(conn: Connection, until: dict[Pair, datetime]
                ) -> tuple[dict[Pair, PairState], dict[Pair, str | None], dict[Pair, list[Reading]]]:
    """In one statement: each pair's state, and every recorded check newer than it up to
    the newest delivered one (`until`), oldest first: the delivered ones and any recorded
    but still on its way."""
    s, c = trigger_states.c, trigger_checks.c
    v = unnest({**PAIR_COLUMNS, "until": TZ}, [(*pair, last) for pair, last in until.items()])
    state = trigger_states.alias("s")
    s = state.c
    rows = conn.execute(
        select(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id, s.status, s.streak, s.since, s.check_id,
               s.measured_at, s.value, s.threshold, s.previous_status, *READING_COLUMNS)
        .select_from(
            v.outerjoin(state, and_(s.trigger_id == v.c.trigger_id, s.offer_id == v.c.offer_id,
                                    s.affiliate_id == v.c.affiliate_id))
            .outerjoin(trigger_checks, and_(
                c.trigger_id == v.c.trigger_id, c.offer_id == v.c.offer_id, c.affiliate_id == v.c.affiliate_id,
                c.measured_at > func.coalesce(s.measured_at, BEGINNING), c.measured_at <= v.c.until)))
        .order_by(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id, c.measured_at)
    ).all()
    states = dict.fromkeys(until, NO_STATE)
    previous: dict[Pair, str | None] = {}
    newer: dict[Pair, list[Reading]] = defaultdict(list)
    for t, o, a, status, streak, since, check_id, measured_at, value, threshold, previous_status, *check in rows:
        pair = (t, o, a)
        if check_id is not None and pair not in previous:
            # The machine needs only the id and time of the newest check folded in.
            states[pair] = PairState(status, streak, since, Reading(check_id, measured_at, value, threshold,
                                                                    status or "OK", False))
            previous[pair] = previous_status
        if check[0] is not None:
            newer[pair].append(as_reading(*check))
    return states, previous, newer


class PairHistory:
    """One pair's recorded checks, read on demand when a late check needs a refold."""

    def __init__(self, conn: Connection, pair: Pair):
        self.conn = conn
        self.pair = pair

    @property
    def where(self):  # noqa: ANN201 (built only when a refold needs it: most pairs never do)
        c = trigger_checks.c
        return and_(c.trigger_id == self.pair[0], c.offer_id == self.pair[1], c.affiliate_id == self.pair[2])

    def before(self, measured_at: datetime, limit: int) -> list[Reading]:
        c = trigger_checks.c
        rows = self.conn.execute(select(*READING_COLUMNS).where(self.where, c.measured_at < measured_at)
                                 .order_by(c.measured_at.desc()).limit(limit)).all()
        return [as_reading(*r) for r in rows]

    def between(self, first: datetime, last: datetime) -> list[Reading]:
        c = trigger_checks.c
        rows = self.conn.execute(select(*READING_COLUMNS).where(self.where, c.measured_at >= first,
                                                                c.measured_at <= last)
                                 .order_by(c.measured_at)).all()
        return [as_reading(*r) for r in rows]

    def tagged(self, check_ids: Collection[int]) -> set[int]:
        if not check_ids:
            return set()
        e = trigger_events.c
        return set(self.conn.scalars(select(e.check_id).where(e.check_id == any_(array_of_ids(list(check_ids))))))


# -- writing ----------------------------------------------------------------------------------

STATE_COLUMNS = {
    **PAIR_COLUMNS, "status": Text(), "previous_status": Text(), "since": TZ, "streak": Integer(),
    "measured_at": TZ, "check_id": BigInteger(), "value": Double(), "threshold": Double(),
}


def write_states(conn: Connection, states: dict[Pair, PairState], stored: dict[Pair, PairState],
                 previous_statuses: dict[Pair, str | None], changes: list[tuple[Pair, Change]]) -> None:
    if not states:
        return
    last_change = {pair: change for pair, change in changes}
    rows = []
    for pair, state in sorted(states.items()):
        assert state.last is not None
        if pair in last_change:
            previous = last_change[pair].previous
        elif state.status != stored[pair].status:
            previous = stored[pair].status  # a first OK: stored without a word
        else:
            previous = previous_statuses.get(pair)
        rows.append((*pair, state.status, previous, state.since, state.streak, state.last.measured_at,
                     state.last.check_id, state.last.value, state.last.threshold))
    v = unnest(STATE_COLUMNS, rows)
    stmt = insert(trigger_states).from_select([*STATE_COLUMNS, "updated_at"],
                                              select(*v.c, func.clock_timestamp()))
    conn.execute(stmt.on_conflict_do_update(
        index_elements=list(PAIR_COLUMNS),
        set_={name: stmt.excluded[name] for name in [*STATE_COLUMNS, "updated_at"] if name not in PAIR_COLUMNS},
    ))


def record_changes(conn: Connection, changes: list[tuple[Pair, Change]], source_event_id: str) -> int:
    if not changes:
        return 0
    rows = sorted(
        (change.tag.check_id, *pair, change.previous, change.status, change.entered.value,
         change.entered.threshold, change.entered.measured_at)
        for pair, change in changes
    )
    v = unnest({
        "check_id": BigInteger(), **PAIR_COLUMNS, "previous_status": Text(), "status": Text(), "value": Double(),
        "threshold": Double(), "measured_at": TZ,
    }, rows)
    recorded = conn.execute(
        insert(trigger_events)
        .from_select([*v.c.keys(), "source_event_id"], select(*v.c, literal(source_event_id)).order_by(v.c.check_id))
        .on_conflict_do_nothing(index_elements=["check_id"])
    ).rowcount
    if recorded != len(rows):  # the machine chose checks no event used: this would be a bug
        logger.error("event_id=%s recorded %d of %d changes: a check already had an event", source_event_id,
                     recorded, len(rows))
    return recorded


def load_events(conn: Connection, check_ids: list[int], source_event_id: str) -> list:
    """The recorded changes of the batch's checks, whoever recorded them and when, and
    those an earlier handling of this message recorded under other checks."""
    e = trigger_events.c
    return list(conn.execute(
        select(e.id, e.trigger_id, triggers.c.name, e.offer_id, e.affiliate_id, e.previous_status, e.status,
               e.value, e.threshold, e.measured_at, e.check_id)
        .join(triggers, triggers.c.id == e.trigger_id)
        .where(or_(e.check_id == any_(array_of_ids(check_ids)), e.source_event_id == source_event_id))
        .order_by(e.id)
    ))


def _event_message(envelope: Envelope, row, now: datetime) -> Envelope:  # noqa: ANN001 (a result row)
    """trigger.event.<status> of a recorded change, the same id on every delivery.

    Built as a plain dict in TriggerEventMessage's JSON form, without validation: these are
    our own rows (the consumer validates). Two pydantic models per event cost more than
    the rest of a first load's handling, where every other check is a change."""
    data = {
        "trigger_event_id": row.id, "trigger_id": row.trigger_id, "trigger_name": row.name,
        "offer_id": row.offer_id, "affiliate_id": row.affiliate_id, "previous_status": row.previous_status,
        "status": row.status, "value": row.value, "threshold": row.threshold,
        "measured_at": _json_datetime(row.measured_at), "check_id": row.check_id,
    }
    return Envelope.model_construct(
        event_id=stable_event_id("trigger_event", row.id), type=TRIGGER_EVENT_TYPES[row.status],
        schema_version=SCHEMA_VERSION, occurred_at=now, correlation_id=envelope.correlation_id,
        causation_id=str(envelope.event_id), data=data,
    )


def _json_datetime(value: datetime) -> str:
    """A timestamp exactly as pydantic writes an AwareDatetime field."""
    return _AWARE_DATETIME.dump_python(value, mode="json")


_AWARE_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)
