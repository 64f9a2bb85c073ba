"""event_detector: trigger.checked -> trigger_states, trigger_events -> trigger.event.problem / .ok."""

from __future__ import annotations

from functools import partial

from shared.handling import Handler
from shared.service import Context, run_service
from services.event_detector.handler import handle_trigger_checked

SERVICE = "event_detector"
CONSUMES = "trigger.checked"


def make_handler(context: Context) -> Handler:
    return partial(handle_trigger_checked, engine=context.engine)


def main() -> int:
    return run_service(SERVICE, CONSUMES, make_handler)
