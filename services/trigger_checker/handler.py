"""trigger_checker: metric.loaded -> metric_values, trigger_checks -> trigger.checked.

One transaction per message and a fixed number of statements whatever its size: the
batch travels as arrays (shared.sql.unnest), thresholds are resolved in Python
(rules.py). New values and checks are not read back (RETURNING says what was new);
only what an earlier delivery recorded is. Every write is idempotent on its natural key, and the published message
lists every check of the message's values, whether recorded now or by an earlier
delivery that crashed before publishing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from pydantic import AwareDatetime, TypeAdapter

from sqlalchemy import Double, Integer, Text, and_, any_, literal, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine

from shared.batch import Batch, split_batch
from shared.handling import Delivery, HandlerResult
from shared.db import TZ, Metric, MetricValue, OfferCategory, Trigger, TriggerCheck, TriggerThreshold
from shared.events import (
    MAX_BATCH, MAX_CHECKS, TRIGGER_CHECKED, Envelope, MetricItem, new_event, stable_event_id,
)
from shared.sql import array, transaction, unnest
from shared.vocabulary import INT4_MAX
from services.trigger_checker.rules import Check, TriggerRule, Value, check_values

logger = logging.getLogger(__name__)

# measured_at before this is a mistake (HasOffers did not exist); after now + the allowed
# clock skew it would freeze the pair, every real check after it being older.
EARLIEST_MEASURED_AT = datetime(2000, 1, 1, tzinfo=timezone.utc)

VALUE_KEY_COLUMNS = {"metric_key": Text(), "offer_id": Integer(), "affiliate_id": Integer(), "measured_at": TZ}

metric_values = MetricValue.__table__
trigger_checks = TriggerCheck.__table__
triggers = Trigger.__table__
thresholds = TriggerThreshold.__table__
offer_categories = OfferCategory.__table__


def handle_metric_loaded(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine,
                         max_clock_skew_seconds: int = 3600) -> HandlerResult:
    batch = split_batch(envelope, "metrics", MetricItem, MAX_BATCH)
    _reject_out_of_range_ids(batch)
    _reject_out_of_range_times(batch, datetime.now(timezone.utc) + timedelta(seconds=max_clock_skew_seconds))
    with transaction(engine) as conn:
        _reject_unknown_metrics(conn, batch)
        if not batch.valid:
            raise batch.nothing_valid_error()
        wanted = _first_arrivals(batch.valid.values())
        values, new_values = _record_values(conn, wanted, str(envelope.event_id))
        rules, categories = load_rules(conn, values)
        checks, skipped = check_values(rules, values, categories)
        rows, new_checks = _record_checks(conn, checks, skipped, {rule.id: rule.name for rule in rules})
    events = _checked_events(envelope, rows)
    logger.info(
        "checked event_id=%s items=%d invalid=%d values=%d new_values=%d triggers=%d checks=%d new_checks=%d "
        "skipped_no_threshold=%d",
        envelope.event_id, len(batch.raw), len(batch.reasons), len(values), new_values, len(rules), len(rows),
        new_checks, len(skipped),
    )
    dead = batch.dead_letter()
    return HandlerResult(events=events, dead_letters=[dead] if dead else [])


# -- validation beyond the item model ----------------------------------------------


def _reject_out_of_range_ids(batch: Batch[MetricItem]) -> None:
    for index, item in list(batch.valid.items()):
        for field_name in ("offer_id", "affiliate_id"):
            if getattr(item, field_name) > INT4_MAX:
                batch.reject(index, field_name, f"must be at most {INT4_MAX}")


def _reject_out_of_range_times(batch: Batch[MetricItem], latest: datetime) -> None:
    for index, item in list(batch.valid.items()):
        when = item.measured_at
        # The year first: 0001-01-01T00:00+01:00 is a valid timestamp that cannot be
        # converted to UTC at all.
        if not EARLIEST_MEASURED_AT.year <= when.year < 9999 or not (
                EARLIEST_MEASURED_AT <= when.astimezone(timezone.utc) <= latest):
            batch.reject(index, "measured_at", f"must be between {EARLIEST_MEASURED_AT.isoformat()} and "
                                               f"now + the allowed clock skew ({latest.isoformat()})")


def _reject_unknown_metrics(conn: Connection, batch: Batch[MetricItem]) -> None:
    keys = sorted({item.metric_key for item in batch.valid.values()})
    if not keys:
        return
    known = set(conn.scalars(select(Metric.key).where(Metric.key == any_(array(keys, Text())))))
    for index, item in list(batch.valid.items()):
        if item.metric_key not in known:
            batch.reject(index, "metric_key", f"unknown metric key {item.metric_key!r}")


# -- metric values ---------------------------------------------------------------------


def _value_key(metric_key: str, offer_id: int, affiliate_id: int, measured_at: datetime) -> tuple:
    return metric_key, offer_id, affiliate_id, measured_at.astimezone(timezone.utc)


def _first_arrivals(items: Iterable[MetricItem]) -> dict[tuple, float]:
    """One value per key; within a batch, as across batches, the first one wins."""
    wanted: dict[tuple, float] = {}
    for item in items:
        wanted.setdefault(_value_key(item.metric_key, item.offer_id, item.affiliate_id, item.measured_at), item.value)
    return wanted


def _record_values(conn: Connection, wanted: dict[tuple, float], event_id: str) -> tuple[list[Value], int]:
    """Insert the values that are new; return every value of the batch as stored, and how
    many were new."""
    # Sorted so that concurrent batches lock overlapping keys in one order (no deadlock).
    rows = sorted((*key, value) for key, value in wanted.items())
    v = unnest({**VALUE_KEY_COLUMNS, "value": Double()}, rows)
    stmt = (
        insert(metric_values)
        .from_select(
            ["metric_key", "offer_id", "affiliate_id", "measured_at", "value", "event_id"],
            select(v.c.metric_key, v.c.offer_id, v.c.affiliate_id, v.c.measured_at, v.c.value, literal(event_id))
            .order_by(v.c.metric_key, v.c.offer_id, v.c.affiliate_id, v.c.measured_at),
        )
        .on_conflict_do_nothing(index_elements=["metric_key", "offer_id", "affiliate_id", "measured_at"])
    )
    inserted = conn.execute(stmt).rowcount
    if inserted == len(rows):
        # All new (the usual case), so stored exactly as they came: no need to read them back.
        return [Value(*row) for row in rows], inserted
    return _stored_values(conn, wanted), inserted


def _stored_values(conn: Connection, wanted: dict[tuple, float]) -> list[Value]:
    """The values as recorded: a key that arrived before keeps its first value."""
    v = unnest(VALUE_KEY_COLUMNS, list(wanted))
    mv = metric_values.c
    rows = conn.execute(
        select(mv.metric_key, mv.offer_id, mv.affiliate_id, mv.measured_at, mv.value).select_from(
            v.join(metric_values, and_(
                mv.metric_key == v.c.metric_key, mv.offer_id == v.c.offer_id,
                mv.affiliate_id == v.c.affiliate_id, mv.measured_at == v.c.measured_at,
            ))
        ).order_by(mv.metric_key, mv.offer_id, mv.affiliate_id, mv.measured_at)
    )
    return [Value(r.metric_key, r.offer_id, r.affiliate_id, r.measured_at, r.value) for r in rows]


# -- triggers and thresholds -------------------------------------------------------------


def load_rules(conn: Connection, values: Collection[Value]) -> tuple[list[TriggerRule], dict[int, set[int]]]:
    """The active triggers of the batch's metrics with every threshold that may apply to
    its pairs, in one query, and the categories (with a threshold) of its offers.

    Read per message, so a trigger edited in SQL takes effect at the next message.
    """
    keys = array(sorted({v.metric_key for v in values}), Text())
    offers = array(sorted({v.offer_id for v in values}), Integer())
    affiliates = array(sorted({v.affiliate_id for v in values}), Integer())
    th, oc = thresholds.c, offer_categories.c
    # A category threshold comes once per offer of the batch in that category.
    relevant = (
        select(th.trigger_id, th.scope, th.offer_id, th.affiliate_id, th.category_id, th.value, th.recovery_value,
               oc.offer_id.label("category_offer_id"))
        .select_from(thresholds.outerjoin(offer_categories, and_(
            th.scope == "offer_category", oc.category_id == th.category_id, oc.offer_id == any_(offers),
        )))
        .where(or_(
            and_(th.scope == "offer_affiliate", th.offer_id == any_(offers), th.affiliate_id == any_(affiliates)),
            and_(th.scope == "affiliate", th.affiliate_id == any_(affiliates)),
            and_(th.scope == "offer", th.offer_id == any_(offers)),
            and_(th.scope == "offer_category", oc.offer_id.is_not(None)),
        ))
        .subquery("th")
    )
    t = triggers.c
    rows = conn.execute(
        select(t.id, t.name, t.metric_key, t.operator, t.threshold, t.recovery_threshold, relevant.c.scope,
               relevant.c.offer_id, relevant.c.affiliate_id, relevant.c.category_id, relevant.c.value,
               relevant.c.recovery_value, relevant.c.category_offer_id)
        .select_from(triggers.outerjoin(relevant, relevant.c.trigger_id == t.id))
        .where(t.active, t.metric_key == any_(keys))
        .order_by(t.id)
    )
    rules: dict[int, TriggerRule] = {}
    categories: dict[int, set[int]] = {}
    for r in rows:
        rule = rules.get(r.id)
        if rule is None:
            rule = rules[r.id] = TriggerRule(r.id, r.name, r.metric_key, r.operator, r.threshold,
                                             general_recovery=r.recovery_threshold)
        if r.scope is None:
            continue
        key = {"offer_affiliate": (r.offer_id, r.affiliate_id), "affiliate": r.affiliate_id, "offer": r.offer_id,
               "offer_category": r.category_id}[r.scope]
        {"offer_affiliate": rule.offer_affiliate, "affiliate": rule.affiliate, "offer": rule.offer,
         "offer_category": rule.category}[r.scope][key] = r.value
        if r.recovery_value is not None:
            rule.recovery[r.scope, key] = r.recovery_value
        if r.scope == "offer_category":
            categories.setdefault(r.category_offer_id, set()).add(r.category_id)
    return list(rules.values()), categories


# -- checks -------------------------------------------------------------------------------


class CheckRow(NamedTuple):
    """A recorded check as trigger.checked lists it."""

    id: int
    trigger_id: int
    name: str
    metric_key: str
    offer_id: int
    affiliate_id: int
    value: float
    operator: str
    threshold: float
    status: str
    measured_at: datetime


def _record_checks(conn: Connection, checks: list[Check], skipped: list[tuple[TriggerRule, Value]],
                   names: dict[int, str]) -> tuple[list[CheckRow], int]:
    """Insert the new checks; return every check of the batch's values by its active
    triggers (new, or recorded by an earlier delivery), in id order, and how many were new.

    The new ones come back through RETURNING; only the others (already recorded, or
    skipped now for want of a threshold but recorded when there was one) are read.
    """
    inserted: dict[tuple, int] = {}
    if checks:
        rows = sorted(
            (c.trigger_id, c.value.offer_id, c.value.affiliate_id, c.value.measured_at, c.value.value, c.operator,
             c.threshold.value, c.threshold.scope, c.threshold.recovery, c.status)
            for c in checks
        )
        v = unnest({
            "trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer(), "measured_at": TZ,
            "value": Double(), "operator": Text(), "threshold": Double(), "threshold_scope": Text(),
            "recovery": Double(),
            "status": Text(),
        }, rows)
        c = trigger_checks.c
        stmt = (
            insert(trigger_checks)
            .from_select(list(v.c.keys()),
                         select(*v.c).order_by(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id, v.c.measured_at))
            .on_conflict_do_nothing(index_elements=["trigger_id", "offer_id", "affiliate_id", "measured_at"])
            .returning(c.id, c.trigger_id, c.offer_id, c.affiliate_id, c.measured_at)
        )
        # .all(): one fetchall (iterating the result itself fetches row by row)
        inserted = {(t, o, a, m): check_id for check_id, t, o, a, m in conn.execute(stmt).all()}
    found = []
    earlier = []
    for check in checks:
        key = (check.trigger_id, check.value.offer_id, check.value.affiliate_id, check.value.measured_at)
        check_id = inserted.get(key)
        if check_id is None:
            earlier.append(key)
            continue
        found.append(CheckRow(check_id, check.trigger_id, names[check.trigger_id], check.value.metric_key,
                              check.value.offer_id, check.value.affiliate_id, check.value.value, check.operator,
                              check.threshold.value, check.status, check.value.measured_at))
    earlier += [(rule.id, value.offer_id, value.affiliate_id, value.measured_at) for rule, value in skipped]
    if earlier:
        found += _recorded_checks(conn, earlier)
    found.sort(key=lambda row: row.id)
    return found, len(inserted)


def _recorded_checks(conn: Connection, keys: list[tuple]) -> list[CheckRow]:
    """The checks recorded under these (trigger_id, offer_id, affiliate_id, measured_at)
    keys, as recorded (whatever the trigger says now), if their trigger is still active."""
    v = unnest({"trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer(), "measured_at": TZ},
               keys)
    c, t = trigger_checks.c, triggers.c
    return [CheckRow(*r) for r in conn.execute(
        select(c.id, c.trigger_id, t.name, t.metric_key, c.offer_id, c.affiliate_id, c.value, c.operator,
               c.threshold, c.status, c.measured_at)
        .select_from(
            v.join(trigger_checks, and_(
                c.trigger_id == v.c.trigger_id, c.offer_id == v.c.offer_id, c.affiliate_id == v.c.affiliate_id,
                c.measured_at == v.c.measured_at,
            ))
            .join(triggers, and_(t.id == c.trigger_id, t.active))
        )
    )]


def _checked_events(envelope: Envelope, rows: list[CheckRow]) -> list[Envelope]:
    """One trigger.checked per MAX_CHECKS checks; the same ids on every delivery."""
    # Plain dicts in CheckItem's JSON form: building 2000 models per message only to dump
    # them again cost more than the rest of the Python work (the consumer validates).
    when: dict[datetime, str] = {}
    items = [
        {"check_id": r.id, "trigger_id": r.trigger_id, "trigger_name": r.name, "metric_key": r.metric_key,
         "offer_id": r.offer_id, "affiliate_id": r.affiliate_id, "value": r.value, "operator": r.operator,
         "threshold": r.threshold, "status": r.status,
         "measured_at": when.get(r.measured_at) or when.setdefault(r.measured_at, _json_datetime(r.measured_at))}
        for r in rows
    ]
    events = []
    for part, start in enumerate(range(0, len(items), MAX_CHECKS)):
        events.append(new_event(
            TRIGGER_CHECKED,
            {"checks": items[start:start + MAX_CHECKS]},
            correlation_id=envelope.correlation_id,
            causation_id=str(envelope.event_id),
            event_id=stable_event_id(TRIGGER_CHECKED, envelope.event_id, part),
        ))
    return events


def _json_datetime(value: datetime) -> str:
    """A timestamp exactly as pydantic writes an AwareDatetime field."""
    return _AWARE_DATETIME.dump_python(value, mode="json")


_AWARE_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)
