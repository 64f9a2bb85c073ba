"""HTTP Basic authentication, CSRF tokens and security headers, as ASGI middleware.

Order (outermost first): security headers on every response, 401s included; then
authentication, so nothing, not even a static file or a 404, answers a stranger; then the
CSRF check of every state-changing request, before any route sees it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

REALM = "hasoffers-kpi console"
# The user recorded (e.g. in created_by) when the console runs with --no-auth.
ANONYMOUS = "local"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
# A form of the console is a few fields; anything bigger is not one of ours.
MAX_FORM_BYTES = 64 * 1024

SECURITY_HEADERS = {
    # Everything the console serves comes from itself: no CDN, no inline script or style.
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    # Pages show live operational data (and names from the network): never cache them.
    "cache-control": "no-store",
}


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)

    def check(self, authorization: str | None) -> str | None:
        """The user named by a valid `Authorization: Basic ...` header, else None.

        Both parts are compared as digests with hmac.compare_digest, always both, so
        neither the time taken nor its variation tells how much of a guess was right.
        """
        if not authorization or authorization[:6].lower() != "basic ":
            return None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        user, colon, password = decoded.partition(":")
        if not colon:
            return None
        user_ok = hmac.compare_digest(_digest(user), _digest(self.user))
        password_ok = hmac.compare_digest(_digest(password), _digest(self.password))
        return user if user_ok and password_ok else None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class CsrfTokens:
    """Tokens bound to a user and to this process: `<issued>.<hmac(secret, user, issued)>`.

    The secret is made when the process starts, so a restart invalidates every page
    left open (its next POST is refused and the page reloaded gives a new token); a token
    is good for `max_age` seconds. No server-side state: any token this process issued
    for this user verifies until it expires.
    """

    def __init__(self, secret: bytes | None = None, max_age: int = 12 * 3600,
                 clock: Callable[[], float] = time.time):
        self._secret = secret or secrets.token_bytes(32)
        self.max_age = max_age
        self._clock = clock

    def issue(self, user: str) -> str:
        issued = int(self._clock())
        return f"{issued}.{self._mac(user, issued)}"

    def verify(self, token: str | None, user: str) -> bool:
        if not token or len(token) > 200:
            return False
        issued_text, dot, mac = token.partition(".")
        if not dot or not issued_text.isdigit():
            return False
        issued = int(issued_text)
        age = self._clock() - issued
        # A little skew the other way: tokens are issued by this process's own clock.
        if not -60 <= age <= self.max_age:
            return False
        return hmac.compare_digest(mac, self._mac(user, issued))

    def _mac(self, user: str, issued: int) -> str:
        message = b"csrf\x00" + user.encode("utf-8") + b"\x00" + str(issued).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


def current_user(scope: Scope) -> str:
    return scope.get("state", {}).get("user", ANONYMOUS)


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Answered here rather than by Starlette's outermost error page, so a 500
            # carries the same headers (and no traceback) too.
            logger.exception("error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            await PlainTextResponse("500 Internal Server Error\n", status_code=500)(scope, receive,
                                                                                   send_with_headers)


class BasicAuthMiddleware:
    """401 with a Basic challenge for every request without valid credentials; the user
    of a valid one goes into scope["state"]["user"]. credentials=None (--no-auth on
    127.0.0.1) lets every request through as ANONYMOUS."""

    def __init__(self, app: ASGIApp, credentials: Credentials | None):
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.credentials is None:
            user: str | None = ANONYMOUS
        else:
            user = self.credentials.check(Headers(scope=scope).get("authorization"))
        if user is None:
            client = scope.get("client") or ("?", 0)
            logger.info("401 %s %s from %s", scope["method"], scope["path"], client[0])
            response = PlainTextResponse(
                "401 Unauthorized: this console needs its user name and password.\n", status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


class CsrfMiddleware:
    """Every request that may change something (any method but GET, HEAD, OPTIONS) must
    carry a token issued to its user: the form field `csrf_token` or the header
    `X-CSRF-Token`. Refused with 403 before routing otherwise.

    The body of a form is read here (at most MAX_FORM_BYTES), parsed, kept in
    scope["state"]["form"] for the view (forms.read_form) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, tokens: CsrfTokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
            await PlainTextResponse("413 Request body too large.\n", status_code=413)(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_FORM_BYTES:
                await PlainTextResponse("413 Request body too large.\n", status_code=413)(scope, receive, send)
                return
        form: dict[str, str] = {}
        if headers.get("content-type", "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            try:
                form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200))
            except (UnicodeDecodeError, ValueError):
                form = {}
        token = headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        user = current_user(scope)
        if not self.tokens.verify(token, user):
            logger.warning("403 CSRF token %s: %s %s user=%s", "invalid" if token else "missing",
                           scope["method"], scope["path"], user)
            response = PlainTextResponse(
                "403 Forbidden: the form's CSRF token is missing, invalid or expired; reload the page and try again.\n",
                status_code=403,
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["form"] = form
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
