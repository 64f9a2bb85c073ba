"""trigger_checker: metric.loaded -> metric_values, trigger_checks -> trigger.checked."""

from __future__ import annotations

from functools import partial

from shared.handling import Handler
from shared.service import Context, run_service
from services.trigger_checker.handler import handle_metric_loaded

SERVICE = "trigger_checker"
CONSUMES = "metric.loaded"


def make_handler(context: Context) -> Handler:
    return partial(handle_metric_loaded, engine=context.engine,
                   max_clock_skew_seconds=context.settings.kpi_max_clock_skew_seconds)


def main() -> int:
    return run_service(SERVICE, CONSUMES, make_handler)
