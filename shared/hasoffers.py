"""HasOffers (TUNE) Network API v3 client: one httpx.Client per process.

Facts of the API it relies on: every answer is HTTP 200 with an envelope
`{"response": {"status": 1 | -1, "data": ..., "errorMessage": ...}}`; nested
parameters use PHP brackets; the rate limit is 50 calls per 10 s per network and is
reported as an error whose message contains "API usage exceeded rate limit".

The endpoint is the network's own API host, `https://<NETWORKID>.api.hasoffers.com/Apiv3/json`
(HASOFFERS_BASE_URL with a `{network_id}` placeholder); `NetworkId` in the query string,
which the API documents as deprecated since 2017, is sent only to a URL without the
placeholder (the legacy shared host, a proxy, the fake).

The network token travels in a form-encoded POST body, never in the URL, and is
scrubbed from every error message this module produces. httpx's own request logging
is silenced in shared.logs because a URL may carry parameters.

What the API does not promise and this client therefore checks: a write answers
`status 1` with `data: false` when nothing was changed (HasOffersWriteRefusedError);
a report's rows move between pages unless a sort is given (pages are asked for in a
stable order, and a row met twice is counted once); an empty report comes back as
`[]`, `{}` or `null`. The rate limit is the network's, shared by every process that
calls it (CallWindow; shared/hasoffers_rate.py keeps it in PostgreSQL).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

import httpx

from shared.handling import RetryableError

logger = logging.getLogger(__name__)

RATE_LIMIT_TEXT = "API usage exceeded rate limit"


class HasOffersError(Exception):
    """A permanent failure: the API said no (status -1), or answered something unreadable."""


class HasOffersApiError(HasOffersError):
    def __init__(self, call: str, message: str):
        super().__init__(f"{call}: HasOffers error: {message}")
        self.api_message = message


class HasOffersResponseError(HasOffersError):
    """The body is not the envelope the API always sends (malformed, truncated, HTML)."""


class HasOffersWriteRefusedError(HasOffersApiError):
    """A write answered `status 1` without saying it was applied (`data` false, empty or
    unreadable): a failure of that operation, not worth retrying as it is."""


class HasOffersUnavailableError(RetryableError):
    """Transient: HTTP 5xx, timeouts, connection errors or the rate limit, after our own retries."""


def token_pattern(token: str) -> re.Pattern[str]:
    """Matches the token as it is and in every form an error could echo it: URL-encoded
    (either case of hex, `+` for a space), as a form body or a query string carries it."""
    if not token:
        return re.compile(r"(?!)")  # matches nothing
    alternatives = []
    for char in token:
        percent = "".join(f"%{byte:02X}" for byte in char.encode())
        forms = [re.escape(char), "(?i:" + re.escape(percent) + ")"] + ([r"\+"] if char == " " else [])
        alternatives.append("(?:" + "|".join(forms) + ")")
    return re.compile("".join(alternatives))


def encode_params(params: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """PHP http_build_query brackets: {"fields": ["a", "b"]} -> fields[]=a&fields[]=b,
    {"filters": {"Stat.date": {"conditional": "X"}}} -> filters[Stat.date][conditional]=X."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, Mapping):
            pairs.extend(encode_params(value, name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Mapping):
                    raise ValueError(f"{name}: lists of objects are not supported")
                pairs.append((f"{name}[]", _scalar(item)))
        else:
            pairs.append((name, _scalar(value)))
    return pairs


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class CallWindow:
    """The rate limit as one process sees it: at most `calls` calls in any `seconds`.

    `acquire` blocks until a call may go out and returns a handle; `done(handle)` is
    called once its answer is in (or it failed), because the server counted the call no
    later than that. This one counts in this process only; SharedCallWindow
    (shared/hasoffers_rate.py) counts every process of the network together."""

    def __init__(self, calls: int = 50, seconds: float = 10.0, sleep: Callable[[float], None] = time.sleep):
        self.calls, self.seconds, self._sleep = calls, seconds, sleep
        self._recent: deque[float] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()

    def acquire(self) -> object:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._recent and self._recent[0] <= now - self.seconds:
                    self._recent.popleft()
                if len(self._recent) + self._in_flight < self.calls:
                    self._in_flight += 1
                    return None
                wait = (self._recent[0] + self.seconds - now) if self._recent else 0.05
            self._sleep(max(wait, 0.001))

    def done(self, handle: object) -> None:
        with self._lock:
            self._in_flight -= 1
            self._recent.append(time.monotonic())


class HasOffersClient:
    def __init__(
        self,
        base_url: str,
        network_id: str,
        network_token: str,
        *,
        timeout: float = 30.0,
        max_attempts: int = 5,
        backoff_seconds: float = 1.0,
        rate_limit_pause_seconds: float = 2.0,
        calls_per_window: int = 50,
        window_seconds: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        call_window: CallWindow | Any | None = None,
    ):
        if not network_id or not network_token:
            raise ValueError("HASOFFERS_NETWORK_ID and HASOFFERS_NETWORK_TOKEN must be set")
        # The network's own host (the documented form) names the network; any other URL
        # gets it in the query string as well.
        self.base_url = base_url.replace("{network_id}", network_id)
        self._query = {} if "{network_id}" in base_url else {"NetworkId": network_id}
        self.network_id = network_id
        self._token = network_token
        self._token_pattern = token_pattern(network_token)
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.rate_limit_pause_seconds = rate_limit_pause_seconds
        self._sleep = sleep
        # Stay under the network's limit (50 calls / 10 s) instead of running into it:
        # a rate-limit answer costs a whole pause, a wait here only what is needed.
        self.call_window = call_window or CallWindow(calls_per_window, window_seconds, sleep)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), transport=transport)

    @classmethod
    def from_settings(cls, settings: Any, engine: Any = None, **kwargs: Any) -> HasOffersClient:
        """With an engine, the rate limit is counted in PostgreSQL for every process of the
        network (HASOFFERS_RATE_LIMIT_SHARED, on by default); without one, per process."""
        token = settings.hasoffers_network_token.get_secret_value() if settings.hasoffers_network_token else ""
        calls, seconds = settings.hasoffers_rate_limit_calls, settings.hasoffers_rate_limit_seconds
        if engine is not None and settings.hasoffers_rate_limit_shared and "call_window" not in kwargs:
            from shared.hasoffers_rate import SharedCallWindow  # noqa: PLC0415 (needs the database)

            kwargs["call_window"] = SharedCallWindow(engine, settings.hasoffers_network_id or "", calls, seconds,
                                                     in_flight_seconds=settings.hasoffers_timeout_seconds)
        return cls(settings.hasoffers_base_url, settings.hasoffers_network_id or "", token,
                   timeout=settings.hasoffers_timeout_seconds, max_attempts=settings.hasoffers_max_attempts,
                   calls_per_window=calls, window_seconds=seconds, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HasOffersClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scrub(self, text: str) -> str:
        return self._token_pattern.sub("***", text)

    # -- the one way to call the API ----------------------------------------------------

    def call(self, target: str, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call Target.method and return `response.data`.

        Retries the rate limit, HTTP 5xx, timeouts and connection errors with back-off;
        raises HasOffersUnavailableError when they persist, HasOffersApiError on an API
        error and HasOffersResponseError on a body that is not the API's envelope.
        """
        name = f"{target}.{method}"
        form = [("NetworkToken", self._token), ("Target", target), ("Method", method),
                *encode_params(params or {})]
        body = urlencode(form).encode()
        last_problem = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                pause = (self.rate_limit_pause_seconds * attempt if last_problem.startswith("rate limit")
                         else self.backoff_seconds * 2 ** (attempt - 2))
                logger.warning("%s attempt %d/%d failed (%s); retrying in %.1fs",
                               name, attempt - 1, self.max_attempts, last_problem, pause)
                self._sleep(pause)
            handle = self.call_window.acquire()
            try:
                answer = self._http.post(self.base_url, params=self._query, content=body,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            except httpx.TimeoutException as exc:
                last_problem = f"timeout ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last_problem = self._scrub(f"connection error ({type(exc).__name__}: {exc})")
                continue
            finally:
                # Counted when the answer is in: the server saw the call before that, so
                # our window never ends earlier than the server's.
                self.call_window.done(handle)
            if answer.status_code >= 500 or answer.status_code == 429:
                last_problem = f"HTTP {answer.status_code}"
                continue
            if answer.status_code != 200:
                raise HasOffersResponseError(f"{name}: unexpected HTTP {answer.status_code}")
            response = self._envelope(name, answer)
            status = response.get("status")
            if status == 1:
                return response.get("data")
            message = self._error_message(response)
            if RATE_LIMIT_TEXT in message:
                last_problem = "rate limit exceeded"
                continue
            raise HasOffersApiError(name, self._scrub(message))
        raise HasOffersUnavailableError(f"{name}: gave up after {self.max_attempts} attempts: {last_problem}")

    def _envelope(self, name: str, answer: httpx.Response) -> dict[str, Any]:
        try:
            body = answer.json()
        except ValueError:
            snippet = self._scrub(answer.text[:80]).replace("\n", " ")
            raise HasOffersResponseError(f"{name}: response is not JSON (starts with {snippet!r})") from None
        response = body.get("response") if isinstance(body, dict) else None
        if not isinstance(response, dict):
            raise HasOffersResponseError(f"{name}: response has no 'response' object")
        return response

    @staticmethod
    def _error_message(response: dict[str, Any]) -> str:
        message = response.get("errorMessage")
        errors = response.get("errors")
        if not message and isinstance(errors, dict):  # e.g. a bad network id
            message = errors.get("publicMessage")
        if not message and isinstance(errors, list) and errors and isinstance(errors[0], dict):
            message = errors[0].get("publicMessage")
        return str(message or "unknown error")

    # -- reads ----------------------------------------------------------------------------

    def find_all(self, target: str, params: Mapping[str, Any] | None = None, page_size: int = 1000
                 ) -> Iterator[dict[str, Any]]:
        """Every record of Target.findAll, page by page (id-keyed or listed records), in id
        order unless the caller sorts: without a sort the pages of a live table overlap."""
        params = {"sort": {"id": "asc"}, **(params or {})}
        page = 1
        while True:
            data = self.call(target, "findAll", {**params, "limit": page_size, "page": page})
            if _empty(data):  # [] when nothing matches
                return
            if not isinstance(data, dict):
                raise HasOffersResponseError(f"{target}.findAll: unexpected data type {type(data).__name__}")
            yield from _records(data.get("data"))
            if page >= _page_count(data, f"{target}.findAll"):
                return
            page += 1

    def get_stats(self, params: Mapping[str, Any], page_size: int = 10000) -> Iterator[dict[str, Any]]:
        """Every row of Report.getStats once; yields each row's `Stat` object.

        The pages are asked for sorted by the report's groups (unless the caller sorts),
        so that they do not overlap; a row that still shows up again on a later page (the
        stats moved while we paged) is keyed by its group fields and replaces the first.
        Rows are yielded once every page is in."""
        groups = [str(g).partition(".")[2] or str(g) for g in params.get("groups") or []]
        if groups and not params.get("sort"):
            params = {**params, "sort": {f"Stat.{g}": "asc" for g in groups}}
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        ungrouped: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.call("Report", "getStats", {**params, "limit": page_size, "page": page})
            if _empty(data) or (isinstance(data, dict) and _empty(data.get("data"))):
                break  # an empty report: [], {}, null, or a page with no rows
            if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                raise HasOffersResponseError("Report.getStats: data.data is not a list of rows")
            for row in data["data"]:
                if not isinstance(row, dict) or not isinstance(row.get("Stat"), dict):
                    raise HasOffersResponseError("Report.getStats: a row has no Stat object")
                stat = row["Stat"]
                if groups:
                    rows[tuple(str(stat.get(g)) for g in groups)] = stat
                else:
                    ungrouped.append(stat)
            if page >= _page_count(data, "Report.getStats"):
                break
            page += 1
        yield from rows.values()
        yield from ungrouped

    def find_offer(self, offer_id: int) -> dict[str, Any] | None:
        data = self.call("Offer", "findById", {"id": offer_id, "contain": ["OfferCategory"]})
        return data or None

    # -- writes ---------------------------------------------------------------------------

    def set_affiliate_approval(self, offer_id: int, affiliate_id: int, status: str, notes: str | None = None) -> Any:
        if status not in ("approved", "rejected", "pending"):
            raise ValueError(f"invalid approval status {status!r}")
        return _applied("Offer.setAffiliateApproval", self.call(
            "Offer", "setAffiliateApproval",
            {"id": offer_id, "affiliate_id": affiliate_id, "status": status, "notes": notes}))

    def block_affiliate(self, offer_id: int, affiliate_id: int) -> Any:
        return _applied("Offer.blockAffiliate",
                        self.call("Offer", "blockAffiliate", {"id": offer_id, "affiliate_id": affiliate_id}))


def _applied(name: str, data: Any) -> Any:
    """A write's `data` when it says the change was made: true (or "1"), or the record
    written. Anything else with status 1 (false, null, "", 0, text) is a refusal."""
    if data is True or (isinstance(data, (int, str)) and not isinstance(data, bool) and str(data).strip() in ("1", "true")):
        return data
    if isinstance(data, dict) and data:
        return data
    shown = repr(data)[:60]
    raise HasOffersWriteRefusedError(name, f"answered status 1 with data {shown}: the network did not confirm "
                                           "the change (not applied)")


def _empty(data: Any) -> bool:
    return data is None or data == "" or (isinstance(data, (list, dict)) and not data)


def _page_count(data: dict[str, Any], what: str) -> int:
    if data.get("pageCount") is None and data.get("count") in (None, 0, "0"):
        return 0
    return _as_int(data.get("pageCount"), f"{what} pageCount")


def _records(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict):
        yield from (v for v in data.values() if isinstance(v, dict))
    elif isinstance(data, list):
        yield from (v for v in data if isinstance(v, dict))


def _as_int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HasOffersResponseError(f"{what} is not a number: {value!r}") from None
