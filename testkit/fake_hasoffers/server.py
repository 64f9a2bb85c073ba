"""The fake HasOffers HTTP server.

Serves `/Apiv3/json` the way the real API does: HTTP 200 with the response envelope
(the request echoed with the keys real answers carry: Target, Format, Service, Version,
Method, NetworkId and the parameters; never the token), numbers as strings, PHP
bracket parameters over GET or form POST, the network from the `NetworkId` parameter
or else from the host (`<NETWORKID>.api.hasoffers.com`), and the 50-calls-per-10-s
rate limit with the real error text, counted per network over every client. As
strict as the real API where a client could go wrong silently: report and find rows
come in no stable order unless `sort` is given (so pages overlap and miss rows), a
report without `limit` is paged at 50 rows, and `current` is the page size. Records
the write calls it receives, and injects faults on request. Control endpoints (for
the demo and for tests in another process):

    GET  /_fake/calls   the recorded write calls, as JSON
    POST /_fake/faults  {"kind": "http_500" | "rate_limit" | "slow" | "malformed" | "data" | "hold", "count": 1,
                         "method": "Offer.blockAffiliate" (optional), "seconds": 2 (slow; hold: at most),
                         "data": false (data: answer status 1 with this data, doing nothing),
                         "after": 0 (let this many matching calls through first)}
    POST /_fake/settings  {"latency": 0.2 (seconds added to every API answer),
                           "empty_shape": "paged" | "list" | "object" | "null" (an empty report's data)}
    POST /_fake/reset   forget calls and pending faults
    GET  /_fake/requests   how many times each API method was answered, as JSON
    GET  /_fake/usage   {"answered", "refused_rate_limit", "peak"}: the most calls of one
                        network inside any rate-limit window

Read methods: Report.getStats, Offer.findAll/findById, Offer.getConversionCaps,
Goal.findAll, Affiliate.findAll/findById, AffiliateUser.findAll, Employee.findAll
(see queries.py for filters, grouping and paging).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from testkit.fake_hasoffers import queries
from testkit.fake_hasoffers.network import Network
from testkit.fake_hasoffers.queries import QueryError

logger = logging.getLogger(__name__)

API_PATH = "/Apiv3/json"
FAULT_KINDS = ("http_500", "rate_limit", "slow", "malformed", "data", "hold")
EMPTY_SHAPES = ("paged", "list", "object", "null")
REPORT_DEFAULT_LIMIT = 50


class FakeApiError(Exception):
    """Answered as status -1 with this message."""


def parse_params(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """PHP-style brackets into nested dicts; `a[]` appends to a list."""
    result: dict[str, Any] = {}
    for raw_key, value in pairs:
        head, _, rest = raw_key.partition("[")
        path = [head] + ([p for p in rest.rstrip("]").split("][")] if rest else [])
        node: Any = result
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if part == "":
                if not isinstance(node, list):
                    break  # `a[]` after `a[x]`: malformed, ignore
                if last:
                    node.append(value)
                else:
                    node.append({})
                    node = node[-1]
                continue
            if not isinstance(node, dict):
                break
            if last:
                node[part] = value
            else:
                nxt = path[i + 1]
                if part not in node or not isinstance(node[part], (dict, list)):
                    node[part] = [] if nxt == "" else {}
                node = node[part]
    return result


def as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FakeApiError(f"Invalid {name}") from None


@dataclass
class Fault:
    kind: str
    count: int
    method: str | None = None  # "Target.method", or None for any
    seconds: float = 2.0
    after: int = 0  # matching calls to let through before the fault strikes
    data: Any = False  # kind "data": status 1 with this data, and nothing done


Handler = Callable[["FakeHasOffers", dict[str, Any]], Any]
HANDLERS: dict[str, Handler] = {}


def api(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


class FakeHasOffers:
    def __init__(self, network: Network | None = None, *, network_id: str = "demo",
                 network_token: str = "NETfaketoken", rate_limit: tuple[int, float] = (50, 10.0)):
        self.network = network or Network()
        self.network_id = network_id
        self.network_token = network_token
        self.rate_limit_calls, self.rate_limit_window = rate_limit
        self.lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []  # write calls, in order
        self.request_count: dict[str, int] = {}
        self.approvals: dict[tuple[int, int], str] = {}
        self.blocked: set[tuple[int, int]] = set()
        self._recent: dict[str, deque[float]] = {}  # per network: when its recent calls came
        self.answered = 0
        self.refused_rate_limit = 0
        self.peak_usage = 0
        self.latency = 0.0  # seconds added to every API answer
        self.empty_shape = "paged"
        # Models Offer.findAll refuses to contain (a network where the contain is not offered).
        self.refused_contains: set[str] = set()
        self._serial = 0  # orders unsorted answers differently on every call
        self._faults: list[Fault] = []
        # "hold": a call waits until release() (or its fault's seconds); `holding` is set
        # while one waits, a barrier for a test that needs a call in flight.
        self.holding = threading.Event()
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        # Report.getStats answers by query, so that paging through a large report does
        # not aggregate every raw row once per page. Keyed by the stats list's identity
        # and length: replace or extend network.stats (or call reset()) to see changes.
        self._reports: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        fake = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: without TCP_NODELAY every answer on a
            # kept-alive connection waits ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:  # noqa: N802
                fake._serve(self, b"")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                fake._serve(self, self.rfile.read(length))

            def log_message(self, *args: object) -> None:  # the token is in query strings
                pass

        self._server = ThreadingHTTPServer((host, port), RequestHandler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hasoffers", daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{API_PATH}"

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- control --------------------------------------------------------------------------

    def inject(self, kind: str, count: int = 1, method: str | None = None, seconds: float = 2.0,
               after: int = 0, data: Any = False) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        with self.lock:
            self._faults.append(Fault(kind, count, method, seconds, after, data))

    def configure(self, latency: float | None = None, empty_shape: str | None = None) -> None:
        if empty_shape is not None and empty_shape not in EMPTY_SHAPES:
            raise ValueError(f"unknown empty shape {empty_shape!r}; known: {', '.join(EMPTY_SHAPES)}")
        with self.lock:
            if latency is not None:
                self.latency = max(0.0, float(latency))
            if empty_shape is not None:
                self.empty_shape = empty_shape

    def usage(self) -> dict[str, int]:
        with self.lock:
            return {"answered": self.answered, "refused_rate_limit": self.refused_rate_limit,
                    "peak": self.peak_usage}

    def shuffled(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        """Without `sort`, the order of a live table is not stable between calls."""
        if params.get("sort"):
            return items
        with self.lock:
            self._serial += 1
            serial = self._serial
        items = list(items)
        random.Random(serial).shuffle(items)
        return items

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self._faults.clear()
            self._recent.clear()
            self.answered = self.refused_rate_limit = self.peak_usage = 0
            self.request_count.clear()
            self._reports.clear()

    def pending_faults(self) -> list[tuple[str, str | None, int]]:
        """The injected faults not used up yet: [(kind, method, count left)]."""
        with self.lock:
            return [(f.kind, f.method, f.count) for f in self._faults]

    def release(self) -> None:
        """Let the held calls (and any later "hold") through."""
        self._released.set()

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def requests(self, method: str) -> int:
        """How many times `Target.method` was answered (not counting refused calls)."""
        with self.lock:
            return self.request_count.get(method, 0)

    def report_rows(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        stats = self.network.stats
        key = json.dumps([id(stats), len(stats), {k: params.get(k) for k in ("fields", "groups", "filters", "sort")}],
                         sort_keys=True, default=str)
        with self.lock:
            if key in self._reports:
                self._reports.move_to_end(key)
                return self._reports[key]
        rows = queries.report(stats, params)
        with self.lock:
            self._reports[key] = rows
            while len(self._reports) > 16:
                self._reports.popitem(last=False)
        return rows

    def write_calls(self, method: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if method is None or c["method"] == method]

    # -- serving --------------------------------------------------------------------------

    def _serve(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        url = urlsplit(request.path)
        if url.path.startswith("/_fake/"):
            return self._control(request, url.path, body)
        if url.path != API_PATH:
            return self._send(request, 404, b"not found", "text/plain")
        pairs = parse_qsl(url.query, keep_blank_values=True)
        content_type = request.headers.get("Content-Type", "")
        if body and "application/x-www-form-urlencoded" in content_type:
            pairs += parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params = parse_params(pairs)
        if "NetworkId" not in params:  # the documented form: https://<NETWORKID>.api.hasoffers.com/...
            host = (request.headers.get("Host") or "").split(":")[0]
            if host.count(".") >= 1 and not host.replace(".", "").isdigit():
                params["NetworkId"] = host.split(".")[0]
        name = f"{params.get('Target', '')}.{params.get('Method', '')}"
        fault = self._take_fault(name)
        if self.latency:
            time.sleep(self.latency)
        if fault is not None:
            if fault.kind == "http_500":
                return self._send(request, 500, b"<html>Internal Server Error</html>", "text/html")
            if fault.kind == "malformed":
                return self._send(request, 200, b'{"response": {"status": 1, "data": {"pa', "application/json")
            if fault.kind == "slow":
                time.sleep(fault.seconds)
            if fault.kind == "hold":
                self.holding.set()
                self._released.wait(fault.seconds)
        self._send_json(request, self._answer(name, params, fault))

    def _answer(self, name: str, params: dict[str, Any], fault: Fault | None = None) -> dict[str, Any]:
        request_echo = {"Target": params.get("Target"), "Format": "json", "Service": "HasOffers", "Version": "2",
                        **{k: v for k, v in params.items() if k != "NetworkToken"}}
        network_id = str(params.get("NetworkId", ""))
        if network_id != self.network_id:
            return {"request": request_echo,
                    "response": {"errors": {"publicMessage": "Network id is not valid"}}}
        if params.get("NetworkToken") != self.network_token:
            return _error(request_echo, f"NetworkToken {params.get('NetworkToken', '')} is not authenticated")
        usage = self._count_call(network_id)
        if (fault is not None and fault.kind == "rate_limit") or usage > self.rate_limit_calls:
            with self.lock:
                self.refused_rate_limit += 1
            return _error(request_echo, "API usage exceeded rate limit.  Configured: "
                          f"{self.rate_limit_calls}/{int(self.rate_limit_window)}s window; Your usage: {usage}.")
        handler = HANDLERS.get(name)
        if handler is None:
            return _error(request_echo, f"Method {name} does not exist")
        with self.lock:
            self.request_count[name] = self.request_count.get(name, 0) + 1
            self.answered += 1
        if fault is not None and fault.kind == "data":  # e.g. a write answered `data: false`
            return {"request": request_echo, "response": {"status": 1, "httpStatus": 200, "data": fault.data,
                                                          "errors": [], "errorMessage": None}}
        try:
            data = handler(self, params)
        except (FakeApiError, QueryError) as exc:
            return _error(request_echo, str(exc))
        return {"request": request_echo,
                "response": {"status": 1, "httpStatus": 200, "data": data, "errors": [], "errorMessage": None}}

    def _count_call(self, network_id: str) -> int:
        """Calls of this network in the window, this one included; every client counts."""
        now = time.monotonic()
        with self.lock:
            recent = self._recent.setdefault(network_id, deque())
            while recent and recent[0] <= now - self.rate_limit_window:
                recent.popleft()
            recent.append(now)
            self.peak_usage = max(self.peak_usage, len(recent))  # refused calls included
            return len(recent)

    def _take_fault(self, name: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.method in (None, name) and fault.count > 0:
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    fault.count -= 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _control(self, request: BaseHTTPRequestHandler, path: str, body: bytes) -> None:
        try:
            if path == "/_fake/calls":
                return self._send_json(request, self.write_calls())
            if path == "/_fake/requests":
                with self.lock:
                    return self._send_json(request, dict(self.request_count))
            if path == "/_fake/usage":
                return self._send_json(request, self.usage())
            if path == "/_fake/settings":
                spec = json.loads(body or b"{}")
                self.configure(spec.get("latency"), spec.get("empty_shape"))
                return self._send_json(request, {"ok": True})
            if path == "/_fake/reset":
                self.reset()
                return self._send_json(request, {"ok": True})
            if path == "/_fake/faults":
                spec = json.loads(body or b"{}")
                self.inject(spec["kind"], int(spec.get("count", 1)), spec.get("method"),
                            float(spec.get("seconds", 2.0)), int(spec.get("after", 0)), spec.get("data", False))
                return self._send_json(request, {"ok": True})
        except (ValueError, KeyError) as exc:
            return self._send(request, 400, f"bad request: {exc}".encode(), "text/plain")
        self._send(request, 404, b"not found", "text/plain")

    def _send_json(self, request: BaseHTTPRequestHandler, payload: Any) -> None:
        self._send(request, 200, json.dumps(payload).encode(), "application/json")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def _error(request_echo: dict[str, Any], message: str) -> dict[str, Any]:
    return {"request": request_echo,
            "response": {"status": -1, "httpStatus": 200, "data": "",
                         "errors": [{"publicMessage": message}], "errorMessage": message}}


# -- API methods ------------------------------------------------------------------------


def offer_record(fake: FakeHasOffers, offer_id: int, with_categories: bool) -> dict[str, Any]:
    offer = fake.network.offers[offer_id]
    record: dict[str, Any] = {"Offer": {"id": str(offer.id), "name": offer.name, "status": offer.status,
                                        "require_approval": "1" if offer.require_approval else "0",
                                        "default_payout": f"{offer.default_payout:.2f}",
                                        "max_payout": f"{offer.max_payout:.2f}"}}
    if with_categories:
        record["OfferCategory"] = {
            str(c): {"id": str(c), "name": fake.network.categories.get(c, f"Category {c}"), "status": "active"}
            for c in offer.category_ids
        } or []
    return record


@api("Offer.findById")
def offer_find_by_id(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    offer_id = as_int(params.get("id"), "id")
    if offer_id < 0:
        raise FakeApiError("Row id is negative")
    if offer_id not in fake.network.offers:
        return None
    return offer_record(fake, offer_id, "OfferCategory" in queries.as_values(params.get("contain")))


def _approval_target(fake: FakeHasOffers, params: dict[str, Any]) -> tuple[int, int]:
    offer_id = as_int(params.get("id"), "id")
    affiliate_id = as_int(params.get("affiliate_id"), "affiliate_id")
    if offer_id not in fake.network.offers:
        raise FakeApiError(f"Offer {offer_id} not found")
    if affiliate_id not in fake.network.affiliates:
        raise FakeApiError("Failed to hydrate rows: 21")
    return offer_id, affiliate_id


@api("Offer.setAffiliateApproval")
def offer_set_affiliate_approval(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    target = _approval_target(fake, params)
    status = params.get("status")
    if status not in ("approved", "rejected", "pending"):
        raise FakeApiError(f"Invalid status {status}")
    with fake.lock:
        fake.approvals[target] = status
        fake.calls.append({"method": "Offer.setAffiliateApproval", "offer_id": target[0],
                           "affiliate_id": target[1], "status": status, "notes": params.get("notes")})
    return True


@api("Offer.blockAffiliate")
def offer_block_affiliate(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    target = _approval_target(fake, params)
    with fake.lock:
        fake.blocked.add(target)
        fake.calls.append({"method": "Offer.blockAffiliate", "offer_id": target[0], "affiliate_id": target[1]})
    return True


# -- reads ------------------------------------------------------------------------------


def _found(fake: FakeHasOffers, kept: list[tuple[int, dict[str, Any]]], params: dict[str, Any]) -> Any:
    """find* answers: id-keyed records ([] when none), or a page of them with `limit`."""
    paged = queries.page_of(fake.shuffled(kept, params), params)
    if paged is None:
        return {str(i): r for i, r in kept} or []
    chunk, paging = paged
    return {**paging, "data": {str(i): r for i, r in chunk} or []}


@api("Report.getStats")
def report_get_stats(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    rows = fake.shuffled(fake.report_rows(params), params)
    if not rows and fake.empty_shape != "paged":
        return {"list": [], "object": {}, "null": None}[fake.empty_shape]
    names = queries.report_fields(params)
    paged = queries.page_of(rows, params if params.get("limit") not in (None, "")
                            else {**params, "limit": REPORT_DEFAULT_LIMIT})
    assert paged is not None
    chunk, paging = paged
    data: dict[str, Any] = {**paging, "data": [queries.format_stat(r, names) for r in chunk]}
    if params.get("totals") not in (None, "", "0", "false"):
        data["totals"] = queries.totals(rows, names)
    return data


def _offer_caps(fake: FakeHasOffers) -> dict[int, dict[str, dict[str, str]]]:
    """Every offer's OfferConversionCap records, keyed by cap id (ids numbered over all caps)."""
    caps: dict[int, dict[str, dict[str, str]]] = {}
    for cap_id, ((o, a), cap) in enumerate(sorted(fake.network.caps.items()), start=1):
        caps.setdefault(o, {})[str(cap_id)] = {
            "id": str(cap_id), "offer_id": str(o), "affiliate_id": str(a), "conversion_cap": str(cap),
            "payout_cap": "0.00", "revenue_cap": "0.00", "monthly_conversion_cap": "0",
            "monthly_payout_cap": "0.00", "monthly_revenue_cap": "0.00"}
    return caps


