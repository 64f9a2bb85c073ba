"""The `reference` load: offers, categories, goals, caps, affiliates, users, employees.

Everything is read from the API first and written in one transaction, so a load that
fails half-way (API down, malformed answer) leaves the tables as they were. Rows are
upserted by id and never deleted (operators may have seeded or referenced them), except
that an offer's categories and the caps of an offer that was read are replaced by what
the API says now. Local settings (offers.monitoring, tracked_goal_id, min_clicks,
min_conversions; categories.min_clicks; employees.secondary_email, use_secondary) are
never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select
from sqlalchemy.dialects.postgresql import insert

from shared.db import Affiliate, AffiliateUser, Category, ConversionCap, Employee, Goal, Offer, OfferCategory
from shared.hasoffers import HasOffersClient, HasOffersResponseError

logger = logging.getLogger(__name__)


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

    @property
    def records(self) -> int:
        return (len(self.offers) + len(self.goals) + sum(len(c) for c in self.caps.values())
                + len(self.affiliates) + len(self.users) + len(self.employees))


def _model(record: Mapping[str, Any], model: str) -> Mapping[str, Any]:
    body = record.get(model)
    if not isinstance(body, Mapping):
        raise HasOffersResponseError(f"{model}.findAll: a record has no {model} object")
    return body


def _id(body: Mapping[str, Any], name: str, model: str) -> int:
    try:
        value = int(str(body.get(name)))
    except ValueError:
        raise HasOffersResponseError(f"{model}: {name} is not a number: {str(body.get(name))[:40]!r}") from None
    return value


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


def fetch(client: HasOffersClient, engine: Engine, page_size: int) -> ReferenceData:
    data = ReferenceData()
    for record in client.find_all("Offer", {"contain": ["OfferCategory"]}, page_size=page_size):
        body = _model(record, "Offer")
        offer_id = _id(body, "id", "Offer")
        data.offers[offer_id] = {"id": offer_id, "name": body.get("name"), "status": body.get("status"),
                                 "require_approval": _flag(body.get("require_approval"))}
        data.offer_categories[offer_id] = set()
        for category in _nested(record.get("OfferCategory")):
            category_id = _id(category, "id", "OfferCategory")
            data.categories[category_id] = category.get("name")
            data.offer_categories[offer_id].add(category_id)
    for record in client.find_all("Goal", page_size=page_size):
        body = _model(record, "Goal")
        goal_id = _id(body, "id", "Goal")
        data.goals[goal_id] = {"id": goal_id, "offer_id": _id(body, "offer_id", "Goal"), "name": body.get("name"),
                               "status": body.get("status")}
    for record in client.find_all("Affiliate", page_size=page_size):
        body = _model(record, "Affiliate")
        affiliate_id = _id(body, "id", "Affiliate")
        data.affiliates[affiliate_id] = {
            "id": affiliate_id, "company": body.get("company"), "status": body.get("status"),
            "account_manager_id": _optional_id(body, "account_manager_id", "Affiliate")}
    for record in client.find_all("AffiliateUser", page_size=page_size):
        body = _model(record, "AffiliateUser")
        user_id = _id(body, "id", "AffiliateUser")
        data.users[user_id] = {"id": user_id, "affiliate_id": _id(body, "affiliate_id", "AffiliateUser"),
                               "email": body.get("email"), "status": body.get("status")}
    for record in client.find_all("Employee", page_size=page_size):
        body = _model(record, "Employee")
        employee_id = _id(body, "id", "Employee")
        data.employees[employee_id] = {"id": employee_id, "email": body.get("email"), "status": body.get("status")}
    for offer_id in _cap_offers(engine, data.offers.values()):
        data.caps[offer_id] = _caps(client, offer_id)
    return data


def _cap_offers(engine: Engine, offers: Iterable[dict[str, Any]]) -> list[int]:
    """Active offers with monitoring on (new offers get monitoring on by default)."""
    with engine.connect() as conn:
        off = set(conn.scalars(select(Offer.id).where(Offer.monitoring.is_(False))))
    return [o["id"] for o in offers if o["status"] == "active" and o["id"] not in off]


def _caps(client: HasOffersClient, offer_id: int) -> list[dict[str, int]]:
    caps: dict[int, int] = {}
    for record in _nested(client.call("Offer", "getConversionCaps", {"id": offer_id})):
        body = record.get("OfferConversionCap", record)
        if not isinstance(body, Mapping):
            raise HasOffersResponseError("Offer.getConversionCaps: a record has no OfferConversionCap object")
        affiliate_id = _optional_id(body, "affiliate_id", "OfferConversionCap")
        if affiliate_id is None:  # a cap for the whole offer, not a pair
            continue
        caps[affiliate_id] = _id(body, "conversion_cap", "OfferConversionCap")
    return [{"offer_id": offer_id, "affiliate_id": a, "conversion_cap": c} for a, c in sorted(caps.items())]


def store(engine: Engine, data: ReferenceData) -> None:
    with engine.begin() as conn:
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


def load(client: HasOffersClient, engine: Engine, page_size: int) -> int:
    """Refresh the reference tables; returns the number of records read."""
    data = fetch(client, engine, page_size)
    store(engine, data)
    logger.info("reference stored: %d offers, %d categories, %d goals, %d caps, %d affiliates, %d users, "
                "%d employees", len(data.offers), len(data.categories), len(data.goals),
                sum(len(c) for c in data.caps.values()), len(data.affiliates), len(data.users), len(data.employees))
    return data.records
