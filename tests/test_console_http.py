"""The console over HTTP: a real uvicorn server, a real (seeded) PostgreSQL database
of its own, the real RabbitMQ for the dead letters."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text

from shared.console.app import create_app
from shared.console.charts import SCOPE_LABELS, format_number
from shared.console.security import Credentials, CsrfTokens
from shared.console.server import console_engine
from shared.db import make_engine
from shared.rabbitmq import H_REASON, H_ROUTING_KEY, BrokerUnavailableError, Bus, queue_names
from shared.settings import Settings
from testkit.broker import temporary_exchange
from testkit.console import running_console
from testkit.console_world import seed_console_world
from testkit.database import temporary_database
from tests.support import AMQP_URL, PG_ADMIN_URL, queue_depth

USER, PASSWORD = "operator", "correct horse battery staple"
HOSTILE_OFFER = '<script>alert("offer")</script> Bonus & "Deals"'
HOSTILE_COMPANY = "<script>alert('company')</script> Media <b>Ltd</b>"
PAGES = ["/", "/api/problems", "/loads", "/api/loads", "/dead", "/api/dead"]


@dataclass
class Console:
    url: str
    engine: Engine      # read-write, for the test's own setup and checks
    tokens: CsrfTokens
    hostile: tuple[int, int]               # (offer, affiliate) of a pair in PROBLEM with hostile names
    retention: tuple[int, int, int]        # (trigger, offer, affiliate) whose checks were dropped

    def client(self, auth: tuple[str, str] | None = (USER, PASSWORD)) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=auth, timeout=20)


@pytest.fixture(scope="module")
def console() -> Iterator[Console]:
    with (temporary_database(PG_ADMIN_URL, "kpi_console") as url,
          temporary_exchange(AMQP_URL, "kpi.test.console") as exchange):
        yield from _console(url, exchange)


def _console(url: str, exchange: str) -> Iterator[Console]:
    engine = make_engine(url)
    read_only = None
    try:
        with engine.begin() as conn:
            seed_console_world(conn, offers=8, affiliates=6, rounds=48)
            offer_id, affiliate_id = conn.execute(text(
                "SELECT offer_id, affiliate_id FROM trigger_states WHERE status = 'PROBLEM' "
                "ORDER BY since DESC, trigger_id, offer_id, affiliate_id LIMIT 1")).one()
            conn.execute(text("UPDATE offers SET name = :name WHERE id = :id"), {"name": HOSTILE_OFFER, "id": offer_id})
            conn.execute(text("UPDATE affiliates SET company = :name WHERE id = :id"),
                         {"name": HOSTILE_COMPANY, "id": affiliate_id})
            # Hysteresis on 'min CR' (trigger 1) for the hostile pair's latest 24 checks.
            conn.execute(text("UPDATE triggers SET for_checks = 2 WHERE id = 1"))
            conn.execute(text(
                "UPDATE trigger_checks SET recovery = 0.007 WHERE trigger_id = 1 AND offer_id = :o AND affiliate_id = :a "
                "AND measured_at >= (SELECT max(measured_at) - interval '690 minutes' FROM trigger_checks)"),
                {"o": offer_id, "a": affiliate_id})
            # A pair whose checks of one trigger are gone (retention) while its state changes remain.
            retention = conn.execute(text(
                "SELECT trigger_id, offer_id, affiliate_id FROM trigger_events "
                "WHERE (offer_id, affiliate_id) <> (:o, :a) GROUP BY 1, 2, 3 HAVING count(*) >= 2 "
                "ORDER BY count(*) DESC, 1, 2, 3 LIMIT 1"), {"o": offer_id, "a": affiliate_id}).one()
            conn.execute(text("DELETE FROM trigger_checks "
                              "WHERE trigger_id = :t AND offer_id = :o AND affiliate_id = :a"),
                         dict(zip("toa", retention)))
        settings = Settings(database_url=SecretStr(url), amqp_url=SecretStr(AMQP_URL), kpi_exchange=exchange)
        read_only = console_engine(settings)
        tokens = CsrfTokens()
        app = create_app(read_only, credentials=Credentials(USER, PASSWORD), csrf=tokens,
                         bus_factory=lambda: Bus(AMQP_URL, exchange).connect())
        with running_console(app) as base:
            yield Console(base, engine, tokens, (offer_id, affiliate_id), tuple(retention))
    finally:
        if read_only is not None:
            read_only.dispose()
        engine.dispose()


def all_paths(console: Console) -> list[str]:
    offer_id, affiliate_id = console.hostile
    return [*PAGES, f"/pairs/{offer_id}/{affiliate_id}", f"/api/pairs/{offer_id}/{affiliate_id}",
            "/static/console.css", "/static/favicon.svg", "/no-such-page", "/pairs/1/999999"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- authentication ---------------------------------------------------------------------


def test_every_path_answers_401_without_valid_credentials(console):
    bad_headers = [
        {},
        {"Authorization": basic(USER, "wrong")},
        {"Authorization": basic("someone", PASSWORD)},
        {"Authorization": basic(USER, PASSWORD + "x")},
        {"Authorization": basic(USER, "")},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + base64.b64encode(b"no colon").decode()},
        {"Authorization": "Bearer " + PASSWORD},
    ]
    with console.client(auth=None) as client:
        for path in all_paths(console):
            for method in ("GET", "POST", "HEAD"):
                for headers in bad_headers:
                    response = client.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"].startswith('Basic realm="')
                    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_valid_credentials_open_every_page_with_security_headers(console):
    with console.client() as client:
        for path in all_paths(console)[:-2]:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text[:300])
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-store"
        assert client.get("/no-such-page").status_code == 404
        assert client.get("/pairs/1/999999").status_code == 404
        assert client.get("/api/pairs/1/999999").json()["error"].startswith("Nothing recorded")
        assert client.get("/pairs/1/99999999999").status_code == 404


def test_pages_serve_no_external_asset(console):
    with console.client() as client:
        offer_id, affiliate_id = console.hostile
        for path in ["/", f"/pairs/{offer_id}/{affiliate_id}", "/loads", "/dead"]:
            html = client.get(path).text
            for url in re.findall(r'(?:href|src)="([^"]*)"', html):
                assert url.startswith(("/", "#")) and not url.startswith("//"), (path, url)
            assert "<script" not in html.replace("&lt;script", "")


# --- CSRF -------------------------------------------------------------------------------


def test_a_post_without_a_valid_csrf_token_is_refused(console):
    """No page of this part takes a POST yet, but every POST meets the CSRF check before
    routing: refused with 403 without a valid token, let through to routing (405: no
    such form here) with one."""
    other_user = CsrfTokens()  # another process's secret: its tokens are worthless here
    expired = CsrfTokens(clock=lambda: 0.0)
    forged = console.tokens.issue(USER).split(".")[0] + "." + "0" * 64
    with console.client() as client:
        form = "application/x-www-form-urlencoded"
        for token in [None, "", "garbage", forged, console.tokens.issue("someone else"), other_user.issue(USER),
                      expired.issue(USER)]:
            body = "" if token is None else f"csrf_token={token}&reason=x"
            response = client.post("/", content=body, headers={"Content-Type": form})
            assert response.status_code == 403, token
            assert "CSRF" in response.text
            response = client.post("/api/problems", headers={"X-CSRF-Token": token or ""})
            assert response.status_code == 403
        good = console.tokens.issue(USER)
        response = client.post("/", content=f"csrf_token={good}", headers={"Content-Type": form})
        assert response.status_code == 405
        assert client.post("/api/problems", headers={"X-CSRF-Token": good}).status_code == 405
        too_big = "csrf_token=" + good + "&x=" + "a" * 70_000
        assert client.post("/", content=too_big, headers={"Content-Type": form}).status_code == 413


# --- escaping ---------------------------------------------------------------------------


def test_hostile_offer_and_company_names_are_escaped_in_html_and_svg(console):
    offer_id, affiliate_id = console.hostile
    with console.client() as client:
        problems = client.get("/", params={"offer": str(offer_id), "affiliate": str(affiliate_id)}).text
        pair = client.get(f"/pairs/{offer_id}/{affiliate_id}").text
        api = client.get("/api/problems", params={"offer": str(offer_id)}).json()
    for html in (problems, pair):
        assert "<script>alert(" not in html and "<b>Ltd</b>" not in html
        assert "&lt;script&gt;alert(&#34;offer&#34;)&lt;/script&gt; Bonus &amp; &#34;Deals&#34;" in html
        assert "&lt;script&gt;alert(&#39;company&#39;)&lt;/script&gt; Media &lt;b&gt;Ltd&lt;/b&gt;" in html
    svgs = re.findall(r"<svg class=\"chart\".*?</svg>", pair, re.S)
    assert svgs, "the pair page has charts"
    for svg in svgs:
        assert "<script" not in svg and "<b>" not in svg
        assert 'aria-label="' in svg and "&lt;script&gt;alert(&#34;offer&#34;)" in svg
        assert "&lt;script&gt;alert(&#39;company&#39;)" in svg
    # JSON carries the names as they are (a JSON string is not HTML).
    assert {p["offer_name"] for p in api["problems"]} == {HOSTILE_OFFER}


# --- the JSON twins agree with the pages ------------------------------------------------


class Rows(HTMLParser):
    """The rows of every <tbody>: their attributes and their cells' text."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append((dict(attrs), []))
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_rows(html: str) -> list[tuple[dict[str, str], list[str]]]:
    parser = Rows()
    parser.feed(html)
    return parser.rows


