"""action_runner: consumes its queue and, for now, logs what it receives."""

from __future__ import annotations

import logging

from shared.bus import Handler, HandlerResult
from shared.events import Envelope, parse_data
from shared.service import Context, run_service

logger = logging.getLogger(__name__)

SERVICE = "action_runner"


def make_handler(context: Context) -> Handler:
    def handle(envelope: Envelope) -> HandlerResult:
        parse_data(envelope)
        logger.info("received event_id=%s type=%s", envelope.event_id, envelope.type)
        return HandlerResult()

    return handle


def main() -> int:
    return run_service(SERVICE, make_handler)
