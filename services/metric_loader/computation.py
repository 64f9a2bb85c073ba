"""The metrics of DESIGN.md section 5, as pure functions of report rows and settings.

A load reads Report.getStats grouped by offer and affiliate (and goal for gtr) over the
look-back window, sums the rows per pair, and turns each pair's sums into at most one
value. Nothing here does I/O; see handler.py for the API and the database.

The window is made of whole report hours. A network labels its stats (Stat.date +
Stat.hour) in its own time zone (HASOFFERS_TIMEZONE), so the window is the
`lookback_hours` real hours that end with the network-local hour containing
`measured_at`, current partial hour included, named as the network names them. Across a
daylight-saving change that is still `lookback_hours` hours of traffic: the hour that
does not exist in spring has no stats, and the hour that happens twice in autumn is one
report bucket (both of its real hours, whole). In a zone whose offset is not a whole
number of hours (Asia/Kolkata) the buckets are not UTC hours; measured_at stays UTC.
Report filters are ANDed and cannot say "from date D hour H onwards", so the window
becomes at most three queries: the hours of the first day, the whole days in between,
the hours of the last day.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import Any

from shared.hasoffers import HasOffersResponseError
from shared.vocabulary import INT4_MAX

# Above this many offers the report is not filtered by offer id on the server (the
# request would get huge); rows of other offers are dropped here instead.
OFFER_FILTER_LIMIT = 500


@dataclass(frozen=True)
class OfferSettings:
    """An offer with monitoring on, its minimums already resolved (offer > category > general)."""

    offer_id: int
    min_clicks: int
    min_conversions: int
    tracked_goal_id: int | None = None


@dataclass(frozen=True)
class MetricQuery:
    measures: tuple[str, ...]  # Stat fields to sum
    default_goal_only: bool  # goal_id 0: clicks and default conversions
    by_goal: bool = False  # gtr: default and tracked-goal conversions apart


QUERIES: dict[str, MetricQuery] = {
    "cr": MetricQuery(("clicks", "conversions"), default_goal_only=True),
    "clicks_zero_conv": MetricQuery(("clicks", "conversions"), default_goal_only=True),
    "pacc": MetricQuery(("profit", "gross_clicks"), default_goal_only=False),
    "gtr": MetricQuery(("conversions",), default_goal_only=False, by_goal=True),
    # A cap counts every conversion the advertiser pays for, goal conversions included.
    "cap_fill": MetricQuery(("conversions",), default_goal_only=False),
}

INT_MEASURES = ("clicks", "gross_clicks", "conversions")


# -- the window ----------------------------------------------------------------------------


def window(measured_at: datetime, lookback_hours: int, zone: tzinfo = timezone.utc) -> tuple[datetime, datetime]:
    """First and last report hour (inclusive) of the look-back, as aware datetimes in the
    network's zone: their .date() and .hour are the Stat.date and Stat.hour to ask for."""
    # astimezone sets `fold` in the repeated autumn hour, so the hour's start is exact.
    end = measured_at.astimezone(zone).replace(minute=0, second=0, microsecond=0)
    # Step back in real time (UTC), not on the wall clock, then name the hour locally.
    start = (end.astimezone(timezone.utc) - timedelta(hours=lookback_hours - 1)).astimezone(zone)
    return start, end


def _between(field: str, low: Any, high: Any) -> dict[str, Any]:
    if low == high:
        return {field: {"conditional": "EQUAL_TO", "values": [str(low)]}}
    return {field: {"conditional": "BETWEEN", "values": [str(low), str(high)]}}


