"""The pages that change something: silences (add, end) and held rejects (release,
discard), with their JSON twins. The changes are the same code as `kpi silence` and
`kpi held` (shared/silences.py, shared/held.py); the author is the HTTP Basic user.

Every change is a POST from a form with the CSRF token (checked before the view runs),
written in forms.writing() and answered with a redirect to the page (post/redirect/get);
the redirect's query names what was done, and the page says it. Bad input answers the
page again with status 400, the error on top and the form as it was filled in.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from shared import held, silences
from shared.console import queries
from shared.console.forms import read_form, reading, see_other, user_of, writing
from shared.console.rendering import json_response, render
from shared.rabbitmq import CONNECTION_ERRORS, BrokerUnavailableError, PublishError

logger = logging.getLogger(__name__)

MAX_ID = 2**31 - 1
SILENCES_SHOWN = 200
HELD_PER_PAGE = 50   # oldest first; "release all" and "discard all" take every one
SILENCE_FIELDS = ("trigger", "offer", "affiliate", "for", "until", "reason")


def routes() -> list[BaseRoute]:
    return [
        Route("/silences", silences_page, methods=["GET"]),
        Route("/silences", add_silence, methods=["POST"]),
        Route("/silences/{silence_id:int}/end", end_silence, methods=["POST"]),
        Route("/api/silences", silences_api, methods=["GET"]),
        Route("/held", held_page, methods=["GET"]),
        Route("/held/{decision:str}", decide_held, methods=["POST"]),
        Route("/api/held", held_api, methods=["GET"]),
    ]


def _ids(text: str | None) -> list[int]:
    """A redirect's list of ids (`?added=3`, `?released=4,5`); anything else is ignored."""
    return [int(part) for part in (text or "").split(",") if part.isdigit() and int(part) <= MAX_ID][:500]


# --- silences ---------------------------------------------------------------------------


def _silences_data(request: Request) -> dict[str, Any]:
    include_ended = request.query_params.get("ended") == "1"
    with reading(request.app.state.engine) as conn:
        rows = silences.listing(conn, include_ended=include_ended, limit=SILENCES_SHOWN)
        trigger_names = list(conn.scalars(select(queries.triggers.c.name).order_by(queries.triggers.c.name)))
        now = conn.execute(select(func.now())).scalar_one()
    return {"silences": rows, "include_ended": include_ended, "trigger_names": trigger_names, "now": now}


def silences_page(request: Request, error: str | None = None, form: dict[str, str] | None = None,
                  status_code: int = 200) -> Response:
    data = _silences_data(request)
    params = request.query_params
    return render(request, "silences.html", {
        **data, "error": error, "form": {**dict.fromkeys(SILENCE_FIELDS, ""), **(form or {})}, "added": _ids(params.get("added")),
        "ended_ids": _ids(params.get("ended_ids")), "not_running": _ids(params.get("not_running")),
    }, status_code)


def silences_api(request: Request) -> Response:
    data = _silences_data(request)
    return json_response({"silences": data["silences"], "include_ended": data["include_ended"]})


def _optional_id(form: dict[str, str], name: str) -> int | None:
    raw = form.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) <= MAX_ID:
        raise silences.SilenceError(f"the {name} must be an id (a whole number from 1 to {MAX_ID}), not {raw[:40]!r}")
    return int(raw)


def add_silence(request: Request) -> Response:
    """The form's fields: trigger (a name, empty: any), offer and affiliate (ids, empty:
    any), exactly one of `for` (30m, 2h, 1d) or `until` (ISO 8601, UTC unless it says
    otherwise), reason. Checked by silences.add, as `kpi silence add` is."""
    form = {name: read_form(request).get(name, "")[:2000] for name in SILENCE_FIELDS}
    try:
        duration, until = form["for"].strip(), form["until"].strip()
        if bool(duration) == bool(until):
            raise silences.SilenceError("give exactly one of “for” (e.g. 30m, 2h, 1d) or “until” (a time)")
        offer_id, affiliate_id = _optional_id(form, "offer"), _optional_id(form, "affiliate")
        with writing(request.app.state.engine, request) as conn:
            now: datetime = conn.execute(select(func.now())).scalar_one()
            ends = now + silences.parse_duration(duration) if duration else silences.parse_time(until)
            silence_id = silences.add(conn, trigger=form["trigger"].strip() or None, offer_id=offer_id,
                                      affiliate_id=affiliate_id, ends_at=ends, reason=form["reason"],
                                      created_by=user_of(request))
    except silences.SilenceError as exc:
        return silences_page(request, error=str(exc), form=form, status_code=400)
    logger.info("silence %d added by %s", silence_id, user_of(request))
    return see_other(f"/silences?added={silence_id}")


