"""Silences (DESIGN.md section 6): add, list, end, and which one matches an event.

Shared by `kpi silence`, the console and the action_runner. A silence matches a trigger
event when each of its trigger, offer and affiliate is NULL or equal to the event's, and
starts_at <= the event's time < ends_at. Ending a silence sets ends_at to now: the row
stays, so what it silenced can still be explained.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, bindparam, func, or_, select, update

from shared.db import Silence, Trigger

MAX_REASON = 1000
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class SilenceError(Exception):
    """Bad input for a silence: the message is for a person (CLI, console)."""


@dataclass(frozen=True)
class SilenceRule:
    """A silence as the decision needs it (the backtest keeps them in memory)."""

    id: int
    trigger_id: int | None
    offer_id: int | None
    affiliate_id: int | None
    starts_at: datetime
    ends_at: datetime
    reason: str

    def matches(self, trigger_id: int, offer_id: int, affiliate_id: int, at: datetime) -> bool:
        return ((self.trigger_id is None or self.trigger_id == trigger_id)
                and (self.offer_id is None or self.offer_id == offer_id)
                and (self.affiliate_id is None or self.affiliate_id == affiliate_id)
                and self.starts_at <= at < self.ends_at)

    def describe(self) -> str:
        return f"silence #{self.id} until {self.ends_at.astimezone(timezone.utc):%Y-%m-%d %H:%M UTC}: {self.reason}"


def matching(silences: Iterable[SilenceRule], trigger_id: int, offer_id: int, affiliate_id: int,
             at: datetime) -> SilenceRule | None:
    """The silence that silences an event at `at`: of several, the lowest id (the oldest)."""
    found = [s for s in silences if s.matches(trigger_id, offer_id, affiliate_id, at)]
    return min(found, key=lambda s: s.id) if found else None


def active_for(conn: Connection, trigger_id: int, offer_id: int, affiliate_id: int, at: datetime
               ) -> SilenceRule | None:
    rows = conn.execute(_ACTIVE_FOR, {"trigger": trigger_id, "offer": offer_id, "affiliate": affiliate_id,
                                      "at": at}).all()
    return matching((SilenceRule(*row) for row in rows), trigger_id, offer_id, affiliate_id, at)


RULE_COLUMNS = (Silence.id, Silence.trigger_id, Silence.offer_id, Silence.affiliate_id, Silence.starts_at,
                Silence.ends_at, Silence.reason)
# Built once: the action_runner asks for every event it acts on.
_ACTIVE_FOR = select(*RULE_COLUMNS).where(
    or_(Silence.trigger_id.is_(None), Silence.trigger_id == bindparam("trigger")),
    or_(Silence.offer_id.is_(None), Silence.offer_id == bindparam("offer")),
    or_(Silence.affiliate_id.is_(None), Silence.affiliate_id == bindparam("affiliate")),
    Silence.starts_at <= bindparam("at"), Silence.ends_at > bindparam("at"),
)


def all_rules(conn: Connection) -> list[SilenceRule]:
    """Every silence, ended ones included (the backtest judges them at measured_at)."""
    return [SilenceRule(*row) for row in conn.execute(select(*RULE_COLUMNS).order_by(Silence.id))]


def parse_duration(text: str) -> timedelta:
    """`2h`, `30m`, `1d`, `90s`, `2w`."""
    match = _DURATION.match(text or "")
    if not match or int(match.group(1)) == 0:
        raise SilenceError(f"invalid duration {text!r}: use a positive number and a unit, e.g. 30m, 2h, 1d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def parse_time(text: str) -> datetime:
    """An ISO 8601 timestamp; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SilenceError(f"invalid time {text!r}: use ISO 8601, e.g. 2026-12-02T18:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def add(conn: Connection, *, trigger: str | None, offer_id: int | None, affiliate_id: int | None,
        ends_at: datetime, reason: str, created_by: str, starts_at: datetime | None = None) -> int:
    """Validate and insert a silence; its id."""
    reason = (reason or "").strip()
    if not reason:
        raise SilenceError("a silence needs a reason")
    if len(reason) > MAX_REASON:
        raise SilenceError(f"the reason is too long ({len(reason)} characters; at most {MAX_REASON})")
    for name, value in (("offer", offer_id), ("affiliate", affiliate_id)):
        if value is not None and not 0 < value <= 2**31 - 1:
            raise SilenceError(f"invalid {name} id {value}")
    now = conn.execute(select(func.now())).scalar_one()
    starts = starts_at or now
    if ends_at <= starts:
        raise SilenceError(f"the silence would end ({ends_at.isoformat()}) before it starts ({starts.isoformat()})")
    trigger_id = None
    if trigger is not None:
        trigger_id = conn.execute(select(Trigger.id).where(Trigger.name == trigger)).scalar()
        if trigger_id is None:
            raise SilenceError(f"no trigger named {trigger!r}")
    return conn.execute(
        Silence.__table__.insert().values(trigger_id=trigger_id, offer_id=offer_id, affiliate_id=affiliate_id,
                                          starts_at=starts, ends_at=ends_at, reason=reason,
                                          created_by=created_by[:200]).returning(Silence.id)
    ).scalar_one()


def end(conn: Connection, silence_ids: Sequence[int]) -> list[int]:
    """End silences now; the ids that were still running (ended ones are left alone)."""
    if not silence_ids:
        return []
    now = conn.execute(select(func.now())).scalar_one()
    known = set(conn.scalars(select(Silence.id).where(Silence.id.in_(silence_ids))))
    missing = sorted(set(silence_ids) - known)
    if missing:
        raise SilenceError(f"no silence with id {', '.join(map(str, missing))}")
    return sorted(conn.scalars(
        update(Silence).where(Silence.id.in_(silence_ids), Silence.ends_at > now)
        .values(ends_at=func.greatest(now, Silence.starts_at + timedelta(microseconds=1))).returning(Silence.id)))


def listing(conn: Connection, include_ended: bool = False, limit: int = 200) -> list[dict]:
    """Silences, those in force first, with their trigger's name."""
    now = conn.execute(select(func.now())).scalar_one()
    query = (select(Silence.id, Trigger.name.label("trigger"), Silence.offer_id, Silence.affiliate_id,
                    Silence.starts_at, Silence.ends_at, Silence.reason, Silence.created_by, Silence.created_at)
             .outerjoin(Trigger, Trigger.id == Silence.trigger_id)
             .order_by((Silence.ends_at > now).desc(), Silence.ends_at.desc(), Silence.id.desc()).limit(limit))
    if not include_ended:
        query = query.where(Silence.ends_at > now)
    return [{**row._asdict(), "in_force": row.starts_at <= now < row.ends_at} for row in conn.execute(query)]