def window_filters(start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Report filters whose union is exactly the hours start..end (inclusive)."""
    first_day, last_day = start.date(), end.date()
    if first_day == last_day:
        hours = {} if (start.hour, end.hour) == (0, 23) else _between("Stat.hour", start.hour, end.hour)
        return [{**_between("Stat.date", first_day, first_day), **hours}]
    parts: list[dict[str, Any]] = []
    whole_from: date = first_day if start.hour == 0 else first_day + timedelta(days=1)
    whole_to: date = last_day if end.hour == 23 else last_day - timedelta(days=1)
    if start.hour != 0:
        parts.append({**_between("Stat.date", first_day, first_day), **_between("Stat.hour", start.hour, 23)})
    if whole_from <= whole_to:
        parts.append(_between("Stat.date", whole_from, whole_to))
    if end.hour != 23:
        parts.append({**_between("Stat.date", last_day, last_day), **_between("Stat.hour", 0, end.hour)})
    return parts


# -- the report ----------------------------------------------------------------------------


def report_params(metric_key: str, period: Mapping[str, Any], offers: Mapping[int, OfferSettings]) -> dict[str, Any]:
    """Report.getStats parameters (without paging) for one part of the window."""
    query = QUERIES[metric_key]
    groups = ["Stat.offer_id", "Stat.affiliate_id"] + (["Stat.goal_id"] if query.by_goal else [])
    filters: dict[str, Any] = dict(period)
    if len(offers) <= OFFER_FILTER_LIMIT:
        filters["Stat.offer_id"] = {"conditional": "EQUAL_TO", "values": [str(o) for o in sorted(offers)]}
    if query.default_goal_only:
        filters["Stat.goal_id"] = {"conditional": "EQUAL_TO", "values": ["0"]}
    elif query.by_goal:
        goals = sorted({o.tracked_goal_id for o in offers.values() if o.tracked_goal_id})
        if len(goals) < OFFER_FILTER_LIMIT:
            filters["Stat.goal_id"] = {"conditional": "EQUAL_TO", "values": ["0", *map(str, goals)]}
    return {"fields": [f"Stat.{m}" for m in query.measures] + groups, "groups": groups, "filters": filters}


def _number(stat: Mapping[str, Any], name: str, integer: bool) -> float:
    raw = stat.get(name)
    if integer:
        try:
            return int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass  # "12.0" as a count is still readable: try it as a float
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HasOffersResponseError(f"Report.getStats: {name} is not a number: {str(raw)[:40]!r}") from None
    if not math.isfinite(value):
        raise HasOffersResponseError(f"Report.getStats: {name} is not finite: {raw!r}")
    return value


@dataclass
class Totals:
    """Per (offer, affiliate): the summed measures; for gtr default and goal conversions."""

    sums: dict[tuple[int, int], dict[str, float]]
    rows: int = 0


def accumulate(totals: Totals, metric_key: str, rows: Iterable[Mapping[str, Any]],
               offers: Mapping[int, OfferSettings]) -> None:
    """Add report rows to the per-pair sums. Rows of offers not monitored are dropped."""
    query = QUERIES[metric_key]
    measures = [(m, m in INT_MEASURES) for m in query.measures]
    for stat in rows:
        totals.rows += 1
        offer_id = int(_number(stat, "offer_id", True))
        affiliate_id = int(_number(stat, "affiliate_id", True))
        offer = offers.get(offer_id)
        if offer is None or not 0 < offer_id <= INT4_MAX or not 0 < affiliate_id <= INT4_MAX:
            continue
        sums = totals.sums.setdefault((offer_id, affiliate_id), {})
        if query.by_goal:
            goal_id = int(_number(stat, "goal_id", True))
            if goal_id == 0:
                name = "default_conversions"
            elif goal_id == offer.tracked_goal_id:
                name = "goal_conversions"
            else:
                continue
            sums[name] = sums.get(name, 0) + _number(stat, "conversions", True)
            continue
        for measure, integer in measures:
            sums[measure] = sums.get(measure, 0) + _number(stat, measure, integer)


# -- the values ----------------------------------------------------------------------------


def values(metric_key: str, totals: Totals, offers: Mapping[int, OfferSettings],
           caps: Mapping[tuple[int, int], int], lookback_hours: int, click_cost: float
           ) -> list[tuple[int, int, float]]:
    """(offer_id, affiliate_id, value) for every pair that qualifies, sorted by pair."""
    out: list[tuple[int, int, float]] = []
    for (offer_id, affiliate_id), sums in sorted(totals.sums.items()):
        offer = offers[offer_id]
        value = _value(metric_key, sums, offer, caps.get((offer_id, affiliate_id), 0), lookback_hours, click_cost)
        if value is not None and math.isfinite(value):
            out.append((offer_id, affiliate_id, float(value)))
    return out


def _value(metric_key: str, s: Mapping[str, float], offer: OfferSettings, cap: int, lookback_hours: int,
           click_cost: float) -> float | None:
    if metric_key == "cr":
        clicks = s.get("clicks", 0)
        if clicks < offer.min_clicks:
            return None
        return s.get("conversions", 0) / clicks if clicks else 0.0
    if metric_key == "clicks_zero_conv":
        clicks = s.get("clicks", 0)
        return float(clicks) if s.get("conversions", 0) == 0 and clicks >= offer.min_clicks else None
    if metric_key == "pacc":
        gross = s.get("gross_clicks", 0)
        return s.get("profit", 0.0) - gross * click_cost if gross >= offer.min_clicks else None
    if metric_key == "gtr":
        default = s.get("default_conversions", 0)
        # No ratio without default conversions, whatever the minimum says.
        if offer.tracked_goal_id is None or default <= 0 or default < offer.min_conversions:
            return None
        return s.get("goal_conversions", 0) / default
    if metric_key == "cap_fill":
        if cap <= 0:
            return None
        return (s.get("conversions", 0) / (lookback_hours / 24)) / cap
    raise ValueError(f"unknown metric {metric_key!r}")