def end_silence(request: Request) -> Response:
    silence_id = request.path_params["silence_id"]
    try:
        if silence_id > MAX_ID:
            raise silences.SilenceError(f"no silence with id {silence_id}")
        with writing(request.app.state.engine, request) as conn:
            ended = silences.end(conn, [silence_id])
    except silences.SilenceError as exc:
        return silences_page(request, error=str(exc), status_code=404)
    logger.info("silence %d ended by %s", silence_id, user_of(request))
    return see_other(f"/silences?ended_ids={silence_id}" if ended else f"/silences?not_running={silence_id}")


# --- held rejects -----------------------------------------------------------------------


def _held_data(request: Request) -> dict[str, Any]:
    number = _query_int(request, "page", 1, MAX_ID)
    size = _query_int(request, "per_page", HELD_PER_PAGE, 500)
    with reading(request.app.state.engine) as conn:
        # Counted by the partial index of the held runs.
        total = conn.execute(select(func.count()).select_from(queries.runs)
                             .where(queries.runs.c.status == "held")).scalar_one()
        page = queries.Page(number, size, total)
        rows = held.listing(conn, limit=page.size, offset=page.offset)
    return {"held": rows, "total": total, "page": page}


def _query_int(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise HTTPException(400, f"{name} must be a whole number from 1 to {high}")
    return int(raw)


def held_page(request: Request, error: str | None = None, status_code: int = 200) -> Response:
    params = request.query_params
    return render(request, "held.html", {
        **_held_data(request), "error": error, "released": _ids(params.get("released")),
        "discarded": _ids(params.get("discarded")), "none_done": params.get("none") == "1",
        "not_announced": params.get("announced") == "0",
    }, status_code)


def held_api(request: Request) -> Response:
    data = _held_data(request)
    return json_response({**data["page"].as_json(), "held": data["held"]})


def decide_held(request: Request) -> Response:
    """POST /held/release or /held/discard, with `run` (one id) or `all=1`. A run that
    is not held any more (released or discarded already, by anyone) is left alone: a
    released run runs once, however many times it is released."""
    decision = request.path_params["decision"]
    if decision not in ("release", "discard"):
        return held_page(request, error=f"no such decision: {decision[:40]!r} (release or discard)", status_code=404)
    form = read_form(request)
    run = form.get("run", "").strip()
    if form.get("all") == "1":
        ids = None
    elif run.isdigit() and 0 < int(run) <= MAX_ID:
        ids = [int(run)]
    else:
        return held_page(request, error="name the held run to decide (a run id), or decide all of them",
                         status_code=400)
    user = user_of(request)
    try:
        with writing(request.app.state.engine, request) as conn:
            if decision == "release":
                done, events = held.release(conn, ids, user)
            else:
                done, events = held.discard(conn, ids, user), []
    except held.HeldError as exc:
        return held_page(request, error=str(exc), status_code=404)
    logger.info("%s of held run(s) %s by %s", decision, done or "none", user)
    if not done:
        return see_other("/held?none=1")
    key = "released" if decision == "release" else "discarded"
    announced = _announce(request, events) if events else True
    return see_other(f"/held?{key}={','.join(map(str, done))}" + ("" if announced else "&announced=0"))


def _announce(request: Request, events: list) -> bool:
    """Publish the released runs' trigger events (after the commit, so an action_runner
    finds them pending). Should RabbitMQ not answer, an action_runner's ticker announces
    released runs nobody has tried within a minute: the page says so."""
    bus = None
    try:
        bus = request.app.state.bus_factory()
        bus.publish_many(events)
        return True
    except (BrokerUnavailableError, PublishError, *CONNECTION_ERRORS) as exc:
        logger.warning("released runs not announced now (%s); an action_runner's ticker runs them", exc)
        return False
    finally:
        if bus is not None:
            bus.close()
