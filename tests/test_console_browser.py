"""The console in a real browser: Debian's chromium driven by Playwright (the system's
executable; Playwright downloads no browser). scripts/ensure-browser.sh installs chromium
where it is missing (CI runs it); without one these tests are skipped, saying so."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text

from shared.console.app import create_app
from shared.console.security import Credentials
from shared.console.server import console_engine
from shared.db import make_engine
from shared.rabbitmq import Bus
from shared.settings import Settings
from testkit.broker import temporary_exchange
from testkit.console import CHROMIUM_ARGS, chromium_path, running_console
from testkit.console_world import seed_console_world
from testkit.database import temporary_database
from tests.support import AMQP_URL, PG_ADMIN_URL

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on this machine: run scripts/ensure-browser.sh (apt-get install chromium) or set "
           "KPI_TEST_CHROMIUM to a chromium executable",
)

USER, PASSWORD = "ops", "browser test password"
ROUNDS = 48


@dataclass
class Served:
    base: str
    trigger_id: int
    offer_id: int
    affiliate_id: int
    changes: int   # state changes of (trigger, pair)
    held_run: int  # a reject held by the hourly cap
    engine: Engine  # read-write, for the test's checks


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with (temporary_database(PG_ADMIN_URL, "kpi_browser") as url,
          temporary_exchange(AMQP_URL, "kpi.test.browser") as exchange):
        yield from _served(url, exchange)


def _served(url: str, exchange: str) -> Iterator[Served]:
    engine = make_engine(url)
    console = None
    try:
        with engine.begin() as conn:
            seed_console_world(conn, offers=8, affiliates=6, rounds=ROUNDS)
            trigger_id, offer_id, affiliate_id = conn.execute(text(
                "SELECT trigger_id, offer_id, affiliate_id FROM trigger_states WHERE status = 'PROBLEM' "
                "ORDER BY since DESC, trigger_id, offer_id, affiliate_id LIMIT 1")).one()
            changes = conn.execute(text(
                "SELECT count(*) FROM trigger_events WHERE trigger_id = :t AND offer_id = :o AND affiliate_id = :a"),
                {"t": trigger_id, "o": offer_id, "a": affiliate_id}).scalar_one()
            held_run = conn.execute(text(
                "UPDATE operation_runs SET status = 'held', detail = 'held: the hourly cap', finished_at = now() "
                "WHERE id = (SELECT min(id) FROM operation_runs WHERE kind = 'reject_affiliate') RETURNING id"
            )).scalar_one()
        Bus(AMQP_URL, exchange).connect().close()  # the queues a release publishes to
        console = console_engine(Settings(database_url=SecretStr(url)))
        app = create_app(console, credentials=Credentials(USER, PASSWORD),
                         bus_factory=lambda: Bus(AMQP_URL, exchange).connect())
        with running_console(app) as base:
            yield Served(base, trigger_id, offer_id, affiliate_id, changes, held_run, engine)
    finally:
        if console is not None:
            console.dispose()
        engine.dispose()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_without_valid_credentials_the_browser_is_not_let_in(served, browser):
    for credentials in [None, {"username": USER, "password": "wrong"}]:
        context = browser.new_context(http_credentials=credentials)
        try:
            page = context.new_page()
            # Headless chromium answers the challenge with what it was given and shows the
            # 401, or, given nothing, cancels the navigation.
            try:
                response = page.goto(served.base + "/")
                assert response.status == 401 and "Pairs in PROBLEM" not in response.text()
            except sync_api.Error as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
            response = context.request.get(served.base + "/")
            assert response.status == 401 and response.headers["www-authenticate"].startswith("Basic")
            assert "Pairs in PROBLEM" not in response.text()
        finally:
            context.close()


def test_log_in_find_a_pair_in_problem_and_its_chart(served, browser):
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1360, "height": 900})
    page = context.new_page()
    problems = []  # anything the browser complains about: CSP violations, failed loads, errors
    page.on("console", lambda message: problems.append(message.text) if message.type in ("error", "warning") else None)
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
    try:
        response = page.goto(served.base + "/")
        assert response.status == 200
        expect = sync_api.expect
        expect(page.locator("h1")).to_contain_text("Pairs in PROBLEM")

        # Narrow the table to the trigger with the filter form, then find the pair's row.
        page.select_option("select[name=trigger]", str(served.trigger_id))
        page.click("form.filters button[type=submit]")
        page.wait_for_url(f"**/?trigger={served.trigger_id}*")
        rows = page.locator("table.problems tbody tr")
        expect(rows.first).to_be_visible()
        assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.triggerId)")) == {str(served.trigger_id)}
        row = page.locator(f'tr[data-offer-id="{served.offer_id}"][data-affiliate-id="{served.affiliate_id}"]'
                           f'[data-trigger-id="{served.trigger_id}"]')
        expect(row).to_have_count(1)
        expect(row.locator(".badge-problem, .value-problem")).to_have_count(1)

        row.locator("a.open").click()
        page.wait_for_url(f"**/pairs/{served.offer_id}/{served.affiliate_id}")
        chart = page.locator(f"#trigger-{served.trigger_id} svg.chart")
        expect(chart).to_be_visible()
        expect(chart.locator("circle.pt")).to_have_count(ROUNDS)
        expect(chart.locator("g.change")).to_have_count(served.changes)
        assert served.changes >= 1
        assert chart.get_attribute("data-points") == str(ROUNDS)
        assert chart.get_attribute("data-changes") == str(served.changes)
        expect(chart.locator("g.change-problem")).not_to_have_count(0)  # the pair is in PROBLEM now
        expect(chart.locator("rect.problem-band")).not_to_have_count(0)
        assert "→ PROBLEM" in chart.locator("g.change-problem title").last.text_content()

        # Drawn as designed: the stylesheet applies under the CSP, the chart fills the card.
        box = chart.bounding_box()
        assert box["width"] > 900 and box["height"] > 250
        stroke = chart.locator("polyline.value-line").evaluate("line => getComputedStyle(line).stroke")
        assert stroke == "rgb(37, 99, 235)"
        expect(page.locator(f"#trigger-{served.trigger_id} .badge-problem").first).to_be_visible()

        # The checks behind the chart, one click away.
        page.locator(f"#trigger-{served.trigger_id} details.checks summary").click()
        expect(page.locator(f"#trigger-{served.trigger_id} details.checks tbody tr")).to_have_count(20)
        assert problems == []
    finally:
        context.close()


def _logged_in(browser):
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1360, "height": 900})
    return context, context.new_page()


def test_add_a_silence_through_the_form_and_see_it_listed(served, browser):
    context, page = _logged_in(browser)
    expect = sync_api.expect
    try:
        page.goto(served.base + "/")
        page.click("nav.nav a[href='/silences']")
        page.wait_for_url("**/silences")
        expect(page.locator("h1")).to_contain_text("Silences")

        # A mistake first: no reason. The page says so and keeps what was typed.
        page.select_option("select[name=trigger]", "min CR")
        page.fill("input[name=offer]", str(served.offer_id))
        page.fill("input[name=for]", "2h")
        page.click("form.silence-form button[type=submit]")
        expect(page.locator(".form-error")).to_have_text("a silence needs a reason")
        expect(page.locator("input[name=offer]")).to_have_value(str(served.offer_id))

        page.fill("input[name=reason]", "offer paused by the advertiser")
        page.click("form.silence-form button[type=submit]")
        page.wait_for_url("**/silences?added=*")
        silence_id = int(page.url.rsplit("=", 1)[1])
        expect(page.locator(".notice")).to_have_text(f"Silence {silence_id} added.")
        row = page.locator(f"tr[data-silence-id='{silence_id}']")
        expect(row).to_contain_text("min CR")
        expect(row).to_contain_text("offer paused by the advertiser")
        expect(row).to_contain_text(USER)
        with served.engine.connect() as conn:
            recorded = conn.execute(text("SELECT offer_id, created_by, ends_at > now() FROM silences WHERE id = :id"),
                                    {"id": silence_id}).one()
        assert tuple(recorded) == (served.offer_id, USER, True)

        row.locator("button", has_text="End").click()
        page.wait_for_url(f"**/silences?ended_ids={silence_id}")
        expect(page.locator(f"tr[data-silence-id='{silence_id}']")).to_have_count(0)
    finally:
        context.close()


def test_release_a_held_reject(served, browser):
    context, page = _logged_in(browser)
    expect = sync_api.expect
    try:
        page.goto(served.base + "/held")
        row = page.locator(f"tr[data-run-id='{served.held_run}']")
        expect(row).to_have_count(1)
        row.locator("button.release").click()
        page.wait_for_url(f"**/held?released={served.held_run}")
        expect(page.locator(".notice")).to_contain_text(f"Released run {served.held_run}")
        expect(page.locator(f"tr[data-run-id='{served.held_run}']")).to_have_count(0)
        with served.engine.connect() as conn:
            status, decided_by = conn.execute(text("SELECT status, decided_by FROM operation_runs WHERE id = :id"),
                                              {"id": served.held_run}).one()
        assert (status, decided_by) == ("pending", USER)
    finally:
        context.close()
