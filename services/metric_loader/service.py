"""metric_loader: consumes metric.load.requested, reads HasOffers, publishes metric.loaded."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from services.metric_loader.handler import LoaderConfig, handle_load_requested
from services.metric_loader.schedule import Schedule
from shared.handling import Handler
from shared.rabbitmq import Consumer
from shared.hasoffers import HasOffersClient
from shared.service import Context, run_service

logger = logging.getLogger(__name__)

SERVICE = "metric_loader"
CONSUMES = "metric.load.requested"


def make_handler(context: Context) -> Handler:
    settings = context.settings
    client = None
    if settings.hasoffers_network_id and settings.hasoffers_network_token:
        # One per process, shared by every load; the rate limit shared with every process.
        client = HasOffersClient.from_settings(settings, engine=context.engine)
        # Scheme, host and path only: a misconfigured URL could carry parameters.
        url = urlsplit(settings.hasoffers_base_url)
        port = f":{url.port}" if url.port else ""
        logger.info("HasOffers API at %s://%s%s%s, network %s", url.scheme, url.hostname, port, url.path,
                    settings.hasoffers_network_id)
    else:
        # Start anyway (the queue must not back up unseen); every load fails with the reason.
        logger.error("HASOFFERS_NETWORK_ID and HASOFFERS_NETWORK_TOKEN are not set: every load will fail")
    return functools.partial(handle_load_requested, engine=context.engine, client=client,
                             config=LoaderConfig.from_settings(settings))


def start_schedule(context: Context, consumer: Consumer) -> Callable[[], None] | None:
    s = context.settings
    if not (s.kpi_schedule_metrics_seconds or s.kpi_schedule_reference_seconds):
        return None
    schedule = Schedule(context.engine, context.publisher, metrics_seconds=s.kpi_schedule_metrics_seconds,
                        reference_seconds=s.kpi_schedule_reference_seconds, lookback_hours=s.kpi_lookback_hours)
    thread = schedule.start()

    def stop() -> None:
        # The tick in progress finishes: a slot claimed is also logged and published.
        schedule.stopping.set()
        thread.join(30)

    return stop


def main() -> int:
    return run_service(SERVICE, CONSUMES, make_handler, background=start_schedule)