@api("Offer.findAll")
def offer_find_all(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    contain = queries.as_values(params.get("contain"))
    for model in contain:
        if model in fake.refused_contains:
            raise FakeApiError(f"Invalid contain {model}")
    records = {i: offer_record(fake, i, "OfferCategory" in contain) for i in fake.network.offers}
    if "OfferConversionCap" in contain:  # the offer's caps, as a contained model: fields unwrapped
        caps = _offer_caps(fake)
        for i, record in records.items():
            record["OfferConversionCap"] = caps.get(i) or []
    for record in records.values():  # other containable models are empty in the fake
        record.update({c: [] for c in contain if c not in record and c != "Offer"})
    return _found(fake, queries.find(records, "Offer", params), params)


@api("Offer.getConversionCaps")
def offer_get_conversion_caps(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    offer_id = as_int(params.get("id"), "id")
    if offer_id < 0:
        raise FakeApiError("Row id is negative")
    if offer_id not in fake.network.offers:
        raise FakeApiError(f"Failed to hydrate rows: {offer_id}")
    caps = {cap_id: {"OfferConversionCap": cap} for cap_id, cap in _offer_caps(fake).get(offer_id, {}).items()}
    return caps or []


@api("Goal.findAll")
def goal_find_all(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    records = {g.id: {"Goal": {"id": str(g.id), "offer_id": str(g.offer_id), "name": g.name, "status": g.status}}
               for g in fake.network.goals.values()}
    return _found(fake, queries.find(records, "Goal", params), params)


def affiliate_record(fake: FakeHasOffers, affiliate_id: int) -> dict[str, Any]:
    a = fake.network.affiliates[affiliate_id]
    return {"Affiliate": {"id": str(a.id), "company": a.company, "status": a.status,
                          "account_manager_id": None if a.account_manager_id is None else str(a.account_manager_id)}}


@api("Affiliate.findAll")
def affiliate_find_all(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    records = {i: affiliate_record(fake, i) for i in fake.network.affiliates}
    return _found(fake, queries.find(records, "Affiliate", params), params)


@api("Affiliate.findById")
def affiliate_find_by_id(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    affiliate_id = as_int(params.get("id"), "id")
    if affiliate_id < 0:
        raise FakeApiError("Row id is negative")
    return affiliate_record(fake, affiliate_id) if affiliate_id in fake.network.affiliates else None


@api("AffiliateUser.findAll")
def affiliate_user_find_all(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    records = {u.id: {"AffiliateUser": {"id": str(u.id), "affiliate_id": str(u.affiliate_id), "email": u.email,
                                        "status": u.status}}
               for u in fake.network.affiliate_users.values()}
    return _found(fake, queries.find(records, "AffiliateUser", params), params)


@api("Employee.findAll")
def employee_find_all(fake: FakeHasOffers, params: dict[str, Any]) -> Any:
    records = {e.id: {"Employee": {"id": str(e.id), "email": e.email, "first_name": e.first_name,
                                   "last_name": e.last_name, "status": e.status}}
               for e in fake.network.employees.values()}
    return _found(fake, queries.find(records, "Employee", params), params)
