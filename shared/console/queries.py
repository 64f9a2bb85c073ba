"""Every read of the console, on the typed models. Each returns plain dicts (a table
row) or the chart's dataclasses, so a page and its JSON twin show the same data.

Indexes that serve them (a page must answer in under 200 ms with a million checks):
- problems: trigger_states by (status, since) for PROBLEM (migration 0006); the check
  that set a state by its primary key; offers and affiliates by theirs.
- a pair: per trigger, trigger_states by its primary key, trigger_checks by its unique
  key (trigger_id, offer_id, affiliate_id, measured_at), trigger_events by
  ix_trigger_events_pair, operation_runs by its unique key (trigger_event_id, ...).
  The pair's triggers are named explicitly (`trigger_id = ANY(...)`) so each lookup
  uses the leading column of those keys.
- loads: load_runs by primary key, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, and_, any_, case, exists, func, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from shared.db import (
    Action, Affiliate, LoadRun, Offer, Operation, OperationRun, Trigger, TriggerCheck, TriggerEvent, TriggerState,
)
from shared.sql import array

triggers = Trigger.__table__
states = TriggerState.__table__
checks = TriggerCheck.__table__
events = TriggerEvent.__table__
runs = OperationRun.__table__
offers = Offer.__table__
affiliates = Affiliate.__table__
actions = Action.__table__
operations = Operation.__table__
load_runs = LoadRun.__table__


@dataclass(frozen=True)
class Page:
    number: int
    size: int
    total: int

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    def as_json(self) -> dict[str, int]:
        return {"page": self.number, "per_page": self.size, "total": self.total, "pages": self.pages}


@dataclass(frozen=True)
class ProblemFilter:
    """Filters of the problems page. offer / affiliate: an id, or a part of a name."""

    trigger_id: int | None = None
    offer: str | None = None
    affiliate: str | None = None

    def conditions(self, with_trigger: bool = True) -> list[ColumnElement[bool]]:
        s = states.c
        found: list[ColumnElement[bool]] = []
        if with_trigger and self.trigger_id is not None:
            found.append(s.trigger_id == self.trigger_id)
        if self.offer:
            found.append(_id_or_name(s.offer_id, self.offer, offers.c.id, offers.c.name))
        if self.affiliate:
            found.append(_id_or_name(s.affiliate_id, self.affiliate, affiliates.c.id, affiliates.c.company))
        return found

    def as_json(self) -> dict[str, Any]:
        return {"trigger_id": self.trigger_id, "offer": self.offer, "affiliate": self.affiliate}


def _id_or_name(column: ColumnElement[int], wanted: str, id_column: ColumnElement[int],
                name_column: ColumnElement[str | None]) -> ColumnElement[bool]:
    wanted = wanted.strip()
    if wanted.isdigit() and len(wanted) <= 10:
        return column == int(wanted)
    pattern = "%" + wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return column.in_(select(id_column).where(name_column.ilike(pattern, escape="\\")))


# --- problems ---------------------------------------------------------------------------


def problems(conn: Connection, where: ProblemFilter, page: int, size: int) -> tuple[list[dict[str, Any]], Page]:
    """One page of the pairs in PROBLEM, newest first, with names and the threshold scope."""
    s, t, c = states.c, triggers.c, checks.c
    conditions = [s.status == "PROBLEM", *where.conditions()]
    total = conn.execute(select(func.count()).select_from(states).where(*conditions)).scalar_one()
    found = Page(page, size, total)
    # The page first (ix_trigger_states_problem_since walked in order), then the joins
    # for its rows only.
    shown = (
        select(s.trigger_id, s.offer_id, s.affiliate_id, s.value, s.threshold, s.since, s.measured_at, s.check_id)
        .where(*conditions)
        .order_by(s.since.desc(), s.trigger_id, s.offer_id, s.affiliate_id)
        .limit(size).offset(found.offset)
        .subquery("shown")
    )
    p = shown.c
    rows = conn.execute(
        select(
            p.trigger_id, t.name.label("trigger"), t.metric_key.label("metric"), c.operator,
            p.offer_id, offers.c.name.label("offer_name"),
            p.affiliate_id, affiliates.c.company.label("affiliate_company"),
            p.value, p.threshold, c.threshold_scope, p.since, p.measured_at,
        )
        .select_from(
            shown.join(triggers, t.id == p.trigger_id)
            .outerjoin(offers, offers.c.id == p.offer_id)
            .outerjoin(affiliates, affiliates.c.id == p.affiliate_id)
            # measured_at too: the check that set the state has the state's measured_at, and
            # a table partitioned by measured_at is searched in one partition only.
            .outerjoin(checks, and_(c.id == p.check_id, c.measured_at == p.measured_at))
        )
        .order_by(p.since.desc(), p.trigger_id, p.offer_id, p.affiliate_id)
    ).mappings().all()
    return [dict(row) for row in rows], found


def trigger_counts(conn: Connection, where: ProblemFilter) -> list[dict[str, Any]]:
    """Per trigger: pairs in PROBLEM and OK, within the offer and affiliate filters."""
    s, t = states.c, triggers.c
    per_trigger = (
        select(s.trigger_id,
               func.count().filter(s.status == "PROBLEM").label("problem"),
               func.count().filter(s.status == "OK").label("ok"))
        .where(*where.conditions(with_trigger=False))
        .group_by(s.trigger_id)
        .subquery()
    )
    rows = conn.execute(
        select(t.id.label("trigger_id"), t.name.label("trigger"), t.metric_key.label("metric"), t.operator,
               t.threshold, t.active, func.coalesce(per_trigger.c.problem, 0).label("problem"),
               func.coalesce(per_trigger.c.ok, 0).label("ok"))
        .select_from(triggers.outerjoin(per_trigger, per_trigger.c.trigger_id == t.id))
        .order_by(t.name)
    ).mappings().all()
    return [dict(row) for row in rows]


# --- a pair -----------------------------------------------------------------------------


def pair_names(conn: Connection, offer_id: int, affiliate_id: int) -> dict[str, Any]:
    offer_name = conn.execute(select(offers.c.name).where(offers.c.id == offer_id)).scalar_one_or_none()
    company = conn.execute(select(affiliates.c.company).where(affiliates.c.id == affiliate_id)).scalar_one_or_none()
    return {"offer_id": offer_id, "offer_name": offer_name, "affiliate_id": affiliate_id,
            "affiliate_company": company}


def pair_triggers(conn: Connection, offer_id: int, affiliate_id: int) -> list[dict[str, Any]]:
    """The triggers that have a state, a check or a state change for the pair, with the
    state and the threshold scope of the check that set it; those in PROBLEM first."""
    s, t, c = states.c, triggers.c, checks.c
    any_check, any_event = checks.alias("any_check").c, events.alias("any_event").c
    on_pair_state = and_(s.trigger_id == t.id, s.offer_id == offer_id, s.affiliate_id == affiliate_id)
    has_check = exists().where(any_check.trigger_id == t.id, any_check.offer_id == offer_id,
                               any_check.affiliate_id == affiliate_id)
    has_event = exists().where(any_event.trigger_id == t.id, any_event.offer_id == offer_id,
                               any_event.affiliate_id == affiliate_id)
    rows = conn.execute(
        select(
            t.id.label("trigger_id"), t.name.label("trigger"), t.metric_key.label("metric"), t.operator,
            t.active, t.for_checks, s.status, s.previous_status, s.since, s.streak, s.measured_at, s.value,
            s.threshold, c.threshold_scope, c.recovery,
        )
        .select_from(
            triggers.outerjoin(states, on_pair_state)
            .outerjoin(checks, and_(c.id == s.check_id, c.measured_at == s.measured_at))
        )
        .where(or_(s.trigger_id.is_not(None), has_check, has_event))
        .order_by(case((s.status == "PROBLEM", 0), else_=1), t.name)  # what is wrong first
    ).mappings().all()
    return [dict(row) for row in rows]


@dataclass(frozen=True)
class CheckPoint:
    id: int
    measured_at: datetime
    value: float
    threshold: float
    threshold_scope: str | None
    operator: str
    status: str
    checked_at: datetime
    # The value past which a PROBLEM goes back to OK, as the check recorded it (None: the
    # threshold itself).
    recovery: float | None = None


@dataclass(frozen=True)
class StateChange:
    id: int
    trigger_id: int
    previous_status: str | None
    status: str
    measured_at: datetime
    value: float | None
    threshold: float | None
    check_id: int
    created_at: datetime


def _pair_checks(trigger_id: int, offer_id: int, affiliate_id: int):
    c = checks.c
    return (
        select(c.id, c.measured_at, c.value, c.threshold, c.threshold_scope, c.operator, c.status, c.checked_at,
               c.recovery)
        .where(c.trigger_id == trigger_id, c.offer_id == offer_id, c.affiliate_id == affiliate_id)
    )


def latest_checks(conn: Connection, trigger_id: int, offer_id: int, affiliate_id: int,
                  limit: int) -> list[CheckPoint]:
    """The pair's latest `limit` checks of a trigger, oldest first (what the chart draws)."""
    c = checks.c
    rows = conn.execute(
        _pair_checks(trigger_id, offer_id, affiliate_id).order_by(c.measured_at.desc()).limit(limit)
    ).all()
    return [CheckPoint(*row) for row in reversed(rows)]


