"""trigger_checker: metric.loaded -> metric_values, trigger_checks -> trigger.checked.

One transaction per message and a fixed number of statements whatever its size: the
batch travels as arrays (shared.sql.unnest), thresholds are resolved in Python
(rules.py). Every write is idempotent on its natural key, and the published message
lists every check of the message's values, whether recorded now or by an earlier
delivery that crashed before publishing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from datetime import datetime, timezone

from sqlalchemy import Double, Integer, Text, and_, any_, literal, or_, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection, Engine

from shared.batch import Batch, split_batch
from shared.bus import HandlerResult
from shared.db import TZ, Metric, MetricValue, OfferCategory, Trigger, TriggerCheck, TriggerThreshold
from shared.events import (
    MAX_BATCH, MAX_CHECKS, TRIGGER_CHECKED, CheckItem, Envelope, MetricItem, TriggerChecked, new_event,
    stable_event_id,
)
from shared.sql import array, transaction, unnest
from services.trigger_checker.rules import Check, TriggerRule, Value, check_values

logger = logging.getLogger(__name__)

# offer_id and affiliate_id are `integer` columns: a larger id is invalid, not retryable.
INT4_MAX = 2**31 - 1

VALUE_KEY_COLUMNS = {"metric_key": Text(), "offer_id": Integer(), "affiliate_id": Integer(), "measured_at": TZ}

metric_values = MetricValue.__table__
trigger_checks = TriggerCheck.__table__
triggers = Trigger.__table__
thresholds = TriggerThreshold.__table__
offer_categories = OfferCategory.__table__


def handle_metric_loaded(envelope: Envelope, engine: Engine) -> HandlerResult:
    batch = split_batch(envelope, "metrics", MetricItem, MAX_BATCH)
    _reject_out_of_range_ids(batch)
    with transaction(engine) as conn:
        _reject_unknown_metrics(conn, batch)
        if not batch.valid:
            raise batch.nothing_valid_error()
        wanted = _first_arrivals(batch.valid.values())
        new_values = _record_values(conn, wanted, str(envelope.event_id))
        values = _stored_values(conn, wanted)
        rules, categories = load_rules(conn, values)
        checks, skipped = check_values(rules, values, categories)
        new_checks = _record_checks(conn, checks)
        rows = _load_checks(conn, values)
    events = _checked_events(envelope, rows)
    logger.info(
        "checked event_id=%s items=%d invalid=%d values=%d new_values=%d triggers=%d checks=%d new_checks=%d "
        "skipped_no_threshold=%d",
        envelope.event_id, len(batch.raw), len(batch.reasons), len(values), new_values, len(rules), len(rows),
        new_checks, skipped,
    )
    dead = batch.dead_letter()
    return HandlerResult(events=events, dead_letters=[dead] if dead else [])


# -- validation beyond the item model ----------------------------------------------


def _reject_out_of_range_ids(batch: Batch[MetricItem]) -> None:
    for index, item in list(batch.valid.items()):
        for field_name in ("offer_id", "affiliate_id"):
            if getattr(item, field_name) > INT4_MAX:
                batch.reject(index, field_name, f"must be at most {INT4_MAX}")


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


def _record_values(conn: Connection, wanted: dict[tuple, float], event_id: str) -> int:
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
    return conn.execute(stmt).rowcount


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
        select(th.trigger_id, th.scope, th.offer_id, th.affiliate_id, th.category_id, th.value,
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
        select(t.id, t.name, t.metric_key, t.operator, t.threshold, relevant.c.scope, relevant.c.offer_id,
               relevant.c.affiliate_id, relevant.c.category_id, relevant.c.value, relevant.c.category_offer_id)
        .select_from(triggers.outerjoin(relevant, relevant.c.trigger_id == t.id))
        .where(t.active, t.metric_key == any_(keys))
        .order_by(t.id)
    )
    rules: dict[int, TriggerRule] = {}
    categories: dict[int, set[int]] = {}
    for r in rows:
        rule = rules.get(r.id)
        if rule is None:
            rule = rules[r.id] = TriggerRule(r.id, r.name, r.metric_key, r.operator, r.threshold)
        if r.scope == "offer_affiliate":
            rule.offer_affiliate[r.offer_id, r.affiliate_id] = r.value
        elif r.scope == "affiliate":
            rule.affiliate[r.affiliate_id] = r.value
        elif r.scope == "offer":
            rule.offer[r.offer_id] = r.value
        elif r.scope == "offer_category":
            rule.category[r.category_id] = r.value
            categories.setdefault(r.category_offer_id, set()).add(r.category_id)
    return list(rules.values()), categories


# -- checks -------------------------------------------------------------------------------


def _record_checks(conn: Connection, checks: list[Check]) -> int:
    if not checks:
        return 0
    rows = sorted(
        (c.trigger_id, c.value.offer_id, c.value.affiliate_id, c.value.measured_at, c.value.value, c.operator,
         c.threshold.value, c.threshold.scope, c.status)
        for c in checks
    )
    v = unnest({
        "trigger_id": Integer(), "offer_id": Integer(), "affiliate_id": Integer(), "measured_at": TZ,
        "value": Double(), "operator": Text(), "threshold": Double(), "threshold_scope": Text(), "status": Text(),
    }, rows)
    columns = list(v.c.keys())
    stmt = (
        insert(trigger_checks)
        .from_select(columns, select(*v.c).order_by(v.c.trigger_id, v.c.offer_id, v.c.affiliate_id, v.c.measured_at))
        .on_conflict_do_nothing(index_elements=["trigger_id", "offer_id", "affiliate_id", "measured_at"])
    )
    return conn.execute(stmt).rowcount


def _load_checks(conn: Connection, values: Collection[Value]) -> list:
    """Every check of the batch's values by an active trigger, new or recorded earlier."""
    v = unnest(VALUE_KEY_COLUMNS, [(x.metric_key, x.offer_id, x.affiliate_id, x.measured_at) for x in values])
    c, t = trigger_checks.c, triggers.c
    return list(conn.execute(
        select(c.id, c.trigger_id, t.name, t.metric_key, c.offer_id, c.affiliate_id, c.value, c.operator,
               c.threshold, c.status, c.measured_at)
        .select_from(
            v.join(triggers, and_(t.metric_key == v.c.metric_key, t.active))
            .join(trigger_checks, and_(
                c.trigger_id == t.id, c.offer_id == v.c.offer_id, c.affiliate_id == v.c.affiliate_id,
                c.measured_at == v.c.measured_at,
            ))
        )
        .order_by(c.id)
    ))


def _checked_events(envelope: Envelope, rows: list) -> list[Envelope]:
    """One trigger.checked per MAX_CHECKS checks; the same ids on every delivery."""
    items = [
        CheckItem(check_id=r.id, trigger_id=r.trigger_id, trigger_name=r.name, metric_key=r.metric_key,
                  offer_id=r.offer_id, affiliate_id=r.affiliate_id, value=r.value, operator=r.operator,
                  threshold=r.threshold, status=r.status, measured_at=r.measured_at)
        for r in rows
    ]
    events = []
    for part, start in enumerate(range(0, len(items), MAX_CHECKS)):
        events.append(new_event(
            TRIGGER_CHECKED,
            TriggerChecked(checks=items[start:start + MAX_CHECKS]),
            correlation_id=envelope.correlation_id,
            causation_id=str(envelope.event_id),
            event_id=stable_event_id(TRIGGER_CHECKED, envelope.event_id, part),
        ))
    return events
