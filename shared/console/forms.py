"""What a page that changes something uses (a POST handler, and the form that posts to it).

The rules: a change is a POST from a form that carries `{{ csrf_field() }}` (the token
is checked by CsrfMiddleware before the view runs); the view reads the fields with
read_form(), records user_of() as the author (created_by), writes in writing() and
answers see_other() so a reload does not post again. GET views only ever read: the
console's connections are read-only unless writing() opens the transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import RedirectResponse

from shared.console.security import SAFE_METHODS, current_user


def user_of(request: Request) -> str:
    """Who is asking: the HTTP Basic user (or security.ANONYMOUS with --no-auth)."""
    return current_user(request.scope)


def csrf_token(request: Request) -> str:
    """A fresh token for the user of this request, for a form on the page it renders."""
    return request.app.state.csrf.issue(user_of(request))


def read_form(request: Request) -> dict[str, str]:
    """The fields of the posted form (application/x-www-form-urlencoded), as the CSRF
    check parsed them: the body has been read once already."""
    return dict(request.scope.get("state", {}).get("form", {}))


@contextmanager
def writing(engine: Engine, request: Request) -> Iterator[Connection]:
    """A read-write transaction, only for a request that passed the CSRF check."""
    if request.method in SAFE_METHODS:
        raise RuntimeError(f"a {request.method} request must not write")
    with engine.begin() as conn:
        conn.execute(text("SET TRANSACTION READ WRITE"))
        yield conn


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction: every query of a page sees the same snapshot (the
    counts agree with the rows shown)."""
    with engine.connect() as conn:
        with conn.begin():
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
            yield conn


def see_other(url: str) -> RedirectResponse:
    """The answer to a successful POST (post/redirect/get)."""
    return RedirectResponse(url, status_code=303)