def checks_page(conn: Connection, trigger_id: int, offer_id: int, affiliate_id: int, page: int,
                size: int) -> tuple[list[CheckPoint], Page]:
    """One page of the pair's checks of a trigger, newest first."""
    c = checks.c
    total = conn.execute(
        select(func.count()).select_from(checks)
        .where(c.trigger_id == trigger_id, c.offer_id == offer_id, c.affiliate_id == affiliate_id)
    ).scalar_one()
    found = Page(page, size, total)
    rows = conn.execute(
        _pair_checks(trigger_id, offer_id, affiliate_id).order_by(c.measured_at.desc())
        .limit(size).offset(found.offset)
    ).all()
    return [CheckPoint(*row) for row in rows], found


def _event_columns():
    e = events.c
    return (e.id, e.trigger_id, e.previous_status, e.status, e.measured_at, e.value, e.threshold, e.check_id,
            e.created_at)


def changes_since(conn: Connection, trigger_id: int, offer_id: int, affiliate_id: int,
                  start: datetime | None) -> tuple[StateChange | None, list[StateChange]]:
    """The state changes of a trigger for the pair from `start` on (all of them when
    start is None), oldest first, and the last one before `start` (the status the chart
    starts in)."""
    e = events.c
    of_pair = (e.trigger_id == trigger_id, e.offer_id == offer_id, e.affiliate_id == affiliate_id)
    query = select(*_event_columns()).where(*of_pair)
    if start is not None:
        query = query.where(e.measured_at >= start)
    found = [StateChange(*row) for row in conn.execute(query.order_by(e.measured_at, e.id)).all()]
    before = None
    if start is not None:
        row = conn.execute(
            select(*_event_columns()).where(*of_pair, e.measured_at < start)
            .order_by(e.measured_at.desc(), e.id.desc()).limit(1)
        ).first()
        before = StateChange(*row) if row else None
    return before, found


