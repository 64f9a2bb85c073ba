"""`kpi backtest` says what the services do, and `kpi explain` says why.

The same values go through the real services (trigger_checker, event_detector,
action_runner and its ticker) round by round, and through the backtest afterwards; the
state changes and the operation runs must be the same, one by one. The scenario has
every rule of DESIGN.md sections 6 and 7 in play: debounce, hysteresis, a silence, a
protected affiliate, the reject cap and reminders.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from shared import silences
from shared.events import METRIC_LOADED, new_event
from testkit import ROOT
from testkit.fake_hasoffers.network import FakeAffiliate, FakeOffer, Network
from testkit.fake_hasoffers.server import FakeHasOffers
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for
from tests.alerting_support import settled

START = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=3)
OFFERS = (1, 2)
AFFILIATES = range(1, 7)
PROTECTED, SILENCED = 5, 6
ROUNDS = 12


def seed(db) -> None:
    with db.begin() as conn:
        conn.execute(text("""
            INSERT INTO triggers (id, name, metric_key, operator, threshold, for_checks, recovery_threshold)
                VALUES (1, 'min CR', 'cr', 'lt', 0.05, 2, 0.08), (2, 'deep loss', 'pacc', 'lt', -50, 1, NULL);
            INSERT INTO offers (id, name, require_approval) VALUES (1, 'One', false), (2, 'Two', true);
            INSERT INTO affiliates (id, company, protected)
                SELECT a, 'Aff ' || a, a = :protected FROM generate_series(1, 6) a;
            INSERT INTO affiliate_users (id, affiliate_id, email, status)
                SELECT 100 + a, a, 'user' || a || '@aff.example', 'active' FROM generate_series(1, 4) a;
            INSERT INTO administrators (email) VALUES ('ops@net.example');
            INSERT INTO operations (id, name, kind) VALUES (1, 'tell the affiliate', 'email_affiliate'),
                (2, 'reject', 'reject_affiliate'), (3, 'tell ops', 'email_administrators');
            INSERT INTO actions (id, name, repeat_minutes) VALUES (1, 'low CR', 10), (2, 'losing money', NULL);
            INSERT INTO action_conditions (action_id, trigger_id, trigger_status) VALUES (1, 1, 'PROBLEM'),
                (2, 2, 'PROBLEM');
            INSERT INTO action_operations (action_id, operation_id) VALUES (1, 1), (2, 2), (2, 3);
        """), {"protected": PROTECTED})
        silences.add(conn, trigger=None, offer_id=None, affiliate_id=SILENCED, starts_at=START - timedelta(days=1),
                     ends_at=START + timedelta(days=2), reason="known partner", created_by="test")


def values(rng: random.Random) -> list[list[dict]]:
    rounds = []
    for r in range(ROUNDS):
        # All within an hour of measured_at: the services' cap counts by the wall clock (the
        # test takes seconds), the backtest's by measured_at; within one hour they agree.
        at = (START + timedelta(minutes=4 * r)).isoformat()
        items = []
        for o in OFFERS:
            for a in AFFILIATES:
                items.append({"metric_key": "cr", "offer_id": o, "affiliate_id": a, "measured_at": at,
                              "value": rng.choice([0.01, 0.02, 0.06, 0.07, 0.1])})
                items.append({"metric_key": "pacc", "offer_id": o, "affiliate_id": a, "measured_at": at,
                              "value": rng.choice([-100.0, 10.0, 20.0, 30.0])})
        rounds.append(items)
    return rounds


@pytest.fixture
def fake_api():
    fake = FakeHasOffers(Network(offers={1: FakeOffer(1, "One"), 2: FakeOffer(2, "Two", require_approval=True)},
                                 affiliates={a: FakeAffiliate(a, f"Aff {a}") for a in AFFILIATES}))
    fake.start()
    yield fake
    fake.stop()


def test_the_backtest_of_stored_values_is_what_the_services_did(db, bus, start_service, service_env, fake_api):
    seed(db)
    smtp = FakeSmtpServer().start()
    try:
        env = {**smtp.env, "HASOFFERS_BASE_URL": fake_api.base_url, "HASOFFERS_NETWORK_ID": fake_api.network_id,
               "HASOFFERS_NETWORK_TOKEN": fake_api.network_token, "KPI_MAX_REJECTS_PER_HOUR": "3",
               "KPI_ACTIONS_TICK_SECONDS": "0.2"}
        for service in ("trigger_checker", "event_detector", "action_runner"):
            start_service(service, **env)
        for items in values(random.Random(4)):
            bus.publish(new_event(METRIC_LOADED, {"metrics": items}))
            wait_for(lambda: settled(db, items[0]["measured_at"], len(items)), 30, interval=0.2,
                     what="the round to settle")
    finally:
        smtp.stop()

    with db.connect() as conn:
        changes = [tuple(r) for r in conn.execute(text(
            "SELECT t.name, e.offer_id, e.affiliate_id, e.previous_status, e.status, e.measured_at "
            "FROM trigger_events e JOIN triggers t ON t.id = e.trigger_id ORDER BY e.measured_at, e.id"))]
        runs = [tuple(r) for r in conn.execute(text(
            "SELECT a.name, o.name, r.kind, e.offer_id, e.affiliate_id, r.measured_at, r.repeat > 0, r.status "
            "FROM operation_runs r JOIN trigger_events e ON e.id = r.trigger_event_id "
            "JOIN actions a ON a.id = r.action_id JOIN operations o ON o.id = r.operation_id "
            "ORDER BY r.measured_at, r.id"))]
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "backtest", "--from", START.isoformat(), "--json"], cwd=ROOT,
        env={**os.environ, **service_env, "KPI_MAX_REJECTS_PER_HOUR": "3"}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    replay = json.loads(result.stdout)

    def at(text_: str) -> datetime:
        return datetime.fromisoformat(text_)

    assert [(c["trigger"], c["offer_id"], c["affiliate_id"], c["previous_status"], c["status"], at(c["measured_at"]))
            for c in replay["state_changes"]] == changes
    outcome = {"succeeded": "would_run", "held": "held", "skipped": "skipped", "silenced": "silenced"}
    # The same runs; at one measured_at, in whatever order the handlers and the ticker took them.
    replayed = sorted((o["action"], o["operation"], o["kind"], o["offer_id"], o["affiliate_id"], at(o["measured_at"]),
                       o["reminder"], o["outcome"]) for o in replay["operations"])
    done = sorted((*run[:-1], outcome[run[-1]]) for run in runs)
    assert replayed == done, {"backtest only": sorted(set(replayed) - set(done)),
                              "services only": sorted(set(done) - set(replayed))}
    kinds = {(r[2], r[-1]) for r in runs}
    # Every rule was in play, or the comparison proves less than it says.
    assert {("reject_affiliate", "succeeded"), ("reject_affiliate", "held"), ("reject_affiliate", "skipped"),
            ("email_affiliate", "silenced")} <= kinds, kinds
    assert any(r[6] for r in runs), "no reminder"
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trigger_states WHERE streak = 1 AND status = 'OK'"
                                 )).scalar_one() > 0, "no debounce in play"
    assert replay["summary"]["state_changes"] == len(changes)


def test_the_backtest_writes_nothing(db, service_env):
    seed(db)
    with db.begin() as conn:
        conn.execute(text("INSERT INTO metric_values (metric_key, offer_id, affiliate_id, value, measured_at) "
                          "SELECT 'cr', 1, 1, 0.01, :t + a * interval '10 minutes' FROM generate_series(1, 5) a"),
                     {"t": START})

    def counts():
        with db.connect() as conn:
            return conn.execute(text("SELECT (SELECT count(*) FROM trigger_checks), (SELECT count(*) FROM "
                                     "trigger_states), (SELECT count(*) FROM trigger_events), (SELECT count(*) FROM "
                                     "operation_runs), (SELECT count(*) FROM action_firings)")).one()

    before = counts()
    result = subprocess.run([sys.executable, "-m", "shared.cli", "backtest", "--from", START.isoformat()],
                            cwd=ROOT, env={**os.environ, **service_env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "state changes: 1 (1 to PROBLEM, 0 to OK)" in result.stdout and "reject_affiliate" not in result.stdout
    assert counts() == before


@pytest.mark.parametrize("args, message", [
    (["backtest", "--from", "yesterday"], "invalid --from 'yesterday'"),
    (["backtest", "--from", "2026-11-02T00:00:00Z", "--to", "2026-11-01T00:00:00Z"], "must be after --from"),
    (["explain", "--trigger", "nope", "--offer", "1", "--affiliate", "1"], "no trigger named 'nope'"),
    (["explain", "--trigger", "min CR", "--offer", "0", "--affiliate", "1"], "invalid offer id 0"),
])
def test_bad_input_exits_2_with_one_clear_line(db, service_env, args, message):
    seed(db)
    result = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**os.environ, **service_env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_explain_says_why_an_action_did_or_did_not_fire(db, bus, start_service, service_env, fake_api):
    seed(db)
    env = {"HASOFFERS_BASE_URL": fake_api.base_url, "HASOFFERS_NETWORK_ID": fake_api.network_id,
           "HASOFFERS_NETWORK_TOKEN": fake_api.network_token, "KPI_MAX_REJECTS_PER_HOUR": "0"}
    for service in ("trigger_checker", "event_detector", "action_runner"):
        start_service(service, **env)
    bus.publish(new_event(METRIC_LOADED, {"metrics": [
        {"metric_key": "pacc", "offer_id": 1, "affiliate_id": 2, "measured_at": START.isoformat(), "value": -100.0}]}))
    wait_for(lambda: settled(db, START.isoformat(), 1), 30, what="the event to be acted on")
    result = subprocess.run([sys.executable, "-m", "shared.cli", "explain", "--trigger", "deep loss", "--offer", "1",
                             "--affiliate", "2", "--json"], cwd=ROOT, env={**os.environ, **service_env},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"]["status"] == "PROBLEM" and report["state"]["streak"] == 1
    assert report["threshold"] == {"value": -50.0, "recovery": None, "scope": "general",
                                   "row": "triggers #2 (general threshold)"}
    [action] = report["actions"]
    [event] = action["events"]
    assert event["fired"] and event["why"] == "every condition holds"
    assert {(r["kind"], r["status"]) for r in event["runs"]} == {("reject_affiliate", "held"),
                                                                 ("email_administrators", "succeeded")} or \
        {(r["kind"], r["status"]) for r in event["runs"]} == {("reject_affiliate", "held"),
                                                              ("email_administrators", "failed")}
    held = next(r for r in event["runs"] if r["kind"] == "reject_affiliate")
    assert "KPI_MAX_REJECTS_PER_HOUR is 0" in held["detail"]
    text_report = subprocess.run([sys.executable, "-m", "shared.cli", "explain", "--trigger", "deep loss", "--offer",
                                  "1", "--affiliate", "2"], cwd=ROOT, env={**os.environ, **service_env},
                                 capture_output=True, text=True, timeout=60).stdout
    assert "state: PROBLEM since" in text_report and "fired (every condition holds)" in text_report
