"""metric.load.requested -> read HasOffers -> metric.loaded (or the reference tables).

Per request: find or create its run (runs.py) -> read the whole report, every page of
every part of the window -> compute all values -> return the batches for the consumer
to publish, and mark the run succeeded once they are confirmed (after_publish). Nothing
is returned before the whole report was read, so a failed run publishes nothing. The
batches of a run always get the same event ids and the same measured_at, so a retried
run is idempotent downstream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select

from services.metric_loader import computation, reference, runs
from services.metric_loader.computation import OfferSettings, Totals
from shared.db import Category, ConversionCap, Offer, OfferCategory
from shared.events import (
    MAX_BATCH, METRIC_LOADED, Envelope, MetricLoaded, MetricLoadRequested, encode, new_event,
    parse_data, stable_event_id,
)
from shared.handling import DeadLetter, Delivery, HandlerResult
from shared.hasoffers import HasOffersClient, HasOffersError
from shared.sql import connection
from shared.vocabulary import REFERENCE

logger = logging.getLogger(__name__)

FIND_PAGE_SIZE_MAX = 1000


@dataclass(frozen=True)
class LoaderConfig:
    click_cost: float = 0.0
    min_clicks: int = 0
    min_conversions: int = 0
    page_size: int = 10000
    timezone: str = "UTC"  # the zone the network reports Stat.date / Stat.hour in

    @classmethod
    def from_settings(cls, settings: Any) -> LoaderConfig:
        return cls(click_cost=settings.kpi_click_cost, min_clicks=settings.kpi_min_clicks,
                   min_conversions=settings.kpi_min_conversions, page_size=settings.kpi_report_page_size,
                   timezone=settings.hasoffers_timezone)


class NotConfiguredError(HasOffersError):
    """No HasOffers credentials: every load fails with this reason."""


def handle_load_requested(envelope: Envelope, delivery: Delivery | None = None, *, engine: Engine,
           client: HasOffersClient | None, config: LoaderConfig) -> HandlerResult:
    request: MetricLoadRequested = parse_data(envelope)
    event_id = str(envelope.event_id)
    run = runs.open_run(engine, event_id, request.metric_key, request.lookback_hours)
    if run is None:
        logger.info("event_id=%s load of %s already succeeded; nothing to do", event_id, request.metric_key)
        return HandlerResult()
    # The run counts the starts the broker cannot see (a crash, a lost connection).
    delivery = (delivery or Delivery()).at_attempt(run.attempts)
    if delivery.exhausted:
        reason = (f"gave up after {delivery.attempt - 1} attempts: every one was interrupted "
                  f"(the process stopped or lost its connections before the load finished)")
        logger.error("event_id=%s run_id=%d %s", event_id, run.id, reason)
        runs.fail(engine, run.id, reason)
        return HandlerResult(dead_letters=[DeadLetter(encode(envelope), reason)])
    logger.info("event_id=%s run_id=%d loading %s (look-back %dh, measured_at %s, attempt %d/%d)", event_id,
                run.id, run.metric_key, run.lookback_hours, run.measured_at.isoformat(), delivery.attempt,
                delivery.max_attempts)
    rows_read = 0
    notes: str | None = None
    try:
        if client is None:
            raise NotConfiguredError("HasOffers credentials are not configured "
                                     "(HASOFFERS_NETWORK_ID, HASOFFERS_NETWORK_TOKEN)")
        if run.metric_key == REFERENCE:
            rows_read, notes = reference.load(client, engine, min(config.page_size, FIND_PAGE_SIZE_MAX))
            values: list[tuple[int, int, float]] = []
        else:
            rows_read, values = load_metric(engine, client, config, run.metric_key, run.lookback_hours,
                                            run.measured_at)
    except HasOffersError as exc:  # permanent: the API refused, or answered nonsense
        logger.error("event_id=%s run_id=%d load of %s failed: %s", event_id, run.id, run.metric_key, exc)
        runs.fail(engine, run.id, str(exc), rows_read)
        return HandlerResult()
    except Exception as exc:  # transient (HasOffersUnavailableError, database) or a bug: try again
        reason = f"{type(exc).__name__}: {exc}"
        if not delivery.is_last:
            _record_attempt(engine, run, delivery, reason, event_id)
            raise
        # The last attempt: the run fails with the request, which goes to the dead queue.
        reason = f"gave up after {delivery.attempt} attempts: {reason}"
        logger.error("event_id=%s run_id=%d failed for good: %s", event_id, run.id, reason)
        runs.fail(engine, run.id, reason, rows_read)  # raises if the database is what failed: retried
        return HandlerResult(dead_letters=[DeadLetter(encode(envelope), reason)])

    events = metric_events(run.id, event_id, run.metric_key, values, run.measured_at)
    logger.info("event_id=%s run_id=%d %s: %d rows read, %d values in %d messages", event_id, run.id,
                run.metric_key, rows_read, len(values), len(events))

    def published() -> None:
        # Only once every batch is confirmed: a request redelivered before that finds its
        # run still running and publishes the same batches again.
        runs.succeed(engine, run.id, rows_read, len(values), notes)

    return HandlerResult(events=events, after_publish=published)


def _record_attempt(engine: Engine, run: runs.Run, delivery: Delivery, reason: str, event_id: str) -> None:
    try:
        runs.record_attempt(engine, run.id, delivery.attempt, delivery.max_attempts, reason)
    except Exception as db_exc:  # the database may be what failed; the retry comes anyway
        logger.warning("event_id=%s run_id=%d could not record the failure: %s", event_id, run.id, db_exc)


def load_metric(engine: Engine, client: HasOffersClient, config: LoaderConfig, metric_key: str,
                lookback_hours: int, measured_at: datetime) -> tuple[int, list[tuple[int, int, float]]]:
    """Read every page of every part of the window; (rows read, values)."""
    offers = monitored_offers(engine, config)
    caps = conversion_caps(engine) if metric_key == "cap_fill" else {}
    if metric_key == "gtr":  # offers without a tracked goal have no gtr
        offers = {i: o for i, o in offers.items() if o.tracked_goal_id is not None}
    elif metric_key == "cap_fill":  # a cap of 0 means no cap
        capped = {o for o, _ in caps}
        offers = {i: o for i, o in offers.items() if i in capped}
    return read_values(client, config, metric_key, lookback_hours, measured_at, offers, caps)


def read_values(client: HasOffersClient, config: LoaderConfig, metric_key: str, lookback_hours: int,
                measured_at: datetime, offers: dict[int, OfferSettings], caps: dict[tuple[int, int], int]
                ) -> tuple[int, list[tuple[int, int, float]]]:
    """The report over the window in the network's zone, every page; (rows read, values)."""
    totals = Totals(sums={})
    if offers:
        start, end = computation.window(measured_at, lookback_hours, ZoneInfo(config.timezone))
        for period in computation.window_filters(start, end):
            params = computation.report_params(metric_key, period, offers)
            computation.accumulate(totals, metric_key, client.get_stats(params, page_size=config.page_size), offers)
    return totals.rows, computation.values(metric_key, totals, offers, caps, lookback_hours, config.click_cost)


