"""The console's Starlette application: routes, middleware, error pages."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from shared.console import views
from shared.console.rendering import is_api, json_response, render, templates
from shared.console.security import (
    BasicAuthMiddleware, Credentials, CsrfMiddleware, CsrfTokens, SecurityHeadersMiddleware,
)
from shared.rabbitmq import Bus

logger = logging.getLogger(__name__)


def create_app(engine: Engine, *, credentials: Credentials | None, bus_factory: Callable[[], Bus],
               csrf: CsrfTokens | None = None, routes: list[BaseRoute] | None = None) -> Starlette:
    """credentials=None serves without authentication (only `kpi web --no-auth` on
    127.0.0.1 does that). bus_factory() returns a connected Bus (the dead-letter page)."""
    tokens = csrf or CsrfTokens()
    app = Starlette(
        routes=[*(routes if routes is not None else views.routes()),
                Mount("/static", StaticFiles(packages=[("shared.console", "static")]), name="static")],
        middleware=[
            Middleware(SecurityHeadersMiddleware),
            Middleware(BasicAuthMiddleware, credentials=credentials),
            Middleware(CsrfMiddleware, tokens=tokens),
        ],
        exception_handlers={HTTPException: _http_error, OperationalError: _database_error},
    )
    app.state.engine = engine
    app.state.bus_factory = bus_factory
    app.state.csrf = tokens  # the pages issue the tokens CsrfMiddleware checks
    app.state.templates = templates()
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if is_api(request):
        return json_response({"error": exc.detail}, exc.status_code)
    return render(request, "error.html", {"status": exc.status_code, "message": exc.detail}, exc.status_code)


async def _database_error(request: Request, exc: Exception) -> Response:
    logger.error("database error on %s: %s", request.url.path, str(getattr(exc, "orig", exc)).strip()[:300])
    message = "The database did not answer (unreachable, or the query took too long); try again in a moment."
    if is_api(request):
        return json_response({"error": message}, 503)
    return render(request, "error.html", {"status": 503, "message": message}, 503)
