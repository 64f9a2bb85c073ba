"""action_runner: runs the operations of the actions a trigger event fires (DESIGN.md section 4)."""

from __future__ import annotations

import functools
import logging

from services.action_runner.handler import handle_trigger_event
from services.action_runner.mailer import PerThreadMailer, SmtpMailer
from services.action_runner.ticker import Ticker
from shared.handling import Handler
from shared.rabbitmq import Consumer
from shared.hasoffers import HasOffersClient
from shared.service import Context, run_service

logger = logging.getLogger(__name__)

SERVICE = "action_runner"
CONSUMES = "trigger.event.*"
# Events handled at once (KPI_WORKERS overrides). One by default: a kill -9 then repeats
# at most one side effect (the send in flight). More workers overlap the waits on SMTP,
# HasOffers and commits and are as safe as replicas, but a crash may repeat one side
# effect per worker sending at that moment.
WORKERS = 1


def main() -> int:
    clients: list[HasOffersClient] = []
    mailers: list[PerThreadMailer] = []

    def make_handler(context: Context) -> Handler:
        settings = context.settings
        mailer = PerThreadMailer(lambda: SmtpMailer.from_settings(settings))
        mailers.append(mailer)
        hasoffers: HasOffersClient | None = None
        if settings.hasoffers_network_id and settings.hasoffers_network_token:
            hasoffers = HasOffersClient.from_settings(settings, engine=context.engine)  # the limit shared
            clients.append(hasoffers)
        else:
            # A mail-only deployment needs no API credentials; approve/reject runs then fail
            # with a clear reason instead of the whole service refusing to start.
            logger.warning("HASOFFERS_NETWORK_ID / HASOFFERS_NETWORK_TOKEN not set: "
                           "approve_affiliate and reject_affiliate operations will fail")
        logger.info("mail via %r from %s%s", mailer, settings.mail_from,
                    "; ACTIONS_DRY_RUN: nothing will be sent or called" if settings.actions_dry_run else "")
        return functools.partial(handle_trigger_event, engine=context.engine, mailer=mailer, hasoffers=hasoffers,
                                 settings=settings)

    def start_ticker(context: Context, consumer: Consumer) -> None:
        settings = context.settings
        Ticker(context.engine, SmtpMailer.from_settings(settings), context.publisher, settings).start()

    try:
        return run_service(SERVICE, CONSUMES, make_handler, background=start_ticker, workers=WORKERS)
    finally:
        for mailer in mailers:
            mailer.close()
        for client in clients:
            client.close()