def monitored_offers(engine: Engine, config: LoaderConfig) -> dict[int, OfferSettings]:
    """Offers with monitoring on, minimum clicks resolved offer > category (smallest id) > general."""
    category_min_clicks = (
        select(Category.min_clicks)
        .join(OfferCategory, OfferCategory.category_id == Category.id)
        .where(OfferCategory.offer_id == Offer.id, Category.min_clicks.is_not(None))
        .order_by(OfferCategory.category_id)
        .limit(1)
        .scalar_subquery()
    )
    with connection(engine) as conn:
        rows = conn.execute(
            select(Offer.id, Offer.tracked_goal_id,
                   func.coalesce(Offer.min_clicks, category_min_clicks, config.min_clicks).label("min_clicks"),
                   func.coalesce(Offer.min_conversions, config.min_conversions).label("min_conversions"))
            .where(Offer.monitoring)
        ).all()
    return {r.id: OfferSettings(r.id, r.min_clicks, r.min_conversions, r.tracked_goal_id) for r in rows}


def conversion_caps(engine: Engine) -> dict[tuple[int, int], int]:
    with connection(engine) as conn:
        rows = conn.execute(
            select(ConversionCap.offer_id, ConversionCap.affiliate_id, ConversionCap.conversion_cap)
            .where(ConversionCap.conversion_cap > 0)
        ).all()
    return {(r.offer_id, r.affiliate_id): r.conversion_cap for r in rows}


def metric_events(run_id: int, request_event_id: str, metric_key: str, values: Sequence[tuple[int, int, float]],
                  measured_at: datetime) -> list[Envelope]:
    """metric.loaded batches of at most MAX_BATCH items; event id = (run, batch number)."""
    stamp = measured_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    events = []
    for number, start in enumerate(range(0, len(values), MAX_BATCH)):
        data = {"metrics": [{"metric_key": metric_key, "offer_id": o, "affiliate_id": a, "value": v,
                             "measured_at": stamp} for o, a, v in values[start:start + MAX_BATCH]]}
        MetricLoaded.model_validate(data)  # the contract, checked once per batch rather than per item object
        events.append(new_event(METRIC_LOADED, data, correlation_id=str(run_id), causation_id=request_event_id,
                                event_id=stable_event_id(METRIC_LOADED, run_id, number)))
    return events