def test_problems_json_agrees_with_the_page(console):
    with console.client() as client:
        for params in [{}, {"trigger": "1"}, {"per_page": "5", "page": "2"}, {"offer": "casino"}]:
            html = client.get("/", params=params).text
            api = client.get("/api/problems", params=params).json()
            rows = table_rows(html)
            assert len(rows) == len(api["problems"]) > 0, params
            for (attrs, cells), problem in zip(rows, api["problems"]):
                assert (int(attrs["data-offer-id"]), int(attrs["data-affiliate-id"]), int(attrs["data-trigger-id"])) \
                    == (problem["offer_id"], problem["affiliate_id"], problem["trigger_id"])
                assert cells[0] == problem["trigger"]
                assert cells[1] == f"#{problem['offer_id']} {problem['offer_name']}"
                assert cells[2] == f"#{problem['affiliate_id']} {problem['affiliate_company']}"
                assert cells[3] == format_number(problem["value"])
                assert cells[4].endswith(format_number(problem["threshold"]))
                assert cells[5] == SCOPE_LABELS.get(problem["threshold_scope"], "–")
                assert cells[6].startswith(problem["since"][:16].replace("T", " "))
            assert f'<span class="count">{api["total"]}</span>' in html
            for trigger in api["triggers"]:
                card = re.search(rf'data-trigger-id="{trigger["trigger_id"]}">(.*?)</a>', html, re.S).group(1)
                assert f">{trigger['problem']}</span> PROBLEM" in card and f"{trigger['ok']} OK" in card


