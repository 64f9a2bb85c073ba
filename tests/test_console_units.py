"""The console's pieces as functions: credentials, CSRF tokens, the start-up rule, the
chart's scales and drawing, the read-only connections."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from jinja2 import ChoiceLoader, DictLoader
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.exc import InternalError, OperationalError, ProgrammingError
from starlette.requests import Request
from starlette.routing import Route

from shared.console import charts
from shared.console.app import create_app
from shared.console.forms import read_form, reading, see_other, user_of, writing
from shared.console.queries import CheckPoint, StateChange
from shared.console.rendering import ago, json_response, render
from shared.console.security import Credentials, CsrfTokens
from shared.console.server import ConsoleConfigError, console_engine, credentials_for
from shared.settings import Settings
from testkit.console import running_console

T0 = datetime(2026, 11, 27, 22, 0, tzinfo=timezone.utc)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- credentials and the start-up rule --------------------------------------------------


def test_credentials_accept_only_the_exact_user_and_password():
    credentials = Credentials("ops", "s3cret:with:colons")
    assert credentials.check(basic("ops", "s3cret:with:colons")) == "ops"
    assert credentials.check("basic " + base64.b64encode(b"ops:s3cret:with:colons").decode()) == "ops"
    for header in [None, "", basic("ops", "s3cret"), basic("Ops", "s3cret:with:colons"), basic("", ""),
                   "Basic", "Basic ===", "Digest x", basic("ops", "s3cret:with:colons") + "x"]:
        assert credentials.check(header) is None, header
    assert "s3cret" not in repr(credentials)


def test_the_console_refuses_to_start_without_credentials_unless_local_and_no_auth():
    with_credentials = Settings(kpi_web_user="ops", kpi_web_password=SecretStr("pw"))
    without = Settings(kpi_web_user=None, kpi_web_password=None)
    assert credentials_for(with_credentials, "0.0.0.0", False) == Credentials("ops", "pw")
    assert credentials_for(without, "127.0.0.1", True) is None
    assert credentials_for(with_credentials, "127.0.0.1", True) is None  # asked for explicitly, on loopback
    for settings, host, no_auth in [
        (without, "127.0.0.1", False),
        (without, "0.0.0.0", False),
        (without, "0.0.0.0", True),
        (with_credentials, "0.0.0.0", True),
        (with_credentials, "localhost", True),
        (Settings(kpi_web_user="ops", kpi_web_password=SecretStr("")), "127.0.0.1", False),
        (Settings(kpi_web_user="  ", kpi_web_password=SecretStr("pw")), "127.0.0.1", False),
        (Settings(kpi_web_user="a:b", kpi_web_password=SecretStr("pw")), "127.0.0.1", False),
    ]:
        with pytest.raises(ConsoleConfigError) as raised:
            credentials_for(settings, host, no_auth)
        assert "\n" not in str(raised.value)


# --- CSRF tokens ------------------------------------------------------------------------


def test_csrf_tokens_are_bound_to_the_user_the_process_and_a_lifetime():
    now = [1_800_000_000.0]
    tokens = CsrfTokens(max_age=3600, clock=lambda: now[0])
    token = tokens.issue("ops")
    assert tokens.verify(token, "ops")
    assert not tokens.verify(token, "other")
    assert not CsrfTokens(clock=lambda: now[0]).verify(token, "ops")  # another process's secret
    issued, mac = token.split(".")
    assert not tokens.verify(f"{int(issued) + 1}.{mac}", "ops")  # the time is signed too
    assert not tokens.verify(f"{issued}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}", "ops")
    for garbage in [None, "", ".", "x.y", mac, f"-1.{mac}", "1" * 300]:
        assert not tokens.verify(garbage, "ops")
    now[0] += 3599
    assert tokens.verify(token, "ops")
    now[0] += 2
    assert not tokens.verify(token, "ops")


def test_a_secret_never_appears_in_a_token():
    secret = b"k" * 32
    token = CsrfTokens(secret=secret).issue("ops")
    assert "k" * 8 not in token and re.fullmatch(r"\d+\.[0-9a-f]{64}", token)


# --- read-only by default ---------------------------------------------------------------


def _request(method: str) -> Request:
    return Request({"type": "http", "method": method, "path": "/", "headers": [], "query_string": b""})


def test_console_connections_are_read_only_unless_a_post_writes(database_url, db):
    engine = console_engine(Settings(database_url=SecretStr(database_url)))
    try:
        with pytest.raises((InternalError, OperationalError, ProgrammingError), match="read-only"):
            with reading(engine) as conn:
                conn.execute(text("INSERT INTO administrators (email) VALUES ('a@example.com')"))
        with pytest.raises((InternalError, OperationalError, ProgrammingError), match="read-only"):
            with engine.begin() as conn:  # the pool's default too, not just reading()
                conn.execute(text("INSERT INTO administrators (email) VALUES ('a@example.com')"))
        with pytest.raises(RuntimeError, match="must not write"):
            with writing(engine, _request("GET")):
                pass
        with writing(engine, _request("POST")) as conn:
            conn.execute(text("INSERT INTO administrators (email) VALUES ('b@example.com')"))
        with reading(engine) as conn:
            assert conn.execute(text("SELECT email FROM administrators")).scalars().all() == ["b@example.com"]
    finally:
        engine.dispose()


# --- charts -----------------------------------------------------------------------------


def check(minutes: int, value: float, threshold: float = 0.005, status: str | None = None) -> CheckPoint:
    at = T0 + timedelta(minutes=minutes)
    return CheckPoint(minutes, at, value, threshold, "general", "lt",
                      status or ("PROBLEM" if value < threshold else "OK"), at)


def change(minutes: int, previous: str | None, status: str) -> StateChange:
    at = T0 + timedelta(minutes=minutes)
    return StateChange(minutes, 1, previous, status, at, 0.001, 0.005, minutes, at)


def test_chart_draws_a_point_per_check_a_mark_per_change_and_the_problem_periods():
    checks = [check(m, v) for m, v in [(0, 0.01), (30, 0.004), (60, 0.003), (90, 0.009), (120, 0.002)]]
    changes = [change(30, "OK", "PROBLEM"), change(90, "PROBLEM", "OK"), change(120, "OK", "PROBLEM")]
    chart = charts.render_chart("7", "min CR: offer 1 <b>x</b>", checks, changes, before=None)
    svg = str(chart.svg)
    assert (chart.points, chart.changes, chart.note) == (5, 3, None)
    assert svg.count('<circle class="pt') == 5 and svg.count('<circle class="pt pt-problem"') == 3
    assert svg.count('<g class="change change-problem">') == 2 and svg.count('<g class="change change-ok">') == 1
    assert svg.count('<rect class="problem-band"') == 2  # 30 -> 90, and 120 -> the end
    assert 'data-points="5" data-changes="3"' in svg
    assert "<b>" not in svg and "min CR: offer 1 &lt;b&gt;x&lt;/b&gt;" in svg
    assert 'class="threshold-line"' in svg and 'class="value-line"' in svg
    assert "OK → PROBLEM" in svg and "22:30" in svg  # a tooltip and a time tick


def test_problem_periods_start_from_the_state_before_the_window():
    start, end = T0, T0 + timedelta(hours=5)
    assert charts.problem_periods(change(-60, None, "PROBLEM"), [], start, end) == [(start, end)]
    assert charts.problem_periods(None, [], start, end) == []
    periods = charts.problem_periods(change(-60, None, "PROBLEM"), [change(60, "PROBLEM", "OK")], start, end)
    assert periods == [(start, T0 + timedelta(minutes=60))]


def test_chart_without_checks_shows_the_state_changes_or_says_there_is_no_data():
    gone = charts.render_chart("1", "t", [], [change(0, None, "PROBLEM"), change(60, "PROBLEM", "OK")], None)
    assert gone.points == 0 and gone.changes == 2 and "older than the retention period" in gone.note
    assert "older than the retention period" in str(gone.svg) and '<circle class="pt"' not in str(gone.svg)
    empty = charts.render_chart("1", "t", [], [], None)
    assert (empty.points, empty.changes, empty.note) == (0, 0, "no data") and "No checks recorded" in str(empty.svg)
    single = charts.render_chart("1", "t", [check(0, 0.5)], [], None)
    assert single.points == 1 and "nan" not in str(single.svg).lower()


def test_threshold_changes_are_drawn_as_steps():
    checks = [check(0, 0.01, 0.005), check(30, 0.01, 0.005), check(60, 0.01, 0.008), check(90, 0.01, 0.008)]
    svg = str(charts.render_chart("1", "t", checks, [], None).svg)
    path = re.search(r'class="threshold-line" clip-path="[^"]+" d="([^"]+)"', svg).group(1)
    ys = {float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", path)}
    assert len(ys) == 2  # two levels, joined by a vertical step


def test_a_recovery_value_is_drawn_as_a_step_line_with_a_gap_where_none_was_recorded():
    checks = [check(0, 0.01), replace(check(30, 0.004), recovery=0.007), replace(check(60, 0.006), recovery=0.007),
              check(90, 0.009), replace(check(120, 0.002), recovery=0.0075)]
    chart = charts.render_chart("1", "t", checks, [], None)
    svg = str(chart.svg)
    path = re.search(r'class="recovery-line" clip-path="[^"]+" d="([^"]+)"', svg).group(1)
    assert path.count("M") == 2 and path.count("L") == 4  # two runs: 30-90 (then a gap), 120 on
    assert "recovery 0.007" in svg and 'class="legend-recovery"' in svg
    plain = str(charts.render_chart("1", "t", [check(0, 0.01), check(30, 0.004)], [], None).svg)
    assert "recovery" not in plain


def test_value_ticks_are_round_numbers_covering_the_data():
    low, high, ticks, step = charts._value_domain([0.0031, 0.0049, 0.012])
    assert (low, step) == (0.002, 0.002) and high == pytest.approx(0.014)
    assert [charts.format_value(t, step) for t in ticks] == ["0.002", "0.004", "0.006", "0.008", "0.010", "0.012",
                                                             "0.014"]
    low, high, ticks, step = charts._value_domain([5.0])  # one value: a range around it
    assert (low, high, step) == (4.25, 5.75, 0.25) and charts.format_value(ticks[1], step) == "4.50"
    assert charts.format_value(-0.0, 0.5) == "0" and charts.format_value(120.0, 20) == "120"
    assert charts.format_value(0.0075, 0.0025) == "0.0075"


def test_time_ticks_are_readable_in_utc():
    day = charts.time_ticks(T0, T0 + timedelta(hours=24))
    assert [label for _, label, _ in day] == ["00:00", "03:00", "06:00", "09:00", "12:00", "15:00", "18:00", "21:00"]
    assert day[0][2] == "Nov 28" and all(second == "" for _, _, second in day[1:])
    month = charts.time_ticks(T0, T0 + timedelta(days=30))
    assert all(at.weekday() == 0 for at, _, _ in month) and month[0][1] == "Nov 30" and month[0][2] == "2026"
    year = charts.time_ticks(T0, T0 + timedelta(days=400))
    assert all(at.day == 1 for at, _, _ in year) and len(year) <= 8


def test_ago_reads_like_a_person_would_say_it():
    now = T0
    assert ago(now - timedelta(seconds=5), now) == "5 s ago"
    assert ago(now - timedelta(minutes=12), now) == "12 min ago"
    assert ago(now - timedelta(hours=3, minutes=5), now) == "3 h 05 min ago"
    assert ago(now - timedelta(hours=3), now) == "3 h ago"
    assert ago(now - timedelta(days=4, hours=1), now) == "4 d ago"


# --- responses --------------------------------------------------------------------------


def test_json_twins_write_null_for_values_json_cannot_hold():
    body = json_response({"value": float("nan"), "items": [float("inf"), 1.5, {"x": float("-inf")}]}).body
    assert json.loads(body) == {"value": None, "items": [None, 1.5, {"x": None}]}


def test_an_unexpected_error_answers_500_with_the_security_headers_and_no_traceback():
    def broken(request):
        raise RuntimeError("secret detail of a bug")

    app = create_app(None, credentials=None, bus_factory=lambda: None, routes=[Route("/broken", broken)])
    with running_console(app) as base:
        response = httpx.get(base + "/broken")
    assert response.status_code == 500 and "secret detail" not in response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]


def test_a_form_posts_with_the_token_its_page_carries_and_the_view_reads_its_fields():
    """The mechanism the forms of silences and held rejects use, end to end, on a route
    that exists only in this test: the page renders csrf_field(), the POST carries it,
    CsrfMiddleware checks it and the view reads the fields and the user."""

    def form_page(request):
        return render(request, "form_test.html", {})

    def post(request):
        assert read_form(request)["reason"] == "maintenance & <tests>"
        return see_other(f"/done?by={user_of(request)}")

    tokens = CsrfTokens()
    app = create_app(None, credentials=Credentials("ops", "pw"), csrf=tokens, bus_factory=lambda: None,
                     routes=[Route("/form", form_page), Route("/form", post, methods=["POST"])])
    app.state.templates.loader = ChoiceLoader([
        DictLoader({"form_test.html": '<form method="post">{{ csrf_field() }}</form>'}),
        app.state.templates.loader,
    ])
    with running_console(app) as base, httpx.Client(base_url=base, auth=("ops", "pw")) as client:
        page = client.get("/form").text
        token = re.search(r'<input type="hidden" name="csrf_token" value="([^"]+)">', page).group(1)
        assert tokens.verify(token, "ops")
        posted = client.post("/form", data={"csrf_token": token, "reason": "maintenance & <tests>"})
        assert posted.status_code == 303 and posted.headers["location"] == "/done?by=ops"
        assert client.post("/form", data={"reason": "x"}).status_code == 403
