"""The `reference` load: offers, categories, goals, caps, affiliates, users, employees.

Everything is read from the API first and written in one transaction, so a load that
fails half-way (API down, an answer that is not the API's envelope) leaves the tables as
they were. A single record that cannot be stored as it came is a data error of that
record, not of the load: NUL characters (which PostgreSQL text cannot hold) are removed,
a record without a readable id is skipped, and the run's notes say so. Rows are
upserted by id and never deleted (operators may have seeded or referenced them), except
that an offer's categories and the caps of an offer that was read are replaced by what
the API says now. Local settings (offers.monitoring, tracked_goal_id, min_clicks,
min_conversions; categories.min_clicks; employees.secondary_email, use_secondary) are
never overwritten.

Calls: one per page of 1,000 records of each model (Offer, Goal, Affiliate,
AffiliateUser, Employee). Conversion caps come with the offers (`contain[]=
OfferConversionCap` on Offer.findAll); only on a network that refuses or ignores that
contain are they read with a call per active monitored offer (Offer.getConversionCaps).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.dialects.postgresql import insert

from shared.db import Affiliate, AffiliateUser, Category, ConversionCap, Employee, Goal, Offer, OfferCategory
from shared.hasoffers import HasOffersApiError, HasOffersClient, HasOffersResponseError
from shared.sql import connection, transaction
from shared.vocabulary import INT4_MAX

logger = logging.getLogger(__name__)

CAP_MODEL = "OfferConversionCap"


@dataclass
class ReferenceData:
    """Rows keyed by id: a record that shows up on two pages (the API pages a live
    table) is kept once, and an upsert never meets the same id twice."""

    offers: dict[int, dict[str, Any]] = field(default_factory=dict)
    offer_categories: dict[int, set[int]] = field(default_factory=dict)
    categories: dict[int, str | None] = field(default_factory=dict)
    goals: dict[int, dict[str, Any]] = field(default_factory=dict)
    caps: dict[int, list[dict[str, int]]] = field(default_factory=dict)  # offer id -> its caps
    affiliates: dict[int, dict[str, Any]] = field(default_factory=dict)
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    employees: dict[int, dict[str, Any]] = field(default_factory=dict)
    cap_calls: int = 0  # offers whose caps took a call of their own (the contain did not work)
    cleaned: int = 0  # text fields that had NUL characters removed
    skipped: list[str] = field(default_factory=list)  # why each unreadable record was left out

    def text(self, value: Any) -> str | None:
        """A text field as PostgreSQL can store it."""
        if value is None:
            return None
        value = str(value)
        if "\x00" in value:
            self.cleaned += 1
            value = value.replace("\x00", "")
        return value

    def notes(self) -> str | None:
        parts = []
        if self.cleaned:
            parts.append(f"removed NUL characters from {self.cleaned} text field(s)")
        if self.skipped:
            shown = "; ".join(self.skipped[:10]) + (f"; and {len(self.skipped) - 10} more" if len(self.skipped) > 10
                                                     else "")
            parts.append(f"skipped {len(self.skipped)} unreadable record(s): {shown}")
        return ". ".join(parts) or None

    @property
    def records(self) -> int:
        return (len(self.offers) + len(self.goals) + sum(len(c) for c in self.caps.values())
                + len(self.affiliates) + len(self.users) + len(self.employees))


def _model(record: Mapping[str, Any], model: str) -> Mapping[str, Any]:
    body = record.get(model)
    if not isinstance(body, Mapping):
        raise HasOffersResponseError(f"{model}.findAll: a record has no {model} object")
    return body


def _id(body: Mapping[str, Any], name: str, model: str, lowest: int = 1) -> int:
    raw = str(body.get(name)).strip()
    if not (raw.isascii() and raw.isdigit() and 0 < len(raw) <= 10 and lowest <= int(raw) <= INT4_MAX):
        raise HasOffersResponseError(f"{model}: {name} is not {'an id' if lowest else 'a count'}: {raw[:40]!r}")
    return int(raw)


def _optional_id(body: Mapping[str, Any], name: str, model: str) -> int | None:
    value = body.get(name)
    if value in (None, "", "0", 0):
        return None
    return _id(body, name, model)


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _nested(value: Any) -> Iterable[Mapping[str, Any]]:
    """A contained model: id-keyed records, a list of them, or [] when empty."""
    if isinstance(value, Mapping):
        return [v for v in value.values() if isinstance(v, Mapping)]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def _offer_records(client: HasOffersClient, page_size: int) -> tuple[list[dict[str, Any]], bool]:
    """Every offer with its categories and, when the network lets Offer.findAll contain
    them, its conversion caps: one page of 1,000 offers instead of a call per offer.
    Whether the contain worked: a network that refuses it is read without it."""
    try:
        return list(client.find_all("Offer", {"contain": ["OfferCategory", CAP_MODEL]}, page_size=page_size)), True
    except HasOffersApiError as exc:
        logger.warning("reference: Offer.findAll would not contain %s (%s); caps are read offer by offer",
                       CAP_MODEL, exc)
        return list(client.find_all("Offer", {"contain": ["OfferCategory"]}, page_size=page_size)), False


def fetch(client: HasOffersClient, engine: Engine, page_size: int) -> ReferenceData:
    data = ReferenceData()
    contained_caps: dict[int, Any] = {}  # offer id -> its OfferConversionCap records, as contained
    records, _ = _offer_records(client, page_size)
    for record in records:
        with _record(data, "Offer"):
            body = _model(record, "Offer")
            offer_id = _id(body, "id", "Offer")
            if CAP_MODEL in record:  # absent: the network ignored the contain
                contained_caps[offer_id] = record[CAP_MODEL]
            categories = {}
            for category in _nested(record.get("OfferCategory")):
                categories[_id(category, "id", "OfferCategory")] = data.text(category.get("name"))
            data.offers[offer_id] = {"id": offer_id, "name": data.text(body.get("name")),
                                     "status": data.text(body.get("status")),
                                     "require_approval": _flag(body.get("require_approval"))}
            data.categories.update(categories)
            data.offer_categories[offer_id] = set(categories)
    for record in client.find_all("Goal", page_size=page_size):
        with _record(data, "Goal"):
            body = _model(record, "Goal")
            goal_id = _id(body, "id", "Goal")
            data.goals[goal_id] = {"id": goal_id, "offer_id": _id(body, "offer_id", "Goal"),
                                   "name": data.text(body.get("name")), "status": data.text(body.get("status"))}
    for record in client.find_all("Affiliate", page_size=page_size):
        with _record(data, "Affiliate"):
            body = _model(record, "Affiliate")
            affiliate_id = _id(body, "id", "Affiliate")
            data.affiliates[affiliate_id] = {
                "id": affiliate_id, "company": data.text(body.get("company")), "status": data.text(body.get("status")),
                "account_manager_id": _optional_id(body, "account_manager_id", "Affiliate")}
    for record in client.find_all("AffiliateUser", page_size=page_size):
        with _record(data, "AffiliateUser"):
            body = _model(record, "AffiliateUser")
            user_id = _id(body, "id", "AffiliateUser")
            data.users[user_id] = {"id": user_id, "affiliate_id": _id(body, "affiliate_id", "AffiliateUser"),
                                   "email": data.text(body.get("email")), "status": data.text(body.get("status"))}
    for record in client.find_all("Employee", page_size=page_size):
        with _record(data, "Employee"):
            body = _model(record, "Employee")
            employee_id = _id(body, "id", "Employee")
            data.employees[employee_id] = {"id": employee_id, "email": data.text(body.get("email")),
                                           "status": data.text(body.get("status"))}
    for offer_id in _cap_offers(engine, data.offers.values()):
        if offer_id in contained_caps:
            data.caps[offer_id] = _cap_rows(offer_id, contained_caps[offer_id], data, f"Offer.findAll {CAP_MODEL}")
        else:
            data.caps[offer_id] = _cap_rows(offer_id, client.call("Offer", "getConversionCaps", {"id": offer_id}),
                                            data, "Offer.getConversionCaps")
            data.cap_calls += 1
    return data


@contextmanager
def _record(data: ReferenceData, model: str) -> Iterator[None]:
    """One record: if it cannot be read, it is left out and the run says why."""
    try:
        yield
    except HasOffersResponseError as exc:
        data.skipped.append(str(exc)[:200])
        logger.warning("reference: %s record skipped: %s", model, str(exc)[:200])


def _cap_offers(engine: Engine, offers: Iterable[dict[str, Any]]) -> list[int]:
    """Active offers with monitoring on (new offers get monitoring on by default)."""
    with connection(engine) as conn:
        off = set(conn.scalars(select(Offer.id).where(Offer.monitoring.is_(False))))
    return [o["id"] for o in offers if o["status"] == "active" and o["id"] not in off]


def _cap_rows(offer_id: int, answer: Any, data: ReferenceData, source: str) -> list[dict[str, int]]:
    """An offer's caps from getConversionCaps (records wrapped in OfferConversionCap) or
    from a contain (the fields themselves)."""
    caps: dict[int, int] = {}
    for record in _nested(answer):
        with _record(data, CAP_MODEL):
            body = record.get(CAP_MODEL, record)
            if not isinstance(body, Mapping):
                raise HasOffersResponseError(f"{source}: a record has no {CAP_MODEL} object")
            affiliate_id = _optional_id(body, "affiliate_id", "OfferConversionCap")
            if affiliate_id is None:  # a cap for the whole offer, not a pair
                continue
            caps[affiliate_id] = _id(body, "conversion_cap", "OfferConversionCap", lowest=0)
    return [{"offer_id": offer_id, "affiliate_id": a, "conversion_cap": c} for a, c in sorted(caps.items())]


def store(engine: Engine, data: ReferenceData) -> None:
    with transaction(engine) as conn:
        # Offers first: offer_categories refers to them.
        _upsert(conn, Offer, list(data.offers.values()), ["name", "status", "require_approval"],
                updated_at=func.now())
        _upsert(conn, Category, [{"id": i, "name": n} for i, n in data.categories.items()], ["name"])
        if data.offer_categories:
            conn.execute(delete(OfferCategory).where(OfferCategory.offer_id.in_(list(data.offer_categories))))
            pairs = [{"offer_id": o, "category_id": c} for o, cs in data.offer_categories.items() for c in sorted(cs)]
            if pairs:
                conn.execute(insert(OfferCategory), pairs)
        _upsert(conn, Goal, list(data.goals.values()), ["offer_id", "name", "status"])
        if data.caps:
            conn.execute(delete(ConversionCap).where(ConversionCap.offer_id.in_(list(data.caps))))
            rows = [cap for caps in data.caps.values() for cap in caps]
            if rows:
                conn.execute(insert(ConversionCap), rows)
        _upsert(conn, Affiliate, list(data.affiliates.values()), ["company", "account_manager_id", "status"])
        _upsert(conn, AffiliateUser, list(data.users.values()), ["affiliate_id", "email", "status"])
        _upsert(conn, Employee, list(data.employees.values()), ["email", "status"])


def _upsert(conn: Connection, model: type, rows: list[dict[str, Any]], columns: list[str], **also: Any) -> None:
    """INSERT ... ON CONFLICT (id) DO UPDATE of `columns` only: other columns are local."""
    if not rows:
        return
    stmt = insert(model)
    stmt = stmt.on_conflict_do_update(index_elements=["id"],
                                      set_={**{c: getattr(stmt.excluded, c) for c in columns}, **also})
    conn.execute(stmt, rows)  # executemany: SQLAlchemy batches it into multi-row INSERTs


def load(client: HasOffersClient, engine: Engine, page_size: int) -> tuple[int, str | None]:
    """Refresh the reference tables; the number of records read, and what was cleaned or skipped."""
    data = fetch(client, engine, page_size)
    store(engine, data)
    logger.info("reference stored: %d offers, %d categories, %d goals, %d caps (%d offers' caps read one by one), "
                "%d affiliates, %d users, %d employees", len(data.offers), len(data.categories), len(data.goals),
                sum(len(c) for c in data.caps.values()), data.cap_calls, len(data.affiliates), len(data.users),
                len(data.employees))
    return data.records, data.notes()