def test_pair_json_agrees_with_the_page(console):
    offer_id, affiliate_id = console.hostile
    with console.client() as client:
        html = client.get(f"/pairs/{offer_id}/{affiliate_id}").text
        api = client.get(f"/api/pairs/{offer_id}/{affiliate_id}").json()
    assert (api["offer_id"], api["offer_name"], api["affiliate_company"]) == (offer_id, HOSTILE_OFFER, HOSTILE_COMPANY)
    sections = re.findall(r'<section class="card trigger-section" id="trigger-(\d+)".*?</section>', html, re.S)
    assert [int(s) for s in sections] == [t["trigger_id"] for t in api["triggers"]]
    for trigger in api["triggers"]:
        section = re.search(rf'id="trigger-{trigger["trigger_id"]}".*?</section>', html, re.S).group(0)
        svg = re.search(r"<svg class=\"chart\".*?</svg>", section, re.S).group(0)
        assert f'data-points="{trigger["chart"]["points"]}"' in svg
        assert f'data-changes="{trigger["chart"]["state_changes"]}"' in svg
        assert svg.count('<circle class="pt') == trigger["chart"]["points"] == trigger["checks"]["total"] == 48
        assert svg.count('<g class="change ') == len(trigger["chart"]["changes"])
        assert f"Checks <span class=\"muted\">({trigger['checks']['total']})</span>" in section
        checks = table_rows(section)
        assert [cells[1] for _, cells in checks] == [format_number(c["value"]) for c in trigger["checks"]["items"]]
    page_runs = [int(r) for r in re.findall(r'data-operation-run-id="(\d+)"', html)]
    assert page_runs == [r["operation_run_id"] for r in api["operation_runs"]]
    page_changes = [int(e) for e in re.findall(r'data-trigger-event-id="(\d+)"', html)]
    assert page_changes == [e["trigger_event_id"] for e in api["state_changes"]] and page_changes


