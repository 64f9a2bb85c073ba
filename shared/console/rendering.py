"""Rendering: the Jinja2 environment (autoescape on), the top bar, filters, JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from shared.console import charts
from shared.console.forms import csrf_token, user_of
from shared.console.security import CSRF_FIELD


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str


# The pages in the top bar, in order (their routes: views.routes()).
NAV = [NavItem("/", "Problems"), NavItem("/loads", "Loads"), NavItem("/dead", "Dead letters"),
       NavItem("/silences", "Silences"), NavItem("/held", "Held rejects")]


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("shared.console", "templates"),
        autoescape=True,  # every template, whatever its extension
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=charts.format_number, when=when, ago=ago, scope=scope_label, op=operator_symbol)
    env.globals.update(nav=NAV)
    return env


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    env: Environment = request.app.state.templates

    def url_with(**changes: Any) -> str:
        return url_with_params(request, **changes)

    token: list[str] = []  # one token for every form of the page, made when the first asks

    def csrf_field() -> Markup:
        if not token:
            token.append(csrf_token(request))
        return Markup('<input type="hidden" name="{}" value="{}">').format(CSRF_FIELD, token[0])

    html = env.get_template(template).render(
        request=request, user=user_of(request), url_with=url_with, csrf_field=csrf_field,
        active=_active_nav(request.url.path), **context,
    )
    return HTMLResponse(html, status_code=status_code)


def url_with_params(request: Request, **changes: Any) -> str:
    """The current URL with some query parameters changed (None or "" removes one)."""
    params = dict(request.query_params)
    for key, value in changes.items():
        if value is None or value == "":
            params.pop(key, None)
        else:
            params[key] = str(value)
    query = urlencode(params)
    return request.url.path + (f"?{query}" if query else "")


def _active_nav(path: str) -> str:
    if path.startswith("/pairs/"):
        return "/"
    return next((item.path for item in NAV if item.path != "/" and path.startswith(item.path)), "/")


def json_response(data: Any, status_code: int = 200) -> Response:
    return Response(json.dumps(_finite(data), default=_json_default, ensure_ascii=False, allow_nan=False),
                    status_code=status_code, media_type="application/json")


def _finite(value: Any) -> Any:
    """NaN and infinities (a value typed in by hand) as null: JSON has no word for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


# --- template filters -------------------------------------------------------------------


def when(at: datetime | None, seconds: bool = False) -> Markup:
    """A timestamp in UTC inside <time>, ISO 8601 in its datetime attribute."""
    if at is None:
        return Markup('<span class="muted">–</span>')
    utc = at.astimezone(timezone.utc)
    shown = utc.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    return Markup('<time datetime="{}">{}</time>').format(utc.isoformat(), shown)


def ago(at: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest one or two units: 45 s, 12 min, 3 h 05 min, 4 d."""
    if at is None:
        return ""
    seconds = int(((now or datetime.now(timezone.utc)) - at).total_seconds())
    if seconds < 0:
        return "in the future"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days >= 2:
        return f"{days} d ago"
    if hours >= 1:
        return f"{hours} h {minutes % 60:02d} min ago" if minutes % 60 else f"{hours} h ago"
    if minutes >= 1:
        return f"{minutes} min ago"
    return f"{seconds} s ago"


def scope_label(scope: str | None) -> str:
    return charts.SCOPE_LABELS.get(scope or "", scope or "")


def operator_symbol(operator: str | None) -> str:
    return charts.OPERATOR_SYMBOLS.get(operator or "", operator or "")