def pair_changes(conn: Connection, trigger_ids: list[int], offer_id: int, affiliate_id: int,
                 limit: int) -> list[dict[str, Any]]:
    """The pair's latest state changes, all triggers, newest first."""
    if not trigger_ids:
        return []
    e, t = events.c, triggers.c
    rows = conn.execute(
        select(e.id.label("trigger_event_id"), e.trigger_id, t.name.label("trigger"), e.previous_status, e.status,
               e.measured_at, e.value, e.threshold, e.check_id, e.created_at)
        .select_from(events.join(triggers, t.id == e.trigger_id))
        .where(e.trigger_id == any_(array(trigger_ids, Integer())), e.offer_id == offer_id,
               e.affiliate_id == affiliate_id)
        .order_by(e.measured_at.desc(), e.id.desc())
        .limit(limit)
    ).mappings().all()
    return [dict(row) for row in rows]


def pair_runs(conn: Connection, trigger_ids: list[int], offer_id: int, affiliate_id: int,
              limit: int) -> list[dict[str, Any]]:
    """The operation runs of the pair's latest state changes, newest first."""
    if not trigger_ids:
        return []
    e, r, t = events.c, runs.c, triggers.c
    latest_events = (
        select(e.id, e.trigger_id, e.previous_status, e.status, e.measured_at)
        .where(e.trigger_id == any_(array(trigger_ids, Integer())), e.offer_id == offer_id,
               e.affiliate_id == affiliate_id)
        .order_by(e.measured_at.desc(), e.id.desc())
        .limit(limit)
        .subquery()
    )
    rows = conn.execute(
        select(
            r.id.label("operation_run_id"), r.trigger_event_id, latest_events.c.trigger_id, t.name.label("trigger"),
            latest_events.c.previous_status, latest_events.c.status.label("event_status"),
            latest_events.c.measured_at, actions.c.name.label("action"), operations.c.name.label("operation"),
            r.kind, r.status, r.attempts, r.detail, r.last_error, r.created_at, r.started_at, r.finished_at,
        )
        .select_from(
            latest_events.join(runs, r.trigger_event_id == latest_events.c.id)
            .join(triggers, t.id == latest_events.c.trigger_id)
            .outerjoin(actions, actions.c.id == r.action_id)
            .outerjoin(operations, operations.c.id == r.operation_id)
        )
        .order_by(latest_events.c.measured_at.desc(), r.trigger_event_id.desc(), r.id)
        .limit(limit)
    ).mappings().all()
    return [dict(row) for row in rows]


# --- loads ------------------------------------------------------------------------------


def loads(conn: Connection, page: int, size: int) -> tuple[list[dict[str, Any]], Page]:
    lr = load_runs.c
    total = conn.execute(select(func.count()).select_from(load_runs)).scalar_one()
    found = Page(page, size, total)
    rows = conn.execute(
        select(lr.id, lr.metric_key, lr.status, lr.attempts, lr.lookback_hours, lr.schedule_slot, lr.measured_at,
               lr.requested_at, lr.started_at, lr.finished_at, lr.rows_read, lr.values_published, lr.error,
               lr.notes, lr.request_event_id)
        .order_by(lr.id.desc())
        .limit(size).offset(found.offset)
    ).mappings().all()
    return [dict(row) for row in rows], found