def test_loads_json_agrees_with_the_page(console):
    with console.client() as client:
        for params in [{}, {"page": "2", "per_page": "20"}]:
            html = client.get("/loads", params=params).text
            api = client.get("/api/loads", params=params).json()
            page_ids = [int(i) for i in re.findall(r'data-load-run-id="(\d+)"', html)]
            assert page_ids == [load["id"] for load in api["loads"]] and page_ids
            assert page_ids == sorted(page_ids, reverse=True)
        failed = [load for load in client.get("/api/loads", params={"per_page": "500"}).json()["loads"]
                  if load["status"] == "failed"]
        assert failed and all(load["attempts"] == 6 and load["error"] for load in failed)


# --- problems: filters and pages --------------------------------------------------------


def test_problems_filters_and_pages(console):
    with console.client() as client:
        everything = client.get("/api/problems", params={"per_page": "500"}).json()
        all_rows = everything["problems"]
        assert everything["total"] == len(all_rows) > 10
        since = [p["since"] for p in all_rows]
        assert since == sorted(since, reverse=True)
        with console.engine.connect() as conn:
            expected = conn.execute(text("SELECT count(*) FROM trigger_states WHERE status = 'PROBLEM'")).scalar()
        assert everything["total"] == expected

        by_trigger = client.get("/api/problems", params={"trigger": "3", "per_page": "500"}).json()
        assert by_trigger["problems"] and {p["trigger_id"] for p in by_trigger["problems"]} == {3}
        assert by_trigger["total"] == sum(1 for p in all_rows if p["trigger_id"] == 3)

        offer_id = all_rows[0]["offer_id"]
        by_offer = client.get("/api/problems", params={"offer": str(offer_id), "per_page": "500"}).json()["problems"]
        assert by_offer == [p for p in all_rows if p["offer_id"] == offer_id]
        by_name = client.get("/api/problems", params={"offer": "CASINO", "per_page": "500"}).json()["problems"]
        assert by_name and all("Casino" in p["offer_name"] for p in by_name)
        affiliate = all_rows[-1]["affiliate_id"]
        by_affiliate = client.get("/api/problems", params={"affiliate": str(affiliate), "per_page": "500"}).json()
        assert by_affiliate["problems"] == [p for p in all_rows if p["affiliate_id"] == affiliate]
        nothing = client.get("/api/problems", params={"offer": "100%_no such"}).json()
        assert nothing["problems"] == [] and nothing["total"] == 0
        assert "No pair in PROBLEM matches these filters." in client.get("/", params={"offer": "zzz"}).text

        page2 = client.get("/api/problems", params={"per_page": "5", "page": "2"}).json()
        assert page2["problems"] == all_rows[5:10] and page2["pages"] == -(-len(all_rows) // 5)
        html = client.get("/", params={"per_page": "5", "page": "2"}).text
        assert "page 2 of" in html and 'href="/?per_page=5&amp;page=3"' in html

        for bad in [{"page": "0"}, {"page": "x"}, {"trigger": "-1"}, {"per_page": "501"}, {"offer": "x" * 101}]:
            response = client.get("/api/problems", params=bad)
            assert response.status_code == 400 and "error" in response.json(), bad
            assert client.get("/", params=bad).status_code == 400


# --- a pair -----------------------------------------------------------------------------


def test_pair_checks_are_paginated(console):
    offer_id, affiliate_id = console.hostile
    with console.client() as client:
        first = client.get(f"/api/pairs/{offer_id}/{affiliate_id}").json()["triggers"][0]
        trigger_id = first["trigger_id"]
        second = client.get(f"/api/pairs/{offer_id}/{affiliate_id}",
                            params={"trigger": str(trigger_id), "checks_page": "2"}).json()["triggers"][0]
    assert first["checks"]["page"] == 1 and second["checks"]["page"] == 2
    assert first["checks"]["pages"] == 3  # 48 checks, 20 a page
    newest_first = [c["measured_at"] for c in first["checks"]["items"] + second["checks"]["items"]]
    assert newest_first == sorted(newest_first, reverse=True) and len(set(newest_first)) == 40


def test_a_chart_says_when_the_checks_are_older_than_retention(console):
    trigger_id, offer_id, affiliate_id = console.retention
    with console.engine.connect() as conn:
        changes = conn.execute(text("SELECT count(*) FROM trigger_events WHERE trigger_id = :t AND offer_id = :o "
                                    "AND affiliate_id = :a"), {"t": trigger_id, "o": offer_id, "a": affiliate_id}
                               ).scalar()
    with console.client() as client:
        html = client.get(f"/pairs/{offer_id}/{affiliate_id}").text
        api = client.get(f"/api/pairs/{offer_id}/{affiliate_id}").json()
    chart = next(t["chart"] for t in api["triggers"] if t["trigger_id"] == trigger_id)
    assert chart["points"] == 0 and chart["state_changes"] == changes >= 2
    assert "older than the retention period" in chart["note"]
    section = re.search(rf'id="trigger-{trigger_id}".*?</section>', html, re.S).group(0)
    assert "older than the retention period" in section
    assert section.count('<g class="change ') == changes and '<circle class="pt"' not in section
    # The other triggers of the pair still have their checks.
    assert all(t["chart"]["points"] == 48 for t in api["triggers"] if t["trigger_id"] != trigger_id)


# --- dead letters -----------------------------------------------------------------------


def test_dead_letters_are_listed_without_being_consumed(console, exchange):
    bus = Bus(AMQP_URL, exchange).connect()
    dead = queue_names(exchange, "trigger_checker").dead
    try:
        for i in range(3):
            bus.send_to_queue(dead, json.dumps({"n": i}).encode(), message_id=f"m-{i}", type="metric.loaded",
                              headers={H_REASON: f"data.metrics.{i}.value: NaN <script>x</script>",
                                       H_ROUTING_KEY: "metric.loaded"})
        app = create_app(console.engine, credentials=None,
                         bus_factory=lambda: Bus(AMQP_URL, exchange).connect())
        with running_console(app) as base, httpx.Client(base_url=base, timeout=20) as client:
            html = client.get("/dead", params={"limit": "2"}).text
            api = client.get("/api/dead").json()
        assert queue_depth(dead) == 3
    finally:
        bus.close()
    services = {s["service"]: s for s in api["services"]}
    assert services["trigger_checker"]["count"] == 3 and services["metric_loader"]["count"] == 0
    # A quorum queue puts what a peek hands back at its end: the order of a dead queue is
    # not kept, only its content.
    letters = {d["message_id"]: d for d in services["trigger_checker"]["letters"]}
    assert sorted(letters) == ["m-0", "m-1", "m-2"]
    assert letters["m-1"]["reason"] == "data.metrics.1.value: NaN <script>x</script>"
    section = re.search(r'data-service="trigger_checker".*?</section>', html, re.S).group(0)
    assert "the first 2 shown" in section and "m-1" in section and "m-2" not in section
    assert "NaN &lt;script&gt;x&lt;/script&gt;" in section and "<script>x" not in html


def test_dead_page_says_when_rabbitmq_is_unreachable(console):
    def unreachable() -> Bus:
        raise BrokerUnavailableError("RabbitMQ not reachable at amqp://127.0.0.1:1/")

    app = create_app(console.engine, credentials=None, bus_factory=unreachable)
    with running_console(app) as base, httpx.Client(base_url=base, timeout=20) as client:
        page = client.get("/dead")
        api = client.get("/api/dead")
    assert page.status_code == api.status_code == 503
    assert "RabbitMQ is not reachable" in page.text and api.json()["error"].startswith("RabbitMQ is not reachable")


def test_a_pair_page_draws_the_recovery_value_where_the_checks_recorded_one(console):
    offer_id, affiliate_id = console.hostile
    with console.client() as client:
        html = client.get(f"/pairs/{offer_id}/{affiliate_id}").text
        api = client.get(f"/api/pairs/{offer_id}/{affiliate_id}", params={"trigger": "1"}).json()
    section = re.search(r'id="trigger-1".*?</section>', html, re.S).group(0)
    path = re.search(r'<path class="recovery-line" clip-path="[^"]+" d="([^"]+)"', section).group(1)
    assert path.startswith("M") and path.count("M") == 1  # drawn from the first check that recorded one
    assert path.count("L") == 2 * 24 - 1
    assert 'class="legend-recovery"' in section and "recovery 0.007" in section  # the legend, a tooltip
    assert "for 2 checks in a row" in section and "back to OK only past the recovery value" in section
    assert re.search(r"<dt>recovery</dt><dd>0.007</dd>", section)
    trigger = next(t for t in api["triggers"] if t["trigger_id"] == 1)
    assert (trigger["for_checks"], trigger["recovery"]) == (2, 0.007)
    assert [c["recovery"] for c in trigger["checks"]["items"]] == [0.007] * 20
    assert [cells[3] for _, cells in table_rows(section)] == ["0.007"] * 20
    # Another trigger of the pair, without a recovery value, draws none.
    other = re.search(r'id="trigger-(?!1")\d+".*?</section>', html, re.S).group(0)
    assert "recovery-line" not in other and "legend-recovery" not in other
