"""The pages and their JSON twins. Each page gathers its data once (a `_..._data`
function) and renders it as HTML or as JSON, so the two always agree.

Views are plain (sync) functions: Starlette runs them in its thread pool, where the
blocking database and RabbitMQ clients belong. GET views only read (forms.reading).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from shared.console import controls, queries
from shared.console.charts import render_chart
from shared.console.forms import reading
from shared.console.rendering import json_response, render
from shared.rabbitmq import CONNECTION_ERRORS, SERVICE_BINDINGS, BrokerUnavailableError, queue_names
from shared.rabbitmq.dead_letters import dead_letter_count, read_dead_letters

logger = logging.getLogger(__name__)

PROBLEMS_PER_PAGE = 50
LOADS_PER_PAGE = 50
CHECKS_PER_PAGE = 20
CHART_CHECKS = 500        # the latest checks drawn per trigger
PAIR_CHANGES = 50         # state changes listed on a pair page
PAIR_RUNS = 100           # operation runs listed on a pair page
DEAD_LETTERS_SHOWN = 20   # per service, unless ?limit=
MAX_ID = 2**31 - 1        # ids are PostgreSQL integers


def routes() -> list[BaseRoute]:
    return [
        Route("/", problems_page, methods=["GET"]),
        Route("/api/problems", problems_api, methods=["GET"]),
        Route("/pairs/{offer_id:int}/{affiliate_id:int}", pair_page, methods=["GET"]),
        Route("/api/pairs/{offer_id:int}/{affiliate_id:int}", pair_api, methods=["GET"]),
        Route("/loads", loads_page, methods=["GET"]),
        Route("/api/loads", loads_api, methods=["GET"]),
        Route("/dead", dead_page, methods=["GET"]),
        Route("/api/dead", dead_api, methods=["GET"]),
        *controls.routes(),  # silences and held rejects: the pages that change something
    ]


def _int_param(request: Request, name: str, default: int | None, low: int = 1, high: int = MAX_ID) -> int | None:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise HTTPException(400, f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _text_param(request: Request, name: str, max_length: int = 100) -> str | None:
    raw = request.query_params.get(name, "").strip()
    if len(raw) > max_length:
        raise HTTPException(400, f"{name} is longer than {max_length} characters")
    return raw or None


# --- problems ---------------------------------------------------------------------------


def _problems_data(request: Request) -> dict[str, Any]:
    where = queries.ProblemFilter(
        trigger_id=_int_param(request, "trigger", None),
        offer=_text_param(request, "offer"),
        affiliate=_text_param(request, "affiliate"),
    )
    page = _int_param(request, "page", 1)
    size = _int_param(request, "per_page", PROBLEMS_PER_PAGE, 1, 500)
    with reading(request.app.state.engine) as conn:
        rows, found = queries.problems(conn, where, page, size)
        counts = queries.trigger_counts(conn, where)
    return {"filter": where, "problems": rows, "page": found, "triggers": counts}


def problems_page(request: Request) -> Response:
    return render(request, "problems.html", _problems_data(request))


def problems_api(request: Request) -> Response:
    data = _problems_data(request)
    return json_response({**data["page"].as_json(), "filter": data["filter"].as_json(),
                          "problems": data["problems"], "triggers": data["triggers"]})


# --- a pair -----------------------------------------------------------------------------


def _pair_data(request: Request) -> dict[str, Any]:
    offer_id, affiliate_id = request.path_params["offer_id"], request.path_params["affiliate_id"]
    if offer_id > MAX_ID or affiliate_id > MAX_ID:
        raise HTTPException(404, "No such pair.")
    paged_trigger = _int_param(request, "trigger", None)
    checks_page = _int_param(request, "checks_page", 1)
    with reading(request.app.state.engine) as conn:
        names = queries.pair_names(conn, offer_id, affiliate_id)
        sections = []
        for trigger in queries.pair_triggers(conn, offer_id, affiliate_id):
            trigger_id = trigger["trigger_id"]
            drawn = queries.latest_checks(conn, trigger_id, offer_id, affiliate_id, CHART_CHECKS + 1)
            limited = len(drawn) > CHART_CHECKS
            drawn = drawn[-CHART_CHECKS:]
            before, changes = queries.changes_since(conn, trigger_id, offer_id, affiliate_id,
                                                    drawn[0].measured_at if drawn else None)
            title = (f"{trigger['trigger']}: offer {offer_id} {names['offer_name'] or ''}, "
                     f"affiliate {affiliate_id} {names['affiliate_company'] or ''}")
            chart = render_chart(str(trigger_id), title, drawn, changes, before)
            page = checks_page if trigger_id == paged_trigger else 1
            rows, found = queries.checks_page(conn, trigger_id, offer_id, affiliate_id, page, CHECKS_PER_PAGE)
            sections.append({
                "trigger": trigger, "chart": chart, "chart_checks": drawn, "chart_limited": limited,
                "chart_changes": changes, "checks": rows, "checks_page": found,
            })
        trigger_ids = [s["trigger"]["trigger_id"] for s in sections]
        changes = queries.pair_changes(conn, trigger_ids, offer_id, affiliate_id, PAIR_CHANGES)
        runs = queries.pair_runs(conn, trigger_ids, offer_id, affiliate_id, PAIR_RUNS)
    if not sections:
        raise HTTPException(404, f"Nothing recorded for offer {offer_id} and affiliate {affiliate_id}.")
    return {"pair": names, "sections": sections, "changes": changes, "runs": runs}


def pair_page(request: Request) -> Response:
    return render(request, "pair.html", _pair_data(request))


def pair_api(request: Request) -> Response:
    data = _pair_data(request)
    triggers = []
    for section in data["sections"]:
        chart, drawn = section["chart"], section["chart_checks"]
        triggers.append({
            **section["trigger"],
            "chart": {
                "points": chart.points, "state_changes": chart.changes, "note": chart.note,
                "from": drawn[0].measured_at if drawn else None, "to": drawn[-1].measured_at if drawn else None,
                "limited_to_latest": len(drawn) if section["chart_limited"] else None,
                "changes": [asdict(c) for c in section["chart_changes"]],
            },
            "checks": {**section["checks_page"].as_json(), "items": [asdict(c) for c in section["checks"]]},
        })
    return json_response({**data["pair"], "triggers": triggers, "state_changes": data["changes"],
                          "operation_runs": data["runs"]})


# --- loads ------------------------------------------------------------------------------


def _loads_data(request: Request) -> dict[str, Any]:
    page = _int_param(request, "page", 1)
    size = _int_param(request, "per_page", LOADS_PER_PAGE, 1, 500)
    with reading(request.app.state.engine) as conn:
        rows, found = queries.loads(conn, page, size)
    return {"loads": rows, "page": found}


def loads_page(request: Request) -> Response:
    return render(request, "loads.html", _loads_data(request))


def loads_api(request: Request) -> Response:
    data = _loads_data(request)
    return json_response({**data["page"].as_json(), "loads": data["loads"]})


# --- dead letters -----------------------------------------------------------------------


def _dead_data(request: Request) -> dict[str, Any]:
    """Each service's dead queue: how many letters, and the first ones with their reason.
    read_dead_letters takes them and hands them back (nack, requeue): nothing is consumed."""
    limit = _int_param(request, "limit", DEAD_LETTERS_SHOWN, 1, 500)
    services = []
    bus = None
    try:
        bus = request.app.state.bus_factory()
        for service in SERVICE_BINDINGS:
            count = dead_letter_count(bus, service)
            letters = read_dead_letters(bus, service, limit) if count else []
            services.append({"service": service, "queue": queue_names(bus.exchange, service).dead,
                             "count": count, "letters": letters})
    except (BrokerUnavailableError, *CONNECTION_ERRORS) as exc:
        logger.warning("dead letters: RabbitMQ not reachable: %s", exc)
        return {"error": "RabbitMQ is not reachable; the dead queues cannot be read now.", "services": [],
                "limit": limit}
    finally:
        if bus is not None:
            bus.close()
    return {"error": None, "services": services, "limit": limit}


def dead_page(request: Request) -> Response:
    data = _dead_data(request)
    return render(request, "dead.html", data, 503 if data["error"] else 200)


def dead_api(request: Request) -> Response:
    data = _dead_data(request)
    return json_response({"error": data["error"], "services": data["services"]}, 503 if data["error"] else 200)
