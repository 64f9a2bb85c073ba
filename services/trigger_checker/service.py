"""trigger_checker: metric.loaded -> metric_values, trigger_checks -> trigger.checked.

The only writer of both tables, so it also keeps their day partitions: made ahead,
dropped past KPI_RETENTION_DAYS (shared/partitions.py).
"""

from __future__ import annotations

from functools import partial

from shared import partitions
from shared.handling import Handler
from shared.rabbitmq import Consumer
from shared.service import Context, run_service
from services.trigger_checker.handler import handle_metric_loaded

SERVICE = "trigger_checker"
CONSUMES = "metric.loaded"


def make_handler(context: Context) -> Handler:
    return partial(handle_metric_loaded, engine=context.engine,
                   max_clock_skew_seconds=context.settings.kpi_max_clock_skew_seconds)


def start_upkeep(context: Context, _consumer: Consumer) -> None:
    partitions.start_upkeep(context.engine, context.settings.kpi_retention_days)


def main() -> int:
    return run_service(SERVICE, CONSUMES, make_handler, background=start_upkeep)
