"""The console's pages that change something, over HTTP: silences (add, end) and held
rejects (release, discard). A real uvicorn server, a seeded database of its own, the
real RabbitMQ (a released run's event is published)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, text

from shared.console.app import create_app
from shared.console.security import Credentials, CsrfTokens
from shared.console.server import console_engine
from shared.db import make_engine
from shared.rabbitmq import Bus, queue_names
from shared.settings import Settings
from testkit.broker import temporary_exchange
from testkit.console import running_console
from testkit.console_world import seed_console_world
from testkit.database import temporary_database
from tests.support import AMQP_URL, PG_ADMIN_URL, drain, queue_depth
from tests.test_console_http import HOSTILE_COMPANY, HOSTILE_OFFER, PASSWORD, USER, basic, table_rows

HOSTILE_REASON = '<script>alert("reason")</script> & <img src=x onerror=alert(1)>'
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
NEW_PATHS = ["/silences", "/api/silences", "/silences/1/end", "/held", "/api/held", "/held/release",
             "/held/discard"]


@dataclass
class Served:
    url: str
    engine: Engine          # read-write, for the test's own setup and checks
    tokens: CsrfTokens
    exchange: str
    held: list[int]         # held reject runs, oldest first; the first one's pair has hostile names

    def client(self, auth: tuple[str, str] | None = (USER, PASSWORD)) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=auth, timeout=20)

    def token(self) -> str:
        return self.tokens.issue(USER)

    def scalar(self, sql: str, **params):
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with (temporary_database(PG_ADMIN_URL, "kpi_controls") as url,
          temporary_exchange(AMQP_URL, "kpi.test.controls") as exchange):
        engine = make_engine(url)
        read_only = None
        try:
            with engine.begin() as conn:
                seed_console_world(conn, offers=8, affiliates=6, rounds=48)
                # Five rejects held by the hourly cap, as the action_runner records them.
                held = list(conn.execute(text("""
                    UPDATE operation_runs SET status = 'held', detail = 'held: 25 rejects this hour (the cap)',
                           finished_at = now(), attempts = 0
                    WHERE id IN (SELECT id FROM operation_runs WHERE kind = 'reject_affiliate' ORDER BY id LIMIT 5)
                    RETURNING id""")).scalars())
                offer_id, affiliate_id = conn.execute(text(
                    "SELECT e.offer_id, e.affiliate_id FROM operation_runs r "
                    "JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.id = :id"), {"id": min(held)}).one()
                conn.execute(text("UPDATE offers SET name = :n WHERE id = :id"), {"n": HOSTILE_OFFER, "id": offer_id})
                conn.execute(text("UPDATE affiliates SET company = :n WHERE id = :id"),
                             {"n": HOSTILE_COMPANY, "id": affiliate_id})
            Bus(AMQP_URL, exchange).connect().close()  # the queues, before the first release publishes
            read_only = console_engine(Settings(database_url=SecretStr(url)))
            tokens = CsrfTokens()
            app = create_app(read_only, credentials=Credentials(USER, PASSWORD), csrf=tokens,
                             bus_factory=lambda: Bus(AMQP_URL, exchange).connect())
            with running_console(app) as base:
                yield Served(base, engine, tokens, exchange, sorted(held))
        finally:
            if read_only is not None:
                read_only.dispose()
            engine.dispose()


def page_token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_the_new_paths_answer_401_without_valid_credentials(served):
    with served.client(auth=None) as client:
        for path in NEW_PATHS:
            for method in ("GET", "POST"):
                for headers in [{}, {"Authorization": basic(USER, "wrong")}]:
                    response = client.request(method, path, headers=headers)
                    assert response.status_code == 401, (method, path, headers)
                    assert response.headers["www-authenticate"].startswith("Basic")


def test_the_new_posts_are_refused_without_a_valid_csrf_token(served):
    silences_before = served.scalar("SELECT count(*) FROM silences")
    with served.client() as client:
        silence_id = _add(client, served.token(), reason="to be ended by a forger")
        held = served.held[-1]
        posts = [("/silences", {"trigger": "", "for": "1h", "reason": "forged"}),
                 (f"/silences/{silence_id}/end", {}),
                 ("/held/release", {"run": str(held)}), ("/held/discard", {"run": str(held)}),
                 ("/held/release", {"all": "1"}), ("/held/discard", {"all": "1"})]
        for path, fields in posts:
            for token in [None, "", "forged.0000", served.tokens.issue("someone else"), CsrfTokens().issue(USER)]:
                body = dict(fields) if token is None else {**fields, "csrf_token": token}
                response = client.post(path, data=body)
                assert response.status_code == 403 and "CSRF" in response.text, (path, token)
    assert served.scalar("SELECT count(*) FROM silences") == silences_before + 1
    assert served.scalar("SELECT ends_at > now() FROM silences WHERE id = :id", id=silence_id)
    assert served.scalar("SELECT count(*) FROM operation_runs WHERE status = 'held'") >= 1
    assert served.scalar("SELECT status FROM operation_runs WHERE id = :id", id=served.held[-1]) == "held"


def _add(client: httpx.Client, token: str, **fields: str) -> int:
    body = {"csrf_token": token, "trigger": "", "offer": "", "affiliate": "", "for": "2h", "until": "",
            "reason": "x", **fields}
    response = client.post("/silences", data=body)
    assert response.status_code == 303, response.text[:500]
    return int(re.fullmatch(r"/silences\?added=(\d+)", response.headers["location"]).group(1))


def test_a_silence_added_with_the_form_is_recorded_listed_and_ended(served):
    with served.client() as client:
        page = client.get("/silences")
        assert page.status_code == 200
        response = client.post("/silences", data={
            "csrf_token": page_token(page.text), "trigger": "min CR", "offer": "3", "affiliate": "",
            "for": "2h", "until": "", "reason": HOSTILE_REASON})
        assert response.status_code == 303
        silence_id = int(response.headers["location"].split("=")[1])
        row = served.engine.connect().execute(text(
            "SELECT s.offer_id, s.affiliate_id, t.name, s.reason, s.created_by, "
            "round(extract(epoch FROM s.ends_at - s.starts_at)) FROM silences s JOIN triggers t ON t.id = s.trigger_id "
            "WHERE s.id = :id"), {"id": silence_id}).one()
        assert tuple(row) == (3, None, "min CR", HOSTILE_REASON, USER, 7200)

        listed = client.get(response.headers["location"])
        assert f"Silence {silence_id} added." in listed.text
        rows = {int(attrs["data-silence-id"]): cells for attrs, cells in table_rows(listed.text)}
        assert rows[silence_id][1:4] == ["min CR", "3", "any"] and rows[silence_id][7] == USER
        # The reason comes from a person: shown as text, never as markup.
        assert "<script>alert(" not in listed.text and "<img src=x" not in listed.text
        assert "&lt;script&gt;alert(&#34;reason&#34;)&lt;/script&gt; &amp; &lt;img src=x" in listed.text
        api = client.get("/api/silences").json()["silences"]
        mine = next(s for s in api if s["id"] == silence_id)
        assert (mine["trigger"], mine["offer_id"], mine["reason"], mine["created_by"], mine["in_force"]) == \
            ("min CR", 3, HOSTILE_REASON, USER, True)
        assert [s["id"] for s in api] == list(rows)

        until = _add(client, served.token(), trigger="cap fill", affiliate="5", **{"for": ""},
                     until="2099-01-01T12:00:00Z", reason="until a time")
        assert served.scalar("SELECT ends_at = '2099-01-01 12:00Z' FROM silences WHERE id = :id", id=until)

        ended = client.post(f"/silences/{silence_id}/end", data={"csrf_token": served.token()})
        assert ended.status_code == 303 and ended.headers["location"] == f"/silences?ended_ids={silence_id}"
        assert served.scalar("SELECT ends_at <= now() FROM silences WHERE id = :id", id=silence_id)
        assert f"Silence {silence_id} ended." in client.get(ended.headers["location"]).text
        assert silence_id not in [s["id"] for s in client.get("/api/silences").json()["silences"]]
        assert silence_id in [s["id"] for s in client.get("/api/silences?ended=1").json()["silences"]]
        again = client.post(f"/silences/{silence_id}/end", data={"csrf_token": served.token()})
        assert again.headers["location"] == f"/silences?not_running={silence_id}"
        missing = client.post("/silences/999999/end", data={"csrf_token": served.token()})
        assert missing.status_code == 404 and "no silence with id 999999" in missing.text
        assert client.post("/silences/99999999999/end", data={"csrf_token": served.token()}).status_code == 404


@pytest.mark.parametrize("fields, message", [
    ({"reason": ""}, "a silence needs a reason"),
    ({"reason": "   "}, "a silence needs a reason"),
    ({"for": "", "until": ""}, "give exactly one of"),
    ({"for": "2h", "until": "2099-01-01T00:00Z"}, "give exactly one of"),
    ({"for": "soon"}, "invalid duration 'soon'"),
    ({"for": "0m"}, "invalid duration '0m'"),
    ({"for": "", "until": "tomorrow"}, "invalid time 'tomorrow'"),
    ({"for": "", "until": "2001-01-01T00:00:00Z"}, "would end"),
    ({"trigger": "no such trigger"}, "no trigger named 'no such trigger'"),
    ({"offer": "abc"}, "the offer must be an id"),
    ({"affiliate": "-4"}, "the affiliate must be an id"),
    ({"offer": "99999999999"}, "the offer must be an id"),
    ({"reason": "x" * 1001}, "the reason is too long"),
])
def test_bad_silence_input_is_refused_with_a_clear_error_and_the_form_kept(served, fields, message):
    before = served.scalar("SELECT count(*) FROM silences")
    body = {"csrf_token": served.token(), "trigger": "", "offer": "", "affiliate": "", "for": "1h", "until": "",
            "reason": "a reason <b>kept</b>", **fields}
    with served.client() as client:
        response = client.post("/silences", data=body)
    assert response.status_code == 400
    error = re.search(r'<p class="form-error">(.*?)</p>', response.text, re.S).group(1)
    assert message.replace("'", "&#39;") in error
    if fields.get("reason", "x").strip() and "reason" not in fields:
        assert 'value="a reason &lt;b&gt;kept&lt;/b&gt;"' in response.text  # the form as it was filled in
    assert served.scalar("SELECT count(*) FROM silences") == before


def test_held_rejects_are_listed_with_names_escaped(served):
    with served.client() as client:
        html = client.get("/held").text
        api = client.get("/api/held").json()
    still_held = [r["id"] for r in api["held"]]
    assert still_held == sorted(still_held) and api["total"] == len(still_held) and api["pages"] == 1
    assert [int(attrs["data-run-id"]) for attrs, _ in table_rows(html)] == still_held
    with served.client() as client:
        second = client.get("/api/held", params={"per_page": "2", "page": "2"}).json()
        assert [r["id"] for r in second["held"]] == still_held[2:4] and second["pages"] == -(-len(still_held) // 2)
        paged = client.get("/held", params={"per_page": "2", "page": "2"}).text
        assert [int(attrs["data-run-id"]) for attrs, _ in table_rows(paged)] == still_held[2:4]
        assert "page 2 of" in paged and f"Release all {len(still_held)}" in paged
        assert client.get("/held", params={"page": "0"}).status_code == 400
        assert client.get("/api/held", params={"per_page": "x"}).json()["error"].startswith("per_page must be")
    if served.held[0] in still_held:
        first = api["held"][0]
        assert (first["offer_name"], first["affiliate_company"]) == (HOSTILE_OFFER, HOSTILE_COMPANY)
        assert "<script>alert(" not in html and "<b>Ltd</b>" not in html
        assert "&lt;script&gt;alert(&#34;offer&#34;)&lt;/script&gt; Bonus &amp; &#34;Deals&#34;" in html
        assert "&lt;script&gt;alert(&#39;company&#39;)&lt;/script&gt; Media &lt;b&gt;Ltd&lt;/b&gt;" in html


def test_a_held_reject_released_twice_is_released_and_announced_once(served):
    run = served.held[0]
    work = queue_names(served.exchange, "action_runner").work
    drain(work)
    with served.client() as client:
        assert f'data-run-id="{run}"' in client.get("/held").text
        first = client.post("/held/release", data={"csrf_token": served.token(), "run": str(run)})
        assert first.status_code == 303 and first.headers["location"] == f"/held?released={run}"
        assert f"Released run {run}: an action_runner runs it now." in client.get(first.headers["location"]).text
        second = client.post("/held/release", data={"csrf_token": served.token(), "run": str(run)})
        assert second.headers["location"] == "/held?none=1"
        assert "Nothing to do: released or discarded already." in client.get("/held?none=1").text
        assert f'data-run-id="{run}"' not in client.get("/held").text
    status, decided_by, detail = served.engine.connect().execute(text(
        "SELECT status, decided_by, detail FROM operation_runs WHERE id = :id"), {"id": run}).one()
    assert (status, decided_by, detail) == ("pending", USER, f"released by {USER}")
    # The event is published once, so an action_runner runs the released run now.
    messages = drain(work)
    assert len(messages) == 1
    event_id = served.scalar("SELECT trigger_event_id FROM operation_runs WHERE id = :id", id=run)
    assert json.loads(messages[0][1])["data"]["trigger_event_id"] == event_id


def test_held_rejects_discarded_one_and_all_and_bad_decisions(served):
    one, *rest = served.held[1:]
    with served.client() as client:
        response = client.post("/held/discard", data={"csrf_token": served.token(), "run": str(one)})
        assert response.headers["location"] == f"/held?discarded={one}"
        assert served.scalar("SELECT status || ' ' || decided_by FROM operation_runs WHERE id = :id",
                             id=one) == f"discarded {USER}"
        for fields, status, message in [({"run": "abc"}, 400, "name the held run"), ({}, 400, "name the held run"),
                                        ({"run": "999999"}, 404, "no operation run with id 999999")]:
            bad = client.post("/held/release", data={"csrf_token": served.token(), **fields})
            assert bad.status_code == status and message in bad.text, fields
        assert client.post("/held/approve", data={"csrf_token": served.token(), "all": "1"}).status_code == 404
        everything = client.post("/held/discard", data={"csrf_token": served.token(), "all": "1"})
        assert everything.headers["location"] == f"/held?discarded={','.join(map(str, rest))}"
        assert client.get("/api/held").json() == {"held": [], "total": 0, "page": 1, "per_page": 50, "pages": 1}
        assert "No reject is held." in client.get("/held").text
    assert served.scalar("SELECT count(*) FROM operation_runs WHERE status = 'held'") == 0
