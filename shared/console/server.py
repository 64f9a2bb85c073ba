"""`kpi web`: check how the console may listen, build it, serve it with uvicorn."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from shared.console.security import Credentials
from shared.db import make_engine
from shared.rabbitmq import Bus
from shared.settings import Settings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A page that takes this long is a bug or a sick database; don't let it pile up.
STATEMENT_TIMEOUT_MS = 10_000


class ConsoleConfigError(Exception):
    """The console must not start as asked (said in one line)."""


def credentials_for(settings: Settings, host: str, no_auth: bool) -> Credentials | None:
    """The credentials to require, or None when --no-auth is allowed (loopback only)."""
    if no_auth:
        if host != LOOPBACK:
            raise ConsoleConfigError(f"--no-auth is only allowed with --host {LOOPBACK} (not {host})")
        return None
    user = (settings.kpi_web_user or "").strip()
    password = settings.kpi_web_password.get_secret_value() if settings.kpi_web_password else ""
    if not user or not password:
        raise ConsoleConfigError(
            "set KPI_WEB_USER and KPI_WEB_PASSWORD (or, on 127.0.0.1 only, pass --no-auth)"
        )
    if ":" in user:
        raise ConsoleConfigError("KPI_WEB_USER cannot contain ':' (HTTP Basic puts one between user and password)")
    return Credentials(user, password)


def console_engine(settings: Settings) -> Engine:
    """The console's own pool: read-only by default (forms.writing opens a read-write
    transaction for a POST), with a statement timeout."""
    return make_engine(
        settings.database_url.get_secret_value(),
        pool_size=5, max_overflow=5,
        connect_args={
            "connect_timeout": 5,
            "application_name": "hasoffers-kpi console",
            "options": f"-c default_transaction_read_only=on -c statement_timeout={STATEMENT_TIMEOUT_MS}",
        },
    )


def bus_factory(settings: Settings):
    def connect() -> Bus:
        return Bus(settings.amqp_url.get_secret_value(), settings.kpi_exchange,
                   name="hasoffers-kpi console").connect_with_retry(attempts=1)
    return connect


def serve(settings: Settings, engine: Engine, host: str, port: int, credentials: Credentials | None) -> None:
    import uvicorn

    from shared.console.app import create_app

    app = create_app(engine, credentials=credentials, bus_factory=bus_factory(settings))
    if credentials is None:
        logger.warning("console without authentication on http://%s:%d/ (--no-auth)", host, port)
    logger.info("console on http://%s:%d/", host, port)
    uvicorn.run(app, host=host, port=port, log_config=None, server_header=False, proxy_headers=False,
                access_log=True)
