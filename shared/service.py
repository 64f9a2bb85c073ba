"""Start-up and shutdown shared by the four services: `python -m services.<name>`."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from shared.handling import Handler
from shared.rabbitmq import SERVICE_BINDINGS, BrokerUnavailableError, Bus, Consumer, QueueMismatchError, QueueOptions
from shared.db import DatabaseUnavailableError, make_engine, wait_for_database
from shared.logs import configure_logging
from shared.observability import ServiceMetrics, serve
from shared.settings import ConfigurationError, Settings, load_settings

logger = logging.getLogger(__name__)

EXIT_DATABASE_UNAVAILABLE = 2
EXIT_BROKER_UNAVAILABLE = 3
EXIT_QUEUE_MISMATCH = 4
EXIT_CONFIGURATION = 5  # an environment variable that does not make a valid setting


def queue_options(settings: Settings) -> QueueOptions:
    return QueueOptions(queue_type=settings.kpi_queue_type, delivery_limit=settings.kpi_delivery_limit)


@dataclass
class Context:
    """What a service's handler factory gets: built once in main(), passed down."""

    service: str
    settings: Settings
    engine: Engine

    def publisher(self) -> Bus:
        """A separate confirming connection, for work outside the consume loop (a schedule)."""
        s = self.settings
        return Bus(s.amqp_url.get_secret_value(), s.kpi_exchange, heartbeat=s.kpi_heartbeat_seconds,
                   queues=queue_options(s))


def run_service(service: str, consumes: str, make_handler: Callable[[Context], Handler],
                background: Callable[[Context, Consumer], Callable[[], None] | None] | None = None,
                workers: int = 1) -> int:
    """Run `service`, which consumes the routing key `consumes`, until SIGTERM, with
    `workers` handler threads unless KPI_WORKERS says otherwise.

    `background` starts work beside the consumer (a schedule, a ticker) and may return a
    function that stops it: called once the consumer has stopped, before the process exits,
    so that the work is not cut off in the middle by the interpreter's exit."""
    if SERVICE_BINDINGS.get(service) != consumes:
        raise AssertionError(f"{service} consumes {consumes!r} but the topology binds its queue to "
                             f"{SERVICE_BINDINGS.get(service)!r}")
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"{service}: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIGURATION
    configure_logging(service, settings.kpi_log_level, settings.kpi_log_json)
    engine = make_engine(settings.database_url.get_secret_value())
    try:
        wait_for_database(engine, settings.kpi_startup_attempts)
    except DatabaseUnavailableError as exc:
        logger.error("cannot start: %s", exc)
        print(f"{service}: cannot start: {exc}", file=sys.stderr)
        return EXIT_DATABASE_UNAVAILABLE

    workers = settings.kpi_workers or workers
    # With several workers, enough deliveries in hand for each to have the next one waiting.
    prefetch = settings.kpi_prefetch if workers == 1 else max(settings.kpi_prefetch, 2 * workers)
    context = Context(service=service, settings=settings, engine=engine)
    metrics = ServiceMetrics(service)
    consumer = Consumer(
        amqp_url=settings.amqp_url.get_secret_value(),
        exchange=settings.kpi_exchange,
        service=service,
        handler=make_handler(context),
        prefetch=prefetch,
        retry_limit=settings.kpi_retry_limit,
        retry_delay_ms=settings.kpi_retry_delay_ms,
        startup_attempts=settings.kpi_startup_attempts,
        heartbeat=settings.kpi_heartbeat_seconds,
        queues=queue_options(settings),
        on_outcome=metrics.record,
        profile_dir=settings.kpi_profile,
        workers=workers,
    )

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s; stopping after the message in hand", signal.Signals(signum).name)
        consumer.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.kpi_metrics_port:
        serve(metrics, settings.kpi_metrics_port, healthy=consumer.ready.is_set)
    stop_background = background(context, consumer) if background is not None else None

    logger.info("starting; exchange=%s, %s", settings.kpi_exchange, queue_options(settings).describe())
    try:
        consumer.run()
    except BrokerUnavailableError as exc:
        logger.error("cannot start: %s", exc)
        print(f"{service}: cannot start: {exc}", file=sys.stderr)
        return EXIT_BROKER_UNAVAILABLE
    except QueueMismatchError as exc:
        # Retrying cannot help: the queues must be moved first (`kpi queues upgrade`).
        logger.error("cannot start: %s", exc)
        print(f"{service}: cannot start: {exc}", file=sys.stderr)
        return EXIT_QUEUE_MISMATCH
    finally:
        if stop_background is not None:
            stop_background()
        engine.dispose()
    logger.info("stopped")
    return 0
