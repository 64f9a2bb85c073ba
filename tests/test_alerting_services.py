"""Debounce, recovery, a silence, reminders and digests through the real services: three
event_detector replicas, two action_runners (one restarted while a digest is open) and a
real SMTP server, which must receive exactly the emails a model written here expects."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from shared import silences
from shared.events import METRIC_LOADED, new_event
from testkit.smtp import FakeSmtpServer
from testkit.waiting import wait_for
from tests.alerting_support import settled

START = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(hours=2)
OFFER = 3
AFFILIATES = range(1, 9)
SILENCED = 8
ROUNDS = 14
MINUTES = 5  # between rounds
REPEAT = 12  # reminders at least this many minutes after the last run
FOR_CHECKS, THRESHOLD, RECOVERY = 2, 0.05, 0.08


def seed(db) -> None:
    with db.begin() as conn:
        conn.execute(text("""
            INSERT INTO triggers (id, name, metric_key, operator, threshold, for_checks, recovery_threshold)
                VALUES (1, 'min CR', 'cr', 'lt', :threshold, :for_checks, :recovery);
            INSERT INTO offers (id, name) VALUES (:offer, 'Offer');
            INSERT INTO affiliates (id, company) SELECT a, 'Aff ' || a FROM generate_series(1, 8) a;
            INSERT INTO affiliate_users (id, affiliate_id, email, status)
                SELECT a, a, 'user' || a || '@aff.example', 'active' FROM generate_series(1, 8) a;
            INSERT INTO administrators (email) VALUES ('ops@net.example');
            INSERT INTO operations (id, name, kind, digest_minutes) VALUES
                (1, 'tell the affiliate', 'email_affiliate', NULL), (2, 'tell ops', 'email_administrators', 60);
            INSERT INTO actions (id, name, repeat_minutes) VALUES (1, 'low CR', :repeat);
            INSERT INTO action_conditions (action_id, trigger_id, trigger_status) VALUES (1, 1, 'PROBLEM');
            INSERT INTO action_operations (action_id, operation_id) VALUES (1, 1), (1, 2);
        """), {"threshold": THRESHOLD, "for_checks": FOR_CHECKS, "recovery": RECOVERY, "offer": OFFER,
               "repeat": REPEAT})
        silences.add(conn, trigger="min CR", offer_id=None, affiliate_id=SILENCED,
                     starts_at=START - timedelta(days=1), ends_at=START + timedelta(days=1), reason="partner",
                     created_by="test")


def model(values: dict[int, list[float]]) -> tuple[Counter, list[tuple[int, int]]]:
    """The emails to affiliates (recipient -> count) and the (affiliate, repeat) of every
    run of the digested operation, from the values alone (DESIGN.md section 6)."""
    affiliate_mails: Counter = Counter()
    digested: list[tuple[int, int]] = []
    for affiliate, series in values.items():
        status, streak, last_run, repeat = None, 0, None, 0
        for r, value in enumerate(series):
            at = START + timedelta(minutes=MINUTES * r)
            if value < THRESHOLD:
                streak += 1
                if status != "PROBLEM" and streak >= FOR_CHECKS:
                    status, last_run, repeat = "PROBLEM", at, 0
                    digested.append((affiliate, 0))
                    if affiliate != SILENCED:
                        affiliate_mails[f"user{affiliate}@aff.example"] += 1
                    continue
            else:
                streak = 0
                if status is None:
                    status = "OK"
                elif status == "PROBLEM" and not value < RECOVERY:
                    status = "OK"
                    continue
            if status == "PROBLEM" and at >= last_run + timedelta(minutes=REPEAT):
                repeat += 1
                last_run = at
                digested.append((affiliate, repeat))
                if affiliate != SILENCED:
                    affiliate_mails[f"user{affiliate}@aff.example"] += 1
    return affiliate_mails, digested


def test_debounce_recovery_silence_reminders_and_digests_send_exactly_the_expected_emails(
        db, bus, start_service):
    seed(db)
    rng = random.Random(21)
    values = {a: [rng.choice([0.01, 0.02, 0.06, 0.07, 0.1]) for _ in range(ROUNDS)] for a in AFFILIATES}
    smtp = FakeSmtpServer().start()
    try:
        env = {**smtp.env, "KPI_ACTIONS_TICK_SECONDS": "0.2"}
        start_service("trigger_checker", **env)
        for _ in range(3):
            start_service("event_detector", **env)
        runners = [start_service("action_runner", **env) for _ in range(2)]
        for r in range(ROUNDS):
            at = (START + timedelta(minutes=MINUTES * r)).isoformat()
            bus.publish(new_event(METRIC_LOADED, {"metrics": [
                {"metric_key": "cr", "offer_id": OFFER, "affiliate_id": a, "measured_at": at, "value": values[a][r]}
                for a in AFFILIATES]}))
            wait_for(lambda: settled(db, at, len(AFFILIATES)), 30, interval=0.2, what=f"round {r} to settle")
            if r == ROUNDS // 2:  # a replica goes away while the digest is open, and comes back
                runners[0].terminate()
                runners[0] = start_service("action_runner", **env)
        with db.begin() as conn:  # the digest's window passes (it is wall-clock minutes)
            conn.execute(text("UPDATE digests SET closes_at = now() WHERE status = 'open'"))
        wait_for(lambda: settled(db) and not _open_digests(db), 30, interval=0.2, what="the digest to go out")
        mails = smtp.mails()
    finally:
        smtp.stop()

    expected_mails, digested = model(values)
    to_affiliates = Counter(m.rcpt_tos[0] for m in mails if m.rcpt_tos != ["ops@net.example"])
    assert to_affiliates == expected_mails
    [digest] = [m for m in mails if m.rcpt_tos == ["ops@net.example"]]  # one email for every run of the window
    carried = [int(x) for x in digest.message["X-KPI-Digest-Runs"].split(",")]
    with db.connect() as conn:
        runs = conn.execute(text(
            "SELECT r.id, e.affiliate_id, r.repeat, r.status, r.message_id FROM operation_runs r "
            "JOIN trigger_events e ON e.id = r.trigger_event_id WHERE r.kind = 'email_administrators' "
            "ORDER BY r.id")).all()
        affiliate_runs = Counter((e, s) for e, s in conn.execute(text(
            "SELECT e.affiliate_id, r.status FROM operation_runs r JOIN trigger_events e ON e.id = r.trigger_event_id "
            "WHERE r.kind = 'email_affiliate'")))
    assert sorted(carried) == [r.id for r in runs if r.status == "succeeded"]
    assert all(r.message_id == digest.message["Message-ID"] for r in runs if r.status == "succeeded")
    assert sorted((r.affiliate_id, r.repeat) for r in runs) == sorted(digested)
    assert {r.status for r in runs if r.affiliate_id == SILENCED} <= {"silenced"}
    assert affiliate_runs[SILENCED, "silenced"] == sum(1 for a, _ in digested if a == SILENCED)
    assert any(repeat for _, repeat in digested), "no reminder in the scenario"
    assert any(a == SILENCED for a, _ in digested), "the silence silenced nothing"


def _open_digests(db) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM digests WHERE status = 'open'")).scalar_one()
